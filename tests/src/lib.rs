//! A private node for lb's tests and demo: pod network namespaces on a bridge, a test cgroup,
//! backend servers, the real `lb agent`, and clients that run inside the cgroup and a pod.
//!
//! Everything it creates lives in namespaces and cgroups of its own, with no route out, and
//! is removed by [`Testbed`]'s `Drop`, also when a test fails.

pub mod apiserver;
pub mod demo;
pub mod generate;
pub mod objects;

use std::{
    collections::BTreeSet,
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// Prefix of every netns, cgroup, bpffs directory and temp directory the harness creates.
pub const PREFIX: &str = "lbt";

/// Whether privileged tests can run. Without root they are skipped with a message, except
/// under `CI=true`, where a skipped privileged test fails the run.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: privileged test cannot run without root under CI=true"
    );
    eprintln!("skipping {test}: needs root (netns, cgroups, BPF)");
    false
}

/// Where [`binary`] looks first, when set: the benchmark measures release builds.
static BINARIES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`binary`] take the workspace's binaries from `dir` (e.g. target/release); the
/// first call wins.
pub fn use_binaries_from(dir: PathBuf) {
    // A second call changes nothing: every binary of one run comes from one build.
    drop(BINARIES.set(dir));
}

/// A built binary of the workspace: from [`use_binaries_from`]'s directory, or
/// `$LB_BIN_DIR/NAME`, or found beside the running executable (target/debug for the
/// demo, target/debug/deps for tests).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = BINARIES
        .get()
        .map(|dir| dir.as_os_str().to_owned())
        .or_else(|| std::env::var_os("LB_BIN_DIR"))
    {
        let path = Path::new(&dir).join(name);
        ensure!(
            path.is_file(),
            "{} does not exist (LB_BIN_DIR or the benchmark's release build)",
            path.display()
        );
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .with_context(|| {
            format!(
                "no `{name}` binary near {}: build the workspace first (`cargo xtask test` does)",
                exe.display()
            )
        })
}

/// Runs `command` and fails with its output unless it succeeds.
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A GET to an HTTP server of the agent's on 127.0.0.1; returns the status and body.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The cgroup2 root of this machine (hybrid hosts have it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// A pod: a network namespace with one address on `eth0`, a veth to the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// The node's own address on the pod network (the bridge), used as its node IP.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The node's name, as the agent is told and as endpoints' `nodeName` say.
pub const NODE_NAME: &str = "node-1";

/// One answer of `lb-probe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `peer` is what the application sees as its peer (getpeername(), or a UDP reply's
    /// source), `hostname` the pod that answered, `remote_addr` the client as the pod saw it.
    Answered {
        peer: String,
        hostname: String,
        remote_addr: String,
    },
    Failed {
        error: String,
    },
}

impl Probe {
    pub fn hostname(&self) -> Option<&str> {
        match self {
            Probe::Answered { hostname, .. } => Some(hostname),
            Probe::Failed { .. } => None,
        }
    }

    pub fn peer(&self) -> Option<&str> {
        match self {
            Probe::Answered { peer, .. } => Some(peer),
            Probe::Failed { .. } => None,
        }
    }

    /// The client's address as the pod saw it (TCP only: the HTTP server reports it).
    pub fn remote_addr(&self) -> Option<&str> {
        match self {
            Probe::Answered { remote_addr, .. } => Some(remote_addr),
            Probe::Failed { .. } => None,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Probe::Answered { .. } => None,
            Probe::Failed { error } => Some(error),
        }
    }
}

/// A probe with the CLOCK_MONOTONIC time it started at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedProbe {
    pub at_ns: u64,
    pub probe: Probe,
}

/// CLOCK_MONOTONIC now, comparable with [`TimedProbe::at_ns`].
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or_default() * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or_default()
        })
        .unwrap_or_default()
}

