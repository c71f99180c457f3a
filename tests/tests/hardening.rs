//! A hostile non-root user on the node: what the root agent writes cannot be redirected
//! by them, and what it keeps is not theirs to read.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Command,
    time::Duration,
};

use lb_tests::{Testbed, privileged, run, wait_for};

/// The uid and gid of `nobody`, the hostile user here.
const NOBODY: u32 = 65534;

/// Starts the agent on the testbed's manifests and waits for it to give up; its output.
fn failed_start(testbed: &mut Testbed) -> String {
    let manifests = testbed.manifests.clone();
    testbed
        .failed_start(&["--manifests".as_ref(), manifests.as_os_str()])
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn a_state_dir_another_user_controls_is_refused_and_the_state_is_roots_alone() {
    if !privileged("a_state_dir_another_user_controls_is_refused_and_the_state_is_roots_alone") {
        return;
    }
    let mut testbed = Testbed::new().unwrap();
    let dir = testbed.state_dir();
    std::fs::create_dir_all(&dir).unwrap();

    // Owned by another user.
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = failed_start(&mut testbed);
    assert!(output.contains("owned by uid 65534"), "{output}");

    // Root's, but writable by anyone: the other user plants a link where the agent
    // writes, toward a file of root's.
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = dir.with_file_name("victim");
    std::fs::write(&victim, "root's own\n").unwrap();
    run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "ln",
            "-s",
        ])
        .arg(&victim)
        .arg(dir.join("services.json")))
    .unwrap();
    let output = failed_start(&mut testbed);
    assert!(
        output.contains("writable by group or others (mode 777)"),
        "{output}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's own\n");

    // A link in place of the directory.
    std::fs::remove_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(dir.with_file_name("manifests"), &dir).unwrap();
    let output = failed_start(&mut testbed);
    assert!(output.contains("a symbolic link"), "{output}");
    std::fs::remove_file(&dir).unwrap();

    // Made by the agent: the directory and every file in it are root's alone.
    testbed.start_agent().unwrap();
    assert_eq!(mode(&dir), 0o700);
    for file in ["services.json", "agent.pid", "reserved-ports.json"] {
        let path = dir.join(file);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    assert_eq!(mode(&dir.join("services.json")), 0o600);
}

/// /sys/fs/bpf is world-writable (sticky): another user can make the agent's pin
/// directory before it does, and then remove the links in it, which detaches the
/// programs. The agent refuses a pin directory it does not own, saying why.
#[test]
fn a_pin_directory_another_user_made_is_refused() {
    if !privileged("a_pin_directory_another_user_made_is_refused") {
        return;
    }
    let mut testbed = Testbed::new().unwrap();
    run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "mkdir"])
        .arg(&testbed.bpffs))
    .unwrap();
    assert_eq!(std::fs::metadata(&testbed.bpffs).unwrap().uid(), NOBODY);
    let output = failed_start(&mut testbed);
    assert!(
        output.contains(&format!(
            "--bpffs {}: owned by uid 65534",
            testbed.bpffs.display()
        )),
        "{output}"
    );
    // Nothing was loaded into it.
    assert_eq!(std::fs::read_dir(&testbed.bpffs).unwrap().count(), 0);

    // Made by the agent: root's alone.
    std::fs::remove_dir(&testbed.bpffs).unwrap();
    testbed.start_agent().unwrap();
    assert_eq!(mode(&testbed.bpffs), 0o700);
}

