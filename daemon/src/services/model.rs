//! What the service table is compiled from: stripped views of Services and EndpointSlices
//! (only the fields translation needs), read from the API objects by pure functions.

use k8s_openapi::api::core::v1::{Service, ServiceSpec, ServiceStatus};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// IP protocol numbers of the ports a Service can name.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service, as far as translation goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs` (one per family); empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortView>,
    /// `externalTrafficPolicy: Local` (NodePort and LoadBalancer): clients from elsewhere
    /// reach only this node's endpoints and keep their address.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: the ClusterIP reaches only the client node's endpoints.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: its `timeoutSeconds` (default 10800); 0 without affinity.
    pub affinity_secs: u32,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ips: Vec<IpAddr>,
    /// `spec.healthCheckNodePort` (LoadBalancer with `externalTrafficPolicy: Local`).
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServicePortView {
    /// The port's name (empty when the Service has a single unnamed port); slices name their
    /// ports the same way, with the target port already resolved to a number.
    pub name: String,
    pub proto: u8,
    pub port: u16,
    /// `nodePort` (NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
}

/// An EndpointSlice, as far as translation goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceView {
    pub namespace: String,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: String,
    /// Every endpoint of a slice is of one family.
    pub ports: Vec<SlicePortView>,
    pub endpoints: Vec<EndpointView>,
}

/// A slice port: the Service port's name and the number its endpoints listen on (the
/// EndpointSlice controller resolved `targetPort`, by number or by the pods' port names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlicePortView {
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EndpointView {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset means ready, as the API says).
    pub ready: bool,
    /// `conditions.serving` (unset: same as ready).
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName`: the node it runs on (local endpoints for the `Local` traffic policies).
    pub node_name: Option<String>,
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when none is given (3 hours).
pub const DEFAULT_AFFINITY_SECS: u32 = 10800;

/// A protocol name as the API spells it (unset means TCP).
pub fn protocol(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}

impl ServiceView {
    /// The view of a Service, or `None` when it has nothing to translate (no ClusterIP:
    /// headless or ExternalName). Addresses that do not parse are left out.
    pub fn from_k8s(s: &Service) -> Option<ServiceView> {
        Self::from_parts(&s.metadata, s.spec.as_ref(), s.status.as_ref())
    }

    /// [`ServiceView::from_k8s`] of a Service's parts (the agent's watch keeps only these).
    pub fn from_parts(
        metadata: &ObjectMeta,
        spec: Option<&ServiceSpec>,
        status: Option<&ServiceStatus>,
    ) -> Option<ServiceView> {
        let spec = spec?;
        if spec.type_.as_deref() == Some("ExternalName") {
            return None;
        }
        let ips: Vec<&String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(v), _) if !v.is_empty() => v.iter().collect(),
            (_, Some(one)) => vec![one],
            _ => return None,
        };
        let cluster_ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        if cluster_ips.is_empty() {
            return None;
        }
        let is_lb = spec.type_.as_deref() == Some("LoadBalancer");
        let node_ports = is_lb || spec.type_.as_deref() == Some("NodePort");
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(ServicePortView {
                    name: p.name.clone().unwrap_or_default(),
                    proto: protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                    node_port: p
                        .node_port
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| *n != 0 && node_ports),
                })
            })
            .collect();
        let affinity_secs = if spec.session_affinity.as_deref() == Some("ClientIP") {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_SECS)
        } else {
            0
        };
        let lb_ips = if is_lb {
            status
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        } else {
            Vec::new()
        };
        Some(ServiceView {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            name: metadata.name.clone()?,
            cluster_ips,
            ports,
            external_local: node_ports && spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            affinity_secs,
            lb_ips,
            health_check_node_port: spec
                .health_check_node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0 && is_lb),
        })
    }
}

impl SliceView {
    /// The view of an EndpointSlice, or `None` when it belongs to no Service or is of an
    /// address type other than IPv4/IPv6 (FQDN slices are not translated).
    pub fn from_k8s(s: &EndpointSlice) -> Option<SliceView> {
        Self::from_parts(
            &s.metadata,
            &s.address_type,
            s.ports.as_deref(),
            &s.endpoints,
        )
    }

    /// [`SliceView::from_k8s`] of a slice's parts (the agent's watch keeps only these).
    pub fn from_parts(
        metadata: &ObjectMeta,
        address_type: &str,
        ports: Option<&[EndpointPort]>,
        endpoints: &[Endpoint],
    ) -> Option<SliceView> {
        if !matches!(address_type, "IPv4" | "IPv6") {
            return None;
        }
        let service = metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
        let ports = ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                Some(SlicePortView {
                    name: p.name.clone().unwrap_or_default(),
                    proto: protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port?).ok().filter(|p| *p != 0)?,
                })
            })
            .collect();
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                EndpointView {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    node_name: e.node_name.clone(),
                }
            })
            .collect();
        Some(SliceView {
            namespace: metadata.namespace.clone().unwrap_or_default(),
            service,
            ports,
            endpoints,
        })
    }
}
