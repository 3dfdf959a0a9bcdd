//! Peers outside the cluster: the `Peer` custom resource (`kwire.dev/v1alpha1`, cluster-scoped,
//! `deploy/peer-crd.yaml`). Every agent adds each valid Peer to its device; a Peer whose spec
//! cannot be used is refused with the condition `Accepted=False` and a reason in its status, and
//! counted in `kwire_invalid_peer_total{reason="peer_..."}`.
//!
//! A Peer's allowed IPs are its own addresses: what it may send from, and what every node
//! routes to it. They may not overlap the cluster's pod or Service ranges (`--cluster-cidr`,
//! `--service-cidr`: every node's podCIDR lies inside them), contain a Node's address or one of
//! this host's, or overlap another Peer's; two Peers with overlapping addresses or the same key:
//! the older one (then the smaller name) keeps them, as with Nodes. Every agent decides alike
//! from the same objects, so they write the same condition.
//!
//! Pure functions here (selection, device changes, the condition); the watch, the status patch
//! and the Secret read are the control loop's ([`super`]).

use super::peers::{parse_range, RangeError};
use crate::wg::key::PresharedKey;
use crate::wg::uapi::PeerChange;
use ipnetwork::IpNetwork;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::Event;
use kwire_proto::key::PublicKey;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The API group and version of `Peer`.
pub const GROUP: &str = "kwire.dev";
pub const VERSION: &str = "v1alpha1";
/// Where a Peer's preshared key Secret lives (`deploy/kwire.yaml` lets the agent `get` there).
pub const PSK_NAMESPACE: &str = "kwire-peer-keys";
/// The data key of the preshared key in that Secret.
pub const PSK_DATA_KEY: &str = "presharedKey";
/// The condition every agent writes on a Peer.
pub const CONDITION: &str = "Accepted";
/// An allowed IP wider than this (IPv4) is not "the peer's own addresses": refused.
pub const MIN_PREFIX_V4: u8 = 16;
/// The same for IPv6.
pub const MIN_PREFIX_V6: u8 = 48;

/// The `Peer` resource for kube's dynamic API.
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: "Peer".into(),
        plural: "peers".into(),
    }
}

/// Why a Peer is not added. Its label is bounded (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerRejectReason {
    /// `spec.publicKey` is not base64 of 32 bytes, or is all zeros.
    BadKey,
    /// A Node, this node, or an older Peer has the same key.
    DuplicateKey,
    /// `spec.allowedIPs` is empty, has an entry that is not a CIDR, or one that is too wide.
    BadAllowedIps,
    /// An allowed IP overlaps the cluster's pod or Service ranges.
    OverlapsCluster,
    /// An allowed IP contains a Node's address or one of this host's.
    CoversNode,
    /// An allowed IP overlaps an older Peer's.
    OverlapsPeer,
    /// `spec.endpoint` is not a usable IP:port.
    BadEndpoint,
    /// `spec.persistentKeepalive` is not 0 to 65535.
    BadKeepalive,
    /// The preshared key Secret is missing, unreadable, or holds no valid key.
    PresharedKeyUnavailable,
}

impl PeerRejectReason {
    pub const ALL: [PeerRejectReason; 9] = [
        PeerRejectReason::BadKey,
        PeerRejectReason::DuplicateKey,
        PeerRejectReason::BadAllowedIps,
        PeerRejectReason::OverlapsCluster,
        PeerRejectReason::CoversNode,
        PeerRejectReason::OverlapsPeer,
        PeerRejectReason::BadEndpoint,
        PeerRejectReason::BadKeepalive,
        PeerRejectReason::PresharedKeyUnavailable,
    ];

    /// The `reason` label of `kwire_invalid_peer_total` (prefixed `peer_`: Nodes use the rest).
    pub fn metric_label(self) -> &'static str {
        match self {
            PeerRejectReason::BadKey => "peer_bad_key",
            PeerRejectReason::DuplicateKey => "peer_duplicate_key",
            PeerRejectReason::BadAllowedIps => "peer_bad_allowed_ips",
            PeerRejectReason::OverlapsCluster => "peer_overlaps_cluster",
            PeerRejectReason::CoversNode => "peer_covers_node",
            PeerRejectReason::OverlapsPeer => "peer_overlaps_peer",
            PeerRejectReason::BadEndpoint => "peer_bad_endpoint",
            PeerRejectReason::BadKeepalive => "peer_bad_keepalive",
            PeerRejectReason::PresharedKeyUnavailable => "peer_preshared_key_unavailable",
        }
    }

    /// The condition's `reason` (PascalCase).
    pub fn condition_reason(self) -> &'static str {
        match self {
            PeerRejectReason::BadKey => "BadPublicKey",
            PeerRejectReason::DuplicateKey => "DuplicatePublicKey",
            PeerRejectReason::BadAllowedIps => "BadAllowedIPs",
            PeerRejectReason::OverlapsCluster => "AllowedIPsOverlapCluster",
            PeerRejectReason::CoversNode => "AllowedIPsCoverNode",
            PeerRejectReason::OverlapsPeer => "AllowedIPsOverlapPeer",
            PeerRejectReason::BadEndpoint => "BadEndpoint",
            PeerRejectReason::BadKeepalive => "BadPersistentKeepalive",
            PeerRejectReason::PresharedKeyUnavailable => "PresharedKeyUnavailable",
        }
    }
}

/// What selection reads of a Peer object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerObject {
    pub name: String,
    /// `metadata.creationTimestamp`, RFC 3339 (sorts by time; None sorts as the newest).
    pub created: Option<String>,
    pub generation: Option<i64>,
    pub spec: Value,
    /// The `Accepted` condition as stored.
    pub accepted: Option<Condition>,
}

