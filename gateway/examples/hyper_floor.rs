//! What an HTTP/1.1 proxy costs on hyper, the stack the forwarder's HTTP mode is built on: a
//! proxy that forwards every request to one fixed address over pooled keep-alive
//! connections, on one single-threaded runtime with mimalloc. `tests/bench/gateway.sh` runs it
//! beside `pingora_floor`, so the report compares the two floors a gateway data path can
//! stand on.
//!
//! ```sh
//! cargo run --release -p waymark-gateway --example hyper_floor -- 127.0.0.1:8082 127.0.0.1:9000
//! ```

use std::convert::Infallible;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = BoxBody<bytes::Bytes, hyper::Error>;

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &Authority,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let mut uri = parts.uri.into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(upstream.clone());
    parts.uri = Uri::from_parts(uri).expect("an origin-form path with a scheme and authority");
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(
                Full::new(bytes::Bytes::from(format!("{e}\n")))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("a static response"),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream] = args.as_slice() else {
        anyhow::bail!("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR");
    };
    let upstream: Authority = upstream.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
        println!("hyper_floor listening {}", listener.local_addr()?);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(connector);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (client, upstream) = (client.clone(), upstream.clone());
                    async move { Ok::<_, Infallible>(forward(&client, &upstream, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}
