//! The contract between `dsr-operator` and `dsr-agent`: every name one of
//! them writes and the other (or a user, or another controller) reads. Both
//! take these from here, so the two can never disagree.
//!
//! What each side writes:
//! - The operator writes one set of `EndpointSlice`s per DsrService, labelled
//!   [`MANAGED_BY_LABEL`]=[`MANAGED_BY`] and [`SERVICE_NAME_LABEL`]=the
//!   DsrService's name, in its namespace; its endpoints carry the pod's node
//!   and the Kubernetes ready/serving/terminating conditions. It writes
//!   DsrService status and events as [`OPERATOR_FIELD_MANAGER`].
//! - Each agent writes the cluster-scoped `DsrNodeReport` named after its
//!   node as [`AGENT_FIELD_MANAGER`], and holds one Lease per announced VIP
//!   named by [`vip_lease_name`].
//!
//! What the operator reads from a report: a backend pod counts as ready only
//! when Kubernetes says it is Ready **and** its own node's report lists the
//! VIP in the pod's `deliveredVips` (so a pod on a node without an agent
//! never gets traffic); a service is `Programmed` when every ingress node's
//! report carries the service at the DsrService's current generation.

use std::net::IpAddr;

/// Label key the Kubernetes EndpointSlice controller uses to find its own
/// slices; ours carry [`MANAGED_BY`] so it leaves them alone.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on every slice the operator writes.
pub const MANAGED_BY: &str = "kubedsr.io";
/// Label naming the DsrService a slice belongs to (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubedsr.io/service-name";

/// Field manager of every write of the operator, and its events'
/// reporting controller.
pub const OPERATOR_FIELD_MANAGER: &str = "dsr-operator";
/// Field manager of every write of the agent.
pub const AGENT_FIELD_MANAGER: &str = "dsr-agent";

/// Default name of the operator's leader Lease (in its own namespace).
pub const OPERATOR_LEASE: &str = "dsr-operator";
/// Prefix of the per-VIP announcement Leases the agents hold.
pub const VIP_LEASE_PREFIX: &str = "kdsr-vip-";

/// The Lease of one VIP: `kdsr-vip-<IPv4 dotted>` or `kdsr-vip-<IPv6 as 32
/// hex digits>`, a valid object name for every address.
pub fn vip_lease_name(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(a) => format!("{VIP_LEASE_PREFIX}{a}"),
        IpAddr::V6(a) => {
            let hex: String = a.octets().iter().map(|b| format!("{b:02x}")).collect();
            format!("{VIP_LEASE_PREFIX}{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(vip_lease_name("192.0.2.10".parse().unwrap()), "kdsr-vip-192.0.2.10");
        let v6 = vip_lease_name("2001:db8::10".parse().unwrap());
        assert_eq!(v6, "kdsr-vip-20010db8000000000000000000000010");
        assert!(v6.len() <= 63);
    }
}
