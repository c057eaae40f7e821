//! The store's reader (resolver/src/store/): `record::decode` on every line, and `load` of a
//! data dir holding the input as its snapshot and log.
//!
//! Input: a flags byte (bit 0: there is a snapshot, bit 1: load with recovery), then, with a
//! snapshot, its length (2 bytes, big endian) and bytes; the rest is the log.
//! Invariants: nothing panics; a decoded record re-encodes to a line that decodes to it; a
//! load that succeeds keeps at most the log's length, an index in range and one registration
//! per ID; a load with recovery never refuses (only I/O can fail it).

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use waymark_resolver::store::load::{load, LogPlan};
use waymark_resolver::store::record::{decode, frame, Format, Record};
use waymark_resolver::store::MAX_INDEX;

const SNAPSHOT: &str = "registry.snapshot.json";
const LOG: &str = "registry.log";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (snapshot, log) = if flags & 1 != 0 {
        let Some((len, rest)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let len = (u16::from_be_bytes(*len) as usize).min(rest.len());
        let (s, l) = rest.split_at(len);
        (Some(s), l)
    } else {
        (None, rest)
    };
    let recover = flags & 2 != 0;

    for line in log.split_inclusive(|b| *b == b'\n') {
        if let Ok((record, format)) = decode(line) {
            let json = serde_json::to_vec(&record).expect("a record serializes");
            let again = decode(&frame(&json)).expect("a re-encoded record decodes");
            assert_eq!(again.1, Format::Framed);
            assert_eq!(again.0.index(), record.index());
            if format == Format::Framed {
                assert!(matches!(
                    (&record, &again.0),
                    (Record::Begin { .. }, Record::Begin { .. })
                        | (Record::Put { .. }, Record::Put { .. })
                        | (Record::Delete { .. }, Record::Delete { .. })
                        | (Record::Restart { .. }, Record::Restart { .. })
                ));
            }
        }
    }

    // A fresh dir each time (removed when dropped): recovery renames files within it. In
    // memory when there is a /dev/shm: on disk, runs are several times slower.
    let tmp = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temp dir");
    let dir = tmp.path();
    if let Some(s) = snapshot {
        std::fs::write(dir.join(SNAPSHOT), s).expect("the snapshot writes");
    }
    if !log.is_empty() || flags & 4 != 0 {
        std::fs::write(dir.join(LOG), log).expect("the log writes");
    }
    match load(dir, recover) {
        Ok((loaded, plan)) => {
            assert!(loaded.index <= MAX_INDEX);
            let mut ids = HashSet::new();
            for reg in &loaded.registrations {
                assert!(ids.insert(reg.def.id.clone()), "one registration per ID");
            }
            if let LogPlan::Keep { len } = plan {
                assert!(len as usize <= log.len());
            }
        }
        Err(e) => assert!(!recover, "recovery refused: {e}"),
    }
});
