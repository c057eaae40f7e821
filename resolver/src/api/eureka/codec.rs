//! Eureka's wire formats, parsed and produced (pure: no I/O, no registry).
//!
//! Reading: a registration (`InstanceInfo`) in Eureka's JSON, whose scalars may be strings
//! or not (`"port": {"$": 8080, "@enabled": "true"}`) and whose attributes are `@` keys, or
//! in its XML (`<port enabled="true">8080</port>`). XML is first turned into that JSON shape,
//! so one reader serves both. Writing: applications, an application and an instance, as XML
//! (Eureka's default) or JSON, with Eureka's element names.
//!
//! Also here: the status rules (effective status, which statuses DNS answers), the
//! `apps__hashcode`, the app name → DNS service name mapping and `Accept` negotiation.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::EurekaError;
use crate::registry::def::EurekaDef;

/// Eureka's defaults for what a registration leaves out.
pub const DEFAULT_RENEWAL_SECS: u32 = 30;
pub const DEFAULT_DURATION_SECS: u32 = 90;
const DEFAULT_PORT: u16 = 7001;
const DEFAULT_SECURE_PORT: u16 = 7002;
const DEFAULT_DATA_CENTER_CLASS: &str = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo";
const DEFAULT_DATA_CENTER_NAME: &str = "MyOwn";
/// The longest lease accepted: a day.
const MAX_DURATION_SECS: u32 = 86_400;
/// XML elements a registration may hold (each counts): far above any real one.
const MAX_XML_NODES: u32 = 10_000;

/// An instance's status, as Eureka names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Up,
    Down,
    Starting,
    OutOfService,
    Unknown,
}

impl Status {
    /// Case-insensitive, as Eureka's `InstanceStatus.toEnum`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s.trim().to_ascii_uppercase().as_str() {
            "UP" => Status::Up,
            "DOWN" => Status::Down,
            "STARTING" => Status::Starting,
            "OUT_OF_SERVICE" => Status::OutOfService,
            "UNKNOWN" => Status::Unknown,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "UP",
            Status::Down => "DOWN",
            Status::Starting => "STARTING",
            Status::OutOfService => "OUT_OF_SERVICE",
            Status::Unknown => "UNKNOWN",
        }
    }
}

/// The status an instance is answered with: its own when that is neither `UP` nor
/// `OUT_OF_SERVICE` (an instance that says it is down or starting is, whatever an operator
/// set), else the override when there is one, else its own. Eureka's rules
/// (`DownOrStartingRule`, then `OverrideExistsRule`).
pub fn effective(own: Status, overridden: Option<Status>) -> Status {
    match (own, overridden) {
        (Status::Up | Status::OutOfService, Some(o)) => o,
        _ => own,
    }
}

/// The maintenance reason of an instance whose effective status is not `UP` (DNS answers
/// only `UP` instances), or `None`.
pub fn maintenance_for(status: Status) -> Option<String> {
    (status != Status::Up).then(|| format!("Eureka status {}", status.as_str()))
}

/// Eureka's `apps__hashcode`: every status with its count of instances, in status-name order,
/// each as `STATUS_count_` (`DOWN_1_UP_3_`); empty for no instance.
pub fn hashcode(statuses: impl IntoIterator<Item = Status>) -> String {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for s in statuses {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    let mut out = String::new();
    for (status, n) in counts {
        let _ = write!(out, "{status}_{n}_");
    }
    out
}

/// The DNS service name of a Eureka application: lowercased, every character other than a
/// letter, digit or `-` turned into `-`, and `-` at either end dropped (`MY_APP` → `my-app`,
/// `Payment.Service` → `payment-service`). At most 63 characters.
pub fn service_name(app: &str) -> Result<String, EurekaError> {
    let mapped: String = app
        .trim()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    let mapped = mapped.trim_matches('-');
    if mapped.is_empty() {
        return Err(EurekaError::AppName {
            app: app.to_string(),
            reason: "it has no letter or digit",
        });
    }
    if mapped.len() > 63 {
        return Err(EurekaError::AppName {
            app: app.to_string(),
            reason: "it is over 63 characters",
        });
    }
    Ok(mapped.to_string())
}

/// The format of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xml,
    Json,
}

