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
//! to a `cgroup/connect4` or `connect6` program in `bpf_sock_addr.user_ip4`, `user_ip6` and
//! `user_port`. The eBPF side therefore copies them into keys without conversion; the host
//! side builds them with [`ip_to_map`] and [`port_to_map`] and reads them back with
//! [`ip_from_map`] and [`port_from_map`].
//!
//! # One map for both families
//!
//! Every address in a map is an IPv6 address ([`MapAddress`], 16 bytes); an IPv4 address is
//! held v4-mapped (`::ffff:a.b.c.d`). An AF_INET6 socket that reaches an IPv4 Service through
//! its mapped address (what many runtimes do by default) then finds the IPv4 frontend with
//! the very key it asked for, and a dual-stack Service is two frontends in the same maps.
//! (Cilium keeps a map per family; one map costs a longer key per lookup and spares the
//! agent a second set of maps to size, grow and write.)
//!
//! # The service map (after Cilium's `lb4_services`)
//!
//! One frontend (VIP, port, protocol) owns `1 + count` entries:
//!
//! * slot 0, the *master* entry: [`ServiceValue::count`] is the number of backend slots;
//! * slots `1..=count`: the backend itself ([`ServiceValue::backend_address`] and
//!   [`ServiceValue::backend_port`]) and its id ([`ServiceValue::backend_id`]), the key of
//!   the backend map.
//!
//! A connect picks a slot with [`backend_slot`] and has its backend: two lookups in all.
//! What a translated socket needs later (the frontend to show on getpeername and recvmsg,
//! the backend its datagrams keep) is in the socket's own storage ([`SocketState`], freed
//! with the socket), not in a map entry per connect. Writers keep
//! every prefix consistent (backends, then slots, then the master's count; surplus slots
//! are deleted last), so a reader never sees a count that points at a missing slot.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names carry the layout version: a layout change gets new names, so an agent never
/// reads maps pinned by an incompatible build (BPF object names are at most 15 bytes).
pub const SERVICE_MAP: &str = "lb_svc_v4";
/// See [`SERVICE_MAP`].
pub const BACKEND_MAP: &str = "lb_backend_v2";
/// See [`SERVICE_MAP`].
pub const AFFINITY_MAP: &str = "lb4_affinity_v1";
/// See [`SERVICE_MAP`].
pub const AFFINITY_MATCH_MAP: &str = "lb4_affmatch_v1";
/// Socket local storage (`BPF_MAP_TYPE_SK_STORAGE`): a [`SocketState`] per translated
/// socket. See [`SERVICE_MAP`] for the name.
pub const SOCKET_MAP: &str = "lb_sock_v1";
/// See [`SERVICE_MAP`].
pub const CONFIG_MAP: &str = "lb_config_v1";
/// See [`SERVICE_MAP`].
pub const STATS_MAP: &str = "lb_stats_v4";
/// The addresses that are the clusterIP of a frontend in [`SERVICE_MAP`] (key: the
/// [`MapAddress`]; value `u32`, unused): a connect to one of them on a port no Service has
/// is refused, as kube-proxy rejects it. See [`SERVICE_MAP`] for the name.
pub const CLUSTER_IP_MAP: &str = "lb_cip_v2";

/// Every map of this layout, all pinned by name in the agent's bpffs directory.
pub const MAPS: [&str; 8] = [
    SERVICE_MAP,
    BACKEND_MAP,
    CLUSTER_IP_MAP,
    SOCKET_MAP,
    AFFINITY_MAP,
    AFFINITY_MATCH_MAP,
    CONFIG_MAP,
    STATS_MAP,
];

/// The programs of this layout, by name (that of their function in lb-ebpf), each attached
/// to the cgroup through a link pinned as `lb_<program>`; the attach point of each comes
/// from its ELF section (`cgroup/connect4`, …). The IPv6 hooks serve IPv6 frontends, and
/// IPv4 ones reached through v4-mapped addresses (whose unconnected datagrams the kernel
/// sends as IPv4, through `sendmsg4`); `post_bind4`/`post_bind6` refuse the node's binds to
/// Service addresses.
pub const PROGRAMS: [&str; 10] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "sendmsg6",
    "recvmsg6",
    "getpeername6",
    "post_bind4",
    "post_bind6",
];

