//! The agent's model of Services and EndpointSlices: API objects validated into the few
//! facts the datapath needs, and the pure function that turns them into frontends.
//!
//! Everything here is plain data, tested on the host; nothing touches a map.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of an API object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A field of an object that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub object: ObjectRef,
    pub field: String,
    pub reason: String,
}

/// Transport protocol of a Service port, as the API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's `protocol` field; absent means TCP, as in the API.
    fn from_api(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!(
                "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
            )),
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::IPPROTO_TCP,
            Self::Udp => lb_common::IPPROTO_UDP,
            Self::Sctp => lb_common::IPPROTO_SCTP,
        }
    }

    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            lb_common::IPPROTO_TCP => Some(Self::Tcp),
            lb_common::IPPROTO_UDP => Some(Self::Udp),
            lb_common::IPPROTO_SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a Service is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// Virtual IPs (the IPv4 ones of `spec.clusterIPs`) that the datapath translates.
    ClusterIp(Vec<Ipv4Addr>),
    /// `clusterIP: None`: DNS returns the pod IPs; there is nothing to translate.
    Headless,
    /// `type: ExternalName`: a DNS CNAME to this name; there is nothing to translate.
    ExternalName(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortModel {
    /// Empty for the unnamed port of a single-port Service, as in the API.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceModel {
    pub id: ObjectRef,
    pub kind: ServiceKind,
    pub ports: Vec<ServicePortModel>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    pub address: Ipv4Addr,
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceModel {
    pub id: ObjectRef,
    /// The Service named by [`SERVICE_NAME_LABEL`]; `None` for a slice that belongs to none.
    pub service: Option<ObjectRef>,
    /// `addressType: IPv4`. Other address types are kept but contribute no backends.
    pub ipv4: bool,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointModel>,
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Where an object's identity comes from: `metadata.namespace` (default `default`, as kubectl
/// applies it) and `metadata.name`.
pub fn object_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectRef> {
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    Some(ObjectRef::new(namespace_of(meta), name))
}

fn port_number(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is not a port (1-65535)"))
}

impl ServiceModel {
    pub fn from_api(service: &Service) -> Result<Self, ObjectError> {
        let id = object_ref(&service.metadata).ok_or_else(|| ObjectError {
            kind: "Service",
            object: ObjectRef::new(namespace_of(&service.metadata), "<unnamed>"),
            field: "metadata.name".into(),
            reason: "missing".into(),
        })?;
        let error = |field: String, reason: String| ObjectError {
            kind: "Service",
            object: id.clone(),
            field,
            reason,
        };
        let spec = service
            .spec
            .as_ref()
            .ok_or_else(|| error("spec".into(), "missing".into()))?;

        let mut ports = Vec::new();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            ports.push(ServicePortModel {
                name: port.name.clone().unwrap_or_default(),
                port: port_number(port.port)
                    .map_err(|r| error(format!("spec.ports[{i}].port"), r))?,
                protocol: Protocol::from_api(port.protocol.as_deref())
                    .map_err(|r| error(format!("spec.ports[{i}].protocol"), r))?,
            });
        }

        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            let name = spec
                .external_name
                .clone()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    error(
                        "spec.externalName".into(),
                        "missing for type ExternalName".into(),
                    )
                })?;
            ServiceKind::ExternalName(name)
        } else {
            Self::cluster_ips(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref())
                .map_err(|(field, reason)| error(field, reason))?
        };
        Ok(Self { id, kind, ports })
    }

    fn cluster_ips(
        cluster_ip: Option<&str>,
        cluster_ips: Option<&[String]>,
    ) -> Result<ServiceKind, (String, String)> {
        // `clusterIPs` is authoritative when present; `clusterIP` is its first element.
        let (field, ips): (&str, Vec<&str>) = match cluster_ips {
            Some(ips) if !ips.is_empty() => {
                ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
            }
            _ => ("spec.clusterIP", cluster_ip.into_iter().collect()),
        };
        match ips.as_slice() {
            [] | [""] => Err((
                field.to_owned(),
                "not set: a Service must carry the clusterIP the API server allocated".into(),
            )),
            ["None", ..] => Ok(ServiceKind::Headless),
            _ => {
                let mut v4 = Vec::new();
                for (i, ip) in ips.iter().enumerate() {
                    match ip.parse::<IpAddr>() {
                        Ok(IpAddr::V4(ip)) => v4.push(ip),
                        // IPv6 frontends come with the connect6 programs.
                        Ok(IpAddr::V6(_)) => {}
                        Err(_) => {
                            let field = if field == "spec.clusterIPs" {
                                format!("{field}[{i}]")
                            } else {
                                field.to_owned()
                            };
                            return Err((field, format!("{ip:?} is not an IP address")));
                        }
                    }
                }
                Ok(ServiceKind::ClusterIp(v4))
            }
        }
    }
}