/// XML unless the `Accept` header names JSON before XML (`*/*`, or no header, is XML, as
/// Eureka answers clients that do not say).
pub fn negotiate(accept: Option<&str>) -> Format {
    for range in accept.unwrap_or("").split(',') {
        let media = range.split(';').next().unwrap_or("").trim();
        let media = media.to_ascii_lowercase();
        if media == "application/json" || media.ends_with("+json") {
            return Format::Json;
        }
        if media == "application/xml" || media == "text/xml" || media.ends_with("+xml") {
            return Format::Xml;
        }
    }
    Format::Xml
}

/// A registration as read from a body.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub instance_id: String,
    pub ip_addr: String,
    pub metadata: BTreeMap<String, String>,
    /// The rest of it, as kept (`app` uppercased).
    pub info: EurekaDef,
}

impl Registration {
    /// The port DNS answers: the plain one when it is enabled, else the secure one when that
    /// is, else the plain one.
    pub fn port(&self) -> u16 {
        port_of(&self.info)
    }
}

/// The port an instance serves on, as [`Registration::port`] picks it.
pub fn port_of(info: &EurekaDef) -> u16 {
    if !info.port_enabled && info.secure_port_enabled {
        info.secure_port
    } else {
        info.port
    }
}

/// Reads the body of `POST /apps/{app}`: JSON (`{"instance": {...}}`) or XML
/// (`<instance>...</instance>`), told apart by its first character. `now_ms` stands for
/// timestamps the registration leaves out.
pub fn parse_registration(
    body: &[u8],
    path_app: &str,
    now_ms: u64,
) -> Result<Registration, EurekaError> {
    let text = std::str::from_utf8(body).map_err(|_| EurekaError::Body("not UTF-8".into()))?;
    let value = match text.trim_start().as_bytes().first() {
        Some(b'{') => {
            let v: Value =
                serde_json::from_str(text).map_err(|e| EurekaError::Body(format!("JSON: {e}")))?;
            match v {
                Value::Object(mut o) => o.remove("instance").ok_or(EurekaError::Missing(
                    "instance (the body is {\"instance\": {...}})",
                ))?,
                _ => return Err(EurekaError::Body("JSON: not an object".into())),
            }
        }
        Some(b'<') => {
            let opts = roxmltree::ParsingOptions {
                allow_dtd: false,
                nodes_limit: MAX_XML_NODES,
                ..roxmltree::ParsingOptions::default()
            };
            let doc = roxmltree::Document::parse_with_options(text, opts)
                .map_err(|e| EurekaError::Body(format!("XML: {e}")))?;
            let root = doc.root_element();
            if root.tag_name().name() != "instance" {
                return Err(EurekaError::Body(format!(
                    "XML: the root element is <{}>, not <instance>",
                    root.tag_name().name()
                )));
            }
            xml_to_value(root)
        }
        _ => return Err(EurekaError::Body("neither JSON nor XML".into())),
    };
    let Value::Object(o) = value else {
        return Err(EurekaError::Body("instance is not an object".into()));
    };
    registration(&o, path_app, now_ms)
}

/// An XML element in Eureka's JSON shape: attributes as `@name`, text beside attributes as
/// `$`, children by name (an array when repeated), a text-only element as its text.
fn xml_to_value(node: roxmltree::Node) -> Value {
    let text = || -> String {
        node.children()
            .filter(|c| c.is_text())
            .filter_map(|c| c.text())
            .collect::<String>()
            .trim()
            .to_string()
    };
    let children: Vec<roxmltree::Node> = node.children().filter(|c| c.is_element()).collect();
    let mut attrs = node.attributes().peekable();
    if children.is_empty() && attrs.peek().is_none() {
        return Value::String(text());
    }
    let mut out = Map::new();
    for a in attrs {
        out.insert(
            format!("@{}", a.name()),
            Value::String(a.value().to_string()),
        );
    }
    if children.is_empty() {
        out.insert("$".into(), Value::String(text()));
    }
    for c in children {
        let name = c.tag_name().name().to_string();
        let v = xml_to_value(c);
        match out.get_mut(&name) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => *prev = Value::Array(vec![prev.take(), v]),
            None => {
                out.insert(name, v);
            }
        }
    }
    Value::Object(out)
}

