//! A directory of manifests, watched with notify. A file that cannot be read keeps its last
//! good objects; a file that is gone takes its objects with it.

use std::{
    collections::{BTreeMap, BTreeSet},
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
    source::parse::{self as manifest, ManifestError},
    store::{Delivered, Origin, Problem, Problems, Store, Unusable},
};

/// How long a file must go without a write before it is read while still open: a writer
/// that never closes its file is taken to be done by then.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What the watcher's events said since the last refresh.
struct Seen {
    /// Files written to but not closed yet, with the time of their last write: a
    /// half-written file whose prefix happens to be valid YAML must not be applied.
    unsettled: BTreeMap<PathBuf, Instant>,
    /// The manifests the events named: all a refresh looks at, so that one edited file
    /// in a directory of thousands costs that file, not a listing of the directory.
    named: BTreeSet<PathBuf>,
    /// An event was lost, or named something other than a manifest of the directory (a
    /// subdirectory, the `..data` link a ConfigMap volume swaps to replace every file at
    /// once): a refresh looks at every file.
    everything: bool,
    /// The directory itself was removed, created or renamed (deploy tools swap one in by
    /// rename): the watch on it stays with what it was, so a refresh watches the path again.
    replaced: bool,
}

type Shared = Arc<Mutex<Seen>>;

pub struct Manifests {
    dir: PathBuf,
    seen: Shared,
    /// The manifests read so far, as they were when read. Their objects live in the
    /// store, each file an origin of its own; nothing parsed is kept here.
    files: BTreeMap<PathBuf, File>,
    /// What is wrong with a file as a whole (it does not parse, it is empty), while it is.
    file_problems: BTreeMap<PathBuf, Problem>,
    /// Files read so far: each read gets its own number, the version of its objects.
    reads: u64,
    /// Refreshes that looked at every file: what tests count to show that an edit costs
    /// its file.
    #[cfg(test)]
    listings: usize,
    /// On the directory, and on its parent to see the directory itself replaced.
    watcher: notify::RecommendedWatcher,
}

