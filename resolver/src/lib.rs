//! `waymark-resolver`: the DNS resolver that answers service names from the registry, and the
//! host of the embedded registry.
//!
//! - [`app`]: assembling and starting everything ([`app::build`] returns the bound addresses).
//! - [`api`]: the HTTP API: Consul-compatible registration, change stream, admin.
//! - [`client`]: the client subcommands (register, deregister, list).
//! - [`demo`]: the one-command local mesh.
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`registry`]: the embedded registry of record: registrations, health checks, hysteresis.
//! - [`services_file`]: third-party registration from a TOML file.
//! - [`store`]: persistence of the registry in the data dir.
//! - [`dns`]: the DNS server: answers for the zone, forwarding for the rest.
//! - [`metrics`]: Prometheus metrics.
//! - [`ca`]: the mesh certificate authority that signs forwarders' certificates.
//! - [`nodes`]: the nodes Consul's API and DNS names show, computed from the registry.

pub mod api;
pub mod app;
pub mod ca;
pub mod client;
pub mod config;
pub mod demo;
pub mod dns;
pub mod etcd;
pub mod metrics;
pub mod nodes;
pub mod registry;
pub mod services_file;
pub mod store;