/// The maps of the previous layouts that this one no longer has — the IPv4-only service,
/// backend and clusterIP maps (`lb4_svc_v3`, …), before [`SocketState`] (`lb4_svc_v2` and
/// the LRU maps it replaced) and before the bind counter (`lb_stats_v3`, 9 counters): an
/// agent taking over from one removes their pins once its own maps are filled.
pub const PREVIOUS_LAYOUT_MAPS: [&str; 8] = [
    "lb4_svc_v3",
    "lb4_backend_v1",
    "lb4_cip_v1",
    "lb4_svc_v2",
    "lb4_revnat_v1",
    "lb4_udpsock_v1",
    "lb_stats_v2",
    "lb_stats_v3",
];

/// Default capacity of [`SERVICE_MAP`]: one entry per frontend plus one per backend slot.
pub const SERVICE_MAP_CAPACITY: u32 = 65_536;
/// Default capacity of [`BACKEND_MAP`]: distinct backend address:port pairs.
pub const BACKEND_MAP_CAPACITY: u32 = 65_536;
/// Capacity of [`CLUSTER_IP_MAP`], created without preallocation (its memory follows its
/// entries): as many addresses as a service CIDR of /12, kube-apiserver's largest, holds.
pub const CLUSTER_IP_MAP_CAPACITY: u32 = 1 << 20;
/// Capacity of the LRU [`AFFINITY_MAP`]: (client, frontend) pairs with session affinity.
pub const AFFINITY_MAP_CAPACITY: u32 = 65_536;
/// Capacity of [`AFFINITY_MATCH_MAP`] as compiled: backends of frontends that have session
/// affinity, and of UDP frontends. The agent creates it as large as the service map.
pub const AFFINITY_MATCH_MAP_CAPACITY: u32 = 65_536;

/// Every map's key and value sizes in bytes, by name: an agent checks the maps pinned
/// before it loads anything, so that a map of another build is named with its sizes
/// instead of failing the verifier.
pub const MAP_LAYOUTS: [(&str, usize, usize); 8] = [
    (
        SERVICE_MAP,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
    ),
    (BACKEND_MAP, size_of::<u32>(), size_of::<Backend>()),
    (CLUSTER_IP_MAP, size_of::<MapAddress>(), size_of::<u32>()),
    // Socket storage is keyed by a socket (a descriptor from user space).
    (SOCKET_MAP, size_of::<i32>(), size_of::<SocketState>()),
    (
        AFFINITY_MAP,
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
    ),
    (
        AFFINITY_MATCH_MAP,
        size_of::<AffinityMatchKey>(),
        size_of::<u32>(),
    ),
    (CONFIG_MAP, size_of::<u32>(), size_of::<Config>()),
    (STATS_MAP, size_of::<u32>(), size_of::<u64>()),
];

/// Capacity of [`STATS_MAP`]: room for counters to come, so that adding one does not
/// change the map (and its name); [`Reason::COUNT`] of them are used.
pub const STATS_MAP_CAPACITY: u32 = 32;
const _: () = assert!(Reason::COUNT <= STATS_MAP_CAPACITY);

/// The errno a connect()/sendmsg() to a frontend with no usable backend fails with, at
/// once, as a TCP RST from a closed port would: the client is not left waiting.
pub const ERRNO_NO_BACKENDS: i32 = 111; // ECONNREFUSED

/// The errno a bind() in the node's network namespace to an address and port a NodePort,
/// LoadBalancer or external IP frontend has fails with, as if a socket held it (as Cilium
/// refuses it): the process would otherwise take traffic meant for the Service.
pub const ERRNO_ADDRESS_IN_USE: i32 = 98; // EADDRINUSE

/// The slot that holds a frontend's master entry.
pub const MASTER_SLOT: u16 = 0;

/// IP protocol numbers, as in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_UDP: u8 = 17;
/// See [`IPPROTO_TCP`].
pub const IPPROTO_SCTP: u8 = 132;

/// An address as every map holds it: the 16 bytes of an IPv6 address, as four words in
/// network byte order (`bpf_sock_addr.user_ip6`); an IPv4 address v4-mapped.
pub type MapAddress = [u32; 4];

