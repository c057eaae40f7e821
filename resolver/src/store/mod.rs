//! Persistence of the embedded registry in `--data-dir`: a snapshot plus an append-only log.
//!
//! Every change is a whole-registration `put` or a `delete`, appended as a JSON line; a write
//! is acknowledged only after the log is fsynced, and concurrent writes share one fsync (group
//! commit, on a thread of its own). From time to time the registry hands over its whole state
//! and the store writes it as the new snapshot (temp file, fsync, rename, fsync of the
//! directory) and empties the log. Replaying the log over the snapshot is idempotent, so a
//! crash at any point loses nothing that was acknowledged; a torn last line (a write that was
//! never acknowledged) is cut off on load.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::registry::def::ServiceDef;
use waymark_shared::Health;

const SNAPSHOT: &str = "registry.snapshot.json";
const LOG: &str = "registry.log";
const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {0} is in use by another waymark-resolver")]
    Locked(PathBuf),
    #[error("snapshot {path} is unreadable: {source}")]
    Snapshot {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("write failed: {0}")]
    Write(String),
    #[error("the store has stopped")]
    Stopped,
}

/// Where a registration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The registration API.
    Api,
    /// The services file (third-party registration).
    File,
}

/// The last known state of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCheck {
    pub id: String,
    pub status: Health,
    #[serde(default)]
    pub output: String,
}

/// A registration as persisted: its definition and its last known state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredReg {
    pub def: ServiceDef,
    pub source: Source,
    /// The maintenance reason while in maintenance (draining).
    #[serde(default)]
    pub maintenance: Option<String>,
    #[serde(default)]
    pub checks: Vec<StoredCheck>,
}

/// A log record: written from borrowed state (`Record<&StoredReg, &str>`), read back owned.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record<R = StoredReg, I = String> {
    Put { index: u64, reg: R },
    Delete { index: u64, id: I },
}

/// The snapshot file: read back owned, written from borrowed state (any `Serialize` that
/// writes a sequence of [`StoredReg`]-shaped records), so that compacting a large registry
/// does not copy it first.
#[derive(Serialize, Deserialize)]
struct Snapshot<R = Vec<StoredReg>> {
    index: u64,
    registrations: R,
}

/// A [`StoredReg`] written from borrowed parts; serializes exactly like one.
#[derive(Serialize)]
pub struct StoredRegRef<'a> {
    pub def: &'a ServiceDef,
    pub source: Source,
    pub maintenance: &'a Option<String>,
    pub checks: Vec<StoredCheckRef<'a>>,
}

/// A [`StoredCheck`] written from borrowed parts.
#[derive(Serialize)]
pub struct StoredCheckRef<'a> {
    pub id: &'a str,
    pub status: Health,
    pub output: &'a str,
}

/// What was on disk at startup.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The change index of the last change persisted.
    pub index: u64,
    pub registrations: Vec<StoredReg>,
}

enum Op {
    Append(Vec<u8>, Option<oneshot::Sender<Result<(), String>>>),
    Compact(Vec<u8>),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// A handle on the store's writer thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::UnboundedSender<Op>,
    appended: Arc<AtomicU64>,
}

/// A write that is durable once [`Pending::wait`] returns `Ok`.
pub struct Pending(oneshot::Receiver<Result<(), String>>);

impl Pending {
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Write(e)),
            Err(_) => Err(StoreError::Stopped),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the data dir, loads its state and starts the writer thread.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))
            .map_err(io)?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        let loaded = load(dir)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG))
            .map_err(io)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let appended = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            dir: dir.to_path_buf(),
            log,
            _lock: lock,
        };
        std::thread::Builder::new()
            .name("waymark-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok((Store { tx, appended }, loaded))
    }

    /// Appends a registration's new state; durable when the returned [`Pending`] resolves.
    pub fn put(&self, index: u64, reg: &StoredReg) -> Pending {
        self.append(&Record::<_, &str>::Put { index, reg })
    }

    /// Appends a deregistration.
    pub fn delete(&self, index: u64, id: &str) -> Pending {
        self.append(&Record::<&StoredReg, _>::Delete { index, id })
    }

    fn append(&self, record: &Record<&StoredReg, &str>) -> Pending {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let (ack, rx) = oneshot::channel();
        self.appended.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Op::Append(line, Some(ack)));
        Pending(rx)
    }

    /// Log records written since the last snapshot.
    pub fn records_since_compaction(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// Replaces the snapshot with this complete state (a sequence of [`StoredReg`]s, owned or
    /// [`StoredRegRef`]s) and empties the log. The caller must hand over the state as of
    /// every record queued before this call.
    pub fn compact(&self, index: u64, registrations: impl Serialize) {
        let bytes = serde_json::to_vec(&Snapshot {
            index,
            registrations,
        })
        .expect("snapshots serialize");
        self.appended.store(0, Ordering::Relaxed);
        let _ = self.tx.send(Op::Compact(bytes));
    }

    /// Waits until everything queued so far is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Op::Flush(ack))
            .map_err(|_| StoreError::Stopped)?;
        Pending(rx).wait().await
    }
}