/// Links unpinned under a running agent (which detaches its programs: `/sys/fs/bpf` is
/// world-writable, and anyone with root on the node can do it by mistake) are attached
/// again, and logged; so are map pins. `lb unload` refuses while the agent runs.
#[test]
fn programs_detached_under_the_agent_are_attached_again() {
    if !privileged("programs_detached_under_the_agent_are_attached_again") {
        return;
    }
    let (mut testbed, pods, client) = Testbed::with_backends(1, 8888).unwrap();
    testbed
        .write_manifest(
            "web.yaml",
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
                 spec: {{clusterIP: 10.96.0.10, ports: [{{port: 80, targetPort: 8888}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: web-a, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nendpoints: [{{addresses: [\"{}\"]}}]\nports: [{{port: 8888}}]\n",
                pods[0].ip
            ),
        )
        .unwrap();
    testbed.start_agent().unwrap();
    let answered = |testbed: &Testbed| {
        testbed
            .probe(&client, "10.96.0.10:80", 1)
            .unwrap()
            .iter()
            .all(|p| p.hostname().is_some())
    };
    assert!(answered(&testbed));

    let unload = testbed.lb_command(&["unload"]).unwrap().output().unwrap();
    assert!(!unload.status.success());
    assert!(
        String::from_utf8_lossy(&unload.stderr).contains("is running"),
        "{unload:?}"
    );
    // Whatever state directory it is told: the agent holds the pin directory's lock.
    let unload = Command::new(lb_tests::binary("lb").unwrap())
        .args(["unload", "--bpffs"])
        .arg(&testbed.bpffs)
        .arg("--state-dir")
        .arg(testbed.state_dir().with_file_name("elsewhere"))
        .output()
        .unwrap();
    assert!(!unload.status.success());
    assert!(
        String::from_utf8_lossy(&unload.stderr).contains("is running"),
        "{unload:?}"
    );
    assert!(testbed.bpffs.join("lb_connect4").exists());

    // Every link pin and a map pin removed: the programs are detached at once.
    for entry in std::fs::read_dir(&testbed.bpffs).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("lb_")
            && !name.starts_with("lb_sock")
            && !name.starts_with("lb_stats")
            && !name.starts_with("lb_config")
            || name == lb_common::BACKEND_MAP
        {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    wait_for(
        "the programs attached again",
        Duration::from_secs(10),
        || Ok(answered(&testbed).then_some(())),
    )
    .unwrap();
    // The map pin comes back in the same check, right after the links.
    wait_for("the map pinned again", Duration::from_secs(5), || {
        Ok(testbed
            .bpffs
            .join(lb_common::BACKEND_MAP)
            .exists()
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", testbed.agent_output()));
    assert!(testbed.bpffs.join("lb_connect4").exists());
    let output = testbed.agent_output();
    assert!(
        output.contains("programs attached and maps pinned again"),
        "{output}"
    );
    // The CLI reads the pins again.
    assert!(testbed.lb(&["services"]).unwrap().contains("10.96.0.10:80"));

    // A map pin replaced by another map (the config map moved over the backend map's
    // pin): both are pinned again, and the CLI reads the backends, not the config.
    let backends_pin = testbed.bpffs.join(lb_common::BACKEND_MAP);
    std::fs::rename(testbed.bpffs.join("lb_config_v1"), &backends_pin).unwrap();
    wait_for("the map pins put right", Duration::from_secs(5), || {
        let backends = testbed.lb(&["backends"]).unwrap_or_default();
        Ok((testbed.bpffs.join("lb_config_v1").exists()
            && backends.contains(&pods[0].ip.to_string()))
        .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", testbed.agent_output()));
    assert!(answered(&testbed));
}

/// A map pinned under one of lb's names by another build (other key or value sizes) is
/// named with its sizes and what to do, before anything is loaded, where the verifier
/// would print a program dump.
#[test]
fn a_pinned_map_of_another_build_is_named_with_its_sizes() {
    if !privileged("a_pinned_map_of_another_build_is_named_with_its_sizes") {
        return;
    }
    let mut testbed = Testbed::new().unwrap();
    std::fs::create_dir_all(&testbed.bpffs).unwrap();
    std::fs::set_permissions(&testbed.bpffs, std::fs::Permissions::from_mode(0o700)).unwrap();
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(testbed.bpffs.join("lb4_affinity_v1"))
        .args([
            "type",
            "lru_hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "16",
            "name",
            "lb4_affinity_v1",
        ]))
    .unwrap();
    let output = failed_start(&mut testbed);
    assert!(
        output.contains("map lb4_affinity_v1 has (8, 8) byte keys and values, this lb (16, 16)"),
        "{output}"
    );
    assert!(output.contains("lb unload"), "{output}");
    assert!(!output.contains("verifier"), "{output}");
    // Nothing else was made.
    assert_eq!(std::fs::read_dir(&testbed.bpffs).unwrap().count(), 1);
}
