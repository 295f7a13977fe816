//! A DSR lab in network namespaces, torn down on drop:
//!
//! ```text
//!  client 10.20.0.2 ── router ──┐ 10.10.0.1
//!                     (VIP via   │
//!                      ingress)  ├── bridge (the L2 segment, netns "lan")
//!  ingress 10.10.0.2 (XDP) ──────┤
//!  backend-1 10.10.0.11  ────────┤   each backend: VIP/32 on lo,
//!  backend-2 10.10.0.12  ────────┤   arp_ignore=1, arp_announce=2,
//!  backend-N ...         ────────┘   default route via the router
//! ```
//!
//! The same over IPv6 (fd20::/64 client side, fd10::/64 segment, VIP
//! 2001:db8::10 as /128 on the backends' lo; no sysctl is needed there).
//! Client packets to the VIP go router → ingress → (MAC rewrite, XDP_TX) →
//! backend; replies go backend → router → client and never touch the
//! ingress node. Servers are real sockets on threads inside the backend
//! namespaces: a line/HTTP TCP server on port 80 and a UDP sink that counts
//! sequence numbers on port 9000, and a UDP echo on port 9001 (bound to
//! each VIP, so replies come from the VIP as a DSR backend's must) that
//! answers each datagram with the backend's name and the payload.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};

use kube_dsr_agent::dataplane::{Capacity, Config, Dataplane};

use crate::netns::{NetNs, PinDir, sh};

/// Test equipment object (generator, sink, floor, pass).
pub static EQUIPMENT: &[u8] = aya::include_bytes_aligned!("../../bpf/obj/kube-dsr-bench.o");

pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const ROUTER_LAN: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const INGRESS: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// The second ingress node, when a scenario adds one.
pub const INGRESS2: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 3);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 2);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 9000;
/// The UDP echo: `<backend name> <payload>` back to the sender, from the VIP.
pub const UDP_ECHO_PORT: u16 = 9001;

pub struct BackendNode {
    pub name: String,
    pub ns: NetNs,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub mac: [u8; 6],
    /// UDP sequence numbers received (see [`Lab::udp_stream`]).
    pub udp_seen: Arc<Mutex<HashSet<u64>>>,
}

pub struct Lab {
    pub lan: NetNs,
    pub router: NetNs,
    pub client: NetNs,
    pub ingress: NetNs,
    pub backends: Vec<BackendNode>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Keeps the pass program attached on the ingress node's bridge port.
    _equipment: Ebpf,
}

impl Lab {
    /// Builds the lab with `n` backends, servers running, each backend
    /// already holding the VIPs on `lo` with the ARP sysctls.
    pub fn new(n: usize) -> Result<Self> {
        Self::build(n, true)
    }

    /// The same with bare backends: no VIP, no sysctl — what kube-dsr's
    /// agent is there to add.
    pub fn bare(n: usize) -> Result<Self> {
        Self::build(n, false)
    }

