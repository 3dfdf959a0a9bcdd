//! `kwire policy trace`: offline verdict for one connection under a set of manifests, with the policy and rule that decided it.
//!
//! Manifests are YAML (multi-document) or JSON files holding Namespaces, Pods,
//! NetworkPolicies, Services and EndpointSlices, directly or inside `kind: List` (or `PodList`,
//! ...) objects; other kinds are ignored. When `--to` is a Service (a ClusterIP or
//! `svc/NAMESPACE/NAME[:PORT]`), the trace first takes the data path's translation (see
//! [`super::service_trace`]) and then asks policy about the chosen backend. YAML is read with `serde_norway`, the maintained fork of the archived `serde_yaml`.
//! Exit codes (see [`exit_code`]): 0 allowed, 1 denied, 2 error.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1 as netv1;
use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{DirectionExplanation, Explanation, PolicySet};
use super::model::{ModelError, Namespace, ObjectRef, Pod};
pub use super::service_trace::DEFAULT_SOURCE_PORT;
use super::service_trace::{self, ServiceArg, ServiceHop, ServiceObjects, ServiceTraceError};
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
    /// Destination: NAMESPACE/POD (a Pod from the manifests), an IP address, or a Service:
    /// its ClusterIP or svc/NAMESPACE/NAME[:PORT] (PORT: the Service port's number or name).
    /// A Service is traced as the data path translates it: the backend it picks for this flow,
    /// then the policy verdict against that backend.
    #[arg(long, value_name = "NS/POD|IP|svc/NS/NAME[:PORT]")]
    pub to: String,
    /// Destination port and protocol: 80, 80/TCP, 53/UDP, 9000/SCTP (protocol defaults to TCP).
    /// For a Service, its port (not the backend's); not needed with svc/NS/NAME:PORT.
    #[arg(long, value_name = "PORT[/PROTOCOL]")]
    pub port: Option<String>,
    /// The client's source port: with the addresses it decides which backend of a Service the
    /// flow goes to (the data path hashes the whole flow).
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_SOURCE_PORT)]
    pub source_port: u16,
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
    /// The destination policy judges: for a Service, the chosen backend (or the ClusterIP
    /// when there is none).
    pub to: Endpoint,
    pub protocol: Protocol,
    pub port: u16,
    /// When `--to` was a Service: the translation.
    pub service: Option<ServiceHop>,
    /// `None` only when a Service has no usable endpoint for the client (the data path
    /// refuses or drops the connection before policy).
    pub explanation: Option<Explanation>,
}

impl TraceOutcome {
    pub fn allowed(&self) -> bool {
        self.explanation.as_ref().is_some_and(|e| e.allowed)
    }
}

