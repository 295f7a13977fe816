//! The XDP dataplane: the only code in kube-dsr that uses aya.
//!
//! [`Dataplane::open`] loads the embedded XDP object, or adopts the one it
//! finds pinned under the bpffs directory, so that an agent restart or
//! upgrade never leaves a gap in forwarding: maps and the XDP link are pinned
//! and outlive the process. The domain API upserts and removes services,
//! drains backends and reads counters; Maglev tables are written into the
//! idle half of the service's double buffer and swapped in by one VIP-map
//! update.

mod alloc;
mod maps;
mod peers;
pub mod spec;
pub(crate) mod sys;
mod viptable;
mod vlan;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{Ordering, fence},
    time::{Duration, Instant},
};

use alloc::{IdPool, RingPool, Row};
use aya::{
    EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
    },
};
use kube_dsr_common::{
    ATTACH_GENERIC, ATTACH_NATIVE, BACKEND_DRAINING, BACKEND_IN_USE, BACKEND_LOCAL,
    BACKEND_VIA_NODE, Backend, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONNS4, MAP_CONNS6, MAP_RINGS,
    MAP_SERVICES, MAP_VIP_STATS, Meta, PROGRAM_NAME, REPLY_PROGRAM_NAME, RING_ROW, SERVICE_IN_USE,
    ServiceSlot, Traffic, VIP_NODE_ONLY, VIP_PIN_ALL, VIP_PINS, VipValue, reason,
};
pub use maps::read_batched;
use sha2::{Digest, Sha256};
pub use spec::{BackendSpec, Egress, PortSpec, Protocol, Reach, ServiceSpec, Stage};
use tracing::{info, warn};
pub use vlan::VlanTags;

use crate::error::{Error, Result};

/// The XDP object, built by `make bpf` and checked in (see bpf/obj/).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../bpf/obj/kube-dsr-xdp.o");

/// Where the agent pins its maps and link unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kube-dsr";

const LINK_PIN: &str = "xdp_link";
/// Pinned reply links are named `reply_<ifindex>`.
const REPLY_PIN_PREFIX: &str = "reply_";
/// Pins of map layouts this build no longer uses, removed when found.
const RETIRED_PINS: &[&str] = &["DSR_COUNTERS_V1"];

/// SHA-256 of the embedded XDP object.
pub fn object_sha256() -> [u8; 32] {
    Sha256::digest(OBJECT).into()
}

/// The embedded XDP object (for tools that load it on their own, such as
/// packet fixtures).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Requested attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic when the driver refuses.
    #[default]
    Auto,
    Native,
    Generic,
}

/// The attach mode that won.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Generic,
}

impl Attached {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
        }
    }
}

/// What [`Dataplane::settle`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Services whose previous table was dropped.
    pub previous_dropped: usize,
    /// Pins deleted (stale or redundant).
    pub pins_removed: usize,
    /// Services left without pins: their packets skip the connection table.
    pub unpinned_services: usize,
}

/// What [`Dataplane::open`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Nothing usable was pinned: loaded, attached and pinned anew.
    Fresh,
    /// The same program was attached: adopted as it runs, nothing reloaded.
    Adopted,
    /// Another build was attached: the new program replaced it atomically on
    /// the pinned link, keeping the pinned maps (and every flow in them).
    Upgraded,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Interface to attach to, in the calling thread's network namespace.
    pub interface: String,
    /// bpffs directory for the pins (one per attached interface).
    pub pin_dir: PathBuf,
    pub attach: AttachMode,
    /// Connection-table entries (LRU).
    pub conn_entries: u32,
    /// Capacities of the maps created by this dataplane (a map found pinned
    /// keeps the size it was created with).
    pub capacity: Capacity,
    /// Reload and swap the program even when the attached one is identical.
    pub force_reload: bool,
}

impl Config {
    pub fn new(interface: impl Into<String>) -> Self {
        Self {
            interface: interface.into(),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            attach: AttachMode::Auto,
            conn_entries: kube_dsr_common::DEFAULT_CONN_ENTRIES,
            capacity: Capacity::default(),
            force_reload: false,
        }
    }
}

/// How much one dataplane (one interface) can hold. Memory is reserved when
/// the maps are created, whatever is programmed later; DESIGN.md "Capacity"
/// gives the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service ids: one per VIP family and stage of a DsrService.
    pub services: u32,
    /// Backend slots: one per (service id, backend) — a node reached
    /// through its node stage counts once per service, whatever its pods.
    pub backends: u32,
    /// Maglev ring memory in chunks of [`RING_ROW`] slots (256 KiB each).
    /// Every service owns two rows of its table size (current and
    /// previous, or the next one being written).
    pub ring_chunks: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: kube_dsr_common::DEFAULT_MAX_SERVICES,
            backends: kube_dsr_common::DEFAULT_MAX_BACKENDS,
            ring_chunks: kube_dsr_common::DEFAULT_RING_CHUNKS,
        }
    }
}

impl Capacity {
    /// Bytes of one ring chunk.
    pub const CHUNK_BYTES: u64 = RING_ROW as u64 * 4;

    /// Whole chunks that fit in `mib` MiB.
    pub fn ring_chunks_in_mib(mib: u32) -> u32 {
        u32::try_from(u64::from(mib) * (1 << 20) / Self::CHUNK_BYTES).unwrap_or(u32::MAX)
    }

    /// Kernel memory of the maps sized by this capacity, in bytes, on a
    /// machine with `cpus` CPUs (per-CPU counters are per CPU). The VIP,
    /// peer, connection and counter maps come on top (fixed or sized by
    /// `conn_entries`).
    pub fn map_bytes(&self, cpus: u64) -> u64 {
        let services =
            u64::from(self.services) * (std::mem::size_of::<ServiceSlot>() as u64 + 16 * cpus);
        let backends =
            u64::from(self.backends) * (std::mem::size_of::<Backend>() as u64 + 16 * cpus);
        services + backends + u64::from(self.ring_chunks) * Self::CHUNK_BYTES
    }
}

/// What is left of a dataplane's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub capacity: Capacity,
    pub free_services: u32,
    pub free_backends: u32,
    pub free_ring_chunks: u32,
}

