use super::*;

const NOW: u64 = 1_700_000_000_000;

/// What py-eureka-client 0.13 sends: scalars as strings here and there, `@enabled` as a
/// string, `overriddenstatus` UNKNOWN.
const PY_JSON: &str = r#"{"instance": {"instanceId": "host-1:10.0.0.1:MY_APP:8080",
  "hostName": "host-1", "app": "MY_APP", "ipAddr": "10.0.0.1", "status": "UP",
  "overriddenstatus": "UNKNOWN", "port": {"$": 8080, "@enabled": "true"},
  "securePort": {"$": 9443, "@enabled": "false"}, "countryId": 1,
  "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
  "leaseInfo": {"renewalIntervalInSecs": 1, "durationInSecs": 2, "registrationTimestamp": 0,
    "lastRenewalTimestamp": 0, "evictionTimestamp": 0, "serviceUpTimestamp": 0},
  "metadata": {"zone": "a", "management.port": "8081"}, "homePageUrl": "http://host-1:8080/",
  "statusPageUrl": "", "healthCheckUrl": "", "secureHealthCheckUrl": "", "vipAddress": "my_app",
  "secureVipAddress": "my_app", "lastUpdatedTimestamp": "1699999999000",
  "lastDirtyTimestamp": "1699999999000", "isCoordinatingDiscoveryServer": "false"}}"#;

/// What eureka-js-client sends: its config as given (booleans as booleans), no lease.
const JS_JSON: &str = r#"{"instance": {"app": "jsapp", "hostName": "js-host", "ipAddr": "127.0.0.2",
  "port": {"$": 3000, "@enabled": true}, "vipAddress": "jsapp.vip",
  "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
  "status": "UP"}}"#;

/// Eureka's XML, as the Java client can send it.
const XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<instance>
  <instanceId>x-1</instanceId><hostName>xhost</hostName><app>XAPP</app>
  <ipAddr>10.1.1.1</ipAddr><status>STARTING</status><overriddenstatus>UNKNOWN</overriddenstatus>
  <port enabled="false">80</port><securePort enabled="true">443</securePort>
  <countryId>1</countryId>
  <dataCenterInfo class="com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"><name>MyOwn</name></dataCenterInfo>
  <leaseInfo><renewalIntervalInSecs>10</renewalIntervalInSecs><durationInSecs>30</durationInSecs></leaseInfo>
  <metadata class="java.util.Collections$EmptyMap"/>
  <vipAddress>xapp</vipAddress>
  <lastDirtyTimestamp>123</lastDirtyTimestamp>
</instance>"#;

#[test]
fn registrations_parse_from_each_clients_shape() {
    let py = parse_registration(PY_JSON.as_bytes(), "my_app", NOW).unwrap();
    assert_eq!(py.instance_id, "host-1:10.0.0.1:MY_APP:8080");
    assert_eq!(py.ip_addr, "10.0.0.1");
    assert_eq!(py.info.app, "MY_APP");
    assert_eq!((py.info.port, py.info.port_enabled), (8080, true));
    assert_eq!(
        (py.info.secure_port, py.info.secure_port_enabled),
        (9443, false)
    );
    assert_eq!(py.port(), 8080);
    assert_eq!(
        (py.info.renewal_interval_secs, py.info.duration_secs),
        (1, 2)
    );
    assert_eq!(py.info.overridden_status, None, "UNKNOWN is no override");
    assert_eq!(py.info.last_dirty_ms, 1_699_999_999_000);
    assert_eq!(py.metadata.get("management.port").unwrap(), "8081");
    assert_eq!(py.info.vip_address, "my_app");

    let js = parse_registration(JS_JSON.as_bytes(), "JSAPP", NOW).unwrap();
    assert_eq!(
        js.instance_id, "js-host",
        "no instanceId: the host name, as Eureka"
    );
    assert_eq!(js.info.app, "JSAPP");
    assert_eq!(js.port(), 3000);
    assert_eq!(
        (js.info.renewal_interval_secs, js.info.duration_secs),
        (30, 90),
        "Eureka's lease defaults"
    );
    assert_eq!(js.info.last_dirty_ms, NOW);

    let x = parse_registration(XML.as_bytes(), "xapp", NOW).unwrap();
    assert_eq!(x.instance_id, "x-1");
    assert_eq!(x.info.status, "STARTING");
    assert_eq!(x.port(), 443, "the secure port, the only one enabled");
    assert_eq!(x.info.duration_secs, 30);
    assert!(x.metadata.is_empty(), "{:?}", x.metadata);
    assert_eq!(x.info.last_dirty_ms, 123);
}

