//! lb's control plane per source, at N Services: the agent's full sync, then endpoint
//! changes one at a time, and its memory.
//!
//! - `yaml`: a manifest directory with the Services as multi-document YAML;
//! - `list-json`: the same directory with one `kind: List` JSON file, as `kubectl get
//!   svc,endpointslices -A -o json` writes it;
//! - `kubernetes`: the agent following the tests' own list/watch API server on 127.0.0.1
//!   through `--kubeconfig`.
//!
//! A change rewrites the EndpointSlice of one Service (3 endpoints, then 2, then 3, …): a
//! small file of its own for the manifest sources (the Service under test is in no other
//! file), an apply through the API server for `kubernetes`. Each change waits for the sync
//! that carries it before the next one. Its figure is the agent's own
//! `lb_event_to_map_seconds`, from the source's event to the maps written: the histogram's
//! buckets are too coarse to read, but its sum grows by exactly that change's time when its
//! count grows by one.

use std::{
    fs::File,
    io::Read as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_tests::{
    Testbed,
    apiserver::ApiServer,
    generate::{self, BenchService},
};
use serde::Serialize;

use super::{OVER_BUDGET, event_to_map};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// A manifest directory of multi-document YAML.
    Yaml,
    /// A manifest directory with one `kind: List` JSON file.
    ListJson,
    /// The Kubernetes API (the tests' list/watch server) through `--kubeconfig`.
    Kubernetes,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Yaml, Source::ListJson, Source::Kubernetes];

    pub fn name(self) -> &'static str {
        match self {
            Source::Yaml => "yaml",
            Source::ListJson => "list-json",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// lb's control plane with one source at one size; `null` figures when it was skipped.
#[derive(Debug, Serialize)]
pub struct ControlPlane {
    pub source: String,
    pub services: u32,
    /// From starting the agent to its first sync done (every map written, "ready").
    pub sync_s: Option<f64>,
    /// One EndpointSlice change, from the source's event to the maps written.
    pub change_p50_ms: Option<f64>,
    pub change_p99_ms: Option<f64>,
    pub change_max_ms: Option<f64>,
    /// Changes measured, and how many were planned: fewer when the time bound came first.
    pub changes: u32,
    pub changes_planned: u32,
    /// Changes that reached the maps in a sync with another one, measured as their mean.
    pub coalesced: u32,
    /// The agent's resident memory once settled after the first sync (its state file
    /// written, no sync for a while), and its peak until then.
    pub rss_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// Its resident memory the moment it reported ready (the state file still being
    /// written).
    pub rss_ready_mib: Option<f64>,
    pub skipped: Option<String>,
}

impl ControlPlane {
    pub fn skipped(source: Source, services: u32, why: String) -> Self {
        Self {
            source: source.name().into(),
            services,
            sync_s: None,
            change_p50_ms: None,
            change_p99_ms: None,
            change_max_ms: None,
            changes: 0,
            changes_planned: 0,
            coalesced: 0,
            rss_mib: None,
            peak_rss_mib: None,
            rss_ready_mib: None,
            skipped: Some(why),
        }
    }
}

/// How long and how much to measure.
pub struct Settings {
    /// For the first sync: over it, the source is skipped at larger sizes.
    pub budget: Duration,
    /// Endpoint changes to make, and the time they may take together.
    pub changes: u32,
    pub window: Duration,
    /// Where each run's agent log is kept, as `agent-{source}-{services}.log`.
    pub out: std::path::PathBuf,
}

/// How long one change may take to reach the maps before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the agent must have been without a sync before the first change, at least:
/// and twice its longest sync so far.
const QUIET: Duration = Duration::from_millis(500);

const MANIFEST_FILES: [&str; 3] = ["services.yaml", "services.json", "under-test.yaml"];

/// The agent over `services` from `source`: its first sync, then the endpoint changes.
/// The agent is stopped and the datapath unloaded afterwards, whatever happened.
pub fn measure(
    testbed: &mut Testbed,
    source: Source,
    services: &[BenchService],
    settings: &Settings,
) -> anyhow::Result<ControlPlane> {
    let api = (source == Source::Kubernetes)
        .then(ApiServer::start)
        .transpose()?;
    let result = run(testbed, source, api.as_ref(), services, settings);
    drop(std::fs::write(
        settings
            .out
            .join(format!("agent-{}-{}.log", source.name(), services.len())),
        testbed.agent_output(),
    ));
    let stopped = testbed.stop_agent();
    let unloaded = testbed.lb(&["unload"]);
    for name in MANIFEST_FILES {
        drop(testbed.remove_manifest(name));
    }
    let measured = result?;
    stopped?;
    unloaded?;
    Ok(measured)
}

fn run(
    testbed: &mut Testbed,
    source: Source,
    api: Option<&ApiServer>,
    services: &[BenchService],
    settings: &Settings,
) -> anyhow::Result<ControlPlane> {
    let size = u32::try_from(services.len())?;
    let (rest, under_test) = services.split_at(services.len() - 1);
    let under_test = under_test.first().context("no Services")?;
    let index = services.len() - 1;

    // Default flags, as a user starts it: the maps size themselves.
    let mut args: Vec<std::ffi::OsString> = vec!["--metrics-addr".into(), "127.0.0.1:0".into()];
    match (source, api) {
        (Source::Yaml, _) => {
            testbed.write_manifest("services.yaml", &generate::manifests(rest))?;
        }
        (Source::ListJson, _) => {
            testbed.write_manifest("services.json", &generate::list_json(rest))?;
        }
        (Source::Kubernetes, Some(api)) => {
            api.apply_many(generate::objects(services))?;
            let kubeconfig = testbed.manifests.with_file_name("kubeconfig");
            api.write_kubeconfig(&kubeconfig)?;
            args.extend(["--kubeconfig".into(), kubeconfig.into()]);
        }
        (Source::Kubernetes, None) => bail!("no API server"),
    }
    if source != Source::Kubernetes {
        testbed.write_manifest(
            "under-test.yaml",
            &generate::manifests(std::slice::from_ref(under_test)),
        )?;
        args.extend(["--manifests".into(), testbed.manifests.clone().into()]);
        // On disk before the clock starts, as a node's manifests are when its agent
        // starts: the kernel writing back hundreds of MB the benchmark just wrote would
        // otherwise be charged to the agent's read.
        for name in MANIFEST_FILES {
            let path = testbed.manifests.join(name);
            if path.exists() {
                File::open(&path)
                    .and_then(|file| file.sync_all())
                    .with_context(|| format!("flushing {}", path.display()))?;
            }
        }
    }

    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let started = Instant::now();
    let pid = testbed.spawn_agent(&args)?;
    let mut log = LogTail::open(&testbed.agent_log_path())?;
    let mut longest_sync = Duration::ZERO;
    let mut state_written = false;
    let written = |lines: &[String]| lines.iter().any(|line| line.contains("state file written"));
    loop {
        let lines = log.lines()?;
        longest_sync = longest_sync.max(longest(&lines));
        state_written |= written(&lines);
        if lines.iter().any(|line| line.contains(": ready")) {
            break;
        }
        if !testbed.agent_running() {
            bail!("the agent exited:\n{}", testbed.agent_output());
        }
        if started.elapsed() > settings.budget {
            bail!(
                "{OVER_BUDGET}: the agent's first sync still running after {:.0} s",
                settings.budget.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync_s = started.elapsed().as_secs_f64();
    let (rss_ready_mib, _) = memory_mib(pid)?;
    let port = testbed.metrics_port()?;

    // Syncs that follow the first one at once (a reflector's initial events, delivered after
    // the first sync read them) are not a change of ours: the first change waits for quiet.
    // A sync that takes longer than the quiet wait logs only when it ends: the wait is
    // twice the longest sync so far.
    let quiet_since = Instant::now();
    let mut last_sync = quiet_since;
    while last_sync.elapsed() < QUIET.max(longest_sync * 2)
        && quiet_since.elapsed() < CHANGE_TIMEOUT
    {
        let lines = log.lines()?;
        state_written |= written(&lines);
        if lines.iter().any(|line| line.contains(": synced ")) {
            last_sync = Instant::now();
            longest_sync = longest_sync.max(longest(&lines));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    while !state_written && quiet_since.elapsed() < CHANGE_TIMEOUT {
        state_written |= written(&log.lines()?);
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(state_written, "the agent wrote no state file");
    let (rss_mib, peak_rss_mib) = memory_mib(pid)?;

    let mut latencies = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut coalesced = 0;
    let (mut count, mut sum) = event_to_map(port)?;
    let window = Instant::now() + settings.window;
    let mut changed = under_test.clone();
    let mut done = 0;
    while done < settings.changes && Instant::now() < window {
        // 3 endpoints, then 2, then 3, …
        changed.endpoints = under_test.endpoints
            [..under_test.endpoints.len() - usize::from(done % 2 == 0)]
            .to_vec();
        match api {
            Some(api) => api.apply(generate::slice_object(&changed, index))?,
            None => testbed.write_manifest(
                "under-test.yaml",
                &generate::manifests(std::slice::from_ref(&changed)),
            )?,
        }
        // The agent logs each sync after recording it: the metrics are read only then.
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let (after_count, after_sum) = loop {
            if log.lines()?.iter().any(|line| line.contains(": synced ")) {
                let (c, s) = event_to_map(port)?;
                if c > count {
                    break (c, s);
                }
            }
            if !testbed.agent_running() {
                bail!("the agent exited:\n{}", testbed.agent_output());
            }
            ensure!(
                Instant::now() < deadline,
                "change {done} not in the maps after {CHANGE_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        let syncs = after_count - count;
        coalesced += u32::try_from(syncs - 1)?;
        let us = (after_sum - sum) / syncs as f64 * 1e6;
        latencies.saturating_record(us.round().max(1.0) as u64);
        (count, sum) = (after_count, after_sum);
        done += 1;
    }
    ensure!(done > 0, "no change measured");
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1e3;
    Ok(ControlPlane {
        source: source.name().into(),
        services: size,
        sync_s: Some(sync_s),
        change_p50_ms: Some(ms(0.5)),
        change_p99_ms: Some(ms(0.99)),
        change_max_ms: Some(latencies.max() as f64 / 1e3),
        changes: done,
        changes_planned: settings.changes,
        coalesced,
        rss_mib: Some(rss_mib),
        peak_rss_mib: Some(peak_rss_mib),
        rss_ready_mib: Some(rss_ready_mib),
        skipped: None,
    })
}

/// The longest of the syncs these log lines report (`synced … elapsed_us=N`).
fn longest(lines: &[String]) -> Duration {
    lines
        .iter()
        .filter(|line| line.contains(": synced "))
        .filter_map(|line| {
            let (_, after) = line.split_once("elapsed_us=")?;
            after.split_whitespace().next()?.parse().ok()
        })
        .map(Duration::from_micros)
        .max()
        .unwrap_or_default()
}

/// VmRSS and VmHWM (the peak so far) of a process, in MiB.
pub fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> anyhow::Result<f64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    Ok((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
}

/// A log file followed as it grows: each call returns the lines completed since the last.
struct LogTail {
    file: File,
    partial: Vec<u8>,
}

impl LogTail {
    fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            partial: Vec::new(),
        })
    }

    fn lines(&mut self) -> anyhow::Result<Vec<String>> {
        self.file.read_to_end(&mut self.partial)?;
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        Ok(String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}
