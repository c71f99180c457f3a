//! The agent's model of Services and EndpointSlices: API objects validated into the few
//! facts the datapath needs, and the pure function that turns them into frontends.
//!
//! Everything here is plain data, tested on the host; nothing touches a map.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use crate::{
    hash::Map,
    source::api::{EndpointSlice, Service},
};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of an API object: one shared allocation per name, behind a pointer of
/// a pointer's size (a thin `Arc`, which keeps the length in the allocation, with the
/// name's hash and where its namespace ends), so that the store, the model, the plan and
/// the state file's writer all index by it for eight bytes a reference (the store interns
/// each name once: every copy points at one allocation).
#[derive(Clone)]
pub struct ObjectRef(triomphe::ThinArc<NameHeader, u8>);

#[derive(Clone, Copy, PartialEq, Eq)]
struct NameHeader {
    /// The hash of the text, computed once: names are looked up in several indexes per
    /// event. 32 bits tell apart far more names than a cluster has.
    hash: u32,
    /// Where the namespace ends in the text.
    namespace_len: u32,
}

impl ObjectRef {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        let (namespace, name) = (namespace.as_ref(), name.as_ref());
        let mut text = SmallVec::<[u8; 64]>::with_capacity(namespace.len() + 1 + name.len());
        text.extend_from_slice(namespace.as_bytes());
        text.push(b'/');
        text.extend_from_slice(name.as_bytes());
        let hash = std::hash::BuildHasher::hash_one(
            &foldhash::fast::FixedState::default(),
            text.as_slice(),
        );
        let header = NameHeader {
            #[expect(
                clippy::cast_possible_truncation,
                reason = "the low half of the hash is a hash"
            )]
            hash: hash as u32,
            namespace_len: u32::try_from(namespace.len()).unwrap_or(u32::MAX),
        };
        Self(triomphe::ThinArc::from_header_and_slice(header, &text))
    }

    /// The same name in an allocation of its own: what is kept for long is allocated
    /// apart from the temporaries of the parse that made it, which would otherwise keep
    /// its heap pages mostly empty but in use.
    pub fn copied(&self) -> Self {
        Self(triomphe::ThinArc::from_header_and_slice(
            self.header(),
            &self.0.slice,
        ))
    }

    fn header(&self) -> NameHeader {
        self.0.header.header
    }

    fn split(&self) -> usize {
        usize::try_from(self.header().namespace_len)
            .unwrap_or(usize::MAX)
            .min(self.0.slice.len())
    }

    pub fn namespace(&self) -> &str {
        self.as_str().get(..self.split()).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.as_str().get(self.split() + 1..).unwrap_or_default()
    }

    /// `namespace/name`.
    pub fn as_str(&self) -> &str {
        // SAFETY: [`Self::new`], the only way to make one, copies whole `str`s and an
        // ASCII `/` into the slice: its bytes are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0.slice) }
    }

    /// Whether both are the same interned name: what the store hands out for one name.
    pub fn same(&self, other: &Self) -> bool {
        self.0.ptr() == other.0.ptr()
    }
}

impl PartialEq for ObjectRef {
    fn eq(&self, other: &Self) -> bool {
        self.same(other) || (self.header() == other.header() && self.0.slice == other.0.slice)
    }
}

impl Eq for ObjectRef {}

impl std::hash::Hash for ObjectRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u32(self.header().hash);
    }
}

impl PartialOrd for ObjectRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ObjectRef {
    /// By namespace, then name.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        if self.same(other) {
            return std::cmp::Ordering::Equal;
        }
        (self.namespace(), self.name()).cmp(&(other.namespace(), other.name()))
    }
}

impl fmt::Debug for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ObjectRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("ObjectRef", 2)?;
        s.serialize_field("namespace", self.namespace())?;
        s.serialize_field("name", self.name())?;
        s.end()
    }
}

/// A name that recurs across objects — a port's name, an endpoint's node — interned by the
/// store: one allocation per name behind a pointer of a pointer's size (a thin `Arc`, its
/// length in the allocation), half what an `Arc<str>` takes in each of the many endpoints
/// and ports that name it.
#[derive(Clone)]
pub struct Word(triomphe::ThinArc<(), u8>);

impl Word {
    pub fn new(text: &str) -> Self {
        Self(triomphe::ThinArc::from_header_and_slice(
            (),
            text.as_bytes(),
        ))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: [`Self::new`], the only way to make one, copies a whole `str` into the
        // slice: its bytes are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0.slice) }
    }
}

impl From<&str> for Word {
    fn from(text: &str) -> Self {
        Self::new(text)
    }
}

impl Default for Word {
    fn default() -> Self {
        Self::new("")
    }
}

impl std::ops::Deref for Word {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Word {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Word {
    fn eq(&self, other: &Self) -> bool {
        self.0.ptr() == other.0.ptr() || self.as_str() == other.as_str()
    }
}

impl Eq for Word {}

impl std::hash::Hash for Word {
    /// As the text hashes, which [`std::borrow::Borrow`] requires.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Word {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Word {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Word {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A field of an object that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct ObjectError {
    pub kind: &'static str,
    pub object: ObjectRef,
    /// Its path in the object, e.g. `spec.ports[0].port`.
    pub field: String,
    pub reason: Invalid,
}

/// Why a field's value cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("missing")]
    Missing,
    #[error("empty")]
    Empty,
    #[error("{0} is not a port (1-65535)")]
    NotAPort(i32),
    #[error("{0:?} is not an IP address")]
    NotAnIp(String),
    #[error("{address:?} is not an {family} address (addressType {family})")]
    NotOfAddressType {
        address: String,
        family: &'static str,
    },
    #[error("unknown protocol {0:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol(String),
    #[error("unknown type {0:?}")]
    UnknownType(String),
    #[error("unknown value {value:?} (expected {expected})")]
    UnknownValue {
        value: String,
        expected: &'static str,
    },
    #[error("{0} is not within 1-{MAX_AFFINITY_TIMEOUT_S}")]
    TimeoutOutOfRange(i32),
    #[error("missing for type ExternalName")]
    NoExternalName,
    #[error("not set: a Service must carry the clusterIP the API server allocated")]
    NoClusterIp,
    #[error("{ip} is {what}, which the API server refuses for a Service address")]
    SpecialAddress { ip: IpAddr, what: &'static str },
    #[error(
        "{0:?} is not a port number (1-65535) or port name (IANA_SVC_NAME: 1-15 lowercase letters, digits and '-', a letter among them)"
    )]
    NotAPortOrName(String),
}

/// Why `ip` cannot be a Service address (clusterIP, external IP, load-balancer IP), as the
/// API server's validation refuses it: it would capture the node's own traffic (loopback,
/// the unspecified address) or traffic no socket addresses as a unicast peer.
fn special_address(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        match ip {
            IpAddr::V4(ip) if ip.is_broadcast() => Some("the broadcast address"),
            IpAddr::V4(ip) if ip.is_link_local() => Some("a link-local address"),
            IpAddr::V6(ip) if ip.is_unicast_link_local() => Some("a link-local address"),
            // The maps hold IPv4 addresses v4-mapped: a mapped one is the IPv4 address's
            // frontend under another name, which the API server refuses as well.
            IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => Some("a v4-mapped address"),
            _ => None,
        }
    }
}

/// A Service address that can be a frontend, or why not.
fn service_address(ip: &str) -> Result<IpAddr, Invalid> {
    let ip = ip
        .parse::<IpAddr>()
        .map_err(|_| Invalid::NotAnIp(ip.to_owned()))?;
    match special_address(ip) {
        Some(what) => Err(Invalid::SpecialAddress { ip, what }),
        None => Ok(ip),
    }
}

/// `targetPort` as the API server checks it: a port number, or the name of a container
/// port (IANA_SVC_NAME).
fn check_target_port(
    target: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
) -> Result<(), Invalid> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match target {
        IntOrString::Int(port) => port_number(*port).map(drop),
        IntOrString::String(name) => {
            let bytes = name.as_bytes();
            let valid = (1..=15).contains(&bytes.len())
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes.iter().any(u8::is_ascii_lowercase)
                && bytes.first() != Some(&b'-')
                && bytes.last() != Some(&b'-')
                && !name.contains("--");
            // A number written as a string ("8080") names no container port.
            if valid {
                Ok(())
            } else {
                Err(Invalid::NotAPortOrName(name.clone()))
            }
        }
    }
}

