//! The cluster DNS zone, served from the agent's own model (`lb agent --dns ADDR`), so that
//! a name resolves to exactly what the maps serve at that moment — after the Kubernetes
//! DNS-based service discovery specification (kubernetes/dns docs/specification.md) and
//! what CoreDNS's kubernetes plugin answers:
//!
//! - `<svc>.<ns>.svc.<zone>` A/AAAA: the clusterIPs of each family; for a headless Service
//!   its ready endpoints' addresses; for an ExternalName Service a CNAME to its name (an
//!   address as externalName is answered as that address's A/AAAA record);
//! - `<endpoint>.<svc>.<ns>.svc.<zone>` A/AAAA for a headless Service's endpoints, named by
//!   their `hostname`, else their address with dashes (`10-244-0-10`), as CoreDNS does;
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV for named ports: the Service's name and
//!   port, or each endpoint's name and port for a headless Service;
//! - PTR for clusterIPs and headless endpoints;
//! - NXDOMAIN for names in the zone that do not exist, NODATA (NOERROR, no answer) for a
//!   name that exists without the type asked; names outside the zone are not ours.
//!
//! The zone is kept per Service, as the maps are: a sync recomputes the records of the
//! Services it changed, nothing else.

mod server;

use std::{collections::HashMap, net::IpAddr, str::FromStr as _, sync::Arc};

use hickory_server::proto::rr::{
    Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SRV},
};
use smallvec::SmallVec;

pub use server::{DnsError, Sockets, bind, serve};

use crate::model::{AddressType, ObjectRef, Protocol, ServiceKind, ServiceModel, SliceModel};

/// The TTL of every answer: CoreDNS's default, short enough that a client sees a
/// scale-down within seconds.
pub const TTL: u32 = 5;

/// A headless Service's endpoint: its address and the label it is named by.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    address: IpAddr,
    /// `hostname`, else the address with dashes.
    label: Box<str>,
}

/// A named port: `_<name>._<protocol>` SRV records point at `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NamedPort {
    name: Box<str>,
    protocol: Protocol,
    /// The Service's port, or for a headless Service the endpoints' (slice) port.
    port: u16,
}

/// What a Service's name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    ClusterIps(SmallVec<[IpAddr; 2]>),
    Headless(Vec<Endpoint>),
    ExternalName(Name),
    /// An externalName that is an address: answered as the address.
    ExternalAddress(IpAddr),
}

/// One Service's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecords {
    target: Target,
    ports: SmallVec<[NamedPort; 1]>,
}

impl ServiceRecords {
    /// The records of `service` with its `slices`; `None` for one another proxy implements
    /// or that is labelled headless with a clusterIP (the model keeps no addresses of
    /// those: they are none of lb's business).
    pub fn of(service: &ServiceModel, slices: &[&Arc<SliceModel>]) -> Option<Self> {
        let service_ports = || {
            service
                .ports
                .iter()
                .filter(|p| !p.name.is_empty())
                .map(|p| NamedPort {
                    name: p.name.as_str().into(),
                    protocol: p.protocol,
                    port: p.port,
                })
                .collect()
        };
        Some(match &service.kind {
            ServiceKind::OtherProxy(_) | ServiceKind::HeadlessLabel => return None,
            ServiceKind::ClusterIp(ips) => Self {
                target: Target::ClusterIps(ips.clone()),
                ports: service_ports(),
            },
            ServiceKind::ExternalName(name) => Self {
                target: match IpAddr::from_str(name) {
                    Ok(address) => Target::ExternalAddress(address),
                    Err(_) => {
                        // The API server checks it is a DNS name; a manifest may not be.
                        let mut name = Name::from_ascii(name).ok()?;
                        // An absolute name: no search domain applies to it.
                        name.set_fqdn(true);
                        Target::ExternalName(name.to_lowercase())
                    }
                },
                ports: service_ports(),
            },
            ServiceKind::Headless => {
                let mut endpoints: Vec<Endpoint> = Vec::new();
                let mut ports: SmallVec<[NamedPort; 1]> = SmallVec::new();
                let ip_slices = slices
                    .iter()
                    .filter(|s| matches!(s.address_type, AddressType::Ipv4 | AddressType::Ipv6));
                for slice in ip_slices {
                    for port in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                        let named = NamedPort {
                            name: port.name.as_str().into(),
                            protocol: port.protocol,
                            port: port.port,
                        };
                        if !ports.contains(&named) {
                            ports.push(named);
                        }
                    }
                    for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
                        if endpoints.iter().any(|e| e.address == endpoint.address) {
                            continue;
                        }
                        let label = match endpoint.hostname() {
                            Some(hostname) => hostname.into(),
                            None => dashed(endpoint.address).into(),
                        };
                        endpoints.push(Endpoint {
                            address: endpoint.address,
                            label,
                        });
                    }
                }
                endpoints.sort_by_key(|e| e.address);
                Self {
                    target: Target::Headless(endpoints),
                    ports,
                }
            }
        })
    }
}

