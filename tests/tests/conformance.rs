//! Upstream Kubernetes e2e cases (kubernetes/kubernetes, test/e2e/network) that apply to
//! clients on the node, one test each, named after the case's `ginkgo.It` text in snake_case
//! (tags such as `[LinuxOnly]` left out; the doc comment quotes the name whole, with its file).
//!
//! Upstream creates pods and Services in a cluster and proxies read them from the API; here
//! the agent reads the same Service and EndpointSlice objects from its manifest directory,
//! written as the API server holds them at each step (the EndpointSlice controller's output
//! included), and real clients in pod network namespaces — or the node's own, for a
//! hostNetwork pod — reach real backends. A pod created upstream is an endpoint added to its
//! slice here; a pod deleted is an endpoint gone, or terminating, as the controller shows it.
//! lb runs on one node: a client "on another node" is what this node's lb does with the
//! endpoints seen from there (an endpoint on this node is another node's remote one).

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use lb_tests::{
    Pod, Probe, Prober, Testbed, TimedProbe, assert_all_answered, assert_refused, finish_probes,
    finish_timed_probes, hostnames, monotonic_ns,
    objects::{endpoint, endpoint_slice, endpoints, labelled, ready, service},
    privileged, wait_for,
};

const VIP: &str = "10.96.0.10";

/// The private node of `test` (see [`Testbed::with_backends`]), or `None` when privileged
/// tests cannot run here: [`privileged`] skips the test (and fails it under CI=true).
fn node(test: &str, backends: u8, port: u16) -> Option<(Testbed, Vec<Pod>, Pod)> {
    privileged(test).then(|| Testbed::with_backends(backends, port).unwrap())
}

