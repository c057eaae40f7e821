//! Client subcommands for people: register, deregister and list through the HTTP API of a
//! running resolver, exactly as any Consul client would.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

/// Where the resolver's API is.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The resolver's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8500", env = "WAYMARK_ADDR")]
    pub addr: String,
    /// Bearer token, when the resolver requires one.
    #[arg(long, env = "WAYMARK_TOKEN")]
    pub token: Option<String>,
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// Service name.
    #[arg(long)]
    pub name: String,
    /// Instance ID (default: the name).
    #[arg(long)]
    pub id: Option<String>,
    /// The instance's IP address (or a host name, answered with a CNAME).
    #[arg(long)]
    pub address: String,
    /// The instance's port.
    #[arg(long)]
    pub port: u16,
    /// Tag (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata as KEY=VALUE (repeatable); the gateway reads `gateway.*` keys, e.g.
    /// `--meta gateway.host=api.example.com`.
    #[arg(long = "meta", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// URL of an HTTP health check.
    #[arg(long)]
    pub http_check: Option<String>,
    /// host:port of a TCP health check.
    #[arg(long)]
    pub tcp_check: Option<String>,
    /// Check interval, with a unit: 500ms, 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    pub interval: String,
    #[command(flatten)]
    pub conn: Conn,
}

impl Conn {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let base = if self.addr.starts_with("http") {
            self.addr.clone()
        } else {
            format!("http://{}", self.addr)
        };
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", base.trim_end_matches('/')))
            .timeout(Duration::from_secs(10));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }
}

/// `KEY=VALUE` for `--meta`.
fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// A duration with its unit (`10s`, `500ms`), as the API takes it.
fn parse_interval(s: &str) -> Result<String, String> {
    waymark_shared::duration::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// The message of an API error: the `error` field of a JSON body, or the body as text.
pub fn error_message(body: &str) -> String {
    let text = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            ["error", "Error", "message"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
        })
        .unwrap_or_else(|| body.trim().to_string());
    if text.is_empty() {
        "(no message)".into()
    } else {
        text
    }
}

async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    bail!("the resolver refused ({status}): {}", error_message(&body))
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let mut body = json!({
        "Name": args.name,
        "Address": args.address,
        "Port": args.port,
        "Tags": args.tags,
    });
    if let Some(id) = &args.id {
        body["ID"] = json!(id);
    }
    if !args.meta.is_empty() {
        body["Meta"] = json!(args
            .meta
            .iter()
            .cloned()
            .collect::<std::collections::BTreeMap<_, _>>());
    }
    if let Some(url) = &args.http_check {
        body["Check"] = json!({"HTTP": url, "Interval": args.interval});
    } else if let Some(addr) = &args.tcp_check {
        body["Check"] = json!({"TCP": addr, "Interval": args.interval});
    }
    let resp = args
        .conn
        .request(reqwest::Method::PUT, "/v1/agent/service/register")
        .json(&body)
        .send()
        .await
        .context("cannot reach the resolver")?;
    check(resp).await?;
    println!("registered {}", args.id.as_deref().unwrap_or(&args.name));
    Ok(())
}

pub async fn deregister(conn: &Conn, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/agent/service/deregister/{}", percent_encode(id));
    let resp = conn
        .request(reqwest::Method::PUT, &path)
        .send()
        .await
        .context("cannot reach the resolver")?;
    check(resp).await?;
    println!("deregistered {id}");
    Ok(())
}

pub async fn list(conn: &Conn) -> anyhow::Result<()> {
    let services: Value = check(
        conn.request(reqwest::Method::GET, "/v1/catalog/services")
            .send()
            .await
            .context("cannot reach the resolver")?,
    )
    .await?
    .json()
    .await?;
    let Value::Object(services) = services else {
        bail!("unexpected answer from the resolver")
    };
    println!(
        "{:<24} {:<24} {:<22} {:<9} TAGS",
        "SERVICE", "ID", "ADDRESS", "HEALTH"
    );
    for name in services.keys() {
        let path = format!("/v1/health/service/{}", percent_encode(name));
        let entries: Vec<Value> = check(conn.request(reqwest::Method::GET, &path).send().await?)
            .await?
            .json()
            .await?;
        for e in entries {
            let s = &e["Service"];
            let health = shown_health(e["Checks"].as_array().map_or(&[][..], Vec::as_slice));
            let tags: Vec<&str> = s["Tags"]
                .as_array()
                .map(|t| t.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!(
                "{:<24} {:<24} {:<22} {:<9} {}",
                name,
                s["ID"].as_str().unwrap_or(""),
                format!("{}:{}", s["Address"].as_str().unwrap_or(""), s["Port"]),
                health,
                tags.join(",")
            );
        }
    }
    Ok(())
}

/// What `list` shows for an instance with these checks (Consul's JSON shape): `draining`
/// while in maintenance (as Consul, a `_service_maintenance:` check), else the worst status.
pub fn shown_health(checks: &[Value]) -> &'static str {
    let maintenance = checks.iter().any(|c| {
        c["CheckID"]
            .as_str()
            .is_some_and(|id| id.starts_with("_service_maintenance:"))
    });
    if maintenance {
        return "draining";
    }
    let statuses: Vec<&str> = checks.iter().filter_map(|c| c["Status"].as_str()).collect();
    ["critical", "warning"]
        .into_iter()
        .find(|w| statuses.contains(w))
        .unwrap_or("passing")
}

/// Percent-encodes a path segment.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_shows_draining_then_the_worst_status() {
        let check = |id: &str, status: &str| json!({"CheckID": id, "Status": status});
        let cases = [
            (vec![], "passing"),
            (vec![check("a", "passing")], "passing"),
            (
                vec![check("a", "passing"), check("b", "warning")],
                "warning",
            ),
            (
                vec![check("a", "warning"), check("b", "critical")],
                "critical",
            ),
            (
                vec![
                    check("a", "passing"),
                    check("_service_maintenance:pay-1", "critical"),
                ],
                "draining",
            ),
        ];
        for (checks, want) in cases {
            assert_eq!(shown_health(&checks), want, "{checks:?}");
        }
    }

    #[test]
    fn api_errors_show_their_message() {
        assert_eq!(
            error_message(r#"{"error":"Address \"not an ip!\" is neither an IP nor a host name"}"#),
            "Address \"not an ip!\" is neither an IP nor a host name"
        );
        assert_eq!(error_message("plain text\n"), "plain text");
        assert_eq!(error_message(""), "(no message)");
    }

    #[test]
    fn flags_are_checked_before_anything_is_sent() {
        assert_eq!(
            parse_meta("gateway.host=a.test"),
            Ok(("gateway.host".into(), "a.test".into()))
        );
        assert!(parse_meta("novalue").is_err());
        assert!(parse_meta("=x").is_err());
        assert_eq!(parse_interval("10s"), Ok("10s".into()));
        assert!(parse_interval("5").unwrap_err().contains("unit is missing"));
        assert!(parse_interval("abc").is_err());
    }
}
