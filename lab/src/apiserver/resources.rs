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
    ResourceKind {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        name_rule: NameRule::Subdomain,
        storage: "customresourcedefinitions",
        status_subresource: true,
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
    "apiextensions.k8s.io",
];

/// Custom kinds registered in this process ([`register_custom`]).
static CUSTOM: std::sync::RwLock<Vec<&'static ResourceKind>> = std::sync::RwLock::new(Vec::new());

/// Every kind known in this process: the built-in ones, then the custom ones some stand-in's
/// CustomResourceDefinitions registered ([`super::crd`]). A custom kind known here is served
/// only by a stand-in whose store holds its CRD ([`super::crd::served`]).
fn known() -> impl Iterator<Item = &'static ResourceKind> {
    let custom = CUSTOM.read().unwrap_or_else(|e| e.into_inner()).clone();
    KINDS.iter().chain(custom)
}

/// A kind a CustomResourceDefinition defines (one per served version).
#[derive(Debug, Clone)]
pub struct CustomKind {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub status_subresource: bool,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// Makes a custom kind known in this process, once per group/version/plural (a
/// `ResourceKind` is `'static`: each distinct one is leaked once). A second definition must
/// agree on kind, scope and subresources.
pub fn register_custom(c: CustomKind) -> Result<&'static ResourceKind, String> {
    let mut reg = CUSTOM.write().unwrap_or_else(|e| e.into_inner());
    let same = |k: &&&'static ResourceKind| {
        k.group == c.group && k.version == c.version && k.plural == c.plural
    };
    if let Some(k) = reg.iter().find(same) {
        if k.kind != c.kind
            || k.namespaced != c.namespaced
            || k.status_subresource != c.status_subresource
        {
            return Err(format!(
                "the kwire-lab stand-in cannot change the kind, scope or subresources of {}.{}/{} once defined in this process (the real server can); use another group or plural",
                c.plural, c.group, c.version
            ));
        }
        return Ok(*k);
    }
    let short: Vec<&'static str> = c.short_names.iter().map(|s| leak(s)).collect();
    let k: &'static ResourceKind = Box::leak(Box::new(ResourceKind {
        group: leak(&c.group),
        version: leak(&c.version),
        plural: leak(&c.plural),
        singular: leak(&c.singular),
        kind: leak(&c.kind),
        namespaced: c.namespaced,
        short_names: Box::leak(short.into_boxed_slice()),
        name_rule: NameRule::Subdomain,
        // One storage per version: the stand-in does not convert between versions.
        storage: leak(&format!("{}.{}/{}", c.plural, c.group, c.version)),
        status_subresource: c.status_subresource,
        extra_fields: &[],
    }));
    reg.push(k);
    Ok(k)
}

/// True for the kinds compiled in (not from a CustomResourceDefinition).
pub fn is_builtin(kind: &ResourceKind) -> bool {
    KINDS.iter().any(|k| std::ptr::eq(k, kind))
}

/// Looks up a resource by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceKind> {
    known().find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Looks up the canonical (storage-owning) kind for a storage name: the core/v1 one for events.
pub fn by_storage(storage: &str) -> Option<&'static ResourceKind> {
    known().find(|k| k.storage == storage)
}

/// Finds the resource for a Kind (`apiVersion` + `kind`), as the in-process API takes objects.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceKind> {
    known().find(|k| k.api_version() == api_version && k.kind == kind)
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `APIResourceList` for one group/version, or None when we do not serve it; `custom` are the
/// custom kinds this stand-in serves.
pub fn api_resource_list(
    group: &str,
    version: &str,
    custom: &[&'static ResourceKind],
) -> Option<Value> {
    let kinds: Vec<&ResourceKind> = KINDS
        .iter()
        .chain(custom.iter().copied())
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

/// `APIGroup` for one named group (built in, or of one of the `custom` kinds served).
pub fn api_group(group: &str, custom: &[&'static ResourceKind]) -> Option<Value> {
    let versions: Vec<&str> = if GROUPS.contains(&group) {
        vec!["v1"]
    } else {
        let mut v: Vec<&str> = custom
            .iter()
            .filter(|k| k.group == group)
            .map(|k| k.version)
            .collect();
        v.dedup();
        v
    };
    let gvs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = gvs.first()?.clone();
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": preferred}),
    )
}

/// `APIGroupList` for `/apis`: the built-in groups, then the custom ones served.
pub fn api_group_list(custom: &[&'static ResourceKind]) -> Value {
    let mut names: Vec<&str> = GROUPS.to_vec();
    for k in custom {
        if !names.contains(&k.group) {
            names.push(k.group);
        }
    }
    let groups: Vec<Value> = names.iter().filter_map(|g| api_group(g, custom)).collect();
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
        let core = api_resource_list("", "v1", &[]).unwrap();
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
        assert!(api_resource_list("networking.k8s.io", "v1", &[]).is_some());
        assert!(api_resource_list("apps", "v1", &[]).is_none());
        assert_eq!(
            api_group_list(&[])["groups"].as_array().unwrap().len(),
            GROUPS.len()
        );
    }
}
