//! What the control plane allocates for objects: Node podCIDRs (kube-controller-manager's range
//! allocator, a write after the Node's creation), Service ClusterIPs and NodePorts (the
//! Service registry, before the Service is stored). The CIDR arithmetic is [`super::cidr`];
//! the store never allocates ([`super::registry`] calls this around its writes).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};

use super::cidr::{PodCidrAllocator, ServiceIpAllocator};
use super::error::ApiError;
use super::resources::ResourceKind;
use super::validate::FieldError;

/// NodePorts come from this range (kube-apiserver's `--service-node-port-range` default).
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Every allocator of one API server.
#[derive(Debug, Clone)]
pub struct Allocators {
    pub pod_cidrs: PodCidrAllocator,
    pub service_ips: ServiceIpAllocator,
    node_ports: BTreeSet<u16>,
}

/// What a Service create took, to give back if the create fails.
#[derive(Debug, Default)]
pub struct ServiceReservation {
    ips: Vec<IpAddr>,
    ports: Vec<u16>,
}

/// A Node's podCIDRs (`spec.podCIDRs`, else `spec.podCIDR`).
pub fn pod_cidrs_of(node: &Value) -> Vec<IpNetwork> {
    let from_list: Vec<IpNetwork> = node
        .pointer("/spec/podCIDRs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if !from_list.is_empty() {
        return from_list;
    }
    node.pointer("/spec/podCIDR")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .into_iter()
        .collect()
}

/// The families a new Service gets, as kube-apiserver decides them from `ipFamilyPolicy`
/// (`SingleStack` by default) and `ipFamilies` against the cluster's `configured` families
/// (primary first): one family, or both for `PreferDualStack` (when the cluster has both) and
/// `RequireDualStack` (refused when it has not).
fn service_families(
    configured: &[&'static str],
    kind: &ResourceKind,
    name: &str,
    svc: &Value,
) -> Result<Vec<&'static str>, ApiError> {
    let invalid = |field: &str, value: &str, why: &str| {
        ApiError::invalid(kind, name, &[FieldError::invalid(field, value, why)])
    };
    let mut requested: Vec<&'static str> = Vec::new();
    for (i, f) in svc
        .pointer("/spec/ipFamilies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let f = f.as_str().unwrap_or_default();
        match configured.iter().find(|c| **c == f) {
            Some(c) if !requested.contains(c) => requested.push(c),
            Some(_) => {
                return Err(invalid(
                    &format!("spec.ipFamilies[{i}]"),
                    f,
                    "may not be repeated",
                ))
            }
            None => {
                return Err(invalid(
                    &format!("spec.ipFamilies[{i}]"),
                    f,
                    "not configured on this cluster",
                ))
            }
        }
    }
    let primary = requested
        .first()
        .or(configured.first())
        .copied()
        .ok_or_else(|| {
            ApiError::internal(format!(
                "failed to allocate a serviceIP for service {name}: no service CIDR is configured"
            ))
        })?;
    let both = || {
        let mut f = vec![primary];
        f.extend(configured.iter().filter(|c| **c != primary));
        f
    };
    let policy = svc
        .pointer("/spec/ipFamilyPolicy")
        .and_then(Value::as_str)
        .unwrap_or("SingleStack");
    match policy {
        "SingleStack" if requested.len() > 1 => Err(invalid(
            "spec.ipFamilies",
            &requested.join(","),
            "when spec.ipFamilyPolicy is SingleStack, a single ipFamily is allowed",
        )),
        "SingleStack" => Ok(vec![primary]),
        "PreferDualStack" => Ok(both()),
        "RequireDualStack" if configured.len() < 2 => Err(invalid(
            "spec.ipFamilyPolicy",
            policy,
            "this cluster is not configured for dual-stack services",
        )),
        "RequireDualStack" => Ok(both()),
        other => Err(invalid(
            "spec.ipFamilyPolicy",
            other,
            "supported values: \"PreferDualStack\", \"RequireDualStack\", \"SingleStack\"",
        )),
    }
}

fn cluster_ips_of(svc: &Value) -> Vec<IpAddr> {
    svc.pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter_map(|s| s.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The node ports a Service holds: its ports' `nodePort`s and its `healthCheckNodePort`.
fn node_ports_of(svc: &Value) -> Vec<u16> {
    let mut v: Vec<u16> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                .map(|p| p as u16)
                .collect()
        })
        .unwrap_or_default();
    v.extend(
        svc.pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_u64)
            .map(|p| p as u16),
    );
    v
}

