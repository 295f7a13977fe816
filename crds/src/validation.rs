//! The CRD's validation rules, in Rust.
//!
//! The apiserver enforces the schema and CEL rules; the operator runs these
//! too, so an object that got past an older CRD (or a cluster without CEL)
//! is refused with the same message instead of reaching the dataplane.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use crate::dsrservice::{DsrServiceSpec, MAX_PORTS, MAX_STATIC_BACKENDS, TABLE_SIZES};
use crate::messages;

/// One violated rule: where, and the message a user sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `spec.vips`.
    pub path: String,
    /// The message, identical to the CEL rule's.
    pub message: String,
}

impl FieldError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Address family of an IP address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Parses an address the way the Kubernetes CEL `ip()` library does: IPv4
/// dotted quad without leading zeros, or IPv6 without zone. IPv4-mapped IPv6
/// addresses are refused (`ip()` refuses them too).
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let addr: IpAddr = s.parse().ok()?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return None;
    }
    Some(addr)
}

/// Whether `s` is the canonical text of `addr` (RFC 5952 for IPv6).
fn is_canonical(s: &str, addr: &IpAddr) -> bool {
    addr.to_string() == s
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local() || (a.is_multicast() && a.octets()[..3] == [224, 0, 0]),
        IpAddr::V6(a) => {
            (a.segments()[0] & 0xffc0) == 0xfe80
                || (a.is_multicast() && (a.segments()[0] & 0x000f) == 2)
        }
    }
}

/// Multicast or the IPv4 limited broadcast address.
fn is_multicast_or_broadcast(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast(),
    }
}

/// Problems with one address used as a VIP, in rule order.
pub fn vip_errors(s: &str) -> Vec<&'static str> {
    let Some(addr) = parse_ip(s) else {
        return vec![messages::VIP_INVALID];
    };
    let mut errs = Vec::new();
    if !is_canonical(s, &addr) {
        errs.push(messages::VIP_NOT_CANONICAL);
    }
    if addr.is_unspecified() {
        errs.push(messages::VIP_UNSPECIFIED);
    }
    if addr.is_loopback() {
        errs.push(messages::VIP_LOOPBACK);
    }
    if is_link_local(&addr) {
        errs.push(messages::VIP_LINK_LOCAL);
    } else if is_multicast_or_broadcast(&addr) {
        errs.push(messages::VIP_MULTICAST);
    }
    errs
}

/// Problems with one static backend address.
fn backend_errors(s: &str) -> Vec<&'static str> {
    let Some(addr) = parse_ip(s) else {
        return vec![messages::BACKEND_INVALID];
    };
    let mut errs = Vec::new();
    if !is_canonical(s, &addr) {
        errs.push(messages::BACKEND_NOT_CANONICAL);
    }
    if addr.is_unspecified()
        || addr.is_loopback()
        || is_link_local(&addr)
        || is_multicast_or_broadcast(&addr)
    {
        errs.push(messages::BACKEND_NOT_UNICAST);
    }
    errs
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_interface_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Checks a DsrService name (it becomes a label value).
pub fn validate_name(name: &str) -> Vec<FieldError> {
    if name.len() > 63 {
        vec![FieldError::new("metadata.name", messages::NAME_TOO_LONG)]
    } else {
        Vec::new()
    }
}

