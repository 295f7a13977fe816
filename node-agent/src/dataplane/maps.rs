//! One typed accessor per map, so each map name appears once.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use kube_dsr_common::{
    BACKEND_IN_USE, Backend, ConnKey4, ConnKey6, ConnValue, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_CONNS4, MAP_CONNS6, MAP_COUNTERS, MAP_META, MAP_PEERS, MAP_RINGS, MAP_SERVICES,
    MAP_VIP_STATS, MAP_VIPS4, MAP_VIPS6, Meta, PeerSlot, SERVICE_IN_USE, ServiceSlot, Traffic,
    VipSlot4, VipSlot6, VipValue, flow_hash,
};

use super::{peers, spec::VipKey, sys::Mapped, viptable};
use crate::error::{Error, Result};

/// A connection-table entry, with what a sweep needs to judge it.
pub struct Pin {
    pub key: PinKey,
    pub svc_id: u32,
    /// The flow's Maglev hash (as the XDP program computes it).
    pub hash: u32,
    pub value: ConnValue,
}

pub enum PinKey {
    V4(ConnKey4),
    V6(ConnKey6),
}

pub struct Maps {
    vips4: Mapped<VipSlot4>,
    vips6: Mapped<VipSlot6>,
    conns4: HashMap<MapData, ConnKey4, ConnValue>,
    conns6: HashMap<MapData, ConnKey6, ConnValue>,
    backends: Array<MapData, Backend>,
    services: Array<MapData, ServiceSlot>,
    vip_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
    counters: PerCpuArray<MapData, u64>,
    meta: Array<MapData, Meta>,
    rings: Mapped<u32>,
    peers: Mapped<PeerSlot>,
    /// Kept open for as long as they are mapped.
    _mapped: [MapData; 4],
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(Error::MissingMap { name })
}

fn wrap(name: &'static str) -> impl Fn(MapError) -> Error {
    move |e| Error::Map { name, source: Box::new(e) }
}

