//! The last good version of every object, whatever the source, kept up to date by deltas:
//! a source says what one of its origins (a manifest file, the API) now defines, or no
//! longer defines, and only those objects are looked at. An object that turns invalid
//! keeps its last good version; an object no origin defines any more is gone.
//!
//! Sources deliver objects converted into their models; the store takes one only when its
//! version changes, and remembers which Services that touched, so that a sync recomputes those Services only:
//! one endpoint change among 100k Services costs one Service, not 100k.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::{
    hash::{Map, Set},
    model::{AddressType, Kind, ObjectModel, ObjectRef, ServiceModel, SliceModel, Word},
};

/// Where definitions come from: a manifest file, or the API (one origin per kind, so that
/// a relist of one kind replaces only that kind). When several origins define one object,
/// the first by this order is in effect: for files, the first by name.
///
/// Behind one pointer: every definition of every object names its origin, and there are
/// few origins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin(Arc<OriginName>);

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct OriginName {
    name: Box<str>,
    /// A file: problems of its objects start with its name.
    file: bool,
}

impl Origin {
    /// The Kubernetes API's objects of one kind: one for each, made once.
    pub fn api(kind: Kind) -> Self {
        static API: std::sync::LazyLock<[Origin; 2]> = std::sync::LazyLock::new(|| {
            [Kind::Service, Kind::EndpointSlice].map(|kind| {
                Origin(Arc::new(OriginName {
                    name: kind.as_str().into(),
                    file: false,
                }))
            })
        });
        let [services, slices] = &*API;
        match kind {
            Kind::Service => services.clone(),
            Kind::EndpointSlice => slices.clone(),
        }
    }

    /// A manifest file, named as problems should name it.
    pub fn file(path: &std::path::Path) -> Self {
        Self(Arc::new(OriginName {
            name: path.display().to_string().into(),
            file: true,
        }))
    }

    /// What problems of its objects start with: `"path: "`, or nothing for the API, whose
    /// objects are named by their namespace/name.
    fn prefix(&self) -> Prefix<'_> {
        Prefix(self)
    }
}

/// An origin as problems name it; see [`Origin::prefix`].
struct Prefix<'a>(&'a Origin);

impl std::fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.0.file {
            write!(f, "{}: ", self.0.0.name)
        } else {
            Ok(())
        }
    }
}

/// Why a source could not use what it read (a manifest's error, a conversion's): its own
/// error, kept whole and shared, not rendered.
pub type Unusable = Arc<dyn std::error::Error + Send + Sync>;

/// What is wrong with an object or a whole origin. What it concerns keeps its last good
/// state; each problem names the origin (file), the object and the field.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Problem {
    /// An object cannot be used as delivered.
    #[error("{error}{}", if *kept { "; its last good version stays in effect" } else { "" })]
    Object { error: Unusable, kept: bool },
    /// A whole origin cannot be read (a file that does not parse, or is half-written).
    #[error("{error}{}", if *kept { "; its last good objects stay in effect" } else { "" })]
    Origin { error: Unusable, kept: bool },
    /// The source delivered an object of another kind under this one.
    #[error("{}{kind} {id}: not a {kind}", origin.prefix())]
    WrongKind {
        origin: Origin,
        kind: Kind,
        id: ObjectRef,
    },
    #[error("{}{kind} {id}: defined more than once; the first definition is used", origin.prefix())]
    Repeated {
        origin: Origin,
        kind: Kind,
        id: ObjectRef,
    },
    #[error("{}{kind} {id}: defined more than once; another definition is in effect", origin.prefix())]
    NotInEffect {
        origin: Origin,
        kind: Kind,
        id: ObjectRef,
    },
    /// Kept (it is valid) but unused until the IPv6 programs exist.
    #[error("{}EndpointSlice {id}: addressType: {} is not served yet; skipped", origin.prefix(), address_type.as_str())]
    NotServed {
        origin: Origin,
        id: ObjectRef,
        address_type: AddressType,
    },
}

impl Problem {
    /// An object's own error, as delivered (whether its last good version stays is the
    /// store's to say).
    fn object(error: Unusable) -> Self {
        Self::Object { error, kept: false }
    }
}

/// One object as an origin defines it: its identity, its version, and its model (the
/// source converts what it reads) or why it is unusable (the reason names the origin, the
/// object and the field).
pub struct Delivered<'a> {
    pub kind: Kind,
    pub id: ObjectRef,
    /// Changes whenever the object does: its `resourceVersion`, or the read of its file.
    /// An empty version is taken as a change every time.
    pub version: &'a str,
    pub object: Result<ObjectModel, Unusable>,
}

/// Problems, each naming the object and field. What they concern keeps its last good
/// state.
pub type Problems = Vec<Problem>;

/// The version of a definition, as delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version {
    /// A `resourceVersion` is a number as a rule (etcd's revision): kept without an
    /// allocation.
    Number(u64),
    /// Any other text. Shared: the objects of one file read have the same.
    Text(Arc<str>),
}

