//! The query parameters every Consul read shares, parsed in one place: blocking (`index`,
//! `wait`), `tag` (repeatable, all must match), `node-meta` (repeatable, all must match),
//! `filter` (Consul's filter language), `dc` (only this one), and the consistency modes
//! (`stale`, `consistent`, `cached`) with the headers Consul answers them with.
//!
//! Nothing is silently ignored that changes what an answer holds: a parameter Waymark cannot
//! honour is an error that says so.

use std::collections::{BTreeMap, HashMap};

use axum::http::HeaderValue;
use axum::response::Response;
use serde_json::Value;

use super::filter::Filter;
use super::{consul, ApiError, Blocking};
use crate::config::Config;
use crate::nodes;

/// How fresh an answer was asked to be. The embedded registry answers every read from its
/// own state, which is the leader's, so all three are honoured; the header says which was
/// asked for, as Consul's does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Leader,
    Stale,
    Consistent,
}

/// A read's parameters.
pub struct ReadQuery {
    pub blocking: Blocking,
    /// Every `tag`: an entry must have them all.
    pub tags: Vec<String>,
    /// Every `node-meta` pair: an entry's node must have them all.
    pub node_meta: Vec<(String, String)>,
    pub filter: Option<Filter>,
    pub consistency: Consistency,
    pub cached: bool,
    /// The last value of each parameter.
    pub params: HashMap<String, String>,
}

impl ReadQuery {
    /// Parses a read's query string.
    pub fn parse(raw: Option<&str>, config: &Config) -> Result<ReadQuery, ApiError> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let all = |key: &str| -> Vec<String> {
            pairs
                .iter()
                .filter(|(k, v)| k == key && !v.is_empty())
                .map(|(_, v)| v.clone())
                .collect()
        };
        let params: HashMap<String, String> = pairs.iter().cloned().collect();
        if let Some(dc) = params.get("dc").filter(|dc| !dc.is_empty()) {
            if !dc.eq_ignore_ascii_case(&config.api.datacenter) {
                return Err(ApiError::NoDatacenter(dc.clone()));
            }
        }
        let stale = flag(&params, "stale")?;
        let consistent = flag(&params, "consistent")?;
        let consistency = match (stale, consistent) {
            (true, true) => {
                return Err(ApiError::BadRequest(
                    "cannot specify ?stale with ?consistent, conflicting semantics".into(),
                ))
            }
            (true, false) => Consistency::Stale,
            (false, true) => Consistency::Consistent,
            (false, false) => Consistency::Leader,
        };
        let filter = match params.get("filter").map(|f| f.trim()) {
            None | Some("") => None,
            Some(expr) => Some(
                Filter::parse(expr)
                    .map_err(|e| ApiError::BadRequest(format!("failed to create filter: {e}")))?,
            ),
        };
        Ok(ReadQuery {
            blocking: Blocking::parse(&params, config.api.max_wait)?,
            tags: all("tag"),
            node_meta: nodes::parse_node_meta(&all("node-meta")).map_err(ApiError::BadRequest)?,
            filter,
            consistency,
            cached: flag(&params, "cached")?,
            params,
        })
    }

    /// Whether the answer can be the plain one: no filter of any kind applies.
    pub fn unfiltered(&self) -> bool {
        self.tags.is_empty() && self.node_meta.is_empty() && self.filter.is_none()
    }

    /// Refuses a filter whose selectors the endpoint's entries (shaped as `template`) do not
    /// have, as Consul does.
    pub fn check_filter(&self, template: &Value) -> Result<(), ApiError> {
        match &self.filter {
            Some(f) => f
                .validate(template)
                .map_err(|e| ApiError::BadRequest(format!("failed to create filter: {e}"))),
            None => Ok(()),
        }
    }

    /// Whether an entry passes the `filter` and whose node has the `node-meta` asked for.
    pub fn keep(&self, entry: &Value, node_meta: &BTreeMap<String, String>) -> bool {
        nodes::meta_matches(node_meta, &self.node_meta)
            && self.filter.as_ref().is_none_or(|f| f.matches(entry))
    }

    /// The headers Consul sends for this query's consistency mode.
    pub fn decorate(&self, mut resp: Response) -> Response {
        let headers = resp.headers_mut();
        headers.insert(
            "X-Consul-Effective-Consistency",
            HeaderValue::from_static(match self.consistency {
                Consistency::Leader => "leader",
                Consistency::Stale => "stale",
                Consistency::Consistent => "consistent",
            }),
        );
        if self.cached {
            // Every answer is computed from the registry's current state: never a cache hit.
            headers.insert("X-Cache", HeaderValue::from_static("MISS"));
            headers.insert("Age", HeaderValue::from_static("0"));
        }
        resp
    }
}

/// A Consul flag: present without a value, or a Go boolean.
pub fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None => Ok(false),
        Some("") => Ok(true),
        Some(s) => consul::parse_bool(s)
            .ok_or_else(|| ApiError::BadRequest(format!("{name} {s:?} is not a boolean"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<ReadQuery, String> {
        ReadQuery::parse(Some(raw), &Config::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn parameters_are_read_or_refused() {
        let q = parse("tag=a&tag=b&node-meta=rack:r1&index=7&wait=2s&stale").unwrap();
        assert_eq!(q.tags, ["a", "b"]);
        assert_eq!(q.node_meta, [("rack".to_string(), "r1".to_string())]);
        assert_eq!(q.blocking.index, 7);
        assert_eq!(q.consistency, Consistency::Stale);
        assert!(!q.unfiltered());
        let q = parse("dc=DC1&consistent=true&cached").unwrap();
        assert_eq!(q.consistency, Consistency::Consistent);
        assert!(q.cached && q.unfiltered());
        let errors = [
            ("dc=dc2", "No path to datacenter"),
            ("stale&consistent", "conflicting"),
            ("stale=maybe", "not a boolean"),
            ("node-meta=rack", "key:value"),
            ("index=x", "not a number"),
            ("filter=Service.Port%20%3D%3D", "failed to create filter"),
        ];
        for (raw, want) in errors {
            let err = parse(raw).err().unwrap_or_default();
            assert!(err.contains(want), "{raw}: {err:?} should say {want:?}");
        }
    }
}