macro_rules! typed {
    ($ebpf:expr, $name:expr) => {
        take($ebpf, $name)?.try_into().map_err(wrap($name))?
    };
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        // The ring map holds two u32 slots per element, back to back.
        let (rings_map, rings) = mapped::<u32>(ebpf, MAP_RINGS, 2)?;
        let (vips4_map, vips4) = mapped::<VipSlot4>(ebpf, MAP_VIPS4, 1)?;
        let (vips6_map, vips6) = mapped::<VipSlot6>(ebpf, MAP_VIPS6, 1)?;
        let (peers_map, peers) = mapped::<PeerSlot>(ebpf, MAP_PEERS, 1)?;
        Ok(Self {
            vips4,
            vips6,
            conns4: typed!(ebpf, MAP_CONNS4),
            conns6: typed!(ebpf, MAP_CONNS6),
            backends: typed!(ebpf, MAP_BACKENDS),
            services: typed!(ebpf, MAP_SERVICES),
            vip_stats: typed!(ebpf, MAP_VIP_STATS),
            backend_stats: typed!(ebpf, MAP_BACKEND_STATS),
            counters: typed!(ebpf, MAP_COUNTERS),
            meta: typed!(ebpf, MAP_META),
            rings,
            peers,
            _mapped: [rings_map, vips4_map, vips6_map, peers_map],
        })
    }

    pub fn max_services(&self) -> u32 {
        self.services.len()
    }

    pub fn max_backends(&self) -> u32 {
        self.backends.len()
    }

    pub fn meta(&self) -> Result<Meta> {
        self.meta.get(&0, 0).map_err(wrap(MAP_META))
    }

    pub fn set_meta(&mut self, meta: &Meta) -> Result<()> {
        self.meta.set(0, meta, 0).map_err(wrap(MAP_META))
    }

    pub fn set_vip(&mut self, key: &VipKey, value: &VipValue) -> Result<()> {
        let placed = match key {
            VipKey::V4(k) => viptable::set(&mut self.vips4, k, value),
            VipKey::V6(k) => viptable::set(&mut self.vips6, k, value),
        };
        if placed {
            return Ok(());
        }
        let key = key.decode().map_or_else(
            || format!("{key:?}"),
            |(a, p, s)| format!("{a}:{}/{:?} ({s:?} stage)", p.port, p.protocol),
        );
        Err(Error::VipTableFull { key })
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        match key {
            VipKey::V4(k) => viptable::remove(&mut self.vips4, k),
            VipKey::V6(k) => viptable::remove(&mut self.vips6, k),
        }
        Ok(())
    }

    pub fn vips(&self) -> Result<Vec<(VipKey, VipValue)>> {
        let v4 = viptable::entries(&self.vips4).into_iter().map(|(k, v)| (VipKey::V4(k), v));
        let v6 = viptable::entries(&self.vips6).into_iter().map(|(k, v)| (VipKey::V6(k), v));
        Ok(v4.chain(v6).collect())
    }

    /// Makes the peer table hold exactly `macs`.
    pub fn set_peers(&mut self, macs: &std::collections::BTreeSet<[u8; 6]>) -> Result<()> {
        let unplaced = peers::set_all(&mut self.peers, macs);
        if unplaced.is_empty() {
            return Ok(());
        }
        Err(Error::Io {
            what: "the peer table has no slot near some MACs (too many peers)",
            source: std::io::Error::other(format!("{} unplaced", unplaced.len())),
        })
    }

    pub fn peers(&self) -> std::collections::BTreeSet<[u8; 6]> {
        peers::entries(&self.peers)
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends.get(&id, 0).map_err(wrap(MAP_BACKENDS))
    }

    pub fn set_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.backends.set(id, value, 0).map_err(wrap(MAP_BACKENDS))
    }

    /// Marks a backend slot free. Its generation stays, so the next owner
    /// gets a higher one and old flows naming the slot are recognised stale.
    pub fn release_backend(&mut self, id: u32) -> Result<()> {
        let mut b = self.backend(id)?;
        b.flags = 0;
        self.set_backend(id, &b)
    }

    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let mut out = Vec::new();
        for id in 0..self.backends.len() {
            let b = self.backend(id)?;
            if b.flags & BACKEND_IN_USE != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    pub fn set_service(&mut self, id: u32, slot: &ServiceSlot) -> Result<()> {
        self.services.set(id, slot, 0).map_err(wrap(MAP_SERVICES))
    }

    pub fn services(&self) -> Result<Vec<(u32, ServiceSlot)>> {
        let mut out = Vec::new();
        for id in 0..self.services.len() {
            let s = self.services.get(&id, 0).map_err(wrap(MAP_SERVICES))?;
            if s.flags & SERVICE_IN_USE != 0 {
                out.push((id, s));
            }
        }
        Ok(out)
    }

    /// The `len` slots at `base`.
    pub fn ring(&self, base: u32, len: usize) -> &[u32] {
        let base = base as usize;
        &self.rings.as_slice()[base..base + len]
    }

    /// Copies a Maglev table into the ring map at `base`.
    pub fn write_ring(&mut self, base: u32, table: &[u32]) {
        let base = base as usize;
        self.rings.as_mut_slice()[base..base + table.len()].copy_from_slice(table);
    }

    pub fn vip_traffic(&self, id: u32) -> Result<Traffic> {
        sum(self.vip_stats.get(&id, 0).map_err(wrap(MAP_VIP_STATS))?)
    }

    pub fn backend_traffic(&self, id: u32) -> Result<Traffic> {
        sum(self.backend_stats.get(&id, 0).map_err(wrap(MAP_BACKEND_STATS))?)
    }

    pub fn reset_vip_stats(&mut self, id: u32) -> Result<()> {
        let zero = zeroes()?;
        self.vip_stats.set(id, zero, 0).map_err(wrap(MAP_VIP_STATS))
    }

    pub fn reset_backend_stats(&mut self, id: u32) -> Result<()> {
        let zero = zeroes()?;
        self.backend_stats.set(id, zero, 0).map_err(wrap(MAP_BACKEND_STATS))
    }

    pub fn counter(&self, reason: u32) -> Result<u64> {
        let v = self.counters.get(&reason, 0).map_err(wrap(MAP_COUNTERS))?;
        Ok(v.iter().sum())
    }

    /// Every connection-table entry of both families.
    pub fn pins(&self) -> Result<Vec<Pin>> {
        let mut out = Vec::new();
        for entry in self.conns4.iter() {
            let (k, value) = entry.map_err(wrap(MAP_CONNS4))?;
            let hash = flow_hash(&[k.saddr, 0, 0, 0], k.sport, k.dport, k.svc_proto as u8);
            out.push(Pin { key: PinKey::V4(k), svc_id: k.svc_proto >> 8, hash, value });
        }
        for entry in self.conns6.iter() {
            let (k, value) = entry.map_err(wrap(MAP_CONNS6))?;
            let hash = flow_hash(&k.saddr, k.sport, k.dport, k.svc_proto as u8);
            out.push(Pin { key: PinKey::V6(k), svc_id: k.svc_proto >> 8, hash, value });
        }
        Ok(out)
    }

    pub fn remove_pin(&mut self, key: &PinKey) -> Result<()> {
        let (result, name) = match key {
            PinKey::V4(k) => (self.conns4.remove(k), MAP_CONNS4),
            PinKey::V6(k) => (self.conns6.remove(k), MAP_CONNS6),
        };
        // The LRU may have evicted it meanwhile.
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(wrap(name)(e)),
        }
    }

    /// One ring slot.
    pub fn ring_slot(&self, index: u32) -> u32 {
        self.rings.as_slice()[index as usize]
    }
}

/// Takes a `BPF_F_MMAPABLE` array out of the object and maps it as
/// `per_element` values of `T` per map element.
fn mapped<T: Copy>(
    ebpf: &mut Ebpf,
    name: &'static str,
    per_element: usize,
) -> Result<(MapData, Mapped<T>)> {
    let data = match take(ebpf, name)? {
        Map::Array(data) => data,
        _ => return Err(Error::MissingMap { name }),
    };
    let len = per_element * data.info().map_err(wrap(name))?.max_entries() as usize;
    let mapped = Mapped::new(data.fd().as_fd(), len)
        .map_err(|source| Error::Io { what: "mapping a map", source })?;
    Ok((data, mapped))
}

fn sum(values: PerCpuValues<Traffic>) -> Result<Traffic> {
    Ok(values.iter().fold(Traffic::default(), |acc, t| Traffic {
        packets: acc.packets + t.packets,
        bytes: acc.bytes + t.bytes,
    }))
}

fn zeroes() -> Result<PerCpuValues<Traffic>> {
    let cpus = nr_cpus().map_err(|(_, source)| Error::Io { what: "counting CPUs", source })?;
    PerCpuValues::try_from(vec![Traffic::default(); cpus])
        .map_err(|source| Error::Io { what: "per-CPU zeroes", source })
}
