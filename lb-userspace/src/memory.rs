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

/// Hands the memory freed so far back to the system: this thread's free pages, and those
/// of threads that have ended.
pub fn release_freed() {
    // SAFETY: `mi_collect` only walks mimalloc's own heaps; it has no preconditions, and
    // works (on empty heaps) when mimalloc is not the global allocator.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
