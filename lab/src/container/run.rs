//! `kwire-lab container-run SPEC`: the steps of [`super`]'s module doc. Runs single-threaded
//! (it forks), before any async runtime exists.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, execve, fork, pivot_root, ForkResult};

use super::{ContainerSpec, Propagation};

/// Exit code when the container could not be set up (as runc's 126/127 are for exec).
pub const SETUP_FAILED: i32 = 126;

/// Device nodes every container gets.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// /proc entries runc masks (a bind of /dev/null over each).
const PROC_MASKED: &[&str] = &["kcore", "keys", "timer_list", "sched_debug"];
/// /proc entries runc makes read-only.
const PROC_READ_ONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];

type Result<T> = std::result::Result<T, String>;

fn ctx<T, E: std::fmt::Display>(
    r: std::result::Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

fn mnt(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    ctx(mount(src, target, fstype, flags, data), || {
        format!("mount {:?} on {} ({flags:?})", src, target.display())
    })
}

/// Runs the container described by the JSON file `spec_path`; returns the exit code.
pub fn container_run(spec_path: &Path) -> i32 {
    let spec: ContainerSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "kwire-lab container-run: cannot read {}: {e}",
                spec_path.display()
            );
            return SETUP_FAILED;
        }
    };
    match enter_and_fork(&spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kwire-lab container-run {}: {e}", spec.name);
            SETUP_FAILED
        }
    }
}

fn enter_and_fork(spec: &ContainerSpec) -> Result<i32> {
    if let Some(ns) = &spec.netns {
        let f = ctx(File::open(ns), || format!("opening {}", ns.display()))?;
        ctx(setns(&f, CloneFlags::CLONE_NEWNET), || {
            format!("entering {}", ns.display())
        })?;
    }
    // The PID namespace applies to the next child; this process stays in the host's mount
    // namespace (the child's pivot_root would otherwise move this process's root too).
    ctx(unshare(CloneFlags::CLONE_NEWPID), || {
        "unshare(pid)".to_string()
    })?;
    // Safety: this process is single-threaded (no runtime, no threads started), so the child
    // may do anything the parent could.
    match unsafe { fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            let e = setup_and_exec(spec).unwrap_err();
            eprintln!("kwire-lab container-run {}: {e}", spec.name);
            std::process::exit(SETUP_FAILED);
        }
        Ok(ForkResult::Parent { child }) => {
            // SIGTERM, SIGINT and SIGHUP sent to this process are passed on to the container
            // (as a runtime's shim does); a process group signal reaches both, which the
            // container's own handlers take twice without harm.
            CHILD.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
            for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
                // Safety: the handler only calls kill(2), which is async-signal-safe.
                let _ = unsafe { signal(s, SigHandler::Handler(forward)) };
            }
            let _ = std::fs::write(&spec.pid_file, format!("{child}\n"));
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waiting for the container: {e}")),
                }
            }
        }
    }
}

/// The container's pid, for [`forward`].
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward(sig: nix::libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // Safety: kill(2) is async-signal-safe and touches no memory of this process.
        unsafe { nix::libc::kill(pid, sig) };
    }
}