/// Transport protocol of a Service port, as the API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's `protocol` field; absent means TCP, as in the API.
    pub fn from_api(value: Option<&str>) -> Result<Self, Invalid> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(Invalid::UnknownProtocol(other.to_owned())),
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
    /// Virtual IPs (`spec.clusterIPs`, one per family) that the datapath translates; each
    /// family's are served by the slices of that address type.
    ClusterIp(SmallVec<[IpAddr; 2]>),
    /// `clusterIP: None`: DNS returns the pod IPs; there is nothing to translate.
    Headless,
    /// `type: ExternalName`: a DNS CNAME to this name; there is nothing to translate.
    ExternalName(String),
    /// Labelled `service.kubernetes.io/service-proxy-name` (its value): another proxy
    /// implements it, and lb leaves it alone.
    OtherProxy(Box<str>),
    /// Labelled `service.kubernetes.io/headless`: kube-proxy's selector leaves the Service
    /// out whatever its clusterIP, so lb does too. (The EndpointSlice controller keeps the
    /// label off the slices of a Service with a clusterIP: there it is on the Service alone,
    /// and leaving out its slices would not be enough.)
    HeadlessLabel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortModel {
    /// Empty for the unnamed port of a single-port Service, as in the API. Shared: a
    /// cluster has few port names, and the store keeps each once.
    pub name: Word,
    pub port: u16,
    pub protocol: Protocol,
    /// `nodePort` of a NodePort or LoadBalancer Service.
    pub node_port: Option<u16>,
}

/// `sessionAffinity: ClientIP` without `timeoutSeconds`: three hours, as in the API.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API's upper bound for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceModel {
    pub id: ObjectRef,
    pub kind: ServiceKind,
    pub ports: SmallVec<[ServicePortModel; 1]>,
    /// `spec.externalIPs`.
    pub external_ips: Box<[IpAddr]>,
    /// `status.loadBalancer.ingress[].ip` whose `ipMode` is `VIP` or unset. With
    /// `ipMode: Proxy` the load balancer delivers to the node, so the IP is not a VIP here.
    pub load_balancer_ips: Box<[IpAddr]>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub internal_traffic_local: bool,
    /// `metadata.creationTimestamp`, in seconds since the epoch (`i64::MAX` without one):
    /// among claims on one frontend that arrive together, the oldest Service keeps it.
    pub created_s: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Shared, as a Service port's name.
    pub name: Word,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared: a cluster has few nodes and many endpoints on each.
    pub node_name: Option<Word>,
    /// Its hints and hostname, which most endpoints lack: they then cost a pointer.
    pub extras: Option<Box<EndpointExtras>>,
}

impl EndpointModel {
    fn hints(&self) -> Option<&EndpointExtras> {
        self.extras.as_deref()
    }

    /// `hostname`, which DNS serves as `<hostname>.<service>.<namespace>.svc.<zone>`.
    pub fn hostname(&self) -> Option<&str> {
        self.extras.as_deref().and_then(|e| e.hostname.as_deref())
    }
}

/// What few endpoints have: topology hints — the zones and nodes whose clients it is for,
/// which the EndpointSlice controller sets for `trafficDistribution` — and a hostname.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointExtras {
    pub zones: SmallVec<[Arc<str>; 1]>,
    pub nodes: SmallVec<[Arc<str>; 1]>,
    pub hostname: Option<Box<str>>,
}

/// Which endpoints a frontend's clients on this node use, as kube-proxy's
/// `CategorizeEndpoints` decides from the hints (pkg/proxy/topology.go): a Service with
/// `trafficDistribution: PreferSameNode`, `PreferSameZone` or `PreferClose` gets them
/// from the EndpointSlice controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// Every usable endpoint.
    #[default]
    All,
    /// Every ready endpoint has node hints and one is for this node: those for it.
    PreferSameNode,
    /// Every ready endpoint has zone hints and one is for this node's zone: those for it.
    PreferSameZone,
}

impl Topology {
    /// The rule, as `lb explain` says it.
    pub fn describe(&self) -> String {
        match self {
            Self::All => "every endpoint (no topology hints apply)".into(),
            Self::PreferSameNode => {
                "PreferSameNode: every ready endpoint has node hints and one is for this node"
                    .into()
            }
            Self::PreferSameZone => {
                "PreferSameZone: every ready endpoint has zone hints and one is for this node's zone"
                    .into()
            }
        }
    }

    /// Whether `endpoint` is for this node (`node`, in `zone`) under this rule.
    fn admits(&self, endpoint: &EndpointModel, node: &str, zone: Option<&Arc<str>>) -> bool {
        let hints = endpoint.hints();
        match self {
            Self::All => true,
            Self::PreferSameNode => hints.is_some_and(|h| h.nodes.iter().any(|n| **n == *node)),
            Self::PreferSameZone => {
                hints.is_some_and(|h| zone.is_some_and(|zone| h.zones.contains(zone)))
            }
        }
    }

    /// The rule the hints of `endpoints` give a node named `node` in `zone`.
    fn of(
        endpoints: &[(BackendAddr, &EndpointModel)],
        node: &str,
        zone: Option<&Arc<str>>,
    ) -> Self {
        let (mut all_node, mut for_node, mut all_zone, mut for_zone) = (true, false, true, false);
        for (_, endpoint) in endpoints.iter().filter(|(_, e)| e.ready) {
            let hints = endpoint.hints();
            match hints.map(|h| &h.nodes).filter(|n| !n.is_empty()) {
                None => all_node = false,
                Some(nodes) => for_node |= nodes.iter().any(|n| **n == *node),
            }
            match hints.map(|h| &h.zones).filter(|z| !z.is_empty()) {
                None => all_zone = false,
                Some(zones) => for_zone |= zone.is_some_and(|zone| zones.contains(zone)),
            }
        }
        match zone {
            _ if all_node && for_node => Self::PreferSameNode,
            Some(_) if all_zone && for_zone => Self::PreferSameZone,
            _ => Self::All,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceModel {
    pub id: ObjectRef,
    /// The Service named by [`SERVICE_NAME_LABEL`]; `None` for a slice that belongs to none.
    pub service: Option<ObjectRef>,
    /// IPv4 slices serve a Service's IPv4 frontends, IPv6 ones its IPv6 frontends; the
    /// others (FQDN) are kept, unused.
    pub address_type: AddressType,
    pub ports: SmallVec<[SlicePort; 1]>,
    pub endpoints: SmallVec<[EndpointModel; 3]>,
}

/// An EndpointSlice's `addressType`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressType {
    Ipv4,
    Ipv6,
    Fqdn,
    /// Not one the API defines, kept as written.
    Other(Box<str>),
}

impl AddressType {
    fn from_api(value: &str) -> Self {
        match value {
            "IPv4" => Self::Ipv4,
            "IPv6" => Self::Ipv6,
            "FQDN" => Self::Fqdn,
            other => Self::Other(other.into()),
        }
    }

    /// The address type of `ip`'s family.
    pub const fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
            Self::Fqdn => "FQDN",
            Self::Other(other) => other,
        }
    }
}

/// The kinds the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Service or EndpointSlice converted into the model: what sources deliver to the store,
/// converted where they read it (on their own threads), so that no API object is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectModel {
    Service(ServiceModel),
    Slice(SliceModel),
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
}

/// Where an object's identity comes from: `metadata.namespace` (default `default`, as kubectl
/// applies it) and `metadata.name`.
pub fn object_ref(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectRef> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    Some(ObjectRef::new(namespace_of(meta), name))
}

fn port_number(value: i32) -> Result<u16, Invalid> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(Invalid::NotAPort(value))
}

