//! [`Announcer`]: answers ARP requests and neighbour solicitations for the
//! announced VIPs on one interface, from a worker thread, and sends
//! gratuitous ARP / unsolicited neighbour advertisements on announce.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    filter,
    frame::{self, Mac, Reject},
    sys,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("interface {name:?}")]
    Interface {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{vip} cannot be announced: {why}")]
    InvalidVip { vip: IpAddr, why: &'static str },

    #[error("the announcer on interface {index} has stopped: {why}")]
    Stopped { index: u32, why: Stop },
}

/// Why an announcer's worker stopped on its own; nothing is answered
/// after it. Kept by the announcer (hence `Clone`) and given to every
/// later [`Announcer::announce`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum Stop {
    #[error("poll: {0}")]
    Poll(Arc<io::Error>),
    #[error("socket closed under the worker")]
    SocketClosed,
    #[error("interface {0} was deleted")]
    Deleted(u32),
    #[error("the worker panicked")]
    Panicked,
}

impl Error {
    /// Every announcer error counts as `announce`.
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Announce
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The interface to answer on: its index and the MAC to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: Mac,
}

impl Link {
    /// Looks `name` up in the calling thread's network namespace. Fails
    /// for interfaces that are not Ethernet-like (no MAC to answer with).
    pub fn by_name(name: &str) -> Result<Self> {
        let fd = sys::ioctl_socket()
            .map_err(|source| Error::Io { what: "opening an ioctl socket", source })?;
        let (index, mac) = sys::interface(fd.as_raw_fd(), name)
            .map_err(|source| Error::Interface { name: name.into(), source })?;
        Ok(Self { index, mac })
    }
}

/// Gratuitous announcements on [`Announcer::announce`]: `count` rounds,
/// `interval` apart, the first one before `announce` returns. A round is
/// a gratuitous ARP request and reply (IPv4) or one unsolicited neighbour
/// advertisement (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub count: u32,
    pub interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { count: 3, interval: Duration::from_millis(200) }
    }
}

/// What the announcer did since it was opened (monotonic, for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// ARP requests for an announced VIP answered.
    pub arp_replies: u64,
    /// Neighbour solicitations for an announced VIP answered.
    pub na_replies: u64,
    /// Gratuitous ARP frames sent (two per round: request and reply).
    pub gratuitous_arp: u64,
    /// Unsolicited neighbour advertisements sent.
    pub unsolicited_na: u64,
    /// Requests for addresses this announcer does not announce (gratuitous
    /// ARP requests, which ask nothing, are not counted).
    pub not_announced: u64,
    /// Gratuitous ARP from another MAC for a VIP announced here: another
    /// node claims it (normal for a moment during a handover).
    pub conflicts: u64,
    /// Frames that passed the socket filter but failed validation.
    pub malformed: u64,
    pub send_errors: u64,
    pub receive_errors: u64,
}

