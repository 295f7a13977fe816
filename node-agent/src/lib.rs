//! kube-dsr node agent (`dsr-agent`).
//!
//! - [`dataplane`]: the XDP program's user-space side (the only aya user).
//! - [`maglev`]: consistent hashing, pure.
//! - [`netns`]: backend preparation inside pod network namespaces.

pub mod dataplane;
pub mod error;
pub mod maglev;
pub mod neigh;
pub mod netns;
mod rtnl;

pub use error::{Error, Result};