    fn build(n: usize, prepared: bool) -> Result<Self> {
        let lan = NetNs::new("kdl")?;
        let router = NetNs::new("kdr")?;
        let client = NetNs::new("kdc")?;
        let ingress = NetNs::new("kdi")?;
        lan.exec("ip link add br0 type bridge && ip link set br0 up")?;

        // Router <-> client.
        sh(&format!(
            "ip -n {c} link add eth0 type veth peer name eth1 netns {r}",
            c = client.name,
            r = router.name
        ))?;
        client.exec(&format!(
            "ip addr add {CLIENT}/24 dev eth0 && ip -6 addr add fd20::2/64 dev eth0 nodad && \
             ip link set eth0 up && ip route add default via 10.20.0.1 && \
             ip -6 route add default via fd20::1 && ethtool -K eth0 tx off >/dev/null"
        ))?;
        router.exec(
            "ip addr add 10.20.0.1/24 dev eth1 && ip -6 addr add fd20::1/64 dev eth1 nodad && \
             ip link set eth1 up",
        )?;

        let attach_to_lan = |ns: &NetNs, port: &str| -> Result<()> {
            sh(&format!(
                "ip -n {n} link add eth0 type veth peer name {port} netns {lan}",
                n = ns.name,
                lan = lan.name
            ))?;
            lan.exec(&format!("ip link set {port} master br0 && ip link set {port} up"))?;
            Ok(())
        };
        attach_to_lan(&router, "p-router")?;
        router.exec(&format!(
            "ip addr add {ROUTER_LAN}/24 dev eth0 && ip -6 addr add fd10::1/64 dev eth0 nodad && \
             ip link set eth0 up && ethtool -K eth0 tx off >/dev/null && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
             ip route add {VIP}/32 via {INGRESS} && ip -6 route add {VIP6}/128 via fd10::2"
        ))?;
        attach_to_lan(&ingress, "p-ingress")?;
        ingress.exec(&format!(
            "ip addr add {INGRESS}/24 dev eth0 && ip -6 addr add fd10::2/64 dev eth0 nodad && \
             ip link set eth0 up"
        ))?;

        let mut backends = Vec::new();
        for i in 0..n {
            let ns = NetNs::new("kdb")?;
            let port = format!("p-b{i}");
            attach_to_lan(&ns, &port)?;
            let addr = Ipv4Addr::new(10, 10, 0, 11 + i as u8);
            let addr6 = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, 0x11 + i as u16);
            ns.exec(&format!(
                "ip addr add {addr}/24 dev eth0 && ip -6 addr add {addr6}/64 dev eth0 nodad && \
                 ip link set eth0 up && ip route add default via {ROUTER_LAN} && \
                 ip -6 route add default via fd10::1"
            ))?;
            if prepared {
                ns.exec(&format!(
                    "ip addr add {VIP}/32 dev lo && ip -6 addr add {VIP6}/128 dev lo nodad && \
                     sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2"
                ))?;
            }
            let mac = ns.mac("eth0")?;
            backends.push(BackendNode {
                name: format!("backend-{}", i + 1),
                ns,
                addr,
                addr6,
                mac,
                udp_seen: Arc::default(),
            });
        }

        // XDP_TX on a veth only delivers when the peer runs XDP too.
        let equipment = lan_attach_pass(&lan, "p-ingress")?;

