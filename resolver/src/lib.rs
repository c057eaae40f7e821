//! `waymark-resolver`: the DNS resolver that answers service names from the registry, and the
//! host of the embedded registry.
//!
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`registry`]: the embedded registry of record: registrations, health checks, hysteresis.
//! - [`store`]: persistence of the registry in the data dir.
//! - [`dns`]: the DNS server: answers for the zone, forwarding for the rest.
//! - [`metrics`]: Prometheus metrics.

pub mod config;
pub mod metrics;
pub mod registry;
pub mod store;
pub mod dns;
