//! [`Announcers`]: one [`Announcer`] per interface, opened on first use,
//! addressed the way the agent thinks (announce a VIP on an interface by
//! name, withdraw a VIP wherever it is).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::announcer::{Announcer, Counters, Error, Link, Options, Result};

/// The announcers of this node. Interfaces are looked up and sockets
/// opened in the namespace of the thread calling [`Announcers::announce`]
/// (the agent's, which has host networking).
pub struct Announcers {
    options: Options,
    open: BTreeMap<String, Announcer>,
    /// What should be announced where, kept across a failed announcer so
    /// [`Announcers::reopen_failed`] can restore it.
    wanted: BTreeMap<IpAddr, String>,
}

impl Announcers {
    pub fn new(options: Options) -> Self {
        Self { options, open: BTreeMap::new(), wanted: BTreeMap::new() }
    }

    /// Announces `vip` on `interface`. A VIP announced on another
    /// interface is withdrawn there first. An announcer is opened on first
    /// use, and again when the interface's index or MAC changed or its
    /// worker stopped. `Ok(false)` if it was announced there already.
    pub fn announce(&mut self, interface: &str, vip: IpAddr) -> Result<bool> {
        if let Some(prev) = self.wanted.get(&vip)
            && prev != interface
        {
            self.withdraw(vip);
        }
        let a = self.announcer(interface)?;
        let new = a.announce(vip)?;
        self.wanted.insert(vip, interface.to_owned());
        Ok(new)
    }

    /// Stops answering for `vip` on every interface; when this returns
    /// nothing more is sent for it. `false` if it was not announced.
    pub fn withdraw(&mut self, vip: IpAddr) -> bool {
        self.wanted.remove(&vip);
        let mut was = false;
        for a in self.open.values() {
            was |= a.withdraw(vip);
        }
        was
    }

    /// The VIPs answered for now, with their interface.
    pub fn announced(&self) -> BTreeMap<IpAddr, String> {
        self.open
            .iter()
            .flat_map(|(name, a)| a.announced().into_iter().map(move |v| (v, name.clone())))
            .collect()
    }

    /// Per interface, for metrics (counters restart with a re-opened
    /// announcer).
    pub fn counters(&self) -> BTreeMap<String, Counters> {
        self.open.iter().map(|(name, a)| (name.clone(), a.counters())).collect()
    }

    /// Re-opens announcers whose worker stopped (their interface was
    /// deleted; it may be back) or that could not be re-opened before, and
    /// announces their VIPs again. Call it every round; errors are per
    /// interface.
    pub fn reopen_failed(&mut self) -> Vec<(String, Error)> {
        let interfaces: BTreeSet<String> = self
            .wanted
            .values()
            .filter(|i| self.open.get(*i).is_none_or(|a| a.failure().is_some()))
            .cloned()
            .collect();
        interfaces
            .into_iter()
            .filter_map(|name| self.announcer(&name).err().map(|e| (name, e)))
            .collect()
    }

    /// The announcer of `interface`, (re-)opened unless the one open is
    /// still running on the same index and MAC; a new one announces the
    /// VIPs wanted there.
    fn announcer(&mut self, interface: &str) -> Result<&Announcer> {
        let link = Link::by_name(interface)?;
        let current =
            self.open.get(interface).is_some_and(|a| a.link() == link && a.failure().is_none());
        if !current {
            self.open.remove(interface);
            let a = Announcer::open(link, self.options)?;
            for (vip, i) in &self.wanted {
                if i == interface {
                    a.announce(*vip)?;
                }
            }
            self.open.insert(interface.to_owned(), a);
        }
        Ok(&self.open[interface])
    }
}
