//! The bodies of kwire's fuzz targets, one `pub fn` each, so that the cargo-fuzz binaries
//! (`fuzz_targets/`) and a plain `cargo test` over the checked-in seed corpora (with a
//! deterministic mutation pass, no libFuzzer needed) run the same code; plus the seed writer.

#[path = "../../daemon/tests/datapath_support/mod.rs"]
mod support;

use kwire::datapath::stats::Counters;
use kwire::datapath::Ctx;
use kwire::dataplane::RxPath;
use kwire::offload::checksum::{fold, pseudo_header, sum};
use kwire::offload::gro::Coalescer;
use kwire::offload::{tso, VnetHdr, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR_LEN};
use kwire::wg::uapi::{format_get, parse_request, Request};
use kwire::wg::Device;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Instant;
use support::{NoNet, RingIo, ADDR_A, ADDR_B, INNER_A, INNER_B, KEY_A, KEY_B};

/// A target's name (as `cargo fuzz run <name>` and `corpus/<name>/` spell it) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: [Target; 10] = [
    ("uapi_parse", uapi_parse),
    ("tso_split", tso_split),
    ("gro_coalesce", gro_coalesce),
    ("rx_message", rx_message),
    ("loop_frame", loop_frame),
    ("node_peers", node_peers),
    ("policy_compile", policy_compile),
    ("cni_request", cni_request),
    ("policy_state", policy_state),
    ("service_state", service_state),
];

/// Userspace API text, split into requests as the server does (lines up to a blank line; an
/// unterminated last request is dropped as at end of stream). Each request is parsed; a `set`
/// is applied to a device, a `get` formatted. Refusals must not echo key material.
pub fn uapi_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let dev = Device::new();
    let mut lines: Vec<&str> = Vec::new();
    let mut parts = text.split('\n').peekable();
    while let Some(line) = parts.next() {
        if parts.peek().is_none() {
            break; // no terminating newline: the server never sees this line
        }
        if !line.is_empty() {
            lines.push(line);
            continue;
        }
        match parse_request(&lines) {
            Ok(Request::Get) => {
                let s = format_get(&dev.info());
                assert!(s.ends_with("errno=0\n\n"));
            }
            Ok(Request::GetPeers(keys)) => {
                let info = dev.info_of(&keys);
                assert!(info.peers.len() <= keys.len());
                assert!(format_get(&info).ends_with("errno=0\n\n"));
            }
            Ok(Request::Set(req)) => {
                let _ = dev.apply(req, &mut NoNet);
                let snap = dev.snapshot();
                assert_eq!(
                    snap.by_index.len(),
                    snap.peers.len(),
                    "one session index per peer"
                );
                assert_eq!(snap.by_key.len(), snap.peers.len(), "one key per peer");
                if let Some(own) = dev.public_key() {
                    assert!(
                        !snap.by_key.contains_key(&own.0),
                        "our own key is never a peer"
                    );
                }
            }
            Err(e) => {
                assert!(e.errno.code() < 0);
                // A key-like value (16+ hex digits) of a key line never appears in the message,
                // unless another line carries it too (an endpoint or CIDR is echoed on purpose).
                for (i, l) in lines.iter().enumerate() {
                    for k in ["private_key=", "preshared_key="] {
                        let Some(v) = l.strip_prefix(k) else { continue };
                        if v.len() < 16 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                            continue;
                        }
                        let head = &v[..16];
                        let elsewhere = lines
                            .iter()
                            .enumerate()
                            .any(|(j, o)| j != i && o.contains(head));
                        assert!(
                            elsewhere || !e.message.contains(head),
                            "error echoes a key: {}",
                            e.message
                        );
                    }
                }
            }
        }
        lines.clear();
    }
}

/// One tun frame through TSO: must not panic; every TCP segment it makes must carry valid
/// IPv4 header and TCP checksums.
pub fn tso_split(data: &[u8]) {
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 65536]);
    }
    let mut frame = data.to_vec();
    let tcp = data.len() >= VNET_HDR_LEN && matches!(data[1] & !GSO_ECN, GSO_TCPV4 | GSO_TCPV6);
    let l4 = if data.len() >= 8 {
        u16::from_le_bytes([data[6], data[7]]) as usize
    } else {
        0
    };
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        // Refusing the frame is fine; what it emits must be right.
        let _ = tso::split(&mut frame, &mut s, |p| {
            assert!(p.len() <= 65536, "segment of {} bytes", p.len());
            if tcp {
                assert!(tcp_checksum_valid(p, l4), "segment with a bad TCP checksum");
            }
        });
    });
}

fn tcp_checksum_valid(p: &[u8], l4: usize) -> bool {
    let (s, d) = if p[0] >> 4 == 6 {
        (8..24, 24..40)
    } else {
        (12..16, 16..20)
    };
    if p[0] >> 4 == 4 && fold(sum(0, &p[..l4])) != 0xffff {
        return false;
    }
    fold(sum(
        pseudo_header(&p[s], &p[d], 6, (p.len() - l4) as u32),
        &p[l4..],
    )) == 0xffff
}

/// Splits `data` into records of a 2-byte big-endian length and that many bytes (the last
/// takes what is left).
fn records(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.len() < 2 {
            return None;
        }
        let n = (u16::from_be_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
        let (r, rest) = data[2..].split_at(n);
        data = rest;
        Some(r)
    })
}

/// Encodes records for [`gro_coalesce`] and [`rx_message`] seeds.
pub fn encode_records<'a>(head: &[u8], recs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut v = head.to_vec();
    for r in recs {
        v.extend_from_slice(&(r.len() as u16).to_be_bytes());
        v.extend_from_slice(r);
    }
    v
}

