//! `cargo xtask deploy`: onto a cluster with kubectl (the DaemonSet in deploy/kubernetes),
//! or onto hosts over ssh (the binary, its source and a systemd unit).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

/// The image the manifests name; `--image` replaces it.
const DEFAULT_IMAGE: &str = "ghcr.io/lb-project/lb:latest";

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// Apply deploy/kubernetes (ServiceAccount, RBAC, DaemonSet) with kubectl.
    #[arg(long, conflicts_with = "ssh")]
    kubectl: bool,
    /// With --kubectl: print the manifests that would be applied, and apply nothing.
    #[arg(long, requires = "kubectl")]
    dry_run: bool,
    /// With --kubectl: the agent image [default: ghcr.io/lb-project/lb:latest].
    #[arg(long, requires = "kubectl")]
    image: Option<String>,
    /// Install and start the agent on these hosts over ssh: user@host[,user@host…].
    #[arg(long, value_delimiter = ',', value_name = "USER@HOST")]
    ssh: Vec<String>,
    /// With --ssh: the port sshd listens on.
    #[arg(long, default_value_t = 22, requires = "ssh")]
    ssh_port: u16,
    /// With --ssh: the private key to log in with.
    #[arg(long, value_name = "FILE", requires = "ssh")]
    identity: Option<PathBuf>,
    /// With --ssh: an ssh option (KEY=VALUE), repeatable.
    #[arg(long = "ssh-option", value_name = "KEY=VALUE", requires = "ssh")]
    ssh_options: Vec<String>,
    /// With --ssh: follow the manifests of this directory, copied to <root>/etc/lb/manifests.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "kubeconfig",
        requires = "ssh"
    )]
    manifests: Option<PathBuf>,
    /// With --ssh: follow the cluster of this kubeconfig, copied to <root>/etc/lb/kubeconfig.
    #[arg(long, value_name = "FILE", requires = "ssh")]
    kubeconfig: Option<PathBuf>,
    /// With --ssh: install under this directory of the hosts instead of / (staging).
    #[arg(long, value_name = "DIR", default_value = "/", requires = "ssh")]
    remote_root: PathBuf,
    /// With --ssh: one more argument for `lb agent` in the unit, repeatable.
    #[arg(
        long = "agent-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        requires = "ssh"
    )]
    agent_args: Vec<String>,
    /// With --ssh: the binary to install [default: a fresh release build].
    #[arg(long, value_name = "FILE", requires = "ssh")]
    binary: Option<PathBuf>,
}

pub fn run(args: DeployArgs) -> anyhow::Result<()> {
    if args.kubectl {
        return kubectl(&args);
    }
    ensure!(
        !args.ssh.is_empty(),
        "say where: --kubectl, or --ssh user@host[,…]"
    );
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => {
            crate::setup::install_missing()?;
            crate::build(true)?;
            crate::bin_dir(true).join("lb")
        }
    };
    ensure!(binary.is_file(), "{}: no such binary", binary.display());
    for host in &args.ssh {
        println!("deploy: {host}");
        Host { args: &args, host }
            .install(&binary)
            .with_context(|| format!("deploying to {host}"))?;
    }
    Ok(())
}

/// The manifests, one YAML stream, with the image replaced.
fn kubernetes_manifests(image: Option<&str>) -> anyhow::Result<String> {
    let root = crate::workspace_root();
    let dir = root.join("deploy/kubernetes");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    paths.sort();
    let mut stream = String::new();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let name = path.strip_prefix(&root).unwrap_or(&path);
        stream += &format!(
            "---\n# {}\n{}",
            name.display(),
            text.trim_start_matches("---\n")
        );
    }
    Ok(match image {
        Some(image) => stream.replace(DEFAULT_IMAGE, image),
        None => stream,
    })
}

