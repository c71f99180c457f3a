//! Finding (and, where a node lacks them, mounting) the bpffs and cgroup2 filesystems.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

/// Where bpffs lives on every distribution that mounts it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Where we mount cgroup2 on a node that has none (as Cilium does under /run/cilium).
pub const FALLBACK_CGROUP2: &str = "/run/lb/cgroupv2";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("reading /proc/mounts: {0}")]
    ProcMounts(std::io::Error),
    #[error(
        "{path} is not on a bpffs, and only {BPFFS_ROOT} is mounted automatically; mount one with `mount -t bpf bpf DIR`"
    )]
    NotBpffs { path: PathBuf },
    #[error("mounting {fstype} at {path}: {source} (are you root?)")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("--cgroup {path}: not a cgroup2 directory{mounted}")]
    NotCgroup2 { path: PathBuf, mounted: String },
    #[error("--cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: nix::Error },
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Mount points of filesystems of type `fstype`, in /proc/mounts order.
pub fn mount_points(fstype: &str) -> Result<Vec<PathBuf>, MountError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(MountError::ProcMounts)?;
    Ok(parse_mounts(&mounts, fstype))
}

fn parse_mounts(mounts: &str, fstype: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == fstype).then(|| PathBuf::from(unescape_octal(target)))
        })
        .collect()
}

/// /proc/mounts escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest.get(pos + 1..pos + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Makes sure `dir` is a directory of a cgroup2 hierarchy, where the programs can attach
/// (a link on anything else fails with a bare EBADF).
pub fn ensure_cgroup2(dir: &Path) -> Result<(), MountError> {
    let fs = nix::sys::statfs::statfs(dir).map_err(|source| MountError::Cgroup {
        path: dir.into(),
        source,
    })?;
    if fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Ok(());
    }
    let mounted = mount_points("cgroup2")
        .ok()
        .and_then(|points| points.into_iter().next())
        .map(|point| format!(" (cgroup2 is mounted at {})", point.display()))
        .unwrap_or_default();
    Err(MountError::NotCgroup2 {
        path: dir.into(),
        mounted,
    })
}

/// Makes sure `dir` can hold pins: it must be on a bpffs. /sys/fs/bpf is mounted if missing.
pub fn ensure_bpffs(dir: &Path) -> Result<(), MountError> {
    let on_bpffs = |mounts: &[PathBuf]| mounts.iter().any(|m| dir.starts_with(m));
    if on_bpffs(&mount_points("bpf")?) {
        return Ok(());
    }
    if !dir.starts_with(BPFFS_ROOT) {
        return Err(MountError::NotBpffs { path: dir.into() });
    }
    tracing::info!("mounting bpffs at {BPFFS_ROOT}");
    mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        fstype: "bpf",
        path: BPFFS_ROOT.into(),
        source,
    })
}

/// The cgroup2 root, mounted at [`FALLBACK_CGROUP2`] if the node has none.
pub fn cgroup2_root() -> Result<PathBuf, MountError> {
    if let Some(root) = mount_points("cgroup2")?.into_iter().next() {
        return Ok(root);
    }
    let path = PathBuf::from(FALLBACK_CGROUP2);
    std::fs::create_dir_all(&path).map_err(|source| MountError::CreateDir {
        path: path.clone(),
        source,
    })?;
    tracing::info!("mounting cgroup2 at {}", path.display());
    mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        fstype: "cgroup2",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
bpf /tmp/with\\040space bpf rw 0 0
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        assert_eq!(
            parse_mounts(HYBRID, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(
            parse_mounts(HYBRID, "bpf"),
            vec![
                PathBuf::from("/sys/fs/bpf"),
                PathBuf::from("/tmp/with space")
            ]
        );
    }
}
