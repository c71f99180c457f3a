//! Service semantics as kube-proxy gives them, through lb's socket-level datapath, beyond
//! upstream's e2e cases (those are tests/conformance.rs): UDP, v4-mapped sockets, claims and
//! shared addresses, topology hints, host binds and the NodePort range, node addresses,
//! LoadBalancer IPs, affinity following a backend away, merged slices, Services outside the
//! datapath, and updates under load. Every check runs a real client in a pod (or on the
//! node) against real backends.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{collections::BTreeSet, io::Read as _, net::Ipv4Addr, time::Duration};

use lb_tests::{
    Pod, Probe, Testbed, assert_all_answered, assert_refused, hostnames, monotonic_ns,
    objects::{ready, slice},
    parse_probes, privileged, wait_for,
};

fn node(backends: u8, port: u16) -> (Testbed, Vec<Pod>, Pod) {
    Testbed::with_backends(backends, port).unwrap()
}

/// A Service `web` whose `spec` lines (indented by two) are given, with one port `p`.
fn web(spec: &str, port: &str) -> String {
    lb_tests::objects::service(
        "web",
        "10.96.0.10",
        spec,
        &[&format!("{{name: p, {port}}}")],
    )
}

#[test]
fn unconnected_udp_replies_come_from_the_service_address() {
    if !privileged("unconnected_udp_replies_come_from_the_service_address") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 5353);
    let ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
    testbed
        .write_manifest(
            "dns.yaml",
            &(web("", "port: 53, targetPort: 5353, protocol: UDP")
                + &slice("web", "web-a", 5353, "UDP", &ready(&ips))),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:53/UDP",
            Some(&["10.244.0.10:5353", "10.244.0.11:5353"]),
        )
        .unwrap();

    let probes = testbed
        .probe_with(&client, "10.96.0.10:53", 30, &["--mode", "udp"])
        .unwrap();
    assert_all_answered(&probes);
    // recvfrom() shows the address the client sent to, not the pod that answered.
    for probe in &probes {
        assert_eq!(probe.peer(), Some("10.96.0.10:53"), "{probe:?}");
    }
    assert_eq!(
        hostnames(&probes),
        BTreeSet::from(["web-0".into(), "web-1".into()])
    );
    assert_eq!(testbed.stat("sendmsg_translated").unwrap(), 30);
    assert_eq!(testbed.stat("recvmsg_restored").unwrap(), 30);

    // Connected UDP is translated once, at connect(), and getpeername() shows the Service.
    let probes = testbed
        .probe_with(&client, "10.96.0.10:53", 5, &["--mode", "connected-udp"])
        .unwrap();
    assert_all_answered(&probes);
    for probe in &probes {
        assert_eq!(probe.peer(), Some("10.96.0.10:53"), "{probe:?}");
    }
    assert_eq!(testbed.stat("connect_translated").unwrap(), 5);
}

