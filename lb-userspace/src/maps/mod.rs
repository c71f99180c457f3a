//! The kernel side: loading and attaching the programs, and reading and writing the pinned
//! maps. Everything is pinned under one bpffs directory so the datapath outlives the agent
//! (connects keep being translated while it restarts) and the CLI can read it.

pub mod bpf;
pub mod links;
pub mod mounts;

use std::{
    collections::BTreeMap,
    fs::File,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, ProgramError,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::{
    AFFINITY_MAP, AFFINITY_MATCH_MAP, AffinityMatchKey, BACKEND_MAP, Backend, CLUSTER_IP_MAP,
    CONFIG_MAP, Config, MASTER_SLOT, MapAddress, Reason, SERVICE_MAP, SOCKET_MAP, STATS_MAP,
    ServiceKey, ServiceValue, ip_from_map, ip_to_map, port_from_map, port_to_map,
};

use self::mounts::MountError;
use crate::{
    model::{BackendAddr, Frontend, Protocol},
    plan::{BackendId, Capacity, MapOp, Programmed, ProgrammedFrontend},
};

/// The eBPF object built by build.rs from lb-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

pub use lb_common::{MAPS, PROGRAMS};

/// The maps with a capacity, whose fill [`occupancy`] reports: all but the socket storage,
/// which holds an entry per translated socket, freed with it, and cannot be walked.
pub const SIZED_MAPS: [&str; 7] = [
    SERVICE_MAP,
    BACKEND_MAP,
    CLUSTER_IP_MAP,
    AFFINITY_MAP,
    AFFINITY_MATCH_MAP,
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
    #[error("{0} is not a hash map: pinned by another build of lb? run `lb unload`")]
    NotAHashMap(&'static str),
    #[error(
        "map {map} has {found:?} byte keys and values, this lb {expected:?}: pinned by another build of lb? run `lb unload`"
    )]
    Layout {
        map: &'static str,
        expected: (usize, usize),
        found: (usize, usize),
    },
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        source: crate::maps::bpf::BpfError,
    },
    #[error(
        "writing {entries} entries to map {map} (capacity {capacity}): {source}{}",
        full_hint(source)
    )]
    Write {
        map: &'static str,
        entries: usize,
        capacity: u32,
        source: crate::maps::bpf::BpfError,
    },
    #[error(transparent)]
    Dir(#[from] crate::dirs::DirError),
    #[error("opening the pinned {path}: {source}")]
    OpenPin {
        path: PathBuf,
        source: crate::maps::bpf::BpfError,
    },
    #[error("switching the link {path} to the new programs: {source}")]
    Relink {
        path: PathBuf,
        source: crate::maps::bpf::BpfError,
    },
    #[error("removing the pin {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to do about a write the kernel refused because the map is full.
fn full_hint(source: &crate::maps::bpf::BpfError) -> &'static str {
    match source.errno() {
        Some(libc::E2BIG | libc::ENOSPC) => {
            " (the map is full: the agent grows its maps up to the --*-max-entries bounds)"
        }
        Some(libc::ENOMEM) => " (out of kernel memory for BPF maps)",
        _ => "",
    }
}

/// The error of a write of `entries` entries to `map` (named `name`), with its capacity,
/// which is asked of the kernel only when the write failed.
fn write_error<'a>(
    map: &'a MapData,
    name: &'static str,
    entries: usize,
) -> impl FnOnce(crate::maps::bpf::BpfError) -> DatapathError + 'a {
    move |source| DatapathError::Write {
        map: name,
        entries,
        capacity: map.info().map_or(0, |info| info.max_entries()),
        source,
    }
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
    SIZED_MAPS
        .iter()
        .map(|name| map_occupancy(dir, name))
        .collect()
}

/// The maps the kernel fills (LRU), which only a walk can count.
pub const KERNEL_FILLED_MAPS: [&str; 1] = [AFFINITY_MAP];

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
        CLUSTER_IP_MAP => count::<MapAddress, u32>(open_pinned_map(dir, name)?, name)?,
        AFFINITY_MAP => count::<lb_common::AffinityKey, lb_common::AffinityValue>(
            open_pinned_map(dir, name)?,
            name,
        )?,
        AFFINITY_MATCH_MAP => count::<AffinityMatchKey, u32>(open_pinned_map(dir, name)?, name)?,
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

/// The pinned maps the agent writes and the CLI reads. The three that grow with the
/// cluster are raw [`MapData`]: they are read and written through [`crate::maps::bpf`]'s batched
/// syscalls.
pub struct ServiceMaps {
    services: MapData,
    backends: MapData,
    affinity_matches: MapData,
    cluster_ips: MapData,
    /// What [`CLUSTER_IP_MAP`] holds, as the agent last wrote or read it.
    held_cluster_ips: std::collections::BTreeSet<IpAddr>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
}

