//! Consul's catalog and health reads (blocking, filtered, from the serving mirror: with
//! etcd, every host's instances) and the catalog's registration of external services.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::{json, Map, Value};
use waymark_shared::{Health, Instance};

use super::consul::{self, Node};
use super::encoded::Kind;
use super::query::{flag, ReadQuery};
use super::{encoded_with_index, json_body, read_body, with_index, ApiError, ApiState};
use crate::nodes::{self, NodeInfo};
use crate::registry::def::ServiceDef;
use crate::store::Source;

/// This host as Consul's answers show it: with etcd, the link's node name.
pub fn this_node(state: &ApiState) -> Node<'_> {
    let api = &state.config.api;
    Node {
        name: state.etcd.as_ref().map_or(&api.node_name, |l| &l.node),
        address: &api.node_address,
        datacenter: &api.datacenter,
        meta: &api.node_meta,
    }
}

fn this<'a>(node: &'a Node) -> nodes::This<'a> {
    nodes::This {
        name: node.name,
        address: node.address,
        meta: node.meta,
    }
}

fn parse(state: &ApiState, raw: &Option<String>) -> Result<ReadQuery, ApiError> {
    ReadQuery::parse(raw.as_deref(), &state.config)
}

/// The index a query about one service reports: the service's last change, or the global
/// index when the service does not exist.
fn service_index(state: &ApiState, name: &str) -> u64 {
    state
        .mirror
        .service(name)
        .map(|v| v.index)
        .unwrap_or_else(|| state.mirror.index())
}

/// Every instance the serving mirror holds.
fn all_instances(state: &ApiState) -> Vec<Arc<Instance>> {
    state
        .mirror
        .services()
        .iter()
        .flat_map(|v| v.instances.iter().cloned())
        .collect()
}

/// `GET /v1/catalog/services`: every service and the union of its instances' tags.
pub async fn catalog_services(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    q.check_filter(&consul::catalog_entry(
        &consul::template_instance(),
        &consul::template_node(),
    ))?;
    let index = q
        .blocking
        .wait(&state.mirror, &state.drain, || state.mirror.index())
        .await;
    if q.unfiltered() {
        let st = state.clone();
        let json = state
            .encoded
            .get(Kind::CatalogServices, index, move || {
                serde_json::to_vec(&service_tags(&st, |_| true)).unwrap_or_default()
            })
            .await;
        return Ok(q.decorate(encoded_with_index(json, index)));
    }
    let node = this_node(&state);
    let out = service_tags(&state, |i| {
        q.tags.iter().all(|t| i.has_tag(t))
            && q.keep(
                &consul::catalog_entry(i, &node),
                consul::node_meta_of(i, &node),
            )
    });
    Ok(q.decorate(with_index(&json!(out), index)))
}

fn service_tags(
    state: &ApiState,
    keep: impl Fn(&Instance) -> bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for view in state.mirror.services() {
        for i in view.instances.iter().filter(|i| keep(i)) {
            out.entry(view.name.to_string())
                .or_default()
                .extend(i.tags.iter().cloned());
        }
    }
    out
}

/// `GET /v1/health/service/<name>` (`?passing` keeps the instances that pass and are not
/// in maintenance).
pub async fn health_service(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    let passing = flag(&q.params, "passing")?;
    service_entries(
        &state,
        &name,
        &q,
        |i| !passing || (!i.draining && i.health() == Health::Passing),
        consul::health_entry,
    )
    .await
}

/// `GET /v1/catalog/service/<name>`.
pub async fn catalog_service(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    service_entries(&state, &name, &q, |_| true, consul::catalog_entry).await
}

/// A blocking query over one service's instances (those with every tag asked for, on a
/// node with the metadata asked for, passing the filter, and `keep`), each rendered by
/// `render`.
async fn service_entries(
    state: &ApiState,
    name: &str,
    q: &ReadQuery,
    keep: impl Fn(&Instance) -> bool,
    render: impl Fn(&Instance, &Node) -> Value,
) -> Result<Response, ApiError> {
    q.check_filter(&render(
        &consul::template_instance(),
        &consul::template_node(),
    ))?;
    let index = q
        .blocking
        .wait(&state.mirror, &state.drain, || service_index(state, name))
        .await;
    let node = this_node(state);
    let entries: Vec<Value> = state
        .mirror
        .service(name)
        .map(|view| {
            view.instances
                .iter()
                .filter(|i| q.tags.iter().all(|t| i.has_tag(t)) && keep(i))
                .map(|i| (render(i, &node), i))
                .filter(|(e, i)| q.keep(e, consul::node_meta_of(i, &node)))
                .map(|(e, _)| e)
                .collect()
        })
        .unwrap_or_default();
    Ok(q.decorate(with_index(&Value::Array(entries), index)))
}

