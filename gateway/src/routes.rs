//! The route table: which service a public request goes to. Pure: built from the config's
//! routes and the registry's services (their `waymark-public-host` / `waymark-public-path`
//! metadata), then matched against a request's host, path and headers.
//!
//! Matching: the host must equal the route's host (case-insensitively, port and one trailing
//! dot ignored: `api.test.` is `api.test`) or the route has no host; the path must start with the route's prefix on a segment boundary; a
//! route with a header condition needs that header. Among the routes that match, the longest
//! prefix wins; at equal length a route with a header condition beats one without, a route
//! with a host beats a hostless one, and a config route beats a metadata one.

use std::collections::BTreeMap;
use std::sync::Arc;

use waymark_shared::ServiceView;

use crate::config::{normalize_prefix, RateLimit, RouteConfig};

/// Registration metadata that exposes a service on a public host.
pub const META_HOST: &str = "waymark-public-host";
/// Registration metadata that exposes a service under a public path prefix (default `/`).
pub const META_PATH: &str = "waymark-public-path";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("instance {instance} of {service}: {key} {value:?} is not a path prefix")]
    BadMetaPath {
        service: String,
        instance: String,
        key: &'static str,
        value: String,
    },
}

/// Where a route sends requests: one tag subset, or a weighted split between several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Instances must carry all of these tags.
    pub tags: Vec<String>,
    pub weight: u32,
}

/// One route, ready to match.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// For metrics and logs.
    pub name: String,
    /// Lowercased; none matches any host.
    pub host: Option<String>,
    /// Normalized prefix: starts with `/`, no trailing `/` unless it is `/`.
    pub prefix: String,
    /// Lowercased header name and the exact value.
    pub header: Option<(String, String)>,
    pub service: String,
    /// At least one; more than one is a weighted split.
    pub backends: Vec<Backend>,
    pub strip_prefix: bool,
    pub upstream_h2c: bool,
    pub rate_limit: Option<RateLimit>,
    /// Came from registration metadata rather than the config file.
    pub from_metadata: bool,
}

impl Route {
    pub fn from_config(c: &RouteConfig) -> Route {
        let backends = if c.split.is_empty() {
            vec![Backend {
                tags: c.tags.clone(),
                weight: 1,
            }]
        } else {
            c.split
                .iter()
                .map(|s| Backend {
                    tags: s.tags.clone(),
                    weight: s.weight,
                })
                .collect()
        };
        Route {
            name: c.display_name(),
            host: c.host.as_deref().map(|h| h.to_ascii_lowercase()),
            prefix: normalize_prefix(&c.path),
            header: c
                .header
                .as_ref()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone())),
            service: c.service.clone(),
            backends,
            strip_prefix: c.strip_prefix,
            upstream_h2c: c.upstream_h2c,
            rate_limit: c.rate_limit,
            from_metadata: false,
        }
    }

    /// Whether `path` (no query) is under this route's prefix, on a segment boundary.
    fn path_matches(&self, path: &str) -> bool {
        if self.prefix == "/" {
            return true;
        }
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The path and query to forward: the prefix removed when the route strips it.
    pub fn rewrite(&self, path_and_query: &str) -> String {
        if !self.strip_prefix || self.prefix == "/" {
            return path_and_query.to_string();
        }
        match path_and_query.strip_prefix(self.prefix.as_str()) {
            Some("") => "/".into(),
            Some(rest) if rest.starts_with('?') => format!("/{rest}"),
            Some(rest) => rest.to_string(),
            None => path_and_query.to_string(),
        }
    }

    /// The backend for one request: the only one, or one by weight (`roll` in `0..1`).
    pub fn pick_backend(&self, roll: f64) -> &Backend {
        if self.backends.len() == 1 {
            return &self.backends[0];
        }
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        let mut point = (roll.clamp(0.0, 1.0) * total as f64) as u64;
        for b in &self.backends {
            if point < u64::from(b.weight) {
                return b;
            }
            point -= u64::from(b.weight);
        }
        self.backends
            .iter()
            .rev()
            .find(|b| b.weight > 0)
            .unwrap_or(&self.backends[0])
    }

    fn rank(&self) -> (usize, bool, bool, bool) {
        (
            self.prefix.len(),
            self.header.is_some(),
            self.host.is_some(),
            !self.from_metadata,
        )
    }
}

