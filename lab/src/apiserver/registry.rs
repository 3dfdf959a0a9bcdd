//! The write path between the API (HTTP or in-process) and the store, in the order
//! kube-apiserver takes it: allocation where the registry does it (Service ClusterIPs and
//! NodePorts before storing; Node podCIDRs as kube-controller-manager does, in a second write),
//! then the store's own defaulting and validation, then validating admission (under the
//! store's lock, on the objects exactly as stored), then the write. Authorization happens
//! before, in [`super::http`].

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

use super::admission::{AdmissionRequest, Operation, Policies};
use super::alloc::Allocators;
use super::authn::UserInfo;
use super::crd;
use super::error::ApiError;
use super::rbac::RbacObjects;
use super::resources::{self, ResourceKind};
use super::store::{ListOptions, Store};

/// The store with its allocators, RBAC objects and admission policies.
pub struct Registry {
    store: Arc<Store>,
    alloc: Mutex<Allocators>,
}

fn all_of(store: &Store, group: &str, plural: &str) -> Vec<Value> {
    let kind = resources::find(group, "v1", plural).expect("served kind");
    store
        .list(kind, None, &ListOptions::default())
        .map(|p| p.items.iter().map(|o| (**o).clone()).collect())
        .unwrap_or_default()
}

impl Registry {
    pub fn new(store: Arc<Store>, alloc: Allocators) -> Registry {
        Registry {
            store,
            alloc: Mutex::new(alloc),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn alloc(&self) -> MutexGuard<'_, Allocators> {
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The RBAC objects in force now.
    pub fn rbac(&self) -> RbacObjects {
        const RBAC: &str = "rbac.authorization.k8s.io";
        RbacObjects {
            cluster_roles: all_of(&self.store, RBAC, "clusterroles"),
            cluster_role_bindings: all_of(&self.store, RBAC, "clusterrolebindings"),
            roles: all_of(&self.store, RBAC, "roles"),
            role_bindings: all_of(&self.store, RBAC, "rolebindings"),
        }
    }

    /// The admission policies in force now.
    pub fn policies(&self) -> Policies {
        const ADM: &str = "admissionregistration.k8s.io";
        Policies {
            policies: all_of(&self.store, ADM, "validatingadmissionpolicies"),
            bindings: all_of(&self.store, ADM, "validatingadmissionpolicybindings"),
        }
    }

    fn namespace_object(&self, kind: &ResourceKind, namespace: &str) -> Option<Value> {
        if !kind.namespaced || namespace.is_empty() {
            return None;
        }
        let ns = resources::find("", "v1", "namespaces").expect("served");
        self.store.get(ns, None, namespace).ok()
    }

    /// Creates an object as `user`.
    pub fn create(
        &self,
        user: &UserInfo,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ns = if kind.namespaced {
            namespace
                .or_else(|| {
                    object
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                })
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let reservation = if kind.storage == "services" && object.is_object() {
            Some(self.alloc().service_creating(kind, &name, &mut object)?)
        } else {
            None
        };
        let schema = crd::schema_of(&self.store, kind)?;
        let policies = self.policies();
        let ns_object = self.namespace_object(kind, &ns);
        let admit = |_: Option<&Value>, new: Option<&Value>| {
            crd::check_schema(kind, schema.as_ref(), new)?;
            if let (Some(crd), "customresourcedefinitions") = (new, kind.storage) {
                crd::register(crd)?;
            }
            let name = new
                .and_then(|o| o.pointer("/metadata/name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let req = AdmissionRequest {
                operation: Operation::Create,
                kind,
                subresource: "",
                namespace: &ns,
                name,
                user,
            };
            policies.validate(&req, new, None, ns_object.as_ref())
        };
        let created = match self.store.create_admitted(kind, namespace, object, &admit) {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = &reservation {
                    self.alloc().release(r);
                }
                return Err(e);
            }
        };
        if kind.storage == "customresourcedefinitions" {
            return self.establish(kind, created);
        }
        if kind.storage == "nodes" {
            let name = created
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let cidrs = self.alloc().node_created(&name, &created);
            if let Some(cidrs) = cidrs {
                let strings: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                // kube-controller-manager's write: not the creator's, so not admitted as theirs.
                let assigned = self.store.modify(kind, None, &name, false, |mut n| {
                    n["spec"]["podCIDR"] = json!(strings[0]);
                    n["spec"]["podCIDRs"] = json!(strings);
                    Ok(n)
                });
                if let Err(e) = assigned {
                    self.alloc().pod_cidrs.release(&cidrs);
                    tracing::warn!(node = %name, error = %e, "cannot assign podCIDRs");
                }
            }
        }
        Ok(created)
    }

    /// A CRD just stored (its kinds registered when it was admitted): writes the status the
    /// real server's CRD controllers write (names accepted, established).
    fn establish(&self, kind: &'static ResourceKind, created: Value) -> Result<Value, ApiError> {
        let name = created
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let status = crd::established_status(&created);
        self.store.modify(kind, None, &name, true, |mut c| {
            c["status"] = status;
            Ok(c)
        })
    }

    /// Reads, changes and writes an object (or its status) as `user`: PUT and PATCH.
    pub fn modify(
        &self,
        user: &UserInfo,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        status: bool,
        change: impl FnOnce(Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let ns = namespace.unwrap_or("").to_string();
        let schema = crd::schema_of(&self.store, kind)?;
        let policies = self.policies();
        let ns_object = self.namespace_object(kind, &ns);
        let admit = |old: Option<&Value>, new: Option<&Value>| {
            crd::check_schema(kind, schema.as_ref(), new)?;
            if let (Some(crd), "customresourcedefinitions", false) = (new, kind.storage, status) {
                crd::register(crd)?;
            }
            let req = AdmissionRequest {
                operation: Operation::Update,
                kind,
                subresource: if status { "status" } else { "" },
                namespace: &ns,
                name,
                user,
            };
            policies.validate(&req, new, old, ns_object.as_ref())
        };
        let next = self
            .store
            .modify_admitted(kind, namespace, name, status, change, &admit)?;
        if kind.storage == "nodes" {
            self.alloc().node_updated(&next);
        }
        Ok(next)
    }

    /// Deletes an object as `user`; preconditions as in [`Store::delete`].
    pub fn delete(
        &self,
        user: &UserInfo,
        kind: &'static ResourceKind,
        namespace: Option<&str>,
        name: &str,
        uid: Option<&str>,
        resource_version: Option<&str>,
    ) -> Result<Value, ApiError> {
        let ns = namespace.unwrap_or("").to_string();
        let policies = self.policies();
        let ns_object = self.namespace_object(kind, &ns);
        let admit = |old: Option<&Value>, _: Option<&Value>| {
            let req = AdmissionRequest {
                operation: Operation::Delete,
                kind,
                subresource: "",
                namespace: &ns,
                name,
                user,
            };
            policies.validate(&req, None, old, ns_object.as_ref())
        };
        let gone =
            self.store
                .delete_admitted(kind, namespace, name, uid, resource_version, &admit)?;
        match kind.storage {
            "nodes" => self.alloc().node_deleted(&gone),
            "services" => self.alloc().service_deleted(&gone),
            _ => {}
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::cidr::{PodCidrAllocator, ServiceIpAllocator};
    use crate::apiserver::resources::find;
    use crate::apiserver::store::StoreConfig;

    fn registry() -> Registry {
        Registry::new(
            Arc::new(Store::new(StoreConfig { history_size: 1000 })),
            Allocators::new(
                PodCidrAllocator::new(
                    Some(("10.244.0.0/16".parse().unwrap(), 24)),
                    Some(("fd00:10:244::/56".parse().unwrap(), 64)),
                )
                .unwrap(),
                ServiceIpAllocator::new(&["10.96.0.0/12".parse().unwrap()]).unwrap(),
            ),
        )
    }

    #[test]
    fn nodes_get_dual_stack_pod_cidrs_in_a_second_write_and_release_them() {
        let r = registry();
        let u = UserInfo::control_plane();
        let nodes = find("", "v1", "nodes").unwrap();
        let created = r
            .create(
                &u,
                nodes,
                None,
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"}}),
            )
            .unwrap();
        assert!(
            created.pointer("/spec/podCIDRs").is_none(),
            "the create itself is stored as sent"
        );
        let s = r.store();
        let a = s.get(nodes, None, "a").unwrap();
        assert_eq!(
            a["spec"]["podCIDRs"],
            json!(["10.244.0.0/24", "fd00:10:244::/64"])
        );
        assert_eq!(a["spec"]["podCIDR"], "10.244.0.0/24");
        r.create(&u, nodes, None, json!({"metadata": {"name": "b"}}))
            .unwrap();
        assert_eq!(
            s.get(nodes, None, "b").unwrap()["spec"]["podCIDRs"][0],
            "10.244.1.0/24"
        );
        // A node that brings its own podCIDR keeps it, and nobody else gets it.
        r.create(&u, nodes, None, json!({"metadata": {"name": "c"}, "spec": {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}})).unwrap();
        r.delete(&u, nodes, None, "a", None, None).unwrap();
        r.create(&u, nodes, None, json!({"metadata": {"name": "d"}}))
            .unwrap();
        assert_eq!(
            s.get(nodes, None, "d").unwrap()["spec"]["podCIDRs"],
            json!(["10.244.3.0/24", "fd00:10:244:2::/64"])
        );
        // podCIDRs are write-once.
        let err = r.modify(&u, nodes, None, "d", false, |mut n| {
            n["spec"]["podCIDRs"] = json!(["10.244.9.0/24"]);
            Ok(n)
        });
        assert_eq!(err.unwrap_err().code, 422);
    }

    #[test]
    fn services_get_cluster_ips_and_node_ports_and_a_failed_create_gives_them_back() {
        let r = registry();
        let u = UserInfo::control_plane();
        let svcs = find("", "v1", "services").unwrap();
        let a = r.create(&u, svcs, Some("default"), json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}})).unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(a["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        // Already exists: what it would have taken is free again.
        let again = r.create(&u, svcs, Some("default"), json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}));
        assert_eq!(again.unwrap_err().code, 409);
        let b = r.create(&u, svcs, Some("default"), json!({"metadata": {"name": "web2"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.3", "ports": [{"port": 80, "nodePort": 30001}]}}));
        assert!(b.is_ok(), "10.96.0.3 and 30001 were given back: {b:?}");
        // Taken, or outside the range: refused as kube-apiserver does.
        let taken = r.create(
            &u,
            svcs,
            Some("default"),
            json!({"metadata": {"name": "web3"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30001}]}}),
        );
        let e = taken.unwrap_err();
        assert_eq!(e.code, 422);
        assert!(
            e.message.contains(
                "spec.ports[0].nodePort: Invalid value: 30001: provided port is already allocated"
            ),
            "{}",
            e.message
        );
        let outside = r.create(
            &u,
            svcs,
            Some("default"),
            json!({"metadata": {"name": "web3"},
            "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}}),
        );
        let e = outside.unwrap_err();
        assert!(
            e.message.contains(
                "provided port is not in the valid range. The range of valid ports is 30000-32767"
            ),
            "{}",
            e.message
        );
        // One node port for 53/TCP and 53/UDP; a LoadBalancer with Local gets a health check port.
        let dns = r.create(&u, svcs, Some("default"), json!({"metadata": {"name": "dns"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "ports": [{"name": "t", "port": 53}, {"name": "u", "port": 53, "protocol": "UDP"}]}})).unwrap();
        let (t, u_) = (
            &dns["spec"]["ports"][0]["nodePort"],
            &dns["spec"]["ports"][1]["nodePort"],
        );
        assert_eq!(t, u_);
        let hc = dns["spec"]["healthCheckNodePort"].as_u64().unwrap();
        assert!(
            (30000..=32767).contains(&hc) && Some(hc) != t.as_u64(),
            "{dns}"
        );
        assert_eq!(dns["spec"]["allocateLoadBalancerNodePorts"], true);
    }

    #[test]
    fn dual_stack_services_get_one_cluster_ip_per_family() {
        let u = UserInfo::control_plane();
        let svcs = find("", "v1", "services").unwrap();
        let dual = Registry::new(
            Arc::new(Store::new(StoreConfig { history_size: 100 })),
            Allocators::new(
                PodCidrAllocator::new(None, None).unwrap(),
                ServiceIpAllocator::new(&[
                    "10.96.0.0/12".parse().unwrap(),
                    "fd00:10:96::/112".parse().unwrap(),
                ])
                .unwrap(),
            ),
        );
        let create = |r: &Registry, name: &str, spec: Value| {
            r.create(
                &u,
                svcs,
                Some("default"),
                json!({"metadata": {"name": name}, "spec": spec}),
            )
        };
        let single = create(&dual, "a", json!({"ports": [{"port": 80}]})).unwrap();
        assert_eq!(single["spec"]["clusterIPs"], json!(["10.96.0.2"]));
        assert_eq!(single["spec"]["ipFamilies"], json!(["IPv4"]));
        let both = create(
            &dual,
            "b",
            json!({"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}),
        )
        .unwrap();
        assert_eq!(
            both["spec"]["clusterIPs"],
            json!(["10.96.0.3", "fd00:10:96::2"])
        );
        assert_eq!(both["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        let v6_first = create(&dual, "c", json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"], "ports": [{"port": 80}]})).unwrap();
        assert_eq!(v6_first["spec"]["clusterIP"], "fd00:10:96::3");
        // A cluster with IPv4 only refuses what needs IPv6, and says why.
        let v4 = registry();
        let e = create(
            &v4,
            "d",
            json!({"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
        )
        .unwrap_err();
        assert!(
            format!("{e:?}").contains("not configured for dual-stack"),
            "{e:?}"
        );
        let e = create(
            &v4,
            "e",
            json!({"ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
        )
        .unwrap_err();
        assert!(
            format!("{e:?}").contains("not configured on this cluster"),
            "{e:?}"
        );
        let ok = create(
            &v4,
            "f",
            json!({"ipFamilyPolicy": "PreferDualStack", "ports": [{"port": 80}]}),
        )
        .unwrap();
        assert_eq!(ok["spec"]["ipFamilies"], json!(["IPv4"]));
    }

    #[test]
    fn admission_sees_the_write_and_can_refuse_it() {
        let r = registry();
        let u = UserInfo::control_plane();
        let adm = |p| find("admissionregistration.k8s.io", "v1", p).unwrap();
        r.create(&u, adm("validatingadmissionpolicies"), None, json!({"metadata": {"name": "no-x"}, "spec": {
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": ["nodes"]}]},
            "validations": [{"expression": "!has(object.metadata.labels) || !('x' in object.metadata.labels)", "message": "no label x", "reason": "Forbidden"}]}})).unwrap();
        r.create(&u, adm("validatingadmissionpolicybindings"), None, json!({"metadata": {"name": "no-x"}, "spec": {"policyName": "no-x", "validationActions": ["Deny"]}})).unwrap();
        let nodes = find("", "v1", "nodes").unwrap();
        let e = r
            .create(
                &u,
                nodes,
                None,
                json!({"metadata": {"name": "a", "labels": {"x": "1"}}}),
            )
            .unwrap_err();
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
        assert!(
            e.message.ends_with("denied request: no label x"),
            "{}",
            e.message
        );
        r.create(&u, nodes, None, json!({"metadata": {"name": "a"}}))
            .unwrap();
        let e = r
            .modify(&u, nodes, None, "a", false, |mut n| {
                n["metadata"]["labels"] = json!({"x": "1"});
                Ok(n)
            })
            .unwrap_err();
        assert_eq!(e.code, 403);
        assert!(r.store().get(nodes, None, "a").unwrap()["metadata"]["labels"].is_null());
    }
}
