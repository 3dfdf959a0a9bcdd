//! Inputs of the data plane saved beside the state file, so that a restarted agent enforces
//! them before the API answers (and while it does not): the NetworkPolicy inputs
//! ([`super::policy_state`]) and the Services ([`super::service_state`]).
//!
//! Both files share one framing ([`Format`]: a magic, a format version and the SHA-256 of the
//! body) and one writer ([`Persist`]): a file is written atomically, mode 0600, only while the
//! inputs it holds are complete lists, at most every [`SAVE_INTERVAL`] while they change (less
//! often when a write is slow: [`pause_after`]), and at graceful shutdown. The encoding is
//! taken under the inputs' lock, the write is not.

use super::state::write_atomic;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// At most one write per interval.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(10);
/// A writer waits at least this many times as long as its last write took.
const WRITER_SHARE: u32 = 1000;
/// ... but never longer than this between writes while the inputs change.
pub const MAX_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// How long a writer waits after a write that took `took` before the next (at least `floor`):
/// a thousand times `took`, so that saving takes at most a thousandth of a core however large
/// the inputs grow, and at most [`MAX_SAVE_INTERVAL`], so that what a restart restores is
/// never older than that while the API answers. At 150,000 pods the policy inputs take ~40 ms
/// to encode and write: saved every ~40 s while pods change, where a fixed 10 s spent four
/// times as much.
pub fn pause_after(took: Duration, floor: Duration) -> Duration {
    took.saturating_mul(WRITER_SHARE)
        .clamp(floor, MAX_SAVE_INTERVAL.max(floor))
}
/// Length of the digest in the header.
const DIGEST: usize = 32;
/// Bytes before the body: the magic, the version (u32, little-endian), the body's SHA-256.
pub const HEADER: usize = 8 + 4 + DIGEST;

/// The digest of a body: catches a damaged file (a flipped bit in an address or a label would
/// otherwise change what is enforced silently). Not a MAC: only root can write the files.
/// ring's SHA-256 (already a dependency, hardware SHA where the CPU has it) rather than a
/// hand-written hash.
fn checksum(bytes: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, bytes)
}

/// One kind of saved file.
pub struct Format {
    /// The file starts with these bytes.
    pub magic: &'static [u8; 8],
    /// The version written; files of another version are not read.
    pub version: u32,
    /// What the file is, for errors ("policy state").
    pub what: &'static str,
}

impl Format {
    /// A file of this format around `body`: the header, then the body.
    pub fn frame(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(checksum(body).as_ref());
        out.extend_from_slice(body);
        out
    }

    /// Whether `bytes` start with this format's magic (whatever their version or checksum).
    pub fn has_magic(&self, bytes: &[u8]) -> bool {
        bytes.starts_with(self.magic)
    }

    /// The body of a file of this format, once its header (magic, version, checksum) is
    /// checked; `Err` says why `bytes` are not one.
    pub fn body<'a>(&self, bytes: &'a [u8]) -> Result<&'a [u8], String> {
        if bytes.len() < HEADER || !self.has_magic(bytes) {
            return Err(format!("not a kwire {} file", self.what));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != self.version {
            return Err(format!(
                "version {version} (this agent reads {})",
                self.version
            ));
        }
        let body = &bytes[HEADER..];
        if checksum(body).as_ref() != &bytes[12..HEADER] {
            return Err("checksum mismatch: the file is damaged".into());
        }
        Ok(body)
    }
}

/// Why nothing was restored from a saved file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid ({why}); it is rewritten once the API answers")]
    Invalid { path: PathBuf, why: String },
}

/// Reads file `name` of `dir` and decodes it with `decode`; `Ok(None)` when there is none.
pub fn load<T>(
    dir: &Path,
    name: &str,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, LoadError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path, source }),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|why| LoadError::Invalid { path, why })
}

