//! lb's datapath: socket-level load balancing for Kubernetes Services.
//!
//! The translation happens once per socket, at the syscall, so there is no per-packet NAT and
//! no conntrack:
//! - `cgroup/connect4` rewrites a connect() to a frontend (VIP:port/protocol) into a connect()
//!   to one of its backends (TCP, and connected UDP);
//! - `cgroup/sendmsg4` does the same for each unconnected UDP sendmsg(), keeping a socket on
//!   the backend of its first datagram to a frontend while that backend stays;
//! - `cgroup/recvmsg4` and `cgroup/getpeername4` show the frontend again where the
//!   application would otherwise see the backend, from the socket's own storage
//!   (`SocketState`), which the first two fill and the kernel frees with the socket;
//! - `cgroup/connect6`, `cgroup/sendmsg6`, `cgroup/recvmsg6` and `cgroup/getpeername6` do
//!   the same for AF_INET6 sockets: IPv6 frontends, and IPv4 ones reached through their
//!   v4-mapped address (`::ffff:10.96.0.10`, the default of many runtimes), which the maps
//!   hold as such (every map address is 16 bytes, IPv4 v4-mapped). Such a socket's
//!   unconnected UDP datagrams to a mapped address pass through `cgroup/sendmsg4`: the
//!   kernel sends them as IPv4 before the IPv6 hook would run;
//! - `cgroup/post_bind4` and `cgroup/post_bind6` fail a bind() in the node's network
//!   namespace to a NodePort, or to a LoadBalancer or external IP and its port, with
//!   EADDRINUSE: the process would take the Service's traffic from off-node clients.
//!
//! A connect costs two hash lookups (the frontend's master entry, then the slot chosen,
//! which holds the backend) and one socket storage write.
//!
//! Anything the maps do not know is left exactly as it was; the programs never fail a
//! syscall they do not own.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        EbpfContext,
        bindings::{BPF_F_NO_PREALLOC, bpf_sock_addr},
        btf_maps::SkStorage,
        helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_set_retval},
        macros::{btf_map, cgroup_sock, cgroup_sock_addr, map},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::{SockAddrContext, SockContext},
    };
    use lb_common::{
        AFFINITY_MAP_CAPACITY, AFFINITY_MATCH_MAP_CAPACITY, AffinityKey, AffinityMatchKey,
        AffinityValue, BACKEND_MAP_CAPACITY, Backend, CLUSTER_IP_MAP_CAPACITY, Config,
        ERRNO_ADDRESS_IN_USE, ERRNO_NO_BACKENDS, FLAG_HOST_NETNS_ONLY, FLAG_NODE_LOCAL,
        MASTER_SLOT, MapAddress, Reason, SERVICE_MAP_CAPACITY, STATS_MAP_CAPACITY, ServiceKey,
        ServiceValue, SocketEntry, SocketState, affinity_holds, backend_slot, bind_conflicts,
        bind_frontend_addresses, ipv4_in_mapped, mapped_ipv4, port_to_map, socket_address,
        socket_address_to_map,
    };

    /// Verdict that lets the syscall proceed (with whatever address we left in the context).
    const ALLOW: i32 = 1;
    /// Verdict that fails the syscall with the errno set by `bpf_set_retval`.
    const REJECT: i32 = 0;

    #[map(name = "lb_svc_v4")]
    static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICE_MAP_CAPACITY, 0);

    #[map(name = "lb_backend_v2")]
    static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKEND_MAP_CAPACITY, 0);

    #[map(name = "lb4_affinity_v1")]
    static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
        LruHashMap::pinned(AFFINITY_MAP_CAPACITY, 0);

    #[map(name = "lb4_affmatch_v1")]
    static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32> =
        HashMap::pinned(AFFINITY_MATCH_MAP_CAPACITY, 0);

    /// Socket local storage: a BTF map, as the kernel requires for it. The agent pins it
    /// by name like the others.
    #[btf_map(name = "lb_sock_v1")]
    static SOCKETS: SkStorage<SocketState> = SkStorage::new();

    /// Created without preallocation: its memory follows the clusterIPs it holds.
    #[map(name = "lb_cip_v2")]
    static CLUSTER_IPS: HashMap<MapAddress, u32> =
        HashMap::pinned(CLUSTER_IP_MAP_CAPACITY, BPF_F_NO_PREALLOC);

    #[map(name = "lb_config_v1")]
    static CONFIG: Array<Config> = Array::pinned(1, 0);

    #[map(name = "lb_stats_v4")]
    static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_MAP_CAPACITY, 0);

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        forward(&ctx, AddressField::Ip4, Reason::ConnectTranslated, false)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
        forward(&ctx, AddressField::Ip4, Reason::SendmsgTranslated, true)
    }

    #[cgroup_sock_addr(recvmsg4)]
    pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
        restore(&ctx, AddressField::Ip4, Reason::RecvmsgRestored);
        // recvmsg hooks must allow: the datagram has already arrived.
        ALLOW
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn getpeername4(ctx: SockAddrContext) -> i32 {
        restore(&ctx, AddressField::Ip4, Reason::PeernameRestored);
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn connect6(ctx: SockAddrContext) -> i32 {
        forward(&ctx, AddressField::Ip6, Reason::ConnectTranslated, false)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
        forward(&ctx, AddressField::Ip6, Reason::SendmsgTranslated, true)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
        restore(&ctx, AddressField::Ip6, Reason::RecvmsgRestored);
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn getpeername6(ctx: SockAddrContext) -> i32 {
        restore(&ctx, AddressField::Ip6, Reason::PeernameRestored);
        ALLOW
    }

    #[cgroup_sock(post_bind4)]
    pub fn post_bind4(ctx: SockContext) -> i32 {
        // SAFETY: the kernel passes a valid `bpf_sock` for the program's lifetime.
        let sock = unsafe { &*ctx.sock };
        refuse_service_bind(
            &ctx,
            mapped_ipv4(sock.src_ip4),
            sock.src_port,
            sock.protocol,
        )
    }

    #[cgroup_sock(post_bind6)]
    pub fn post_bind6(ctx: SockContext) -> i32 {
        // SAFETY: as in `post_bind4`.
        let sock = unsafe { &*ctx.sock };
        // Word by word: the verifier allows 4-byte context accesses here.
        let words = [
            sock.src_ip6[0],
            sock.src_ip6[1],
            sock.src_ip6[2],
            sock.src_ip6[3],
        ];
        // The wildcard `::` also receives IPv4 (see `bind_frontend_addresses`).
        refuse_service_bind(&ctx, words, sock.src_port, sock.protocol)
    }

    /// Fails a bind() of the node's netns to `address` and `port` (host order, as
    /// `bpf_sock.src_port` has it) when a NodePort, LoadBalancer or external IP frontend
    /// has them; pods' binds are their own netns's business.
    #[inline(always)]
    fn refuse_service_bind(
        ctx: &SockContext,
        address: MapAddress,
        port: u32,
        protocol: u32,
    ) -> i32 {
        if !in_host_netns(ctx) {
            return ALLOW;
        }
        let (address, other) = bind_frontend_addresses(address);
        let conflicts = |address: MapAddress| {
            let frontend = ServiceKey::new(
                address,
                port_to_map(port as u16),
                protocol as u8,
                MASTER_SLOT,
            );
            // SAFETY: plain data read at once.
            matches!(unsafe { SERVICES.get(frontend) }, Some(master) if bind_conflicts(master.flags))
        };
        if conflicts(address) || other.is_some_and(conflicts) {
            count(Reason::BindRefused);
            // SAFETY: a helper valid for cgroup sock programs (Linux ≥ 5.18); the errno is
            // negated, as the kernel expects.
            unsafe { bpf_set_retval(-ERRNO_ADDRESS_IN_USE) };
            REJECT
        } else {
            ALLOW
        }
    }

    /// Where a hook finds the address it translates: `user_ip4` (AF_INET sockets, seen as
    /// v4-mapped like the maps hold them), or `user_ip6` (AF_INET6 sockets, an IPv4
    /// destination among them v4-mapped already).
    #[derive(Clone, Copy)]
    enum AddressField {
        Ip4,
        Ip6,
    }

    impl AddressField {
        #[inline(always)]
        fn read(self, sock_addr: &bpf_sock_addr) -> MapAddress {
            match self {
                Self::Ip4 => mapped_ipv4(sock_addr.user_ip4),
                // Word by word: the verifier allows 4-byte context accesses here.
                Self::Ip6 => [
                    sock_addr.user_ip6[0],
                    sock_addr.user_ip6[1],
                    sock_addr.user_ip6[2],
                    sock_addr.user_ip6[3],
                ],
            }
        }

        /// Replaces the address; `false` (nothing written) for an IPv6 address where an
        /// AF_INET socket has room for IPv4 only, which the maps never pair.
        #[inline(always)]
        fn write(self, sock_addr: &mut bpf_sock_addr, address: MapAddress) -> bool {
            match self {
                Self::Ip4 => match ipv4_in_mapped(address) {
                    Some(ipv4) => {
                        sock_addr.user_ip4 = ipv4;
                        true
                    }
                    None => false,
                },
                Self::Ip6 => {
                    sock_addr.user_ip6[0] = address[0];
                    sock_addr.user_ip6[1] = address[1];
                    sock_addr.user_ip6[2] = address[2];
                    sock_addr.user_ip6[3] = address[3];
                    true
                }
            }
        }
    }

    /// What to do with a connect()/sendmsg() destination.
    enum Choice {
        /// Not a frontend (for this socket): leave it alone.
        NotOurs,
        /// Rewrite to this backend.
        Backend {
            id: u32,
            backend: Backend,
            frontend_id: u32,
            affinity_hit: bool,
        },
        /// A frontend with no usable backend: fail the syscall at once.
        Refuse(Reason),
        /// A frontend whose backend could not be resolved: leave it alone, count why.
        Untranslated(Reason),
    }

    /// `per_datagram`: the call is one unconnected sendmsg() of many a socket may make.
    #[inline(always)]
    fn forward(
        ctx: &SockAddrContext,
        field: AddressField,
        translated: Reason,
        per_datagram: bool,
    ) -> i32 {
        // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        let address = field.read(sock_addr);
        // The kernel keeps the network-order port in the low 16 bits of `user_port`.
        let frontend = ServiceKey::new(
            address,
            sock_addr.user_port as u16,
            sock_addr.protocol as u8,
            MASTER_SLOT,
        );
        match choose(ctx, &frontend, per_datagram) {
            Choice::NotOurs => ALLOW,
            Choice::Backend {
                id,
                backend,
                frontend_id,
                affinity_hit,
            } => {
                if !field.write(sock_addr, backend.address) {
                    count(Reason::BackendMissing);
                    return ALLOW;
                }
                sock_addr.user_port = u32::from(backend.port);
                remember(ctx, SocketEntry::new(&frontend, frontend_id, id, &backend));
                count(translated);
                if affinity_hit {
                    count(Reason::AffinityHit);
                }
                ALLOW
            }
            Choice::Refuse(reason) => {
                count(reason);
                // SAFETY: a helper valid for connect and sendmsg hooks; the errno is negated,
                // as the kernel expects.
                unsafe { bpf_set_retval(-ERRNO_NO_BACKENDS) };
                REJECT
            }
            Choice::Untranslated(reason) => {
                count(reason);
                ALLOW
            }
        }
    }

    /// Records in the socket's storage which frontend it asked for and where it went, for
    /// getpeername, recvmsg and the socket's later datagrams. Without storage (the kernel
    /// out of memory) the socket still goes to its backend, it just shows the backend.
    #[inline(always)]
    fn remember(ctx: &SockAddrContext, entry: SocketEntry) {
        // SAFETY: the kernel's socket of this call; the create flag allocates zeroed storage
        // (all entries unused) for a socket that has none.
        let state = unsafe { SOCKETS.get_or_insert_ptr_mut(ctx, None) };
        if !state.is_null() {
            // SAFETY: non-null storage of this socket, valid for the program's run. Another
            // CPU writing the same socket at once (two threads sending on one UDP socket)
            // can at worst mix two entries of that socket, never another socket's.
            unsafe { (*state).remember(entry) };
        }
    }

    #[inline(always)]
    fn choose(ctx: &SockAddrContext, frontend: &ServiceKey, per_datagram: bool) -> Choice {
        // SAFETY: values are plain data copied out at once; a concurrent update can at worst
        // hand us an older or newer entry, which the writer's ordering keeps consistent.
        let Some(master) = (unsafe { SERVICES.get(frontend) }).copied() else {
            // A clusterIP on a port none of its Services has: refused at once, as
            // kube-proxy rejects it, rather than sent toward an address nothing routes.
            return if CLUSTER_IPS.get_ptr(frontend.address).is_some() {
                Choice::Refuse(Reason::UnknownPort)
            } else {
                Choice::NotOurs
            };
        };
        if master.flags & FLAG_HOST_NETNS_ONLY != 0 && !in_host_netns(ctx) {
            return Choice::NotOurs;
        }
        if master.count == 0 {
            return Choice::Refuse(if master.flags & FLAG_NODE_LOCAL != 0 {
                Reason::NoLocalBackends
            } else {
                Reason::NoBackends
            });
        }

        let chosen = if master.affinity_timeout_s != 0 {
            affine_backend(ctx, frontend, &master)
        } else if per_datagram {
            socket_backend(ctx, frontend, &master)
        } else {
            random_backend(frontend, master.count).map(|(id, backend)| (id, backend, false))
        };
        match chosen {
            Some((id, backend, affinity_hit)) => Choice::Backend {
                id,
                backend,
                frontend_id: master.frontend_id,
                affinity_hit,
            },
            None => Choice::Untranslated(Reason::BackendMissing),
        }
    }

    /// A slot drawn at random: the backend's id and where it is.
    #[inline(always)]
    fn random_backend(frontend: &ServiceKey, count: u16) -> Option<(u32, Backend)> {
        // SAFETY: a helper with no arguments.
        let slot = backend_slot(count, unsafe { bpf_get_prandom_u32() })?;
        // SAFETY: as in `choose`.
        let value = (unsafe { SERVICES.get(frontend.with_slot(slot)) })?;
        Some((value.backend_id, value.backend()?))
    }

    /// The client's backend while its affinity holds and the backend is still one of the
    /// frontend's; otherwise a new one. Every connection refreshes the entry, as kube-proxy's
    /// `recent --set` does. The bool says whether the affinity held.
    #[inline(always)]
    fn affine_backend(
        ctx: &SockAddrContext,
        frontend: &ServiceKey,
        master: &ServiceValue,
    ) -> Option<(u32, Backend, bool)> {
        // SAFETY: helpers valid for sock_addr programs, given their context.
        let key = AffinityKey {
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            frontend_id: master.frontend_id,
            _pad: 0,
        };
        // SAFETY: a helper with no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: plain data copied out at once.
        let held = (unsafe { AFFINITY.get(key) }).copied().filter(|entry| {
            affinity_holds(entry.last_used_ns, now, master.affinity_timeout_s)
                && still_a_backend(entry.backend_id, master.frontend_id)
        });
        // SAFETY: as in `choose`.
        let chosen = match held.and_then(|entry| {
            (unsafe { BACKENDS.get(entry.backend_id) }).map(|backend| (entry.backend_id, *backend))
        }) {
            Some((id, backend)) => (id, backend, true),
            None => {
                let (id, backend) = random_backend(frontend, master.count)?;
                (id, backend, false)
            }
        };
        let entry = AffinityValue {
            last_used_ns: now,
            backend_id: chosen.0,
            _pad: 0,
        };
        let _ = AFFINITY.insert(key, entry, 0);
        Some(chosen)
    }

    /// The backend of an unconnected UDP socket's earlier datagrams to this frontend while
    /// it is still one of the frontend's; otherwise a new one, which later datagrams keep.
    #[inline(always)]
    fn socket_backend(
        ctx: &SockAddrContext,
        frontend: &ServiceKey,
        master: &ServiceValue,
    ) -> Option<(u32, Backend, bool)> {
        // SAFETY: the kernel's socket of this call; nothing is allocated here.
        let state = unsafe { SOCKETS.get_ptr_mut(ctx) };
        if !state.is_null() {
            // SAFETY: non-null storage of this socket, valid for the program's run.
            let (family, _) = socket_address(&frontend.address);
            let held = unsafe { &*state }
                .entry_of(family, master.frontend_id)
                .copied();
            if let Some(entry) = held
                && still_a_backend(entry.backend_id, master.frontend_id)
            {
                let backend = Backend::new(
                    socket_address_to_map(entry.family, &entry.backend_address),
                    entry.backend_port,
                );
                return Some((entry.backend_id, backend, false));
            }
        }
        random_backend(frontend, master.count).map(|(id, backend)| (id, backend, false))
    }

    #[inline(always)]
    fn still_a_backend(backend_id: u32, frontend_id: u32) -> bool {
        AFFINITY_MATCH
            .get_ptr(AffinityMatchKey {
                backend_id,
                frontend_id,
            })
            .is_some()
    }

    #[inline(always)]
    fn in_host_netns(ctx: &impl EbpfContext) -> bool {
        let host = CONFIG.get(0).map_or(0, |config| config.host_netns_cookie);
        // SAFETY: a helper valid for sock_addr programs, given their context.
        host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
    }

    /// Shows the frontend where the socket would show the backend it was translated to.
    #[inline(always)]
    fn restore(ctx: &SockAddrContext, field: AddressField, reason: Reason) {
        // SAFETY: the kernel's socket of this call; without the create flag, nothing is
        // allocated for sockets lb never translated.
        let state = unsafe { SOCKETS.get_ptr_mut(ctx) };
        if state.is_null() {
            return;
        }
        // SAFETY: as in `forward`.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        let (family, backend) = socket_address(&field.read(sock_addr));
        // SAFETY: non-null storage of this socket, valid for the program's run.
        let state = unsafe { &*state };
        if let Some(entry) = state.entry_for_backend(family, &backend, sock_addr.user_port as u16) {
            let frontend = socket_address_to_map(entry.family, &entry.frontend_address);
            if field.write(sock_addr, frontend) {
                sock_addr.user_port = u32::from(entry.frontend_port);
                count(reason);
            }
        }
    }

    #[inline(always)]
    fn count(reason: Reason) {
        if let Some(counter) = STATS.get_ptr_mut(reason as u32) {
            // SAFETY: per-CPU slot, and programs do not migrate CPUs while running.
            unsafe { *counter += 1 };
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any path that could reach here.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // This crate only has meaning for the BPF target; lb-userspace's build.rs builds it there.
}