/// An address with dashes for dots (or colons): the label CoreDNS names an endpoint
/// without a hostname by.
fn dashed(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    }
}

/// What the zone answers to one question.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these records; none is NODATA (the name exists, not with that type).
    Records(Vec<Record>),
    /// The name is in the zone and does not exist.
    NxDomain,
    /// The name is not in the zone (or a reverse name of no address of it).
    NotOurs,
}

/// The zone: every Service's records, and the names of each address for PTR.
#[derive(Debug)]
pub struct Zone {
    /// `<cluster domain>.`, lowercase.
    domain: Name,
    services: HashMap<ObjectRef, ServiceRecords>,
    /// How many Services each namespace has: `<ns>.svc.<zone>` exists while one does.
    namespaces: HashMap<Box<str>, usize>,
    /// The names an address has: clusterIPs and headless endpoints.
    reverse: HashMap<IpAddr, SmallVec<[Name; 1]>>,
}

/// A cluster domain that is no DNS name.
#[derive(Debug, thiserror::Error)]
#[error("--cluster-domain {domain:?} is not a DNS name: {reason}")]
pub struct DomainError {
    domain: String,
    reason: String,
}

impl Zone {
    pub fn new(domain: &str) -> Result<Self, DomainError> {
        let mut domain_name = Name::from_ascii(domain).map_err(|e| DomainError {
            domain: domain.to_owned(),
            reason: e.to_string(),
        })?;
        domain_name.set_fqdn(true);
        Ok(Self {
            domain: domain_name.to_lowercase(),
            services: HashMap::new(),
            namespaces: HashMap::new(),
            reverse: HashMap::new(),
        })
    }

    /// `<svc>.<ns>.svc.<zone>`.
    fn service_name(&self, id: &ObjectRef) -> Option<Name> {
        Name::from_ascii(format!("{}.{}.svc", id.name(), id.namespace()))
            .ok()?
            .append_domain(&self.domain)
            .ok()
    }

    /// Sets Service `id`'s records (`None` when it is gone or has none).
    pub fn update(&mut self, id: &ObjectRef, records: Option<ServiceRecords>) {
        if let Some(old) = self.services.remove(id) {
            self.unindex(id, &old);
        }
        if let Some(records) = records {
            self.index(id, &records);
            self.services.insert(id.clone(), records);
        }
    }

    /// The addresses of Service `id` that have a name of their own (for PTR).
    fn names_of(&self, id: &ObjectRef, records: &ServiceRecords) -> Vec<(IpAddr, Name)> {
        let Some(service) = self.service_name(id) else {
            return Vec::new();
        };
        match &records.target {
            Target::ClusterIps(ips) => ips.iter().map(|ip| (*ip, service.clone())).collect(),
            Target::Headless(endpoints) => endpoints
                .iter()
                .filter_map(|e| {
                    let label = Name::from_ascii(&*e.label).ok()?;
                    Some((e.address, label.append_domain(&service).ok()?))
                })
                .collect(),
            Target::ExternalName(_) | Target::ExternalAddress(_) => Vec::new(),
        }
    }

    fn index(&mut self, id: &ObjectRef, records: &ServiceRecords) {
        *self.namespaces.entry(id.namespace().into()).or_default() += 1;
        for (address, name) in self.names_of(id, records) {
            self.reverse.entry(address).or_default().push(name);
        }
    }

