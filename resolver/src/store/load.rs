//! Reading the data dir at startup, and deciding whether what is there is consistent.
//!
//! The state is the snapshot (if any) plus the log replayed over it. It is consistent when the
//! log follows the snapshot (its `begin` record names the snapshot's index, or an older one and
//! the log reaches the snapshot's index), every record's index is one more than the record
//! before it, and nothing is damaged except, at most, a torn tail: records at the end of the log
//! that are incomplete or fail their checksum, with no good record after them (a write that was
//! never acknowledged). A torn tail is cut off; anything else is an [`StoreError::Inconsistent`]
//! refusal that names the file and the byte offset, unless the caller asked to recover: then
//! the state is what could be read, the files are set aside (renamed with a `.damaged-<time>`
//! suffix), and the caller writes a fresh snapshot and log.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::record::{decode, Format, Record};
use super::{Indexes, Snapshot, StoreError, StoredReg, LOG, SNAPSHOT};

/// The largest change index accepted from disk: far beyond what any registry reaches, and far
/// enough from `u64::MAX` that counting on from it can never wrap.
pub const MAX_INDEX: u64 = i64::MAX as u64;

/// What was on disk at startup.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The change index of the last change persisted.
    pub index: u64,
    pub registrations: Vec<StoredReg>,
    /// Each registration's change indexes, where known (stores written before they were
    /// kept have none for what their snapshot holds).
    pub indexes: Indexes,
}

/// What to do with the log after loading.
#[derive(Debug, PartialEq, Eq)]
pub enum LogPlan {
    /// The log is good: append after its first `len` bytes (a torn tail beyond them is cut).
    Keep { len: u64 },
    /// Start a fresh log after the loaded state, written first as a snapshot when `snapshot`.
    Rewrite { snapshot: bool },
}

/// A problem that makes the data dir inconsistent.
struct Problem {
    path: PathBuf,
    offset: u64,
    what: String,
}

/// The registrations as replayed so far, in first-seen order.
#[derive(Default)]
struct State {
    by_id: HashMap<String, usize>,
    slots: Vec<Option<StoredReg>>,
    indexes: Indexes,
}

impl State {
    /// A registration as of the change at `index` (`None`: from the snapshot, whose indexes
    /// come with it).
    fn put(&mut self, index: Option<u64>, reg: StoredReg) {
        let id = reg.def.id.to_string();
        match self.by_id.get(id.as_str()) {
            Some(&slot) => self.slots[slot] = Some(reg),
            None => {
                self.by_id.insert(id.clone(), self.slots.len());
                self.slots.push(Some(reg));
            }
        }
        if let Some(index) = index {
            let entry = self.indexes.entry(id).or_insert([index, index]);
            entry[1] = index;
        }
    }

    fn delete(&mut self, id: &str) {
        if let Some(slot) = self.by_id.remove(id) {
            self.slots[slot] = None;
        }
        self.indexes.remove(id);
    }

    fn into_loaded(mut self, index: u64) -> Loaded {
        let registrations: Vec<StoredReg> = self.slots.into_iter().flatten().collect();
        self.indexes.retain(|id, _| self.by_id.contains_key(id));
        Loaded {
            index,
            registrations,
            indexes: self.indexes,
        }
    }
}

enum Snap {
    Missing,
    Good { index: u64 },
    Damaged(Problem),
}

/// What reading the log found.
#[derive(Default)]
struct Scan {
    exists: bool,
    format: Option<Format>,
    /// The `begin` record's index (framed logs).
    after: Option<u64>,
    /// The index of the last record applied.
    last: Option<u64>,
    /// The length up to the end of the last good record.
    good_len: u64,
    /// The first bad line or out-of-sequence record.
    problem: Option<Problem>,
    /// Whether the problem is a bad line (rather than a good record out of sequence).
    problem_is_line: bool,
    /// Whether a good record follows the first bad line.
    good_after_problem: bool,
    /// Lines and bytes from the problem on.
    dropped_lines: u64,
    dropped_bytes: u64,
}

