//! kube-dsr's XDP program: Direct Server Return by destination-MAC rewrite.
//!
//! Per packet: parse Ethernet (one VLAN tag allowed), IPv4/IPv6, TCP/UDP (or
//! an ICMP error about a VIP flow); look up (VIP, port, protocol); anything
//! that is not a VIP leaves untouched with `XDP_PASS`. A VIP packet follows
//! its connection-table entry, or on a miss the service's Maglev slot
//! `flow_hash % M`; only the two MAC addresses change, then `XDP_TX` (or a
//! redirect when the backend sits behind another interface).
//!
//! Two stages share the program and the maps. The ingress stage balances a
//! client's frame over the service's backends, each reached one way
//! (`Reach` in user space, one rewrite function each below): `direct` to a
//! backend's own MAC on the segment, `via_node` to the MAC of the node whose
//! pods serve it, or `Local`: this node, continuing into the node stage in
//! the same run. The node stage (keys with `STAGE_NODE` on the protocol
//! byte) delivers a frame an ingress stage sent to this node to one of the
//! node's local backend pods: `to_pod` rewrites to the pod's MAC and
//! redirects into its host-side interface. A frame from a peer node (map
//! `DSR_PEERS_V1`) is never balanced again, and the node stage never sends
//! a frame back out of the interface it arrived on: no loop, no second
//! balancing, whatever the nodes' tables say while they change.
//!
//! `kube_dsr_reply`, a tc classifier in the same object, runs on the
//! host-side interface of each local backend pod: the pod's replies from a
//! node-stage VIP:port leave through the node's uplink with
//! `bpf_redirect_neigh`, past netfilter (conntrack sees only half a flow
//! and would call them INVALID) and reverse-path filtering.
//!
//! Nothing that is not fully understood is ever transmitted: frames not sent
//! to this interface's MAC, IP options, fragments, IPv6 extension headers,
//! truncated headers and inconsistent lengths go to the kernel (VIP flows
//! with a malformed TCP/UDP header are dropped), each counted by reason. All
//! the table building happens in user space; the
//! kernel side only looks up.
#![no_std]
#![no_main]

mod parse;

mod reply;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, xdp_action},
    helpers::generated::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use kube_dsr_common::{
    BACKEND_IN_USE, BACKEND_LOCAL, BACKEND_VIA_NODE, Backend, COUNTER_SLOTS, ConnKey4, ConnKey6,
    ConnValue, DEFAULT_CONN_ENTRIES, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
    DEFAULT_RING_CHUNKS, Meta, NO_BACKEND, PEER_PROBES, PEER_SLOTS, PeerSlot, RING_ROW, SLOT_EMPTY,
    SLOT_USED, STAGE_NODE, ServiceSlot, Traffic, VIP_NODE_ONLY, VIP_PIN_ALL, VIP_PINS, VIP_PROBES,
    VIP_SLOTS, VipSlot4, VipSlot6, VipValue, flow_hash, peer_slot, reason, svc_proto, vip_slot4,
    vip_slot6,
};
use parse::{Flow, Parsed, V4, V6};

/// VIP tables: open addressing in arrays (see `kube_dsr_common::VipSlot4`).
#[map(name = "DSR_VIPS4_V1")]
static VIPS4: Array<VipSlot4> = Array::pinned(VIP_SLOTS, BPF_F_MMAPABLE as u32);

#[map(name = "DSR_VIPS6_V1")]
static VIPS6: Array<VipSlot6> = Array::pinned(VIP_SLOTS, BPF_F_MMAPABLE as u32);

