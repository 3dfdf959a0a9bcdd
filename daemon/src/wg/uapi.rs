//! The WireGuard cross-platform userspace API (wireguard.com/xplatform): parsing `set=1`
//! requests and formatting `get=1` answers. Text in, text out; no I/O and no device state.
//!
//! One extension, which `wg` never sends: `get=1` followed by `public_key=` lines asks for
//! those peers only (the device's lines as for `get=1`, then each of them the device has), so
//! that one peer can be read on a node with thousands without the whole set.

use crate::wg::allowed_ips::canonical;
use crate::wg::key::{PresharedKey, PrivateKey};
use ipnetwork::IpNetwork;
use kwire_proto::key::{decode_hex32, PublicKey};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

/// The protocol's error numbers (negated errno values, as wireguard-go sends them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Io,
    Invalid,
    Protocol,
    AddrInUse,
}

impl Errno {
    pub fn code(self) -> i32 {
        match self {
            Errno::Io => -libc::EIO,
            Errno::Invalid => -libc::EINVAL,
            Errno::Protocol => -libc::EPROTO,
            Errno::AddrInUse => -libc::EADDRINUSE,
        }
    }
}

/// A refused request: the errno to answer and a message for the log (never a key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UapiError {
    pub errno: Errno,
    pub message: String,
}

impl UapiError {
    pub fn invalid(message: impl Into<String>) -> UapiError {
        UapiError {
            errno: Errno::Invalid,
            message: message.into(),
        }
    }
}

/// One request read from the socket.
#[derive(Debug)]
pub enum Request {
    Get,
    /// `get=1` for these peers only (the extension above).
    GetPeers(Vec<PublicKey>),
    Set(SetRequest),
}

/// A parsed `set=1`: applied all at once, after the whole request parsed.
#[derive(Debug, Default)]
pub struct SetRequest {
    /// `Some(None)` clears the key (all zeros).
    pub private_key: Option<Option<PrivateKey>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

#[derive(Debug)]
pub struct PeerChange {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    pub preshared_key: Option<Option<PresharedKey>>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNetwork>,
    /// The key the peer rotates to (`Some(None)`: it no longer does). Not part of the
    /// userspace API: the agent sets it from the peer's Node.
    pub next_public_key: Option<Option<PublicKey>>,
    /// The peer was known by this key and promoted its next key to `public_key`: its
    /// sessions carry on. Not part of the userspace API.
    pub renamed_from: Option<PublicKey>,
}

impl PeerChange {
    /// A change of peer `public_key` that changes nothing yet.
    pub fn new(public_key: PublicKey) -> PeerChange {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
            next_public_key: None,
            renamed_from: None,
        }
    }
}

/// Longest request accepted, in bytes: a few thousand peers with many allowed IPs.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Longest line accepted, in bytes: the longest valid one (`preshared_key=` and 64 hex digits,
/// an IPv6 endpoint with a scope) is under 100; a longer line is refused before it is read
/// whole.
pub const MAX_LINE_BYTES: usize = 4096;

/// Parses the lines of one request (without the terminating blank line).
pub fn parse_request(lines: &[&str]) -> Result<Request, UapiError> {
    match lines.first().copied() {
        Some("get=1") if lines.len() == 1 => Ok(Request::Get),
        Some("get=1") => parse_get_peers(&lines[1..]).map(Request::GetPeers),
        Some("set=1") => parse_set(&lines[1..]).map(Request::Set),
        Some(other) => Err(UapiError::invalid(format!(
            "unknown operation {:?}",
            trunc(other)
        ))),
        None => Err(UapiError::invalid("empty request")),
    }
}

/// The `public_key=` lines after a `get=1`.
fn parse_get_peers(lines: &[&str]) -> Result<Vec<PublicKey>, UapiError> {
    lines
        .iter()
        .map(|line| {
            let value = line.strip_prefix("public_key=").ok_or_else(|| {
                UapiError::invalid(format!(
                    "get=1 takes no arguments but public_key= (those peers only), not {:?}",
                    trunc(line)
                ))
            })?;
            PublicKey::from_hex(value)
                .map_err(|e| UapiError::invalid(format!("get=1: public_key: {e}")))
        })
        .collect()
}

fn trunc(s: &str) -> &str {
    // Never echo long values: they may be keys.
    let key = s.split('=').next().unwrap_or("");
    prefix(key, 40)
}

/// At most `max` bytes of `s`, cut at a character boundary (slicing inside one panics).
fn prefix(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn hex_key(key: &str, v: &str) -> Result<Zeroizing<[u8; 32]>, UapiError> {
    decode_hex32(v)
        .map(Zeroizing::new)
        .map_err(|e| UapiError::invalid(format!("{key}: {e}")))
}

fn flag(key: &str, v: &str) -> Result<bool, UapiError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(UapiError::invalid(format!("{key}: expected true or false"))),
    }
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, UapiError> {
    v.parse()
        .map_err(|_| UapiError::invalid(format!("{key}: not a valid number: {:?}", prefix(v, 20))))
}

