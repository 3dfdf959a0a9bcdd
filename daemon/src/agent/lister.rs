//! List-then-watch of one kind with the pages of the initial list fetched ahead: the request
//! for page N+1 goes out as soon as page N has arrived (its `metadata.continue` is read from the
//! head of the body), while page N is parsed and folded. kube-runtime's watcher asks for the
//! next page only after the last object of the page before has been consumed, so at 150,000
//! Pods (300 pages of 500) the agent and the API server took turns, each idle while the other
//! worked. At most [`PAGES_AHEAD`] pages wait in the queue and one in the fetcher's hands, so
//! memory stays bounded by a few pages.
//!
//! What it yields is what kube-runtime's watcher yields, item for item (each wrapped in
//! [`Seen::Event`]; [`Seen::Unchanged`] is the sieve's, below), so the consumers, the
//! filters and the backoff (`WatchStreamExt::backoff`) stay as they are: `Init`, one `InitApply`
//! per listed object, `InitDone`, then `Apply`/`Delete` from a watch started at the list's
//! resourceVersion with bookmarks; a watch that ends resumes from the last resourceVersion
//! seen (an event's or a bookmark's); a 410 Gone (in the stream, or refusing the watch) lists
//! again from the start; every failure is an `Err` item (`InitialListFailed`,
//! `WatchStartFailed`, `WatchError`, `WatchFailed`, `NoResourceVersion`), after which the list
//! starts over or the watch is retried; a 403 Forbidden (RBAC) is such an error, never an
//! empty list, and is logged as a warning where the watcher logged one. The list parameters are the watcher's with the Any
//! semantic and [`PAGE_SIZE`] (the query is built by kube's own `Request`),
//! and a watch silent for longer than its timeout plus 5 s is taken as dead, as kube does.
//!
//! The watch's lines are read here too (kube's `request_events` copies each line into a
//! `String` and decodes all of it): with a [`Sieve`], a MODIFIED line is first shown to the
//! sieve as text, and one that changes nothing the consumer reads is not decoded at all. It
//! moves the watch's resourceVersion on and comes out as [`Seen::Unchanged`], so that the
//! consumer still sees a watch event (its reads are paced by them) and nothing to fold.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use kube::runtime::watcher::{Error, Event};
use kube::Client;
use serde::de::{DeserializeOwned, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::sync::Arc;
use std::time::Duration;

/// Objects per list page (client-go's pager uses 500 too).
pub const PAGE_SIZE: u32 = 500;
/// Fetched pages queued for the parser, at most (the fetcher holds one more while it waits).
pub const PAGES_AHEAD: usize = 2;
/// The server-side timeout of a watch (kube's default).
const WATCH_TIMEOUT_S: u32 = 290;
/// A watch with no item for its timeout plus this is taken as dead (kube's margin).
const WATCH_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// Where pages and watches come from: the API server, or a test's script.
pub trait Source<K>: Send + Sync + 'static {
    /// The body of one list page: the first (`None`) or the one a continue token names.
    fn page(&self, token: Option<String>) -> BoxFuture<'static, Result<String, kube::Error>>;
    /// A watch from `rv`.
    fn watch(&self, rv: &str) -> WatchStart<K>;
}

/// A watch being started: its stream of events, or the error that refused it.
pub type WatchStart<K> =
    BoxFuture<'static, Result<BoxStream<'static, Result<WatchEvent<K>, kube::Error>>, kube::Error>>;

/// Judges a watch's MODIFIED lines before they are decoded.
///
/// What it compares a line with comes from one of two places. A sieve may keep its own
/// fingerprints: the lister then shows it every list page ([`Sieve::listed`]) and the text of
/// every object a watch event delivers ([`Sieve::seen`], [`Sieve::forget`]). Or the
/// consumer of the lister's items keeps them (the Pod filter, which is seeded from the
/// decoded list items): it must then hand each item to the sieve's state before it polls the
/// stream again (no buffering in between), so that a line is judged against everything
/// before it.
pub trait Sieve: Send + Sync + 'static {
    /// `object` is the JSON text of a MODIFIED event's object (followed by the line's closing
    /// brace); its resourceVersion when the update changes nothing the consumer reads (the
    /// line is then dropped undecoded), `None` to decode it.
    fn unchanged(&self, object: &str) -> Option<String>;
    /// A list starts over.
    fn relist(&self) {}
    /// A list page's body, once its items are decoded.
    fn listed(&self, _page: &str) {}
    /// The text of an object an ADDED or MODIFIED event delivered (followed by the line's
    /// closing brace), once decoded; false when the sieve cannot read it (the object is then
    /// forgotten).
    fn seen(&self, _object: &str) -> bool {
        true
    }
    /// An object deleted, or delivered in a line whose object text was not found.
    fn forget(&self, _namespace: Option<&str>, _name: Option<&str>) {}
}