/// A Peer's `Accepted` condition as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condition {
    pub status: String,
    pub reason: String,
    pub message: String,
    pub observed_generation: Option<i64>,
    pub last_transition_time: String,
}

impl PeerObject {
    pub fn from_dynamic(o: &DynamicObject) -> Option<PeerObject> {
        let name = o.metadata.name.clone()?;
        let cond = o
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == CONDITION))
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
                Condition {
                    status: s("status"),
                    reason: s("reason"),
                    message: s("message"),
                    observed_generation: c["observedGeneration"].as_i64(),
                    last_transition_time: s("lastTransitionTime"),
                }
            });
        Some(PeerObject {
            name,
            created: o
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            generation: o.metadata.generation,
            spec: o.data.get("spec").cloned().unwrap_or(Value::Null),
            accepted: cond,
        })
    }

    /// The Secret holding this Peer's preshared key, if it names one.
    pub fn psk_secret(&self) -> Option<&str> {
        self.spec
            .pointer("/presharedKeySecretRef/name")
            .and_then(Value::as_str)
    }
}

/// A Peer as the device gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPeer {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub keepalive: u16,
    /// The preshared key's Secret, if any (the key itself is in [`Context::psks`]).
    pub psk_secret: Option<String>,
}

/// The verdict on one Peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(ExternalPeer),
    Refused {
        reason: PeerRejectReason,
        message: String,
    },
}

/// What a Peer is checked against.
#[derive(Debug, Default)]
pub struct Context {
    /// `--cluster-cidr` and `--service-cidr`.
    pub cluster: Vec<IpNetwork>,
    /// Every Node's addresses and endpoints, and this host's addresses.
    pub node_addresses: BTreeSet<IpAddr>,
    /// This node's key and every Node peer's.
    pub node_keys: BTreeSet<PublicKey>,
    /// Preshared keys read so far, by Secret name (None: the read failed or held no key).
    pub psks: BTreeMap<String, Option<PresharedKey>>,
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

fn refuse(reason: PeerRejectReason, message: impl Into<String>) -> Verdict {
    Verdict::Refused {
        reason,
        message: message.into(),
    }
}

fn no(reason: PeerRejectReason, message: impl Into<String>) -> (PeerRejectReason, String) {
    (reason, message.into())
}

/// Checks one Peer on its own (no other Peer considered); `resolved`: the endpoints given as
/// host names, as resolved so far.
fn check(
    p: &PeerObject,
    ctx: &Context,
    resolved: &Resolved,
) -> Result<ExternalPeer, (PeerRejectReason, String)> {
    use PeerRejectReason as R;
    let key_text = p.spec["publicKey"].as_str().unwrap_or("");
    let key = match PublicKey::from_base64(key_text) {
        Ok(k) if k.0 != [0; 32] => k,
        Ok(_) => return Err(no(R::BadKey, "spec.publicKey is the all-zero key")),
        Err(_) => {
            return Err(no(
                R::BadKey,
                "spec.publicKey is not a WireGuard public key (44 characters of base64, as `wg pubkey` prints it)",
            ))
        }
    };
    if ctx.node_keys.contains(&key) {
        return Err(no(
            R::DuplicateKey,
            "spec.publicKey is a Node's key: every Peer needs its own key pair",
        ));
    }
    let written: Vec<&str> = p.spec["allowedIPs"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap_or("")).collect())
        .unwrap_or_default();
    if written.is_empty() {
        return Err(no(
            R::BadAllowedIps,
            "spec.allowedIPs is empty: give the peer's own address, e.g. 10.250.0.2/32",
        ));
    }
    let mut allowed = Vec::new();
    for w in written {
        let n = parse_range(w, MIN_PREFIX_V4, MIN_PREFIX_V6).map_err(|e| {
            let why = match e {
                RangeError::NotCidr => format!("spec.allowedIPs: {w:?} is not a CIDR (address/prefix)"),
                RangeError::TooWide(min) => format!("spec.allowedIPs: {w} is wider than /{min}: a Peer's allowed IPs are its own addresses, not a network behind it"),
            };
            no(R::BadAllowedIps, why)
        })?;
        if let Some(c) = ctx.cluster.iter().find(|c| overlaps(c, &n)) {
            return Err(no(
                R::OverlapsCluster,
                format!("spec.allowedIPs: {n} overlaps the cluster range {c} (pods or Services): pick addresses outside the cluster's ranges"),
            ));
        }
        if let Some(a) = ctx.node_addresses.iter().find(|a| n.contains(**a)) {
            return Err(no(
                R::CoversNode,
                format!("spec.allowedIPs: {n} contains the node address {a}: routing it to the Peer would cut that node off"),
            ));
        }
        allowed.push(n);
    }
    let endpoint = match p.spec.get("endpoint").and_then(Value::as_str) {
        None => None,
        Some(e) => match e.parse::<SocketAddr>() {
            Ok(a) if super::peers::usable_endpoint(&a) => Some(a),
            Err(_) if host_port(e).is_some() => match resolved.get(e) {
                // Not resolved yet: added without an endpoint (it may connect first) until
                // the resolver answers.
                None => None,
                Some(Ok(a)) => Some(*a),
                Some(Err(why)) => {
                    return Err(no(
                        R::BadEndpoint,
                        format!("spec.endpoint {e:?}: {why} (the agents resolve it again every {} s)", RESOLVE_INTERVAL.as_secs()),
                    ))
                }
            },
            _ => {
                return Err(no(
                    R::BadEndpoint,
                    format!("spec.endpoint {e:?} is not a usable IP:port or host:port (leave it out for a peer that connects first)"),
                ))
            }
        },
    };
    let keepalive = match p.spec.get("persistentKeepalive") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_u64().and_then(|k| u16::try_from(k).ok()) {
            Some(k) => k,
            None => {
                return Err(no(
                    R::BadKeepalive,
                    format!("spec.persistentKeepalive {v} is not 0 to 65535 seconds"),
                ))
            }
        },
    };
    let psk_secret = p.psk_secret().map(str::to_string);
    if let Some(s) = &psk_secret {
        if !matches!(ctx.psks.get(s), Some(Some(_))) {
            return Err(no(
                R::PresharedKeyUnavailable,
                format!("the preshared key Secret {PSK_NAMESPACE}/{s} is missing or holds no valid key under {PSK_DATA_KEY:?} (base64 of 32 bytes, as `wg genpsk` prints it)"),
            ));
        }
    }
    Ok(ExternalPeer {
        name: p.name.clone(),
        public_key: key,
        endpoint,
        allowed_ips: allowed,
        keepalive,
        psk_secret,
    })
}