/// A blocking query over checks: those of `instances()` that `keep` says, on a node with
/// the metadata asked for, passing the filter.
async fn check_entries(
    state: &ApiState,
    q: &ReadQuery,
    index: impl Fn() -> u64,
    instances: impl Fn() -> Vec<Arc<Instance>>,
    keep: impl Fn(&waymark_shared::CheckView) -> bool,
) -> Result<Response, ApiError> {
    q.check_filter(&consul::template_check())?;
    let index = q.blocking.wait(&state.mirror, &state.drain, index).await;
    let node = this_node(state);
    let mut out = Vec::new();
    for i in instances() {
        for c in i.checks.iter().filter(|c| keep(c)) {
            let entry = consul::check(c, &i, &node);
            if q.keep(&entry, consul::node_meta_of(&i, &node)) {
                out.push(entry);
            }
        }
    }
    Ok(q.decorate(with_index(&Value::Array(out), index)))
}

/// `GET /v1/health/checks/<service>`: every check of the service's instances.
pub async fn health_checks(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    check_entries(
        &state,
        &q,
        || service_index(&state, &name),
        || {
            state
                .mirror
                .service(&name)
                .map(|v| v.instances.clone())
                .unwrap_or_default()
        },
        |_| true,
    )
    .await
}

/// `GET /v1/health/state/<state>`: every check in that state (`passing`, `warning`,
/// `critical`, or `any`), of every service.
pub async fn health_state(
    State(state): State<Arc<ApiState>>,
    Path(wanted): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let wanted = match wanted.as_str() {
        "any" => None,
        s => Some(Health::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "state {s:?}: expected passing, warning, critical or any"
            ))
        })?),
    };
    let q = parse(&state, &raw)?;
    check_entries(
        &state,
        &q,
        || state.mirror.index(),
        || all_instances(&state),
        |c| wanted.is_none_or(|w| c.status == w),
    )
    .await
}

/// `GET /v1/health/node/<node>`: the checks of the instances on a node.
pub async fn health_node(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    let node = this_node(&state);
    let this = this(&node);
    check_entries(
        &state,
        &q,
        || state.mirror.index(),
        || {
            all_instances(&state)
                .into_iter()
                .filter(|i| nodes::on_node(i, &this, &name))
                .collect()
        },
        |_| true,
    )
    .await
}

fn node_value(n: &NodeInfo, dc: &str) -> Value {
    consul::node_entry(
        &n.name,
        &n.address,
        &n.meta,
        dc,
        [n.create_index, n.modify_index],
    )
}

/// `GET /v1/catalog/nodes`: every node (`node-meta` and `filter` apply to the node).
pub async fn catalog_nodes(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    let dc = &state.config.api.datacenter;
    let template = consul::template_node();
    q.check_filter(&consul::node_entry(
        template.name,
        template.address,
        template.meta,
        dc,
        [0, 0],
    ))?;
    let index = q
        .blocking
        .wait(&state.mirror, &state.drain, || state.mirror.index())
        .await;
    let node = this_node(&state);
    let instances = all_instances(&state);
    let out: Vec<Value> = nodes::nodes(instances.iter().map(|i| &**i), &this(&node))
        .iter()
        .map(|n| (node_value(n, dc), n))
        .filter(|(v, n)| q.keep(v, &n.meta))
        .map(|(v, _)| v)
        .collect();
    Ok(q.decorate(with_index(&Value::Array(out), index)))
}

/// The node named in the path and its services (filtered as Consul filters them: by the
/// service), or `None` when there is no such node.
async fn node_services(
    state: &ApiState,
    name: &str,
    q: &ReadQuery,
) -> Result<(u64, Option<(Value, Vec<Value>)>), ApiError> {
    q.check_filter(&consul::agent_service(
        &consul::template_instance(),
        &state.config.api.datacenter,
    ))?;
    let index = q
        .blocking
        .wait(&state.mirror, &state.drain, || state.mirror.index())
        .await;
    let node = this_node(state);
    let this = this(&node);
    let instances = all_instances(state);
    let Some(found) = nodes::find(instances.iter().map(|i| &**i), &this, name) else {
        return Ok((index, None));
    };
    let dc = &state.config.api.datacenter;
    let services = instances
        .iter()
        .filter(|i| nodes::on_node(i, &this, name))
        .map(|i| consul::agent_service(i, dc))
        .filter(|s| q.keep(s, &found.meta))
        .collect();
    Ok((index, Some((node_value(&found, dc), services))))
}

/// `GET /v1/catalog/node/<node>`: the node and its services by ID; `null` for an unknown
/// node, as Consul answers.
pub async fn catalog_node(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    let (index, found) = node_services(&state, &name, &q).await?;
    let body = match found {
        None => Value::Null,
        Some((node, services)) => {
            let by_id: Map<String, Value> = services
                .into_iter()
                .map(|s| (s["ID"].as_str().unwrap_or_default().to_string(), s))
                .collect();
            json!({"Node": node, "Services": by_id})
        }
    };
    Ok(q.decorate(with_index(&body, index)))
}

/// `GET /v1/catalog/node-services/<node>`: the node and its services as a list.
pub async fn catalog_node_services(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = parse(&state, &raw)?;
    let (index, found) = node_services(&state, &name, &q).await?;
    let body = match found {
        None => Value::Null,
        Some((node, services)) => json!({"Node": node, "Services": services}),
    };
    Ok(q.decorate(with_index(&body, index)))
}

