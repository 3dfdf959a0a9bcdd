//! The API stand-in over HTTP: raw REST calls, watches, kube-rs (Api, watcher, reflector,
//! Recorder) and kubectl against a server on 127.0.0.1 with an ephemeral port.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncBufReadExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, ObjectReference, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use serde_json::{json, Value};
use tokio::time::{timeout, Instant};

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kwire-lab-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Lab {
    server: ApiServer,
    client: kube::Client,
    kubeconfig: PathBuf,
    _dir: TempDir,
}

fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn lab_with(config: ApiServerConfig) -> Lab {
    install_crypto();
    let server = ApiServer::start(config)
        .await
        .expect("start the API stand-in");
    let dir = TempDir::new("api");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    Lab {
        server,
        client,
        kubeconfig,
        _dir: dir,
    }
}

async fn lab() -> Lab {
    lab_with(ApiServerConfig::default()).await
}

fn req(
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<Value>,
) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(
            body.map(|b| serde_json::to_vec(&b).unwrap())
                .unwrap_or_default(),
        )
        .unwrap()
}

/// Sends a request; Ok(body) on 2xx, Err(Status as JSON) otherwise.
async fn call(
    c: &kube::Client,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, kube::core::Status> {
    call_typed(c, method, path, "application/json", body).await
}

async fn call_typed(
    c: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<Value>,
) -> Result<Value, kube::core::Status> {
    match c.request_text(req(method, path, content_type, body)).await {
        Ok(text) => Ok(serde_json::from_str(&text).unwrap_or(Value::String(text))),
        Err(kube::Error::Api(status)) => Err(*status),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
}

fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Reads newline-delimited watch events, each within the deadline; None at the end of the stream.
struct WatchLines {
    lines: futures::io::Lines<Box<dyn futures::AsyncBufRead + Unpin + Send>>,
}

impl WatchLines {
    async fn open(c: &kube::Client, path: &str) -> Self {
        let body = c
            .request_stream(req("GET", path, "application/json", None))
            .await
            .unwrap();
        let boxed: Box<dyn futures::AsyncBufRead + Unpin + Send> = Box::new(body);
        WatchLines {
            lines: boxed.lines(),
        }
    }
    async fn next(&mut self) -> Option<Value> {
        let line = timeout(DEADLINE, self.lines.next())
            .await
            .expect("watch event within the deadline")?;
        Some(serde_json::from_str(&line.unwrap()).unwrap())
    }
}

/// Waits until `cond` holds, polling; fails the test at the deadline.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn crud_conflicts_and_statuses() {
    let lab = lab().await;
    let c = &lab.client;
    let ns = "/api/v1/namespaces/default/pods";
    let created = call(c, "POST", ns, Some(pod("a", "node-a"))).await.unwrap();
    assert_eq!(created["metadata"]["namespace"], "default");
    assert_eq!(created["metadata"]["generation"], 1);
    assert_eq!(created["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(created["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(created["status"]["phase"], "Pending");

    let exists = call(c, "POST", ns, Some(pod("a", "node-a")))
        .await
        .unwrap_err();
    assert_eq!(
        (exists.code, exists.reason.as_str()),
        (409, "AlreadyExists")
    );

    let got = call(c, "GET", &format!("{ns}/a"), None).await.unwrap();
    assert_eq!(got, created);

    // Update with the current resourceVersion works; with a stale one, 409 Conflict.
    let mut upd = got.clone();
    upd["metadata"]["labels"]["tier"] = json!("web");
    let updated = call(c, "PUT", &format!("{ns}/a"), Some(upd)).await.unwrap();
    assert!(rv_of(&updated) > rv_of(&created));
    let mut stale = got.clone();
    stale["metadata"]["labels"]["tier"] = json!("db");
    let conflict = call(c, "PUT", &format!("{ns}/a"), Some(stale))
        .await
        .unwrap_err();
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));

    // 404 as a Status object, 422 for an invalid object, 404 for a missing namespace.
    let missing = call(c, "GET", &format!("{ns}/nope"), None)
        .await
        .unwrap_err();
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "pods \"nope\" not found");
    let raw = c
        .request_text(req("GET", &format!("{ns}/nope"), "application/json", None))
        .await;
    assert!(
        matches!(raw, Err(kube::Error::Api(s)) if s.status == Some(kube::core::response::StatusSummary::Failure))
    );
    let invalid = call(c, "POST", ns, Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Bad_Name"}, "spec": {}}))).await.unwrap_err();
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    let no_ns = call(
        c,
        "POST",
        "/api/v1/namespaces/ghost/pods",
        Some(pod("b", "n")),
    )
    .await
    .unwrap_err();
    assert_eq!(no_ns.code, 404);

    // All-namespaces list, cluster-scoped list, label and field selectors.
    call(
        c,
        "POST",
        "/api/v1/namespaces",
        Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})),
    )
    .await
    .unwrap();
    call(
        c,
        "POST",
        "/api/v1/namespaces/other/pods",
        Some(pod("b", "node-b")),
    )
    .await
    .unwrap();
    let all = call(c, "GET", "/api/v1/pods", None).await.unwrap();
    assert_eq!(all["kind"], "PodList");
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let on_b = call(
        c,
        "GET",
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-b",
        None,
    )
    .await
    .unwrap();
    assert_eq!(on_b["items"][0]["metadata"]["name"], "b");
    assert_eq!(on_b["items"].as_array().unwrap().len(), 1);
    let by_label = call(
        c,
        "GET",
        "/api/v1/pods?labelSelector=app%20in%20(a,x),tier",
        None,
    )
    .await
    .unwrap();
    assert_eq!(by_label["items"].as_array().unwrap().len(), 1);
    let bad_field = call(
        c,
        "GET",
        "/api/v1/pods?fieldSelector=spec.hostname%3Dx",
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(bad_field.code, 400);
    let namespaces = call(c, "GET", "/api/v1/namespaces", None).await.unwrap();
    assert!(namespaces["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["metadata"]["labels"]["kubernetes.io/metadata.name"] == "other"));

    // Merge patch, JSON patch, status subresource.
    let patched = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"labels": {"tier": null, "x": "1"}}})),
    )
    .await
    .unwrap();
    assert_eq!(patched["metadata"]["labels"], json!({"app": "a", "x": "1"}));
    let jp = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a"),
        "application/json-patch+json",
        Some(json!([{"op": "test", "path": "/metadata/labels/x", "value": "1"}, {"op": "replace", "path": "/metadata/labels/x", "value": "2"}])),
    )
    .await
    .unwrap();
    assert_eq!(jp["metadata"]["labels"]["x"], "2");
    let failed_test = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a"),
        "application/json-patch+json",
        Some(json!([{"op": "test", "path": "/metadata/labels/x", "value": "9"}])),
    )
    .await
    .unwrap_err();
    assert_eq!(failed_test.code, 422);
    let st = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a/status"),
        "application/merge-patch+json",
        Some(json!({"status": {"podIP": "10.244.0.5"}, "spec": {"nodeName": "evil"}})),
    )
    .await
    .unwrap();
    assert_eq!(st["status"]["podIP"], "10.244.0.5");
    assert_eq!(
        st["spec"]["nodeName"], "node-a",
        "status writes change only status"
    );
    let apply = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a"),
        "application/apply-patch+yaml",
        Some(json!({})),
    )
    .await
    .unwrap_err();
    assert_eq!(apply.code, 415);
    // Strategic merge patch: status.conditions merge by type (the kubelet's Ready stays when
    // another writer sets its own condition).
    call_typed(
        c,
        "PATCH",
        &format!("{ns}/a/status"),
        "application/merge-patch+json",
        Some(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
    )
    .await
    .unwrap();
    let smp = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a/status"),
        "application/strategic-merge-patch+json",
        Some(json!({"status": {"conditions": [{"type": "KwireReady", "status": "False"}]}})),
    )
    .await
    .unwrap();
    assert_eq!(
        smp["status"]["conditions"],
        json!([{"type": "Ready", "status": "True"}, {"type": "KwireReady", "status": "False"}])
    );
    let bad = call_typed(
        c,
        "PATCH",
        &format!("{ns}/a"),
        "application/strategic-merge-patch+json",
        Some(json!({"$frob": true})),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code, 422);

    // Delete preconditions, and namespaces that may not be deleted.
    let wrong_uid = call(c, "DELETE", &format!("{ns}/a"), Some(json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": "not-the-uid"}})))
        .await
        .unwrap_err();
    assert_eq!(
        (wrong_uid.code, wrong_uid.reason.as_str()),
        (409, "Conflict")
    );
    let default_ns = call(c, "DELETE", "/api/v1/namespaces/default", None)
        .await
        .unwrap_err();
    assert_eq!(default_ns.code, 403);

    // Delete returns the object; a second delete is 404.
    let gone = call(c, "DELETE", &format!("{ns}/a"), None).await.unwrap();
    assert_eq!(gone["metadata"]["name"], "a");
    assert_eq!(
        call(c, "DELETE", &format!("{ns}/a"), None)
            .await
            .unwrap_err()
            .code,
        404
    );
    let node = call(
        c,
        "POST",
        "/api/v1/nodes",
        Some(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})),
    )
    .await
    .unwrap();
    assert!(node["spec"].get("podCIDRs").is_none());
    let node = call(c, "GET", "/api/v1/nodes/n1", None).await.unwrap();
    assert_eq!(node["spec"]["podCIDRs"], json!(["10.244.0.0/24"]));
    let status = call(c, "DELETE", "/api/v1/nodes/n1", None).await.unwrap();
    assert_eq!(
        (status["kind"].as_str(), status["status"].as_str()),
        (Some("Status"), Some("Success"))
    );
}

