//! `lb services [NAMESPACE/NAME]`: every frontend the datapath translates — its Service,
//! kind, backends and their states, affinity and traffic policy — and the Services that are
//! not in the datapath, with why. Frontends and backends come from the maps, names and
//! endpoint states from the agent's state file.

use std::{collections::BTreeMap, net::IpAddr};

use comfy_table::Table;
use lb_common::{FLAG_HOST_NETNS_ONLY, FLAG_NODE_LOCAL};
use serde::Serialize;

use super::{CliError, Format, Pins, emit, open, state, table};
use crate::{
    maps::ServiceMaps,
    model::{EndpointState, Protocol},
    state::State,
};

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// Only this Service.
    #[arg(value_name = "NAMESPACE/NAME")]
    pub service: Option<String>,
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub pins: Pins,
}

/// One backend of a frontend; the states are `null` when the state file does not know it.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct BackendEntry {
    pub address: IpAddr,
    pub port: u16,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

/// One frontend, or one Service that has none; field names are stable for scripts.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// `namespace/name`; `null` when the agent's state file is missing.
    pub service: Option<String>,
    pub port_name: Option<String>,
    /// ClusterIP, NodePort, LoadBalancer, ExternalIP — or Headless, ExternalName.
    pub kind: Option<String>,
    /// The frontend; `null` for a Service that is not in the datapath.
    pub address: Option<IpAddr>,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
    /// The backends a connect can reach, in slot order.
    pub backends: Vec<BackendEntry>,
    /// Endpoints of the Service port that are not backends, and why.
    pub excluded: Vec<EndpointState>,
    /// Session affinity timeout in seconds; 0 for none.
    pub affinity_timeout_s: u32,
    /// `Local` when only this node's endpoints are used (`internalTrafficPolicy: Local`).
    pub traffic_policy: Option<String>,
    /// Only for the node's own sockets (NodePort on 127.0.0.1).
    pub host_netns_only: bool,
    pub in_datapath: bool,
    /// Why a Service is not in the datapath.
    pub why: Option<String>,
}

impl ServiceEntry {
    /// A Service with no frontend in the maps, of `kind`, and why.
    fn not_in_datapath(service: &str, kind: &str, why: String) -> Self {
        Self {
            service: Some(service.to_owned()),
            port_name: None,
            kind: Some(kind.to_owned()),
            address: None,
            port: None,
            protocol: None,
            backends: Vec::new(),
            excluded: Vec::new(),
            affinity_timeout_s: 0,
            traffic_policy: None,
            host_netns_only: false,
            in_datapath: false,
            why: Some(why),
        }
    }
}

pub fn entries(maps: &ServiceMaps, state: Option<&State>) -> Result<Vec<ServiceEntry>, CliError> {
    let programmed = maps.read()?.programmed;
    let names: BTreeMap<_, _> = state
        .iter()
        .flat_map(|s| &s.frontends)
        .map(|n| (n.frontend, n))
        .collect();
    let mut entries: Vec<ServiceEntry> = programmed
        .frontends
        .iter()
        .map(|(frontend, programmed_frontend)| {
            let names = names.get(frontend);
            let endpoint = |address, port| {
                names
                    .into_iter()
                    .flat_map(|n| &n.endpoints)
                    .find(|e| e.address == address && e.port == port)
            };
            let backends = programmed
                .backends_of(frontend)
                .into_iter()
                .map(|b| {
                    let state = endpoint(b.address, b.port);
                    BackendEntry {
                        address: b.address,
                        port: b.port,
                        ready: state.map(|e| e.ready),
                        serving: state.map(|e| e.serving),
                        terminating: state.map(|e| e.terminating),
                    }
                })
                .collect();
            ServiceEntry {
                service: names.map(|n| n.service.clone()),
                port_name: names.map(|n| n.port_name.clone()),
                kind: names.map(|n| n.kind.to_string()),
                address: Some(frontend.address),
                port: Some(frontend.port),
                protocol: Some(frontend.protocol),
                backends,
                excluded: names
                    .into_iter()
                    .flat_map(|n| &n.endpoints)
                    .filter(|e| e.excluded.is_some())
                    .cloned()
                    .collect(),
                affinity_timeout_s: programmed_frontend.affinity_timeout_s,
                traffic_policy: Some(
                    if programmed_frontend.flags & FLAG_NODE_LOCAL != 0 {
                        "Local"
                    } else {
                        "Cluster"
                    }
                    .into(),
                ),
                host_netns_only: programmed_frontend.flags & FLAG_HOST_NETNS_ONLY != 0,
                in_datapath: true,
                why: None,
            }
        })
        .collect();
    for unserved in state.iter().flat_map(|s| &s.not_in_datapath) {
        let kind = match unserved.why.split(':').next() {
            Some("headless") => "Headless",
            Some(other) => other,
            None => "",
        };
        entries.push(ServiceEntry::not_in_datapath(
            &unserved.service,
            kind,
            unserved.why.clone(),
        ));
    }
    // Refused Services: a note on the frontends the maps still hold for them, or an entry
    // of their own when the maps hold none.
    for refused in state.iter().flat_map(|s| &s.refused) {
        let why = format!("refused: {}", refused.why);
        let mut held = false;
        for entry in entries
            .iter_mut()
            .filter(|e| e.service.as_deref() == Some(refused.service.as_str()))
        {
            entry.why = Some(format!("{why}; these are the last backends written"));
            held = true;
        }
        if !held {
            entries.push(ServiceEntry::not_in_datapath(
                &refused.service,
                "Refused",
                why,
            ));
        }
    }
    // Claims ignored: an entry of their own, on the frontend another Service has.
    for claim in state.iter().flat_map(|s| &s.ignored_claims) {
        let mut entry = ServiceEntry::not_in_datapath(
            &claim.service,
            "Ignored",
            format!(
                "claims {}, which Service {} has (a clusterIP wins, then the first claimant)",
                claim.frontend, claim.kept_by
            ),
        );
        entry.address = Some(claim.frontend.address);
        entry.port = Some(claim.frontend.port);
        entry.protocol = Some(claim.frontend.protocol);
        entries.push(entry);
    }
    entries.sort_by(|a, b| {
        (&a.service, a.address, a.port, a.protocol)
            .cmp(&(&b.service, b.address, b.port, b.protocol))
    });
    Ok(entries)
}

