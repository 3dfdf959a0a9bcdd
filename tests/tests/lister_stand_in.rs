//! The agent's own list-then-watch (`kwire::agent::lister`, every kind's but the Peers', with
//! its own reader of the watch's lines) and kube's watcher (what it replaced), side by side
//! against the API stand-in over HTTPS with a service account's token and RBAC as a real
//! cluster applies it: both must yield the same items, in the same order, through a 403 on
//! the list (no grant: an error, never an empty list), a 403 on the watch (list granted, watch
//! not), events, a resume from a bookmark after the server drops its connections, and a 410
//! Gone after a compaction (a re-list). Runs without root.

use futures::stream::BoxStream;
use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kwire::agent::objects::NamespaceView;
use kwire_lab::apiserver::{ApiServer, ApiServerConfig};
use serde_json::json;
use std::time::Duration;

type Items = BoxStream<'static, Result<Event<NamespaceView>, watcher::Error>>;

/// An item as a line: `init`, `+name` (listed), `done`, `apply name`, `delete name`, or the
/// error's variant and HTTP code (`list 403`, `watch start 403`, `watch 410`, ...).
fn line(item: &Result<Event<NamespaceView>, watcher::Error>) -> String {
    let name = |o: &NamespaceView| o.metadata.name.clone().unwrap_or_default();
    let code = |e: &kube::Error| match e {
        kube::Error::Api(s) => s.code.to_string(),
        _ => "other".into(),
    };
    match item {
        Ok(Event::Init) => "init".into(),
        Ok(Event::InitApply(o)) => format!("+{}", name(o)),
        Ok(Event::InitDone) => "done".into(),
        Ok(Event::Apply(o)) => format!("apply {}", name(o)),
        Ok(Event::Delete(o)) => format!("delete {}", name(o)),
        Err(watcher::Error::InitialListFailed(e)) => format!("list {}", code(e)),
        Err(watcher::Error::WatchStartFailed(e)) => format!("watch start {}", code(e)),
        Err(watcher::Error::WatchError(s)) => format!("watch {}", s.code),
        Err(watcher::Error::WatchFailed(e)) => format!("watch failed {}", code(e)),
        Err(watcher::Error::NoResourceVersion) => "no rv".into(),
    }
}

/// The next `n` items of `s` as lines (each within 20 s).
async fn take(s: &mut Items, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(20), s.next()).await {
            Ok(Some(item)) => out.push(line(&item)),
            Ok(None) => panic!("the stream ended after {out:?}"),
            Err(_) => panic!("no item after {out:?} in 20 s"),
        }
    }
    out
}

/// Items up to and including the first that `last` accepts (at most 1,000).
async fn until(s: &mut Items, last: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < 1000 {
        let l = take(s, 1).await.remove(0);
        let end = last(&l);
        out.push(l);
        if end {
            return out;
        }
    }
    panic!("no end in {out:?}");
}

/// Polls `s` for `d`: it must yield nothing (what it reads meanwhile, bookmarks, stays inside).
async fn quiet(s: &mut Items, d: Duration) {
    if let Ok(item) = tokio::time::timeout(d, s.next()).await {
        panic!("expected nothing, got {:?}", item.as_ref().map(line));
    }
}

fn namespace(name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// A ClusterRole allowing `verb` on namespaces, bound to kube-system/reader.
fn grant(api: &ApiServer, verb: &str) {
    let name = format!("namespaces-{verb}");
    api.create(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": [verb]}]}),
    )
    .unwrap();
    api.create(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "kube-system"}],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}}),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lister_yields_what_kubes_watcher_yields_through_403_bookmarks_and_410() {
    let api = ApiServer::start(ApiServerConfig {
        bookmark_interval: Duration::from_millis(200),
        ..ApiServerConfig::default()
    })
    .await
    .unwrap();
    api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "reader", "namespace": "kube-system"}}))
        .unwrap();
    let token = api.issue_service_account_token("kube-system", "reader", None);
    let scratch = kwire_tests::Scratch::new("lister");
    let path = scratch.file("kubeconfig");
    std::fs::write(&path, api.kubeconfig(Some(&token))).unwrap();
    let config = kwire::kubeapi::config(Some(path.as_path())).await.unwrap();
    let client = kwire::kubeapi::client_for(config).unwrap();
    // Without a sieve the lister tells no update as unchanged: every item is an event.
    let mut ours: Items = kwire::agent::lister::watch::<NamespaceView>(client.clone(), None)
        .filter_map(|item| async move {
            match item {
                Ok(kwire::agent::lister::Seen::Event(ev)) => Some(Ok(ev)),
                Ok(kwire::agent::lister::Seen::Unchanged) => None,
                Err(e) => Some(Err(e)),
            }
        })
        .boxed();
    let mut kubes: Items = watcher::watcher(
        kube::Api::<NamespaceView>::all(client),
        kwire::agent::watches::watch_config(),
    )
    .boxed();
    // Both take the same steps; each step is checked on both.
    macro_rules! both {
        ($f:ident $(, $a:expr)*) => {{
            let a = $f(&mut ours $(, $a)*).await;
            let b = $f(&mut kubes $(, $a)*).await;
            assert_eq!(a, b, "the lister (left) and kube's watcher (right)");
            a
        }};
    }

    // No grant: every list is refused; the list starts over each time and is never done.
    assert_eq!(both!(take, 6), ["init", "list 403"].repeat(3));

    // List granted, watch not: the list completes, the watch is refused and retried.
    grant(&api, "list");
    let mut listed: Vec<String> = api
        .list(ApiServer::kind("v1", "Namespace").unwrap(), None)
        .unwrap()
        .iter()
        .map(|n| format!("+{}", n["metadata"]["name"].as_str().unwrap()))
        .collect();
    let got = both!(until, |l: &str| l == "done");
    assert_eq!(got[0], "init");
    let mut got_listed = got[1..got.len() - 1].to_vec();
    got_listed.sort();
    listed.sort();
    assert_eq!(got_listed, listed);
    assert_eq!(both!(take, 3), ["watch start 403"].repeat(3));

    // Watch granted: the watch starts from the list's version and delivers what came since.
    grant(&api, "watch");
    api.create(namespace("late")).unwrap();
    assert_eq!(both!(take, 1), ["apply late"]);

    // A write of another kind moves the bookmarks on; the server then drops every connection,
    // its history is compacted and it comes back: the watch resumes from the bookmark's
    // version (no 410) and goes on.
    api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "other", "namespace": "kube-system"}}))
        .unwrap();
    both!(quiet, Duration::from_millis(800));
    api.stop().await;
    api.compact_history();
    api.resume().await.unwrap();
    api.create(namespace("after")).unwrap();
    let got = both!(until, |l: &str| l.starts_with("apply") || l == "init");
    assert_eq!(got.last().unwrap(), "apply after", "{got:?}");

    // A write of a Namespace while the server is away, then a compaction: the watch's version
    // is gone (410 in the stream) and both list again, finding it.
    api.stop().await;
    api.create(namespace("gone-by")).unwrap();
    api.compact_history();
    api.resume().await.unwrap();
    let got = both!(until, |l: &str| l == "done");
    let i = got.iter().position(|l| l == "watch 410").expect("a 410");
    assert_eq!(got[i + 1], "init", "{got:?}");
    assert!(got.contains(&"+gone-by".to_string()), "{got:?}");
}
