//! `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::error::Error;
use crate::metrics::Metrics;

/// Shared with the handlers.
#[derive(Debug)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// The API server answered at startup and shutdown has not begun. A
    /// follower is ready too: it is healthy and waiting for the lease.
    pub ready: AtomicBool,
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        h.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Binds `addr` (so a bad address fails startup) and returns the server future.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<impl std::future::Future<Output = Result<(), Error>>, Error> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Http { addr, source })?;
    Ok(async move {
        axum::serve(listener, router(health))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| Error::Http { addr, source })
    })
}
