//! The reply program: a tc classifier on the host-side interface of every
//! local backend pod.
//!
//! A pod answers a node-stage flow from the VIP. Forwarded by the node's
//! kernel, that reply would meet netfilter, which saw no request (the node
//! stage delivered it in XDP) and calls it conntrack state INVALID
//! (kube-proxy's FORWARD chain drops those), a strict reverse-path filter
//! (the VIP is not routed to the pod's interface), and masquerade rules.
//! So a packet whose source VIP:port is a node-stage entry leaves through
//! the node's uplink with `bpf_redirect_neigh`: FIB lookup and neighbour
//! resolution as routing would do, none of the rest. Anything else is left
//! alone.

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::generated::bpf_redirect_neigh, macros::classifier,
    programs::TcContext,
};
use kube_dsr_common::{PROTO_TCP, PROTO_UDP, STAGE_NODE, reason};

use super::{META, bump, vip4, vip6};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Ethernet, IPv6 and the ports: the most the program reads.
const HEADERS: usize = ETH_LEN + 40 + 4;

#[classifier]
#[inline(always)]
pub fn kube_dsr_reply(ctx: TcContext) -> i32 {
    if ctx.data() + HEADERS > ctx.data_end() {
        // Headers outside the linear part (rare on a veth): pull them in.
        // A packet shorter than that is left alone below.
        let _ = ctx.pull_data(HEADERS.min(ctx.len() as usize) as u32);
    }
    let vip = match ethertype(&ctx) {
        Some(ETH_P_IP) => source4(&ctx).and_then(|(a, p, t)| vip4(&a, p, t | STAGE_NODE)),
        Some(ETH_P_IPV6) => source6(&ctx).and_then(|(a, p, t)| vip6(&a, p, t | STAGE_NODE)),
        _ => None,
    };
    if vip.is_none() {
        return TC_ACT_OK as i32;
    }
    let Some(uplink) = META.get(0).map(|m| m.ifindex).filter(|&i| i != 0) else {
        return TC_ACT_OK as i32;
    };
    bump(reason::FWD_REPLY);
    // SAFETY: a helper call with no parameters block (the kernel looks up
    // the next hop itself).
    unsafe { bpf_redirect_neigh(uplink, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the `size_of::<T>()` bytes at `start + off` lie inside the
    // packet (checked above); `T` is plain data read without alignment.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

#[inline(always)]
fn ethertype(ctx: &TcContext) -> Option<u16> {
    read::<u16>(ctx, 12).map(u16::from_be)
}

/// Source address, source port (wire bytes) and protocol of an
/// unfragmented IPv4 TCP or UDP packet.
#[inline(always)]
fn source4(ctx: &TcContext) -> Option<(u32, u16, u8)> {
    let vihl = read::<u8>(ctx, ETH_LEN)?;
    let proto = read::<u8>(ctx, ETH_LEN + 9)?;
    let frag = u16::from_be(read::<u16>(ctx, ETH_LEN + 6)?);
    if vihl != 0x45 || frag & 0x3fff != 0 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let saddr = read::<u32>(ctx, ETH_LEN + 12)?;
    let sport = read::<u16>(ctx, ETH_LEN + 20)?;
    Some((saddr, sport, proto))
}

/// The same for IPv6 without extension headers.
#[inline(always)]
fn source6(ctx: &TcContext) -> Option<([u32; 4], u16, u8)> {
    let proto = read::<u8>(ctx, ETH_LEN + 6)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let saddr = read::<[u32; 4]>(ctx, ETH_LEN + 8)?;
    let sport = read::<u16>(ctx, ETH_LEN + 40)?;
    Some((saddr, sport, proto))
}
