//! ClusterIP over TCP through connect4, with real clients in a pod netns reaching real
//! backends, the real agent, and the real `lb` CLI.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use lb_tests::{Pod, Probe, Testbed, assert_all_answered, hostnames, privileged, wait_for};

const VIP: &str = "10.96.0.10";

/// A Service `web` in `default` with one port, and its EndpointSlice.
fn service(port: u16, target_port: u16, endpoints: &[Ipv4Addr]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  clusterIPs: [{VIP}]
  type: ClusterIP
  ports:
  - {{name: http, port: {port}, targetPort: {target_port}, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: http, port: {target_port}, protocol: TCP}}
"#
    )
}

fn node(backends: u8, port: u16) -> (Testbed, Vec<Pod>, Pod) {
    Testbed::with_backends(backends, port).unwrap()
}

fn ips(pods: &[Pod]) -> Vec<Ipv4Addr> {
    pods.iter().map(|p| p.ip).collect()
}

#[test]
fn service_port_is_translated_to_the_target_port() {
    if !privileged("service_port_is_translated_to_the_target_port") {
        return;
    }
    // Seed 004: the Service listens on 8081 and forwards to 3000 inside the pod.
    let (mut testbed, pods, client) = node(1, 3000);
    testbed
        .write_manifest("web.yaml", &service(8081, 3000, &ips(&pods)))
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8081/TCP", Some(&["10.244.0.10:3000"]))
        .unwrap();

    let probes = testbed.probe(&client, "10.96.0.10:8081", 3).unwrap();
    for probe in &probes {
        assert_eq!(probe.hostname(), Some("web-0"), "{probe:?}");
        assert_eq!(probe.peer(), Some("10.96.0.10:8081"), "{probe:?}");
    }
    // Nothing listens on 8081 anywhere: only the translation makes the connect work.
    let direct = testbed.probe(&client, "10.244.0.10:8081", 1).unwrap();
    assert!(
        matches!(&direct[0], Probe::Failed { error } if error.contains("refused")),
        "{direct:?}"
    );
}

#[test]
fn manifest_changes_apply_while_the_agent_runs() {
    if !privileged("manifest_changes_apply_while_the_agent_runs") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    testbed
        .write_manifest("web.yaml", &service(8888, 8888, &[pods[0].ip]))
        .unwrap();
    let pid = testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:8888", 5).unwrap()),
        BTreeSet::from(["web-0".to_owned()])
    );

    // The endpoint moves from web-0 to web-1.
    testbed
        .write_manifest("web.yaml", &service(8888, 8888, &[pods[1].ip]))
        .unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:8888", 5).unwrap();
    assert_all_answered(&probes);
    assert_eq!(hostnames(&probes), BTreeSet::from(["web-1".to_owned()]));

    // A not-ready endpoint is not used.
    let not_ready = service(8888, 8888, &[pods[0].ip, pods[1].ip]).replacen(
        "conditions: {ready: true}",
        "conditions: {ready: false}",
        1,
    );
    testbed.write_manifest("web.yaml", &not_ready).unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();

    // Deleting the manifest deletes the Service: the VIP is no longer translated, and with
    // no route to it the connect fails at once.
    testbed.remove_manifest("web.yaml").unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", None)
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:8888", 1).unwrap();
    assert!(
        matches!(&probes[0], Probe::Failed { error } if error.contains("unreachable")),
        "{probes:?}"
    );
    assert!(testbed.services().unwrap().is_empty());

    assert!(testbed.agent_running(), "the agent restarted or died");
    assert_eq!(
        testbed.start_agent().err().map(|e| e.to_string()),
        Some("the agent is already running".into())
    );
    assert!(pid > 0);
}

