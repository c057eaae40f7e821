//! A forwarder's mesh identity against a real registry: keys made on the host, certificates
//! from the registry's CA over HTTP, mutual TLS between two hosts over real sockets (rustls),
//! strangers refused, renewal at half-life with a connection opened before it still working,
//! and a restart that reuses the certificate in the state dir.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use waymark_e2e::{Options, Resolver};
use waymark_gateway::identity::{peer_host, Identity, IdentityError, IdentitySettings};

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn join_token(r: &Resolver) -> String {
    let out = std::process::Command::new(waymark_e2e::resolver_bin())
        .args(["ca", "join-token", "--data-dir"])
        .arg(&r.data_dir)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn settings(r: &Resolver, host: &str, token: &str, dir: &std::path::Path) -> IdentitySettings {
    IdentitySettings {
        registry: format!("http://{}", r.http),
        host: host.into(),
        join_token: token.into(),
        state_dir: dir.join(host),
    }
}

/// A TLS echo server with the identity's current server config at each accept: it answers
/// each line with `<peer host>: <line>`.
async fn serve(identity: Arc<Identity>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(identity.current().server.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = peer_host(tls.get_ref().1.peer_certificates().unwrap_or(&[]))
                    .unwrap_or_default();
                let mut lines = BufReader::new(tls);
                let mut line = String::new();
                while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply = format!("{peer}: {line}");
                    if lines.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    name: &str,
) -> std::io::Result<BufReader<Tls>> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await?;
    Ok(BufReader::new(tls))
}

async fn ask(conn: &mut BufReader<Tls>, line: &str) -> std::io::Result<String> {
    conn.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await?;
    let mut reply = String::new();
    conn.read_line(&mut reply).await?;
    if reply.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(reply.trim_end().to_string())
}

#[tokio::test]
async fn two_hosts_talk_mutual_tls_and_strangers_are_refused() {
    provider();
    let r = Resolver::with(Options {
        config: Some("[ca]\ncert_ttl = \"1h\"\n".into()),
        ..Options::default()
    });
    let token = join_token(&r);
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::obtain(settings(&r, "host-a", &token, dir.path()))
        .await
        .unwrap();
    let b = Identity::obtain(settings(&r, "host-b", &token, dir.path()))
        .await
        .unwrap();
    let b_addr = serve(b.clone()).await;

    // a calls b: both sides verified; b sees a's identity.
    let mut conn = connect(a.current().client.clone(), b_addr, "host-b")
        .await
        .unwrap();
    assert_eq!(ask(&mut conn, "hello").await.unwrap(), "host-a: hello");
    // a meant to call host-c but reached b: refused by a's own check.
    assert!(connect(a.current().client.clone(), b_addr, "host-c")
        .await
        .is_err());

    // A client with no certificate, and one with a certificate from another CA: refused.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(
            std::fs::read(dir.path().join("host-a/bundle.pem"))
                .unwrap()
                .as_slice(),
        ) {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(roots)
    };
    let anonymous = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let refused = match connect(Arc::new(anonymous), b_addr, "host-b").await {
        Err(_) => true,
        Ok(mut c) => ask(&mut c, "let me in").await.is_err(),
    };
    assert!(refused, "a client without a mesh certificate got through");
    let stranger_ca = rcgen::generate_simple_self_signed(vec!["host-x".to_string()]).unwrap();
    let stranger = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![stranger_ca.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(stranger_ca.key_pair.serialize_der())
                .unwrap(),
        )
        .unwrap();
    let refused = match connect(Arc::new(stranger), b_addr, "host-b").await {
        Err(_) => true,
        Ok(mut c) => ask(&mut c, "let me in").await.is_err(),
    };
    assert!(
        refused,
        "a client with another CA's certificate got through"
    );

    // The wrong join token is a clear error.
    let err = Identity::obtain(settings(&r, "host-c", "not-the-token", dir.path()))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, IdentityError::Token { .. }), "{err}");
    assert!(err.to_string().contains("--join-token"), "{err}");
}

#[tokio::test]
async fn certificates_renew_at_half_life_without_dropping_a_connection() {
    provider();
    let mut r = Resolver::with(Options {
        config: Some("[ca]\ncert_ttl = \"4s\"\n".into()),
        ..Options::default()
    });
    let token = join_token(&r);
    let dir = tempfile::tempdir().unwrap();
    let a = Identity::obtain(settings(&r, "host-a", &token, dir.path()))
        .await
        .unwrap();
    let b = Identity::obtain(settings(&r, "host-b", &token, dir.path()))
        .await
        .unwrap();
    let first = a.current().not_after;
    for id in [&a, &b] {
        tokio::spawn(id.clone().keep_renewed(Duration::from_millis(200)));
    }
    let b_addr = serve(b.clone()).await;
    let mut long_lived = connect(a.current().client.clone(), b_addr, "host-b")
        .await
        .unwrap();
    assert_eq!(
        ask(&mut long_lived, "before").await.unwrap(),
        "host-a: before"
    );

    // Past the first certificates' expiry: renewed (at half-life, not back to back), new
    // handshakes work all along, and the connection opened before too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while SystemTime::now() < first + Duration::from_millis(500) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the test ran too long"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fresh = connect(a.current().client.clone(), b_addr, "host-b")
            .await
            .unwrap();
        assert_eq!(ask(&mut fresh, "during").await.unwrap(), "host-a: during");
    }
    assert!(a.current().not_after > first, "renewed");
    assert_eq!(
        ask(&mut long_lived, "after").await.unwrap(),
        "host-a: after"
    );
    let metrics = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let issued: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("waymark_ca_sign_requests_total{result=\"issued\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    // About one renewal every 2 s per host over about 4.5 s, and the two first certificates.
    assert!((4..=12).contains(&issued), "{issued} certificates signed");

    // A restart of the forwarder reuses the fresh certificate in its state dir: the CA is not
    // asked again (even while it is down).
    let renewed = a.current().certificate.clone();
    r.stop();
    let again = Identity::obtain(settings(&r, "host-a", &token, dir.path())).await;
    match again {
        Ok(id) => assert_eq!(id.current().certificate, renewed),
        // Past half-life already on a slow machine: then it must have asked the CA (down).
        Err(e) => assert!(matches!(e, IdentityError::Unreachable { .. }), "{e}"),
    }
}
