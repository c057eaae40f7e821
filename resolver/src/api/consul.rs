//! Consul's JSON, both ways: registration bodies in (keys in any letter case, `Check` or
//! `Checks`, snake_case or CamelCase), and the shapes Consul clients expect out.
//!
//! Parsing is lenient where Consul is (unknown keys such as `EnableTagOverride` or `Connect`
//! are ignored) and strict about the fields Waymark uses: a wrong type is an error that names
//! the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};
use waymark_shared::{CheckView, Health, Instance};

use crate::registry::def::{CheckDef, ServiceDef, Weights};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Field(String),
}

/// A JSON object whose keys are looked up ignoring case, `_` and `-`.
struct Obj<'a> {
    path: String,
    fields: BTreeMap<String, &'a Value>,
}

fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

impl<'a> Obj<'a> {
    fn new(path: &str, value: &'a Value) -> Result<Obj<'a>, ParseError> {
        let Value::Object(map) = value else {
            return Err(ParseError::Field(format!("{path} must be a JSON object")));
        };
        Ok(Obj {
            path: path.to_string(),
            fields: map.iter().map(|(k, v)| (norm(k), v)).collect(),
        })
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.fields.get(key).copied().filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, what: &str) -> ParseError {
        let at = if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        ParseError::Field(format!("{at} {what}"))
    }

    fn string(&self, key: &str, shown: &str) -> Result<Option<String>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(shown, "must be a string")),
        }
    }

    fn duration(&self, key: &str, shown: &str) -> Result<Option<Duration>, ParseError> {
        match self.string(key, shown)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => waymark_shared::duration::parse(&s)
                .map(Some)
                .map_err(|e| self.err(shown, &format!("is invalid: {e}"))),
        }
    }

    fn uint(&self, key: &str, shown: &str, max: u64) -> Result<Option<u64>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(self.err(shown, &format!("must be a whole number from 0 to {max}"))),
            },
        }
    }

    fn bool(&self, key: &str, shown: &str) -> Result<Option<bool>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(shown, "must be true or false")),
        }
    }
}

/// Parses a `PUT /v1/agent/service/register` body.
pub fn parse_service(body: &[u8]) -> Result<ServiceDef, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let o = Obj::new("", &value)?;
    let name = o
        .string("name", "Name")?
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ParseError::Field("Name is required".into()))?;
    let tags = match o.get("tags") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| o.err("Tags", "must be a list of strings"))?,
        Some(_) => return Err(o.err("Tags", "must be a list of strings")),
    };
    let meta = match o.get("meta") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect::<Option<BTreeMap<_, _>>>()
            .ok_or_else(|| o.err("Meta", "values must be strings"))?,
        Some(_) => return Err(o.err("Meta", "must be an object of strings")),
    };
    let weights = match o.get("weights") {
        None => Weights::default(),
        Some(w) => {
            let w = Obj::new("Weights", w)?;
            Weights {
                passing: w.uint("passing", "Passing", u32::MAX as u64)?.unwrap_or(1) as u32,
                warning: w.uint("warning", "Warning", u32::MAX as u64)?.unwrap_or(1) as u32,
            }
        }
    };
    let mut checks = Vec::new();
    if let Some(c) = o.get("check") {
        checks.push(parse_check_obj("Check", c)?.0);
    }
    match o.get("checks") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, c) in items.iter().enumerate() {
                checks.push(parse_check_obj(&format!("Checks[{i}]"), c)?.0);
            }
        }
        Some(_) => return Err(o.err("Checks", "must be a list of checks")),
    }
    Ok(ServiceDef {
        name: name.into(),
        id: o.string("id", "ID")?.unwrap_or_default().into(),
        address: o.string("address", "Address")?.unwrap_or_default().into(),
        port: o.uint("port", "Port", u16::MAX as u64)?.unwrap_or(0) as u16,
        tags,
        meta,
        weights,
        checks,
    })
}

/// Parses a `PUT /v1/agent/check/register` body: the check and the service it belongs to.
pub fn parse_check(body: &[u8]) -> Result<(CheckDef, Option<String>), ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    parse_check_obj("", &value)
}

