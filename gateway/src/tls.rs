//! TLS certificates by server name: a directory holds one `<server-name>.crt` (PEM chain) and
//! `<server-name>.key` (PEM private key) pair per name, and the handshake picks the pair whose
//! name equals the client's SNI (case-insensitively). A `*.example.test` name is written as
//! `_wildcard.example.test.crt` and serves one label below `example.test`.
//!
//! The directory is checked for changes (names, sizes, modification times) on an interval and
//! reloaded whole when it changed. A pair that fails to load keeps the certificate it had, so
//! a half-written file never takes a name offline.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadPair { path: PathBuf, reason: String },
    #[error("no <name>.crt / <name>.key pair in {0}")]
    Empty(PathBuf),
}

/// What the directory looked like: (file name, size, mtime) of every `.crt` and `.key` file.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

/// The certificate resolver pingora's rustls acceptor asks at each handshake.
#[derive(Debug)]
pub struct CertStore {
    dir: PathBuf,
    certs: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    seen: std::sync::Mutex<Fingerprint>,
}

impl CertStore {
    /// Loads every pair in `dir`; fails when none loads.
    pub fn load(dir: &Path) -> Result<CertStore, TlsError> {
        let store = CertStore {
            dir: dir.to_path_buf(),
            certs: ArcSwap::from_pointee(HashMap::new()),
            seen: std::sync::Mutex::new(Vec::new()),
        };
        let errors = store.reload()?;
        for e in &errors {
            tracing::error!(error = %e, "TLS certificate not loaded");
        }
        if store.names().is_empty() {
            return Err(errors
                .into_iter()
                .next()
                .unwrap_or_else(|| TlsError::Empty(dir.to_path_buf())));
        }
        Ok(store)
    }

    /// The server names with a certificate, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.certs.load().keys().cloned().collect();
        v.sort();
        v
    }

    fn fingerprint(&self) -> Result<Fingerprint, TlsError> {
        let read = |source| TlsError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut fp = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read)? {
            let entry = entry.map_err(read)?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !(name.ends_with(".crt") || name.ends_with(".key")) {
                continue;
            }
            let meta = entry.metadata().ok();
            fp.push((
                name,
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            ));
        }
        fp.sort();
        Ok(fp)
    }

    /// Reloads when the directory changed since the last look; returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let fp = self.fingerprint()?;
        if *self.seen.lock().unwrap_or_else(|e| e.into_inner()) == fp {
            return Ok(false);
        }
        for e in self.reload()? {
            tracing::error!(error = %e, "TLS certificate not reloaded; keeping the old one");
        }
        tracing::info!(names = ?self.names(), "TLS certificates reloaded");
        Ok(true)
    }

    /// Loads every pair; a pair that fails keeps its previous certificate. Returns the
    /// failures.
    pub fn reload(&self) -> Result<Vec<TlsError>, TlsError> {
        let fp = self.fingerprint()?;
        let stems: BTreeMap<String, ()> = fp
            .iter()
            .filter_map(|(n, _, _)| n.strip_suffix(".crt"))
            .map(|s| (s.to_string(), ()))
            .collect();
        let old = self.certs.load_full();
        let mut next = HashMap::new();
        let mut errors = Vec::new();
        for stem in stems.keys() {
            let name = stem.to_ascii_lowercase();
            let name = match name.strip_prefix("_wildcard.") {
                Some(rest) => format!("*.{rest}"),
                None => name,
            };
            match load_pair(
                &self.dir.join(format!("{stem}.crt")),
                &self.dir.join(format!("{stem}.key")),
            ) {
                Ok(ck) => {
                    next.insert(name, Arc::new(ck));
                }
                Err(e) => {
                    if let Some(prev) = old.get(&name) {
                        next.insert(name, prev.clone());
                    }
                    errors.push(e);
                }
            }
        }
        self.certs.store(Arc::new(next));
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = fp;
        Ok(errors)
    }

    /// The certificate for a server name: exact, else the wildcard one label up.
    pub fn lookup(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = certs.get(&name) {
            return Some(c.clone());
        }
        let (_, parent) = name.split_once('.')?;
        certs.get(&format!("*.{parent}")).cloned()
    }

    /// Checks the directory every `interval` until `stop` turns true.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.reload_if_changed() {
                tracing::error!(error = %e, "TLS directory not readable; keeping the loaded certificates");
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let found = self.lookup(name);
        if found.is_none() {
            tracing::debug!(sni = name, "no certificate for this server name");
        }
        found
    }
}

fn load_pair(crt: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let bad = |reason: String| TlsError::BadPair {
        path: crt.to_path_buf(),
        reason,
    };
    let crt_s = crt.to_string_lossy();
    let key_s = key.to_string_lossy();
    let (certs, key) = pingora::tls::load_certs_and_key_files(&crt_s, &key_s)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no certificate or no key in the files".into()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| bad(format!("unusable private key: {e}")))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| bad(format!("key does not match certificate: {e}")))?;
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), ck.cert.pem()).unwrap();
    }

    #[test]
    fn loads_pairs_by_name_with_wildcards() {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a.test", &["a.test"]);
        write_pair(dir.path(), "_wildcard.b.test", &["*.b.test"]);
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let store = CertStore::load(dir.path()).unwrap();
        assert_eq!(
            store.names(),
            vec!["*.b.test".to_string(), "a.test".to_string()]
        );
        assert!(store.lookup("A.TEST.").is_some());
        assert!(store.lookup("x.b.test").is_some());
        assert!(store.lookup("y.x.b.test").is_none(), "one label only");
        assert!(store.lookup("c.test").is_none());
    }

    #[test]
    fn a_broken_pair_keeps_the_old_certificate_and_an_empty_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            CertStore::load(dir.path()),
            Err(TlsError::Empty(_))
        ));
        write_pair(dir.path(), "a.test", &["a.test"]);
        let store = CertStore::load(dir.path()).unwrap();
        let before = store.lookup("a.test").unwrap();
        std::fs::write(dir.path().join("a.test.crt"), "garbage").unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert!(Arc::ptr_eq(&before, &store.lookup("a.test").unwrap()));
        assert!(!store.reload_if_changed().unwrap(), "nothing changed since");
        // A key that does not match its certificate is refused too.
        write_pair(dir.path(), "c.test", &["c.test"]);
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("c.test.key"), other.serialize_pem()).unwrap();
        let errors = store.reload().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("does not match")),
            "{errors:?}"
        );
        assert!(store.lookup("c.test").is_none());
    }
}
