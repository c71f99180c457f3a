//! `lb affinity`: the session-affinity entries — which client (network namespace) sticks to
//! which backend of which frontend, since when, and whether the entry still holds.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{AffinityMatchKey, affinity_holds};
use serde::Serialize;

use super::{CliError, Format, Pins, emit, open, state, table};
use crate::maps;

#[derive(Debug, clap::Args)]
pub struct AffinityArgs {
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub pins: Pins,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct AffinityRow {
    /// The client: its network namespace cookie.
    pub client_netns_cookie: u64,
    pub frontend_id: u32,
    /// `ip:port/PROTO`; `null` if the frontend is gone.
    pub frontend: Option<String>,
    pub service: Option<String>,
    pub backend_id: u32,
    pub backend_address: Option<IpAddr>,
    pub backend_port: Option<u16>,
    /// Seconds since the client last connected through the entry.
    pub age_s: f64,
    pub timeout_s: u32,
    /// Whether the next connect would use the entry: within the timeout and the backend
    /// still a backend of the frontend (the same test the programs make).
    pub live: bool,
}

pub fn run(args: AffinityArgs) -> Result<(), CliError> {
    let maps = open(&args.pins)?;
    let state = state(&args.pins)?;
    let programmed = maps.read()?.programmed;
    let by_id: BTreeMap<u32, _> = programmed
        .frontends
        .iter()
        .map(|(frontend, p)| (p.id, (frontend, p)))
        .collect();
    let now_ns = monotonic_ns();
    let mut rows: Vec<AffinityRow> = maps::affinity_entries(&args.pins.bpffs)?
        .into_iter()
        .map(|(key, value)| {
            let frontend = by_id.get(&key.frontend_id);
            let timeout_s = frontend.map_or(0, |(_, p)| p.affinity_timeout_s);
            let still_a_backend = programmed.affinity_matches.contains(&AffinityMatchKey {
                backend_id: value.backend_id,
                frontend_id: key.frontend_id,
            });
            let backend = programmed.backends.get(&value.backend_id);
            let frontend_name = frontend.map(|(f, _)| f.to_string());
            AffinityRow {
                client_netns_cookie: key.netns_cookie,
                frontend_id: key.frontend_id,
                service: frontend.and_then(|(f, _)| {
                    state
                        .iter()
                        .flat_map(|s| &s.frontends)
                        .find(|n| n.frontend == **f)
                        .map(|n| n.service.clone())
                }),
                frontend: frontend_name,
                backend_id: value.backend_id,
                backend_address: backend.map(|b| b.address),
                backend_port: backend.map(|b| b.port),
                age_s: now_ns.saturating_sub(value.last_used_ns) as f64 / 1e9,
                timeout_s,
                live: affinity_holds(value.last_used_ns, now_ns, timeout_s) && still_a_backend,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.frontend_id, a.client_netns_cookie).cmp(&(b.frontend_id, b.client_netns_cookie))
    });
    emit(args.format.output, &rows, |wide| {
        let mut table = if wide {
            table([
                "CLIENT NETNS",
                "SERVICE",
                "FRONTEND",
                "BACKEND",
                "AGE",
                "TIMEOUT",
                "LIVE",
                "FRONTEND ID",
                "BACKEND ID",
            ])
        } else {
            table([
                "CLIENT NETNS",
                "SERVICE",
                "FRONTEND",
                "BACKEND",
                "AGE",
                "LIVE",
            ])
        };
        for row in &rows {
            let backend = match (row.backend_address, row.backend_port) {
                (Some(address), Some(port)) => format!("{address}:{port}"),
                _ => format!("#{} (gone)", row.backend_id),
            };
            let mut cells = vec![
                row.client_netns_cookie.to_string(),
                row.service.clone().unwrap_or_else(|| "?".into()),
                row.frontend.clone().unwrap_or_else(|| "(gone)".into()),
                backend,
                format!("{:.1}s", row.age_s),
            ];
            if wide {
                cells.push(format!("{}s", row.timeout_s));
            }
            cells.push(if row.live { "yes" } else { "no" }.into());
            if wide {
                cells.push(row.frontend_id.to_string());
                cells.push(row.backend_id.to_string());
            }
            table.add_row(cells);
        }
        table.to_string()
    })
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or_default() * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or_default()
    })
}