struct Writer {
    dir: PathBuf,
    log: File,
    _lock: File,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut acks = Vec::new();
        let mut pending = Vec::new();
        while let Some(op) = rx.blocking_recv() {
            pending.push(op);
            while let Ok(op) = rx.try_recv() {
                pending.push(op);
            }
            let mut result = Ok(());
            let mut buf = Vec::new();
            for op in pending.drain(..) {
                match op {
                    Op::Append(line, ack) => {
                        buf.extend_from_slice(&line);
                        acks.extend(ack);
                    }
                    Op::Flush(ack) => acks.push(ack),
                    Op::Compact(bytes) => {
                        result = result
                            .and_then(|_| self.write_log(&mut buf))
                            .and_then(|_| self.write_snapshot(&bytes));
                    }
                }
            }
            result = result.and_then(|_| self.write_log(&mut buf));
            let result = result.map_err(|e| {
                tracing::error!(error = %e, dir = %self.dir.display(), "store write failed");
                e.to_string()
            });
            for ack in acks.drain(..) {
                let _ = ack.send(result.clone());
            }
        }
    }

    fn write_log(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.log.write_all(buf)?;
        buf.clear();
        self.log.sync_data()
    }

    fn write_snapshot(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{SNAPSHOT}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(SNAPSHOT))?;
        File::open(&self.dir)?.sync_all()?;
        self.log.set_len(0)?;
        self.log.seek(SeekFrom::Start(0))?;
        self.log.sync_all()
    }
}

fn load(dir: &Path) -> Result<Loaded, StoreError> {
    let snap_path = dir.join(SNAPSHOT);
    let mut regs: Vec<StoredReg> = Vec::new();
    let mut index = 0;
    match fs::read(&snap_path) {
        Ok(bytes) => {
            let snap: Snapshot =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Snapshot {
                    path: snap_path.clone(),
                    source,
                })?;
            index = snap.index;
            regs = snap.registrations;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StoreError::Io {
                path: snap_path,
                source,
            })
        }
    }
    let mut by_id: std::collections::HashMap<String, usize> = regs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.def.id.to_string(), i))
        .collect();
    let mut slots: Vec<Option<StoredReg>> = regs.into_iter().map(Some).collect();

    let log_path = dir.join(LOG);
    let io = |source| StoreError::Io {
        path: log_path.clone(),
        source,
    };
    let file = match File::open(&log_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                index,
                registrations: slots.into_iter().flatten().collect(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    let mut reader = BufReader::new(file);
    let mut good_len = 0u64;
    let mut line = Vec::new();
    let mut line_no = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Record>(&line) {
            Ok(Record::Put { index: i, reg }) if complete => {
                index = index.max(i);
                match by_id.get(reg.def.id.as_str()) {
                    Some(&slot) => slots[slot] = Some(reg),
                    None => {
                        by_id.insert(reg.def.id.to_string(), slots.len());
                        slots.push(Some(reg));
                    }
                }
            }
            Ok(Record::Delete { index: i, id }) if complete => {
                index = index.max(i);
                if let Some(slot) = by_id.remove(&id) {
                    slots[slot] = None;
                }
            }
            _ if !complete => {
                tracing::warn!(
                    line = line_no,
                    "cutting off a torn last record (never acknowledged)"
                );
                break;
            }
            _ => {
                tracing::error!(line = line_no, path = %log_path.display(), "skipping a corrupt log record");
            }
        }
        good_len += n as u64;
    }
    drop(reader);
    let f = OpenOptions::new().write(true).open(&log_path).map_err(io)?;
    if f.metadata().map_err(io)?.len() != good_len {
        f.set_len(good_len).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    Ok(Loaded {
        index,
        registrations: slots.into_iter().flatten().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::def::Weights;

    fn reg(id: &str, port: u16) -> StoredReg {
        StoredReg {
            def: ServiceDef {
                name: "pay".into(),
                id: id.into(),
                address: "127.0.0.1".into(),
                port,
                tags: vec![],
                meta: Default::default(),
                weights: Weights::default(),
                checks: vec![],
            },
            source: Source::Api,
            maintenance: None,
            checks: vec![],
        }
    }

    #[test]
    fn borrowed_records_serialize_like_owned_ones() {
        let mut owned = reg("a", 1);
        owned.maintenance = Some("upgrade".into());
        owned.checks.push(StoredCheck {
            id: "service:a".into(),
            status: Health::Warning,
            output: "slow".into(),
        });
        let borrowed = StoredRegRef {
            def: &owned.def,
            source: owned.source,
            maintenance: &owned.maintenance,
            checks: owned
                .checks
                .iter()
                .map(|c| StoredCheckRef {
                    id: &c.id,
                    status: c.status,
                    output: &c.output,
                })
                .collect(),
        };
        assert_eq!(
            serde_json::to_value(&borrowed).unwrap(),
            serde_json::to_value(&owned).unwrap()
        );
    }

    #[tokio::test]
    async fn writes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, loaded) = Store::open(dir.path()).unwrap();
            assert!(loaded.registrations.is_empty());
            store.put(1, &reg("a", 1)).wait().await.unwrap();
            store.put(2, &reg("b", 1)).wait().await.unwrap();
            store.put(3, &reg("a", 2)).wait().await.unwrap();
            store.delete(4, "b").wait().await.unwrap();
        }
        // The writer thread holds the lock until it sees the channel close.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.index, 4);
        assert_eq!(loaded.registrations, vec![reg("a", 2)]);
    }

    #[tokio::test]
    async fn compaction_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put(1, &reg("a", 1)).wait().await.unwrap();
            store.compact(1, vec![reg("a", 1)]);
            store.put(2, &reg("b", 1)).wait().await.unwrap();
            assert_eq!(store.records_since_compaction(), 1);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_s, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.index, 2);
        assert_eq!(loaded.registrations, vec![reg("a", 1), reg("b", 1)]);
    }

    #[tokio::test]
    async fn a_torn_last_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.put(1, &reg("a", 1)).wait().await.unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG))
            .unwrap();
        f.write_all(br#"{"op":"put","index":2,"reg":{"def""#)
            .unwrap();
        drop(f);
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.registrations, vec![reg("a", 1)]);
        store.put(2, &reg("b", 1)).wait().await.unwrap();
        drop(store);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (_s, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(
            loaded.registrations.len(),
            2,
            "appends after a cut line parse"
        );
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
    }
}
