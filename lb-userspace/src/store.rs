//! The agent's view of the manifest directory: the last good version of every file and
//! object, so that a bad edit leaves what was working in place.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{
    manifest::{self, ApiObject, Document, ManifestError},
    model::{self, Desired, Node, ObjectRef, ServiceModel, SliceModel},
};

#[derive(Default)]
pub struct Store {
    /// Last readable contents of each manifest.
    files: BTreeMap<PathBuf, Vec<Document>>,
    /// Last valid version of each object still present in some file.
    services: BTreeMap<ObjectRef, ServiceModel>,
    slices: BTreeMap<ObjectRef, SliceModel>,
}

/// A rescan's problems, each naming the file, object and field. What they concern keeps its
/// last good state.
pub type Problems = Vec<String>;

impl Store {
    /// Re-reads `dir`. A file that cannot be read keeps its last good objects; an object
    /// that is invalid keeps its last good version; a file or object that is gone is removed.
    pub fn rescan(&mut self, dir: &Path) -> Result<Problems, ManifestError> {
        let paths = manifest::list(dir)?;
        let mut problems = Vec::new();
        self.files.retain(|path, _| paths.contains(path));
        for path in paths {
            match manifest::read_file(&path) {
                Ok(documents) => {
                    self.files.insert(path, documents);
                }
                Err(e) => {
                    let kept = if self.files.contains_key(&path) {
                        "; its last good objects stay in effect"
                    } else {
                        ""
                    };
                    problems.push(format!("{e}{kept}"));
                }
            }
        }

        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for (path, documents) in &self.files {
            for document in documents {
                let outcome = match &document.object {
                    Ok(ApiObject::Service(service)) => ServiceModel::from_api(service)
                        .map(|m| {
                            services.insert(m.id.clone(), m);
                        })
                        .map_err(|e| format!("{}: {e}", path.display())),
                    Ok(ApiObject::EndpointSlice(slice)) => SliceModel::from_api(slice)
                        .map(|m| {
                            slices.insert(m.id.clone(), m);
                        })
                        .map_err(|e| format!("{}: {e}", path.display())),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(problem) = outcome {
                    let last_good = match document.kind {
                        manifest::Kind::Service => self.services.get(&document.id).map(|m| {
                            services.insert(m.id.clone(), m.clone());
                        }),
                        manifest::Kind::EndpointSlice => self.slices.get(&document.id).map(|m| {
                            slices.insert(m.id.clone(), m.clone());
                        }),
                    };
                    let kept = if last_good.is_some() {
                        "; its last good version stays in effect"
                    } else {
                        ""
                    };
                    problems.push(format!("{problem}{kept}"));
                }
            }
        }
        self.services = services;
        self.slices = slices;
        Ok(problems)
    }

    pub fn desired(&self, node: &Node) -> Desired {
        model::desired(self.services.values(), self.slices.values(), node)
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }
}
