//! The NodePort range kept out of the node's ephemeral ports.
//!
//! The datapath refuses a bind() in the node's network namespace to a NodePort (post_bind4/6,
//! EADDRINUSE). A bind() to port 0, or a connect() that picks its own port, would then fail
//! whenever the kernel drew a NodePort as the ephemeral port: so the agent adds the NodePort
//! range to that namespace's `net.ipv4.ip_local_reserved_ports` (which IPv6 uses too), as a
//! kube-proxy host is advised to. Exactly the ports it added are recorded in the state
//! directory, and `lb unload` gives back exactly those: ports an operator reserved before
//! stay reserved.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::netns::{self, NetnsError};

/// The sysctl, as its namespace's thread sees it under /proc.
const SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The record of what the agent reserved, in its state directory.
const RECORD_FILE: &str = "reserved-ports.json";

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";

#[derive(Debug, thiserror::Error)]
pub enum NodePortsError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("reading {SYSCTL} in {netns}: {source}")]
    ReadSysctl {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {SYSCTL} in {netns}: {source}")]
    WriteSysctl {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("{SYSCTL} in {netns}: {source}")]
    Sysctl {
        netns: PathBuf,
        source: InvalidPorts,
    },
    #[error("the record of reserved ports {path}: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error(
        "the NodePorts were reserved in the node's network namespace ({netns} of the agent), not this one: run lb unload there"
    )]
    Elsewhere { netns: PathBuf },
}

/// Why a port list (`8080,30000-32767`) is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{text:?} is not a port or FIRST-LAST range of ports (1-65535, FIRST <= LAST)")]
pub struct InvalidPorts {
    text: String,
}

/// A set of ports, as `ip_local_reserved_ports` lists them.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    /// One bit per port.
    bits: Box<[u64; 1024]>,
}

impl Default for PortSet {
    fn default() -> Self {
        Self {
            bits: Box::new([0; 1024]),
        }
    }
}

impl PortSet {
    fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    fn insert_range(&mut self, first: u16, last: u16) {
        for port in first..=last {
            self.bits[usize::from(port / 64)] |= 1 << (port % 64);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|word| *word == 0)
    }

    pub fn union(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a | b)
    }

    pub fn difference(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a & !b)
    }

    fn zip(&self, other: &Self, op: impl Fn(u64, u64) -> u64) -> Self {
        let mut out = Self::default();
        for (i, word) in out.bits.iter_mut().enumerate() {
            *word = op(self.bits[i], other.bits[i]);
        }
        out
    }

    /// The set as maximal FIRST-LAST runs, in order.
    fn runs(&self) -> Vec<(u16, u16)> {
        let mut runs: Vec<(u16, u16)> = Vec::new();
        for port in 0..=u16::MAX {
            if !self.contains(port) {
                continue;
            }
            match runs.last_mut() {
                Some((_, last)) if u32::from(*last) + 1 == u32::from(port) => *last = port,
                _ => runs.push((port, port)),
            }
        }
        runs
    }
}

impl FromStr for PortSet {
    type Err = InvalidPorts;

    /// `8080,30000-32767`; empty (or only a newline, as the sysctl reads) for none.
    fn from_str(text: &str) -> Result<Self, InvalidPorts> {
        let invalid = || InvalidPorts { text: text.into() };
        let mut set = Self::default();
        for item in text
            .trim()
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
            let (Some(first), Some(last)) = (port(first), port(last)) else {
                return Err(invalid());
            };
            if first > last {
                return Err(invalid());
            }
            set.insert_range(first, last);
        }
        Ok(set)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let runs: Vec<String> = self
            .runs()
            .into_iter()
            .map(|(first, last)| {
                if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                }
            })
            .collect();
        f.write_str(&runs.join(","))
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({self})")
    }
}

/// What the agent reserved, and where: `lb unload` gives it back.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    netns: PathBuf,
    /// Which namespace that path named: a path can name another namespace later (one
    /// deleted and made again, a reboot), whose ports are not the agent's to give back.
    /// Absent in records of agents before it was kept.
    #[serde(default)]
    identity: Option<NetnsIdentity>,
    /// As the sysctl lists ports.
    ports: String,
}

/// A network namespace as the kernel tells it apart: its cookie, in this boot (inode
/// numbers of namespaces are reused; cookies are not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NetnsIdentity {
    cookie: u64,
    boot_id: String,
}

impl NetnsIdentity {
    /// The namespace `netns` names now; `None` if it names none.
    fn of(netns: &Path) -> Option<Self> {
        Some(Self {
            cookie: netns::cookie_of(netns).ok()?,
            boot_id: boot_id()?,
        })
    }
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned())
}

