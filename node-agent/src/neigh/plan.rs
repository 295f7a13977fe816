//! Pure decisions: is a backend adjacent, is its neighbour entry usable,
//! and what the dataplane may program now.

use std::{collections::BTreeMap, fmt, net::IpAddr};

/// An interface of the ingress node's namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iface {
    pub index: u32,
    pub name: String,
}

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What the kernel's route lookup (`RTM_GETROUTE`) said about a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A unicast route: the output interface and the gateway, if any.
    Unicast { oif: Iface, gateway: Option<IpAddr> },
    /// Any other route type (`local`, `broadcast`, `blackhole`, ...).
    Other { kind: &'static str },
    /// The lookup failed (`ENETUNREACH`, `EHOSTUNREACH`, ...).
    Unroutable { why: String },
}

/// Why a backend is not on the ingress interface's L2 segment: a planning
/// verdict (the backend is left out and reported), not an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAdjacent {
    #[error("no route to {backend}: {why}")]
    Unroutable { backend: IpAddr, why: String },
    #[error("the route to {backend} is of type {kind}")]
    RouteType { backend: IpAddr, kind: &'static str },
    #[error("route to {backend} goes via gateway {gateway} on {oif}")]
    Gateway { backend: IpAddr, gateway: IpAddr, oif: Iface },
    #[error(
        "route to {backend} leaves through {oif}, not the ingress interface {ingress}{}",
        nor_allowed(allowed)
    )]
    Elsewhere { backend: IpAddr, oif: Iface, ingress: Iface, allowed: Vec<Iface> },
}

fn nor_allowed(allowed: &[Iface]) -> String {
    if allowed.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = allowed.iter().map(|a| a.name.as_str()).collect();
    format!(" nor an allowed egress ({})", names.join(", "))
}

/// Whether `backend` sits on the L2 segment of `ingress` (or of one of the
/// `allowed` egress interfaces): the route must leave through one of them
/// and have no gateway.
pub fn adjacency(
    backend: IpAddr,
    route: &Route,
    ingress: &Iface,
    allowed: &[Iface],
) -> Result<Iface, NotAdjacent> {
    match route {
        Route::Unroutable { why } => Err(NotAdjacent::Unroutable { backend, why: why.clone() }),
        Route::Other { kind } => Err(NotAdjacent::RouteType { backend, kind }),
        Route::Unicast { oif, gateway: Some(gw) } => {
            Err(NotAdjacent::Gateway { backend, gateway: *gw, oif: oif.clone() })
        }
        Route::Unicast { oif, gateway: None } => {
            if oif.index == ingress.index || allowed.iter().any(|a| a.index == oif.index) {
                Ok(oif.clone())
            } else {
                Err(NotAdjacent::Elsewhere {
                    backend,
                    oif: oif.clone(),
                    ingress: ingress.clone(),
                    allowed: allowed.to_vec(),
                })
            }
        }
    }
}

// `NUD_*` from include/uapi/linux/neighbour.h.
pub const NUD_INCOMPLETE: u16 = 0x01;
pub const NUD_REACHABLE: u16 = 0x02;
pub const NUD_STALE: u16 = 0x04;
pub const NUD_DELAY: u16 = 0x08;
pub const NUD_PROBE: u16 = 0x10;
pub const NUD_FAILED: u16 = 0x20;
pub const NUD_NOARP: u16 = 0x40;
pub const NUD_PERMANENT: u16 = 0x80;

/// States whose link-layer address is good to send to.
const RESOLVED: u16 = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT;

/// One neighbour table entry as the kernel dumps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighEntry {
    /// `ndm_state`, raw `NUD_*` bits.
    pub state: u16,
    /// `NDA_LLADDR`, absent while unresolved.
    pub lladdr: Option<Vec<u8>>,
}

/// What to do with a neighbour entry (or its absence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighVerdict {
    /// Usable. `refresh`: the entry is `STALE`, which the kernel confirms
    /// only when it sends through it itself; XDP never does, so it is
    /// probed (`NTF_USE`) to be confirmed or to fail.
    Resolved { mac: [u8; 6], refresh: bool },
    /// Being resolved (`INCOMPLETE`): wait.
    InProgress,
    /// Absent or `NONE`: start resolution, then wait.
    Trigger,
    /// `FAILED`: nobody answered.
    Failed,
    /// A state that carries no Ethernet address to use (`NOARP`, or a
    /// resolved entry whose address is not 6 bytes long).
    Unusable,
}

