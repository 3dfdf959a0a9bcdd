//! The cluster as policy sees it: plain Namespace and Pod types, and their conversion from k8s-openapi objects.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as corev1;

use super::Protocol;

/// The label the API server puts on every Namespace (immutable, equal to the name), which
/// policies use to select a namespace by name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `namespace/name` of a namespaced object, for messages and trace output.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Namespace: its name and labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// A namespace with the given labels plus `kubernetes.io/metadata.name=<name>`, as the API
    /// server sets it (the label cannot be set to anything else).
    pub fn new(name: impl Into<String>, labels: BTreeMap<String, String>) -> Self {
        let name = name.into();
        let mut labels = labels;
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Namespace { name, labels }
    }

    /// From a k8s-openapi Namespace; fails only when `metadata.name` is missing.
    pub fn from_k8s(ns: &corev1::Namespace) -> Result<Self, ModelError> {
        let name = ns
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(ModelError::MissingName { kind: "Namespace" })?;
        Ok(Namespace::new(
            name,
            ns.metadata.labels.clone().unwrap_or_default(),
        ))
    }
}

/// A port a container of the pod declares (`spec.containers[].ports[]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A Pod: identity, labels, addresses and declared container ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (one per family). Empty for a pod that has none yet, or has terminated.
    pub ips: Vec<IpAddr>,
    pub container_ports: Vec<ContainerPort>,
    /// `spec.nodeName`; empty when not scheduled.
    pub node_name: String,
    /// `spec.hostNetwork`: such a pod is not subject to NetworkPolicy, nor selected as a peer.
    pub host_network: bool,
}

impl Pod {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The container port number that `name` with `protocol` resolves to on this pod, if the
    /// pod declares it.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.container_ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    /// From a k8s-openapi Pod. `metadata.namespace` defaults to `default` (as kubectl does for
    /// manifests). Pods in phase `Succeeded` or `Failed` get no IPs (theirs may be reused).
    /// Fails on a missing name, an unparsable IP, or a container port out of range or with an
    /// unknown protocol.
    pub fn from_k8s(pod: &corev1::Pod) -> Result<Self, ModelError> {
        Self::from_k8s_owned(pod.clone())
    }

    /// [`Pod::from_k8s`], taking the object: its names and labels move instead of being copied
    /// (the agent reads every Pod event of the cluster this way).
    pub fn from_k8s_owned(mut pod: corev1::Pod) -> Result<Self, ModelError> {
        let name = pod
            .metadata
            .name
            .take()
            .filter(|n| !n.is_empty())
            .ok_or(ModelError::MissingName { kind: "Pod" })?;
        let namespace = pod
            .metadata
            .namespace
            .take()
            .unwrap_or_else(|| "default".to_string());
        let at = ObjectRef {
            namespace: namespace.clone(),
            name: name.clone(),
        };

        let mut ips: Vec<IpAddr> = Vec::new();
        let terminated = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if let Some(status) = pod.status.as_ref().filter(|_| !terminated) {
            let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
            for text in status.pod_ip.as_deref().into_iter().chain(listed) {
                let ip: IpAddr = text.parse().map_err(|_| ModelError::BadPodIp {
                    pod: at.clone(),
                    value: text.to_string(),
                })?;
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }

        let mut container_ports = Vec::new();
        let mut host_network = false;
        let mut node_name = String::new();
        if let Some(spec) = pod.spec.as_mut() {
            host_network = spec.host_network.unwrap_or(false);
            node_name = spec.node_name.take().unwrap_or_default();
            let spec = &*spec;
            // Sidecars (init containers with restartPolicy Always) serve ports too.
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            for container in spec.containers.iter().chain(sidecars) {
                for p in container.ports.iter().flatten() {
                    let port = u16::try_from(p.container_port)
                        .ok()
                        .filter(|&n| n != 0)
                        .ok_or_else(|| ModelError::BadContainerPort {
                            pod: at.clone(),
                            container: container.name.clone(),
                            value: p.container_port.to_string(),
                        })?;
                    let proto_name = p.protocol.as_deref().unwrap_or("TCP");
                    let protocol = Protocol::from_k8s(proto_name).ok_or_else(|| {
                        ModelError::BadContainerPort {
                            pod: at.clone(),
                            container: container.name.clone(),
                            value: format!("protocol {proto_name:?}"),
                        }
                    })?;
                    container_ports.push(ContainerPort {
                        name: p.name.clone(),
                        port,
                        protocol,
                    });
                }
            }
        }

        Ok(Pod {
            namespace,
            name,
            labels: pod.metadata.labels.take().unwrap_or_default(),
            ips,
            container_ports,
            node_name,
            host_network,
        })
    }
}

/// A Pod or Namespace object that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} has no metadata.name")]
    MissingName { kind: &'static str },
    #[error("Pod {pod}: status.podIP/podIPs value {value:?} is not an IP address")]
    BadPodIp { pod: ObjectRef, value: String },
    #[error("Pod {pod}: container {container:?} declares an invalid port ({value}); ports are 1-65535 with protocol TCP, UDP or SCTP")]
    BadContainerPort {
        pod: ObjectRef,
        container: String,
        value: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_gets_name_label() {
        let ns = Namespace::new("x", BTreeMap::from([("ns".into(), "x".into())]));
        assert_eq!(
            ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("x")
        );
        // The label cannot be forged to another value.
        let ns = Namespace::new(
            "x",
            BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), "y".into())]),
        );
        assert_eq!(
            ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("x")
        );
    }

    #[test]
    fn pod_from_k8s() {
        let pod: corev1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80},
                {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"}]}]},
            "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        let p = Pod::from_k8s(&pod).unwrap();
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(p.named_port("serve-80-udp", Protocol::Udp), Some(80));
        assert_eq!(p.named_port("serve-80-udp", Protocol::Tcp), None);
        assert_eq!(p.node_name, "n1");
    }

    #[test]
    fn pod_errors_name_the_object() {
        let pod: corev1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x"},
            "status": {"podIP": "10.0.0.300"}
        }))
        .unwrap();
        let err = Pod::from_k8s(&pod).unwrap_err().to_string();
        assert!(err.contains("x/a") && err.contains("10.0.0.300"), "{err}");
        let pod: corev1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 70000}]}]}
        }))
        .unwrap();
        let err = Pod::from_k8s(&pod).unwrap_err().to_string();
        assert!(err.contains("default/a") && err.contains("70000"), "{err}");
    }

    #[test]
    fn terminated_pod_has_no_ips() {
        let pod: corev1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.1"}
        }))
        .unwrap();
        assert!(Pod::from_k8s(&pod).unwrap().ips.is_empty());
    }
}