/// The objects read from manifests, not yet compiled.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<Policy>,
    /// Services and EndpointSlices, for `--to` a Service.
    pub services: ServiceObjects,
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
                let raw = v.clone();
                let pod: corev1::Pod = serde_json::from_value(v).map_err(malformed)?;
                let pod = Pod::from_k8s(&pod).map_err(|source| TraceError::Object {
                    path: path.to_path_buf(),
                    source,
                })?;
                self.claim(path, "Pod", pod.object_ref().to_string())?;
                self.pods.push(pod);
                self.services.add_pod(raw);
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
            "Service" => {
                let raw = with_namespace(v);
                let svc: corev1::Service =
                    serde_json::from_value(raw.clone()).map_err(malformed)?;
                let name = format!(
                    "{}/{}",
                    svc.metadata.namespace.as_deref().unwrap_or_default(),
                    svc.metadata.name.as_deref().unwrap_or_default()
                );
                self.claim(path, "Service", name)?;
                self.services.add_service(raw, &svc);
                Ok(())
            }
            "EndpointSlice" => {
                let slice: EndpointSlice =
                    serde_json::from_value(with_namespace(v)).map_err(malformed)?;
                self.services.add_slice(&slice);
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

/// An object's `metadata.namespace`, `default` when absent (as kubectl applies it).
fn with_namespace(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.entry("namespace")
            .or_insert_with(|| Value::String("default".into()));
    }
    v
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
    let from_arg = parse_endpoint("--from", &args.from)?;
    let to_service = match ServiceArg::parse(&args.to) {
        Some(Ok(s)) => Some(s),
        Some(Err(())) => {
            return Err(TraceError::BadEndpoint {
                flag: "--to",
                value: args.to.clone(),
            })
        }
        None => None,
    };
    let to_arg = match &to_service {
        Some(_) => None,
        None => Some(parse_endpoint("--to", &args.to)?),
    };
    let port_arg = args.port.as_deref().map(parse_port).transpose()?;
    let manifests = Manifests::load(&args.filename)?;
    let set = manifests.clone().compile();

    let service = match (&to_service, &to_arg) {
        (Some(a), _) => Some(manifests.services.find(a)?),
        (None, Some(EndpointArg::Ip(ip))) => manifests.services.by_cluster_ip(*ip),
        _ => None,
    };
    if let Some(svc) = service {
        let family = match &to_arg {
            Some(EndpointArg::Ip(ip)) => Some(ip.is_ipv4()),
            _ => None,
        };
        let from = resolve(&set, &manifests, "--from", &from_arg, family)?;
        let named = to_service.as_ref().and_then(|a| a.port.as_deref());
        let (port, protocol) = match (named, &args.port, port_arg) {
            (Some(_), Some(_), _) => return Err(TraceError::PortTwice),
            (Some(n), None, _) if n.parse::<u16>().is_err() => {
                service_trace::service_port(svc, n, None)?
            }
            (Some(n), None, _) => service_trace::service_port(svc, n, Some(Protocol::Tcp))?,
            (None, Some(text), Some((p, proto))) => {
                let explicit = text.contains('/');
                service_trace::service_port(svc, &p.to_string(), explicit.then_some(proto))?
            }
            (None, _, _) => return Err(TraceError::MissingPort),
        };
        // The client's node decides `internalTrafficPolicy: Local`.
        let node = from
            .pod
            .as_ref()
            .and_then(|p| manifests.find_pod(&p.namespace, &p.name))
            .map(|p| p.node_name.as_str())
            .filter(|n| !n.is_empty());
        let hop = service_trace::choose(
            &manifests.services,
            svc,
            (from.ip, node),
            args.source_port,
            port,
            protocol,
        )?;
        let (to, port, explanation) = match hop.backend {
            Some(b) => (
                Endpoint {
                    pod: set.pod_at(b.ip()),
                    ip: b.ip(),
                },
                b.port(),
                Some(set.explain(from.ip, b.ip(), protocol, b.port())),
            ),
            None => (
                Endpoint {
                    pod: None,
                    ip: hop.cluster_ip,
                },
                port,
                None,
            ),
        };
        let outcome = TraceOutcome {
            from,
            to,
            protocol,
            port,
            service: Some(hop),
            explanation,
        };
        return write_outcome(args, outcome, out);
    }
    // A `svc/...` destination returned above (or failed to resolve).
    let Some(to_arg) = to_arg else {
        return Err(TraceError::BadEndpoint {
            flag: "--to",
            value: args.to.clone(),
        });
    };
    let (port, protocol) = port_arg.ok_or(TraceError::MissingPort)?;

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
        service: None,
        explanation: Some(explanation),
    };
    write_outcome(args, outcome, out)
}

