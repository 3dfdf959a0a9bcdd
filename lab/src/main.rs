//! `kwire-lab`: a local kwire cluster on one Linux machine. Parses flags, sets up tracing and
//! calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipnetwork::{Ipv4Network, Ipv6Network};
use kwire_lab::apiserver::{ApiServer, ApiServerConfig, DEFAULT_HISTORY_SIZE};
use kwire_lab::cluster::naming;
use kwire_lab::cluster::state::AgentCommand;
use kwire_lab::pods;
use kwire_lab::{commands, supervisor};

/// Pods per node `up` creates unless told otherwise (DESIGN: "a few pods each").
const DEFAULT_PODS_PER_NODE: u32 = 2;

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
    /// Build a lab: underlay, node namespaces, API stand-in (deploy/'s RBAC and admission
    /// policy applied), Nodes, and deploy/kwire.yaml's DaemonSet pod on every node, confined as
    /// the kubelet would run it.
    ///
    /// Returns once the lab is ready (and, unless --no-wait-mesh, every node has a handshake
    /// with every other); a detached supervisor keeps it running until `kwire-lab down`.
    Up(UpArgs),
    /// Remove everything a lab made (also after a crash of an earlier run).
    Down(LabArg),
    /// Print the lab's nodes, pod CIDRs, agents and WireGuard handshakes.
    Status(StatusArgs),
    /// Draw the lab's mesh (every node's view) as Graphviz DOT or SVG.
    Graph(GraphArgs),
    /// Run a command in a node's (`n1`) or a pod's (`NS/POD`) network namespace; exits with
    /// the command's exit code.
    Exec(ExecArgs),
    /// Create or update the objects of a YAML/JSON manifest (several documents) in the lab's API.
    Apply(ApplyArgs),
    /// Delete the objects of a YAML/JSON manifest from the lab's API.
    Delete(ApplyArgs),
    /// Whether FROM (a pod `NS/NAME` or a node `n1`) reaches TO[:PORT[/PROTO]] (a pod or an
    /// IP; ICMP echo when no port). Exits 0 reachable, 1 not, 2 on error.
    Probe(ProbeArgs),
    /// Probe every ordered pair of pods (default: every Running pod) in parallel and print the
    /// reachability table in the upstream netpol e2e format (`.` reachable, `X` blocked).
    Matrix(MatrixArgs),
    /// Serve a lab pod's ports (run by the supervisor inside the pod's namespace).
    #[command(hide = true)]
    PodServe(PodServeArgs),
    /// Add a node to a running lab (namespace, Node, agent); prints its name.
    AddNode(LabArg),
    /// Remove a node from a running lab: stop its agent, delete its Node and namespace.
    RemoveNode(NodeArgs),
    /// Print the path of the lab's admin kubeconfig (for kubectl on this host), or with
    /// `--node` of a kubeconfig holding the service account token that node's agent was given.
    Kubeconfig(KubeconfigArgs),
    /// Run one container of a pod confined as a container runtime would (used by the
    /// supervisor for the DaemonSet's containers).
    #[command(hide = true)]
    ContainerRun(ContainerRunArgs),
    /// Run a lab's supervisor in the foreground (`up` starts it detached).
    #[command(hide = true)]
    Supervise(LabArg),
    /// Run the Kubernetes API stand-in in the foreground (HTTPS with its own CA, bearer tokens,
    /// RBAC and admission; the kubeconfig it writes holds the admin token).
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
    /// Run this shell command as each node's agent instead of deploy/kwire.yaml's DaemonSet
    /// pod (for tests of the lab itself; it runs unconfined in the node's namespace); it gets
    /// KWIRE_LAB_NODE, KWIRE_LAB_NETNS, KWIRE_LAB_INTERFACE, KWIRE_LAB_STATE_DIR,
    /// KWIRE_LAB_RUN_DIR, KWIRE_LAB_KUBECONFIG (an admin kubeconfig). Implies --no-wait-mesh.
    #[arg(long, conflicts_with_all = ["kwire", "agent_arg"])]
    agent_cmd: Option<String>,
    /// An argument appended to the DaemonSet's agent container args on every node, as a
    /// `kubectl patch` of the DaemonSet would (repeatable; `--agent-arg=--max-flows-per-pod=40`).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Return when the supervisor is ready, without waiting for handshakes.
    #[arg(long)]
    no_wait_mesh: bool,
    /// Give up (leaving the lab up for inspection) after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Pods to create per node (`default/pod-<node#>-<i>`, label app=lab-pod), waiting until
    /// they run with IPs. Default: 2 with real agents, 0 with --agent-cmd.
    #[arg(long)]
    pods: Option<u32>,
    /// Cluster DNS: a kube-system/kube-dns pod (dnsmasq) behind the kube-dns ClusterIP
    /// 10.96.0.10, answering <svc>.<ns>.svc.cluster.local and <a-b-c-d>.<ns>.pod.cluster.local;
    /// every pod resolves through it (/etc/netns/<netns>/resolv.conf).
    #[arg(long)]
    dns: bool,
}

