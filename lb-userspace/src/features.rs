//! What this kernel offers lb, probed at start (logged once) and by `lb status`: the
//! features the datapath needs (it does not load without them), and the optional ones,
//! each with what goes without it.
//!
//! Kernel facilities are found by name in the kernel's own BTF (`/sys/kernel/btf/vmlinux`,
//! whose string table holds every helper id, map type, attach type and kfunc name) where
//! a try would need a program; the rest by trying the syscall with arguments that cannot
//! succeed (a missing facility answers ENOSYS or EOPNOTSUPP, a present one another error).

use std::os::fd::{FromRawFd as _, OwnedFd};

use serde::Serialize;

/// The features stale-socket termination needs, by name.
const SOCK_DESTROY: &str = "sock_diag SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY)";
/// See [`SOCK_DESTROY`].
const PIDFD_GETFD: &str = "pidfd_getfd (Linux 5.6)";

/// The kernel's BTF, where it has one (CONFIG_DEBUG_INFO_BTF).
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// One facility and whether this kernel has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// `None` when it could not be told (no kernel BTF).
    pub available: Option<bool>,
    /// Whether the datapath loads without it.
    pub required: bool,
    /// What it is for, and what happens without it.
    pub used_for: &'static str,
}

/// Names a kernel's BTF holds when it has the facility: a NUL-delimited string in the
/// string table, so that a longer name that contains it does not count.
fn in_btf(btf: &[u8], name: &str) -> bool {
    let needle = [b"\0", name.as_bytes(), b"\0"].concat();
    memchr::memmem::find(btf, &needle).is_some()
}

/// Whether this process can open an AF_INET6 socket (IPv6 not disabled at boot).
fn ipv6_sockets() -> bool {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet6,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .is_ok()
}

/// Whether `pidfd_getfd` exists (Linux 5.6): on a descriptor that is no pidfd it fails
/// with EBADF, where a kernel without it says ENOSYS.
fn pidfd_getfd() -> bool {
    // SAFETY: the syscall takes three integers; -1 is no descriptor, so nothing is made.
    let result = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0) };
    if result >= 0 {
        // SAFETY: a descriptor the call returned, owned by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(result).unwrap_or(-1)) });
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

/// Whether sock_diag can destroy sockets (CONFIG_INET_DIAG_DESTROY): asked to destroy a
/// UDP socket that does not exist, it says ENOENT; without it, EOPNOTSUPP.
fn sock_destroy() -> bool {
    crate::sockets::destroy_supported().unwrap_or(false)
}

/// Every facility lb uses, probed.
pub fn probe() -> Vec<Feature> {
    let btf = std::fs::read(VMLINUX_BTF).ok();
    let named = |name: &str| btf.as_deref().map(|btf| in_btf(btf, name));
    vec![
        Feature {
            name: "bpf_set_retval (Linux 5.18)",
            available: named("BPF_FUNC_set_retval"),
            required: true,
            used_for: "refusing a connect with ECONNREFUSED and a host bind with EADDRINUSE",
        },
        Feature {
            name: "socket storage (Linux 5.2)",
            available: named("BPF_MAP_TYPE_SK_STORAGE"),
            required: true,
            used_for: "what a translated socket shows on getpeername and recvmsg",
        },
        Feature {
            name: "cgroup getpeername hooks (Linux 5.8)",
            available: named("BPF_CGROUP_INET4_GETPEERNAME"),
            required: true,
            used_for: "the Service address on getpeername",
        },
        Feature {
            name: "IPv6 sockets",
            available: Some(ipv6_sockets()),
            required: false,
            used_for: "IPv6 Services, and AF_INET6 sockets reaching IPv4 Services through v4-mapped addresses",
        },
        Feature {
            name: SOCK_DESTROY,
            available: Some(sock_destroy()),
            required: false,
            used_for: "terminating connected sockets whose backend left; without it they wait for their own timeouts",
        },
        Feature {
            name: PIDFD_GETFD,
            available: Some(pidfd_getfd()),
            required: false,
            used_for: "reading a UDP socket's storage to tell whether lb translated it, before terminating it",
        },
        Feature {
            name: "bpf_sock_destroy kfunc (Linux 6.5)",
            available: named("bpf_sock_destroy"),
            required: false,
            used_for: "not used: aya 0.14 cannot call kfuncs; sock_diag SOCK_DESTROY does the same from user space",
        },
    ]
}

/// Whether the features stale-socket termination needs are all there.
pub fn can_terminate_sockets(features: &[Feature]) -> bool {
    features
        .iter()
        .filter(|f| [SOCK_DESTROY, PIDFD_GETFD].contains(&f.name))
        .all(|f| f.available == Some(true))
}

/// Logs the probe once: one line for what is there, one per optional feature missing.
pub fn log(features: &[Feature]) {
    let present: Vec<&str> = features
        .iter()
        .filter(|f| f.available == Some(true))
        .map(|f| f.name)
        .collect();
    tracing::info!(present = ?present, "kernel features");
    for feature in features.iter().filter(|f| f.available != Some(true)) {
        let state = match feature.available {
            Some(_) => "missing",
            None => "unknown (no kernel BTF)",
        };
        tracing::warn!("{}: {state}; it is for {}", feature.name, feature.used_for);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_count_only_whole() {
        let btf = b"\0BPF_FUNC_set_retval\0bpf_sock_destroy_all\0BPF_MAP_TYPE_SK_STORAGE\0";
        assert!(in_btf(btf, "BPF_FUNC_set_retval"));
        assert!(in_btf(btf, "BPF_MAP_TYPE_SK_STORAGE"));
        assert!(!in_btf(btf, "bpf_sock_destroy"));
        assert!(!in_btf(btf, "set_retval"));
    }

    #[test]
    fn termination_needs_both_of_its_features() {
        let feature = |name, available| Feature {
            name,
            available,
            required: false,
            used_for: "",
        };
        let both = [
            feature(SOCK_DESTROY, Some(true)),
            feature(PIDFD_GETFD, Some(true)),
            feature("IPv6 sockets", Some(false)),
        ];
        assert!(can_terminate_sockets(&both));
        let one = [
            feature(SOCK_DESTROY, Some(false)),
            feature(PIDFD_GETFD, Some(true)),
        ];
        assert!(!can_terminate_sockets(&one));
    }
}
