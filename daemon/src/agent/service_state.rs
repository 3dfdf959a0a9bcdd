//! The last Service inputs, saved beside the state file so that a restarted agent translates
//! ClusterIPs, node ports and LoadBalancer IPs before the API answers (and while it does not):
//! without them a pod's DNS (a ClusterIP) would fail until the Service lists arrive.
//!
//! What is saved is read from the service loop's own
//! [`ServiceCompiler`](crate::services::table::ServiceCompiler) (no second copy is
//! kept for it): every stripped Service and EndpointSlice view it holds, by key, in postcard's
//! compact encoding, behind the header of [`super::persist::Format`] (magic, format version,
//! checksum). [`super::persist::Persist`] writes it: atomically, mode 0600, only once both lists
//! were read in full, at most every [`super::persist::SAVE_INTERVAL`] while a view changes
//! (less often when a write is slow), and at graceful shutdown.
//!
//! At start [`restore`] reads the views back, compiles the table and swaps it in (with the
//! node-port steering) before any pod is re-attached; the first real lists replace the views
//! (only those that differ are recompiled). A missing, corrupt or other-version file restores
//! nothing: `/readyz` then waits for the lists, and until they arrive a pod's flow to a
//! ClusterIP goes nowhere (the host routes the Service range back into the tun, where the
//! loop drops it as `no_peer`; the host firewall keeps the range off every other interface).

use super::persist::{self, Format, Inputs, LoadError, Persist};
use super::pod_network::Firewall;
use super::services::{self, State};
use crate::dataplane::ports::Pods;
use crate::services::model::{SCTP, TCP, UDP};
use crate::services::table::{ObjectKey, ViewsRef};
use crate::services::{ServiceView, SliceView};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tracing::{info, warn};

pub use super::services::Shared;

/// Name of the file inside the state directory.
pub const SERVICE_STATE_FILE: &str = "service-state.bin";
/// Format version written; files of another version are not restored.
pub const SERVICE_STATE_VERSION: u32 = 1;
const FORMAT: Format = Format {
    magic: b"kwire-ss",
    version: SERVICE_STATE_VERSION,
    what: "service state",
};

/// The file's body: the views by key (owned when read, borrowed when written).
#[derive(Serialize, Deserialize)]
pub struct Saved<S, L> {
    pub services: Vec<S>,
    pub slices: Vec<L>,
}

/// The views a file holds, by key.
pub type Views = Saved<(ObjectKey, ServiceView), (ObjectKey, SliceView)>;

impl Inputs for State {
    const FILE: &'static str = SERVICE_STATE_FILE;
    const WHAT: &'static str = "Service inputs";

    fn complete(&self) -> bool {
        State::complete(self)
    }

    fn encode(&self) -> Vec<u8> {
        encode(self.compiler.views())
    }
}

/// The file's bytes for views (those of [`crate::services::table::ServiceCompiler::views`]).
pub fn encode((services, slices): ViewsRef<'_>) -> Vec<u8> {
    let body = postcard::to_stdvec(&Saved { services, slices })
        .expect("views serialize (plain structs, strings and sequences of known length)");
    frame(&body)
}

/// A file of this format around `body`. Public for the `service_state` fuzz target, which
/// frames arbitrary bodies so that they reach the decoder.
pub fn frame(body: &[u8]) -> Vec<u8> {
    FORMAT.frame(body)
}

/// Whether `bytes` start with this format's magic (whatever their version or checksum).
pub fn has_magic(bytes: &[u8]) -> bool {
    FORMAT.has_magic(bytes)
}

/// A view's port as [`ServiceView::from_k8s`] and [`SliceView::from_k8s`] keep them: a known
/// protocol, a port that is not 0.
fn valid_port(proto: u8, port: u16) -> bool {
    matches!(proto, TCP | UDP | SCTP) && port != 0
}

