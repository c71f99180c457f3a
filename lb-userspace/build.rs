//! Builds lb-ebpf for the BPF target so `src/maps/mod.rs` can embed the object.
use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("lb-ebpf");
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", root_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
