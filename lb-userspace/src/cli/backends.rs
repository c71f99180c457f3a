//! `lb backends`: every backend in the backend map, the frontends whose slots name it, and
//! its endpoint state.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use super::{CliError, Format, Pins, emit, open, state, table};

#[derive(Debug, clap::Args)]
pub struct BackendsArgs {
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub pins: Pins,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    /// Frontends (`ip:port/PROTO`) with a slot naming this backend.
    pub frontends: Vec<String>,
    /// Services behind those frontends, from the state file.
    pub services: Vec<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
}

pub fn run(args: BackendsArgs) -> Result<(), CliError> {
    let maps = open(&args.pins)?;
    let state = state(&args.pins)?;
    let programmed = maps.read()?.programmed;
    let mut frontends_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (frontend, programmed_frontend) in &programmed.frontends {
        for id in &programmed_frontend.slots {
            frontends_of
                .entry(*id)
                .or_default()
                .push(frontend.to_string());
        }
    }
    let rows: Vec<BackendRow> = programmed
        .backends
        .iter()
        .map(|(id, addr)| {
            let frontends = frontends_of.remove(id).unwrap_or_default();
            let named = state
                .iter()
                .flat_map(|s| &s.frontends)
                .filter(|n| frontends.contains(&n.frontend.to_string()));
            let mut services: Vec<String> = named.clone().map(|n| n.service.clone()).collect();
            services.sort();
            services.dedup();
            let endpoint = named
                .flat_map(|n| &n.endpoints)
                .find(|e| e.address == addr.address && e.port == addr.port);
            BackendRow {
                id: *id,
                address: addr.address,
                port: addr.port,
                frontends,
                services,
                ready: endpoint.map(|e| e.ready),
                serving: endpoint.map(|e| e.serving),
                terminating: endpoint.map(|e| e.terminating),
                node_name: endpoint.and_then(|e| e.node_name.clone()),
            }
        })
        .collect();
    emit(args.format.output, &rows, |wide| {
        let mut table = if wide {
            table([
                "ID",
                "BACKEND",
                "READY",
                "SERVING",
                "TERMINATING",
                "NODE",
                "SERVICES",
                "FRONTENDS",
            ])
        } else {
            table(["ID", "BACKEND", "READY", "SERVICES", "FRONTENDS"])
        };
        let flag = |v: Option<bool>| v.map_or("?".to_owned(), |v| v.to_string());
        for row in &rows {
            let backend = format!("{}:{}", row.address, row.port);
            let services = row.services.join("\n");
            if wide {
                table.add_row([
                    row.id.to_string(),
                    backend,
                    flag(row.ready),
                    flag(row.serving),
                    flag(row.terminating),
                    row.node_name.clone().unwrap_or_else(|| "-".into()),
                    services,
                    row.frontends.join("\n"),
                ]);
            } else {
                table.add_row([
                    row.id.to_string(),
                    backend,
                    flag(row.ready),
                    services,
                    row.frontends.len().to_string(),
                ]);
            }
        }
        table.to_string()
    })
}
