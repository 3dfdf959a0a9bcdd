//! Names and addresses of a lab's namespaces, interfaces and nodes, derived from the lab name
//! alone, so that `down` can find a crashed lab's leftovers without its description.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Lab name when `--name` is not given.
pub const DEFAULT_LAB_NAME: &str = "kwire";

/// Longest lab name: node names (`<lab>-n<i>`) must stay well inside a DNS label (63).
pub const MAX_LAB_NAME_LEN: usize = 40;

/// Most nodes a lab can have: node i gets 192.0.2.i, and .254 is the API stand-in.
pub const MAX_NODES: u32 = 200;

/// Underlay IPv4 network of every lab (RFC 5737 documentation range; each lab's underlay is
/// its own namespace, so labs do not conflict).
pub const UNDERLAY_V4_PREFIX: [u8; 3] = [192, 0, 2];
pub const UNDERLAY_V4_LEN: u8 = 24;
/// Prefix length of the underlay IPv6 network `2001:db8:<tag>::/64` (RFC 3849 range).
pub const UNDERLAY_V6_LEN: u8 = 64;
/// Host part of the API stand-in's address on the underlay bridge.
pub const API_HOST: u8 = 254;
/// Port the API stand-in listens on in the underlay namespace (kube-apiserver's default).
pub const API_UNDERLAY_PORT: u16 = 6443;

/// The tun device of every node's agent: the agent's default (`kwire agent --interface`), as
/// the DaemonSet passes no `--interface`; each node has its own network namespace.
pub const AGENT_INTERFACE: &str = "kwire0";

/// Host paths that are one and the same for every lab node (one kernel, one `/run/netns` for
/// all network namespaces, `/proc/sys/net` showing the namespace of whoever opens a file);
/// every other hostPath is per node, under the node's root directory.
pub const SHARED_HOST_PATHS: &[&str] = &["/dev/net/tun", "/run/netns", "/proc/sys/net"];

/// WireGuard UDP port of every agent (each in its own namespace).
pub const WIREGUARD_PORT: u16 = 51820;
/// Where each agent serves /metrics, inside its node's namespace (DESIGN.md interface 4).
pub const METRICS_ADDR: &str = "127.0.0.1:9742";

/// Cluster pod CIDRs the API stand-in allocates node podCIDRs from, as kube-controller-manager
/// does with `--cluster-cidr` and `--node-cidr-mask-size-ipv{4,6}`.
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const NODE_CIDR_MASK_V4: u8 = 24;
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
pub const NODE_CIDR_MASK_V6: u8 = 64;
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/12";
/// IPv6 ClusterIPs of dual-stack Services (kubeadm's default size).
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";

/// Why a lab name cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("lab name is empty: give `--name NAME` (lowercase letters, digits and '-')")]
    Empty,
    #[error(
        "lab name {0:?} is longer than {MAX_LAB_NAME_LEN} characters: choose a shorter `--name`"
    )]
    TooLong(String),
    #[error(
        "lab name {0:?} is not a DNS label: use lowercase letters, digits and '-', starting \
         and ending with a letter or digit"
    )]
    Invalid(String),
}

/// A checked lab name and everything named after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabNames {
    name: String,
    tag: u16,
}

