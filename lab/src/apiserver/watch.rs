//! Watch streams: newline-delimited `{"type":..., "object":...}` events written as a chunked
//! HTTP body, with bookmarks, `timeoutSeconds`, and 410 Gone as an ERROR event.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use super::error::ApiError;
use super::resources::ResourceKind;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{to_view_shared, EventType, Store, StoredEvent};
use super::table;

/// Annotation on the bookmark that ends the initial events of a `sendInitialEvents` watch.
pub const INITIAL_EVENTS_END_ANNOTATION: &str = "k8s.io/initial-events-end";

/// What a watch asks for (the query parameters of a watch call).
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub kind: &'static ResourceKind,
    pub namespace: Option<String>,
    pub label_selector: LabelSelector,
    pub field_selector: FieldSelector,
    /// None or "0": start with synthetic ADDED events for the current objects.
    pub resource_version: Option<String>,
    pub allow_bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Duration,
    pub bookmark_interval: Duration,
    /// Send each object as a one-row `Table` (`kubectl get -w` asks for that).
    pub as_table: bool,
}

struct WatchState {
    store: Arc<Store>,
    req: WatchRequest,
    rx: watch::Receiver<u64>,
    cursor: u64,
    pending: VecDeque<Bytes>,
    deadline: Instant,
    /// When the next bookmark is due; None: no more before the watch ends.
    next_bookmark: Option<Instant>,
    fetch: bool,
    done: bool,
}

/// The last bookmark of a watch comes this long before its deadline, as kube-apiserver's, so
/// that the client watches again from a recent resourceVersion.
const PRE_TIMEOUT_BOOKMARK: Duration = Duration::from_secs(2);

/// When the bookmark after `now` is due, as kube-apiserver's cacher schedules it
/// (`nextBookmarkTime`): one bookmark interval on, or [`PRE_TIMEOUT_BOOKMARK`] before the
/// deadline if that comes first; none once that moment has come (the pre-timeout bookmark is
/// the last).
fn next_bookmark_time(now: Instant, interval: Duration, deadline: Instant) -> Option<Instant> {
    let heartbeat = now + interval;
    let due = match deadline.checked_sub(PRE_TIMEOUT_BOOKMARK) {
        Some(pre) if pre < heartbeat => pre,
        Some(_) => heartbeat,
        None => return None,
    };
    (due > now).then_some(due)
}

fn line(event_type: &str, object: &Value) -> Bytes {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        #[serde(rename = "type")]
        event_type: &'a str,
        object: &'a Value,
    }
    let mut bytes =
        serde_json::to_vec(&Line { event_type, object }).expect("JSON values serialise");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

impl WatchState {
    fn in_scope(&self, ev: &StoredEvent) -> bool {
        ev.key.storage == self.req.kind.storage
            && self
                .req
                .namespace
                .as_deref()
                .is_none_or(|ns| !self.req.kind.namespaced || ev.key.namespace == ns)
    }

    fn matches(&self, object: &Value) -> bool {
        self.req.label_selector.matches_object(object)
            && self.req.field_selector.matches_object(object)
    }