    fn unindex(&mut self, id: &ObjectRef, records: &ServiceRecords) {
        if let Some(count) = self.namespaces.get_mut(id.namespace()) {
            *count -= 1;
            if *count == 0 {
                self.namespaces.remove(id.namespace());
            }
        }
        for (address, name) in self.names_of(id, records) {
            if let Some(names) = self.reverse.get_mut(&address) {
                names.retain(|n| *n != name);
                if names.is_empty() {
                    self.reverse.remove(&address);
                }
            }
        }
    }

    /// The answer to `qname` (any case) and `qtype`.
    pub fn answer(&self, qname: &Name, qtype: RecordType) -> Answer {
        let qname = qname.to_lowercase();
        if !self.domain.zone_of(&qname) {
            return self.reverse_answer(&qname, qtype);
        }
        let relative = usize::from(qname.num_labels() - self.domain.num_labels());
        let labels: Vec<&str> = qname
            .iter()
            .take(relative)
            .map(|l| std::str::from_utf8(l).unwrap_or_default())
            .collect();
        let nodata = || Answer::Records(Vec::new());
        match labels.as_slice() {
            [] | ["svc"] => nodata(),
            [namespace, "svc"] => {
                if self.namespaces.contains_key(*namespace) {
                    nodata()
                } else {
                    Answer::NxDomain
                }
            }
            [service, namespace, "svc"] => match self.records(namespace, service) {
                Some(records) => Answer::Records(self.service_answer(&qname, records, qtype)),
                None => Answer::NxDomain,
            },
            [port, protocol, service, namespace, "svc"]
                if port.starts_with('_') && protocol.starts_with('_') =>
            {
                match self.records(namespace, service) {
                    Some(records) => self.srv_answer(&qname, records, port, protocol, qtype),
                    None => Answer::NxDomain,
                }
            }
            [endpoint, service, namespace, "svc"] => match self.records(namespace, service) {
                Some(ServiceRecords {
                    target: Target::Headless(endpoints),
                    ..
                }) => {
                    let addresses: Vec<IpAddr> = endpoints
                        .iter()
                        .filter(|e| e.label.eq_ignore_ascii_case(endpoint))
                        .map(|e| e.address)
                        .collect();
                    if addresses.is_empty() {
                        Answer::NxDomain
                    } else {
                        Answer::Records(address_records(&qname, &addresses, qtype))
                    }
                }
                _ => Answer::NxDomain,
            },
            _ => Answer::NxDomain,
        }
    }

    fn records(&self, namespace: &str, service: &str) -> Option<&ServiceRecords> {
        self.services.get(&ObjectRef::new(namespace, service))
    }

    fn service_answer(
        &self,
        qname: &Name,
        records: &ServiceRecords,
        qtype: RecordType,
    ) -> Vec<Record> {
        match &records.target {
            Target::ClusterIps(ips) => address_records(qname, ips, qtype),
            Target::Headless(endpoints) => {
                let addresses: Vec<IpAddr> = endpoints.iter().map(|e| e.address).collect();
                address_records(qname, &addresses, qtype)
            }
            Target::ExternalAddress(address) => address_records(qname, &[*address], qtype),
            Target::ExternalName(target) => match qtype {
                // The resolver follows the CNAME itself, to a name outside the cluster.
                RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::ANY => {
                    vec![Record::from_rdata(
                        qname.clone(),
                        TTL,
                        RData::CNAME(CNAME(target.clone())),
                    )]
                }
                _ => Vec::new(),
            },
        }
    }