fn parse_set(lines: &[&str]) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| UapiError::invalid(format!("line without '=': {:?}", trunc(line))))?;
        if let Some(peer) = req.peers.last_mut() {
            if key != "public_key" {
                parse_peer_key(peer, key, value)?;
                continue;
            }
        }
        match key {
            "private_key" => {
                let b = hex_key(key, value)?;
                req.private_key = Some(PrivateKey::from_bytes(*b));
            }
            "listen_port" => req.listen_port = Some(num(key, value)?),
            "fwmark" => req.fwmark = Some(num(key, value)?),
            "replace_peers" => req.replace_peers = flag(key, value)?,
            "public_key" => {
                let pk = PublicKey::from_hex(value)
                    .map_err(|e| UapiError::invalid(format!("public_key: {e}")))?;
                req.peers.push(PeerChange::new(pk));
            }
            _ => {
                return Err(UapiError::invalid(format!(
                    "unknown device key {:?}",
                    trunc(key)
                )))
            }
        }
    }
    Ok(req)
}

fn parse_peer_key(p: &mut PeerChange, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "remove" => p.remove = flag(key, value)?,
        "update_only" => p.update_only = flag(key, value)?,
        "preshared_key" => {
            let b = hex_key(key, value)?;
            p.preshared_key = Some(if *b == [0u8; 32] {
                None
            } else {
                Some(PresharedKey(b))
            });
        }
        "endpoint" => {
            let a: SocketAddr = value.parse().map_err(|_| {
                UapiError::invalid(format!(
                    "endpoint: expected IP:port or [IPv6]:port, got {:?}",
                    prefix(value, 60)
                ))
            })?;
            if a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast() {
                return Err(UapiError::invalid(format!(
                    "endpoint {a}: not a unicast address and port"
                )));
            }
            p.endpoint = Some(a);
        }
        "persistent_keepalive_interval" => p.persistent_keepalive = Some(num(key, value)?),
        "replace_allowed_ips" => p.replace_allowed_ips = flag(key, value)?,
        "allowed_ip" => {
            let n: IpNetwork = value.parse().map_err(|_| {
                UapiError::invalid(format!("allowed_ip: not a CIDR: {:?}", prefix(value, 60)))
            })?;
            p.allowed_ips.push(canonical(n));
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError {
                    errno: Errno::Protocol,
                    message: format!("protocol_version {value:?} not supported (only 1)"),
                });
            }
        }
        _ => {
            return Err(UapiError::invalid(format!(
                "unknown peer key {:?}",
                trunc(key)
            )))
        }
    }
    Ok(())
}

