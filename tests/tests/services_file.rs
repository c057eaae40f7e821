//! Third-party registration from a services file named in the config: its entries answer
//! over DNS, edits (add, remove, change) are picked up within a bounded wait, checks declared
//! in the file run, a broken file keeps the last good state while the server keeps serving,
//! and after a restart the file (not the stale store) decides what is registered.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use serde_json::{json, Value};
use waymark_e2e::dns::{self, addresses};
use waymark_e2e::{ips, tcp_listener, until, Api, Options, Resolver};

/// How long an edit may take to show: the file is checked every 200 ms.
const WAIT: Duration = Duration::from_secs(10);

/// What the resolver logs when it rejects a services file.
const REJECTED: &str = "services file not applied";

/// Replaces the file in one step (write aside, rename), as config management does, so the
/// resolver never reads a half-written file.
fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write services file");
    std::fs::rename(&tmp, path).expect("rename services file");
}

/// A services-file entry without checks.
fn entry(name: &str, id: &str, address: &str, port: u16, tags: &[&str]) -> String {
    let tags: Vec<String> = tags.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[[service]]\nname = {name:?}\nid = {id:?}\naddress = {address:?}\nport = {port}\ntags = [{}]\n\n",
        tags.join(", ")
    )
}

/// A services-file entry with a TCP check.
fn entry_with_tcp_check(
    name: &str,
    id: &str,
    address: &str,
    port: u16,
    target: SocketAddr,
) -> String {
    format!(
        "{}[[service.check]]\ntcp = \"{target}\"\ninterval = \"200ms\"\n\n",
        entry(name, id, address, port, &[])
    )
}