#[derive(Default)]
struct Counts {
    arp_replies: AtomicU64,
    na_replies: AtomicU64,
    gratuitous_arp: AtomicU64,
    unsolicited_na: AtomicU64,
    not_announced: AtomicU64,
    conflicts: AtomicU64,
    malformed: AtomicU64,
    send_errors: AtomicU64,
    receive_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Remaining gratuitous rounds of one VIP.
struct Burst {
    vip: IpAddr,
    left: u32,
    at: Instant,
}

#[derive(Default)]
struct State {
    vips: BTreeSet<IpAddr>,
    /// Solicited-node groups joined, with how many VIPs need each.
    groups: BTreeMap<Ipv6Addr, usize>,
    bursts: Vec<Burst>,
    stop: bool,
    /// Why the worker stopped, if it did on its own.
    failed: Option<Stop>,
}

struct Shared {
    link: Link,
    options: Options,
    arp: OwnedFd,
    nd: OwnedFd,
    /// Holds the solicited-node memberships (an error without IPv6).
    membership: Result<OwnedFd, io::Error>,
    wake: OwnedFd,
    /// Every send happens with this held, and withdraw takes it: once
    /// withdraw returns, nothing more is sent for the VIP.
    state: Mutex<State>,
    counts: Counts,
}

/// Answers ARP and neighbour discovery for announced VIPs on one
/// interface. Open it on a thread in the interface's network namespace;
/// after that it may be used (and dropped) from any thread.
///
/// Dropping it (or [`Announcer::shutdown`]) stops the worker, closes the
/// sockets and leaves the multicast groups: nothing is answered after.
pub struct Announcer {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Opens the sockets on `link` (in the calling thread's namespace) and
    /// starts the worker thread. Needs `CAP_NET_RAW`.
    pub fn open(link: Link, options: Options) -> Result<Self> {
        let arp = sys::packet_socket(link.index, frame::ETHERTYPE_ARP, &filter::arp_requests())
            .map_err(|source| Error::Io { what: "opening the ARP packet socket", source })?;
        let nd = sys::packet_socket(
            link.index,
            frame::ETHERTYPE_IPV6,
            &filter::neighbor_solicitations(),
        )
        .map_err(|source| Error::Io { what: "opening the IPv6 packet socket", source })?;
        let membership = sys::membership_socket();
        let wake = sys::eventfd()
            .map_err(|source| Error::Io { what: "creating the worker's eventfd", source })?;
        let shared = Arc::new(Shared {
            link,
            options,
            arp,
            nd,
            membership,
            wake,
            state: Mutex::default(),
            counts: Counts::default(),
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("announce-{}", link.index))
                .spawn(move || {
                    // A panic would silently end the answering; make it
                    // a failure the agent sees instead.
                    let run = std::panic::AssertUnwindSafe(|| shared.run());
                    if std::panic::catch_unwind(run).is_err() {
                        shared.fail(Stop::Panicked);
                    }
                })
                .map_err(|source| Error::Io { what: "starting the announcer thread", source })?
        };
        Ok(Self { shared, worker: Some(worker) })
    }

    pub fn link(&self) -> Link {
        self.shared.link
    }

    /// Starts answering for `vip` and sends the first gratuitous round
    /// before returning (the others follow from the worker). `Ok(false)`
    /// if it was announced already: nothing is sent then (see
    /// [`Announcer::reannounce`]). Send errors are counted, not returned:
    /// the VIP is announced and will be answered for.
    pub fn announce(&self, vip: IpAddr) -> Result<bool> {
        check(vip)?;
        let sh = &self.shared;
        let mut st = sh.lock();
        if let Some(why) = &st.failed {
            return Err(Error::Stopped { index: sh.link.index, why: why.clone() });
        }
        if st.vips.contains(&vip) {
            return Ok(false);
        }
        if let IpAddr::V6(v6) = vip {
            sh.join(&mut st, &v6)?;
        }
        st.vips.insert(vip);
        sh.schedule(&mut st, vip);
        drop(st);
        sys::wake(sh.wake.as_raw_fd());
        Ok(true)
    }

    /// Sends `count` gratuitous rounds again for an announced `vip` (after
    /// the link came back, say). `false` if it is not announced.
    pub fn reannounce(&self, vip: IpAddr) -> bool {
        let sh = &self.shared;
        let mut st = sh.lock();
        if !st.vips.contains(&vip) {
            return false;
        }
        st.bursts.retain(|b| b.vip != vip);
        sh.schedule(&mut st, vip);
        drop(st);
        sys::wake(sh.wake.as_raw_fd());
        true
    }

    /// Stops answering for `vip`: when this returns, no reply or
    /// gratuitous frame for it will be sent. `false` if it was not
    /// announced.
    pub fn withdraw(&self, vip: IpAddr) -> bool {
        let sh = &self.shared;
        let mut st = sh.lock();
        if !st.vips.remove(&vip) {
            return false;
        }
        st.bursts.retain(|b| b.vip != vip);
        if let IpAddr::V6(v6) = vip {
            sh.leave(&mut st, &v6);
        }
        true
    }

    /// The VIPs announced now.
    pub fn announced(&self) -> BTreeSet<IpAddr> {
        self.shared.lock().vips.clone()
    }

    pub fn counters(&self) -> Counters {
        let c = &self.shared.counts;
        Counters {
            arp_replies: c.arp_replies.load(Relaxed),
            na_replies: c.na_replies.load(Relaxed),
            gratuitous_arp: c.gratuitous_arp.load(Relaxed),
            unsolicited_na: c.unsolicited_na.load(Relaxed),
            not_announced: c.not_announced.load(Relaxed),
            conflicts: c.conflicts.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            send_errors: c.send_errors.load(Relaxed),
            receive_errors: c.receive_errors.load(Relaxed),
        }
    }

    /// Why the worker stopped on its own (the interface went away, or
    /// poll failed), if it did. The VIPs are not answered for any more;
    /// open a new announcer.
    pub fn failure(&self) -> Option<Stop> {
        self.shared.lock().failed.clone()
    }

    /// Stops the worker and closes everything; the reason if the worker
    /// had stopped on its own before.
    pub fn shutdown(mut self) -> Option<Stop> {
        self.stop();
        self.failure()
    }

    fn stop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.stop = true;
            st.vips.clear();
            st.bursts.clear();
        }
        sys::wake(self.shared.wake.as_raw_fd());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Addresses nobody can own on a link.
fn check(vip: IpAddr) -> Result<()> {
    let why = match vip {
        IpAddr::V4(a) if a.is_unspecified() => "unspecified address",
        IpAddr::V4(a) if a.is_broadcast() => "broadcast address",
        IpAddr::V4(a) if a.is_multicast() => "multicast address",
        IpAddr::V4(a) if a.is_loopback() => "loopback address",
        IpAddr::V6(a) if a.is_unspecified() => "unspecified address",
        IpAddr::V6(a) if a.is_multicast() => "multicast address",
        IpAddr::V6(a) if a.is_loopback() => "loopback address",
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => "IPv4-mapped address",
        _ => return Ok(()),
    };
    Err(Error::InvalidVip { vip, why })
}

/// Frames taken from one socket per wake-up before looking at the others.
const BATCH: usize = 64;

/// How often the worker looks at its link: often while it is down, to
/// announce again as soon as it is back; rarely otherwise, to notice a
/// carrier loss (which no socket reports) and a deleted interface.
const LINK_POLL_DOWN: Duration = Duration::from_millis(100);
const LINK_POLL_UP: Duration = Duration::from_secs(1);

/// The worker's view of its link.
struct LinkWatch {
    /// Up and running (carrier) when last looked at.
    running: bool,
    next: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the sets half
        // changed in a way that matters; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn join(&self, st: &mut State, vip: &Ipv6Addr) -> Result<()> {
        let group = frame::solicited_node(vip);
        if let Some(n) = st.groups.get_mut(&group) {
            *n += 1;
            return Ok(());
        }
        let fd = self.membership.as_ref().map_err(|e| Error::Io {
            what: "no IPv6 socket to join the solicited-node group with",
            source: io::Error::new(e.kind(), e.to_string()),
        })?;
        sys::ipv6_membership(fd.as_raw_fd(), &group, self.link.index, true)
            .map_err(|source| Error::Io { what: "joining the solicited-node group", source })?;
        st.groups.insert(group, 1);
        Ok(())
    }

