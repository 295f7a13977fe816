//! Backend MAC resolution on ingress nodes: which backends sit on the
//! ingress interface's L2 segment, and their MAC addresses from the
//! kernel's neighbour table.
//!
//! - [`plan`]: pure decisions — adjacency from a route, the meaning of a
//!   neighbour state, and what the dataplane may program now.
//! - [`resolver`]: [`Resolver`], the netlink side (`RTM_GETROUTE`,
//!   `RTM_GETNEIGH`, and `RTM_NEWNEIGH` with `NTF_USE` to start
//!   resolution) in the calling thread's namespace.
//!
//! One round: [`Resolver::lookup_all`] for the desired backends, then
//! [`plan()`] with the lookups; program [`Plan::program`], report
//! [`Plan::status`], and look again soon while anything is `Pending`.

pub mod plan;
pub mod resolver;

pub use plan::{
    Iface, Lookup, NeighEntry, NeighVerdict, NotAdjacent, Plan, Route, Status, Target, adjacency,
    classify, plan,
};
pub use resolver::{LinkInfo, NeighbourReads, Resolver, SINGLE_READS};