/// The verdict on every Peer, by name, with no host name resolved yet.
pub fn select(peers: &BTreeMap<String, PeerObject>, ctx: &Context) -> BTreeMap<String, Verdict> {
    select_resolved(peers, ctx, &Resolved::new())
}

/// The verdict on every Peer, by name, with the host names of endpoints as `resolved` gives
/// them. Peers are taken oldest first (then by name): a later one that repeats a key or
/// overlaps an address of an accepted one is refused.
pub fn select_resolved(
    peers: &BTreeMap<String, PeerObject>,
    ctx: &Context,
    resolved: &Resolved,
) -> BTreeMap<String, Verdict> {
    let mut order: Vec<&PeerObject> = peers.values().collect();
    order.sort_by(|a, b| {
        let t = |p: &PeerObject| (p.created.is_none(), p.created.clone());
        t(a).cmp(&t(b)).then_with(|| a.name.cmp(&b.name))
    });
    let mut out = BTreeMap::new();
    let mut keys: BTreeMap<PublicKey, String> = BTreeMap::new();
    let mut claimed: Vec<(IpNetwork, String)> = Vec::new();
    for p in order {
        let verdict = match check(p, ctx, resolved) {
            Err((reason, message)) => Verdict::Refused { reason, message },
            Ok(e) => {
                if let Some(other) = keys.get(&e.public_key) {
                    refuse(
                        PeerRejectReason::DuplicateKey,
                        format!("spec.publicKey is also Peer {other}'s (the older one keeps it)"),
                    )
                } else if let Some((n, other)) = claimed
                    .iter()
                    .find(|(c, _)| e.allowed_ips.iter().any(|a| overlaps(a, c)))
                {
                    refuse(
                        PeerRejectReason::OverlapsPeer,
                        format!(
                            "spec.allowedIPs overlaps {n} of Peer {other} (the older one keeps it)"
                        ),
                    )
                } else {
                    keys.insert(e.public_key, e.name.clone());
                    claimed.extend(e.allowed_ips.iter().map(|a| (*a, e.name.clone())));
                    Verdict::Accepted(e)
                }
            }
        };
        out.insert(p.name.clone(), verdict);
    }
    out
}

/// How often the agents resolve the host names of Peers' endpoints again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// Endpoints given as `host:port`, by their text: the address they resolved to, or why not.
pub type Resolved = BTreeMap<String, Result<SocketAddr, String>>;

/// `host:port` with a DNS host name (letters, digits, `-` and `.`, at least one letter, at
/// most 253 characters) and a port other than 0; None for anything else (an IP literal is
/// parsed apart).
pub fn host_port(e: &str) -> Option<(&str, u16)> {
    let (host, port) = e.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && host.chars().any(|c| c.is_ascii_alphabetic())
        && !host.starts_with(['-', '.'])
        && host
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63);
    ok.then_some((host, port))
}

/// Resolves `host:port` with the system's resolver (getaddrinfo: /etc/hosts, DNS): the first
/// address usable as an endpoint.
pub fn resolve_system(e: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    let (host, port) = host_port(e).ok_or_else(|| "not host:port".to_string())?;
    let all: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|err| format!("does not resolve: {err}"))?
        .collect();
    match all.iter().find(|a| super::peers::usable_endpoint(a)) {
        Some(a) => Ok(*a),
        None => Err(match all.first() {
            Some(a) => format!("resolves to {}, not a usable endpoint address", a.ip()),
            None => "resolves to no address".to_string(),
        }),
    }
}

/// The host names of Peers' endpoints, resolved off the control loop: a thread (started with
/// the first name) resolves every wanted name every [`RESOLVE_INTERVAL`], and at once when a
/// new one is wanted. A name that stops resolving keeps its last address (a DNS outage must
/// not take Peers out of the device); one never resolved is an error, which refuses its Peer
/// (`BadEndpoint`, with the resolver's message) until it resolves.
#[derive(Debug, Default)]
pub struct Resolver {
    shared: Arc<ResolverShared>,
    started: bool,
}

