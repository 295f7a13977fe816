//! VIP pools: addresses for services that do not name their VIPs.
//!
//! A DsrService with empty `spec.vips` (every Service kube-dsr serves
//! without a requested IP becomes one) is given one address per wanted
//! family from a `DsrVipPool`. The allocation's only record is the
//! service's own `status.allocatedVips`, written by the field manager
//! [`IPAM_MANAGER`]: the API holds it, so it survives restarts and leader
//! changes, and deleting the service frees it. The spec is never written,
//! so a GitOps tool applying the user's DsrService sees no drift.
//!
//! Only the leader runs this (it runs under the operator's leader
//! election), and one lock serializes every choice of address with the
//! write that records it, so two services created at once never get the
//! same address. If two ever did (a former leader's write landing after
//! a takeover), the conflict rule keeps the earlier service on it and this
//! module moves the later one to a free address.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_dsr_crds::validation::parse_ip;
use kube_dsr_crds::vippool::{Block, conditions as pool_conditions};
use kube_dsr_crds::{
    ADDRESS_POOL_ANNOTATION, AllocatedVip, DsrService, DsrServiceStatus, DsrVipPool,
    DsrVipPoolStatus, IpFamily,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::conflicts::{claims, conflicts_of, may_share_vip, sharing_key};
use crate::error::Error;

/// Field manager of `status.allocatedVips` and `status.vipAllocated`.
pub const IPAM_MANAGER: &str = "dsr-operator-ipam";
/// Type of the `status.vipAllocated` condition.
pub const VIP_ALLOCATED: &str = "VipAllocated";

const RESYNC: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

/// A DsrService status without the address manager's fields: what the
/// main status writer compares its own result with.
pub fn without_ipam_fields(mut status: DsrServiceStatus) -> DsrServiceStatus {
    status.allocated_vips.clear();
    status.vip_allocated = None;
    status
}

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        // A selector the API accepted but we cannot read selects nothing.
        Some(s) => Selector::try_from(s.clone()).is_ok_and(|s| s.matches(labels)),
    }
}

/// Pools `svc` may take addresses from, by name: the one its
/// `kubedsr.io/address-pool` annotation names, or every `autoAssign` pool;
/// either way only pools whose selectors match it and whose blocks parse.
pub fn eligible_pools<'a>(
    svc: &DsrService,
    namespace_labels: &BTreeMap<String, String>,
    pools: &[&'a DsrVipPool],
) -> Vec<(&'a DsrVipPool, Vec<Block>)> {
    let named = svc.annotations().get(ADDRESS_POOL_ANNOTATION);
    let mut out: Vec<(&DsrVipPool, Vec<Block>)> = pools
        .iter()
        .copied()
        .filter(|p| match named {
            Some(n) => &p.name_any() == n,
            None => p.spec.auto_assign,
        })
        .filter(|p| selects(p.spec.namespace_selector.as_ref(), namespace_labels))
        .filter(|p| selects(p.spec.service_selector.as_ref(), svc.labels()))
        .filter_map(|p| p.spec.blocks().ok().map(|b| (p, b)))
        .collect();
    out.sort_by_key(|(p, _)| p.name_any());
    out
}

/// Why a family got no address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortage {
    /// No pool offers this family to this service.
    NoPool(IpFamily),
    /// Pools offer it, but every address is taken.
    Exhausted(IpFamily, Vec<String>),
}

impl Shortage {
    pub fn reason(&self) -> &'static str {
        match self {
            Shortage::NoPool(_) => "NoPool",
            Shortage::Exhausted(..) => "PoolExhausted",
        }
    }

    pub fn message(&self) -> String {
        let fam = |f: &IpFamily| if *f == IpFamily::IPv4 { "IPv4" } else { "IPv6" };
        match self {
            Shortage::NoPool(f) => format!(
                "no DsrVipPool offers {} addresses to this service (autoAssign, selectors, {ADDRESS_POOL_ANNOTATION})",
                fam(f)
            ),
            Shortage::Exhausted(f, pools) => {
                format!("every {} address of {} is taken", fam(f), pools.join(", "))
            }
        }
    }
}

/// What a service should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub allocated: Vec<AllocatedVip>,
    pub shortages: Vec<Shortage>,
}

