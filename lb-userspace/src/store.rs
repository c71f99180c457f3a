//! The last good version of every object, whatever the source: an object that turns
//! invalid keeps its last good version, an object that is gone is removed.
//!
//! Objects are converted into the model only when their version changes, and the store
//! remembers which Services that touched, so that a sync recomputes those Services only:
//! one endpoint change among 100k Services costs one Service, not 100k.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    manifest::{ApiObject, Kind},
    model::{ObjectRef, ServiceModel, SliceModel},
};

/// One object as a source delivers it: its identity, its version, and the object or why it
/// is unusable (the reason names where it came from, the object and the field).
pub struct Delivered<'a> {
    pub kind: Kind,
    pub id: &'a ObjectRef,
    /// Changes whenever the object does: its `resourceVersion`, or the read of its file.
    /// An empty version is taken as a change every time.
    pub version: &'a str,
    /// `None`: the source let go of the object once the store held this version of it, to
    /// save memory. Should the store need it again, it asks ([`Store::take_wanted`]).
    pub object: Option<Result<&'a ApiObject, String>>,
    /// Where the object came from, to prefix model errors with (`"file: "`, or empty).
    pub origin: &'a str,
}

/// Problems of one update, each naming the object and field. What they concern keeps its
/// last good state.
pub type Problems = Vec<String>;

struct Entry<M> {
    version: String,
    /// The last good model; `None` while the object has never been valid.
    model: Option<M>,
    /// What is wrong with the current version, or what is not used of it.
    problem: Option<String>,
    /// The update that last delivered the object: the others have it no more.
    seen: u64,
}

#[derive(Default)]
pub struct Store {
    services: BTreeMap<ObjectRef, Entry<ServiceModel>>,
    slices: BTreeMap<ObjectRef, Entry<SliceModel>>,
    /// The slices each Service owns through their label.
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// Services whose frontends may differ since the last [`Store::take_changed`].
    changed: BTreeSet<ObjectRef>,
    /// Objects delivered without the object when it was needed.
    wanted: BTreeSet<(Kind, ObjectRef)>,
    /// Objects the last update delivered more than once.
    defined_twice: BTreeSet<(Kind, ObjectRef)>,
    updates: u64,
}

/// What a delivery did to an entry's model.
enum Outcome<M> {
    Unchanged,
    /// The model changed from this one (`None`: the object had no model before).
    Changed(Option<M>),
    /// The object is needed but was not delivered: the entry keeps its last state.
    Wanted,
}