#[tokio::test]
async fn discovery_documents() {
    let lab = lab().await;
    let c = &lab.client;
    let v = c.apiserver_version().await.unwrap();
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "33"));
    let core = c.list_core_api_resources("v1").await.unwrap();
    let nodes = core.resources.iter().find(|r| r.name == "nodes").unwrap();
    assert!(!nodes.namespaced);
    assert!(nodes.verbs.contains(&"watch".to_string()));
    assert!(core
        .resources
        .iter()
        .any(|r| r.name == "pods" && r.namespaced && r.kind == "Pod"));
    let groups = c.list_api_groups().await.unwrap();
    let names: Vec<&str> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "discovery.k8s.io",
            "networking.k8s.io",
            "events.k8s.io",
            "rbac.authorization.k8s.io",
            "admissionregistration.k8s.io",
            "apiextensions.k8s.io"
        ]
    );
    for gv in [
        "discovery.k8s.io/v1",
        "networking.k8s.io/v1",
        "events.k8s.io/v1",
    ] {
        assert!(
            !c.list_api_group_resources(gv)
                .await
                .unwrap()
                .resources
                .is_empty(),
            "{gv}"
        );
    }
    assert_eq!(
        call(c, "GET", "/apis/apps/v1", None)
            .await
            .unwrap_err()
            .code,
        404
    );
}

