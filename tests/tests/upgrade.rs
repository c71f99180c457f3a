//! An agent of this map layout starting over the pins of the previous one (`lb4_svc_v3`,
//! `lb4_backend_v1` and `lb4_cip_v1`, IPv4 addresses in 4 bytes, before IPv6 frontends):
//! the previous layout's programs keep translating until the new agent's maps are filled,
//! then they are detached and their maps unpinned — and a client connecting back to back
//! throughout never fails.
//!
//! The previous layout is the real one: its eBPF object is built from this repository's
//! history (the last commit with that layout), then loaded, attached, pinned and filled
//! as an agent of that version left them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::HashMap,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, links::FdLink},
};
use lb_common::{
    IPPROTO_TCP, MASTER_SLOT, PREVIOUS_LAYOUT_MAPS, PROGRAMS, ipv4_to_map, port_to_map,
};
use lb_tests::{
    Probe, Testbed, assert_no_failed_connects, finish_probes, privileged, run, wait_for,
};

/// The last commit whose datapath has the previous layout.
const PREVIOUS_LAYOUT_COMMIT: &str = "c0b032a4b454236a2ca0c6a0e496fd8056138ac2";

/// The previous layout's service map key: an IPv4 frontend.
#[repr(C)]
#[derive(Clone, Copy)]
struct PreviousServiceKey {
    address: u32,
    port: u16,
    slot: u16,
    protocol: u8,
    _pad: [u8; 3],
}

/// The previous layout's service map value: a slot held its IPv4 backend.
#[repr(C)]
#[derive(Clone, Copy)]
struct PreviousServiceValue {
    backend_id: u32,
    backend_address: u32,
    backend_port: u16,
    count: u16,
    flags: u16,
    _pad: u16,
    frontend_id: u32,
    affinity_timeout_s: u32,
}

/// The previous layout's backend map value.
#[repr(C)]
#[derive(Clone, Copy)]
struct PreviousBackend {
    address: u32,
    port: u16,
    _pad: u16,
}

// SAFETY: `#[repr(C)]` with no padding (4 + 2 + 2 + 1 + 3, 4 + 4 + 2 + 2 + 2 + 2 + 4 + 4 and
// 4 + 2 + 2 bytes): every bit pattern is a valid value.
unsafe impl aya::Pod for PreviousServiceKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PreviousServiceValue {}
// SAFETY: as above.
unsafe impl aya::Pod for PreviousBackend {}

/// The previous layout's programs: this one's but `sendmsg6`.
const PREVIOUS_SOCK_ADDR_PROGRAMS: [&str; 7] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "recvmsg6",
    "getpeername6",
];
const PREVIOUS_SOCK_PROGRAMS: [&str; 2] = ["post_bind4", "post_bind6"];

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8888}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.10]}, {addresses: [10.244.0.11]}]
ports: [{name: http, port: 8888}]
";