    fn leave(&self, st: &mut State, vip: &Ipv6Addr) {
        let group = frame::solicited_node(vip);
        let Some(n) = st.groups.get_mut(&group) else { return };
        *n -= 1;
        if *n > 0 {
            return;
        }
        st.groups.remove(&group);
        if let Ok(fd) = &self.membership
            && let Err(e) = sys::ipv6_membership(fd.as_raw_fd(), &group, self.link.index, false)
        {
            // The interface is gone (and the membership with it), most
            // likely.
            tracing::debug!(%group, error = %e, "leaving the solicited-node group");
        }
    }

    /// The first gratuitous round now, the rest from the worker.
    fn schedule(&self, st: &mut State, vip: IpAddr) {
        if self.options.count == 0 {
            return;
        }
        self.gratuitous(vip);
        if self.options.count > 1 {
            let at = Instant::now() + self.options.interval;
            st.bursts.push(Burst { vip, left: self.options.count - 1, at });
        }
    }

    /// One gratuitous round for `vip`; the caller holds the lock.
    fn gratuitous(&self, vip: IpAddr) {
        let mac = self.link.mac;
        match vip {
            IpAddr::V4(v4) => {
                for f in [frame::gratuitous_request(mac, v4), frame::gratuitous_reply(mac, v4)] {
                    self.send(&self.arp, &f, &self.counts.gratuitous_arp);
                }
            }
            IpAddr::V6(v6) => {
                let f = frame::unsolicited_advertisement(mac, v6);
                self.send(&self.nd, &f, &self.counts.unsolicited_na);
            }
        }
    }

