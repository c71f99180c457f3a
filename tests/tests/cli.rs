//! The `lb` CLI against a running and a stopped agent: golden output for a known set of
//! Services, every command in every format, each error case, and proof that it only reads.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use lb_tests::{Pod, Testbed, privileged, run};

/// A known set: a ClusterIP with a not-ready endpoint, a UDP NodePort with affinity, a
/// node-local Service, a headless one and an ExternalName.
const KNOWN: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8888}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.10], nodeName: node-1}
- {addresses: [10.244.0.11], nodeName: node-2}
- {addresses: [10.244.0.12], nodeName: node-2, conditions: {ready: false}}
ports: [{name: http, port: 8888}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: dns, port: 53, targetPort: 8888, nodePort: 30053, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.11], nodeName: node-2}
ports: [{name: dns, port: 8888, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  internalTrafficPolicy: Local
  ports: [{port: 8080, targetPort: 8888}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: shop, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.10], nodeName: node-1}
- {addresses: [10.244.0.11], nodeName: node-2}
ports: [{port: 8888}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: external-service, namespace: shop}
spec: {type: ExternalName, externalName: api.acmecorp.com, ports: [{port: 9000}]}
"#;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// Compares `actual` with golden file `name`; `LB_UPDATE_GOLDEN=1` rewrites the file.
fn assert_golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    let actual: String = actual
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    if std::env::var_os("LB_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (LB_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "{} differs (LB_UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

/// A node with the known set loaded and two backend pods.
fn known_node() -> (Testbed, Vec<Pod>, Pod) {
    let (mut testbed, pods, client) = Testbed::with_backends(2, 8888).unwrap();
    testbed.write_manifest("known.yaml", KNOWN).unwrap();
    testbed.start_agent().unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    (testbed, pods, client)
}

const COMMANDS: [&[&str]; 6] = [
    &["services"],
    &["backends"],
    &["affinity"],
    &["stats"],
    &["status"],
    &["explain", "10.96.0.10:80"],
];

fn every_command_in_every_format(testbed: &Testbed) {
    for command in COMMANDS {
        for format in ["table", "wide", "json", "yaml"] {
            let mut args = command.to_vec();
            args.extend(["-o", format]);
            let out = testbed.lb(&args).unwrap();
            match format {
                "json" => drop(serde_json::from_str::<serde_json::Value>(&out).unwrap()),
                "yaml" => drop(serde_yaml::from_str::<serde_yaml::Value>(&out).unwrap()),
                _ => assert!(!out.trim().is_empty(), "{args:?} printed nothing"),
            }
        }
    }
}

#[test]
fn golden_output_for_a_known_set_of_services() {
    if !privileged("golden_output_for_a_known_set_of_services") {
        return;
    }
    let (mut testbed, _pods, _client) = known_node();
    assert_golden("services.txt", &testbed.lb(&["services"]).unwrap());
    assert_golden(
        "services-wide.txt",
        &testbed.lb(&["services", "-o", "wide"]).unwrap(),
    );
    assert_golden(
        "services.json",
        &testbed.lb(&["services", "-o", "json"]).unwrap(),
    );
    assert_golden(
        "services-shop-web.txt",
        &testbed.lb(&["services", "shop/web"]).unwrap(),
    );
    assert_golden("backends.txt", &testbed.lb(&["backends"]).unwrap());
    assert_golden(
        "explain-web.txt",
        &testbed.lb(&["explain", "10.96.0.10:80"]).unwrap(),
    );
    assert_golden(
        "explain-local.txt",
        &testbed.lb(&["explain", "10.96.0.20:8080/tcp"]).unwrap(),
    );
    assert_golden(
        "explain-none.txt",
        &testbed.lb(&["explain", "10.96.0.53:53"]).unwrap(),
    );
    // By name: every frontend of the Service, each as by its address.
    let by_name: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["explain", "shop/web", "-o", "json"]).unwrap()).unwrap();
    let frontends: std::collections::BTreeSet<String> = testbed
        .services()
        .unwrap()
        .iter()
        .filter(|entry| entry["service"] == "shop/web")
        .map(|entry| {
            format!(
                "{}:{}/{}",
                entry["address"].as_str().unwrap(),
                entry["port"],
                entry["protocol"].as_str().unwrap()
            )
        })
        .collect();
    let explained: std::collections::BTreeSet<String> = by_name
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["destination"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(explained, frontends);
    let web_by_address: serde_json::Value = serde_json::from_str(
        &testbed
            .lb(&["explain", "10.96.0.10:80", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert!(by_name.as_array().unwrap().contains(&web_by_address));

    // The same with the agent stopped: the CLI reads pins and the state file only.
    testbed.stop_agent().unwrap();
    assert_golden("services.txt", &testbed.lb(&["services"]).unwrap());
    assert_golden(
        "services.json",
        &testbed.lb(&["services", "-o", "json"]).unwrap(),
    );
}

#[test]
fn every_command_works_with_the_agent_running_and_stopped() {
    if !privileged("every_command_works_with_the_agent_running_and_stopped") {
        return;
    }
    let (mut testbed, _pods, client) = known_node();
    // Traffic, so that affinity and the counters have something to show.
    let probes = testbed
        .probe_with(&client, "10.96.0.53:53", 3, &["--mode", "udp"])
        .unwrap();
    assert!(
        probes.iter().all(|p| p.hostname() == Some("web-1")),
        "{probes:?}"
    );

    every_command_in_every_format(&testbed);
    let status: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["status", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(status["agent_running"], true, "{status}");
    assert_eq!(status["node"], "node-1");
    assert_eq!(status["layout"], "v4");
    // The datapath loaded, so the kernel has what it requires; the optional features are
    // told one way or the other (the kernel has BTF).
    let features = status["features"].as_array().unwrap();
    assert!(features.len() >= 7, "{features:?}");
    for feature in features {
        if feature["required"] == true {
            assert_eq!(feature["available"], true, "{feature}");
        } else {
            assert!(feature["available"].is_boolean(), "{feature}");
        }
    }
    for program in status["programs"].as_array().unwrap() {
        assert_eq!(program["attached"], true, "{program}");
        assert_eq!(
            program["cgroup"],
            testbed.cgroup.display().to_string(),
            "{program}"
        );
    }
    let hooks: Vec<&str> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["attach_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        hooks,
        [
            "cgroup/connect4",
            "cgroup/sendmsg4",
            "cgroup/recvmsg4",
            "cgroup/getpeername4",
            "cgroup/connect6",
            "cgroup/sendmsg6",
            "cgroup/recvmsg6",
            "cgroup/getpeername6",
            "cgroup/post_bind4",
            "cgroup/post_bind6"
        ]
    );
    let occupancy = |status: &serde_json::Value, map: &str| {
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == map)
            .map(|m| {
                (
                    m["entries"].as_u64().unwrap(),
                    m["max_entries"].as_u64().unwrap(),
                )
            })
            .unwrap()
    };
    // Frontends 10.96.0.10:80 (2 slots), 10.96.0.53:53, 10.244.0.1:30053, 127.0.0.1:30053
    // (1 slot each), 10.96.0.20:8080 (1 slot): 5 masters + 6 slots.
    // A small node's worth: the maps grow only when the source needs more.
    assert_eq!(occupancy(&status, lb_common::SERVICE_MAP), (11, 4096));
    assert_eq!(occupancy(&status, lb_common::BACKEND_MAP).0, 2);

    let affinity: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["affinity", "-o", "json"]).unwrap()).unwrap();
    let entries = affinity.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{affinity}");
    assert_eq!(entries[0]["service"], "kube-system/dns");
    assert_eq!(entries[0]["frontend"], "10.96.0.53:53/UDP");
    assert_eq!(entries[0]["backend_address"], "10.244.0.11");
    assert_eq!(entries[0]["timeout_s"], 600);
    assert_eq!(entries[0]["live"], true);

    let stats: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(stats["sendmsg_translated"], 3);
    assert_eq!(stats["affinity_hit"], 2);

    testbed.stop_agent().unwrap();
    every_command_in_every_format(&testbed);
    let status: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["status", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(status["agent_running"], false, "{status}");
    assert_eq!(
        status["programs"][0]["attached"], true,
        "the datapath outlives the agent"
    );

    let completions =
        run(Command::new(lb_tests::binary("lb").unwrap()).args(["completions", "bash"])).unwrap();
    assert!(String::from_utf8_lossy(&completions.stdout).contains("complete -F _lb"));
}

/// Runs `lb` expecting failure: a non-zero exit and one line on stderr, no panic.
fn assert_fails(mut command: Command, expected: &str) {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{command:?} succeeded");
    assert_ne!(
        output.status.code(),
        Some(101),
        "{command:?} panicked: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(
        stderr.contains(expected),
        "{command:?}: {stderr:?} lacks {expected:?}"
    );
}

#[test]
fn errors_are_one_line_with_what_to_do() {
    if !privileged("errors_are_one_line_with_what_to_do") {
        return;
    }
    let (testbed, _pods, _client) = known_node();
    let lb = lb_tests::binary("lb").unwrap();

    // Not root.
    let mut not_root = Command::new("setpriv");
    not_root
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&lb)
        .args(["services", "--bpffs"])
        .arg(&testbed.bpffs);
    assert_fails(not_root, "needs root");

    // bpffs not mounted where the pins are said to be.
    let mut no_bpffs = Command::new(&lb);
    no_bpffs.args(["services", "--bpffs", "/tmp"]);
    assert_fails(no_bpffs, "is not on a bpffs");

    // Nothing pinned.
    let empty = PathBuf::from(format!("{}-empty", testbed.bpffs.display()));
    let mut nothing = Command::new(&lb);
    nothing.args(["status", "--bpffs"]).arg(&empty);
    assert_fails(nothing, "nothing is pinned");

    // Maps pinned by another layout version.
    // (bpffs refuses names with a dot.)
    let old = OldLayout::pin(Path::new(&format!("{}-old", testbed.bpffs.display())));
    let mut mismatch = Command::new(&lb);
    mismatch.args(["services", "--bpffs"]).arg(&old.0);
    assert_fails(
        mismatch,
        "pinned by another lb version (found lb4_svc_v1, this lb reads lb_svc_v4)",
    );

    // Bad arguments and unknown names.
    let mut bad_destination = testbed.lb_command(&["explain", "10.96.0.10"]).unwrap();
    bad_destination.env("NO_COLOR", "1");
    let output = bad_destination.output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not an ADDRESS:PORT"));
    assert_fails(
        testbed.lb_command(&["services", "shop/nope"]).unwrap(),
        "no Service shop/nope",
    );
}

/// A map pinned under an older layout's name, removed on drop.
struct OldLayout(PathBuf);

impl OldLayout {
    fn pin(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let guard = Self(dir.to_owned());
        run(Command::new("bpftool")
            .args(["map", "create"])
            .arg(dir.join("lb4_svc_v1"))
            .args([
                "type",
                "hash",
                "key",
                "12",
                "value",
                "8",
                "entries",
                "16",
                "name",
                "lb4_svc_v1",
            ]))
        .unwrap();
        guard
    }
}

impl Drop for OldLayout {
    fn drop(&mut self) {
        drop(std::fs::remove_file(self.0.join("lb4_svc_v1")));
        drop(std::fs::remove_dir(&self.0));
    }
}

/// Every entry of every pinned map, as bpftool dumps it.
fn dump_maps(testbed: &Testbed) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(&testbed.bpffs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        // Maps carry a layout version in their name; the links (lb_connect4, …) do not.
        // Socket storage cannot be dumped (it is keyed by socket), nor written but by the
        // programs and by a holder of the socket.
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.contains("_v") && name != lb_common::SOCKET_MAP
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|path| {
            let out = run(Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(path))
            .unwrap();
            format!(
                "{}\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout)
            )
        })
        .collect()
}

#[test]
fn the_cli_only_reads() {
    if !privileged("the_cli_only_reads") {
        return;
    }
    let (mut testbed, _pods, client) = known_node();
    drop(
        testbed
            .probe_with(&client, "10.96.0.53:53", 2, &["--mode", "udp"])
            .unwrap(),
    );
    // Stopped, so that nothing but the CLI could touch the maps.
    testbed.stop_agent().unwrap();
    let before = dump_maps(&testbed);
    assert!(before.contains(lb_common::SERVICE_MAP), "{before}");
    every_command_in_every_format(&testbed);
    drop(testbed.lb(&["services", "shop/web", "-o", "wide"]).unwrap());
    assert_eq!(before, dump_maps(&testbed));
}

#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    // The reading end closed before lb writes, as `lb … | head` leaves it once head is done.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(lb_tests::binary("lb").unwrap())
        .args(["completions", "bash"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{stderr}");
}

/// A start that fails after loading the datapath onto an empty pin directory takes back
/// what it made — links (so nothing stays attached), pins, reserved NodePorts; one that
/// fails over an earlier agent's pins leaves them serving. Flags are checked first.
#[test]
fn a_failed_start_leaves_nothing_behind_and_an_earlier_datapath_serving() {
    if !privileged("a_failed_start_leaves_nothing_behind_and_an_earlier_datapath_serving") {
        return;
    }
    let (mut testbed, _pods, client) = Testbed::with_backends(2, 8888).unwrap();
    let node = testbed.node();
    let reserved = |testbed: &Testbed| {
        let mut cat = testbed.netns_command(&node, "cat").unwrap();
        cat.arg("/proc/sys/net/ipv4/ip_local_reserved_ports");
        String::from_utf8(run(&mut cat).unwrap().stdout).unwrap()
    };
    let pins = |testbed: &Testbed| -> Vec<PathBuf> {
        std::fs::read_dir(&testbed.bpffs)
            .map(|dir| dir.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let attached = |testbed: &Testbed| {
        let out = run(Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&testbed.cgroup)
            .arg("-j"))
        .unwrap();
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            .unwrap_or_default()
            .len()
    };

    // Not a cgroup2 directory: said so, before anything is loaded.
    let mut not_cgroup = Command::new(lb_tests::binary("lb").unwrap());
    not_cgroup
        .args(["agent", "--cgroup", "/tmp", "--bpffs"])
        .arg(&testbed.bpffs)
        .arg("--state-dir")
        .arg(testbed.state_dir())
        .arg("--manifests")
        .arg(&testbed.manifests);
    assert_fails(not_cgroup, "--cgroup /tmp: not a cgroup2 directory");
    assert!(pins(&testbed).is_empty(), "{:?}", pins(&testbed));

    // A source that cannot be followed: said so before anything is loaded too.
    let no_source = ["--kubeconfig".as_ref(), "/nonexistent/kubeconfig".as_ref()];
    let output = testbed.failed_start(&no_source).unwrap();
    assert!(output.contains("/nonexistent/kubeconfig"), "{output}");
    assert!(!output.contains("the start failed"), "{output}");
    assert!(pins(&testbed).is_empty(), "{:?}", pins(&testbed));

    // Fails after loading (its pid file cannot be written: a directory is in its place):
    // everything it made goes.
    let pid_file = testbed.state_dir().join("agent.pid");
    let manifests_dir = testbed.manifests.clone();
    let manifests = ["--manifests".as_ref(), manifests_dir.as_os_str()];
    let fail_after_loading = |testbed: &mut Testbed| {
        std::fs::create_dir_all(&pid_file).unwrap();
        let output = testbed.failed_start(&manifests).unwrap();
        std::fs::remove_dir(&pid_file).unwrap();
        output
    };
    let output = fail_after_loading(&mut testbed);
    assert!(output.contains("the start failed: removed"), "{output}");
    assert!(pins(&testbed).is_empty(), "{:?}", pins(&testbed));
    assert_eq!(attached(&testbed), 0);
    assert_eq!(reserved(&testbed).trim(), "");

    // Over an earlier agent's datapath, a failed start leaves it serving.
    testbed.write_manifest("known.yaml", KNOWN).unwrap();
    testbed.start_agent().unwrap();
    testbed.stop_agent().unwrap();
    let before = pins(&testbed).len();
    let output = fail_after_loading(&mut testbed);
    assert!(output.contains("agent.pid"), "{output}");
    assert_eq!(pins(&testbed).len(), before);
    assert_eq!(reserved(&testbed).trim(), "30000-32767");
    let probes = testbed.probe(&client, "10.96.0.10:80", 4).unwrap();
    assert!(probes.iter().all(|p| p.hostname().is_some()), "{probes:?}");
}
