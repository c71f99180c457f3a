//! The Kubernetes API: reflectors on v1 Services and discovery.k8s.io/v1 EndpointSlices,
//! as kube-proxy watches them. A relist (after a broken watch or "410 Gone") swaps the
//! reflector's store only once the new list is complete, so a sync never sees a partial
//! list; and the agent syncs only once both initial lists are in.
//!
//! The reflectors hold the lean [`api`](crate::api) types, which keep only what the model
//! reads: every object stays in memory for as long as it exists.

use std::{path::Path, time::Instant};

use futures::StreamExt as _;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store as Reflected},
        watcher,
    },
};

use super::{Change, Changes};
use crate::{
    api::{EndpointSlice, Service},
    manifest::{ApiObject, Kind},
    model::{ObjectRef, SERVICE_NAME_LABEL, object_ref},
    store::{Delivered, Problems, Store},
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

pub struct Kubernetes {
    services: Reflected<Service>,
    slices: Reflected<EndpointSlice>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubernetes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubernetes {
    /// Starts both watches and returns once both initial lists are in; every later change
    /// is sent to `changes`. Watch errors are logged and retried with backoff.
    pub async fn start(client: Client, changes: Changes) -> Result<Self, KubernetesError> {
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let service_events = watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(services_writer)
        .map(|event| event.map(|e| is_change(&e)));
        // Only slices that belong to a Service, as kube-proxy selects them.
        let slice_events = watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
        )
        .default_backoff()
        .reflect(slices_writer)
        .map(|event| event.map(|e| is_change(&e)));
        let mut events = Box::pin(futures::stream::select(service_events, slice_events));
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    // Changes inside a relist wait for its InitDone, which swaps the store.
                    Ok(true) => drop(changes.send(Change::Complete(Instant::now()))),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("watch: {e}; retrying with backoff"),
                }
            }
        });
        tracing::info!("waiting for the initial lists of Services and EndpointSlices");
        services
            .wait_until_ready()
            .await
            .map_err(|_| KubernetesError::WriterDropped)?;
        slices
            .wait_until_ready()
            .await
            .map_err(|_| KubernetesError::WriterDropped)?;
        Ok(Self {
            services,
            slices,
            task,
        })
    }

    /// Puts the reflectors' current objects into `store`; only those whose
    /// `resourceVersion` changed are converted again.
    pub fn refresh(&mut self, store: &mut Store) -> Problems {
        let objects: Vec<(Kind, ObjectRef, ApiObject)> = self
            .services
            .state()
            .into_iter()
            .map(|s| (Kind::Service, ApiObject::Service(s)))
            .chain(
                self.slices
                    .state()
                    .into_iter()
                    .map(|s| (Kind::EndpointSlice, ApiObject::EndpointSlice(s))),
            )
            .map(|(kind, object)| (kind, id(object.metadata()), object))
            .collect();
        store.update(objects.iter().map(|(kind, id, object)| {
            Delivered {
                kind: *kind,
                id,
                version: object
                    .metadata()
                    .resource_version
                    .as_deref()
                    .unwrap_or_default(),
                object: Some(Ok(object)),
                origin: "",
            }
        }))
    }
}

/// Whether the store changed with `event`: objects of a relist in progress are held back
/// until its InitDone swaps them in.
fn is_change<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_))
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
            ServiceKind::ClusterIp(vec!["10.96.0.10".parse().unwrap()])
        );
        assert_eq!(model.ports[0].name, "http");
        assert_eq!(
            (model.ports[0].port, model.ports[0].node_port),
            (80, Some(30080))
        );
        assert_eq!(
            model.external_ips,
            ["203.0.113.7".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            model.load_balancer_ips,
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
