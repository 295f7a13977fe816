//! What a caller asks the dataplane to forward: plain data and pure checks.

use std::net::IpAddr;

use kube_dsr_common::{
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, STAGE_NODE, VipKey4, VipKey6, port_word, v4_words,
    v6_words,
};

use crate::{
    error::{Error, Result},
    maglev,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

/// Where frames for a backend leave when it is not behind the interface the
/// program is attached to (then they are redirected instead of `XDP_TX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Which of a node's two stages a service belongs to.
///
/// The ingress stage balances frames from clients over backends anywhere on
/// the segment. The node stage of a service on a node delivers frames that
/// an ingress stage (this node's or a peer's) sent to this node, to one of
/// the node's local backend pods; it never sends a frame back onto the
/// segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    #[default]
    Ingress,
    Node,
}

/// How a backend is reached: one rewrite each in the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reach {
    /// The backend's own MAC on the segment (bridged or macvlan pods,
    /// static backends); on the node stage, the pod's MAC behind its
    /// host-side interface (`egress`).
    #[default]
    Direct,
    /// Through the backend's node: destination MAC = the node's MAC on the
    /// segment; that node's node stage delivers to a pod. `addr` is the
    /// node's address, `weight` its number of ready backend pods.
    ViaNode,
    /// This node: the frame continues into this node's node stage for the
    /// same VIP:port in the same program run. `mac` and `egress` are
    /// ignored; `addr` is this node's address.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// The backend's MAC on the shared L2 segment (`Direct`), its node's
    /// (`ViaNode`), or the pod's behind `egress` (node stage).
    pub mac: [u8; 6],
    /// Relative Maglev weight; 0 takes the backend out of the table.
    pub weight: u32,
    /// No new flows; established ones keep going.
    pub draining: bool,
    /// `None`: the attach interface (`XDP_TX`).
    pub egress: Option<Egress>,
    pub reach: Reach,
}

impl BackendSpec {
    /// A `Direct` backend with weight 1, not draining, behind the attach
    /// interface.
    pub fn new(addr: IpAddr, mac: [u8; 6]) -> Self {
        Self { addr, mac, weight: 1, draining: false, egress: None, reach: Reach::Direct }
    }

    /// A node reached through its MAC on the segment, weighted by its
    /// number of ready backend pods.
    pub fn via_node(node_addr: IpAddr, node_mac: [u8; 6], ready_pods: u32) -> Self {
        Self { weight: ready_pods, reach: Reach::ViaNode, ..Self::new(node_addr, node_mac) }
    }

    /// This node, weighted by its number of ready local backend pods.
    pub fn local(node_addr: IpAddr, ready_pods: u32) -> Self {
        Self { weight: ready_pods, reach: Reach::Local, ..Self::new(node_addr, [0; 6]) }
    }

    /// A local pod for a node stage: its eth0 MAC behind its host-side
    /// interface.
    pub fn pod(addr: IpAddr, pod_mac: [u8; 6], host_side: Egress) -> Self {
        Self { egress: Some(host_side), ..Self::new(addr, pod_mac) }
    }

    /// Whether new flows may be given to this backend.
    pub fn takes_new_flows(&self) -> bool {
        !self.draining && self.weight > 0
    }
}

/// One VIP address of a service with its ports and backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Caller's stable name (for example `namespace/name/v4`), at most 64
    /// bytes.
    pub name: String,
    pub vip: IpAddr,
    pub ports: Vec<PortSpec>,
    /// Maglev table size, one of [`maglev::TABLE_SIZES`].
    pub table_size: u32,
    pub backends: Vec<BackendSpec>,
    /// Pin every new flow in the connection table (see
    /// [`kube_dsr_common::VIP_PIN_ALL`]); by default only flows whose
    /// backend a table change would move are pinned.
    pub pin_all_flows: bool,
    pub stage: Stage,
}

pub const MAX_NAME_LEN: usize = 64;

