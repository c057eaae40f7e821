//! The registration API through real HTTP: errors that say what is wrong, the body limit, the
//! write token, blocking queries, the change stream (long poll and server-sent events), and
//! the admin endpoints.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_e2e::{consul_index, Api, Options, Resolver};

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let cases = [
        (
            "/v1/agent/service/register",
            "{\"Name\": ",
            400,
            "not valid JSON",
        ),
        (
            "/v1/agent/service/register",
            "{\"Port\": 80}",
            400,
            "Name is required",
        ),
        (
            "/v1/agent/service/register",
            "{\"Name\":\"a\",\"Port\":\"80\"}",
            400,
            "Port",
        ),
        (
            "/v1/agent/service/register",
            "{\"Name\":\"a\",\"Check\":{\"HTTP\":\"http://x/\"}}",
            400,
            "Interval",
        ),
        (
            "/v1/agent/check/pass/service:nope",
            "",
            404,
            "unknown check ID",
        ),
        (
            "/v1/agent/service/deregister/nope",
            "",
            404,
            "unknown service ID",
        ),
        (
            "/v1/agent/service/maintenance/nope?enable=maybe",
            "",
            400,
            "not a boolean",
        ),
        ("/v1/no/such/thing", "", 404, "no such endpoint"),
    ];
    for (path, body, status, message) in cases {
        let resp = api
            .client
            .put(api.url(path))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path} {body}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = resp.json().await.unwrap();
        let err = v["error"].as_str().unwrap();
        assert!(
            err.contains(message),
            "{path}: {err:?} should say {message:?}"
        );
    }
    // A TTL update on a check that is not a TTL check is refused too.
    api.register(json!({"Name": "h", "Check": {"TCP": "127.0.0.1:9", "Interval": "10s"}}))
        .await;
    let resp = api.put_empty("/v1/agent/check/pass/service:h").await;
    assert_eq!(resp.status(), 400);
    // Nothing bad was registered, and the server is still fine.
    let v: Value = api.get("/v1/agent/services").await.json().await.unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1);
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused() {
    let r = Resolver::with(Options {
        config: Some("[api]\nmax_body_bytes = 4096\n".into()),
        ..Default::default()
    });
    let api = Api::new(&r);
    let big = json!({"Name": "a", "Meta": {"pad": "x".repeat(10_000)}});
    let resp = api.put("/v1/agent/service/register", big).await;
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("4096"));
    api.register(json!({"Name": "a"})).await;
}

#[tokio::test]
async fn a_token_guards_every_write() {
    let r = Resolver::with(Options {
        config: Some("[api]\ntoken = \"s3cret\"\n".into()),
        ..Default::default()
    });
    let api = Api::new(&r);
    let body = json!({"Name": "a", "ID": "a1"});
    let resp = api.put("/v1/agent/service/register", body.clone()).await;
    assert_eq!(resp.status(), 403);
    let resp = api
        .client
        .put(api.url("/v1/agent/service/register"))
        .header("Authorization", "Bearer wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    for (name, value) in [
        ("Authorization", "Bearer s3cret"),
        ("X-Consul-Token", "s3cret"),
    ] {
        let resp = api
            .client
            .put(api.url("/v1/agent/service/register"))
            .header(name, value)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
    }
    // Reads need no token.
    assert_eq!(api.get("/v1/agent/services").await.status(), 200);
    assert_eq!(
        api.put_empty("/v1/agent/service/deregister/a1")
            .await
            .status(),
        403
    );
}