/// Key of [`SERVICE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend address.
    pub address: MapAddress,
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
    pub const fn new(address: MapAddress, port: u16, protocol: u8, slot: u16) -> Self {
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

/// [`ServiceValue::flags`]: the frontend only exists for sockets of the node's own network
/// namespace (NodePort on 127.0.0.1: in a pod, 127.0.0.1 is the pod's own loopback).
pub const FLAG_HOST_NETNS_ONLY: u16 = 1 << 0;
/// [`ServiceValue::flags`]: the backends are the node-local ones only
/// (`internalTrafficPolicy: Local`); a count of zero then means "none on this node".
pub const FLAG_NODE_LOCAL: u16 = 1 << 1;
/// [`ServiceValue::flags`]: the frontend is a Service's clusterIP (its address is in
/// [`CLUSTER_IP_MAP`] while the frontend is in the maps).
pub const FLAG_CLUSTER_IP: u16 = 1 << 2;

/// Value of [`SERVICE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// In a backend slot: the key of [`BACKEND_MAP`]. Zero in the master entry.
    pub backend_id: u32,
    /// In a backend slot: the backend's address, so that a connect needs no lookup of
    /// [`BACKEND_MAP`]. Zero in the master entry, and in a slot whose backend the writer
    /// could not resolve (the datapath then leaves the connect alone).
    pub backend_address: MapAddress,
    /// In a backend slot: the backend's port, network byte order.
    pub backend_port: u16,
    /// In the master entry: the number of backend slots. Zero in backend slots.
    pub count: u16,
    /// In the master entry: `FLAG_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// In the master entry: a stable id of the frontend, naming it in [`AFFINITY_MAP`],
    /// [`AFFINITY_MATCH_MAP`] and [`SocketState`].
    pub frontend_id: u32,
    /// In the master entry: session affinity timeout in seconds; 0 means no affinity.
    pub affinity_timeout_s: u32,
}

impl ServiceValue {
    /// The master entry of a frontend with `count` backend slots.
    pub const fn master(count: u16, flags: u16, frontend_id: u32, affinity_timeout_s: u32) -> Self {
        Self {
            backend_id: 0,
            backend_address: [0; 4],
            backend_port: 0,
            count,
            flags,
            _pad: 0,
            frontend_id,
            affinity_timeout_s,
        }
    }

    /// A backend slot holding backend `backend_id`, which is `backend`.
    pub const fn slot(backend_id: u32, backend: Backend) -> Self {
        Self {
            backend_id,
            backend_address: backend.address,
            backend_port: backend.port,
            count: 0,
            flags: 0,
            _pad: 0,
            frontend_id: 0,
            affinity_timeout_s: 0,
        }
    }

    /// A backend slot's backend; `None` if the writer could not resolve it.
    #[inline(always)]
    pub const fn backend(&self) -> Option<Backend> {
        if is_zero(&self.backend_address) {
            None
        } else {
            Some(Backend::new(self.backend_address, self.backend_port))
        }
    }
}

/// [`SocketEntry::family`] of an entry in use for an IPv4 frontend (`AF_INET`).
pub const FAMILY_IPV4: u8 = 2;
/// [`SocketEntry::family`] of an entry in use for an IPv6 frontend (`AF_INET6`).
pub const FAMILY_IPV6: u8 = 10;

/// A map address as a [`SocketEntry`] holds it: an IPv4 one ([`FAMILY_IPV4`]) in the first
/// word, the rest zero, as the layout before IPv6 frontends had it (so that the storage of a
/// socket translated then still reads right); an IPv6 one ([`FAMILY_IPV6`]) whole.
#[inline(always)]
pub const fn socket_address(address: &MapAddress) -> (u8, [u32; 4]) {
    match ipv4_in_mapped(*address) {
        Some(ipv4) => (FAMILY_IPV4, [ipv4, 0, 0, 0]),
        None => (FAMILY_IPV6, *address),
    }
}

/// The map address of a [`SocketEntry`]'s `address` of `family`.
#[inline(always)]
pub const fn socket_address_to_map(family: u8, address: &[u32; 4]) -> MapAddress {
    if family == FAMILY_IPV4 {
        mapped_ipv4(address[0])
    } else {
        *address
    }
}

