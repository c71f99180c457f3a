//! From the state the maps hold to the state they should hold: an ordered list of map writes
//! that never exposes a half-written frontend to a concurrent connect().
//!
//! Order (after Cilium's service map updates):
//! 1. removed frontends: the master entry first, then its slots (this also frees room in a
//!    full map for what follows);
//! 2. new backends, and affinity matches new masters may rely on;
//! 3. per changed frontend: its slots `1..=n`, then its master entry with count `n`, then the
//!    surplus slots `n+1..=old_n`, which no count points at any more;
//! 4. backends and affinity matches nothing references any more.
//!
//! At every step each master entry's count points at slots that exist and name backends that
//! exist, so a connect sees the old or the new backend set, never an empty or partial one.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::AffinityMatchKey;

use crate::model::{BackendAddr, Frontend, FrontendSpec};

/// Backend ids are map keys; 0 is never used so that a zeroed value is never a valid id.
pub type BackendId = u32;
/// Frontend ids name a frontend in the affinity maps; 0 is never used either.
pub type FrontendId = u32;

/// One frontend as the maps hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub id: FrontendId,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// Backend id per slot: `slots[i]` is slot `i + 1`.
    pub slots: Vec<BackendId>,
}

impl ProgrammedFrontend {
    fn master_differs(&self, other: &Self) -> bool {
        (
            self.id,
            self.flags,
            self.affinity_timeout_s,
            self.slots.len(),
        ) != (
            other.id,
            other.flags,
            other.affinity_timeout_s,
            other.slots.len(),
        )
    }

    /// The affinity-match entries this frontend needs: one per backend, with affinity only.
    fn affinity_matches(&self) -> impl Iterator<Item = AffinityMatchKey> + '_ {
        self.slots
            .iter()
            .filter(|_| self.affinity_timeout_s != 0)
            .map(|backend_id| AffinityMatchKey {
                backend_id: *backend_id,
                frontend_id: self.id,
            })
    }
}

/// What the maps hold, in the agent's terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: BTreeMap<Frontend, ProgrammedFrontend>,
    pub backends: BTreeMap<BackendId, BackendAddr>,
    pub affinity_matches: BTreeSet<AffinityMatchKey>,
}

impl Programmed {
    /// The backends of `frontend` in slot order; ids that do not resolve are left out.
    pub fn backends_of(&self, frontend: &Frontend) -> Vec<BackendAddr> {
        self.frontends
            .get(frontend)
            .into_iter()
            .flat_map(|f| &f.slots)
            .filter_map(|id| self.backends.get(id).copied())
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(BackendId, BackendAddr),
    PutAffinityMatch(AffinityMatchKey),
    /// Slot `1..` of a frontend.
    PutSlot(Frontend, u16, BackendId),
    /// The master entry: id, flags, affinity and the slot count.
    PutMaster(Frontend, ProgrammedFrontend),
    DeleteSlot(Frontend, u16),
    DeleteMaster(Frontend),
    DeleteAffinityMatch(AffinityMatchKey),
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

/// The lowest ids not in `used`, in order.
fn free_ids<'a>(used: impl Fn(&u32) -> bool + 'a) -> impl Iterator<Item = u32> + 'a {
    (1..=u32::MAX).filter(move |id| !used(id))
}

