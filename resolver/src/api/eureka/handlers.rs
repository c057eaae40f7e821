//! The Eureka endpoints. Writes go to the registry and return once durable, with the codes
//! Eureka clients check (204 for a registration, 200 for the rest, 404 for an instance the
//! registry does not have, which makes a client register again); reads answer from the
//! [`view`](super::view), brought up to the registry's index first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use waymark_shared::Health;

use super::codec::{self, Action, AppView, Format, InstanceView, Status};
use super::view::App;
use super::EurekaError;
use crate::api::{read_body, ApiError, ApiState};
use crate::registry::def::{CheckDef, EurekaDef, ServiceDef, Weights};
use crate::registry::RegistryError;
use crate::store::Source;

type Params = Query<HashMap<String, String>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The ID of an instance's lease check.
pub fn lease_check_id(id: &str) -> String {
    format!("eureka-lease:{id}")
}

/// A Eureka registration as a service definition: see the module's doc.
fn service_def(
    service: String,
    id: &str,
    address: &str,
    metadata: BTreeMap<String, String>,
    info: EurekaDef,
) -> ServiceDef {
    let lease = CheckDef {
        id: lease_check_id(id),
        name: "Eureka lease".into(),
        ttl: Some(Duration::from_secs(info.duration_secs.into())),
        deregister_critical_after: Some(Duration::ZERO),
        status: Some(Health::Passing),
        notes: format!(
            "renewed every {} s by the client; the instance is removed {} s after the last renewal",
            info.renewal_interval_secs, info.duration_secs
        ),
        ..CheckDef::default()
    };
    ServiceDef {
        name: service.into(),
        id: id.into(),
        address: address.into(),
        port: codec::port_of(&info),
        tags: Vec::new(),
        meta: metadata,
        weights: Weights::default(),
        checks: vec![lease],
        tagged_addresses: BTreeMap::new(),
        enable_tag_override: false,
        external_node: None,
        eureka: Some(Box::new(info)),
    }
}

/// Registers a Eureka definition with the maintenance its effective status calls for, in one
/// change.
async fn put(state: &ApiState, def: ServiceDef) -> Result<(), ApiError> {
    let info = def.eureka.as_deref().expect("a Eureka definition");
    let own = Status::parse(&info.status).unwrap_or(Status::Unknown);
    let overridden = info.overridden_status.as_deref().and_then(Status::parse);
    let maintenance = codec::maintenance_for(codec::effective(own, overridden));
    state
        .registry
        .register_with(def, Source::Api, Some(maintenance))
        .await?;
    Ok(())
}

/// The definition of a Eureka instance of `app`; 404 when there is none.
fn eureka_instance(state: &ApiState, app: &str, id: &str) -> Result<ServiceDef, ApiError> {
    let not_found = || EurekaError::NotFound(format!("no instance {id:?} of application {app:?}"));
    let service = codec::service_name(app).map_err(|_| not_found())?;
    match state.registry.definition(id) {
        Some((def, _)) if def.eureka.is_some() && def.name.eq_ignore_ascii_case(&service) => {
            Ok(def)
        }
        _ => Err(not_found().into()),
    }
}

fn answer(body: String, format: Format) -> Response {
    let kind = match format {
        Format::Xml => "application/xml",
        Format::Json => "application/json",
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(kind))],
        body,
    )
        .into_response()
}

fn format_of(headers: &HeaderMap) -> Format {
    codec::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()))
}

fn ok() -> Response {
    StatusCode::OK.into_response()
}

/// `POST /apps/{app}`: registers (or replaces) an instance; 204, as Eureka answers (and
/// `eureka-js-client` requires).
pub async fn register(
    State(state): State<Arc<ApiState>>,
    Path(app): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let reg = codec::parse_registration(&body, &app, now_ms())?;
    let service = codec::service_name(&reg.info.app)?;
    let mut info = reg.info;
    if let Some((old, _)) = state.registry.definition(&reg.instance_id) {
        let Some(old) = old.eureka else {
            return Err(EurekaError::NotEureka(reg.instance_id).into());
        };
        // An operator's override outlives re-registrations, as in Eureka.
        if old.overridden_status.is_some() {
            info.overridden_status = old.overridden_status;
        }
        info.registration_ms = old.registration_ms;
        if info.service_up_ms != 0 && old.service_up_ms != 0 {
            info.service_up_ms = old.service_up_ms;
        }
    }
    let def = service_def(service, &reg.instance_id, &reg.ip_addr, reg.metadata, info);
    put(&state, def).await?;
    tracing::debug!(app, id = reg.instance_id, "Eureka registration");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Whether the client's `lastDirtyTimestamp` is newer than the registry's: it has changes
/// the registry lacks, and registers again on the 404 this calls for (Eureka's rule).
fn client_is_newer(q: &HashMap<String, String>, info: &EurekaDef) -> bool {
    q.get("lastDirtyTimestamp")
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|t| t > info.last_dirty_ms)
}