/// What the maps hold, and service entries no frontend accounts for (left by an agent that
/// stopped in the middle of an update): they are deleted once the maps are in sync.
pub struct Snapshot {
    pub programmed: Programmed,
    pub orphans: Vec<ServiceKey>,
}

/// The hash map `name`, checked to have `K` keys and `V` values: the batched syscalls
/// size their buffers by these types, and the kernel fills them by the map's own sizes.
fn hash_map<K, V>(map: Map, name: &'static str) -> Result<MapData, DatapathError> {
    let Map::HashMap(data) = map else {
        return Err(DatapathError::NotAHashMap(name));
    };
    let info = data.info().map_err(map_error(name))?;
    let expected = (size_of::<K>(), size_of::<V>());
    let found = (info.key_size() as usize, info.value_size() as usize);
    if expected != found {
        return Err(DatapathError::Layout {
            map: name,
            expected,
            found,
        });
    }
    Ok(data)
}

/// Which map a run of [`MapOp`]s goes to, and whether it writes or deletes: consecutive ops
/// of one class become one batched syscall, which the kernel applies in order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OpClass {
    PutBackend,
    DeleteBackend,
    PutService,
    DeleteService,
    PutMatch,
    DeleteMatch,
}

impl OpClass {
    const fn of(op: &MapOp) -> Self {
        match op {
            MapOp::PutBackend(..) => Self::PutBackend,
            MapOp::DeleteBackend(..) => Self::DeleteBackend,
            MapOp::PutSlot(..) | MapOp::PutMaster(..) => Self::PutService,
            MapOp::DeleteSlot(..) | MapOp::DeleteMaster(..) => Self::DeleteService,
            MapOp::PutAffinityMatch(..) => Self::PutMatch,
            MapOp::DeleteAffinityMatch(..) => Self::DeleteMatch,
        }
    }
}

fn backend_value(addr: &BackendAddr) -> Backend {
    Backend::new(ip_to_map(addr.address), port_to_map(addr.port))
}

