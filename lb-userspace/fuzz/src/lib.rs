//! What the fuzz targets share: lb as the agent runs it, from its watches through the store,
//! the model and the planner to the maps (simulated: no kernel), and what must hold after
//! every sync. A violated property panics, naming what differs: libFuzzer records the input.

use std::collections::{BTreeMap, BTreeSet};

use lb_userspace::{
    fuzzing::{AffinityMatchKey, FedWatches, OldAndNew, SimulatedMaps, WatcherEvent},
    model::{BackendAddr, Desired, Frontend, Kind, Node, ObjectModel, ObjectRef, Protocol},
    plan::{self, Capacity, MapOp, PlanError, Programmed},
    source::{
        api::{EndpointSlice, Service},
        parse::{Document, ManifestError},
    },
    store::Store,
};

fn read_back(maps: &mut SimulatedMaps) -> Programmed {
    maps.read_back()
        .unwrap_or_else(|broken| panic!("maps read back: {broken}"))
}

/// What a reading gave, comparable: each document's kind, name and model, or its error as
/// the agent logs it.
pub type Summary = Vec<(Kind, String, Result<ObjectModel, String>)>;

pub fn summary(documents: &[Document]) -> Summary {
    documents
        .iter()
        .map(|d| {
            let object = d.object.as_ref().cloned().map_err(ToString::to_string);
            (d.kind, d.id.to_string(), object)
        })
        .collect()
}

pub fn summary_of(read: &Result<Vec<Document>, ManifestError>) -> Result<Summary, String> {
    read.as_deref().map(summary).map_err(ToString::to_string)
}

/// An unbounded ceiling: no plan is refused for room.
pub const UNBOUNDED: Capacity = Capacity {
    services: u32::MAX,
    backends: u32::MAX,
    affinity_matches: u32::MAX,
};

/// The agent, from its watches to its maps, as `agent.rs` drives it at each sync: the
/// store, the desired state updated with what changed, a plan over what that touched (or
/// everything, after the maps were read back), with the Services refused for room tried
/// again.
pub struct Agent {
    pub watches: FedWatches,
    pub store: Store,
    pub desired: Desired,
    pub node: Node,
    pub programmed: Programmed,
    pub maps: SimulatedMaps,
    pub ceiling: Capacity,
    refused: BTreeMap<ObjectRef, PlanError>,
    /// The next plan covers every frontend and sweeps leftovers: the maps were read back.
    full: bool,
    /// Every Service ever delivered, to ask the store about.
    services_seen: BTreeSet<ObjectRef>,
}

impl Agent {
    pub fn new(node: Node, ceiling: Capacity) -> Self {
        Self {
            watches: FedWatches::default(),
            store: Store::default(),
            desired: Desired::default(),
            node,
            programmed: Programmed::default(),
            maps: SimulatedMaps::default(),
            ceiling,
            refused: BTreeMap::new(),
            full: false,
            services_seen: BTreeSet::new(),
        }
    }

    pub fn service(&mut self, event: WatcherEvent<Service>) {
        if let WatcherEvent::Apply(service) | WatcherEvent::InitApply(service) = &event
            && let Some(id) = lb_userspace::model::object_ref(&service.metadata)
        {
            self.services_seen.insert(id);
        }
        self.watches.service(event);
    }

    pub fn slice(&mut self, event: WatcherEvent<EndpointSlice>) {
        self.watches.slice(event);
    }

    /// The node's addresses changed, as the agent notices it.
    pub fn node_ips(&mut self, ips: Vec<std::net::IpAddr>) {
        self.node.ips = ips;
        self.store.node_addresses_changed();
    }

    /// Every Service ever delivered.
    pub fn services_seen(&self) -> &BTreeSet<ObjectRef> {
        &self.services_seen
    }

    /// The agent restarts on the maps as they are: a new process, whose watches list
    /// `services` and `slices` (what the API server holds) and whose first plan starts from
    /// the maps read back.
    pub fn restart(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) {
        let maps = std::mem::take(&mut self.maps);
        *self = Self {
            maps,
            services_seen: std::mem::take(&mut self.services_seen),
            ..Self::new(self.node.clone(), self.ceiling)
        };
        self.service(WatcherEvent::Init);
        for service in services {
            self.service(WatcherEvent::InitApply(service));
        }
        self.service(WatcherEvent::InitDone);
        self.slice(WatcherEvent::Init);
        for slice in slices {
            self.slice(WatcherEvent::InitApply(slice));
        }
        self.slice(WatcherEvent::InitDone);
        self.read_back();
    }