pub fn classify(entry: Option<&NeighEntry>) -> NeighVerdict {
    let Some(e) = entry else { return NeighVerdict::Trigger };
    if e.state & RESOLVED != 0 {
        return match e.lladdr.as_deref().map(<[u8; 6]>::try_from) {
            Some(Ok(mac)) if mac != [0; 6] => {
                NeighVerdict::Resolved { mac, refresh: e.state & NUD_STALE != 0 }
            }
            _ => NeighVerdict::Unusable,
        };
    }
    if e.state & NUD_INCOMPLETE != 0 {
        NeighVerdict::InProgress
    } else if e.state & NUD_FAILED != 0 {
        NeighVerdict::Failed
    } else if e.state & NUD_NOARP != 0 {
        NeighVerdict::Unusable
    } else {
        NeighVerdict::Trigger
    }
}

/// The outcome of looking one backend up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The frame's destination MAC and the interface to send it out of.
    Resolved { mac: [u8; 6], egress: Iface },
    /// Resolution is under way; look again later.
    Pending { egress: Iface },
    /// The neighbour entry is `FAILED` (or unusable, `why` says).
    Unreachable { egress: Iface, why: String },
    /// Not on the ingress interface's L2 segment: never programmed.
    NotAdjacent { reason: NotAdjacent },
}

/// Where the dataplane sends a backend's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub mac: [u8; 6],
    pub egress: Iface,
}

/// Per-backend status, for the node report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Resolved,
    Pending,
    Unreachable(String),
    NotAdjacent(NotAdjacent),
    /// Wanted but not looked up (the lookup round failed).
    Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What the dataplane can program now.
    pub program: BTreeMap<IpAddr, Target>,
    /// Every desired backend, once.
    pub status: BTreeMap<IpAddr, Status>,
}

