//! What the maps cannot say — which Service and port a frontend belongs to, and the Services
//! that have no frontend — written by the agent after each sync for the CLI to read, also
//! while the agent is stopped.
//!
//! The state is split in shards, each a file of its own, so that a sync rewrites only the
//! shards it changed: one endpoint change among 100k Services writes a few hundred
//! frontends, not all of them. Each file is replaced atomically; a reader that reads while
//! the agent writes may see one shard of the next sync with the others of the last.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use serde::{Deserialize, Serialize, Serializer};

use crate::model::{
    Desired, EndpointState, Frontend, FrontendKind, FrontendTarget, NotInDatapath, ObjectRef,
};

/// Default directory of the state file.
pub const DEFAULT_STATE_DIR: &str = "/run/lb";
const FILE: &str = "services.json";
/// The directory of the shards, beside [`FILE`].
const SHARD_DIR: &str = "services.d";
const PID_FILE: &str = "agent.pid";
/// Shards of the state: a few hundred frontends each at 100k Services.
const SHARDS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(transparent)]
    Dir(#[from] crate::dirs::DirError),
}

/// Makes sure the state directory is the agent's alone ([`crate::dirs::ensure_private`]).
pub fn ensure_private_dir(dir: &Path) -> Result<(), StateError> {
    Ok(crate::dirs::ensure_private(dir, "--state-dir")?)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// When the agent last brought the maps in line with its sources, in ms since the epoch.
    pub synced_at_ms: u64,
    /// The cgroup the agent attached the programs to.
    pub cgroup: PathBuf,
    /// The node name the agent applies traffic policies for.
    pub node: String,
    /// Every frontend, in order (read from the shards).
    #[serde(default)]
    pub frontends: Vec<FrontendNames>,
    /// In order of the Services (read from the shards).
    #[serde(default)]
    pub not_in_datapath: Vec<Unserved>,
    /// Services the agent refused to write (a map would pass its upper bound, …): the maps
    /// keep what they held for them, if anything.
    #[serde(default)]
    pub refused: Vec<Unserved>,
    /// Claims on a frontend another Service has (a clusterIP wins, then the first
    /// claimant).
    #[serde(default)]
    pub ignored_claims: Vec<IgnoredClaim>,
}

/// A Service's claim on a frontend that another Service has, ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IgnoredClaim {
    #[serde(flatten)]
    pub frontend: Frontend,
    pub service: String,
    pub kept_by: String,
}

/// One shard of the state: the frontends and Services that hash to it.
#[derive(Default, Deserialize)]
struct ShardFile {
    frontends: Vec<FrontendNames>,
    not_in_datapath: Vec<Unserved>,
}

/// The names behind one frontend, and every endpoint it was built from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendNames {
    #[serde(flatten)]
    pub frontend: Frontend,
    pub kind: FrontendKind,
    pub service: String,
    pub port_name: String,
    pub endpoints: Vec<EndpointState>,
}

/// A Service that is known but not in the datapath, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unserved {
    pub service: String,
    pub why: String,
}

/// What one sync changed in what a state file says, taken on the sync path at the cost
/// of the change: the targets are shared, not copied. The writer's thread keeps the whole
/// and writes it.
#[derive(Default)]
pub struct Delta {
    /// Frontends whose target changed: the target in effect now, `None` if it has none.
    frontends: Vec<(Frontend, Option<Arc<FrontendTarget>>)>,
    /// Services whose reason for being out of the datapath may have changed.
    not_in_datapath: Vec<(ObjectRef, Option<NotInDatapath>)>,
    /// Every Service refused now (there are few).
    refused: Vec<(ObjectRef, String)>,
    /// Every claim ignored now (there are few).
    ignored_claims: Vec<crate::model::Conflict>,
}

impl Delta {
    /// What `services` and `frontends` are now in `desired`, the Services refused and the
    /// claims ignored.
    pub fn of<'a>(
        desired: &Desired,
        services: impl IntoIterator<Item = &'a ObjectRef>,
        frontends: impl IntoIterator<Item = &'a Frontend>,
        refused: Vec<(ObjectRef, String)>,
    ) -> Self {
        Self {
            frontends: frontends
                .into_iter()
                .map(|frontend| (*frontend, desired.target(frontend).cloned()))
                .collect(),
            not_in_datapath: services
                .into_iter()
                .map(|service| {
                    (
                        service.clone(),
                        desired.not_in_datapath.get(service).cloned(),
                    )
                })
                .collect(),
            refused,
            ignored_claims: desired.conflicts(),
        }
    }
}