fn kubectl(args: &DeployArgs) -> anyhow::Result<()> {
    let manifests = kubernetes_manifests(args.image.as_deref())?;
    if args.dry_run {
        print!("{manifests}");
        return Ok(());
    }
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running kubectl (is it installed and on PATH?)")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(manifests.as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "kubectl apply failed: {status}");
    Ok(())
}

/// Quotes `text` for a POSIX shell.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

struct Host<'a> {
    args: &'a DeployArgs,
    host: &'a str,
}

impl Host<'_> {
    fn ssh(&self) -> Command {
        let mut command = Command::new("ssh");
        command
            .args(["-p", &self.args.ssh_port.to_string()])
            .args(["-o", "BatchMode=yes"]);
        if let Some(identity) = &self.args.identity {
            command.arg("-i").arg(identity);
        }
        for option in &self.args.ssh_options {
            command.args(["-o", option]);
        }
        command.arg(self.host);
        command
    }

    /// Runs `script` on the host.
    fn run(&self, script: &str) -> anyhow::Result<String> {
        let output = self
            .ssh()
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .context("running ssh")?;
        if !output.status.success() {
            bail!(
                "`{script}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Writes `content` to `path` on the host, atomically, with `mode`.
    fn upload(&self, content: &[u8], path: &Path, mode: &str) -> anyhow::Result<()> {
        let path = quote(&path.display().to_string());
        let script = format!(
            "set -e; mkdir -p \"$(dirname {path})\"; cat > {path}.new; chmod {mode} {path}.new; mv {path}.new {path}"
        );
        let mut child = self
            .ssh()
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh")?;
        child
            .stdin
            .take()
            .context("ssh's stdin")?
            .write_all(content)?;
        let output = child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "writing {path}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    fn remote(&self, path: &str) -> PathBuf {
        self.args.remote_root.join(path)
    }

    fn install(&self, binary: &Path) -> anyhow::Result<()> {
        let args = self.args;
        let mut agent_args: Vec<String> = Vec::new();
        if let Some(dir) = &args.manifests {
            let remote_dir = self.remote("etc/lb/manifests");
            for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
                let path = entry?.path();
                if path.is_file() {
                    let name = path.file_name().context("file name")?;
                    self.upload(&std::fs::read(&path)?, &remote_dir.join(name), "0644")?;
                }
            }
            agent_args.push(format!("--manifests={}", remote_dir.display()));
        }
        if let Some(kubeconfig) = &args.kubeconfig {
            let remote = self.remote("etc/lb/kubeconfig");
            self.upload(&std::fs::read(kubeconfig)?, &remote, "0600")?;
            agent_args.push(format!("--kubeconfig={}", remote.display()));
        }
        agent_args.extend(args.agent_args.iter().cloned());

        let bin = self.remote("usr/local/bin/lb");
        self.upload(&std::fs::read(binary)?, &bin, "0755")?;
        println!("  installed {}", bin.display());

        let template_path = crate::workspace_root().join("deploy/systemd/lb.service");
        let template = std::fs::read_to_string(&template_path)?;
        let root = args.remote_root.display().to_string();
        let unit_text = template
            .lines()
            .filter(|line| !line.starts_with("# Installed by"))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("@ROOT@", root.trim_end_matches('/'))
            .replace("@ARGS@", &agent_args.join(" "))
            + "\n";
        let unit = self.remote("etc/systemd/system/lb.service");
        self.upload(unit_text.as_bytes(), &unit, "0644")?;
        println!("  installed {}", unit.display());

        // systemd finds units in /etc/systemd/system; one staged elsewhere is linked there.
        let link = if args.remote_root == Path::new("/") {
            String::new()
        } else {
            format!("systemctl link {} && ", quote(&unit.display().to_string()))
        };
        self.run(&format!(
            "{link}systemctl daemon-reload && systemctl enable lb.service && systemctl restart lb.service"
        ))?;
        let active = self.run("systemctl is-active lb.service")?;
        ensure!(active.trim() == "active", "lb.service is {}", active.trim());
        println!("  lb.service is active");
        Ok(())
    }
}