#[tokio::test]
async fn watch_delivers_events_in_order_from_a_resource_version() {
    let lab = lab().await;
    let c = &lab.client;
    let ns = "/api/v1/namespaces/default/pods";
    call(c, "POST", ns, Some(pod("p1", "n"))).await.unwrap();
    let list = call(c, "GET", ns, None).await.unwrap();
    let from = rv_of(&list);
    let mut w = WatchLines::open(c, &format!("{ns}?watch=true&resourceVersion={from}")).await;
    let mut w2 = WatchLines::open(
        c,
        &format!("/api/v1/pods?watch=true&resourceVersion={from}"),
    )
    .await;
    call(c, "POST", ns, Some(pod("p2", "n"))).await.unwrap();
    call_typed(
        c,
        "PATCH",
        &format!("{ns}/p1"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    call(c, "DELETE", &format!("{ns}/p2"), None).await.unwrap();
    // Another kind's write does not show up in the pod watch.
    lab.server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}))
        .unwrap();
    let mut seen = Vec::new();
    let mut last = from;
    for _ in 0..3 {
        let ev = w.next().await.unwrap();
        let rv = rv_of(&ev["object"]);
        assert!(rv > last, "resourceVersions increase: {ev}");
        last = rv;
        seen.push(format!(
            "{} {}",
            ev["type"].as_str().unwrap(),
            ev["object"]["metadata"]["name"].as_str().unwrap()
        ));
    }
    assert_eq!(seen, ["ADDED p2", "MODIFIED p1", "DELETED p2"]);
    // Fan-out: an all-namespaces watcher from the same resourceVersion gets the same events.
    let mut seen2 = Vec::new();
    for _ in 0..3 {
        let ev = w2.next().await.unwrap();
        seen2.push(format!(
            "{} {}",
            ev["type"].as_str().unwrap(),
            ev["object"]["metadata"]["name"].as_str().unwrap()
        ));
    }
    assert_eq!(seen, seen2);
    // The old single-object watch path works as a watch on metadata.name.
    let mut one = WatchLines::open(c, &format!("{ns}/p1?watch=true&resourceVersion={last}")).await;
    call_typed(
        c,
        "PATCH",
        &format!("{ns}/p1"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"annotations": {"k": "v"}}})),
    )
    .await
    .unwrap();
    let ev = one.next().await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["annotations"]["k"].as_str()
        ),
        (Some("MODIFIED"), Some("v"))
    );
    last = rv_of(&ev["object"]);

    // Without a resourceVersion, the watch starts with the current objects as ADDED.
    let mut w0 = WatchLines::open(c, "/api/v1/nodes?watch=1&resourceVersion=0").await;
    let ev = w0.next().await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("n"))
    );
    assert_eq!(ev["object"]["spec"]["podCIDRs"], json!(["10.244.0.0/24"]));

    // `kubectl get -w` asks for Tables: each event's object is then a one-row Table.
    let table_req = http::Request::builder()
        .uri(format!("{ns}?watch=true&resourceVersion={from}"))
        .header(
            "accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .unwrap();
    let body: Box<dyn futures::AsyncBufRead + Unpin + Send> =
        Box::new(c.request_stream(table_req).await.unwrap());
    let mut tw = WatchLines {
        lines: body.lines(),
    };
    let ev = tw.next().await.unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["object"]["kind"].as_str()),
        (Some("ADDED"), Some("Table"))
    );
    assert_eq!(ev["object"]["rows"][0]["cells"][0], "p2");

    // A label-selected watch sees an object leave the selection as DELETED.
    let mut sel = WatchLines::open(
        c,
        &format!("{ns}?watch=true&labelSelector=x%3Dy&resourceVersion={last}"),
    )
    .await;
    call_typed(
        c,
        "PATCH",
        &format!("{ns}/p1"),
        "application/merge-patch+json",
        Some(json!({"metadata": {"labels": {"x": "z"}}})),
    )
    .await
    .unwrap();
    let ev = sel.next().await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("DELETED"), Some("p1"))
    );
}

