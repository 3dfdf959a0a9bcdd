//! HTTP routing: Kubernetes REST paths onto the store, discovery documents, and Status errors.
//!
//! Paths served: `/version`, `/healthz`, `/livez`, `/readyz`, `/api`, `/api/v1`, `/apis`,
//! `/apis/GROUP`, `/apis/GROUP/VERSION`, and for each resource
//! `.../RESOURCE` (cluster-scoped, or all namespaces), `.../namespaces/NS/RESOURCE`,
//! `.../RESOURCE/NAME` and `.../RESOURCE/NAME/status`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::authn::{Authenticated, TokenAuthenticator, UserInfo};
use super::error::ApiError;
use super::openapi;
use super::patch::{json_patch, merge_patch, strategic_merge_patch};
use super::rbac::{self, Decision};
use super::registry::Registry;
use super::request::{self, RequestInfo};
use super::resources::{
    self, api_group, api_group_list, api_resource_list, event_v1_field_to_core, ResourceKind,
};
use super::selector::{FieldRequirement, FieldSelector, LabelSelector};
use super::store::{ListOptions, INITIAL_NAMESPACES};
use super::table;
use super::watch::{watch_stream, WatchRequest};

/// The Kubernetes version the stand-in reports at `/version` (the k8s-openapi feature kwire uses).
pub const SERVED_VERSION: (&str, &str) = ("1", "33");

/// Settings the HTTP layer needs.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub bookmark_interval: Duration,
    pub default_watch_timeout: Duration,
    pub server_address: String,
}

/// One kind of request a user made, as the audit set keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditEntry {
    pub username: String,
    pub verb: String,
    /// API group ("" for core), or "" for non-resource requests.
    pub api_group: String,
    /// `nodes`, `nodes/status`; the path for non-resource requests.
    pub resource: String,
    /// False when authorization denied it.
    pub allowed: bool,
}

