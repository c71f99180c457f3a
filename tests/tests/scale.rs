//! The control plane at scale, with real clients: maps sized from what the source needs
//! and grown while connects go on, Services refused whole at an upper bound while every
//! other change keeps landing, and /readyz saying when the maps lag the source.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use lb_tests::{
    Pod, Probe, Testbed, finish_probes,
    generate::{self, BenchService},
    http_get, privileged, wait_for,
};

/// The three pods' endpoints, as every generated Service has them.
fn endpoints(pods: &[Pod]) -> Vec<(Ipv4Addr, u16)> {
    pods.iter().map(|pod| (pod.ip, 8888)).collect()
}

/// The agent with its metrics on a free port, started without waiting for readiness.
fn spawn_agent(testbed: &mut Testbed, extra: &[&str]) -> u16 {
    let manifests = testbed.manifests.clone();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--metrics-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    testbed.spawn_agent(&args).unwrap();
    testbed.metrics_port().unwrap()
}

fn readyz(port: u16) -> (u16, String) {
    http_get(port, "/readyz").unwrap()
}

fn answered_by_the_pods(probes: &[Probe]) -> BTreeSet<String> {
    probes
        .iter()
        .filter_map(|p| p.hostname().map(str::to_owned))
        .collect()
}

/// `lb status -o json`: the growing maps' capacity, by map name.
fn capacity(testbed: &Testbed, map: &str) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["status", "-o", "json"]).unwrap()).unwrap();
    status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == map)
        .unwrap()["max_entries"]
        .as_u64()
        .unwrap()
}

/// Waits until the agent logs a sync that holds `services` Services.
fn wait_for_services(testbed: &Testbed, services: usize, timeout: Duration) {
    let needle = format!(" services={services} ");
    wait_for(&format!("a sync of {services} Services"), timeout, || {
        Ok(testbed.agent_output().contains(&needle).then_some(()))
    })
    .unwrap();
}

fn vip(service: &BenchService) -> String {
    format!("{}:{}", service.vip, service.port)
}

#[test]
fn growing_from_ten_to_fifty_thousand_services_loses_no_connect() {
    if !privileged("growing_from_ten_to_fifty_thousand_services_loses_no_connect") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::with_backends(3, 8888).unwrap();
    let all = generate::services(50_000, &endpoints(&pods));
    testbed
        .write_manifest("first.yaml", &generate::manifests(&all[..10]))
        .unwrap();
    spawn_agent(&mut testbed, &[]);
    testbed.wait_agent_ready().unwrap();
    let small = capacity(&testbed, lb_common::SERVICE_MAP);

    let prober = testbed
        .background_prober(&client, &vip(&all[0]), 50_000, 2, 120_000)
        .unwrap();
    // Wait until the prober is under way, so that the growth happens while it connects.
    std::thread::sleep(Duration::from_millis(300));
    testbed
        .write_manifest("rest.yaml", &generate::manifests(&all[10..]))
        .unwrap();
    let last = all.last().unwrap();
    wait_for_services(&testbed, all.len(), Duration::from_secs(180));
    std::thread::sleep(Duration::from_millis(300));
    let probes = finish_probes(prober).unwrap();

    lb_tests::assert_no_failed_connects(&probes, 200, "while the maps grew");
    assert_eq!(answered_by_the_pods(&probes).len(), 3);
    let grown = capacity(&testbed, lb_common::SERVICE_MAP);
    // 50k Services of 3 endpoints are 200k service entries.
    assert!(grown >= 200_000 && grown > small, "{small} → {grown}");
    assert!(testbed.agent_output().contains("maps grown"));
    // The newest Service answers too, through the grown maps.
    let answers = testbed.probe(&client, &vip(last), 30).unwrap();
    assert_eq!(answered_by_the_pods(&answers).len(), 3, "{answers:?}");
}

