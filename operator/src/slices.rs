//! Backend sets as EndpointSlices.
//!
//! EndpointSlice is the object kind Kubernetes already has for "addresses
//! behind a service", with ready/serving/terminating conditions, node names,
//! zones and pod references, chunking, and tooling (`kubectl get
//! endpointslices`) that every cluster operator knows. Without the
//! `kubernetes.io/service-name` label kube-proxy and other service proxies
//! ignore them; `endpointslice.kubernetes.io/managed-by` tells the
//! Kubernetes EndpointSlice controller they are not its own.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use kube_dsr_crds::DsrService;
use kube_dsr_crds::validation::Family;

use crate::backends::Backend;

pub use kube_dsr_crds::contract::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};
/// Upper bound of endpoints per slice (the Kubernetes controller's default).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn family_suffix(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

/// Name of a slice: `<service>-<v4|v6>-<index>`. Deterministic, so apply
/// patches update the same objects; DsrService names are at most 63
/// characters, so this stays a valid object name.
pub fn slice_name(service: &str, family: Family, index: usize) -> String {
    format!("{service}-{}-{index}", family_suffix(family))
}

fn endpoint(b: &Backend) -> Endpoint {
    Endpoint {
        addresses: vec![b.address.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(b.ready),
            serving: Some(b.serving),
            terminating: Some(b.terminating),
        }),
        node_name: b.node.clone(),
        zone: b.zone.clone(),
        target_ref: b.pod.as_ref().map(|p| ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some(p.namespace.clone()),
            name: Some(p.name.clone()),
            uid: Some(p.uid.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The slices for `svc`: per VIP family, the backends sorted by address in
/// chunks of at most [`MAX_ENDPOINTS_PER_SLICE`], each owned by the service
/// (so they are garbage-collected with it). A family without backends gets
/// one empty slice, so consumers can tell "no backends" from "not yet
/// processed", as with Kubernetes' own slices.
pub fn desired_slices(svc: &DsrService, backends: &[Backend]) -> Vec<EndpointSlice> {
    let name = svc.name_any();
    let families: BTreeSet<Family> = svc
        .spec
        .vips
        .iter()
        .filter_map(|v| kube_dsr_crds::validation::parse_ip(v))
        .map(|a| Family::of(&a))
        .collect();
    let ports: Vec<EndpointPort> = svc
        .spec
        .ports
        .iter()
        .map(|p| EndpointPort {
            name: Some(p.name.clone().unwrap_or_default()),
            port: Some(p.port),
            protocol: Some(p.protocol.as_str().into()),
            app_protocol: None,
        })
        .collect();
    let owner = svc.controller_owner_ref(&());
    let mut out = Vec::new();
    for family in families {
        let mut of_family: Vec<&Backend> =
            backends.iter().filter(|b| b.family() == family).collect();
        of_family.sort_by_key(|b| b.address);
        let chunks: Vec<&[&Backend]> = if of_family.is_empty() {
            vec![&[]]
        } else {
            of_family.chunks(MAX_ENDPOINTS_PER_SLICE).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(&name, family, i)),
                    namespace: svc.namespace(),
                    labels: Some(
                        [
                            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                            (SERVICE_NAME_LABEL.to_string(), name.clone()),
                        ]
                        .into(),
                    ),
                    owner_references: owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                address_type: family_name(family).into(),
                endpoints: chunk.iter().map(|b| endpoint(b)).collect(),
                ports: Some(ports.clone()),
            });
        }
    }
    out
}

/// What the operator keeps of one of its EndpointSlices as last seen: its
/// name, the metadata [`same_content`] compares, and a fingerprint of its
/// content instead of the content. At 1,000 services × 100 pods the cached
/// slices' endpoints were some 45 MiB the operator only ever compared with
/// what it would apply.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceSummary {
    pub name: String,
    labels: BTreeMap<String, String>,
    owner_references: Vec<OwnerReference>,
    content: Fingerprint,
}

impl From<&EndpointSlice> for SliceSummary {
    fn from(slice: &EndpointSlice) -> Self {
        SliceSummary {
            name: slice.name_any(),
            labels: slice.labels().clone(),
            owner_references: slice.owner_references().to_vec(),
            content: Fingerprint::of(slice),
        }
    }
}