/// What `get=1` reports about the device.
#[derive(Debug, Default)]
pub struct DeviceInfo {
    pub private_key: Option<PrivateKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

#[derive(Debug)]
pub struct PeerInfo {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Wall-clock time of the last handshake.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNetwork>,
}

/// Formats a `get=1` answer, ending with `errno=0` and the blank line.
pub fn format_get(info: &DeviceInfo) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(256 + info.peers.len() * 256));
    if let Some(k) = &info.private_key {
        s.push_str("private_key=");
        s.push_str(&k.expose_hex());
        s.push('\n');
    }
    let _ = writeln!(s, "listen_port={}", info.listen_port);
    if info.fwmark != 0 {
        let _ = writeln!(s, "fwmark={}", info.fwmark);
    }
    for p in &info.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex());
        if let Some(psk) = &p.preshared_key {
            s.push_str("preshared_key=");
            s.push_str(&Zeroizing::new(kwire_proto::key::encode_hex(&psk.0[..])));
            s.push('\n');
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let d = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO);
        let _ = writeln!(s, "last_handshake_time_sec={}", d.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", d.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for n in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={n}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

/// The answer to a `set=1`, or to a refused request.
pub fn format_errno(r: Result<(), Errno>) -> String {
    format!("errno={}\n\n", r.err().map_or(0, Errno::code))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";

    #[test]
    fn parses_a_full_set() {
        let lines = [
            "set=1",
            "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a",
            "fwmark=0",
            "listen_port=12912",
            "replace_peers=true",
            "public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33",
            "preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52",
            "replace_allowed_ips=true",
            "allowed_ip=192.168.4.4/32",
            "endpoint=[abcd:23::33%2]:51820",
            "public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376",
            "replace_allowed_ips=true",
            "allowed_ip=192.168.4.6/32",
            "persistent_keepalive_interval=111",
            "endpoint=182.122.22.19:3233",
            "public_key=662e14fd594556f522604703340351258903b64f35553763f19426ab2a515c58",
            "endpoint=5.152.198.39:51820",
            "replace_allowed_ips=true",
            "allowed_ip=192.168.4.10/32",
            "allowed_ip=192.168.4.11/32",
            "public_key=e818b58db5274087fcc1be5dc728cf53d3b5726b4cef6b9bab8f8f8c2452c25c",
            "remove=true",
            "protocol_version=1",
        ];
        let Request::Set(r) = parse_request(&lines).unwrap() else {
            panic!()
        };
        assert!(matches!(r.private_key, Some(Some(_))));
        assert_eq!(r.listen_port, Some(12912));
        assert_eq!(r.fwmark, Some(0));
        assert!(r.replace_peers);
        assert_eq!(r.peers.len(), 4);
        assert_eq!(r.peers[1].persistent_keepalive, Some(111));
        assert_eq!(r.peers[2].allowed_ips.len(), 2);
        assert!(r.peers[3].remove);
        assert!(r.peers[0].preshared_key.as_ref().unwrap().is_some());
    }

    #[test]
    fn refuses_bad_requests_with_the_right_errno() {
        let bad: &[(&[&str], Errno)] = &[
            (&[], Errno::Invalid),
            (&["frobnicate=1"], Errno::Invalid),
            (&["set=1", "listen_port=70000"], Errno::Invalid),
            (&["set=1", "private_key=zz"], Errno::Invalid),
            (&["set=1", "nonsense"], Errno::Invalid),
            (&["set=1", "public_key=00"], Errno::Invalid),
            (
                &["set=1", &format!("public_key={PK}"), "endpoint=nowhere"],
                Errno::Invalid,
            ),
            (
                &["set=1", &format!("public_key={PK}"), "endpoint=0.0.0.0:1"],
                Errno::Invalid,
            ),
            (
                &[
                    "set=1",
                    &format!("public_key={PK}"),
                    "allowed_ip=10.0.0.0/33",
                ],
                Errno::Invalid,
            ),
            (
                &["set=1", &format!("public_key={PK}"), "protocol_version=2"],
                Errno::Protocol,
            ),
            (
                &["set=1", &format!("public_key={PK}"), "listen_port=1"],
                Errno::Invalid,
            ),
            (&["set=1", "replace_peers=yes"], Errno::Invalid),
            (&["get=1", "x=y"], Errno::Invalid),
            (&["get=1", "public_key=00"], Errno::Invalid),
            (
                &["get=1", &format!("public_key={PK}"), "endpoint=192.0.2.1:1"],
                Errno::Invalid,
            ),
        ];
        for (lines, errno) in bad {
            let e = parse_request(lines).unwrap_err();
            assert_eq!(e.errno, *errno, "{lines:?}: {e}");
        }
    }

    /// Found by `fuzz/` (uapi_parse): echoes were cut at a byte count, inside a character.
    #[test]
    fn echoes_are_cut_at_character_boundaries() {
        let long = "\u{88}".repeat(30);
        for line in [
            long.clone(),
            format!("listen_port=1{long}"),
            format!("x{long}=1"),
        ] {
            assert!(parse_request(&["set=1", &line]).is_err());
        }
        for key in ["endpoint", "allowed_ip", "persistent_keepalive_interval"] {
            assert!(parse_request(&[
                "set=1",
                &format!("public_key={PK}"),
                &format!("{key}=1{long}")
            ])
            .is_err());
        }
        assert!(parse_request(&[&format!("x{long}")]).is_err());
    }

    #[test]
    fn errors_never_echo_key_material() {
        let secretish = "41".repeat(31) + "zz";
        let e = parse_request(&["set=1", &format!("private_key={secretish}")]).unwrap_err();
        assert!(!e.message.contains("4141"), "{}", e.message);
    }

    #[test]
    fn formats_get() {
        let info = DeviceInfo {
            private_key: PrivateKey::from_bytes([1; 32]),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![PeerInfo {
                public_key: PublicKey([2; 32]),
                preshared_key: None,
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                last_handshake: Some(UNIX_EPOCH + Duration::new(1700000000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
                persistent_keepalive: 25,
                allowed_ips: vec!["10.99.0.2/32".parse().unwrap()],
            }],
        };
        let s = format_get(&info);
        assert_eq!(
            s.as_str(),
            format!(
                "private_key={}\nlisten_port=51820\npublic_key={}\nprotocol_version=1\nendpoint=192.0.2.2:51820\n\
                 last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
                 persistent_keepalive_interval=25\nallowed_ip=10.99.0.2/32\nerrno=0\n\n",
                "01".repeat(32),
                "02".repeat(32)
            )
        );
        assert_eq!(format_errno(Err(Errno::Invalid)), "errno=-22\n\n");
    }
}
