//! The status a service should have and the events its changes deserve,
//! computed from what was observed. No I/O here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube_dsr_crds::dsrservice::conditions::{self, reasons};
use kube_dsr_crds::validation::{FieldError, parse_ip};
use kube_dsr_crds::{
    Announcement, DsrNodeReportSpec, DsrServiceSpec, DsrServiceStatus, IngressErrorReason,
    IngressReport, NodeReach, StatusSummary, VipStatus,
};

use crate::backends::Counts;
use crate::conflicts::{Conflict, describe};
use crate::ingress::IngressPlan;

/// Everything the status is computed from.
pub struct Observation<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub generation: Option<i64>,
    pub spec: &'a DsrServiceSpec,
    /// Validation failures; non-empty means not accepted.
    pub invalid: &'a [FieldError],
    /// Claims held by earlier services; non-empty means no backend set.
    pub conflicts: &'a [Conflict],
    pub counts: Counts,
    /// Backends that are not serving, with why (`pod a: node n3 runs no
    /// dsr-agent`), for the BackendsReady message.
    pub not_serving: &'a [String],
    pub plan: &'a IngressPlan,
    pub reports: &'a BTreeMap<String, &'a DsrNodeReportSpec>,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// At most five names, then a count, to keep messages short on big clusters.
fn short_list(names: &[&str]) -> String {
    let mut s = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s.push_str(&format!(" and {} more", names.len() - 5));
    }
    s
}

fn ports_summary(spec: &DsrServiceSpec) -> String {
    spec.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect::<Vec<_>>().join(",")
}

/// The status to write. `previous` keeps `lastTransitionTime` of conditions
/// whose status did not change, so an unchanged world gives an identical
/// status and no write. Each condition is its own function below.
pub fn desired_status(
    obs: &Observation<'_>,
    previous: Option<&DsrServiceStatus>,
    now: &Time,
) -> DsrServiceStatus {
    let active = obs.invalid.is_empty() && obs.conflicts.is_empty();
    let vips = vip_statuses(obs, active);
    let mut conds = vec![
        accepted_condition(obs, now),
        programmed_condition(obs, &vips, now),
        backends_ready_condition(obs, now),
        conflict_condition(obs, now),
    ];
    if let Some(prev) = previous {
        for c in &mut conds {
            if let Some(p) = prev.conditions.iter().find(|p| p.type_ == c.type_)
                && p.status == c.status
            {
                c.last_transition_time = p.last_transition_time.clone();
            }
        }
    }

    let counts = if active { obs.counts } else { Counts::default() };
    DsrServiceStatus {
        observed_generation: obs.generation,
        conditions: conds,
        ready_backends: counts.ready,
        total_backends: counts.total,
        ingress_nodes: if active { obs.plan.nodes.clone() } else { Vec::new() },
        vips,
        reach: if active { node_reach(obs) } else { Vec::new() },
        summary: Some(StatusSummary {
            ports: ports_summary(obs.spec),
            backends: format!("{}/{}", counts.ready, counts.total),
        }),
    }
}

/// This service's entry in `node`'s report.
fn entry<'a>(obs: &Observation<'a>, node: &str) -> Option<&'a IngressReport> {
    obs.reports.get(node).and_then(|r| r.ingress_for(obs.namespace, obs.name))
}

fn accepted_condition(obs: &Observation<'_>, now: &Time) -> Condition {
    let g = obs.generation;
    if obs.invalid.is_empty() {
        condition(conditions::ACCEPTED, true, reasons::VALID, "spec is valid".into(), g, now)
    } else {
        let msg = obs.invalid.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        condition(conditions::ACCEPTED, false, reasons::INVALID, msg, g, now)
    }
}

fn conflict_condition(obs: &Observation<'_>, now: &Time) -> Condition {
    let g = obs.generation;
    if obs.conflicts.is_empty() {
        condition(
            conditions::CONFLICT,
            false,
            reasons::NO_CONFLICT,
            "no other DsrService claims these VIP ports".into(),
            g,
            now,
        )
    } else {
        condition(
            conditions::CONFLICT,
            true,
            reasons::PORT_CONFLICT,
            describe(obs.conflicts),
            g,
            now,
        )
    }
}

