//! Map keys and values shared by the kube-dsr XDP program and user space.
//!
//! Every type is `#[repr(C)]`, built from fixed-width integers and byte
//! arrays, with explicit padding and a compile-time size check, so the kernel
//! and user space can never disagree on a layout. Addresses and ports are kept
//! in network byte order exactly as they sit in the packet, so the XDP program
//! copies them and never swaps bytes. They are held in `u32`/`u16` words (the
//! wire bytes, read natively) rather than byte arrays so that the XDP program
//! moves whole words: byte arrays compile to byte-at-a-time loops in BPF.
//!
//! Map names carry a layout version suffix (`_V1`): a pinned map whose shape
//! changes gets a new name, so an upgraded agent never adopts a map it cannot
//! read. Kernel map names are limited to 15 characters.
#![no_std]

/// Address family tags (stored in [`Backend::family`]).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Largest Maglev table a service may use.
pub const RING_MAX: u32 = 65537;

/// Slots per ring chunk: `RING_MAX` rounded up to even. The ring map is cut
/// into chunks; each chunk holds tables of one size (one of 65537, two of
/// 32749, ... 261 of 251), placed by user space, and a VIP value names its
/// tables by first slot and size. The kernel stores array elements in
/// 8-byte strides, so the ring map packs two 4-byte slots per element
/// (`[u32; 2]`); slot `s` is element `s / 2`, half `s % 2`, and a memory
/// map of the map is one flat run of `u32` slots.
pub const RING_ROW: u32 = RING_MAX + 1;

/// Marks a Maglev slot or connection that points at no backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Map names (pinned under the agent's bpffs directory by these names).
pub const MAP_VIPS4: &str = "DSR_VIPS4_V1";
pub const MAP_VIPS6: &str = "DSR_VIPS6_V1";
pub const MAP_CONNS4: &str = "DSR_CONNS4_V1";
pub const MAP_CONNS6: &str = "DSR_CONNS6_V1";
pub const MAP_BACKENDS: &str = "DSR_BACKENDS_V1";
pub const MAP_RINGS: &str = "DSR_RINGS_V1";
pub const MAP_SERVICES: &str = "DSR_SERVICES_V1";
pub const MAP_VIP_STATS: &str = "DSR_VSTATS_V1";
pub const MAP_BACKEND_STATS: &str = "DSR_BSTATS_V1";
/// V2: room for `COUNTER_SLOTS` reasons (V1 had exactly 16, so a new
/// reason needed a new map).
pub const MAP_COUNTERS: &str = "DSR_COUNTERS_V2";
pub const MAP_META: &str = "DSR_META_V1";
pub const MAP_PEERS: &str = "DSR_PEERS_V1";

/// The XDP program's name in the object.
pub const PROGRAM_NAME: &str = "kube_dsr";
/// The tc reply classifier's name in the same object.
pub const REPLY_PROGRAM_NAME: &str = "kube_dsr_reply";

/// Entries of the reason counter map: more than `reason::COUNT`, so that
/// appending a reason keeps the pinned map's shape.
pub const COUNTER_SLOTS: u32 = 64;

/// Set on the protocol byte of a VIP key (`VipKey4::proto`): the node
/// stage's entry of a VIP:port, next to the ingress stage's entry (same
/// address and port, plain protocol). Both live in the same VIP tables.
pub const STAGE_NODE: u8 = 0x80;

/// Slots of each VIP table (a power of two; at most a quarter are meant to
/// be used, so probe chains stay short). Fixed: the mask is a constant of
/// the packet path.
pub const VIP_SLOTS: u32 = 4096;
/// Slots a lookup probes before it gives up.
pub const VIP_PROBES: u32 = 8;

// Default map sizes; the agent sets the real ones when it creates the maps
// (flags `--max-services`, `--max-backends`, `--ring-mib`). They fit one
// ingress node serving 1,000 services of 100 backends each at table size
// 16381 (see DESIGN.md "Capacity").
/// Service ids (one per VIP family and stage of a service).
pub const DEFAULT_MAX_SERVICES: u32 = 2048;
/// Backend slots (one per service and backend).
pub const DEFAULT_MAX_BACKENDS: u32 = 1 << 17;
/// Ring chunks of `RING_ROW` slots (128 MiB).
pub const DEFAULT_RING_CHUNKS: u32 = 511;
pub const DEFAULT_CONN_ENTRIES: u32 = 1 << 18;