/// A scalar as text: a string, number or boolean, or an object's `$`; `None` when absent,
/// null or empty.
fn scalar(v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(Value::Object(o)) if o.contains_key("$") => scalar(o.get("$")),
        Some(_) => Err("is not a single value".into()),
    }
}

/// Field readers over one JSON object, each error naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    fn string(&self, key: &'static str) -> Result<Option<String>, EurekaError> {
        scalar(self.get(key)).map_err(|why| EurekaError::Field { field: key, why })
    }

    fn text(&self, key: &'static str) -> Result<String, EurekaError> {
        Ok(self.string(key)?.unwrap_or_default())
    }

    fn required(&self, key: &'static str) -> Result<String, EurekaError> {
        self.string(key)?.ok_or(EurekaError::Missing(key))
    }

    fn number<T: std::str::FromStr>(&self, key: &'static str) -> Result<Option<T>, EurekaError> {
        self.string(key)?
            .map(|s| {
                s.parse().map_err(|_| EurekaError::Field {
                    field: key,
                    why: format!("{s:?} is not a number in range"),
                })
            })
            .transpose()
    }

    fn boolean(&self, key: &'static str) -> Result<Option<bool>, EurekaError> {
        self.string(key)?
            .map(|s| {
                parse_bool(&s).ok_or(EurekaError::Field {
                    field: key,
                    why: format!("{s:?} is not true or false"),
                })
            })
            .transpose()
    }

    fn status(&self, key: &'static str) -> Result<Option<Status>, EurekaError> {
        self.string(key)?
            .map(|s| {
                Status::parse(&s).ok_or(EurekaError::Field {
                    field: key,
                    why: format!("{s:?} is not UP, DOWN, STARTING, OUT_OF_SERVICE or UNKNOWN"),
                })
            })
            .transpose()
    }

    /// A port: `{"$": 8080, "@enabled": "true"}`, or a bare number (enabled as `default`).
    fn port(&self, key: &'static str, default: (u16, bool)) -> Result<(u16, bool), EurekaError> {
        let Some(v) = self.get(key).filter(|v| !v.is_null()) else {
            return Ok(default);
        };
        let port = match scalar(Some(v)) {
            Ok(Some(p)) => p.parse::<u16>().map_err(|_| EurekaError::Field {
                field: key,
                why: format!("{p:?} is not a port"),
            })?,
            Ok(None) => default.0,
            Err(why) => return Err(EurekaError::Field { field: key, why }),
        };
        let enabled = match v {
            Value::Object(o) => Fields(o).boolean_named(key, "@enabled")?,
            _ => None,
        };
        Ok((port, enabled.unwrap_or(default.1)))
    }

    fn boolean_named(&self, field: &'static str, key: &str) -> Result<Option<bool>, EurekaError> {
        scalar(self.get(key))
            .map_err(|why| EurekaError::Field { field, why })?
            .map(|s| {
                parse_bool(&s).ok_or(EurekaError::Field {
                    field,
                    why: format!("{key} {s:?} is not true or false"),
                })
            })
            .transpose()
    }

    fn object(&self, key: &'static str) -> Result<Option<Fields<'_>>, EurekaError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) => Ok(Some(Fields(o))),
            // `<metadata/>`, `<leaseInfo></leaseInfo>`: empty.
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(_) => Err(EurekaError::Field {
                field: key,
                why: "is not an object".into(),
            }),
        }
    }

    /// A string map (metadata): `@` keys (`@class`) are Java's, not the map's.
    fn map(&self, key: &'static str) -> Result<BTreeMap<String, String>, EurekaError> {
        let mut out = BTreeMap::new();
        let Some(o) = self.object(key)? else {
            return Ok(out);
        };
        for (k, v) in o.0 {
            // `@class` (Java's), and `$` (the text of an XML element with attributes).
            if k.starts_with('@') || k == "$" {
                continue;
            }
            if !is_xml_name(k) {
                return Err(EurekaError::Field {
                    field: key,
                    why: format!("key {k:?} cannot be an XML element name"),
                });
            }
            let v = scalar(Some(v)).map_err(|why| EurekaError::Field {
                field: key,
                why: format!("{k}: {why}"),
            })?;
            out.insert(k.clone(), v.unwrap_or_default());
        }
        Ok(out)
    }
}

