//! The index's inputs as compact bytes, and back: what the agent saves so that a restart
//! enforces the last known NetworkPolicy before the API answers (the agent's `policy_state`
//! module adds the file header, version and checksum).
//!
//! Written from the index's own store (no second copy of the objects is kept for it) and read
//! straight back into an index, without k8s objects or JSON in between:
//! - Pods are grouped by namespace. A pod refers to its label set (its identity, shared by the
//!   pods of one template) by a number, and to its node and named container ports by a number
//!   defined at first use; addresses are 4 or 16 bytes.
//! - Namespaces carry their labels when a Namespace object gave them.
//! - Policies are written as the index holds them (defaults applied, invalid parts kept as
//!   matching nothing), so a policy read back equals the one saved, and the API's copy of it
//!   folds later as "unchanged".
//!
//! Integers are LEB128 varints, strings are a length and UTF-8 bytes. Every count is checked
//! against the bytes left before anything is allocated, and no list reserves more memory than
//! the bytes left ([`Reader::list`]); malformed input is an error, never a panic. Any change
//! to what is written here must change the agent's format version (the
//! `saved_tests::the_encoding_is_pinned` test fails until it is looked at).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::ipset::Cidr;
use super::model::ContainerPort;
use super::selector::{LabelSelector, Requirement};
use super::spec::{IpBlock, Peer, Policy, PortMatch, PortSpec, Rule};
use super::Protocol;

/// Saved bytes that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct SavedError {
    pub what: &'static str,
    pub at: usize,
}

/// Appends the encoding (see the module documentation).
#[derive(Default)]
pub(super) struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    pub fn byte(&mut self, b: u8) {
        self.buf.push(b);
    }

    pub fn str(&mut self, s: &str) {
        self.uint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    pub fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.buf.push(4);
                self.buf.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                self.buf.push(6);
                self.buf.extend_from_slice(&a.octets());
            }
        }
    }

    pub fn labels(&mut self, labels: &BTreeMap<String, String>) {
        self.uint(labels.len() as u64);
        for (k, v) in labels {
            self.str(k);
            self.str(v);
        }
    }

    fn selector(&mut self, sel: &LabelSelector) {
        self.uint(sel.requirements.len() as u64);
        for r in &sel.requirements {
            match r {
                Requirement::In { key, values } | Requirement::NotIn { key, values } => {
                    self.byte(if matches!(r, Requirement::In { .. }) {
                        0
                    } else {
                        1
                    });
                    self.str(key);
                    self.uint(values.len() as u64);
                    for v in values {
                        self.str(v);
                    }
                }
                Requirement::Exists { key } => {
                    self.byte(2);
                    self.str(key);
                }
                Requirement::DoesNotExist { key } => {
                    self.byte(3);
                    self.str(key);
                }
            }
        }
    }

    fn cidr(&mut self, c: &Cidr) {
        self.ip(c.addr());
        self.byte(c.prefix());
    }

    fn rules(&mut self, rules: Option<&[Rule]>) {
        let Some(rules) = rules else {
            self.byte(0);
            return;
        };
        self.byte(1);
        self.uint(rules.len() as u64);
        for rule in rules {
            match &rule.peers {
                None => self.byte(0),
                Some(peers) => {
                    self.byte(1);
                    self.uint(peers.len() as u64);
                    for peer in peers {
                        match peer {
                            Peer::Invalid => self.byte(0),
                            Peer::Pods { namespaces, pods } => {
                                self.byte(1);
                                match namespaces {
                                    None => self.byte(0),
                                    Some(sel) => {
                                        self.byte(1);
                                        self.selector(sel);
                                    }
                                }
                                self.selector(pods);
                            }
                            Peer::IpBlock(b) => {
                                self.byte(2);
                                self.cidr(&b.cidr);
                                self.uint(b.except.len() as u64);
                                for c in &b.except {
                                    self.cidr(c);
                                }
                            }
                        }
                    }
                }
            }
            self.uint(rule.ports.len() as u64);
            for p in &rule.ports {
                self.protocol(p.protocol);
                match &p.port {
                    PortMatch::All => self.byte(0),
                    PortMatch::Range(lo, hi) => {
                        self.byte(1);
                        self.uint(u64::from(*lo));
                        self.uint(u64::from(*hi));
                    }
                    PortMatch::Named(n) => {
                        self.byte(2);
                        self.str(n);
                    }
                    PortMatch::Invalid => self.byte(3),
                }
            }
        }
    }

    fn protocol(&mut self, p: Protocol) {
        self.byte(match p {
            Protocol::Tcp => Protocol::IPPROTO_TCP,
            Protocol::Udp => Protocol::IPPROTO_UDP,
            Protocol::Sctp => Protocol::IPPROTO_SCTP,
            Protocol::Other(n) => n,
        });
    }

    /// A policy of a namespace (the namespace is the enclosing one).
    pub fn policy(&mut self, p: &Policy) {
        self.str(&p.name);
        self.selector(&p.pod_selector);
        self.rules(p.ingress.as_deref());
        self.rules(p.egress.as_deref());
    }

    /// A list of named container ports.
    pub fn ports(&mut self, ports: &[ContainerPort]) {
        self.uint(ports.len() as u64);
        for p in ports {
            self.str(p.name.as_deref().unwrap_or_default());
            self.uint(u64::from(p.port));
            self.protocol(p.protocol);
        }
    }
}