impl Allocators {
    /// Takes a requested node port (`field` names it in the error), as the Service
    /// registry's port allocator answers: outside the range, or already taken, is invalid.
    fn request_node_port(
        &mut self,
        kind: &ResourceKind,
        name: &str,
        field: &str,
        n: u64,
    ) -> Result<(), ApiError> {
        let invalid = |why: String| {
            ApiError::invalid(kind, name, &[FieldError::invalid_number(field, n, &why)])
        };
        let range = NODE_PORT_RANGE;
        if !(u64::from(*range.start())..=u64::from(*range.end())).contains(&n) {
            return Err(invalid(format!(
                "provided port is not in the valid range. The range of valid ports is {}-{}",
                range.start(),
                range.end()
            )));
        }
        if !self.node_ports.insert(n as u16) {
            return Err(invalid("provided port is already allocated".into()));
        }
        Ok(())
    }

    /// A free node port, taken (kube-apiserver picks at random; this stand-in takes the
    /// lowest free one, which no client may rely on either way).
    fn free_node_port(&mut self) -> Result<u16, ApiError> {
        let free = NODE_PORT_RANGE
            .clone()
            .find(|n| !self.node_ports.contains(n))
            .ok_or_else(|| {
                ApiError::internal("failed to allocate a nodePort: range is full (30000-32767)")
            })?;
        self.node_ports.insert(free);
        Ok(free)
    }

    /// Every port's `nodePort`: the requested one, or the one a port of the same number
    /// and another protocol got (kube-apiserver shares it, so `53/TCP` and `53/UDP` answer
    /// on one node port), or a free one.
    fn assign_node_ports(
        &mut self,
        kind: &ResourceKind,
        name: &str,
        svc: &mut Value,
        taken: &mut ServiceReservation,
    ) -> Result<(), ApiError> {
        let Some(Value::Array(ports)) = svc["spec"].get_mut("ports") else {
            return Ok(());
        };
        // (port, protocol, nodePort) of this Service so far.
        let mut mine: Vec<(u64, String, u16)> = Vec::new();
        for (i, p) in ports.iter_mut().enumerate() {
            let number = p.get("port").and_then(Value::as_u64).unwrap_or(0);
            let proto = p
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP")
                .to_string();
            let field = format!("spec.ports[{i}].nodePort");
            let node_port = match p.get("nodePort").and_then(Value::as_u64) {
                Some(n) => {
                    if let Some(m) = mine.iter().find(|m| u64::from(m.2) == n) {
                        if m.1 == proto {
                            return Err(ApiError::invalid(
                                kind,
                                name,
                                &[FieldError::duplicate(
                                    &format!("spec.ports[{i}]"),
                                    &format!("{{\"nodePort\":{n},\"protocol\":\"{proto}\"}}"),
                                )],
                            ));
                        }
                        n as u16 // the same node port for another protocol: shared
                    } else {
                        self.request_node_port(kind, name, &field, n)?;
                        taken.ports.push(n as u16);
                        n as u16
                    }
                }
                None => match mine.iter().find(|m| m.0 == number && m.1 != proto) {
                    Some(m) => m.2,
                    None => {
                        let free = self.free_node_port()?;
                        taken.ports.push(free);
                        free
                    }
                },
            };
            p["nodePort"] = json!(node_port);
            mine.push((number, proto, node_port));
        }
        Ok(())
    }

    pub fn new(pod_cidrs: PodCidrAllocator, service_ips: ServiceIpAllocator) -> Allocators {
        Allocators {
            pod_cidrs,
            service_ips,
            node_ports: BTreeSet::new(),
        }
    }

    /// The podCIDRs a new Node gets: None when it came with its own (they are marked taken)
    /// or none are left (logged, as kube-controller-manager's `CIDRNotAvailable`).
    pub fn node_created(&mut self, name: &str, node: &Value) -> Option<Vec<IpNetwork>> {
        let existing = pod_cidrs_of(node);
        if !existing.is_empty() {
            let conflicts = self.pod_cidrs.occupy(&existing);
            if !conflicts.is_empty() {
                tracing::warn!(node = %name, ?conflicts, "node came with podCIDRs another node holds");
            }
            return None;
        }
        if !self.pod_cidrs.is_enabled() {
            return None;
        }
        let cidrs = self.pod_cidrs.allocate();
        if cidrs.is_none() {
            tracing::warn!(node = %name, "CIDRNotAvailable: no podCIDR left in the cluster CIDR");
        }
        cidrs
    }

    /// A Node changed: podCIDRs it gained (written once, from empty) are taken.
    pub fn node_updated(&mut self, node: &Value) {
        let cidrs = pod_cidrs_of(node);
        if !cidrs.is_empty() {
            self.pod_cidrs.occupy(&cidrs);
        }
    }

