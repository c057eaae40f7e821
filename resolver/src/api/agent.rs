//! The Consul-compatible handlers: agent registration and checks, catalog and health reads,
//! with blocking queries. Writes return once durable; reads come from the mirror.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::response::Response;
use serde_json::{json, Value};
use waymark_shared::{Health, Instance};

use super::consul::{self, Node};
use super::encoded::Kind;
use super::{encoded_with_index, json_body, read_body, with_index, ApiError, ApiState, Blocking};
use crate::store::Source;

type Params = Query<HashMap<String, String>>;

fn node(state: &ApiState) -> Node<'_> {
    Node {
        name: &state.config.api.node_name,
        address: &state.config.api.node_address,
        datacenter: &state.config.api.datacenter,
    }
}

fn empty_ok() -> Response {
    Response::new(Body::empty())
}

pub async fn register(
    State(state): State<Arc<ApiState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let def = consul::parse_service(&body)?;
    let most = state.config.health.max_checks_per_instance;
    if def.checks.len() > most {
        return Err(ApiError::BadRequest(format!(
            "{} checks: an instance may have {most} at most (health.max_checks_per_instance)",
            def.checks.len()
        )));
    }
    state.registry.register(def, Source::Api).await?;
    Ok(empty_ok())
}

pub async fn deregister(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.registry.deregister(&id).await?;
    Ok(empty_ok())
}

pub async fn maintenance(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let enable = q
        .get("enable")
        .ok_or_else(|| ApiError::BadRequest("missing value for enable".into()))?;
    let enable = consul::parse_bool(enable)
        .ok_or_else(|| ApiError::BadRequest(format!("enable {enable:?} is not a boolean")))?;
    state
        .registry
        .maintenance(&id, enable, q.get("reason").cloned())
        .await?;
    Ok(empty_ok())
}

pub async fn register_check(
    State(state): State<Arc<ApiState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let (check, service) = consul::parse_check(&body)?;
    let service = service.filter(|s| !s.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("ServiceID is required: Waymark has no node-level checks".into())
    })?;
    let most = state.config.health.max_checks_per_instance;
    let has = state
        .registry
        .definition(&service)
        .map_or(0, |(def, _)| def.checks.len());
    if has >= most {
        return Err(ApiError::BadRequest(format!(
            "{service:?} has {has} checks: an instance may have {most} at most (health.max_checks_per_instance)"
        )));
    }
    state.registry.add_check(&service, check).await?;
    Ok(empty_ok())
}

pub async fn deregister_check(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.registry.remove_check(&id).await?;
    Ok(empty_ok())
}

async fn ttl(
    state: &ApiState,
    id: &str,
    status: Health,
    note: Option<String>,
) -> Result<Response, ApiError> {
    state.registry.ttl_update(id, status, note).await?;
    Ok(empty_ok())
}

/// `PUT /v1/agent/check/pass|warn|fail/<id>?note=…`: a TTL heartbeat with that status.
pub async fn heartbeat(
    status: Health,
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    ttl(&state, &id, status, q.get("note").cloned()).await
}

/// `PUT /v1/agent/check/update/<id>` with `{"Status": ..., "Output": ...}`.
pub async fn check_update(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
    let field = |name: &str| {
        v.as_object()?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    };
    let status = field("status").and_then(Health::parse).ok_or_else(|| {
        ApiError::BadRequest("Status must be passing, warning or critical".into())
    })?;
    ttl(&state, &id, status, field("output").map(str::to_string)).await
}

pub async fn services(State(state): State<Arc<ApiState>>) -> Response {
    let index = state.local.index();
    let st = state.clone();
    let json = state
        .encoded
        .get(Kind::AgentServices, index, move || {
            let dc = &st.config.api.datacenter;
            let mut out = serde_json::Map::new();
            for view in st.local.services() {
                for i in &view.instances {
                    out.insert(i.id.to_string(), consul::agent_service(i, dc));
                }
            }
            serde_json::to_vec(&Value::Object(out)).unwrap_or_default()
        })
        .await;
    encoded_with_index(json, index)
}

