//! The node's private key file: created once in the state directory, reused on restart,
//! refused when anyone but its owner could read it or when it is a symlink.
//!
//! Key rotation keeps its steps on disk, so that a restart at any point resumes it: the next
//! key beside the current one ([`NEXT_KEY_FILE`], written whole under a temporary name and
//! renamed), then the promotion: the current key hard-linked to [`OLD_KEY_FILE`], the next
//! key renamed over the current one (one atomic step), the old key overwritten with zeros
//! and removed. A leftover old key (a restart during the promotion) is wiped at start.

use crate::wg::key::PrivateKey;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Name of the key file inside the state directory.
pub const KEY_FILE: &str = "private.key";
/// Mode of the state directory: only root may list or enter it.
pub const STATE_DIR_MODE: u32 = 0o700;
/// Mode of the key file.
pub const KEY_FILE_MODE: u32 = 0o600;
/// The key the node rotates to, while it rotates.
pub const NEXT_KEY_FILE: &str = "private.key.next";
/// The key being replaced, between the promotion's rename and its wiping.
pub const OLD_KEY_FILE: &str = "private.key.old";
/// Prefix of a key file being written (renamed into place when complete).
const TMP_PREFIX: &str = ".private.key.tmp.";

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot create or secure the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state directory {path} is a symlink or not a directory; point --state-dir at a real directory")]
    StateDirNotDir { path: PathBuf },
    #[error("private key file {path} is a symlink or not a regular file; remove it (a new key is created) or replace it with the real file")]
    NotRegular { path: PathBuf },
    #[error("private key file {path} has mode {mode:04o}: readable by group or others; run `chmod 600 {path}`, or delete it and rotate the key if it may have leaked")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("private key file {path} is owned by uid {uid}, not by this process (uid {me}); `chown` it or delete it to create a new key")]
    Owner { path: PathBuf, uid: u32, me: u32 },
    #[error("private key file {path} does not hold a base64 x25519 key (as `wg genkey` prints); delete it to create a new key")]
    Malformed { path: PathBuf },
    #[error("cannot read private key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot replace or remove private key file {path}")]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create private key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates `dir` (mode 0700) if needed and tightens its mode to 0700 if it is looser.
pub fn ensure_state_dir(dir: &Path) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(KeyFileError::StateDirNotDir {
                path: dir.to_path_buf(),
            })
        }
        Ok(m) => {
            if m.mode() & 0o777 != STATE_DIR_MODE {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
                    .map_err(err)?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(STATE_DIR_MODE)
                .create(dir)
                .map_err(err)?;
            // `recursive` applies the mode through the umask: make sure of the last component.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
                .map_err(err)?;
        }
        Err(e) => return Err(err(e)),
    }
    Ok(())
}

/// Loads the key in `dir/private.key`, or creates it (O_EXCL|O_NOFOLLOW, mode 0600) on the
/// first start. The key's bytes never appear in an error.
pub fn load_or_create(dir: &Path) -> Result<PrivateKey, KeyFileError> {
    ensure_state_dir(dir)?;
    let path = dir.join(KEY_FILE);
    // Two tries: if another process creates the file between our open and our create, read it.
    for _ in 0..2 {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return read_key(&path, f),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(KeyFileError::NotRegular { path })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match create_key(&path) {
                Ok(k) => return Ok(k),
                Err(KeyFileError::Create { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    continue
                }
                Err(e) => return Err(e),
            },
            Err(source) => return Err(KeyFileError::Read { path, source }),
        }
    }
    Err(KeyFileError::Read {
        path: path.clone(),
        source: std::io::ErrorKind::AlreadyExists.into(),
    })
}

/// Longest key file read: 44 base64 characters, a newline, room for stray whitespace.
const MAX_KEY_FILE_BYTES: usize = 128;

fn read_key(path: &Path, mut f: File) -> Result<PrivateKey, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let m = f.metadata().map_err(read_err)?;
    if !m.is_file() {
        return Err(KeyFileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mode = m.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(KeyFileError::Owner {
            path: path.to_path_buf(),
            uid: m.uid(),
            me,
        });
    }
    // A key file is 45 bytes; read at most a little more so a huge file is refused cheaply.
    // Into a fixed buffer zeroed on drop: a growing Vec would leave copies of the key behind.
    let mut text = Zeroizing::new([0u8; MAX_KEY_FILE_BYTES + 1]);
    let mut n = 0;
    while n < text.len() {
        match f.read(&mut text[n..]) {
            Ok(0) => break,
            Ok(r) => n += r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    if n > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::Malformed {
            path: path.to_path_buf(),
        });
    }
    let trimmed = text[..n].trim_ascii();
    let mut bytes = Zeroizing::new([0u8; 32]);
    match STANDARD.decode_slice(trimmed, &mut bytes[..]) {
        Ok(32) if trimmed.len() == 44 => {}
        _ => {
            return Err(KeyFileError::Malformed {
                path: path.to_path_buf(),
            })
        }
    }
    PrivateKey::from_bytes(*bytes).ok_or_else(|| KeyFileError::Malformed {
        path: path.to_path_buf(),
    })
}