/// A service as programmed: its spec and the ids it holds.
#[derive(Clone, Debug)]
struct Installed {
    svc_id: u32,
    spec: ServiceSpec,
    /// Backend ids, parallel to `spec.backends`.
    ids: Vec<u32>,
    /// Generation of each backend slot, parallel to `ids`.
    gens: Vec<u32>,
    /// Where the current table is; `None`: no backend takes new flows.
    current: Option<Row>,
    /// The table before the last change, while it is kept.
    previous: Option<Row>,
    /// Every ring row the service owns: `current`, `previous`, and spares,
    /// so that it always holds two rows of its table size and a change never
    /// waits for ring memory.
    rows: Vec<Row>,
    /// When the table last changed (a restart counts as a change: the age
    /// of what it found is unknown).
    changed_at: Instant,
    /// The connection table may hold pins of this service (`VIP_PINS`).
    pins: bool,
    /// This process wrote (or compared) the current table for `spec`, so
    /// the same spec needs no new table.
    verified: bool,
}

impl Installed {
    fn vip_value(&self) -> VipValue {
        let (ring_base, ring_size) = self.current.map_or((0, 0), |r| (r.base, r.size));
        let (prev_base, prev_size) = self.previous.map_or((0, 0), |r| (r.base, r.size));
        VipValue {
            svc_id: self.svc_id,
            ring_base,
            ring_size,
            prev_base,
            prev_size,
            flags: if self.spec.pin_all_flows { VIP_PIN_ALL } else { 0 }
                | if self.pins { VIP_PINS } else { 0 },
        }
    }

    fn slot(&self) -> ServiceSlot {
        let mut name = [0u8; 64];
        name[..self.spec.name.len()].copy_from_slice(self.spec.name.as_bytes());
        ServiceSlot {
            name,
            flags: SERVICE_IN_USE,
            ring_base: self.current.map_or(0, |r| r.base),
            table_size: self.spec.table_size,
            _pad: [0; 3],
        }
    }

    /// Rows it no longer needs: neither current nor previous, and beyond
    /// the two of its table size it keeps.
    fn surplus_rows(&self) -> Vec<Row> {
        let in_use = |r: &Row| Some(*r) == self.current || Some(*r) == self.previous;
        let mut keep_spare = 2usize.saturating_sub(
            self.rows.iter().filter(|r| in_use(r) && r.size == self.spec.table_size).count(),
        );
        let mut out = Vec::new();
        for r in &self.rows {
            if in_use(r) {
                continue;
            }
            if r.size == self.spec.table_size && keep_spare > 0 {
                keep_spare -= 1;
                continue;
            }
            out.push(*r);
        }
        out
    }
}

/// What an upsert takes before it writes anything; given back when the
/// service is refused.
#[derive(Default)]
struct Taken {
    svc_id: Option<u32>,
    backend_ids: Vec<u32>,
    rows: Vec<Row>,
}

pub struct Dataplane {
    maps: maps::Maps,
    /// Holds the loaded reply program (new reply links attach it).
    ebpf: aya::Ebpf,
    pin_dir: PathBuf,
    ifindex: u32,
    /// The attach interface's MAC: the source of frames sent with XDP_TX.
    mac: [u8; 6],
    attached: Attached,
    start: Start,
    vlan: VlanTags,
    services: BTreeMap<String, Installed>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Generation of every backend slot, free ones included (a slot's next
    /// owner gets a higher one).
    slot_gens: Vec<u32>,
    rings: RingPool,
}

impl Dataplane {
    /// Loads or adopts the dataplane on `cfg.interface`. Must run on a
    /// thread inside the interface's network namespace; later calls may
    /// come from any thread.
    pub fn open(cfg: &Config) -> Result<Self> {
        std::fs::create_dir_all(&cfg.pin_dir)
            .map_err(|source| Error::Pin { path: cfg.pin_dir.clone(), source })?;
        let bpffs = sys::is_bpffs(&cfg.pin_dir)
            .map_err(|source| Error::Pin { path: cfg.pin_dir.clone(), source })?;
        if !bpffs {
            return Err(Error::NotBpffs { path: cfg.pin_dir.clone() });
        }
        let ifindex = sys::ifindex(&cfg.interface)
            .map_err(|source| Error::UnknownInterface { name: cfg.interface.clone(), source })?;
        let mac = sys::mac(&cfg.interface)
            .map_err(|source| Error::UnknownInterface { name: cfg.interface.clone(), source })?;
        // Before anything is attached: a tag stripped by the NIC would be
        // lost on a native XDP_TX. Generic XDP keeps it with the packet.
        let vlan = match cfg.attach {
            AttachMode::Generic => VlanTags::KeptWithPacket,
            AttachMode::Auto | AttachMode::Native => vlan::keep_tags_inline(&cfg.interface)
                .map_err(|source| Error::VlanOffload { name: cfg.interface.clone(), source })?,
        };

        let cap = cfg.capacity;
        // Whole chunks, two slots per element.
        let ring_entries = cap.ring_chunks.saturating_mul(RING_ROW / 2);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .map_max_entries(MAP_CONNS4, cfg.conn_entries)
            .map_max_entries(MAP_CONNS6, cfg.conn_entries)
            .map_max_entries(MAP_SERVICES, cap.services)
            .map_max_entries(MAP_VIP_STATS, cap.services)
            .map_max_entries(MAP_RINGS, ring_entries)
            .map_max_entries(MAP_BACKENDS, cap.backends)
            .map_max_entries(MAP_BACKEND_STATS, cap.backends)
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        let mut maps = maps::Maps::take(&mut ebpf)?;
        // Maps found pinned keep the size they were created with; the
        // capacity is what they really hold.
        let found = Capacity {
            services: maps.max_services().min(maps.max_vip_stats()),
            backends: maps.max_backends().min(maps.max_backend_stats()),
            ring_chunks: u32::try_from(maps.ring_slots() / u64::from(RING_ROW)).unwrap_or(u32::MAX),
        };
        if found != cap {
            warn!(
                interface = %cfg.interface,
                requested = ?cap,
                pinned = ?found,
                "pinned maps keep the capacity they were created with; \
                 `dsr-agent cleanup` (forwarding stops) lets the next start create them anew"
            );
        }

        let sha = object_sha256();
        let meta = maps.meta()?;
        let link_path = cfg.pin_dir.join(LINK_PIN);
        // A pinned link we cannot read is an error, not a reason to attach
        // again: the program it holds may still be forwarding.
        let pinned_ifindex = if link_path.exists() {
            Some(
                sys::pinned_xdp_link_ifindex(&link_path)
                    .map_err(|source| Error::Link { path: link_path.clone(), source })?,
            )
        } else {
            None
        };

        let (start, attached) = match pinned_ifindex {
            Some(i) if i == ifindex && meta.object_sha256 == sha && !cfg.force_reload => {
                (Start::Adopted, attached_from(meta.attach_mode))
            }
            Some(i) if i == ifindex => {
                let prog = program_of(&mut ebpf)?;
                prog.load().map_err(|e| Error::Program { action: "load", source: Box::new(e) })?;
                let pinned = PinnedLink::from_pin(&link_path).map_err(|e| Error::Link {
                    path: link_path.clone(),
                    source: std::io::Error::other(e),
                })?;
                let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| Error::Link {
                    path: link_path.clone(),
                    source: std::io::Error::other(e),
                })?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| Error::Program { action: "replace", source: Box::new(e) })?;
                // The pin holds the link; the program must not keep a
                // reference of its own (the Dataplane keeps the object
                // loaded, and removing the pin must detach).
                drop(
                    prog.take_link(id)
                        .map_err(|e| Error::Program { action: "link", source: Box::new(e) })?,
                );
                (Start::Upgraded, attached_from(meta.attach_mode))
            }
            stale => {
                if stale.is_some() {
                    // Pinned for an interface that is gone or renumbered.
                    warn!(path = %link_path.display(), "replacing a stale pinned link");
                    std::fs::remove_file(&link_path)
                        .map_err(|source| Error::Pin { path: link_path.clone(), source })?;
                }
                let prog = program_of(&mut ebpf)?;
                prog.load().map_err(|e| Error::Program { action: "load", source: Box::new(e) })?;
                let (attached, link_id) = attach(prog, ifindex, cfg.attach)?;
                let link = prog
                    .take_link(link_id)
                    .map_err(|e| Error::Program { action: "link", source: Box::new(e) })?;
                let link = FdLink::try_from(link).map_err(|e| Error::Link {
                    path: link_path.clone(),
                    source: std::io::Error::other(e),
                })?;
                link.pin(&link_path).map_err(|e| Error::Pin {
                    path: link_path.clone(),
                    source: std::io::Error::other(e),
                })?;
                (Start::Fresh, attached)
            }
        };
        maps.set_meta(&Meta {
            object_sha256: sha,
            ifindex,
            attach_mode: match attached {
                Attached::Native => ATTACH_NATIVE,
                Attached::Generic => ATTACH_GENERIC,
            },
            mac: [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0],
        })?;