    /// The maps read back, as an agent starts from them after a restart or a failed
    /// write: the next plan covers every frontend.
    fn read_back(&mut self) {
        self.programmed = read_back(&mut self.maps);
        self.full = true;
    }

    /// One sync. With `fail_after`, the maps take only that many of the plan's writes
    /// (a write failed, or the agent was killed): the next sync starts from the maps read
    /// back. Panics where a property does not hold.
    pub fn sync(&mut self, fail_after: Option<usize>) {
        self.watches.refresh(&mut self.store);
        let changed = self.store.take_changed();
        let touched = self.desired.update(
            changed.iter().map(|id| (id, self.store.service(id))),
            &self.node,
        );
        self.check_desired_from_scratch();

        let Self {
            ref programmed,
            ref desired,
            ref mut refused,
            ref ceiling,
            full,
            ..
        } = *self;
        let (scope, plan) =
            lb_userspace::agent::plan_sync(programmed, desired, touched, full, refused, ceiling);
        let desired = &self.desired;
        if let Some((op, usage)) =
            lb_userspace::fuzzing::over_peak(&self.programmed, &plan.ops, plan.peak)
        {
            panic!(
                "after write {op} of {:?}: {usage} over the peak {}",
                plan.ops, plan.peak
            );
        }
        let refused_now: BTreeSet<&ObjectRef> = plan.refused.iter().map(|r| r.owner).collect();

        // What each frontend may show while the plan is written: its old backends, or
        // those the desired state gives it unless its Service was refused.
        let sets: BTreeMap<Frontend, OldAndNew> = scope
            .iter()
            .chain(self.programmed.frontends.keys())
            .map(|frontend| {
                let old: BTreeSet<BackendAddr> =
                    self.programmed.backends_of(frontend).into_iter().collect();
                let new = match desired.target(frontend) {
                    _ if !scope.contains(frontend) => old.clone(),
                    Some(t) if refused_now.contains(&t.service) => old.clone(),
                    Some(t) => t.spec.backends.iter().copied().collect(),
                    None => BTreeSet::new(),
                };
                (*frontend, OldAndNew { old, new })
            })
            .collect();

        let mut still_refused = std::mem::take(&mut self.refused);
        for frontend in &scope {
            if let Some(target) = desired.target(frontend) {
                still_refused.remove(&target.service);
            }
        }
        for refusal in &plan.refused {
            still_refused.insert(refusal.owner.clone(), refusal.error.clone());
        }
        self.refused = still_refused;

        let before = self.maps.clone();
        let usage_before = self.programmed.usage();
        let written = fail_after.map_or(plan.ops.len(), |n| n.min(plan.ops.len()));
        if let Err(exposed) = self.maps.replay(&plan.ops[..written], &sets) {
            panic!("{exposed}\nplan: {:?}", plan.ops);
        }
        if written < plan.ops.len() {
            self.programmed = read_back(&mut self.maps);
            self.full = true;
            return;
        }
        self.programmed.apply(&plan.ops);
        self.full = false;
        self.check_maps(&before, &refused_now);
        let usage = self.programmed.usage();
        for map in [
            plan::GrowingMap::Services,
            plan::GrowingMap::Backends,
            plan::GrowingMap::AffinityMatches,
        ] {
            let bound = self.ceiling.get(map).max(usage_before.get(map));
            assert!(
                usage.get(map) <= bound,
                "{map:?}: {} entries, over the ceiling {} (held {} before)",
                usage.get(map),
                self.ceiling.get(map),
                usage_before.get(map)
            );
        }
        if plan.refused.is_empty() && self.refused.is_empty() {
            self.check_nothing_left_to_write();
        }
    }