/// One item of the list-then-watch: an event, or an update a [`Sieve`] dropped.
#[derive(Debug)]
pub enum Seen<K> {
    Event(Event<K>),
    /// A watched update that changes nothing the consumer reads (counted by the sieve).
    Unchanged,
}

/// Whether `ev` came from a watch (not from a list, not a list's bounds).
pub fn is_watch_event<K>(ev: &Event<K>) -> bool {
    matches!(ev, Event::Apply(_) | Event::Delete(_))
}

impl<K> Seen<K> {
    /// Whether it came from a watch (not from a list, not a list's bounds): what paces a
    /// watch thread's reads (see `watches::Pacer`).
    pub fn is_watch_event(&self) -> bool {
        match self {
            Seen::Event(ev) => is_watch_event(ev),
            Seen::Unchanged => true,
        }
    }
}

/// A bookmark's annotation that marks it as a line the sieve dropped (see [`events`]); the
/// API server's own bookmarks never carry a `kwire.dev/` annotation.
const UNCHANGED: &str = "kwire.dev/unchanged";

/// The start of a MODIFIED line as kube-apiserver writes it (a line spelled otherwise is
/// decoded whole, never sieved).
const MODIFIED: &[u8] = br#"{"type":"MODIFIED","object":"#;
/// The start of an ADDED line (its object's text is shown to the sieve).
const ADDED: &[u8] = br#"{"type":"ADDED","object":"#;

/// The API server, for every kind (cluster-wide).
struct Api<K> {
    client: Client,
    request: kube::core::Request,
    list: ListParams,
    watch: WatchParams,
    /// The last page's size in bytes.
    page_size: Arc<std::sync::atomic::AtomicUsize>,
    sieve: Option<Arc<dyn Sieve>>,
    _kind: std::marker::PhantomData<fn() -> K>,
}

impl<K> Source<K> for Api<K>
where
    K: kube::Resource + DeserializeOwned + Clone + std::fmt::Debug + Send + 'static,
{
    /// Read into one buffer sized by the page before (pages are alike): kube's `request_text`
    /// gathers the body, copies it into one buffer and that into a `String`, two copies of
    /// every byte (~400 MB each for 150,000 Pods) where this makes one.
    fn page(&self, token: Option<String>) -> BoxFuture<'static, Result<String, kube::Error>> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut lp = self.list.clone();
        lp.continue_token = token;
        let req = self.request.list(&lp).map_err(kube::Error::BuildRequest);
        let client = self.client.clone();
        let size = self.page_size.clone();
        async move {
            let body = client.request_stream(req?).await?;
            let hint = size.load(Relaxed);
            let mut buf = Vec::with_capacity(hint + hint / 8);
            futures::AsyncReadExt::read_to_end(&mut Box::pin(body), &mut buf)
                .await
                .map_err(kube::Error::ReadEvents)?;
            size.store(buf.len(), Relaxed);
            String::from_utf8(buf).map_err(kube::Error::FromUtf8)
        }
        .boxed()
    }

    fn watch(&self, rv: &str) -> WatchStart<K> {
        let req = self
            .request
            .watch(&self.watch, rv)
            .map_err(kube::Error::BuildRequest);
        let client = self.client.clone();
        let sieve = self.sieve.clone();
        async move {
            let mut req = req?;
            // As kube's `request_events`: a watch is read line by line, never compressed.
            req.headers_mut()
                .entry(http::header::ACCEPT_ENCODING)
                .or_insert(http::HeaderValue::from_static("identity"));
            let body = client.request_stream(req).await?;
            Ok(events(body, sieve))
        }
        .boxed()
    }
}

/// The events of a watch's body, one per line. A line the sieve finds unchanged becomes a
/// bookmark at its resourceVersion marked [`UNCHANGED`]; a line cut short by the end of the
/// body is skipped; the body ending (or ending early, as kube-apiserver ends a watch at its
/// timeout) ends the stream, which the lister resumes from the last resourceVersion.
pub fn events<K, R>(
    body: R,
    sieve: Option<Arc<dyn Sieve>>,
) -> BoxStream<'static, Result<WatchEvent<K>, kube::Error>>
where
    K: kube::Resource + DeserializeOwned + Send + 'static,
    R: futures::AsyncBufRead + Send + 'static,
{
    struct Lines<R> {
        body: std::pin::Pin<Box<R>>,
        line: Vec<u8>,
        sieve: Option<Arc<dyn Sieve>>,
        failed: bool,
    }
    let lines = Lines {
        body: Box::pin(body),
        line: Vec::new(),
        sieve,
        failed: false,
    };
    futures::stream::unfold(lines, |mut l| async move {
        if l.failed {
            return None;
        }
        loop {
            l.line.clear();
            match futures::AsyncBufReadExt::read_until(&mut l.body, b'\n', &mut l.line).await {
                Ok(0) => return None,
                Ok(_) => {
                    if let Some(item) = decode_line(&l.line, l.sieve.as_deref()) {
                        return Some((item, l));
                    }
                }
                Err(e) if ends_quietly(&e) => return None,
                Err(e) => {
                    l.failed = true;
                    return Some((Err(kube::Error::ReadEvents(e)), l));
                }
            }
        }
    })
    .boxed()
}

