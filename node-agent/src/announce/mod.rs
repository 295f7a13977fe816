//! VIP announcement in ARP mode: the one ingress node that holds a VIP's
//! Lease answers ARP requests and IPv6 neighbour solicitations for it on
//! its ingress interface, from user space, and announces it with
//! gratuitous ARP / unsolicited neighbour advertisements when it takes
//! over. The VIP is never an address of the node (see DESIGN.md, "Node
//! agent: VIP announcement").
//!
//! - [`frame`]: pure parsing and building of the frames, and the ICMPv6
//!   checksum.
//! - [`filter`]: the classic BPF socket filters.
//! - [`Announcer`]: the sockets and the worker thread for one interface.
//! - [`Announcers`]: one announcer per interface, by name, opened on first
//!   use and re-opened when its interface was replaced.
//!
//! Use: on a thread in the interface's network namespace,
//! `Announcer::open(Link::by_name("eth0")?, Options::default())`; then
//! `announce(vip)` when the Lease is won, `withdraw(vip)` the moment it is
//! lost, `counters()` for metrics, and drop it to stop. Needs
//! `CAP_NET_RAW`.

mod announcer;
pub mod filter;
pub mod frame;
mod interfaces;
mod sys;

pub use announcer::{Announcer, Counters, Error, Link, Options, Result, Stop};
pub use interfaces::Announcers;
