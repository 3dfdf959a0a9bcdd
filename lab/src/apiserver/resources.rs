//! The kinds the stand-in serves, their discovery documents, and the conversion between the two
//! Event APIs (core/v1 and events.k8s.io/v1 share one storage, as in Kubernetes).

use serde_json::{json, Map, Value};

/// How an object's name is validated (the real server's per-kind name validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    Subdomain,
    Label,
    Dns1035,
    PathSegment,
}

/// One served resource: a group/version/plural with its Kind.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceKind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub name_rule: NameRule,
    /// The storage this resource reads and writes; `events` is shared by two API groups.
    pub storage: &'static str,
    /// Serves the `status` subresource; writes to the main resource keep the stored status.
    pub status_subresource: bool,
    /// Field selectors accepted besides `metadata.name` and `metadata.namespace`.
    pub extra_fields: &'static [&'static str],
}

impl ResourceKind {
    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name used in Status details and messages (`pods`, `endpointslices.discovery.k8s.io`).
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn supported_fields(&self) -> Vec<&'static str> {
        let mut f = vec!["metadata.name", "metadata.namespace"];
        f.extend_from_slice(self.extra_fields);
        f
    }

    /// True for the events.k8s.io view of the shared event storage.
    pub fn is_events_v1(&self) -> bool {
        self.storage == "events" && self.group == "events.k8s.io"
    }
}

const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];
const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];
const EVENTS_V1_FIELDS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
];

/// Every resource the stand-in serves.
pub static KINDS: &[ResourceKind] = &[
    ResourceKind {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        name_rule: NameRule::Label,
        storage: "namespaces",
        status_subresource: true,
        extra_fields: &["status.phase"],
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        name_rule: NameRule::Subdomain,
        storage: "nodes",
        status_subresource: true,
        extra_fields: &["spec.unschedulable"],
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        name_rule: NameRule::Subdomain,
        storage: "pods",
        status_subresource: true,
        extra_fields: POD_FIELDS,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        name_rule: NameRule::Dns1035,
        storage: "services",
        status_subresource: true,
        extra_fields: &[],
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        name_rule: NameRule::PathSegment,
        storage: "events",
        status_subresource: false,
        extra_fields: CORE_EVENT_FIELDS,
    },
    ResourceKind {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        name_rule: NameRule::Subdomain,
        storage: "endpointslices",
        status_subresource: false,
        extra_fields: &["addressType"],
    },
    ResourceKind {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        kind: "NetworkPolicy",
        namespaced: true,
        short_names: &["netpol"],
        name_rule: NameRule::Subdomain,
        storage: "networkpolicies",
        status_subresource: false,
        extra_fields: &[],
    },
    ResourceKind {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        name_rule: NameRule::PathSegment,
        storage: "events",
        status_subresource: false,
        extra_fields: EVENTS_V1_FIELDS,
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short_names: &["sa"],
        name_rule: NameRule::Subdomain,
        storage: "serviceaccounts",
        status_subresource: false,
        extra_fields: &[],
    },
    ResourceKind {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        name_rule: NameRule::Subdomain,
        storage: "secrets",
        status_subresource: false,
        extra_fields: &["type"],
    },
    ResourceKind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short_names: &[],
        name_rule: NameRule::PathSegment,
        storage: "clusterroles",
        status_subresource: false,
        extra_fields: &[],
    },
    ResourceKind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short_names: &[],
        name_rule: NameRule::PathSegment,
        storage: "clusterrolebindings",
        status_subresource: false,
        extra_fields: &[],
    },
    ResourceKind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short_names: &[],
        name_rule: NameRule::PathSegment,
        storage: "roles",
        status_subresource: false,
        extra_fields: &[],
    },
    ResourceKind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short_names: &[],
        name_rule: NameRule::PathSegment,
        storage: "rolebindings",
        status_subresource: false,
        extra_fields: &[],
    },
    ResourceKind {
        group: "admissionregistration.k8s.io",
        version: "v1",
        plural: "validatingadmissionpolicies",
        singular: "validatingadmissionpolicy",
        kind: "ValidatingAdmissionPolicy",
        namespaced: false,
        short_names: &[],
        name_rule: NameRule::Subdomain,
        storage: "validatingadmissionpolicies",
        status_subresource: true,
        extra_fields: &[],
    },
    ResourceKind {
        group: "admissionregistration.k8s.io",
        version: "v1",
        plural: "validatingadmissionpolicybindings",
        singular: "validatingadmissionpolicybinding",
        kind: "ValidatingAdmissionPolicyBinding",
        namespaced: false,
        short_names: &[],
        name_rule: NameRule::Subdomain,
        storage: "validatingadmissionpolicybindings",
        status_subresource: false,
        extra_fields: &[],
    },
];

