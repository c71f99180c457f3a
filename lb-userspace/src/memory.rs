//! The agent's heap: mimalloc (the global allocator of the `lb` binary) keeps the pages a
//! thread freed until that thread allocates again, so after a big sync — a manifest read,
//! parsed and dropped; a plan of every frontend — the agent would hold what it once needed
//! rather than what it keeps.

use std::time::Duration;

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