/// The name of the test function this is expanded in (for [`privileged`]'s messages).
macro_rules! test_name {
    () => {{
        fn here() {}
        let path = std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}

/// Tests that run a scenario shared by several upstream cases with their own parameters:
/// `name: scenario(args);` is the test `name`, which runs `scenario("name", args)`; the
/// scenario skips, as every privileged test, through [`node`].
macro_rules! cases {
    ($($(#[doc = $doc:literal])+ $name:ident: $scenario:ident($($arg:expr),* $(,)?);)+) => {
        $(
            $(#[doc = $doc])+
            #[test]
            fn $name() {
                $scenario(stringify!($name), $($arg),*);
            }
        )+
    };
}

fn ips(pods: &[&Pod]) -> Vec<Ipv4Addr> {
    pods.iter().map(|p| p.ip).collect()
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

/// Service `name` at [`VIP`] with `spec` lines (may be empty) and `ports`, and its
/// EndpointSlice of `endpoints` (a flow sequence) on `slice_ports`.
fn svc(name: &str, spec: &str, ports: &[&str], endpoints: &str, slice_ports: &[&str]) -> String {
    service(name, VIP, spec, ports)
        + &endpoint_slice(name, &format!("{name}-abcde"), endpoints, slice_ports)
}

/// Writes `manifest` as the node's manifest and starts the agent on it.
fn start(testbed: &mut Testbed, manifest: &str) {
    testbed.write_manifest("svc.yaml", manifest).unwrap();
    testbed.start_agent().unwrap();
}

/// `test`'s node (see [`node`]) with the agent started on the manifest `manifest` writes
/// for its backend pods.
fn started(
    test: &str,
    backends: u8,
    port: u16,
    manifest: impl FnOnce(&[Pod]) -> String,
) -> Option<(Testbed, Vec<Pod>, Pod)> {
    let (mut testbed, pods, client) = node(test, backends, port)?;
    start(&mut testbed, &manifest(&pods));
    Some((testbed, pods, client))
}

/// Waits until `frontend` ("ip:port/PROTO") has exactly `pods` on `port` as backends.
fn serving(testbed: &Testbed, frontend: &str, pods: &[&Pod], port: u16) {
    let backends: Vec<String> = pods.iter().map(|p| format!("{}:{port}", p.ip)).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    testbed
        .wait_for_frontend(frontend, Some(&backends))
        .unwrap();
}

/// `count` attempts from `client` to `address` over `mode` (`tcp`, `udp`, `connected-udp`),
/// a new socket each; fails unless each is answered, and returns who answered.
fn reach(
    testbed: &Testbed,
    client: &Pod,
    address: &str,
    mode: &str,
    count: u32,
) -> BTreeSet<String> {
    let probes = testbed
        .probe_with(client, address, count, &["--mode", mode])
        .unwrap();
    assert_eq!(probes.len(), usize::try_from(count).unwrap());
    assert!(
        probes.iter().all(|p| p.hostname().is_some()),
        "{address} ({mode}) from {}: {probes:?}",
        client.name
    );
    hostnames(&probes)
}

/// Upstream's five rounds of execHostnameTest: five connects from `client` to `address`,
/// each answered by `pod`.
fn five_times(testbed: &Testbed, client: &Pod, address: &str, pod: &Pod) {
    for _ in 0..5 {
        assert_eq!(
            reach(testbed, client, address, "tcp", 1),
            BTreeSet::from([pod.name.clone()]),
            "{address}"
        );
    }
}

/// Fails unless `count` attempts from `client` to `address` over `mode` fail at once with
/// ECONNREFUSED.
fn refused(testbed: &Testbed, client: &Pod, address: &str, mode: &str, count: u32) {
    let probes = testbed
        .probe_with(client, address, count, &["--mode", mode])
        .unwrap();
    assert_eq!(probes.len(), usize::try_from(count).unwrap());
    assert_refused(&probes);
}

/// Fails unless a connect from `client` to `address` is left alone by lb — no Service has
/// the address — so that, with no route to it, it fails at once.
fn left_alone(testbed: &Testbed, client: &Pod, address: &str) {
    let probes = testbed.probe(client, address, 2).unwrap();
    for probe in &probes {
        assert!(
            probe.error().is_some_and(|e| e.contains("unreachable")),
            "{address} from {}: {probe:?}",
            client.name
        );
    }
}

/// Upstream's verifyServeHostnameServiceUp: from a hostNetwork pod (the node) and from a
/// pod, 50 requests per pod of the Service; every one answered, by exactly those pods.
fn verify_up(testbed: &Testbed, client: &Pod, address: &str, pods: &[&Pod]) {
    let count = 50 * u32::try_from(pods.len()).unwrap();
    for from in [testbed.node(), client.clone()] {
        assert_eq!(
            reach(testbed, &from, address, "tcp", count),
            names(pods),
            "{address} from {}",
            from.name
        );
    }
}

/// Upstream's verifyServeHostnameServiceDown: from a hostNetwork pod (the node) nothing
/// answers at the Service's address. Here lb leaves the address alone altogether.
fn verify_down(testbed: &Testbed, address: &str) {
    left_alone(testbed, &testbed.node(), address);
}

/// Whether `pod` answered each of `probes` (and there were some).
fn all_from(probes: &[Probe], pod: &str) -> bool {
    !probes.is_empty() && probes.iter().all(|p| p.hostname() == Some(pod))
}

/// `lb services` entries (JSON) of `service` ("namespace/name").
fn entries_of(testbed: &Testbed, service: &str) -> Vec<serde_json::Value> {
    testbed
        .services()
        .unwrap()
        .into_iter()
        .filter(|entry| entry["service"] == service)
        .collect()
}

/// Waits until `lb services` has an entry for which `wanted` holds; `what` says which.
fn wait_for_entry(testbed: &Testbed, what: &str, wanted: impl Fn(&serde_json::Value) -> bool) {
    wait_for(what, Duration::from_secs(10), || {
        Ok(testbed.services()?.iter().any(&wanted).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", testbed.services()));
}

/// Waits until `lb services` lists `service` out of the datapath, with `why` in its reason.
fn wait_not_in_datapath(testbed: &Testbed, service: &str, why: &str) {
    wait_for_entry(testbed, &format!("{service} listed with {why:?}"), |e| {
        e["service"] == service
            && e["in_datapath"] == false
            && e["why"].as_str().is_some_and(|w| w.contains(why))
    });
}

/// Waits until `lb services` shows the frontend on `port` with one backend whose
/// `terminating` is `terminating`, or with none for `None`.
fn wait_backend(testbed: &Testbed, port: u16, terminating: Option<bool>) {
    wait_for_entry(
        testbed,
        &format!("a backend terminating: {terminating:?}"),
        |e| {
            e["port"] == port
                && e["backends"].as_array().is_some_and(|b| match terminating {
                    Some(terminating) => b.len() == 1 && b[0]["terminating"] == terminating,
                    None => b.is_empty(),
                })
        },
    );
}

/// A host process binding `port` (TCP) on every address of the node: the bound address, or
/// the error.
fn host_bind(testbed: &Testbed, port: u16) -> Probe {
    testbed
        .probe_with(
            &testbed.node(),
            &format!("0.0.0.0:{port}"),
            1,
            &["--mode", "bind-tcp"],
        )
        .unwrap()
        .remove(0)
}

/// "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
/// (test/e2e/network/service.go): the Service has no endpoint, then pod1, pod1 and pod2,
/// pod2, none; at each step it forwards to exactly those pods, the client sees the Service
/// as its peer, and without endpoints a connect is refused.
#[test]
fn should_serve_a_basic_endpoint_from_pods() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 2, 80) else {
        return;
    };
    let manifest = |pods: &[&Pod]| {
        svc(
            "endpoint-test2",
            "",
            &["{port: 80, targetPort: 80, protocol: TCP}"],
            &ready(&ips(pods)),
            &["{port: 80, protocol: TCP}"],
        )
    };
    let frontend = "10.96.0.10:80/TCP";
    start(&mut testbed, &manifest(&[]));
    serving(&testbed, frontend, &[], 80);
    refused(&testbed, &client, "10.96.0.10:80", "tcp", 3);

    // 10 connects to pod1, 40 to both (that all pick one of two: 2^-39), 10 to pod2.
    for (step, count) in [
        (vec![&pods[0]], 10),
        (vec![&pods[0], &pods[1]], 40),
        (vec![&pods[1]], 10),
    ] {
        testbed
            .write_manifest("svc.yaml", &manifest(&step))
            .unwrap();
        serving(&testbed, frontend, &step, 80);
        let probes = testbed.probe(&client, "10.96.0.10:80", count).unwrap();
        assert_all_answered(&probes);
        assert_eq!(hostnames(&probes), names(&step));
        // The application sees the Service as its peer (getpeername).
        for probe in &probes {
            assert_eq!(probe.peer(), Some("10.96.0.10:80"), "{probe:?}");
        }
    }
    testbed.write_manifest("svc.yaml", &manifest(&[])).unwrap();
    serving(&testbed, frontend, &[], 80);
    refused(&testbed, &client, "10.96.0.10:80", "tcp", 3);
    assert_eq!(testbed.stat("connect_translated").unwrap(), 60);
    assert_eq!(testbed.stat("peername_restored").unwrap(), 60);
    assert_eq!(testbed.stat("no_backends").unwrap(), 6);
}

/// A node whose pod1 serves on 100 and pod2 on 101 (the containerPorts that upstream's
/// named target ports `svc1` and `svc2` resolve to), and a client pod.
fn two_port_pods(test: &str) -> Option<(Testbed, Pod, Pod, Pod)> {
    if !privileged(test) {
        return None;
    }
    let mut testbed = Testbed::new().unwrap();
    let pod1 = testbed
        .add_pod("pod1", Ipv4Addr::new(10, 244, 0, 10))
        .unwrap();
    testbed.serve_httpenv(&pod1, 100).unwrap();
    let pod2 = testbed
        .add_pod("pod2", Ipv4Addr::new(10, 244, 0, 11))
        .unwrap();
    testbed.serve_httpenv(&pod2, 101).unwrap();
    let client = testbed
        .add_pod("execpod", Ipv4Addr::new(10, 244, 1, 1))
        .unwrap();
    Some((testbed, pod1, pod2, client))
}

const PORTNAME1: &str = "{name: portname1, port: 80, targetPort: svc1, protocol: TCP}";
const PORTNAME2: &str = "{name: portname2, port: 81, targetPort: svc2, protocol: TCP}";

/// The EndpointSlice controller's slices for `pod1` (svc1 → 100) and `pod2` (svc2 → 101):
/// pods whose named ports resolve differently go to slices of their own.
fn two_port_slices(service: &str, pod1: Option<&Pod>, pod2: Option<&Pod>) -> String {
    [(pod1, 1, 100), (pod2, 2, 101)]
        .into_iter()
        .filter_map(|(pod, n, port)| {
            Some(endpoint_slice(
                service,
                &format!("{service}-{n}"),
                &ready(&[pod?.ip]),
                &[&format!(
                    "{{name: portname{n}, port: {port}, protocol: TCP}}"
                )],
            ))
        })
        .collect()
}

/// "[sig-network] Services should serve multiport endpoints from pods [Conformance]"
/// (test/e2e/network/service.go): ports 80 and 81 with the named target ports svc1 and svc2,
/// which pod1 has on 100 and pod2 on 101; each Service port reaches exactly the pods that
/// have its target port, through no endpoint, pod1, both, pod2, none.
#[test]
fn should_serve_multiport_endpoints_from_pods() {
    let Some((mut testbed, pod1, pod2, client)) = two_port_pods(test_name!()) else {
        return;
    };
    let svc = service("multi-endpoint-test", VIP, "", &[PORTNAME1, PORTNAME2]);
    let manifest = |pod1: Option<&Pod>, pod2: Option<&Pod>| {
        svc.clone() + &two_port_slices("multi-endpoint-test", pod1, pod2)
    };
    let check = |testbed: &Testbed, pod1: Option<&Pod>, pod2: Option<&Pod>| {
        serving(testbed, "10.96.0.10:80/TCP", &Vec::from_iter(pod1), 100);
        serving(testbed, "10.96.0.10:81/TCP", &Vec::from_iter(pod2), 101);
        for (address, pod) in [("10.96.0.10:80", pod1), ("10.96.0.10:81", pod2)] {
            match pod {
                Some(pod) => assert_eq!(
                    reach(testbed, &client, address, "tcp", 5),
                    BTreeSet::from([pod.name.clone()])
                ),
                None => refused(testbed, &client, address, "tcp", 2),
            }
        }
    };
    start(&mut testbed, &manifest(None, None));
    check(&testbed, None, None);
    for (with1, with2) in [
        (Some(&pod1), None),
        (Some(&pod1), Some(&pod2)),
        (None, Some(&pod2)),
        (None, None),
    ] {
        testbed
            .write_manifest("svc.yaml", &manifest(with1, with2))
            .unwrap();
        check(&testbed, with1, with2);
    }
    // Nothing listens on 80 or 81 in the pods: only the translation reaches them.
    refused(&testbed, &client, "10.244.0.10:80", "tcp", 1);
}

/// "[sig-network] Services should be updated after adding or deleting ports"
/// (test/e2e/network/service.go): port 80 (svc1, pod1); port 81 (svc2, pod2) added; port 81
/// deleted again — refused at once, also while the EndpointSlice controller has not caught up
/// and pod2's slice still has the port.
#[test]
fn should_be_updated_after_adding_or_deleting_ports() {
    let Some((mut testbed, pod1, pod2, client)) = two_port_pods(test_name!()) else {
        return;
    };
    let name = "edit-port-test";
    let one_port = service(name, VIP, "", &[PORTNAME1]);
    let two_ports = service(name, VIP, "", &[PORTNAME1, PORTNAME2]);
    start(
        &mut testbed,
        &(one_port.clone() + &two_port_slices(name, Some(&pod1), None)),
    );
    serving(&testbed, "10.96.0.10:80/TCP", &[&pod1], 100);
    assert_eq!(
        reach(&testbed, &client, "10.96.0.10:80", "tcp", 5),
        names(&[&pod1])
    );
    refused(&testbed, &client, "10.96.0.10:81", "tcp", 1);

    // A new port, and a new endpoint for it.
    testbed
        .write_manifest(
            "svc.yaml",
            &(two_ports + &two_port_slices(name, Some(&pod1), Some(&pod2))),
        )
        .unwrap();
    serving(&testbed, "10.96.0.10:81/TCP", &[&pod2], 101);
    assert_eq!(
        reach(&testbed, &client, "10.96.0.10:80", "tcp", 5),
        names(&[&pod1])
    );
    assert_eq!(
        reach(&testbed, &client, "10.96.0.10:81", "tcp", 5),
        names(&[&pod2])
    );

    // The port deleted: the Service's ports decide, whatever the slices still say.
    let unknown_before = testbed.stat("unknown_port").unwrap();
    for slices in [
        two_port_slices(name, Some(&pod1), Some(&pod2)),
        two_port_slices(name, Some(&pod1), None),
    ] {
        testbed
            .write_manifest("svc.yaml", &(one_port.clone() + &slices))
            .unwrap();
        testbed
            .wait_for_frontend("10.96.0.10:81/TCP", None)
            .unwrap();
        assert_eq!(
            reach(&testbed, &client, "10.96.0.10:80", "tcp", 5),
            names(&[&pod1])
        );
        refused(&testbed, &client, "10.96.0.10:81", "tcp", 2);
    }
    assert_eq!(testbed.stat("unknown_port").unwrap(), unknown_before + 4);
}

/// "[sig-network] Services should preserve source pod IP for traffic thru service cluster IP
/// [LinuxOnly]" (test/e2e/network/service.go): the echo server sees each client pod's own
/// address, as the application sees the Service as its peer.
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 1, 8080) else {
        return;
    };
    let second = testbed
        .add_pod("pause-pod-1", Ipv4Addr::new(10, 244, 1, 2))
        .unwrap();
    start(
        &mut testbed,
        &svc(
            "sourceip-test",
            "",
            &["{port: 8080, targetPort: 8080, protocol: TCP}"],
            &ready(&[pods[0].ip]),
            &["{port: 8080, protocol: TCP}"],
        ),
    );
    serving(&testbed, "10.96.0.10:8080/TCP", &[&pods[0]], 8080);
    for from in [&client, &second] {
        let probes = testbed.probe(from, "10.96.0.10:8080", 5).unwrap();
        assert_all_answered(&probes);
        for probe in &probes {
            let source = probe
                .remote_addr()
                .and_then(|a| a.rsplit_once(':'))
                .map(|(ip, _)| ip.to_owned());
            assert_eq!(source, Some(from.ip.to_string()), "{probe:?}");
            assert_eq!(probe.peer(), Some("10.96.0.10:8080"), "{probe:?}");
        }
    }
}

/// "[sig-network] Services should allow pods to hairpin back to themselves through
/// services" (test/e2e/network/service.go): the Service's only pod, as a client, reaches
/// itself through the Service, and sees its own address as the client's.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    let Some((testbed, pods, _client)) = started(test_name!(), 1, 8080, |pods| {
        svc(
            "hairpin-test",
            "",
            &["{port: 8080, targetPort: 8080, protocol: TCP}"],
            &ready(&[pods[0].ip]),
            &["{port: 8080, protocol: TCP}"],
        )
    }) else {
        return;
    };
    serving(&testbed, "10.96.0.10:8080/TCP", &[&pods[0]], 8080);
    let probes = testbed.probe(&pods[0], "10.96.0.10:8080", 5).unwrap();
    assert!(all_from(&probes, "web-0"), "{probes:?}");
    for probe in &probes {
        assert!(
            probe
                .remote_addr()
                .is_some_and(|a| a.starts_with("10.244.0.10:")),
            "{probe:?}"
        );
    }
}

/// A serve-hostname Service `name` at `cluster_ip`:80 → 9376 with `pods` as its endpoints.
fn serve_hostname(name: &str, cluster_ip: &str, pods: &[&Pod]) -> String {
    service(
        name,
        cluster_ip,
        "",
        &["{port: 80, targetPort: 9376, protocol: TCP}"],
    ) + &endpoint_slice(
        name,
        &format!("{name}-abcde"),
        &ready(&ips(pods)),
        &["{port: 9376, protocol: TCP}"],
    )
}

/// "[sig-network] Services should be able to up and down services"
/// (test/e2e/network/service.go): two Services of three pods each are up; the first is
/// deleted and goes down, the second stays up; a third comes up beside it.
#[test]
fn should_be_able_to_up_and_down_services() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 9, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    let (up_down_1, up_down_2, up_down_3) = (&pods[0..3], &pods[3..6], &pods[6..9]);
    testbed
        .write_manifest(
            "up-down-1.yaml",
            &serve_hostname("up-down-1", "10.96.0.11", up_down_1),
        )
        .unwrap();
    testbed
        .write_manifest(
            "up-down-2.yaml",
            &serve_hostname("up-down-2", "10.96.0.12", up_down_2),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    serving(&testbed, "10.96.0.11:80/TCP", up_down_1, 9376);
    serving(&testbed, "10.96.0.12:80/TCP", up_down_2, 9376);
    verify_up(&testbed, &client, "10.96.0.11:80", up_down_1);
    verify_up(&testbed, &client, "10.96.0.12:80", up_down_2);

    testbed.remove_manifest("up-down-1.yaml").unwrap();
    testbed
        .wait_for_frontend("10.96.0.11:80/TCP", None)
        .unwrap();
    verify_down(&testbed, "10.96.0.11:80");
    verify_up(&testbed, &client, "10.96.0.12:80", up_down_2);

    testbed
        .write_manifest(
            "up-down-3.yaml",
            &serve_hostname("up-down-3", "10.96.0.13", up_down_3),
        )
        .unwrap();
    serving(&testbed, "10.96.0.13:80/TCP", up_down_3, 9376);
    verify_up(&testbed, &client, "10.96.0.12:80", up_down_2);
    verify_up(&testbed, &client, "10.96.0.13:80", up_down_3);
}

/// "[sig-network] Services should work after the service has been recreated"
/// (test/e2e/network/service.go): deleted, the Service is down; created again (with the
/// clusterIP the API server gives it then), it is up.
#[test]
fn should_work_after_the_service_has_been_recreated() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 1, 9376) else {
        return;
    };
    let pod = [&pods[0]];
    start(&mut testbed, &serve_hostname("service-deletion", VIP, &pod));
    serving(&testbed, "10.96.0.10:80/TCP", &pod, 9376);
    verify_up(&testbed, &client, "10.96.0.10:80", &pod);

    testbed.remove_manifest("svc.yaml").unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", None)
        .unwrap();
    verify_down(&testbed, "10.96.0.10:80");
    assert!(entries_of(&testbed, "default/service-deletion").is_empty());

    testbed
        .write_manifest(
            "svc.yaml",
            &serve_hostname("service-deletion", "10.96.0.21", &pod),
        )
        .unwrap();
    serving(&testbed, "10.96.0.21:80/TCP", &pod, 9376);
    verify_up(&testbed, &client, "10.96.0.21:80", &pod);
}