impl ServiceModel {
    pub fn from_api(service: &Service) -> Result<Self, ObjectError> {
        let id = object_ref(&service.metadata).ok_or_else(|| ObjectError {
            kind: "Service",
            object: ObjectRef::new(namespace_of(&service.metadata), "<unnamed>"),
            field: "metadata.name".into(),
            reason: Invalid::Missing,
        })?;
        let error = |field: String, reason: Invalid| ObjectError {
            kind: "Service",
            object: id.clone(),
            field,
            reason,
        };
        let spec = service
            .spec
            .as_ref()
            .ok_or_else(|| error("spec".into(), Invalid::Missing))?;

        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !matches!(
            service_type,
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        ) {
            return Err(error(
                "spec.type".into(),
                Invalid::UnknownType(service_type.to_owned()),
            ));
        }
        let mut ports = SmallVec::new();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            let node_port = match (service_type, port.node_port) {
                ("NodePort" | "LoadBalancer", Some(node_port)) => Some(
                    port_number(node_port)
                        .map_err(|r| error(format!("spec.ports[{i}].nodePort"), r))?,
                ),
                _ => None,
            };
            if let Some(target) = &port.target_port {
                check_target_port(target)
                    .map_err(|r| error(format!("spec.ports[{i}].targetPort"), r))?;
            }
            ports.push(ServicePortModel {
                name: port.name.as_deref().unwrap_or_default().into(),
                port: port_number(port.port)
                    .map_err(|r| error(format!("spec.ports[{i}].port"), r))?,
                protocol: Protocol::from_api(port.protocol.as_deref())
                    .map_err(|r| error(format!("spec.ports[{i}].protocol"), r))?,
                node_port,
            });
        }

        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            external_ips
                .push(service_address(ip).map_err(|r| error(format!("spec.externalIPs[{i}]"), r))?);
        }
        let mut load_balancer_ips = Vec::new();
        if service_type == "LoadBalancer" {
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            for (i, ingress) in ingress.into_iter().flatten().enumerate() {
                if ingress.ip_mode.as_deref().is_some_and(|mode| mode != "VIP") {
                    continue;
                }
                let Some(ip) = ingress.ip.as_deref() else {
                    continue;
                };
                load_balancer_ips.push(
                    service_address(ip)
                        .map_err(|r| error(format!("status.loadBalancer.ingress[{i}].ip"), r))?,
                );
            }
        }

        let affinity_timeout_s = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds);
                Some(match timeout {
                    None => DEFAULT_AFFINITY_TIMEOUT_S,
                    Some(t) => u32::try_from(t)
                        .ok()
                        .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                        .ok_or_else(|| {
                            error(
                                "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                                Invalid::TimeoutOutOfRange(t),
                            )
                        })?,
                })
            }
            Some(other) => {
                return Err(error(
                    "spec.sessionAffinity".into(),
                    Invalid::UnknownValue {
                        value: other.to_owned(),
                        expected: "None or ClientIP",
                    },
                ));
            }
        };
        let internal_traffic_local = match spec.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => false,
            Some("Local") => true,
            Some(other) => {
                return Err(error(
                    "spec.internalTrafficPolicy".into(),
                    Invalid::UnknownValue {
                        value: other.to_owned(),
                        expected: "Cluster or Local",
                    },
                ));
            }
        };

        let other_proxy = service
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(crate::source::api::SERVICE_PROXY_NAME_LABEL));
        let headless_label = service
            .metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(crate::source::api::HEADLESS_LABEL));
        let kind = if let Some(name) = other_proxy {
            ServiceKind::OtherProxy(name.as_str().into())
        } else if headless_label {
            ServiceKind::HeadlessLabel
        } else if service_type == "ExternalName" {
            let name = spec
                .external_name
                .clone()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| error("spec.externalName".into(), Invalid::NoExternalName))?;
            ServiceKind::ExternalName(name)
        } else {
            Self::cluster_ips(spec.cluster_ip.as_deref(), spec.cluster_ips.as_deref())
                .map_err(|(field, reason)| error(field, reason))?
        };
        Ok(Self {
            id,
            kind,
            ports,
            // Boxed: most Services have none, and a box is a pointer smaller than a Vec.
            external_ips: external_ips.into_boxed_slice(),
            load_balancer_ips: load_balancer_ips.into_boxed_slice(),
            affinity_timeout_s,
            internal_traffic_local,
            created_s: service
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(i64::MAX, |time| time.0.as_second()),
        })
    }

    fn cluster_ips(
        cluster_ip: Option<&str>,
        cluster_ips: Option<&[String]>,
    ) -> Result<ServiceKind, (String, Invalid)> {
        // `clusterIPs` is authoritative when present; `clusterIP` is its first element.
        let (field, ips): (&str, Vec<&str>) = match cluster_ips {
            Some(ips) if !ips.is_empty() => {
                ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
            }
            _ => ("spec.clusterIP", cluster_ip.into_iter().collect()),
        };
        match ips.as_slice() {
            [] | [""] => Err((field.to_owned(), Invalid::NoClusterIp)),
            ["None", ..] => Ok(ServiceKind::Headless),
            _ => {
                let mut vips = SmallVec::new();
                for (i, ip) in ips.iter().enumerate() {
                    match service_address(ip) {
                        Ok(ip) => vips.push(ip),
                        Err(reason) => {
                            let field = if field == "spec.clusterIPs" {
                                format!("{field}[{i}]")
                            } else {
                                field.to_owned()
                            };
                            return Err((field, reason));
                        }
                    }
                }
                Ok(ServiceKind::ClusterIp(vips))
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
            reason: Invalid::Missing,
        })?;
        let error = |field: String, reason: Invalid| ObjectError {
            kind: "EndpointSlice",
            object: id.clone(),
            field,
            reason,
        };
        let labels = slice.metadata.labels.as_ref();
        // A slice marked headless, or as another proxy's (the EndpointSlice controller
        // copies the Service's labels), is none of the proxy's business: kube-proxy's
        // selector leaves both out, also while the Service's own label is already gone.
        let left_out = labels.is_some_and(|l| {
            l.contains_key(crate::source::api::HEADLESS_LABEL)
                || l.contains_key(crate::source::api::SERVICE_PROXY_NAME_LABEL)
        });
        let service = labels
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
            .filter(|name| !name.is_empty() && !left_out)
            .map(|name| ObjectRef::new(id.namespace(), name));
        let address_type = AddressType::from_api(&slice.address_type);

        let mut ports = SmallVec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            // A port without a number means "all ports" and only exists for selector-less
            // Services with no ports; it gives nothing to translate to.
            let Some(number) = port.port else { continue };
            ports.push(SlicePort {
                name: port.name.as_deref().unwrap_or_default().into(),
                port: port_number(number).map_err(|r| error(format!("ports[{i}].port"), r))?,
                protocol: Protocol::from_api(port.protocol.as_deref())
                    .map_err(|r| error(format!("ports[{i}].protocol"), r))?,
            });
        }

        let mut endpoints = SmallVec::new();
        if matches!(address_type, AddressType::Ipv4 | AddressType::Ipv6) {
            for (i, endpoint) in slice.endpoints.iter().enumerate() {
                // Addresses of one endpoint are fungible; kube-proxy uses the first.
                let Some(address) = endpoint.addresses.first() else {
                    return Err(error(format!("endpoints[{i}].addresses"), Invalid::Empty));
                };
                let address = address
                    .parse::<IpAddr>()
                    .ok()
                    // A v4-mapped address in an IPv6 slice would be an IPv4 backend.
                    .filter(|ip| {
                        AddressType::of(ip) == address_type
                            && !matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
                    })
                    .ok_or_else(|| {
                        error(
                            format!("endpoints[{i}].addresses[0]"),
                            Invalid::NotOfAddressType {
                                address: address.clone(),
                                family: if address_type == AddressType::Ipv4 {
                                    "IPv4"
                                } else {
                                    "IPv6"
                                },
                            },
                        )
                    })?;
                // As kube-proxy reads them: ready and serving unset mean true, terminating
                // unset means false.
                let conditions = endpoint.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let hostname = endpoint
                    .hostname
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .map(Box::from);
                let hints = endpoint.hints.as_ref();
                let zones: SmallVec<[Arc<str>; 1]> = hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| Arc::from(z.name.as_str()))
                    .collect();
                let nodes: SmallVec<[Arc<str>; 1]> = hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| Arc::from(n.name.as_str()))
                    .collect();
                let extras =
                    (!zones.is_empty() || !nodes.is_empty() || hostname.is_some()).then(|| {
                        Box::new(EndpointExtras {
                            zones,
                            nodes,
                            hostname,
                        })
                    });
                endpoints.push(EndpointModel {
                    address,
                    ready,
                    serving,
                    terminating,
                    node_name: endpoint
                        .node_name
                        .as_deref()
                        .filter(|n| !n.is_empty())
                        .map(Word::new),
                    extras,
                });
            }
        }
        Ok(Self {
            id,
            service,
            address_type,
            ports,
            endpoints,
        })
    }
}

/// A Service frontend: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Frontend {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.address, self.port),
            self.protocol
        )
    }
}

/// A backend: a pod address and the port the Service port resolves to there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendAddr {
    pub address: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.address, self.port))
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Which part of a Service a frontend is. The order is the precedence when two Services
/// claim one frontend: a clusterIP, which the API server allocated, always wins over an
/// address a Service merely names, so `externalIPs` cannot take over another Service's
/// clusterIP (CVE-2020-8554).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

/// What one frontend should translate to, and which Service port it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendTarget {
    pub service: ObjectRef,
    pub port_name: Word,
    /// The Service port's protocol (that of the frontend).
    pub protocol: Protocol,
    pub kind: FrontendKind,
    pub spec: FrontendSpec,
    /// Which endpoints the topology hints left for this node.
    pub topology: Topology,
    /// The slices that serve the Service port, shared with the store: what its endpoints
    /// are, used or not, and why one is not a backend, is worked out from them when asked
    /// ([`Self::endpoint_states`]) rather than kept per frontend.
    pub slices: SmallVec<[Arc<SliceModel>; 1]>,
}