/// Reads what [`Writer`] wrote; every read checks the bytes left.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn err(&self, what: &'static str) -> SavedError {
        SavedError { what, at: self.pos }
    }

    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    pub fn byte(&mut self) -> Result<u8, SavedError> {
        let b = *self.buf.get(self.pos).ok_or(self.err("ends early"))?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], SavedError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(self.err("ends early"))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    pub fn uint(&mut self) -> Result<u64, SavedError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("integer too long"))
    }

    /// A count of items that take at least one byte each: never more than the bytes left. Make
    /// the list for them with [`Reader::list`], not `Vec::with_capacity(count)`.
    pub fn count(&mut self) -> Result<usize, SavedError> {
        let n = self.uint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len() - self.pos)
            .ok_or(self.err("count larger than the data"))
    }

    /// An empty list for `n` items (a [`Reader::count`]) with room for as many as fit in the
    /// bytes left, at most `n`: a corrupt or hostile count reserves no more memory than the
    /// input has bytes (items are larger in memory than in the file, up to tens of times, and
    /// lists nest); a list of real items grows as they are read.
    pub fn list<T>(&self, n: usize) -> Vec<T> {
        let left = self.buf.len() - self.pos;
        Vec::with_capacity(n.min(left / std::mem::size_of::<T>().max(1)))
    }

    pub fn str(&mut self) -> Result<&'a str, SavedError> {
        let n = self.count()?;
        let at = self.pos;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| SavedError {
            what: "text is not UTF-8",
            at,
        })
    }

    fn flag(&mut self) -> Result<bool, SavedError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.err("bad flag")),
        }
    }

    pub fn ip(&mut self) -> Result<IpAddr, SavedError> {
        match self.byte()? {
            4 => {
                let b: [u8; 4] = self.bytes(4)?.try_into().expect("4 bytes");
                Ok(IpAddr::V4(Ipv4Addr::from(b)))
            }
            6 => {
                let b: [u8; 16] = self.bytes(16)?.try_into().expect("16 bytes");
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => Err(self.err("bad address family")),
        }
    }

    pub fn labels(&mut self) -> Result<BTreeMap<String, String>, SavedError> {
        let n = self.count()?;
        let mut labels = BTreeMap::new();
        for _ in 0..n {
            let k = self.str()?.to_string();
            let v = self.str()?.to_string();
            labels.insert(k, v);
        }
        Ok(labels)
    }

    fn u16(&mut self) -> Result<u16, SavedError> {
        let v = self.uint()?;
        u16::try_from(v).map_err(|_| self.err("port out of range"))
    }

    fn protocol(&mut self) -> Result<Protocol, SavedError> {
        Ok(Protocol::from_ip_protocol(self.byte()?))
    }

    fn selector(&mut self) -> Result<LabelSelector, SavedError> {
        let n = self.count()?;
        let mut requirements = self.list(n);
        for _ in 0..n {
            let tag = self.byte()?;
            let key = self.str()?.to_string();
            requirements.push(match tag {
                0 | 1 => {
                    let m = self.count()?;
                    let mut values = self.list(m);
                    for _ in 0..m {
                        values.push(self.str()?.to_string());
                    }
                    if tag == 0 {
                        Requirement::In { key, values }
                    } else {
                        Requirement::NotIn { key, values }
                    }
                }
                2 => Requirement::Exists { key },
                3 => Requirement::DoesNotExist { key },
                _ => return Err(self.err("bad selector requirement")),
            });
        }
        Ok(LabelSelector { requirements })
    }

    fn cidr(&mut self) -> Result<Cidr, SavedError> {
        let addr = self.ip()?;
        let prefix = self.byte()?;
        Cidr::new(addr, prefix).ok_or(self.err("bad prefix length"))
    }

    fn rules(&mut self) -> Result<Option<Vec<Rule>>, SavedError> {
        if !self.flag()? {
            return Ok(None);
        }
        let n = self.count()?;
        let mut rules = self.list(n);
        for _ in 0..n {
            let peers = if self.flag()? {
                let m = self.count()?;
                let mut peers = self.list(m);
                for _ in 0..m {
                    peers.push(match self.byte()? {
                        0 => Peer::Invalid,
                        1 => {
                            let namespaces = match self.flag()? {
                                true => Some(self.selector()?),
                                false => None,
                            };
                            Peer::Pods {
                                namespaces,
                                pods: self.selector()?,
                            }
                        }
                        2 => {
                            let cidr = self.cidr()?;
                            let k = self.count()?;
                            let mut except = self.list(k);
                            for _ in 0..k {
                                except.push(self.cidr()?);
                            }
                            Peer::IpBlock(IpBlock { cidr, except })
                        }
                        _ => return Err(self.err("bad peer")),
                    });
                }
                Some(peers)
            } else {
                None
            };
            let m = self.count()?;
            let mut ports = self.list(m);
            for _ in 0..m {
                let protocol = self.protocol()?;
                let port = match self.byte()? {
                    0 => PortMatch::All,
                    1 => PortMatch::Range(self.u16()?, self.u16()?),
                    2 => PortMatch::Named(self.str()?.to_string()),
                    3 => PortMatch::Invalid,
                    _ => return Err(self.err("bad port entry")),
                };
                ports.push(PortSpec { protocol, port });
            }
            rules.push(Rule { peers, ports });
        }
        Ok(Some(rules))
    }

    /// A policy of namespace `namespace`.
    pub fn policy(&mut self, namespace: &str) -> Result<Policy, SavedError> {
        let name = self.str()?.to_string();
        if name.is_empty() {
            return Err(self.err("policy without a name"));
        }
        Ok(Policy {
            namespace: namespace.to_string(),
            name,
            pod_selector: self.selector()?,
            ingress: self.rules()?,
            egress: self.rules()?,
        })
    }

    pub fn ports(&mut self) -> Result<Vec<ContainerPort>, SavedError> {
        let n = self.count()?;
        let mut ports = self.list(n);
        for _ in 0..n {
            let name = self.str()?.to_string();
            ports.push(ContainerPort {
                name: Some(name),
                port: self.u16()?,
                protocol: self.protocol()?,
            });
        }
        Ok(ports)
    }
}

