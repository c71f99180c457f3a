//! Reads Service and EndpointSlice objects from a directory of manifests, exactly as
//! `kubectl get -o yaml|json` writes them: multi-document YAML, JSON, and `kind: List`.
//!
//! Objects of other kinds (Deployments, Pods, …) are skipped, so a directory can hold a
//! whole application. Errors name the file, the object and the field.
//!
//! A file is read *streamed* first: each object is typed into the lean [`api`] types while
//! the parser reads it and converted into its model at once (on the parsing thread, so that
//! no API object outlives its parsing), and the items of a `kind: List` are handled one by
//! one, so that nothing but the models the agent keeps is allocated. A parser cannot
//! resume in the middle of an object, so streaming gives up at the first thing it does
//! not expect (a field of the wrong type, a document without `kind`, …), and the file is
//! read again *buffered*: each object — one document or one List item, never a whole List
//! — is read into an untyped [`serde_json::Value`] first, so that its kind and name are
//! known whatever fails, and typed from there. The buffered reading defines the results and the errors;
//! streaming reaches the same results faster when nothing is wrong.
//!
//! JSON (`*.json`, or text that starts with `{`) is read with serde_json, several times
//! faster than a YAML parser; what is not valid JSON is read as YAML.
//!
//! A big file is read in parts and parsed on every core: as one thread reads it, it finds
//! the items of a List (which costs a fraction of typing them) or cuts multi-document YAML
//! at its document markers, and hands the parts on to the others ([`parts`]), so that the
//! text is never in memory whole. Whenever a part fails the whole text is read as above, so
//! the parts never change a result or an error.

mod parts;

use std::{
    fmt,
    io::{Read, Seek},
    path::{Path, PathBuf},
};

use parts::Part;

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;

use crate::{
    model::{Kind, ObjectError, ObjectModel, ObjectRef, ServiceModel, SliceModel},
    source::api,
};

/// One object of a file: its identity, and its model or why it could not be read.
#[derive(Debug)]
pub struct Document {
    pub kind: Kind,
    pub id: ObjectRef,
    pub object: Result<ObjectModel, ManifestError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML or JSON: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{path}: document {index}: {reason}")]
    Document {
        path: PathBuf,
        index: usize,
        reason: &'static str,
    },
    #[error("{path}: document {index}: List item {item}: not an API object: no `kind`")]
    ListItem {
        path: PathBuf,
        index: usize,
        item: usize,
    },
    #[error("{path}: {source}")]
    Object {
        path: PathBuf,
        source: Box<ObjectError>,
    },
    /// `kubectl get … > file` truncates before it writes: an empty file that had objects is
    /// most likely half-written.
    #[error("{path}: empty; its last objects stay in effect until it has content or is removed")]
    Empty { path: PathBuf },
    #[error("{path}: {kind} {object}: {field}: {reason}")]
    Field {
        path: PathBuf,
        kind: Kind,
        object: ObjectRef,
        field: String,
        reason: String,
    },
}

/// Whether `path` is a manifest the agent reads (`*.yaml`, `*.yml`, `*.json`).
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The manifests in `dir`, sorted by name (not recursive, like `kubectl apply -f DIR`).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if is_manifest(&path) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Reads one file. `Err` means the file as a whole could not be read or parsed; errors of
/// single objects are in their [`Document`].
pub fn read_file(path: &Path) -> Result<Vec<Document>, ManifestError> {
    let reader = Reader { path };
    let file = std::fs::File::open(path).map_err(|e| reader.read_error(e))?;
    let len = file.metadata().map_err(|e| reader.read_error(e))?.len();
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let threads = parse_threads(len);
    reader.read(file, len, threads, part_size(len, threads))
}

/// Below this many bytes in all, files are read one after another: threads would cost
/// more than they save.
const PARALLEL_READ_MIN_BYTES: u64 = 1 << 20;