/// "[sig-network] Services should work after restarting kube-proxy [Disruptive]"
/// (test/e2e/network/service.go): two Services of three pods each stay up across a restart
/// of the agent. While it is stopped the pinned datapath keeps serving and `lb services`
/// keeps answering (from the pins and the state file); the restarted agent takes the pinned
/// state over without rewriting it.
#[test]
fn should_work_after_restarting_kube_proxy() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 6, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    let (proxy_1, proxy_2) = (&pods[0..3], &pods[3..6]);
    start(
        &mut testbed,
        &(serve_hostname("restart-proxy-1", "10.96.0.11", proxy_1)
            + "---\n"
            + &serve_hostname("restart-proxy-2", "10.96.0.12", proxy_2)),
    );
    serving(&testbed, "10.96.0.11:80/TCP", proxy_1, 9376);
    serving(&testbed, "10.96.0.12:80/TCP", proxy_2, 9376);
    verify_up(&testbed, &client, "10.96.0.11:80", proxy_1);
    verify_up(&testbed, &client, "10.96.0.12:80", proxy_2);

    testbed.stop_agent().unwrap();
    let services = testbed.services().unwrap();
    assert_eq!(services.len(), 2, "{services:?}");
    for (entry, address) in services.iter().zip(["10.96.0.11", "10.96.0.12"]) {
        assert_eq!(entry["address"], address);
        assert_eq!(entry["port"], 80);
        assert_eq!(entry["protocol"], "TCP");
        assert_eq!(entry["backends"].as_array().map(Vec::len), Some(3));
    }
    let table = testbed.lb(&["services"]).unwrap();
    assert!(table.contains("10.96.0.11:80/TCP"), "{table}");
    verify_up(&testbed, &client, "10.96.0.11:80", proxy_1);

    testbed.start_agent().unwrap();
    let log = testbed.agent_output();
    assert!(log.contains("map_writes=0"), "{log}");
    verify_up(&testbed, &client, "10.96.0.11:80", proxy_1);
    verify_up(&testbed, &client, "10.96.0.12:80", proxy_2);
}

/// Service `name` at [`VIP`] with `spec` lines and `port`, whose endpoints are `pods`, on
/// 9376 (the slice's port `http`).
fn http_9376(name: &str, spec: &str, port: &str, pods: &[&Pod]) -> String {
    svc(
        name,
        spec,
        &[port],
        &ready(&ips(pods)),
        &["{name: http, port: 9376, protocol: TCP}"],
    )
}

/// Upstream's reachability of a Service `name` of two pods (on 9376) with `spec` lines and
/// `port`: each of `addresses` reaches both pods, and the application sees it as its peer.
fn serves_both_pods(test: &str, name: &str, spec: &str, port: &str, addresses: &[&str]) {
    let Some((mut testbed, pods, client)) = node(test, 2, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    start(&mut testbed, &http_9376(name, spec, port, &pods));
    for address in addresses {
        serving(&testbed, &format!("{address}/TCP"), &pods, 9376);
        let probes = testbed.probe(&client, address, 40).unwrap();
        assert_all_answered(&probes);
        assert_eq!(hostnames(&probes), names(&pods), "{address}");
        assert!(
            probes.iter().all(|p| p.peer() == Some(*address)),
            "{probes:?}"
        );
    }
}

cases! {
    /// "[sig-network] Services should be able to create a functioning NodePort service
    /// [Conformance]" (test/e2e/network/service.go): a NodePort Service of two pods answers
    /// on its clusterIP:port and on the node's IP:nodePort, with both pods.
    should_be_able_to_create_a_functioning_node_port_service: serves_both_pods("nodeport-test", "  type: NodePort", "{name: http, port: 80, protocol: TCP, targetPort: 9376, nodePort: 30080}", &["10.96.0.10:80", "10.244.0.1:30080"]);
    /// "[sig-network] Services should be possible to connect to a service via ExternalIP
    /// when the external IP is not assigned to a node" (test/e2e/network/service.go): a
    /// ClusterIP Service with an external IP that no interface has answers on it (and on its
    /// clusterIP).
    should_be_possible_to_connect_to_a_service_via_external_ip_when_the_external_ip_is_not_assigned_to_a_node: serves_both_pods("externalip-test", "  type: ClusterIP\n  externalIPs: [203.0.113.250]", "{name: http, port: 80, protocol: TCP, targetPort: 9376}", &["10.96.0.10:80", "203.0.113.250:80"]);
}

/// Port items of a NodePort Service with `tcp-port` (and with `udp` also `udp-port`) on port
/// 80 → 9376, with nodePorts 30300 and 30301.
fn tcp_and_udp_ports(udp: bool) -> Vec<&'static str> {
    let tcp = "{name: tcp-port, port: 80, protocol: TCP, targetPort: 9376, nodePort: 30300}";
    let udp_port = "{name: udp-port, port: 80, protocol: UDP, targetPort: 9376, nodePort: 30301}";
    if udp { vec![tcp, udp_port] } else { vec![tcp] }
}

