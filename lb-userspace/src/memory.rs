//! The agent's heap: mimalloc (the global allocator of the `lb` binary) keeps the pages a
//! thread freed until that thread allocates again, so after a big sync — a manifest read,
//! parsed and dropped; a plan of every frontend — the agent would hold what it once needed
//! rather than what it keeps.

use std::time::Duration;

/// Keeps the agent's heap in small pages. A huge page is zeroed whole on first touch and
/// split again when mimalloc hands 64 KiB of it back, so a heap that grows and shrinks as
/// much as a full sync's does (a manifest parsed and dropped) zeroes several times what it
/// uses: measured at 100k Services, the first sync took 15–20% longer with them.
pub fn no_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!("keeping transparent huge pages: {e}");
    }
}

/// A sync or a write that took this long allocated and freed enough to be worth handing
/// back at once (which costs a few milliseconds).
pub const RELEASE_AFTER: Duration = Duration::from_millis(50);

/// Counts [`release_freed`] calls, for the runtime's workers to follow as they go idle.
static RELEASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Hands the memory freed so far back to the system: this thread's free pages, and those
/// of threads that have ended; the runtime's workers hand back theirs when they next go
/// idle ([`on_worker_park`]).
pub fn release_freed() {
    collect_this_thread();
    RELEASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// For the runtime's `on_thread_park`: a worker about to idle hands back its free pages
/// if [`release_freed`] was called since it last did. The work of a big list (pages of
/// objects read, converted and dropped) lands on whichever worker ran it, which would
/// otherwise keep those pages for as long as it idles: tens of MiB at 100k Services. An
/// atomic load per park otherwise.
pub fn on_worker_park() {
    thread_local! {
        static SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let releases = RELEASES.load(std::sync::atomic::Ordering::Relaxed);
    SEEN.with(|seen| {
        if seen.get() != releases {
            seen.set(releases);
            collect_this_thread();
        }
    });
}

fn collect_this_thread() {
    // SAFETY: `mi_collect` only walks mimalloc's own heaps; it has no preconditions, and
    // works (on empty heaps) when mimalloc is not the global allocator.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// B-trees smaller than this are not worth rebuilding ([`compact_after`]).
const COMPACT_MIN_LEN: usize = 64;

/// Rebuilds `map` from its entries if at least half of them came one insert at a time
/// (`inserted`), which costs a pass over it: proportional to those inserts. A B-tree
/// filled in order, one insert at a time, splits every full node in two and never fills
/// the left half again: its nodes stay about half full (measured at 100k ascending inserts
/// of 68-byte entries: 128 bytes an entry). Built from its sorted entries at once, its
/// nodes are full (69 bytes), which at 100k Services is megabytes for each map keyed by
/// frontend.
pub fn compact_after<K: Ord, V>(map: &mut std::collections::BTreeMap<K, V>, inserted: usize) {
    if map.len() >= COMPACT_MIN_LEN && inserted.saturating_mul(2) >= map.len() {
        *map = std::mem::take(map).into_iter().collect();
    }
}

/// [`compact_after`] for a map that had `len_before` entries: its new ones came one insert
/// at a time.
pub fn compact_grown<K: Ord, V>(map: &mut std::collections::BTreeMap<K, V>, len_before: usize) {
    let grown = map.len().saturating_sub(len_before);
    compact_after(map, grown);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_compacted_map_holds_the_same_entries() {
        let mut map: BTreeMap<u32, u32> = (0..5000).map(|i| (i, i * 2)).collect();
        let before = map.clone();
        compact_after(&mut map, 2500);
        assert_eq!(map, before);
        compact_after(&mut map, 10);
        assert_eq!(map, before);
    }
}
