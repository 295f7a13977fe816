//! Process wiring: signals, HTTP endpoints, API client, leader election and
//! the controller. `main` only parses flags and sets up logging.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info};

use crate::controller::{self, FIELD_MANAGER};
use crate::error::Error;
use crate::leader::{self, Outcome};
use crate::metrics::Metrics;
use kube_dsr_process::Shutdown;
use kube_dsr_process::http::{self, Health};

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per replica (the pod name).
    pub identity: String,
    /// Seconds a lease is valid without renewal (> `grace`).
    pub duration: u64,
    /// Seconds before expiry at which the holder renews (> 0).
    pub grace: u64,
}

/// What `main` passes in.
#[derive(Clone, Debug)]
pub struct Config {
    pub http_addr: SocketAddr,
    /// `None` runs without leader election (a single replica, or development).
    pub lease: Option<LeaseConfig>,
    /// Serve class-less LoadBalancer Services too.
    pub default_class: bool,
}

/// Everything that runs only while leading, until `stop` resolves: the
/// DsrService controller, the address manager (pools) and the Service
/// controller.
async fn controllers(
    client: Client,
    metrics: Arc<Metrics>,
    default_class: bool,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let stop = stop.shared();
    tokio::join!(
        controller::run(client.clone(), metrics, stop.clone()),
        crate::pool::run(client.clone(), stop.clone()),
        crate::lbservice::run(client, default_class, stop),
    );
}

/// Runs the operator until SIGTERM (`Ok`) or until the lease is lost
/// (`Err(LostLease)`, so the process restarts as a follower).
pub async fn run(config: Config) -> Result<(), Error> {
    let shutdown = Shutdown::on_signals();
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(Arc::clone(&metrics)));
    let server = http::serve(config.http_addr, Arc::clone(&health), shutdown.requested()).await?;
    let server = tokio::spawn(server);
    info!(addr = %config.http_addr, "serving /metrics, /healthz, /readyz");

    let (client, version) = kube_dsr_process::api::connect().await?;
    info!(%version, "connected to the API server");
    health.set_ready(true);

    let outcome = match &config.lease {
        Some(lease) => {
            let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
                .with_namespace(&lease.namespace)
                .with_identity(&lease.identity)
                .with_duration(lease.duration)
                .with_grace(lease.grace)
                // Unique per replica: server-side apply detects two
                // candidates racing for the lease only between distinct
                // field managers.
                .with_field_manager(format!("{FIELD_MANAGER}-lease-{}", lease.identity))
                .build()
                .await
                .map_err(Error::Lease)?;
            info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for the leader lease");
            let (manager_rx, lease_task) = manager.watch().await;
            // Checked every `grace` seconds; when the Lease cannot be read,
            // step down `grace` seconds before the expiry last seen.
            let leader_rx = leader::guarded(
                manager_rx,
                Api::namespaced(client.clone(), &lease.namespace),
                lease.name.clone(),
                leader::Guard::new(&lease.identity, Duration::from_secs(lease.grace)),
                Duration::from_secs(lease.grace),
            );
            let m = Arc::clone(&metrics);
            let outcome = leader::lead(
                leader_rx,
                shutdown.receiver(),
                move |is| m.set_leader(is),
                |stop| {
                    controllers(client.clone(), Arc::clone(&metrics), config.default_class, stop)
                },
            )
            .await;
            // `lead` dropped the receiver, so the guard ended and dropped
            // the manager's: the lease manager releases the lease (if
            // held) and ends, so a successor need not wait.
            match lease_task.await {
                Ok(Ok(_)) => info!("leader lease released"),
                Ok(Err(e)) => error!(error = %e, "releasing the leader lease failed"),
                Err(e) => error!(error = %e, "lease task failed"),
            }
            outcome
        }
        None => {
            metrics.set_leader(true);
            controllers(client, Arc::clone(&metrics), config.default_class, shutdown.requested())
                .await;
            Outcome::Shutdown
        }
    };

    health.set_ready(false);
    shutdown.trigger();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "HTTP server failed"),
        Err(e) => error!(error = %e, "HTTP server task failed"),
    }
    match outcome {
        Outcome::LostLease => Err(Error::LostLease),
        Outcome::Shutdown | Outcome::WorkEnded => Ok(()),
    }
}