/// `PUT /apps/{app}/{id}`: a heartbeat (renews the lease); 404 for an instance the registry
/// does not have.
pub async fn renew(
    State(state): State<Arc<ApiState>>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let def = eureka_instance(&state, &app, &id)?;
    if client_is_newer(&q, def.eureka.as_deref().expect("Eureka's")) {
        return Err(ApiError::NotFound(format!(
            "instance {id:?} changed on the client since it registered: register again"
        )));
    }
    match state
        .registry
        .ttl_update(&lease_check_id(&id), Health::Passing, None)
        .await
    {
        Ok(_) => Ok(ok()),
        // Its lease ended just now.
        Err(RegistryError::UnknownCheck(_)) => Err(ApiError::NotFound(format!(
            "no instance {id:?} of application {app:?}"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /apps/{app}/{id}`: deregisters an instance.
pub async fn cancel(
    State(state): State<Arc<ApiState>>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    eureka_instance(&state, &app, &id)?;
    match state.registry.deregister(&id).await {
        Ok(_) => Ok(ok()),
        Err(RegistryError::UnknownService(_)) => Err(ApiError::NotFound(format!(
            "no instance {id:?} of application {app:?}"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Takes a newer `lastDirtyTimestamp` from the query, as Eureka does on status changes.
fn touch(info: &mut EurekaDef, q: &HashMap<String, String>) {
    if let Some(t) = q
        .get("lastDirtyTimestamp")
        .and_then(|t| t.parse::<u64>().ok())
    {
        info.last_dirty_ms = info.last_dirty_ms.max(t);
    }
    info.last_updated_ms = now_ms();
}

/// `PUT /apps/{app}/{id}/status?value=OUT_OF_SERVICE`: sets an override over the instance's
/// own status (`OUT_OF_SERVICE`: not answered until the override goes).
pub async fn status_override(
    State(state): State<Arc<ApiState>>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let value = q
        .get("value")
        .ok_or_else(|| EurekaError::Query("missing value=<status>".into()))?;
    let status = Status::parse(value).ok_or_else(|| {
        EurekaError::Query(format!(
            "value {value:?} is not UP, DOWN, STARTING, OUT_OF_SERVICE or UNKNOWN"
        ))
    })?;
    let mut def = eureka_instance(&state, &app, &id)?;
    let info = def.eureka.as_deref_mut().expect("Eureka's");
    info.overridden_status = (status != Status::Unknown).then(|| status.as_str().into());
    touch(info, &q);
    put(&state, def).await?;
    Ok(ok())
}

/// `DELETE /apps/{app}/{id}/status`: removes the override; the instance's own status (or
/// `value`, when given) stands again.
pub async fn delete_override(
    State(state): State<Arc<ApiState>>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let mut def = eureka_instance(&state, &app, &id)?;
    let info = def.eureka.as_deref_mut().expect("Eureka's");
    if let Some(value) = q.get("value") {
        let status = Status::parse(value)
            .ok_or_else(|| EurekaError::Query(format!("value {value:?} is not a status")))?;
        info.status = status.as_str().into();
    }
    info.overridden_status = None;
    touch(info, &q);
    put(&state, def).await?;
    Ok(ok())
}

/// `PUT /apps/{app}/{id}/metadata?key=value&...`: adds to (or changes) the instance's
/// metadata.
pub async fn metadata(
    State(state): State<Arc<ApiState>>,
    Path((app, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        return Err(EurekaError::Query("no metadata: send ?key=value".into()).into());
    }
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !codec::is_xml_name(k)) {
        return Err(EurekaError::Query(format!(
            "metadata key {k:?} cannot be an XML element name"
        ))
        .into());
    }
    let mut def = eureka_instance(&state, &app, &id)?;
    def.meta.extend(pairs);
    def.eureka.as_deref_mut().expect("Eureka's").last_updated_ms = now_ms();
    put(&state, def).await?;
    Ok(ok())
}

/// Brings the view up to the registry's index.
fn sync(state: &ApiState) {
    let registry = &state.registry;
    state.eureka.sync(&state.local, &|id| {
        registry.definition(id).and_then(|(d, _)| d.eureka)
    });
}

/// Applications in the form the encoder takes, every instance as `action`.
fn views(apps: &[App], action: Action) -> Vec<AppView<'_>> {
    apps.iter()
        .map(|a| AppView {
            name: &a.name,
            instances: a.instances.iter().map(|i| (&**i, action)).collect(),
        })
        .collect()
}

fn applications(apps: &[App], index: u64, format: Format) -> Response {
    let hash = codec::hashcode(
        apps.iter()
            .flat_map(|a| a.instances.iter().map(|i| i.status)),
    );
    answer(
        codec::encode_applications(&views(apps, Action::Added), index, &hash, format),
        format,
    )
}

/// `GET /apps`: every application.
pub async fn apps(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    sync(&state);
    let (index, apps) = state.eureka.snapshot();
    applications(&apps, index, format_of(&headers))
}

/// `GET /apps/delta`: what changed recently, with the whole registry's hash code.
pub async fn delta(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    sync(&state);
    let delta = state.eureka.delta();
    let apps: Vec<AppView> = delta
        .apps
        .iter()
        .map(|(name, list)| AppView {
            name,
            instances: list.iter().map(|(i, a)| (&**i, *a)).collect(),
        })
        .collect();
    let format = format_of(&headers);
    answer(
        codec::encode_applications(&apps, delta.index, &delta.hashcode, format),
        format,
    )
}

fn app_of(state: &ApiState, app: &str) -> Result<App, ApiError> {
    let not_found = || ApiError::NotFound(format!("no application {app:?}"));
    let service = codec::service_name(app).map_err(|_| not_found())?;
    state.eureka.app(&service).ok_or_else(not_found)
}

/// `GET /apps/{app}`: one application.
pub async fn application(
    State(state): State<Arc<ApiState>>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    sync(&state);
    let app = app_of(&state, &app)?;
    let format = format_of(&headers);
    let view = &views(std::slice::from_ref(&app), Action::Added)[0];
    Ok(answer(codec::encode_application(view, format), format))
}

fn one(i: &InstanceView, headers: &HeaderMap) -> Response {
    let format = format_of(headers);
    answer(codec::encode_instance(i, Action::Added, format), format)
}

/// `GET /apps/{app}/{id}`: one instance.
pub async fn instance(
    State(state): State<Arc<ApiState>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    sync(&state);
    let found = app_of(&state, &app)?;
    let i =
        found.instances.iter().find(|i| i.id == id).ok_or_else(|| {
            ApiError::NotFound(format!("no instance {id:?} of application {app:?}"))
        })?;
    Ok(one(i, &headers))
}

/// `GET /instances/{id}`: one instance, whatever its application.
pub async fn instance_by_id(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    sync(&state);
    let apps = state.eureka.apps();
    let i = apps
        .iter()
        .flat_map(|a| a.instances.iter())
        .find(|i| i.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id:?}")))?;
    Ok(one(i, &headers))
}

/// The applications, each with only its instances whose (comma-separated) address list
/// names `address` (case-insensitively, as Eureka matches VIPs).
fn by_address(apps: Vec<App>, address: &str, secure: bool) -> Vec<App> {
    apps.into_iter()
        .filter_map(|mut a| {
            a.instances.retain(|i| {
                let list = if secure {
                    &i.info.secure_vip_address
                } else {
                    &i.info.vip_address
                };
                list.split(',')
                    .any(|v| v.trim().eq_ignore_ascii_case(address))
            });
            (!a.instances.is_empty()).then_some(a)
        })
        .collect()
}

/// `GET /vips/{vip}`: the instances with that VIP address.
pub async fn vip(
    State(state): State<Arc<ApiState>>,
    Path(vip): Path<String>,
    headers: HeaderMap,
) -> Response {
    sync(&state);
    let (index, apps) = state.eureka.snapshot();
    let apps = by_address(apps, &vip, false);
    applications(&apps, index, format_of(&headers))
}

/// `GET /svips/{svip}`: the instances with that secure VIP address.
pub async fn svip(
    State(state): State<Arc<ApiState>>,
    Path(svip): Path<String>,
    headers: HeaderMap,
) -> Response {
    sync(&state);
    let (index, apps) = state.eureka.snapshot();
    let apps = by_address(apps, &svip, true);
    applications(&apps, index, format_of(&headers))
}