/// Many runtimes (Java, Node.js, Go's dual-stack listeners and dialers) open AF_INET6
/// sockets and reach IPv4 addresses through their v4-mapped form: such a socket reaches an
/// IPv4 Service like an AF_INET one, and sees the mapped Service address back.
#[test]
fn an_ipv6_socket_reaches_an_ipv4_service_through_its_v4_mapped_address() {
    if !privileged("an_ipv6_socket_reaches_an_ipv4_service_through_its_v4_mapped_address") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    let ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
    testbed
        .write_manifest(
            "web.yaml",
            &(web("", "port: 80, targetPort: 8888")
                + "---\n"
                + &web("", "port: 53, targetPort: 8888, protocol: UDP")
                    .replace("name: web,", "name: dns,")
                    .replace("10.96.0.10", "10.96.0.53")
                + &slice("web", "web-a", 8888, "TCP", &ready(&ips))
                + &slice("dns", "dns-a", 8888, "UDP", &ready(&ips))),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    let both = Some(&["10.244.0.10:8888", "10.244.0.11:8888"][..]);
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", both)
        .unwrap();
    testbed
        .wait_for_frontend("10.96.0.53:53/UDP", both)
        .unwrap();

    // TCP: the pods answer, the application sees the mapped Service address as its peer,
    // and the pod sees the client's own IPv4 address (no NAT).
    let probes = testbed
        .probe(&client, "[::ffff:10.96.0.10]:80", 20)
        .unwrap();
    assert_all_answered(&probes);
    for probe in &probes {
        assert_eq!(probe.peer(), Some("[::ffff:10.96.0.10]:80"), "{probe:?}");
        assert!(
            probe
                .remote_addr()
                .is_some_and(|a| a.starts_with("10.244.1.1:")),
            "{probe:?}"
        );
    }
    assert_eq!(
        hostnames(&probes),
        BTreeSet::from(["web-0".into(), "web-1".into()])
    );
    assert_eq!(testbed.stat("connect_translated").unwrap(), 20);
    assert_eq!(testbed.stat("peername_restored").unwrap(), 20);

    // Connected UDP (connect6 translates it) and unconnected UDP (the kernel sends a
    // mapped destination's datagrams as IPv4: sendmsg4 translates them, recvmsg6 shows the
    // reply coming from the mapped Service address).
    let connected = testbed
        .probe_with(
            &client,
            "[::ffff:10.96.0.53]:53",
            5,
            &["--mode", "connected-udp"],
        )
        .unwrap();
    let unconnected = testbed
        .probe_with(&client, "[::ffff:10.96.0.53]:53", 5, &["--mode", "udp"])
        .unwrap();
    for probe in connected.iter().chain(&unconnected) {
        assert!(probe.hostname().is_some(), "{probe:?}");
        assert_eq!(probe.peer(), Some("[::ffff:10.96.0.53]:53"), "{probe:?}");
    }
    assert_eq!(testbed.stat("sendmsg_translated").unwrap(), 5);
    assert_eq!(testbed.stat("recvmsg_restored").unwrap(), 5);

    // A port none of the clusterIP's Services has is refused at once, as for AF_INET.
    assert_refused(&testbed.probe(&client, "[::ffff:10.96.0.10]:81", 1).unwrap());
    assert_eq!(testbed.stat("unknown_port").unwrap(), 1);
}

/// A Service that claims a frontend another Service already has does not take it over,
/// even when its name sorts first, and not after a restart either; the newcomer is named
/// in the log.
/// Services with addresses or ports the API server would refuse — a loopback clusterIP, an
/// unspecified external IP, an IPv6 loopback clusterIP, a targetPort 0 — are refused with
/// the field named, and change nothing: a pod's connect to its own 127.0.0.1 is not
/// diverted to the refused Service's pod, and a Service that is fine keeps answering.
#[test]
fn services_the_api_server_would_refuse_change_nothing() {
    if !privileged("services_the_api_server_would_refuse_change_nothing") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    let to_web_1 = |name: &str| {
        slice(
            name,
            &format!("{name}-a"),
            8888,
            "TCP",
            &ready(&[pods[1].ip]),
        )
    };
    let service = |name: &str, cluster_ip: &str, spec: &str, port: &str| {
        lb_tests::objects::service(name, cluster_ip, spec, &[&format!("{{name: p, {port}}}")])
            + &to_web_1(name)
            + "---\n"
    };
    let bad = [
        service("loop", "127.0.0.1", "", "port: 8888, targetPort: 8888"),
        service(
            "anywhere",
            "10.96.0.20",
            "  externalIPs: [0.0.0.0]",
            "port: 8888, targetPort: 8888",
        ),
        service("loop6", "\"::1\"", "", "port: 8888, targetPort: 8888"),
        service("zero", "10.96.0.30", "", "port: 8888, targetPort: 0"),
    ]
    .concat();
    testbed
        .write_manifest(
            "web.yaml",
            &(web("", "port: 80, targetPort: 8888")
                + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[0].ip]))),
        )
        .unwrap();
    testbed.write_manifest("bad.yaml", &bad).unwrap();
    testbed.start_agent().unwrap();
    for expected in [
        "Service default/loop: spec.clusterIP: 127.0.0.1 is a loopback address",
        "Service default/anywhere: spec.externalIPs[0]: 0.0.0.0 is the unspecified address",
        "Service default/loop6: spec.clusterIP: ::1 is a loopback address",
        "Service default/zero: spec.ports[0].targetPort: 0 is not a port",
    ] {
        assert!(
            testbed.agent_output().contains(expected),
            "{expected}: {}",
            testbed.agent_output()
        );
    }
    // Nothing of theirs is in the maps: the pod's own loopback (nothing listens there) and
    // the refused Services' addresses are left alone.
    for address in [
        "127.0.0.1:8888",
        "[::1]:8888",
        "10.96.0.20:8888",
        "10.96.0.30:8888",
    ] {
        let probe = testbed.probe(&client, address, 1).unwrap().remove(0);
        assert!(probe.hostname().is_none(), "{address}: {probe:?}");
    }
    let services: Vec<String> = testbed
        .services()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["service"].as_str().map(str::to_owned))
        .collect();
    assert!(
        services.iter().all(|service| service == "default/web"),
        "{services:?}"
    );
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:80", 5).unwrap()),
        BTreeSet::from(["web-0".to_owned()])
    );
}