/// Refuses names with control characters (or the non-characters U+FFFE, U+FFFF): no
/// answer could carry them back as they came (XML cannot hold them).
fn printable(field: &'static str, s: String) -> Result<String, EurekaError> {
    match s
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{FFFE}' | '\u{FFFF}'))
    {
        Some(c) => Err(EurekaError::Field {
            field,
            why: format!("{:?} holds the control character {:?}", s, c),
        }),
        None => Ok(s),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Whether `s` can be an XML element name (ASCII letters, digits, `_`, `-`, `.`, not
/// starting with a digit, `-` or `.`): metadata keys are elements in XML answers.
pub fn is_xml_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn registration(
    o: &Map<String, Value>,
    path_app: &str,
    now_ms: u64,
) -> Result<Registration, EurekaError> {
    let f = Fields(o);
    let app = printable("app", path_app.trim().to_ascii_uppercase())?;
    if let Some(body_app) = f.string("app")? {
        if !body_app.eq_ignore_ascii_case(&app) {
            return Err(EurekaError::Field {
                field: "app",
                why: format!("{body_app:?} is not the application of the path, {path_app:?}"),
            });
        }
    }
    let host_name = printable("hostName", f.required("hostName")?)?;
    let ip_addr = printable("ipAddr", f.required("ipAddr")?)?;
    // Eureka's `InstanceInfo.getId()`: the instance ID, else the host name.
    let instance_id = match f.string("instanceId")? {
        Some(id) => printable("instanceId", id)?,
        None => host_name.clone(),
    };
    let status = f.status("status")?.unwrap_or(Status::Up);
    let overridden = match f.status("overriddenStatus")? {
        Some(s) => Some(s),
        None => f.status("overriddenstatus")?,
    }
    .filter(|s| *s != Status::Unknown);
    let (port, port_enabled) = f.port("port", (DEFAULT_PORT, true))?;
    let (secure_port, secure_port_enabled) = f.port("securePort", (DEFAULT_SECURE_PORT, false))?;
    let dc = f
        .object("dataCenterInfo")?
        .ok_or(EurekaError::Missing("dataCenterInfo"))?;
    let lease = f.object("leaseInfo")?;
    let lease_secs = |key: &'static str, default: u32| -> Result<u32, EurekaError> {
        let secs = match &lease {
            Some(l) => l.number::<u32>(key)?,
            None => None,
        };
        // Eureka takes 0 (or less) as "the default".
        let secs = secs.filter(|s| *s > 0).unwrap_or(default);
        if secs > MAX_DURATION_SECS {
            return Err(EurekaError::Field {
                field: key,
                why: format!("{secs} s is over a day"),
            });
        }
        Ok(secs)
    };
    let renewal_interval_secs = lease_secs("renewalIntervalInSecs", DEFAULT_RENEWAL_SECS)?;
    let duration_secs = lease_secs("durationInSecs", DEFAULT_DURATION_SECS)?;
    let last_dirty_ms = f
        .number::<u64>("lastDirtyTimestamp")?
        .filter(|t| *t > 0)
        .unwrap_or(now_ms);
    let info = EurekaDef {
        app,
        app_group_name: f.text("appGroupName")?,
        host_name,
        status: status.as_str().into(),
        overridden_status: overridden.map(|s| s.as_str().into()),
        port,
        port_enabled,
        secure_port,
        secure_port_enabled,
        vip_address: f.text("vipAddress")?,
        secure_vip_address: f.text("secureVipAddress")?,
        home_page_url: f.text("homePageUrl")?,
        status_page_url: f.text("statusPageUrl")?,
        health_check_url: f.text("healthCheckUrl")?,
        secure_health_check_url: f.text("secureHealthCheckUrl")?,
        country_id: f.number("countryId")?.unwrap_or(1),
        data_center_class: dc
            .string("@class")?
            .unwrap_or_else(|| DEFAULT_DATA_CENTER_CLASS.into()),
        data_center_name: dc
            .string("name")?
            .unwrap_or_else(|| DEFAULT_DATA_CENTER_NAME.into()),
        data_center_metadata: dc.map("metadata")?,
        renewal_interval_secs,
        duration_secs,
        coordinating_discovery_server: f.boolean("isCoordinatingDiscoveryServer")?.unwrap_or(false),
        asg_name: f.text("asgName")?,
        registration_ms: now_ms,
        service_up_ms: if status == Status::Up { now_ms } else { 0 },
        last_updated_ms: now_ms,
        last_dirty_ms,
    };
    Ok(Registration {
        instance_id,
        ip_addr,
        metadata: f.map("metadata")?,
        info,
    })
}

/// How an instance changed, in a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Added,
    Modified,
    Deleted,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Added => "ADDED",
            Action::Modified => "MODIFIED",
            Action::Deleted => "DELETED",
        }
    }
}

