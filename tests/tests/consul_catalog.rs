//! The parts of Consul's API beyond registration, through real HTTP: nodes and members,
//! catalog registration of external services, `CreateIndex`/`ModifyIndex`, the parameters
//! every read shares (`filter`, `node-meta`, `dc`, `stale`/`consistent`/`cached`), fields that
//! are kept (`TaggedAddresses`, `EnableTagOverride`), Connect refused, and the endpoints
//! Waymark does not implement answered as such.

use serde_json::{json, Value};
use waymark_e2e::{consul_index, Api, Resolver};

async fn get_json(api: &Api, path: &str) -> Value {
    let resp = api.get(path).await;
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

async fn status_and_text(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = api.client.request(method.parse().unwrap(), api.url(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|e| {
            e.pointer(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{key} in {e}"))
                .to_string()
        })
        .collect();
    out.sort();
    out
}

/// An external service registered through the catalog (as `@creditkarma/consul-client` and
/// ESM do): listed with its node, its check's status set by re-registration, its check and
/// the service deregistered; the node listed among the nodes while it has services.
#[tokio::test]
async fn external_services_through_the_catalog() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"ID": "web-1", "Name": "web", "Port": 80}))
        .await;
    let register = |status: &str| {
        json!({
            "Node": "ext-db", "Address": "192.0.2.10", "NodeMeta": {"external-node": "true"},
            "Service": {"ID": "pg-1", "Service": "pg", "Port": 5432, "Tags": ["primary"]},
            "Check": {"CheckID": "pg-alive", "Name": "pg alive", "Status": status,
                      "ServiceID": "pg-1", "Output": "checked from outside"}
        })
    };
    let (code, body) = status_and_text(
        &api,
        "PUT",
        "/v1/catalog/register",
        Some(register("passing")),
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "true"));

    let pg = get_json(&api, "/v1/catalog/service/pg").await;
    assert_eq!(pg[0]["Node"], "ext-db", "{pg}");
    assert_eq!(pg[0]["Address"], "192.0.2.10", "{pg}");
    assert_eq!(
        pg[0]["ServiceAddress"], "192.0.2.10",
        "the node's address: {pg}"
    );
    assert_eq!(pg[0]["NodeMeta"]["external-node"], "true", "{pg}");
    let health = get_json(&api, "/v1/health/service/pg?passing").await;
    assert_eq!(health[0]["Checks"][0]["Output"], "checked from outside");
    let first_modify = health[0]["Service"]["ModifyIndex"].as_u64().unwrap();
    assert!(first_modify > 0, "{health}");

    // The monitor reports the service critical: a re-registration with the new status.
    let (code, _) = status_and_text(
        &api,
        "PUT",
        "/v1/catalog/register",
        Some(register("critical")),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        get_json(&api, "/v1/health/service/pg?passing").await,
        json!([])
    );
    let all = get_json(&api, "/v1/health/service/pg").await;
    assert_eq!(all[0]["Checks"][0]["Status"], "critical");
    assert!(all[0]["Service"]["ModifyIndex"].as_u64().unwrap() > first_modify);
    assert_eq!(
        all[0]["Service"]["CreateIndex"].as_u64().unwrap(),
        health[0]["Service"]["CreateIndex"].as_u64().unwrap(),
        "CreateIndex stays"
    );

    // The external service is not the agent's.
    let agent = get_json(&api, "/v1/agent/services").await;
    assert!(
        agent.get("pg-1").is_none() && agent.get("web-1").is_some(),
        "{agent}"
    );

    let nodes = get_json(&api, "/v1/catalog/nodes").await;
    assert_eq!(ids(&nodes, "/Node"), ["ext-db", "waymark"]);
    let only_external = get_json(&api, "/v1/catalog/nodes?node-meta=external-node:true").await;
    assert_eq!(ids(&only_external, "/Node"), ["ext-db"]);
    let node = get_json(&api, "/v1/catalog/node/ext-db").await;
    assert_eq!(node["Node"]["Address"], "192.0.2.10", "{node}");
    assert_eq!(node["Services"]["pg-1"]["Service"], "pg", "{node}");
    assert_eq!(get_json(&api, "/v1/catalog/node/nope").await, Value::Null);
    let listed = get_json(&api, "/v1/catalog/node-services/waymark").await;
    assert_eq!(ids(&listed["Services"], "/ID"), ["web-1"]);
    let checks = get_json(&api, "/v1/health/node/ext-db").await;
    assert_eq!(ids(&checks, "/CheckID"), ["pg-alive"]);
    let members = get_json(&api, "/v1/agent/members").await;
    assert_eq!(
        ids(&members, "/Name"),
        ["waymark"],
        "external nodes are not members"
    );

    // This host's node is the agent's: the catalog does not write it.
    let (code, body) = status_and_text(
        &api,
        "PUT",
        "/v1/catalog/register",
        Some(json!({"Node": "waymark", "Service": {"Service": "x"}})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("/v1/agent/service/register"), "{body}");

    let (code, _) = status_and_text(
        &api,
        "PUT",
        "/v1/catalog/deregister",
        Some(json!({"Node": "ext-db", "CheckID": "pg-alive"})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(get_json(&api, "/v1/health/checks/pg").await, json!([]));
    let (code, _) = status_and_text(
        &api,
        "PUT",
        "/v1/catalog/deregister",
        Some(json!({"Node": "ext-db"})),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(get_json(&api, "/v1/catalog/service/pg").await, json!([]));
    let nodes = get_json(&api, "/v1/catalog/nodes").await;
    assert_eq!(ids(&nodes, "/Node"), ["waymark"]);
}

/// `filter` on the endpoints Consul applies it to; an invalid expression or an unknown
/// selector is a 400 that says so; `node-meta` filters by the node.
#[tokio::test]
async fn filters_filter() {
    let r = Resolver::start();
    let api = Api::new(&r);
    for (id, tags, team, port) in [
        ("web-1", vec!["v1", "canary"], "a", 8080),
        ("web-2", vec!["v1"], "b", 8081),
        ("web-3", vec!["v2"], "a", 9090),
    ] {
        api.register(json!({
            "ID": id, "Name": "web", "Address": "10.0.0.1", "Port": port, "Tags": tags,
            "Meta": {"team": team},
            "Check": {"CheckID": format!("{id}-ttl"), "TTL": "60s", "Status": "passing"}
        }))
        .await;
    }
    api.put_empty("/v1/agent/check/fail/web-2-ttl").await;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "/v1/health/service/web",
            "/Service/ID",
            "\"canary\" in Service.Tags",
            &["web-1"],
        ),
        (
            "/v1/health/service/web",
            "/Service/ID",
            "Service.Meta.team == a",
            &["web-1", "web-3"],
        ),
        (
            "/v1/health/service/web",
            "/Service/ID",
            "Checks.Status == critical",
            &["web-2"],
        ),
        (
            "/v1/health/service/web",
            "/Service/ID",
            "Service.Port > 9000 or Service.ID == \"web-2\"",
            &[],
        ),
        (
            "/v1/catalog/service/web",
            "/ServiceID",
            "ServiceMeta.team != a and ServiceTags contains v1",
            &["web-2"],
        ),
        (
            "/v1/catalog/service/web",
            "/ServiceID",
            "not (ServiceID matches \"^web-[12]$\")",
            &["web-3"],
        ),
        (
            "/v1/health/checks/web",
            "/CheckID",
            "Status == passing",
            &["web-1-ttl", "web-3-ttl"],
        ),
        (
            "/v1/health/state/any",
            "/CheckID",
            "ServiceID == \"web-3\"",
            &["web-3-ttl"],
        ),
        (
            "/v1/catalog/nodes",
            "/Node",
            "Node == waymark",
            &["waymark"],
        ),
        ("/v1/catalog/nodes", "/Node", "Node != waymark", &[]),
    ];
    for (path, key, filter, want) in cases {
        let url = format!("{path}?filter={}", enc(filter));
        let resp = api.get(&url).await;
        let status = resp.status();
        let text = resp.text().await.unwrap();
        if filter.contains('>') {
            // `>` is not in Consul's language: refused, saying where.
            assert_eq!(status, 400, "{url}: {text}");
            assert!(text.contains("filter"), "{text}");
            continue;
        }
        assert_eq!(status, 200, "{url}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(ids(&v, key), *want, "{path} {filter}");
    }
    let agent = get_json(
        &api,
        &format!("/v1/agent/services?filter={}", enc("Meta.team == b")),
    )
    .await;
    assert_eq!(
        agent.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["web-2"]
    );
    let services = get_json(
        &api,
        &format!(
            "/v1/catalog/services?filter={}",
            enc("ServiceTags contains v2")
        ),
    )
    .await;
    assert_eq!(services, json!({"web": ["v2"]}));

    for (filter, want) in [
        ("Service.Nope == 1", "Service.Nope"),
        ("Service.Tags contains", "column"),
        ("(Service.ID == x", "column"),
    ] {
        let (code, body) = status_and_text(
            &api,
            "GET",
            &format!("/v1/health/service/web?filter={}", enc(filter)),
            None,
        )
        .await;
        assert_eq!(code, 400, "{filter}: {body}");
        assert!(body.contains(want), "{filter}: {body} should say {want}");
    }
    assert_eq!(
        get_json(&api, "/v1/health/service/web?node-meta=rack:r9").await,
        json!([])
    );
}

/// `dc`, `stale`, `consistent`, `cached` answered as Consul does; registration fields kept;
/// Connect refused; endpoints Waymark does not implement named as such.
#[tokio::test]
async fn consistency_datacenters_fields_and_unsupported_endpoints() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({
        "ID": "web-1", "Name": "web", "Address": "10.0.0.1", "Port": 80,
        "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 80},
                            "wan": {"Address": "198.51.100.1", "Port": 8080}},
        "EnableTagOverride": true
    }))
    .await;
    let resp = api.get("/v1/health/service/web?stale").await;
    assert_eq!(resp.headers()["x-consul-effective-consistency"], "stale");
    assert!(consul_index(&resp) > 0);
    let resp = api.get("/v1/catalog/service/web?consistent&dc=dc1").await;
    assert_eq!(
        resp.headers()["x-consul-effective-consistency"],
        "consistent"
    );
    let resp = api.get("/v1/health/service/web?cached").await;
    assert_eq!(resp.headers()["x-cache"], "MISS");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v[0]["Service"]["TaggedAddresses"]["wan"]["Address"],
        "198.51.100.1"
    );
    assert_eq!(v[0]["Service"]["EnableTagOverride"], true);
    let c = get_json(&api, "/v1/catalog/service/web").await;
    assert_eq!(c[0]["ServiceTaggedAddresses"]["wan"]["Port"], 8080, "{c}");

    let (code, body) =
        status_and_text(&api, "GET", "/v1/health/service/web?stale&consistent", None).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = status_and_text(&api, "GET", "/v1/catalog/services?dc=dc9", None).await;
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("No path to datacenter"), "{body}");

    for body in [
        json!({"Name": "web-proxy", "Kind": "connect-proxy", "Port": 21000,
               "Proxy": {"DestinationServiceName": "web"}}),
        json!({"Name": "web", "Port": 80, "Connect": {"SidecarService": {}}}),
        json!({"Name": "web", "Port": 80, "Connect": {"Native": true}}),
    ] {
        let (code, text) =
            status_and_text(&api, "PUT", "/v1/agent/service/register", Some(body)).await;
        assert_eq!(code, 400, "{text}");
        assert!(text.contains("per-host forwarder"), "{text}");
    }
    for path in [
        "/v1/kv/config/x",
        "/v1/session/create",
        "/v1/acl/tokens",
        "/v1/query",
    ] {
        let (code, text) = status_and_text(&api, "GET", path, None).await;
        assert_eq!(code, 501, "{path}: {text}");
        assert!(
            text.contains(path) && text.contains("not supported"),
            "{text}"
        );
    }
    let (code, _) = status_and_text(&api, "GET", "/v1/kvstore", None).await;
    assert_eq!(code, 404, "a prefix of a word is not the endpoint");
}

