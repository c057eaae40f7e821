//! Consul's filter language (resolver/src/api/filter.rs) and Consul's DNS names
//! (resolver/src/dns/consul.rs), on any input: both come from clients.
//!
//! Input: one control byte, then text. The text (lossily UTF-8) is parsed as a filter; one
//! that parses is validated against a health entry's shape and evaluated on a health entry
//! and on a JSON value read from the same text. `matches` is `evaluate` with errors as no
//! match, and a filter that validates never fails to evaluate on an entry of that shape. The
//! text is also split into DNS labels and classified as a Consul name.

#![no_main]

use hickory_proto::rr::RecordType;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use waymark_resolver::api::filter::Filter;
use waymark_resolver::dns::consul::{classify, Lookup};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let entry = json!({
        "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1",
                 "TaggedAddresses": {"lan": "10.0.0.1"}, "Meta": {"rack": "r1"},
                 "CreateIndex": 3, "ModifyIndex": 4},
        "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "primary"],
                    "Meta": {"team": "a", "a.b": "c"}, "Port": 8080, "Address": "10.0.0.5",
                    "EnableTagOverride": false, "CreateIndex": 3, "ModifyIndex": 4},
        "Checks": [{"CheckID": "c1", "Status": "passing", "ServiceName": "web"},
                   {"CheckID": "c2", "Status": "critical", "ServiceName": "web"}]
    });
    if let Ok(filter) = Filter::parse(&text) {
        let validated = filter.validate(&entry).is_ok();
        let evaluated = filter.evaluate(&entry);
        assert_eq!(filter.matches(&entry), *evaluated.as_ref().unwrap_or(&false));
        if validated {
            assert!(
                evaluated.is_ok(),
                "a filter valid for the shape evaluates on it: {text:?} {evaluated:?}"
            );
        }
        if let Ok(other) = serde_json::from_str::<serde_json::Value>(&text) {
            let _ = filter.matches(&other);
        }
    }
    let labels: Vec<&str> = text.split('.').filter(|l| !l.is_empty()).collect();
    let qtype = [RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::ANY][ctl as usize % 4];
    match classify(&labels, qtype, "dc1") {
        Lookup::Mesh { labels: mesh, .. } => {
            // One or two non-empty labels, never the name server's `ns` as the service
            // (a tag may be any label).
            assert!(!mesh.is_empty() && mesh.len() <= 2, "{labels:?} -> {mesh:?}");
            assert!(mesh.iter().all(|l| !l.is_empty()), "{mesh:?}");
            assert_ne!(mesh.last().map(String::as_str), Some("ns"), "{labels:?} -> {mesh:?}");
        }
        Lookup::Apex => assert!(labels.is_empty()),
        _ => {}
    }
});