        for retired in RETIRED_PINS {
            let path = cfg.pin_dir.join(retired);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|source| Error::Pin { path, source })?;
            }
        }
        let reply = reply_program_of(&mut ebpf)?;
        reply.load().map_err(|e| Error::Program { action: "load (reply)", source: Box::new(e) })?;
        let replies = adopt_replies(reply, &cfg.pin_dir, start != Start::Adopted)?;
        let vlan = match attached {
            Attached::Generic => VlanTags::KeptWithPacket,
            Attached::Native => vlan,
        };

        let mut service_ids = IdPool::new(found.services);
        let mut backend_ids = IdPool::new(found.backends);
        let mut rings = RingPool::new(u64::from(found.ring_chunks) * u64::from(RING_ROW));
        let mut slot_gens = Vec::new();
        let services =
            read_back(&mut maps, &mut service_ids, &mut backend_ids, &mut slot_gens, &mut rings)?;
        info!(
            interface = %cfg.interface,
            mode = attached.as_str(),
            start = ?start,
            services = services.len(),
            capacity = ?found,
            replies,
            vlan_tags = vlan.as_str(),
            "dataplane ready"
        );
        Ok(Self {
            maps,
            ebpf,
            pin_dir: cfg.pin_dir.clone(),
            ifindex,
            mac,
            attached,
            start,
            vlan,
            services,
            service_ids,
            backend_ids,
            slot_gens,
            rings,
        })
    }

    /// Capacity and what is free of it.
    pub fn usage(&self) -> Usage {
        Usage {
            capacity: Capacity {
                services: self.service_ids.len(),
                backends: self.backend_ids.len(),
                ring_chunks: self.rings.chunks(),
            },
            free_services: self.service_ids.free() as u32,
            free_backends: self.backend_ids.free() as u32,
            free_ring_chunks: self.rings.free_chunks(),
        }
    }

    pub fn attached(&self) -> Attached {
        self.attached
    }

    /// How 802.1Q tags reach the program on the attach interface.
    pub fn vlan_tags(&self) -> &VlanTags {
        &self.vlan
    }

    pub fn start(&self) -> Start {
        self.start
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The services as programmed (after a restart: as read back from the
    /// pinned maps), so a caller can diff them against what it wants.
    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values().map(|s| &s.spec)
    }

    /// Programs a service, or changes one in place. Backends that stay keep
    /// their flows; the new Maglev table becomes live in one step.
    ///
    /// Everything the change needs (service id, backend slots, ring rows,
    /// VIP table slots) is taken before anything is written: a service that
    /// does not fit is refused with a capacity error
    /// ([`Error::is_capacity`]), leaving the dataplane exactly as it was —
    /// a service already programmed keeps forwarding as before.
    pub fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        spec.validate()?;
        if spec.stage == Stage::Node
            && let Some(b) =
                spec.backends.iter().find(|b| b.egress.is_some_and(|e| e.ifindex == self.ifindex))
        {
            return Err(Error::InvalidService {
                service: spec.name.clone(),
                reason: format!(
                    "backend {} of a node stage is behind the attach interface: frames would go \
                     back onto the segment",
                    b.addr
                ),
            });
        }
        let mut spec = spec.clone();
        spec.ports.sort();
        spec.backends.sort_by_key(|b| b.addr);
        self.check_conflicts(&spec)?;

        let old = self.services.get(&spec.name).cloned();
        let mut taken = Taken::default();
        match self.program(&spec, old.as_ref(), &mut taken) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Nothing was written for what was taken: give it back.
                if let Some(id) = taken.svc_id {
                    self.service_ids.release(id);
                }
                for id in taken.backend_ids {
                    self.backend_ids.release(id);
                }
                for r in taken.rows {
                    self.rings.release(r);
                }
                Err(e)
            }
        }
    }

    /// The body of [`Self::upsert_service`]: first every allocation (each
    /// recorded in `taken`), then the writes.
    fn program(
        &mut self,
        spec: &ServiceSpec,
        old: Option<&Installed>,
        taken: &mut Taken,
    ) -> Result<()> {
        let name = &spec.name;
        let svc_id = match old {
            Some(o) => o.svc_id,
            None => {
                let id = self.service_ids.alloc(1).ok_or_else(|| Error::ServicesFull {
                    service: name.clone(),
                    max: self.service_ids.len(),
                })?[0];
                taken.svc_id = Some(id);
                id
            }
        };

        // Backend slots: backends that stay keep theirs (and their flows);
        // new ones get free slots, all at once or none.
        let kept: Vec<Option<(u32, u32)>> = spec
            .backends
            .iter()
            .map(|b| {
                old.and_then(|o| {
                    let i = o.spec.backends.iter().position(|ob| ob.addr == b.addr)?;
                    Some((o.ids[i], o.gens[i]))
                })
            })
            .collect();
        let wanted = kept.iter().filter(|k| k.is_none()).count();
        let mut fresh = self
            .backend_ids
            .alloc(wanted)
            .ok_or_else(|| Error::BackendsFull {
                service: name.clone(),
                wanted,
                free: self.backend_ids.free(),
                max: self.backend_ids.len(),
            })?
            .into_iter();
        taken.backend_ids = fresh.clone().collect();
        let mut ids = Vec::with_capacity(kept.len());
        let mut gens = Vec::with_capacity(kept.len());
        let mut new_slots = Vec::new();
        for k in &kept {
            match k {
                Some((id, generation)) => {
                    ids.push(*id);
                    gens.push(*generation);
                }
                None => {
                    let id = fresh.next().expect("allocated above");
                    let generation = next_generation(self.slot_gens[id as usize]);
                    ids.push(id);
                    gens.push(generation);
                    new_slots.push(id);
                }
            }
        }

        // The table, and the row it goes into. A service owns two rows of
        // its table size: the current table and the previous one (or a
        // spare). A change while the previous table is still kept takes a
        // third row when one is free, else it gives the previous table up.
        // The same spec as last written gives the same table: no need to
        // build it (after a restart the table is built and compared once).
        let same_spec = old.is_some_and(|o| o.verified && o.spec == *spec);
        let table = if same_spec { None } else { spec.table(&ids)? };
        let size = spec.table_size;
        let mut rows: Vec<Row> = old.map(|o| o.rows.clone()).unwrap_or_default();
        let of_size = rows.iter().filter(|r| r.size == size).count();
        if of_size < 2 {
            let n = 2 - of_size;
            let got = self.rings.alloc(size, n).ok_or_else(|| Error::RingsFull {
                service: name.clone(),
                table_size: size,
                rows: n,
                available: self.rings.available(size),
                chunks: self.rings.chunks(),
            })?;
            taken.rows.extend(got.iter().copied());
            rows.extend(got);
        }
        let (old_current, old_previous) = old.map_or((None, None), |o| (o.current, o.previous));
        let unchanged = same_spec
            || old.is_some_and(|o| match (&table, o.current) {
                (Some(t), Some(cur)) => {
                    cur.size == size && self.maps.read_ring(cur).is_ok_and(|r| r == *t)
                }
                (None, None) => true,
                _ => false,
            });
        let mut give_up_previous = false;
        let target = if unchanged || table.is_none() {
            None
        } else {
            let idle = rows
                .iter()
                .copied()
                .find(|r| r.size == size && Some(*r) != old_current && Some(*r) != old_previous);
            match idle {
                Some(r) => Some(r),
                None => match self.rings.alloc(size, 1) {
                    Some(extra) => {
                        taken.rows.push(extra[0]);
                        rows.push(extra[0]);
                        Some(extra[0])
                    }
                    None => {
                        give_up_previous = true;
                        old_previous
                    }
                },
            }
        };

        // VIP table slots for keys not held yet (placement is decided by the
        // table's contents, so check them all together).
        let mut keys = Vec::new();
        for p in &spec.ports {
            keys.push(spec::vip_key(spec.vip, *p, spec.stage));
            if spec.stage == Stage::Node {
                keys.push(spec::vip_key(spec.vip, *p, Stage::Ingress));
            }
        }
        self.maps.check_room(&keys)?;

        // Nothing can run out from here on. (A failing write from here on
        // is a kernel error, not a full map: what was taken stays with the
        // service as far as it got, and a restart's read-back sorts it out.)
        *taken = Taken::default();
        if old.is_none() {
            // Claim the service first: a crash from here on leaves a named
            // service that a restart reads back and can finish or remove.
            let claim = Installed {
                svc_id,
                spec: ServiceSpec { ports: Vec::new(), backends: Vec::new(), ..spec.clone() },
                ids: Vec::new(),
                gens: Vec::new(),
                current: None,
                previous: None,
                rows: Vec::new(),
                changed_at: Instant::now(),
                pins: false,
                verified: false,
            };
            self.maps.set_service(svc_id, &claim.slot())?;
            self.maps.reset_vip_stats(svc_id)?;
        }
        for ((b, &id), &generation) in spec.backends.iter().zip(&ids).zip(&gens) {
            if new_slots.contains(&id) {
                self.maps.reset_backend_stats(id)?;
            }
            let value = backend_value(b, svc_id, generation, self.ifindex, self.mac);
            let changed = match old {
                Some(o) => o.ids.iter().position(|x| *x == id).is_none_or(|i| {
                    backend_value(&o.spec.backends[i], svc_id, generation, self.ifindex, self.mac)
                        != value
                }),
                None => true,
            };
            if changed {
                self.maps.set_backend(id, &value)?;
                self.slot_gens[id as usize] = generation;
            }
        }

        // A changed table goes into a row packets are not reading; the one
        // it replaces stays as the previous table (see the XDP program's
        // `pick`). An unchanged table changes nothing, so a periodic resync
        // never disturbs flows.
        let installed = match old {
            Some(o) if unchanged => {
                let pins = o.pins || spec.pin_all_flows;
                Installed { spec: spec.clone(), ids, gens, rows, pins, verified: true, ..o.clone() }
            }
            _ => {
                if give_up_previous && let Some(o) = old {
                    // The previous row is about to be rewritten: no packet
                    // may read it as the previous table any more.
                    let without = Installed { previous: None, ..o.clone() };
                    let value = without.vip_value();
                    for p in &o.spec.ports {
                        self.maps.set_vip(&spec::vip_key(o.spec.vip, *p, o.spec.stage), &value)?;
                    }
                }
                if let (Some(t), Some(row)) = (&table, target) {
                    self.maps.write_ring(row, t)?;
                    // The table must be complete before a VIP entry names it
                    // (the VIP tables are written through a memory map too).
                    fence(Ordering::SeqCst);
                }
                let previous = old_current;
                // Pins appear from the moment two tables can disagree.
                let pins = previous.is_some() || spec.pin_all_flows || old.is_some_and(|o| o.pins);
                Installed {
                    svc_id,
                    spec: spec.clone(),
                    ids,
                    gens,
                    current: target,
                    previous,
                    rows,
                    changed_at: Instant::now(),
                    pins,
                    verified: true,
                }
            }
        };
        let value = installed.vip_value();
        let slot = installed.slot();
        let surplus = installed.surplus_rows();
        let (stage, vip, ports) =
            (installed.spec.stage, installed.spec.vip, installed.spec.ports.clone());
        let mut installed = installed;
        installed.rows.retain(|r| !surplus.contains(r));
        self.services.insert(name.clone(), installed);
        for p in &ports {
            self.maps.set_vip(&spec::vip_key(vip, *p, stage), &value)?;
            if stage == Stage::Node {
                self.sync_ingress_key(vip, *p)?;
            }
        }
        if let Some(o) = old {
            for p in &o.spec.ports {
                if o.spec.vip != vip || !ports.contains(p) {
                    self.unpublish(o.spec.vip, *p, stage)?;
                }
            }
        }
        self.maps.set_service(svc_id, &slot)?;

        // Only now that no table names them: release backends that left,
        // and rows no longer needed.
        if let Some(o) = old {
            for (b, id) in o.spec.backends.iter().zip(&o.ids) {
                if !spec.backends.iter().any(|nb| nb.addr == b.addr) {
                    self.maps.release_backend(*id)?;
                    self.backend_ids.release(*id);
                }
            }
        }
        for r in surplus {
            self.rings.release(r);
        }
        Ok(())
    }

    /// Removes a VIP:port of a service in `stage` that no longer holds it
    /// (the service is already out of `services` or without the port).
    fn unpublish(&mut self, vip: IpAddr, port: PortSpec, stage: Stage) -> Result<()> {
        if stage == Stage::Node {
            self.maps.remove_vip(&spec::vip_key(vip, port, Stage::Node))?;
        }
        self.sync_ingress_key(vip, port)
    }

    /// The ingress-stage key of a VIP:port: an ingress service's own value
    /// (written by its upsert), else a `VIP_NODE_ONLY` entry while a node
    /// stage serves it (so the one probe every packet makes finds it), else
    /// nothing.
    fn sync_ingress_key(&mut self, vip: IpAddr, port: PortSpec) -> Result<()> {
        let holder = |stage: Stage| {
            self.services.values().find(|s| {
                s.spec.stage == stage && s.spec.vip == vip && s.spec.ports.contains(&port)
            })
        };
        if holder(Stage::Ingress).is_some() {
            return Ok(());
        }
        let key = spec::vip_key(vip, port, Stage::Ingress);
        match holder(Stage::Node) {
            Some(node) => {
                let value = VipValue {
                    svc_id: node.svc_id,
                    ring_base: 0,
                    ring_size: 0,
                    prev_base: 0,
                    prev_size: 0,
                    flags: VIP_NODE_ONLY,
                };
                self.maps.set_vip(&key, &value)
            }
            None => self.maps.remove_vip(&key),
        }
    }

    /// Settles services after a table change; call it periodically.
    ///
    /// 1. Forgets the previous table of every service whose table changed
    ///    at least `age` ago. From then on new flows follow the current
    ///    table alone, so a draining backend stops receiving new UDP flows
    ///    (which cannot be told from established ones while the previous
    ///    table is kept); established flows seen since the change are
    ///    pinned already.
    /// 2. For settled services, sweeps the connection table: pins naming a
    ///    backend that is gone, or the backend the current table gives the
    ///    flow anyway, are deleted. A service left without pins gets its
    ///    `VIP_PINS` flag cleared, and its packets skip the table.
    pub fn settle(&mut self, age: Duration) -> Result<Settled> {
        let due: Vec<String> = self
            .services
            .values()
            .filter(|s| s.previous.is_some() && s.changed_at.elapsed() >= age)
            .map(|s| s.spec.name.clone())
            .collect();
        for name in &due {
            if let Some(s) = self.services.get_mut(name) {
                s.previous = None;
            }
        }

        // Services whose pins can be collected: no previous table and no
        // pin-all, so the kernel creates no new pins for them meanwhile.
        let sweep: HashMap<u32, &Installed> = self
            .services
            .values()
            .filter(|s| s.pins && s.previous.is_none() && !s.spec.pin_all_flows)
            .map(|s| (s.svc_id, s))
            .collect();
        let mut pins_removed = 0;
        let mut still_pinned = HashSet::new();
        if !sweep.is_empty() {
            // Current tables are read once per service that holds pins.
            let mut tables: HashMap<u32, Option<Vec<u32>>> = HashMap::new();
            for pin in self.maps.pins()? {
                let Some(s) = sweep.get(&pin.svc_id) else { continue };
                let live = s
                    .ids
                    .iter()
                    .zip(&s.gens)
                    .any(|(id, g)| *id == pin.value.backend_id && *g == pin.value.backend_gen);
                let table = match tables.entry(s.svc_id) {
                    std::collections::hash_map::Entry::Occupied(t) => t.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(s.current.map(|r| self.maps.read_ring(r)).transpose()?)
                    }
                };
                let current = table.as_ref().map(|t| t[(pin.hash % t.len() as u32) as usize]);
                if live && current != Some(pin.value.backend_id) {
                    still_pinned.insert(pin.svc_id);
                } else {
                    self.maps.remove_pin(&pin.key)?;
                    pins_removed += 1;
                }
            }
        }
        let cleared: Vec<u32> =
            sweep.keys().copied().filter(|id| !still_pinned.contains(id)).collect();

        let previous_dropped = due.len();
        let mut touched: Vec<String> = due;
        for s in self.services.values_mut() {
            if cleared.contains(&s.svc_id) {
                s.pins = false;
                touched.push(s.spec.name.clone());
            }
        }
        touched.sort();
        touched.dedup();
        for name in &touched {
            let Some(s) = self.services.get(name) else { continue };
            let value = s.vip_value();
            for p in &s.spec.ports {
                self.maps.set_vip(&spec::vip_key(s.spec.vip, *p, s.spec.stage), &value)?;
            }
            self.maps.set_service(s.svc_id, &s.slot())?;
            // The dropped previous row is free once no VIP entry names it.
            let surplus = s.surplus_rows();
            if let Some(s) = self.services.get_mut(name) {
                s.rows.retain(|r| !surplus.contains(r));
            }
            for r in surplus {
                self.rings.release(r);
            }
        }
        Ok(Settled { previous_dropped, pins_removed, unpinned_services: cleared.len() })
    }

    /// Stops forwarding a service's VIP ports; their packets pass to the
    /// kernel again.
    pub fn remove_service(&mut self, name: &str) -> Result<()> {
        let Some(old) = self.services.remove(name) else {
            return Err(Error::UnknownService(name.to_string()));
        };
        for p in &old.spec.ports {
            self.unpublish(old.spec.vip, *p, old.spec.stage)?;
        }
        for id in &old.ids {
            self.maps.release_backend(*id)?;
            self.backend_ids.release(*id);
        }
        self.maps.set_service(old.svc_id, &ServiceSlot { flags: 0, ..old.slot() })?;
        self.service_ids.release(old.svc_id);
        for r in old.rows {
            self.rings.release(r);
        }
        Ok(())
    }

    /// Marks one backend draining (no new flows, existing ones continue) or
    /// back in service.
    pub fn set_draining(&mut self, name: &str, addr: IpAddr, draining: bool) -> Result<()> {
        let installed =
            self.services.get(name).ok_or_else(|| Error::UnknownService(name.to_string()))?;
        let mut spec = installed.spec.clone();
        let b = spec
            .backends
            .iter_mut()
            .find(|b| b.addr == addr)
            .ok_or_else(|| Error::UnknownBackend { service: name.to_string(), addr })?;
        b.draining = draining;
        self.upsert_service(&spec)
    }

    /// Where a service's tables start in the ring map: the current one
    /// (`u32::MAX` without a table), and the previous one while it is kept
    /// (diagnostics: a row changes only when the table changes).
    pub fn service_rows(&self, name: &str) -> Option<(u32, Option<u32>)> {
        self.services
            .get(name)
            .map(|s| (s.current.map_or(u32::MAX, |r| r.base), s.previous.map(|p| p.base)))
    }

    /// Packets and bytes forwarded for a service (summed over CPUs).
    pub fn service_traffic(&self, name: &str) -> Result<Traffic> {
        let s = self.services.get(name).ok_or_else(|| Error::UnknownService(name.to_string()))?;
        self.maps.vip_traffic(s.svc_id)
    }

    /// Packets and bytes forwarded to one backend of a service.
    pub fn backend_traffic(&self, name: &str, addr: IpAddr) -> Result<Traffic> {
        let s = self.services.get(name).ok_or_else(|| Error::UnknownService(name.to_string()))?;
        let i = s
            .spec
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| Error::UnknownBackend { service: name.to_string(), addr })?;
        self.maps.backend_traffic(s.ids[i])
    }

    /// Traffic of every service and of each of its backends, in the order
    /// of [`Self::services`] and of their backends: every counter read in
    /// a few batched calls.
    #[allow(clippy::type_complexity)]
    pub fn all_traffic(&self) -> Result<Vec<(&ServiceSpec, Traffic, Vec<(IpAddr, Traffic)>)>> {
        let vips = self.maps.all_vip_traffic()?;
        let backends = self.maps.all_backend_traffic()?;
        let at = |v: &[Traffic], i: u32| v.get(i as usize).copied().unwrap_or_default();
        Ok(self
            .services
            .values()
            .map(|s| {
                let per_backend = s
                    .spec
                    .backends
                    .iter()
                    .zip(&s.ids)
                    .map(|(b, id)| (b.addr, at(&backends, *id)))
                    .collect();
                (&s.spec, at(&vips, s.svc_id), per_backend)
            })
            .collect())
    }

    /// Packets per verdict reason, summed over CPUs, labelled with the fixed
    /// names of [`kube_dsr_common::reason::NAMES`].
    pub fn reason_counts(&self) -> Result<Vec<(&'static str, u64)>> {
        (0..reason::COUNT).map(|r| Ok((reason::NAMES[r as usize], self.maps.counter(r)?))).collect()
    }

    /// Sets the peers: the MACs of the other kube-dsr nodes' ingress-stage
    /// interfaces on this segment (the whole set). A VIP frame from a peer
    /// goes to the node stage and is never balanced again.
    pub fn set_peers(&mut self, macs: &[[u8; 6]]) -> Result<()> {
        if let Some(m) = macs.iter().find(|m| **m == [0; 6] || m[0] & 1 == 1) {
            return Err(Error::Io {
                what: "a peer MAC must be unicast",
                source: std::io::Error::other(format!("{m:02x?}")),
            });
        }
        self.maps.set_peers(&macs.iter().copied().collect())
    }

    /// The peer MACs as programmed (also after a restart).
    pub fn peers(&self) -> Vec<[u8; 6]> {
        self.maps.peers().into_iter().collect()
    }

    /// Attaches the reply program (tcx ingress) on a local backend pod's
    /// host-side interface, `ifindex` in the dataplane's network namespace
    /// (call it from a thread in that namespace). Idempotent. The link is
    /// pinned under the pin directory: it survives agent restarts, and an
    /// upgrade swaps the program in place.
    pub fn attach_reply(&mut self, ifindex: u32) -> Result<()> {
        if ifindex == self.ifindex {
            return Err(Error::Io {
                what: "the reply program never goes on the dataplane's own interface",
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let path = self.pin_dir.join(format!("{REPLY_PIN_PREFIX}{ifindex}"));
        if path.exists() {
            match sys::pinned_tcx_link_ifindex(&path) {
                Ok(i) if i == ifindex => return Ok(()),
                _ => {
                    // Its interface is gone (or renumbered): replace it.
                    std::fs::remove_file(&path)
                        .map_err(|source| Error::Pin { path: path.clone(), source })?;
                }
            }
        }
        let name = sys::ifname(ifindex)
            .map_err(|source| Error::UnknownInterfaceIndex { index: ifindex, source })?;
        let prog = reply_program_of(&mut self.ebpf)?;
        let id = prog
            .attach_with_options(
                &name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| Error::Program { action: "attach (reply)", source: Box::new(e) })?;
        let link = prog
            .take_link(id)
            .map_err(|e| Error::Program { action: "link (reply)", source: Box::new(e) })?;
        let link = FdLink::try_from(link)
            .map_err(|e| Error::Link { path: path.clone(), source: std::io::Error::other(e) })?;
        link.pin(&path)
            .map_err(|e| Error::Pin { path: path.clone(), source: std::io::Error::other(e) })?;
        Ok(())
    }

    /// Detaches the reply program from an interface (idempotent; also for
    /// an interface that is gone).
    pub fn detach_reply(&mut self, ifindex: u32) -> Result<()> {
        let path = self.pin_dir.join(format!("{REPLY_PIN_PREFIX}{ifindex}"));
        // Detached now (fails harmlessly for a link whose interface is
        // gone); the pin, its last reference, goes next.
        let _ = sys::detach_pinned_link(&path);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Pin { path, source }),
        }
    }

    /// Interfaces the reply program is attached to (pinned links, also
    /// those a previous agent attached), in order. Links whose interface is
    /// gone are not listed.
    pub fn replies(&self) -> Vec<u32> {
        reply_pins(&self.pin_dir)
            .into_iter()
            .filter(|(i, path)| sys::pinned_tcx_link_ifindex(path).is_ok_and(|at| at == *i))
            .map(|(i, _)| i)
            .collect()
    }

    fn check_conflicts(&self, spec: &ServiceSpec) -> Result<()> {
        for other in self.services.values().filter(|o| o.spec.name != spec.name) {
            if other.spec.vip != spec.vip || other.spec.stage != spec.stage {
                continue;
            }
            if let Some(p) = spec.ports.iter().find(|p| other.spec.ports.contains(p)) {
                return Err(Error::InvalidService {
                    service: spec.name.clone(),
                    reason: format!(
                        "{}:{}/{:?} is already programmed for {:?} ({:?} stage)",
                        spec.vip, p.port, p.protocol, other.spec.name, spec.stage
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes every pin under `pin_dir`: the XDP link and the reply links
    /// (a pin is a link's last reference, so removing it detaches the
    /// program) and the maps. Forwarding stops. For `dsr-agent cleanup`;
    /// no `Dataplane` of the directory may be open.
    pub fn remove_pins(pin_dir: &Path) -> Result<()> {
        let link = pin_dir.join(LINK_PIN);
        if link.exists() {
            // Detached now, not after bpffs frees the pin's inode.
            let _ = sys::detach_pinned_link(&link);
            match PinnedLink::from_pin(&link) {
                Ok(l) => {
                    l.unpin().map_err(|source| Error::Pin { path: link.clone(), source })?;
                }
                Err(_) => std::fs::remove_file(&link)
                    .map_err(|source| Error::Pin { path: link.clone(), source })?,
            }
        }
        let entries = match std::fs::read_dir(pin_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(Error::Pin { path: pin_dir.to_path_buf(), source }),
        };
        for entry in entries {
            let path = entry.map_err(|source| Error::Pin { path: pin_dir.into(), source })?.path();
            let is_reply = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(REPLY_PIN_PREFIX));
            if is_reply {
                // Detached now, not after bpffs frees the pin's inode.
                let _ = sys::detach_pinned_link(&path);
            }
            std::fs::remove_file(&path).map_err(|source| Error::Pin { path, source })?;
        }
        std::fs::remove_dir(pin_dir)
            .map_err(|source| Error::Pin { path: pin_dir.to_path_buf(), source })
    }
}

fn reply_program_of(ebpf: &mut aya::Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(REPLY_PROGRAM_NAME)
        .ok_or(Error::MissingMap { name: REPLY_PROGRAM_NAME })?
        .try_into()
        .map_err(|e| Error::Program { action: "lookup (reply)", source: Box::new(e) })
}

/// The reply pins under `pin_dir` with the interface each names.
fn reply_pins(pin_dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return Vec::new() };
    let mut out: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let i = e.file_name().to_str()?.strip_prefix(REPLY_PIN_PREFIX)?.parse().ok()?;
            Some((i, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Takes over the reply links a previous agent pinned: links whose
/// interface is gone are unpinned; with `replace`, the others get the
/// freshly loaded program atomically (an upgrade). Returns how many stay.
fn adopt_replies(prog: &mut SchedClassifier, pin_dir: &Path, replace: bool) -> Result<usize> {
    let mut kept = 0;
    for (ifindex, path) in reply_pins(pin_dir) {
        if !sys::pinned_tcx_link_ifindex(&path).is_ok_and(|at| at == ifindex) {
            warn!(path = %path.display(), "removing a reply link whose interface is gone");
            std::fs::remove_file(&path).map_err(|source| Error::Pin { path, source })?;
            continue;
        }
        kept += 1;
        if !replace {
            continue;
        }
        let link_err =
            |e: String| Error::Link { path: path.clone(), source: std::io::Error::other(e) };
        let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(e.to_string()))?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned))
            .map_err(|e| link_err(e.to_string()))?;
        let id = prog
            .attach_to_link(link)
            .map_err(|e| Error::Program { action: "replace (reply)", source: Box::new(e) })?;
        // Only the pin may hold the link (see the XDP link above).
        drop(
            prog.take_link(id)
                .map_err(|e| Error::Program { action: "link (reply)", source: Box::new(e) })?,
        );
    }
    Ok(kept)
}

fn program_of(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(Error::MissingMap { name: PROGRAM_NAME })?
        .try_into()
        .map_err(|e| Error::Program { action: "lookup", source: Box::new(e) })
}

/// Native first (unless generic is asked for), generic when the driver
/// refuses and the caller allowed it.
fn attach(prog: &mut Xdp, ifindex: u32, mode: AttachMode) -> Result<(Attached, XdpLinkId)> {
    match mode {
        AttachMode::Native => Ok((Attached::Native, prog_attach(prog, ifindex, XdpMode::Driver)?)),
        AttachMode::Generic => Ok((Attached::Generic, prog_attach(prog, ifindex, XdpMode::Skb)?)),
        AttachMode::Auto => match prog_attach(prog, ifindex, XdpMode::Driver) {
            Ok(id) => Ok((Attached::Native, id)),
            Err(e) => {
                warn!(error = %e, "native XDP refused, falling back to generic mode");
                Ok((Attached::Generic, prog_attach(prog, ifindex, XdpMode::Skb)?))
            }
        },
    }
}

fn prog_attach(prog: &mut Xdp, ifindex: u32, mode: XdpMode) -> Result<XdpLinkId> {
    prog.attach_to_if_index(ifindex, mode)
        .map_err(|e| Error::Program { action: "attach", source: Box::new(e) })
}

fn attached_from(mode: u32) -> Attached {
    if mode == ATTACH_GENERIC { Attached::Generic } else { Attached::Native }
}

fn next_generation(previous: u32) -> u32 {
    match previous.wrapping_add(1) {
        0 => 1,
        g => g,
    }
}

fn backend_value(
    b: &BackendSpec,
    svc_id: u32,
    generation: u32,
    attach_ifindex: u32,
    attach_mac: [u8; 6],
) -> Backend {
    let (addr, family) = spec::addr_words(b.addr);
    let (ifindex, src) = match b.egress {
        Some(e) if e.ifindex != attach_ifindex => (e.ifindex, e.mac),
        _ => (0, attach_mac),
    };
    let reach = match b.reach {
        Reach::Direct => 0,
        Reach::ViaNode => BACKEND_VIA_NODE,
        Reach::Local => BACKEND_LOCAL,
    };
    Backend {
        macs: Backend::macs_from(b.mac, src),
        ifindex,
        generation,
        flags: BACKEND_IN_USE | reach | if b.draining { BACKEND_DRAINING } else { 0 },
        svc_id,
        weight: b.weight,
        addr,
        family,
        _pad: [0; 7],
    }
}

/// Rebuilds the programmed services from the pinned maps, removing on the
/// way what a crash mid-update can leave behind: VIP entries and backend
/// slots of a service that is not (or no longer) claimed. Marks every id
/// and ring row found as taken, and fills `slot_gens` with every backend
/// slot's generation.
fn read_back(
    maps: &mut maps::Maps,
    service_ids: &mut IdPool,
    backend_ids: &mut IdPool,
    slot_gens: &mut Vec<u32>,
    rings: &mut RingPool,
) -> Result<BTreeMap<String, Installed>> {
    let mut by_id: BTreeMap<u32, Installed> = BTreeMap::new();
    for (svc_id, slot) in maps.services()? {
        if !service_ids.take(svc_id) {
            continue;
        }
        let len = slot.name.iter().position(|&c| c == 0).unwrap_or(slot.name.len());
        let name = String::from_utf8_lossy(&slot.name[..len]).into_owned();
        by_id.insert(
            svc_id,
            Installed {
                svc_id,
                spec: ServiceSpec {
                    name,
                    vip: IpAddr::from([0, 0, 0, 0]),
                    ports: Vec::new(),
                    table_size: slot.table_size,
                    backends: Vec::new(),
                    pin_all_flows: false,
                    stage: Stage::Ingress,
                },
                ids: Vec::new(),
                gens: Vec::new(),
                current: None,
                previous: None,
                rows: Vec::new(),
                changed_at: Instant::now(),
                pins: false,
                verified: false,
            },
        );
    }
    for (key, value) in maps.vips()? {
        let Some(s) = by_id.get_mut(&value.svc_id) else {
            warn!(?key, svc_id = value.svc_id, "removing an orphaned VIP entry");
            maps.remove_vip(&key)?;
            continue;
        };
        let Some((vip, port, stage)) = key.decode() else { continue };
        if value.flags & VIP_NODE_ONLY != 0 {
            // Derived from the node stage's own entry; rewritten with it.
            continue;
        }
        s.spec.stage = stage;
        s.current =
            (value.ring_size != 0).then_some(Row { base: value.ring_base, size: value.ring_size });
        s.previous =
            (value.prev_size != 0).then_some(Row { base: value.prev_base, size: value.prev_size });
        s.spec.pin_all_flows = value.flags & VIP_PIN_ALL != 0;
        s.pins = value.flags & VIP_PINS != 0;
        s.spec.vip = vip;
        s.spec.ports.push(port);
    }
    for (id, b) in maps.all_backends()?.into_iter().enumerate() {
        let id = id as u32;
        slot_gens.push(b.generation);
        if b.flags & BACKEND_IN_USE == 0 {
            continue;
        }
        let Some(s) = by_id.get_mut(&b.svc_id).filter(|_| backend_ids.take(id)) else {
            warn!(backend = id, svc_id = b.svc_id, "releasing an orphaned backend slot");
            maps.release_backend(id)?;
            continue;
        };
        // ifindex 0 means "out of the attach interface" (XDP_TX).
        let egress = (b.ifindex != 0).then(|| Egress { ifindex: b.ifindex, mac: b.src_mac() });
        s.spec.backends.push(BackendSpec {
            addr: spec::words_addr(b.addr, b.family),
            mac: b.dst_mac(),
            weight: b.weight,
            draining: b.flags & BACKEND_DRAINING != 0,
            egress,
            reach: if b.flags & BACKEND_LOCAL != 0 {
                Reach::Local
            } else if b.flags & BACKEND_VIA_NODE != 0 {
                Reach::ViaNode
            } else {
                Reach::Direct
            },
        });
        s.ids.push(id);
        s.gens.push(b.generation);
    }
    let mut out = BTreeMap::new();
    for (_, mut s) in by_id {
        // Keep the invariants upsert relies on: sorted, ids parallel.
        let mut pairs: Vec<_> =
            s.spec.backends.drain(..).zip(s.ids.drain(..).zip(s.gens.drain(..))).collect();
        pairs.sort_by_key(|(b, _)| b.addr);
        let (backends, idgens): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        s.spec.backends = backends;
        (s.ids, s.gens) = idgens.into_iter().unzip();
        s.spec.ports.sort();
        // The rows its VIP entries name are in use; a row that cannot be
        // one of the pool's (a corrupted entry) is forgotten, so the next
        // upsert writes a fresh table.
        for row in [s.current, s.previous].into_iter().flatten() {
            if rings.take(row) {
                s.rows.push(row);
            } else {
                warn!(service = %s.spec.name, ?row, "a ring row read back is not usable");
                if s.current == Some(row) {
                    s.current = None;
                }
                if s.previous == Some(row) {
                    s.previous = None;
                }
            }
        }
        out.insert(s.spec.name.clone(), s);
    }
    // Only once every row in use is known: each service gets its spare
    // back, so a change never waits for ring memory after a restart either.
    for s in out.values_mut() {
        let size = s.spec.table_size;
        let missing = 2usize.saturating_sub(s.rows.iter().filter(|r| r.size == size).count());
        match rings.alloc(size, missing) {
            Some(spare) => s.rows.extend(spare),
            None => warn!(
                service = %s.spec.name,
                "no ring room for the service's spare table: a change of its table waits \
                 for room (refused with RingsFull meanwhile; it keeps forwarding)"
            ),
        }
    }
    Ok(out)
}
