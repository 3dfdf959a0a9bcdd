//! `kwire-lab`: a local kwire cluster on one Linux machine. Parses flags, sets up tracing and
//! calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipnetwork::{Ipv4Network, Ipv6Network};
use kwire_lab::apiserver::{ApiServer, ApiServerConfig, DEFAULT_HISTORY_SIZE};

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
    /// Run the Kubernetes API stand-in in the foreground (plain HTTP, no auth: loopback only).
    Apiserver(ApiserverArgs),
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Apiserver(args) => run_apiserver(args).await,
    }
}
