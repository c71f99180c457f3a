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
use smallvec::SmallVec;

use crate::{
    hash::{Map, Set},
    model::{BackendAddr, Frontend, FrontendSpec, Protocol},
};

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

    /// The affinity-match entries this frontend needs: one per backend, for the datapath to
    /// check a remembered backend against — session affinity's, or an unconnected UDP
    /// socket's.
    fn affinity_matches(&self, frontend: &Frontend) -> impl Iterator<Item = AffinityMatchKey> + '_ {
        let needed = self.affinity_timeout_s != 0 || frontend.protocol == Protocol::Udp;
        self.slots
            .iter()
            .filter(move |_| needed)
            .map(|backend_id| AffinityMatchKey {
                backend_id: *backend_id,
                frontend_id: self.id,
            })
    }
}

/// What the maps hold, in the agent's terms, with the indexes that let a plan touch only
/// the frontends that changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: BTreeMap<Frontend, ProgrammedFrontend>,
    pub backends: BTreeMap<BackendId, BackendAddr>,
    pub affinity_matches: BTreeSet<AffinityMatchKey>,
    backend_ids: BTreeMap<BackendAddr, BackendId>,
    /// How many slots name each backend.
    backend_refs: BTreeMap<BackendId, usize>,
    frontend_ids: BTreeSet<FrontendId>,
    /// `affinity_matches` by frontend id, whatever its slots say now.
    matches_by_frontend: BTreeMap<FrontendId, BTreeSet<BackendId>>,
    /// Slots of every frontend, summed: kept as slots come and go, so that the service
    /// map's fill is known without a pass over the frontends.
    slot_count: usize,
}

impl Programmed {
    /// The state read back from the maps.
    pub fn new(
        frontends: BTreeMap<Frontend, ProgrammedFrontend>,
        backends: BTreeMap<BackendId, BackendAddr>,
        affinity_matches: BTreeSet<AffinityMatchKey>,
    ) -> Self {
        let mut programmed = Self {
            backend_ids: backends.iter().map(|(id, addr)| (*addr, *id)).collect(),
            backends,
            frontend_ids: frontends.values().map(|f| f.id).collect(),
            ..Self::default()
        };
        for key in affinity_matches {
            programmed.insert_match(key);
        }
        for id in frontends.values().flat_map(|f| &f.slots) {
            *programmed.backend_refs.entry(*id).or_default() += 1;
            programmed.slot_count += 1;
        }
        programmed.frontends = frontends;
        programmed
    }

    /// Whether a clusterIP frontend on `address` is in the maps.
    pub fn has_cluster_ip(&self, address: std::net::IpAddr) -> bool {
        self.frontends_on(address)
            .any(|(_, programmed)| programmed.flags & lb_common::FLAG_CLUSTER_IP != 0)
    }

    /// The frontends on `address` in the maps, whatever their port and protocol.
    pub fn frontends_on(
        &self,
        address: std::net::IpAddr,
    ) -> impl Iterator<Item = (&Frontend, &ProgrammedFrontend)> + '_ {
        let first = Frontend {
            address,
            port: 0,
            protocol: crate::model::Protocol::Tcp,
        };
        self.frontends
            .range(first..)
            .take_while(move |(frontend, _)| frontend.address == address)
    }

    /// Whether a backend on `address`, on any port, is in the maps.
    pub fn is_backend_address(&self, address: std::net::IpAddr) -> bool {
        self.backend_ids
            .range(BackendAddr { address, port: 0 }..)
            .next()
            .is_some_and(|(backend, _)| backend.address == address)
    }

    /// How many entries each map holds.
    pub fn usage(&self) -> Capacity {
        Capacity {
            services: count(self.frontends.len() + self.slot_count),
            backends: count(self.backends.len()),
            affinity_matches: count(self.affinity_matches.len()),
        }
    }

    /// The backends of `frontend` in slot order; ids that do not resolve are left out.
    pub fn backends_of(&self, frontend: &Frontend) -> Vec<BackendAddr> {
        self.frontends
            .get(frontend)
            .into_iter()
            .flat_map(|f| &f.slots)
            .filter_map(|id| self.backends.get(id).copied())
            .collect()
    }

    /// Records `ops` as written to the maps.
    pub fn apply(&mut self, ops: &[MapOp]) {
        let before = (
            self.frontends.len(),
            self.backends.len(),
            self.backend_ids.len(),
            self.backend_refs.len(),
        );
        let mut rest = ops;
        while let Some(first) = rest.first() {
            let run = match first.put_on_frontend() {
                // A plan writes a frontend's slots and then its master one after the other:
                // one look-up of the frontend for them all (a look-up per op was most of
                // this at 100k Services).
                Some(frontend) => {
                    let run = rest
                        .iter()
                        .take_while(|op| op.put_on_frontend() == Some(frontend))
                        .count();
                    self.apply_puts(frontend, &rest[..run]);
                    run
                }
                None => {
                    self.apply_one(first);
                    1
                }
            };
            rest = &rest[run..];
        }
        crate::memory::compact_grown(&mut self.frontends, before.0);
        crate::memory::compact_grown(&mut self.backends, before.1);
        crate::memory::compact_grown(&mut self.backend_ids, before.2);
        crate::memory::compact_grown(&mut self.backend_refs, before.3);
    }

    /// `ops`, puts of the slots and the master of `frontend`, in order.
    fn apply_puts(&mut self, frontend: &Frontend, ops: &[MapOp]) {
        let entry = self.frontends.entry(*frontend).or_default();
        for op in ops {
            match op {
                MapOp::PutSlot(_, slot, id) => {
                    let index = usize::from(*slot).saturating_sub(1);
                    let replaced = match entry.slots.get_mut(index) {
                        Some(old) => Some(std::mem::replace(old, *id)),
                        None => {
                            // Slots are written in order, so a new one is always the next.
                            entry.slots.push(*id);
                            self.slot_count += 1;
                            None
                        }
                    };
                    *self.backend_refs.entry(*id).or_default() += 1;
                    if let Some(old) = replaced {
                        release(&mut self.backend_refs, old);
                    }
                }
                MapOp::PutMaster(_, master) => {
                    if entry.id != master.id {
                        self.frontend_ids.remove(&entry.id);
                        self.frontend_ids.insert(master.id);
                    }
                    entry.id = master.id;
                    entry.flags = master.flags;
                    entry.affinity_timeout_s = master.affinity_timeout_s;
                }
                // The run holds only this frontend's puts (see `apply`).
                _ => {}
            }
        }
    }

    fn apply_one(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend(id, addr) => {
                self.backends.insert(*id, *addr);
                self.backend_ids.insert(*addr, *id);
            }
            MapOp::PutAffinityMatch(key) => self.insert_match(*key),
            // Applied in runs, one look-up per frontend (see `apply`).
            MapOp::PutSlot(..) | MapOp::PutMaster(..) => {}
            MapOp::DeleteSlot(frontend, slot) => {
                let released = self.frontends.get_mut(frontend).map_or_else(Vec::new, |f| {
                    let from = usize::from(*slot).saturating_sub(1).min(f.slots.len());
                    f.slots.split_off(from)
                });
                self.slot_count -= released.len();
                for id in released {
                    release(&mut self.backend_refs, id);
                }
            }
            MapOp::DeleteMaster(frontend) => {
                if let Some(old) = self.frontends.remove(frontend) {
                    self.frontend_ids.remove(&old.id);
                    self.slot_count -= old.slots.len();
                    for id in old.slots {
                        release(&mut self.backend_refs, id);
                    }
                }
            }
            MapOp::DeleteAffinityMatch(key) => {
                self.affinity_matches.remove(key);
                if let Some(backends) = self.matches_by_frontend.get_mut(&key.frontend_id) {
                    backends.remove(&key.backend_id);
                    if backends.is_empty() {
                        self.matches_by_frontend.remove(&key.frontend_id);
                    }
                }
            }
            MapOp::DeleteBackend(id) => {
                if let Some(addr) = self.backends.remove(id)
                    && self.backend_ids.get(&addr) == Some(id)
                {
                    self.backend_ids.remove(&addr);
                }
            }
        }
    }

    fn insert_match(&mut self, key: AffinityMatchKey) {
        self.affinity_matches.insert(key);
        self.matches_by_frontend
            .entry(key.frontend_id)
            .or_default()
            .insert(key.backend_id);
    }

    /// The affinity matches the maps hold for frontend `id`.
    fn matches_of(&self, id: FrontendId) -> impl Iterator<Item = AffinityMatchKey> + '_ {
        self.matches_by_frontend
            .get(&id)
            .into_iter()
            .flatten()
            .map(move |backend_id| AffinityMatchKey {
                backend_id: *backend_id,
                frontend_id: id,
            })
    }

    fn refs(&self, id: BackendId) -> usize {
        self.backend_refs.get(&id).copied().unwrap_or(0)
    }
}