    fn srv_answer(
        &self,
        qname: &Name,
        records: &ServiceRecords,
        port: &str,
        protocol: &str,
        qtype: RecordType,
    ) -> Answer {
        let Some(port) = records.ports.iter().find(|p| {
            port.strip_prefix('_') == Some(&*p.name)
                && protocol
                    .strip_prefix('_')
                    .is_some_and(|proto| proto.eq_ignore_ascii_case(p.protocol.as_str()))
        }) else {
            return Answer::NxDomain;
        };
        if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
            return Answer::Records(Vec::new());
        }
        // The Service's name, without the `_port._proto` labels.
        let service = qname.base_name().base_name();
        let srv = |target: Name| {
            Record::from_rdata(
                qname.clone(),
                TTL,
                RData::SRV(SRV::new(0, 100, port.port, target)),
            )
        };
        Answer::Records(match &records.target {
            Target::Headless(endpoints) => endpoints
                .iter()
                .filter_map(|e| {
                    let label = Name::from_ascii(&*e.label).ok()?;
                    Some(srv(label.append_domain(&service).ok()?))
                })
                .collect(),
            Target::ExternalName(target) => vec![srv(target.clone())],
            Target::ClusterIps(_) | Target::ExternalAddress(_) => vec![srv(service)],
        })
    }

    fn reverse_answer(&self, qname: &Name, qtype: RecordType) -> Answer {
        let Ok(network) = qname.parse_arpa_name() else {
            return Answer::NotOurs;
        };
        let full = match network.addr() {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if network.prefix_len() != full {
            return Answer::NotOurs;
        }
        match self.reverse.get(&network.addr()) {
            None => Answer::NotOurs,
            Some(_) if !matches!(qtype, RecordType::PTR | RecordType::ANY) => {
                Answer::Records(Vec::new())
            }
            Some(names) => Answer::Records(
                names
                    .iter()
                    .map(|name| {
                        Record::from_rdata(qname.clone(), TTL, RData::PTR(PTR(name.clone())))
                    })
                    .collect(),
            ),
        }
    }
}

/// A and AAAA records of `addresses` for `qname`, those of the family `qtype` asks for.
fn address_records(qname: &Name, addresses: &[IpAddr], qtype: RecordType) -> Vec<Record> {
    addresses
        .iter()
        .filter_map(|address| {
            let rdata = match (address, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(*v6)),
                _ => return None,
            };
            Some(Record::from_rdata(qname.clone(), TTL, rdata))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use super::*;
    use crate::model::load;

    const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{name: pg, port: 5432}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.10], hostname: db-0}
