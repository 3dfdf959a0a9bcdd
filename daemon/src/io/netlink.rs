//! rtnetlink: links, addresses and routes of the network namespace the calling thread is in
//! (the host's, or a pod's from a thread that entered it), without running `ip`.
//!
//! Requests are batched: up to [`BATCH`] messages go to the kernel in one datagram, each with
//! its own sequence number and an acknowledgement asked for, and the answer of each is matched
//! back to it, so that 5,000 routes cost a few dozen system calls and every failure is an
//! errno for one request (not text to parse). Dumps (links, addresses, routes) are read to
//! their end. Messages are built and parsed by `netlink-packet-route`; the socket is
//! `netlink-sys`'s.

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    LinkAttribute, LinkFlags, LinkHeader, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::net::IpAddr;

/// Requests sent in one datagram (their acknowledgements, 36 bytes each, fit the socket's
/// receive buffer many times over).
pub const BATCH: usize = 256;
/// Receive buffer per `recv`: a dump part is at most about 32 KiB.
const RECV_BUF: usize = 256 * 1024;
/// The routing protocol number kwire marks its routes with (`proto 107` in `ip route`), so
/// that its own routes can be told from everyone else's after a restart. Not registered in
/// iproute2's `rt_protos`; 107 is unused there.
pub const RTPROT_KWIRE: u8 = 107;

/// What a route does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// Out of the link with this index.
    Dev(u32),
    /// Dropped silently.
    Blackhole,
    /// Dropped with ICMP destination/net unreachable (IPv6: no route) to the sender.
    Unreachable,
    /// Dropped with ICMP administratively prohibited to the sender.
    Prohibit,
}

/// A route in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpNetwork,
    pub kind: RouteKind,
    /// The route's priority (`metric`): the lower wins among routes of the same prefix.
    pub metric: u32,
    /// Preferred source address (`src`).
    pub src: Option<IpAddr>,
    /// Routing protocol number (`proto`): [`RTPROT_KWIRE`] for ours.
    pub protocol: u8,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            RouteKind::Dev(i) => write!(f, "{} dev #{i}", self.dst)?,
            RouteKind::Blackhole => write!(f, "blackhole {}", self.dst)?,
            RouteKind::Unreachable => write!(f, "unreachable {}", self.dst)?,
            RouteKind::Prohibit => write!(f, "prohibit {}", self.dst)?,
        }
        write!(f, " metric {}", self.metric)?;
        if let Some(s) = self.src {
            write!(f, " src {s}")?;
        }
        Ok(())
    }
}

/// One change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Set the link up, with this MTU if given.
    LinkUp { index: u32, mtu: Option<u32> },
    /// Set the link's transmit queue length (for a tun: the frames the kernel holds for its
    /// reader).
    LinkTxQueueLen { index: u32, len: u32 },
    /// Delete the link.
    LinkDel { index: u32 },
    /// Add the address (with its prefix) to the link, or update it if present. `nodad`: IPv6
    /// without duplicate address detection (usable at once).
    AddrReplace {
        index: u32,
        addr: IpNetwork,
        nodad: bool,
    },
    /// Remove the address from the link.
    AddrDel { index: u32, addr: IpNetwork },
    /// Add the route, or replace the one with the same prefix and metric.
    RouteReplace(Route),
    /// Add the route; fails with `EEXIST` if one with the same prefix and metric exists.
    RouteAdd(Route),
    /// Delete the route (matched by prefix, metric and kind or device).
    RouteDel(Route),
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::LinkUp { index, mtu } => {
                write!(f, "link set #{index} up")?;
                if let Some(m) = mtu {
                    write!(f, " mtu {m}")?;
                }
                Ok(())
            }
            Request::LinkTxQueueLen { index, len } => {
                write!(f, "link set #{index} txqueuelen {len}")
            }
            Request::LinkDel { index } => write!(f, "link del #{index}"),
            Request::AddrReplace { index, addr, .. } => {
                write!(f, "addr replace {addr} dev #{index}")
            }
            Request::AddrDel { index, addr } => write!(f, "addr del {addr} dev #{index}"),
            Request::RouteReplace(r) => write!(f, "route replace {r}"),
            Request::RouteAdd(r) => write!(f, "route add {r}"),
            Request::RouteDel(r) => write!(f, "route del {r}"),
        }
    }
}

