//! The one-host cluster under churn (see `kube_dsr_e2e::cluster` for the
//! topology): pods scaled, turned NotReady, terminated and not yet set up
//! while clients hold connections or open new ones, and the ingress agent
//! SIGKILLed under load.
//!
//! Clients are real TCP sockets on threads inside the client namespace,
//! speaking the lab servers' line protocol (one line in, the backend's name
//! out). A long-lived connection exchanges a line every 100 ms and must get
//! the same name every time; a new connection is opened, asked once and
//! closed.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Map, MapData, PerCpuArray};
use kube_dsr_common::reason;
use kube_dsr_e2e::{
    cluster::{self, Cluster, INGRESS, lo_addrs, metric},
    require_root,
    topology::{TCP_PORT, VIP},
};

/// The scenarios run one at a time: each is a whole cluster with timing
/// assertions, and the host has few cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    *T0.lock().unwrap() = Some(Instant::now());
    guard
}

/// Seconds since the scenario started, to line the client's view up with
/// the scenario's steps and the agents' logs.
static T0: Mutex<Option<Instant>> = Mutex::new(None);

fn now() -> String {
    let t0 = *T0.lock().unwrap().get_or_insert_with(Instant::now);
    format!("t={:.2}s", t0.elapsed().as_secs_f64())
}