impl SliceModel {
    pub fn from_api(slice: &EndpointSlice) -> Result<Self, ObjectError> {
        let id = object_ref(&slice.metadata).ok_or_else(|| ObjectError {
            kind: "EndpointSlice",
            object: ObjectRef::new(namespace_of(&slice.metadata), "<unnamed>"),
            field: "metadata.name".into(),
            reason: "missing".into(),
        })?;
        let error = |field: String, reason: String| ObjectError {
            kind: "EndpointSlice",
            object: id.clone(),
            field,
            reason,
        };
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .filter(|name| !name.is_empty())
            .map(|name| ObjectRef::new(id.namespace.clone(), name.clone()));
        let ipv4 = slice.address_type == "IPv4";

        let mut ports = Vec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            // A port without a number means "all ports" and only exists for selector-less
            // Services with no ports; it gives nothing to translate to.
            let Some(number) = port.port else { continue };
            ports.push(SlicePort {
                name: port.name.clone().unwrap_or_default(),
                port: port_number(number).map_err(|r| error(format!("ports[{i}].port"), r))?,
                protocol: Protocol::from_api(port.protocol.as_deref())
                    .map_err(|r| error(format!("ports[{i}].protocol"), r))?,
            });
        }

        let mut endpoints = Vec::new();
        if ipv4 {
            for (i, endpoint) in slice.endpoints.iter().enumerate() {
                // Addresses of one endpoint are fungible; kube-proxy uses the first.
                let Some(address) = endpoint.addresses.first() else {
                    return Err(error(format!("endpoints[{i}].addresses"), "empty".into()));
                };
                let address = address.parse::<Ipv4Addr>().map_err(|_| {
                    error(
                        format!("endpoints[{i}].addresses[0]"),
                        format!("{address:?} is not an IPv4 address"),
                    )
                })?;
                // "ready: unset" means ready, as the API documents.
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                endpoints.push(EndpointModel { address, ready });
            }
        }
        Ok(Self {
            id,
            service,
            ipv4,
            ports,
            endpoints,
        })
    }
}

/// A Service frontend: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// A backend: a pod address and the port the Service port resolves to there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

/// What one frontend should translate to, and which Service port it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendTarget {
    pub service: ObjectRef,
    pub port_name: String,
    pub backends: BTreeSet<BackendAddr>,
}

/// Why a Service is known but has no frontend in the datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum NotInDatapath {
    /// DNS answers with the pod IPs directly.
    Headless,
    /// DNS answers with a CNAME to `name`.
    ExternalName { name: String },
}

/// A frontend claimed by more than one Service: the first by name keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub frontend: Frontend,
    pub kept: ObjectRef,
    pub ignored: ObjectRef,
}

/// The state the datapath should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendTarget>,
    pub not_in_datapath: BTreeMap<ObjectRef, NotInDatapath>,
    pub conflicts: Vec<Conflict>,
}

impl Desired {
    /// The frontends with their backend sets: what the maps must hold.
    pub fn backend_sets(&self) -> BTreeMap<Frontend, BTreeSet<BackendAddr>> {
        self.frontends
            .iter()
            .map(|(frontend, target)| (*frontend, target.backends.clone()))
            .collect()
    }
}

/// Computes the desired datapath state from validated Services and EndpointSlices.
///
/// A Service port is served by the EndpointSlice ports of the same name and protocol (the
/// EndpointSlice controller has already resolved `targetPort` into them, named ports too),
/// at every endpoint whose `ready` condition is not false. Endpoints repeated across slices
/// count once.
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a ServiceModel>,
    slices: impl IntoIterator<Item = &'a SliceModel>,
) -> Desired {
    let mut slices_by_service: BTreeMap<&ObjectRef, Vec<&SliceModel>> = BTreeMap::new();
    for slice in slices {
        if let Some(service) = &slice.service {
            slices_by_service.entry(service).or_default().push(slice);
        }
    }

    let mut services: Vec<&ServiceModel> = services.into_iter().collect();
    services.sort_by(|a, b| a.id.cmp(&b.id));

    let mut out = Desired::default();
    for service in services {
        let ips = match &service.kind {
            ServiceKind::ClusterIp(ips) => ips,
            ServiceKind::Headless => {
                out.not_in_datapath
                    .insert(service.id.clone(), NotInDatapath::Headless);
                continue;
            }
            ServiceKind::ExternalName(name) => {
                out.not_in_datapath.insert(
                    service.id.clone(),
                    NotInDatapath::ExternalName { name: name.clone() },
                );
                continue;
            }
        };
        let slices = slices_by_service
            .get(&service.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &service.ports {
            let backends: BTreeSet<BackendAddr> = slices
                .iter()
                .filter(|slice| slice.ipv4)
                .flat_map(|slice| {
                    let target = slice
                        .ports
                        .iter()
                        .find(|p| p.name == port.name && p.protocol == port.protocol);
                    target.into_iter().flat_map(|target| {
                        slice
                            .endpoints
                            .iter()
                            .filter(|e| e.ready)
                            .map(|e| BackendAddr {
                                address: e.address,
                                port: target.port,
                            })
                    })
                })
                .collect();
            for ip in ips {
                let frontend = Frontend {
                    address: *ip,
                    port: port.port,
                    protocol: port.protocol,
                };
                if let Some(existing) = out.frontends.get(&frontend) {
                    out.conflicts.push(Conflict {
                        frontend,
                        kept: existing.service.clone(),
                        ignored: service.id.clone(),
                    });
                    continue;
                }
                out.frontends.insert(
                    frontend,
                    FrontendTarget {
                        service: service.id.clone(),
                        port_name: port.name.clone(),
                        backends: backends.clone(),
                    },
                );
            }
        }
    }
    out
}