/// Every rule of the CRD schema and its CEL rules that concerns the spec.
/// Empty when the spec is valid.
pub fn validate_spec(spec: &DsrServiceSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();

    // VIPs
    // Empty VIPs ask for pool addresses.
    if spec.vips.len() > 2 {
        errs.push(FieldError::new("spec.vips", "must have at most 2 items"));
    }
    if spec.ip_families.len() > 1 && spec.ip_families[0] == spec.ip_families[1] {
        errs.push(FieldError::new("spec.ipFamilies", messages::IP_FAMILIES_DUPLICATE));
    }
    if !spec.ip_families.is_empty() && !spec.vips.is_empty() {
        errs.push(FieldError::new("spec", messages::IP_FAMILIES_WITH_VIPS));
    }
    let mut seen = BTreeSet::new();
    for vip in &spec.vips {
        if !seen.insert(vip) {
            errs.push(FieldError::new("spec.vips", format!("duplicate value {vip:?}")));
        }
    }
    let mut vip_msgs: Vec<&'static str> = Vec::new();
    for vip in &spec.vips {
        for m in vip_errors(vip) {
            if !vip_msgs.contains(&m) {
                vip_msgs.push(m);
            }
        }
    }
    errs.extend(vip_msgs.into_iter().map(|m| FieldError::new("spec.vips", m)));
    let families: Vec<Family> =
        spec.vips.iter().filter_map(|v| parse_ip(v)).map(|a| Family::of(&a)).collect();
    if families.len() == 2 && families[0] == families[1] {
        errs.push(FieldError::new("spec.vips", messages::VIP_FAMILIES));
    }

    // Ports
    if spec.ports.is_empty() || spec.ports.len() > MAX_PORTS {
        errs.push(FieldError::new("spec.ports", format!("must have 1 to {MAX_PORTS} items")));
    }
    for (i, p) in spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&p.port) {
            errs.push(FieldError::new(
                format!("spec.ports[{i}].port"),
                "port must be between 1 and 65535",
            ));
        }
        if let Some(name) = &p.name
            && !is_dns_label(name)
        {
            errs.push(FieldError::new(
                format!("spec.ports[{i}].name"),
                messages::PORT_NAME_INVALID,
            ));
        }
    }
    let pairs: BTreeSet<_> = spec.ports.iter().map(|p| (p.port, p.protocol)).collect();
    if pairs.len() != spec.ports.len() {
        errs.push(FieldError::new("spec.ports", messages::PORT_DUPLICATE));
    }
    let names: Vec<&String> = spec.ports.iter().filter_map(|p| p.name.as_ref()).collect();
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        errs.push(FieldError::new("spec.ports", messages::PORT_NAME_DUPLICATE));
    }

    // Backends
    if spec.selector.is_some() == spec.backends.is_some() {
        errs.push(FieldError::new("spec", messages::SELECTOR_XOR_BACKENDS));
    }
    if let Some(sel) = &spec.selector
        && sel.is_empty()
    {
        errs.push(FieldError::new("spec.selector", messages::SELECTOR_EMPTY));
    }
    if let Some(backends) = &spec.backends {
        if backends.is_empty() || backends.len() > MAX_STATIC_BACKENDS {
            errs.push(FieldError::new(
                "spec.backends",
                format!("must have 1 to {MAX_STATIC_BACKENDS} items"),
            ));
        }
        let mut seen = BTreeSet::new();
        let vip_families: BTreeSet<Family> = families.iter().copied().collect();
        let mut family_mismatch = false;
        for (i, b) in backends.iter().enumerate() {
            for m in backend_errors(&b.address) {
                errs.push(FieldError::new(format!("spec.backends[{i}].address"), m));
            }
            if !seen.insert(&b.address) {
                errs.push(FieldError::new(
                    format!("spec.backends[{i}]"),
                    format!("duplicate address {:?}", b.address),
                ));
            }
            if let Some(a) = parse_ip(&b.address)
                && !vip_families.contains(&Family::of(&a))
            {
                family_mismatch = true;
            }
        }
        if family_mismatch {
            errs.push(FieldError::new("spec", messages::BACKEND_FAMILY));
        }
    }

    // Ingress
    if let Some(ifname) = &spec.ingress.interface
        && !is_interface_name(ifname)
    {
        errs.push(FieldError::new("spec.ingress.interface", messages::INTERFACE_INVALID));
    }

    // Hashing
    if !TABLE_SIZES.contains(&spec.hashing.table_size) {
        errs.push(FieldError::new("spec.hashing.tableSize", messages::TABLE_SIZE));
    }

    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dsrservice::{BackendSetup, Hashing, Ingress, Protocol, ServicePort, StaticBackend};
    use std::collections::BTreeMap;

    fn spec(vips: &[&str]) -> DsrServiceSpec {
        DsrServiceSpec {
            vips: vips.iter().map(|s| s.to_string()).collect(),
            ip_families: Vec::new(),
            ports: vec![ServicePort { name: None, port: 80, protocol: Protocol::Tcp }],
            selector: Some(BTreeMap::from([("app".into(), "web".into())])),
            backends: None,
            ingress: Ingress::default(),
            hashing: Hashing::default(),
            backend_setup: BackendSetup::default(),
        }
    }

    fn messages_of(spec: &DsrServiceSpec) -> Vec<String> {
        validate_spec(spec).into_iter().map(|e| e.message).collect()
    }

    #[test]
    fn valid_single_and_dual_stack() {
        assert_eq!(validate_spec(&spec(&["192.0.2.10"])), vec![]);
        assert_eq!(validate_spec(&spec(&["192.0.2.10", "2001:db8::10"])), vec![]);
        assert_eq!(validate_spec(&spec(&["2001:db8::10"])), vec![]);
    }

    #[test]
    fn vip_address_classes_are_refused_with_their_message() {
        let cases = [
            ("not-an-ip", messages::VIP_INVALID),
            ("192.0.2.256", messages::VIP_INVALID),
            ("fe80::1%eth0", messages::VIP_INVALID),
            ("::ffff:192.0.2.1", messages::VIP_INVALID),
            ("192.000.2.1", messages::VIP_INVALID),
            ("2001:DB8::1", messages::VIP_NOT_CANONICAL),
            ("2001:db8:0:0::1", messages::VIP_NOT_CANONICAL),
            ("0.0.0.0", messages::VIP_UNSPECIFIED),
            ("::", messages::VIP_UNSPECIFIED),
            ("127.0.0.1", messages::VIP_LOOPBACK),
            ("::1", messages::VIP_LOOPBACK),
            ("169.254.1.1", messages::VIP_LINK_LOCAL),
            ("fe80::1", messages::VIP_LINK_LOCAL),
            ("224.0.0.5", messages::VIP_LINK_LOCAL),
            ("ff02::1", messages::VIP_LINK_LOCAL),
            ("239.1.1.1", messages::VIP_MULTICAST),
            ("ff05::1", messages::VIP_MULTICAST),
            ("255.255.255.255", messages::VIP_MULTICAST),
        ];
        for (vip, want) in cases {
            assert_eq!(messages_of(&spec(&[vip])), vec![want.to_string()], "VIP {vip}");
        }
    }

    #[test]
    fn two_vips_of_one_family_are_refused() {
        assert_eq!(
            messages_of(&spec(&["192.0.2.10", "192.0.2.11"])),
            vec![messages::VIP_FAMILIES.to_string()]
        );
        assert!(validate_spec(&spec(&[])).is_empty(), "empty VIPs ask for pool addresses");
        assert!(!validate_spec(&spec(&["192.0.2.1", "2001:db8::1", "192.0.2.2"])).is_empty());
    }

    #[test]
    fn duplicate_port_protocol_pairs_are_refused_but_same_port_other_protocol_is_fine() {
        let mut s = spec(&["192.0.2.10"]);
        s.ports.push(ServicePort { name: None, port: 80, protocol: Protocol::Udp });
        assert_eq!(validate_spec(&s), vec![]);
        s.ports.push(ServicePort { name: None, port: 80, protocol: Protocol::Tcp });
        assert_eq!(messages_of(&s), vec![messages::PORT_DUPLICATE.to_string()]);
    }

    #[test]
    fn port_range_and_names() {
        let mut s = spec(&["192.0.2.10"]);
        s.ports[0].port = 0;
        assert_eq!(validate_spec(&s)[0].path, "spec.ports[0].port");
        s.ports[0].port = 65536;
        assert_eq!(validate_spec(&s)[0].path, "spec.ports[0].port");
        s.ports[0].port = 65535;
        s.ports[0].name = Some("Http".into());
        assert_eq!(messages_of(&s), vec![messages::PORT_NAME_INVALID.to_string()]);
        s.ports[0].name = Some("http".into());
        s.ports.push(ServicePort { name: Some("http".into()), port: 81, protocol: Protocol::Tcp });
        assert_eq!(messages_of(&s), vec![messages::PORT_NAME_DUPLICATE.to_string()]);
    }

    #[test]
    fn exactly_one_of_selector_and_backends() {
        let mut s = spec(&["192.0.2.10"]);
        s.backends = Some(vec![StaticBackend { address: "192.0.2.20".into() }]);
        assert_eq!(messages_of(&s), vec![messages::SELECTOR_XOR_BACKENDS.to_string()]);
        s.selector = None;
        assert_eq!(validate_spec(&s), vec![]);
        s.backends = None;
        assert_eq!(messages_of(&s), vec![messages::SELECTOR_XOR_BACKENDS.to_string()]);
        s.selector = Some(BTreeMap::new());
        assert_eq!(messages_of(&s), vec![messages::SELECTOR_EMPTY.to_string()]);
    }

    #[test]
    fn static_backends_need_a_vip_of_their_family_and_a_unicast_address() {
        let mut s = spec(&["192.0.2.10"]);
        s.selector = None;
        s.backends = Some(vec![StaticBackend { address: "2001:db8::20".into() }]);
        assert_eq!(messages_of(&s), vec![messages::BACKEND_FAMILY.to_string()]);
        s.backends = Some(vec![StaticBackend { address: "127.0.0.1".into() }]);
        assert_eq!(messages_of(&s), vec![messages::BACKEND_NOT_UNICAST.to_string()]);
        s.backends = Some(vec![StaticBackend { address: "backend-1".into() }]);
        assert_eq!(messages_of(&s), vec![messages::BACKEND_INVALID.to_string()]);
        s.backends = Some(vec![
            StaticBackend { address: "192.0.2.20".into() },
            StaticBackend { address: "192.0.2.20".into() },
        ]);
        assert_eq!(validate_spec(&s)[0].path, "spec.backends[1]");
    }

    #[test]
    fn table_size_must_be_a_supported_prime() {
        let mut s = spec(&["192.0.2.10"]);
        for size in TABLE_SIZES {
            s.hashing.table_size = size;
            assert_eq!(validate_spec(&s), vec![]);
        }
        for size in [0, 250, 65536, 65521] {
            s.hashing.table_size = size;
            assert_eq!(messages_of(&s), vec![messages::TABLE_SIZE.to_string()], "size {size}");
        }
    }

    #[test]
    fn interface_names() {
        let mut s = spec(&["192.0.2.10"]);
        for ok in ["eth0", "enp3s0f1", "bond0.100", "veth_a-b"] {
            s.ingress.interface = Some(ok.into());
            assert_eq!(validate_spec(&s), vec![], "{ok}");
        }
        for bad in ["", "a/b", "eth0:1", "has space", "..", "sixteen-chars-xx"] {
            s.ingress.interface = Some(bad.into());
            assert_eq!(messages_of(&s), vec![messages::INTERFACE_INVALID.to_string()], "{bad}");
        }
    }

    #[test]
    fn long_names_are_refused() {
        assert!(validate_name(&"a".repeat(63)).is_empty());
        assert_eq!(validate_name(&"a".repeat(64))[0].message, messages::NAME_TOO_LONG);
    }
}
