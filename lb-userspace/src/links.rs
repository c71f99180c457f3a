//! What a pinned cgroup link is attached to. aya's `LinkInfo` leaves out the cgroup part of
//! `bpf_link_info`, so `lb status` asks the kernel itself (BPF_OBJ_GET, then
//! BPF_OBJ_GET_INFO_BY_FD) and finds the cgroup's path by its id (the inode number of its
//! directory on cgroup2).

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// A cgroup link as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub link_id: u32,
    pub program_id: u32,
    pub cgroup_id: u64,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the cgroup member of its union.
#[repr(C)]
#[derive(Default)]
struct LinkInfoCgroup {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 9],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Reads the link pinned at `path`.
pub fn cgroup_link(path: &Path) -> std::io::Result<CgroupLink> {
    let pathname = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut get = ObjGetAttr {
        pathname: pathname.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(std::io::Error::other)?) };

    let mut info = LinkInfoCgroup::default();
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?,
        info_len: u32::try_from(size_of::<LinkInfoCgroup>()).map_err(std::io::Error::other)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
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

/// The name of a cgroup sock_addr attach type.
pub const fn attach_type_name(attach_type: u32) -> &'static str {
    match attach_type {
        10 => "cgroup/connect4",
        14 => "cgroup/sendmsg4",
        19 => "cgroup/recvmsg4",
        29 => "cgroup/getpeername4",
        _ => "other",
    }
}
