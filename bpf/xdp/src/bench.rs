//! Test and benchmark equipment, never loaded by the agent: a live-frames
//! packet generator, a counting sink, the floor every XDP forwarder is
//! measured against (swap the two MACs, `XDP_TX`), and a plain `XDP_PASS`
//! for veth peers (a veth only delivers `XDP_TX` frames to a peer that has
//! an XDP program).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// Length of the frame template the generator writes into every frame.
const TEMPLATE_LEN: usize = 64;
/// Offsets in the template (IPv4/UDP without VLAN).
const SRC_ADDR_OFF: usize = 26;
const SRC_PORT_OFF: usize = 34;

/// Generator modes (`BENCH_CFG[0]`).
const MODE_FIXED: u32 = 0;
const MODE_CYCLE: u32 = 1;

#[map(name = "BENCH_TEMPLATE")]
static TEMPLATE: Array<[u8; TEMPLATE_LEN]> = Array::with_max_entries(1, 0);

/// [0] = mode (0 fixed, 1 cycle over [1] flows, 2 every frame a new flow),
/// [1] = flow count for mode 1.
#[map(name = "BENCH_CFG")]
static CFG: Array<u32> = Array::with_max_entries(2, 0);

#[map(name = "BENCH_SEQ")]
static SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "BENCH_SINK")]
static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Live frames recycle pages without restoring their bytes, and the device
/// under test rewrites MACs, so every frame is rebuilt from the template.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + TEMPLATE_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(t) = TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let frame = start as *mut u8;
    // SAFETY: the frame holds TEMPLATE_LEN bytes (checked above) and the
    // template is a map value, not packet memory: no overlap.
    unsafe { core::ptr::copy_nonoverlapping(t.as_ptr(), frame, TEMPLATE_LEN) };

    let mode = CFG.get(0).copied().unwrap_or(MODE_FIXED);
    if mode != MODE_FIXED {
        let Some(seq) = SEQ.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: a per-CPU element, valid for this run and touched by no
        // other CPU while this program runs.
        let n = unsafe {
            let n = *seq;
            *seq = n + 1;
            n
        };
        let n = if mode == MODE_CYCLE {
            let flows = CFG.get(1).copied().unwrap_or(1).max(1);
            n % u64::from(flows)
        } else {
            n
        };
        // Low 16 bits vary the source port, the next 24 the source address.
        let port = ((n & 0xffff) as u16).to_be_bytes();
        let addr = ((0x0a00_0000u32) | ((n >> 16) as u32 & 0x00ff_ffff)).to_be_bytes();
        // SAFETY: both fields lie inside the TEMPLATE_LEN bytes checked
        // above; the sources are locals.
        unsafe {
            core::ptr::copy_nonoverlapping(addr.as_ptr(), frame.add(SRC_ADDR_OFF), 4);
            core::ptr::copy_nonoverlapping(port.as_ptr(), frame.add(SRC_PORT_OFF), 2);
        }
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = SINK.get_ptr_mut(0) {
        // SAFETY: a per-CPU element, valid for this run and touched by no
        // other CPU while this program runs.
        unsafe { *c += 1 }
    }
    xdp_action::XDP_DROP
}

/// The floor: the least a forwarder can do.
#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 14 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut [u8; 6];
    // SAFETY: the 12 MAC bytes lie inside the packet (checked above), and
    // byte arrays need no alignment.
    unsafe {
        let dst = *eth;
        *eth = *eth.add(1);
        *eth.add(1) = dst;
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