struct File {
    /// The file as it was when read.
    version: Version,
    origin: Origin,
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
        // Absolute, so that it has a parent to watch; links are not resolved, so that the
        // path is followed, whatever it leads to.
        let dir = lexically_normal(
            &std::path::absolute(dir).map_err(|e| watch_error(notify::Error::io(e)))?,
        );
        // The first refresh reads every file.
        let seen = Shared::new(Mutex::new(Seen {
            unsettled: BTreeMap::new(),
            named: BTreeSet::new(),
            everything: true,
            replaced: false,
        }));
        let shared = seen.clone();
        let watched = dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let now = Instant::now();
                let mut seen = shared.lock().unwrap_or_else(PoisonError::into_inner);
                let change = match event {
                    // Events were lost (the kernel's queue overflowed), or one names no
                    // file: look at every file.
                    Ok(event) if event.need_rescan() || event.paths.is_empty() => {
                        seen.everything = true;
                        Change::Complete(now)
                    }
                    Ok(event) => {
                        let written = written(&event.kind);
                        if written == Written::Nothing {
                            return;
                        }
                        let mut relevant = false;
                        for path in &event.paths {
                            match concerns(&watched, path) {
                                Concerns::File => {
                                    seen.named.insert(path.clone());
                                }
                                Concerns::Everything => seen.everything = true,
                                Concerns::Replaced => {
                                    seen.everything = true;
                                    seen.replaced = true;
                                }
                                Concerns::Nothing => continue,
                            }
                            relevant = true;
                        }
                        if !relevant {
                            return;
                        }
                        match written {
                            // A link is made whole by one call: there is no write to wait for.
                            Written::InProgress if event.paths.iter().all(|path| is_link(path)) => {
                                Change::Complete(now)
                            }
                            Written::InProgress => {
                                for path in event.paths {
                                    seen.unsettled.insert(path, now);
                                }
                                Change::Unsettled(now)
                            }
                            Written::Done => {
                                for path in &event.paths {
                                    seen.unsettled.remove(path);
                                }
                                Change::Complete(now)
                            }
                            Written::Touched | Written::Nothing => Change::Complete(now),
                        }
                    }
                    // An event lost (queue overflow): look at every file.
                    Err(_) => {
                        seen.everything = true;
                        Change::Complete(now)
                    }
                };
                drop(seen);
                // The receiver is gone only while shutting down.
                drop(changes.send(change));
            })
            .map_err(watch_error)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        if let Some(parent) = dir.parent() {
            watcher
                .watch(parent, RecursiveMode::NonRecursive)
                .map_err(watch_error)?;
        }
        Ok(Self {
            dir,
            seen,
            files: BTreeMap::new(),
            file_problems: BTreeMap::new(),
            reads: 0,
            #[cfg(test)]
            listings: 0,
            watcher,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Brings `store` in line with the directory: the files that changed replace their
    /// objects, the files that are gone take theirs with them. Only the files the watcher's
    /// events named are looked at, unless it could not tell which (see [`Seen`]). Returns
    /// the problems of the files as a whole.
    pub fn refresh(&mut self, store: &mut Store) -> Result<Problems, SourceError> {
        let now = Instant::now();
        let (named, everything, replaced, unsettled) = {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            // A write older than SETTLE is taken as done, closed or not.
            seen.unsettled
                .retain(|_, at| now.duration_since(*at) < SETTLE);
            let unsettled: BTreeSet<PathBuf> = seen.unsettled.keys().cloned().collect();
            let named = std::mem::take(&mut seen.named);
            let everything = std::mem::replace(&mut seen.everything, false);
            let replaced = std::mem::replace(&mut seen.replaced, false);
            (named, everything, replaced, unsettled)
        };
        if replaced {
            // Watched again before the listing, so that nothing written after it is missed.
            // The old watch may be gone with its directory.
            drop(self.watcher.unwatch(&self.dir));
            if let Err(source) = self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                // The directory may be on its way back.
                self.again_next_time(named, true);
                return Err(SourceError::Watch {
                    path: self.dir.clone(),
                    source,
                });
            }
            tracing::info!(dir = %self.dir.display(), "manifest directory replaced; watching the new one");
        }
        // Each with whether an event named it: a named file is read whatever its version
        // says (a rewrite of the same length within the file system's time granularity
        // looks unchanged).
        let looked_at: Vec<(PathBuf, bool)> = if everything {
            #[cfg(test)]
            {
                self.listings += 1;
            }
            match manifest::list(&self.dir) {
                Ok(paths) => {
                    let present: BTreeSet<&PathBuf> = paths.iter().collect();
                    let gone: Vec<PathBuf> = self
                        .files
                        .keys()
                        .chain(self.file_problems.keys())
                        .filter(|path| !present.contains(path))
                        .cloned()
                        .collect();
                    for path in gone {
                        self.forget(&path, store);
                    }
                    paths
                        .into_iter()
                        .map(|path| {
                            let was_named = named.contains(&path);
                            (path, was_named)
                        })
                        .collect()
                }
                Err(e) => {
                    self.again_next_time(named, false);
                    return Err(SourceError::Manifests(Box::new(e)));
                }
            }
        } else {
            let mut present = Vec::with_capacity(named.len());
            for path in named {
                if path.is_file() {
                    present.push((path, true));
                } else {
                    self.forget(&path, store);
                }
            }
            present
        };
        // Still being written: its last objects stay until it is closed or settles, and it
        // is looked at again then.
        let (settled, still_written): (Vec<_>, Vec<_>) = looked_at
            .into_iter()
            .partition(|(path, _)| !unsettled.contains(path));
        let changed = settled
            .into_iter()
            .map(|(path, was_named)| {
                let version = Version::of(&path);
                (path, was_named, version)
            })
            // An unchanged file is not read again: a listing of thousands reads the few
            // that changed.
            .filter(|(path, was_named, version)| {
                *was_named
                    || version.is_none()
                    || self.files.get(path).map(|f| Some(f.version)) != Some(*version)
            })
            .map(|(path, _, version)| (path, version))
            .collect();
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .named
            .extend(still_written.into_iter().map(|(path, _)| path));
        self.read(changed, store);
        Ok(self.file_problems.values().cloned().collect())
    }

    /// Reads every file again at the next refresh, whatever their versions say, and watches
    /// the directory anew (SIGHUP: an operator who suspects a missed change).
    pub fn reread(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.everything = true;
        seen.replaced = true;
        seen.named.extend(self.files.keys().cloned());
    }

    /// A refresh that failed: what it took from the events is looked at by the next one,
    /// the whole directory too (and watched again, if it was `replaced`).
    fn again_next_time(&self, named: BTreeSet<PathBuf>, replaced: bool) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.everything = true;
        seen.replaced |= replaced;
        seen.named.extend(named);
    }

    /// A file that is gone: its objects go with it.
    fn forget(&mut self, path: &Path, store: &mut Store) {
        if let Some(file) = self.files.remove(path) {
            store.remove_origin(&file.origin);
        }
        self.file_problems.remove(path);
    }

    /// Whether files are being written.
    #[cfg(test)]
    fn unsettled(&self) -> bool {
        !self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unsettled
            .is_empty()
    }

    /// Reads files (several at once when that pays) into `store`; a file that fails keeps
    /// its last good objects, and the problem says so.
    fn read(&mut self, files: Vec<(PathBuf, Option<Version>)>, store: &mut Store) {
        // `kubectl get … > file` truncates before it writes: an empty file that had
        // objects is most likely half-written, so they stay until it has content again
        // (or is removed).
        let (half_written, files): (Vec<_>, Vec<_>) =
            files.into_iter().partition(|(path, version)| {
                version.is_some_and(|v| v.len == 0) && self.files.contains_key(path)
            });
        for (path, _) in half_written {
            let error = Arc::new(ManifestError::Empty { path: path.clone() });
            self.file_problems
                .insert(path, Problem::Origin { error, kept: false });
        }
        let sized: Vec<(&Path, u64)> = files
            .iter()
            .map(|(path, version)| (path.as_path(), version.map_or(0, |v| v.len)))
            .collect();
        let parse_started = std::time::Instant::now();
        let read = manifest::read_files(&sized);
        let parsed = parse_started.elapsed();
        for ((path, version), read) in files.into_iter().zip(read) {
            match read {
                Ok(documents) => {
                    // A file that vanished between the listing and the read is not kept:
                    // the next refresh sees it gone.
                    let Some(version) = version else { continue };
                    self.reads += 1;
                    let read = self.reads.to_string();
                    let origin = Origin::file(&path);
                    store.replace(
                        &origin,
                        documents.into_iter().map(|document| Delivered {
                            kind: document.kind,
                            id: document.id,
                            version: &read,
                            object: document.object.map_err(|e| Arc::new(e) as Unusable),
                        }),
                    );
                    self.file_problems.remove(&path);
                    self.files.insert(path, File { version, origin });
                }
                Err(e) => {
                    if matches!(e, ManifestError::Read { .. }) {
                        // Not the file's fault, maybe (EMFILE, EIO): read again at the
                        // next refresh.
                        self.seen
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .named
                            .insert(path.clone());
                    }
                    let problem = Problem::Origin {
                        error: Arc::new(e),
                        kept: self.files.contains_key(&path),
                    };
                    self.file_problems.insert(path, problem);
                }
            }
        }
        tracing::debug!(?parsed, stored = ?parse_started.elapsed() - parsed, "files read");
    }
}