/// Where the namespace a record was made in is, seen from here.
#[derive(Debug, PartialEq, Eq)]
enum Whereabouts {
    /// Its path names it still.
    Here,
    /// It is gone, with the ports reserved in it: another boot, no namespace at its path,
    /// or another one made under its name.
    Gone,
    /// Its path is this process's own namespace, which is another one: the record is for
    /// a process in the node's namespace to act on.
    Elsewhere,
}

impl Record {
    fn whereabouts(&self, netns: &Path) -> Whereabouts {
        let Some(identity) = &self.identity else {
            // A record from before identities were kept goes by its path.
            return if self.netns == netns {
                Whereabouts::Here
            } else {
                Whereabouts::Gone
            };
        };
        if boot_id().as_ref() != Some(&identity.boot_id) {
            return Whereabouts::Gone;
        }
        match NetnsIdentity::of(netns) {
            Some(now) if now == *identity => Whereabouts::Here,
            Some(_)
                if netns.starts_with("/proc/self") || netns.starts_with("/proc/thread-self") =>
            {
                Whereabouts::Elsewhere
            }
            _ => Whereabouts::Gone,
        }
    }
}

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORD_FILE)
}

fn read_record(state_dir: &Path) -> Result<Option<(Record, PortSet)>, NodePortsError> {
    let path = record_path(state_dir);
    let error = |reason: String| NodePortsError::Record {
        path: path.clone(),
        reason,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error(e.to_string())),
    };
    let record: Record = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
    let ports = record
        .ports
        .parse()
        .map_err(|e: InvalidPorts| error(e.to_string()))?;
    Ok(Some((record, ports)))
}

/// The sysctl's ports, read and then replaced by `change` of them (unless that is the
/// same), from a thread in the network namespace at `netns`; `before_write` is told the
/// ports read first, and may stop it. Returns the ports before.
fn change_sysctl(
    netns: &Path,
    change: impl FnOnce(&PortSet) -> PortSet + Send,
    before_write: impl FnOnce(&PortSet) -> Result<(), NodePortsError> + Send,
) -> Result<PortSet, NodePortsError> {
    netns::inside(netns, || {
        Ok((|| {
            let text =
                std::fs::read_to_string(SYSCTL).map_err(|source| NodePortsError::ReadSysctl {
                    netns: netns.into(),
                    source,
                })?;
            let before: PortSet = text.parse().map_err(|source| NodePortsError::Sysctl {
                netns: netns.into(),
                source,
            })?;
            let after = change(&before);
            before_write(&before)?;
            if after != before {
                // With a newline: an empty write would leave the ports as they are.
                std::fs::write(SYSCTL, format!("{after}\n")).map_err(|source| {
                    NodePortsError::WriteSysctl {
                        netns: netns.into(),
                        source,
                    }
                })?;
            }
            Ok(before)
        })())
    })?
}

/// Adds `range` to the reserved ports of the network namespace at `netns`, and records in
/// `state_dir` the ports that were not reserved before (with those an earlier agent
/// recorded: after a restart the range is already there, and still the agent's to give
/// back). Returns the ports this call added.
pub fn reserve(netns: &Path, range: &PortSet, state_dir: &Path) -> Result<PortSet, NodePortsError> {
    let recorded = match read_record(state_dir)? {
        // The same namespace's, or the record of another one that is not ours to keep.
        Some((record, ports)) if record.whereabouts(netns) == Whereabouts::Here => ports,
        _ => PortSet::default(),
    };
    // Recorded before the sysctl is written: an agent stopped in between leaves a record
    // of ports it may not have reserved (giving them back is then a no-op), never
    // reserved ports without a record.
    let identity = NetnsIdentity::of(netns);
    let record = |before: &PortSet| {
        let ours = recorded.union(&range.difference(before));
        if ours.is_empty() {
            return Ok(());
        }
        // The agent made sure of its state directory before anything else.
        let path = record_path(state_dir);
        let record = Record {
            netns: netns.into(),
            identity,
            ports: ours.to_string(),
        };
        crate::state::write_private(&path, &record).map_err(|e| NodePortsError::Record {
            path,
            reason: e.to_string(),
        })
    };
    let before = change_sysctl(netns, |before| before.union(range), record)?;
    Ok(range.difference(&before))
}