    pub fn node_deleted(&mut self, node: &Value) {
        self.pod_cidrs.release(&pod_cidrs_of(node));
    }

    /// Fills a new Service's ClusterIP(s) and NodePorts (and the defaults that go with them),
    /// or answers as the Service registry does when they cannot be had.
    pub fn service_creating(
        &mut self,
        kind: &ResourceKind,
        name: &str,
        svc: &mut Value,
    ) -> Result<ServiceReservation, ApiError> {
        let mut taken = ServiceReservation::default();
        let result = self.assign_service(kind, name, svc, &mut taken);
        if result.is_err() {
            self.release(&taken);
        }
        result.map(|()| taken)
    }

    /// Gives back what a Service create took (the create failed).
    pub fn release(&mut self, r: &ServiceReservation) {
        for ip in &r.ips {
            self.service_ips.release(*ip);
        }
        for p in &r.ports {
            self.node_ports.remove(p);
        }
    }

    pub fn service_deleted(&mut self, svc: &Value) {
        for ip in cluster_ips_of(svc) {
            self.service_ips.release(ip);
        }
        for p in node_ports_of(svc) {
            self.node_ports.remove(&p);
        }
    }

    fn assign_service(
        &mut self,
        kind: &ResourceKind,
        name: &str,
        svc: &mut Value,
        taken: &mut ServiceReservation,
    ) -> Result<(), ApiError> {
        let svc_type = svc
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        if svc_type == "ExternalName" {
            return Ok(());
        }
        if !svc.get("spec").is_some_and(Value::is_object) {
            svc["spec"] = json!({});
        }
        let given = svc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if given == "None" {
            svc["spec"]["clusterIPs"] = json!(["None"]);
        } else if given.is_empty() {
            let families = service_families(&self.service_ips.families(), kind, name, svc)?;
            let mut ips = Vec::new();
            for f in &families {
                let ip = self.service_ips.allocate(f).ok_or_else(|| {
                    ApiError::internal(format!("failed to allocate a serviceIP for service {name}: the {f} range is full or no service CIDR is configured"))
                })?;
                // Recorded at once: a failure later in this call releases what was taken.
                taken.ips.push(ip);
                ips.push(ip.to_string());
            }
            svc["spec"]["clusterIP"] = json!(ips[0]);
            svc["spec"]["clusterIPs"] = json!(ips);
            svc["spec"]["ipFamilies"] = json!(families);
        } else {
            let ip: IpAddr = given.parse().map_err(|_| {
                ApiError::invalid(
                    kind,
                    name,
                    &[FieldError::invalid(
                        "spec.clusterIP",
                        &given,
                        "must be a valid IP address",
                    )],
                )
            })?;
            self.service_ips.occupy(ip);
            taken.ips.push(ip);
            svc["spec"]["clusterIPs"] = json!([given]);
            svc["spec"]["ipFamilies"] = json!([if ip.is_ipv4() { "IPv4" } else { "IPv6" }]);
        }
        if given != "None" {
            let spec = svc["spec"].as_object_mut().expect("an object");
            spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
        }
        if svc_type == "NodePort" || svc_type == "LoadBalancer" {
            svc["spec"]
                .as_object_mut()
                .expect("an object")
                .entry("externalTrafficPolicy")
                .or_insert(json!("Cluster"));
            // `allocateLoadBalancerNodePorts: false` (LoadBalancer only): no node ports.
            let allocate = svc_type == "NodePort"
                || svc
                    .pointer("/spec/allocateLoadBalancerNodePorts")
                    .and_then(Value::as_bool)
                    != Some(false);
            if svc_type == "LoadBalancer" {
                svc["spec"]
                    .as_object_mut()
                    .expect("an object")
                    .entry("allocateLoadBalancerNodePorts")
                    .or_insert(json!(true));
            }
            if allocate {
                self.assign_node_ports(kind, name, svc, taken)?;
            }
            let local = svc
                .pointer("/spec/externalTrafficPolicy")
                .and_then(Value::as_str)
                == Some("Local");
            if svc_type == "LoadBalancer" && local {
                let port = match svc
                    .pointer("/spec/healthCheckNodePort")
                    .and_then(Value::as_u64)
                {
                    Some(n) => {
                        self.request_node_port(kind, name, "spec.healthCheckNodePort", n)?;
                        n as u16
                    }
                    None => self.free_node_port()?,
                };
                taken.ports.push(port);
                svc["spec"]["healthCheckNodePort"] = json!(port);
            }
        }
        Ok(())
    }
}
