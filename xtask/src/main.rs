//! `cargo xtask`: set-up, build, test and demo, each installing what is missing first.

mod bench;
mod deploy;
mod fuzz;
mod setup;
mod vm;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
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
    /// Install what building and testing need (apt packages, nightly rust-src, bpf-linker,
    /// cargo-fuzz).
    Setup,
    /// Build the eBPF object and every binary.
    Build {
        /// Optimized build.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run every test (privileged ones need root), then each fuzz target
    /// briefly.
    Test {
        /// Seconds each fuzz target runs (at most 2,000,000 inputs); 0 runs none.
        #[arg(long, value_name = "S", default_value_t = 20)]
        fuzz_seconds: u64,
        /// Arguments passed on to `cargo test`, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the seeds' ClusterIP exercise through lb on a private node, then clean up.
    Demo,
    /// Put the agent onto a cluster (--kubectl) or onto hosts (--ssh).
    Deploy(deploy::DeployArgs),
    /// Compare lb with a direct connect and kube-proxy's iptables and nftables layouts.
    Bench(bench::BenchArgs),
    /// The benchmark in a VM (lima or vagrant): up, bench, down.
    Vm(vm::VmArgs),
    /// The benchmark's client, run by `bench` inside the client pod.
    #[command(hide = true)]
    BenchClient(bench::client::ClientArgs),
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
        Task::Test { fuzz_seconds, args } => {
            setup::install_missing()?;
            build(false)?;
            test(&args, fuzz_seconds)
        }
        Task::Demo => {
            setup::install_missing()?;
            build(false)?;
            lb_tests::demo::run_demo()
        }
        Task::Deploy(args) => deploy::run(args),
        Task::Bench(args) => {
            if !args.no_build {
                setup::install_missing()?;
                // What is measured is what a node runs: the agent, the probes and the
                // benchmark's own client built with optimizations.
                build(true)?;
                // The benchmark's own process is measured too (it hosts the API server
                // of the `kubernetes` source): the optimized one runs it.
                let release = bin_dir(true).join("xtask");
                if std::env::current_exe()?.canonicalize()? != release.canonicalize()? {
                    let status = Command::new(&release)
                        .args(std::env::args_os().skip(1))
                        .arg("--no-build")
                        .status()
                        .with_context(|| format!("running {}", release.display()))?;
                    ensure!(status.success(), "{} failed: {status}", release.display());
                    return Ok(());
                }
                lb_tests::use_binaries_from(bin_dir(true));
            }
            bench::run(args)
        }
        Task::BenchClient(args) => bench::client::run(args),
        Task::Vm(args) => vm::run_vm(args),
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where the binaries land, for the tests and the demo to find them.
pub(crate) fn bin_dir(release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    target.join(if release { "release" } else { "debug" })
}

pub(crate) fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--workspace", "--exclude", "lb-ebpf", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args, &[])
}

fn cargo_command(args: &[&str], extra: &[String]) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(args)
        .args(extra)
        .current_dir(workspace_root())
        .env("LB_BIN_DIR", bin_dir(false))
        .env("PATH", setup::path_with_cargo_bin());
    command
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let mut command = cargo_command(args, extra);
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

/// Runs every test binary, then each fuzz target for `fuzz_seconds` (each counts as a
/// test, failed if it crashed), and closes with one total over all of them, so the last
/// line says how many tests ran rather than how many one crate's doc-tests had.
fn test(extra: &[String], fuzz_seconds: u64) -> anyhow::Result<()> {
    let mut command = cargo_command(&["test", "--workspace", "--exclude", "lb-ebpf"], extra);
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let mut totals = TestTotals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            totals.add(&line);
        }
    }
    let status = child.wait()?;
    let fuzzed = if fuzz_seconds == 0 {
        Ok(Vec::new())
    } else {
        fuzz::run_all(fuzz_seconds)
    };
    // A target that could not be built or run failed as much as one that crashed.
    let failed: Vec<&str> = match &fuzzed {
        Ok(fuzzed) => fuzzed
            .iter()
            .filter(|target| target.crash.is_some())
            .map(|target| target.target)
            .collect(),
        Err(_) => fuzz::TARGETS.to_vec(),
    };
    let ran = fuzzed.as_ref().map_or(fuzz::TARGETS.len(), Vec::len);
    totals.passed += (ran - failed.len()) as u64;
    totals.failed += failed.len() as u64;
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    ensure!(status.success(), "{command:?} failed: {status}");
    let fuzzed = fuzzed?;
    ensure!(
        failed.is_empty(),
        "fuzz targets crashed: {}; inputs: {:?}",
        failed.join(", "),
        fuzzed
            .iter()
            .filter_map(|target| target.crash.as_deref())
            .collect::<Vec<_>>()
    );
    ensure!(totals.passed > 0, "no test ran");
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    /// Adds a libtest summary line: `test result: ok. 6 passed; 0 failed; 0 ignored; …`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_libtest_summaries() {
        let mut totals = TestTotals::default();
        totals.add("test result: ok. 6 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.07s");
        totals
            .add("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out");
        totals.add("test other ... ok");
        assert_eq!(
            totals,
            TestTotals {
                passed: 8,
                failed: 3,
                ignored: 1
            }
        );
    }
}
