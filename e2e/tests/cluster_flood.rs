//! A hostile segment, on the one-host cluster: while a real
//! client loop runs against the web service, an attacker on the segment
//! sends the ingress node a bounded burst of malformed frames of every
//! class, and a bounded SYN flood from random sources. No request fails,
//! no malformed frame reaches a backend pod, and new connections succeed
//! afterwards.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use aya::maps::{Map, MapData, PerCpuArray};
use kube_dsr_common::reason;
use kube_dsr_e2e::{
    cluster::{self, Cluster},
    netns::{parse_mac, sh},
    packet::*,
    require_root,
    topology::{VIP, VIP6},
};

/// Malformed frames come from 198.18.0.0/16 (2001:db8:bad::/48 over IPv6);
/// the SYN flood from 198.19.0.0/16. That is how the backends' captures
/// tell them apart.
const MARK4: [u8; 2] = [198, 18];
const FLOOD4: [u8; 2] = [198, 19];
const MARK6: [u8; 6] = [0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad];

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let file = File::open(format!("/var/run/netns/{ns}"))?;
    std::thread::spawn(move || {
        // SAFETY: changes only this thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// An AF_PACKET socket on `ifname` of the calling thread's namespace.
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd =
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, all.into()) };
    ensure!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "no interface {ifname}");
    // SAFETY: zeroed sockaddr_ll is valid; filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
    Ok(sock)
}

/// What a backend pod's capture saw of the attacker's frames (by source
/// address: a pod is reached through its node, so the frame's source MAC is
/// the node's, not the ingress node's).
#[derive(Debug, Default)]
struct Seen {
    malformed: Vec<Vec<u8>>,
    flood: u64,
}

/// Captures on `eth0` in namespace `ns` until `stop`.
fn capture(ns: String, stop: Arc<AtomicBool>) -> JoinHandle<Result<Seen>> {
    std::thread::spawn(move || {
        in_ns(&ns, move || {
            let sock = packet_socket("eth0")?;
            let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            // SAFETY: SO_RCVTIMEO takes a timeval.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            let mut seen = Seen::default();
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `buf` is writable for its length.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 14 {
                    continue;
                }
                let f = &buf[..n as usize];
                let src4 =
                    (f[12..14] == ETH_P_IP.to_be_bytes() && f.len() >= 28).then(|| &f[26..28]);
                let src6 =
                    (f[12..14] == ETH_P_IPV6.to_be_bytes() && f.len() >= 28).then(|| &f[22..28]);
                if src4 == Some(&MARK4[..]) || src6 == Some(&MARK6[..]) {
                    seen.malformed.push(f.to_vec());
                } else if src4 == Some(&FLOOD4[..]) {
                    seen.flood += 1;
                }
            }
            Ok(seen)
        })
    })
}

fn set16(mut f: Vec<u8>, at: usize, v: u16) -> Vec<u8> {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    f
}

