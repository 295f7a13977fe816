//! ns/packet of the XDP program against another build of it (say, the one
//! before a parser change), side by side in one run, from non-live
//! `BPF_PROG_TEST_RUN` with `repeat`:
//!
//! ```text
//! git show main:bpf/obj/kube-dsr-xdp.o > /tmp/base.o
//! cargo run --release -p kube-dsr-e2e --bin bench-parse -- --baseline /tmp/base.o
//! ```
//!
//! `repeat` runs every repetition on the buffer the previous one left, so
//! the one backend has the attach interface's own MAC: the rewrite is then
//! idempotent and every repetition takes the full forwarding path (with a
//! foreign backend MAC, repetitions after the first would be frames to
//! another host's MAC, which the program passes early).

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, Result};
use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use kube_dsr_agent::dataplane::{
    BackendSpec, Config, Dataplane, PortSpec, Protocol, ServiceSpec, Stage, object,
};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    packet::*,
};

#[derive(Parser)]
struct Args {
    /// The other build of `kube-dsr-xdp.o` to compare with.
    #[arg(long)]
    baseline: PathBuf,
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
}

fn ns_per_packet(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<f64> {
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })?;
    Ok(r.duration.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let baseline = std::fs::read(&args.baseline).context("reading the baseline object")?;
    let ns = NetNs::new("kdsrbp")?;
    ns.exec(
        "ip link add dsr0 type veth peer name dsr1 && ip link set dsr0 up && ip link set dsr1 up",
    )?;
    let pins = PinDir::new()?;
    let pin_dir = pins.path.clone();
    let mut cfg = Config::new("dsr0");
    cfg.pin_dir = pin_dir.clone();
    let mut dp = ns.run(move || Dataplane::open(&cfg))??;
    let ours = ns.mac("dsr0")?;
    let vip: IpAddr = "192.0.2.10".parse()?;
    dp.upsert_service(&ServiceSpec {
        name: "bench/parse/v4".into(),
        vip,
        ports: vec![
            PortSpec { port: 80, protocol: Protocol::Udp },
            PortSpec { port: 80, protocol: Protocol::Tcp },
        ],
        table_size: 65537,
        backends: vec![BackendSpec::new("10.0.0.11".parse()?, ours)],
        pin_all_flows: false,
        stage: Stage::Ingress,
    })?;
    dp.settle(std::time::Duration::ZERO)?;

    let client: IpAddr = "10.0.0.1".parse()?;
    let udp = udp_frame(ours, CLIENT, (client, 1024), (vip, 80), &[0u8; 22]);
    let syn = tcp_frame(ours, CLIENT, (client, 1024), (vip, 80), 0x02);
    let other = udp_frame(ours, CLIENT, (client, 1024), ("192.0.2.99".parse()?, 80), &[0u8; 22]);
    let mut bad_len = udp.clone();
    bad_len[16..18].copy_from_slice(&1400u16.to_be_bytes());
    let frames = [
        ("vip_udp_maglev", udp),
        ("vip_tcp_syn_maglev", syn),
        ("not_vip", other),
        ("ipv4_len_past_frame", bad_len),
    ];

    let load = |bytes: &[u8]| -> Result<aya::Ebpf> {
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(bytes)?;
        let prog: &mut Xdp = ebpf.program_mut("kube_dsr").context("program")?.try_into()?;
        prog.load()?;
        Ok(ebpf)
    };
    let (current, base) = (load(object())?, load(&baseline)?);
    let current: &Xdp = current.program("kube_dsr").context("program")?.try_into()?;
    let base: &Xdp = base.program("kube_dsr").context("program")?.try_into()?;
    println!(
        "rounds={} repeat={} (median ns/packet; Δ = current - baseline)",
        args.rounds, args.repeat
    );
    for (name, frame) in &frames {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            b.push(ns_per_packet(base, frame, args.repeat)?);
            a.push(ns_per_packet(current, frame, args.repeat)?);
        }
        let (a, b) = (median(a), median(b));
        println!("{name}: baseline={b:.1} current={a:.1} delta={:+.1}", a - b);
    }
    drop(dp);
    Ok(())
}

const CLIENT: Mac = [0x02, 0xcc, 0, 0, 0, 0x01];