impl FrontendTarget {
    /// Every endpoint as the agent judged it for this frontend on node `node`: a backend,
    /// or why not.
    pub fn endpoint_states(&self, node: &str) -> Vec<EndpointState> {
        let local_only = self.spec.flags & lb_common::FLAG_NODE_LOCAL != 0;
        port_endpoints(
            &self.port_name,
            self.protocol,
            self.slices.iter().map(|s| &**s),
        )
        .into_iter()
        .map(|(backend, e)| EndpointState {
            address: backend.address,
            port: backend.port,
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
            node_name: e.node_name.as_deref().map(str::to_owned),
            excluded: if self.spec.backends.contains(&backend) {
                None
            } else if local_only && e.node_name.as_deref() != Some(node) {
                Some(format!(
                    "on node {}, not {node} (internalTrafficPolicy: Local)",
                    e.node_name.as_deref().unwrap_or("<unset>"),
                ))
            } else if e.ready && self.topology != Topology::All {
                // Ready, not a backend, not left out by the traffic policy: the hints are
                // for other nodes or zones.
                Some(format!(
                    "not for this node under {}",
                    self.topology.describe()
                ))
            } else if e.serving && e.terminating {
                Some("terminating: used only while no endpoint is ready".into())
            } else {
                Some("not ready".into())
            },
        })
        .collect()
    }
}

/// One endpoint of a frontend as the agent judged it; `excluded` says why it is not a
/// backend, `None` when it is one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    pub address: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub excluded: Option<String>,
}

/// A frontend's backends, sorted and each once. Services have a few backends as a rule:
/// up to four are kept inline, without an allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backends(SmallVec<[BackendAddr; 4]>);

impl Backends {
    pub fn contains(&self, backend: &BackendAddr) -> bool {
        self.0.binary_search(backend).is_ok()
    }
}

impl std::ops::Deref for Backends {
    type Target = [BackendAddr];

    fn deref(&self) -> &[BackendAddr] {
        &self.0
    }
}

impl FromIterator<BackendAddr> for Backends {
    fn from_iter<I: IntoIterator<Item = BackendAddr>>(backends: I) -> Self {
        let mut backends: SmallVec<[BackendAddr; 4]> = backends.into_iter().collect();
        backends.sort_unstable();
        backends.dedup();
        Self(backends)
    }
}

impl<'a> IntoIterator for &'a Backends {
    type Item = &'a BackendAddr;
    type IntoIter = std::slice::Iter<'a, BackendAddr>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// What the maps hold for a frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    pub backends: Backends,
    /// `lb_common::FLAG_*`.
    pub flags: u16,
    /// Session affinity timeout; 0 for none.
    pub affinity_timeout_s: u32,
}

/// Why a Service is known but has no frontend in the datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum NotInDatapath {
    /// DNS answers with the pod IPs directly.
    Headless,
    /// DNS answers with a CNAME to `name`.
    ExternalName { name: String },
    /// Another proxy implements it (`service.kubernetes.io/service-proxy-name`).
    OtherProxy { name: String },
    /// Labelled `service.kubernetes.io/headless`, which kube-proxy leaves alone.
    HeadlessLabel,
}

impl fmt::Display for NotInDatapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Headless => f.write_str("headless: DNS answers with the pod IPs"),
            Self::OtherProxy { name } => write!(
                f,
                "service.kubernetes.io/service-proxy-name: {name:?} implements it, not lb"
            ),
            Self::ExternalName { name } => {
                write!(f, "ExternalName: DNS answers with a CNAME to {name}")
            }
            Self::HeadlessLabel => f.write_str(
                "service.kubernetes.io/headless: labelled headless, which kube-proxy leaves alone",
            ),
        }
    }
}

/// A frontend claimed by more than one Service: the first to claim it keeps it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Service {ignored} claims {frontend} which Service {kept} already has; ignored")]
pub struct Conflict {
    pub frontend: Frontend,
    pub kept: ObjectRef,
    pub ignored: ObjectRef,
}

/// What the agent knows of the node it programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Its name, for `internalTrafficPolicy: Local` (endpoints' `nodeName`).
    pub name: String,
    /// Its addresses, each a NodePort frontend of the Services of its family.
    pub ips: Vec<IpAddr>,
    /// Its `topology.kubernetes.io/zone`, for endpoints' zone hints.
    pub zone: Option<Arc<str>>,
}

/// Who claims a frontend, in precedence order: the stronger kind (see [`FrontendKind`]),
/// then the earlier arrival (a live Service is never taken over by a later claim), then
/// among claims that arrived together the oldest Service (`creationTimestamp`, one without
/// last), then the first by namespace/name, then the Service's first claim.
type Claim = (FrontendKind, Arrival, i64, ObjectRef, u16);

/// When a claim arrived: the number of the [`Desired::update`] that first made it, kept
/// while the Service goes on claiming the frontend; 0 for the claim of the Service the
/// frontend served before the agent started ([`Desired::prefer_incumbents`]).
type Arrival = u32;

/// The claims on one frontend with their targets, in precedence order.
type Claims = SmallVec<[(Claim, Arc<FrontendTarget>); 1]>;

/// The state the datapath should have, kept per Service so that a change recomputes only
/// the Services it touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Every claim on every frontend, in precedence order; the first one is in effect.
    /// Almost every frontend has one claim: it is kept inline.
    claims: BTreeMap<Frontend, Claims>,
    /// The frontends each Service claims, to withdraw them when it changes.
    claimed_by: Map<ObjectRef, SmallVec<[Frontend; 1]>>,
    /// Frontends claimed by more than one Service, kept as claims change so that finding
    /// conflicts costs what there are, not a walk over every claim.
    contested: BTreeSet<Frontend>,
    pub not_in_datapath: BTreeMap<ObjectRef, NotInDatapath>,
    /// The number of the next [`Desired::update`]: the arrival of the claims it makes.
    next_arrival: Arrival,
}

impl Desired {
    /// Recomputes the Services in `changed`, each with its current model and slices (`None`
    /// when it is gone), and returns the frontends whose target may have changed.
    pub fn update<'a>(
        &mut self,
        changed: impl IntoIterator<
            Item = (
                &'a ObjectRef,
                Option<(&'a ServiceModel, Vec<&'a Arc<SliceModel>>)>,
            ),
        >,
        node: &Node,
    ) -> BTreeSet<Frontend> {
        let changed: Vec<_> = changed.into_iter().collect();
        let computed = claims_of_each(&changed, node);
        let mut touched = BTreeSet::new();
        // Claims made by this update share its number: they arrived together.
        self.next_arrival = self.next_arrival.max(1);
        let arrival = self.next_arrival;
        // Saturating: after 4 billion updates new claims arrive together, still after
        // every earlier one.
        self.next_arrival = self.next_arrival.saturating_add(1);
        for ((id, model), computed) in changed.into_iter().zip(computed) {
            // The arrivals of the frontends it goes on claiming stay as they were.
            let mut held: SmallVec<[(Frontend, Arrival); 1]> = SmallVec::new();
            for frontend in self.claimed_by.remove(id).unwrap_or_default() {
                if let Some(claims) = self.claims.get_mut(&frontend) {
                    if let Some(((_, at, ..), _)) = claims
                        .iter()
                        .find(|((_, _, _, service, _), _)| service == id)
                    {
                        held.push((frontend, *at));
                    }
                    claims.retain(|((_, _, _, service, _), _)| service != id);
                    if claims.is_empty() {
                        self.claims.remove(&frontend);
                    }
                }
                touched.insert(frontend);
            }
            let created = model
                .as_ref()
                .map_or(i64::MAX, |(service, _)| service.created_s);
            self.not_in_datapath.remove(id);
            let Some(computed) = computed else {
                continue;
            };
            match computed {
                Ok(claims) => {
                    let mut frontends = SmallVec::with_capacity(claims.len());
                    for (seq, (frontend, target)) in claims.into_iter().enumerate() {
                        let at = held
                            .iter()
                            .find(|(held, _)| *held == frontend)
                            .map_or(arrival, |(_, at)| *at);
                        let claim = (
                            target.kind,
                            at,
                            created,
                            id.clone(),
                            u16::try_from(seq).unwrap_or(u16::MAX),
                        );
                        let claims = self.claims.entry(frontend).or_default();
                        let at = claims.partition_point(|(other, _)| *other < claim);
                        claims.insert(at, (claim, Arc::new(target)));
                        frontends.push(frontend);
                        touched.insert(frontend);
                    }
                    self.claimed_by.insert(id.clone(), frontends);
                }
                Err(why) => {
                    self.not_in_datapath.insert(id.clone(), why);
                }
            }
        }
        crate::memory::compact_after(&mut self.claims, touched.len());
        for frontend in &touched {
            let contested = self.claims.get(frontend).is_some_and(|claims| {
                let mut services = claims.iter().map(|((_, _, _, service, _), _)| service);
                services
                    .next()
                    .is_some_and(|first| services.any(|other| other != first))
            });
            if contested {
                self.contested.insert(*frontend);
            } else {
                self.contested.remove(frontend);
            }
        }
        touched
    }

    /// Whether any frontend is claimed by more than one Service.
    pub fn is_contested(&self) -> bool {
        !self.contested.is_empty()
    }

    /// After a restart, every claim arrives at once: on each contested frontend, the claim
    /// of the Service that `served` it before (its last state file says) counts as the
    /// earliest, so that a restart does not hand it to a later claimant that sorts first.
    /// Returns the frontends whose claims were reordered.
    pub fn prefer_incumbents(
        &mut self,
        served: impl Fn(&Frontend) -> Option<ObjectRef>,
    ) -> BTreeSet<Frontend> {
        let mut reordered = BTreeSet::new();
        for frontend in &self.contested {
            let (Some(incumbent), Some(claims)) = (served(frontend), self.claims.get_mut(frontend))
            else {
                continue;
            };
            for ((_, at, _, service, _), _) in claims.iter_mut() {
                if *service == incumbent && *at != 0 {
                    *at = 0;
                    reordered.insert(*frontend);
                }
            }
            claims.sort_by(|(a, _), (b, _)| a.cmp(b));
        }
        reordered
    }

    /// The frontends `service` claims, whether its claims are in effect or not.
    pub fn frontends_of(&self, service: &ObjectRef) -> impl Iterator<Item = Frontend> + '_ {
        self.claimed_by.get(service).into_iter().flatten().copied()
    }

    /// The target in effect for `frontend`.
    pub fn target(&self, frontend: &Frontend) -> Option<&Arc<FrontendTarget>> {
        self.claims.get(frontend)?.first().map(|(_, target)| target)
    }

    /// Every frontend with the target in effect, in order.
    pub fn frontends(&self) -> impl Iterator<Item = (&Frontend, &Arc<FrontendTarget>)> {
        self.claims
            .iter()
            .filter_map(|(frontend, claims)| Some((frontend, &claims.first()?.1)))
    }

    /// Frontends claimed by more than one Service: who keeps each, and who is ignored.
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.contested
            .iter()
            .filter_map(|frontend| Some((frontend, self.claims.get(frontend)?)))
            .flat_map(|(frontend, claims)| {
                let mut services = claims.iter().map(|((_, _, _, service, _), _)| service);
                let kept = services.next();
                services
                    .filter(move |service| Some(*service) != kept)
                    .filter_map(move |ignored| {
                        Some(Conflict {
                            frontend: *frontend,
                            kept: kept?.clone(),
                            ignored: ignored.clone(),
                        })
                    })
            })
            .collect()
    }
}

