//! (VIP, port, protocol) ownership across services.
//!
//! Each (VIP, port, protocol) belongs to the earliest valid DsrService that
//! claims it: earliest `creationTimestamp`, then namespace/name. Every later
//! claimant is in conflict and gets no backend set. The rule looks at claims
//! only, not at whether the winner is itself in conflict elsewhere, so a
//! service that is serving is never displaced by a change to another one;
//! deleting the winner hands the claim to the next in line.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube_dsr_crds::validation::{parse_ip, validate_spec};
use kube_dsr_crds::{DsrService, Protocol};

/// One (VIP, port, protocol) triple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    pub vip: IpAddr,
    pub port: i32,
    pub protocol: Protocol,
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.vip {
            IpAddr::V4(v) => write!(f, "{v}:{}/{}", self.port, self.protocol),
            IpAddr::V6(v) => write!(f, "[{v}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// A claim of this service that an earlier service holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub claim: Claim,
    /// `namespace/name` of the holder.
    pub holder: String,
}

/// The claims a service makes.
pub fn claims(svc: &DsrService) -> BTreeSet<Claim> {
    let mut out = BTreeSet::new();
    for vip in svc.spec.vips.iter().filter_map(|v| parse_ip(v)) {
        for p in &svc.spec.ports {
            out.insert(Claim { vip, port: p.port, protocol: p.protocol });
        }
    }
    out
}

fn key(svc: &DsrService) -> (Option<&Time>, String, String) {
    (svc.metadata.creation_timestamp.as_ref(), svc.namespace().unwrap_or_default(), svc.name_any())
}

/// Total order of precedence: earlier creation first (objects without a
/// timestamp, which the apiserver never returns, last), then namespace, name.
fn order(a: &DsrService, b: &DsrService) -> Ordering {
    let (ta, na, ma) = key(a);
    let (tb, nb, mb) = key(b);
    let by_time = match (ta, tb) {
        (Some(x), Some(y)) => x.0.cmp(&y.0),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    by_time.then_with(|| (na, ma).cmp(&(nb, mb)))
}

fn precedes(a: &DsrService, b: &DsrService) -> bool {
    order(a, b) == Ordering::Less
}

/// Claims of `svc` held by earlier services among `all` (which may include
/// `svc` itself). Invalid services claim nothing: they are not programmed.
/// Sorted by claim; each claim lists its single holder (the earliest).
pub fn conflicts_of(svc: &DsrService, all: &[&DsrService]) -> Vec<Conflict> {
    let mine = claims(svc);
    if mine.is_empty() {
        return Vec::new();
    }
    // Earlier, valid services that overlap at all, earliest first; each
    // contested claim goes to the first of them that makes it.
    let mut earlier: Vec<(&DsrService, BTreeSet<Claim>)> = all
        .iter()
        .copied()
        .filter(|o| !(o.namespace() == svc.namespace() && o.name_any() == svc.name_any()))
        .filter(|o| precedes(o, svc))
        .map(|o| (o, claims(o)))
        .filter(|(o, c)| !c.is_disjoint(&mine) && validate_spec(&o.spec).is_empty())
        .collect();
    earlier.sort_by(|(a, _), (b, _)| order(a, b));
    mine.iter()
        .filter_map(|claim| {
            earlier.iter().find(|(_, c)| c.contains(claim)).map(|(h, _)| Conflict {
                claim: *claim,
                holder: format!("{}/{}", h.namespace().unwrap_or_default(), h.name_any()),
            })
        })
        .collect()
}

/// Services in `all` that share at least one VIP with `svc` (excluding it):
/// the ones whose conflict state may change when `svc` changes or goes.
pub fn sharing_a_vip<'a>(svc: &DsrService, all: &[&'a DsrService]) -> Vec<&'a DsrService> {
    let vips: BTreeSet<IpAddr> = svc.spec.vips.iter().filter_map(|v| parse_ip(v)).collect();
    all.iter()
        .copied()
        .filter(|o| !(o.namespace() == svc.namespace() && o.name_any() == svc.name_any()))
        .filter(|o| o.spec.vips.iter().filter_map(|v| parse_ip(v)).any(|v| vips.contains(&v)))
        .collect()
}