/// Gives back the ports the agent recorded in `state_dir` as reserved by it, in the
/// namespace it reserved them in, and removes the record. Returns them, or `None` when
/// there is no record.
pub fn release(state_dir: &Path) -> Result<Option<(PathBuf, PortSet)>, NodePortsError> {
    let Some((record, ours)) = read_record(state_dir)? else {
        return Ok(None);
    };
    let netns = record.netns.clone();
    // The namespace the ports were reserved in may be gone, and its ports with it: the
    // record goes, nothing else is touched.
    let released = match record.whereabouts(&netns) {
        Whereabouts::Here => {
            change_sysctl(&netns, |before| before.difference(&ours), |_| Ok(()))?;
            ours
        }
        Whereabouts::Gone => PortSet::default(),
        Whereabouts::Elsewhere => return Err(NodePortsError::Elsewhere { netns }),
    };
    let path = record_path(state_dir);
    std::fs::remove_file(&path).map_err(|e| NodePortsError::Record {
        path,
        reason: e.to_string(),
    })?;
    Ok(Some((netns, released)))
}

/// `--node-port-range`: the ports to reserve, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortRange(pub Option<PortSet>);

/// `--node-port-range`: FIRST-LAST, or `none`.
pub fn parse_range(text: &str) -> Result<NodePortRange, InvalidPorts> {
    if text == "none" {
        return Ok(NodePortRange(None));
    }
    let invalid = || InvalidPorts { text: text.into() };
    // One range only: a list is not a NodePort range.
    if text.contains(',') || text.trim().is_empty() {
        return Err(invalid());
    }
    text.parse().map(|range| NodePortRange(Some(range)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> PortSet {
        text.parse().unwrap()
    }

    #[test]
    fn port_lists_read_and_print_as_the_sysctl_does() {
        assert_eq!(set("").to_string(), "");
        assert_eq!(set("\n").to_string(), "");
        assert_eq!(set("8080,30000-32767\n").to_string(), "8080,30000-32767");
        // Adjacent and overlapping runs merge; order does not matter.
        assert_eq!(set("5,3-4,1-2,7").to_string(), "1-5,7");
        assert_eq!(set("65535").to_string(), "65535");
        for bad in ["0", "65536", "2-1", "a", "1-", "-5", "1-2-3"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn what_was_reserved_before_stays_reserved_after_the_range_is_given_back() {
        let before = set("8080,30500");
        let range = set(DEFAULT_NODE_PORT_RANGE);
        let reserved = before.union(&range);
        assert_eq!(reserved.to_string(), "8080,30000-32767");
        let added = range.difference(&before);
        assert_eq!(added.to_string(), "30000-30499,30501-32767");
        assert_eq!(reserved.difference(&added), before);
    }

    #[test]
    fn a_record_is_of_the_namespace_it_was_made_in_not_of_its_path() {
        let here = Path::new("/proc/self/ns/net");
        let Some(identity) = NetnsIdentity::of(here) else {
            // No SO_NETNS_COOKIE (Linux < 5.14): records go by their path.
            return;
        };
        let record = |netns: &str, identity| Record {
            netns: netns.into(),
            identity,
            ports: "30000-32767".into(),
        };
        let at = |netns: &str, identity| record(netns, identity).whereabouts(Path::new(netns));
        assert_eq!(
            at("/proc/self/ns/net", Some(identity.clone())),
            Whereabouts::Here
        );
        // Another namespace behind a process's own path: for a process there to act on.
        let other = NetnsIdentity {
            cookie: identity.cookie + 1,
            ..identity.clone()
        };
        assert_eq!(
            at("/proc/self/ns/net", Some(other.clone())),
            Whereabouts::Elsewhere
        );
        // Another boot, or no namespace at the path (a named one deleted): gone.
        let other_boot = NetnsIdentity {
            boot_id: "another boot".into(),
            ..identity
        };
        assert_eq!(at("/proc/self/ns/net", Some(other_boot)), Whereabouts::Gone);
        assert_eq!(at("/run/netns/lb-gone", Some(other)), Whereabouts::Gone);
        // A record from before identities were kept goes by its path.
        assert_eq!(at("/proc/self/ns/net", None), Whereabouts::Here);
        let old: Record =
            serde_json::from_str(r#"{"netns": "/proc/self/ns/net", "ports": "30000-32767"}"#)
                .unwrap();
        assert_eq!(old.whereabouts(here), Whereabouts::Here);
    }

    #[test]
    fn the_flag_takes_one_range_or_none() {
        assert_eq!(parse_range("none").unwrap(), NodePortRange(None));
        assert_eq!(
            parse_range("30000-32767").unwrap(),
            NodePortRange(Some(set("30000-32767")))
        );
        assert!(parse_range("30000-32767,8080").is_err());
        assert!(parse_range("").is_err());
        assert!(parse_range("32767-30000").is_err());
    }
}