/// A link as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    /// ARPHRD_NONE: a tun (layer 3, no link-layer header).
    pub layer3: bool,
}

/// An address as a dump reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpNetwork,
}

/// A netlink route socket in the namespace of the thread that opened it.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    out: Vec<u8>,
    buf: Vec<u8>,
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink {
            sock,
            seq: 0,
            out: Vec::with_capacity(64 * 1024),
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Appends one message to the outgoing datagram; returns its sequence number.
    fn push(&mut self, flags: u16, msg: RouteNetlinkMessage) -> u32 {
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let at = self.out.len();
        self.out.resize(at + m.buffer_len(), 0);
        m.serialize(&mut self.out[at..]);
        seq
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.sock.send(&self.out, 0);
        self.out.clear();
        r.map(drop)
    }

    /// Reads one datagram and calls `each` for every message in it.
    fn recv_each(
        &mut self,
        mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.buf.clear();
        self.buf.reserve(RECV_BUF);
        let cap = self.buf.capacity();
        let n = self.sock.recv(&mut self.buf, 0)?;
        if n > cap {
            return Err(protocol_error("a reply did not fit the receive buffer"));
        }
        let mut at = 0;
        while at < self.buf.len() {
            let rest = &self.buf[at..];
            if rest.len() < 16 {
                break;
            }
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                return Err(protocol_error("a reply with a bad length"));
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len])
                .map_err(|e| protocol_error(&format!("unreadable reply: {e}")))?;
            each(msg)?;
            at += (len + 3) & !3;
        }
        Ok(())
    }

    /// Sends every request, [`BATCH`] per datagram; the result of each, in order.
    pub fn execute(&mut self, requests: &[Request]) -> Vec<io::Result<()>> {
        let mut results: Vec<io::Result<()>> = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(BATCH) {
            let first = self.seq.wrapping_add(1);
            for r in chunk {
                let (flags, msg) = encode(r);
                self.push(NLM_F_REQUEST | NLM_F_ACK | flags, msg);
            }
            let mut answers: Vec<Option<io::Result<()>>> = (0..chunk.len()).map(|_| None).collect();
            if let Err(e) = self.flush() {
                results.extend(
                    chunk
                        .iter()
                        .map(|_| Err(io::Error::new(e.kind(), e.to_string()))),
                );
                continue;
            }
            let mut pending = chunk.len();
            while pending > 0 {
                let r = self.recv_each(|m| {
                    let i = m.header.sequence_number.wrapping_sub(first) as usize;
                    if let (NetlinkPayload::Error(e), Some(slot)) = (m.payload, answers.get_mut(i))
                    {
                        if slot.is_none() {
                            pending -= 1;
                        }
                        *slot = Some(match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        });
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    for a in answers.iter_mut().filter(|a| a.is_none()) {
                        *a = Some(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                    break;
                }
            }
            results.extend(
                answers
                    .into_iter()
                    .map(|a| a.unwrap_or_else(|| Err(protocol_error("no answer")))),
            );
        }
        results
    }

    /// One request; its result.
    pub fn run(&mut self, request: Request) -> io::Result<()> {
        self.execute(std::slice::from_ref(&request))
            .pop()
            .unwrap_or_else(|| Err(protocol_error("no answer")))
    }

    /// Sends a dump request and collects the messages it returns.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.push(NLM_F_REQUEST | NLM_F_DUMP, msg);
        self.flush()?;
        let mut out = Vec::new();
        let mut done = false;
        while !done {
            self.recv_each(|m| {
                if m.header.sequence_number != seq {
                    return Ok(());
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Done(_) => done = true,
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let msgs = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_of(&l)),
                _ => None,
            })
            .collect())
    }

    /// The link named `name`, if there is one.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// The link with `index`, if there is one.
    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.index == index))
    }

    /// Every address of the namespace (IPv4 and IPv6).
    pub fn addresses(&mut self) -> io::Result<Vec<Address>> {
        let msgs = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_of(&a),
                _ => None,
            })
            .collect())
    }

    /// The routes of the main table, both families.
    pub fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut all = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = fam;
            let msgs = self.dump(RouteNetlinkMessage::GetRoute(m))?;
            all.extend(msgs.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_of(&r),
                _ => None,
            }));
        }
        Ok(all)
    }

    /// The link a packet to `dst` leaves by (`ip route get`), if it is routed out of one.
    pub fn route_get(&mut self, dst: IpAddr) -> io::Result<Option<u32>> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(&dst);
        m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let seq = self.push(NLM_F_REQUEST, RouteNetlinkMessage::GetRoute(m));
        self.flush()?;
        let mut answer: Option<io::Result<Option<u32>>> = None;
        while answer.is_none() {
            self.recv_each(|m| {
                if m.header.sequence_number != seq {
                    return Ok(());
                }
                answer = Some(match m.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                        Ok(r.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Oif(i) => Some(*i),
                            _ => None,
                        }))
                    }
                    NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
                    _ => Ok(None),
                });
                Ok(())
            })?;
        }
        answer.expect("set above")
    }
}

