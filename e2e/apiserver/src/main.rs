//! `dsr-apiserver`: the Kubernetes API server stand-in as a process (test
//! equipment). Prints the bound address on stdout, then serves until
//! SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kube_dsr_apiserver::{Config, Server, kubeconfig};
use kube_dsr_process::Shutdown;
use kube_dsr_process::logging::{self, LogFormat, Output};

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on; use 0.0.0.0:<port> to be reachable from other
    /// network namespaces.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Server URL to put in the kubeconfig (default: http://<bound address>,
    /// loopback for a wildcard address).
    #[arg(long)]
    kubeconfig_server: Option<String>,
    /// Watch events retained before a resumed watch gets 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs go to stderr: stdout carries the bound address.
    logging::init(LogFormat::Text, "warn", Output::Stderr);
    let shutdown = Shutdown::on_signals();
    let server = Server::start_with(Config {
        listen: args.listen,
        history: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_interval.max(1)),
    })
    .await?;
    if let Some(path) = &args.kubeconfig {
        let url = args.kubeconfig_server.clone().unwrap_or_else(|| server.url());
        std::fs::write(path, kubeconfig(&url))?;
    }
    println!("{}", server.addr());
    shutdown.requested().await;
    server.shutdown().await;
    Ok(())
}