pub async fn checks(State(state): State<Arc<ApiState>>) -> Response {
    let index = state.local.index();
    let st = state.clone();
    let json = state
        .encoded
        .get(Kind::AgentChecks, index, move || {
            let views = st.local.services();
            let instances = views.iter().flat_map(|v| v.instances.iter().map(|i| &**i));
            serde_json::to_vec(&consul::agent_checks(instances, &node(&st))).unwrap_or_default()
        })
        .await;
    encoded_with_index(json, index)
}

pub async fn catalog_services(
    State(state): State<Arc<ApiState>>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let blocking = Blocking::parse(&q, state.config.api.max_wait)?;
    let index = blocking
        .wait(&state.mirror, &state.drain, || state.mirror.index())
        .await;
    let st = state.clone();
    let json = state
        .encoded
        .get(Kind::CatalogServices, index, move || {
            let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for view in st.mirror.services() {
                let tags = out.entry(view.name.to_string()).or_default();
                for i in &view.instances {
                    tags.extend(i.tags.iter().cloned());
                }
            }
            serde_json::to_vec(&out).unwrap_or_default()
        })
        .await;
    Ok(encoded_with_index(json, index))
}

/// The index a query about one service reports: the service's last change, or the global
/// index when the service does not exist.
/// `GET /v1/health/checks/<service>`: every check of the service's instances (blocking).
pub async fn health_checks(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let blocking = Blocking::parse(&q, state.config.api.max_wait)?;
    let index = blocking
        .wait(&state.mirror, &state.drain, || service_index(&state, &name))
        .await;
    let node = node(&state);
    let checks: Vec<Value> = state
        .mirror
        .service(&name)
        .map(|view| {
            view.instances
                .iter()
                .flat_map(|i| i.checks.iter().map(|c| consul::check(c, i, &node)))
                .collect()
        })
        .unwrap_or_default();
    Ok(with_index(&Value::Array(checks), index))
}

/// `GET /v1/health/state/<state>`: every check in that state (`passing`, `warning`,
/// `critical`, or `any`), of every service (blocking).
pub async fn health_state(
    State(state): State<Arc<ApiState>>,
    Path(wanted): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let filter = match wanted.as_str() {
        "any" => None,
        s => Some(Health::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "state {s:?}: expected passing, warning, critical or any"
            ))
        })?),
    };
    let blocking = Blocking::parse(&q, state.config.api.max_wait)?;
    let index = blocking
        .wait(&state.mirror, &state.drain, || state.mirror.index())
        .await;
    let node = node(&state);
    let mut checks = Vec::new();
    for view in state.mirror.services() {
        for i in &view.instances {
            for c in &i.checks {
                if filter.is_none_or(|f| c.status == f) {
                    checks.push(consul::check(c, i, &node));
                }
            }
        }
    }
    Ok(with_index(&Value::Array(checks), index))
}

fn service_index(state: &ApiState, name: &str) -> u64 {
    state
        .mirror
        .service(name)
        .map(|v| v.index)
        .unwrap_or_else(|| state.mirror.index())
}

fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None => Ok(false),
        Some("") => Ok(true),
        Some(s) => consul::parse_bool(s)
            .ok_or_else(|| ApiError::BadRequest(format!("{name} {s:?} is not a boolean"))),
    }
}

/// Every value of a query parameter that may be repeated (`?tag=a&tag=b`), in order:
/// `Query` into a map keeps only the last.
pub fn all_values(raw: Option<&str>, key: &str) -> Vec<String> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .filter(|(k, v)| k == key && !v.is_empty())
        .map(|(_, v)| v.into_owned())
        .collect()
}

pub async fn health_service(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Params,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let passing = flag(&q, "passing")?;
    service_entries(
        &state,
        &name,
        &q,
        &all_values(raw.as_deref(), "tag"),
        |i| !passing || (!i.draining && i.health() == Health::Passing),
        consul::health_entry,
    )
    .await
}