fn link_of(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        layer3: l.header.link_layer_type == LinkLayerType::None,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            _ => {}
        }
    }
    link
}

fn address_of(a: &AddressMessage) -> Option<Address> {
    // IPv4: IFA_LOCAL is the address (IFA_ADDRESS the peer's on point-to-point links);
    // IPv6: IFA_ADDRESS, IFA_LOCAL only on point-to-point links.
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let ip = local.or(address)?;
    let addr = IpNetwork::new(ip, a.header.prefix_len).ok()?;
    Some(Address {
        index: a.header.index,
        addr,
    })
}

fn route_of(r: &RouteMessage) -> Option<Route> {
    if r.header.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let mut dst_ip: Option<IpAddr> = None;
    let mut oif = None;
    let mut metric = 0;
    let mut src = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v)) => dst_ip = Some((*v).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(v)) => dst_ip = Some((*v).into()),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::PrefSource(RouteAddress::Inet(v)) => src = Some((*v).into()),
            RouteAttribute::PrefSource(RouteAddress::Inet6(v)) => src = Some((*v).into()),
            _ => {}
        }
    }
    let dst_ip = dst_ip.unwrap_or(match r.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    let dst = IpNetwork::new(dst_ip, r.header.destination_prefix_length).ok()?;
    let kind = match r.header.kind {
        RouteType::BlackHole => RouteKind::Blackhole,
        RouteType::Unreachable => RouteKind::Unreachable,
        RouteType::Prohibit => RouteKind::Prohibit,
        RouteType::Unicast => RouteKind::Dev(oif?),
        _ => return None,
    };
    Some(Route {
        dst,
        kind,
        metric,
        src,
        protocol: u8::from(r.header.protocol),
    })
}

fn route_message(r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&r.dst.ip());
    m.header.destination_prefix_length = r.dst.prefix();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::from(r.protocol);
    let (kind, scope) = match r.kind {
        RouteKind::Dev(_) => (RouteType::Unicast, RouteScope::Link),
        RouteKind::Blackhole => (RouteType::BlackHole, RouteScope::Universe),
        RouteKind::Unreachable => (RouteType::Unreachable, RouteScope::Universe),
        RouteKind::Prohibit => (RouteType::Prohibit, RouteScope::Universe),
    };
    m.header.kind = kind;
    m.header.scope = scope;
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            r.dst.network(),
        )));
    m.attributes.push(RouteAttribute::Priority(r.metric));
    if let RouteKind::Dev(i) = r.kind {
        m.attributes.push(RouteAttribute::Oif(i));
    }
    if let Some(s) = r.src {
        m.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    m
}

fn address_message(index: u32, addr: &IpNetwork, nodad: bool) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(&addr.ip());
    m.header.prefix_len = addr.prefix();
    m.header.index = index;
    m.header.scope = AddressScope::Universe;
    if nodad {
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    m.attributes.push(AddressAttribute::Local(addr.ip()));
    m.attributes.push(AddressAttribute::Address(addr.ip()));
    m
}

