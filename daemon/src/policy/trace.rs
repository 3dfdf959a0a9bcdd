//! `kwire policy trace`: offline verdict for one connection under a set of manifests, with the policy and rule that decided it.
//!
//! Manifests are YAML (multi-document) or JSON files holding Namespaces, Pods and
//! NetworkPolicies, directly or inside `kind: List` (or `PodList`, ...) objects; other kinds are
//! ignored. YAML is read with `serde_norway`, the maintained fork of the archived `serde_yaml`.
//! Exit codes (see [`exit_code`]): 0 allowed, 1 denied, 2 error.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::networking::v1 as netv1;
use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{DirectionExplanation, Explanation, PolicySet};
use super::model::{ModelError, Namespace, ObjectRef, Pod};
use super::spec::{Policy, PolicyError};
use super::{AllowReason, Direction, Protocol, Verdict};

/// Exit code when the connection is allowed.
pub const EXIT_ALLOW: u8 = 0;
/// Exit code when the connection is denied (like `grep` finding nothing: a result, not a failure).
pub const EXIT_DENY: u8 = 1;
/// Exit code for unreadable input or a bad argument.
pub const EXIT_ERROR: u8 = 2;

/// `kwire policy trace` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Manifest file (YAML, multi-document YAML or JSON; `kind: List` is unpacked) with
    /// Namespaces, Pods and NetworkPolicies. Repeat for more files.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub filename: Vec<PathBuf>,
    /// Source: NAMESPACE/POD (a Pod from the manifests) or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub from: String,
    /// Destination: NAMESPACE/POD (a Pod from the manifests) or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub to: String,
    /// Destination port and protocol: 80, 80/TCP, 53/UDP, 9000/SCTP (protocol defaults to TCP).
    #[arg(long, value_name = "PORT[/PROTOCOL]")]
    pub port: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// `--output` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// One end of the traced connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: Option<ObjectRef>,
    pub ip: IpAddr,
}

/// What `run` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceOutcome {
    pub from: Endpoint,
    pub to: Endpoint,
    pub protocol: Protocol,
    pub port: u16,
    pub explanation: Explanation,
}

impl TraceOutcome {
    pub fn allowed(&self) -> bool {
        self.explanation.allowed
    }
}

/// The objects read from manifests, not yet compiled.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<Policy>,
    /// Objects of other kinds that were skipped.
    pub ignored: usize,
    /// Where each object came from, for duplicate detection: (kind, namespace/name) -> file.
    origin: HashMap<(&'static str, String), PathBuf>,
}

impl Manifests {
    pub fn compile(self) -> PolicySet {
        PolicySet::compile(self.namespaces, self.pods, self.policies)
    }

