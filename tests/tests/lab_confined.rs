//! The lab runs `deploy/kwire.yaml`'s DaemonSet pod as the kubelet would, and the API stand-in
//! holds each agent to `deploy/`'s RBAC and admission policy (issue 12's "Show"):
//!
//! - each agent's capability sets (`/proc/PID/status`) are exactly the manifest's; its mount
//!   namespace has the image's files and the declared volumes, nothing else of the host;
//!   `/proc/sys` is read-only; it has the manifest's args and env, in-cluster configuration and
//!   no kubeconfig, and reaches the API with the token bound to its own node;
//! - with a node's credentials (`kwire-lab kubeconfig --node n1`): annotating another Node is
//!   refused with the admission policy's message, its own is allowed, Secrets are forbidden;
//! - the ClusterRole grants exactly the calls the agents make (by verb and resource, from the
//!   stand-in's audit), no more.
//!
//! Needs root, kubectl and a built kwire; one lab for the whole file.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kwire_lab::manifests;
use kwire_tests::lab::{kubectl, parse_json, Json, JsonExt, Lab};
use kwire_tests::{require_agent, require_tool, wait_until};

const TIMEOUT: &str = "60";
const CONVERGE: Duration = Duration::from_secs(30);
const AGENT_USER: &str = "system:serviceaccount:kube-system:kwire";

fn node<'a>(st: &'a Json, name: &str) -> &'a Json {
    st["nodes"]
        .array()
        .iter()
        .find(|n| n["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// The `CapXxx:` masks of `/proc/PID/status`.
fn cap_masks(pid: u64) -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let k = k.strip_prefix("Cap")?;
            Some((k.to_string(), u64::from_str_radix(v.trim(), 16).ok()?))
        })
        .collect()
}

fn mask_of(caps: &BTreeSet<String>) -> u64 {
    caps.iter()
        .map(|c| {
            format!("CAP_{c}")
                .parse::<caps::Capability>()
                .unwrap_or_else(|e| panic!("{c}: {e}"))
                .bitmask()
        })
        .fold(0, |a, b| a | b)
}

/// Mount points of a process, as its own root sees them.
fn mount_points(pid: u64) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[4].to_string(), f[5].to_string())
        })
        .collect()
}

/// Every (verb, apiGroup, resource) a ClusterRole's rules name.
fn role_grants(role: &Json) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].array() {
        for g in rule["apiGroups"].strings() {
            for r in rule["resources"].strings() {
                for v in rule["verbs"].strings() {
                    out.insert((v.clone(), g.clone(), r.clone()));
                }
            }
        }
    }
    out
}

fn audit(lab: &Lab) -> Vec<Json> {
    let text = std::fs::read_to_string(lab.dir().join("audit.json")).unwrap_or_default();
    parse_json(&text)
        .map(|v| v.array().to_vec())
        .unwrap_or_default()
}

