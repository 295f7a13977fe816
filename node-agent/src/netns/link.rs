//! Inside a backend pod's namespace: the interface holding the pod's
//! address, its veth peer on the node, and GRO.
//!
//! XDP's `bpf_redirect` into a host-side veth delivers the frame to the
//! pod only when the pod-side veth has an XDP program or GRO on (the veth
//! driver's NAPI path); a pod's `eth0` has neither by default, so the
//! agent turns GRO on (`SIOCETHTOOL`/`ETHTOOL_SGRO`, what `ethtool -K eth0
//! gro on` sends) and reports what it reads back.

use std::{io, net::IpAddr, os::fd::AsRawFd};

use super::loopback::Netns;
use crate::neigh::{Iface, Resolver};
use crate::{Error, Result};

/// A pod's interface as seen from inside the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    /// The interface holding the pod's address (normally `eth0`).
    pub iface: Iface,
    /// `IFLA_LINK`: for a veth, its peer's index in the node's namespace.
    pub peer: Option<u32>,
    /// GRO as read back after turning it on; `None`: the driver has no
    /// GRO setting.
    pub gro: Option<bool>,
}

// From include/uapi/linux/ethtool.h.
const ETHTOOL_GGRO: u32 = 0x0000_002b;
const ETHTOOL_SGRO: u32 = 0x0000_002c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with `ifr_data` (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn ethtool(sock: &std::os::fd::OwnedFd, ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfreqData { name: [0; libc::IFNAMSIZ], data: &mut value, _pad: [0; 16] };
    let bytes = ifname.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `req` is a valid ifreq whose data points at a live
    // ethtool_value for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Turns GRO on for `ifname` in the calling thread's namespace and reads
/// it back. `Ok(None)`: the driver has no GRO setting (`EOPNOTSUPP`).
pub fn enable_gro(ifname: &str) -> Result<Option<bool>> {
    let sock = crate::dataplane::sys::ioctl_socket(ifname)
        .map_err(|source| Error::Io { what: "opening an ethtool socket", source })?;
    let on = match ethtool(&sock, ifname, ETHTOOL_GGRO, 0) {
        Ok(v) => v != 0,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(None),
        Err(source) => return Err(Error::Io { what: "reading GRO (ETHTOOL_GGRO)", source }),
    };
    if !on {
        ethtool(&sock, ifname, ETHTOOL_SGRO, 1)
            .map_err(|source| Error::Io { what: "turning GRO on (ETHTOOL_SGRO)", source })?;
    }
    let on = ethtool(&sock, ifname, ETHTOOL_GGRO, 0)
        .map_err(|source| Error::Io { what: "reading GRO back (ETHTOOL_GGRO)", source })?;
    Ok(Some(on != 0))
}

/// Inside `ns`: the interface holding `addr`, its veth peer index, and GRO
/// turned on (read back).
pub fn prepare_pod_link(ns: &Netns, addr: IpAddr) -> Result<PodLink> {
    ns.run(|| {
        let mut r = Resolver::new()?;
        let iface = r.interface_with_address(addr)?.ok_or_else(|| Error::Io {
            what: "finding the pod interface holding its address",
            source: io::ErrorKind::NotFound.into(),
        })?;
        let info = r.link_info(iface.index)?;
        let gro = enable_gro(&info.iface.name)?;
        Ok(PodLink { iface: info.iface, peer: info.peer, gro })
    })
}