    fn send(&self, fd: &OwnedFd, f: &[u8], sent: &AtomicU64) {
        match sys::send(fd.as_raw_fd(), f) {
            Ok(()) => bump(sent),
            Err(e) => {
                bump(&self.counts.send_errors);
                tracing::debug!(ifindex = self.link.index, error = %e, "announce: send failed");
            }
        }
    }

    /// The worker: poll both sockets and the eventfd, answer, send the
    /// gratuitous rounds when due, until told to stop.
    fn run(&self) {
        let mut buf = vec![0u8; filter::SNAP_LEN as usize];
        let mut link = LinkWatch { running: true, next: Instant::now() };
        loop {
            let timeout = {
                let st = self.lock();
                if st.stop {
                    return;
                }
                let now = Instant::now();
                let next = st.bursts.iter().map(|b| b.at).chain([link.next]).min();
                next.map(|t| t.saturating_duration_since(now))
            };
            let fds = [self.arp.as_raw_fd(), self.nd.as_raw_fd(), self.wake.as_raw_fd()];
            let mut pfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            if let Err(e) = sys::poll(&mut pfds, timeout) {
                return self.fail(Stop::Poll(Arc::new(e)));
            }
            if pfds[2].revents != 0 {
                sys::drain_eventfd(fds[2]);
            }
            for (i, p) in pfds[..2].iter().enumerate() {
                if p.revents & libc::POLLNVAL != 0 {
                    return self.fail(Stop::SocketClosed);
                }
                if p.revents & libc::POLLERR != 0 && self.socket_error(p.fd) {
                    // Down (or being deleted): look at once.
                    link.running = false;
                    link.next = Instant::now();
                }
                if p.revents & libc::POLLIN != 0 {
                    self.receive(p.fd, i == 0, &mut buf);
                }
            }
            if Instant::now() >= link.next
                && let Err(why) = self.watch_link(&mut link)
            {
                return self.fail(why);
            }
            self.send_due();
        }
    }

