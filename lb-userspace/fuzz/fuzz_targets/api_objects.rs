//! API objects into the model: what the API server sends the agent's two watches, as JSON,
//! through kube-rs's types, the agent's watches and store, the model and the planner.
//!
//! The input is lines: `S` or `E` and the JSON the API server sends the Services' or the
//! EndpointSlices' watch (a watch event, `{"type": "ADDED", "object": {…}}`, or a page of
//! a list, `{"kind": "ServiceList", "items": […]}`, which the watch takes as a relist);
//! `.` syncs. Every input ends with a sync.
//!
//! After each sync, besides what every sync checks (see `Agent::sync`): the store holds,
//! for each object the API server holds, its last good model (an object that turned
//! invalid keeps its last good version, one that was deleted is gone), and reports each
//! object whose current version is unusable, and nothing else. Each object also reads as
//! a manifest of it reads: the same model, or the same error.

#![no_main]

use std::{
    collections::{BTreeMap, btree_map::Entry},
    path::Path,
};

use lb_userspace::{
    fuzzing::{ObjectList, WatchEvent, WatcherEvent},
    model::{AddressType, Kind, Node, ObjectModel, ObjectRef, ServiceModel, SliceModel},
    source::{
        api::{EndpointSlice, Service},
        parse,
    },
    store::Problem,
};
use lb_userspace_fuzz::{Agent, UNBOUNDED};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|bytes: &[u8]| {
    let node = Node {
        name: "node-1".into(),
        ips: vec![std::net::Ipv4Addr::new(192, 168, 0, 2).into()],
        zone: Some("zone-a".into()),
    };
    let mut fuzz = Fuzz {
        agent: Agent::new(node, UNBOUNDED),
        api: Api::default(),
    };
    for line in bytes.split(|b| *b == b'\n') {
        match line.split_first() {
            Some((b'S', json)) => fuzz.watch::<Service>(json),
            Some((b'E', json)) => fuzz.watch::<EndpointSlice>(json),
            Some((b'.', _)) => fuzz.sync(),
            _ => {}
        }
    }
    fuzz.sync();
});

struct Fuzz {
    agent: Agent,
    /// What the API server holds, and what the store must make of it.
    api: Api,
}

/// An object the API server holds, as the store must hold it.
struct Held {
    version: String,
    /// Its current version's model, or why it has none.
    current: Result<ObjectModel, String>,
    last_good: Option<ObjectModel>,
}

#[derive(Default)]
struct Api {
    objects: BTreeMap<(Kind, ObjectRef), Held>,
    /// Objects the last list of each kind held more than once.
    repeated: BTreeMap<Kind, Vec<ObjectRef>>,
}

impl Api {
    /// What the store does with a delivered version: nothing if it has it, else it takes
    /// it, its model if it has one.
    fn put(
        &mut self,
        kind: Kind,
        id: ObjectRef,
        version: String,
        current: Result<ObjectModel, String>,
    ) {
        match self.objects.entry((kind, id)) {
            Entry::Occupied(held) if !version.is_empty() && held.get().version == version => {}
            Entry::Occupied(mut held) => {
                let held = held.get_mut();
                held.version = version;
                if let Ok(model) = &current {
                    held.last_good = Some(model.clone());
                }
                held.current = current;
            }
            Entry::Vacant(new) => {
                new.insert(Held {
                    version,
                    last_good: current.as_ref().ok().cloned(),
                    current,
                });
            }
        }
    }
}

