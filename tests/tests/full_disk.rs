//! A full disk, for real: the resolver's data dir is a 1 MiB tmpfs (in a private mount
//! namespace, so nothing is mounted on the machine), filled up while the resolver runs. A write
//! that cannot be made durable answers 500 and changes nothing anyone can see (API, DNS, the
//! change index, health); the log still ends at a record boundary; readiness and metrics say
//! the store cannot write, and clear by themselves once space returns, when what could not be
//! written (a TTL expiry) is written; and after a crash every acknowledged write is back, none
//! of the failed ones. Needs root (skipped otherwise).

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use waymark_e2e::dns;
use waymark_e2e::{consul_index, ips, is_root, until, Api, Options, PrivateTmpfs, Resolver};

const WAIT: Duration = Duration::from_secs(10);

async fn index(api: &Api) -> u64 {
    consul_index(&api.get("/v1/agent/services").await)
}

async fn rcode(r: &Resolver, name: &str) -> ResponseCode {
    dns::udp(r.dns, name, RecordType::A)
        .await
        .metadata
        .response_code
}

async fn ready(api: &Api) -> (u16, String) {
    let resp = api.get("/healthz/ready").await;
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn metric(api: &Api, name: &str) -> Option<f64> {
    let text = api.get("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn pad_reg(pad: usize) -> Value {
    json!({"Name": "pad", "ID": "pad-1", "Address": "127.0.20.9", "Port": 1,
        "Meta": {"pad": "x".repeat(pad)}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_invisibly_and_recovers_by_itself() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let fs = PrivateTmpfs::mount("1m").expect("a private tmpfs");
    let data = fs.dir.join("data");
    let log = data.join("registry.log");
    let mut r = Resolver::with(Options {
        data_dir: Some(data.clone()),
        wrapper: fs.enter(),
        ..Options::default()
    });
    let api = Api::new(&r);
    api.register(json!({"Name": "a", "ID": "a1", "Address": "127.0.20.1", "Port": 1}))
        .await;
    api.register(
        json!({"Name": "t", "ID": "t1", "Address": "127.0.20.5", "Port": 1,
        "Check": {"CheckID": "t1-ttl", "TTL": "2s", "Status": "passing"}}),
    )
    .await;

    // tmpfs allocates whole pages, so a record that fits in what is left of the log's last
    // page is written however full the disk is. Pad the log to end at a page boundary first.
    let size = || -> u64 {
        let out = fs.sh(&format!("stat -c %s {}", log.display()));
        String::from_utf8_lossy(&out).trim().parse().unwrap()
    };
    let s0 = size();
    api.register(pad_reg(100)).await;
    let overhead = size() - s0 - 100;
    for _ in 0..6 {
        let slack = (4096 - size() % 4096) % 4096;
        if slack < 16 {
            break;
        }
        let pad = if slack > overhead + 1 {
            slack - overhead
        } else {
            slack + 4096 - overhead
        };
        api.register(pad_reg(pad as usize)).await;
    }
    let slack = (4096 - size() % 4096) % 4096;
    assert!(
        slack < 16,
        "could not align the log: {slack} bytes left in its last page"
    );
    fs.sh(&format!(
        "dd if=/dev/zero of={}/fill bs=4096 2>/dev/null; true",
        fs.dir.display()
    ));
    let free = fs.sh(&format!("stat -f -c %a {}", fs.dir.display()));
    assert_eq!(
        String::from_utf8_lossy(&free).trim(),
        "0",
        "the tmpfs is not full"
    );
    // A heartbeat that changes nothing needs no write: t1's TTL now runs out on a full disk.
    assert_eq!(
        api.put_empty("/v1/agent/check/pass/t1-ttl").await.status(),
        200
    );

    // A registration that cannot be written: 500, a clear message, and nowhere to be seen.
    let before = index(&api).await;
    let log_before = fs.sh(&format!("cat {}", log.display()));
    let resp = api
        .put(
            "/v1/agent/service/register",
            json!({"Name": "b", "ID": "b1", "Address": "127.0.20.2", "Port": 1}),
        )
        .await;
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(rcode(&r, "b.mesh.internal.").await, ResponseCode::NXDomain);
    assert_eq!(api.registered_ids().await, ["a1", "pad-1", "t1"]);
    assert_eq!(index(&api).await, before, "the change index moved");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("No space left on device") && msg.contains("not applied"),
        "{msg}"
    );
    let changes: Value = api
        .get(&format!("/v1/waymark/changes?index={before}&wait=100ms"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(changes["services"], json!([]), "{changes}");

    // A deregistration that cannot be written leaves the instance where it was.
    let resp = api.put_empty("/v1/agent/service/deregister/a1").await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        dns::a_records(r.dns, "a.mesh.internal.").await,
        ips(&["127.0.20.1"])
    );
    assert_eq!(api.registered_ids().await, ["a1", "pad-1", "t1"]);
    assert_eq!(index(&api).await, before);

    // Nor does a health change show before it can be written: t1's TTL expires unseen.
    let expired = r#"waymark_health_check_runs_total{kind="ttl",result="critical"}"#;
    until(
        "t1's TTL expired",
        WAIT,
        || metric(&api, expired),
        |n| n.is_some_and(|n| n >= 1.0),
    )
    .await;
    assert_eq!(
        dns::a_records(r.dns, "t.mesh.internal.").await,
        ips(&["127.0.20.5"])
    );
    assert_eq!(index(&api).await, before);

    // Readiness and metrics say so.
    let (status, text) = ready(&api).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("store cannot write"), "{text}");
    assert_eq!(metric(&api, "waymark_store_writable").await, Some(0.0));
    assert!(metric(&api, "waymark_store_errors_total").await >= Some(2.0));

    // A write that gets partly onto the disk (one page free, a record of three) is cut back:
    // the log ends where it ended, at a record boundary.
    fs.sh(&format!("truncate -s -4096 {}/fill", fs.dir.display()));
    let resp = api
        .put(
            "/v1/agent/service/register",
            json!({"Name": "b", "ID": "b2", "Address": "127.0.20.3", "Port": 1,
                "Meta": {"big": "y".repeat(10_000)}}),
        )
        .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(fs.sh(&format!("cat {}", log.display())), log_before);
    assert_eq!(rcode(&r, "b.mesh.internal.").await, ResponseCode::NXDomain);

    // Space returns: the store notices by itself, with no write to make it.
    fs.sh(&format!("rm {}/fill", fs.dir.display()));
    until("ready again", WAIT, || ready(&api), |(s, _)| *s == 200).await;
    assert_eq!(metric(&api, "waymark_store_writable").await, Some(1.0));
    // The expiry is recorded once it can be, and only then leaves DNS.
    until(
        "t1 out of DNS",
        WAIT,
        || dns::a_records(r.dns, "t.mesh.internal."),
        Vec::is_empty,
    )
    .await;
    let before = index(&api).await;

    // The next writes are acknowledged, visible, and (after a crash) still there.
    api.register(json!({"Name": "c", "ID": "c1", "Address": "127.0.20.4", "Port": 1}))
        .await;
    assert_eq!(
        dns::a_records(r.dns, "c.mesh.internal.").await,
        ips(&["127.0.20.4"])
    );
    assert_eq!(
        api.put_empty("/v1/agent/service/deregister/a1")
            .await
            .status(),
        200
    );
    let last = index(&api).await;
    assert_eq!(last, before + 2, "one index per acknowledged change");
    r.kill();
    r.restart_stopped();
    assert_eq!(api.registered_ids().await, ["c1", "pad-1", "t1"]);
    // The restart is a change of its own, so that followers resuming at `last` hear of it.
    until(
        "the restart's index",
        WAIT,
        || index(&api),
        |i| *i == last + 1,
    )
    .await;
    let checks: Value = api.get("/v1/agent/checks").await.json().await.unwrap();
    assert_eq!(checks["t1-ttl"]["Status"], "critical");
    assert_eq!(rcode(&r, "a.mesh.internal.").await, ResponseCode::NXDomain);
    assert_eq!(rcode(&r, "b.mesh.internal.").await, ResponseCode::NXDomain);
    assert_eq!(
        dns::a_records(r.dns, "c.mesh.internal.").await,
        ips(&["127.0.20.4"])
    );
    r.kill();
}