impl ServiceSpec {
    /// Refuses what the dataplane could not forward correctly.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::InvalidService { service: self.name.clone(), reason };
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(bad(format!("name must be 1 to {MAX_NAME_LEN} bytes")));
        }
        if !maglev::TABLE_SIZES.contains(&self.table_size) {
            return Err(bad(format!(
                "table size {} is not one of {:?}",
                self.table_size,
                maglev::TABLE_SIZES
            )));
        }
        if self.ports.is_empty() {
            return Err(bad("no ports".into()));
        }
        let mut ports = self.ports.clone();
        ports.sort();
        if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("port {}/{:?} is listed twice", w[0].port, w[0].protocol)));
        }
        if let Some(p) = ports.iter().find(|p| p.port == 0) {
            return Err(bad(format!("port 0/{:?} is not a port", p.protocol)));
        }
        if !usable_vip(self.vip) {
            return Err(bad(format!(
                "VIP {} is unspecified, loopback, multicast or link-local",
                self.vip
            )));
        }
        let mut addrs: Vec<IpAddr> = self.backends.iter().map(|b| b.addr).collect();
        addrs.sort();
        if let Some(w) = addrs.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("backend {} is listed twice", w[0])));
        }
        for b in &self.backends {
            if b.addr.is_ipv4() != self.vip.is_ipv4() {
                return Err(bad(format!("backend {} is not of the VIP's family", b.addr)));
            }
            if b.reach != Reach::Local && (b.mac == [0; 6] || b.mac[0] & 1 == 1) {
                return Err(bad(format!("backend {} has no unicast MAC", b.addr)));
            }
            match (self.stage, b.reach) {
                (Stage::Node, Reach::ViaNode | Reach::Local) => {
                    return Err(bad(format!(
                        "backend {} of a node stage must be a local pod (reach Direct), not {:?}",
                        b.addr, b.reach
                    )));
                }
                (Stage::Node, Reach::Direct) if b.egress.is_none() => {
                    return Err(bad(format!(
                        "backend {} of a node stage needs its host-side interface (egress)",
                        b.addr
                    )));
                }
                _ => {}
            }
        }
        if self.backends.iter().filter(|b| b.reach == Reach::Local).count() > 1 {
            return Err(bad("more than one Local backend".into()));
        }
        Ok(())
    }

    /// The service's Maglev table as backend ids, given each backend's id
    /// (same order as `backends`). `None` when no backend takes new flows.
    pub fn table(&self, ids: &[u32]) -> Result<Option<Vec<u32>>> {
        let entries: Vec<maglev::Entry<u32>> = self
            .backends
            .iter()
            .zip(ids)
            .filter(|(b, _)| b.takes_new_flows())
            .map(|(b, &id)| maglev::Entry { key: addr_key(b.addr), weight: b.weight, value: id })
            .collect();
        maglev::build(self.table_size, &entries).map_err(|e| Error::InvalidService {
            service: self.name.clone(),
            reason: e.to_string(),
        })
    }
}

/// An address a VIP may have: not unspecified, loopback, multicast or
/// link-local (the kernel would never route such a packet to us).
pub fn usable_vip(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_link_local()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local())
        }
    }
}

/// The identity bytes Maglev hashes for a backend: its address.
pub fn addr_key(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An address as map words plus its family tag.
pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => (v4_words(a.octets()), FAMILY_V4),
        IpAddr::V6(a) => (v6_words(a.octets()), FAMILY_V6),
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if family == FAMILY_V4 { IpAddr::from([o[0], o[1], o[2], o[3]]) } else { IpAddr::from(o) }
}

/// A key of one of the two VIP maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipKey {
    V4(VipKey4),
    V6(VipKey6),
}

/// The VIP map key of `vip` on `port` in `stage`: the node stage's keys
/// carry `STAGE_NODE` on the protocol byte.
pub fn vip_key(vip: IpAddr, port: PortSpec, stage: Stage) -> VipKey {
    let proto = port.protocol.number() | if stage == Stage::Node { STAGE_NODE } else { 0 };
    let port = port_word(port.port);
    match vip {
        IpAddr::V4(a) => {
            VipKey::V4(VipKey4 { addr: v4_words(a.octets())[0], port, proto, _pad: 0 })
        }
        IpAddr::V6(a) => VipKey::V6(VipKey6 { addr: v6_words(a.octets()), port, proto, _pad: 0 }),
    }
}