        let stop = Arc::new(AtomicBool::new(false));
        let mut lab = Self {
            lan,
            router,
            client,
            ingress,
            backends,
            stop,
            servers: Vec::new(),
            _equipment: equipment,
        };
        lab.start_servers()?;
        // Teach the bridge every MAC (so it never floods a reply to the
        // ingress port) and warm the neighbour tables.
        for b in &lab.backends {
            b.ns.exec(&format!(
                "ping -c1 -W2 {ROUTER_LAN} >/dev/null && ping -6 -c1 -W2 fd10::1 >/dev/null"
            ))?;
        }
        lab.ingress.exec(&format!("ping -c1 -W2 {ROUTER_LAN} >/dev/null"))?;
        lab.client.exec(&format!("ping -c1 -W2 {ROUTER_LAN} >/dev/null"))?;
        lab.router.exec("ping -6 -c1 -W2 fd10::2 >/dev/null")?;
        Ok(lab)
    }

    fn start_servers(&mut self) -> Result<()> {
        for b in &self.backends {
            let threads = spawn_servers(&b.ns.name, &b.name, &b.udp_seen, &self.stop)?;
            self.servers.extend(threads);
        }
        Ok(())
    }

    /// A second ingress node on the segment (10.10.0.3, fd10::3), for
    /// scenarios with two: its namespace, and the pass program on its
    /// bridge port (`XDP_TX` on a veth needs XDP on the peer), which must
    /// be kept as long as the namespace is used.
    pub fn add_second_ingress(&self) -> Result<(NetNs, Ebpf)> {
        let ns = NetNs::new("kdj")?;
        sh(&format!(
            "ip -n {n} link add eth0 type veth peer name p-ingress2 netns {lan}",
            n = ns.name,
            lan = self.lan.name
        ))?;
        self.lan.exec("ip link set p-ingress2 master br0 && ip link set p-ingress2 up")?;
        ns.exec(&format!(
            "ip addr add {INGRESS2}/24 dev eth0 && ip -6 addr add fd10::3/64 dev eth0 nodad && \
             ip link set eth0 up"
        ))?;
        let equipment = lan_attach_pass(&self.lan, "p-ingress2")?;
        ns.exec(&format!("ping -c1 -W2 {ROUTER_LAN} >/dev/null"))?;
        Ok((ns, equipment))
    }

    /// Opens the dataplane on the ingress node's eth0, pinned under a fresh
    /// pin directory (removed, with the program, when it is dropped).
    pub fn open_dataplane(&self) -> Result<(PinDir, Dataplane)> {
        self.open_dataplane_with(Capacity::default())
    }

    /// [`Lab::open_dataplane`] with maps of the given capacity.
    pub fn open_dataplane_with(&self, capacity: Capacity) -> Result<(PinDir, Dataplane)> {
        let pins = PinDir::new()?;
        let mut cfg = Config::new("eth0");
        cfg.pin_dir = pins.path.clone();
        cfg.capacity = capacity;
        let dp = self.ingress.run(move || Dataplane::open(&cfg))??;
        Ok((pins, dp))
    }

    /// Packets received by the ingress node's interface so far.
    pub fn ingress_rx_packets(&self) -> Result<u64> {
        Ok(self.ingress.exec("cat /sys/class/net/eth0/statistics/rx_packets")?.trim().parse()?)
    }

    /// The backend whose server answered with `name`.
    pub fn backend_named(&self, name: &str) -> Option<&BackendNode> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// UDP datagrams the backends' kernels dropped for a full socket buffer
    /// (to tell a test's own losses from the dataplane's).
    pub fn udp_rcvbuf_errors(&self) -> Result<u64> {
        let mut total = 0;
        for b in &self.backends {
            let snmp = b.ns.exec("cat /proc/net/snmp")?;
            let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
            let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
            if let Some((_, v)) = names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == "RcvbufErrors")
            {
                total += v.parse::<u64>().unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Total UDP sequence numbers received by all backends.
    pub fn udp_received(&self) -> usize {
        self.backends.iter().map(|b| b.udp_seen.lock().unwrap().len()).sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

/// Packets the dataplane forwarded so far (every `fwd_*` reason).
pub fn forwarded(dp: &Dataplane) -> Result<u64> {
    Ok(dp.reason_counts()?.iter().filter(|(k, _)| k.starts_with("fwd_")).map(|(_, v)| v).sum())
}

/// Starts the servers a backend runs, inside namespace `ns`, answering as
/// `name`: the TCP line/HTTP server on port 80, the UDP sink (recording
/// sequence numbers in `seen`) on 9000, and the UDP echo on 9001 bound to
/// each VIP. They run until `stop` is set.
pub fn spawn_servers(
    ns: &str,
    name: &str,
    seen: &Arc<Mutex<HashSet<u64>>>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<JoinHandle<()>>> {
    let mut threads = Vec::new();
    // `::` with the default IPV6_V6ONLY=0 serves IPv4 and IPv6.
    let listener = crate::netns::run_in(ns, || TcpListener::bind(("::", TCP_PORT)))??;
    listener.set_nonblocking(true)?;
    let (n, st) = (name.to_string(), stop.clone());
    threads.push(std::thread::spawn(move || tcp_server(listener, &n, &st)));

    let udp = crate::netns::run_in(ns, || UdpSocket::bind(("::", UDP_PORT)))??;
    udp.set_read_timeout(Some(Duration::from_millis(50)))?;
    big_receive_buffer(&udp)?;
    let (seen, st) = (seen.clone(), stop.clone());
    threads.push(std::thread::spawn(move || udp_sink(udp, &seen, &st)));

    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let echo =
            crate::netns::run_in(ns, move || freebind_udp(SocketAddr::new(vip, UDP_ECHO_PORT)))??;
        echo.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (n, st) = (name.to_string(), stop.clone());
        threads.push(std::thread::spawn(move || udp_echo(echo, &n, &st)));
    }
    Ok(threads)
}

/// Loads the equipment object and attaches its `pass` program to `port`
/// in the lan namespace; the program stays attached while the result lives.
fn lan_attach_pass(lan: &NetNs, port: &'static str) -> Result<Ebpf> {
    lan.run(move || -> Result<Ebpf> {
        let mut equipment = EbpfLoader::new().load(EQUIPMENT)?;
        let prog: &mut Xdp = equipment.program_mut("pass").context("pass program")?.try_into()?;
        prog.load()?;
        prog.attach(port, XdpMode::Driver)?;
        Ok(equipment)
    })?
}

/// One line in, the backend's name out, until the client closes; an HTTP
/// GET gets one HTTP response naming the backend.
fn tcp_server(listener: TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let name = name.to_string();
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut out = match stream.try_clone() {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    let mut lines = BufReader::new(stream);
                    let mut line = String::new();
                    while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
                        if line.starts_with("GET ") {
                            // Drain the request head, answer once, close.
                            let mut h = String::new();
                            while matches!(lines.read_line(&mut h), Ok(n) if n > 2) {
                                h.clear();
                            }
                            let body = format!("served by {name}\n");
                            let _ = write!(
                                out,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            return;
                        }
                        if writeln!(out, "{name}").is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

/// 32 MiB of receive buffer (beyond rmem_max, as root may), so a sink
/// thread that loses its CPU for a moment does not drop datagrams: loss
/// tests must measure the dataplane, not the test's own socket.
fn big_receive_buffer(sock: &UdpSocket) -> Result<()> {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
    }
    Ok(())
}

/// Records the 8-byte sequence number at the start of each datagram.
fn udp_sink(sock: UdpSocket, seen: &Mutex<HashSet<u64>>, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && n >= 8
        {
            let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
            seen.lock().unwrap().insert(seq);
        }
    }
}

/// A UDP socket bound to `addr` even while the address is not configured
/// (`IP_FREEBIND`): the echo listens on the VIP before the agent puts it on
/// the pod's loopback, and, bound to it, replies from it.
fn freebind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    let (family, level, opt) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, libc::SOL_IP, libc::IP_FREEBIND),
        SocketAddr::V6(_) => (libc::AF_INET6, libc::SOL_IPV6, libc::IPV6_FREEBIND),
    };
    // SAFETY: a new socket; on success the fd is owned by the UdpSocket.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fd is a socket we own; closed on drop from here on.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_FREEBIND");
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a sockaddr of `len` bytes for this family.
    if unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bind {addr}"));
    }
    Ok(sock)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Answers each datagram with `<name> <payload>`.
fn udp_echo(sock: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = format!("{name} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    }
}

// ------------------------------------------------------------------ world

/// The cluster network shaped like real Kubernetes nodes: each node is a
/// namespace on the shared segment (its `eth0` on the bridge), its pods
/// are namespaces behind veth pairs with addresses from the node's pod
/// CIDR, routed as kindnet (ptp) and flannel host-gw lay it out:
///
/// ```text
///  client 10.20.0.2 ── router 10.10.0.1 ──┐
///                                          ├── bridge (segment 10.10.0.0/24, fd10::/64)
///  ingress-1 10.10.0.2  pods 10.244.1.0/24 ┤   pod: eth0 10.244.N.x/24, default via
///  worker-1  10.10.0.11 pods 10.244.2.0/24 ┤        10.244.N.1 (the host side's /32)
///  worker-2  10.10.0.12 pods 10.244.3.0/24 ┤   node: 10.244.N.x/32 dev veth…,
///  ingress-2 10.10.0.3  pods 10.244.4.0/24 ┤         10.244.M.0/24 via node M,
///  worker-3  10.10.0.13 pods 10.244.5.0/24 ┘         default via the router
/// ```
///
/// IPv6 alike: fd00:244:N::/64 per node, the host side holds
/// fd00:244:N::1/128. Every node forwards (`ip_forward`, IPv6 forwarding),
/// has `rp_filter` as systemd's `50-default.conf` ships it on Debian and
/// Ubuntu (`default` and every interface 2, loose; `all` left at 0) and
/// kube-proxy's filter rules plus kindnet's masquerade (see
/// [`NODE_IPTABLES`]). `ingress-2` and `worker-3` exist when asked for.
/// Bridged pods (a CNI that puts pods on the node's segment, like macvlan)
/// are the other layout: their `eth0` is a bridge port, their address on
/// the segment.
pub struct World {
    pub lan: NetNs,
    pub router: NetNs,
    pub client: NetNs,
    pub nodes: Vec<NodeInfo>,
    /// The nodes' namespaces (same order as `nodes`).
    _node_ns: Vec<NetNs>,
    /// Pods created with the world (slots `backend-1..`).
    pub pods: Vec<PodNet>,
    /// The pass programs on the nodes' bridge ports.
    _equipment: Vec<Ebpf>,
}

/// What to build.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorldOptions {
    /// Pods created with the world, spread over the pod nodes
    /// (worker-1, worker-2, ingress-1, worker-1, ...), named `backend-N`.
    pub pods: usize,
    /// Add `ingress-2`.
    pub two_ingress: bool,
    /// Add `worker-3`, a node that runs no dsr-agent.
    pub node_without_agent: bool,
    /// Strict `rp_filter` (1) on the pods' host-side interfaces, as some
    /// CNIs set it (Calico does on its workload interfaces).
    pub strict_rp_filter: bool,
    /// Pods bridged onto the segment (all on worker-1) instead of routed.
    pub bridged: bool,
}

/// A node, as plain data (it crosses threads).
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    /// N of its pod CIDRs 10.244.N.0/24 and fd00:244:N::/64.
    pub cidr: u8,
    pub ingress: bool,
    /// Whether a dsr-agent runs there.
    pub agent: bool,
}