pub async fn catalog_service(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Params,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let tags = all_values(raw.as_deref(), "tag");
    service_entries(&state, &name, &q, &tags, |_| true, consul::catalog_entry).await
}

/// A blocking query over one service's instances (those with every tag in `tags`, and
/// `keep`), each rendered by `render`.
async fn service_entries(
    state: &ApiState,
    name: &str,
    q: &HashMap<String, String>,
    tags: &[String],
    keep: impl Fn(&Instance) -> bool,
    render: impl Fn(&Instance, &Node) -> Value,
) -> Result<Response, ApiError> {
    let blocking = Blocking::parse(q, state.config.api.max_wait)?;
    let index = blocking
        .wait(&state.mirror, &state.drain, || service_index(state, name))
        .await;
    let node = node(state);
    let entries: Vec<Value> = state
        .mirror
        .service(name)
        .map(|view| {
            view.instances
                .iter()
                .filter(|i| tags.iter().all(|t| i.has_tag(t)) && keep(i))
                .map(|i| render(i, &node))
                .collect()
        })
        .unwrap_or_default();
    Ok(with_index(&Value::Array(entries), index))
}

/// `GET /v1/agent/self`: what Consul clients read first (Prometheus's Consul discovery takes
/// the datacenter from it, and retries forever without it): the agent's config and member.
pub async fn agent_self(State(state): State<Arc<ApiState>>) -> Response {
    let api = &state.config.api;
    let node = state
        .etcd
        .as_ref()
        .map_or_else(|| api.node_name.clone(), |l| l.node.clone());
    json_body(&json!({
        "Config": {
            "Datacenter": api.datacenter,
            "NodeName": node,
            "NodeID": "",
            "Server": true,
            "Revision": "",
            "Version": CONSUL_API_VERSION,
        },
        "Member": {
            "Name": node,
            "Addr": api.node_address,
            "Port": api.addr.port(),
            "Tags": {"dc": api.datacenter, "role": "consul", "build": CONSUL_API_VERSION},
            "Status": 1,
        },
        "Meta": {"waymark-version": env!("CARGO_PKG_VERSION")},
    }))
}

/// `GET /v1/catalog/datacenters`: this one.
pub async fn datacenters(State(state): State<Arc<ApiState>>) -> Response {
    json_body(&json!([state.config.api.datacenter]))
}

/// A registration of this host by ID, from the registry's own mirror.
fn local_instance(state: &ApiState, id: &str) -> Option<Arc<Instance>> {
    state
        .local
        .services()
        .iter()
        .flat_map(|v| v.instances.iter())
        .find(|i| i.id == id)
        .cloned()
}

/// `GET /v1/agent/service/<id>`: one registration of this host; 404 when there is none.
pub async fn agent_service(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let i = local_instance(&state, &id)
        .ok_or_else(|| ApiError::NotFound(format!("unknown service ID {id:?}")))?;
    Ok(with_index(
        &consul::agent_service(&i, &state.config.api.datacenter),
        state.local.index(),
    ))
}

/// The aggregated status of instances as Consul's agent health endpoints answer it:
/// maintenance (draining) first, then the worst check, and the HTTP status that goes with
/// it (200 passing, 429 warning, 503 critical).
pub fn aggregated(instances: &[&Instance]) -> (&'static str, u16) {
    if instances.iter().any(|i| i.draining) {
        return ("maintenance", 503);
    }
    match instances.iter().map(|i| i.health()).max() {
        Some(Health::Critical) => ("critical", 503),
        Some(Health::Warning) => ("warning", 429),
        _ => ("passing", 200),
    }
}

/// One entry of the agent health endpoints.
fn agent_health_entry(i: &Instance, state: &ApiState) -> Value {
    let node = node(state);
    let checks: Vec<Value> = i
        .checks
        .iter()
        .map(|c| consul::check(c, i, &node))
        .collect();
    json!({
        "AggregatedStatus": aggregated(&[i]).0,
        "Service": consul::agent_service(i, &state.config.api.datacenter),
        "Checks": checks,
    })
}

