//! Processes started by tests, stopped on drop, their logs printed on failure.

#[allow(unused_imports)]
use crate::*;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A process started by a test; stopped on drop (its stop signal, then SIGKILL after
/// [`STOP_GRACE`]). Output goes to `log`, printed (tail) when the test panics.
pub struct Proc {
    child: Option<Child>,
    name: String,
    log: PathBuf,
    stop_signal: Signal,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, name: impl Into<String>, log: PathBuf) -> Proc {
        let name = name.into();
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            child: Some(child),
            name,
            log,
            stop_signal: Signal::SIGTERM,
            status: None,
        }
    }

    /// Uses `sig` instead of SIGTERM to stop it (tcpdump: SIGINT).
    pub fn with_stop_signal(mut self, sig: Signal) -> Proc {
        self.stop_signal = sig;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it wrote so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Its exit status if it has exited (reaps it), None while it runs.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().expect("waitpid");
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `deadline` for it to exit by itself.
    pub fn wait_timeout(&mut self, deadline: Duration) -> Option<ExitStatus> {
        try_wait_until(deadline, || self.try_status().is_some());
        self.status
    }

    /// Sends `sig` (if it still runs).
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid() as i32), sig);
        }
    }

    /// Stops it: stop signal, then SIGKILL if it has not exited after [`STOP_GRACE`].
    /// Returns how it exited, and whether it needed SIGKILL.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        if let Some(st) = self.try_status() {
            return (st, false);
        }
        self.signal(self.stop_signal);
        if let Some(st) = self.wait_timeout(STOP_GRACE) {
            return (st, false);
        }
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        let st = self
            .child
            .as_mut()
            .expect("child")
            .wait()
            .expect("waitpid after SIGKILL");
        self.status = Some(st);
        (st, true)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let running = self.is_running();
        self.stop();
        if panicking {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "---- {} (pid {}, {}) log {} (last {} lines) ----",
                self.name,
                self.pid(),
                if running { "was running" } else { "had exited" },
                self.log.display(),
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}
