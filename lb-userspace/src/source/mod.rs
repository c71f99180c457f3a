//! Where Services and EndpointSlices come from: a directory of manifests, or the Kubernetes
//! API. Either way the agent gets a complete snapshot per sync and a signal when something
//! changed.

pub mod api;
pub mod kubernetes;
pub mod manifests;
pub mod parse;

use std::time::Instant;

use tokio::sync::mpsc;

use crate::store::{Problems, Store};

/// Tells the sync loop that something changed, and when.
pub type Changes = mpsc::UnboundedSender<Change>;

/// A change a source saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Complete: a watch event, a file closed after writing, renamed into place or removed.
    /// The agent syncs at once.
    Complete(Instant),
    /// A file is being written: the agent syncs once it is closed, or after
    /// [`manifests::SETTLE`] without a write for writers that never close it.
    Unsettled(Instant),
}

/// A running source.
pub enum Source {
    Manifests(manifests::Manifests),
    Kubernetes(kubernetes::Kubernetes),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Manifests(#[from] Box<crate::source::parse::ManifestError>),
    #[error("watching {path}: {source}")]
    Watch {
        path: std::path::PathBuf,
        source: notify::Error,
    },
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubernetesError),
}

impl Source {
    /// Brings `store` in line with the source's current objects.
    pub fn refresh(&mut self, store: &mut Store) -> Result<Problems, SourceError> {
        match self {
            Source::Manifests(manifests) => manifests.refresh(store),
            Source::Kubernetes(kubernetes) => Ok(kubernetes.refresh(store)),
        }
    }

    /// Makes the next refresh read the source anew: every manifest file (the Kubernetes
    /// watches deliver every change as it is, so there is nothing to read again).
    pub fn reread(&self) {
        match self {
            Source::Manifests(manifests) => manifests.reread(),
            Source::Kubernetes(_) => {}
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Manifests(manifests) => format!("manifests in {}", manifests.dir().display()),
            Source::Kubernetes(_) => "the Kubernetes API".to_owned(),
        }
    }
}
