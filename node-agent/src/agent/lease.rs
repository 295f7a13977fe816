//! Who answers ARP / neighbour discovery for a VIP: one `coordination.k8s.io`
//! Lease per VIP, among the service's ingress nodes.
//!
//! The protocol is client-go's leader election, per VIP: the holder renews
//! every `retry`; a candidate takes the Lease over only when it has seen the
//! same record unchanged for a whole `duration` by its own clock (so clock
//! skew between nodes does not matter), and every write is a replace with the
//! `resourceVersion` it read, so two candidates cannot both win. The holder
//! stops answering once `duration - retry` has passed since its last
//! successful write, before anyone else may take over. The operator's
//! preferred announcer (rendezvous hashing, `status.vips[].announcingNode`)
//! creates a missing Lease at once and others wait one `retry`, which
//! spreads VIPs over nodes; an existing holder is never preempted (no flaps).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use super::desired::Desired;
use crate::Error;

pub use kube_dsr_crds::contract::vip_lease_name as lease_name;

/// VIPs this node is a candidate for, and whether it is the preferred one.
pub fn candidates(node: &str, d: &Desired) -> BTreeMap<IpAddr, bool> {
    let mut out: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for s in d.ingress.iter().filter(|s| s.announce) {
        for v in &s.vips {
            let preferred = s.preferred_announcer.get(&v.vip).is_some_and(|n| n == node);
            *out.entry(v.vip).or_default() |= preferred;
        }
    }
    out
}

/// What to do with one Lease this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// No Lease yet: create it naming us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: replace it naming us.
    TakeOver,
    /// Someone else holds it, or it is not our turn yet.
    Wait,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "Create",
            Self::Renew => "Renew",
            Self::TakeOver => "TakeOver",
            Self::Wait => "Wait",
        }
    }
}

/// The decision for one Lease. `unchanged_for`: how long this node has seen
/// the current record (or its absence) without change.
pub fn decide(
    me: &str,
    lease: Option<&LeaseSpec>,
    unchanged_for: Duration,
    preferred: bool,
    retry: Duration,
) -> Action {
    let our_turn = preferred || unchanged_for >= retry;
    let Some(spec) = lease else {
        return if our_turn { Action::Create } else { Action::Wait };
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Action::Renew,
        None | Some("") => {
            if our_turn {
                Action::TakeOver
            } else {
                Action::Wait
            }
        }
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(Duration::from_secs(15), Duration::from_secs);
            if unchanged_for >= duration { Action::TakeOver } else { Action::Wait }
        }
    }
}

/// The record a candidate compares between reads: holder and renew time
/// (the resourceVersion changes on every write too).
fn record(lease: Option<&Lease>) -> Option<String> {
    lease.map(|l| l.metadata.resource_version.clone().unwrap_or_default())
}

/// Per-VIP memory between rounds.
#[derive(Debug)]
struct Tracked {
    record: Option<String>,
    seen_since: Instant,
    /// When our last write naming us succeeded.
    written: Option<Instant>,
}

/// The per-VIP Leases of this node.
pub struct Leases {
    api: Api<Lease>,
    me: String,
    duration: Duration,
    retry: Duration,
    tracked: BTreeMap<IpAddr, Tracked>,
}

impl Leases {
    /// `duration` must exceed twice `retry`.
    pub fn new(api: Api<Lease>, me: String, duration: Duration, retry: Duration) -> Self {
        Leases { api, me, duration, retry, tracked: BTreeMap::new() }
    }

    /// VIPs held now: written by us less than `duration - retry` ago.
    pub fn held(&self) -> BTreeSet<IpAddr> {
        let limit = self.duration.saturating_sub(self.retry);
        self.tracked
            .iter()
            .filter(|(_, t)| t.written.is_some_and(|w| w.elapsed() < limit))
            .map(|(v, _)| *v)
            .collect()
    }

    /// When the first held Lease stops counting as held (`None`: none
    /// is). A round must not run past it, or this node could keep
    /// answering after another took over.
    pub fn earliest_expiry(&self) -> Option<Instant> {
        let limit = self.duration.saturating_sub(self.retry);
        self.tracked.values().filter_map(|t| t.written).map(|w| w + limit).min()
    }

