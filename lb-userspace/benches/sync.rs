//! The agent's sync path on the host, with no kernel and no source: N ClusterIP Services
//! with one EndpointSlice of 3 endpoints each (pods of their own), as a source delivers them.
//!
//! - `model_full`: a full sync's model: both lists converted into models (what the
//!   sources do on their own threads) and into a fresh [`Store`] ([`Store::replace`]),
//!   then [`Desired::update`] of every Service it reports changed.
//! - `plan_full`: [`plan::plan`] of every frontend from an empty [`Programmed`] (the maps
//!   of a fresh node).
//! - `endpoint_change`: one EndpointSlice rewritten (3 endpoints, then 2, then 3, …) on top
//!   of a full state: its watch event into the store ([`Store::put`]), the model of the
//!   Services it touched, the plan of their frontends, and the plan recorded as written —
//!   what the agent does per change, less the map writes.
//! - `full_sync_list_json`: all of the above from one `kind: List` JSON file on disk.
//! - `parse_list_json`: one `kind: List` JSON file of all the objects (as `kubectl get
//!   -A -o json` prints it) parsed into objects, as the manifest source reads it.
//! - `store_relist_unchanged`: a relist that finds nothing changed (after a broken watch):
//!   every object converted (as the watch does where it receives them) and looked at by
//!   the store, none taken.
//!
//! `cargo bench -p lb-userspace --bench sync` runs 1k, 10k and 100k Services
//! (`LB_BENCH_SIZES=1000,5000` for others); as a test (`cargo test --benches`) each bench
//! runs once at 1k only.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use divan::Bencher;
use lb_userspace::{
    agent::DEFAULT_CEILING,
    model::{Desired, Kind, Node, ObjectModel, ObjectRef, ServiceModel, SliceModel},
    plan::{self, Programmed},
    source::api,
    store::{Delivered, Origin, Store, Unusable},
};
use serde::Deserialize as _;

/// The agent's allocator, so that the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

/// The sizes to run: 1k, 10k and 100k Services when benchmarking, 1k as a test.
fn sizes() -> Vec<u32> {
    if let Some(sizes) = std::env::var("LB_BENCH_SIZES").ok().and_then(|s| {
        s.split(',')
            .map(|n| n.trim().parse().ok())
            .collect::<Option<Vec<u32>>>()
    }) {
        return sizes;
    }
    if std::env::args().any(|arg| arg == "--bench") {
        vec![1_000, 10_000, 100_000]
    } else {
        vec![1_000]
    }
}

const ENDPOINTS: u32 = 3;

/// Endpoint `e` of Service `i`: a pod address of its own.
fn pod_ip(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * ENDPOINTS + e)
}

/// An object as a source reads it, before it converts it into the model.
#[derive(Clone)]
enum ApiObject {
    Service(api::Service),
    EndpointSlice(api::EndpointSlice),
}

impl ApiObject {
    /// What the source delivers: the object's model (converted on the source's thread).
    fn model(&self) -> Result<ObjectModel, Unusable> {
        match self {
            Self::Service(service) => ServiceModel::from_api(service).map(ObjectModel::Service),
            Self::EndpointSlice(slice) => SliceModel::from_api(slice).map(ObjectModel::Slice),
        }
        .map_err(|e| Arc::new(e) as Unusable)
    }
}

fn service(i: u32) -> ApiObject {
    ApiObject::Service(api::Service::deserialize(service_json(i)).unwrap_or_default())
}

fn service_json(i: u32) -> serde_json::Value {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "default",
                     "resourceVersion": format!("s{i}")},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip.to_string(),
            "clusterIPs": [vip.to_string()],
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn slice(i: u32, endpoints: u32, version: &str) -> ApiObject {
    ApiObject::EndpointSlice(
        api::EndpointSlice::deserialize(slice_json(i, endpoints, version)).unwrap_or_default(),
    )
}

