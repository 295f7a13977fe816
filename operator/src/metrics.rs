//! Prometheus metrics (`kubedsr_operator_*`). Every label has a fixed set of
//! values; nothing is labelled by service name, so cardinality stays bounded
//! however many services a cluster has.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use kube::runtime::reflector::Store;
use kube_dsr_crds::DsrService;
use kube_dsr_crds::dsrservice::conditions;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    condition: &'static str,
    status: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
    services: Arc<RwLock<Option<Store<DsrService>>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kubedsr_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations of a DsrService", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed reconciliations, by error kind",
            failures.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time to reconcile one DsrService",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let services = Arc::new(RwLock::new(None));
        registry.register_collector(Box::new(ServicesByCondition(services.clone())));
        Metrics { registry, reconciles, failures, duration, leader, services }
    }
}

impl Metrics {
    /// Counts services by the status of each condition on every scrape,
    /// reading the controller's cache (so deleted services drop out).
    /// Until then (a follower has no cache) every count is 0.
    pub fn watch_services(&self, store: Store<DsrService>) {
        *self.services.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, error: &crate::Error) {
        self.failures.get_or_create(&ErrorLabels { error: error.metric_label() }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl kube_dsr_process::http::Render for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

struct ServicesByCondition(Arc<RwLock<Option<Store<DsrService>>>>);

impl std::fmt::Debug for ServicesByCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServicesByCondition")
    }
}

const CONDITIONS: [&str; 4] = [
    conditions::ACCEPTED,
    conditions::PROGRAMMED,
    conditions::BACKENDS_READY,
    conditions::CONFLICT,
];
const STATUSES: [&str; 3] = ["True", "False", "Unknown"];

/// (condition, status) → number of services, for the fixed label sets.
pub fn count_by_condition(services: &[Arc<DsrService>]) -> Vec<(&'static str, &'static str, i64)> {
    let mut out = Vec::new();
    for cond in CONDITIONS {
        for status in STATUSES {
            let n = services
                .iter()
                .filter(|s| {
                    let have = s
                        .status
                        .as_ref()
                        .and_then(|st| st.conditions.iter().find(|c| c.type_ == cond))
                        .map_or("Unknown", |c| c.status.as_str());
                    have == status
                })
                .count();
            out.push((cond, status, n as i64));
        }
    }
    out
}

impl Collector for ServicesByCondition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let services = match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            Some(store) => store.state(),
            None => Vec::new(),
        };
        let counts = count_by_condition(&services);
        let mut family = encoder.encode_descriptor(
            "services",
            "DsrServices by condition and status",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (condition, status, n) in counts {
            let labels = ConditionLabels { condition, status };
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use kube::runtime::reflector;
    use kube::runtime::watcher;
    use kube_dsr_crds::DsrServiceStatus;

    #[test]
    fn exposition_has_fixed_labels_and_service_counts() {
        let (store, mut writer) = reflector::store::<DsrService>();
        let mut programmed = service("a", &["192.0.2.10"], 1);
        programmed.status = Some(DsrServiceStatus {
            conditions: vec![Condition {
                type_: "Programmed".into(),
                status: "True".into(),
                reason: "Programmed".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: crate::testutil::time(1),
            }],
            ..Default::default()
        });
        writer.apply_watcher_event(&watcher::Event::Apply(programmed));
        writer.apply_watcher_event(&watcher::Event::Apply(service("b", &["192.0.2.11"], 1)));
        let m = Metrics::default();
        m.watch_services(store);
        m.reconciled(Duration::from_millis(3));
        m.failed(&crate::Error::LostLease);
        m.set_leader(true);
        let text = m.render();
        for line in [
            "kubedsr_operator_reconciles_total 1",
            "kubedsr_operator_reconcile_failures_total{error=\"lost_lease\"} 1",
            "kubedsr_operator_leader 1",
            "kubedsr_operator_services{condition=\"Programmed\",status=\"True\"} 1",
            "kubedsr_operator_services{condition=\"Programmed\",status=\"Unknown\"} 1",
            "kubedsr_operator_services{condition=\"Conflict\",status=\"Unknown\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("kubedsr_operator_reconcile_duration_seconds_bucket"));
    }
}