/// One of the two kinds, as its watch and the API server's JSON have it.
trait Watched: serde::de::DeserializeOwned + Clone + Sized {
    const KIND: Kind;
    fn meta(&self) -> &lb_userspace::fuzzing::ObjectMeta;
    fn model(&self) -> Result<ObjectModel, String>;
    fn deliver(agent: &mut Agent, event: WatcherEvent<Self>);
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn meta(&self) -> &lb_userspace::fuzzing::ObjectMeta {
        &self.metadata
    }
    fn model(&self) -> Result<ObjectModel, String> {
        ServiceModel::from_api(self)
            .map(ObjectModel::Service)
            .map_err(|e| e.to_string())
    }
    fn deliver(agent: &mut Agent, event: WatcherEvent<Self>) {
        agent.service(event);
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn meta(&self) -> &lb_userspace::fuzzing::ObjectMeta {
        &self.metadata
    }
    fn model(&self) -> Result<ObjectModel, String> {
        SliceModel::from_api(self)
            .map(ObjectModel::Slice)
            .map_err(|e| e.to_string())
    }
    fn deliver(agent: &mut Agent, event: WatcherEvent<Self>) {
        agent.slice(event);
    }
}

/// The name the agent files an object under.
fn id_of(meta: &lb_userspace::fuzzing::ObjectMeta) -> ObjectRef {
    lb_userspace::model::object_ref(meta).unwrap_or_else(|| ObjectRef::new("default", "<unnamed>"))
}

impl Fuzz {
    /// One message of the API server to the watch of `K`s: a watch event, or a page of a
    /// list, which kube-rs's watcher delivers as a relist.
    fn watch<K: Watched>(&mut self, json: &[u8]) {
        if let Ok(event) = serde_json::from_slice::<WatchEvent<K>>(json) {
            if let Ok(
                WatchEvent::Added(object)
                | WatchEvent::Modified(object)
                | WatchEvent::Deleted(object),
            ) = serde_json::from_slice::<WatchEvent<Value>>(json)
            {
                reads_as_a_manifest::<K>(&object);
            }
            match event {
                WatchEvent::Added(object) | WatchEvent::Modified(object) => {
                    self.api.put(
                        K::KIND,
                        id_of(object.meta()),
                        object.meta().resource_version.clone().unwrap_or_default(),
                        object.model(),
                    );
                    K::deliver(&mut self.agent, WatcherEvent::Apply(object));
                }
                WatchEvent::Deleted(object) => {
                    self.api.objects.remove(&(K::KIND, id_of(object.meta())));
                    K::deliver(&mut self.agent, WatcherEvent::Delete(object));
                }
                // Bookmarks change nothing; an error makes kube-rs's watcher list again,
                // which a list line stands for.
                WatchEvent::Bookmark(_) | WatchEvent::Error(_) => {}
            }
        } else if let Ok(list) = serde_json::from_slice::<ObjectList<K>>(json) {
            if let Ok(values) = serde_json::from_slice::<ObjectList<Value>>(json) {
                values.items.iter().for_each(reads_as_a_manifest::<K>);
            }
            let before: Vec<ObjectRef> = self
                .api
                .objects
                .keys()
                .filter(|(kind, _)| *kind == K::KIND)
                .map(|(_, id)| id.clone())
                .collect();
            let mut listed = std::collections::BTreeSet::new();
            let mut repeated = Vec::new();
            K::deliver(&mut self.agent, WatcherEvent::Init);
            for object in list.items {
                let id = id_of(object.meta());
                if listed.insert(id.clone()) {
                    self.api.put(
                        K::KIND,
                        id,
                        object.meta().resource_version.clone().unwrap_or_default(),
                        object.model(),
                    );
                } else {
                    repeated.push(id);
                }
                K::deliver(&mut self.agent, WatcherEvent::InitApply(object));
            }
            K::deliver(&mut self.agent, WatcherEvent::InitDone);
            for id in before.into_iter().filter(|id| !listed.contains(id)) {
                self.api.objects.remove(&(K::KIND, id));
            }
            self.api.repeated.insert(K::KIND, repeated);
        }
    }

    fn sync(&mut self) {
        self.agent.sync(None);
        self.check_store();
    }