#[derive(clap::Args)]
struct GraphArgs {
    #[command(flatten)]
    lab: LabArg,
    /// `dot` (Graphviz text) or `svg` (needs Graphviz's `dot`).
    #[arg(long, default_value = "dot", value_parser = ["dot", "svg"])]
    format: String,
    /// The kwire binary (default: $KWIRE_BIN, next to kwire-lab, target/{debug,release}/kwire).
    #[arg(long)]
    kwire: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ApplyArgs {
    #[command(flatten)]
    lab: LabArg,
    /// The manifest (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// With `delete`: objects that do not exist are not an error.
    #[arg(long)]
    ignore_not_found: bool,
}

#[derive(clap::Args)]
struct ProbeArgs {
    #[command(flatten)]
    lab: LabArg,
    /// A pod (`NS/NAME`) or a node (`n1`).
    from: String,
    /// A pod (`NS/NAME`) or an IP, with an optional `:PORT` and `/TCP` or `/UDP`
    /// (`[IPv6]:PORT`).
    to: String,
    /// Use the IPv6 address of a pod given by name.
    #[arg(short = '6', long)]
    ipv6: bool,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Print {"from","to","address","port","protocol","reachable","detail"}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct MatrixArgs {
    #[command(flatten)]
    lab: LabArg,
    /// The port to probe, `80/TCP` or `81/UDP` (protocol defaults to TCP).
    #[arg(long, default_value = "80/TCP")]
    port: pods::serve::PodPort,
    /// Pods (`NS/NAME`), in row and column order; default every Running pod by namespace/name.
    pods: Vec<String>,
    /// Seconds one probe waits for an answer.
    #[arg(long, default_value_t = 0.5)]
    timeout: f64,
    /// Probes in flight at once.
    #[arg(long, default_value_t = pods::matrix::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Print {"port","protocol","pods","reachable","blocked","elapsed_ms"}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PodServeArgs {
    /// The pod's `NS/NAME`, sent in every answer.
    #[arg(long)]
    pod: String,
    /// Ports to serve: `80/TCP,80/UDP`.
    #[arg(long, default_value = "80/TCP,80/UDP")]
    ports: String,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    lab: LabArg,
    /// Print JSON: per node name, netns, underlay_ip, pod_cidrs, gateway_ips, metrics_url,
    /// cni_socket, state_dir, agent, and per peer whether it has a handshake; and every pod
    /// with name, namespace, node, phase, netns and ips.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ExecArgs {
    #[command(flatten)]
    lab: LabArg,
    /// The node (`<lab>-n1`, `n1` or `1`) or a pod (`NS/NAME`).
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
    /// The kubeconfig of this node's agent (`n1`, `<lab>-n1` or `1`): its token, bound to the
    /// node, is held to deploy/'s RBAC and admission policy.
    #[arg(long)]
    node: Option<String>,
}

#[derive(clap::Args)]
struct ContainerRunArgs {
    /// The container spec (JSON) the supervisor wrote.
    spec: PathBuf,
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
    /// Another IP address or DNS name for the serving certificate (repeatable), e.g. where a
    /// proxy forwards from.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
}

async fn run_apiserver(args: ApiserverArgs) -> anyhow::Result<()> {
    let config = ApiServerConfig {
        listen: args.listen,
        cluster_cidr: Some(args.cluster_cidr),
        cluster_cidr_v6: args.cluster_cidr_v6,
        node_cidr_mask: args.node_cidr_mask,
        node_cidr_mask_v6: args.node_cidr_mask_v6,
        service_cidr: Some(args.service_cidr),
        history_size: args.history_size,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_secs.max(1)),
        tls_names: args.tls_names,
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
    let cli = Cli::parse();
    if let Command::ContainerRun(args) = &cli.command {
        // Single-threaded: it forks into the container's namespaces.
        std::process::exit(kwire_lab::container::run::container_run(&args.spec));
    }
    match cli.command {
        Command::Apiserver(args) => runtime()?.block_on(run_apiserver(args)),
        Command::Supervise(args) => Ok(runtime()?.block_on(supervisor::supervise(&args.name))?),
        Command::Up(args) => {
            let agent = match args.agent_cmd {
                Some(script) => AgentCommand::Shell { script },
                None => AgentCommand::Kwire {
                    bin: commands::find_kwire(args.kwire)?,
                    args: args.agent_arg,
                },
            };
            let real = matches!(agent, AgentCommand::Kwire { .. });
            let wait_mesh = !args.no_wait_mesh && real;
            let pods_per_node = args
                .pods
                .unwrap_or(if real { DEFAULT_PODS_PER_NODE } else { 0 });
            commands::up(&commands::UpOptions {
                name: args.lab.name,
                nodes: args.nodes,
                agent,
                wait_mesh,
                timeout: Duration::from_secs(args.timeout),
                pods_per_node,
                dns: args.dns,
            })?;
            Ok(())
        }
        Command::Down(args) => Ok(commands::down(&args.name, false)?),
        Command::Status(args) => Ok(commands::status(&args.lab.name, args.json)?),
        Command::Graph(args) => {
            let out = kwire_lab::commands::graph::graph(&args.lab.name, args.kwire, &args.format)?;
            print!("{out}");
            Ok(())
        }
        Command::Exec(args) => {
            let code = if args.node.contains('/') {
                pods::exec_pod(&args.lab.name, &args.node, &args.command)?
            } else {
                commands::exec(&args.lab.name, &args.node, &args.command)?
            };
            std::process::exit(code)
        }
        Command::Apply(args) => Ok(pods::apply(&args.lab.name, &args.file, false, false)?),
        Command::Delete(args) => Ok(pods::apply(
            &args.lab.name,
            &args.file,
            true,
            args.ignore_not_found,
        )?),
        Command::Probe(args) => {
            let opts = pods::ProbeOptions {
                from: args.from,
                to: args.to,
                ipv6: args.ipv6,
                timeout: Duration::from_secs_f64(args.timeout.max(0.05)),
            };
            match pods::probe(&args.lab.name, &opts) {
                Ok(r) => {
                    if args.json {
                        println!("{}", serde_json::to_string(&r).expect("serializes"));
                    } else {
                        println!(
                            "{} -> {} ({}{}): {} ({})",
                            r.from,
                            r.to,
                            r.address,
                            r.port
                                .map(|p| format!(" port {p}/{}", r.protocol))
                                .unwrap_or_else(|| " ICMP".into()),
                            if r.reachable {
                                "reachable"
                            } else {
                                "NOT reachable"
                            },
                            r.detail
                        );
                    }
                    std::process::exit(if r.reachable { 0 } else { 1 })
                }
                Err(e) => {
                    if args.json {
                        println!(
                            "{}",
                            serde_json::json!({"from": opts.from, "to": opts.to, "error": format!("{e:#}")})
                        );
                    }
                    eprintln!("error: {e:#}");
                    std::process::exit(2)
                }
            }
        }
        Command::Matrix(args) => {
            let opts = pods::matrix::MatrixOptions {
                port: args.port,
                pods: args.pods,
                timeout: Duration::from_secs_f64(args.timeout.max(0.05)),
                concurrency: args.concurrency,
            };
            let report = pods::matrix::matrix(&args.lab.name, &opts)?;
            if args.json {
                println!("{}", serde_json::to_string(&report).expect("serializes"));
            } else {
                println!("{} {}", report.port, report.protocol);
                print!("{}", report.pretty_print());
            }
            Ok(())
        }
        Command::PodServe(args) => {
            let ports = pods::serve::parse_ports(&args.ports).map_err(anyhow::Error::msg)?;
            pods::serve::serve(&args.pod, &ports).context("serving the pod's ports")?;
            Ok(())
        }
        Command::AddNode(args) => {
            commands::add_node(&args.name)?;
            Ok(())
        }
        Command::RemoveNode(args) => Ok(commands::remove_node(&args.lab.name, &args.node)?),
        Command::Kubeconfig(args) => {
            println!(
                "{}",
                commands::kubeconfig(&args.lab.name, args.node.as_deref())?.display()
            );
            Ok(())
        }
        Command::ContainerRun(_) => unreachable!("handled before the runtime starts"),
    }
}
