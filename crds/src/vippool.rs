//! `DsrVipPool`: addresses the operator may give to services that do not
//! name their VIPs (a `Service` of class `kubedsr.io/dsr` without a
//! requested IP, or a `DsrService` with empty `vips`). Cluster-scoped: a
//! platform team owns the address plan, application teams only consume it.

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::dsrservice::IpFamily;
use crate::messages;

/// Upper bound on `spec.addresses`.
pub const MAX_BLOCKS: usize = 64;

/// A pool of VIPs.
// Several printer columns share a `type_`: that is not a duplicated
// attribute, whatever the lint infers from the multi-line layout.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubedsr.io",
    version = "v1alpha1",
    kind = "DsrVipPool",
    plural = "dsrvippools",
    shortname = "dsrpool",
    category = "kubedsr",
    status = "DsrVipPoolStatus",
    derive = "PartialEq",
    doc = "Addresses kube-dsr may assign as VIPs to services that do not request one.",
    printcolumn(
        json_path = ".spec.autoAssign",
        name = "Auto",
        type_ = "boolean",
        description = "Given to services that do not name this pool"
    ),
    printcolumn(
        json_path = ".status.size",
        name = "Size",
        type_ = "string",
        description = "Addresses in the pool"
    ),
    printcolumn(
        json_path = ".status.used",
        name = "Used",
        type_ = "integer",
        description = "Addresses assigned to services"
    ),
    printcolumn(
        json_path = ".status.free",
        name = "Free",
        type_ = "string",
        description = "Addresses still free"
    ),
    printcolumn(json_path = ".metadata.creationTimestamp", name = "Age", type_ = "date")
)]
#[serde(rename_all = "camelCase")]
pub struct DsrVipPoolSpec {
    /// Address blocks: CIDRs (`192.0.2.0/24`, `2001:db8:1::/120`), single
    /// addresses, or ranges `first-last` of one family. IPv4 and IPv6 may
    /// be mixed; blocks must not overlap.
    #[schemars(length(min = 1, max = 64), inner(length(max = 90)))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(a, isCIDR(a) || isIP(a) || a.matches('^[0-9a-fA-F.:]+-[0-9a-fA-F.:]+$'))").message(messages::POOL_ADDRESS_INVALID),
    )]
    pub addresses: Vec<String>,

    /// When true (default), services that do not name a pool (annotation
    /// `kubedsr.io/address-pool`) may be given addresses from this one.
    /// When false, only services naming it are.
    #[serde(default = "default_true")]
    pub auto_assign: bool,

    /// Skip the first and last address of each IPv4 CIDR block (network
    /// and broadcast; blocks of /31 and /32 are used whole) and the first
    /// address of each IPv6 CIDR block (the subnet-router anycast address).
    /// For routers and clients that mishandle such addresses; ranges are
    /// used as written.
    #[serde(default)]
    pub skip_network_and_broadcast: bool,

    /// Only services in namespaces whose labels match may get addresses
    /// from this pool. Absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Only services whose labels match may get addresses from this pool
    /// (a `Service`'s labels are copied to the `DsrService` that serves
    /// it). Absent: every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
}

fn default_true() -> bool {
    true
}

/// Observed state, written by `dsr-operator`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DsrVipPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of usable addresses (decimal; an IPv6 block can exceed 64 bits).
    #[serde(default)]
    pub size: String,
    /// Addresses of this pool assigned to services.
    #[serde(default)]
    pub used: i64,
    /// `size - used`, decimal.
    #[serde(default)]
    pub free: String,
    /// `Valid`, `Exhausted` and `AddressesOutsidePool`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Condition types and reasons of a pool.
pub mod conditions {
    pub const VALID: &str = "Valid";
    pub const EXHAUSTED: &str = "Exhausted";
    pub const OUTSIDE: &str = "AddressesOutsidePool";
}

/// Why a pool's `addresses` are refused (each names the block as written).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("addresses must have 1 to {MAX_BLOCKS} items")]
    Count,
    #[error("{0:?}: {msg}", msg = messages::POOL_ADDRESS_INVALID)]
    Invalid(String),
    #[error("{0:?}: address has bits set after the prefix length")]
    HostBits(String),
    #[error("{0:?}: a range must not mix IPv4 and IPv6")]
    MixedFamilies(String),
    #[error("{0:?}: the first address comes after the last")]
    Reversed(String),
    #[error("{0:?} overlaps another block of this pool")]
    Overlaps(String),
}

/// One parsed block: every address from `first` to `last`, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub family: IpFamily,
    first: u128,
    last: u128,
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(family: IpFamily, n: u128) -> IpAddr {
    match family {
        IpFamily::IPv4 => IpAddr::V4((n as u32).into()),
        IpFamily::IPv6 => IpAddr::V6(n.into()),
    }
}