/// One frame of every malformed class, to the VIP, from a marked source.
fn malformed(ingress: Mac, attacker: Mac) -> Vec<(&'static str, Vec<u8>)> {
    let src: IpAddr = Ipv4Addr::new(MARK4[0], MARK4[1], 0, 7).into();
    let src6: IpAddr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 7).into();
    let (vip, vip6): (IpAddr, IpAddr) = (VIP.into(), VIP6.into());
    let syn = tcp_frame(ingress, attacker, (src, 40000), (vip, 80), 0x02);
    let syn6 = tcp_frame(ingress, attacker, (src6, 40000), (vip6, 80), 0x02);
    let udp = udp_frame(ingress, attacker, (src, 40001), (vip, 80), b"query");
    let (l3, l4) = (14, 34);
    let to = |mac: Mac| {
        let mut f = syn.clone();
        f[..6].copy_from_slice(&mac);
        f
    };
    let with_doff = |d: u8| {
        let mut f = syn.clone();
        f[l4 + 12] = d << 4;
        f
    };
    let mut opts = eth(ingress, attacker, &[], ETH_P_IP);
    let seg = tcp(src, vip, 40002, 80, 0x02, b"");
    let (s4, v4) = (Ipv4Addr::new(MARK4[0], MARK4[1], 0, 7), VIP);
    opts.extend(ipv4(
        s4,
        v4,
        PROTO_TCP,
        &seg,
        &V4Opts { options: vec![1, 1, 1, 0], ..Default::default() },
    ));
    vec![
        ("IPv4 total length 1400", set16(syn.clone(), l3 + 2, 1400)),
        ("IPv4 total length 65535", set16(syn.clone(), l3 + 2, 65535)),
        ("IPv4 total length 0", set16(syn.clone(), l3 + 2, 0)),
        ("IPv4 total length 20", set16(syn.clone(), l3 + 2, 20)),
        ("IPv4 total length 30", set16(syn.clone(), l3 + 2, 30)),
        ("IPv6 payload length past the frame", set16(syn6.clone(), l3 + 4, 1000)),
        ("IPv6 payload length 0", set16(syn6, l3 + 4, 0)),
        ("TCP data offset 4", with_doff(4)),
        ("TCP data offset 15", with_doff(15)),
        ("UDP length 0", set16(udp.clone(), l4 + 4, 0)),
        ("UDP length 4", set16(udp.clone(), l4 + 4, 4)),
        ("UDP length past the packet", set16(udp, l4 + 4, 1000)),
        ("broadcast MAC", to([0xff; 6])),
        ("multicast MAC", to([0x01, 0x00, 0x5e, 0, 0, 1])),
        ("another host's MAC", to([0x02, 0x0f, 0x0f, 0, 0, 1])),
        ("truncated TCP header", syn[..l4 + 10].to_vec()),
        ("IPv4 options", opts),
    ]
}

fn reasons(pins: &Path) -> Result<BTreeMap<&'static str, u64>> {
    let path = pins.join(cluster::INGRESS).join("eth0").join(kube_dsr_common::MAP_COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("{}", path.display()))?;
    let counters: PerCpuArray<MapData, u64> = Map::PerCpuArray(data).try_into()?;
    let mut out = BTreeMap::new();
    for r in 0..reason::COUNT {
        out.insert(reason::NAMES[r as usize], counters.get(&r, 0)?.iter().sum());
    }
    Ok(out)
}

fn requests(client: &str, n: usize) -> Result<(usize, Vec<String>)> {
    let out = sh(&format!(
        "ip netns exec {client} sh -c 'for i in $(seq {n}); do curl -s -m 3 http://{VIP}/ || echo \"failed $i: $?\"; done'"
    ))?;
    let ok = out.lines().filter(|l| l.starts_with("served by ")).count();
    Ok((ok, out.lines().filter(|l| !l.starts_with("served by ")).map(String::from).collect()))
}

const ROUNDS: usize = 10;
const PER_CLASS_PER_ROUND: usize = 20;
const SYNS_PER_ROUND: usize = 500;

