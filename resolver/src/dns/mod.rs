//! DNS: the mesh zone answered from the registry mirror, everything else forwarded.
//!
//! - [`answer`]: the pure decision — which records a query gets, from a mirror snapshot.
//! - [`fit`]: sizing a reply to the client's payload limit (truncation).
//! - [`forward`]: relaying names outside the zone to upstream resolvers.
//! - [`server`]: the hickory `RequestHandler` that ties them to sockets.

pub mod answer;
pub mod fit;
pub mod forward;
pub mod server;

pub use answer::Zone;
