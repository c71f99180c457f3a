//! `cargo xtask bench`: lb against a direct connect and kube-proxy's iptables (nft and
//! legacy) and nftables layouts, on one private node, at 1 to 100k Services.
//!
//! For lb it also measures the control plane per source (`control`): the full sync from
//! YAML manifests, a `kind: List` JSON file and the Kubernetes API, endpoint changes one by
//! one, and the agent's memory.
//!
//! Everything runs inside network namespaces and a cgroup the harness creates, with no route
//! out; each setup is bounded by a time budget (a peer over budget is reported as skipped
//! with the time it reached), each client run by a count and a window.

pub mod client;
pub mod control;
mod plot;
pub mod rules;

use std::{
    io::Read as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use comfy_table::{Table, presets::NOTHING};
use indicatif::{ProgressBar, ProgressStyle};
use lb_tests::{Pod, Testbed, binary, generate::Ipv6Family, http_get, ipv6_of, wait_for};
use serde::Serialize;

use self::{
    client::ClientResult,
    control::{ControlPlane, Source},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Peer {
    /// The backend's own address: no load balancer at all.
    Direct,
    /// This project, through the real agent and maps.
    Lb,
    /// kube-proxy's iptables layout through iptables-nft.
    IptablesNft,
    /// kube-proxy's iptables layout through iptables-legacy.
    IptablesLegacy,
    /// kube-proxy's nftables layout.
    Nftables,
}

impl Peer {
    const ALL: [Peer; 5] = [
        Peer::Direct,
        Peer::Lb,
        Peer::IptablesNft,
        Peer::IptablesLegacy,
        Peer::Nftables,
    ];

    fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Lb => "lb",
            Peer::IptablesNft => "iptables-nft",
            Peer::IptablesLegacy => "iptables-legacy",
            Peer::Nftables => "nftables",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Small sizes and short runs (seconds): a smoke test that every peer produces figures.
    #[arg(long)]
    quick: bool,
    /// Numbers of Services [default: 1,1000,10000,30000,100000; with --quick 1,100].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<u32>>,
    /// Peers to run [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    peers: Option<Vec<Peer>>,
    /// Sources whose control plane is measured when lb runs: full sync, endpoint changes,
    /// memory [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    sources: Option<Vec<Source>>,
    /// Endpoint changes per source and size, one at a time, within 120 s [default: 1000;
    /// with --quick 50, within 20 s].
    #[arg(long)]
    changes: Option<u32>,
    /// Seconds a peer's setup may take at one size before it is reported as skipped.
    #[arg(long)]
    setup_budget_s: Option<u64>,
    /// Directory for results.json and p50.svg [default: target/lb-bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the binaries already built beside this one (debug ones in `cargo test`) instead
    /// of running setup and a release build first (for the test that runs the benchmark
    /// from inside `cargo test`).
    #[arg(long, hide = true)]
    pub no_build: bool,
}

/// One peer at one size; `null` figures when it was skipped.
#[derive(Debug, Serialize)]
pub struct Measurement {
    pub peer: String,
    pub services: u32,
    pub connect_p50_us: Option<f64>,
    pub connect_p99_us: Option<f64>,
    /// A direct connect's p50 measured in rounds alternating with this peer's, so that both
    /// saw the same moments of the machine: the baseline to compare `connect_p50_us` with.
    pub paired_direct_p50_us: Option<f64>,
    pub conns_per_s: Option<f64>,
    /// Setting up N Services: loading the rules, or for lb a full sync from manifests.
    pub setup_s: Option<f64>,
    pub skipped: Option<String>,
    pub errors: u64,
    /// lb only: average BPF run time per connect4 call (kernel.bpf_stats_enabled).
    pub bpf_ns_per_call: Option<f64>,
    /// lb only: the same for connect6, from an AF_INET6 client reaching the Service's IPv6
    /// clusterIP.
    #[serde(default)]
    pub bpf_ns_per_connect6: Option<f64>,
    /// lb only: the same for connect6, from an AF_INET6 client reaching the Service through
    /// its v4-mapped IPv4 clusterIP (`[::ffff:VIP]:port`).
    #[serde(default)]
    pub bpf_ns_per_connect6_mapped: Option<f64>,
    /// lb only: from an EndpointSlice change on disk to the maps written.
    pub endpoint_change_to_map_ms: Option<f64>,
    /// lb only: the agent's resident memory after the sync.
    pub agent_rss_mib: Option<f64>,
}

struct Plan {
    sizes: Vec<u32>,
    peers: Vec<Peer>,
    budget: Duration,
    /// Timed connections per peer and size, in `rounds` alternating with a direct client.
    connects: u32,
    rounds: u32,
    rate_ms: u64,
    out: PathBuf,
    sources: Vec<Source>,
    control: control::Settings,
}

/// What results.json holds.
#[derive(Debug, Serialize)]
pub struct Results {
    /// Every peer at every size: connects, and the setup.
    pub peers: Vec<Measurement>,
    /// lb's control plane per source and size.
    pub control_plane: Vec<ControlPlane>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark builds network namespaces and loads BPF programs: run it as root"
    );
    let budget =
        Duration::from_secs(
            args.setup_budget_s
                .unwrap_or(if args.quick { 60 } else { 300 }),
        );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::workspace_root().join("target/lb-bench"));
    let plan = Plan {
        sizes: args.sizes.clone().unwrap_or_else(|| {
            if args.quick {
                vec![1, 100]
            } else {
                vec![1, 1000, 10_000, 30_000, 100_000]
            }
        }),
        peers: args.peers.clone().unwrap_or_else(|| Peer::ALL.to_vec()),
        budget,
        connects: if args.quick { 200 } else { 2000 },
        rounds: if args.quick { 2 } else { 10 },
        rate_ms: if args.quick { 300 } else { 2000 },
        out: out.clone(),
        sources: args.sources.clone().unwrap_or_else(|| Source::ALL.to_vec()),
        control: control::Settings {
            budget,
            changes: args
                .changes
                .unwrap_or(if args.quick { 50 } else { 1000 })
                .max(1),
            window: Duration::from_secs(if args.quick { 20 } else { 120 }),
            out: out.clone(),
        },
    };
    ensure!(
        !plan.sizes.is_empty() && !plan.peers.is_empty(),
        "nothing to run"
    );
    std::fs::create_dir_all(&plan.out)?;

    // Dual-stack, for connect6 on a native IPv6 VIP (the Service under test has one).
    let (mut testbed, pods, _) = Testbed::dual_stack_with_backends(3, 8888)?;
    let endpoints: Vec<(Ipv4Addr, u16)> = pods.iter().map(|p| (p.ip, 8888)).collect();
    let ipv6_endpoints: Vec<(Ipv6Addr, u16)> = pods.iter().map(|p| (ipv6_of(p.ip), 8888)).collect();
    let _stats = BpfStats::enable()?;
    let sources: &[Source] = if plan.peers.contains(&Peer::Lb) {
        &plan.sources
    } else {
        &[]
    };
    let progress = ProgressBar::new(u64::try_from(
        plan.sizes.len() * (plan.peers.len() + sources.len()),
    )?);
    progress.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} {msg} [{elapsed}]",
    )?);
    let mut results = Vec::new();
    let mut control_plane: Vec<ControlPlane> = Vec::new();
    for &size in &plan.sizes {
        let mut services = rules::services(size, &endpoints);
        if let Some(under_test) = services.last_mut() {
            under_test.ipv6 = Some(Ipv6Family {
                vip: UNDER_TEST_VIP6,
                endpoints: ipv6_endpoints.clone(),
            });
        }
        for &peer in &plan.peers {
            progress.set_message(format!("{} at {size} Services", peer.name()));
            let over_budget = results.iter().find(|m: &&Measurement| {
                m.peer == peer.name()
                    && m.services < size
                    && m.skipped
                        .as_deref()
                        .is_some_and(|s| s.starts_with(OVER_BUDGET))
            });
            let measurement = match over_budget {
                Some(earlier) => skipped(
                    peer,
                    size,
                    format!("over budget at {} Services already", earlier.services),
                ),
                None => fresh_client(&mut testbed, "c", 2, results.len())
                    .and_then(|client| {
                        // `direct` is its own baseline.
                        let paired = (peer != Peer::Direct)
                            .then(|| fresh_client(&mut testbed, "d", 3, results.len()))
                            .transpose()?;
                        measure(
                            &mut testbed,
                            &client,
                            paired.as_ref(),
                            peer,
                            &services,
                            &plan,
                        )
                    })
                    .unwrap_or_else(|e| skipped(peer, size, format!("{e:#}"))),
            };
            results.push(measurement);
            progress.inc(1);
        }
        for &source in sources {
            progress.set_message(format!(
                "lb's control plane from {} at {size} Services",
                source.name()
            ));
            let over_budget = control_plane.iter().find(|m| {
                m.source == source.name()
                    && m.services < size
                    && m.skipped
                        .as_deref()
                        .is_some_and(|s| s.starts_with(OVER_BUDGET))
            });
            let measured = match over_budget {
                Some(earlier) => ControlPlane::skipped(
                    source,
                    size,
                    format!("over budget at {} Services already", earlier.services),
                ),
                None => control::measure(&mut testbed, source, &services, &plan.control)
                    .unwrap_or_else(|e| ControlPlane::skipped(source, size, format!("{e:#}"))),
            };
            control_plane.push(measured);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();

    println!("{}", table(&results));
    if !control_plane.is_empty() {
        println!(
            "\nlb's control plane per source\n{}",
            control_table(&control_plane)
        );
    }
    let json = plan.out.join("results.json");
    let svg = plan.out.join("p50.svg");
    plot::p50_svg(&results, &svg)?;
    let results = Results {
        peers: results,
        control_plane,
    };
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// A client pod of its own for each measurement, so that no run inherits another's
/// conntrack table or sockets: `{prefix}{index}` at 10.244.`subnet`.x.
fn fresh_client(
    testbed: &mut Testbed,
    prefix: &str,
    subnet: u8,
    index: usize,
) -> anyhow::Result<Pod> {
    let host = u8::try_from(index % 250 + 2)?;
    let client = testbed.add_pod(
        &format!("{prefix}{index}"),
        Ipv4Addr::new(10, 244, subnet, host),
    )?;
    // kube-proxy's DNAT happens after the route lookup, so its clients need a route for the
    // Service range, as nodes have; here it is the private bridge, not a way out.
    let netns = client.netns.as_str();
    lb_tests::run(Command::new("ip").args([
        "-n",
        netns,
        "route",
        "add",
        "10.96.0.0/12",
        "dev",
        "eth0",
    ]))?;
    lb_tests::run(
        in_netns(&client, "sysctl").args(["-qw", "net.ipv4.ip_local_port_range=1024 65535"]),
    )?;
    Ok(client)
}

/// How a skip for a setup over its time budget starts: a larger size is not tried then.
const OVER_BUDGET: &str = "setup over budget";

/// The IPv6 clusterIP of the Service under test (which is dual-stack), in the service
/// range the tests use for IPv6.
const UNDER_TEST_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

fn skipped(peer: Peer, services: u32, why: String) -> Measurement {
    Measurement {
        peer: peer.name().into(),
        services,
        connect_p50_us: None,
        connect_p99_us: None,
        paired_direct_p50_us: None,
        conns_per_s: None,
        setup_s: None,
        skipped: Some(why),
        errors: 0,
        bpf_ns_per_call: None,
        bpf_ns_per_connect6: None,
        bpf_ns_per_connect6_mapped: None,
        endpoint_change_to_map_ms: None,
        agent_rss_mib: None,
    }
}

/// Runs `command` for at most `budget`; the time it took.
fn timed(command: &mut Command, budget: Duration, what: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: {command:?}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                pipe.read_to_string(&mut stderr)?;
            }
            ensure!(
                status.success(),
                "{what} failed ({status}): {}",
                stderr.trim()
            );
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > budget {
            drop(child.kill());
            drop(child.wait());
            bail!(
                "{OVER_BUDGET}: {what} still running after {:.0} s",
                budget.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_netns(pod: &Pod, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &pod.netns, program]);
    command
}

fn measure(
    testbed: &mut Testbed,
    client: &Pod,
    paired: Option<&Pod>,
    peer: Peer,
    services: &[rules::BenchService],
    plan: &Plan,
) -> anyhow::Result<Measurement> {
    let size = u32::try_from(services.len())?;
    let under_test = services.last().context("no Services")?;
    let rules_file = plan.out.join("rules");
    let mut lb_extras = LbExtras::default();
    // No load balancer: the client itself takes the Service's pods in turn.
    let direct: Vec<String> = under_test
        .endpoints
        .iter()
        .map(|(ip, port)| format!("{ip}:{port}"))
        .collect();
    let (setup_s, target, in_cgroup) = match peer {
        Peer::Direct => (0.0, direct.clone(), false),
        Peer::IptablesNft | Peer::IptablesLegacy => {
            std::fs::write(&rules_file, rules::iptables(services))?;
            let restore = if peer == Peer::IptablesNft {
                "iptables-nft-restore"
            } else {
                "iptables-legacy-restore"
            };
            let setup = timed(
                in_netns(client, restore).arg(&rules_file),
                plan.budget,
                restore,
            )?;
            (
                setup,
                vec![format!("{}:{}", under_test.vip, under_test.port)],
                false,
            )
        }
        Peer::Nftables => {
            std::fs::write(&rules_file, rules::nftables(services))?;
            let setup = timed(
                in_netns(client, "nft").arg("-f").arg(&rules_file),
                plan.budget,
                "nft -f",
            )?;
            (
                setup,
                vec![format!("{}:{}", under_test.vip, under_test.port)],
                false,
            )
        }
        Peer::Lb => {
            let (setup, extras) = lb_setup(testbed, services, plan)?;
            lb_extras = extras;
            (
                setup,
                vec![format!("{}:{}", under_test.vip, under_test.port)],
                true,
            )
        }
    };
    let connect4 = if peer == Peer::Lb {
        program_id(testbed, "connect4").ok()
    } else {
        None
    };
    let before = connect4.and_then(|id| bpf_run_stats(id).ok());
    let result = run_rounds(testbed, client, paired, &target, &direct, in_cgroup, plan);
    let after = connect4.and_then(|id| bpf_run_stats(id).ok());
    // connect6, to the Service's IPv6 clusterIP and through its v4-mapped IPv4 one: as
    // many timed connects as one round each.
    let connect6 = |target: String| {
        let id = program_id(testbed, "connect6").ok();
        let before = id.and_then(|id| bpf_run_stats(id).ok());
        let connects = (plan.connects / plan.rounds).max(1);
        let ran = run_client(testbed, client, &[target], true, connects, 0);
        let after = id.and_then(|id| bpf_run_stats(id).ok());
        ran.ok().and_then(|_| ns_per_call(before, after))
    };
    let (bpf_ns_per_connect6, bpf_ns_per_connect6_mapped) = if peer == Peer::Lb && result.is_ok() {
        let native = under_test
            .ipv6
            .as_ref()
            .and_then(|ipv6| connect6(format!("[{}]:{}", ipv6.vip, under_test.port)));
        let mapped = connect6(format!("[::ffff:{}]:{}", under_test.vip, under_test.port));
        (native, mapped)
    } else {
        (None, None)
    };
    teardown(testbed, client, peer)?;
    let result = result?;
    let bpf_ns_per_call = ns_per_call(before, after);
    ensure!(
        !result.peer.is_empty(),
        "no connect succeeded ({} errors)",
        result.errors
    );
    let p50 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.5) as f64;
    Ok(Measurement {
        peer: peer.name().into(),
        services: size,
        connect_p50_us: Some(p50(&result.peer)),
        connect_p99_us: Some(result.peer.value_at_quantile(0.99) as f64),
        paired_direct_p50_us: (!result.direct.is_empty()).then(|| p50(&result.direct)),
        conns_per_s: result.conns_per_s,
        setup_s: Some(setup_s),
        skipped: None,
        errors: result.errors,
        bpf_ns_per_call,
        bpf_ns_per_connect6,
        bpf_ns_per_connect6_mapped,
        endpoint_change_to_map_ms: lb_extras.endpoint_change_to_map_ms,
        agent_rss_mib: lb_extras.agent_rss_mib,
    })
}

fn record(histogram: &mut hdrhistogram::Histogram<u64>, errors: &mut u64, result: ClientResult) {
    *errors += result.errors;
    for us in result.latencies_us {
        histogram.saturating_record(us);
    }
}

/// What the rounds of one peer measured.
struct Rounds {
    peer: hdrhistogram::Histogram<u64>,
    /// The direct client's, alternating with the peer's; empty for `direct` itself.
    direct: hdrhistogram::Histogram<u64>,
    conns_per_s: Option<f64>,
    errors: u64,
}

/// The peer's client and a direct client (`paired`, outside the cgroup and the rules;
/// none for `direct` itself) take turns, `plan.rounds` each, so that whatever else the machine does weighs on both
/// alike; then the peer's rate.
fn run_rounds(
    testbed: &Testbed,
    client: &Pod,
    paired: Option<&Pod>,
    target: &[String],
    direct: &[String],
    in_cgroup: bool,
    plan: &Plan,
) -> anyhow::Result<Rounds> {
    let mut rounds = Rounds {
        peer: client::latency_histogram()?,
        direct: client::latency_histogram()?,
        conns_per_s: None,
        errors: 0,
    };
    let per_round = (plan.connects / plan.rounds).max(1);
    for round in 0..plan.rounds {
        // Who goes first alternates too, so that neither gains from the other warming the pods.
        let peer_first = round % 2 == 1;
        if peer_first {
            record(
                &mut rounds.peer,
                &mut rounds.errors,
                run_client(testbed, client, target, in_cgroup, per_round, 0)?,
            );
        }
        if let Some(paired) = paired {
            record(
                &mut rounds.direct,
                &mut rounds.errors,
                run_client(testbed, paired, direct, false, per_round, 0)?,
            );
        }
        if !peer_first {
            record(
                &mut rounds.peer,
                &mut rounds.errors,
                run_client(testbed, client, target, in_cgroup, per_round, 0)?,
            );
        }
    }
    let rate = run_client(testbed, client, target, in_cgroup, 0, plan.rate_ms)?;
    rounds.errors += rate.errors;
    rounds.conns_per_s = rate.conns_per_s;
    Ok(rounds)
}

fn run_client(
    testbed: &Testbed,
    client: &Pod,
    target: &[String],
    in_cgroup: bool,
    connects: u32,
    rate_ms: u64,
) -> anyhow::Result<ClientResult> {
    let xtask = binary("xtask")?;
    let mut command = if in_cgroup {
        testbed.pod_command(client, xtask)?
    } else {
        testbed.netns_command(client, xtask)?
    };
    let output = command
        .arg("bench-client")
        .args(target)
        .args([
            "--connects",
            &connects.to_string(),
            "--rate-ms",
            &rate_ms.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(
        output.status.success(),
        "bench-client failed: {}",
        output.status
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// lb's own figures besides the client's.
#[derive(Clone, Copy, Default)]
struct LbExtras {
    endpoint_change_to_map_ms: Option<f64>,
    agent_rss_mib: Option<f64>,
}

/// The lb agent over N Services from manifests: the full sync time, then the time an
/// EndpointSlice change takes to reach the maps, and the agent's memory.
fn lb_setup(
    testbed: &mut Testbed,
    services: &[rules::BenchService],
    plan: &Plan,
) -> anyhow::Result<(f64, LbExtras)> {
    let (rest, under_test) = services.split_at(services.len() - 1);
    testbed.write_manifest("services.yaml", &rules::manifests(rest))?;
    testbed.write_manifest("under-test.yaml", &rules::manifests(under_test))?;
    let manifests = testbed.manifests.clone();
    let started = Instant::now();
    testbed.spawn_agent(&[
        "--manifests".as_ref(),
        manifests.as_os_str(),
        "--metrics-addr".as_ref(),
        "127.0.0.1:0".as_ref(),
    ])?;
    let budget = plan.budget;
    wait_for("the agent's first sync", budget, || {
        if !testbed.agent_running() {
            bail!("the agent exited:\n{}", testbed.agent_output());
        }
        Ok(testbed.agent_output().contains(" ready").then_some(()))
    })
    .map_err(|e| anyhow::anyhow!("{OVER_BUDGET}: the agent's first sync: {e:#}"))?;
    let setup = started.elapsed().as_secs_f64();
    let port = testbed.metrics_port()?;

    // One endpoint of the Service under test goes away; the agent's own histogram times
    // the change from the file event to the maps.
    let (count_before, sum_before) = event_to_map(port)?;
    let mut changed = under_test.to_vec();
    changed[0].endpoints.pop();
    testbed.write_manifest("under-test.yaml", &rules::manifests(&changed))?;
    let (count, sum) = wait_for("the endpoint change in the maps", budget, || {
        let (count, sum) = event_to_map(port)?;
        Ok((count > count_before).then_some((count, sum)))
    })?;
    let change_ms = (sum - sum_before) / (count - count_before) as f64 * 1e3;
    // Back to three endpoints for the measurement.
    testbed.write_manifest("under-test.yaml", &rules::manifests(under_test))?;
    wait_for("the endpoint back", budget, || {
        Ok((event_to_map(port)?.0 > count).then_some(()))
    })?;
    let extras = LbExtras {
        endpoint_change_to_map_ms: Some(change_ms),
        agent_rss_mib: Some(agent_rss_mib(testbed)?),
    };
    Ok((setup, extras))
}

/// `lb_event_to_map_seconds` count and sum from the agent's /metrics.
fn event_to_map(port: u16) -> anyhow::Result<(u64, f64)> {
    let (_, text) = http_get(port, "/metrics")?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    Ok((
        value("lb_event_to_map_seconds_count ") as u64,
        value("lb_event_to_map_seconds_sum "),
    ))
}

fn agent_rss_mib(testbed: &Testbed) -> anyhow::Result<f64> {
    let pid = lb_tests::wait_for("the agent's pid", Duration::from_secs(5), || {
        let status: serde_json::Value =
            serde_json::from_str(&testbed.lb(&["status", "-o", "json"])?)?;
        Ok(status["agent_pid"].as_u64())
    })?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// The kernel id of lb's program `name`, as `lb status` reports it.
fn program_id(testbed: &Testbed, name: &str) -> anyhow::Result<u64> {
    let status: serde_json::Value = serde_json::from_str(&testbed.lb(&["status", "-o", "json"])?)?;
    status["programs"]
        .as_array()
        .and_then(|programs| programs.iter().find(|p| p["program"] == name))
        .and_then(|program| program["program_id"].as_u64())
        .with_context(|| format!("no {name} program id"))
}

/// The average run time per call between two (run_time_ns, run_cnt) readings.
fn ns_per_call(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    match (before, after) {
        (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0) as f64 / (c1 - c0) as f64),
        _ => None,
    }
}

/// run_time_ns and run_cnt of a program (kernel.bpf_stats_enabled must be on).
fn bpf_run_stats(id: u64) -> anyhow::Result<(u64, u64)> {
    let output =
        lb_tests::run(Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "-j"]))?;
    let info: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok((
        info["run_time_ns"].as_u64().unwrap_or(0),
        info["run_cnt"].as_u64().unwrap_or(0),
    ))
}

fn teardown(testbed: &mut Testbed, client: &Pod, peer: Peer) -> anyhow::Result<()> {
    match peer {
        Peer::Direct => {}
        Peer::IptablesNft | Peer::IptablesLegacy => {
            let tool = if peer == Peer::IptablesNft {
                "iptables-nft"
            } else {
                "iptables-legacy"
            };
            lb_tests::run(in_netns(client, tool).args(["-t", "nat", "-F"]))?;
            lb_tests::run(in_netns(client, tool).args(["-t", "nat", "-X"]))?;
        }
        Peer::Nftables => {
            lb_tests::run(in_netns(client, "nft").args(["delete", "table", "ip", "kube-proxy"]))?;
        }
        Peer::Lb => {
            testbed.stop_agent()?;
            testbed.lb(&["unload"])?;
            for name in ["services.yaml", "under-test.yaml"] {
                drop(testbed.remove_manifest(name));
            }
        }
    }
    Ok(())
}

/// kernel.bpf_stats_enabled on for the run, restored after.
struct BpfStats(Option<String>);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(before))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            drop(std::fs::write(BPF_STATS, before.trim()));
        }
    }
}

