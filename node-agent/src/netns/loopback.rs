//! Inside one network namespace: the VIPs on `lo` and the ARP sysctls.
//!
//! Everything here runs on a thread of its own that has entered the
//! namespace with `setns(CLONE_NEWNET)`: a netlink socket belongs to the
//! namespace of the thread that creates it, and `/proc/sys/net` shows the
//! namespace of the task that reads it (checked on this kernel, see
//! `DESIGN-NOTE.md`), so both must be touched from that thread. The
//! caller's thread never changes namespace.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{
        AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
        AddressScope,
    },
    link::{LinkAttribute, LinkFlags, LinkMessage},
};

use super::{
    cgroup::{PodNetns, open_ns},
    plan::{ArpSysctls, LoAddress, NsPlan, Observed, SysctlWrite},
};
use crate::rtnl::{Rtnl, nl_err};
use crate::{Error, Result};

/// The label kube-dsr puts on the IPv4 addresses it adds (`ip addr` shows
/// it). The kernel requires a label to start with the interface name.
pub const LABEL_V4: &str = "lo:kdsr";

/// The `IFA_PROTO` ("address originator", kernel ≥ 6.3) kube-dsr puts on
/// the addresses it adds; IPv6 addresses have no label, and this is how
/// ours are told from anyone else's. The kernel's own values are 0-3
/// (`IFAPROT_*`); 0x4b ('K') is not used by iproute2, NetworkManager or
/// systemd-networkd. IPv4 addresses carry it too, but there the label
/// decides (it works on every kernel).
pub const ADDR_PROTO: u8 = 0x4b;

/// An open network namespace the module can run code in.
#[derive(Debug)]
pub struct Netns {
    file: File,
    inode: u64,
    what: String,
    /// `<proc>/sys/net/ipv4/conf`: see [`Netns::with_proc`].
    sysctls: PathBuf,
}

impl Netns {
    /// The node's own namespace: the agent's process (which runs with host
    /// networking) — `/proc/self` names the thread-group leader, whatever
    /// namespace the calling thread is in.
    pub fn host() -> Result<Self> {
        Self::open(Path::new("/proc/self/ns/net"), "host".into())
    }

    /// A namespace by path (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`).
    pub fn open(path: &Path, what: String) -> Result<Self> {
        let (file, inode) =
            open_ns(path).map_err(|source| Error::Netns { what: what.clone(), source })?;
        Ok(Self { file, inode, what, sysctls: Path::new(DEFAULT_PROC).join(SYSCTL_DIR) })
    }

    /// A pod's namespace found by [`super::find_pods`].
    pub fn from_pod(uid: &str, pod: PodNetns) -> Self {
        Self {
            file: pod.ns,
            inode: pod.inode,
            what: format!("pod {uid} (pid {})", pod.pid),
            sysctls: Path::new(DEFAULT_PROC).join(SYSCTL_DIR),
        }
    }

    /// Reads and writes sysctls under `<proc>/sys` instead of `/proc/sys`.
    /// A container's own `/proc/sys` is mounted read-only; the host's procfs
    /// mounted elsewhere (for example `/host/proc`) is not, and what a file
    /// under `sys/net` shows depends on the network namespace of the thread
    /// that opens it, so it still reaches the entered namespace.
    pub fn with_proc(mut self, proc: &Path) -> Self {
        self.sysctls = proc.join(SYSCTL_DIR);
        self
    }

    /// The namespace's inode: two handles with the same one are the same
    /// namespace.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` on a new thread that has entered this namespace, and waits
    /// for it. The thread exits afterwards, so the namespace never leaks
    /// into a thread that does anything else.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name("kdsr-netns".into())
                .spawn_scoped(s, move || {
                    // SAFETY: setns with a namespace fd we hold open changes
                    // only the network namespace of this thread.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(Error::Netns {
                            what: self.what.clone(),
                            source: io::Error::last_os_error(),
                        });
                    }
                    f()
                })
                .map_err(|source| Error::Io { what: "spawning the namespace thread", source })?;
            worker.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Reads back what is on `lo` and the ARP sysctls.
    pub fn observe(&self) -> Result<Observed> {
        self.run(|| observe_with(&mut Netlink::new()?, &self.sysctls))
    }

    /// Carries out `plan` (adds, removes, sysctl writes), then reads back.
    pub fn apply(&self, plan: &NsPlan) -> Result<Observed> {
        self.run(|| {
            let mut nl = Netlink::new()?;
            let lo = nl.loopback()?;
            if !lo.1 {
                return Err(Error::LoopbackDown);
            }
            // Sysctls first: the pod must never answer ARP for a VIP, not
            // even between the address appearing and the sysctls.
            for w in &plan.sysctls {
                write_sysctl(&self.sysctls, w)?;
            }
            for &vip in &plan.add {
                nl.add_vip(lo.0, vip)?;
            }
            for &vip in &plan.remove {
                nl.remove_vip(lo.0, vip)?;
            }
            observe_with(&mut nl, &self.sysctls)
        })
    }
}

fn observe_with(nl: &mut Netlink, sysctls: &Path) -> Result<Observed> {
    let (index, up) = nl.loopback()?;
    Ok(Observed { lo_up: up, addrs: nl.addresses(index)?, arp: read_arp(sysctls)? })
}

/// procfs as mounted in the agent's own mount namespace.
pub const DEFAULT_PROC: &str = "/proc";
const SYSCTL_DIR: &str = "sys/net/ipv4/conf";

