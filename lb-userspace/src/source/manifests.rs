//! A directory of manifests, watched with notify. A file that cannot be read keeps its last
//! good objects; a file that is gone takes its objects with it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use notify::{RecursiveMode, Watcher as _};

use super::{Changes, SourceError};
use crate::{
    manifest::{self, Document, ManifestError},
    store::{Delivered, Problems, Store},
};

pub struct Manifests {
    dir: PathBuf,
    /// Last readable contents of each manifest.
    files: BTreeMap<PathBuf, Vec<Document>>,
    _watcher: notify::RecommendedWatcher,
}

impl Manifests {
    /// Starts watching `dir`; every change is sent to `changes`.
    pub fn watch(dir: &Path, changes: Changes) -> Result<Self, SourceError> {
        let watch_error = |source| SourceError::Watch {
            path: dir.into(),
            source,
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if event.kind.is_access() => {}
                // The receiver is gone only while shutting down.
                _ => drop(changes.send(Instant::now())),
            })
            .map_err(watch_error)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            _watcher: watcher,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory into `store`.
    pub fn refresh(&mut self, store: &mut Store) -> Result<Problems, ManifestError> {
        let paths = manifest::list(&self.dir)?;
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
        let delivered = self.files.iter().flat_map(|(path, documents)| {
            documents.iter().map(move |document| Delivered {
                kind: document.kind,
                id: document.id.clone(),
                object: document.object.as_ref().map_err(ToString::to_string),
                origin: format!("{}: ", path.display()),
            })
        });
        problems.extend(store.update(delivered));
        Ok(problems)
    }
}
