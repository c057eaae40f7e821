//! The mesh CA through its real interfaces: the resolver creates it on first start, a
//! forwarder-like client sends a CSR over HTTP with the join token, and `openssl` checks what
//! comes back: a short-lived certificate for the host's SPIFFE identity, chaining to the trust
//! bundle. `ca init --rotate` stages a second root.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use waymark_e2e::{resolver_bin, Options, Resolver};

fn csr(key: &rcgen::KeyPair, names: &[&str]) -> String {
    rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

fn join_token(data_dir: &Path) -> String {
    let out = Command::new(resolver_bin())
        .args(["ca", "join-token", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn sign(r: &Resolver, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(r.url("/v1/mesh/sign"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `openssl verify` of `cert` against `bundle`; the output on failure.
fn openssl_verify(dir: &Path, bundle: &str, cert: &str) -> Result<(), String> {
    std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

fn openssl_text(dir: &Path, cert: &str) -> String {
    std::fs::write(dir.join("show.pem"), cert).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("show.pem"))
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn forwarders_get_short_lived_host_certificates_with_the_join_token_only() {
    let mut r = Resolver::with(Options {
        config: Some("[ca]\ncert_ttl = \"90s\"\n".into()),
        ..Options::default()
    });
    let scratch = tempfile::tempdir().unwrap();
    let token = join_token(&r.data_dir);
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    let key = rcgen::KeyPair::generate().unwrap();

    // The request asks for another identity: the certificate is for the host named.
    let (status, issued) = sign(
        &r,
        Some(&token),
        json!({"Host": "host-a", "CSR": csr(&key, &["bank.example"])}),
    )
    .await;
    assert_eq!(status, 200, "{issued}");
    assert_eq!(issued["SpiffeID"], "spiffe://mesh.internal/host/host-a");
    let cert = issued["Certificate"].as_str().unwrap();
    let bundle = issued["TrustBundle"].as_str().unwrap();
    openssl_verify(scratch.path(), bundle, cert).unwrap();
    let text = openssl_text(scratch.path(), cert);
    assert!(
        text.contains("URI:spiffe://mesh.internal/host/host-a"),
        "{text}"
    );
    assert!(
        text.contains("DNS:host-a") && !text.contains("bank.example"),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = issued["NotAfter"].as_u64().unwrap().saturating_sub(now);
    assert!((80..=95).contains(&left), "cert_ttl 90s: {left}s left");
    // The bundle is public.
    let served = reqwest::get(r.url("/v1/mesh/bundle"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, bundle);

    // No token, a wrong one, a bad host, a bad CSR, bad JSON: refused, counted.
    let body = json!({"Host": "host-b", "CSR": csr(&key, &[])});
    assert_eq!(sign(&r, None, body.clone()).await.0, 403);
    assert_eq!(
        sign(&r, Some("0123456789abcdef"), body.clone()).await.0,
        403
    );
    let (status, err) = sign(
        &r,
        Some(&token),
        json!({"Host": "a.b", "CSR": csr(&key, &[])}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("not a DNS label"),
        "{err}"
    );
    let (status, _) = sign(&r, Some(&token), json!({"Host": "h", "CSR": "garbage"})).await;
    assert_eq!(status, 400);
    let (status, _) = sign(&r, Some(&token), json!({"Host": "h"})).await;
    assert_eq!(status, 400);
    let metrics = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("waymark_ca_sign_requests_total{result=\"token\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("waymark_ca_sign_requests_total{result=\"issued\"} 1"),
        "{metrics}"
    );

    // The CA survives a restart: same bundle, same token.
    r.restart();
    assert_eq!(join_token(&r.data_dir), token);
    let (status, again) = sign(
        &r,
        Some(&token),
        json!({"Host": "host-a", "CSR": csr(&key, &[])}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again["TrustBundle"], issued["TrustBundle"]);

    // A staged rotation: both roots in the bundle; the new one signs after a restart, and a
    // certificate from the old root still verifies against the new bundle.
    r.stop();
    let out = Command::new(resolver_bin())
        .args(["ca", "init", "--rotate", "--data-dir"])
        .arg(&r.data_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("added a new root"));
    r.restart_stopped();
    let (status, rotated) = sign(
        &r,
        Some(&token),
        json!({"Host": "host-a", "CSR": csr(&key, &[])}),
    )
    .await;
    assert_eq!(status, 200);
    let new_bundle = rotated["TrustBundle"].as_str().unwrap();
    assert_eq!(new_bundle.matches("BEGIN CERTIFICATE").count(), 2);
    openssl_verify(
        scratch.path(),
        new_bundle,
        rotated["Certificate"].as_str().unwrap(),
    )
    .unwrap();
    openssl_verify(scratch.path(), new_bundle, cert).unwrap();
    assert!(
        openssl_verify(
            scratch.path(),
            bundle,
            rotated["Certificate"].as_str().unwrap()
        )
        .is_err(),
        "signed by the new root"
    );
}

#[test]
fn ca_init_creates_once_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let init = || {
        let out = Command::new(resolver_bin())
            .args(["ca", "init", "--trust-domain", "corp.test", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(init().contains("created the mesh CA"));
    assert!(init().contains("already exists"));
    let out = Command::new(resolver_bin())
        .args(["ca", "init", "--trust-domain", "Not Valid", "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust domain"));
}
