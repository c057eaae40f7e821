//! Who is answered VIPs and who instance addresses (`--vip-answers`).
//!
//! - `off`: nobody: every client gets instance addresses.
//! - `all`: every client gets VIPs (every host runs a forwarder).
//! - `local`: the clients in `vips.clients` (this host, by default) get VIPs.
//! - `auto` (the default): like `local`, but only while a forwarder on this host follows the
//!   registry and is ready: a registration of [`forwarders::SERVICE`] that serves (its
//!   heartbeat is passing) and whose address is one of this host's. Otherwise instance
//!   addresses, so a host without a forwarder, and the single-machine demo, work unchanged.
//!
//! The decision per query is an atomic load and a short scan of `vips.clients`; the
//! forwarder's state is followed by [`follow_local_forwarder`] on every registry change.

use std::net::{IpAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use waymark_shared::forwarders::{self, ForwarderInfo};
use waymark_shared::Mirror;

/// Who gets VIP answers; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipMode {
    #[default]
    Auto,
    Local,
    All,
    Off,
}

impl FromStr for VipMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VipMode::Auto),
            "local" => Ok(VipMode::Local),
            "all" => Ok(VipMode::All),
            "off" => Ok(VipMode::Off),
            _ => Err(format!("{s:?} is not one of auto, local, all, off")),
        }
    }
}

/// The per-query decision.
#[derive(Debug)]
pub struct VipAnswers {
    pub mode: VipMode,
    /// The TTL of VIP answers.
    pub ttl: u32,
    /// The clients that count as this host's.
    pub clients: Vec<IpNet>,
    /// Whether a forwarder on this host is ready (followed by [`follow_local_forwarder`]).
    pub local_forwarder: Arc<AtomicBool>,
}

impl VipAnswers {
    /// The TTL to answer VIPs with to `client`, or `None` for instance addresses.
    pub fn ttl_for(&self, client: IpAddr) -> Option<u32> {
        let local = || {
            let client = match client {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(client),
                v4 => v4,
            };
            self.clients.iter().any(|n| n.contains(&client))
        };
        let yes = match self.mode {
            VipMode::Off => false,
            VipMode::All => true,
            VipMode::Local => local(),
            VipMode::Auto => self.local_forwarder.load(Ordering::Acquire) && local(),
        };
        yes.then_some(self.ttl)
    }
}

/// Whether a ready forwarder's registration says it runs on this host: its address is one
/// of this host's (binding to it succeeds).
pub fn local_forwarder_ready(mirror: &Mirror) -> bool {
    let Some(view) = mirror.service(forwarders::SERVICE) else {
        return false;
    };
    view.instances
        .iter()
        .filter_map(|i| ForwarderInfo::from_instance(i))
        .any(|f| f.ready && is_local_address(f.inbound.ip()))
}

/// Whether `ip` is an address of this host (in this network namespace).
pub fn is_local_address(ip: IpAddr) -> bool {
    !ip.is_unspecified() && UdpSocket::bind((ip, 0)).is_ok()
}

/// Keeps `flag` equal to [`local_forwarder_ready`] on every change of the mirror, until the
/// mirror's notifier goes away. Logs each flip.
pub async fn follow_local_forwarder(mirror: Arc<Mirror>, flag: Arc<AtomicBool>) {
    let mut changes = mirror.subscribe();
    loop {
        let ready = local_forwarder_ready(&mirror);
        if flag.swap(ready, Ordering::AcqRel) != ready {
            tracing::info!(
                ready,
                "a forwarder on this host is {}: VIP answers (auto) {}",
                if ready { "ready" } else { "not ready" },
                if ready { "on" } else { "off" }
            );
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_gets_vips() {
        let answers = |mode, forwarder| VipAnswers {
            mode,
            ttl: 300,
            clients: vec!["127.0.0.0/8".parse().unwrap()],
            local_forwarder: Arc::new(AtomicBool::new(forwarder)),
        };
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: IpAddr = "10.1.1.1".parse().unwrap();
        // (mode, forwarder ready, client, VIPs)
        let cases = [
            (VipMode::Off, true, local, false),
            (VipMode::All, false, remote, true),
            (VipMode::Local, false, local, true),
            (VipMode::Local, false, mapped, true),
            (VipMode::Local, true, remote, false),
            (VipMode::Auto, false, local, false),
            (VipMode::Auto, true, local, true),
            (VipMode::Auto, true, remote, false),
        ];
        for (mode, ready, client, want) in cases {
            let got = answers(mode, ready).ttl_for(client);
            assert_eq!(got.is_some(), want, "{mode:?} ready={ready} {client}");
        }
        assert_eq!("auto".parse::<VipMode>(), Ok(VipMode::Auto));
        assert!("sometimes"
            .parse::<VipMode>()
            .unwrap_err()
            .contains("auto, local"));
    }

    #[test]
    fn local_addresses_are_told_from_others() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(is_local_address("127.77.3.4".parse().unwrap()));
        assert!(!is_local_address("0.0.0.0".parse().unwrap()));
        // TEST-NET-1 is never assigned to a host.
        assert!(!is_local_address("192.0.2.1".parse().unwrap()));
    }
}