/// The peer's p50 against the direct p50 measured alongside it, in percent.
fn vs_direct(m: &Measurement) -> Option<String> {
    let (peer, direct) = (m.connect_p50_us?, m.paired_direct_p50_us?);
    (direct > 0.0).then(|| format!("{:+.1}%", (peer / direct - 1.0) * 100.0))
}

fn table(results: &[Measurement]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "PEER",
        "SERVICES",
        "P50 µs",
        "VS DIRECT",
        "P99 µs",
        "CONN/S",
        "SETUP s",
        "BPF ns/connect4",
        "BPF ns/connect6",
        "BPF ns/connect6 v4-mapped",
        "CHANGE→MAP ms",
        "RSS MiB",
        "NOTE",
    ]);
    let f = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for m in results {
        table.add_row([
            m.peer.clone(),
            m.services.to_string(),
            f(m.connect_p50_us, 0),
            vs_direct(m).unwrap_or_else(|| "-".to_owned()),
            f(m.connect_p99_us, 0),
            f(m.conns_per_s, 0),
            f(m.setup_s, 2),
            f(m.bpf_ns_per_call, 0),
            f(m.bpf_ns_per_connect6, 0),
            f(m.bpf_ns_per_connect6_mapped, 0),
            f(m.endpoint_change_to_map_ms, 1),
            f(m.agent_rss_mib, 1),
            m.skipped
                .clone()
                .map(|s| format!("skipped: {s}"))
                .unwrap_or_default(),
        ]);
    }
    table
}

fn control_table(results: &[ControlPlane]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header([
        "SOURCE",
        "SERVICES",
        "SYNC s",
        "CHANGE P50 ms",
        "CHANGE P99 ms",
        "CHANGES",
        "RSS MiB",
        "AT READY",
        "PEAK MiB",
        "NOTE",
    ]);
    let f = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for m in results {
        let note = match &m.skipped {
            Some(why) => format!("skipped: {why}"),
            None if m.changes < m.changes_planned => {
                format!("time bound: {} of {} changes", m.changes, m.changes_planned)
            }
            None => String::new(),
        };
        table.add_row([
            m.source.clone(),
            m.services.to_string(),
            f(m.sync_s, 2),
            f(m.change_p50_ms, 2),
            f(m.change_p99_ms, 2),
            m.changes.to_string(),
            f(m.rss_mib, 1),
            f(m.rss_ready_mib, 1),
            f(m.peak_rss_mib, 1),
            note,
        ]);
    }
    table
}
