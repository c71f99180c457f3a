//! Reads Service and EndpointSlice objects from a directory of manifests, exactly as
//! `kubectl get -o yaml|json` writes them: multi-document YAML, JSON, and `kind: List`.
//!
//! Objects of other kinds (Deployments, Pods, …) are skipped, so a directory can hold a
//! whole application. Errors name the file, the object and the field.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize as _;

use crate::model::ObjectRef;

/// A Service or EndpointSlice, read from a manifest or shared with a reflector's store.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiObject {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
}

impl ApiObject {
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Service(service) => &service.metadata,
            Self::EndpointSlice(slice) => &slice.metadata,
        }
    }
}

/// The kinds the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object of a file: its identity, and the object or why it could not be read.
#[derive(Debug)]
pub struct Document {
    pub kind: Kind,
    pub id: ObjectRef,
    pub object: Result<ApiObject, ManifestError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML or JSON: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{path}: document {index}: {reason}")]
    Document {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{path}: {kind} {object}: {field}: {reason}")]
    Field {
        path: PathBuf,
        kind: Kind,
        object: ObjectRef,
        field: String,
        reason: String,
    },
}

/// Whether `path` is a manifest the agent reads (`*.yaml`, `*.yml`, `*.json`).
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The manifests in `dir`, sorted by name (not recursive, like `kubectl apply -f DIR`).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if is_manifest(&path) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Reads one file. `Err` means the file as a whole could not be read or parsed; errors of
/// single objects are in their [`Document`].
pub fn read_file(path: &Path) -> Result<Vec<Document>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses the text of `path`: every YAML document (JSON is YAML), `kind: List` unpacked.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Document>, ManifestError> {
    let mut documents = Vec::new();
    // One document at a time: a file of 100k objects never holds all of them untyped.
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(document).map_err(|e| ManifestError::Syntax {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let index = index + 1;
        if value.is_null() {
            continue;
        }
        let document_error = |reason: String| ManifestError::Document {
            path: path.to_owned(),
            index,
            reason,
        };
        match value.get("kind").and_then(serde_yaml::Value::as_str) {
            Some("List") => {
                let items = value
                    .get("items")
                    .and_then(serde_yaml::Value::as_sequence)
                    .ok_or_else(|| document_error("kind List without an items sequence".into()))?;
                for item in items {
                    documents.extend(object(path, item.clone()));
                }
            }
            Some(_) => documents.extend(object(path, value)),
            None => return Err(document_error("not an API object: no `kind`".into())),
        }
    }
    Ok(documents)
}

/// Types one object if it is a Service or an EndpointSlice; `None` for other kinds.
fn object(path: &Path, value: serde_yaml::Value) -> Option<Document> {
    let kind = match (
        value.get("apiVersion").and_then(serde_yaml::Value::as_str),
        value.get("kind").and_then(serde_yaml::Value::as_str),
    ) {
        (Some("v1"), Some("Service")) => Kind::Service,
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => Kind::EndpointSlice,
        _ => return None,
    };
    let metadata = value.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|m| m.get(name))
            .and_then(serde_yaml::Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let id = ObjectRef::new(
        field("namespace").unwrap_or_else(|| "default".into()),
        field("name").unwrap_or_else(|| "<unnamed>".into()),
    );
    let object = match kind {
        Kind::Service => typed::<Service>(value).map(|s| ApiObject::Service(Arc::new(s))),
        Kind::EndpointSlice => {
            typed::<EndpointSlice>(value).map(|s| ApiObject::EndpointSlice(Arc::new(s)))
        }
    }
    .map_err(|(field, reason)| ManifestError::Field {
        path: path.to_owned(),
        kind,
        object: id.clone(),
        field,
        reason,
    });
    Some(Document { kind, id, object })
}

/// Deserializes with the path of the offending field, e.g. `spec.ports[0].port`.
fn typed<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let reason = e.into_inner().to_string();
        (field, reason)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Vec<Document> {
        parse(Path::new("test.yaml"), text).unwrap()
    }

    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: httpenv
  namespace: default
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - port: 8888
    protocol: TCP
    targetPort: 8888
  selector:
    app: httpenv
  type: ClusterIP
"#;

    #[test]
    fn reads_multi_document_files_and_skips_other_kinds() {
        let text = format!(
            "{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: httpenv\n---\n"
        );
        let docs = parse_str(&text);
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].kind, Kind::Service);
        assert_eq!(docs[0].id, ObjectRef::new("default", "httpenv"));
        assert!(docs[0].object.is_ok());
    }

    #[test]
    fn unpacks_lists_and_reads_json() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
             "metadata":{"name":"httpenv-abc","labels":{"kubernetes.io/service-name":"httpenv"}},
             "addressType":"IPv4","endpoints":[{"addresses":["10.244.0.11"]}],
             "ports":[{"port":8888,"protocol":"TCP","name":""}]}]}"#;
        let docs = parse(Path::new("list.json"), json).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].kind, Kind::EndpointSlice);
        assert_eq!(docs[0].id, ObjectRef::new("default", "httpenv-abc"));
    }

    #[test]
    fn a_bad_field_names_file_object_and_field() {
        let text = SERVICE.replace("- port: 8888", "- port: eighty");
        let docs = parse_str(&text);
        let err = docs[0].object.as_ref().unwrap_err().to_string();
        assert!(
            err.starts_with("test.yaml: Service default/httpenv: spec.ports[0].port:"),
            "{err}"
        );
    }

    #[test]
    fn broken_yaml_fails_the_whole_file() {
        let err = parse(Path::new("bad.yaml"), "kind: Service\n  metadata: [\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bad.yaml: not valid YAML or JSON"),
            "{err}"
        );
    }

    #[test]
    fn a_document_without_kind_is_an_error() {
        let err = parse(Path::new("x.yaml"), "foo: bar\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.yaml: document 1: not an API object: no `kind`"
        );
    }

    #[test]
    fn only_manifest_extensions_are_read() {
        assert!(is_manifest(Path::new("/d/a.yaml")));
        assert!(is_manifest(Path::new("/d/a.yml")));
        assert!(is_manifest(Path::new("/d/a.json")));
        assert!(!is_manifest(Path::new("/d/a.yaml.swp")));
        assert!(!is_manifest(Path::new("/d/.a.yaml")));
        assert!(!is_manifest(Path::new("/d/README.md")));
    }
}
