//! The kernel side: loading and attaching the programs, and reading and writing the pinned
//! maps. Everything is pinned under one bpffs directory so the datapath outlives the agent
//! (connects keep being translated while it restarts) and the CLI can read it.

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::{
    AFFINITY_MAP, AFFINITY_MATCH_MAP, AffinityMatchKey, BACKEND_MAP, Backend, CONFIG_MAP, Config,
    MASTER_SLOT, REVNAT_MAP, Reason, SERVICE_MAP, STATS_MAP, ServiceKey, ServiceValue,
    UDP_SOCKET_MAP, ipv4_from_map, ipv4_to_map, port_from_map, port_to_map,
};

use crate::{
    model::{BackendAddr, Frontend, Protocol},
    mounts::{self, MountError},
    plan::{BackendId, MapOp, Programmed, ProgrammedFrontend},
};

/// The eBPF object built by build.rs from lb-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The programs, each attached to the cgroup through a link pinned as `lb_<program>`:
/// removing the pin detaches the program.
/// The attach point of each comes from its ELF section (`cgroup/connect4`, …).
pub const PROGRAMS: [&str; 4] = ["connect4", "sendmsg4", "recvmsg4", "getpeername4"];

/// Every map the object declares, all pinned by name.
pub const MAPS: [&str; 8] = [
    SERVICE_MAP,
    BACKEND_MAP,
    REVNAT_MAP,
    AFFINITY_MAP,
    AFFINITY_MATCH_MAP,
    UDP_SOCKET_MAP,
    CONFIG_MAP,
    STATS_MAP,
];

/// The pin of `program`'s link.
pub fn link_pin(program: &str) -> String {
    format!("lb_{program}")
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("replacing the link pinned at {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error(
        "no lb maps pinned at {dir} ({map}: {source}); is the agent loaded? start `lb agent`, or pass --bpffs"
    )]
    NotPinned {
        dir: PathBuf,
        map: &'static str,
        source: MapError,
    },
    #[error("another lb agent already runs on {dir} ({reason}); stop it first")]
    Locked { dir: PathBuf, reason: String },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// Opens one map pinned in `dir`.
pub fn open_pinned_map(dir: &Path, map: &'static str) -> Result<Map, DatapathError> {
    MapData::from_pin(dir.join(map))
        .and_then(Map::from_map_data)
        .map_err(|source| DatapathError::NotPinned {
            dir: dir.into(),
            map,
            source,
        })
}

/// A map's fill: entries in use and capacity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Occupancy {
    pub map: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// How full every map pinned in `dir` is. Hash maps are counted key by key; arrays are full
/// by construction.
pub fn occupancy(dir: &Path) -> Result<Vec<Occupancy>, DatapathError> {
    MAPS.iter().map(|name| map_occupancy(dir, name)).collect()
}

/// The maps the kernel fills (LRU), which only a walk can count.
pub const KERNEL_FILLED_MAPS: [&str; 3] = [REVNAT_MAP, AFFINITY_MAP, UDP_SOCKET_MAP];

/// One map's occupancy: hash maps are walked (a syscall per entry), arrays are full.
pub fn map_occupancy(dir: &Path, name: &'static str) -> Result<Occupancy, DatapathError> {
    fn count<K: aya::Pod, V: aya::Pod>(map: Map, name: &'static str) -> Result<u64, DatapathError> {
        let map: HashMap<MapData, K, V> = map.try_into().map_err(map_error(name))?;
        Ok(map.keys().filter(Result::is_ok).count() as u64)
    }
    let info = aya::maps::MapInfo::from_pin(dir.join(name)).map_err(map_error(name))?;
    let entries = match name {
        SERVICE_MAP => count::<ServiceKey, ServiceValue>(open_pinned_map(dir, name)?, name)?,
        BACKEND_MAP => count::<BackendId, Backend>(open_pinned_map(dir, name)?, name)?,
        REVNAT_MAP => count::<lb_common::RevNatKey, lb_common::RevNatValue>(
            open_pinned_map(dir, name)?,
            name,
        )?,
        AFFINITY_MAP => count::<lb_common::AffinityKey, lb_common::AffinityValue>(
            open_pinned_map(dir, name)?,
            name,
        )?,
        AFFINITY_MATCH_MAP => count::<AffinityMatchKey, u32>(open_pinned_map(dir, name)?, name)?,
        UDP_SOCKET_MAP => count::<lb_common::UdpSocketKey, u32>(open_pinned_map(dir, name)?, name)?,
        _ => u64::from(info.max_entries()),
    };
    Ok(Occupancy {
        map: name,
        entries,
        max_entries: info.max_entries(),
    })
}