/// What an event on a path means for the manifests of the directory `dir`.
#[derive(Debug, PartialEq, Eq)]
enum Concerns {
    /// That manifest changed.
    File,
    /// Any file may have: a directory appeared or went in it (the `..data` link a
    /// ConfigMap volume swaps to replace every file at once, and the `..`-named
    /// directories behind it).
    Everything,
    /// The directory itself was removed, created, or renamed away or into place.
    Replaced,
    /// Nothing read: another file (an editor's swap file, a temporary file that is then
    /// renamed into place, which names the manifest then), a sibling of the directory.
    Nothing,
}

fn concerns(dir: &Path, path: &Path) -> Concerns {
    if path == dir {
        return Concerns::Replaced;
    }
    if path.parent() != Some(dir) {
        return Concerns::Nothing;
    }
    if manifest::is_manifest(path) {
        return Concerns::File;
    }
    let kubernetes = path
        .file_name()
        .and_then(|name| name.to_str())
        .is_none_or(|name| name.starts_with(".."));
    if kubernetes || path.is_dir() {
        Concerns::Everything
    } else {
        Concerns::Nothing
    }
}

/// `path` without `.` and `..` components (`..` taken lexically, as a shell's `cd` does),
/// so that its parent is the directory it is in.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

fn is_link(path: &Path) -> bool {
    path.symlink_metadata()
        .is_ok_and(|metadata| metadata.file_type().is_symlink())
}

/// What an event says of its files.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// Nothing changed (opened, read, closed unwritten).
    Nothing,
    /// Being written: created or modified, not closed yet.
    InProgress,
    /// Complete: closed after writing, renamed into or out of place, removed.
    Done,
    /// Its attributes changed: worth a look, but a write in progress goes on.
    Touched,
}