- {addresses: [10.244.0.11]}
- {addresses: [10.244.0.12], conditions: {ready: false}}
ports: [{name: pg, port: 5432, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: db.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: ext-ip, namespace: shop}
spec: {type: ExternalName, externalName: 192.0.2.7}
"#;

    fn zone() -> Zone {
        let (services, slices) = load(SERVICES);
        let slices: Vec<Arc<SliceModel>> = slices.into_iter().map(Arc::new).collect();
        let mut zone = Zone::new("cluster.local").unwrap();
        for service in &services {
            let of: Vec<&Arc<SliceModel>> = slices
                .iter()
                .filter(|s| s.service.as_ref() == Some(&service.id))
                .collect();
            zone.update(&service.id, ServiceRecords::of(service, &of));
        }
        zone
    }

    /// The answer's data as text, sorted; `NXDOMAIN` or `not ours` otherwise.
    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Vec<String> {
        match zone.answer(&Name::from_str(name).unwrap(), qtype) {
            Answer::Records(records) => {
                let mut data: Vec<String> = records
                    .iter()
                    .map(|r| {
                        assert_eq!(r.ttl, TTL);
                        r.data.to_string()
                    })
                    .collect();
                data.sort();
                data
            }
            Answer::NxDomain => vec!["NXDOMAIN".into()],
            Answer::NotOurs => vec!["not ours".into()],
        }
    }

    #[test]
    fn a_service_resolves_to_its_cluster_ips_of_the_family_asked() {
        let zone = zone();
        let web = "web.shop.svc.cluster.local.";
        assert_eq!(ask(&zone, web, RecordType::A), ["10.96.0.10"]);
        assert_eq!(ask(&zone, web, RecordType::AAAA), ["fd00:96::10"]);
        assert_eq!(
            ask(&zone, "WEB.Shop.svc.Cluster.Local.", RecordType::A),
            ["10.96.0.10"]
        );
        // The name exists, not with that type: NODATA.
        assert!(ask(&zone, web, RecordType::TXT).is_empty());
        assert_eq!(
            ask(
                &zone,
                "_http._tcp.web.shop.svc.cluster.local.",
                RecordType::SRV
            ),
            ["0 100 80 web.shop.svc.cluster.local."]
        );
        for missing in [
            "_http._udp.web.shop.svc.cluster.local.",
            "_grpc._tcp.web.shop.svc.cluster.local.",
            "nope.shop.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "other.svc.cluster.local.",
            "a.b.c.web.shop.svc.cluster.local.",
        ] {
            assert_eq!(
                ask(&zone, missing, RecordType::A),
                ["NXDOMAIN"],
                "{missing}"
            );
        }
        for exists in [
            "shop.svc.cluster.local.",
            "svc.cluster.local.",
            "cluster.local.",
        ] {
            assert!(ask(&zone, exists, RecordType::A).is_empty(), "{exists}");
        }
        assert_eq!(ask(&zone, "example.com.", RecordType::A), ["not ours"]);
        assert_eq!(
            ask(&zone, "10.0.96.10.in-addr.arpa.", RecordType::PTR),
            ["web.shop.svc.cluster.local."]
        );
        let v6_ptr = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(
            ask(&zone, v6_ptr, RecordType::PTR),
            ["web.shop.svc.cluster.local."]
        );
        assert_eq!(
            ask(&zone, "1.0.0.127.in-addr.arpa.", RecordType::PTR),
            ["not ours"]
        );
    }

    #[test]
    fn a_headless_service_resolves_to_its_ready_endpoints_each_by_name() {
        let zone = zone();
        let db = "db.shop.svc.cluster.local.";
        assert_eq!(
            ask(&zone, db, RecordType::A),
            ["10.244.0.10", "10.244.0.11"]
        );
        assert!(ask(&zone, db, RecordType::AAAA).is_empty());
        assert_eq!(
            ask(&zone, "db-0.db.shop.svc.cluster.local.", RecordType::A),
            ["10.244.0.10"]
        );
        assert_eq!(
            ask(
                &zone,
                "10-244-0-11.db.shop.svc.cluster.local.",
                RecordType::A
            ),
            ["10.244.0.11"]
        );
        assert_eq!(
            ask(
                &zone,
                "10-244-0-12.db.shop.svc.cluster.local.",
                RecordType::A
            ),
            ["NXDOMAIN"],
            "not ready"
        );
        assert_eq!(
            ask(
                &zone,
                "_pg._tcp.db.shop.svc.cluster.local.",
                RecordType::SRV
            ),
            [
                "0 100 5432 10-244-0-11.db.shop.svc.cluster.local.",
                "0 100 5432 db-0.db.shop.svc.cluster.local."
            ]
        );
        assert_eq!(
            ask(&zone, "10.0.244.10.in-addr.arpa.", RecordType::PTR),
            ["db-0.db.shop.svc.cluster.local."]
        );
    }

    #[test]
    fn an_external_name_is_a_cname_and_an_address_an_address() {
        let zone = zone();
        assert_eq!(
            ask(&zone, "ext.shop.svc.cluster.local.", RecordType::A),
            ["db.example.com."]
        );
        assert_eq!(
            ask(&zone, "ext-ip.shop.svc.cluster.local.", RecordType::A),
            ["192.0.2.7"]
        );
    }

    #[test]
    fn a_service_gone_leaves_no_name_nor_address() {
        let mut zone = zone();
        for name in ["web", "db", "ext", "ext-ip"] {
            zone.update(&ObjectRef::new("shop", name), None);
        }
        assert_eq!(
            ask(&zone, "web.shop.svc.cluster.local.", RecordType::A),
            ["NXDOMAIN"]
        );
        assert_eq!(
            ask(&zone, "shop.svc.cluster.local.", RecordType::A),
            ["NXDOMAIN"],
            "the namespace has no Service left"
        );
        assert_eq!(
            ask(&zone, "10.0.96.10.in-addr.arpa.", RecordType::PTR),
            ["not ours"]
        );
        assert!(zone.reverse.is_empty());
    }

    #[test]
    fn a_cluster_domain_must_be_a_name() {
        assert!(Zone::new("cluster.local").is_ok());
        assert!(Zone::new("bad..domain").is_err());
    }
}
