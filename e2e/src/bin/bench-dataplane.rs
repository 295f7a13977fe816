//! `make bench-dataplane`: kube-dsr's XDP program against the floor (swap
//! MACs, `XDP_TX`), side by side in one run on one veth pair.
//!
//! ```text
//!   generator (BPF_PROG_TEST_RUN, live frames, ingress gen0)
//!      | XDP_TX out of gen0
//!      v
//!   dut0: device under test (floor, or kube-dsr)  --XDP_TX-->  gen0: sink (count, drop)
//!      |
//!      | node stage: bpf_redirect into pod0 (a pod's host-side veth)
//!      v
//!   pod0 ==> podpeer (the pod's eth0): sink (count, drop)
//! ```
//!
//! Everything runs in a network namespace the benchmark creates and removes.
//! Rates are frames that made the whole loop per second of wall time; each
//! measurement alternates with the others over several rounds and the median
//! is kept, so machine noise hits all of them alike. It also prints ns/packet
//! from non-live `BPF_PROG_TEST_RUN`.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use clap::Parser;
use kube_dsr_agent::dataplane::{
    BackendSpec, Config, Dataplane, Egress, PortSpec, Protocol, ServiceSpec, Stage, object,
};
use kube_dsr_e2e::{
    netns::{NetNs, PinDir},
    packet::{Mac, udp_frame},
};

static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!("../../../bpf/obj/kube-dsr-bench.o");

const MODE_FIXED: u32 = 0;
const MODE_CYCLE: u32 = 1;
const MODE_NEW: u32 = 2;

#[derive(Parser, Debug)]
#[command(about = "XDP dataplane benchmark (needs root)")]
struct Args {
    /// Frames per live-frames measurement.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u32,
    /// Rounds; each round measures every case once, back to back, and
    /// ratios are taken within a round before the median across rounds.
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// Backends behind the benchmark VIP.
    #[arg(long, default_value_t = 100)]
    backends: u32,
    /// Distinct flows cycled through in the connection-table-hit case.
    #[arg(long, default_value_t = 4096)]
    flows: u32,
    /// Maglev table size of the benchmark service.
    #[arg(long, default_value_t = 65537)]
    table_size: u32,
    /// Connection-table entries (LRU).
    #[arg(long, default_value_t = kube_dsr_common::DEFAULT_CONN_ENTRIES)]
    conn_entries: u32,
    /// Repetitions for the non-live ns/packet figures.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Local pods behind the node stage's service.
    #[arg(long, default_value_t = 8)]
    pods: u32,
    /// Another build of the XDP object (for example `git show
    /// <commit>:bpf/obj/kube-dsr-xdp.o > old.o`): its ingress-stage hit and
    /// new-flow rates are measured in the same rounds, on the same maps.
    #[arg(long)]
    baseline_object: Option<std::path::PathBuf>,
}

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-dataplane needs root (BPF, XDP, network namespaces)");
    }
    let ns = NetNs::new("kdsrbn")?;
    ns.exec(
        "ip link add gen0 type veth peer name dut0 && ip link set gen0 up && ip link set dut0 up && \
         ip link add pod0 type veth peer name podpeer && ip link set pod0 up && \
         ip link set podpeer up",
    )?;
    let pins = PinDir::new()?;
    let pin_dir = pins.path.clone();
    let gen_mac = ns.mac("gen0")?;
    let dut_mac = ns.mac("dut0")?;
    let pod0_mac = ns.mac("pod0")?;
    let report = ns.run(move || run(&args, &pin_dir, gen_mac, dut_mac, pod0_mac))??;
    println!("{report}");
    Ok(())
}

struct Bench {
    ebpf: Ebpf,
    gen_ifindex: u32,
}