#[test]
fn other_destinations_are_left_alone() {
    if !privileged("other_destinations_are_left_alone") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    testbed
        .write_manifest("web.yaml", &service(8888, 8888, &[pods[0].ip]))
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();

    // A pod address that is not a frontend reaches that pod, untranslated.
    let direct = testbed.probe(&client, "10.244.0.11:8888", 3).unwrap();
    for probe in &direct {
        assert_eq!(probe.hostname(), Some("web-1"), "{probe:?}");
        assert_eq!(probe.peer(), Some("10.244.0.11:8888"), "{probe:?}");
    }
    // Another IP in the service range is not a frontend: left alone, it goes nowhere.
    let unreachable = |probes: &[Probe]| matches!(&probes[0], Probe::Failed { error } if error.contains("unreachable"));
    let probes = testbed.probe(&client, "10.96.0.11:8888", 1).unwrap();
    assert!(unreachable(&probes), "{probes:?}");
    // The clusterIP on a port its Service does not have is refused at once, as kube-proxy
    // rejects it, for TCP and UDP alike.
    for mode in ["tcp", "connected-udp"] {
        let probes = testbed
            .probe_with(&client, "10.96.0.10:8889", 1, &["--mode", mode])
            .unwrap();
        assert!(
            matches!(&probes[0], Probe::Failed { error } if error.contains("refused")),
            "{mode}: {probes:?}"
        );
    }
    assert_eq!(testbed.stat("unknown_port").unwrap(), 2);
    // `lb explain` says so, from the same maps.
    let explained = testbed.lb(&["explain", "10.96.0.10:8889"]).unwrap();
    assert!(
        explained.contains("fails at once with ECONNREFUSED"),
        "{explained}"
    );
    assert_eq!(testbed.stat("connect_translated").unwrap(), 0);
    assert_eq!(testbed.stat("peername_restored").unwrap(), 0);

    // Once the Service is gone, its address is nobody's: left alone again.
    testbed.remove_manifest("web.yaml").unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", None)
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:8889", 1).unwrap();
    assert!(unreachable(&probes), "{probes:?}");
    assert_eq!(testbed.stat("unknown_port").unwrap(), 2);
}

#[test]
fn a_bad_manifest_is_reported_and_the_last_good_state_kept() {
    if !privileged("a_bad_manifest_is_reported_and_the_last_good_state_kept") {
        return;
    }
    let (mut testbed, pods, client) = node(1, 8888);
    testbed
        .write_manifest("web.yaml", &service(8888, 8888, &ips(&pods)))
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();

    // An invalid port in the Service: the error names file, object and field.
    let bad = service(8888, 8888, &ips(&pods))
        .replace("port: 8888, targetPort", "port: 99999, targetPort");
    testbed.write_manifest("web.yaml", &bad).unwrap();
    let expected = "web.yaml: Service default/web: spec.ports[0].port: 99999 is not a port";
    wait_for(
        "the error in the agent log",
        Duration::from_secs(10),
        || Ok(testbed.agent_output().contains(expected).then_some(())),
    )
    .unwrap();
    // Broken YAML in another file.
    testbed
        .write_manifest("broken.yaml", "kind: Service\nmetadata: [\n")
        .unwrap();
    wait_for(
        "the syntax error in the agent log",
        Duration::from_secs(10),
        || {
            Ok(testbed
                .agent_output()
                .contains("broken.yaml: not valid YAML or JSON")
                .then_some(()))
        },
    )
    .unwrap();

    assert!(testbed.agent_running(), "{}", testbed.agent_output());
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    assert_all_answered(&testbed.probe(&client, "10.96.0.10:8888", 3).unwrap());
}

#[test]
fn a_file_written_in_place_is_applied_only_once_its_writer_is_done() {
    if !privileged("a_file_written_in_place_is_applied_only_once_its_writer_is_done") {
        return;
    }
    use std::io::Write as _;
    let (mut testbed, pods, client) = node(2, 8888);
    let web = service(8888, 8888, &[pods[0].ip]);
    let second = service(8888, 8888, &[pods[1].ip])
        .replace("name: web,", "name: api,")
        .replace("web-abcde", "api-abcde")
        .replace("service-name: web", "service-name: api")
        .replace(VIP, "10.96.0.11");
    let both = format!("{web}---\n{second}");
    testbed.write_manifest("all.yaml", &both).unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.11:8888/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();

    // As `kubectl get … > all.yaml` does: truncate, write part of it (a valid YAML prefix
    // without `api`), pause, write the rest, close.
    let path = testbed.manifests.join("all.yaml");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(web.as_bytes()).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let during = testbed.probe(&client, "10.96.0.11:8888", 3).unwrap();
    file.write_all(format!("---\n{second}").as_bytes()).unwrap();
    drop(file);
    assert_all_answered(&during);
    assert_eq!(hostnames(&during), BTreeSet::from(["web-1".to_owned()]));

    // The closed file is applied: a change in it reaches clients at once.
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(web.as_bytes()).unwrap();
    drop(file);
    testbed
        .wait_for_frontend("10.96.0.11:8888/TCP", None)
        .unwrap();
    assert!(
        testbed.agent_output().contains("ready"),
        "{}",
        testbed.agent_output()
    );
}

