//! Where the registry lives in etcd: the key layout under a prefix (default `/waymark/`) and
//! the values. Pure: no I/O.
//!
//! - `<prefix>instances/<node>/<service>/<id>`: one [`Instance`] as JSON, written by the host
//!   (`node`) that registered it and runs its checks, attached to that host's lease, so that
//!   it goes when the host does.
//! - `<prefix>vips/<service>` and `<prefix>vips/<service>/<tag>`: the VIP of a service and of
//!   a tag subset of it (names lowercased), as text; with
//! - `<prefix>vip-addresses/<ip>`: the name that holds an address (`payment`, `v2.payment`).
//!   Both are created in one transaction that succeeds only if neither exists, so that every
//!   host agrees on every VIP and no address is handed out twice. They carry no lease: a
//!   service keeps its VIPs whichever hosts come and go.
//!
//! Each segment is percent-encoded (`%`, `/`, and every byte outside printable ASCII), so
//! that any node name, service name or instance ID makes exactly one key and reads back as
//! itself.

use crate::Instance;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("etcd prefix {0:?} must start and end with '/' (like \"/waymark/\")")]
    Prefix(String),
    #[error("node name {0:?} must not be empty")]
    Node(String),
}

/// A key this layout knows, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Instance {
        node: String,
        service: String,
        id: String,
    },
    /// A VIP: the service's own (`tag` none) or a tag subset's.
    Vip {
        service: String,
        tag: Option<String>,
    },
    /// Which name holds an address (the VIP keys are what followers read).
    VipAddress,
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    pub fn new(prefix: &str) -> Result<Layout, KeyError> {
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(KeyError::Prefix(prefix.to_string()));
        }
        Ok(Layout {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix of every instance key.
    pub fn instances(&self) -> String {
        format!("{}instances/", self.prefix)
    }

    /// The prefix of one node's instance keys.
    pub fn node_instances(&self, node: &str) -> String {
        format!("{}instances/{}/", self.prefix, encode(node))
    }

    pub fn instance_key(&self, node: &str, service: &str, id: &str) -> String {
        format!(
            "{}instances/{}/{}/{}",
            self.prefix,
            encode(node),
            encode(service),
            encode(id)
        )
    }

    /// The prefix of every VIP key.
    pub fn vips(&self) -> String {
        format!("{}vips/", self.prefix)
    }

    /// The key of a service's VIP (`tag` none) or of a tag subset's.
    pub fn vip_key(&self, service: &str, tag: Option<&str>) -> String {
        let service = encode(&service.to_ascii_lowercase());
        match tag {
            None => format!("{}vips/{service}", self.prefix),
            Some(t) => format!(
                "{}vips/{service}/{}",
                self.prefix,
                encode(&t.to_ascii_lowercase())
            ),
        }
    }

    /// The prefix of every address key.
    pub fn vip_addresses(&self) -> String {
        format!("{}vip-addresses/", self.prefix)
    }

    pub fn vip_address_key(&self, ip: std::net::Ipv4Addr) -> String {
        format!("{}vip-addresses/{ip}", self.prefix)
    }

    /// Reads a key back; `None` for keys outside the layout (other tools' keys under the
    /// prefix are left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        if let Some(rest) = rest.strip_prefix("vips/") {
            let mut parts = rest.split('/');
            let service = decode(parts.next().filter(|s| !s.is_empty())?)?;
            let tag = match parts.next() {
                None => None,
                Some(t) if !t.is_empty() => Some(decode(t)?),
                Some(_) => return None,
            };
            if parts.next().is_some() {
                return None;
            }
            return Some(Key::Vip { service, tag });
        }
        if let Some(ip) = rest.strip_prefix("vip-addresses/") {
            return ip
                .parse::<std::net::Ipv4Addr>()
                .ok()
                .map(|_| Key::VipAddress);
        }
        let rest = rest.strip_prefix("instances/")?;
        let mut parts = rest.split('/');
        let (node, service, id) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || node.is_empty() || service.is_empty() || id.is_empty() {
            return None;
        }
        Some(Key::Instance {
            node: decode(node)?,
            service: decode(service)?,
            id: decode(id)?,
        })
    }
}

/// An instance as the value of its key.
pub fn encode_instance(instance: &Instance) -> Vec<u8> {
    // Change indexes are each mirror's own: etcd's revisions give the followers theirs.
    let instance = Instance {
        create_index: 0,
        modify_index: 0,
        ..instance.clone()
    };
    serde_json::to_vec(&instance).expect("an instance always serializes")
}

