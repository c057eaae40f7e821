//! Consul's JSON, both ways: registration bodies in (keys in any letter case, `Check` or
//! `Checks`, snake_case or CamelCase), and the shapes Consul clients expect out.
//!
//! Parsing is lenient where Consul is (unknown keys are ignored) and strict about the fields
//! Waymark uses: a wrong type is an error that names the field. Connect registrations
//! (proxies, sidecars, native) are refused: the mesh is the per-host forwarder.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};
use waymark_shared::{CheckView, Health, Instance, TaggedAddress};

use crate::registry::def::{CheckDef, ExternalNode, ServiceDef, Weights};

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
    service_obj(&Obj::new("", &value)?, "name", "Name")
}

/// A service definition from an object whose name is under `key` (`Name` for the agent,
/// `Service` in a catalog registration).
fn service_obj(o: &Obj, key: &str, shown: &str) -> Result<ServiceDef, ParseError> {
    let name = o
        .string(key, shown)?
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| o.err(shown, "is required"))?;
    let tags = match o.get("tags") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| o.err("Tags", "must be a list of strings"))?,
        Some(_) => return Err(o.err("Tags", "must be a list of strings")),
    };
    let meta = string_map(o, "meta", "Meta")?;
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
    refuse_connect(o)?;
    Ok(ServiceDef {
        name: name.into(),
        id: o.string("id", "ID")?.unwrap_or_default().into(),
        address: o.string("address", "Address")?.unwrap_or_default().into(),
        port: o.uint("port", "Port", u16::MAX as u64)?.unwrap_or(0) as u16,
        tags,
        meta,
        weights,
        checks,
        tagged_addresses: tagged_addresses(o)?,
        enable_tag_override: o
            .bool("enabletagoverride", "EnableTagOverride")?
            .unwrap_or(false),
        external_node: None,
        eureka: None,
    })
}

/// A `PUT /v1/catalog/register` body: a service on a node (Waymark keeps nodes only through
/// their services), and checks whose status the registration sets.
#[derive(Debug, PartialEq)]
pub struct CatalogRegistration {
    pub node: ExternalNode,
    pub service: Option<ServiceDef>,
    /// Each check and the service ID it names (empty: a node check).
    pub checks: Vec<(CheckDef, String)>,
}

/// Parses a `PUT /v1/catalog/register` body.
pub fn parse_catalog_register(body: &[u8]) -> Result<CatalogRegistration, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let o = Obj::new("", &value)?;
    let node = node_obj(&o)?;
    let service = match o.get("service") {
        None => None,
        Some(v) => Some(service_obj(&Obj::new("Service", v)?, "service", "Service")?),
    };
    let mut checks = Vec::new();
    if let Some(c) = o.get("check") {
        checks.push(catalog_check("Check", c)?);
    }
    match o.get("checks") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, c) in items.iter().enumerate() {
                checks.push(catalog_check(&format!("Checks[{i}]"), c)?);
            }
        }
        Some(_) => return Err(o.err("Checks", "must be a list of checks")),
    }
    Ok(CatalogRegistration {
        node: ExternalNode {
            address: o.string("address", "Address")?.unwrap_or_default(),
            meta: string_map(&o, "nodemeta", "NodeMeta")?,
            ..node
        },
        service,
        checks,
    })
}

/// A `PUT /v1/catalog/deregister` body: a node, and a service or a check on it (neither: the
/// whole node).
#[derive(Debug, PartialEq)]
pub struct CatalogDeregistration {
    pub node: String,
    pub service_id: Option<String>,
    pub check_id: Option<String>,
}

/// Parses a `PUT /v1/catalog/deregister` body.
pub fn parse_catalog_deregister(body: &[u8]) -> Result<CatalogDeregistration, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let o = Obj::new("", &value)?;
    Ok(CatalogDeregistration {
        node: node_obj(&o)?.name.to_string(),
        service_id: o
            .string("serviceid", "ServiceID")?
            .filter(|s| !s.is_empty()),
        check_id: o.string("checkid", "CheckID")?.filter(|s| !s.is_empty()),
    })
}

fn node_obj(o: &Obj) -> Result<ExternalNode, ParseError> {
    let name = o
        .string("node", "Node")?
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| o.err("Node", "is required"))?;
    Ok(ExternalNode {
        name: name.trim().into(),
        ..ExternalNode::default()
    })
}

