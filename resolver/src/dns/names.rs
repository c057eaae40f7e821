//! How registrations become DNS names, and which registrations DNS can answer at all: the
//! service name as a label, the instance label mapping, the length of the longest name a
//! registration creates, and addresses that are host names (answered with a CNAME). Pure:
//! the registry calls these before it accepts a registration, [`super::answer`] when it
//! builds names.

use std::net::IpAddr;

/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL: usize = 63;
/// Longest name in wire form, root label included (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE: usize = 255;
/// The label that introduces per-instance names.
pub const INSTANCE_LABEL: &str = "instance";

/// Why a registration cannot be answered in DNS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "service Name {0:?} cannot be a DNS label: use 1 to 63 letters, digits and '-' \
         (it is answered as <name>.<zone>)"
    )]
    ServiceLabel(String),
    #[error("service Name {0:?} is reserved in the DNS zone (ns.<zone> is the name server)")]
    ReservedService(String),
    #[error("service ID {id:?} is empty: it is the instance's DNS label")]
    EmptyInstanceLabel { id: String },
    #[error(
        "the DNS name {name:?} would be {len} bytes long, over DNS's 255: shorten the service \
         Name or ID"
    )]
    TooLong { name: String, len: usize },
    #[error(
        "Address {0:?} is neither an IP address nor a valid host name (labels of letters, \
         digits and '-', up to 63 bytes each and 253 in all)"
    )]
    Address(String),
}

/// Checks that a service name can be the DNS label `<name>.<zone>`: 1 to 63 letters, digits
/// and hyphens (Consul's rule for names discoverable over DNS), not `ns`.
pub fn check_service(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LABEL
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        return Err(NameError::ServiceLabel(name.to_string()));
    }
    if name.eq_ignore_ascii_case("ns") {
        return Err(NameError::ReservedService(name.to_string()));
    }
    Ok(())
}

/// Whether a tag can be the first label of `<tag>.<service>.<zone>`: 1 to 63 letters, digits
/// and hyphens.
pub fn check_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_LABEL
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The DNS label of an instance: its ID, lowercased, with every character outside
/// `[a-z0-9-]` replaced by `-`, cut to 63 bytes. Two IDs of one service that map to the same
/// label are refused by the registry.
pub fn instance_label(id: &str) -> String {
    let mut label = String::with_capacity(id.len().min(MAX_LABEL));
    for c in id.chars() {
        if label.len() == MAX_LABEL {
            break;
        }
        let c = c.to_ascii_lowercase();
        label.push(if c.is_ascii_alphanumeric() || c == '-' {
            c
        } else {
            '-'
        });
    }
    label
}

/// Whether an instance label is the one of `id`, without building it (used per query).
pub fn label_matches(id: &str, label: &[u8]) -> bool {
    let mut n = 0;
    for c in id.chars() {
        if n == MAX_LABEL {
            break;
        }
        let c = c.to_ascii_lowercase();
        let mapped = if c.is_ascii_alphanumeric() || c == '-' {
            c as u8
        } else {
            b'-'
        };
        if label.get(n) != Some(&mapped) {
            return false;
        }
        n += 1;
    }
    n == label.len()
}

/// Checks that every name a registration creates fits in DNS under `zone` (its length in
/// presentation form, without the trailing dot): the longest is
/// `<instance>.instance.<service>.<zone>`.
pub fn check_lengths(service: &str, id: &str, zone: &str) -> Result<(), NameError> {
    let label = instance_label(id);
    if label.is_empty() {
        return Err(NameError::EmptyInstanceLabel { id: id.to_string() });
    }
    let zone = zone.trim_end_matches('.');
    // Wire form: a length byte per label, the root's zero byte.
    let zone_wire = if zone.is_empty() { 1 } else { zone.len() + 2 };
    let len = 1 + label.len() + 1 + INSTANCE_LABEL.len() + 1 + service.len() + zone_wire;
    if len > MAX_NAME_WIRE {
        return Err(NameError::TooLong {
            name: format!(
                "{label}.{INSTANCE_LABEL}.{}.{zone}.",
                service.to_ascii_lowercase()
            ),
            len,
        });
    }
    Ok(())
}