/// Packets through GRO (first byte, bit 0: the tun has virtio-net headers, bit 1: it takes USO;
/// then records).
/// No panic, no packet lost or invented: each frame written, split again as the kernel would,
/// gives back as many packets as went in.
pub fn gro_coalesce(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let vnet = head & 1 == 1;
    // Bit 1: the tun takes USO, so UDP datagrams merge too.
    let mut c = Coalescer::new(8, vnet).with_udp(head & 2 == 2);
    let mut scratch = vec![0u8; 65536];
    let (mut pushed, mut out) = (0usize, 0usize);
    let mut drain = |c: &mut Coalescer, out: &mut usize| {
        c.drain(|f| {
            if !vnet {
                *out += 1;
                return;
            }
            let h = VnetHdr::decode(f[..VNET_HDR_LEN].try_into().expect("header room"));
            if h.gso_type == GSO_NONE {
                assert_eq!(
                    h,
                    VnetHdr::default(),
                    "a frame written as it came has an empty header"
                );
                *out += 1;
                return;
            }
            let mut f = f.to_vec();
            let mut n = 0;
            tso::split(&mut f, &mut scratch, |_| n += 1).expect("a merged frame splits again");
            *out += n;
        })
    };
    for p in records(rest) {
        if c.is_full() {
            drain(&mut c, &mut out);
        }
        if p.len() <= 65535 {
            pushed += 1;
        }
        c.push(p);
    }
    drain(&mut c, &mut out);
    assert_eq!(pushed, out, "packets in, packets out");
}

/// Datagrams into the receive path of device B, whose one peer is A (first byte, bit 0: B's
/// tun has virtio-net headers; then records of one flag byte, bit 0: sent from A's address,
/// bit 1: a GRO train whose segment size is the next two bytes, then a 2-byte length and the
/// bytes). No panic; the sender has no key B trusts, so nothing may reach B's tun.
pub fn rx_message(data: &[u8]) {
    rx_run(data);
}

/// [`rx_message`]'s body; returns how many datagrams the device sent back.
fn rx_run(data: &[u8]) -> usize {
    thread_local! {
        // Buffers only (drained on every `finish`); the device and its sessions are new per input.
        static PATHS: RefCell<[(RxPath, RingIo); 2]> = RefCell::new([(RxPath::new(false), RingIo::new()), (RxPath::new(true), RingIo::new())]);
    }
    let Some((&head, mut rest)) = data.split_first() else {
        return 0;
    };
    let dev = Device::new();
    support::apply_text(
        &dev,
        &support::set_request_text(&KEY_B, &KEY_A, ADDR_A, INNER_A),
    );
    let counters = Counters::default();
    let stranger: SocketAddr = "203.0.113.9:51820".parse().expect("address");
    let now = Instant::now();
    PATHS.with(|paths| {
        let mut paths = paths.borrow_mut();
        let (rx, io) = &mut paths[(head & 1) as usize];
        io.udp.clear();
        io.tun.clear();
        let snap = dev.snapshot();
        let ctx = Ctx::host_only(&snap, &counters, &dev.source_limiter, now, head & 1 != 0);
        while let Some((&flags, r)) = rest.split_first() {
            let (segment, r) = match (flags & 2 != 0, r) {
                (true, [a, b, r @ ..]) => (Some(u16::from_be_bytes([*a, *b])), r),
                (true, _) => break,
                (false, r) => (None, r),
            };
            let Some(d) = records(r).next() else { break };
            rest = &r[2 + d.len()..];
            let src = if flags & 1 != 0 { ADDR_A } else { stranger };
            rx.message(&ctx, src, d, segment, io);
        }
        rx.finish(&counters, io);
        assert!(
            io.tun.is_empty(),
            "a datagram without the key reached the tun"
        );
        assert_eq!(
            counters
                .packets_rx
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        io.udp.len()
    })
}

/// The pods of [`loop_frame`]'s node: (addresses) by slot.
const POD_IPS: [[&str; 2]; 2] = [
    ["10.244.0.2", "fd00:10:244::2"],
    ["10.244.0.3", "fd00:10:244::3"],
];
/// The policies of [`loop_frame`]: pod 1 (app=db) takes TCP 5432 from pod 0 (app=web) only;
/// pod 0 may send anywhere but UDP.
const LOOP_POLICY: &str = r#"[
 {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"default","labels":{"kubernetes.io/metadata.name":"default"}}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"default","labels":{"app":"web"}},"status":{"podIPs":[{"ip":"10.244.0.2"},{"ip":"fd00:10:244::2"}]}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"db","namespace":"default","labels":{"app":"db"}},"status":{"podIPs":[{"ip":"10.244.0.3"},{"ip":"fd00:10:244::3"}]}},
 {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"db","namespace":"default"},
  "spec":{"podSelector":{"matchLabels":{"app":"db"}},"policyTypes":["Ingress"],
   "ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"web"}}}],"ports":[{"protocol":"TCP","port":5432}]}]}},
 {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"web","namespace":"default"},
  "spec":{"podSelector":{"matchLabels":{"app":"web"}},"policyTypes":["Egress"],
   "egress":[{"ports":[{"protocol":"TCP"},{"protocol":"SCTP"}]}]}}
]"#;

