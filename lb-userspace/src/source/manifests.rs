//! A directory of manifests, watched with notify. A file that cannot be read keeps its last
//! good objects; a file that is gone takes its objects with it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, CreateKind, ModifyKind},
};

use super::{Change, Changes, SourceError};
use crate::{
    manifest::{self, ApiObject, Document, Kind, ManifestError},
    model::ObjectRef,
    store::{Delivered, Problems, Store},
};

/// How long a file must go without a write before it is read while still open: a writer
/// that never closes its file is taken to be done by then.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Files written to but not closed yet, with the time of their last write: a half-written
/// file whose prefix happens to be valid YAML must not be applied.
type Unsettled = Arc<Mutex<BTreeMap<PathBuf, Instant>>>;

pub struct Manifests {
    dir: PathBuf,
    unsettled: Unsettled,
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
    documents: Vec<Held>,
}

/// One document of a file; the object goes once the store has it (see
/// [`Manifests::let_go`]).
struct Held {
    kind: Kind,
    id: ObjectRef,
    object: Option<Result<ApiObject, ManifestError>>,
}

impl From<Document> for Held {
    fn from(document: Document) -> Self {
        Self {
            kind: document.kind,
            id: document.id,
            object: Some(document.object),
        }
    }
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
        let unsettled = Unsettled::default();
        let writes = unsettled.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let now = Instant::now();
                let change = match event {
                    Ok(event) => {
                        let mut writes = writes.lock().unwrap_or_else(PoisonError::into_inner);
                        match written(&event.kind) {
                            None => return,
                            Some(true) => {
                                for path in event.paths {
                                    writes.insert(path, now);
                                }
                                Change::Unsettled(now)
                            }
                            Some(false) => {
                                for path in &event.paths {
                                    writes.remove(path);
                                }
                                Change::Complete(now)
                            }
                        }
                    }
                    // An event lost (queue overflow): read everything that changed.
                    Err(_) => Change::Complete(now),
                };
                // The receiver is gone only while shutting down.
                drop(changes.send(change));
            })
            .map_err(watch_error)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(Self {
            dir: dir.into(),
            unsettled,
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
        let now = Instant::now();
        let unsettled: Vec<PathBuf> = {
            let mut writes = self
                .unsettled
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A write older than SETTLE is taken as done, closed or not.
            writes.retain(|_, at| now.duration_since(*at) < SETTLE);
            writes.keys().cloned().collect()
        };
        let changed = paths
            .into_iter()
            // Still being written: its last objects stay until it is closed or settles.
            .filter(|path| !unsettled.contains(path))
            .map(|path| {
                let version = Version::of(&path);
                (path, version)
            })
            // An unchanged file is not read again: one edited Service in a directory of
            // thousands costs one file, not the directory.
            .filter(|(path, version)| {
                version.is_none() || self.files.get(path).map(|f| Some(f.version)) != Some(*version)
            })
            .collect();
        problems.extend(self.read(changed));
        let mut delivered = self.deliver(store);
        // A file let go of an object the store needs again (a duplicate definition that
        // takes over when the first goes): read those files again and deliver once more.
        let wanted = store.take_wanted();
        if !wanted.is_empty() {
            let rereads = self
                .files
                .iter()
                .filter(|(_, file)| {
                    file.documents
                        .iter()
                        .any(|d| wanted.contains(&(d.kind, d.id.clone())))
                })
                .map(|(path, _)| (path.clone(), Version::of(path)))
                .collect();
            problems.extend(self.read(rereads));
            delivered = self.deliver(store);
            problems.extend(store.take_wanted().into_iter().map(|(kind, id)| {
                format!(
                    "{kind} {id}: its remaining definition could not be read again; the one from a removed file stays in effect until it can be"
                )
            }));
        }
        problems.extend(delivered);
        self.let_go(store);
        Ok(problems)
    }

    /// Whether files are being written.
    #[cfg(test)]
    fn unsettled(&self) -> bool {
        !self
            .unsettled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Reads files (several at once when that pays); a file that fails keeps its last good
    /// objects, and the problem says so.
    fn read(&mut self, files: Vec<(PathBuf, Option<Version>)>) -> Problems {
        let mut problems = Vec::new();
        // `kubectl get … > file` truncates before it writes: an empty file that had
        // objects is most likely half-written, so they stay until it has content again
        // (or is removed).
        let (half_written, files): (Vec<_>, Vec<_>) =
            files.into_iter().partition(|(path, version)| {
                version.is_some_and(|v| v.len == 0) && self.files.contains_key(path)
            });
        problems.extend(half_written.into_iter().map(|(path, _)| {
            format!(
                "{}: empty; its last objects stay in effect until it has content or is removed",
                path.display()
            )
        }));
        let sized: Vec<(&Path, u64)> = files
            .iter()
            .map(|(path, version)| (path.as_path(), version.map_or(0, |v| v.len)))
            .collect();
        let read = manifest::read_files(&sized);
        for ((path, version), read) in files.into_iter().zip(read) {
            match read {
                Ok(documents) => {
                    if let Some(version) = version {
                        self.reads += 1;
                        let file = File {
                            version,
                            read: self.reads.to_string(),
                            origin: format!("{}: ", path.display()),
                            documents: documents.into_iter().map(Held::from).collect(),
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
        problems
    }

    /// Delivers every file's objects, the complete set, to `store`.
    fn deliver(&self, store: &mut Store) -> Problems {
        store.update(self.files.values().flat_map(|file| {
            file.documents.iter().map(move |document| Delivered {
                kind: document.kind,
                id: &document.id,
                version: &file.read,
                object: document
                    .object
                    .as_ref()
                    .map(|object| object.as_ref().map_err(ToString::to_string)),
                origin: &file.origin,
            })
        }))
    }

    /// Drops the parsed objects whose version the store holds: at 100k Services they would
    /// weigh hundreds of MiB, and an unchanged version is never converted again. Objects
    /// defined more than once stay, so that one can take over from another without a read.
    fn let_go(&mut self, store: &Store) {
        for file in self.files.values_mut() {
            for document in &mut file.documents {
                if matches!(document.object, Some(Ok(_)))
                    && store.holds(document.kind, &document.id, &file.read)
                    && !store.defined_twice(document.kind, &document.id)
                {
                    document.object = None;
                }
            }
        }
    }
}

/// What an event says of its files: `Some(true)` while they are being written (created,
/// modified, not closed yet), `Some(false)` when they are complete (closed after writing,
/// renamed into or out of place, removed, their attributes changed), `None` for events
/// that change nothing (opened, read, closed unwritten).
fn written(kind: &EventKind) -> Option<bool> {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(false),
        EventKind::Access(_) => None,
        EventKind::Create(CreateKind::Folder) => Some(false),
        EventKind::Create(_) => Some(true),
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => Some(true),
        _ => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Desired, Node};

    fn service(cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    /// A watched manifest directory and the store and model it feeds.
    struct Fixture {
        dir: tempfile::TempDir,
        manifests: Manifests,
        store: Store,
        desired: Desired,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (changes, _) = tokio::sync::mpsc::unbounded_channel();
            let manifests = Manifests::watch(dir.path(), changes).unwrap();
            Self {
                dir,
                manifests,
                store: Store::default(),
                desired: Desired::default(),
            }
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join(name), text).unwrap();
        }

        fn remove(&self, name: &str) {
            std::fs::remove_file(self.dir.path().join(name)).unwrap();
        }

        /// The addresses of the frontends after one refresh, and its problems.
        fn refresh(&mut self) -> (Vec<String>, Problems) {
            // The watcher's thread sees the writes' close events a moment later.
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.manifests.unsettled() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let problems = self.manifests.refresh(&mut self.store).unwrap();
            let changed = self.store.take_changed();
            self.desired.update(
                changed.iter().map(|id| (id, self.store.service(id))),
                &Node::default(),
            );
            let frontends = self
                .desired
                .frontends()
                .map(|(f, _)| f.address.to_string())
                .collect();
            (frontends, problems)
        }
    }

    #[test]
    fn objects_let_go_of_come_back_when_a_duplicate_takes_over() {
        let mut fixture = Fixture::new();
        fixture.write("a.yaml", &service("10.96.0.10"));
        fixture.write("b.yaml", &service("10.96.0.99"));
        assert_eq!(fixture.refresh().0, ["10.96.0.10"]);
        // Defined twice: both objects are kept, so b's takes over without a read.
        fixture.remove("a.yaml");
        assert_eq!(fixture.refresh().0, ["10.96.0.99"]);

        // b's object was let go once it alone defined the Service; a's comes back and wins,
        // then goes again: b's is read again.
        fixture.write("a.yaml", &service("10.96.0.10"));
        assert_eq!(fixture.refresh().0, ["10.96.0.10"]);
        fixture.remove("a.yaml");
        assert_eq!(fixture.refresh().0, ["10.96.0.99"]);
    }

    #[test]
    fn a_definition_that_cannot_be_read_again_leaves_the_last_one_in_effect() {
        let mut fixture = Fixture::new();
        fixture.write("b.yaml", &service("10.96.0.99"));
        fixture.refresh();
        fixture.write("a.yaml", &service("10.96.0.10"));
        fixture.refresh();

        // a goes while b is half-written (`kubectl get > b.yaml` truncates first).
        fixture.remove("a.yaml");
        fixture.write("b.yaml", "");
        let (frontends, problems) = fixture.refresh();
        assert_eq!(frontends, ["10.96.0.10"]);
        assert!(
            problems.iter().any(|p| p
                .contains("Service default/web: its remaining definition could not be read again")),
            "{problems:?}"
        );

        fixture.write("b.yaml", &service("10.96.0.99"));
        let (frontends, problems) = fixture.refresh();
        assert_eq!(frontends, ["10.96.0.99"]);
        assert!(problems.is_empty(), "{problems:?}");
    }
}
