//! The one-host cluster (see `kube_dsr_e2e::cluster`): the service
//! scenarios beyond the TCP web service: a UDP service, an IPv6 VIP, and
//! what the API and the operator do with an invalid service and with two
//! services claiming the same VIP:port.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube_dsr_crds::{DsrService, messages};
use kube_dsr_e2e::{
    cluster::{self, Cluster, INGRESS, counter, lo_addrs, wait_for},
    netns::sh,
    require_root,
    topology::{TCP_PORT, UDP_ECHO_PORT, UDP_PORT, VIP, VIP6},
};
use serde_json::json;

// ---------------------------------------------------------------- helpers

/// `assert_eq!` as an error rather than a panic, so that the harness shows
/// the processes' logs and tears the cluster down in order.
macro_rules! check_eq {
    ($a:expr, $b:expr $(,)?) => {{
        let (a, b) = (&$a, &$b);
        anyhow::ensure!(*a == *b, "{}: {:?} != {:?}", stringify!($a), a, b);
    }};
    ($a:expr, $b:expr, $($msg:tt)+) => {{
        let (a, b) = (&$a, &$b);
        anyhow::ensure!(*a == *b, "{}: {:?} != {:?}: {}", stringify!($a), a, b, format!($($msg)+));
    }};
}

/// One cluster at a time: the harness names its kubeconfig and log files
/// after the process, so two clusters in one test binary would share them.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn run_alone<F>(scenario: F) -> Result<()>
where
    F: AsyncFnOnce(&mut Cluster) -> Result<()> + Send + 'static,
{
    let _alone = ONE_CLUSTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cluster::run(3, scenario)
}

/// Runs `f` on its own thread and awaits it without blocking the runtime
/// (the API server stand-in runs on this test's runtime: blocking it
/// would stall every watch and Lease renewal).
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let handle = std::thread::spawn(f);
    while !handle.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.join().map_err(|_| anyhow!("worker thread panicked"))?
}

/// Enters network namespace `ns` on the current thread.
fn enter(ns: &str) -> Result<()> {
    let file = File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// A shell line, off the runtime.
async fn sh_async(cmd: String) -> Result<String> {
    off_runtime(move || sh(&cmd)).await
}

/// `requests` sequential curl requests (each a new connection, at most
/// 3 s) from the client to `url`: the answers (`served by backend-N`) and
/// the failures.
async fn curl_loop(
    client: &str,
    url: &str,
    flags: &str,
    requests: usize,
) -> Result<(Vec<String>, Vec<String>)> {
    let out = sh_async(format!(
        "ip netns exec {client} sh -c 'for i in $(seq {requests}); do curl {flags} -s -m 3 {url} || echo \"failed $i: $?\"; done'"
    ))
    .await?;
    let answers = out.lines().filter(|l| l.starts_with("served by ")).map(String::from).collect();
    let failed = out.lines().filter(|l| l.starts_with("failed")).map(String::from).collect();
    Ok((answers, failed))
}

fn served_by(answers: &[String]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for a in answers {
        *by.entry(a.trim_start_matches("served by ").to_string()).or_insert(0) += 1;
    }
    by
}

/// A DsrService as a user would write it.
fn service(name: &str, vips: &[&str], ports: serde_json::Value, app: &str) -> Result<DsrService> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrService",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"vips": vips, "ports": ports, "selector": {"app": app}},
    }))?)
}

fn tcp80() -> serde_json::Value {
    json!([{"name": "http", "port": TCP_PORT, "protocol": "TCP"}])
}

/// Packets the ingress dataplane forwarded for every VIP, from a metrics
/// sample taken after now (the agent samples every 2 s), once at least
/// `at_least`.
async fn forwarded_at_least(c: &Cluster, at_least: u64) -> Result<u64> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for("the VIP packet counters", Duration::from_secs(10), || async {
        let f = cluster::ingress_forwarded(&c.ingress_metrics()?);
        Ok((f >= at_least).then_some(f))
    })
    .await
}