/// Parses `lb-probe`'s output.
pub fn parse_probes(stdout: &str) -> anyhow::Result<Vec<TimedProbe>> {
    stdout
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)?;
            let field = |name: &str| value[name].as_str().unwrap_or_default().to_owned();
            let probe = if value["ok"] == true {
                Probe::Answered {
                    peer: field("peer"),
                    hostname: field("hostname"),
                    remote_addr: field("remote_addr"),
                }
            } else {
                Probe::Failed {
                    error: field("error"),
                }
            };
            Ok(TimedProbe {
                at_ns: value["at_ns"].as_u64().unwrap_or_default(),
                probe,
            })
        })
        .collect()
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// The private node. See the crate documentation.
pub struct Testbed {
    id: String,
    node_netns: String,
    pods: Vec<Pod>,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub manifests: PathBuf,
    workdir: PathBuf,
    servers: Vec<Child>,
    agent: Option<Child>,
    /// The agent finds the node's addresses itself (and follows them) instead of being
    /// told [`NODE_IP`].
    pub discover_node_ips: bool,
    /// The node and its pods have an IPv6 address each too ([`ipv6_of`]).
    dual_stack: bool,
}

/// The IPv6 address a dual-stack testbed gives the node or pod at `ip`: `fd00::` and the
/// IPv4 address in its last 32 bits (`fd00::a.b.c.d`), in the node's IPv6 pod network
/// `fd00::/96`.
pub fn ipv6_of(ip: Ipv4Addr) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from((0xfd00_u128 << 112) | u128::from(u32::from(ip)))
}