/// The API groups besides core, in discovery order.
pub const GROUPS: &[&str] = &[
    "discovery.k8s.io",
    "networking.k8s.io",
    "events.k8s.io",
    "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io",
];

/// Looks up a resource by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceKind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Looks up the canonical (storage-owning) kind for a storage name: the core/v1 one for events.
pub fn by_storage(storage: &str) -> Option<&'static ResourceKind> {
    KINDS.iter().find(|k| k.storage == storage)
}

/// Finds the resource for a Kind (`apiVersion` + `kind`), as the in-process API takes objects.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceKind> {
    KINDS
        .iter()
        .find(|k| k.api_version() == api_version && k.kind == kind)
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `APIResourceList` for one group/version, or None when we do not serve it.
pub fn api_resource_list(group: &str, version: &str) -> Option<Value> {
    let kinds: Vec<&ResourceKind> = KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for k in &kinds {
        resources.push(json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": VERBS,
            "shortNames": k.short_names,
            "storageVersionHash": "",
        }));
        if k.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

/// `APIGroup` for one named group.
pub fn api_group(group: &str) -> Option<Value> {
    GROUPS.contains(&group).then(|| {
        let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv.clone()], "preferredVersion": gv})
    })
}

/// `APIGroupList` for `/apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .map(|g| api_group(g).expect("listed group"))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Pairs of (core/v1 field, events.k8s.io/v1 field) that differ only in name.
const EVENT_FIELD_MAP: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename_fields(object: &Value, to_v1: bool, api_version: &str) -> Value {
    let Some(map) = object.as_object() else {
        return object.clone();
    };
    let mut out = Map::new();
    for (k, v) in map {
        let renamed = EVENT_FIELD_MAP
            .iter()
            .find(|(core, v1)| if to_v1 { k == core } else { k == v1 })
            .map(|(core, v1)| if to_v1 { *v1 } else { *core })
            .unwrap_or(k.as_str());
        out.insert(renamed.to_string(), v.clone());
    }
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    out.insert("kind".into(), Value::String("Event".into()));
    Value::Object(out)
}

/// Converts a stored (core/v1) Event to events.k8s.io/v1.
pub fn event_core_to_v1(object: &Value) -> Value {
    rename_fields(object, true, "events.k8s.io/v1")
}

/// Converts an events.k8s.io/v1 Event to the stored core/v1 form.
pub fn event_v1_to_core(object: &Value) -> Value {
    rename_fields(object, false, "v1")
}

/// Maps an events.k8s.io field selector name to the stored (core/v1) field.
pub fn event_v1_field_to_core(field: &str) -> String {
    for (core, v1) in EVENT_FIELD_MAP {
        if let Some(rest) = field.strip_prefix(v1) {
            if rest.is_empty() || rest.starts_with('.') {
                return format!("{core}{rest}");
            }
        }
    }
    field.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_conversion_round_trips() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Node", "name": "n1"}, "note": "hello", "reportingController": "kwire.dev/agent",
            "reportingInstance": "n1", "action": "Handshake", "reason": "PeerUp", "type": "Normal", "eventTime": "2025-01-01T00:00:00.000000Z"});
        let core = event_v1_to_core(&v1);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "n1");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "kwire.dev/agent");
        assert_eq!(event_core_to_v1(&core), v1);
        assert_eq!(
            event_v1_field_to_core("regarding.name"),
            "involvedObject.name"
        );
        assert_eq!(event_v1_field_to_core("reason"), "reason");
    }

    #[test]
    fn discovery_lists_every_kind() {
        let core = api_resource_list("", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        for n in [
            "nodes",
            "nodes/status",
            "pods",
            "namespaces",
            "services",
            "events",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        assert!(api_resource_list("networking.k8s.io", "v1").is_some());
        assert!(api_resource_list("apps", "v1").is_none());
        assert_eq!(
            api_group_list()["groups"].as_array().unwrap().len(),
            GROUPS.len()
        );
    }
}