fn condition<'a>(
    svc: &'a DsrService,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    svc.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

async fn slices_of(c: &Cluster, service: &str) -> Result<usize> {
    let api: Api<EndpointSlice> = Api::namespaced(c.client.clone(), "default");
    let lp = ListParams::default().labels(&format!("kubedsr.io/service-name={service}"));
    Ok(api.list(&lp).await?.items.len())
}

// ---------------------------------------------------------------- UDP

/// UDP flows from the client: `flows` sockets (distinct source ports),
/// each connected to `to` and sending `per_flow` datagrams. With `replies`,
/// each datagram's reply is awaited (at most 1 s) and returned per flow:
/// a connected socket accepts only replies from `to`, so a reply proves
/// the backend answered from the VIP.
fn udp_flows(
    client: &str,
    to: SocketAddr,
    flows: usize,
    per_flow: usize,
    replies: bool,
) -> Result<Vec<Vec<Option<String>>>> {
    enter(client)?;
    let mut out = Vec::new();
    let mut seq = 0u64;
    for _ in 0..flows {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(to)?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut got = Vec::new();
        for _ in 0..per_flow {
            seq += 1;
            let mut payload = seq.to_be_bytes().to_vec();
            payload.extend_from_slice(format!(" seq {seq}").as_bytes());
            sock.send(&payload)?;
            if replies {
                let mut buf = [0u8; 2048];
                got.push(match sock.recv(&mut buf) {
                    Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(_) => None,
                });
            }
        }
        out.push(got);
    }
    Ok(out)
}

/// UDP datagrams delivered to sockets in `ns` so far (`Udp: InDatagrams`).
fn udp_in_datagrams(ns: &str) -> Result<u64> {
    let snmp = sh(&format!("ip netns exec {ns} cat /proc/net/snmp"))?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InDatagrams")
        .context("no Udp InDatagrams")?
        .1
        .parse()
        .context("InDatagrams")
}