impl LabNames {
    pub fn new(name: &str) -> Result<LabNames, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_LAB_NAME_LEN {
            return Err(NameError::TooLong(name.to_string()));
        }
        let ok_chars = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok_chars || name.starts_with('-') || name.ends_with('-') {
            return Err(NameError::Invalid(name.to_string()));
        }
        Ok(LabNames {
            name: name.to_string(),
            tag: tag_of(name),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// 16 bits derived from the name: in interface names (`kw<tag>...`, unique across labs on
    /// one host, since the agents' UAPI sockets share /var/run/wireguard) and in the underlay
    /// IPv6 prefix.
    pub fn tag(&self) -> u16 {
        self.tag
    }

    pub fn tag_hex(&self) -> String {
        format!("{:04x}", self.tag)
    }

    /// The underlay namespace, holding the bridge.
    pub fn underlay_netns(&self) -> String {
        format!("{}-ul", self.name)
    }

    /// Node `index`'s namespace; also its Node object's name.
    pub fn node_netns(&self, index: u32) -> String {
        format!("{}-n{index}", self.name)
    }

    /// The Kubernetes Node name of node `index` (the same as its namespace).
    pub fn node_name(&self, index: u32) -> String {
        self.node_netns(index)
    }

    /// Index of a node given as `<lab>-n3`, `n3` or `3`.
    pub fn node_index(&self, given: &str) -> Option<u32> {
        let rest = given
            .strip_prefix(&format!("{}-", self.name))
            .unwrap_or(given);
        let digits = rest.strip_prefix('n').unwrap_or(rest);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().filter(|i| (1..=MAX_NODES).contains(i))
    }

    /// True for namespaces this lab creates: `<lab>-ul`, `<lab>-n<digits>` and the pods'
    /// `<lab>-p<8 hex digits>`.
    pub fn owns_netns(&self, netns: &str) -> bool {
        let Some(rest) = netns.strip_prefix(&format!("{}-", self.name)) else {
            return false;
        };
        rest == "ul"
            || rest
                .strip_prefix('n')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            || rest.strip_prefix('p').is_some_and(|h| {
                h.len() == POD_NETNS_HASH_DIGITS
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
    }

    /// The network namespace of the pod with `uid`: `<lab>-p<hash>`, stable for the pod's life
    /// (the uid changes when a pod of the same name is created again).
    pub fn pod_netns(&self, uid: &str) -> String {
        format!("{}-p{:08x}", self.name, fnv1a(uid))
    }

    /// The bridge in the underlay namespace.
    pub fn bridge(&self) -> String {
        format!("kw{}br", self.tag_hex())
    }

    /// Node `index`'s underlay NIC (in its namespace).
    pub fn node_underlay_if(&self, index: u32) -> String {
        format!("kw{}u{index}", self.tag_hex())
    }

    /// The bridge port of node `index` (in the underlay namespace).
    pub fn bridge_port(&self, index: u32) -> String {
        format!("kw{}p{index}", self.tag_hex())
    }

    /// The agent's WireGuard tun on node `index`.
    pub fn tun_if(&self, index: u32) -> String {
        format!("kw{}n{index}", self.tag_hex())
    }

    /// True for UAPI socket file names (`IF.sock`) of this lab's tun devices.
    pub fn owns_uapi_socket(&self, file_name: &str) -> bool {
        file_name
            .strip_suffix(".sock")
            .and_then(|i| i.strip_prefix(&format!("kw{}n", self.tag_hex())))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    }

    pub fn node_underlay_v4(&self, index: u32) -> Ipv4Addr {
        let [a, b, c] = UNDERLAY_V4_PREFIX;
        Ipv4Addr::new(a, b, c, index as u8)
    }

    pub fn node_underlay_v6(&self, index: u32) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.tag, 0, 0, 0, 0, index as u16)
    }

    pub fn api_underlay_v4(&self) -> Ipv4Addr {
        let [a, b, c] = UNDERLAY_V4_PREFIX;
        Ipv4Addr::new(a, b, c, API_HOST)
    }

    pub fn api_underlay_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.tag, 0, 0, 0, 0, API_HOST as u16)
    }
}

/// Hex digits of the hash in a pod's namespace name (32 bits: collisions need ~65k pods).
pub const POD_NETNS_HASH_DIGITS: usize = 8;