/// How many frontends one socket remembers: a connected socket has one; an unconnected UDP
/// socket that sends to more than this forgets the one added longest ago (its replies from
/// there then show the backend, and its next datagram there picks a backend anew).
pub const SOCKET_ENTRIES: usize = 4;

/// One frontend a socket was translated for, and the backend it went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketEntry {
    /// The frontend the application addressed, as [`socket_address`] holds it.
    pub frontend_address: [u32; 4],
    /// The backend it was sent to, likewise.
    pub backend_address: [u32; 4],
    pub frontend_port: u16,
    pub backend_port: u16,
    /// The frontend's [`ServiceValue::frontend_id`] and the backend's id, which tell whether
    /// the backend is still one of the frontend's ([`AFFINITY_MATCH_MAP`]).
    pub frontend_id: u32,
    pub backend_id: u32,
    /// 0 for an unused entry, else the address family ([`FAMILY_IPV4`], [`FAMILY_IPV6`]).
    pub family: u8,
    pub _pad: [u8; 3],
}

impl SocketEntry {
    /// A frontend and the backend a socket was sent to (of the frontend's family).
    #[inline(always)]
    pub const fn new(
        frontend: &ServiceKey,
        frontend_id: u32,
        backend_id: u32,
        backend: &Backend,
    ) -> Self {
        let (family, frontend_address) = socket_address(&frontend.address);
        let (_, backend_address) = socket_address(&backend.address);
        Self {
            frontend_address,
            backend_address,
            frontend_port: frontend.port,
            backend_port: backend.port,
            frontend_id,
            backend_id,
            family,
            _pad: [0; 3],
        }
    }
}

/// Value of [`SOCKET_MAP`], socket local storage: what a translated socket needs after the
/// translation — the frontend to show where the application would see the backend
/// (getpeername, a datagram's source), and for unconnected UDP the backend its datagrams to
/// a frontend keep. It lives and dies with the socket: no entry to age out or evict, and
/// nothing to write when a socket sends again to a frontend it already has.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketState {
    pub entries: [SocketEntry; SOCKET_ENTRIES],
    /// Which entry a new frontend replaces once every entry is in use (round robin).
    pub next: u32,
    pub _pad: u32,
}

impl SocketState {
    /// The socket's entry for frontend `frontend_id` of `family`, if it has one.
    #[inline(always)]
    pub fn entry_of(&self, family: u8, frontend_id: u32) -> Option<&SocketEntry> {
        self.entries.iter().find(|entry| {
            entry.family != 0 && entry.family == family && entry.frontend_id == frontend_id
        })
    }

    /// The entry whose backend is `address:port` of `family`: the frontend to show for it.
    #[inline(always)]
    pub fn entry_for_backend(
        &self,
        family: u8,
        address: &[u32; 4],
        port: u16,
    ) -> Option<&SocketEntry> {
        self.entries.iter().find(|entry| {
            entry.family != 0
                && entry.family == family
                && entry.backend_port == port
                && entry.backend_address == *address
        })
    }

    /// Records `entry`: in place of the same frontend's, else in an unused entry, else in
    /// place of the one added longest ago. `false` if the socket had it already, so that
    /// nothing was written.
    #[inline(always)]
    pub fn remember(&mut self, entry: SocketEntry) -> bool {
        let mut at = None;
        for (index, held) in self.entries.iter().enumerate() {
            if held.family == entry.family && held.frontend_id == entry.frontend_id {
                if *held == entry {
                    return false;
                }
                at = Some(index);
                break;
            }
            if held.family == 0 && at.is_none() {
                at = Some(index);
            }
        }
        let index = match at {
            Some(index) => index,
            None => {
                let index = self.next as usize % SOCKET_ENTRIES;
                self.next = self.next.wrapping_add(1);
                index
            }
        };
        if let Some(slot) = self.entries.get_mut(index) {
            *slot = entry;
        }
        true
    }
}

/// Key of the LRU [`AFFINITY_MAP`]: a client and a frontend. The client is its network
/// namespace (`bpf_get_netns_cookie()`): at the socket layer the source IP is not chosen yet,
/// and a pod's sockets all share its netns, so this is the socket-level "ClientIP".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub frontend_id: u32,
    pub _pad: u32,
}