/// Which shard a frontend is in: stable across agents, which rewrite each other's shards.
fn shard_of_frontend(frontend: &Frontend) -> usize {
    // The low 64 bits of the address as the maps hold it: an IPv4 address whole, and the
    // interface identifier of an IPv6 one, which is where IPv6 Service addresses differ.
    let address = match frontend.address {
        std::net::IpAddr::V4(v4) => u64::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => (u128::from(v6) & u128::from(u64::MAX)) as u64,
    };
    let key =
        (address << 24) ^ (u64::from(frontend.port) << 8) ^ u64::from(frontend.protocol.number());
    shard_of(key)
}

/// Which shard a Service's entry is in (FNV-1a of its name).
fn shard_of_service(service: &ObjectRef) -> usize {
    let hash = service
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    shard_of(hash)
}

fn shard_of(key: u64) -> usize {
    // Fibonacci hashing: the top bits of the product spread neighbouring keys.
    let spread = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
    usize::try_from(spread).unwrap_or(0) % SHARDS
}

/// One shard as the writer holds it.
#[derive(Default)]
struct Shard {
    frontends: BTreeMap<Frontend, Arc<FrontendTarget>>,
    not_in_datapath: BTreeMap<ObjectRef, NotInDatapath>,
    /// Changed since it was last written.
    dirty: bool,
}

/// A shard as its file says it, serialized straight from the writer's copy: the endpoint
/// states are worked out as they are written, never kept.
struct ShardView<'a> {
    shard: &'a Shard,
    node: &'a str,
}

impl Serialize for ShardView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let frontends = FromIter(|| {
            self.shard
                .frontends
                .iter()
                .map(|(frontend, target)| names_of(frontend, target, self.node))
        });
        let not_in_datapath = FromIter(|| {
            self.shard
                .not_in_datapath
                .iter()
                .map(|(service, why)| Unserved {
                    service: service.to_string(),
                    why: why.to_string(),
                })
        });
        let mut s = serializer.serialize_struct("ShardFile", 2)?;
        s.serialize_field("frontends", &frontends)?;
        s.serialize_field("not_in_datapath", &not_in_datapath)?;
        s.end()
    }
}

/// A sequence serialized from what a function iterates, element by element.
struct FromIter<F>(F);

impl<F, I> Serialize for FromIter<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq((self.0)())
    }
}

fn names_of(frontend: &Frontend, target: &FrontendTarget, node: &str) -> FrontendNames {
    FrontendNames {
        frontend: *frontend,
        kind: target.kind,
        service: target.service.to_string(),
        port_name: target.port_name.to_string(),
        endpoints: target.endpoint_states(node),
    }
}

/// The writer thread's copy of what the state says.
struct Names {
    shards: Vec<Shard>,
    refused: Vec<(ObjectRef, String)>,
    ignored_claims: Vec<crate::model::Conflict>,
    /// No shard was written yet: all are, so that none keeps what an earlier agent wrote.
    first: bool,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            refused: Vec::new(),
            ignored_claims: Vec::new(),
            first: true,
        }
    }
}

impl Names {
    fn apply(&mut self, delta: Delta) {
        let mut inserted = vec![0_usize; self.shards.len()];
        for (frontend, target) in delta.frontends {
            let index = shard_of_frontend(&frontend);
            let (Some(shard), Some(inserted)) =
                (self.shards.get_mut(index), inserted.get_mut(index))
            else {
                continue;
            };
            let changed = match target {
                Some(target) => {
                    *inserted += 1;
                    shard
                        .frontends
                        .insert(frontend, target.clone())
                        .is_none_or(|old| *old != *target)
                }
                None => shard.frontends.remove(&frontend).is_some(),
            };
            shard.dirty |= changed;
        }
        for (shard, inserted) in self.shards.iter_mut().zip(inserted) {
            crate::memory::compact_after(&mut shard.frontends, inserted);
        }
        for (service, why) in delta.not_in_datapath {
            let Some(shard) = self.shards.get_mut(shard_of_service(&service)) else {
                continue;
            };
            let changed = match why {
                Some(why) => shard
                    .not_in_datapath
                    .insert(service, why.clone())
                    .is_none_or(|old| old != why),
                None => shard.not_in_datapath.remove(&service).is_some(),
            };
            shard.dirty |= changed;
        }
        self.refused = delta.refused;
        self.ignored_claims = delta.ignored_claims;
    }