/// "[sig-network] Services should be able to update service type to NodePort listening on
/// same port number but different protocols" (test/e2e/network/service.go): a ClusterIP
/// Service becomes a NodePort one (TCP), then gets a UDP port on the same port number: two
/// nodePorts, each answering its protocol, beside the clusterIP's two frontends.
#[test]
fn should_be_able_to_update_service_type_to_node_port_listening_on_same_port_number_but_different_protocols()
 {
    let Some((mut testbed, pods, client)) = node(test_name!(), 2, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    let name = "nodeport-update-service";
    start(
        &mut testbed,
        &svc(
            name,
            "  type: ClusterIP",
            &["{port: 80, targetPort: 80, protocol: TCP}"],
            "[]",
            &[],
        ),
    );
    serving(&testbed, "10.96.0.10:80/TCP", &[], 80);

    let manifest = |udp: bool| {
        let slice_ports: &[&str] = if udp {
            &[
                "{name: tcp-port, port: 9376, protocol: TCP}",
                "{name: udp-port, port: 9376, protocol: UDP}",
            ]
        } else {
            &["{name: tcp-port, port: 9376, protocol: TCP}"]
        };
        svc(
            name,
            "  type: NodePort",
            &tcp_and_udp_ports(udp),
            &ready(&ips(&pods)),
            slice_ports,
        )
    };
    testbed
        .write_manifest("svc.yaml", &manifest(false))
        .unwrap();
    serving(&testbed, "10.244.0.1:30300/TCP", &pods, 9376);
    for address in ["10.96.0.10:80", "10.244.0.1:30300"] {
        assert_eq!(reach(&testbed, &client, address, "tcp", 40), names(&pods));
    }

    testbed.write_manifest("svc.yaml", &manifest(true)).unwrap();
    serving(&testbed, "10.244.0.1:30301/UDP", &pods, 9376);
    serving(&testbed, "10.96.0.10:80/UDP", &pods, 9376);
    for (address, mode) in [
        ("10.96.0.10:80", "tcp"),
        ("10.244.0.1:30300", "tcp"),
        ("10.96.0.10:80", "udp"),
        ("10.244.0.1:30301", "udp"),
        ("10.96.0.10:80", "connected-udp"),
        ("10.244.0.1:30301", "connected-udp"),
    ] {
        assert_eq!(
            reach(&testbed, &client, address, mode, 40),
            names(&pods),
            "{address} {mode}"
        );
    }
}

/// The ExternalName Service upstream's jig creates: a CNAME to foo.example.com, no clusterIP.
fn external_name(name: &str, to: &str) -> String {
    service(
        name,
        "",
        &format!("  type: ExternalName\n  externalName: {to}"),
        &["{port: 80, protocol: TCP}"],
    )
}

/// Upstream's ExternalName → ClusterIP or NodePort changes: listed as an ExternalName and
/// out of the datapath first (its future clusterIP is nobody's), then served by two pods on
/// its new clusterIP, and with `node_port` on the node's IP:nodePort too.
fn change_from_external_name(test: &str, spec: &str, port: &str, node_port: Option<&str>) {
    let Some((mut testbed, pods, client)) = node(test, 2, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    let name = "externalname-service";
    start(&mut testbed, &external_name(name, "foo.example.com"));
    wait_not_in_datapath(
        &testbed,
        "default/externalname-service",
        "CNAME to foo.example.com",
    );
    left_alone(&testbed, &client, "10.96.0.10:80");

    testbed
        .write_manifest("svc.yaml", &http_9376(name, spec, port, &pods))
        .unwrap();
    serving(&testbed, "10.96.0.10:80/TCP", &pods, 9376);
    assert_eq!(
        reach(&testbed, &client, "10.96.0.10:80", "tcp", 40),
        names(&pods)
    );
    if let Some(address) = node_port {
        assert_eq!(reach(&testbed, &client, address, "tcp", 40), names(&pods));
    }
    let entries = entries_of(&testbed, "default/externalname-service");
    assert!(
        entries.iter().all(|e| e["in_datapath"] == true),
        "{entries:?}"
    );
}

cases! {
    /// "[sig-network] Services should be able to change the type from ExternalName to ClusterIP
    /// [Conformance]" (test/e2e/network/service.go).
    should_be_able_to_change_the_type_from_external_name_to_cluster_ip: change_from_external_name("  type: ClusterIP", "{name: http, port: 80, protocol: TCP, targetPort: 9376}", None);
    /// "[sig-network] Services should be able to change the type from ExternalName to NodePort
    /// [Conformance]" (test/e2e/network/service.go).
    should_be_able_to_change_the_type_from_external_name_to_node_port: change_from_external_name("  type: NodePort", "{name: http, port: 80, protocol: TCP, targetPort: 9376, nodePort: 30400}", Some("10.244.0.1:30400"));
}

/// Upstream's ClusterIP or NodePort → ExternalName changes: a Service without pods (its
/// frontends refuse), and `externalsvc` with two; the Service becomes a CNAME to
/// externalsvc's name: its frontends are gone (the addresses are nobody's; a nodePort is
/// free for a host process to bind again), it is listed as an ExternalName, and the address
/// the name resolves to — externalsvc's clusterIP — reaches externalsvc's pods. (The DNS
/// answer itself is the cluster DNS's, not lb's.)
fn change_to_external_name(test: &str, name: &str, spec: &str, port: &str, node_port: Option<u16>) {
    let Some((mut testbed, pods, client)) = node(test, 2, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    testbed
        .write_manifest("svc.yaml", &svc(name, spec, &[port], "[]", &[]))
        .unwrap();
    testbed
        .write_manifest(
            "externalsvc.yaml",
            &serve_hostname("externalsvc", "10.96.0.20", &pods),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    serving(&testbed, "10.96.0.10:80/TCP", &[], 80);
    serving(&testbed, "10.96.0.20:80/TCP", &pods, 9376);
    refused(&testbed, &client, "10.96.0.10:80", "tcp", 1);
    if let Some(node_port) = node_port {
        refused(
            &testbed,
            &client,
            &format!("10.244.0.1:{node_port}"),
            "tcp",
            1,
        );
        let bind = host_bind(&testbed, node_port);
        assert!(
            bind.error()
                .is_some_and(|e| e.contains("Address already in use")),
            "{bind:?}"
        );
    }

    let fqdn = "externalsvc.default.svc.cluster.local";
    testbed
        .write_manifest("svc.yaml", &external_name(name, fqdn))
        .unwrap();
    wait_not_in_datapath(
        &testbed,
        &format!("default/{name}"),
        &format!("CNAME to {fqdn}"),
    );
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", None)
        .unwrap();
    left_alone(&testbed, &client, "10.96.0.10:80");
    if let Some(node_port) = node_port {
        testbed
            .wait_for_frontend(&format!("10.244.0.1:{node_port}/TCP"), None)
            .unwrap();
        let bind = host_bind(&testbed, node_port);
        assert_eq!(
            bind.peer(),
            Some(format!("0.0.0.0:{node_port}").as_str()),
            "{bind:?}"
        );
    }
    assert_eq!(
        reach(&testbed, &client, "10.96.0.20:80", "tcp", 40),
        names(&pods)
    );
}

cases! {
    /// "[sig-network] Services should be able to change the type from ClusterIP to ExternalName
    /// [Conformance]" (test/e2e/network/service.go).
    should_be_able_to_change_the_type_from_cluster_ip_to_external_name: change_to_external_name("clusterip-service", "  type: ClusterIP", "{port: 80, targetPort: 80, protocol: TCP}", None);
    /// "[sig-network] Services should be able to change the type from NodePort to ExternalName
    /// [Conformance]" (test/e2e/network/service.go): the allocated NodePort is released too.
    should_be_able_to_change_the_type_from_node_port_to_external_name: change_to_external_name("nodeport-service", "  type: NodePort", "{port: 80, targetPort: 80, protocol: TCP, nodePort: 30500}", Some(30500));
}

/// "[sig-network] Services should release NodePorts on delete" (test/e2e/network/service.go):
/// nothing listens on a NodePort (lb holds it against host binds while the Service lives,
/// without a socket); once the Service is deleted a host process can bind it, and a new
/// Service can have the same nodePort.
#[test]
fn should_release_node_ports_on_delete() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 1, 80) else {
        return;
    };
    let manifest = svc(
        "nodeport-reuse",
        "  type: NodePort",
        &["{port: 80, targetPort: 80, protocol: TCP, nodePort: 30600}"],
        &ready(&[pods[0].ip]),
        &["{port: 80, protocol: TCP}"],
    );
    start(&mut testbed, &manifest);
    serving(&testbed, "10.244.0.1:30600/TCP", &[&pods[0]], 80);
    let bind = host_bind(&testbed, 30600);
    assert!(
        bind.error()
            .is_some_and(|e| e.contains("Address already in use")),
        "{bind:?}"
    );

    testbed.remove_manifest("svc.yaml").unwrap();
    testbed
        .wait_for_frontend("10.244.0.1:30600/TCP", None)
        .unwrap();
    assert_eq!(host_bind(&testbed, 30600).peer(), Some("0.0.0.0:30600"));

    testbed.write_manifest("svc.yaml", &manifest).unwrap();
    serving(&testbed, "10.244.0.1:30600/TCP", &[&pods[0]], 80);
    assert_eq!(
        reach(&testbed, &client, "10.244.0.1:30600", "tcp", 3),
        names(&[&pods[0]])
    );
}

/// Service `name` with `spec` lines and its `port` (named http, TCP, to `target`), and its
/// slice holding `pod` with `conditions` (as the EndpointSlice controller writes them) on
/// `node`.
fn one_endpoint(
    name: &str,
    spec: &str,
    port: &str,
    target: u16,
    pod: &Pod,
    conditions: &str,
    node: &str,
) -> String {
    svc(
        name,
        spec,
        &[port],
        &endpoints(&[endpoint(pod.ip, conditions, node)]),
        &[&format!("{{name: http, port: {target}, protocol: TCP}}")],
    )
}

/// Service `name`, port 80 → 80 (a NodePort one with `node_port`), with
/// `publishNotReadyAddresses: publish`, whose only endpoint is `pod` on this node with
/// `conditions`.
fn tolerating(
    name: &str,
    node_port: Option<u16>,
    publish: bool,
    pod: &Pod,
    conditions: &str,
) -> String {
    let (spec, port) = match node_port {
        Some(node_port) => (
            format!("  type: NodePort\n  publishNotReadyAddresses: {publish}"),
            format!(
                "{{name: http, port: 80, targetPort: 80, protocol: TCP, nodePort: {node_port}}}"
            ),
        ),
        None => (
            format!("  publishNotReadyAddresses: {publish}"),
            "{name: http, port: 80, targetPort: 80, protocol: TCP}".to_owned(),
        ),
    };
    one_endpoint(name, &spec, &port, 80, pod, conditions, "node-1")
}

/// "[sig-network] Services should create endpoints for unready pods"
/// (test/e2e/network/service.go): with `publishNotReadyAddresses` the EndpointSlice
/// controller marks a pod that never gets ready as ready (not serving), and the Service
/// reaches it; once it is terminating and the Service stops tolerating unready pods it is
/// refused; tolerated again, the terminating pod answers.
#[test]
fn should_create_endpoints_for_unready_pods() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 1, 80) else {
        return;
    };
    let manifest = |publish, conditions: &str| {
        tolerating("tolerate-unready", None, publish, &pods[0], conditions)
    };
    let pod = [&pods[0]];
    // The objects as the API holds them at each step, and the pod's endpoint then.
    for (publish, conditions, terminating) in [
        // The pod never gets ready; tolerated, the controller marks it ready.
        (
            true,
            "ready: true, serving: false, terminating: false",
            Some(false),
        ),
        // Scaled to zero: the pod terminates slowly; still tolerated.
        (
            true,
            "ready: true, serving: false, terminating: true",
            Some(true),
        ),
        // No longer tolerated: neither ready nor serving.
        (
            false,
            "ready: false, serving: false, terminating: true",
            None,
        ),
        // Tolerated again: the terminating pod.
        (
            true,
            "ready: true, serving: false, terminating: true",
            Some(true),
        ),
    ] {
        testbed
            .write_manifest("svc.yaml", &manifest(publish, conditions))
            .unwrap();
        if !testbed.agent_running() {
            testbed.start_agent().unwrap();
        }
        wait_backend(&testbed, 80, terminating);
        if terminating.is_some() {
            assert_eq!(
                reach(&testbed, &client, "10.96.0.10:80", "tcp", 5),
                names(&pod)
            );
        } else {
            refused(&testbed, &client, "10.96.0.10:80", "tcp", 3);
        }
    }
}