fn read_sysctl(root: &Path, dev: &str, key: &str) -> Result<u32> {
    let path = root.join(dev).join(key);
    let s = std::fs::read_to_string(&path)
        .map_err(|source| Error::Sysctl { path: path.clone(), source })?;
    s.trim().parse().map_err(|_| Error::Sysctl {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, s.trim().to_owned()),
    })
}

fn read_arp(root: &Path) -> Result<ArpSysctls> {
    Ok(ArpSysctls {
        all_ignore: read_sysctl(root, "all", "arp_ignore")?,
        all_announce: read_sysctl(root, "all", "arp_announce")?,
        lo_ignore: read_sysctl(root, "lo", "arp_ignore")?,
        lo_announce: read_sysctl(root, "lo", "arp_announce")?,
    })
}

fn write_sysctl(root: &Path, w: &SysctlWrite) -> Result<()> {
    let path = root.join(w.dev).join(w.key);
    std::fs::write(&path, format!("{}\n", w.value)).map_err(|source| Error::Sysctl { path, source })
}

/// Whether an address on `lo` is one kube-dsr added.
fn is_ours(msg: &AddressMessage) -> bool {
    match msg.header.family {
        AddressFamily::Inet => {
            msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Label(l) if l == LABEL_V4))
        }
        _ => msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == ADDR_PROTO)),
    }
}

fn family(vip: IpAddr) -> (AddressFamily, u8) {
    match vip {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    }
}

/// A blocking rtnetlink socket in the calling thread's namespace.
/// The rtnetlink socket this module talks through.
struct Netlink(Rtnl);

impl Netlink {
    fn new() -> Result<Self> {
        Rtnl::open().map(Self).map_err(|(what, e)| nl_err(what)(e))
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.0.request(msg, flags)
    }

    /// `lo`'s index and whether it is up.
    fn loopback(&mut self) -> Result<(u32, bool)> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName("lo".into()));
        let replies =
            self.request(RouteNetlinkMessage::GetLink(msg), 0).map_err(nl_err("reading lo"))?;
        replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    Some((l.header.index, l.header.flags.contains(LinkFlags::Up)))
                }
                _ => None,
            })
            .ok_or(Error::Netlink { what: "reading lo", source: io::ErrorKind::NotFound.into() })
    }

    /// Every address on `index`, both families.
    fn addresses(&mut self, index: u32) -> Result<Vec<LoAddress>> {
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)
            .map_err(nl_err("dumping addresses"))?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else { continue };
            if a.header.index != index {
                continue;
            }
            // IFA_LOCAL is the address itself; IPv6 sends only IFA_ADDRESS.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push(LoAddress { addr, prefix_len: a.header.prefix_len, ours: is_ours(&a) });
            }
        }
        Ok(out)
    }

    fn vip_message(index: u32, vip: IpAddr) -> AddressMessage {
        let (fam, prefix_len) = family(vip);
        let mut msg = AddressMessage::default();
        msg.header.family = fam;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.header.scope = AddressScope::Universe;
        msg.attributes.push(AddressAttribute::Local(vip));
        msg.attributes.push(AddressAttribute::Address(vip));
        msg
    }

    /// Adds `vip` to `lo` with our marks. An address that is already there
    /// (someone else's) is left alone: `EEXIST` is not an error, and the
    /// read-back shows it as present but not ours.
    fn add_vip(&mut self, index: u32, vip: IpAddr) -> Result<()> {
        let mut msg = Self::vip_message(index, vip);
        if vip.is_ipv4() {
            msg.attributes.push(AddressAttribute::Label(LABEL_V4.into()));
        } else {
            // No duplicate address detection: the address is meant to be
            // shared with every other backend and the ingress node.
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        msg.attributes.push(AddressAttribute::Protocol(AddressProtocol::Other(ADDR_PROTO)));
        match self
            .request(RouteNetlinkMessage::NewAddress(msg), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
        {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
            Err(source) => return Err(Error::Netlink { what: "adding a VIP to lo", source }),
        }
        // A kernel older than 6.3 drops IFA_PROTO silently; an IPv6 address
        // we could not mark we could never tell apart again, so take it
        // back and say why.
        if vip.is_ipv6() && !self.addresses(index)?.iter().any(|a| a.addr == vip && a.ours) {
            let _ = self
                .request(RouteNetlinkMessage::DelAddress(Self::vip_message(index, vip)), NLM_F_ACK);
            return Err(Error::AddressMarkUnsupported { vip });
        }
        Ok(())
    }

    /// Removes `vip` from `lo` if, and only if, the copy there is ours.
    fn remove_vip(&mut self, index: u32, vip: IpAddr) -> Result<()> {
        let (_, prefix_len) = family(vip);
        let ours = self
            .addresses(index)?
            .iter()
            .any(|a| a.addr == vip && a.prefix_len == prefix_len && a.ours);
        if !ours {
            return Ok(());
        }
        let mut msg = Self::vip_message(index, vip);
        if vip.is_ipv4() {
            // The kernel matches the label too: an IPv4 delete naming ours
            // cannot remove an unlabelled copy.
            msg.attributes.push(AddressAttribute::Label(LABEL_V4.into()));
        }
        match self.request(RouteNetlinkMessage::DelAddress(msg), NLM_F_ACK) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(source) => Err(Error::Netlink { what: "removing a VIP from lo", source }),
        }
    }
}
