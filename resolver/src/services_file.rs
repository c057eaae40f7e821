//! Third-party registration: a TOML file of instances that cannot register themselves,
//! registered on their behalf and kept in step with the file.
//!
//! ```toml
//! [[service]]
//! name = "legacy-db"
//! id = "legacy-db-1"
//! address = "127.0.0.1"
//! port = 5432
//! tags = ["primary"]
//! [[service.check]]
//! tcp = "127.0.0.1:5432"
//! interval = "5s"
//! ```
//!
//! The file is checked every `reload_interval`; when its contents change, new and changed
//! entries are registered and entries no longer in it are deregistered. A file that does not
//! parse is reported and changes nothing: the last good state stays.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::registry::def::ServiceDef;
use crate::registry::{Registry, RegistryError};
use crate::store::Source;

#[derive(Debug, thiserror::Error)]
pub enum ServicesFileError {
    #[error("cannot read services file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid services file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("services file {path}: {source}")]
    Registry {
        path: PathBuf,
        source: RegistryError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContents {
    #[serde(default)]
    service: Vec<ServiceDef>,
}

/// Parses and checks the file's text: every entry valid, no ID twice.
pub fn parse(path: &Path, text: &str) -> Result<Vec<ServiceDef>, ServicesFileError> {
    let invalid = |message: String| ServicesFileError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let contents: FileContents = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut checks_seen = BTreeSet::new();
    let mut defs = Vec::new();
    for (n, def) in contents.service.into_iter().enumerate() {
        let def = def
            .normalize()
            .map_err(|e| invalid(format!("service #{}: {e}", n + 1)))?;
        if def.eureka.is_some() {
            return Err(invalid(format!(
                "service #{}: `eureka` is kept for Eureka registrations, not set in a file",
                n + 1
            )));
        }
        if !seen.insert(def.id.clone()) {
            return Err(invalid(format!("service ID {:?} appears twice", def.id)));
        }
        // Check IDs are unique across the registry: two entries sharing one would fail
        // half-way through `apply`, leaving the file half applied.
        for check in &def.checks {
            if !checks_seen.insert(check.id.clone()) {
                return Err(invalid(format!("check ID {:?} appears twice", check.id)));
            }
        }
        defs.push(def);
    }
    Ok(defs)
}

/// Brings the registry in step with the file's entries.
pub async fn apply(
    registry: &Registry,
    path: &Path,
    defs: Vec<ServiceDef>,
) -> Result<(), ServicesFileError> {
    let wrap = |source| ServicesFileError::Registry {
        path: path.to_path_buf(),
        source,
    };
    let wanted: BTreeSet<String> = defs.iter().map(|d| d.id.to_string()).collect();
    // Removals first: an entry renamed in the file may keep its check IDs, which stay taken
    // until the old entry is gone.
    for id in registry.ids_from(Source::File) {
        if !wanted.contains(&id) {
            registry.deregister(&id).await.map_err(wrap)?;
        }
    }
    // Every entry that can be registered is, even when another one fails (its check ID is
    // taken by an API registration, say); the first failure is returned and the rest logged.
    let mut first_error = None;
    for def in defs {
        let current = registry.definition(&def.id);
        if current.as_ref() != Some(&(def.clone(), Source::File)) {
            let id = def.id.clone();
            if let Err(e) = registry.register(def, Source::File).await {
                tracing::warn!(id = %id, error = %e, "services file entry not registered");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), |e| Err(wrap(e)))
}

/// Reads and checks the file without registering anything (`check-config`); returns the
/// number of entries.
pub fn check(path: &Path) -> Result<usize, ServicesFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServicesFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(path, &text)?.len())
}

/// Loads the file once; returns its contents' fingerprint for [`watch`].
pub async fn load(registry: &Registry, path: &Path) -> Result<String, ServicesFileError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| ServicesFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let defs = parse(path, &text)?;
    let count = defs.len();
    apply(registry, path, defs).await?;
    tracing::info!(path = %path.display(), services = count, "services file loaded");
    Ok(text)
}

/// Re-applies the file whenever its contents change, until the registry goes away.
pub async fn watch(
    registry: Arc<Registry>,
    path: PathBuf,
    interval: Duration,
    mut applied: Option<String>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last problem reported, so a file that stays broken is logged once, not every tick.
    let mut reported: Option<String> = None;
    fn report(reported: &mut Option<String>, problem: String) {
        if reported.as_deref() != Some(problem.as_str()) {
            tracing::error!(error = %problem, "services file not applied; keeping the last good state");
            *reported = Some(problem);
        }
    }
    loop {
        tick.tick().await;
        let text = match tokio::fs::read(&path).await.map(String::from_utf8) {
            Ok(Ok(text)) => text,
            Ok(Err(_)) => {
                report(
                    &mut reported,
                    format!("services file {} is not UTF-8", path.display()),
                );
                continue;
            }
            Err(e) => {
                report(
                    &mut reported,
                    format!("cannot read services file {}: {e}", path.display()),
                );
                continue;
            }
        };
        if applied.as_deref() == Some(text.as_str()) {
            continue;
        }
        // Until it applies cleanly, the file is tried again every tick.
        match load(&registry, &path).await {
            Ok(text) => {
                applied = Some(text);
                reported = None;
            }
            Err(e) => report(&mut reported, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_with_checks() {
        let text = r#"
            [[service]]
            name = "legacy-db"
            id = "db-1"
            address = "127.0.0.1"
            port = 5432
            tags = ["primary"]
            [[service.check]]
            tcp = "127.0.0.1:5432"
            interval = "5s"

            [[service]]
            name = "ledger"
            port = 80
        "#;
        let defs = parse(Path::new("s.toml"), text).unwrap();
        assert_eq!(defs.len(), 2);
        assert_eq!(defs[0].checks[0].interval, Some(Duration::from_secs(5)));
        assert_eq!(defs[0].checks[0].id, "service:db-1");
        assert_eq!(defs[1].id, "ledger");
    }

    #[test]
    fn bad_files_say_why() {
        let err = parse(Path::new("s.toml"), "[[service]]\nname = \"a\"\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        let err = parse(
            Path::new("s.toml"),
            "[[service]]\nname = \"a\"\n[[service]]\nname = \"a\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("twice"), "{err}");
    }
}
