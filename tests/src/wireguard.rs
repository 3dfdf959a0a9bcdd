//! WireGuard devices under test (`kwire tunnel`, wireguard-go, boringtun-cli), configured with
//! `wg` and read back with `wg show dump`.

#[allow(unused_imports)]
use crate::*;
use std::fmt::{self, Display};
use std::fs::{self};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;

/// Path of the `kwire` binary: `$KWIRE_BIN`, else `<workspace>/target/{debug,release}/kwire`
/// (respecting `$CARGO_TARGET_DIR`), the newer if both exist. Panics saying how to build it.
pub fn kwire_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KWIRE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KWIRE_BIN={} is not a file", p.display());
        return p;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| workspace.join(t))
        .unwrap_or_else(|| workspace.join("target"));
    let candidates = [target.join("debug/kwire"), target.join("release/kwire")];
    candidates
        .iter()
        .filter_map(|p| Some((fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no kwire binary: looked at {} and {}; run `cargo build -p kwire-daemon` \
                 (or `--release`) first, or set KWIRE_BIN",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// A WireGuard implementation that speaks the userspace API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// `kwire tunnel IFNAME`
    Kwire,
    /// Debian's `wireguard-go -f IFNAME`
    WireguardGo,
    /// `boringtun-cli --foreground --disable-drop-privileges IFNAME`
    Boringtun,
}

impl Impl {
    pub fn from_name(name: &str) -> Option<Impl> {
        match name.trim() {
            "kwire" => Some(Impl::Kwire),
            "wireguard-go" | "wggo" => Some(Impl::WireguardGo),
            "boringtun" | "boringtun-cli" => Some(Impl::Boringtun),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Impl::Kwire => "kwire",
            Impl::WireguardGo => "wireguard-go",
            Impl::Boringtun => "boringtun-cli",
        }
    }

    /// The command line that runs it in the foreground for `ifname`.
    pub fn argv(self, ifname: &str) -> Vec<String> {
        match self {
            Impl::Kwire => vec![
                kwire_bin().display().to_string(),
                "tunnel".into(),
                ifname.into(),
            ],
            Impl::WireguardGo => vec!["wireguard-go".into(), "-f".into(), ifname.into()],
            Impl::Boringtun => vec![
                "boringtun-cli".into(),
                "--foreground".into(),
                "--disable-drop-privileges".into(),
                ifname.into(),
            ],
        }
    }
}

impl Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A WireGuard key pair made by `wg genkey` / `wg pubkey`. `Debug` shows only the public key.
#[derive(Clone)]
pub struct Keypair {
    pub private: String,
    pub public: String,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair {{ public: {} }}", self.public)
    }
}

impl Keypair {
    pub fn generate() -> Keypair {
        let private = run_host(&["wg", "genkey"]).trim().to_string();
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run wg pubkey");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{private}\n").as_bytes())
            .expect("write key");
        let out = child.wait_with_output().expect("wg pubkey");
        let public = check_output("wg pubkey", out).trim().to_string();
        Keypair { private, public }
    }

    /// Writes the private key to `path` (0600), for `wg set IF private-key PATH`.
    pub fn write_private(&self, path: &Path) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        writeln!(f, "{}", self.private).expect("write key");
    }
}

/// One peer as `wg show IF dump` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDump {
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds; 0 = never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds; None = off.
    pub persistent_keepalive: Option<u16>,
}

/// The interface line and peers of `wg show IF dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgDump {
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerDump>,
}