fn write_outcome(
    args: &TraceArgs,
    outcome: TraceOutcome,
    out: &mut dyn Write,
) -> Result<TraceOutcome, TraceError> {
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

fn write_service(o: &TraceOutcome, h: &ServiceHop, out: &mut dyn Write) -> io::Result<()> {
    let front = std::net::SocketAddr::new(h.cluster_ip, h.port);
    let client = std::net::SocketAddr::new(o.from.ip, h.source_port);
    let node = h.node.as_deref().unwrap_or("?");
    let Some(b) = h.backend else {
        if h.dropped {
            writeln!(
                out,
                "SERVICE {} {front}/{}: internalTrafficPolicy Local and no usable endpoint on node {node}",
                h.service, h.protocol
            )?;
            return writeln!(
                out,
                "DROPPED: {} -> {} {front}/{}: the data path drops it without an answer (as kube-proxy does); no policy is asked",
                endpoint_text(&o.from),
                h.service,
                h.protocol
            );
        }
        writeln!(
            out,
            "SERVICE {} {front}/{}: no usable endpoint",
            h.service, h.protocol
        )?;
        let answer = match h.protocol {
            Protocol::Udp => "an ICMP port unreachable",
            _ => "a TCP reset",
        };
        return writeln!(
            out,
            "REFUSED: {} -> {} {front}/{}: the data path answers with {answer}; no policy is asked",
            endpoint_text(&o.from),
            h.service,
            h.protocol
        );
    };
    let pod =
        o.to.pod
            .as_ref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
    let n = h.backends.len();
    let among = match h.local {
        true => format!(
            "{n} usable endpoint{} on node {node} (internalTrafficPolicy Local)",
            if n == 1 { "" } else { "s" }
        ),
        false => format!("{n} usable endpoint{}", if n == 1 { "" } else { "s" }),
    };
    let by = match h.affinity_secs {
        0 => format!("for source port {}", h.source_port),
        secs => format!(
            "for client {} (sessionAffinity ClientIP: all its flows, until {secs} s after its last)",
            o.from.ip
        ),
    };
    writeln!(
        out,
        "SERVICE {} {front}/{}: backend {b}{pod}, by Maglev over {among} {by}",
        h.service, h.protocol,
    )?;
    writeln!(
        out,
        "  translated: {client} -> {front} becomes {client} -> {b}; replies from {b} leave as {front}"
    )
}

fn write_text(o: &TraceOutcome, out: &mut dyn Write) -> io::Result<()> {
    if let Some(h) = &o.service {
        write_service(o, h, out)?;
    }
    let Some(explanation) = &o.explanation else {
        return Ok(());
    };
    writeln!(
        out,
        "{}: {} -> {} on {}/{}",
        if o.allowed() { "ALLOWED" } else { "DENIED" },
        endpoint_text(&o.from),
        endpoint_text(&o.to),
        o.port,
        o.protocol
    )?;
    for d in [&explanation.egress, &explanation.ingress] {
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
    let verdict = match &o.explanation {
        None if o.service.as_ref().is_some_and(|h| h.dropped) => "dropped",
        None => "refused",
        Some(e) if e.allowed => "allow",
        Some(_) => "deny",
    };
    let mut v = json!({
        "verdict": verdict,
        "from": endpoint(&o.from),
        "to": endpoint(&o.to),
        "port": o.port,
        "protocol": o.protocol.to_string(),
        "egress": o.explanation.as_ref().map(|e| direction_json(&e.egress)),
        "ingress": o.explanation.as_ref().map(|e| direction_json(&e.ingress)),
    });
    if let Some(h) = &o.service {
        v["service"] = json!({
            "name": h.service,
            "cluster_ip": h.cluster_ip.to_string(),
            "port": h.port,
            "protocol": h.protocol.to_string(),
            "source_port": h.source_port,
            "node": h.node,
            "internal_traffic_policy": if h.local { "Local" } else { "Cluster" },
            "affinity_timeout_seconds": h.affinity_secs,
            "backends": h.backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "backend": h.backend.map(|b| b.to_string()),
        });
    }
    v
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
    #[error("{flag} {value:?}: expected NAMESPACE/POD, an IP address{}", if *flag == "--to" { " or svc/NAMESPACE/NAME[:PORT]" } else { "" })]
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
    #[error("{0}")]
    Service(#[from] ServiceTraceError),
    #[error("--port is required (for a Service, --port or svc/NAMESPACE/NAME:PORT)")]
    MissingPort,
    #[error("the Service port is given twice: use svc/NAMESPACE/NAME:PORT or --port, not both")]
    PortTwice,
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
            TraceError::BadEndpoint { .. }
            | TraceError::BadPort { .. }
            | TraceError::MissingPort
            | TraceError::PortTwice => "bad_argument",
            TraceError::Service(_) => "service",
            TraceError::UnknownPod { .. }
            | TraceError::PodWithoutIp { .. }
            | TraceError::FamilyMismatch { .. } => "endpoint",
            TraceError::Write(_) => "write",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
            port: Some(port.into()),
            source_port: DEFAULT_SOURCE_PORT,
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
            (1, 2, 1, 0)
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

    pub(crate) const SERVICES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {pod: client}}
spec: {nodeName: n1}
status: {podIPs: [{ip: 10.0.1.1}, {ip: "fd00::1:1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: x, labels: {pod: far}}
spec: {nodeName: n3}
status: {podIP: 10.0.3.1}
---
apiVersion: v1
kind: List
items:
- kind: Pod
  metadata: {name: web-1, namespace: shop, labels: {app: web, open: "yes"}}
  spec:
    nodeName: n1
    containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
  status: {podIPs: [{ip: 10.0.2.1}, {ip: "fd00::2:1"}]}
- kind: Pod
  metadata: {name: web-2, namespace: shop, labels: {app: web}}
  spec:
    nodeName: n2
    containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
  status: {podIPs: [{ip: 10.0.2.2}, {ip: "fd00::2:2"}]}
- kind: Pod
  metadata: {name: web-3, namespace: shop, labels: {app: web}}
  spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
  status:
    podIPs: [{ip: 10.0.2.3}]
    conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: v1
kind: Service
metadata: {name: kubernetes}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443, targetPort: 6443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kubernetes, labels: {kubernetes.io/service-name: kubernetes}}
addressType: IPv4
ports: [{name: https, port: 6443}]
endpoints: [{addresses: [192.0.2.10]}]
---
apiVersion: v1
kind: Service
metadata: {name: near, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.12
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: http}]
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sticky", "namespace": "shop"},
 "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.13", "sessionAffinity": "ClientIP",
          "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  selector: {app: nothing}
  clusterIP: 10.96.0.11
  ports: [{port: 80}, {port: 53, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-web-1, namespace: shop}
spec:
  podSelector: {matchLabels: {open: "yes"}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-2-closed, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
"#;

    fn svc_args(to: &str, port: Option<&str>, sport: u16, output: OutputFormat) -> TraceArgs {
        TraceArgs {
            // One file per test thread: tests run in parallel and rewrite their fixture.
            filename: vec![write_fixture(
                &format!("services-{:?}.yaml", std::thread::current().id()),
                SERVICES,
            )],
            from: "x/client".into(),
            to: to.into(),
            port: port.map(Into::into),
            source_port: sport,
            output,
        }
    }

    pub(crate) fn svc_json(to: &str, port: Option<&str>, sport: u16) -> (u8, Value) {
        let mut out = Vec::new();
        let r = run(&svc_args(to, port, sport, OutputFormat::Json), &mut out);
        let code = exit_code(&r);
        assert_ne!(code, EXIT_ERROR, "{:?}", r.err());
        (code, serde_json::from_slice(&out).unwrap())
    }

    #[test]
    fn a_service_is_traced_to_the_backend_the_data_path_picks() {
        use crate::services::{flow_hash, ServiceTable};
        let mut m = Manifests::default();
        m.add_text(Path::new("s.yaml"), SERVICES).unwrap();
        // The data path's own table: the ready pods only (web-3 is not ready).
        let table: ServiceTable = m.services.table(None);
        let fe = table.lookup(6, "10.96.0.10".parse().unwrap(), 80).unwrap();
        assert_eq!(
            fe.backends(),
            &[
                "10.0.2.1:8080".parse().unwrap(),
                "10.0.2.2:8080".parse().unwrap()
            ]
        );
        let mut seen = std::collections::BTreeSet::new();
        for sport in 40000..40040 {
            let want = fe
                .pick(flow_hash(
                    6,
                    "10.0.1.1".parse().unwrap(),
                    sport,
                    "10.96.0.10".parse().unwrap(),
                    80,
                ))
                .unwrap();
            for (to, port) in [
                ("svc/shop/web:http", None),
                ("svc/shop/web:80", None),
                ("svc/shop/web", Some("80")),
                ("10.96.0.10", Some("80/TCP")),
            ] {
                let (code, v) = svc_json(to, port, sport);
                assert_eq!(v["service"]["backend"], want.to_string(), "{to} {sport}");
                assert_eq!(v["service"]["name"], "shop/web");
                assert_eq!(v["to"]["ip"], want.ip().to_string());
                assert_eq!(v["port"], 8080, "policy sees the backend's port");
                // web-1 is open on 8080, web-2 is closed by a policy of its own.
                let (verdict, pod) = if want.ip().to_string() == "10.0.2.1" {
                    (EXIT_ALLOW, "shop/web-1")
                } else {
                    (EXIT_DENY, "shop/web-2")
                };
                assert_eq!((code, v["to"]["pod"].as_str()), (verdict, Some(pod)));
            }
            seen.insert(want);
        }
        assert_eq!(seen.len(), 2, "both ready backends serve some flows");

        // IPv6 from the same client: the Service's IPv6 ClusterIP, an IPv6 backend.
        let (_, v) = svc_json("fd00:96::10", Some("80"), 40000);
        assert!(v["service"]["backend"]
            .as_str()
            .unwrap()
            .starts_with("[fd00::2:"));
        assert_eq!(v["from"]["ip"], "fd00::1:1");
    }

    /// What the trace says of `internalTrafficPolicy: Local` and `sessionAffinity: ClientIP`
    /// Services (that it names the backend the loop picks is shown in
    /// `datapath::service::tests::trace_names_the_backend_the_loop_picks_for_local_and_affinity`).
    #[test]
    fn traffic_policy_local_and_affinity_are_traced() {
        let (_, v) = svc_json("svc/shop/near:http", None, 1);
        assert_eq!(v["service"]["backends"], json!(["10.0.2.1:8080"]));
        assert_eq!(v["service"]["internal_traffic_policy"], "Local");
        assert_eq!(v["service"]["node"], "n1");
        let (_, v) = svc_json("svc/shop/sticky:http", None, 1);
        assert_eq!(v["service"]["affinity_timeout_seconds"], 10800);

        // A client on n3, which has no endpoint of `near`: the trace drops the flow, as the
        // loop does.
        let mut args = svc_args("svc/shop/near:http", None, 40000, OutputFormat::Json);
        args.from = "x/far".into();
        let mut out = Vec::new();
        let r = run(&args, &mut out);
        assert_eq!(exit_code(&r), EXIT_DENY);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["verdict"].as_str(), &v["service"]["backend"]),
            (Some("dropped"), &Value::Null)
        );
        args.output = OutputFormat::Text;
        let mut out = Vec::new();
        run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("no usable endpoint on node n3") && text.contains("DROPPED"),
            "{text}"
        );
        // A client that is no scheduled pod: the node is unknown, and the trace says so.
        args.from = "10.0.9.9".into();
        let e = run(&args, &mut Vec::new()).unwrap_err().to_string();
        assert!(
            e.contains("internalTrafficPolicy: Local") && e.contains("NAMESPACE/POD"),
            "{e}"
        );
    }

    #[test]
    fn service_text_shows_the_translation_then_both_directions() {
        let mut out = Vec::new();
        run(
            &svc_args("svc/shop/web:http", None, 40001, OutputFormat::Text),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("SERVICE shop/web 10.96.0.10:80/TCP: backend 10.0.2.")
                && lines[0].contains("by Maglev over 2 usable endpoints for source port 40001"),
            "{text}"
        );
        assert!(
            lines[1].contains("10.0.1.1:40001 -> 10.96.0.10:80 becomes 10.0.1.1:40001 -> 10.0.2."),
            "{text}"
        );
        assert!(lines[2].contains("-> shop/web-"), "{text}");
        assert!(lines[3].trim_start().starts_with("egress"), "{text}");
        assert!(lines[4].trim_start().starts_with("ingress"), "{text}");
    }

    #[test]
    fn endpoints_outside_the_pod_network_and_services_without_endpoints() {
        // default/kubernetes: its own slice, an address that is no pod.
        let (code, v) = svc_json("svc/default/kubernetes:https", None, 40000);
        assert_eq!(code, EXIT_ALLOW);
        assert_eq!(v["service"]["backend"], "192.0.2.10:6443");
        assert_eq!(v["to"]["pod"], Value::Null);
        assert_eq!(v["ingress"]["reason"], "not-a-pod");

        for (port, answer) in [
            ("80", "a TCP reset"),
            ("53/UDP", "an ICMP port unreachable"),
        ] {
            let (code, v) = svc_json("svc/shop/empty", Some(port), 40000);
            assert_eq!(code, EXIT_DENY);
            assert_eq!(v["verdict"], "refused");
            assert_eq!(v["service"]["backend"], Value::Null);
            assert_eq!(v["ingress"], Value::Null);
            let mut out = Vec::new();
            run(
                &svc_args("10.96.0.11", Some(port), 40000, OutputFormat::Text),
                &mut out,
            )
            .unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("no usable endpoint") && text.contains(answer),
                "{text}"
            );
        }
    }

    #[test]
    fn service_errors_say_what_to_give() {
        let e = |to: &str, port: Option<&str>| {
            run(&svc_args(to, port, 1, OutputFormat::Text), &mut Vec::new())
                .unwrap_err()
                .to_string()
        };
        assert!(e("svc/shop/nope", Some("80")).contains("no such Service"));
        let msg = e("svc/shop/web:81", None);
        assert!(
            msg.contains("no port 81") && msg.contains("80/TCP (http), 53/UDP (dns)"),
            "{msg}"
        );
        assert!(e("svc/shop/web", Some("53/TCP")).contains("no port 53/TCP"));
        assert!(e("svc/shop/web:http", Some("80")).contains("given twice"));
        assert!(e("svc/shop/web", None).contains("--port is required"));
        assert!(e("svc/shop", Some("80")).contains("svc/NAMESPACE/NAME"));
    }
}