#[tokio::test]
async fn bookmarks_carry_only_the_resource_version() {
    let lab = lab_with(ApiServerConfig {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let c = &lab.client;
    let rv = lab.server.store().resource_version();
    let mut w = WatchLines::open(
        c,
        &format!("/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"),
    )
    .await;
    let ev = w.next().await.unwrap();
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(
        ev["object"],
        json!({"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}})
    );

    // sendInitialEvents: current objects, then a bookmark with the initial-events-end annotation.
    lab.server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}))
        .unwrap();
    let mut w = WatchLines::open(c, "/api/v1/nodes?watch=true&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan").await;
    assert_eq!(w.next().await.unwrap()["type"], "ADDED");
    let end = w.next().await.unwrap();
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

/// kube-apiserver's schedule, no kinder: with bookmarks a minute apart, a 4 s watch gets one
/// bookmark, 2 s before its end, and then ends; none without allowWatchBookmarks.
#[tokio::test]
async fn a_short_watch_gets_one_bookmark_two_seconds_before_its_end() {
    let lab = lab_with(ApiServerConfig::default()).await;
    let c = &lab.client;
    let rv = lab.server.store().resource_version();
    let start = Instant::now();
    let mut w = WatchLines::open(
        c,
        &format!("/api/v1/nodes?watch=true&allowWatchBookmarks=true&timeoutSeconds=4&resourceVersion={rv}"),
    )
    .await;
    let ev = w.next().await.unwrap();
    let at = start.elapsed();
    assert_eq!(ev["type"], "BOOKMARK");
    assert!(
        at >= Duration::from_millis(1900),
        "the bookmark came {at:?} into a 4 s watch, before its pre-timeout moment"
    );
    assert!(
        w.next().await.is_none(),
        "the watch ends after its one bookmark"
    );
    let end = start.elapsed();
    assert!(
        end >= Duration::from_millis(3900),
        "the watch ended at {end:?}"
    );
    assert!(
        end - at >= Duration::from_secs(1),
        "the bookmark ({at:?}) came well before the end ({end:?}), not at it"
    );

    let mut w = WatchLines::open(
        c,
        &format!("/api/v1/nodes?watch=true&timeoutSeconds=3&resourceVersion={rv}"),
    )
    .await;
    assert!(w.next().await.is_none(), "no bookmark unless asked for");
}

#[tokio::test]
async fn too_old_resource_version_is_410() {
    let lab = lab_with(ApiServerConfig {
        history_size: 4,
        ..Default::default()
    })
    .await;
    let c = &lab.client;
    let ns = "/api/v1/namespaces/default/pods";
    let old = lab.server.store().resource_version();
    for i in 0..6 {
        call(c, "POST", ns, Some(pod(&format!("p{i}"), "n")))
            .await
            .unwrap();
    }
    // A watch gets an ERROR event with a 410 Status, then the stream ends.
    let mut w = WatchLines::open(c, &format!("{ns}?watch=true&resourceVersion={old}")).await;
    let ev = w.next().await.unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(
        (
            ev["object"]["kind"].as_str(),
            ev["object"]["code"].as_u64(),
            ev["object"]["reason"].as_str()
        ),
        (Some("Status"), Some(410), Some("Expired"))
    );
    assert!(w.next().await.is_none());
    // A list continuing an expired snapshot gets HTTP 410.
    let page = call(c, "GET", &format!("{ns}?limit=2"), None)
        .await
        .unwrap();
    let token = page["metadata"]["continue"].as_str().unwrap().to_string();
    assert_eq!(page["metadata"]["remainingItemCount"], 4);
    let next = call(c, "GET", &format!("{ns}?limit=2&continue={token}"), None)
        .await
        .unwrap();
    assert_eq!(next["items"][0]["metadata"]["name"], "p2");
    call(c, "POST", ns, Some(pod("late", "n"))).await.unwrap();
    lab.server.compact_history();
    let gone = call(c, "GET", &format!("{ns}?limit=2&continue={token}"), None)
        .await
        .unwrap_err();
    assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));
    // An exact read of a compacted resourceVersion too.
    let exact = call(
        c,
        "GET",
        &format!("{ns}?resourceVersion={old}&resourceVersionMatch=Exact"),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(exact.code, 410);
}

#[tokio::test]
async fn timeout_seconds_ends_the_watch_cleanly() {
    let lab = lab().await;
    let started = Instant::now();
    let mut w = WatchLines::open(&lab.client, "/api/v1/pods?watch=true&timeoutSeconds=1").await;
    assert!(w.next().await.is_none(), "no events, then a clean end");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn stop_and_resume_keep_the_store_and_port() {
    let lab = lab().await;
    let c = &lab.client;
    let node = lab
        .server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}))
        .unwrap();
    let mut w = WatchLines::open(
        c,
        &format!("/api/v1/nodes?watch=true&resourceVersion={}", rv_of(&node)),
    )
    .await;
    assert_eq!(
        w.next().await.unwrap()["type"],
        "MODIFIED",
        "podCIDR allocation"
    );
    lab.server.stop().await;
    // The open watch is cut, and new connections are refused.
    let cut = timeout(DEADLINE, w.lines.next())
        .await
        .expect("the watch ends when the server stops");
    assert!(cut.is_none() || cut.unwrap().is_err());
    assert!(tokio::net::TcpStream::connect(lab.server.addr())
        .await
        .is_err());
    // The store keeps working in-process while the server is down.
    let nodes = ApiServer::kind("v1", "Node").unwrap();
    lab.server
        .merge_patch(
            nodes,
            None,
            "n",
            &json!({"metadata": {"labels": {"down": "yes"}}}),
            false,
        )
        .unwrap();
    lab.server.resume().await.unwrap();
    let got = call(c, "GET", "/api/v1/nodes/n", None).await.unwrap();
    assert_eq!(got["metadata"]["labels"]["down"], "yes");
    assert_eq!(got["metadata"]["uid"], node["metadata"]["uid"]);
    assert!(rv_of(&got) > rv_of(&node));
}