fn master_value(master: &ProgrammedFrontend) -> ServiceValue {
    ServiceValue::master(
        u16::try_from(master.slots.len()).unwrap_or(u16::MAX),
        master.flags,
        master.id,
        master.affinity_timeout_s,
    )
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
            services: hash_map::<ServiceKey, ServiceValue>(get(SERVICE_MAP)?, SERVICE_MAP)?,
            backends: hash_map::<BackendId, Backend>(get(BACKEND_MAP)?, BACKEND_MAP)?,
            affinity_matches: hash_map::<AffinityMatchKey, u32>(
                get(AFFINITY_MATCH_MAP)?,
                AFFINITY_MATCH_MAP,
            )?,
            cluster_ips: hash_map::<MapAddress, u32>(get(CLUSTER_IP_MAP)?, CLUSTER_IP_MAP)?,
            held_cluster_ips: std::collections::BTreeSet::new(),
            config: get(CONFIG_MAP)?.try_into().map_err(map_error(CONFIG_MAP))?,
            stats: get(STATS_MAP)?.try_into().map_err(map_error(STATS_MAP))?,
        })
    }

    /// How many entries each growing map can hold.
    pub fn capacity(&self) -> Result<Capacity, DatapathError> {
        let max = |map: &MapData, name: &'static str| {
            map.info()
                .map(|info| info.max_entries())
                .map_err(map_error(name))
        };
        Ok(Capacity {
            services: max(&self.services, SERVICE_MAP)?,
            backends: max(&self.backends, BACKEND_MAP)?,
            affinity_matches: max(&self.affinity_matches, AFFINITY_MATCH_MAP)?,
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

    /// Reads the maps back into the agent's terms, a batch of entries per syscall.
    pub fn read(&self) -> Result<Snapshot, DatapathError> {
        let read_error = |map: &'static str| move |source| DatapathError::Read { map, source };
        let mut backends = BTreeMap::new();
        for (id, backend) in bpf::lookup_all::<BackendId, Backend>(self.backends.fd().as_fd())
            .map_err(read_error(BACKEND_MAP))?
        {
            backends.insert(
                id,
                BackendAddr {
                    address: ip_from_map(backend.address),
                    port: port_from_map(backend.port),
                },
            );
        }

        let mut masters = BTreeMap::new();
        let mut slots = BTreeMap::new();
        let mut orphans = Vec::new();
        for (key, value) in bpf::lookup_all::<ServiceKey, ServiceValue>(self.services.fd().as_fd())
            .map_err(read_error(SERVICE_MAP))?
        {
            let Some(frontend) = frontend_of(&key) else {
                orphans.push(key);
                continue;
            };
            if key.slot == MASTER_SLOT {
                masters.insert(frontend, value);
            } else {
                // A slot that does not hold its backend as the backend map has it reads as
                // id 0, which no backend has, so that the next plan rewrites it.
                let holds_its_backend = backends
                    .get(&value.backend_id)
                    .is_some_and(|addr| value.backend() == Some(backend_value(addr)));
                let id = if holds_its_backend {
                    value.backend_id
                } else {
                    0
                };
                slots.insert((frontend, key.slot), (key, id));
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

        let affinity_matches =
            bpf::lookup_all::<AffinityMatchKey, u32>(self.affinity_matches.fd().as_fd())
                .map_err(read_error(AFFINITY_MATCH_MAP))?
                .into_iter()
                .map(|(key, _)| key)
                .collect();
        Ok(Snapshot {
            programmed: Programmed::new(frontends, backends, affinity_matches),
            orphans,
        })
    }

    /// Performs `ops` in order: each run of ops on one map that all write (or all delete) is
    /// one batched syscall, which the kernel applies entry by entry in order, so a
    /// concurrent connect sees every prefix of the plan, as with single writes.
    ///
    /// A slot holds its backend's address: `backends` are those the maps held before `ops`
    /// (the ones `ops` add are in `ops`).
    pub fn apply(
        &mut self,
        ops: &[MapOp],
        backends: &BTreeMap<BackendId, BackendAddr>,
    ) -> Result<(), DatapathError> {
        let added: crate::hash::Map<BackendId, BackendAddr> = ops
            .iter()
            .filter_map(|op| match op {
                MapOp::PutBackend(id, addr) => Some((*id, *addr)),
                _ => None,
            })
            .collect();
        let resolve = |id: &BackendId| added.get(id).or_else(|| backends.get(id)).copied();
        let mut rest = ops;
        while let Some(first) = rest.first() {
            let class = OpClass::of(first);
            let run = rest
                .iter()
                .position(|op| OpClass::of(op) != class)
                .unwrap_or(rest.len());
            let (batch, after) = rest.split_at(run);
            self.apply_run(class, batch, &resolve)?;
            rest = after;
        }
        Ok(())
    }

    /// One run of ops of `class`; `resolve` gives a slot's backend by id.
    fn apply_run(
        &self,
        class: OpClass,
        ops: &[MapOp],
        resolve: &dyn Fn(&BackendId) -> Option<BackendAddr>,
    ) -> Result<(), DatapathError> {
        let (map, name) = match class {
            OpClass::PutBackend | OpClass::DeleteBackend => (&self.backends, BACKEND_MAP),
            OpClass::PutService | OpClass::DeleteService => (&self.services, SERVICE_MAP),
            OpClass::PutMatch | OpClass::DeleteMatch => {
                (&self.affinity_matches, AFFINITY_MATCH_MAP)
            }
        };
        let fd = map.fd().as_fd();
        let result = match class {
            OpClass::PutBackend => {
                let (ids, values): (Vec<BackendId>, Vec<Backend>) = ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::PutBackend(id, addr) => Some((*id, backend_value(addr))),
                        _ => None,
                    })
                    .unzip();
                bpf::update(fd, &ids, &values)
            }
            OpClass::DeleteBackend => {
                let ids: Vec<BackendId> = ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::DeleteBackend(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                bpf::delete(fd, &ids)
            }
            OpClass::PutService => {
                let (keys, values): (Vec<ServiceKey>, Vec<ServiceValue>) = ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::PutSlot(frontend, slot, id) => Some((
                            key_of(frontend, *slot),
                            // An id that does not resolve (a bug) reads as address 0,
                            // which the datapath leaves untranslated and counts.
                            ServiceValue::slot(
                                *id,
                                resolve(id)
                                    .map_or(Backend::new([0; 4], 0), |addr| backend_value(&addr)),
                            ),
                        )),
                        MapOp::PutMaster(frontend, master) => {
                            Some((key_of(frontend, MASTER_SLOT), master_value(master)))
                        }
                        _ => None,
                    })
                    .unzip();
                // A frontend's slots and then its master stay in one part, in that order:
                // a master never counts slots not yet written.
                let starts = bpf::concurrent_starts(ops.len(), |at| {
                    matches!(ops.get(at.wrapping_sub(1)), Some(MapOp::PutMaster(..)))
                });
                bpf::update_concurrently(fd, &keys, &values, &starts)
            }
            OpClass::DeleteService => {
                let keys: Vec<ServiceKey> = ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::DeleteSlot(frontend, slot) => Some(key_of(frontend, *slot)),
                        MapOp::DeleteMaster(frontend) => Some(key_of(frontend, MASTER_SLOT)),
                        _ => None,
                    })
                    .collect();
                bpf::delete(fd, &keys)
            }
            OpClass::PutMatch => {
                let keys: Vec<AffinityMatchKey> = ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::PutAffinityMatch(key) => Some(*key),
                        _ => None,
                    })
                    .collect();
                bpf::update(fd, &keys, &vec![1u32; keys.len()])
            }
            OpClass::DeleteMatch => {
                let keys: Vec<AffinityMatchKey> = ops
                    .iter()
                    .filter_map(|op| match op {
                        MapOp::DeleteAffinityMatch(key) => Some(*key),
                        _ => None,
                    })
                    .collect();
                bpf::delete(fd, &keys)
            }
        };
        result.map_err(write_error(map, name, ops.len()))
    }

    /// Writes everything `programmed` holds into these (empty) maps: a new generation,
    /// before any program uses it.
    fn fill(&self, programmed: &Programmed) -> Result<(), DatapathError> {
        let mut ops: Vec<MapOp> = programmed
            .backends
            .iter()
            .map(|(id, addr)| MapOp::PutBackend(*id, *addr))
            .collect();
        ops.extend(
            programmed
                .affinity_matches
                .iter()
                .map(|key| MapOp::PutAffinityMatch(*key)),
        );
        for (frontend, programmed) in &programmed.frontends {
            for (index, id) in programmed.slots.iter().enumerate() {
                let slot = u16::try_from(index + 1).unwrap_or(u16::MAX);
                ops.push(MapOp::PutSlot(*frontend, slot, *id));
            }
            ops.push(MapOp::PutMaster(*frontend, programmed.clone()));
        }
        let resolve = |id: &BackendId| programmed.backends.get(id).copied();
        self.apply_run(
            OpClass::PutBackend,
            &ops[..programmed.backends.len()],
            &resolve,
        )?;
        let (matches, services) =
            ops[programmed.backends.len()..].split_at(programmed.affinity_matches.len());
        self.apply_run(OpClass::PutMatch, matches, &resolve)?;
        self.apply_run(OpClass::PutService, services, &resolve)
    }

    /// Keeps [`CLUSTER_IP_MAP`] in line with `programmed`: an address is in it while a
    /// clusterIP frontend on it is in the maps. `changed` are the addresses whose frontends
    /// the last writes touched; with `all` (after the maps were read back), every address
    /// is looked at, those the map holds included.
    pub fn update_cluster_ips(
        &mut self,
        programmed: &Programmed,
        changed: impl IntoIterator<Item = IpAddr>,
        all: bool,
    ) -> Result<(), DatapathError> {
        let (added, removed): (Vec<IpAddr>, Vec<IpAddr>) = if all {
            // One pass over the frontends, not a look per address: at 100k Services this is
            // the first sync.
            self.held_cluster_ips = self.cluster_ips()?;
            let wanted: std::collections::BTreeSet<IpAddr> = programmed
                .frontends
                .iter()
                .filter(|(_, frontend)| frontend.flags & lb_common::FLAG_CLUSTER_IP != 0)
                .map(|(frontend, _)| frontend.address)
                .collect();
            (
                wanted.difference(&self.held_cluster_ips).copied().collect(),
                self.held_cluster_ips.difference(&wanted).copied().collect(),
            )
        } else {
            let changed: std::collections::BTreeSet<IpAddr> = changed.into_iter().collect();
            let held = &self.held_cluster_ips;
            changed
                .into_iter()
                .filter(|address| programmed.has_cluster_ip(*address) != held.contains(address))
                .partition(|address| !held.contains(address))
        };
        let fd = self.cluster_ips.fd().as_fd();
        let write_error = |entries| write_error(&self.cluster_ips, CLUSTER_IP_MAP, entries);
        let keys = |addresses: &[IpAddr]| -> Vec<MapAddress> {
            addresses
                .iter()
                .map(|address| ip_to_map(*address))
                .collect()
        };
        if !removed.is_empty() {
            bpf::delete(fd, &keys(&removed)).map_err(write_error(removed.len()))?;
            for address in &removed {
                self.held_cluster_ips.remove(address);
            }
        }
        if !added.is_empty() {
            let starts = bpf::concurrent_starts(added.len(), |_| true);
            bpf::update_concurrently(fd, &keys(&added), &vec![1u32; added.len()], &starts)
                .map_err(write_error(added.len()))?;
            self.held_cluster_ips.extend(added);
        }
        Ok(())
    }

    /// The addresses [`CLUSTER_IP_MAP`] holds, read from the map.
    pub fn cluster_ips(&self) -> Result<std::collections::BTreeSet<IpAddr>, DatapathError> {
        Ok(
            bpf::lookup_all::<MapAddress, u32>(self.cluster_ips.fd().as_fd())
                .map_err(|source| DatapathError::Read {
                    map: CLUSTER_IP_MAP,
                    source,
                })?
                .into_iter()
                .map(|(address, _)| ip_from_map(address))
                .collect(),
        )
    }

    /// How many addresses [`CLUSTER_IP_MAP`] holds.
    pub fn cluster_ip_count(&self) -> usize {
        self.held_cluster_ips.len()
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        bpf::delete_one(self.services.fd().as_fd(), key).map_err(|source| DatapathError::Write {
            map: SERVICE_MAP,
            entries: 1,
            capacity: 0,
            source,
        })
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

fn key_of(frontend: &Frontend, slot: u16) -> ServiceKey {
    ServiceKey::new(
        ip_to_map(frontend.address),
        port_to_map(frontend.port),
        frontend.protocol.number(),
        slot,
    )
}

fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        address: ip_from_map(key.address),
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
    crate::dirs::ensure_private(pin_dir, "--bpffs")?;
    let dir = std::fs::File::open(pin_dir).map_err(dir_error)?;
    PinLock::take(dir, pin_dir)
}