#[test]
fn bad_registrations_say_what_is_wrong() {
    let cases: &[(&str, &str)] = &[
        ("", "neither JSON nor XML"),
        ("hello", "neither JSON nor XML"),
        ("{", "JSON"),
        ("[1]", "JSON"),
        (r#"{"app": "A"}"#, "no instance"),
        (r#"{"instance": 5}"#, "not an object"),
        ("<instance><hostName>h</hostName>", "XML"),
        ("<application/>", "not <instance>"),
        (r#"<!DOCTYPE x [<!ENTITY a "aaaa">]><instance/>"#, "XML"),
        (
            r#"{"instance": {"ipAddr": "10.0.0.1", "dataCenterInfo": {}}}"#,
            "hostName",
        ),
        (
            r#"{"instance": {"hostName": "h", "dataCenterInfo": {}}}"#,
            "ipAddr",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "10.0.0.1"}}"#,
            "dataCenterInfo",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "app": "OTHER"}}"#,
            "not the application of the path",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "status": "SLEEPY"}}"#,
            "status: \"SLEEPY\"",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "port": {"$": 70000}}}"#,
            "port: \"70000\" is not a port",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "port": {"$": 80, "@enabled": "yes"}}}"#,
            "not true or false",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "leaseInfo": {"durationInSecs": "soon"}}}"#,
            "durationInSecs",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "leaseInfo": {"durationInSecs": 999999}}}"#,
            "over a day",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "metadata": {"a b": "c"}}}"#,
            "XML element name",
        ),
        (
            r#"{"instance": {"hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}, "metadata": {"k": {"x": 1}}}}"#,
            "single value",
        ),
        (
            r#"{"instance": {"hostName": ["h"], "ipAddr": "1.2.3.4", "dataCenterInfo": {}}}"#,
            "hostName: is not a single value",
        ),
        (
            r#"{"instance": {"hostName": "h\u0001", "ipAddr": "1.2.3.4", "dataCenterInfo": {}}}"#,
            "hostName: \"h\\u{1}\" holds the control character",
        ),
        (
            r#"{"instance": {"instanceId": "a\tb", "hostName": "h", "ipAddr": "1.2.3.4", "dataCenterInfo": {}}}"#,
            "instanceId",
        ),
    ];
    for (body, want) in cases {
        let err = parse_registration(body.as_bytes(), "app", NOW)
            .expect_err(body)
            .to_string();
        assert!(err.contains(want), "{body}: {err} (wanted {want:?})");
    }
    assert!(parse_registration(&[0xff, 0xfe], "app", NOW).is_err());
    let deep = "[".repeat(10_000);
    assert!(parse_registration(format!("{{\"instance\": {deep}").as_bytes(), "a", NOW).is_err());
}

#[test]
fn app_names_map_to_dns_names() {
    let cases: &[(&str, Option<&str>)] = &[
        ("MY_APP", Some("my-app")),
        ("payment-service", Some("payment-service")),
        ("Payment.Service", Some("payment-service")),
        ("_edge_", Some("edge")),
        ("API v2", Some("api-v2")),
        ("café", Some("caf")),
        ("___", None),
        ("", None),
        (&"A".repeat(64), None),
    ];
    for (app, want) in cases {
        assert_eq!(service_name(app).ok().as_deref(), *want, "{app}");
    }
}