fn written(kind: &EventKind) -> Written {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Written::Done,
        EventKind::Access(_) => Written::Nothing,
        EventKind::Create(CreateKind::Folder) => Written::Touched,
        EventKind::Create(_) => Written::InProgress,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
            Written::InProgress
        }
        EventKind::Modify(ModifyKind::Metadata(_)) | EventKind::Any | EventKind::Other => {
            Written::Touched
        }
        _ => Written::Done,
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
        root: tempfile::TempDir,
        dir: PathBuf,
        manifests: Manifests,
        changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
        store: Store,
        desired: Desired,
    }

    impl Fixture {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("manifests");
            std::fs::create_dir(&dir).unwrap();
            let (sender, changes) = tokio::sync::mpsc::unbounded_channel();
            let manifests = Manifests::watch(&dir, sender).unwrap();
            Self {
                root,
                dir,
                manifests,
                changes,
                store: Store::default(),
                desired: Desired::default(),
            }
        }

        /// Waits until the watcher has seen a change complete (a file closed or removed),
        /// as the agent does before it syncs, and then for its events to stop (one
        /// operation can make several): a refresh before then could find the file still
        /// marked as being written, or see the next operation's events as this one's.
        fn seen(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut complete = false;
            let mut quiet_since = Instant::now();
            while Instant::now() < deadline {
                match self.changes.try_recv() {
                    Ok(change) => {
                        complete |= matches!(change, Change::Complete(_));
                        quiet_since = Instant::now();
                    }
                    Err(_) if complete && quiet_since.elapsed() > Duration::from_millis(20) => {
                        return;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            assert!(complete, "the watcher saw no change complete");
        }

        fn write(&mut self, name: &str, text: &str) {
            std::fs::write(self.dir.join(name), text).unwrap();
            self.seen();
        }

        fn remove(&mut self, name: &str) {
            std::fs::remove_file(self.dir.join(name)).unwrap();
            self.seen();
        }

        /// The addresses of the frontends after one refresh, and its problems.
        fn refresh(&mut self) -> (Vec<String>, Problems) {
            // The watcher's thread sees the writes' close events a moment later.
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.manifests.unsettled() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut problems = self.manifests.refresh(&mut self.store).unwrap();
            problems.extend(self.store.problems());
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
    fn an_edit_reads_its_file_only_and_a_swapped_directory_is_read_whole() {
        let other = |ip: &str| service(ip).replace("name: web", "name: other");
        let mut fixture = Fixture::new();
        fixture.write("a.yaml", &service("10.96.0.10"));
        fixture.write("b.yaml", &other("10.96.0.20"));
        assert_eq!(fixture.refresh().0, ["10.96.0.10", "10.96.0.20"]);
        let (listings, reads) = (fixture.manifests.listings, fixture.manifests.reads);

        // An edit, a removal: the files the events named, no listing, one read.
        fixture.write("b.yaml", &other("10.96.0.21"));
        assert_eq!(fixture.refresh().0, ["10.96.0.10", "10.96.0.21"]);
        fixture.remove("a.yaml");
        assert_eq!(fixture.refresh().0, ["10.96.0.21"]);
        assert_eq!(fixture.manifests.listings, listings);
        assert_eq!(fixture.manifests.reads, reads + 1);

        // An editor's swap file wakes nobody; a new directory (as a ConfigMap volume's
        // swap makes) has every file looked at.
        std::fs::write(fixture.dir.as_path().join("b.yaml.swp"), "x").unwrap();
        std::fs::create_dir(fixture.dir.as_path().join("..2026_12_01")).unwrap();
        fixture.seen();
        assert_eq!(fixture.refresh().0, ["10.96.0.21"]);
        assert_eq!(fixture.manifests.listings, listings + 1);
        assert_eq!(
            fixture.manifests.reads,
            reads + 1,
            "unchanged files are not read"
        );
        assert_eq!(
            concerns(
                fixture.dir.as_path(),
                &fixture.dir.as_path().join("b.yaml.swp")
            ),
            Concerns::Nothing
        );
    }

    #[test]
    fn a_configmap_volume_swap_replaces_its_files() {
        // What the kubelet's atomic writer does: the files are links through `..data` to
        // a timestamped directory, and an update swaps `..data` to a new one.
        let mut fixture = Fixture::new();
        let dir = fixture.dir.clone();
        let version = |name: &str, ip: &str| {
            std::fs::create_dir(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("web.yaml"), service(ip)).unwrap();
        };
        version("..2026_12_01_a", "10.96.0.10");
        std::os::unix::fs::symlink("..2026_12_01_a", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/web.yaml", dir.join("web.yaml")).unwrap();
        fixture.seen();
        assert_eq!(fixture.refresh().0, ["10.96.0.10"]);

        version("..2026_12_01_b", "10.96.0.11");
        std::os::unix::fs::symlink("..2026_12_01_b", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..2026_12_01_a")).unwrap();
        fixture.seen();
        assert_eq!(fixture.refresh().0, ["10.96.0.11"]);
    }

    #[test]
    fn a_directory_swapped_in_by_rename_or_made_again_is_followed() {
        let mut fixture = Fixture::new();
        fixture.write("a.yaml", &service("10.96.0.10"));
        assert_eq!(fixture.refresh().0, ["10.96.0.10"]);

        // Swapped by rename, as deploy tools do: the new directory's files, and every
        // later edit in it.
        let new = fixture.root.path().join("new");
        let old = fixture.root.path().join("old");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("b.yaml"), service("10.96.0.20")).unwrap();
        std::fs::rename(&fixture.dir, &old).unwrap();
        std::fs::rename(&new, &fixture.dir).unwrap();
        fixture.seen();
        assert_eq!(fixture.refresh().0, ["10.96.0.20"]);
        fixture.write("b.yaml", &service("10.96.0.21"));
        assert_eq!(fixture.refresh().0, ["10.96.0.21"]);
        // The old one is nobody's any more.
        std::fs::write(old.join("b.yaml"), service("10.96.0.99")).unwrap();
        assert_eq!(fixture.refresh().0, ["10.96.0.21"]);

        // Deleted and made again.
        std::fs::remove_dir_all(&fixture.dir).unwrap();
        fixture.seen();
        assert!(fixture.manifests.refresh(&mut fixture.store).is_err());
        std::fs::create_dir(&fixture.dir).unwrap();
        fixture.seen();
        // The sync its event starts watches it again.
        assert!(fixture.refresh().0.is_empty());
        fixture.write("c.yaml", &service("10.96.0.30"));
        assert_eq!(fixture.refresh().0, ["10.96.0.30"]);
        fixture.write("c.yaml", &service("10.96.0.31"));
        assert_eq!(fixture.refresh().0, ["10.96.0.31"]);
    }

    #[test]
    fn the_directory_is_watched_by_its_own_name() {
        assert_eq!(
            lexically_normal(Path::new("/srv/./deploy/manifests/../current/")),
            Path::new("/srv/deploy/current")
        );
        let fixture = Fixture::new();
        let dotted = fixture.dir.join("..").join("manifests");
        let (sender, _) = tokio::sync::mpsc::unbounded_channel();
        let manifests = Manifests::watch(&dotted, sender).unwrap();
        assert_eq!(manifests.dir(), fixture.dir);
    }

    #[test]
    fn a_duplicate_takes_over_without_a_read_when_the_first_file_goes() {
        let mut fixture = Fixture::new();
        fixture.write("a.yaml", &service("10.96.0.10"));
        fixture.write("b.yaml", &service("10.96.0.99"));
        let (frontends, problems) = fixture.refresh();
        assert_eq!(frontends, ["10.96.0.10"]);
        assert!(
            problems.iter().any(|p| p
                .to_string()
                .contains("b.yaml: Service default/web: defined more than once")),
            "{problems:?}"
        );
        fixture.remove("a.yaml");
        let (frontends, problems) = fixture.refresh();
        assert_eq!(frontends, ["10.96.0.99"]);
        assert!(problems.is_empty(), "{problems:?}");
        fixture.write("a.yaml", &service("10.96.0.10"));
        assert_eq!(fixture.refresh().0, ["10.96.0.10"]);
    }

    #[test]
    fn a_half_written_duplicate_still_takes_over_with_its_last_good_objects() {
        let mut fixture = Fixture::new();
        fixture.write("b.yaml", &service("10.96.0.99"));
        fixture.refresh();
        fixture.write("a.yaml", &service("10.96.0.10"));
        fixture.refresh();

        // a goes while b is half-written (`kubectl get > b.yaml` truncates first): b's last
        // good objects, which the store holds, are in effect.
        fixture.remove("a.yaml");
        fixture.write("b.yaml", "");
        let (frontends, problems) = fixture.refresh();
        assert_eq!(frontends, ["10.96.0.99"]);
        assert!(
            problems.iter().any(|p| p
                .to_string()
                .contains("b.yaml: empty; its last objects stay")),
            "{problems:?}"
        );

        fixture.write("b.yaml", &service("10.96.0.98"));
        let (frontends, problems) = fixture.refresh();
        assert_eq!(frontends, ["10.96.0.98"]);
        assert!(problems.is_empty(), "{problems:?}");
    }
}
