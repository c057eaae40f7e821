//! Where the registry lives in etcd: the key layout under a prefix (default `/waymark/`) and
//! the values. Pure: no I/O.
//!
//! - `<prefix>instances/<node>/<service>/<id>`: one [`Instance`] as JSON, written by the host
//!   (`node`) that registered it and runs its checks, attached to that host's lease, so that
//!   it goes when the host does.
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

    /// Reads a key back; `None` for keys outside the layout (other tools' keys under the
    /// prefix are left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
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
    serde_json::to_vec(instance).expect("an instance always serializes")
}

/// An instance from the value of its key, checked against what the key says it is.
pub fn decode_instance(key: &Key, value: &[u8]) -> Result<Instance, String> {
    let instance: Instance = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let Key::Instance { service, id, .. } = key;
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
            "/waymark/vips/s",
        ] {
            assert_eq!(l.parse(key.as_bytes()), None, "{key}");
        }
        assert_eq!(l.parse(&[0xff, 0xfe]), None);
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
