//! The agent's status socket: `<run-dir>/status.sock` (directory 0700, socket 0600), root
//! peers only (SO_PEERCRED), one JSON [`StatusReport`](crate::node_state::StatusReport) per
//! connection.

use super::STATUS_SOCKET;
use crate::node_state::{report, NodeState};
use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

/// A client gets this long to take its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one log line per this interval for repeated accept errors.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Creates the run directory (0700) and binds the socket (0600), replacing a stale one.
pub fn bind(run_dir: &Path) -> anyhow::Result<UnixListener> {
    bind_root_only(run_dir, STATUS_SOCKET, "status")
}

/// Creates `run_dir` (0700) and binds the socket `name` in it (0600, root only), replacing a
/// stale one; `what` names it in errors.
pub fn bind_root_only(run_dir: &Path, name: &str, what: &str) -> anyhow::Result<UnixListener> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating --run-dir {}", run_dir.display()))?;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making --run-dir {} private (0700)", run_dir.display()))?;
    let path = run_dir.join(name);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("removing the stale {what} socket {}", path.display()))
        }
        _ => {}
    }
    let l = UnixListener::bind(&path)
        .with_context(|| format!("binding the {what} socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root-only (0600)", path.display()))?;
    Ok(l)
}

/// Answers every connection with the current report until the task is aborted.
pub async fn serve(listener: UnixListener, status: Arc<NodeState>) {
    let mut last_err: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let st = status.clone();
                tokio::spawn(answer(stream, st));
            }
            Err(e) => {
                if last_err.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::warn!(error = %e, "accept on the status socket failed");
                    last_err = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(mut stream: UnixStream, status: Arc<NodeState>) {
    let body = match stream.peer_cred() {
        Ok(c) if c.uid() == 0 => {
            let r = tokio::task::block_in_place(|| report(&status));
            serde_json::to_vec(&r).expect("the report serialises")
        }
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                "refused a status request from a non-root peer"
            );
            serde_json::to_vec(&serde_json::json!({"error": format!("kwire agent answers status requests from root only, not uid {}", c.uid())}))
                .expect("serialises")
        }
        Err(e) => serde_json::to_vec(
            &serde_json::json!({"error": format!("reading the peer's credentials: {e}")}),
        )
        .expect("serialises"),
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = stream.write_all(&body).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
