//! From the state the maps hold to the state they should hold: an ordered list of map writes
//! that never exposes a half-written frontend to a concurrent connect().
//!
//! Order (after Cilium's service map updates):
//! 1. new backends;
//! 2. per changed frontend: its slots `1..=n`, then its master entry with count `n`, then the
//!    surplus slots `n+1..=old_n`, which no count points at any more;
//! 3. removed frontends: the master entry first, then its slots;
//! 4. backends no frontend references any more.
//!
//! At every step each master entry's count points at slots that exist and name backends that
//! exist, so a connect sees the old or the new backend set, never an empty or partial one.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{BackendAddr, Frontend};

/// Backend ids are map keys; 0 is never used so that a zeroed value is never a valid id.
pub type BackendId = u32;

/// What the maps hold, in the agent's terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// Backend id per slot: `slots[i]` is slot `i + 1`.
    pub frontends: BTreeMap<Frontend, Vec<BackendId>>,
    pub backends: BTreeMap<BackendId, BackendAddr>,
}

impl Programmed {
    /// The backends of `frontend` in slot order; ids that do not resolve are left out.
    pub fn backends_of(&self, frontend: &Frontend) -> Vec<BackendAddr> {
        self.frontends
            .get(frontend)
            .into_iter()
            .flatten()
            .filter_map(|id| self.backends.get(id).copied())
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(BackendId, BackendAddr),
    /// Slot `1..` of a frontend.
    PutSlot(Frontend, u16, BackendId),
    PutMaster(Frontend, u16),
    DeleteSlot(Frontend, u16),
    DeleteMaster(Frontend),
    DeleteBackend(BackendId),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("frontend {frontend} has {count} backends; a frontend holds at most {max}")]
    TooManyBackends {
        frontend: Frontend,
        count: usize,
        max: usize,
    },
}

/// The writes that turn `current` into `desired`, and the state they leave.
pub fn plan(
    current: &Programmed,
    desired: &BTreeMap<Frontend, BTreeSet<BackendAddr>>,
) -> Result<(Vec<MapOp>, Programmed), PlanError> {
    let max = usize::from(u16::MAX);
    if let Some((frontend, backends)) = desired.iter().find(|(_, b)| b.len() > max) {
        return Err(PlanError::TooManyBackends {
            frontend: *frontend,
            count: backends.len(),
            max,
        });
    }

    let mut ids: BTreeMap<BackendAddr, BackendId> = current
        .backends
        .iter()
        .map(|(id, addr)| (*addr, *id))
        .collect();
    let mut next = Programmed::default();
    let mut ops = Vec::new();

    // 1. Backends: keep the ids of known ones, give new ones the lowest free ids.
    let wanted: BTreeSet<BackendAddr> = desired.values().flatten().copied().collect();
    let mut free_ids = (1..).filter(|id| !current.backends.contains_key(id));
    for addr in &wanted {
        let id = match ids.get(addr) {
            Some(id) => *id,
            None => {
                let id = free_ids.next().unwrap_or(BackendId::MAX);
                ids.insert(*addr, id);
                ops.push(MapOp::PutBackend(id, *addr));
                id
            }
        };
        next.backends.insert(id, *addr);
    }

    // 2. Changed and new frontends.
    let mut surplus = Vec::new();
    for (frontend, backends) in desired {
        let slots: Vec<BackendId> = backends
            .iter()
            .filter_map(|addr| ids.get(addr).copied())
            .collect();
        let old = current.frontends.get(frontend);
        if old != Some(&slots) {
            let old_slots = old.map(Vec::as_slice).unwrap_or_default();
            for (index, id) in slots.iter().enumerate() {
                if old_slots.get(index) != Some(id) {
                    ops.push(MapOp::PutSlot(*frontend, slot_number(index), *id));
                }
            }
            ops.push(MapOp::PutMaster(*frontend, slot_count(slots.len())));
            for index in slots.len()..old_slots.len() {
                surplus.push(MapOp::DeleteSlot(*frontend, slot_number(index)));
            }
        }
        next.frontends.insert(*frontend, slots);
    }
    ops.extend(surplus);

    // 3. Removed frontends.
    for (frontend, old_slots) in &current.frontends {
        if !desired.contains_key(frontend) {
            ops.push(MapOp::DeleteMaster(*frontend));
            for index in 0..old_slots.len() {
                ops.push(MapOp::DeleteSlot(*frontend, slot_number(index)));
            }
        }
    }

    // 4. Backends nobody references.
    for id in current.backends.keys() {
        if !next.backends.contains_key(id) {
            ops.push(MapOp::DeleteBackend(*id));
        }
    }
    Ok((ops, next))
}