pub fn run(args: ServicesArgs) -> Result<(), CliError> {
    let maps = open(&args.pins)?;
    let state = state(&args.pins)?;
    let mut entries = entries(&maps, state.as_ref())?;
    if let Some(wanted) = &args.service {
        entries.retain(|e| e.service.as_deref() == Some(wanted.as_str()));
        if entries.is_empty() {
            return Err(CliError::NoService {
                service: wanted.clone(),
                state_dir: args.pins.state_dir.clone(),
            });
        }
    }
    emit(args.format.output, &entries, |wide| {
        render(&entries, wide).to_string()
    })
}

fn states(backend: &BackendEntry) -> String {
    match (backend.ready, backend.serving, backend.terminating) {
        (Some(ready), Some(serving), Some(terminating)) => {
            let mut states = Vec::new();
            if ready {
                states.push("ready");
            }
            if serving {
                states.push("serving");
            }
            if terminating {
                states.push("terminating");
            }
            states.join(",")
        }
        _ => "?".into(),
    }
}

pub fn render(entries: &[ServiceEntry], wide: bool) -> Table {
    let mut table = if wide {
        table([
            "SERVICE", "KIND", "FRONTEND", "BACKENDS", "STATE", "AFFINITY", "POLICY", "NOTES",
        ])
    } else {
        table(["SERVICE", "KIND", "FRONTEND", "BACKENDS", "NOTES"])
    };
    for entry in entries {
        let frontend = match (entry.address, entry.port, entry.protocol) {
            (Some(address), Some(port), Some(protocol)) => format!("{address}:{port}/{protocol}"),
            _ => "-".to_owned(),
        };
        let backends = if !entry.in_datapath {
            "-".to_owned()
        } else if entry.backends.is_empty() {
            "<none>".to_owned()
        } else {
            entry
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.address, b.port))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut notes = Vec::new();
        if !wide && entry.affinity_timeout_s != 0 {
            notes.push(format!("affinity {}s", entry.affinity_timeout_s));
        }
        if !wide && entry.traffic_policy.as_deref() == Some("Local") {
            notes.push("node-local".to_owned());
        }
        if entry.host_netns_only {
            notes.push("node's own sockets only".to_owned());
        }
        if let Some(why) = &entry.why {
            notes.push(why.clone());
        }
        if wide {
            for excluded in &entry.excluded {
                notes.push(format!(
                    "{}:{} excluded: {}",
                    excluded.address,
                    excluded.port,
                    excluded.excluded.as_deref().unwrap_or_default()
                ));
            }
        }
        let service = match (&entry.service, &entry.port_name) {
            (Some(service), Some(port)) if !port.is_empty() => format!("{service}:{port}"),
            (Some(service), _) => service.clone(),
            (None, _) => "?".to_owned(),
        };
        let kind = entry.kind.clone().unwrap_or_else(|| "?".into());
        if wide {
            let states = entry
                .backends
                .iter()
                .map(states)
                .collect::<Vec<_>>()
                .join("\n");
            let affinity = if entry.affinity_timeout_s == 0 {
                "-".to_owned()
            } else {
                format!("ClientIP {}s", entry.affinity_timeout_s)
            };
            table.add_row([
                service,
                kind,
                frontend,
                backends,
                states,
                affinity,
                entry.traffic_policy.clone().unwrap_or_else(|| "-".into()),
                notes.join("\n"),
            ]);
        } else {
            table.add_row([service, kind, frontend, backends, notes.join(", ")]);
        }
    }
    table
}