/// Per VIP, the node answering ARP/ND for it: agents elect the announcer
/// among the ingress nodes with a Lease per VIP; the plan's choice is who
/// tries first. Status names the node whose report says it answers, else
/// the one expected to.
fn vip_statuses(obs: &Observation<'_>, active: bool) -> Vec<VipStatus> {
    obs.plan
        .announcers
        .iter()
        .map(|(vip, preferred)| {
            let v = vip.to_string();
            let announces = |n: &str| entry(obs, n).is_some_and(|i| i.announced_vips.contains(&v));
            let holder = preferred
                .as_ref()
                .and_then(|_| obs.plan.nodes.iter().find(|n| announces(n.as_str())));
            let node = holder.or(preferred.as_ref()).cloned().filter(|_| active);
            VipStatus { address: v, announcing_node: node, announced: active && holder.is_some() }
        })
        .collect()
}

/// `Programmed`: every ingress node reports this generation with every VIP
/// in its dataplane, and in ARP mode each VIP is announced. A node that
/// refused the service or failed to program it says why, in the node's own
/// words: a full dataplane gives `CapacityExceeded`, any other failure
/// `ProgrammingFailed`; nodes that have not answered yet give `Pending`.
fn programmed_condition(obs: &Observation<'_>, vips: &[VipStatus], now: &Time) -> Condition {
    let g = obs.generation;
    let false_ = |reason, msg: &str| {
        condition(conditions::PROGRAMMED, false, reason, msg.to_string(), g, now)
    };
    if !obs.invalid.is_empty() {
        return false_(reasons::NOT_ACCEPTED, "spec is invalid; nothing is programmed");
    }
    if !obs.conflicts.is_empty() {
        return false_(
            reasons::IN_CONFLICT,
            "in conflict with an earlier DsrService; nothing is programmed",
        );
    }
    if obs.plan.nodes.is_empty() {
        return false_(
            reasons::NO_INGRESS_NODES,
            "no Ready node matching spec.ingress.nodeSelector runs dsr-agent",
        );
    }
    let addresses: Vec<String> =
        obs.spec.vips.iter().filter_map(|v| parse_ip(v)).map(|v| v.to_string()).collect();
    let programmed_on = |node: &str| {
        entry(obs, node).is_some_and(|i| {
            Some(i.observed_generation) == g
                && addresses.iter().all(|v| i.programmed_vips.contains(v))
        })
    };
    let waiting: Vec<&str> =
        obs.plan.nodes.iter().map(String::as_str).filter(|n| !programmed_on(n)).collect();
    let arp = obs.spec.ingress.announcement == Announcement::Arp;
    let unannounced: Vec<&str> =
        vips.iter().filter(|v| arp && !v.announced).map(|v| v.address.as_str()).collect();
    let total = obs.plan.nodes.len();
    if waiting.is_empty() && unannounced.is_empty() {
        return condition(
            conditions::PROGRAMMED,
            true,
            reasons::PROGRAMMED,
            format!("programmed on {total} ingress node(s)"),
            g,
            now,
        );
    }
    // Nodes that said why they did not program it, worst first.
    let failed: Vec<(&str, IngressErrorReason, &str)> = waiting
        .iter()
        .filter_map(|n| {
            let i = entry(obs, n)?;
            Some((*n, i.error_reason?, i.error.as_deref().unwrap_or("no detail")))
        })
        .collect();
    let refused: Vec<String> = failed
        .iter()
        .filter(|(_, r, _)| *r == IngressErrorReason::CapacityExceeded)
        .map(|(n, _, e)| format!("{n}: {e}"))
        .collect();
    let other: Vec<String> = failed
        .iter()
        .filter(|(_, r, _)| *r != IngressErrorReason::CapacityExceeded)
        .map(|(n, _, e)| format!("{n}: {e}"))
        .collect();
    let mut msg = format!(
        "{} of {total} ingress node(s) programmed generation {}",
        total - waiting.len(),
        g.unwrap_or_default()
    );
    if !refused.is_empty() {
        let r: Vec<&str> = refused.iter().map(String::as_str).collect();
        msg.push_str(&format!("; refused (dataplane full) by {}", short_list(&r)));
    }
    if !other.is_empty() {
        let o: Vec<&str> = other.iter().map(String::as_str).collect();
        msg.push_str(&format!("; failed on {}", short_list(&o)));
    }
    let silent: Vec<&str> =
        waiting.iter().copied().filter(|n| !failed.iter().any(|(f, _, _)| f == n)).collect();
    if !silent.is_empty() {
        msg.push_str(&format!("; waiting for {}", short_list(&silent)));
    }
    if !unannounced.is_empty() {
        msg.push_str(&format!("; not yet announced: {}", unannounced.join(", ")));
    }
    let reason = if !refused.is_empty() {
        reasons::CAPACITY_EXCEEDED
    } else if !other.is_empty() {
        reasons::PROGRAMMING_FAILED
    } else {
        reasons::PENDING
    };
    condition(conditions::PROGRAMMED, false, reason, msg, g, now)
}

