//! The `kwire` command: parses flags, sets up logging, calls the library.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// kwire: an encrypted network for Kubernetes in one daemon (userspace WireGuard, pod
/// wiring, NetworkPolicy and Services).
#[derive(Parser)]
#[command(name = "kwire", version, about, long_about = None)]
struct Cli {
    /// Log filter (overrides RUST_LOG), e.g. `info` or `kwire=debug`. Default:
    /// `info,kube_client=warn,kube_runtime=warn` (no per-retry lines during an API outage).
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log line format: `text` (human) or `json` (one object per line).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a standalone userspace WireGuard device in the foreground (like `wireguard-go -f`).
    Tunnel(kwire::tunnel::TunnelArgs),
    /// Run the node agent: the tunnel, peers from the cluster's Nodes, routes, /metrics.
    Agent(Box<kwire::agent::AgentArgs>),
    /// Install the CNI plugin and configuration list onto the node (the DaemonSet's init
    /// container).
    InstallCni(kwire::cni::install::InstallCniArgs),
    /// Show this node's peers (by node name) and pods, from the running agent (root only).
    Status(kwire::status::StatusArgs),
    /// Rotate (make-before-break) or revoke this node's WireGuard key, through the running
    /// agent (root only).
    Key(kwire::agent::keyctl::KeyArgs),
    /// Draw the mesh as Graphviz DOT (or SVG) from the running agent's view.
    Graph(kwire::status::graph::GraphArgs),
    /// NetworkPolicy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Peers outside the cluster (the `Peer` resource): their side's configuration.
    #[command(subcommand)]
    Peer(kwire::peer_config::PeerCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Say offline whether a connection is allowed under a set of manifests, and why.
    /// Exit code: 0 allowed, 1 denied, 2 error.
    Trace(kwire::policy::trace::TraceArgs),
}

/// Log filter without RUST_LOG or --log-level. boringtun's own lines are off: they name no
/// peer (`HANDSHAKE(REKEY_TIMEOUT)` every 5 s per unanswering peer, `CONNECTION_EXPIRED` when
/// it gives up: 5,000 lines every 5 s while a 5,000-node cluster starts), and what they say
/// is in each peer's handshake counters (`kwire_peer_handshakes_total{result="timeout"}`) and
/// its health (a PeerUnreachable Event). `--log-level info,boringtun=debug` brings them back.
const DEFAULT_LOG_FILTER: &str = "info,kube_client=warn,kube_runtime=warn,boringtun=off";
/// Added to any filter that does not name kube_client::client itself: kube's HTTP client logs every
/// failed request at ERROR (about one a second per retrying watch while the API is
/// unreachable); each of the agent's watches says it once per interval instead.
const QUIET_KUBE_CLIENT: &str = "kube_client::client::builder=off";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string());
    let filter = if filter.contains("kube_client::client") {
        filter
    } else {
        format!("{filter},{QUIET_KUBE_CLIENT}")
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().with_current_span(false).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let r = match cli.command {
        Command::Tunnel(a) => kwire::tunnel::run(a),
        Command::Agent(a) => kwire::agent::run(*a),
        Command::InstallCni(a) => kwire::cni::install::run(&a),
        Command::Status(a) => kwire::status::run(&a),
        Command::Key(a) => kwire::agent::keyctl::run(&a),
        Command::Graph(a) => kwire::status::graph::run(&a),
        Command::Peer(c) => kwire::peer_config::run(c),
        Command::Policy(PolicyCommand::Trace(a)) => {
            let r = kwire::policy::trace::run(&a, &mut std::io::stdout().lock());
            if let Err(e) = &r {
                eprintln!("kwire policy trace: {e}");
            }
            return ExitCode::from(kwire::policy::trace::exit_code(&r));
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kwire: {e:#}");
            ExitCode::FAILURE
        }
    }
}