fn create_key(path: &Path) -> Result<PrivateKey, KeyFileError> {
    let key = PrivateKey::generate();
    write_new(path, &key)?;
    Ok(key)
}

/// Writes `key` to the new file `path` (O_EXCL|O_NOFOLLOW, 0600) and syncs it and its
/// directory; removes it again on failure.
fn write_new(path: &Path, key: &PrivateKey) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    // Sized for the 44 characters and the newline up front: a String that grows moves its
    // bytes and leaves the old copy behind, unzeroed.
    let mut text = Zeroizing::new(String::with_capacity(45));
    STANDARD.encode_string(key.expose_bytes(), &mut text);
    text.push('\n');
    debug_assert_eq!(text.capacity(), 45, "no reallocation");
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    if let Some(dir) = path.parent() {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Writes `key` as `dir/name` whole or not at all: a temporary file renamed into place.
fn write_atomic(dir: &Path, name: &str, key: &PrivateKey) -> Result<(), KeyFileError> {
    let tmp = dir.join(format!("{TMP_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, key)?;
    let path = dir.join(name);
    if let Err(source) = std::fs::rename(&tmp, &path) {
        wipe(&tmp);
        return Err(KeyFileError::Replace { path, source });
    }
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    let _ = File::open(dir).and_then(|d| d.sync_all());
}

/// Overwrites the key file `path` with zeros, syncs and removes it (best effort: a file that
/// cannot be opened is still removed). Never follows a symlink.
fn wipe(path: &Path) {
    if let Ok(mut f) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        if let Ok(m) = f.metadata() {
            if m.is_file() && m.nlink() == 1 {
                let zeros = vec![0u8; m.len().min(MAX_KEY_FILE_BYTES as u64 * 8) as usize];
                let _ = f.write_all(&zeros).and_then(|()| f.sync_all());
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

/// The key the node rotates to, if a rotation is under way (`dir/private.key.next`), with
/// the same checks as the current key's file.
pub fn load_next(dir: &Path) -> Result<Option<PrivateKey>, KeyFileError> {
    let path = dir.join(NEXT_KEY_FILE);
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => read_key(&path, f).map(Some),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(KeyFileError::NotRegular { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyFileError::Read { path, source }),
    }
}

/// Starts a rotation on disk: a fresh key written whole as `dir/private.key.next`.
pub fn create_next(dir: &Path) -> Result<PrivateKey, KeyFileError> {
    let key = PrivateKey::generate();
    write_atomic(dir, NEXT_KEY_FILE, &key)?;
    Ok(key)
}

/// Ends a rotation on disk: the next key becomes the current key in one rename, and the old
/// key is wiped. Safe to repeat after a crash at any point.
pub fn promote_next(dir: &Path) -> Result<(), KeyFileError> {
    let (key, next, old) = (
        dir.join(KEY_FILE),
        dir.join(NEXT_KEY_FILE),
        dir.join(OLD_KEY_FILE),
    );
    if !next.exists() {
        wipe_leftovers(dir);
        return Ok(());
    }
    // The old key keeps a name until the new one is in place: a crash in between leaves two
    // names for it, which the start cleans up (it is never zeroed while it is the key).
    let _ = std::fs::remove_file(&old);
    std::fs::hard_link(&key, &old).map_err(|source| KeyFileError::Replace {
        path: old.clone(),
        source,
    })?;
    std::fs::rename(&next, &key).map_err(|source| KeyFileError::Replace {
        path: key.clone(),
        source,
    })?;
    sync_dir(dir);
    wipe(&old);
    sync_dir(dir);
    Ok(())
}

/// Replaces the current key with `key` at once (revocation), wiping the old one; a rotation
/// under way is dropped with it.
pub fn replace_current(dir: &Path, key: &PrivateKey) -> Result<(), KeyFileError> {
    discard_next(dir);
    let (cur, old) = (dir.join(KEY_FILE), dir.join(OLD_KEY_FILE));
    let _ = std::fs::remove_file(&old);
    if let Err(source) = std::fs::hard_link(&cur, &old) {
        if source.kind() != std::io::ErrorKind::NotFound {
            return Err(KeyFileError::Replace { path: old, source });
        }
    }
    write_atomic(dir, KEY_FILE, key)?;
    wipe(&old);
    sync_dir(dir);
    Ok(())
}

/// Abandons a rotation on disk: the next key is wiped.
pub fn discard_next(dir: &Path) {
    wipe(&dir.join(NEXT_KEY_FILE));
    sync_dir(dir);
}

/// Wipes what an interrupted promotion or write left: the old key (unless it is still the
/// current key's only other name, then just that name goes) and temporary key files.
pub fn wipe_leftovers(dir: &Path) {
    let old = dir.join(OLD_KEY_FILE);
    if let (Ok(o), Ok(k)) = (
        std::fs::symlink_metadata(&old),
        std::fs::symlink_metadata(dir.join(KEY_FILE)),
    ) {
        if o.ino() == k.ino() && o.dev() == k.dev() {
            let _ = std::fs::remove_file(&old);
        }
    }
    if old.exists() {
        wipe(&old);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                wipe(&e.path());
            }
        }
    }
    sync_dir(dir);
}

/// When the current key was written (its file's modification time): the key's age.
pub fn key_written(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::symlink_metadata(dir.join(KEY_FILE))
        .and_then(|m| m.modified())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kwire-keyfile-{tag}-{}-{}",
            std::process::id(),
            rand_core::RngCore::next_u32(&mut rand_core::OsRng)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_0600_in_a_0700_dir_and_reused() {
        let base = tmpdir("create");
        let dir = base.join("state");
        let k1 = load_or_create(&dir).unwrap();
        let dm = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        let fm = std::fs::metadata(dir.join(KEY_FILE)).unwrap().mode() & 0o777;
        assert_eq!((dm, fm), (0o700, 0o600));
        let k2 = load_or_create(&dir).unwrap();
        assert_eq!(k1, k2, "the key is reused on restart");
        // The file holds what `wg pubkey` reads.
        let text = std::fs::read_to_string(dir.join(KEY_FILE)).unwrap();
        assert_eq!(text.trim().len(), 44);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn loose_state_dir_mode_is_tightened() {
        let dir = tmpdir("loose");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        load_or_create(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn world_readable_key_is_refused_naming_the_path() {
        let dir = tmpdir("mode");
        load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&dir).unwrap_err();
        assert!(
            matches!(e, KeyFileError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("chmod 600"),
            "{msg}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_or_create(&dir),
            Err(KeyFileError::Permissions { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn symlinked_key_is_refused() {
        let dir = tmpdir("link");
        let other = tmpdir("link-target");
        load_or_create(&other).unwrap();
        ensure_state_dir(&dir).unwrap();
        std::os::unix::fs::symlink(other.join(KEY_FILE), dir.join(KEY_FILE)).unwrap();
        let e = load_or_create(&dir).unwrap_err();
        assert!(matches!(e, KeyFileError::NotRegular { .. }), "{e}");
        assert!(e.to_string().contains("symlink"));
        // A dangling symlink is refused too, not followed to create a file elsewhere.
        std::fs::remove_dir_all(&other).unwrap();
        assert!(matches!(
            load_or_create(&dir),
            Err(KeyFileError::NotRegular { .. }) | Err(KeyFileError::Create { .. })
        ));
        assert!(!other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rotation on disk: the next key is written 0600 beside the current one and read
    /// back; the promotion makes it the current key and leaves no trace of the old one; a
    /// crash between the promotion's link and rename leaves the current key intact (the start
    /// only removes the second name), a crash after the rename leaves an old key the start
    /// wipes.
    #[test]
    fn rotation_steps_on_disk_resume_and_leave_no_old_key() {
        let dir = tmpdir("rotate");
        let k0 = load_or_create(&dir).unwrap();
        assert!(load_next(&dir).unwrap().is_none());
        let k1 = create_next(&dir).unwrap();
        let m = std::fs::metadata(dir.join(NEXT_KEY_FILE)).unwrap().mode() & 0o777;
        assert_eq!(m, 0o600);
        assert_eq!(load_next(&dir).unwrap(), Some(k1.clone()));
        assert_eq!(load_or_create(&dir).unwrap(), k0, "still the current key");
        // Crash after the link, before the rename: the key is untouched.
        std::fs::hard_link(dir.join(KEY_FILE), dir.join(OLD_KEY_FILE)).unwrap();
        wipe_leftovers(&dir);
        assert!(!dir.join(OLD_KEY_FILE).exists());
        assert_eq!(load_or_create(&dir).unwrap(), k0);
        promote_next(&dir).unwrap();
        assert_eq!(load_or_create(&dir).unwrap(), k1);
        assert!(load_next(&dir).unwrap().is_none());
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![KEY_FILE.to_string()], "nothing else left");
        // Promoting again (a restart after the rename) changes nothing.
        promote_next(&dir).unwrap();
        assert_eq!(load_or_create(&dir).unwrap(), k1);
        // Crash after the rename, before the wipe: the old key is wiped at start.
        std::fs::write(dir.join(OLD_KEY_FILE), b"old").unwrap();
        wipe_leftovers(&dir);
        assert!(!dir.join(OLD_KEY_FILE).exists());
        // Revocation: a new current key at once; a rotation under way goes with it.
        create_next(&dir).unwrap();
        let k2 = PrivateKey::generate();
        replace_current(&dir, &k2).unwrap();
        assert_eq!(load_or_create(&dir).unwrap(), k2);
        assert!(load_next(&dir).unwrap().is_none());
        assert!(!dir.join(OLD_KEY_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_key_is_refused_without_echoing_it() {
        let dir = tmpdir("bad");
        ensure_state_dir(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(b"c2VjcmV0LXNlY3JldA==\n").unwrap();
        let e = load_or_create(&dir).unwrap_err();
        assert!(matches!(e, KeyFileError::Malformed { .. }));
        assert!(!e.to_string().contains("c2VjcmV0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