/// A map's capacity, without walking it.
pub fn map_capacity(dir: &Path, name: &'static str) -> Result<u32, DatapathError> {
    Ok(aya::maps::MapInfo::from_pin(dir.join(name))
        .map_err(map_error(name))?
        .max_entries())
}

/// The live affinity entries: (client, frontend id) → (backend id, last use in ns of
/// CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads).
pub fn affinity_entries(
    dir: &Path,
) -> Result<Vec<(lb_common::AffinityKey, lb_common::AffinityValue)>, DatapathError> {
    let map: HashMap<MapData, lb_common::AffinityKey, lb_common::AffinityValue> =
        open_pinned_map(dir, AFFINITY_MAP)?
            .try_into()
            .map_err(map_error(AFFINITY_MAP))?;
    map.iter()
        .map(|entry| entry.map_err(map_error(AFFINITY_MAP)))
        .collect()
}

/// The pinned maps the agent writes and the CLI reads.
pub struct ServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendId, Backend>,
    affinity_matches: HashMap<MapData, AffinityMatchKey, u32>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
}

/// What the maps hold, and service entries no frontend accounts for (left by an agent that
/// stopped in the middle of an update): they are deleted once the maps are in sync.
pub struct Snapshot {
    pub programmed: Programmed,
    pub orphans: Vec<ServiceKey>,
}

