//! Persistence of the embedded registry in `--data-dir`: a snapshot plus an append-only log.
//!
//! Every change is a whole-registration `put` or a `delete`, appended as a checksummed line
//! ([`record`]) whose change index is one more than the record before it. A write is
//! acknowledged only after the log is fsynced, and concurrent writes share one fsync (group
//! commit, on a thread of its own). Only once a batch is durable does the [`Sink`] (the
//! registry) publish it; when a write fails, the log is cut back to the end of the last good
//! record, the sink is told to undo everything it queued since, and the store reports that it
//! cannot write (readiness, metrics) until a write, or a probe it makes every second, succeeds.
//!
//! From time to time the registry hands over its whole state (shared, copy-on-write records)
//! and a thread of its own writes it as the new snapshot (temp file, fsync, rename, fsync of
//! the directory) while writes go on; then the log is rewritten to hold only the records after
//! the snapshot. Loading ([`load`]) starts only from a consistent state.
//!
//! Files are created 0600 and the data dir 0700: registrations hold check headers and metadata.

pub mod load;
pub mod record;
mod writer;

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::registry::def::ServiceDef;
use crate::registry::vips::VipMap;
use record::{encode, Record};
use waymark_shared::Health;

pub use load::{Loaded, MAX_INDEX};

const SNAPSHOT: &str = "registry.snapshot.json";
const SNAPSHOT_TMP: &str = "registry.snapshot.json.tmp";
const LOG: &str = "registry.log";
const LOG_TMP: &str = "registry.log.tmp";
const PROBE: &str = "probe.tmp";
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
    #[error(
        "{path}: {problem} (at byte {offset}). The data dir is not consistent and was left as it \
         is; to start from what is readable, setting the damaged files aside, run \
         `waymark-resolver serve --recover-readable` with this data dir"
    )]
    Inconsistent {
        path: PathBuf,
        offset: u64,
        problem: String,
    },
    #[error("{0}")]
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
    /// Shared, so that a change of state does not copy the definition.
    pub def: Arc<ServiceDef>,
    pub source: Source,
    /// The maintenance reason while in maintenance (draining).
    #[serde(default)]
    pub maintenance: Option<String>,
    #[serde(default)]
    pub checks: Vec<StoredCheck>,
    /// Its service's VIP and those of its tags (see [`crate::registry::vips`]).
    #[serde(default, skip_serializing_if = "VipMap::is_empty")]
    pub vips: VipMap,
}

/// Each registration's change indexes by ID: `[created, last changed]` (Consul's
/// `CreateIndex` and `ModifyIndex`), kept so that they survive a restart.
pub type Indexes = HashMap<String, [u64; 2]>;

/// The snapshot file: read back owned, written from shared records.
#[derive(Serialize, Deserialize)]
struct Snapshot<R = Vec<StoredReg>, I = Indexes> {
    index: u64,
    registrations: R,
    /// Absent in snapshots written before indexes were kept: those registrations start at
    /// the index of the restart.
    #[serde(default)]
    indexes: I,
}

/// Who publishes what the store made durable: the registry.
pub trait Sink: Send + Sync {
    /// Every record up to `index` is durable; called in index order.
    fn durable(&self, index: u64);
    /// A write failed: none of the records queued but not yet durable will be written. The
    /// sink must undo them and call [`Store::discard_queued`] while holding the lock under
    /// which it queues records, so that nothing queued after the undo is discarded.
    fn failed(&self, error: &str);
}

type Ack = oneshot::Sender<Result<(), String>>;

enum Op {
    Append {
        epoch: u64,
        index: u64,
        line: Vec<u8>,
        ack: Ack,
    },
    Compact {
        epoch: u64,
        index: u64,
        regs: Vec<Arc<StoredReg>>,
        indexes: Indexes,
        /// For the compacting thread to report back (the writer holds no sender itself, so
        /// that it stops once every handle is gone).
        tx: mpsc::Sender<Op>,
    },
    Compacted {
        index: u64,
        result: Result<(), String>,
    },
    Flush(Ack),
}