impl Store {
    /// Brings the store in line with `objects`, the complete set of a source: what is not
    /// among them is gone. Only objects whose version changed are converted again.
    pub fn update<'a>(&mut self, objects: impl IntoIterator<Item = Delivered<'a>>) -> Problems {
        self.updates += 1;
        let update = self.updates;
        self.defined_twice.clear();
        let mut problems = Vec::new();
        for delivered in objects {
            let id = delivered.id;
            let delivered_kind = delivered.kind;
            let outcome = match delivered.kind {
                Kind::Service => {
                    deliver(
                        &mut self.services,
                        delivered,
                        update,
                        |object| match object {
                            ApiObject::Service(service) => ServiceModel::from_api(service)
                                .map(|model| (model, None))
                                .map_err(|e| e.to_string()),
                            ApiObject::EndpointSlice(_) => Err("not a Service".into()),
                        },
                    )
                    .map(|outcome| match outcome {
                        Outcome::Changed(_) => {
                            self.changed.insert(id.clone());
                        }
                        Outcome::Wanted => {
                            self.wanted.insert((Kind::Service, id.clone()));
                        }
                        Outcome::Unchanged => {}
                    })
                }
                Kind::EndpointSlice => {
                    deliver(&mut self.slices, delivered, update, |object| match object {
                        ApiObject::EndpointSlice(slice) => SliceModel::from_api(slice)
                            .map(|model| {
                                // Kept (it is valid) but unused until the IPv6 programs exist.
                                let note = (!model.ipv4).then(|| {
                                    format!(
                                        "EndpointSlice {}: addressType: {} is not served yet; skipped",
                                        model.id, slice.address_type
                                    )
                                });
                                (model, note)
                            })
                            .map_err(|e| e.to_string()),
                        ApiObject::Service(_) => Err("not an EndpointSlice".into()),
                    })
                    .map(|outcome| match outcome {
                        Outcome::Changed(old) => {
                            let new = self.slices.get(id).and_then(|e| e.model.as_ref());
                            let new_service = new.and_then(|m| m.service.clone());
                            self.reindex_slice(id, old.and_then(|m| m.service), new_service);
                        }
                        Outcome::Wanted => {
                            self.wanted.insert((Kind::EndpointSlice, id.clone()));
                        }
                        Outcome::Unchanged => {}
                    })
                }
            };
            if let Err(duplicate) = outcome {
                self.defined_twice.insert((delivered_kind, id.clone()));
                problems.push(duplicate);
            }
        }
        self.sweep(update);
        problems.extend(
            self.services
                .values()
                .filter_map(|e| e.problem.clone())
                .chain(self.slices.values().filter_map(|e| e.problem.clone())),
        );
        problems
    }

    /// Drops what the last update did not deliver.
    fn sweep(&mut self, update: u64) {
        let mut gone_services = Vec::new();
        self.services.retain(|id, entry| {
            let keep = entry.seen == update;
            if !keep && entry.model.is_some() {
                gone_services.push(id.clone());
            }
            keep
        });
        self.changed.extend(gone_services);
        let mut gone_slices = Vec::new();
        self.slices.retain(|id, entry| {
            let keep = entry.seen == update;
            if !keep {
                gone_slices.push((id.clone(), entry.model.take().and_then(|m| m.service)));
            }
            keep
        });
        for (id, service) in gone_slices {
            self.reindex_slice(&id, service, None);
        }
    }

    /// Moves slice `id` from one Service's slices to another's, marking both changed.
    fn reindex_slice(&mut self, id: &ObjectRef, old: Option<ObjectRef>, new: Option<ObjectRef>) {
        if let Some(old) = old {
            if let Some(slices) = self.slices_by_service.get_mut(&old) {
                slices.remove(id);
                if slices.is_empty() {
                    self.slices_by_service.remove(&old);
                }
            }
            self.changed.insert(old);
        }
        if let Some(new) = new {
            self.slices_by_service
                .entry(new.clone())
                .or_default()
                .insert(id.clone());
            self.changed.insert(new);
        }
    }

    /// The objects the last update needed but was delivered without: the source should
    /// deliver them again, with the object.
    pub fn take_wanted(&mut self) -> BTreeSet<(Kind, ObjectRef)> {
        std::mem::take(&mut self.wanted)
    }

    /// Whether the store holds `version` of an object: a source may then let go of it.
    pub fn holds(&self, kind: Kind, id: &ObjectRef, version: &str) -> bool {
        let version_of = |entry: Option<&String>| entry.is_some_and(|v| v == version);
        !version.is_empty()
            && match kind {
                Kind::Service => version_of(self.services.get(id).map(|e| &e.version)),
                Kind::EndpointSlice => version_of(self.slices.get(id).map(|e| &e.version)),
            }
    }

    /// Whether the last update delivered the object more than once.
    pub fn defined_twice(&self, kind: Kind, id: &ObjectRef) -> bool {
        !self.defined_twice.is_empty() && self.defined_twice.contains(&(kind, id.clone()))
    }

    /// Marks the Services with a NodePort changed, for their frontends follow the node's
    /// addresses.
    pub fn node_addresses_changed(&mut self) {
        let with_node_ports = self.services.iter().filter_map(|(id, entry)| {
            let service = entry.model.as_ref()?;
            service
                .ports
                .iter()
                .any(|port| port.node_port.is_some())
                .then(|| id.clone())
        });
        self.changed.extend(with_node_ports);
    }

    /// The Services changed since the last call: added, modified, removed, or whose
    /// slices were.
    pub fn take_changed(&mut self) -> BTreeSet<ObjectRef> {
        std::mem::take(&mut self.changed)
    }

    /// A Service and its slices, if it has a good version.
    pub fn service(&self, id: &ObjectRef) -> Option<(&ServiceModel, Vec<&SliceModel>)> {
        let service = self.services.get(id)?.model.as_ref()?;
        let slices = self
            .slices_by_service
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(slice)?.model.as_ref())
            .collect();
        Some((service, slices))
    }

    /// Services and EndpointSlices with a good version.
    pub fn counts(&self) -> (usize, usize) {
        let good = |models: &mut dyn Iterator<Item = bool>| models.filter(|good| *good).count();
        (
            good(&mut self.services.values().map(|e| e.model.is_some())),
            good(&mut self.slices.values().map(|e| e.model.is_some())),
        )
    }
}