    /// Writes the shards that changed, then the head file (what is not in shards).
    fn write(
        &mut self,
        dir: &Path,
        synced_at_ms: u64,
        cgroup: &Path,
        node: &str,
    ) -> Result<(), StateError> {
        let shard_dir = dir.join(SHARD_DIR);
        std::fs::create_dir_all(&shard_dir).map_err(|source| StateError::Write {
            path: shard_dir.clone(),
            source,
        })?;
        for (index, shard) in self.shards.iter_mut().enumerate() {
            if !(shard.dirty || self.first) {
                continue;
            }
            let view = ShardView { shard, node };
            write_atomically(&shard_dir.join(shard_file(index)), &view)?;
            shard.dirty = false;
        }
        self.first = false;
        let head = State {
            synced_at_ms,
            cgroup: cgroup.into(),
            node: node.into(),
            frontends: Vec::new(),
            not_in_datapath: Vec::new(),
            refused: self
                .refused
                .iter()
                .map(|(service, why)| Unserved {
                    service: service.to_string(),
                    why: why.clone(),
                })
                .collect(),
            ignored_claims: self
                .ignored_claims
                .iter()
                .map(|conflict| IgnoredClaim {
                    frontend: conflict.frontend,
                    service: conflict.ignored.to_string(),
                    kept_by: conflict.kept.to_string(),
                })
                .collect(),
        };
        write_atomically(&dir.join(FILE), &head)
    }
}

fn shard_file(index: usize) -> String {
    format!("{index:03}.json")
}

/// Replaces `path` with `value` as JSON atomically, so a reader never sees half of it; the
/// file is root's alone (0600: the Services and endpoints of the node are not for every
/// user).
fn write_atomically(path: &Path, value: &impl Serialize) -> Result<(), StateError> {
    write_private(path, value)
}

/// Writes `value` as JSON to `path` through a temporary file created afresh beside it
/// (O_EXCL, which follows no link) with mode 0600, then renamed over it.
pub(crate) fn write_private(path: &Path, value: &impl Serialize) -> Result<(), StateError> {
    let mode = 0o600;
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    // A temp file an interrupted write left goes first: the new one is created afresh
    // (O_EXCL, which follows no link), with `mode`.
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(error)?;
    let mut file = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut file, value)
        .map_err(std::io::Error::other)
        .map_err(error)?;
    std::io::Write::flush(&mut file).map_err(error)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(error)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StateError::Read {
                path: path.into(),
                reason: e.to_string(),
            });
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| StateError::Read {
            path: path.into(),
            reason: e.to_string(),
        })
}

impl State {
    /// The state in `dir` with every shard, or `None` if no agent wrote one there.
    pub fn read(dir: &Path) -> Result<Option<Self>, StateError> {
        let Some(mut state) = read_json::<State>(&dir.join(FILE))? else {
            return Ok(None);
        };
        let shard_dir = dir.join(SHARD_DIR);
        for index in 0..SHARDS {
            if let Some(shard) = read_json::<ShardFile>(&shard_dir.join(shard_file(index)))? {
                state.frontends.extend(shard.frontends);
                state.not_in_datapath.extend(shard.not_in_datapath);
            }
        }
        state.frontends.sort_by_key(|names| names.frontend);
        state
            .not_in_datapath
            .sort_by(|a, b| a.service.cmp(&b.service));
        Ok(Some(state))
    }
}

/// Writes state files on a thread of its own, so that a sync does not wait for frontends
/// to be serialized: it hands over a [`Delta`] and goes on. The thread applies every delta
/// in order to its own copy, and when they come faster than files are written, writes
/// once for all that came meanwhile. It logs "state file written" once, after its first
/// write: from then on the CLI sees what the agent programmed.
pub struct StateWriter {
    deltas: Option<mpsc::Sender<Delta>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StateWriter {
    pub fn spawn(
        dir: PathBuf,
        cgroup: PathBuf,
        node: String,
        on_error: impl Fn(&StateError) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (deltas, received) = mpsc::channel::<Delta>();
        let thread = std::thread::Builder::new()
            .name("lb-state".into())
            .spawn(move || {
                let mut names = Names::default();
                while let Ok(delta) = received.recv() {
                    let started = std::time::Instant::now();
                    names.apply(delta);
                    while let Ok(delta) = received.try_recv() {
                        names.apply(delta);
                    }
                    let first = names.first;
                    let written = names.write(&dir, now_ms(), &cgroup, &node);
                    if started.elapsed() >= crate::memory::RELEASE_AFTER {
                        crate::memory::release_freed();
                    }
                    match written {
                        Ok(()) if first => tracing::info!(
                            dir = %dir.display(),
                            elapsed_ms = started.elapsed().as_millis(),
                            "state file written"
                        ),
                        Ok(()) => {}
                        Err(e) => on_error(&e),
                    }
                }
            })?;
        Ok(Self {
            deltas: Some(deltas),
            thread: Some(thread),
        })
    }

    pub fn write(&mut self, delta: Delta) {
        if let Some(deltas) = &self.deltas {
            // The thread ends only when this sender is dropped.
            drop(deltas.send(delta));
        }
    }
}

impl Drop for StateWriter {
    /// Waits for the last snapshot to be written, so a stopped agent leaves its last state.
    fn drop(&mut self) {
        self.deltas = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the state file writer panicked");
        }
    }
}

