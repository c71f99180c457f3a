//! Facts about the node's own network namespace: its cookie (the programs compare it to tell
//! the node's sockets from pods') and its addresses (the NodePort frontends).

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// `SO_NETNS_COOKIE` (Linux ≥ 5.14; the same value on every architecture lb builds for).
const SO_NETNS_COOKIE: libc::c_int = 71;

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
}

/// The node's network namespace as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNetns {
    pub cookie: u64,
    /// Its IPv4 addresses other than loopback.
    pub addresses: Vec<Ipv4Addr>,
}

/// Reads the cookie and addresses of the network namespace at `path` (e.g.
/// `/proc/self/ns/net`, `/run/netns/NAME`), from a thread that enters it, so the agent's
/// own threads stay where they are.
pub fn inspect(path: &Path) -> Result<HostNetns, NetnsError> {
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
                Ok(HostNetns {
                    cookie: cookie()?,
                    addresses: addresses()?,
                })
            })
            .join()
            .map_err(|_| NetnsError::Thread { path: path.into() })?
    })
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

fn addresses() -> Result<Vec<Ipv4Addr>, NetnsError> {
    let mut out: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map_err(NetnsError::Addresses)?
        .filter_map(|ifaddr| {
            let ip = ifaddr.address?.as_sockaddr_in()?.ip();
            (!ip.is_loopback()).then_some(ip)
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}
