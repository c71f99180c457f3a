//! Many Services at once, as the benchmark and the scale tests feed them to lb: N Services
//! with their EndpointSlices, as multi-document YAML or as the one `kind: List` JSON
//! document `kubectl get svc,endpointslices -A -o json` writes.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

/// One Service: its clusterIP, port and endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// Its IPv6 family, for a dual-stack Service; `None` for an IPv4 one.
    pub ipv6: Option<Ipv6Family>,
}

/// The IPv6 family of a dual-stack [`BenchService`]: a second clusterIP, served by an
/// IPv6 EndpointSlice of its own (`{name}-2`), as the API server and the EndpointSlice
/// controller make them for `ipFamilyPolicy: PreferDualStack`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6Family {
    pub vip: Ipv6Addr,
    pub endpoints: Vec<(Ipv6Addr, u16)>,
}

/// N Services on 10.96.0.1, 10.96.0.2, … port 80, each with `endpoints`. The last one is
/// the Service under test: the one a linear rule walk reaches last.
pub fn services(n: u32, endpoints: &[(Ipv4Addr, u16)]) -> Vec<BenchService> {
    services_from(1, n, endpoints)
}

/// Services `first..first + n` of the [`services`] numbering.
pub fn services_from(first: u32, n: u32, endpoints: &[(Ipv4Addr, u16)]) -> Vec<BenchService> {
    let base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
    (first..first + n)
        .map(|i| BenchService {
            name: format!("svc-{i}"),
            vip: Ipv4Addr::from(base + i),
            port: 80,
            endpoints: endpoints.to_vec(),
            ipv6: None,
        })
        .collect()
}

fn target_port(service: &BenchService) -> u16 {
    service.endpoints.first().map_or(0, |(_, port)| *port)
}

/// The Services and one EndpointSlice each, as multi-document YAML.
pub fn manifests(services: &[BenchService]) -> String {
    let mut out = String::new();
    for service in services {
        let endpoints: Vec<String> = service
            .endpoints
            .iter()
            .map(|(ip, _)| format!("{{addresses: [\"{ip}\"]}}"))
            .collect();
        let target = target_port(service);
        let families = match &service.ipv6 {
            Some(ipv6) => format!(
                ", clusterIPs: [{}, \"{}\"], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: PreferDualStack",
                service.vip, ipv6.vip
            ),
            None => String::new(),
        };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {vip}{families}, ports: [{{port: {port}, targetPort: {target}}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nendpoints: [{eps}]\nports: [{{port: {target}}}]\n",
            name = service.name,
            vip = service.vip,
            port = service.port,
            eps = endpoints.join(", ")
        );
        if let Some(ipv6) = &service.ipv6 {
            let endpoints: Vec<String> = ipv6
                .endpoints
                .iter()
                .map(|(ip, _)| format!("{{addresses: [\"{ip}\"]}}"))
                .collect();
            let _ = write!(
                out,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-2, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv6\nendpoints: [{eps}]\nports: [{{port: {target}}}]\n",
                name = service.name,
                eps = endpoints.join(", ")
            );
        }
    }
    out
}

/// The Services and one EndpointSlice each as one `kind: List` JSON document, with the
/// fields `kubectl get -A -o json` prints (uid, resourceVersion, creationTimestamp, selector,
/// conditions, …), so that a reader pays for what a real list holds.
pub fn list_json(services: &[BenchService]) -> String {
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": objects(services),
        "metadata": {"resourceVersion": ""},
    });
    serde_json::to_string_pretty(&list).unwrap_or_default()
}

/// The items of [`list_json`]: each Service, then its EndpointSlice, as an API server
/// holds them.
pub fn objects(services: &[BenchService]) -> Vec<serde_json::Value> {
    let mut items = Vec::with_capacity(services.len() * 2);
    for (i, service) in services.iter().enumerate() {
        items.push(service_object(service, i));
        items.push(slice_object(service, i));
        if let Some(ipv6_slice) = ipv6_slice_object(service, i) {
            items.push(ipv6_slice);
        }
    }
    items
}

/// Service `service` as `kubectl get -o json` prints it; `index` numbers its uid and
/// resourceVersion.
pub fn service_object(service: &BenchService, index: usize) -> serde_json::Value {
    let target = target_port(service);
    let mut cluster_ips = vec![service.vip.to_string()];
    let mut families = vec!["IPv4"];
    if let Some(ipv6) = &service.ipv6 {
        cluster_ips.push(ipv6.vip.to_string());
        families.push("IPv6");
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service.name,
            "namespace": "default",
            "uid": format!("00000000-0000-4000-8000-{:012}", 2 * index),
            "resourceVersion": (1000 + 2 * index).to_string(),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": service.name},
        },
        "spec": {
            "clusterIP": service.vip.to_string(),
            "clusterIPs": cluster_ips,
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": families,
            "ipFamilyPolicy": if service.ipv6.is_some() { "PreferDualStack" } else { "SingleStack" },
            "ports": [{"port": service.port, "protocol": "TCP", "targetPort": target}],
            "selector": {"app": service.name},
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    })
}

/// The one EndpointSlice of `service` (`{name}-1`), with its endpoints, as `kubectl get -o
/// json` prints it.
pub fn slice_object(service: &BenchService, index: usize) -> serde_json::Value {
    let addresses: Vec<String> = service
        .endpoints
        .iter()
        .map(|(ip, _)| ip.to_string())
        .collect();
    slice_of(service, 1, "IPv4", &addresses, 2 * index + 1)
}

/// The IPv6 EndpointSlice of a dual-stack `service` (`{name}-2`), if it is one.
pub fn ipv6_slice_object(service: &BenchService, index: usize) -> Option<serde_json::Value> {
    let ipv6 = service.ipv6.as_ref()?;
    let addresses: Vec<String> = ipv6
        .endpoints
        .iter()
        .map(|(ip, _)| ip.to_string())
        .collect();
    // Numbered after every object of an IPv4 list, so that no uid is used twice.
    Some(slice_of(
        service,
        2,
        "IPv6",
        &addresses,
        1_000_000_000 + index,
    ))
}

/// EndpointSlice `{name}-{number}` of `service`, of `addresses`, numbered `object` (its uid
/// and resourceVersion).
fn slice_of(
    service: &BenchService,
    number: u32,
    address_type: &str,
    addresses: &[String],
    object: usize,
) -> serde_json::Value {
    let target = target_port(service);
    let endpoints: Vec<serde_json::Value> = addresses
        .iter()
        .map(|ip| {
            serde_json::json!({
                "addresses": [ip],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-1",
            })
        })
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-{number}", service.name),
            "namespace": "default",
            "uid": format!("00000000-0000-4000-8000-{object:012}"),
            "resourceVersion": (1000 + object).to_string(),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "generateName": format!("{}-", service.name),
            "labels": {
                "kubernetes.io/service-name": service.name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "", "port": target, "protocol": "TCP"}],
    })
}
