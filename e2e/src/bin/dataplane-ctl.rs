//! Test equipment: a process that owns the dataplane in a network namespace,
//! so tests can SIGKILL and restart it under traffic. It opens (or adopts)
//! the dataplane, programs one service, prints one `ready ...` line and
//! waits to be killed (at most `--hold-secs`).

use std::{fs::File, net::IpAddr, os::fd::AsRawFd, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube_dsr_agent::dataplane::{
    BackendSpec, Config, Dataplane, PortSpec, Protocol, ServiceSpec, Stage,
};
use kube_dsr_e2e::netns::parse_mac;

#[derive(Parser, Debug)]
struct Args {
    /// Named network namespace (/var/run/netns/NAME) holding the interface.
    #[arg(long)]
    netns: String,
    #[arg(long, default_value = "eth0")]
    iface: String,
    #[arg(long)]
    pin_dir: PathBuf,
    #[arg(long)]
    vip: IpAddr,
    #[arg(long)]
    port: u16,
    #[arg(long, value_parser = ["tcp", "udp"])]
    proto: String,
    /// `ADDRESS=MAC`, repeated.
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Replace the attached program even if it is the same build.
    #[arg(long)]
    force_reload: bool,
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let ns = File::open(format!("/var/run/netns/{}", args.netns)).context("netns")?;
    // SAFETY: switching this (single) thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    let mut cfg = Config::new(&args.iface);
    cfg.pin_dir = args.pin_dir.clone();
    cfg.force_reload = args.force_reload;
    let mut dp = Dataplane::open(&cfg)?;
    let backends = args
        .backends
        .iter()
        .map(|b| {
            let (addr, mac) = b.split_once('=').context("ADDRESS=MAC")?;
            Ok(BackendSpec::new(addr.parse()?, parse_mac(mac)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let protocol = if args.proto == "tcp" { Protocol::Tcp } else { Protocol::Udp };
    dp.upsert_service(&ServiceSpec {
        name: "test/ctl".into(),
        vip: args.vip,
        ports: vec![PortSpec { port: args.port, protocol }],
        table_size: 65537,
        backends,
        pin_all_flows: false,
        stage: Stage::Ingress,
    })?;
    println!("ready start={:?} mode={}", dp.start(), dp.attached().as_str());
    std::thread::sleep(Duration::from_secs(args.hold_secs));
    Ok(())
}