/// One slot reference fewer to backend `id`.
fn release(backend_refs: &mut BTreeMap<BackendId, usize>, id: BackendId) {
    if let Some(refs) = backend_refs.get_mut(&id) {
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            backend_refs.remove(&id);
        }
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

impl MapOp {
    /// The frontend whose slot or master this op puts.
    fn put_on_frontend(&self) -> Option<&Frontend> {
        match self {
            Self::PutSlot(frontend, ..) | Self::PutMaster(frontend, _) => Some(frontend),
            _ => None,
        }
    }
}

/// Entries of the service map, the backend map and the affinity-match map: what the maps
/// that grow with the cluster hold, need, or may hold at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capacity {
    /// Entries of the service map: one per frontend plus one per backend slot.
    pub services: u32,
    /// Entries of the backend map: distinct backend address:port pairs.
    pub backends: u32,
    /// Entries of the affinity-match map: one per backend of a frontend with session
    /// affinity, and of a UDP frontend.
    pub affinity_matches: u32,
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One of the maps that grow with the cluster, as a plan's refusal names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GrowingMap {
    Services,
    Backends,
    AffinityMatches,
}

impl GrowingMap {
    /// The agent flag that bounds the map.
    pub const fn flag(self) -> &'static str {
        match self {
            Self::Services => "--service-map-max-entries",
            Self::Backends => "--backend-map-max-entries",
            Self::AffinityMatches => "--affinity-match-map-max-entries",
        }
    }

    pub const fn map_name(self) -> &'static str {
        match self {
            Self::Services => lb_common::SERVICE_MAP,
            Self::Backends => lb_common::BACKEND_MAP,
            Self::AffinityMatches => lb_common::AFFINITY_MATCH_MAP,
        }
    }
}

impl Capacity {
    /// What maps created without knowing the cluster start with: a small node's worth.
    pub const INITIAL: Self = Self {
        services: 4096,
        backends: 1024,
        affinity_matches: 1024,
    };

    /// The first map where `need` does not fit and `adds` adds entries, if any: a unit that
    /// adds nothing to a map is never refused for that map, even if the maps already hold
    /// more than the bound (a bound lowered since they were written).
    pub fn overflow_adding(&self, need: &Self, adds: &Self) -> Option<GrowingMap> {
        [
            GrowingMap::Services,
            GrowingMap::Backends,
            GrowingMap::AffinityMatches,
        ]
        .into_iter()
        .find(|map| adds.get(*map) > 0 && need.get(*map) > self.get(*map))
    }

    /// The first map where `need` does not fit, if any.
    pub fn overflow(&self, need: &Self) -> Option<GrowingMap> {
        if need.services > self.services {
            Some(GrowingMap::Services)
        } else if need.backends > self.backends {
            Some(GrowingMap::Backends)
        } else if need.affinity_matches > self.affinity_matches {
            Some(GrowingMap::AffinityMatches)
        } else {
            None
        }
    }

