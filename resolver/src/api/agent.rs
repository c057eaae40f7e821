//! The Consul-compatible handlers: agent registration and checks, catalog and health reads,
//! with blocking queries. Writes return once durable; reads come from the mirror.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::response::Response;
use serde_json::{json, Value};
use waymark_shared::{Health, Instance};

use super::catalog::this_node;
use super::consul;
use super::encoded::Kind;
use super::query::ReadQuery;
use super::{encoded_with_index, json_body, read_body, with_index, ApiError, ApiState};
use crate::nodes;
use crate::store::Source;

type Params = Query<HashMap<String, String>>;

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

/// This host's own registrations (not the external services the catalog registered).
fn agent_instances(state: &ApiState) -> Vec<Arc<Instance>> {
    state
        .local
        .services()
        .iter()
        .flat_map(|v| v.instances.iter())
        .filter(|i| i.node.is_none())
        .cloned()
        .collect()
}

/// `GET /v1/agent/services`: this host's registrations by ID (`filter` applies).
pub async fn services(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = ReadQuery::parse(raw.as_deref(), &state.config)?;
    let dc = state.config.api.datacenter.clone();
    q.check_filter(&consul::agent_service(&consul::template_instance(), &dc))?;
    let index = hash_wait(&state, &q).await?;
    let render = move |instances: Vec<Arc<Instance>>, keep: &dyn Fn(&Value) -> bool| {
        let mut out = serde_json::Map::new();
        for i in instances {
            let entry = consul::agent_service(&i, &dc);
            if keep(&entry) {
                out.insert(i.id.to_string(), entry);
            }
        }
        Value::Object(out)
    };
    if q.filter.is_none() {
        let st = state.clone();
        let json = state
            .encoded
            .get(Kind::AgentServices, index, move || {
                serde_json::to_vec(&render(agent_instances(&st), &|_| true)).unwrap_or_default()
            })
            .await;
        return Ok(with_hash(encoded_with_index(json, index), index));
    }
    let out = render(agent_instances(&state), &|e| q.keep(e, &BTreeMap::new()));
    Ok(with_hash(with_index(&out, index), index))
}

/// The agent's blocking queries, as Consul's: `?hash=<X-Consul-ContentHash>&wait=` waits
/// until this host's registrations change (or the wait ends); returns the index to answer
/// from. The hash is this host's registry index, in hex.
async fn hash_wait(state: &ApiState, q: &ReadQuery) -> Result<u64, ApiError> {
    let Some(hash) = q.params.get("hash").filter(|h| !h.is_empty()) else {
        return Ok(state.local.index());
    };
    let index = u64::from_str_radix(hash, 16).map_err(|_| {
        ApiError::BadRequest(format!(
            "hash {hash:?} is not a content hash this agent gave"
        ))
    })?;
    let blocking = super::Blocking {
        index,
        wait: q.blocking.wait,
    };
    Ok(blocking
        .wait(&state.local, &state.drain, || state.local.index())
        .await)
}

/// `X-Consul-ContentHash`, which the agent's blocking queries take back as `hash`.
fn with_hash(mut resp: Response, index: u64) -> Response {
    resp.headers_mut().insert(
        "X-Consul-ContentHash",
        axum::http::HeaderValue::from_str(&format!("{:016x}", index.max(1))).expect("hex"),
    );
    resp
}

/// `GET /v1/agent/checks`: this host's checks by ID (`filter` applies).
pub async fn checks(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = ReadQuery::parse(raw.as_deref(), &state.config)?;
    q.check_filter(&consul::template_check())?;
    let index = hash_wait(&state, &q).await?;
    if q.filter.is_none() {
        let st = state.clone();
        let json = state
            .encoded
            .get(Kind::AgentChecks, index, move || {
                let instances = agent_instances(&st);
                let checks = consul::agent_checks(instances.iter().map(|i| &**i), &this_node(&st));
                serde_json::to_vec(&checks).unwrap_or_default()
            })
            .await;
        return Ok(with_hash(encoded_with_index(json, index), index));
    }
    let node = this_node(&state);
    let mut out = serde_json::Map::new();
    for i in agent_instances(&state) {
        for c in &i.checks {
            let entry = consul::check(c, &i, &node);
            if q.keep(&entry, &BTreeMap::new()) {
                out.insert(c.id.clone(), entry);
            }
        }
    }
    Ok(with_hash(with_index(&Value::Object(out), index), index))
}

/// A member as `/v1/agent/members` and `/v1/agent/self` show it.
fn member(state: &ApiState, name: &str, address: &str) -> Value {
    let api = &state.config.api;
    json!({
        "Name": name,
        "Addr": address,
        "Port": api.addr.port(),
        "Tags": {"dc": api.datacenter, "role": "consul", "build": CONSUL_API_VERSION},
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    })
}

/// `GET /v1/agent/self`: what Consul clients read first (Prometheus's Consul discovery takes
/// the datacenter from it, and retries forever without it): the agent's config and member.
pub async fn agent_self(State(state): State<Arc<ApiState>>) -> Response {
    let api = &state.config.api;
    let node = this_node(&state);
    json_body(&json!({
        "Config": {
            "Datacenter": api.datacenter,
            "NodeName": node.name,
            "NodeID": "",
            "Server": true,
            "Revision": "",
            "Version": CONSUL_API_VERSION,
        },
        "Member": member(&state, node.name, node.address),
        "Meta": node.meta,
    }))
}

/// `GET /v1/agent/members`: the Waymark hosts (with etcd, every host that registered
/// instances; alone, this one), each as a live member.
pub async fn members(State(state): State<Arc<ApiState>>) -> Response {
    let node = this_node(&state);
    let this = nodes::This {
        name: node.name,
        address: node.address,
        meta: node.meta,
    };
    let instances: Vec<Arc<Instance>> = state
        .mirror
        .services()
        .iter()
        .flat_map(|v| v.instances.iter().cloned())
        .collect();
    let members: Vec<Value> = nodes::nodes(instances.iter().map(|i| &**i), &this)
        .iter()
        .filter(|n| n.host)
        .map(|n| member(&state, &n.name, &n.address))
        .collect();
    json_body(&Value::Array(members))
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
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = ReadQuery::parse(raw.as_deref(), &state.config)?;
    let index = hash_wait(&state, &q).await?;
    let i = local_instance(&state, &id)
        .ok_or_else(|| ApiError::NotFound(format!("unknown service ID {id:?}")))?;
    Ok(with_hash(
        with_index(
            &consul::agent_service(&i, &state.config.api.datacenter),
            index,
        ),
        index,
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
    let node = this_node(state);
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

/// `GET /v1/status/peers`: the registry's servers: this one.
pub async fn peers(State(state): State<Arc<ApiState>>) -> Response {
    json_body(&json!([state.config.api.addr.to_string()]))
}

#[cfg(test)]
mod tests {
    use super::aggregated;
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
}