impl Block {
    /// Parses `a.b.c.d/n`, an address, or `first-last`. With `skip`, CIDR
    /// blocks lose their network (and, IPv4, broadcast) address.
    pub fn parse(text: &str, skip: bool) -> Result<Block, BlockError> {
        let text = text.trim();
        let bad = || BlockError::Invalid(text.to_string());
        if let Some((addr, len)) = text.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let len: u32 = len.parse().map_err(|_| bad())?;
            let family = IpFamily::of(&addr);
            let bits = if family == IpFamily::IPv4 { 32 } else { 128 };
            if len > bits {
                return Err(bad());
            }
            let host_bits = bits - len;
            let mask: u128 = if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            let n = to_u128(addr);
            if n & mask != 0 {
                return Err(BlockError::HostBits(text.to_string()));
            }
            let (mut first, mut last) = (n, n | mask);
            if skip {
                match family {
                    IpFamily::IPv4 if len < 31 => {
                        first += 1;
                        last -= 1;
                    }
                    IpFamily::IPv6 if len < 127 => first += 1,
                    _ => {}
                }
            }
            return Ok(Block { family, first, last });
        }
        let (a, b) = match text.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (text, text),
        };
        let a: IpAddr = a.parse().map_err(|_| bad())?;
        let b: IpAddr = b.parse().map_err(|_| bad())?;
        if a.is_ipv4() != b.is_ipv4() {
            return Err(BlockError::MixedFamilies(text.to_string()));
        }
        let (first, last) = (to_u128(a), to_u128(b));
        if first > last {
            return Err(BlockError::Reversed(text.to_string()));
        }
        Ok(Block { family: IpFamily::of(&a), first, last })
    }

    pub fn contains(&self, a: &IpAddr) -> bool {
        IpFamily::of(a) == self.family && (self.first..=self.last).contains(&to_u128(*a))
    }

    /// Number of addresses (saturating for a whole IPv6 space).
    pub fn size(&self) -> u128 {
        (self.last - self.first).saturating_add(1)
    }

    /// The addresses, first to last.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        (self.first..=self.last).map(|n| from_u128(self.family, n))
    }

    fn overlaps(&self, o: &Block) -> bool {
        self.family == o.family && self.first <= o.last && o.first <= self.last
    }
}

impl DsrVipPoolSpec {
    /// The parsed blocks, or every problem (unparsable or overlapping
    /// blocks); the CEL rule catches only the grossest errors.
    pub fn blocks(&self) -> Result<Vec<Block>, Vec<BlockError>> {
        let mut out: Vec<Block> = Vec::new();
        let mut errs = Vec::new();
        if self.addresses.is_empty() || self.addresses.len() > MAX_BLOCKS {
            errs.push(BlockError::Count);
        }
        for a in &self.addresses {
            match Block::parse(a, self.skip_network_and_broadcast) {
                Ok(b) if out.iter().any(|o| o.overlaps(&b)) => {
                    errs.push(BlockError::Overlaps(a.clone()))
                }
                Ok(b) => out.push(b),
                Err(e) => errs.push(e),
            }
        }
        if errs.is_empty() { Ok(out) } else { Err(errs) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_ranges_and_single_addresses() {
        let b = Block::parse("192.0.2.0/30", false).unwrap();
        assert_eq!(b.size(), 4);
        assert_eq!(b.addresses().next(), Some(ip("192.0.2.0")));
        let b = Block::parse("192.0.2.0/30", true).unwrap();
        assert_eq!(b.addresses().collect::<Vec<_>>(), vec![ip("192.0.2.1"), ip("192.0.2.2")]);
        assert_eq!(Block::parse("192.0.2.7/32", true).unwrap().size(), 1);
        assert_eq!(Block::parse("192.0.2.6/31", true).unwrap().size(), 2);
        let r = Block::parse("192.0.2.10-192.0.2.19", true).unwrap();
        assert_eq!(r.size(), 10);
        assert!(r.contains(&ip("192.0.2.19")) && !r.contains(&ip("192.0.2.20")));
        assert_eq!(Block::parse("192.0.2.10", false).unwrap().size(), 1);
        let v6 = Block::parse("2001:db8::/120", true).unwrap();
        assert_eq!(v6.size(), 255);
        assert_eq!(v6.addresses().next(), Some(ip("2001:db8::1")));
        assert!(!v6.contains(&ip("192.0.2.1")));
        assert_eq!(Block::parse("::/0", false).unwrap().size(), u128::MAX);
    }

    #[test]
    fn bad_blocks_are_refused_with_the_reason() {
        for bad in
            ["192.0.2.1/24", "192.0.2.0/33", "nope", "192.0.2.9-192.0.2.1", "192.0.2.1-2001:db8::1"]
        {
            assert!(Block::parse(bad, false).is_err(), "{bad}");
        }
        let spec = DsrVipPoolSpec {
            addresses: vec!["192.0.2.0/28".into(), "192.0.2.8-192.0.2.20".into()],
            auto_assign: true,
            skip_network_and_broadcast: false,
            namespace_selector: None,
            service_selector: None,
        };
        let errs = spec.blocks().unwrap_err();
        assert!(
            matches!(&errs[0], BlockError::Overlaps(a) if a == "192.0.2.8-192.0.2.20"),
            "{errs:?}"
        );
        assert!(errs[0].to_string().contains("overlaps another block"), "{errs:?}");
    }
}
