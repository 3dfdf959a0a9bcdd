//! `kwire policy trace` as a user runs it, with a Service as `--to`: the help says what `--to`
//! accepts, the output shows the translation and the verdict, the exit code is the verdict's.

use std::path::PathBuf;
use std::process::Command;

const CLUSTER: &str = r#"
kind: Pod
metadata: {name: client, namespace: x}
status: {podIP: 10.0.1.1}
---
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.2.1}
---
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: http}]}
---
kind: Service
metadata: {name: empty, namespace: shop}
spec: {selector: {app: none}, clusterIP: 10.96.0.11, ports: [{port: 80}]}
"#;

fn fixture() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kwire-trace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cluster.yaml");
    std::fs::write(&path, CLUSTER).unwrap();
    path
}

fn trace(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kwire"))
        .args(["policy", "trace"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_names_services_as_destinations() {
    let (code, out, _) = trace(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("svc/NS/NAME[:PORT]") && out.contains("--source-port"),
        "{out}"
    );
}

#[test]
fn a_service_destination_shows_backend_translation_and_verdict() {
    let f = fixture();
    let f = f.to_str().unwrap();
    let (code, out, err) = trace(&["-f", f, "--from", "x/client", "--to", "svc/shop/web:http"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("SERVICE shop/web 10.96.0.10:80/TCP: backend 10.0.2.1:8080 (shop/web-1)"),
        "{out}"
    );
    assert!(
        out.contains("becomes 10.0.1.1:32768 -> 10.0.2.1:8080"),
        "{out}"
    );
    assert!(
        out.contains("ALLOWED: x/client (10.0.1.1) -> shop/web-1 (10.0.2.1) on 8080/TCP"),
        "{out}"
    );

    let (code, out, _) = trace(&[
        "-f",
        f,
        "--from",
        "x/client",
        "--to",
        "10.96.0.11",
        "--port",
        "80",
    ]);
    assert_eq!(code, Some(1), "refused is a result, not an error: {out}");
    assert!(
        out.contains("REFUSED") && out.contains("TCP reset"),
        "{out}"
    );

    let (code, _, err) = trace(&["-f", f, "--from", "x/client", "--to", "svc/shop/nope:80"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no such Service"), "{err}");
}
