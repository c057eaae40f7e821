//! Starting only from a consistent data dir, through the real binary: a missing snapshot, a log
//! damaged in the middle and a crafted record index are each a refusal to start (non-zero exit)
//! that names the file, the byte offset and the way out; `--recover-readable` then starts from
//! what is readable with the damaged files set aside, and indexes never go backwards.

use std::path::Path;
use std::time::Duration;

use hickory_proto::rr::{RData, RecordType};
use serde_json::json;
use waymark_e2e::{consul_index, dns, eventually, resolver_refuses, Api, Options, Resolver};

async fn index(api: &Api) -> u64 {
    consul_index(&api.get("/v1/agent/services").await)
}

fn aside(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    names.sort();
    names
}

/// Starts a resolver on `data`; `compact_early` has it compact after 20 log records.
fn start_with(data: &Path, recover: bool, compact_early: bool) -> Resolver {
    Resolver::with(Options {
        data_dir: Some(data.to_path_buf()),
        extra_args: if recover {
            vec!["--recover-readable".into()]
        } else {
            vec![]
        },
        config: compact_early.then(|| "[store]\ncompact_after_records = 20\n".into()),
        ..Options::default()
    })
}

fn start(data: &Path, recover: bool) -> Resolver {
    start_with(data, recover, false)
}

fn refusal(data: &Path) -> String {
    let (code, stderr) = resolver_refuses(&["--data-dir", &data.display().to_string()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--recover-readable"), "{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_is_refused_until_told_to_start_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut r = start_with(&data, false, true);
    let api = Api::new(&r);
    for n in 0..10 {
        api.register(json!({"Name": "m", "ID": format!("m{n}"), "Port": 1}))
            .await;
    }
    // Enough changes for a compaction (at least 20 records, and twice the registrations).
    for n in 0..12 {
        let on = if n % 2 == 0 { "true" } else { "false" };
        let resp = api
            .put_empty(&format!("/v1/agent/service/maintenance/m0?enable={on}"))
            .await;
        assert_eq!(resp.status(), 200);
    }
    let snapshot = data.join("registry.snapshot.json");
    assert!(
        eventually(Duration::from_secs(10), || async { snapshot.exists() }).await,
        "no compaction"
    );
    api.register(json!({"Name": "late", "ID": "late-1", "Port": 1}))
        .await;
    let before = index(&api).await;
    r.stop();

    std::fs::remove_file(&snapshot).unwrap();
    let stderr = refusal(&data);
    assert!(
        stderr.contains(&data.join("registry.log").display().to_string())
            && stderr.contains("at byte 0")
            && stderr.contains("is missing"),
        "{stderr}"
    );
    assert!(aside(&data).is_empty(), "a refusal changes nothing");

    let r = start(&data, true);
    let api = Api::new(&r);
    let ids = api.registered_ids().await;
    assert!(ids.contains(&"late-1".to_string()), "{ids:?}");
    assert!(index(&api).await >= before);
    assert_eq!(aside(&data).len(), 1, "{:?}", aside(&data));
}

/// The byte offset where the `n`th line (0-based) of a file starts.
fn line_start(text: &[u8], n: usize) -> usize {
    text.split_inclusive(|b| *b == b'\n')
        .take(n)
        .map(<[u8]>::len)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_damaged_in_the_middle_is_refused_and_recovery_keeps_what_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut r = start(&data, false);
    let api = Api::new(&r);
    for n in 1..=5 {
        api.register(json!({"Name": "x", "ID": format!("x{n}"), "Port": 1}))
            .await;
    }
    let before = index(&api).await;
    r.stop();

    // One flipped bit in the third registration's record (line 0 is the log's begin record).
    let log = data.join("registry.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let at = line_start(&bytes, 3);
    bytes[at + 20] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();
    let stderr = refusal(&data);
    assert!(
        stderr.contains(&log.display().to_string())
            && stderr.contains(&format!("at byte {at}"))
            && stderr.contains("checksum"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "a refusal changes nothing"
    );

    let mut r = start(&data, true);
    let api = Api::new(&r);
    assert_eq!(api.registered_ids().await, ["x1", "x2"]);
    let recovered = index(&api).await;
    assert!(recovered >= before, "X-Consul-Index {before} → {recovered}");
    assert_eq!(aside(&data).len(), 1, "{:?}", aside(&data));
    api.register(json!({"Name": "x", "ID": "x6", "Port": 1}))
        .await;
    assert_eq!(index(&api).await, recovered + 1);
    // What recovery left is consistent: a plain start takes it.
    r.stop();
    let r = start(&data, false);
    let api = Api::new(&r);
    assert_eq!(api.registered_ids().await, ["x1", "x2", "x6"]);
}

async fn soa_serial(r: &Resolver) -> u32 {
    let m = dns::udp(r.dns, "mesh.internal.", RecordType::SOA).await;
    match m.answers[0].data {
        RData::SOA(ref soa) => soa.serial,
        ref other => panic!("not an SOA: {other:?}"),
    }
}

/// The attack from the field: a data dir in the format earlier versions wrote (plain JSON
/// lines), with a record index near `u64::MAX` that would wrap the index to 0 on the next
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_record_index_never_wraps_the_change_index() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("registry.snapshot.json"),
        r#"{"index":5,"registrations":[]}"#,
    )
    .unwrap();
    let put = |index: u64, id: &str| {
        format!(
            r#"{{"op":"put","index":{index},"reg":{{"def":{{"name":"y","id":"{id}","address":"127.0.30.1","port":1}},"source":"api"}}}}"#
        )
    };
    let first = put(6, "y1");
    std::fs::write(
        data.join("registry.log"),
        format!("{first}\n{}\n", put(u64::MAX, "y2")),
    )
    .unwrap();
    let stderr = refusal(&data);
    assert!(
        stderr.contains(&format!("at byte {}", first.len() + 1))
            && stderr.contains("out of sequence"),
        "{stderr}"
    );

    let r = start(&data, true);
    let api = Api::new(&r);
    assert_eq!(api.registered_ids().await, ["y1"]);
    let recovered = index(&api).await;
    assert!((6..100).contains(&recovered), "{recovered}");
    api.register(json!({"Name": "y", "ID": "y3", "Address": "127.0.30.3", "Port": 1}))
        .await;
    let next = index(&api).await;
    assert_eq!(next, recovered + 1);
    assert_eq!(u64::from(soa_serial(&r).await), next);
}
