//! Consul registration bodies (resolver/src/api/consul.rs): `parse_service` and `parse_check`
//! on any bytes, then what the registry does with an accepted body: `normalize` and each
//! check's `kind`. A definition the registry accepts must persist: the store writes it as
//! JSON and reads it back at the next start, so it must read back as the same definition.
//!
//! Input: one byte choosing the parser, then the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use waymark_resolver::api::consul::{parse_check, parse_service};
use waymark_resolver::registry::def::ServiceDef;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let Ok(def) = parse_service(body) else {
            return;
        };
        let Ok(def) = def.normalize() else {
            return;
        };
        assert!(!def.name.is_empty() && !def.id.is_empty() && def.id.len() <= 255);
        for c in &def.checks {
            assert!(!c.id.is_empty() && !c.name.is_empty());
            c.kind().expect("a normalized check has a kind");
        }
        let json = serde_json::to_vec(&def).expect("a definition serializes");
        let back: ServiceDef =
            serde_json::from_slice(&json).expect("a stored definition reads back");
        assert_eq!(back.name, def.name);
        assert_eq!(back.id, def.id);
        assert_eq!(back.address, def.address);
        assert_eq!(back.port, def.port);
        assert_eq!(back.tags, def.tags);
        assert_eq!(back.meta, def.meta);
        assert_eq!(back.weights, def.weights);
        assert_eq!(back.checks.len(), def.checks.len());
        for (b, c) in back.checks.iter().zip(&def.checks) {
            assert_eq!(
                (&b.id, &b.http, &b.tcp, &b.header),
                (&c.id, &c.http, &c.tcp, &c.header)
            );
            // Durations are stored as Go strings: at most rounding, never another kind.
            assert_eq!(
                b.kind().ok().map(|k| k.name()),
                c.kind().ok().map(|k| k.name())
            );
            for (x, y) in [
                (b.ttl, c.ttl),
                (b.interval, c.interval),
                (b.timeout, c.timeout),
            ] {
                match (x, y) {
                    (Some(x), Some(y)) => {
                        assert!(x.abs_diff(y).as_micros() <= 1 + y.as_micros() / 1_000_000_000)
                    }
                    (x, y) => assert_eq!(x.is_some(), y.is_some()),
                }
            }
        }
    } else if let Ok((check, _service)) = parse_check(body) {
        let _ = check.kind();
    }
});