/// A raw HTTPS request with an optional bearer token: (status code, body).
async fn raw(
    lab: &Lab,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let tls = kwire_lab::apiserver::tls::client_config(lab.server.ca_pem()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let tcp = tokio::net::TcpStream::connect(lab.server.addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = connector
        .connect(name, tcp)
        .await
        .expect("TLS with the server's CA");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ct = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: {ct}\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Chunked or not: the JSON object is between the first '{' and the last '}'.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => serde_json::from_str(&body[a..=b]).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    (code, json)
}

#[tokio::test]
async fn https_only_and_unknown_tokens_get_401_anonymous_gets_403() {
    let lab = lab().await;
    // Plain HTTP is not spoken.
    let mut s = tokio::net::TcpStream::connect(lab.server.addr())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        !String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
        "plain HTTP answered"
    );
    let (code, body) = raw(&lab, "GET", "/api/v1/nodes", Some("not-a-token"), None).await;
    assert_eq!((code, body["reason"].as_str()), (401, Some("Unauthorized")));
    let (code, body) = raw(&lab, "GET", "/api/v1/nodes", None, None).await;
    assert_eq!(code, 403);
    assert_eq!(
        body["message"],
        "nodes is forbidden: User \"system:anonymous\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
    );
    assert_eq!((raw(&lab, "GET", "/version", None, None).await).0, 200);
    let text = std::fs::read_to_string(&lab.kubeconfig).unwrap();
    assert!(
        text.contains("server: \"https://127.0.0.1:")
            && text.contains("certificate-authority-data: ")
    );
}

/// deploy/'s RBAC and admission policy, applied as `kwire-lab up` applies them, decide what a
/// node's agent token may do: its own Node's kwire.dev annotations and KwireReady condition,
/// nothing of another Node, no Secrets.
#[tokio::test]
async fn agent_tokens_are_held_to_deploys_rbac_and_admission_policy() {
    let lab = lab().await;
    for o in kwire_lab::manifests::api_objects().unwrap() {
        lab.server.create(o).unwrap();
    }
    for n in ["n1", "n2"] {
        lab.server
            .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n, "labels": {"role": "worker"}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
            .unwrap();
    }
    let t1 = lab
        .server
        .issue_service_account_token("kube-system", "kwire", Some("n1"));
    let t1 = Some(t1.as_str());
    let ann = |k: &str| json!({"metadata": {"annotations": {k: "x"}}});
    assert_eq!(raw(&lab, "GET", "/api/v1/nodes", t1, None).await.0, 200);
    assert_eq!(
        raw(
            &lab,
            "PATCH",
            "/api/v1/nodes/n1",
            t1,
            Some(ann("kwire.dev/public-key"))
        )
        .await
        .0,
        200
    );
    let (code, body) = raw(
        &lab,
        "PATCH",
        "/api/v1/nodes/n2",
        t1,
        Some(ann("kwire.dev/public-key")),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["message"],
        "nodes \"n2\" is forbidden: ValidatingAdmissionPolicy 'kwire-agent-own-node' with binding 'kwire-agent-own-node' denied request: the kwire agent of node n1 may change only its own Node, not n2"
    );
    let denied = |body: &Value, what: &str| {
        assert!(
            body["message"].as_str().unwrap_or("").ends_with(what),
            "{body}"
        )
    };
    let (code, body) = raw(
        &lab,
        "PATCH",
        "/api/v1/nodes/n1",
        t1,
        Some(ann("example.com/x")),
    )
    .await;
    assert_eq!(code, 403);
    denied(
        &body,
        "kwire agents may change only the kwire.dev/* annotations of their Node",
    );
    let (code, body) = raw(
        &lab,
        "PATCH",
        "/api/v1/nodes/n1",
        t1,
        Some(json!({"metadata": {"labels": {"role": null}}})),
    )
    .await;
    assert_eq!(code, 403);
    denied(
        &body,
        "may not change their Node's labels, finalizers, owners or other metadata",
    );
    let (code, body) = raw(
        &lab,
        "PATCH",
        "/api/v1/nodes/n1",
        t1,
        Some(json!({"spec": {"unschedulable": true}})),
    )
    .await;
    assert_eq!(code, 403);
    denied(
        &body,
        "may not change their Node's spec (podCIDRs, taints, unschedulable)",
    );
    let kwire_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "KwireReady", "status": "True"}]}});
    assert_eq!(
        raw(
            &lab,
            "PATCH",
            "/api/v1/nodes/n1/status",
            t1,
            Some(kwire_ready)
        )
        .await
        .0,
        200
    );
    let (code, body) = raw(
        &lab,
        "PATCH",
        "/api/v1/nodes/n1/status",
        t1,
        Some(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})),
    )
    .await;
    assert_eq!(code, 403);
    denied(
        &body,
        "may change only their own condition (KwireReady) of their Node",
    );
    // RBAC: no PUT, no delete, no Secrets.
    let (code, body) = raw(&lab, "DELETE", "/api/v1/nodes/n1", t1, None).await;
    assert_eq!(code, 403);
    denied(
        &body,
        "cannot delete resource \"nodes\" in API group \"\" at the cluster scope",
    );
    let (code, body) = raw(
        &lab,
        "GET",
        "/api/v1/namespaces/kube-system/secrets",
        t1,
        None,
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(
        body["message"],
        "secrets is forbidden: User \"system:serviceaccount:kube-system:kwire\" cannot list resource \"secrets\" in API group \"\" in the namespace \"kube-system\""
    );
    assert_eq!(body["details"]["kind"], "secrets");
    // Without the ServiceAccount the token is worth nothing.
    let sa = ApiServer::kind("v1", "ServiceAccount").unwrap();
    lab.server.delete(sa, Some("kube-system"), "kwire").unwrap();
    assert_eq!(raw(&lab, "GET", "/api/v1/nodes", t1, None).await.0, 401);
    let audit = lab.server.audit();
    assert!(audit
        .iter()
        .any(|e| e.username == "system:serviceaccount:kube-system:kwire"
            && e.verb == "list"
            && e.resource == "secrets"
            && !e.allowed));
}

/// `stop` then `resume` while another process holds a copy of the listening socket (a child
/// forked while the server ran, not yet exec'd): the port is taken back, not AddrInUse.
#[tokio::test]
async fn resume_works_while_a_forked_child_holds_the_listening_socket() {
    let lab = lab().await;
    // Safety: the child only sleeps and exits (async-signal-safe calls), whatever the state of
    // the parent's other threads.
    let child = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let _ = nix::unistd::sleep(3);
            unsafe { nix::libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    lab.server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(lab.server.addr())
            .await
            .is_err(),
        "refused while stopped"
    );
    lab.server
        .resume()
        .await
        .expect("resume takes the port back");
    assert!(call(&lab.client, "GET", "/api/v1/nodes", None)
        .await
        .is_ok());
    let _ = nix::sys::wait::waitpid(child, None);
}

// ---- kube-rs ----

#[tokio::test]
async fn kube_rs_api_list_get_create_patch() {
    let lab = lab().await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let n: Node = serde_json::from_value(
        json!({"metadata": {"name": "node-a", "labels": {"role": "worker"}}}),
    )
    .unwrap();
    let created = nodes.create(&PostParams::default(), &n).await.unwrap();
    assert!(created.metadata.uid.is_some());
    let got = nodes.get("node-a").await.unwrap();
    assert_eq!(
        got.spec.unwrap().pod_cidrs.unwrap(),
        vec!["10.244.0.0/24".to_string()]
    );
    let listed = nodes
        .list(&ListParams::default().labels("role=worker"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(listed.metadata.resource_version.is_some());
    let patched = nodes
        .patch(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"kwire.dev/public-key": "k"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.metadata.annotations.unwrap()["kwire.dev/public-key"],
        "k"
    );
    // Node conditions through the status subresource, as the daemon writes them.
    let cond = json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "KwireReady", "message": "ok",
        "lastTransitionTime": "2025-01-01T00:00:00Z"}]}});
    let st = nodes
        .patch_status("node-a", &PatchParams::default(), &Patch::Merge(cond))
        .await
        .unwrap();
    assert_eq!(
        st.status.unwrap().conditions.unwrap()[0].type_,
        "NetworkUnavailable"
    );
    let err = nodes.get("missing").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404));
    // get_opt relies on the 404 Status.
    assert!(nodes.get_opt("missing").await.unwrap().is_none());

    // Pods by spec.nodeName.
    let pods: Api<Pod> = Api::namespaced(lab.client.clone(), "default");
    for (name, node) in [("a", "node-a"), ("b", "node-b"), ("c", "node-a")] {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(pod(name, node)).unwrap(),
        )
        .await
        .unwrap();
    }
    let on_a = Api::<Pod>::all(lab.client.clone())
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    let names: Vec<String> = on_a
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "c"]);
    // Paged list through kube-rs' own pager parameters.
    let page = pods.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = pods
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
}