/// The connection table: flows pinned across table changes (see `pick`).
/// One LRU hash shared by all CPUs, with per-CPU LRU lists
/// (`BPF_F_NO_COMMON_LRU`): a lookup finds a flow whichever CPU pinned it
/// (RSS or ECMP changes, a restarted agent reading it back), while eviction
/// bookkeeping never takes a cross-CPU lock on the insert path. Per-CPU maps
/// (Katran's choice) would lose every flow that RSS moves to another queue.
#[map(name = "DSR_CONNS4_V1")]
static CONNS4: LruHashMap<ConnKey4, ConnValue> =
    LruHashMap::pinned(DEFAULT_CONN_ENTRIES, BPF_F_NO_COMMON_LRU as u32);

#[map(name = "DSR_CONNS6_V1")]
static CONNS6: LruHashMap<ConnKey6, ConnValue> =
    LruHashMap::pinned(DEFAULT_CONN_ENTRIES, BPF_F_NO_COMMON_LRU as u32);

/// The per-family half of the lookups.
trait Keys {
    type Conn;
    /// The VIP entry of this flow's stage: `stage` is 0 (ingress) or
    /// `STAGE_NODE`, or'ed into the key's protocol byte.
    fn vip(&self, stage: u8) -> Option<VipValue>;
    /// The connection key of this flow for service `svc_id`.
    fn conn(&self, svc_id: u32) -> Self::Conn;
    fn pinned(conn: &Self::Conn) -> Option<ConnValue>;
    fn pin(conn: &Self::Conn, value: &ConnValue) -> bool;
    fn hash(&self) -> u32;
}

/// The two families differ only in their maps, how a VIP key picks its
/// first slot, and how the client address enters the flow hash.
macro_rules! keys_impl {
    ($keys:ty, $conn:ty, $lookup:ident, $conns:ident, $words:expr) => {
        impl Keys for $keys {
            type Conn = $conn;

            #[inline(always)]
            fn vip(&self, stage: u8) -> Option<VipValue> {
                let k = &self.vip;
                $lookup(&k.addr, k.port, k.proto | stage)
            }

            #[inline(always)]
            fn conn(&self, svc_id: u32) -> $conn {
                <$conn>::with_svc(&self.conn, svc_proto(svc_id, self.vip.proto))
            }

            #[inline(always)]
            fn pinned(conn: &$conn) -> Option<ConnValue> {
                unsafe { $conns.get(conn) }.copied()
            }

            #[inline(always)]
            fn pin(conn: &$conn, value: &ConnValue) -> bool {
                $conns.insert(conn, value, 0).is_ok()
            }

            #[inline(always)]
            fn hash(&self) -> u32 {
                let c = &self.conn;
                flow_hash(&$words(c), c.sport, c.dport, self.vip.proto)
            }
        }
    };
}

/// Connection keys with the service filled in.
trait WithSvc {
    fn with_svc(&self, svc_proto: u32) -> Self;
}

impl WithSvc for ConnKey4 {
    #[inline(always)]
    fn with_svc(&self, svc_proto: u32) -> Self {
        Self { svc_proto, ..*self }
    }
}

impl WithSvc for ConnKey6 {
    #[inline(always)]
    fn with_svc(&self, svc_proto: u32) -> Self {
        Self { svc_proto, ..*self }
    }
}

keys_impl!(V4, ConnKey4, vip4, CONNS4, |c: &ConnKey4| [c.saddr, 0, 0, 0]);
keys_impl!(V6, ConnKey6, vip6, CONNS6, |c: &ConnKey6| c.saddr);

/// The two VIP tables' lookups: the same probe loop, per family.
macro_rules! vip_lookup {
    ($name:ident, $addr:ty, $vips:ident, $first:expr) => {
        #[inline(always)]
        fn $name(addr: &$addr, port: u16, proto: u8) -> Option<VipValue> {
            let first: u32 = $first(addr, port, proto);
            for i in 0..VIP_PROBES {
                let s = $vips.get((first + i) & (VIP_SLOTS - 1))?;
                if s.addr == *addr && s.port == port && s.proto == proto && s.state == SLOT_USED {
                    return Some(s.values[(s.active & 1) as usize]);
                }
                if s.state == SLOT_EMPTY {
                    return None;
                }
            }
            None
        }
    };
}

