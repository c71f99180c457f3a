//! `lb agent`: source → model → diff → maps. Loads the datapath, then keeps the maps in
//! line with the Services and EndpointSlices of its source until SIGINT or SIGTERM.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    maps::{self as datapath, mounts},
    metrics::{self, ErrorKind, Metrics},
    model::{Desired, Frontend, Node, ObjectRef},
    netns, node_ports,
    plan::{self, Capacity, PlanError, Programmed},
    source::{
        Change, Source, kubernetes,
        manifests::{Manifests, SETTLE},
    },
    state::{self, AgentPid, StateWriter},
    store::Store,
};

/// How long to wait, after an address of the node changed, before reading them all: an
/// interface being configured changes several at once.
const ADDRESS_BURST: Duration = Duration::from_millis(100);

/// Where manifests are read from when no cluster is configured.
pub const DEFAULT_MANIFESTS: &str = "/etc/lb/manifests";

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Directory of Service and EndpointSlice manifests (YAML or JSON, as `kubectl get -o
    /// yaml` writes them), followed as it changes. Used when no cluster is configured
    /// [default: /etc/lb/manifests].
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Follow the cluster of this kubeconfig. In a pod (KUBERNETES_SERVICE_HOST set) the
    /// in-cluster configuration is used without it.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// cgroup2 directory to attach the programs to [default: the cgroup2 root, i.e. the whole node].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned links and maps.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory for the state file the CLI reads (Service names, endpoint states).
    #[arg(long, value_name = "PATH", default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// This node's name, matched against endpoints' `nodeName` for
    /// `internalTrafficPolicy: Local` [default: the hostname, as kube-proxy].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// This node's zone, for endpoints' zone hints (`trafficDistribution: PreferSameZone`)
    /// [default: the `topology.kubernetes.io/zone` label of its Node object, with the
    /// Kubernetes source; none with manifests].
    #[arg(long, value_name = "ZONE")]
    pub node_zone: Option<String>,
    /// An address of this node that serves NodePorts; repeat for several
    /// [default: every non-loopback IPv4 address of the node's network namespace].
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<IpAddr>,
    /// The node's own network namespace: its sockets, and only they, reach NodePorts on
    /// 127.0.0.1 [default: the agent's, as when it runs with hostNetwork].
    #[arg(long, value_name = "PATH", default_value = "/proc/self/ns/net")]
    pub host_netns: PathBuf,
    /// The cluster's NodePort range (kube-apiserver's `--service-node-port-range`), added to
    /// the node netns's `net.ipv4.ip_local_reserved_ports` so that no ephemeral port lands
    /// on a NodePort, whose binds the datapath refuses; `lb unload` gives back what was
    /// added. `none` reserves nothing.
    #[arg(long, value_name = "FIRST-LAST|none",
          default_value = crate::node_ports::DEFAULT_NODE_PORT_RANGE,
          value_parser = crate::node_ports::parse_range)]
    pub node_port_range: crate::node_ports::NodePortRange,
    /// Also destroy the TCP connections lb translated to a backend that left their
    /// frontend (connected UDP sockets always are). Off by default: kube-proxy leaves TCP
    /// flows alone, and a TCP peer that is gone resets or times out on its own.
    #[arg(long)]
    pub terminate_tcp: bool,
    /// Serve Prometheus /metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9965).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the cluster DNS zone from the agent's model on this address, UDP and TCP, in
    /// the node's network namespace (e.g. the node's address:53 for its pods' resolv.conf):
    /// Services' names resolve to exactly what the maps serve.
    #[arg(long, value_name = "ADDR")]
    pub dns: Option<SocketAddr>,
    /// The cluster's DNS domain (kubelet's `--cluster-domain`), under which `--dns` answers.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Forward `--dns` queries for names outside the cluster domain to this server (e.g.
    /// the node's resolver, 10.0.0.2:53), over UDP; without it they are refused.
    #[arg(long, value_name = "ADDR", requires = "dns")]
    pub dns_upstream: Option<SocketAddr>,
    /// Upper bound of the service map (one entry per frontend plus one per backend slot).
    /// The maps are sized from what the source needs and grow while the agent runs; a
    /// Service that would take a map past its bound is refused, whole, and reported.
    #[arg(long, value_name = "N", alias = "service-map-entries",
          default_value_t = DEFAULT_CEILING.services,
          value_parser = clap::value_parser!(u32).range(16..))]
    pub service_map_max_entries: u32,
    /// Upper bound of the backend map: distinct backend address:port pairs.
    #[arg(long, value_name = "N", alias = "backend-map-entries",
          default_value_t = DEFAULT_CEILING.backends,
          value_parser = clap::value_parser!(u32).range(16..))]
    pub backend_map_max_entries: u32,
    /// Upper bound of the affinity-match map: one entry per backend of a frontend with
    /// session affinity, and of a UDP frontend.
    #[arg(long, value_name = "N",
          default_value_t = DEFAULT_CEILING.affinity_matches,
          value_parser = clap::value_parser!(u32).range(16..))]
    pub affinity_match_map_max_entries: u32,
}

/// Default upper bounds of the growing maps: far above 100k Services with a few endpoints
/// each (about 0.5M service entries), yet a bound on the kernel memory a runaway source can
/// make the agent take (about 80 bytes an entry).
pub const DEFAULT_CEILING: Capacity = Capacity {
    services: 1 << 22,
    backends: 1 << 21,
    affinity_matches: 1 << 22,
};