    /// The desired state kept up to date Service by Service is what one computed from
    /// scratch from the store gives: the same frontends, the same targets where one
    /// Service claims a frontend, the same claimants where several do (which one wins
    /// depends on when each claim arrived, which only history has).
    fn check_desired_from_scratch(&self) {
        let mut scratch = Desired::default();
        scratch.update(
            self.services_seen
                .iter()
                .map(|id| (id, self.store.service(id))),
            &self.node,
        );
        let frontends = |desired: &Desired| -> BTreeSet<Frontend> {
            desired.frontends().map(|(frontend, _)| *frontend).collect()
        };
        assert_eq!(frontends(&self.desired), frontends(&scratch), "frontends");
        let claimants = |desired: &Desired| -> BTreeMap<Frontend, BTreeSet<ObjectRef>> {
            let mut claimants: BTreeMap<Frontend, BTreeSet<ObjectRef>> = BTreeMap::new();
            for conflict in desired.conflicts() {
                let services = claimants.entry(conflict.frontend).or_default();
                services.insert(conflict.kept);
                services.insert(conflict.ignored);
            }
            claimants
        };
        let contested = claimants(&self.desired);
        assert_eq!(contested, claimants(&scratch), "contested frontends");
        for (frontend, target) in self.desired.frontends() {
            if !contested.contains_key(frontend) {
                assert_eq!(
                    Some(target),
                    scratch.target(frontend),
                    "target of {frontend}"
                );
            }
        }
        assert_eq!(
            self.desired.not_in_datapath, scratch.not_in_datapath,
            "Services not in the datapath"
        );
    }

    /// After a whole plan: what the agent thinks the maps hold is what they hold; every
    /// frontend has what the desired state gives it, or, if its Service was refused, what
    /// it had; and nothing is left that no frontend needs.
    fn check_maps(&self, before: &SimulatedMaps, refused: &BTreeSet<&ObjectRef>) {
        let mut read = self.maps.clone();
        let read_back = read_back(&mut read);
        assert_eq!(read, self.maps, "slots no master counts are left");
        assert_eq!(read_back, self.programmed, "the maps read back");
        for frontend in self.maps.frontends() {
            assert!(
                self.desired.target(&frontend).is_some(),
                "{frontend} is in the maps and not desired"
            );
        }
        for (frontend, target) in self.desired.frontends() {
            let reachable = self.maps.reachable(frontend);
            if refused.contains(&target.service) || self.refused.contains_key(&target.service) {
                assert_eq!(
                    reachable,
                    before.reachable(frontend),
                    "{frontend} of refused {}",
                    target.service
                );
                continue;
            }
            let want: BTreeSet<BackendAddr> = target.spec.backends.iter().copied().collect();
            assert_eq!(reachable, Ok(Some(want)), "backends of {frontend}");
            let held = self.programmed.frontends.get(frontend);
            assert_eq!(
                held.map(|h| (h.flags, h.affinity_timeout_s)),
                Some((target.spec.flags, target.spec.affinity_timeout_s)),
                "master of {frontend}"
            );
        }
        let referenced: BTreeSet<u32> = self
            .programmed
            .frontends
            .values()
            .flat_map(|f| f.slots.iter().copied())
            .collect();
        assert_eq!(
            self.maps.backends.keys().copied().collect::<BTreeSet<_>>(),
            referenced,
            "backends no slot names"
        );
        let addresses: BTreeSet<&BackendAddr> = self.maps.backends.values().collect();
        assert_eq!(
            addresses.len(),
            self.maps.backends.len(),
            "one id per backend"
        );
        let implied: BTreeSet<AffinityMatchKey> = self
            .programmed
            .frontends
            .iter()
            .filter(|(frontend, f)| f.affinity_timeout_s != 0 || frontend.protocol == Protocol::Udp)
            .flat_map(|(_, f)| {
                f.slots.iter().map(|backend_id| AffinityMatchKey {
                    backend_id: *backend_id,
                    frontend_id: f.id,
                })
            })
            .collect();
        assert_eq!(self.maps.matches, implied, "affinity matches");
        let ids: BTreeSet<u32> = self.programmed.frontends.values().map(|f| f.id).collect();
        assert_eq!(
            ids.len(),
            self.programmed.frontends.len(),
            "one id per frontend"
        );
        assert!(!ids.contains(&0) && !referenced.contains(&0), "id 0 in use");
    }

    /// A plan of every frontend from what the last one left writes nothing: the last one
    /// covered all that changed.
    fn check_nothing_left_to_write(&self) {
        // Every frontend, leftovers swept.
        let (_, again) = lb_userspace::agent::plan_sync(
            &self.programmed,
            &self.desired,
            BTreeSet::new(),
            true,
            &mut BTreeMap::new(),
            &self.ceiling,
        );
        let writes: Vec<&MapOp> = again.ops.iter().collect();
        assert!(
            writes.is_empty(),
            "left to write after the plan: {writes:?}"
        );
    }
}