/// The targets Prometheus's Consul discovery builds from one health entry (as its
/// `discovery/consul` does): the address (the service's, else the node's) and port, and the
/// labels it reads.
fn prometheus_target(e: &Value) -> (String, String, String, String) {
    let service_address = e["Service"]["Address"].as_str().unwrap();
    let host = if service_address.is_empty() {
        e["Node"]["Address"].as_str().unwrap()
    } else {
        service_address
    };
    let checks = e["Checks"].as_array().unwrap();
    // Consul's api.HealthChecks.AggregatedStatus: maintenance first, then the worst.
    let health = if checks.iter().any(|c| {
        c["CheckID"]
            .as_str()
            .unwrap()
            .starts_with("_service_maintenance:")
    }) {
        "maintenance"
    } else if checks.iter().any(|c| c["Status"] == "critical") {
        "critical"
    } else if checks.iter().any(|c| c["Status"] == "warning") {
        "warning"
    } else {
        "passing"
    };
    let tags: Vec<&str> = e["Service"]["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    (
        format!("{host}:{}", e["Service"]["Port"]),
        format!(
            "node={} dc={}",
            e["Node"]["Node"].as_str().unwrap(),
            e["Node"]["Datacenter"].as_str().unwrap()
        ),
        format!(",{},", tags.join(",")),
        health.to_string(),
    )
}

