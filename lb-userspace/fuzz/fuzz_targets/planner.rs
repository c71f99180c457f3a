//! The planner fed random sequences of model changes: Services and EndpointSlices put and
//! deleted through the agent's watches, the node's addresses changing, the maps' ceilings
//! changing, syncs, syncs whose writes stop part-way (a failed write), and restarts of the
//! agent on the maps an interrupted plan left. Names, addresses and ports come from small
//! pools, so that Services share backends, claim each other's addresses, and come back.
//!
//! Each sync is checked as `Agent::sync` says: after every single write, each frontend a
//! connect can reach resolves to slots and backends that exist and reaches only its old or
//! its new backends (some while both sets have one); after the plan, the maps hold exactly
//! the desired state (a refused Service keeps what it had), the agent's record of them is
//! what they hold, nothing is left that no frontend needs, a plan of everything writes
//! nothing more, and no map went past its peak or its ceiling.

#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use arbitrary::Arbitrary;
use lb_userspace::{
    fuzzing::WatcherEvent,
    model::Node,
    plan::Capacity,
    source::api::{EndpointSlice, Service},
};
use lb_userspace_fuzz::{Agent, UNBOUNDED};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

#[derive(Arbitrary, Debug)]
enum Step {
    PutService(ServiceInput),
    DeleteService(u8),
    PutSlice(SliceInput),
    DeleteSlice(u8),
    /// Which of the node's possible addresses it has (a bit each).
    NodeIps(u8),
    /// Small bounds for the maps (services, backends, affinity matches), or none.
    Ceiling(Option<(u8, u8, u8)>),
    Sync,
    /// A sync whose writes stop after this many: the next one reads the maps back.
    FailedSync(u8),
    /// The agent is killed after this many writes of a sync and starts again.
    Restart(u8),
}

#[derive(Arbitrary, Debug)]
struct ServiceInput {
    name: u8,
    /// ClusterIP, NodePort, LoadBalancer, ExternalName, headless, another proxy's.
    type_: u8,
    /// Which of the pool's addresses each list holds (a bit each).
    cluster_ips: u8,
    external_ips: u8,
    load_balancer_ips: u8,
    ports: Vec<PortInput>,
    affinity_timeout: Option<u8>,
    local: bool,
    created: u8,
    version: u8,
}

#[derive(Arbitrary, Debug)]
struct PortInput {
    name: u8,
    port: u8,
    protocol: u8,
    node_port: u8,
}

#[derive(Arbitrary, Debug)]
struct SliceInput {
    name: u8,
    /// The Service it belongs to; one past the pool: none.
    service: u8,
    ipv6: bool,
    ports: Vec<PortInput>,
    endpoints: Vec<EndpointInput>,
    version: u8,
}

#[derive(Arbitrary, Debug)]
struct EndpointInput {
    address: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: u8,
    zone_hint: u8,
    node_hint: u8,
}

const SERVICES: u8 = 4;
const SLICES: u8 = 6;
/// Service addresses: clusterIPs, external and load-balancer IPs draw from the same few,
/// of both families (a Service with one of each is dual-stack), so that Services claim
/// each other's.
const ADDRESSES: [IpAddr; 6] = [
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 2)),
];
const NODE_IPS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(192, 168, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
];
const PORT_NAMES: [&str; 3] = ["", "http", "dns"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const NODES: [Option<&str>; 3] = [None, Some("node-1"), Some("node-2")];

fn pick<T: Copy>(pool: &[T], at: u8) -> T {
    pool[usize::from(at) % pool.len()]
}

/// The addresses of `ADDRESSES` whose bits `mask` has, as the API writes them.
fn addresses(mask: u8) -> Vec<String> {
    ADDRESSES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, ip)| ip.to_string())
        .collect()
}

fn version(version: u8) -> String {
    // Often the same version again: the store must then keep what it has.
    match version % 4 {
        0 => String::new(),
        n => n.to_string(),
    }
}

impl ServiceInput {
    fn to_api(&self) -> Value {
        let type_ = [
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "ClusterIP",
            "ClusterIP",
        ][usize::from(self.type_) % 6];
        let cluster_ips = match self.type_ % 6 {
            4 => vec!["None".to_owned()],
            _ => addresses(self.cluster_ips),
        };
        let ports: Vec<Value> = self
            .ports
            .iter()
            .take(3)
            .map(|port| {
                let mut value = json!({
                    "name": pick(&PORT_NAMES, port.name),
                    "port": pick(&[80, 443, 53], port.port),
                    "protocol": pick(&PROTOCOLS, port.protocol),
                });
                if port.node_port % 3 != 0 {
                    value["nodePort"] = json!(pick(&[30080, 30443], port.node_port));
                }
                value
            })
            .collect();
        let mut labels = serde_json::Map::new();
        if self.type_ % 6 == 5 {
            labels.insert(
                "service.kubernetes.io/service-proxy-name".into(),
                "other".into(),
            );
        }
        let ingress: Vec<Value> = addresses(self.load_balancer_ips)
            .into_iter()
            .map(|ip| json!({"ip": ip}))
            .collect();
        let mut spec = json!({
            "type": type_,
            "clusterIPs": cluster_ips,
            "externalIPs": addresses(self.external_ips),
            "ports": ports,
            "internalTrafficPolicy": if self.local { "Local" } else { "Cluster" },
            "externalName": "example.com",
        });
        if let Some(timeout) = self.affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] =
                json!({"clientIP": {"timeoutSeconds": 1 + i32::from(timeout)}});
        }
        json!({
            "metadata": {
                "name": format!("s{}", self.name % SERVICES),
                "namespace": "default",
                "resourceVersion": version(self.version),
                "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", self.created % 60),
                "labels": labels,
            },
            "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress}},
        })
    }
}

