//! What a pinned cgroup link is attached to. aya's `LinkInfo` leaves out the cgroup part of
//! `bpf_link_info`, so `lb status` asks the kernel itself (BPF_OBJ_GET, then
//! BPF_OBJ_GET_INFO_BY_FD) and finds the cgroup's path by its id (the inode number of its
//! directory on cgroup2).

use std::{
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::maps::bpf::{self, BpfError};

/// A cgroup link as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub link_id: u32,
    pub program_id: u32,
    pub cgroup_id: u64,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
}

/// Reads the link pinned at `path`.
pub fn cgroup_link(path: &Path) -> Result<CgroupLink, BpfError> {
    let link = bpf::open_pin(path)?;
    let info = bpf::cgroup_link_info(link.as_fd())?;
    Ok(CgroupLink {
        link_id: info.id,
        program_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// The path of the cgroup with id `id` under `root` (depth-first, at most `max_depth` deep).
pub fn cgroup_path(root: &Path, id: u64, max_depth: usize) -> Option<PathBuf> {
    if std::fs::metadata(root).ok()?.ino() == id {
        return Some(root.into());
    }
    if max_depth == 0 {
        return None;
    }
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|entry| cgroup_path(&entry.path(), id, max_depth - 1))
}

/// The name of a cgroup attach type of lb's programs (`enum bpf_attach_type`).
pub const fn attach_type_name(attach_type: u32) -> &'static str {
    match attach_type {
        10 => "cgroup/connect4",
        11 => "cgroup/connect6",
        12 => "cgroup/post_bind4",
        13 => "cgroup/post_bind6",
        14 => "cgroup/sendmsg4",
        15 => "cgroup/sendmsg6",
        19 => "cgroup/recvmsg4",
        20 => "cgroup/recvmsg6",
        29 => "cgroup/getpeername4",
        30 => "cgroup/getpeername6",
        _ => "other",
    }
}