/// One line of a watch: its event, `None` for a blank line or one cut short.
fn decode_line<K: kube::Resource + DeserializeOwned>(
    line: &[u8],
    sieve: Option<&dyn Sieve>,
) -> Option<Result<WatchEvent<K>, kube::Error>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(sieve) = sieve else {
        return decode(line);
    };
    let modified = line.strip_prefix(MODIFIED);
    let object = modified
        .or_else(|| line.strip_prefix(ADDED))
        .and_then(|o| std::str::from_utf8(o).ok());
    if modified.is_some() {
        if let Some(rv) = object.and_then(|o| sieve.unchanged(o)) {
            let mut annotations = std::collections::BTreeMap::new();
            annotations.insert(UNCHANGED.to_string(), String::new());
            return Some(Ok(WatchEvent::Bookmark(kube::core::watch::Bookmark {
                types: kube::core::TypeMeta::default(),
                metadata: kube::core::watch::BookmarkMeta {
                    resource_version: rv,
                    annotations,
                },
            })));
        }
    }
    let event = decode::<K>(line);
    // The sieve's own fingerprints follow what was decoded.
    if let Some(Ok(ev)) = &event {
        let forget = |o: &K| sieve.forget(o.meta().namespace.as_deref(), o.meta().name.as_deref());
        match (ev, object) {
            // Remembered from its text; text the sieve cannot read falls through to forget.
            (WatchEvent::Added(_) | WatchEvent::Modified(_), Some(text)) if sieve.seen(text) => {}
            (WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o), _) => {
                forget(o)
            }
            _ => {}
        }
    }
    event
}

/// A line decoded whole, as kube's `request_events` decodes it.
fn decode<K: DeserializeOwned>(line: &[u8]) -> Option<Result<WatchEvent<K>, kube::Error>> {
    match serde_json::from_slice::<WatchEvent<K>>(line) {
        Ok(event) => Some(Ok(event)),
        // A blank line, or the last one cut short by the body's end.
        Err(e) if e.is_eof() => None,
        // An error the server wrote in place of a watch event.
        Err(e) => Some(Err(
            match serde_json::from_slice::<kube::core::Status>(line) {
                Ok(status) => kube::Error::Api(status.boxed()),
                Err(_) => kube::Error::SerdeError(e),
            },
        )),
    }
}

/// Whether a read error only ends the watch (to be resumed): the connection closed
/// mid-chunk, or timed out, as kube's `request_events` treats them.
fn ends_quietly(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{TimedOut, UnexpectedEof};
    if matches!(e.kind(), TimedOut | UnexpectedEof) {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == UnexpectedEof {
                return true;
            }
        }
        if err.to_string().contains("unexpected EOF during chunk") {
            return true;
        }
        source = err.source();
    }
    false
}

/// The list-then-watch of `K` (cluster-wide) through `client`: a drop-in for
/// `kube::runtime::watcher::watcher(Api::all(client), watch_config())`.
pub fn watch<K>(
    client: Client,
    sieve: Option<Arc<dyn Sieve>>,
) -> impl Stream<Item = Result<Seen<K>, Error>> + Send
where
    K: kube::Resource<DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug
        + Send
        + 'static,
{
    let source = Api::<K> {
        client,
        request: kube::core::Request::new(K::url_path(&(), None)),
        list: ListParams {
            resource_version: Some("0".into()),
            version_match: Some(VersionMatch::NotOlderThan),
            limit: Some(PAGE_SIZE),
            ..ListParams::default()
        },
        watch: WatchParams {
            timeout: Some(WATCH_TIMEOUT_S),
            bookmarks: true,
            ..WatchParams::default()
        },
        page_size: Arc::default(),
        sieve: sieve.clone(),
        _kind: std::marker::PhantomData,
    };
    from_source(Arc::new(source), WATCH_TIMEOUT_S, sieve)
}

