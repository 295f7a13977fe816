//! One typed accessor per map, so each map name appears once.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use kube_dsr_common::{
    Backend, ConnKey4, ConnKey6, ConnValue, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONNS4,
    MAP_CONNS6, MAP_COUNTERS, MAP_META, MAP_PEERS, MAP_RINGS, MAP_SERVICES, MAP_VIP_STATS,
    MAP_VIPS4, MAP_VIPS6, Meta, PeerSlot, SERVICE_IN_USE, ServiceSlot, Traffic, VipSlot4, VipSlot6,
    VipValue, flow_hash,
};

use super::{alloc::Row, peers, spec::VipKey, sys::Mapped, viptable};
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
    /// The ring map is never mapped whole: a table is mapped while it is
    /// written or read, so the agent's memory does not grow with the ring
    /// memory reserved in the kernel.
    rings: MapData,
    ring_slots: u64,
    peers: Mapped<PeerSlot>,
    /// Sizes as created (a pinned map keeps its own).
    max_services: u32,
    max_vip_stats: u32,
    max_backends: u32,
    max_backend_stats: u32,
    /// Kept open for as long as they are mapped.
    _mapped: [MapData; 3],
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
        let rings = match take(ebpf, MAP_RINGS)? {
            Map::Array(data) => data,
            _ => return Err(Error::MissingMap { name: MAP_RINGS }),
        };
        // Two u32 slots per element, back to back.
        let ring_slots = 2 * u64::from(rings.info().map_err(wrap(MAP_RINGS))?.max_entries());
        let (vips4_map, vips4) = mapped::<VipSlot4>(ebpf, MAP_VIPS4, 1)?;
        let (vips6_map, vips6) = mapped::<VipSlot6>(ebpf, MAP_VIPS6, 1)?;
        let (peers_map, peers) = mapped::<PeerSlot>(ebpf, MAP_PEERS, 1)?;
        let max_services = max_entries(ebpf, MAP_SERVICES)?;
        let max_vip_stats = max_entries(ebpf, MAP_VIP_STATS)?;
        let max_backends = max_entries(ebpf, MAP_BACKENDS)?;
        let max_backend_stats = max_entries(ebpf, MAP_BACKEND_STATS)?;
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
            ring_slots,
            peers,
            max_services,
            max_vip_stats,
            max_backends,
            max_backend_stats,
            _mapped: [vips4_map, vips6_map, peers_map],
        })
    }

    pub fn max_services(&self) -> u32 {
        self.max_services
    }

    pub fn max_vip_stats(&self) -> u32 {
        self.max_vip_stats
    }

    pub fn max_backends(&self) -> u32 {
        self.max_backends
    }

    pub fn max_backend_stats(&self) -> u32 {
        self.max_backend_stats
    }

    /// Slots of the ring map.
    pub fn ring_slots(&self) -> u64 {
        self.ring_slots
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
        Err(Error::VipTableFull { key: describe(key) })
    }

    /// Whether every key in `keys` that is not in its table yet could be
    /// placed, all of them together; nothing is written.
    pub fn check_room(&self, keys: &[VipKey]) -> Result<()> {
        let v4: Vec<_> = keys
            .iter()
            .filter_map(|k| if let VipKey::V4(k) = k { Some(*k) } else { None })
            .collect();
        let v6: Vec<_> = keys
            .iter()
            .filter_map(|k| if let VipKey::V6(k) = k { Some(*k) } else { None })
            .collect();
        let unplaced = viptable::unplaceable(&self.vips4, &v4)
            .map(VipKey::V4)
            .or_else(|| viptable::unplaceable(&self.vips6, &v6).map(VipKey::V6));
        match unplaced {
            None => Ok(()),
            Some(key) => Err(Error::VipTableFull { key: describe(&key) }),
        }
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

    /// Every backend slot, free ones included, by id.
    pub fn all_backends(&self) -> Result<Vec<Backend>> {
        (0..self.max_backends).map(|id| self.backend(id)).collect()
    }

    pub fn set_service(&mut self, id: u32, slot: &ServiceSlot) -> Result<()> {
        self.services.set(id, slot, 0).map_err(wrap(MAP_SERVICES))
    }

    pub fn services(&self) -> Result<Vec<(u32, ServiceSlot)>> {
        let mut out = Vec::new();
        for id in 0..self.max_services {
            let s = self.services.get(&id, 0).map_err(wrap(MAP_SERVICES))?;
            if s.flags & SERVICE_IN_USE != 0 {
                out.push((id, s));
            }
        }
        Ok(out)
    }

    /// A window of the ring map covering `row`, and where the row starts
    /// in it. Offsets into a memory map are whole pages.
    fn ring_window(&self, row: Row) -> Result<(Mapped<u32>, usize)> {
        let end = u64::from(row.base) + u64::from(row.size);
        if row.size == 0 || end > self.ring_slots {
            return Err(Error::Io {
                what: "a ring row outside the ring map",
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let page = page_size() as u64;
        let start = u64::from(row.base) * 4 / page * page;
        let skip = (u64::from(row.base) * 4 - start) as usize / 4;
        let len = skip + row.size as usize;
        let window = Mapped::new_at(self.rings.fd().as_fd(), start, len)
            .map_err(|source| Error::Io { what: "mapping the ring map", source })?;
        Ok((window, skip))
    }

    /// A copy of the table in `row`.
    pub fn read_ring(&self, row: Row) -> Result<Vec<u32>> {
        let (w, skip) = self.ring_window(row)?;
        Ok(w.as_slice()[skip..].to_vec())
    }

    /// Copies a Maglev table into `row` (one copy through a memory map, not
    /// a system call per slot).
    pub fn write_ring(&mut self, row: Row, table: &[u32]) -> Result<()> {
        let (mut w, skip) = self.ring_window(row)?;
        let dst = &mut w.as_mut_slice()[skip..];
        if dst.len() != table.len() {
            return Err(Error::Io {
                what: "a table of another size than its ring row",
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        dst.copy_from_slice(table);
        Ok(())
    }

    pub fn vip_traffic(&self, id: u32) -> Result<Traffic> {
        sum(self.vip_stats.get(&id, 0).map_err(wrap(MAP_VIP_STATS))?)
    }

    /// Every VIP's traffic, summed over CPUs, indexed by service id.
    pub fn all_vip_traffic(&self) -> Result<Vec<Traffic>> {
        all_traffic(&self.vip_stats)
    }

    /// Every backend slot's traffic, summed over CPUs, indexed by slot.
    pub fn all_backend_traffic(&self) -> Result<Vec<Traffic>> {
        all_traffic(&self.backend_stats)
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

/// `max_entries` of a map as created (or as found pinned).
fn max_entries(ebpf: &Ebpf, name: &'static str) -> Result<u32> {
    let map = ebpf.map(name).ok_or(Error::MissingMap { name })?;
    let data = match map {
        Map::Array(d) | Map::PerCpuArray(d) => d,
        _ => return Err(Error::MissingMap { name }),
    };
    Ok(data.info().map_err(wrap(name))?.max_entries())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// A VIP key for messages.
fn describe(key: &VipKey) -> String {
    key.decode().map_or_else(
        || format!("{key:?}"),
        |(a, p, s)| format!("{a}:{}/{:?} ({s:?} stage)", p.port, p.protocol),
    )
}

fn sum(values: PerCpuValues<Traffic>) -> Result<Traffic> {
    Ok(values.iter().fold(Traffic::default(), |acc, t| Traffic {
        packets: acc.packets + t.packets,
        bytes: acc.bytes + t.bytes,
    }))
}

/// Elements read per batched call.
const BATCH: u32 = 4096;

/// Every element of an array map (`cpus` values each for a per-CPU one,
/// else 1), in a few batched calls rather than one call per element.
pub fn read_batched<T: aya::Pod>(data: &MapData, cpus: usize) -> std::io::Result<Vec<T>> {
    let len = data.info().map_err(std::io::Error::other)?.max_entries();
    let mut out = Vec::with_capacity(len as usize * cpus);
    let mut buf = Vec::new();
    let mut read = 0u32;
    while read < len {
        let n = super::sys::lookup_batch(data.fd().as_fd(), read, BATCH, cpus, &mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf);
        read += n;
    }
    Ok(out)
}

/// A whole per-CPU traffic array, summed over CPUs: reading the counters
/// of 100,000 backends takes milliseconds, not 100,000 calls.
fn all_traffic(map: &PerCpuArray<MapData, Traffic>) -> Result<Vec<Traffic>> {
    use aya::maps::IterableMap as _;
    let cpus = nr_cpus().map_err(|(_, source)| Error::Io { what: "counting CPUs", source })?;
    let values: Vec<Traffic> = read_batched(map.map(), cpus)
        .map_err(|source| Error::Io { what: "reading traffic counters", source })?;
    Ok(values
        .chunks(cpus)
        .map(|per_cpu| {
            per_cpu.iter().fold(Traffic::default(), |acc, t| Traffic {
                packets: acc.packets + t.packets,
                bytes: acc.bytes + t.bytes,
            })
        })
        .collect())
}

fn zeroes() -> Result<PerCpuValues<Traffic>> {
    let cpus = nr_cpus().map_err(|(_, source)| Error::Io { what: "counting CPUs", source })?;
    PerCpuValues::try_from(vec![Traffic::default(); cpus])
        .map_err(|source| Error::Io { what: "per-CPU zeroes", source })
}
