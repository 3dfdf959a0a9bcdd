//! `kwire key rotate` and `kwire key revoke`: the agent's key socket,
//! `<run-dir>/key.sock` (directory 0700, socket 0600), root peers only (SO_PEERCRED). A client
//! writes one command line (`rotate` or `revoke`) and reads one JSON answer
//! (`{"ok": "..."}` or `{"error": "..."}`); the agent's control loop carries the command out.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// The key socket's file name inside the run directory.
pub const KEY_SOCKET: &str = "key.sock";
/// How long a command may take, end to end (the agent writes the key file and the Node).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest command line read.
const MAX_LINE: u64 = 64;

/// A key command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyCommand {
    /// Start a make-before-break rotation to a fresh key.
    Rotate,
    /// Replace the key at once and revoke the old one on every node.
    Revoke,
}

impl KeyCommand {
    fn word(self) -> &'static str {
        match self {
            KeyCommand::Rotate => "rotate",
            KeyCommand::Revoke => "revoke",
        }
    }

    fn parse(s: &str) -> Option<KeyCommand> {
        match s.trim() {
            "rotate" => Some(KeyCommand::Rotate),
            "revoke" => Some(KeyCommand::Revoke),
            _ => None,
        }
    }
}

/// A command for the control loop and where its answer goes.
pub struct KeyRequest {
    pub command: KeyCommand,
    pub reply: oneshot::Sender<Result<String, String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    Ok(String),
    Error(String),
}

/// Binds the socket (0600) in `run_dir` (0700), replacing a stale one.
pub fn bind(run_dir: &Path) -> anyhow::Result<UnixListener> {
    crate::status::server::bind_root_only(run_dir, KEY_SOCKET, "key")
}

/// Takes commands until the task is aborted; each goes to `to` (the control loop).
pub async fn serve(listener: UnixListener, to: mpsc::Sender<KeyRequest>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, to.clone()));
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept on the key socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(stream: UnixStream, to: mpsc::Sender<KeyRequest>) {
    let cred = stream.peer_cred();
    let (rd, mut wr) = stream.into_split();
    let a = match cred {
        Ok(c) if c.uid() == 0 => tokio::time::timeout(COMMAND_TIMEOUT, handle(rd, to))
            .await
            .unwrap_or_else(|_| {
                Answer::Error("the agent did not answer in time; see its log".into())
            }),
        Ok(c) => {
            tracing::warn!(uid = c.uid(), "refused a key command from a non-root peer");
            Answer::Error(format!(
                "kwire agent takes key commands from root only, not uid {}",
                c.uid()
            ))
        }
        Err(e) => Answer::Error(format!("reading the peer's credentials: {e}")),
    };
    let body = serde_json::to_vec(&a).expect("serialises");
    let _ = wr.write_all(&body).await;
    let _ = wr.shutdown().await;
}

async fn handle(rd: tokio::net::unix::OwnedReadHalf, to: mpsc::Sender<KeyRequest>) -> Answer {
    let mut line = String::new();
    let mut r = BufReader::new(tokio::io::AsyncReadExt::take(rd, MAX_LINE));
    if r.read_line(&mut line).await.is_err() {
        return Answer::Error("reading the command failed".into());
    }
    let Some(command) = KeyCommand::parse(&line) else {
        return Answer::Error("unknown command: send `rotate` or `revoke`".into());
    };
    let (reply, rx) = oneshot::channel();
    if to.send(KeyRequest { command, reply }).await.is_err() {
        return Answer::Error(
            "the agent's control loop is not running (no API client?); see its log".into(),
        );
    }
    match rx.await {
        Ok(Ok(m)) => Answer::Ok(m),
        Ok(Err(m)) => Answer::Error(m),
        Err(_) => Answer::Error("the agent dropped the command; see its log".into()),
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// What to do: `rotate` (make-before-break: a fresh key, published beside the current
    /// one; promoted once every peer that is up uses it) or `revoke` (a fresh key at once;
    /// every node drops sessions made with the old key and refuses it from then on).
    #[arg(value_enum)]
    pub command: KeyCommand,
    /// The agent's run directory (where it serves key.sock).
    #[arg(long, env = "KWIRE_RUN_DIR", default_value = crate::status::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

/// `kwire key rotate|revoke`: sends the command to the running agent and prints its answer.
pub fn run(args: &KeyArgs) -> anyhow::Result<()> {
    let path = args.run_dir.join(KEY_SOCKET);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}: kwire key must run as root (sudo kwire key ...)",
            path.display()
        ),
        _ => anyhow::anyhow!(
            "no kwire agent at {} ({e}): is the DaemonSet running on this node? (or pass --run-dir)",
            path.display()
        ),
    })?;
    s.set_read_timeout(Some(COMMAND_TIMEOUT + Duration::from_secs(1)))?;
    s.write_all(format!("{}\n", args.command.word()).as_bytes())?;
    let mut body = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut body)
        .with_context(|| format!("reading the agent's answer from {}", path.display()))?;
    match serde_json::from_slice::<Answer>(&body) {
        Ok(Answer::Ok(m)) => {
            println!("{m}");
            Ok(())
        }
        Ok(Answer::Error(m)) => anyhow::bail!("the agent refused: {m}"),
        Err(e) => anyhow::bail!("the agent sent an answer this kwire cannot read ({e}); is the agent a different version?"),
    }
}
