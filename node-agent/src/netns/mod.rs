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
//! reads back), [`report`] from the read-back; [`converge`] is that round.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use crate::Error;

pub mod cgroup;
pub mod link;
pub mod loopback;
pub mod plan;

pub use cgroup::{PodNetns, all_pod_uids, find_pod, find_pods};
pub use link::{PodLink, enable_gro, prepare_pod_link};
pub use loopback::{ADDR_PROTO, DEFAULT_PROC, LABEL_V4, Netns};
pub use plan::{
    ArpSysctls, Backend, LoAddress, NsPlan, Observed, SysctlWrite, Target, VipReport, desired,
    plan, report,
};

/// The outcome of one [`converge`] round.
#[derive(Debug, Default)]
pub struct Round {
    /// Per backend and VIP, from what was read back at the end.
    pub reports: Vec<VipReport>,
    /// The scan of `/proc` failed: no pod namespace was handled this round.
    pub scan: Option<Error>,
    /// Namespaces that could not be found, read or changed. One failing
    /// namespace never stops the others.
    pub errors: BTreeMap<Target, Error>,
    /// Per pod UID asked for in [`converge_with_links`]: its interface
    /// (GRO turned on), or why not.
    pub links: BTreeMap<String, Result<PodLink, Error>>,
}

/// One level-triggered round: finds the namespaces, reads each back,
/// changes what differs, reads it back again, and reports.
///
/// `others` are UIDs of local pods that are not backends (any more): their
/// namespaces are looked at so that what kube-dsr added there is removed.
/// The node's namespace is always looked at, for the same reason. A pod
/// that is gone needs nothing: its namespace went with it.
pub fn converge(proc: &Path, backends: &[Backend], others: &[String]) -> Round {
    converge_with_links(proc, backends, others, &BTreeMap::new())
}

/// [`converge`], and for each pod UID in `links` (lowercase) the interface
/// holding that address inside the pod, with GRO turned on
/// ([`prepare_pod_link`]) — in the same visit of the namespace.
pub fn converge_with_links(
    proc: &Path,
    backends: &[Backend],
    others: &[String],
    links: &BTreeMap<String, IpAddr>,
) -> Round {
    let desired = desired(backends);
    let mut targets: BTreeSet<Target> = desired.keys().cloned().collect();
    targets.insert(Target::Host);
    targets.extend(links.keys().map(|u| Target::Pod(u.clone())));
    targets.extend(others.iter().map(|u| Target::Pod(u.to_ascii_lowercase())));
    let uids: BTreeSet<String> = targets
        .iter()
        .filter_map(|t| match t {
            Target::Pod(u) => Some(u.clone()),
            Target::Host => None,
        })
        .collect();

    let mut round = Round::default();
    let mut pods = match find_pods(proc, &uids) {
        Ok(p) => p,
        Err(e) => {
            // Without a scan only the node's own namespace can be handled.
            round.scan = Some(e);
            targets.retain(|t| *t == Target::Host);
            BTreeMap::new()
        }
    };
    let mut observed = BTreeMap::new();
    for target in targets {
        let ns = match &target {
            Target::Host => Netns::host().map(|n| n.with_proc(proc)),
            Target::Pod(uid) => match pods.remove(uid) {
                Some(p) => Ok(Netns::from_pod(uid, p).with_proc(proc)),
                None if desired.contains_key(&target) || links.contains_key(uid) => {
                    Err(Error::PodNetnsNotFound { uid: uid.clone() })
                }
                None => continue,
            },
        };
        let link_of = |t: &Target| match t {
            Target::Pod(uid) => links.get(uid).map(|a| (uid.clone(), *a)),
            Target::Host => None,
        };
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                if let Some((uid, _)) = link_of(&target) {
                    round.links.insert(uid.clone(), Err(Error::PodNetnsNotFound { uid }));
                }
                round.errors.insert(target, e);
                continue;
            }
        };
        if let Some((uid, addr)) = link_of(&target) {
            round.links.insert(uid, prepare_pod_link(&ns, addr));
        }
        let step = (|| {
            let obs = ns.observe()?;
            let one = BTreeMap::from([(target.clone(), obs)]);
            match plan(&desired, &one).pop() {
                Some(p) if !p.is_noop() => ns.apply(&p),
                _ => Ok(one.into_values().next().expect("one namespace observed")),
            }
        })();
        match step {
            Ok(obs) => {
                observed.insert(target, obs);
            }
            Err(e) => {
                round.errors.insert(target, e);
            }
        }
    }
    round.reports = report(backends, &observed);
    round
}