/// Below this many Services, [`claims_of_each`] computes them on one thread: more would
/// cost more than they save.
const PARALLEL_CLAIMS_MIN: usize = 4096;

/// What [`claims_of`] gives for each of the `changed` Services (`None` for one that is
/// gone), in their order; on every core when they are many (a full sync), since each
/// Service's claims depend on nothing but its own objects.
#[expect(
    clippy::type_complexity,
    reason = "the Services as Desired::update receives them, and what each claims"
)]
fn claims_of_each(
    changed: &[(&ObjectRef, Option<(&ServiceModel, Vec<&Arc<SliceModel>>)>)],
    node: &Node,
) -> Vec<Option<Result<Vec<(Frontend, FrontendTarget)>, NotInDatapath>>> {
    let compute = |part: &[(&ObjectRef, Option<(&ServiceModel, Vec<&Arc<SliceModel>>)>)]| {
        part.iter()
            .map(|(_, current)| {
                current
                    .as_ref()
                    .map(|(service, slices)| claims_of(service, slices, node))
            })
            .collect::<Vec<_>>()
    };
    let threads = if changed.len() < PARALLEL_CLAIMS_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    };
    if threads < 2 {
        return compute(changed);
    }
    let compute = &compute;
    std::thread::scope(|scope| {
        let parts: Vec<_> = changed
            .chunks(changed.len().div_ceil(threads))
            .map(|part| scope.spawn(move || compute(part)))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| {
                part.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The port that slice `slice` gives for the Service port `name`/`protocol`, if it serves
/// it: an IP slice's port of the same name and protocol (the EndpointSlice controller has
/// resolved `targetPort` into it, named ports too).
fn target_port(slice: &SliceModel, name: &str, protocol: Protocol) -> Option<u16> {
    if !matches!(slice.address_type, AddressType::Ipv4 | AddressType::Ipv6) {
        return None;
    }
    slice
        .ports
        .iter()
        .find(|p| *p.name == *name && p.protocol == protocol)
        .map(|p| p.port)
}

/// Every endpoint of the Service port `name`/`protocol` in `slices`, with the backend it
/// would be, sorted by backend and each once: a duplicate across slices counts as ready if
/// any copy is.
fn port_endpoints<'s>(
    name: &str,
    protocol: Protocol,
    slices: impl IntoIterator<Item = &'s SliceModel>,
) -> Vec<(BackendAddr, &'s EndpointModel)> {
    let mut endpoints = Vec::new();
    for slice in slices {
        let Some(port) = target_port(slice, name, protocol) else {
            continue;
        };
        endpoints.extend(slice.endpoints.iter().map(|endpoint| {
            let backend = BackendAddr {
                address: endpoint.address,
                port,
            };
            (backend, endpoint)
        }));
    }
    // By address, each once: the first ready copy, else the first copy (the sort is
    // stable).
    endpoints.sort_by_key(|(backend, endpoint)| (*backend, !endpoint.ready));
    endpoints.dedup_by_key(|(backend, _)| *backend);
    endpoints
}

/// The endpoints kube-proxy would use: the ready ones `topology` admits; if none is,
/// the ones that are serving and terminating (so a rolling update's last pods keep
/// answering), whatever the topology.
fn usable(
    endpoints: &[(BackendAddr, &EndpointModel)],
    topology: &Topology,
    node: &Node,
) -> Backends {
    // `endpoints` are sorted and unique: so are the picks.
    let pick = |wanted: fn(&EndpointModel) -> bool| {
        Backends(
            endpoints
                .iter()
                .filter(|(_, e)| wanted(e))
                .map(|(addr, _)| *addr)
                .collect(),
        )
    };
    let ready = Backends(
        endpoints
            .iter()
            .filter(|(_, e)| e.ready && topology.admits(e, &node.name, node.zone.as_ref()))
            .map(|(addr, _)| *addr)
            .collect(),
    );
    if ready.is_empty() {
        pick(|e| e.serving && e.terminating)
    } else {
        ready
    }
}

/// Computes the desired datapath state from validated Services and EndpointSlices, all at
/// once.
#[cfg(test)]
pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a ServiceModel>,
    slices: impl IntoIterator<Item = &'a SliceModel>,
    node: &Node,
) -> Desired {
    let slices: Vec<Arc<SliceModel>> = slices.into_iter().cloned().map(Arc::new).collect();
    let mut slices_by_service: BTreeMap<&ObjectRef, Vec<&Arc<SliceModel>>> = BTreeMap::new();
    for slice in &slices {
        if let Some(service) = &slice.service {
            slices_by_service.entry(service).or_default().push(slice);
        }
    }
    let mut out = Desired::default();
    out.update(
        services.into_iter().map(|service| {
            let slices = slices_by_service.remove(&service.id).unwrap_or_default();
            (&service.id, Some((service, slices)))
        }),
        node,
    );
    out
}

/// Services and slices from YAML, as the agent reads them; tests' shorthand.
#[cfg(test)]
pub(crate) fn load(yaml: &str) -> (Vec<ServiceModel>, Vec<SliceModel>) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for document in crate::source::parse::parse(std::path::Path::new("t.yaml"), yaml).unwrap() {
        match document.object.unwrap() {
            ObjectModel::Service(s) => services.push(s),
            ObjectModel::Slice(s) => slices.push(s),
        }
    }
    (services, slices)
}

