//! The web view's picture of the registry: every service with its health at a glance, worst
//! first, its instances with their checks, and the DNS names that answer them. Pure: built
//! from the mirror's services, encoded once per change index by [`super`].

use std::cmp::Ordering;
use std::sync::Arc;

use serde::Serialize;
use waymark_shared::{Health, Instance, ServiceView};

use crate::dns::names::{check_tag, instance_label, INSTANCE_LABEL};

/// The names DNS answers: the zone, and Consul's domain when its names are on.
#[derive(Debug, Clone)]
pub struct Naming {
    /// Without the trailing dot, lowercased.
    pub zone: String,
    pub consul_domain: Option<String>,
}

impl Naming {
    pub fn new(zone: &str, consul_domain: Option<&str>) -> Naming {
        let clean = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
        Naming {
            zone: clean(zone),
            consul_domain: consul_domain.map(clean),
        }
    }
}

/// A service's health at a glance, from worst to best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Glance {
    /// No instance is answered.
    Down,
    /// Some instance is not answered, or warns.
    Degraded,
    /// Every instance is answered and passing.
    Healthy,
}

#[derive(Debug, Serialize)]
pub struct ServiceOut<'a> {
    pub name: &'a str,
    pub glance: Glance,
    /// Instances DNS answers (not draining, not critical).
    pub healthy: usize,
    pub total: usize,
    pub dns: ServiceNames,
    pub instances: Vec<InstanceOut<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ServiceNames {
    /// `<service>.<zone>`: A, AAAA, SRV.
    pub name: String,
    /// `_<service>._tcp.<zone>`: SRV.
    pub srv: String,
    /// The service's VIP, when it has one.
    pub vip: Option<String>,
    /// `<tag>.<service>.<zone>` for each tag that is a DNS label.
    pub tags: Vec<TagName>,
    /// `<service>.service.<consul domain>`, when Consul's names are answered.
    pub consul: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TagName {
    pub name: String,
    pub vip: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InstanceOut<'a> {
    pub id: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub tags: &'a [String],
    pub meta: &'a std::collections::BTreeMap<String, String>,
    /// The worst of its checks.
    pub health: Health,
    /// Whether DNS answers it.
    pub serving: bool,
    pub draining: bool,
    /// The maintenance reason, while in maintenance.
    pub maintenance: Option<&'a str>,
    /// `<label>.instance.<service>.<zone>`.
    pub dns: String,
    pub node: Option<&'a str>,
    /// Registered on this host, so the agent API (maintenance, deregistration) reaches it.
    pub local: bool,
    /// Its checks, maintenance aside.
    pub checks: Vec<CheckOut<'a>>,
}

#[derive(Debug, Serialize)]
pub struct CheckOut<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub kind: &'a str,
    pub status: Health,
    pub output: &'a str,
    pub notes: &'a str,
}

/// The kind of the check the registry adds while an instance is in maintenance.
const MAINTENANCE: &str = "maintenance";

/// Every service, worst first (the smallest share answered, then the worst glance, then by
/// name); each one's instances worst first, then by ID. `local` says whether an instance was
/// registered on this host.
pub fn services<'a>(
    views: &'a [Arc<ServiceView>],
    naming: &Naming,
    local: impl Fn(&Instance) -> bool,
) -> Vec<ServiceOut<'a>> {
    let mut out: Vec<ServiceOut<'a>> = views.iter().map(|v| service(v, naming, &local)).collect();
    out.sort_by(|a, b| worse_service(a, b).then_with(|| a.name.cmp(b.name)));
    out
}

fn service<'a>(
    view: &'a ServiceView,
    naming: &Naming,
    local: &impl Fn(&Instance) -> bool,
) -> ServiceOut<'a> {
    let name = view.name.to_ascii_lowercase();
    let zone = &naming.zone;
    let mut instances: Vec<InstanceOut<'a>> = view
        .instances
        .iter()
        .map(|i| instance(i, &name, zone, local(i)))
        .collect();
    instances.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.id.cmp(b.id)));
    let healthy = instances.iter().filter(|i| i.serving).count();
    let total = instances.len();
    let glance = if healthy == 0 {
        Glance::Down
    } else if healthy < total || instances.iter().any(|i| i.health != Health::Passing) {
        Glance::Degraded
    } else {
        Glance::Healthy
    };
    let mut tags: Vec<String> = view
        .instances
        .iter()
        .flat_map(|i| i.tags.iter())
        .filter(|t| check_tag(t))
        .map(|t| t.to_ascii_lowercase())
        .collect();
    tags.sort();
    tags.dedup();
    let dns = ServiceNames {
        srv: format!("_{name}._tcp.{zone}"),
        vip: view.attrs.service_vip().map(|v| v.to_string()),
        tags: tags
            .into_iter()
            .map(|t| TagName {
                vip: view.attrs.tag_vip(&t).map(|v| v.to_string()),
                name: format!("{t}.{name}.{zone}"),
            })
            .collect(),
        consul: naming
            .consul_domain
            .as_ref()
            .map(|d| format!("{name}.service.{d}")),
        name: format!("{name}.{zone}"),
    };
    ServiceOut {
        name: &view.name,
        glance,
        healthy,
        total,
        dns,
        instances,
    }
}

