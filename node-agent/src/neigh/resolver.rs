//! The kernel side: route lookups, the neighbour table, and starting
//! resolution, through a blocking rtnetlink socket in the calling thread's
//! network namespace.

use std::{collections::BTreeMap, io, net::IpAddr, sync::Arc};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia},
};

use super::plan::{Iface, Lookup, NeighEntry, NeighVerdict, Route, adjacency, classify};
use crate::rtnl::{Rtnl, nl_err};
use crate::{Error, Result};

/// One interface as [`Resolver::link_info`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub iface: Iface,
    /// Its Ethernet address (`None` for interfaces without a 6-byte one).
    pub mac: Option<[u8; 6]>,
    /// `IFLA_LINK`: for a veth, the peer's index in the peer's namespace.
    pub peer: Option<u32>,
}

/// Looks backends up in the namespace of the thread that created it (run
/// it inside `Netns::run` for another namespace).
pub struct Resolver {
    nl: Rtnl,
    /// What this round has read already (see [`Resolver::begin_round`]).
    seen: Option<Seen>,
    reads: NeighbourReads,
}

/// How neighbour entries were read since the resolver was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourReads {
    /// Entries read one by one.
    pub single: usize,
    /// Tables of one interface dumped (both families).
    pub dumps: usize,
}

/// Route lookups, interface names and neighbour tables read during one
/// round: a node serving many services looks each of them up once per
/// round, not once per service that uses them.
#[derive(Default)]
struct Seen {
    routes: BTreeMap<IpAddr, Route>,
    ifaces: BTreeMap<u32, Iface>,
    /// Shared, not copied: a table may hold one entry per pod of the
    /// cluster, and every service of the round reads it.
    neighbours: BTreeMap<u32, Arc<BTreeMap<IpAddr, NeighEntry>>>,
    /// Entries read one by one so far, per interface.
    single_reads: BTreeMap<u32, usize>,
}

/// Up to this many neighbour entries of one interface are read one by one
/// in a round (`RTM_GETNEIGH` of one address); past it the interface's
/// table is dumped once and used for the rest of the round. A round that
/// re-plans one service reads that service's backends, not a table that
/// may hold an entry for every pod of the cluster; a round that re-plans
/// many reads the table once.
pub const SINGLE_READS: usize = 256;

impl Resolver {
    pub fn new() -> Result<Self> {
        let nl = Rtnl::open().map_err(|(what, e)| nl_err(what)(e))?;
        Ok(Self { nl, seen: None, reads: NeighbourReads::default() })
    }

    /// Starts a round: from now until the next call, routes, interface
    /// names and neighbour tables are read once and then reused (a probe
    /// sent during the round shows in the next one). Without it every
    /// lookup reads the kernel.
    pub fn begin_round(&mut self) {
        self.seen = Some(Seen::default());
    }

    /// How neighbour entries were read so far.
    pub fn neighbour_reads(&self) -> NeighbourReads {
        self.reads
    }

