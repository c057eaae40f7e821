//! Forwarder-to-forwarder tunnels over real sockets: two host identities from a real
//! registry's CA, the inbound listener of one, the pooled outbound side of the other. Many
//! streams share one mutual-TLS connection (one handshake); half-close passes through; the
//! inbound side opens streams only to the targets it admits (its own host's instances) and
//! tells an unreachable target apart; a renewed identity gets a new connection while streams
//! on the old one go on.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use waymark_e2e::Resolver;
use waymark_gateway::identity::{Identity, IdentitySettings};
use waymark_gateway::tunnel::{
    serve_inbound, InboundStats, Peer, Refusal, TunnelError, TunnelPool,
};

/// A TCP echo server: echoes until the client half-closes, then closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn identity(r: &Resolver, host: &str, dir: &std::path::Path) -> Arc<Identity> {
    let out = std::process::Command::new(waymark_e2e::resolver_bin())
        .args(["ca", "join-token", "--data-dir"])
        .arg(&r.data_dir)
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    Identity::obtain(IdentitySettings {
        registry: format!("http://{}", r.http),
        host: host.into(),
        join_token: token,
        state_dir: dir.join(host),
    })
    .await
    .unwrap()
}

async fn roundtrip(stream: &mut waymark_gateway::tunnel::Stream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_one_mutual_tls_connection_and_only_admitted_targets_open() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = Resolver::start();
    let dir = tempfile::tempdir().unwrap();
    let a = identity(&r, "host-a", dir.path()).await;
    let b = identity(&r, "host-b", dir.path()).await;

    let instance = echo_server().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let admitted = [instance, closed];
    let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = Peer {
        host: "host-b".into(),
        addr: inbound.local_addr().unwrap(),
    };
    let stats = Arc::new(InboundStats::default());
    tokio::spawn(serve_inbound(
        inbound,
        b.clone(),
        Arc::new(move |target: SocketAddr, from: &str| {
            if from != "host-a" {
                return Err(Refusal::Forbidden(format!("{from} may not call")));
            }
            admitted
                .contains(&target)
                .then_some(())
                .ok_or_else(|| Refusal::NotHere("not an instance on this host".into()))
        }),
        Duration::from_secs(1),
        stats.clone(),
    ));

    let pool = Arc::new(TunnelPool::new(a.clone(), Duration::from_secs(2)));
    // 50 streams, 10 at a time: one handshake.
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (pool, peer) = (pool.clone(), peer.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = pool.open(&peer, instance).await.unwrap();
                let msg = format!("round {round} stream {i}");
                assert_eq!(roundtrip(&mut s, msg.as_bytes()).await, msg.as_bytes());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert_eq!(pool.handshakes(), 1, "every stream on one connection");
    assert_eq!(stats.streams.load(Ordering::Relaxed), 50);

    // Half-close: the client's end of input reaches the instance, which then closes.
    let mut s = pool.open(&peer, instance).await.unwrap();
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the instance's close came through")
        .unwrap();
    assert_eq!(rest, b"last words");

    // Not an instance of this host: never connected, and the caller may try another
    // instance. Admitted but not listening: unreachable, which may be retried elsewhere too.
    let err = pool.open(&peer, r.http).await.err().unwrap();
    assert!(matches!(err, TunnelError::NotHere { .. }), "{err}");
    assert!(err.is_retryable());
    let err = pool.open(&peer, closed).await.err().unwrap();
    assert!(
        matches!(err, TunnelError::TargetUnreachable { .. }),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(stats.refused.load(Ordering::Relaxed), 1);

    // A third host (a real mesh identity) that the policy does not allow: refused.
    let c = identity(&r, "host-c", dir.path()).await;
    let c_pool = TunnelPool::new(c, Duration::from_secs(2));
    let err = c_pool.open(&peer, instance).await.err().unwrap();
    assert!(matches!(err, TunnelError::Refused { .. }), "{err}");
    assert!(
        !err.is_retryable(),
        "a policy refusal is the same on any instance"
    );

    // Renewal: a stream opened before goes on; the next opens on a new connection.
    let mut before = pool.open(&peer, instance).await.unwrap();
    a.renew().await.unwrap();
    let mut after = pool.open(&peer, instance).await.unwrap();
    assert_eq!(pool.handshakes(), 2);
    assert_eq!(roundtrip(&mut after, b"new").await, b"new");
    assert_eq!(roundtrip(&mut before, b"old").await, b"old");
    assert_eq!(stats.handshakes_refused.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_a_mesh_certificate_gets_no_stream() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = Resolver::start();
    let dir = tempfile::tempdir().unwrap();
    let b = identity(&r, "host-b", dir.path()).await;
    let instance = echo_server().await;
    let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = inbound.local_addr().unwrap();
    let stats = Arc::new(InboundStats::default());
    tokio::spawn(serve_inbound(
        inbound,
        b,
        Arc::new(|_: SocketAddr, _: &str| Ok(())),
        Duration::from_secs(1),
        stats.clone(),
    ));
    // Plain text, as an open proxy would be used: nothing comes back, nothing is opened.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(format!("CONNECT {instance} HTTP/1.1\r\nHost: {instance}\r\n\r\n").as_bytes())
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"), "{buf:?}");
    waymark_e2e::eventually(Duration::from_secs(5), || async {
        stats.handshakes_refused.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stats.handshakes_refused.load(Ordering::Relaxed), 1);
    assert_eq!(stats.streams.load(Ordering::Relaxed), 0);
}
