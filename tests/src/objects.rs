//! Services and EndpointSlices as the API server holds them (the EndpointSlice controller's
//! output included), written as manifests for the agent's manifest source.

use std::net::Ipv4Addr;

/// A v1 Service `name` in `default`: `cluster_ip` (no `clusterIP` line when empty, as for an
/// ExternalName Service), more `spec` lines (each indented by two spaces; may be empty) and
/// its `ports` (YAML flow maps such as `{name: http, port: 80, targetPort: 8080}`).
pub fn service(name: &str, cluster_ip: &str, spec: &str, ports: &[&str]) -> String {
    let cluster_ip = if cluster_ip.is_empty() {
        String::new()
    } else {
        format!("  clusterIP: {cluster_ip}\n")
    };
    let ports: String = ports.iter().map(|p| format!("  - {p}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n\
         {cluster_ip}{spec}\n  ports:\n{ports}"
    )
}

/// `manifest` (of [`service`] or [`endpoint_slice`]) with `labels` (the inside of a YAML
/// flow map, e.g. `service.kubernetes.io/headless: ""`) added to its metadata.
pub fn labelled(manifest: &str, labels: &str) -> String {
    if let Some(at) = manifest.find("  labels: {") {
        // A slice's labels map: the new ones go first in it.
        let at = at + "  labels: {".len();
        format!("{}{labels}, {}", &manifest[..at], &manifest[at..])
    } else {
        manifest.replacen(
            "namespace: default}",
            &format!("namespace: default, labels: {{{labels}}}}}"),
            1,
        )
    }
}

/// An EndpointSlice `name` of Service `service` in `default` (a document of its own, after
/// `---`): its `endpoints` (a YAML flow sequence, see [`endpoints`]) and `ports` (flow maps
/// such as `{name: http, port: 8080, protocol: TCP}`).
pub fn endpoint_slice(service: &str, name: &str, endpoints: &str, ports: &[&str]) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nendpoints: {endpoints}\nports: [{}]\n",
        ports.join(", ")
    )
}

/// An EndpointSlice of Service `service` with one port `p` (`port`, `protocol`).
pub fn slice(service: &str, name: &str, port: u16, protocol: &str, endpoints: &str) -> String {
    endpoint_slice(
        service,
        name,
        endpoints,
        &[&format!("{{name: p, port: {port}, protocol: {protocol}}}")],
    )
}

/// One endpoint: `ip` with `conditions` (the inside of a flow map, e.g. `ready: true`) on
/// node `node`.
pub fn endpoint(ip: Ipv4Addr, conditions: &str, node: &str) -> String {
    format!("{{addresses: [\"{ip}\"], conditions: {{{conditions}}}, nodeName: {node}}}")
}

/// A flow sequence of endpoints.
pub fn endpoints(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

/// A flow sequence of ready endpoints on this node ([`crate::NODE_NAME`]).
pub fn ready(ips: &[Ipv4Addr]) -> String {
    endpoints(
        &ips.iter()
            .map(|ip| endpoint(*ip, "ready: true", crate::NODE_NAME))
            .collect::<Vec<_>>(),
    )
}
