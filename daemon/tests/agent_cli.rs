//! `kwire agent` refuses an unsafe key file before touching the network, with a message that
//! names the file and what to do. No root needed.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kwire-agent-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn agent(state: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kwire"))
        .args([
            "agent",
            "--node-name",
            "n1",
            "--interface",
            "kwcli0",
            "--kubeconfig",
            "/nonexistent",
        ])
        .arg("--state-dir")
        .arg(state)
        .arg("--uapi-dir")
        .arg(state.join("uapi"))
        .output()
        .unwrap()
}

#[test]
fn refuses_a_group_readable_key_file() {
    let dir = scratch("mode");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let key = state.join("private.key");
    std::fs::write(&key, "GBnNQXdL5YbqHrCRt3wlPYE0Tlxa0Y2/pPm36SPwUlY=\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
    assert!(
        !err.contains("GBnNQXdL"),
        "the key never reaches the output: {err}"
    );
    assert!(
        !state.join("uapi").exists(),
        "refused before any socket was made"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_a_symlinked_key_file() {
    let dir = scratch("link");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        dir.join("elsewhere.key"),
        "GBnNQXdL5YbqHrCRt3wlPYE0Tlxa0Y2/pPm36SPwUlY=\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(dir.join("elsewhere.key"), state.join("private.key")).unwrap();
    let out = agent(&state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("symlink") && err.contains("private.key"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
