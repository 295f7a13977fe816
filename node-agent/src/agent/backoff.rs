//! When a dataplane spec that failed is tried again: exponential back-off
//! per spec, capped, so a node with hundreds of refused services does not
//! retry each of them on every round. Pure: the caller passes the time.
//!
//! A failed spec is tried again at once when its spec changed (new input
//! may fit or succeed), and a spec refused for capacity also as soon as
//! something was removed from its dataplane (room may have been freed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube_dsr_crds::nodereport::IngressErrorReason;

use crate::dataplane::ServiceSpec;

/// Why a spec is not in the dataplane, as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub reason: IngressErrorReason,
}

impl Failure {
    /// From a dataplane error.
    pub fn of(e: &crate::Error) -> Self {
        Self {
            message: super::worker::chain(e),
            reason: if e.is_capacity() {
                IngressErrorReason::CapacityExceeded
            } else {
                IngressErrorReason::ProgrammingFailed
            },
        }
    }
}

/// First delay after a failure; doubled on every further failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(500);
/// Longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
struct Entry {
    failures: u32,
    next: Instant,
    /// The spec that failed (a different one is tried at once).
    spec: ServiceSpec,
    /// Its dataplane (interface name).
    ifname: String,
    failure: Failure,
}

#[derive(Clone, Debug, Default)]
pub struct Backoff {
    entries: BTreeMap<String, Entry>,
}

impl Backoff {
    /// `None`: try `spec` on `ifname` now. `Some`: it failed and its delay
    /// is not over; the last failure stands. `freed`: something was
    /// removed from `ifname`'s dataplane since the failure.
    pub fn hold(
        &self,
        ifname: &str,
        spec: &ServiceSpec,
        now: Instant,
        freed: bool,
    ) -> Option<&Failure> {
        let e = self.entries.get(&spec.name)?;
        let same = e.ifname == ifname && e.spec == *spec;
        let room = freed && e.failure.reason == IngressErrorReason::CapacityExceeded;
        (same && !room && now < e.next).then_some(&e.failure)
    }

    /// Records a failure; returns the delay before the next attempt.
    pub fn failed(
        &mut self,
        ifname: &str,
        spec: &ServiceSpec,
        failure: Failure,
        now: Instant,
    ) -> Duration {
        let failures = self.entries.get(&spec.name).map_or(0, |e| e.failures).saturating_add(1);
        let delay = FIRST_DELAY.saturating_mul(1 << (failures - 1).min(16)).min(MAX_DELAY);
        self.entries.insert(
            spec.name.clone(),
            Entry {
                failures,
                next: now + delay,
                spec: spec.clone(),
                ifname: ifname.to_owned(),
                failure,
            },
        );
        delay
    }

    pub fn succeeded(&mut self, name: &str) {
        self.entries.remove(name);
    }

    /// Forgets specs no longer wanted.
    pub fn retain(&mut self, wanted: impl Fn(&str) -> bool) {
        self.entries.retain(|name, _| wanted(name));
    }

    /// When the next held spec may be tried.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.next).min()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{PortSpec, Protocol, Stage};

    fn spec(name: &str, port: u16) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: "192.0.2.10".parse().unwrap(),
            ports: vec![PortSpec { port, protocol: Protocol::Tcp }],
            table_size: 251,
            backends: vec![],
            pin_all_flows: false,
            stage: Stage::Ingress,
        }
    }

    fn full() -> Failure {
        Failure { message: "full".into(), reason: IngressErrorReason::CapacityExceeded }
    }

    fn broken() -> Failure {
        Failure { message: "EPERM".into(), reason: IngressErrorReason::ProgrammingFailed }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_success_forgets() {
        let mut b = Backoff::default();
        let s = spec("a", 80);
        let t0 = Instant::now();
        let delays: Vec<Duration> = (0..10).map(|_| b.failed("eth0", &s, broken(), t0)).collect();
        assert_eq!(delays[0], FIRST_DELAY);
        assert_eq!(delays[1], FIRST_DELAY * 2);
        assert_eq!(delays[2], FIRST_DELAY * 4);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), MAX_DELAY);
        assert_eq!(b.next_due(), Some(t0 + MAX_DELAY));
        b.succeeded("a");
        assert!(b.is_empty());
        assert_eq!(b.failed("eth0", &s, broken(), t0), FIRST_DELAY, "starts over");
    }

    #[test]
    fn a_failed_spec_waits_for_its_delay_unless_it_changed() {
        let mut b = Backoff::default();
        let s = spec("a", 80);
        let t0 = Instant::now();
        let d = b.failed("eth0", &s, broken(), t0);
        assert_eq!(b.hold("eth0", &s, t0, false), Some(&broken()));
        assert_eq!(b.hold("eth0", &s, t0 + d / 2, false).map(|f| &f.message[..]), Some("EPERM"));
        assert_eq!(b.hold("eth0", &s, t0 + d, false), None, "delay over");
        assert_eq!(b.hold("eth0", &spec("a", 81), t0, false), None, "another spec");
        assert_eq!(b.hold("eth1", &s, t0, false), None, "another dataplane");
        assert_eq!(b.hold("eth0", &s, t0, true), Some(&broken()), "room does not fix EPERM");
        assert_eq!(b.hold("eth0", &spec("b", 80), t0, false), None, "never failed");
    }

    #[test]
    fn a_spec_refused_for_capacity_is_tried_once_room_is_freed() {
        let mut b = Backoff::default();
        let s = spec("a", 80);
        let t0 = Instant::now();
        b.failed("eth0", &s, full(), t0);
        assert!(b.hold("eth0", &s, t0, false).is_some());
        assert_eq!(b.hold("eth0", &s, t0, true), None);
        b.retain(|n| n != "a");
        assert_eq!(b.len(), 0);
    }
}
