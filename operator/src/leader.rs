//! Runs the controller only while this replica holds the leader lease.
//!
//! The lease itself is kube-lease-manager's (a `coordination.k8s.io` Lease
//! taken and renewed with server-side apply). This module is the policy
//! around it: wait as a follower, run while leading, stop at once when the
//! lease is lost (another replica may take over after it expires, and two
//! writers must never overlap), and release it on a clean shutdown.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
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

/// When `lease` held by `identity` expires: `renewTime +
/// leaseDurationSeconds`, or `None` when it names someone else (or nobody).
pub fn expiry(lease: &Lease, identity: &str) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renew = spec.renew_time.as_ref()?;
    let secs = spec.lease_duration_seconds?;
    renew.0.checked_add(SignedDuration::from_secs(i64::from(secs))).ok()
}

/// A second opinion on leadership, independent of the lease manager (which
/// keeps saying "leader" while its renewals fail). The leader reads its
/// Lease every few seconds. It stays leader while the Lease names it and
/// has not expired; when a read fails, only while the expiry it last saw is
/// more than `margin` away, so it steps down before a successor can take
/// the lease over (client-go's renew deadline, in effect).
#[derive(Debug)]
pub struct Guard {
    identity: String,
    margin: SignedDuration,
    known_expiry: Option<Timestamp>,
}

impl Guard {
    pub fn new(identity: impl Into<String>, margin: Duration) -> Self {
        let margin = SignedDuration::try_from(margin).unwrap_or(SignedDuration::MAX);
        Guard { identity: identity.into(), margin, known_expiry: None }
    }

    /// One read of the Lease at wall-clock `now` (`None`: the read failed).
    /// Returns whether this replica may go on leading.
    pub fn observe(&mut self, lease: Option<&Lease>, now: Timestamp) -> bool {
        if let Some(l) = lease {
            self.known_expiry = expiry(l, &self.identity);
            return self.known_expiry.is_some_and(|e| e > now);
        }
        self.known_expiry
            .and_then(|e| e.checked_sub(self.margin).ok())
            .is_some_and(|safe_until| now < safe_until)
    }
}

/// Forwards the lease manager's view to the returned channel, turned off
/// by the [`Guard`] when the Lease stops naming this replica or cannot be
/// read for too long. Ends (dropping `manager`, which makes the manager
/// release the lease) when the returned receiver is dropped.
pub fn guarded(
    mut manager: watch::Receiver<bool>,
    api: Api<Lease>,
    lease_name: String,
    mut guard: Guard,
    every: Duration,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*manager.borrow());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                r = manager.changed() => {
                    if r.is_err() {
                        let _ = tx.send(false);
                        return;
                    }
                    let is = *manager.borrow_and_update();
                    tx.send_if_modified(|v| std::mem::replace(v, is) != is);
                }
                _ = tick.tick() => {
                    if !*tx.borrow() {
                        continue;
                    }
                    let lease = api.get(&lease_name).await.ok();
                    if !guard.observe(lease.as_ref(), Timestamp::now()) {
                        warn!("the Lease no longer shows this replica as holder; stepping down");
                        let _ = tx.send(false);
                    }
                }
            }
        }
    });
    rx
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

#[cfg(test)]
mod guard_tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed: i64, secs: i32) -> Lease {
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_duration_seconds: Some(secs),
                ..Default::default()
            }),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn expiry_only_for_our_own_lease() {
        assert_eq!(expiry(&lease("me", 100, 15), "me"), Some(at(115)));
        assert_eq!(expiry(&lease("other", 100, 15), "me"), None);
        assert_eq!(expiry(&Lease::default(), "me"), None);
    }

    #[test]
    fn guard_steps_down_on_loss_expiry_or_reads_failing_near_expiry() {
        let mut g = Guard::new("me", Duration::from_secs(5));
        assert!(!g.observe(None, at(100)), "no good read yet: not sure, not leader");
        assert!(g.observe(Some(&lease("me", 100, 15)), at(101)));
        assert!(!g.observe(Some(&lease("me", 100, 15)), at(115)), "expired");
        assert!(g.observe(Some(&lease("me", 110, 15)), at(111)));
        // Reads fail: fine until 5 s before the expiry last seen (125).
        assert!(g.observe(None, at(115)));
        assert!(g.observe(None, at(119)));
        assert!(!g.observe(None, at(120)));
        // A good read of a renewed lease restores it; someone else's does not.
        assert!(g.observe(Some(&lease("me", 121, 15)), at(122)));
        assert!(!g.observe(Some(&lease("other", 123, 15)), at(124)));
        assert!(!g.observe(None, at(125)), "after losing it, failures do not bring it back");
    }

    /// The forwarder against a fake API server: it passes the manager's
    /// view through, and turns it off when the Lease names someone else.
    #[tokio::test]
    async fn guarded_forwards_and_steps_down_when_the_lease_moves() {
        use http::{Request, Response};
        use kube::client::Body;

        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let holder = std::sync::Arc::new(std::sync::Mutex::new("me".to_string()));
        let h = std::sync::Arc::clone(&holder);
        tokio::spawn(async move {
            while let Some((req, respond)) = handle.next_request().await {
                assert!(req.uri().path().ends_with("/namespaces/kube-dsr/leases/dsr-operator"));
                let now = Timestamp::now().as_second();
                let mut l = lease(&h.lock().unwrap(), now, 15);
                l.metadata.name = Some("dsr-operator".into());
                respond.send_response(Response::new(Body::from(serde_json::to_vec(&l).unwrap())));
            }
        });
        let api = Api::namespaced(kube::Client::new(mock, "default"), "kube-dsr");
        let (manager_tx, manager_rx) = watch::channel(false);
        let mut rx = guarded(
            manager_rx,
            api,
            "dsr-operator".into(),
            Guard::new("me", Duration::from_secs(5)),
            Duration::from_millis(10),
        );
        assert!(!*rx.borrow());
        manager_tx.send(true).unwrap();
        rx.changed().await.unwrap();
        assert!(*rx.borrow());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(*rx.borrow(), "the Lease names us: still leader");
        *holder.lock().unwrap() = "other".into();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| !*v)).await.unwrap().unwrap();
        assert!(*manager_tx.borrow(), "the manager still thinks it leads; the guard overruled it");
    }
}