#[tokio::test]
async fn kube_rs_recorder_posts_events_k8s_io() {
    let lab = lab().await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-a"}})).unwrap(),
        )
        .await
        .unwrap();
    let recorder = kube::runtime::events::Recorder::new(lab.client.clone(), "kwire-agent".into());
    let reference = ObjectReference {
        kind: Some("Node".into()),
        name: Some("node-a".into()),
        api_version: Some("v1".into()),
        ..Default::default()
    };
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "PeerUp".into(),
        note: Some("handshake with node-b".into()),
        action: "Handshake".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap(); // the second one patches the series
    let core: Api<CoreEvent> = Api::namespaced(lab.client.clone(), "default");
    let listed = core
        .list(&ListParams::default().fields("involvedObject.name=node-a"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].message.as_deref(),
        Some("handshake with node-b")
    );
    assert_eq!(listed.items[0].reason.as_deref(), Some("PeerUp"));
}

#[tokio::test]
async fn kube_rs_reflector_follows_changes_and_recovers_from_410() {
    let lab = lab_with(ApiServerConfig {
        history_size: 8,
        bookmark_interval: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let (reader, writer) = reflector::store::<Node>();
    let inits = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (inits2, errors2) = (inits.clone(), errors.clone());
    let stream = reflector(
        writer,
        watcher(nodes.clone(), watcher::Config::default().timeout(30)),
    );
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream.default_backoff());
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::Init) => {
                    inits2.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(e) => errors2.lock().unwrap().push(e.to_string()),
            }
        }
    });
    let has = |name: &str| {
        let r = reader.clone();
        let name = name.to_string();
        move || {
            r.state()
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(name.as_str()))
        }
    };
    for name in ["a", "b"] {
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }
    wait_for("the reflector to see a and b", || has("a")() && has("b")()).await;
    nodes
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"kwire.dev/ready": "true"}}})),
        )
        .await
        .unwrap();
    let r = reader.clone();
    wait_for("the reflector to see the label", move || {
        r.state().iter().any(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key("kwire.dev/ready"))
        })
    })
    .await;
    nodes.delete("b", &Default::default()).await.unwrap();
    let gone_b = has("b");
    wait_for("the reflector to drop b", move || !gone_b()).await;
    assert_eq!(inits.load(Ordering::SeqCst), 1);
    assert_eq!(lab.server.store().expired_answers(), 0);

    // The API goes away; meanwhile nodes change and the history is compacted, so the
    // watcher's resourceVersion is gone: it must get 410 and re-list.
    lab.server.stop().await;
    let kind = ApiServer::kind("v1", "Node").unwrap();
    lab.server.delete(kind, None, "a").unwrap();
    lab.server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "c"}}))
        .unwrap();
    lab.server.compact_history();
    lab.server.resume().await.unwrap();
    let (has_a, has_c) = (has("a"), has("c"));
    wait_for("the reflector to re-list after 410", move || {
        !has_a() && has_c()
    })
    .await;
    assert!(
        inits.load(Ordering::SeqCst) >= 2,
        "a second initial list happened"
    );
    assert!(
        lab.server.store().expired_answers() >= 1,
        "the watcher was told 410 Gone"
    );
    let r = reader.clone();
    let c = r
        .state()
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some("c"))
        .unwrap();
    let has_cidr = || c.spec.as_ref().and_then(|s| s.pod_cidrs.clone()).is_some();
    assert!(has_cidr(), "the re-list carries the allocated podCIDRs");
    task.abort();
}

