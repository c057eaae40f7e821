//! Waymark's common crate: what every Waymark process shares.
//!
//! - [`model`]: services, instances, health: the registry's vocabulary.
//! - [`select`]: which instances serve a name (health, draining, tags, weights, panic mode),
//!   the one rule that DNS, the ingress and the forwarder apply.
//! - [`mirror`]: the in-memory registry mirror every process keeps, with a global change index,
//!   change notifications and a change log that lets a follower resume without loss.
//! - `etcd` (feature `etcd`): reaching etcd, and the registry's key layout in it.
//! - [`follow`]: following a registry into a mirror (a resolver's change stream; etcd).
//! - [`forwarders`]: how a host's forwarder announces itself in the registry.
//! - [`files`]: writing a small file whole (temporary file, fsync, rename).
//! - [`vip`]: virtual IP ranges and where a service's VIP goes in one.
//! - [`duration`]: Go-style durations (`"10s"`, `"1m30s"`), the form Consul clients send.
//! - [`telemetry`]: logging setup through `tracing`.
//! - [`log_sink`]: stderr as one ordered sink: urgent log lines, buffered access lines.
//! - [`report`]: an error and its causes on one line, each said once.
//! - [`lifecycle`]: drain, readiness, bounded admission and accept loops: what every
//!   process needs to start, stay up under floods and stop within its deadline.
//! - [`webui`]: what the resolver's and the gateway's web views share: the stylesheet, how
//!   built-in assets are served, the pages' security policy.

pub mod duration;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod files;
pub mod follow;
pub mod forwarders;
pub mod lifecycle;
pub mod log_sink;
pub mod mirror;
pub mod model;
pub mod report;
pub mod select;
pub mod telemetry;
pub mod vip;
pub mod webui;

pub use mirror::{Changes, Freshness, Mirror, ServiceView};
pub use model::{CheckView, Extra, Health, Instance, ServiceAttrs, TaggedAddress};