/// The previous layout's eBPF object, built once per checkout (under `target/`) from the
/// repository's history.
fn previous_layout_object() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no workspace root"))?;
    let dir = root
        .join("target/previous-layout")
        .join(PREVIOUS_LAYOUT_COMMIT);
    let object = dir.join("target/bpfel-unknown-none/release/lb-ebpf");
    if object.exists() {
        return Ok(object);
    }
    let source = dir.join("source");
    drop(std::fs::remove_dir_all(&source));
    std::fs::create_dir_all(&source)?;
    let archive = dir.join("source.tar");
    run(Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", "-o"])
        .arg(&archive)
        .args([
            PREVIOUS_LAYOUT_COMMIT,
            "Cargo.toml",
            "Cargo.lock",
            "lb-common",
            "lb-ebpf",
        ]))?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&source))?;
    // A workspace of the two crates the object is built from.
    let manifest = std::fs::read_to_string(source.join("Cargo.toml"))?
        .lines()
        .map(|line| {
            if line.starts_with("members = ") {
                r#"members = ["lb-common", "lb-ebpf"]"#
            } else if line.starts_with("default-members = ") {
                ""
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(source.join("Cargo.toml"), manifest)?;
    // As lb-userspace's build script (aya-build) builds the current one.
    run(Command::new("cargo")
        .current_dir(&source)
        .args(["+nightly", "build", "--release", "-p", "lb-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(dir.join("target"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))?;
    Ok(object)
}

/// Loads the previous layout's programs as its agent did — maps pinned by name in `bpffs`,
/// each program attached to `cgroup` through a link pinned as `lb_<program>` — and
/// programs Service 10.96.0.10:80 with `backends` (port 8888).
fn load_previous_layout(
    object: &Path,
    bpffs: &Path,
    cgroup: &Path,
    backends: &[[u8; 4]],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(bpffs)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpffs)
        .load_file(object)?;
    let cgroup = std::fs::File::open(cgroup)?;
    // The two program types share no trait for loading and attaching.
    macro_rules! attach_and_pin {
        ($kind:ty, $names:expr) => {
            for name in $names {
                let program: &mut $kind = ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow::anyhow!("no program {name}"))?
                    .try_into()?;
                program.load()?;
                let link = program.attach(&cgroup, CgroupAttachMode::Single)?;
                let link: FdLink = program.take_link(link)?.try_into()?;
                link.pin(bpffs.join(format!("lb_{name}")))?;
            }
        };
    }
    attach_and_pin!(CgroupSockAddr, PREVIOUS_SOCK_ADDR_PROGRAMS);
    attach_and_pin!(CgroupSock, PREVIOUS_SOCK_PROGRAMS);
    let mut slots = Vec::new();
    {
        let mut map: HashMap<_, u32, PreviousBackend> = ebpf
            .map_mut("lb4_backend_v1")
            .ok_or_else(|| anyhow::anyhow!("no backend map"))?
            .try_into()?;
        for (index, address) in backends.iter().enumerate() {
            let id = u32::try_from(index)? + 1;
            let backend = PreviousBackend {
                address: ipv4_to_map(*address),
                port: port_to_map(8888),
                _pad: 0,
            };
            map.insert(id, backend, 0)?;
            slots.push(PreviousServiceValue {
                backend_id: id,
                backend_address: backend.address,
                backend_port: backend.port,
                count: 0,
                flags: 0,
                _pad: 0,
                frontend_id: 0,
                affinity_timeout_s: 0,
            });
        }
    }
    let mut services: HashMap<_, PreviousServiceKey, PreviousServiceValue> = ebpf
        .map_mut("lb4_svc_v3")
        .ok_or_else(|| anyhow::anyhow!("no service map"))?
        .try_into()?;
    let frontend = |slot: usize| -> anyhow::Result<PreviousServiceKey> {
        Ok(PreviousServiceKey {
            address: ipv4_to_map([10, 96, 0, 10]),
            port: port_to_map(80),
            slot: u16::try_from(slot)?,
            protocol: IPPROTO_TCP,
            _pad: [0; 3],
        })
    };
    for (index, slot) in slots.iter().enumerate() {
        services.insert(frontend(index + 1)?, slot, 0)?;
    }
    let master = PreviousServiceValue {
        backend_id: 0,
        backend_address: 0,
        backend_port: 0,
        count: u16::try_from(slots.len())?,
        flags: lb_common::FLAG_CLUSTER_IP,
        _pad: 0,
        frontend_id: 1,
        affinity_timeout_s: 0,
    };
    services.insert(frontend(usize::from(MASTER_SLOT))?, master, 0)?;
    // The pinned links keep the programs attached, and the pins keep the maps, once the
    // loader's descriptors close: as an agent of that version leaves them when it stops.
    Ok(())
}

/// The programs attached to `cgroup`, as bpftool lists them.
fn attached(cgroup: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = run(Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .arg("-j"))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn an_agent_takes_over_from_the_previous_layout_without_a_failed_connect() {
    if !privileged("an_agent_takes_over_from_the_previous_layout_without_a_failed_connect") {
        return;
    }
    let object = previous_layout_object().unwrap();
    let (mut testbed, _pods, client) = Testbed::with_backends(2, 8888).unwrap();
    load_previous_layout(
        &object,
        &testbed.bpffs,
        &testbed.cgroup,
        &[[10, 244, 0, 10], [10, 244, 0, 11]],
    )
    .unwrap();
    // The previous layout serves the Service on its own.
    let served: BTreeSet<String> = testbed
        .probe(&client, "10.96.0.10:80", 20)
        .unwrap()
        .iter()
        .filter_map(|probe| probe.hostname().map(str::to_owned))
        .collect();
    assert_eq!(served, BTreeSet::from(["web-0".into(), "web-1".into()]));

    testbed.write_manifest("web.yaml", SERVICE).unwrap();
    let prober = testbed
        .background_prober(&client, "10.96.0.10:80", 20_000, 5, 40_000)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    testbed.start_agent().unwrap();
    wait_for(
        "the takeover from the previous layout",
        Duration::from_secs(10),
        || {
            Ok(testbed
                .agent_output()
                .contains("took over from the previous layout")
                .then_some(()))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let probes = finish_probes(prober).unwrap();
    assert_no_failed_connects(&probes, 20, "during the takeover");

    // Only this layout's programs are attached, and the previous maps are gone.
    let programs = attached(&testbed.cgroup).unwrap();
    let mut names: Vec<&str> = programs
        .iter()
        .filter_map(|program| program["name"].as_str())
        .collect();
    names.sort_unstable();
    let mut expected = PROGRAMS.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected, "{programs:?}");
    for map in PREVIOUS_LAYOUT_MAPS {
        assert!(!testbed.bpffs.join(map).exists(), "{map} is still pinned");
    }
    // New sockets are this layout's: they reach both pods and show the Service.
    let probes = testbed.probe(&client, "10.96.0.10:80", 20).unwrap();
    assert!(
        probes.iter().all(|p| p.peer() == Some("10.96.0.10:80")),
        "{probes:?}"
    );
    let served: BTreeSet<&str> = probes.iter().filter_map(Probe::hostname).collect();
    assert_eq!(served, BTreeSet::from(["web-0", "web-1"]));
    let status: serde_json::Value =
        serde_json::from_str(&testbed.lb(&["status", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(status["layout"], "v4");
}
