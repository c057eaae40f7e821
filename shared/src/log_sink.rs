//! The process's stderr, as one ordered sink of log lines.
//!
//! Two kinds of lines share it:
//! - **buffered** lines (the gateway's access log): appended to a 64 KiB buffer, written
//!   when the buffer is full, when a second has passed (a flusher thread), before any
//!   urgent line, and at exit. One `write` per 64 KiB instead of one per request, as nginx's
//!   `access_log ... buffer=64k flush=1s`.
//! - **urgent** lines (everything `tracing` logs): written at once, after whatever is
//!   buffered, so the stream keeps the order in which lines were made.
//!
//! Lines are written whole under one lock, so lines from different threads never
//! interleave. A write that fails (stderr closed) drops the lines: logging never stops
//! the process. `std::process::exit` runs no destructors, so a process calls
//! [`Sink::flush`] before it exits (any urgent line flushes too); a `SIGKILL` loses at most
//! a second of buffered lines.
//!
//! [`timestamp`] formats the time that starts an access line (RFC 3339, UTC,
//! milliseconds), cached per second so a line costs no calendar arithmetic.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Buffered lines are written once this many bytes are waiting.
pub const BUFFER_BYTES: usize = 64 * 1024;
/// Buffered lines wait at most about this long.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// The sink: what waits to be written.
pub struct Sink {
    pending: Mutex<Vec<u8>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();
static FLUSHER: Once = Once::new();

/// The process's sink.
pub fn sink() -> &'static Sink {
    SINK.get_or_init(|| Sink {
        pending: Mutex::new(Vec::with_capacity(BUFFER_BYTES)),
    })
}

impl Sink {
    /// Appends a buffered line (`line` ends with a newline). Starts the flusher on first
    /// use.
    pub fn buffered(&self, line: &[u8]) {
        FLUSHER.call_once(|| {
            let started = std::thread::Builder::new()
                .name("log-flush".into())
                .spawn(|| loop {
                    std::thread::sleep(FLUSH_INTERVAL);
                    sink().flush();
                });
            if let Err(e) = started {
                // Lines are still written when the buffer fills and before other lines.
                eprintln!("waymark: no log flusher thread: {e}");
            }
        });
        let mut pending = self.lock();
        pending.extend_from_slice(line);
        if pending.len() >= BUFFER_BYTES {
            write_out(&mut pending);
        }
    }

    /// Writes what is buffered, then `line`, now.
    pub fn urgent(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.is_empty() {
            let _ = std::io::stderr().lock().write_all(line);
        } else {
            pending.extend_from_slice(line);
            write_out(&mut pending);
        }
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        let mut pending = self.lock();
        if !pending.is_empty() {
            write_out(&mut pending);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn write_out(pending: &mut Vec<u8>) {
    let _ = std::io::stderr().lock().write_all(pending);
    pending.clear();
}

/// A `tracing` writer: each event it formats is one urgent write.
#[derive(Default)]
pub struct UrgentWriter {
    event: Vec<u8>,
}

impl Write for UrgentWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.event.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.event.is_empty() {
            sink().urgent(&self.event);
            self.event.clear();
        }
        Ok(())
    }
}

impl Drop for UrgentWriter {
    fn drop(&mut self) {
        let _ = Write::flush(self);
    }
}

/// Appends the current time, `2026-12-02T17:30:40.123Z`, to `out`.
pub fn timestamp(out: &mut String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != now.as_secs() {
            let (y, mo, d, h, mi, s) = civil(now.as_secs());
            cached.1 = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
            cached.0 = now.as_secs();
        }
        out.push_str(&cached.1);
    });
    let millis = now.subsec_millis();
    out.push('.');
    out.push(char::from(b'0' + (millis / 100) as u8));
    out.push(char::from(b'0' + (millis / 10 % 10) as u8));
    out.push(char::from(b'0' + (millis % 10) as u8));
    out.push('Z');
}

/// Seconds since the epoch as a UTC date and time (the proleptic Gregorian calendar; the
/// days-to-date step is the well-known era arithmetic over 400-year cycles).
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Days since 0000-03-01, so that leap days end each year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day, rest / 3_600, rest % 3_600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let table = [
            (0, (1970, 1, 1, 0, 0, 0)),
            (951_782_400, (2000, 2, 29, 0, 0, 0)),
            (951_868_799, (2000, 2, 29, 23, 59, 59)),
            (1_709_210_096, (2024, 2, 29, 12, 34, 56)),
            (1_735_689_599, (2024, 12, 31, 23, 59, 59)),
            (1_796_146_240, (2026, 12, 1, 17, 30, 40)),
            (4_107_542_400, (2100, 3, 1, 0, 0, 0)),
        ];
        for (secs, want) in table {
            assert_eq!(civil(secs), want, "{secs}");
        }
    }

    #[test]
    fn timestamp_shape() {
        let mut s = String::from("x ");
        timestamp(&mut s);
        let t = &s[2..];
        assert_eq!(t.len(), "2026-12-02T17:30:40.123Z".len(), "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.');
        assert!(t.starts_with("20"), "{t}");
    }
}
