//! The few `bpf(2)` commands aya 0.14 does not offer, wrapped once, here: a lookup in a
//! socket storage map by a socket's descriptor, batched map updates, deletes and lookups (a full sync of 100k Services is hundreds of thousands of
//! entries, one syscall per entry otherwise), and `BPF_LINK_UPDATE` on a cgroup link (to
//! swap in programs that use a larger generation of maps without detaching anything).
//!
//! Every error names the command and carries the kernel's errno.

use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use bytemuck::Pod;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Entries per batched syscall: large enough that the syscall cost vanishes, small enough
/// that the kernel's copy of the batch stays in a few pages.
const BATCH: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{command} failed: {source}")]
    Syscall {
        command: &'static str,
        source: std::io::Error,
    },
    #[error("opening the pin {path}: {source}")]
    ObjGet {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl BpfError {
    /// The kernel's errno, if the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Syscall { source, .. } | Self::ObjGet { source, .. } => source.raw_os_error(),
        }
    }
}

/// `struct { ... } batch` of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The element-command part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `struct { ... } link_update` of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `struct { ... }` of `union bpf_attr` for BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Issues `command` with `attr`; the kernel reads (and for lookups writes) the attribute
/// and the buffers it points at.
///
/// # Safety
/// `attr` must be the attribute layout of `command`, and every pointer in it valid for
/// what the command reads or writes.
unsafe fn sys_bpf<T>(command: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller vouches for the attribute; its size is passed, and the kernel
    // zero-extends a smaller attribute than it knows.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn fd_of(map: BorrowedFd<'_>) -> u32 {
    // File descriptors are non-negative.
    u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX)
}

fn address<T>(slice: &[T]) -> u64 {
    slice.as_ptr() as u64
}

/// Writes `keys[i] → values[i]` in order, batched; the first error stops it (what came
/// before stays written, as with single updates).
pub fn update<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BpfError> {
    debug_assert_eq!(keys.len(), values.len());
    for (keys, values) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        let mut attr = BatchAttr {
            keys: address(keys),
            values: address(values),
            count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
            map_fd: fd_of(map),
            ..BatchAttr::default()
        };
        let mut tries = 0;
        loop {
            // SAFETY: the batch layout, with `count` keys and values the kernel reads.
            match unsafe { sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
                Ok(_) => break,
                // Kernels before 6.1 can refuse a bucket that another thread's update on
                // the same CPU holds (htab `map_locked`): writing the batch again is
                // harmless, its entries in the same order.
                Err(source) if source.raw_os_error() == Some(libc::EBUSY) && tries < 3 => {
                    tries += 1;
                    attr.count = u32::try_from(keys.len()).unwrap_or(u32::MAX);
                }
                Err(source) => {
                    return Err(BpfError::Syscall {
                        command: "BPF_MAP_UPDATE_BATCH",
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Below this many entries an update is written on one thread: more cost more than they
/// save.
pub const CONCURRENT_UPDATE_MIN: usize = 1 << 16;

/// [`update`] of parts of `keys`/`values` at once, one thread each: `starts` are where the
/// parts after the first begin (ascending). The kernel locks a hash map per bucket, so the
/// parts are written side by side; the caller puts entries whose order matters in the same
/// part. The first error of any part is returned (the others' writes stay).
pub fn update_concurrently<K: Pod + Sync, V: Pod + Sync>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    starts: &[usize],
) -> Result<(), BpfError> {
    debug_assert_eq!(keys.len(), values.len());
    let mut bounds = Vec::with_capacity(starts.len() + 2);
    bounds.push(0);
    bounds.extend(starts.iter().map(|&start| start.min(keys.len())));
    bounds.push(keys.len());
    let parts: Vec<std::ops::Range<usize>> = bounds
        .windows(2)
        .map(|pair| pair[0]..pair[1].max(pair[0]))
        .collect();
    let Some((first, rest)) = parts.split_first() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = rest
            .iter()
            .map(|part| {
                let (keys, values) = (&keys[part.clone()], &values[part.clone()]);
                scope.spawn(move || update(map, keys, values))
            })
            .collect();
        let mut result = update(map, &keys[first.clone()], &values[first.clone()]);
        for other in others {
            let written = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            result = result.and(written);
        }
        result
    })
}

/// Where to cut `len` entries into one part per core for [`update_concurrently`]: the
/// first index at or after each even share where `may_start` allows a part to begin.
/// Empty (one part) below [`CONCURRENT_UPDATE_MIN`] or on one core.
pub fn concurrent_starts(len: usize, may_start: impl Fn(usize) -> bool) -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    starts_for(len, cores, may_start)
}

/// [`concurrent_starts`] on `cores` cores.
fn starts_for(len: usize, cores: usize, may_start: impl Fn(usize) -> bool) -> Vec<usize> {
    if len < CONCURRENT_UPDATE_MIN || cores < 2 {
        return Vec::new();
    }
    let mut starts: Vec<usize> = Vec::with_capacity(cores - 1);
    for share in 1..cores {
        let from = (len * share / cores).max(starts.last().map_or(0, |last| last + 1));
        if let Some(start) = (from..len).find(|&at| may_start(at)) {
            starts.push(start);
        }
    }
    starts
}

/// Deletes `keys` in order, batched; keys that are not there are skipped.
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BpfError> {
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: address(chunk),
            count: u32::try_from(chunk.len()).unwrap_or(u32::MAX),
            map_fd: fd_of(map),
            ..BatchAttr::default()
        };
        // SAFETY: the batch layout, with `count` keys the kernel reads; it writes back
        // how many it processed.
        match unsafe { sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr) } {
            Ok(_) => rest = &rest[chunk.len()..],
            // The batch stops at a missing key: skip it and go on after it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = usize::try_from(attr.count).unwrap_or(chunk.len());
                rest = &rest[(done + 1).min(rest.len())..];
            }
            Err(source) => {
                return Err(BpfError::Syscall {
                    command: "BPF_MAP_DELETE_BATCH",
                    source,
                });
            }
        }
    }
    Ok(())
}

