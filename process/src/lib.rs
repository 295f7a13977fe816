//! Process plumbing shared by `dsr-operator`, `dsr-agent` and the API
//! server stand-in: logging setup ([`logging`]), the shutdown signal
//! ([`Shutdown`]), the `/healthz`, `/readyz`, `/metrics` server
//! ([`http`]) and, for the two that talk to Kubernetes, the connection to
//! the API server ([`api`]). Each binary keeps only its flags and its own
//! work.

#![forbid(unsafe_code)]

pub mod api;
pub mod http;
pub mod logging;
mod shutdown;

pub use shutdown::Shutdown;