/// The frontends one Service claims, each with its target, or why it has none.
///
/// A Service port is served by the EndpointSlice ports of the same name and protocol (the
/// EndpointSlice controller has already resolved `targetPort` into them, named ports too).
/// Endpoints repeated across slices count once; slices of another address type are ignored.
/// Each port gets a frontend per clusterIP, per external IP, per load-balancer IP, and for a
/// nodePort per node IP and on 127.0.0.1 (the latter for the node's own sockets only).
fn claims_of(
    service: &ServiceModel,
    slices: &[&Arc<SliceModel>],
    node: &Node,
) -> Result<Vec<(Frontend, FrontendTarget)>, NotInDatapath> {
    let cluster_ips = match &service.kind {
        ServiceKind::ClusterIp(ips) => ips,
        ServiceKind::OtherProxy(name) => {
            return Err(NotInDatapath::OtherProxy {
                name: name.to_string(),
            });
        }
        ServiceKind::Headless => return Err(NotInDatapath::Headless),
        ServiceKind::HeadlessLabel => return Err(NotInDatapath::HeadlessLabel),
        ServiceKind::ExternalName(name) => {
            return Err(NotInDatapath::ExternalName { name: name.clone() });
        }
    };
    let affinity_timeout_s = service.affinity_timeout_s.unwrap_or(0);
    let mut out = Vec::new();
    // A family is served when the Service has a clusterIP of it, with the slices of its
    // address type, as kube-proxy's proxier of each family does; an external or
    // load-balancer IP of a family the Service has no clusterIP of is left alone there too.
    let mut families: SmallVec<[AddressType; 2]> = SmallVec::new();
    for ip in cluster_ips {
        if !families.contains(&AddressType::of(ip)) {
            families.push(AddressType::of(ip));
        }
    }
    for (family, port) in families
        .iter()
        .flat_map(|family| service.ports.iter().map(move |port| (family, port)))
    {
        let of_family = |ip: &&IpAddr| AddressType::of(ip) == *family;
        let serving: SmallVec<[Arc<SliceModel>; 1]> = slices
            .iter()
            .filter(|slice| {
                slice.address_type == *family
                    && target_port(slice, &port.name, port.protocol).is_some()
            })
            .map(|slice| Arc::clone(slice))
            .collect();
        let endpoints = port_endpoints(&port.name, port.protocol, serving.iter().map(|s| &**s));
        let topology = Topology::of(&endpoints, &node.name, node.zone.as_ref());
        let cluster_wide = usable(&endpoints, &topology, node);
        let on_this_node = |e: &EndpointModel| e.node_name.as_deref() == Some(node.name.as_str());
        let local: Vec<(BackendAddr, &EndpointModel)> = endpoints
            .iter()
            .filter(|(_, e)| on_this_node(e))
            .copied()
            .collect();
        let node_local = usable(&local, &Topology::All, node);
        let target = |kind, backends: &Backends, flags: u16| FrontendTarget {
            service: service.id.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol,
            kind,
            spec: FrontendSpec {
                backends: backends.clone(),
                flags,
                affinity_timeout_s,
            },
            // internalTrafficPolicy: Local takes this node's endpoints, hints or not.
            topology: if flags & lb_common::FLAG_NODE_LOCAL != 0 {
                Topology::All
            } else {
                topology
            },
            slices: serving.clone(),
        };
        let frontend = |address, port_number| Frontend {
            address,
            port: port_number,
            protocol: port.protocol,
        };
        // internalTrafficPolicy governs the clusterIP; the other frontends are for
        // traffic from outside, which on-node clients reach cluster-wide, as with
        // kube-proxy.
        let (internal, internal_flags) = if service.internal_traffic_local {
            (
                &node_local,
                lb_common::FLAG_NODE_LOCAL | lb_common::FLAG_CLUSTER_IP,
            )
        } else {
            (&cluster_wide, lb_common::FLAG_CLUSTER_IP)
        };
        for ip in cluster_ips.iter().filter(of_family) {
            out.push((
                frontend(*ip, port.port),
                target(FrontendKind::ClusterIP, internal, internal_flags),
            ));
        }
        for ip in service.external_ips.iter().filter(of_family) {
            out.push((
                frontend(*ip, port.port),
                target(FrontendKind::ExternalIP, &cluster_wide, 0),
            ));
        }
        for ip in service.load_balancer_ips.iter().filter(of_family) {
            out.push((
                frontend(*ip, port.port),
                target(FrontendKind::LoadBalancer, &cluster_wide, 0),
            ));
        }
        if let Some(node_port) = port.node_port {
            for ip in node.ips.iter().filter(of_family) {
                out.push((
                    frontend(*ip, node_port),
                    target(FrontendKind::NodePort, &cluster_wide, 0),
                ));
            }
            let loopback = if *family == AddressType::Ipv4 {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            };
            out.push((
                frontend(loopback, node_port),
                target(
                    FrontendKind::NodePort,
                    &cluster_wide,
                    lb_common::FLAG_HOST_NETNS_ONLY,
                ),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::parse::{self, ManifestError};

    fn node() -> Node {
        Node {
            name: "node-1".into(),
            ips: vec![IpAddr::from([192, 168, 1, 10])],
            zone: Some("zone-a".into()),
        }
    }

    fn desired_of(yaml: &str) -> Desired {
        let (services, slices) = load(yaml);
        desired(&services, &slices, &node())
    }

    fn fe(address: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            address: IpAddr::from(address),
            port,
            protocol,
        }
    }

    fn backends(desired: &Desired, frontend: &Frontend) -> Vec<String> {
        desired
            .target(frontend)
            .unwrap()
            .spec
            .backends
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.244.0.1]
- addresses: [10.244.0.2]
  conditions: {ready: false}
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.244.0.1]
- addresses: [10.244.0.3]
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints:
- addresses: ["fd00::1"]
ports:
- {name: http, port: 8080}
"#;

    const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: "fd00:96::10"
  clusterIPs: ["fd00:96::10", 10.96.0.10]
  externalIPs: [203.0.113.7, "2001:db8::7"]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.1]}]
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ["fd00:244::1"]}, {addresses: ["fd00:244::2"]}]
ports: [{name: http, port: 8080}]
"#;

    #[test]
    fn a_dual_stack_service_has_a_frontend_per_family_with_that_familys_slices() {
        let (services, slices) = load(DUAL_STACK);
        let node = Node {
            ips: vec![
                IpAddr::from([192, 168, 1, 10]),
                "fd00:1::10".parse().unwrap(),
            ],
            ..node()
        };
        let dual = desired(&services, &slices, &node);
        let at = |address: &str, port: u16| Frontend {
            address: address.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        };
        let v4 = vec!["10.244.0.1:8080".to_owned()];
        let v6 = vec![
            "[fd00:244::1]:8080".to_owned(),
            "[fd00:244::2]:8080".to_owned(),
        ];
        for (frontend, expected) in [
            (at("10.96.0.10", 80), &v4),
            (at("203.0.113.7", 80), &v4),
            (at("192.168.1.10", 30080), &v4),
            (at("127.0.0.1", 30080), &v4),
            (at("fd00:96::10", 80), &v6),
            (at("2001:db8::7", 80), &v6),
            (at("fd00:1::10", 30080), &v6),
            (at("::1", 30080), &v6),
        ] {
            assert_eq!(&backends(&dual, &frontend), expected, "{frontend}");
        }
        assert_eq!(dual.frontends().count(), 8);
        let loopback6 = dual.target(&at("::1", 30080)).unwrap();
        assert_eq!(loopback6.spec.flags, lb_common::FLAG_HOST_NETNS_ONLY);
        assert_eq!(at("fd00:96::10", 80).to_string(), "[fd00:96::10]:80/TCP");

        // Single-stack IPv4: the IPv6 external IP, node IP and slice serve nothing.
        let single = DUAL_STACK
            .replace(
                "clusterIPs: [\"fd00:96::10\", 10.96.0.10]",
                "clusterIPs: [10.96.0.10]",
            )
            .replace("clusterIP: \"fd00:96::10\"", "clusterIP: 10.96.0.10");
        let (services, slices) = load(&single);
        let single = desired(&services, &slices, &node);
        assert_eq!(single.frontends().count(), 4);
        assert!(
            single
                .frontends()
                .all(|(frontend, _)| frontend.address.is_ipv4())
        );
    }

    #[test]
    fn an_endpoint_of_another_family_than_its_slice_is_named() {
        let slice = |address_type: &str, address: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s}}\naddressType: {address_type}\nendpoints: [{{addresses: [\"{address}\"]}}]\n"
            )
        };
        let error = |yaml: String| {
            let document = parse::parse(Path::new("t.yaml"), &yaml).unwrap().remove(0);
            document.object.err().map(|e| e.to_string())
        };
        assert!(error(slice("IPv4", "10.244.0.1")).is_none());
        assert!(error(slice("IPv6", "fd00::1")).is_none());
        for (address_type, address) in [
            ("IPv4", "fd00::1"),
            ("IPv6", "10.244.0.1"),
            ("IPv6", "::ffff:10.244.0.1"),
        ] {
            let error = error(slice(address_type, address)).unwrap_or_default();
            assert!(
                error.contains(&format!(
                    "endpoints[0].addresses[0]: \"{address}\" is not an {address_type} address"
                )),
                "{address_type} {address}: {error}"
            );
        }
    }

    #[test]
    fn slices_are_merged_by_port_name_and_protocol_with_duplicates_once() {
        let desired = desired_of(WEB);
        assert_eq!(desired.frontends().count(), 2);
        // Named targetPort `web` resolved by the slice ports; not-ready 10.244.0.2 left out;
        // 10.244.0.1 in both slices counted once; the IPv6 slice ignored.
        assert_eq!(
            backends(&desired, &fe([10, 96, 0, 10], 80, Protocol::Tcp)),
            ["10.244.0.1:8080", "10.244.0.3:8080"]
        );
        assert_eq!(
            backends(&desired, &fe([10, 96, 0, 10], 53, Protocol::Udp)),
            ["10.244.0.1:5353", "10.244.0.3:5353"]
        );
        let target = desired
            .target(&fe([10, 96, 0, 10], 80, Protocol::Tcp))
            .unwrap();
        assert_eq!(target.service, ObjectRef::new("default", "web"));
        assert_eq!(&*target.port_name, "http");
        assert_eq!(target.kind, FrontendKind::ClusterIP);
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
        let slice = |conditions: &str| {
            format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-a, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
- addresses: [10.244.0.1]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.244.0.2]
  conditions: {conditions}
ports: [{{port: 80}}]
"#
            )
        };
        let frontend = fe([10, 96, 0, 10], 80, Protocol::Tcp);
        let ready = desired_of(&slice("{ready: true}"));
        assert_eq!(backends(&ready, &frontend), ["10.244.0.2:80"]);
        let why: Vec<Option<String>> = ready
            .target(&frontend)
            .unwrap()
            .endpoint_states("node-1")
            .into_iter()
            .map(|e| e.excluded)
            .collect();
        assert_eq!(
            why,
            [
                Some("terminating: used only while no endpoint is ready".into()),
                None
            ]
        );
        let none_ready = desired_of(&slice("{ready: false, serving: false, terminating: true}"));
        assert_eq!(backends(&none_ready, &frontend), ["10.244.0.1:80"]);
    }

    #[test]
    fn node_ports_external_and_load_balancer_ips_are_frontends() {
        let desired = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.7, "2001:db8::7"]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.1}
    - {ip: 198.51.100.2, ipMode: VIP}
    - {ip: 198.51.100.3, ipMode: Proxy}
    - {hostname: lb.example.com}
