use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::load::LogPlan;
use super::record::frame;
use super::*;
use crate::registry::def::Weights;

fn reg(id: &str, port: u16) -> StoredReg {
    StoredReg {
        def: Arc::new(ServiceDef {
            name: "pay".into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port,
            tags: vec![],
            meta: Default::default(),
            weights: Weights::default(),
            checks: vec![],
            tagged_addresses: Default::default(),
            enable_tag_override: false,
            external_node: None,
            eureka: None,
        }),
        source: Source::Api,
        maintenance: None,
        checks: vec![],
        vips: Default::default(),
    }
}

fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
    Store::open(dir, false, Arc::new(Metrics::new()))
}

/// Drops a store and waits until its writer thread let go of the lock.
fn close(store: Store, dir: &Path) {
    drop(store);
    for _ in 0..500 {
        let lock = File::options().write(true).open(dir.join(LOCK)).unwrap();
        if lock.try_lock().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the writer thread never stopped");
}

fn ids(loaded: &Loaded) -> Vec<(String, u16)> {
    loaded
        .registrations
        .iter()
        .map(|r| (r.def.id.to_string(), r.def.port))
        .collect()
}

#[tokio::test]
async fn writes_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, loaded) = open(dir.path()).unwrap();
    assert!(loaded.registrations.is_empty());
    store.put(1, &reg("a", 1)).wait().await.unwrap();
    store.put(2, &reg("b", 1)).wait().await.unwrap();
    store.put(3, &reg("a", 2)).wait().await.unwrap();
    store.delete(4, "b").wait().await.unwrap();
    close(store, dir.path());
    let (_store, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.index, 4);
    assert_eq!(loaded.registrations, vec![reg("a", 2)]);
    // Created at 1, last changed at 3; b is gone with its indexes.
    assert_eq!(loaded.indexes, Indexes::from([("a".to_string(), [1, 3])]));
}

async fn compacted(store: &Store) {
    for _ in 0..1000 {
        if !store.compacting() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the compaction never finished");
}

#[tokio::test]
async fn compaction_keeps_everything_and_the_log_follows_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path()).unwrap();
    store.put(1, &reg("a", 1)).wait().await.unwrap();
    store.compact(
        1,
        vec![Arc::new(reg("a", 1))],
        Indexes::from([("a".to_string(), [1, 1])]),
    );
    // Written while the snapshot is: it stays in the rewritten log.
    store.put(2, &reg("b", 1)).wait().await.unwrap();
    compacted(&store).await;
    store.put(3, &reg("c", 1)).wait().await.unwrap();
    assert_eq!(store.records_since_compaction(), 2);
    close(store, dir.path());
    let log = fs::read_to_string(dir.path().join(LOG)).unwrap();
    assert!(
        log.lines()
            .next()
            .unwrap()
            .ends_with(r#"{"op":"begin","after":1}"#),
        "{log}"
    );
    assert_eq!(log.lines().count(), 3, "{log}");
    let (_s, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.index, 3);
    assert_eq!(
        ids(&loaded),
        [("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]
    );
    // The snapshot's indexes, then the log's.
    assert_eq!(
        loaded.indexes,
        Indexes::from([
            ("a".to_string(), [1, 1]),
            ("b".to_string(), [2, 2]),
            ("c".to_string(), [3, 3]),
        ])
    );
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path()).unwrap();
    store.put(1, &reg("a", 1)).wait().await.unwrap();
    close(store, dir.path());
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(LOG))
        .unwrap();
    f.write_all(br#"0badc0de {"op":"put","index":2,"reg":{"def""#)
        .unwrap();
    drop(f);
    let (store, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.registrations, vec![reg("a", 1)]);
    store.put(2, &reg("b", 1)).wait().await.unwrap();
    close(store, dir.path());
    let (_s, loaded) = open(dir.path()).unwrap();
    assert_eq!(
        loaded.registrations.len(),
        2,
        "appends after a cut line parse"
    );
}

#[test]
fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path()).unwrap();
    assert!(matches!(open(dir.path()), Err(StoreError::Locked(_))));
}

