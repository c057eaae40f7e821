//! DNS: the mesh zone answered from the registry mirror, everything else forwarded.
//!
//! - [`answer`]: the pure decision — which records a query gets, from a mirror snapshot.
//! - [`consul`]: Consul's names (`<service>.service.consul`...), translated to the zone's.
//! - [`fit`]: sizing a reply to the client's payload limit (truncation).
//! - [`forward`]: relaying names outside the zone to upstream resolvers.
//! - [`names`]: how registrations become names, and which ones DNS can answer.
//! - [`server`]: the hickory `RequestHandler` (every query over TCP, and the UDP queries the
//!   fast path leaves), and binding the sockets.
//! - [`udp`]: the UDP worker threads, receiving and sending in batches ([`batch`]).
//! - [`tcp`]: DNS over TCP, with caps on connections and idle time.
//! - [`vips`]: who is answered VIPs (`--vip-answers`), and whether this host's forwarder is
//!   ready.
//! - [`rrl`]: response-rate limiting for clients outside the exempt networks.
//! - [`reply`]: one reply as bytes, from hickory's parser and the handler (UDP slow path, TCP).
//! - [`fast`]: the UDP fast path, answering the zone from [`cache`], in the wire form that
//!   [`wire`] reads and patches.

pub mod answer;
pub mod batch;
pub mod cache;
pub mod consul;
pub mod fast;
pub mod fit;
pub mod forward;
pub mod names;
pub mod reply;
pub mod rrl;
pub mod server;
pub mod tcp;
pub mod udp;
pub mod vips;
pub mod wire;

pub use answer::Zone;