"#,
        );
        let kinds: Vec<(String, FrontendKind, u16)> = desired
            .frontends()
            .map(|(f, t)| (f.to_string(), t.kind, t.spec.flags))
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    "10.96.0.10:80/TCP".into(),
                    FrontendKind::ClusterIP,
                    lb_common::FLAG_CLUSTER_IP
                ),
                (
                    "127.0.0.1:30080/TCP".into(),
                    FrontendKind::NodePort,
                    lb_common::FLAG_HOST_NETNS_ONLY
                ),
                ("192.168.1.10:30080/TCP".into(), FrontendKind::NodePort, 0),
                ("198.51.100.1:80/TCP".into(), FrontendKind::LoadBalancer, 0),
                ("198.51.100.2:80/TCP".into(), FrontendKind::LoadBalancer, 0),
                ("203.0.113.7:80/TCP".into(), FrontendKind::ExternalIP, 0),
            ]
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let yaml = |node: &str| {
            format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, sessionAffinity: ClientIP, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-a, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
- {{addresses: [10.244.0.1], nodeName: {node}}}
- {{addresses: [10.244.1.1], nodeName: node-2}}
ports: [{{port: 80}}]
"#
            )
        };
        let frontend = fe([10, 96, 0, 10], 80, Protocol::Tcp);
        let local = desired_of(&yaml("node-1"));
        assert_eq!(backends(&local, &frontend), ["10.244.0.1:80"]);
        let spec = &local.target(&frontend).unwrap().spec;
        assert_eq!(
            spec.flags,
            lb_common::FLAG_NODE_LOCAL | lb_common::FLAG_CLUSTER_IP
        );
        assert_eq!(spec.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
        let elsewhere = desired_of(&yaml("node-3"));
        assert!(backends(&elsewhere, &frontend).is_empty());
        let why: Vec<Option<String>> = elsewhere
            .target(&frontend)
            .unwrap()
            .endpoint_states("node-1")
            .into_iter()
            .map(|e| e.excluded)
            .collect();
        assert_eq!(
            why,
            [
                Some("on node node-3, not node-1 (internalTrafficPolicy: Local)".into()),
                Some("on node node-2, not node-1 (internalTrafficPolicy: Local)".into()),
            ]
        );
    }

    #[test]
    fn headless_and_external_name_services_stay_out_of_the_datapath() {
        let desired = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: external-service}
spec: {type: ExternalName, externalName: api.acmecorp.com, ports: [{port: 9000}]}
"#,
        );
        assert!((desired.frontends().count() == 0));
        assert_eq!(
            desired.not_in_datapath,
            BTreeMap::from([
                (ObjectRef::new("default", "db"), NotInDatapath::Headless),
                (
                    ObjectRef::new("default", "external-service"),
                    NotInDatapath::ExternalName {
                        name: "api.acmecorp.com".into()
                    }
                ),
            ])
        );
    }

    #[test]
    fn an_external_ip_cannot_take_over_a_cluster_ip() {
        let desired = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: a-attacker}
spec: {clusterIP: 10.96.0.99, externalIPs: [10.96.0.10], ports: [{port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns}
spec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}]}
"#,
        );
        let target = desired
            .target(&fe([10, 96, 0, 10], 53, Protocol::Udp))
            .unwrap();
        assert_eq!(target.service, ObjectRef::new("default", "kube-dns"));
        assert_eq!(target.kind, FrontendKind::ClusterIP);
        assert_eq!(
            desired.conflicts()[0].ignored,
            ObjectRef::new("default", "a-attacker")
        );
    }

    #[test]
    fn a_frontend_claimed_twice_stays_with_the_first_service() {
        let desired = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.11, externalIPs: [10.96.0.10], ports: [{port: 80}]}