impl VipKey {
    /// The VIP, port and stage the key stands for (`None` for a protocol
    /// the dataplane does not program).
    pub fn decode(&self) -> Option<(IpAddr, PortSpec, Stage)> {
        let (addr, port, proto) = match self {
            Self::V4(k) => (words_addr([k.addr, 0, 0, 0], FAMILY_V4), k.port, k.proto),
            Self::V6(k) => (words_addr(k.addr, FAMILY_V6), k.port, k.proto),
        };
        let stage = if proto & STAGE_NODE != 0 { Stage::Node } else { Stage::Ingress };
        let protocol = Protocol::from_number(proto & !STAGE_NODE)?;
        Some((addr, PortSpec { port: u16::from_be(port), protocol }, stage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "default/web/v4".into(),
            vip: "192.0.2.10".parse().unwrap(),
            ports: vec![PortSpec { port: 80, protocol: Protocol::Tcp }],
            table_size: 251,
            pin_all_flows: false,
            stage: Stage::Ingress,
            backends: vec![
                BackendSpec::new("10.0.0.2".parse().unwrap(), [2, 0, 0, 0, 0, 2]),
                BackendSpec::new("10.0.0.3".parse().unwrap(), [2, 0, 0, 0, 0, 3]),
            ],
        }
    }

    #[test]
    fn a_good_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        type Mutation = fn(&mut ServiceSpec);
        let cases: Vec<(Mutation, &str)> = vec![
            (|s| s.name.clear(), "name"),
            (|s| s.table_size = 1000, "table size"),
            (|s| s.ports.clear(), "no ports"),
            (|s| s.ports.push(s.ports[0]), "listed twice"),
            (|s| s.ports[0].port = 0, "port 0"),
            (|s| s.vip = "127.0.0.1".parse().unwrap(), "loopback"),
            (|s| s.vip = "169.254.1.1".parse().unwrap(), "link-local"),
            (|s| s.vip = "ff02::1".parse().unwrap(), "multicast"),
            (|s| s.backends[1].addr = s.backends[0].addr, "listed twice"),
            (|s| s.backends[0].addr = "fd00::2".parse().unwrap(), "family"),
            (|s| s.backends[0].mac = [1, 0, 0, 0, 0, 1], "unicast MAC"),
        ];
        for (mutate, needle) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn draining_and_zero_weight_backends_leave_the_table() {
        let mut s = spec();
        s.backends[0].draining = true;
        let t = s.table(&[7, 8]).unwrap().unwrap();
        assert!(t.iter().all(|&id| id == 8));
        s.backends[1].weight = 0;
        assert_eq!(s.table(&[7, 8]).unwrap(), None);
    }

    #[test]
    fn vip_keys_round_trip() {
        for (vip, port) in [("192.0.2.1", 80), ("2001:db8::1", 443)] {
            let p = PortSpec { port, protocol: Protocol::Udp };
            let vip: IpAddr = vip.parse().unwrap();
            for stage in [Stage::Ingress, Stage::Node] {
                assert_eq!(vip_key(vip, p, stage).decode(), Some((vip, p, stage)));
            }
            assert_ne!(vip_key(vip, p, Stage::Ingress), vip_key(vip, p, Stage::Node));
        }
    }

    #[test]
    fn node_stages_take_only_local_pods_behind_an_interface() {
        let host_side = Egress { ifindex: 7, mac: [2, 0, 0, 0, 0, 7] };
        let mut s = spec();
        s.stage = Stage::Node;
        assert!(s.validate().unwrap_err().to_string().contains("host-side interface"));
        for b in &mut s.backends {
            b.egress = Some(host_side);
        }
        s.validate().unwrap();
        s.backends[0].reach = Reach::ViaNode;
        assert!(s.validate().unwrap_err().to_string().contains("local pod"));
        s.backends[0] = BackendSpec::local("10.0.0.2".parse().unwrap(), 1);
        assert!(s.validate().unwrap_err().to_string().contains("local pod"));
    }

    #[test]
    fn an_ingress_stage_takes_one_local_backend_without_a_mac() {
        let mut s = spec();
        s.backends.push(BackendSpec::local("10.0.0.9".parse().unwrap(), 2));
        s.validate().unwrap();
        s.backends.push(BackendSpec::local("10.0.0.8".parse().unwrap(), 1));
        assert!(s.validate().unwrap_err().to_string().contains("more than one Local"));
    }

    #[test]
    fn address_words_round_trip() {
        for a in ["192.0.2.1", "2001:db8::1", "fd00::ffff:1"] {
            let addr: IpAddr = a.parse().unwrap();
            let (w, f) = addr_words(addr);
            assert_eq!(words_addr(w, f), addr);
        }
    }
}