// IPv4 and IPv6 keep separate VIP and connection maps, with keys as short as
// the family allows.
//
// The VIP maps are open-addressed tables in memory-mappable arrays rather
// than BPF hash maps: the verifier inlines array lookups, so finding (or
// ruling out) a VIP costs no function call. Every packet, VIP or not, makes
// this lookup; on CPUs whose speculation mitigations tax each call and
// return (Safe RET here), a hash-map lookup costs as much as the rest of the
// packet's work. User space places each key within `VIP_PROBES` slots of its
// hash and publishes entries and values with the ordering described at
// `VipSlot4`.

/// Slot states.
pub const SLOT_EMPTY: u8 = 0;
pub const SLOT_USED: u8 = 1;
/// Deleted: probing continues past it; it can be reused.
pub const SLOT_DELETED: u8 = 2;

/// One slot of the IPv4 VIP table.
///
/// Publication: user space fills the key and `values[0]`, then stores
/// `state = SLOT_USED` last. A value change writes `values[1 - active]`,
/// then stores the new `active`, so a packet reads one whole value, never a
/// half-written one. Deletion stores `SLOT_DELETED`. (Ordering: x86_64 keeps
/// stores and loads in order; on weaker CPUs a packet racing a brand-new
/// entry may miss it, which is the same as arriving a moment earlier.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSlot4 {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub active: u32,
    pub _pad: u32,
    pub values: [VipValue; 2],
}
const _: () = assert!(core::mem::size_of::<VipSlot4>() == 64);

/// One slot of the IPv6 VIP table (see [`VipSlot4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSlot6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub active: u32,
    pub values: [VipValue; 2],
}
const _: () = assert!(core::mem::size_of::<VipSlot6>() == 72);

/// First slot probed for an IPv4 VIP key.
#[inline(always)]
pub fn vip_slot4(addr: u32, port: u16, proto: u8) -> u32 {
    let h = addr ^ (u32::from(port) << 8 | u32::from(proto)).rotate_left(19);
    fmix(h) & (VIP_SLOTS - 1)
}

/// First slot probed for an IPv6 VIP key.
#[inline(always)]
pub fn vip_slot6(addr: &[u32; 4], port: u16, proto: u8) -> u32 {
    let folded =
        addr[0] ^ addr[1].rotate_left(7) ^ addr[2].rotate_left(14) ^ addr[3].rotate_left(21);
    vip_slot4(folded, port, proto)
}

/// An IPv4 VIP: (VIP address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey4 {
    /// Wire bytes.
    pub addr: u32,
    /// Destination port; wire bytes.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey4>() == 8);

/// An IPv6 VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey6 {
    /// Wire bytes.
    pub addr: [u32; 4],
    /// Destination port; wire bytes.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey6>() == 20);

/// Value of the VIP map. Replaced as a whole (never edited in place), so a
/// packet sees either the old or the new rows, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipValue {
    /// Dense service id: index of the per-VIP counters and part of the
    /// connection key.
    pub svc_id: u32,
    /// First slot of the current Maglev table in the ring map.
    pub ring_base: u32,
    /// Current Maglev table size M (prime); 0 means no backend takes new
    /// flows.
    pub ring_size: u32,
    /// The table before the last change, kept so flows it placed can be
    /// told apart from new ones (see the XDP program's `pick`).
    pub prev_base: u32,
    /// 0: no previous table (settled), every flow follows the current one.
    pub prev_size: u32,
    /// `VIP_PIN_ALL`, `VIP_PINS`.
    pub flags: u32,
}

/// Pin every new flow in the connection table, not only those whose slot
/// changed (Katran's behaviour): UDP flows then keep their backend exactly
/// through drains, at the price of a table insert per new flow.
pub const VIP_PIN_ALL: u32 = 1;

/// The connection table may hold pins for this service. Without it a packet
/// skips the connection table: user space clears it only once the service
/// is settled (no previous table, no pin-all) and a sweep found no pin left
/// (see the agent's `Dataplane::settle`); in that state the kernel creates
/// no pins, so nothing can appear behind the sweep's back.
pub const VIP_PINS: u32 = 2;

