//! The cluster DNS the agent serves (`--dns`), asked by real resolvers in a pod: glibc's
//! (`getent`) with the resolv.conf kubelet writes, `dig` for the other record kinds and
//! response codes, and the seeds' `curl httpenv:8888` through the name.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    NODE_IP, Pod, Testbed,
    objects::{ready, service, slice},
    privileged, run, wait_for,
};

/// The headless Service `httpenv-pods` of `pods`, each endpoint with its pod's name as
/// `hostname`.
fn headless(pods: &[&Pod]) -> String {
    let endpoints: Vec<String> = pods
        .iter()
        .map(|pod| format!("{{addresses: [\"{}\"], hostname: {}}}", pod.ip, pod.name))
        .collect();
    service("httpenv-pods", "None", "", &["{name: http, port: 8888}"])
        + &slice(
            "httpenv-pods",
            "httpenv-pods-1",
            8888,
            "TCP",
            &format!("[{}]", endpoints.join(", ")),
        )
}

/// What `dig ARGS` prints in `pod` (with its resolv.conf), one line per record.
fn dig(testbed: &Testbed, pod: &Pod, args: &[&str]) -> Vec<String> {
    let output = run(testbed.resolving_command(pod, "dig").args(args)).unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What `getent DATABASE NAME` prints in `pod` (with its resolv.conf): the lines' first
/// words, the addresses. Empty when the name does not resolve.
fn getent(testbed: &Testbed, pod: &Pod, database: &str, name: &str) -> BTreeSet<String> {
    let output = testbed
        .resolving_command(pod, "getent")
        .args([database, name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn names_resolve_through_the_agents_dns_as_a_pods_resolver_asks() {
    if !privileged("names_resolve_through_the_agents_dns_as_a_pods_resolver_asks") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::with_backends(2, 8888).unwrap();
    let all: Vec<&Pod> = pods.iter().collect();
    testbed
        .write_manifest(
            "httpenv.yaml",
            &(service(
                "httpenv",
                "10.96.0.10",
                "",
                &["{name: p, port: 8888, targetPort: 8888}"],
            ) + &slice(
                "httpenv",
                "httpenv-1",
                8888,
                "TCP",
                &ready(&[pods[0].ip, pods[1].ip]),
            )),
        )
        .unwrap();
    testbed
        .write_manifest("pods.yaml", &headless(&all))
        .unwrap();
    testbed
        .write_manifest(
            "docs.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: docs, namespace: default}\n\
             spec: {type: ExternalName, externalName: kubernetes.io}\n",
        )
        .unwrap();
    let dns = format!("{NODE_IP}:53");
    testbed
        .start_agent_with(&[
            "--manifests".as_ref(),
            testbed.manifests.clone().as_os_str(),
            "--dns".as_ref(),
            dns.as_ref(),
        ])
        .unwrap();
    testbed.set_resolver(&client, NODE_IP, "default").unwrap();

    // The short name through the search path, and the namespace-qualified one.
    for name in [
        "httpenv",
        "httpenv.default",
        "httpenv.default.svc.cluster.local",
    ] {
        assert_eq!(
            getent(&testbed, &client, "hosts", name),
            BTreeSet::from(["10.96.0.10".to_owned()]),
            "{name}"
        );
    }
    // A headless Service is its ready pods, each also by its hostname.
    let pod_ips: BTreeSet<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(
        getent(&testbed, &client, "ahostsv4", "httpenv-pods"),
        pod_ips
    );
    assert_eq!(
        getent(&testbed, &client, "hosts", "web-1.httpenv-pods"),
        BTreeSet::from([pods[1].ip.to_string()])
    );
    assert!(getent(&testbed, &client, "hosts", "nothing-here").is_empty());

    // SRV for the named port, PTR of the clusterIP, the ExternalName's CNAME, over UDP
    // and TCP; NXDOMAIN for a name in the zone that does not exist, REFUSED outside it.
    let short = |args: &[&str]| dig(&testbed, &client, &[&["+short"], args].concat());
    assert_eq!(
        short(&["SRV", "_p._tcp.httpenv.default.svc.cluster.local"]),
        ["0 100 8888 httpenv.default.svc.cluster.local."]
    );
    assert_eq!(
        short(&["-x", "10.96.0.10"]),
        ["httpenv.default.svc.cluster.local."]
    );
    assert_eq!(short(&["+search", "docs"]), ["kubernetes.io."]);
    assert_eq!(
        short(&["+tcp", "httpenv.default.svc.cluster.local"]),
        ["10.96.0.10"]
    );
    let status = |name: &str| {
        dig(&testbed, &client, &[name])
            .into_iter()
            .find_map(|line| {
                let (_, after) = line.split_once("status: ")?;
                Some(after.split(',').next()?.to_owned())
            })
            .unwrap_or_default()
    };
    assert_eq!(status("nothing.default.svc.cluster.local"), "NXDOMAIN");
    assert_eq!(status("example.com"), "REFUSED");
    // ANY is answered with what the name has; a name of the greatest length (253
    // characters, 118 labels) in the zone that does not exist is NXDOMAIN.
    assert_eq!(
        short(&["ANY", "httpenv.default.svc.cluster.local"]),
        ["10.96.0.10"]
    );
    let huge = format!("{}default.svc.cluster.local", "a.".repeat(114));
    assert_eq!(huge.len(), 253);
    assert_eq!(status(&huge), "NXDOMAIN");

    // The seeds' exercise: `curl httpenv:8888`, through the name and the datapath.
    let mut served = BTreeSet::new();
    for _ in 0..10 {
        let output = testbed
            .resolving_command(&client, "curl")
            .args(["-sv", "--max-time", "5", "http://httpenv:8888/"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let env: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        served.insert(env["HOSTNAME"].as_str().unwrap().to_owned());
    }
    assert_eq!(served, BTreeSet::from(["web-0".into(), "web-1".into()]));

    // Garbage at the server changes nothing.
    run(testbed.resolving_command(&client, "python3").args([
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         [s.sendto(b, ('10.244.0.1', 53)) for b in (b'', b'\\x00' * 3, b'\\xff' * 600)]",
    ]))
    .unwrap();

    // A scale-down is in the answers after the sync that writes it.
    testbed
        .write_manifest("pods.yaml", &headless(&all[..1]))
        .unwrap();
    wait_for(
        "the headless answer to shrink",
        Duration::from_secs(10),
        || {
            let answer = getent(&testbed, &client, "ahostsv4", "httpenv-pods");
            Ok((answer == BTreeSet::from([pods[0].ip.to_string()])).then_some(()))
        },
    )
    .unwrap();
    assert!(testbed.agent_running(), "{}", testbed.agent_output());
}
