//! `kwire-lab probe FROM TO[:PORT[/PROTO]]`: whether a pod (or a node) reaches an address,
//! from inside the source's network namespace: a TCP connect, a UDP request that must be
//! answered, or one ICMP echo when no port is given; each within a short timeout.

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use super::serve::Protocol;

/// How long a probe waits for an answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The destination as given: a pod (`ns/name`, or `name` in `default`) or an IP, with an
/// optional port and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Pod { namespace: String, name: String },
}

/// Parses `10.244.1.5`, `10.244.1.5:80`, `[fd00::5]:53/UDP`, `fd00::5`, `default/web:80/TCP`.
pub fn parse_target(s: &str) -> Result<Target, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Target {
            host: Host::Ip(ip),
            port: None,
            protocol: None,
        });
    }
    let (host, rest) = if let Some(r) = s.strip_prefix('[') {
        let (h, rest) = r
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ']'"))?;
        let rest = match rest {
            "" => None,
            r => Some(
                r.strip_prefix(':')
                    .ok_or_else(|| format!("{s:?}: expected ':PORT' after ']'"))?,
            ),
        };
        (h, rest)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let (port, protocol) = match rest {
        None => (None, None),
        Some(p) => {
            let (port, proto) = match p.split_once('/') {
                Some((port, proto)) => (port, Some(proto.parse::<Protocol>()?)),
                None => (p, None),
            };
            let port: u16 =
                port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!("{s:?}: port {port:?} is not a number from 1 to 65535")
                })?;
            (Some(port), Some(proto.unwrap_or(Protocol::Tcp)))
        }
    };
    let host = match host.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => {
            let (namespace, name) = host.split_once('/').unwrap_or(("default", host));
            if name.is_empty() || namespace.is_empty() || name.contains('/') {
                return Err(format!(
                    "{s:?} is neither an IP nor a pod (`NAMESPACE/NAME`)"
                ));
            }
            Host::Pod {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }
        }
    };
    Ok(Target {
        host,
        port,
        protocol,
    })
}

/// What `probe --json` prints.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProbeReport {
    pub from: String,
    pub to: String,
    /// The address probed (a pod's IP when `to` named a pod).
    pub address: String,
    pub port: Option<u16>,
    /// `TCP`, `UDP` or `ICMP`.
    pub protocol: String,
    pub reachable: bool,
    pub detail: String,
}

/// Runs `f` on a thread that entered network namespace `netns` (a named one).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let path = Path::new("/var/run/netns").join(netns);
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<T> {
            let ns = File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            Ok(f())
        })
        .join()
        .expect("probe thread does not panic")
    })
}

/// Probes `addr` from inside `netns`: (reachable, detail).
pub fn probe(
    netns: &str,
    addr: IpAddr,
    port: Option<u16>,
    protocol: Protocol,
    timeout: Duration,
) -> std::io::Result<(bool, String)> {
    let Some(port) = port else {
        return ping(netns, addr, timeout);
    };
    let to = SocketAddr::new(addr, port);
    in_netns(netns, move || match protocol {
        Protocol::Tcp => match TcpStream::connect_timeout(&to, timeout) {
            Ok(s) => {
                s.set_read_timeout(Some(timeout)).ok();
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
                (true, format!("connected; answer {:?}", line.trim_end()))
            }
            Err(e) => (false, format!("connect: {e}")),
        },
        Protocol::Udp => {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("valid")
            } else {
                "[::]:0".parse().expect("valid")
            };
            let run = || -> std::io::Result<String> {
                let u = UdpSocket::bind(bind)?;
                u.set_read_timeout(Some(timeout))?;
                u.connect(to)?;
                u.send(b"probe")?;
                let mut buf = [0u8; 2048];
                let n = u.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            };
            match run() {
                Ok(a) => (true, format!("answer {a:?}")),
                Err(e) => (false, format!("no answer: {e}")),
            }
        }
    })
}

/// One ICMP echo with `ping` in `netns`.
fn ping(netns: &str, addr: IpAddr, timeout: Duration) -> std::io::Result<(bool, String)> {
    let secs = timeout.as_secs().max(1).to_string();
    let fam = if addr.is_ipv4() { "-4" } else { "-6" };
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "ping", fam, "-n", "-c1", "-W", &secs,
        ])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("bytes from") || l.contains("packets transmitted"))
        .unwrap_or("")
        .trim()
        .to_string();
    if out.status.success() {
        Ok((true, line))
    } else if out.status.code() == Some(1) {
        Ok((false, format!("no echo reply: {line}")))
    } else {
        Err(std::io::Error::other(format!(
            "ping in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        parse_target(s).unwrap()
    }

    #[test]
    fn targets() {
        assert_eq!(
            t("10.244.1.5"),
            Target {
                host: Host::Ip("10.244.1.5".parse().unwrap()),
                port: None,
                protocol: None
            }
        );
        assert_eq!(
            t("10.244.1.5:80"),
            Target {
                host: Host::Ip("10.244.1.5".parse().unwrap()),
                port: Some(80),
                protocol: Some(Protocol::Tcp)
            }
        );
        assert_eq!(t("fd00::5").host, Host::Ip("fd00::5".parse().unwrap()));
        assert_eq!(t("fd00::5").port, None);
        let v6 = t("[fd00::5]:53/udp");
        assert_eq!((v6.port, v6.protocol), (Some(53), Some(Protocol::Udp)));
        let pod = t("kube-system/dns:53/UDP");
        assert_eq!(
            pod.host,
            Host::Pod {
                namespace: "kube-system".into(),
                name: "dns".into()
            }
        );
        assert_eq!(
            t("web").host,
            Host::Pod {
                namespace: "default".into(),
                name: "web".into()
            }
        );
        assert!(parse_target("web:0").is_err());
        assert!(parse_target("web:80/SCTP").is_err());
        assert!(parse_target("[fd00::5").is_err());
        assert!(parse_target("a/b/c").is_err());
    }
}