"#,
        );
        assert_eq!(desired.conflicts().len(), 1);
        assert_eq!(desired.conflicts()[0].kept, ObjectRef::new("default", "a"));
        assert_eq!(
            desired.conflicts()[0].ignored,
            ObjectRef::new("default", "b")
        );
    }

    /// Each Service given updated one at a time, in order, as a source delivers them.
    fn desired_in_turn(desired: &mut Desired, yamls: &[&str]) {
        for yaml in yamls {
            let (services, _) = load(yaml);
            let service = &services[0];
            desired.update([(&service.id, Some((service, Vec::new())))], &node());
        }
    }

    fn service_yaml(name: &str, created: Option<&str>) -> String {
        let created = created
            .map(|at| format!(", creationTimestamp: \"{at}\""))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}{created}}}\n\
             spec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n"
        )
    }

    fn owner(desired: &Desired) -> String {
        let frontend = fe([10, 96, 0, 10], 80, Protocol::Tcp);
        desired.target(&frontend).unwrap().service.to_string()
    }

    #[test]
    fn a_live_service_is_never_taken_over_by_a_later_claim() {
        let mut desired = Desired::default();
        let web = service_yaml("web", None);
        let hijack = service_yaml("aa-hijack", None);
        desired_in_turn(&mut desired, &[&web, &hijack]);
        // aa-hijack sorts first, but came later.
        assert_eq!(owner(&desired), "default/web");
        assert_eq!(
            desired.conflicts()[0].ignored,
            ObjectRef::new("default", "aa-hijack")
        );
        // web changing (its endpoints, its ports) keeps its place.
        desired_in_turn(&mut desired, &[&web]);
        assert_eq!(owner(&desired), "default/web");
        // Once web is gone, the next claimant has it.
        let gone = ObjectRef::new("default", "web");
        desired.update([(&gone, None)], &node());
        assert_eq!(owner(&desired), "default/aa-hijack");
        assert!(desired.conflicts().is_empty());
    }

    #[test]
    fn among_claims_that_arrive_together_the_oldest_service_wins() {
        let older = service_yaml("zz-older", Some("2025-01-01T00:00:00Z"));
        let newer = service_yaml("aa-newer", Some("2026-01-01T00:00:00Z"));
        let undated = service_yaml("aa-undated", None);
        let desired = desired_of(&[newer.as_str(), &older, &undated].join("---\n"));
        assert_eq!(owner(&desired), "default/zz-older");
        // Without timestamps, by namespace/name.
        let desired = desired_of(&[service_yaml("b", None), service_yaml("a", None)].join("---\n"));
        assert_eq!(owner(&desired), "default/a");
    }

    #[test]
    fn after_a_restart_the_service_the_maps_held_keeps_its_frontend() {
        let mut desired = Desired::default();
        let (services, _) =
            load(&[service_yaml("web", None), service_yaml("aa-hijack", None)].join("---\n"));
        desired.update(
            services.iter().map(|s| (&s.id, Some((s, Vec::new())))),
            &node(),
        );
        // Arrived together, aa-hijack sorts first; but the maps had web there.
        assert_eq!(owner(&desired), "default/aa-hijack");
        let web = ObjectRef::new("default", "web");
        let reordered = desired.prefer_incumbents(|_| Some(web.clone()));
        assert_eq!(reordered.len(), 1);
        assert_eq!(owner(&desired), "default/web");
        assert_eq!(
            desired.conflicts()[0].ignored,
            ObjectRef::new("default", "aa-hijack")
        );
    }

    /// A Service whose slice has `endpoints` (YAML list items), on node-1 in zone-a.
    fn hinted(endpoints: &str) -> Desired {
        desired_of(&format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec: {{clusterIP: 10.96.0.10, trafficDistribution: PreferClose, ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-a, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints: {endpoints}
ports: [{{port: 80}}]
"#
        ))
    }

    #[test]
    fn topology_hints_choose_the_endpoints_as_kube_proxy_does() {
        let web = fe([10, 96, 0, 10], 80, Protocol::Tcp);
        let zoned = |a: &str, b: &str, c: &str| {
            format!(
                "[{{addresses: [10.0.0.1], hints: {{forZones: [{{name: {a}}}]}}}}, \
                  {{addresses: [10.0.0.2], hints: {{forZones: [{{name: {b}}}]}}}}, \
                  {{addresses: [10.0.0.3]{c}}}]"
            )
        };
        // Every ready endpoint hinted, one for this zone: those for it.
        let same_zone = hinted(&zoned(
            "zone-a",
            "zone-b",
            ", hints: {forZones: [{name: zone-a}]}",
        ));
        assert_eq!(backends(&same_zone, &web), ["10.0.0.1:80", "10.0.0.3:80"]);
        let target = same_zone.target(&web).unwrap();
        assert_eq!(target.topology, Topology::PreferSameZone);
        let excluded = target.endpoint_states("node-1");
        assert!(
            excluded[1]
                .excluded
                .as_deref()
                .is_some_and(|why| why.contains("PreferSameZone")),
            "{excluded:?}"
        );
        // One ready endpoint without hints: all of them.
        let unhinted = hinted(&zoned("zone-a", "zone-b", ""));
        assert_eq!(backends(&unhinted, &web).len(), 3);
        assert_eq!(unhinted.target(&web).unwrap().topology, Topology::All);
        // A not-ready endpoint without hints does not count.
        let not_ready = hinted(&zoned("zone-a", "zone-b", ", conditions: {ready: false}"));
        assert_eq!(backends(&not_ready, &web), ["10.0.0.1:80"]);
        // None for this zone: all of them.
        let elsewhere = hinted(&zoned(
            "zone-b",
            "zone-c",
            ", hints: {forZones: [{name: zone-c}]}",
        ));
        assert_eq!(backends(&elsewhere, &web).len(), 3);
        // Node hints win over zone hints when every ready endpoint has one for this node.
        let same_node = hinted(
            "[{addresses: [10.0.0.1], hints: {forZones: [{name: zone-a}], forNodes: [{name: node-2}]}}, \
              {addresses: [10.0.0.2], hints: {forZones: [{name: zone-a}], forNodes: [{name: node-1}]}}]",
        );
        assert_eq!(backends(&same_node, &web), ["10.0.0.2:80"]);
        assert_eq!(
            same_node.target(&web).unwrap().topology,
            Topology::PreferSameNode
        );
        // No ready endpoint for this zone's hints: the terminating ones, whatever the hints.
        let terminating = hinted(
            "[{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}, \
               hints: {forZones: [{name: zone-b}]}}]",
        );
        assert_eq!(backends(&terminating, &web), ["10.0.0.1:80"]);
    }

    #[test]
    fn invalid_fields_are_named() {
        let error = |spec: &str| {
            let yaml =
                format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n");
            let document = parse::parse(Path::new("t.yaml"), &yaml).unwrap().remove(0);
            let Err(ManifestError::Object { source, .. }) = document.object else {
                panic!("not a conversion error: {:?}", document.object)
            };
            source.to_string()
        };
        assert_eq!(
            error("{clusterIP: 10.96.0.10, ports: [{port: 80, protocol: ICMP}]}"),
            "Service default/web: spec.ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)"
        );
        assert_eq!(
            error("{ports: [{port: 80}]}"),
            "Service default/web: spec.clusterIP: not set: a Service must carry the clusterIP the API server allocated"
        );
        assert_eq!(
            error("{clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
            "Service default/web: spec.clusterIP: \"10.96.0.300\" is not an IP address"
        );
        assert_eq!(
            error(
                "{clusterIP: 10.96.0.10, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}"
            ),
            "Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is not within 1-86400"
        );
        assert_eq!(
            error("{clusterIP: 10.96.0.10, type: Magic}"),
            "Service default/web: spec.type: unknown type \"Magic\""
        );
    }

    #[test]
    fn addresses_and_target_ports_are_checked_as_the_api_server_does() {
        let error = |spec: &str| {
            let yaml =
                format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n");
            let document = parse::parse(Path::new("t.yaml"), &yaml).unwrap().remove(0);
            document.object.err().map(|e| e.to_string())
        };
        let refused = [
            (
                "{clusterIP: 127.0.0.1, ports: [{port: 80}]}",
                "spec.clusterIP: 127.0.0.1 is a loopback address",
            ),
            (
                "{clusterIP: 10.96.0.10, externalIPs: [0.0.0.0], ports: [{port: 80}]}",
                "spec.externalIPs[0]: 0.0.0.0 is the unspecified address",
            ),
            (
                "{clusterIP: 10.96.0.10, externalIPs: [1.2.3.4, 255.255.255.255], ports: [{port: 80}]}",
                "spec.externalIPs[1]: 255.255.255.255 is the broadcast address",
            ),
            (
                "{clusterIPs: [10.96.0.10, 224.0.0.1], ports: [{port: 80}]}",
                "spec.clusterIPs[1]: 224.0.0.1 is a multicast address",
            ),
            (
                "{clusterIP: 169.254.169.254, ports: [{port: 80}]}",
                "spec.clusterIP: 169.254.169.254 is a link-local address",
            ),
            (
                "{clusterIPs: [10.96.0.10, \"::1\"], ports: [{port: 80}]}",
                "spec.clusterIPs[1]: ::1 is a loopback address",
            ),
            (
                "{clusterIP: \"fe80::1\", ports: [{port: 80}]}",
                "spec.clusterIP: fe80::1 is a link-local address",
            ),
            (
                "{clusterIP: \"ff02::1\", ports: [{port: 80}]}",
                "spec.clusterIP: ff02::1 is a multicast address",
            ),
            (
                "{clusterIP: \"fd00::10\", externalIPs: [\"::\"], ports: [{port: 80}]}",
                "spec.externalIPs[0]: :: is the unspecified address",
            ),
            (
                "{clusterIP: \"::ffff:10.96.0.10\", ports: [{port: 80}]}",
                "spec.clusterIP: ::ffff:10.96.0.10 is a v4-mapped address",
            ),
            (
                "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 0}]}",
                "spec.ports[0].targetPort: 0 is not a port",
            ),
            (
                "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 65536}]}",
                "spec.ports[0].targetPort: 65536 is not a port",
            ),
            (
                "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: -1}]}",
                "spec.ports[0].targetPort: -1 is not a port",
            ),
            (
                "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: Http}]}",
                "spec.ports[0].targetPort: \"Http\" is not a port number",
            ),
            (
                "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: \"8080\"}]}",
                "spec.ports[0].targetPort: \"8080\" is not a port number",
            ),
        ];
        for (spec, expected) in refused {
            let error = error(spec).unwrap_or_else(|| panic!("{spec} accepted"));
            assert!(error.contains(expected), "{spec}: {error}");
        }
        for spec in [
            "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}",
            "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: http-alt}]}",
            "{clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], ports: [{port: 80}]}",
        ] {
            assert_eq!(error(spec), None, "{spec}");
        }
    }

    #[test]
    fn services_of_another_proxy_and_headless_slices_are_left_alone() {
        let desired = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: cilium}}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: marked, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: cilium}}
addressType: IPv4
endpoints: [{addresses: ["10.244.0.8"]}]
ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ""}}
addressType: IPv4
endpoints: [{addresses: ["10.244.0.9"]}]
ports: [{port: 80}]
"#,
        );
        // Another proxy's Service, and one labelled headless whatever its clusterIP (as
        // kube-proxy's selector leaves it out), are left alone, with why.
        for (address, name, why) in [
            (
                20,
                "other",
                "service.kubernetes.io/service-proxy-name: \"cilium\" implements it, not lb",
            ),
            (
                30,
                "marked",
                "service.kubernetes.io/headless: labelled headless, which kube-proxy leaves alone",
            ),
        ] {
            assert!(
                desired
                    .target(&fe([10, 96, 0, address], 80, Protocol::Tcp))
                    .is_none()
            );
            let reason = &desired.not_in_datapath[&ObjectRef::new("default", name)];
            assert_eq!(reason.to_string(), why);
        }
        // web is served, by no slice: neither the headless one nor the other proxy's is the
        // proxy's.
        assert!(backends(&desired, &fe([10, 96, 0, 10], 80, Protocol::Tcp)).is_empty());
    }
}