/// The answer of an agent health endpoint: JSON, or with `?format=text` the status word.
fn agent_health_answer(body: Value, status: (&'static str, u16), text: bool) -> Response {
    let mut resp = if text {
        Response::new(Body::from(status.0))
    } else {
        json_body(&body)
    };
    *resp.status_mut() = axum::http::StatusCode::from_u16(status.1).expect("a valid status");
    resp
}

/// `GET /v1/agent/health/service/name/<name>`: this host's instances of a service and their
/// aggregated status, for load balancers; 404 when it has none.
pub async fn agent_health_by_name(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let view = state
        .local
        .service(&name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown service name {name:?}")))?;
    let instances: Vec<&Instance> = view.instances.iter().map(|i| &**i).collect();
    let body = Value::Array(
        instances
            .iter()
            .map(|i| agent_health_entry(i, &state))
            .collect(),
    );
    let text = q.get("format").is_some_and(|f| f == "text");
    Ok(agent_health_answer(body, aggregated(&instances), text))
}

/// `GET /v1/agent/health/service/id/<id>`: one instance of this host and its status.
pub async fn agent_health_by_id(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let i = local_instance(&state, &id)
        .ok_or_else(|| ApiError::NotFound(format!("unknown service ID {id:?}")))?;
    let text = q.get("format").is_some_and(|f| f == "text");
    Ok(agent_health_answer(
        agent_health_entry(&i, &state),
        aggregated(&[&i]),
        text,
    ))
}

/// The Consul version whose API this one answers as, for clients that check it.
const CONSUL_API_VERSION: &str = "1.15.0";

/// Some clients check for a leader before anything else; the embedded registry is its own.
pub async fn leader(State(state): State<Arc<ApiState>>) -> Response {
    json_body(&json!(state.config.api.addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{aggregated, all_values};
    use waymark_shared::{CheckView, Health, Instance};

    #[test]
    fn aggregated_status_is_the_worst_with_maintenance_first() {
        let with = |status: Option<Health>, draining: bool| {
            let mut i = Instance::new("s", "s-1", "10.0.0.1", 80);
            if let Some(status) = status {
                i.checks.push(CheckView {
                    id: "c".into(),
                    name: "c".into(),
                    kind: "ttl".into(),
                    status,
                    output: String::new(),
                    notes: String::new(),
                });
            }
            i.draining = draining;
            i
        };
        let (pass, warn, crit, none, drain) = (
            with(Some(Health::Passing), false),
            with(Some(Health::Warning), false),
            with(Some(Health::Critical), false),
            with(None, false),
            with(Some(Health::Passing), true),
        );
        let cases: [(Vec<&Instance>, (&str, u16)); 6] = [
            (vec![&pass], ("passing", 200)),
            (vec![&none], ("passing", 200)),
            (vec![&pass, &warn], ("warning", 429)),
            (vec![&warn, &crit], ("critical", 503)),
            (vec![&pass, &drain], ("maintenance", 503)),
            (vec![], ("passing", 200)),
        ];
        for (instances, want) in cases {
            assert_eq!(aggregated(&instances), want);
        }
    }

    #[test]
    fn repeated_parameters_are_all_kept() {
        let cases: [(Option<&str>, Vec<&str>); 6] = [
            (None, vec![]),
            (Some(""), vec![]),
            (Some("tag=a"), vec!["a"]),
            (Some("tag=a&passing&tag=b"), vec!["a", "b"]),
            (Some("tag=&tag=v%2F1&tags=x"), vec!["v/1"]),
            (Some("index=3&wait=1s"), vec![]),
        ];
        for (raw, want) in cases {
            assert_eq!(all_values(raw, "tag"), want, "{raw:?}");
        }
    }
}
