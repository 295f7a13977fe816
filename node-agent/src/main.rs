//! `dsr-agent`: flags, logging and the two commands; everything else is in
//! the library (`kube_dsr_agent::agent`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kube_dsr_agent::agent::{self, Config};
use kube_dsr_agent::dataplane::{AttachMode, Capacity, DEFAULT_PIN_DIR};
use kube_dsr_process::logging::{self, LogFormat, Output};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Attach {
    /// Native (driver) mode, generic when the driver refuses.
    Auto,
    Native,
    Generic,
}

/// kube-dsr node agent: programs the XDP dataplane on ingress nodes,
/// prepares backend pods (VIP on loopback, ARP sysctls) and announces VIPs.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Log format.
    #[arg(long, env = "DSR_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    /// bpffs directory for the pinned maps and links (one subdirectory per
    /// interface).
    #[arg(long, env = "DSR_BPFFS_DIR", default_value = DEFAULT_PIN_DIR, global = true)]
    bpffs_dir: PathBuf,
    /// procfs of the host (the agent runs with hostPID). In a container, mount
    /// the host's /proc elsewhere (for example /host/proc): the container's
    /// own /proc/sys is read-only.
    #[arg(long, env = "DSR_PROC_DIR", default_value = "/proc", global = true)]
    proc_dir: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "DSR_HTTP_ADDR", default_value = "0.0.0.0:9477")]
    http_addr: SocketAddr,
    /// Namespace of the per-VIP announcement Leases (the agent's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-dsr")]
    lease_namespace: String,
    /// Seconds an announcement Lease stays valid without renewal.
    #[arg(long, default_value_t = 10)]
    lease_duration: u64,
    /// Seconds between Lease renewals (and attempts to take one over).
    #[arg(long, default_value_t = 2)]
    lease_retry: u64,
    /// Seconds between periodic rounds (settling flows, re-probing
    /// unreachable backends, re-reading pod namespaces).
    #[arg(long, default_value_t = 15)]
    resync_seconds: u64,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value = "auto")]
    attach: Attach,
    /// Interface facing the other nodes, where the node stage (delivery to
    /// this node's pods) attaches. Default: the interface holding the
    /// node's InternalIP, else the one the route toward another node's
    /// address leaves through.
    #[arg(long, env = "DSR_NODE_INTERFACE")]
    node_interface: Option<String>,
    /// Service ids per dataplane (one per VIP family and stage of a
    /// DsrService). Fixed when the maps are created.
    #[arg(long, default_value_t = kube_dsr_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Backend slots per dataplane (one per service and backend; a node
    /// reached through its node stage counts once per service). Fixed when
    /// the maps are created.
    #[arg(long, default_value_t = kube_dsr_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Maglev ring memory per dataplane, in MiB: every service keeps two
    /// tables of its tableSize 4-byte slots (128 KiB at 16381, 512 KiB at
    /// 65537). Fixed when the maps are created.
    #[arg(long, default_value_t = 128)]
    ring_mib: u32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Remove everything the agent created on this node: the XDP program and
    /// its pinned maps, and the VIPs it added (they carry its mark) in every
    /// pod and in the node's own namespace. Forwarding stops. The ARP
    /// sysctls it set in pods are left (see DESIGN.md).
    Cleanup {
        /// Only these pods (UIDs) instead of every pod found in /proc.
        #[arg(long = "pod-uid")]
        pod_uids: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format, "info", Output::Stdout);
    if let Some(Command::Cleanup { pod_uids }) = args.command {
        let only = (!pod_uids.is_empty()).then_some(pod_uids.as_slice());
        let failed = agent::worker::cleanup(&args.bpffs_dir, &args.proc_dir, only);
        if failed.is_empty() {
            eprintln!("dsr-agent cleanup: done");
            return Ok(());
        }
        for f in &failed {
            eprintln!("dsr-agent cleanup: {}", agent::worker::chain(f));
        }
        anyhow::bail!("{} cleanup step(s) failed", failed.len());
    }
    let r = args.run;
    let node_name =
        r.node_name.ok_or_else(|| anyhow::anyhow!("--node-name (or NODE_NAME) is required"))?;
    anyhow::ensure!(
        r.lease_retry > 0 && r.lease_duration > 2 * r.lease_retry,
        "--lease-duration must be more than twice --lease-retry (and --lease-retry above 0)"
    );
    anyhow::ensure!(r.resync_seconds > 0, "--resync-seconds must be above 0");
    let capacity = Capacity {
        services: r.max_services,
        backends: r.max_backends,
        ring_chunks: Capacity::ring_chunks_in_mib(r.ring_mib),
    };
    anyhow::ensure!(
        capacity.services > 0 && capacity.backends > 0 && capacity.ring_chunks >= 2,
        "--max-services and --max-backends must be above 0, --ring-mib at least 1"
    );
    let cfg = Config {
        node_name,
        http_addr: r.http_addr,
        bpffs_dir: args.bpffs_dir,
        proc_dir: args.proc_dir,
        attach: match r.attach {
            Attach::Auto => AttachMode::Auto,
            Attach::Native => AttachMode::Native,
            Attach::Generic => AttachMode::Generic,
        },
        resync: Duration::from_secs(r.resync_seconds),
        lease_namespace: r.lease_namespace,
        lease_duration: Duration::from_secs(r.lease_duration),
        lease_retry: Duration::from_secs(r.lease_retry),
        node_interface: r.node_interface,
        capacity,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(agent::run(cfg, agent::announcer()))?;
    Ok(())
}
