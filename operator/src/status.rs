//! The status a service should have and the events its changes deserve,
//! computed from what was observed. No I/O here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube_dsr_crds::dsrservice::conditions::{self, reasons};
use kube_dsr_crds::validation::{FieldError, parse_ip};
use kube_dsr_crds::{
    Announcement, DsrNodeReportSpec, DsrServiceSpec, DsrServiceStatus, NodeReach, StatusSummary,
    VipStatus,
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
/// status and no write.
pub fn desired_status(
    obs: &Observation<'_>,
    previous: Option<&DsrServiceStatus>,
    now: &Time,
) -> DsrServiceStatus {
    let g = obs.generation;
    let accepted = obs.invalid.is_empty();
    let in_conflict = !obs.conflicts.is_empty();
    let active = accepted && !in_conflict;

    let accepted_c = if accepted {
        condition(conditions::ACCEPTED, true, reasons::VALID, "spec is valid".into(), g, now)
    } else {
        let msg = obs.invalid.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        condition(conditions::ACCEPTED, false, reasons::INVALID, msg, g, now)
    };

    let conflict_c = if in_conflict {
        condition(
            conditions::CONFLICT,
            true,
            reasons::PORT_CONFLICT,
            describe(obs.conflicts),
            g,
            now,
        )
    } else {
        condition(
            conditions::CONFLICT,
            false,
            reasons::NO_CONFLICT,
            "no other DsrService claims these VIP ports".into(),
            g,
            now,
        )
    };

    // Which ingress nodes program this generation, and which VIPs are announced.
    let vips: Vec<String> =
        obs.spec.vips.iter().filter_map(|v| parse_ip(v)).map(|v| v.to_string()).collect();
    let programmed_on = |node: &str| {
        obs.reports.get(node).and_then(|r| r.ingress_for(obs.namespace, obs.name)).is_some_and(
            |i| {
                Some(i.observed_generation) == g
                    && vips.iter().all(|v| i.programmed_vips.contains(v))
            },
        )
    };
    let waiting: Vec<&str> =
        obs.plan.nodes.iter().map(String::as_str).filter(|n| !programmed_on(n)).collect();
    let vip_status: Vec<VipStatus> = obs
        .plan
        .announcers
        .iter()
        .map(|(vip, preferred)| {
            let v = vip.to_string();
            // Agents elect the announcer among the ingress nodes with a
            // Lease per VIP; the plan's choice is who tries first. Status
            // names the node that reports answering ARP/ND, else the one
            // expected to.
            let announces = |n: &str| {
                obs.reports
                    .get(n)
                    .and_then(|r| r.ingress_for(obs.namespace, obs.name))
                    .is_some_and(|i| i.announced_vips.contains(&v))
            };
            let holder = preferred
                .as_ref()
                .and_then(|_| obs.plan.nodes.iter().find(|n| announces(n.as_str())));
            let node = holder.or(preferred.as_ref()).cloned().filter(|_| active);
            VipStatus { address: v, announcing_node: node, announced: active && holder.is_some() }
        })
        .collect();
    let arp = obs.spec.ingress.announcement == Announcement::Arp;
    let unannounced: Vec<&str> =
        vip_status.iter().filter(|v| arp && !v.announced).map(|v| v.address.as_str()).collect();

    let programmed_c = if !accepted {
        condition(
            conditions::PROGRAMMED,
            false,
            reasons::NOT_ACCEPTED,
            "spec is invalid; nothing is programmed".into(),
            g,
            now,
        )
    } else if in_conflict {
        condition(
            conditions::PROGRAMMED,
            false,
            reasons::IN_CONFLICT,
            "in conflict with an earlier DsrService; nothing is programmed".into(),
            g,
            now,
        )
    } else if obs.plan.nodes.is_empty() {
        condition(
            conditions::PROGRAMMED,
            false,
            reasons::NO_INGRESS_NODES,
            "no Ready node matching spec.ingress.nodeSelector runs dsr-agent".into(),
            g,
            now,
        )
    } else if waiting.is_empty() && unannounced.is_empty() {
        let n = obs.plan.nodes.len();
        condition(
            conditions::PROGRAMMED,
            true,
            reasons::PROGRAMMED,
            format!("programmed on {n} ingress node(s)"),
            g,
            now,
        )
    } else {
        let done = obs.plan.nodes.len() - waiting.len();
        let mut msg = format!(
            "{done} of {} ingress node(s) programmed generation {}",
            obs.plan.nodes.len(),
            g.unwrap_or_default()
        );
        if !waiting.is_empty() {
            msg.push_str(&format!("; waiting for {}", short_list(&waiting)));
        }
        if !unannounced.is_empty() {
            msg.push_str(&format!("; not yet announced: {}", unannounced.join(", ")));
        }
        condition(conditions::PROGRAMMED, false, reasons::PENDING, msg, g, now)
    };

    // How each ingress node reaches the backends, and what it does not
    // reach, from its report.
    let reach: Vec<NodeReach> = if active {
        obs.plan
            .nodes
            .iter()
            .filter_map(|n| {
                let i = obs.reports.get(n)?.ingress_for(obs.namespace, obs.name)?;
                Some(NodeReach {
                    node: n.clone(),
                    direct: i.reach.direct,
                    via_node: i.reach.via_node,
                    local: i.reach.local,
                    unreached: i32::try_from(i.unreached.len()).unwrap_or(i32::MAX),
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let unreached: Vec<String> = obs
        .plan
        .nodes
        .iter()
        .filter_map(|n| Some((n, obs.reports.get(n)?.ingress_for(obs.namespace, obs.name)?)))
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
    let backends_c = if !accepted {
        condition(
            conditions::BACKENDS_READY,
            false,
            reasons::NOT_ACCEPTED,
            "spec is invalid".into(),
            g,
            now,
        )
    } else if in_conflict {
        condition(
            conditions::BACKENDS_READY,
            false,
            reasons::IN_CONFLICT,
            "no backend set while in conflict".into(),
            g,
            now,
        )
    } else if c.total == 0 {
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
    };

    let mut conds = vec![accepted_c, programmed_c, backends_c, conflict_c];
    if let Some(prev) = previous {
        for c in &mut conds {
            if let Some(p) = prev.conditions.iter().find(|p| p.type_ == c.type_)
                && p.status == c.status
            {
                c.last_transition_time = p.last_transition_time.clone();
            }
        }
    }

    let counts = if active { c } else { Counts::default() };
    DsrServiceStatus {
        observed_generation: g,
        conditions: conds,
        ready_backends: counts.ready,
        total_backends: counts.total,
        ingress_nodes: if active { obs.plan.nodes.clone() } else { Vec::new() },
        vips: vip_status,
        reach,
        // The address manager's fields, never part of this writer's apply.
        allocated_vips: Vec::new(),
        vip_allocated: None,
        summary: Some(StatusSummary {
            ports: ports_summary(obs.spec),
            backends: format!("{}/{}", counts.ready, counts.total),
        }),
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
