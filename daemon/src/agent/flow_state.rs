//! The connection tables across an agent restart: the flows NetworkPolicy admitted
//! ([`Conntrack`](crate::datapath::conntrack::Conntrack)) and the flows translated to a
//! Service's backend ([`NatTable`](crate::datapath::nat::NatTable)) live in the agent's
//! memory, so a new agent started empty judged every packet of an open connection as a new
//! flow: the reply of a connection a pod opened was checked against that pod's ingress rules
//! (a default-deny pod lost every connection it had made until it next sent), and a backend's
//! packet on a translated flow left with the backend's address, not the ClusterIP's, so the
//! client reset it. Cilium keeps its connection and NAT maps in the kernel across agent
//! restarts; this keeps kwire's in a file between the two processes.
//!
//! [`save`] writes both tables (each entry's age, and the time of the write) to
//! [`FLOW_STATE_FILE`]: atomically, mode 0600, behind the header of
//! [`super::persist::Format`] (magic, version, checksum), in postcard's encoding. It runs at
//! SIGTERM, once the other files are written, and while the agent runs every
//! `--flow-save-interval` ([`writer`]; longer when a write takes long, see
//! [`super::persist::pause_after`]), so that a crash or a SIGKILL loses only the flows opened
//! since the last write. At start [`restore`] puts them back before any pod is re-attached,
//! aged by the time since the write (what idled past its limit meanwhile is left out),
//! charged to each initiator's budget like a new flow, and removes the file. A flow that ended
//! after the last write comes back as an idle entry that times out, as it would have stayed in
//! the running agent's table until then (established flows outlive policy changes, see
//! [`crate::datapath::conntrack`]). Flows opened between the last write and the process's end
//! are lost.

use super::persist::{self, Format, LoadError};
use crate::datapath::conntrack::SavedFlow;
use crate::datapath::nat::SavedNat;
use crate::dataplane::ports::Pods;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};

/// Name of the file inside the state directory.
pub const FLOW_STATE_FILE: &str = "flow-state.bin";
/// Format version written; files of another version are not restored.
pub const FLOW_STATE_VERSION: u32 = 1;
const FORMAT: Format = Format {
    magic: b"kwire-fs",
    version: FLOW_STATE_VERSION,
    what: "flow state",
};

/// The file's body.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// When it was written, in seconds since the Unix epoch.
    written: u64,
    policy: Vec<SavedFlow>,
    nat: Vec<SavedNat>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What [`restore`] put back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Flows admitted under NetworkPolicy.
    pub policy: usize,
    /// Translated flows.
    pub nat: usize,
}

/// Default of `--flow-save-interval`: how often a running agent writes its tables.
pub const FLOW_SAVE_INTERVAL: Duration = Duration::from_secs(10);

/// One write at a time: the periodic writer's may still run when the one at SIGTERM starts
/// (both go through the same temporary file).
static SAVING: Mutex<()> = Mutex::new(());

/// Writes `pods`' connection tables to `dir`; the number of entries written.
pub fn save(dir: &Path, pods: &Pods) -> std::io::Result<usize> {
    let _one = SAVING.lock().unwrap_or_else(|p| p.into_inner());
    let saved = Saved {
        written: unix_now(),
        policy: pods.conntrack.save(),
        nat: pods.nat.save(),
    };
    let n = saved.policy.len() + saved.nat.len();
    let body = postcard::to_allocvec(&saved).map_err(std::io::Error::other)?;
    let framed = FORMAT.frame(&body);
    super::state::write_atomic(dir, FLOW_STATE_FILE, |out| out.write_all(&framed))?;
    Ok(n)
}

/// Puts back what [`save`] wrote to `dir` into `pods`' tables, and removes the file. A missing
/// file restores nothing; an unreadable one nothing too (`Err` says why; it is removed all
/// the same).
pub fn restore(dir: &Path, pods: &Pods) -> Result<Restored, LoadError> {
    let loaded = persist::load(dir, FLOW_STATE_FILE, |bytes| {
        let body = FORMAT.body(bytes)?;
        postcard::from_bytes::<Saved>(body).map_err(|e| format!("undecodable: {e}"))
    });
    if !matches!(loaded, Ok(None)) {
        if let Err(e) = std::fs::remove_file(dir.join(FLOW_STATE_FILE)) {
            warn!(error = %e, "cannot remove the flow state file; the next start restores it again");
        }
    }
    let Some(saved) = loaded? else {
        return Ok(Restored::default());
    };
    // A clock set back counts as no time at all; the ages saved still count.
    let gap = u32::try_from(unix_now().saturating_sub(saved.written)).unwrap_or(u32::MAX);
    Ok(Restored {
        policy: pods.conntrack.restore(&saved.policy, gap),
        nat: pods.nat.restore(&saved.nat, gap),
    })
}