/// 128 bits of keyed SipHash over a slice's address type, endpoints and
/// ports as JSON. Equal content gives equal JSON; unequal content (distinct
/// values of these types serialize differently) collides with odds of
/// 2^-128 per comparison, and the keys are random per process, so no
/// input can be crafted to collide. Fingerprints are only compared within
/// one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint(u64, u64);

impl Fingerprint {
    fn of(slice: &EndpointSlice) -> Self {
        use std::hash::{BuildHasher, Hasher};
        static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
        let (a, b) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
        struct Both<H>(H, H);
        impl<H: Hasher> std::io::Write for Both<H> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.write(buf);
                self.1.write(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut h = Both(a.build_hasher(), b.build_hasher());
        // Writing into a hasher cannot fail, nor can serializing these
        // types (string keys only).
        serde_json::to_writer(&mut h, &(&slice.address_type, &slice.endpoints, &slice.ports))
            .expect("EndpointSlice content serializes");
        Fingerprint(h.0.finish(), h.1.finish())
    }
}

/// Names among `existing` (this service's slices) that `desired` no longer has.
pub fn stale_slices<'a>(existing: &'a [SliceSummary], desired: &[EndpointSlice]) -> Vec<&'a str> {
    let keep: BTreeSet<&str> = desired.iter().filter_map(|s| s.metadata.name.as_deref()).collect();
    existing.iter().map(|s| s.name.as_str()).filter(|n| !keep.contains(n)).collect()
}

/// Whether an existing slice already has the content we would apply (so the
/// apply can be skipped and the controller does not wake itself).
pub fn same_content(existing: &SliceSummary, desired: &EndpointSlice) -> bool {
    existing.name == desired.name_any()
        && existing.content == Fingerprint::of(desired)
        && subset(&desired.metadata.labels, &existing.labels)
        && desired
            .metadata
            .owner_references
            .iter()
            .flatten()
            .all(|o| existing.owner_references.iter().any(|e| e == o))
}