/// Exactly the requests Prometheus's Consul discovery makes (agent self for the datacenter;
/// catalog services and health service with `index`, `wait` in milliseconds, `stale`, `dc`
/// and one `tag` per configured tag), and the targets it would build, after a
/// registration, a health change and a deregistration.
#[tokio::test]
async fn prometheus_consul_discovery_sees_every_change() {
    let r = Resolver::start();
    let api = Api::new(&r);
    let me = get_json(&api, "/v1/agent/self").await;
    let dc = me["Config"]["Datacenter"].as_str().unwrap().to_string();
    assert_eq!(dc, "dc1");

    let services = |index: u64| {
        let api = &api;
        let dc = dc.clone();
        async move {
            let resp = api
                .get(&format!(
                    "/v1/catalog/services?dc={dc}&index={index}&stale=&wait=10000ms"
                ))
                .await;
            assert_eq!(resp.status(), 200);
            let index = consul_index(&resp);
            (index, resp.json::<Value>().await.unwrap())
        }
    };
    let health = |index: u64| {
        let api = &api;
        let dc = dc.clone();
        async move {
            let resp = api
                .get(&format!(
                    "/v1/health/service/web?dc={dc}&index={index}&stale=&tag=prom&tag=v1&wait=10000ms"
                ))
                .await;
            assert_eq!(resp.status(), 200);
            let index = consul_index(&resp);
            let v: Value = resp.json().await.unwrap();
            let mut targets: Vec<_> = v
                .as_array()
                .unwrap()
                .iter()
                .map(prometheus_target)
                .collect();
            targets.sort();
            (index, targets)
        }
    };

    let (i1, before) = services(0).await;
    assert_eq!(before, json!({}));
    // A registration wakes the blocking catalog query.
    let register = async {
        for (id, addr, tags) in [
            ("web-1", "10.3.0.1", vec!["prom", "v1"]),
            ("web-2", "", vec!["v1", "prom", "extra"]),
            ("web-3", "10.3.0.3", vec!["v1"]),
        ] {
            api.register(json!({
                "ID": id, "Name": "web", "Address": addr, "Port": 9100, "Tags": tags,
                "Check": {"CheckID": format!("{id}-ttl"), "TTL": "60s", "Status": "passing"}
            }))
            .await;
        }
    };
    let ((i2, after), ()) = tokio::join!(services(i1), register);
    assert!(i2 > i1, "{i1} -> {i2}");
    assert!(after.get("web").is_some(), "{after}");

    let (h1, targets) = health(0).await;
    let node = "node=waymark dc=dc1".to_string();
    assert_eq!(
        targets,
        [
            (
                "10.3.0.1:9100".to_string(),
                node.clone(),
                ",prom,v1,".to_string(),
                "passing".to_string()
            ),
            (
                "127.0.0.1:9100".to_string(),
                node.clone(),
                ",v1,prom,extra,".to_string(),
                "passing".to_string()
            ),
        ],
        "web-3 lacks the tag prom; web-2 has no address of its own: the node's"
    );

    // A health change wakes the blocking health query and shows in the target's labels.
    let ((h2, targets), _) =
        tokio::join!(health(h1), api.put_empty("/v1/agent/check/fail/web-1-ttl"));
    assert!(h2 > h1);
    assert_eq!(targets[0].3, "critical", "{targets:?}");

    // A deregistration too.
    let ((h3, targets), _) = tokio::join!(
        health(h2),
        api.put_empty("/v1/agent/service/deregister/web-1")
    );
    assert!(h3 > h2);
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0].0, "127.0.0.1:9100");
}