fn parse_check_obj(path: &str, value: &Value) -> Result<(CheckDef, Option<String>), ParseError> {
    let o = Obj::new(if path.is_empty() { "check" } else { path }, value)?;
    for unsupported in [
        "args",
        "script",
        "grpc",
        "dockercontainerid",
        "h2ping",
        "udp",
        "osservice",
        "aliasservice",
    ] {
        if o.get(unsupported).is_some() {
            return Err(o.err(
                unsupported,
                "checks are not supported: use HTTP, TCP or TTL",
            ));
        }
    }
    let header = match o.get("header") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let values = match v {
                    Value::String(s) => Some(vec![s.clone()]),
                    Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
                    _ => None,
                };
                values.map(|vs| (k.clone(), vs))
            })
            .collect::<Option<BTreeMap<_, _>>>()
            .ok_or_else(|| o.err("Header", "must map names to lists of strings"))?,
        Some(_) => return Err(o.err("Header", "must map names to lists of strings")),
    };
    let status = match o.string("status", "Status")? {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => Some(
            Health::parse(&s)
                .ok_or_else(|| o.err("Status", "must be passing, warning or critical"))?,
        ),
    };
    let id = match o.string("checkid", "CheckID")? {
        Some(id) => Some(id),
        None => o.string("id", "ID")?,
    };
    let def = CheckDef {
        id: id.unwrap_or_default(),
        name: o.string("name", "Name")?.unwrap_or_default(),
        http: o.string("http", "HTTP")?.filter(|s| !s.is_empty()),
        method: o.string("method", "Method")?.filter(|s| !s.is_empty()),
        header,
        tls_skip_verify: o.bool("tlsskipverify", "TLSSkipVerify")?.unwrap_or(false),
        tcp: o.string("tcp", "TCP")?.filter(|s| !s.is_empty()),
        ttl: o.duration("ttl", "TTL")?,
        interval: o.duration("interval", "Interval")?,
        timeout: o.duration("timeout", "Timeout")?,
        deregister_critical_after: o.duration(
            "deregistercriticalserviceafter",
            "DeregisterCriticalServiceAfter",
        )?,
        failures_before_critical: o
            .uint("failuresbeforecritical", "FailuresBeforeCritical", 1000)?
            .map(|n| n as u32),
        successes_before_passing: o
            .uint("successbeforepassing", "SuccessBeforePassing", 1000)?
            .map(|n| n as u32),
        status,
        notes: o.string("notes", "Notes")?.unwrap_or_default(),
    };
    Ok((def, o.string("serviceid", "ServiceID")?))
}

/// Go's `strconv.ParseBool`, as Consul parses query flags.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Node details shown in Consul-shaped answers.
pub struct Node<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
}

/// An entry of `GET /v1/agent/services`.
pub fn agent_service(i: &Instance, dc: &str) -> Value {
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Meta": i.meta,
        "Port": i.port,
        "Address": i.address,
        "Weights": {"Passing": i.weight_passing, "Warning": i.weight_warning},
        "EnableTagOverride": false,
        "Datacenter": dc,
    })
}

/// The node an instance is on: the host that registered it when the registry knows (with
/// etcd, each host is a node), else this one.
fn node_of<'a>(i: &'a Instance, node: &'a Node) -> &'a str {
    i.node.as_deref().unwrap_or(node.name)
}

/// A check in Consul's shape.
pub fn check(c: &CheckView, i: &Instance, node: &Node) -> Value {
    json!({
        "Node": node_of(i, node),
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "Type": c.kind,
    })
}

/// An entry of `GET /v1/health/service/<name>`.
pub fn health_entry(i: &Instance, node: &Node) -> Value {
    let checks: Vec<Value> = i.checks.iter().map(|c| check(c, i, node)).collect();
    json!({
        "Node": {
            "ID": "",
            "Node": node_of(i, node),
            "Address": node.address,
            "Datacenter": node.datacenter,
            "TaggedAddresses": {},
            "Meta": {},
        },
        "Service": agent_service(i, node.datacenter),
        "Checks": checks,
    })
}