fn step(what: &str) {
    eprintln!("{} {what}", now());
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Enters network namespace `ns` on the calling thread.
fn enter(ns: &str) -> std::io::Result<()> {
    let f = File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on a namespace fd affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A connection to the VIP speaking the line protocol.
struct LineConn {
    out: TcpStream,
    lines: BufReader<TcpStream>,
}

impl LineConn {
    fn open() -> Result<Self> {
        let addr = SocketAddr::from((VIP, TCP_PORT));
        let out = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).context("connect")?;
        out.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        out.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        out.set_nodelay(true)?;
        let lines = BufReader::new(out.try_clone()?);
        Ok(Self { out, lines })
    }

    /// Sends one line, returns the backend name answered.
    fn ask(&mut self) -> Result<String> {
        self.out.write_all(b"who\n").context("send")?;
        let mut line = String::new();
        let n = self.lines.read_line(&mut line).context("read")?;
        ensure!(n > 0, "connection closed by the peer");
        Ok(line.trim().to_string())
    }
}

/// Waits for a thread without blocking the runtime (the stand-in API
/// server runs on it).
async fn join<T>(h: JoinHandle<T>) -> T {
    while !h.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// What `count` new connections got.
#[derive(Debug, Default)]
struct Tally {
    /// Backend name → connections it answered.
    answers: BTreeMap<String, usize>,
    failed: Vec<String>,
}

impl Tally {
    fn answered(&self) -> usize {
        self.answers.values().sum()
    }
    fn by(&self, backend: &str) -> usize {
        self.answers.get(backend).copied().unwrap_or(0)
    }
}

/// Opens `count` new connections from the client one after another, asks
/// each once and closes it.
async fn new_connections(client: &str, count: usize) -> Result<Tally> {
    let client = client.to_string();
    let h = std::thread::spawn(move || -> Result<Tally> {
        enter(&client)?;
        let mut t = Tally::default();
        for i in 0..count {
            match LineConn::open().and_then(|mut c| c.ask()) {
                Ok(name) => *t.answers.entry(name).or_default() += 1,
                Err(e) => t.failed.push(format!("{} connection {i}: {e:#}", now())),
            }
        }
        Ok(t)
    });
    join(h).await
}

/// New connections, `batch` at a time, until `backend` answers one
/// (bounded by `limit`); every connection must be answered. Returns the
/// tally of all of them and how long it took.
async fn until_reached(
    client: &str,
    backend: &str,
    batch: usize,
    limit: Duration,
) -> Result<(Tally, Duration)> {
    let start = Instant::now();
    let mut all = Tally::default();
    for _ in 0..50 {
        let t = new_connections(client, batch).await?;
        for (k, v) in t.answers {
            *all.answers.entry(k).or_default() += v;
        }
        all.failed.extend(t.failed);
        ensure!(all.failed.is_empty(), "new connections failed: {:?}", all.failed);
        if all.by(backend) > 0 {
            return Ok((all, start.elapsed()));
        }
        if start.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{backend} answered none of {} new connections within {limit:?}: {all:?}", all.answered())
}

/// One long-lived connection as seen by the client.
#[derive(Clone, Debug, Default)]
struct Held {
    /// The backend that answered first.
    backend: String,
    /// The client's port.
    port: u16,
    exchanges: u64,
    /// Every wrong answer or error; the connection is abandoned at the
    /// first one.
    failures: Vec<String>,
    /// The slowest exchange.
    slowest: Duration,
    /// Asked to finish (the client closes it).
    finish: bool,
    closed: bool,
}

/// `count` long-lived connections from the client, each exchanging a line
/// every 100 ms on a client thread until stopped (or 80 s passed).
struct HeldConns {
    state: Arc<Mutex<Vec<Held>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl HeldConns {
    async fn open(client: &str, count: usize) -> Result<Self> {
        let state = Arc::new(Mutex::new(vec![Held::default(); count]));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, client) = (state.clone(), stop.clone(), client.to_string());
        let thread = std::thread::spawn(move || hold(&client, count, &st, &sp));
        let held = Self { state, stop, thread: Some(thread) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = held.snapshot();
            if let Some(f) = s.iter().find(|h| !h.failures.is_empty()) {
                bail!("opening long-lived connections: {:?}", f.failures);
            }
            if s.iter().all(|h| h.exchanges > 0) {
                return Ok(held);
            }
            ensure!(Instant::now() < deadline, "long-lived connections not open within 15 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn snapshot(&self) -> Vec<Held> {
        self.state.lock().unwrap().clone()
    }

    /// Backend name → connections it holds.
    fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for h in self.snapshot() {
            *m.entry(h.backend).or_default() += 1;
        }
        m
    }

    /// Exchanges so far on the connections to `backend`.
    fn exchanges_with(&self, backend: &str) -> u64 {
        self.snapshot().iter().filter(|h| h.backend == backend).map(|h| h.exchanges).sum()
    }

    /// The client finishes (closes) the connections to `backend`; waits
    /// until it has.
    async fn finish(&self, backend: &str) -> Result<usize> {
        let mut n = 0;
        for h in self.state.lock().unwrap().iter_mut().filter(|h| h.backend == backend) {
            h.finish = true;
            n += 1;
        }
        for _ in 0..500 {
            // A broken one is not closed: check_held reports it.
            let done = |h: &Held| h.closed || !h.failures.is_empty();
            if self.snapshot().iter().filter(|h| h.finish).all(done) {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("connections to {backend} not closed within 10 s")
    }

    /// Stops every connection; returns their final state.
    async fn stop(mut self) -> Result<Vec<Held>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            join(t).await?;
        }
        Ok(self.snapshot())
    }
}

impl Drop for HeldConns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn hold(client: &str, count: usize, state: &Mutex<Vec<Held>>, stop: &AtomicBool) -> Result<()> {
    enter(client)?;
    let mut conns: Vec<Option<LineConn>> = Vec::new();
    for i in 0..count {
        let first = LineConn::open().and_then(|mut c| c.ask().map(|name| (c, name)));
        let mut s = state.lock().unwrap();
        match first {
            Ok((c, name)) => {
                s[i].backend = name;
                s[i].port = c.out.local_addr().map(|a| a.port()).unwrap_or(0);
                s[i].exchanges = 1;
                conns.push(Some(c));
            }
            Err(e) => {
                s[i].failures.push(format!("open: {e:#}"));
                conns.push(None);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(80);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        for (i, slot) in conns.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            let (backend, finish) = {
                let s = state.lock().unwrap();
                (s[i].backend.clone(), s[i].finish)
            };
            if finish {
                let _ = c.out.shutdown(std::net::Shutdown::Both);
                *slot = None;
                state.lock().unwrap()[i].closed = true;
                continue;
            }
            let t = Instant::now();
            let answer = c.ask();
            let took = t.elapsed();
            let mut s = state.lock().unwrap();
            s[i].slowest = s[i].slowest.max(took);
            match answer {
                Ok(name) if name == backend => s[i].exchanges += 1,
                Ok(name) => {
                    s[i].failures.push(format!("{} answered by {name}, was {backend}", now()));
                    *slot = None;
                }
                Err(e) => {
                    let done = s[i].exchanges;
                    s[i].failures.push(format!("{} {e:#} after {done} exchanges", now()));
                    *slot = None;
                }
            }
        }
    }
    Ok(())
}

/// Every long-lived connection answered every exchange by its first
/// backend; returns (connections, exchanges, slowest exchange).
fn check_held(held: &[Held]) -> Result<(usize, u64, Duration)> {
    let broken: Vec<_> = held.iter().filter(|h| !h.failures.is_empty()).collect();
    ensure!(
        broken.is_empty(),
        "{} of {} long-lived connections broke: {broken:?}",
        broken.len(),
        held.len()
    );
    let exchanges = held.iter().map(|h| h.exchanges).sum();
    let slowest = held.iter().map(|h| h.slowest).max().unwrap_or_default();
    Ok((held.len(), exchanges, slowest))
}

/// The ingress dataplane's packet counters by verdict reason, read from
/// its pinned map.
fn reasons(pins: &Path) -> Result<BTreeMap<&'static str, u64>> {
    let path = pins.join(INGRESS).join("eth0").join(kube_dsr_common::MAP_COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("{}", path.display()))?;
    let counters: PerCpuArray<MapData, u64> = Map::PerCpuArray(data).try_into()?;
    let mut out = BTreeMap::new();
    for r in 0..reason::COUNT {
        out.insert(reason::NAMES[r as usize], counters.get(&r, 0)?.iter().sum());
    }
    Ok(out)
}

/// The id of the XDP program attached to eth0 in namespace `ns`.
fn xdp_prog_id(ns: &str) -> Result<u32> {
    let out = kube_dsr_e2e::netns::sh(&format!("ip -n {ns} link show dev eth0"))?;
    let id = out.split("prog/xdp id ").nth(1).and_then(|r| r.split_whitespace().next());
    id.with_context(|| format!("no XDP program on {ns} eth0: {out}"))?.parse().context("prog id")
}

/// Waits until the ingress agent reports `service` with `active` ready
/// backends reached by its dataplane.
async fn ingress_backends(c: &Cluster, service: &str, active: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.ingress_report(service).await?;
        if r.as_ref().is_some_and(|r| r.backends == active) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "ingress dataplane not at {active} active backends within 30 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pods web-1..web-`n` on backends 0..n, the example web service
/// programmed with all of them in the ingress dataplane.
async fn web_with(c: &mut Cluster, n: usize) -> Result<()> {
    for i in 0..n {
        c.add_pod(&format!("web-{}", i + 1), "web", i).await?;
    }
    c.apply_example("web-tcp.yaml").await?;
    c.wait_programmed("web", n as i32).await?;
    ingress_backends(c, "web", n as i32).await
}

/// Scale 3 → 4 → 3 while 30 long-lived connections exchange lines: none
/// breaks or changes backend (also across the settle sweep that follows),
/// new connections reach the new pod and stop reaching the removed one,
/// whose connections drain until the client closes them.
async fn scale_during_long_lived(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    web_with(c, 3).await?;
    let held = HeldConns::open(&n.client, 30).await?;
    let spread = held.per_backend();
    eprintln!("long-lived connections per backend: {spread:?}");
    for i in 1..=3 {
        ensure!(spread.contains_key(&format!("backend-{i}")), "no connection on backend-{i}");
    }
    let before = reasons(&n.pins)?;

    // Scale up: web-4 on the fourth backend.
    step("adding web-4");
    let t = Instant::now();
    c.add_pod("web-4", "web", 3).await?;
    c.wait_programmed("web", 4).await?;
    ingress_backends(c, "web", 4).await?;
    let programmed = t.elapsed();
    let (up, took) = until_reached(&n.client, "backend-4", 20, Duration::from_secs(15)).await?;
    eprintln!(
        "scale up: programmed in {programmed:?}, new connections reached backend-4 in {took:?}: {:?}",
        up.answers
    );

    // Scale down: web-1 deleted, Terminating with its process serving.
    step("deleting web-1");
    c.delete_pod("web-1", None).await?;
    c.wait_programmed("web", 3).await?;
    ingress_backends(c, "web", 3).await?;
    let down = new_connections(&n.client, 60).await?;
    eprintln!("after deleting web-1, 60 new connections: {:?}", down.answers);
    ensure!(down.failed.is_empty(), "new connections failed: {:?}", down.failed);
    assert_eq!(down.by("backend-1"), 0, "a terminating pod got new connections: {down:?}");
    for i in 2..=4 {
        ensure!(down.by(&format!("backend-{i}")) > 0, "backend-{i} got none: {down:?}");
    }
    // Its connections keep working across a settle sweep (resync 5 s).
    let drained_before = held.exchanges_with("backend-1");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let drained = held.exchanges_with("backend-1") - drained_before;
    ensure!(
        drained >= 30,
        "connections to the terminating pod stalled: {drained} exchanges in 6 s"
    );
    step("closing the connections to backend-1");
    let finished = held.finish("backend-1").await?;
    // The client is done with it: kubelet finishes the pod.
    tokio::time::sleep(Duration::from_millis(300)).await;
    step("removing web-1 (grace 0)");
    c.delete_pod("web-1", Some(0)).await?;
    // The others keep going across the removal and the next settle sweeps.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = reasons(&n.pins)?;
    let held = held.stop().await?;
    let delta = |k: &str| after[k] - before[k];
    let changed: BTreeMap<_, _> =
        after.iter().map(|(k, v)| (*k, v - before[k])).filter(|(_, v)| *v > 0).collect();
    eprintln!("ingress dataplane verdicts during the changes: {changed:?}");
    let (conns, exchanges, slowest) = check_held(&held)?;
    eprintln!(
        "{conns} long-lived connections kept ({finished} on web-1 drained then closed by the client), \
         {exchanges} exchanges, slowest {slowest:?}; during the changes: {} packets kept on their previous \
         backend, {} pinned to the current one, {} connection-table hits, {} by Maglev alone, {} dropped",
        delta("fwd_pinned_previous"),
        delta("fwd_pinned_current"),
        delta("fwd_conn_hit"),
        delta("fwd_maglev"),
        delta("drop_no_backend"),
    );
    // Adding a fourth backend moves about a quarter of the flows' Maglev
    // slots: some established flows had to be kept on their old backend by
    // the connection table, or this test proved nothing about it. A flow
    // opened while the service's previous table was still kept (within a
    // resync period of its last change) was pinned when it opened and is
    // kept by that pin (a connection-table hit); one opened later is
    // pinned to its previous backend at its first packet after the change.
    ensure!(
        delta("fwd_pinned_previous") + delta("fwd_conn_hit") > 0,
        "no established flow was kept by the connection table: {after:?}"
    );
    ensure!(delta("fwd_conn_insert_failed") == 0, "pins could not be stored");
    ensure!(c.pods.get_opt("web-1").await?.is_none(), "web-1 still exists");
    Ok(())
}

/// A NotReady pod gets no new connections (and gets them again when Ready);
/// a terminating pod keeps its connections until the client closes them
/// but gets no new ones.
async fn not_ready_and_terminating(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    web_with(c, 3).await?;
    let (base, _) = until_reached(&n.client, "backend-2", 30, Duration::from_secs(10)).await?;
    eprintln!("all Ready: {:?}", base.answers);

    // NotReady: out of the table.
    step("web-2 NotReady");
    c.set_pod_ready("web-2", false).await?;
    c.wait_programmed("web", 2).await?;
    ingress_backends(c, "web", 2).await?;
    let out = new_connections(&n.client, 90).await?;
    eprintln!("web-2 NotReady, 90 new connections: {:?}", out.answers);
    ensure!(out.failed.is_empty(), "new connections failed: {:?}", out.failed);
    assert_eq!(out.answered(), 90);
    assert_eq!(out.by("backend-2"), 0, "a NotReady pod got new connections");
    // The pod's node's agent leaves its VIP in place: readiness is kubelet's
    // business, the pod is still a backend.
    let (ns2, _, _) = &n.backends[1];
    ensure!(lo_addrs(ns2)?.contains(&format!("{VIP}/32")), "VIP removed from a NotReady pod");
    // Ready again: back in the table.
    step("web-2 Ready");
    c.set_pod_ready("web-2", true).await?;
    c.wait_programmed("web", 3).await?;
    ingress_backends(c, "web", 3).await?;
    let (back, took) = until_reached(&n.client, "backend-2", 30, Duration::from_secs(10)).await?;
    eprintln!("web-2 Ready again, reached in {took:?}: {:?}", back.answers);

    // Terminating: web-3's connections drain, it gets no new ones.
    let held = HeldConns::open(&n.client, 24).await?;
    let spread = held.per_backend();
    eprintln!("long-lived connections per backend: {spread:?}");
    let on3 = spread.get("backend-3").copied().unwrap_or(0);
    ensure!(on3 > 0, "no long-lived connection on backend-3: {spread:?}");
    step("deleting web-3");
    c.delete_pod("web-3", None).await?;
    let pod = c.pods.get("web-3").await?;
    ensure!(pod.metadata.deletion_timestamp.is_some(), "web-3 not terminating");
    c.wait_programmed("web", 2).await?;
    ingress_backends(c, "web", 2).await?;
    let drained_before = held.exchanges_with("backend-3");
    let out = new_connections(&n.client, 90).await?;
    eprintln!("web-3 terminating, 90 new connections: {:?}", out.answers);
    ensure!(out.failed.is_empty(), "new connections failed: {:?}", out.failed);
    assert_eq!(out.answered(), 90);
    assert_eq!(out.by("backend-3"), 0, "a terminating pod got new connections");
    ensure!(out.by("backend-1") > 0 && out.by("backend-2") > 0, "{out:?}");
    // Its connections keep working, across a settle sweep (resync 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let drained = held.exchanges_with("backend-3") - drained_before;
    ensure!(
        drained >= 30 * on3 as u64,
        "connections to the terminating pod stalled: {drained} exchanges on {on3} connections"
    );
    // They finish, then kubelet removes the pod.
    step("closing the connections to backend-3");
    let finished = held.finish("backend-3").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    step("removing web-3 (grace 0)");
    c.delete_pod("web-3", Some(0)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = held.stop().await?;
    let (conns, exchanges, slowest) = check_held(&held)?;
    eprintln!(
        "{conns} long-lived connections kept ({finished} drained from terminating web-3, \
         {drained} exchanges while it was terminating), {exchanges} exchanges, slowest {slowest:?}"
    );
    Ok(())
}

/// A Ready pod whose namespace its node's agent cannot find yet has no
/// VIP configured: the operator does not count it ready and it gets no
/// connection; once its process appears it is set up and served.
async fn unconfigured_pod(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    c.add_pod("web-1", "web", 0).await?;
    c.add_pod("web-2", "web", 1).await?;
    let uid3 = c.add_pod_without_process("web-3", "web", 2).await?;
    c.apply_example("web-tcp.yaml").await?;
    let status = c.wait_programmed("web", 2).await?;
    assert_eq!(status.total_backends, 3, "{status:?}");
    ingress_backends(c, "web", 2).await?;
    let (ns3, _, _) = n.backends[2].clone();
    let node3 = n.backend_nodes[2].clone();
    let report = c.reports.get(&node3).await?;
    let b3 = report.spec.backends.iter().find(|b| b.pod_uid == uid3);
    eprintln!("{node3}'s report for web-3 without a process: {b3:?}");
    ensure!(
        b3.is_none_or(|b| b.configured_vips.is_empty()),
        "VIP reported configured in a pod with no process: {b3:?}"
    );
    ensure!(!lo_addrs(&ns3)?.contains("lo:kdsr"), "VIP set up in a pod the agent cannot find");

    // Probed twice, around an agent resync (5 s): still not served.
    for round in 0..2 {
        let out = new_connections(&n.client, 60).await?;
        eprintln!("web-3 without a process, 60 new connections: {:?}", out.answers);
        ensure!(out.failed.is_empty(), "new connections failed: {:?}", out.failed);
        assert_eq!(out.answered(), 60);
        assert_eq!(out.by("backend-3"), 0, "an unconfigured pod got connections");
        let st = c.services.get("web").await?.status.unwrap_or_default();
        assert_eq!((st.ready_backends, st.total_backends), (2, 3), "{:?}", st.summary);
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
    }

    // Its process appears: the agent finds the namespace, sets the VIP up,
    // the operator counts it ready and the ingress node sends it flows.
    step("starting web-3's process");
    let t = Instant::now();
    c.start_pod_process("web-3", 2, &uid3)?;
    c.wait_programmed("web", 3).await?;
    let ready = t.elapsed();
    let lo = lo_addrs(&ns3)?;
    if !lo.contains(&format!("{VIP}/32")) {
        let report = c.reports.get(&node3).await?;
        let st = c.services.get("web").await?.status;
        bail!(
            "{} web-3 counted ready without the VIP on its lo: {lo}\nreport: {:?}\nstatus: {st:?}",
            now(),
            report.spec.backends
        );
    }
    ingress_backends(c, "web", 3).await?;
    let (out, took) = until_reached(&n.client, "backend-3", 30, Duration::from_secs(15)).await?;
    eprintln!(
        "web-3's process started: ready in {ready:?}, new connections reached it {took:?} after the start: {:?}",
        out.answers
    );
    Ok(())
}

/// One request per new connection, `rate` a second, `count` of them;
/// (start offset, result, latency) each.
type Sample = (Duration, std::result::Result<String, String>, Duration);

fn steady_load(client: String, rate: u32, count: usize) -> JoinHandle<Result<Vec<Sample>>> {
    std::thread::spawn(move || {
        enter(&client)?;
        let start = Instant::now();
        let period = Duration::from_secs(1) / rate;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let due = period * i as u32;
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            let at = start.elapsed();
            let t = Instant::now();
            let r =
                LineConn::open().and_then(|mut c| c.ask()).map_err(|e| format!("{} {e:#}", now()));
            out.push((at, r, t.elapsed()));
            // Bounded in time too, whatever the requests take.
            if start.elapsed() > Duration::from_secs(40) {
                break;
            }
        }
        Ok(out)
    })
}

/// SIGKILL the ingress agent under a steady stream of requests, restart it
/// a second later: every request is answered, long-lived connections stay
/// on their backends, and the new agent adopts the pinned dataplane.
async fn kill_ingress_agent_under_load(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    web_with(c, 3).await?;
    let neigh = |when: &str| -> Result<()> {
        let s = kube_dsr_e2e::netns::sh(&format!("ip -n {} neigh show {VIP}", n.router))?;
        eprintln!("router's neighbour entry for the VIP {when}: {}", s.trim());
        Ok(())
    };
    let prog_before = xdp_prog_id(&n.ingress)?;
    let held = HeldConns::open(&n.client, 12).await?;
    neigh("before")?;
    let (rate, count) = (20, 200);
    let started = Instant::now();
    let load = steady_load(n.client.clone(), rate, count);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = started.elapsed();
    step("SIGKILL ingress agent");
    c.kill_agent(INGRESS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    neigh("while no agent runs")?;
    let restarted_at = started.elapsed();
    step("restarting ingress agent");
    c.start_agent(INGRESS)?;
    let samples = join(load).await?;
    let held = held.stop().await?;

    let failed: Vec<_> = samples.iter().filter(|(_, r, _)| r.is_err()).collect();
    let during = samples.iter().filter(|(at, _, _)| *at >= killed_at && *at < restarted_at).count();
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, r, _) in &samples {
        if let Ok(name) = r {
            *per.entry(name.as_str()).or_default() += 1;
        }
    }
    let slowest = samples.iter().map(|(_, _, l)| *l).max().unwrap_or_default();
    eprintln!(
        "{} requests in {:?} ({} while no agent ran, killed at {killed_at:?}, restarted at {restarted_at:?}): \
         {} failed, per backend {per:?}, slowest {slowest:?}",
        samples.len(),
        started.elapsed(),
        during,
        failed.len(),
    );
    ensure!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(samples.len(), count, "every request made");
    ensure!(
        during >= (rate as usize) * 8 / 10,
        "too few requests while the agent was down: {during}"
    );
    assert_eq!(per.len(), 3, "every backend served: {per:?}");
    let (conns, exchanges, held_slowest) = check_held(&held)?;
    eprintln!(
        "{conns} long-lived connections kept across the kill, {exchanges} exchanges, slowest {held_slowest:?}"
    );
    neigh("after")?;

    // The restarted agent adopted the pinned dataplane: the program that
    // forwarded all along is still the one attached (a fresh load or an
    // upgrade would attach a new program id), and the agent reads the
    // service's counters from it again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = c.ingress_metrics().unwrap_or_default();
        let packets = metric(&m, "kubedsr_agent_vip_packets_total{service=\"default/web/v4\"");
        let attached = metric(&m, "kubedsr_agent_xdp_attached{interface=\"eth0\"");
        if packets > 0 && attached == 1 {
            eprintln!("restarted agent's metrics: {packets} packets for default/web/v4");
            break;
        }
        ensure!(Instant::now() < deadline, "restarted agent's metrics lack the service:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let prog_after = xdp_prog_id(&n.ingress)?;
    eprintln!(
        "XDP program on the ingress eth0: id {prog_before} before the kill, {prog_after} after the restart"
    );
    assert_eq!(prog_before, prog_after, "the restarted agent replaced the XDP program");
    let status = c.wait_programmed("web", 3).await?;
    assert_eq!(status.vips[0].announcing_node.as_deref(), Some(INGRESS));
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn churn_scale_during_long_lived_connections() -> Result<()> {
    require_root();
    let _serial = serial();
    cluster::run(4, async |c: &mut Cluster| scale_during_long_lived(c).await)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn churn_not_ready_and_terminating_pods() -> Result<()> {
    require_root();
    let _serial = serial();
    cluster::run(3, async |c: &mut Cluster| not_ready_and_terminating(c).await)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn churn_pod_without_configured_vip_gets_no_traffic() -> Result<()> {
    require_root();
    let _serial = serial();
    cluster::run(3, async |c: &mut Cluster| unconfigured_pod(c).await)
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn churn_sigkill_ingress_agent_under_load() -> Result<()> {
    require_root();
    let _serial = serial();
    cluster::run(3, async |c: &mut Cluster| kill_ingress_agent_under_load(c).await)
}