/// One instance as Eureka clients read it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub id: String,
    pub ip_addr: String,
    pub metadata: BTreeMap<String, String>,
    /// `app` is the application's name as answered.
    pub info: EurekaDef,
    /// The effective status.
    pub status: Status,
    pub overridden: Status,
    /// The registry's change indexes: when it appeared, when it last changed.
    pub create_index: u64,
    pub modify_index: u64,
}

/// One application: its name and instances.
#[derive(Debug, Clone, PartialEq)]
pub struct AppView<'a> {
    pub name: &'a str,
    pub instances: Vec<(&'a InstanceView, Action)>,
}

/// `<applications>` (`GET /apps`, `/apps/delta`, `/vips/..`, `/svips/..`).
pub fn encode_applications(
    apps: &[AppView],
    version: u64,
    hashcode: &str,
    format: Format,
) -> String {
    match format {
        Format::Json => json!({
            "applications": {
                "versions__delta": version.to_string(),
                "apps__hashcode": hashcode,
                "application": apps.iter().map(app_json).collect::<Vec<_>>(),
            }
        })
        .to_string(),
        Format::Xml => {
            let mut out = String::from("<applications>");
            element(&mut out, "versions__delta", &version.to_string());
            element(&mut out, "apps__hashcode", hashcode);
            for app in apps {
                app_xml(&mut out, app);
            }
            out.push_str("</applications>");
            out
        }
    }
}

/// `<application>` (`GET /apps/{app}`).
pub fn encode_application(app: &AppView, format: Format) -> String {
    match format {
        Format::Json => json!({ "application": app_json(app) }).to_string(),
        Format::Xml => {
            let mut out = String::new();
            app_xml(&mut out, app);
            out
        }
    }
}

/// `<instance>` (`GET /apps/{app}/{id}`, `/instances/{id}`).
pub fn encode_instance(i: &InstanceView, action: Action, format: Format) -> String {
    match format {
        Format::Json => json!({ "instance": instance_json(i, action) }).to_string(),
        Format::Xml => {
            let mut out = String::new();
            instance_xml(&mut out, i, action);
            out
        }
    }
}

fn app_json(app: &AppView) -> Value {
    json!({
        "name": app.name,
        "instance": app.instances.iter().map(|(i, a)| instance_json(i, *a)).collect::<Vec<_>>(),
    })
}

fn instance_json(i: &InstanceView, action: Action) -> Value {
    let d = &i.info;
    let mut o = json!({
        "instanceId": i.id,
        "hostName": d.host_name,
        "app": d.app,
        "ipAddr": i.ip_addr,
        "status": i.status.as_str(),
        "overriddenStatus": i.overridden.as_str(),
        "port": {"$": d.port, "@enabled": d.port_enabled.to_string()},
        "securePort": {"$": d.secure_port, "@enabled": d.secure_port_enabled.to_string()},
        "countryId": d.country_id,
        "dataCenterInfo": {"@class": d.data_center_class, "name": d.data_center_name},
        "leaseInfo": {
            "renewalIntervalInSecs": d.renewal_interval_secs,
            "durationInSecs": d.duration_secs,
            "registrationTimestamp": d.registration_ms,
            "lastRenewalTimestamp": d.last_updated_ms,
            "evictionTimestamp": 0,
            "serviceUpTimestamp": d.service_up_ms,
        },
        "metadata": i.metadata,
        "homePageUrl": d.home_page_url,
        "statusPageUrl": d.status_page_url,
        "healthCheckUrl": d.health_check_url,
        "vipAddress": d.vip_address,
        "secureVipAddress": d.secure_vip_address,
        "isCoordinatingDiscoveryServer": d.coordinating_discovery_server.to_string(),
        "lastUpdatedTimestamp": d.last_updated_ms.to_string(),
        "lastDirtyTimestamp": d.last_dirty_ms.to_string(),
        "actionType": action.as_str(),
    });
    let obj = o.as_object_mut().expect("an object");
    if !d.data_center_metadata.is_empty() {
        obj["dataCenterInfo"]["metadata"] = json!(d.data_center_metadata);
    }
    for (key, v) in [
        ("secureHealthCheckUrl", &d.secure_health_check_url),
        ("appGroupName", &d.app_group_name),
        ("asgName", &d.asg_name),
    ] {
        if !v.is_empty() {
            obj.insert(key.into(), json!(v));
        }
    }
    o
}

