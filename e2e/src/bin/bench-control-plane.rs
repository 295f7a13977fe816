//! `make bench-control-plane`: the control plane at cluster scale.
//!
//! Per scale (services × ready pods each, on `--nodes` nodes), in a network
//! namespace the benchmark creates and removes:
//!
//! ```text
//!   bench (this process, kube client)      dsr-apiserver (stand-in)
//!        |  creates Nodes, Pods, DsrNodeReports, DsrServices
//!        v
//!   dsr-operator (release, --no-leader-election)  -->  EndpointSlices, status
//!   dsr-agent    (release, node ing-1, ingress role, XDP on eth0)
//!        |  pinned maps under a bpffs directory the bench reads back
//!        v
//!   the dataplane: per service, the backend entries in use
//! ```
//!
//! The backend nodes (`worker-NNN`) run no agent here: the benchmark
//! writes each one's DsrNodeReport as its agent would (every pod on it
//! delivered and configured, on the node's segment). The pods' addresses
//! are on the ingress interface's segment with permanent neighbour
//! entries, so the ingress agent reaches each pod directly by its own MAC
//! and each backend is its own entry in the dataplane (a pod change is one
//! entry appearing or going).
//!
//! The world (nodes, pods, reports, services) is written first, then the
//! operator and the agent start: convergence is the time from their start
//! until every EndpointSlice holds every ready pod and the agent's
//! dataplane holds every service with exactly its ready pods. Then single
//! changes (pod NotReady, new pod, pod deleted) are timed from the API
//! write to the EndpointSlice (seen through a watch) and to the dataplane
//! (seen in the pinned maps). CPU seconds and peak RSS come from /proc.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::MapData;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_dsr_agent::dataplane::read_batched;
use kube_dsr_common::{
    BACKEND_DRAINING, BACKEND_IN_USE, Backend, MAP_BACKENDS, MAP_SERVICES, ServiceSlot,
};
use kube_dsr_crds::DsrNodeReport;
use kube_dsr_e2e::cluster::{Proc, binary, documented_capabilities};
use kube_dsr_e2e::netns::{NetNs, PinDir, run_in};
use serde_json::{Value, json};

const NAMESPACE: &str = "default";
const INGRESS_NODE: &str = "ing-1";
/// The segment: ingress node, backend nodes and every pod address.
const SEGMENT_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
const SEGMENT_PREFIX: u8 = 15;
/// Pod addresses start here (node addresses are below).
const FIRST_POD: u32 = 1024;
const VIP_BASE: u32 = u32::from_be_bytes([10, 200, 0, 0]);
/// Maglev table size of every service: the size the agent's default
/// capacity is planned for at 1,000 services (DESIGN.md, "Capacity").
const TABLE_SIZE: u32 = 16381;

#[derive(Parser, Debug, Clone)]
#[command(about = "Control-plane benchmark: convergence and change latency at scale (needs root)")]
struct Args {
    /// Scales to run, `SERVICESxPODS` each.
    #[arg(long, value_delimiter = ',', default_value = "100x100,1000x10,1000x100")]
    scales: Vec<String>,
    /// Backend nodes the pods are spread over.
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Single changes timed per scale (NotReady, new pod, deleted in turn).
    #[arg(long, default_value_t = 60)]
    changes: usize,
    /// Seconds to wait for convergence (and for each change).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Extra flags for dsr-agent (capacity flags, for instance), one string.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    agent_args: String,
    /// Time the operator only: convergence is every EndpointSlice complete,
    /// changes are timed to the slice, and the dataplane columns are NA
    /// (for scales the agent cannot program).
    #[arg(long)]
    slices_only: bool,
    /// Pods created in parallel while building the world.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
}

#[derive(Clone, Copy, Debug)]
struct Scale {
    services: u32,
    pods: u32,
}