/// Marks the agent as running: its pid, in the state directory, until [`AgentPid`] drops.
pub struct AgentPid {
    path: PathBuf,
}

impl AgentPid {
    pub fn create(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(PID_FILE);
        let error = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        ensure_private_dir(dir)?;
        write_private(&path, &std::process::id()).map_err(|e| match e {
            StateError::Write { source, .. } => error(source),
            other => other,
        })?;
        Ok(Self { path })
    }
}

impl Drop for AgentPid {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("removing {}: {e}", self.path.display());
        }
    }
}

/// The pid of the agent that uses `dir`, if one is running.
pub fn running_agent(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // A stale file from an agent that was killed names a dead or reused pid.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    (args.get(1) == Some(&b"agent".as_slice())).then_some(pid)
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::MetadataExt as _, path::Path};

    use super::*;
    use crate::model::{self, Node};

    fn desired_of(yaml: &str) -> Desired {
        let (services, slices) = model::load(yaml);
        let node = Node {
            name: "node-1".into(),
            ips: Vec::new(),
            zone: None,
        };
        model::desired(&services, &slices, &node)
    }

    fn services(n: usize, ready: bool) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n\
                     ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                     addressType: IPv4\nendpoints: [{{addresses: [10.244.0.1], conditions: {{ready: {ready}}}}}]\nports: [{{port: 8080}}]\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .chain(std::iter::once(
                "---\napiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None}\n".to_owned(),
            ))
            .collect()
    }

    fn everything(desired: &Desired) -> Delta {
        let frontends: Vec<Frontend> = desired.frontends().map(|(f, _)| *f).collect();
        let services: Vec<ObjectRef> = desired.not_in_datapath.keys().cloned().collect();
        Delta::of(desired, &services, &frontends, Vec::new())
    }

    /// Each shard file's inode: a rewritten shard is a new file renamed into place.
    fn inodes(dir: &Path) -> Vec<u64> {
        (0..SHARDS)
            .map(|i| {
                std::fs::metadata(dir.join(SHARD_DIR).join(shard_file(i)))
                    .unwrap()
                    .ino()
            })
            .collect()
    }

    #[test]
    fn the_shards_read_back_as_one_state_and_a_change_rewrites_only_its_shard() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = Path::new("/sys/fs/cgroup/test");
        let desired = desired_of(&services(1000, true));
        let mut names = Names::default();
        names.apply(everything(&desired));
        names.write(dir.path(), 1, cgroup, "node-1").unwrap();

        let state = State::read(dir.path()).unwrap().unwrap();
        assert_eq!(state.frontends.len(), 1000);
        assert!(state.frontends.is_sorted_by_key(|f| f.frontend));
        assert_eq!(state.frontends[0].service, "default/s0");
        assert_eq!(state.frontends[0].endpoints.len(), 1);
        assert_eq!(state.frontends[0].endpoints[0].excluded, None);
        assert_eq!(state.not_in_datapath.len(), 1);
        assert_eq!(state.not_in_datapath[0].service, "default/db");
        assert_eq!(state.node, "node-1");

        // One Service's endpoint turns not ready: one shard is written again.
        let before = inodes(dir.path());
        let changed = desired_of(&services(1000, true).replacen("ready: true", "ready: false", 1));
        let frontend = *changed.frontends().next().unwrap().0;
        names.apply(Delta::of(&changed, [], [&frontend], Vec::new()));
        names.write(dir.path(), 2, cgroup, "node-1").unwrap();
        let after = inodes(dir.path());
        let rewritten = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(rewritten, 1);
        let state = State::read(dir.path()).unwrap().unwrap();
        assert_eq!(state.synced_at_ms, 2);
        let names = state
            .frontends
            .iter()
            .find(|n| n.frontend == frontend)
            .unwrap();
        assert_eq!(names.endpoints[0].excluded.as_deref(), Some("not ready"));
    }

    #[test]
    fn a_new_agent_rewrites_every_shard_so_none_keeps_an_earlier_agents_frontends() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = Path::new("/sys/fs/cgroup/test");
        let mut earlier = Names::default();
        earlier.apply(everything(&desired_of(&services(300, true))));
        earlier.write(dir.path(), 1, cgroup, "node-1").unwrap();

        let mut later = Names::default();
        later.apply(everything(&desired_of(&services(2, true))));
        later.write(dir.path(), 2, cgroup, "node-1").unwrap();
        let state = State::read(dir.path()).unwrap().unwrap();
        assert_eq!(state.frontends.len(), 2);
    }
}