/// Reads `files`, each given with its size; several at once when there are enough bytes to
/// pay for the threads. The results are in the order of `files`.
pub fn read_files(files: &[(&Path, u64)]) -> Vec<Result<Vec<Document>, ManifestError>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(files.len());
    let bytes: u64 = files.iter().map(|(_, len)| len).sum();
    if threads < 2 || bytes < PARALLEL_READ_MIN_BYTES {
        return files.iter().map(|(path, _)| read_file(path)).collect();
    }
    // The largest file first, each to the thread with the fewest bytes so far: one big
    // file among many small ones does not leave a thread idle.
    let mut largest_first: Vec<usize> = (0..files.len()).collect();
    largest_first.sort_by_key(|&i| std::cmp::Reverse(files[i].1));
    let mut shares: Vec<(u64, Vec<usize>)> = vec![(0, Vec::new()); threads];
    for i in largest_first {
        if let Some((bytes, share)) = shares.iter_mut().min_by_key(|(bytes, _)| *bytes) {
            *bytes += files[i].1;
            share.push(i);
        }
    }
    let mut read: Vec<(usize, Result<Vec<Document>, ManifestError>)> =
        std::thread::scope(|scope| {
            let threads: Vec<_> = shares
                .into_iter()
                .map(|(_, share)| {
                    scope.spawn(move || {
                        share
                            .into_iter()
                            .map(|i| (i, read_file(files[i].0)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
    read.sort_by_key(|(i, _)| *i);
    read.into_iter().map(|(_, read)| read).collect()
}

/// Parses the text of `path`: every YAML document, or the JSON value; `kind: List`
/// unpacked.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Document>, ManifestError> {
    let reader = Reader { path };
    if let Some(documents) = reader
        .in_parts(text.as_bytes(), text.len())
        .map_err(|e| reader.read_error(e))?
    {
        return Ok(documents);
    }
    reader.whole(text)
}

fn has_extension(path: &Path, extension: &str) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some(extension)
}

fn looks_like_json(path: &Path, text: &[u8]) -> bool {
    has_extension(path, "json") || text.trim_ascii_start().starts_with(b"{")
}

/// What is read of a text read in parts to tell JSON from YAML.
const HEAD: usize = 4096;

/// Whether `around`, a JSON text that had its items taken out of it (see
/// [`parts::json_list`]), is a List whose only `items` is the one taken out: with the
/// items, each parsed on its own, the whole text is then what a parse would accept.
fn is_list(around: &str) -> bool {
    let mut deserializer = serde_json::Deserializer::from_str(around);
    ListSkeleton
        .deserialize(&mut deserializer)
        .and_then(|is_list| deserializer.end().map(|()| is_list))
        .unwrap_or(false)
}

/// Below this many bytes a file is parsed on one thread: more would cost more than they
/// save.
const PARALLEL_PARSE_MIN_BYTES: usize = 1 << 20;

/// How many threads to parse a text of `len` bytes on.
fn parse_threads(len: usize) -> usize {
    if len < PARALLEL_PARSE_MIN_BYTES {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The bytes read at a time from a text read in parts: about sixteen parts per thread,
/// so that the last ones hold nobody up long, and never more than a few pages' worth in
/// memory at once.
fn part_size(len: usize, threads: usize) -> usize {
    (len / (16 * threads)).clamp(64 << 10, 1 << 20)
}

/// Parts of a file parsed on `threads` threads as `produce` finds them: this thread finds
/// them (which costs a fraction of parsing them) and hands each to another thread, or
/// parses it itself when they are all busy. The documents come in the parts' order;
/// `None` if `produce` says the file is not what it expected, or a part gives `None`.
fn pipelined<P: Send>(
    threads: usize,
    parse: &(dyn Fn(P) -> Option<Vec<Document>> + Sync),
    produce: impl FnOnce(&mut dyn FnMut(P)) -> bool,
) -> Option<Vec<Document>> {
    type Parsed = Vec<(usize, Option<Vec<Document>>)>;
    // A short queue: this thread parses a part itself whenever it is full. (A rendezvous,
    // handing a part on only to a thread that waits, measured slower.) The last parts
    // queued are parsed by the others while this one waits: callers hand on many parts.
    let (parts, queue) = std::sync::mpsc::sync_channel::<(usize, P)>(threads);
    let queue = std::sync::Mutex::new(queue);
    let (complete, mut parsed) = std::thread::scope(|scope| {
        let workers: Vec<_> = (1..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut parsed = Parsed::new();
                    loop {
                        let next = queue
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        let Ok((index, part)) = next else {
                            return parsed;
                        };
                        parsed.push((index, parse(part)));
                    }
                })
            })
            .collect();
        let mut parsed = Parsed::new();
        let mut next = 0;
        let complete = produce(&mut |part: P| {
            let index = next;
            next += 1;
            match parts.try_send((index, part)) {
                Ok(()) => {}
                Err(
                    std::sync::mpsc::TrySendError::Full((index, part))
                    | std::sync::mpsc::TrySendError::Disconnected((index, part)),
                ) => parsed.push((index, parse(part))),
            }
        });
        drop(parts);
        for worker in workers {
            parsed.extend(
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        (complete, parsed)
    });
    if !complete {
        return None;
    }
    parsed.sort_unstable_by_key(|(index, _)| *index);
    let mut documents = Vec::with_capacity(
        parsed
            .iter()
            .filter_map(|(_, part)| part.as_ref())
            .map(Vec::len)
            .sum(),
    );
    for (_, part) in parsed {
        documents.extend(part?);
    }
    Some(documents)
}

/// Reads `true` for a List whose one `items` field is empty (the items having been taken
/// out of it).
struct ListSkeleton;

impl<'de> DeserializeSeed<'de> for ListSkeleton {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSkeleton {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a List")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut kind = None;
        let mut items = Vec::new();
        let mut items_fields = 0;
        while let Some(field) = map.next_key::<ObjectField>()? {
            match field {
                ObjectField::Kind => kind = Some(map.next_value::<TypeName>()?),
                ObjectField::Items => {
                    items_fields += 1;
                    items = map.next_value::<Vec<IgnoredAny>>()?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(kind == Some(TypeName::List) && items_fields == 1 && items.is_empty())
    }
}

/// Reads the text of one file.
struct Reader<'a> {
    path: &'a Path,
}

impl Reader<'_> {
    fn syntax(&self, reason: String) -> ManifestError {
        ManifestError::Syntax {
            path: self.path.to_owned(),
            reason,
        }
    }

    fn read_error(&self, source: std::io::Error) -> ManifestError {
        ManifestError::Read {
            path: self.path.to_owned(),
            source,
        }
    }

    /// The text of `input`, `len` bytes long: read in parts of `part_size` bytes on
    /// `threads` threads where it can be (see [`Self::in_parts`]), else whole.
    fn read(
        &self,
        mut input: impl Read + Seek,
        len: usize,
        threads: usize,
        part_size: usize,
    ) -> Result<Vec<Document>, ManifestError> {
        if let Some(documents) = self
            .in_parts_on(threads, &mut input, part_size)
            .map_err(|e| self.read_error(e))?
        {
            return Ok(documents);
        }
        // Small, or not to be read in parts: read whole, from the start of the same file (a
        // deploy tool may have put another one in its place meanwhile).
        input.rewind().map_err(|e| self.read_error(e))?;
        let mut text = String::with_capacity(len.min(PARALLEL_PARSE_MIN_BYTES));
        input
            .read_to_string(&mut text)
            .map_err(|e| self.read_error(e))?;
        self.whole(&text)
    }

    /// The text read whole, on this thread.
    fn whole(&self, text: &str) -> Result<Vec<Document>, ManifestError> {
        if !looks_like_json(self.path, text.as_bytes()) {
            return self.yaml(text);
        }
        match self.json(text) {
            // `{` also opens a YAML flow mapping; and a `.json` file may hold YAML, which was
            // always read.
            Err(ManifestError::Syntax {
                reason: json_reason,
                ..
            }) => self.yaml(text).map_err(|yaml_error| {
                if has_extension(self.path, "json") {
                    self.syntax(json_reason)
                } else {
                    yaml_error
                }
            }),
            read => read,
        }
    }

    fn yaml(&self, text: &str) -> Result<Vec<Document>, ManifestError> {
        match self.streamed_yaml(text) {
            Some(documents) => Ok(documents),
            None => self.buffered_yaml(text),
        }
    }

    fn json(&self, text: &str) -> Result<Vec<Document>, ManifestError> {
        match self.streamed_json(text) {
            Ok(documents) => Ok(documents),
            Err(e) if e.is_syntax() || e.is_eof() => Err(self.syntax(e.to_string())),
            Err(_) => self.buffered_json(text),
        }
    }

    /// A big text read in parts and parsed on every core: the items of a `kind: List`, or
    /// runs of YAML documents (see [`parts`]), each part streamed (see [`pipelined`]).
    /// `None` if the text is small, or is not a List or YAML documents, or a part has to
    /// be read buffered: then the caller reads it whole, which decides the results and
    /// the errors.
    fn in_parts(&self, input: impl Read, len: usize) -> std::io::Result<Option<Vec<Document>>> {
        let threads = parse_threads(len);
        self.in_parts_on(threads, input, part_size(len, threads))
    }

    /// [`Self::in_parts`] on `threads` threads, reading `size` bytes at a time.
    fn in_parts_on(
        &self,
        threads: usize,
        mut input: impl Read,
        size: usize,
    ) -> std::io::Result<Option<Vec<Document>>> {
        if threads < 2 {
            return Ok(None);
        }
        let mut head = Vec::with_capacity(HEAD);
        (&mut input).take(HEAD as u64).read_to_end(&mut head)?;
        let json = looks_like_json(self.path, &head);
        let input = head.as_slice().chain(input);
        let parse = |part: Part| {
            if json {
                self.streamed_json_items(part)
            } else {
                self.streamed_yaml(&part.text)
            }
        };
        let mut failed = None;
        let documents = pipelined(threads, &parse, |dispatch| {
            let cut = if json {
                parts::json_list(input, size, dispatch)
                    .map(|around| around.as_deref().is_some_and(is_list))
            } else {
                parts::yaml_documents(input, size, dispatch)
            };
            cut.unwrap_or_else(|error| {
                failed = Some(error);
                false
            })
        });
        match failed {
            Some(error) => Err(error),
            None => Ok(documents),
        }
    }

    fn buffered_yaml(&self, text: &str) -> Result<Vec<Document>, ManifestError> {
        let mut documents = Vec::new();
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            // Reading into values fails only where the text is not YAML.
            let buffered = BufferedObject {
                path: self.path,
                documents: &mut documents,
            }
            .deserialize(document)
            .map_err(|e| self.syntax(e.to_string()))?;
            self.check(buffered, index + 1)?;
        }
        Ok(documents)
    }

    fn buffered_json(&self, text: &str) -> Result<Vec<Document>, ManifestError> {
        let mut documents = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let buffered = BufferedObject {
            path: self.path,
            documents: &mut documents,
        }
        .deserialize(&mut deserializer)
        .and_then(|buffered| deserializer.end().map(|()| buffered))
        .map_err(|e| self.syntax(e.to_string()))?;
        self.check(buffered, 1)?;
        Ok(documents)
    }

    /// The error of a document that is not an object of the API, numbered from 1.
    fn check(&self, buffered: Buffered, index: usize) -> Result<(), ManifestError> {
        let reason = match buffered {
            Buffered::Read => return Ok(()),
            Buffered::NoKind => "not an API object: no `kind`",
            Buffered::ListWithoutItems => "kind List without an items sequence",
            Buffered::ItemWithoutKind(item) => {
                return Err(ManifestError::ListItem {
                    path: self.path.to_owned(),
                    index,
                    item,
                });
            }
        };
        Err(ManifestError::Document {
            path: self.path.to_owned(),
            index,
            reason,
        })
    }

    /// Every document streamed; `None` if one has to be read buffered (which also tells a
    /// syntax error from others: YAML errors do not say which they are).
    fn streamed_yaml(&self, text: &str) -> Option<Vec<Document>> {
        let mut documents = Vec::new();
        serde_yaml::Deserializer::from_str(text)
            .try_for_each(|document| {
                StreamedObject {
                    path: self.path,
                    documents: &mut documents,
                    list_item: false,
                }
                .deserialize(document)
            })
            .ok()?;
        Some(documents)
    }

    /// The value streamed; a data error means it has to be read buffered.
    fn streamed_json(&self, text: &str) -> Result<Vec<Document>, serde_json::Error> {
        let mut documents = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_str(text);
        StreamedObject {
            path: self.path,
            documents: &mut documents,
            list_item: false,
        }
        .deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(documents)
    }

    /// The items of a List's part, each streamed; `None` if one has to be read buffered
    /// (which then says why, as `serde_json` would). Parsed with simd-json, in place: a
    /// fourth faster than `serde_json` on `kubectl`'s indented JSON, measured on a 100k
    /// Service List.
    fn streamed_json_items(&self, part: Part) -> Option<Vec<Document>> {
        thread_local! {
            /// simd-json's work space, kept for the next part this thread parses.
            static BUFFERS: std::cell::RefCell<simd_json::Buffers> =
                std::cell::RefCell::new(simd_json::Buffers::default());
        }
        let mut text = part.text.into_bytes();
        // simd-json takes control characters that JSON refuses wherever they are (a NUL
        // after a number): a text with one is left to the whole reading, which says why.
        if has_control_character(&text) {
            return None;
        }
        BUFFERS.with_borrow_mut(|buffers| {
            let mut documents = Vec::with_capacity(part.items.len());
            for item in part.items {
                let mut deserializer =
                    simd_json::Deserializer::from_slice_with_buffers(text.get_mut(item)?, buffers)
                        .ok()?;
                StreamedObject {
                    path: self.path,
                    documents: &mut documents,
                    list_item: true,
                }
                .deserialize(&mut deserializer)
                .ok()?;
            }
            Some(documents)
        })
    }
}

/// Whether `text` holds a control character JSON refuses outside whitespace (anything
/// below 0x20 but tab, newline and carriage return).
fn has_control_character(text: &[u8]) -> bool {
    // Blocks folded without a branch per byte, which the compiler turns into vector
    // compares: a byte-at-a-time `any` was a tenth of a 100k-Service List's reading.
    text.chunks(4096).any(|block| {
        block.iter().fold(false, |found, &byte| {
            found | ((byte < 0x20) & (byte != b'\t') & (byte != b'\n') & (byte != b'\r'))
        })
    })
}

/// Every reading of a file's bytes that must agree, for the fuzz targets
/// (`lb_userspace::fuzzing`): the buffered reading defines the results and the errors, and
/// the parts and the streamed readings reach the same.
#[doc(hidden)]
pub struct Readings {
    /// As the agent reads a small file of these bytes: whole.
    pub whole: Reading,
    /// As the agent reads a big one: in parts where it can, on two threads.
    pub in_parts: Reading,
    /// The streamed reading as JSON, if it did not give up, with the buffered one.
    pub streamed_json: Option<(Vec<Document>, Reading)>,
}

/// One reading of a file: its documents, or why it cannot be read.
#[doc(hidden)]
pub type Reading = Result<Vec<Document>, ManifestError>;

/// The [`Readings`] of `bytes` as the file `path`, the parts read `part_size` bytes at a
/// time.
#[doc(hidden)]
pub fn readings(path: &Path, bytes: &[u8], part_size: usize) -> Readings {
    let reader = Reader { path };
    let read = |threads| reader.read(std::io::Cursor::new(bytes), bytes.len(), threads, part_size);
    let streamed_json = std::str::from_utf8(bytes).ok().and_then(|text| {
        let documents = reader.streamed_json(text).ok()?;
        Some((documents, reader.buffered_json(text)))
    });
    Readings {
        whole: read(1),
        in_parts: read(2),
        streamed_json,
    }
}

/// A typed Service's document: its model, or why it has none.
fn service_document(path: &Path, id: ObjectRef, service: &api::Service) -> Document {
    let model = ServiceModel::from_api(service).map(ObjectModel::Service);
    converted(path, id, Kind::Service, model)
}

/// A typed EndpointSlice's document: its model, or why it has none.
fn slice_document(path: &Path, id: ObjectRef, slice: &api::EndpointSlice) -> Document {
    let model = SliceModel::from_api(slice).map(ObjectModel::Slice);
    converted(path, id, Kind::EndpointSlice, model)
}

/// The document of an object converted into `model`, its error naming the file.
fn converted(
    path: &Path,
    id: ObjectRef,
    kind: Kind,
    model: Result<ObjectModel, ObjectError>,
) -> Document {
    Document {
        kind,
        id,
        object: model.map_err(|source| ManifestError::Object {
            path: path.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// The object's namespace and name, as kubectl applies them: no namespace is `default`.
fn object_id(namespace: Option<&str>, name: Option<&str>) -> ObjectRef {
    let given = |field: Option<&str>| field.filter(|s| !s.is_empty()).map(str::to_owned);
    ObjectRef::new(
        given(namespace).unwrap_or_else(|| "default".into()),
        given(name).unwrap_or_else(|| "<unnamed>".into()),
    )
}

/// The values of `apiVersion` and `kind` that tell the objects apart, matched without
/// allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TypeName {
    CoreV1,
    DiscoveryV1,
    /// discovery.k8s.io's other versions (`v1beta1`, removed in Kubernetes 1.25).
    DiscoveryOther,
    Service,
    EndpointSlice,
    List,
    /// `ServiceList`, `EndpointSliceList`, …: what the API itself returns, whose items
    /// need not say their kind.
    TypedList,
    /// Any other value without a group (no `/`): as an apiVersion, another version of the
    /// core group (`v1beta1`) or no version at all (`-v1`); as a kind, one lb does not read.
    Ungrouped,
    Other,
}

impl<'de> Deserialize<'de> for TypeName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `any`, not `str`: YAML would hand over `kind: 1` as the string "1", which a
        // buffered read does not take for a kind.
        deserializer.deserialize_any(TypeNameVisitor)
    }
}

struct TypeNameVisitor;

impl Visitor<'_> for TypeNameVisitor {
    type Value = TypeName;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<TypeName, E> {
        Ok(match value {
            "v1" => TypeName::CoreV1,
            "discovery.k8s.io/v1" => TypeName::DiscoveryV1,
            _ if value.starts_with("discovery.k8s.io/") => TypeName::DiscoveryOther,
            "Service" => TypeName::Service,
            "EndpointSlice" => TypeName::EndpointSlice,
            "List" => TypeName::List,
            _ if value.ends_with("List") => TypeName::TypedList,
            _ if !value.contains('/') => TypeName::Ungrouped,
            _ => TypeName::Other,
        })
    }
}

/// The fields of any object the reader looks at: the union of a Service's, an
/// EndpointSlice's and a List's.
#[derive(Clone, Copy, Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum ObjectField {
    ApiVersion,
    Kind,
    Metadata,
    Spec,
    Status,
    AddressType,
    Endpoints,
    Ports,
    Items,
    #[serde(other)]
    Other,
}

impl ObjectField {
    /// This field's bit in a set of the fields read; none for the fields not read.
    fn bit(self) -> u16 {
        match self {
            Self::Other => 0,
            field => 1 << field as u16,
        }
    }
}

/// `apiVersion` and `kind` as far as they are read: `kubectl get -o json|yaml` sorts the
/// fields, so an EndpointSlice's `addressType` and `endpoints` come before its `kind`.
#[derive(Default)]
struct TypeSoFar {
    api_version: Option<TypeName>,
    kind: Option<TypeName>,
}

impl TypeSoFar {
    fn may_be(&self, api_version: TypeName, kind: TypeName) -> bool {
        self.api_version.is_none_or(|v| v == api_version) && self.kind.is_none_or(|k| k == kind)
    }

    fn may_be_service(&self) -> bool {
        self.may_be(TypeName::CoreV1, TypeName::Service)
    }

    fn may_be_slice(&self) -> bool {
        self.may_be(TypeName::DiscoveryV1, TypeName::EndpointSlice)
    }

    fn may_be_list(&self) -> bool {
        self.kind.is_none_or(|k| k == TypeName::List)
    }
}

/// Streams one document or List item into `documents`, typed as it is read. Fails on
/// whatever a buffered read has to explain.
struct StreamedObject<'a> {
    path: &'a Path,
    documents: &'a mut Vec<Document>,
    /// Lists are unpacked at the top of a document only.
    list_item: bool,
}

impl<'de> DeserializeSeed<'de> for StreamedObject<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StreamedObject<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an API object")
    }

    /// An empty document, or a `null` item.
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut type_name = TypeSoFar::default();
        let mut metadata: Option<api::Metadata> = None;
        let mut spec: Option<api::ServiceSpec> = None;
        let mut status: Option<api::ServiceStatus> = None;
        let mut address_type: Option<String> = None;
        let mut endpoints: Option<Vec<api::Endpoint>> = None;
        let mut ports: Option<Vec<api::EndpointPort>> = None;
        let mut items: Option<Vec<Document>> = None;
        let mut read = 0;
        // A field is typed as what the object may still be, and skipped once it cannot be.
        while let Some(field) = map.next_key::<ObjectField>()? {
            // A field given twice (which YAML forbids): what the first said may have
            // decided how others were read. The buffered reading says which counts.
            if read & field.bit() != 0 {
                return Err(A::Error::custom("read buffered"));
            }
            read |= field.bit();
            match field {
                ObjectField::ApiVersion => type_name.api_version = Some(map.next_value()?),
                ObjectField::Kind => type_name.kind = Some(map.next_value()?),
                ObjectField::Metadata if type_name.may_be_service() || type_name.may_be_slice() => {
                    metadata = map.next_value()?;
                }
                ObjectField::Spec if type_name.may_be_service() => spec = map.next_value()?,
                ObjectField::Status if type_name.may_be_service() => status = map.next_value()?,
                ObjectField::AddressType if type_name.may_be_slice() => {
                    address_type = map.next_value()?;
                }
                ObjectField::Endpoints if type_name.may_be_slice() => {
                    endpoints = map.next_value()?;
                }
                ObjectField::Ports if type_name.may_be_slice() => ports = map.next_value()?,
                ObjectField::Items if !self.list_item && type_name.may_be_list() => {
                    items = Some(map.next_value_seed(StreamedItems { path: self.path })?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let metadata = metadata.map(|m| m.0).unwrap_or_default();
        let id = || object_id(metadata.namespace.as_deref(), metadata.name.as_deref());
        let document = match (type_name.api_version, type_name.kind) {
            (_, None) => return Err(A::Error::custom("no `kind`")),
            (_, Some(TypeName::List)) if !self.list_item => {
                let items = items.ok_or_else(|| A::Error::custom("kind List without items"))?;
                self.documents.extend(items);
                return Ok(());
            }
            (Some(TypeName::CoreV1), Some(TypeName::Service)) => service_document(
                self.path,
                id(),
                &api::Service {
                    metadata,
                    spec,
                    status,
                },
            ),
            (Some(TypeName::DiscoveryV1), Some(TypeName::EndpointSlice)) => slice_document(
                self.path,
                id(),
                &api::EndpointSlice {
                    metadata,
                    address_type: address_type.unwrap_or_default(),
                    endpoints: endpoints.unwrap_or_default(),
                    ports,
                },
            ),
            // Read buffered, which explains them: a Service whose apiVersion has no group
            // and is not v1 (another version, or none at all: any value without a `/`,
            // a kind's name included), or that has none; an EndpointSlice of another
            // version of its group, or of none; a List inside a List; a typed list.
            (
                None
                | Some(
                    TypeName::Ungrouped
                    | TypeName::Service
                    | TypeName::EndpointSlice
                    | TypeName::List
                    | TypeName::TypedList,
                ),
                Some(TypeName::Service),
            )
            | (None | Some(TypeName::DiscoveryOther), Some(TypeName::EndpointSlice))
            | (_, Some(TypeName::List | TypeName::TypedList)) => {
                return Err(A::Error::custom("read buffered"));
            }
            // Other kinds, and other groups' kinds of those names (a Knative Service).
            _ => return Ok(()),
        };
        self.documents.push(document);
        Ok(())
    }
}

/// The items of a List, streamed one by one.
struct StreamedItems<'a> {
    path: &'a Path,
}

impl<'de> DeserializeSeed<'de> for StreamedItems<'_> {
    type Value = Vec<Document>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Document>, D::Error> {
        // `any`, not `seq`: YAML would hand over `items:` with no value (null) as an empty
        // sequence, which a buffered read does not take for items.
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StreamedItems<'_> {
    type Value = Vec<Document>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of API objects")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut items: S) -> Result<Vec<Document>, S::Error> {
        let mut documents = Vec::new();
        while items
            .next_element_seed(StreamedObject {
                path: self.path,
                documents: &mut documents,
                list_item: true,
            })?
            .is_some()
        {}
        Ok(documents)
    }
}

/// What a buffered read made of one document.
enum Buffered {
    /// Its objects, if any, are in the documents.
    Read,
    NoKind,
    ListWithoutItems,
    /// An item of a `kind: List` (numbered from 1, in the List that holds it) that is not
    /// an object saying its kind: kubectl refuses such a List too.
    ItemWithoutKind(usize),
}

/// Reads one document into `documents`, an object at a time: a List's items one by one,
/// anything else whole.
struct BufferedObject<'a> {
    path: &'a Path,
    documents: &'a mut Vec<Document>,
}

impl<'de> DeserializeSeed<'de> for BufferedObject<'_> {
    type Value = Buffered;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Buffered, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BufferedObject<'_> {
    type Value = Buffered;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON document")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Buffered, A::Error> {
        let mut fields = serde_json::Map::new();
        // Streamed, so that a big List is not held whole; `kubectl` sorts the fields, so
        // its kind comes after the items.
        let mut items = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                items = Some(map.next_value_seed(BufferedItems { path: self.path })?);
            } else {
                fields.insert(key, map.next_value_seed(JsonValue)?);
            }
        }
        let Some(kind) = fields.get("kind").and_then(Value::as_str) else {
            return Ok(Buffered::NoKind);
        };
        match items.flatten() {
            Some(items) if is_list_kind(kind) => {
                return Ok(items.unpack(self.path, kind, fields.get("apiVersion"), self.documents));
            }
            None if kind == "List" => return Ok(Buffered::ListWithoutItems),
            // A kind named like a list whose items are not a sequence (a custom
            // resource's): not a list.
            _ => {}
        }
        // `items` means nothing to the other kinds.
        self.documents
            .extend(buffered_object(self.path, Value::Object(fields)));
        Ok(Buffered::Read)
    }

    /// An empty document.
    fn visit_unit<E: serde::de::Error>(self) -> Result<Buffered, E> {
        Ok(Buffered::Read)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Buffered, E> {
        Ok(Buffered::Read)
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Buffered, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Buffered::NoKind)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Buffered, E> {
        Ok(Buffered::NoKind)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Buffered, E> {
        Ok(Buffered::NoKind)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Buffered, E> {
        Ok(Buffered::NoKind)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Buffered, E> {
        Ok(Buffered::NoKind)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Buffered, E> {
        Ok(Buffered::NoKind)
    }
}

/// A List's `items`, buffered one item at a time: `None` when it is not a sequence.
struct BufferedItems<'a> {
    path: &'a Path,
}

impl<'de> DeserializeSeed<'de> for BufferedItems<'_> {
    type Value = Option<Items>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// Whether an object of `kind` with a sequence of items is a list to unpack: a `kind:
/// List`, or a typed list (`ServiceList`, what the API returns).
fn is_list_kind(kind: &str) -> bool {
    kind.ends_with("List")
}

/// A List's items as read, in their order: the documents of those that say their kind,
/// and the objects that do not (numbered from 1), which only a typed list gives a kind.
#[derive(Default)]
struct Items {
    read: Vec<Item>,
    /// Why the first item that could not be read could not.
    failed: Option<Buffered>,
}

enum Item {
    Documents(Vec<Document>),
    Kindless(usize, serde_json::Map<String, Value>),
}

impl Items {
    fn add(&mut self, path: &Path, number: usize, item: Value) {
        match item {
            // As a streamed read skips it.
            Value::Null => {}
            Value::Object(object) if !object.contains_key("kind") => {
                self.read.push(Item::Kindless(number, object));
            }
            Value::Object(_) => {
                let mut documents = Vec::new();
                match unpack(path, item, &mut documents) {
                    Ok(()) => self.read.push(Item::Documents(documents)),
                    Err(failed) => {
                        self.failed.get_or_insert(failed);
                    }
                }
            }
            _ => {
                self.failed.get_or_insert(Buffered::ItemWithoutKind(number));
            }
        }
    }

    /// These, as the items of a list of `kind`, into `documents`: the items of a typed
    /// list take its kind and apiVersion where they say none.
    fn unpack(
        self,
        path: &Path,
        kind: &str,
        api_version: Option<&Value>,
        documents: &mut Vec<Document>,
    ) -> Buffered {
        if let Some(failed) = self.failed {
            return failed;
        }
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for item in self.read {
            let (number, mut object) = match item {
                Item::Documents(read) => {
                    documents.extend(read);
                    continue;
                }
                Item::Kindless(number, object) => (number, object),
            };
            let Some(item_kind) = item_kind else {
                return Buffered::ItemWithoutKind(number);
            };
            object.insert("kind".into(), Value::String(item_kind.into()));
            if let Some(api_version) = api_version {
                object
                    .entry("apiVersion")
                    .or_insert_with(|| api_version.clone());
            }
            if let Err(failed) = unpack(path, Value::Object(object), documents) {
                return failed;
            }
        }
        Buffered::Read
    }
}

/// One object read whole into `documents`: a Service's or EndpointSlice's document, the
/// items of a list inside a List (kubectl unpacks those too), nothing for other kinds.
fn unpack(path: &Path, value: Value, documents: &mut Vec<Document>) -> Result<(), Buffered> {
    let Value::Object(mut object) = value else {
        return Ok(());
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_default();
    match object.remove("items") {
        Some(Value::Array(items)) if is_list_kind(&kind) => {
            let mut read = Items::default();
            for (index, item) in items.into_iter().enumerate() {
                read.add(path, index + 1, item);
            }
            match read.unpack(path, &kind, object.get("apiVersion"), documents) {
                Buffered::Read => Ok(()),
                failed => Err(failed),
            }
        }
        _ if kind == "List" => Err(Buffered::ListWithoutItems),
        // `items` means nothing to the other kinds.
        items => {
            if let Some(items) = items {
                object.insert("items".into(), items);
            }
            documents.extend(buffered_object(path, Value::Object(object)));
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for BufferedItems<'_> {
    type Value = Option<Items>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the items of a List")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut items: S) -> Result<Self::Value, S::Error> {
        let mut read = Items::default();
        let mut number = 0;
        while let Some(item) = items.next_element_seed(JsonValue)? {
            number += 1;
            read.add(self.path, number, item);
        }
        Ok(Some(read))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// A value of a document as JSON holds it, whatever YAML has that JSON has not: a key that
/// is not a string is keyed by its JSON text, a tagged value is the value, an integer
/// beyond 64 bits is a float. So a buffered reading, like a streamed one, fails only on
/// what it reads: not on a field of an object whose kind lb does not read, or one lb skips.
struct JsonValue;

impl<'de> DeserializeSeed<'de> for JsonValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Value, E> {
        Ok(value.into())
    }

    // JSON has no integers beyond 64 bits: a float is as close as it gets.
    fn visit_i128<E: serde::de::Error>(self, value: i128) -> Result<Value, E> {
        Ok(i64::try_from(value).map_or_else(|_| (value as f64).into(), Value::from))
    }

    fn visit_u128<E: serde::de::Error>(self, value: u128) -> Result<Value, E> {
        Ok(u64::try_from(value).map_or_else(|_| (value as f64).into(), Value::from))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Value, E> {
        Ok(value.into())
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_bytes<E: serde::de::Error>(self, value: &[u8]) -> Result<Value, E> {
        Ok(Value::String(String::from_utf8_lossy(value).into_owned()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Value, S::Error> {
        let mut values = Vec::new();
        while let Some(value) = seq.next_element_seed(JsonValue)? {
            values.push(value);
        }
        Ok(Value::Array(values))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(JsonValue)? {
            let key = match key {
                Value::String(key) => key,
                other => other.to_string(),
            };
            object.insert(key, map.next_value_seed(JsonValue)?);
        }
        Ok(Value::Object(object))
    }

    /// A tagged YAML value (`!thing 1`).
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        use serde::de::VariantAccess as _;
        let (_tag, value): (IgnoredAny, _) = data.variant()?;
        value.newtype_variant_seed(JsonValue)
    }
}

/// Types one buffered object if it is a Service or an EndpointSlice; `None` for other
/// kinds.
fn buffered_object(path: &Path, value: Value) -> Option<Document> {
    let (kind, group, version) = match value.get("kind").and_then(Value::as_str) {
        Some("Service") => (Kind::Service, "", "v1"),
        Some("EndpointSlice") => (Kind::EndpointSlice, "discovery.k8s.io/", "v1"),
        _ => return None,
    };
    let api_version = value.get("apiVersion");
    let wrong_version = match api_version {
        Some(Value::String(found)) => match found.strip_prefix(group) {
            Some(found_version) if found_version == version => None,
            // Another group's kind of that name (a Knative Service): not lb's.
            Some(found_version) if found_version.contains('/') => return None,
            None => return None,
            Some(_) => Some(format!("{found:?}")),
        },
        Some(other) => Some(other.to_string()),
        None => Some("missing".to_owned()),
    };
    let metadata = value.get("metadata");
    let field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    let id = object_id(field("namespace"), field("name"));
    let field_error = |(field, reason)| Document {
        kind,
        id: id.clone(),
        object: Err(ManifestError::Field {
            path: path.to_owned(),
            kind,
            object: id.clone(),
            field,
            reason,
        }),
    };
    if let Some(found) = wrong_version {
        return Some(field_error((
            "apiVersion".to_owned(),
            format!("{found}; lb reads the {kind}s of {group}{version}"),
        )));
    }
    Some(match kind {
        Kind::Service => match typed::<api::Service>(value) {
            Ok(service) => service_document(path, id, &service),
            Err(e) => field_error(e),
        },
        Kind::EndpointSlice => match typed::<api::EndpointSlice>(value) {
            Ok(slice) => slice_document(path, id, &slice),
            Err(e) => field_error(e),
        },
    })
}

/// Deserializes with the path of the offending field, e.g. `spec.ports[0].port`.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let reason = e.into_inner().to_string();
        (field, reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Vec<Document> {
        parse(Path::new("test.yaml"), text).unwrap()
    }

    #[test]
    fn control_characters_are_found_in_any_block_but_whitespace_is_not_one() {
        let mut text = b"{\t\"a\":\r\n 1}".repeat(1000);
        assert!(!has_control_character(&text));
        for (at, byte) in [(0, 0u8), (4095, 0x1f), (4096, 0x0b), (text.len() - 1, 0x01)] {
            let mut with = text.clone();
            with[at] = byte;
            assert!(has_control_character(&with), "{byte:#x} at {at}");
        }
        text.push(0x20);
        assert!(!has_control_character(&text));
    }

    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: httpenv
  namespace: default
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - port: 8888
    protocol: TCP
    targetPort: 8888
  selector:
    app: httpenv
  type: ClusterIP
"#;

    #[test]
    fn reads_multi_document_files_and_skips_other_kinds() {
        let text = format!(
            "{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: httpenv\n---\n"
        );
        let docs = parse_str(&text);
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].kind, Kind::Service);
        assert_eq!(docs[0].id, ObjectRef::new("default", "httpenv"));
        assert!(docs[0].object.is_ok());
    }

    #[test]
    fn unpacks_lists_and_reads_json() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
             "metadata":{"name":"httpenv-abc","labels":{"kubernetes.io/service-name":"httpenv"}},
             "addressType":"IPv4","endpoints":[{"addresses":["10.244.0.11"]}],
             "ports":[{"port":8888,"protocol":"TCP","name":""}]}]}"#;
        let docs = parse(Path::new("list.json"), json).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].kind, Kind::EndpointSlice);
        assert_eq!(docs[0].id, ObjectRef::new("default", "httpenv-abc"));
    }

    #[test]
    fn a_bad_field_names_file_object_and_field() {
        let text = SERVICE.replace("- port: 8888", "- port: eighty");
        let docs = parse_str(&text);
        let err = docs[0].object.as_ref().unwrap_err().to_string();
        assert!(
            err.starts_with("test.yaml: Service default/httpenv: spec.ports[0].port:"),
            "{err}"
        );
    }

    #[test]
    fn broken_yaml_fails_the_whole_file() {
        let err = parse(Path::new("bad.yaml"), "kind: Service\n  metadata: [\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bad.yaml: not valid YAML or JSON"),
            "{err}"
        );
    }

    #[test]
    fn a_document_without_kind_is_an_error() {
        let err = parse(Path::new("x.yaml"), "foo: bar\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.yaml: document 1: not an API object: no `kind`"
        );
    }

    /// What a reading gave, comparable.
    fn summary(documents: &[Document]) -> Vec<(Kind, String, Result<ObjectModel, String>)> {
        documents
            .iter()
            .map(|d| {
                let object = d
                    .object
                    .as_ref()
                    .map(Clone::clone)
                    .map_err(ToString::to_string);
                (d.kind, d.id.to_string(), object)
            })
            .collect()
    }

    /// Items as `kubectl get -o json` writes them: fields sorted, so an EndpointSlice's
    /// `addressType` and `endpoints` come before its `kind`, and a List's `items` before
    /// its `kind`.
    const KUBECTL_LIST: &str = r#"{
    "apiVersion": "v1",
    "items": [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"annotations": {"a": "b"}, "name": "web", "namespace": "shop", "resourceVersion": "7", "uid": "u1"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}], "selector": {"app": "web"}, "type": "ClusterIP"},
            "status": {"loadBalancer": {}}
        },
        {
            "addressType": "IPv4",
            "apiVersion": "discovery.k8s.io/v1",
            "endpoints": [{"addresses": ["10.244.0.1"], "conditions": {"ready": true}, "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "web-1"}}],
            "kind": "EndpointSlice",
            "metadata": {"labels": {"kubernetes.io/service-name": "web", "x": "y"}, "name": "web-abc", "namespace": "shop"},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        },
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"ports": "not a Service's"}},
        null
    ],
    "kind": "List",
    "metadata": {"resourceVersion": ""}
}"#;

    #[test]
    fn streamed_and_buffered_readings_agree() {
        let json = Path::new("list.json");
        let reader = Reader { path: json };
        let streamed = reader.streamed_json(KUBECTL_LIST).unwrap();
        let buffered = reader.buffered_json(KUBECTL_LIST).unwrap();
        assert_eq!(summary(&streamed), summary(&buffered));
        assert_eq!(
            summary(&streamed)
                .iter()
                .map(|(kind, id, _)| format!("{kind} {id}"))
                .collect::<Vec<_>>(),
            ["Service shop/web", "EndpointSlice shop/web-abc"]
        );

        let yaml = format!(
            "{SERVICE}---\n# a comment only\n---\nkind: EndpointSlice\naddressType: IPv4\nendpoints: [{{addresses: [10.244.0.1]}}]\napiVersion: discovery.k8s.io/v1\nmetadata: {{name: httpenv-1, labels: {{kubernetes.io/service-name: httpenv}}}}\n---\napiVersion: v1\nitems:\n- {SERVICE_FLOW}\nkind: List\n"
        );
        let streamed = reader.streamed_yaml(&yaml).unwrap();
        let buffered = reader.buffered_yaml(&yaml).unwrap();
        assert_eq!(summary(&streamed), summary(&buffered));
        assert_eq!(streamed.len(), 3);
    }

    const SERVICE_FLOW: &str = "{apiVersion: v1, kind: Service, metadata: {name: flow}, spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}}";

    #[test]
    fn a_bad_list_item_is_that_items_error_and_the_others_are_read() {
        // The bad field comes before the slice's kind and name.
        let json = KUBECTL_LIST.replace(r#""addressType": "IPv4""#, r#""addressType": 4"#);
        let docs = parse(Path::new("list.json"), &json).unwrap();
        let summary = summary(&docs);
        assert_eq!(summary.len(), 2);
        assert!(summary[0].2.is_ok());
        assert_eq!(
            summary[1].2.as_ref().unwrap_err(),
            "list.json: EndpointSlice shop/web-abc: addressType: invalid type: integer `4`, expected a string"
        );

        let yaml = format!(
            "kind: List\nitems:\n- {}\n- {SERVICE_FLOW}\n",
            SERVICE_FLOW.replace("port: 80", "port: eighty")
        );
        let docs = parse(Path::new("list.yaml"), &yaml).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0].object.as_ref().unwrap_err().to_string(),
            "list.yaml: Service default/flow: spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        );
        assert!(docs[1].object.is_ok());
    }

    #[test]
    fn other_kinds_are_skipped_whatever_their_fields() {
        let text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x, labels: [not, a, map]}\nspec: {ports: [{number: 80}], type: {}}\n";
        assert!(parse_str(text).is_empty());
        // Nor does a List's own metadata matter.
        assert!(parse_str("kind: List\nmetadata: [1]\nitems: []\n").is_empty());
    }

    #[test]
    fn nested_and_typed_lists_are_unpacked_and_kindless_items_named() {
        let names = |docs: &[Document]| -> Vec<String> {
            docs.iter()
                .map(|d| format!("{} {} {}", d.kind, d.id, d.object.is_ok()))
                .collect()
        };
        // A List inside a List is unpacked, as kubectl does, in YAML and JSON alike.
        let nested = format!("kind: List\nitems:\n- {{kind: List, items: [{SERVICE_FLOW}]}}\n");
        let json_nested =
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(&nested).unwrap())
                .unwrap();
        for (file, text) in [("n.yaml", &nested), ("n.json", &json_nested)] {
            let docs = parse(Path::new(file), text).unwrap();
            assert_eq!(names(&docs), ["Service default/flow true"], "{file}");
        }

        // What the API returns (`kubectl get --raw /api/v1/services`): a ServiceList whose
        // items say no kind; they are its Services.
        let typed = r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
            {"metadata": {"name": "raw", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}}]}"#;
        let docs = parse(Path::new("raw.json"), typed).unwrap();
        assert_eq!(names(&docs), ["Service shop/raw true"]);

        // A kind named like a list whose items are not a sequence (a custom resource's):
        // not a list, and not lb's.
        let custom = "apiVersion: example.com/v1\nkind: AllowList\nitems: {a: 1}\n";
        assert!(parse(Path::new("c.yaml"), custom).unwrap().is_empty());
        // Items keep their order, kindless ones of a typed list included.
        let mixed = r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
            {"metadata": {"name": "first"}, "spec": {"clusterIP": "10.96.0.13", "ports": [{"port": 80}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "second"},
             "spec": {"clusterIP": "10.96.0.14", "ports": [{"port": 80}]}}]}"#;
        let docs = parse(Path::new("raw.json"), mixed).unwrap();
        assert_eq!(
            names(&docs),
            ["Service default/first true", "Service default/second true"]
        );

        // An item of a plain List that says no kind: the file is refused, the item named.
        for item in ["{metadata: {name: x}}", "42"] {
            let text = format!("kind: List\nitems:\n- {SERVICE_FLOW}\n- {item}\n");
            let error = parse(Path::new("l.yaml"), &text).unwrap_err().to_string();
            assert_eq!(
                error,
                "l.yaml: document 1: List item 2: not an API object: no `kind`"
            );
        }
    }

    #[test]
    fn a_service_or_slice_of_another_version_is_named_and_other_groups_skipped() {
        let slice =
            "kind: EndpointSlice\nmetadata: {name: web-1}\naddressType: IPv4\nendpoints: []\n";
        let service = SERVICE_FLOW.replace("apiVersion: v1, ", "");
        let cases = [
            (
                format!("apiVersion: discovery.k8s.io/v1beta1\n{slice}"),
                Some(
                    "s.yaml: EndpointSlice default/web-1: apiVersion: \"discovery.k8s.io/v1beta1\"; lb reads the EndpointSlices of discovery.k8s.io/v1",
                ),
            ),
            (
                service.clone(),
                Some(
                    "s.yaml: Service default/flow: apiVersion: missing; lb reads the Services of v1",
                ),
            ),
            (
                format!("kind: List\nitems: [{service}]\n"),
                Some(
                    "s.yaml: Service default/flow: apiVersion: missing; lb reads the Services of v1",
                ),
            ),
            // A Knative Service, a slice of another group: not lb's.
            (
                SERVICE_FLOW.replace("apiVersion: v1", "apiVersion: serving.knative.dev/v1"),
                None,
            ),
            (format!("apiVersion: example.com/v1\n{slice}"), None),
        ];
        for (text, error) in cases {
            let docs = parse(Path::new("s.yaml"), &text).unwrap();
            let errors: Vec<String> = docs
                .iter()
                .filter_map(|d| d.object.as_ref().err().map(ToString::to_string))
                .collect();
            match error {
                Some(error) => assert_eq!(errors, [error], "{text}"),
                None => assert!(docs.is_empty(), "{text}: {errors:?}"),
            }
        }
    }

    #[test]
    fn a_list_needs_a_sequence_of_items() {
        let err = parse(
            Path::new("l.json"),
            r#"{"kind": "List", "items": {"a": 1}}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "l.json: document 1: kind List without an items sequence"
        );
    }

    #[test]
    fn a_list_whose_items_are_null_is_refused_streamed_as_buffered() {
        // Found by the `manifests` fuzz target: streamed, YAML read the null `items` as an
        // empty sequence and took the List for an empty one.
        let found = "kind: List\nitems:\n-apiVersion: v1\nk {apiindVe[: ";
        for text in [found, "kind: List\nitems:\n", "kind: List\nitems: ~\n"] {
            let reader = Reader {
                path: Path::new("l.yaml"),
            };
            assert!(reader.streamed_yaml(text).is_none(), "{text}");
            assert_eq!(
                parse(Path::new("l.yaml"), text).unwrap_err().to_string(),
                "l.yaml: document 1: kind List without an items sequence",
                "{text}"
            );
        }
    }

    #[test]
    fn a_field_given_twice_is_read_as_the_buffered_reading_reads_it() {
        // Found by the `manifests` fuzz target: streamed, the first `kind` (no kind lb
        // reads) had the first `spec` skipped, and the second made it a Service without
        // one; buffered, the last of each field counts.
        let found = "apiVersion: v1\nkind: Servic$\nmetadata: {name: web, namespace: default}\nspec:\n  clapiVersion: v1\nkind: Service\nmetadata:\n    name: nginx  # Name oLocausterl";
        let reader = Reader {
            path: Path::new("m.json"),
        };
        assert!(reader.streamed_yaml(found).is_none());
        let docs = parse(Path::new("m.json"), found).unwrap();
        assert_eq!(
            summary(&docs),
            summary(&reader.buffered_yaml(found).unwrap())
        );
        assert_eq!(
            docs[0].object.as_ref().unwrap_err().to_string(),
            "m.json: Service default/nginx: spec.clusterIP: not set: a Service must carry the clusterIP the API server allocated"
        );
        let json = r#"{"kind": "Deployment", "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}, "kind": "Service", "apiVersion": "v1", "metadata": {"name": "twice"}}"#;
        assert!(reader.streamed_json(json).is_err());
        let docs = parse(Path::new("m.json"), json).unwrap();
        assert!(docs[0].object.is_ok(), "{:?}", docs[0].object);
    }

    #[test]
    fn a_service_of_an_odd_core_version_is_named_streamed_as_buffered() {
        // Found by the `manifests` fuzz target (in a copy of KUBECTL_LIST): streamed, an
        // apiVersion without a group that is neither v1 nor starts with `v` read as
        // another group's, and the Service was skipped; buffered, it is the core group's,
        // of a version lb does not read, and named.
        let found = KUBECTL_LIST.replace(
            r#""apiVersion": "v1",
            "kind": "Service""#,
            r#""apiVersion": -v1",
            "kind": "Service""#,
        );
        assert_ne!(found, KUBECTL_LIST);
        let reader = Reader {
            path: Path::new("m.json"),
        };
        assert!(reader.streamed_yaml(&found).is_none());
        for version in [r#""-v1\"""#, r#""Service""#, r#""List""#, r#""vFooList""#] {
            let text = format!(
                r#"{{"apiVersion": {version}, "kind": "Service", "metadata": {{"name": "odd"}}}}"#
            );
            assert!(reader.streamed_json(&text).is_err(), "{text}");
            let docs = parse(Path::new("m.json"), &text).unwrap();
            let error = docs[0].object.as_ref().unwrap_err().to_string();
            assert!(
                error.starts_with("m.json: Service default/odd: apiVersion: "),
                "{error}"
            );
        }
        let docs = parse(Path::new("m.json"), &found).unwrap();
        assert_eq!(
            docs[0].object.as_ref().unwrap_err().to_string(),
            "m.json: Service shop/web: apiVersion: \"-v1\\\"\"; lb reads the Services of v1"
        );
        // A kind named like a list, whatever it starts with, is a list whichever way it
        // is read.
        let typed = r#"{"kind": "vServiceList", "apiVersion": "v1", "items": [{"metadata": {"name": "raw"}, "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}}]}"#;
        assert!(reader.streamed_json(typed).is_err());
    }

    #[test]
    fn what_json_cannot_hold_fails_a_buffered_reading_only_where_it_is_read() {
        // Found by the `manifests` fuzz target: a mapping as a key (which JSON cannot
        // hold) in the items of a kind lb does not read. Streamed, they were skipped;
        // buffered, they failed the whole file.
        let found = "kind: Lirt\nitems:\n- {apiVersion: v1, kind: Service, metakubernetes.io/service-namedata: {name: flow}, spec: {clusterIP: 10.96.0.1;, ports: [{port: eighty}]}}: {name: old}\naddressType: IPv4\nendpoints: []\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: knative}\n";
        let reader = Reader {
            path: Path::new("m.yaml"),
        };
        assert_eq!(summary(&reader.streamed_yaml(found).unwrap()), []);
        assert_eq!(summary(&reader.buffered_yaml(found).unwrap()), []);
        // Tags, keys that are sequences, and huge numbers where lb does not look, beside
        // a field that makes the reading buffered: the Service is read all the same.
        let odd = format!(
            "{}  annotations: {{? [a, b]: c, d: !thing 1, e: 123456789012345678901234567890}}\n",
            SERVICE.replace(
                "  namespace: default\n",
                "  namespace: default\n  namespace: default\n"
            )
        );
        assert!(reader.streamed_yaml(&odd).is_none());
        let docs = reader.buffered_yaml(&odd).unwrap();
        assert!(docs[0].object.is_ok(), "{:?}", docs[0].object);
    }

    #[test]
    fn a_list_with_a_control_character_is_refused_in_parts_as_whole() {
        // Found by the `manifests` fuzz target (in a copy of KUBECTL_LIST): simd-json read
        // `80` followed by NULs as 80, and the List read in parts; serde_json, reading it
        // whole, refuses it.
        let found = KUBECTL_LIST.replace(
            r#""port": 8080, "protocol": "TCP"}]"#,
            "\"port\": 80\0\0\0\080, \"protocol\": \"TCP\"}]",
        );
        let raw = KUBECTL_LIST.replace(r#""name": "web-1""#, "\"name\": \"web\u{1}1\"");
        for text in [&found, &raw] {
            assert_ne!(text, KUBECTL_LIST);
            let reader = Reader {
                path: Path::new("all.json"),
            };
            let in_parts = reader.in_parts_on(2, text.as_bytes(), 16).unwrap();
            assert!(in_parts.is_none(), "{text}");
            let error = parse(Path::new("all.json"), text).unwrap_err().to_string();
            assert!(
                error.starts_with("all.json: not valid YAML or JSON: "),
                "{error}"
            );
        }
    }

    #[test]
    fn flow_yaml_that_looks_like_json_is_read_as_yaml() {
        let docs = parse(Path::new("flow.yaml"), SERVICE_FLOW).unwrap();
        assert_eq!(docs[0].id, ObjectRef::new("default", "flow"));
        let err = parse(Path::new("bad.json"), r#"{"kind": "Service", "#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bad.json: not valid YAML or JSON: EOF while parsing"),
            "{err}"
        );
    }

    /// `n` Services and their slices of three endpoints, as a `kind: List` JSON text and as
    /// multi-document YAML.
    fn generated(n: usize) -> (String, String) {
        let mut items = Vec::new();
        let mut yaml = String::new();
        for i in 0..n {
            let (a, b) = (i / 250, i % 250 + 1);
            items.push(format!(
                r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "svc-{i}", "namespace": "default", "resourceVersion": "{i}"}}, "spec": {{"clusterIP": "10.96.{a}.{b}", "ports": [{{"name": "http", "port": 80, "targetPort": 8080}}], "selector": {{"app": "svc-{i}"}}}}}}"#
            ));
            let endpoints: Vec<String> = (1..=3)
                .map(|e| format!(r#"{{"addresses": ["10.244.{a}.{e}"], "conditions": {{"ready": true}}, "nodeName": "node-{e}"}}"#))
                .collect();
            items.push(format!(
                r#"{{"addressType": "IPv4", "apiVersion": "discovery.k8s.io/v1", "endpoints": [{}], "kind": "EndpointSlice", "metadata": {{"labels": {{"kubernetes.io/service-name": "svc-{i}"}}, "name": "svc-{i}-1", "namespace": "default"}}, "ports": [{{"name": "http", "port": 8080}}]}}"#,
                endpoints.join(", ")
            ));
        }
        for item in &items {
            // JSON is YAML: one document per object.
            yaml.push_str("---\n");
            yaml.push_str(item);
            yaml.push('\n');
        }
        let json = format!(
            r#"{{"apiVersion": "v1", "items": [{}], "kind": "List"}}"#,
            items.join(",\n")
        );
        (json, yaml)
    }

    #[test]
    fn many_objects_read_the_same_from_a_json_list_and_yaml_documents() {
        let (json, yaml) = generated(500);
        let from_json = parse(Path::new("all.json"), &json).unwrap();
        let from_yaml = parse(Path::new("all.yaml"), &yaml).unwrap();
        assert_eq!(from_json.len(), 1000);
        assert!(from_json.iter().all(|d| d.object.is_ok()));
        assert_eq!(summary(&from_json), summary(&from_yaml));
        let Ok(ObjectModel::Slice(slice)) = &from_json[999].object else {
            panic!("not a slice")
        };
        assert_eq!(slice.endpoints.len(), 3);
        assert_eq!(slice.service, Some(ObjectRef::new("default", "svc-499")));
    }

    #[test]
    fn a_big_file_read_in_parts_reads_as_it_does_whole() {
        let (json, yaml) = generated(3000);
        assert!(json.len() > PARALLEL_PARSE_MIN_BYTES && yaml.len() > PARALLEL_PARSE_MIN_BYTES);
        let reader = Reader {
            path: Path::new("all.json"),
        };
        // Two threads, as on any machine with more than one core.
        let in_parts = |file: &str, text: &str| {
            Reader {
                path: Path::new(file),
            }
            .in_parts_on(2, text.as_bytes(), part_size(text.len(), 2))
            .unwrap()
        };
        let whole_json = reader.streamed_json(&json).unwrap();
        let whole_yaml = reader.streamed_yaml(&yaml).unwrap();
        assert_eq!(whole_json.len(), 6000);
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_str::<serde_json::Value>(&json).unwrap(),
        )
        .unwrap();
        // Escapes are read as a whole read reads them (the parts parse in place).
        let escaped = json.replacen(
            r#""name": "svc-1499""#,
            r#""name": "svc-\u00314\u0039\u0039""#,
            1,
        );
        assert_ne!(escaped, json);
        for text in [&json, &pretty, &escaped] {
            let read = in_parts("all.json", text).expect("read in parts");
            assert_eq!(summary(&read), summary(&whole_json));
            assert_eq!(
                summary(&parse(Path::new("all.json"), text).unwrap()),
                summary(&whole_json)
            );
        }
        let read = in_parts("all.yaml", &yaml).expect("read in parts");
        assert_eq!(summary(&read), summary(&whole_yaml));
        assert_eq!(
            summary(&parse(Path::new("all.yaml"), &yaml).unwrap()),
            summary(&whole_yaml)
        );

        // A List with a second `items`, or whose kind is not List, is not read in parts:
        // read whole, it is what it is.
        for other in [
            json.replacen(r#""kind": "List"}"#, r#""kind": "List", "items": []}"#, 1),
            json.replacen(r#""kind": "List"}"#, r#""kind": "ServiceList"}"#, 1),
        ] {
            assert_eq!(in_parts("all.json", &other).map(|d| d.len()), None);
        }

        // One bad object in the middle: the parts give up and the whole file is read as
        // before, that object's error named and the others read.
        let bad = |text: &str| {
            let at = text.find(r#""name": "svc-1499""#).unwrap();
            let (before, after) = text.split_at(at);
            let after = after.replacen(r#""port": 80,"#, r#""port": "eighty","#, 1);
            format!("{before}{after}")
        };
        for (text, name) in [(bad(&json), "json"), (bad(&yaml), "yaml")] {
            let file = format!("all.{name}");
            assert!(in_parts(&file, &text).is_none(), "{name}");
            let read = parse(Path::new("all.json"), &text).unwrap();
            let errors: Vec<String> = read
                .iter()
                .filter_map(|d| d.object.as_ref().err().map(ToString::to_string))
                .collect();
            assert_eq!(read.len(), 6000, "{name}");
            assert_eq!(
                errors,
                [
                    "all.json: Service default/svc-1499: spec.ports[0].port: invalid type: string \"eighty\", expected i32"
                ],
                "{name}"
            );
        }
    }

    #[test]
    fn a_big_file_is_read_from_disk_as_its_text_parses() {
        let (json, yaml) = generated(3000);
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("all.json", &json), ("all.yaml", &yaml)] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            assert_eq!(
                summary(&read_file(&path).unwrap()),
                summary(&parse(&path, text).unwrap()),
                "{name}"
            );
        }
        // Not UTF-8 (a byte at the end of a big List): the same error as a small file's.
        let path = dir.path().join("latin1.json");
        let mut bytes = json.into_bytes();
        bytes.splice(bytes.len() - 1..bytes.len() - 1, [b' ', 0xe9, b' ']);
        std::fs::write(&path, &bytes).unwrap();
        let error = read_file(&path).unwrap_err().to_string();
        assert!(error.contains("valid UTF-8"), "{error}");
    }

    #[test]
    fn files_read_at_once_come_back_in_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let (json, yaml) = generated(2000);
        let files = [
            ("small.yaml", SERVICE.to_owned()),
            ("big.json", json),
            ("broken.yaml", "kind: [".to_owned()),
            ("big.yaml", yaml),
        ];
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|(name, text)| {
                let path = dir.path().join(name);
                std::fs::write(&path, text).unwrap();
                path
            })
            .collect();
        let sized: Vec<(&Path, u64)> = paths
            .iter()
            .zip(&files)
            .map(|(path, (_, text))| (path.as_path(), text.len() as u64))
            .collect();
        assert!(sized.iter().map(|(_, len)| len).sum::<u64>() > PARALLEL_READ_MIN_BYTES);
        let read = read_files(&sized);
        let counts: Vec<Option<usize>> =
            read.iter().map(|r| r.as_ref().ok().map(Vec::len)).collect();
        assert_eq!(counts, [Some(1), Some(4000), None, Some(4000)]);
        assert!(
            read[2]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("broken.yaml")
        );
    }

    #[test]
    fn only_manifest_extensions_are_read() {
        assert!(is_manifest(Path::new("/d/a.yaml")));
        assert!(is_manifest(Path::new("/d/a.yml")));
        assert!(is_manifest(Path::new("/d/a.json")));
        assert!(!is_manifest(Path::new("/d/a.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/.a.yaml")));
        assert!(!is_manifest(Path::new("/d/README.md")));
    }
}