#[test]
fn a_later_claim_never_takes_over_a_live_service() {
    if !privileged("a_later_claim_never_takes_over_a_live_service") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    testbed
        .write_manifest(
            "web.yaml",
            &(web("", "port: 80, targetPort: 8888")
                + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[0].ip]))),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();

    // A newcomer on web's clusterIP:port, whose name sorts first.
    testbed
        .write_manifest(
            "zzz.yaml",
            &(web("", "port: 80, targetPort: 8888").replace("name: web,", "name: aa-hijack,")
                + &slice(
                    "aa-hijack",
                    "aa-hijack-a",
                    8888,
                    "TCP",
                    &ready(&[pods[1].ip]),
                )),
        )
        .unwrap();
    let ignored =
        "Service default/aa-hijack claims 10.96.0.10:80/TCP which Service default/web already has";
    wait_for(
        "the newcomer to be ignored",
        Duration::from_secs(10),
        || Ok(testbed.agent_output().contains(ignored).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", testbed.agent_output()));
    // Named with the file it is in, and listed by `lb services` on that frontend.
    assert!(
        testbed
            .agent_output()
            .contains(&format!("zzz.yaml: {ignored}")),
        "{}",
        testbed.agent_output()
    );
    let listed = |testbed: &Testbed| {
        testbed.services().unwrap().iter().any(|entry| {
            entry["service"] == "default/aa-hijack"
                && entry["kind"] == "Ignored"
                && entry["address"] == "10.96.0.10"
                && entry["port"] == 80
                && entry["why"]
                    .as_str()
                    .is_some_and(|why| why.contains("which Service default/web has"))
        })
    };
    // The state file is written after the sync.
    wait_for("lb services to list it", Duration::from_secs(5), || {
        Ok(listed(&testbed).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", testbed.services()));
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:80", 10).unwrap()),
        BTreeSet::from(["web-0".into()])
    );

    // A restart sees both at once: web served the frontend, and keeps it.
    testbed.stop_agent().unwrap();
    testbed.start_agent().unwrap();
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:80", 10).unwrap()),
        BTreeSet::from(["web-0".into()])
    );
    assert!(
        testbed.agent_output().contains(ignored),
        "{}",
        testbed.agent_output()
    );
}

/// A Service address that is also an endpoint's (the API server allows a clusterIP equal to
/// a pod IP): connects to that pod become the Service's, so the agent warns, naming it.
#[test]
fn a_service_address_that_is_also_an_endpoints_is_warned_about() {
    if !privileged("a_service_address_that_is_also_an_endpoints_is_warned_about") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    let shadow = web("", "port: 80, targetPort: 8888")
        .replace("name: web,", "name: shadow,")
        .replace("10.96.0.10", &pods[1].ip.to_string());
    testbed
        .write_manifest(
            "web.yaml",
            &(web("", "port: 80, targetPort: 8888")
                + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[1].ip]))
                + "---\n"
                + &shadow
                + &slice("shadow", "shadow-a", 8888, "TCP", &ready(&[pods[0].ip]))),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    let warning = format!(
        "Service default/shadow: its address {} is also an endpoint's address",
        pods[1].ip
    );
    wait_for("the warning", Duration::from_secs(10), || {
        Ok(testbed.agent_output().contains(&warning).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", testbed.agent_output()));
    // What it warns about: a connect to that pod on the Service's port is the Service's.
    assert_eq!(
        hostnames(
            &testbed
                .probe(&client, &format!("{}:80", pods[1].ip), 4)
                .unwrap()
        ),
        BTreeSet::from(["web-0".into()])
    );
    assert_eq!(testbed.agent_output().matches(&warning).count(), 1);

    // After a restart the maps already hold it all and nothing is written: warned again.
    testbed.stop_agent().unwrap();
    testbed.start_agent().unwrap();
    wait_for(
        "the warning after a restart",
        Duration::from_secs(10),
        || Ok(testbed.agent_output().contains(&warning).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", testbed.agent_output()));
}

/// `trafficDistribution: PreferClose` (PreferSameZone): the EndpointSlice controller hints
/// each endpoint for a zone, and a node's clients use the endpoints hinted for its zone
/// (`--node-zone`, or its Node's `topology.kubernetes.io/zone`), as kube-proxy's
/// CategorizeEndpoints does; `lb explain` says which rule chose them.
#[test]
fn zone_hints_keep_clients_in_their_zone() {
    if !privileged("zone_hints_keep_clients_in_their_zone") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    let endpoints = format!(
        "[{{addresses: [\"{}\"], hints: {{forZones: [{{name: zone-a}}]}}}}, \
          {{addresses: [\"{}\"], hints: {{forZones: [{{name: zone-b}}]}}}}]",
        pods[0].ip, pods[1].ip
    );
    testbed
        .write_manifest(
            "web.yaml",
            &(web(
                "  trafficDistribution: PreferClose",
                "port: 80, targetPort: 8888",
            ) + &slice("web", "web-a", 8888, "TCP", &endpoints)),
        )
        .unwrap();
    testbed.start_agent_in_zone("zone-a").unwrap();
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    assert_eq!(
        hostnames(&testbed.probe(&client, "10.96.0.10:80", 20).unwrap()),
        BTreeSet::from(["web-0".into()])
    );
    let explained = testbed.lb(&["explain", "10.96.0.10:80"]).unwrap();
    assert!(
        explained.contains(
            "PreferSameZone: every ready endpoint has zone hints and one is for this node's zone"
        ),
        "{explained}"
    );
}

/// An unconnected UDP socket keeps its backend, as a conntrack entry keeps a UDP flow's
/// under kube-proxy, until that backend leaves the Service; other sockets spread.
#[test]
fn an_unconnected_udp_socket_keeps_its_backend_while_the_backend_stays() {
    if !privileged("an_unconnected_udp_socket_keeps_its_backend_while_the_backend_stays") {
        return;
    }
    let (mut testbed, pods, client) = node(3, 5353);
    let manifest = |pods: &[&Pod]| {
        let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
        web("", "port: 53, targetPort: 5353, protocol: UDP")
            + &slice("web", "web-a", 5353, "UDP", &ready(&ips))
    };
    let all: Vec<&Pod> = pods.iter().collect();
    testbed.write_manifest("dns.yaml", &manifest(&all)).unwrap();
    testbed.start_agent().unwrap();
    let backends: Vec<String> = pods.iter().map(|p| format!("{}:5353", p.ip)).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    testbed
        .wait_for_frontend("10.96.0.10:53/UDP", Some(&backends))
        .unwrap();

    let mut chosen = BTreeSet::new();
    for _ in 0..12 {
        let probes = testbed
            .probe_with(
                &client,
                "10.96.0.10:53",
                8,
                &["--mode", "udp", "--same-socket"],
            )
            .unwrap();
        assert_all_answered(&probes);
        let answered = hostnames(&probes);
        assert_eq!(answered.len(), 1, "one socket, one backend: {probes:?}");
        chosen.extend(answered);
    }
    // Twelve sockets all on one of three backends: a chance of 3 in 3^12.
    assert!(chosen.len() > 1, "every socket chose {chosen:?}");

    // One socket sending throughout while its backend leaves the Service.
    let (prober, first) = testbed
        .one_socket_prober(&client, "10.96.0.10:53", "udp", 10, 20_000)
        .unwrap();
    let before = first.hostname().unwrap().to_owned();
    let set_backends = |pods: &[&Pod]| {
        testbed.write_manifest("dns.yaml", &manifest(pods)).unwrap();
        let backends: Vec<String> = pods.iter().map(|p| format!("{}:5353", p.ip)).collect();
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        testbed
            .wait_for_frontend("10.96.0.10:53/UDP", Some(&backends))
            .unwrap();
        monotonic_ns()
    };
    // Another backend leaves, which renumbers the slots: the socket stays where it is.
    let other = pods.iter().find(|p| p.name != before).unwrap();
    let others_gone = set_backends(
        &pods
            .iter()
            .filter(|p| p.name != other.name)
            .collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_secs(1));
    // Its own backend leaves: the socket moves.
    let own_leaves_from = monotonic_ns();
    let moved_by = set_backends(&pods.iter().filter(|p| p.name != before).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(1));
    let rest = prober.finish().unwrap();
    let stayed: Vec<Probe> = rest
        .iter()
        .filter(|p| (others_gone..own_leaves_from).contains(&p.at_ns))
        .map(|p| p.probe.clone())
        .collect();
    assert!(stayed.len() > 10, "too few datagrams to tell: {stayed:?}");
    assert_all_answered(&stayed);
    assert_eq!(
        hostnames(&stayed),
        BTreeSet::from([before.clone()]),
        "the socket left {before} when another backend went"
    );
    let after: Vec<Probe> = rest
        .into_iter()
        .filter(|p| p.at_ns > moved_by)
        .map(|p| p.probe)
        .collect();
    assert!(after.len() > 10, "too few datagrams to tell: {after:?}");
    assert_all_answered(&after);
    let now = hostnames(&after);
    assert_eq!(now.len(), 1, "the socket settled on one backend: {now:?}");
    assert!(!now.contains(&before), "still on {before}, which left");
}

fn node_port_31642() -> (Testbed, Pod) {
    let (testbed, pods, client) = node(1, 8888);
    testbed
        .write_manifest(
            "web.yaml",
            &(web(
                "  type: NodePort",
                "port: 8888, targetPort: 8888, nodePort: 31642",
            ) + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[0].ip]))),
        )
        .unwrap();
    (testbed, client)
}

/// A process on the node that binds a NodePort (on any address), or a LoadBalancer or
/// external IP and its port, would take the Service's traffic from off-node clients: the
/// bind fails with EADDRINUSE, as if a socket held the port. Pods bind what they like.
#[test]
fn a_host_bind_on_a_service_address_fails_with_eaddrinuse() {
    if !privileged("a_host_bind_on_a_service_address_fails_with_eaddrinuse") {
        return;
    }
    let (mut testbed, pods, client) = node(1, 8888);
    let service = web(
        "  type: LoadBalancer\n  externalIPs: [203.0.113.7]",
        "port: 80, targetPort: 8888, nodePort: 30695",
    );
    testbed
        .write_manifest(
            "web.yaml",
            &(service + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[0].ip]))),
        )
        .unwrap();
    // The external IP is an address of the node, as kube-vip or keepalived would add it.
    testbed
        .node_ip_command(&["addr", "add", "203.0.113.7/32", "dev", "br0"])
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("127.0.0.1:30695/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    let node = testbed.node();
    let bind = |pod: &Pod, address: &str, mode: &str| {
        testbed
            .probe_with(pod, address, 1, &["--mode", mode])
            .unwrap()
            .remove(0)
    };
    let refused = [
        "0.0.0.0:30695",
        "10.244.0.1:30695",
        "127.0.0.1:30695",
        "203.0.113.7:80",
        "[::]:30695",
        "[::ffff:10.244.0.1]:30695",
    ];
    for address in refused {
        let probe = bind(&node, address, "bind-tcp");
        assert!(
            probe
                .error()
                .is_some_and(|e| e.contains("Address already in use")),
            "{address}: {probe:?}"
        );
    }
    // Another port, the wildcard on the external IP's port (only a NodePort is on every
    // address), another protocol, and a pod's own netns are left alone.
    for (pod, address, mode) in [
        (&node, "0.0.0.0:30696", "bind-tcp"),
        (&node, "203.0.113.7:81", "bind-tcp"),
        (&node, "0.0.0.0:80", "bind-tcp"),
        (&node, "0.0.0.0:30695", "bind-udp"),
        (&client, "0.0.0.0:30695", "bind-tcp"),
    ] {
        let probe = bind(pod, address, mode);
        assert_eq!(probe.peer(), Some(address), "{address} ({mode}): {probe:?}");
    }
    assert_eq!(
        testbed.stat("bind_refused").unwrap(),
        u64::try_from(refused.len()).unwrap()
    );
}