    /// The store holds each object's last good model, and reports what is unusable.
    fn check_store(&self) {
        let store = &self.agent.store;
        let good = |kind: Kind| {
            self.api
                .objects
                .iter()
                .filter(|((k, _), held)| *k == kind && held.last_good.is_some())
                .count()
        };
        assert_eq!(
            store.counts(),
            (good(Kind::Service), good(Kind::EndpointSlice)),
            "Services and EndpointSlices with a good version"
        );
        for id in self.agent.services_seen() {
            let held = self
                .api
                .objects
                .get(&(Kind::Service, id.clone()))
                .and_then(|held| held.last_good.as_ref());
            let in_store = store.service(id);
            assert_eq!(
                in_store
                    .as_ref()
                    .map(|(service, _)| ObjectModel::Service((*service).clone()))
                    .as_ref(),
                held,
                "Service {id}"
            );
            let mut slices: Vec<&SliceModel> = in_store
                .into_iter()
                .flat_map(|(_, slices)| slices)
                .map(|slice| &**slice)
                .collect();
            slices.sort_by(|a, b| a.id.cmp(&b.id));
            let mut expected: Vec<&SliceModel> = Vec::new();
            if held.is_some() {
                for ((kind, _), held) in &self.api.objects {
                    if let (Kind::EndpointSlice, Some(ObjectModel::Slice(slice))) =
                        (kind, &held.last_good)
                        && slice.service.as_ref() == Some(id)
                    {
                        expected.push(slice);
                    }
                }
            }
            assert_eq!(slices, expected, "slices of Service {id}");
        }

        let mut unusable = Vec::new();
        let mut not_served = Vec::new();
        let mut repeated = Vec::new();
        for problem in store.problems() {
            match problem {
                Problem::Object { error, kept } => unusable.push((error.to_string(), kept)),
                Problem::NotServed {
                    id, address_type, ..
                } => not_served.push((id, address_type)),
                Problem::Repeated { kind, id, .. } => repeated.push((kind, id)),
                other => panic!("unexpected problem: {other}"),
            }
        }
        let mut expected_unusable = Vec::new();
        let mut expected_not_served = Vec::new();
        for ((_, id), held) in &self.api.objects {
            match &held.current {
                Err(error) => expected_unusable.push((error.clone(), held.last_good.is_some())),
                Ok(ObjectModel::Slice(slice)) if slice.address_type != AddressType::Ipv4 => {
                    expected_not_served.push((id.clone(), slice.address_type.clone()));
                }
                Ok(_) => {}
            }
        }
        unusable.sort();
        expected_unusable.sort();
        assert_eq!(unusable, expected_unusable, "unusable objects");
        assert_eq!(not_served, expected_not_served, "slices not served");
        let mut expected_repeated: Vec<(Kind, ObjectRef)> = self
            .api
            .repeated
            .iter()
            .flat_map(|(kind, ids)| ids.iter().map(|id| (*kind, id.clone())))
            .collect();
        repeated.sort();
        expected_repeated.sort();
        assert_eq!(repeated, expected_repeated, "objects listed twice");
    }
}

/// An object reads as a manifest of it reads: the same model, or the same error.
fn reads_as_a_manifest<K: Watched>(object: &Value) {
    let Value::Object(fields) = object else {
        return;
    };
    let mut fields = fields.clone();
    let (api_version, kind) = match K::KIND {
        Kind::Service => ("v1", "Service"),
        Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
    };
    fields.insert("apiVersion".into(), api_version.into());
    fields.insert("kind".into(), kind.into());
    let Ok(text) = serde_json::to_string(&fields) else {
        return;
    };
    let documents = match parse::parse(Path::new("o.json"), &text) {
        Ok(documents) => documents,
        Err(error) => panic!("the manifest of an object: {error}"),
    };
    let [document] = documents.as_slice() else {
        panic!(
            "the manifest of an object reads as {} documents",
            documents.len()
        );
    };
    assert_eq!(document.kind, K::KIND);
    let from_manifest = document.object.as_ref().map_err(ToString::to_string);
    match serde_json::from_value::<K>(object.clone()) {
        Ok(typed) => {
            let from_api = typed.model().map_err(|e| format!("o.json: {e}"));
            assert_eq!(
                from_manifest,
                from_api.as_ref().map_err(String::clone),
                "{text}"
            );
        }
        Err(e) => assert!(from_manifest.is_err(), "{text}: read from the API: {e}"),
    }
}