    /// The event a watcher with selectors sees: a change that enters the selection is ADDED,
    /// one that leaves it is DELETED (as the real watch cache does).
    fn render(&self, ev: &StoredEvent) -> Option<Bytes> {
        if !self.in_scope(ev) {
            return None;
        }
        let now = self.matches(&ev.object);
        let (event_type, object) = match ev.event_type {
            EventType::Added => (now.then_some("ADDED")?, ev.object.clone()),
            EventType::Deleted => (now.then_some("DELETED")?, ev.object.clone()),
            EventType::Modified => {
                let before = ev.prev.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => ("MODIFIED", ev.object.clone()),
                    (false, true) => ("ADDED", ev.object.clone()),
                    (true, false) => {
                        let mut gone = (**ev.prev.as_ref().expect("matched")).clone();
                        gone["metadata"]["resourceVersion"] = json!(ev.rv.to_string());
                        ("DELETED", Arc::new(gone))
                    }
                    (false, false) => return None,
                }
            }
        };
        Some(line(event_type, &self.present(object)))
    }

    /// The object as the client asked to see it: the served version, possibly as a Table row.
    fn present(&self, stored: Arc<Value>) -> Arc<Value> {
        let object = to_view_shared(self.req.kind, &stored);
        if !self.req.as_table {
            return object;
        }
        let rv = object
            .pointer("/metadata/resourceVersion")
            .cloned()
            .unwrap_or(json!(""));
        Arc::new(table::list_table(
            self.req.kind,
            std::slice::from_ref(&*object),
            json!({"resourceVersion": rv}),
        ))
    }

    fn bookmark(&self, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": self.cursor.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({INITIAL_EVENTS_END_ANNOTATION: "true"});
        }
        line(
            "BOOKMARK",
            &json!({"kind": self.req.kind.kind, "apiVersion": self.req.kind.api_version(), "metadata": metadata}),
        )
    }

    fn pull(&mut self) {
        match self.store.events_after(self.cursor) {
            Ok((events, cursor)) => {
                for ev in &events {
                    if let Some(b) = self.render(ev) {
                        self.pending.push_back(b);
                    }
                }
                self.cursor = cursor;
            }
            Err(err) => {
                self.pending.push_back(line("ERROR", &err.status()));
                self.done = true;
            }
        }
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some((Ok(b), self));
            }
            if self.done {
                return None;
            }
            if self.fetch {
                self.fetch = false;
                self.pull();
                continue;
            }
            let bookmark_at = self.next_bookmark.filter(|_| self.req.allow_bookmarks);
            tokio::select! {
                _ = sleep_until(self.deadline) => {
                    self.pull();
                    self.done = true;
                }
                _ = sleep_until(bookmark_at.unwrap_or(self.deadline)), if bookmark_at.is_some() => {
                    self.pull();
                    if !self.done {
                        let b = self.bookmark(false);
                        self.pending.push_back(b);
                    }
                    self.next_bookmark = next_bookmark_time(Instant::now(), self.req.bookmark_interval, self.deadline);
                }
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.done = true;
                    } else {
                        self.rx.borrow_and_update();
                        self.fetch = true;
                    }
                }
            }
        }
    }
}

/// Starts a watch and returns its body stream; errors here (a bad resourceVersion) are answered
/// as an HTTP error, while 410 Gone arrives in the stream as an ERROR event.
pub fn watch_stream(
    store: Arc<Store>,
    req: WatchRequest,
) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, ApiError> {
    let mut rx = store.subscribe();
    rx.borrow_and_update();
    let now = Instant::now();
    let deadline = now + req.timeout;
    let next_bookmark = next_bookmark_time(now, req.bookmark_interval, deadline);
    let mut state = WatchState {
        store: store.clone(),
        rx,
        cursor: 0,
        pending: VecDeque::new(),
        deadline,
        next_bookmark,
        fetch: false,
        done: false,
        req,
    };
    let from = state
        .req
        .resource_version
        .as_deref()
        .filter(|s| !s.is_empty() && *s != "0");
    match from {
        Some(text) if !state.req.send_initial_events => {
            state.cursor = text.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid resource version {text:?}: must be a decimal integer"
                ))
            })?;
            state.fetch = true;
        }
        _ => {
            let (items, rv) = store.snapshot(state.req.kind, state.req.namespace.as_deref());
            let added: Vec<Bytes> = items
                .into_iter()
                .filter(|o| state.matches(o))
                .map(|o| line("ADDED", &state.present(o)))
                .collect();
            state.pending.extend(added);
            state.cursor = rv;
            if state.req.send_initial_events && state.req.allow_bookmarks {
                let b = state.bookmark(true);
                state.pending.push_back(b);
            }
            state.fetch = true;
        }
    }
    Ok(futures::stream::unfold(state, WatchState::next))
}
