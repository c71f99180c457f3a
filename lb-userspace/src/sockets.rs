//! Sockets stuck on a backend that left: terminated, so that the application sees an error
//! at once and its next socket reaches a live backend.
//!
//! A connected UDP socket is translated once, at connect(): when its backend stops being
//! one of the frontend's (pod deleted, not ready, Service removed), its datagrams go on
//! toward a dead address and a client such as a DNS resolver waits for timeouts
//! (cilium#27300). The agent finds, in every network namespace of the processes in the
//! cgroup the programs serve, the connected sockets whose own storage (`SocketState`)
//! says lb sent them to a backend the maps no longer give that frontend, and that are
//! still connected there, and destroys them with sock_diag's SOCK_DESTROY: the
//! application's next call fails (ECONNABORTED), and a socket lb never translated —
//! another program's, to the same pod address — is never touched. TCP connections are
//! left alone unless asked (`--terminate-tcp`), as kube-proxy leaves them.
//!
//! How a socket's storage is read: sock_diag lists the connected sockets of a namespace
//! with their inode, the owning process's `/proc/PID/fd` finds the descriptor, and
//! `pidfd_getfd` (Linux 5.6) lends the agent a copy, by which the storage map is looked
//! up. (sock_diag dumps BPF storage itself only for TCP, not UDP sockets.) SOCK_DESTROY
//! needs `CONFIG_INET_DIAG_DESTROY`. The kernel's own `bpf_sock_destroy` from a socket
//! iterator (6.5) would do all of it in the kernel, but aya 0.14 can neither declare
//! iterator programs nor relocate kfunc calls.

use std::{
    collections::{BTreeSet, HashMap},
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use bytemuck::{Pod, Zeroable};
use lb_common::{
    MapAddress, SocketEntry, SocketState, ip_to_map, mapped_ipv4, port_to_map, socket_address,
};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use crate::{
    model::BackendAddr,
    netns::{self, NetnsError},
    plan::{BackendId, FrontendId, Programmed},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// `TCP_ESTABLISHED`: a connected UDP socket's state too.
const ESTABLISHED: u32 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listing the processes of cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sock_diag in {netns}: {source}")]
    Diag { netns: PathBuf, source: nix::Error },
    #[error("sock_diag in {netns}: a malformed reply")]
    Malformed { netns: PathBuf },
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct InetDiagSockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<InetDiagSockId>() == 48);
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);
const _: () = assert!(size_of::<InetDiagMsg>() == 72);

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink message: a header, then `body`.
fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = size_of::<NlMsgHdr>() + align4(body.len());
    let header = NlMsgHdr {
        len: u32::try_from(len).unwrap_or(u32::MAX),
        kind,
        flags,
        seq: 1,
        pid: 0,
    };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(bytemuck::bytes_of(&header));
    out.extend_from_slice(body);
    out.resize(len, 0);
    out
}

/// The dump request for the connected sockets of `family` and `protocol`.
fn dump_request(family: u8, protocol: u8) -> Vec<u8> {
    let request = InetDiagReqV2 {
        family,
        protocol,
        states: 1 << ESTABLISHED,
        ..InetDiagReqV2::default()
    };
    message(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        bytemuck::bytes_of(&request),
    )
}

/// A socket sock_diag listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Listed {
    family: u8,
    id: InetDiagSockId,
    inode: u32,
}