/// Manifests for a [`policy_state`] seed: labelled namespaces; pods of two nodes, some
/// sharing a label set and a port list, one with two addresses, one with none, one on the host
/// network; a policy with every kind of part (ipBlock with except, namespace and pod selectors
/// with expressions, named ports, port ranges, SCTP) and a default deny. (`Manifests` refuses
/// invalid parts; the decoder's tags for them are reached by mutation.)
const POLICY_STATE_SEED: &str = r#"[
 {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a","labels":{"kubernetes.io/metadata.name":"a","team":"x"}}},
 {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"b","labels":{"kubernetes.io/metadata.name":"b"}}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"w1","namespace":"a","labels":{"app":"w"}},"spec":{"nodeName":"n1","containers":[{"name":"c","ports":[{"name":"http","containerPort":8080}]}]},"status":{"podIPs":[{"ip":"10.244.0.2"},{"ip":"fd00:10:244::2"}]}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"w2","namespace":"a","labels":{"app":"w"}},"spec":{"nodeName":"n2","containers":[{"name":"c","ports":[{"name":"http","containerPort":8080}]}]},"status":{"podIPs":[{"ip":"10.244.1.2"}]}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"db","namespace":"b","labels":{"app":"db","tier":"data"}},"spec":{"nodeName":"n1","containers":[{"name":"c","ports":[{"name":"pg","containerPort":5432}]}]},"status":{"podIPs":[{"ip":"10.244.0.3"}]}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"pending","namespace":"b","labels":{"app":"db","tier":"data"}},"spec":{"containers":[{"name":"c"}]}},
 {"apiVersion":"v1","kind":"Pod","metadata":{"name":"host","namespace":"b","labels":{"app":"agent"}},"spec":{"nodeName":"n1","hostNetwork":true,"containers":[{"name":"c"}]},"status":{"podIPs":[{"ip":"192.0.2.1"}]}},
 {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"db","namespace":"b"},
  "spec":{"podSelector":{"matchLabels":{"app":"db"},"matchExpressions":[{"key":"tier","operator":"In","values":["data","cache"]},{"key":"legacy","operator":"DoesNotExist"}]},
   "policyTypes":["Ingress","Egress"],
   "ingress":[{"from":[{"namespaceSelector":{"matchExpressions":[{"key":"team","operator":"Exists"}]},"podSelector":{"matchLabels":{"app":"w"}}},
     {"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16","10.2.0.0/16"]}},{"ipBlock":{"cidr":"fd00::/64"}}],
    "ports":[{"port":"pg"},{"protocol":"TCP","port":5432,"endPort":5440},{"protocol":"SCTP"},{"protocol":"UDP","port":53}]}],
   "egress":[{"to":[{"podSelector":{"matchExpressions":[{"key":"app","operator":"NotIn","values":["x"]}]}}]},{}]}},
 {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"deny","namespace":"a"},"spec":{"podSelector":{},"policyTypes":["Ingress"]}}
]"#;

/// Records what the loop wrote, by port.
#[derive(Default)]
struct PortIo {
    tun: Vec<(kwire::datapath::local::Port, Vec<u8>)>,
    datagrams: usize,
}

impl kwire::dataplane::Io for PortIo {
    fn write_tun(&mut self, port: kwire::datapath::local::Port, frame: &[u8]) {
        self.tun.push((port, frame.to_vec()));
    }
    fn send_udp(&mut self, batch: &mut kwire::offload::gso::TxBatch) {
        for g in batch.groups() {
            self.datagrams += g.count as usize;
        }
        batch.clear();
    }
}

/// One frame into the node's loop (first byte: bit 0 virtio-net headers, bits 1-2 where it
/// comes from: 0 the host tun, 1 pod 0, 2 pod 1; bit 3 NetworkPolicy on; then the frame).
/// Inner IPv4/IPv6/TCP/UDP/ICMP headers go through the loop's parsing, spoofing check, policy
/// and connection table, local delivery, cluster ranges, MTU and TSO. No panic; a pod's frame
/// with a source that is not its own goes nowhere; a frame handed to a pod is for that pod's
/// address, or an ICMP error back to the sender.
pub fn loop_frame(data: &[u8]) {
    use kwire::datapath::conntrack::Conntrack;
    use kwire::datapath::local::{addresses, Filter, LocalTable, PodPort, Port};
    use kwire::dataplane::TxPath;
    use std::net::IpAddr;
    use std::sync::Arc;
    thread_local! {
        static STATE: (Device, Arc<kwire::policy::PolicySet>, RefCell<TxPath>) = {
            let dev = Device::new();
            support::apply_text(&dev, &support::set_request_text(&KEY_A, &KEY_B, ADDR_B, [10, 244, 1, 0]));
            let mut m = kwire::policy::trace::Manifests::default();
            m.add_text(std::path::Path::new("loop_frame"), LOOP_POLICY).expect("policy seed");
            (dev, Arc::new(m.compile()), RefCell::new(TxPath::new()))
        };
    }
    let Some((&head, frame)) = data.split_first() else {
        return;
    };
    let vnet = head & 1 == 1;
    let from = match (head >> 1) & 3 {
        1 => Port::Pod(0),
        2 => Port::Pod(1),
        _ => Port::Host,
    };
    STATE.with(|(dev, policy, tx)| {
        let pods: Vec<PodPort<()>> = POD_IPS
            .iter()
            .enumerate()
            .map(|(i, ips)| PodPort {
                id: i as u64,
                ips: ips.iter().map(|a| a.parse().expect("address")).collect(),
                io: (),
            })
            .collect();
        let mut local = LocalTable::new(
            pods,
            vec![
                "10.244.0.1".parse().expect("a"),
                "fd00:10:244::1".parse().expect("a"),
            ],
        );
        local.mtu = Some(1420);
        local.cluster = vec![
            "10.244.0.0/16".parse().expect("c"),
            "fd00:10:244::/56".parse().expect("c"),
        ];
        if head & 8 != 0 {
            local.filter = Some(Filter {
                policy: policy.clone(),
                conntrack: Arc::new(Conntrack::with_limits(64, 8)),
            });
        }
        let snap = dev.snapshot();
        let counters = Counters::default();
        let mut io = PortIo::default();
        let mut f = frame.to_vec();
        let mut tx = tx.borrow_mut();
        let limiter = kwire::wg::ratelimit::SourceLimiter::default();
        let ctx = Ctx {
            snap: &snap,
            local: &local,
            counters: &counters,
            limiter: &limiter,
            pacer: &kwire::datapath::HOST_ONLY_PACER,
            now: Instant::now(),
            vnet,
        };
        // Twice: the second time the connection table has seen the flow.
        for _ in 0..2 {
            tx.frame(&ctx, from, &mut f.clone(), &mut io);
        }
        tx.flush(&mut io);
        f.truncate(0);
        let off = if vnet {
            kwire::offload::VNET_HDR_LEN
        } else {
            0
        };
        let src = frame.get(off..).and_then(addresses).map(|(s, _)| s);
        if let (Port::Pod(slot), Some(src)) = (from, src) {
            let own: Vec<IpAddr> = POD_IPS[slot as usize]
                .iter()
                .map(|a| a.parse().expect("a"))
                .collect();
            if !own.contains(&src) {
                assert!(
                    io.tun.is_empty() && io.datagrams == 0,
                    "a spoofed frame went somewhere"
                );
            }
        }
        for (port, out) in &io.tun {
            let Port::Pod(slot) = port else { continue };
            let dst = out.get(off..).and_then(addresses).map(|(_, d)| d);
            let own: Vec<IpAddr> = POD_IPS[*slot as usize]
                .iter()
                .map(|a| a.parse().expect("a"))
                .collect();
            let icmp_back = *port == from;
            assert!(
                icmp_back || dst.is_some_and(|d| own.contains(&d)),
                "a frame for {dst:?} was handed to pod {slot}"
            );
        }
    });
}

