//! Cuts a big manifest into parts of whole objects as it is read, for the parsing threads:
//! the items of a `kind: List` JSON text, or runs of YAML documents cut at their markers.
//! The text is never held whole: each part is a block of it, so a 450 MB List costs a few
//! blocks of memory while it is read, not its size, and the blocks are reused memory
//! rather than fresh pages the kernel has to zero.
//!
//! A scan that only tells strings and brackets apart finds where the objects are (several
//! times faster than any parse). Nothing is validated here: every part is parsed whole, and
//! the text around a List's items is returned to be parsed too, so the parts are accepted
//! exactly when a parse of the whole text would be. Whatever this scan does not expect
//! makes it give up, and the file is read whole.

use std::{io::Read, ops::Range};

/// A block of the text that holds whole objects.
pub(super) struct Part {
    pub text: String,
    /// A List's items: where each is in `text`. Empty for YAML, whose whole part is a run
    /// of documents.
    pub items: Vec<Range<usize>>,
}

/// The text as it is read: what has been read and not yet handed on.
struct Blocks<R> {
    input: R,
    buffer: Vec<u8>,
    block: usize,
    end: bool,
}

impl<R: Read> Blocks<R> {
    fn new(input: R, block: usize) -> Self {
        Self {
            input,
            buffer: Vec::with_capacity(block),
            block,
            end: false,
        }
    }

    /// Reads another block onto the buffer; `false` once the input is all read.
    fn more(&mut self) -> std::io::Result<bool> {
        if self.end {
            return Ok(false);
        }
        let read = (&mut self.input)
            .take(self.block as u64)
            .read_to_end(&mut self.buffer)?;
        self.end = read == 0;
        Ok(!self.end)
    }

    /// The buffer up to `at`, as text; the buffer keeps what follows. `None` if it is not
    /// UTF-8.
    fn cut(&mut self, at: usize) -> Option<String> {
        let mut rest = Vec::with_capacity(self.buffer.len() - at + self.block);
        rest.extend_from_slice(&self.buffer[at..]);
        let mut taken = std::mem::replace(&mut self.buffer, rest);
        taken.truncate(at);
        String::from_utf8(taken).ok()
    }

    /// Everything not yet handed on, to the end of the input.
    fn rest(mut self) -> std::io::Result<Option<String>> {
        self.input.read_to_end(&mut self.buffer)?;
        Ok(String::from_utf8(self.buffer).ok())
    }
}

/// One step of a scan over the buffer: where the scan goes on, or `None` when the buffer
/// ends before the step does or the text is not what the scan expects.
type Step<T> = fn(&[u8], usize) -> Option<T>;

impl<R: Read> Blocks<R> {
    /// `step` from `at`, reading more until it completes; `None` if it never does.
    fn complete<T>(&mut self, step: Step<T>, at: usize) -> std::io::Result<Option<T>> {
        loop {
            if let Some(done) = step(&self.buffer, at) {
                return Ok(Some(done));
            }
            if !self.more()? {
                return Ok(None);
            }
        }
    }
}

/// Where a JSON object's top-level field stands.
enum Field {
    /// Another field follows, at this byte.
    Next(usize),
    /// The object ends.
    End,
    /// The `items` array opens at this byte.
    Items(usize),
}

/// The field whose key starts at `i`, and what comes after it. Each step needs the byte
/// that follows it, so that a value cut off by the end of the buffer is never taken whole.
fn field(b: &[u8], i: usize) -> Option<Field> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let key_end = string_end(b, i)?;
    let key = b.get(i + 1..key_end - 1)?;
    let mut i = skip_whitespace(b, key_end);
    if b.get(i) != Some(&b':') {
        return None;
    }
    i = skip_whitespace(b, i + 1);
    if key == b"items" && b.get(i) == Some(&b'[') {
        return Some(Field::Items(i));
    }
    i = skip_whitespace(b, value_end(b, i)?);
    match b.get(i)? {
        b',' => {
            let next = skip_whitespace(b, i + 1);
            b.get(next).map(|_| Field::Next(next))
        }
        b'}' => Some(Field::End),
        _ => None,
    }
}

