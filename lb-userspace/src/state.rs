//! What the maps cannot say — which Service and port a frontend belongs to, and the Services
//! that have no frontend — written by the agent after each sync for the CLI to read, also
//! while the agent is stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{Desired, EndpointState, Frontend, FrontendKind, NotInDatapath};

/// Default directory of the state file.
pub const DEFAULT_STATE_DIR: &str = "/run/lb";
const FILE: &str = "services.json";
const PID_FILE: &str = "agent.pid";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// When the agent last brought the maps in line with its sources, in ms since the epoch.
    pub synced_at_ms: u64,
    /// The cgroup the agent attached the programs to.
    pub cgroup: PathBuf,
    /// The node name the agent applies traffic policies for.
    pub node: String,
    pub frontends: Vec<FrontendNames>,
    pub not_in_datapath: Vec<Unserved>,
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

impl State {
    pub fn of(desired: &Desired, cgroup: &Path, node: &str) -> Self {
        let synced_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            synced_at_ms,
            cgroup: cgroup.into(),
            node: node.into(),
            frontends: desired
                .frontends
                .iter()
                .map(|(frontend, target)| FrontendNames {
                    frontend: *frontend,
                    kind: target.kind,
                    service: target.service.to_string(),
                    port_name: target.port_name.clone(),
                    endpoints: target.endpoints.clone(),
                })
                .collect(),
            not_in_datapath: desired
                .not_in_datapath
                .iter()
                .map(|(service, why): (_, &NotInDatapath)| Unserved {
                    service: service.to_string(),
                    why: why.to_string(),
                })
                .collect(),
        }
    }

    /// Replaces the state file atomically, so a reader never sees half of it.
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(FILE);
        let error = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(error)?;
        let temp = dir.join(format!(".{FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .map_err(error)?;
        std::fs::write(&temp, text).map_err(error)?;
        std::fs::rename(&temp, &path).map_err(error)
    }

    /// The state file in `dir`, or `None` if no agent wrote one there.
    pub fn read(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StateError::Read {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StateError::Read {
                path,
                reason: e.to_string(),
            })
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
        std::fs::create_dir_all(dir).map_err(error)?;
        std::fs::write(&path, std::process::id().to_string()).map_err(error)?;
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
