//! The lifecycle every Waymark process shares.
//!
//! - [`drain`]: a drain signal that every connection and long response (long polls, event
//!   streams) holds, so that a shutdown can tell them all to finish and know when they have,
//!   within its deadline.
//! - [`readiness`]: readiness made of named tokens, so that `/healthz/ready` says what the
//!   process still waits for (the store, DNS, a certificate...).
//! - [`bounded`]: admission for per-connection and per-request work: a cap in total and per
//!   client, so that no flood grows tasks, memory or descriptors without limit.
//! - [`accept`]: an accept loop that backs off when out of descriptors instead of spinning.

pub mod accept;
pub mod bounded;
pub mod drain;
pub mod readiness;