/// Upstream's publishNotReadyAddresses cases: a NodePort Service whose only pod was deleted
/// (terminating, no longer ready to its probes): five rounds, 5 s apart upstream, of a
/// connect to the clusterIP and to the node's nodePort — answered by the pod when
/// `publish` (the controller marks it ready), refused at once otherwise.
fn terminating_and_unready_endpoints(test: &str, publish: bool) {
    let Some((mut testbed, pods, client)) = node(test, 1, 80) else {
        return;
    };
    let manifest = |conditions: &str| {
        tolerating(
            "svc-tolerate-unready",
            Some(30700),
            publish,
            &pods[0],
            conditions,
        )
    };
    let pod = [&pods[0]];
    start(&mut testbed, &manifest("ready: true"));
    serving(&testbed, "10.244.0.1:30700/TCP", &pod, 80);
    assert_eq!(
        reach(&testbed, &client, "10.96.0.10:80", "tcp", 3),
        names(&pod)
    );

    testbed
        .write_manifest(
            "svc.yaml",
            &manifest(&format!(
                "ready: {publish}, serving: false, terminating: true"
            )),
        )
        .unwrap();
    let expected: &[&Pod] = if publish { &pod } else { &[] };
    serving(&testbed, "10.244.0.1:30700/TCP", expected, 80);
    serving(&testbed, "10.96.0.10:80/TCP", expected, 80);
    for _ in 0..5 {
        for address in ["10.96.0.10:80", "10.244.0.1:30700"] {
            if publish {
                assert_eq!(reach(&testbed, &client, address, "tcp", 1), names(&pod));
            } else {
                refused(&testbed, &client, address, "tcp", 1);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

cases! {
    /// "[sig-network] Services should be able to connect to terminating and unready endpoints if
    /// PublishNotReadyAddresses is true" (test/e2e/network/service.go).
    should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publish_not_ready_addresses_is_true: terminating_and_unready_endpoints(true);
    /// "[sig-network] Services should not be able to connect to terminating and unready
    /// endpoints if PublishNotReadyAddresses is false" (test/e2e/network/service.go).
    should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publish_not_ready_addresses_is_false: terminating_and_unready_endpoints(false);
}

/// Upstream's AffinityConfirmCount: this many requests in a row to one pod show affinity.
const AFFINITY_CONFIRM_COUNT: u32 = 15;

/// Where upstream's affinity cases connect: the clusterIP, or the node's IP:nodePort.
#[derive(Clone, Copy)]
enum Via {
    ClusterIp,
    NodePort,
}

/// A serve-hostname Service of three pods reached `via`, whose `affinity` spec lines
/// (`sessionAffinity`, `sessionAffinityConfig`) are given; returns the node, a client pod,
/// the address to connect to and a manifest for other affinity lines (`None`: skipped).
fn affinity_service(
    test: &str,
    name: &'static str,
    via: Via,
    affinity: &str,
) -> Option<(Testbed, Pod, String, impl Fn(&str) -> String)> {
    let (mut testbed, pods, client) = node(test, 3, 9376)?;
    let (spec, port, address) = match via {
        Via::ClusterIp => (
            "  type: ClusterIP",
            "{port: 80, targetPort: 9376, protocol: TCP}",
            "10.96.0.10:80",
        ),
        Via::NodePort => (
            "  type: NodePort",
            "{port: 80, targetPort: 9376, protocol: TCP, nodePort: 30800}",
            "10.244.0.1:30800",
        ),
    };
    let ips = ips(&pods.iter().collect::<Vec<_>>());
    let manifest = move |affinity: &str| {
        svc(
            name,
            &format!("{spec}\n{affinity}"),
            &[port],
            &ready(&ips),
            &["{port: 9376, protocol: TCP}"],
        )
    };
    start(&mut testbed, &manifest(affinity));
    let pods: Vec<&Pod> = pods.iter().collect();
    serving(&testbed, &format!("{address}/TCP"), &pods, 9376);
    // Upstream's CheckServiceReachability, before the affinity checks.
    assert_eq!(reach(&testbed, &client, address, "tcp", 1).len(), 1);
    Some((testbed, client, address.to_owned(), manifest))
}

/// Upstream's checkAffinity: AffinityConfirmCount requests in a row all reach one pod when
/// affinity should hold, and not all one pod when it should not (tried up to three times:
/// 15 fresh choices among three pods all alike is 3^-14).
fn check_affinity(testbed: &Testbed, client: &Pod, address: &str, should_hold: bool) {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let probes = testbed
            .probe(client, address, AFFINITY_CONFIRM_COUNT)
            .unwrap();
        assert_all_answered(&probes);
        let holds = hostnames(&probes).len() == 1;
        if holds == should_hold {
            return;
        }
        seen.push(hostnames(&probes));
    }
    panic!("affinity should hold: {should_hold}; pods answering each round: {seen:?}");
}

/// Waits until `lb services` shows the frontend at `address` with affinity `timeout_s` (0:
/// none).
fn wait_for_affinity(testbed: &Testbed, address: &str, timeout_s: u64) {
    let (ip, port) = address.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    wait_for_entry(
        testbed,
        &format!("affinity {timeout_s}s on {address}"),
        |e| e["address"] == ip && e["port"] == port && e["affinity_timeout_s"] == timeout_s,
    );
}

/// What an affinity case checks, after upstream's helpers.
#[derive(Clone, Copy)]
enum Check {
    /// execAffinityTestForNonLBService: with `sessionAffinity: ClientIP` (the default
    /// timeout, three hours) a client's requests all reach one pod.
    Holds,
    /// execAffinityTestForSessionAffinityTimeout, with a 1 s timeout instead of 125 s: sticky
    /// while the client keeps connecting within it; past it the choice is made afresh, so
    /// across pauses longer than the timeout other pods answer (twenty fresh choices among
    /// three pods all alike: 3^-19).
    TimesOut,
    /// execAffinityTestForNonLBServiceWithTransition: affinity on, switched off (the client's
    /// requests spread), and on again (they stick).
    Switches,
}

/// Upstream's affinity cases for a Service `name` of three pods reached `via`.
fn affinity(test: &str, name: &'static str, via: Via, check: Check) {
    let (spec, timeout_s) = match check {
        Check::TimesOut => (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}",
            1,
        ),
        Check::Holds | Check::Switches => ("  sessionAffinity: ClientIP", 10_800),
    };
    let Some((testbed, client, address, manifest)) = affinity_service(test, name, via, spec) else {
        return;
    };
    wait_for_affinity(&testbed, &address, timeout_s);
    let hits = testbed.stat("affinity_hit").unwrap();
    check_affinity(&testbed, &client, &address, true);
    assert!(testbed.stat("affinity_hit").unwrap() >= hits + u64::from(AFFINITY_CONFIRM_COUNT) - 1);
    match check {
        Check::Holds => {}
        Check::TimesOut => {
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                seen.extend(reach(&testbed, &client, &address, "tcp", 1));
                if seen.len() > 1 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1300));
            }
            panic!("the session stayed sticky past its timeout: {seen:?}");
        }
        Check::Switches => {
            for (affinity, timeout_s, holds) in [("None", 0, false), ("ClientIP", 10_800, true)] {
                testbed
                    .write_manifest(
                        "svc.yaml",
                        &manifest(&format!("  sessionAffinity: {affinity}")),
                    )
                    .unwrap();
                wait_for_affinity(&testbed, &address, timeout_s);
                check_affinity(&testbed, &client, &address, holds);
            }
        }
    }
}

cases! {
    /// "[sig-network] Services should have session affinity work for service with type
    /// clusterIP [LinuxOnly] [Conformance]" (test/e2e/network/service.go).
    should_have_session_affinity_work_for_service_with_type_cluster_ip: affinity("affinity-clusterip", Via::ClusterIp, Check::Holds);
    /// "[sig-network] Services should have session affinity timeout work for service with
    /// type clusterIP [LinuxOnly]" (test/e2e/network/service.go).
    should_have_session_affinity_timeout_work_for_service_with_type_cluster_ip: affinity("affinity-clusterip-timeout", Via::ClusterIp, Check::TimesOut);
    /// "[sig-network] Services should be able to switch session affinity for service with
    /// type clusterIP [LinuxOnly] [Conformance]" (test/e2e/network/service.go).
    should_be_able_to_switch_session_affinity_for_service_with_type_cluster_ip: affinity("affinity-clusterip-transition", Via::ClusterIp, Check::Switches);
    /// "[sig-network] Services should have session affinity work for NodePort service
    /// [LinuxOnly] [Conformance]" (test/e2e/network/service.go).
    should_have_session_affinity_work_for_node_port_service: affinity("affinity-nodeport", Via::NodePort, Check::Holds);
    /// "[sig-network] Services should have session affinity timeout work for NodePort service
    /// [LinuxOnly]" (test/e2e/network/service.go).
    should_have_session_affinity_timeout_work_for_node_port_service: affinity("affinity-nodeport-timeout", Via::NodePort, Check::TimesOut);
    /// "[sig-network] Services should be able to switch session affinity for NodePort service
    /// [LinuxOnly] [Conformance]" (test/e2e/network/service.go).
    should_be_able_to_switch_session_affinity_for_node_port_service: affinity("affinity-nodeport-transition", Via::NodePort, Check::Switches);
}

/// Upstream's label cases: `service-disabled` carries `label` from the start and is never
/// up; `toggled` is up, goes down when it gets the label and up again when it loses it.
/// `on_slices`: the EndpointSlice controller copies the label onto the Service's slices (it
/// does for `service-proxy-name`; it keeps `headless` off the slices of a Service with a
/// clusterIP). `why` is how `lb services` lists a labelled Service.
fn label_leaves_the_service_alone(
    test: &str,
    disabled: &str,
    toggled: &str,
    label: &str,
    on_slices: bool,
    why: &str,
) {
    let Some((mut testbed, pods, client)) = node(test, 6, 9376) else {
        return;
    };
    let pods: Vec<&Pod> = pods.iter().collect();
    let (disabled_pods, toggled_pods) = (&pods[0..3], &pods[3..6]);
    let manifest = |name: &str, ip: &str, pods: &[&Pod], labelled_now: bool| {
        let svc = serve_hostname(name, ip, pods);
        let (service_part, slice_part) = svc.split_at(svc.find("---").unwrap());
        if !labelled_now {
            return svc;
        }
        let slice_part = if on_slices {
            labelled(slice_part, label)
        } else {
            slice_part.to_owned()
        };
        labelled(service_part, label) + &slice_part
    };
    testbed
        .write_manifest(
            "disabled.yaml",
            &manifest(disabled, "10.96.0.11", disabled_pods, true),
        )
        .unwrap();
    let toggle = |testbed: &Testbed, labelled_now| {
        let manifest = manifest(toggled, "10.96.0.12", toggled_pods, labelled_now);
        testbed.write_manifest("toggled.yaml", &manifest).unwrap();
    };
    toggle(&testbed, false);
    testbed.start_agent().unwrap();
    serving(&testbed, "10.96.0.12:80/TCP", toggled_pods, 9376);
    wait_not_in_datapath(&testbed, &format!("default/{disabled}"), why);
    verify_up(&testbed, &client, "10.96.0.12:80", toggled_pods);
    verify_down(&testbed, "10.96.0.11:80");

    toggle(&testbed, true);
    testbed
        .wait_for_frontend("10.96.0.12:80/TCP", None)
        .unwrap();
    wait_not_in_datapath(&testbed, &format!("default/{toggled}"), why);
    verify_down(&testbed, "10.96.0.12:80");

    toggle(&testbed, false);
    serving(&testbed, "10.96.0.12:80/TCP", toggled_pods, 9376);
    verify_up(&testbed, &client, "10.96.0.12:80", toggled_pods);
    verify_down(&testbed, "10.96.0.11:80");
}

cases! {
    /// "[sig-network] Services should implement service.kubernetes.io/service-proxy-name"
    /// (test/e2e/network/service.go): a Service another proxy implements is left alone.
    should_implement_service_kubernetes_io_service_proxy_name: label_leaves_the_service_alone("service-proxy-disabled", "service-proxy-toggled", "service.kubernetes.io/service-proxy-name: foo-bar", true, "service.kubernetes.io/service-proxy-name: \"foo-bar\" implements it, not lb");
    /// "[sig-network] Services should implement service.kubernetes.io/headless"
    /// (test/e2e/network/service.go): a Service labelled headless is left alone, clusterIP or
    /// not, as kube-proxy's selector leaves it out.
    should_implement_service_kubernetes_io_headless: label_leaves_the_service_alone("service-headless", "service-headless-toggled", "service.kubernetes.io/headless: \"\"", false, "labelled headless");
}

/// "[sig-network] Services should be rejected when no endpoints exist"
/// (test/e2e/network/service.go): a Service without pods (an empty slice, as the controller
/// writes it) refuses a connect at once — ECONNREFUSED, not a timeout; so does one whose
/// only endpoint neither is ready nor serves, and a UDP one, for datagrams.
#[test]
fn should_be_rejected_when_no_endpoints_exist() {
    let Some((testbed, _pods, client)) = started(test_name!(), 1, 8080, |pods| {
        svc(
            "no-pods",
            "",
            &["{port: 80, targetPort: 80, protocol: TCP}"],
            "[]",
            &[],
        ) + "---\n"
            + &one_endpoint(
                "not-serving",
                "",
                "{name: http, port: 80, targetPort: 8080, protocol: TCP}",
                8080,
                &pods[0],
                "ready: false, serving: false, terminating: true",
                "node-1",
            )
            .replace(VIP, "10.96.0.11")
            + "---\n"
            + &service(
                "dns",
                "10.96.0.53",
                "",
                &["{name: p, port: 53, targetPort: 8080, protocol: UDP}"],
            )
            + &endpoint_slice("dns", "dns-abcde", "[]", &[])
    }) else {
        return;
    };
    serving(&testbed, "10.96.0.10:80/TCP", &[], 80);
    serving(&testbed, "10.96.0.11:80/TCP", &[], 8080);
    serving(&testbed, "10.96.0.53:53/UDP", &[], 8080);

    refused(&testbed, &client, "10.96.0.10:80", "tcp", 3);
    refused(&testbed, &client, "10.96.0.11:80", "tcp", 2);
    refused(&testbed, &client, "10.96.0.53:53", "udp", 2);
    assert_eq!(testbed.stat("no_backends").unwrap(), 7);
}