/// The sockets in one reply datagram; `Ok(true)` once the dump is done (or the request
/// acknowledged), `Err` with the kernel's errno, or `None` for a malformed reply.
fn parse_reply(datagram: &[u8], sockets: &mut Vec<Listed>) -> Result<bool, Option<i32>> {
    let mut rest = datagram;
    while rest.len() >= size_of::<NlMsgHdr>() {
        let header: NlMsgHdr = bytemuck::pod_read_unaligned(&rest[..size_of::<NlMsgHdr>()]);
        let len = usize::try_from(header.len).map_err(|_| None)?;
        let body = rest.get(size_of::<NlMsgHdr>()..len).ok_or(None)?;
        match header.kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or(None)?;
                return if errno == 0 {
                    Ok(true)
                } else {
                    Err(Some(-errno))
                };
            }
            SOCK_DIAG_BY_FAMILY => {
                let msg: InetDiagMsg =
                    bytemuck::pod_read_unaligned(body.get(..size_of::<InetDiagMsg>()).ok_or(None)?);
                sockets.push(Listed {
                    family: msg.family,
                    id: msg.id,
                    inode: msg.inode,
                });
            }
            _ => {}
        }
        rest = rest.get(align4(len)..).unwrap_or_default();
    }
    Ok(false)
}

/// What the maps give each frontend now: its backends' ids and addresses, by frontend id;
/// and every backend address in use, by (address, port) in the maps' byte order.
struct LiveBackends(
    HashMap<FrontendId, Vec<(BackendId, BackendAddr)>>,
    std::collections::HashSet<(MapAddress, u16)>,
);

impl LiveBackends {
    fn of(programmed: &Programmed) -> Self {
        Self(
            programmed
                .frontends
                .values()
                .map(|frontend| {
                    let backends = frontend
                        .slots
                        .iter()
                        .filter_map(|id| programmed.backends.get(id).map(|addr| (*id, *addr)))
                        .collect();
                    (frontend.id, backends)
                })
                .collect(),
            programmed
                .backends
                .values()
                .map(|addr| (ip_to_map(addr.address), port_to_map(addr.port)))
                .collect(),
        )
    }

    /// Whether a socket connected to `peer:port` (maps' byte order) may be one lb sent to
    /// a backend that left: only a socket connected to no backend in use is looked at
    /// closer. Borrowing another process's socket (pidfd_getfd) is not without effects
    /// (cgroup v1 net_cls and net_prio tags follow the borrower), so sockets to live pods,
    /// whoever made them, are never borrowed. (A pod that left one Service but still backs
    /// another keeps its sockets: the price of that.)
    fn may_be_stale(&self, peer: MapAddress, port: u16) -> bool {
        !self.1.contains(&(peer, port))
    }

    /// Whether `entry`'s backend is still one of its frontend's (the same id at the same
    /// address: ids of backends that left may name others later).
    fn holds(&self, entry: &SocketEntry) -> bool {
        self.0.get(&entry.frontend_id).is_some_and(|backends| {
            backends.iter().any(|(id, addr)| {
                *id == entry.backend_id
                    && socket_address(&ip_to_map(addr.address))
                        == (entry.family, entry.backend_address)
                    && port_to_map(addr.port) == entry.backend_port
            })
        })
    }
}

/// The entry lb translated a listed socket by (its storage is `state`), if the socket is
/// connected to that entry's backend and the backend is no longer the frontend's — nor
/// that of any other frontend the socket has an entry for with the same backend (a socket
/// that reached one pod through two Services stays while one of them still has it).
fn stale_entry(socket: &Listed, state: &SocketState, live: &LiveBackends) -> Option<SocketEntry> {
    let (family, peer) = socket_address(&peer_of(socket)?);
    let mut matching = state.entries.iter().filter(|entry| {
        entry.family == family
            && entry.backend_address == peer
            && entry.backend_port == socket.id.dport
    });
    let first = matching.clone().next().copied()?;
    matching.all(|entry| !live.holds(entry)).then_some(first)
}

/// The address a listed socket is connected to, as the maps hold it.
fn peer_of(socket: &Listed) -> Option<MapAddress> {
    match socket.family {
        AF_INET => Some(mapped_ipv4(socket.id.dst[0])),
        AF_INET6 => Some(socket.id.dst),
        _ => None,
    }
}

/// How many sockets [`terminate_stale`] destroyed, by protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Terminated {
    pub udp: u64,
    pub tcp: u64,
}

