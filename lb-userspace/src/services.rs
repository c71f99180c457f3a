//! `lb services`: what the pinned maps translate, read straight from the kernel, so it works
//! whether or not the agent runs.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use comfy_table::{Table, presets::NOTHING};
use lb_common::{FLAG_HOST_NETNS_ONLY, FLAG_NODE_LOCAL};
use serde::Serialize;

use crate::{
    OutputFormat,
    datapath::ServiceMaps,
    model::{BackendAddr, Protocol},
    state::State,
};

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// bpffs directory the agent pinned its maps in.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory of the agent's state file (Service names).
    #[arg(long, value_name = "PATH", default_value = crate::state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// bpffs directory the agent pinned its maps in.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// One frontend, or one Service that has none, as printed; field names are stable for scripts.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// `namespace/name`; `null` when the agent's state file is missing.
    pub service: Option<String>,
    pub port_name: Option<String>,
    /// ClusterIP, NodePort, LoadBalancer, ExternalIP — or Headless, ExternalName.
    pub kind: Option<String>,
    /// The frontend; `null` for a Service that is not in the datapath.
    pub address: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
    pub backends: Vec<BackendAddr>,
    /// Session affinity timeout in seconds; 0 for none.
    pub affinity_timeout_s: u32,
    /// Only node-local endpoints (`internalTrafficPolicy: Local`).
    pub node_local: bool,
    /// Only for the node's own sockets (NodePort on 127.0.0.1).
    pub host_netns_only: bool,
    pub in_datapath: bool,
    /// Why a Service is not in the datapath.
    pub why: Option<String>,
}

pub fn entries(maps: &ServiceMaps, state: Option<&State>) -> anyhow::Result<Vec<ServiceEntry>> {
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
            ServiceEntry {
                service: names.map(|n| n.service.clone()),
                port_name: names.map(|n| n.port_name.clone()),
                kind: names.map(|n| n.kind.to_string()),
                address: Some(frontend.address),
                port: Some(frontend.port),
                protocol: Some(frontend.protocol),
                backends: programmed.backends_of(frontend),
                affinity_timeout_s: programmed_frontend.affinity_timeout_s,
                node_local: programmed_frontend.flags & FLAG_NODE_LOCAL != 0,
                host_netns_only: programmed_frontend.flags & FLAG_HOST_NETNS_ONLY != 0,
                in_datapath: true,
                why: None,
            }
        })
        .collect();
    for unserved in state.iter().flat_map(|s| &s.not_in_datapath) {
        let kind = unserved.why.split(':').next().unwrap_or_default();
        entries.push(ServiceEntry {
            service: Some(unserved.service.clone()),
            port_name: None,
            kind: Some(if kind == "headless" {
                "Headless".into()
            } else {
                kind.to_owned()
            }),
            address: None,
            port: None,
            protocol: None,
            backends: Vec::new(),
            affinity_timeout_s: 0,
            node_local: false,
            host_netns_only: false,
            in_datapath: false,
            why: Some(unserved.why.clone()),
        });
    }
    entries.sort_by(|a, b| {
        (&a.service, a.address, a.port, a.protocol)
            .cmp(&(&b.service, b.address, b.port, b.protocol))
    });
    Ok(entries)
}

pub fn run(args: ServicesArgs) -> anyhow::Result<()> {
    let maps = ServiceMaps::open_pinned(&args.bpffs)?;
    let state = State::read(&args.state_dir)?;
    let entries = entries(&maps, state.as_ref())?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        OutputFormat::Table => println!("{}", table(&entries)),
    }
    Ok(())
}

/// `lb stats`: the datapath's per-reason counters.
pub fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let maps = ServiceMaps::open_pinned(&args.bpffs)?;
    let counters = maps.stats()?;
    match args.output {
        OutputFormat::Json => {
            let object: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(reason, value)| (reason.name().to_owned(), (*value).into()))
                .collect();
            println!("{}", serde_json::to_string_pretty(&object)?);
        }
        OutputFormat::Table => {
            let mut table = Table::new();
            table.load_preset(NOTHING).set_header(["REASON", "COUNT"]);
            for (reason, value) in counters {
                table.add_row([reason.name().to_owned(), value.to_string()]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

fn table(entries: &[ServiceEntry]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_header(["SERVICE", "KIND", "FRONTEND", "BACKENDS", "NOTES"]);
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
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut notes = Vec::new();
        if entry.affinity_timeout_s != 0 {
            notes.push(format!("affinity {}s", entry.affinity_timeout_s));
        }
        if entry.node_local {
            notes.push("node-local".to_owned());
        }
        if entry.host_netns_only {
            notes.push("node's own sockets only".to_owned());
        }
        if let Some(why) = &entry.why {
            notes.push(why.clone());
        }
        let service = match (&entry.service, &entry.port_name) {
            (Some(service), Some(port)) if !port.is_empty() => format!("{service}:{port}"),
            (Some(service), _) => service.clone(),
            (None, _) => "?".to_owned(),
        };
        table.add_row([
            service,
            entry.kind.clone().unwrap_or_else(|| "?".into()),
            frontend,
            backends,
            notes.join(", "),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ServiceEntry {
        ServiceEntry {
            service: Some("default/httpenv".into()),
            port_name: Some(String::new()),
            kind: Some("ClusterIP".into()),
            address: Some(Ipv4Addr::new(10, 96, 0, 10)),
            port: Some(8888),
            protocol: Some(Protocol::Tcp),
            backends: vec![
                BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, 11),
                    port: 8888,
                },
                BackendAddr {
                    address: Ipv4Addr::new(10, 244, 0, 12),
                    port: 8888,
                },
            ],
            affinity_timeout_s: 0,
            node_local: false,
            host_netns_only: false,
            in_datapath: true,
            why: None,
        }
    }

    fn headless() -> ServiceEntry {
        ServiceEntry {
            service: Some("default/db".into()),
            port_name: None,
            kind: Some("Headless".into()),
            address: None,
            port: None,
            protocol: None,
            backends: vec![],
            affinity_timeout_s: 0,
            node_local: false,
            host_netns_only: false,
            in_datapath: false,
            why: Some("headless: DNS answers with the pod IPs".into()),
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let json = serde_json::to_value([entry(), headless()]).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "service": "default/httpenv", "port_name": "", "kind": "ClusterIP",
                "address": "10.96.0.10", "port": 8888, "protocol": "TCP",
                "backends": [
                    {"address": "10.244.0.11", "port": 8888},
                    {"address": "10.244.0.12", "port": 8888},
                ],
                "affinity_timeout_s": 0, "node_local": false, "host_netns_only": false,
                "in_datapath": true, "why": null,
            }, {
                "service": "default/db", "port_name": null, "kind": "Headless",
                "address": null, "port": null, "protocol": null, "backends": [],
                "affinity_timeout_s": 0, "node_local": false, "host_netns_only": false,
                "in_datapath": false, "why": "headless: DNS answers with the pod IPs",
            }])
        );
    }

    #[test]
    fn table_lists_every_backend_and_why_a_service_has_none() {
        let text = table(&[entry(), headless()]).to_string();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["SERVICE", "KIND", "FRONTEND", "BACKENDS", "NOTES"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "default/httpenv",
                "ClusterIP",
                "10.96.0.10:8888/TCP",
                "10.244.0.11:8888"
            ]
        );
        assert_eq!(lines[2], "10.244.0.12:8888", "{text}");
        assert!(
            lines[3].starts_with("default/db")
                && lines[3].ends_with("headless: DNS answers with the pod IPs"),
            "{text}"
        );
    }
}
