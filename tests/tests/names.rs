//! Registrations and DNS names through the real API and DNS: names DNS could never answer are
//! refused with a clear 400, instance labels never collide, an address that is a host name is
//! answered with a CNAME, and the `register` CLI says the API's message. Also the API's token:
//! percent-encoded in the query, beside a foreign `Authorization` header, and for reads.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use serde_json::{json, Value};
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{ip, resolver_bin, Api, Options, Resolver};

async fn refused(api: &Api, body: Value) -> String {
    let resp = api.put("/v1/agent/service/register", body.clone()).await;
    assert_eq!(resp.status(), 400, "{body}");
    let v: Value = resp.json().await.expect("JSON error body");
    v["error"].as_str().expect("an error message").to_string()
}

#[tokio::test]
async fn names_dns_cannot_answer_are_refused() {
    // A long zone, so that the longest name of a registration can pass 255 bytes.
    let zone = format!("{}.{}.internal", "z".repeat(60), "y".repeat(60));
    let r = Resolver::with(Options {
        extra_args: vec!["--zone".into(), zone.clone()],
        ..Default::default()
    });
    let api = Api::new(&r);
    for (name, why) in [
        ("x".repeat(64), "cannot be a DNS label"),
        ("my_service".into(), "cannot be a DNS label"),
        ("a.b".into(), "cannot be a DNS label"),
        ("sp ace".into(), "cannot be a DNS label"),
        ("ns".into(), "reserved"),
    ] {
        let msg = refused(
            &api,
            json!({"Name": name, "ID": "i-1", "Address": "10.0.0.1", "Port": 80}),
        )
        .await;
        assert!(msg.contains(why), "{name}: {msg}");
    }
    let msg = refused(
        &api,
        json!({"Name": "s".repeat(63), "ID": "i".repeat(63), "Address": "10.0.0.1"}),
    )
    .await;
    assert!(msg.contains("over DNS's 255"), "{msg}");
    // Shorter, it fits, and DNS answers its longest name.
    api.register(json!({"Name": "s".repeat(40), "ID": "i".repeat(40), "Address": "10.0.0.1"}))
        .await;
    let name = format!("{}.instance.{}.{zone}.", "i".repeat(40), "s".repeat(40));
    let m = dns::udp(r.dns, &name, RecordType::A).await;
    assert_eq!(addresses(&m), [ip("10.0.0.1")]);
    // Nothing refused was registered.
    let services: Value = api.get("/v1/agent/services").await.json().await.unwrap();
    assert_eq!(services.as_object().unwrap().len(), 1, "{services}");
}

#[tokio::test]
async fn instance_labels_never_collide() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"Name": "coll", "ID": "coll_1", "Address": "10.0.0.1"}))
        .await;
    let msg = refused(
        &api,
        json!({"Name": "coll", "ID": "COLL.1", "Address": "10.0.0.2"}),
    )
    .await;
    assert!(
        msg.contains("\"coll_1\"") && msg.contains("coll-1"),
        "{msg}"
    );
    // The instance itself may register again, and another service may use the label.
    api.register(json!({"Name": "coll", "ID": "coll_1", "Address": "10.0.0.3"}))
        .await;
    api.register(json!({"Name": "other", "ID": "COLL.1", "Address": "10.0.0.4"}))
        .await;
    let m = dns::udp(r.dns, "coll-1.instance.coll.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m), [ip("10.0.0.3")]);
    let m = dns::udp(r.dns, "coll-1.instance.other.mesh.internal.", RecordType::A).await;
    assert_eq!(addresses(&m), [ip("10.0.0.4")]);
    // IDs that differ only after the 63rd byte would share a label too.
    let long = "x".repeat(63);
    api.register(json!({"Name": "coll", "ID": format!("{long}-a"), "Address": "10.0.0.5"}))
        .await;
    let msg = refused(
        &api,
        json!({"Name": "coll", "ID": format!("{long}-b"), "Address": "10.0.0.6"}),
    )
    .await;
    assert!(msg.contains(&format!("{long}-a")), "{msg}");
}