/// Value of [`AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` of the last connection that used the entry.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Key of [`AFFINITY_MATCH_MAP`] (value `u32`, unused): present while `backend_id` is a
/// backend of `frontend_id`, so an affinity entry or a socket's [`SocketEntry`] for a
/// backend that went away is ignored.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub frontend_id: u32,
}

/// The single value of [`CONFIG_MAP`] (an array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// `bpf_get_netns_cookie()` of the node's own network namespace, for
    /// [`FLAG_HOST_NETNS_ONLY`]. Zero until the agent writes it: such frontends match nobody.
    pub host_netns_cookie: u64,
}

/// Whether an affinity entry last used at `last_used_ns` still holds at `now_ns`.
#[inline(always)]
pub const fn affinity_holds(last_used_ns: u64, now_ns: u64, timeout_s: u32) -> bool {
    timeout_s != 0 && now_ns.saturating_sub(last_used_ns) <= timeout_s as u64 * 1_000_000_000
}

/// Value of [`BACKEND_MAP`], keyed by a `u32` backend id the agent allocates.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Backend {
    /// Backend (pod) address.
    pub address: MapAddress,
    /// Backend (target) port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

impl Backend {
    /// Builds a backend from raw (network byte order) fields.
    pub const fn new(address: MapAddress, port: u16) -> Self {
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
    /// connect() to a frontend rewritten to a backend (TCP, or connected UDP).
    ConnectTranslated = 0,
    /// An unconnected UDP sendmsg() to a frontend rewritten to a backend.
    SendmsgTranslated = 1,
    /// A UDP reply's source shown as the frontend instead of the backend.
    RecvmsgRestored = 2,
    /// getpeername() shown as the frontend instead of the backend.
    PeernameRestored = 3,
    /// Refused with [`ERRNO_NO_BACKENDS`]: the frontend has no usable backend.
    NoBackends = 4,
    /// Refused with [`ERRNO_NO_BACKENDS`]: `internalTrafficPolicy: Local` and none on this node.
    NoLocalBackends = 5,
    /// A slot or backend id did not resolve (a torn update or a writer bug); left untranslated.
    BackendMissing = 6,
    /// Session affinity sent a client to the backend it had.
    AffinityHit = 7,
    /// Refused with [`ERRNO_NO_BACKENDS`]: a clusterIP on a port (or protocol) none of its
    /// Services has.
    UnknownPort = 8,
    /// Refused with [`ERRNO_ADDRESS_IN_USE`]: a bind() in the node's network namespace to a
    /// NodePort (on any address), or to a LoadBalancer or external IP and its port.
    BindRefused = 9,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; 10] = [
        Reason::ConnectTranslated,
        Reason::SendmsgTranslated,
        Reason::RecvmsgRestored,
        Reason::PeernameRestored,
        Reason::NoBackends,
        Reason::NoLocalBackends,
        Reason::BackendMissing,
        Reason::AffinityHit,
        Reason::UnknownPort,
        Reason::BindRefused,
    ];
    /// Number of counters in [`STATS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable, scriptable name of the counter.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::ConnectTranslated => "connect_translated",
            Reason::SendmsgTranslated => "sendmsg_translated",
            Reason::RecvmsgRestored => "recvmsg_restored",
            Reason::PeernameRestored => "peername_restored",
            Reason::NoBackends => "no_backends",
            Reason::NoLocalBackends => "no_local_backends",
            Reason::BackendMissing => "backend_missing",
            Reason::AffinityHit => "affinity_hit",
            Reason::UnknownPort => "unknown_port",
            Reason::BindRefused => "bind_refused",
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

/// IPv4 octets to the network-byte-order `u32` of `bpf_sock_addr.user_ip4`.
pub const fn ipv4_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// An address as the maps hold it: IPv6 as is, IPv4 v4-mapped.
pub const fn ip_to_map(ip: core::net::IpAddr) -> MapAddress {
    let octets = match ip {
        core::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(ip) => ip.octets(),
    };
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ]);
        i += 1;
    }
    words
}