/// The writes that turn `current` into `desired`, and the state they leave.
pub fn plan(
    current: &Programmed,
    desired: &BTreeMap<Frontend, FrontendSpec>,
) -> Result<(Vec<MapOp>, Programmed), PlanError> {
    let max = usize::from(u16::MAX);
    if let Some((frontend, spec)) = desired.iter().find(|(_, s)| s.backends.len() > max) {
        return Err(PlanError::TooManyBackends {
            frontend: *frontend,
            count: spec.backends.len(),
            max,
        });
    }

    let mut next = Programmed::default();
    let mut ops = Vec::new();

    // 0. Removed frontends go first, master before slots: that frees room in a full map for
    // what the rest of the plan adds, and nothing else refers to them.
    for (frontend, old) in &current.frontends {
        if !desired.contains_key(frontend) {
            ops.push(MapOp::DeleteMaster(*frontend));
            for index in 0..old.slots.len() {
                ops.push(MapOp::DeleteSlot(*frontend, slot_number(index)));
            }
        }
    }

    // 1. Backends: keep the ids of known ones, give new ones the lowest free ids.
    let mut backend_ids: BTreeMap<BackendAddr, BackendId> = current
        .backends
        .iter()
        .map(|(id, addr)| (*addr, *id))
        .collect();
    let wanted: BTreeSet<BackendAddr> = desired
        .values()
        .flat_map(|s| &s.backends)
        .copied()
        .collect();
    let mut new_backend_ids = free_ids(|id| current.backends.contains_key(id));
    for addr in &wanted {
        let id = match backend_ids.get(addr) {
            Some(id) => *id,
            None => {
                let id = new_backend_ids.next().unwrap_or(BackendId::MAX);
                backend_ids.insert(*addr, id);
                ops.push(MapOp::PutBackend(id, *addr));
                id
            }
        };
        next.backends.insert(id, *addr);
    }

    // The frontends as they will be, with stable ids.
    let used_frontend_ids: BTreeSet<FrontendId> =
        current.frontends.values().map(|f| f.id).collect();
    let mut new_frontend_ids = free_ids(|id| used_frontend_ids.contains(id));
    for (frontend, spec) in desired {
        let id = match current.frontends.get(frontend) {
            Some(old) => old.id,
            None => new_frontend_ids.next().unwrap_or(FrontendId::MAX),
        };
        let slots = spec
            .backends
            .iter()
            .filter_map(|addr| backend_ids.get(addr).copied())
            .collect();
        next.frontends.insert(
            *frontend,
            ProgrammedFrontend {
                id,
                flags: spec.flags,
                affinity_timeout_s: spec.affinity_timeout_s,
                slots,
            },
        );
    }

    // 2. Affinity matches a new master may rely on, before any master changes.
    next.affinity_matches = next
        .frontends
        .values()
        .flat_map(ProgrammedFrontend::affinity_matches)
        .collect();
    for key in next.affinity_matches.difference(&current.affinity_matches) {
        ops.push(MapOp::PutAffinityMatch(*key));
    }

    // 3. Changed and new frontends: slots, then the master, then the surplus slots.
    let mut surplus = Vec::new();
    for (frontend, new) in &next.frontends {
        let old = current.frontends.get(frontend);
        let old_slots = old.map(|o| o.slots.as_slice()).unwrap_or_default();
        for (index, id) in new.slots.iter().enumerate() {
            if old_slots.get(index) != Some(id) {
                ops.push(MapOp::PutSlot(*frontend, slot_number(index), *id));
            }
        }
        if old.is_none_or(|old| old.master_differs(new)) {
            ops.push(MapOp::PutMaster(*frontend, new.clone()));
        }
        for index in new.slots.len()..old_slots.len() {
            surplus.push(MapOp::DeleteSlot(*frontend, slot_number(index)));
        }
    }
    ops.extend(surplus);

    // 4. What nobody references any more.
    for key in current.affinity_matches.difference(&next.affinity_matches) {
        ops.push(MapOp::DeleteAffinityMatch(*key));
    }
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    /// An in-memory copy of the maps, to replay plans op by op.
    #[derive(Default)]
    struct Maps {
        services: BTreeMap<(Frontend, u16), (u16, BackendId)>,
        backends: BTreeMap<BackendId, BackendAddr>,
        matches: BTreeSet<AffinityMatchKey>,
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
                MapOp::PutMaster(f, master) => {
                    let count = u16::try_from(master.slots.len()).unwrap();
                    self.services.insert((*f, 0), (count, 0));
                }
                MapOp::PutAffinityMatch(key) => {
                    self.matches.insert(*key);
                }
                MapOp::DeleteAffinityMatch(key) => {
                    self.matches.remove(key);
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

    fn backends(range: std::ops::Range<u8>) -> FrontendSpec {
        FrontendSpec {
            backends: range
                .map(|i| BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, i),
                    port: 8080,
                })
                .collect(),
            flags: 0,
            affinity_timeout_s: 0,
        }
    }

    fn with_affinity(mut spec: FrontendSpec) -> FrontendSpec {
        spec.affinity_timeout_s = 60;
        spec
    }

    /// Replays `plan` op by op and checks that every connect during it reaches a backend of
    /// the old or the new set, and reaches one at all while both sets have one.
    fn step(
        maps: &mut Maps,
        current: &Programmed,
        desired: &BTreeMap<Frontend, FrontendSpec>,
    ) -> (Programmed, usize) {
        let (ops, next) = plan(current, desired).unwrap();
        for op in &ops {
            maps.apply(op);
            for (f, spec) in desired {
                let new = &spec.backends;
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
        for (f, spec) in desired {
            assert_eq!(maps.reachable(f).as_ref(), Some(&spec.backends));
        }
        assert_eq!(maps.matches, next.affinity_matches);
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
    fn affinity_matches_follow_the_backends_and_go_with_the_frontend() {
        let mut maps = Maps::default();
        let mut current = Programmed::default();
        for n in [2u8, 4, 1] {
            let desired = BTreeMap::from([(frontend(1), with_affinity(backends(1..n + 1)))]);
            (current, _) = step(&mut maps, &current, &desired);
            assert_eq!(current.affinity_matches.len(), usize::from(n));
        }
        // Turning affinity off removes its matches but keeps the frontend.
        let desired = BTreeMap::from([(frontend(1), backends(1..2))]);
        let (ops, next) = plan(&current, &desired).unwrap();
        assert!(next.affinity_matches.is_empty());
        assert!(
            ops.iter()
                .any(|op| matches!(op, MapOp::PutMaster(_, m) if m.affinity_timeout_s == 0))
        );
        (current, _) = step(&mut maps, &current, &desired);
        let (current, _) = step(&mut maps, &current, &BTreeMap::new());
        assert_eq!(current, Programmed::default());
    }

    #[test]
    fn frontend_ids_are_stable_and_reused_only_when_free() {
        let desired =
            BTreeMap::from([(frontend(1), backends(1..2)), (frontend(2), backends(1..2))]);
        let (_, current) = plan(&Programmed::default(), &desired).unwrap();
        let ids: Vec<_> = current.frontends.values().map(|f| f.id).collect();
        assert_eq!(ids, [1, 2]);
        let desired =
            BTreeMap::from([(frontend(2), backends(1..2)), (frontend(3), backends(1..2))]);
        let (_, next) = plan(&current, &desired).unwrap();
        assert_eq!(next.frontends[&frontend(2)].id, 2);
        assert_eq!(
            next.frontends[&frontend(3)].id,
            3,
            "id 1 is still in use until this plan is applied"
        );
    }

    #[test]
    fn a_flag_change_rewrites_only_the_master() {
        let desired = BTreeMap::from([(frontend(1), backends(1..3))]);
        let (_, current) = plan(&Programmed::default(), &desired).unwrap();
        let mut spec = backends(1..3);
        spec.flags = lb_common::FLAG_NODE_LOCAL;
        let (ops, _) = plan(&current, &BTreeMap::from([(frontend(1), spec)])).unwrap();
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(matches!(&ops[0], MapOp::PutMaster(_, m) if m.flags == lb_common::FLAG_NODE_LOCAL));
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

    #[test]
    fn removals_come_before_additions_so_a_full_map_makes_room() {
        let desired = BTreeMap::from([(frontend(1), backends(1..3))]);
        let (_, current) = plan(&Programmed::default(), &desired).unwrap();
        let (ops, _) = plan(&current, &BTreeMap::from([(frontend(2), backends(1..3))])).unwrap();
        let first_put = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutSlot(..) | MapOp::PutMaster(..)))
            .unwrap();
        let last_removal = ops
            .iter()
            .rposition(|op| matches!(op, MapOp::DeleteMaster(_) | MapOp::DeleteSlot(..)))
            .unwrap();
        assert!(last_removal < first_put, "{ops:?}");
    }
}