impl PinLock {
    /// The lock of the open directory `dir` (`pin_dir`), unless another process holds it.
    fn take(dir: std::fs::File, pin_dir: &Path) -> Result<Self, DatapathError> {
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map(|lock| Self { _lock: lock })
            .map_err(|(_, errno)| DatapathError::Locked {
                dir: pin_dir.into(),
                reason: errno.desc().to_owned(),
            })
    }
}

/// Locks `pin_dir` as an agent does, if it exists (without creating it): for `lb unload`,
/// which must not take apart what a running agent would attach again. `Err(Locked)` while
/// an agent holds it; `None` when there is no such directory.
pub fn lock_existing(pin_dir: &Path) -> Result<Option<PinLock>, DatapathError> {
    let dir = match std::fs::File::open(pin_dir) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DatapathError::CreateDir {
                path: pin_dir.into(),
                source,
            });
        }
    };
    PinLock::take(dir, pin_dir).map(Some)
}

/// The maps that grow with the cluster, by pin name.
const GROWING_MAPS: [&str; 3] = [SERVICE_MAP, BACKEND_MAP, AFFINITY_MATCH_MAP];

/// Where a growing map's next generation is pinned while it is filled; renamed over the
/// current pin once the programs use it (bpffs refuses names with a dot).
fn next_pin(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join(format!("{map}_next"))
}

