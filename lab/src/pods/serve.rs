//! `kwire-lab pod-serve`: the small server each lab pod runs in its namespace. It answers on
//! the ports the pod's containers declare: a TCP connection gets one line with the pod's name
//! and the client's address as the pod sees it (`NAME from ADDRESS`: what a Service's
//! translation kept of the client) and is closed; a UDP datagram is echoed back after the pod's name. Sockets are dual-stack
//! (`[::]:PORT`), so IPv4 and IPv6 both reach it.

use std::fmt;
use std::io::Write as _;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;

/// The port when a pod declares none: 80, over TCP and UDP.
pub const DEFAULT_PORT: u16 = 80;

/// Largest UDP request answered, in bytes.
const MAX_DATAGRAM_BYTES: usize = 2048;

/// What `pod-serve` prints on stdout once every socket is bound (the supervisor waits for it).
pub const READY_LINE: &str = "ready";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            _ => Err(format!("protocol {s:?} is not TCP or UDP")),
        }
    }
}

/// One port a pod serves: `80/TCP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodPort {
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for PodPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

impl FromStr for PodPort {
    type Err = String;
    fn from_str(s: &str) -> Result<PodPort, String> {
        let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {port:?} is not a number from 1 to 65535"))?;
        Ok(PodPort {
            port,
            protocol: proto.parse()?,
        })
    }
}

/// Parses `80/TCP,81/UDP` (protocol defaults to TCP).
pub fn parse_ports(s: &str) -> Result<Vec<PodPort>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse())
        .collect()
}

pub fn format_ports(ports: &[PodPort]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The TCP and UDP ports a Pod's containers declare (`spec.containers[].ports[]`, SCTP
/// skipped); 80/TCP and 80/UDP when there are none.
pub fn declared_ports(pod: &serde_json::Value) -> Vec<PodPort> {
    let mut ports: Vec<PodPort> = pod
        .pointer("/spec/containers")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| {
            let port = u16::try_from(p["containerPort"].as_u64()?).ok()?;
            let protocol = p["protocol"].as_str().unwrap_or("TCP").parse().ok()?;
            (port != 0).then_some(PodPort { port, protocol })
        })
        .collect();
    ports.sort();
    ports.dedup();
    if ports.is_empty() {
        ports = vec![
            PodPort {
                port: DEFAULT_PORT,
                protocol: Protocol::Tcp,
            },
            PodPort {
                port: DEFAULT_PORT,
                protocol: Protocol::Udp,
            },
        ];
    }
    ports
}

/// The answer to a UDP datagram: the pod's name, a space, the request.
pub fn udp_answer(pod: &str, request: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(pod.len() + 1 + request.len());
    a.extend_from_slice(pod.as_bytes());
    a.push(b' ');
    a.extend_from_slice(request);
    a
}

/// An address as its family spells it (the dual-stack socket sees IPv4 clients as
/// `::ffff:a.b.c.d`).
fn unmapped(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// Binds every port, prints [`READY_LINE`], then serves until killed.
pub fn serve(pod: &str, ports: &[PodPort]) -> std::io::Result<()> {
    let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
    let mut threads = Vec::new();
    for p in ports {
        let addr = SocketAddr::new(any.ip(), p.port);
        let name = pod.to_string();
        match p.protocol {
            Protocol::Tcp => {
                let l = TcpListener::bind(addr)?;
                threads.push(std::thread::spawn(move || {
                    for mut s in l.incoming().flatten() {
                        let _ = match s.peer_addr() {
                            Ok(peer) => writeln!(s, "{name} from {}", unmapped(peer.ip())),
                            Err(_) => writeln!(s, "{name}"),
                        };
                    }
                }));
            }
            Protocol::Udp => {
                let u = UdpSocket::bind(addr)?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; MAX_DATAGRAM_BYTES];
                    while let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&udp_answer(&name, &buf[..n]), from);
                    }
                }));
            }
        }
    }
    println!("{READY_LINE}");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ports_parse_and_print() {
        let p = parse_ports("80/TCP,81/udp,82").unwrap();
        assert_eq!(format_ports(&p), "80/TCP,81/UDP,82/TCP");
        assert!(parse_ports("0/TCP").is_err());
        assert!(parse_ports("80/SCTP").is_err());
        assert!(parse_ports("x").is_err());
    }

    #[test]
    fn declared_ports_default_to_80_tcp_and_udp() {
        let none = json!({"spec": {"containers": [{"name": "c"}]}});
        assert_eq!(format_ports(&declared_ports(&none)), "80/TCP,80/UDP");
        let some = json!({"spec": {"containers": [
            {"name": "a", "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]},
            {"name": "b", "ports": [{"containerPort": 9, "protocol": "SCTP"}, {"containerPort": 8080, "protocol": "TCP"}]},
        ]}});
        assert_eq!(format_ports(&declared_ports(&some)), "53/UDP,8080/TCP");
    }

    #[test]
    fn serves_tcp_and_udp_on_loopback() {
        // Ephemeral ports: find two free ones first.
        let t = TcpListener::bind("[::1]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let u = UdpSocket::bind("[::1]:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ports = vec![
            PodPort {
                port: t,
                protocol: Protocol::Tcp,
            },
            PodPort {
                port: u,
                protocol: Protocol::Udp,
            },
        ];
        std::thread::spawn(move || serve("default/web", &ports));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let line = loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", t)) {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
                break line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(line, "default/web from 127.0.0.1\n");
        // The UDP socket may be bound after the TCP one: send again until it answers.
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = loop {
            c.send_to(b"hi", ("127.0.0.1", u)).unwrap();
            if let Ok(n) = c.recv(&mut buf) {
                break n;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no UDP answer from the server"
            );
        };
        assert_eq!(&buf[..n], b"default/web hi");
    }
}