fn target_in(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Creates what a bind mount of `source` needs at `target`: a directory or an empty file.
fn mount_point(source: &Path, target: &Path) -> Result<()> {
    if source.is_dir() {
        ctx(std::fs::create_dir_all(target), || {
            format!("mkdir {}", target.display())
        })
    } else {
        if let Some(p) = target.parent() {
            ctx(std::fs::create_dir_all(p), || {
                format!("mkdir {}", p.display())
            })?;
        }
        if !target.exists() {
            ctx(File::create(target), || {
                format!("creating {}", target.display())
            })?;
        }
        Ok(())
    }
}

fn bind(source: &Path, target: &Path, read_only: bool, recursive: bool) -> Result<()> {
    mount_point(source, target)?;
    let rec = if recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mnt(Some(source), target, None, MsFlags::MS_BIND | rec, None)?;
    if read_only {
        mnt(
            None,
            target,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
            None,
        )?;
    }
    Ok(())
}

fn setup_and_exec(spec: &ContainerSpec) -> Result<std::convert::Infallible> {
    // If `container-run` is killed outright, the container goes too (no orphaned agent).
    ctx(nix::sys::prctl::set_pdeathsig(Signal::SIGKILL), || {
        "PR_SET_PDEATHSIG".to_string()
    })?;
    ctx(
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC),
        || "unshare(mount, ipc)".to_string(),
    )?;
    // Nothing this namespace mounts reaches the host; the host's new mounts still arrive where
    // a volume asks for them (rslave).
    mnt(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None,
    )?;
    let root = spec.rootfs.as_path();
    ctx(std::fs::create_dir_all(root), || {
        format!("mkdir {}", root.display())
    })?;
    mnt(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755"),
    )?;

    for (path, source) in &spec.image {
        bind(source, &target_in(root, path), true, false)?;
    }

    let proc_dir = root.join("proc");
    ctx(std::fs::create_dir_all(&proc_dir), || {
        "mkdir /proc".to_string()
    })?;
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        hardened,
        None,
    )?;
    for p in PROC_MASKED {
        let t = proc_dir.join(p);
        if t.exists() {
            mnt(
                Some(Path::new("/dev/null")),
                &t,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    for p in PROC_READ_ONLY {
        let t = proc_dir.join(p);
        if t.exists() {
            mnt(Some(&t), &t, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
            mnt(
                None,
                &t,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | hardened,
                None,
            )?;
        }
    }
    let sys_dir = root.join("sys");
    ctx(std::fs::create_dir_all(&sys_dir), || {
        "mkdir /sys".to_string()
    })?;
    mnt(
        Some(Path::new("sysfs")),
        &sys_dir,
        Some("sysfs"),
        hardened | MsFlags::MS_RDONLY,
        None,
    )?;

    let dev = root.join("dev");
    ctx(std::fs::create_dir_all(&dev), || "mkdir /dev".to_string())?;
    mnt(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=755"),
    )?;
    for d in DEVICES {
        bind(&Path::new("/dev").join(d), &dev.join(d), false, false)?;
    }
    ctx(std::fs::create_dir_all(dev.join("shm")), || {
        "mkdir /dev/shm".to_string()
    })?;
    mnt(
        Some(Path::new("shm")),
        &dev.join("shm"),
        Some("tmpfs"),
        hardened,
        Some("mode=1777,size=65536k"),
    )?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx(std::os::unix::fs::symlink(to, dev.join(link)), || {
            format!("/dev/{link}")
        })?;
    }
    for f in ["hosts", "resolv.conf"] {
        let host = Path::new("/etc").join(f);
        if host.exists() {
            bind(&host, &root.join("etc").join(f), true, false)?;
        }
    }

    for m in &spec.mounts {
        let target = target_in(root, &m.target);
        bind(&m.source, &target, m.read_only, true)?;
        let prop = match m.propagation {
            Propagation::Private => MsFlags::MS_PRIVATE,
            Propagation::Slave => MsFlags::MS_SLAVE,
            Propagation::Shared => MsFlags::MS_SHARED,
        };
        mnt(None, &target, None, MsFlags::MS_REC | prop, None)?;
    }

    ctx(chdir(root), || "chdir to the new root".to_string())?;
    ctx(std::fs::create_dir_all(".oldroot"), || {
        "mkdir .oldroot".to_string()
    })?;
    ctx(pivot_root(".", ".oldroot"), || "pivot_root".to_string())?;
    ctx(chdir("/"), || "chdir /".to_string())?;
    ctx(umount2("/.oldroot", MntFlags::MNT_DETACH), || {
        "unmounting the old root".to_string()
    })?;
    ctx(std::fs::remove_dir("/.oldroot"), || {
        "rmdir /.oldroot".to_string()
    })?;
    if spec.read_only_root {
        mnt(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None,
        )?;
    }

    set_capabilities(&spec.capabilities, spec.no_new_privileges)?;

    let program = resolve(&spec.argv[0], &spec.env)?;
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let argv: Vec<CString> = spec.argv.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<_>>()?;
    let path = CString::new(program.as_os_str().as_bytes()).map_err(|_| "bad path".to_string())?;
    ctx(execve(&path, &argv, &env), || {
        format!("exec {}", program.display())
    })
}

/// `argv[0]` itself when it has a '/', else the first match on the container's PATH.
fn resolve(arg0: &str, env: &[(String, String)]) -> Result<PathBuf> {
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/local/bin:/usr/bin:/bin", |(_, v)| v.as_str());
    path.split(':')
        .map(|d| Path::new(d).join(arg0))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{arg0}: not found in the container's PATH {path}"))
}

/// Bounding, inheritable, ambient, permitted and effective sets as runc leaves them for a
/// root process with `set`: after `execve` all of bounding, permitted and effective are `set`.
fn set_capabilities(set: &[String], no_new_privileges: bool) -> Result<()> {
    use caps::{CapSet, Capability, CapsHashSet};
    let wanted: CapsHashSet = set
        .iter()
        .map(|c| {
            format!("CAP_{c}")
                .parse::<Capability>()
                .map_err(|e| format!("capability {c}: {e}"))
        })
        .collect::<Result<_>>()?;
    ctx(caps::clear(None, CapSet::Ambient), || {
        "clearing the ambient set".to_string()
    })?;
    let supported = caps::runtime::thread_all_supported();
    for cap in supported {
        if !wanted.contains(&cap) {
            ctx(caps::drop(None, CapSet::Bounding, cap), || {
                format!("dropping {cap} from the bounding set")
            })?;
        }
    }
    ctx(
        caps::set(None, CapSet::Inheritable, &HashSet::new()),
        || "clearing the inheritable set".to_string(),
    )?;
    ctx(caps::set(None, CapSet::Effective, &wanted), || {
        "setting the effective set".to_string()
    })?;
    ctx(caps::set(None, CapSet::Permitted, &wanted), || {
        "setting the permitted set".to_string()
    })?;
    if no_new_privileges {
        ctx(nix::sys::prctl::set_no_new_privs(), || {
            "no_new_privs".to_string()
        })?;
    }
    Ok(())
}
