//! Ferry's sources and publisher.
//!
//! Sources turn outside state into [`ferry_model::Index`] changes; the task owning the index
//! publishes snapshots through a [`Publisher`] to every [`Snapshots`] reader:
//!
//! ```text
//! manifest dir --load_dir--> FileSource --apply/delete--> Index --build--> Publisher --> Snapshots
//!       (inotify events, ReloadHandle, DNS timer)     ^                   (ArcSwap + watch)
//! API server --watchers--> KubeSource --apply/relist--+
//! ```
//!
//! - [`cluster`]: [`KubeSource`], which watches the Kubernetes API server.
//! - [`manifest`]: parses and validates a directory of manifests, reporting every problem.
//! - [`file`]: [`FileSource`], which loads, watches, reloads and re-resolves backend names.
//! - [`publish`]: [`Publisher`] / [`Snapshots`].

pub mod cluster;
pub mod file;
pub mod manifest;
pub mod publish;
#[cfg(test)]
mod test_util;

pub use cluster::{ClientConfig, KubeSource, KubeSourceError, KubeSourceOptions};
pub use file::{FileSource, FileSourceOptions, ReloadHandle, ReloadStatus, SourceError};
pub use manifest::{ConfigError, Manifests, Origin, Problem, load_dir};
pub use publish::{Publisher, Snapshots, publisher};
