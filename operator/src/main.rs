//! `dsr-operator`: flags and logging; everything else is in the library.

#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use kube_dsr_operator::app::{self, Config, LeaseConfig};
use kube_dsr_process::logging::{self, LogFormat, Output};

/// Kubernetes operator for kube-dsr (Direct Server Return load balancing).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "DSR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "DSR_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Run without leader election (one replica only).
    #[arg(long, env = "DSR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-dsr")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "DSR_LEASE_NAME", default_value = kube_dsr_crds::contract::OPERATOR_LEASE)]
    lease_name: String,
    /// This replica's identity in the Lease (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds the lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds before expiry at which the leader renews.
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// Also serve LoadBalancer Services without `spec.loadBalancerClass`
    /// (kube-dsr as the cluster's default load balancer).
    #[arg(long, env = "DSR_DEFAULT_LOAD_BALANCER_CLASS")]
    default_load_balancer_class: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format, "info", Output::Stdout);
    anyhow::ensure!(
        args.lease_grace > 0 && args.lease_grace < args.lease_duration,
        "--lease-grace must be greater than 0 and less than --lease-duration"
    );
    let lease = (!args.no_leader_election).then(|| LeaseConfig {
        namespace: args.lease_namespace,
        name: args.lease_name,
        identity: args.identity.unwrap_or_else(|| format!("dsr-operator-{}", std::process::id())),
        duration: args.lease_duration,
        grace: args.lease_grace,
    });
    let default_class = args.default_load_balancer_class;
    app::run(Config { http_addr: args.http_addr, lease, default_class })
        .await
        .context("dsr-operator failed")
}
