//! The kube-dsr API (`kubedsr.io/v1alpha1`): `DsrService`, written by users,
//! and `DsrNodeReport`, written by node agents. Also the Rust copy of the
//! validation rules and the CRD YAML that `crdgen` prints.

#![forbid(unsafe_code)]

pub mod contract;
pub mod dsrservice;
pub mod error;
pub mod messages;
pub mod nodereport;
pub mod validation;
pub mod vippool;

pub use dsrservice::{
    AllocatedVip, Announcement, BackendSetup, DsrService, DsrServiceSpec, DsrServiceStatus,
    Hashing, Ingress, IpFamily, NodeReach, Protocol, ServicePort, StaticBackend, StatusSummary,
    VipStatus,
};
pub use error::Error;
pub use nodereport::{
    BackendReport, Delivery, DsrNodeReport, DsrNodeReportSpec, IngressErrorReason, IngressReport,
    ReachCounts, UnreachedBackend,
};

pub use vippool::{DsrVipPool, DsrVipPoolSpec, DsrVipPoolStatus};

use kube::CustomResourceExt;

/// `spec.loadBalancerClass` of the Services kube-dsr serves.
pub const LOAD_BALANCER_CLASS: &str = "kubedsr.io/dsr";
/// Annotation: requested VIPs, comma-separated, at most one per family
/// (on a `Service`; `spec.loadBalancerIP` is the deprecated fallback).
pub const LOAD_BALANCER_IPS_ANNOTATION: &str = "kubedsr.io/loadBalancerIPs";
/// Annotation: services with the same value may share a VIP when their
/// ports do not collide (on a `Service` or a `DsrService`).
pub const ALLOW_SHARED_IP_ANNOTATION: &str = "kubedsr.io/allow-shared-ip";
/// Annotation: take the VIP from this `DsrVipPool` (even one with
/// `autoAssign: false`).
pub const ADDRESS_POOL_ANNOTATION: &str = "kubedsr.io/address-pool";

/// API group of every kube-dsr resource.
pub const GROUP: &str = "kubedsr.io";

/// The generated CRDs, with the file each is checked in as (relative to `crds/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crd {
    DsrService,
    DsrNodeReport,
    DsrVipPool,
}

impl Crd {
    pub const ALL: [Crd; 3] = [Crd::DsrService, Crd::DsrNodeReport, Crd::DsrVipPool];

    /// File name under `crds/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Crd::DsrService => "dsrservice.yaml",
            Crd::DsrNodeReport => "dsrnodereport.yaml",
            Crd::DsrVipPool => "dsrvippool.yaml",
        }
    }

    /// The CRD as YAML, exactly as checked in.
    pub fn yaml(self) -> Result<String, Error> {
        let crd = match self {
            Crd::DsrService => DsrService::crd(),
            Crd::DsrNodeReport => DsrNodeReport::crd(),
            Crd::DsrVipPool => DsrVipPool::crd(),
        };
        let body = serde_yaml::to_string(&crd)
            .map_err(|source| Error::Yaml { file: self.file_name(), source })?;
        Ok(format!(
            "# Generated from crds/src by `cargo run -p kube-dsr-crds --bin crdgen -- --write crds`; do not edit.\n{body}"
        ))
    }
}