#[test]
fn hashcodes_count_statuses_in_name_order() {
    use Status::*;
    let cases: &[(&[Status], &str)] = &[
        (&[], ""),
        (&[Up], "UP_1_"),
        (&[Up, Down, Up, Up], "DOWN_1_UP_3_"),
        (
            &[OutOfService, Starting, Up, Down],
            "DOWN_1_OUT_OF_SERVICE_1_STARTING_1_UP_1_",
        ),
    ];
    for (statuses, want) in cases {
        assert_eq!(hashcode(statuses.iter().copied()), *want);
    }
}

#[test]
fn effective_status_follows_eurekas_rules() {
    use Status::*;
    let cases = [
        (Up, None, Up),
        (Up, Some(OutOfService), OutOfService),
        (OutOfService, Some(Up), Up),
        (Down, Some(Up), Down),
        (Starting, Some(OutOfService), Starting),
        (Unknown, None, Unknown),
    ];
    for (own, overridden, want) in cases {
        assert_eq!(effective(own, overridden), want, "{own:?} {overridden:?}");
    }
    assert_eq!(maintenance_for(Up), None);
    assert_eq!(
        maintenance_for(OutOfService).as_deref(),
        Some("Eureka status OUT_OF_SERVICE")
    );
    for s in [Up, Down, Starting, OutOfService, Unknown] {
        assert_eq!(Status::parse(&s.as_str().to_lowercase()), Some(s));
    }
}

#[test]
fn xml_unless_json_is_asked_for() {
    let cases: &[(Option<&str>, Format)] = &[
        (None, Format::Xml),
        (Some("*/*"), Format::Xml),
        (Some("application/json"), Format::Json),
        (Some("application/json;charset=UTF-8"), Format::Json),
        (Some("application/xml"), Format::Xml),
        (Some("application/xml, application/json"), Format::Xml),
        (Some("text/html, application/json;q=0.9"), Format::Json),
        (Some("application/vnd.x+json"), Format::Json),
    ];
    for (accept, want) in cases {
        assert_eq!(negotiate(*accept), *want, "{accept:?}");
    }
}

fn view_of(reg: &Registration, status: Status) -> InstanceView {
    InstanceView {
        id: reg.instance_id.clone(),
        ip_addr: reg.ip_addr.clone(),
        metadata: reg.metadata.clone(),
        info: reg.info.clone(),
        status,
        overridden: Status::Unknown,
        create_index: 1,
        modify_index: 1,
    }
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> roxmltree::Node<'a, 'i> {
    n.children()
        .find(|c| c.has_tag_name(name))
        .unwrap_or_else(|| panic!("no <{name}>"))
}

#[test]
fn answers_in_xml_read_back_as_what_was_registered() {
    let mut reg = parse_registration(PY_JSON.as_bytes(), "MY_APP", NOW).unwrap();
    reg.metadata
        .insert("note".into(), "a<b & \"c\"\u{1}".into());
    let v = view_of(&reg, Status::Up);
    let app = AppView {
        name: "MY_APP",
        instances: vec![(&v, Action::Added)],
    };
    let xml = encode_applications(std::slice::from_ref(&app), 7, "UP_1_", Format::Xml);
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "applications");
    assert_eq!(child(root, "versions__delta").text(), Some("7"));
    assert_eq!(child(root, "apps__hashcode").text(), Some("UP_1_"));
    let inst = child(child(root, "application"), "instance");
    assert_eq!(child(inst, "status").text(), Some("UP"));
    assert_eq!(child(inst, "port").attribute("enabled"), Some("true"));
    assert_eq!(child(inst, "port").text(), Some("8080"));
    assert_eq!(child(inst, "actionType").text(), Some("ADDED"));
    assert_eq!(
        child(child(inst, "metadata"), "note").text(),
        Some("a<b & \"c\"\u{FFFD}")
    );
    // And back in: the instance element is a registration Waymark reads as it wrote it.
    let inst_xml = encode_instance(&v, Action::Added, Format::Xml);
    let again = parse_registration(inst_xml.as_bytes(), "MY_APP", NOW).unwrap();
    assert_eq!(again.instance_id, reg.instance_id);
    assert_eq!(again.port(), reg.port());
    assert_eq!(again.metadata.get("zone"), reg.metadata.get("zone"));
    assert_eq!(again.info.vip_address, reg.info.vip_address);
}