/// How each ingress node reaches the backends, from its report.
fn node_reach(obs: &Observation<'_>) -> Vec<NodeReach> {
    obs.plan
        .nodes
        .iter()
        .filter_map(|n| {
            let i = entry(obs, n)?;
            Some(NodeReach {
                node: n.clone(),
                direct: i.reach.direct,
                via_node: i.reach.via_node,
                local: i.reach.local,
                unreached: i32::try_from(i.unreached.len()).unwrap_or(i32::MAX),
            })
        })
        .collect()
}

/// `BackendsReady`: how many backends take new flows, and why the others
/// do not (not ready, or not reached from an ingress node).
fn backends_ready_condition(obs: &Observation<'_>, now: &Time) -> Condition {
    let g = obs.generation;
    if !obs.invalid.is_empty() {
        let msg = "spec is invalid".into();
        return condition(conditions::BACKENDS_READY, false, reasons::NOT_ACCEPTED, msg, g, now);
    }
    if !obs.conflicts.is_empty() {
        let msg = "no backend set while in conflict".into();
        return condition(conditions::BACKENDS_READY, false, reasons::IN_CONFLICT, msg, g, now);
    }
    let unreached: Vec<String> = obs
        .plan
        .nodes
        .iter()
        .filter_map(|n| Some((n, entry(obs, n)?)))
        .flat_map(|(n, i)| {
            i.unreached.iter().map(move |u| format!("{} from {n}: {}", u.address, u.reason))
        })
        .collect();
    let why = |msg: &mut String| {
        if !obs.not_serving.is_empty() {
            let names: Vec<&str> = obs.not_serving.iter().map(String::as_str).collect();
            msg.push_str(&format!("; not ready: {}", short_list(&names)));
        }
        if !unreached.is_empty() {
            let names: Vec<&str> = unreached.iter().map(String::as_str).collect();
            msg.push_str(&format!("; not reached: {}", short_list(&names)));
        }
    };
    let c = obs.counts;
    if c.total == 0 {
        let msg = if obs.spec.selector.is_some() {
            "the selector matches no running pod with an address in this namespace"
        } else {
            "no static backends"
        };
        condition(conditions::BACKENDS_READY, false, reasons::NO_BACKENDS, msg.into(), g, now)
    } else if c.ready == 0 {
        let mut msg = format!("0 of {} backends ready", c.total);
        if obs.not_serving.is_empty() {
            msg.push_str(" (pod not Ready, or not yet delivered by dsr-agent on its node)");
        }
        why(&mut msg);
        condition(conditions::BACKENDS_READY, false, reasons::NONE_READY, msg, g, now)
    } else {
        let reason = if c.ready == c.total { reasons::ALL_READY } else { reasons::SOME_READY };
        let mut msg = format!("{} of {} backends ready", c.ready, c.total);
        why(&mut msg);
        condition(conditions::BACKENDS_READY, true, reason, msg, g, now)
    }
}

/// Event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// An event to publish about a status change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub kind: EventKind,
    /// Fixed CamelCase reason.
    pub reason: &'static str,
    pub note: String,
}

fn find<'a>(s: Option<&'a DsrServiceStatus>, t: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
}