fn parse_scale(s: &str) -> Result<Scale> {
    let (a, b) = s.split_once('x').with_context(|| format!("scale {s:?} is not NxB"))?;
    Ok(Scale { services: a.parse()?, pods: b.parse()? })
}

fn ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(SEGMENT_BASE + n)
}

fn mac_of(n: u32) -> String {
    let b = n.to_be_bytes();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn node_name(i: u32) -> String {
    format!("worker-{i:03}")
}

fn service_name(i: u32) -> String {
    format!("svc-{i:04}")
}

/// One pod the benchmark made: its address number is its identity.
#[derive(Clone, Debug)]
struct BenchPod {
    service: u32,
    name: String,
    uid: String,
    node: u32,
    addr: u32,
}

impl BenchPod {
    fn new(service: u32, seq: u32, addr: u32, nodes: u32) -> Self {
        BenchPod {
            service,
            name: format!("{}-p{seq:04}", service_name(service)),
            uid: format!("00000000-0000-4000-8000-{addr:012x}"),
            node: addr % nodes,
            addr,
        }
    }

    fn object(&self, ready: bool) -> Value {
        let ip = ip(self.addr).to_string();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": NAMESPACE, "uid": self.uid,
                "labels": {"app": service_name(self.service)}},
            "spec": {"nodeName": node_name(self.node),
                "containers": [{"name": "app", "image": "registry.example/app:1"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        })
    }
}

fn vip(service: u32) -> String {
    Ipv4Addr::from(VIP_BASE + service).to_string()
}

/// A backend node's report, as its agent would write it: every pod on it
/// configured and delivered (pods on the node's segment).
fn report(node: u32, pods: &[&BenchPod]) -> Value {
    let backends: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({"podUID": p.uid, "namespace": NAMESPACE, "name": p.name,
                "configuredVips": [vip(p.service)], "deliveredVips": [vip(p.service)],
                "delivery": "Segment"})
        })
        .collect();
    json!({
        "apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrNodeReport",
        "metadata": {"name": node_name(node)},
        "spec": {"nodeName": node_name(node), "agentVersion": "bench", "ingress": [], "backends": backends},
    })
}

/// CPU seconds and peak RSS of a process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_s: f64,
    peak_rss_mib: f64,
}

fn usage(pid: u32) -> Result<Usage> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), 1-based 14, 15.
    let rest = stat.rsplit_once(')').context("stat layout")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Ok(Usage { cpu_s: ticks / hz, peak_rss_mib: hwm_kib / 1024.0 })
}

/// What the agent's dataplane holds, per service name: the addresses of
/// the backend entries in use and not draining (those taking new flows).
type Programmed = HashMap<String, HashSet<u32>>;

/// Reads the pinned maps of the agent's ingress interface, each in a few
/// batched calls (a full read of the 131,072-slot backend map takes
/// milliseconds, so a change is seen within milliseconds of being written).
struct MapReader {
    backends: MapData,
    services: MapData,
}

impl MapReader {
    fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<MapData> {
            let p = dir.join(name);
            MapData::from_pin(&p).with_context(|| format!("{}", p.display()))
        };
        Ok(MapReader { backends: open(MAP_BACKENDS)?, services: open(MAP_SERVICES)? })
    }

    fn names(&self) -> Result<HashMap<u32, String>> {
        let mut names: HashMap<u32, String> = HashMap::new();
        let slots: Vec<ServiceSlot> = read_batched(&self.services, 1)?;
        for (id, s) in slots.iter().enumerate() {
            if s.flags & kube_dsr_common::SERVICE_IN_USE == 0 {
                continue;
            }
            let end = s.name.iter().position(|b| *b == 0).unwrap_or(s.name.len());
            // The ingress stage's entries only (`default/svc-0001/v4`).
            let full = String::from_utf8_lossy(&s.name[..end]).into_owned();
            let parts: Vec<&str> = full.split('/').collect();
            if let [_, svc, "v4"] = parts.as_slice() {
                names.insert(id as u32, svc.to_string());
            }
        }
        Ok(names)
    }

    fn entry(b: &Backend) -> Option<u32> {
        if b.flags & BACKEND_IN_USE == 0 || b.flags & BACKEND_DRAINING != 0 {
            return None;
        }
        Some(u32::from_be_bytes(b.addr[0].to_ne_bytes()).wrapping_sub(SEGMENT_BASE))
    }

    fn read_all(&mut self) -> Result<Programmed> {
        let names = self.names()?;
        let mut out: Programmed = HashMap::new();
        let backends: Vec<Backend> = read_batched(&self.backends, 1)?;
        for b in &backends {
            let Some(addr) = Self::entry(b) else { continue };
            let Some(svc) = names.get(&b.svc_id) else { continue };
            out.entry(svc.clone()).or_default().insert(addr);
        }
        Ok(out)
    }
}