/// Why a sync did not bring the maps in line with the source.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("reading the source: {0}")]
    Source(#[from] crate::source::SourceError),
    #[error("reading the maps back: {0}")]
    ReadBack(#[source] Box<datapath::DatapathError>),
    #[error("growing the maps to {to}: {source}")]
    Grow {
        to: Capacity,
        source: Box<datapath::DatapathError>,
    },
    #[error("writing the maps: {0}")]
    Write(#[source] Box<datapath::DatapathError>),
}

/// Undoes a start that fails after it loaded the datapath onto a pin directory that held
/// nothing of lb's: its links (which detaches the programs), its pins, and the NodePorts it
/// reserved. A start over an earlier agent's pins leaves them: they serve as before.
struct FreshStart {
    bpffs: PathBuf,
    state_dir: PathBuf,
    armed: bool,
}

impl FreshStart {
    fn new(bpffs: &std::path::Path, state_dir: &std::path::Path) -> Self {
        Self {
            bpffs: bpffs.into(),
            state_dir: state_dir.into(),
            armed: !datapath::anything_pinned(bpffs),
        }
    }

    /// The start went through: what it made stays.
    fn done(mut self) {
        self.armed = false;
    }
}

impl Drop for FreshStart {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match datapath::unload(&self.bpffs) {
            Ok(removed) if !removed.is_empty() => tracing::info!(
                "the start failed: removed the {} pins it made in {}",
                removed.len(),
                self.bpffs.display()
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(
                "the start failed, and removing its pins in {} failed too: {e}; run `lb unload`",
                self.bpffs.display()
            ),
        }
        if let Err(e) = node_ports::release(&self.state_dir) {
            tracing::error!(
                "the start failed, and giving back its reserved NodePorts failed too: {e}"
            );
        }
    }
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let cgroup = match args.cgroup {
        Some(cgroup) => cgroup,
        None => mounts::cgroup2_root()?,
    };
    // Flags are checked before anything is loaded.
    mounts::ensure_cgroup2(&cgroup)?;
    state::ensure_private_dir(&args.state_dir)?;
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let manifest_dir = match (&args.manifests, &args.kubeconfig) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(_)) => None,
        (None, None) if in_cluster => None,
        (None, None) => Some(PathBuf::from(DEFAULT_MANIFESTS)),
    };
    if let Some(dir) = &manifest_dir {
        anyhow::ensure!(
            dir.is_dir(),
            "--manifests {}: not a directory (or pass --kubeconfig to follow a cluster)",
            dir.display()
        );
    }
    // The DNS addresses are bound now, so that a taken port fails the start before anything
    // is loaded; they are served once the first sync has filled the zone (queries wait in
    // the sockets meanwhile).
    let dns = match args.dns {
        Some(addr) => {
            let zone = crate::dns::Zone::new(&args.cluster_domain)?;
            let sockets = crate::dns::bind(addr, &args.host_netns)?;
            Some((Arc::new(std::sync::RwLock::new(zone)), sockets))
        }
        None => None,
    };
    // Given addresses stay; discovered ones are followed, from before they are first read
    // so that no change in between is missed.
    let mut node_addresses = NodeAddresses::follow(args.node_ips.is_empty(), &args.host_netns);
    let host = match netns::inspect(&args.host_netns) {
        Ok(host) => host,
        // Without the cookie, NodePorts on 127.0.0.1 match nobody; everything else works.
        Err(e) => {
            tracing::warn!("{e}; NodePorts on 127.0.0.1 stay off");
            netns::HostNetns {
                cookie: 0,
                addresses: netns::addresses_of(&args.host_netns).unwrap_or_else(|e| {
                    tracing::warn!("{e}; NodePorts only on --node-ip addresses");
                    Vec::new()
                }),
            }
        }
    };
    let mut node = Node {
        zone: args.node_zone.as_deref().map(std::sync::Arc::from),
        name: match args.node_name {
            Some(name) => name,
            // kube-proxy's default too: node names are lowercase, hostnames need not be.
            None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
        },
        ips: if args.node_ips.is_empty() {
            host.addresses.clone()
        } else {
            args.node_ips
        },
    };
    tracing::info!(node = %node.name, node_ips = ?node.ips, "node");

    let metrics = Arc::new(Metrics::new(args.bpffs.clone()));
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-addr {addr}"))?;
        // Port 0 picks a free port: the log says which.
        let bound = listener
            .local_addr()
            .with_context(|| format!("--metrics-addr {addr}"))?;
        tracing::info!(addr = %bound, "metrics listening");
        tokio::spawn(metrics::serve(listener, metrics.clone()));
    }

    // One agent per pin directory: two would interleave their writes and break the order
    // that keeps connects safe during updates.
    let _lock = datapath::lock(&args.bpffs)?;
    // The datapath first: pinned maps from an earlier agent keep translating meanwhile.
    let ceiling = Capacity {
        services: args.service_map_max_entries,
        backends: args.backend_map_max_entries,
        affinity_matches: args.affinity_match_map_max_entries,
    };
    // New maps start small; the first sync grows them to what the source needs.
    let initial = Capacity {
        services: Capacity::INITIAL.services.min(ceiling.services),
        backends: Capacity::INITIAL.backends.min(ceiling.backends),
        affinity_matches: Capacity::INITIAL
            .affinity_matches
            .min(ceiling.affinity_matches),
    };
    let fresh_start = FreshStart::new(&args.bpffs, &args.state_dir);
    // Changes are watched before the first read, so none between the two is missed.
    let (changes, mut changed) = mpsc::unbounded_channel();
    // The source is read while the datapath loads: on a large cluster, the first sync
    // starts with the objects already in the store.
    let first_read = match (manifest_dir, args.kubeconfig) {
        (Some(dir), _) => FirstRead::start(manifests(&dir, changes)?)?,
        (None, kubeconfig) => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            if node.zone.is_none() {
                node.zone = kubernetes::node_zone(&client, &node.name).await;
            }
            let (source, lists) = kubernetes::Kubernetes::start(client, changes)?;
            FirstRead::Listing(Source::Kubernetes(source), lists)
        }
    };
    if let Some(zone) = &node.zone {
        tracing::info!(%zone, "node zone, for endpoints' zone hints");
    }

    let mut datapath = datapath::load(&args.bpffs, &cgroup, initial)
        .with_context(|| format!("loading the datapath onto cgroup {}", cgroup.display()))?;
    tracing::info!(
        cgroup = %cgroup.display(),
        bpffs = %args.bpffs.display(),
        "programs attached, maps pinned"
    );
    datapath.maps.set_host_netns_cookie(host.cookie)?;
    // Loading parsed the kernel's BTF and the object's ELF, dropped now: some megabytes the
    // agent would otherwise hold for as long as it runs.
    crate::memory::release_freed();
    if let Some(range) = &args.node_port_range.0 {
        // Without it the node still works: a bind or connect drawing a NodePort as its
        // ephemeral port fails, which is what the reservation avoids.
        match node_ports::reserve(&args.host_netns, range, &args.state_dir) {
            Ok(added) if added.is_empty() => {}
            Ok(added) => tracing::info!(
                ports = %added,
                "NodePorts kept out of the node's ephemeral ports (net.ipv4.ip_local_reserved_ports)"
            ),
            Err(e) => tracing::error!(
                "{e}; a bind or connect on the node may draw a NodePort as its ephemeral port and fail"
            ),
        }
    }

    let _pid = AgentPid::create(&args.state_dir)?;
    let state_errors = metrics.clone();
    let features = crate::features::probe();
    crate::features::log(&features);
    let terminate = crate::features::can_terminate_sockets(&features);
    if !terminate {
        tracing::warn!(
            "connected sockets on backends that left are not terminated: this kernel lacks what it needs (see `lb status`)"
        );
    }
    let stale_sockets = StaleSockets {
        cgroup: cgroup.clone(),
        enabled: terminate,
        tcp: args.terminate_tcp,
    };
    let state = StateWriter::spawn(
        args.state_dir.clone(),
        cgroup,
        node.name.clone(),
        move |e| {
            tracing::error!("{e}; `lb services` may show stale names");
            state_errors.error(ErrorKind::StateFile);
        },
    )
    .context("starting the state file writer")?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // The Kubernetes lists may take long (an API server down): a stop meanwhile is a failed
    // start, which takes back what it loaded.
    let (mut source, store) = tokio::select! {
        joined = first_read.join() => joined?,
        _ = sigterm.recv() => anyhow::bail!("stopped before the source's first read was in"),
        _ = sigint.recv() => anyhow::bail!("stopped before the source's first read was in"),
    };
    let mut syncer = Syncer {
        store,
        desired: Desired::default(),
        programmed: Programmed::default(),
        datapath,
        ceiling,
        read_back: true,
        full: true,
        refused: BTreeMap::new(),
        reported: BTreeSet::new(),
        node,
        state,
        unwritten_services: Default::default(),
        unwritten_frontends: BTreeSet::new(),
        stale_sockets,
        incumbents_from: Some(args.state_dir.clone()),
        detached: None,
        addresses_written: Vec::new(),
        shared_addresses: BTreeSet::new(),
        metrics: metrics.clone(),
        dns_zone: dns.as_ref().map(|(zone, _)| zone.clone()),
        dns_pending: Default::default(),
    };
    // From here on the agent runs: a failed sync is retried, never a reason to stop.
    fresh_start.done();
    let mut first_done = false;
    let mut retry = Retry::default();
    syncer.sync_and_report(&mut source, None, &mut retry, &mut first_done);
    let _dns_server = match dns {
        Some((zone, sockets)) => {
            let server = crate::dns::serve(
                sockets,
                zone,
                args.dns_upstream,
                metrics.dns_queries.clone(),
            )?;
            tracing::info!(addr = ?args.dns, domain = %args.cluster_domain, "DNS serving");
            Some(server)
        }
        None => None,
    };

    let mut settle = Settle::default();
    let mut pin_check = tokio::time::interval(PIN_CHECK);
    pin_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // No batching window: a change is applied at once, and the changes that arrive
        // while a sync runs are coalesced into the next one.
        let changed_at = tokio::select! {
            Some(first) = changed.recv() => {
                let mut pending = Pending::default();
                pending.add(first);
                while let Ok(change) = changed.try_recv() {
                    pending.add(change);
                }
                settle.extend(pending.unsettled);
                match pending.complete {
                    Some(at) => Some(at),
                    // Only writes in progress: the sync waits for them to close or settle.
                    None => continue,
                }
            }
            seen = settle.due() => Some(seen),
            () = retry.wait() => None,
            at = node_addresses.due() => match node_addresses.read(&syncer.node.ips) {
                Some(ips) => {
                    syncer.node_ips_changed(ips);
                    Some(at)
                }
                None => continue,
            },
            _ = pin_check.tick() => match syncer.repair_datapath() {
                true => None,
                false => continue,
            },
            _ = sighup.recv() => {
                // As daemons do: read the configuration again. The maps are read back too,
                // and whatever differs from the source is rewritten.
                tracing::info!(
                    "SIGHUP: reading {} again and checking the maps against it",
                    source.describe()
                );
                source.reread();
                syncer.read_back = true;
                Some(Instant::now())
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        syncer.sync_and_report(&mut source, changed_at, &mut retry, &mut first_done);
    }
    tracing::info!("stopping; the datapath stays loaded and keeps the last state");
    Ok(())
}

