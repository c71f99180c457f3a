//! Hash maps and sets with a fast non-cryptographic hasher: the agent's indexes are keyed
//! by names, frontends and ids it reads from its own sources, and are looked up on every
//! event.

/// A hash map with [`foldhash`]'s fast hasher.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set with [`foldhash`]'s fast hasher.
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
