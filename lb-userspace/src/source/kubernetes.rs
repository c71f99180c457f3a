//! The Kubernetes API: watches on v1 Services and discovery.k8s.io/v1 EndpointSlices, as
//! kube-proxy watches them, applied to the store event by event (kube-rs `watcher`, not a
//! reflector: the store's models are the only copy). A relist (after a broken watch or
//! "410 Gone") replaces a kind's objects only once the new list is complete, so a sync
//! never sees a partial list; and the agent syncs only once both initial lists are in.
//!
//! The watches read the lean [`api`](crate::source::api) types, which keep only what the model
//! reads.

use std::{path::Path, sync::Arc, time::Instant};

use futures::StreamExt as _;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::{mpsc, oneshot};

use super::{Change, Changes};
use crate::{
    model::{
        Kind, ObjectError, ObjectModel, ObjectRef, SERVICE_NAME_LABEL, ServiceModel, SliceModel,
        object_ref,
    },
    source::api::{EndpointSlice, Service},
    store::{Delivered, Origin, Problems, Store, Unusable},
};

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no cluster configuration (in-cluster, $KUBECONFIG or ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("a reflector stopped before its initial list was in")]
    WriterDropped,
}

/// The zone of node `name` (its `topology.kubernetes.io/zone` label), for endpoints' zone
/// hints; `None`, said once, when the Node cannot be read or has no zone.
pub async fn node_zone(client: &Client, name: &str) -> Option<Arc<str>> {
    const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let unused = "zone hints are not used (or pass --node-zone)";
    match tokio::time::timeout(std::time::Duration::from_secs(5), nodes.get_opt(name)).await {
        Ok(Ok(Some(node))) => {
            let zone = node
                .metadata
                .labels
                .and_then(|labels| labels.get(ZONE_LABEL).cloned())
                .filter(|zone| !zone.is_empty());
            if zone.is_none() {
                tracing::info!("Node {name} has no {ZONE_LABEL} label: {unused}");
            }
            zone.map(Arc::from)
        }
        Ok(Ok(None)) => {
            tracing::warn!("Node {name} not found: {unused}");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!("reading Node {name}: {e}; {unused}");
            None
        }
        Err(_) => {
            tracing::warn!("reading Node {name} took over 5 s; {unused}");
            None
        }
    }
}

/// The client for `--kubeconfig PATH`, or inferred: in-cluster when
/// KUBERNETES_SERVICE_HOST is set, else $KUBECONFIG or ~/.kube/config.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| KubernetesError::Kubeconfig {
                    path: path.into(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubernetesError::Kubeconfig {
                    path: path.into(),
                    source,
                })?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// An object as a watch delivered it, converted into the model where it was received.
struct Received {
    id: ObjectRef,
    /// Its `resourceVersion`.
    version: String,
    object: Result<ObjectModel, Unusable>,
}

impl Received {
    fn of<K: kube::Resource>(
        object: &K,
        convert: fn(&K) -> Result<ObjectModel, ObjectError>,
    ) -> Self {
        let meta = object.meta();
        Self {
            id: id(meta),
            version: meta.resource_version.clone().unwrap_or_default(),
            object: convert(object).map_err(|e| Arc::new(e) as Unusable),
        }
    }
}

/// What a watch saw, in order, for the next sync to apply.
enum Event {
    Put(Kind, Box<Received>),
    Remove(Kind, ObjectRef),
    /// A complete list (the first, or after a broken watch or "410 Gone"): what it does not
    /// hold is gone.
    Relisted(Kind, Vec<Received>),
}