fn string_map(o: &Obj, key: &str, shown: &str) -> Result<BTreeMap<String, String>, ParseError> {
    match o.get(key) {
        None => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect::<Option<BTreeMap<_, _>>>()
            .ok_or_else(|| o.err(shown, "values must be strings")),
        Some(_) => Err(o.err(shown, "must be an object of strings")),
    }
}

/// A catalog check: its status is what the registration says (an external monitor keeps it
/// up to date); its `Definition` is for that monitor and is not run here.
fn catalog_check(path: &str, value: &Value) -> Result<(CheckDef, String), ParseError> {
    let o = Obj::new(path, value)?;
    let status = match o.string("status", "Status")?.filter(|s| !s.is_empty()) {
        None => Health::Critical,
        Some(s) => Health::parse(&s)
            .ok_or_else(|| o.err("Status", "must be passing, warning or critical"))?,
    };
    let def = CheckDef {
        id: o
            .string("checkid", "CheckID")?
            .or(o.string("id", "ID")?)
            .unwrap_or_default(),
        name: o.string("name", "Name")?.unwrap_or_default(),
        status: Some(status),
        notes: o.string("notes", "Notes")?.unwrap_or_default(),
        output: o.string("output", "Output")?.unwrap_or_default(),
        external: true,
        ..CheckDef::default()
    };
    Ok((def, o.string("serviceid", "ServiceID")?.unwrap_or_default()))
}

/// Consul Connect's registrations (a proxy, a sidecar, a Connect-native service) are refused
/// rather than stored as plain services that would then be answered without their proxy.
fn refuse_connect(o: &Obj) -> Result<(), ParseError> {
    const WHY: &str = "Waymark's mesh is the per-host forwarder, which needs no proxy \
        registration: register the service itself";
    match o.string("kind", "Kind")?.as_deref() {
        None | Some("") | Some("typical") => {}
        Some(kind) => return Err(o.err("Kind", &format!("{kind:?} is not supported: {WHY}"))),
    }
    if o.get("proxy").is_some() {
        return Err(o.err("Proxy", &format!("is not supported: {WHY}")));
    }
    if let Some(connect) = o.get("connect") {
        let c = Obj::new("Connect", connect)?;
        if c.get("sidecarservice").is_some() || c.bool("native", "Native")? == Some(true) {
            return Err(o.err("Connect", &format!("is not supported: {WHY}")));
        }
    }
    Ok(())
}

/// `TaggedAddresses`: `{"lan": {"Address": "10.0.0.1", "Port": 80}, ...}`.
fn tagged_addresses(o: &Obj) -> Result<BTreeMap<String, TaggedAddress>, ParseError> {
    let Some(value) = o.get("taggedaddresses") else {
        return Ok(BTreeMap::new());
    };
    let Value::Object(map) = value else {
        return Err(o.err("TaggedAddresses", "must be an object"));
    };
    let mut out = BTreeMap::new();
    for (tag, a) in map {
        let a = Obj::new(&format!("TaggedAddresses.{tag}"), a)?;
        out.insert(
            tag.clone(),
            TaggedAddress {
                address: a.string("address", "Address")?.unwrap_or_default(),
                port: a.uint("port", "Port", u16::MAX as u64)?.unwrap_or(0) as u16,
            },
        );
    }
    Ok(out)
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
        ..CheckDef::default()
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

/// Node details shown in Consul-shaped answers: this host's.
pub struct Node<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    pub meta: &'a BTreeMap<String, String>,
}

/// The node an instance is on: the host that registered it when the registry knows (with
/// etcd, each host is a node; a catalog registration names its node), else this one.
pub fn node_of<'a>(i: &'a Instance, node: &'a Node) -> &'a str {
    i.node.as_deref().unwrap_or(node.name)
}

/// That node's address: an external node's as registered, else this host's.
pub fn node_address_of<'a>(i: &'a Instance, node: &'a Node) -> &'a str {
    match &i.extra {
        Some(e) if !e.node_address.is_empty() => &e.node_address,
        _ => node.address,
    }
}