    pub fn get(&self, map: GrowingMap) -> u32 {
        match map {
            GrowingMap::Services => self.services,
            GrowingMap::Backends => self.backends,
            GrowingMap::AffinityMatches => self.affinity_matches,
        }
    }

    fn saturating_add(self, other: Self) -> Self {
        Self {
            services: self.services.saturating_add(other.services),
            backends: self.backends.saturating_add(other.backends),
            affinity_matches: self.affinity_matches.saturating_add(other.affinity_matches),
        }
    }

    fn saturating_sub(self, other: Self) -> Self {
        Self {
            services: self.services.saturating_sub(other.services),
            backends: self.backends.saturating_sub(other.backends),
            affinity_matches: self.affinity_matches.saturating_sub(other.affinity_matches),
        }
    }

    /// The capacity to grow to for `need`: each map that is too small gets room for a
    /// quarter more than it needs, rounded up to a power of two (so that growing step by
    /// step copies at most about twice the final size), never above `ceiling`. Maps that
    /// are large enough keep their size.
    pub fn grown_for(&self, need: &Self, ceiling: &Self) -> Self {
        let size = |current: u32, need: u32, ceiling: u32| {
            if need <= current {
                current
            } else {
                let wanted = (u64::from(need) + u64::from(need) / 4).next_power_of_two();
                u32::try_from(wanted)
                    .unwrap_or(u32::MAX)
                    .min(ceiling)
                    .max(need)
            }
        };
        Self {
            services: size(self.services, need.services, ceiling.services),
            backends: size(self.backends, need.backends, ceiling.backends),
            affinity_matches: size(
                self.affinity_matches,
                need.affinity_matches,
                ceiling.affinity_matches,
            ),
        }
    }
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} service entries, {} backends, {} affinity matches",
            self.services, self.backends, self.affinity_matches
        )
    }
}

/// Why a plan left a unit (a Service: all its frontends, or none) out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("frontend {frontend} has {count} backends; a frontend holds at most {max}")]
    TooManyBackends {
        frontend: Frontend,
        count: usize,
        max: usize,
    },
    #[error(
        "map {} would need {need} entries, over its upper bound of {bound}; raise {}",
        map.map_name(),
        map.flag()
    )]
    NoRoom {
        map: GrowingMap,
        need: u32,
        bound: u32,
    },
}

/// A unit the plan refused, and why; what the maps hold for it stays as it is.
#[derive(Debug)]
pub struct Refusal<O> {
    pub owner: O,
    pub error: PlanError,
}

/// The writes of one plan, the units it refused, and the most entries the maps hold once
/// the removals are done and before the surplus goes (removals come first, surplus entries
/// go last): maps that hold `peak` and what they hold now never fill during the plan.
#[derive(Debug)]
pub struct Plan<O> {
    pub ops: Vec<MapOp>,
    pub refused: Vec<Refusal<O>>,
    pub peak: Capacity,
}

/// Ids not in use: above the highest one in use first (cheap), then the gaps below once
/// the top is reached. An id freed by one plan may be handed out by the next: affinity
/// entries that still name it are harmless, as the affinity-match map no longer pairs it
/// with their frontend.
fn free_ids<'a>(
    used: impl Fn(&u32) -> bool + 'a,
    highest: Option<u32>,
) -> impl Iterator<Item = u32> + 'a {
    let highest = highest.unwrap_or(0);
    (highest.saturating_add(1)..=u32::MAX)
        .chain(1..highest)
        .filter(move |id| *id != 0 && !used(id))
}