/// Destroys, in every network namespace of the processes in `cgroup` (and below), the
/// connected sockets lb translated to a backend `programmed` no longer gives their
/// frontend: UDP, and TCP with `tcp`. `storage` is the socket storage map.
pub fn terminate_stale(
    cgroup: &Path,
    storage: BorrowedFd<'_>,
    programmed: &Programmed,
    tcp: bool,
) -> Result<Terminated, SocketsError> {
    // Indexed only when a namespace has a connected socket to look at.
    let live = std::sync::LazyLock::new(|| LiveBackends::of(programmed));
    let live = &live;
    let mut terminated = Terminated::default();
    for (netns, pids) in namespaces_of(cgroup)? {
        let pids = &pids;
        let counts = netns::inside(&netns, || {
            Ok(terminate_in(&netns, pids, storage, live, tcp))
        })??;
        terminated.udp += counts.udp;
        terminated.tcp += counts.tcp;
    }
    Ok(terminated)
}

/// [`terminate_stale`] in the network namespace of this thread, whose sockets belong to
/// `pids` (of the cgroup; others' sockets are not lb's to end).
fn terminate_in(
    netns: &Path,
    pids: &[u32],
    storage: BorrowedFd<'_>,
    live: &std::sync::LazyLock<LiveBackends, impl FnOnce() -> LiveBackends + Send>,
    tcp: bool,
) -> Result<Terminated, SocketsError> {
    let diag = |source| SocketsError::Diag {
        netns: netns.into(),
        source,
    };
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(diag)?;
    let protocols: &[u8] = if tcp {
        &[IPPROTO_UDP, IPPROTO_TCP]
    } else {
        &[IPPROTO_UDP]
    };
    let mut listed = Vec::new();
    for &protocol in protocols {
        for family in [AF_INET, AF_INET6] {
            let mut sockets = Vec::new();
            exchange(
                &socket,
                netns,
                &dump_request(family, protocol),
                &mut sockets,
            )?;
            listed.extend(sockets.into_iter().map(|s| (protocol, s)));
        }
    }
    if listed.is_empty() {
        return Ok(Terminated::default());
    }
    listed.retain(|(_, listed)| {
        peer_of(listed).is_some_and(|peer| live.may_be_stale(peer, listed.id.dport))
    });
    if listed.is_empty() {
        return Ok(Terminated::default());
    }
    let mut owners = owners(pids, listed.iter().map(|(_, s)| s.inode).collect());
    let mut terminated = Terminated::default();
    for (protocol, listed) in listed {
        let Some(state) = owners
            .remove(&listed.inode)
            .and_then(|(pid, fd)| storage_of(storage, pid, fd, listed.inode))
        else {
            continue;
        };
        if stale_entry(&listed, &state, live).is_none() {
            continue;
        }
        let request = InetDiagReqV2 {
            family: listed.family,
            protocol,
            states: u32::MAX,
            id: listed.id,
            ..InetDiagReqV2::default()
        };
        let destroy = message(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            bytemuck::bytes_of(&request),
        );
        match exchange(&socket, netns, &destroy, &mut Vec::new()) {
            Ok(()) if protocol == IPPROTO_TCP => terminated.tcp += 1,
            Ok(()) => terminated.udp += 1,
            // Closed meanwhile: nothing left to terminate.
            Err(SocketsError::Diag {
                source: nix::Error::ENOENT,
                ..
            }) => {}
            // One socket that cannot be destroyed does not keep the others.
            Err(e) => tracing::warn!("destroying a socket connected to a backend that left: {e}"),
        }
    }
    Ok(terminated)
}