impl Version {
    /// `text` as a number, if it is one written the one way (no sign, no leading zero), so
    /// that the number stands for exactly that text.
    fn number(text: &str) -> Option<u64> {
        let canonical =
            text.bytes().all(|b| b.is_ascii_digit()) && (text.len() == 1 || !text.starts_with('0'));
        canonical.then(|| text.parse().ok()).flatten()
    }

    fn is(&self, text: &str) -> bool {
        match self {
            Self::Number(number) => Self::number(text) == Some(*number),
            Self::Text(held) => **held == *text,
        }
    }

    #[cfg(test)]
    fn text(&self) -> String {
        match self {
            Self::Number(number) => number.to_string(),
            Self::Text(text) => text.to_string(),
        }
    }
}

struct Definition<M> {
    version: Version,
    /// The last good model of this definition; `None` while it has never been valid.
    /// Shared, so that what was in effect before a change is kept for the price of a
    /// pointer while the change is looked at.
    model: Option<Arc<M>>,
    /// What is wrong with the current version, or what is not used of it (boxed: most
    /// definitions have none, and a problem is several times a pointer's size).
    problem: Option<Box<Problem>>,
}

/// Every definition of one object, by origin; the first is in effect. Almost every object
/// has one definition: it is kept inline.
struct Entry<M> {
    definitions: SmallVec<[(Origin, Definition<M>); 1]>,
}

impl<M> Default for Entry<M> {
    fn default() -> Self {
        Self {
            definitions: SmallVec::new(),
        }
    }
}

impl<M> Entry<M> {
    /// The model in effect: the first definition's that has one, so that a broken copy in
    /// an earlier file does not take down a good definition.
    fn effective(&self) -> Option<&Arc<M>> {
        self.definitions.iter().find_map(|(_, d)| d.model.as_ref())
    }

    /// Which definition is in effect, by position: the first with a model, else the first.
    fn effective_index(&self) -> usize {
        self.definitions
            .iter()
            .position(|(_, d)| d.model.is_some())
            .unwrap_or(0)
    }

    fn get(&self, origin: &Origin) -> Option<&Definition<M>> {
        let index = self
            .definitions
            .binary_search_by(|(o, _)| o.cmp(origin))
            .ok()?;
        self.definitions.get(index).map(|(_, d)| d)
    }

    /// `origin`'s definition, made empty if there was none.
    fn get_or_insert(&mut self, origin: &Origin) -> &mut Definition<M> {
        let index = match self.definitions.binary_search_by(|(o, _)| o.cmp(origin)) {
            Ok(index) => index,
            Err(index) => {
                self.definitions.insert(
                    index,
                    (
                        origin.clone(),
                        Definition {
                            version: Version::Text(Arc::from("")),
                            model: None,
                            problem: None,
                        },
                    ),
                );
                index
            }
        };
        &mut self.definitions[index].1
    }

    fn remove(&mut self, origin: &Origin) {
        if let Ok(index) = self.definitions.binary_search_by(|(o, _)| o.cmp(origin)) {
            self.definitions.remove(index);
        }
    }
}

/// Whether two models in effect differ: the same `Arc` is the same model.
fn differ<M: PartialEq>(before: Option<&Arc<M>>, after: Option<&Arc<M>>) -> bool {
    match (before, after) {
        (None, None) => false,
        (Some(before), Some(after)) => !Arc::ptr_eq(before, after) && before != after,
        _ => true,
    }
}

/// What one origin defines, by kind.
#[derive(Default)]
struct Defined {
    services: Set<ObjectRef>,
    slices: Set<ObjectRef>,
}

impl Defined {
    fn of(&mut self, kind: Kind) -> &mut Set<ObjectRef> {
        match kind {
            Kind::Service => &mut self.services,
            Kind::EndpointSlice => &mut self.slices,
        }
    }

    /// `false` if it was defined already.
    fn insert(&mut self, kind: Kind, id: ObjectRef) -> bool {
        self.of(kind).insert(id)
    }

    fn remove(&mut self, kind: Kind, id: &ObjectRef) {
        self.of(kind).remove(id);
    }

    fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }

    fn into_objects(self) -> impl Iterator<Item = (Kind, ObjectRef)> {
        let services = self.services.into_iter().map(|id| (Kind::Service, id));
        services.chain(self.slices.into_iter().map(|id| (Kind::EndpointSlice, id)))
    }
}

#[derive(Default)]
pub struct Store {
    services: Map<ObjectRef, Entry<ServiceModel>>,
    slices: Map<ObjectRef, Entry<SliceModel>>,
    /// Names that recur across objects (endpoints' node names, port names), once each: a
    /// cluster has few nodes and port names, and many endpoints and ports.
    words: Set<Word>,
    /// What each origin defines, so that a re-read file or a relist replaces it.
    by_origin: Map<Origin, Defined>,
    /// The slices each Service owns through their label; usually one.
    slices_by_service: Map<ObjectRef, SmallVec<[ObjectRef; 1]>>,
    /// Services whose frontends may differ since the last [`Store::take_changed`].
    changed: Set<ObjectRef>,
    /// Problems of objects (their definitions), kept as the objects change.
    problems: std::collections::BTreeMap<(Kind, ObjectRef, Origin), Problem>,
    /// Objects an origin defined more than once in its last replacement.
    repeated: Map<Origin, Vec<Problem>>,
    /// Services and slices with a model in effect.
    good: (usize, usize),
    /// The last version taken, shared by the definitions that have it.
    last_version: Arc<str>,
    /// Objects converted into the model so far: what tests count to show that a change
    /// costs its own objects.
    #[cfg(test)]
    conversions: usize,
}

