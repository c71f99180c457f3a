//! The read-only commands: each opens the pinned maps (and the agent's state file), never
//! writes them, and prints a table for people or JSON/YAML for scripts.

pub mod affinity;
pub mod backends;
pub mod explain;
pub mod services;
pub mod stats;
pub mod status;

use std::path::{Path, PathBuf};

use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::{
    maps::{DatapathError, ServiceMaps, mounts},
    state::{self, State},
};

/// Where the agent keeps what the CLI reads.
#[derive(Debug, Clone, clap::Args)]
pub struct Pins {
    /// bpffs directory the agent pinned its links and maps in.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Directory of the agent's state file (Service names, endpoint states).
    #[arg(long, value_name = "PATH", default_value = state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// How to print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    /// JSON, for scripts.
    Json,
    /// YAML, for scripts.
    Yaml,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Format {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Errors that stop a command before it reads anything, each with what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading pinned BPF maps needs root (CAP_BPF and CAP_SYS_ADMIN): run lb as root")]
    NotRoot,
    #[error(
        "{path} is not on a bpffs: no bpffs is mounted there (the agent mounts /sys/fs/bpf when it starts); start `lb agent`, or pass --bpffs"
    )]
    NoBpffs { path: PathBuf },
    #[error(
        "nothing is pinned in {path}: no agent has loaded lb there; start `lb agent`, or pass --bpffs"
    )]
    NothingPinned { path: PathBuf },
    #[error(
        "the maps in {path} were pinned by another lb version (found {found}, this lb reads {expected}); run the matching lb, or `lb unload --bpffs {path}` and restart the agent"
    )]
    LayoutMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "no Service {service} (names come from the agent's state file in {})",
        state_dir.display()
    )]
    NoService { service: String, state_dir: PathBuf },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{0}")]
    Output(String),
}

/// Opens the pinned maps, or says in one line why they cannot be read.
pub fn open(pins: &Pins) -> Result<ServiceMaps, CliError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(CliError::NotRoot);
    }
    let bpffs_mounts = mounts::mount_points("bpf").map_err(|e| CliError::Output(e.to_string()))?;
    if !bpffs_mounts.iter().any(|m| pins.bpffs.starts_with(m)) {
        return Err(CliError::NoBpffs {
            path: pins.bpffs.clone(),
        });
    }
    check_layout(&pins.bpffs)?;
    Ok(ServiceMaps::open_pinned(&pins.bpffs)?)
}

/// Tells a directory pinned by another layout version from one where nothing is pinned.
fn check_layout(dir: &Path) -> Result<(), CliError> {
    if dir.join(lb_common::SERVICE_MAP).exists() {
        return Ok(());
    }
    // A service map of any layout: `lb_svc_v4`, and before IPv6 frontends `lb4_svc_v3`, …
    let is_service_map = |name: &str| {
        let unversioned = name.trim_end_matches(|c: char| c.is_ascii_digit());
        (unversioned == "lb_svc_v" || unversioned == "lb4_svc_v") && unversioned != name
    };
    let other = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .find(|name| is_service_map(name));
    match other {
        Some(found) => Err(CliError::LayoutMismatch {
            path: dir.into(),
            found,
            expected: lb_common::SERVICE_MAP.into(),
        }),
        None => Err(CliError::NothingPinned { path: dir.into() }),
    }
}

/// The agent's state file, if it wrote one.
pub fn state(pins: &Pins) -> Result<Option<State>, CliError> {
    Ok(State::read(&pins.state_dir)?)
}

/// Prints `value` as JSON or YAML, or `text(wide)` for people.
pub fn emit<T: Serialize>(
    output: Output,
    value: &T,
    text: impl FnOnce(bool) -> String,
) -> Result<(), CliError> {
    let text = match output {
        Output::Json => {
            serde_json::to_string_pretty(value).map_err(|e| CliError::Output(e.to_string()))?
        }
        Output::Yaml => {
            serde_yaml::to_string(value).map_err(|e| CliError::Output(e.to_string()))?
        }
        Output::Table => text(false),
        Output::Wide => text(true),
    };
    println!("{}", text.trim_end());
    Ok(())
}

/// An empty table with `header`, in the borderless style every command uses.
pub fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header);
    table
}