impl WgDump {
    /// Parses `wg show IF dump` (tab-separated; first line the interface: private-key public-key
    /// listen-port fwmark; then per peer: public-key preshared-key endpoint allowed-ips
    /// latest-handshake transfer-rx transfer-tx persistent-keepalive). The private key is not kept.
    pub fn parse(text: &str) -> Result<WgDump, String> {
        let none = |s: &str| (s != "(none)" && s != "off" && !s.is_empty()).then(|| s.to_string());
        let num = |s: &str, what: &str| s.parse::<u64>().map_err(|e| format!("{what} {s:?}: {e}"));
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines.next().ok_or("empty dump")?;
        let f: Vec<&str> = first.split('\t').collect();
        if f.len() != 4 {
            return Err(format!(
                "interface line has {} fields, want 4: {first:?}",
                f.len()
            ));
        }
        let listen_port = num(f[2], "listen-port")? as u16;
        let fwmark = match none(f[3]) {
            None => None,
            Some(m) => Some(
                u32::from_str_radix(
                    m.trim_start_matches("0x"),
                    if m.starts_with("0x") { 16 } else { 10 },
                )
                .map_err(|e| format!("fwmark {m:?}: {e}"))?,
            ),
        };
        let mut peers = Vec::new();
        for line in lines {
            let p: Vec<&str> = line.split('\t').collect();
            if p.len() != 8 {
                return Err(format!(
                    "peer line has {} fields, want 8: {line:?}",
                    p.len()
                ));
            }
            let endpoint = match none(p[2]) {
                None => None,
                Some(e) => Some(
                    e.parse::<SocketAddr>()
                        .map_err(|err| format!("endpoint {e:?}: {err}"))?,
                ),
            };
            let allowed_ips = none(p[3])
                .map(|a| a.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default();
            peers.push(PeerDump {
                public_key: p[0].to_string(),
                preshared_key: none(p[1]),
                endpoint,
                allowed_ips,
                latest_handshake: num(p[4], "latest-handshake")?,
                rx_bytes: num(p[5], "transfer-rx")?,
                tx_bytes: num(p[6], "transfer-tx")?,
                persistent_keepalive: match none(p[7]) {
                    None => None,
                    Some(k) => Some(num(&k, "persistent-keepalive")? as u16),
                },
            });
        }
        Ok(WgDump {
            public_key: none(f[1]),
            listen_port,
            fwmark,
            peers,
        })
    }

    pub fn peer(&self, public_key: &str) -> Option<&PeerDump> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

/// A running WireGuard implementation with its tun interface in a namespace. Stopped on drop.
pub struct WgDevice {
    pub ns: Arc<Netns>,
    pub ifname: String,
    pub imp: Impl,
    pub keys: Keypair,
    pub proc: Proc,
    key_file: PathBuf,
}

impl WgDevice {
    /// Starts `imp` for interface `ns.ifname(tag)` and waits for its UAPI socket and interface;
    /// then sets a new private key. Panics with the process log if it exits or times out.
    pub fn start(ns: &Arc<Netns>, imp: Impl, tag: &str, scratch: &Scratch) -> WgDevice {
        require_tool("wg");
        let ifname = ns.ifname(tag);
        let argv = imp.argv(&ifname);
        let mut cmd = ns.command(&argv);
        // wireguard-go: no "use the kernel module" banner; harmless elsewhere.
        cmd.env("WG_PROCESS_FOREGROUND", "1");
        // Plain logs in the files printed on failure.
        cmd.env("NO_COLOR", "1");
        let proc = Proc::spawn(
            cmd,
            format!("{imp} {ifname} in {ns}"),
            scratch.file(&format!("{ifname}.log")),
        );
        let mut dev = WgDevice {
            ns: Arc::clone(ns),
            ifname: ifname.clone(),
            imp,
            keys: Keypair::generate(),
            proc,
            key_file: scratch.file(&format!("{ifname}.key")),
        };
        let sock = dev.socket_path();
        let ok = try_wait_until(DEVICE_START_TIMEOUT, || {
            !dev.proc.is_running() || (sock.exists() && ns.has_link(&ifname))
        });
        if !ok || !dev.proc.is_running() {
            panic!(
                "{imp} did not come up as {ifname} in {ns} within {:?} (exit: {:?}, socket {} exists: {}, \
                 link exists: {}); its log:\n{}",
                DEVICE_START_TIMEOUT,
                dev.proc.try_status(),
                sock.display(),
                sock.exists(),
                ns.has_link(&ifname),
                dev.proc.log()
            );
        }
        dev.keys.write_private(&dev.key_file);
        let key = dev.key_file.display().to_string();
        dev.wg_set(&["private-key", &key]);
        dev
    }

    pub fn socket_path(&self) -> PathBuf {
        Path::new(WG_SOCKET_DIR).join(format!("{}.sock", self.ifname))
    }

    /// `wg ARGS...` inside the namespace; panics unless it succeeds; stdout.
    pub fn wg(&self, args: &[&str]) -> String {
        let mut argv = vec!["wg"];
        argv.extend_from_slice(args);
        self.ns.run(&argv)
    }

    /// `wg set IF ARGS...`
    pub fn wg_set(&self, args: &[&str]) {
        let mut argv = vec!["set", self.ifname.as_str()];
        argv.extend_from_slice(args);
        self.wg(&argv);
    }

    pub fn set_listen_port(&self, port: u16) {
        self.wg_set(&["listen-port", &port.to_string()]);
    }

    /// Adds (or updates) a peer: `allowed_ips` comma-separated, `endpoint` ip:port or [ip6]:port.
    pub fn set_peer(&self, public_key: &str, endpoint: Option<&str>, allowed_ips: &str) {
        let mut args = vec!["peer", public_key, "allowed-ips", allowed_ips];
        if let Some(ep) = endpoint {
            args.extend(["endpoint", ep]);
        }
        self.wg_set(&args);
    }

    pub fn remove_peer(&self, public_key: &str) {
        self.wg_set(&["peer", public_key, "remove"]);
    }

    /// Adds the tunnel addresses (IPv6 nodad), sets the MTU, brings the interface up.
    pub fn up(&self, addrs: &[&str], mtu: u32) {
        for a in addrs {
            self.ns.add_addr(&self.ifname, a);
        }
        self.ns.link_up(&self.ifname, mtu);
    }

    /// `wg show IF dump`, parsed.
    pub fn dump(&self) -> WgDump {
        let text = self.wg(&["show", &self.ifname, "dump"]);
        WgDump::parse(&text)
            .unwrap_or_else(|e| panic!("cannot parse `wg show {} dump`: {e}\n{text}", self.ifname))
    }

    /// `wg showconf IF`
    pub fn showconf(&self) -> String {
        self.wg(&["showconf", &self.ifname])
    }

    /// True while the implementation's process runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Stops it with SIGTERM (SIGKILL after [`STOP_GRACE`]): exit status and whether SIGKILL was
    /// needed.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        self.proc.stop()
    }
}
