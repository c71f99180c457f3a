//! The deployment manifests parse into the Kubernetes API types with no field left over,
//! and say what the agent needs.

#![expect(
    clippy::unwrap_used,
    reason = "a test fails by panicking, with the error"
)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn manifests() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no manifests in {}", dir.display());
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(document).unwrap();
            if !value.is_null() {
                out.push((path.clone(), serde_yaml::from_value(value).unwrap()));
            }
        }
    }
    out
}

/// Paths present in `original` that did not survive the typed round trip: fields the API
/// type does not have (a typo, or a field of another version).
fn lost(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => {
            for (key, value) in original {
                let here = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed) => lost(value, typed, &here, out),
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(original), Value::Array(typed)) => {
            for (index, value) in original.iter().enumerate() {
                match typed.get(index) {
                    Some(typed) => lost(value, typed, &format!("{path}[{index}]"), out),
                    None => out.push(format!("{path}[{index}]")),
                }
            }
        }
        _ => {}
    }
}

fn strict<T: DeserializeOwned + Serialize>(path: &Path, value: &Value) -> T {
    let typed: T =
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut unknown = Vec::new();
    lost(
        value,
        &serde_json::to_value(&typed).unwrap(),
        "",
        &mut unknown,
    );
    assert!(
        unknown.is_empty(),
        "{}: unknown fields {unknown:?}",
        path.display()
    );
    typed
}

#[test]
fn every_manifest_is_a_known_api_object_without_unknown_fields() {
    let mut kinds = Vec::new();
    for (path, value) in manifests() {
        let kind = value["kind"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "ServiceAccount" => drop(strict::<ServiceAccount>(&path, &value)),
            "ClusterRole" => drop(strict::<ClusterRole>(&path, &value)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(&path, &value)),
            "DaemonSet" => drop(strict::<DaemonSet>(&path, &value)),
            other => panic!("{}: unexpected kind {other}", path.display()),
        }
        kinds.push(kind);
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
}

#[test]
fn the_lost_field_check_catches_a_typo() {
    let value = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "lb", "namespce": "kube-system"},
    });
    let typed: ServiceAccount = serde_json::from_value(value.clone()).unwrap();
    let mut unknown = Vec::new();
    lost(
        &value,
        &serde_json::to_value(&typed).unwrap(),
        "",
        &mut unknown,
    );
    assert_eq!(unknown, [".metadata.namespce"]);
}

#[test]
fn the_daemonset_gives_the_agent_what_it_needs() {
    let (path, value) = manifests()
        .into_iter()
        .find(|(_, v)| v["kind"] == "DaemonSet")
        .unwrap();
    let daemonset: DaemonSet = strict(&path, &value);
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let container = &pod.containers[0];
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged);
    assert_eq!(privileged, Some(true));
    // The pods' processes, whose sockets it terminates when their backend leaves.
    assert_eq!(pod.host_pid, Some(true));
    let mounts: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/run/lb/cgroupv2"),
        "{mounts:?}"
    );
    let probe_path = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(
        probe_path(&container.liveness_probe).as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        probe_path(&container.readiness_probe).as_deref(),
        Some("/readyz")
    );
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--metrics-addr=0.0.0.0:9965".to_owned()),
        "{args:?}"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("lb"));
}