/// One line for a status message or event.
pub fn describe(conflicts: &[Conflict]) -> String {
    let parts: Vec<String> =
        conflicts.iter().map(|c| format!("{} is held by {}", c.claim, c.holder)).collect();
    format!("{} (the earliest-created DsrService keeps a claim)", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kube_dsr_crds::ServicePort;

    #[test]
    fn later_service_conflicts_earlier_is_untouched() {
        let a = service("a", &["192.0.2.10"], 100);
        let b = service("b", &["192.0.2.10"], 200);
        let all = [&a, &b];
        assert_eq!(conflicts_of(&a, &all), vec![]);
        let c = conflicts_of(&b, &all);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].holder, "default/a");
        assert_eq!(c[0].claim.to_string(), "192.0.2.10:80/TCP");
    }

    #[test]
    fn deleting_the_holder_releases_the_claim() {
        let b = service("b", &["192.0.2.10"], 200);
        assert_eq!(conflicts_of(&b, &[&b]), vec![]);
    }

    #[test]
    fn same_timestamp_falls_back_to_namespace_and_name() {
        let a = service("alpha", &["192.0.2.10"], 100);
        let b = service("beta", &["192.0.2.10"], 100);
        assert!(conflicts_of(&a, &[&a, &b]).is_empty());
        assert_eq!(conflicts_of(&b, &[&a, &b])[0].holder, "default/alpha");
        let mut other_ns = service("alpha", &["192.0.2.10"], 100);
        other_ns.metadata.namespace = Some("aaa".into());
        assert_eq!(conflicts_of(&a, &[&a, &other_ns])[0].holder, "aaa/alpha");
    }

    #[test]
    fn different_port_or_protocol_on_one_vip_is_no_conflict() {
        let a = service("a", &["192.0.2.10"], 100);
        let mut b = service("b", &["192.0.2.10"], 200);
        b.spec.ports = vec![ServicePort { name: None, port: 443, protocol: Protocol::Tcp }];
        let mut c = service("c", &["192.0.2.10"], 300);
        c.spec.ports = vec![ServicePort { name: None, port: 80, protocol: Protocol::Udp }];
        let all = [&a, &b, &c];
        assert!(conflicts_of(&b, &all).is_empty());
        assert!(conflicts_of(&c, &all).is_empty());
        assert_eq!(sharing_a_vip(&a, &all).len(), 2);
    }

    #[test]
    fn only_overlapping_claims_are_reported_per_family() {
        let a = service("a", &["192.0.2.10"], 100);
        let b = service("b", &["192.0.2.10", "2001:db8::10"], 200);
        let c = conflicts_of(&b, &[&a, &b]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].claim.vip.to_string(), "192.0.2.10");
        let v6 = service("v6", &["2001:db8::10"], 300);
        assert_eq!(conflicts_of(&v6, &[&a, &b, &v6])[0].claim.to_string(), "[2001:db8::10]:80/TCP");
    }

    #[test]
    fn earliest_holder_is_named_when_several_precede() {
        let a = service("a", &["192.0.2.10"], 100);
        let b = service("b", &["192.0.2.10"], 200);
        let c = service("c", &["192.0.2.10"], 300);
        assert_eq!(conflicts_of(&c, &[&c, &b, &a])[0].holder, "default/a");
    }

    #[test]
    fn invalid_services_claim_nothing() {
        let mut a = service("a", &["192.0.2.10"], 100);
        a.spec.hashing.table_size = 1000;
        let b = service("b", &["192.0.2.10"], 200);
        assert!(conflicts_of(&b, &[&a, &b]).is_empty());
    }

    #[test]
    fn a_loser_elsewhere_still_holds_its_earlier_claims() {
        // a holds X; b (later) wants X and Y; c (latest) wants Y: b keeps Y.
        let a = service("a", &["192.0.2.10"], 100);
        let b = service("b", &["192.0.2.10", "2001:db8::10"], 200);
        let c = service("c", &["2001:db8::10"], 300);
        let all = [&a, &b, &c];
        assert_eq!(conflicts_of(&b, &all).len(), 1);
        assert_eq!(conflicts_of(&c, &all)[0].holder, "default/b");
        assert!(
            describe(&conflicts_of(&c, &all))
                .contains("[2001:db8::10]:80/TCP is held by default/b")
        );
    }
}