#[tokio::test]
async fn files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a/b/data");
    let (store, _) = open(&data).unwrap();
    store.put(1, &reg("a", 1)).wait().await.unwrap();
    store.compact(1, vec![Arc::new(reg("a", 1))], Indexes::new());
    compacted(&store).await;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&dir.path().join("a")), 0o700);
    for f in [SNAPSHOT, LOG, LOCK] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
}

/// Framed log lines: a begin record, then puts of `ids` with indexes from `after + 1`.
fn log_lines(after: u64, ids: &[&str]) -> Vec<Vec<u8>> {
    let mut lines = vec![frame(
        format!(r#"{{"op":"begin","after":{after}}}"#).as_bytes(),
    )];
    for (n, id) in ids.iter().enumerate() {
        lines.push(record::encode(&Record::Put {
            index: after + 1 + n as u64,
            reg: &reg(id, 1),
        }));
    }
    lines
}

fn snapshot(index: u64, ids: &[&str]) -> Vec<u8> {
    let regs: Vec<StoredReg> = ids.iter().map(|id| reg(id, 1)).collect();
    serde_json::to_vec(&Snapshot {
        index,
        registrations: regs,
        indexes: Indexes::new(),
    })
    .unwrap()
}

/// A data dir with these files; `None` leaves a file out.
fn dir_with(snap: Option<Vec<u8>>, log: Option<Vec<u8>>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some(s) = snap {
        fs::write(dir.path().join(SNAPSHOT), s).unwrap();
    }
    if let Some(l) = log {
        fs::write(dir.path().join(LOG), l).unwrap();
    }
    dir
}

fn offset_of_line(lines: &[Vec<u8>], n: usize) -> u64 {
    lines[..n].iter().map(|l| l.len() as u64).sum()
}

#[test]
fn only_a_consistent_data_dir_loads() {
    let good = log_lines(2, &["c", "d"]);
    let mut flipped = good.clone();
    let at = flipped[1].len() - 5;
    flipped[1][at] ^= 0x01;
    let mut torn = good.clone();
    torn.push(good[1][..20].to_vec());
    let mut bad_crc_tail = good.clone();
    let mut last = log_lines(4, &["e"])[1].clone();
    let n = last.len();
    last[n - 3] ^= 0x01;
    bad_crc_tail.push(last);
    let mut huge = good.clone();
    huge.push(frame(
        br#"{"op":"delete","index":18446744073709551615,"id":"c"}"#,
    ));
    let mut skipped = log_lines(2, &["c", "d"]);
    skipped.remove(1); // the log jumps from its begin (2) to index 4
    let legacy = format!(
        "{}\n{}\n",
        r#"{"op":"put","index":3,"reg":{"def":{"name":"pay","id":"c","address":"127.0.0.1","port":1},"source":"api"}}"#,
        r#"{"op":"delete","index":4,"id":"a"}"#
    );
    let legacy_wrap = format!(
        "{}\n{}\n",
        r#"{"op":"delete","index":3,"id":"a"}"#,
        r#"{"op":"delete","index":18446744073709551615,"id":"b"}"#
    );
    let cat = |lines: &[Vec<u8>]| lines.concat();

    type Want = Result<(u64, Vec<&'static str>), (&'static str, u64)>;
    type File = Option<Vec<u8>>;
    let cases: Vec<(&str, File, File, Want)> = vec![
        ("fresh", None, None, Ok((0, vec![]))),
        (
            "snapshot and its log",
            Some(snapshot(2, &["a", "b"])),
            Some(cat(&good)),
            Ok((4, vec!["a", "b", "c", "d"])),
        ),
        (
            "a log from before the snapshot (compaction cut short) skips what it covers",
            Some(snapshot(3, &["a", "c"])),
            Some(cat(&good)),
            Ok((4, vec!["a", "c", "d"])),
        ),
        (
            "a torn tail is cut",
            Some(snapshot(2, &["a"])),
            Some(cat(&torn)),
            Ok((4, vec!["a", "c", "d"])),
        ),
        (
            "a last record that fails its checksum is a torn tail",
            Some(snapshot(2, &["a"])),
            Some(cat(&bad_crc_tail)),
            Ok((4, vec!["a", "c", "d"])),
        ),
        (
            "legacy log",
            Some(snapshot(2, &["a", "b"])),
            Some(legacy.clone().into_bytes()),
            Ok((4, vec!["b", "c"])),
        ),
        ("missing snapshot", None, Some(cat(&good)), Err((LOG, 0))),
        (
            "snapshot older than the log",
            Some(snapshot(1, &["a"])),
            Some(cat(&good)),
            Err((LOG, 0)),
        ),
        (
            "log that ends before its snapshot",
            Some(snapshot(9, &["a"])),
            Some(cat(&good)),
            Err((LOG, offset_of_line(&good, 3))),
        ),
        (
            "missing log",
            Some(snapshot(2, &["a"])),
            None,
            Err((LOG, 0)),
        ),
        (
            "damage in the middle",
            Some(snapshot(2, &["a"])),
            Some(cat(&flipped)),
            Err((LOG, offset_of_line(&good, 1))),
        ),
        (
            "a crafted huge index",
            Some(snapshot(2, &["a"])),
            Some(cat(&huge)),
            Err((LOG, offset_of_line(&good, 3))),
        ),
        (
            "a skipped index",
            Some(snapshot(2, &["a"])),
            Some(cat(&skipped)),
            Err((LOG, offset_of_line(&skipped, 1))),
        ),
        (
            "a snapshot index that would wrap",
            Some(snapshot(u64::MAX, &["a"])),
            Some(cat(&log_lines(u64::MAX, &[]))),
            Err((SNAPSHOT, 0)),
        ),
        (
            "an unreadable snapshot",
            Some(b"{\"index\":2,\"registrations\":[{\"def\":".to_vec()),
            Some(cat(&good)),
            Err((SNAPSHOT, 34)),
        ),
        (
            "a crafted legacy index",
            Some(snapshot(2, &["a", "b"])),
            Some(legacy_wrap.into_bytes()),
            Err((LOG, 35)),
        ),
    ];
    for (name, snap, log, want) in cases {
        let dir = dir_with(snap, log);
        let got = match load::load(dir.path(), false) {
            Ok((loaded, _)) => Ok((
                loaded.index,
                loaded
                    .registrations
                    .iter()
                    .map(|r| r.def.id.to_string())
                    .collect::<Vec<_>>(),
            )),
            Err(StoreError::Inconsistent { path, offset, .. }) => Err((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                offset,
            )),
            Err(e) => panic!("{name}: {e}"),
        };
        let want = want
            .map(|(i, ids)| (i, ids.iter().map(|s| s.to_string()).collect()))
            .map_err(|(f, o)| (f.to_string(), o));
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn what_to_do_with_the_log() {
    let good = log_lines(0, &["a"]);
    let cases = [
        ("fresh", None, None, LogPlan::Rewrite { snapshot: false }),
        (
            "framed",
            None,
            Some(good.concat()),
            LogPlan::Keep {
                len: good.concat().len() as u64,
            },
        ),
        (
            "legacy: rewritten framed",
            None,
            Some(b"{\"op\":\"delete\",\"index\":1,\"id\":\"a\"}\n".to_vec()),
            LogPlan::Rewrite { snapshot: true },
        ),
    ];
    for (name, snap, log, want) in cases {
        let dir = dir_with(snap, log);
        let (_, plan) = load::load(dir.path(), false).unwrap();
        assert_eq!(plan, want, "{name}");
    }
}

#[test]
fn the_refusal_names_the_file_the_offset_and_the_way_out() {
    let mut lines = log_lines(0, &["a", "b", "c"]);
    lines[2][12] ^= 0x01;
    let dir = dir_with(None, Some(lines.concat()));
    let e = match open(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a damaged log was accepted"),
    };
    assert!(
        e.contains(&dir.path().join(LOG).display().to_string()),
        "{e}"
    );
    assert!(
        e.contains(&format!("at byte {}", offset_of_line(&lines, 2))),
        "{e}"
    );
    assert!(e.contains("--recover-readable"), "{e}");
    assert!(e.contains("checksum"), "{e}");
}

#[tokio::test]
async fn recovery_keeps_what_is_readable_and_sets_the_damage_aside() {
    let mut lines = log_lines(2, &["c", "d", "e"]);
    lines[2][15] ^= 0x01; // d's record
    let dir = dir_with(Some(snapshot(2, &["a"])), Some(lines.concat()));
    let (store, loaded) = Store::open(dir.path(), true, Arc::new(Metrics::new())).unwrap();
    assert_eq!(ids(&loaded), [("a".into(), 1), ("c".into(), 1)]);
    // c was index 3; d and e (two lines dropped) may have been 4 and 5: never go back.
    assert_eq!(loaded.index, 5);
    let aside: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    assert_eq!(aside.len(), 2, "{aside:?}");
    let kept_log = aside.iter().find(|n| n.starts_with(LOG)).unwrap();
    assert_eq!(fs::read(dir.path().join(kept_log)).unwrap(), lines.concat());
    store.put(6, &reg("f", 1)).wait().await.unwrap();
    close(store, dir.path());
    // What recovery wrote is consistent: it loads without the flag.
    let (_s, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.index, 6);
    assert_eq!(loaded.registrations.len(), 3);
}

#[tokio::test]
async fn a_legacy_data_dir_is_upgraded() {
    let legacy = format!(
        "{}\n{}\n",
        r#"{"op":"put","index":3,"reg":{"def":{"name":"pay","id":"c","address":"127.0.0.1","port":1},"source":"api"}}"#,
        r#"{"op":"delete","index":3,"id":"a"}"#
    );
    let dir = dir_with(Some(snapshot(2, &["a", "b"])), Some(legacy.into_bytes()));
    let (store, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.index, 3);
    assert_eq!(ids(&loaded), [("b".into(), 1), ("c".into(), 1)]);
    store.put(4, &reg("d", 1)).wait().await.unwrap();
    close(store, dir.path());
    let (_s, loaded) = open(dir.path()).unwrap();
    assert_eq!(loaded.index, 4);
    assert_eq!(loaded.registrations.len(), 3);
}

/// A sink that records what the writer told it and discards as the registry does.
#[derive(Default)]
struct Recorder {
    store: OnceLock<Store>,
    durable: Mutex<Vec<u64>>,
}

impl Sink for Recorder {
    fn durable(&self, index: u64) {
        self.durable.lock().unwrap().push(index);
    }
    fn failed(&self, _: &str) {
        self.store.get().unwrap().discard_queued();
    }
}

#[tokio::test]
async fn the_sink_hears_of_each_durable_batch_in_order_before_the_writes_are_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path()).unwrap();
    let sink = Arc::new(Recorder::default());
    let _ = sink.store.set(store.clone());
    store.attach(sink.clone());
    let pending: Vec<Pending> = (1..=50)
        .map(|i| store.put(i, &reg("a", i as u16)))
        .collect();
    for p in pending {
        p.wait().await.unwrap();
    }
    let durable = sink.durable.lock().unwrap().clone();
    assert_eq!(durable.last(), Some(&50));
    assert!(durable.windows(2).all(|w| w[0] < w[1]), "{durable:?}");
    assert!(store.status().is_ok());
}
