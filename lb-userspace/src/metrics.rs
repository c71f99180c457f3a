//! Prometheus metrics and health endpoints: `/metrics`, `/healthz`, `/readyz` (ready once
//! the sources are synced and the maps written).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::maps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: ErrorKind,
}

/// What went wrong, as the `kind` label of `lb_errors_total`.
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelValue,
)]
pub enum ErrorKind {
    /// An object the agent cannot use (bad port, unknown protocol, …): skipped.
    InvalidObject,
    /// The source could not be read (a manifest directory gone, …).
    Source,
    /// Planning or writing the maps failed.
    MapWrite,
    /// The state file could not be written.
    StateFile,
    /// A Service was refused: it would take a map past its upper bound.
    Capacity,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub what: &'static str,
}

/// `lb_dns_queries_total`'s label: the response code answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

pub struct Metrics {
    registry: Registry,
    pub services: Gauge,
    pub frontends: Gauge,
    pub backends: Gauge,
    /// Services refused for want of room under the maps' upper bounds.
    pub refused: Gauge,
    pub syncs: Counter,
    pub sync_duration: Histogram,
    pub event_to_map: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
    /// Connected sockets destroyed because their backend left their frontend.
    pub sockets_terminated: Family<ProtocolLabels, Counter>,
    /// Programs attached and maps pinned again after they were taken from under the agent.
    pub repairs: Family<RepairLabels, Counter>,
    /// DNS queries answered (`--dns`), by response code.
    pub dns_queries: Family<DnsLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    /// When the kernel-filled maps were last walked.
    walked_at: Mutex<Option<Instant>>,
    /// `None` when ready; otherwise why not, for the body of /readyz.
    not_ready: Mutex<Option<String>>,
    bpffs: PathBuf,
}

/// How often a scrape may walk the maps the kernel fills: a walk costs a syscall per entry,
/// and they can hold hundreds of thousands.
const WALK_EVERY: Duration = Duration::from_secs(10);

/// Buckets from 100 µs to about 52 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 20)
}

impl Metrics {
    pub fn new(bpffs: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("lb");
        let services = Gauge::default();
        let frontends = Gauge::default();
        let backends = Gauge::default();
        let refused = Gauge::default();
        let syncs = Counter::default();
        let sync_duration = Histogram::new(latency_buckets());
        let event_to_map = Histogram::new(latency_buckets());
        let errors = Family::default();
        let sockets_terminated = Family::default();
        let repairs = Family::default();
        let dns_queries = Family::default();
        let map_entries = Family::default();
        let map_capacity = Family::default();
        registry.register(
            "services",
            "Services in the agent's model",
            services.clone(),
        );
        registry.register(
            "frontends",
            "Frontends programmed in the service map",
            frontends.clone(),
        );
        registry.register(
            "backends",
            "Backends programmed in the backend map",
            backends.clone(),
        );
        registry.register(
            "services_refused",
            "Services refused because a map would pass its upper bound",
            refused.clone(),
        );
        registry.register("syncs", "Syncs of the maps with the sources", syncs.clone());
        registry.register(
            "sync_duration_seconds",
            "Time to read the sources, plan and write the maps",
            sync_duration.clone(),
        );
        registry.register(
            "event_to_map_seconds",
            "Time from the first change of a batch to the maps being written",
            event_to_map.clone(),
        );
        registry.register("errors", "Errors by kind", errors.clone());
        registry.register(
            "dns_queries",
            "DNS queries answered (--dns), by response code",
            dns_queries.clone(),
        );
        registry.register(
            "datapath_repairs",
            "Programs attached again (what = program) and maps pinned again (what = map_pin) after their pins were removed",
            repairs.clone(),
        );
        registry.register(
            "sockets_terminated",
            "Connected sockets lb translated, destroyed when their backend left the frontend",
            sockets_terminated.clone(),
        );
        registry.register("map_entries", "Entries in use per map", map_entries.clone());
        registry.register(
            "map_capacity",
            "Maximum entries per map",
            map_capacity.clone(),
        );
        Self {
            registry,
            services,
            frontends,
            backends,
            refused,
            syncs,
            sync_duration,
            event_to_map,
            errors,
            sockets_terminated,
            repairs,
            dns_queries,
            map_entries,
            map_capacity,
            walked_at: Mutex::new(None),
            not_ready: Mutex::new(Some("not synced yet".to_owned())),
            bpffs,
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    /// Ready (`None`), or not and why: the maps do not hold what the source says.
    pub fn set_readiness(&self, not_ready: Option<String>) {
        *self
            .not_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = not_ready;
    }

    /// Entries of a map the agent writes, as it knows them after a sync (counting them in
    /// the map would walk it).
    pub fn set_map_entries(&self, map: &str, entries: usize) {
        self.map_entries
            .get_or_create(&MapLabels { map: map.into() })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// The exposition text. Capacities are read at scrape time; the maps the kernel fills
    /// are counted by a walk at most every [`WALK_EVERY`].
    fn render(&self) -> Result<String, std::fmt::Error> {
        for map in maps::MAPS {
            match maps::map_capacity(&self.bpffs, map) {
                Ok(capacity) => {
                    self.map_capacity
                        .get_or_create(&MapLabels { map: map.into() })
                        .set(i64::from(capacity));
                    // Arrays are always full.
                    if [lb_common::CONFIG_MAP, lb_common::STATS_MAP].contains(&map) {
                        self.set_map_entries(map, usize::try_from(capacity).unwrap_or(usize::MAX));
                    }
                }
                Err(e) => tracing::warn!("reading map capacity: {e}"),
            }
        }
        let walk = {
            let mut walked_at = self
                .walked_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = walked_at.is_none_or(|at| at.elapsed() >= WALK_EVERY);
            if due {
                *walked_at = Some(Instant::now());
            }
            due
        };
        if walk {
            for map in maps::KERNEL_FILLED_MAPS {
                match maps::map_occupancy(&self.bpffs, map) {
                    Ok(occupancy) => self.set_map_entries(
                        map,
                        usize::try_from(occupancy.entries).unwrap_or(usize::MAX),
                    ),
                    Err(e) => tracing::warn!("reading map occupancy: {e}"),
                }
            }
        }
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Serves the endpoints on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(metrics): State<Arc<Metrics>>| async move {
                match metrics.render() {
                    Ok(text) => (StatusCode::OK, text),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(metrics): State<Arc<Metrics>>| async move {
                let not_ready = metrics
                    .not_ready
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                match not_ready {
                    None => (StatusCode::OK, "ready\n".to_owned()),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .with_state(metrics);
    tracing::info!(addr = ?listener.local_addr(), "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await
}