/// Nodes as the API would give them (records separated by a 0 byte; fields of a record by
/// newlines: name, public key, endpoint, keepalive, podCIDRs (comma-separated), addresses
/// (comma-separated)) through peer selection. No panic; every accepted peer's ranges lie in the
/// cluster ranges, overlap no other accepted peer's or this node's, and contain no Node's
/// address; every Node is either a peer, refused with a reason, or without a key.
pub fn node_peers(data: &[u8]) {
    use kwire::agent::peers::{inside, select, NodeInfo, Settings};
    use kwire_proto::key::PublicKey;
    let text = String::from_utf8_lossy(data);
    let nodes: Vec<NodeInfo> = text
        .split('\0')
        .enumerate()
        .map(|(i, rec)| {
            let f: Vec<&str> = rec.split('\n').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or("");
            let list = |i: usize| -> Vec<String> {
                get(i)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            let addresses: Vec<std::net::IpAddr> =
                list(5).iter().filter_map(|a| a.parse().ok()).collect();
            NodeInfo {
                name: get(0).to_string(),
                created: Some(i as i64),
                public_key: (!get(1).is_empty()).then(|| get(1).to_string()),
                endpoint: (!get(2).is_empty()).then(|| get(2).to_string()),
                keepalive: (!get(3).is_empty()).then(|| get(3).to_string()),
                pod_cidrs: list(4),
                internal_ips: addresses.iter().take(1).copied().collect(),
                addresses,
                ..NodeInfo::default()
            }
        })
        .collect();
    let own: Vec<ipnetwork::IpNetwork> = vec!["10.244.0.0/24".parse().expect("c")];
    let settings = Settings {
        self_name: "self".into(),
        self_key: PublicKey([1; 32]),
        default_port: 51820,
        default_keepalive: 0,
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("c"),
            "fd00:10:244::/56".parse().expect("c"),
        ],
        host_addresses: vec!["192.0.2.1".parse().expect("a")],
    };
    let sel = select(&nodes, &own, &settings);
    let all_addrs: Vec<std::net::IpAddr> = nodes
        .iter()
        .flat_map(|n| n.addresses.iter().copied())
        .chain(settings.host_addresses.iter().copied())
        .collect();
    let peers: Vec<_> = sel.peers.values().collect();
    for (i, p) in peers.iter().enumerate() {
        assert!(!p.allowed_ips.is_empty());
        for c in &p.allowed_ips {
            assert!(
                settings.cluster_cidrs.iter().any(|r| inside(c, r)),
                "{c} outside the cluster"
            );
            assert!(
                !all_addrs.iter().any(|a| c.contains(*a)),
                "{c} covers a node address"
            );
            assert!(
                !own.iter()
                    .any(|o| o.contains(c.network()) || c.contains(o.network())),
                "{c} overlaps ours"
            );
            for q in &peers[i + 1..] {
                for d in &q.allowed_ips {
                    assert!(
                        c.is_ipv4() != d.is_ipv4()
                            || !(c.contains(d.network()) || d.contains(c.network())),
                        "{c} of {} overlaps {d} of {}",
                        p.node,
                        q.node
                    );
                }
            }
        }
    }
    assert!(sel.peers.len() + sel.rejections.len() <= nodes.len());
}

/// Manifests (JSON or YAML, as `kwire policy trace` reads them) and the same objects as the
/// API would give them (k8s-openapi types), compiled, then asked for verdicts between the
/// pods and a few outside addresses. No panic; the two readings agree on every verdict.
pub fn policy_compile(data: &[u8]) {
    use kwire::policy::{PolicySet, Protocol};
    let text = String::from_utf8_lossy(data);
    let mut m = kwire::policy::trace::Manifests::default();
    if m.add_text(std::path::Path::new("fuzz"), &text).is_err() {
        return;
    }
    let mut addrs: Vec<std::net::IpAddr> = m
        .pods
        .iter()
        .flat_map(|p| p.ips.iter().copied())
        .take(8)
        .collect();
    let traced = m.compile();
    addrs.extend(
        ["10.0.0.1", "192.0.2.9", "fd00::1"]
            .iter()
            .map(|a| a.parse::<std::net::IpAddr>().expect("a")),
    );
    let protocols = [
        Protocol::from_ip_protocol(6),
        Protocol::from_ip_protocol(17),
        Protocol::from_ip_protocol(1),
    ];
    // The API's path: the same objects as k8s-openapi types.
    let docs: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(v)) => v,
        Ok(v) => vec![v],
        Err(_) => Vec::new(),
    };
    let of_kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k).cloned();
    let namespaces: Vec<_> = of_kind("Namespace")
        .filter_map(|d| serde_json::from_value(d).ok())
        .collect();
    let pods: Vec<_> = of_kind("Pod")
        .filter_map(|d| serde_json::from_value(d).ok())
        .collect();
    let policies: Vec<_> = of_kind("NetworkPolicy")
        .filter_map(|d| serde_json::from_value(d).ok())
        .collect();
    let (api, _problems) = PolicySet::from_k8s(&namespaces, &pods, &policies);
    for a in &addrs {
        for b in &addrs {
            for proto in protocols {
                for port in [0u16, 80, 5432] {
                    let e = traced.egress_verdict(*a, *b, proto, port).is_allowed();
                    let i = traced.ingress_verdict(*a, *b, proto, port).is_allowed();
                    let _ = (
                        api.egress_verdict(*a, *b, proto, port),
                        api.ingress_verdict(*a, *b, proto, port),
                    );
                    let _ = (e, i);
                }
            }
        }
    }
}