fn instance<'a>(i: &'a Instance, service: &str, zone: &str, local: bool) -> InstanceOut<'a> {
    let maintenance = i
        .checks
        .iter()
        .find(|c| c.kind == MAINTENANCE)
        .map(|c| c.notes.as_str());
    InstanceOut {
        id: &i.id,
        address: &i.address,
        port: i.port,
        tags: &i.tags,
        meta: &i.meta,
        health: i.health(),
        serving: i.is_serving(),
        draining: i.draining,
        maintenance,
        dns: format!(
            "{}.{INSTANCE_LABEL}.{service}.{zone}",
            instance_label(&i.id)
        ),
        node: i.node.as_deref(),
        local,
        checks: i
            .checks
            .iter()
            .filter(|c| c.kind != MAINTENANCE)
            .map(|c| CheckOut {
                id: &c.id,
                name: &c.name,
                kind: &c.kind,
                status: c.status,
                output: &c.output,
                notes: &c.notes,
            })
            .collect(),
    }
}

/// Instances not answered first, then warning ones, then the rest.
fn rank(i: &InstanceOut) -> (bool, std::cmp::Reverse<Health>) {
    (i.serving, std::cmp::Reverse(i.health))
}

/// Whether `a` is worse off than `b`: a smaller share of its instances answered (compared
/// exactly, as fractions), then a worse glance.
fn worse_service(a: &ServiceOut, b: &ServiceOut) -> Ordering {
    let share = |s: &ServiceOut| (s.healthy as u128, s.total.max(1) as u128);
    let ((an, ad), (bn, bd)) = (share(a), share(b));
    (an * bd).cmp(&(bn * ad)).then(a.glance.cmp(&b.glance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use waymark_shared::{CheckView, ServiceAttrs};

    fn check(kind: &str, status: Health, output: &str) -> CheckView {
        CheckView {
            id: format!("{kind}-check"),
            name: format!("{kind} check"),
            kind: kind.into(),
            status,
            output: output.into(),
            notes: String::new(),
        }
    }

    fn inst(service: &str, id: &str, checks: Vec<CheckView>) -> Arc<Instance> {
        let mut i = Instance::new(service, id, "10.0.0.1", 9000);
        i.checks = checks;
        Arc::new(i)
    }

    fn view(name: &str, instances: Vec<Arc<Instance>>) -> Arc<ServiceView> {
        Arc::new(ServiceView {
            name: name.into(),
            index: 1,
            instances,
            attrs: ServiceAttrs::default(),
        })
    }

    fn encode(views: &[Arc<ServiceView>], naming: &Naming) -> Value {
        serde_json::to_value(services(views, naming, |i| i.id != "remote")).unwrap()
    }

    fn naming() -> Naming {
        Naming::new("Mesh.Internal.", None)
    }

    #[test]
    fn worst_first_by_share_then_glance_then_name() {
        let ok = || check("ttl", Health::Passing, "ok");
        let bad = || check("http", Health::Critical, "HTTP GET: 500");
        let warn = || check("http", Health::Warning, "429");
        let views = vec![
            view("a-all-good", vec![inst("a-all-good", "a1", vec![ok()])]),
            view(
                "b-two-of-three",
                vec![
                    inst("b-two-of-three", "b1", vec![ok()]),
                    inst("b-two-of-three", "b2", vec![bad()]),
                    inst("b-two-of-three", "b3", vec![ok()]),
                ],
            ),
            view("c-down", vec![inst("c-down", "c1", vec![bad()])]),
            view("d-warning", vec![inst("d-warning", "d1", vec![warn()])]),
            view(
                "e-half",
                vec![
                    inst("e-half", "e1", vec![bad()]),
                    inst("e-half", "e2", vec![]),
                ],
            ),
        ];
        let out = services(&views, &naming(), |_| true);
        let order: Vec<(&str, Glance, usize, usize)> = out
            .iter()
            .map(|s| (s.name, s.glance, s.healthy, s.total))
            .collect();
        assert_eq!(
            order,
            vec![
                ("c-down", Glance::Down, 0, 1),
                ("e-half", Glance::Degraded, 1, 2),
                ("b-two-of-three", Glance::Degraded, 2, 3),
                ("d-warning", Glance::Degraded, 1, 1),
                ("a-all-good", Glance::Healthy, 1, 1),
            ]
        );
        // Within a service, the instance not answered comes first.
        let b = &out[2];
        let ids: Vec<&str> = b.instances.iter().map(|i| i.id).collect();
        assert_eq!(ids, vec!["b2", "b1", "b3"]);
    }

    #[test]
    fn instances_carry_checks_maintenance_and_names() {
        let mut i = Instance::new("Payment", "Pay_1", "10.0.0.7", 8080);
        i.tags = vec!["v2".into(), "v1.2".into(), "V2".into()];
        i.meta.insert("team".into(), "pay".into());
        i.checks = vec![
            check(
                "http",
                Health::Passing,
                "HTTP GET http://10.0.0.7:8080/health: 200 OK",
            ),
            CheckView {
                id: "_service_maintenance:Pay_1".into(),
                name: "Service Maintenance Mode".into(),
                kind: "maintenance".into(),
                status: Health::Critical,
                output: String::new(),
                notes: "kernel upgrade".into(),
            },
        ];
        i.draining = true;
        let remote = Instance::new("Payment", "remote", "pay.example.com", 8080);
        let mut attrs = ServiceAttrs::default();
        attrs.vips.insert("".into(), "127.77.0.9".parse().unwrap());
        attrs
            .vips
            .insert("v2".into(), "127.77.0.10".parse().unwrap());
        let views = vec![Arc::new(ServiceView {
            name: "Payment".into(),
            index: 3,
            instances: vec![Arc::new(i), Arc::new(remote)],
            attrs,
        })];
        let got = encode(&views, &Naming::new("mesh.internal", Some("consul.")));
        let s = &got[0];
        assert_eq!(s["name"], "Payment");
        assert_eq!(s["glance"], "degraded");
        assert_eq!(
            (s["healthy"].clone(), s["total"].clone()),
            (json!(1), json!(2))
        );
        assert_eq!(
            s["dns"],
            json!({
                "name": "payment.mesh.internal",
                "srv": "_payment._tcp.mesh.internal",
                "vip": "127.77.0.9",
                "tags": [{"name": "v2.payment.mesh.internal", "vip": "127.77.0.10"}],
                "consul": "payment.service.consul",
            })
        );
        let first = &s["instances"][0];
        assert_eq!(first["id"], "Pay_1");
        assert_eq!(first["health"], "critical");
        assert_eq!(first["serving"], false);
        assert_eq!(first["draining"], true);
        assert_eq!(first["maintenance"], "kernel upgrade");
        assert_eq!(first["dns"], "pay-1.instance.payment.mesh.internal");
        assert_eq!(first["local"], true);
        assert_eq!(first["meta"], json!({"team": "pay"}));
        assert_eq!(first["tags"], json!(["v2", "v1.2", "V2"]));
        assert_eq!(
            first["checks"],
            json!([{
                "id": "http-check",
                "name": "http check",
                "kind": "http",
                "status": "passing",
                "output": "HTTP GET http://10.0.0.7:8080/health: 200 OK",
                "notes": "",
            }]),
            "the maintenance check is shown as the maintenance reason, not as a check"
        );
        let second = &s["instances"][1];
        assert_eq!(second["id"], "remote");
        assert_eq!(second["local"], false);
        assert_eq!(second["maintenance"], Value::Null);
        assert_eq!(second["serving"], true);
    }

    #[test]
    fn empty_registry_and_defaults() {
        assert_eq!(encode(&[], &naming()), json!([]));
        let got = encode(&[view("web", vec![inst("web", "w1", vec![])])], &naming());
        assert_eq!(got[0]["glance"], "healthy");
        assert_eq!(got[0]["dns"]["name"], "web.mesh.internal");
        assert_eq!(got[0]["dns"]["vip"], Value::Null);
        assert_eq!(got[0]["dns"]["consul"], Value::Null);
        assert_eq!(got[0]["instances"][0]["checks"], json!([]));
        assert_eq!(got[0]["instances"][0]["health"], "passing");
    }
}