/// Slot number of the backend at `index`; `plan` bounds indexes by `u16::MAX`.
fn slot_number(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

fn slot_count(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    /// An in-memory copy of the two maps, to replay plans op by op.
    #[derive(Default)]
    struct Maps {
        services: BTreeMap<(Frontend, u16), (u16, BackendId)>,
        backends: BTreeMap<BackendId, BackendAddr>,
    }

    impl Maps {
        fn apply(&mut self, op: &MapOp) {
            match op {
                MapOp::PutBackend(id, addr) => {
                    self.backends.insert(*id, *addr);
                }
                MapOp::PutSlot(f, slot, id) => {
                    self.services.insert((*f, *slot), (0, *id));
                }
                MapOp::PutMaster(f, count) => {
                    self.services.insert((*f, 0), (*count, 0));
                }
                MapOp::DeleteSlot(f, slot) => {
                    self.services.remove(&(*f, *slot));
                }
                MapOp::DeleteMaster(f) => {
                    self.services.remove(&(*f, 0));
                }
                MapOp::DeleteBackend(id) => {
                    self.backends.remove(id);
                }
            }
        }

        /// What a connect to `frontend` could reach right now: `None` if the frontend is
        /// unknown, otherwise every backend any random slot resolves to.
        fn reachable(&self, frontend: &Frontend) -> Option<BTreeSet<BackendAddr>> {
            let (count, _) = self.services.get(&(*frontend, 0))?;
            let mut out = BTreeSet::new();
            for slot in 1..=*count {
                let (_, id) = self.services.get(&(*frontend, slot)).unwrap_or_else(|| {
                    panic!("{frontend} count {count} but slot {slot} is missing")
                });
                let addr = self
                    .backends
                    .get(id)
                    .unwrap_or_else(|| panic!("{frontend} slot {slot} names missing backend {id}"));
                out.insert(*addr);
            }
            Some(out)
        }
    }

    fn frontend(last: u8) -> Frontend {
        Frontend {
            address: Ipv4Addr::new(10, 96, 0, last),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(range: std::ops::Range<u8>) -> BTreeSet<BackendAddr> {
        range
            .map(|i| BackendAddr {
                address: Ipv4Addr::new(10, 244, 0, i),
                port: 8080,
            })
            .collect()
    }

    /// Replays `plan` op by op and checks that every connect during it reaches a backend of
    /// the old or the new set, and reaches one at all while both sets have one.
    fn step(
        maps: &mut Maps,
        current: &Programmed,
        desired: &BTreeMap<Frontend, BTreeSet<BackendAddr>>,
    ) -> (Programmed, usize) {
        let (ops, next) = plan(current, desired).unwrap();
        for op in &ops {
            maps.apply(op);
            for (f, new) in desired {
                let old: BTreeSet<_> = current.backends_of(f).into_iter().collect();
                if let Some(seen) = maps.reachable(f) {
                    let either: BTreeSet<_> = old.union(new).copied().collect();
                    assert!(
                        seen.is_subset(&either),
                        "after {op:?}: {f} reaches {seen:?}, outside old {old:?} and new {new:?}"
                    );
                    if !old.is_empty() && !new.is_empty() {
                        assert!(!seen.is_empty(), "after {op:?}: {f} lost all backends");
                    }
                }
            }
        }
        for (f, new) in desired {
            assert_eq!(maps.reachable(f).as_ref(), Some(new));
        }
        (next, ops.len())
    }

    #[test]
    fn scaling_up_down_and_away_never_exposes_a_partial_set() {
        let mut maps = Maps::default();
        let mut current = Programmed::default();
        for n in [1u8, 10, 0, 3, 7, 2] {
            let desired = BTreeMap::from([(frontend(1), backends(1..n + 1))]);
            (current, _) = step(&mut maps, &current, &desired);
            assert_eq!(current.backends.len(), usize::from(n));
        }
        let (current, _) = step(&mut maps, &current, &BTreeMap::new());
        assert_eq!(current, Programmed::default());
        assert!(maps.services.is_empty(), "{:?}", maps.services);
        assert!(maps.backends.is_empty(), "{:?}", maps.backends);
    }

    #[test]
    fn replacing_every_backend_keeps_the_frontend_reachable() {
        let mut maps = Maps::default();
        let desired = BTreeMap::from([(frontend(1), backends(1..4))]);
        let (current, _) = step(&mut maps, &Programmed::default(), &desired);
        let desired = BTreeMap::from([(frontend(1), backends(10..12))]);
        step(&mut maps, &current, &desired);
    }

    #[test]
    fn an_unchanged_state_writes_nothing() {
        let desired =
            BTreeMap::from([(frontend(1), backends(1..4)), (frontend(2), backends(3..6))]);
        let (_, current) = plan(&Programmed::default(), &desired).unwrap();
        let (ops, next) = plan(&current, &desired).unwrap();
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(next, current);
    }

    #[test]
    fn shared_backends_get_one_id_and_ids_stay_stable() {
        let desired =
            BTreeMap::from([(frontend(1), backends(1..4)), (frontend(2), backends(2..5))]);
        let (_, current) = plan(&Programmed::default(), &desired).unwrap();
        assert_eq!(current.backends.len(), 4);
        let id_of = |p: &Programmed, i: u8| {
            p.backends
                .iter()
                .find(|(_, a)| a.address == Ipv4Addr::new(10, 244, 0, i))
                .map(|(id, _)| *id)
        };
        // Dropping backend 1 must not renumber the others.
        let desired =
            BTreeMap::from([(frontend(1), backends(2..4)), (frontend(2), backends(2..5))]);
        let (ops, next) = plan(&current, &desired).unwrap();
        for i in 2..5 {
            assert_eq!(id_of(&current, i), id_of(&next, i));
        }
        assert!(ops.contains(&MapOp::DeleteBackend(id_of(&current, 1).unwrap())));
        assert!(!ops.iter().any(|op| matches!(op, MapOp::PutBackend(..))));
    }

    #[test]
    fn removed_frontends_lose_master_before_slots() {
        let desired = BTreeMap::from([(frontend(1), backends(1..3))]);
        let (_, current) = plan(&Programmed::default(), &desired).unwrap();
        let (ops, _) = plan(&current, &BTreeMap::new()).unwrap();
        assert_eq!(ops[0], MapOp::DeleteMaster(frontend(1)));
        assert!(matches!(ops.last(), Some(MapOp::DeleteBackend(_))));
    }
}
