//! What the fuzz targets (`lb-userspace/fuzz`) drive and check lb through, and nothing
//! else uses: the entry points each input surface reaches the agent by, and the maps as
//! the datapath sees them, in memory. Not part of lb's interface.

use std::collections::{BTreeMap, BTreeSet};

pub use lb_common::AffinityMatchKey;

pub use crate::source::{
    kubernetes::FedWatches,
    parse::{Readings, readings},
};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
/// What the API server sends a watch, and a page of a list, as kube-rs reads them.
pub use kube::core::{ObjectList, WatchEvent};
/// What kube-rs's watcher makes of them, as the agent's watches take it.
pub use kube::runtime::watcher::Event as WatcherEvent;

use crate::{
    model::{BackendAddr, Frontend},
    plan::{BackendId, Capacity, FrontendId, MapOp, Programmed, ProgrammedFrontend},
};

/// The first of `ops`, written in order onto maps that hold `current`, after which the
/// maps hold more than `peak` said (or than they held already, where that is more), and
/// what they hold then: growing the maps to the peak before a plan must be enough.
pub fn over_peak(current: &Programmed, ops: &[MapOp], peak: Capacity) -> Option<(usize, Capacity)> {
    let before = current.usage();
    let bound = Capacity {
        services: peak.services.max(before.services),
        backends: peak.backends.max(before.backends),
        affinity_matches: peak.affinity_matches.max(before.affinity_matches),
    };
    let mut state = current.clone();
    ops.iter().enumerate().find_map(|(at, op)| {
        state.apply(std::slice::from_ref(op));
        bound.overflow(&state.usage()).map(|_| (at, state.usage()))
    })
}

/// A frontend's master entry in the service map (slot 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Master {
    /// The slots `1..=count` a connect picks from.
    pub count: u16,
    pub id: FrontendId,
    pub flags: u16,
    pub affinity_timeout_s: u32,
}

/// An entry of the service map: a master, or a slot naming a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceEntry {
    Master(Master),
    Slot(BackendId),
}

/// The BPF maps a plan writes, as the datapath sees them after each single write: for
/// unit tests and fuzz targets to replay plans on and check what a connect finds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimulatedMaps {
    /// The service map: per frontend, the master at slot 0 and the slots `1..`.
    pub services: BTreeMap<(Frontend, u16), ServiceEntry>,
    pub backends: BTreeMap<BackendId, BackendAddr>,
    pub matches: BTreeSet<AffinityMatchKey>,
}

/// What a connect could find in maps a plan left inconsistent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("{frontend}: its master counts {count} slots, and slot {slot} is missing")]
    MissingSlot {
        frontend: Frontend,
        count: u16,
        slot: u16,
    },
    #[error("{frontend}: slot {slot} names backend {id}, which the backend map does not hold")]
    MissingBackend {
        frontend: Frontend,
        slot: u16,
        id: BackendId,
    },
    #[error("{frontend}: slot {slot} holds a {found} entry")]
    WrongEntry {
        frontend: Frontend,
        slot: u16,
        found: &'static str,
    },
}

/// A frontend's backends before a plan and after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OldAndNew {
    pub old: BTreeSet<BackendAddr>,
    pub new: BTreeSet<BackendAddr>,
}

/// What a connect found while a plan was written that it must not find.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exposed {
    #[error("after {op:?}: {source}")]
    Broken { op: Box<MapOp>, source: Broken },
    #[error(
        "after {op:?}: {frontend} reaches {seen:?}, outside its old {old:?} and its new {new:?} backends"
    )]
    Outside {
        op: Box<MapOp>,
        frontend: Frontend,
        seen: BTreeSet<BackendAddr>,
        old: BTreeSet<BackendAddr>,
        new: BTreeSet<BackendAddr>,
    },
    #[error("after {op:?}: {frontend} reaches no backend, while its old and new sets have some")]
    Lost { op: Box<MapOp>, frontend: Frontend },
}

impl SimulatedMaps {
    /// Performs `ops` one by one, as a connect at any moment of the plan sees them: after
    /// each, every master resolves to slots and backends that exist, and a connect to a
    /// frontend of `sets` reaches only backends of its old or its new set, and one at all
    /// while both have one.
    pub fn replay(
        &mut self,
        ops: &[MapOp],
        sets: &BTreeMap<Frontend, OldAndNew>,
    ) -> Result<(), Exposed> {
        for op in ops {
            self.apply(op);
            let exposed = |frontend| {
                let broken = |source| Exposed::Broken {
                    op: Box::new(op.clone()),
                    source,
                };
                let seen = self.reachable(&frontend).map_err(broken)?;
                let (Some(seen), Some(OldAndNew { old, new })) = (seen, sets.get(&frontend)) else {
                    return Ok(());
                };
                if seen.iter().any(|b| !old.contains(b) && !new.contains(b)) {
                    return Err(Exposed::Outside {
                        op: Box::new(op.clone()),
                        frontend,
                        seen,
                        old: old.clone(),
                        new: new.clone(),
                    });
                }
                if seen.is_empty() && !old.is_empty() && !new.is_empty() {
                    return Err(Exposed::Lost {
                        op: Box::new(op.clone()),
                        frontend,
                    });
                }
                Ok(())
            };
            self.frontends().try_for_each(exposed)?;
        }
        Ok(())
    }