#[test]
fn a_hundred_thousand_services_from_one_list_file_answer_with_default_flags() {
    if !privileged("a_hundred_thousand_services_from_one_list_file_answer_with_default_flags") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::with_backends(3, 8888).unwrap();
    let all = generate::services(100_000, &endpoints(&pods));
    testbed
        .write_manifest("cluster.json", &generate::list_json(&all))
        .unwrap();
    let port = spawn_agent(&mut testbed, &[]);
    wait_for("the agent's first sync", Duration::from_secs(300), || {
        assert!(testbed.agent_running(), "{}", testbed.agent_output());
        Ok(testbed.agent_output().contains(" ready").then_some(()))
    })
    .unwrap();
    assert_eq!(readyz(port).0, 200);
    // The first, one in the middle and the last answer.
    for service in [&all[0], &all[49_999], &all[99_999]] {
        let answers = testbed.probe(&client, &vip(service), 6).unwrap();
        assert_eq!(
            answers.iter().filter(|p| p.hostname().is_some()).count(),
            6,
            "{}: {answers:?}",
            service.name
        );
    }
    let status = testbed.lb(&["status"]).unwrap();
    assert!(!status.contains("REFUSED"), "{status}");
}

#[test]
fn at_an_upper_bound_services_that_fit_answer_the_others_are_refused_and_changes_still_land() {
    if !privileged(
        "at_an_upper_bound_services_that_fit_answer_the_others_are_refused_and_changes_still_land",
    ) {
        return;
    }
    let (mut testbed, pods, client) = Testbed::with_backends(3, 8888).unwrap();
    let all = generate::services(15, &endpoints(&pods));
    // Ten Services of three endpoints are 40 service entries: exactly the bound.
    testbed
        .write_manifest("fits.yaml", &generate::manifests(&all[..10]))
        .unwrap();
    let port = spawn_agent(&mut testbed, &["--service-map-max-entries", "40"]);
    testbed.wait_agent_ready().unwrap();
    assert_eq!(readyz(port), (200, "ready\n".into()));

    // Five more cannot fit: each is refused whole, the ten keep answering.
    testbed
        .write_manifest("more.yaml", &generate::manifests(&all[10..]))
        .unwrap();
    let (status, body) = wait_for("/readyz to turn not ready", Duration::from_secs(10), || {
        let (status, body) = readyz(port);
        Ok((status == 503).then_some((status, body)))
    })
    .unwrap();
    assert_eq!(status, 503);
    assert!(
        body.contains("5 Service(s) refused") && body.contains("--service-map-max-entries"),
        "{body}"
    );
    // The state file the CLI reads is written after the sync is reported (and /readyz
    // with it): on a loaded machine it may lag a moment.
    let services = wait_for(
        "the state file to show the refused Services",
        Duration::from_secs(10),
        || {
            let services = testbed.services()?;
            Ok(services
                .iter()
                .any(|s| s["kind"] == "Refused")
                .then_some(services))
        },
    )
    .unwrap();
    let refused: BTreeSet<&str> = services
        .iter()
        .filter(|s| s["kind"] == "Refused")
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<String> = all[10..]
        .iter()
        .map(|s| format!("default/{}", s.name))
        .collect();
    assert_eq!(
        refused,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    assert!(
        services
            .iter()
            .filter(|s| s["in_datapath"] == true)
            .all(|s| s["backends"].as_array().unwrap().len() == 3),
        "no Service is half written: {services:?}"
    );
    let status = testbed.lb(&["status"]).unwrap();
    assert!(status.contains("REFUSED SERVICE"), "{status}");
    assert!(
        testbed.agent_output().contains("refused"),
        "the log names them"
    );
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(metrics.contains("lb_services_refused 5"), "{metrics}");
    let refused_vip = vip(&all[12]);
    let answers = testbed.probe(&client, &refused_vip, 1).unwrap();
    assert!(answers[0].hostname().is_none(), "{answers:?}");

    // An unrelated change still lands: svc-1 loses an endpoint, and clients see it.
    let mut shrunk = all[..10].to_vec();
    shrunk[0].endpoints.pop();
    testbed
        .write_manifest("fits.yaml", &generate::manifests(&shrunk))
        .unwrap();
    testbed
        .wait_for_frontend(
            &format!("{}/TCP", vip(&all[0])),
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    let answers = testbed.probe(&client, &vip(&all[0]), 12).unwrap();
    assert_eq!(
        answered_by_the_pods(&answers),
        BTreeSet::from(["web-0".into(), "web-1".into()])
    );

    // Room freed by that change (one entry) is not enough for a whole refused Service;
    // removing the refused ones makes the agent ready again.
    testbed.remove_manifest("more.yaml").unwrap();
    wait_for("/readyz to turn ready", Duration::from_secs(10), || {
        Ok((readyz(port).0 == 200).then_some(()))
    })
    .unwrap();
}