/// Loads the data dir; see the module docs for what is consistent and what `recover` does.
pub fn load(dir: &Path, recover: bool) -> Result<(Loaded, LogPlan), StoreError> {
    let snap_path = dir.join(SNAPSHOT);
    let log_path = dir.join(LOG);
    let mut state = State::default();
    let snap = read_snapshot(&snap_path, &mut state)?;
    let snap_index = match &snap {
        Snap::Good { index } => Some(*index),
        _ => None,
    };
    let scan = scan_log(&log_path, &mut state, snap_index)?;

    let mut problem = match snap {
        Snap::Damaged(p) => Some(p),
        _ => None,
    };
    let mut cut = None;
    if let Some(p) = scan.problem {
        if scan.problem_is_line && !scan.good_after_problem {
            cut = Some(p.offset);
        } else if problem.is_none() {
            problem = Some(p);
        }
    }
    if problem.is_none() && scan.format == Some(Format::Framed) {
        let after = scan.after.unwrap_or(0);
        let last = scan.last.unwrap_or(after);
        problem = match snap_index {
            None if after > 0 => Some(Problem {
                path: log_path.clone(),
                offset: 0,
                what: format!(
                    "the log follows a snapshot at index {after}, but {} is missing",
                    snap_path.display()
                ),
            }),
            Some(s) if after > s => Some(Problem {
                path: log_path.clone(),
                offset: 0,
                what: format!(
                    "the log follows a snapshot at index {after}, but the snapshot is at index {s}"
                ),
            }),
            Some(s) if last < s => Some(Problem {
                path: log_path.clone(),
                offset: scan.good_len,
                what: format!("the log ends at index {last}, before its snapshot's index {s}"),
            }),
            _ => None,
        };
    }
    if problem.is_none() && !scan.exists {
        if let Some(s) = snap_index {
            problem = Some(Problem {
                path: log_path.clone(),
                offset: 0,
                what: format!("the log that goes with the snapshot at index {s} is missing"),
            });
        }
    }

    let index = [snap_index, scan.after, scan.last]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
    if let Some(p) = problem {
        if !recover {
            return Err(StoreError::Inconsistent {
                path: p.path,
                offset: p.offset,
                problem: p.what,
            });
        }
        // Counting on past every line that was dropped keeps indexes from going backwards:
        // each dropped line held at most one change.
        let index = (index + scan.dropped_lines).min(MAX_INDEX);
        let mut aside = Vec::new();
        for path in [&snap_path, &log_path] {
            if path.exists() {
                aside.push(set_aside(path)?);
            }
        }
        let loaded = state.into_loaded(index);
        tracing::warn!(
            problem = %p.what,
            file = %p.path.display(),
            offset = p.offset,
            dropped_lines = scan.dropped_lines,
            dropped_bytes = scan.dropped_bytes,
            kept = loaded.registrations.len(),
            index,
            set_aside = ?aside,
            "starting from what was readable: the registrations kept are those in the snapshot \
             (when readable) and the log up to the problem; the dropped lines and anything only \
             in a missing or unreadable snapshot are lost"
        );
        return Ok((loaded, LogPlan::Rewrite { snapshot: true }));
    }
    if let Some(offset) = cut {
        tracing::warn!(
            file = %log_path.display(),
            offset,
            bytes = scan.dropped_bytes,
            "cutting off a torn last record (never acknowledged)"
        );
    }
    let loaded = state.into_loaded(index);
    let plan = match scan.format {
        Some(Format::Framed) => LogPlan::Keep { len: scan.good_len },
        // A fresh dir, an empty log, or one in the legacy format: start a framed log.
        _ => LogPlan::Rewrite {
            snapshot: index > 0 || !loaded.registrations.is_empty(),
        },
    };
    Ok((loaded, plan))
}

fn read_snapshot(path: &Path, state: &mut State) -> Result<Snap, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snap::Missing),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let snap: Snapshot = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Snap::Damaged(Problem {
                path: path.to_path_buf(),
                offset: offset_of(&bytes, e.line(), e.column()),
                what: format!("the snapshot is unreadable: {e}"),
            }))
        }
    };
    if snap.index > MAX_INDEX {
        return Ok(Snap::Damaged(Problem {
            path: path.to_path_buf(),
            offset: 0,
            what: format!("the snapshot's index {} is out of range", snap.index),
        }));
    }
    for reg in snap.registrations {
        state.put(None, reg);
    }
    state.indexes = snap.indexes;
    Ok(Snap::Good { index: snap.index })
}