/// One entry's value, `None` if the key is not there. For socket storage the key is a
/// socket's file descriptor.
pub fn lookup_one<K: Pod, V: Pod>(map: BorrowedFd<'_>, key: &K) -> Result<Option<V>, BpfError> {
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd_of(map),
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        ..ElemAttr::default()
    };
    // SAFETY: the element layout; the kernel reads one key and writes one value of the
    // map's value size, which `V` is.
    match unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(BpfError::Syscall {
            command: "BPF_MAP_LOOKUP_ELEM",
            source,
        }),
    }
}

/// Deletes one entry; a missing key is not an error.
pub fn delete_one<K: Pod>(map: BorrowedFd<'_>, key: &K) -> Result<(), BpfError> {
    let mut attr = ElemAttr {
        map_fd: fd_of(map),
        key: std::ptr::from_ref(key) as u64,
        ..ElemAttr::default()
    };
    // SAFETY: the element layout; the kernel reads one key.
    match unsafe { sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(BpfError::Syscall {
            command: "BPF_MAP_DELETE_ELEM",
            source,
        }),
    }
}

/// Every entry of a hash map, batched. Entries written meanwhile may or may not be seen,
/// as with a key-by-key walk.
pub fn lookup_all<K: Pod, V: Pod>(map: BorrowedFd<'_>) -> Result<Vec<(K, V)>, BpfError> {
    let mut out = Vec::new();
    let mut chunk = BATCH;
    // The cursor is opaque to user space: a u32 bucket index for hash maps.
    let mut cursor = 0u32;
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); chunk];
        let mut values = vec![V::zeroed(); chunk];
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&cursor) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: fd_of(map),
            ..BatchAttr::default()
        };
        // SAFETY: the batch layout; the kernel writes at most `count` keys and values into
        // buffers of that many, and the cursor into `next`.
        let result = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = usize::try_from(attr.count).unwrap_or(0).min(chunk);
        match result {
            Ok(_) => {}
            // The end: what this last call returned is still good.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values).take(got));
                return Ok(out);
            }
            // One bucket holds more entries than the buffer: retry it with a larger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 2;
                continue;
            }
            Err(source) => {
                return Err(BpfError::Syscall {
                    command: "BPF_MAP_LOOKUP_BATCH",
                    source,
                });
            }
        }
        out.extend(keys.into_iter().zip(values).take(got));
        cursor = next;
        first = false;
    }
}

/// Opens a pinned object (map, program or link) by its bpffs path.
pub fn open_pin(path: &Path) -> Result<OwnedFd, BpfError> {
    use std::os::unix::ffi::OsStrExt as _;
    let error = |source| BpfError::ObjGet {
        path: path.into(),
        source,
    };
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut attr = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    // SAFETY: the obj_get layout; the kernel reads a NUL-terminated path.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }.map_err(error)?;
    let fd = i32::try_from(fd).map_err(|_| error(std::io::Error::other("fd out of range")))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Points `link` at `program`, atomically: every hook the link serves runs either the old
/// program or the new one, never neither.
pub fn update_link(link: BorrowedFd<'_>, program: impl AsFd) -> Result<(), BpfError> {
    let mut attr = LinkUpdateAttr {
        link_fd: fd_of(link),
        new_prog_fd: fd_of(program.as_fd()),
        ..LinkUpdateAttr::default()
    };
    // SAFETY: the link_update layout, with two file descriptors.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }.map_err(|source| BpfError::Syscall {
        command: "BPF_LINK_UPDATE",
        source,
    })?;
    Ok(())
}

/// `struct { ... } info` of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the cgroup member of its union: what aya's `LinkInfo`
/// leaves out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CgroupLinkInfo {
    pub type_: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    pub cgroup_id: u64,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
    _rest: [u32; 9],
}

/// What the kernel says of the cgroup link `link`.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> Result<CgroupLinkInfo, BpfError> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_of(link),
        info_len: u32::try_from(std::mem::size_of::<CgroupLinkInfo>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: the info layout; the kernel writes at most `info_len` bytes into `info`.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map_err(|source| BpfError::Syscall {
        command: "BPF_OBJ_GET_INFO_BY_FD",
        source,
    })?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_parts_begin_only_where_allowed() {
        let len = 3 * CONCURRENT_UPDATE_MIN;
        // Runs of four entries (three slots, then their master): a part begins after a
        // master only.
        let after_master = |at: usize| at.is_multiple_of(4);
        let starts = starts_for(len, 3, after_master);
        assert_eq!(starts.len(), 2);
        assert!(starts.iter().all(|&at| after_master(at)), "{starts:?}");
        assert!(starts.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(starts[0] >= len / 3 && starts[0] < len / 3 + 4);

        // Small, or one core: one part.
        assert!(starts_for(CONCURRENT_UPDATE_MIN - 1, 4, |_| true).is_empty());
        assert!(starts_for(len, 1, |_| true).is_empty());
        // Nowhere allowed: one part.
        assert!(starts_for(len, 2, |_| false).is_empty());
    }
}