/// The first read of the source while the datapath loads: a manifest directory on a
/// thread of its own, the Kubernetes lists on the runtime's workers.
enum FirstRead {
    Reading(std::thread::JoinHandle<(Source, Store)>),
    Listing(Source, kubernetes::InitialLists),
}

impl FirstRead {
    fn start(source: Source) -> anyhow::Result<Self> {
        let reading = std::thread::Builder::new()
            .name("lb-first-read".into())
            .spawn(move || {
                let mut source = source;
                let mut store = Store::default();
                // Its problems and errors are the first sync's too: that sync refreshes
                // again, which reports the files' problems anew and retries what failed.
                drop(source.refresh(&mut store));
                (source, store)
            })
            .context("starting the first read of the manifests")?;
        Ok(Self::Reading(reading))
    }

    /// The source, and the store with what it read so far (the Kubernetes source's
    /// events are in its queue, for the first sync).
    async fn join(self) -> Result<(Source, Store), kubernetes::KubernetesError> {
        match self {
            Self::Reading(reading) => Ok(reading
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
            Self::Listing(source, lists) => {
                lists.wait().await?;
                Ok((source, Store::default()))
            }
        }
    }
}

/// The changes drained from the channel at once.
#[derive(Default)]
struct Pending {
    /// The earliest complete change, if any: a sync is due now.
    complete: Option<Instant>,
    /// The earliest write in progress, if any.
    unsettled: Option<Instant>,
}

impl Pending {
    fn add(&mut self, change: Change) {
        let earliest = |slot: &mut Option<Instant>, at: Instant| {
            *slot = Some(slot.map_or(at, |earlier| earlier.min(at)));
        };
        match change {
            Change::Complete(at) => earliest(&mut self.complete, at),
            Change::Unsettled(at) => earliest(&mut self.unsettled, at),
        }
    }
}

/// A sync for files that were written and not closed: due [`SETTLE`] after the last write,
/// for writers that never close (a closed file triggers a sync of its own at once).
#[derive(Default)]
struct Settle {
    /// When the first of the writes was seen, and when the sync is due.
    due: Option<(Instant, tokio::time::Instant)>,
}

impl Settle {
    fn extend(&mut self, write: Option<Instant>) {
        if let Some(at) = write {
            let first = self.due.map_or(at, |(first, _)| first.min(at));
            // The grace restarts with each write; a little more than SETTLE, so that the
            // source sees the write as settled when the sync reads it.
            let due = tokio::time::Instant::now() + SETTLE + Duration::from_millis(10);
            self.due = Some((first, due));
        }
    }

