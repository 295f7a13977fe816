//! What each namespace should hold, what it holds, and the steps between:
//! pure functions over plain values.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

/// A backend pod on this node and the VIPs it must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub uid: String,
    pub host_network: bool,
    pub vips: BTreeSet<IpAddr>,
}

/// The namespace a backend lives in. Every hostNetwork pod shares `Host`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Host,
    Pod(String),
}

impl Backend {
    pub fn target(&self) -> Target {
        if self.host_network { Target::Host } else { Target::Pod(self.uid.to_ascii_lowercase()) }
    }
}

/// An address read back from `lo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoAddress {
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Carries kube-dsr's mark (IPv4 label, IPv6 `IFA_PROTO`).
    pub ours: bool,
}

/// `net.ipv4.conf.{all,lo}.arp_{ignore,announce}` as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpSysctls {
    pub all_ignore: u32,
    pub all_announce: u32,
    pub lo_ignore: u32,
    pub lo_announce: u32,
}

/// Values for which a backend never answers ARP for, nor sources ARP from,
/// an address on `lo`: `arp_ignore` 1 or 2 (reply only for addresses on
/// the receiving interface; 2 also checks the sender's subnet),
/// `arp_announce` 2. A stricter `arp_ignore=2` someone chose is kept.
fn ignore_ok(v: u32) -> bool {
    matches!(v, 1 | 2)
}
pub const ARP_IGNORE: u32 = 1;
pub const ARP_ANNOUNCE: u32 = 2;

impl ArpSysctls {
    pub fn ok(&self) -> bool {
        self.writes().is_empty()
    }

    /// The writes that would make these right, and only those.
    pub fn writes(&self) -> Vec<SysctlWrite> {
        let mut w = Vec::new();
        for (dev, ignore, announce) in
            [("all", self.all_ignore, self.all_announce), ("lo", self.lo_ignore, self.lo_announce)]
        {
            if !ignore_ok(ignore) {
                w.push(SysctlWrite { dev, key: "arp_ignore", value: ARP_IGNORE });
            }
            if announce != ARP_ANNOUNCE {
                w.push(SysctlWrite { dev, key: "arp_announce", value: ARP_ANNOUNCE });
            }
        }
        w
    }
}

/// `net/ipv4/conf/<dev>/<key> = value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysctlWrite {
    pub dev: &'static str,
    pub key: &'static str,
    pub value: u32,
}

/// What one namespace holds, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub lo_up: bool,
    pub addrs: Vec<LoAddress>,
    pub arp: ArpSysctls,
}

impl Observed {
    /// `vip` is on `lo` as a host address, ours or not.
    pub fn has_vip(&self, vip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.addr == vip && a.prefix_len == full_prefix(vip))
    }

    fn ours(&self) -> BTreeSet<IpAddr> {
        self.addrs
            .iter()
            .filter(|a| a.ours && a.prefix_len == full_prefix(a.addr))
            .map(|a| a.addr)
            .collect()
    }

    /// Whether `vip` is ready to receive DSR traffic here: on an `lo` that
    /// is up and, for IPv4, with the ARP sysctls right (IPv6 neighbour
    /// discovery only answers for addresses of the receiving interface, so
    /// an address on `lo` is never advertised on `eth0`).
    pub fn configured(&self, vip: IpAddr) -> bool {
        self.lo_up && self.has_vip(vip) && (vip.is_ipv6() || self.arp.ok())
    }
}

fn full_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The steps for one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsPlan {
    pub target: Target,
    /// Wanted and missing: add with our mark.
    pub add: Vec<IpAddr>,
    /// Ours and no longer wanted: remove (addresses without our mark are
    /// never listed, even when they hold a VIP).
    pub remove: Vec<IpAddr>,
    /// Wanted and already there (ours or someone else's): read back only.
    pub verify: Vec<IpAddr>,
    /// ARP sysctls to write (only while the namespace must hold an IPv4 VIP;
    /// never reverted, see `DESIGN-NOTE.md`).
    pub sysctls: Vec<SysctlWrite>,
}

impl NsPlan {
    /// Nothing to change.
    pub fn is_noop(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.sysctls.is_empty()
    }
}

/// The VIPs each namespace must hold (hostNetwork pods pooled into `Host`).
pub fn desired(backends: &[Backend]) -> BTreeMap<Target, BTreeSet<IpAddr>> {
    let mut d: BTreeMap<Target, BTreeSet<IpAddr>> = BTreeMap::new();
    for b in backends {
        d.entry(b.target()).or_default().extend(b.vips.iter().copied());
    }
    d
}