/// "[sig-network] Services should be rejected for evicted pods (no endpoints exist)"
/// (test/e2e/network/service.go): with `publishNotReadyAddresses`, an evicted pod is no
/// endpoint (the controller leaves it out); the Service refuses at once.
#[test]
fn should_be_rejected_for_evicted_pods_no_endpoints_exist() {
    let Some((testbed, _pods, client)) = started(test_name!(), 0, 80, |_| {
        svc(
            "evicted-pods",
            "  publishNotReadyAddresses: true",
            &["{port: 80, targetPort: 80, protocol: TCP}"],
            "[]",
            &[],
        )
    }) else {
        return;
    };
    serving(&testbed, "10.96.0.10:80/TCP", &[], 80);
    refused(&testbed, &client, "10.96.0.10:80", "tcp", 3);
    assert_eq!(testbed.stat("no_backends").unwrap(), 3);
}

/// Upstream's internalTrafficPolicy=Local cases, the Service on `port`, from a pod (a host
/// process with `from_host`): with the webserver on this node (and another on node-2) five
/// connects all reach the local one; from a node without an endpoint of its own — here, the
/// webserver's `nodeName` another node's — five fail, at once (refused and counted), where
/// kube-proxy drops them.
fn internal_traffic_policy_local(test: &str, port: u16, from_host: bool) {
    let Some((mut testbed, pods, pod)) = node(test, 2, port) else {
        return;
    };
    let client = if from_host { testbed.node() } else { pod };
    let manifest = |nodes: [&str; 2]| {
        svc(
            "svc-itp",
            "  internalTrafficPolicy: Local",
            &[&format!(
                "{{name: http, port: {port}, protocol: TCP, targetPort: {port}}}"
            )],
            &endpoints(&[
                endpoint(pods[0].ip, "ready: true", nodes[0]),
                endpoint(pods[1].ip, "ready: true", nodes[1]),
            ]),
            &[&format!("{{name: http, port: {port}, protocol: TCP}}")],
        )
    };
    start(&mut testbed, &manifest(["node-1", "node-2"]));
    let frontend = format!("10.96.0.10:{port}/TCP");
    let address = format!("10.96.0.10:{port}");
    serving(&testbed, &frontend, &[&pods[0]], port);
    five_times(&testbed, &client, &address, &pods[0]);

    testbed
        .write_manifest("svc.yaml", &manifest(["node-2", "node-3"]))
        .unwrap();
    serving(&testbed, &frontend, &[], port);
    refused(&testbed, &client, &address, "tcp", 5);
    assert_eq!(testbed.stat("no_local_backends").unwrap(), 5);
}

cases! {
    /// "[sig-network] Services should respect internalTrafficPolicy=Local Pod to Pod"
    /// (test/e2e/network/service.go).
    should_respect_internal_traffic_policy_local_pod_to_pod: internal_traffic_policy_local(80, false);
    /// "[sig-network] Services should respect internalTrafficPolicy=Local Pod (hostNetwork:
    /// true) to Pod" (test/e2e/network/service.go): the client is a host process of the node.
    should_respect_internal_traffic_policy_local_pod_host_network_true_to_pod: internal_traffic_policy_local(8000, true);
}

/// "[sig-network] Services should respect internalTrafficPolicy=Local Pod and Node, to Pod
/// (hostNetwork: true)" (test/e2e/network/service.go): the webserver is a hostNetwork pod —
/// its endpoint is the node's own address, port 10180 — and a pod and a host process of the
/// node both reach it through the Service (it answers with the node's name); from a node
/// without it both fail at once.
#[test]
fn should_respect_internal_traffic_policy_local_pod_and_node_to_pod_host_network_true() {
    let Some((mut testbed, _pods, client)) = node(test_name!(), 0, 80) else {
        return;
    };
    let host = testbed.node();
    testbed.serve_httpenv(&host, 10180).unwrap();
    let manifest = |node: &str| {
        one_endpoint(
            "svc-itp",
            "  internalTrafficPolicy: Local",
            "{name: http, port: 80, protocol: TCP, targetPort: 10180}",
            10180,
            &host,
            "ready: true",
            node,
        )
    };
    start(&mut testbed, &manifest("node-1"));
    serving(&testbed, "10.96.0.10:80/TCP", &[&host], 10180);
    for from in [&client, &host] {
        five_times(&testbed, from, "10.96.0.10:80", &host);
    }

    testbed
        .write_manifest("svc.yaml", &manifest("node-2"))
        .unwrap();
    serving(&testbed, "10.96.0.10:80/TCP", &[], 10180);
    for from in [&client, &host] {
        refused(&testbed, from, "10.96.0.10:80", "tcp", 5);
    }
}

/// "[sig-network] Services should fallback to terminating endpoints when there are no ready
/// endpoints with internalTrafficPolicy=Cluster" (test/e2e/network/service.go): a
/// terminating endpoint that still serves is not used while a ready one exists; once the
/// last ready one goes, it takes the traffic.
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster()
 {
    let Some((mut testbed, pods, client)) = node(test_name!(), 2, 80) else {
        return;
    };
    let terminating = endpoint(
        pods[0].ip,
        "ready: false, serving: true, terminating: true",
        "node-1",
    );
    let manifest = |ready_too: bool| {
        let mut items = vec![terminating.clone()];
        if ready_too {
            items.push(endpoint(pods[1].ip, "ready: true", "node-2"));
        }
        svc(
            "svc-proxy-terminating",
            "",
            &["{name: http, port: 80, protocol: TCP, targetPort: 80}"],
            &endpoints(&items),
            &["{name: http, port: 80, protocol: TCP}"],
        )
    };
    start(&mut testbed, &manifest(true));
    serving(&testbed, "10.96.0.10:80/TCP", &[&pods[1]], 80);
    assert_eq!(
        reach(&testbed, &client, "10.96.0.10:80", "tcp", 10),
        names(&[&pods[1]])
    );

    // The last ready pod goes away: the terminating one that still serves takes over.
    testbed
        .write_manifest("svc.yaml", &manifest(false))
        .unwrap();
    serving(&testbed, "10.96.0.10:80/TCP", &[&pods[0]], 80);
    five_times(&testbed, &client, "10.96.0.10:80", &pods[0]);
}

/// "[sig-network] Services should fallback to local terminating endpoints when there are no
/// ready endpoints with internalTrafficPolicy=Local" (test/e2e/network/service.go): this
/// node's only endpoint is terminating but serves: it takes the traffic, even while a ready
/// endpoint exists on another node; a node without it refuses at once.
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local()
 {
    let Some((mut testbed, pods, client)) = node(test_name!(), 2, 80) else {
        return;
    };
    let manifest = |web0: &str, web0_node: &str| {
        svc(
            "svc-proxy-terminating",
            "  internalTrafficPolicy: Local",
            &["{name: http, port: 80, protocol: TCP, targetPort: 80}"],
            &endpoints(&[
                endpoint(pods[0].ip, web0, web0_node),
                endpoint(pods[1].ip, "ready: true", "node-2"),
            ]),
            &["{name: http, port: 80, protocol: TCP}"],
        )
    };
    let terminating = "ready: false, serving: true, terminating: true";
    start(&mut testbed, &manifest("ready: true", "node-1"));
    serving(&testbed, "10.96.0.10:80/TCP", &[&pods[0]], 80);

    testbed
        .write_manifest("svc.yaml", &manifest(terminating, "node-1"))
        .unwrap();
    wait_backend(&testbed, 80, Some(true));
    five_times(&testbed, &client, "10.96.0.10:80", &pods[0]);

    testbed
        .write_manifest("svc.yaml", &manifest(terminating, "node-3"))
        .unwrap();
    serving(&testbed, "10.96.0.10:80/TCP", &[], 80);
    refused(&testbed, &client, "10.96.0.10:80", "tcp", 5);
}

/// Upstream's externalTrafficPolicy fallback cases, the half on this node: a NodePort
/// Service whose only pod, on this node, is terminating but serves; a pod of this node
/// reaches it five times through this node's nodePort. (Upstream also connects from a pod of
/// another node to this node's nodePort, and with `Local` from this node's pod to another
/// node's nodePort: that traffic arrives from off the node, which a socket-level load
/// balancer does not see.)
fn fallback_to_terminating_through_the_node_port(test: &str, policy: &str) {
    let Some((mut testbed, pods, client)) = node(test, 1, 80) else {
        return;
    };
    let manifest = |conditions: &str| {
        one_endpoint(
            "svc-proxy-terminating",
            &format!("  type: NodePort\n  externalTrafficPolicy: {policy}"),
            "{name: http, port: 80, protocol: TCP, targetPort: 80, nodePort: 30900}",
            80,
            &pods[0],
            conditions,
            "node-1",
        )
    };
    start(&mut testbed, &manifest("ready: true"));
    serving(&testbed, "10.244.0.1:30900/TCP", &[&pods[0]], 80);
    testbed
        .write_manifest(
            "svc.yaml",
            &manifest("ready: false, serving: true, terminating: true"),
        )
        .unwrap();
    wait_backend(&testbed, 30900, Some(true));
    five_times(&testbed, &client, "10.244.0.1:30900", &pods[0]);
}

cases! {
    /// "[sig-network] Services should fallback to terminating endpoints when there are no ready
    /// endpoints with externallTrafficPolicy=Cluster" (test/e2e/network/service.go; the typo is
    /// upstream's).
    should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_externall_traffic_policy_cluster: fallback_to_terminating_through_the_node_port("Cluster");
    /// "[sig-network] Services should fallback to local terminating endpoints when there are no
    /// ready endpoints with externalTrafficPolicy=Local" (test/e2e/network/service.go).
    should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_external_traffic_policy_local: fallback_to_terminating_through_the_node_port("Local");
}

