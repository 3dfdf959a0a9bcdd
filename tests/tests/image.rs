//! The container image: `scripts/build-image.sh` (what `make image` runs) assembles an OCI
//! archive offline with buildah from scratch, from static release binaries and
//! `deploy/image.txt`; skopeo reads back its entrypoint and contents. The Containerfile builds
//! with the workspace's rust-version and `.containerignore` keeps `target/` out.
//! Needs root, buildah and skopeo (`scripts/install-deps.sh --image`); builds the release
//! binaries (minutes on a cold target/).

use std::path::{Path, PathBuf};
use std::process::Command;

use kwire_tests::lab::parse_json;
use kwire_tests::{require_root, require_tool, Scratch};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn containerfile_uses_the_workspace_rust_version_and_keeps_target_out() {
    let ws = workspace();
    let cargo = std::fs::read_to_string(ws.join("Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("rust-version in the workspace");
    let containerfile = std::fs::read_to_string(ws.join("deploy/Containerfile")).unwrap();
    assert!(
        containerfile.contains(&format!("ARG RUST_VERSION={version}\n"))
            && containerfile.contains("FROM docker.io/library/rust:${RUST_VERSION}-bookworm"),
        "deploy/Containerfile must build with rust {version}"
    );
    let ignore = std::fs::read_to_string(ws.join(".containerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "{ignore}");
}

#[test]
fn make_image_assembles_a_static_oci_image_offline() {
    require_root!();
    require_tool("buildah");
    require_tool("skopeo");
    let scratch = Scratch::new("image");
    let archive = scratch.file("kwire.tar");
    run(Command::new(workspace().join("scripts/build-image.sh"))
        .current_dir(workspace())
        .arg("--out")
        .arg(&archive));
    let reference = format!("oci-archive:{}", archive.display());
    let config = parse_json(&run(
        Command::new("skopeo").args(["inspect", "--config", &reference])
    ))
    .unwrap();
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/kwire"])
    );
    assert!(config["config"]["Env"]
        .to_string()
        .contains("PATH=/usr/local/sbin:/usr/local/bin"));
    let inspect = parse_json(&run(Command::new("skopeo").args(["inspect", &reference]))).unwrap();
    assert_eq!(inspect["Labels"]["org.opencontainers.image.title"], "kwire");

    // The layer's files: exactly deploy/image.txt's (plus the libraries of host tools), and
    // the two kwire binaries static.
    let dir = scratch.file("oci");
    run(Command::new("skopeo")
        .args(["copy", &reference])
        .arg(format!("dir:{}", dir.display())));
    let unpacked = scratch.file("rootfs");
    std::fs::create_dir_all(&unpacked).unwrap();
    let manifest =
        parse_json(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let mut files = Vec::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        let blob = dir.join(digest);
        files.extend(
            run(Command::new("tar").arg("-tf").arg(&blob))
                .lines()
                .map(str::to_string),
        );
        run(Command::new("tar")
            .arg("-xf")
            .arg(&blob)
            .arg("-C")
            .arg(&unpacked));
    }
    for f in kwire_lab::manifests::image_files() {
        let rel = f.path.trim_start_matches('/');
        assert!(
            files.iter().any(|x| x.trim_start_matches("./") == rel),
            "{rel} not in the image: {files:?}"
        );
    }
    assert!(
        !files
            .iter()
            .any(|f| f.contains("target/") || f.contains(".git")),
        "{files:?}"
    );
    for b in ["usr/local/bin/kwire", "usr/local/bin/kwire-cni"] {
        let ldd = Command::new("ldd").arg(unpacked.join(b)).output().unwrap();
        let text = String::from_utf8_lossy(&ldd.stdout).to_string()
            + &String::from_utf8_lossy(&ldd.stderr);
        assert!(
            text.contains("statically linked") || text.contains("not a dynamic executable"),
            "{b} is not static: {text}"
        );
    }
    // The static plugin runs on its own: VERSION needs no daemon.
    let out = Command::new(unpacked.join("usr/local/bin/kwire-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("supportedVersions"),
        "{out:?}"
    );
}