    /// Looks at the link. Back up and running after being down or without
    /// carrier: the neighbours may have timed out (or be new, behind a new
    /// switch port), so every VIP is announced again, a whole burst each.
    /// Gone: the worker stops (deleting an interface takes it down first,
    /// and the sockets see only that `ENETDOWN`).
    fn watch_link(&self, link: &mut LinkWatch) -> Result<(), Stop> {
        let running = match sys::link_running(self.arp.as_raw_fd(), self.link.index) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                return Err(Stop::Deleted(self.link.index));
            }
            Err(e) => {
                tracing::debug!(ifindex = self.link.index, error = %e, "link state");
                link.running
            }
        };
        if running && !link.running {
            let mut st = self.lock();
            let vips: Vec<IpAddr> = st.vips.iter().copied().collect();
            if !vips.is_empty() {
                tracing::info!(ifindex = self.link.index, "link up again: announcing again");
            }
            st.bursts.clear();
            for vip in vips {
                self.schedule(&mut st, vip);
            }
        }
        link.running = running;
        link.next = Instant::now() + if running { LINK_POLL_UP } else { LINK_POLL_DOWN };
        Ok(())
    }

    fn fail(&self, why: Stop) {
        tracing::warn!(ifindex = self.link.index, %why, "announcer stopped");
        let mut st = self.lock();
        st.failed = Some(why);
        st.vips.clear();
        st.bursts.clear();
    }

    /// Takes a pending socket error; `true` for `ENETDOWN`: the link went
    /// down (the socket works again once it is up) or is being deleted
    /// (then the socket is dead; the link watch tells which).
    fn socket_error(&self, fd: RawFd) -> bool {
        let Some(e) = sys::take_error(fd) else { return false };
        bump(&self.counts.receive_errors);
        tracing::debug!(ifindex = self.link.index, error = %e, "announce: socket error");
        e.raw_os_error() == Some(libc::ENETDOWN)
    }

    fn receive(&self, fd: RawFd, arp: bool, buf: &mut [u8]) {
        for _ in 0..BATCH {
            let (len, pkttype) = match sys::recv(fd, buf) {
                Ok(Some(got)) => got,
                Ok(None) => return,
                Err(e) => {
                    bump(&self.counts.receive_errors);
                    tracing::debug!(ifindex = self.link.index, error = %e, "announce: recv");
                    return;
                }
            };
            // Only what was sent to this host (unicast to its MAC,
            // broadcast, multicast): not frames for other hosts seen in
            // promiscuous mode, nor VLAN-tagged frames without a VLAN
            // interface (the kernel marks those "other host"), nor our
            // own outgoing frames.
            if !matches!(pkttype, sys::PACKET_HOST | sys::PACKET_BROADCAST | sys::PACKET_MULTICAST)
            {
                continue;
            }
            let f = &buf[..len];
            if arp { self.on_arp(f) } else { self.on_ns(f) }
        }
    }

    fn rejected(&self, r: Reject) {
        match r {
            Reject::Malformed(why) => {
                bump(&self.counts.malformed);
                tracing::trace!(ifindex = self.link.index, why, "announce: malformed frame");
            }
            Reject::NotRequest(_) => {}
        }
    }

    fn on_arp(&self, f: &[u8]) {
        let req = match frame::parse_arp_request(f) {
            Ok(r) => r,
            Err(r) => return self.rejected(r),
        };
        if req.sender_mac == self.link.mac {
            return;
        }
        let st = self.lock();
        let ours = st.vips.contains(&IpAddr::V4(req.target_ip));
        if req.is_gratuitous() {
            // A neighbour announcing an address, not asking. For one of
            // ours, another node claims it: answering would only make the
            // neighbours' entries flap.
            if ours {
                bump(&self.counts.conflicts);
                tracing::debug!(vip = %req.target_ip, mac = ?req.sender_mac, "gratuitous ARP from another MAC for an announced VIP");
            }
            return;
        }
        if !ours {
            bump(&self.counts.not_announced);
            return;
        }
        self.send(&self.arp, &frame::arp_reply(self.link.mac, &req), &self.counts.arp_replies);
        drop(st);
    }

    fn on_ns(&self, f: &[u8]) {
        let ns = match frame::parse_neighbor_solicitation(f) {
            Ok(ns) => ns,
            Err(r) => return self.rejected(r),
        };
        if ns.eth_src == self.link.mac {
            return;
        }
        let st = self.lock();
        if !st.vips.contains(&IpAddr::V6(ns.target)) {
            bump(&self.counts.not_announced);
            return;
        }
        let na = frame::neighbor_advertisement(self.link.mac, &ns);
        self.send(&self.nd, &na, &self.counts.na_replies);
        drop(st);
    }

    fn send_due(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        let due: Vec<IpAddr> = st.bursts.iter().filter(|b| b.at <= now).map(|b| b.vip).collect();
        for vip in due {
            self.gratuitous(vip);
        }
        let interval = self.options.interval;
        st.bursts.retain_mut(|b| {
            if b.at <= now {
                b.left -= 1;
                b.at = now + interval;
            }
            b.left > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent keeps announcers in its state and may share them.
    #[test]
    fn announcer_is_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Announcer>();
        send_sync::<super::super::Announcers>();
    }

    #[test]
    fn rejects_addresses_nobody_owns() {
        for (vip, why) in [
            ("0.0.0.0", "unspecified address"),
            ("255.255.255.255", "broadcast address"),
            ("224.0.0.1", "multicast address"),
            ("127.0.0.1", "loopback address"),
            ("::", "unspecified address"),
            ("ff02::1", "multicast address"),
            ("::1", "loopback address"),
            ("::ffff:10.0.0.1", "IPv4-mapped address"),
        ] {
            let vip: IpAddr = vip.parse().unwrap();
            match check(vip) {
                Err(Error::InvalidVip { vip: v, why: w }) => assert_eq!((v, w), (vip, why)),
                other => panic!("{vip}: {other:?}"),
            }
        }
        for ok in ["192.0.2.10", "10.0.0.1", "2001:db8::10", "fd00::1"] {
            assert!(check(ok.parse().unwrap()).is_ok(), "{ok}");
        }
    }
}