/// The steps from `observed` to `desired`, for every namespace in either
/// (sorted by target; namespaces with nothing to do are included, their
/// `verify` lists what to report). A desired namespace that could not be
/// observed is left out: nothing is done blind.
pub fn plan(
    desired: &BTreeMap<Target, BTreeSet<IpAddr>>,
    observed: &BTreeMap<Target, Observed>,
) -> Vec<NsPlan> {
    let empty = BTreeSet::new();
    observed
        .iter()
        .map(|(target, obs)| {
            let want = desired.get(target).unwrap_or(&empty);
            let ours = obs.ours();
            let add = want.iter().copied().filter(|v| !obs.has_vip(*v)).collect();
            let verify = want.iter().copied().filter(|v| obs.has_vip(*v)).collect();
            let remove = ours.difference(want).copied().collect();
            let sysctls =
                if want.iter().any(IpAddr::is_ipv4) { obs.arp.writes() } else { Vec::new() };
            NsPlan { target: target.clone(), add, remove, verify, sysctls }
        })
        .collect()
}

/// Per backend and VIP, whether it is configured (for the node report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipReport {
    pub uid: String,
    pub vip: IpAddr,
    pub configured: bool,
}

/// The report from what was read back: a backend whose namespace was not
/// observed (not found, or unreadable) is not configured.
pub fn report(backends: &[Backend], observed: &BTreeMap<Target, Observed>) -> Vec<VipReport> {
    let mut out = Vec::new();
    for b in backends {
        let obs = observed.get(&b.target());
        for &vip in &b.vips {
            out.push(VipReport {
                uid: b.uid.clone(),
                vip,
                configured: obs.is_some_and(|o| o.configured(vip)),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: ArpSysctls =
        ArpSysctls { all_ignore: 1, all_announce: 2, lo_ignore: 1, lo_announce: 2 };
    const DEFAULT: ArpSysctls =
        ArpSysctls { all_ignore: 0, all_announce: 0, lo_ignore: 0, lo_announce: 0 };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn vips(v: &[&str]) -> BTreeSet<IpAddr> {
        v.iter().map(|s| ip(s)).collect()
    }
    fn pod(uid: &str, host: bool, v: &[&str]) -> Backend {
        Backend { uid: uid.into(), host_network: host, vips: vips(v) }
    }
    fn addr(s: &str, prefix_len: u8, ours: bool) -> LoAddress {
        LoAddress { addr: ip(s), prefix_len, ours }
    }
    fn obs(addrs: Vec<LoAddress>, arp: ArpSysctls) -> Observed {
        Observed { lo_up: true, addrs, arp }
    }
    fn loopback() -> Vec<LoAddress> {
        vec![addr("127.0.0.1", 8, false), addr("::1", 128, false)]
    }
    fn p(s: &str) -> Target {
        Target::Pod(s.into())
    }

    #[test]
    fn desired_pools_host_network_pods() {
        let d = desired(&[
            pod("A", false, &["192.0.2.10"]),
            pod("h1", true, &["192.0.2.10"]),
            pod("h2", true, &["192.0.2.11", "2001:db8::11"]),
            pod("b", false, &[]),
        ]);
        assert_eq!(d[&p("a")], vips(&["192.0.2.10"]), "UIDs are lower-cased");
        assert_eq!(d[&Target::Host], vips(&["192.0.2.10", "192.0.2.11", "2001:db8::11"]));
        assert!(d[&p("b")].is_empty());
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn sysctl_writes() {
        assert!(GOOD.writes().is_empty());
        assert_eq!(DEFAULT.writes().len(), 4);
        // A stricter arp_ignore is kept; a wrong announce on lo only is fixed there only.
        let s = ArpSysctls { all_ignore: 2, all_announce: 2, lo_ignore: 8, lo_announce: 1 };
        assert_eq!(
            s.writes(),
            [
                SysctlWrite { dev: "lo", key: "arp_ignore", value: 1 },
                SysctlWrite { dev: "lo", key: "arp_announce", value: 2 }
            ]
        );
    }

    #[test]
    fn plans() {
        struct Case {
            name: &'static str,
            want: &'static [&'static str],
            have: Vec<LoAddress>,
            arp: ArpSysctls,
            add: &'static [&'static str],
            remove: &'static [&'static str],
            verify: &'static [&'static str],
            sysctls: usize,
        }
        let cases = [
            Case {
                name: "fresh pod, both families",
                want: &["192.0.2.10", "2001:db8::10"],
                have: loopback(),
                arp: DEFAULT,
                add: &["192.0.2.10", "2001:db8::10"],
                remove: &[],
                verify: &[],
                sysctls: 4,
            },
            Case {
                name: "converged",
                want: &["192.0.2.10", "2001:db8::10"],
                have: [
                    loopback(),
                    vec![addr("192.0.2.10", 32, true), addr("2001:db8::10", 128, true)],
                ]
                .concat(),
                arp: GOOD,
                add: &[],
                remove: &[],
                verify: &["192.0.2.10", "2001:db8::10"],
                sysctls: 0,
            },
            Case {
                name: "IPv6 only: ARP sysctls untouched",
                want: &["2001:db8::10"],
                have: loopback(),
                arp: DEFAULT,
                add: &["2001:db8::10"],
                remove: &[],
                verify: &[],
                sysctls: 0,
            },
            Case {
                name: "someone else's copy of the VIP counts, is not added again",
                want: &["192.0.2.10"],
                have: [loopback(), vec![addr("192.0.2.10", 32, false)]].concat(),
                arp: GOOD,
                add: &[],
                remove: &[],
                verify: &["192.0.2.10"],
                sysctls: 0,
            },
            Case {
                name: "the VIP inside a wider prefix is not a host address: add ours",
                want: &["192.0.2.10"],
                have: [loopback(), vec![addr("192.0.2.10", 24, false)]].concat(),
                arp: GOOD,
                add: &["192.0.2.10"],
                remove: &[],
                verify: &[],
                sysctls: 0,
            },
            Case {
                name: "VIP no longer wanted: remove ours only",
                want: &["192.0.2.10"],
                have: [
                    loopback(),
                    vec![
                        addr("192.0.2.10", 32, true),
                        addr("192.0.2.11", 32, true),
                        addr("192.0.2.12", 32, false),
                        addr("2001:db8::11", 128, true),
                        addr("2001:db8::12", 128, false),
                    ],
                ]
                .concat(),
                arp: GOOD,
                add: &[],
                remove: &["192.0.2.11", "2001:db8::11"],
                verify: &["192.0.2.10"],
                sysctls: 0,
            },
            Case {
                name: "no longer a backend: undo everything of ours, sysctls left",
                want: &[],
                have: [
                    loopback(),
                    vec![addr("192.0.2.10", 32, true), addr("192.0.2.99", 32, false)],
                ]
                .concat(),
                arp: GOOD,
                add: &[],
                remove: &["192.0.2.10"],
                verify: &[],
                sysctls: 0,
            },
        ];
        for c in cases {
            let desired = BTreeMap::from([(p("u"), vips(c.want))]);
            let observed = BTreeMap::from([(p("u"), obs(c.have, c.arp))]);
            let plans = plan(&desired, &observed);
            assert_eq!(plans.len(), 1, "{}", c.name);
            let pl = &plans[0];
            assert_eq!(pl.add, vips(c.add).into_iter().collect::<Vec<_>>(), "add: {}", c.name);
            assert_eq!(
                pl.remove,
                vips(c.remove).into_iter().collect::<Vec<_>>(),
                "remove: {}",
                c.name
            );
            assert_eq!(
                pl.verify,
                vips(c.verify).into_iter().collect::<Vec<_>>(),
                "verify: {}",
                c.name
            );
            assert_eq!(pl.sysctls.len(), c.sysctls, "sysctls: {}", c.name);
        }
    }

    #[test]
    fn plan_covers_observed_namespaces_only() {
        let desired =
            desired(&[pod("a", false, &["192.0.2.10"]), pod("b", false, &["192.0.2.10"])]);
        let observed = BTreeMap::from([
            (p("a"), obs(loopback(), GOOD)),
            // A pod that stopped being a backend but is still observed.
            (p("gone"), obs([loopback(), vec![addr("192.0.2.10", 32, true)]].concat(), GOOD)),
        ]);
        let plans = plan(&desired, &observed);
        let targets: Vec<_> = plans.iter().map(|x| x.target.clone()).collect();
        assert_eq!(targets, [p("a"), p("gone")], "b was not observed: nothing done blind");
        assert_eq!(plans[0].add, [ip("192.0.2.10")]);
        assert_eq!(plans[1].remove, [ip("192.0.2.10")]);
        assert!(plans.iter().all(|x| !x.is_noop()));
    }

    #[test]
    fn reports() {
        let backends = [
            pod("a", false, &["192.0.2.10", "2001:db8::10"]),
            pod("b", false, &["192.0.2.10"]),
            pod("c", false, &["192.0.2.10"]),
            pod("d", false, &["192.0.2.10"]),
            pod("h", true, &["2001:db8::10"]),
        ];
        let both =
            [loopback(), vec![addr("192.0.2.10", 32, true), addr("2001:db8::10", 128, true)]]
                .concat();
        let observed = BTreeMap::from([
            (p("a"), obs(both.clone(), DEFAULT)),
            (p("b"), obs(both.clone(), GOOD)),
            (p("c"), Observed { lo_up: false, addrs: both.clone(), arp: GOOD }),
            (Target::Host, obs(both, DEFAULT)),
        ]);
        let got: Vec<(String, String, bool)> = report(&backends, &observed)
            .into_iter()
            .map(|r| (r.uid, r.vip.to_string(), r.configured))
            .collect();
        let want = [
            ("a", "192.0.2.10", false),  // ARP sysctls wrong
            ("a", "2001:db8::10", true), // IPv6 needs no ARP sysctls
            ("b", "192.0.2.10", true),
            ("c", "192.0.2.10", false), // lo down
            ("d", "192.0.2.10", false), // namespace not observed
            ("h", "2001:db8::10", true),
        ];
        let want: Vec<(String, String, bool)> =
            want.iter().map(|(u, v, c)| (u.to_string(), v.to_string(), *c)).collect();
        assert_eq!(got, want);
    }
}