#[derive(Debug, Default)]
struct ResolverShared {
    state: Mutex<ResolveState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct ResolveState {
    wanted: BTreeSet<String>,
    results: Resolved,
    /// The results changed since the control loop last looked.
    changed: bool,
    /// A new name is wanted: resolve at once.
    kick: bool,
}

impl ResolveState {
    /// Takes the results of one pass over the names wanted when it started; results of
    /// names no longer wanted go. A name that fails keeps its last address.
    fn apply(&mut self, fresh: Vec<(String, Result<SocketAddr, String>)>) {
        let before = self.results.len();
        let wanted = &self.wanted;
        self.results.retain(|n, _| wanted.contains(n));
        self.changed |= self.results.len() != before;
        for (name, new) in fresh {
            if !self.wanted.contains(&name) {
                continue;
            }
            if let (Err(why), Some(Ok(last))) = (&new, self.results.get(&name)) {
                tracing::warn!(endpoint = %name, error = %why, kept = %last, "a Peer's endpoint no longer resolves; keeping its last address");
                continue;
            }
            if self.results.get(&name) != Some(&new) {
                self.results.insert(name, new);
                self.changed = true;
            }
        }
    }
}

impl Resolver {
    /// Wants exactly these names resolved (starting the thread on the first, waking it for a
    /// new one).
    pub fn want(&mut self, names: BTreeSet<String>) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.wanted == names {
            return;
        }
        let new = names.iter().any(|n| !st.results.contains_key(n));
        st.wanted = names;
        st.kick |= new;
        drop(st);
        if !new {
            return;
        }
        if self.started {
            self.shared.wake.notify_one();
            return;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("kwire-resolve".into())
            .spawn(move || resolve_forever(&shared));
        match spawned {
            Ok(_) => self.started = true,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the thread resolving Peers' endpoints; retrying with the next change")
            }
        }
    }

    /// The results so far.
    pub fn results(&self) -> Resolved {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.results.clone()
    }

    /// Whether the results changed since the last call.
    pub fn take_changed(&self) -> bool {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut st.changed)
    }
}

/// The resolver thread: resolves the wanted names (without the lock: a slow lookup never
/// holds the control loop), every [`RESOLVE_INTERVAL`] or at once when kicked.
fn resolve_forever(shared: &ResolverShared) {
    let lock = || shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let wanted = {
            let mut st = lock();
            st.kick = false;
            st.wanted.clone()
        };
        let fresh = wanted
            .into_iter()
            .map(|n| {
                let r = resolve_system(&n);
                (n, r)
            })
            .collect();
        let mut st = lock();
        st.apply(fresh);
        let _ = shared
            .wake
            .wait_timeout_while(st, RESOLVE_INTERVAL, |st| !st.kick);
    }
}

/// The device changes from the `old` accepted Peers (given the preshared keys `old_psks`, by
/// Peer name) to the `new` ones. A key that a Node peer now holds (`node_keys`) is not
/// removed: the Node's own change already took it over. A Peer without an endpoint keeps the
/// one it roamed to.
pub fn plan(
    old: &BTreeMap<String, ExternalPeer>,
    old_psks: &BTreeMap<String, PresharedKey>,
    new: &BTreeMap<String, ExternalPeer>,
    psks: &BTreeMap<String, Option<PresharedKey>>,
    node_keys: &BTreeSet<PublicKey>,
) -> Vec<PeerChange> {
    let psk_of = |p: &ExternalPeer| {
        p.psk_secret
            .as_ref()
            .and_then(|s| psks.get(s).cloned().flatten())
    };
    let mut out = Vec::new();
    let new_keys: BTreeSet<PublicKey> = new.values().map(|p| p.public_key).collect();
    for p in old.values() {
        if !new_keys.contains(&p.public_key) && !node_keys.contains(&p.public_key) {
            out.push(PeerChange {
                remove: true,
                ..PeerChange::new(p.public_key)
            });
        }
    }
    for (name, p) in new {
        let before = old.values().find(|o| o.public_key == p.public_key);
        if before.is_some_and(|b| b == p && old.get(name) == Some(p))
            && old_psks.get(name) == psk_of(p).as_ref()
        {
            continue;
        }
        out.push(PeerChange {
            // Always set: a Secret read again may hold a new key; None clears one removed.
            preshared_key: Some(psk_of(p)),
            endpoint: p.endpoint,
            persistent_keepalive: Some(p.keepalive),
            replace_allowed_ips: true,
            allowed_ips: p.allowed_ips.clone(),
            ..PeerChange::new(p.public_key)
        });
    }
    out
}

/// The merge patch for the Peer's status if its `Accepted` condition is not `verdict` yet
/// (None: already right). The transition time is kept while the status holds, so agents that
/// agree write nothing new.
pub fn status_patch(p: &PeerObject, verdict: &Verdict, now: &str) -> Option<Value> {
    let (status, reason, message) = match verdict {
        Verdict::Accepted(_) => (
            "True",
            "Valid",
            "every kwire agent adds this Peer to its WireGuard device".to_string(),
        ),
        Verdict::Refused { reason, message } => {
            ("False", reason.condition_reason(), message.clone())
        }
    };
    let mut since = now;
    if let Some(c) = &p.accepted {
        if c.status == status {
            if c.reason == reason && c.message == message && c.observed_generation == p.generation {
                return None;
            }
            if !c.last_transition_time.is_empty() {
                since = &c.last_transition_time;
            }
        }
    }
    Some(json!({"status": {"conditions": [{
        "type": CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": p.generation,
        "lastTransitionTime": since,
    }]}}))
}

/// The control loop's view of the Peers and what it gave the device.
#[derive(Debug, Default)]
pub struct Peers {
    objects: BTreeMap<String, PeerObject>,
    /// Accepted Peers as the device has them.
    pub applied: BTreeMap<String, ExternalPeer>,
    /// The preshared key each applied Peer was given, by Peer name.
    pub applied_psks: BTreeMap<String, PresharedKey>,
    /// Preshared keys from the state file, by Secret name: used until the Secret is read
    /// again (so a restored Peer stays in the device meanwhile).
    pub restored_psks: BTreeMap<String, PresharedKey>,
    verdicts: BTreeMap<String, Verdict>,
    /// Preshared keys read, by Secret name (None: the read failed; retried on the tick).
    pub psks: BTreeMap<String, Option<PresharedKey>>,
    relist: Option<BTreeSet<String>>,
    /// Endpoints given as host names.
    resolver: Resolver,
    /// A complete list has been seen.
    pub synced: bool,
    /// Something selection reads changed since the last [`Peers::reconcile`].
    dirty: bool,
}

