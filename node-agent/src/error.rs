//! The agent's one error type, and the fixed kinds errors are counted by
//! ([`ErrorKind`], [`Error::kind`]).

use std::{io, net::IpAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },

    #[error("interface {name:?} not found in this network namespace")]
    UnknownInterface {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "interface {name:?} strips 802.1Q tags (rx-vlan-offload) and it cannot be turned off: tagged frames would leave untagged, so the interface is refused"
    )]
    VlanOffload {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("loading the XDP object")]
    Load(#[source] Box<aya::EbpfError>),

    #[error("the XDP program {action}")]
    Program {
        action: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("pinned link at {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("map {name} is missing from the XDP object")]
    MissingMap { name: &'static str },

    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("invalid service {service:?}: {reason}")]
    InvalidService { service: String, reason: String },

    #[error(
        "no room for {service:?} on this node: all {max} service slots are in use (agent flag --max-services)"
    )]
    ServicesFull { service: String, max: u32 },

    #[error(
        "no room for {service:?} on this node: it needs {wanted} more backend slot(s) and {free} of {max} are free (agent flag --max-backends)"
    )]
    BackendsFull { service: String, wanted: usize, free: usize, max: u32 },

    #[error(
        "no room for {service:?} on this node: it needs {rows} more Maglev row(s) of {table_size} slots and {available} are free in {chunks} ring chunk(s) (agent flag --ring-mib, or a smaller spec.hashing.tableSize)"
    )]
    RingsFull { service: String, table_size: u32, rows: usize, available: u64, chunks: u32 },

    #[error("no free VIP table slot near {key} (too many VIPs hash together; the table holds {slots})", slots = kube_dsr_common::VIP_SLOTS)]
    VipTableFull { key: String },

    #[error("service {0:?} is not programmed")]
    UnknownService(String),

    #[error("backend {addr} is not part of service {service:?}")]
    UnknownBackend { service: String, addr: IpAddr },

    #[error("no running process of pod {uid}: its network namespace cannot be found")]
    PodNetnsNotFound { uid: String },

    #[error("scanning /proc stopped after {limit} entries")]
    ProcScanLimit { limit: usize },

    #[error("entering the network namespace of {what}")]
    Netns {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("netlink: {what}")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("sysctl {path}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("lo is down in the namespace; VIPs on it would not receive traffic")]
    LoopbackDown,

    #[error(
        "the kernel dropped the IFA_PROTO mark on {vip} (needs Linux 6.3 or later); the address was taken back"
    )]
    AddressMarkUnsupported { vip: IpAddr },

    #[error("interface index {index} not found in this network namespace")]
    UnknownInterfaceIndex {
        index: u32,
        #[source]
        source: io::Error,
    },

    #[error("looking up backend {addr}: {what}")]
    NeighbourLookup {
        addr: IpAddr,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// A call to the Kubernetes API failed.
    #[error("{what}")]
    Kube {
        what: &'static str,
        #[source]
        source: kube::Error,
    },

    /// The API server could not be reached at start.
    #[error(transparent)]
    Connect(#[from] kube_dsr_process::api::ConnectError),

    /// A cache's watch ended before it listed once.
    #[error("{what}")]
    CacheSync {
        what: &'static str,
        #[source]
        source: kube::runtime::reflector::store::WriterDropped,
    },

    /// The EndpointSlice watch ended before it listed once.
    #[error("{what}: the watch ended")]
    WatchEnded { what: &'static str },

    #[error("my Node has no uid")]
    NodeWithoutUid,

    /// A Lease read or write failed. Reads in full: kube's errors repeat
    /// their cause in their own message.
    #[error("{step} Lease {name}: {cause}")]
    Lease { step: &'static str, name: String, cause: kube::Error },

    #[error("{step} Lease {name} timed out")]
    LeaseTimeout { step: &'static str, name: String },

    /// The worker thread ended (it only does on shutdown, or by a panic).
    #[error("the worker thread ended")]
    WorkerGone,

    /// `/metrics`, `/healthz` and `/readyz` could not be served.
    #[error(transparent)]
    Http(#[from] kube_dsr_process::http::Error),
}

/// What the agent was doing when something failed: the `error` label of
/// `kubedsr_agent_reconcile_errors_total`. A fixed set, so the metric stays
/// bounded; [`ErrorKind::ALL`] is every label, present from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A call to the Kubernetes API (watch, read, report).
    KubeApi,
    /// Opening, programming or reading a dataplane.
    Dataplane,
    /// A service refused because a dataplane is full.
    Capacity,
    /// Routes and neighbour lookups (choosing an interface, backend MACs).
    Neighbour,
    /// Pod network namespaces (loopback VIPs, sysctls, interfaces).
    Netns,
    /// Announcement Leases.
    Lease,
    /// Answering ARP / neighbour discovery.
    Announce,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 7] = [
        Self::KubeApi,
        Self::Dataplane,
        Self::Capacity,
        Self::Neighbour,
        Self::Netns,
        Self::Lease,
        Self::Announce,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KubeApi => "kube_api",
            Self::Dataplane => "dataplane",
            Self::Capacity => "capacity",
            Self::Neighbour => "neighbour",
            Self::Netns => "netns",
            Self::Lease => "lease",
            Self::Announce => "announce",
        }
    }
}

impl Error {
    /// The metric kind of this error by its variant. The interface,
    /// netlink and I/O variants are shared by the dataplane, the
    /// neighbour resolver and the pod namespaces, so they count as
    /// `dataplane` here; a step that gets them from the resolver or a pod
    /// namespace counts its own kind. `WorkerGone` and `Http` end the agent
    /// instead of being counted; they are `dataplane` only because every
    /// error has a kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Kube { .. }
            | Self::Connect(_)
            | Self::CacheSync { .. }
            | Self::WatchEnded { .. }
            | Self::NodeWithoutUid => ErrorKind::KubeApi,
            Self::Lease { .. } | Self::LeaseTimeout { .. } => ErrorKind::Lease,
            Self::ServicesFull { .. }
            | Self::BackendsFull { .. }
            | Self::RingsFull { .. }
            | Self::VipTableFull { .. } => ErrorKind::Capacity,
            Self::PodNetnsNotFound { .. }
            | Self::ProcScanLimit { .. }
            | Self::Netns { .. }
            | Self::Sysctl { .. }
            | Self::LoopbackDown
            | Self::AddressMarkUnsupported { .. } => ErrorKind::Netns,
            Self::NeighbourLookup { .. } => ErrorKind::Neighbour,
            Self::NotBpffs { .. }
            | Self::UnknownInterface { .. }
            | Self::VlanOffload { .. }
            | Self::Load(_)
            | Self::Program { .. }
            | Self::Link { .. }
            | Self::MissingMap { .. }
            | Self::Map { .. }
            | Self::Pin { .. }
            | Self::InvalidService { .. }
            | Self::UnknownService(_)
            | Self::UnknownBackend { .. }
            | Self::Netlink { .. }
            | Self::UnknownInterfaceIndex { .. }
            | Self::Io { .. }
            | Self::WorkerGone
            | Self::Http(_) => ErrorKind::Dataplane,
        }
    }
}

