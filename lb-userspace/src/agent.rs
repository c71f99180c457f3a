//! `lb agent`: source → model → diff → maps. Reads the manifest directory, programs the
//! maps, then follows every change to the directory until SIGINT or SIGTERM.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    datapath::{self, ServiceMaps},
    model::{Desired, Node},
    mounts, netns,
    plan::{self, Programmed},
    state::{AgentPid, State},
    store::Store,
};

/// How long to wait for more file events before re-reading: an editor's save or a
/// `kubectl get -o yaml > file` is several events, and one sync should follow them all.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Directory of Service and EndpointSlice manifests (YAML or JSON, as `kubectl get -o yaml`
    /// writes them); changes are applied as they happen.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// cgroup2 directory to attach the programs to [default: the cgroup2 root, i.e. the whole node].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned links and maps.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory for the state file the CLI reads (Service names, what is not in the datapath).
    #[arg(long, value_name = "PATH", default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// This node's name, matched against endpoints' `nodeName` for
    /// `internalTrafficPolicy: Local` [default: the hostname, as kube-proxy].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// An address of this node that serves NodePorts; repeat for several
    /// [default: every non-loopback IPv4 address of the node's network namespace].
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<Ipv4Addr>,
    /// The node's own network namespace: its sockets, and only they, reach NodePorts on
    /// 127.0.0.1 [default: the agent's, as when it runs with hostNetwork].
    #[arg(long, value_name = "PATH", default_value = "/proc/self/ns/net")]
    pub host_netns: PathBuf,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.manifests.is_dir(),
        "--manifests {}: not a directory",
        args.manifests.display()
    );
    let cgroup = match args.cgroup {
        Some(cgroup) => cgroup,
        None => mounts::cgroup2_root()?,
    };
    let host = match netns::inspect(&args.host_netns) {
        Ok(host) => host,
        // Without the cookie, NodePorts on 127.0.0.1 match nobody; everything else works.
        Err(e) => {
            tracing::warn!("{e}; NodePorts on 127.0.0.1 stay off");
            netns::HostNetns {
                cookie: 0,
                addresses: Vec::new(),
            }
        }
    };
    let node = Node {
        name: match args.node_name {
            Some(name) => name,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        },
        ips: if args.node_ips.is_empty() {
            host.addresses.clone()
        } else {
            args.node_ips
        },
    };
    tracing::info!(node = %node.name, node_ips = ?node.ips, "node");
    let datapath = datapath::load(&args.bpffs, &cgroup)
        .with_context(|| format!("loading the datapath onto cgroup {}", cgroup.display()))?;
    tracing::info!(
        cgroup = %cgroup.display(),
        bpffs = %args.bpffs.display(),
        "programs attached, maps pinned"
    );
    let mut maps = datapath.maps;
    maps.set_host_netns_cookie(host.cookie)?;
    let snapshot = maps.read()?;
    let _pid = AgentPid::create(&args.state_dir)?;
    let mut syncer = Syncer {
        programmed: snapshot.programmed,
        store: Store::default(),
        node,
        state_dir: args.state_dir,
        cgroup,
    };

    // Watch before the first read, so no change between the two is missed.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event) if event.kind.is_access() => {}
            // The receiver is gone only while shutting down.
            _ => drop(events_tx.send(())),
        }
    })?;
    watcher
        .watch(&args.manifests, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", args.manifests.display()))?;

    syncer.sync(&mut maps, &args.manifests);
    for key in snapshot.orphans {
        if let Err(e) = maps.remove_service(&key) {
            tracing::warn!("removing a stale map entry: {e}");
        }
    }
    tracing::info!("ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            Some(()) = events.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {}
                syncer.sync(&mut maps, &args.manifests);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("stopping; the datapath stays loaded and keeps the last state");
    Ok(())
}

struct Syncer {
    programmed: Programmed,
    store: Store,
    node: Node,
    state_dir: PathBuf,
    cgroup: PathBuf,
}

impl Syncer {
    /// One pass of source → model → diff → maps. Failures are logged and leave the last good
    /// state in place: the agent keeps running and tries again on the next change.
    fn sync(&mut self, maps: &mut ServiceMaps, dir: &Path) {
        let started = Instant::now();
        match self.store.rescan(dir) {
            Ok(problems) => {
                for problem in problems {
                    tracing::error!("{problem}");
                }
            }
            Err(e) => {
                tracing::error!("{e}; keeping the last good state");
                return;
            }
        }
        let desired = self.store.desired(&self.node);
        report(&desired);
        let (ops, next) = match plan::plan(&self.programmed, &desired.specs()) {
            Ok(planned) => planned,
            Err(e) => {
                tracing::error!("{e}; keeping the last good state");
                return;
            }
        };
        if let Err(e) = maps.apply(&ops) {
            tracing::error!("writing the maps: {e}; re-reading them to retry on the next change");
            match maps.read() {
                Ok(snapshot) => self.programmed = snapshot.programmed,
                Err(e) => tracing::error!("re-reading the maps: {e}"),
            }
            return;
        }
        self.programmed = next;
        if let Err(e) = State::of(&desired, &self.cgroup, &self.node.name).write(&self.state_dir) {
            tracing::error!("{e}; `lb services` may show stale names");
        }
        let (services, slices) = self.store.counts();
        tracing::info!(
            services,
            endpoint_slices = slices,
            frontends = desired.frontends.len(),
            backends = self.programmed.backends.len(),
            map_writes = ops.len(),
            elapsed_us = started.elapsed().as_micros(),
            "synced"
        );
    }
}

fn report(desired: &Desired) {
    for conflict in &desired.conflicts {
        tracing::error!(
            "Service {} claims {} which Service {} already has; ignored",
            conflict.ignored,
            conflict.frontend,
            conflict.kept
        );
    }
    for (service, why) in &desired.not_in_datapath {
        tracing::debug!(%service, ?why, "not in the datapath");
    }
}
