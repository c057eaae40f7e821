//! gRPC through the gateway: a tonic client calls a tonic server (unary calls, with status
//! codes and metadata carried in HTTP/2 trailers), the gateway taking HTTP/2 without TLS from
//! the client (`--h2c`) and speaking it to the instance (`upstream_h2c = true`).
//!
//! The messages are declared with prost's derive, so no protoc is needed: this is exactly the
//! wire format generated code would use.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use serde_json::json;
use tonic::body::Body;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use waymark_e2e::gateway::{Gateway, GatewayOptions};
use waymark_e2e::{Api, Resolver};

#[derive(Clone, PartialEq, prost::Message)]
struct SayRequest {
    #[prost(string, tag = "1")]
    text: String,
    /// When set, the server fails the call with this gRPC status code.
    #[prost(int32, tag = "2")]
    fail_with: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SayReply {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(string, tag = "2")]
    served_by: String,
}

const SAY: &str = "/waymark.test.Echo/Say";

/// The server side of `waymark.test.Echo`, written as generated code would be.
#[derive(Clone)]
struct EchoServer {
    id: String,
}

impl tower::Service<http::Request<Body>> for EchoServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let id = self.id.clone();
        Box::pin(async move {
            if req.uri().path() != SAY {
                return Ok(Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let say = tower::service_fn(move |r: Request<SayRequest>| {
                let id = id.clone();
                async move {
                    let proto_seen = r
                        .metadata()
                        .get("x-forwarded-proto")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let msg = r.into_inner();
                    if msg.fail_with != 0 {
                        return Err(Status::new(Code::from(msg.fail_with), "asked to fail"));
                    }
                    let mut resp = Response::new(SayReply {
                        text: format!("echo: {}", msg.text),
                        served_by: id,
                    });
                    resp.metadata_mut()
                        .insert("x-seen-proto", proto_seen.parse().unwrap());
                    Ok::<_, Status>(resp)
                }
            });
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<SayReply, SayRequest>::default());
            Ok(grpc.unary(say, req).await)
        })
    }
}

async fn start_server(id: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = EchoServer { id: id.to_string() };
    tokio::spawn(async move {
        let _ = Server::builder()
            .serve_with_incoming(svc, TcpIncoming::from(listener))
            .await;
    });
    addr
}

async fn say(
    channel: &tonic::transport::Channel,
    text: &str,
    fail_with: i32,
) -> Result<Response<SayReply>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(SayRequest {
            text: text.into(),
            fail_with,
        }),
        PathAndQuery::from_static(SAY),
        ProstCodec::<SayRequest, SayReply>::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_calls_through_the_gateway() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let a = start_server("grpc-a").await;
    let b = start_server("grpc-b").await;
    for (id, addr) in [("grpc-a", a), ("grpc-b", b)] {
        api.register(json!({
            "ID": id, "Name": "echo", "Address": "127.0.0.1", "Port": addr.port(),
        }))
        .await;
    }
    let gw = Gateway::start(
        &resolver,
        GatewayOptions {
            h2c: true,
            config: r#"
[[routes]]
host = "grpc.test"
path = "/waymark.test.Echo"
service = "echo"
upstream_h2c = true
"#
            .into(),
            ..Default::default()
        },
    );
    let channel = Endpoint::from_shared(format!("http://{}", gw.http))
        .unwrap()
        .origin("http://grpc.test".parse().unwrap())
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("h2c connection to the gateway");

    // The route is there once the registry's state has arrived.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match say(&channel, "warm-up", 0).await {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no gRPC route: {e}\n{}", gw.log()),
        }
    }

    let mut served = std::collections::BTreeSet::new();
    for i in 0..20 {
        let resp = say(&channel, &format!("hi {i}"), 0)
            .await
            .expect("unary call");
        assert_eq!(resp.metadata().get("x-seen-proto").unwrap(), "http");
        let reply = resp.into_inner();
        assert_eq!(reply.text, format!("echo: hi {i}"));
        served.insert(reply.served_by);
    }
    assert_eq!(served.len(), 2, "both instances served: {served:?}");

    // A gRPC error status travels back in the trailers, untouched.
    let err = say(&channel, "x", Code::NotFound as i32).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "asked to fail");

    // Unknown methods on the routed service: the instance's own UNIMPLEMENTED.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            Request::new(SayRequest::default()),
            PathAndQuery::from_static("/waymark.test.Echo/Nope"),
            ProstCodec::<SayRequest, SayReply>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}