/// The flags (beyond request and ack) and message of a request.
fn encode(r: &Request) -> (u16, RouteNetlinkMessage) {
    match r {
        Request::LinkUp { index, mtu } => {
            let mut m = LinkMessage::default();
            m.header = LinkHeader {
                index: *index,
                flags: LinkFlags::Up,
                change_mask: LinkFlags::Up,
                ..LinkHeader::default()
            };
            if let Some(mtu) = mtu {
                m.attributes.push(LinkAttribute::Mtu(*mtu));
            }
            (0, RouteNetlinkMessage::SetLink(m))
        }
        Request::LinkTxQueueLen { index, len } => {
            let mut m = LinkMessage::default();
            m.header.index = *index;
            m.attributes.push(LinkAttribute::TxQueueLen(*len));
            (0, RouteNetlinkMessage::SetLink(m))
        }
        Request::LinkDel { index } => {
            let mut m = LinkMessage::default();
            m.header.index = *index;
            (0, RouteNetlinkMessage::DelLink(m))
        }
        Request::AddrReplace { index, addr, nodad } => (
            NLM_F_CREATE | NLM_F_REPLACE,
            RouteNetlinkMessage::NewAddress(address_message(*index, addr, *nodad)),
        ),
        Request::AddrDel { index, addr } => (
            0,
            RouteNetlinkMessage::DelAddress(address_message(*index, addr, false)),
        ),
        Request::RouteReplace(r) => (
            NLM_F_CREATE | NLM_F_REPLACE,
            RouteNetlinkMessage::NewRoute(route_message(r)),
        ),
        Request::RouteAdd(r) => (
            NLM_F_CREATE | NLM_F_EXCL,
            RouteNetlinkMessage::NewRoute(route_message(r)),
        ),
        Request::RouteDel(r) => (0, RouteNetlinkMessage::DelRoute(route_message(r))),
    }
}

/// Whether a failed delete means the thing was already gone (`ESRCH` for routes,
/// `EADDRNOTAVAIL` for addresses, `ENODEV` for links).
pub fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV) | Some(libc::ENOENT)
    )
}

/// Whether a failed add means it is already there (`EEXIST`).
pub fn is_exists(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EEXIST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    /// Messages survive the round trip through their wire form (what the kernel parses, as
    /// `ip monitor` would show it).
    #[test]
    fn route_messages_round_trip() {
        for r in [
            Route {
                dst: n("10.244.1.0/24"),
                kind: RouteKind::Dev(7),
                metric: 100,
                src: Some("10.244.0.1".parse().unwrap()),
                protocol: RTPROT_KWIRE,
            },
            Route {
                dst: n("fd00:10:244::/56"),
                kind: RouteKind::Unreachable,
                metric: 4096,
                src: None,
                protocol: RTPROT_KWIRE,
            },
            Route {
                dst: n("10.244.0.0/16"),
                kind: RouteKind::Blackhole,
                metric: 1,
                src: None,
                protocol: RTPROT_KWIRE,
            },
        ] {
            let m = route_message(&r);
            let mut buf = vec![0u8; netlink_packet_core::Emitable::buffer_len(&m)];
            netlink_packet_core::Emitable::emit(&m, &mut buf);
            let back =
                <RouteMessage as netlink_packet_core::Parseable<[u8]>>::parse(&buf[..]).unwrap();
            let mut back_msg = back.clone();
            back_msg.header.table = RouteHeader::RT_TABLE_MAIN;
            assert_eq!(route_of(&back_msg), Some(r), "{r}");
        }
    }

    #[test]
    fn requests_say_what_they_do() {
        let r = Request::RouteReplace(Route {
            dst: n("10.244.1.0/24"),
            kind: RouteKind::Dev(3),
            metric: 100,
            src: None,
            protocol: RTPROT_KWIRE,
        });
        assert_eq!(
            r.to_string(),
            "route replace 10.244.1.0/24 dev #3 metric 100"
        );
        assert_eq!(
            Request::LinkUp {
                index: 2,
                mtu: Some(1420)
            }
            .to_string(),
            "link set #2 up mtu 1420"
        );
        assert_eq!(
            Request::LinkTxQueueLen {
                index: 2,
                len: 1000
            }
            .to_string(),
            "link set #2 txqueuelen 1000"
        );
    }
}