fn app_xml(out: &mut String, app: &AppView) {
    out.push_str("<application>");
    element(out, "name", app.name);
    for (i, a) in &app.instances {
        instance_xml(out, i, *a);
    }
    out.push_str("</application>");
}

fn instance_xml(out: &mut String, i: &InstanceView, action: Action) {
    let d = &i.info;
    out.push_str("<instance>");
    element(out, "instanceId", &i.id);
    element(out, "hostName", &d.host_name);
    element(out, "app", &d.app);
    if !d.app_group_name.is_empty() {
        element(out, "appGroupName", &d.app_group_name);
    }
    element(out, "ipAddr", &i.ip_addr);
    element(out, "status", i.status.as_str());
    element(out, "overriddenstatus", i.overridden.as_str());
    let _ = write!(
        out,
        "<port enabled=\"{}\">{}</port><securePort enabled=\"{}\">{}</securePort>",
        d.port_enabled, d.port, d.secure_port_enabled, d.secure_port
    );
    element(out, "countryId", &d.country_id.to_string());
    let _ = write!(
        out,
        "<dataCenterInfo class=\"{}\">",
        escape(&d.data_center_class)
    );
    element(out, "name", &d.data_center_name);
    if !d.data_center_metadata.is_empty() {
        map_xml(out, &d.data_center_metadata);
    }
    out.push_str("</dataCenterInfo><leaseInfo>");
    for (name, v) in [
        ("renewalIntervalInSecs", u64::from(d.renewal_interval_secs)),
        ("durationInSecs", u64::from(d.duration_secs)),
        ("registrationTimestamp", d.registration_ms),
        ("lastRenewalTimestamp", d.last_updated_ms),
        ("evictionTimestamp", 0),
        ("serviceUpTimestamp", d.service_up_ms),
    ] {
        element(out, name, &v.to_string());
    }
    out.push_str("</leaseInfo>");
    map_xml(out, &i.metadata);
    element(out, "homePageUrl", &d.home_page_url);
    element(out, "statusPageUrl", &d.status_page_url);
    element(out, "healthCheckUrl", &d.health_check_url);
    if !d.secure_health_check_url.is_empty() {
        element(out, "secureHealthCheckUrl", &d.secure_health_check_url);
    }
    element(out, "vipAddress", &d.vip_address);
    element(out, "secureVipAddress", &d.secure_vip_address);
    element(
        out,
        "isCoordinatingDiscoveryServer",
        &d.coordinating_discovery_server.to_string(),
    );
    element(out, "lastUpdatedTimestamp", &d.last_updated_ms.to_string());
    element(out, "lastDirtyTimestamp", &d.last_dirty_ms.to_string());
    element(out, "actionType", action.as_str());
    if !d.asg_name.is_empty() {
        element(out, "asgName", &d.asg_name);
    }
    out.push_str("</instance>");
}

/// `<metadata>` with one element per key; keys that cannot be element names (from
/// registrations other than Eureka's) are left out.
fn map_xml(out: &mut String, map: &BTreeMap<String, String>) {
    out.push_str("<metadata>");
    for (k, v) in map {
        if is_xml_name(k) {
            element(out, k, v);
        }
    }
    out.push_str("</metadata>");
}

fn element(out: &mut String, name: &str, text: &str) {
    let _ = write!(out, "<{name}>{}</{name}>", escape(text));
}

/// Escapes text and attribute values; characters XML 1.0 cannot hold at all become U+FFFD.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