impl Store {
    /// `origin` now defines exactly `objects` (a file read again, a relist): what it
    /// defined before and does not any more is gone. Only objects whose version changed
    /// are taken again.
    pub fn replace<'a>(
        &mut self,
        origin: &Origin,
        objects: impl IntoIterator<Item = Delivered<'a>>,
    ) {
        let mut before = self.by_origin.remove(origin).unwrap_or_default();
        let mut now = Defined::default();
        let mut repeated = Vec::new();
        for delivered in objects {
            let id = self.intern(delivered.kind, &delivered.id);
            if !now.insert(delivered.kind, id.clone()) {
                repeated.push(Problem::Repeated {
                    origin: origin.clone(),
                    kind: delivered.kind,
                    id: delivered.id,
                });
                continue;
            }
            if !before.is_empty() {
                before.remove(delivered.kind, &id);
            }
            self.put_definition(origin, id, delivered);
        }
        for (kind, id) in before.into_objects() {
            self.remove_definition(origin, kind, &id);
        }
        if repeated.is_empty() {
            self.repeated.remove(origin);
        } else {
            self.repeated.insert(origin.clone(), repeated);
        }
        if !now.is_empty() {
            self.by_origin.insert(origin.clone(), now);
        }
    }

    /// `origin` now defines this object (a watch event).
    pub fn put(&mut self, origin: &Origin, delivered: Delivered<'_>) {
        let id = self.intern(delivered.kind, &delivered.id);
        self.by_origin
            .entry(origin.clone())
            .or_default()
            .insert(delivered.kind, id.clone());
        self.put_definition(origin, id, delivered);
    }

    /// `origin` no longer defines this object (a watch event).
    pub fn remove(&mut self, origin: &Origin, kind: Kind, id: &ObjectRef) {
        if let Some(defined) = self.by_origin.get_mut(origin) {
            defined.remove(kind, id);
        }
        self.remove_definition(origin, kind, id);
    }

    /// `origin` defines nothing any more (a removed file).
    pub fn remove_origin(&mut self, origin: &Origin) {
        self.replace(origin, std::iter::empty());
    }

    /// The store's copy of an object's name: the key it is held under, or the name as
    /// delivered, which becomes that key. The models, indexes and everything downstream
    /// share these copies; a name nothing holds goes with its last holder.
    fn intern(&self, kind: Kind, id: &ObjectRef) -> ObjectRef {
        let held = match kind {
            Kind::Service => self.services.get_key_value(id).map(|(key, _)| key),
            Kind::EndpointSlice => self.slices.get_key_value(id).map(|(key, _)| key),
        };
        held.cloned().unwrap_or_else(|| id.copied())
    }

    /// Brings `origin`'s definition of the delivered object, named `id` as interned, to
    /// the delivered version.
    fn put_definition(&mut self, origin: &Origin, id: ObjectRef, delivered: Delivered<'_>) {
        let Delivered {
            kind,
            version,
            object,
            ..
        } = delivered;
        #[cfg(test)]
        {
            let unchanged = self
                .held_version(kind, &id, origin)
                .is_some_and(|held| !version.is_empty() && held == version);
            self.conversions += usize::from(!unchanged);
        }
        let last_version = &mut self.last_version;
        match kind {
            Kind::Service => {
                let object = object
                    .map_err(Problem::object)
                    .and_then(|object| match object {
                        ObjectModel::Service(service) => Ok(service),
                        ObjectModel::Slice(_) => Err(Problem::WrongKind {
                            origin: origin.clone(),
                            kind,
                            id: id.clone(),
                        }),
                    });
                let entry = self.services.entry(id.clone()).or_default();
                let before = entry.effective().cloned();
                let words = &mut self.words;
                define(
                    entry,
                    origin,
                    (version, last_version),
                    object,
                    |mut model| {
                        // The model names the object as the source does: the interned name.
                        debug_assert_eq!(model.id, id);
                        model.id = id.clone();
                        for port in &mut model.ports {
                            port.name = word(words, &port.name);
                        }
                        (model, None)
                    },
                );
                self.after_service_change(&id, before);
            }
            Kind::EndpointSlice => {
                let object = object
                    .map_err(Problem::object)
                    .and_then(|object| match object {
                        ObjectModel::Slice(slice) => Ok(slice),
                        ObjectModel::Service(_) => Err(Problem::WrongKind {
                            origin: origin.clone(),
                            kind,
                            id: id.clone(),
                        }),
                    });
                let entry = self.slices.entry(id.clone()).or_default();
                let before = entry.effective().cloned();
                let (services, by_service, words) =
                    (&self.services, &self.slices_by_service, &mut self.words);
                define(
                    entry,
                    origin,
                    (version, last_version),
                    object,
                    |mut model| {
                        debug_assert_eq!(model.id, id);
                        model.id = id.clone();
                        model.service = model
                            .service
                            .map(|service| held_service_name(services, by_service, service));
                        for endpoint in &mut model.endpoints {
                            if let Some(node) = &mut endpoint.node_name {
                                *node = word(words, node);
                            }
                        }
                        for port in &mut model.ports {
                            port.name = word(words, &port.name);
                        }
                        let note =
                            (model.address_type != AddressType::Ipv4).then(|| Problem::NotServed {
                                origin: origin.clone(),
                                id: id.clone(),
                                address_type: model.address_type.clone(),
                            });
                        (model, note)
                    },
                );
                self.after_slice_change(&id, before);
            }
        }
        self.refresh_problems(kind, &id);
    }

    fn remove_definition(&mut self, origin: &Origin, kind: Kind, id: &ObjectRef) {
        match kind {
            Kind::Service => {
                let Some(entry) = self.services.get_mut(id) else {
                    return;
                };
                let before = entry.effective().cloned();
                entry.remove(origin);
                if entry.definitions.is_empty() {
                    self.services.remove(id);
                }
                self.after_service_change(id, before);
            }
            Kind::EndpointSlice => {
                let Some(entry) = self.slices.get_mut(id) else {
                    return;
                };
                let before = entry.effective().cloned();
                entry.remove(origin);
                if entry.definitions.is_empty() {
                    self.slices.remove(id);
                }
                self.after_slice_change(id, before);
            }
        }
        self.problems.remove(&(kind, id.clone(), origin.clone()));
        self.refresh_problems(kind, id);
    }

    fn after_service_change(&mut self, id: &ObjectRef, before: Option<Arc<ServiceModel>>) {
        let after = self.services.get(id).and_then(Entry::effective);
        if differ(before.as_ref(), after) {
            let (services, _) = &mut self.good;
            *services = *services + usize::from(after.is_some()) - usize::from(before.is_some());
            self.changed.insert(id.clone());
        }
    }

    fn after_slice_change(&mut self, id: &ObjectRef, before: Option<Arc<SliceModel>>) {
        let after = self.slices.get(id).and_then(Entry::effective);
        if !differ(before.as_ref(), after) {
            return;
        }
        let (_, slices) = &mut self.good;
        *slices = *slices + usize::from(after.is_some()) - usize::from(before.is_some());
        let new_service = after.and_then(|m| m.service.clone());
        self.reindex_slice(id, before.and_then(|m| m.service.clone()), new_service);
    }

    /// The problems of an object's definitions: each one's own, and for every definition
    /// after the first, that it is not the one in effect.
    fn refresh_problems(&mut self, kind: Kind, id: &ObjectRef) {
        let (definitions, in_effect) = match kind {
            Kind::Service => definitions_of(self.services.get(id)),
            Kind::EndpointSlice => definitions_of(self.slices.get(id)),
        };
        for (index, (origin, problem)) in definitions.into_iter().enumerate() {
            let problem = if index != in_effect && problem.is_none() {
                Some(Problem::NotInEffect {
                    origin: origin.clone(),
                    kind,
                    id: id.clone(),
                })
            } else {
                problem
            };
            match problem {
                Some(problem) => {
                    self.problems.insert((kind, id.clone(), origin), problem);
                }
                // Most objects have no problem: nothing to allocate for them.
                None if !self.problems.is_empty() => {
                    self.problems.remove(&(kind, id.clone(), origin));
                }
                None => {}
            }
        }
    }

    /// The version of `origin`'s definition of an object, if it has one.
    #[cfg(test)]
    fn held_version(&self, kind: Kind, id: &ObjectRef, origin: &Origin) -> Option<String> {
        match kind {
            Kind::Service => self.services.get(id)?.get(origin),
            Kind::EndpointSlice => {
                let definition = self.slices.get(id)?.get(origin)?;
                return Some(definition.version.text());
            }
        }
        .map(|definition| definition.version.text())
    }

    /// Every problem the objects have now.
    pub fn problems(&self) -> Problems {
        let mut repeated: Vec<_> = self.repeated.iter().collect();
        repeated.sort_unstable_by(|a, b| a.0.cmp(b.0));
        self.problems
            .values()
            .chain(repeated.into_iter().flat_map(|(_, problems)| problems))
            .cloned()
            .collect()
    }

    /// Moves slice `id` from one Service's slices to another's, marking both changed.
    fn reindex_slice(&mut self, id: &ObjectRef, old: Option<ObjectRef>, new: Option<ObjectRef>) {
        if let Some(old) = old {
            if let Some(slices) = self.slices_by_service.get_mut(&old) {
                slices.retain(|slice| slice != id);
                if slices.is_empty() {
                    self.slices_by_service.remove(&old);
                }
            }
            self.changed.insert(old);
        }
        if let Some(new) = new {
            let slices = self.slices_by_service.entry(new.clone()).or_default();
            if !slices.contains(id) {
                slices.push(id.clone());
            }
            self.changed.insert(new);
        }
    }

    /// Marks the Services with a NodePort changed, for their frontends follow the node's
    /// addresses.
    pub fn node_addresses_changed(&mut self) {
        let with_node_ports = self.services.iter().filter_map(|(id, entry)| {
            let service = entry.effective()?;
            service
                .ports
                .iter()
                .any(|port| port.node_port.is_some())
                .then(|| id.clone())
        });
        self.changed.extend(with_node_ports);
    }

    /// The Services changed since the last call: added, modified, removed, or whose
    /// slices were; in no particular order.
    pub fn take_changed(&mut self) -> Vec<ObjectRef> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    /// The manifest file whose definition of Service `id` is in effect, to name it by;
    /// `None` for a Service from the API, or none.
    pub fn service_file(&self, id: &ObjectRef) -> Option<&str> {
        let entry = self.services.get(id)?;
        let (origin, _) = entry.definitions.get(entry.effective_index())?;
        origin.0.file.then_some(&*origin.0.name)
    }

    /// A Service and its slices, if it has a good version.
    pub fn service(&self, id: &ObjectRef) -> Option<(&ServiceModel, Vec<&Arc<SliceModel>>)> {
        let service = self.services.get(id)?.effective()?;
        let slices = self
            .slices_by_service
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(slice)?.effective())
            .collect();
        Some((service, slices))
    }

    /// Services and EndpointSlices with a good version.
    pub fn counts(&self) -> (usize, usize) {
        self.good
    }
}