impl Testbed {
    /// Creates the node: its netns with a bridge, a test cgroup under the cgroup2 root, a
    /// bpffs directory and a manifest directory.
    pub fn new() -> anyhow::Result<Self> {
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let workdir = std::env::temp_dir().join(&id);
        let cgroup_root = cgroup2_root()?;
        sweep_leftovers(&cgroup_root);
        let testbed = Self {
            node_netns: format!("{id}-node"),
            cgroup: cgroup_root.join(&id),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&id),
            manifests: workdir.join("manifests"),
            workdir,
            pods: Vec::new(),
            servers: Vec::new(),
            agent: None,
            discover_node_ips: false,
            dual_stack: false,
            id,
        };
        // From here on, Drop removes whatever was created.
        std::fs::create_dir_all(&testbed.manifests)?;
        std::fs::create_dir(&testbed.cgroup)
            .with_context(|| format!("creating cgroup {}", testbed.cgroup.display()))?;
        ip(&["netns", "add", &testbed.node_netns])?;
        let node = testbed.node_netns.clone();
        ip(&["-n", &node, "link", "set", "lo", "up"])?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/16"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        testbed.mount_bpffs()?;
        Ok(testbed)
    }

    /// A node with backend pods `web-0..n` at 10.244.0.(10+i), each serving httpenv on
    /// `port` (TCP and UDP), and a client pod `client` at 10.244.1.1.
    pub fn with_backends(backends: u8, port: u16) -> anyhow::Result<(Self, Vec<Pod>, Pod)> {
        Self::new()?.populated(backends, port)
    }

    /// [`Self::with_backends`] on a dual-stack node: the node and every pod also have the
    /// IPv6 address [`ipv6_of`] theirs, and the servers listen on both.
    pub fn dual_stack_with_backends(
        backends: u8,
        port: u16,
    ) -> anyhow::Result<(Self, Vec<Pod>, Pod)> {
        let mut testbed = Self::new()?;
        testbed.dual_stack = true;
        testbed.add_ipv6(&testbed.node_netns, "br0", NODE_IP)?;
        testbed.populated(backends, port)
    }

    fn populated(self, backends: u8, port: u16) -> anyhow::Result<(Self, Vec<Pod>, Pod)> {
        let mut testbed = self;
        let mut pods = Vec::new();
        for i in 0..backends {
            let pod = testbed.add_pod(&format!("web-{i}"), Ipv4Addr::new(10, 244, 0, 10 + i))?;
            testbed.serve_httpenv(&pod, port)?;
            pods.push(pod);
        }
        let client = testbed.add_pod("client", Ipv4Addr::new(10, 244, 1, 1))?;
        Ok((testbed, pods, client))
    }

    /// Gives `device` in `netns` the IPv6 address of `ip` ([`ipv6_of`]), usable at once
    /// (no duplicate address detection: nothing else is on this network).
    fn add_ipv6(&self, netns: &str, device: &str, address: Ipv4Addr) -> anyhow::Result<()> {
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{}/96", ipv6_of(address)),
            "dev",
            device,
            "nodad",
        ])
    }

    fn mount_bpffs(&self) -> anyhow::Result<()> {
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        {
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
        Ok(())
    }

    /// The node itself, as a place to run clients: its own netns (the "host network").
    pub fn node(&self) -> Pod {
        Pod {
            name: "node".into(),
            netns: self.node_netns.clone(),
            ip: NODE_IP,
        }
    }

    /// Runs `ip ARGS` in the node's netns.
    pub fn node_ip_command(&self, args: &[&str]) -> anyhow::Result<()> {
        ip(&[&["-n", self.node_netns.as_str()], args].concat())
    }

    /// Adds a pod at `ip` (in 10.244.0.0/16, the pod network; no other route).
    pub fn add_pod(&mut self, name: &str, ip_address: Ipv4Addr) -> anyhow::Result<Pod> {
        let index = self.pods.len();
        let netns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &netns])?;
        let pod = Pod {
            name: name.to_owned(),
            netns: netns.clone(),
            ip: ip_address,
        };
        self.pods.push(pod.clone());
        let host_side = format!("veth{index}");
        let node = self.node_netns.clone();
        ip(&[
            "-n", &node, "link", "add", &host_side, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        ip(&[
            "-n", &node, "link", "set", &host_side, "master", "br0", "up",
        ])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_address}/16"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        if self.dual_stack {
            self.add_ipv6(&netns, "eth0", ip_address)?;
        }
        Ok(pod)
    }

    /// Starts the httpenv server in `pod` on `port` (TCP, and UDP too), with HOSTNAME set
    /// to the pod's name, and waits until it accepts connections.
    pub fn serve_httpenv(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let mut listen = vec!["--listen".to_owned(), format!("0.0.0.0:{port}")];
        if self.dual_stack {
            listen.extend([
                "--listen".to_owned(),
                format!("[{}]:{port}", ipv6_of(pod.ip)),
            ]);
        }
        let server = Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .arg(binary("httpenv")?)
            .arg("--udp")
            .args(listen)
            .env_clear()
            .env("HOSTNAME", &pod.name)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        self.servers.push(server);
        // Probe from the pod itself, outside the test cgroup: no translation involved.
        let target = format!("{}:{port}", pod.ip);
        wait_for(
            &format!("httpenv on {target}"),
            Duration::from_secs(10),
            || {
                let output = Command::new("ip")
                    .args(["netns", "exec", &pod.netns])
                    .arg(binary("lb-probe")?)
                    .args([&target, "--timeout-ms", "500"])
                    .output()?;
                Ok(String::from_utf8_lossy(&output.stdout)
                    .contains("\"ok\":true")
                    .then_some(()))
            },
        )
    }

    /// Writes a manifest file atomically (temp file, then rename), as editors and kubectl do.
    pub fn write_manifest(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let temp = self.workdir.join(format!(".{name}.tmp"));
        std::fs::write(&temp, text)?;
        std::fs::rename(&temp, self.manifests.join(name))?;
        Ok(())
    }

    pub fn remove_manifest(&self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.manifests.join(name))?;
        Ok(())
    }

    fn agent_log(&self) -> PathBuf {
        self.workdir.join("agent.log")
    }

    /// The file the agent logs to, for readers that follow it as it grows.
    pub fn agent_log_path(&self) -> PathBuf {
        self.agent_log()
    }

    /// The agent's log so far.
    pub fn agent_output(&self) -> String {
        std::fs::read_to_string(self.agent_log()).unwrap_or_default()
    }

    /// Where the agent writes its state file.
    pub fn state_dir(&self) -> PathBuf {
        self.workdir.join("state")
    }

    /// Starts the real `lb agent` on the test cgroup and waits until it is ready. The node
    /// netns is its host network, [`NODE_IP`] its node IP (unless
    /// [`Testbed::discover_node_ips`]) and [`NODE_NAME`] its name.
    pub fn start_agent(&mut self) -> anyhow::Result<u32> {
        let manifests = self.manifests.clone();
        self.start_agent_with(&["--manifests".as_ref(), manifests.as_os_str()])
    }

    /// Starts the agent on the manifest directory as a node of zone `zone`
    /// (`--node-zone`), and waits until it is ready.
    pub fn start_agent_in_zone(&mut self, zone: &str) -> anyhow::Result<u32> {
        let manifests = self.manifests.clone();
        self.start_agent_with(&[
            "--manifests".as_ref(),
            manifests.as_os_str(),
            "--node-zone".as_ref(),
            zone.as_ref(),
        ])
    }

    /// Starts the agent with these source arguments (and any others) instead of the
    /// manifest directory, and waits until it is ready.
    pub fn start_agent_with(&mut self, args: &[&std::ffi::OsStr]) -> anyhow::Result<u32> {
        let pid = self.spawn_agent(args)?;
        self.wait_agent_ready()?;
        Ok(pid)
    }

    /// Starts the agent with `args` (and the testbed's own), expecting it to give up, and
    /// returns its output once it has exited (bounded wait).
    pub fn failed_start(&mut self, args: &[&std::ffi::OsStr]) -> anyhow::Result<String> {
        self.spawn_agent(args)?;
        wait_for("the agent to give up", Duration::from_secs(10), || {
            Ok((!self.agent_running()).then_some(()))
        })?;
        Ok(self.agent_output())
    }

    /// Starts the agent without waiting for it to be ready.
    pub fn spawn_agent(&mut self, args: &[&std::ffi::OsStr]) -> anyhow::Result<u32> {
        ensure!(!self.agent_running(), "the agent is already running");
        // One that exited (a failed start) is replaced.
        self.agent = None;
        let log = File::create(self.agent_log())?;
        let agent = Command::new(binary("lb")?)
            .arg("agent")
            .args(args)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--host-netns")
            .arg(Path::new("/run/netns").join(&self.node_netns))
            .args(["--node-name", NODE_NAME])
            .args(if self.discover_node_ips {
                Vec::new()
            } else {
                vec!["--node-ip".to_owned(), NODE_IP.to_string()]
            })
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = agent.id();
        self.agent = Some(agent);
        Ok(pid)
    }

    /// Waits until the agent says it is ready (its first sync is done) and has written
    /// its state file (which the CLI reads).
    pub fn wait_agent_ready(&mut self) -> anyhow::Result<()> {
        wait_for("the agent to be ready", Duration::from_secs(20), || {
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.try_wait()?
            {
                bail!("lb agent exited ({status}):\n{}", self.agent_output());
            }
            let output = self.agent_output();
            Ok((output.contains(" ready") && output.contains("state file written")).then_some(()))
        })
    }

    /// The port the running agent serves metrics on, started with
    /// `--metrics-addr 127.0.0.1:0` so that the kernel picks a free one.
    pub fn metrics_port(&mut self) -> anyhow::Result<u16> {
        wait_for(
            "the agent's metrics address",
            Duration::from_secs(20),
            || {
                if let Some(agent) = self.agent.as_mut()
                    && let Some(status) = agent.try_wait()?
                {
                    bail!("lb agent exited ({status}):\n{}", self.agent_output());
                }
                // Whole lines only: the last one may be half-written.
                let output = self.agent_output();
                Ok(output.split_inclusive('\n').find_map(|line| {
                    let line = line.strip_suffix('\n')?;
                    let (_, after) = line.split_once("metrics listening")?;
                    let addr = after.trim().strip_prefix("addr=")?;
                    addr.parse::<std::net::SocketAddr>().ok().map(|a| a.port())
                }))
            },
        )
    }

    /// Stops the agent with SIGTERM and waits for it to exit; the datapath stays loaded.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        let Some(mut agent) = self.agent.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = wait_for("the agent to exit", Duration::from_secs(10), || {
            Ok(agent.try_wait()?)
        })?;
        ensure!(
            status.success(),
            "lb agent exited with {status}:\n{}",
            self.agent_output()
        );
        Ok(())
    }

    /// Whether the agent process is still running.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|agent| matches!(agent.try_wait(), Ok(None)))
    }

    /// Runs `lb ARGS` pointed at this testbed's pins and state, and returns its stdout.
    pub fn lb(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = run(&mut self.lb_command(args)?)?;
        Ok(String::from_utf8(output.stdout)?)
    }

    /// The `lb ARGS` command pointed at this testbed's pins and state, not run yet.
    pub fn lb_command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = Command::new(binary("lb")?);
        command
            .args(args)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.state_dir());
        Ok(command)
    }

    /// `lb stats -o json`, one counter by name.
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let stats: serde_json::Value = serde_json::from_str(&self.lb(&["stats", "-o", "json"])?)?;
        stats[name]
            .as_u64()
            .with_context(|| format!("no counter {name} in {stats}"))
    }

    /// `lb services -o json`.
    pub fn services(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(
            &self.lb(&["services", "-o", "json"])?,
        )?)
    }

    /// Waits until `lb services` shows `frontend` ("ip:port/PROTO") with exactly `backends`
    /// ("ip:port"), or without the frontend when `backends` is `None`.
    pub fn wait_for_frontend(
        &self,
        frontend: &str,
        backends: Option<&[&str]>,
    ) -> anyhow::Result<()> {
        let mut expected: Option<Vec<String>> =
            backends.map(|b| b.iter().map(|s| (*s).to_owned()).collect());
        if let Some(expected) = expected.as_mut() {
            expected.sort();
        }
        wait_for(
            &format!("{frontend} → {expected:?} in lb services"),
            Duration::from_secs(10),
            || {
                let services = self.services()?;
                let found = services.iter().find(|s| {
                    format!(
                        "{}:{}/{}",
                        s["address"].as_str().unwrap_or_default(),
                        s["port"],
                        s["protocol"].as_str().unwrap_or_default()
                    ) == frontend
                });
                let actual = found.map(|s| {
                    let mut backends: Vec<String> = s["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| {
                            format!(
                                "{}:{}",
                                b["address"].as_str().unwrap_or_default(),
                                b["port"]
                            )
                        })
                        .collect();
                    backends.sort();
                    backends
                });
                Ok((actual == expected).then_some(()))
            },
        )
    }

    /// A command that runs inside the test cgroup and `pod`'s netns: what a process in a pod
    /// on an lb node is. The cgroup is joined first, then the netns (`ip netns exec` would
    /// remount /sys and hide the cgroup).
    pub fn pod_command(
        &self,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        self.command_in(pod, program, true)
    }

    /// Gives `pod` the resolv.conf kubelet gives a pod of `namespace` whose cluster DNS is
    /// `nameserver` (`/etc/netns/NETNS/resolv.conf`, which `ip netns exec` mounts over
    /// /etc/resolv.conf; removed with the testbed).
    pub fn set_resolver(
        &self,
        pod: &Pod,
        nameserver: Ipv4Addr,
        namespace: &str,
    ) -> anyhow::Result<()> {
        let dir = Path::new(NETNS_ETC).join(&pod.netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n\
                 nameserver {nameserver}\noptions ndots:5\n"
            ),
        )?;
        Ok(())
    }

    /// A command that runs in the test cgroup and, through `ip netns exec`, in `pod`'s netns
    /// with its resolv.conf ([`Testbed::set_resolver`]): a pod's process that resolves
    /// names. (The cgroup is joined first: `ip netns exec` remounts /sys.)
    pub fn resolving_command(&self, pod: &Pod, program: &str) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0" && exec ip netns exec "$@""#)
            .arg(self.cgroup.join("cgroup.procs"))
            .arg(&pod.netns)
            .arg(program)
            .stdin(Stdio::null());
        command
    }

    /// A command that runs in `pod`'s netns only, outside the test cgroup, seeing this
    /// machine's mounts (unlike `ip netns exec`): a daemon of the "host" `pod` stands for.
    pub fn netns_command(
        &self,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        self.command_in(pod, program, false)
    }

    fn command_in(
        &self,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
        join_cgroup: bool,
    ) -> anyhow::Result<Command> {
        let procs = if join_cgroup {
            Some(
                File::options()
                    .write(true)
                    .open(self.cgroup.join("cgroup.procs"))?,
            )
        } else {
            None
        };
        let netns = File::open(Path::new("/run/netns").join(&pod.netns))?;
        let mut command = Command::new(program);
        // SAFETY: between fork and exec only async-signal-safe calls on fds opened before
        // the fork, which the closure owns; `write` of "0" moves the calling process.
        unsafe {
            command.pre_exec(move || {
                if let Some(procs) = &procs
                    && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// GETs `address` from `client` `count` times over TCP, one connection each.
    pub fn probe(&self, client: &Pod, address: &str, count: u32) -> anyhow::Result<Vec<Probe>> {
        self.probe_with(client, address, count, &[])
    }

    /// Runs `lb-probe ADDRESS --count COUNT ARGS` in `client` and waits for it.
    pub fn probe_with(
        &self,
        client: &Pod,
        address: &str,
        count: u32,
        args: &[&str],
    ) -> anyhow::Result<Vec<Probe>> {
        let output = run(&mut self.probe_command(client, address, count, args)?)?;
        Ok(parse_probes(&String::from_utf8(output.stdout)?)?
            .into_iter()
            .map(|timed| timed.probe)
            .collect())
    }

    /// A client in `client` connecting to `address` back to back in the background (a
    /// connect every `interval_ms`), bounded by `count` connects and by `for_ms`; stop it
    /// with [`finish_probes`]. Its output is read as it comes, so that a full pipe never
    /// stalls it.
    pub fn background_prober(
        &self,
        client: &Pod,
        address: &str,
        count: u32,
        interval_ms: u64,
        for_ms: u64,
    ) -> anyhow::Result<Prober> {
        self.background_prober_with(client, address, count, interval_ms, for_ms, &[])
    }

    /// [`Testbed::background_prober`] with more `lb-probe` arguments (`--mode`, …).
    pub fn background_prober_with(
        &self,
        client: &Pod,
        address: &str,
        count: u32,
        interval_ms: u64,
        for_ms: u64,
        args: &[&str],
    ) -> anyhow::Result<Prober> {
        use std::io::Read as _;
        let timing = [
            "--interval-ms".to_owned(),
            interval_ms.to_string(),
            "--for-ms".to_owned(),
            for_ms.to_string(),
        ];
        let args: Vec<&str> = timing
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        let mut child = self.probe_command(client, address, count, &args)?.spawn()?;
        let mut stdout = child
            .stdout
            .take()
            .context("the prober's stdout is not piped")?;
        let output = std::thread::spawn(move || {
            let mut output = String::new();
            stdout.read_to_string(&mut output).map(|_| output)
        });
        Ok(Prober { child, output })
    }

    /// The `lb-probe` command in `client`, to run it in the background.
    pub fn probe_command(
        &self,
        client: &Pod,
        address: &str,
        count: u32,
        args: &[&str],
    ) -> anyhow::Result<Command> {
        let mut command = self.pod_command(client, binary("lb-probe")?)?;
        command
            .args([address, "--count", &count.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        Ok(command)
    }
}

/// A client sending from one socket in the background, whose first attempt is in: see
/// [`Testbed::one_socket_prober`].
pub struct OneSocket {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl OneSocket {
    /// Stops the client and returns its attempts after the first, with when each started.
    pub fn finish(mut self) -> anyhow::Result<Vec<TimedProbe>> {
        use std::io::Read as _;
        drop(self.child.kill());
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest)?;
        drop(self.child.wait());
        parse_probes(&rest)
    }
}

impl Testbed {
    /// A client in `client` sending to `address` from one socket (`lb-probe --same-socket`,
    /// `mode` `udp` or `connected-udp`) every `interval_ms`, for at most `for_ms`, in the
    /// background; returned with its first attempt, which tells the backend the socket has.
    pub fn one_socket_prober(
        &self,
        client: &Pod,
        address: &str,
        mode: &str,
        interval_ms: u64,
        for_ms: u64,
    ) -> anyhow::Result<(OneSocket, Probe)> {
        use std::io::BufRead as _;
        let count = u32::try_from(for_ms / interval_ms.max(1) + 1)?;
        let (interval, until) = (interval_ms.to_string(), for_ms.to_string());
        let args = [
            "--mode",
            mode,
            "--same-socket",
            "--interval-ms",
            &interval,
            "--for-ms",
            &until,
        ];
        let mut child = self.probe_command(client, address, count, &args)?.spawn()?;
        let stdout = child
            .stdout
            .take()
            .context("the prober's stdout is not piped")?;
        let mut prober = OneSocket {
            child,
            stdout: std::io::BufReader::new(stdout),
        };
        let mut first = String::new();
        prober.stdout.read_line(&mut first)?;
        let first = parse_probes(&first)?
            .pop()
            .context("the prober exited before its first attempt")?;
        Ok((prober, first.probe))
    }
}

/// A client probing in the background: see [`Testbed::background_prober`].
pub struct Prober {
    child: Child,
    output: std::thread::JoinHandle<std::io::Result<String>>,
}

/// Fails unless every one of `probes` was answered, and there were more than `at_least`
/// of them (fewer would not tell); `while_` says when, for the message.
pub fn assert_no_failed_connects(probes: &[Probe], at_least: usize, while_: &str) {
    let failed: Vec<&Probe> = probes.iter().filter(|p| p.hostname().is_none()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connects failed {while_}: {:?}",
        failed.len(),
        probes.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        probes.len() > at_least,
        "too few connects to tell: {}",
        probes.len()
    );
}

/// The line the agent logs when it destroys connected sockets whose backend left.
const SOCKETS_TERMINATED: &str = "terminated connected sockets whose backend left their Service";

impl Testbed {
    /// Once the agent says it terminated connected sockets (within `timeout`), and the
    /// client has had time to see it, stops `socket`'s client and returns its attempts after
    /// the first.
    pub fn attempts_until_terminated(
        &self,
        socket: OneSocket,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Probe>> {
        wait_for("the socket's termination", timeout, || {
            Ok(self
                .agent_output()
                .contains(SOCKETS_TERMINATED)
                .then_some(()))
        })
        .with_context(|| self.agent_output())?;
        // The client's next attempt sees it.
        std::thread::sleep(Duration::from_millis(200));
        Ok(socket
            .finish()?
            .into_iter()
            .map(|timed| timed.probe)
            .collect())
    }
}

/// Where the attempts of one socket lb terminated switch from answers by `backend` to
/// failures: the index of the first failure. Panics (a test failure) if they never fail,
/// if one answer comes from another backend, or if one succeeds after the first failure.
pub fn termination_point(attempts: &[Probe], backend: &str) -> usize {
    let failed_at = attempts
        .iter()
        .position(|p| p.error().is_some())
        .unwrap_or_else(|| panic!("the socket was never terminated: {attempts:?}"));
    assert!(
        attempts[failed_at..].iter().all(|p| p.error().is_some()),
        "{attempts:?}"
    );
    assert!(
        attempts[..failed_at]
            .iter()
            .all(|p| p.hostname() == Some(backend)),
        "{attempts:?}"
    );
    failed_at
}

/// Stops a background prober and returns every attempt it made.
pub fn finish_probes(prober: Prober) -> anyhow::Result<Vec<Probe>> {
    Ok(finish_timed_probes(prober)?
        .into_iter()
        .map(|timed| timed.probe)
        .collect())
}

/// Stops a background prober and returns every attempt it made, with when it started.
pub fn finish_timed_probes(mut prober: Prober) -> anyhow::Result<Vec<TimedProbe>> {
    drop(prober.child.kill());
    drop(prober.child.wait());
    let output = prober
        .output
        .join()
        .map_err(|_| anyhow::anyhow!("the prober's reader panicked"))??;
    parse_probes(&output)
}

/// The pods that answered `probes`.
pub fn hostnames(probes: &[Probe]) -> BTreeSet<String> {
    probes
        .iter()
        .filter_map(|p| p.hostname().map(str::to_owned))
        .collect()
}

/// Fails unless every one of `probes` was answered.
pub fn assert_all_answered(probes: &[Probe]) {
    let failed: Vec<_> = probes.iter().filter(|p| p.hostname().is_none()).collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// Fails unless every one of `probes` failed at once with "Connection refused".
pub fn assert_refused(probes: &[Probe]) {
    for probe in probes {
        assert!(
            probe.error().is_some_and(|e| e.contains("refused")),
            "expected Connection refused, got {probe:?}"
        );
    }
}

/// Kills every process in `cgroup` and waits (bounded) until it is empty.
fn kill_cgroup(cgroup: &Path) {
    if std::fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
        return;
    }
    drop(wait_for(
        "the test cgroup to empty",
        Duration::from_secs(5),
        || {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            Ok(procs.trim().is_empty().then_some(()))
        },
    ));
}

/// The pid in a harness name (`lbt<pid>x<n>…`), if the name is the harness's.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

/// Where `ip netns exec NAME` finds files to mount over /etc (resolv.conf).
const NETNS_ETC: &str = "/etc/netns";

/// Removes what runs of the harness that died without cleaning up (killed by a timeout or a
/// signal) left: netns, cgroups, pins and temp dirs named after a process that is gone.
fn sweep_leftovers(cgroup_root: &Path) {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| {
            pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
        })
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    };
    for name in names(Path::new("/run/netns")).iter().filter(|n| dead(n)) {
        drop(ip(&["netns", "del", name]));
    }
    for name in names(cgroup_root).iter().filter(|n| dead(n)) {
        let cgroup = cgroup_root.join(name);
        kill_cgroup(&cgroup);
        drop(std::fs::remove_dir(cgroup));
    }
    let bpffs = Path::new("/sys/fs/bpf");
    for name in names(bpffs).iter().filter(|n| dead(n)) {
        let dir = bpffs.join(name);
        for pin in names(&dir) {
            drop(std::fs::remove_file(dir.join(pin)));
        }
        drop(std::fs::remove_dir(dir));
    }
    for name in names(Path::new(NETNS_ETC)).iter().filter(|n| dead(n)) {
        drop(std::fs::remove_dir_all(Path::new(NETNS_ETC).join(name)));
    }
    let temp = std::env::temp_dir();
    for name in names(&temp).iter().filter(|n| dead(n)) {
        drop(std::fs::remove_dir_all(temp.join(name)));
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            drop(agent.kill());
            drop(agent.wait());
        }
        for server in &mut self.servers {
            drop(server.kill());
            drop(server.wait());
        }
        // Whatever still runs in the test cgroup (a client a failed test left behind) goes
        // first, or the cgroup cannot be removed.
        kill_cgroup(&self.cgroup);
        // Unpinning the link detaches the program; unpinning the maps frees them.
        if let Ok(entries) = std::fs::read_dir(&self.bpffs) {
            for entry in entries.flatten() {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    problems.push(format!("unpinning {}: {e}", entry.path().display()));
                }
            }
        }
        for dir in [&self.bpffs, &self.cgroup] {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("removing {}: {e}", dir.display())),
            }
        }
        for netns in self
            .pods
            .iter()
            .map(|p| p.netns.as_str())
            .chain([self.node_netns.as_str()])
        {
            drop(std::fs::remove_dir_all(Path::new(NETNS_ETC).join(netns)));
            if let Err(e) = ip(&["netns", "del", netns]) {
                // A netns that was never created is not a leftover.
                if !e.to_string().contains("No such file") {
                    problems.push(format!("{e:#}"));
                }
            }
        }
        drop(std::fs::remove_dir_all(&self.workdir));
        if !problems.is_empty() {
            let mut stderr = std::io::stderr().lock();
            drop(writeln!(
                stderr,
                "testbed {} cleanup: {}",
                self.id,
                problems.join("; ")
            ));
        }
    }
}