/// On an ingress-stage key only: this node is no ingress for the VIP:port,
/// but its node stage serves it. The packet continues with the node-stage
/// key (`STAGE_NODE`); the rest of the value is unused. Written by the
/// dataplane for every node-stage service whose ingress key is free, so that
/// a non-VIP packet still costs exactly one probe.
pub const VIP_NODE_ONLY: u32 = 4;
const _: () = assert!(core::mem::size_of::<VipValue>() == 24);

/// Key of the IPv4 connection table: the client side of a flow plus the
/// service (which stands for the VIP address, so the key stays small).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey4 {
    /// Client address; wire bytes.
    pub saddr: u32,
    /// Client and VIP ports; wire bytes.
    pub sport: u16,
    pub dport: u16,
    /// `svc_proto(svc_id, proto)`.
    pub svc_proto: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey4>() == 12);

/// Key of the IPv6 connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey6 {
    /// Client address; wire bytes.
    pub saddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// `svc_proto(svc_id, proto)`.
    pub svc_proto: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey6>() == 24);

/// Service id and IP protocol in one key word.
#[inline(always)]
pub const fn svc_proto(svc_id: u32, proto: u8) -> u32 {
    (svc_id << 8) | proto as u32
}

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnValue {
    pub backend_id: u32,
    /// The backend slot's generation when the flow was pinned to it; a slot
    /// reused for another backend gets a new generation, which invalidates
    /// every old flow that still names it.
    pub backend_gen: u32,
}
const _: () = assert!(core::mem::size_of::<ConnValue>() == 8);

/// Backend slot flags.
pub const BACKEND_IN_USE: u32 = 1;
/// Draining: no new flows (the slot is absent from the Maglev table), but
/// flows already in the connection table keep going.
pub const BACKEND_DRAINING: u32 = 2;
/// Ingress stage: the backend is this node; the frame continues into this
/// node's node stage for the same VIP:port (`Reach::Local`).
pub const BACKEND_LOCAL: u32 = 4;
/// Ingress stage: the MACs are those of the backend pod's node
/// (`Reach::ViaNode`); its node stage delivers to a pod.
pub const BACKEND_VIA_NODE: u32 = 8;

/// Value of the backend array, indexed by backend id. The first 24 bytes
/// are what the packet path reads; the rest lets user space rebuild its view
/// after a restart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The first 12 bytes of every forwarded frame: the backend's MAC, then
    /// the egress interface's MAC, as three words of wire bytes (see
    /// [`Backend::macs_from`]).
    pub macs: [u32; 3],
    /// Egress interface; equal to the ingress one means `XDP_TX`.
    pub ifindex: u32,
    pub generation: u32,
    pub flags: u32,
    // --- user-space bookkeeping below, not read per packet ---
    pub svc_id: u32,
    pub weight: u32,
    /// Backend address (IPv4 in the first word); wire bytes.
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<Backend>() == 56);

/// Per-service bookkeeping, indexed by service id. Not read per packet: it
/// names the service so a restarted agent can read its VIP entries and
/// backend slots back (the rows of its tables are in its VIP values).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSlot {
    /// Caller's name for the service (UTF-8, zero padded).
    pub name: [u8; 64],
    pub flags: u32,
    /// First ring slot of the current table (informational; earlier
    /// versions kept a row index here).
    pub ring_base: u32,
    /// The service's Maglev table size.
    pub table_size: u32,
    pub _pad: [u32; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceSlot>() == 88);

pub const SERVICE_IN_USE: u32 = 1;

/// Dataplane-wide bookkeeping (one entry): lets a restarted agent tell
/// whether the program behind the pinned link is the one it carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// SHA-256 of the XDP object that is attached.
    pub object_sha256: [u8; 32],
    /// Interface the link is attached to.
    pub ifindex: u32,
    /// `ATTACH_NATIVE` or `ATTACH_GENERIC`.
    pub attach_mode: u32,
    /// Attach interface's MAC, zero padded.
    pub mac: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<Meta>() == 48);

/// Peers: the MACs of the other kube-dsr nodes' interfaces on the segment.
/// A VIP frame from a peer was balanced already: it goes to the node stage,
/// never through the ingress stage again. Open-addressed like the VIP
/// tables (inlined array lookups, no helper call), published the same way:
/// user space fills the MAC, then stores `state = SLOT_USED` last.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSlot {
    /// MAC bytes 0..4, then 4..6 (wire bytes).
    pub mac_hi: u32,
    pub mac_lo: u16,
    pub state: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PeerSlot>() == 8);