/// The addresses `svc` should hold, given every other service (with
/// allocations not yet visible in the cache already applied) and the pools.
///
/// Kept: a current allocation of a wanted family that no earlier service
/// contests (an address of a pool that shrank or went is kept too: taking
/// a serving address away is worse than reporting it, which the pool's
/// status does). New: with a sharing key, an address of an eligible pool
/// already used only by services with that key whose ports do not
/// collide; otherwise the lowest free address of the first eligible pool
/// (by name) that has one.
pub fn plan(
    svc: &DsrService,
    all: &[&DsrService],
    pools: &[&DsrVipPool],
    namespace_labels: &BTreeMap<String, String>,
) -> Plan {
    if !svc.spec.vips.is_empty() {
        return Plan { allocated: Vec::new(), shortages: Vec::new() };
    }
    let wanted = svc.wanted_families();
    let current: Vec<AllocatedVip> =
        svc.status.as_ref().map(|s| s.allocated_vips.clone()).unwrap_or_default();
    let contested: BTreeSet<IpAddr> = conflicts_of(svc, all).iter().map(|c| c.claim.vip).collect();
    let mut allocated: Vec<AllocatedVip> = Vec::new();
    for a in current {
        let Some(ip) = parse_ip(&a.address) else { continue };
        let fam = IpFamily::of(&ip);
        if wanted.contains(&fam)
            && !contested.contains(&ip)
            && !allocated
                .iter()
                .any(|h| parse_ip(&h.address).map(|x| IpFamily::of(&x)) == Some(fam))
        {
            allocated.push(a);
        }
    }

    // Who uses each address now, other than `svc`.
    let me = (svc.namespace(), svc.name_any());
    let others: Vec<&DsrService> =
        all.iter().copied().filter(|o| (o.namespace(), o.name_any()) != me).collect();
    let mut users: BTreeMap<IpAddr, Vec<&DsrService>> = BTreeMap::new();
    for o in &others {
        for v in o.effective_vips().into_iter().filter_map(parse_ip) {
            users.entry(v).or_default().push(o);
        }
    }
    let my_ports: BTreeSet<_> = svc.spec.ports.iter().map(|p| (p.port, p.protocol)).collect();
    let shareable = |ip: &IpAddr| {
        users.get(ip).is_some_and(|us| {
            sharing_key(svc).is_some()
                && us.iter().all(|o| {
                    may_share_vip(o, svc)
                        && claims(o).iter().all(|c| !my_ports.contains(&(c.port, c.protocol)))
                })
        })
    };

    let candidates = eligible_pools(svc, namespace_labels, pools);
    let mut shortages = Vec::new();
    for fam in wanted {
        if allocated.iter().any(|a| parse_ip(&a.address).map(|x| IpFamily::of(&x)) == Some(fam)) {
            continue;
        }
        let in_family: Vec<&(&DsrVipPool, Vec<Block>)> =
            candidates.iter().filter(|(_, bs)| bs.iter().any(|b| b.family == fam)).collect();
        if in_family.is_empty() {
            shortages.push(Shortage::NoPool(fam));
            continue;
        }
        let shared = in_family.iter().find_map(|(p, bs)| {
            users
                .keys()
                .find(|ip| bs.iter().any(|b| b.contains(ip)) && shareable(ip))
                .map(|ip| (p.name_any(), *ip))
        });
        let free = || {
            in_family.iter().find_map(|(p, bs)| {
                bs.iter()
                    .filter(|b| b.family == fam)
                    .flat_map(|b| b.addresses())
                    .find(|ip| !users.contains_key(ip) && !contested.contains(ip))
                    .map(|ip| (p.name_any(), ip))
            })
        };
        match shared.or_else(free) {
            Some((pool, ip)) => allocated.push(AllocatedVip { address: ip.to_string(), pool }),
            None => shortages.push(Shortage::Exhausted(
                fam,
                in_family.iter().map(|(p, _)| p.name_any()).collect(),
            )),
        }
    }
    // IPv4 first, as spec.vips lists it.
    allocated.sort_by_key(|a| parse_ip(&a.address).map(|ip| ip.is_ipv6()));
    Plan { allocated, shortages }
}

