//! The agent's one error type. Every variant maps to a fixed metric label.

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
}

impl Error {
    /// Fixed, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotBpffs { .. } => "not_bpffs",
            Self::UnknownInterface { .. } => "unknown_interface",
            Self::VlanOffload { .. } => "vlan_offload",
            Self::Load(_) => "load",
            Self::Program { .. } => "program",
            Self::Link { .. } => "link",
            Self::MissingMap { .. } => "missing_map",
            Self::Map { .. } => "map",
            Self::Pin { .. } => "pin",
            Self::InvalidService { .. } => "invalid_service",
            Self::ServicesFull { .. } => "services_full",
            Self::BackendsFull { .. } => "backends_full",
            Self::RingsFull { .. } => "rings_full",
            Self::VipTableFull { .. } => "vip_table_full",
            Self::UnknownService(_) => "unknown_service",
            Self::UnknownBackend { .. } => "unknown_backend",
            Self::PodNetnsNotFound { .. } => "pod_netns_not_found",
            Self::ProcScanLimit { .. } => "proc_scan_limit",
            Self::Netns { .. } => "netns",
            Self::Netlink { .. } => "netlink",
            Self::Sysctl { .. } => "sysctl",
            Self::LoopbackDown => "loopback_down",
            Self::AddressMarkUnsupported { .. } => "address_mark_unsupported",
            Self::UnknownInterfaceIndex { .. } => "unknown_interface_index",
            Self::NeighbourLookup { .. } => "neighbour_lookup",
            Self::Io { .. } => "io",
        }
    }
}

impl Error {
    /// The dataplane is full: the service was refused whole and nothing
    /// changed. Retrying helps only once something else is removed (or the
    /// capacity is raised).
    pub fn is_capacity(&self) -> bool {
        matches!(
            self,
            Self::ServicesFull { .. }
                | Self::BackendsFull { .. }
                | Self::RingsFull { .. }
                | Self::VipTableFull { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