    /// Resolves with the time of the first write when the sync is due; never without one.
    async fn due(&mut self) -> Instant {
        match self.due {
            Some((first, at)) => {
                tokio::time::sleep_until(at).await;
                self.due = None;
                first
            }
            None => std::future::pending().await,
        }
    }
}

/// The node's addresses, followed when they were not given: NodePorts answer on each.
struct NodeAddresses {
    watch: Option<netns::AddressWatch>,
    netns: PathBuf,
    /// A read to make: when the change was seen, and when to read. Kept here rather than in
    /// [`NodeAddresses::due`]'s future, which the agent's loop drops when something else
    /// comes first.
    read_at: Option<(Instant, tokio::time::Instant)>,
}

impl NodeAddresses {
    /// A failed read is tried again after this.
    const RECHECK: Duration = Duration::from_secs(5);

    fn follow(follow: bool, netns: &std::path::Path) -> Self {
        let watch = if follow {
            netns::AddressWatch::new(netns)
                .inspect_err(|e| {
                    tracing::warn!("{e}; NodePorts stay on the node addresses found at start");
                })
                .ok()
        } else {
            None
        };
        Self {
            watch,
            netns: netns.into(),
            read_at: None,
        }
    }

    /// Resolves, with the time of the change, when the addresses should be read; never
    /// when they are not followed.
    async fn due(&mut self) -> Instant {
        loop {
            if let Some((seen, at)) = self.read_at {
                tokio::time::sleep_until(at).await;
                self.read_at = None;
                return seen;
            }
            let Some(watch) = self.watch.as_mut() else {
                return std::future::pending().await;
            };
            match watch.changed().await {
                // Several addresses change at once when an interface is configured: one
                // read, a moment later.
                Ok(()) => {
                    self.read_at =
                        Some((Instant::now(), tokio::time::Instant::now() + ADDRESS_BURST));
                }
                Err(e) => {
                    tracing::warn!("{e}; NodePorts stay on the node addresses they have");
                    self.watch = None;
                }
            }
        }
    }

