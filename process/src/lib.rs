//! Process plumbing shared by `dsr-operator`, `dsr-agent` and the API
//! server stand-in: logging setup ([`logging`]), the shutdown signal
//! ([`Shutdown`]) and the `/healthz`, `/readyz`, `/metrics` server
//! ([`http`]). Each binary keeps only its flags and its own work.

#![forbid(unsafe_code)]

pub mod http;
pub mod logging;
mod shutdown;

pub use shutdown::Shutdown;
