//! kube-dsr node agent (`dsr-agent`).
//!
//! - [`dataplane`]: the XDP program's user-space side (the only aya user).
//! - [`maglev`]: consistent hashing, pure.

pub mod dataplane;
pub mod error;
pub mod maglev;

pub use error::{Error, Result};