impl NodeInfo {
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.cidr)
    }

    pub fn pod_cidr6(&self) -> String {
        format!("fd00:244:{:x}::/64", self.cidr)
    }

    /// Pod address number `host` of this node (both families).
    pub fn pod_addr(&self, host: u8) -> (Ipv4Addr, Ipv6Addr) {
        (
            Ipv4Addr::new(10, 244, self.cidr, host),
            Ipv6Addr::new(0xfd00, 0x244, self.cidr.into(), 0, 0, 0, 0, host.into()),
        )
    }
}

/// The nodes' netfilter rules, for `iptables-restore` and
/// `ip6tables-restore` (`{cluster}` = the cluster's pod network).
///
/// `filter`: kube-proxy's (iptables mode) forwarding rules, as its
/// `syncProxyRules` writes them (pkg/proxy/iptables/proxier.go): FORWARD
/// jumps to KUBE-FORWARD, which drops conntrack state INVALID (written
/// unless nf_conntrack_tcp_be_liberal is set; kubernetes#74839: such a
/// packet would otherwise reset connections), accepts what kube-proxy
/// marked 0x4000 and then RELATED,ESTABLISHED. A SYN-ACK whose SYN
/// bypassed netfilter (XDP) is INVALID here.
/// `nat`: kube-proxy's KUBE-POSTROUTING (masquerade of marked traffic)
/// and kindnet's ip-masq-agent chain: everything leaving for a
/// non-local destination outside the pod network is masqueraded.
pub const NODE_IPTABLES: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-POSTROUTING - [0:0]
:KIND-MASQ-AGENT - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment "kind-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom KIND-MASQ-AGENT chain" -j KIND-MASQ-AGENT
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KIND-MASQ-AGENT -d {cluster} -m comment --comment "kind-masq-agent: local traffic is not subject to MASQUERADE" -j RETURN
-A KIND-MASQ-AGENT -m comment --comment "kind-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)" -j MASQUERADE
COMMIT
"#;