/// A resolver watching a services file (checked every 200 ms) that starts with `text`.
fn resolver_with_file(text: &str) -> (Resolver, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("services.toml");
    write_file(&path, text);
    let r = Resolver::with(Options {
        config: Some(format!(
            "[services_file]\npath = {:?}\nreload_interval = \"200ms\"\n",
            path.display().to_string()
        )),
        ..Default::default()
    });
    (r, path, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_entries_are_answered_and_edits_are_picked_up() {
    let (tcp_addr, listener) = tcp_listener("127.0.0.1:0").await;
    let db1 = entry("legacy-db", "db-1", "127.0.20.1", 5432, &["primary"]);
    let db2 = entry("legacy-db", "db-2", "127.0.20.2", 5432, &["replica"]);
    let ledger = entry_with_tcp_check("ledger", "ledger-1", "127.0.20.10", 8080, tcp_addr);
    let (r, path, _dir) = resolver_with_file(&format!("{db1}{db2}{ledger}"));
    let api = Api::new(&r);

    // The file is loaded before the resolver serves: answered from the first query.
    assert_eq!(
        dns::a_records(r.dns, "legacy-db.mesh.internal.").await,
        ips(&["127.0.20.1", "127.0.20.2"])
    );
    assert_eq!(
        dns::a_records(r.dns, "primary.legacy-db.mesh.internal.").await,
        ips(&["127.0.20.1"])
    );
    let m = dns::udp(r.dns, "_legacy-db._tcp.mesh.internal.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 2);
    for rec in &m.answers {
        let RData::SRV(srv) = &rec.data else {
            panic!("not SRV: {rec:?}")
        };
        assert_eq!(srv.port, 5432);
    }
    assert_eq!(api.registered_ids().await, ["db-1", "db-2", "ledger-1"]);
    // The check declared in the file runs: ledger answers once its TCP check passes.
    until(
        "ledger's TCP check passing",
        WAIT,
        || dns::a_records(r.dns, "ledger.mesh.internal."),
        |d: &Vec<IpAddr>| *d == ips(&["127.0.20.10"]),
    )
    .await;

    // An instance registered through the API in the same service is not the file's to manage.
    api.register(
        json!({"Name": "legacy-db", "ID": "db-api", "Address": "127.0.20.50", "Port": 5432,
        "Tags": ["replica"]}),
    )
    .await;

    // Edit: db-1 moves, db-2 goes, db-3 arrives.
    let db1_moved = entry("legacy-db", "db-1", "127.0.20.11", 5432, &["primary"]);
    let db3 = entry("legacy-db", "db-3", "127.0.20.3", 5433, &["replica"]);
    let edited = Instant::now();
    write_file(&path, &format!("{db1_moved}{db3}{ledger}"));
    until(
        "the edit answered",
        WAIT,
        || dns::a_records(r.dns, "legacy-db.mesh.internal."),
        |d: &Vec<IpAddr>| *d == ips(&["127.0.20.11", "127.0.20.3", "127.0.20.50"]),
    )
    .await;
    eprintln!("edit picked up after {:?}", edited.elapsed());
    assert_eq!(
        api.registered_ids().await,
        ["db-1", "db-3", "db-api", "ledger-1"]
    );
    assert_eq!(
        dns::a_records(r.dns, "replica.legacy-db.mesh.internal.").await,
        ips(&["127.0.20.3", "127.0.20.50"])
    );
    assert_eq!(
        dns::a_records(r.dns, "primary.legacy-db.mesh.internal.").await,
        ips(&["127.0.20.11"])
    );
    let m = dns::udp(
        r.dns,
        "db-2.instance.legacy-db.mesh.internal.",
        RecordType::A,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let v: Value = api.get("/v1/agent/services").await.json().await.unwrap();
    assert_eq!(v["db-3"]["Port"], 5433);
    assert_eq!(v["db-1"]["Address"], "127.0.20.11");
    // The file's ledger entry was untouched: its check kept its passing state.
    assert_eq!(
        dns::a_records(r.dns, "ledger.mesh.internal.").await,
        ips(&["127.0.20.10"])
    );

    // An entry renamed in the file, keeping its check's ID: the check moves with it.
    let queue = |id: &str| {
        format!(
            "{}[[service.check]]\nid = \"queue-check\"\nttl = \"60s\"\nstatus = \"passing\"\n\n",
            entry("queue", id, "127.0.20.30", 5672, &[])
        )
    };
    write_file(
        &path,
        &format!("{db1_moved}{db3}{ledger}{}", queue("queue-1")),
    );
    until(
        "queue-1 registered",
        WAIT,
        || api.registered_ids(),
        |ids: &Vec<String>| ids.contains(&"queue-1".to_string()),
    )
    .await;
    write_file(
        &path,
        &format!("{db1_moved}{db3}{ledger}{}", queue("queue-a")),
    );
    until(
        "queue-1 renamed to queue-a",
        WAIT,
        || api.registered_ids(),
        |ids: &Vec<String>| *ids == ["db-1", "db-3", "db-api", "ledger-1", "queue-a"],
    )
    .await;
    assert_eq!(
        dns::a_records(r.dns, "queue.mesh.internal.").await,
        ips(&["127.0.20.30"])
    );
    let checks: Value = api.get("/v1/agent/checks").await.json().await.unwrap();
    assert_eq!(checks["queue-check"]["ServiceID"], "queue-a");

    // The file's checks follow what they probe, like any other check.
    listener.abort();
    let _ = listener.await;
    until(
        "ledger's TCP check failing",
        WAIT,
        || dns::a_records(r.dns, "ledger.mesh.internal."),
        |d: &Vec<IpAddr>| d.is_empty(),
    )
    .await;

    // Dropping the last entry of a service removes the service.
    write_file(&path, &format!("{db1_moved}{db3}{}", queue("queue-a")));
    until(
        "ledger removed",
        WAIT,
        || async {
            dns::udp(r.dns, "ledger.mesh.internal.", RecordType::A)
                .await
                .metadata
                .response_code
        },
        |rc: &ResponseCode| *rc == ResponseCode::NXDomain,
    )
    .await;
    assert_eq!(
        api.registered_ids().await,
        ["db-1", "db-3", "db-api", "queue-a"]
    );

    // An empty file removes every file entry, and only those.
    write_file(&path, "# nothing here any more\n");
    until(
        "file entries removed",
        WAIT,
        || api.registered_ids(),
        |ids: &Vec<String>| *ids == ["db-api"],
    )
    .await;
    assert_eq!(
        dns::a_records(r.dns, "legacy-db.mesh.internal.").await,
        ips(&["127.0.20.50"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_last_good_state() {
    let inv1 = entry("inventory", "inv-1", "127.0.21.1", 80, &[]);
    let inv2 = entry("inventory", "inv-2", "127.0.21.2", 80, &[]);
    let inv3 = entry("inventory", "inv-3", "127.0.21.3", 80, &[]);
    let with_check = |id: &str, n: u8| {
        format!(
            "{}[[service.check]]\nid = \"shared\"\nttl = \"60s\"\nstatus = \"passing\"\n\n",
            entry("inventory", id, &format!("127.0.21.{n}"), 80, &[])
        )
    };
    let (r, path, _dir) = resolver_with_file(&format!("{inv1}{inv2}"));
    let api = Api::new(&r);
    let good = ips(&["127.0.21.1", "127.0.21.2"]);
    assert_eq!(
        dns::a_records(r.dns, "inventory.mesh.internal.").await,
        good
    );

    // Each of these would drop inv-2 and add inv-3 if any part of it were applied.
    let broken = [
        ("a TOML syntax error", format!("{inv1}{inv3}[[service]\nname = \"x\"\n")),
        ("an unknown field", format!("{inv1}{inv3}[[service]]\nname = \"x\"\nprot = 1\n")),
        ("an ID twice", format!("{inv1}{inv3}{inv3}")),
        ("an entry without a name", format!("{inv1}{inv3}[[service]]\nport = 1\n")),
        (
            "a check without an interval",
            format!("{inv1}{inv3}[[service]]\nname = \"x\"\n[[service.check]]\nhttp = \"http://127.0.0.1:1/\"\n"),
        ),
        (
            "a check ID used by two entries",
            format!("{inv1}{}{}", with_check("inv-3", 3), with_check("inv-4", 4)),
        ),
        ("a wrongly typed port", format!("{inv1}{inv3}[[service]]\nname = \"x\"\nport = \"80\"\n")),
        ("not TOML at all", "\u{0}\u{1}garbage{{{".to_string()),
    ];
    for (what, text) in &broken {
        let rejected_before = r.log().matches(REJECTED).count();
        write_file(&path, text);
        // The resolver says it read and refused the file.
        until(
            &format!("{what}: rejection logged"),
            WAIT,
            || async { r.log().matches(REJECTED).count() },
            |n: &usize| *n > rejected_before,
        )
        .await;
        assert_eq!(
            dns::a_records(r.dns, "inventory.mesh.internal.").await,
            good,
            "{what} changed the answers"
        );
        assert_eq!(api.registered_ids().await, ["inv-1", "inv-2"], "{what}");
        // Still serving: DNS over TCP and registrations through the API.
        let m = dns::tcp(
            r.dns,
            "inv-2.instance.inventory.mesh.internal.",
            RecordType::A,
        )
        .await;
        assert_eq!(addresses(&m), ips(&["127.0.21.2"]), "{what}");
        assert_eq!(api.get("/healthz/ready").await.status(), 200, "{what}");
    }
    api.register(json!({"Name": "other", "ID": "other-1", "Address": "127.0.21.9", "Port": 1}))
        .await;
    assert_eq!(
        dns::a_records(r.dns, "other.mesh.internal.").await,
        ips(&["127.0.21.9"])
    );
    let log = r.log();
    assert!(
        log.contains("prot") && log.contains("twice"),
        "rejections should say why:\n{log}"
    );

    // Fixed: the new contents apply.
    write_file(&path, &format!("{inv1}{inv3}"));
    until(
        "the fixed file applied",
        WAIT,
        || dns::a_records(r.dns, "inventory.mesh.internal."),
        |d: &Vec<IpAddr>| *d == ips(&["127.0.21.1", "127.0.21.3"]),
    )
    .await;
    assert_eq!(api.registered_ids().await, ["inv-1", "inv-3", "other-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_file_decides_what_is_registered() {
    let old1 = entry("cache", "cache-1", "127.0.22.1", 6379, &[]);
    let old2 = entry("cache", "cache-2", "127.0.22.2", 6379, &[]);
    let (mut r, path, _dir) = resolver_with_file(&format!("{old1}{old2}"));
    let api = Api::new(&r);
    assert_eq!(
        dns::a_records(r.dns, "cache.mesh.internal.").await,
        ips(&["127.0.22.1", "127.0.22.2"])
    );

    // Edited while the resolver is down: cache-1 gone, cache-2 moved, cache-3 new.
    r.stop();
    let new2 = entry("cache", "cache-2", "127.0.22.12", 6379, &["moved"]);
    let new3 = entry("cache", "cache-3", "127.0.22.3", 6379, &[]);
    write_file(&path, &format!("{new2}{new3}"));
    r.restart_stopped();
    // Applied before serving: the stored registrations do not linger.
    assert_eq!(
        dns::a_records(r.dns, "cache.mesh.internal.").await,
        ips(&["127.0.22.12", "127.0.22.3"])
    );
    assert_eq!(api.registered_ids().await, ["cache-2", "cache-3"]);
    assert_eq!(
        dns::a_records(r.dns, "moved.cache.mesh.internal.").await,
        ips(&["127.0.22.12"])
    );

    // And after a crash, the same.
    r.kill();
    write_file(&path, &new3);
    r.restart_stopped();
    assert_eq!(
        dns::a_records(r.dns, "cache.mesh.internal.").await,
        ips(&["127.0.22.3"])
    );
    assert_eq!(api.registered_ids().await, ["cache-3"]);
}
