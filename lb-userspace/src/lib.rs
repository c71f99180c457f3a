//! lb's agent and CLI as a library, its modules in data-flow order:
//!
//! - [`source`]: where objects come from (a manifest directory, the Kubernetes API), each
//!   read and converted into its model where it is read;
//! - [`store`]: the last good version of every object, kept by deltas, with its problems;
//! - [`model`]: the frontends each Service claims and what they lead to;
//! - [`plan`]: the map writes that bring the maps from what they hold to what is desired;
//! - [`maps`]: the BPF maps and programs themselves.
//!
//! [`agent`] drives them; nothing flows back up. [`cli`] holds the read-only commands. The
//! `lb` binary (main.rs) parses the command line and calls in here; the benchmarks
//! (`benches/`) drive the sync path without a kernel.

// Its sync errors carry the datapath's error whole; clippy weighs them only now that the
// module is public.
#[allow(clippy::result_large_err)]
pub mod agent;
pub mod cli;
pub mod dirs;
pub mod dns;
pub mod features;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod node_ports;
pub mod plan;
pub mod sockets;
pub mod source;
pub mod state;
pub mod store;

/// Where the agent pins its links and maps unless told otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/lb";