    /// Performs one write of a plan.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend(id, addr) => {
                self.backends.insert(*id, *addr);
            }
            MapOp::PutSlot(frontend, slot, id) => {
                self.services
                    .insert((*frontend, *slot), ServiceEntry::Slot(*id));
            }
            MapOp::PutMaster(frontend, master) => {
                let master = Master {
                    count: u16::try_from(master.slots.len()).unwrap_or(u16::MAX),
                    id: master.id,
                    flags: master.flags,
                    affinity_timeout_s: master.affinity_timeout_s,
                };
                self.services
                    .insert((*frontend, 0), ServiceEntry::Master(master));
            }
            MapOp::PutAffinityMatch(key) => {
                self.matches.insert(*key);
            }
            MapOp::DeleteAffinityMatch(key) => {
                self.matches.remove(key);
            }
            MapOp::DeleteSlot(frontend, slot) => {
                self.services.remove(&(*frontend, *slot));
            }
            MapOp::DeleteMaster(frontend) => {
                self.services.remove(&(*frontend, 0));
            }
            MapOp::DeleteBackend(id) => {
                self.backends.remove(id);
            }
        }
    }

    /// The master of `frontend` and the backend id of each slot it counts, as a connect
    /// resolves them; `None` if the maps have no master for it.
    fn resolve(&self, frontend: &Frontend) -> Result<Option<(Master, Vec<BackendId>)>, Broken> {
        let master = match self.services.get(&(*frontend, 0)) {
            None => return Ok(None),
            Some(ServiceEntry::Master(master)) => *master,
            Some(ServiceEntry::Slot(_)) => {
                return Err(Broken::WrongEntry {
                    frontend: *frontend,
                    slot: 0,
                    found: "slot",
                });
            }
        };
        let slots = (1..=master.count)
            .map(|slot| match self.services.get(&(*frontend, slot)) {
                Some(ServiceEntry::Slot(id)) => Ok(*id),
                Some(ServiceEntry::Master(_)) => Err(Broken::WrongEntry {
                    frontend: *frontend,
                    slot,
                    found: "master",
                }),
                None => Err(Broken::MissingSlot {
                    frontend: *frontend,
                    count: master.count,
                    slot,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((master, slots)))
    }

    /// What a connect to `frontend` could reach right now: every backend any slot its
    /// master counts resolves to; `None` if the maps have no master for it.
    pub fn reachable(&self, frontend: &Frontend) -> Result<Option<BTreeSet<BackendAddr>>, Broken> {
        let Some((_, slots)) = self.resolve(frontend)? else {
            return Ok(None);
        };
        let mut reachable = BTreeSet::new();
        for (slot, id) in (1..).zip(slots) {
            let addr = self.backends.get(&id).ok_or(Broken::MissingBackend {
                frontend: *frontend,
                slot,
                id,
            })?;
            reachable.insert(*addr);
        }
        Ok(Some(reachable))
    }

    /// Every frontend with a master entry.
    pub fn frontends(&self) -> impl Iterator<Item = Frontend> + '_ {
        self.services
            .iter()
            .filter(|(_, entry)| matches!(entry, ServiceEntry::Master(_)))
            .map(|((frontend, _), _)| *frontend)
    }

    /// What an agent that starts on these maps reads back: every frontend whose master is
    /// there, with the slots it counts. The slots no master counts, which an interrupted
    /// plan leaves, are removed first, as the agent removes them.
    pub fn read_back(&mut self) -> Result<Programmed, Broken> {
        let mut frontends = BTreeMap::new();
        for frontend in self.frontends().collect::<Vec<_>>() {
            if let Some((master, slots)) = self.resolve(&frontend)? {
                frontends.insert(
                    frontend,
                    ProgrammedFrontend {
                        id: master.id,
                        flags: master.flags,
                        affinity_timeout_s: master.affinity_timeout_s,
                        slots,
                    },
                );
            }
        }
        self.services.retain(|(frontend, slot), _| {
            frontends
                .get(frontend)
                .is_some_and(|programmed| usize::from(*slot) <= programmed.slots.len())
        });
        Ok(Programmed::new(
            frontends,
            self.backends.clone(),
            self.matches.clone(),
        ))
    }
}