/// A UDP service on the lab's VIP: datagrams to the sink port reach every
/// backend's socket; the echo port's replies come from the VIP, every
/// backend answers, each flow sticks to one backend, and the replies never
/// cross the ingress node.
async fn udp_service(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    for i in 0..n.backends.len() {
        c.add_pod(&format!("udp-{}", i + 1), "udp", i).await?;
    }
    let started = Instant::now();
    let ports = json!([
        {"name": "sink", "port": UDP_PORT, "protocol": "UDP"},
        {"name": "echo", "port": UDP_ECHO_PORT, "protocol": "UDP"},
    ]);
    c.services
        .create(&PostParams::default(), &service("udp", &[&VIP.to_string()], ports, "udp")?)
        .await?;
    let status = c.wait_programmed("udp", 3).await?;
    eprintln!("programmed in {:?}: {:?}", started.elapsed(), status.summary);
    check_eq!(status.summary.as_ref().map(|s| s.ports.as_str()), Some("9000/UDP,9001/UDP"));
    check_eq!(status.vips[0].announcing_node.as_deref(), Some(INGRESS));
    for (ns, _, _) in &n.backends {
        let lo = lo_addrs(ns)?;
        ensure!(lo.contains(&format!("{VIP}/32")), "{ns} lo: {lo}");
    }
    // The pods' MACs may resolve in more than one round: until the tables
    // of those steps settle, new UDP flows follow the first one.
    c.wait_tables_settled().await;

    // The sink port: every datagram reaches a backend's socket, every
    // backend gets some.
    let before: Vec<u64> =
        n.backends.iter().map(|(ns, _, _)| udp_in_datagrams(ns)).collect::<Result<_>>()?;
    let (flows, per_flow) = (48, 5);
    let sent = (flows * per_flow) as u64;
    let client = n.client.clone();
    let t = Instant::now();
    off_runtime(move || {
        udp_flows(&client, SocketAddr::new(VIP.into(), UDP_PORT), flows, per_flow, false)
    })
    .await?;
    let deltas = wait_for("every datagram delivered", Duration::from_secs(5), || async {
        let d: Vec<u64> = n
            .backends
            .iter()
            .zip(&before)
            .map(|((ns, _, _), b)| Ok(udp_in_datagrams(ns)? - b))
            .collect::<Result<_>>()?;
        Ok((d.iter().sum::<u64>() >= sent).then_some(d))
    })
    .await?;
    eprintln!("sink: {sent} datagrams in {:?}, per backend {deltas:?}", t.elapsed());
    check_eq!(deltas.iter().sum::<u64>(), sent, "datagrams delivered per backend {deltas:?}");
    ensure!(deltas.iter().all(|d| *d > 0), "a backend got no datagram: {deltas:?}");

    // The dataplane counted them (and its counter is settled before the
    // echo run is measured).
    let forwarded = forwarded_at_least(c, sent).await?;
    eprintln!("sink: the ingress dataplane forwarded {forwarded}");

    // The echo port: replies from the VIP, straight to the client.
    let rx_before = counter(&n.ingress, "rx_packets")?;
    let fwd_before = cluster::ingress_forwarded(&c.ingress_metrics()?);
    let (flows, per_flow) = (64, 4);
    let client = n.client.clone();
    let t = Instant::now();
    let replies = off_runtime(move || {
        udp_flows(&client, SocketAddr::new(VIP.into(), UDP_ECHO_PORT), flows, per_flow, true)
    })
    .await?;
    let took = t.elapsed();
    let rx = counter(&n.ingress, "rx_packets")? - rx_before;
    let echoed = (flows * per_flow) as u64;
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut lost = 0;
    for (flow, got) in replies.iter().enumerate() {
        let names: BTreeSet<&str> =
            got.iter().flatten().filter_map(|r| r.split(' ').next()).collect();
        ensure!(names.len() <= 1, "flow {flow} answered by several backends: {got:?}");
        for r in got {
            match r {
                Some(r) => {
                    *by_backend.entry(r.split(' ').next().unwrap_or("").into()).or_default() += 1
                }
                None => lost += 1,
            }
        }
    }
    eprintln!(
        "echo: {echoed} datagrams in {took:?}, replies per backend {by_backend:?}, {lost} lost"
    );
    check_eq!(lost, 0, "datagrams without a reply");
    let nodes: BTreeSet<String> = by_backend.keys().filter_map(|b| c.node_of(b)).collect();
    eprintln!("echo: answered from pods on {nodes:?}");
    ensure!(
        nodes.iter().any(|node| node != INGRESS),
        "no pod on another node than the ingress node answered: {nodes:?}"
    );
    for i in 1..=n.backends.len() {
        ensure!(
            by_backend.contains_key(&format!("backend-{i}")),
            "backend-{i} never answered: {by_backend:?}"
        );
    }
    // DSR: the ingress node received the requests only; if the replies
    // crossed it, it would see twice as many packets as it forwards.
    let forwarded = forwarded_at_least(c, fwd_before + echoed).await? - fwd_before;
    eprintln!("ingress eth0 rx {rx} packets during the echo run, forwarded {forwarded}");
    ensure!(forwarded < echoed + echoed / 10, "forwarded {forwarded} for {echoed} datagrams");
    ensure!(rx >= echoed, "the datagrams did not pass the ingress node: rx {rx}");
    ensure!(
        rx < echoed + echoed / 5 + 20,
        "replies crossed the ingress node: rx {rx} for {echoed}"
    );
    eprintln!("agent warnings:\n{}", c.agent_warnings());
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_udp_service() -> Result<()> {
    require_root();
    run_alone(async |c: &mut Cluster| udp_service(c).await)
}

// ---------------------------------------------------------------- IPv6

/// A service on the IPv6 VIP: the agent puts the /128 on each pod's lo
/// (and nothing of IPv4), the ingress agent answers the router's neighbour
/// solicitations, real `curl -6` requests are all answered by every
/// backend, and the replies bypass the ingress node.
async fn ipv6_service(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    for i in 0..n.backends.len() {
        c.add_pod(&format!("web6-{}", i + 1), "web6", i).await?;
    }
    let started = Instant::now();
    c.services
        .create(&PostParams::default(), &service("web6", &[&VIP6.to_string()], tcp80(), "web6")?)
        .await?;
    let status = c.wait_programmed("web6", 3).await?;
    eprintln!("programmed in {:?}: {:?}", started.elapsed(), status.summary);
    check_eq!(status.total_backends, 3);
    check_eq!(status.vips.len(), 1);
    check_eq!(status.vips[0].address, VIP6.to_string());
    check_eq!(status.vips[0].announcing_node.as_deref(), Some(INGRESS));
    for (ns, _, _) in &n.backends {
        let lo6 = sh(&format!("ip -n {ns} -6 -o addr show dev lo"))?;
        ensure!(lo6.contains(&format!("{VIP6}/128")), "{ns}: no {VIP6}/128 on lo: {lo6}");
        let lo = lo_addrs(ns)?;
        ensure!(!lo.contains(&VIP.to_string()), "{ns}: IPv4 VIP added for an IPv6 service: {lo}");
    }

    let rx_before = counter(&n.ingress, "rx_packets")?;
    let fwd_before = cluster::ingress_forwarded(&c.ingress_metrics()?);
    let requests = 60;
    let t = Instant::now();
    let (answers, failed) =
        curl_loop(&n.client, &format!("http://[{VIP6}]/"), "-6 -g", requests).await?;
    eprintln!("{requests} curl -6 requests in {:?}: {:?}", t.elapsed(), served_by(&answers));
    check_eq!(answers.len(), requests, "every request answered; failed: {failed:?}");
    let by = served_by(&answers);
    for i in 1..=n.backends.len() {
        ensure!(by.contains_key(&format!("backend-{i}")), "backend-{i} served nothing: {by:?}");
    }
    let nodes: BTreeSet<String> = by.keys().filter_map(|b| c.node_of(b)).collect();
    eprintln!("IPv6: answered from pods on {nodes:?}");
    ensure!(nodes.iter().any(|node| node != INGRESS), "no pod on another node answered: {nodes:?}");
    let rx = counter(&n.ingress, "rx_packets")? - rx_before;

    // The router resolved the on-link VIP to the ingress node's MAC: the
    // ingress agent answered its neighbour solicitation (no backend did).
    let ingress_mac = sh(&format!("ip netns exec {} cat /sys/class/net/eth0/address", n.ingress))?;
    let neigh = sh(&format!("ip -n {} -6 neigh show {VIP6}", n.router))?;
    ensure!(
        neigh.contains(&format!("lladdr {}", ingress_mac.trim())),
        "router's neighbour entry for {VIP6} is not the ingress node ({}): {neigh}",
        ingress_mac.trim()
    );

    let forwarded = forwarded_at_least(c, fwd_before + (requests as u64) * 4).await? - fwd_before;
    eprintln!("ingress eth0 rx {rx} packets, forwarded {forwarded} to backends");
    ensure!(
        rx < forwarded + forwarded / 5 + 20,
        "replies crossed the ingress node: rx {rx}, forwarded {forwarded}"
    );
    eprintln!("agent warnings:\n{}", c.agent_warnings());
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_ipv6_service() -> Result<()> {
    require_root();
    run_alone(async |c: &mut Cluster| ipv6_service(c).await)
}

// ------------------------------------------------- invalid and conflicting

/// HTTP GETs to `VIP:80` from the client, one connection each, until told
/// to stop (at most `max` requests, `limit` long): the backend names, or
/// the errors.
struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<std::result::Result<String, String>>>>,
}

impl Load {
    fn start(client: &str, max: usize, limit: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (client, flag) = (client.to_string(), stop.clone());
        let handle = std::thread::spawn(move || {
            enter(&client)?;
            let deadline = Instant::now() + limit;
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) && out.len() < max && Instant::now() < deadline {
                out.push(http_get(SocketAddr::new(IpAddr::V4(VIP), TCP_PORT)));
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(out)
        });
        Load { stop, handle }
    }

    async fn finish(self) -> Result<Vec<std::result::Result<String, String>>> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle;
        off_runtime(move || handle.join().map_err(|_| anyhow!("load thread panicked"))?).await
    }
}

