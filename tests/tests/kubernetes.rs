//! The agent following a Kubernetes API: the real `kube::Client` against a list/watch server
//! of the tests' own on 127.0.0.1, with real connections from a pod netns.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, ffi::OsStr, time::Duration};

use lb_tests::{
    Pod, Probe, Prober, Testbed,
    apiserver::{ApiServer, Resource},
    finish_probes, hostnames, http_get, privileged, wait_for,
};

fn service(ips: &[&str]) -> String {
    let endpoints: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, targetPort: 8888}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-abc, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints: [{}]
ports: [{{name: http, port: 8888, protocol: TCP}}]
"#,
        endpoints.join(", ")
    )
}

/// A node with two backends, an API server holding Service `web` → web-0, and the agent
/// following it (with metrics on a port it picks: [`Testbed::metrics_port`]).
fn cluster() -> (Testbed, Vec<Pod>, Pod, ApiServer) {
    let (mut testbed, pods, client) = Testbed::with_backends(2, 8888).unwrap();
    let api = ApiServer::start().unwrap();
    api.apply_yaml(&service(&["10.244.0.10"])).unwrap();
    start(&mut testbed, &api);
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    (testbed, pods, client, api)
}

fn agent_args(testbed: &Testbed, api: &ApiServer) -> Vec<std::ffi::OsString> {
    let kubeconfig = testbed.manifests.with_file_name("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    vec![
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ]
}

fn start(testbed: &mut Testbed, api: &ApiServer) {
    let args = agent_args(testbed, api);
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    testbed.start_agent_with(&args).unwrap();
}

/// A client connecting back to back in the background, bounded in count and in time.
fn background_prober(testbed: &Testbed, client: &Pod) -> Prober {
    testbed
        .background_prober(client, "10.96.0.10:80", 20_000, 5, 40_000)
        .unwrap()
}

/// Stops the prober and returns every attempt it made.
fn finish(prober: Prober) -> Vec<Probe> {
    finish_probes(prober).unwrap()
}

fn assert_no_failures(probes: &[Probe]) {
    lb_tests::assert_no_failed_connects(probes, 20, "");
}

#[test]
fn initial_sync_then_adds_changes_and_deletes_reach_real_connections() {
    if !privileged("initial_sync_then_adds_changes_and_deletes_reach_real_connections") {
        return;
    }
    let (testbed, _pods, client, api) = cluster();
    let probes = testbed.probe(&client, "10.96.0.10:80", 5).unwrap();
    assert_eq!(hostnames(&probes), BTreeSet::from(["web-0".into()]));

    // Scale up: the EndpointSlice is MODIFIED.
    api.apply_yaml(&service(&["10.244.0.10", "10.244.0.11"]))
        .unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:80", 40).unwrap();
    assert_eq!(
        hostnames(&probes),
        BTreeSet::from(["web-0".into(), "web-1".into()])
    );

    // A second Service is ADDED.
    api.apply_yaml(
        &service(&["10.244.0.11"])
            .replace("name: web,", "name: api,")
            .replace("10.96.0.10", "10.96.0.11")
            .replace("web-abc", "api-abc")
            .replace("service-name: web", "service-name: api"),
    )
    .unwrap();
    testbed
        .wait_for_frontend("10.96.0.11:80/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.11:80", 3).unwrap()),
        BTreeSet::from(["web-1".into()])
    );

    // The first is DELETED: its VIP is no longer translated.
    api.delete(Resource::Services, "default", "web").unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", None)
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:80", 1).unwrap();
    assert!(
        probes[0].error().is_some_and(|e| e.contains("unreachable")),
        "{probes:?}"
    );
}