vip_lookup!(vip4, u32, VIPS4, |a: &u32, p, t| vip_slot4(*a, p, t));
vip_lookup!(vip6, [u32; 4], VIPS6, |a: &[u32; 4], p, t| vip_slot6(a, p, t));

#[map(name = "DSR_BACKENDS_V1")]
static BACKENDS: Array<Backend> = Array::pinned(DEFAULT_MAX_BACKENDS, 0);

/// Maglev tables, placed by user space in chunks of `RING_ROW` slots (see
/// `RING_ROW`), two slots per element; a VIP value names its tables by first
/// slot and size. Memory-mappable, so user space writes a whole table with
/// one copy instead of one syscall per slot.
#[map(name = "DSR_RINGS_V1")]
static RINGS: Array<[u32; 2]> =
    Array::pinned(DEFAULT_RING_CHUNKS * RING_ROW / 2, BPF_F_MMAPABLE as u32);

/// User-space bookkeeping only; declared here so it is created and pinned
/// with the others.
#[map(name = "DSR_SERVICES_V1")]
static SERVICES: Array<ServiceSlot> = Array::pinned(DEFAULT_MAX_SERVICES, 0);

/// User-space bookkeeping only: which object and attach mode own the link.
#[map(name = "DSR_META_V1")]
static META: Array<Meta> = Array::pinned(1, 0);

#[map(name = "DSR_VSTATS_V1")]
static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "DSR_BSTATS_V1")]
static BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "DSR_COUNTERS_V2")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Peer nodes' MACs (see `kube_dsr_common::PeerSlot`).
#[map(name = "DSR_PEERS_V1")]
static PEERS: Array<PeerSlot> = Array::pinned(PEER_SLOTS, BPF_F_MMAPABLE as u32);

// Inlined into the section's entry point: left to itself, LLVM keeps a
// program this size as a BPF-to-BPF call, one call and return per packet.
#[xdp]
#[inline(always)]
pub fn kube_dsr(ctx: XdpContext) -> u32 {
    let (action, why) = match parse::parse(&ctx) {
        Parsed::Pass(why) => (xdp_action::XDP_PASS, why),
        Parsed::V4(flow) => forward(&ctx, &flow),
        Parsed::V6(flow) => forward(&ctx, &flow),
    };
    bump(why);
    action
}

/// A VIP frame's stage: the node stage for frames from a peer (balanced
/// already) or for VIPs this node only serves as a backend node; the
/// ingress stage otherwise.
#[inline(always)]
fn forward<K: Keys>(ctx: &XdpContext, flow: &Flow<K>) -> (u32, u32) {
    let Some(vip) = flow.keys.vip(0) else {
        return (
            xdp_action::XDP_PASS,
            if flow.icmp { reason::PASS_ICMP_NOT_VIP } else { reason::PASS_NOT_VIP },
        );
    };
    // A malformed TCP/UDP header towards a VIP (see `parse`).
    if flow.bad != 0 {
        return (xdp_action::XDP_DROP, flow.bad);
    }
    // One call site of `node_stage`, so the program holds one copy of it.
    if vip.flags & VIP_NODE_ONLY == 0 && !from_peer(ctx) {
        let Some((backend_id, backend, why)) = pick(&vip, flow) else {
            return (xdp_action::XDP_DROP, reason::DROP_NO_BACKEND);
        };
        count(ctx, vip.svc_id, backend_id);
        if backend.flags & BACKEND_LOCAL == 0 {
            return if backend.flags & BACKEND_VIA_NODE != 0 {
                via_node(ctx, &backend, why)
            } else {
                direct(ctx, &backend, why)
            };
        }
    }
    node_stage(ctx, flow)
}