/// The latest dataplane snapshot and when its read ended (a change it
/// shows was written before then: a latency is never under-stated).
type Snapshot = Arc<Mutex<Option<(Instant, Arc<Programmed>)>>>;

/// Reads the maps on a thread of its own until `stop`. Reads are spaced
/// by at least their own duration, so the reader takes at most half a
/// core from the processes it measures.
fn poll_dataplane(dir: PathBuf, out: Snapshot, stop: Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        let mut reader: Option<MapReader> = None;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if reader.is_none() {
                reader = MapReader::open(&dir).ok();
            }
            let Some(r) = reader.as_mut() else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let started = Instant::now();
            match r.read_all() {
                Ok(p) => *out.lock().expect("lock") = Some((Instant::now(), Arc::new(p))),
                Err(_) => reader = None,
            }
            std::thread::sleep(started.elapsed().max(Duration::from_millis(2)));
        }
    });
}

/// What the operator's slices say, per service: address → ready.
type Slices = Arc<Mutex<(Instant, HashMap<String, HashMap<u32, bool>>)>>;

fn slice_view(slices: &BTreeMap<String, EndpointSlice>) -> HashMap<String, HashMap<u32, bool>> {
    let mut out: HashMap<String, HashMap<u32, bool>> = HashMap::new();
    for s in slices.values() {
        let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get("kubedsr.io/service-name"))
        else {
            continue;
        };
        let entry = out.entry(svc.clone()).or_default();
        for e in &s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<Ipv4Addr>() {
                    entry.insert(u32::from(ip).wrapping_sub(SEGMENT_BASE), ready);
                }
            }
        }
    }
    out
}