/// What the handles and the writer thread share.
struct Shared {
    dir: PathBuf,
    /// Records queued under an older epoch are discarded (see [`Sink::failed`]).
    epoch: AtomicU64,
    appended: AtomicU64,
    compacting: AtomicBool,
    /// Why the store cannot write, while it cannot.
    failing: Mutex<Option<String>>,
    sink: OnceLock<Arc<dyn Sink>>,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// `Err` with the reason while the store cannot write.
    fn status(&self) -> Result<(), String> {
        match &*self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// A handle on the store's writer thread.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
}

/// A write that is durable (and published) once [`Pending::wait`] returns `Ok`.
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
    /// With `recover`, an inconsistent data dir is loaded from what is readable (see [`load`]).
    pub fn open(
        dir: &Path,
        recover: bool,
        metrics: Arc<Metrics>,
    ) -> Result<(Store, Loaded), StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK))
            .map_err(io)?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        for leftover in [SNAPSHOT_TMP, LOG_TMP, PROBE] {
            let _ = fs::remove_file(dir.join(leftover));
        }
        let (loaded, plan) = load::load(dir, recover)?;
        let (log, good_len) = match plan {
            load::LogPlan::Keep { len } => {
                let path = dir.join(LOG);
                let io = |source| StoreError::Io {
                    path: path.clone(),
                    source,
                };
                let log = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(&path)
                    .map_err(io)?;
                if log.metadata().map_err(io)?.len() != len {
                    log.set_len(len).map_err(io)?;
                    log.sync_all().map_err(io)?;
                }
                (log, len)
            }
            load::LogPlan::Rewrite { snapshot } => {
                if snapshot {
                    write_snapshot(dir, loaded.index, &loaded.registrations, &loaded.indexes)
                        .map_err(io)?;
                }
                fresh_log(dir, loaded.index, &[]).map_err(io)?
            }
        };
        metrics.store_writable.set(1);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            epoch: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            compacting: AtomicBool::new(false),
            failing: Mutex::new(None),
            sink: OnceLock::new(),
            metrics,
        });
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(shared.clone(), log, good_len, loaded.index, lock);
        std::thread::Builder::new()
            .name("waymark-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok((Store { tx, shared }, loaded))
    }

    /// Sets who publishes durable records and undoes failed ones. Once only.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        let _ = self.shared.sink.set(sink);
    }

    /// Appends a registration's new state at `index`; durable when the [`Pending`] resolves.
    pub fn put(&self, index: u64, reg: &StoredReg) -> Pending {
        self.append(index, &Record::Put { index, reg })
    }

    /// Appends a deregistration at `index`.
    pub fn delete(&self, index: u64, id: &str) -> Pending {
        self.append(index, &Record::Delete { index, id })
    }

    /// Appends a restart (a change index that changes no registration).
    pub fn restart(&self, index: u64) -> Pending {
        self.append(index, &Record::Restart { index })
    }

    fn append(&self, index: u64, record: &Record<&StoredReg, &str>) -> Pending {
        let line = encode(record);
        let (ack, rx) = oneshot::channel();
        self.shared.appended.fetch_add(1, Ordering::Relaxed);
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let _ = self.tx.send(Op::Append {
            epoch,
            index,
            line,
            ack,
        });
        Pending(rx)
    }

    /// Discards every record queued so far and not yet written (see [`Sink::failed`]).
    pub fn discard_queued(&self) {
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Log records written since the last compaction began.
    pub fn records_since_compaction(&self) -> u64 {
        self.shared.appended.load(Ordering::Relaxed)
    }

    /// Whether a compaction is under way.
    pub fn compacting(&self) -> bool {
        self.shared.compacting.load(Ordering::Acquire)
    }

    /// Writes this complete state, as of `index` (the last record queued), as the new
    /// snapshot, on a thread of its own, then drops the log records it covers. The caller
    /// queues this under the same lock as its records, so that the state matches them.
    pub fn compact(&self, index: u64, regs: Vec<Arc<StoredReg>>, indexes: Indexes) {
        self.shared.appended.store(0, Ordering::Relaxed);
        self.shared.compacting.store(true, Ordering::Release);
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        let _ = self.tx.send(Op::Compact {
            epoch,
            index,
            regs,
            indexes,
            tx: self.tx.clone(),
        });
    }

    /// Waits until everything queued so far is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Op::Flush(ack))
            .map_err(|_| StoreError::Stopped)?;
        Pending(rx).wait().await
    }

    /// `Err` with the reason while the store cannot write.
    pub fn status(&self) -> Result<(), String> {
        self.shared.status()
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

/// Creates a file for writing, 0600, replacing any file of that name.
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes a snapshot atomically: temp file, fsync, rename, fsync of the directory.
fn write_snapshot(
    dir: &Path,
    index: u64,
    registrations: impl Serialize,
    indexes: &Indexes,
) -> std::io::Result<()> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, create_private(&tmp)?);
        serde_json::to_writer(
            &mut out,
            &Snapshot {
                index,
                registrations,
                indexes,
            },
        )?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(SNAPSHOT))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces the log, atomically, with one that follows the snapshot at `after` and holds
/// `records` (framed lines). Returns the new log, open for appending, and its length.
fn fresh_log(dir: &Path, after: u64, records: &[u8]) -> std::io::Result<(File, u64)> {
    let tmp = dir.join(LOG_TMP);
    let result = (|| {
        let mut f = create_private(&tmp)?;
        let begin = encode(&Record::Begin { after });
        f.write_all(&begin)?;
        f.write_all(records)?;
        f.sync_all()?;
        drop(f);
        let log = OpenOptions::new().read(true).append(true).open(&tmp)?;
        fs::rename(&tmp, dir.join(LOG))?;
        sync_dir(dir)?;
        Ok((log, (begin.len() + records.len()) as u64))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