impl Error {
    /// The dataplane is full: the service was refused whole and nothing
    /// changed. Retrying helps only once something else is removed (or the
    /// capacity is raised).
    pub fn is_capacity(&self) -> bool {
        self.kind() == ErrorKind::Capacity
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_variant() {
        let full = Error::RingsFull {
            service: "a".into(),
            table_size: 251,
            rows: 2,
            available: 1,
            chunks: 2,
        };
        assert_eq!(full.kind(), ErrorKind::Capacity);
        assert!(full.is_capacity());
        let invalid = Error::InvalidService { service: "a".into(), reason: "no ports".into() };
        assert_eq!(invalid.kind(), ErrorKind::Dataplane);
        assert!(!invalid.is_capacity());
        assert_eq!(Error::LoopbackDown.kind(), ErrorKind::Netns);
        let timeout = Error::LeaseTimeout { step: "Renew", name: "kdsr-vip-192.0.2.1".into() };
        assert_eq!(timeout.kind(), ErrorKind::Lease);
        assert_eq!(timeout.to_string(), "Renew Lease kdsr-vip-192.0.2.1 timed out");
        assert_eq!(Error::NodeWithoutUid.kind(), ErrorKind::KubeApi);
    }

    #[test]
    fn kind_labels_are_distinct() {
        let labels: std::collections::BTreeSet<&str> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.len(), ErrorKind::ALL.len());
    }
}
