//! Logging for Waymark processes: `tracing` to stderr, filtered by `RUST_LOG` (default `info`,
//! with hickory's per-query logs held back to `warn`), as text or JSON lines. Each event is
//! written at once through the [`log_sink`](crate::log_sink), after any buffered access
//! lines, so stderr keeps the order in which lines were made.

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,hickory_server=warn,hickory_net=warn,hickory_proto=warn";

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::log_sink::UrgentWriter::default);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
