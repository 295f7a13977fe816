//! The shutdown signal: SIGTERM or SIGINT (or [`Shutdown::trigger`]) turns
//! one shared flag true, and every task waiting on it wakes.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info};

/// A cloneable handle on the process's shutdown flag.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A flag that only [`trigger`](Self::trigger) sets (tests, or a
    /// process that ends on its own).
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self { tx: Arc::new(tx), rx }
    }

    /// A flag that SIGTERM or SIGINT sets. Must be called inside a Tokio
    /// runtime; it spawns the task that listens.
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let handle = shutdown.clone();
        tokio::spawn(async move {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(e) => {
                        error!(error = %e, "cannot listen for SIGTERM");
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                _ = term => info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
            }
            handle.trigger();
        });
        shutdown
    }

    /// Sets the flag (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is requested; owns what it needs, so it can
    /// be handed to a server or spawned.
    pub fn requested(&self) -> impl Future<Output = ()> + Send + 'static {
        when_true(self.rx.clone())
    }

    /// The flag as a watch channel, for code that selects on it in a loop.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

/// Resolves once `rx` turns true, or at once when its sender is gone.
pub async fn when_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn trigger_wakes_every_waiter_and_stays_set() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.is_requested());
        let a = tokio::spawn(shutdown.requested());
        let b = tokio::spawn(shutdown.clone().requested());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!a.is_finished() && !b.is_finished(), "nothing triggered yet");
        shutdown.clone().trigger();
        tokio::time::timeout(Duration::from_secs(5), async {
            a.await.unwrap();
            b.await.unwrap();
        })
        .await
        .expect("both waiters woke");
        assert!(shutdown.is_requested());
        // A waiter that comes late resolves at once.
        tokio::time::timeout(Duration::from_secs(5), shutdown.requested()).await.unwrap();
    }
}
