//! `kwire-lab`: a local kwire cluster on one Linux machine. Parses flags, sets up tracing and
//! calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipnetwork::{Ipv4Network, Ipv6Network};
use kwire_lab::apiserver::{ApiServer, ApiServerConfig, DEFAULT_HISTORY_SIZE};
use kwire_lab::cluster::state::AgentCommand;
use kwire_lab::cluster::{commands, naming, supervisor};

#[derive(Parser)]
#[command(
    name = "kwire-lab",
    version,
    about = "A local kwire cluster on one Linux machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a lab: underlay, node namespaces, API stand-in, Nodes, one `kwire agent` per node.
    ///
    /// Returns once the lab is ready (and, unless --no-wait-mesh, every node has a handshake
    /// with every other); a detached supervisor keeps it running until `kwire-lab down`.
    Up(UpArgs),
    /// Remove everything a lab made (also after a crash of an earlier run).
    Down(LabArg),
    /// Print the lab's nodes, pod CIDRs, agents and WireGuard handshakes.
    Status(StatusArgs),
    /// Run a command in a node's network namespace; exits with the command's exit code.
    Exec(ExecArgs),
    /// Add a node to a running lab (namespace, Node, agent); prints its name.
    AddNode(LabArg),
    /// Remove a node from a running lab: stop its agent, delete its Node and namespace.
    RemoveNode(NodeArgs),
    /// Print the path of the lab's kubeconfig (for kubectl on this host).
    Kubeconfig(KubeconfigArgs),
    /// Run a lab's supervisor in the foreground (`up` starts it detached).
    #[command(hide = true)]
    Supervise(LabArg),
    /// Run the Kubernetes API stand-in in the foreground (plain HTTP, no auth: loopback only).
    Apiserver(ApiserverArgs),
}

#[derive(clap::Args)]
struct LabArg {
    /// Name of the lab; several labs with different names can coexist.
    #[arg(long, default_value = naming::DEFAULT_LAB_NAME)]
    name: String,
}

#[derive(clap::Args)]
struct UpArgs {
    #[command(flatten)]
    lab: LabArg,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// The kwire binary (default: $KWIRE_BIN, next to kwire-lab, target/{debug,release}/kwire).
    #[arg(long)]
    kwire: Option<PathBuf>,
    /// Run this shell command as each node's agent instead of `kwire agent` (for tests); it
    /// gets KWIRE_LAB_NODE, KWIRE_LAB_NETNS, KWIRE_LAB_INTERFACE, KWIRE_LAB_STATE_DIR,
    /// KWIRE_LAB_RUN_DIR, KWIRE_LAB_KUBECONFIG. Implies --no-wait-mesh.
    #[arg(long, conflicts_with = "kwire")]
    agent_cmd: Option<String>,
    /// Return when the supervisor is ready, without waiting for handshakes.
    #[arg(long)]
    no_wait_mesh: bool,
    /// Give up (leaving the lab up for inspection) after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    lab: LabArg,
    /// Print JSON: per node name, netns, underlay_ip, pod_cidrs, gateway_ips, metrics_url,
    /// state_dir, agent, and per peer whether it has a handshake.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ExecArgs {
    #[command(flatten)]
    lab: LabArg,
    /// The node: `<lab>-n1`, `n1` or `1`.
    node: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct NodeArgs {
    #[command(flatten)]
    lab: LabArg,
    /// The node: `<lab>-n1`, `n1` or `1`.
    node: String,
}

#[derive(clap::Args)]
struct KubeconfigArgs {
    #[command(flatten)]
    lab: LabArg,
    /// The agents' kubeconfig (the API on the underlay bridge) instead of the host's.
    #[arg(long)]
    agents: bool,
}

#[derive(clap::Args)]
struct ApiserverArgs {
    /// Address to listen on (port 0 picks a free one; the kubeconfig has the real port).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write the kubeconfig for clients.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// IPv4 cluster CIDR that Nodes' podCIDRs come from.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: Ipv4Network,
    /// IPv6 cluster CIDR that Nodes' podCIDRs come from (dual-stack when given).
    #[arg(long)]
    cluster_cidr_v6: Option<Ipv6Network>,
    /// Prefix length of each Node's IPv4 podCIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask: u8,
    /// Prefix length of each Node's IPv6 podCIDR.
    #[arg(long, default_value_t = 64)]
    node_cidr_mask_v6: u8,
    /// CIDR that Service ClusterIPs come from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: Ipv4Network,
    /// Writes kept for watches; a watch from an older resourceVersion gets 410 Gone.
    #[arg(long, default_value_t = DEFAULT_HISTORY_SIZE)]
    history_size: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval_secs: u64,
    /// Require this bearer token on every request (it is written into the kubeconfig).
    #[arg(long, env = "KWIRE_LAB_API_TOKEN")]
    token: Option<String>,
}

async fn run_apiserver(args: ApiserverArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "the API stand-in serves plain HTTP without authorisation; listen on loopback only");
    }
    let config = ApiServerConfig {
        listen: args.listen,
        cluster_cidr: Some(args.cluster_cidr),
        cluster_cidr_v6: args.cluster_cidr_v6,
        node_cidr_mask: args.node_cidr_mask,
        node_cidr_mask_v6: args.node_cidr_mask_v6,
        service_cidr: Some(args.service_cidr),
        history_size: args.history_size,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_secs.max(1)),
        token: args.token,
        ..ApiServerConfig::default()
    };
    let server = ApiServer::start(config)
        .await
        .context("starting the API stand-in")?;
    server.write_kubeconfig(&args.kubeconfig)?;
    println!(
        "kwire-lab apiserver: listening on {}, kubeconfig {}",
        server.url(),
        args.kubeconfig.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.stop().await;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, without a backtrace: each error says what to do.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Apiserver(args) => runtime()?.block_on(run_apiserver(args)),
        Command::Supervise(args) => Ok(runtime()?.block_on(supervisor::supervise(&args.name))?),
        Command::Up(args) => {
            let agent = match args.agent_cmd {
                Some(script) => AgentCommand::Shell { script },
                None => AgentCommand::Kwire {
                    bin: commands::find_kwire(args.kwire)?,
                },
            };
            let wait_mesh = !args.no_wait_mesh && matches!(agent, AgentCommand::Kwire { .. });
            commands::up(&commands::UpOptions {
                name: args.lab.name,
                nodes: args.nodes,
                agent,
                wait_mesh,
                timeout: Duration::from_secs(args.timeout),
            })?;
            Ok(())
        }
        Command::Down(args) => Ok(commands::down(&args.name, false)?),
        Command::Status(args) => Ok(commands::status(&args.lab.name, args.json)?),
        Command::Exec(args) => {
            let code = commands::exec(&args.lab.name, &args.node, &args.command)?;
            std::process::exit(code)
        }
        Command::AddNode(args) => {
            commands::add_node(&args.name)?;
            Ok(())
        }
        Command::RemoveNode(args) => Ok(commands::remove_node(&args.lab.name, &args.node)?),
        Command::Kubeconfig(args) => {
            println!(
                "{}",
                commands::kubeconfig(&args.lab.name, args.agents)?.display()
            );
            Ok(())
        }
    }
}