/// The writes that bring the frontends in `scope` from `current` to `desired` (`None`:
/// the frontend should not exist), in an order that keeps every connect safe; backends and
/// affinity matches nothing references any more go last. Frontends outside `scope` are
/// assumed unchanged.
///
/// `desired` also names each frontend's owner (its Service): an owner's frontends are
/// written together or not at all. Owners whose frontends would take the maps past
/// `ceiling` are refused, whole, and keep what the maps hold for them; owners the maps
/// already serve are admitted before new ones, so a newcomer never pushes out a live
/// Service.
///
/// With `sweep_leftovers` (after the maps were read back) the plan also removes what an
/// interrupted plan left that nothing references, which takes a walk over all backends
/// and affinity matches; without, its work is proportional to `scope`.
pub fn plan<'a, O: Eq + std::hash::Hash + Clone>(
    current: &Programmed,
    desired: impl Fn(&Frontend) -> Option<(O, &'a FrontendSpec)>,
    scope: &BTreeSet<Frontend>,
    ceiling: &Capacity,
    sweep_leftovers: bool,
) -> Plan<O> {
    let max = usize::from(u16::MAX);
    let mut refused = Vec::new();
    // Units in admission order: those with frontends in the maps first, then in the order
    // of their first frontend (deterministic, and found without comparing owners).
    let mut units: Vec<Unit<'a, O>> = Vec::new();
    let mut unit_of: Map<O, usize> = Map::default();
    // Frontends the desired state no longer has: looked up once, here (each lookup is a
    // cache miss at 100k frontends).
    let mut gone: Vec<Frontend> = Vec::new();
    for frontend in scope {
        let Some((owner, spec)) = desired(frontend) else {
            gone.push(*frontend);
            continue;
        };
        let index = match unit_of.entry(owner) {
            std::collections::hash_map::Entry::Occupied(entry) => *entry.get(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                units.push(Unit {
                    owner: entry.key().clone(),
                    live: false,
                    frontends: SmallVec::new(),
                });
                *entry.insert(units.len() - 1)
            }
        };
        if let Some(unit) = units.get_mut(index) {
            unit.live |= current.frontends.contains_key(frontend);
            unit.frontends.push((*frontend, spec));
        }
    }
    drop(unit_of);
    units.sort_by_key(|unit| !unit.live);

    // What the maps hold at the peak of the plan: now, less the removed frontends (their
    // entries go first), plus what admitted units add (surplus entries go only at the end).
    let mut removed = Capacity::default();
    for frontend in &gone {
        if let Some(old) = current.frontends.get(frontend) {
            removed.services += count(1 + old.slots.len());
            removed.affinity_matches += count(current.matches_of(old.id).count());
        }
    }
    let mut peak = current.usage().saturating_sub(removed);
    let mut reserved: Set<BackendAddr> = Set::default();
    let mut wanted: Vec<(Frontend, &FrontendSpec)> = Vec::new();
    let mut refused_frontends: Set<Frontend> = Set::default();
    for Unit {
        owner, frontends, ..
    } in units
    {
        let too_many = frontends.iter().find(|(_, spec)| spec.backends.len() > max);
        let adds = unit_additions(current, &frontends, &reserved);
        let need = peak.saturating_add(adds);
        let error = match (too_many, ceiling.overflow_adding(&need, &adds)) {
            (Some((frontend, spec)), _) => Some(PlanError::TooManyBackends {
                frontend: *frontend,
                count: spec.backends.len(),
                max,
            }),
            (None, Some(map)) => Some(PlanError::NoRoom {
                map,
                need: need.get(map),
                bound: ceiling.get(map),
            }),
            (None, None) => None,
        };
        match error {
            Some(error) => {
                refused_frontends.extend(frontends.iter().map(|(frontend, _)| *frontend));
                refused.push(Refusal { owner, error });
            }
            None => {
                peak = need;
                reserved.extend(
                    frontends
                        .iter()
                        .flat_map(|(_, spec)| &spec.backends)
                        .filter(|addr| !current.backend_ids.contains_key(addr)),
                );
                wanted.extend(frontends);
            }
        }
    }
    // Ids are handed out in frontend order, whatever the owners.
    wanted.sort_unstable_by_key(|(frontend, _)| *frontend);
    // A refused unit keeps what the maps hold for it.
    let scope: Vec<Frontend> = scope
        .iter()
        .filter(|frontend| !refused_frontends.contains(frontend))
        .copied()
        .collect();
    let mut ops = Vec::new();
    // Slot references each backend gains (+) or loses (-) with this plan.
    let mut ref_changes: Map<BackendId, isize> = Map::default();

    // 0. Removed frontends go first, master before slots and affinity matches: that frees
    // room in full maps for what the rest of the plan adds, and once the master is gone no
    // connect looks at the rest.
    let mut removed_ids: Set<FrontendId> = Set::default();
    for frontend in &gone {
        if let Some(old) = current.frontends.get(frontend) {
            ops.push(MapOp::DeleteMaster(*frontend));
            for (index, id) in old.slots.iter().enumerate() {
                ops.push(MapOp::DeleteSlot(*frontend, slot_number(index)));
                *ref_changes.entry(*id).or_default() -= 1;
            }
            ops.extend(current.matches_of(old.id).map(MapOp::DeleteAffinityMatch));
            removed_ids.insert(old.id);
        }
    }

    // 1. Backends: known ones keep their ids, new ones get free ids.
    let mut new_backends: Map<BackendAddr, BackendId> = Map::default();
    // An id a slot still names is in use even if its backend entry is missing.
    let mut backend_ids = free_ids(
        |id| current.backends.contains_key(id) || current.backend_refs.contains_key(id),
        current
            .backends
            .keys()
            .next_back()
            .max(current.backend_refs.keys().next_back())
            .copied(),
    );
    for addr in wanted.iter().flat_map(|(_, spec)| &spec.backends) {
        if !current.backend_ids.contains_key(addr) && !new_backends.contains_key(addr) {
            let id = backend_ids.next().unwrap_or(BackendId::MAX);
            new_backends.insert(*addr, id);
            ops.push(MapOp::PutBackend(id, *addr));
        }
    }
    let id_of = |addr: &BackendAddr| {
        current
            .backend_ids
            .get(addr)
            .or_else(|| new_backends.get(addr))
            .copied()
    };

    // The frontends as they will be, with stable ids.
    // Ids that left-over affinity matches name are not handed out until those are gone.
    let mut frontend_ids = free_ids(
        |id| current.frontend_ids.contains(id) || current.matches_by_frontend.contains_key(id),
        current
            .frontend_ids
            .last()
            .max(current.matches_by_frontend.keys().next_back())
            .copied(),
    );
    let next: Vec<(Frontend, ProgrammedFrontend)> = wanted
        .iter()
        .map(|(frontend, spec)| {
            let id = match current.frontends.get(frontend) {
                Some(old) => old.id,
                None => frontend_ids.next().unwrap_or(FrontendId::MAX),
            };
            let slots = spec.backends.iter().filter_map(id_of).collect();
            let programmed = ProgrammedFrontend {
                id,
                flags: spec.flags,
                affinity_timeout_s: spec.affinity_timeout_s,
                slots,
            };
            (*frontend, programmed)
        })
        .collect();

    // 2. Affinity matches a new master may rely on, before any master changes.
    let next_matches: BTreeSet<AffinityMatchKey> = next
        .iter()
        .flat_map(|(frontend, new)| new.affinity_matches(frontend))
        .collect();
    ops.extend(
        next_matches
            .iter()
            .filter(|key| !current.affinity_matches.contains(key))
            .map(|key| MapOp::PutAffinityMatch(*key)),
    );

    // 3. Changed and new frontends: slots, then the master, then the surplus slots.
    let mut surplus = Vec::new();
    for (frontend, new) in next {
        let frontend = &frontend;
        let old = current.frontends.get(frontend);
        let old_slots = old.map(|o| o.slots.as_slice()).unwrap_or_default();
        for (index, id) in new.slots.iter().enumerate() {
            if old_slots.get(index) != Some(id) {
                ops.push(MapOp::PutSlot(*frontend, slot_number(index), *id));
            }
        }
        for index in new.slots.len()..old_slots.len() {
            surplus.push(MapOp::DeleteSlot(*frontend, slot_number(index)));
        }
        for id in old_slots {
            *ref_changes.entry(*id).or_default() -= 1;
        }
        for id in &new.slots {
            *ref_changes.entry(*id).or_default() += 1;
        }
        if old.is_none_or(|old| old.master_differs(&new)) {
            ops.push(MapOp::PutMaster(*frontend, new));
        }
    }
    ops.extend(surplus);

    // 4. What nobody references any more: what this plan released, and what an earlier
    // agent left behind.
    // Every match the maps hold for a frontend in scope, not only those its slots imply:
    // an interrupted plan can leave others.
    let mut stale_matches: BTreeSet<AffinityMatchKey> = scope
        .iter()
        .filter_map(|frontend| current.frontends.get(frontend))
        .filter(|old| !removed_ids.contains(&old.id))
        .flat_map(|old| current.matches_of(old.id))
        .filter(|key| !next_matches.contains(key))
        .collect();
    // And the matches of frontend ids no frontend has (new frontends never get those), and
    // those of the frontends the plan leaves as they are (a refused Service's) that their
    // slots do not imply: only an agent stopped mid-plan leaves such, so only a plan after
    // reading the maps back looks (it walks them all).
    if sweep_leftovers {
        stale_matches.extend(
            current
                .matches_by_frontend
                .keys()
                .filter(|id| !current.frontend_ids.contains(id))
                .flat_map(|id| current.matches_of(*id)),
        );
        for frontend in &refused_frontends {
            if let Some(old) = current.frontends.get(frontend) {
                let implied: BTreeSet<AffinityMatchKey> = old.affinity_matches(frontend).collect();
                stale_matches.extend(
                    current
                        .matches_of(old.id)
                        .filter(|key| !implied.contains(key)),
                );
            }
        }
    }
    ops.extend(
        stale_matches
            .into_iter()
            .filter(|key| current.affinity_matches.contains(key))
            .map(MapOp::DeleteAffinityMatch),
    );
    let mut unreferenced: BTreeSet<BackendId> = ref_changes
        .iter()
        .filter(|(id, change)| {
            current.backends.contains_key(id)
                && current.refs(**id).checked_add_signed(**change) == Some(0)
        })
        .map(|(id, _)| *id)
        .collect();
    if sweep_leftovers {
        unreferenced.extend(
            current
                .backends
                .keys()
                .filter(|id| current.refs(**id) == 0 && !ref_changes.contains_key(id)),
        );
    }
    ops.extend(unreferenced.into_iter().map(MapOp::DeleteBackend));
    Plan { ops, refused, peak }
}

