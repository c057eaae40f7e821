//! The change stream that mirrors (forwarders, gateways) follow.
//!
//! - `GET /v1/waymark/changes?index=N&wait=30s`: long poll. Returns the [`Changes`] since
//!   `N` as soon as there are any (at once when there already are), or an empty batch with
//!   the same index when the wait runs out. Start with `index=0` for the whole state.
//! - `GET /v1/waymark/events?index=N` (or the `Last-Event-ID` header): server-sent events,
//!   one `changes` event per batch, whose `id` is the index to resume from. A reconnect that
//!   sends its last event ID misses nothing: an index older than the change log reaches gets
//!   `reset: true` with the whole state.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use futures::{Stream, StreamExt};
use waymark_shared::Changes;

use super::{with_index, ApiError, ApiState, Blocking};

pub async fn changes(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let blocking = Blocking::parse(&q, state.config.api.max_wait)?;
    blocking
        .wait(&state.mirror, &state.drain, || state.mirror.index())
        .await;
    let changes = state.mirror.changes_since(blocking.index);
    let index = changes.index;
    let body = serde_json::to_value(&changes).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(with_index(&body, index))
}

pub async fn events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let since = match from_header.or_else(|| q.get("index").cloned()) {
        None => 0,
        Some(s) if s.is_empty() => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest(format!("index {s:?} is not a number")))?,
    };
    let mirror = state.mirror.clone();
    let stream = futures::stream::unfold(
        (mirror.subscribe(), since, true),
        move |(mut rx, since, first)| {
            let mirror = mirror.clone();
            async move {
                let due = first && (since == 0 || mirror.index() != since);
                if !due {
                    loop {
                        if rx.changed().await.is_err() {
                            return None;
                        }
                        if mirror.index() != since {
                            break;
                        }
                    }
                }
                let changes: Changes = mirror.changes_since(since);
                let next = changes.index;
                let event = Event::default()
                    .event("changes")
                    .id(next.to_string())
                    .json_data(&changes)
                    .unwrap_or_else(|_| Event::default().comment("encoding failed"));
                Some((Ok(event), (rx, next, false)))
            }
        },
    );
    // The stream ends at shutdown, so the connection can close within the grace period.
    let drain = state.drain.clone();
    let stream = stream.take_until(async move { drain.signaled().await });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
