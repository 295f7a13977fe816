//! Classic BPF socket filters (`SO_ATTACH_FILTER`) so the kernel hands the
//! announcer only what it may answer: ARP requests for IPv4 over Ethernet,
//! and ICMPv6 neighbour solicitations with hop limit 255 directly after the
//! IPv6 header. Offsets count from the Ethernet header (the sockets are
//! `SOCK_RAW`). A load past the end of the frame ends the program with 0,
//! so truncated frames are dropped in the kernel too.

use super::frame::{
    ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ICMPV6_NS, IPPROTO_ICMPV6, ND_HOP_LIMIT,
};

/// One classic BPF instruction, as `struct sock_filter`.
pub type Insn = libc::sock_filter;

const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// How much of an accepted frame to keep: ARP and NS frames are small;
/// anything longer than this fails parsing as truncated.
pub const SNAP_LEN: u32 = 1024;

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> Insn {
    Insn { code, jt, jf, k }
}

/// Builds "every (load, value) pair matches → accept, else drop".
fn all_equal(checks: &[(u16, u32, u32)]) -> Vec<Insn> {
    let n = checks.len();
    let mut prog = Vec::with_capacity(2 * n + 2);
    for (i, &(load, offset, value)) in checks.iter().enumerate() {
        prog.push(insn(load, 0, 0, offset));
        // On a mismatch jump over the remaining checks and the accept to
        // the final drop.
        let to_drop = 2 * (n - i - 1) + 1;
        prog.push(insn(JEQ_K, 0, to_drop as u8, value));
    }
    prog.push(insn(RET_K, 0, 0, SNAP_LEN));
    prog.push(insn(RET_K, 0, 0, 0));
    prog
}

/// ARP requests, Ethernet/IPv4, 6/4 address lengths.
pub fn arp_requests() -> Vec<Insn> {
    all_equal(&[
        (LD_H_ABS, 12, u32::from(ETHERTYPE_ARP)),
        (LD_H_ABS, 14, 1),
        (LD_H_ABS, 16, u32::from(ETHERTYPE_IPV4)),
        (LD_B_ABS, 18, 6),
        (LD_B_ABS, 19, 4),
        (LD_H_ABS, 20, 1),
    ])
}

/// ICMPv6 neighbour solicitations without extension headers, hop limit
/// 255 (the only ones RFC 4861 lets anyone answer).
pub fn neighbor_solicitations() -> Vec<Insn> {
    all_equal(&[
        (LD_H_ABS, 12, u32::from(ETHERTYPE_IPV6)),
        (LD_B_ABS, 20, u32::from(IPPROTO_ICMPV6)),
        (LD_B_ABS, 21, u32::from(ND_HOP_LIMIT)),
        (LD_B_ABS, 54, u32::from(ICMPV6_NS)),
    ])
}

/// Runs a program the way the kernel does, for the instructions used
/// here: the number of bytes to keep (0 = dropped).
#[cfg(test)]
fn run(prog: &[Insn], frame: &[u8]) -> u32 {
    let mut acc: u32 = 0;
    let mut pc = 0;
    while let Some(i) = prog.get(pc) {
        pc += 1;
        let at = i.k as usize;
        match i.code {
            LD_H_ABS => match frame.get(at..at + 2) {
                Some(b) => acc = u32::from(u16::from_be_bytes([b[0], b[1]])),
                None => return 0,
            },
            LD_B_ABS => match frame.get(at) {
                Some(b) => acc = u32::from(*b),
                None => return 0,
            },
            JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
            RET_K => return i.k.min(frame.len() as u32),
            other => panic!("opcode {other:#x} not used here"),
        }
    }
    panic!("fell off the end of the program")
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::{super::frame::*, *};

    const MAC: Mac = [2, 0, 0, 0, 0, 1];

    fn set(mut f: Vec<u8>, at: usize, v: u8) -> Vec<u8> {
        f[at] = v;
        f
    }

    #[test]
    fn programs_are_within_limits() {
        for prog in [arp_requests(), neighbor_solicitations()] {
            // Jumps stay inside the program and it ends in a return.
            for (pc, i) in prog.iter().enumerate() {
                if i.code == JEQ_K {
                    assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < prog.len());
                }
            }
            assert_eq!(prog.last().unwrap().code, RET_K);
        }
    }

    #[test]
    fn arp_filter() {
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        let req = gratuitous_request(MAC, vip).to_vec();
        let rep = gratuitous_reply(MAC, vip).to_vec();
        let ns = unsolicited_advertisement(MAC, "fd00::1".parse().unwrap()).to_vec();
        for (what, frame, kept) in [
            ("request", req.clone(), 42),
            ("padded request", [req.clone(), vec![0; 18]].concat(), 60),
            ("reply", rep, 0),
            ("other op", set(req.clone(), 21, 3), 0),
            ("not Ethernet", set(req.clone(), 15, 6), 0),
            ("not IPv4", set(req.clone(), 17, 0xdd), 0),
            ("hlen", set(req.clone(), 18, 8), 0),
            ("plen", set(req.clone(), 19, 16), 0),
            ("IPv6", ns, 0),
            ("truncated before op", req[..21].to_vec(), 0),
            ("empty", vec![], 0),
        ] {
            assert_eq!(run(&arp_requests(), &frame), kept, "{what}");
        }
    }

    #[test]
    fn ns_filter() {
        let target: Ipv6Addr = "fd00::1".parse().unwrap();
        let na = unsolicited_advertisement(MAC, target).to_vec();
        // The filter reads only fixed offsets, so an advertisement with its
        // type changed stands in for a solicitation.
        let ns = set(na.clone(), 54, ICMPV6_NS);
        for (what, frame, kept) in [
            ("solicitation", ns.clone(), 86),
            ("advertisement", na, 0),
            ("echo request", set(ns.clone(), 54, 128), 0),
            ("router solicitation", set(ns.clone(), 54, 133), 0),
            ("hop limit 64", set(ns.clone(), 21, 64), 0),
            ("hop-by-hop header first", set(ns.clone(), 20, 0), 0),
            ("UDP", set(ns.clone(), 20, 17), 0),
            ("IPv4", set(ns.clone(), 13, 0x00), 0),
            ("truncated at the type", ns[..54].to_vec(), 0),
            ("ARP", gratuitous_request(MAC, Ipv4Addr::LOCALHOST).to_vec(), 0),
        ] {
            assert_eq!(run(&neighbor_solicitations(), &frame), kept, "{what}");
        }
        let long = [ns, vec![0; 2000]].concat();
        assert_eq!(run(&neighbor_solicitations(), &long), SNAP_LEN);
    }
}