/// The pod network (every node's pod CIDR is inside).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR6: &str = "fd00:244::/32";

/// A pod's network: its namespace behind a veth pair (routed) or on the
/// segment (bridged), and its servers answering as `name`. Removed on drop.
pub struct PodNet {
    pub name: String,
    pub node: String,
    pub ns: NetNs,
    pub addr: Ipv4Addr,
    pub addr6: Ipv6Addr,
    /// The host-side interface in the node (routed pods).
    pub host_if: Option<String>,
    /// UDP sequence numbers its sink received.
    pub udp_seen: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl PodNet {
    /// A routed pod `name` on `node` with address number `host` of the
    /// node's pod CIDRs, as the ptp CNI plugin (kindnet) sets it up: the
    /// pod's eth0 holds the /24 (/64) with every route via the gateway
    /// .1, which the host side holds as a /32 (/128); the node routes the
    /// pod's /32 (/128) to the host side.
    pub fn routed(node: &NodeInfo, name: &str, host: u8, strict_rp_filter: bool) -> Result<Self> {
        let ns = NetNs::new("kdp")?;
        let (addr, addr6) = node.pod_addr(host);
        let (gw, gw6) = node.pod_addr(1);
        let host_if = format!("veth{:02x}{host:02x}", node.cidr);
        sh(&format!(
            "ip -n {p} link add eth0 type veth peer name {host_if} netns {n}",
            p = ns.name,
            n = node.ns
        ))?;
        ns.exec(&format!(
            "ip addr add {addr}/24 dev eth0 && ip -6 addr add {addr6}/64 dev eth0 nodad && \
             ip link set eth0 up && \
             ip route add {gw} dev eth0 scope link src {addr} && \
             ip route replace 10.244.{c}.0/24 via {gw} dev eth0 src {addr} && \
             ip route add default via {gw} dev eth0 && \
             ip -6 route add {gw6}/128 dev eth0 && \
             ip -6 route replace {p6} via {gw6} dev eth0 && \
             ip -6 route add default via {gw6} dev eth0 && \
             ethtool -K eth0 tx off >/dev/null",
            c = node.cidr,
            p6 = node.pod_cidr6(),
        ))?;
        let strict = if strict_rp_filter {
            format!(" && sysctl -qw net.ipv4.conf.{host_if}.rp_filter=1")
        } else {
            String::new()
        };
        sh(&format!(
            "ip netns exec {n} sh -c 'ip addr add {gw}/32 dev {host_if} && \
             ip -6 addr add {gw6}/128 dev {host_if} nodad && ip link set {host_if} up && \
             ip route add {addr}/32 dev {host_if} scope host && \
             ip -6 route add {addr6}/128 dev {host_if}{strict}'",
            n = node.ns
        ))?;
        Self::serve(ns, name, &node.name, addr, addr6, Some(host_if))
    }

    /// A pod `name` of `node` bridged onto the segment (its eth0 a port of
    /// the bridge in `lan`), address 10.10.0.`host` / fd10::`host`,
    /// default route via the router.
    pub fn bridged(lan: &str, node: &str, name: &str, host: u8) -> Result<Self> {
        let ns = NetNs::new("kdp")?;
        let port = format!("p-{}", &ns.name[3..].replace('x', ""));
        let addr = Ipv4Addr::new(10, 10, 0, host);
        let addr6 = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, host.into());
        sh(&format!(
            "ip -n {p} link add eth0 type veth peer name {port} netns {lan}",
            p = ns.name
        ))?;
        sh(&format!("ip -n {lan} link set {port} master br0 && ip -n {lan} link set {port} up"))?;
        ns.exec(&format!(
            "ip addr add {addr}/24 dev eth0 && ip -6 addr add {addr6}/64 dev eth0 nodad && \
             ip link set eth0 up && ip route add default via {ROUTER_LAN} && \
             ip -6 route add default via fd10::1 && ethtool -K eth0 tx off >/dev/null"
        ))?;
        Self::serve(ns, name, node, addr, addr6, None)
    }

