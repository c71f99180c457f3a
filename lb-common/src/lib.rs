//! Map layouts shared by the eBPF programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every layout here is the single definition of what lives in a BPF map. They are
//! `#[repr(C)]` with explicit padding so that the kernel, the eBPF object and the agent
//! agree byte for byte, and bytemuck [`Pod`](bytemuck::Pod) so the host can read and write
//! them without `unsafe`.
//!
//! # Byte order
//!
//! Addresses and ports are stored in **network byte order**, exactly as the kernel hands them
//! to a `cgroup/connect4` program in `bpf_sock_addr.user_ip4` / `user_port`. The eBPF side
//! therefore copies them into keys without conversion; the host side builds them with
//! [`ipv4_to_map`] and [`port_to_map`] and reads them back with [`ipv4_from_map`] and
//! [`port_from_map`].
//!
//! # The service map (after Cilium's `lb4_services`)
//!
//! One frontend (VIP, port, protocol) owns `1 + count` entries:
//!
//! * slot 0, the *master* entry: [`ServiceValue::count`] is the number of backend slots;
//! * slots `1..=count`: [`ServiceValue::backend_id`] names an entry of the backend map.
//!
//! A connect picks a slot with [`backend_slot`], then resolves the backend id. Writers keep
//! every prefix consistent (backends, then slots, then the master's count; surplus slots
//! are deleted last), so a reader never sees a count that points at a missing slot.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names carry the layout version: a layout change gets new names, so an agent never
/// reads maps pinned by an incompatible build (BPF object names are at most 15 bytes).
pub const SERVICE_MAP: &str = "lb4_svc_v1";
/// See [`SERVICE_MAP`].
pub const BACKEND_MAP: &str = "lb4_backend_v1";
/// See [`SERVICE_MAP`].
pub const STATS_MAP: &str = "lb_stats_v1";

/// Default capacity of [`SERVICE_MAP`]: one entry per frontend plus one per backend slot.
pub const SERVICE_MAP_CAPACITY: u32 = 65_536;
/// Default capacity of [`BACKEND_MAP`]: distinct backend address:port pairs.
pub const BACKEND_MAP_CAPACITY: u32 = 65_536;

/// The slot that holds a frontend's master entry.
pub const MASTER_SLOT: u16 = 0;

/// IP protocol numbers, as in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_UDP: u8 = 17;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_SCTP: u8 = 132;

/// Key of [`SERVICE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network byte order.
    pub address: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`MASTER_SLOT`] or a backend slot `1..=count`.
    pub slot: u16,
    /// IP protocol number ([`IPPROTO_TCP`], …).
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl ServiceKey {
    /// Builds a key from raw (network byte order) fields, as the eBPF side reads them.
    #[inline(always)]
    pub const fn new(address: u32, port: u16, protocol: u8, slot: u16) -> Self {
        Self {
            address,
            port,
            slot,
            protocol,
            _pad: [0; 3],
        }
    }

    /// The same frontend at another slot.
    #[inline(always)]
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Value of [`SERVICE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// In a backend slot: the key of [`BACKEND_MAP`]. Zero in the master entry.
    pub backend_id: u32,
    /// In the master entry: the number of backend slots. Zero in backend slots.
    pub count: u16,
    /// Reserved for per-service behavior (affinity, traffic policy); zero today.
    pub flags: u16,
}

impl ServiceValue {
    /// The master entry of a frontend with `count` backend slots.
    pub const fn master(count: u16) -> Self {
        Self {
            backend_id: 0,
            count,
            flags: 0,
        }
    }

    /// A backend slot pointing at `backend_id`.
    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            flags: 0,
        }
    }
}

/// Value of [`BACKEND_MAP`], keyed by a `u32` backend id the agent allocates.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend {
    /// Backend (pod) IPv4 address, network byte order.
    pub address: u32,
    /// Backend (target) port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

impl Backend {
    /// Builds a backend from raw (network byte order) fields.
    pub const fn new(address: u32, port: u16) -> Self {
        Self {
            address,
            port,
            _pad: [0; 2],
        }
    }
}

/// Index of [`STATS_MAP`], a per-CPU array of `u64` counters: why a program did what it did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A connect to a frontend was rewritten to a backend.
    Translated = 0,
    /// A connect to a frontend that has no backends; it was left as it was.
    NoBackends = 1,
    /// A slot or backend id did not resolve (a writer bug or a torn update); left as it was.
    BackendMissing = 2,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; 3] = [
        Reason::Translated,
        Reason::NoBackends,
        Reason::BackendMissing,
    ];
    /// Number of counters in [`STATS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable, scriptable name of the counter.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Translated => "translated",
            Reason::NoBackends => "no_backends",
            Reason::BackendMissing => "backend_missing",
        }
    }
}

