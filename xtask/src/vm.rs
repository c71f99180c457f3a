//! `cargo xtask vm up|bench|down --provider lima|vagrant`: the benchmark in a VM with a
//! kernel of its own, from vm/lima.yaml or vm/Vagrantfile; results come back to
//! target/lb-bench/<provider>/.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    Lima,
    Vagrant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Create and provision the VM.
    Up,
    /// Copy the checkout in, run `cargo xtask bench` as root, copy the results back.
    Bench,
    /// Delete the VM.
    Down,
}

#[derive(Debug, clap::Args)]
pub struct VmArgs {
    #[arg(value_enum)]
    action: Action,
    #[arg(long, value_enum, default_value_t = Provider::Lima)]
    provider: Provider,
    /// Arguments for `cargo xtask bench` in the VM (e.g. --sizes=1,1000).
    #[arg(last = true)]
    bench_args: Vec<String>,
}

const NAME: &str = "lb-bench";
const IN_VM: &str = "/root/lb";
const CARGO: &str = "/root/.cargo/bin/cargo";

fn tool(name: &str, install: &str) -> anyhow::Result<()> {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        found,
        "{name} not found: install {install}, or use the other --provider"
    );
    Ok(())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

pub fn run_vm(args: VmArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let results = root.join("target/lb-bench").join(match args.provider {
        Provider::Lima => "lima",
        Provider::Vagrant => "vagrant",
    });
    let bench = format!(
        "cd {IN_VM} && {CARGO} xtask bench {}",
        args.bench_args.join(" ")
    );
    match args.provider {
        Provider::Lima => {
            tool("limactl", "Lima (https://lima-vm.io)")?;
            match args.action {
                Action::Up => run(Command::new("limactl")
                    .args(["start", "--tty=false", &format!("--name={NAME}")])
                    .arg(root.join("vm/lima.yaml"))),
                Action::Bench => {
                    copy_checkout_lima(&root)?;
                    run(Command::new("limactl")
                        .args(["shell", NAME, "sudo", "bash", "-lc", &bench]))?;
                    std::fs::create_dir_all(&results)?;
                    for file in ["results.json", "p50.svg"] {
                        run(Command::new("limactl")
                            .args(["copy", &format!("{NAME}:{IN_VM}/target/lb-bench/{file}")])
                            .arg(results.join(file)))?;
                    }
                    println!("results in {}", results.display());
                    Ok(())
                }
                Action::Down => run(Command::new("limactl").args(["delete", "--force", NAME])),
            }
        }
        Provider::Vagrant => {
            tool(
                "vagrant",
                "Vagrant (https://www.vagrantup.com) and a provider for it",
            )?;
            let vagrant = || {
                let mut command = Command::new("vagrant");
                command.current_dir(root.join("vm"));
                command
            };
            match args.action {
                Action::Up => run(vagrant().arg("up")),
                Action::Bench => {
                    run(vagrant().arg("rsync"))?;
                    let script = format!(
                        "sudo rm -rf {IN_VM} && sudo cp -r /lb {IN_VM} && sudo bash -lc '{bench}'"
                    );
                    run(vagrant().args(["ssh", "-c", &script]))?;
                    std::fs::create_dir_all(&results)?;
                    for file in ["results.json", "p50.svg"] {
                        let output = vagrant()
                            .args([
                                "ssh",
                                "-c",
                                &format!("sudo cat {IN_VM}/target/lb-bench/{file}"),
                            ])
                            .output()?;
                        ensure!(output.status.success(), "copying {file} back failed");
                        std::fs::write(results.join(file), output.stdout)?;
                    }
                    println!("results in {}", results.display());
                    Ok(())
                }
                Action::Down => run(vagrant().args(["destroy", "--force"])),
            }
        }
    }
}

/// The tracked files of the checkout, as a tar stream into the VM (no build output).
fn copy_checkout_lima(root: &Path) -> anyhow::Result<()> {
    let mut archive = Command::new("git")
        .args(["archive", "--format=tar", "HEAD"])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("git archive")?;
    let stdout = archive.stdout.take().context("git archive's stdout")?;
    let unpack = format!("sudo rm -rf {IN_VM} && sudo mkdir -p {IN_VM} && sudo tar -x -C {IN_VM}");
    run(Command::new("limactl")
        .args(["shell", NAME, "bash", "-c", &unpack])
        .stdin(stdout))?;
    let status = archive.wait()?;
    ensure!(status.success(), "git archive failed: {status}");
    Ok(())
}