impl ServiceMaps {
    /// Opens the maps pinned in `dir`, for reading while the agent runs or is stopped.
    pub fn open_pinned(dir: &Path) -> Result<Self, DatapathError> {
        Self::from_maps(|map| open_pinned_map(dir, map))
    }

    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Self::from_maps(|map| ebpf.take_map(map).ok_or(DatapathError::Missing(map)))
    }

    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        Ok(Self {
            services: get(SERVICE_MAP)?
                .try_into()
                .map_err(map_error(SERVICE_MAP))?,
            backends: get(BACKEND_MAP)?
                .try_into()
                .map_err(map_error(BACKEND_MAP))?,
            affinity_matches: get(AFFINITY_MATCH_MAP)?
                .try_into()
                .map_err(map_error(AFFINITY_MATCH_MAP))?,
            config: get(CONFIG_MAP)?.try_into().map_err(map_error(CONFIG_MAP))?,
            stats: get(STATS_MAP)?.try_into().map_err(map_error(STATS_MAP))?,
        })
    }

    /// Tells the programs which network namespace is the node's own.
    pub fn set_host_netns_cookie(&mut self, cookie: u64) -> Result<(), DatapathError> {
        self.config
            .set(
                0,
                Config {
                    host_netns_cookie: cookie,
                },
                0,
            )
            .map_err(map_error(CONFIG_MAP))
    }

    /// Reads the maps back into the agent's terms.
    pub fn read(&self) -> Result<Snapshot, DatapathError> {
        let mut backends = BTreeMap::new();
        for entry in self.backends.iter() {
            let (id, backend) = entry.map_err(map_error(BACKEND_MAP))?;
            backends.insert(
                id,
                BackendAddr {
                    address: Ipv4Addr::from(ipv4_from_map(backend.address)),
                    port: port_from_map(backend.port),
                },
            );
        }

        let mut masters = BTreeMap::new();
        let mut slots = BTreeMap::new();
        let mut orphans = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(map_error(SERVICE_MAP))?;
            let Some(frontend) = frontend_of(&key) else {
                orphans.push(key);
                continue;
            };
            if key.slot == MASTER_SLOT {
                masters.insert(frontend, value);
            } else {
                slots.insert((frontend, key.slot), (key, value.backend_id));
            }
        }

        let mut frontends = BTreeMap::new();
        for (frontend, master) in masters {
            // A missing slot reads as id 0, which no backend has, so the next plan rewrites it.
            let ids = (1..=master.count)
                .map(|slot| slots.remove(&(frontend, slot)).map_or(0, |(_, id)| id))
                .collect();
            frontends.insert(
                frontend,
                ProgrammedFrontend {
                    id: master.frontend_id,
                    flags: master.flags,
                    affinity_timeout_s: master.affinity_timeout_s,
                    slots: ids,
                },
            );
        }
        orphans.extend(slots.into_values().map(|(key, _)| key));

        let mut affinity_matches = std::collections::BTreeSet::new();
        for key in self.affinity_matches.keys() {
            affinity_matches.insert(key.map_err(map_error(AFFINITY_MATCH_MAP))?);
        }
        Ok(Snapshot {
            programmed: Programmed::new(frontends, backends, affinity_matches),
            orphans,
        })
    }

    /// Performs `ops` in order.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        for op in ops {
            match *op {
                MapOp::PutBackend(id, addr) => self
                    .backends
                    .insert(
                        id,
                        Backend::new(ipv4_to_map(addr.address.octets()), port_to_map(addr.port)),
                        0,
                    )
                    .map_err(map_error(BACKEND_MAP))?,
                MapOp::PutSlot(frontend, slot, id) => self
                    .services
                    .insert(key_of(&frontend, slot), ServiceValue::slot(id), 0)
                    .map_err(map_error(SERVICE_MAP))?,
                MapOp::PutMaster(frontend, ref master) => self
                    .services
                    .insert(
                        key_of(&frontend, MASTER_SLOT),
                        ServiceValue::master(
                            u16::try_from(master.slots.len()).unwrap_or(u16::MAX),
                            master.flags,
                            master.id,
                            master.affinity_timeout_s,
                        ),
                        0,
                    )
                    .map_err(map_error(SERVICE_MAP))?,
                MapOp::PutAffinityMatch(key) => self
                    .affinity_matches
                    .insert(key, 1, 0)
                    .map_err(map_error(AFFINITY_MATCH_MAP))?,
                MapOp::DeleteAffinityMatch(key) => {
                    ignore_missing(self.affinity_matches.remove(&key))
                        .map_err(map_error(AFFINITY_MATCH_MAP))?;
                }
                MapOp::DeleteSlot(frontend, slot) => {
                    self.remove_service(&key_of(&frontend, slot))?;
                }
                MapOp::DeleteMaster(frontend) => {
                    self.remove_service(&key_of(&frontend, MASTER_SLOT))?;
                }
                MapOp::DeleteBackend(id) => {
                    ignore_missing(self.backends.remove(&id)).map_err(map_error(BACKEND_MAP))?;
                }
            }
        }
        Ok(())
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        ignore_missing(self.services.remove(key)).map_err(map_error(SERVICE_MAP))
    }

    /// Per-reason counters, one value per CPU.
    pub fn stats(&self) -> Result<Vec<(Reason, Vec<u64>)>, DatapathError> {
        Reason::ALL
            .iter()
            .map(|reason| {
                let per_cpu = self
                    .stats
                    .get(&(*reason as u32), 0)
                    .map_err(map_error(STATS_MAP))?;
                Ok((*reason, per_cpu.to_vec()))
            })
            .collect()
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn key_of(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(
        ipv4_to_map(frontend.address.octets()),
        port_to_map(frontend.port),
        frontend.protocol.number(),
        slot,
    )
}

fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        address: Ipv4Addr::from(ipv4_from_map(key.address)),
        port: port_from_map(key.port),
        protocol: Protocol::from_number(key.protocol)?,
    })
}