#[tokio::test]
async fn kube_rs_streaming_list_watcher() {
    let lab = lab().await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    for name in ["a", "b"] {
        lab.server
            .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
            .unwrap();
    }
    // sendInitialEvents=true: the watcher needs the initial-events-end bookmark to finish Init.
    let mut events = std::pin::pin!(watcher(nodes, watcher::Config::default().streaming_lists()));
    let mut seen = Vec::new();
    loop {
        match timeout(DEADLINE, events.next())
            .await
            .expect("watcher event")
            .unwrap()
            .unwrap()
        {
            watcher::Event::Init => {}
            watcher::Event::InitApply(n) => seen.push(n.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["a", "b"]);
    lab.server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "c"}}))
        .unwrap();
    match timeout(DEADLINE, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        watcher::Event::Apply(n) => assert_eq!(n.metadata.name.as_deref(), Some("c")),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn kube_rs_namespaces_services_endpointslices_networkpolicies() {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let lab = lab().await;
    let c = lab.client.clone();
    let pp = PostParams::default();
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}))
            .unwrap();
    let ns = Api::<Namespace>::all(c.clone())
        .create(&pp, &ns)
        .await
        .unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    assert_eq!(
        ns.metadata.labels.unwrap()["kubernetes.io/metadata.name"],
        "shop"
    );

    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})).unwrap();
    let svc = Api::<Service>::namespaced(c.clone(), "shop")
        .create(&pp, &svc)
        .await
        .unwrap();
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.2"));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));

    let slices: Api<EndpointSlice> = Api::namespaced(c.clone(), "shop");
    let slice: EndpointSlice = serde_json::from_value(json!({"metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "nodeName": "node-a"}],
        "ports": [{"name": "", "port": 8080}]})).unwrap();
    slices.create(&pp, &slice).await.unwrap();
    let by_service = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap();
    assert_eq!(by_service.items.len(), 1);
    assert_eq!(
        by_service.items[0].ports.as_ref().unwrap()[0]
            .protocol
            .as_deref(),
        Some("TCP")
    );

    let policies: Api<NetworkPolicy> = Api::namespaced(c.clone(), "shop");
    let np: NetworkPolicy = serde_json::from_value(
        json!({"metadata": {"name": "deny-all"}, "spec": {"podSelector": {}}}),
    )
    .unwrap();
    let np = policies.create(&pp, &np).await.unwrap();
    assert_eq!(
        np.spec.unwrap().policy_types.unwrap(),
        vec!["Ingress".to_string()]
    );
    assert_eq!(np.metadata.generation, Some(1));
    let np = policies
        .patch(
            "deny-all",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"egress": [], "policyTypes": ["Ingress", "Egress"]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        np.metadata.generation,
        Some(2),
        "a spec change bumps generation"
    );

    // A paged initial list through the watcher (page size 1) still sees every namespace.
    let all_ns = watcher(
        Api::<Namespace>::all(c.clone()),
        watcher::Config::default().page_size(1),
    );
    let mut all_ns = std::pin::pin!(all_ns);
    let mut names = Vec::new();
    loop {
        match timeout(DEADLINE, all_ns.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(n) => names.push(n.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(
        names,
        [
            "default",
            "kube-node-lease",
            "kube-public",
            "kube-system",
            "shop"
        ]
    );
}

#[tokio::test]
async fn cli_apiserver_serves_and_stops_on_sigterm() {
    install_crypto();
    let dir = TempDir::new("cli");
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kwire-lab"))
        .args([
            "apiserver",
            "--listen",
            "127.0.0.1:0",
            "--cluster-cidr-v6",
            "fd00:10:244::/56",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let kc = kubeconfig.clone();
    wait_for("the kubeconfig to be written", move || kc.exists()).await;
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap(),
        )
        .await
        .unwrap();
    let cidrs = nodes
        .get("a")
        .await
        .unwrap()
        .spec
        .unwrap()
        .pod_cidrs
        .unwrap();
    assert_eq!(cidrs, ["10.244.0.0/24", "fd00:10:244::/64"]);
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = timeout(DEADLINE, child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

// ---- kubectl ----

#[tokio::test]
async fn kubectl_get_create_delete() {
    let kubectl = Path::new("/usr/bin/kubectl");
    let kubectl = if kubectl.exists() {
        kubectl.to_path_buf()
    } else {
        match std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .find(|k| k.exists())
        }) {
            Some(k) => k,
            None => {
                assert!(
                    std::env::var("KWIRE_TESTS_STRICT").as_deref() != Ok("1"),
                    "kubectl_get_create_delete cannot run: kubectl is not installed (KWIRE_TESTS_STRICT=1 makes a skip a failure)"
                );
                println!("SKIPPED kubectl_get_create_delete: kubectl is not installed (Debian package kubernetes-client)");
                return;
            }
        }
    };
    let lab = lab().await;
    lab.server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}))
        .unwrap();
    let manifest = lab._dir.path().join("objects.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: demo\n  labels:\n    app: web\nspec:\n  nodeName: node-a\n  containers:\n  - name: c\n    image: busybox\n",
    )
    .unwrap();
    let home = lab._dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let run = |args: &[&str]| {
        let kubectl = kubectl.clone();
        let kubeconfig = lab.kubeconfig.clone();
        let home = home.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let out = timeout(
                DEADLINE,
                tokio::process::Command::new(&kubectl)
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(&args)
                    .env("HOME", &home)
                    .env("KUBECACHEDIR", home.join("cache"))
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("kubectl finishes within the deadline")
            .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).to_string();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                out.status.success(),
                "kubectl {args:?} failed: {stdout}\n{stderr}"
            );
            stdout
        }
    };
    let nodes = run(&["get", "nodes"]).await;
    assert!(
        nodes.contains("node-a") && nodes.contains("NAME"),
        "{nodes}"
    );
    let created = run(&["create", "-f", manifest.to_str().unwrap()]).await;
    assert!(
        created.contains("namespace/demo created") && created.contains("pod/web created"),
        "{created}"
    );
    let pods: Value =
        serde_json::from_str(&run(&["get", "pods", "-A", "-o", "json"]).await).unwrap();
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        (
            items[0]["metadata"]["namespace"].as_str(),
            items[0]["spec"]["nodeName"].as_str()
        ),
        (Some("demo"), Some("node-a"))
    );
    let table = run(&["get", "pods", "-A", "-o", "wide"]).await;
    assert!(
        table.contains("demo") && table.contains("web") && table.contains("node-a"),
        "{table}"
    );
    let deleted = run(&["delete", "pod", "web", "-n", "demo"]).await;
    assert!(deleted.contains("pod \"web\" deleted"), "{deleted}");
    run(&["delete", "namespace", "demo"]).await;
    let after: Value =
        serde_json::from_str(&run(&["get", "pods", "-A", "-o", "json"]).await).unwrap();
    assert!(after["items"].as_array().unwrap().is_empty());
    let ns = run(&["get", "namespaces", "-o", "name"]).await;
    assert!(
        !ns.contains("namespace/demo") && ns.contains("namespace/default"),
        "{ns}"
    );
}

