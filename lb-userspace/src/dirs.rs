//! Directories the root agent writes in — its pins and its state — must be its alone: a
//! directory another user can write lets them plant links the agent would write through,
//! or remove what it made. /sys/fs/bpf itself is world-writable (sticky), so another user
//! can create the agent's pin directory before it does.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {path}: {why}; use a directory owned by root and writable by no one else")]
    Unsafe {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Makes sure `dir` (given as `flag`) is the agent's alone: created 0700 if missing;
/// refused if it is a symbolic link, not a directory, owned by another user, or writable
/// by group or others. (A root-owned 0755 directory is kept: no one else can write in it.)
pub fn ensure_private(dir: &Path, flag: &'static str) -> Result<(), DirError> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let refuse = |why: String| DirError::Unsafe {
        flag,
        path: dir.into(),
        why,
    };
    let create_error = |source| DirError::Create {
        path: dir.into(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(create_error)?;
        }
        Err(source) => return Err(create_error(source)),
        Ok(_) => {}
    }
    // Checked whether it was there or just made: another user may have made it (or a
    // link) in between.
    let meta = std::fs::symlink_metadata(dir).map_err(create_error)?;
    if meta.file_type().is_symlink() {
        Err(refuse("a symbolic link".into()))
    } else if !meta.is_dir() {
        Err(refuse("not a directory".into()))
    } else if meta.uid() != nix::unistd::geteuid().as_raw() {
        Err(refuse(format!("owned by uid {}", meta.uid())))
    } else if meta.mode() & 0o022 != 0 {
        Err(refuse(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )))
    } else {
        Ok(())
    }
}