const PEER_BITS: u32 = 10;
/// Slots of the peer table (a power of two).
pub const PEER_SLOTS: u32 = 1 << PEER_BITS;
/// Slots a peer lookup probes.
pub const PEER_PROBES: u32 = 8;

/// First slot probed for a peer MAC, given as [`PeerSlot::mac_word`]: one
/// multiply (Fibonacci hashing), as every VIP packet computes it.
#[inline(always)]
pub fn peer_slot(mac: u64) -> u32 {
    (mac.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - PEER_BITS)) as u32
}

impl PeerSlot {
    /// The `mac_hi`, `mac_lo` words of a MAC.
    pub const fn words(mac: [u8; 6]) -> (u32, u16) {
        (u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]), u16::from_ne_bytes([mac[4], mac[5]]))
    }

    /// A MAC's six bytes as the low 48 bits of a native word, as the
    /// program reads them from a frame (one load and a mask).
    pub const fn mac_word(mac: [u8; 6]) -> u64 {
        u64::from_ne_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
    }

    /// The whole slot as one native word: `mac_word | state << 48` (the
    /// padding byte is always zero), so a probe is one load and compare.
    pub const fn as_word(&self) -> u64 {
        let (h, l) = (self.mac_hi.to_ne_bytes(), self.mac_lo.to_ne_bytes());
        u64::from_ne_bytes([h[0], h[1], h[2], h[3], l[0], l[1], self.state, self._pad])
    }
}

pub const ATTACH_NATIVE: u32 = 1;
pub const ATTACH_GENERIC: u32 = 2;

/// Packet and byte counters (per CPU in the maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Traffic>() == 16);

/// Why the program returned what it returned: one counter per reason, one
/// reason per packet.
pub mod reason {
    /// Forwarded through an existing connection-table entry.
    pub const FWD_CONN_HIT: u32 = 0;
    /// Forwarded by the Maglev table alone (no previous table, or it agrees).
    pub const FWD_MAGLEV: u32 = 1;
    /// The flow's slot changed with the last table change and it is a new
    /// TCP connection (or its old backend is gone): current backend, pinned.
    pub const FWD_PINNED_CURRENT: u32 = 2;
    /// The flow's slot changed with the last table change and it is
    /// established: kept on its previous backend, pinned.
    pub const FWD_PINNED_PREVIOUS: u32 = 3;
    /// ICMP error about a VIP flow forwarded to that flow's backend.
    pub const FWD_ICMP: u32 = 4;
    /// Forwarded, but the pinning entry could not be stored.
    pub const FWD_CONN_INSERT_FAILED: u32 = 5;
    /// VIP packet dropped: the service has no usable backend.
    pub const DROP_NO_BACKEND: u32 = 6;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
    pub const PASS_NOT_IP: u32 = 7;
    /// IP, but not to a VIP port: passed untouched.
    pub const PASS_NOT_VIP: u32 = 8;
    /// Neither TCP, UDP nor an ICMP error about a VIP flow: passed.
    pub const PASS_OTHER_L4: u32 = 9;
    /// A header ends past the end of the frame, or is malformed: passed.
    pub const PASS_TRUNCATED: u32 = 10;
    /// IPv4 with options: passed to the kernel, never forwarded.
    pub const PASS_IP_OPTIONS: u32 = 11;
    /// IPv4 or IPv6 fragment: passed to the kernel, never forwarded.
    pub const PASS_FRAGMENT: u32 = 12;
    /// IPv6 with extension headers: passed to the kernel, never forwarded.
    pub const PASS_IPV6_EXT: u32 = 13;
    /// ICMP error whose inner packet is not a VIP flow: passed.
    pub const PASS_ICMP_NOT_VIP: u32 = 14;
    /// More than one VLAN tag: passed.
    pub const PASS_VLAN_STACK: u32 = 15;
    /// The destination MAC is not the interface's own unicast address
    /// (broadcast, multicast, another host's frame seen through a flooding
    /// bridge or promiscuous mode): passed, the kernel treats it as usual.
    pub const PASS_NOT_OUR_MAC: u32 = 16;
    /// IPv4 total length shorter than its header or longer than the frame,
    /// or IPv6 payload length longer than the frame: passed, the kernel's IP
    /// input drops it.
    pub const PASS_IP_LEN: u32 = 17;
    /// VIP TCP segment whose header does not fit in the IP payload (data
    /// offset below 5 or past the payload's end): dropped, because a routing
    /// node's kernel would send it on unchecked.
    pub const DROP_TCP_LEN: u32 = 18;
    /// VIP UDP datagram whose length field is below 8 or past the IP
    /// payload's end: dropped, like `DROP_TCP_LEN`.
    pub const DROP_UDP_LEN: u32 = 19;
    /// ICMP error whose quoted packet is not whole enough to name a flow
    /// (quote cut before 8 bytes of its L4 header, inner lengths too short,
    /// a non-first fragment): passed.
    pub const PASS_ICMP_QUOTE: u32 = 20;
    /// Node stage: delivered to a local backend pod.
    pub const FWD_NODE_LOCAL: u32 = 21;
    /// Node stage: no usable local backend (or no node stage) for the VIP.
    pub const DROP_NODE_NO_BACKEND: u32 = 22;
    /// Node stage: the backend's egress is the arrival interface; the frame
    /// would go back onto the segment (refused by user space, so never
    /// expected).
    pub const DROP_NODE_LOOP: u32 = 23;
    /// Reply program: a backend pod's packet from a node-stage VIP:port,
    /// sent out of the node's uplink past netfilter.
    pub const FWD_REPLY: u32 = 24;