/// [`watch`] from any [`Source`]; a watch silent for `timeout_s` + 5 s is restarted.
pub fn from_source<K, S>(
    source: Arc<S>,
    timeout_s: u32,
    sieve: Option<Arc<dyn Sieve>>,
) -> impl Stream<Item = Result<Seen<K>, Error>> + Send
where
    K: kube::Resource + DeserializeOwned + Send + 'static,
    S: Source<K>,
{
    let idle = Duration::from_secs(timeout_s.into()) + WATCH_IDLE_MARGIN;
    futures::stream::unfold(State::Empty, move |mut state| {
        let source = source.clone();
        let sieve = sieve.clone();
        async move {
            loop {
                let (item, next) = step(&source, state, idle, sieve.as_deref()).await;
                state = next;
                if let Some(item) = item {
                    return Some((item, state));
                }
            }
        }
    })
}

/// One list page as fetched: its body and the resourceVersion its head gave.
struct Page {
    body: String,
    rv: Option<String>,
}

type PageResult = Result<Page, kube::Error>;

/// Aborts the page fetcher when the list is dropped (a re-list, the stream dropped).
struct Fetcher(tokio::task::JoinHandle<()>);

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum State<K> {
    Empty,
    Listing {
        pages: tokio::sync::mpsc::Receiver<PageResult>,
        items: std::vec::IntoIter<K>,
        rv: Option<String>,
        _fetcher: Fetcher,
    },
    Listed {
        rv: String,
    },
    Watching {
        rv: String,
        stream: BoxStream<'static, Result<WatchEvent<K>, kube::Error>>,
    },
}

/// Fetches the pages of one list in order, each as soon as the one before has arrived,
/// until the last page, an error (sent, then the end) or the receiver's end.
async fn fetch<K, S: Source<K>>(source: Arc<S>, tx: tokio::sync::mpsc::Sender<PageResult>) {
    let mut token = None;
    loop {
        let page = match source.page(token.take()).await {
            Ok(body) => match read_head(&body) {
                Ok(head) => {
                    token = head.continue_.filter(|c| !c.is_empty());
                    Ok(Page {
                        body,
                        rv: head.resource_version.filter(|r| !r.is_empty()),
                    })
                }
                Err(e) => Err(kube::Error::SerdeError(e)),
            },
            Err(e) => Err(e),
        };
        let last = page.is_err() || token.is_none();
        if tx.send(page).await.is_err() || last {
            return;
        }
    }
}

/// The `items` of a list body (the rest is skipped).
#[derive(Deserialize)]
#[serde(bound = "K: DeserializeOwned")]
struct Items<K> {
    #[serde(default = "Vec::new")]
    items: Vec<K>,
}

/// A list's `metadata` as far as paging reads it.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    resource_version: Option<String>,
    #[serde(rename = "continue")]
    continue_: Option<String>,
}

/// Reads a list body's `metadata` and stops there: kube-apiserver writes it before `items`,
/// so the next page can be asked for before this one is parsed. (A body with `items` first is
/// read through to its `metadata`.)
fn read_head(body: &str) -> Result<Head, serde_json::Error> {
    const STOP: &str = "kwire: list head read";
    struct V<'a>(&'a mut Option<Head>);
    impl<'de> Visitor<'de> for V<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            while let Some(key) = m.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == "metadata" {
                    *self.0 = Some(m.next_value()?);
                    return Err(A::Error::custom(STOP));
                }
                m.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut head = None;
    let read = serde_json::Deserializer::from_str(body).deserialize_map(V(&mut head));
    match (head, read) {
        (Some(head), _) => Ok(head),
        (None, Ok(())) => Ok(Head::default()),
        (None, Err(e)) => Err(e),
    }
}

/// Whether `e` is the API's 410 Gone (a resourceVersion too old to watch from).
fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// A 403 Forbidden is logged as a warning, in kube's watcher's words (its other errors at
/// debug): a missing RBAC grant should be seen without debug logs, on every retry.
fn log_forbidden(what: &str, e: &kube::Error) {
    if matches!(e, kube::Error::Api(s) if s.is_forbidden()) {
        tracing::warn!("{what} with 403: {e:?}");
    } else {
        tracing::debug!("{what}: {e:?}");
    }
}

