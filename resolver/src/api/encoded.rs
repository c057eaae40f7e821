//! Whole-registry answers (`/v1/agent/services`, `/v1/agent/checks`,
//! `/v1/catalog/services`, the web view's snapshot), encoded once per change index and shared by every reader.
//!
//! At 10,000 services one of these costs tens of milliseconds of CPU to build; a hundred
//! clients polling it must not cost a hundred times that, nor take the threads that serve DNS
//! over TCP and forwarding. So each kind of answer is built at most once per index, by one
//! request while the others wait for it (single flight), on the blocking pool rather than on
//! the async workers, and kept until the index moves.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Mutex;

/// The answers kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AgentServices,
    AgentChecks,
    CatalogServices,
    /// The web view's services ([`super::ui::snapshot`]).
    UiServices,
}

const KINDS: usize = 4;

/// The last encoding of each kind, with the index it was built at.
#[derive(Debug, Default)]
pub struct Encoded {
    slots: [Mutex<Option<(u64, Bytes)>>; KINDS],
}

impl Encoded {
    /// The answer of `kind` at `index` (read before calling, so that what `build` sees is
    /// never older than the index it is filed under): the kept one, or `build`'s, run once
    /// on the blocking pool.
    pub async fn get<F>(&self, kind: Kind, index: u64, build: F) -> Bytes
    where
        F: FnOnce() -> Vec<u8> + Send + 'static,
    {
        let mut slot = self.slots[kind as usize].lock().await;
        if let Some((at, bytes)) = slot.as_ref() {
            if *at == index {
                return bytes.clone();
            }
        }
        let bytes = match tokio::task::spawn_blocking(build).await {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                tracing::error!(error = %e, ?kind, "encoding an answer failed");
                return Bytes::from_static(b"{}");
            }
        };
        *slot = Some((index, bytes.clone()));
        bytes
    }
}

/// Shares one [`Encoded`] between handlers.
pub type Shared = Arc<Encoded>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn built_once_per_index_however_many_ask() {
        let enc = Arc::new(Encoded::default());
        let builds = Arc::new(AtomicUsize::new(0));
        let ask = |index: u64| {
            let (enc, builds) = (enc.clone(), builds.clone());
            tokio::spawn(async move {
                enc.get(Kind::AgentServices, index, move || {
                    builds.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    format!("at {index}").into_bytes()
                })
                .await
            })
        };
        let many: Vec<_> = (0..20).map(|_| ask(7)).collect();
        for t in many {
            assert_eq!(&t.await.unwrap()[..], b"at 7");
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1, "one build for one index");
        assert_eq!(&ask(8).await.unwrap()[..], b"at 8");
        assert_eq!(builds.load(Ordering::SeqCst), 2);
        // Another kind has its own slot.
        let other = enc
            .get(Kind::CatalogServices, 8, || b"catalog".to_vec())
            .await;
        assert_eq!(&other[..], b"catalog");
    }
}