/// Numbers for shared values (nodes, port lists) in the order they are first written, keyed
/// by the address of the index's one shared copy. Each value numbered is held here, so that
/// its address cannot be reused by another value while a save that releases the index between
/// namespaces ([`super::InputsSave`]) goes on.
pub(super) struct FirstUse<T: ?Sized> {
    ids: HashMap<usize, u64>,
    held: Vec<Arc<T>>,
}

impl<T: ?Sized> Default for FirstUse<T> {
    fn default() -> Self {
        FirstUse {
            ids: HashMap::new(),
            held: Vec::new(),
        }
    }
}

impl<T: ?Sized> FirstUse<T> {
    /// `Ok(id)` for a value written before, `Err(id)` for a new one (write it after the
    /// reference).
    pub fn id(&mut self, shared: &Arc<T>) -> Result<u64, u64> {
        let next = self.ids.len() as u64;
        match self.ids.entry(Arc::as_ptr(shared) as *const u8 as usize) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                self.held.push(shared.clone());
                Err(*e.insert(next))
            }
        }
    }
}

/// A reference written by [`FirstUse`]: `0` then the value for a new one, `1 + id` for one
/// written before. Returns the table index.
pub(super) fn read_ref<T>(
    r: &mut Reader<'_>,
    table: &mut Vec<T>,
    read_new: impl FnOnce(&mut Reader<'_>) -> Result<T, SavedError>,
) -> Result<usize, SavedError> {
    match r.uint()? {
        0 => {
            let v = read_new(r)?;
            table.push(v);
            Ok(table.len() - 1)
        }
        n => {
            let i = usize::try_from(n - 1).unwrap_or(usize::MAX);
            if i < table.len() {
                Ok(i)
            } else {
                Err(r.err("reference to an undefined entry"))
            }
        }
    }
}

/// Writes a [`FirstUse`] reference, with `write_new` writing the value the first time.
pub(super) fn write_ref<T: ?Sized>(
    w: &mut Writer,
    ids: &mut FirstUse<T>,
    shared: &Arc<T>,
    write_new: impl FnOnce(&mut Writer),
) {
    match ids.id(shared) {
        Ok(id) => w.uint(id + 1),
        Err(_) => {
            w.uint(0);
            write_new(w);
        }
    }
}
