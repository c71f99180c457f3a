//! `lb`: the agent that programs lb's socket-level load balancer, and the CLI that inspects it.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};
use lb_userspace::{DEFAULT_BPFFS, agent, cli, maps, node_ports};
use tracing_subscriber::EnvFilter;

/// mimalloc returns freed memory to the system where glibc's malloc keeps it: after the
/// first sync of a large cluster (its manifests read, parsed and dropped) the agent's RSS
/// is what it holds, not what it once needed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    // Boxed: the agent's flags outweigh every other command's.
    Agent(Box<agent::AgentArgs>),
    /// Frontends, their Services, backends and endpoint states; Services outside the datapath.
    Services(cli::services::ServicesArgs),
    /// Backends in the backend map, with the frontends that use them.
    Backends(cli::backends::BackendsArgs),
    /// Session-affinity entries: which client sticks to which backend, and for how long.
    Affinity(cli::affinity::AffinityArgs),
    /// Per-reason counters of the datapath, summed over CPUs.
    Stats(cli::stats::StatsArgs),
    /// Agent, programs and where they are attached, map occupancy.
    Status(cli::status::StatusArgs),
    /// What the datapath does with a connect() or sendmsg() to ADDRESS:PORT[/PROTO], and why.
    Explain(cli::explain::ExplainArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Detach the programs and remove every pin (the agent leaves them loaded when it stops).
    Unload(UnloadArgs),
}

#[derive(Debug, clap::Args)]
struct UnloadArgs {
    /// bpffs directory the agent pinned its links and maps in.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// The agent's state directory: the NodePorts it reserved, recorded there, are given
    /// back to the node's ephemeral ports.
    #[arg(long, value_name = "PATH", default_value = lb_userspace::state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let agent = matches!(cli.command, Command::Agent(_));
    if !agent {
        // A reader that stops early (`lb services | head`) ends a command quietly, as it
        // does any Unix tool, instead of a panic on the failed write. Not the agent's: it
        // wants EPIPE from its sockets, as errors.
        // SAFETY: set before any thread starts; the default disposition needs no handler.
        // It fails only for a signal that cannot be caught, which SIGPIPE is not.
        let _previous = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {}", one_line(&e));
            if agent && !nix::unistd::geteuid().is_root() {
                eprintln!(
                    "lb: hint: loading programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: an error that names its source in
/// its own message (`opening X: No such file`) is not followed by that source again.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            lb_userspace::memory::no_huge_pages();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .on_thread_park(lb_userspace::memory::on_worker_park)
                .enable_all()
                .build()?
                .block_on(agent::run(*args))
        }
        Command::Services(args) => Ok(cli::services::run(args)?),
        Command::Backends(args) => Ok(cli::backends::run(args)?),
        Command::Affinity(args) => Ok(cli::affinity::run(args)?),
        Command::Stats(args) => Ok(cli::stats::run(args)?),
        Command::Status(args) => Ok(cli::status::run(args)?),
        Command::Explain(args) => Ok(cli::explain::run(args)?),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        Command::Unload(args) => {
            // A running agent puts back what is taken from under it. It holds the pin
            // directory's lock, whatever its state directory; held here until the end, so
            // that no agent starts meanwhile.
            let _lock = maps::lock_existing(&args.bpffs).map_err(|e| match e {
                maps::DatapathError::Locked { .. } => {
                    let pid = lb_userspace::state::running_agent(&args.state_dir)
                        .map(|pid| format!(" (pid {pid})"))
                        .unwrap_or_default();
                    anyhow::anyhow!(
                        "an agent{pid} is running on {} and would attach the programs again; stop it first",
                        args.bpffs.display()
                    )
                }
                other => other.into(),
            })?;
            // The NodePorts first: removing the pin directory ends the lock, and an agent
            // that starts then reserves them anew.
            let released = node_ports::release(&args.state_dir)?;
            for path in maps::unload(&args.bpffs)? {
                println!("removed {}", path.display());
            }
            match released {
                Some((netns, ports)) if ports.is_empty() => println!(
                    "{} no longer names the network namespace NodePorts were reserved in: nothing to give back",
                    netns.display()
                ),
                Some((netns, ports)) => println!(
                    "gave back NodePorts {ports} to the ephemeral ports of {} (net.ipv4.ip_local_reserved_ports)",
                    netns.display()
                ),
                None => {}
            }
            Ok(())
        }
    }
}
