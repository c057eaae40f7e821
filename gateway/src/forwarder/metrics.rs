//! The forwarder's metrics (Prometheus text on the admin listener, prefix
//! `waymark_forwarder_`), in the ingress's style: counters by service, gauges for what is
//! open now and for the link to the registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceStatus {
    pub service: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceDirection {
    pub service: String,
    /// `sent` (client to instance) or `received` (instance to client).
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The other host's name.
    pub host: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerResult {
    pub host: String,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerDirection {
    pub host: String,
    /// `sent` (to the peer) or `received`.
    pub direction: &'static str,
}

/// Every metric the forwarder exports.
pub struct Metrics {
    registry: Registry,
    pub listeners: Gauge,
    pub bind_failures: Family<ServiceLabel, Counter>,
    pub connections: Family<ServiceLabel, Counter>,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub connect_failures: Family<ServiceLabel, Counter>,
    pub no_instance: Family<ServiceLabel, Counter>,
    pub retries: Family<ServiceLabel, Counter>,
    pub ejections: Family<ServiceLabel, Counter>,
    pub requests: Family<ServiceStatus, Counter>,
    pub bytes: Family<ServiceDirection, Counter>,
    pub registry_connected: Gauge,
    pub registry_index: Gauge,
    pub registry_age_ms: Gauge,
    pub registered: Gauge,
    pub announce_failures: Counter,
    pub peer_handshakes: Family<PeerLabel, Counter>,
    pub peer_streams: Family<PeerResult, Counter>,
    pub peer_bytes: Family<PeerDirection, Counter>,
    pub unmeshed_connects: Counter,
    pub inbound_streams: Family<PeerResult, Counter>,
    pub inbound_handshakes_refused: Counter,
    pub inbound_unreachable: Counter,
    pub certificate_expiry_seconds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("waymark_forwarder");
        let listeners = Gauge::default();
        r.register("listeners", "VIP:port listeners open", listeners.clone());
        let bind_failures = Family::<ServiceLabel, Counter>::default();
        r.register(
            "listener_bind_failures",
            "VIP:port listeners that could not bind, by service (retried on the next change)",
            bind_failures.clone(),
        );
        let connections = Family::<ServiceLabel, Counter>::default();
        r.register(
            "connections",
            "Client connections accepted, by service",
            connections.clone(),
        );
        let connections_open = Gauge::default();
        r.register(
            "connections_open",
            "Client connections open",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        r.register(
            "connections_refused",
            "Client connections closed at once because max_connections were open",
            connections_refused.clone(),
        );
        let connect_failures = Family::<ServiceLabel, Counter>::default();
        r.register(
            "connect_failures",
            "Connects to instances refused or timed out, by service",
            connect_failures.clone(),
        );
        let no_instance = Family::<ServiceLabel, Counter>::default();
        r.register(
            "no_instance",
            "Connections or requests failed for want of an instance that answers, by service",
            no_instance.clone(),
        );
        let retries = Family::<ServiceLabel, Counter>::default();
        r.register(
            "retries",
            "Tries after the first (connects or requests), by service",
            retries.clone(),
        );
        let ejections = Family::<ServiceLabel, Counter>::default();
        r.register(
            "outlier_ejections",
            "Instances ejected after failures, by service",
            ejections.clone(),
        );
        let requests = Family::<ServiceStatus, Counter>::default();
        r.register(
            "requests",
            "HTTP requests answered, by service and status",
            requests.clone(),
        );
        let bytes = Family::<ServiceDirection, Counter>::default();
        r.register(
            "tcp_bytes",
            "Bytes copied on TCP connections, by service and direction",
            bytes.clone(),
        );
        let registry_connected = Gauge::default();
        r.register(
            "registry_connected",
            "1 while the registry answers the change stream, 0 while the forwarder serves its last good state",
            registry_connected.clone(),
        );
        let registry_index = Gauge::default();
        r.register(
            "registry_index",
            "The registry change index applied",
            registry_index.clone(),
        );
        let registry_age_ms = Gauge::default();
        r.register(
            "registry_state_age_milliseconds",
            "Time since the registry last answered (-1 before it ever did)",
            registry_age_ms.clone(),
        );
        let registered = Gauge::default();
        r.register(
            "registered",
            "1 while the forwarder's own registration is in place and its last heartbeat went through",
            registered.clone(),
        );
        let announce_failures = Counter::default();
        r.register(
            "announce_failures",
            "Registrations and heartbeats of the forwarder itself that failed",
            announce_failures.clone(),
        );
        let peer_handshakes = Family::<PeerLabel, Counter>::default();
        r.register(
            "peer_handshakes",
            "Mutual-TLS connections made to other hosts' forwarders, by host",
            peer_handshakes.clone(),
        );
        let peer_streams = Family::<PeerResult, Counter>::default();
        r.register(
            "peer_streams",
            "Streams asked of other hosts' forwarders, by host and result (ok, peer_unreachable, target_unreachable, not_here, refused)",
            peer_streams.clone(),
        );
        let peer_bytes = Family::<PeerDirection, Counter>::default();
        r.register(
            "peer_bytes",
            "Bytes through streams to other hosts' forwarders, by host and direction",
            peer_bytes.clone(),
        );
        let unmeshed_connects = Counter::default();
        r.register(
            "unmeshed_connects",
            "Connects made directly to instances on hosts without a forwarder (or from a forwarder outside the mesh)",
            unmeshed_connects.clone(),
        );
        let inbound_streams = Family::<PeerResult, Counter>::default();
        r.register(
            "inbound_streams",
            "Streams other hosts' forwarders asked of this one, by calling host and result (admitted, not_here, forbidden)",
            inbound_streams.clone(),
        );
        let inbound_handshakes_refused = Counter::default();
        r.register(
            "inbound_handshakes_refused",
            "Connections to the inbound listener without a valid mesh certificate",
            inbound_handshakes_refused.clone(),
        );
        let inbound_unreachable = Counter::default();
        r.register(
            "inbound_unreachable",
            "Admitted inbound streams whose instance did not accept the connection",
            inbound_unreachable.clone(),
        );
        let certificate_expiry_seconds = Gauge::default();
        r.register(
            "certificate_expiry_seconds",
            "Seconds until the host's mesh certificate expires (-1 without one)",
            certificate_expiry_seconds.clone(),
        );
        Metrics {
            registry: r,
            listeners,
            bind_failures,
            connections,
            connections_open,
            connections_refused,
            connect_failures,
            no_instance,
            retries,
            ejections,
            requests,
            bytes,
            registry_connected,
            registry_index,
            registry_age_ms,
            registered,
            announce_failures,
            peer_handshakes,
            peer_streams,
            peer_bytes,
            unmeshed_connects,
            inbound_streams,
            inbound_handshakes_refused,
            inbound_unreachable,
            certificate_expiry_seconds,
        }
    }

    pub fn service(service: &str) -> ServiceLabel {
        ServiceLabel {
            service: service.to_string(),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_labels() {
        let m = Metrics::new();
        m.connect_failures
            .get_or_create(&Metrics::service("pay"))
            .inc();
        m.bytes
            .get_or_create(&ServiceDirection {
                service: "pay".into(),
                direction: "sent",
            })
            .inc_by(5);
        let text = m.encode();
        assert!(
            text.contains("waymark_forwarder_connect_failures_total{service=\"pay\"} 1"),
            "{text}"
        );
        assert!(text
            .contains("waymark_forwarder_tcp_bytes_total{service=\"pay\",direction=\"sent\"} 5"));
        assert!(text.contains("waymark_forwarder_registered"));
    }
}