#[tokio::test]
async fn blocking_queries_wait_for_a_change() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let resp = api.get("/v1/catalog/services").await;
    assert_eq!(consul_index(&resp), 1, "X-Consul-Index starts at 1");
    api.register(json!({"Name": "web", "ID": "web-1", "Port": 80}))
        .await;
    let resp = api.get("/v1/health/service/web").await;
    let i = consul_index(&resp);
    assert!(i >= 1);

    // No change: returns after the wait, with the same index.
    let started = Instant::now();
    let resp = api
        .get(&format!("/v1/health/service/web?index={i}&wait=500ms"))
        .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(consul_index(&resp), i);

    // A change to another service does not wake it; a change to this one does, at once.
    let blocked = tokio::spawn({
        let url = api.url(&format!("/v1/health/service/web?index={i}&wait=10s"));
        async move {
            let started = Instant::now();
            let resp = reqwest::get(url).await.unwrap();
            (
                consul_index(&resp),
                started.elapsed(),
                resp.json::<Value>().await.unwrap(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.register(json!({"Name": "other", "Port": 1})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !blocked.is_finished(),
        "another service's change must not wake the query"
    );
    api.register(json!({"Name": "web", "ID": "web-2", "Port": 81}))
        .await;
    let (after, waited, body) = blocked.await.unwrap();
    assert!(after > i);
    assert!(waited < Duration::from_secs(5));
    assert_eq!(body.as_array().unwrap().len(), 2);
    let catalog: Value = api
        .get("/v1/catalog/service/web?tag=")
        .await
        .json()
        .await
        .unwrap();
    let mut ports: Vec<u64> = catalog
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ServicePort"].as_u64().unwrap())
        .collect();
    ports.sort();
    assert_eq!(ports, [80, 81]);

    // The catalog's index never goes backwards.
    let mut last = 0;
    for n in 0..5 {
        api.register(json!({"Name": "web", "ID": format!("w{n}"), "Port": 80}))
            .await;
        let now = consul_index(&api.get("/v1/catalog/services").await);
        assert!(now > last);
        last = now;
    }
}

#[tokio::test]
async fn the_change_stream_resumes_without_loss() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"Name": "a", "ID": "a1", "Port": 1}))
        .await;
    api.register(json!({"Name": "b", "ID": "b1", "Port": 1}))
        .await;

    // From 0: the whole state.
    let all: Value = api
        .get("/v1/waymark/changes?index=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["services"].as_array().unwrap().len(), 2);
    let seen = all["index"].as_u64().unwrap();

    // Changes made while the follower is away come back on the next poll.
    api.register(json!({"Name": "a", "ID": "a2", "Port": 2}))
        .await;
    api.put_empty("/v1/agent/service/deregister/b1").await;
    let next: Value = api
        .get(&format!("/v1/waymark/changes?index={seen}&wait=5s"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["reset"], false);
    assert_eq!(next["services"].as_array().unwrap().len(), 1);
    assert_eq!(
        next["services"][0]["instances"].as_array().unwrap().len(),
        2
    );
    assert_eq!(next["removed"], json!(["b"]));

    // An index from another history gets a reset with the whole state.
    let reset: Value = api
        .get("/v1/waymark/changes?index=999999")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(reset["reset"], true);

    // Server-sent events: the first event is the state since the given index; a reconnect
    // with Last-Event-ID picks up a change made while disconnected.
    let last_id = {
        let resp = reqwest::get(api.url("/v1/waymark/events?index=0"))
            .await
            .unwrap();
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let (id, data) = first_event(resp).await;
        assert_eq!(data["services"].as_array().unwrap().len(), 1);
        id
    };
    api.register(json!({"Name": "c", "ID": "c1", "Port": 3}))
        .await;
    let resp = api
        .client
        .get(api.url("/v1/waymark/events"))
        .header("Last-Event-ID", last_id.to_string())
        .send()
        .await
        .unwrap();
    let (id, data) = first_event(resp).await;
    assert!(id > last_id);
    assert_eq!(data["services"][0]["name"], "c");
}

/// Reads the first `changes` event of an SSE response: (id, data).
async fn first_event(resp: reqwest::Response) -> (u64, Value) {
    let mut resp = resp;
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("an event within 5s")
            .unwrap()
            .expect("stream open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let event = text.split("\n\n").next().unwrap();
    let mut id = 0;
    let mut data = String::new();
    for line in event.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().parse().unwrap();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim());
        }
    }
    (id, serde_json::from_str(&data).unwrap())
}

#[tokio::test]
async fn admin_endpoints() {
    let r = Resolver::start();
    let api = Api::new(&r);
    assert_eq!(api.get("/healthz/live").await.status(), 200);
    assert_eq!(
        api.get("/healthz/ready").await.text().await.unwrap(),
        "ready\n"
    );
    api.register(json!({"Name": "m", "Port": 1})).await;
    let _ =
        waymark_e2e::dns::udp(r.dns, "m.mesh.internal.", hickory_proto::rr::RecordType::A).await;
    let metrics = api.get("/metrics").await.text().await.unwrap();
    for family in [
        "waymark_dns_queries_total{proto=\"udp\",outcome=\"answer\"} 1",
        "waymark_registry_instances 1",
        "waymark_api_requests_total",
        "waymark_registry_change_index",
    ] {
        assert!(metrics.contains(family), "missing {family}:\n{metrics}");
    }
}

/// Several `tag` parameters must all match, on the health and catalog endpoints (Consul's
/// rule; Prometheus's Consul discovery sends one per configured tag).
#[tokio::test]
async fn every_tag_parameter_must_match() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for (id, tags) in [
        ("x-ab", vec!["a", "b"]),
        ("x-a", vec!["a"]),
        ("x-b", vec!["b"]),
    ] {
        api.register(
            json!({"ID": id, "Name": "x", "Address": "10.0.0.1", "Port": 80, "Tags": tags}),
        )
        .await;
    }
    for path in ["/v1/health/service/x", "/v1/catalog/service/x"] {
        for (query, want) in [
            ("?tag=a&tag=b", vec!["x-ab"]),
            ("?tag=a", vec!["x-a", "x-ab"]),
            ("?tag=b&tag=a", vec!["x-ab"]),
            ("?tag=a&tag=c", vec![]),
            ("", vec!["x-a", "x-ab", "x-b"]),
        ] {
            let v: Value = api
                .get(&format!("{path}{query}"))
                .await
                .json()
                .await
                .unwrap();
            let mut ids: Vec<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    e["Service"]["ID"]
                        .as_str()
                        .or(e["ServiceID"].as_str())
                        .unwrap()
                })
                .collect();
            ids.sort();
            assert_eq!(ids, want, "{path}{query}");
        }
    }
}