/// A CNI request as it arrives on the daemon's socket (the JSON after the length prefix),
/// decoded and answered by a CNI server over an empty state directory (no pod's netns fd, so
/// nothing touches a namespace). No panic; every answer is a CNI result or a CNI error.
pub fn cni_request(data: &[u8]) {
    use kwire::cni::{CniServer, CniServerConfig, PodAttachment, PodDataPlane};
    use std::sync::Arc;
    struct NoPods;
    impl PodDataPlane for NoPods {
        fn attach(&self, _: PodAttachment) {}
        fn detach(&self, _: &str, _: &str) {}
    }
    thread_local! {
        static SERVER: Arc<CniServer> = {
            let dir = std::env::temp_dir().join(format!("kwire-fuzz-cni-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let cfg = CniServerConfig {
                run_dir: dir.join("run"),
                state_dir: dir.join("state"),
                del_queue_dir: dir.join("queue"),
                pod_cidrs: vec!["10.244.0.0/24".parse().expect("c"), "fd00:10:244::/64".parse().expect("c")],
                mtu: 1420,
            };
            let s = CniServer::new(cfg, Arc::new(NoPods)).expect("CNI server over an empty directory");
            s.set_ready(true);
            s
        };
    }
    let Ok(req) = serde_json::from_slice::<kwire_proto::cni::Request>(data) else {
        return;
    };
    SERVER.with(|s| match s.handle(&req, None) {
        kwire_proto::cni::Response::Ok(_) => {}
        kwire_proto::cni::Response::Error(e) => assert!(e.code > 0, "an error without a code"),
    });
}

/// The bytes of the agent's saved NetworkPolicy inputs (`policy-state.bin`), read as the
/// agent reads the file at start (`policy_state::decode`, behind `load`): first as they are,
/// then as the body of a file with a valid header (magic, version and the SHA-256 of the body,
/// recomputed), so that the decoder's counts, strings, references and tags are exercised
/// rather than the checksum. An input that starts with a header (as the seeds, real files, do)
/// has it replaced. No panic; what decodes is a Folder whose snapshot can be taken, and whose
/// inputs, encoded again, decode to the same inputs: the same namespaces, pods and policies,
/// the same snapshot figures, the same pod at every address, the same verdicts.
pub fn policy_state(data: &[u8]) {
    use kwire::agent::policy_state::{decode, encode, frame, has_magic, HEADER};
    use kwire::policy::{PolicyIndex, PolicySet, Protocol};
    if let Ok(mut folder) = decode(data, "n1") {
        let _ = folder.index.snapshot();
    }
    let body = match data.get(HEADER..) {
        Some(rest) if has_magic(data) => rest,
        _ => data,
    };
    let Ok(mut first) = decode(&frame(body), "n1") else {
        return;
    };
    assert!(first.ready(), "a restored Folder is listed");
    let set = first.index.snapshot();
    let again = encode(&first.index);
    let mut second =
        decode(&again, "n1").unwrap_or_else(|e| panic!("what was read does not read back: {e}"));
    let (a, b) = (&first.index, &second.index);
    assert_eq!(a.pod_count(), b.pod_count());
    assert_eq!(a.identity_count(), b.identity_count());
    let names = |ix: &PolicyIndex| {
        let mut v: Vec<String> = ix
            .pod_names()
            .map(|(ns, n)| format!("pod {ns}/{n}"))
            .chain(ix.namespace_names().map(|n| format!("namespace {n}")))
            .chain(ix.policy_names().map(|(ns, n)| format!("policy {ns}/{n}")))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for (ns, n) in a.policy_names() {
        assert_eq!(a.policy(ns, n), b.policy(ns, n), "policy {ns}/{n}");
    }
    // Not the bytes: pods are written in the index's hash order, which differs per index.
    let set2 = second.index.snapshot();
    assert_eq!(format!("{set:?}"), format!("{set2:?}"));
    // Whatever in the body reads as an address: the same pod has it in both, and the
    // verdicts between the first few pods' addresses (and one outside) agree.
    let mut addrs: Vec<std::net::IpAddr> = vec!["192.0.2.9".parse().expect("a")];
    for (i, &b) in body.iter().enumerate() {
        let ip: std::net::IpAddr = match (b, body.get(i + 1..)) {
            (4, Some(r)) if r.len() >= 4 => <[u8; 4]>::try_from(&r[..4]).expect("4").into(),
            (6, Some(r)) if r.len() >= 16 => <[u8; 16]>::try_from(&r[..16]).expect("16").into(),
            _ => continue,
        };
        assert_eq!(set.pod_at(ip), set2.pod_at(ip), "{ip}");
        if set.pod_at(ip).is_some() && addrs.len() < 6 && !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    let verdicts = |s: &PolicySet| {
        let mut v = Vec::new();
        for &x in &addrs {
            for &y in &addrs {
                for proto in [6, 17, 132] {
                    let proto = Protocol::from_ip_protocol(proto);
                    for port in [53u16, 80, 5432, 8080] {
                        v.push(s.ingress_verdict(x, y, proto, port).is_allowed());
                        v.push(s.egress_verdict(x, y, proto, port).is_allowed());
                    }
                }
            }
        }
        v
    };
    assert_eq!(verdicts(&set), verdicts(&set2));
}

/// The bytes of the agent's saved Service inputs (`service-state.bin`), read as the agent
/// reads the file at start (`service_state::decode`, behind `load`): as they are, then as the
/// body of a file with a valid header (recomputed, as for [`policy_state`]). No panic; what
/// decodes compiles into a service table, and the views the compiler holds, encoded again,
/// decode to the same views and compile to the same table.
pub fn service_state(data: &[u8]) {
    use kwire::agent::persist::HEADER;
    use kwire::agent::service_state::{decode, encode, frame, has_magic, Views};
    use kwire::services::table::{Scope, ServiceCompiler};
    let _ = decode(data);
    let body = match data.get(HEADER..) {
        Some(rest) if has_magic(data) => rest,
        _ => data,
    };
    let Ok(views) = decode(&frame(body)) else {
        return;
    };
    let compile = |v: Views| {
        let ranges: Vec<ipnetwork::IpNetwork> = vec![
            "10.96.0.0/12".parse().expect("a"),
            "fd00:96::/108".parse().expect("b"),
        ];
        let mut c = ServiceCompiler::new(Scope::new("n1", &ranges));
        c.replace_services(v.services.into_iter().collect());
        c.replace_slices(v.slices.into_iter().collect());
        let table = c.compile().0;
        (c, table)
    };
    let (first, t1) = compile(views);
    let again = encode(first.views());
    let views2 = decode(&again).unwrap_or_else(|e| panic!("what was read does not read back: {e}"));
    let (second, t2) = compile(views2);
    assert_eq!(encode(second.views()), again, "the same views");
    assert_eq!(
        format!("{:?}", t1.steering()),
        format!("{:?}", t2.steering())
    );
    assert_eq!(
        (t1.frontends(), t1.backends()),
        (t2.frontends(), t2.backends())
    );
}

/// Seed inputs per target: real messages, captured from two in-memory devices where there is
/// a protocol (with the fixed keys `rx_message` uses, so initiations pass MAC checks).
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut v = Vec::new();
    // uapi: what `wg set` and `wg show` send, and a full request from the protocol docs.
    let set = support::set_request_text(&KEY_A, &KEY_B, ADDR_B, INNER_B);
    v.push(("uapi_parse", "wg_set", set.clone().into_bytes()));
    v.push(("uapi_parse", "wg_show", b"get=1\n\n".to_vec()));
    v.push((
        "uapi_parse",
        "set_then_get",
        format!(
            "{set}set=1\npublic_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\n\
             preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52\n\
             endpoint=[abcd:23::33%2]:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=fd00::/64\nallowed_ip=10.99.0.0/24\nprotocol_version=1\n\n\
             set=1\npublic_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\nremove=true\n\nget=1\n\n"
        )
        .into_bytes(),
    ));
    v.push((
        "uapi_parse",
        "bad_key",
        b"set=1\nprivate_key=zz41414141414141\n\n".to_vec(),
    ));

    // tso: a real TSO frame (3 segments plus a short one), and a single packet with a partial checksum.
    let mut buf = vec![0u8; 65536 + 16];
    let n = support::tso_frame(
        &mut buf,
        INNER_A,
        INNER_B,
        1000,
        1,
        3 * support::MSS as usize + 100,
    );
    v.push(("tso_split", "tcpv4_4seg", buf[..n].to_vec()));
    let mut partial = buf[..VNET_HDR_LEN + 40 + 200].to_vec();
    partial[1] = GSO_NONE;
    partial[VNET_HDR_LEN + 2..VNET_HDR_LEN + 4].copy_from_slice(&240u16.to_be_bytes());
    v.push(("tso_split", "needs_csum", partial));

    // gro: the segments that frame splits into, one flow, then two interleaved flows.
    let mut segs: Vec<Vec<u8>> = Vec::new();
    let mut scratch = vec![0u8; 65536];
    tso::split(&mut buf[..n], &mut scratch, |p| segs.push(p.to_vec())).expect("seed frame splits");
    v.push((
        "gro_coalesce",
        "one_flow_vnet",
        encode_records(&[1], segs.iter().map(Vec::as_slice)),
    ));
    let mut other = segs.clone();
    for s in &mut other {
        s[15] = 9; // another source address: another flow (checksums now wrong: kept apart)
    }
    let mixed: Vec<&[u8]> = segs
        .iter()
        .zip(&other)
        .flat_map(|(a, b)| [a.as_slice(), b.as_slice()])
        .collect();
    v.push((
        "gro_coalesce",
        "two_flows_vnet",
        encode_records(&[1], mixed.iter().copied()),
    ));
    v.push((
        "gro_coalesce",
        "plain",
        encode_records(&[0], segs.iter().map(Vec::as_slice)),
    ));

    // rx: a real handshake between A and B, captured: A's initiation, B's response, A's
    // keepalive and first data message (from another session: B must drop them).
    let mut p = support::Pair::new(false);
    let mut pkt = vec![0u8; 2048];
    let len = support::udp_packet(&mut pkt, INNER_A, INNER_B, 1, 120);
    p.a.send(&mut pkt[..len], false);
    let init = p.a.io.udp.entry(0).1.to_vec();
    support::deliver(&mut p.a, &mut p.b, Instant::now());
    let response = p.b.io.udp.entry(0).1.to_vec();
    support::deliver(&mut p.b, &mut p.a, Instant::now());
    let after: Vec<Vec<u8>> = (0..p.a.io.udp.len())
        .map(|i| p.a.io.udp.entry(i).1.to_vec())
        .collect();
    let rec = |flags: u8, d: &[u8]| {
        let mut r = vec![flags];
        r.extend_from_slice(&(d.len() as u16).to_be_bytes());
        r.extend_from_slice(d);
        r
    };
    v.push((
        "rx_message",
        "handshake_init",
        [vec![0], rec(1, &init)].concat(),
    ));
    v.push((
        "rx_message",
        "init_then_response",
        [vec![0], rec(1, &init), rec(1, &response)].concat(),
    ));
    let mut all = vec![1u8];
    all.extend(rec(1, &init));
    for d in &after {
        all.extend(rec(1, d));
    }
    v.push(("rx_message", "init_then_data", all));
    let mut gro = vec![0u8, 3];
    let seg = after.last().expect("a data message").len() as u16;
    gro.extend_from_slice(&seg.to_be_bytes());
    let train = [after.last().expect("data").as_slice(); 3].concat();
    gro.extend_from_slice(&(train.len() as u16).to_be_bytes());
    gro.extend_from_slice(&train);
    v.push(("rx_message", "data_gro_train", gro));

    // loop: pod 0 -> pod 1 TCP 5432 (allowed), UDP (denied), ICMP echo across to a peer, a
    // keyless cluster address, a spoofed source; IPv6 too; one TSO frame from the host.
    let mut frame = vec![0u8; 2048];
    let n = support::udp_packet(&mut frame, [10, 244, 0, 2], [10, 244, 0, 3], 1, 64);
    v.push((
        "loop_frame",
        "udp_pod0_to_pod1_policy",
        [&[0b1010u8][..], &frame[..n]].concat(),
    ));
    let mut tcp = frame[..n].to_vec();
    tcp[9] = 6;
    tcp[22..24].copy_from_slice(&5432u16.to_be_bytes());
    v.push((
        "loop_frame",
        "tcp_pod0_to_pod1_policy",
        [&[0b1010u8][..], &tcp[..]].concat(),
    ));
    let n = support::udp_packet(&mut frame, [10, 244, 0, 2], [10, 244, 1, 7], 1, 64);
    v.push((
        "loop_frame",
        "udp_pod0_to_peer",
        [&[0b0010u8][..], &frame[..n]].concat(),
    ));
    let n = support::udp_packet(&mut frame, [10, 244, 0, 2], [10, 244, 9, 7], 1, 64);
    v.push((
        "loop_frame",
        "udp_pod0_to_keyless",
        [&[0b0010u8][..], &frame[..n]].concat(),
    ));
    let n = support::udp_packet(&mut frame, [10, 244, 0, 9], [10, 244, 0, 3], 1, 64);
    v.push((
        "loop_frame",
        "spoofed_from_pod0",
        [&[0b0010u8][..], &frame[..n]].concat(),
    ));
    let mut echo6 = vec![0x60, 0, 0, 0, 0, 16, 58, 64];
    echo6.extend_from_slice(
        &"fd00:10:244::2"
            .parse::<std::net::Ipv6Addr>()
            .expect("a")
            .octets(),
    );
    echo6.extend_from_slice(
        &"fd00:10:244::3"
            .parse::<std::net::Ipv6Addr>()
            .expect("a")
            .octets(),
    );
    echo6.extend_from_slice(&[128, 0, 0, 0, 0x12, 0x34, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]);
    v.push((
        "loop_frame",
        "icmp6_echo_pod0_to_pod1",
        [&[0b1010u8][..], &echo6[..]].concat(),
    ));
    let mut big = vec![0u8; 65536 + 16];
    let n = support::tso_frame(
        &mut big,
        [10, 244, 0, 1],
        [10, 244, 1, 7],
        1000,
        1,
        3 * support::MSS as usize,
    );
    v.push((
        "loop_frame",
        "tso_host_to_peer",
        [&[0b0001u8][..], &big[..n]].concat(),
    ));

    // peers: a good node, one outside the cluster, one covering an address, one overlapping.
    let key = |b: u8| kwire_proto::key::PublicKey([b; 32]).to_base64();
    let recs = [
        format!(
            "n2\n{}\n192.0.2.2:51820\n\n10.244.1.0/24,fd00:10:244:1::/64\n192.0.2.2",
            key(2)
        ),
        format!("n3\n{}\n\n25\n10.99.0.0/24\n192.0.2.3", key(3)),
        format!("n4\n{}\n\n\n10.244.4.0/24\n10.244.4.9", key(4)),
        format!(
            "n5\n{}\n[2001:db8::5]:51820\nsoon\n10.244.1.128/25\n2001:db8::5",
            key(5)
        ),
        "n6\n\n\n\n10.244.6.0/24\n192.0.2.6".to_string(),
    ];
    v.push(("node_peers", "mixed", recs.join("\0").into_bytes()));

    // policy: the loop's manifests as JSON, and a YAML one with ipBlock and named ports.
    v.push((
        "policy_compile",
        "loop_policy_json",
        LOOP_POLICY.as_bytes().to_vec(),
    ));
    v.push((
        "policy_compile",
        "ipblock_yaml",
        b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: default}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}\n    ports: [{port: http, protocol: TCP}, {port: 8000, endPort: 8080}]\n  egress:\n  - to: [{namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: w, namespace: default, labels: {app: w}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\nstatus: {podIPs: [{ip: 10.244.0.5}]}\n".to_vec(),
    ));

    // policy_state: files as the agent writes them (`encode`) for small indexes: the loop's
    // manifests; namespaces with labels, pods sharing label sets, nodes and port lists (the
    // file's references), every kind of policy part; an empty index; a truncated file.
    let index_of = |text: &str| {
        use kwire::policy::{PolicyIndex, Scope};
        let mut m = kwire::policy::trace::Manifests::default();
        m.add_text(std::path::Path::new("seed"), text)
            .expect("seed manifests");
        let mut ix = PolicyIndex::new(Scope::Node("n1".into()));
        for ns in m.namespaces {
            ix.apply_namespace(ns);
        }
        for p in m.policies {
            ix.apply_policy(p);
        }
        for p in m.pods {
            ix.apply_pod(p);
        }
        ix
    };
    let encode = kwire::agent::policy_state::encode;
    let loop_file = encode(&index_of(LOOP_POLICY));
    v.push(("policy_state", "loop_policy", loop_file.clone()));
    v.push((
        "policy_state",
        "truncated",
        loop_file[..loop_file.len() - 9].to_vec(),
    ));
    v.push((
        "policy_state",
        "shared_refs_every_part",
        encode(&index_of(POLICY_STATE_SEED)),
    ));
    v.push((
        "policy_state",
        "empty",
        encode(&kwire::policy::PolicyIndex::new(kwire::policy::Scope::All)),
    ));

    // service_state: files as the agent writes them: ClusterIP, NodePort and LoadBalancer
    // Services (dual-stack, named and unnamed ports, traffic policies, affinity), slices of
    // both families with ready, serving and terminating endpoints; none; a truncated file.
    let svc_file = service_state_seed();
    v.push(("service_state", "every_kind", svc_file.clone()));
    v.push((
        "service_state",
        "truncated",
        svc_file[..svc_file.len() - 7].to_vec(),
    ));
    v.push((
        "service_state",
        "empty",
        kwire::agent::service_state::encode((Vec::new(), Vec::new())),
    ));

    // cni: what kwire-cni sends for ADD (without its fd), DEL, CHECK, STATUS and GC.
    let conf = serde_json::json!({"cniVersion": "1.1.0", "name": "kwire", "type": "kwire"});
    for (name, cmd) in [
        ("add", "ADD"),
        ("del", "DEL"),
        ("check", "CHECK"),
        ("status", "STATUS"),
    ] {
        let req = serde_json::json!({"command": cmd, "container_id": "abc123", "netns": "/var/run/netns/none",
            "ifname": "eth0", "args": [["K8S_POD_NAMESPACE", "default"], ["K8S_POD_NAME", "web"]], "config": conf});
        v.push(("cni_request", name, req.to_string().into_bytes()));
    }
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": "abc123", "ifname": "eth0"}]);
    v.push((
        "cni_request",
        "gc",
        serde_json::json!({"command": "GC", "config": gc_conf})
            .to_string()
            .into_bytes(),
    ));
    v
}

/// A `service-state.bin` of a few Services of every kind (see [`seeds`]).
fn service_state_seed() -> Vec<u8> {
    use kwire::services::model::{EndpointView, ServicePortView, SlicePortView, TCP, UDP};
    use kwire::services::{ServiceView, SliceView};
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("seed address");
    let key = |ns: &str, n: &str| (ns.to_string(), n.to_string());
    let port = |name: &str, proto, port, node_port| ServicePortView {
        name: name.into(),
        proto,
        port,
        node_port,
    };
    let ep = |a: &str, ready, terminating, node: &str| EndpointView {
        addresses: vec![ip(a)],
        ready,
        serving: ready || terminating,
        terminating,
        node_name: Some(node.into()),
    };
    let services = [
        ServiceView {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec![ip("10.96.0.10"), ip("fd00:96::10")],
            ports: vec![port("http", TCP, 80, None), port("dns", UDP, 53, None)],
            affinity_secs: 10800,
            ..Default::default()
        },
        ServiceView {
            namespace: "shop".into(),
            name: "edge".into(),
            cluster_ips: vec![ip("10.96.0.11")],
            ports: vec![port("", TCP, 443, Some(30443))],
            external_local: true,
            internal_local: true,
            lb_ips: vec![ip("203.0.113.7")],
            health_check_node_port: Some(31000),
            ..Default::default()
        },
    ];
    let slice_port = |name: &str, proto, port| SlicePortView {
        name: name.into(),
        proto,
        port,
    };
    let slices = [
        SliceView {
            namespace: "shop".into(),
            service: "web".into(),
            ports: vec![slice_port("http", TCP, 8080), slice_port("dns", UDP, 5353)],
            endpoints: vec![
                ep("10.244.1.5", true, false, "n1"),
                ep("10.244.2.5", false, true, "n2"),
                ep("10.244.2.6", false, false, "n2"),
            ],
        },
        SliceView {
            namespace: "shop".into(),
            service: "web".into(),
            ports: vec![slice_port("http", TCP, 8080)],
            endpoints: vec![ep("fd00:244:1::5", true, false, "n1")],
        },
        SliceView {
            namespace: "shop".into(),
            service: "edge".into(),
            ports: vec![slice_port("", TCP, 8443)],
            endpoints: vec![ep("10.244.3.9", true, false, "n3")],
        },
    ];
    let skeys = [key("shop", "web"), key("shop", "edge")];
    let lkeys = [
        key("shop", "web-v4"),
        key("shop", "web-v6"),
        key("shop", "edge-a"),
    ];
    kwire::agent::service_state::encode((
        skeys.iter().zip(services.iter()).collect(),
        lkeys.iter().zip(slices.iter()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .map(|p| {
                let d = std::fs::read(&p).expect("read seed");
                (p, d)
            })
            .collect();
        v.sort();
        v
    }

    /// Deterministic mutations of `seed`: byte flips, truncations, duplications, insertions.
    fn mutations(seed: &[u8], n: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed.len() as u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n).map(move |_| {
            let mut m = seed.to_vec();
            for _ in 0..1 + next() % 4 {
                let len = m.len().max(1);
                let at = (next() as usize) % len;
                match next() % 5 {
                    0 | 1 if !m.is_empty() => m[at] ^= 1 << (next() % 8),
                    2 if !m.is_empty() => m[at] = next() as u8,
                    3 => m.truncate(at),
                    _ => {
                        let b = next() as u8;
                        m.insert(at.min(m.len()), b);
                    }
                }
            }
            m
        })
    }

    #[test]
    fn seed_corpora_run_clean_with_mutations() {
        for (name, f) in TARGETS {
            let seeds = corpus(name);
            assert!(!seeds.is_empty(), "corpus/{name} is empty");
            // uapi and rx build a device per input: fewer mutations keep the test quick.
            let n = if matches!(
                name,
                "uapi_parse" | "rx_message" | "policy_compile" | "cni_request"
            ) {
                50
            } else {
                300
            };
            for (path, seed) in &seeds {
                f(seed);
                for (i, m) in mutations(seed, n).enumerate() {
                    let r = std::panic::catch_unwind(|| f(&m));
                    assert!(
                        r.is_ok(),
                        "{name}: mutation {i} of {} panicked; input {m:?}",
                        path.display()
                    );
                }
            }
        }
    }

    /// The captured initiation is one the device answers: the seeds reach past the MAC check.
    #[test]
    fn the_handshake_seed_gets_a_response() {
        let seed = std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/rx_message/handshake_init"),
        )
        .expect("seed");
        assert_eq!(rx_run(&seed), 1);
    }

    #[test]
    fn checked_in_seeds_are_current() {
        for (target, name, data) in seeds() {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("corpus")
                .join(target)
                .join(name);
            if std::env::var_os("KWIRE_WRITE_SEEDS").is_some() {
                std::fs::write(&path, &data).expect("write seed");
            } else {
                // Handshake captures differ per run (ephemeral keys); only their presence is checked.
                assert!(
                    path.exists(),
                    "missing seed {} (run with KWIRE_WRITE_SEEDS=1)",
                    path.display()
                );
            }
        }
    }
}