/// The loaded datapath: programs attached to a cgroup, links and maps pinned.
pub struct Datapath {
    /// Holds the program fds; the pinned links keep the programs attached without it.
    ebpf: Ebpf,
    pub maps: ServiceMaps,
    pin_dir: PathBuf,
    /// Where the programs are attached: [`Datapath::repair`] attaches them there again.
    cgroup: PathBuf,
    /// Every map's kernel id, by pin name: a map whose pin was removed lives on (the
    /// programs hold it) and is pinned again from its id.
    map_ids: Vec<(&'static str, u32)>,
    /// The programs of the previous layout ([`lb_common::PREVIOUS_LAYOUT_MAPS`]) still hold
    /// the link pins: this layout's links are pinned at their [`next_pin`] until its maps
    /// are filled ([`Datapath::complete_takeover`]).
    takeover: bool,
}

/// Whether `pin_dir` holds anything lb pins (of this layout or the previous one): a start
/// that fails leaves what it found, and removes what it made only when it found nothing.
pub fn anything_pinned(pin_dir: &Path) -> bool {
    MAPS.iter()
        .chain(&lb_common::PREVIOUS_LAYOUT_MAPS)
        .map(|map| (*map).to_owned())
        .chain(PROGRAMS.iter().map(|name| link_pin(name)))
        .any(|pin| pin_dir.join(pin).exists())
}

/// Checks the key and value sizes of every map pinned in `pin_dir` against this build's
/// ([`lb_common::MAP_LAYOUTS`]) before the object reuses them: a map of another build is
/// named with its sizes, where the verifier would print a program dump.
fn check_pinned_layouts(pin_dir: &Path) -> Result<(), DatapathError> {
    for (map, key, value) in lb_common::MAP_LAYOUTS {
        let path = pin_dir.join(map);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .map_err(|source| DatapathError::NotPinned {
                dir: pin_dir.into(),
                map,
                source,
            })?
            .info()
            .map_err(map_error(map))?;
        let found = (info.key_size() as usize, info.value_size() as usize);
        if found != (key, value) {
            return Err(DatapathError::Layout {
                map,
                expected: (key, value),
                found,
            });
        }
    }
    Ok(())
}

/// Whether `pin_dir` holds the pins of an agent of the previous layout: its programs
/// translate connects until this layout's maps are filled.
fn previous_layout_pinned(pin_dir: &Path) -> bool {
    lb_common::PREVIOUS_LAYOUT_MAPS
        .iter()
        .any(|map| pin_dir.join(map).exists())
}

/// Loads the object: maps already pinned in `pin_dir` are reused (with the size they
/// have), missing ones are created with `capacity`. With `next`, the growing maps are new
/// ones pinned at their [`next_pin`] instead.
fn load_object(pin_dir: &Path, capacity: Capacity, next: bool) -> Result<Ebpf, DatapathError> {
    let next_pins: Vec<(&'static str, PathBuf)> = GROWING_MAPS
        .iter()
        .map(|map| (*map, next_pin(pin_dir, map)))
        .collect();
    let mut loader = EbpfLoader::new();
    // The socket storage is a BTF map, which has no pinning attribute: it is pinned by
    // name here like the others, and shared by every generation and agent.
    let sockets = pin_dir.join(SOCKET_MAP);
    loader
        .map_pin_path(SOCKET_MAP, sockets.as_path())
        .default_map_pin_directory(pin_dir)
        .map_max_entries(SERVICE_MAP, capacity.services)
        .map_max_entries(BACKEND_MAP, capacity.backends)
        .map_max_entries(AFFINITY_MATCH_MAP, capacity.affinity_matches);
    if next {
        for (map, path) in &next_pins {
            loader.map_pin_path(map, path.as_path());
        }
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// Removes the next-generation pins a growth or a takeover that was interrupted left behind
/// (a link's removal detaches its programs, which were never the only ones attached).
fn remove_next_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    let links = PROGRAMS.iter().map(|name| link_pin(name));
    for pin in GROWING_MAPS
        .iter()
        .map(|map| (*map).to_owned())
        .chain(links)
    {
        let path = next_pin(pin_dir, &pin);
        if unpin(&path)? {
            tracing::info!("removed {} left by an interrupted update", path.display());
        }
    }
    Ok(())
}

/// Removes the pin at `path`; `false` if there was none.
fn unpin(path: &Path) -> Result<bool, DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DatapathError::Unpin {
            path: path.into(),
            source,
        }),
    }
}