/// What one reconcile of the Peers asks for.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changes: Vec<PeerChange>,
    /// Peers newly refused (to count and log).
    pub refused: Vec<(String, PeerRejectReason, String)>,
    /// Status patches, by Peer name.
    pub patches: Vec<(String, Value)>,
    /// Secrets to read before the Peers that name them can be added.
    pub psk_wanted: Vec<String>,
    /// The set of accepted Peers or their addresses changed (routes, names).
    pub changed: bool,
}

impl Peers {
    /// Folds a watch event in; true when selection has something new to do.
    pub fn on_event(&mut self, ev: Event<DynamicObject>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeSet::new());
                false
            }
            Event::InitApply(o) => {
                if let Some(p) = PeerObject::from_dynamic(&o) {
                    if let Some(seen) = self.relist.as_mut() {
                        seen.insert(p.name.clone());
                    }
                    self.objects.insert(p.name.clone(), p);
                }
                false
            }
            Event::InitDone => {
                if let Some(seen) = self.relist.take() {
                    self.objects.retain(|n, _| seen.contains(n));
                }
                self.synced = true;
                self.dirty = true;
                true
            }
            Event::Apply(o) => {
                let Some(p) = PeerObject::from_dynamic(&o) else {
                    return false;
                };
                let changed = self.objects.get(&p.name) != Some(&p);
                self.objects.insert(p.name.clone(), p);
                self.dirty |= changed;
                changed && self.synced
            }
            Event::Delete(o) => {
                let gone = o
                    .metadata
                    .name
                    .as_ref()
                    .is_some_and(|n| self.objects.remove(n).is_some());
                self.dirty |= gone;
                gone && self.synced
            }
        }
    }

    /// True when a reconcile has work: Peers changed, or there are Peers to check again.
    pub fn pending(&self) -> bool {
        self.synced && (self.dirty || !self.objects.is_empty())
    }

    /// Forgets failed Secret reads so that the next reconcile asks again; true if there were,
    /// or if a host name of an endpoint resolved differently since the last look.
    pub fn retry_psks(&mut self) -> bool {
        let before = self.psks.len();
        self.psks.retain(|_, k| k.is_some());
        let retry = self.psks.len() != before || self.resolver.take_changed();
        self.dirty |= retry;
        retry
    }

    /// Takes the Peers the state file kept as applied (the device already has them): the
    /// first reconcile after the API answers changes only what changed meanwhile, and their
    /// preshared keys stand in for their Secrets until those are read again.
    pub fn restore(
        &mut self,
        applied: BTreeMap<String, ExternalPeer>,
        psks: BTreeMap<String, PresharedKey>,
    ) {
        self.restored_psks = applied
            .iter()
            .filter_map(|(n, p)| Some((p.psk_secret.clone()?, psks.get(n)?.clone())))
            .collect();
        self.applied = applied;
        self.applied_psks = psks;
    }

    /// Records a Secret read (None: failed or no valid key).
    pub fn psk_read(&mut self, secret: &str, key: Option<PresharedKey>) {
        self.restored_psks.remove(secret);
        self.psks.insert(secret.to_string(), key);
        self.dirty = true;
    }

    /// Selects against `ctx` (its `psks` are taken from here), plans the device changes and
    /// the status writes.
    pub fn reconcile(&mut self, mut ctx: Context, now: &str) -> Outcome {
        let mut out = Outcome::default();
        if !self.synced {
            return out;
        }
        self.dirty = false;
        // Secrets named by Peers and not read yet: read them first.
        let wanted: Vec<String> = self
            .objects
            .values()
            .filter_map(PeerObject::psk_secret)
            .filter(|s| !self.psks.contains_key(*s))
            .map(str::to_string)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        ctx.psks = std::mem::take(&mut self.psks);
        // Secrets not read since the restart: the key the state file kept, until read.
        let mut stand_ins = Vec::new();
        for (secret, key) in &self.restored_psks {
            if !ctx.psks.contains_key(secret) {
                ctx.psks.insert(secret.clone(), Some(key.clone()));
                stand_ins.push(secret.clone());
            }
        }
        let names: BTreeSet<String> = self
            .objects
            .values()
            .filter_map(|p| p.spec.get("endpoint").and_then(Value::as_str))
            .filter(|e| e.parse::<SocketAddr>().is_err() && host_port(e).is_some())
            .map(str::to_string)
            .collect();
        self.resolver.want(names);
        let verdicts = select_resolved(&self.objects, &ctx, &self.resolver.results());
        let accepted: BTreeMap<String, ExternalPeer> = verdicts
            .iter()
            .filter_map(|(n, v)| match v {
                Verdict::Accepted(p) => Some((n.clone(), p.clone())),
                Verdict::Refused { .. } => None,
            })
            .collect();
        // A Peer waiting for its Secret's first read is not refused yet.
        let waiting = |n: &str| {
            self.objects[n]
                .psk_secret()
                .is_some_and(|s| wanted.iter().any(|w| w == s))
        };
        for (name, v) in &verdicts {
            if let Verdict::Refused { reason, message } = v {
                if waiting(name) {
                    continue;
                }
                let was = self.verdicts.get(name);
                if !matches!(was, Some(Verdict::Refused { reason: r, .. }) if r == reason) {
                    out.refused.push((name.clone(), *reason, message.clone()));
                }
            }
            if !waiting(name) {
                if let Some(patch) = status_patch(&self.objects[name], v, now) {
                    out.patches.push((name.clone(), patch));
                }
            }
        }
        out.psk_wanted = wanted;
        out.changes = plan(
            &self.applied,
            &self.applied_psks,
            &accepted,
            &ctx.psks,
            &ctx.node_keys,
        );
        out.changed = self.applied != accepted;
        self.applied_psks = psks_of(&accepted, &ctx.psks);
        for s in stand_ins {
            ctx.psks.remove(&s);
        }
        self.psks = ctx.psks;
        self.applied = accepted;
        self.verdicts = verdicts;
        out
    }

    /// Every accepted Peer's allowed IPs (routed into the tun like the Nodes' pod ranges).
    pub fn allowed_ips(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.applied
            .values()
            .flat_map(|p| p.allowed_ips.iter().copied())
    }

    /// Peer name by public key, for status and metrics.
    pub fn names(&self) -> BTreeMap<PublicKey, String> {
        self.applied
            .values()
            .map(|p| (p.public_key, p.name.clone()))
            .collect()
    }
}

