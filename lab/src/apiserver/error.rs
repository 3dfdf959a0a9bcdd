//! API errors as the Kubernetes API server reports them: a `Status` object with a reason and
//! an HTTP code, which kube-rs turns into `kube::Error::Api` and kubectl prints.

use serde_json::{json, Value};

use super::resources::ResourceKind;
use super::validate::FieldError;

/// An API error: answered as a `Status` with this `code` and `reason`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} ({reason}, {code})")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

fn details(kind: &ResourceKind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural});
    if !kind.group.is_empty() {
        d["group"] = json!(kind.group);
    }
    d
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn not_found(kind: &ResourceKind, name: &str) -> Self {
        ApiError {
            details: Some(details(kind, name)),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.qualified_plural()),
            )
        }
    }

    pub fn namespace_not_found(namespace: &str) -> Self {
        ApiError {
            details: Some(json!({"name": namespace, "kind": "namespaces"})),
            ..Self::new(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            )
        }
    }

    pub fn already_exists(kind: &ResourceKind, name: &str) -> Self {
        ApiError {
            details: Some(details(kind, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.qualified_plural()),
            )
        }
    }

    pub fn conflict(kind: &ResourceKind, name: &str, why: &str) -> Self {
        ApiError {
            details: Some(details(kind, name)),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    kind.qualified_plural()
                ),
            )
        }
    }

    /// The object was modified since the client read it (stale `metadata.resourceVersion`).
    pub fn stale(kind: &ResourceKind, name: &str) -> Self {
        Self::conflict(kind, name, "the object has been modified; please apply your changes to the latest version and try again")
    }

    pub fn invalid(kind: &ResourceKind, name: &str, errors: &[FieldError]) -> Self {
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.reason, "message": e.message, "field": e.field}))
            .collect();
        let list = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let list = if errors.len() > 1 {
            format!("[{list}]")
        } else {
            list
        };
        let mut d = json!({"name": name, "kind": kind.kind, "causes": causes});
        if !kind.group.is_empty() {
            d["group"] = json!(kind.group);
        }
        ApiError {
            details: Some(d),
            ..Self::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {list}", kind.kind),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 410 Gone: the resourceVersion (or continue token) asked for is older than the history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object the server sends.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
