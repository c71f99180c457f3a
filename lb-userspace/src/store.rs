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
                        if !m.ipv4 {
                            // Kept (it is valid) but unused until the IPv6 programs exist.
                            problems.push(format!(
                                "{}EndpointSlice {}: addressType: {} is not served yet; skipped",
                                delivered.origin, m.id, slice.address_type
                            ));
                        }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest::{self, Document};

    fn documents(yaml: &str) -> Vec<Document> {
        manifest::parse(Path::new("m.yaml"), yaml).unwrap()
    }

    fn update(store: &mut Store, documents: &[Document]) -> Problems {
        store.update(documents.iter().map(|d| Delivered {
            kind: d.kind,
            id: d.id.clone(),
            object: d.object.as_ref().map_err(ToString::to_string),
            origin: "m.yaml: ".into(),
        }))
    }

    const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

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
        let desired = store.desired(&Node::default());
        assert_eq!(desired.frontends.len(), 1);
        assert_eq!(desired.frontends.keys().next().unwrap().port, 80);

        assert!(update(&mut store, &[]).is_empty());
        assert_eq!(store.counts(), (0, 0));
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
}