#[test]
fn broken_watches_and_410_gone_recover_without_a_blackhole() {
    if !privileged("broken_watches_and_410_gone_recover_without_a_blackhole") {
        return;
    }
    let (testbed, _pods, client, api) = cluster();
    let prober = background_prober(&testbed, &client);
    std::thread::sleep(Duration::from_millis(300));

    // The watch breaks mid-stream; a change made meanwhile still arrives.
    api.break_watches();
    api.apply_yaml(&service(&["10.244.0.10", "10.244.0.11"]))
        .unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();

    // The history is compacted: the watch resumes with 410 Gone and the agent relists.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    api.compact();
    api.apply_yaml(&service(&["10.244.0.11"])).unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();
    let lists_after = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    assert!(
        lists_after > lists_before,
        "no relist after 410: {:?}",
        api.requests()
    );
    std::thread::sleep(Duration::from_millis(300));

    let probes = finish(prober);
    assert_no_failures(&probes);
    assert_eq!(
        hostnames(&probes),
        BTreeSet::from(["web-0".into(), "web-1".into()])
    );
}

#[test]
fn nothing_is_removed_before_both_lists_are_in() {
    if !privileged("nothing_is_removed_before_both_lists_are_in") {
        return;
    }
    let (mut testbed, _pods, client, api) = cluster();
    testbed.stop_agent().unwrap();

    // A new agent gets the Services but not yet the EndpointSlices: a sync now would see
    // `web` without endpoints and refuse its connects.
    api.hold_list(Resource::EndpointSlices, true);
    let args = agent_args(&testbed, &api);
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    testbed.spawn_agent(&args).unwrap();
    let port = testbed.metrics_port().unwrap();
    wait_for(
        "the agent to list Services",
        Duration::from_secs(20),
        || {
            Ok(api
                .requests()
                .iter()
                .any(|r| r.contains("endpointslices") && !r.contains("watch="))
                .then_some(()))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = http_get(port, "/readyz").unwrap();
    assert_eq!(status, 503, "ready before the EndpointSlices were listed");
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:80", 5).unwrap()),
        BTreeSet::from(["web-0".into()])
    );

    api.hold_list(Resource::EndpointSlices, false);
    testbed.wait_agent_ready().unwrap();
    assert!(
        testbed.agent_output().contains("map_writes=0"),
        "{}",
        testbed.agent_output()
    );
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
}

#[test]
fn an_agent_restart_loses_no_connect() {
    if !privileged("an_agent_restart_loses_no_connect") {
        return;
    }
    let (mut testbed, _pods, client, api) = cluster();
    api.apply_yaml(&service(&["10.244.0.10", "10.244.0.11"]))
        .unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    let prober = background_prober(&testbed, &client);
    std::thread::sleep(Duration::from_millis(300));
    testbed.stop_agent().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    start(&mut testbed, &api);
    assert!(
        testbed.agent_output().contains("map_writes=0"),
        "{}",
        testbed.agent_output()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_no_failures(&finish(prober));
}

#[test]
fn metrics_health_and_unusable_objects() {
    if !privileged("metrics_health_and_unusable_objects") {
        return;
    }
    let (mut testbed, _pods, client, api) = cluster();
    let port = testbed.metrics_port().unwrap();
    assert_eq!(http_get(port, "/healthz").unwrap(), (200, "ok\n".into()));
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);

    // An object the agent cannot use is logged with its name and reason, counted, and
    // skipped; the rest keeps flowing.
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {clusterIP: 10.96.0.66, ports: [{port: 80, protocol: ICMP}]}\n",
    )
    .unwrap();
    api.apply_yaml(&service(&["10.244.0.11"])).unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();
    assert!(
        testbed
            .agent_output()
            .contains("Service shop/bad: spec.ports[0].protocol: unknown protocol \"ICMP\""),
        "{}",
        testbed.agent_output()
    );
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:80", 3).unwrap()),
        BTreeSet::from(["web-1".into()])
    );

    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for expected in [
        "lb_services 1",
        "lb_frontends 1",
        "lb_backends 1",
        "lb_errors_total{kind=\"InvalidObject\"} 1",
        "lb_map_entries{map=\"lb_svc_v4\"} 2",
        "lb_map_capacity{map=\"lb_svc_v4\"} 4096",
        "lb_sync_duration_seconds_count",
        "lb_event_to_map_seconds_count",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected:?} missing from:\n{metrics}"
        );
    }
}
