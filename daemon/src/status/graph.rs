//! `kwire graph`: the mesh as Graphviz DOT, from one or more nodes' status reports and,
//! optionally, the cluster's Nodes (for nodes no report mentions).

use super::{fetch, human_age, human_bytes, DEFAULT_RUN_DIR};
use crate::node_state::{StatusReport, PEER_UP_WITHIN};
use anyhow::Context;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, Clone, clap::Args)]
pub struct GraphArgs {
    /// Run directory of an agent to ask (repeat for several nodes on this machine).
    #[arg(long = "run-dir", env = "KWIRE_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dirs: Vec<PathBuf>,
    /// Also draw every Node of the cluster (pod CIDRs and endpoint from the API).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Output: Graphviz `dot` text, or `svg` (runs `dot -Tsvg`).
    #[arg(long, default_value = "dot", value_parser = ["dot", "svg"])]
    pub format: String,
}

/// A node as the graph draws it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphNode {
    pub pod_cidrs: Vec<String>,
    pub endpoint: Option<String>,
    /// A report came from this node (drawn bold).
    pub reported: bool,
    pub pods: Option<usize>,
}

/// How an edge is drawn, from the peer's state.
pub fn edge_style(up: bool, unreachable: bool, age: Option<f64>) -> (&'static str, &'static str) {
    match (up, unreachable, age) {
        (true, _, Some(a)) if a < PEER_UP_WITHIN.as_secs_f64() => ("solid", "darkgreen"),
        (_, true, _) => ("dashed", "red"),
        (_, _, None) => ("dotted", "gray50"),
        _ => ("dashed", "orange"),
    }
}

fn q(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

/// The DOT text for `reports` (each node's view) plus `extra` nodes (from the API).
pub fn dot(reports: &[StatusReport], extra: &BTreeMap<String, GraphNode>) -> String {
    let mut nodes: BTreeMap<String, GraphNode> = extra.clone();
    for r in reports {
        let n = nodes.entry(r.node.clone()).or_default();
        n.reported = true;
        n.pods = Some(r.pods.len());
        if !r.pod_cidrs.is_empty() {
            n.pod_cidrs = r.pod_cidrs.clone();
        }
        for p in &r.peers {
            let m = nodes.entry(p.node.clone()).or_default();
            if m.pod_cidrs.is_empty() {
                m.pod_cidrs = p.allowed_ips.clone();
            }
            // A relayed peer's endpoint is its relay's.
            if m.endpoint.is_none() && p.relay.is_none() {
                m.endpoint = p.endpoint.clone();
            }
        }
    }
    let mut o = String::new();
    o.push_str("digraph kwire {\n");
    o.push_str("  graph [label=\"kwire mesh (edges: tunnels as each node sees them; green: recent handshake, orange: stale, red dashed: unreachable, gray dotted: never; bold dashed: relayed through a third node, both behind NAT)\", labelloc=t, fontname=\"Helvetica\", rankdir=LR];\n");
    o.push_str("  node [shape=box, style=\"rounded,filled\", fillcolor=\"#eef4ff\", fontname=\"Helvetica\"];\n");
    o.push_str("  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for (name, n) in &nodes {
        let mut label = name.clone();
        for c in &n.pod_cidrs {
            label.push('\n');
            label.push_str(c);
        }
        if let Some(e) = &n.endpoint {
            let _ = write!(label, "\nendpoint {e}");
        }
        if let Some(p) = n.pods {
            let _ = write!(label, "\n{p} pods");
        }
        let extra = if n.reported {
            ", penwidth=2"
        } else {
            ", fillcolor=\"#f4f4f4\""
        };
        let _ = writeln!(o, "  {} [label={}{extra}];", q(name), q(&label));
    }
    // Peers outside the cluster (the `Peer` resource): ellipses, by Peer name, apart from the
    // Nodes (a Node cannot be named `peer/...`).
    let mut external: BTreeMap<String, (Vec<String>, Option<String>)> = BTreeMap::new();
    for p in reports.iter().flat_map(|r| &r.external_peers) {
        let e = external.entry(p.node.clone()).or_default();
        e.0 = p.allowed_ips.clone();
        if e.1.is_none() {
            e.1 = p.endpoint.clone();
        }
    }
    for (name, (ips, endpoint)) in &external {
        let mut label = format!("Peer {name}");
        for ip in ips {
            let _ = write!(label, "\n{ip}");
        }
        if let Some(e) = endpoint {
            let _ = write!(label, "\nlast seen at {e}");
        }
        let _ = writeln!(
            o,
            "  {} [label={}, shape=ellipse, fillcolor=\"#fff4dd\"];",
            q(&format!("peer/{name}")),
            q(&label)
        );
    }
    for r in reports {
        let all = r.peers.iter().map(|p| (p, p.node.clone())).chain(
            r.external_peers
                .iter()
                .map(|p| (p, format!("peer/{}", p.node))),
        );
        for (p, to) in all {
            let (style, colour) = edge_style(p.up, p.unreachable, p.last_handshake_age_seconds);
            let hs = p.last_handshake_age_seconds.map_or_else(
                || "no handshake".to_string(),
                |a| format!("handshake {}", human_age(a)),
            );
            let mut label = format!(
                "tx {} / rx {}\n{hs}",
                human_bytes(p.tx_bytes),
                human_bytes(p.rx_bytes)
            );
            // Relayed: drawn bold dashed, the relay named on the edge.
            let style = match &p.relay {
                Some(relay) => {
                    let _ = write!(label, "\nrelayed via {relay}");
                    "\"dashed,bold\""
                }
                None => style,
            };
            let _ = writeln!(
                o,
                "  {} -> {} [label={}, style={style}, color={colour}, fontcolor={colour}];",
                q(&r.node),
                q(&to),
                q(&label)
            );
        }
    }
    o.push_str("}\n");
    o
}

/// Renders DOT as SVG with Graphviz's `dot`.
pub fn to_svg(dot_text: &str) -> anyhow::Result<String> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!("--format svg needs Graphviz's `dot` on PATH (apt install graphviz), or use --format dot"),
            _ => anyhow::anyhow!("running `dot -Tsvg`: {e}"),
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(dot_text.as_bytes())
        .context("writing to `dot -Tsvg`")?;
    let out = child
        .wait_with_output()
        .context("waiting for `dot -Tsvg`")?;
    anyhow::ensure!(
        out.status.success(),
        "`dot -Tsvg` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).context("`dot -Tsvg` wrote something that is not UTF-8")
}

/// The cluster's Nodes as graph nodes (pod CIDRs, `kwire.dev/endpoint`).
async fn api_nodes(kubeconfig: &std::path::Path) -> anyhow::Result<BTreeMap<String, GraphNode>> {
    use k8s_openapi::api::core::v1::Node;
    let client = crate::kubeapi::client(Some(kubeconfig)).await?;
    let list = kube::Api::<Node>::all(client)
        .list(&Default::default())
        .await
        .with_context(|| format!("listing Nodes with --kubeconfig {}", kubeconfig.display()))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            let endpoint = n
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(kwire_proto::annotations::ENDPOINT).cloned());
            let pod_cidrs = n
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidrs.clone())
                .unwrap_or_default();
            Some((
                name,
                GraphNode {
                    pod_cidrs,
                    endpoint,
                    reported: false,
                    pods: None,
                },
            ))
        })
        .collect())
}