/// That node's metadata.
pub fn node_meta_of<'a>(i: &'a Instance, node: &'a Node) -> &'a BTreeMap<String, String> {
    match &i.extra {
        Some(e) if i.node.is_some() => &e.node_meta,
        _ => node.meta,
    }
}

/// A node's `TaggedAddresses` as Consul fills them by default.
fn node_tagged(address: &str) -> Value {
    json!({"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address})
}

/// A service's `TaggedAddresses`.
fn service_tagged(i: &Instance) -> Value {
    let mut out = Map::new();
    if let Some(tagged) = i.tagged_addresses() {
        for (tag, a) in tagged {
            out.insert(tag.clone(), json!({"Address": a.address, "Port": a.port}));
        }
    }
    Value::Object(out)
}

fn tag_override(i: &Instance) -> bool {
    i.extra.as_ref().is_some_and(|e| e.enable_tag_override)
}

/// A node entry (`/v1/catalog/nodes`, `/v1/catalog/node/<n>`, health entries' `Node`).
pub fn node_entry(
    name: &str,
    address: &str,
    meta: &BTreeMap<String, String>,
    dc: &str,
    [created, modified]: [u64; 2],
) -> Value {
    json!({
        "ID": "",
        "Node": name,
        "Address": address,
        "Datacenter": dc,
        "TaggedAddresses": node_tagged(address),
        "Meta": meta,
        "CreateIndex": created,
        "ModifyIndex": modified,
    })
}

/// An entry of `GET /v1/agent/services`, and a health entry's `Service`.
pub fn agent_service(i: &Instance, dc: &str) -> Value {
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Meta": i.meta,
        "Port": i.port,
        "Address": i.address,
        "TaggedAddresses": service_tagged(i),
        "Weights": {"Passing": i.weight_passing, "Warning": i.weight_warning},
        "EnableTagOverride": tag_override(i),
        "Datacenter": dc,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
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
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// An entry of `GET /v1/health/service/<name>`.
pub fn health_entry(i: &Instance, node: &Node) -> Value {
    let checks: Vec<Value> = i.checks.iter().map(|c| check(c, i, node)).collect();
    json!({
        "Node": node_entry(
            node_of(i, node),
            node_address_of(i, node),
            node_meta_of(i, node),
            node.datacenter,
            [i.create_index, i.modify_index],
        ),
        "Service": agent_service(i, node.datacenter),
        "Checks": checks,
    })
}

/// An entry of `GET /v1/catalog/service/<name>`.
pub fn catalog_entry(i: &Instance, node: &Node) -> Value {
    let address = node_address_of(i, node);
    json!({
        "ID": "",
        "Node": node_of(i, node),
        "Address": address,
        "Datacenter": node.datacenter,
        "TaggedAddresses": node_tagged(address),
        "NodeMeta": node_meta_of(i, node),
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceAddress": i.address,
        "ServicePort": i.port,
        "ServiceTags": i.tags,
        "ServiceMeta": i.meta,
        "ServiceTaggedAddresses": service_tagged(i),
        "ServiceWeights": {"Passing": i.weight_passing, "Warning": i.weight_warning},
        "ServiceEnableTagOverride": tag_override(i),
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// An instance with every field an entry shows (one check, a tagged address, a node), to
/// check filter selectors against the shape of an endpoint's entries.
pub fn template_instance() -> Instance {
    let mut i = Instance::new("s", "s-1", "10.0.0.1", 80);
    // A map of tagged addresses, each an address and a port (the filter's `"*"` shape).
    i.extra = Some(Box::new(waymark_shared::Extra {
        tagged_addresses: BTreeMap::from([("*".to_string(), TaggedAddress::default())]),
        ..Default::default()
    }));
    i.checks.push(CheckView {
        id: "c".into(),
        name: "c".into(),
        kind: "ttl".into(),
        status: Health::Passing,
        output: String::new(),
        notes: String::new(),
    });
    i
}

/// A check entry with every field, to check filter selectors against.
pub fn template_check() -> Value {
    let i = template_instance();
    check(&i.checks[0], &i, &template_node())
}

/// A node with every field an entry shows; its metadata is a map (any key).
pub fn template_node() -> Node<'static> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    Node {
        name: "n",
        address: "10.0.0.1",
        datacenter: "dc1",
        meta: &EMPTY,
    }
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