/// Whether sock_diag can destroy sockets here (CONFIG_INET_DIAG_DESTROY): asked to destroy
/// a UDP socket that does not exist, it answers ENOENT, and EOPNOTSUPP without it.
pub fn destroy_supported() -> Result<bool, SocketsError> {
    let netns = PathBuf::from("/proc/self/ns/net");
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|source| SocketsError::Diag {
        netns: netns.clone(),
        source,
    })?;
    let nobody = InetDiagReqV2 {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        states: u32::MAX,
        ..InetDiagReqV2::default()
    };
    let request = message(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        bytemuck::bytes_of(&nobody),
    );
    match exchange(&socket, &netns, &request, &mut Vec::new()) {
        Ok(())
        | Err(SocketsError::Diag {
            source: nix::Error::ENOENT,
            ..
        }) => Ok(true),
        Err(SocketsError::Diag {
            source: nix::Error::EOPNOTSUPP,
            ..
        }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sends `request` and reads replies until the kernel is done (or acknowledges).
fn exchange(
    socket: &OwnedFd,
    netns: &Path,
    request: &[u8],
    listed: &mut Vec<Listed>,
) -> Result<(), SocketsError> {
    let diag = |source| SocketsError::Diag {
        netns: netns.into(),
        source,
    };
    sendto(
        socket.as_raw_fd(),
        request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(diag)?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = recv(socket.as_raw_fd(), &mut buffer, MsgFlags::empty()).map_err(diag)?;
        match parse_reply(buffer.get(..n).unwrap_or_default(), listed) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(Some(errno)) => return Err(diag(nix::Error::from_raw(errno))),
            Err(None) => {
                return Err(SocketsError::Malformed {
                    netns: netns.into(),
                });
            }
        }
    }
}

/// The process and descriptor that hold each socket inode of `inodes`, among `pids`.
fn owners(pids: &[u32], mut inodes: BTreeSet<u32>) -> HashMap<u32, (u32, i32)> {
    let mut owners = HashMap::new();
    for pid in pids {
        if inodes.is_empty() {
            break;
        }
        // A process that exited meanwhile holds nothing.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok());
            let number = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            if let (Some(inode), Some(number)) = (inode, number)
                && inodes.remove(&inode)
            {
                owners.insert(inode, (*pid, number));
            }
        }
    }
    owners
}

/// lb's storage of the socket that process `pid` holds as descriptor `fd`, looked up by a
/// copy of that descriptor; `None` if it has none, or the process or descriptor is gone —
/// or now names another socket than `inode` (the number was reused since it was read).
fn storage_of(storage: BorrowedFd<'_>, pid: u32, fd: i32, inode: u32) -> Option<SocketState> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = i32::try_from(pidfd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number of that process and flags,
    // and returns a new descriptor (a copy of that one) or -1.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    let copy = i32::try_from(copy).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: as above.
    let copy = unsafe { OwnedFd::from_raw_fd(copy) };
    let same = nix::sys::stat::fstat(&copy).is_ok_and(|st| st.st_ino == u64::from(inode));
    if !same {
        return None;
    }
    // The socket storage map's key is a socket's descriptor.
    crate::maps::bpf::lookup_one::<i32, SocketState>(storage, &copy.as_raw_fd())
        .ok()
        .flatten()
}

