//! lb's agent and CLI as a library: source → store → model → plan → maps, and the
//! read-only commands. The `lb` binary (main.rs) parses the command line and calls in here;
//! the benchmarks (`benches/`) drive the sync path without a kernel.

// Its sync errors carry the datapath's error whole; clippy weighs them only now that the
// module is public.
#[allow(clippy::result_large_err)]
pub mod agent;
pub mod api;
pub mod bpf;
pub mod cli;
pub mod datapath;
pub mod hash;
pub mod links;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod mounts;
pub mod netns;
pub mod plan;
pub mod source;
pub mod state;
pub mod store;

/// Where the agent pins its links and maps unless told otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";