/// An instance from the value of its key, checked against what the key says it is.
pub fn decode_instance(key: &Key, value: &[u8]) -> Result<Instance, String> {
    let instance: Instance = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let Key::Instance { service, id, .. } = key else {
        return Err("not an instance key".into());
    };
    if instance.service.as_str() != service || instance.id.as_str() != id {
        return Err(format!(
            "the value is instance {:?} of {:?}, the key says {id:?} of {service:?}",
            instance.id, instance.service
        ));
    }
    Ok(instance)
}

fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b == b'%' || b == b'/' || !(0x21..0x7f).contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_need_slashes_at_both_ends() {
        assert!(Layout::new("/waymark/").is_ok());
        assert!(Layout::new("/a/b/").is_ok());
        for bad in ["", "waymark/", "/waymark", "waymark"] {
            assert_eq!(Layout::new(bad), Err(KeyError::Prefix(bad.into())), "{bad}");
        }
    }

    #[test]
    fn keys_read_back_as_what_they_were_made_of() {
        let l = Layout::new("/waymark/").unwrap();
        let cases = [
            (
                "host-a",
                "payment",
                "payment-1",
                "/waymark/instances/host-a/payment/payment-1",
            ),
            ("h", "web", "a/b", "/waymark/instances/h/web/a%2Fb"),
            ("h", "web", "50%", "/waymark/instances/h/web/50%25"),
            (
                "h",
                "web",
                "a b\u{e9}",
                "/waymark/instances/h/web/a%20b%C3%A9",
            ),
        ];
        for (node, service, id, key) in cases {
            assert_eq!(l.instance_key(node, service, id), key);
            assert_eq!(
                l.parse(key.as_bytes()),
                Some(Key::Instance {
                    node: node.into(),
                    service: service.into(),
                    id: id.into()
                }),
                "{key}"
            );
            assert!(key.starts_with(&l.node_instances(node)));
            assert!(key.starts_with(&l.instances()));
        }
    }

    #[test]
    fn keys_outside_the_layout_are_not_read() {
        let l = Layout::new("/waymark/").unwrap();
        for key in [
            "/other/instances/h/s/i",
            "/waymark/instances/h/s",
            "/waymark/instances/h/s/i/extra",
            "/waymark/instances//s/i",
            "/waymark/instances/h/s/%zz",
            "/waymark/instances/h/s/%2",
            "/waymark/other/s",
        ] {
            assert_eq!(l.parse(key.as_bytes()), None, "{key}");
        }
        assert_eq!(l.parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn vip_keys_read_back() {
        let l = Layout::new("/w/").unwrap();
        assert_eq!(l.vip_key("Payment", None), "/w/vips/payment");
        assert_eq!(l.vip_key("payment", Some("V2")), "/w/vips/payment/v2");
        assert_eq!(
            l.parse(b"/w/vips/payment"),
            Some(Key::Vip {
                service: "payment".into(),
                tag: None
            })
        );
        assert_eq!(
            l.parse(b"/w/vips/payment/v2"),
            Some(Key::Vip {
                service: "payment".into(),
                tag: Some("v2".into())
            })
        );
        let ip = "127.77.0.9".parse().unwrap();
        assert_eq!(l.vip_address_key(ip), "/w/vip-addresses/127.77.0.9");
        assert_eq!(
            l.parse(l.vip_address_key(ip).as_bytes()),
            Some(Key::VipAddress)
        );
        for bad in [
            "/w/vips/",
            "/w/vips/a/",
            "/w/vips/a/b/c",
            "/w/vip-addresses/x",
        ] {
            assert_eq!(l.parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn values_must_match_their_keys() {
        let l = Layout::new("/w/").unwrap();
        let i = Instance::new("web", "web-1", "10.0.0.1", 80);
        let key = l
            .parse(l.instance_key("h", "web", "web-1").as_bytes())
            .unwrap();
        assert_eq!(decode_instance(&key, &encode_instance(&i)), Ok(i.clone()));
        let other = l
            .parse(l.instance_key("h", "web", "web-2").as_bytes())
            .unwrap();
        assert!(decode_instance(&other, &encode_instance(&i)).is_err());
        assert!(decode_instance(&key, b"{not json").is_err());
    }
}
