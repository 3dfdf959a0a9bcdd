//! The API objects the agent watches, as it reads them: deserialization keeps only the fields
//! kwire uses and skips the rest while parsing (managedFields, status conditions and container
//! statuses, other annotations, container images, env, volumes...), so none of it is ever
//! allocated, let alone stored.
//!
//! Each view implements [`kube::Resource`] with the kind, group, version and plural of the
//! k8s-openapi type it stands for, so `Api<PodView>` lists and watches `/api/v1/pods` and the
//! watcher resumes from the views' resourceVersions like from full objects. A view is turned
//! into the full k8s-openapi type (with only the kept fields set) for the code that reads it,
//! so there is one reading of each field, not two.
//!
//! What is kept, per kind:
//! - Pod: name, namespace, labels; `spec.nodeName`, `spec.hostNetwork`, the containers' (and
//!   sidecars') names, restart policies and ports; `status.phase`, `status.podIP(s)`.
//! - Namespace: name, labels.
//! - NetworkPolicy: name, namespace, `spec`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::networking::v1 as netv1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// The metadata every view keeps: identity and resourceVersion (the watcher resumes from it).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlainMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
}

/// [`PlainMeta`] and the labels (spelled out: `serde(flatten)` would buffer every skipped
/// field).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LabelledMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

fn plain_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = PlainMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        uid: m.uid,
        ..ObjectMeta::default()
    })
}

fn labelled_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LabelledMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        uid: m.uid,
        labels: m.labels,
        ..ObjectMeta::default()
    })
}

/// Implements [`kube::Resource`] for a view with the type information of the k8s-openapi type
/// it stands for.
macro_rules! view_of {
    ($view:ty, $full:ty) => {
        impl kube::Resource for $view {
            type DynamicType = ();
            type Scope = <$full as k8s_openapi::Resource>::Scope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::KIND.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::GROUP.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Pod as NetworkPolicy reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodView {
    #[serde(deserialize_with = "labelled_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpecView>,
    #[serde(default)]
    status: Option<PodStatusView>,
}
view_of!(PodView, corev1::Pod);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecView {
    node_name: Option<String>,
    host_network: Option<bool>,
    #[serde(default)]
    containers: Vec<ContainerView>,
    init_containers: Option<Vec<ContainerView>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerView {
    #[serde(default)]
    name: String,
    restart_policy: Option<String>,
    ports: Option<Vec<corev1::ContainerPort>>,
}

impl ContainerView {
    fn into_k8s(self) -> corev1::Container {
        corev1::Container {
            name: self.name,
            restart_policy: self.restart_policy,
            ports: self.ports,
            ..corev1::Container::default()
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusView {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<corev1::PodIP>>,
}

impl PodView {
    /// The k8s-openapi Pod with the kept fields set.
    pub fn into_k8s(self) -> corev1::Pod {
        corev1::Pod {
            metadata: self.metadata,
            spec: self.spec.map(|s| corev1::PodSpec {
                node_name: s.node_name,
                host_network: s.host_network,
                containers: s
                    .containers
                    .into_iter()
                    .map(ContainerView::into_k8s)
                    .collect(),
                init_containers: s
                    .init_containers
                    .map(|c| c.into_iter().map(ContainerView::into_k8s).collect()),
                ..corev1::PodSpec::default()
            }),
            status: self.status.map(|s| corev1::PodStatus {
                phase: s.phase,
                pod_ip: s.pod_ip,
                pod_ips: s.pod_ips,
                ..corev1::PodStatus::default()
            }),
        }
    }
}

/// A Namespace as NetworkPolicy reads it: its name and labels.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NamespaceView {
    #[serde(deserialize_with = "labelled_meta")]
    pub metadata: ObjectMeta,
}
view_of!(NamespaceView, corev1::Namespace);

impl NamespaceView {
    pub fn into_k8s(self) -> corev1::Namespace {
        corev1::Namespace {
            metadata: self.metadata,
            ..corev1::Namespace::default()
        }
    }
}

/// A NetworkPolicy without its metadata's extras (annotations such as kubectl's
/// last-applied-configuration copy the whole policy; managedFields more than that).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetworkPolicyView {
    #[serde(deserialize_with = "plain_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<netv1::NetworkPolicySpec>,
}
view_of!(NetworkPolicyView, netv1::NetworkPolicy);

impl NetworkPolicyView {
    pub fn into_k8s(self) -> netv1::NetworkPolicy {
        netv1::NetworkPolicy {
            metadata: self.metadata,
            spec: self.spec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    /// A Pod as a kubelet-managed cluster serves it, trimmed to one of each part.
    fn full_pod(annotation: &str, heartbeat: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-7d9c-x2x8f", "generateName": "web-7d9c-", "namespace": "shop",
                "uid": "5b1e", "resourceVersion": "4711", "creationTimestamp": "2025-01-01T00:00:00Z",
                "labels": {"app": "web", "pod-template-hash": "7d9c"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": annotation},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c", "uid": "u", "controller": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}}}}}}]
            },
            "spec": {
                "nodeName": "n1",
                "containers": [{"name": "web", "image": "nginx:1.27",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "A", "value": "b"}],
                    "resources": {"requests": {"cpu": "100m"}}}],
                "initContainers": [{"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                    "ports": [{"name": "admin", "containerPort": 9901}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}],
                "hostIP": "192.0.2.1",
                "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": heartbeat}],
                "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "nginx", "imageID": "x"}]
            }
        })
    }

    #[test]
    fn pod_view_keeps_what_policy_reads() {
        let view: PodView = serde_json::from_value(full_pod("a", "2025-01-01T00:00:01Z")).unwrap();
        assert_eq!(view.metadata.resource_version.as_deref(), Some("4711"));
        assert!(view.metadata.annotations.is_none() && view.metadata.managed_fields.is_none());
        let from_view = crate::policy::Pod::from_k8s(&view.into_k8s()).unwrap();
        let full: corev1::Pod =
            serde_json::from_value(full_pod("a", "2025-01-01T00:00:01Z")).unwrap();
        assert_eq!(from_view, crate::policy::Pod::from_k8s(&full).unwrap());
        assert_eq!(from_view.container_ports.len(), 2, "sidecar ports count");
    }

    #[test]
    fn heartbeat_and_annotation_do_not_change_the_model() {
        let read = |a, h| {
            let v: PodView = serde_json::from_value(full_pod(a, h)).unwrap();
            crate::policy::Pod::from_k8s(&v.into_k8s()).unwrap()
        };
        assert_eq!(
            read("a", "2025-01-01T00:00:01Z"),
            read("b", "2025-01-01T00:05:01Z")
        );
    }

    #[test]
    fn views_address_the_resources_they_stand_for() {
        assert_eq!(PodView::url_path(&(), None), "/api/v1/pods");
        assert_eq!(NamespaceView::url_path(&(), None), "/api/v1/namespaces");
        assert_eq!(
            NetworkPolicyView::url_path(&(), None),
            "/apis/networking.k8s.io/v1/networkpolicies"
        );
    }

    #[test]
    fn policy_view_drops_annotations() {
        let v: NetworkPolicyView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x", "resourceVersion": "9",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        let np = v.into_k8s();
        assert!(np.metadata.annotations.is_none());
        let p = crate::policy::Policy::from_k8s(&np).unwrap();
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("x", "p"));
    }
}