/// An exclusive lock on the pin directory, held for the agent's lifetime.
pub struct PinLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Locks `pin_dir` (creating it on a bpffs), or says that another agent holds it.
pub fn lock(pin_dir: &Path) -> Result<PinLock, DatapathError> {
    mounts::ensure_bpffs(pin_dir)?;
    let dir_error = |source| DatapathError::CreateDir {
        path: pin_dir.into(),
        source,
    };
    std::fs::create_dir_all(pin_dir).map_err(dir_error)?;
    let dir = std::fs::File::open(pin_dir).map_err(dir_error)?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map(|lock| PinLock { _lock: lock })
        .map_err(|(_, errno)| DatapathError::Locked {
            dir: pin_dir.into(),
            reason: errno.desc().to_owned(),
        })
}

/// Sizes of the maps that grow with the cluster.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Entries of the service map: one per frontend plus one per backend slot.
    pub services: u32,
    /// Entries of the backend map: distinct backend address:port pairs.
    pub backends: u32,
}

/// The loaded datapath: programs attached to a cgroup, link and maps pinned.
pub struct Datapath {
    /// Holds the program fds; the pinned link keeps the program attached without it.
    _ebpf: Ebpf,
    pub maps: ServiceMaps,
}

/// Loads the programs (reusing maps already pinned in `pin_dir`), attaches connect4 to
/// `cgroup` and pins the link, replacing a link an earlier agent pinned there.
pub fn load(pin_dir: &Path, cgroup: &Path, capacity: Capacity) -> Result<Datapath, DatapathError> {
    mounts::ensure_bpffs(pin_dir)?;
    std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::CreateDir {
        path: pin_dir.into(),
        source,
    })?;
    // Capacities apply when the maps are created; maps already pinned keep theirs.
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .map_max_entries(SERVICE_MAP, capacity.services)
        .map_max_entries(BACKEND_MAP, capacity.backends)
        // One match per slot at most, so it never needs more room than the service map.
        .map_max_entries(AFFINITY_MATCH_MAP, capacity.services)
        .load(EBPF_OBJECT)?;
    let maps = ServiceMaps::take(&mut ebpf)?;

    let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
        path: cgroup.into(),
        source,
    })?;
    for name in PROGRAMS {
        let program_error = |source| DatapathError::Program {
            program: name,
            source,
        };
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing(name))?
            .try_into()
            .map_err(program_error)?;
        program.load().map_err(program_error)?;
        // A bpf_link on a cgroup always runs alongside other links (the kernel rejects the
        // ALLOW_MULTI flag there as implied), so the old agent's link stays attached until
        // the new one is pinned in its place and no socket goes untranslated during a restart.
        let link_id = program
            .attach(&cgroup_file, CgroupAttachMode::Single)
            .map_err(program_error)?;
        let path = pin_dir.join(link_pin(name));
        let link: FdLink = program
            .take_link(link_id)
            .map_err(program_error)?
            .try_into()
            .map_err(|e| DatapathError::Link {
                path: path.clone(),
                reason: format!("{e}"),
            })?;
        replace_pinned_link(&path, link)?;
    }
    Ok(Datapath { _ebpf: ebpf, maps })
}

fn replace_pinned_link(path: &Path, link: FdLink) -> Result<(), DatapathError> {
    let link_error = |reason: String| DatapathError::Link {
        path: path.into(),
        reason,
    };
    if path.exists() {
        let old = PinnedLink::from_pin(path).map_err(|e| link_error(e.to_string()))?;
        // Dropping the unpinned link closes its last fd and detaches the old program.
        drop(old.unpin().map_err(|e| link_error(e.to_string()))?);
    }
    link.pin(path).map_err(|source| DatapathError::Pin {
        path: path.into(),
        source,
    })?;
    Ok(())
}

/// Detaches the programs and removes every pin in `pin_dir`, then the directory if empty.
pub fn unload(pin_dir: &Path) -> Result<Vec<PathBuf>, std::io::Error> {
    let mut removed = Vec::new();
    let links = PROGRAMS.iter().map(|name| link_pin(name));
    for pin in links.chain(MAPS.iter().map(|m| (*m).to_owned())) {
        let path = pin_dir.join(pin);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            tracing::warn!(
                "{} holds pins lb did not create; left in place",
                pin_dir.display()
            );
        }
        Err(e) => return Err(e),
    }
    Ok(removed)
}