/// A pool's observed state from every service's allocation.
pub fn pool_status(pool: &DsrVipPool, all: &[&DsrService]) -> (DsrVipPoolStatus, Vec<String>) {
    let name = pool.name_any();
    let mut st =
        DsrVipPoolStatus { observed_generation: pool.metadata.generation, ..Default::default() };
    let mut outside: BTreeSet<String> = BTreeSet::new();
    let mut used: BTreeSet<IpAddr> = BTreeSet::new();
    let blocks = pool.spec.blocks();
    let bs = blocks.as_ref().map(Vec::as_slice).unwrap_or(&[]);
    for s in all {
        for a in s.status.iter().flat_map(|s| s.allocated_vips.iter()) {
            if a.pool != name || !s.spec.vips.is_empty() {
                continue;
            }
            match parse_ip(&a.address) {
                Some(ip) if bs.iter().any(|b| b.contains(&ip)) => {
                    used.insert(ip);
                }
                _ => {
                    outside.insert(format!(
                        "{} ({}/{})",
                        a.address,
                        s.namespace().unwrap_or_default(),
                        s.name_any()
                    ));
                }
            }
        }
    }
    let size: u128 = bs.iter().map(Block::size).fold(0u128, u128::saturating_add);
    st.size = size.to_string();
    st.used = used.len() as i64;
    st.free = size.saturating_sub(used.len() as u128).to_string();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: pool.metadata.generation,
        last_transition_time: Time(Timestamp::now()),
    };
    st.conditions = vec![
        match &blocks {
            Ok(_) => cond(pool_conditions::VALID, true, "Valid", "addresses parse".into()),
            Err(errs) => {
                let msg = errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                cond(pool_conditions::VALID, false, "InvalidAddresses", msg)
            }
        },
        if size > 0 && used.len() as u128 >= size {
            cond(
                pool_conditions::EXHAUSTED,
                true,
                "NoFreeAddress",
                format!("all {size} addresses are in use"),
            )
        } else {
            cond(pool_conditions::EXHAUSTED, false, "FreeAddresses", format!("{} free", st.free))
        },
        if outside.is_empty() {
            cond(
                pool_conditions::OUTSIDE,
                false,
                "AllInside",
                "every allocation is inside the pool".into(),
            )
        } else {
            cond(
                pool_conditions::OUTSIDE,
                true,
                "AllocationsOutside",
                format!(
                    "still serving, outside the pool's addresses (released when their services go): {}",
                    outside.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        },
    ];
    (st, outside.into_iter().collect())
}

/// Carries over transition times of conditions whose status did not change.
fn keep_transition_times(new: &mut [Condition], old: &[Condition]) {
    for c in new {
        if let Some(o) = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let key =
        |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone());
    let mut x: Vec<_> = a.iter().map(key).collect();
    let mut y: Vec<_> = b.iter().map(key).collect();
    x.sort();
    y.sort();
    x == y
}

/// Allocations written but possibly not yet in the cache, by namespace/name.
#[derive(Default)]
struct Pending(BTreeMap<(String, String), (String, Vec<AllocatedVip>)>);

struct Ctx {
    client: Client,
    services: Store<DsrService>,
    pools: Store<DsrVipPool>,
    namespaces: Store<Namespace>,
    recorder: Recorder,
    /// Serializes choosing an address with recording it.
    lock: Mutex<Pending>,
}

impl Ctx {
    async fn ready(&self) -> bool {
        let all = async {
            self.services.wait_until_ready().await.is_ok()
                && self.pools.wait_until_ready().await.is_ok()
                && self.namespaces.wait_until_ready().await.is_ok()
        };
        tokio::time::timeout(Duration::from_secs(30), all).await.unwrap_or(false)
    }

    async fn event(
        &self,
        obj: &impl Resource<DynamicType = ()>,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        crate::events::record(&self.recorder, obj, warning, reason, note, "Allocate").await;
    }
}

fn has_ipam_fields(svc: &DsrService) -> bool {
    svc.status.as_ref().is_some_and(|s| !s.allocated_vips.is_empty() || s.vip_allocated.is_some())
}

async fn reconcile_service(svc: Arc<DsrService>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if svc.spec.vips.is_empty() || has_ipam_fields(&svc) {
        if !ctx.ready().await {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        allocate(&svc, &ctx).await?;
    }
    Ok(Action::requeue(RESYNC))
}

async fn allocate(svc: &DsrService, ctx: &Ctx) -> Result<(), Error> {
    let ns = svc
        .namespace()
        .ok_or(Error::MissingField { kind: "DsrService", field: "metadata.namespace" })?;
    let name = svc.name_any();
    let uid = svc.uid().unwrap_or_default();
    let mut pending = ctx.lock.lock().await;

    // The cache's view, with this leader's own writes it has not seen yet.
    let cached = ctx.services.state();
    pending.0.retain(|(n, m), (u, vips)| {
        cached.iter().any(|s| {
            s.namespace().as_deref() == Some(n.as_str())
                && &s.name_any() == m
                && s.uid().as_deref() == Some(u.as_str())
                && s.status.as_ref().map(|st| &st.allocated_vips) != Some(vips)
        })
    });
    let mut view: Vec<DsrService> = cached.iter().map(|s| s.as_ref().clone()).collect();
    for s in &mut view {
        if let Some((u, vips)) = pending.0.get(&(s.namespace().unwrap_or_default(), s.name_any()))
            && s.uid().as_deref() == Some(u.as_str())
        {
            s.status.get_or_insert_with(Default::default).allocated_vips = vips.clone();
        }
    }
    // This service as the cache or our pending write has it (the trigger's
    // copy may be older).
    let me = view
        .iter()
        .find(|s| s.namespace().as_deref() == Some(ns.as_str()) && s.name_any() == name)
        .cloned()
        .unwrap_or_else(|| svc.clone());
    let all: Vec<&DsrService> = view.iter().collect();
    let pool_objs = ctx.pools.state();
    let pools: Vec<&DsrVipPool> = pool_objs.iter().map(|p| p.as_ref()).collect();
    let ns_labels =
        ctx.namespaces.get(&ObjectRef::new(&ns)).map(|n| n.labels().clone()).unwrap_or_default();
    let p = plan(&me, &all, &pools, &ns_labels);

    let old = me.status.clone().unwrap_or_default();
    let old_cond = old.vip_allocated.clone();
    let mut conditions: Vec<Condition> = Vec::new();
    if me.spec.vips.is_empty() {
        let (ok, reason, message) = if p.shortages.is_empty() {
            let list: Vec<String> =
                p.allocated.iter().map(|a| format!("{} from {}", a.address, a.pool)).collect();
            (true, "Allocated".to_string(), list.join(", "))
        } else {
            let s = &p.shortages[0];
            let msg: Vec<String> = p.shortages.iter().map(Shortage::message).collect();
            (false, s.reason().to_string(), msg.join("; "))
        };
        conditions.push(Condition {
            type_: VIP_ALLOCATED.into(),
            status: if ok { "True" } else { "False" }.into(),
            reason,
            message,
            observed_generation: me.metadata.generation,
            last_transition_time: Time(Timestamp::now()),
        });
        keep_transition_times(&mut conditions, old_cond.as_slice());
    }
    let unchanged = old.allocated_vips == p.allocated
        && match (&old_cond, conditions.first()) {
            (None, None) => true,
            (Some(a), Some(b)) => same_conditions(std::slice::from_ref(a), std::slice::from_ref(b)),
            _ => false,
        };
    if unchanged {
        return Ok(());
    }
    let mut status = serde_json::json!({"allocatedVips": p.allocated});
    if let Some(c) = conditions.first() {
        status["vipAllocated"] = serde_json::json!(c);
    }
    let body = serde_json::json!({
        "apiVersion": DsrService::api_version(&()),
        "kind": DsrService::kind(&()),
        "status": status,
    });
    let api: Api<DsrService> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(&name, &PatchParams::apply(IPAM_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|source| Error::Kube { action: "apply DsrService allocation", source })?;
    pending.0.insert((ns.clone(), name.clone()), (uid, p.allocated.clone()));
    drop(pending);
    info!(service = %format!("{ns}/{name}"), allocated = ?p.allocated.iter().map(|a| &a.address).collect::<Vec<_>>(), "VIP allocation recorded");

    let added: Vec<&AllocatedVip> =
        p.allocated.iter().filter(|a| !old.allocated_vips.contains(a)).collect();
    for a in added {
        ctx.event(&me, false, "VipAllocated", format!("{} from DsrVipPool {}", a.address, a.pool))
            .await;
    }
    let was_short = old_cond.as_ref().is_some_and(|c| c.status == "False");
    if let Some(c) = conditions.first().filter(|c| c.status == "False")
        && (!was_short || old_cond.as_ref().is_some_and(|o| o.reason != c.reason))
    {
        ctx.event(&me, true, &c.reason.clone(), c.message.clone()).await;
    }
    Ok(())
}

async fn reconcile_pool(pool: Arc<DsrVipPool>, ctx: Arc<Ctx>) -> Result<(), Error> {
    if !ctx.ready().await {
        return Ok(());
    }
    let all_objs = ctx.services.state();
    let all: Vec<&DsrService> = all_objs.iter().map(|s| s.as_ref()).collect();
    let (mut st, _) = pool_status(&pool, &all);
    let old = pool.status.clone().unwrap_or_default();
    keep_transition_times(&mut st.conditions, &old.conditions);
    if old.size == st.size
        && old.used == st.used
        && old.free == st.free
        && old.observed_generation == st.observed_generation
        && same_conditions(&old.conditions, &st.conditions)
    {
        return Ok(());
    }
    let api: Api<DsrVipPool> = Api::all(ctx.client.clone());
    let body = serde_json::json!({
        "apiVersion": DsrVipPool::api_version(&()),
        "kind": DsrVipPool::kind(&()),
        "status": st,
    });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(IPAM_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Kube { action: "apply DsrVipPool status", source })?;
    debug!(pool = %pool.name_any(), used = st.used, free = %st.free, "pool status updated");
    for c in &st.conditions {
        let was = old.conditions.iter().find(|o| o.type_ == c.type_).map(|o| o.status.as_str());
        let bad = match c.type_.as_str() {
            pool_conditions::VALID => c.status == "False",
            _ => c.status == "True",
        };
        if bad && was != Some(c.status.as_str()) {
            ctx.event(pool.as_ref(), true, &c.reason, c.message.clone()).await;
        }
    }
    Ok(())
}

fn on_error(obj: Arc<DsrService>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    warn!(object = %obj.name_any(), error = %error, source = ?std::error::Error::source(error), "address manager reconcile failed");
    Action::requeue(RETRY)
}

/// Services that still want an address, for a pool or namespace change.
fn waiting(services: &Store<DsrService>) -> Vec<ObjectRef<DsrService>> {
    services
        .state()
        .iter()
        .filter(|s| s.spec.vips.is_empty())
        .filter(|s| {
            let have = s.status.as_ref().map_or(0, |st| st.allocated_vips.len());
            have < s.wanted_families().len()
        })
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

/// Runs the address manager (allocations and pool status) until
/// `shutdown` resolves. Call it only while leading.
pub async fn run(client: Client, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    // Pool status is recomputed (for every pool: there are few) whenever a
    // service or pool changed, at most twice a second.
    let changed = Arc::new(tokio::sync::Notify::new());
    let (services, svc_writer) = reflector::store();
    let on_svc = Arc::clone(&changed);
    let svc_stream = reflector::reflector(
        svc_writer,
        watcher(Api::<DsrService>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|s: &mut DsrService| s.managed_fields_mut().clear()),
    )
    .touched_objects()
    .inspect(move |_| on_svc.notify_one());
    let (pools, pool_writer) = reflector::store();
    let on_pool = Arc::clone(&changed);
    let pool_stream = reflector::reflector(
        pool_writer,
        watcher(Api::<DsrVipPool>::all(client.clone()), watcher::Config::default())
            .default_backoff(),
    )
    .touched_objects()
    .inspect(move |_| on_pool.notify_one());
    let (namespaces, ns_writer) = reflector::store();
    let ns_stream = reflector::reflector(
        ns_writer,
        watcher(Api::<Namespace>::all(client.clone()), watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|n: &mut Namespace| n.managed_fields_mut().clear()),
    )
    .touched_objects();

    let ctx = Arc::new(Ctx {
        client: client.clone(),
        services: services.clone(),
        pools: pools.clone(),
        namespaces,
        recorder: Recorder::new(client.clone(), Reporter::from(IPAM_MANAGER)),
        lock: Mutex::new(Pending::default()),
    });

    let for_pools = services.clone();
    let for_ns = services.clone();
    let allocations = Controller::for_stream(svc_stream, services.clone())
        .with_config(
            kube::runtime::controller::Config::default().debounce(Duration::from_millis(100)),
        )
        .watches_stream(pool_stream, move |_| waiting(&for_pools))
        .watches_stream(ns_stream, move |_| waiting(&for_ns))
        .graceful_shutdown_on(shutdown)
        .run(reconcile_service, on_error, Arc::clone(&ctx))
        .for_each(|_| async {});

    let pool_ctx = Arc::clone(&ctx);
    let pool_status = async move {
        loop {
            let _ = tokio::time::timeout(RESYNC, changed.notified()).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            for pool in pool_ctx.pools.state() {
                if let Err(e) = reconcile_pool(Arc::clone(&pool), Arc::clone(&pool_ctx)).await {
                    warn!(pool = %pool.name_any(), error = %e, "pool status");
                }
            }
        }
    };
    // The allocations end on shutdown; the status loop ends with them.
    tokio::select! {
        _ = allocations => {}
        _ = pool_status => {}
    }
    info!("address manager stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::service;
    use kube_dsr_crds::{DsrVipPoolSpec, Protocol, ServicePort};

    fn pool(name: &str, addresses: &[&str], auto: bool) -> DsrVipPool {
        DsrVipPool::new(
            name,
            DsrVipPoolSpec {
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                auto_assign: auto,
                skip_network_and_broadcast: false,
                namespace_selector: None,
                service_selector: None,
            },
        )
    }

    fn with_allocation(mut s: DsrService, ip: &str, pool: &str) -> DsrService {
        s.status = Some(DsrServiceStatus {
            allocated_vips: vec![AllocatedVip { address: ip.into(), pool: pool.into() }],
            ..Default::default()
        });
        s
    }

    fn addresses(p: &Plan) -> Vec<&str> {
        p.allocated.iter().map(|a| a.address.as_str()).collect()
    }

    #[test]
    fn lowest_free_address_of_the_first_pool_by_name() {
        let (a, b) =
            (pool("b-pool", &["192.0.2.96/30"], true), pool("a-pool", &["192.0.2.64/30"], true));
        let taken = with_allocation(service("x", &[], 100), "192.0.2.64", "a-pool");
        let written = service("y", &["192.0.2.65"], 100);
        let me = service("me", &[], 200);
        let p = plan(&me, &[&taken, &written, &me], &[&a, &b], &BTreeMap::new());
        assert_eq!(addresses(&p), ["192.0.2.66"]);
        assert_eq!(p.allocated[0].pool, "a-pool");
        assert!(p.shortages.is_empty());
        // Written VIPs ask for nothing.
        assert_eq!(plan(&written, &[&written], &[&a], &BTreeMap::new()).allocated, vec![]);
    }

    #[test]
    fn exhaustion_no_pool_and_pool_choice() {
        let small = pool("small", &["192.0.2.64/31"], true);
        let one = with_allocation(service("one", &[], 100), "192.0.2.64", "small");
        let two = with_allocation(service("two", &[], 100), "192.0.2.65", "small");
        let me = service("me", &[], 200);
        let p = plan(&me, &[&one, &two, &me], &[&small], &BTreeMap::new());
        assert!(p.allocated.is_empty());
        assert_eq!(p.shortages[0].reason(), "PoolExhausted");
        let mut v6 = me.clone();
        v6.spec.ip_families = vec![IpFamily::IPv6];
        assert_eq!(
            plan(&v6, &[&v6], &[&small], &BTreeMap::new()).shortages,
            vec![Shortage::NoPool(IpFamily::IPv6)]
        );
        // autoAssign: false is only used when named.
        let manual = pool("manual", &["198.51.100.0/30"], false);
        assert_eq!(plan(&me, &[&me], &[&manual], &BTreeMap::new()).shortages[0].reason(), "NoPool");
        let mut named = me.clone();
        named.metadata.annotations =
            Some([(ADDRESS_POOL_ANNOTATION.to_string(), "manual".to_string())].into());
        assert_eq!(
            addresses(&plan(&named, &[&named], &[&small, &manual], &BTreeMap::new())),
            ["198.51.100.0"]
        );
    }

    #[test]
    fn selectors_and_dual_stack() {
        let mut p = pool("p", &["192.0.2.64/30", "2001:db8::100/126"], true);
        p.spec.namespace_selector = Some(LabelSelector {
            match_labels: Some([("vips".to_string(), "yes".to_string())].into()),
            ..Default::default()
        });
        let mut me = service("me", &[], 100);
        me.spec.ip_families = vec![IpFamily::IPv6, IpFamily::IPv4];
        assert_eq!(plan(&me, &[&me], &[&p], &BTreeMap::new()).shortages.len(), 2);
        let labels = [("vips".to_string(), "yes".to_string())].into();
        assert_eq!(addresses(&plan(&me, &[&me], &[&p], &labels)), ["192.0.2.64", "2001:db8::100"]);
    }

    #[test]
    fn a_sharing_key_reuses_an_address_when_ports_do_not_collide() {
        let p = pool("p", &["192.0.2.64/30"], true);
        let key = |mut s: DsrService| {
            s.metadata.annotations = Some(
                [(kube_dsr_crds::ALLOW_SHARED_IP_ANNOTATION.to_string(), "dns".to_string())].into(),
            );
            s
        };
        let tcp = key(with_allocation(service("tcp", &[], 100), "192.0.2.64", "p"));
        let mut udp = key(service("udp", &[], 200));
        udp.spec.ports = vec![ServicePort { name: None, port: 80, protocol: Protocol::Udp }];
        assert_eq!(addresses(&plan(&udp, &[&tcp, &udp], &[&p], &BTreeMap::new())), ["192.0.2.64"]);
        let same_port = key(service("again", &[], 200));
        assert_eq!(
            addresses(&plan(&same_port, &[&tcp, &same_port], &[&p], &BTreeMap::new())),
            ["192.0.2.65"]
        );
        let no_key = service("nokey", &[], 200);
        assert_eq!(
            addresses(&plan(&no_key, &[&tcp, &no_key], &[&p], &BTreeMap::new())),
            ["192.0.2.65"]
        );
    }

    #[test]
    fn a_duplicate_allocation_moves_the_later_service_and_keeps_the_earlier() {
        let p = pool("p", &["192.0.2.64/30"], true);
        let first = with_allocation(service("first", &[], 100), "192.0.2.64", "p");
        let second = with_allocation(service("second", &[], 200), "192.0.2.64", "p");
        let all = [&first, &second];
        assert_eq!(addresses(&plan(&first, &all, &[&p], &BTreeMap::new())), ["192.0.2.64"]);
        assert_eq!(addresses(&plan(&second, &all, &[&p], &BTreeMap::new())), ["192.0.2.65"]);
    }

    #[test]
    fn allocated_vips_make_a_valid_spec_for_everything_downstream() {
        let mut s = with_allocation(service("s", &[], 100), "192.0.2.64", "p");
        s.spec.ip_families = vec![IpFamily::IPv4];
        assert!(kube_dsr_crds::validation::validate_spec(&s.spec).is_empty());
        let e = s.with_effective_vips();
        assert_eq!(e.spec.vips, vec!["192.0.2.64"]);
        assert!(
            kube_dsr_crds::validation::validate_spec(&e.spec).is_empty(),
            "{:?}",
            kube_dsr_crds::validation::validate_spec(&e.spec)
        );
    }

    #[test]
    fn pool_status_counts_and_reports_addresses_left_outside() {
        let mut p = pool("p", &["192.0.2.64/30"], true);
        let a = with_allocation(service("a", &[], 100), "192.0.2.64", "p");
        let b = with_allocation(service("b", &[], 100), "192.0.2.99", "p");
        let (st, outside) = pool_status(&p, &[&a, &b]);
        assert_eq!((st.size.as_str(), st.used, st.free.as_str()), ("4", 1, "3"));
        assert_eq!(outside, vec!["192.0.2.99 (default/b)"]);
        let cond = |st: &DsrVipPoolStatus, t: &str| {
            st.conditions.iter().find(|c| c.type_ == t).unwrap().status.clone()
        };
        assert_eq!(cond(&st, pool_conditions::OUTSIDE), "True");
        assert_eq!(cond(&st, pool_conditions::EXHAUSTED), "False");
        p.spec.addresses = vec!["192.0.2.64/32".into()];
        let (st, _) = pool_status(&p, &[&a]);
        assert_eq!(cond(&st, pool_conditions::EXHAUSTED), "True");
        p.spec.addresses = vec!["nonsense".into()];
        assert_eq!(cond(&pool_status(&p, &[&a]).0, pool_conditions::VALID), "False");
    }
}