/// Labels others add to our slices are theirs to keep; only ours must match.
fn subset(ours: &Option<BTreeMap<String, String>>, theirs: &BTreeMap<String, String>) -> bool {
    ours.iter().flatten().all(|(k, v)| theirs.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::PodRef;
    use crate::testutil::*;
    use std::net::IpAddr;

    fn backend(addr: &str, ready: bool) -> Backend {
        let address: IpAddr = addr.parse().unwrap();
        let vip = if address.is_ipv4() { "192.0.2.10" } else { "2001:db8::10" };
        Backend {
            address,
            vip: vip.parse().unwrap(),
            node: Some("n1".into()),
            zone: Some("z1".into()),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: format!("p-{addr}"),
                uid: format!("u-{addr}"),
            }),
            ready,
            serving: ready,
            terminating: false,
            not_serving: (!ready).then(|| "pod not Ready".into()),
        }
    }

    #[test]
    fn labels_owner_ports_and_endpoint_fields() {
        let svc = service("web", &["192.0.2.10"], 1);
        let slices = desired_slices(&svc, &[backend("10.0.0.2", false), backend("10.0.0.1", true)]);
        assert_eq!(slices.len(), 1);
        let s = &slices[0];
        assert_eq!(s.metadata.name.as_deref(), Some("web-v4-0"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get(MANAGED_BY_LABEL).map(String::as_str), Some("kubedsr.io"));
        assert_eq!(labels.get(SERVICE_NAME_LABEL).map(String::as_str), Some("web"));
        assert!(!labels.contains_key("kubernetes.io/service-name"), "kube-proxy must ignore it");
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("DsrService", "web", Some(true))
        );
        assert_eq!(s.address_type, "IPv4");
        let port = &s.ports.as_ref().unwrap()[0];
        assert_eq!((port.port, port.protocol.as_deref()), (Some(80), Some("TCP")));
        let addrs: Vec<&str> = s.endpoints.iter().map(|e| e.addresses[0].as_str()).collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.2"]);
        let e = &s.endpoints[0];
        assert_eq!(e.conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert_eq!(e.zone.as_deref(), Some("z1"));
        assert_eq!(e.target_ref.as_ref().unwrap().uid.as_deref(), Some("u-10.0.0.1"));
        assert_eq!(s.endpoints[1].conditions.as_ref().unwrap().ready, Some(false));
    }

    #[test]
    fn chunks_at_100_per_family() {
        let svc = service("web", &["192.0.2.10", "2001:db8::10"], 1);
        let mut bs: Vec<Backend> =
            (0..250).map(|i| backend(&format!("10.0.{}.{}", i / 200, i % 200 + 1), true)).collect();
        bs.extend((1..=3).map(|i| backend(&format!("fd00::{i}"), true)));
        let slices = desired_slices(&svc, &bs);
        let shape: Vec<(String, &str, usize)> = slices
            .iter()
            .map(|s| (s.metadata.name.clone().unwrap(), s.address_type.as_str(), s.endpoints.len()))
            .collect();
        assert_eq!(
            shape,
            [
                ("web-v4-0".into(), "IPv4", 100),
                ("web-v4-1".into(), "IPv4", 100),
                ("web-v4-2".into(), "IPv4", 50),
                ("web-v6-0".into(), "IPv6", 3),
            ]
        );
        // Every backend appears exactly once.
        let total: usize = slices.iter().map(|s| s.endpoints.len()).sum();
        assert_eq!(total, 253);
    }

    #[test]
    fn a_family_without_backends_gets_one_empty_slice() {
        let svc = service("web", &["192.0.2.10", "2001:db8::10"], 1);
        let slices = desired_slices(&svc, &[backend("10.0.0.1", true)]);
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[1].metadata.name.as_deref(), Some("web-v6-0"));
        assert!(slices[1].endpoints.is_empty());
    }

    #[test]
    fn static_backends_have_no_node_or_target() {
        let svc = service("ext", &["192.0.2.10"], 1);
        let mut b = backend("192.0.2.21", true);
        b.node = None;
        b.zone = None;
        b.pod = None;
        let e = &desired_slices(&svc, &[b])[0].endpoints[0];
        assert!(e.node_name.is_none() && e.target_ref.is_none());
    }

    #[test]
    fn scale_down_leaves_stale_slices_to_delete() {
        let svc = service("web", &["192.0.2.10"], 1);
        let big: Vec<Backend> = (1..=150).map(|i| backend(&format!("10.0.0.{i}"), true)).collect();
        let before = desired_slices(&svc, &big);
        let after = desired_slices(&svc, &big[..10]);
        let seen = |slices: &[EndpointSlice]| -> Vec<SliceSummary> {
            slices.iter().map(SliceSummary::from).collect()
        };
        assert_eq!(stale_slices(&seen(&before), &after), ["web-v4-1"]);
        assert!(stale_slices(&seen(&after), &after).is_empty());
        assert!(same_content(&SliceSummary::from(&after[0]), &after[0]));
        assert!(!same_content(&SliceSummary::from(&before[0]), &after[0]));
    }

    #[test]
    fn same_content_tells_each_difference_apart() {
        let svc = service("web", &["192.0.2.10"], 1);
        let desired = desired_slices(&svc, &[backend("10.0.0.1", true)]).remove(0);
        let seen = SliceSummary::from(&desired);
        assert!(same_content(&seen, &desired));
        // Labels others add are theirs to keep.
        let mut labelled = desired.clone();
        labelled.labels_mut().insert("team".into(), "a".into());
        assert!(same_content(&SliceSummary::from(&labelled), &desired));
        let changes: [fn(&mut EndpointSlice); 5] = [
            |s| s.endpoints[0].conditions.as_mut().unwrap().ready = Some(false),
            |s| s.endpoints[0].zone = None,
            |s| s.ports.as_mut().unwrap()[0].port = Some(81),
            |s| s.address_type = "IPv6".into(),
            |s| s.metadata.owner_references = None,
        ];
        for change in changes {
            let mut other = desired.clone();
            change(&mut other);
            assert!(!same_content(&SliceSummary::from(&other), &desired), "{other:?}");
        }
        let mut renamed = desired.clone();
        renamed.metadata.name = Some("web-v4-1".into());
        assert!(!same_content(&SliceSummary::from(&renamed), &desired));
    }
}