/// What [`load`] does with the file's bytes: checks the header, decodes the views and checks
/// that each is one the API's objects could have given. `Err` says why the bytes are not a
/// valid file; damaged or hostile bytes give an error, never a panic. Public for the
/// `service_state` fuzz target.
pub fn decode(bytes: &[u8]) -> Result<Views, String> {
    let body = FORMAT.body(bytes)?;
    let saved: Views =
        postcard::from_bytes(body).map_err(|e| format!("cannot decode the views: {e}"))?;
    for ((ns, name), s) in &saved.services {
        let ports = s.ports.iter().all(|p| valid_port(p.proto, p.port));
        if !ports || s.cluster_ips.is_empty() {
            return Err(format!(
                "Service {ns}/{name}: no ClusterIP, or a port of protocol 0 or port 0"
            ));
        }
    }
    for ((ns, name), s) in &saved.slices {
        if !s.ports.iter().all(|p| valid_port(p.proto, p.port)) {
            return Err(format!(
                "EndpointSlice {ns}/{name}: a port of an unknown protocol or port 0"
            ));
        }
    }
    Ok(saved)
}

/// Reads the saved views; `Ok(None)` when there is no file.
pub fn load(dir: &Path) -> Result<Option<Views>, LoadError> {
    persist::load(dir, SERVICE_STATE_FILE, decode)
}

