//! The object store: objects as JSON, one global resourceVersion across kinds, a bounded event
//! history (the watch cache / etcd compaction window) and the wake-up that fans changes out to
//! watches.
//!
//! Every write takes the next resourceVersion and appends one event to the history; a watch
//! or a paged list can only be served from a resourceVersion still inside that history, else
//! it gets 410 Gone, as from a real server after etcd compaction.
//!
//! Objects are kept behind `Arc`s shared by the object map, the history and the lists and watch
//! streams that read them, and ordered as etcd orders its keys (`<namespace>/<name>` as bytes),
//! so that a page of a list costs its page, not the whole collection: a lab filled with 150,000
//! Pods lists and watches like a cluster of that size.
//!
//! The store knows nothing of allocation (podCIDRs, ClusterIPs, NodePorts: [`super::alloc`]),
//! authorization or admission: a write can carry an `admit` check that runs under the store's
//! lock on the old and the new object, so that admission sees exactly what is written.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::error::ApiError;
use super::resources::{self, by_storage, event_core_to_v1, event_v1_to_core, ResourceKind};
use super::selector::{FieldSelector, LabelSelector};
use super::strategy::{self, check_identity};
use super::validate::validate_object;

/// Namespaces every cluster starts with.
pub const INITIAL_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Where an object lives: its storage (`pods`), namespace ("" when cluster-scoped) and name.
/// Ordered by storage, then by [`ObjectKey::path`] as bytes: etcd's order of
/// `/registry/<storage>/<namespace>/<name>` (so `a-b/x` sorts before `a/x`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub storage: &'static str,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// The key's order within its storage, as etcd orders `/registry/<storage>/<ns>/<name>`.
    fn path(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }

    fn path_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        let ns = (!self.namespace.is_empty()).then_some(self.namespace.as_bytes());
        ns.into_iter()
            .flatten()
            .copied()
            .chain(ns.map(|_| b'/'))
            .chain(self.name.bytes())
    }

    /// The key of `path` (as [`ObjectKey::path`] writes it) in `storage`.
    fn from_path(storage: &'static str, namespaced: bool, path: &str) -> Self {
        let (namespace, name) = match path.split_once('/') {
            Some((ns, name)) if namespaced => (ns.to_string(), name.to_string()),
            _ => (String::new(), path.to_string()),
        };
        ObjectKey {
            storage,
            namespace,
            name,
        }
    }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.storage
            .cmp(other.storage)
            .then_with(|| self.path_bytes().cmp(other.path_bytes()))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One write, as kept in the history.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub rv: u64,
    pub key: ObjectKey,
    pub event_type: EventType,
    /// The object after the write (for a delete: the last state, with the delete's rv).
    pub object: Arc<Value>,
    /// The object before the write (None for a create): lets lists read an older snapshot and
    /// lets selector watches turn a change that leaves the selection into a DELETED.
    pub prev: Option<Arc<Value>>,
}

/// What a list asks for (the query parameters of a list call).
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub label_selector: LabelSelector,
    pub field_selector: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// In the form the listed kind serves.
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining_item_count: Option<u64>,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Events kept for watches and paged lists; older resourceVersions get 410 Gone.
    pub history_size: usize,
}

/// A check a write must pass, run under the store's lock with the stored object (None for a
/// create) and the one about to be stored (None for a delete): admission.
pub type Admit<'a> = &'a dyn Fn(Option<&Value>, Option<&Value>) -> Result<(), ApiError>;

/// The check of writes that need none (the lab's own control plane).
pub fn admit_all(_: Option<&Value>, _: Option<&Value>) -> Result<(), ApiError> {
    Ok(())
}

struct Inner {
    rv: u64,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<StoredEvent>,
    history_size: usize,
    /// Events with rv <= compacted_rv are gone from the history.
    compacted_rv: u64,
    /// The last few unselected pages' remaining counts, by the continue token they gave.
    remaining: VecDeque<Remaining>,
}