    /// The node's addresses, if they differ from `current`. A failed read is tried again
    /// a little later: the change that prompted it will not be notified twice.
    fn read(&mut self, current: &[std::net::IpAddr]) -> Option<Vec<std::net::IpAddr>> {
        match netns::addresses_of(&self.netns) {
            Ok(ips) => (ips != current).then_some(ips),
            Err(e) => {
                tracing::warn!(
                    "{e}; reading the node's addresses again in {:?}",
                    Self::RECHECK
                );
                self.read_at = Some((Instant::now(), tokio::time::Instant::now() + Self::RECHECK));
                None
            }
        }
    }
}

/// When to try again after a failed sync: soon, then less and less often, so that a
/// transient failure heals without a change and a lasting one does not spin.
#[derive(Default)]
struct Retry {
    at: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Retry {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    fn failed(&mut self) {
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        self.at = Some(tokio::time::Instant::now() + self.delay);
    }

    /// Resolves when a retry is due; never when none is.
    async fn wait(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

fn manifests(dir: &std::path::Path, changes: crate::source::Changes) -> anyhow::Result<Source> {
    anyhow::ensure!(
        dir.is_dir(),
        "--manifests {}: not a directory (or pass --kubeconfig to follow a cluster)",
        dir.display()
    );
    Ok(Source::Manifests(Manifests::watch(dir, changes)?))
}

struct Syncer {
    store: Store,
    desired: Desired,
    programmed: Programmed,
    datapath: datapath::Datapath,
    /// Upper bounds of the growing maps.
    ceiling: Capacity,
    /// The maps are read back before the next plan: at the start (an earlier agent's
    /// state), and after a failed write left them partly written.
    read_back: bool,
    /// The next plan covers every frontend, not only those that changed: after the maps
    /// were read back.
    full: bool,
    /// Services plans refused to write, and why: tried again every sync (what took their
    /// room may have gone) and reported while they last.
    refused: BTreeMap<ObjectRef, PlanError>,
    /// Problems already logged, so that each is logged (and counted) once, not every sync.
    reported: BTreeSet<String>,
    node: Node,
    state: StateWriter,
    /// Services and frontends the model changed since the state file was last told.
    unwritten_services: crate::hash::Set<ObjectRef>,
    unwritten_frontends: BTreeSet<Frontend>,
    stale_sockets: StaleSockets,
    /// The state directory, until the first sync has looked in it for who served the
    /// frontends claimed twice ([`Syncer::prefer_incumbents`]).
    incumbents_from: Option<PathBuf>,
    /// Why the datapath is not whole, while programs or pins taken from under the agent
    /// cannot be put back: not ready meanwhile.
    detached: Option<String>,
    /// Addresses the last writes put a frontend or a backend on, to look at once the sync
    /// is reported ([`Syncer::warn_shared_addresses`]).
    addresses_written: Vec<std::net::IpAddr>,
    /// Service addresses that are also an endpoint's, warned about while they last.
    shared_addresses: BTreeSet<std::net::IpAddr>,
    metrics: Arc<Metrics>,
    /// The DNS zone (`--dns`), told of the Services a sync changed once it wrote the maps.
    dns_zone: Option<Arc<std::sync::RwLock<crate::dns::Zone>>>,
    /// Services changed since the zone was last told: a sync that fails keeps them for the
    /// next.
    dns_pending: crate::hash::Set<ObjectRef>,
}

/// A sync's plan from `programmed` to `desired`, and the frontends it covers: those the
/// model `touched`, or every frontend the maps or the model have when the maps were read
/// back (`full`, which also sweeps what an interrupted plan left); and those of the
/// Services `refused` before, tried again since what took their room may have gone. Those
/// that no longer own any frontend (gone from the source, or every frontend taken by
/// another Service) are no longer refused. A Service's frontends are written together or
/// not at all, within `ceiling`.
pub fn plan_sync<'a>(
    programmed: &Programmed,
    desired: &'a Desired,
    touched: BTreeSet<Frontend>,
    full: bool,
    refused: &mut BTreeMap<ObjectRef, PlanError>,
    ceiling: &Capacity,
) -> (BTreeSet<Frontend>, plan::Plan<&'a ObjectRef>) {
    let mut scope: BTreeSet<Frontend> = if full {
        programmed
            .frontends
            .keys()
            .chain(desired.frontends().map(|(frontend, _)| frontend))
            .copied()
            .collect()
    } else {
        touched
    };
    refused.retain(|service, _| {
        desired.frontends_of(service).any(|frontend| {
            desired
                .target(&frontend)
                .is_some_and(|t| &t.service == service)
        })
    });
    for service in refused.keys() {
        scope.extend(desired.frontends_of(service));
    }
    let plan = plan::plan(
        programmed,
        |frontend| {
            desired
                .target(frontend)
                .map(|target| (&target.service, &target.spec))
        },
        &scope,
        ceiling,
        full,
    );
    (scope, plan)
}

/// How often the agent checks that its links and pins are all there.
const PIN_CHECK: Duration = Duration::from_secs(1);

/// Which connected sockets lb translated are destroyed when their backend leaves: those
/// of the processes in `cgroup`, UDP, and TCP with `tcp`; none unless `enabled` (the
/// kernel has what it takes).
struct StaleSockets {
    cgroup: PathBuf,
    enabled: bool,
    tcp: bool,
}

impl StaleSockets {
    /// Whether `op` may leave sockets of the protocols terminated on a backend that left.
    fn may_strand(&self, op: &plan::MapOp) -> bool {
        use crate::model::Protocol;
        if !self.enabled {
            return false;
        }
        match op {
            plan::MapOp::DeleteSlot(frontend, _)
            | plan::MapOp::DeleteMaster(frontend)
            | plan::MapOp::PutSlot(frontend, ..) => match frontend.protocol {
                Protocol::Udp => true,
                Protocol::Tcp => self.tcp,
                Protocol::Sctp => false,
            },
            _ => false,
        }
    }
}

impl Syncer {
    /// One sync, its outcome logged, counted and reflected in /readyz.
    fn sync_and_report(
        &mut self,
        source: &mut Source,
        changed_at: Option<Instant>,
        retry: &mut Retry,
        first_done: &mut bool,
    ) {
        let started = Instant::now();
        match self.sync(source, changed_at) {
            Ok(()) => {
                *retry = Retry::default();
                let not_ready = self.detached.clone().or_else(|| self.refusal_summary());
                if !*first_done {
                    *first_done = true;
                    match &not_ready {
                        None => tracing::info!(source = %source.describe(), "ready"),
                        Some(why) => {
                            tracing::warn!(source = %source.describe(), "synced, not ready: {why}")
                        }
                    }
                }
                self.metrics.set_readiness(not_ready);
                self.write_state();
                self.warn_shared_addresses();
            }
            Err(e) => {
                let kind = match e {
                    SyncError::Source(_) => ErrorKind::Source,
                    _ => ErrorKind::MapWrite,
                };
                self.metrics.error(kind);
                tracing::error!("{e}; keeping the last good state, retrying");
                self.metrics
                    .set_readiness(Some(format!("the last sync failed: {e}; retrying")));
                retry.failed();
            }
        }
        // A long sync allocated and freed enough to be worth handing back now, after the
        // maps are written and the sync reported.
        if started.elapsed() >= crate::memory::RELEASE_AFTER {
            crate::memory::release_freed();
        }
    }

    /// Puts back programs and pins taken from under the agent (checked every
    /// [`PIN_CHECK`]); `true` when something changed that readiness depends on, so that a
    /// sync reports it.
    fn repair_datapath(&mut self) -> bool {
        match self.datapath.repair() {
            Ok(repairs) if repairs.is_empty() => self.detached.take().is_some(),
            Ok(repairs) => {
                tracing::warn!(
                    programs = ?repairs.programs,
                    maps = ?repairs.maps,
                    "links or pins were removed under the agent: programs attached and maps pinned again"
                );
                let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
                self.metrics
                    .repairs
                    .get_or_create(&metrics::RepairLabels { what: "program" })
                    .inc_by(count(repairs.programs.len()));
                self.metrics
                    .repairs
                    .get_or_create(&metrics::RepairLabels { what: "map_pin" })
                    .inc_by(count(repairs.maps.len()));
                self.detached = None;
                true
            }
            Err(e) => {
                let why = format!("the datapath was taken apart and cannot be put back: {e}");
                if self.detached.as_ref() != Some(&why) {
                    tracing::error!("{why}; trying again every {PIN_CHECK:?}");
                }
                self.metrics.set_readiness(Some(why.clone()));
                self.detached = Some(why);
                false
            }
        }
    }

    /// Why the maps do not hold all the source has, if Services were refused.
    fn refusal_summary(&self) -> Option<String> {
        let (first, error) = self.refused.iter().next()?;
        Some(format!(
            "{} Service(s) refused, e.g. {first}: {error}",
            self.refused.len()
        ))
    }

    /// One pass of source → model → diff → maps. Failures leave the last good state in
    /// place: the agent keeps running and tries again.
    fn sync(&mut self, source: &mut Source, changed_at: Option<Instant>) -> Result<(), SyncError> {
        let result = self.try_sync(source, changed_at);
        if matches!(
            result,
            Err(SyncError::ReadBack(_) | SyncError::Grow { .. } | SyncError::Write(_))
        ) {
            // The changes this sync took from the store were not written: the next plan
            // covers every frontend, so that none of them is lost.
            self.full = true;
        }
        result
    }

    fn try_sync(
        &mut self,
        source: &mut Source,
        changed_at: Option<Instant>,
    ) -> Result<(), SyncError> {
        let started = Instant::now();
        // Rendered here, where they are logged: the store and the sources keep them typed.
        let mut problems: Vec<String> = source
            .refresh(&mut self.store)?
            .iter()
            .chain(&self.store.problems())
            .map(ToString::to_string)
            .collect();
        let refreshed = started.elapsed();
        let changed = self.store.take_changed();
        if self.dns_zone.is_some() {
            self.dns_pending.extend(changed.iter().cloned());
        }
        let modelling = Instant::now();
        let mut touched = self.desired.update(
            changed.iter().map(|id| (id, self.store.service(id))),
            &self.node,
        );
        if let Some(state_dir) = self.incumbents_from.take()
            && self.desired.is_contested()
        {
            touched.extend(self.prefer_incumbents(&state_dir));
        }
        // What the state file must say anew, should this sync fail before it is written.
        self.unwritten_services.extend(changed.iter().cloned());
        self.unwritten_frontends.extend(touched.iter().copied());
        // The Service ignored is named with its file, where it has one.
        problems.extend(self.desired.conflicts().iter().map(|conflict| {
            match self.store.service_file(&conflict.ignored) {
                Some(file) => format!("{file}: {conflict}"),
                None => conflict.to_string(),
            }
        }));
        let modelled = modelling.elapsed();
        if self.read_back
            && let Err(e) = self.reload()
        {
            self.report(problems);
            return Err(SyncError::ReadBack(Box::new(e)));
        }
        let (scope, plan::Plan { ops, refused, peak }) = plan_sync(
            &self.programmed,
            &self.desired,
            touched,
            self.full,
            &mut self.refused,
            &self.ceiling,
        );
        let desired = &self.desired;
        let before = std::mem::take(&mut self.refused);
        let mut still_refused = before.clone();
        // A look-up per frontend in scope, only while some Service is refused.
        if !still_refused.is_empty() {
            for frontend in &scope {
                if let Some(target) = desired.target(frontend) {
                    still_refused.remove(&target.service);
                }
            }
        }
        for refusal in refused {
            // Logged and counted once when it starts, not at every sync it lasts.
            if before.get(refusal.owner) != Some(&refusal.error) {
                tracing::error!(
                    "Service {} refused: {}; what the maps held for it stays",
                    refusal.owner,
                    refusal.error
                );
                self.metrics.error(ErrorKind::Capacity);
            }
            still_refused.insert(refusal.owner.clone(), refusal.error);
        }
        for service in before.keys().filter(|s| !still_refused.contains_key(*s)) {
            tracing::info!("Service {service} is no longer refused");
        }
        self.refused = still_refused;
        self.metrics
            .refused
            .set(i64::try_from(self.refused.len()).unwrap_or(i64::MAX));
        self.report(problems);
        let planned = started.elapsed();

        let capacity = self
            .datapath
            .maps
            .capacity()
            .map_err(|e| SyncError::Write(Box::new(e)))?;
        if capacity.overflow(&peak).is_some() {
            let to = capacity.grown_for(&peak, &self.ceiling);
            let grow_started = Instant::now();
            self.datapath
                .grow(to, &self.programmed)
                .map_err(|source| SyncError::Grow {
                    to,
                    source: Box::new(source),
                })?;
            tracing::info!(
                from = %capacity,
                to = %to,
                elapsed_ms = grow_started.elapsed().as_millis(),
                "maps grown; the programs use the new ones"
            );
        }
        let writing = Instant::now();
        if let Err(e) = self.datapath.maps.apply(&ops, &self.programmed.backends) {
            self.read_back = true;
            return Err(SyncError::Write(Box::new(e)));
        }
        // After a restart (a full plan), backends may have left while no agent ran.
        let may_strand = (self.full && self.stale_sockets.enabled)
            || ops.iter().any(|op| self.stale_sockets.may_strand(op));
        let written = writing.elapsed();
        self.programmed.apply(&ops);
        if self.full {
            // After a restart the maps may hold it all already: nothing is written, and
            // every address is looked at.
            self.addresses_written
                .extend(self.programmed.frontends.keys().map(|f| f.address));
        }
        self.addresses_written
            .extend(ops.iter().filter_map(|op| match op {
                plan::MapOp::PutMaster(frontend, _) => Some(frontend.address),
                plan::MapOp::PutBackend(_, backend) => Some(backend.address),
                _ => None,
            }));
        let masters_changed = ops.iter().filter_map(|op| match op {
            plan::MapOp::PutMaster(frontend, _) | plan::MapOp::DeleteMaster(frontend) => {
                Some(frontend.address)
            }
            _ => None,
        });
        if let Err(e) =
            self.datapath
                .maps
                .update_cluster_ips(&self.programmed, masters_changed, self.full)
        {
            self.read_back = true;
            return Err(SyncError::Write(Box::new(e)));
        }
        tracing::debug!(
            ?refreshed,
            ?modelled,
            since_start_to_planned = ?planned,
            ?written,
            cluster_ips_and_programmed = ?writing.elapsed() - written,
            "sync phases"
        );
        self.full = false;
        if let Err(e) = self.datapath.complete_takeover() {
            // Both layouts' programs stay attached, which translates as either alone would.
            tracing::error!("{e}; taking over from the previous layout again at the next sync");
        }
        self.publish_dns();
        self.record(started, changed_at, changed.len(), ops.len());
        if may_strand {
            self.terminate_stale_sockets();
        }
        // The state file is told once the sync is reported: the maps, not the CLI's view
        // of them, are what readiness waits for.
        self.unwritten_frontends.extend(scope);
        Ok(())
    }

    /// Tells the DNS zone the records of the Services changed since it was last told, in
    /// the sync that wrote their frontends: a name resolves to what the maps serve.
    fn publish_dns(&mut self) {
        let Some(zone) = &self.dns_zone else {
            return;
        };
        // Computed before the zone is locked, so that queries wait only for the swap.
        let records: Vec<_> =
            self.dns_pending
                .drain()
                .map(|id| {
                    let records = self.store.service(&id).and_then(|(service, slices)| {
                        crate::dns::ServiceRecords::of(service, &slices)
                    });
                    (id, records)
                })
                .collect();
        let mut zone = zone
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, records) in records {
            zone.update(&id, records);
        }
    }

    /// Warns (once, while it lasts) about a clusterIP that is also an endpoint's address:
    /// connects to that endpoint's address are then the Service's (translated, or refused
    /// on other ports), which the API server does not prevent. Other kinds are left out:
    /// a NodePort's or a load balancer's node address is a hostNetwork pod's by design.
    fn warn_shared_addresses(&mut self) {
        use crate::model::FrontendKind;
        let mut addresses = std::mem::take(&mut self.addresses_written);
        // Those warned about are looked at again: they may have stopped sharing.
        addresses.extend(std::mem::take(&mut self.shared_addresses));
        addresses.sort_unstable();
        addresses.dedup();
        for address in addresses {
            if !self.programmed.is_backend_address(address) {
                continue;
            }
            let service = self
                .programmed
                .frontends_on(address)
                .filter_map(|(frontend, _)| self.desired.target(frontend))
                .find(|target| target.kind == FrontendKind::ClusterIP)
                .map(|target| target.service.clone());
            let Some(service) = service else { continue };
            if !self.shared_addresses.contains(&address) {
                tracing::warn!(
                    "Service {service}: its address {address} is also an endpoint's address; connects to that endpoint are the Service's (translated, or refused on other ports)"
                );
            }
            self.shared_addresses.insert(address);
        }
    }

    /// Destroys the connected sockets lb sent to a backend that is no longer their
    /// frontend's, so that their applications see an error at once and reconnect. A failure
    /// is logged: the maps are right, and those sockets wait for their own timeouts.
    fn terminate_stale_sockets(&self) {
        let lasting = "they keep sending there until their own timeouts";
        let storage = match self.datapath.socket_storage() {
            Ok(storage) => storage,
            Err(e) => {
                tracing::error!("terminating sockets on backends that left: {e}; {lasting}");
                return;
            }
        };
        match crate::sockets::terminate_stale(
            &self.stale_sockets.cgroup,
            std::os::fd::AsFd::as_fd(&storage),
            &self.programmed,
            self.stale_sockets.tcp,
        ) {
            Ok(terminated) => {
                for (protocol, count) in [("udp", terminated.udp), ("tcp", terminated.tcp)] {
                    if count > 0 {
                        self.metrics
                            .sockets_terminated
                            .get_or_create(&metrics::ProtocolLabels { protocol })
                            .inc_by(count);
                        tracing::info!(
                            protocol,
                            count,
                            "terminated connected sockets whose backend left their Service"
                        );
                    }
                }
            }
            Err(e) => {
                tracing::error!("terminating sockets on backends that left: {e}; {lasting}");
            }
        }
    }

    /// After a restart every claim arrives at once: a frontend two Services claim stays with
    /// the one the previous agent's state file says it served. Read only when the first
    /// sync finds a frontend claimed twice.
    fn prefer_incumbents(&mut self, state_dir: &std::path::Path) -> BTreeSet<Frontend> {
        let served = match state::State::read(state_dir) {
            Ok(Some(state)) => state.frontends,
            Ok(None) => return BTreeSet::new(),
            Err(e) => {
                tracing::warn!("{e}; frontends claimed twice go to the oldest claimant");
                return BTreeSet::new();
            }
        };
        let served: crate::hash::Map<Frontend, ObjectRef> = served
            .into_iter()
            .filter_map(|names| {
                let (namespace, name) = names.service.split_once('/')?;
                Some((names.frontend, ObjectRef::new(namespace, name)))
            })
            .collect();
        self.desired
            .prefer_incumbents(|frontend| served.get(frontend).cloned())
    }

    /// Tells the state file writer what the syncs since it was last told changed.
    fn write_state(&mut self) {
        let services = std::mem::take(&mut self.unwritten_services);
        let frontends = std::mem::take(&mut self.unwritten_frontends);
        self.state.write(state::Delta::of(
            &self.desired,
            &services,
            &frontends,
            self.refused
                .iter()
                .map(|(service, error)| (service.clone(), error.to_string()))
                .collect(),
        ));
    }

    /// NodePort frontends follow the node's addresses: the Services with a NodePort are
    /// recomputed at the next sync.
    fn node_ips_changed(&mut self, ips: Vec<std::net::IpAddr>) {
        tracing::info!(was = ?self.node.ips, now = ?ips, "node addresses changed");
        self.node.ips = ips;
        self.store.node_addresses_changed();
    }

    /// Takes what the maps hold as the starting point of a full plan, after removing the
    /// entries an interrupted plan left behind: slots no master count points at, which the
    /// plan may write again.
    fn reload(&mut self) -> Result<(), datapath::DatapathError> {
        let snapshot = self.datapath.maps.read()?;
        for key in snapshot.orphans {
            self.datapath.maps.remove_service(&key)?;
        }
        self.programmed = snapshot.programmed;
        self.read_back = false;
        self.full = true;
        Ok(())
    }

    fn report(&mut self, problems: Vec<String>) {
        let current: BTreeSet<String> = problems.into_iter().collect();
        for problem in current.difference(&self.reported) {
            tracing::error!("{problem}");
            self.metrics.error(ErrorKind::InvalidObject);
        }
        self.reported = current;
    }

    fn record(
        &self,
        started: Instant,
        changed_at: Option<Instant>,
        changed_services: usize,
        writes: usize,
    ) {
        let elapsed = started.elapsed();
        let (services, slices) = self.store.counts();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.services.set(gauge(services));
        self.metrics
            .frontends
            .set(gauge(self.programmed.frontends.len()));
        self.metrics
            .backends
            .set(gauge(self.programmed.backends.len()));
        let usage = self.programmed.usage();
        for (map, entries) in [
            (lb_common::SERVICE_MAP, usage.services),
            (lb_common::BACKEND_MAP, usage.backends),
            (lb_common::AFFINITY_MATCH_MAP, usage.affinity_matches),
            (
                lb_common::CLUSTER_IP_MAP,
                u32::try_from(self.datapath.maps.cluster_ip_count()).unwrap_or(u32::MAX),
            ),
        ] {
            self.metrics
                .set_map_entries(map, usize::try_from(entries).unwrap_or(usize::MAX));
        }
        self.metrics.syncs.inc();
        self.metrics.sync_duration.observe(elapsed.as_secs_f64());
        if let Some(changed_at) = changed_at {
            self.metrics
                .event_to_map
                .observe(changed_at.elapsed().as_secs_f64());
        }
        tracing::info!(
            services,
            endpoint_slices = slices,
            changed_services,
            frontends = self.programmed.frontends.len(),
            backends = self.programmed.backends.len(),
            map_writes = writes,
            elapsed_us = elapsed.as_micros(),
            "synced"
        );
    }
}