/// At start, before pods are re-attached: the saved views compiled into this node's table
/// and swapped in (the loop's and the firewall's), or nothing (an error is logged). Returns
/// the views (restored or none) shared with the writer, and whether a saved file was there
/// but could not be restored.
pub fn restore(dir: &Path, node: &str, pods: &Pods, firewall: &Firewall) -> (Shared, bool) {
    let started = std::time::Instant::now();
    let mut compiler = services::compiler(node, firewall);
    let (state, failed) = match load(dir) {
        Ok(Some(saved)) => {
            let (n, m) = (saved.services.len(), saved.slices.len());
            compiler.replace_services(saved.services.into_iter().collect());
            compiler.replace_slices(saved.slices.into_iter().collect());
            let (table, _) = compiler.compile();
            let table = Arc::new(table);
            pods.set_services(table.clone());
            // The host firewall's first install, right after this, steers its node ports.
            firewall.keep_steering(table.steering());
            info!(
                services = n,
                endpoint_slices = m,
                frontends = table.frontends(),
                took_ms = started.elapsed().as_millis() as u64,
                "restored the saved Service inputs; translating them before the API answers"
            );
            (State::restored(compiler), false)
        }
        Ok(None) => {
            info!("no saved Service inputs; pods' flows to ClusterIPs are dropped until the API lists arrive");
            (State::new(compiler), false)
        }
        Err(e) => {
            warn!(error = %e, "not restoring the saved Service inputs; pods' flows to ClusterIPs are dropped until the API lists arrive");
            (State::new(compiler), true)
        }
    };
    (Persist::new(dir, state), failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::model::{EndpointView, ServicePortView, SlicePortView};
    use crate::services::table::ServiceCompiler;
    use std::net::IpAddr;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kwire-service-state-{}-{}",
            std::process::id(),
            rand_core::RngCore::next_u64(&mut rand_core::OsRng)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(ns: &str, name: &str) -> ObjectKey {
        (ns.into(), name.into())
    }

    fn service(name: &str, cluster_ip: &str) -> ServiceView {
        ServiceView {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: vec![ip(cluster_ip)],
            ports: vec![ServicePortView {
                name: "http".into(),
                proto: TCP,
                port: 80,
                node_port: None,
            }],
            ..Default::default()
        }
    }

    fn slice(service: &str, backends: &[&str]) -> SliceView {
        SliceView {
            namespace: "shop".into(),
            service: service.into(),
            ports: vec![SlicePortView {
                name: "http".into(),
                proto: TCP,
                port: 8080,
            }],
            endpoints: backends
                .iter()
                .map(|b| EndpointView {
                    addresses: vec![ip(b)],
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some("n2".into()),
                })
                .collect(),
        }
    }

    /// A firewall whose steering stays empty (ClusterIP Services only): no `nft` runs.
    fn firewall() -> Firewall {
        Firewall {
            ifname: "kwire-test0".into(),
            cluster: vec!["10.244.0.0/16".parse().unwrap()],
            services: vec!["10.96.0.0/12".parse().unwrap()],
            counters: Default::default(),
            steering: Default::default(),
        }
    }

    /// The loop's views after both lists: two Services, three slices (one of a Service that
    /// does not exist).
    fn listed(dir: &Path) -> Shared {
        let persist = Persist::new(dir, State::new(services::compiler("n1", &firewall())));
        {
            let mut st = persist.lock();
            let c = &mut st.compiler;
            c.put_service(key("shop", "web"), Some(service("web", "10.96.0.10")));
            c.put_service(key("shop", "db"), Some(service("db", "10.96.0.11")));
            c.put_slice(
                key("shop", "web-a"),
                Some(slice("web", &["10.244.2.5", "10.244.3.5"])),
            );
            c.put_slice(key("shop", "db-a"), Some(slice("db", &["10.244.2.6"])));
            c.put_slice(key("shop", "gone-a"), Some(slice("gone", &["10.244.2.7"])));
        }
        persist
    }

    /// Each frontend with its backends, sorted: what a table translates.
    fn translations(c: &mut ServiceCompiler) -> Vec<(String, Vec<String>)> {
        let t = c.compile().0;
        let mut out: Vec<_> = ["10.96.0.10", "10.96.0.11", "10.96.0.12"]
            .iter()
            .filter_map(|a| {
                let fe = t.lookup(TCP, ip(a), 80)?;
                let mut b: Vec<String> = fe.backends().iter().map(|b| b.to_string()).collect();
                b.sort();
                Some((a.to_string(), b))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn saved_views_restore_the_same_table_before_the_api_answers() {
        let dir = temp_dir();
        assert!(load(&dir).unwrap().is_none(), "no file: nothing");
        let persist = listed(&dir);
        persist.mark_changed();
        persist.save_if_dirty();
        assert!(
            !dir.join(SERVICE_STATE_FILE).exists(),
            "the lists are not complete yet: nothing saved"
        );
        persist.lock().listed = [true; 2];
        persist.save_if_dirty();
        let meta = std::fs::metadata(dir.join(SERVICE_STATE_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let live = translations(&mut persist.lock().compiler);
        assert_eq!(
            live,
            [
                (
                    "10.96.0.10".into(),
                    vec!["10.244.2.5:8080".into(), "10.244.3.5:8080".into()]
                ),
                ("10.96.0.11".into(), vec!["10.244.2.6:8080".into()]),
            ]
        );

        let pods = Pods::new(1, false).unwrap();
        pods.require_services();
        assert!(pods.services_pending());
        let (restored, failed) = restore(&dir, "n1", &pods, &firewall());
        assert!(!failed);
        assert!(!pods.services_pending(), "a table is in force at once");
        let table = pods.services().unwrap();
        assert_eq!(table.frontends(), 2);
        assert_eq!(translations(&mut restored.lock().compiler), live);
        assert!(
            restored.lock().complete(),
            "restored views are complete lists"
        );
        // What it restored saves the same bytes.
        let bytes = std::fs::read(dir.join(SERVICE_STATE_FILE)).unwrap();
        restored.mark_changed();
        restored.save_if_dirty();
        assert_eq!(std::fs::read(dir.join(SERVICE_STATE_FILE)).unwrap(), bytes);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(SERVICE_STATE_FILE)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn restored_node_ports_are_kept_for_the_firewall_s_first_install() {
        let dir = temp_dir();
        let persist = Persist::new(&dir, State::restored(services::compiler("n1", &firewall())));
        let mut edge = service("edge", "10.96.0.12");
        edge.ports[0].node_port = Some(30080);
        persist
            .lock()
            .compiler
            .put_service(key("shop", "edge"), Some(edge));
        persist.mark_changed();
        persist.save_if_dirty();
        let pods = Pods::new(1, false).unwrap();
        let fw = firewall();
        let (_, failed) = restore(&dir, "n1", &pods, &fw);
        assert!(!failed);
        let steering = fw.steering.lock().unwrap().clone();
        assert_eq!(
            steering
                .node_ports
                .iter()
                .map(|p| p.port)
                .collect::<Vec<_>>(),
            [30080]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_real_list_replaces_the_restored_views() {
        let dir = temp_dir();
        let persist = listed(&dir);
        persist.lock().listed = [true; 2];
        persist.mark_changed();
        persist.save_if_dirty();
        let pods = Pods::new(1, false).unwrap();
        let (restored, _) = restore(&dir, "n1", &pods, &firewall());
        let mut st = restored.lock();
        // The API's lists: db is gone, web has one endpoint left, a new Service came.
        st.compiler.replace_services(
            [
                (key("shop", "web"), service("web", "10.96.0.10")),
                (key("shop", "api"), service("api", "10.96.0.12")),
            ]
            .into(),
        );
        st.compiler.replace_slices(
            [
                (key("shop", "web-a"), slice("web", &["10.244.3.5"])),
                (key("shop", "api-a"), slice("api", &["10.244.4.5"])),
            ]
            .into(),
        );
        assert_eq!(
            translations(&mut st.compiler),
            [
                ("10.96.0.10".into(), vec!["10.244.3.5:8080".into()]),
                ("10.96.0.12".into(), vec!["10.244.4.5:8080".into()]),
            ]
        );
        drop(st);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_other_version_or_hostile_file_restores_nothing_and_is_counted() {
        let dir = temp_dir();
        let persist = listed(&dir);
        persist.lock().listed = [true; 2];
        let good = persist.lock().encode();
        let mut damaged = good.clone();
        *damaged.last_mut().unwrap() ^= 0x10;
        let mut other_version = good.clone();
        other_version[8..12].copy_from_slice(&7u32.to_le_bytes());
        // Bodies the checksum vouches for (it is not a MAC) but that are not views kwire
        // writes: a truncated encoding, a huge length, a port 0.
        let truncated = FORMAT.frame(&good[persist::HEADER..good.len() - 5]);
        let huge = FORMAT.frame(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut bad = service("web", "10.96.0.10");
        bad.ports[0].port = 0;
        let port0 = FORMAT.frame(
            &postcard::to_stdvec(&Saved::<_, (ObjectKey, SliceView)> {
                services: vec![(key("shop", "web"), bad)],
                slices: vec![],
            })
            .unwrap(),
        );
        let cases: [(&[u8], &str); 7] = [
            (&good[..good.len() - 3], "checksum"),
            (&damaged, "checksum"),
            (&other_version, "version 7"),
            (
                b"kwire-ps\x02\x00\x00\x00",
                "not a kwire service state file",
            ),
            (&truncated, "cannot decode"),
            (&huge, "cannot decode"),
            (&port0, "Service shop/web"),
        ];
        for (bytes, why) in cases {
            std::fs::write(dir.join(SERVICE_STATE_FILE), bytes).unwrap();
            let text = load(&dir).err().expect("an error").to_string();
            assert!(
                text.contains(SERVICE_STATE_FILE) && text.contains(why),
                "{why}: {text}"
            );
            let pods = Pods::new(1, false).unwrap();
            pods.require_services();
            let (st, failed) = restore(&dir, "n1", &pods, &firewall());
            assert!(failed, "{why}: counted");
            assert!(!st.lock().complete(), "{why}: nothing restored");
            assert!(
                pods.services_pending(),
                "{why}: readiness waits for the lists"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
