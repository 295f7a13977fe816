//! `/healthz` (the process runs), `/readyz` (it can do its work) and
//! `/metrics` (OpenMetrics text), on one address.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Metrics that can be rendered as OpenMetrics text.
pub trait Render: Send + Sync + 'static {
    fn render(&self) -> String;
}

/// Shared with the handlers.
#[derive(Debug)]
pub struct Health<M> {
    pub metrics: Arc<M>,
    /// What `/readyz` answers; each binary says what ready means.
    pub ready: AtomicBool,
}

impl<M> Health<M> {
    /// Not ready yet.
    pub fn new(metrics: Arc<M>) -> Self {
        Self { metrics, ready: AtomicBool::new(false) }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {addr} for /metrics, /healthz and /readyz")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving /metrics, /healthz and /readyz on {addr}")]
    Serve { addr: SocketAddr, source: std::io::Error },
}

async fn metrics<M: Render>(State(h): State<Arc<Health<M>>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.render(),
    )
}

async fn readyz<M: Render>(State(h): State<Arc<Health<M>>>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

pub fn router<M: Render>(health: Arc<Health<M>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<M>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<M>))
        .with_state(health)
}

/// Binds `addr` now (so a bad or taken address fails startup) and returns
/// the server, which runs until `shutdown` resolves.
pub async fn serve<M: Render>(
    addr: SocketAddr,
    health: Arc<Health<M>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = Result<(), Error>>, Error> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    Ok(async move {
        axum::serve(listener, router(health))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| Error::Serve { addr, source })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    struct Fixed;
    impl Render for Fixed {
        fn render(&self) -> String {
            "x_total 3\n# EOF\n".into()
        }
    }

    async fn get(health: &Arc<Health<Fixed>>, path: &str) -> (StatusCode, String) {
        let resp = router(Arc::clone(health))
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics() {
        let health = Arc::new(Health::new(Arc::new(Fixed)));
        assert_eq!(get(&health, "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(
            get(&health, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "not ready".into())
        );
        health.set_ready(true);
        assert_eq!(get(&health, "/readyz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(&health, "/metrics").await, (StatusCode::OK, "x_total 3\n# EOF\n".into()));
        assert_eq!(get(&health, "/nothing").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_taken_address_fails_at_bind() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let health = Arc::new(Health::new(Arc::new(Fixed)));
        let err = serve(addr, health, std::future::pending()).await.err().expect("bind fails");
        assert!(matches!(err, Error::Bind { .. }), "{err}");
    }
}