/// `GET /v1/catalog/datacenters`: this one.
pub async fn datacenters(State(state): State<Arc<ApiState>>) -> Response {
    json_body(&json!([state.config.api.datacenter]))
}

/// Refuses a catalog write for this host's node: its services are registered through the
/// agent (whose checks Waymark runs), as Consul's agent would undo such a write.
fn external_node_name(state: &ApiState, node: &str) -> Result<(), ApiError> {
    if node.eq_ignore_ascii_case(this_node(state).name) {
        return Err(ApiError::BadRequest(format!(
            "node {node:?} is this host: register its services with /v1/agent/service/register"
        )));
    }
    Ok(())
}

/// The external registration `id` on `node`, when there is one.
fn external_def(state: &ApiState, id: &str, node: &str) -> Option<ServiceDef> {
    state
        .registry
        .definition(id)
        .map(|(def, _)| def)
        .filter(|d| {
            d.external_node
                .as_ref()
                .is_some_and(|n| n.name.eq_ignore_ascii_case(node))
        })
}

/// `PUT /v1/catalog/register`: a service on an external node, with checks whose status the
/// registration sets (re-registering updates them, as an external monitor does); or, without
/// a service, checks of services already on that node. Answers `true`.
pub async fn catalog_register(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    parse(&state, &raw)?;
    let body = read_body(&state, body).await?;
    let reg = consul::parse_catalog_register(&body)?;
    external_node_name(&state, &reg.node.name)?;
    let most = state.config.health.max_checks_per_instance;
    // Each service touched, by ID, with the checks this registration sets on it.
    let mut defs: BTreeMap<String, ServiceDef> = BTreeMap::new();
    if let Some(mut def) = reg.service {
        if def.id.trim().is_empty() {
            def.id = def.name.clone();
        }
        // A registration without checks keeps the ones the service has, as in Consul.
        if let Some(old) = external_def(&state, &def.id, &reg.node.name) {
            def.checks = old.checks;
        }
        def.external_node = Some(reg.node.clone());
        defs.insert(def.id.to_string(), def);
    }
    for (check, service_id) in reg.checks {
        let target = if service_id.is_empty() {
            // A node check: Waymark has no node entries, so it goes with the service of this
            // registration.
            defs.keys().next().cloned().ok_or_else(|| {
                ApiError::BadRequest(
                    "a check without ServiceID needs a Service in the same registration: \
                     Waymark keeps nodes only through their services"
                        .into(),
                )
            })?
        } else {
            service_id
        };
        if !defs.contains_key(&target) {
            let def = external_def(&state, &target, &reg.node.name).ok_or_else(|| {
                ApiError::NotFound(format!(
                    "check {:?}: no service {target:?} on node {:?}",
                    check.id, reg.node.name
                ))
            })?;
            defs.insert(target.clone(), def);
        }
        let def = defs.get_mut(&target).expect("inserted");
        let mut check = check;
        if check.id.is_empty() {
            check.id = format!("service:{target}");
        }
        def.checks.retain(|c| c.id != check.id);
        def.checks.push(check);
    }
    if defs.is_empty() {
        return Err(ApiError::BadRequest(
            "nothing to register: Waymark keeps nodes only through their services; \
             send a Service (or checks of a service on this node)"
                .into(),
        ));
    }
    for def in defs.values() {
        if def.checks.len() > most {
            return Err(ApiError::BadRequest(format!(
                "{} checks: an instance may have {most} at most (health.max_checks_per_instance)",
                def.checks.len()
            )));
        }
    }
    for def in defs.into_values() {
        state.registry.register(def, Source::Api).await?;
    }
    Ok(json_body(&json!(true)))
}

/// `PUT /v1/catalog/deregister`: a service or a check of an external node, or the whole
/// node (every service on it). Answers `true`, also when there was nothing to remove.
pub async fn catalog_deregister(
    State(state): State<Arc<ApiState>>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    parse(&state, &raw)?;
    let body = read_body(&state, body).await?;
    let d = consul::parse_catalog_deregister(&body)?;
    external_node_name(&state, &d.node)?;
    match (d.service_id, d.check_id) {
        (Some(id), _) => {
            if external_def(&state, &id, &d.node).is_some() {
                state.registry.deregister(&id).await?;
            }
        }
        (None, Some(check)) => {
            let owner = state
                .local
                .services()
                .iter()
                .flat_map(|v| v.instances.iter())
                .find(|i| i.checks.iter().any(|c| c.id == check))
                .map(|i| i.id.to_string());
            if owner.is_some_and(|id| external_def(&state, &id, &d.node).is_some()) {
                state.registry.remove_check(&check).await?;
            }
        }
        (None, None) => {
            let ids: Vec<String> = state
                .local
                .services()
                .iter()
                .flat_map(|v| v.instances.iter())
                .filter(|i| {
                    i.node
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(&d.node))
                })
                .map(|i| i.id.to_string())
                .collect();
            for id in ids {
                if external_def(&state, &id, &d.node).is_some() {
                    state.registry.deregister(&id).await?;
                }
            }
        }
    }
    Ok(json_body(&json!(true)))
}