/// The routes in force; rebuilt whole when the config or the registry changes.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    /// Best rank first, so the first match wins.
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from config routes and the metadata of registered instances. A
    /// metadata route that collides with a config route (same host and prefix, no header) is
    /// left out: the config file wins. Bad metadata is reported and skipped.
    pub fn build(
        config: &[RouteConfig],
        services: &[Arc<ServiceView>],
        metadata_routes: bool,
    ) -> (RouteTable, Vec<RouteError>) {
        let mut routes: Vec<Route> = config.iter().map(Route::from_config).collect();
        let mut errors = Vec::new();
        if metadata_routes {
            // (host, prefix) → service; the first instance (registration order) names it.
            let mut exposed: BTreeMap<(String, String), String> = BTreeMap::new();
            let mut sorted: Vec<&Arc<ServiceView>> = services.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            for view in sorted {
                for inst in &view.instances {
                    let Some(host) = inst.meta.get(META_HOST) else {
                        continue;
                    };
                    let path = inst.meta.get(META_PATH).map_or("/", String::as_str);
                    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                        errors.push(RouteError::BadMetaPath {
                            service: view.name.to_string(),
                            instance: inst.id.to_string(),
                            key: META_PATH,
                            value: path.to_string(),
                        });
                        continue;
                    }
                    let key = (host.to_ascii_lowercase(), normalize_prefix(path));
                    exposed.entry(key).or_insert_with(|| view.name.to_string());
                }
            }
            for ((host, prefix), service) in exposed {
                let clash = routes.iter().any(|r| {
                    r.header.is_none() && r.host.as_deref() == Some(&host) && r.prefix == prefix
                });
                if clash {
                    continue;
                }
                routes.push(Route {
                    name: format!("{host}{prefix}"),
                    host: Some(host),
                    prefix,
                    header: None,
                    service,
                    backends: vec![Backend {
                        tags: vec![],
                        weight: 1,
                    }],
                    strip_prefix: false,
                    upstream_h2c: false,
                    rate_limit: None,
                    from_metadata: true,
                });
            }
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.rank()));
        (
            RouteTable {
                routes: routes.into_iter().map(Arc::new).collect(),
            },
            errors,
        )
    }

    /// The route for a request: `host` as sent (port allowed), `path` without the query, and
    /// a lookup for request headers by lowercase name.
    pub fn find<'a>(
        &self,
        host: Option<&str>,
        path: &str,
        header: impl Fn(&str) -> Option<&'a str>,
    ) -> Option<Arc<Route>> {
        let host = host
            .map(strip_port)
            .map(|h| h.strip_suffix('.').unwrap_or(h))
            .map(str::to_ascii_lowercase);
        self.routes
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, &host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want == got,
                    (Some(_), None) => false,
                };
                host_ok
                    && r.path_matches(path)
                    && r.header
                        .as_ref()
                        .is_none_or(|(name, value)| header(name) == Some(value.as_str()))
            })
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// `example.test:8080` → `example.test`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use waymark_shared::Instance;

    use super::*;
    use crate::config::{HeaderMatch, SplitConfig};

    fn route(host: Option<&str>, path: &str, service: &str) -> RouteConfig {
        RouteConfig {
            name: None,
            host: host.map(str::to_string),
            path: path.into(),
            header: None,
            service: service.into(),
            tags: vec![],
            strip_prefix: false,
            split: vec![],
            upstream_h2c: false,
            rate_limit: None,
        }
    }

    fn view(name: &str, meta: &[(&str, &str)]) -> Arc<ServiceView> {
        let meta: BTreeMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Arc::new(ServiceView {
            name: name.into(),
            index: 1,
            instances: vec![Arc::new(Instance {
                id: format!("{name}-1").into(),
                service: name.into(),
                address: "127.0.0.1".into(),
                port: 1,
                tags: vec![],
                meta,
                weight_passing: 1,
                weight_warning: 1,
                checks: vec![],
                draining: false,
                node: None,
                create_index: 0,
                modify_index: 0,
                extra: None,
            })],
            attrs: Default::default(),
        })
    }

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    fn service_for(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        t.find(Some(host), path, no_headers)
            .map(|r| r.service.clone())
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let (t, errs) = RouteTable::build(
            &[
                route(Some("api.test"), "/", "root"),
                route(Some("api.test"), "/pay", "pay"),
                route(Some("api.test"), "/pay/refunds/", "refunds"),
            ],
            &[],
            true,
        );
        assert!(errs.is_empty());
        assert_eq!(service_for(&t, "api.test", "/pay").as_deref(), Some("pay"));
        assert_eq!(
            service_for(&t, "api.test", "/pay/x").as_deref(),
            Some("pay")
        );
        assert_eq!(
            service_for(&t, "API.test:8080", "/pay/refunds/9").as_deref(),
            Some("refunds")
        );
        assert_eq!(
            service_for(&t, "api.test", "/payment").as_deref(),
            Some("root")
        );
        assert_eq!(service_for(&t, "other.test", "/pay"), None);
        // A fully qualified host (trailing dot) is the same host.
        assert_eq!(service_for(&t, "api.test.", "/pay").as_deref(), Some("pay"));
        assert_eq!(
            service_for(&t, "API.TEST.:8080", "/pay").as_deref(),
            Some("pay")
        );
        assert_eq!(service_for(&t, "api.test..", "/pay"), None);
        assert_eq!(t.find(None, "/pay", no_headers), None);
    }

    #[test]
    fn hostless_routes_match_any_host_but_lose_to_a_host_route() {
        let (t, _) = RouteTable::build(
            &[route(None, "/a", "any"), route(Some("x.test"), "/a", "x")],
            &[],
            false,
        );
        assert_eq!(service_for(&t, "x.test", "/a").as_deref(), Some("x"));
        assert_eq!(service_for(&t, "y.test", "/a").as_deref(), Some("any"));
        assert_eq!(
            t.find(None, "/a/b", no_headers).map(|r| r.service.clone()),
            Some("any".into())
        );
    }

    #[test]
    fn a_header_condition_narrows_and_outranks() {
        let mut canary = route(Some("a.test"), "/", "canary");
        canary.header = Some(HeaderMatch {
            name: "X-Canary".into(),
            value: "1".into(),
        });
        let (t, _) = RouteTable::build(&[route(Some("a.test"), "/", "stable"), canary], &[], false);
        let with = |name: &str| (name == "x-canary").then_some("1");
        assert_eq!(
            t.find(Some("a.test"), "/x", with).unwrap().service,
            "canary"
        );
        let wrong = |name: &str| (name == "x-canary").then_some("2");
        assert_eq!(
            t.find(Some("a.test"), "/x", wrong).unwrap().service,
            "stable"
        );
    }

    #[test]
    fn metadata_makes_routes_and_config_wins_a_clash() {
        let (t, errs) = RouteTable::build(
            &[route(Some("api.test"), "/orders", "orders-from-config")],
            &[
                view("payment", &[(META_HOST, "API.test"), (META_PATH, "/pay")]),
                view(
                    "orders",
                    &[(META_HOST, "api.test"), (META_PATH, "/orders/")],
                ),
                view("www", &[(META_HOST, "www.test")]),
                view("broken", &[(META_HOST, "b.test"), (META_PATH, "nope")]),
                view("internal", &[]),
            ],
            true,
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            service_for(&t, "api.test", "/pay/1").as_deref(),
            Some("payment")
        );
        assert_eq!(
            service_for(&t, "api.test", "/orders").as_deref(),
            Some("orders-from-config")
        );
        assert_eq!(
            service_for(&t, "www.test", "/anything").as_deref(),
            Some("www")
        );
        assert_eq!(service_for(&t, "b.test", "/"), None);
        assert!(t.routes().any(|r| r.from_metadata));

        let (off, _) = RouteTable::build(&[], &[view("www", &[(META_HOST, "www.test")])], false);
        assert!(off.is_empty());
    }

    #[test]
    fn strip_prefix_rewrites_path_and_keeps_query() {
        let mut c = route(None, "/pay/", "pay");
        c.strip_prefix = true;
        let r = Route::from_config(&c);
        assert_eq!(r.rewrite("/pay"), "/");
        assert_eq!(r.rewrite("/pay/"), "/");
        assert_eq!(r.rewrite("/pay/a/b?x=1"), "/a/b?x=1");
        assert_eq!(r.rewrite("/pay?x=1"), "/?x=1");
        let keep = Route::from_config(&route(None, "/pay", "pay"));
        assert_eq!(keep.rewrite("/pay/a"), "/pay/a");
    }

    #[test]
    fn split_picks_by_weight() {
        let mut c = route(None, "/", "web");
        c.split = vec![
            SplitConfig {
                tags: vec!["v1".into()],
                weight: 90,
            },
            SplitConfig {
                tags: vec!["v2".into()],
                weight: 10,
            },
            SplitConfig {
                tags: vec!["never".into()],
                weight: 0,
            },
        ];
        let r = Route::from_config(&c);
        assert_eq!(r.pick_backend(0.0).tags, vec!["v1"]);
        assert_eq!(r.pick_backend(0.89).tags, vec!["v1"]);
        assert_eq!(r.pick_backend(0.9).tags, vec!["v2"]);
        assert_eq!(r.pick_backend(1.0).tags, vec!["v2"]);
        let v2 = (0..1000)
            .filter(|i| r.pick_backend(f64::from(*i) / 1000.0).tags == ["v2"])
            .count();
        assert_eq!(v2, 100);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.test:80"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }
}