/// `GET /v1/agent/self`, which Consul clients read first (Prometheus takes the datacenter
/// from it).
#[tokio::test]
async fn agent_self_names_the_datacenter_and_the_node() {
    let r = Resolver::start();
    let v: Value = Api::new(&r)
        .get("/v1/agent/self")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["Config"]["Datacenter"], "dc1", "{v}");
    assert_eq!(v["Config"]["NodeName"], "waymark", "{v}");
    assert!(
        v["Config"]["Version"]
            .as_str()
            .is_some_and(|s| s.starts_with("1.")),
        "{v}"
    );
    assert_eq!(v["Member"]["Name"], "waymark", "{v}");
    assert_eq!(v["Member"]["Status"], 1, "{v}");
}

/// The agent's load-balancer health endpoints (200 passing, 429 warning, 503 critical or in
/// maintenance; `?format=text` for the word alone), one registration by ID, the datacenters,
/// and the leader headers Consul sends on reads.
#[tokio::test]
async fn agent_health_endpoints_answer_as_consul_does() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for id in ["web-1", "web-2"] {
        api.register(json!({
            "ID": id, "Name": "web", "Address": "10.0.0.1", "Port": 80,
            "Check": {"CheckID": format!("{id}-ttl"), "TTL": "60s", "Status": "passing"}
        }))
        .await;
    }
    let status = |path: &str| {
        let url = api.url(path);
        let client = api.client.clone();
        async move {
            let resp = client.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (code, body) = status("/v1/agent/health/service/name/web").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v[0]["AggregatedStatus"], "passing");
    assert_eq!(v[0]["Service"]["Service"], "web");

    api.put_empty("/v1/agent/check/warn/web-2-ttl").await;
    assert_eq!(
        status("/v1/agent/health/service/name/web?format=text").await,
        (429, "warning".into())
    );
    api.put_empty("/v1/agent/check/fail/web-2-ttl").await;
    assert_eq!(
        status("/v1/agent/health/service/name/web?format=text").await,
        (503, "critical".into())
    );
    assert_eq!(
        status("/v1/agent/health/service/id/web-1?format=text").await,
        (200, "passing".into())
    );
    let (code, body) = status("/v1/agent/health/service/id/web-2").await;
    assert_eq!(code, 503);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["AggregatedStatus"], "critical", "{v}");
    assert_eq!(v["Checks"][0]["Status"], "critical", "{v}");
    api.put_empty("/v1/agent/service/maintenance/web-1?enable=true")
        .await;
    assert_eq!(
        status("/v1/agent/health/service/id/web-1?format=text").await,
        (503, "maintenance".into())
    );
    assert_eq!(status("/v1/agent/health/service/id/nope").await.0, 404);
    assert_eq!(status("/v1/agent/health/service/name/nope").await.0, 404);

    let (code, body) = status("/v1/agent/service/web-1").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["ID"].as_str(), v["Service"].as_str()),
        (Some("web-1"), Some("web"))
    );
    assert_eq!(status("/v1/agent/service/nope").await.0, 404);
    assert_eq!(
        status("/v1/catalog/datacenters").await,
        (200, "[\"dc1\"]".into())
    );

    let resp = api.get("/v1/health/service/web").await;
    assert_eq!(resp.headers()["x-consul-knownleader"], "true");
    assert_eq!(resp.headers()["x-consul-lastcontact"], "0");
}

/// `/v1/health/checks/<service>` and `/v1/health/state/<state>`: checks by service and by
/// state, as Consul lists them; an unknown state is a 400 that says what is expected.
#[tokio::test]
async fn checks_by_service_and_by_state() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for (id, name) in [("web-1", "web"), ("web-2", "web"), ("db-1", "db")] {
        api.register(json!({
            "ID": id, "Name": name, "Address": "10.0.0.1", "Port": 80,
            "Check": {"CheckID": format!("{id}-ttl"), "TTL": "60s", "Status": "passing"}
        }))
        .await;
    }
    api.put_empty("/v1/agent/check/fail/web-2-ttl").await;
    let ids = |v: Value| {
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["CheckID"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let api = &api;
    let get = |path: &'static str| async move {
        let resp = api.get(path).await;
        assert!(resp.headers().contains_key("x-consul-index"), "{path}");
        resp.json::<Value>().await.unwrap()
    };
    assert_eq!(
        ids(get("/v1/health/checks/web").await),
        ["web-1-ttl", "web-2-ttl"]
    );
    assert_eq!(
        ids(get("/v1/health/checks/nope").await),
        Vec::<String>::new()
    );
    assert_eq!(ids(get("/v1/health/state/critical").await), ["web-2-ttl"]);
    assert_eq!(
        ids(get("/v1/health/state/passing").await),
        ["db-1-ttl", "web-1-ttl"]
    );
    assert_eq!(ids(get("/v1/health/state/any").await).len(), 3);
    let bad = api.get("/v1/health/state/sideways").await;
    assert_eq!(bad.status(), 400);
    assert!(bad
        .text()
        .await
        .unwrap()
        .contains("expected passing, warning, critical or any"));
}