/// Watches the EndpointSlices into `out` (slices are few; the view is
/// rebuilt per event from the affected service's slices).
async fn watch_slices(client: Client, out: Slices) {
    let api: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let mut all: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut buffer: Option<BTreeMap<String, EndpointSlice>> = None;
    let stream = watcher(
        api,
        watcher::Config::default().labels("endpointslice.kubernetes.io/managed-by=kubedsr.io"),
    );
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
        let svc = |s: &EndpointSlice| {
            s.metadata.labels.as_ref().and_then(|l| l.get("kubedsr.io/service-name").cloned())
        };
        let mut touched: Vec<String> = Vec::new();
        match ev {
            watcher::Event::Apply(s) => {
                touched.extend(svc(&s));
                all.insert(name(&s), s);
            }
            watcher::Event::Delete(s) => {
                touched.extend(svc(&s));
                all.remove(&name(&s));
            }
            watcher::Event::Init => buffer = Some(BTreeMap::new()),
            watcher::Event::InitApply(s) => {
                buffer.get_or_insert_with(BTreeMap::new).insert(name(&s), s);
            }
            watcher::Event::InitDone => {
                all = buffer.take().unwrap_or_default();
                *out.lock().expect("lock") = (Instant::now(), slice_view(&all));
                continue;
            }
        }
        let mut guard = out.lock().expect("lock");
        for t in touched {
            let of: BTreeMap<String, EndpointSlice> = all
                .iter()
                .filter(|(_, s)| svc(s).as_deref() == Some(t.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let view = slice_view(&of);
            match view.get(&t) {
                Some(v) => guard.1.insert(t, v.clone()),
                None => guard.1.remove(&t),
            };
        }
        guard.0 = Instant::now();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Debug, Default)]
struct Row {
    scale: String,
    create_pods_per_s: f64,
    list_pods_s: f64,
    converge_s: Option<f64>,
    slice: Vec<f64>,
    dataplane: Vec<f64>,
    missed: usize,
    operator_cpu_per_change_s: f64,
    operator: Usage,
    agent: Usage,
    apiserver: Usage,
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "NA".into(), |v| format!("{v:.digits$}"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "bench-control-plane needs root (netns, XDP, bpffs)");
    let scales: Vec<Scale> = args.scales.iter().map(|s| parse_scale(s)).collect::<Result<_>>()?;
    let operator = binary("dsr-operator")?;
    let agent = binary("dsr-agent")?;
    let apiserver = binary("dsr-apiserver")?;
    let caps = documented_capabilities()?;
    println!(
        "machine: {} cores, {}; kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    let mut rows = Vec::new();
    for scale in scales {
        let row = run_scale(&args, scale, &operator, &agent, &apiserver, &caps)
            .with_context(|| format!("scale {}x{}", scale.services, scale.pods))?;
        print_row(&row);
        rows.push(row);
    }
    println!();
    println!(
        "| services × pods | stand-in: pod creates/s, list all pods s | converge s | change → slice p50 / p99 s | change → dataplane p50 / p99 s | operator CPU s per change | peak RSS MiB operator / agent / stand-in | CPU s operator / agent / stand-in |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let l = Latencies::of(r);
        println!(
            "| {} | {:.0}, {:.2} | {} | {:.3} / {:.3} | {:.3} / {:.3}{} | {:.4} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} |",
            r.scale,
            r.create_pods_per_s,
            r.list_pods_s,
            fmt_opt(r.converge_s, 1),
            l.slice_p50,
            l.slice_p99,
            l.dataplane_p50,
            l.dataplane_p99,
            if r.missed > 0 { format!(" ({} missed)", r.missed) } else { String::new() },
            r.operator_cpu_per_change_s,
            r.operator.peak_rss_mib,
            r.agent.peak_rss_mib,
            r.apiserver.peak_rss_mib,
            r.operator.cpu_s,
            r.agent.cpu_s,
            r.apiserver.cpu_s,
        );
    }
    let base = rows.iter().find(|r| r.scale == "100x100");
    if let (Some(small), Some(big)) = (base, rows.iter().find(|r| r.scale == "1000x100")) {
        println!(
            "operator CPU per change: 1000x100 / 100x100 = {:.2} ({:.4} s / {:.4} s)",
            big.operator_cpu_per_change_s / small.operator_cpu_per_change_s,
            big.operator_cpu_per_change_s,
            small.operator_cpu_per_change_s
        );
    }
    if let Some(r) = rows.last() {
        let l = Latencies::of(r);
        println!(
            "scale={} converge_s={} change_p99_s={:.3} dataplane_p99_s={:.3} operator_rss_mib={:.0} agent_rss_mib={:.0}",
            r.scale,
            fmt_opt(r.converge_s, 1),
            l.slice_p99,
            l.dataplane_p99,
            r.operator.peak_rss_mib,
            r.agent.peak_rss_mib
        );
    }
    Ok(())
}

/// A row's change latencies (seconds; NaN without samples).
struct Latencies {
    slice_p50: f64,
    slice_p99: f64,
    dataplane_p50: f64,
    dataplane_p99: f64,
}

impl Latencies {
    fn of(r: &Row) -> Self {
        let sorted = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v
        };
        let (s, d) = (sorted(&r.slice), sorted(&r.dataplane));
        Latencies {
            slice_p50: percentile(&s, 50.0),
            slice_p99: percentile(&s, 99.0),
            dataplane_p50: percentile(&d, 50.0),
            dataplane_p99: percentile(&d, 99.0),
        }
    }
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn print_row(r: &Row) {
    let l = Latencies::of(r);
    println!(
        "scale {}: stand-in creates {:.0} pods/s, lists them all in {:.2} s; converge {} s; change→slice p50 {:.3} p99 {:.3} s; change→dataplane p50 {:.3} p99 {:.3} s ({} changes, {} missed); operator CPU {:.4} s/change; peak RSS operator {:.0} agent {:.0} stand-in {:.0} MiB; CPU s operator {:.1} agent {:.1} stand-in {:.1}",
        r.scale,
        r.create_pods_per_s,
        r.list_pods_s,
        fmt_opt(r.converge_s, 1),
        l.slice_p50,
        l.slice_p99,
        l.dataplane_p50,
        l.dataplane_p99,
        r.slice.len(),
        r.missed,
        r.operator_cpu_per_change_s,
        r.operator.peak_rss_mib,
        r.agent.peak_rss_mib,
        r.apiserver.peak_rss_mib,
        r.operator.cpu_s,
        r.agent.cpu_s,
        r.apiserver.cpu_s
    );
}

fn run_scale(
    args: &Args,
    scale: Scale,
    operator: &Path,
    agent: &Path,
    apiserver: &Path,
    caps: &[String],
) -> Result<Row> {
    let ns = NetNs::new("kdsrcp")?;
    let pins = PinDir::new()?;
    fs::create_dir_all(&pins.path)?;
    // The ingress node's interface, with its peer as the rest of the
    // segment (frames the XDP program transmits end there).
    ns.exec(
        "ip link add eth0 type veth peer name lan0 && ip link set lan0 up && ip link set eth0 up",
    )?;
    ns.exec(&format!("ip addr add {}/{SEGMENT_PREFIX} dev eth0", ip(1)))?;
    let total_pods = scale.services * scale.pods;
    // Spare addresses for the pods the changes add.
    let spares = args.changes as u32 + 16;
    let mut batch = String::new();
    for n in (2..2 + args.nodes).chain(FIRST_POD..FIRST_POD + total_pods + spares) {
        batch.push_str(&format!(
            "neigh replace {} lladdr {} dev eth0 nud permanent\n",
            ip(n),
            mac_of(n)
        ));
    }
    let batch_file = std::env::temp_dir().join(format!("{}-neigh", ns.name));
    fs::write(&batch_file, batch)?;
    ns.exec(&format!("ip -batch {}", batch_file.display()))?;
    let _ = fs::remove_file(&batch_file);

    // The stand-in, in the namespace; its kubeconfig for everyone.
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", ns.name));
    let api_addr = format!("{}:6443", ip(1));
    // Watch events retained: a client that falls further behind relists
    // (410 Gone), as after an etcd compaction. Every record holds a whole
    // object, so this bounds the stand-in's memory too.
    let history = "50000".to_string();
    let kc = kubeconfig.to_str().context("path")?.to_string();
    let api = Proc::spawn(
        "apiserver",
        &ns.name,
        &[],
        apiserver,
        &["--listen", &api_addr, "--kubeconfig", &kc, "--history", &history],
        &kubeconfig,
    )?;
    let url = format!("http://{api_addr}");
    let ns_name = ns.name.clone();
    let args_c = args.clone();
    let operator = operator.to_path_buf();
    let agent = agent.to_path_buf();
    let caps = caps.to_vec();
    let pin_path = pins.path.clone();
    // Every socket of the bench lives in the namespace: run the client on
    // a thread that entered it.
    let row = run_in(&ns.name, move || -> Result<Row> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(world(
            &args_c,
            scale,
            &url,
            &ns_name,
            &kubeconfig,
            &operator,
            &agent,
            &caps,
            &pin_path,
            &api,
        ))
    })??;
    drop(pins);
    Ok(row)
}

#[allow(clippy::too_many_arguments)]
async fn world(
    args: &Args,
    scale: Scale,
    url: &str,
    ns: &str,
    kubeconfig: &Path,
    operator: &Path,
    agent: &Path,
    caps: &[String],
    pins: &Path,
    api: &Proc,
) -> Result<Row> {
    let client = Client::try_from(kube::Config::new(url.parse()?))?;
    // Wait for the stand-in.
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.apiserver_version().await.is_err() {
        ensure!(Instant::now() < deadline, "stand-in did not answer: {}", api.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let reports: Api<DsrNodeReport> = Api::all(client.clone());
    let services: Api<kube_dsr_crds::DsrService> = Api::namespaced(client.clone(), NAMESPACE);
    let pp = PostParams::default();

    // Nodes, Ready: the ingress node and the backend nodes (excluded from
    // load balancing, so ing-1 is every service's only ingress node).
    let mut all_nodes =
        vec![(INGRESS_NODE.to_string(), 1u32, json!({"kubedsr.io/ingress": "true"}))];
    for i in 0..args.nodes {
        all_nodes.push((
            node_name(i),
            2 + i,
            json!({"node.kubernetes.io/exclude-from-external-load-balancers": "true"}),
        ));
    }
    for (name, n, labels) in &all_nodes {
        let obj: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
        }))?;
        nodes.create(&pp, &obj).await?;
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": ip(*n).to_string()},
                          {"type": "Hostname", "address": name}]}});
        nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    }

    // Pods, Ready, spread over the nodes.
    let mut world: Vec<BenchPod> = Vec::new();
    for s in 0..scale.services {
        for p in 0..scale.pods {
            let addr = FIRST_POD + s * scale.pods + p;
            world.push(BenchPod::new(s, p, addr, args.nodes));
        }
    }
    let started = Instant::now();
    futures::stream::iter(world.clone())
        .map(|p| {
            let pods = pods.clone();
            async move {
                let obj: Pod = serde_json::from_value(p.object(true))?;
                pods.create(&PostParams::default(), &obj).await.with_context(|| p.name.clone())?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.parallel)
        .try_collect::<Vec<()>>()
        .await?;
    let create_pods_per_s = world.len() as f64 / started.elapsed().as_secs_f64();
    eprintln!("created {} pods in {:.1} s", world.len(), started.elapsed().as_secs_f64());

    // The backend nodes' reports, as their agents would write them.
    let mut by_node: BTreeMap<u32, Vec<BenchPod>> = BTreeMap::new();
    for p in &world {
        by_node.entry(p.node).or_default().push(p.clone());
    }
    let apply = PatchParams::apply("bench-node-agent").force();
    for i in 0..args.nodes {
        let of: Vec<&BenchPod> = by_node.get(&i).map(|v| v.iter().collect()).unwrap_or_default();
        reports.patch(&node_name(i), &apply, &Patch::Apply(&report(i, &of))).await?;
    }

    // The services: ARP announcement off (routed VIPs), so what is timed
    // is programming, not Lease traffic; tableSize 16381.
    for s in 0..scale.services {
        let obj: kube_dsr_crds::DsrService = serde_json::from_value(json!({
            "apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrService",
            "metadata": {"name": service_name(s), "namespace": NAMESPACE},
            "spec": {"vips": [vip(s)], "ports": [{"port": 80, "protocol": "TCP"}],
                "selector": {"app": service_name(s)}, "ingress": {"announcement": "None"},
                "hashing": {"tableSize": TABLE_SIZE}},
        }))?;
        services.create(&pp, &obj).await?;
    }

    // The operator and the agent start on a complete world.
    let op_args = ["--no-leader-election", "--http-addr", "127.0.0.1:18090"];
    let started = Instant::now();
    let op = Proc::spawn("operator", ns, &[], operator, &op_args, kubeconfig)?;
    let pin_arg = pins.to_str().context("pins")?.to_string();
    let mut agent_args: Vec<String> = [
        "--node-name",
        INGRESS_NODE,
        "--http-addr",
        "127.0.0.1:9477",
        "--bpffs-dir",
        &pin_arg,
        "--lease-namespace",
        "kube-dsr",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    agent_args.extend(args.agent_args.split_whitespace().map(String::from));
    let agent_refs: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let ag = Proc::spawn("agent", ns, caps, agent, &agent_refs, kubeconfig)?;

    let slices: Slices = Arc::new(Mutex::new((Instant::now(), HashMap::new())));
    let watch = tokio::spawn(watch_slices(client.clone(), Arc::clone(&slices)));
    let snapshot: Snapshot = Arc::new(Mutex::new(None));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    poll_dataplane(
        // The agent pins one directory per interface under --bpffs-dir.
        pins.join("eth0"),
        Arc::clone(&snapshot),
        Arc::clone(&stop),
    );

    // Expected: every service with exactly its ready pods.
    let mut expected: HashMap<String, HashSet<u32>> = HashMap::new();
    for p in &world {
        expected.entry(service_name(p.service)).or_default().insert(p.addr);
    }
    let timeout = Duration::from_secs(args.timeout);
    let mut converge_s = None;
    let mut last_report = Instant::now();
    loop {
        let slices_ok = {
            let g = slices.lock().expect("lock");
            expected.iter().all(|(svc, want)| {
                g.1.get(svc).is_some_and(|have| {
                    have.len() == want.len() && want.iter().all(|a| have.get(a) == Some(&true))
                })
            })
        };
        let dp = snapshot.lock().expect("lock").clone();
        let dp_ok = args.slices_only
            || dp.as_ref().is_some_and(|(_, p)| {
                expected.iter().all(|(svc, want)| p.get(svc).is_some_and(|have| have == want))
            });
        if slices_ok && dp_ok {
            converge_s = Some(started.elapsed().as_secs_f64());
            break;
        }
        if started.elapsed() > timeout {
            let done = dp.as_ref().map_or(0, |(_, p)| {
                expected
                    .iter()
                    .filter(|(svc, want)| p.get(*svc).is_some_and(|h| h == *want))
                    .count()
            });
            eprintln!(
                "not converged within {timeout:?}: slices complete: {slices_ok}, services programmed: {done} of {}\n{}\n{}",
                expected.len(),
                op.tail(),
                ag.tail()
            );
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            let done = dp.as_ref().map_or(0, |(_, p)| {
                expected
                    .iter()
                    .filter(|(svc, want)| p.get(*svc).is_some_and(|h| h == *want))
                    .count()
            });
            eprintln!(
                "  {:.0} s: slices complete: {slices_ok}; services programmed: {done} of {}",
                started.elapsed().as_secs_f64(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("converged: {converge_s:?}");

    // The stand-in's list cost: every pod, in pages of 500 as reflectors
    // list, while the operator and the agent watch.
    let listed_at = Instant::now();
    let (mut listed, mut token) = (0usize, None::<String>);
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = pods.list(&lp).await?;
        listed += page.items.len();
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    let list_pods_s = listed_at.elapsed().as_secs_f64();
    ensure!(listed == world.len(), "listed {listed} pods of {}", world.len());

    // Single changes, one at a time.
    let mut row = Row {
        scale: format!("{}x{}", scale.services, scale.pods),
        create_pods_per_s,
        list_pods_s,
        converge_s,
        ..Default::default()
    };
    if converge_s.is_some() {
        let op_before = usage(op.pid())?;
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut live: Vec<BenchPod> = world.clone();
        let mut spare = FIRST_POD + scale.services * scale.pods;
        let mut node_pods = by_node.clone();
        for i in 0..args.changes {
            let kind = i % 3;
            let (svc, addr, want_ready): (String, u32, Option<bool>);
            let t0;
            match kind {
                0 => {
                    // Pod turns NotReady: its endpoint stays, not ready; the
                    // dataplane drops it.
                    let idx = (next() % live.len() as u64) as usize;
                    let p = live.swap_remove(idx);
                    let status =
                        json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
                    t0 = Instant::now();
                    pods.patch_status(&p.name, &PatchParams::default(), &Patch::Merge(&status))
                        .await?;
                    (svc, addr, want_ready) = (service_name(p.service), p.addr, Some(false));
                }
                1 => {
                    // A new Ready pod, and its node's report (as its agent
                    // would write it once it delivers the pod).
                    let service = (next() % scale.services as u64) as u32;
                    let p = BenchPod::new(service, 9000 + i as u32, spare, args.nodes);
                    spare += 1;
                    let obj: Pod = serde_json::from_value(p.object(true))?;
                    t0 = Instant::now();
                    pods.create(&pp, &obj).await?;
                    let of = node_pods.entry(p.node).or_default();
                    of.push(p.clone());
                    let refs: Vec<&BenchPod> = of.iter().collect();
                    reports
                        .patch(&node_name(p.node), &apply, &Patch::Apply(&report(p.node, &refs)))
                        .await?;
                    (svc, addr, want_ready) = (service_name(p.service), p.addr, Some(true));
                    live.push(p);
                }
                _ => {
                    let idx = (next() % live.len() as u64) as usize;
                    let p = live.swap_remove(idx);
                    t0 = Instant::now();
                    pods.delete(
                        &p.name,
                        &DeleteParams { grace_period_seconds: Some(0), ..Default::default() },
                    )
                    .await?;
                    (svc, addr, want_ready) = (service_name(p.service), p.addr, None);
                }
            }
            // In the slice: present and ready / present not ready / gone.
            let slice_ok = |g: &HashMap<String, HashMap<u32, bool>>| {
                let have = g.get(&svc).and_then(|m| m.get(&addr).copied());
                have == want_ready
            };
            let dp_ok = |p: &Programmed| {
                let has = p.get(&svc).is_some_and(|s| s.contains(&addr));
                has == (want_ready == Some(true))
            };
            let (mut t_slice, mut t_dp) = (None, args.slices_only.then_some(f64::NAN));
            while t_slice.is_none() || t_dp.is_none() {
                if t_slice.is_none() {
                    let g = slices.lock().expect("lock");
                    if g.0 > t0 && slice_ok(&g.1) {
                        t_slice = Some(g.0.duration_since(t0).as_secs_f64());
                    }
                }
                if t_dp.is_none()
                    && let Some((at, p)) = snapshot.lock().expect("lock").clone()
                    && at > t0
                    && dp_ok(&p)
                {
                    t_dp = Some(at.duration_since(t0).as_secs_f64());
                }
                if t0.elapsed() > timeout {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            match (t_slice, t_dp) {
                (Some(s), Some(d)) => {
                    row.slice.push(s);
                    if !d.is_nan() {
                        row.dataplane.push(d);
                    }
                }
                _ => {
                    row.missed += 1;
                    eprintln!(
                        "change {i} ({svc} {}) not seen: slice {t_slice:?} dataplane {t_dp:?}",
                        ip(addr)
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let op_after = usage(op.pid())?;
        let seen = row.slice.len().max(1) as f64;
        row.operator_cpu_per_change_s = (op_after.cpu_s - op_before.cpu_s) / seen;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watch.abort();
    row.operator = usage(op.pid())?;
    row.agent = usage(ag.pid())?;
    row.apiserver = usage(api.pid())?;
    if converge_s.is_none() {
        eprintln!("scale {} did not converge; its change figures are empty", row.scale);
    }
    Ok(row)
}
