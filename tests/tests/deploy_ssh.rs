//! `cargo xtask deploy --ssh` end to end: an sshd of the test's own on 127.0.0.1 inside a
//! private network namespace stands for a host; the real xtask installs the real binary, a
//! manifest directory and a systemd unit there and starts it, and a client pod then reaches
//! a Service through the agent it started. No systemd runs here, so the host's `systemctl`
//! is a small stand-in that starts the unit's ExecStart line, as systemd would.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb_tests::{Testbed, binary, privileged, run, wait_for};

const SSH_PORT: u16 = 2222;

/// `systemctl` for a host without systemd: enough of link, daemon-reload, enable, restart
/// and is-active for one unit, starting its ExecStart line in the background.
const SYSTEMCTL: &str = r#"#!/bin/sh
set -eu
state="$(dirname "$0")/state"
mkdir -p "$state"
case "$1" in
  link) cp "$2" "$state/lb.service" ;;
  daemon-reload|enable) ;;
  restart)
    if [ -f "$state/pid" ]; then kill "$(cat "$state/pid")" 2>/dev/null || true; sleep 0.2; fi
    exec_start=$(sed -n 's/^ExecStart=//p' "$state/lb.service")
    setsid sh -c "exec $exec_start" > "$state/lb.log" 2>&1 < /dev/null &
    echo $! > "$state/pid"
    ;;
  is-active)
    sleep 0.5
    if [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then echo active; else echo failed; exit 3; fi
    ;;
  *) echo "systemctl stand-in: $* not supported" >&2; exit 1 ;;
esac
"#;

/// The host side: sshd, its keys and the stand-in; stops sshd and the agent it started.
struct SshHost {
    dir: PathBuf,
    sshd: Child,
}

impl SshHost {
    fn start(testbed: &Testbed, host: &lb_tests::Pod, dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        for key in ["host_key", "id"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key)))
            .unwrap();
        }
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        let systemctl = dir.join("bin/systemctl");
        std::fs::write(&systemctl, SYSTEMCTL).unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = format!(
            "Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
             StrictModes no\nUsePAM no\nSetEnv PATH={dir}/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let sshd = testbed
            .netns_command(host, "/usr/sbin/sshd")
            .unwrap()
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let guard = Self {
            dir: dir.to_owned(),
            sshd,
        };
        wait_for("sshd to listen", Duration::from_secs(10), || {
            let out = testbed
                .netns_command(host, "ssh")?
                .args(guard.ssh_options())
                .args(["root@127.0.0.1", "true"])
                .output()?;
            Ok(out.status.success().then_some(()))
        })
        .unwrap();
        guard
    }

    fn ssh_options(&self) -> Vec<String> {
        vec![
            "-p".into(),
            SSH_PORT.to_string(),
            "-i".into(),
            self.dir.join("id").display().to_string(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
        ]
    }

    fn agent_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("bin/state/pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid()
            && let Err(e) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )
        {
            eprintln!("stopping the deployed agent {pid}: {e}");
        }
        // The agent exits before the testbed removes its pins and state (bounded wait).
        if let Some(pid) = self.agent_pid() {
            drop(wait_for(
                "the deployed agent to exit",
                Duration::from_secs(10),
                || Ok((!Path::new(&format!("/proc/{pid}")).exists()).then_some(())),
            ));
        }
        drop(self.sshd.kill());
        drop(self.sshd.wait());
    }
}

#[test]
fn deploy_over_ssh_installs_and_starts_an_agent_that_serves_traffic() {
    if !privileged("deploy_over_ssh_installs_and_starts_an_agent_that_serves_traffic") {
        return;
    }
    let (mut testbed, _pods, client) = Testbed::with_backends(2, 8888).unwrap();
    testbed
        .write_manifest(
            "web.yaml",
            r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8888}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.10]}, {addresses: [10.244.0.11]}]
ports: [{port: 8888}]
"#,
        )
        .unwrap();
    let host = testbed
        .add_pod("host", Ipv4Addr::new(10, 244, 0, 100))
        .unwrap();
    let dir = testbed.state_dir().with_file_name("ssh-host");
    let ssh_host = SshHost::start(&testbed, &host, &dir);
    let remote_root = dir.join("root");

    let mut deploy = testbed
        .netns_command(&host, binary("xtask").unwrap())
        .unwrap();
    deploy
        .args([
            "deploy",
            "--ssh",
            "root@127.0.0.1",
            "--ssh-port",
            &SSH_PORT.to_string(),
        ])
        .arg("--identity")
        .arg(dir.join("id"))
        .args(["--ssh-option", "StrictHostKeyChecking=no"])
        .args(["--ssh-option", "UserKnownHostsFile=/dev/null"])
        .arg("--binary")
        .arg(binary("lb").unwrap())
        .arg("--remote-root")
        .arg(&remote_root)
        .arg("--manifests")
        .arg(&testbed.manifests)
        .arg(format!("--agent-arg=--cgroup={}", testbed.cgroup.display()))
        .arg(format!("--agent-arg=--bpffs={}", testbed.bpffs.display()))
        .arg(format!(
            "--agent-arg=--state-dir={}",
            testbed.state_dir().display()
        ));
    let output = run(&mut deploy).unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("lb.service is active"), "{said}");

    // What landed on the host.
    let installed = remote_root.join("usr/local/bin/lb");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(binary("lb").unwrap()).unwrap()
    );
    let unit = std::fs::read_to_string(remote_root.join("etc/systemd/system/lb.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={} agent --manifests={}",
            installed.display(),
            remote_root.join("etc/lb/manifests").display()
        )),
        "{unit}"
    );
    assert!(remote_root.join("etc/lb/manifests/web.yaml").is_file());

    // The agent it started runs and translates.
    wait_for(
        "the deployed agent to sync",
        Duration::from_secs(20),
        || {
            let status: serde_json::Value =
                serde_json::from_str(&testbed.lb(&["status", "-o", "json"])?)?;
            Ok((status["agent_running"] == true && status["last_sync_ms"].is_u64()).then_some(()))
        },
    )
    .unwrap();
    testbed
        .wait_for_frontend(
            "10.96.0.10:80/TCP",
            Some(&["10.244.0.10:8888", "10.244.0.11:8888"]),
        )
        .unwrap();
    let probes = testbed.probe(&client, "10.96.0.10:80", 40).unwrap();
    let hostnames: BTreeSet<_> = probes.iter().filter_map(|p| p.hostname()).collect();
    assert_eq!(hostnames, BTreeSet::from(["web-0", "web-1"]), "{probes:?}");
    assert!(ssh_host.agent_pid().is_some());
}

#[test]
fn deploy_kubectl_dry_run_prints_the_manifests_with_the_image() {
    let output = run(Command::new(binary("xtask").unwrap()).args([
        "deploy",
        "--kubectl",
        "--dry-run",
        "--image",
        "registry.example/lb:1.2.3",
    ]))
    .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let mut kinds = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(document).unwrap();
        if let Some(kind) = value.get("kind").and_then(|k| k.as_str()) {
            kinds.push(kind.to_owned());
        }
    }
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]
    );
    assert!(text.contains("image: registry.example/lb:1.2.3"), "{text}");
    assert!(!text.contains("ghcr.io/lb-project/lb:latest"));
}
