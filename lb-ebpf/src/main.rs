//! lb's datapath: socket-level load balancing for Kubernetes Services.
//!
//! `cgroup/connect4` rewrites a connect() to a Service frontend (VIP:port/protocol) into a
//! connect() to one of its backends, once per socket: no per-packet NAT, no conntrack.
//! Anything the maps do not know is left exactly as it was; the program never fails a
//! connect it does not own.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        helpers::bpf_get_prandom_u32,
        macros::{cgroup_sock_addr, map},
        maps::{HashMap, PerCpuArray},
        programs::SockAddrContext,
    };
    use lb_common::{
        BACKEND_MAP_CAPACITY, Backend, MASTER_SLOT, Reason, SERVICE_MAP_CAPACITY, ServiceKey,
        ServiceValue, backend_slot,
    };

    /// Verdict that lets the syscall proceed (with whatever address we left in the context).
    const ALLOW: i32 = 1;

    #[map(name = "lb4_svc_v1")]
    static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICE_MAP_CAPACITY, 0);

    #[map(name = "lb4_backend_v1")]
    static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKEND_MAP_CAPACITY, 0);

    #[map(name = "lb_stats_v1")]
    static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        if let Some(reason) = translate(&ctx) {
            count(reason);
        }
        ALLOW
    }

    /// Rewrites the destination if it is a frontend; `None` for destinations we do not own.
    #[inline(always)]
    fn translate(ctx: &SockAddrContext) -> Option<Reason> {
        // SAFETY: the kernel passes a valid `bpf_sock_addr` for the program's lifetime.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        // The kernel keeps the network-order port in the low 16 bits of `user_port`.
        let frontend = ServiceKey::new(
            sock_addr.user_ip4,
            sock_addr.user_port as u16,
            sock_addr.protocol as u8,
            MASTER_SLOT,
        );
        // SAFETY: values are plain data copied out at once; a concurrent update can at worst
        // hand us an older or newer count, which the writer ordering makes safe.
        let master = unsafe { SERVICES.get(&frontend) }?;
        // SAFETY: a helper with no arguments and no preconditions.
        let entropy = unsafe { bpf_get_prandom_u32() };
        let Some(slot) = backend_slot(master.count, entropy) else {
            return Some(Reason::NoBackends);
        };
        // SAFETY: as above.
        let Some(slot) = (unsafe { SERVICES.get(&frontend.with_slot(slot)) }) else {
            return Some(Reason::BackendMissing);
        };
        // SAFETY: as above.
        let Some(backend) = (unsafe { BACKENDS.get(&slot.backend_id) }) else {
            return Some(Reason::BackendMissing);
        };
        sock_addr.user_ip4 = backend.address;
        sock_addr.user_port = u32::from(backend.port);
        Some(Reason::Translated)
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