fn became(
    old: Option<&DsrServiceStatus>,
    new: &DsrServiceStatus,
    t: &str,
    status: &str,
) -> Option<String> {
    let n = find(Some(new), t)?;
    let was = find(old, t).map(|c| c.status.as_str());
    (n.status == status && was != Some(status)).then(|| n.message.clone())
}

/// Events for the transitions from `old` to `new`: one per change worth a
/// human's attention, none when nothing changed (so a resync is silent).
pub fn events(old: Option<&DsrServiceStatus>, new: &DsrServiceStatus) -> Vec<EventSpec> {
    let mut out = Vec::new();
    let mut push = |kind, reason, note: Option<String>| {
        if let Some(note) = note {
            out.push(EventSpec { kind, reason, note });
        }
    };
    push(EventKind::Warning, "InvalidSpec", became(old, new, conditions::ACCEPTED, "False"));
    push(EventKind::Warning, "PortConflict", became(old, new, conditions::CONFLICT, "True"));
    // Resolution is only news when there was a conflict before.
    if find(old, conditions::CONFLICT).is_some() {
        push(
            EventKind::Normal,
            "ConflictResolved",
            became(old, new, conditions::CONFLICT, "False"),
        );
    }
    push(EventKind::Normal, "Programmed", became(old, new, conditions::PROGRAMMED, "True"));
    // A node refusing the service for capacity needs an operator's hand.
    let refused = |s: Option<&DsrServiceStatus>| {
        find(s, conditions::PROGRAMMED).is_some_and(|c| c.reason == reasons::CAPACITY_EXCEEDED)
    };
    if refused(Some(new)) && !refused(old) {
        push(
            EventKind::Warning,
            "CapacityExceeded",
            find(Some(new), conditions::PROGRAMMED).map(|c| c.message.clone()),
        );
    }
    if find(old, conditions::BACKENDS_READY).is_some_and(|c| c.status == "True") {
        push(
            EventKind::Warning,
            "NoReadyBackends",
            became(old, new, conditions::BACKENDS_READY, "False"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conflicts::Claim;
    use crate::testutil::*;
    use kube_dsr_crds::{IngressReport, Protocol};

    fn ingress_report(
        node: &str,
        generation: i64,
        programmed: &[&str],
        announced: &[&str],
    ) -> DsrNodeReportSpec {
        let mut r = report(node, &[]);
        r.ingress.push(IngressReport {
            namespace: "default".into(),
            name: "web".into(),
            observed_generation: generation,
            programmed_vips: programmed.iter().map(|s| s.to_string()).collect(),
            announced_vips: announced.iter().map(|s| s.to_string()).collect(),
            backends: 1,
            error: None,
            error_reason: None,
            reach: Default::default(),
            unreached: vec![],
        });
        r
    }

    fn plan_on(nodes: &[&str], announcer: Option<&str>) -> IngressPlan {
        IngressPlan {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            announcers: vec![("192.0.2.10".parse().unwrap(), announcer.map(str::to_string))],
        }
    }

    fn status_for(
        counts: Counts,
        plan: &IngressPlan,
        reports: &[DsrNodeReportSpec],
        invalid: &[FieldError],
        conflicts: &[Conflict],
        previous: Option<&DsrServiceStatus>,
        now: i64,
    ) -> DsrServiceStatus {
        let svc = service("web", &["192.0.2.10"], 1);
        let reports = reports.iter().map(|r| (r.node_name.clone(), r)).collect();
        let obs = Observation {
            namespace: "default",
            name: "web",
            generation: Some(1),
            spec: &svc.spec,
            invalid,
            conflicts,
            counts,
            not_serving: &[],
            plan,
            reports: &reports,
        };
        desired_status(&obs, previous, &time(now))
    }

    fn cond<'a>(s: &'a DsrServiceStatus, t: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn status_says_how_backends_are_reached_and_why_some_are_not() {
        use kube_dsr_crds::{ReachCounts, UnreachedBackend};
        let plan = plan_on(&["n1", "n2"], Some("n1"));
        let mut r1 = ingress_report("n1", 1, &["192.0.2.10"], &["192.0.2.10"]);
        r1.ingress[0].reach = ReachCounts { direct: 1, via_node: 3, local: 2 };
        r1.ingress[0].unreached = vec![UnreachedBackend {
            address: "10.244.3.2".into(),
            node: Some("far".into()),
            reason: "node far is not on the ingress segment".into(),
        }];
        let r2 = ingress_report("n2", 1, &["192.0.2.10"], &[]);
        let svc = service("web", &["192.0.2.10"], 1);
        let reports = [r1, r2];
        let reports = reports.iter().map(|r| (r.node_name.clone(), r)).collect();
        let not_serving = vec!["pod c: node n3 runs no dsr-agent".to_string()];
        let obs = Observation {
            namespace: "default",
            name: "web",
            generation: Some(1),
            spec: &svc.spec,
            invalid: &[],
            conflicts: &[],
            counts: Counts { ready: 6, total: 8 },
            not_serving: &not_serving,
            plan: &plan,
            reports: &reports,
        };
        let s = desired_status(&obs, None, &time(1));
        assert_eq!(
            s.reach,
            [
                NodeReach { node: "n1".into(), direct: 1, via_node: 3, local: 2, unreached: 1 },
                NodeReach { node: "n2".into(), ..Default::default() },
            ]
        );
        let c = s.conditions.iter().find(|c| c.type_ == conditions::BACKENDS_READY).unwrap();
        assert_eq!(
            c.message,
            "6 of 8 backends ready; not ready: pod c: node n3 runs no dsr-agent; not reached: \
             10.244.3.2 from n1: node far is not on the ingress segment"
        );
        // Nothing ready: the message still says why.
        let obs = Observation { counts: Counts { ready: 0, total: 1 }, ..obs };
        let s = desired_status(&obs, None, &time(1));
        let c = s.conditions.iter().find(|c| c.type_ == conditions::BACKENDS_READY).unwrap();
        assert_eq!(c.reason, reasons::NONE_READY);
        assert!(
            c.message
                .starts_with("0 of 1 backends ready; not ready: pod c: node n3 runs no dsr-agent"),
            "{}",
            c.message
        );
    }

    #[test]
    fn healthy_service_is_programmed_with_ready_backends() {
        let plan = plan_on(&["n1", "n2"], Some("n1"));
        let reports = [
            ingress_report("n1", 1, &["192.0.2.10"], &["192.0.2.10"]),
            ingress_report("n2", 1, &["192.0.2.10"], &[]),
        ];
        let s = status_for(Counts { ready: 2, total: 3 }, &plan, &reports, &[], &[], None, 10);
        assert_eq!(cond(&s, conditions::ACCEPTED), ("True", reasons::VALID));
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("True", reasons::PROGRAMMED));
        assert_eq!(cond(&s, conditions::BACKENDS_READY), ("True", reasons::SOME_READY));
        assert_eq!(cond(&s, conditions::CONFLICT), ("False", reasons::NO_CONFLICT));
        assert_eq!((s.ready_backends, s.total_backends), (2, 3));
        assert_eq!(s.summary.as_ref().unwrap().backends, "2/3");
        assert_eq!(s.summary.as_ref().unwrap().ports, "80/TCP");
        assert_eq!(s.ingress_nodes, ["n1", "n2"]);
        assert_eq!(s.vips[0].announcing_node.as_deref(), Some("n1"));
        assert!(s.vips[0].announced);
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn the_lease_holder_is_the_announcer_even_when_the_plan_preferred_another() {
        // Agents elect by Lease; after a failover the holder is not the
        // node rendezvous hashing prefers, and status must say who answers.
        let plan = plan_on(&["n1", "n2"], Some("n1"));
        let reports = [
            ingress_report("n1", 1, &["192.0.2.10"], &[]),
            ingress_report("n2", 1, &["192.0.2.10"], &["192.0.2.10"]),
        ];
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &reports, &[], &[], None, 10);
        assert_eq!(s.vips[0].announcing_node.as_deref(), Some("n2"));
        assert!(s.vips[0].announced);
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("True", reasons::PROGRAMMED));
        // Nobody answers yet: the preferred node is named, not announced.
        let quiet = [
            ingress_report("n1", 1, &["192.0.2.10"], &[]),
            ingress_report("n2", 1, &["192.0.2.10"], &[]),
        ];
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &quiet, &[], &[], None, 10);
        assert_eq!(s.vips[0].announcing_node.as_deref(), Some("n1"));
        assert!(!s.vips[0].announced);
        assert_eq!(cond(&s, conditions::PROGRAMMED).0, "False");
        // Routed mode (no preferred announcer): a stray claim is ignored.
        let routed = plan_on(&["n1", "n2"], None);
        let s = status_for(Counts { ready: 1, total: 1 }, &routed, &reports, &[], &[], None, 10);
        assert_eq!(s.vips[0].announcing_node, None);
        assert!(!s.vips[0].announced);
    }

    #[test]
    fn programmed_waits_for_every_ingress_node_at_this_generation_and_the_announcer() {
        let plan = plan_on(&["n1", "n2"], Some("n1"));
        let old_gen = [
            ingress_report("n1", 1, &["192.0.2.10"], &["192.0.2.10"]),
            ingress_report("n2", 0, &["192.0.2.10"], &[]),
        ];
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &old_gen, &[], &[], None, 10);
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("False", reasons::PENDING));
        let msg = &s.conditions[1].message;
        assert!(msg.contains("1 of 2") && msg.contains("waiting for n2"), "{msg}");

        let unannounced = [
            ingress_report("n1", 1, &["192.0.2.10"], &[]),
            ingress_report("n2", 1, &["192.0.2.10"], &[]),
        ];
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &unannounced, &[], &[], None, 10);
        assert!(s.conditions[1].message.contains("not yet announced: 192.0.2.10"));
        assert!(!s.vips[0].announced);
    }

    #[test]
    fn a_node_that_refused_or_failed_the_service_says_why_in_its_status() {
        let plan = plan_on(&["n1", "n2", "n3"], None);
        let mut full = ingress_report("n1", 0, &[], &[]);
        full.ingress[0].error = Some("all 2048 service slots are in use".into());
        full.ingress[0].error_reason = Some(IngressErrorReason::CapacityExceeded);
        let mut broken = ingress_report("n2", 0, &[], &[]);
        broken.ingress[0].error = Some("map DSR_BACKENDS_V1: EPERM".into());
        broken.ingress[0].error_reason = Some(IngressErrorReason::ProgrammingFailed);
        let reports = [full.clone(), broken.clone()];
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &reports, &[], &[], None, 10);
        let c = &s.conditions[1];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reasons::CAPACITY_EXCEEDED));
        assert_eq!(
            c.message,
            "0 of 3 ingress node(s) programmed generation 1; refused (dataplane full) by n1: \
             all 2048 service slots are in use; failed on n2: map DSR_BACKENDS_V1: EPERM; \
             waiting for n3; not yet announced: 192.0.2.10"
        );
        let reasons_of =
            |e: Vec<EventSpec>| e.into_iter().map(|e| (e.kind, e.reason)).collect::<Vec<_>>();
        assert_eq!(reasons_of(events(None, &s)), [(EventKind::Warning, "CapacityExceeded")]);
        assert!(events(Some(&s), &s).is_empty(), "said once");

        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &[broken], &[], &[], None, 10);
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("False", reasons::PROGRAMMING_FAILED));
        // Once the node programs it, the reason goes with the error.
        let mut ok = full;
        ok.ingress[0] = ingress_report("n1", 1, &["192.0.2.10"], &["192.0.2.10"]).ingress.remove(0);
        let plan = plan_on(&["n1"], Some("n1"));
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &[ok], &[], &[], None, 10);
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("True", reasons::PROGRAMMED));
    }

    #[test]
    fn no_ingress_nodes_and_no_backends_are_explained() {
        let plan = plan_on(&[], None);
        let s = status_for(Counts::default(), &plan, &[], &[], &[], None, 10);
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("False", reasons::NO_INGRESS_NODES));
        assert_eq!(cond(&s, conditions::BACKENDS_READY), ("False", reasons::NO_BACKENDS));
        let s = status_for(Counts { ready: 0, total: 2 }, &plan, &[], &[], &[], None, 10);
        assert_eq!(cond(&s, conditions::BACKENDS_READY), ("False", reasons::NONE_READY));
    }

    #[test]
    fn conflict_blanks_the_programmed_state() {
        let plan = plan_on(&["n1"], Some("n1"));
        let conflicts = [Conflict {
            claim: Claim { vip: "192.0.2.10".parse().unwrap(), port: 80, protocol: Protocol::Tcp },
            holder: "default/older".into(),
        }];
        let s = status_for(Counts { ready: 1, total: 1 }, &plan, &[], &[], &conflicts, None, 10);
        assert_eq!(cond(&s, conditions::CONFLICT), ("True", reasons::PORT_CONFLICT));
        assert!(s.conditions[3].message.contains("192.0.2.10:80/TCP is held by default/older"));
        assert_eq!(cond(&s, conditions::PROGRAMMED), ("False", reasons::IN_CONFLICT));
        assert_eq!(cond(&s, conditions::BACKENDS_READY), ("False", reasons::IN_CONFLICT));
        assert_eq!((s.ready_backends, s.total_backends), (0, 0));
        assert!(s.ingress_nodes.is_empty());
        assert!(s.vips[0].announcing_node.is_none());
    }

    #[test]
    fn invalid_spec_is_not_accepted_with_the_messages() {
        let plan = plan_on(&[], None);
        let invalid =
            [FieldError { path: "spec.hashing.tableSize".into(), message: "bad size".into() }];
        let s = status_for(Counts::default(), &plan, &[], &invalid, &[], None, 10);
        assert_eq!(cond(&s, conditions::ACCEPTED), ("False", reasons::INVALID));
        assert_eq!(s.conditions[0].message, "spec.hashing.tableSize: bad size");
    }

    #[test]
    fn unchanged_world_gives_an_identical_status_and_no_events() {
        let plan = plan_on(&["n1"], Some("n1"));
        let reports = [ingress_report("n1", 1, &["192.0.2.10"], &["192.0.2.10"])];
        let first = status_for(Counts { ready: 1, total: 1 }, &plan, &reports, &[], &[], None, 10);
        let again =
            status_for(Counts { ready: 1, total: 1 }, &plan, &reports, &[], &[], Some(&first), 99);
        assert_eq!(first, again, "lastTransitionTime kept, so no write");
        assert!(events(Some(&first), &again).is_empty());
        // A status change moves only that condition's transition time.
        let fewer =
            status_for(Counts { ready: 0, total: 1 }, &plan, &reports, &[], &[], Some(&first), 99);
        assert_eq!(fewer.conditions[2].last_transition_time, time(99));
        assert_eq!(fewer.conditions[1].last_transition_time, time(10));
    }

    #[test]
    fn events_follow_transitions() {
        let plan = plan_on(&["n1"], Some("n1"));
        let reports = [ingress_report("n1", 1, &["192.0.2.10"], &["192.0.2.10"])];
        let good = status_for(Counts { ready: 1, total: 1 }, &plan, &reports, &[], &[], None, 10);
        let reasons_of =
            |e: Vec<EventSpec>| e.into_iter().map(|e| (e.kind, e.reason)).collect::<Vec<_>>();
        assert_eq!(reasons_of(events(None, &good)), [(EventKind::Normal, "Programmed")]);

        let conflicts = [Conflict {
            claim: Claim { vip: "192.0.2.10".parse().unwrap(), port: 80, protocol: Protocol::Tcp },
            holder: "default/older".into(),
        }];
        let clash =
            status_for(Counts::default(), &plan, &reports, &[], &conflicts, Some(&good), 20);
        assert_eq!(
            reasons_of(events(Some(&good), &clash)),
            [(EventKind::Warning, "PortConflict"), (EventKind::Warning, "NoReadyBackends")]
        );
        let back =
            status_for(Counts { ready: 1, total: 1 }, &plan, &reports, &[], &[], Some(&clash), 30);
        assert_eq!(
            reasons_of(events(Some(&clash), &back)),
            [(EventKind::Normal, "ConflictResolved"), (EventKind::Normal, "Programmed")]
        );
        let invalid = [FieldError { path: "spec".into(), message: "bad".into() }];
        let bad = status_for(Counts::default(), &plan, &[], &invalid, &[], None, 10);
        assert_eq!(reasons_of(events(None, &bad)), [(EventKind::Warning, "InvalidSpec")]);
    }
}
