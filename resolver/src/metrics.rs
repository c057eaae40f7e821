//! The resolver's Prometheus metrics: one registry, the families every module updates, and
//! the text encoding served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `udp` or `tcp`.
    pub proto: &'static str,
    /// `answer`, `nodata`, `nxdomain`, `forwarded`, `refused`, `servfail`, `formerr`, `notimp`;
    /// `dropped`: a UDP query the slow path had no room for.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    /// `ok`, `timeout`, `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `dropped` or `slipped` (sent truncated).
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `http` or `dns_tcp`.
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `http` or `dns_tcp`.
    pub listener: &'static str,
    /// `total` or `per_client`: which cap was reached.
    pub cap: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// `http`, `tcp`, `ttl`.
    pub kind: &'static str,
    /// `passing`, `warning`, `critical`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// The health an instance moved to.
    pub to: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub dns_queries: Family<DnsLabels, Counter>,
    pub dns_truncated: Counter,
    pub dns_cache_hits: Counter,
    pub dns_cache_misses: Counter,
    pub upstream_queries: Family<UpstreamLabels, Counter>,
    pub api_requests: Family<ApiLabels, Counter>,
    pub instances: Gauge,
    pub services: Gauge,
    pub change_index: Gauge,
    pub check_runs: Family<CheckLabels, Counter>,
    pub check_transitions: Family<TransitionLabels, Counter>,
    pub store_errors: Counter,
    pub connections: Family<ListenerLabels, Gauge>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub dns_rate_limited: Family<ActionLabels, Counter>,
    pub store_writable: Gauge,
    pub ca_signed: Family<ResultLabels, Counter>,
    pub etcd: EtcdMetrics,
}

/// With etcd as the registry of record: the follower's and the publisher's state, read from
/// them at every scrape.
#[derive(Default)]
pub struct EtcdMetrics {
    pub connected: Gauge,
    pub synced: Gauge,
    pub revision: Gauge,
    pub age_ms: Gauge,
    pub listings: Counter,
    pub events: Counter,
    pub bad_values: Counter,
    pub writes: Counter,
    pub failures: Counter,
}

impl EtcdMetrics {
    /// Moves a counter up to `value` (what a source counted so far).
    pub fn catch_up(counter: &Counter, value: u64) {
        let current = counter.get();
        if value > current {
            counter.inc_by(value - current);
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `issued`, or why not: `token`, `invalid`.
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("waymark");
        let m = Metrics {
            registry: Registry::default(),
            dns_queries: Family::default(),
            dns_truncated: Counter::default(),
            dns_cache_hits: Counter::default(),
            dns_cache_misses: Counter::default(),
            upstream_queries: Family::default(),
            api_requests: Family::default(),
            instances: Gauge::default(),
            services: Gauge::default(),
            change_index: Gauge::default(),
            check_runs: Family::default(),
            check_transitions: Family::default(),
            store_errors: Counter::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            dns_rate_limited: Family::default(),
            store_writable: Gauge::default(),
            ca_signed: Family::default(),
            etcd: EtcdMetrics::default(),
        };
        registry.register(
            "dns_queries",
            "DNS queries answered, by transport and outcome",
            m.dns_queries.clone(),
        );
        registry.register(
            "dns_truncated",
            "UDP answers cut to fit the client's payload size (TC set)",
            m.dns_truncated.clone(),
        );
        registry.register(
            "dns_cache_hits",
            "UDP queries for the zone answered from the answer cache",
            m.dns_cache_hits.clone(),
        );
        registry.register(
            "dns_cache_misses",
            "UDP queries for the zone whose answer had to be computed",
            m.dns_cache_misses.clone(),
        );
        registry.register(
            "dns_upstream_queries",
            "Queries forwarded to upstream resolvers, by upstream and result",
            m.upstream_queries.clone(),
        );
        registry.register(
            "api_requests",
            "Registration API requests, by method and status",
            m.api_requests.clone(),
        );
        registry.register(
            "registry_instances",
            "Registered instances",
            m.instances.clone(),
        );
        registry.register(
            "registry_services",
            "Registered services",
            m.services.clone(),
        );
        registry.register(
            "registry_change_index",
            "The registry's change index",
            m.change_index.clone(),
        );
        registry.register(
            "health_check_runs",
            "Health check probes run, by kind and result",
            m.check_runs.clone(),
        );
        registry.register(
            "health_check_transitions",
            "Health checks that changed status, by new status",
            m.check_transitions.clone(),
        );
        registry.register(
            "store_errors",
            "Failed writes to the data dir (log appends, snapshots)",
            m.store_errors.clone(),
        );
        registry.register(
            "connections",
            "Open connections, by listener",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once because a cap was reached, by listener and cap",
            m.connections_refused.clone(),
        );
        registry.register(
            "store_writable",
            "1 while the data dir can be written; 0 after a failed write, until a write or a \
             probe succeeds",
            m.store_writable.clone(),
        );
        registry.register(
            "dns_rate_limited",
            "UDP answers held back by response-rate limiting, by action",
            m.dns_rate_limited.clone(),
        );
        registry.register(
            "ca_sign_requests",
            "Certificate signing requests to the mesh CA, by result (issued, token, invalid)",
            m.ca_signed.clone(),
        );
        let e = &m.etcd;
        for (name, help, gauge) in [
            (
                "etcd_connected",
                "1 while the etcd watch is up",
                &e.connected,
            ),
            (
                "etcd_synced",
                "1 while every registration of this host is in etcd",
                &e.synced,
            ),
            (
                "etcd_revision",
                "The etcd revision the mirror is complete at",
                &e.revision,
            ),
            (
                "etcd_mirror_age_milliseconds",
                "Time since etcd was last heard from (the age of what DNS answers)",
                &e.age_ms,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        for (name, help, counter) in [
            ("etcd_listings", "Full listings of the registry in etcd (the first, and one after every broken or compacted watch)", &e.listings),
            ("etcd_watch_events", "Watch events applied to the mirror", &e.events),
            ("etcd_bad_values", "Keys under the prefix whose value is not an instance (left out)", &e.bad_values),
            ("etcd_writes", "Instance writes and deletions this host sent to etcd", &e.writes),
            ("etcd_failures", "Follower and publisher sessions that failed (etcd unreachable, lease lost)", &e.failures),
        ] {
            registry.register(name, help, counter.clone());
        }
        Metrics { registry, ..m }
    }

    /// Counts an answer held back by response-rate limiting.
    pub fn rate_limited(&self, action: &'static str) {
        self.dns_rate_limited
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    /// Counts a connection refused by `listener` at `refused`'s cap.
    pub fn connection_refused(
        &self,
        listener: &'static str,
        refused: waymark_shared::lifecycle::bounded::Refused,
    ) {
        use waymark_shared::lifecycle::bounded::Refused;
        let cap = match refused {
            Refused::Total(_) => "total",
            Refused::PerKey(_) => "per_client",
        };
        self.connections_refused
            .get_or_create(&RefusedLabels { listener, cap })
            .inc();
    }

    /// Sets the number of open connections of `listener`.
    pub fn set_connections(&self, listener: &'static str, open: usize) {
        self.connections
            .get_or_create(&ListenerLabels { listener })
            .set(open as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
