//! `lb`: the agent that programs lb's socket-level load balancer, and the CLI that inspects it.

mod agent;
mod datapath;
mod manifest;
mod model;
mod mounts;
mod netns;
mod plan;
mod services;
mod state;
mod store;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// Where the agent pins its link and maps unless told otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";

#[derive(Debug, Parser)]
#[command(
    name = "lb",
    version,
    about = "eBPF socket-level load balancer for Kubernetes Services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the datapath and keep its maps in sync with Services and EndpointSlices.
    Agent(agent::AgentArgs),
    /// List the frontends the datapath translates and their backends.
    Services(services::ServicesArgs),
    /// Per-reason counters of the datapath, summed over CPUs.
    Stats(services::StatsArgs),
    /// Detach the programs and remove every pin (the agent leaves them loaded when it stops).
    Unload(UnloadArgs),
}

#[derive(Debug, clap::Args)]
struct UnloadArgs {
    /// bpffs directory the agent pinned its link and maps in.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns, for people.
    Table,
    /// JSON, for scripts.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            if !nix::unistd::geteuid().is_root() {
                eprintln!("lb: hint: loading programs and reading pinned maps needs root");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(agent::run(args)),
        Command::Services(args) => services::run(args),
        Command::Stats(args) => services::stats(args),
        Command::Unload(args) => {
            for path in datapath::unload(&args.bpffs)? {
                println!("removed {}", path.display());
            }
            Ok(())
        }
    }
}
