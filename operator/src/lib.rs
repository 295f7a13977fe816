//! `dsr-operator`: turns DsrServices, the pods they select, Nodes and the
//! agents' reports into backend sets (EndpointSlices), status and events.
//!
//! The decisions are pure functions, each in its own module and tested on
//! its own: [`backends`] (who serves, who is ready), [`ingress`] (where
//! traffic enters, who announces each VIP), [`conflicts`] (who owns a
//! VIP:port), [`slices`] (the EndpointSlices) and [`status`] (conditions and
//! events). [`controller`] is the thin I/O shell around them.

#![forbid(unsafe_code)]

pub mod app;
pub mod backends;
pub mod conflicts;
pub mod controller;
pub mod error;
pub mod events;
pub mod index;
pub mod ingress;
pub mod lbservice;
pub mod leader;
pub mod metrics;
pub mod pool;
pub mod slices;
pub mod status;

pub use error::Error;

#[cfg(test)]
mod scenarios;
#[cfg(test)]
pub(crate) mod testutil;