/// The device changes that add the Peers a state file kept (`psks` by Peer name).
pub fn restore_changes(
    peers: &BTreeMap<String, ExternalPeer>,
    psks: &BTreeMap<String, PresharedKey>,
) -> Vec<PeerChange> {
    let by_secret: BTreeMap<String, Option<PresharedKey>> = peers
        .iter()
        .filter_map(|(n, p)| Some((p.psk_secret.clone()?, psks.get(n).cloned())))
        .collect();
    plan(
        &BTreeMap::new(),
        &BTreeMap::new(),
        peers,
        &by_secret,
        &BTreeSet::new(),
    )
}

/// Each Peer's preshared key (by Peer name) as `psks` (by Secret name) give it.
pub fn psks_of(
    peers: &BTreeMap<String, ExternalPeer>,
    psks: &BTreeMap<String, Option<PresharedKey>>,
) -> BTreeMap<String, PresharedKey> {
    peers
        .iter()
        .filter_map(|(n, p)| Some((n.clone(), psks.get(p.psk_secret.as_ref()?)?.clone()?)))
        .collect()
}

/// The Node whose agent writes the Peers' conditions: the oldest (creationTimestamp, then name)
/// that publishes a valid key (a Node with an all-zero or malformed key has no working agent:
/// electing it would leave the conditions unwritten). Every agent computes the same.
pub fn status_writer<'a>(
    nodes: impl Iterator<Item = &'a super::peers::NodeInfo>,
) -> Option<&'a str> {
    nodes
        .filter(|n| n.has_valid_key())
        .min_by(|a, b| {
            (a.created.unwrap_or(i64::MAX), &a.name).cmp(&(b.created.unwrap_or(i64::MAX), &b.name))
        })
        .map(|n| n.name.as_str())
}