fn agent_calls(lab: &Lab) -> BTreeSet<(String, String, String, bool)> {
    audit(lab)
        .iter()
        .filter(|e| e["user"].as_str() == Some(AGENT_USER))
        // Resource requests only (kubectl's discovery reads are not the agents').
        .filter(|e| !e["resource"].as_str().unwrap_or("/").starts_with('/'))
        .map(|e| {
            (
                e["verb"].as_str().unwrap().to_string(),
                e["apiGroup"].as_str().unwrap().to_string(),
                e["resource"].as_str().unwrap().to_string(),
                e["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn agents_run_confined_as_the_daemonset_says_and_the_api_holds_them_to_deploys_rbac_and_policy() {
    let kwire = require_agent!();
    require_tool("kubectl");
    let lab = Lab::named();
    lab.cmd_ok(
        "up",
        &[
            "--nodes",
            "2",
            "--pods",
            "1",
            "--kwire",
            kwire.to_str().unwrap(),
            "--timeout",
            TIMEOUT,
        ],
    );
    let name = lab.name().to_string();
    let (n1, n2) = (format!("{name}-n1"), format!("{name}-n2"));
    let ds = manifests::daemonset().unwrap();
    let agent = ds.agent().unwrap();
    let st = lab.status();
    let want = mask_of(&agent.capabilities);
    assert_ne!(want, 0);

    for n in [&n1, &n2] {
        let pid = node(&st, n)["agent_pid"].as_u64().expect("agent pid");
        // 1. Capabilities: bounding, permitted, effective exactly the manifest's; none
        //    inheritable or ambient.
        let caps = cap_masks(pid);
        for set in ["Bnd", "Prm", "Eff"] {
            assert_eq!(
                caps[set], want,
                "{n}: Cap{set} {:#x}, the manifest says {want:#x}",
                caps[set]
            );
        }
        assert_eq!((caps["Inh"], caps["Amb"]), (0, 0), "{n}: {caps:?}");

        // 2. Its own mount and PID namespaces; the image's files and the declared volumes,
        //    none of the host's other paths.
        let link = |p: &str| std::fs::read_link(p).unwrap();
        for ns in ["mnt", "pid"] {
            assert_ne!(
                link(&format!("/proc/{pid}/ns/{ns}")),
                link(&format!("/proc/self/ns/{ns}")),
                "{n}: {ns} namespace"
            );
        }
        let root = format!("/proc/{pid}/root");
        for present in [
            "usr/local/bin/kwire",
            "var/lib/kwire",
            "run/kwire",
            "dev/net/tun",
            "var/run/secrets/kubernetes.io/serviceaccount/token",
        ] {
            assert!(
                Path::new(&root).join(present).exists(),
                "{n}: /{present} missing in the container"
            );
        }
        for absent in [
            "work",
            "home",
            "root",
            "etc/passwd",
            "run/kwire-lab",
            "usr/bin/curl",
            "bin/sh",
        ] {
            assert!(
                !Path::new(&root).join(absent).exists(),
                "{n}: the host's /{absent} is visible in the container"
            );
        }
        let mounts = mount_points(pid);
        let point = |p: &str| mounts.iter().find(|(m, _)| m == p).map(|(_, o)| o.clone());
        for m in &agent.mounts {
            assert!(
                point(&m.mount_path).is_some(),
                "{n}: volume {} not mounted at {}",
                m.volume,
                m.mount_path
            );
        }
        assert!(
            point("/proc/sys").is_some_and(|o| o.starts_with("ro")),
            "{n}: /proc/sys is not read-only: {mounts:?}"
        );
        assert!(
            point("/").is_some_and(|o| o.starts_with("ro")),
            "{n}: readOnlyRootFilesystem"
        );
        let image: Vec<String> = manifests::image_files()
            .into_iter()
            .map(|f| f.path)
            .collect();
        for (m, _) in &mounts {
            let declared = agent
                .mounts
                .iter()
                .any(|v| m == &v.mount_path || m.starts_with(&format!("{}/", v.mount_path)));
            let runtime = [
                "/",
                "/proc",
                "/sys",
                "/dev",
                "/etc/hosts",
                "/etc/resolv.conf",
                "/var/run/secrets/kubernetes.io/serviceaccount",
            ]
            .contains(&m.as_str())
                || m.starts_with("/proc/")
                || m.starts_with("/dev/")
                || m.starts_with("/lib")
                || m.starts_with("/usr/lib");
            assert!(
                declared || runtime || image.contains(m),
                "{n}: unexpected mount {m} in the container"
            );
        }

        // 3. The manifest's command and env; in-cluster configuration, no kubeconfig.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(argv, agent.argv().unwrap(), "{n}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(env.contains(&format!("NODE_NAME={n}")), "{n}: {env:?}");
        assert!(
            env.contains(&"KUBERNETES_SERVICE_HOST=192.0.2.254".to_string()),
            "{n}: {env:?}"
        );
        assert!(
            !env.iter().any(|e| e.starts_with("KUBECONFIG=")),
            "{n}: {env:?}"
        );

        // 4. The token in the pod is the one bound to this node (the kubeconfig `--node` has).
        let token = std::fs::read_to_string(
            Path::new(&root).join("var/run/secrets/kubernetes.io/serviceaccount/token"),
        )
        .unwrap();
        let kc = lab.cmd_ok("kubeconfig", &["--node", n]);
        let kc = std::fs::read_to_string(kc.trim()).unwrap();
        assert!(
            kc.contains(&format!("token: \"{}\"", token.trim())),
            "{n}: the pod's token is not its node's"
        );
    }

    // The agents did their work with those tokens: each published its key on its own Node
    // (admission refuses any other), and the mesh formed.
    wait_until(CONVERGE, "both Nodes annotated by their agents", || {
        let st = lab.status();
        [&n1, &n2]
            .iter()
            .all(|n| node(&st, n)["public_key"].is_string())
    });

    // RBAC is exactly what the agent calls. A Node with an all-zero key makes each agent post an
    // Event (create); made valid and then bad again, the same Event repeats (patch, the
    // Recorder's series).
    let admin = lab.cmd_ok("kubeconfig", &[]);
    let admin = admin.trim();
    let bad = format!("{name}-bad");
    let zero = "kwire.dev/public-key=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let manifest = format!(
        "{{\"apiVersion\": \"v1\", \"kind\": \"Node\", \"metadata\": {{\"name\": \"{bad}\"}}}}"
    );
    let file = lab.dir().join("bad-node.json");
    std::fs::write(&file, manifest).unwrap();
    let (ok, out) = kubectl(admin, &["create", "-f", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let events_of = |reason: &str| {
        let (_, out) = kubectl(admin, &["get", "events.events.k8s.io", "-A", "-o", "json"]);
        parse_json(&out).map_or(0, |v| {
            v["items"]
                .array()
                .iter()
                .filter(|e| {
                    e["reason"].as_str() == Some(reason)
                        && e["regarding"]["name"].as_str() == Some(bad.as_str())
                })
                .count()
        })
    };
    let set_zero = || {
        let (ok, out) = kubectl(admin, &["annotate", "--overwrite", "node", &bad, zero]);
        assert!(ok, "{out}");
    };
    set_zero();
    wait_until(CONVERGE, "Events for the zero key", || {
        events_of("KwireZeroPublicKey") >= 2
    });
    let (ok, out) = kubectl(
        admin,
        &[
            "annotate",
            "--overwrite",
            "node",
            &bad,
            "kwire.dev/public-key=not-a-key",
        ],
    );
    assert!(ok, "{out}");
    // Both agents must have reconciled the malformed key before it turns zero again: an agent
    // that gets both updates in one batch sees zero to zero, no new rejection, no repeat.
    wait_until(CONVERGE, "Events for the malformed key", || {
        events_of("KwireMalformedPublicKey") >= 2
    });
    set_zero();
    wait_until(CONVERGE, "the repeated Event patched", || {
        agent_calls(&lab).contains(&(
            "patch".into(),
            "events.k8s.io".into(),
            "events".into(),
            true,
        ))
    });

    // A Peer inside the pod range: each agent lists and watches Peers anyway, and writes this
    // one's Accepted=False condition (patch peers/status).
    let peer = lab.dir().join("bad-peer.json");
    std::fs::write(
        &peer,
        format!(
            "{{\"apiVersion\": \"kwire.dev/v1alpha1\", \"kind\": \"Peer\", \"metadata\": {{\"name\": \"{name}-in-pods\"}}, \"spec\": {{\"publicKey\": \"{}\", \"allowedIPs\": [\"10.244.250.1/32\"]}}}}",
            kwire_tests::wireguard::Keypair::generate().public
        ),
    )
    .unwrap();
    let (ok, out) = kubectl(admin, &["create", "-f", peer.to_str().unwrap()]);
    assert!(ok, "{out}");
    wait_until(CONVERGE, "the agents' patch of the Peer's status", || {
        agent_calls(&lab).contains(&(
            "patch".into(),
            "kwire.dev".into(),
            "peers/status".into(),
            true,
        ))
    });

    let docs = manifests::documents(manifests::KWIRE_YAML, "deploy/kwire.yaml").unwrap();
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let granted = role_grants(role);
    wait_until(
        CONVERGE,
        "every call the role grants to have been made",
        || {
            let made: BTreeSet<(String, String, String)> = agent_calls(&lab)
                .into_iter()
                .filter(|c| c.3)
                .map(|(v, g, r, _)| (v, g, r))
                .collect();
            made == granted
        },
    );
    let before = agent_calls(&lab);
    assert!(
        before.iter().all(|c| c.3),
        "the agents made calls the ClusterRole does not grant: {before:?}"
    );

    // With node 1's credentials: its own Node yes, another Node no, Secrets no.
    let kc1 = lab.cmd_ok("kubeconfig", &["--node", "n1"]);
    let kc1 = kc1.trim();
    let (ok, out) = kubectl(kc1, &["annotate", "node", &n1, "kwire.dev/test=1"]);
    assert!(ok, "n1's agent may annotate its own Node: {out}");
    let (ok, out) = kubectl(kc1, &["annotate", "node", &n2, "kwire.dev/test=1"]);
    assert!(!ok, "n1's agent annotated n2: {out}");
    assert!(
        out.contains(&format!(
            "the kwire agent of node {n1} may change only its own Node, not {n2}"
        )),
        "the admission policy's message: {out}"
    );
    let (ok, out) = kubectl(kc1, &["label", "node", &n1, "example.com/x=1"]);
    assert!(
        !ok && out.contains("may not change their Node's labels"),
        "{out}"
    );
    let (ok, out) = kubectl(kc1, &["get", "secrets", "-n", "kube-system"]);
    assert!(!ok, "n1's agent read Secrets: {out}");
    assert!(
        out.contains("secrets is forbidden: User \"system:serviceaccount:kube-system:kwire\" cannot list resource \"secrets\""),
        "{out}"
    );

    // The refusals above are the only ones, and none is the agents'.
    let denied = || -> Vec<_> { agent_calls(&lab).into_iter().filter(|c| !c.3).collect() };
    let secrets = vec![(
        "list".to_string(),
        String::new(),
        "secrets".to_string(),
        false,
    )];
    wait_until(
        CONVERGE,
        "the audit to show the refused Secrets list",
        || denied() == secrets,
    );
}