/// With binds on NodePorts refused, an ephemeral port drawn from the NodePort range would
/// fail a bind or connect on the node: the range is reserved in the node's netns while the
/// datapath is loaded, and `lb unload` gives back exactly what the agent added.
#[test]
fn the_node_port_range_is_kept_out_of_the_ephemeral_ports_until_unload() {
    if !privileged("the_node_port_range_is_kept_out_of_the_ephemeral_ports_until_unload") {
        return;
    }
    let (mut testbed, _client) = node_port_31642();
    let node = testbed.node();
    /// Writes (with a value) or reads the node netns's `net.ipv4.NAME`.
    fn sysctl(testbed: &Testbed, name: &str, value: Option<&str>) -> String {
        let path = format!("/proc/sys/net/ipv4/{name}");
        let mut command = testbed.netns_command(&testbed.node(), "sh").unwrap();
        match value {
            Some(value) => command.args(["-c", &format!("echo '{value}' > {path}")]),
            None => command.args(["-c", &format!("cat {path}")]),
        };
        let output = lb_tests::run(&mut command).unwrap();
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }
    // An operator's own reservations, and ephemeral ports that overlap the NodePorts.
    sysctl(&testbed, "ip_local_reserved_ports", Some("8080,30500"));
    sysctl(&testbed, "ip_local_port_range", Some("30000 32800"));
    testbed.start_agent().unwrap();
    assert_eq!(
        sysctl(&testbed, "ip_local_reserved_ports", None),
        "8080,30000-32767"
    );

    // Ephemeral ports come from what is left: 32768-32800.
    let probes = testbed
        .probe_with(&node, "0.0.0.0:0", 20, &["--mode", "bind-tcp"])
        .unwrap();
    for probe in &probes {
        let port: u16 = probe
            .peer()
            .and_then(|p| p.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_default();
        assert!((32768..=32800).contains(&port), "{probe:?}");
    }

    // A restart keeps the reservation, and still gives back only its own part.
    testbed.stop_agent().unwrap();
    testbed.start_agent().unwrap();
    assert_eq!(
        sysctl(&testbed, "ip_local_reserved_ports", None),
        "8080,30000-32767"
    );
    testbed.stop_agent().unwrap();
    let unloaded = testbed.lb(&["unload"]).unwrap();
    assert!(
        unloaded.contains("gave back NodePorts 30000-30499,30501-32767"),
        "{unloaded}"
    );
    assert_eq!(
        sysctl(&testbed, "ip_local_reserved_ports", None),
        "8080,30500"
    );
}

#[test]
fn node_ports_follow_the_node_addresses() {
    if !privileged("node_ports_follow_the_node_addresses") {
        return;
    }
    let (mut testbed, client) = node_port_31642();
    testbed.discover_node_ips = true;
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("10.244.0.1:31642/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();

    // The node gets another address while the agent runs: its NodePort answers there too.
    testbed
        .node_ip_command(&["addr", "add", "10.244.255.7/16", "dev", "br0"])
        .unwrap();
    testbed
        .wait_for_frontend("10.244.255.7:31642/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    let probes = testbed.probe(&client, "10.244.255.7:31642", 2).unwrap();
    assert_eq!(hostnames(&probes), BTreeSet::from(["web-0".into()]));
    assert_eq!(probes[0].peer(), Some("10.244.255.7:31642"));

    // And the frontend goes with the address; the other stays.
    testbed
        .node_ip_command(&["addr", "del", "10.244.255.7/16", "dev", "br0"])
        .unwrap();
    testbed
        .wait_for_frontend("10.244.255.7:31642/TCP", None)
        .unwrap();
    assert_all_answered(&testbed.probe(&client, "10.244.0.1:31642", 2).unwrap());
    assert!(
        testbed.agent_output().contains("node addresses changed"),
        "{}",
        testbed.agent_output()
    );
}

/// Load-balancer ingress IPs are VIPs for on-node clients, unless the load balancer
/// proxies (ipMode Proxy). (External IPs are upstream's case: tests/conformance.rs.)
#[test]
fn load_balancer_ingress_ips_act_as_vips_unless_proxied() {
    if !privileged("load_balancer_ingress_ips_act_as_vips_unless_proxied") {
        return;
    }
    let (mut testbed, pods, client) = node(1, 8888);
    let service = web(
        "  type: LoadBalancer",
        "port: 80, targetPort: 8888, nodePort: 30695",
    ) + "status:\n  loadBalancer:\n    ingress:\n    - {ip: 198.51.100.1}\n    - {ip: 198.51.100.2, ipMode: Proxy}\n";
    testbed
        .write_manifest(
            "web.yaml",
            &(service + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[0].ip]))),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend("198.51.100.1:80/TCP", Some(&["10.244.0.10:8888"]))
        .unwrap();
    for address in ["198.51.100.1:80", "10.244.0.1:30695"] {
        let probes = testbed.probe(&client, address, 2).unwrap();
        assert_eq!(
            hostnames(&probes),
            BTreeSet::from(["web-0".into()]),
            "{address}: {probes:?}"
        );
        assert_eq!(probes[0].peer(), Some(address));
    }
    // ipMode Proxy: the load balancer proxies to the node; the IP is not a VIP here.
    let proxied = testbed.probe(&client, "198.51.100.2:80", 1).unwrap();
    assert!(
        proxied[0]
            .error()
            .is_some_and(|e| e.contains("unreachable")),
        "{proxied:?}"
    );
}

/// With `sessionAffinity: ClientIP`, a backend that leaves the Service takes its clients'
/// affinity with it, timeout or not: they move to a backend that stays. (That affinity
/// holds, times out and can be switched are upstream's cases: tests/conformance.rs.)
#[test]
fn session_affinity_follows_its_backend_away() {
    if !privileged("session_affinity_follows_its_backend_away") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    let ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
    let manifest = |ips: &[Ipv4Addr]| {
        web(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3600}}",
            "port: 80, targetPort: 8888",
        ) + &slice("web", "web-a", 8888, "TCP", &ready(ips))
    };
    testbed.write_manifest("web.yaml", &manifest(&ips)).unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    let held = hostnames(&testbed.probe(&client, "10.96.0.10:80", 5).unwrap());
    assert_eq!(held.len(), 1);
    let (gone, other) = if held.contains("web-0") {
        (0, 1)
    } else {
        (1, 0)
    };
    testbed
        .write_manifest("web.yaml", &manifest(&[ips[other]]))
        .unwrap();
    let expected = format!("{}:8888", ips[other]);
    testbed
        .wait_for_frontend("10.96.0.10:80/TCP", Some(&[expected.as_str()]))
        .unwrap();
    let after = testbed.probe(&client, "10.96.0.10:80", 5).unwrap();
    assert_all_answered(&after);
    assert_eq!(
        hostnames(&after),
        BTreeSet::from([format!("web-{other}")]),
        "web-{gone} left"
    );
}