/// The store's copy of the name of the Service a slice belongs to: the key of the Service,
/// or of the slices it already owns, if there is one; else a copy of its own (see
/// [`ObjectRef::copied`]).
fn held_service_name(
    services: &Map<ObjectRef, Entry<ServiceModel>>,
    by_service: &Map<ObjectRef, SmallVec<[ObjectRef; 1]>>,
    service: ObjectRef,
) -> ObjectRef {
    services
        .get_key_value(&service)
        .map(|(key, _)| key)
        .or_else(|| by_service.get_key_value(&service).map(|(key, _)| key))
        .cloned()
        .unwrap_or_else(|| service.copied())
}

/// `words`' copy of `word`, made one if it has none: in an allocation of its own, apart
/// from the temporaries of the parse that read it (see [`ObjectRef::copied`]).
fn word(words: &mut Set<Word>, word: &Word) -> Word {
    if let Some(interned) = words.get(word.as_str()) {
        return interned.clone();
    }
    let copied = Word::new(word);
    words.insert(copied.clone());
    copied
}

/// Each definition's origin and its problem, if any.
type OriginProblems = SmallVec<[(Origin, Option<Problem>); 1]>;

/// Each definition's origin and problem, and which one is in effect.
fn definitions_of<M>(entry: Option<&Entry<M>>) -> (OriginProblems, usize) {
    let definitions = entry
        .into_iter()
        .flat_map(|entry| &entry.definitions)
        .map(|(origin, definition)| (origin.clone(), definition.problem.as_deref().cloned()))
        .collect();
    (definitions, entry.map_or(0, Entry::effective_index))
}

