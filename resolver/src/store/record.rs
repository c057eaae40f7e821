//! The log's record format, pure: one record a line, `<crc32 of the JSON, 8 hex digits>
//! <JSON>\n`. JSON never holds a raw newline, so a line is a record; the checksum tells a record
//! that was damaged after it was written (or only partly written) from one that was not.
//!
//! A log starts with a `begin` record naming the index of the snapshot it follows; every other
//! record carries the change index it made, one more than the record before it. Lines without a
//! checksum (plain JSON, as waymark wrote them before) are read as the legacy format.

use serde::{Deserialize, Serialize};

use super::StoredReg;

/// A log record: written from borrowed state (`Record<&StoredReg, &str>`), read back owned.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Record<R = StoredReg, I = String> {
    /// The first record of a log: it follows the snapshot at index `after` (0: no snapshot).
    Begin {
        after: u64,
    },
    Put {
        index: u64,
        reg: R,
    },
    Delete {
        index: u64,
        id: I,
    },
    /// A change that changes no registration: the registry started again. Followers that
    /// resume see the index move, and learn that nothing changed.
    Restart {
        index: u64,
    },
}

impl<R, I> Record<R, I> {
    /// The change index of a put, delete or restart.
    pub fn index(&self) -> Option<u64> {
        match self {
            Record::Begin { .. } => None,
            Record::Put { index, .. }
            | Record::Delete { index, .. }
            | Record::Restart { index } => Some(*index),
        }
    }
}

/// How a line was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// With a checksum.
    Framed,
    /// Plain JSON, no checksum (written before the framed format).
    Legacy,
}

/// Why a line is not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("an incomplete record (no end of line)")]
    Incomplete,
    #[error("a record whose checksum does not match")]
    Checksum,
    #[error("an unreadable record ({0})")]
    Malformed(String),
}

/// Frames one record as a log line.
pub fn encode(record: &Record<&StoredReg, &str>) -> Vec<u8> {
    let json = serde_json::to_vec(record).expect("records serialize");
    frame(&json)
}

/// Frames a JSON record as a log line.
pub fn frame(json: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(json.len() + 10);
    line.extend_from_slice(format!("{:08x} ", crc32fast::hash(json)).as_bytes());
    line.extend_from_slice(json);
    line.push(b'\n');
    line
}

/// Reads one line (with its `\n`, when it has one) back into a record.
pub fn decode(line: &[u8]) -> Result<(Record, Format), LineError> {
    let Some(body) = line.strip_suffix(b"\n") else {
        return Err(LineError::Incomplete);
    };
    if body.first() == Some(&b'{') {
        let record = serde_json::from_slice(body).map_err(|e| malformed(&e))?;
        return Ok((record, Format::Legacy));
    }
    let (crc, json) = match (body.get(..8), body.get(8), body.get(9..)) {
        (Some(crc), Some(b' '), Some(json)) => (crc, json),
        _ => return Err(LineError::Malformed("no checksum".into())),
    };
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or_else(|| LineError::Malformed("no checksum".into()))?;
    if crc32fast::hash(json) != crc {
        return Err(LineError::Checksum);
    }
    let record = serde_json::from_slice(json).map_err(|e| malformed(&e))?;
    Ok((record, Format::Framed))
}

fn malformed(e: &serde_json::Error) -> LineError {
    LineError::Malformed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUT: &str =
        r#"{"op":"put","index":7,"reg":{"def":{"name":"pay","id":"p1"},"source":"api"}}"#;
    const DELETE: &str = r#"{"op":"delete","index":8,"id":"p1"}"#;
    const BEGIN: &str = r#"{"op":"begin","after":6}"#;

    fn framed(json: &str) -> Vec<u8> {
        frame(json.as_bytes())
    }

    #[test]
    fn lines_decode_or_say_why_not() {
        let mut flipped = framed(DELETE);
        let at = flipped.len() - 4;
        flipped[at] ^= 0x01; // inside the JSON: the checksum no longer matches
        let mut bad_crc_digit = framed(DELETE);
        bad_crc_digit[0] = b'x';
        let torn = &framed(PUT)[..30];
        type Want = Result<(Option<u64>, Format), LineError>;
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            ("framed put", framed(PUT), Ok((Some(7), Format::Framed))),
            (
                "framed delete",
                framed(DELETE),
                Ok((Some(8), Format::Framed)),
            ),
            ("begin", framed(BEGIN), Ok((None, Format::Framed))),
            (
                "legacy put",
                format!("{PUT}\n").into_bytes(),
                Ok((Some(7), Format::Legacy)),
            ),
            ("torn", torn.to_vec(), Err(LineError::Incomplete)),
            (
                "no newline",
                framed(PUT)[..framed(PUT).len() - 1].to_vec(),
                Err(LineError::Incomplete),
            ),
            ("flipped bit", flipped, Err(LineError::Checksum)),
            (
                "bad checksum digits",
                bad_crc_digit,
                Err(LineError::Malformed("no checksum".into())),
            ),
            ("zeros", vec![0; 40], Err(LineError::Incomplete)),
            (
                "zeros with a newline",
                [vec![0; 40], vec![b'\n']].concat(),
                Err(LineError::Malformed("no checksum".into())),
            ),
            (
                "empty line",
                b"\n".to_vec(),
                Err(LineError::Malformed("no checksum".into())),
            ),
        ];
        for (name, line, want) in cases {
            let got = decode(&line).map(|(r, f)| (r.index(), f));
            assert_eq!(got, want, "{name}");
        }
        assert!(matches!(
            decode(&framed(r#"{"op":"put","index":"x"}"#)),
            Err(LineError::Malformed(_))
        ));
    }

    #[test]
    fn encoded_records_decode_to_themselves() {
        let line = encode(&Record::Delete { index: 42, id: "a" });
        assert!(line.ends_with(b"\n"));
        assert_eq!(
            decode(&line).unwrap(),
            (
                Record::Delete {
                    index: 42,
                    id: "a".to_string()
                },
                Format::Framed
            )
        );
    }
}