/// One of the datapath's programs, loaded: the socket-address hooks (connect, sendmsg,
/// recvmsg, getpeername) and the socket hooks (post_bind) are different program types.
enum LoadedProgram<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    Sock(&'a mut CgroupSock),
}

impl LoadedProgram<'_> {
    /// Attaches program `name` to `cgroup` through a bpf_link, to be pinned at `pin`.
    fn attach(
        self,
        cgroup: &File,
        name: &'static str,
        pin: &Path,
    ) -> Result<FdLink, DatapathError> {
        let program_error = |source| DatapathError::Program {
            program: name,
            source,
        };
        let link_error = |e: aya::programs::links::LinkError| DatapathError::Link {
            path: pin.into(),
            reason: e.to_string(),
        };
        // A bpf_link on a cgroup always runs alongside other links (the kernel rejects the
        // ALLOW_MULTI flag there as implied).
        match self {
            Self::SockAddr(program) => {
                let id = program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_error)?;
                let link = program.take_link(id).map_err(program_error)?;
                link.try_into().map_err(link_error)
            }
            Self::Sock(program) => {
                let id = program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_error)?;
                let link = program.take_link(id).map_err(program_error)?;
                link.try_into().map_err(link_error)
            }
        }
    }
}

/// Program `name` of `ebpf`, by its type.
fn program_of<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LoadedProgram<'a>, DatapathError> {
    match ebpf.program_mut(name).ok_or(DatapathError::Missing(name))? {
        Program::CgroupSockAddr(program) => Ok(LoadedProgram::SockAddr(program)),
        Program::CgroupSock(program) => Ok(LoadedProgram::Sock(program)),
        _ => Err(DatapathError::Program {
            program: name,
            source: ProgramError::UnexpectedProgramType,
        }),
    }
}

/// Program `name` of `ebpf`, loaded into the kernel.
fn loaded_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LoadedProgram<'a>, DatapathError> {
    let mut program = program_of(ebpf, name)?;
    match &mut program {
        LoadedProgram::SockAddr(program) => program.load(),
        LoadedProgram::Sock(program) => program.load(),
    }
    .map_err(|source| DatapathError::Program {
        program: name,
        source,
    })?;
    Ok(program)
}

/// Loads the programs (reusing maps already pinned in `pin_dir`; new ones get `capacity`),
/// attaches them to `cgroup` and pins their links, replacing links an earlier agent pinned
/// there.
pub fn load(pin_dir: &Path, cgroup: &Path, capacity: Capacity) -> Result<Datapath, DatapathError> {
    // [`lock`], which the agent takes first, made sure the directory is its alone.
    mounts::ensure_bpffs(pin_dir)?;
    remove_next_pins(pin_dir)?;
    check_pinned_layouts(pin_dir)?;
    let takeover = previous_layout_pinned(pin_dir);
    if takeover {
        tracing::info!(
            "{} holds the previous layout's maps: its programs stay attached until this agent's maps are filled",
            pin_dir.display()
        );
    }
    let mut ebpf = load_object(pin_dir, capacity, false)?;
    let map_ids = map_ids(&ebpf);
    let maps = ServiceMaps::take(&mut ebpf)?;

    let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
        path: cgroup.into(),
        source,
    })?;
    for name in PROGRAMS {
        // The old agent's link stays attached until the new one is pinned in its place, so
        // no socket goes untranslated during a restart.
        let pin = link_path(pin_dir, name, takeover);
        let link = loaded_program(&mut ebpf, name)?.attach(&cgroup_file, name, &pin)?;
        replace_pinned_link(&pin, link)?;
    }
    Ok(Datapath {
        ebpf,
        maps,
        pin_dir: pin_dir.into(),
        cgroup: cgroup.into(),
        map_ids,
        takeover,
    })
}

