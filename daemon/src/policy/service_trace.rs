//! The Service leg of `kwire policy trace`: when `--to` is a ClusterIP or `svc/NS/NAME[:PORT]`,
//! the frontend the connection addresses, the backend the data path picks for it (the same
//! [`ServiceTable`] compiled from the same views, the same Maglev choice over the flow's hash),
//! and the translation. The policy verdict is then asked for the backend, as the loop does
//! (policy runs after translation).
//!
//! Backends come from the manifests' EndpointSlices for a Service that has any; otherwise from
//! its selector over the manifests' Pods, computed by the same controller logic the lab runs
//! (`kwire_proto::endpoints`). Hand-written Pods often carry no `status.conditions`: such a pod
//! counts as ready (one with conditions is ready only with `Ready: True`, as in a cluster).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

use crate::services::table::Scope;
use crate::services::{ServiceTable, ServiceView, SliceView};

use super::Protocol;

/// The source port used for the Maglev choice when `--source-port` is not given (the start of
/// Linux's ephemeral range).
pub const DEFAULT_SOURCE_PORT: u16 = 32768;

/// Services and EndpointSlices as read from manifests, with the raw Pods the slices of
/// selector Services are derived from.
#[derive(Debug, Default, Clone)]
pub struct ServiceObjects {
    services: Vec<(Value, ServiceView)>,
    slices: Vec<SliceView>,
    pods: Vec<Value>,
}

/// `--to` naming a Service: `svc/NAMESPACE/NAME`, optionally `:PORT` (number or port name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceArg {
    pub namespace: String,
    pub name: String,
    pub port: Option<String>,
}

impl ServiceArg {
    /// `None` when `value` does not start with `svc/`; `Some(Err)` when it does but is not
    /// `svc/NAMESPACE/NAME[:PORT]`.
    pub fn parse(value: &str) -> Option<Result<ServiceArg, ()>> {
        let rest = value.strip_prefix("svc/")?;
        let (path, port) = match rest.split_once(':') {
            Some((p, port)) => (p, Some(port.to_string())),
            None => (rest, None),
        };
        let ok = |s: &str| !s.is_empty() && !s.contains('/');
        Some(match path.split_once('/') {
            Some((ns, name)) if ok(ns) && ok(name) && port.as_deref().is_none_or(ok) => {
                Ok(ServiceArg {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    port,
                })
            }
            _ => Err(()),
        })
    }
}

/// What the Service leg found: the frontend, every usable backend, the chosen one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHop {
    /// `namespace/name`.
    pub service: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub source_port: u16,
    /// The client's node (its Pod's `spec.nodeName`), when known.
    pub node: Option<String>,
    /// `internalTrafficPolicy: Local`: only endpoints on the client's node serve.
    pub local: bool,
    /// `sessionAffinity: ClientIP`'s timeout; 0 without affinity.
    pub affinity_secs: u32,
    /// The endpoints the choice is among (for `Local`, those on the client's node), sorted
    /// as the data path holds them.
    pub backends: Vec<SocketAddr>,
    /// `None`: no usable endpoint (see `dropped`).
    pub backend: Option<SocketAddr>,
    /// Without a backend: `false` when the Service has no usable endpoint at all (the data
    /// path refuses the connection), `true` when it has some but none on the client's node
    /// under `internalTrafficPolicy: Local` (the data path drops it, as kube-proxy does).
    pub dropped: bool,
}

/// Why the Service leg could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceTraceError {
    #[error("--to svc/{0}: no such Service in the manifests given with -f")]
    UnknownService(String),
    #[error("Service {0} has no clusterIP (headless, ExternalName, or not yet allocated): give it as the API server returns it (kubectl get svc -o yaml)")]
    NoClusterIp(String),
    #[error("Service {service} has no {} ClusterIP for a source of that family", if *v4 { "IPv4" } else { "IPv6" })]
    NoFamily { service: String, v4: bool },
    #[error("Service {service} has internalTrafficPolicy: Local, so its backend depends on the client's node, and --from {from} is no Pod with spec.nodeName in the manifests: give --from as NAMESPACE/POD of a scheduled Pod")]
    NoNode { service: String, from: String },
    #[error("Service {service} has no port {port}; its ports: {ports}")]
    NoPort {
        service: String,
        port: String,
        ports: String,
    },
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

