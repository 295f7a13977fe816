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

pub use dsrservice::{
    Announcement, BackendSetup, DsrService, DsrServiceSpec, DsrServiceStatus, Hashing, Ingress,
    NodeReach, Protocol, ServicePort, StaticBackend, StatusSummary, VipStatus,
};
pub use error::Error;
pub use nodereport::{
    BackendReport, Delivery, DsrNodeReport, DsrNodeReportSpec, IngressErrorReason, IngressReport,
    ReachCounts, UnreachedBackend,
};

use kube::CustomResourceExt;

/// API group of every kube-dsr resource.
pub const GROUP: &str = "kubedsr.io";

/// The generated CRDs, with the file each is checked in as (relative to `crds/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crd {
    DsrService,
    DsrNodeReport,
}

impl Crd {
    pub const ALL: [Crd; 2] = [Crd::DsrService, Crd::DsrNodeReport];

    /// File name under `crds/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Crd::DsrService => "dsrservice.yaml",
            Crd::DsrNodeReport => "dsrnodereport.yaml",
        }
    }

    /// The CRD as YAML, exactly as checked in.
    pub fn yaml(self) -> Result<String, Error> {
        let crd = match self {
            Crd::DsrService => DsrService::crd(),
            Crd::DsrNodeReport => DsrNodeReport::crd(),
        };
        let body = serde_yaml::to_string(&crd)
            .map_err(|source| Error::Yaml { file: self.file_name(), source })?;
        Ok(format!(
            "# Generated from crds/src by `cargo run -p kube-dsr-crds --bin crdgen -- --write crds`; do not edit.\n{body}"
        ))
    }
}
