//! `lb status`: is the agent running, when did it last sync, which programs are attached
//! where, how full is each map, and what this kernel offers lb.

use std::path::PathBuf;

use serde::Serialize;

use super::{CliError, Format, Pins, emit, open, state, table};
use crate::{
    maps::{self as datapath, Occupancy, links, mounts},
    state::running_agent,
};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub format: Format,
    #[command(flatten)]
    pub pins: Pins,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub agent_running: bool,
    pub agent_pid: Option<u32>,
    /// Last sync, in ms since the epoch; `null` if no agent wrote a state file.
    pub last_sync_ms: Option<u64>,
    pub last_sync_ago_s: Option<f64>,
    pub node: Option<String>,
    /// The map layout this lb reads (the version suffix of its map names).
    pub layout: String,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<Occupancy>,
    /// Services the agent refused to write, and why (a map at its upper bound, …).
    pub refused: Vec<crate::state::Unserved>,
    /// What this kernel offers lb.
    pub features: Vec<crate::features::Feature>,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub program: &'static str,
    pub pin: PathBuf,
    pub attached: bool,
    pub attach_type: Option<&'static str>,
    pub cgroup: Option<PathBuf>,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    pub error: Option<String>,
}

pub fn run(args: StatusArgs) -> Result<(), CliError> {
    // Opening the maps first gives the one-line errors for root, bpffs and layout.
    open(&args.pins)?;
    let state = state(&args.pins)?;
    let agent_pid = running_agent(&args.pins.state_dir);
    let cgroup_root = mounts::mount_points("cgroup2")
        .ok()
        .and_then(|m| m.into_iter().next());
    let programs = datapath::PROGRAMS
        .iter()
        .map(|program| {
            let pin = args.pins.bpffs.join(datapath::link_pin(program));
            match links::cgroup_link(&pin) {
                Ok(link) => ProgramStatus {
                    program,
                    attached: true,
                    attach_type: Some(links::attach_type_name(link.attach_type)),
                    cgroup: cgroup_root
                        .as_deref()
                        .and_then(|root| links::cgroup_path(root, link.cgroup_id, 6)),
                    link_id: Some(link.link_id),
                    program_id: Some(link.program_id),
                    error: None,
                    pin,
                },
                Err(e) => ProgramStatus {
                    program,
                    attached: false,
                    attach_type: None,
                    cgroup: None,
                    link_id: None,
                    program_id: None,
                    error: Some(e.to_string()),
                    pin,
                },
            }
        })
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let last_sync_ms = state.as_ref().map(|s| s.synced_at_ms);
    let status = Status {
        agent_running: agent_pid.is_some(),
        agent_pid,
        last_sync_ms,
        last_sync_ago_s: last_sync_ms.map(|ms| now_ms.saturating_sub(u128::from(ms)) as f64 / 1e3),
        node: state.as_ref().map(|s| s.node.clone()),
        layout: lb_common::SERVICE_MAP
            .rsplit('_')
            .next()
            .unwrap_or_default()
            .to_owned(),
        programs,
        maps: datapath::occupancy(&args.pins.bpffs)?,
        refused: state
            .as_ref()
            .map(|s| s.refused.clone())
            .unwrap_or_default(),
        features: crate::features::probe(),
    };
    emit(args.format.output, &status, |wide| {
        let mut summary = table(["AGENT", "LAST SYNC", "NODE", "LAYOUT"]);
        summary.add_row([
            match status.agent_pid {
                Some(pid) => format!("running (pid {pid})"),
                None => "stopped".into(),
            },
            status
                .last_sync_ago_s
                .map_or("never".into(), |s| format!("{s:.1}s ago")),
            status.node.clone().unwrap_or_else(|| "?".into()),
            status.layout.clone(),
        ]);
        let mut programs = if wide {
            table(["PROGRAM", "ATTACHED TO", "HOOK", "LINK", "PROG ID", "PIN"])
        } else {
            table(["PROGRAM", "ATTACHED TO", "HOOK"])
        };
        for program in &status.programs {
            let cgroup = match (&program.cgroup, &program.error) {
                (Some(cgroup), _) => cgroup.display().to_string(),
                (None, Some(error)) => format!("not attached: {error}"),
                (None, None) => "?".into(),
            };
            let mut row = vec![
                program.program.to_owned(),
                cgroup,
                program.attach_type.unwrap_or("-").to_owned(),
            ];
            if wide {
                row.push(program.link_id.map_or("-".into(), |id| id.to_string()));
                row.push(program.program_id.map_or("-".into(), |id| id.to_string()));
                row.push(program.pin.display().to_string());
            }
            programs.add_row(row);
        }
        let mut maps = table(["MAP", "ENTRIES", "MAX", "USE"]);
        for map in &status.maps {
            maps.add_row([
                map.map.to_owned(),
                map.entries.to_string(),
                map.max_entries.to_string(),
                format!(
                    "{:.1}%",
                    map.entries as f64 * 100.0 / f64::from(map.max_entries.max(1))
                ),
            ]);
        }
        let mut features = if wide {
            table(["KERNEL FEATURE", "AVAILABLE", "FOR"])
        } else {
            table(["KERNEL FEATURE", "AVAILABLE"])
        };
        for feature in &status.features {
            let available = match (feature.available, feature.required) {
                (Some(true), _) => "yes",
                (Some(false), true) => "NO (required)",
                (Some(false), false) => "no",
                (None, _) => "unknown (no kernel BTF)",
            };
            let mut row = vec![feature.name.to_owned(), available.to_owned()];
            if wide {
                row.push(feature.used_for.to_owned());
            }
            features.add_row(row);
        }
        let mut text = format!("{summary}\n\n{programs}\n\n{maps}\n\n{features}");
        if !status.refused.is_empty() {
            let mut refused = table(["REFUSED SERVICE", "WHY"]);
            for unserved in &status.refused {
                refused.add_row([unserved.service.clone(), unserved.why.clone()]);
            }
            text.push_str(&format!("\n\n{refused}"));
        }
        text
    })
}
