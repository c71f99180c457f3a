//! Prometheus metrics and health endpoints: `/metrics`, `/healthz`, `/readyz` (ready once
//! the sources are synced and the maps written).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::datapath;

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
    pub syncs: Counter,
    pub sync_duration: Histogram,
    pub event_to_map: Histogram,
    pub errors: Family<ErrorLabels, Counter>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    ready: AtomicBool,
    bpffs: PathBuf,
}

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
        let syncs = Counter::default();
        let sync_duration = Histogram::new(latency_buckets());
        let event_to_map = Histogram::new(latency_buckets());
        let errors = Family::default();
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
            syncs,
            sync_duration,
            event_to_map,
            errors,
            map_entries,
            map_capacity,
            ready: AtomicBool::new(false),
            bpffs,
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The exposition text; map occupancy is read from the maps at scrape time.
    fn render(&self) -> Result<String, std::fmt::Error> {
        match datapath::occupancy(&self.bpffs) {
            Ok(maps) => {
                for map in maps {
                    let labels = MapLabels {
                        map: map.map.to_owned(),
                    };
                    self.map_entries
                        .get_or_create(&labels)
                        .set(i64::try_from(map.entries).unwrap_or(i64::MAX));
                    self.map_capacity
                        .get_or_create(&labels)
                        .set(i64::from(map.max_entries));
                }
            }
            Err(e) => tracing::warn!("reading map occupancy: {e}"),
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
                if metrics.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
                }
            }),
        )
        .with_state(metrics);
    tracing::info!(addr = ?listener.local_addr(), "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).await
}