/// A preshared key from a Secret's `data` (base64 of base64 text, as `wg genpsk` prints it,
/// or of the 32 raw bytes).
pub fn psk_from_secret_data(data: &[u8]) -> Option<PresharedKey> {
    use base64::Engine as _;
    let raw: Vec<u8> = match std::str::from_utf8(data).ok().map(str::trim) {
        Some(text) if text.len() == 44 => base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?,
        _ => data.to_vec(),
    };
    let bytes: [u8; 32] = raw.try_into().ok()?;
    Some(PresharedKey(zeroize::Zeroizing::new(bytes)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_agent_writes_conditions_the_oldest_keyed_node() {
        use crate::agent::peers::NodeInfo;
        let n = |name: &str, created: Option<i64>, key: Option<String>| NodeInfo {
            name: name.into(),
            created,
            public_key: key,
            ..NodeInfo::default()
        };
        let good = || Some(PublicKey([7; 32]).to_base64());
        let nodes = [
            n("zeta", Some(5), good()),
            n("alpha", Some(5), good()),
            n("old-no-key", Some(1), None),
            n("young", Some(9), good()),
            n("unknown-age", None, good()),
            // Created in the same second, first by name, but its key is no key: no agent
            // of it writes, so it is never the writer.
            n(
                "aaa-zero-key",
                Some(5),
                Some(PublicKey([0; 32]).to_base64()),
            ),
            n("aaa-bad-key", Some(1), Some("not-a-key".into())),
        ];
        assert_eq!(status_writer(nodes.iter()), Some("alpha"));
        assert_eq!(status_writer(nodes[2..3].iter()), None);
        assert_eq!(status_writer(nodes[5..].iter()), None);
    }

    use super::*;

    fn key(b: u8) -> String {
        PublicKey([b; 32]).to_base64()
    }

    fn obj(name: &str, created: &str, k: u8, ips: &[&str]) -> PeerObject {
        PeerObject {
            name: name.into(),
            created: Some(created.into()),
            generation: Some(1),
            spec: json!({"publicKey": key(k), "allowedIPs": ips, "persistentKeepalive": 25}),
            accepted: None,
        }
    }

    fn ctx() -> Context {
        Context {
            cluster: vec![
                "10.244.0.0/16".parse().unwrap(),
                "10.96.0.0/12".parse().unwrap(),
            ],
            node_addresses: ["192.0.2.1".parse().unwrap()].into_iter().collect(),
            node_keys: [PublicKey([9; 32])].into_iter().collect(),
            psks: BTreeMap::new(),
        }
    }

    fn reason(v: &Verdict) -> Option<PeerRejectReason> {
        match v {
            Verdict::Refused { reason, .. } => Some(*reason),
            Verdict::Accepted(_) => None,
        }
    }

    #[test]
    fn host_name_endpoints_resolve_keep_their_last_address_and_refuse_when_never_resolved() {
        assert_eq!(
            host_port("edge-1.example.com:51820"),
            Some(("edge-1.example.com", 51820))
        );
        for bad in [
            "example.com",
            "example.com:0",
            ":51820",
            "exa mple.com:1",
            "-x.example:1",
            "a..b:1",
            "example.com:x",
            "192.0.2.1:51820",
            "[2001:db8::1]:51820",
        ] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Selection: not resolved yet, resolved, never resolved.
        let mut peers = BTreeMap::new();
        let mut edge = obj("edge", "2026-01-01T00:00:00Z", 3, &["198.51.100.77/32"]);
        edge.spec["endpoint"] = json!("edge.example.com:51820");
        peers.insert("edge".to_string(), edge);
        let ep = |r: &Resolved| match &select_resolved(&peers, &ctx(), r)["edge"] {
            Verdict::Accepted(e) => Ok(e.endpoint),
            Verdict::Refused { reason, message } => Err((*reason, message.clone())),
        };
        assert_eq!(ep(&Resolved::new()), Ok(None));
        let mut r = Resolved::new();
        r.insert("edge.example.com:51820".into(), Ok(sa("203.0.113.9:51820")));
        assert_eq!(ep(&r), Ok(Some(sa("203.0.113.9:51820"))));
        r.insert(
            "edge.example.com:51820".into(),
            Err("does not resolve: no such host".into()),
        );
        let (reason, message) = ep(&r).unwrap_err();
        assert_eq!(reason, PeerRejectReason::BadEndpoint);
        assert!(
            message.contains("does not resolve: no such host") && message.contains("every 30 s"),
            "{message}"
        );
        // The results: a failure keeps the last address; a name no longer wanted goes.
        let mut st = ResolveState {
            wanted: ["a.example:1".to_string()].into(),
            ..ResolveState::default()
        };
        st.apply(vec![("a.example:1".into(), Err("down".into()))]);
        assert!(std::mem::take(&mut st.changed));
        st.apply(vec![("a.example:1".into(), Ok(sa("192.0.2.7:1")))]);
        assert!(std::mem::take(&mut st.changed));
        st.apply(vec![("a.example:1".into(), Err("down".into()))]);
        assert_eq!(st.results["a.example:1"], Ok(sa("192.0.2.7:1")));
        assert!(!st.changed);
        st.apply(vec![("a.example:1".into(), Ok(sa("192.0.2.8:1")))]);
        assert!(std::mem::take(&mut st.changed));
        st.wanted.clear();
        st.apply(vec![("a.example:1".into(), Ok(sa("192.0.2.8:1")))]);
        assert!(st.results.is_empty() && st.changed);
    }

    /// Through the control loop's view and the resolver thread, with the system's resolver
    /// (offline: /etc/hosts): `localhost` resolves to loopback, no endpoint, so the Peer is
    /// refused with the resolver's reason once the thread answered (the retry tick's call
    /// says when).
    #[test]
    fn the_resolver_thread_answers_the_control_loop() {
        let mut peers = Peers {
            synced: true,
            ..Peers::default()
        };
        let mut local = obj("local", "2026-01-01T00:00:00Z", 3, &["198.51.100.78/32"]);
        local.spec["endpoint"] = json!("localhost:51820");
        peers.objects.insert("local".into(), local);
        let mut out = peers.reconcile(ctx(), "2026-01-01T00:00:00Z");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while out.refused.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the resolver never answered"
            );
            if peers.retry_psks() {
                out = peers.reconcile(ctx(), "2026-01-01T00:00:01Z");
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let (name, reason, message) = &out.refused[0];
        assert_eq!(
            (name.as_str(), *reason),
            ("local", PeerRejectReason::BadEndpoint)
        );
        assert!(
            message.contains("not a usable endpoint address"),
            "{message}"
        );
        assert!(peers.applied.is_empty());
    }

    #[test]
    fn good_peers_are_accepted_and_bad_ones_refused_with_a_reason() {
        use PeerRejectReason as R;
        let mut peers = BTreeMap::new();
        let mut add = |p: PeerObject| {
            peers.insert(p.name.clone(), p);
        };
        add(obj(
            "laptop",
            "2026-01-01T00:00:00Z",
            1,
            &["198.51.100.7/32"],
        ));
        add(obj(
            "in-pods",
            "2026-01-01T00:00:00Z",
            2,
            &["10.244.3.9/32"],
        ));
        add(obj("in-svc", "2026-01-01T00:00:00Z", 3, &["10.96.0.10/32"]));
        add(obj("on-node", "2026-01-01T00:00:00Z", 4, &["192.0.2.0/24"]));
        add(obj("wide", "2026-01-01T00:00:00Z", 5, &["0.0.0.0/0"]));
        add(obj("junk", "2026-01-01T00:00:00Z", 6, &["nope"]));
        add(obj(
            "node-key",
            "2026-01-01T00:00:00Z",
            9,
            &["198.51.100.9/32"],
        ));
        add(obj(
            "later",
            "2026-01-02T00:00:00Z",
            7,
            &["198.51.100.0/28"],
        ));
        add(obj(
            "same-key",
            "2026-01-02T00:00:00Z",
            1,
            &["198.51.100.200/32"],
        ));
        let mut bad_ep = obj("bad-ep", "2026-01-01T00:00:00Z", 8, &["203.0.113.1/32"]);
        bad_ep.spec["endpoint"] = json!("example.com");
        add(bad_ep);
        let mut zero = obj("zero", "2026-01-01T00:00:00Z", 0, &["203.0.113.2/32"]);
        zero.spec["persistentKeepalive"] = json!(1);
        add(zero);
        let mut psk = obj("psk", "2026-01-01T00:00:00Z", 10, &["203.0.113.3/32"]);
        psk.spec["presharedKeySecretRef"] = json!({"name": "missing"});
        add(psk);
        let v = select(&peers, &ctx());
        let got: BTreeMap<&str, Option<PeerRejectReason>> =
            v.iter().map(|(n, v)| (n.as_str(), reason(v))).collect();
        let want: BTreeMap<&str, Option<PeerRejectReason>> = [
            ("laptop", None),
            ("in-pods", Some(R::OverlapsCluster)),
            ("in-svc", Some(R::OverlapsCluster)),
            ("on-node", Some(R::CoversNode)),
            ("wide", Some(R::BadAllowedIps)),
            ("junk", Some(R::BadAllowedIps)),
            ("node-key", Some(R::DuplicateKey)),
            ("later", Some(R::OverlapsPeer)),
            ("same-key", Some(R::DuplicateKey)),
            ("bad-ep", Some(R::BadEndpoint)),
            ("zero", Some(R::BadKey)),
            ("psk", Some(R::PresharedKeyUnavailable)),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, want);
        let Verdict::Accepted(l) = &v["laptop"] else {
            panic!()
        };
        assert_eq!(l.allowed_ips, ["198.51.100.7/32".parse().unwrap()]);
        assert_eq!((l.keepalive, l.endpoint), (25, None));
    }

    #[test]
    fn the_older_peer_keeps_its_addresses_whatever_the_names() {
        let mut peers = BTreeMap::new();
        for p in [
            obj("a-new", "2026-02-01T00:00:00Z", 1, &["198.51.100.1/32"]),
            obj("z-old", "2026-01-01T00:00:00Z", 2, &["198.51.100.1/32"]),
        ] {
            peers.insert(p.name.clone(), p);
        }
        let v = select(&peers, &ctx());
        assert!(matches!(v["z-old"], Verdict::Accepted(_)));
        assert_eq!(reason(&v["a-new"]), Some(PeerRejectReason::OverlapsPeer));
    }

    #[test]
    fn plan_adds_changes_and_removes_but_leaves_a_key_a_node_took() {
        let p = |name: &str, k: u8, ip: &str| ExternalPeer {
            name: name.into(),
            public_key: PublicKey([k; 32]),
            endpoint: None,
            allowed_ips: vec![ip.parse().unwrap()],
            keepalive: 0,
            psk_secret: None,
        };
        let old: BTreeMap<String, ExternalPeer> = [
            ("a".to_string(), p("a", 1, "198.51.100.1/32")),
            ("b".to_string(), p("b", 2, "198.51.100.2/32")),
            ("c".to_string(), p("c", 3, "198.51.100.3/32")),
        ]
        .into_iter()
        .collect();
        let mut new = old.clone();
        new.remove("b");
        new.remove("c");
        new.get_mut("a").unwrap().allowed_ips = vec!["198.51.100.9/32".parse().unwrap()];
        new.insert("d".into(), p("d", 4, "198.51.100.4/32"));
        let nodes = [PublicKey([3; 32])].into_iter().collect();
        let ch = plan(&old, &BTreeMap::new(), &new, &BTreeMap::new(), &nodes);
        let summary: Vec<(u8, bool)> = ch.iter().map(|c| (c.public_key.0[0], c.remove)).collect();
        assert_eq!(summary, [(2, true), (1, false), (4, false)]);
        assert!(plan(&new, &BTreeMap::new(), &new, &BTreeMap::new(), &nodes).is_empty());

        // An unchanged Peer whose Secret now holds another key gets the new key.
        let mut e = new.clone();
        e.get_mut("d").unwrap().psk_secret = Some("s".into());
        let k = |b: u8| PresharedKey(zeroize::Zeroizing::new([b; 32]));
        let psks = BTreeMap::from([("s".to_string(), Some(k(1)))]);
        let applied = psks_of(&e, &psks);
        assert_eq!(applied.len(), 1);
        assert!(plan(&e, &applied, &e, &psks, &nodes).is_empty());
        let psks = BTreeMap::from([("s".to_string(), Some(k(2)))]);
        let ch = plan(&e, &applied, &e, &psks, &nodes);
        assert_eq!(ch.len(), 1);
        assert!(ch[0].preshared_key == Some(Some(k(2))));
    }

    #[test]
    fn the_condition_is_written_once_per_change() {
        let mut o = obj("p", "2026-01-01T00:00:00Z", 1, &["198.51.100.1/32"]);
        let v = refuse(PeerRejectReason::OverlapsCluster, "m");
        let patch = status_patch(&o, &v, "t").unwrap();
        let c = &patch["status"]["conditions"][0];
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("AllowedIPsOverlapCluster"))
        );
        o.accepted = Some(Condition {
            status: "False".into(),
            reason: "AllowedIPsOverlapCluster".into(),
            message: "m".into(),
            observed_generation: Some(1),
            last_transition_time: "t0".into(),
        });
        assert_eq!(status_patch(&o, &v, "t"), None);
        // A new generation with the same verdict: written, the transition time kept.
        o.generation = Some(2);
        let patch = status_patch(&o, &v, "t").unwrap();
        assert_eq!(patch["status"]["conditions"][0]["lastTransitionTime"], "t0");
        assert_eq!(patch["status"]["conditions"][0]["observedGeneration"], 2);
    }
}