/// The first field of the object that opens the text.
fn object_start(b: &[u8], _: usize) -> Option<usize> {
    let i = skip_whitespace(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    let first = skip_whitespace(b, i + 1);
    b.get(first).map(|_| first)
}

/// What follows an array element that starts at `i`: its end and where the scan goes on.
enum Element {
    /// Another element follows, at this byte.
    Next(Range<usize>, usize),
    /// The array closes at this byte after this element.
    Last(Range<usize>, usize),
}

fn element(b: &[u8], i: usize) -> Option<Element> {
    let end = value_end(b, i)?;
    let after = skip_whitespace(b, end);
    match b.get(after)? {
        b',' => {
            let next = skip_whitespace(b, after + 1);
            b.get(next).map(|_| Element::Next(i..end, next))
        }
        b']' => Some(Element::Last(i..end, after)),
        _ => None,
    }
}

/// Hands each run of the items of the top-level `items` array of the JSON object `input`
/// to `dispatch`, and returns the text without them — what is around the array, with `[]`
/// in its place — for the caller to check that it is a List. `None`, with some runs maybe
/// handed on, if the text is not a JSON object with an `items` array.
pub(super) fn json_list(
    input: impl Read,
    block: usize,
    dispatch: &mut dyn FnMut(Part),
) -> std::io::Result<Option<String>> {
    let mut blocks = Blocks::new(input, block);
    let Some(mut i) = blocks.complete(object_start, 0)? else {
        return Ok(None);
    };
    let open = loop {
        match blocks.complete(field, i)? {
            Some(Field::Next(next)) => i = next,
            Some(Field::Items(open)) => break open,
            Some(Field::End) | None => return Ok(None),
        }
    };
    let Some(mut around) = std::str::from_utf8(&blocks.buffer[..=open])
        .ok()
        .map(str::to_owned)
    else {
        return Ok(None);
    };
    let empty = |b: &[u8], i: usize| {
        let at = skip_whitespace(b, i + 1);
        b.get(at).map(|&c| (c == b']', at))
    };
    let Some((is_empty, mut i)) = blocks.complete(empty, open)? else {
        return Ok(None);
    };
    let mut items = Vec::new();
    let close = if is_empty {
        i
    } else {
        loop {
            match element(&blocks.buffer, i) {
                Some(Element::Next(item, next)) => {
                    items.push(item);
                    i = next;
                }
                Some(Element::Last(item, close)) => {
                    items.push(item);
                    break close;
                }
                None => {
                    // The buffer ends inside the element at `i`: what comes before it is
                    // a part, and the element is read on.
                    if !items.is_empty() {
                        let Some(text) = blocks.cut(i) else {
                            return Ok(None);
                        };
                        dispatch(Part {
                            text,
                            items: std::mem::take(&mut items),
                        });
                        i = 0;
                    }
                    if !blocks.more()? {
                        return Ok(None);
                    }
                }
            }
        }
    };
    let Some(text) = blocks.cut(close) else {
        return Ok(None);
    };
    if !items.is_empty() {
        dispatch(Part { text, items });
    }
    let Some(rest) = blocks.rest()? else {
        return Ok(None);
    };
    around.push_str(&rest);
    Ok(Some(around))
}

/// Hands runs of whole documents of the multi-document YAML `input` to `dispatch`, cut at
/// document markers (`---` at the start of a line, which YAML allows nowhere else).
/// `false`, with some runs maybe handed on, if the text has directives (`%YAML`), which
/// apply to the documents after them, or is not UTF-8.
pub(super) fn yaml_documents(
    input: impl Read,
    block: usize,
    dispatch: &mut dyn FnMut(Part),
) -> std::io::Result<bool> {
    let mut blocks = Blocks::new(input, block);
    // Where the last look for directives and markers ended: each block is searched once,
    // so that one long document (a `kind: List` as `kubectl get -o yaml` writes it) costs
    // its length, not its length times its blocks.
    let mut checked = 0;
    while blocks.more()? {
        let b = &blocks.buffer;
        if b.starts_with(b"%") || memchr::memmem::find(&b[checked..], b"\n%").is_some() {
            return Ok(false);
        }
        // A marker is `\n---` and the byte after it: it may start up to four bytes back.
        let marker = last_document_marker(b, checked.saturating_sub(4));
        checked = b.len().saturating_sub(1);
        if let Some(marker) = marker
            && marker > 0
        {
            let Some(text) = blocks.cut(marker) else {
                return Ok(false);
            };
            checked = checked.saturating_sub(marker);
            dispatch(Part {
                text,
                items: Vec::new(),
            });
        }
    }
    if !blocks.buffer.is_empty() {
        let Ok(text) = String::from_utf8(blocks.buffer) else {
            return Ok(false);
        };
        dispatch(Part {
            text,
            items: Vec::new(),
        });
    }
    Ok(true)
}

/// Where the last document marker line of `b` at or after `from` starts, if the byte after
/// the marker is in `b` (`---` ends the line or is followed by a blank: `----` or `---x`
/// is content).
fn last_document_marker(b: &[u8], from: usize) -> Option<usize> {
    let mut before = b.len();
    while let Some(found) = memchr::memmem::rfind(&b[from.min(before)..before], b"\n---")
        .map(|found| found + from.min(before))
    {
        let line = found + 1;
        if matches!(b.get(line + 3), Some(b'\n' | b'\r' | b' ' | b'\t')) {
            return Some(line);
        }
        before = found;
    }
    None
}

fn skip_whitespace(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Just past the closing quote of the string that opens at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut at = i + 1;
    loop {
        at += memchr::memchr2(b'"', b'\\', b.get(at..)?)?;
        if b[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: whatever follows the backslash is not the end.
        at += 2;
    }
}

/// Just past the value that starts at `i`. Inside an object only braces count (brackets
/// balance among themselves in valid JSON, and invalid JSON fails its parse anyway), inside
/// an array only brackets: one SIMD search per structural byte.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    let (open, close) = match b.get(i)? {
        b'"' => return string_end(b, i),
        b'{' => (b'{', b'}'),
        b'[' => (b'[', b']'),
        _ => {
            let len = b
                .get(i..)?
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - i);
            return Some(i + len);
        }
    };
    let mut depth = 0_usize;
    let mut at = i;
    loop {
        at += memchr::memchr3(b'"', open, close, b.get(at..)?)?;
        match b[at] {
            b'"' => {
                at = string_end(b, at)?;
                continue;
            }
            c if c == open => depth += 1,
            _ => {
                depth -= 1;
                if depth == 0 {
                    return Some(at + 1);
                }
            }
        }
        at += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_parts(text: &str, block: usize) -> (Option<String>, Vec<Vec<String>>) {
        let mut parts = Vec::new();
        let around = json_list(text.as_bytes(), block, &mut |part: Part| {
            parts.push(
                part.items
                    .iter()
                    .map(|item| part.text[item.clone()].to_owned())
                    .collect(),
            );
        })
        .unwrap();
        (around, parts)
    }

    #[test]
    fn a_list_is_cut_between_items_whatever_the_block_size() {
        let text = r#" {"kind": "List", "apiVersion": "v1", "items": [ {"a": "}\"{"}, [1, 2], {"b": {"c": [3]}} , 4 ,"x"], "metadata": {}}"#;
        let want = [
            r#"{"a": "}\"{"}"#,
            "[1, 2]",
            r#"{"b": {"c": [3]}}"#,
            "4",
            r#""x""#,
        ];
        for block in [1, 2, 3, 7, 16, 1000] {
            let (around, parts) = json_parts(text, block);
            assert_eq!(
                around.as_deref(),
                Some(r#" {"kind": "List", "apiVersion": "v1", "items": [], "metadata": {}}"#),
                "block {block}"
            );
            assert_eq!(parts.concat(), want, "block {block}");
            if block < 8 {
                assert!(parts.len() > 1, "block {block}: {parts:?}");
            }
        }
        let (around, parts) = json_parts(r#"{"items": [ ], "kind": "List"}"#, 3);
        assert_eq!(around.as_deref(), Some(r#"{"items": [], "kind": "List"}"#));
        assert!(parts.is_empty());
    }

    #[test]
    fn what_is_not_an_object_with_an_items_array_gives_up() {
        for text in [
            "[1, 2]",
            r#"{"kind": "List"}"#,
            r#"{"items": {}}"#,
            r#"{"kind": "List", "items": [1, 2"#,
            r#"{"kind": "List", "items": [1 2]}"#,
            r#"{"kind": "List" "items": []}"#,
        ] {
            assert_eq!(json_parts(text, 4).0, None, "{text}");
        }
    }

    #[test]
    fn yaml_is_cut_only_at_document_markers() {
        let text = "a: 1\n---\nb: |\n  ---\n----\n---x: 2\n--- \nc: 3\n---\nd: 4\n";
        for block in [1, 5, 12, 1000] {
            let mut parts = Vec::new();
            let cut = yaml_documents(text.as_bytes(), block, &mut |part: Part| {
                parts.push(part.text);
            })
            .unwrap();
            assert!(cut);
            assert_eq!(parts.concat(), text, "block {block}");
            assert!(
                parts[1..]
                    .iter()
                    .all(|part| part.starts_with("---\n") || part.starts_with("--- \n")),
                "block {block}: {parts:?}"
            );
            if block < 20 {
                assert!(parts.len() > 1, "block {block}: {parts:?}");
            }
        }
        for text in ["%YAML 1.2\n---\na: 1\n", "a: 1\n---\n%TAG ! x\n---\nb: 2\n"] {
            assert!(!yaml_documents(text.as_bytes(), 3, &mut |_| {}).unwrap());
        }
    }
}