/// Brings `entries[delivered.id]` to the delivered version. `Err` is a duplicate: the
/// first delivery of an object in an update wins.
fn deliver<M: PartialEq>(
    entries: &mut BTreeMap<ObjectRef, Entry<M>>,
    delivered: Delivered<'_>,
    update: u64,
    convert: impl FnOnce(&ApiObject) -> Result<(M, Option<String>), String>,
) -> Result<Outcome<M>, String> {
    let Delivered {
        kind,
        id,
        version,
        object,
        origin,
    } = delivered;
    // Errors of the object as read already name their origin; the model's do not.
    let converted = |object: Result<&ApiObject, String>| match object {
        Ok(object) => convert(object)
            .map(|(model, note)| (model, note.map(|note| format!("{origin}{note}"))))
            .map_err(|problem| format!("{origin}{problem}")),
        Err(problem) => Err(problem),
    };
    let Some(entry) = entries.get_mut(id) else {
        let Some(object) = object else {
            return Ok(Outcome::Wanted);
        };
        let (model, problem) = match converted(object) {
            Ok((model, note)) => (Some(model), note),
            Err(problem) => (None, Some(problem)),
        };
        let outcome = if model.is_some() {
            Outcome::Changed(None)
        } else {
            Outcome::Unchanged
        };
        entries.insert(
            id.clone(),
            Entry {
                version: version.to_owned(),
                model,
                problem,
                seen: update,
            },
        );
        return Ok(outcome);
    };
    if entry.seen == update {
        return Err(format!(
            "{origin}{kind} {id}: defined more than once; the first definition is used"
        ));
    }
    entry.seen = update;
    if !version.is_empty() && entry.version == version {
        return Ok(Outcome::Unchanged);
    }
    let Some(object) = object else {
        return Ok(Outcome::Wanted);
    };
    entry.version = version.to_owned();
    match converted(object) {
        Ok((model, note)) => {
            entry.problem = note;
            if entry.model.as_ref() == Some(&model) {
                Ok(Outcome::Unchanged)
            } else {
                Ok(Outcome::Changed(entry.model.replace(model)))
            }
        }
        Err(problem) => {
            let kept = if entry.model.is_some() {
                "; its last good version stays in effect"
            } else {
                ""
            };
            entry.problem = Some(format!("{problem}{kept}"));
            Ok(Outcome::Unchanged)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        manifest::{self, Document},
        model::{BackendAddr, Desired, Frontend, Node},
        plan::{self, Programmed},
    };

    fn documents(yaml: &str) -> Vec<Document> {
        manifest::parse(Path::new("m.yaml"), yaml).unwrap()
    }

    /// Delivers `documents` as m.yaml's, at `version`.
    fn update_at(store: &mut Store, documents: &[Document], version: &str) -> Problems {
        store.update(documents.iter().map(|d| Delivered {
            kind: d.kind,
            id: &d.id,
            version,
            object: Some(d.object.as_ref().map_err(ToString::to_string)),
            origin: "m.yaml: ",
        }))
    }

    /// Delivers `documents` as changed, whatever they hold.
    fn update(store: &mut Store, documents: &[Document]) -> Problems {
        update_at(store, documents, "")
    }

    /// The frontends the store's Services have, computed from what it says changed.
    fn frontends(store: &mut Store, desired: &mut Desired) -> Vec<Frontend> {
        let changed = store.take_changed();
        desired.update(
            changed.iter().map(|id| (id, store.service(id))),
            &Node::default(),
        );
        desired.frontends().map(|(f, _)| *f).collect()
    }

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    #[test]
    fn an_invalid_object_keeps_its_last_good_version_and_a_gone_one_is_removed() {
        let mut store = Store::default();
        assert!(update(&mut store, &documents(GOOD)).is_empty());
        let bad = GOOD.replace("port: 80", "port: 0");
        let problems = update(&mut store, &documents(&bad));
        assert_eq!(
            problems,
            [
                "m.yaml: Service default/web: spec.ports[0].port: 0 is not a port (1-65535); its last good version stays in effect"
            ]
        );
        assert_eq!(store.counts(), (1, 0));
        let frontends = frontends(&mut store, &mut Desired::default());
        assert_eq!(frontends.len(), 1);
        assert_eq!(frontends[0].port, 80);

        assert!(update(&mut store, &[]).is_empty());
        assert_eq!(store.counts(), (0, 0));
    }

    #[test]
    fn a_change_of_node_addresses_marks_only_the_services_with_a_node_port() {
        let mut store = Store::default();
        let yaml = format!(
            "{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: np}}\nspec: {{type: NodePort, clusterIP: 10.96.0.11, ports: [{{port: 80, nodePort: 30080}}]}}\n"
        );
        assert!(update(&mut store, &documents(&yaml)).is_empty());
        store.take_changed();
        store.node_addresses_changed();
        let changed: Vec<String> = store
            .take_changed()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(changed, ["default/np"]);
    }

    #[test]
    fn an_invalid_new_object_is_skipped_and_the_rest_kept() {
        let mut store = Store::default();
        let yaml = format!(
            "{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{clusterIP: 10.96.0.11, ports: [{{port: 80, protocol: ICMP}}]}}\n"
        );
        let problems = update(&mut store, &documents(&yaml));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("Service default/bad: spec.ports[0].protocol"),
            "{problems:?}"
        );
        assert_eq!(store.counts(), (1, 0));
    }

    #[test]
    fn slices_of_another_address_type_are_reported_and_unused() {
        let mut store = Store::default();
        let yaml = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nendpoints: [{addresses: [\"fd00::1\"]}]\n";
        let problems = update(&mut store, &documents(yaml));
        assert_eq!(
            problems,
            ["m.yaml: EndpointSlice default/web-v6: addressType: IPv6 is not served yet; skipped"]
        );
    }

    const A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    const B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.11, externalIPs: [10.96.0.10], ports: [{port: 80}]}\n";
    const B_INVALID: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 0}]}\n";
    const HEADLESS_B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: None, ports: [{port: 80}]}\n";

    fn slice(name: &str, service: &str, ips: &[&str]) -> String {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [\"{ip}\"]}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{port: 8080}}]\n",
            endpoints.join(", ")
        )
    }

    /// Each step's Services recomputed from what the store says changed, and the maps
    /// planned for the frontends that touched, end where a sync from scratch ends.
    #[test]
    fn incremental_syncs_agree_with_a_sync_from_scratch() {
        let steps: Vec<Vec<String>> = vec![
            vec![A.into(), slice("a-1", "a", &["10.244.0.1", "10.244.0.2"])],
            // b claims a's clusterIP as an external IP: a keeps it.
            vec![
                A.into(),
                B.into(),
                slice("a-1", "a", &["10.244.0.1", "10.244.0.2"]),
                slice("b-1", "b", &["10.244.0.2", "10.244.0.3"]),
            ],
            // a goes: b's external IP takes over 10.96.0.10.
            vec![B.into(), slice("b-1", "b", &["10.244.0.2", "10.244.0.3"])],
            // The slice moves from b to a new a; b keeps its frontends, without backends.
            vec![A.into(), B.into(), slice("b-1", "a", &["10.244.0.4"])],
            // b turns invalid: its last good version stays.
            vec![
                A.into(),
                B_INVALID.into(),
                slice("b-1", "a", &["10.244.0.4"]),
            ],
            // b turns headless: out of the datapath.
            vec![
                A.into(),
                HEADLESS_B.into(),
                slice("b-1", "a", &["10.244.0.4"]),
            ],
            vec![],
        ];
        let mut store = Store::default();
        let mut desired = Desired::default();
        let mut programmed = Programmed::default();
        for (step, objects) in steps.iter().enumerate() {
            update(&mut store, &documents(&objects.join("---\n")));
            let changed = store.take_changed();
            let touched = desired.update(
                changed.iter().map(|id| (id, store.service(id))),
                &Node::default(),
            );

            let mut scratch_store = Store::default();
            let mut scratch = Desired::default();
            update(&mut scratch_store, &documents(&objects.join("---\n")));
            if step == 4 {
                // The scratch store never saw b's good version.
                assert_eq!(scratch_store.counts().0, store.counts().0 - 1);
            } else {
                frontends(&mut scratch_store, &mut scratch);
                assert_eq!(desired, scratch, "step {step}");
            }

            let plan = plan::plan(
                &programmed,
                |f| desired.target(f).map(|t| (&t.service, &t.spec)),
                &touched,
                &crate::agent::DEFAULT_CEILING,
            );
            assert!(plan.refused.is_empty());
            programmed.apply(&plan.ops);
            let wanted: Vec<(Frontend, Vec<BackendAddr>)> = desired
                .frontends()
                .map(|(f, t)| (*f, t.spec.backends.iter().copied().collect()))
                .collect();
            let held: Vec<(Frontend, Vec<BackendAddr>)> = programmed
                .frontends
                .keys()
                .map(|f| (*f, programmed.backends_of(f)))
                .collect();
            assert_eq!(held, wanted, "step {step}");
            let referenced: BTreeSet<_> = programmed
                .frontends
                .values()
                .flat_map(|f| f.slots.iter().copied())
                .collect();
            assert_eq!(
                programmed.backends.keys().copied().collect::<BTreeSet<_>>(),
                referenced,
                "step {step}: backends no slot names stay"
            );
        }
        assert_eq!(programmed, Programmed::default());
    }

    #[test]
    fn an_unchanged_version_is_not_converted_again() {
        let mut store = Store::default();
        let deliver = |store: &mut Store, yaml: &str| update_at(store, &documents(yaml), "7");
        assert!(deliver(&mut store, A).is_empty());
        assert_eq!(store.take_changed().len(), 1);
        // Same version, different text: a source only does that if its object did not
        // change, so the store does not even look.
        assert!(deliver(&mut store, &A.replace("port: 80", "port: 0")).is_empty());
        assert!(store.take_changed().is_empty());
    }

    #[test]
    fn an_object_defined_twice_keeps_the_first_definition() {
        let mut store = Store::default();
        let yaml = format!("{A}---\n{}", A.replace("10.96.0.10", "10.96.0.99"));
        let problems = update(&mut store, &documents(&yaml));
        assert_eq!(
            problems,
            ["m.yaml: Service default/a: defined more than once; the first definition is used"]
        );
        let frontends = frontends(&mut store, &mut Desired::default());
        assert_eq!(frontends[0].address.to_string(), "10.96.0.10");
    }
}
