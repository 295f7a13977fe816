//! Whether 802.1Q tags reach the XDP program inside the frame.
//!
//! The program forwards a tagged frame with its tag, because the tag is in
//! the bytes it sends back out. A NIC with receive VLAN offload strips the
//! tag into its descriptor before XDP runs; the frame would then leave by
//! `XDP_TX` untagged, on the wrong VLAN. The kernel can hand the stripped
//! tag to XDP (`bpf_xdp_metadata_rx_vlan_tag`) only to device-bound
//! programs, which the loader used here (aya 0.14) cannot create; so the
//! agent makes the interface keep tags in the frame instead, and refuses the
//! interface when it cannot.
//!
//! veth is different: it has no hardware, and whether a tag is in the frame
//! is decided by whoever sent it. A tag the peer's side holds out of band
//! (every tagged frame that crossed a Linux bridge, unless the bridge port's
//! `tx-vlan-offload` is off) is invisible to native XDP on the veth and lost
//! on `XDP_TX`; the receiving veth's own `rx-vlan-offload` changes nothing
//! (checked on 6.18). That is reported, not fixable from this side.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
/// `NETIF_F_HW_VLAN_CTAG_RX` in the legacy flags word.
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

/// How tags reach the program on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VlanTags {
    /// No receive VLAN offload (or it was already off): tags stay in the
    /// frame.
    Inline,
    /// Receive VLAN offload was on; the agent turned it off.
    OffloadTurnedOff,
    /// veth in native mode: the sender decides (see the module comment).
    PeerDecides,
    /// Generic XDP: a tag the interface strips stays with the packet and
    /// leaves with it.
    KeptWithPacket,
}

impl VlanTags {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Inline => "inline",
            Self::OffloadTurnedOff => "inline (rx-vlan-offload turned off)",
            Self::PeerDecides => "veth: inline only if the peer sends tags in the frame",
            Self::KeptWithPacket => "generic XDP: a stripped tag stays with the packet",
        }
    }
}

/// Makes tags on `name` reach XDP in the frame, or says why they cannot.
/// Errors when receive VLAN offload is on and cannot be turned off.
pub fn keep_tags_inline(name: &str) -> io::Result<VlanTags> {
    let sock = Ethtool::open(name)?;
    if sock.driver()? == "veth" {
        return Ok(VlanTags::PeerDecides);
    }
    let flags = match sock.get(ETHTOOL_GFLAGS) {
        Ok(f) => f,
        // No ethtool support at all: nothing offloads.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(VlanTags::Inline),
        Err(e) => return Err(e),
    };
    if flags & ETH_FLAG_RXVLAN == 0 {
        return Ok(VlanTags::Inline);
    }
    sock.set(ETHTOOL_SFLAGS, flags & !ETH_FLAG_RXVLAN)?;
    if sock.get(ETHTOOL_GFLAGS)? & ETH_FLAG_RXVLAN != 0 {
        return Err(io::Error::other("rx-vlan-offload is still on after turning it off"));
    }
    Ok(VlanTags::OffloadTurnedOff)
}

struct Ethtool {
    sock: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
}

/// `struct ethtool_value`.
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    rest: [u8; 164],
}

impl Ethtool {
    fn open(name: &str) -> io::Result<Self> {
        let sock = super::sys::ioctl_socket(name)?;
        let mut ifname = [0 as libc::c_char; libc::IFNAMSIZ];
        for (dst, src) in ifname.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(Self { sock, name: ifname })
    }

    /// One SIOCETHTOOL call with `data` as the command buffer.
    fn call<T>(&self, data: &mut T) -> io::Result<()> {
        // SAFETY: zeroed ifreq is valid; the name is NUL-terminated.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = self.name;
        req.ifr_ifru.ifru_data = (data as *mut T).cast();
        // SAFETY: `data` is the command's buffer, alive for the call.
        if unsafe { libc::ioctl(self.sock.as_raw_fd(), SIOCETHTOOL, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn driver(&self) -> io::Result<String> {
        let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 164] };
        self.call(&mut info)?;
        let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
        Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
    }

    fn get(&self, cmd: u32) -> io::Result<u32> {
        let mut v = Value { cmd, data: 0 };
        self.call(&mut v)?;
        Ok(v.data)
    }

    fn set(&self, cmd: u32, data: u32) -> io::Result<()> {
        self.call(&mut Value { cmd, data })
    }
}
