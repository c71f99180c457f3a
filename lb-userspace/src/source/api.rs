//! Services and EndpointSlices as the agent reads them from manifests and the Kubernetes API:
//! only the fields the model reads (and a few it is about to), so that everything else —
//! selectors, targetRefs, owner references, field managers, annotations — is skipped while
//! parsing instead of being allocated and kept. At 100k Services the full k8s-openapi
//! objects cost seconds to parse and most of a GiB to hold.
//!
//! Field names and nesting follow k8s-openapi, so the model reads them the same way; like
//! k8s-openapi, a missing or `null` field the schema requires reads as its default, and
//! unknown fields are ignored.

use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

/// The labels the agent reads; an object's other labels are skipped.
pub const KEPT_LABELS: [&str; 3] = [
    crate::model::SERVICE_NAME_LABEL,
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
];
/// Set by the control plane on the EndpointSlices of a headless Service (and by hand on a
/// Service, to have it left alone); kube-proxy skips the objects that carry it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// On a Service another proxy implements (its value names that proxy): kube-proxy, and lb,
/// leave it alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// A v1 Service.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "lean_metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    pub ip_families: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<SessionAffinityConfig>,
    pub internal_traffic_policy: Option<String>,
    pub external_name: Option<String>,
    pub traffic_distribution: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub port: i32,
    /// Checked as the API server would; the backends' ports come from the EndpointSlices,
    /// where the controller resolved it.
    pub target_port: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    pub protocol: Option<String>,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    pub timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
    pub ip_mode: Option<String>,
}

/// A discovery.k8s.io/v1 EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "lean_metadata")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<Endpoint>,
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub node_name: Option<String>,
    pub hostname: Option<String>,
    pub zone: Option<String>,
    pub hints: Option<EndpointHints>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    pub for_zones: Option<Vec<ForZone>>,
    pub for_nodes: Option<Vec<ForNode>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForZone {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForNode {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

/// A field the schema requires: `null` reads as its default, as k8s-openapi reads it.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// The part of `metadata` that kube-rs and the model read. Field managers and annotations
/// (`kubectl apply` keeps a whole copy of the object in one) are often most of an object's
/// bytes; they are skipped, never stored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMetadata {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
    creation_timestamp: Option<Time>,
    labels: Option<KeptLabels>,
}

/// `metadata` as the lean types read it, for readers that take an object apart themselves.
pub struct Metadata(pub ObjectMeta);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lean_metadata(deserializer).map(Metadata)
    }
}

fn lean_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let Some(lean) = Option::<LeanMetadata>::deserialize(deserializer)? else {
        return Ok(ObjectMeta::default());
    };
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        resource_version: lean.resource_version,
        uid: lean.uid,
        creation_timestamp: lean.creation_timestamp,
        labels: lean.labels.map(|labels| labels.0),
        ..ObjectMeta::default()
    })
}

/// `metadata.labels` with only [`KEPT_LABELS`]: the others are skipped without allocating.
struct KeptLabels(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for KeptLabels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(KeptLabelsVisitor)
    }
}

struct KeptLabelsVisitor;

impl<'de> Visitor<'de> for KeptLabelsVisitor {
    type Value = KeptLabels;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of labels")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeptLabels, A::Error> {
        let mut kept = BTreeMap::new();
        while let Some(key) = map.next_key::<LabelKey>()? {
            match key.0 {
                Some(key) => {
                    let value: String = map.next_value()?;
                    kept.insert(key.to_owned(), value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(KeptLabels(kept))
    }
}

/// A label key: `Some` for one of [`KEPT_LABELS`]; others are matched without allocating.
struct LabelKey(Option<&'static str>);

impl<'de> Deserialize<'de> for LabelKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(LabelKeyVisitor)
    }
}

struct LabelKeyVisitor;

impl Visitor<'_> for LabelKeyVisitor {
    type Value = LabelKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a label key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<LabelKey, E> {
        Ok(LabelKey(KEPT_LABELS.into_iter().find(|kept| *kept == key)))
    }
}

/// The API group, version and resource of each type, as k8s-openapi has them: the lean
/// types are what the reflectors list and watch.
macro_rules! resource_as_k8s_openapi {
    ($lean:ty, $full:ty) => {
        impl kube::Resource for $lean {
            type DynamicType = ();
            type Scope = <$full as k8s_openapi::Resource>::Scope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(<$full as k8s_openapi::Resource>::KIND)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(<$full as k8s_openapi::Resource>::GROUP)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(<$full as k8s_openapi::Resource>::VERSION)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(<$full as k8s_openapi::Resource>::URL_PATH_SEGMENT)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource_as_k8s_openapi!(Service, k8s_openapi::api::core::v1::Service);
resource_as_k8s_openapi!(
    EndpointSlice,
    k8s_openapi::api::discovery::v1::EndpointSlice
);