/// The watches: their events wait in a queue for the next sync, which applies each to the
/// store. Nothing else of the objects is kept: the store holds their models.
pub struct Kubernetes {
    events: mpsc::UnboundedReceiver<Event>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Kubernetes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The initial lists of both watches, arriving.
pub struct InitialLists {
    services: oneshot::Receiver<()>,
    slices: oneshot::Receiver<()>,
}

impl InitialLists {
    /// Returns once both lists are in (the first sync waits for them: a partial list would
    /// remove what the maps hold).
    pub async fn wait(self) -> Result<(), KubernetesError> {
        tracing::info!("waiting for the initial lists of Services and EndpointSlices");
        self.services
            .await
            .map_err(|_| KubernetesError::WriterDropped)?;
        self.slices
            .await
            .map_err(|_| KubernetesError::WriterDropped)?;
        Ok(())
    }
}

/// Objects per page of a list. kube-rs asks for 500, which at 100k Services is 400 round
/// trips before the first sync. A page is decoded into lean types as it arrives (its
/// JSON is 5–20 MiB for Services and small slices, more for slices of a hundred
/// endpoints), and the agent's peak stays within its budget at 100k Services.
const LIST_PAGE: u32 = 5000;

impl Kubernetes {
    /// Starts both watches; [`InitialLists::wait`] says when both initial lists are in.
    /// Every later change is sent to `changes`. Watch errors are logged and retried with
    /// backoff.
    pub fn start(
        client: Client,
        changes: Changes,
    ) -> Result<(Self, InitialLists), KubernetesError> {
        let (queue, events) = mpsc::unbounded_channel();
        let (services_listed, services_ready) = oneshot::channel();
        let (slices_listed, slices_ready) = oneshot::channel();
        let services = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().page_size(LIST_PAGE),
        )
        .default_backoff();
        // Only slices that belong to a Service, are not headless and not another proxy's,
        // as kube-proxy selects them. Services are all watched: the labelled ones are
        // listed by `lb services` with why they are left alone.
        let slices = watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default()
                .page_size(LIST_PAGE)
                .labels(&format!(
                    "{SERVICE_NAME_LABEL},!{},!{}",
                    crate::source::api::HEADLESS_LABEL,
                    crate::source::api::SERVICE_PROXY_NAME_LABEL
                )),
        )
        .default_backoff();
        let tasks = vec![
            tokio::spawn(follow(
                Kind::Service,
                services,
                service_model,
                queue.clone(),
                changes.clone(),
                services_listed,
            )),
            tokio::spawn(follow(
                Kind::EndpointSlice,
                slices,
                slice_model,
                queue,
                changes,
                slices_listed,
            )),
        ];
        Ok((
            Self { events, tasks },
            InitialLists {
                services: services_ready,
                slices: slices_ready,
            },
        ))
    }

    /// Applies the events seen since the last call to `store`; only objects whose
    /// `resourceVersion` changed are taken again.
    pub fn refresh(&mut self, store: &mut Store) -> Problems {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Put(kind, received) => store.put(
                    &Origin::api(kind),
                    Delivered {
                        kind,
                        id: received.id,
                        version: &received.version,
                        object: received.object,
                    },
                ),
                Event::Remove(kind, id) => store.remove(&Origin::api(kind), kind, &id),
                Event::Relisted(kind, objects) => {
                    let (heads, objects): (Vec<(ObjectRef, String)>, Vec<_>) = objects
                        .into_iter()
                        .map(|received| ((received.id, received.version), received.object))
                        .unzip();
                    store.replace(
                        &Origin::api(kind),
                        heads
                            .iter()
                            .zip(objects)
                            .map(|((id, version), object)| Delivered {
                                kind,
                                id: id.clone(),
                                version,
                                object,
                            }),
                    );
                }
            }
        }
        Vec::new()
    }
}

fn service_model(service: &Service) -> Result<ObjectModel, ObjectError> {
    ServiceModel::from_api(service).map(ObjectModel::Service)
}

fn slice_model(slice: &EndpointSlice) -> Result<ObjectModel, ObjectError> {
    SliceModel::from_api(slice).map(ObjectModel::Slice)
}

/// The events of one watch as kube-rs's watcher yields them, sent by hand.
type FedEvents<K> =
    futures::channel::mpsc::UnboundedSender<Result<watcher::Event<K>, watcher::Error>>;

/// The agent's watches fed by hand rather than by an API server, for the fuzz targets
/// (`lb_userspace::fuzzing`): each event goes through what the agent does with kube-rs's
/// ([`follow`]), and [`Self::refresh`] applies them to a store as a sync does.
#[doc(hidden)]
pub struct FedWatches {
    services: FedEvents<Service>,
    slices: FedEvents<EndpointSlice>,
    following: [std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>; 2],
    kubernetes: Kubernetes,
    /// Kept so that the watches' change signals have somewhere to go, as in the agent.
    _changes: mpsc::UnboundedReceiver<Change>,
}

impl Default for FedWatches {
    fn default() -> Self {
        let (queue, events) = mpsc::unbounded_channel();
        let (changes, changes_seen) = mpsc::unbounded_channel();
        let (services, service_events) = futures::channel::mpsc::unbounded();
        let (slices, slice_events) = futures::channel::mpsc::unbounded();
        // Nobody waits for the initial lists: a sync applies what has arrived.
        let (services_listed, _) = oneshot::channel();
        let (slices_listed, _) = oneshot::channel();
        Self {
            services,
            slices,
            following: [
                Box::pin(follow(
                    Kind::Service,
                    service_events,
                    service_model,
                    queue.clone(),
                    changes.clone(),
                    services_listed,
                )),
                Box::pin(follow(
                    Kind::EndpointSlice,
                    slice_events,
                    slice_model,
                    queue,
                    changes,
                    slices_listed,
                )),
            ],
            kubernetes: Kubernetes {
                events,
                tasks: Vec::new(),
            },
            _changes: changes_seen,
        }
    }
}

impl FedWatches {
    /// An event of the Services' watch, taken at once.
    pub fn service(&mut self, event: watcher::Event<Service>) {
        // Fails only once the watch has ended, which it does not while `self` lives.
        drop(self.services.unbounded_send(Ok(event)));
        self.take_events();
    }

