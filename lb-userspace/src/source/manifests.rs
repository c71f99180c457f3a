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
    files: BTreeMap<PathBuf, File>,
    /// Files read so far: each read gets its own number, the version of its objects.
    reads: u64,
    _watcher: notify::RecommendedWatcher,
}

struct File {
    /// The file as it was when read.
    version: Version,
    /// The version of the objects read from it.
    read: String,
    /// `"path: "`, what model errors of its objects start with.
    origin: String,
    documents: Vec<Document>,
}

/// What tells a file that changed from one that did not, without reading it: editors and
/// `kubectl get > file` replace or rewrite it, changing one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl Version {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            inode: metadata.ino(),
        })
    }
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
            reads: 0,
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
            let version = Version::of(&path);
            // An unchanged file is not read again: one edited Service in a directory of
            // thousands costs one file, not the directory.
            if version.is_some() && self.files.get(&path).map(|f| Some(f.version)) == Some(version)
            {
                continue;
            }
            // `kubectl get … > file` truncates before it writes: an empty file that had
            // objects is most likely half-written, so they stay until it has content again
            // (or is removed).
            if version.is_some_and(|v| v.len == 0) && self.files.contains_key(&path) {
                problems.push(format!(
                    "{}: empty; its last objects stay in effect until it has content or is removed",
                    path.display()
                ));
                continue;
            }
            match manifest::read_file(&path) {
                Ok(documents) => {
                    if let Some(version) = version {
                        self.reads += 1;
                        let file = File {
                            version,
                            read: self.reads.to_string(),
                            origin: format!("{}: ", path.display()),
                            documents,
                        };
                        self.files.insert(path, file);
                    }
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
        let delivered = self.files.values().flat_map(|file| {
            file.documents.iter().map(move |document| Delivered {
                kind: document.kind,
                id: &document.id,
                version: &file.read,
                object: document.object.as_ref().map_err(ToString::to_string),
                origin: &file.origin,
            })
        });
        problems.extend(store.update(delivered));
        Ok(problems)
    }
}