/// deploy/'s Peer CRD, as the lab applies it.
fn peer_crd() -> Value {
    kwire_lab::manifests::api_objects()
        .unwrap()
        .into_iter()
        .find(|o| o["kind"] == "CustomResourceDefinition")
        .expect("deploy/ has the Peer CRD")
}

fn peer(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "kwire.dev/v1alpha1", "kind": "Peer", "metadata": {"name": name},
        "spec": {"publicKey": format!("{}=", "A".repeat(43)), "allowedIPs": [ip], "persistentKeepalive": 25}})
}

#[tokio::test]
async fn custom_resources_are_served_from_their_crd() {
    let lab = lab().await;
    let c = &lab.client;
    let peers = "/apis/kwire.dev/v1alpha1/peers";
    // Not served before its CRD exists.
    let e = call(c, "GET", peers, None).await.unwrap_err();
    assert_eq!(e.code, 404);
    let crd = call(
        c,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some(peer_crd()),
    )
    .await
    .unwrap();
    assert_eq!(crd["metadata"]["name"], "peers.kwire.dev");
    let established = call(
        c,
        "GET",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/peers.kwire.dev",
        None,
    )
    .await
    .unwrap();
    let conds = established["status"]["conditions"].as_array().unwrap();
    assert!(conds
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True"));
    // A CRD with a bad name is refused.
    let mut bad = peer_crd();
    bad["metadata"]["name"] = json!("peer.kwire.dev");
    let e = call(
        c,
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some(bad),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 422, "{e:?}");

    // Discovery lists the group, the resource and its status subresource.
    let groups = call(c, "GET", "/apis", None).await.unwrap();
    assert!(groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["name"] == "kwire.dev"
            && g["preferredVersion"]["groupVersion"] == "kwire.dev/v1alpha1"));
    let list = call(c, "GET", "/apis/kwire.dev/v1alpha1", None)
        .await
        .unwrap();
    let names: Vec<&str> = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["peers", "peers/status"]);

    // Create, list, watch from a resourceVersion, status writes keep the spec.
    let created = call(c, "POST", peers, Some(peer("laptop", "192.0.2.10/32")))
        .await
        .unwrap();
    let rv = rv_of(&created);
    let mut w = WatchLines::open(
        c,
        &format!("{peers}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true"),
    )
    .await;
    let status = json!({"status": {"conditions": [{"type": "Accepted", "status": "False", "reason": "Overlap", "message": "m"}]}});
    let patched = call_typed(
        c,
        "PATCH",
        &format!("{peers}/laptop/status"),
        "application/merge-patch+json",
        Some(json!({"spec": {"allowedIPs": ["198.51.100.1/32"]}, "status": status["status"]})),
    )
    .await
    .unwrap();
    assert_eq!(patched["spec"]["allowedIPs"], json!(["192.0.2.10/32"]));
    assert_eq!(patched["status"]["conditions"][0]["reason"], "Overlap");
    let ev = w.next().await.unwrap();
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["status"]["conditions"][0]["type"], "Accepted");
    let listed = call(c, "GET", peers, None).await.unwrap();
    assert_eq!(listed["kind"], "PeerList");
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    // The schema: types, bounds, patterns; unknown fields refused (the real server prunes).
    let mut wrong = peer("bad", "192.0.2.11/32");
    wrong["spec"]["allowedIPs"] = json!("192.0.2.11/32");
    wrong["spec"]["persistentKeepalive"] = json!(70000);
    wrong["spec"]["publicKey"] = json!("not-a-key");
    let e = call(c, "POST", peers, Some(wrong)).await.unwrap_err();
    assert_eq!(e.code, 422);
    for want in [
        "spec.allowedIPs in body must be of type array",
        "spec.persistentKeepalive",
        "spec.publicKey",
    ] {
        assert!(e.message.contains(want), "{want:?} not in {}", e.message);
    }
    let mut extra = peer("extra", "192.0.2.12/32");
    extra["spec"]["colour"] = json!("blue");
    let e = call(c, "POST", peers, Some(extra)).await.unwrap_err();
    assert!(
        e.code == 422 && e.message.contains("silently prunes"),
        "{e:?}"
    );
    let e = call_typed(
        c,
        "PATCH",
        &format!("{peers}/laptop"),
        "application/merge-patch+json",
        Some(json!({"spec": {"allowedIPs": []}})),
    )
    .await
    .unwrap_err();
    assert!(e.message.contains("at least 1 items"), "{e:?}");

    // RBAC as deploy/ grants it: the agent lists and watches Peers and writes only their status.
    for o in kwire_lab::manifests::api_objects().unwrap() {
        if o["kind"] != "CustomResourceDefinition" {
            lab.server.create(o).unwrap();
        }
    }
    let t = lab
        .server
        .issue_service_account_token("kube-system", "kwire", Some("n1"));
    let t = Some(t.as_str());
    assert_eq!(raw(&lab, "GET", peers, t, None).await.0, 200);
    let (code, _) = raw(
        &lab,
        "PATCH",
        &format!("{peers}/laptop/status"),
        t,
        Some(status.clone()),
    )
    .await;
    assert_eq!(code, 200);
    let (code, body) = raw(
        &lab,
        "PATCH",
        &format!("{peers}/laptop"),
        t,
        Some(json!({"spec": {"persistentKeepalive": 1}})),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("peers.kwire.dev \"laptop\" is forbidden"));

    // Another stand-in in this process does not serve the kind: its store has no CRD.
    let other = lab_with(ApiServerConfig::default()).await;
    let e = call(&other.client, "GET", peers, None).await.unwrap_err();
    assert_eq!(e.code, 404);
    // Deleting the CRD stops serving the kind here too.
    call(
        c,
        "DELETE",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/peers.kwire.dev",
        None,
    )
    .await
    .unwrap();
    assert_eq!(call(c, "GET", peers, None).await.unwrap_err().code, 404);
}