/// How many objects a paged list without selectors had left after the page that gave `token`
/// (`remainingItemCount`). The next page starts at that token in the same snapshot, so it has
/// that many minus its own length left, without counting them again: etcd answers a range's
/// count from its index, and counting the rest of a 150,000-Pod collection on every page made
/// a full list quadratic in the stand-in (most of its CPU when an agent starts at scale). The
/// answer is the same as counting.
struct Remaining {
    storage: &'static str,
    namespace: Option<String>,
    token: String,
    count: u64,
}

/// Remaining counts kept (one per list in progress is enough; a few listers at once fit).
const REMAINING_KEPT: usize = 64;

/// The store; cheap to share behind an `Arc`, safe to use from any thread.
pub struct Store {
    inner: Mutex<Inner>,
    rv_tx: watch::Sender<u64>,
    /// 410 Gone answers given (watches and lists), for tests that must see a client re-list.
    expired_answers: AtomicU64,
}

fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn parse_rv(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "invalid resource version {text:?}: must be a decimal integer"
        ))
    })
}

/// Converts a stored object to the form the requested resource serves (events.k8s.io views).
pub fn to_view(kind: &ResourceKind, stored: Value) -> Value {
    if kind.is_events_v1() {
        event_core_to_v1(&stored)
    } else {
        stored
    }
}

/// [`to_view`] of a shared object: the same `Arc` unless the kind converts.
pub fn to_view_shared(kind: &ResourceKind, stored: &Arc<Value>) -> Arc<Value> {
    if kind.is_events_v1() {
        Arc::new(event_core_to_v1(stored))
    } else {
        stored.clone()
    }
}

fn from_view(kind: &ResourceKind, view: Value) -> Value {
    if kind.is_events_v1() {
        event_v1_to_core(&view)
    } else {
        view
    }
}

fn storage_kind(kind: &ResourceKind) -> &'static ResourceKind {
    by_storage(kind.storage).expect("every storage has a canonical kind")
}

/// Encodes a continue token like the real server: base64 of `{"v","rv","start"}`.
fn encode_continue(rv: u64, start: &str) -> String {
    let body = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{start}\u{0}")});
    base64::engine::general_purpose::STANDARD.encode(body.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v
        .get("start")
        .and_then(Value::as_str)
        .ok_or_else(bad)?
        .to_string();
    Ok((rv, start))
}

/// The objects of one key range as of an older resourceVersion: the current objects, with
/// the keys written since replaced by what they held then. Both inputs are in key order.
struct MergeAsOf<'a, N: Iterator<Item = (&'a ObjectKey, &'a Arc<Value>)>> {
    now: std::iter::Peekable<N>,
    then: std::iter::Peekable<
        std::collections::btree_map::IntoIter<&'a ObjectKey, Option<&'a Arc<Value>>>,
    >,
}

