//! The fuzz targets of `lb-userspace/fuzz`, built with cargo-fuzz on nightly and each run
//! for a bounded time and number of inputs after the tests: a crash fails the run and
//! leaves its input in the target directory.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

/// One per input surface: manifest files, API objects into the model, the planner.
pub const TARGETS: [&str; 3] = ["manifests", "api_objects", "planner"];

/// Inputs a target runs at most in `cargo xtask test`, whatever its time.
const MAX_RUNS: u64 = 2_000_000;

/// How one target's run went.
pub struct Fuzzed {
    pub target: &'static str,
    /// Where the crashing input is, if the target crashed.
    pub crash: Option<PathBuf>,
}

fn fuzz_dir() -> PathBuf {
    crate::workspace_root().join("lb-userspace").join("fuzz")
}

/// Where the build, the corpora and the crashes go: `fuzz/` in cargo's target directory.
fn work_dir() -> PathBuf {
    crate::bin_dir(false)
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("fuzz")
}

/// `cargo fuzz SUBCOMMAND` on nightly, with the fuzz crate and target directories.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo", "fuzz", subcommand, "--fuzz-dir"])
        .arg(fuzz_dir())
        // lb is safe Rust: AddressSanitizer would find little and run the targets ten
        // times slower (debug assertions and overflow checks stay on).
        .args(["--sanitizer", "none"])
        .arg("--target-dir")
        .arg(work_dir())
        .current_dir(crate::workspace_root())
        // This process runs on stable: cargo-fuzz must find nightly's cargo, not this one.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("PATH", crate::setup::path_with_cargo_bin());
    command
}

/// Builds every target, then runs each for `seconds` (and at most [`MAX_RUNS`] inputs)
/// on its corpus: the checked-in seeds, seeds made from the tests' generated manifests,
/// and what earlier runs found.
pub fn run_all(seconds: u64) -> anyhow::Result<Vec<Fuzzed>> {
    let mut build = cargo_fuzz("build");
    let status = build
        .status()
        .with_context(|| format!("running {build:?}"))?;
    ensure!(status.success(), "{build:?} failed: {status}");
    let generated = work_dir().join("generated");
    generate_seeds(&generated)?;
    TARGETS
        .into_iter()
        .map(|target| run(target, seconds, &generated.join(target)))
        .collect()
}

fn run(target: &'static str, seconds: u64, generated: &Path) -> anyhow::Result<Fuzzed> {
    let work = work_dir();
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = work.join(format!("{target}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let seeds = fuzz_dir().join("seeds").join(target);
    let dictionary = fuzz_dir().join("json-yaml.dict");
    let mut command = cargo_fuzz("run");
    command.arg(target).arg(&corpus);
    command.args([&seeds, generated].into_iter().filter(|dir| dir.is_dir()));
    command.args([
        "--".to_owned(),
        format!("-max_total_time={seconds}"),
        format!("-runs={MAX_RUNS}"),
        // An input that takes this long is a hang: it fails the run too.
        "-timeout=10".to_owned(),
        "-print_final_stats=1".to_owned(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    if target != "planner" {
        command.arg(format!("-dict={}", dictionary.display()));
    }
    let status = command
        .stderr(log_file)
        .status()
        .with_context(|| format!("running {command:?}"))?;
    let output =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let runs = executed_units(&output);
    let crash = (!status.success()).then(|| crash_input(&output).unwrap_or(log));
    match (&crash, runs) {
        (None, Some(runs)) => {
            println!("fuzz {target}: {runs} inputs in up to {seconds} s, no crash")
        }
        (None, None) => println!("fuzz {target}: no crash"),
        (Some(input), _) => {
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            println!(
                "fuzz {target}: FAILED ({status}); input: {}",
                input.display()
            );
        }
    }
    Ok(Fuzzed { target, crash })
}

/// The number libFuzzer's `-print_final_stats` gives as `stat::number_of_executed_units`.
fn executed_units(output: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|count| count.trim().parse().ok())
}

/// Where libFuzzer wrote the input that crashed: `Test unit written to PATH`.
fn crash_input(output: &str) -> Option<PathBuf> {
    output
        .lines()
        .find_map(|line| line.split_once("Test unit written to "))
        .map(|(_, path)| PathBuf::from(path.trim()))
}

/// Seeds made from the tests' generator: three Services with their EndpointSlices as
/// multi-document YAML and as a `kind: List` (manifests), and as an API server lists them
/// and then sends changes (API objects).
fn generate_seeds(dir: &Path) -> anyhow::Result<()> {
    use lb_tests::generate;
    let endpoints = [
        (std::net::Ipv4Addr::new(10, 244, 0, 11), 8080),
        (std::net::Ipv4Addr::new(10, 244, 0, 12), 8080),
    ];
    let services = generate::services(3, &endpoints);
    let list = |kind: &str, items: Vec<serde_json::Value>| serde_json::json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items});
    let watch_event =
        |kind: &str, object: serde_json::Value| serde_json::json!({"type": kind, "object": object});
    let service = |i: usize| generate::service_object(&services[i], i);
    let slice = |i: usize| generate::slice_object(&services[i], i);
    let api_lines = [
        format!("S{}", list("ServiceList", (0..2).map(service).collect())),
        format!(
            "E{}",
            list("EndpointSliceList", (0..2).map(slice).collect())
        ),
        ".".to_owned(),
        format!("S{}", watch_event("ADDED", service(2))),
        format!("E{}", watch_event("ADDED", slice(2))),
        format!("E{}", watch_event("DELETED", slice(0))),
        format!("S{}", watch_event("MODIFIED", service(1))),
    ];
    let files = [
        (
            "manifests",
            "generated.yaml",
            generate::manifests(&services),
        ),
        (
            "manifests",
            "generated.json",
            generate::list_json(&services),
        ),
        ("api_objects", "generated.txt", api_lines.join("\n")),
    ];
    for (target, name, text) in files {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)
            .with_context(|| format!("creating {}", target_dir.display()))?;
        let path = target_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_final_stats_and_crash_input() {
        let output = "#2097152\tDONE   cov: 1234 ft: 5678 corp: 90/12Kb exec/s: 104857 rss: 80Mb\n\
                      Done 2097152 runs in 20 second(s)\n\
                      stat::number_of_executed_units: 2097152\n\
                      stat::average_exec_per_sec:     104857\n";
        assert_eq!(executed_units(output), Some(2_097_152));
        assert_eq!(crash_input(output), None);
        let crashed = "==1== ERROR: libFuzzer: deadly signal\n\
                       artifact_prefix='/t/fuzz/artifacts/planner/'; Test unit written to /t/fuzz/artifacts/planner/crash-da39a3ee\n";
        assert_eq!(
            crash_input(crashed),
            Some(PathBuf::from("/t/fuzz/artifacts/planner/crash-da39a3ee"))
        );
    }
}
