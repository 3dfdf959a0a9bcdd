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
    agent_with(state, &["--cluster-cidr", "10.244.0.0/16"])
}

fn agent_with(state: &std::path::Path, extra: &[&str]) -> std::process::Output {
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
        .args(extra)
        .env_remove("KWIRE_CLUSTER_CIDR")
        .env_remove("KWIRE_SERVICE_CIDR")
        .arg("--state-dir")
        .arg(state)
        .arg("--uapi-dir")
        .arg(state.join("uapi"))
        .output()
        .unwrap()
}

/// Without the cluster's ranges the agent cannot fail closed: it refuses to start, says how
/// to set them, and touches nothing (no key, no socket).
#[test]
fn refuses_to_start_without_cluster_cidr_and_says_how_to_set_it() {
    let dir = scratch("nocidr");
    let state = dir.join("state");
    let out = agent_with(&state, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--cluster-cidr is required")
            && err.contains("kube-controller-manager")
            && err.contains("KWIRE_CLUSTER_CIDR"),
        "{err}"
    );
    assert!(!state.join("private.key").exists(), "no key made");
    for (flags, want) in [
        (
            vec!["--cluster-cidr", "10.244.1.5/16"],
            "has host bits set: did you mean 10.244.0.0/16?",
        ),
        (vec!["--cluster-cidr", "0.0.0.0/0"], "wider than /8"),
        (
            vec![
                "--cluster-cidr",
                "10.244.0.0/16",
                "--service-cidr",
                "10.244.128.0/20",
            ],
            "overlap",
        ),
    ] {
        let out = agent_with(&state, &flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{flags:?}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
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