async fn flood(c: &mut Cluster) -> Result<()> {
    for i in 0..c.n.backends.len() {
        c.add_pod(&format!("web-{}", i + 1), "web", i).await?;
    }
    c.apply_example("web-tcp.yaml").await?;
    c.wait_programmed("web", c.n.backends.len() as i32).await?;
    let n = c.n.clone();
    let mac = |ns: &str| -> Result<Mac> {
        parse_mac(sh(&format!("ip netns exec {ns} cat /sys/class/net/eth0/address"))?.trim())
    };
    let (ingress, attacker) = (mac(&n.ingress)?, mac(&n.router)?);
    // A bridge handing frames to netfilter drops or trims malformed IP
    // before the ingress node's XDP sees it; a switch does not.
    sh(&format!(
        "ip netns exec {} sh -c 'for k in iptables ip6tables; do f=/proc/sys/net/bridge/bridge-nf-call-$k; \
         [ ! -e $f ] || echo 0 > $f; done'",
        n.lan
    ))?;
    let (ok, failed) = requests(&n.client, 5)?;
    ensure!(ok == 5, "service not answering before the flood: {failed:?}");
    let before = reasons(&n.pins)?;

    let stop = Arc::new(AtomicBool::new(false));
    let captures: Vec<_> = n.backends.iter().map(|b| capture(b.0.clone(), stop.clone())).collect();
    // The client loop runs through the whole flood.
    let client = n.client.clone();
    let loop_requests = 60;
    let clients = std::thread::spawn(move || requests(&client, loop_requests));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let classes = malformed(ingress, attacker);
    let router = n.router.clone();
    let sent_classes = classes.len();
    in_ns(&router, move || {
        let sock = packet_socket("eth0")?;
        let send = |f: &[u8]| -> Result<()> {
            // SAFETY: `f` is readable for its length.
            let rc = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            ensure!(rc == f.len() as isize, "send: {}", std::io::Error::last_os_error());
            Ok(())
        };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..ROUNDS {
            for (_, f) in &classes {
                for _ in 0..PER_CLASS_PER_ROUND {
                    send(f)?;
                }
            }
            for _ in 0..SYNS_PER_ROUND {
                let r = random();
                let src = Ipv4Addr::new(FLOOD4[0], FLOOD4[1], (r >> 8) as u8, r as u8);
                let sport = 1024 + (r >> 16) as u16 % 60000;
                send(&tcp_frame(ingress, attacker, (src.into(), sport), (VIP.into(), 80), 0x02))?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })?;

    let (ok, failed) = clients.join().map_err(|_| anyhow::anyhow!("client loop panicked"))??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut malformed_seen = Vec::new();
    let mut flood_seen = 0;
    for h in captures {
        let seen = h.join().map_err(|_| anyhow::anyhow!("capture panicked"))??;
        malformed_seen.extend(seen.malformed);
        flood_seen += seen.flood;
    }
    let after = reasons(&n.pins)?;
    let delta: BTreeMap<_, _> =
        after.iter().map(|(k, v)| (*k, v - before[k])).filter(|(_, v)| *v > 0).collect();
    eprintln!(
        "flood: {sent_classes} malformed classes x {} frames, {} SYNs; client {ok}/{loop_requests}; \
         backend pods saw {flood_seen} flood SYNs and {} malformed frames; \
         reasons {delta:?}",
        ROUNDS * PER_CLASS_PER_ROUND,
        ROUNDS * SYNS_PER_ROUND,
        malformed_seen.len()
    );
    ensure!(ok == loop_requests, "requests failed during the flood: {failed:?}");
    ensure!(
        malformed_seen.is_empty(),
        "a backend pod received malformed frames, first: {:02x?}",
        malformed_seen[0]
    );
    // The captures work: the well-formed SYNs did reach the backends.
    ensure!(flood_seen > 0, "no flood SYN seen at any backend: the capture sees nothing");
    let burst = (ROUNDS * PER_CLASS_PER_ROUND) as u64;
    for (why, at_least) in [
        ("pass_ip_len", 3 * burst),
        ("drop_tcp_len", 4 * burst),
        ("pass_not_our_mac", 3 * burst),
        ("pass_ip_options", burst),
    ] {
        ensure!(delta.get(why).copied().unwrap_or(0) >= at_least, "{why}: {delta:?}");
    }
    let (ok, failed) = requests(&n.client, 10)?;
    ensure!(ok == 10, "new connections after the flood failed: {failed:?}");
    Ok(())
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn one_host_cluster_survives_malformed_frames_and_a_syn_flood() -> Result<()> {
    require_root();
    cluster::run(2, async |c: &mut Cluster| flood(c).await)
}