impl Bench {
    fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(name).context("program")?.try_into()?)
    }

    fn configure(&mut self, mode: u32, flows: u32) -> Result<()> {
        let mut cfg: Array<_, u32> = Array::try_from(self.ebpf.map_mut("BENCH_CFG").unwrap())?;
        cfg.set(0, mode, 0)?;
        cfg.set(1, flows, 0)?;
        Ok(())
    }

    fn sunk(&self) -> Result<u64> {
        let sink: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("BENCH_SINK").unwrap())?;
        Ok(sink.get(&0, 0)?.iter().sum())
    }

    /// Sends `frames` live frames; returns frames that came back per second.
    fn live(&mut self, template: &[u8], frames: u32) -> Result<f64> {
        let before = self.sunk()?;
        let ctx = xdp_md(self.gen_ifindex, template.len());
        let gen_prog: &Xdp = self.ebpf.program("bench_gen").unwrap().try_into()?;
        let start = Instant::now();
        gen_prog.test_run(TestRunOptions {
            data_in: Some(template),
            ctx_in: Some(&ctx),
            repeat: frames,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })?;
        // Let the last batch drain through the veth queues.
        std::thread::sleep(Duration::from_millis(20));
        let secs = start.elapsed().as_secs_f64();
        let back = self.sunk()? - before;
        Ok(back as f64 / secs)
    }
}

/// `struct xdp_md` for a frame of `len` bytes arriving on `ifindex` (the
/// kernel insists that `data_end` equals the frame length).
fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn template(gen_mac: Mac, dut_mac: Mac) -> Vec<u8> {
    let client: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
    let f = udp_frame(dut_mac, gen_mac, (client, 1024), (VIP.into(), 80), &[0u8; 22]);
    assert_eq!(f.len(), 64, "the generator's template is 64 bytes");
    f
}