    pub const COUNT: u32 = 25;

    /// Fixed metric label for each reason, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "fwd_conn_hit",
        "fwd_maglev",
        "fwd_pinned_current",
        "fwd_pinned_previous",
        "fwd_icmp",
        "fwd_conn_insert_failed",
        "drop_no_backend",
        "pass_not_ip",
        "pass_not_vip",
        "pass_other_l4",
        "pass_truncated",
        "pass_ip_options",
        "pass_fragment",
        "pass_ipv6_ext",
        "pass_icmp_not_vip",
        "pass_vlan_stack",
        "pass_not_our_mac",
        "pass_ip_len",
        "drop_tcp_len",
        "drop_udp_len",
        "pass_icmp_quote",
        "fwd_node_local",
        "drop_node_no_backend",
        "drop_node_loop",
        "fwd_reply",
    ];
    const _: () = assert!(COUNT <= super::COUNTER_SLOTS);
}

/// The flow hash that picks a Maglev slot. It is part of the dataplane's
/// contract: every ingress node must compute the same value for the same
/// flow, so a flow that ECMP moves to another node lands on the same
/// backend. Inputs are the client address words, both ports and the protocol;
/// the service is implied by the table being looked up.
///
/// The upper three address words are folded into one before mixing: for
/// IPv4 they are zero, and IPv6 clients still differ in the folded word.
#[inline(always)]
pub fn flow_hash(saddr: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = u32::from(sport) | (u32::from(dport) << 16);
    let upper = saddr[1] ^ saddr[2].rotate_left(11) ^ saddr[3].rotate_left(22);
    let mut h: u32 = 0x9e37_79b9 ^ u32::from(proto);
    h = mix(h, saddr[0]);
    h = mix(h, upper);
    h = mix(h, ports);
    fmix(h)
}

