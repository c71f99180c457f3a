//! Facts about the node's own network namespace: its cookie (the programs compare it to tell
//! the node's sockets from pods') and its addresses (the NodePort frontends), which it
//! follows as they change.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sched::{CloneFlags, setns},
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    },
};
use tokio::io::{Interest, unix::AsyncFd};

/// `SO_NETNS_COOKIE` (Linux ≥ 5.14; the same value on every architecture lb builds for).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netlink multicast group of IPv4 address changes, as a bind() group mask (libc
/// types the positive mask as c_int).
const IPV4_ADDRESS_CHANGES: u32 = libc::RTMGRP_IPV4_IFADDR.unsigned_abs();

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("reading the netns cookie: {0} (needs Linux 5.14 or later)")]
    Cookie(std::io::Error),
    #[error("listing addresses: {0}")]
    Addresses(nix::Error),
    #[error("the thread that entered {path} panicked")]
    Thread { path: PathBuf },
    #[error("watching the addresses of {path}: {source}")]
    Watch {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The node's network namespace as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNetns {
    pub cookie: u64,
    /// Its IPv4 addresses other than loopback.
    pub addresses: Vec<IpAddr>,
}

/// Reads the cookie and addresses of the network namespace at `path` (e.g.
/// `/proc/self/ns/net`, `/run/netns/NAME`), from a thread that enters it, so the agent's
/// own threads stay where they are.
pub fn inspect(path: &Path) -> Result<HostNetns, NetnsError> {
    inside(path, || {
        Ok(HostNetns {
            cookie: cookie()?,
            addresses: addresses()?,
        })
    })
}

/// The cookie of the network namespace at `path`: unique among this boot's namespaces
/// (an inode number is reused once a namespace is gone).
pub fn cookie_of(path: &Path) -> Result<u64, NetnsError> {
    inside(path, cookie)
}

/// Runs `work` on a thread that entered the network namespace at `path`.
pub(crate) fn inside<T: Send>(
    path: &Path,
    work: impl FnOnce() -> Result<T, NetnsError> + Send,
) -> Result<T, NetnsError> {
    let netns = File::open(path).map_err(|source| NetnsError::Open {
        path: path.into(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::Enter {
                        path: path.into(),
                        source,
                    }
                })?;
                work()
            })
            .join()
            .map_err(|_| NetnsError::Thread { path: path.into() })?
    })
}

/// The IPv4 addresses (other than loopback) of the network namespace at `path`.
pub fn addresses_of(path: &Path) -> Result<Vec<IpAddr>, NetnsError> {
    inside(path, addresses)
}

/// Tells when an IPv4 address of a network namespace is added or removed, so that
/// NodePorts follow the node's addresses.
pub struct AddressWatch {
    socket: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl AddressWatch {
    /// Subscribes to the address changes of the network namespace at `path`: a netlink
    /// socket belongs to the namespace it was created in, so it is created from a thread
    /// inside it.
    pub fn new(path: &Path) -> Result<Self, NetnsError> {
        let error = |source: Errno| NetnsError::Watch {
            path: path.into(),
            source: source.into(),
        };
        let socket = inside(path, || {
            let socket = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                SockProtocol::NetlinkRoute,
            )
            .map_err(error)?;
            bind(
                socket.as_raw_fd(),
                &NetlinkAddr::new(0, IPV4_ADDRESS_CHANGES),
            )
            .map_err(error)?;
            Ok(socket)
        })?;
        // SAFETY: the OwnedFd moves into the AsyncFd and is closed only when it drops, so the
        // descriptor stays open and the same for the AsyncFd's whole life.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| NetnsError::Watch {
                path: path.into(),
                source: e.into(),
            })?;
        Ok(Self {
            socket,
            path: path.into(),
        })
    }

    /// Waits for the next change. Each message on the subscribed group is one, and so is an
    /// overflow (ENOBUFS: changes were dropped), so the messages are not parsed: the caller
    /// reads the addresses again.
    pub async fn changed(&mut self) -> Result<(), NetnsError> {
        let error = |source: std::io::Error| NetnsError::Watch {
            path: self.path.clone(),
            source,
        };
        let mut buffer = [0u8; 8192];
        loop {
            let mut ready = self.socket.readable().await.map_err(error)?;
            let mut changed = false;
            loop {
                match recv(
                    self.socket.get_ref().as_raw_fd(),
                    &mut buffer,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(_) | Err(Errno::ENOBUFS) => changed = true,
                    Err(Errno::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(error(e.into())),
                }
            }
            if changed {
                return Ok(());
            }
        }
    }
}

fn cookie() -> Result<u64, NetnsError> {
    let socket =
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(NetnsError::Cookie)?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(NetnsError::Cookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

fn addresses() -> Result<Vec<IpAddr>, NetnsError> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(NetnsError::Addresses)?
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                // A link-local address needs a scope (an interface) to be reached, which a
                // NodePort frontend cannot carry; kube-proxy leaves them out too.
                (None, Some(v6)) if !v6.ip().is_unicast_link_local() => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            (!ip.is_loopback()).then_some(ip)
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}