pub struct AppState {
    pub registry: Arc<Registry>,
    pub authn: Arc<TokenAuthenticator>,
    pub settings: HttpSettings,
    /// Every distinct (user, verb, group, resource, allowed) seen, for tests and `kwire-lab`.
    pub audit: Arc<Mutex<BTreeSet<AuditEntry>>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = serde_json::to_vec(body).expect("JSON values serialise");
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn error_response(err: &ApiError) -> Response {
    json_response(err.code, &err.status())
}

/// Where a resource request points.
struct Target {
    kind: &'static ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn resource_target(
    store: &super::store::Store,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let find = |plural: &str| {
        resources::find(group, version, plural).filter(|k| super::crd::served(store, k))
    };
    // `namespaces/NS/RESOURCE[/NAME[/SUB]]` when RESOURCE is a namespaced resource.
    if rest.len() >= 3 && rest[0] == "namespaces" {
        if let Some(kind) = find(rest[2]).filter(|k| k.namespaced) {
            if rest.len() > 5 {
                return Err(not_found());
            }
            return Ok(Target {
                kind,
                namespace: Some(rest[1].to_string()),
                name: rest.get(3).map(|s| s.to_string()),
                subresource: rest.get(4).map(|s| s.to_string()),
            });
        }
    }
    let kind = rest.first().and_then(|p| find(p)).ok_or_else(not_found)?;
    if rest.len() > 3 || (kind.namespaced && rest.len() > 1) {
        return Err(not_found());
    }
    Ok(Target {
        kind,
        namespace: None,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

async fn dispatch(
    State(app): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = Query::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let user = match authenticate(&app, &headers) {
        Some(u) => u,
        None => return error_response(&ApiError::new(401, "Unauthorized", "Unauthorized")),
    };
    let info = request::parse(method.as_str(), uri.path(), &query);
    let decision = app.registry.rbac().authorize(&user, &info);
    record(&app, &user, &info, decision == Decision::Allow);
    if decision == Decision::Deny {
        tracing::debug!(user = %user.username, verb = %info.verb, resource = %info.resource_and_subresource(), "forbidden");
        return error_response(&forbidden(&user, &info));
    }
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    tracing::debug!(%method, path = uri.path(), "request");
    let custom = || super::crd::served_kinds(app.registry.store());
    let result = match segs.as_slice() {
        ["version"] => Ok(json_response(200, &version())),
        ["healthz"] | ["livez"] | ["readyz"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => Ok(json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": app.settings.server_address}]}),
        )),
        ["apis"] => Ok(json_response(200, &api_group_list(&custom()))),
        ["api", "v1"] => Ok(json_response(
            200,
            &api_resource_list("", "v1", &[]).expect("core served"),
        )),
        ["apis", group] => api_group(group, &custom())
            .map(|g| json_response(200, &g))
            .ok_or_else(|| not_found_path(&uri)),
        ["apis", group, version] => api_resource_list(group, version, &custom())
            .map(|l| json_response(200, &l))
            .ok_or_else(|| not_found_path(&uri)),
        ["api", "v1", rest @ ..] => {
            let req = ResourceRequest {
                app: &app,
                user: &user,
                method: &method,
                group: "",
                version: "v1",
            };
            handle_resource(&req, rest, &query, &headers, body)
        }
        ["apis", group, version, rest @ ..] => {
            let req = ResourceRequest {
                app: &app,
                user: &user,
                method: &method,
                group,
                version,
            };
            handle_resource(&req, rest, &query, &headers, body)
        }
        ["openapi", "v3"] => Ok(json_response(200, &openapi::index())),
        ["openapi", "v3", rest @ ..] => openapi::group_version_doc(&rest.join("/"))
            .map(|d| json_response(200, &d))
            .ok_or_else(|| not_found_path(&uri)),
        // No OpenAPI v2 document: kubectl uses v3.
        _ => Err(not_found_path(&uri)),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

/// The user of a request, or None for 401: a token the stand-in did not issue, or a service
/// account token whose ServiceAccount no longer exists.
fn authenticate(app: &AppState, headers: &HeaderMap) -> Option<UserInfo> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match app.authn.authenticate(header) {
        Authenticated::Anonymous => Some(UserInfo::anonymous()),
        Authenticated::Rejected => None,
        Authenticated::User(u) => {
            if let Some((ns, name)) = u.service_account_of() {
                let sa = super::resources::find("", "v1", "serviceaccounts").expect("served");
                app.registry.store().get(sa, Some(ns), name).ok()?;
            }
            Some(u)
        }
    }
}

fn record(app: &AppState, user: &UserInfo, info: &RequestInfo, allowed: bool) {
    let entry = AuditEntry {
        username: user.username.clone(),
        verb: info.verb.clone(),
        api_group: info.api_group.clone(),
        resource: if info.is_resource_request {
            info.resource_and_subresource()
        } else {
            info.path.clone()
        },
        allowed,
    };
    app.audit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(entry);
}

/// The 403 of a request RBAC denies, worded as the real server words it.
fn forbidden(user: &UserInfo, info: &RequestInfo) -> ApiError {
    let reason = rbac::forbidden_reason(user, info);
    if !info.is_resource_request {
        return ApiError::new(403, "Forbidden", format!("forbidden: {reason}"));
    }
    let qualified = if info.api_group.is_empty() {
        info.resource.clone()
    } else {
        format!("{}.{}", info.resource, info.api_group)
    };
    let message = if info.name.is_empty() {
        format!("{qualified} is forbidden: {reason}")
    } else {
        format!("{qualified} \"{}\" is forbidden: {reason}", info.name)
    };
    let mut e = ApiError::new(403, "Forbidden", message);
    let mut details = json!({"kind": info.resource});
    if !info.name.is_empty() {
        details["name"] = json!(info.name);
    }
    if !info.api_group.is_empty() {
        details["group"] = json!(info.api_group);
    }
    e.details = Some(details);
    e
}

fn not_found_path(uri: &Uri) -> ApiError {
    let mut e = ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    );
    e.details = Some(
        json!({"causes": [{"reason": "UnexpectedServerResponse", "message": format!("404 page not found: {}", uri.path())}]}),
    );
    e
}

fn version() -> Value {
    json!({
        "major": SERVED_VERSION.0,
        "minor": SERVED_VERSION.1,
        "gitVersion": format!("v{}.{}.0-kwire-lab", SERVED_VERSION.0, SERVED_VERSION.1),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON (only JSON is accepted, not YAML or protobuf): {e}"
        ))
    })
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true" || v == "1")
}

fn selectors(
    kind: &ResourceKind,
    query: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let label = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut field = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(f) = field.unsupported_field(&kind.supported_fields()) {
        return Err(ApiError::bad_request(format!(
            "field label not supported: {f}"
        )));
    }
    if kind.is_events_v1() {
        for r in &mut field.requirements {
            r.field = event_v1_field_to_core(&r.field);
        }
    }
    Ok((label, field))
}

fn list_kind(kind: &ResourceKind) -> String {
    format!("{}List", kind.kind)
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

/// Who asks what of which API group and version.
struct ResourceRequest<'a> {
    app: &'a AppState,
    user: &'a UserInfo,
    method: &'a Method,
    group: &'a str,
    version: &'a str,
}

fn handle_resource(
    req: &ResourceRequest<'_>,
    rest: &[&str],
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (app, user, method) = (req.app, req.user, req.method);
    let target = resource_target(req.app.registry.store(), req.group, req.version, rest)?;
    let kind = target.kind;
    let ns = target.namespace.as_deref();
    let store = app.registry.store();
    let registry = &app.registry;
    if query.get("dryRun").is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the kwire-lab API stand-in",
        ));
    }
    if let Some(sub) = target.subresource.as_deref() {
        if sub != "status" || !kind.status_subresource {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!(
                    "the server could not find the requested resource ({} {sub})",
                    kind.plural
                ),
            ));
        }
    }
    let status_sub = target.subresource.is_some();
    // The old single-object watch (`.../RESOURCE/NAME?watch=true`) is a collection watch on
    // `metadata.name=NAME`, as in the real server.
    let item_watch =
        target.name.is_some() && !status_sub && method == Method::GET && flag(query, "watch");
    let name = if item_watch {
        None
    } else {
        target.name.clone()
    };
    match (&name, method) {
        (None, &Method::GET) => {
            let (label_selector, mut field_selector) = selectors(kind, query)?;
            if item_watch {
                field_selector.requirements.push(FieldRequirement {
                    field: "metadata.name".into(),
                    value: target.name.clone().unwrap_or_default(),
                    negate: false,
                });
            }
            if flag(query, "watch") {
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .filter(|t| *t > 0)
                    .map_or(app.settings.default_watch_timeout, Duration::from_secs);
                let req = WatchRequest {
                    kind,
                    namespace: target.namespace.clone(),
                    label_selector,
                    field_selector,
                    resource_version: query.get("resourceVersion").cloned(),
                    allow_bookmarks: flag(query, "allowWatchBookmarks"),
                    send_initial_events: flag(query, "sendInitialEvents"),
                    timeout,
                    bookmark_interval: app.settings.bookmark_interval,
                    as_table: wants_table(headers),
                };
                let stream = watch_stream(store.clone(), req)?;
                return Ok(Response::builder()
                    .status(200)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CACHE_CONTROL, "no-cache, private")
                    .body(Body::from_stream(stream))
                    .expect("valid response"));
            }
            let limit = match query.get("limit").filter(|l| !l.is_empty()) {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                ),
                None => None,
            };
            let opts = ListOptions {
                label_selector,
                field_selector,
                limit,
                continue_token: query.get("continue").cloned(),
                resource_version: query.get("resourceVersion").cloned(),
                resource_version_match: query.get("resourceVersionMatch").cloned(),
            };
            let page = store.list(kind, ns, &opts)?;
            let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
            if let Some(c) = &page.continue_token {
                metadata["continue"] = json!(c);
            }
            if let Some(r) = page.remaining_item_count {
                metadata["remainingItemCount"] = json!(r);
            }
            if wants_table(headers) {
                let items: Vec<Value> = page.items.iter().map(|o| (**o).clone()).collect();
                return Ok(json_response(
                    200,
                    &table::list_table(kind, &items, metadata),
                ));
            }
            // Serialised from the stored objects, not copied into a new document.
            #[derive(serde::Serialize)]
            #[serde(rename_all = "camelCase")]
            struct List<'a> {
                kind: String,
                api_version: String,
                metadata: Value,
                items: Vec<&'a Value>,
            }
            let list = List {
                kind: list_kind(kind),
                api_version: kind.api_version(),
                metadata,
                items: page.items.iter().map(|o| &**o).collect(),
            };
            let bytes = serde_json::to_vec(&list).expect("JSON values serialise");
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response())
        }
        (None, &Method::POST) => {
            if kind.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed(format!(
                    "create of {} needs a namespace in the path",
                    kind.plural
                )));
            }
            let created = registry.create(user, kind, ns, parse_body(&body)?)?;
            Ok(json_response(201, &created))
        }
        (None, _) => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on the {} collection by the kwire-lab API stand-in",
            kind.plural
        ))),
        (Some(name), &Method::GET) => {
            let object = store.get(kind, ns, name)?;
            if wants_table(headers) {
                let rv = object
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(json!(""));
                return Ok(json_response(
                    200,
                    &table::list_table(
                        kind,
                        std::slice::from_ref(&object),
                        json!({"resourceVersion": rv}),
                    ),
                ));
            }
            Ok(json_response(200, &object))
        }
        (Some(name), &Method::PUT) => {
            let object = parse_body(&body)?;
            Ok(json_response(
                200,
                &registry.modify(user, kind, ns, name, status_sub, |_| Ok(object))?,
            ))
        }
        (Some(name), &Method::PATCH) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let media = content_type.split(';').next().unwrap_or("").trim();
            let patch = match media {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" | "application/json-patch+json" => parse_body(&body)?,
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                    return Err(ApiError::unsupported_media_type(
                        "server-side apply is not supported by the kwire-lab API stand-in (the real API server supports it); use a strategic merge patch, a JSON merge patch or a JSON patch",
                    ))
                }
                other => return Err(ApiError::unsupported_media_type(format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"))),
            };
            let is_json_patch = media == "application/json-patch+json";
            let is_strategic = media == "application/strategic-merge-patch+json";
            let patched = registry.modify(user, kind, ns, name, status_sub, |current| {
                if is_strategic {
                    let mut object = current;
                    strategic_merge_patch(&mut object, &patch).map_err(|e| {
                        ApiError::new(
                            422,
                            "Invalid",
                            format!(
                                "the strategic merge patch for {} \"{name}\" cannot be applied: {e}",
                                kind.qualified_plural()
                            ),
                        )
                    })?;
                    Ok(object)
                } else if is_json_patch {
                    json_patch(&current, &patch).map_err(|e| {
                        ApiError::new(
                            422,
                            "Invalid",
                            format!(
                                "the JSON patch for {} \"{name}\" cannot be applied: {e}",
                                kind.qualified_plural()
                            ),
                        )
                    })
                } else {
                    let mut object = current;
                    merge_patch(&mut object, &patch);
                    Ok(object)
                }
            })?;
            Ok(json_response(200, &patched))
        }
        (Some(name), &Method::DELETE) if !status_sub => {
            let options: Value = if body.is_empty() {
                json!({})
            } else {
                parse_body(&body)?
            };
            let pre = |f: &str| {
                options
                    .pointer(&format!("/preconditions/{f}"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            if kind.storage == "namespaces"
                && INITIAL_NAMESPACES.contains(&name.as_str())
                && name != "kube-node-lease"
            {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                    ),
                ));
            }
            let gone = registry.delete(
                user,
                kind,
                ns,
                name,
                pre("uid").as_deref(),
                pre("resourceVersion").as_deref(),
            )?;
            // Like the real registries: some kinds return the deleted object, others a Status.
            if matches!(kind.storage, "pods" | "services" | "namespaces") {
                return Ok(json_response(200, &gone));
            }
            let mut details = json!({"name": name, "kind": kind.plural, "uid": gone.pointer("/metadata/uid").cloned().unwrap_or(json!(""))});
            if !kind.group.is_empty() {
                details["group"] = json!(kind.group);
            }
            Ok(json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
            ))
        }
        (Some(_), _) => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on this path by the kwire-lab API stand-in"
        ))),
    }
}