    fn spec(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.me.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round over `wanted` (VIP → preferred). Errors are returned per
    /// VIP; a VIP whose round failed keeps its hold only until the limit.
    pub async fn round(&mut self, wanted: &BTreeMap<IpAddr, bool>) -> Vec<(IpAddr, Error)> {
        let mut errors = Vec::new();
        for (&vip, &preferred) in wanted {
            if let Err(e) = self.one(vip, preferred).await {
                errors.push((vip, e));
            }
        }
        let gone: Vec<IpAddr> =
            self.tracked.keys().filter(|v| !wanted.contains_key(v)).copied().collect();
        for vip in gone {
            if let Err(e) = self.release(vip).await {
                errors.push((vip, e));
            }
            self.tracked.remove(&vip);
        }
        errors
    }

    async fn one(&mut self, vip: IpAddr, preferred: bool) -> crate::Result<()> {
        let name = lease_name(vip);
        let got = tokio::time::timeout(self.retry, self.api.get_opt(&name))
            .await
            .map_err(|_| Error::LeaseTimeout { step: "reading", name: name.clone() })?
            .map_err(|cause| Error::Lease { step: "reading", name: name.clone(), cause })?;
        let rec = record(got.as_ref());
        let t = self.tracked.entry(vip).or_insert(Tracked {
            record: rec.clone(),
            seen_since: Instant::now(),
            written: None,
        });
        if t.record != rec {
            t.record = rec;
            t.seen_since = Instant::now();
        }
        let unchanged_for = t.seen_since.elapsed();
        let action = decide(
            &self.me,
            got.as_ref().and_then(|l| l.spec.as_ref()),
            unchanged_for,
            preferred,
            self.retry,
        );
        let result = match action {
            Action::Wait => {
                // Someone else holds it: stop at once.
                if let Some(t) = self.tracked.get_mut(&vip) {
                    t.written = None;
                }
                return Ok(());
            }
            Action::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() },
                    spec: Some(self.spec(None, 0)),
                };
                tokio::time::timeout(self.retry, self.api.create(&PostParams::default(), &lease))
                    .await
            }
            Action::Renew | Action::TakeOver => {
                let mut lease = got.expect("Renew and TakeOver come from an existing Lease");
                let old = lease.spec.clone().unwrap_or_default();
                let transitions =
                    old.lease_transitions.unwrap_or(0) + i32::from(action == Action::TakeOver);
                let acquire = (action == Action::Renew).then_some(old.acquire_time).flatten();
                lease.spec = Some(self.spec(acquire, transitions));
                tokio::time::timeout(
                    self.retry,
                    self.api.replace(&name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        let t = self.tracked.get_mut(&vip).expect("tracked above");
        match result {
            Ok(Ok(written)) => {
                t.written = Some(Instant::now());
                t.record = record(Some(&written));
                t.seen_since = Instant::now();
                Ok(())
            }
            // A conflict means someone else wrote the Lease since we read
            // it: it is not ours (any more), stop at once. Any other
            // failure keeps a held Lease until its limit (`held`), so a
            // brief API outage does not flap the announcement.
            Ok(Err(e)) => {
                let conflict = matches!(&e, kube::Error::Api(s) if s.code == 409);
                if action != Action::Renew || conflict {
                    t.written = None;
                }
                Err(Error::Lease { step: action.as_str(), name, cause: e })
            }
            Err(_) => Err(Error::LeaseTimeout { step: action.as_str(), name }),
        }
    }

    /// Gives a held Lease up (holder cleared), so another node takes over
    /// without waiting for it to expire.
    async fn release(&mut self, vip: IpAddr) -> crate::Result<()> {
        let held = self.tracked.get(&vip).is_some_and(|t| t.written.is_some());
        if let Some(t) = self.tracked.get_mut(&vip) {
            t.written = None;
        }
        if !held {
            return Ok(());
        }
        let name = lease_name(vip);
        let failed = |step, cause| Error::Lease { step, name: name.clone(), cause };
        let Some(mut lease) = self.api.get_opt(&name).await.map_err(|e| failed("reading", e))?
        else {
            return Ok(());
        };
        if lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) != Some(self.me.as_str())
        {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        self.api
            .replace(&name, &PostParams::default(), &lease)
            .await
            .map_err(|e| failed("releasing", e))?;
        Ok(())
    }

    /// Releases every held Lease (SIGTERM).
    pub async fn release_all(&mut self) {
        for vip in self.tracked.keys().copied().collect::<Vec<_>>() {
            let _ = tokio::time::timeout(self.retry, self.release(vip)).await;
        }
        self.tracked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(h: Option<&str>, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: h.map(str::to_owned),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let s = Duration::from_secs;
        let retry = s(2);
        // Absent: the preferred node creates at once, others wait a retry.
        assert_eq!(decide("a", None, s(0), true, retry), Action::Create);
        assert_eq!(decide("b", None, s(0), false, retry), Action::Wait);
        assert_eq!(decide("b", None, s(3), false, retry), Action::Create);
        // Ours: renew.
        assert_eq!(decide("a", Some(&held_by(Some("a"), 10)), s(0), false, retry), Action::Renew);
        // Someone else's: wait until unchanged for the whole duration.
        assert_eq!(decide("b", Some(&held_by(Some("a"), 10)), s(9), true, retry), Action::Wait);
        assert_eq!(
            decide("b", Some(&held_by(Some("a"), 10)), s(10), false, retry),
            Action::TakeOver
        );
        // Released (holder cleared): preferred at once, others after a retry.
        assert_eq!(decide("a", Some(&held_by(None, 1)), s(0), true, retry), Action::TakeOver);
        assert_eq!(decide("b", Some(&held_by(Some(""), 1)), s(0), false, retry), Action::Wait);
        assert_eq!(decide("b", Some(&held_by(None, 1)), s(2), false, retry), Action::TakeOver);
    }
}