/// An entry of `GET /v1/catalog/service/<name>`.
pub fn catalog_entry(i: &Instance, node: &Node) -> Value {
    json!({
        "ID": "",
        "Node": node_of(i, node),
        "Address": node.address,
        "Datacenter": node.datacenter,
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceAddress": i.address,
        "ServicePort": i.port,
        "ServiceTags": i.tags,
        "ServiceMeta": i.meta,
    })
}

/// Every check of every instance, keyed by check ID (`GET /v1/agent/checks`).
pub fn agent_checks<'a>(instances: impl Iterator<Item = &'a Instance>, node: &Node) -> Value {
    let mut out = Map::new();
    for i in instances {
        for c in &i.checks {
            out.insert(c.id.clone(), check(c, i, node));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_any_case_and_check_or_checks() {
        let lower = br#"{"name":"pay","id":"pay-1","address":"127.0.0.1","port":9000,
            "tags":["v1"],"meta":{"Team":"x"},"check":{"ttl":"10s"}}"#;
        let upper = br#"{"Name":"pay","ID":"pay-1","Address":"127.0.0.1","Port":9000,
            "Tags":["v1"],"Meta":{"Team":"x"},"Checks":[{"TTL":"10s"}]}"#;
        let a = parse_service(lower).unwrap();
        let b = parse_service(upper).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.meta.get("Team").map(String::as_str),
            Some("x"),
            "meta keys keep their case"
        );
        assert_eq!(a.checks[0].ttl, Some(Duration::from_secs(10)));
    }

    #[test]
    fn check_fields_are_read() {
        let body = br#"{"Name":"pay","Check":{"CheckID":"c1","HTTP":"http://127.0.0.1:1/h",
            "Interval":"1s","Timeout":"500ms","DeregisterCriticalServiceAfter":"1m",
            "SuccessBeforePassing":2,"FailuresBeforeCritical":3,"Status":"passing",
            "Header":{"X-A":["b"]},"TLSSkipVerify":true,"Method":"HEAD"},
            "EnableTagOverride":true,"Connect":{"Native":false}}"#;
        let d = parse_service(body).unwrap();
        let c = &d.checks[0];
        assert_eq!(c.id, "c1");
        assert_eq!(c.interval, Some(Duration::from_secs(1)));
        assert_eq!(c.timeout, Some(Duration::from_millis(500)));
        assert_eq!(c.deregister_critical_after, Some(Duration::from_secs(60)));
        assert_eq!(c.successes_before_passing, Some(2));
        assert_eq!(c.failures_before_critical, Some(3));
        assert_eq!(c.status, Some(Health::Passing));
        assert_eq!(c.header["X-A"], vec!["b".to_string()]);
        assert!(c.tls_skip_verify);
        assert_eq!(c.method.as_deref(), Some("HEAD"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&[u8], &str); 7] = [
            (b"{not json", "not valid JSON"),
            (b"[]", "must be a JSON object"),
            (br#"{"Port":1}"#, "Name is required"),
            (br#"{"Name":"a","Port":70000}"#, "Port"),
            (br#"{"Name":"a","Tags":"v1"}"#, "Tags"),
            (br#"{"Name":"a","Check":{"TTL":"ten"}}"#, "Check.TTL"),
            (
                br#"{"Name":"a","Check":{"Args":["/bin/true"]}}"#,
                "not supported",
            ),
        ];
        for (body, want) in cases {
            let err = parse_service(body).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn snake_case_keys_work() {
        let d = parse_service(
            br#"{"name":"a","check":{"ttl":"5s","deregister_critical_service_after":"30s"}}"#,
        )
        .unwrap();
        assert_eq!(
            d.checks[0].deregister_critical_after,
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn standalone_checks_name_their_service() {
        let (c, svc) =
            parse_check(br#"{"name":"extra","ttl":"30s","id":"x1","serviceid":"pay-1"}"#).unwrap();
        assert_eq!(c.id, "x1");
        assert_eq!(svc.as_deref(), Some("pay-1"));
    }

    #[test]
    fn go_bools() {
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }
}
