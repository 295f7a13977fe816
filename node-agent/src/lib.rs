//! kube-dsr node agent (`dsr-agent`).
//!
//! - [`dataplane`]: the XDP program's user-space side (the only aya user).
//! - [`maglev`]: consistent hashing, pure.
//! - [`netns`]: backend preparation inside pod network namespaces.
//! - [`neigh`]: backend MAC resolution through the neighbour table.
//! - [`agent`]: the running agent (watches, rounds, leases, report, HTTP).

pub mod agent;
pub mod announce;
pub mod dataplane;
pub mod error;
pub mod maglev;
pub mod neigh;
pub mod netns;
mod rtnl;

pub use error::{Error, Result};