/// The network namespaces the processes of `cgroup` and its descendants are in, each with
/// one path to it and the processes in it: only their sockets can have been translated.
fn namespaces_of(cgroup: &Path) -> Result<Vec<(PathBuf, Vec<u32>)>, SocketsError> {
    let mut namespaces: Vec<(PathBuf, Vec<u32>)> = Vec::new();
    let mut index: HashMap<(u64, u64), usize> = HashMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let error = |source| SocketsError::Cgroup {
            path: dir.clone(),
            source,
        };
        let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(procs) => procs,
            // Removed meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(error(e)),
        };
        for pid in procs.lines().filter_map(|l| l.parse::<u32>().ok()) {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // A process that exited meanwhile has no namespace to look in.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            match index.entry((meta.dev(), meta.ino())) {
                std::collections::hash_map::Entry::Occupied(at) => {
                    namespaces[*at.get()].1.push(pid);
                }
                std::collections::hash_map::Entry::Vacant(at) => {
                    at.insert(namespaces.len());
                    namespaces.push((path, vec![pid]));
                }
            }
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(error(e)),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    Ok(namespaces)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use lb_common::{Backend, ServiceKey, ipv4_to_map};

    use super::*;
    use crate::{model::Protocol, plan::ProgrammedFrontend};

    fn addr(ip: [u8; 4], port: u16) -> BackendAddr {
        BackendAddr {
            address: IpAddr::from(ip),
            port,
        }
    }

    /// Frontend 7 (`address`:53/UDP) whose one slot is backend 1, with `backends` in the
    /// backend map.
    fn programmed_on(address: IpAddr, backends: &[(u32, BackendAddr)]) -> Programmed {
        let frontend = crate::model::Frontend {
            address,
            port: 53,
            protocol: Protocol::Udp,
        };
        Programmed::new(
            [(
                frontend,
                ProgrammedFrontend {
                    id: 7,
                    slots: vec![1],
                    ..ProgrammedFrontend::default()
                },
            )]
            .into(),
            backends.iter().copied().collect(),
            BTreeSet::new(),
        )
    }

    /// Frontend 7 (10.96.0.10:53) with backend 1 (10.244.0.10:5353).
    fn programmed() -> Programmed {
        programmed_on(
            IpAddr::from([10, 96, 0, 10]),
            &[
                (1, addr([10, 244, 0, 10], 5353)),
                (2, addr([10, 244, 0, 11], 5353)),
            ],
        )
    }

    fn entry(backend_id: u32, backend: [u8; 4]) -> SocketEntry {
        let vip = ip_to_map(IpAddr::from([10, 96, 0, 10]));
        let frontend = ServiceKey::new(vip, port_to_map(53), 17, 0);
        SocketEntry::new(
            &frontend,
            7,
            backend_id,
            &Backend::new(ip_to_map(IpAddr::from(backend)), port_to_map(5353)),
        )
    }

    fn listed(family: u8, dst: [u32; 4]) -> Listed {
        Listed {
            family,
            id: InetDiagSockId {
                dport: port_to_map(5353),
                dst,
                ..InetDiagSockId::default()
            },
            inode: 1,
        }
    }

    fn state(entry: SocketEntry) -> SocketState {
        let mut state = SocketState::zeroed();
        state.remember(entry);
        state
    }

    #[test]
    fn only_sockets_lb_sent_to_a_backend_that_left_are_stale() {
        let live = LiveBackends::of(&programmed());
        let gone = [ipv4_to_map([10, 244, 0, 11]), 0, 0, 0];
        let held = [ipv4_to_map([10, 244, 0, 10]), 0, 0, 0];
        let to_gone = state(entry(2, [10, 244, 0, 11]));
        let to_held = state(entry(1, [10, 244, 0, 10]));
        // Sent to backend 2, which frontend 7 no longer has: stale, also through a
        // v4-mapped AF_INET6 socket.
        assert!(stale_entry(&listed(AF_INET, gone), &to_gone, &live).is_some());
        let mapped = listed(AF_INET6, mapped_ipv4(gone[0]));
        assert!(stale_entry(&mapped, &to_gone, &live).is_some());
        // Its backend is still the frontend's.
        assert!(stale_entry(&listed(AF_INET, held), &to_held, &live).is_none());
        // The same id, now at another address: the id was reused, the backend left.
        let reused = state(entry(1, [10, 244, 0, 11]));
        assert!(stale_entry(&listed(AF_INET, gone), &reused, &live).is_some());
        // A socket with no entry of lb's (storage of another frontend family, or none).
        assert!(stale_entry(&listed(AF_INET, gone), &SocketState::zeroed(), &live).is_none());
        // Connected elsewhere since (a later connect() of its own).
        assert!(stale_entry(&listed(AF_INET, held), &to_gone, &live).is_none());
        // The same pod reached through a second frontend that still has it: kept.
        let mut through_two = to_gone;
        through_two.remember(SocketEntry {
            frontend_id: 9,
            ..entry(2, [10, 244, 0, 11])
        });
        let live_for_9 = LiveBackends(
            [(9, vec![(2, addr([10, 244, 0, 11], 5353))])].into(),
            std::collections::HashSet::new(),
        );
        assert!(stale_entry(&listed(AF_INET, gone), &through_two, &live_for_9).is_none());
        // Only sockets to no backend in use are looked at closer.
        assert!(!live.may_be_stale(mapped_ipv4(gone[0]), port_to_map(5353)));
        let unknown = ip_to_map(IpAddr::from([10, 244, 0, 99]));
        assert!(live.may_be_stale(unknown, port_to_map(5353)));
    }

    #[test]
    fn an_ipv6_socket_to_an_ipv6_backend_that_left_is_stale() {
        let vip: IpAddr = "fd00:96::10".parse().unwrap();
        let backend = |last: u16| BackendAddr {
            address: IpAddr::from([0xfd00, 0x244, 0, 0, 0, 0, 0, last]),
            port: 5353,
        };
        let live = LiveBackends::of(&programmed_on(vip, &[(1, backend(10))]));
        let key = ServiceKey::new(ip_to_map(vip), port_to_map(53), 17, 0);
        let sent_to = |id, addr: BackendAddr| {
            let to = Backend::new(ip_to_map(addr.address), port_to_map(addr.port));
            state(SocketEntry::new(&key, 7, id, &to))
        };
        let gone = ip_to_map(backend(11).address);
        let held = ip_to_map(backend(10).address);
        assert!(stale_entry(&listed(AF_INET6, gone), &sent_to(2, backend(11)), &live).is_some());
        assert!(stale_entry(&listed(AF_INET6, held), &sent_to(1, backend(10)), &live).is_none());
        // An IPv4 socket whose first word equals the IPv6 backend's is not that socket.
        let first_word = listed(AF_INET, [gone[0], 0, 0, 0]);
        assert!(stale_entry(&first_word, &sent_to(2, backend(11)), &live).is_none());
        assert!(live.may_be_stale(gone, port_to_map(5353)));
        assert!(!live.may_be_stale(held, port_to_map(5353)));
    }

    #[test]
    fn replies_parse_until_done_or_an_error() {
        let msg = InetDiagMsg {
            family: AF_INET,
            state: 1,
            id: InetDiagSockId {
                dport: port_to_map(5353),
                cookie: [42, 0],
                ..InetDiagSockId::default()
            },
            inode: 77,
            ..InetDiagMsg::default()
        };
        let mut datagram = message(SOCK_DIAG_BY_FAMILY, 0, bytemuck::bytes_of(&msg));
        assert_eq!(parse_reply(&datagram, &mut Vec::new()), Ok(false));
        datagram.extend(message(SOCK_DIAG_BY_FAMILY, 0, bytemuck::bytes_of(&msg)));
        datagram.extend(message(NLMSG_DONE, 0, &0u32.to_ne_bytes()));
        let mut sockets = Vec::new();
        assert_eq!(parse_reply(&datagram, &mut sockets), Ok(true));
        assert_eq!(sockets.len(), 2);
        assert_eq!(sockets[0].id.cookie, [42, 0]);
        assert_eq!(sockets[0].inode, 77);
        // An error reply carries the negated errno; an acknowledgement is errno 0.
        let error = message(NLMSG_ERROR, 0, &(-2i32).to_ne_bytes());
        assert_eq!(parse_reply(&error, &mut Vec::new()), Err(Some(2)));
        let ack = message(NLMSG_ERROR, 0, &0i32.to_ne_bytes());
        assert_eq!(parse_reply(&ack, &mut Vec::new()), Ok(true));
        // A header longer than the datagram.
        let mut short = message(SOCK_DIAG_BY_FAMILY, 0, bytemuck::bytes_of(&msg));
        short.truncate(40);
        assert_eq!(parse_reply(&short, &mut Vec::new()), Err(None));
    }
}
