//! lb's datapath: socket-level load balancing for Kubernetes Services.
//!
//! The translation happens once per socket, at the syscall, so there is no per-packet NAT and
//! no conntrack:
//! - `cgroup/connect4` rewrites a connect() to a frontend (VIP:port/protocol) into a connect()
//!   to one of its backends (TCP, and connected UDP);
//! - `cgroup/sendmsg4` does the same for each unconnected UDP sendmsg(), keeping a socket on
//!   the backend of its first datagram to a frontend while that backend stays;
//! - `cgroup/recvmsg4` and `cgroup/getpeername4` show the frontend again where the
//!   application would otherwise see the backend, using the reverse map the first two fill.
//!
//! Anything the maps do not know is left exactly as it was; the programs never fail a
//! syscall they do not own.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        EbpfContext as _,
        helpers::{
            bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
            bpf_set_retval,
        },
        macros::{cgroup_sock_addr, map},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::SockAddrContext,
    };
    use lb_common::{
        AFFINITY_MAP_CAPACITY, AFFINITY_MATCH_MAP_CAPACITY, AffinityKey, AffinityMatchKey,
        AffinityValue, BACKEND_MAP_CAPACITY, Backend, Config, ERRNO_NO_BACKENDS,
        FLAG_HOST_NETNS_ONLY, FLAG_NODE_LOCAL, MASTER_SLOT, REVNAT_MAP_CAPACITY, Reason, RevNatKey,
        RevNatValue, SERVICE_MAP_CAPACITY, ServiceKey, ServiceValue, UDP_SOCKET_MAP_CAPACITY,
        UdpSocketKey, affinity_holds, backend_slot,
    };

    /// Verdict that lets the syscall proceed (with whatever address we left in the context).
    const ALLOW: i32 = 1;
    /// Verdict that fails the syscall with the errno set by `bpf_set_retval`.
    const REJECT: i32 = 0;

    #[map(name = "lb4_svc_v2")]
    static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICE_MAP_CAPACITY, 0);

    #[map(name = "lb4_backend_v1")]
    static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKEND_MAP_CAPACITY, 0);

    #[map(name = "lb4_revnat_v1")]
    static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(REVNAT_MAP_CAPACITY, 0);

    #[map(name = "lb4_affinity_v1")]
    static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
        LruHashMap::pinned(AFFINITY_MAP_CAPACITY, 0);

    #[map(name = "lb4_affmatch_v1")]
    static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32> =
        HashMap::pinned(AFFINITY_MATCH_MAP_CAPACITY, 0);

    #[map(name = "lb4_udpsock_v1")]
    static UDP_SOCKETS: LruHashMap<UdpSocketKey, u32> =
        LruHashMap::pinned(UDP_SOCKET_MAP_CAPACITY, 0);

    #[map(name = "lb_config_v1")]
    static CONFIG: Array<Config> = Array::pinned(1, 0);

    #[map(name = "lb_stats_v2")]
    static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        forward(&ctx, Reason::ConnectTranslated, false)
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
        forward(&ctx, Reason::SendmsgTranslated, true)
    }

    #[cgroup_sock_addr(recvmsg4)]
    pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
        restore(&ctx, Reason::RecvmsgRestored);
        // recvmsg hooks must allow: the datagram has already arrived.
        ALLOW
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn getpeername4(ctx: SockAddrContext) -> i32 {
        restore(&ctx, Reason::PeernameRestored);
        ALLOW
    }

    /// What to do with a connect()/sendmsg() destination.
    enum Choice {
        /// Not a frontend (for this socket): leave it alone.
        NotOurs,
        /// Rewrite to this backend.
        Backend {
            backend: Backend,
            affinity_hit: bool,
        },
        /// A frontend with no usable backend: fail the syscall at once.
        Refuse(Reason),
        /// A frontend whose backend could not be resolved: leave it alone, count why.
        Untranslated(Reason),
    }

    /// `per_datagram`: the call is one unconnected sendmsg() of many a socket may make.
    #[inline(always)]
    fn forward(ctx: &SockAddrContext, translated: Reason, per_datagram: bool) -> i32 {
        // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        // The kernel keeps the network-order port in the low 16 bits of `user_port`.
        let frontend = ServiceKey::new(
            sock_addr.user_ip4,
            sock_addr.user_port as u16,
            sock_addr.protocol as u8,
            MASTER_SLOT,
        );
        match choose(ctx, &frontend, per_datagram) {
            Choice::NotOurs => ALLOW,
            Choice::Backend {
                backend,
                affinity_hit,
            } => {
                sock_addr.user_ip4 = backend.address;
                sock_addr.user_port = u32::from(backend.port);
                // SAFETY: a helper valid for sock_addr programs, given their context.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let reverse = RevNatValue {
                    address: frontend.address,
                    port: frontend.port,
                    _pad: [0; 2],
                };
                // LRU: a full map evicts the oldest socket's entry rather than failing.
                let _ = REVNAT.insert(
                    RevNatKey::new(cookie, backend.address, backend.port),
                    reverse,
                    0,
                );
                count(translated);
                if affinity_hit {
                    count(Reason::AffinityHit);
                }
                ALLOW
            }
            Choice::Refuse(reason) => {
                count(reason);
                // SAFETY: a helper valid for connect4/sendmsg4; the errno is negated, as the
                // kernel expects.
                unsafe { bpf_set_retval(-ERRNO_NO_BACKENDS) };
                REJECT
            }
            Choice::Untranslated(reason) => {
                count(reason);
                ALLOW
            }
        }
    }

    #[inline(always)]
    fn choose(ctx: &SockAddrContext, frontend: &ServiceKey, per_datagram: bool) -> Choice {
        // SAFETY: values are plain data copied out at once; a concurrent update can at worst
        // hand us an older or newer entry, which the writer's ordering keeps consistent.
        let Some(master) = (unsafe { SERVICES.get(frontend) }).copied() else {
            return Choice::NotOurs;
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

        let mut affinity_hit = false;
        let backend_id = if master.affinity_timeout_s == 0 {
            let chosen = if per_datagram {
                socket_backend(ctx, frontend, &master)
            } else {
                random_backend(frontend, master.count)
            };
            match chosen {
                Some(id) => id,
                None => return Choice::Untranslated(Reason::BackendMissing),
            }
        } else {
            // SAFETY: helpers valid for sock_addr programs, given their context.
            let key = AffinityKey {
                netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                frontend_id: master.frontend_id,
                _pad: 0,
            };
            // SAFETY: a helper with no arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let held = (unsafe { AFFINITY.get(key) }).copied().filter(|entry| {
                affinity_holds(entry.last_used_ns, now, master.affinity_timeout_s)
                    && still_a_backend(entry.backend_id, master.frontend_id)
            });
            let id = match held {
                Some(entry) => {
                    affinity_hit = true;
                    entry.backend_id
                }
                None => match random_backend(frontend, master.count) {
                    Some(id) => id,
                    None => return Choice::Untranslated(Reason::BackendMissing),
                },
            };
            // Every connection refreshes the entry, as kube-proxy's `recent --set` does.
            let entry = AffinityValue {
                last_used_ns: now,
                backend_id: id,
                _pad: 0,
            };
            let _ = AFFINITY.insert(key, entry, 0);
            id
        };

        // SAFETY: as above.
        match (unsafe { BACKENDS.get(backend_id) }).copied() {
            Some(backend) => Choice::Backend {
                backend,
                affinity_hit,
            },
            None => Choice::Untranslated(Reason::BackendMissing),
        }
    }

    #[inline(always)]
    fn random_backend(frontend: &ServiceKey, count: u16) -> Option<u32> {
        // SAFETY: a helper with no arguments.
        let slot = backend_slot(count, unsafe { bpf_get_prandom_u32() })?;
        // SAFETY: as in `choose`.
        (unsafe { SERVICES.get(frontend.with_slot(slot)) }).map(|slot| slot.backend_id)
    }

    /// The backend of an unconnected UDP socket's earlier datagrams to this frontend while
    /// it is still one of the frontend's; otherwise a new one, which later datagrams keep.
    #[inline(always)]
    fn socket_backend(
        ctx: &SockAddrContext,
        frontend: &ServiceKey,
        master: &ServiceValue,
    ) -> Option<u32> {
        let key = UdpSocketKey {
            // SAFETY: a helper valid for sock_addr programs, given their context.
            socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            frontend_id: master.frontend_id,
            _pad: 0,
        };
        // SAFETY: plain data copied out at once.
        let held = (unsafe { UDP_SOCKETS.get(key) })
            .copied()
            .filter(|id| still_a_backend(*id, master.frontend_id));
        if held.is_some() {
            return held;
        }
        let id = random_backend(frontend, master.count)?;
        // LRU: a full map evicts the least recently used socket's entry.
        let _ = UDP_SOCKETS.insert(key, id, 0);
        Some(id)
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
    fn in_host_netns(ctx: &SockAddrContext) -> bool {
        let host = CONFIG.get(0).map_or(0, |config| config.host_netns_cookie);
        // SAFETY: a helper valid for sock_addr programs, given their context.
        host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == host
    }

    /// Shows the frontend where the socket would show the backend it was translated to.
    #[inline(always)]
    fn restore(ctx: &SockAddrContext, reason: Reason) {
        // SAFETY: as in `forward`.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        // SAFETY: a helper valid for sock_addr programs, given their context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = RevNatKey::new(cookie, sock_addr.user_ip4, sock_addr.user_port as u16);
        // SAFETY: plain data copied out at once.
        if let Some(frontend) = (unsafe { REVNAT.get(key) }).copied() {
            sock_addr.user_ip4 = frontend.address;
            sock_addr.user_port = u32::from(frontend.port);
            count(reason);
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
