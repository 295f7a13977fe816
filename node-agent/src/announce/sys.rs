//! The few system calls the announcer needs, each wrapped once: packet
//! sockets with a filter, IPv6 multicast membership, interface facts by
//! ioctl, an eventfd to wake the worker, and poll.
//!
//! Every socket lives in the network namespace of the thread that created
//! it, and ioctls on it (the interface lookups) answer for that namespace.

use std::{
    io,
    mem::{size_of, zeroed},
    net::Ipv6Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use super::{filter::Insn, frame::Mac};

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the length passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// An `AF_PACKET`/`SOCK_RAW` socket on interface `ifindex` receiving
/// `protocol` frames that pass `filter`, non-blocking.
///
/// The socket is created with protocol 0, which receives nothing; the
/// filter is attached before `bind` names the protocol and interface, so
/// no unfiltered frame (or frame of another interface) is ever queued.
pub fn packet_socket(ifindex: u32, protocol: u16, filter: &[Insn]) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        OwnedFd::from_raw_fd(cvt(libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a sockaddr_ll of the length passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// `sll_pkttype` of a received frame.
pub const PACKET_HOST: u8 = 0;
pub const PACKET_BROADCAST: u8 = 1;
pub const PACKET_MULTICAST: u8 = 2;

/// Receives one frame without blocking: its length (at most `buf.len()`)
/// and packet type, or `None` when nothing is queued.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<(usize, u8)>> {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: buf and sll are valid for the lengths passed.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&mut sll as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some((n as usize, sll.sll_pkttype)))
}

/// Sends one whole frame on the bound interface without blocking.
pub fn send(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: frame is valid for its length.
    let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != frame.len() {
        return Err(io::Error::other(format!("sent {n} of {} bytes", frame.len())));
    }
    Ok(())
}

/// Takes (and so clears) the socket's pending error.
pub fn take_error(fd: RawFd) -> Option<io::Error> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len are valid for getsockopt to write.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    match rc {
        0 if err == 0 => None,
        0 => Some(io::Error::from_raw_os_error(err)),
        _ => Some(io::Error::last_os_error()),
    }
}

/// A UDP socket used only to hold IPv6 multicast memberships.
pub fn membership_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    unsafe {
        Ok(OwnedFd::from_raw_fd(cvt(libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?))
    }
}

/// Joins (`join`) or leaves the IPv6 multicast `group` on `ifindex`. The
/// kernel then accepts the group's MAC on the interface and reports the
/// membership by MLD, so snooping switches forward the group's traffic.
pub fn ipv6_membership(fd: RawFd, group: &Ipv6Addr, ifindex: u32, join: bool) -> io::Result<()> {
    let mreq = libc::ipv6_mreq {
        ipv6mr_multiaddr: libc::in6_addr { s6_addr: group.octets() },
        ipv6mr_interface: ifindex as _,
    };
    let opt = if join { libc::IPV6_ADD_MEMBERSHIP } else { libc::IPV6_DROP_MEMBERSHIP };
    setsockopt(fd, libc::IPPROTO_IPV6, opt, &mreq)
}

fn ifreq_named(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { zeroed() };
    if bytes.is_empty() || bytes.len() >= ifr.ifr_name.len() || bytes.contains(&0) {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

fn ioctl(fd: RawFd, request: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: the request reads and writes one ifreq.
    cvt(unsafe { libc::ioctl(fd, request as _, ifr as *mut libc::ifreq) }).map(drop)
}

/// Index and Ethernet address of interface `name`, asked through `fd`'s
/// network namespace. Fails with `InvalidData` when the interface is not
/// Ethernet-like (ARP hardware type 1).
pub fn interface(fd: RawFd, name: &str) -> io::Result<(u32, Mac)> {
    let mut ifr = ifreq_named(name)?;
    ioctl(fd, libc::SIOCGIFINDEX, &mut ifr)?;
    // SAFETY: SIOCGIFINDEX filled the index member.
    let index = unsafe { ifr.ifr_ifru.ifru_ifindex } as u32;
    let mut ifr = ifreq_named(name)?;
    ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr)?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hardware type {} is not Ethernet", hw.sa_family),
        ));
    }
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data) {
        *d = s as u8;
    }
    Ok((index, mac))
}

/// Whether interface `ifindex` is up and running (has a carrier).
pub fn link_running(fd: RawFd, ifindex: u32) -> io::Result<bool> {
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { zeroed() };
    ifr.ifr_ifru.ifru_ifindex = ifindex as i32;
    // SIOCGIFNAME fills the name, which SIOCGIFFLAGS reads.
    ioctl(fd, libc::SIOCGIFNAME, &mut ifr)?;
    ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    let want = libc::IFF_UP | libc::IFF_RUNNING;
    Ok(flags & want == want)
}

/// A datagram socket for interface ioctls in the calling thread's
/// namespace.
pub fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    unsafe {
        Ok(OwnedFd::from_raw_fd(cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?))
    }
}

/// A non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2); the fd is owned at once.
    unsafe {
        Ok(OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?))
    }
}

pub fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN)
    // means a wake-up is pending already.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

pub fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN when nothing is there.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// poll(2) on `fds` (their `revents` are filled in), `None` = forever.
/// EINTR counts as a timeout.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ms = match timeout {
        None => -1,
        // Round up, so a wait never ends just before its deadline.
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
    // SAFETY: fds is a valid array of the length passed.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}