/// The frontends of one owner, which a plan writes together or not at all.
struct Unit<'a, O> {
    owner: O,
    /// Whether the maps hold any of its frontends already.
    live: bool,
    frontends: SmallVec<[(Frontend, &'a FrontendSpec); 1]>,
}

/// The entries a unit's frontends add to the maps, at the peak of the plan: new frontends
/// all of theirs, changed ones the slots they gain (surplus slots go last), backends that
/// neither the maps nor earlier admitted units (`reserved`) have, and the affinity matches
/// the maps do not hold.
fn unit_additions(
    current: &Programmed,
    frontends: &[(Frontend, &FrontendSpec)],
    reserved: &Set<BackendAddr>,
) -> Capacity {
    let mut adds = Capacity::default();
    // A frontend's backends are unique: only several frontends need a set to count them.
    let mut new_backends: Set<&BackendAddr> = Set::default();
    let mut new_backends_of_one = 0;
    for (frontend, spec) in frontends {
        let needs_matches = spec.affinity_timeout_s != 0 || frontend.protocol == Protocol::Udp;
        match current.frontends.get(frontend) {
            Some(old) => {
                adds.services += count(spec.backends.len().saturating_sub(old.slots.len()));
                if needs_matches {
                    let held = current.matches_by_frontend.get(&old.id);
                    adds.affinity_matches += count(
                        spec.backends
                            .iter()
                            .filter(|addr| {
                                let id = current.backend_ids.get(addr);
                                !id.zip(held).is_some_and(|(id, held)| held.contains(id))
                            })
                            .count(),
                    );
                }
            }
            None => {
                adds.services += count(1 + spec.backends.len());
                if needs_matches {
                    adds.affinity_matches += count(spec.backends.len());
                }
            }
        }
        let new = spec
            .backends
            .iter()
            .filter(|addr| !current.backend_ids.contains_key(addr) && !reserved.contains(addr));
        if frontends.len() == 1 {
            new_backends_of_one = new.count();
        } else {
            new_backends.extend(new);
        }
    }
    adds.backends = count(new_backends.len() + new_backends_of_one);
    adds
}

/// Slot number of the backend at `index`; `plan` bounds indexes by `u16::MAX`.
fn slot_number(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    /// A plan over every frontend either side knows, and the state it leaves.
    fn plan_all(
        current: &Programmed,
        desired: &BTreeMap<Frontend, FrontendSpec>,
    ) -> Result<(Vec<MapOp>, Programmed), PlanError> {
        let scope: BTreeSet<Frontend> = current
            .frontends
            .keys()
            .chain(desired.keys())
            .copied()
            .collect();
        let unbounded = Capacity {
            services: u32::MAX,
            backends: u32::MAX,
            affinity_matches: u32::MAX,
        };
        let Plan {
            ops,
            mut refused,
            peak,
        } = plan(
            current,
            |f| desired.get(f).map(|s| (*f, s)),
            &scope,
            &unbounded,
            true,
        );
        if let Some(refusal) = refused.pop() {
            return Err(refusal.error);
        }
        assert_fits_peak(current, &ops, peak);
        let mut next = current.clone();
        next.apply(&ops);
        // Applied at once, a frontend's puts share one look-up: the same as one by one.
        let mut one_by_one = current.clone();
        for op in &ops {
            one_by_one.apply(std::slice::from_ref(op));
        }
        assert_eq!(next, one_by_one);
        Ok((ops, next))
    }

    use crate::fuzzing::{OldAndNew, SimulatedMaps as Maps};

    fn frontend(last: u8) -> Frontend {
        Frontend {
            address: IpAddr::from([10, 96, 0, last]),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(range: std::ops::Range<u8>) -> FrontendSpec {
        FrontendSpec {
            backends: range
                .map(|i| BackendAddr {
                    address: IpAddr::from([10, 244, 0, i]),
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
        let (ops, next) = plan_all(current, desired).unwrap();
        let sets = desired
            .iter()
            .map(|(f, spec)| {
                let old = current.backends_of(f).into_iter().collect();
                let new = spec.backends.iter().copied().collect();
                (*f, OldAndNew { old, new })
            })
            .collect();
        if let Err(exposed) = maps.replay(&ops, &sets) {
            panic!("{exposed}");
        }
        for (f, spec) in desired {
            assert_eq!(
                maps.reachable(f),
                Ok(Some(spec.backends.iter().copied().collect()))
            );
        }
        assert_eq!(maps.matches, next.affinity_matches);
        (next, ops.len())
    }

    #[test]
    fn an_address_is_a_cluster_ip_while_a_cluster_ip_frontend_on_it_is_in_the_maps() {
        let address = IpAddr::from([10, 96, 0, 10]);
        let on = |port, flags| {
            (
                Frontend {
                    address,
                    port,
                    protocol: Protocol::Udp,
                },
                ProgrammedFrontend {
                    id: u32::from(port),
                    flags,
                    ..ProgrammedFrontend::default()
                },
            )
        };
        let mut frontends = BTreeMap::from([on(53, lb_common::FLAG_NODE_LOCAL)]);
        // A neighbour's clusterIP is not this address's.
        frontends.insert(
            Frontend {
                address: IpAddr::from([10, 96, 0, 11]),
                port: 53,
                protocol: Protocol::Tcp,
            },
            ProgrammedFrontend {
                flags: lb_common::FLAG_CLUSTER_IP,
                ..ProgrammedFrontend::default()
            },
        );
        let programmed = Programmed::new(frontends.clone(), BTreeMap::new(), BTreeSet::new());
        assert!(!programmed.has_cluster_ip(address), "an external IP only");
        let (frontend, clusterip) = on(9153, lb_common::FLAG_CLUSTER_IP);
        frontends.insert(frontend, clusterip);
        let programmed = Programmed::new(frontends, BTreeMap::new(), BTreeSet::new());
        assert!(programmed.has_cluster_ip(address));
        assert!(programmed.has_cluster_ip(IpAddr::from([10, 96, 0, 11])));
        assert!(!programmed.has_cluster_ip(IpAddr::from([10, 96, 0, 12])));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any sequence of desired states (four frontends, each absent or with any subset
        /// of eight backends, with or without affinity), each planned from the last and
        /// replayed op by op: after every single write, a connect to any frontend reaches
        /// only backends of its old or its new set, and some backend while both have one
        /// (see [`step`]); after the last write, exactly the new set.
        #[test]
        fn any_prefix_of_any_plan_reaches_only_old_or_new_backends(
            states in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::option::of((0u8..=u8::MAX, proptest::bool::ANY)),
                    4,
                ),
                1..6,
            )
        ) {
            let mut maps = Maps::default();
            let mut current = Programmed::default();
            for state in states {
                let desired: BTreeMap<Frontend, FrontendSpec> = state
                    .into_iter()
                    .zip(1u8..)
                    .filter_map(|(spec, last)| {
                        let (members, affinity) = spec?;
                        let mut spec = FrontendSpec {
                            backends: (0..8u8)
                                .filter(|i| members & (1 << i) != 0)
                                .map(|i| BackendAddr {
                                    address: IpAddr::from([10, 244, 0, i + 1]),
                                    port: 8080,
                                })
                                .collect(),
                            flags: 0,
                            affinity_timeout_s: 0,
                        };
                        if affinity {
                            spec = with_affinity(spec);
                        }
                        Some((frontend(last), spec))
                    })
                    .collect();
                (current, _) = step(&mut maps, &current, &desired);
            }
            let (current, _) = step(&mut maps, &current, &BTreeMap::new());
            proptest::prop_assert_eq!(current, Programmed::default());
            proptest::prop_assert!(maps.services.is_empty() && maps.backends.is_empty());
        }
    }

    #[test]
    fn an_address_is_a_backends_whatever_its_port() {
        let (_, programmed) = plan_all(
            &Programmed::default(),
            &BTreeMap::from([(frontend(1), backends(1..3))]),
        )
        .unwrap();
        assert!(programmed.is_backend_address(IpAddr::from([10, 244, 0, 2])));
        assert!(!programmed.is_backend_address(IpAddr::from([10, 244, 0, 3])));
        assert!(!programmed.is_backend_address(IpAddr::from([10, 96, 0, 1])));
        assert_eq!(
            programmed
                .frontends_on(IpAddr::from([10, 96, 0, 1]))
                .map(|(f, _)| *f)
                .collect::<Vec<_>>(),
            [frontend(1)]
        );
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
        let (ops, next) = plan_all(&current, &desired).unwrap();
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
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        let ids: Vec<_> = current.frontends.values().map(|f| f.id).collect();
        assert_eq!(ids, [1, 2]);
        let desired =
            BTreeMap::from([(frontend(2), backends(1..2)), (frontend(3), backends(1..2))]);
        let (_, next) = plan_all(&current, &desired).unwrap();
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
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        let mut spec = backends(1..3);
        spec.flags = lb_common::FLAG_NODE_LOCAL;
        let (ops, _) = plan_all(&current, &BTreeMap::from([(frontend(1), spec)])).unwrap();
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
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        let (ops, next) = plan_all(&current, &desired).unwrap();
        assert!(ops.is_empty(), "{ops:?}");
        assert_eq!(next, current);
    }

    #[test]
    fn shared_backends_get_one_id_and_ids_stay_stable() {
        let desired =
            BTreeMap::from([(frontend(1), backends(1..4)), (frontend(2), backends(2..5))]);
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        assert_eq!(current.backends.len(), 4);
        let id_of = |p: &Programmed, i: u8| {
            p.backends
                .iter()
                .find(|(_, a)| a.address == IpAddr::from([10, 244, 0, i]))
                .map(|(id, _)| *id)
        };
        // Dropping backend 1 must not renumber the others.
        let desired =
            BTreeMap::from([(frontend(1), backends(2..4)), (frontend(2), backends(2..5))]);
        let (ops, next) = plan_all(&current, &desired).unwrap();
        for i in 2..5 {
            assert_eq!(id_of(&current, i), id_of(&next, i));
        }
        assert!(ops.contains(&MapOp::DeleteBackend(id_of(&current, 1).unwrap())));
        assert!(!ops.iter().any(|op| matches!(op, MapOp::PutBackend(..))));
    }

    #[test]
    fn removed_frontends_lose_master_before_slots() {
        let desired = BTreeMap::from([(frontend(1), backends(1..3))]);
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        let (ops, _) = plan_all(&current, &BTreeMap::new()).unwrap();
        assert_eq!(ops[0], MapOp::DeleteMaster(frontend(1)));
        assert!(matches!(ops.last(), Some(MapOp::DeleteBackend(_))));
    }

    #[test]
    fn removals_come_before_additions_so_a_full_map_makes_room() {
        let desired = BTreeMap::from([(frontend(1), backends(1..3))]);
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        let (ops, _) =
            plan_all(&current, &BTreeMap::from([(frontend(2), backends(1..3))])).unwrap();
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

    #[test]
    fn left_over_affinity_matches_go_with_a_full_plan() {
        let desired = BTreeMap::from([(frontend(1), with_affinity(backends(1..3)))]);
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        // What an interrupted plan can leave: a match for a backend the frontend no longer
        // has, and one for a frontend id no frontend has.
        let id = current.frontends[&frontend(1)].id;
        let mut matches = current.affinity_matches.clone();
        matches.insert(AffinityMatchKey {
            backend_id: 99,
            frontend_id: id,
        });
        matches.insert(AffinityMatchKey {
            backend_id: 1,
            frontend_id: 77,
        });
        let read = Programmed::new(current.frontends.clone(), current.backends.clone(), matches);
        let (ops, next) = plan_all(&read, &desired).unwrap();
        assert_eq!(next.affinity_matches, current.affinity_matches);
        assert_eq!(ops.len(), 2, "{ops:?}");
        // A new frontend does not get id 77 while a match names it.
        let (_, next) = plan_all(
            &read,
            &BTreeMap::from([
                (frontend(1), with_affinity(backends(1..3))),
                (frontend(2), backends(1..2)),
            ]),
        )
        .unwrap();
        assert_ne!(next.frontends[&frontend(2)].id, 77);
    }

    #[test]
    fn left_over_affinity_matches_of_a_refused_service_go_with_a_full_plan() {
        // Found by the `planner` fuzz target: a plan interrupted as a Service took over
        // frontends left matches their slots no longer imply; the Service, refused for
        // room after the restart, kept its frontends out of the plan, and the matches
        // stayed, pairing a backend with a frontend that no longer has it.
        let desired = BTreeMap::from([(frontend(1), with_affinity(backends(1..2)))]);
        let (_, current) = plan_all(&Programmed::default(), &desired).unwrap();
        let id = current.frontends[&frontend(1)].id;
        let left_over = AffinityMatchKey {
            backend_id: 99,
            frontend_id: id,
        };
        let mut matches = current.affinity_matches.clone();
        matches.insert(left_over);
        let read = Programmed::new(current.frontends.clone(), current.backends.clone(), matches);
        // Three backends need four more entries than the maps' bound leaves: refused.
        let grown = BTreeMap::from([(frontend(1), ("a", with_affinity(backends(1..4))))]);
        let ceiling = Capacity {
            services: 3,
            backends: 100,
            affinity_matches: 100,
        };
        let scope = BTreeSet::from([frontend(1)]);
        let plan = plan(&read, owned_by(&grown), &scope, &ceiling, true);
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.ops, [MapOp::DeleteAffinityMatch(left_over)]);
        // Without reading the maps back, a plan does not look.
        let plan = super::plan(&read, owned_by(&grown), &scope, &ceiling, false);
        assert!(plan.ops.is_empty(), "{:?}", plan.ops);
    }

    #[test]
    fn udp_frontends_get_matches_for_their_sockets_affinity_or_not() {
        let udp = Frontend {
            protocol: Protocol::Udp,
            ..frontend(53)
        };
        let mut maps = Maps::default();
        let desired = BTreeMap::from([(udp, backends(1..4))]);
        let (current, _) = step(&mut maps, &Programmed::default(), &desired);
        assert_eq!(current.affinity_matches.len(), 3);
        // Affinity on, then off: the matches stay, as UDP sockets rely on them.
        let desired = BTreeMap::from([(udp, with_affinity(backends(1..4)))]);
        let (current, _) = step(&mut maps, &current, &desired);
        let desired = BTreeMap::from([(udp, backends(1..3))]);
        let (current, _) = step(&mut maps, &current, &desired);
        assert_eq!(current.affinity_matches.len(), 2);
        // A removed frontend's matches go with its master, before anything is added.
        let desired = BTreeMap::from([(frontend(1), backends(5..6))]);
        let (ops, _) = plan_all(&current, &desired).unwrap();
        let last_match_removal = ops
            .iter()
            .rposition(|op| matches!(op, MapOp::DeleteAffinityMatch(_)))
            .unwrap();
        let first_put = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutBackend(..) | MapOp::PutSlot(..)))
            .unwrap();
        assert!(last_match_removal < first_put, "{ops:?}");
        let (current, _) = step(&mut maps, &current, &desired);
        assert!(current.affinity_matches.is_empty());
    }

    fn assert_fits_peak(current: &Programmed, ops: &[MapOp], peak: Capacity) {
        if let Some((at, usage)) = crate::fuzzing::over_peak(current, ops, peak) {
            panic!("after {:?}: {usage} over the peak {peak}", ops[at]);
        }
    }

    fn owned_by<'a>(
        desired: &'a BTreeMap<Frontend, (&'static str, FrontendSpec)>,
    ) -> impl Fn(&Frontend) -> Option<(&'static str, &'a FrontendSpec)> {
        |f| desired.get(f).map(|(owner, spec)| (*owner, spec))
    }

    #[test]
    fn a_unit_that_does_not_fit_is_refused_whole_and_the_others_land() {
        // Service "a": two frontends of 3 backends (8 service entries); "b": one of 2 (3).
        let desired = BTreeMap::from([
            (frontend(1), ("a", backends(1..4))),
            (frontend(2), ("a", backends(1..4))),
            (frontend(3), ("b", backends(10..12))),
        ]);
        let scope: BTreeSet<Frontend> = desired.keys().copied().collect();
        let ceiling = Capacity {
            services: 5,
            backends: 100,
            affinity_matches: 100,
        };
        let plan = plan(
            &Programmed::default(),
            owned_by(&desired),
            &scope,
            &ceiling,
            false,
        );
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.refused[0].owner, "a");
        assert!(matches!(
            plan.refused[0].error,
            PlanError::NoRoom {
                map: GrowingMap::Services,
                need: 8,
                bound: 5
            }
        ));
        let mut next = Programmed::default();
        next.apply(&plan.ops);
        assert_eq!(
            next.frontends.keys().copied().collect::<Vec<_>>(),
            [frontend(3)]
        );
        assert_eq!(next.usage().services, 3);
        assert_eq!(plan.peak.services, 3);
    }

    #[test]
    fn a_live_unit_keeps_its_room_and_a_newcomer_is_refused() {
        let ceiling = Capacity {
            services: 6,
            backends: 100,
            affinity_matches: 100,
        };
        // "z" is live with 4 entries; "a" (on the first frontend) arrives wanting 3 more.
        let live = BTreeMap::from([(frontend(1), ("z", backends(1..4)))]);
        let scope: BTreeSet<Frontend> = live.keys().copied().collect();
        let first = plan(
            &Programmed::default(),
            owned_by(&live),
            &scope,
            &ceiling,
            false,
        );
        let mut current = Programmed::default();
        current.apply(&first.ops);
        let desired = BTreeMap::from([
            (frontend(1), ("z", backends(1..5))),
            (frontend(2), ("a", backends(1..3))),
        ]);
        let scope: BTreeSet<Frontend> = desired.keys().copied().collect();
        let plan = plan(&current, owned_by(&desired), &scope, &ceiling, false);
        // z grows by one slot (5 entries) and fits; a would make 8 and is refused.
        assert_eq!(plan.refused.len(), 1);
        assert_eq!(plan.refused[0].owner, "a");
        current.apply(&plan.ops);
        assert_eq!(current.frontends[&frontend(1)].slots.len(), 4);
        assert!(!current.frontends.contains_key(&frontend(2)));
    }

    #[test]
    fn removals_make_room_within_the_same_plan() {
        let ceiling = Capacity {
            services: 4,
            backends: 3,
            affinity_matches: 100,
        };
        let before = BTreeMap::from([(frontend(1), ("a", backends(1..4)))]);
        let scope: BTreeSet<Frontend> = before.keys().copied().collect();
        let first = plan(
            &Programmed::default(),
            owned_by(&before),
            &scope,
            &ceiling,
            false,
        );
        let mut current = Programmed::default();
        current.apply(&first.ops);
        // "a" goes, "b" comes with as much: it fits because a's entries go first.
        let after = BTreeMap::from([(frontend(2), ("b", backends(4..7)))]);
        let scope: BTreeSet<Frontend> = [frontend(1), frontend(2)].into();
        // The backends of a go only at the end, so the backend map peaks at 6 — over the
        // bound of 3: refused on backends, not on service entries.
        let plan = plan(&current, owned_by(&after), &scope, &ceiling, false);
        assert!(
            matches!(
                plan.refused[..],
                [Refusal {
                    owner: "b",
                    error: PlanError::NoRoom {
                        map: GrowingMap::Backends,
                        need: 6,
                        bound: 3
                    }
                }]
            ),
            "{:?}",
            plan.refused
        );
        let ceiling = Capacity {
            backends: 6,
            ..ceiling
        };
        let plan = super::plan(&current, owned_by(&after), &scope, &ceiling, false);
        assert!(plan.refused.is_empty(), "{:?}", plan.refused);
        assert_eq!(plan.peak.services, 4);
        assert_eq!(plan.peak.backends, 6);
        assert_fits_peak(&current, &plan.ops, plan.peak);
    }

    #[test]
    fn growth_rounds_up_with_headroom_within_the_ceiling() {
        let current = Capacity::INITIAL;
        let ceiling = Capacity {
            services: 1 << 20,
            backends: 5000,
            affinity_matches: 1 << 20,
        };
        let need = Capacity {
            services: 400_000,
            backends: 4_500,
            affinity_matches: 10,
        };
        let grown = current.grown_for(&need, &ceiling);
        assert_eq!(grown.services, 524_288);
        assert_eq!(grown.backends, 5000, "capped by the ceiling, yet enough");
        assert_eq!(grown.affinity_matches, current.affinity_matches);
        assert!(grown.overflow(&need).is_none());
    }
}
