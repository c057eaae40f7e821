//! The access log: one line per request, in text or JSON, written through the process's
//! buffered [`log_sink`](waymark_shared::log_sink) (64 KiB, flushed every second, before
//! any other log line and at exit), so a request costs a copy into a buffer and not a
//! `write` to stderr.
//!
//! Text:
//! `2026-12-02T17:30:40.123Z 10.0.0.7:51234 "GET api.test/pay HTTP/1.1" 200 route=api.test/pay
//! instance=10.0.0.9:8080 tries=1 0.412ms id=4bf9... trace=0af7...` (one line; ` error="..."`
//! is added when the request failed).
//! JSON: one object per line with the same fields: `time`, `client`, `method`, `host`,
//! `path`, `version`, `status`, `route`, `instance`, `tries`, `duration_ms`, `request_id`,
//! `trace_id`, `error`.

use std::cell::RefCell;
use std::fmt::Write as _;

use serde::Serialize;
use waymark_shared::log_sink;

use crate::config::AccessLog;

/// One request, as the access log tells it.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub client: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub route: &'a str,
    pub instance: &'a str,
    pub tries: usize,
    pub duration_ms: f64,
    pub request_id: &'a str,
    pub trace_id: &'a str,
    pub error: Option<&'a str>,
}

#[derive(Serialize)]
struct Timed<'a> {
    time: &'a str,
    #[serde(flatten)]
    entry: &'a Entry<'a>,
}

/// Formats `entry` as one line (with its newline) into `out`, after the time `now`.
pub fn format(format: AccessLog, now: &str, entry: &Entry<'_>, out: &mut String) {
    match format {
        AccessLog::Off => {}
        AccessLog::Json => {
            let timed = Timed { time: now, entry };
            // Serializing plain strings and numbers into a String cannot fail.
            if let Ok(json) = serde_json::to_string(&timed) {
                out.push_str(&json);
                out.push('\n');
            }
        }
        AccessLog::Text => {
            let e = entry;
            let _ = write!(
                out,
                "{now} {} \"{} {}{} {}\" {} route={} instance={} tries={} {:.3}ms id={} trace={}",
                e.client,
                e.method,
                e.host,
                e.path,
                e.version,
                e.status,
                e.route,
                e.instance,
                e.tries,
                e.duration_ms,
                e.request_id,
                e.trace_id,
            );
            if let Some(error) = e.error {
                let _ = write!(out, " error={error:?}");
            }
            out.push('\n');
        }
    }
}

/// How a version is written in the line.
pub fn version_str(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// Logs `entry`: formatted into a per-thread buffer, then appended to the sink.
pub fn log(format: AccessLog, entry: &Entry<'_>) {
    if format == AccessLog::Off {
        return;
    }
    thread_local! {
        static LINE: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
    }
    LINE.with(|bufs| {
        let mut bufs = bufs.borrow_mut();
        let (now, line) = &mut *bufs;
        now.clear();
        line.clear();
        log_sink::timestamp(now);
        self::format(format, now, entry, line);
        log_sink::sink().buffered(line.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(error: Option<&str>) -> Entry<'_> {
        Entry {
            client: "10.0.0.7:51234",
            method: "GET",
            host: "api.test",
            path: "/pay",
            version: "HTTP/1.1",
            status: 503,
            route: "api.test/pay",
            instance: "",
            tries: 2,
            duration_ms: 1.5,
            request_id: "r1",
            trace_id: "t1",
            error,
        }
    }

    #[test]
    fn text_lines() {
        let table = [
            (
                None,
                "2026-12-02T17:30:40.123Z 10.0.0.7:51234 \"GET api.test/pay HTTP/1.1\" 503 route=api.test/pay instance= tries=2 1.500ms id=r1 trace=t1\n",
            ),
            (
                Some("no \"instance\""),
                "2026-12-02T17:30:40.123Z 10.0.0.7:51234 \"GET api.test/pay HTTP/1.1\" 503 route=api.test/pay instance= tries=2 1.500ms id=r1 trace=t1 error=\"no \\\"instance\\\"\"\n",
            ),
        ];
        for (error, want) in table {
            let mut out = String::new();
            format(
                AccessLog::Text,
                "2026-12-02T17:30:40.123Z",
                &entry(error),
                &mut out,
            );
            assert_eq!(out, want);
        }
    }

    #[test]
    fn json_lines() {
        let mut out = String::new();
        format(
            AccessLog::Json,
            "2026-12-02T17:30:40.123Z",
            &entry(Some("boom")),
            &mut out,
        );
        assert!(
            out.ends_with('\n') && out.matches('\n').count() == 1,
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["time"], "2026-12-02T17:30:40.123Z");
        assert_eq!(v["status"], 503);
        assert_eq!(v["route"], "api.test/pay");
        assert_eq!(v["tries"], 2);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["error"], "boom");
        let mut none = String::new();
        format(AccessLog::Off, "t", &entry(None), &mut none);
        assert!(none.is_empty());
    }
}