fn slice_json(i: u32, endpoints: u32, version: &str) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = (0..endpoints)
        .map(|e| {
            serde_json::json!({
                "addresses": [pod_ip(i, e).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-1",
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-1"),
            "namespace": "default",
            "resourceVersion": version,
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    })
}

/// Every object of the source, as a reflector holds them: kind, identity, version, object.
struct Objects(Vec<(Kind, ObjectRef, String, ApiObject)>);

impl Objects {
    fn new(n: u32) -> Self {
        let mut objects = Vec::with_capacity(2 * n as usize);
        for i in 0..n {
            objects.push((
                Kind::Service,
                ObjectRef::new("default", format!("svc-{i}")),
                format!("s{i}"),
                service(i),
            ));
            let version = format!("e{i}");
            objects.push((
                Kind::EndpointSlice,
                ObjectRef::new("default", format!("svc-{i}-1")),
                version.clone(),
                slice(i, ENDPOINTS, &version),
            ));
        }
        Self(objects)
    }

    /// The objects of one kind, as a list of the API delivers them.
    fn delivered(&self, kind: Kind) -> impl Iterator<Item = Delivered<'_>> {
        self.0
            .iter()
            .filter(move |(of, ..)| *of == kind)
            .map(|(kind, id, version, object)| Delivered {
                kind: *kind,
                id: id.clone(),
                version,
                object: object.model(),
            })
    }

    /// Both lists, as after the agent's first list of each kind.
    fn relist(&self, store: &mut Store) {
        for kind in [Kind::Service, Kind::EndpointSlice] {
            store.replace(&Origin::api(kind), self.delivered(kind));
        }
    }
}

/// The objects as one `kind: List` JSON document, as `kubectl get -A -o json` writes it.
fn list_json(n: u32) -> String {
    let items: Vec<serde_json::Value> = (0..n)
        .flat_map(|i| [service_json(i), slice_json(i, ENDPOINTS, &format!("e{i}"))])
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items,
        "metadata": {"resourceVersion": ""},
    }))
    .unwrap_or_default()
}

fn node() -> Node {
    Node {
        name: "node-1".into(),
        ips: vec![Ipv4Addr::new(192, 168, 0, 1).into()],
        zone: None,
    }
}

/// The model of a full sync: every object into a fresh store, every Service into the
/// desired state.
fn model(objects: &Objects, node: &Node) -> (Store, Desired) {
    let mut store = Store::default();
    objects.relist(&mut store);
    debug_assert!(store.problems().is_empty(), "{:?}", store.problems());
    let changed = store.take_changed();
    let mut desired = Desired::default();
    desired.update(changed.iter().map(|id| (id, store.service(id))), node);
    (store, desired)
}

fn plan_all(desired: &Desired, programmed: &Programmed) -> plan::Plan<ObjectRef> {
    let scope: BTreeSet<_> = desired.frontends().map(|(frontend, _)| *frontend).collect();
    plan::plan(
        programmed,
        |frontend| {
            desired
                .target(frontend)
                .map(|target| (target.service.clone(), &target.spec))
        },
        &scope,
        &DEFAULT_CEILING,
        false,
    )
}

/// A full sync's read of one `kind: List` JSON file: the text parsed into objects, and
/// those into a fresh store (what the manifest source does with a file it reads).
#[divan::bench(args = sizes(), sample_count = 10, sample_size = 1)]
fn parse_list_json(bencher: Bencher, n: u32) {
    let text = list_json(n);
    let path = std::path::Path::new("services.json");
    bencher.bench_local(|| {
        let documents = lb_userspace::source::parse::parse(path, &text).unwrap_or_default();
        debug_assert_eq!(documents.len(), 2 * n as usize);
        documents
    });
}