fn ns_per_packet(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<f64> {
    let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })?;
    Ok(r.duration.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The benchmark service; `set` picks one of two disjoint backend sets.
fn service(args: &Args, set: u8, pin_all_flows: bool) -> ServiceSpec {
    let backends = args.backends;
    ServiceSpec {
        name: "bench/udp/v4".into(),
        vip: VIP.into(),
        ports: vec![PortSpec { port: 80, protocol: Protocol::Udp }],
        table_size: args.table_size,
        pin_all_flows,
        stage: Stage::Ingress,
        backends: (0..backends)
            .map(|i| {
                let addr = Ipv4Addr::new(10, 1 + set, (i >> 8) as u8, i as u8).into();
                BackendSpec::new(addr, [0x02, 0xbe, set, 0, (i >> 8) as u8, i as u8])
            })
            .collect(),
    }
}

/// The node stage of the benchmark VIP on a node that is no ingress for it:
/// `pods` local pods, all behind pod0 (one veth stands for each pod's).
fn node_service(args: &Args, pod0: Egress) -> ServiceSpec {
    ServiceSpec {
        name: "bench/udp/v4/node".into(),
        stage: Stage::Node,
        table_size: 251,
        backends: (0..args.pods)
            .map(|i| {
                let addr = Ipv4Addr::new(10, 244, 1, 2 + i as u8).into();
                BackendSpec::pod(addr, [0x02, 0xbf, 0, 0, 0, i as u8], pod0)
            })
            .collect(),
        ..service(args, 0, false)
    }
}

/// Other nodes on the segment (the ingress-stage cases run with peers
/// programmed, as on a real node).
const PEERS: [Mac; 3] =
    [[0x02, 0xee, 0, 0, 0, 1], [0x02, 0xee, 0, 0, 0, 2], [0x02, 0xee, 0, 0, 0, 3]];

/// Share of the packets counted under reasons starting with `prefix`
/// between two snapshots.
fn share(before: &[(&str, u64)], after: &[(&str, u64)], prefix: &str) -> f64 {
    let total: u64 = before.iter().zip(after).map(|(b, a)| a.1 - b.1).sum();
    let hit: u64 = before
        .iter()
        .zip(after)
        .filter(|(b, _)| b.0.starts_with(prefix))
        .map(|(b, a)| a.1 - b.1)
        .sum();
    hit as f64 / total.max(1) as f64
}

/// Pins the calling thread to the last CPU under `SCHED_FIFO`, so a
/// compiler or test running beside the benchmark cannot take its CPU away
/// mid-measurement (veth's NAPI work runs in the same thread's softirq).
/// Every measurement is bounded, so the thread always yields again.
fn isolate() -> Result<usize> {
    // SAFETY: plain libc calls on the calling thread with valid arguments.
    unsafe {
        let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let cpu = cpus - 1;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        let param = libc::sched_param { sched_priority: 10 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
            bail!("sched_setscheduler: {}", std::io::Error::last_os_error());
        }
        Ok(cpu)
    }
}

fn run(
    args: &Args,
    pin_dir: &std::path::Path,
    gen_mac: Mac,
    dut_mac: Mac,
    pod0_mac: Mac,
) -> Result<String> {
    let cpu = isolate()?;
    let gen_ifindex = ifindex("gen0")?;
    let pod0 = Egress { ifindex: ifindex("pod0")?, mac: pod0_mac };
    let baseline = args.baseline_object.as_ref().map(std::fs::read).transpose()?;
    let mut bench = Bench { ebpf: EbpfLoader::new().load(BENCH_OBJECT)?, gen_ifindex };
    for p in ["bench_gen", "bench_sink", "bench_floor"] {
        bench.xdp(p)?.load()?;
    }
    // The sink stays on gen0 for the whole run (veth only delivers XDP_TX
    // frames to a peer that has an XDP program).
    bench.xdp("bench_sink")?.attach("gen0", XdpMode::Driver)?;
    // And on the pod's side of pod0, where the node stage delivers (a veth
    // delivers redirected frames only to a peer with XDP or GRO).
    bench.xdp("bench_sink")?.attach("podpeer", XdpMode::Driver)?;
    let tmpl = template(gen_mac, dut_mac);
    {
        let mut t: Array<_, [u8; 64]> =
            Array::try_from(bench.ebpf.map_mut("BENCH_TEMPLATE").unwrap())?;
        t.set(0, <[u8; 64]>::try_from(&tmpl[..])?, 0)?;
    }

    let mut floor = Vec::new();
    let mut hit = Vec::new();
    let mut miss = Vec::new();
    let mut hit_share = Vec::new();
    let mut miss_share = Vec::new();
    let mut pin_all = Vec::new();
    let mut change = Vec::new();
    let mut change_share = Vec::new();
    let mut pin_all_share = Vec::new();
    let mut node = Vec::new();
    let mut node_share = Vec::new();
    let mut base_hit = Vec::new();
    let mut base_miss = Vec::new();
    let mut ns_node = 0.0;
    let (mut base_ns_maglev, mut base_ns_hit) = (0.0, 0.0);
    let mut ns_floor = 0.0;
    let mut ns_hit = 0.0;
    let mut ns_maglev = 0.0;
    let mut ns_miss = 0.0;
    let mut ns_floor_single = 0.0;
    let cfg = Config {
        pin_dir: pin_dir.to_path_buf(),
        attach: kube_dsr_agent::dataplane::AttachMode::Native,
        conn_entries: args.conn_entries,
        ..Config::new("dut0")
    };
    for round in 0..args.rounds {
        // (a) the floor.
        bench.configure(MODE_FIXED, 1)?;
        let link = bench.xdp("bench_floor")?.attach("dut0", XdpMode::Driver)?;
        floor.push(bench.live(&tmpl, args.frames)?);
        bench.xdp("bench_floor")?.detach(link)?;

        // (b) connection-table hits. Moving the service to a disjoint
        // backend set makes every flow's slot change, so the warm-up pass
        // pins all of them; the measured pass then hits the table.
        let mut dp = Dataplane::open(&cfg)?;
        dp.set_peers(&PEERS)?;
        dp.upsert_service(&service(args, 0, false))?;
        dp.upsert_service(&service(args, 1, false))?;
        bench.configure(MODE_CYCLE, args.flows)?;
        bench.live(&tmpl, args.flows * 2)?;
        let c0 = dp.reason_counts()?;
        hit.push(bench.live(&tmpl, args.frames)?);
        let c1 = dp.reason_counts()?;
        hit_share.push(share(&c0, &c1, "fwd_conn_hit"));

        // (c) new flows, settled service (no previous table, pins collected):
        // Maglev alone, no connection-table lookup, no insert.
        let settled = dp.settle(Duration::ZERO)?;
        assert_eq!(settled.unpinned_services, 1, "{settled:?}");
        bench.configure(MODE_NEW, 0)?;
        miss.push(bench.live(&tmpl, args.frames)?);
        let c2 = dp.reason_counts()?;
        miss_share.push(share(&c1, &c2, "fwd_maglev"));
        if round == 0 {
            // Non-live: the fixed frame is not pinned, so every repetition
            // takes the Maglev path (cache-warm: the same slot each time).
            let mut dsr = EbpfLoader::new().default_map_pin_directory(pin_dir).load(object())?;
            let prog: &mut Xdp = dsr.program_mut("kube_dsr").unwrap().try_into()?;
            prog.load()?;
            ns_maglev = ns_per_packet(prog, &tmpl, args.repeat)?;
        }

        // (e) new flows right after one backend of the 100 starts draining:
        // the previous table is kept, every packet looks in the connection
        // table, and the ~1 % of flows whose slot moved are pinned.
        let mut draining = service(args, 1, false);
        draining.backends[0].draining = true;
        dp.upsert_service(&draining)?;
        change.push(bench.live(&tmpl, args.frames)?);
        let c25 = dp.reason_counts()?;
        change_share.push(share(&c2, &c25, "fwd_maglev"));
        let c2 = c25;

        // (d) new flows with every flow pinned (Katran's behaviour).
        dp.upsert_service(&service(args, 1, true))?;
        pin_all.push(bench.live(&tmpl, args.frames)?);
        let c3 = dp.reason_counts()?;
        pin_all_share.push(share(&c2, &c3, "fwd_pinned_"));

        if round == 0 {
            // ns/packet, non-live: a second load of the object on the same
            // pinned maps. The service is in pin-all mode now, so the fixed
            // frame is a connection-table hit after its first run, and each
            // distinct frame below is a new flow with an insert.
            let mut dsr = EbpfLoader::new().default_map_pin_directory(pin_dir).load(object())?;
            let prog: &mut Xdp = dsr.program_mut("kube_dsr").unwrap().try_into()?;
            prog.load()?;
            ns_hit = ns_per_packet(prog, &tmpl, args.repeat)?;
            let floor_prog: &Xdp = bench.ebpf.program("bench_floor").unwrap().try_into()?;
            ns_floor = ns_per_packet(floor_prog, &tmpl, args.repeat)?;
            // New flows cannot be repeated in place: time single runs of
            // distinct frames, and the floor the same way for comparison.
            let (mut sum_miss, mut sum_floor) = (0.0, 0.0);
            let n = 20_000u32;
            for i in 0..n {
                let client: IpAddr = Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8).into();
                let f = udp_frame(dut_mac, gen_mac, (client, 2000), (VIP.into(), 80), &[0u8; 22]);
                sum_miss += ns_per_packet(prog, &f, 1)?;
                sum_floor += ns_per_packet(floor_prog, &f, 1)?;
            }
            ns_miss = sum_miss / f64::from(n);
            ns_floor_single = sum_floor / f64::from(n);
        }
        drop(dp);
        Dataplane::remove_pins(pin_dir)?;

        // (f) the node stage on a node that is no ingress for the VIP: in
        // on dut0, redirected into pod0 with the pod's MAC; new flows of a
        // settled service (the steady state).
        let mut dp = Dataplane::open(&cfg)?;
        dp.set_peers(&PEERS)?;
        dp.upsert_service(&node_service(args, pod0))?;
        bench.configure(MODE_NEW, 0)?;
        let c4 = dp.reason_counts()?;
        node.push(bench.live(&tmpl, args.frames)?);
        let c5 = dp.reason_counts()?;
        node_share.push(share(&c4, &c5, "fwd_node_local"));
        if round == 0 {
            let mut dsr = EbpfLoader::new().default_map_pin_directory(pin_dir).load(object())?;
            let prog: &mut Xdp = dsr.program_mut("kube_dsr").unwrap().try_into()?;
            prog.load()?;
            ns_node = ns_per_packet(prog, &tmpl, args.repeat)?;
        }

        // (g) the baseline object on the same maps: the ingress service
        // again, the baseline program on dut0 instead of this build's.
        if let Some(object) = &baseline {
            drop(dp);
            Dataplane::remove_pins(pin_dir)?;
            let mut dp = Dataplane::open(&cfg)?;
            dp.upsert_service(&service(args, 0, false))?;
            dp.upsert_service(&service(args, 1, false))?;
            // Removing the pin detaches this build's program.
            std::fs::remove_file(pin_dir.join("xdp_link"))?;
            let mut old = EbpfLoader::new().default_map_pin_directory(pin_dir).load(object)?;
            let prog: &mut Xdp = old.program_mut("kube_dsr").unwrap().try_into()?;
            prog.load()?;
            let link = prog.attach("dut0", XdpMode::Driver)?;
            bench.configure(MODE_CYCLE, args.flows)?;
            bench.live(&tmpl, args.flows * 2)?;
            base_hit.push(bench.live(&tmpl, args.frames)?);
            dp.settle(Duration::ZERO)?;
            bench.configure(MODE_NEW, 0)?;
            base_miss.push(bench.live(&tmpl, args.frames)?);
            if round == 0 {
                // The same non-live ns/packet figures as this build's:
                // settled (Maglev), then pin-all (a connection-table hit).
                let mut copy = EbpfLoader::new().default_map_pin_directory(pin_dir).load(object)?;
                let p: &mut Xdp = copy.program_mut("kube_dsr").unwrap().try_into()?;
                p.load()?;
                base_ns_maglev = ns_per_packet(p, &tmpl, args.repeat)?;
                dp.upsert_service(&service(args, 1, true))?;
                base_ns_hit = ns_per_packet(p, &tmpl, args.repeat)?;
            }
            let prog: &mut Xdp = old.program_mut("kube_dsr").unwrap().try_into()?;
            prog.detach(link)?;
            drop(dp);
        } else {
            drop(dp);
        }
        Dataplane::remove_pins(pin_dir)?;
    }

    // Ratios within each round (same minute, same machine state), then the
    // median across rounds.
    let ratio = |xs: &[f64]| median(xs.iter().zip(&floor).map(|(x, f)| x / f).collect());
    let (hit_ratio, miss_ratio, change_ratio, pin_all_ratio) =
        (ratio(&hit), ratio(&miss), ratio(&change), ratio(&pin_all));
    let spread = |xs: &[f64]| {
        let r: Vec<f64> = xs.iter().zip(&floor).map(|(x, f)| x / f).collect();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        format!("{lo:.3}..{hi:.3}")
    };
    let (hit_spread, miss_spread) = (spread(&hit), spread(&miss));
    let node_ratio = ratio(&node);
    let baseline_line = if baseline.is_some() {
        format!(
            "baseline object ({}): hit_ratio={:.3} miss_ratio={:.3} (same rounds); \
             ns_per_packet hit={base_ns_hit:.1} maglev={base_ns_maglev:.1}\n",
            args.baseline_object.as_ref().unwrap().display(),
            ratio(&base_hit),
            ratio(&base_miss)
        )
    } else {
        String::new()
    };
    let (f, h, m, p) = (median(floor.clone()), median(hit), median(miss), median(pin_all));
    let mpps = |x: f64| x / 1e6;
    Ok(format!(
        "cpu={cpu} (SCHED_FIFO) rounds={} frames_per_measurement={} backends={} hit_flows={}\n\
         reason shares (must be ~1): hit=fwd_conn_hit {:.4}, miss=fwd_maglev {:.4}, \
         pin_all=fwd_pinned_* {:.4}\n\
         ns_per_packet (BPF_PROG_TEST_RUN): floor={ns_floor:.1} hit={ns_hit:.1} \
         maglev={ns_maglev:.1} node={ns_node:.1} (repeat={}); floor_single={ns_floor_single:.1} pin_all_miss_single={ns_miss:.1} \
         (20000 single runs)\n\
         node stage: fwd_node_local share {:.4}, {} pods, per-round ratio range {}\n\
         {baseline_line}\
         change_miss_mpps={:.3} change_miss_ratio={:.3} (fwd_maglev share {:.4}, rest pinned)\n\
         pin_all_miss_mpps={:.3} pin_all_miss_ratio={:.3}\n\
         per-round ratio range: hit {hit_spread}, miss {miss_spread}\n\
         floor_mpps={:.3} hit_mpps={:.3} miss_mpps={:.3} hit_ratio={:.3} miss_ratio={:.3} \
         node_mpps={:.3} node_ratio={:.3}",
        args.rounds,
        args.frames,
        args.backends,
        args.flows,
        median(hit_share),
        median(miss_share),
        median(pin_all_share),
        args.repeat,
        median(node_share),
        args.pods,
        spread(&node),
        mpps(median(change.clone())),
        change_ratio,
        median(change_share),
        mpps(p),
        pin_all_ratio,
        mpps(f),
        mpps(h),
        mpps(m),
        hit_ratio,
        miss_ratio,
        mpps(median(node.clone())),
        node_ratio,
    ))
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 { bail!("no interface {name}") } else { Ok(i) }
}