    /// An interface by name.
    pub fn interface(&mut self, name: &str) -> Result<Iface> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        self.link(msg).map_err(|source| Error::UnknownInterface { name: name.into(), source })
    }

    /// An interface by index.
    pub fn interface_by_index(&mut self, index: u32) -> Result<Iface> {
        if let Some(i) = self.seen.as_ref().and_then(|s| s.ifaces.get(&index)) {
            return Ok(i.clone());
        }
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        let i = self.link(msg).map_err(|source| Error::UnknownInterfaceIndex { index, source })?;
        if let Some(s) = self.seen.as_mut() {
            s.ifaces.insert(index, i.clone());
        }
        Ok(i)
    }

    /// An interface by index with its MAC and, for one end of a veth pair,
    /// the other end's index (`IFLA_LINK`, an index in the peer's
    /// namespace).
    pub fn link_info(&mut self, index: u32) -> Result<LinkInfo> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        let replies = self
            .request(RouteNetlinkMessage::GetLink(msg), 0)
            .map_err(|source| Error::UnknownInterfaceIndex { index, source })?;
        let l = replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .ok_or_else(|| Error::UnknownInterfaceIndex {
                index,
                source: io::ErrorKind::NotFound.into(),
            })?;
        let mut info = LinkInfo {
            iface: Iface { index: l.header.index, name: String::new() },
            mac: None,
            peer: None,
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => info.iface.name = n.clone(),
                LinkAttribute::Address(m) => info.mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
                LinkAttribute::Link(i) => info.peer = Some(*i),
                _ => {}
            }
        }
        Ok(info)
    }

    /// The interface holding `addr` as one of its addresses, if any.
    pub fn interface_with_address(&mut self, addr: IpAddr) -> Result<Option<Iface>> {
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)
            .map_err(nl_err("dumping addresses"))?;
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else { continue };
            let holds = a.attributes.iter().any(|x| match x {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => *ip == addr,
                _ => false,
            });
            if holds {
                return Ok(Some(self.interface_by_index(a.header.index)?));
            }
        }
        Ok(None)
    }

    fn link(&mut self, msg: LinkMessage) -> io::Result<Iface> {
        self.request(RouteNetlinkMessage::GetLink(msg), 0)?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let name = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    });
                    Some(Iface { index: l.header.index, name: name.unwrap_or_default() })
                }
                _ => None,
            })
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    /// The kernel's route toward `addr` (`ip route get`).
    pub fn route(&mut self, addr: IpAddr) -> Result<Route> {
        if let Some(r) = self.seen.as_ref().and_then(|s| s.routes.get(&addr)) {
            return Ok(r.clone());
        }
        let r = self.read_route(addr)?;
        if let Some(s) = self.seen.as_mut() {
            s.routes.insert(addr, r.clone());
        }
        Ok(r)
    }

    fn read_route(&mut self, addr: IpAddr) -> Result<Route> {
        let mut msg = RouteMessage::default();
        (msg.header.address_family, msg.header.destination_prefix_length) = match addr {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let replies = match self.request(RouteNetlinkMessage::GetRoute(msg), 0) {
            Ok(r) => r,
            // What `unreachable`, `prohibit` and `blackhole` routes and a
            // missing route answer.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL)
                ) =>
            {
                return Ok(Route::Unroutable { why: e.to_string() });
            }
            Err(source) => return Err(Error::NeighbourLookup { addr, what: "route", source }),
        };
        let Some(r) = replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => Some(r),
            _ => None,
        }) else {
            return Err(Error::NeighbourLookup {
                addr,
                what: "route",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        };
        if r.header.kind != RouteType::Unicast {
            return Ok(Route::Other { kind: route_kind(r.header.kind) });
        }
        let mut oif = None;
        let mut gateway = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some((*g).into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some((*g).into()),
                // An IPv4 route through an IPv6 next hop (RFC 5549).
                RouteAttribute::Via(RouteVia::Inet(g)) => gateway = Some((*g).into()),
                RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some((*g).into()),
                _ => {}
            }
        }
        let Some(oif) = oif else {
            return Ok(Route::Unroutable { why: "the route has no output interface".into() });
        };
        Ok(Route::Unicast { oif: self.interface_by_index(oif)?, gateway })
    }

    /// The neighbour table of `ifindex` (one dump, filtered by the kernel
    /// on `NDA_IFINDEX` and again here).
    pub fn neighbours(&mut self, ifindex: u32) -> Result<Arc<BTreeMap<IpAddr, NeighEntry>>> {
        if let Some(t) = self.seen.as_ref().and_then(|s| s.neighbours.get(&ifindex)) {
            return Ok(Arc::clone(t));
        }
        let t = Arc::new(self.read_neighbours(ifindex)?);
        if let Some(s) = self.seen.as_mut() {
            s.neighbours.insert(ifindex, Arc::clone(&t));
        }
        Ok(t)
    }

    /// The neighbour entry of `addr` on `ifindex`: from a table dumped
    /// earlier (this round's, else this call's `tables`), else read alone
    /// while fewer than [`SINGLE_READS`] were (counted per round, else in
    /// `singles`), else from a dump of the table.
    fn entry(
        &mut self,
        ifindex: u32,
        addr: IpAddr,
        tables: &mut BTreeMap<u32, Arc<BTreeMap<IpAddr, NeighEntry>>>,
        singles: &mut BTreeMap<u32, usize>,
    ) -> Result<Option<NeighEntry>> {
        let dumped = match &self.seen {
            Some(s) => s.neighbours.get(&ifindex),
            None => tables.get(&ifindex),
        };
        if let Some(t) = dumped {
            return Ok(t.get(&addr).cloned());
        }
        let count = match self.seen.as_mut() {
            Some(s) => s.single_reads.entry(ifindex).or_default(),
            None => singles.entry(ifindex).or_default(),
        };
        *count += 1;
        if *count <= SINGLE_READS {
            return self.read_neighbour(ifindex, addr);
        }
        // A round keeps the dump itself (`neighbours`); a call outside one
        // keeps it in `tables`.
        let t = self.neighbours(ifindex)?;
        let entry = t.get(&addr).cloned();
        if self.seen.is_none() {
            tables.insert(ifindex, t);
        }
        Ok(entry)
    }

    /// One entry (`ip neigh get ADDR dev IF`); `None` when there is none.
    fn read_neighbour(&mut self, ifindex: u32, addr: IpAddr) -> Result<Option<NeighEntry>> {
        let msg = neighbour_message(ifindex, addr);
        self.reads.single += 1;
        let replies = match self.request(RouteNetlinkMessage::GetNeighbour(msg), 0) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(source) => {
                return Err(Error::NeighbourLookup { addr, what: "reading its entry", source });
            }
        };
        Ok(replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == ifindex => {
                Self::parse_entry(n).filter(|(dst, _)| *dst == addr).map(|(_, e)| e)
            }
            _ => None,
        }))
    }

    /// A neighbour message as (destination, entry).
    fn parse_entry(n: NeighbourMessage) -> Option<(IpAddr, NeighEntry)> {
        let state = n.header.state.into();
        let mut dst = None;
        let mut lladdr = None;
        for a in n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => {
                    dst = Some(IpAddr::from(d))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => {
                    dst = Some(IpAddr::from(d))
                }
                NeighbourAttribute::LinkLayerAddress(l) => lladdr = Some(l),
                _ => {}
            }
        }
        Some((dst?, NeighEntry { state, lladdr }))
    }

    fn read_neighbours(&mut self, ifindex: u32) -> Result<BTreeMap<IpAddr, NeighEntry>> {
        let mut out = BTreeMap::new();
        self.reads.dumps += 1;
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = NeighbourMessage::default();
            msg.header.family = family;
            msg.attributes.push(NeighbourAttribute::IfIndex(ifindex));
            let replies = self
                .request(RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)
                .map_err(nl_err("dumping the neighbour table"))?;
            for m in replies {
                let RouteNetlinkMessage::NewNeighbour(n) = m else { continue };
                if n.header.ifindex != ifindex {
                    continue;
                }
                if let Some((dst, e)) = Self::parse_entry(n) {
                    out.insert(dst, e);
                }
            }
        }
        Ok(out)
    }

    /// Starts (or restarts) resolution of `addr` on `ifindex`: `RTM_NEWNEIGH`
    /// with `NTF_USE` creates the entry if needed and has the kernel treat
    /// it as used, which sends a solicitation from an absent, `NONE` or
    /// `FAILED` entry (→ `INCOMPLETE`) and a unicast probe from a `STALE`
    /// one (→ `DELAY`/`PROBE`). The entry is never written otherwise.
    pub fn probe(&mut self, ifindex: u32, addr: IpAddr) -> Result<()> {
        let mut msg = neighbour_message(ifindex, addr);
        msg.header.flags = NeighbourFlags::Use;
        self.request(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
        .map_err(|source| Error::NeighbourLookup {
            addr,
            what: "starting resolution",
            source,
        })
    }

    /// Looks every address up: route, adjacency, neighbour entry. Absent
    /// entries get resolution started (reported `Pending`) and `STALE` ones
    /// a probe (still reported resolved); `FAILED` entries are reported
    /// `Unreachable` and left alone — re-probing them is the caller's
    /// cadence ([`Resolver::probe`]), or they would flip between
    /// `Unreachable` and `Pending` on every round.
    pub fn lookup_all(
        &mut self,
        ingress: &Iface,
        allowed: &[Iface],
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<BTreeMap<IpAddr, Lookup>> {
        // Without a round: what this call dumped, and its single reads.
        let mut tables: BTreeMap<u32, Arc<BTreeMap<IpAddr, NeighEntry>>> = BTreeMap::new();
        let mut singles: BTreeMap<u32, usize> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for addr in addrs {
            let route = self.route(addr)?;
            let egress = match adjacency(addr, &route, ingress, allowed) {
                Ok(e) => e,
                Err(reason) => {
                    out.insert(addr, Lookup::NotAdjacent { reason });
                    continue;
                }
            };
            let entry = self.entry(egress.index, addr, &mut tables, &mut singles)?;
            let entry = entry.as_ref();
            let lookup = match classify(entry) {
                NeighVerdict::Resolved { mac, refresh } => {
                    if refresh {
                        self.probe(egress.index, addr)?;
                    }
                    Lookup::Resolved { mac, egress }
                }
                NeighVerdict::Trigger => {
                    self.probe(egress.index, addr)?;
                    Lookup::Pending { egress }
                }
                NeighVerdict::InProgress => Lookup::Pending { egress },
                NeighVerdict::Failed => Lookup::Unreachable {
                    why: format!("{addr} does not answer on {egress} (neighbour entry FAILED)"),
                    egress,
                },
                NeighVerdict::Unusable => Lookup::Unreachable {
                    why: format!(
                        "the neighbour entry of {addr} on {egress} has no Ethernet address \
                         (state {:#x})",
                        entry.map_or(0, |e| e.state)
                    ),
                    egress,
                },
            };
            out.insert(addr, lookup);
        }
        Ok(out)
    }

    /// One backend; see [`Resolver::lookup_all`].
    pub fn lookup(&mut self, ingress: &Iface, allowed: &[Iface], addr: IpAddr) -> Result<Lookup> {
        let mut all = self.lookup_all(ingress, allowed, [addr])?;
        Ok(all.remove(&addr).expect("every address gets a lookup"))
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.nl.request(msg, flags)
    }
}

/// A neighbour message naming `addr` on `ifindex`, state `NONE`.
fn neighbour_message(ifindex: u32, addr: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.ifindex = ifindex;
    msg.header.state = NeighbourState::None;
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::from(addr)));
    msg
}

fn route_kind(kind: RouteType) -> &'static str {
    match kind {
        RouteType::Unspec => "unspec",
        RouteType::Unicast => "unicast",
        RouteType::Local => "local",
        RouteType::Broadcast => "broadcast",
        RouteType::Anycast => "anycast",
        RouteType::Multicast => "multicast",
        RouteType::BlackHole => "blackhole",
        RouteType::Unreachable => "unreachable",
        RouteType::Prohibit => "prohibit",
        RouteType::Throw => "throw",
        RouteType::Nat => "nat",
        _ => "other",
    }
}