/// Address words (wire bytes) of an IPv4 address.
#[inline(always)]
pub const fn v4_words(octets: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Address words (wire bytes) of an IPv6 address.
#[inline(always)]
pub const fn v6_words(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// A port as the word that holds its wire bytes.
#[inline(always)]
pub const fn port_word(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

impl Backend {
    /// The `macs` words for destination `dst` and source `src`.
    pub const fn macs_from(dst: [u8; 6], src: [u8; 6]) -> [u32; 3] {
        [
            u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]),
            u32::from_ne_bytes([dst[4], dst[5], src[0], src[1]]),
            u32::from_ne_bytes([src[2], src[3], src[4], src[5]]),
        ]
    }

    /// The destination MAC held in `macs`.
    pub const fn dst_mac(&self) -> [u8; 6] {
        let a = self.macs[0].to_ne_bytes();
        let b = self.macs[1].to_ne_bytes();
        [a[0], a[1], a[2], a[3], b[0], b[1]]
    }

    /// The source MAC held in `macs`.
    pub const fn src_mac(&self) -> [u8; 6] {
        let b = self.macs[1].to_ne_bytes();
        let c = self.macs[2].to_ne_bytes();
        [b[2], b[3], c[0], c[1], c[2], c[3]]
    }
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: spreads every input bit over the output.
#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), made of integers and byte arrays with
    // explicit padding, so every bit pattern is valid and none is uninit.
    unsafe impl aya::Pod for VipKey4 {}
    unsafe impl aya::Pod for VipKey6 {}
    unsafe impl aya::Pod for VipSlot4 {}
    unsafe impl aya::Pod for VipSlot6 {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for ConnKey4 {}
    unsafe impl aya::Pod for ConnKey6 {}
    unsafe impl aya::Pod for ConnValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ServiceSlot {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for PeerSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_depends_on_every_input() {
        let a = v4_words([10, 0, 0, 1]);
        let (sp, dp) = (port_word(12345), port_word(80));
        let base = flow_hash(&a, sp, dp, PROTO_TCP);
        assert_ne!(base, flow_hash(&v4_words([10, 0, 0, 2]), sp, dp, PROTO_TCP));
        assert_ne!(base, flow_hash(&a, port_word(12346), dp, PROTO_TCP));
        assert_ne!(base, flow_hash(&a, sp, port_word(81), PROTO_TCP));
        assert_ne!(base, flow_hash(&a, sp, dp, PROTO_UDP));
        assert_eq!(base, flow_hash(&a, sp, dp, PROTO_TCP));
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        let h6 = flow_hash(&v6_words(v6), sp, dp, PROTO_TCP);
        for i in 1..16 {
            let mut other = v6;
            other[i] = 1;
            assert_ne!(h6, flow_hash(&v6_words(other), sp, dp, PROTO_TCP), "byte {i}");
        }
    }

    #[test]
    fn macs_round_trip() {
        let dst = [0x02, 0, 0, 0, 0, 0x0b];
        let src = [0x02, 0, 0, 0, 0, 0x0a];
        let b = Backend {
            macs: Backend::macs_from(dst, src),
            ifindex: 0,
            generation: 1,
            flags: BACKEND_IN_USE,
            svc_id: 0,
            weight: 1,
            addr: [0; 4],
            family: FAMILY_V4,
            _pad: [0; 7],
        };
        assert_eq!(b.dst_mac(), dst);
        assert_eq!(b.src_mac(), src);
        let bytes: [u8; 12] = unsafe { core::mem::transmute(b.macs) };
        assert_eq!(&bytes[..6], &dst);
        assert_eq!(&bytes[6..], &src);
    }

    #[test]
    fn a_used_peer_slot_is_its_mac_word_with_the_state_on_top() {
        let mac = [0x02, 0xee, 0x12, 0x34, 0x56, 0x78];
        let (mac_hi, mac_lo) = PeerSlot::words(mac);
        let slot = PeerSlot { mac_hi, mac_lo, state: SLOT_USED, _pad: 0 };
        assert_eq!(slot.as_word(), PeerSlot::mac_word(mac) | u64::from(SLOT_USED) << 48);
        // What the program reads from a frame's bytes 6..14 (MAC, ethertype).
        let frame = [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0x08, 0x00];
        assert_eq!(u64::from_ne_bytes(frame) & 0xffff_ffff_ffff, PeerSlot::mac_word(mac));
        assert!(peer_slot(PeerSlot::mac_word(mac)) < PEER_SLOTS);
    }

    #[test]
    fn flow_hash_spreads_sequential_ports_evenly() {
        // 4093 buckets over 2^20 sequential source ports and addresses:
        // no bucket may be more than a few times the mean.
        const M: u32 = 4093;
        let mut counts = [0u32; M as usize];
        for i in 0u32..(1 << 20) {
            let a = v4_words((0x0a00_0000 + (i >> 16)).to_be_bytes());
            let sport = port_word((i & 0xffff) as u16);
            counts[(flow_hash(&a, sport, port_word(80), PROTO_TCP) % M) as usize] += 1;
        }
        let mean = (1u32 << 20) / M;
        let max = *counts.iter().max().unwrap();
        let min = *counts.iter().min().unwrap();
        assert!(max < mean * 3 / 2, "max {max} mean {mean}");
        assert!(min > mean / 2, "min {min} mean {mean}");
    }
}
