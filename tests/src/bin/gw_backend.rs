//! A backend HTTP server for the gateway's end-to-end tests, run as its own process so tests
//! can kill and restart it. It answers every request with JSON describing what it received:
//! `{"id", "method", "uri", "version", "headers"}`.
//!
//! - `--addr IP:PORT` (default `127.0.0.1:0`), `--id NAME` (in every answer),
//!   `--status CODE` (the status of every answer except `/health`, default 200).
//! - `?status=CODE` answers with that status; `?sleep_ms=N` waits first (at most 10 s).
//! - `?bytes=N` answers with a body of N bytes (`x`), streamed in 64 KiB chunks.
//! - `/health` answers 200 whatever `--status` says.
//! - `/ws` is a WebSocket echo: every text or binary message comes back prefixed with the
//!   backend's ID (`"<id>: <message>"` for text).
//!
//! Prints `gw_backend listening ADDR` once it accepts connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

#[derive(Clone)]
struct Conf {
    id: String,
    status: u16,
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn answer(State(conf): State<Conf>, req: Request) -> Response {
    let query = req.uri().query().unwrap_or("").to_string();
    if let Some(ms) = query_param(&query, "sleep_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    }
    let mut status = if req.uri().path() == "/health" {
        200
    } else {
        conf.status
    };
    if let Some(s) = query_param(&query, "status").and_then(|v| v.parse::<u16>().ok()) {
        status = s;
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).to_string();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let body_len = axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .map(|b| b.len())
        .unwrap_or(0);
    let json = serde_json::json!({
        "id": conf.id,
        "headers": headers,
        "body_len": body_len,
    });
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        Body::from(json.to_string()),
    )
        .into_response()
}

/// A body of `n` bytes, produced as the client takes it.
fn bytes_body(n: u64) -> Response {
    const CHUNK: u64 = 64 * 1024;
    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK as usize]);
    let chunks = futures::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            (left > 0).then(|| {
                let take = left.min(CHUNK);
                (
                    Ok::<_, std::io::Error>(chunk.slice(..take as usize)),
                    left - take,
                )
            })
        }
    });
    (
        [
            ("content-type", "application/octet-stream".to_string()),
            ("content-length", n.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

async fn describe(State(conf): State<Conf>, req: Request) -> Response {
    let query = req.uri().query().unwrap_or("");
    if let Some(n) = query_param(query, "bytes").and_then(|v| v.parse::<u64>().ok()) {
        return bytes_body(n);
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let version = format!("{:?}", req.version());
    let resp = answer(State(conf), req).await;
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    v["method"] = method.into();
    v["uri"] = uri.into();
    v["version"] = version.into();
    Response::from_parts(parts, Body::from(v.to_string()))
}

async fn ws(State(conf): State<Conf>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| echo(socket, conf.id))
}

async fn echo(mut socket: WebSocket, id: String) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(format!("{id}: {}", t.as_str()).into()),
            Message::Binary(b) => {
                let mut v = id.as_bytes().to_vec();
                v.extend_from_slice(&b);
                Message::Binary(v.into())
            }
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut addr: SocketAddr = "127.0.0.1:0".parse()?;
    let mut conf = Conf {
        id: "backend".into(),
        status: 200,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--addr" => addr = value()?.parse()?,
            "--id" => conf.id = value()?,
            "--status" => conf.status = value()?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("gw_backend listening {}", listener.local_addr()?);
    let app = Router::new()
        .route("/ws", get(ws))
        .fallback(describe)
        .with_state(conf);
    axum::serve(listener, app).await?;
    Ok(())
}
