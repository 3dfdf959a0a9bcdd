//! Scratch directories under /tmp/kwire-tests, kept when a test fails.

#[allow(unused_imports)]
use crate::*;
use std::fs::{self};
use std::path::{Path, PathBuf};

/// A directory under /tmp/kwire-tests for one test's files, removed on drop unless the test
/// panicked or `KWIRE_KEEP_SCRATCH` is set (then its path is printed, for the logs and pcaps
/// inside).
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path = Path::new(SCRATCH_ROOT).join(format!("{}-{tag}", unique_id()));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("KWIRE_KEEP_SCRATCH").is_some() {
            eprintln!(
                "kept scratch directory of the failed test: {}",
                self.path.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}