/// A map address back: a v4-mapped one as the IPv4 address it holds.
pub const fn ip_from_map(address: MapAddress) -> core::net::IpAddr {
    if let Some(ipv4) = ipv4_in_mapped(address) {
        return core::net::IpAddr::V4(core::net::Ipv4Addr::from_octets(ipv4.to_ne_bytes()));
    }
    let mut octets = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let bytes = address[i].to_ne_bytes();
        octets[4 * i] = bytes[0];
        octets[4 * i + 1] = bytes[1];
        octets[4 * i + 2] = bytes[2];
        octets[4 * i + 3] = bytes[3];
        i += 1;
    }
    core::net::IpAddr::V6(core::net::Ipv6Addr::from_octets(octets))
}

#[inline(always)]
const fn is_zero(address: &MapAddress) -> bool {
    address[0] == 0 && address[1] == 0 && address[2] == 0 && address[3] == 0
}

/// The map's network-byte-order `u32` to IPv4 octets.
pub const fn ipv4_from_map(address: u32) -> [u8; 4] {
    address.to_ne_bytes()
}

/// The IPv4 address (the map's network-byte-order `u32`) in a v4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), given as `bpf_sock_addr.user_ip6` holds it: four network-order
/// words. An AF_INET6 socket reaches an IPv4 address this way (the default of many
/// runtimes), and its hooks see the mapped form; `None` for any other IPv6 address.
#[inline(always)]
pub const fn ipv4_in_mapped(words: [u32; 4]) -> Option<u32> {
    if words[0] == 0 && words[1] == 0 && words[2] == 0xffff_u32.to_be() {
        Some(words[3])
    } else {
        None
    }
}

/// The v4-mapped IPv6 address of `address` (the map's network-byte-order `u32`), as
/// `bpf_sock_addr.user_ip6` holds it.
#[inline(always)]
pub const fn mapped_ipv4(address: u32) -> [u32; 4] {
    [0, 0, 0xffff_u32.to_be(), address]
}

/// 127.0.0.1 as the maps hold it (v4-mapped).
pub const IPV4_LOOPBACK: MapAddress = mapped_ipv4(ipv4_to_map([127, 0, 0, 1]));
/// `::1` as the maps hold it.
pub const IPV6_LOOPBACK: MapAddress = [0, 0, 0, 1_u32.to_be()];

/// Whether a bind() in the node's network namespace would take traffic of the frontend on
/// that port whose master entry `frontend_flags` are, found at [`bind_frontend_addresses`].
/// A clusterIP is never a local address, so only NodePort, LoadBalancer and external IP
/// frontends conflict.
#[inline(always)]
pub const fn bind_conflicts(frontend_flags: u16) -> bool {
    frontend_flags & FLAG_CLUSTER_IP == 0
}

/// The frontend addresses a bind() to `address` is checked against: the address itself;
/// for a wildcard (which also receives a NodePort's traffic on every node address) the
/// loopback address of its family, where every NodePort of that family has a frontend and
/// nothing else does — both for the IPv6 wildcard `::`, which receives IPv4 too (unless the
/// socket is `IPV6_V6ONLY`, which a bind hook cannot see).
#[inline(always)]
pub const fn bind_frontend_addresses(address: MapAddress) -> (MapAddress, Option<MapAddress>) {
    if is_zero(&address) {
        (IPV4_LOOPBACK, Some(IPV6_LOOPBACK))
    } else if matches!(ipv4_in_mapped(address), Some(0)) {
        (IPV4_LOOPBACK, None)
    } else {
        (address, None)
    }
}