/// One step: an item to yield (None: step again) and the state after it.
async fn step<K, S>(
    source: &Arc<S>,
    state: State<K>,
    idle: Duration,
    sieve: Option<&dyn Sieve>,
) -> (Option<Result<Seen<K>, Error>>, State<K>)
where
    K: kube::Resource + DeserializeOwned + Send + 'static,
    S: Source<K>,
{
    match state {
        State::Empty => {
            if let Some(sieve) = sieve {
                sieve.relist();
            }
            let (tx, pages) = tokio::sync::mpsc::channel(PAGES_AHEAD);
            let fetcher = Fetcher(tokio::spawn(fetch(source.clone(), tx)));
            (
                Some(Ok(Seen::Event(Event::Init))),
                State::Listing {
                    pages,
                    items: Vec::new().into_iter(),
                    rv: None,
                    _fetcher: fetcher,
                },
            )
        }
        State::Listing {
            mut pages,
            mut items,
            rv,
            _fetcher,
        } => {
            if let Some(obj) = items.next() {
                return (
                    Some(Ok(Seen::Event(Event::InitApply(obj)))),
                    State::Listing {
                        pages,
                        items,
                        rv,
                        _fetcher,
                    },
                );
            }
            match pages.recv().await {
                Some(Ok(page)) => match serde_json::from_str::<Items<K>>(&page.body) {
                    Ok(list) => (
                        {
                            if let Some(sieve) = sieve {
                                sieve.listed(&page.body);
                            }
                            None
                        },
                        State::Listing {
                            pages,
                            items: list.items.into_iter(),
                            rv: page.rv.or(rv),
                            _fetcher,
                        },
                    ),
                    Err(e) => (
                        Some(Err(Error::InitialListFailed(kube::Error::SerdeError(e)))),
                        State::Empty,
                    ),
                },
                Some(Err(e)) => {
                    log_forbidden("watch list error", &e);
                    (Some(Err(Error::InitialListFailed(e))), State::Empty)
                }
                None => match rv {
                    Some(rv) => (Some(Ok(Seen::Event(Event::InitDone))), State::Listed { rv }),
                    None => (Some(Err(Error::NoResourceVersion)), State::Empty),
                },
            }
        }
        State::Listed { rv } => match source.watch(&rv).await {
            Ok(stream) => (None, State::Watching { rv, stream }),
            Err(e) => {
                log_forbidden("watch initlist error", &e);
                let next = if is_gone(&e) {
                    State::Empty
                } else {
                    State::Listed { rv }
                };
                (Some(Err(Error::WatchStartFailed(e))), next)
            }
        },
        State::Watching { rv, mut stream } => {
            let next = tokio::time::timeout(idle, stream.next())
                .await
                .unwrap_or(None);
            // An object event moves the watch to the object's resourceVersion; one without a
            // resourceVersion leaves nothing to resume from: list again.
            let object = |obj: K, wrap: fn(K) -> Event<K>, stream| match obj
                .meta()
                .resource_version
                .clone()
                .filter(|r| !r.is_empty())
            {
                Some(rv) => (
                    Some(Ok(Seen::Event(wrap(obj)))),
                    State::Watching { rv, stream },
                ),
                None => (Some(Err(Error::NoResourceVersion)), State::Empty),
            };
            match next {
                Some(Ok(WatchEvent::Added(obj) | WatchEvent::Modified(obj))) => {
                    object(obj, Event::Apply, stream)
                }
                Some(Ok(WatchEvent::Deleted(obj))) => object(obj, Event::Delete, stream),
                // A line the sieve dropped moves the watch on like a bookmark, and is told.
                Some(Ok(WatchEvent::Bookmark(bm))) => (
                    bm.metadata
                        .annotations
                        .contains_key(UNCHANGED)
                        .then_some(Ok(Seen::Unchanged)),
                    State::Watching {
                        rv: bm.metadata.resource_version,
                        stream,
                    },
                ),
                Some(Ok(WatchEvent::Error(status))) => {
                    if status.code == 403 {
                        tracing::warn!("watcher watchevent error 403: {status:?}");
                    }
                    let next = if status.code == 410 {
                        State::Empty
                    } else {
                        State::Watching { rv, stream }
                    };
                    (Some(Err(Error::WatchError(status))), next)
                }
                Some(Err(e)) => {
                    log_forbidden("watcher error", &e);
                    (
                        Some(Err(Error::WatchFailed(e))),
                        State::Watching { rv, stream },
                    )
                }
                None => (None, State::Listed { rv }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    type Watch = Result<Vec<WatchEvent<ConfigMap>>, kube::Error>;

    /// A scripted API: list pages by continue token (an error in place of a page once), and
    /// one scripted answer per watch started; it records what was asked for.
    type Page = (Option<String>, Result<String, kube::Error>);

    #[derive(Default)]
    struct Script {
        pages: Mutex<Vec<Page>>,
        watches: Mutex<VecDeque<Watch>>,
        asked_pages: Mutex<Vec<Option<String>>>,
        asked_watches: Mutex<Vec<String>>,
    }

    impl Source<ConfigMap> for Script {
        fn page(&self, token: Option<String>) -> BoxFuture<'static, Result<String, kube::Error>> {
            self.asked_pages.lock().unwrap().push(token.clone());
            let mut pages = self.pages.lock().unwrap();
            let i = pages
                .iter()
                .position(|(t, _)| *t == token)
                .expect("a page the script has");
            // An error answers once; a page answers every time.
            let answer = match &pages[i].1 {
                Ok(body) => Ok(body.clone()),
                Err(_) => pages.remove(i).1,
            };
            async move { answer }.boxed()
        }

        fn watch(&self, rv: &str) -> WatchStart<ConfigMap> {
            self.asked_watches.lock().unwrap().push(rv.to_string());
            let answer = match self.watches.lock().unwrap().pop_front() {
                Some(Ok(events)) => Ok(futures::stream::iter(events.into_iter().map(Ok)).boxed()),
                Some(Err(e)) => Err(e),
                // Script over: a watch that stays open with nothing to say.
                None => Ok(futures::stream::pending().boxed()),
            };
            async move { answer }.boxed()
        }
    }

    fn cm(name: &str, rv: u64) -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "x", "resourceVersion": rv.to_string()}}))
            .unwrap()
    }

    /// A list page as kube-apiserver writes it: metadata, then items.
    fn page(rv: u64, next: Option<&str>, names: &[&str]) -> String {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if let Some(c) = next {
            meta["continue"] = json!(c);
            meta["remainingItemCount"] = json!(1);
        }
        let items: Vec<ConfigMap> = names.iter().map(|n| cm(n, 1)).collect();
        serde_json::to_string(
            &json!({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": meta, "items": items}),
        )
        .unwrap()
    }

    fn status(code: u16) -> Box<kube::core::Status> {
        Box::new(
            serde_json::from_value(json!({"status": "Failure", "message": format!("code {code}"), "reason": "x", "code": code}))
                .unwrap(),
        )
    }

    /// What an item was, as a line: `init`, `+a` (listed), `done`, `apply a`, `delete a`,
    /// `error <what>`.
    fn line(item: &Result<Seen<ConfigMap>, Error>) -> String {
        let name = |o: &ConfigMap| o.metadata.name.clone().unwrap();
        match item {
            Ok(Seen::Event(Event::Init)) => "init".into(),
            Ok(Seen::Event(Event::InitApply(o))) => format!("+{}", name(o)),
            Ok(Seen::Event(Event::InitDone)) => "done".into(),
            Ok(Seen::Event(Event::Apply(o))) => format!("apply {}", name(o)),
            Ok(Seen::Event(Event::Delete(o))) => format!("delete {}", name(o)),
            Ok(Seen::Unchanged) => "unchanged".into(),
            Err(Error::InitialListFailed(_)) => "error list".into(),
            Err(Error::WatchStartFailed(_)) => "error watch start".into(),
            Err(Error::WatchError(s)) => format!("error watch {}", s.code),
            Err(Error::WatchFailed(_)) => "error watch failed".into(),
            Err(Error::NoResourceVersion) => "error no rv".into(),
        }
    }

    /// The first `n` items of the list-then-watch of `script`, as lines.
    async fn lines(script: Arc<Script>, n: usize) -> Vec<String> {
        let mut s = std::pin::pin!(from_source(script, 290, None));
        let mut out = Vec::new();
        for _ in 0..n {
            let Ok(item) = tokio::time::timeout(Duration::from_secs(30), s.next()).await else {
                panic!("no item after {out:?} before the deadline");
            };
            out.push(line(&item.expect("the stream does not end")));
        }
        out
    }

    fn script(
        pages: Vec<(Option<&str>, Result<String, kube::Error>)>,
        watches: Vec<Watch>,
    ) -> Arc<Script> {
        Arc::new(Script {
            pages: Mutex::new(
                pages
                    .into_iter()
                    .map(|(t, p)| (t.map(str::to_string), p))
                    .collect(),
            ),
            watches: Mutex::new(watches.into()),
            ..Script::default()
        })
    }

    #[tokio::test]
    async fn pages_in_order_then_a_watch_from_the_lists_version_resumed_from_its_bookmark() {
        let s = script(
            vec![
                (None, Ok(page(10, Some("t1"), &["a", "b"]))),
                (Some("t1"), Ok(page(10, Some("t2"), &["c", "d"]))),
                (Some("t2"), Ok(page(10, None, &["e"]))),
            ],
            vec![
                Ok(vec![
                    WatchEvent::Added(cm("x", 11)),
                    WatchEvent::Bookmark(
                        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"resourceVersion": "15"}}))
                        .unwrap(),
                    ),
                ]),
                Ok(vec![
                    WatchEvent::Deleted(cm("x", 16)),
                    WatchEvent::Modified(cm("y", 17)),
                ]),
                Ok(vec![WatchEvent::Added(cm("z", 18))]),
            ],
        );
        let got = lines(s.clone(), 11).await;
        assert_eq!(
            got,
            [
                "init", "+a", "+b", "+c", "+d", "+e", "done", "apply x", "delete x", "apply y",
                "apply z"
            ]
        );
        assert_eq!(
            *s.asked_pages.lock().unwrap(),
            [None, Some("t1".to_string()), Some("t2".to_string())]
        );
        // From the list's version, then from the bookmark, then from the last event's.
        assert_eq!(*s.asked_watches.lock().unwrap(), ["10", "15", "17"]);
    }

    /// Drops (as unchanged) every object whose text holds `beat`, at resourceVersion "beat".
    struct BeatSieve;
    impl Sieve for BeatSieve {
        fn unchanged(&self, object: &str) -> Option<String> {
            object.contains("beat").then(|| "beat".to_string())
        }
    }

    /// A watch body's lines: a MODIFIED line the sieve drops comes out as a bookmark marked
    /// unchanged at the sieve's resourceVersion, every other line decoded (the sieve sees
    /// only MODIFIED lines as kube-apiserver spells them; an ERROR event is an event), a
    /// bare Status in place of an event an API error, a blank line and one cut short by the
    /// end skipped; with no sieve everything is decoded.
    #[tokio::test]
    async fn a_watch_body_read_line_by_line_through_the_sieve() {
        let modified = |name: &str, note: &str| {
            let mut o = serde_json::to_value(cm(name, 5)).unwrap();
            o["data"] = json!({"note": note});
            format!(r#"{{"type":"MODIFIED","object":{o}}}"#)
        };
        let added = format!(
            r#"{{"type":"ADDED","object":{}}}"#,
            json!({"metadata": {"name": "beat", "resourceVersion": "6"}})
        );
        let spaced = modified("b", "beat").replace(r#""type":"#, r#""type": "#);
        let error = r#"{"type":"ERROR","object":{"kind":"Status","status":"Failure","message":"too old","reason":"Expired","code":410}}"#;
        let body = [
            modified("a", "beat"),
            modified("b", "news"),
            "\r".into(),
            added,
            spaced,
            error.into(),
            r#"{"kind":"Status","status":"Failure","message":"boom","reason":"InternalError","code":500}"#.into(),
            r#"{"type":"MODIFIED","object":{"metad"#.into(),
        ]
        .join("\n");
        let show = |sieve: Option<Arc<dyn Sieve>>| {
            let body = futures::io::Cursor::new(body.clone().into_bytes());
            async move {
                events::<ConfigMap, _>(body, sieve)
                    .map(|item| match item {
                        Ok(WatchEvent::Bookmark(b)) => format!(
                            "bookmark {} {:?}",
                            b.metadata.resource_version,
                            b.metadata.annotations.keys().collect::<Vec<_>>()
                        ),
                        Ok(WatchEvent::Modified(o)) => {
                            format!("modified {}", o.metadata.name.unwrap())
                        }
                        Ok(WatchEvent::Added(o)) => format!("added {}", o.metadata.name.unwrap()),
                        Ok(WatchEvent::Error(s)) => format!("error event {}", s.code),
                        Ok(_) => "other".into(),
                        Err(kube::Error::Api(s)) => format!("api error {}", s.code),
                        Err(e) => format!("error {e}"),
                    })
                    .collect::<Vec<_>>()
                    .await
            }
        };
        assert_eq!(
            show(Some(Arc::new(BeatSieve))).await,
            [
                r#"bookmark beat ["kwire.dev/unchanged"]"#,
                "modified b",
                "added beat",
                "modified b",
                "error event 410",
                "api error 500"
            ]
        );
        assert_eq!(
            show(None).await,
            [
                "modified a",
                "modified b",
                "added beat",
                "modified b",
                "error event 410",
                "api error 500"
            ]
        );
    }

    /// An update the sieve dropped is told as `unchanged` and moves the watch on as a
    /// bookmark does; the API server's own bookmarks are not told.
    #[tokio::test]
    async fn a_sieved_update_is_told_and_resumes_the_watch_from_its_version() {
        let unchanged = |rv: &str| {
            WatchEvent::Bookmark(
                serde_json::from_value(json!({"apiVersion": "", "kind": "",
                    "metadata": {"resourceVersion": rv, "annotations": {UNCHANGED: ""}}}))
                .unwrap(),
            )
        };
        let s = script(
            vec![(None, Ok(page(10, None, &["a"])))],
            vec![
                Ok(vec![
                    unchanged("12"),
                    WatchEvent::Modified(cm("a", 13)),
                    unchanged("14"),
                ]),
                Ok(vec![WatchEvent::Added(cm("b", 15))]),
            ],
        );
        let got = lines(s.clone(), 7).await;
        assert_eq!(
            got,
            [
                "init",
                "+a",
                "done",
                "unchanged",
                "apply a",
                "unchanged",
                "apply b"
            ]
        );
        assert_eq!(*s.asked_watches.lock().unwrap(), ["10", "14"]);
    }

    #[tokio::test]
    async fn the_next_page_is_asked_for_before_this_one_is_consumed() {
        let s = script(
            vec![
                (None, Ok(page(3, Some("t1"), &["a", "b"]))),
                (Some("t1"), Ok(page(3, Some("t2"), &["c"]))),
                (Some("t2"), Ok(page(3, None, &["d"]))),
            ],
            vec![],
        );
        let mut stream = std::pin::pin!(from_source(s.clone(), 290, None));
        // Init, and the first object of the first page: the rest of it is not consumed.
        for want in ["init", "+a"] {
            assert_eq!(line(&stream.next().await.unwrap()), want);
        }
        // Meanwhile the fetcher has gone on to the next pages (waiting on a condition, with a
        // deadline: the fetcher is a task of its own).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while s.asked_pages.lock().unwrap().len() < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pages asked for: {:?}",
                s.asked_pages.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(line(&stream.next().await.unwrap()));
        }
        assert_eq!(got, ["+b", "+c", "+d", "done"]);
    }

    #[tokio::test]
    async fn an_error_mid_list_lists_again_from_the_start() {
        let s = script(
            vec![
                (None, Ok(page(3, Some("t1"), &["a", "b"]))),
                // The continue token expired (410 Gone) the first time it is used.
                (Some("t1"), Err(kube::Error::Api(status(410)))),
                (Some("t1"), Ok(page(3, None, &["c"]))),
            ],
            vec![],
        );
        let got = lines(s.clone(), 9).await;
        assert_eq!(
            got,
            [
                "init",
                "+a",
                "+b",
                "error list",
                "init",
                "+a",
                "+b",
                "+c",
                "done"
            ]
        );
        assert_eq!(
            *s.asked_pages.lock().unwrap(),
            [None, Some("t1".into()), None, Some("t1".into())]
        );
    }

    #[tokio::test]
    async fn a_410_in_the_watch_relists_other_errors_resume_the_watch() {
        let s = script(
            vec![(None, Ok(page(5, None, &["a"])))],
            vec![
                // Refused once (not Gone): retried from the same version.
                Err(kube::Error::Api(status(503))),
                Ok(vec![
                    WatchEvent::Error(status(500)),
                    WatchEvent::Added(cm("y", 6)),
                    WatchEvent::Error(status(410)),
                ]),
                // Refused as Gone after the re-list: listed again.
                Err(kube::Error::Api(status(410))),
            ],
        );
        let got = lines(s.clone(), 14).await;
        assert_eq!(
            got,
            [
                "init",
                "+a",
                "done",
                "error watch start",
                "error watch 500",
                "apply y",
                "error watch 410",
                "init",
                "+a",
                "done",
                "error watch start",
                "init",
                "+a",
                "done",
            ]
        );
        assert_eq!(*s.asked_watches.lock().unwrap(), ["5", "5", "5"]);
    }

    /// RBAC's 403 (as a real cluster answers a missing grant): a refused list is an error and
    /// the list starts over, never an empty list done; a refused watch is retried from the
    /// list's version; a 403 ERROR event in a watch is an error and the watch goes on.
    #[tokio::test]
    async fn a_403_is_an_error_never_an_empty_list() {
        let s = script(
            vec![
                (None, Err(kube::Error::Api(status(403)))),
                (None, Ok(page(4, Some("t1"), &["a"]))),
                (Some("t1"), Err(kube::Error::Api(status(403)))),
                (Some("t1"), Ok(page(4, None, &["b"]))),
            ],
            vec![
                Err(kube::Error::Api(status(403))),
                Err(kube::Error::Api(status(403))),
                Ok(vec![
                    WatchEvent::Error(status(403)),
                    WatchEvent::Added(cm("y", 5)),
                ]),
            ],
        );
        let got = lines(s.clone(), 13).await;
        assert_eq!(
            got,
            [
                "init",
                "error list",
                "init",
                "+a",
                "error list",
                "init",
                "+a",
                "+b",
                "done",
                "error watch start",
                "error watch start",
                "error watch 403",
                "apply y",
            ]
        );
        assert_eq!(*s.asked_watches.lock().unwrap(), ["4", "4", "4"]);
    }

    #[test]
    fn the_head_is_read_without_the_items() {
        // What follows `"items":` is never parsed (here it is not even JSON).
        let h = read_head(r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"7","continue":"c"},"items":[nonsense"#).unwrap();
        assert_eq!(
            (h.resource_version.as_deref(), h.continue_.as_deref()),
            (Some("7"), Some("c"))
        );
        // Items first: read through to the metadata.
        let h = read_head(
            r#"{"items":[{"metadata":{"name":"a"}}],"metadata":{"resourceVersion":"8"}}"#,
        )
        .unwrap();
        assert_eq!(
            (h.resource_version.as_deref(), h.continue_),
            (Some("8"), None)
        );
        assert!(read_head(r#"{"items":[]}"#)
            .unwrap()
            .resource_version
            .is_none());
        assert!(read_head("[1]").is_err() && read_head("{\"metadata\": 3}").is_err());
    }
}