/// "[sig-network] Services should serve endpoints on same port and different protocols
/// [Conformance]" (test/e2e/network/service.go): TCP and UDP on port 80 both forward; with
/// only the TCP port left, TCP forwards and UDP is refused; with only UDP, the other way
/// round. (Cilium's kind conformance job skips this case.)
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 1, 80) else {
        return;
    };
    let tcp = "{name: tcp-port, port: 80, targetPort: 80, protocol: TCP}";
    let udp = "{name: udp-port, port: 80, targetPort: 80, protocol: UDP}";
    let manifest = |ports: &[&str]| {
        let slice_ports: Vec<String> = ports
            .iter()
            .map(|p| p.replace(", targetPort: 80", ""))
            .collect();
        let slice_ports: Vec<&str> = slice_ports.iter().map(String::as_str).collect();
        labelled(
            &service("multiprotocol-test", VIP, "  type: ClusterIP", ports),
            "app: multiport",
        ) + &endpoint_slice(
            "multiprotocol-test",
            "multiprotocol-test-abcde",
            &ready(&[pods[0].ip]),
            &slice_ports,
        )
    };
    let pod = names(&[&pods[0]]);
    start(&mut testbed, &manifest(&[tcp, udp]));
    serving(&testbed, "10.96.0.10:80/UDP", &[&pods[0]], 80);
    serving(&testbed, "10.96.0.10:80/TCP", &[&pods[0]], 80);
    assert_eq!(reach(&testbed, &client, "10.96.0.10:80", "tcp", 3), pod);
    assert_eq!(reach(&testbed, &client, "10.96.0.10:80", "udp", 3), pod);

    testbed
        .write_manifest("svc.yaml", &manifest(&[tcp]))
        .unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/UDP", None)
        .unwrap();
    assert_eq!(reach(&testbed, &client, "10.96.0.10:80", "tcp", 3), pod);
    refused(&testbed, &client, "10.96.0.10:80", "udp", 2);
    refused(&testbed, &client, "10.96.0.10:80", "connected-udp", 2);

    testbed
        .write_manifest("svc.yaml", &manifest(&[udp]))
        .unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", None)
        .unwrap();
    serving(&testbed, "10.96.0.10:80/UDP", &[&pods[0]], 80);
    assert_eq!(reach(&testbed, &client, "10.96.0.10:80", "udp", 3), pod);
    // The protocol is part of the frontend: on a clusterIP, a protocol the Service lacks
    // is refused at once, as a port no Service has.
    refused(&testbed, &client, "10.96.0.10:80", "tcp", 2);
    assert_eq!(testbed.stat("unknown_port").unwrap(), 6);
}

/// "[sig-network] Services should serve endpoints on same port and different protocol for
/// internal traffic on Type LoadBalancer " (test/e2e/network/service.go; the trailing space
/// is upstream's): a LoadBalancer Service with TCP and UDP on port 80 (named target ports,
/// 100 in the pod), before any load balancer exists: the clusterIP and the two nodePorts
/// answer their protocol.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocol_for_internal_traffic_on_type_load_balancer()
 {
    let Some((testbed, pods, client)) = started(test_name!(), 1, 100, |pods| {
        svc(
            "multiprotocol-lb-test",
            "  type: LoadBalancer",
            &[
                "{name: portname1, port: 80, targetPort: svc1, protocol: TCP, nodePort: 30081}",
                "{name: portname2, port: 80, targetPort: svc2, protocol: UDP, nodePort: 30082}",
            ],
            &ready(&[pods[0].ip]),
            &[
                "{name: portname1, port: 100, protocol: TCP}",
                "{name: portname2, port: 100, protocol: UDP}",
            ],
        )
    }) else {
        return;
    };
    serving(&testbed, "10.244.0.1:30082/UDP", &[&pods[0]], 100);
    let pod = names(&[&pods[0]]);
    for (address, mode) in [
        ("10.96.0.10:80", "tcp"),
        ("10.96.0.10:80", "udp"),
        ("10.244.0.1:30081", "tcp"),
        ("10.244.0.1:30082", "udp"),
    ] {
        assert_eq!(
            reach(&testbed, &client, address, mode, 3),
            pod,
            "{address} {mode}"
        );
    }
}

/// Upstream's "should be able to change the type and ports of a TCP/UDP service" (a cloud
/// load balancer here is the ingress IP its controller writes into the Service's status): a
/// ClusterIP Service of one pod becomes NodePort, then LoadBalancer; its nodePort changes,
/// then its port; scaled to zero its load balancer refuses, scaled to one it answers; back
/// to ClusterIP, the nodePort and the load-balancer IP are nobody's again.
fn change_the_type_and_ports(test: &str, protocol: &str, mode: &str) {
    let Some((mut testbed, pods, client)) = node(test, 1, 80) else {
        return;
    };
    let pod = names(&[&pods[0]]);
    let lb_ip = "198.51.100.10";
    let manifest = |spec: &str, port: u16, node_port: Option<u16>, status: bool, scale: usize| {
        let node_port = node_port
            .map(|n| format!(", nodePort: {n}"))
            .unwrap_or_default();
        let status = if status {
            format!("status:\n  loadBalancer:\n    ingress:\n    - {{ip: {lb_ip}}}\n")
        } else {
            String::new()
        };
        service(
            "mutability-test",
            VIP,
            spec,
            &[&format!(
                "{{port: {port}, targetPort: 80, protocol: {protocol}{node_port}}}"
            )],
        ) + &status
            + &endpoint_slice(
                "mutability-test",
                "mutability-test-abcde",
                &ready(&[pods[0].ip][..scale]),
                &[&format!("{{port: 80, protocol: {protocol}}}")],
            )
    };
    let at = |ip: &str, port: u16| format!("{ip}:{port}");
    let frontend = |ip: &str, port: u16| format!("{ip}:{port}/{protocol}");
    let answer = |testbed: &Testbed, addresses: &[String]| {
        for address in addresses {
            assert_eq!(reach(testbed, &client, address, mode, 3), pod, "{address}");
        }
    };
    // Writes the Service as the API then holds it, and waits until the frontend the step
    // brings (the load balancer's, else the nodePort's, else the clusterIP's) has its pods.
    let set = |testbed: &Testbed, spec, port, node_port: Option<u16>, balancer, scale| {
        testbed
            .write_manifest(
                "svc.yaml",
                &manifest(spec, port, node_port, balancer, scale),
            )
            .unwrap();
        let newest = match (balancer, node_port) {
            (true, _) => frontend(lb_ip, port),
            (false, Some(node_port)) => frontend("10.244.0.1", node_port),
            (false, None) => frontend(VIP, port),
        };
        serving(testbed, &newest, &[&pods[0]][..scale], 80);
    };
    let gone = |testbed: &Testbed, ip: &str, port: u16| {
        testbed
            .wait_for_frontend(&frontend(ip, port), None)
            .unwrap();
    };
    let (cluster_ip, load_balancer) = ("  type: ClusterIP", "  type: LoadBalancer");

    start(&mut testbed, &manifest(cluster_ip, 80, None, false, 1));
    set(&testbed, cluster_ip, 80, None, false, 1);
    answer(&testbed, &[at(VIP, 80)]);

    set(&testbed, "  type: NodePort", 80, Some(30300), false, 1);
    answer(&testbed, &[at(VIP, 80), at("10.244.0.1", 30300)]);

    set(&testbed, load_balancer, 80, Some(30300), true, 1);
    answer(
        &testbed,
        &[at(VIP, 80), at("10.244.0.1", 30300), at(lb_ip, 80)],
    );

    // A new nodePort: the old one is nobody's.
    set(&testbed, load_balancer, 80, Some(30301), true, 1);
    gone(&testbed, "10.244.0.1", 30300);
    answer(&testbed, &[at(lb_ip, 80), at("10.244.0.1", 30301)]);

    // A new port: the load balancer answers on it, not on the old one.
    set(&testbed, load_balancer, 81, Some(30301), true, 1);
    gone(&testbed, lb_ip, 80);
    answer(&testbed, &[at(lb_ip, 81), at(VIP, 81)]);

    // Scaled to zero: refused at once (upstream's UDP case looks for the ICMP reject);
    // scaled to one: answered again.
    set(&testbed, load_balancer, 81, Some(30301), true, 0);
    refused(&testbed, &client, &at(lb_ip, 81), mode, 2);
    set(&testbed, load_balancer, 81, Some(30301), true, 1);
    answer(&testbed, &[at(lb_ip, 81), at("10.244.0.1", 30301)]);

    // Back to ClusterIP: the nodePort is cleared and the load balancer destroyed.
    set(&testbed, cluster_ip, 81, None, false, 1);
    gone(&testbed, lb_ip, 81);
    gone(&testbed, "10.244.0.1", 30301);
    answer(&testbed, &[at(VIP, 81)]);
    let closed = testbed
        .probe_with(&client, &at(lb_ip, 81), 1, &["--mode", mode])
        .unwrap();
    assert!(
        closed[0].error().is_some_and(|e| e.contains("unreachable")),
        "{closed:?}"
    );
}

cases! {
    /// "[sig-network] LoadBalancers should be able to change the type and ports of a TCP service
    /// [Slow]" (test/e2e/network/loadbalancer.go).
    should_be_able_to_change_the_type_and_ports_of_a_tcp_service: change_the_type_and_ports("TCP", "tcp");
    /// "[sig-network] LoadBalancers should be able to change the type and ports of a UDP service
    /// [Slow]" (test/e2e/network/loadbalancer.go).
    should_be_able_to_change_the_type_and_ports_of_a_udp_service: change_the_type_and_ports("UDP", "udp");
}

/// "[sig-network] LocalhostNodePorts should proxy localhost NodePort traffic to backends
/// across nodes [Feature:LocalhostNodePorts]" (test/e2e/network/localhost_nodeports.go): a
/// host process's `127.0.0.1:nodePort` spreads over a local and a remote backend; the
/// node's IP and the clusterIP answer from the node too. In a pod, 127.0.0.1 is the pod's
/// own loopback, left alone, while the node's IP reaches the Service.
#[test]
fn should_proxy_localhost_node_port_traffic_to_backends_across_nodes() {
    let Some((testbed, pods, client)) = started(test_name!(), 2, 9376, |pods| {
        svc(
            "agnhost-localhost-nodeport",
            "  type: NodePort",
            &["{port: 9000, targetPort: 9376, protocol: TCP, nodePort: 31642}"],
            &endpoints(&[
                endpoint(pods[0].ip, "ready: true", "node-1"),
                endpoint(pods[1].ip, "ready: true", "node-2"),
            ]),
            &["{port: 9376, protocol: TCP}"],
        )
    }) else {
        return;
    };
    let both: Vec<&Pod> = pods.iter().collect();
    serving(&testbed, "127.0.0.1:31642/TCP", &both, 9376);
    let host = testbed.node();
    check_affinity(&testbed, &host, "127.0.0.1:31642", false);
    for address in ["127.0.0.1:31642", "10.244.0.1:31642", "10.96.0.10:9000"] {
        assert_eq!(
            reach(&testbed, &host, address, "tcp", 40),
            names(&both),
            "{address}"
        );
    }
    assert_eq!(
        reach(&testbed, &client, "10.244.0.1:31642", "tcp", 40),
        names(&both)
    );
    refused(&testbed, &client, "127.0.0.1:31642", "tcp", 1);
}