/// Picks the backend slot for a new connection: uniform over `1..=count`, `None` when the
/// frontend has no backends. `entropy` is a random `u32` (`bpf_get_prandom_u32` in the kernel).
#[inline(always)]
pub const fn backend_slot(count: u16, entropy: u32) -> Option<u16> {
    if count == 0 {
        return None;
    }
    // The remainder is < count ≤ u16::MAX, so the narrowing is lossless.
    Some((entropy % count as u32) as u16 + 1)
}

/// IPv4 octets to the map's network-byte-order `u32`.
pub const fn ipv4_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The map's network-byte-order `u32` to IPv4 octets.
pub const fn ipv4_from_map(address: u32) -> [u8; 4] {
    address.to_ne_bytes()
}

/// A host-order port to the map's network-byte-order `u16`.
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// The map's network-byte-order `u16` to a host-order port.
pub const fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: the types are `#[repr(C)]`, padded explicitly and bytemuck `Pod`: every bit
    // pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    #[test]
    fn no_backends_means_no_slot() {
        assert_eq!(backend_slot(0, 0), None);
        assert_eq!(backend_slot(0, u32::MAX), None);
    }

    #[test]
    fn slots_stay_in_range_for_every_count() {
        for count in [1u16, 2, 3, 7, 255, 256, u16::MAX] {
            for entropy in [0u32, 1, 2, 12_345, u32::MAX / 2, u32::MAX - 1, u32::MAX] {
                let slot = backend_slot(count, entropy);
                assert!(
                    matches!(slot, Some(s) if (1..=count).contains(&s)),
                    "count {count} entropy {entropy} gave {slot:?}"
                );
            }
        }
    }

    #[test]
    fn consecutive_entropy_visits_every_slot_evenly() {
        let count = 5u16;
        let mut hits = vec![0u32; usize::from(count) + 1];
        for entropy in 0..(u32::from(count) * 100) {
            if let Some(slot) = backend_slot(count, entropy) {
                hits[usize::from(slot)] += 1;
            }
        }
        assert_eq!(hits[0], 0, "slot 0 is the master entry, never a backend");
        assert!(hits[1..].iter().all(|&h| h == 100), "{hits:?}");
    }

    #[test]
    fn byte_order_round_trips_and_matches_the_wire() {
        let address = ipv4_to_map([10, 96, 0, 10]);
        assert_eq!(address.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(ipv4_from_map(address), [10, 96, 0, 10]);
        let port = port_to_map(8888);
        assert_eq!(port.to_ne_bytes(), 8888u16.to_be_bytes());
        assert_eq!(port_from_map(port), 8888);
    }

    #[test]
    fn keys_differ_only_by_slot() {
        let master = ServiceKey::new(ipv4_to_map([10, 96, 0, 1]), port_to_map(80), IPPROTO_TCP, 0);
        let slot = master.with_slot(3);
        assert_eq!(slot.slot, 3);
        assert_eq!(ServiceKey { slot: 0, ..slot }, master);
        assert_eq!(bytemuck::bytes_of(&master).len(), 12);
    }
}
