//! Installs what is missing, says what it installs, and does nothing when all is there.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests, the demo and the
/// benchmarks drive (ssh for `deploy --ssh` and its test, dig for the cluster DNS).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "curl",
    "dnsutils",
    "openssh-client",
    "openssh-server",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn install_missing() -> anyhow::Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    Ok(())
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory, where bpf-linker is installed.
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn stdout_of(command: &mut Command) -> String {
    command
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn run(what: &str, command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("{what}: running {command:?}"))?;
    ensure!(status.success(), "{what}: {command:?} failed: {status}");
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        is_root(),
        "missing apt packages {missing:?}; run as root to install them"
    );
    println!("setup: installing apt packages: {}", missing.join(" "));
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn is_root() -> bool {
    stdout_of(Command::new("id").arg("-u")).trim() == "0"
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    if !stdout_of(Command::new("rustup").args(["toolchain", "list"]))
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        println!("setup: installing the nightly Rust toolchain (eBPF builds need it)");
        run(
            "rustup toolchain install",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    println!("setup: installing rust-src for nightly (to build core for bpfel-unknown-none)");
    run(
        "rustup component add",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    cargo_install(
        "bpf-linker",
        BPF_LINKER_VERSION,
        "against LLVM 22 (cargo install, about a minute)",
        |install| {
            install
                .args(["--no-default-features", "--features", "llvm-22"])
                // bpf-linker's build script and llvm-sys each look for LLVM their own way.
                .env("LLVM_PREFIX", LLVM_PREFIX)
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        },
    )
}

/// cargo-fuzz, which `cargo xtask test` runs the fuzz targets with (on nightly).
fn cargo_fuzz() -> anyhow::Result<()> {
    cargo_install(
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        "to run the fuzz targets (cargo install, about two minutes)",
        |install| install.arg("--locked"),
    )
}

/// Installs `tool` `version` with `cargo install` unless it, or another version of it on
/// PATH, is there; `how` says what it is for and how long it takes, `options` adds to the
/// command.
fn cargo_install(
    tool: &str,
    version: &str,
    how: &str,
    options: impl FnOnce(&mut Command) -> &mut Command,
) -> anyhow::Result<()> {
    let installed = stdout_of(Command::new(cargo_bin().join(tool)).arg("--version"));
    if installed.contains(version) || succeeds(Command::new(tool).arg("--version")) {
        return Ok(());
    }
    println!("setup: installing {tool} {version} {how}");
    let mut install = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    install.args(["install", tool, "--version", version]);
    run(&format!("cargo install {tool}"), options(&mut install))
}
