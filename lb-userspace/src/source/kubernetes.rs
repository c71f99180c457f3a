//! The Kubernetes API: reflectors on v1 Services and discovery.k8s.io/v1 EndpointSlices,
//! as kube-proxy watches them. A relist (after a broken watch or "410 Gone") swaps the
//! reflector's store only once the new list is complete, so a sync never sees a partial
//! list; and the agent syncs only once both initial lists are in.

use std::{path::Path, time::Instant};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store as Reflected},
        watcher,
    },
};

use super::{Change, Changes};
use crate::{
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
        .modify(drop_unused_metadata)
        .reflect(services_writer)
        .map(|event| event.map(|e| is_change(&e)));
        // Only slices that belong to a Service, as kube-proxy selects them.
        let slice_events = watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
        )
        .default_backoff()
        .modify(drop_unused_metadata)
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

/// The reflectors keep every object for as long as it exists: what the model never reads
/// goes before it is stored. Field managers and annotations (`kubectl apply` keeps a whole
/// copy of the object in one) are often most of an object's bytes.
fn drop_unused_metadata<K: kube::Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.annotations_mut().clear();
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
    use crate::model::ServiceModel;

    #[test]
    fn what_is_dropped_before_storing_is_nothing_the_model_reads() {
        let mut service: Service = serde_yaml::from_str(
            r#"
metadata:
  name: web
  namespace: shop
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  managedFields: [{manager: kubectl, operation: Apply, apiVersion: v1}]
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.7]
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.1}]}
"#,
        )
        .unwrap();
        let before = ServiceModel::from_api(&service).unwrap();
        drop_unused_metadata(&mut service);
        assert!(service.managed_fields().is_empty());
        assert!(service.annotations().is_empty());
        assert_eq!(ServiceModel::from_api(&service).unwrap(), before);
    }
}