fn http_get(to: SocketAddr) -> std::result::Result<String, String> {
    let run = || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        ensure!(resp.starts_with("HTTP/1.1 200"), "bad response {resp:?}");
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
        Ok(body.trim().trim_start_matches("served by ").to_string())
    };
    run().map_err(|e| format!("{e:#}"))
}

/// What the API refuses, with which message (and that nothing was stored).
async fn refused(c: &Cluster, svc: DsrService, message: &str) -> Result<()> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    match c.services.create(&PostParams::default(), &svc).await {
        Ok(_) => bail!("{name} was accepted; expected refusal with {message:?}"),
        Err(kube::Error::Api(status)) => {
            eprintln!("{name} refused: {} {}: {}", status.code, status.reason, status.message);
            check_eq!(status.code, 422, "{status:?}");
            check_eq!(status.reason, "Invalid", "{status:?}");
            ensure!(
                status.message.contains(message),
                "{name}: {:?} lacks {message:?}",
                status.message
            );
        }
        Err(e) => bail!("{name}: unexpected error {e:#}"),
    }
    ensure!(c.services.get_opt(&name).await?.is_none(), "{name} was stored");
    Ok(())
}

/// Invalid services are refused with the CEL rule's message; a second
/// service on a serving service's VIP:port/protocol gets Conflict (naming
/// the holder) and no backend set while the first keeps serving without a
/// single failure; deleting the first hands the VIP:port to the second.
async fn invalid_and_conflict(c: &mut Cluster) -> Result<()> {
    let n = c.n.clone();
    refused(c, service("loopback", &["127.0.0.1"], tcp80(), "first")?, messages::VIP_LOOPBACK)
        .await?;
    refused(c, service("upper", &["2001:DB8::10"], tcp80(), "first")?, messages::VIP_NOT_CANONICAL)
        .await?;

    // The first service: backends 1 and 2. Backend 3 is the second's.
    c.add_pod("first-1", "first", 0).await?;
    c.add_pod("first-2", "first", 1).await?;
    c.add_pod("second-3", "second", 2).await?;
    let vip = VIP.to_string();
    c.services
        .create(&PostParams::default(), &service("first", &[&vip], tcp80(), "first")?)
        .await?;
    let status = c.wait_programmed("first", 2).await?;
    eprintln!("first: {:?}", status.summary);
    let url = format!("http://{VIP}/");
    let (answers, failed) = curl_loop(&n.client, &url, "", 30).await?;
    check_eq!(answers.len(), 30, "before: every request answered; failed: {failed:?}");
    let by = served_by(&answers);
    check_eq!(by.keys().collect::<Vec<_>>(), ["backend-1", "backend-2"], "before: {by:?}");

    // The second service claims the same 192.0.2.10:80/TCP, under load.
    let load = Load::start(&n.client, 2000, Duration::from_secs(40));
    let t = Instant::now();
    c.services
        .create(&PostParams::default(), &service("second", &[&vip], tcp80(), "second")?)
        .await?;
    let services = c.services.clone();
    let second = wait_for("second in Conflict", Duration::from_secs(30), || async {
        let s = services.get("second").await?;
        let conflicted = condition(&s, "Conflict").is_some_and(|c| c.status == "True");
        Ok(conflicted.then_some(s))
    })
    .await?;
    let cond = condition(&second, "Conflict").context("Conflict condition")?;
    eprintln!("second in conflict after {:?}: {}: {}", t.elapsed(), cond.reason, cond.message);
    check_eq!(cond.reason, "PortConflict");
    ensure!(
        cond.message.contains("192.0.2.10:80/TCP") && cond.message.contains("default/first"),
        "the message names neither the claim nor the holder: {}",
        cond.message
    );
    let programmed = condition(&second, "Programmed").map(|c| c.status.as_str());
    ensure!(programmed != Some("True"), "second Programmed while in conflict");
    // Some time for anything the operator or agents would do wrongly.
    tokio::time::sleep(Duration::from_secs(3)).await;
    check_eq!(slices_of(c, "second").await?, 0, "a conflicting service got EndpointSlices");
    ensure!(slices_of(c, "first").await? > 0, "the first service lost its EndpointSlices");
    let lo3 = lo_addrs(&n.backends[2].0)?;
    ensure!(!lo3.contains("lo:kdsr"), "the conflicting service's pod got the VIP: {lo3}");
    let first = c.services.get("first").await?;
    ensure!(
        condition(&first, "Conflict").is_none_or(|c| c.status != "True"),
        "the holder was put in conflict: {:?}",
        first.status
    );
    let status = c.wait_programmed("first", 2).await?;
    let results = load.finish().await?;
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for r in results.iter().flatten() {
        *by.entry(r.as_str()).or_default() += 1;
    }
    eprintln!(
        "during the conflict: {} requests over {:?}, {by:?}, {} failed; first {:?}",
        results.len(),
        t.elapsed(),
        failures.len(),
        status.summary
    );
    ensure!(results.len() >= 20, "too few requests during the conflict: {}", results.len());
    ensure!(failures.is_empty(), "requests failed during the conflict: {failures:?}");
    check_eq!(by.keys().copied().collect::<Vec<_>>(), ["backend-1", "backend-2"], "{by:?}");
    let (answers, failed) = curl_loop(&n.client, &url, "", 30).await?;
    check_eq!(answers.len(), 30, "after: every request answered; failed: {failed:?}");
    let by = served_by(&answers);
    check_eq!(by.keys().collect::<Vec<_>>(), ["backend-1", "backend-2"], "after: {by:?}");

    // Deleting the holder hands the claim to the second service.
    let t = Instant::now();
    c.services.delete("first", &DeleteParams::default()).await?;
    let status = c.wait_programmed("second", 1).await?;
    eprintln!("second took over in {:?}: {:?}", t.elapsed(), status.summary);
    let second = c.services.get("second").await?;
    let cond = condition(&second, "Conflict");
    ensure!(cond.is_none_or(|c| c.status == "False"), "second still in conflict: {cond:?}");
    ensure!(slices_of(c, "second").await? > 0, "second has no EndpointSlices");
    let (answers, failed) = curl_loop(&n.client, &url, "", 30).await?;
    check_eq!(answers.len(), 30, "takeover: every request answered; failed: {failed:?}");
    let by = served_by(&answers);
    check_eq!(by.keys().collect::<Vec<_>>(), ["backend-3"], "takeover: {by:?}");
    wait_for("first's VIPs removed from its pods", Duration::from_secs(30), || async {
        let gone = !lo_addrs(&n.backends[0].0)?.contains("lo:kdsr")
            && !lo_addrs(&n.backends[1].0)?.contains("lo:kdsr");
        Ok(gone.then_some(()))
    })
    .await?;
    eprintln!("agent warnings:\n{}", c.agent_warnings());
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_invalid_and_conflicting_services() -> Result<()> {
    require_root();
    run_alone(async |c: &mut Cluster| invalid_and_conflict(c).await)
}