/// `kwire graph`.
pub fn run(args: &GraphArgs) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for d in &args.run_dirs {
        reports.push(fetch(d)?);
    }
    let extra = match &args.kubeconfig {
        Some(k) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(api_nodes(k))?
        }
        None => BTreeMap::new(),
    };
    let text = dot(&reports, &extra);
    let out = if args.format == "svg" {
        to_svg(&text)?
    } else {
        text
    };
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_nodes_with_cidrs_and_styled_edges() {
        let mut extra = BTreeMap::new();
        extra.insert(
            "n4".to_string(),
            GraphNode {
                pod_cidrs: vec!["10.244.4.0/24".into()],
                ..Default::default()
            },
        );
        let d = dot(&[crate::status::tests::sample()], &extra);
        assert!(d.starts_with("digraph kwire {"));
        assert!(
            d.contains("\"n1\" [label=\"n1\\n10.244.1.0/24\\n1 pods\", penwidth=2]"),
            "{d}"
        );
        assert!(
            d.contains("\"n2\" [label=\"n2\\n10.244.2.0/24\\nendpoint 192.0.2.2:51820\""),
            "{d}"
        );
        assert!(d.contains("\"n1\" -> \"n2\" [label=\"tx 100 B / rx 2.00 KiB\\nhandshake 1m 5s ago\", style=solid, color=darkgreen"), "{d}");
        // n3 is relayed (both behind NAT): drawn bold dashed, the relay named; its endpoint
        // (the relay's) is not drawn as n3's.
        assert!(d.contains("\"n1\" -> \"n3\" [label=\"tx 0 B / rx 0 B\\nno handshake\\nrelayed via n9\", style=\"dashed,bold\", color=red"), "{d}");
        assert!(
            d.contains("\"n3\" [label=\"n3\\n10.244.3.0/24\", fillcolor"),
            "{d}"
        );
        assert!(d.contains("\"n4\" [label=\"n4\\n10.244.4.0/24\""), "{d}");
        assert!(
            d.contains("\"peer/laptop\" [label=\"Peer laptop\\n198.51.100.7/32\\nlast seen at 198.51.100.7:40000\", shape=ellipse"),
            "{d}"
        );
        assert!(
            d.contains("\"n1\" -> \"peer/laptop\" [label=\"tx 20 B / rx 10 B\\nhandshake 3s ago\""),
            "{d}"
        );
        if Command::new("dot")
            .arg("-V")
            .stderr(Stdio::null())
            .status()
            .is_ok()
        {
            assert!(to_svg(&d).unwrap().contains("<svg"));
        }
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(q("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }
}
