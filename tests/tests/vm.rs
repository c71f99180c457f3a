//! The VM definitions for the benchmark: this machine cannot boot VMs, so the lima.yaml is
//! parsed and checked, and the Vagrantfile is checked with `vagrant validate` where vagrant
//! is installed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use lb_tests::binary;

fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vm")
}

#[test]
fn the_lima_vm_is_debian_12_with_rustup_for_root() {
    let text = std::fs::read_to_string(vm_dir().join("lima.yaml")).unwrap();
    let lima: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let images = lima["images"].as_sequence().unwrap();
    let arches: Vec<&str> = images.iter().filter_map(|i| i["arch"].as_str()).collect();
    assert_eq!(arches, ["x86_64", "aarch64"]);
    for image in images {
        let location = image["location"].as_str().unwrap();
        assert!(
            location.contains("bookworm") && location.contains("debian-12"),
            "{location}"
        );
    }
    let scripts: Vec<&str> = lima["provision"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["mode"].as_str(), Some("system"));
            p["script"].as_str().unwrap()
        })
        .collect();
    assert!(
        scripts
            .iter()
            .any(|s| s.contains("sh.rustup.rs") && s.contains("rust-src"))
    );
    assert_eq!(
        lima["mounts"].as_sequence().map(Vec::len),
        Some(0),
        "the VM must not write to the host"
    );
    assert!(lima["cpus"].as_u64().unwrap() >= 2);
}

#[test]
fn the_vagrantfile_validates() {
    let dir = vm_dir();
    let text = std::fs::read_to_string(dir.join("Vagrantfile")).unwrap();
    assert!(text.contains("config.vm.box = \"debian/bookworm64\""));
    assert!(text.contains("rsync__exclude"));
    let vagrant = Command::new("vagrant").arg("--version").output();
    if !vagrant.is_ok_and(|o| o.status.success()) {
        eprintln!("vagrant is not installed: `vagrant validate` not run");
        return;
    }
    let output = Command::new("vagrant")
        .arg("validate")
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn vm_commands_say_what_is_missing() {
    // Neither provider is on this machine: the command says so in one line, without panic.
    for (provider, tool) in [("lima", "limactl"), ("vagrant", "vagrant")] {
        if Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            continue;
        }
        let output = Command::new(binary("xtask").unwrap())
            .args(["vm", "up", "--provider", provider])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("{tool} not found")), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