/// "[sig-network] LocalhostNodePorts should honor sessionAffinity=ClientIP for localhost
/// NodePort [Feature:LocalhostNodePorts]" (test/e2e/network/localhost_nodeports.go).
#[test]
fn should_honor_session_affinity_client_ip_for_localhost_node_port() {
    let Some((mut testbed, pods, _client)) = node(test_name!(), 3, 9376) else {
        return;
    };
    let all: Vec<&Pod> = pods.iter().collect();
    start(
        &mut testbed,
        &svc(
            "agnhost-sticky-localhost",
            "  type: NodePort\n  sessionAffinity: ClientIP\n  \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}}",
            &["{port: 9000, targetPort: 9376, protocol: TCP, nodePort: 31643}"],
            &ready(&ips(&all)),
            &["{port: 9376, protocol: TCP}"],
        ),
    );
    serving(&testbed, "127.0.0.1:31643/TCP", &all, 9376);
    check_affinity(&testbed, &testbed.node(), "127.0.0.1:31643", true);
}

/// Upstream's UDP client: `nc -u` to the Service every few seconds, a new socket each time
/// (connected, as nc's), while the server pods cycle; here every 50 ms, at most 600 times
/// or 30 s.
fn udp_client(testbed: &Testbed, client: &Pod, address: &str) -> Prober {
    testbed
        .background_prober_with(
            client,
            address,
            600,
            50,
            30_000,
            &["--mode", "connected-udp", "--timeout-ms", "500"],
        )
        .unwrap()
}

/// When a change of the Service was written, and when the maps had it.
#[derive(Clone, Copy)]
struct Change {
    written: u64,
    applied: u64,
}

/// Writes the Service's manifest and waits until `frontend` has `pods` (on 80); then lets
/// the client send for a while.
fn cycle(testbed: &Testbed, manifest: &str, frontend: &str, pods: &[&Pod]) -> Change {
    let written = monotonic_ns();
    testbed.write_manifest("svc.yaml", manifest).unwrap();
    serving(testbed, frontend, pods, 80);
    let applied = monotonic_ns();
    std::thread::sleep(Duration::from_millis(700));
    Change { written, applied }
}

/// The attempts that started in `from..to`; fails if there are fewer than five (too few
/// to tell).
fn attempts(probes: &[TimedProbe], from: u64, to: u64) -> Vec<Probe> {
    let within: Vec<Probe> = probes
        .iter()
        .filter(|p| (from..to).contains(&p.at_ns))
        .map(|p| p.probe.clone())
        .collect();
    assert!(within.len() >= 5, "too few attempts to tell: {within:?}");
    within
}

/// The UDP Service of upstream's conntrack cases (`svc-udp`, port 80) with `spec` lines and
/// `port` (nodePort included), and its slice with `items` endpoints.
fn svc_udp(spec: &str, port: &str, items: &[String]) -> String {
    svc(
        "svc-udp",
        spec,
        &[port],
        &endpoints(items),
        &["{name: udp, port: 80, protocol: UDP}"],
    )
}

/// Upstream's "should be able to preserve UDP traffic when server pod cycles" steps: the
/// client sends from before the Service has any endpoint (refused at once); pod-server-1
/// comes and answers; pod-server-2 comes and pod-server-1 goes: from then on pod-server-2
/// answers every attempt. With `connected_socket`, also one socket connected once while
/// pod-server-1 serves, and another program's socket connected to pod-server-1's own address:
/// when pod-server-1 leaves the Service, the first is terminated by the agent (the
/// application's next call fails at once, its next socket reaches pod-server-2) and the
/// second is left alone.
fn preserve_udp_traffic(
    test: &str,
    spec: &str,
    port: &str,
    address: &str,
    from_host: bool,
    connected_socket: bool,
) {
    let Some((mut testbed, pods, pod_client)) = node(test, 2, 80) else {
        return;
    };
    let client = if from_host {
        testbed.node()
    } else {
        pod_client
    };
    let frontend = format!("{address}/UDP");
    let manifest = |pods: &[&Pod]| {
        let items: Vec<String> = pods
            .iter()
            .map(|p| endpoint(p.ip, "ready: true", "node-1"))
            .collect();
        svc_udp(spec, port, &items)
    };
    start(&mut testbed, &manifest(&[]));
    serving(&testbed, &frontend, &[], 80);
    let prober = udp_client(&testbed, &client, address);
    std::thread::sleep(Duration::from_millis(700));

    let first_in = cycle(&testbed, &manifest(&[&pods[0]]), &frontend, &[&pods[0]]);
    let kept = connected_socket.then(|| {
        let (translated, first) = testbed
            .one_socket_prober(&client, address, "connected-udp", 20, 8000)
            .unwrap();
        assert_eq!(first.hostname(), Some("web-0"), "{first:?}");
        let direct = testbed
            .background_prober_with(
                &client,
                "10.244.0.10:80",
                1_000,
                20,
                5000,
                &["--mode", "connected-udp", "--same-socket"],
            )
            .unwrap();
        (translated, direct)
    });
    let both_in = cycle(
        &testbed,
        &manifest(&[&pods[0], &pods[1]]),
        &frontend,
        &[&pods[0], &pods[1]],
    );
    let second_only = cycle(&testbed, &manifest(&[&pods[1]]), &frontend, &[&pods[1]]);
    let probes = finish_timed_probes(prober).unwrap();

    assert_refused(&attempts(&probes, 0, first_in.written));
    let first = attempts(&probes, first_in.applied, both_in.written);
    assert!(all_from(&first, "web-0"), "{first:?}");
    let last = attempts(&probes, second_only.applied, u64::MAX);
    assert!(all_from(&last, "web-1"), "{last:?}");

    if let Some((translated, direct)) = kept {
        let after = testbed
            .attempts_until_terminated(translated, Duration::from_secs(5))
            .unwrap();
        // Answered by pod-server-1 until the socket was terminated; nothing after that.
        let failed_at = lb_tests::termination_point(&after, "web-0");
        let error = after[failed_at].error().unwrap_or_default();
        assert!(
            error.contains("connection abort") || error.contains("Destination address required"),
            "{error}"
        );
        // The other program's socket was not touched.
        let direct = finish_probes(direct).unwrap();
        assert!(direct.len() > 10, "{direct:?}");
        assert!(all_from(&direct, "web-0"), "{direct:?}");
        // A new socket reaches the pod that stays.
        assert_eq!(
            reach(&testbed, &client, address, "connected-udp", 5),
            BTreeSet::from(["web-1".to_owned()])
        );
    }
}

cases! {
    /// "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles
    /// for a NodePort service" (test/e2e/network/conntrack.go): to this node's IP:nodePort.
    should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_node_port_service: preserve_udp_traffic("  type: NodePort", "{name: udp, port: 80, protocol: UDP, targetPort: 80, nodePort: 30800}", "10.244.0.1:30800", false, false);
    /// "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles
    /// for a ClusterIP service" (test/e2e/network/conntrack.go). Where kube-proxy flushes the
    /// conntrack entries of a backend that left, lb terminates the connected sockets it sent
    /// there.
    should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service: preserve_udp_traffic("  type: ClusterIP", "{name: udp, port: 80, protocol: UDP, targetPort: 80}", "10.96.0.10:80", false, true);
    /// "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles
    /// for a ClusterIP service and client is hostNetwork" (test/e2e/network/conntrack.go).
    should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service_and_client_is_host_network: preserve_udp_traffic("  type: ClusterIP", "{name: udp, port: 80, protocol: UDP, targetPort: 80}", "10.96.0.10:80", true, false);
}

/// "[sig-network] Conntrack should be able to preserve UDP traffic when server pod cycles
/// for a ClusterIP service with InternalTrafficPolicy set to Local"
/// (test/e2e/network/conntrack.go): pod-server-1 on the client's node answers;
/// pod-server-2 comes on another node and pod-server-1 goes: nothing answers (refused at
/// once); pod-server-3 comes on the client's node and answers every attempt.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service_with_internal_traffic_policy_set_to_local()
 {
    let Some((mut testbed, pods, client)) = node(test_name!(), 3, 80) else {
        return;
    };
    let manifest = |items: &[(&Pod, &str)]| {
        let items: Vec<String> = items
            .iter()
            .map(|(p, node)| endpoint(p.ip, "ready: true", node))
            .collect();
        svc_udp(
            "  type: ClusterIP\n  internalTrafficPolicy: Local",
            "{name: udp, port: 80, protocol: UDP, targetPort: 80}",
            &items,
        )
    };
    let frontend = "10.96.0.10:80/UDP";
    start(&mut testbed, &manifest(&[]));
    serving(&testbed, frontend, &[], 80);
    let prober = udp_client(&testbed, &client, "10.96.0.10:80");
    let (server1, server2, server3) = (&pods[0], &pods[1], &pods[2]);
    let first_in = cycle(
        &testbed,
        &manifest(&[(server1, "node-1")]),
        frontend,
        &[server1],
    );
    let both_in = cycle(
        &testbed,
        &manifest(&[(server1, "node-1"), (server2, "node-2")]),
        frontend,
        &[server1],
    );
    let remote_only = cycle(&testbed, &manifest(&[(server2, "node-2")]), frontend, &[]);
    let third_in = cycle(
        &testbed,
        &manifest(&[(server3, "node-1"), (server2, "node-2")]),
        frontend,
        &[server3],
    );
    let probes = finish_timed_probes(prober).unwrap();
    // pod-server-2 on another node changes nothing for this node's clients.
    let first = attempts(&probes, first_in.applied, remote_only.written);
    assert!(all_from(&first, "web-0"), "{first:?}");
    assert!(both_in.applied < remote_only.written);
    assert_refused(&attempts(&probes, remote_only.applied, third_in.written));
    let third = attempts(&probes, third_in.applied, u64::MAX);
    assert!(all_from(&third, "web-2"), "{third:?}");
}

/// "[sig-network] Conntrack should be able to preserve UDP traffic when initial unready
/// endpoints get ready" (test/e2e/network/conntrack.go): while the server's endpoint is not
/// ready the client is refused at once; once it is, every attempt is answered.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    let Some((mut testbed, pods, client)) = node(test_name!(), 1, 80) else {
        return;
    };
    let manifest = |conditions: &str| {
        svc_udp(
            "  type: ClusterIP",
            "{name: udp, port: 80, protocol: UDP, targetPort: 80}",
            &[endpoint(pods[0].ip, conditions, "node-1")],
        )
    };
    let frontend = "10.96.0.10:80/UDP";
    start(&mut testbed, &manifest("ready: false, serving: false"));
    serving(&testbed, frontend, &[], 80);
    let prober = udp_client(&testbed, &client, "10.96.0.10:80");
    std::thread::sleep(Duration::from_millis(700));
    let ready = cycle(&testbed, &manifest("ready: true"), frontend, &[&pods[0]]);
    let probes = finish_timed_probes(prober).unwrap();
    assert_refused(&attempts(&probes, 0, ready.written));
    let after = attempts(&probes, ready.applied, u64::MAX);
    assert!(all_from(&after, "web-0"), "{after:?}");
}