/// What can be programmed now, and why the rest cannot. Lookups of
/// addresses that are not desired are ignored.
pub fn plan(desired: &[IpAddr], lookups: &BTreeMap<IpAddr, Lookup>) -> Plan {
    let mut out = Plan::default();
    for &addr in desired {
        let status = match lookups.get(&addr) {
            None => Status::Unknown,
            Some(Lookup::Resolved { mac, egress }) => {
                out.program.insert(addr, Target { mac: *mac, egress: egress.clone() });
                Status::Resolved
            }
            Some(Lookup::Pending { .. }) => Status::Pending,
            Some(Lookup::Unreachable { why, .. }) => Status::Unreachable(why.clone()),
            Some(Lookup::NotAdjacent { reason }) => Status::NotAdjacent(reason.clone()),
        };
        out.status.insert(addr, status);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str) -> Iface {
        Iface { index, name: name.into() }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn adjacency_table() {
        let eth0 = iface(2, "eth0");
        let eth1 = iface(3, "eth1");
        let direct = |oif: &Iface| Route::Unicast { oif: oif.clone(), gateway: None };
        type Case<'a> = (&'a str, Route, Vec<Iface>, Result<Iface, &'a str>);
        // The verdicts read as the reports show them.
        let cases: Vec<Case> = vec![
            ("10.0.0.5", direct(&eth0), vec![], Ok(eth0.clone())),
            ("fd00::5", direct(&eth0), vec![], Ok(eth0.clone())),
            ("10.0.1.5", direct(&eth1), vec![eth1.clone()], Ok(eth1.clone())),
            (
                "10.1.2.3",
                Route::Unicast { oif: eth0.clone(), gateway: Some(ip("10.0.0.1")) },
                vec![],
                Err("route to 10.1.2.3 goes via gateway 10.0.0.1 on eth0"),
            ),
            (
                "10.1.2.3",
                Route::Unicast { oif: eth1.clone(), gateway: Some(ip("10.0.1.1")) },
                vec![eth1.clone()],
                Err("route to 10.1.2.3 goes via gateway 10.0.1.1 on eth1"),
            ),
            (
                "10.0.1.5",
                direct(&eth1),
                vec![],
                Err("route to 10.0.1.5 leaves through eth1, not the ingress interface eth0"),
            ),
            (
                "10.0.1.5",
                direct(&eth1),
                vec![iface(4, "eth2"), iface(5, "eth3")],
                Err("route to 10.0.1.5 leaves through eth1, not the ingress interface eth0 \
                     nor an allowed egress (eth2, eth3)"),
            ),
            (
                "10.0.0.1",
                Route::Other { kind: "local" },
                vec![],
                Err("the route to 10.0.0.1 is of type local"),
            ),
            (
                "192.0.2.1",
                Route::Unroutable { why: "Network is unreachable".into() },
                vec![],
                Err("no route to 192.0.2.1: Network is unreachable"),
            ),
        ];
        for (addr, route, allowed, want) in cases {
            let got = adjacency(ip(addr), &route, &eth0, &allowed);
            assert_eq!(
                got.map_err(|e| e.to_string()),
                want.map_err(str::to_owned),
                "{addr} {route:?} {allowed:?}"
            );
        }
    }

    #[test]
    fn classify_table() {
        let mac = vec![2, 0, 0, 0, 0, 7];
        let m = [2, 0, 0, 0, 0, 7];
        let e = |state, ll: Option<Vec<u8>>| Some(NeighEntry { state, lladdr: ll });
        let cases: Vec<(Option<NeighEntry>, NeighVerdict)> = vec![
            (None, NeighVerdict::Trigger),
            (e(0, None), NeighVerdict::Trigger),
            (
                e(NUD_REACHABLE, Some(mac.clone())),
                NeighVerdict::Resolved { mac: m, refresh: false },
            ),
            (e(NUD_STALE, Some(mac.clone())), NeighVerdict::Resolved { mac: m, refresh: true }),
            (e(NUD_DELAY, Some(mac.clone())), NeighVerdict::Resolved { mac: m, refresh: false }),
            (e(NUD_PROBE, Some(mac.clone())), NeighVerdict::Resolved { mac: m, refresh: false }),
            (
                e(NUD_PERMANENT, Some(mac.clone())),
                NeighVerdict::Resolved { mac: m, refresh: false },
            ),
            (e(NUD_REACHABLE, None), NeighVerdict::Unusable),
            (e(NUD_REACHABLE, Some(vec![1, 2, 3, 4])), NeighVerdict::Unusable),
            (e(NUD_PERMANENT, Some(vec![0; 6])), NeighVerdict::Unusable),
            (e(NUD_INCOMPLETE, None), NeighVerdict::InProgress),
            (e(NUD_FAILED, None), NeighVerdict::Failed),
            (e(NUD_NOARP, Some(mac.clone())), NeighVerdict::Unusable),
        ];
        for (entry, want) in cases {
            assert_eq!(classify(entry.as_ref()), want, "{entry:?}");
        }
    }

    #[test]
    fn plan_table() {
        let eth0 = iface(2, "eth0");
        let eth1 = iface(3, "eth1");
        let mac = [2, 0, 0, 0, 0, 1];
        let via_gw = NotAdjacent::Gateway {
            backend: ip("10.9.0.1"),
            gateway: ip("10.0.0.254"),
            oif: eth0.clone(),
        };
        let lookups: BTreeMap<IpAddr, Lookup> = [
            (ip("10.0.0.1"), Lookup::Resolved { mac, egress: eth0.clone() }),
            (ip("fd00::1"), Lookup::Resolved { mac, egress: eth1.clone() }),
            (ip("10.0.0.2"), Lookup::Pending { egress: eth0.clone() }),
            (ip("10.0.0.3"), Lookup::Unreachable { egress: eth0.clone(), why: "FAILED".into() }),
            (ip("10.9.0.1"), Lookup::NotAdjacent { reason: via_gw.clone() }),
            // Looked up but no longer desired: ignored.
            (ip("10.0.0.9"), Lookup::Resolved { mac, egress: eth0.clone() }),
        ]
        .into_iter()
        .collect();
        struct Case<'a> {
            desired: Vec<&'a str>,
            program: Vec<(&'a str, &'a Iface)>,
            status: Vec<(&'a str, Status)>,
        }
        let (eth0, eth1) = (&eth0, &eth1);
        let cases = vec![
            Case { desired: vec![], program: vec![], status: vec![] },
            Case {
                desired: vec![
                    "10.0.0.1", "fd00::1", "10.0.0.2", "10.0.0.3", "10.9.0.1", "10.0.0.4",
                ],
                program: vec![("10.0.0.1", eth0), ("fd00::1", eth1)],
                status: vec![
                    ("10.0.0.1", Status::Resolved),
                    ("fd00::1", Status::Resolved),
                    ("10.0.0.2", Status::Pending),
                    ("10.0.0.3", Status::Unreachable("FAILED".into())),
                    ("10.9.0.1", Status::NotAdjacent(via_gw.clone())),
                    ("10.0.0.4", Status::Unknown),
                ],
            },
            // Duplicates count once.
            Case {
                desired: vec!["10.0.0.1", "10.0.0.1", "10.0.0.2"],
                program: vec![("10.0.0.1", eth0)],
                status: vec![("10.0.0.1", Status::Resolved), ("10.0.0.2", Status::Pending)],
            },
            // Nothing adjacent: nothing programmed, every reason kept.
            Case {
                desired: vec!["10.9.0.1", "10.0.0.3"],
                program: vec![],
                status: vec![
                    ("10.9.0.1", Status::NotAdjacent(via_gw.clone())),
                    ("10.0.0.3", Status::Unreachable("FAILED".into())),
                ],
            },
        ];
        for c in cases {
            let desired: Vec<IpAddr> = c.desired.iter().map(|s| ip(s)).collect();
            let got = plan(&desired, &lookups);
            let program: BTreeMap<IpAddr, Target> = c
                .program
                .into_iter()
                .map(|(a, e)| (ip(a), Target { mac, egress: e.clone() }))
                .collect();
            let status: BTreeMap<IpAddr, Status> =
                c.status.into_iter().map(|(a, s)| (ip(a), s)).collect();
            assert_eq!(got, Plan { program, status }, "{:?}", c.desired);
        }
    }
}