impl<'a, N: Iterator<Item = (&'a ObjectKey, &'a Arc<Value>)>> Iterator for MergeAsOf<'a, N> {
    type Item = (&'a ObjectKey, &'a Arc<Value>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.now.peek(), self.then.peek()) {
                (None, None) => return None,
                (Some(_), None) => CmpOrdering::Less,
                (None, Some(_)) => CmpOrdering::Greater,
                (Some((a, _)), Some((b, _))) => a.cmp(b),
            };
            match order {
                CmpOrdering::Less => return self.now.next(),
                CmpOrdering::Equal => {
                    self.now.next();
                }
                CmpOrdering::Greater => {}
            }
            if let (key, Some(old)) = self.then.next().expect("peeked") {
                return Some((key, old));
            }
        }
    }
}

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        let (rv_tx, _) = watch::channel(1);
        let store = Store {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                history_size: config.history_size.max(1),
                compacted_rv: 1,
                remaining: VecDeque::new(),
            }),
            rv_tx,
            expired_answers: AtomicU64::new(0),
        };
        let ns = resources::find("", "v1", "namespaces").expect("namespaces served");
        for name in INITIAL_NAMESPACES {
            store
                .create(
                    ns,
                    None,
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
                )
                .expect("initial namespace");
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// The oldest resourceVersion a watch can still start from (older ones get 410 Gone).
    pub fn oldest_resource_version(&self) -> u64 {
        self.lock().compacted_rv
    }

    fn expired(&self, message: impl Into<String>) -> ApiError {
        self.expired_answers.fetch_add(1, Ordering::Relaxed);
        ApiError::expired(message)
    }

    /// How many 410 Gone answers (watch ERROR events and list errors) the store has given.
    pub fn expired_answers(&self) -> u64 {
        self.expired_answers.load(Ordering::Relaxed)
    }

    /// A receiver woken on every write, carrying the newest resourceVersion.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.rv_tx.subscribe()
    }

    /// Drops the whole event history, as an etcd compaction does: every watch or paged list
    /// from an older resourceVersion now gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        inner.compacted_rv = inner.rv;
        drop(inner);
        // Wake watches so that they notice.
        self.rv_tx.send_modify(|_| {});
    }

    fn commit(
        &self,
        inner: &mut Inner,
        key: ObjectKey,
        event_type: EventType,
        mut object: Value,
        prev: Option<Arc<Value>>,
    ) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let shared = Arc::new(object);
        match event_type {
            EventType::Deleted => {
                inner.objects.remove(&key);
            }
            _ => {
                inner.objects.insert(key.clone(), shared.clone());
            }
        }
        inner.history.push_back(StoredEvent {
            rv,
            key,
            event_type,
            object: shared.clone(),
            prev,
        });
        while inner.history.len() > inner.history_size {
            let gone = inner.history.pop_front().expect("non-empty");
            inner.compacted_rv = gone.rv;
        }
        self.rv_tx.send_replace(rv);
        Arc::unwrap_or_clone(shared)
    }

    fn key(kind: &ResourceKind, namespace: Option<&str>, name: &str) -> ObjectKey {
        ObjectKey {
            storage: kind.storage,
            namespace: if kind.namespaced {
                namespace.unwrap_or("").to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    /// Creates an object (in the form `kind` serves); returns it as stored.
    pub fn create(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Value, ApiError> {
        self.create_admitted(kind, namespace, object, &admit_all)
    }

    /// [`Store::create`], after `admit` passed on the object as it would be stored.
    pub fn create_admitted(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        object: Value,
        admit: Admit<'_>,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of a {} create must be a JSON object",
                kind.kind
            )));
        }
        check_identity(kind, &object, namespace, None)?;
        if !meta_str(&object, "resourceVersion").is_empty() {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let canonical = storage_kind(kind);
        let mut object = from_view(kind, object);
        object["apiVersion"] = json!(canonical.api_version());
        object["kind"] = json!(canonical.kind);
        if !object.get("metadata").is_some_and(Value::is_object) {
            object["metadata"] = json!({});
        }
        if meta_str(&object, "name").is_empty() {
            let prefix = meta_str(&object, "generateName").to_string();
            if !prefix.is_empty() {
                object["metadata"]["name"] = json!(format!("{prefix}{}", strategy::name_suffix()));
            }
        }
        let name = meta_str(&object, "name").to_string();
        if kind.namespaced {
            let ns = namespace
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        strategy::apply_defaults(canonical, &mut object);
        strategy::prepare_for_create(canonical, &mut object);
        let errors = validate_object(canonical, &object);
        if !errors.is_empty() {
            return Err(ApiError::invalid(kind, &name, &errors));
        }
        let namespace = meta_str(&object, "namespace").to_string();
        let mut inner = self.lock();
        if kind.namespaced
            && !inner.objects.contains_key(&ObjectKey {
                storage: "namespaces",
                namespace: String::new(),
                name: namespace.clone(),
            })
        {
            return Err(ApiError::namespace_not_found(&namespace));
        }
        let key = Self::key(kind, Some(&namespace), &name);
        if inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        object["metadata"]["uid"] = json!(strategy::new_uid());
        object["metadata"]["creationTimestamp"] = json!(strategy::rfc3339_now());
        admit(None, Some(&to_view(kind, object.clone())))?;
        let created = self.commit(&mut inner, key, EventType::Added, object, None);
        Ok(to_view(kind, created))
    }

    pub fn get(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let inner = self.lock();
        inner
            .objects
            .get(&Self::key(kind, namespace, name))
            .map(|o| to_view(kind, (**o).clone()))
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Replaces an object (PUT), or its status with `status_subresource`. A non-empty
    /// `metadata.resourceVersion` in `object` must match the stored one (else 409 Conflict).
    pub fn update(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        object: Value,
        status_subresource: bool,
    ) -> Result<Value, ApiError> {
        self.modify(kind, namespace, name, status_subresource, |_| Ok(object))
    }

    /// [`Store::modify`] without admission.
    pub fn modify(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        status_subresource: bool,
        change: impl FnOnce(Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        self.modify_admitted(
            kind,
            namespace,
            name,
            status_subresource,
            change,
            &admit_all,
        )
    }

    /// Reads the object (in the form `kind` serves), lets `change` produce the new one, and
    /// stores it, all under one lock: the shape of a PATCH. The same resourceVersion rule as
    /// [`Store::update`] applies to what `change` returns; `admit` sees the old and the new
    /// object as they would be stored.
    pub fn modify_admitted(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        status_subresource: bool,
        change: impl FnOnce(Value) -> Result<Value, ApiError>,
        admit: Admit<'_>,
    ) -> Result<Value, ApiError> {
        if status_subresource && !kind.status_subresource {
            return Err(ApiError::not_found(kind, name));
        }
        let canonical = storage_kind(kind);
        let mut inner = self.lock();
        let key = Self::key(kind, namespace, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        let new = change(to_view(kind, (*old).clone()))?;
        if !new.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of a {} update must be a JSON object",
                kind.kind
            )));
        }
        check_identity(kind, &new, namespace, Some(name))?;
        let wanted_rv = meta_str(&new, "resourceVersion").to_string();
        if !wanted_rv.is_empty() && wanted_rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(kind, name));
        }
        let wanted_uid = meta_str(&new, "uid");
        if !wanted_uid.is_empty() && wanted_uid != meta_str(&old, "uid") {
            return Err(ApiError::conflict(kind, name, &format!("Precondition failed: UID in precondition: {wanted_uid}, UID in object meta: {}", meta_str(&old, "uid"))));
        }
        let mut new = from_view(kind, new);
        new["apiVersion"] = json!(canonical.api_version());
        new["kind"] = json!(canonical.kind);
        if !new.get("metadata").is_some_and(Value::is_object) {
            new["metadata"] = json!({});
        }
        new["metadata"]["name"] = json!(name);
        if kind.namespaced {
            new["metadata"]["namespace"] = json!(key.namespace);
        }
        if !status_subresource {
            strategy::apply_defaults(canonical, &mut new);
        }
        let mut next = strategy::prepare_for_update(canonical, &old, new, status_subresource)
            .map_err(|e| ApiError::invalid(kind, name, &e))?;
        let errors = validate_object(canonical, &next);
        if !errors.is_empty() {
            return Err(ApiError::invalid(kind, name, &errors));
        }
        // A no-op write keeps the resourceVersion and sends no event, as in Kubernetes.
        next["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if next == *old {
            return Ok(to_view(kind, (*old).clone()));
        }
        admit(
            Some(&to_view(kind, (*old).clone())),
            Some(&to_view(kind, next.clone())),
        )?;
        let stored = self.commit(&mut inner, key, EventType::Modified, next, Some(old));
        Ok(to_view(kind, stored))
    }

    /// Deletes an object at once (no finalizers, no graceful pod termination) and returns its
    /// last state. Preconditions, when given, must match (else 409 Conflict).
    pub fn delete(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        uid: Option<&str>,
        resource_version: Option<&str>,
    ) -> Result<Value, ApiError> {
        self.delete_admitted(kind, namespace, name, uid, resource_version, &admit_all)
    }

    /// [`Store::delete`], after `admit` passed on the stored object.
    pub fn delete_admitted(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        name: &str,
        uid: Option<&str>,
        resource_version: Option<&str>,
        admit: Admit<'_>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let key = Self::key(kind, namespace, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if let Some(uid) = uid.filter(|u| !u.is_empty()) {
            if uid != meta_str(&old, "uid") {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid")
                    ),
                ));
            }
        }
        if let Some(rv) = resource_version.filter(|r| !r.is_empty()) {
            if rv != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(kind, name, &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", meta_str(&old, "resourceVersion"))));
            }
        }
        admit(Some(&to_view(kind, (*old).clone())), None)?;
        let gone = self.commit(
            &mut inner,
            key,
            EventType::Deleted,
            (*old).clone(),
            Some(old),
        );
        Ok(to_view(kind, gone))
    }

    /// Lists objects (`namespace` None: all namespaces), with the resourceVersion semantics of
    /// the real server: unset or "0" reads the newest state; "N" reads a state at least as new
    /// as N (or exactly N with `resourceVersionMatch=Exact`, 410 Gone if that is compacted);
    /// `limit`/`continue` page through one consistent snapshot, 410 Gone once it is compacted.
    pub fn list(
        &self,
        kind: &ResourceKind,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> Result<ListPage, ApiError> {
        let mut inner = self.lock();
        let requested_rv = opts.resource_version.as_deref().filter(|s| !s.is_empty());
        let (snapshot_rv, start) = if let Some(token) =
            opts.continue_token.as_deref().filter(|s| !s.is_empty())
        {
            if requested_rv.is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rv, start) = decode_continue(token)?;
            if rv < inner.compacted_rv {
                let mut err = self.expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                );
                err.details = Some(
                    json!({"causes": [{"reason": "ResourceVersionTooOld", "message": format!("too old resource version: {rv} ({})", inner.compacted_rv)}]}),
                );
                return Err(err);
            }
            (rv, Some(start))
        } else {
            match requested_rv {
                None | Some("0") => (inner.rv, None),
                Some(text) => {
                    let rv = parse_rv(text)?;
                    if rv > inner.rv {
                        let mut err = ApiError::new(
                            504,
                            "Timeout",
                            format!("Too large resource version: {rv}, current: {}", inner.rv),
                        );
                        err.details = Some(
                            json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
                        );
                        return Err(err);
                    }
                    if opts.resource_version_match.as_deref() == Some("Exact") {
                        if rv < inner.compacted_rv {
                            return Err(self.expired(format!(
                                "too old resource version: {rv} ({})",
                                inner.compacted_rv
                            )));
                        }
                        (rv, None)
                    } else {
                        (inner.rv, None)
                    }
                }
            }
        };
        let namespace = namespace.filter(|_| kind.namespaced);
        let in_scope = |key: &ObjectKey| {
            key.storage == kind.storage && namespace.is_none_or(|ns| key.namespace == ns)
        };
        // The first key of the scope, or the continue token's, whichever is later.
        let mut from = ObjectKey {
            storage: kind.storage,
            namespace: namespace.unwrap_or("").to_string(),
            name: String::new(),
        };
        if let Some(start) = &start {
            let token = ObjectKey::from_path(kind.storage, kind.namespaced, start);
            if token > from {
                from = token;
            }
        }
        // Writes after the snapshot's resourceVersion, undone: the oldest write's `prev` is
        // what the key held then (None: it did not exist).
        let mut then: BTreeMap<&ObjectKey, Option<&Arc<Value>>> = BTreeMap::new();
        for ev in inner
            .history
            .iter()
            .rev()
            .take_while(|e| e.rv > snapshot_rv)
        {
            if in_scope(&ev.key) && ev.key >= from {
                then.insert(&ev.key, ev.prev.as_ref());
            }
        }
        let now = inner
            .objects
            .range((Bound::Included(&from), Bound::Unbounded))
            .take_while(|(k, _)| in_scope(k));
        let mut snapshot = MergeAsOf {
            now: now.peekable(),
            then: then.into_iter().peekable(),
        };
        let selecting = !opts.label_selector.is_empty() || !opts.field_selector.is_empty();
        let matches = |o: &Value| {
            opts.label_selector.matches_object(o) && opts.field_selector.matches_object(o)
        };
        let limit = opts.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_path = String::new();
        for (key, o) in snapshot.by_ref() {
            if !matches(o) {
                continue;
            }
            items.push(to_view_shared(kind, o));
            if items.len() == limit {
                last_path = key.path();
                break;
            }
        }
        let (more, remaining) = if items.len() < limit {
            (false, 0)
        } else if selecting {
            (snapshot.any(|(_, o)| matches(o)), 0)
        } else {
            let token = opts.continue_token.as_deref().filter(|_| start.is_some());
            let known = token.and_then(|t| {
                inner.remaining.iter().find(|r| {
                    r.storage == kind.storage && r.namespace.as_deref() == namespace && r.token == t
                })
            });
            let rest = match known {
                Some(r) => r.count.saturating_sub(items.len() as u64),
                None => snapshot.by_ref().count() as u64,
            };
            (rest > 0, rest)
        };
        drop(snapshot);
        let (continue_token, remaining_item_count) = if more {
            let token = encode_continue(snapshot_rv, &last_path);
            if !selecting {
                if inner.remaining.len() == REMAINING_KEPT {
                    inner.remaining.pop_front();
                }
                inner.remaining.push_back(Remaining {
                    storage: kind.storage,
                    namespace: namespace.map(str::to_string),
                    token: token.clone(),
                    count: remaining,
                });
            }
            (Some(token), (!selecting).then_some(remaining))
        } else {
            (None, None)
        };
        Ok(ListPage {
            items,
            resource_version: snapshot_rv,
            continue_token,
            remaining_item_count,
        })
    }

    /// Objects of `kind` in scope now, with the current resourceVersion: the initial state
    /// of a watch started without a resourceVersion (or with "0").
    pub fn snapshot(&self, kind: &ResourceKind, namespace: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let namespace = namespace.filter(|_| kind.namespaced);
        let from = ObjectKey {
            storage: kind.storage,
            namespace: namespace.unwrap_or("").to_string(),
            name: String::new(),
        };
        let items = inner
            .objects
            .range(from..)
            .take_while(|(k, _)| {
                k.storage == kind.storage && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// The events after `cursor` (all kinds; the caller filters) and the resourceVersion they
    /// bring the caller up to; 410 Gone when events after `cursor` were compacted away.
    pub fn events_after(&self, cursor: u64) -> Result<(Vec<StoredEvent>, u64), ApiError> {
        let inner = self.lock();
        if cursor < inner.compacted_rv {
            return Err(self.expired(format!(
                "too old resource version: {cursor} ({})",
                inner.compacted_rv
            )));
        }
        let first = inner.history.partition_point(|e| e.rv <= cursor);
        let events = inner.history.range(first..).cloned().collect();
        Ok((events, inner.rv.max(cursor)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::resources::find;

    fn store(history: usize) -> Store {
        Store::new(StoreConfig {
            history_size: history,
        })
    }

    fn pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
    }

    #[test]
    fn pagination_walks_one_consistent_snapshot() {
        let s = store(1000);
        let pods = find("", "v1", "pods").unwrap();
        for i in 0..7 {
            s.create(pods, Some("default"), pod(&format!("p{i}"), "n1"))
                .unwrap();
        }
        let mut opts = ListOptions {
            limit: Some(3),
            ..Default::default()
        };
        let first = s.list(pods, Some("default"), &opts).unwrap();
        assert_eq!(first.items.len(), 3);
        assert_eq!(first.remaining_item_count, Some(4));
        // Changes after the first page do not show up in later pages.
        s.delete(pods, Some("default"), "p5", None, None).unwrap();
        s.create(pods, Some("default"), pod("p9", "n1")).unwrap();
        let mut names: Vec<String> = first
            .items
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        let mut token = first.continue_token.clone();
        while let Some(t) = token {
            opts.continue_token = Some(t);
            let page = s.list(pods, Some("default"), &opts).unwrap();
            assert_eq!(page.resource_version, first.resource_version);
            names.extend(
                page.items
                    .iter()
                    .map(|o| o["metadata"]["name"].as_str().unwrap().to_string()),
            );
            token = page.continue_token;
        }
        assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);
        // A fresh list sees the new state.
        let now = s.list(pods, None, &ListOptions::default()).unwrap();
        assert_eq!(now.items.len(), 7);
        assert!(now.continue_token.is_none());
    }

    /// remainingItemCount from a page that follows another (remembered from the page before)
    /// equals the count of what is left: two listers interleaved, writes between their pages,
    /// one of them in a namespace, and a token used twice.
    #[test]
    fn remaining_counts_follow_each_list_in_its_snapshot() {
        let s = store(1000);
        let pods = find("", "v1", "pods").unwrap();
        let ns = find("", "v1", "namespaces").unwrap();
        for n in ["a", "b"] {
            s.create(ns, None, json!({"metadata": {"name": n}}))
                .unwrap();
        }
        for i in 0..10 {
            s.create(
                pods,
                Some(if i % 2 == 0 { "a" } else { "b" }),
                pod(&format!("p{i}"), "n1"),
            )
            .unwrap();
        }
        let walk = |namespace: Option<&str>, limit: usize| {
            let opts = ListOptions {
                limit: Some(limit),
                ..Default::default()
            };
            let page = s.list(pods, namespace, &opts).unwrap();
            (opts, page)
        };
        let (mut all_opts, mut all) = walk(None, 3);
        let (mut a_opts, mut a) = walk(Some("a"), 2);
        let (mut seen_all, mut seen_a) = (all.items.len() as u64, a.items.len() as u64);
        assert_eq!(
            (all.remaining_item_count, a.remaining_item_count),
            (Some(7), Some(3))
        );
        let mut i = 10;
        while all.continue_token.is_some() || a.continue_token.is_some() {
            // Writes between pages: the snapshots do not see them.
            s.create(pods, Some("a"), pod(&format!("p{i}"), "n1"))
                .unwrap();
            s.delete(
                pods,
                Some(if i % 2 == 0 { "a" } else { "b" }),
                &format!("p{}", i - 10),
                None,
                None,
            )
            .unwrap();
            i += 1;
            if let Some(t) = all.continue_token.clone() {
                all_opts.continue_token = Some(t);
                // The same token twice gives the same page.
                let again = s.list(pods, None, &all_opts).unwrap();
                all = s.list(pods, None, &all_opts).unwrap();
                assert_eq!(again.remaining_item_count, all.remaining_item_count);
                seen_all += all.items.len() as u64;
                assert_eq!(all.remaining_item_count.unwrap_or(0), 10 - seen_all);
            }
            if let Some(t) = a.continue_token.clone() {
                a_opts.continue_token = Some(t);
                a = s.list(pods, Some("a"), &a_opts).unwrap();
                seen_a += a.items.len() as u64;
                assert_eq!(a.remaining_item_count.unwrap_or(0), 5 - seen_a);
            }
        }
        assert_eq!((seen_all, seen_a), (10, 5));
    }

    #[test]
    fn lists_in_etcd_key_order_and_pages_within_a_namespace() {
        let s = store(1000);
        let pods = find("", "v1", "pods").unwrap();
        let ns = find("", "v1", "namespaces").unwrap();
        for n in ["a", "a-b", "b"] {
            s.create(ns, None, json!({"metadata": {"name": n}}))
                .unwrap();
        }
        for (n, p) in [
            ("a", "x"),
            ("a-b", "x"),
            ("a", "y"),
            ("b", "x"),
            ("a-b", "y"),
        ] {
            s.create(pods, Some(n), pod(p, "n1")).unwrap();
        }
        let key = |o: &Arc<Value>| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        };
        // etcd compares "a-b/x" with "a/x" byte by byte: '-' < '/'.
        let all = s.list(pods, None, &ListOptions::default()).unwrap();
        let keys: Vec<String> = all.items.iter().map(key).collect();
        assert_eq!(keys, ["a-b/x", "a-b/y", "a/x", "a/y", "b/x"]);
        // One namespace, one item per page, a write between pages.
        let mut opts = ListOptions {
            limit: Some(1),
            ..Default::default()
        };
        let first = s.list(pods, Some("a"), &opts).unwrap();
        assert_eq!(first.remaining_item_count, Some(1));
        s.create(pods, Some("a"), pod("z", "n1")).unwrap();
        s.delete(pods, Some("a"), "y", None, None).unwrap();
        opts.continue_token = first.continue_token.clone();
        let second = s.list(pods, Some("a"), &opts).unwrap();
        assert_eq!(second.items.iter().map(key).collect::<Vec<_>>(), ["a/y"]);
        assert!(
            second.continue_token.is_none(),
            "a/z came after the snapshot"
        );
        // Label-selected pages skip what does not match and say whether more may follow.
        let selected = ListOptions {
            limit: Some(1),
            label_selector: LabelSelector::parse("app=x").unwrap(),
            ..Default::default()
        };
        let page = s.list(pods, None, &selected).unwrap();
        assert_eq!(page.items.iter().map(key).collect::<Vec<_>>(), ["a-b/x"]);
        assert!(page.continue_token.is_some() && page.remaining_item_count.is_none());
    }

    #[test]
    fn expired_continue_token_is_410() {
        let s = store(4);
        let pods = find("", "v1", "pods").unwrap();
        for i in 0..4 {
            s.create(pods, Some("default"), pod(&format!("p{i}"), "n1"))
                .unwrap();
        }
        let first = s
            .list(
                pods,
                None,
                &ListOptions {
                    limit: Some(2),
                    ..Default::default()
                },
            )
            .unwrap();
        for i in 0..5 {
            s.create(pods, Some("default"), pod(&format!("q{i}"), "n1"))
                .unwrap();
        }
        let err = s
            .list(
                pods,
                None,
                &ListOptions {
                    limit: Some(2),
                    continue_token: first.continue_token,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    #[test]
    fn stale_update_conflicts_and_events_are_in_order() {
        let s = store(1000);
        let pods = find("", "v1", "pods").unwrap();
        let start = s.resource_version();
        let p = s.create(pods, Some("default"), pod("a", "n1")).unwrap();
        let mut newer = p.clone();
        newer["metadata"]["labels"]["x"] = json!("1");
        s.update(pods, Some("default"), "a", newer, false).unwrap();
        let mut stale = p.clone();
        stale["metadata"]["labels"]["x"] = json!("2");
        let err = s
            .update(pods, Some("default"), "a", stale, false)
            .unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        assert_eq!(
            s.create(pods, Some("default"), pod("a", "n1"))
                .unwrap_err()
                .reason,
            "AlreadyExists"
        );
        assert_eq!(
            s.create(pods, Some("nope"), pod("b", "n1"))
                .unwrap_err()
                .code,
            404
        );
        s.delete(pods, Some("default"), "a", None, None).unwrap();
        let (events, rv) = s.events_after(start).unwrap();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
        assert_eq!(rv, s.resource_version());
        assert!(events.windows(2).all(|w| w[0].rv < w[1].rv));
    }

    #[test]
    fn events_share_storage_across_both_apis() {
        let s = store(1000);
        let core = find("", "v1", "events").unwrap();
        let v1 = find("events.k8s.io", "v1", "events").unwrap();
        s.create(v1, Some("default"), json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1"},
            "regarding": {"kind": "Node", "name": "n1"}, "note": "hi", "reason": "R", "type": "Normal"})).unwrap();
        let c = s.get(core, Some("default"), "e1").unwrap();
        assert_eq!(
            (
                c["apiVersion"].as_str(),
                c["message"].as_str(),
                c["involvedObject"]["name"].as_str()
            ),
            (Some("v1"), Some("hi"), Some("n1"))
        );
        let back = s.get(v1, Some("default"), "e1").unwrap();
        assert_eq!(back["note"], "hi");
    }
}