#[test]
fn answers_in_json_have_eurekas_keys() {
    let reg = parse_registration(JS_JSON.as_bytes(), "JSAPP", NOW).unwrap();
    let v = view_of(&reg, Status::OutOfService);
    let app = AppView {
        name: "JSAPP",
        instances: vec![(&v, Action::Deleted)],
    };
    let json: Value = serde_json::from_str(&encode_applications(
        &[app],
        3,
        "OUT_OF_SERVICE_1_",
        Format::Json,
    ))
    .unwrap();
    let apps = &json["applications"];
    assert_eq!(apps["versions__delta"], "3");
    assert_eq!(apps["apps__hashcode"], "OUT_OF_SERVICE_1_");
    let i = &apps["application"][0]["instance"][0];
    assert_eq!(i["app"], "JSAPP");
    assert_eq!(i["status"], "OUT_OF_SERVICE");
    assert_eq!(i["port"]["$"], 3000);
    assert_eq!(i["port"]["@enabled"], "true");
    assert_eq!(i["actionType"], "DELETED");
    assert_eq!(i["vipAddress"], "jsapp.vip");
    assert_eq!(i["dataCenterInfo"]["name"], "MyOwn");
    // An instance's JSON is a registration again.
    let one = encode_instance(&v, Action::Added, Format::Json);
    let again = parse_registration(one.as_bytes(), "jsapp", NOW).unwrap();
    assert_eq!(again.instance_id, "js-host");
    assert_eq!(again.info.status, "OUT_OF_SERVICE");
}

/// What the `eureka_body` fuzz target checks, on a few thousand mutations of the clients'
/// bodies (seeded, so a failure reproduces): no panic, and every accepted body's answers, in
/// XML and JSON, read back as the same instance.
#[test]
fn mutated_bodies_never_panic_and_accepted_ones_read_back() {
    let mut rng = fastrand::Rng::with_seed(17);
    let alphabet = b"<>&\"'{}[]:,$@ \t\r\n\\/=0aZ\x01\xff";
    let (mut accepted, mut tried) = (0, 0);
    for (seed, app) in [(PY_JSON, "MY_APP"), (JS_JSON, "jsapp"), (XML, "xapp")] {
        for _ in 0..1500 {
            let mut body = seed.as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..body.len());
                match rng.u8(..3) {
                    0 => body[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, alphabet[rng.usize(..alphabet.len())]),
                }
            }
            tried += 1;
            let Ok(reg) = parse_registration(&body, app, NOW) else {
                continue;
            };
            accepted += 1;
            let v = view_of(&reg, Status::Up);
            for format in [Format::Xml, Format::Json] {
                let answer = encode_instance(&v, Action::Added, format);
                let back = parse_registration(answer.as_bytes(), app, NOW)
                    .unwrap_or_else(|e| panic!("{format:?}: {e}\n{answer}"));
                assert_eq!(back.instance_id, reg.instance_id, "{answer}");
                assert_eq!(back.ip_addr, reg.ip_addr, "{answer}");
                assert_eq!(back.port(), reg.port(), "{answer}");
                assert!(back.metadata.keys().eq(reg.metadata.keys()), "{answer}");
            }
        }
    }
    assert!(
        accepted > tried / 10,
        "only {accepted} of {tried} mutations accepted"
    );
}
