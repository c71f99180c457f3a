//! The last good version of every object, whatever the source: an object that turns
//! invalid keeps its last good version, an object that is gone is removed.

use std::collections::BTreeMap;

use crate::{
    manifest::{ApiObject, Kind},
    model::{self, Desired, Node, ObjectRef, ServiceModel, SliceModel},
};

/// One object as a source delivers it: its identity, and the object or why it is unusable
/// (the reason names where it came from, the object and the field).
pub struct Delivered<'a> {
    pub kind: Kind,
    pub id: ObjectRef,
    pub object: Result<&'a ApiObject, String>,
    /// Where the object came from, to prefix model errors with (a file, or empty).
    pub origin: String,
}

/// Problems of one update, each naming the object and field. What they concern keeps its
/// last good state.
pub type Problems = Vec<String>;

#[derive(Default)]
pub struct Store {
    services: BTreeMap<ObjectRef, ServiceModel>,
    slices: BTreeMap<ObjectRef, SliceModel>,
}

impl Store {
    /// Replaces the store's contents with `objects`, every one validated into the model.
    pub fn update<'a>(&mut self, objects: impl IntoIterator<Item = Delivered<'a>>) -> Problems {
        let mut problems = Vec::new();
        let mut services = BTreeMap::new();
        let mut slices = BTreeMap::new();
        for delivered in objects {
            let outcome = match delivered.object {
                Ok(ApiObject::Service(service)) => ServiceModel::from_api(service)
                    .map(|m| {
                        services.insert(m.id.clone(), m);
                    })
                    .map_err(|e| format!("{}{e}", delivered.origin)),
                Ok(ApiObject::EndpointSlice(slice)) => SliceModel::from_api(slice)
                    .map(|m| {
                        slices.insert(m.id.clone(), m);
                    })
                    .map_err(|e| format!("{}{e}", delivered.origin)),
                Err(e) => Err(e),
            };
            if let Err(problem) = outcome {
                let last_good = match delivered.kind {
                    Kind::Service => self.services.get(&delivered.id).map(|m| {
                        services.insert(m.id.clone(), m.clone());
                    }),
                    Kind::EndpointSlice => self.slices.get(&delivered.id).map(|m| {
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
        self.services = services;
        self.slices = slices;
        problems
    }

    pub fn desired(&self, node: &Node) -> Desired {
        model::desired(self.services.values(), self.slices.values(), node)
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }
}
