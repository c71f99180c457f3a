//! `cargo xtask`: set-up, build, test and demo, each installing what is missing first.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, nightly rust-src, bpf-linker).
    Setup,
    /// Build the eBPF object and every binary.
    Build {
        /// Optimized build.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run every test (privileged ones need root).
    Test {
        /// Arguments passed on to `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the seeds' ClusterIP exercise through lb on a private node, then clean up.
    Demo,
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::install_missing(),
        Task::Build { release } => {
            setup::install_missing()?;
            build(release)
        }
        Task::Test { args } => {
            setup::install_missing()?;
            build(false)?;
            cargo(&["test", "--workspace", "--exclude", "lb-ebpf"], &args)
        }
        Task::Demo => {
            setup::install_missing()?;
            build(false)?;
            lb_tests::demo::run_demo()
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where the binaries land, for the tests and the demo to find them.
fn bin_dir(release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join(if release { "release" } else { "debug" })
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--workspace", "--exclude", "lb-ebpf", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args, &[])
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(args)
        .args(extra)
        .current_dir(workspace_root())
        .env("LB_BIN_DIR", bin_dir(false))
        .env("PATH", setup::path_with_cargo_bin());
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}