/// FNV-1a, 32 bit: stable across builds and machines.
fn fnv1a(text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// FNV-1a (32 bit) folded to 16 bits.
fn tag_of(name: &str) -> u16 {
    let h = fnv1a(name);
    ((h >> 16) ^ (h & 0xffff)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(LabNames::new("kwire").is_ok());
        assert!(LabNames::new("a-1").is_ok());
        assert_eq!(LabNames::new(""), Err(NameError::Empty));
        assert!(matches!(LabNames::new("Kwire"), Err(NameError::Invalid(_))));
        assert!(matches!(LabNames::new("-a"), Err(NameError::Invalid(_))));
        assert!(matches!(LabNames::new("a_b"), Err(NameError::Invalid(_))));
        assert!(matches!(
            LabNames::new(&"a".repeat(41)),
            Err(NameError::TooLong(_))
        ));
    }

    #[test]
    fn interface_names_fit_ifnamsiz_and_differ_between_labs() {
        let a = LabNames::new(&"a".repeat(MAX_LAB_NAME_LEN)).unwrap();
        for i in [1, 9, MAX_NODES] {
            for n in [
                a.tun_if(i),
                a.bridge_port(i),
                a.node_underlay_if(i),
                a.bridge(),
            ] {
                assert!(n.len() <= 15, "{n}");
            }
        }
        let b = LabNames::new("kwire").unwrap();
        let c = LabNames::new("kwire2").unwrap();
        assert_ne!(b.tun_if(1), c.tun_if(1));
        assert_eq!(b.tag(), LabNames::new("kwire").unwrap().tag());
    }

    #[test]
    fn namespaces_and_nodes() {
        let l = LabNames::new("kwire").unwrap();
        assert_eq!(l.underlay_netns(), "kwire-ul");
        assert_eq!(l.node_netns(2), "kwire-n2");
        assert_eq!(l.node_name(2), "kwire-n2");
        assert!(l.owns_netns("kwire-ul"));
        assert!(l.owns_netns("kwire-n12"));
        assert!(!l.owns_netns("kwire-n"));
        assert!(!l.owns_netns("kwire-n1-ul"), "lab kwire-n1's namespace");
        assert!(!l.owns_netns("kwire2-n1"));
        assert!(!l.owns_netns("kwire-nx"));
        assert_eq!(l.node_index("kwire-n3"), Some(3));
        assert_eq!(l.node_index("n3"), Some(3));
        assert_eq!(l.node_index("3"), Some(3));
        assert_eq!(l.node_index("x3"), None);
        assert_eq!(l.node_index("n0"), None);
        let p = l.pod_netns("0b6f3c9e-1d2a-4c8e-9f00-123456789abc");
        assert!(
            p.starts_with("kwire-p") && p.len() == "kwire-p".len() + 8,
            "{p}"
        );
        assert_eq!(p, l.pod_netns("0b6f3c9e-1d2a-4c8e-9f00-123456789abc"));
        assert_ne!(p, l.pod_netns("another-uid"));
        assert!(l.owns_netns(&p));
        assert!(!LabNames::new("kwire2").unwrap().owns_netns(&p));
        assert!(!l.owns_netns("kwire-p12"));
        assert!(!l.owns_netns("kwire-pXXXXXXXX"));
    }

    #[test]
    fn uapi_sockets() {
        let l = LabNames::new("kwire").unwrap();
        let own = format!("{}.sock", l.tun_if(4));
        assert!(l.owns_uapi_socket(&own));
        assert!(!l.owns_uapi_socket(&l.tun_if(4)));
        assert!(!l.owns_uapi_socket("wg0.sock"));
        let other = LabNames::new("other").unwrap();
        assert!(!l.owns_uapi_socket(&format!("{}.sock", other.tun_if(4))));
    }

    #[test]
    fn addresses() {
        let l = LabNames::new("kwire").unwrap();
        assert_eq!(l.node_underlay_v4(1).to_string(), "192.0.2.1");
        assert_eq!(l.api_underlay_v4().to_string(), "192.0.2.254");
        let v6 = l.node_underlay_v6(3);
        assert_eq!(v6.segments()[..3], [0x2001, 0xdb8, l.tag()]);
        assert_eq!(v6.segments()[7], 3);
    }
}
