//! WebSocket through the gateway: the upgrade reaches the instance (with its `Upgrade` and
//! `Connection` headers intact) and messages flow both ways, with tokio-tungstenite as the
//! client and the backend's echo as the server.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use waymark_e2e::gateway::{Backend, Gateway, GatewayOptions};
use waymark_e2e::{until, Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let web = Backend::start(BACKEND, "ws-1");
    api.register(web.registration(
        "chat",
        &[],
        json!({"waymark-public-host": "ws.test", "waymark-public-path": "/ws"}),
        0,
    ))
    .await;
    let gw = Gateway::start(&resolver, GatewayOptions::default());
    let c = reqwest::Client::new();
    until(
        "route ready",
        Duration::from_secs(10),
        || async {
            c.get(gw.url("/ws"))
                .header("host", "ws.test")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        },
        // A plain GET to the WebSocket endpoint is refused by the instance (not by the gateway).
        |s| matches!(s, Some(s) if *s != 404 && *s != 503),
    )
    .await;

    let mut req = format!("ws://{}/ws", gw.http)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", "ws.test".parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        ws.send(Message::Text(format!("hello {i}").into()))
            .await
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("a message");
        assert_eq!(reply, Message::Text(format!("ws-1: hello {i}").into()));
    }
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply, Message::Binary(b"ws-1\x01\x02\x03".to_vec().into()));
    ws.close(None).await.unwrap();
}