/// Brings `origin`'s definition in `entry` to the delivered version: `finish` makes the
/// delivered model the store's own (its names interned) and says what is not used of it.
/// Nothing is done for a version the definition has; a new one is kept in `last_version`,
/// shared by the definitions taken at it.
fn define<M: PartialEq>(
    entry: &mut Entry<M>,
    origin: &Origin,
    (version, last_version): (&str, &mut Arc<str>),
    object: Result<M, Problem>,
    finish: impl FnOnce(M) -> (M, Option<Problem>),
) {
    if let Some(definition) = entry.get(origin)
        && !version.is_empty()
        && definition.version.is(version)
    {
        return;
    }
    let converted = object.map(finish);
    let version = match Version::number(version) {
        Some(number) => Version::Number(number),
        None => {
            if **last_version != *version {
                *last_version = Arc::from(version);
            }
            Version::Text(last_version.clone())
        }
    };
    let definition = entry.get_or_insert(origin);
    definition.version = version;
    match converted {
        Ok((model, note)) => {
            definition.problem = note.map(Box::new);
            // An unchanged model keeps its `Arc`: what holds it sees no change.
            if definition.model.as_deref() != Some(&model) {
                definition.model = Some(Arc::new(model));
            }
        }
        Err(Problem::Object { error, .. }) => {
            definition.problem = Some(Box::new(Problem::Object {
                error,
                kept: definition.model.is_some(),
            }));
        }
        Err(problem) => definition.problem = Some(Box::new(problem)),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::*;
    use crate::{
        model::{BackendAddr, Desired, Frontend, Node},
        plan::{self, Programmed},
        source::parse::{self as manifest, Document},
    };

    fn documents(yaml: &str) -> Vec<Document> {
        manifest::parse(Path::new("m.yaml"), yaml).unwrap()
    }

    /// Delivers `documents` as m.yaml's, at `version`.
    fn update_at(store: &mut Store, documents: &[Document], version: &str) -> Vec<String> {
        update_from(store, "m.yaml", documents, version)
    }

    /// Delivers `documents` as `file`'s, at `version`.
    fn update_from(
        store: &mut Store,
        file: &str,
        documents: &[Document],
        version: &str,
    ) -> Vec<String> {
        store.replace(
            &Origin::file(Path::new(file)),
            documents.iter().map(|d| Delivered {
                kind: d.kind,
                id: d.id.clone(),
                version,
                object: delivered_object(d),
            }),
        );
        rendered(&store.problems())
    }

    fn rendered(problems: &[Problem]) -> Vec<String> {
        problems.iter().map(ToString::to_string).collect()
    }

    /// What a source delivers for `document`: its model, or its error.
    fn delivered_object(document: &Document) -> Result<ObjectModel, Unusable> {
        document.object.as_ref().cloned().map_err(|e| {
            Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
                e.to_string(),
            ))
        })
    }

    /// Delivers `documents` as changed, whatever they hold.
    fn update(store: &mut Store, documents: &[Document]) -> Vec<String> {
        update_at(store, documents, "")
    }

    /// The frontends the store's Services have, computed from what it says changed.
    fn frontends(store: &mut Store, desired: &mut Desired) -> Vec<Frontend> {
        let changed = store.take_changed();
        desired.update(
            changed.iter().map(|id| (id, store.service(id))),
            &Node::default(),
        );
        desired.frontends().map(|(f, _)| *f).collect()
    }

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    #[test]
    fn a_version_is_kept_as_a_number_only_when_it_stands_for_exactly_that_text() {
        assert_eq!(Version::number("12"), Some(12));
        assert_eq!(Version::number("0"), Some(0));
        for text in ["", "012", "+1", "-1", "1.0", "18446744073709551616", "e12"] {
            assert_eq!(Version::number(text), None, "{text}");
        }
        assert!(Version::Number(12).is("12"));
        assert!(!Version::Number(12).is("012"));
        assert!(Version::Text(Arc::from("012")).is("012"));
    }

    #[test]
    fn an_invalid_object_keeps_its_last_good_version_and_a_gone_one_is_removed() {
        let mut store = Store::default();
        assert!(update(&mut store, &documents(GOOD)).is_empty());
        let bad = GOOD.replace("port: 80", "port: 0");
        let problems = update(&mut store, &documents(&bad));
        assert_eq!(
            problems,
            [
                "m.yaml: Service default/web: spec.ports[0].port: 0 is not a port (1-65535); its last good version stays in effect"
            ]
        );
        assert_eq!(store.counts(), (1, 0));
        let frontends = frontends(&mut store, &mut Desired::default());
        assert_eq!(frontends.len(), 1);
        assert_eq!(frontends[0].port, 80);

        assert!(update(&mut store, &[]).is_empty());
        assert_eq!(store.counts(), (0, 0));
    }

    #[test]
    fn a_change_of_node_addresses_marks_only_the_services_with_a_node_port() {
        let mut store = Store::default();
        let yaml = format!(
            "{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: np}}\nspec: {{type: NodePort, clusterIP: 10.96.0.11, ports: [{{port: 80, nodePort: 30080}}]}}\n"
        );
        assert!(update(&mut store, &documents(&yaml)).is_empty());
        store.take_changed();
        store.node_addresses_changed();
        let changed: Vec<String> = store
            .take_changed()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(changed, ["default/np"]);
    }

    #[test]
    fn an_invalid_new_object_is_skipped_and_the_rest_kept() {
        let mut store = Store::default();
        let yaml = format!(
            "{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bad}}\nspec: {{clusterIP: 10.96.0.11, ports: [{{port: 80, protocol: ICMP}}]}}\n"
        );
        let problems = update(&mut store, &documents(&yaml));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("Service default/bad: spec.ports[0].protocol"),
            "{problems:?}"
        );
        assert_eq!(store.counts(), (1, 0));
    }

    #[test]
    fn slices_of_another_address_type_are_reported_and_unused() {
        let mut store = Store::default();
        let yaml = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nendpoints: [{addresses: [\"fd00::1\"]}]\n";
        let problems = update(&mut store, &documents(yaml));
        assert_eq!(
            problems,
            ["m.yaml: EndpointSlice default/web-v6: addressType: IPv6 is not served yet; skipped"]
        );
    }

    const A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    const B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.11, externalIPs: [10.96.0.10], ports: [{port: 80}]}\n";
    const B_INVALID: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 0}]}\n";
    const HEADLESS_B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: None, ports: [{port: 80}]}\n";

    fn slice(name: &str, service: &str, ips: &[&str]) -> String {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [\"{ip}\"]}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{}]\nports: [{{port: 8080}}]\n",
            endpoints.join(", ")
        )
    }

    /// Each step's Services recomputed from what the store says changed, and the maps
    /// planned for the frontends that touched, end where a sync from scratch ends.
    #[test]
    fn incremental_syncs_agree_with_a_sync_from_scratch() {
        let steps: Vec<Vec<String>> = vec![
            vec![A.into(), slice("a-1", "a", &["10.244.0.1", "10.244.0.2"])],
            // b claims a's clusterIP as an external IP: a keeps it.
            vec![
                A.into(),
                B.into(),
                slice("a-1", "a", &["10.244.0.1", "10.244.0.2"]),
                slice("b-1", "b", &["10.244.0.2", "10.244.0.3"]),
            ],
            // a goes: b's external IP takes over 10.96.0.10.
            vec![B.into(), slice("b-1", "b", &["10.244.0.2", "10.244.0.3"])],
            // The slice moves from b to a new a; b keeps its frontends, without backends.
            vec![A.into(), B.into(), slice("b-1", "a", &["10.244.0.4"])],
            // b turns invalid: its last good version stays.
            vec![
                A.into(),
                B_INVALID.into(),
                slice("b-1", "a", &["10.244.0.4"]),
            ],
            // b turns headless: out of the datapath.
            vec![
                A.into(),
                HEADLESS_B.into(),
                slice("b-1", "a", &["10.244.0.4"]),
            ],
            vec![],
        ];
        let mut store = Store::default();
        let mut desired = Desired::default();
        let mut programmed = Programmed::default();
        for (step, objects) in steps.iter().enumerate() {
            update(&mut store, &documents(&objects.join("---\n")));
            let changed = store.take_changed();
            let touched = desired.update(
                changed.iter().map(|id| (id, store.service(id))),
                &Node::default(),
            );

            let mut scratch_store = Store::default();
            let mut scratch = Desired::default();
            update(&mut scratch_store, &documents(&objects.join("---\n")));
            if step == 4 {
                // The scratch store never saw b's good version.
                assert_eq!(scratch_store.counts().0, store.counts().0 - 1);
            } else {
                frontends(&mut scratch_store, &mut scratch);
                // What is in effect, not when each claim arrived (which only history has).
                let effective = |desired: &Desired| {
                    (
                        desired
                            .frontends()
                            .map(|(f, t)| (*f, t.clone()))
                            .collect::<Vec<_>>(),
                        desired.conflicts(),
                        desired.not_in_datapath.clone(),
                    )
                };
                assert_eq!(effective(&desired), effective(&scratch), "step {step}");
            }

            let plan = plan::plan(
                &programmed,
                |f| desired.target(f).map(|t| (&t.service, &t.spec)),
                &touched,
                &crate::agent::DEFAULT_CEILING,
                false,
            );
            assert!(plan.refused.is_empty());
            programmed.apply(&plan.ops);
            let wanted: Vec<(Frontend, Vec<BackendAddr>)> = desired
                .frontends()
                .map(|(f, t)| (*f, t.spec.backends.iter().copied().collect()))
                .collect();
            let held: Vec<(Frontend, Vec<BackendAddr>)> = programmed
                .frontends
                .keys()
                .map(|f| (*f, programmed.backends_of(f)))
                .collect();
            assert_eq!(held, wanted, "step {step}");
            let referenced: BTreeSet<_> = programmed
                .frontends
                .values()
                .flat_map(|f| f.slots.iter().copied())
                .collect();
            assert_eq!(
                programmed.backends.keys().copied().collect::<BTreeSet<_>>(),
                referenced,
                "step {step}: backends no slot names stay"
            );
        }
        assert_eq!(programmed, Programmed::default());
    }

    #[test]
    fn an_unchanged_version_is_not_converted_again() {
        let mut store = Store::default();
        let deliver = |store: &mut Store, yaml: &str| update_at(store, &documents(yaml), "7");
        assert!(deliver(&mut store, A).is_empty());
        assert_eq!(store.take_changed().len(), 1);
        // Same version, different text: a source only does that if its object did not
        // change, so the store does not even look.
        assert!(deliver(&mut store, &A.replace("port: 80", "port: 0")).is_empty());
        assert!(store.take_changed().is_empty());
    }

    #[test]
    fn an_object_defined_twice_keeps_the_first_definition() {
        let mut store = Store::default();
        let yaml = format!("{A}---\n{}", A.replace("10.96.0.10", "10.96.0.99"));
        let problems = update(&mut store, &documents(&yaml));
        assert_eq!(
            problems,
            ["m.yaml: Service default/a: defined more than once; the first definition is used"]
        );
        let frontends = frontends(&mut store, &mut Desired::default());
        assert_eq!(frontends[0].address.to_string(), "10.96.0.10");
    }

    #[test]
    fn a_second_definition_in_another_file_takes_over_when_the_first_goes() {
        let mut store = Store::default();
        update_from(&mut store, "a.yaml", &documents(A), "1");
        let problems = update_from(
            &mut store,
            "b.yaml",
            &documents(&A.replace("10.96.0.10", "10.96.0.99")),
            "2",
        );
        assert_eq!(
            problems,
            ["b.yaml: Service default/a: defined more than once; another definition is in effect"]
        );
        let mut desired = Desired::default();
        assert_eq!(
            frontends(&mut store, &mut desired)[0].address.to_string(),
            "10.96.0.10"
        );
        // a.yaml goes: b.yaml's definition, which the store kept, is in effect at once.
        store.remove_origin(&Origin::file(Path::new("a.yaml")));
        assert!(store.problems().is_empty());
        assert_eq!(
            frontends(&mut store, &mut desired)[0].address.to_string(),
            "10.96.0.99"
        );
        assert_eq!(store.counts(), (1, 0));
    }

    #[test]
    fn a_watch_event_touches_only_its_object() {
        let api = Origin::api(Kind::EndpointSlice);
        let mut store = Store::default();
        let yaml = format!(
            "{A}---\n{B}---\n{}---\n{}",
            slice("a-1", "a", &["10.244.0.1"]),
            slice("b-1", "b", &["10.244.0.2"])
        );
        let docs = documents(&yaml);
        store.replace(
            &Origin::api(Kind::Service),
            docs.iter()
                .filter(|d| d.kind == Kind::Service)
                .map(|d| Delivered {
                    kind: d.kind,
                    id: d.id.clone(),
                    version: "1",
                    object: delivered_object(d),
                }),
        );
        store.replace(
            &api,
            docs.iter()
                .filter(|d| d.kind == Kind::EndpointSlice)
                .map(|d| Delivered {
                    kind: d.kind,
                    id: d.id.clone(),
                    version: "1",
                    object: delivered_object(d),
                }),
        );
        assert_eq!(store.take_changed().len(), 2);
        let moved = documents(&slice("a-1", "a", &["10.244.0.9"]));
        store.put(
            &api,
            Delivered {
                kind: Kind::EndpointSlice,
                id: moved[0].id.clone(),
                version: "2",
                object: delivered_object(&moved[0]),
            },
        );
        assert_eq!(store.take_changed(), [ObjectRef::new("default", "a")]);
        store.remove(&api, Kind::EndpointSlice, &ObjectRef::new("default", "b-1"));
        assert_eq!(store.take_changed(), [ObjectRef::new("default", "b")]);
        assert_eq!(store.counts(), (2, 1));
    }

    /// One endpoint change among a thousand Services: one object converted, one Service
    /// recomputed, one frontend planned, a handful of map writes.
    #[test]
    fn an_endpoint_change_costs_its_own_service_and_nothing_more() {
        let services: String = (0..1000)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n---\n{}---\n",
                    i / 250,
                    i % 250 + 1,
                    slice(&format!("s{i}-1"), &format!("s{i}"), &["10.244.0.1", "10.244.0.2"])
                )
            })
            .collect();
        let mut store = Store::default();
        let mut desired = Desired::default();
        let mut programmed = Programmed::default();
        let mut sync = |store: &mut Store, programmed: &mut Programmed| {
            let changed = store.take_changed();
            let touched = desired.update(
                changed.iter().map(|id| (id, store.service(id))),
                &Node::default(),
            );
            let plan = plan::plan(
                programmed,
                |f| desired.target(f).map(|t| (&t.service, &t.spec)),
                &touched,
                &crate::agent::DEFAULT_CEILING,
                false,
            );
            programmed.apply(&plan.ops);
            (changed.len(), touched.len(), plan.ops.len())
        };
        // s7's slice lives in a file of its own, as an EndpointSlice a controller rewrites.
        let s7 = |ips: &[&str]| documents(&slice("s7-1", "s7", ips));
        let all = services.replace(
            &format!(
                "---\n{}",
                slice("s7-1", "s7", &["10.244.0.1", "10.244.0.2"])
            ),
            "",
        );
        assert_ne!(all.len(), services.len());
        update_from(&mut store, "all.yaml", &documents(&all), "1");
        update_from(
            &mut store,
            "s7.yaml",
            &s7(&["10.244.0.1", "10.244.0.2"]),
            "2",
        );
        assert_eq!(store.conversions, 2000);
        assert_eq!(
            sync(&mut store, &mut programmed),
            (1000, 1000, 1000 * 3 + 2)
        );

        // One endpoint of s7 goes: one object converted.
        update_from(&mut store, "s7.yaml", &s7(&["10.244.0.1"]), "3");
        assert_eq!(store.conversions, 2001);
        // One Service recomputed, one frontend planned: its slot 2 goes, its master
        // shrinks.
        assert_eq!(sync(&mut store, &mut programmed), (1, 1, 2));
    }

    #[test]
    fn a_broken_copy_in_an_earlier_file_does_not_take_down_a_good_definition() {
        let mut store = Store::default();
        update_from(&mut store, "b.yaml", &documents(A), "1");
        let mut desired = Desired::default();
        assert_eq!(frontends(&mut store, &mut desired).len(), 1);
        let problems = update_from(
            &mut store,
            "a.yaml",
            &manifest::parse(Path::new("a.yaml"), &A.replace("port: 80", "port: 0")).unwrap(),
            "2",
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("a.yaml: Service default/a: spec.ports[0].port"));
        assert!(
            store.take_changed().is_empty(),
            "b.yaml's definition stays in effect"
        );
        assert_eq!(store.counts(), (1, 0));
    }
}