/// The agent's blocking queries are hash-based, as Consul's: `X-Consul-ContentHash` comes
/// back as `?hash=`, and the query returns when this host's registrations change.
#[tokio::test]
async fn agent_blocking_queries_take_the_content_hash() {
    let r = Resolver::start();
    let api = Api::new(&r);
    api.register(json!({"ID": "web-1", "Name": "web", "Port": 80}))
        .await;
    for path in [
        "/v1/agent/services",
        "/v1/agent/checks",
        "/v1/agent/service/web-1",
    ] {
        let resp = api.get(path).await;
        let hash = resp.headers()["x-consul-contenthash"]
            .to_str()
            .unwrap()
            .to_string();
        let id = format!("{}-2", path.rsplit('/').next().unwrap());
        let (woken, _) = tokio::join!(
            async {
                let resp = api.get(&format!("{path}?hash={hash}&wait=20s")).await;
                assert_eq!(resp.status(), 200, "{path}");
                resp.headers()["x-consul-contenthash"]
                    .to_str()
                    .unwrap()
                    .to_string()
            },
            api.register(json!({"ID": id, "Name": "web", "Port": 81, "Check": {"TTL": "60s"}}))
        );
        assert_ne!(woken, hash, "{path}: a registration changes the hash");
    }
    let (code, body) =
        status_and_text(&api, "GET", "/v1/agent/services?hash=nothex&wait=1s", None).await;
    assert_eq!(code, 400, "{body}");
}