    fn serve(
        ns: NetNs,
        name: &str,
        node: &str,
        addr: Ipv4Addr,
        addr6: Ipv6Addr,
        host_if: Option<String>,
    ) -> Result<Self> {
        let (udp_seen, stop) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let servers = spawn_servers(&ns.name, name, &udp_seen, &stop)?;
        let pod = Self {
            name: name.into(),
            node: node.into(),
            ns,
            addr,
            addr6,
            host_if,
            udp_seen,
            stop,
            servers,
        };
        // Resolve the gateway both ways (and teach the bridge the pod's MAC).
        let gw = if pod.host_if.is_some() {
            Ipv4Addr::new(10, 244, pod.addr.octets()[2], 1)
        } else {
            ROUTER_LAN
        };
        pod.ns.exec(&format!("ping -c1 -W2 {gw} >/dev/null"))?;
        Ok(pod)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

impl World {
    pub fn new(opts: WorldOptions) -> Result<Self> {
        let lan = NetNs::new("kdl")?;
        let router = NetNs::new("kdr")?;
        let client = NetNs::new("kdc")?;
        lan.exec("ip link add br0 type bridge && ip link set br0 up")?;
        sh(&format!(
            "ip -n {c} link add eth0 type veth peer name eth1 netns {r}",
            c = client.name,
            r = router.name
        ))?;
        client.exec(&format!(
            "ip addr add {CLIENT}/24 dev eth0 && ip -6 addr add fd20::2/64 dev eth0 nodad && \
             ip link set eth0 up && ip route add default via 10.20.0.1 && \
             ip -6 route add default via fd20::1 && ethtool -K eth0 tx off >/dev/null"
        ))?;
        router.exec(
            "ip addr add 10.20.0.1/24 dev eth1 && ip -6 addr add fd20::1/64 dev eth1 nodad && \
             ip link set eth1 up",
        )?;
        sh(&format!(
            "ip -n {r} link add eth0 type veth peer name p-router netns {l} && \
             ip -n {l} link set p-router master br0 && ip -n {l} link set p-router up",
            r = router.name,
            l = lan.name
        ))?;
        // ARP mode by default: the router resolves the VIP on the segment.
        router.exec(&format!(
            "ip addr add {ROUTER_LAN}/24 dev eth0 && ip -6 addr add fd10::1/64 dev eth0 nodad && \
             ip link set eth0 up && ethtool -K eth0 tx off >/dev/null && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
             ip route add {VIP}/32 dev eth0 && ip -6 route add {VIP6}/128 dev eth0"
        ))?;

        let mut nodes = vec![
            (crate::cluster::INGRESS, 2u8, 1u8, true, true),
            (crate::cluster::WORKER, 11, 2, false, true),
        ];
        if !opts.bridged {
            nodes.push((crate::cluster::WORKER2, 12, 3, false, true));
        }
        if opts.two_ingress {
            nodes.push((crate::cluster::INGRESS2, 3, 4, true, true));
        }
        if opts.node_without_agent {
            nodes.push((crate::cluster::WORKER3, 13, 5, false, false));
        }
        let mut infos = Vec::new();
        let mut node_ns = Vec::new();
        let mut equipment = Vec::new();
        for (name, host, cidr, ingress, agent) in nodes {
            let ns = NetNs::new("kdn")?;
            let port = format!("p-{name}");
            sh(&format!(
                "ip -n {n} link add eth0 type veth peer name {port} netns {l} && \
                 ip -n {l} link set {port} master br0 && ip -n {l} link set {port} up",
                n = ns.name,
                l = lan.name
            ))?;
            let addr = Ipv4Addr::new(10, 10, 0, host);
            let addr6 = Ipv6Addr::new(0xfd10, 0, 0, 0, 0, 0, 0, host.into());
            // Node sysctls: forwarding, and rp_filter as systemd's
            // 50-default.conf sets it (default and `*` = 2, `all` left 0);
            // interfaces made later (pods' veths) inherit `default`.
            ns.exec(&format!(
                "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
                 net.ipv4.conf.default.rp_filter=2 net.ipv4.conf.all.rp_filter=0 \
                 net.ipv4.conf.lo.rp_filter=2 net.ipv4.conf.eth0.rp_filter=2 && \
                 ip addr add {addr}/24 dev eth0 && ip -6 addr add {addr6}/64 dev eth0 nodad && \
                 ip link set eth0 up && ethtool -K eth0 tx off >/dev/null && \
                 ip route add default via {ROUTER_LAN} && ip -6 route add default via fd10::1"
            ))?;
            let rules = |cidr: &str| NODE_IPTABLES.replace("{cluster}", cidr);
            let restore = |cmd: &str, text: String| -> Result<()> {
                let mut child = ns
                    .command(cmd)
                    .stdin(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .with_context(|| format!("{cmd} (is iptables installed? make setup)"))?;
                child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
                let out = child.wait_with_output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "{cmd} in {}: {}",
                    ns.name,
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(())
            };
            restore("iptables-restore", rules(CLUSTER_CIDR))?;
            restore("ip6tables-restore", rules(CLUSTER_CIDR6))?;
            equipment.push(lan_attach_pass_owned(&lan, port)?);
            infos.push(NodeInfo {
                name: name.into(),
                ns: ns.name.clone(),
                addr,
                addr6,
                cidr,
                ingress,
                agent,
            });
            node_ns.push(ns);
        }
        // Routes to the other nodes' pod CIDRs via their node addresses
        // (flannel host-gw, kindnet).
        for n in &infos {
            let mut cmds = Vec::new();
            for m in infos.iter().filter(|m| m.name != n.name) {
                cmds.push(format!("ip route add {} via {}", m.pod_cidr(), m.addr));
                cmds.push(format!("ip -6 route add {} via {}", m.pod_cidr6(), m.addr6));
            }
            sh(&format!("ip netns exec {} sh -c '{}'", n.ns, cmds.join(" && ")))?;
        }
        // Resolve the router and every other node (and teach the bridge).
        for n in &infos {
            let mut targets = vec![ROUTER_LAN.to_string()];
            targets.extend(infos.iter().filter(|m| m.name != n.name).map(|m| m.addr.to_string()));
            let pings: Vec<String> =
                targets.iter().map(|t| format!("ping -c1 -W2 {t} >/dev/null")).collect();
            sh(&format!("ip netns exec {} sh -c '{}'", n.ns, pings.join(" && ")))?;
            sh(&format!("ip netns exec {} ping -6 -c1 -W2 fd10::1 >/dev/null", n.ns))?;
        }
        client.exec(&format!("ping -c1 -W2 {ROUTER_LAN} >/dev/null"))?;

        let mut world = Self {
            lan,
            router,
            client,
            nodes: infos,
            _node_ns: node_ns,
            pods: Vec::new(),
            _equipment: equipment,
        };
        for i in 0..opts.pods {
            let name = format!("backend-{}", i + 1);
            let pod = if opts.bridged {
                PodNet::bridged(&world.lan.name, crate::cluster::WORKER, &name, 100 + i as u8)?
            } else {
                let node = world.pod_node(i).clone();
                PodNet::routed(&node, &name, 10 + i as u8, opts.strict_rp_filter)?
            };
            world.pods.push(pod);
        }
        Ok(world)
    }

    /// The node slot pod `i` goes to: worker-1, worker-2, ingress-1, ...
    fn pod_node(&self, i: usize) -> &NodeInfo {
        let order = [crate::cluster::WORKER, crate::cluster::WORKER2, crate::cluster::INGRESS];
        let name = order[i % order.len()];
        self.node(name).expect("pod nodes exist")
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// [`lan_attach_pass`] for a port name made at run time.
fn lan_attach_pass_owned(lan: &NetNs, port: String) -> Result<Ebpf> {
    lan.run(move || -> Result<Ebpf> {
        let mut equipment = EbpfLoader::new().load(EQUIPMENT)?;
        let prog: &mut Xdp = equipment.program_mut("pass").context("pass program")?.try_into()?;
        prog.load()?;
        prog.attach(&port, XdpMode::Driver)?;
        Ok(equipment)
    })?
}