/// The byte offset of a 1-based line and column.
fn offset_of(bytes: &[u8], line: usize, column: usize) -> u64 {
    let line_start = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(line.saturating_sub(2))
        .map_or(0, |(i, _)| i + 1);
    let start = if line <= 1 { 0 } else { line_start };
    (start + column.saturating_sub(1)).min(bytes.len()) as u64
}

/// Reads the log, replaying its records into `state` until the first problem. Records at or
/// below `snap_index` are already in the snapshot and are not applied again.
fn scan_log(path: &Path, state: &mut State, snap_index: Option<u64>) -> Result<Scan, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(e) => return Err(io(e)),
    };
    let mut scan = Scan {
        exists: true,
        ..Scan::default()
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut offset = 0u64;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)? as u64;
        if n == 0 {
            break;
        }
        let at = offset;
        offset += n;
        if scan.problem.is_some() {
            scan.dropped_lines += 1;
            scan.dropped_bytes += n;
            if decode(&line).is_ok() {
                scan.good_after_problem = true;
            }
            continue;
        }
        let problem = match decode(&line) {
            Ok((record, format)) => match follow(&mut scan, &record, format) {
                Ok(()) => {
                    apply(state, record, snap_index, scan.after.is_some());
                    scan.good_len = offset;
                    None
                }
                Err(what) => Some((what, false)),
            },
            Err(e) => Some((e.to_string(), true)),
        };
        if let Some((what, is_line)) = problem {
            scan.problem = Some(Problem {
                path: path.to_path_buf(),
                offset: at,
                what,
            });
            scan.problem_is_line = is_line;
            scan.dropped_lines = 1;
            scan.dropped_bytes = n;
        }
    }
    Ok(scan)
}

/// Checks that a record may come next; updates what the scan knows.
fn follow(scan: &mut Scan, record: &Record, format: Format) -> Result<(), String> {
    match scan.format {
        None => scan.format = Some(format),
        Some(f) if f != format => return Err("a record in another format than the log's".into()),
        Some(_) => {}
    }
    match (record, format) {
        (Record::Begin { after }, Format::Framed) if scan.good_len == 0 => {
            if *after > MAX_INDEX {
                return Err(format!("the begin record's index {after} is out of range"));
            }
            scan.after = Some(*after);
            return Ok(());
        }
        (Record::Begin { .. }, _) => {
            return Err("a begin record that does not begin the log".into())
        }
        (_, Format::Framed) if scan.after.is_none() => {
            return Err("the log does not start with a begin record".into())
        }
        _ => {}
    }
    let index = record.index().expect("puts and deletes have an index");
    let ok = match (format, scan.last.or(scan.after)) {
        (Format::Framed, Some(prev)) => Some(index) == prev.checked_add(1),
        // Legacy logs: indexes never went down and moved by at most 2 a record.
        (Format::Legacy, Some(prev)) => index >= prev && index - prev <= 2,
        (_, None) => true,
    };
    if !ok || index > MAX_INDEX {
        let prev = scan.last.or(scan.after).unwrap_or(0);
        return Err(format!(
            "a record with index {index} out of sequence (the one before it has {prev})"
        ));
    }
    scan.last = Some(index);
    Ok(())
}

fn apply(state: &mut State, record: Record, snap_index: Option<u64>, framed: bool) {
    // A framed log may begin before its snapshot (a compaction that had not yet rewritten
    // the log): what the snapshot holds is not applied again. Legacy records replay whole.
    if framed && record.index().is_some_and(|i| Some(i) <= snap_index) {
        return;
    }
    match record {
        Record::Begin { .. } | Record::Restart { .. } => {}
        Record::Put { index, reg } => state.put(Some(index), reg),
        Record::Delete { id, .. } => state.delete(&id),
    }
}

/// Renames a file to `<name>.damaged-<unix seconds>` (with `-<n>` when that exists).
fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut target = path.with_file_name(format!("{name}.damaged-{secs}"));
    let mut n = 1;
    while target.exists() {
        target = path.with_file_name(format!("{name}.damaged-{secs}-{n}"));
        n += 1;
    }
    fs::rename(path, &target).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(target)
}