    /// An event of the EndpointSlices' watch, taken at once.
    pub fn slice(&mut self, event: watcher::Event<EndpointSlice>) {
        drop(self.slices.unbounded_send(Ok(event)));
        self.take_events();
    }

    /// Runs both watches until each has taken every event sent to it: they wait for
    /// nothing else.
    fn take_events(&mut self) {
        let mut context = std::task::Context::from_waker(futures::task::noop_waker_ref());
        for following in &mut self.following {
            // Pending once its events are taken; it ends only with its sender.
            let _ = following.as_mut().poll(&mut context);
        }
    }

    /// Applies the events taken since the last call to `store`, as a sync does.
    pub fn refresh(&mut self, store: &mut Store) -> Problems {
        self.kubernetes.refresh(store)
    }
}

/// Forwards one watch's events to the queue, holding a relist's objects back until its
/// InitDone so that a sync never sees a partial list; `listed` fires at the first InitDone.
async fn follow<K: kube::Resource>(
    kind: Kind,
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    convert: fn(&K) -> Result<ObjectModel, ObjectError>,
    queue: mpsc::UnboundedSender<Event>,
    changes: Changes,
    listed: oneshot::Sender<()>,
) {
    let mut events = std::pin::pin!(events);
    let mut listed = Some(listed);
    let mut relist: Option<Vec<Received>> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(watcher::Event::Init) => {
                relist = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                relist
                    .get_or_insert_default()
                    .push(Received::of(&object, convert));
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                Event::Relisted(kind, relist.take().unwrap_or_default())
            }
            Ok(watcher::Event::Apply(object)) => {
                Event::Put(kind, Box::new(Received::of(&object, convert)))
            }
            Ok(watcher::Event::Delete(object)) => Event::Remove(kind, id(object.meta())),
            Err(e) => {
                tracing::warn!("watch of {kind}s: {e}; retrying with backoff");
                continue;
            }
        };
        let relisted = matches!(event, Event::Relisted(..));
        // The receivers are gone only while shutting down.
        if queue.send(event).is_err() {
            return;
        }
        if relisted {
            // The list's pages, read and dropped on this thread: handed back now, not
            // when this thread next allocates (a few milliseconds, once per list).
            crate::memory::release_freed();
        }
        if let Some(listed) = listed.take() {
            // Fails only if `start` stopped waiting, which it does not.
            listed.send(()).ok();
        }
        drop(changes.send(Change::Complete(Instant::now())));
    }
}

fn id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    object_ref(meta).unwrap_or_else(|| ObjectRef::new("default", "<unnamed>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceKind, ServiceModel};

    #[test]
    fn a_watched_object_keeps_what_the_model_and_kube_read_and_nothing_else() {
        // As the API server sends it.
        let service: Service = serde_json::from_str(
            r#"{"kind": "Service", "apiVersion": "v1",
                "metadata": {"name": "web", "namespace": "shop", "uid": "1c9e", "resourceVersion": "42",
                  "creationTimestamp": "2026-01-01T00:00:00Z", "labels": {"app": "web"},
                  "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                  "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1"}]},
                "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                  "externalIPs": ["203.0.113.7"], "sessionAffinity": "ClientIP", "selector": {"app": "web"},
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}}"#,
        )
        .unwrap();
        let meta = kube::Resource::meta(&service);
        assert_eq!(meta.name.as_deref(), Some("web"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.uid.as_deref(), Some("1c9e"));
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert!(meta.creation_timestamp.is_some());
        assert_eq!(meta.annotations, None);
        assert_eq!(meta.managed_fields, None);
        assert_eq!(
            meta.labels,
            Some(Default::default()),
            "no label the agent reads"
        );

        let model = ServiceModel::from_api(&service).unwrap();
        assert_eq!(model.id, ObjectRef::new("shop", "web"));
        assert_eq!(
            model.kind,
            ServiceKind::ClusterIp(smallvec::smallvec!["10.96.0.10".parse().unwrap()])
        );
        assert_eq!(&*model.ports[0].name, "http");
        assert_eq!(
            (model.ports[0].port, model.ports[0].node_port),
            (80, Some(30080))
        );
        assert_eq!(
            *model.external_ips,
            ["203.0.113.7".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            *model.load_balancer_ips,
            ["198.51.100.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            model.affinity_timeout_s,
            Some(crate::model::DEFAULT_AFFINITY_TIMEOUT_S)
        );
    }

    #[test]
    fn the_lean_types_are_the_resources_k8s_openapi_names() {
        use kube::Resource as _;
        assert_eq!(Service::url_path(&(), None), "/api/v1/services");
        assert_eq!(
            EndpointSlice::url_path(&(), Some("shop")),
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices"
        );
        assert_eq!(EndpointSlice::api_version(&()), "discovery.k8s.io/v1");
        assert_eq!(Service::kind(&()), "Service");
    }
}