    /// The pod named `namespace/name`.
    pub fn find_pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Reads the files in order.
    pub fn load(paths: &[PathBuf]) -> Result<Self, TraceError> {
        let mut m = Manifests::default();
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
                path: path.clone(),
                source,
            })?;
            m.add_text(path, &text)?;
        }
        Ok(m)
    }

    /// Adds the objects in `text` (YAML or JSON), `path` naming it in errors.
    pub fn add_text(&mut self, path: &Path, text: &str) -> Result<(), TraceError> {
        let first = text.trim_start().chars().next();
        if matches!(first, Some('{') | Some('[')) {
            let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
            for (i, doc) in stream.enumerate() {
                let doc = doc.map_err(|source| TraceError::Json {
                    path: path.to_path_buf(),
                    source,
                })?;
                self.add_document(path, i, doc)?;
            }
        } else {
            for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
                let doc = Value::deserialize(doc).map_err(|source| TraceError::Yaml {
                    path: path.to_path_buf(),
                    document: i + 1,
                    source,
                })?;
                self.add_document(path, i, doc)?;
            }
        }
        Ok(())
    }

    fn add_document(&mut self, path: &Path, index: usize, doc: Value) -> Result<(), TraceError> {
        match doc {
            Value::Null => Ok(()), // an empty document (`---` at the end)
            Value::Array(items) => items
                .into_iter()
                .try_for_each(|v| self.add_object(path, index, v)),
            v => self.add_object(path, index, v),
        }
    }

    fn add_object(&mut self, path: &Path, index: usize, v: Value) -> Result<(), TraceError> {
        let document = index + 1;
        let Value::Object(map) = &v else {
            return Err(TraceError::NotAnObject {
                path: path.to_path_buf(),
                document,
            });
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let meta = map.get("metadata");
        let field = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let object = match (field("namespace"), field("name")) {
            (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
            (None, Some(n)) => format!("{kind} {n}"),
            _ => format!("{kind} (document {document})"),
        };
        let malformed = |source| TraceError::Malformed {
            path: path.to_path_buf(),
            object: object.clone(),
            source,
        };
        match kind.as_str() {
            "" => Err(TraceError::MissingKind {
                path: path.to_path_buf(),
                document,
            }),
            k if k.ends_with("List") && map.get("items").is_some_and(Value::is_array) => {
                let items = map
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                items
                    .into_iter()
                    .try_for_each(|item| self.add_object(path, index, item))
            }
            "Namespace" => {
                let ns: corev1::Namespace = serde_json::from_value(v).map_err(malformed)?;
                let ns = Namespace::from_k8s(&ns).map_err(|source| TraceError::Object {
                    path: path.to_path_buf(),
                    source,
                })?;
                self.claim(path, "Namespace", ns.name.clone())?;
                self.namespaces.push(ns);
                Ok(())
            }
            "Pod" => {
                let pod: corev1::Pod = serde_json::from_value(v).map_err(malformed)?;
                let pod = Pod::from_k8s(&pod).map_err(|source| TraceError::Object {
                    path: path.to_path_buf(),
                    source,
                })?;
                self.claim(path, "Pod", pod.object_ref().to_string())?;
                self.pods.push(pod);
                Ok(())
            }
            "NetworkPolicy" => {
                let np: netv1::NetworkPolicy = serde_json::from_value(v).map_err(malformed)?;
                let policy = Policy::from_k8s(&np).map_err(|source| TraceError::Policy {
                    path: path.to_path_buf(),
                    source,
                })?;
                self.claim(path, "NetworkPolicy", policy.object_ref().to_string())?;
                self.policies.push(policy);
                Ok(())
            }
            _ => {
                self.ignored += 1;
                Ok(())
            }
        }
    }

    fn claim(&mut self, path: &Path, kind: &'static str, name: String) -> Result<(), TraceError> {
        if let Some(first) = self.origin.get(&(kind, name.clone())) {
            return Err(TraceError::Duplicate {
                kind,
                object: name,
                path: path.to_path_buf(),
                first: first.clone(),
            });
        }
        self.origin.insert((kind, name), path.to_path_buf());
        Ok(())
    }
}

/// Parses `--port`: `80`, `80/TCP`, `53/udp`.
pub fn parse_port(value: &str) -> Result<(u16, Protocol), TraceError> {
    let bad = || TraceError::BadPort {
        value: value.to_string(),
    };
    let (port, proto) = match value.split_once('/') {
        Some((p, proto)) => (
            p,
            Protocol::from_k8s(&proto.to_ascii_uppercase()).ok_or_else(bad)?,
        ),
        None => (value, Protocol::Tcp),
    };
    let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(bad)?;
    Ok((port, proto))
}

enum EndpointArg {
    Ip(IpAddr),
    Pod { namespace: String, name: String },
}

fn parse_endpoint(flag: &'static str, value: &str) -> Result<EndpointArg, TraceError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(EndpointArg::Ip(ip));
    }
    let (namespace, name) = value.split_once('/').unwrap_or(("default", value));
    let ok = |s: &str| !s.is_empty() && !s.contains('/');
    if !ok(namespace) || !ok(name) {
        return Err(TraceError::BadEndpoint {
            flag,
            value: value.to_string(),
        });
    }
    Ok(EndpointArg::Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Resolves one end to an address; `family` prefers addresses of the other end's family.
fn resolve(
    set: &PolicySet,
    manifests: &Manifests,
    flag: &'static str,
    arg: &EndpointArg,
    family: Option<bool>,
) -> Result<Endpoint, TraceError> {
    match arg {
        EndpointArg::Ip(ip) => Ok(Endpoint {
            pod: set.pod_at(*ip),
            ip: *ip,
        }),
        EndpointArg::Pod { namespace, name } => {
            let pod =
                manifests
                    .find_pod(namespace, name)
                    .ok_or_else(|| TraceError::UnknownPod {
                        flag,
                        pod: format!("{namespace}/{name}"),
                    })?;
            let ip = match family {
                Some(v4) => pod.ips.iter().find(|ip| ip.is_ipv4() == v4),
                None => pod.ips.first(),
            }
            .copied()
            .ok_or_else(|| TraceError::PodWithoutIp {
                pod: pod.object_ref().to_string(),
                family,
            })?;
            Ok(Endpoint {
                pod: Some(pod.object_ref()),
                ip,
            })
        }
    }
}

/// Runs a trace: reads the manifests, compiles them with the packet loop's engine, asks both
/// directions, and writes the result to `out` in the chosen format.
pub fn run(args: &TraceArgs, out: &mut dyn Write) -> Result<TraceOutcome, TraceError> {
    let (port, protocol) = parse_port(&args.port)?;
    let from_arg = parse_endpoint("--from", &args.from)?;
    let to_arg = parse_endpoint("--to", &args.to)?;
    let manifests = Manifests::load(&args.filename)?;
    let set = manifests.clone().compile();

    // An IP fixes the family; otherwise the source's first address does.
    let (from, to) = match (&from_arg, &to_arg) {
        (_, EndpointArg::Ip(ip)) => {
            let from = resolve(&set, &manifests, "--from", &from_arg, Some(ip.is_ipv4()))?;
            (from, resolve(&set, &manifests, "--to", &to_arg, None)?)
        }
        _ => {
            let from = resolve(&set, &manifests, "--from", &from_arg, None)?;
            let to = resolve(&set, &manifests, "--to", &to_arg, Some(from.ip.is_ipv4()))?;
            (from, to)
        }
    };
    if from.ip.is_ipv4() != to.ip.is_ipv4() {
        return Err(TraceError::FamilyMismatch {
            from: from.ip,
            to: to.ip,
        });
    }

    let explanation = set.explain(from.ip, to.ip, protocol, port);
    let outcome = TraceOutcome {
        from,
        to,
        protocol,
        port,
        explanation,
    };
    let written = match args.output {
        OutputFormat::Json => {
            let text = serde_json::to_string_pretty(&to_json(&outcome)).unwrap_or_default();
            writeln!(out, "{text}")
        }
        OutputFormat::Text => write_text(&outcome, out),
    };
    written.map_err(TraceError::Write)?;
    Ok(outcome)
}

/// The process exit code for a trace result: 0 allowed, 1 denied, 2 error.
pub fn exit_code(result: &Result<TraceOutcome, TraceError>) -> u8 {
    match result {
        Ok(o) if o.allowed() => EXIT_ALLOW,
        Ok(_) => EXIT_DENY,
        Err(_) => EXIT_ERROR,
    }
}

fn endpoint_text(e: &Endpoint) -> String {
    match &e.pod {
        Some(p) => format!("{p} ({})", e.ip),
        None => e.ip.to_string(),
    }
}

fn write_text(o: &TraceOutcome, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{}: {} -> {} on {}/{}",
        if o.allowed() { "ALLOWED" } else { "DENIED" },
        endpoint_text(&o.from),
        endpoint_text(&o.to),
        o.port,
        o.protocol
    )?;
    for d in [&o.explanation.egress, &o.explanation.ingress] {
        let dir = d.direction.name().to_ascii_lowercase();
        let verdict = d.verdict.metric_label();
        let line =
            match (&d.pod, d.verdict) {
                (None, _) => {
                    let ip = if d.direction == Direction::Egress {
                        o.from.ip
                    } else {
                        o.to.ip
                    };
                    format!("{ip} is not a pod (or uses hostNetwork): no {dir} policy applies")
                }
                (Some(p), Verdict::Allow(AllowReason::NotSelected | AllowReason::NoPod)) => {
                    format!(
                        "{p}: no NetworkPolicy with policyTypes {} selects this pod",
                        d.direction.name()
                    )
                }
                (Some(p), Verdict::Allow(AllowReason::Rule(_))) => {
                    match &d.decided_by {
                        Some(m) => format!(
                    "{p}: allowed by NetworkPolicy {} {dir} rule {} ({}[{}]: {}; ports: {})",
                    m.policy,
                    m.rule,
                    if d.direction == Direction::Ingress { "from" } else { "to" },
                    m.peer.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    m.peer_text,
                    match m.port {
                        Some(i) => format!("[{i}] {}", m.port_text),
                        None => m.port_text.clone(),
                    },
                ),
                        None => format!("{p}: allowed"),
                    }
                }
                (Some(p), Verdict::Deny(_)) => format!(
                    "{p}: selected by {}; no {dir} rule of these allows the connection",
                    names(&d.selected_by)
                ),
            };
        writeln!(out, "  {dir:<7} {verdict:<5}  {line}")?;
        if matches!(d.verdict, Verdict::Allow(AllowReason::Rule(_))) && d.selected_by.len() > 1 {
            writeln!(
                out,
                "                 (selected by {})",
                names(&d.selected_by)
            )?;
        }
    }
    Ok(())
}

fn names(refs: &[ObjectRef]) -> String {
    refs.iter()
        .map(ObjectRef::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `--output json` document.
pub fn to_json(o: &TraceOutcome) -> Value {
    let endpoint = |e: &Endpoint| json!({"pod": e.pod.as_ref().map(ObjectRef::to_string), "ip": e.ip.to_string()});
    json!({
        "verdict": if o.allowed() { "allow" } else { "deny" },
        "from": endpoint(&o.from),
        "to": endpoint(&o.to),
        "port": o.port,
        "protocol": o.protocol.to_string(),
        "egress": direction_json(&o.explanation.egress),
        "ingress": direction_json(&o.explanation.ingress),
    })
}

fn direction_json(d: &DirectionExplanation) -> Value {
    let reason = match d.verdict {
        Verdict::Allow(AllowReason::NoPod) => "not-a-pod",
        Verdict::Allow(AllowReason::NotSelected) => "not-selected",
        Verdict::Allow(AllowReason::Rule(_)) => "rule",
        Verdict::Deny(_) => "no-rule-matched",
    };
    json!({
        "verdict": d.verdict.metric_label(),
        "reason": reason,
        "pod": d.pod.as_ref().map(ObjectRef::to_string),
        "selected_by": d.selected_by.iter().map(ObjectRef::to_string).collect::<Vec<_>>(),
        "decided_by": d.decided_by.as_ref().map(|m| json!({
            "policy": m.policy.to_string(),
            "rule": m.rule,
            "peer": m.peer,
            "peer_text": m.peer_text,
            "port": m.port,
            "port_text": m.port_text,
        })),
    })
}

/// Why a trace could not answer. Every variant names the file, object or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: YAML document {document} is not valid: {source}")]
    Yaml {
        path: PathBuf,
        document: usize,
        #[source]
        source: serde_norway::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: document {document} is not a Kubernetes object (a mapping with kind, metadata)"
    )]
    NotAnObject { path: PathBuf, document: usize },
    #[error("{path}: document {document} has no kind")]
    MissingKind { path: PathBuf, document: usize },
    #[error("{path}: {object} does not match the Kubernetes schema: {source}")]
    Malformed {
        path: PathBuf,
        object: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {source}")]
    Object {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("{path}: {source}")]
    Policy {
        path: PathBuf,
        #[source]
        source: PolicyError,
    },
    #[error("{path}: {kind} {object} is defined twice (first in {first}); give each object once")]
    Duplicate {
        kind: &'static str,
        object: String,
        path: PathBuf,
        first: PathBuf,
    },
    #[error("{flag} {value:?}: expected NAMESPACE/POD or an IP address")]
    BadEndpoint { flag: &'static str, value: String },
    #[error(
        "--port {value:?}: expected PORT or PORT/PROTOCOL, port 1-65535, protocol TCP, UDP or SCTP"
    )]
    BadPort { value: String },
    #[error("{flag}: Pod {pod} is not in the manifests given with -f")]
    UnknownPod { flag: &'static str, pod: String },
    #[error("Pod {pod} has no {} address in status.podIP/podIPs; add it to the manifest", match family { Some(true) => "IPv4", Some(false) => "IPv6", None => "IP" })]
    PodWithoutIp { pod: String, family: Option<bool> },
    #[error("--from {from} and --to {to} are of different IP families")]
    FamilyMismatch { from: IpAddr, to: IpAddr },
    #[error("cannot write the result: {0}")]
    Write(#[source] io::Error),
}

impl TraceError {
    /// A bounded label for the kind of failure.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TraceError::Read { .. } => "read",
            TraceError::Yaml { .. } | TraceError::Json { .. } => "parse",
            TraceError::NotAnObject { .. }
            | TraceError::MissingKind { .. }
            | TraceError::Malformed { .. } => "malformed",
            TraceError::Object { .. } | TraceError::Policy { .. } => "invalid_object",
            TraceError::Duplicate { .. } => "duplicate",
            TraceError::BadEndpoint { .. } | TraceError::BadPort { .. } => "bad_argument",
            TraceError::UnknownPod { .. }
            | TraceError::PodWithoutIp { .. }
            | TraceError::FamilyMismatch { .. } => "endpoint",
            TraceError::Write(_) => "write",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  spec:
    containers:
    - name: c
      ports: [{name: serve-80-tcp, containerPort: 80}]
  status: {podIP: 10.0.1.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: b, namespace: y, labels: {pod: b}}
  status: {podIPs: [{ip: 10.0.2.2}, {ip: "fd00::2"}]}
- apiVersion: v1
  kind: Service
  metadata: {name: s, namespace: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]
    ports: [{port: serve-80-tcp}]
---
"#;

    fn write_fixture(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kwire-trace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn args(
        files: Vec<PathBuf>,
        from: &str,
        to: &str,
        port: &str,
        output: OutputFormat,
    ) -> TraceArgs {
        TraceArgs {
            filename: files,
            from: from.into(),
            to: to.into(),
            port: port.into(),
            output,
        }
    }

    #[test]
    fn loads_lists_and_documents() {
        let mut m = Manifests::default();
        m.add_text(Path::new("c.yaml"), CLUSTER).unwrap();
        assert_eq!(
            (
                m.namespaces.len(),
                m.pods.len(),
                m.policies.len(),
                m.ignored
            ),
            (1, 2, 1, 1)
        );
    }

    #[test]
    fn trace_allow_and_deny() {
        let f = write_fixture("cluster.yaml", CLUSTER);
        let mut out = Vec::new();
        let r = run(
            &args(vec![f.clone()], "y/b", "x/a", "80", OutputFormat::Json),
            &mut out,
        );
        assert_eq!(exit_code(&r), EXIT_ALLOW);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["verdict"], "allow");
        assert_eq!(v["ingress"]["decided_by"]["policy"], "x/allow-y");
        assert_eq!(v["ingress"]["decided_by"]["peer"], 0);
        assert_eq!(v["egress"]["reason"], "not-selected");

        let mut out = Vec::new();
        let r = run(
            &args(vec![f.clone()], "y/b", "x/a", "81/tcp", OutputFormat::Text),
            &mut out,
        );
        assert_eq!(exit_code(&r), EXIT_DENY);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("DENIED: y/b (10.0.2.2) -> x/a (10.0.1.1) on 81/TCP"),
            "{text}"
        );
        assert!(text.contains("selected by x/allow-y"), "{text}");

        let mut out = Vec::new();
        let r = run(
            &args(vec![f], "192.0.2.1", "x/a", "80", OutputFormat::Json),
            &mut out,
        );
        assert_eq!(exit_code(&r), EXIT_DENY);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["egress"]["reason"], "not-a-pod");
    }

    #[test]
    fn errors_name_what_failed() {
        let f = write_fixture("cluster2.yaml", CLUSTER);
        let e = |a: TraceArgs| run(&a, &mut Vec::new()).unwrap_err().to_string();
        assert!(e(args(
            vec![f.clone()],
            "x/zz",
            "x/a",
            "80",
            OutputFormat::Text
        ))
        .contains("x/zz"));
        assert!(e(args(
            vec![f.clone()],
            "x/a",
            "x/a",
            "80/ICMP",
            OutputFormat::Text
        ))
        .contains("--port"));
        assert!(e(args(
            vec![f.clone()],
            "a/b/c",
            "x/a",
            "80",
            OutputFormat::Text
        ))
        .contains("--from"));
        assert!(e(args(
            vec![f.clone(), f.clone()],
            "x/a",
            "x/a",
            "80",
            OutputFormat::Text
        ))
        .contains("defined twice"));
        assert!(e(args(
            vec![f.clone()],
            "x/a",
            "fd00::9",
            "80",
            OutputFormat::Text
        ))
        .contains("IPv6"));
        let missing = PathBuf::from("/nonexistent/kwire.yaml");
        assert!(
            e(args(vec![missing], "x/a", "x/a", "80", OutputFormat::Text))
                .contains("/nonexistent/kwire.yaml")
        );
        let bad = write_fixture("bad.yaml", "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 80, endPort: 10}]}]}\n");
        let msg = e(args(
            vec![bad.clone()],
            "x/a",
            "x/a",
            "80",
            OutputFormat::Text,
        ));
        assert!(
            msg.contains("bad.yaml") && msg.contains("x/p") && msg.contains("endPort"),
            "{msg}"
        );
        let bad = write_fixture(
            "bad2.yaml",
            "kind: Pod\nmetadata: {name: p, namespace: x}\nspec: {containers: 3}\n",
        );
        let msg = e(args(vec![bad], "x/a", "x/a", "80", OutputFormat::Text));
        assert!(
            msg.contains("bad2.yaml") && msg.contains("Pod x/p"),
            "{msg}"
        );
        let bad = write_fixture("bad3.yaml", "kind: [\n");
        assert!(e(args(vec![bad], "x/a", "x/a", "80", OutputFormat::Text)).contains("bad3.yaml"));
        let bad = write_fixture("bad4.json", "{\"metadata\": {}}");
        assert!(e(args(vec![bad], "x/a", "x/a", "80", OutputFormat::Text)).contains("no kind"));
    }

    #[test]
    fn json_input_and_ports() {
        let f = write_fixture(
            "c.json",
            r#"{"apiVersion":"v1","kind":"PodList","items":[{"kind":"Pod","metadata":{"name":"a","namespace":"x"},"status":{"podIP":"10.0.0.1"}}]}"#,
        );
        let mut out = Vec::new();
        assert_eq!(
            exit_code(&run(
                &args(vec![f], "x/a", "10.0.0.9", "53/UDP", OutputFormat::Text),
                &mut out
            )),
            EXIT_ALLOW
        );
        assert_eq!(parse_port("53/udp").unwrap(), (53, Protocol::Udp));
        assert!(
            parse_port("0").is_err() && parse_port("70000").is_err() && parse_port("80/").is_err()
        );
    }
}