/// Inputs a [`Persist`] holds and saves.
pub trait Inputs: Send + 'static {
    /// The file's name inside the state directory.
    const FILE: &'static str;
    /// What they are, for logs ("NetworkPolicy inputs").
    const WHAT: &'static str;
    /// Whether they are complete lists (a half-listed set is not saved: it could lack what a
    /// restart must enforce).
    fn complete(&self) -> bool;
    /// The file's bytes.
    fn encode(&self) -> Vec<u8>;
    /// The file's bytes, the inputs read through `lock` (taken once, or once per part where
    /// holding their loop back for the whole encoding would delay its changes); `None` when
    /// they are not complete at some point.
    fn encode_locked<'a>(lock: &dyn Fn() -> MutexGuard<'a, Self>) -> Option<Vec<u8>>
    where
        Self: Sized + 'a,
    {
        let inputs = lock();
        inputs.complete().then(|| inputs.encode())
    }
}

/// Inputs shared between their loop and the writer that saves them.
pub struct Persist<T> {
    dir: PathBuf,
    inputs: Mutex<T>,
    /// Something they hold changed since the last write (set with the inputs locked).
    dirty: AtomicBool,
    /// Wakes the writer when they became dirty.
    changed: tokio::sync::Notify,
    /// One write at a time (the writer task, the shutdown flush).
    writing: Mutex<()>,
    /// Writes that failed, so far.
    failed: Arc<AtomicU64>,
}

impl<T: Inputs> Persist<T> {
    pub fn new(dir: &Path, inputs: T) -> Arc<Self> {
        Arc::new(Persist {
            dir: dir.to_path_buf(),
            inputs: Mutex::new(inputs),
            dirty: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            writing: Mutex::new(()),
            failed: Arc::default(),
        })
    }

    /// The count of failed writes (for `/metrics`).
    pub fn failures(&self) -> Arc<AtomicU64> {
        self.failed.clone()
    }

    /// The inputs, locked: by their loop, by the writer while it encodes.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.inputs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What they hold changed: the writer saves it (at once, or [`SAVE_INTERVAL`] after its
    /// last write).
    pub fn mark_changed(&self) {
        self.dirty.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// The encoded inputs if a write is due and they are complete. Holds their lock while
    /// encoding only ([`Inputs::encode_locked`]).
    fn due(&self) -> Option<Vec<u8>> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let bytes = T::encode_locked(&|| self.lock());
        if bytes.is_none() {
            // Saved once they are complete again (their loop marks them changed then).
            self.dirty.store(true, Ordering::Release);
        }
        bytes
    }

    /// Writes the file if something changed since the last write.
    pub fn save_if_dirty(&self) {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bytes) = self.due() else {
            return;
        };
        match write_atomic(&self.dir, T::FILE, |out| out.write_all(&bytes)) {
            Ok(()) => debug!(bytes = bytes.len(), "{} saved", T::WHAT),
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                self.failed.fetch_add(1, Ordering::Relaxed);
                warn!(path = %self.dir.join(T::FILE).display(), error = %e, "cannot save the {}; a restart before the API answers starts without them", T::WHAT);
            }
        }
    }
}

/// Writes the file when the inputs changed, at most once per [`SAVE_INTERVAL`] or as
/// [`pause_after`] says (the first change at once: a restart soon after the first lists finds
/// them); runs until aborted.
pub async fn writer<T: Inputs>(persist: Arc<Persist<T>>) {
    loop {
        persist.changed.notified().await;
        let p = persist.clone();
        let took = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            p.save_if_dirty();
            t.elapsed()
        })
        .await
        .unwrap_or_default();
        tokio::time::sleep(pause_after(took, SAVE_INTERVAL)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_writes_wait_longer_up_to_a_minute() {
        let ms = Duration::from_millis;
        // Quick writes: the floor.
        assert_eq!(pause_after(ms(1), SAVE_INTERVAL), SAVE_INTERVAL);
        assert_eq!(
            pause_after(Duration::ZERO, Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        // A 30 ms write: 30 s, a thousandth of a core.
        assert_eq!(pause_after(ms(30), SAVE_INTERVAL), Duration::from_secs(30));
        // A very slow one: a minute at most, and never under the floor.
        assert_eq!(
            pause_after(Duration::from_secs(2), SAVE_INTERVAL),
            MAX_SAVE_INTERVAL
        );
        let floor = Duration::from_secs(90);
        assert_eq!(pause_after(Duration::from_secs(2), floor), floor);
    }
}