/// The kernel id of every map of `ebpf` that lb pins.
fn map_ids(ebpf: &Ebpf) -> Vec<(&'static str, u32)> {
    MAPS.iter()
        .filter_map(|name| {
            let data = match ebpf.map(name)? {
                Map::Array(data)
                | Map::HashMap(data)
                | Map::LruHashMap(data)
                | Map::PerCpuArray(data)
                | Map::SkStorage(data) => data,
                _ => return None,
            };
            Some((*name, data.info().ok()?.id()))
        })
        .collect()
}

/// What [`Datapath::repair`] put back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Programs attached again (their link pin was gone, or its link detached).
    pub programs: Vec<&'static str>,
    /// Maps pinned again.
    pub maps: Vec<&'static str>,
}

impl Repairs {
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty() && self.maps.is_empty()
    }
}

/// Where `program`'s link is pinned: at its [`link_pin`], or beside it while this layout
/// takes over from the previous one.
fn link_path(pin_dir: &Path, program: &str, takeover: bool) -> PathBuf {
    if takeover {
        next_pin(pin_dir, &link_pin(program))
    } else {
        pin_dir.join(link_pin(program))
    }
}

impl Datapath {
    /// Puts back what was taken from under the agent: a link pin removed (which detached
    /// its program) or a link detached (`bpftool link detach`) gets the program attached
    /// again and pinned; a map pin removed, or replaced by another map, is pinned again
    /// (the map itself lived on).
    /// Nothing is done during a takeover, whose pins are in flux.
    pub fn repair(&mut self) -> Result<Repairs, DatapathError> {
        let mut repairs = Repairs::default();
        if self.takeover {
            return Ok(repairs);
        }
        let mut cgroup = None;
        for name in PROGRAMS {
            let pin = link_path(&self.pin_dir, name, false);
            // A detached link keeps its pin but names no cgroup any more.
            if links::cgroup_link(&pin).is_ok_and(|link| link.cgroup_id != 0) {
                continue;
            }
            if cgroup.is_none() {
                cgroup =
                    Some(
                        File::open(&self.cgroup).map_err(|source| DatapathError::Cgroup {
                            path: self.cgroup.clone(),
                            source,
                        })?,
                    );
            }
            let Some(cgroup) = cgroup.as_ref() else {
                continue;
            };
            // Loaded at start, and still: only its link went.
            let link = program_of(&mut self.ebpf, name)?.attach(cgroup, name, &pin)?;
            replace_pinned_link(&pin, link)?;
            repairs.programs.push(name);
        }
        for (name, id) in &self.map_ids {
            let pin = self.pin_dir.join(name);
            let pinned = MapData::from_pin(&pin)
                .ok()
                .and_then(|map| map.info().ok())
                .map(|info| info.id());
            if pinned == Some(*id) {
                continue;
            }
            // Gone, or something else under its name (another map, a file) that the CLI
            // and the next agent would read: pinned beside it, then renamed over it, so
            // that a failure leaves what was there. The directory is the agent's own.
            let beside = self.pin_dir.join(format!("{name}_repin"));
            unpin(&beside)?;
            MapData::from_id(*id)
                .map_err(map_error(name))?
                .pin(&beside)
                .map_err(|source| DatapathError::Pin {
                    path: beside.clone(),
                    source,
                })?;
            std::fs::rename(&beside, &pin).map_err(|source| DatapathError::Unpin {
                path: pin.clone(),
                source,
            })?;
            repairs.maps.push(name);
        }
        Ok(repairs)
    }

    /// A descriptor of the socket storage map, [`SOCKET_MAP`].
    pub fn socket_storage(&self) -> Result<std::os::fd::OwnedFd, DatapathError> {
        let path = self.pin_dir.join(SOCKET_MAP);
        bpf::open_pin(&path).map_err(|source| DatapathError::OpenPin { path, source })
    }

    /// Once this layout's maps hold what the source says: its links take the link pins of
    /// the previous layout's programs, which detaches them (until then both ran: the older
    /// first, and whatever one translated the other left alone), and the previous layout's
    /// maps lose their pins. Sockets that the previous programs translated keep their
    /// backend, but show it, not the Service, on getpeername and recvmsg.
    pub fn complete_takeover(&mut self) -> Result<(), DatapathError> {
        if !self.takeover {
            return Ok(());
        }
        for name in PROGRAMS {
            let (from, to) = (
                link_path(&self.pin_dir, name, true),
                link_path(&self.pin_dir, name, false),
            );
            // A rename replaces the pin at once: the old link's last reference goes and its
            // program detaches, with this one already attached beside it.
            std::fs::rename(&from, &to).map_err(|source| DatapathError::Unpin {
                path: from.clone(),
                source,
            })?;
        }
        self.takeover = false;
        for map in lb_common::PREVIOUS_LAYOUT_MAPS {
            unpin(&self.pin_dir.join(map))?;
        }
        tracing::info!(
            "took over from the previous layout: its programs are detached and its maps unpinned"
        );
        Ok(())
    }