/// What an instance's `Address` is for DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr),
    /// A host name (lowercased, without a trailing dot), answered with a CNAME.
    Host(String),
}

/// Reads an address as an IP or a host name; an empty one means the node's address and is
/// not checked here.
pub fn check_address(address: &str) -> Result<Target, NameError> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok(Target::Ip(ip));
    }
    let host = address.strip_suffix('.').unwrap_or(address);
    let labels_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= MAX_LABEL
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    // An all-numeric last label is a mistyped IP address, not a host name (RFC 1123 §2.1).
    let last_numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if !labels_ok || last_numeric {
        return Err(NameError::Address(address.to_string()));
    }
    Ok(Target::Host(host.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_must_be_labels() {
        for ok in ["payment", "Payment-2", "a", &"x".repeat(63)] {
            assert_eq!(check_service(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a.b",
            "my_svc",
            "sp ace",
            "ünï",
            "_payment",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(check_service(bad), Err(NameError::ServiceLabel(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            check_service("NS"),
            Err(NameError::ReservedService(_))
        ));
    }

    #[test]
    fn instance_labels_map_and_match() {
        let cases = [
            ("Web:10.0.0.1:80", "web-10-0-0-1-80"),
            ("coll_1", "coll-1"),
            ("COLL.1", "coll-1"),
            ("pay-1", "pay-1"),
            ("é1", "-1"),
        ];
        for (id, label) in cases {
            assert_eq!(instance_label(id), label, "{id}");
            assert!(label_matches(id, label.as_bytes()), "{id}");
            assert!(!label_matches(id, b"other"), "{id}");
        }
        let long = "x".repeat(80);
        assert_eq!(instance_label(&long).len(), 63);
        assert!(label_matches(&long, "x".repeat(63).as_bytes()));
        assert!(!label_matches(&long, "x".repeat(62).as_bytes()));
        assert!(!label_matches("ab", b"a"));
        assert!(!label_matches("a", b"ab"));
    }

    #[test]
    fn the_longest_name_must_fit() {
        assert_eq!(check_lengths("pay", "pay-1", "mesh.internal"), Ok(()));
        let long_zone = format!("{}.{}.internal", "z".repeat(63), "y".repeat(63));
        let err = check_lengths(&"s".repeat(63), &"i".repeat(63), &long_zone).unwrap_err();
        assert!(matches!(err, NameError::TooLong { len: 275, .. }), "{err}");
        // Exactly 255 bytes is allowed.
        let zone = "z".repeat(255 - (1 + 63 + 9 + 1 + 63) - 2);
        assert_eq!(
            check_lengths(&"s".repeat(63), &"i".repeat(63), &zone),
            Ok(())
        );
        assert!(check_lengths(&"s".repeat(63), &"i".repeat(63), &format!("{zone}z")).is_err());
        assert!(matches!(
            check_lengths("pay", "", "mesh.internal"),
            Err(NameError::EmptyInstanceLabel { .. })
        ));
    }

    #[test]
    fn addresses_are_ips_or_host_names() {
        assert_eq!(
            check_address("10.0.0.1"),
            Ok(Target::Ip("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            check_address("fd00::1"),
            Ok(Target::Ip("fd00::1".parse().unwrap()))
        );
        for (host, norm) in [
            ("db.example.com", "db.example.com"),
            ("DB.Example.com.", "db.example.com"),
            ("localhost", "localhost"),
            ("a-1.b2", "a-1.b2"),
        ] {
            assert_eq!(check_address(host), Ok(Target::Host(norm.into())), "{host}");
        }
        for bad in [
            "not an ip!",
            "notanip!",
            "10.0.0.256",
            "1.2.3",
            "a..b",
            "-a.b",
            "a-.b",
            "under_score.example",
            ".",
            &format!("{}.com", "x".repeat(64)),
            &format!("{}.com", vec!["y".repeat(60); 5].join(".")),
        ] {
            assert!(
                matches!(check_address(bad), Err(NameError::Address(_))),
                "{bad}"
            );
        }
    }
}
