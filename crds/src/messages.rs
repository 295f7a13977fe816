//! User-facing validation messages, shared by the CEL rules in the CRD and
//! the Rust validation in [`crate::validation`], so both say the same thing.

pub const NAME_TOO_LONG: &str = "metadata.name must be at most 63 characters: it is used as a label value on the generated EndpointSlices";
pub const SELECTOR_XOR_BACKENDS: &str =
    "set exactly one of selector (pods in this namespace) or backends (static addresses)";
pub const BACKEND_FAMILY: &str = "every static backend needs a VIP of the same address family (IPv4 backends for an IPv4 VIP, IPv6 for IPv6)";
pub const VIP_INVALID: &str = "each VIP must be a valid IPv4 or IPv6 address";
pub const VIP_NOT_CANONICAL: &str = "each VIP must be written in canonical form, e.g. 192.0.2.10 or 2001:db8::10 (lower case, no leading zeros, :: for the longest run of zeros)";
pub const VIP_UNSPECIFIED: &str = "a VIP must not be the unspecified address (0.0.0.0 or ::)";
pub const VIP_LOOPBACK: &str = "a VIP must not be a loopback address (127.0.0.0/8 or ::1)";
pub const VIP_LINK_LOCAL: &str = "a VIP must not be link-local (169.254.0.0/16 or fe80::/10)";
pub const VIP_MULTICAST: &str = "a VIP must not be a multicast or broadcast address";
pub const VIP_FAMILIES: &str = "at most one IPv4 and one IPv6 VIP";
pub const PORT_DUPLICATE: &str = "each (port, protocol) pair may appear only once";
pub const PORT_NAME_DUPLICATE: &str = "port names must be unique";
pub const SELECTOR_EMPTY: &str = "selector must have at least one label; an empty selector would select every pod in the namespace";
pub const PORT_NAME_INVALID: &str = "port name must be a DNS label: lower case letters, digits and '-', starting and ending with a letter or digit";
pub const BACKEND_INVALID: &str = "backend address must be a valid IPv4 or IPv6 address";
pub const BACKEND_NOT_CANONICAL: &str =
    "backend address must be written in canonical form, e.g. 192.0.2.10 or 2001:db8::10";
pub const BACKEND_NOT_UNICAST: &str = "backend address must be a unicast address that is not unspecified, loopback, multicast or link-local";
pub const INTERFACE_INVALID: &str =
    "interface must be a Linux interface name: at most 15 characters, no '/', ':' or whitespace";
pub const TABLE_SIZE: &str = "tableSize must be one of 251, 1021, 4093, 16381, 32749, 65537 (the prime table sizes the dataplane supports)";
pub const IP_FAMILIES_DUPLICATE: &str = "ipFamilies lists each family at most once";
pub const IP_FAMILIES_WITH_VIPS: &str =
    "ipFamilies is for pool allocation: set it only when vips is empty";
pub const POOL_ADDRESS_INVALID: &str = "each address must be a CIDR (192.0.2.0/24, 2001:db8::/120), a single address, or a range first-last of one family";
