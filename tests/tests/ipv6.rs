//! IPv6 and dual-stack Services through the same datapath as IPv4: a dual-stack Service is a
//! frontend per family in the same maps (IPv4 held v4-mapped), each served by the
//! EndpointSlices of its address type. Every check runs a real client in a pod (or on the
//! node) of a dual-stack testbed against real backends.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{NODE_IP, Pod, Probe, Testbed, ipv6_of, privileged, wait_for};

const VIP6: &str = "fd00:96::10";

/// Service `web` with clusterIPs 10.96.0.10 and [`VIP6`] (`spec` adds to its spec, `port`
/// to its TCP port `http`; its UDP port `dns` is 53), and an IPv4 and an IPv6 slice of
/// `pods`, both ports on 8888, every endpoint on this node.
fn dual_stack_web(pods: &[Pod], spec: &str, port: &str) -> String {
    let on_this_node = vec!["nodeName: node-1"; pods.len()];
    dual_stack_web_with(pods, &on_this_node, spec, port)
}

/// [`dual_stack_web`] with `fields` added to each pod's endpoint, in both slices.
fn dual_stack_web_with(pods: &[Pod], fields: &[&str], spec: &str, port: &str) -> String {
    let endpoints = |address: &dyn Fn(&Pod) -> String| {
        let items: Vec<String> = pods
            .iter()
            .zip(fields)
            .map(|(pod, fields)| format!("{{addresses: [\"{}\"], {fields}}}", address(pod)))
            .collect();
        items.join(", ")
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "{VIP6}"]
{spec}
  ports:
  - {{name: http, {port}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 8888}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v4, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints: [{v4}]
ports: [{{name: http, port: 8888}}, {{name: dns, port: 8888, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
endpoints: [{v6}]
ports: [{{name: http, port: 8888}}, {{name: dns, port: 8888, protocol: UDP}}]
"#,
        v4 = endpoints(&|pod| pod.ip.to_string()),
        v6 = endpoints(&|pod| ipv6_of(pod.ip).to_string()),
    )
}

/// Waits until `address` answers from `client` (the agent has written its frontend).
fn wait_answered(testbed: &Testbed, client: &Pod, address: &str) {
    wait_for(
        &format!("{address} to answer"),
        Duration::from_secs(10),
        || {
            let probes = testbed.probe(client, address, 1)?;
            Ok(probes[0].hostname().is_some().then_some(()))
        },
    )
    .unwrap();
}

fn hostnames(probes: &[Probe]) -> BTreeSet<&str> {
    probes.iter().filter_map(Probe::hostname).collect()
}

/// TCP, connected UDP (getpeername) and unconnected UDP (the reply's source) to the IPv6
/// clusterIP reach both pods over IPv6 and show the Service's address; the IPv4 clusterIP
/// answers alike, also from an AF_INET6 socket through its v4-mapped address; a port the
/// Service does not have on its IPv6 clusterIP is refused at once.
#[test]
fn a_dual_stack_service_answers_on_both_families_and_shows_its_address() {
    if !privileged("a_dual_stack_service_answers_on_both_families_and_shows_its_address") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::dual_stack_with_backends(2, 8888).unwrap();
    testbed
        .write_manifest(
            "web.yaml",
            &dual_stack_web(&pods, "", "port: 80, targetPort: 8888"),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    let v6 = format!("[{VIP6}]:80");
    let v6_dns = format!("[{VIP6}]:53");
    wait_answered(&testbed, &client, &v6);

    for (address, mode) in [
        (v6.as_str(), "tcp"),
        (v6_dns.as_str(), "connected-udp"),
        (v6_dns.as_str(), "udp"),
        ("10.96.0.10:80", "tcp"),
        ("10.96.0.10:53", "udp"),
        ("[::ffff:10.96.0.10]:80", "tcp"),
        ("[::ffff:10.96.0.10]:53", "connected-udp"),
    ] {
        let probes = testbed
            .probe_with(&client, address, 20, &["--mode", mode])
            .unwrap();
        assert!(
            probes.iter().all(|p| p.peer() == Some(address)),
            "{address} ({mode}): {probes:?}"
        );
        assert_eq!(
            hostnames(&probes),
            BTreeSet::from(["web-0", "web-1"]),
            "{address} ({mode})"
        );
    }
    // The pods see the client's own IPv6 address: no NAT on the way.
    let client_v6 = format!("[{}]:", ipv6_of(client.ip));
    let probes = testbed.probe(&client, &v6, 5).unwrap();
    assert!(
        probes
            .iter()
            .all(|p| p.remote_addr().is_some_and(|r| r.starts_with(&client_v6))),
        "{probes:?}"
    );
    // A port no Service has on the IPv6 clusterIP: refused, not left to time out.
    let refused = testbed.probe(&client, &format!("[{VIP6}]:81"), 1).unwrap();
    assert!(
        refused[0]
            .error()
            .is_some_and(|e| e.contains("Connection refused")),
        "{refused:?}"
    );
    assert!(testbed.stat("unknown_port").unwrap() >= 1);
}

/// A dual-stack NodePort answers on the node's IPv6 address from a pod and on `[::1]` from
/// the node itself, and the node's own binds to the NodePort on IPv6 addresses fail with
/// EADDRINUSE, as on IPv4.
#[test]
fn ipv6_node_ports_answer_and_refuse_host_binds() {
    if !privileged("ipv6_node_ports_answer_and_refuse_host_binds") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::dual_stack_with_backends(1, 8888).unwrap();
    testbed
        .write_manifest(
            "web.yaml",
            &dual_stack_web(
                &pods,
                "  type: NodePort",
                "port: 80, targetPort: 8888, nodePort: 30680",
            ),
        )
        .unwrap();
    // The agent finds the node's addresses, IPv6 ones included.
    testbed.discover_node_ips = true;
    testbed.start_agent().unwrap();
    let node_v6 = format!("[{}]:30680", ipv6_of(NODE_IP));
    wait_answered(&testbed, &client, &node_v6);
    let node = testbed.node();
    for (from, address) in [(&client, node_v6.as_str()), (&node, "[::1]:30680")] {
        let probes = testbed.probe(from, address, 3).unwrap();
        assert_eq!(hostnames(&probes), BTreeSet::from(["web-0"]), "{address}");
        assert!(
            probes.iter().all(|p| p.peer() == Some(address)),
            "{probes:?}"
        );
    }
    // In a pod, [::1] is the pod's own loopback: left alone.
    let own = testbed.probe(&client, "[::1]:30680", 1).unwrap();
    assert!(own[0].hostname().is_none(), "{own:?}");

    let bind = |address: &str| {
        testbed
            .probe_with(&node, address, 1, &["--mode", "bind-tcp"])
            .unwrap()
            .remove(0)
    };
    for address in ["[::]:30680", node_v6.as_str(), "[::1]:30680"] {
        let probe = bind(address);
        assert!(
            probe
                .error()
                .is_some_and(|e| e.contains("Address already in use")),
            "{address}: {probe:?}"
        );
    }
    let other_port = format!("[{}]:30681", ipv6_of(NODE_IP));
    assert_eq!(bind(&other_port).peer(), Some(other_port.as_str()));
}

/// A connected UDP socket to the IPv6 clusterIP whose backend leaves the Service is
/// terminated, as an IPv4 one is: its next call fails, and a new socket reaches the backend
/// that stays.
#[test]
fn an_ipv6_connected_udp_socket_whose_backend_left_is_terminated() {
    if !privileged("an_ipv6_connected_udp_socket_whose_backend_left_is_terminated") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::dual_stack_with_backends(2, 8888).unwrap();
    let all: Vec<Pod> = pods.clone();
    let manifest = |pods: &[Pod]| dual_stack_web(pods, "", "port: 80, targetPort: 8888");
    testbed.write_manifest("web.yaml", &manifest(&all)).unwrap();
    testbed.start_agent().unwrap();
    let v6_dns = format!("[{VIP6}]:53");
    wait_answered(&testbed, &client, &format!("[{VIP6}]:80"));

    let (translated, first) = testbed
        .one_socket_prober(&client, &v6_dns, "connected-udp", 20, 6000)
        .unwrap();
    let backend = first.hostname().unwrap().to_owned();
    let stays: Vec<Pod> = pods.into_iter().filter(|p| p.name != backend).collect();

    testbed
        .write_manifest("web.yaml", &manifest(&stays))
        .unwrap();
    let after = testbed
        .attempts_until_terminated(translated, Duration::from_secs(10))
        .unwrap();
    lb_tests::termination_point(&after, &backend);
    let again = testbed
        .probe_with(&client, &v6_dns, 5, &["--mode", "connected-udp"])
        .unwrap();
    assert_eq!(hostnames(&again), BTreeSet::from([stays[0].name.as_str()]));
}

/// Until 10 probes of `address` from `client` are all answered by exactly `pods`.
fn wait_answered_by(testbed: &Testbed, client: &Pod, address: &str, pods: &[&str]) {
    let want: BTreeSet<&str> = pods.iter().copied().collect();
    wait_for(
        &format!("{address} answered by {pods:?}"),
        Duration::from_secs(10),
        || {
            let probes = testbed.probe(client, address, 10)?;
            let all_answered = probes.iter().all(|p| p.hostname().is_some());
            Ok((all_answered && hostnames(&probes) == want).then_some(()))
        },
    )
    .unwrap();
}

/// Session affinity, `internalTrafficPolicy: Local` and zone hints on the IPv6 clusterIP,
/// as the IPv4 tests check them: one client keeps one pod over TCP and connected UDP; only
/// the node's own endpoints serve, and with none left a connect is refused at once; with
/// hints, only the endpoint meant for the node's zone serves.
#[test]
fn ipv6_clusterips_keep_affinity_traffic_policy_and_zone_hints() {
    if !privileged("ipv6_clusterips_keep_affinity_traffic_policy_and_zone_hints") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::dual_stack_with_backends(2, 8888).unwrap();
    let v6 = format!("[{VIP6}]:80");
    let v6_dns = format!("[{VIP6}]:53");
    let port = "port: 80, targetPort: 8888";
    let web = |fields: [&str; 2], spec: &str| dual_stack_web_with(&pods, &fields, spec, port);
    testbed
        .write_manifest(
            "web.yaml",
            &web(
                ["nodeName: node-1", "nodeName: node-1"],
                "  sessionAffinity: ClientIP",
            ),
        )
        .unwrap();
    testbed.start_agent_in_zone("zone-a").unwrap();
    wait_answered(&testbed, &client, &v6);
    for (address, mode) in [(v6.as_str(), "tcp"), (v6_dns.as_str(), "connected-udp")] {
        let probes = testbed
            .probe_with(&client, address, 20, &["--mode", mode])
            .unwrap();
        assert!(
            probes.iter().all(|p| p.hostname().is_some()),
            "{address} ({mode}): {probes:?}"
        );
        assert_eq!(
            hostnames(&probes).len(),
            1,
            "{address} ({mode}) with affinity: {probes:?}"
        );
    }

    // internalTrafficPolicy: Local, web-0 on this node and web-1 on another.
    testbed
        .write_manifest(
            "web.yaml",
            &web(
                ["nodeName: node-1", "nodeName: node-2"],
                "  internalTrafficPolicy: Local",
            ),
        )
        .unwrap();
    wait_answered_by(&testbed, &client, &v6, &["web-0"]);
    // No endpoint on this node: refused at once, not sent elsewhere.
    testbed
        .write_manifest(
            "web.yaml",
            &web(
                ["nodeName: node-2", "nodeName: node-3"],
                "  internalTrafficPolicy: Local",
            ),
        )
        .unwrap();
    wait_for(
        "the IPv6 clusterIP to refuse",
        Duration::from_secs(10),
        || {
            let probes = testbed.probe(&client, &v6, 1)?;
            Ok(probes[0]
                .error()
                .is_some_and(|e| e.contains("Connection refused"))
                .then_some(()))
        },
    )
    .unwrap();
    assert!(testbed.stat("no_local_backends").unwrap() >= 1);

    // Zone hints: web-0 is for zone-b, web-1 for this node's zone-a.
    testbed
        .write_manifest(
            "web.yaml",
            &web(
                [
                    "nodeName: node-1, hints: {forZones: [{name: zone-b}]}",
                    "nodeName: node-1, hints: {forZones: [{name: zone-a}]}",
                ],
                "  trafficDistribution: PreferClose",
            ),
        )
        .unwrap();
    wait_answered_by(&testbed, &client, &v6, &["web-1"]);
    let probes = testbed.probe(&client, &v6, 20).unwrap();
    assert_eq!(hostnames(&probes), BTreeSet::from(["web-1"]), "{probes:?}");
}