/// [`restore`], logged.
pub fn restore_logged(dir: &Path, pods: &Pods) {
    match restore(dir, pods) {
        Ok(r) if r == Restored::default() => {}
        Ok(r) => info!(
            policy_flows = r.policy,
            translated_flows = r.nat,
            "connection tables restored from the last graceful stop"
        ),
        Err(e) => {
            warn!(error = %e, "connection tables not restored: open connections through NetworkPolicy or a Service may stall until their client sends again")
        }
    }
}

/// Writes the tables every `floor` while the agent runs (never when it is zero), or as
/// [`super::persist::pause_after`] stretches it after a slow write (a thousand times the
/// write's time, at most a minute): at a million flows a write takes ~0.25 s, one a minute,
/// 0.4% of a core; at 10,000 flows ~3 ms every 10 s. Skipped while both tables are
/// empty and the last write (or the start, which removed the file) left none behind. A failed
/// write is counted in `failed`, and logged when it starts failing and when it recovers.
pub async fn writer(dir: PathBuf, pods: Arc<Pods>, floor: Duration, failed: Arc<AtomicU64>) {
    if floor.is_zero() {
        return std::future::pending().await;
    }
    let mut pause = floor;
    let mut file_holds_flows = false;
    let mut failing = false;
    loop {
        tokio::time::sleep(pause).await;
        if !file_holds_flows && pods.conntrack.is_empty() && pods.nat.is_empty() {
            pause = floor;
            continue;
        }
        let (d, p) = (dir.clone(), pods.clone());
        let Ok((result, took)) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            (save(&d, &p), t.elapsed())
        })
        .await
        else {
            return;
        };
        pause = super::persist::pause_after(took, floor);
        match result {
            Ok(n) => {
                file_holds_flows = n > 0;
                if std::mem::take(&mut failing) {
                    info!(entries = n, "connection tables written again");
                }
                debug!(
                    entries = n,
                    took_ms = took.as_millis() as u64,
                    "connection tables written"
                );
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    warn!(path = %dir.join(FLOW_STATE_FILE).display(), error = %e, "cannot write the connection tables; a crash now loses them (retrying)");
                }
            }
        }
    }
}

