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
    #[arg(long)]
    pub address: String,
    #[arg(long)]
    pub port: u16,
    /// Tag (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// URL of an HTTP health check.
    #[arg(long)]
    pub http_check: Option<String>,
    /// host:port of a TCP health check.
    #[arg(long)]
    pub tcp_check: Option<String>,
    /// Check interval.
    #[arg(long, default_value = "10s")]
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

/// Passes a successful response; turns any other into an error that says the API's message
/// (`{"error": "..."}`), not its JSON.
async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    bail!("{}", error_message(status, &body))
}

fn error_message(status: reqwest::StatusCode, body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    let reason = status.canonical_reason().unwrap_or("error");
    if message.is_empty() {
        format!("the resolver answered {} {reason}", status.as_u16())
    } else {
        format!("{message} ({} {reason})", status.as_u16())
    }
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
            let statuses: Vec<&str> = e["Checks"]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["Status"].as_str()).collect())
                .unwrap_or_default();
            let health = ["critical", "warning"]
                .into_iter()
                .find(|w| statuses.contains(w))
                .unwrap_or("passing");
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
    fn errors_show_the_apis_message() {
        let cases = [
            (
                400,
                r#"{"error": "Address \"x y\" is bad"}"#,
                "Address \"x y\" is bad (400 Bad Request)",
            ),
            (403, "", "the resolver answered 403 Forbidden"),
            (502, "upstream down\n", "upstream down (502 Bad Gateway)"),
        ];
        for (status, body, want) in cases {
            let status = reqwest::StatusCode::from_u16(status).unwrap();
            assert_eq!(error_message(status, body), want);
        }
    }
}