#[test]
fn a_manifest_directory_swapped_in_by_rename_is_followed() {
    if !privileged("a_manifest_directory_swapped_in_by_rename_is_followed") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    testbed
        .write_manifest("web.yaml", &service(8888, 8888, &[pods[0].ip]))
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();

    // As deploy tools do: the new directory made beside it, then renamed into its place.
    let new = testbed.manifests.with_file_name("manifests.new");
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("web.yaml"), service(8888, 8888, &[pods[1].ip])).unwrap();
    std::fs::rename(
        &testbed.manifests,
        testbed.manifests.with_file_name("manifests.old"),
    )
    .unwrap();
    std::fs::rename(&new, &testbed.manifests).unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.11:8888"]))
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:8888", 3).unwrap();
    assert_all_answered(&probes);
    assert_eq!(hostnames(&probes), BTreeSet::from(["web-1".to_owned()]));

    // Every later edit in the new directory lands.
    testbed
        .write_manifest("web.yaml", &service(8888, 8888, &[pods[0].ip]))
        .unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:8888/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:8888", 3).unwrap();
    assert_all_answered(&probes);
    assert_eq!(hostnames(&probes), BTreeSet::from(["web-0".to_owned()]));
    assert!(
        testbed
            .agent_output()
            .contains("manifest directory replaced"),
        "{}",
        testbed.agent_output()
    );
}

/// SIGHUP makes the agent read its source again and check the maps against it, as daemons
/// re-read their configuration — it does not end the agent: an entry removed behind its
/// back is written again.
#[test]
fn sighup_reads_the_source_again_and_repairs_the_maps() {
    if !privileged("sighup_reads_the_source_again_and_repairs_the_maps") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8080);
    testbed
        .write_manifest("web.yaml", &service(80, 8080, &ips(&pods)))
        .unwrap();
    let pid = testbed.start_agent().unwrap();
    assert_all_answered(&testbed.probe(&client, "10.96.0.10:80", 2).unwrap());

    // The frontend's master entry deleted behind the agent's back: the Service is gone
    // from the datapath (its clusterIP is refused as a port nobody has).
    let master = lb_common::ServiceKey::new(
        lb_common::ip_to_map([10, 96, 0, 10].into()),
        lb_common::port_to_map(80),
        lb_common::IPPROTO_TCP,
        lb_common::MASTER_SLOT,
    );
    // The key's bytes as the kernel holds them: address words and port in network order.
    let mut key_bytes: Vec<u8> = master
        .address
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    key_bytes.extend(master.port.to_ne_bytes());
    key_bytes.extend(master.slot.to_ne_bytes());
    key_bytes.extend([master.protocol, 0, 0, 0]);
    let mut delete = std::process::Command::new("bpftool");
    delete
        .args(["map", "delete", "pinned"])
        .arg(testbed.bpffs.join(lb_common::SERVICE_MAP))
        .args(["key", "hex"])
        .args(key_bytes.iter().map(|byte| format!("{byte:02x}")));
    lb_tests::run(&mut delete).unwrap();
    let broken = testbed.probe(&client, "10.96.0.10:80", 1).unwrap();
    assert!(broken[0].hostname().is_none(), "{broken:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for(
        "the Service to answer again",
        Duration::from_secs(10),
        || {
            let probes = testbed.probe(&client, "10.96.0.10:80", 1)?;
            Ok(probes[0].hostname().is_some().then_some(()))
        },
    )
    .unwrap();
    assert!(testbed.agent_running(), "{}", testbed.agent_output());
    assert!(
        testbed.agent_output().contains("SIGHUP: reading manifests"),
        "{}",
        testbed.agent_output()
    );
}