/// A host-order port to the map's network-byte-order `u16`.
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// The map's network-byte-order `u16` to a host-order port.
pub const fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 36);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 8);
const _: () = assert!(core::mem::size_of::<SocketEntry>() == 48);
const _: () = assert!(core::mem::size_of::<SocketState>() == 48 * SOCKET_ENTRIES + 8);
const _: () = assert!(core::mem::size_of::<Config>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: the types are `#[repr(C)]`, padded explicitly and bytemuck `Pod`: every bit
    // pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityMatchKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    #[test]
    fn v4_mapped_addresses_carry_their_ipv4_address() {
        let vip = ipv4_to_map([10, 96, 0, 10]);
        let mapped = std::net::Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped();
        assert_eq!(ip_to_map(mapped.into()), mapped_ipv4(vip));
        assert_eq!(ipv4_in_mapped(ip_to_map(mapped.into())), Some(vip));
        // IPv4-compatible (deprecated ::a.b.c.d), NAT64 and plain IPv6 addresses are not.
        for other in ["::10.96.0.10", "64:ff9b::a60:a", "fd00::a60:a", "::1", "::"] {
            let other: std::net::Ipv6Addr = other.parse().unwrap();
            assert_eq!(ipv4_in_mapped(ip_to_map(other.into())), None, "{other}");
        }
    }

    #[test]
    fn map_addresses_round_trip_in_both_families() {
        for ip in [
            "10.96.0.10",
            "0.0.0.0",
            "255.255.255.255",
            "fd00::a",
            "::1",
            "::",
            "2001:db8::ffff:0:1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_from_map(ip_to_map(ip)), ip, "{ip}");
        }
        // The words are the address's bytes in order (network byte order), as in user_ip6.
        let words = ip_to_map("fd00::a".parse().unwrap());
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(words[3].to_ne_bytes(), [0, 0, 0, 0x0a]);
        assert_eq!(ip_to_map("::1".parse().unwrap()), IPV6_LOOPBACK);
        assert_eq!(ip_to_map("127.0.0.1".parse().unwrap()), IPV4_LOOPBACK);
    }

    #[test]
    fn a_socket_entry_holds_ipv4_in_its_first_word_and_ipv6_whole() {
        let v4 = ip_to_map("10.244.0.7".parse().unwrap());
        assert_eq!(
            socket_address(&v4),
            (FAMILY_IPV4, [ipv4_to_map([10, 244, 0, 7]), 0, 0, 0])
        );
        let v6 = ip_to_map("fd00::7".parse().unwrap());
        assert_eq!(socket_address(&v6), (FAMILY_IPV6, v6));
        for address in [v4, v6] {
            let (family, held) = socket_address(&address);
            assert_eq!(socket_address_to_map(family, &held), address);
        }
    }

    #[test]
    fn a_wildcard_bind_is_checked_against_the_node_ports_on_loopback() {
        let node_ip = ip_to_map("10.244.0.1".parse().unwrap());
        let node_ip6 = ip_to_map("fd00::1".parse().unwrap());
        let any4 = ip_to_map("0.0.0.0".parse().unwrap());
        let any6 = ip_to_map("::".parse().unwrap());
        assert_eq!(bind_frontend_addresses(any4), (IPV4_LOOPBACK, None));
        assert_eq!(
            bind_frontend_addresses(any6),
            (IPV4_LOOPBACK, Some(IPV6_LOOPBACK))
        );
        assert_eq!(bind_frontend_addresses(node_ip), (node_ip, None));
        assert_eq!(bind_frontend_addresses(node_ip6), (node_ip6, None));
        // NodePorts (on loopback: host netns only), LoadBalancer and external IPs conflict;
        // clusterIPs never do.
        assert!(bind_conflicts(FLAG_HOST_NETNS_ONLY));
        assert!(bind_conflicts(0));
        assert!(bind_conflicts(FLAG_NODE_LOCAL));
        assert!(!bind_conflicts(FLAG_CLUSTER_IP));
        assert!(!bind_conflicts(FLAG_CLUSTER_IP | FLAG_NODE_LOCAL));
    }

    #[test]
    fn every_map_has_one_layout() {
        let mut names: std::vec::Vec<&str> = MAP_LAYOUTS.iter().map(|(name, ..)| *name).collect();
        names.sort_unstable();
        let mut maps = MAPS.to_vec();
        maps.sort_unstable();
        assert_eq!(names, maps);
    }

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
    fn affinity_holds_until_the_timeout_and_not_without_one() {
        let second = 1_000_000_000u64;
        assert!(affinity_holds(5 * second, 5 * second, 10));
        assert!(affinity_holds(5 * second, 15 * second, 10));
        assert!(!affinity_holds(5 * second, 15 * second + 1, 10));
        assert!(!affinity_holds(5 * second, 5 * second, 0));
        // A clock read before the entry was written (another CPU) is not an expiry.
        assert!(affinity_holds(5 * second, 4 * second, 10));
        // The largest timeout does not overflow.
        assert!(affinity_holds(0, u64::from(u32::MAX) * second, u32::MAX));
    }

    #[test]
    fn reason_names_are_unique_and_indexes_dense() {
        for (index, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
            assert_eq!(
                Reason::ALL
                    .iter()
                    .filter(|r| r.name() == reason.name())
                    .count(),
                1
            );
        }
    }

    #[test]
    fn map_names_fit_the_kernel() {
        for name in MAPS.iter().chain(&PREVIOUS_LAYOUT_MAPS) {
            assert!(name.len() <= 15, "{name}");
        }
    }

    fn v4(octets: [u8; 4]) -> MapAddress {
        mapped_ipv4(ipv4_to_map(octets))
    }

    fn entry(frontend_id: u32, backend: u8) -> SocketEntry {
        let frontend = ServiceKey::new(
            v4([10, 96, 0, frontend_id as u8]),
            port_to_map(53),
            IPPROTO_UDP,
            MASTER_SLOT,
        );
        let to = Backend::new(v4([10, 244, 0, backend]), port_to_map(5353));
        SocketEntry::new(&frontend, frontend_id, u32::from(backend), &to)
    }

    #[test]
    fn a_socket_remembers_each_frontend_once_and_writes_only_what_changed() {
        let mut state = SocketState::zeroed();
        assert!(state.remember(entry(1, 10)));
        assert!(
            !state.remember(entry(1, 10)),
            "the same entry again writes nothing"
        );
        assert!(state.remember(entry(2, 20)));
        // A new backend for frontend 1 replaces its entry, not another one.
        assert!(state.remember(entry(1, 11)));
        assert_eq!(state.entry_of(FAMILY_IPV4, 1), Some(&entry(1, 11)));
        assert_eq!(state.entry_of(FAMILY_IPV4, 2), Some(&entry(2, 20)));
        assert_eq!(state.entries.iter().filter(|e| e.family != 0).count(), 2);
        assert_eq!(state.entry_of(FAMILY_IPV4, 3), None);
    }

    #[test]
    fn a_socket_finds_the_frontend_of_a_backend_it_was_sent_to() {
        let mut state = SocketState::zeroed();
        state.remember(entry(1, 10));
        state.remember(entry(2, 20));
        let backend = [ipv4_to_map([10, 244, 0, 20]), 0, 0, 0];
        let found = state.entry_for_backend(FAMILY_IPV4, &backend, port_to_map(5353));
        assert_eq!(found.map(|e| e.frontend_id), Some(2));
        assert_eq!(
            state.entry_for_backend(FAMILY_IPV4, &backend, port_to_map(53)),
            None,
            "another port of the same address is someone else's"
        );
        // An unused (zeroed) entry never matches, whatever is asked.
        assert_eq!(SocketState::zeroed().entry_for_backend(0, &[0; 4], 0), None);
        assert_eq!(SocketState::zeroed().entry_of(0, 0), None);
    }

    #[test]
    fn a_full_socket_replaces_the_frontend_added_longest_ago() {
        let mut state = SocketState::zeroed();
        for id in 1..=SOCKET_ENTRIES as u32 {
            state.remember(entry(id, id as u8));
        }
        let next = SOCKET_ENTRIES as u32 + 1;
        state.remember(entry(next, 99));
        assert_eq!(state.entry_of(FAMILY_IPV4, 1), None, "the oldest went");
        assert!(state.entry_of(FAMILY_IPV4, next).is_some());
        state.remember(entry(next + 1, 98));
        assert_eq!(state.entry_of(FAMILY_IPV4, 2), None, "then the next oldest");
        assert!(state.entry_of(FAMILY_IPV4, 3).is_some());
    }

    #[test]
    fn a_slot_holds_its_backend_and_a_master_none() {
        let backend = Backend::new(v4([10, 244, 0, 7]), port_to_map(8080));
        assert_eq!(ServiceValue::slot(7, backend).backend(), Some(backend));
        assert_eq!(ServiceValue::master(3, 0, 1, 0).backend(), None);
    }

    #[test]
    fn keys_differ_only_by_slot() {
        let master = ServiceKey::new(v4([10, 96, 0, 1]), port_to_map(80), IPPROTO_TCP, 0);
        let slot = master.with_slot(3);
        assert_eq!(slot.slot, 3);
        assert_eq!(ServiceKey { slot: 0, ..slot }, master);
        assert_eq!(bytemuck::bytes_of(&master).len(), 24);
    }
}