impl ServiceObjects {
    /// Adds a Service (already checked against the schema).
    pub fn add_service(&mut self, raw: Value, typed: &Service) {
        if let Some(view) = ServiceView::from_k8s(typed) {
            self.services.push((raw, view));
        } else {
            let name = format!(
                "{}/{}",
                typed.metadata.namespace.as_deref().unwrap_or("default"),
                typed.metadata.name.as_deref().unwrap_or_default()
            );
            self.services.push((raw, headless(name)));
        }
    }

    pub fn add_slice(&mut self, typed: &EndpointSlice) {
        if let Some(v) = SliceView::from_k8s(typed) {
            self.slices.push(v);
        }
    }

    /// Keeps a Pod's object for deriving selector Services' slices: `podIP` alone counts as
    /// `podIPs`, no conditions at all as ready.
    pub fn add_pod(&mut self, mut raw: Value) {
        if raw.pointer("/status/podIPs").is_none() {
            if let Some(ip) = raw.pointer("/status/podIP").cloned() {
                if let Some(st) = raw.get_mut("status").and_then(Value::as_object_mut) {
                    st.insert("podIPs".into(), json!([{ "ip": ip }]));
                }
            }
        }
        if raw.pointer("/status/conditions").is_none() {
            if let Some(st) = raw.get_mut("status").and_then(Value::as_object_mut) {
                st.insert(
                    "conditions".into(),
                    json!([{"type": "Ready", "status": "True"}]),
                );
            }
        }
        self.pods.push(raw);
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The service table the data path of node `node` would build from these objects
    /// (`None`: no node, so no endpoint is local).
    pub fn table(&self, node: Option<&str>) -> ServiceTable {
        let views: Vec<ServiceView> = self.services.iter().map(|(_, v)| v.clone()).collect();
        let explicit: BTreeSet<(&str, &str)> = self
            .slices
            .iter()
            .map(|s| (s.namespace.as_str(), s.service.as_str()))
            .collect();
        let derive: Vec<Value> = self
            .services
            .iter()
            .filter(|(raw, _)| {
                let ns = match s(raw, "/metadata/namespace") {
                    "" => "default",
                    ns => ns,
                };
                !explicit.contains(&(ns, s(raw, "/metadata/name")))
            })
            .map(|(raw, _)| raw.clone())
            .collect();
        let mut slices = self.slices.clone();
        slices.extend(
            kwire_proto::endpoints::desired(&derive, &self.pods)
                .into_values()
                .filter_map(|v| serde_json::from_value::<EndpointSlice>(v).ok())
                .filter_map(|s| SliceView::from_k8s(&s)),
        );
        let scope = Scope {
            node: node.map(str::to_string),
            node_port_addrs: Vec::new(),
            ranges: Vec::new(),
        };
        ServiceTable::compile_for(&views, &slices, &scope)
    }

    /// The Service that owns `ip` as a ClusterIP, if any.
    pub fn by_cluster_ip(&self, ip: IpAddr) -> Option<&ServiceView> {
        self.services
            .iter()
            .map(|(_, v)| v)
            .find(|v| v.cluster_ips.contains(&ip))
    }

    fn by_name(&self, namespace: &str, name: &str) -> Option<&ServiceView> {
        self.services
            .iter()
            .map(|(_, v)| v)
            .find(|v| v.namespace == namespace && v.name == name)
    }

    /// The Service `--to svc/...` names.
    pub fn find(&self, arg: &ServiceArg) -> Result<&ServiceView, ServiceTraceError> {
        let full = format!("{}/{}", arg.namespace, arg.name);
        let v = self
            .by_name(&arg.namespace, &arg.name)
            .ok_or(ServiceTraceError::UnknownService(full.clone()))?;
        if v.cluster_ips.is_empty() {
            return Err(ServiceTraceError::NoClusterIp(full));
        }
        Ok(v)
    }
}

/// A Service with no ClusterIP, kept so that `--to svc/...` can say why it cannot be traced.
fn headless(full: String) -> ServiceView {
    let (namespace, name) = full.split_once('/').unwrap_or(("default", &full));
    ServiceView {
        namespace: namespace.to_string(),
        name: name.to_string(),
        cluster_ips: Vec::new(),
        ports: Vec::new(),
        ..Default::default()
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => Protocol::IPPROTO_TCP,
        Protocol::Udp => Protocol::IPPROTO_UDP,
        Protocol::Sctp => Protocol::IPPROTO_SCTP,
        Protocol::Other(n) => n,
    }
}

/// Which Service port a trace addresses: `port` is the `:PORT` of `svc/NS/NAME:PORT` (a number
/// or a port name) or `--port`'s number; `protocol` is `--port`'s when given.
pub fn service_port(
    svc: &ServiceView,
    port: &str,
    protocol: Option<Protocol>,
) -> Result<(u16, Protocol), ServiceTraceError> {
    let found = svc.ports.iter().find(|p| {
        let named = p.name == port || p.port.to_string() == port;
        named && protocol.is_none_or(|want| proto_number(want) == p.proto)
    });
    match found {
        Some(p) => Ok((p.port, Protocol::from_ip_protocol(p.proto))),
        None => Err(ServiceTraceError::NoPort {
            service: format!("{}/{}", svc.namespace, svc.name),
            port: match protocol {
                Some(p) => format!("{port}/{p}"),
                None => port.to_string(),
            },
            ports: svc
                .ports
                .iter()
                .map(|p| {
                    let proto = Protocol::from_ip_protocol(p.proto);
                    match p.name.as_str() {
                        "" => format!("{}/{proto}", p.port),
                        n => format!("{}/{proto} ({n})", p.port),
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The data path's choice for the flow `src:source_port -> cluster_ip:port/protocol` of a
/// client on `node`: the frontend's backends and the one the loop's own selection
/// ([`crate::services::Frontend::select`]) picks for a new flow, under the table node `node`
/// compiles from `objects` (traffic policy and session affinity included; an offline trace
/// has no remembered affinity, so it gives the backend a client's first flow gets, which
/// its later flows keep).
pub fn choose(
    objects: &ServiceObjects,
    svc: &ServiceView,
    (src, node): (IpAddr, Option<&str>),
    source_port: u16,
    port: u16,
    protocol: Protocol,
) -> Result<ServiceHop, ServiceTraceError> {
    let service = format!("{}/{}", svc.namespace, svc.name);
    let cluster_ip = svc
        .cluster_ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == src.is_ipv4())
        .ok_or(ServiceTraceError::NoFamily {
            service: service.clone(),
            v4: src.is_ipv4(),
        })?;
    if svc.internal_local && node.is_none() {
        return Err(ServiceTraceError::NoNode {
            service,
            from: src.to_string(),
        });
    }
    let table = objects.table(node);
    let proto = proto_number(protocol);
    // A pod's flow: `from_node` matters for node ports only, which a trace does not address.
    let fe = table.lookup(proto, cluster_ip, port);
    let sel = fe.map(|f| f.select(false, proto, (src, source_port), (cluster_ip, port)));
    Ok(ServiceHop {
        service,
        cluster_ip,
        port,
        protocol,
        source_port,
        node: node.map(str::to_string),
        local: svc.internal_local,
        affinity_secs: svc.affinity_secs,
        backends: sel.map(|s| s.backends().to_vec()).unwrap_or_default(),
        backend: sel.and_then(|s| s.pick()),
        dropped: sel.is_some_and(|s| s.pool == Err(false)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_arguments() {
        assert_eq!(ServiceArg::parse("x/a"), None);
        assert_eq!(
            ServiceArg::parse("svc/shop/web:http"),
            Some(Ok(ServiceArg {
                namespace: "shop".into(),
                name: "web".into(),
                port: Some("http".into())
            }))
        );
        assert_eq!(
            ServiceArg::parse("svc/shop/web").unwrap().unwrap().port,
            None
        );
        for bad in [
            "svc/web",
            "svc/shop/web:",
            "svc//web",
            "svc/a/b/c",
            "svc/a/b:1/2",
        ] {
            assert_eq!(ServiceArg::parse(bad), Some(Err(())), "{bad}");
        }
    }
}