#[tokio::test]
async fn host_name_addresses_are_answered_with_a_cname() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"Name": "ext", "ID": "db-1", "Address": "DB.example.com", "Port": 5432}))
        .await;
    let msg = refused(
        &api,
        json!({"Name": "ext", "ID": "db-2", "Address": "not an ip!", "Port": 5432}),
    )
    .await;
    assert!(
        msg.contains("neither an IP address nor a valid host name"),
        "{msg}"
    );

    let cnames = |m: &hickory_proto::op::Message| -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::CNAME(c) => Some(c.0.to_string()),
                _ => None,
            })
            .collect()
    };
    for name in ["ext.mesh.internal.", "db-1.instance.ext.mesh.internal."] {
        for m in [
            dns::udp(r.dns, name, RecordType::A).await,
            dns::tcp(r.dns, name, RecordType::AAAA).await,
        ] {
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert_eq!(cnames(&m), ["db.example.com."], "{name}");
        }
    }
    // A CNAME answers every type (but SRV, see below).
    let m = dns::udp(r.dns, "ext.mesh.internal.", RecordType::TXT).await;
    assert_eq!(cnames(&m), ["db.example.com."]);
    let m = dns::udp(r.dns, "_ext._tcp.mesh.internal.", RecordType::SRV).await;
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!("SRV expected: {m:?}")
    };
    assert_eq!(srv.target.to_string(), "db.example.com.");
    assert_eq!(srv.port, 5432);
    assert!(m.additionals.iter().all(|r| r.name != srv.target));
}

#[tokio::test]
async fn the_register_cli_says_what_the_api_refused() {
    let r = Resolver::start();
    let out = std::process::Command::new(resolver_bin())
        .args([
            "register",
            "--addr",
            &r.url(""),
            "--name",
            "web",
            "--address",
            "not an ip!",
            "--port",
            "80",
        ])
        .output()
        .expect("CLI runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Address \"not an ip!\" is neither an IP address nor a valid host name"),
        "{err}"
    );
    assert!(!err.contains("{\""), "no raw JSON: {err}");
    assert!(err.contains("400"), "{err}");
}

#[tokio::test]
async fn tokens_are_found_wherever_clients_put_them() {
    let token = "s3cr/t+k";
    for reads in [false, true] {
        let mut config = format!("[api]\ntoken = \"{token}\"\n");
        if reads {
            config.push_str("token_for_reads = true\n");
        }
        let r = Resolver::with(Options {
            config: Some(config),
            ..Default::default()
        });
        let client = reqwest::Client::new();
        let body = json!({"Name": "web", "Address": "10.0.0.1"});
        let register = |query: &str| {
            client
                .put(r.url(&format!("/v1/agent/service/register{query}")))
                .json(&body)
        };
        let status = |req: reqwest::RequestBuilder| async move {
            req.send().await.expect("API reachable").status().as_u16()
        };
        assert_eq!(status(register("")).await, 403);
        assert_eq!(status(register("?token=wrong")).await, 403);
        assert_eq!(
            status(register("?token=s3cr%2Ft%2Bk")).await,
            200,
            "percent-encoded"
        );
        assert_eq!(
            status(
                register("")
                    .header("Authorization", "Basic dXNlcjpwdw==")
                    .header("X-Consul-Token", token)
            )
            .await,
            200,
            "X-Consul-Token beside another Authorization header"
        );
        assert_eq!(
            status(register("").header("Authorization", format!("Bearer {token}"))).await,
            200
        );
        // Reads need the token only with token_for_reads; health and metrics never do.
        let read = |path: &str| client.get(r.url(path));
        let want = if reads { 403 } else { 200 };
        assert_eq!(status(read("/v1/agent/services")).await, want);
        assert_eq!(status(read("/v1/catalog/services")).await, want);
        assert_eq!(
            status(read("/v1/agent/services").header("X-Consul-Token", token)).await,
            200
        );
        assert_eq!(status(read("/healthz/live")).await, 200);
        assert_eq!(status(read("/metrics")).await, 200);
    }
}