/// [`save`], logged.
pub fn save_logged(dir: &Path, pods: &Pods) {
    match save(dir, pods) {
        Ok(n) => info!(entries = n, "connection tables saved for the next start"),
        Err(e) => {
            warn!(path = %dir.join(FLOW_STATE_FILE).display(), error = %e, "cannot save the connection tables; the next start begins with empty ones")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::conntrack::{Check, Decision, Flow};
    use crate::datapath::nat::Forward;
    use std::net::SocketAddr;

    fn pods() -> Pods {
        Pods::new(1, false).unwrap()
    }

    fn flow(sport: u16, dst: &str, dport: u16) -> Flow {
        Flow {
            proto: 6,
            src: "10.244.1.5".parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    #[tokio::test]
    async fn the_writer_keeps_the_file_current_while_the_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FLOW_STATE_FILE);
        let live = Arc::new(pods());
        let period = Duration::from_millis(10);
        let failed = Arc::new(AtomicU64::new(0));
        let w = tokio::spawn(writer(
            dir.path().to_path_buf(),
            live.clone(),
            period,
            failed.clone(),
        ));
        // Empty tables: nothing to write, for ten periods.
        tokio::time::sleep(10 * period).await;
        assert!(!file.exists(), "nothing to save, nothing written");
        let out = flow(40000, "10.244.2.9", 8080);
        assert_eq!(
            live.conntrack.check(out, Check::Egress, || true),
            Decision::Admitted
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "no write within 10 s");
            tokio::time::sleep(period).await;
        }
        w.abort();
        assert_eq!(failed.load(Ordering::Relaxed), 0);
        // What a start after a crash finds: the flow, still established.
        let new = pods();
        assert_eq!(
            restore(dir.path(), &new).unwrap(),
            Restored { policy: 1, nat: 0 }
        );
        assert_eq!(
            new.conntrack
                .check(out.reversed(), Check::Ingress, || false),
            Decision::Established
        );
    }

    #[tokio::test]
    async fn the_writer_counts_each_failed_write() {
        // A state "directory" that is a file: every write fails.
        let file = tempfile::NamedTempFile::new().unwrap();
        let live = Arc::new(pods());
        let out = flow(40000, "10.244.2.9", 8080);
        assert_eq!(
            live.conntrack.check(out, Check::Egress, || true),
            Decision::Admitted
        );
        let failed = Arc::new(AtomicU64::new(0));
        let w = tokio::spawn(writer(
            file.path().to_path_buf(),
            live,
            Duration::from_millis(10),
            failed.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Counted each time, not only when it starts failing (that alone is logged).
        while failed.load(Ordering::Relaxed) < 2 {
            assert!(
                Instant::now() < deadline,
                "failed writes not counted within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.abort();
    }

    #[test]
    fn a_reply_and_a_translated_flow_pass_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let old = pods();
        let out = flow(40000, "10.244.2.9", 8080);
        assert_eq!(
            old.conntrack.check(out, Check::Egress, || true),
            Decision::Admitted
        );
        let svc = flow(40001, "10.96.0.10", 80);
        let backend: SocketAddr = "10.244.3.7:8080".parse().unwrap();
        assert_eq!(
            old.nat.forward(svc, None, |_| true, || Some(backend)),
            Forward::To(backend)
        );
        assert_eq!(save(dir.path(), &old).unwrap(), 3);

        let new = pods();
        let r = restore(dir.path(), &new).unwrap();
        assert_eq!(r, Restored { policy: 1, nat: 1 });
        // The reply is established: the pod's ingress rules are not asked.
        assert_eq!(
            new.conntrack
                .check(out.reversed(), Check::Ingress, || false),
            Decision::Established
        );
        // The backend's packet gets the ClusterIP back; the client's keeps its backend.
        let reply = Flow {
            proto: 6,
            src: backend.ip(),
            sport: backend.port(),
            dst: svc.src,
            dport: svc.sport,
        };
        assert_eq!(
            new.nat.reverse(reply),
            Some(("10.96.0.10:80".parse().unwrap(), None))
        );
        assert_eq!(new.nat.backend(svc), Some(backend));
        // Read once: the file is gone, a second start restores nothing.
        assert!(!dir.path().join(FLOW_STATE_FILE).exists());
        assert_eq!(restore(dir.path(), &pods()).unwrap(), Restored::default());
    }

    #[test]
    fn a_damaged_file_restores_nothing_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = pods();
        old.conntrack
            .check(flow(40000, "10.244.2.9", 8080), Check::Egress, || true);
        save(dir.path(), &old).unwrap();
        let path = dir.path().join(FLOW_STATE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let new = pods();
        let e = restore(dir.path(), &new).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(new.conntrack.is_empty());
        assert!(!path.exists());
    }

    #[test]
    fn flows_idle_past_their_limit_while_down_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let old = pods();
        let tcp = flow(40000, "10.244.2.9", 8080);
        let udp = Flow { proto: 17, ..tcp };
        old.conntrack.check(tcp, Check::Egress, || true);
        old.conntrack.check(udp, Check::Egress, || true);
        save(dir.path(), &old).unwrap();
        // Written ten minutes ago: past UDP's three, within TCP's hour.
        let path = dir.path().join(FLOW_STATE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        let mut saved: Saved = postcard::from_bytes(FORMAT.body(&bytes).unwrap()).unwrap();
        saved.written -= 600;
        std::fs::write(&path, FORMAT.frame(&postcard::to_allocvec(&saved).unwrap())).unwrap();
        let new = pods();
        assert_eq!(restore(dir.path(), &new).unwrap().policy, 1);
        assert_eq!(
            new.conntrack
                .check(tcp.reversed(), Check::Ingress, || false),
            Decision::Established
        );
        assert_eq!(
            new.conntrack
                .check(udp.reversed(), Check::Ingress, || false),
            Decision::Denied
        );
    }
}
