//! The node's private key file: created once in the state directory, reused on restart,
//! refused when anyone but its owner could read it or when it is a symlink.

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
    let err = |source| KeyFileError::Create {
        path: path.to_path_buf(),
        source,
    };
    let key = PrivateKey::generate();
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
    Ok(key)
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