/// A full sync's host side from one `kind: List` JSON file: the file read and parsed into
/// models, those into a fresh store, the model of every Service, and the plan of every
/// frontend from empty maps — what the agent does before it writes the maps.
#[divan::bench(args = sizes(), sample_count = 5, sample_size = 1)]
fn full_sync_list_json(bencher: Bencher, n: u32) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("services.json");
    if std::fs::write(&path, list_json(n)).is_err() {
        return;
    }
    let node = node();
    bencher.bench_local(|| {
        let documents = lb_userspace::source::parse::read_file(&path).unwrap_or_default();
        let mut store = Store::default();
        store.replace(
            &Origin::file(&path),
            documents.into_iter().map(|document| Delivered {
                kind: document.kind,
                id: document.id,
                version: "1",
                object: document.object.map_err(|e| Arc::new(e) as Unusable),
            }),
        );
        let changed = store.take_changed();
        let mut desired = Desired::default();
        desired.update(changed.iter().map(|id| (id, store.service(id))), &node);
        let plan = plan_all(&desired, &Programmed::default());
        debug_assert_eq!(plan.ops.len(), 7 * n as usize);
        (store, desired, plan)
    });
}

#[divan::bench(args = sizes(), sample_count = 10, sample_size = 1)]
fn model_full(bencher: Bencher, n: u32) {
    let objects = Objects::new(n);
    let node = node();
    bencher.bench_local(|| model(&objects, &node));
}

#[divan::bench(args = sizes(), sample_count = 10, sample_size = 1)]
fn plan_full(bencher: Bencher, n: u32) {
    let (_, desired) = model(&Objects::new(n), &node());
    let empty = Programmed::default();
    bencher.bench_local(|| {
        let plan = plan_all(&desired, &empty);
        debug_assert!(plan.refused.is_empty());
        plan
    });
}

/// A relist that finds nothing changed (after a broken watch): every object converted,
/// none taken. Incremental syncs do not pay this: they apply watch events.
#[divan::bench(args = sizes(), sample_count = 100, sample_size = 1)]
fn store_relist_unchanged(bencher: Bencher, n: u32) {
    let objects = Objects::new(n);
    let (mut store, _) = model(&objects, &node());
    bencher.bench_local(|| {
        objects.relist(&mut store);
        let changed = store.take_changed();
        assert!(changed.is_empty());
    });
}

#[divan::bench(args = sizes(), sample_count = 100, sample_size = 1)]
fn endpoint_change(bencher: Bencher, n: u32) {
    let mut objects = Objects::new(n);
    let node = node();
    let (mut store, mut desired) = model(&objects, &node);
    let mut programmed = Programmed::default();
    programmed.apply(&plan_all(&desired, &programmed).ops);
    assert_eq!(
        programmed.frontends.len(),
        n as usize,
        "a full plan programs every frontend"
    );
    // The Service under test is the last one; its slice is the last object. Its two
    // versions are made beforehand: a source parses an object before the sync sees it.
    let under_test = n - 1;
    let index = objects.0.len() - 1;
    // Change 1 takes an endpoint away, change 2 brings it back, …
    let variants = [
        slice(under_test, ENDPOINTS, ""),
        slice(under_test, ENDPOINTS - 1, ""),
    ];
    let mut changes = 0_usize;
    bencher.bench_local(|| {
        changes += 1;
        objects.0[index].3 = variants[changes % 2].clone();
        objects.0[index].2 = format!("c{changes}");

        // The watch event of the changed slice, as the Kubernetes source applies it.
        let (kind, id, version, object) = &objects.0[index];
        store.put(
            &Origin::api(*kind),
            Delivered {
                kind: *kind,
                id: id.clone(),
                version,
                object: object.model(),
            },
        );
        let changed = store.take_changed();
        let touched = desired.update(changed.iter().map(|id| (id, store.service(id))), &node);
        let plan = plan::plan(
            &programmed,
            |frontend| {
                desired
                    .target(frontend)
                    .map(|target| (target.service.clone(), &target.spec))
            },
            &touched,
            &DEFAULT_CEILING,
            false,
        );
        programmed.apply(&plan.ops);
        plan.ops.len()
    });
    // Every change reached the plan: the frontend has the endpoints of the last variant.
    if changes > 0 {
        let id = ObjectRef::new("default", format!("svc-{under_test}"));
        let backends = desired
            .frontends_of(&id)
            .next()
            .map(|frontend| programmed.backends_of(&frontend).len());
        let want = if changes % 2 == 1 {
            ENDPOINTS - 1
        } else {
            ENDPOINTS
        };
        assert_eq!(backends, Some(want as usize));
    }
}
