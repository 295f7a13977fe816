//! Backend preparation: the VIPs on each backend pod's `lo` and the ARP
//! sysctls that keep the pod from answering ARP for them.
//!
//! - [`cgroup`]: a pod's network namespace from its UID (pure parsing of
//!   `/proc/<pid>/cgroup`, and the scan of `/proc`).
//! - [`plan`]: what each namespace must hold, the steps to get there, and
//!   the per-VIP report; pure.
//! - [`loopback`]: [`Netns`], which reads and changes one namespace through
//!   netlink and `/proc/sys` on a thread of its own that entered it.
//!
//! One round: [`find_pods`] for the backends' UIDs, [`Netns::observe`]
//! each, [`plan()`], [`Netns::apply`] the plans that are not no-ops (it
//! reads back), [`report`] from the read-back.

pub mod cgroup;
pub mod loopback;
pub mod plan;

pub use cgroup::{PodNetns, find_pod, find_pods};
pub use loopback::{ADDR_PROTO, LABEL_V4, Netns};
pub use plan::{
    ArpSysctls, Backend, LoAddress, NsPlan, Observed, SysctlWrite, Target, VipReport, desired,
    plan, report,
};
