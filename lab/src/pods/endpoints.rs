//! The lab's EndpointSlice controller (kube-controller-manager's role): writes the slices
//! `kwire_proto::endpoints::desired` computes from Services and Pods, rewritten when they
//! change; Services without a selector keep the slices their owners write (this controller
//! touches only slices it manages).

use kwire_proto::endpoints::{desired, CONTROLLER, MANAGED_BY};
use serde_json::Value;

use crate::apiserver::ApiServer;

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

/// Brings the managed slices in line with the Services and Pods: creates, replaces what
/// changed, deletes what no Service wants. Writes nothing when everything matches (each
/// write wakes the supervisor, which calls this again).
pub fn reconcile(server: &ApiServer) {
    let kinds = (
        ApiServer::kind("v1", "Service"),
        ApiServer::kind("v1", "Pod"),
        ApiServer::kind("discovery.k8s.io/v1", "EndpointSlice"),
    );
    let (Ok(svc_kind), Ok(pod_kind), Ok(slice_kind)) = kinds else {
        return;
    };
    let (Ok(services), Ok(pods), Ok(slices)) = (
        server.list(svc_kind, None),
        server.list(pod_kind, None),
        server.list(slice_kind, None),
    ) else {
        return;
    };
    let mut want = desired(&services, &pods);
    for have in slices {
        if s(
            &have,
            &format!("/metadata/labels/{}", MANAGED_BY.replace('/', "~1")),
        ) != CONTROLLER
        {
            continue;
        }
        let key = (
            s(&have, "/metadata/namespace").to_string(),
            s(&have, "/metadata/name").to_string(),
        );
        match want.remove(&key) {
            None => {
                if let Err(e) = server.delete(slice_kind, Some(&key.0), &key.1) {
                    tracing::warn!(slice = %format!("{}/{}", key.0, key.1), error = %e, "cannot delete EndpointSlice");
                }
            }
            Some(w) => {
                let same = ["addressType", "endpoints", "ports"]
                    .iter()
                    .all(|f| have.get(*f) == w.get(*f));
                if !same {
                    if let Err(e) = server.update(slice_kind, Some(&key.0), &key.1, w, false) {
                        tracing::warn!(slice = %format!("{}/{}", key.0, key.1), error = %e, "cannot update EndpointSlice");
                    }
                }
            }
        }
    }
    for ((ns, name), w) in want {
        match server.create(w) {
            Ok(_) => tracing::info!(slice = %format!("{ns}/{name}"), "EndpointSlice created"),
            Err(e) => {
                tracing::warn!(slice = %format!("{ns}/{name}"), error = %e, "cannot create EndpointSlice")
            }
        }
    }
}
