//! (VIP, port, protocol) ownership across services.
//!
//! Each (VIP, port, protocol) belongs to the earliest valid DsrService that
//! claims it: earliest `creationTimestamp`, then namespace/name. Every later
//! claimant is in conflict and gets no backend set. The rule looks at claims
//! only, not at whether the winner is itself in conflict elsewhere, so a
//! service that is serving is never displaced by a change to another one;
//! deleting the winner hands the claim to the next in line.
//!
//! A service that takes its VIP as a Kubernetes LoadBalancer IP (one that
//! serves a `Service`, or was given its address by a pool) holds the whole
//! VIP, as a load-balancer IP does in Kubernetes: another service on that
//! VIP conflicts with it even on other ports, unless both carry the same
//! `kubedsr.io/allow-shared-ip` key (and then only colliding ports do).
//! Hand-written DsrServices with written VIPs keep sharing a VIP freely on
//! distinct ports.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube_dsr_crds::validation::{parse_ip, validate_spec};
use kube_dsr_crds::{ALLOW_SHARED_IP_ANNOTATION, DsrService, Protocol};

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
    for vip in svc.effective_vips().into_iter().filter_map(parse_ip) {
        for p in &svc.spec.ports {
            out.insert(Claim { vip, port: p.port, protocol: p.protocol });
        }
    }
    out
}

/// The `kubedsr.io/allow-shared-ip` key, when set and not empty.
pub fn sharing_key(svc: &DsrService) -> Option<&str> {
    svc.annotations().get(ALLOW_SHARED_IP_ANNOTATION).map(String::as_str).filter(|k| !k.is_empty())
}

/// Holds its VIPs whole: serves a `Service` or got its VIPs from a pool.
pub fn holds_whole_vip(svc: &DsrService) -> bool {
    svc.owner_references().iter().any(|o| o.kind == "Service" && o.api_version == "v1")
        || (svc.spec.vips.is_empty()
            && svc.status.as_ref().is_some_and(|s| !s.allocated_vips.is_empty()))
}

/// Whether `a` and `b` may both use one VIP at all (their ports are
/// compared separately).
pub fn may_share_vip(a: &DsrService, b: &DsrService) -> bool {
    if !(holds_whole_vip(a) || holds_whole_vip(b)) {
        return true;
    }
    matches!((sharing_key(a), sharing_key(b)), (Some(x), Some(y)) if x == y)
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
    // A service that may not share a VIP with `svc` contests every port
    // of `svc` on the VIPs they have in common.
    let my_vips: BTreeSet<IpAddr> = mine.iter().map(|c| c.vip).collect();
    let mut earlier: Vec<(&DsrService, BTreeSet<Claim>, BTreeSet<IpAddr>)> = all
        .iter()
        .copied()
        .filter(|o| !(o.namespace() == svc.namespace() && o.name_any() == svc.name_any()))
        .filter(|o| precedes(o, svc))
        .map(|o| {
            let c = claims(o);
            let whole = if may_share_vip(o, svc) {
                BTreeSet::new()
            } else {
                c.iter().map(|c| c.vip).filter(|v| my_vips.contains(v)).collect()
            };
            (o, c, whole)
        })
        .filter(|(o, c, w)| {
            (!c.is_disjoint(&mine) || !w.is_empty()) && validate_spec(&o.spec).is_empty()
        })
        .collect();
    earlier.sort_by(|(a, _, _), (b, _, _)| order(a, b));
    mine.iter()
        .filter_map(|claim| {
            earlier.iter().find(|(_, c, w)| c.contains(claim) || w.contains(&claim.vip)).map(
                |(h, _, _)| Conflict {
                    claim: *claim,
                    holder: format!("{}/{}", h.namespace().unwrap_or_default(), h.name_any()),
                },
            )
        })
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

    fn serving_a_service(mut s: DsrService, key: Option<&str>) -> DsrService {
        s.metadata.owner_references =
            Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: s.name_any(),
                uid: format!("uid-{}", s.name_any()),
                controller: Some(true),
                ..Default::default()
            }]);
        if let Some(k) = key {
            s.metadata.annotations =
                Some([(ALLOW_SHARED_IP_ANNOTATION.to_string(), k.to_string())].into());
        }
        s
    }

    #[test]
    fn a_load_balancer_ip_is_shared_only_by_key_and_then_only_on_free_ports() {
        let tcp = serving_a_service(service("dns-tcp", &["192.0.2.53"], 100), Some("dns"));
        let mut udp = serving_a_service(service("dns-udp", &["192.0.2.53"], 200), Some("dns"));
        udp.spec.ports = vec![ServicePort { name: None, port: 80, protocol: Protocol::Udp }];
        assert!(conflicts_of(&udp, &[&tcp, &udp]).is_empty(), "same key, other protocol");

        let mut same_port = serving_a_service(service("web2", &["192.0.2.53"], 300), Some("dns"));
        same_port.spec.ports.push(ServicePort { name: None, port: 443, protocol: Protocol::Tcp });
        let c = conflicts_of(&same_port, &[&tcp, &udp, &same_port]);
        assert_eq!(c.len(), 1, "only the colliding port: {c:?}");
        assert_eq!(c[0].claim.to_string(), "192.0.2.53:80/TCP");

        let unkeyed = serving_a_service(service("other", &["192.0.2.53"], 200), None);
        let mut unkeyed = unkeyed;
        unkeyed.spec.ports = vec![ServicePort { name: None, port: 80, protocol: Protocol::Udp }];
        let c = conflicts_of(&unkeyed, &[&tcp, &unkeyed]);
        assert_eq!(c.len(), 1, "no key: the whole VIP is taken");
        assert_eq!(c[0].holder, "default/dns-tcp");
        let other_key = serving_a_service(unkeyed.clone(), Some("other"));
        assert_eq!(conflicts_of(&other_key, &[&tcp, &other_key]).len(), 1, "keys differ");

        // A hand-written DsrService next to a Service's VIP is held to the
        // Service's rule as well.
        let mut plain = service("plain", &["192.0.2.53"], 400);
        plain.spec.ports = vec![ServicePort { name: None, port: 8080, protocol: Protocol::Tcp }];
        assert_eq!(conflicts_of(&plain, &[&tcp, &plain]).len(), 1);
        assert!(conflicts_of(&tcp, &[&tcp, &plain]).is_empty(), "the earlier one keeps it");
    }

    #[test]
    fn pool_addresses_count_as_vips() {
        let mut a = service("a", &[], 100);
        a.status = Some(kube_dsr_crds::DsrServiceStatus {
            allocated_vips: vec![kube_dsr_crds::AllocatedVip {
                address: "192.0.2.77".into(),
                pool: "p".into(),
            }],
            ..Default::default()
        });
        let b = service("b", &["192.0.2.77"], 200);
        let mut b2 = b.clone();
        b2.spec.ports = vec![ServicePort { name: None, port: 81, protocol: Protocol::Tcp }];
        assert_eq!(conflicts_of(&b2, &[&a, &b2]).len(), 1, "a pool address is held whole");
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