impl SliceInput {
    fn to_api(&self) -> Value {
        let mut labels = serde_json::Map::new();
        if self.service % (SERVICES + 1) < SERVICES {
            labels.insert(
                "kubernetes.io/service-name".into(),
                format!("s{}", self.service % (SERVICES + 1)).into(),
            );
        }
        let ports: Vec<Value> = self
            .ports
            .iter()
            .take(3)
            .map(|port| {
                json!({
                    "name": pick(&PORT_NAMES, port.name),
                    "port": pick(&[8080, 8443, 5353], port.port),
                    "protocol": pick(&PROTOCOLS, port.protocol),
                })
            })
            .collect();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .take(6)
            .map(|endpoint| {
                let address = if self.ipv6 {
                    format!("fd00::{}", endpoint.address % 8 + 1)
                } else {
                    format!("10.244.0.{}", endpoint.address % 8 + 1)
                };
                let mut value = json!({
                    "addresses": [address],
                    "conditions": {
                        "ready": endpoint.ready,
                        "serving": endpoint.serving,
                        "terminating": endpoint.terminating,
                    },
                    "nodeName": pick(&NODES, endpoint.node),
                });
                let zones: Vec<Value> = [None, Some("zone-a"), Some("zone-b")]
                    [usize::from(endpoint.zone_hint) % 3]
                    .map(|zone| json!({"name": zone}))
                    .into_iter()
                    .collect();
                let nodes: Vec<Value> = pick(&NODES, endpoint.node_hint)
                    .map(|node| json!({"name": node}))
                    .into_iter()
                    .collect();
                if !zones.is_empty() || !nodes.is_empty() {
                    value["hints"] = json!({"forZones": zones, "forNodes": nodes});
                }
                value
            })
            .collect();
        json!({
            "metadata": {
                "name": format!("e{}", self.name % SLICES),
                "namespace": "default",
                "resourceVersion": version(self.version),
                "labels": labels,
            },
            "addressType": if self.ipv6 { "IPv6" } else { "IPv4" },
            "endpoints": endpoints,
            "ports": ports,
        })
    }
}

/// What the API server holds, for the watches of an agent that starts again to list.
#[derive(Default)]
struct ApiServer {
    services: BTreeMap<u8, Service>,
    slices: BTreeMap<u8, EndpointSlice>,
}

fuzz_target!(|steps: Vec<Step>| {
    let node = Node {
        name: "node-1".into(),
        ips: vec![NODE_IPS[0]],
        zone: Some("zone-a".into()),
    };
    let mut agent = Agent::new(node, UNBOUNDED);
    let mut api = ApiServer::default();
    for step in steps.into_iter().take(64) {
        match step {
            Step::PutService(input) => {
                let Ok(service) = serde_json::from_value::<Service>(input.to_api()) else {
                    panic!("not a Service: {input:?}");
                };
                api.services.insert(input.name % SERVICES, service.clone());
                agent.service(WatcherEvent::Apply(service));
            }
            Step::DeleteService(name) => {
                if let Some(service) = api.services.remove(&(name % SERVICES)) {
                    agent.service(WatcherEvent::Delete(service));
                }
            }
            Step::PutSlice(input) => {
                let Ok(slice) = serde_json::from_value::<EndpointSlice>(input.to_api()) else {
                    panic!("not an EndpointSlice: {input:?}");
                };
                api.slices.insert(input.name % SLICES, slice.clone());
                agent.slice(WatcherEvent::Apply(slice));
            }
            Step::DeleteSlice(name) => {
                if let Some(slice) = api.slices.remove(&(name % SLICES)) {
                    agent.slice(WatcherEvent::Delete(slice));
                }
            }
            Step::NodeIps(mask) => {
                let ips = NODE_IPS
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, ip)| *ip)
                    .collect();
                agent.node_ips(ips);
            }
            Step::Ceiling(bounds) => {
                agent.ceiling =
                    bounds.map_or(UNBOUNDED, |(services, backends, matches)| Capacity {
                        services: 4 + u32::from(services % 64),
                        backends: 2 + u32::from(backends % 32),
                        affinity_matches: 2 + u32::from(matches % 32),
                    });
            }
            Step::Sync => agent.sync(None),
            Step::FailedSync(written) => agent.sync(Some(usize::from(written))),
            Step::Restart(written) => {
                agent.sync(Some(usize::from(written)));
                agent.restart(
                    api.services.values().cloned().collect(),
                    api.slices.values().cloned().collect(),
                );
            }
        }
    }
    agent.sync(None);
    // Started again on what it left: nothing to change.
    agent.restart(
        api.services.values().cloned().collect(),
        api.slices.values().cloned().collect(),
    );
    agent.sync(None);
});