/// Delivers a frame to one of this node's local backend pods of the VIP,
/// picked like the ingress stage picks (same `pick`, the node stage's own
/// table and pins). Never sends it back out of the arrival interface.
#[inline(always)]
fn node_stage<K: Keys>(ctx: &XdpContext, flow: &Flow<K>) -> (u32, u32) {
    // `parse` passed frames not addressed to this interface already.
    let Some(vip) = flow.keys.vip(STAGE_NODE) else {
        return (xdp_action::XDP_DROP, reason::DROP_NODE_NO_BACKEND);
    };
    let Some((backend_id, backend, _)) = pick(&vip, flow) else {
        return (xdp_action::XDP_DROP, reason::DROP_NODE_NO_BACKEND);
    };
    // User space refuses such backends; the check keeps a corrupted map
    // from turning a node into a reflector.
    if backend.ifindex == 0
        || backend.ifindex as usize == ctx.ingress_ifindex()
        || backend.flags & (BACKEND_LOCAL | BACKEND_VIA_NODE) != 0
    {
        return (xdp_action::XDP_DROP, reason::DROP_NODE_LOOP);
    }
    count(ctx, vip.svc_id, backend_id);
    to_pod(ctx, &backend)
}

/// `Reach::Direct`: the backend's own MAC on the segment (or behind
/// another interface: redirect).
#[inline(always)]
fn direct(ctx: &XdpContext, backend: &Backend, why: u32) -> (u32, u32) {
    if !set_macs(ctx, backend) {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    (transmit(backend), why)
}

/// `Reach::ViaNode`: the MAC of the node that runs the backend pods; that
/// node's node stage picks the pod.
#[inline(always)]
fn via_node(ctx: &XdpContext, node: &Backend, why: u32) -> (u32, u32) {
    if !set_macs(ctx, node) {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    (transmit(node), why)
}

/// Node stage: the pod's MAC, from the host side of its interface, into
/// that interface.
#[inline(always)]
fn to_pod(ctx: &XdpContext, pod: &Backend) -> (u32, u32) {
    if !set_macs(ctx, pod) {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    (unsafe { bpf_redirect(pod.ifindex, 0) } as u32, reason::FWD_NODE_LOCAL)
}

/// `XDP_TX` back out of the attach interface, or a redirect.
#[inline(always)]
fn transmit(b: &Backend) -> u32 {
    if b.ifindex == 0 { xdp_action::XDP_TX } else { unsafe { bpf_redirect(b.ifindex, 0) as u32 } }
}

/// Only the Ethernet addresses change: the IP packet reaches the backend
/// exactly as the client sent it, VIP as destination.
#[inline(always)]
fn set_macs(ctx: &XdpContext, b: &Backend) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Parsing proved this already, but the verifier forgets it across the
    // map calls; without the check it rejects the write.
    if start + 12 > end {
        return false;
    }
    let eth = start as *mut u32;
    unsafe {
        eth.write_unaligned(b.macs[0]);
        eth.add(1).write_unaligned(b.macs[1]);
        eth.add(2).write_unaligned(b.macs[2]);
    }
    true
}

/// Per-service and per-backend traffic.
#[inline(always)]
fn count(ctx: &XdpContext, svc_id: u32, backend_id: u32) {
    let len = (ctx.data_end() - ctx.data()) as u64;
    add_traffic(&VIP_STATS, svc_id, len);
    add_traffic(&BACKEND_STATS, backend_id, len);
}

/// Whether the frame's source MAC is a peer's: another kube-dsr node that
/// balanced it already.
#[inline(always)]
fn from_peer(ctx: &XdpContext) -> bool {
    let start = ctx.data();
    // Bytes 6..14: the source MAC and the ethertype (parsed already).
    if start + 14 > ctx.data_end() {
        return false;
    }
    let mac = unsafe { ((start + 6) as *const u64).read_unaligned() } & 0xffff_ffff_ffff;
    let used = mac | (u64::from(SLOT_USED) << 48);
    let first = peer_slot(mac);
    for i in 0..PEER_PROBES {
        let Some(s) = PEERS.get((first + i) & (PEER_SLOTS - 1)) else {
            return false;
        };
        // The slot as one word (see `PeerSlot::as_word`).
        let w = unsafe { (s as *const PeerSlot as *const u64).read() };
        if w == used {
            return true;
        }
        if (w >> 48) as u8 == SLOT_EMPTY {
            return false;
        }
    }
    false
}

/// The connection table pins only flows whose backend changed with the
/// service's last table change; every other flow follows Maglev alone, which
/// is deterministic, so most new flows cost two array reads and no insert.
///
/// A flow whose slot differs between the previous and the current table is
/// ambiguous: a TCP SYN is a new connection and takes the current backend;
/// anything else is taken to be established and stays on the previous
/// backend while that one still exists. Either way the choice is pinned, so
/// the next table change cannot move it. ICMP errors only read.
#[inline(always)]
fn pick<K: Keys>(vip: &VipValue, flow: &Flow<K>) -> Option<(u32, Backend, u32)> {
    let key = flow.keys.conn(vip.svc_id);
    if vip.flags & VIP_PINS != 0
        && let Some(conn) = K::pinned(&key)
    {
        if let Some(b) = BACKENDS.get(conn.backend_id)
            && b.generation == conn.backend_gen
            && b.flags & BACKEND_IN_USE != 0
        {
            let why = if flow.icmp { reason::FWD_ICMP } else { reason::FWD_CONN_HIT };
            return Some((conn.backend_id, *b, why));
        }
        // Stale: the backend left. Decide again below.
    }

    let h = flow.keys.hash();
    let current = slot(vip.ring_base, vip.ring_size, h);
    let previous = slot(vip.prev_base, vip.prev_size, h);
    let (id, b, why) = if vip.prev_size == 0 || previous == current {
        let b = in_use(current, vip.svc_id)?;
        if flow.icmp {
            return Some((current, b, reason::FWD_ICMP));
        }
        if vip.flags & VIP_PIN_ALL == 0 {
            return Some((current, b, reason::FWD_MAGLEV));
        }
        (current, b, reason::FWD_PINNED_CURRENT)
    } else {
        match in_use(previous, vip.svc_id) {
            Some(b) if !flow.syn => (previous, b, reason::FWD_PINNED_PREVIOUS),
            _ => (current, in_use(current, vip.svc_id)?, reason::FWD_PINNED_CURRENT),
        }
    };
    if flow.icmp {
        return Some((id, b, reason::FWD_ICMP));
    }
    let value = ConnValue { backend_id: id, backend_gen: b.generation };
    if !K::pin(&key, &value) {
        return Some((id, b, reason::FWD_CONN_INSERT_FAILED));
    }
    Some((id, b, why))
}

/// The backend id in a ring row's slot for hash `h`; `NO_BACKEND` for an
/// empty row.
#[inline(always)]
fn slot(base: u32, size: u32, h: u32) -> u32 {
    if size == 0 {
        return NO_BACKEND;
    }
    let slot = base.wrapping_add(h % size);
    match RINGS.get(slot >> 1) {
        Some(pair) => pair[(slot & 1) as usize],
        None => NO_BACKEND,
    }
}

/// The backend with this id, if it is a live backend of service `svc_id`.
/// The service check matters for the previous table: a slot it names may
/// have been released and given to another service since.
#[inline(always)]
fn in_use(id: u32, svc_id: u32) -> Option<Backend> {
    let b = *BACKENDS.get(id)?;
    (b.flags & BACKEND_IN_USE != 0 && b.svc_id == svc_id).then_some(b)
}

#[inline(always)]
fn add_traffic(map: &PerCpuArray<Traffic>, index: u32, len: u64) {
    if let Some(t) = map.get_ptr_mut(index) {
        unsafe {
            (*t).packets += 1;
            (*t).bytes += len;
        }
    }
}

#[inline(always)]
fn bump(why: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(why) {
        unsafe { *c += 1 }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