    /// Moves the datapath to larger maps without a connect going untranslated: a new
    /// generation of the growing maps is created and filled with what the maps hold
    /// (`programmed`), programs that use it are loaded, every pinned link is switched to
    /// them atomically (`BPF_LINK_UPDATE`), and the new maps take the old ones' pins. The
    /// maps the kernel fills (socket storage, affinity), the counters and the config are
    /// shared by both generations, so sockets keep what they had.
    ///
    /// Until the last link switches, some hooks run the old programs on the old maps and
    /// some the new on the new, which hold the same; nothing is written meanwhile. On
    /// failure, the links already switched go back and the old generation stays.
    pub fn grow(
        &mut self,
        capacity: Capacity,
        programmed: &Programmed,
    ) -> Result<(), DatapathError> {
        remove_next_pins(&self.pin_dir)?;
        let result = self.grow_into(capacity, programmed);
        if result.is_err() {
            // The old generation stays: what was made for the new one goes.
            drop(remove_next_pins(&self.pin_dir));
        }
        result
    }

    fn grow_into(
        &mut self,
        capacity: Capacity,
        programmed: &Programmed,
    ) -> Result<(), DatapathError> {
        let mut ebpf = load_object(&self.pin_dir, capacity, true)?;
        let new_map_ids = map_ids(&ebpf);
        let maps = ServiceMaps::take(&mut ebpf)?;
        maps.fill(programmed)?;
        let mut links = Vec::new();
        for name in PROGRAMS {
            loaded_program(&mut ebpf, name)?;
            let path = link_path(&self.pin_dir, name, self.takeover);
            let link = bpf::open_pin(&path).map_err(|source| DatapathError::Relink {
                path: path.clone(),
                source,
            })?;
            links.push((name, path, link));
        }
        let program_fd =
            |ebpf: &Ebpf, name: &'static str| -> Result<std::os::fd::OwnedFd, DatapathError> {
                ebpf.program(name)
                    .ok_or(DatapathError::Missing(name))?
                    .fd()
                    .and_then(|fd| fd.as_fd().try_clone_to_owned().map_err(Into::into))
                    .map_err(|source| DatapathError::Program {
                        program: name,
                        source,
                    })
            };
        // Every fd is in hand before the first link switches: from there on, only a link
        // update can fail, and then the switched ones go back.
        let mut switches = Vec::new();
        for (name, path, link) in links {
            let new = program_fd(&ebpf, name)?;
            let old = program_fd(&self.ebpf, name)?;
            switches.push((name, path, link, new, old));
        }
        for (switched, (_, path, link, new, _)) in switches.iter().enumerate() {
            if let Err(source) = bpf::update_link(link.as_fd(), new) {
                // Back to the old programs, which still have the old maps.
                for (name, path, link, _, old) in &switches[..switched] {
                    if let Err(e) = bpf::update_link(link.as_fd(), old) {
                        tracing::error!(
                            "switching {name} ({}) back to the old maps: {e}",
                            path.display()
                        );
                    }
                }
                return Err(DatapathError::Relink {
                    path: path.clone(),
                    source,
                });
            }
        }
        // Every hook runs the new programs on the new maps: from here on they are the
        // datapath, whatever happens to the pins. The old maps go with the old programs.
        drop(std::mem::replace(&mut self.ebpf, ebpf));
        self.map_ids = new_map_ids;
        // The clusterIP map is not a growing one: both generations share it.
        let held = std::mem::take(&mut self.maps.held_cluster_ips);
        self.maps = maps;
        self.maps.held_cluster_ips = held;
        for map in GROWING_MAPS {
            let (from, to) = (next_pin(&self.pin_dir, map), self.pin_dir.join(map));
            if let Err(source) = std::fs::rename(&from, &to) {
                // Only `lb`, which reads the pins, is affected: it would read the old maps.
                tracing::error!(
                    "moving the pin {} to {}: {source}; `lb` commands read stale maps until the agent restarts",
                    from.display(),
                    to.display()
                );
            }
        }
        Ok(())
    }
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
    let next_generation = GROWING_MAPS
        .iter()
        .map(|map| (*map).to_owned())
        .chain(links.clone())
        .map(|pin| next_pin(Path::new(""), &pin).to_string_lossy().into_owned());
    let maps = MAPS.iter().chain(&lb_common::PREVIOUS_LAYOUT_MAPS);
    for pin in links
        .chain(maps.map(|m| (*m).to_owned()))
        .chain(next_generation)
    {
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
