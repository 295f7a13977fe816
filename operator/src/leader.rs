//! Runs the controller only while this replica holds the leader lease.
//!
//! The lease itself is kube-lease-manager's (a `coordination.k8s.io` Lease
//! taken and renewed with server-side apply). This module is the policy
//! around it: wait as a follower, run while leading, stop at once when the
//! lease is lost (another replica may take over after it expires, and two
//! writers must never overlap), and release it on a clean shutdown.

use std::future::Future;

use tokio::sync::watch;
use tracing::{info, warn};

/// Resolves when the work must stop.
pub type StopSignal = std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// How leading ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown was requested (SIGTERM); the work stopped gracefully.
    Shutdown,
    /// The lease was lost while leading; the work was stopped.
    LostLease,
    /// The work ended on its own.
    WorkEnded,
}

/// Waits for leadership, then runs `work` until it ends, leadership is lost
/// or `shutdown` turns true. `work` gets a future that resolves when it must
/// stop; `lead` waits for it to wind down before returning. A closed
/// leadership channel counts as lost: nobody renews the lease any more.
pub async fn lead<W, Fut>(
    mut leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    on_change: impl Fn(bool),
    work: W,
) -> Outcome
where
    W: FnOnce(StopSignal) -> Fut,
    Fut: Future<Output = ()>,
{
    // Follower: wait for the lease or for shutdown.
    loop {
        if *shutdown.borrow() {
            return Outcome::Shutdown;
        }
        if *leader.borrow() {
            break;
        }
        tokio::select! {
            r = leader.changed() => if r.is_err() { return Outcome::LostLease },
            r = shutdown.changed() => if r.is_err() { return Outcome::Shutdown },
        }
    }
    info!("acquired the leader lease; starting the controller");
    on_change(true);

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let stop = Box::pin(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    });
    let work = work(stop);
    tokio::pin!(work);
    let outcome = loop {
        tokio::select! {
            _ = &mut work => { on_change(false); return Outcome::WorkEnded; }
            r = leader.changed() => {
                if r.is_err() || !*leader.borrow() {
                    warn!("lost the leader lease; stopping the controller");
                    break Outcome::LostLease;
                }
            }
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    info!("shutting down; stopping the controller");
                    break Outcome::Shutdown;
                }
            }
        }
    };
    on_change(false);
    let _ = stop_tx.send(true);
    work.await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Work that counts starts and finishes, and runs until told to stop.
    fn counting_work(
        started: Arc<AtomicUsize>,
        stopped: Arc<AtomicUsize>,
    ) -> impl FnOnce(StopSignal) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        move |stop| {
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                stop.await;
                stopped.fetch_add(1, Ordering::SeqCst);
            })
        }
    }

    #[tokio::test]
    async fn follower_never_starts_and_leaves_on_shutdown() {
        let (_leader_tx, leader_rx) = watch::channel(false);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (started, stopped) = (Arc::default(), Arc::default());
        let task = tokio::spawn(lead(
            leader_rx,
            shutdown_rx,
            |_| {},
            counting_work(Arc::clone(&started), Arc::clone(&stopped)),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(started.load(Ordering::SeqCst), 0);
        shutdown_tx.send(true).unwrap();
        assert_eq!(task.await.unwrap(), Outcome::Shutdown);
        assert_eq!(started.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn leader_runs_until_the_lease_is_lost_and_then_stops_the_work() {
        let (leader_tx, leader_rx) = watch::channel(false);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let (started, stopped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let leading = Arc::new(AtomicUsize::new(0));
        let l = Arc::clone(&leading);
        let task = tokio::spawn(lead(
            leader_rx,
            shutdown_rx,
            move |is| l.store(usize::from(is), Ordering::SeqCst),
            counting_work(Arc::clone(&started), Arc::clone(&stopped)),
        ));
        leader_tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((started.load(Ordering::SeqCst), stopped.load(Ordering::SeqCst)), (1, 0));
        assert_eq!(leading.load(Ordering::SeqCst), 1);
        leader_tx.send(false).unwrap();
        assert_eq!(task.await.unwrap(), Outcome::LostLease);
        assert_eq!(stopped.load(Ordering::SeqCst), 1, "work wound down before returning");
        assert_eq!(leading.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn shutdown_while_leading_stops_gracefully() {
        let (leader_tx, leader_rx) = watch::channel(true);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (started, stopped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn(lead(
            leader_rx,
            shutdown_rx,
            |_| {},
            counting_work(Arc::clone(&started), Arc::clone(&stopped)),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        shutdown_tx.send(true).unwrap();
        assert_eq!(task.await.unwrap(), Outcome::Shutdown);
        assert_eq!((started.load(Ordering::SeqCst), stopped.load(Ordering::SeqCst)), (1, 1));
        drop(leader_tx);
    }

    #[tokio::test]
    async fn a_dead_lease_manager_counts_as_lost() {
        let (leader_tx, leader_rx) = watch::channel(true);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let (started, stopped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = tokio::spawn(lead(
            leader_rx,
            shutdown_rx,
            |_| {},
            counting_work(Arc::clone(&started), Arc::clone(&stopped)),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(leader_tx);
        assert_eq!(task.await.unwrap(), Outcome::LostLease);
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
    }
}
