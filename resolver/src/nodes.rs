//! What Consul's API calls nodes, computed from the registry (pure): this host; with etcd,
//! every other host that registered instances; and the external nodes that catalog
//! registrations name. Waymark keeps no node table: a node exists while it has instances
//! (this host always does).

use std::collections::BTreeMap;

use waymark_shared::forwarders::ForwarderInfo;
use waymark_shared::Instance;

/// One node as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub meta: BTreeMap<String, String>,
    /// A Waymark host (an agent, in Consul's terms), not an external node.
    pub host: bool,
    /// The change indexes of its first and last change, from its instances.
    pub create_index: u64,
    pub modify_index: u64,
}

/// This host, as the nodes are computed around it.
pub struct This<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub meta: &'a BTreeMap<String, String>,
}

/// Every node, by name (case-insensitively one node per name, as in Consul), in name order.
pub fn nodes<'a>(instances: impl Iterator<Item = &'a Instance>, this: &This) -> Vec<NodeInfo> {
    let mut out: BTreeMap<String, NodeInfo> = BTreeMap::new();
    out.insert(
        this.name.to_ascii_lowercase(),
        NodeInfo {
            name: this.name.to_string(),
            address: this.address.to_string(),
            meta: this.meta.clone(),
            host: true,
            create_index: 0,
            modify_index: 0,
        },
    );
    // Another host's address: its forwarder's inbound address when it has one, else the
    // first instance address that is an IP.
    let mut forwarder_ip: BTreeMap<String, String> = BTreeMap::new();
    let mut any_ip: BTreeMap<String, String> = BTreeMap::new();
    for i in instances {
        let name = i.node.as_deref().unwrap_or(this.name);
        let key = name.to_ascii_lowercase();
        let external = i.extra.as_ref().filter(|e| !e.node_address.is_empty());
        let node = out.entry(key.clone()).or_insert_with(|| NodeInfo {
            name: name.to_string(),
            address: String::new(),
            meta: BTreeMap::new(),
            host: external.is_none(),
            create_index: i.create_index,
            modify_index: i.modify_index,
        });
        if let Some(e) = external {
            node.address = e.node_address.clone();
            node.meta = e.node_meta.clone();
            node.host = false;
        }
        node.create_index = match node.create_index {
            0 => i.create_index,
            c => c.min(i.create_index),
        };
        node.modify_index = node.modify_index.max(i.modify_index);
        if let Some(f) = ForwarderInfo::from_instance(i) {
            forwarder_ip.insert(key.clone(), f.inbound.ip().to_string());
        }
        if let Some(ip) = i.ip() {
            any_ip.entry(key).or_insert_with(|| ip.to_string());
        }
    }
    for (key, node) in out.iter_mut() {
        if node.address.is_empty() {
            node.address = forwarder_ip
                .get(key)
                .or_else(|| any_ip.get(key))
                .cloned()
                .unwrap_or_default();
        }
    }
    out.into_values().collect()
}

/// The node named `name` (case-insensitively).
pub fn find<'a>(
    instances: impl Iterator<Item = &'a Instance>,
    this: &This,
    name: &str,
) -> Option<NodeInfo> {
    nodes(instances, this)
        .into_iter()
        .find(|n| n.name.eq_ignore_ascii_case(name))
}

/// Whether an instance is on the node named `name`.
pub fn on_node(i: &Instance, this: &This, name: &str) -> bool {
    i.node
        .as_deref()
        .unwrap_or(this.name)
        .eq_ignore_ascii_case(name)
}

/// `?node-meta=key:value` pairs (all must match); an entry without `:` is an error.
pub fn parse_node_meta(values: &[String]) -> Result<Vec<(String, String)>, String> {
    values
        .iter()
        .map(|v| {
            v.split_once(':')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("node-meta {v:?}: expected key:value"))
        })
        .collect()
}

/// Whether node metadata has every pair.
pub fn meta_matches(meta: &BTreeMap<String, String>, wanted: &[(String, String)]) -> bool {
    wanted
        .iter()
        .all(|(k, v)| meta.get(k).is_some_and(|m| m == v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_shared::{forwarders, Extra};

    fn inst(id: &str, addr: &str, node: Option<&str>, index: u64) -> Instance {
        let mut i = Instance::new("web", id, addr, 80);
        i.node = node.map(Into::into);
        i.create_index = index;
        i.modify_index = index + 1;
        i
    }

    #[test]
    fn nodes_are_this_host_other_hosts_and_external_nodes() {
        let meta = BTreeMap::from([("rack".to_string(), "r1".to_string())]);
        let this = This {
            name: "h1",
            address: "10.0.0.1",
            meta: &meta,
        };
        let mut external = inst("ext-1", "93.184.216.34", Some("example"), 7);
        external.extra = Some(Box::new(Extra {
            node_address: "example.com".into(),
            node_meta: BTreeMap::from([("external-node".to_string(), "true".to_string())]),
            ..Extra::default()
        }));
        let mut fwd = inst("fwd-h2", "10.0.0.2", Some("H2"), 3);
        fwd.service = forwarders::SERVICE.into();
        fwd.meta.insert(forwarders::META_HOST.into(), "h2".into());
        let instances = [
            inst("a", "127.0.0.1", None, 2),
            inst("b", "10.0.0.9", Some("h2"), 5),
            fwd,
            inst("c", "db.internal", Some("h3"), 4),
            inst("d", "10.0.0.3", Some("h3"), 9),
            external,
        ];
        let got = nodes(instances.iter(), &this);
        let view: Vec<(&str, &str, bool, u64, u64)> = got
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.address.as_str(),
                    n.host,
                    n.create_index,
                    n.modify_index,
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                ("example", "example.com", false, 7, 8),
                ("h1", "10.0.0.1", true, 2, 3),
                ("h2", "10.0.0.2", true, 3, 6),
                ("h3", "10.0.0.3", true, 4, 10),
            ]
        );
        assert_eq!(got[0].meta["external-node"], "true");
        assert_eq!(got[1].meta["rack"], "r1");
        assert_eq!(
            find(instances.iter(), &this, "EXAMPLE").map(|n| n.name),
            Some("example".to_string())
        );
        assert!(find(instances.iter(), &this, "nope").is_none());
        assert!(on_node(&instances[0], &this, "H1"));
        assert!(!on_node(&instances[1], &this, "h1"));
    }

    #[test]
    fn node_meta_filters() {
        let meta = BTreeMap::from([
            ("rack".to_string(), "r1".to_string()),
            ("os".to_string(), "linux".to_string()),
        ]);
        let cases: &[(&[&str], Result<bool, &str>)] = &[
            (&[], Ok(true)),
            (&["rack:r1"], Ok(true)),
            (&["rack:r1", "os:linux"], Ok(true)),
            (&["rack:r2"], Ok(false)),
            (&["rack:r1", "zone:a"], Ok(false)),
            (&["a:b:c"], Ok(false)),
            (&["rack"], Err("expected key:value")),
        ];
        for (values, want) in cases {
            let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
            let got = parse_node_meta(&values).map(|w| meta_matches(&meta, &w));
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w, "{values:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{e}"),
                (g, w) => panic!("{values:?}: {g:?} vs {w:?}"),
            }
        }
    }
}