#[test]
fn endpoint_slices_are_merged_and_other_address_types_ignored() {
    if !privileged("endpoint_slices_are_merged_and_other_address_types_ignored") {
        return;
    }
    let (mut testbed, pods, client) = node(2, 8888);
    let ipv6 = r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints: [{addresses: ["fd00::10"]}]
ports: [{name: p, port: 8888, protocol: TCP}]
"#;
    testbed
        .write_manifest(
            "web.yaml",
            &(web("", "port: 80, targetPort: 8888")
                + &slice("web", "web-a", 8888, "TCP", &ready(&[pods[0].ip]))
                + &slice(
                    "web",
                    "web-b",
                    8888,
                    "TCP",
                    &ready(&[pods[0].ip, pods[1].ip]),
                )
                + ipv6),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:80", 40).unwrap();
    assert_all_answered(&probes);
    assert_eq!(
        hostnames(&probes),
        BTreeSet::from(["web-0".into(), "web-1".into()])
    );
}

#[test]
fn headless_and_external_name_services_are_listed_with_why() {
    if !privileged("headless_and_external_name_services_are_listed_with_why") {
        return;
    }
    let (mut testbed, _pods, client) = node(0, 8888);
    testbed
        .write_manifest(
            "others.yaml",
            r#"apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: external-service, namespace: default}
spec: {type: ExternalName, externalName: api.acmecorp.com, ports: [{port: 9000}]}
"#,
        )
        .unwrap();
    testbed.start_agent().unwrap();
    let services = wait_for("the state file", Duration::from_secs(10), || {
        let services = testbed.services()?;
        Ok((services.len() == 2).then_some(services))
    })
    .unwrap();
    assert_eq!(services[0]["service"], "default/db");
    assert_eq!(services[0]["kind"], "Headless");
    assert_eq!(services[0]["in_datapath"], false);
    assert_eq!(services[0]["why"], "headless: DNS answers with the pod IPs");
    assert_eq!(services[1]["service"], "default/external-service");
    assert_eq!(services[1]["kind"], "ExternalName");
    assert_eq!(
        services[1]["why"],
        "ExternalName: DNS answers with a CNAME to api.acmecorp.com"
    );
    let table = testbed.lb(&["services"]).unwrap();
    assert!(
        table.contains("default/db") && table.contains("Headless"),
        "{table}"
    );
    // Nothing of them reaches the datapath: no frontend translates anything.
    let probe = testbed.probe(&client, "10.96.0.10:9000", 1).unwrap();
    assert!(probe[0].error().is_some());
    assert_eq!(testbed.stat("connect_translated").unwrap(), 0);
}

#[test]
fn scaling_1_10_0_3_under_load_fails_only_while_there_are_no_endpoints() {
    if !privileged("scaling_1_10_0_3_under_load_fails_only_while_there_are_no_endpoints") {
        return;
    }
    let (mut testbed, pods, client) = node(10, 8888);
    let ips: Vec<_> = pods.iter().map(|p| p.ip).collect();
    let manifest = |n: usize| {
        web("", "port: 80, targetPort: 8888")
            + &slice("web", "web-a", 8888, "TCP", &ready(&ips[..n]))
    };
    let expect =
        |n: usize| -> Vec<String> { ips[..n].iter().map(|ip| format!("{ip}:8888")).collect() };
    let wait = |testbed: &Testbed, n: usize| {
        let backends = expect(n);
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        testbed
            .wait_for_frontend("10.96.0.10:80/TCP", Some(&backends))
            .unwrap();
    };
    testbed.write_manifest("web.yaml", &manifest(1)).unwrap();
    testbed.start_agent().unwrap();
    wait(&testbed, 1);

    // One client connecting back to back, bounded in count and in time.
    let mut prober = testbed
        .probe_command(
            &client,
            "10.96.0.10:80",
            20_000,
            &["--interval-ms", "2", "--for-ms", "30000"],
        )
        .unwrap()
        .spawn()
        .unwrap();
    let pause = Duration::from_millis(500);
    std::thread::sleep(pause);
    testbed.write_manifest("web.yaml", &manifest(10)).unwrap();
    wait(&testbed, 10);
    std::thread::sleep(pause);
    let no_endpoints_from = monotonic_ns();
    testbed.write_manifest("web.yaml", &manifest(0)).unwrap();
    wait(&testbed, 0);
    std::thread::sleep(pause);
    testbed.write_manifest("web.yaml", &manifest(3)).unwrap();
    wait(&testbed, 3);
    let no_endpoints_until = monotonic_ns();
    std::thread::sleep(pause);
    drop(prober.kill());
    let mut output = String::new();
    prober
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    drop(prober.wait());

    let probes = parse_probes(&output).unwrap();
    let (during, outside): (Vec<_>, Vec<_>) = probes
        .iter()
        .partition(|p| (no_endpoints_from..=no_endpoints_until).contains(&p.at_ns));
    let failed: Vec<_> = outside
        .iter()
        .filter(|p| p.probe.hostname().is_none())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connects failed while the Service had endpoints: {:?}",
        failed.len(),
        outside.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        outside.len() > 100,
        "too few connects to tell: {}",
        outside.len()
    );
    assert_eq!(
        hostnames(&outside.iter().map(|p| p.probe.clone()).collect::<Vec<_>>()).len(),
        10,
        "every one of the ten backends answered at some point"
    );
    // Without endpoints a connect is refused, never left hanging.
    for probe in during.iter().filter(|p| p.probe.hostname().is_none()) {
        assert!(
            probe.probe.error().is_some_and(|e| e.contains("refused")),
            "{probe:?}"
        );
    }
    assert!(
        during.iter().any(|p| p.probe.hostname().is_none()),
        "no connect saw zero endpoints"
    );
}
