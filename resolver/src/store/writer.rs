//! The store's writer thread: group commit, cutting the log back after a failed write, the
//! probe that notices when the data dir can be written again, and compaction (the snapshot is
//! written on a thread of its own; the writer then rewrites the log to what follows it).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::{fresh_log, write_snapshot, Ack, Indexes, Op, Shared, StoredReg, PROBE};

/// How often a store that cannot write tries again by itself.
const PROBE_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Writer {
    shared: Arc<Shared>,
    log: File,
    /// The log's length up to the end of the last durable record.
    good_len: u64,
    /// Bytes past `good_len` may be in the file (a failed write not yet cut back).
    dirty: bool,
    /// The index of the last durable record.
    last_index: u64,
    /// A compaction under way: its index and the log offset where the records after it begin.
    compaction: Option<(u64, u64)>,
    _lock: File,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        log: File,
        good_len: u64,
        last_index: u64,
        lock: File,
    ) -> Writer {
        Writer {
            shared,
            log,
            good_len,
            dirty: false,
            last_index,
            compaction: None,
            _lock: lock,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::new();
        loop {
            let op = if self.failing() {
                match rx.recv_timeout(PROBE_EVERY) {
                    Ok(op) => op,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                }
            };
            batch.push(op);
            while let Ok(op) = rx.try_recv() {
                batch.push(op);
            }
            self.process(&mut batch);
        }
    }

    fn failing(&self) -> bool {
        self.shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    fn process(&mut self, batch: &mut Vec<Op>) {
        let mut buf = Vec::new();
        let mut acks = Vec::new();
        let mut last = self.last_index;
        let mut flushes = Vec::new();
        for op in batch.drain(..) {
            match op {
                Op::Append {
                    epoch,
                    index,
                    line,
                    ack,
                } => {
                    if epoch != self.epoch() {
                        let _ = ack.send(Err(self.discarded()));
                        continue;
                    }
                    buf.extend_from_slice(&line);
                    acks.push(ack);
                    last = index;
                }
                Op::Flush(ack) => flushes.push(ack),
                Op::Compact {
                    epoch,
                    index,
                    regs,
                    indexes,
                    tx,
                } => {
                    // What the snapshot holds must be durable in the log first.
                    self.commit(&mut buf, &mut acks, last);
                    if epoch == self.epoch() && index == self.last_index {
                        self.start_compaction(index, regs, indexes, tx);
                    } else if self.compaction.is_none() {
                        self.shared.compacting.store(false, Ordering::Release);
                    }
                }
                Op::Compacted { index, result } => {
                    self.commit(&mut buf, &mut acks, last);
                    self.finish_compaction(index, result);
                }
            }
        }
        self.commit(&mut buf, &mut acks, last);
        let result = self.status();
        for ack in flushes {
            let _ = ack.send(result.clone());
        }
    }

    fn status(&self) -> Result<(), String> {
        self.shared.status()
    }

    fn discarded(&self) -> String {
        let why = self.status().err().unwrap_or_default();
        format!("not written: an earlier write failed ({why})")
    }

    /// Writes and fsyncs what is buffered, then has the sink publish it and acknowledges it;
    /// or, when that fails, cuts the log back and has the sink undo everything queued.
    fn commit(&mut self, buf: &mut Vec<u8>, acks: &mut Vec<Ack>, last: u64) {
        if buf.is_empty() {
            return;
        }
        match self.append(buf) {
            Ok(()) => {
                self.last_index = last;
                self.writable();
                if let Some(sink) = self.shared.sink.get() {
                    sink.durable(last);
                }
                for ack in acks.drain(..) {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                let msg = format!(
                    "cannot write to the data dir {}: {e}; the change was not applied",
                    self.shared.dir.display()
                );
                self.fail(&msg);
                let epoch = self.epoch();
                if let Some(sink) = self.shared.sink.get() {
                    sink.failed(&msg);
                }
                if self.epoch() == epoch {
                    // No sink (or one that did not): discard here.
                    self.shared.epoch.fetch_add(1, Ordering::AcqRel);
                }
                for ack in acks.drain(..) {
                    let _ = ack.send(Err(msg.clone()));
                }
            }
        }
        buf.clear();
    }

    /// Appends and fsyncs; on failure, cuts the log back to the last good record.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.cut_back()?;
        self.dirty = true;
        let written =
            std::io::Write::write_all(&mut self.log, buf).and_then(|_| self.log.sync_data());
        match written {
            Ok(()) => {
                self.good_len += buf.len() as u64;
                self.dirty = false;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = self.cut_back() {
                    tracing::error!(error = %cut, "cannot cut the log back after a failed write; will retry before the next write");
                }
                Err(e)
            }
        }
    }

    /// Removes whatever a failed write left past the last good record.
    fn cut_back(&mut self) -> std::io::Result<()> {
        if self.dirty {
            self.log.set_len(self.good_len)?;
            self.log.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    fn fail(&self, msg: &str) {
        tracing::error!(error = msg, "store write failed");
        self.shared.metrics.store_errors.inc();
        self.shared.metrics.store_writable.set(0);
        *self
            .shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(msg.to_string());
    }

    fn writable(&self) {
        let mut failing = self
            .shared
            .failing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if failing.take().is_some() {
            tracing::info!(dir = %self.shared.dir.display(), "the data dir can be written again");
        }
        self.shared.metrics.store_writable.set(1);
    }

    /// While failing: cut the log back if needed and write (and remove) a small file. Success
    /// means writes can succeed again.
    fn probe(&mut self) {
        let path = self.shared.dir.join(PROBE);
        let probed = self.cut_back().and_then(|_| {
            let f = super::create_private(&path)?;
            let written = f.write_all_at(&[0u8; 4096], 0).and_then(|_| f.sync_all());
            drop(f);
            let _ = std::fs::remove_file(&path);
            written
        });
        if probed.is_ok() {
            self.writable();
        }
    }

    fn start_compaction(
        &mut self,
        index: u64,
        regs: Vec<Arc<StoredReg>>,
        indexes: Indexes,
        tx: mpsc::Sender<Op>,
    ) {
        if self.compaction.is_some() {
            return;
        }
        self.compaction = Some((index, self.good_len));
        let dir = self.shared.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("waymark-compact".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let result =
                    write_snapshot(&dir, index, &regs, &indexes).map_err(|e| e.to_string());
                tracing::debug!(registrations = regs.len(), elapsed = ?started.elapsed(), "snapshot written");
                drop(regs);
                let _ = tx.send(Op::Compacted { index, result });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a compaction");
            self.compaction = None;
            self.shared.compacting.store(false, Ordering::Release);
        }
    }

    fn finish_compaction(&mut self, index: u64, result: Result<(), String>) {
        let Some((_, from)) = self.compaction.take().filter(|(i, _)| *i == index) else {
            return;
        };
        let done = result.and_then(|()| self.rewrite_log(index, from).map_err(|e| e.to_string()));
        self.shared.compacting.store(false, Ordering::Release);
        match done {
            Ok(()) => tracing::info!(index, "store compacted"),
            // Nothing is lost: the log still holds every record since the older snapshot.
            Err(e) => self.fail(&format!(
                "cannot compact the data dir {}: {e}",
                self.shared.dir.display()
            )),
        }
    }

    /// Replaces the log with one that follows the snapshot at `after`: the records written
    /// since the compaction began (from `from` on).
    fn rewrite_log(&mut self, after: u64, from: u64) -> std::io::Result<()> {
        self.cut_back()?;
        let mut tail = vec![0; (self.good_len - from) as usize];
        self.log.read_exact_at(&mut tail, from)?;
        let (log, len) = fresh_log(&self.shared.dir, after, &tail)?;
        self.log = log;
        self.good_len = len;
        Ok(())
    }
}
