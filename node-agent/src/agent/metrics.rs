//! Prometheus metrics (`kubedsr_agent_*`). Error labels are a fixed set
//! ([`ErrorKind`]); traffic is labelled by dataplane service name, VIP and
//! backend address, which are bounded by what this node programs.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::dataplane::Attached;
use crate::error::ErrorKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    interface: String,
    mode: &'static str,
}

/// One counter reading from the dataplane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficSample {
    /// Shared by the VIP's total and each of its backends' samples.
    pub service: Arc<str>,
    pub vip: Arc<str>,
    /// `None`: the VIP's total.
    pub backend: Option<IpAddr>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Traffic(RwLock<Vec<TrafficSample>>);

impl Collector for Traffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.0.read().unwrap_or_else(|e| e.into_inner());
        type Series = (&'static str, &'static str, bool, fn(&TrafficSample) -> u64);
        let series: [Series; 4] = [
            ("vip_packets", "Packets forwarded for a VIP (all its ports)", false, |s| s.packets),
            ("vip_bytes", "Bytes forwarded for a VIP (all its ports)", false, |s| s.bytes),
            ("backend_packets", "Packets forwarded to one backend of a VIP", true, |s| s.packets),
            ("backend_bytes", "Bytes forwarded to one backend of a VIP", true, |s| s.bytes),
        ];
        for (name, help, per_backend, value) in series {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in samples.iter().filter(|s| s.backend.is_some() == per_backend) {
                let backend = s.backend.map(|b| b.to_string());
                let mut labels = vec![("service", &*s.service), ("vip", &*s.vip)];
                if let Some(b) = &backend {
                    labels.push(("backend", b.as_str()));
                }
                let enc = family.encode_family(&labels)?;
                ConstCounter::new(value(s)).encode(enc)?;
            }
        }
        Ok(())
    }
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    errors: Family<ErrorLabels, Counter>,
    rounds: Histogram,
    programming: Histogram,
    attached: Family<AttachLabels, Gauge>,
    announced: Gauge,
    traffic: std::sync::Arc<Traffic>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Shared(std::sync::Arc<Traffic>);

impl Collector for Shared {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kubedsr_agent");
        let errors = Family::<ErrorLabels, Counter>::default();
        for kind in ErrorKind::ALL {
            // Present from the start, so rate() works on the first error.
            let _ = errors.get_or_create(&ErrorLabels { error: kind.as_str() });
        }
        let rounds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        let programming = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let attached = Family::<AttachLabels, Gauge>::default();
        let announced = Gauge::default();
        registry.register("reconcile_errors", "Errors while converging, by kind", errors.clone());
        registry.register_with_unit(
            "round_duration",
            "Time of one convergence round (dataplanes and backend pods)",
            Unit::Seconds,
            rounds.clone(),
        );
        registry.register_with_unit(
            "programming_latency",
            "Time to program one VIP's change into the dataplane",
            Unit::Seconds,
            programming.clone(),
        );
        registry.register(
            "xdp_attached",
            "1 for each interface with the XDP program, labelled by attach mode",
            attached.clone(),
        );
        registry.register("announced_vips", "VIPs this node answers ARP/ND for", announced.clone());
        let traffic = std::sync::Arc::new(Traffic::default());
        registry.register_collector(Box::new(Shared(traffic.clone())));
        Metrics { registry, errors, rounds, programming, attached, announced, traffic }
    }
}

impl Metrics {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&ErrorLabels { error: kind.as_str() }).inc();
    }

    pub fn round(&self, took: Duration) {
        self.rounds.observe(took.as_secs_f64());
    }

    pub fn programmed(&self, took: Duration) {
        self.programming.observe(took.as_secs_f64());
    }

    pub fn set_attached(&self, interface: &str, mode: Attached) {
        self.attached
            .get_or_create(&AttachLabels { interface: interface.to_owned(), mode: mode.as_str() })
            .set(1);
    }

    pub fn set_announced(&self, n: usize) {
        self.announced.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn set_traffic(&self, samples: Vec<TrafficSample>) {
        *self.traffic.0.write().unwrap_or_else(|e| e.into_inner()) = samples;
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl kube_dsr_process::http::Render for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_and_errors_render() {
        let m = Metrics::default();
        m.error(ErrorKind::Dataplane);
        m.set_attached("eth0", Attached::Generic);
        m.set_traffic(vec![
            TrafficSample {
                service: "default/web/v4".into(),
                vip: "192.0.2.10".into(),
                backend: None,
                packets: 7,
                bytes: 700,
            },
            TrafficSample {
                service: "default/web/v4".into(),
                vip: "192.0.2.10".into(),
                backend: Some("10.0.0.1".parse().unwrap()),
                packets: 3,
                bytes: 300,
            },
        ]);
        let text = m.render();
        for want in [
            "kubedsr_agent_reconcile_errors_total{error=\"dataplane\"} 1",
            "kubedsr_agent_reconcile_errors_total{error=\"netns\"} 0",
            "kubedsr_agent_xdp_attached{interface=\"eth0\",mode=\"generic\"} 1",
            "kubedsr_agent_vip_packets_total{service=\"default/web/v4\",vip=\"192.0.2.10\"} 7",
            "kubedsr_agent_backend_bytes_total{service=\"default/web/v4\",vip=\"192.0.2.10\",backend=\"10.0.0.1\"} 300",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(
            !text.contains(
                "vip_packets_total{service=\"default/web/v4\",vip=\"192.0.2.10\",backend"
            )
        );
        // Dashboards use these labels: every one present from the start.
        for label in
            ["kube_api", "dataplane", "capacity", "neighbour", "netns", "lease", "announce"]
        {
            let line = format!("kubedsr_agent_reconcile_errors_total{{error=\"{label}\"}} ");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        assert_eq!(text.matches("kubedsr_agent_reconcile_errors_total{").count(), 7);
        assert!(text.ends_with("# EOF\n"));
    }
}
