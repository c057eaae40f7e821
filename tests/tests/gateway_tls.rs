//! TLS on the gateway: two server names on one port, each with its own certificate picked by
//! SNI, HTTP/2 and HTTP/1.1 by ALPN, certificates reloaded when their files change (with no
//! failed request under load while they do), with reqwest (rustls) and curl (OpenSSL) as
//! clients.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_e2e::gateway::{Backend, Gateway, GatewayOptions, TestCa};
use waymark_e2e::{have, until, Api, Resolver};

const BACKEND: &str = env!("CARGO_BIN_EXE_gw_backend");

/// A client that trusts only `ca` and sends `name` as SNI (resolved to the gateway).
fn client_for(ca: &TestCa, name: &str, gw: &Gateway, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve(name, gw.tls.unwrap())
        .timeout(Duration::from_secs(10));
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

fn url(name: &str, gw: &Gateway, path: &str) -> String {
    format!("https://{name}:{}{path}", gw.tls.unwrap().port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_names_on_one_port_alpn_and_reload() {
    let resolver = Resolver::start();
    let api = Api::new(&resolver);
    let a = Backend::start(BACKEND, "a-1");
    let b = Backend::start(BACKEND, "b-1");
    api.register(a.registration("svc-a", &[], json!({"waymark-public-host": "a.test"}), 0))
        .await;
    api.register(b.registration("svc-b", &[], json!({"waymark-public-host": "b.test"}), 0))
        .await;

    let certs = tempfile::tempdir().unwrap();
    let ca_a = TestCa::new("CA for a");
    let ca_b = TestCa::new("CA for b");
    ca_a.write_leaf(certs.path(), "a.test");
    ca_b.write_leaf(certs.path(), "b.test");
    let gw = Gateway::start(
        &resolver,
        GatewayOptions {
            tls_dir: Some(certs.path().to_path_buf()),
            config: "tls_reload_interval = \"200ms\"\n".into(),
            ..Default::default()
        },
    );

    // Each name gets its own certificate: a client trusting only a's CA reaches a.test…
    let ca = client_for(&ca_a, "a.test", &gw, false);
    let resp = ca
        .get(url("a.test", &gw, "/x"))
        .send()
        .await
        .expect("TLS to a.test");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "a-1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    // …and b.test with b's CA, over HTTP/1.1 when the client offers only that.
    let cb = client_for(&ca_b, "b.test", &gw, true);
    let resp = cb
        .get(url("b.test", &gw, "/y"))
        .send()
        .await
        .expect("TLS to b.test");
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.json::<Value>().await.unwrap()["id"], "b-1");
    // a's CA does not vouch for what b.test serves: the certificates differ.
    let wrong = client_for(&ca_a, "b.test", &gw, false);
    assert!(wrong.get(url("b.test", &gw, "/")).send().await.is_err());
    // An unknown name gets no certificate at all.
    let unknown = client_for(&ca_a, "c.test", &gw, false);
    assert!(unknown.get(url("c.test", &gw, "/")).send().await.is_err());

    if have("curl") {
        let ca_file = certs.path().join("ca-a.pem");
        std::fs::write(&ca_file, ca_a.pem()).unwrap();
        let out = Command::new("curl")
            .args([
                "-s",
                "--cacert",
                &ca_file.display().to_string(),
                "--resolve",
                &format!("a.test:{}:127.0.0.1", gw.tls.unwrap().port()),
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &url("a.test", &gw, "/curl"),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    }

    // Reload under load: new TLS connections to a.test keep succeeding while a.test gets a
    // re-issued certificate and b.test one from a new CA.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let successes = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..2)
        .map(|_| {
            let c = reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(
                    reqwest::Certificate::from_pem(ca_a.pem().as_bytes()).unwrap(),
                )
                .resolve("a.test", gw.tls.unwrap())
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (stop, failures, successes) = (stop.clone(), failures.clone(), successes.clone());
            let u = url("a.test", &gw, "/load");
            tokio::spawn(async move {
                let started = Instant::now();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed)
                    && n < 3000
                    && started.elapsed() < Duration::from_secs(30)
                {
                    n += 1;
                    match c.get(&u).send().await {
                        Ok(r) if r.status() == 200 => successes.fetch_add(1, Ordering::Relaxed),
                        _ => failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ca_a.write_leaf(certs.path(), "a.test");
    let ca_b2 = TestCa::new("second CA for b");
    ca_b2.write_leaf(certs.path(), "b.test");
    until(
        "b.test served with the new certificate",
        Duration::from_secs(10),
        || async {
            // A fresh client each time: a new connection, a new handshake.
            let c = client_for(&ca_b2, "b.test", &gw, false);
            c.get(url("b.test", &gw, "/"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        },
        |s| *s == Some(200),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    assert!(successes.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the reload"
    );
    let old = client_for(&ca_b, "b.test", &gw, false);
    assert!(old.get(url("b.test", &gw, "/")).send().await.is_err());
    // a.test is untouched by b's reload.
    let ca = client_for(&ca_a, "a.test", &gw, false);
    assert_eq!(
        ca.get(url("a.test", &gw, "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // A broken file does not take the name offline: the old certificate stays.
    std::fs::write(certs.path().join("a.test.crt"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ca = client_for(&ca_a, "a.test", &gw, false);
    assert_eq!(
        ca.get(url("a.test", &gw, "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(gw.log().contains("keeping the old one"), "{}", gw.log());
}
