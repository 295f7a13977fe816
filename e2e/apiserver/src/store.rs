//! The in-memory object store: one global resourceVersion, a bounded
//! history of watch events, field managers for server-side apply,
//! finalizers and ownerReference garbage collection.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::events;
use crate::managed::{self, Manager, Managers};
use crate::patch::{self, Path};
use crate::resources::{RESOURCES, Resource, crd_schema};
use crate::schema::{self, Schema};
use crate::selector::{FieldSelector, LabelSelector};
use crate::util;

/// A Kubernetes `Status` failure.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: None }
    }

    pub fn not_found(res: &Resource, name: &str) -> Self {
        let mut e = Self::new(404, "NotFound", format!("{} \"{name}\" not found", res.qualified()));
        e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural}));
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watchers see it.
#[derive(Clone, Debug)]
pub struct Record {
    pub rv: u64,
    pub res: usize,
    pub namespace: String,
    pub kind: EventType,
    /// The object after the change (for DELETED: its last state, with the
    /// deletion's resourceVersion). Shared: every watch that takes the
    /// record clones only the pointer.
    pub obj: Arc<Value>,
    /// The object before a MODIFIED change (for selector transitions).
    pub old: Option<Arc<Value>>,
}

type Key = (usize, String, String);

/// Where the next page of a list starts (a `continue` token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Continue {
    /// resourceVersion of the first page.
    pub rv: u64,
    pub namespace: String,
    pub name: String,
}

impl Continue {
    /// The opaque token: namespaces and names never hold `/`.
    pub fn token(&self) -> String {
        format!("{}/{}/{}", self.rv, self.namespace, self.name)
    }

    pub fn parse(token: &str) -> Option<Continue> {
        let mut parts = token.splitn(3, '/');
        let rv = parts.next()?.parse().ok()?;
        Some(Continue { rv, namespace: parts.next()?.into(), name: parts.next()?.into() })
    }
}

/// One page of a list.
pub struct Page {
    pub items: Vec<Value>,
    pub rv: u64,
    /// Set when more items follow.
    pub next: Option<Continue>,
}

#[derive(Clone, Debug)]
struct Stored {
    /// With `metadata.managedFields` written out from `managers`.
    obj: Value,
    managers: Managers,
    /// When each manager's fields last changed.
    times: BTreeMap<Manager, String>,
}

/// kubectl's client-side apply annotation.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// Options common to writes.
#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    pub field_manager: Option<String>,
    /// `fieldValidation=Strict`: unknown fields are refused, not pruned.
    pub strict: bool,
    /// `fieldValidation` unset or `Warn` (the apiserver's default): each
    /// pruned unknown field is a `Warning` header.
    pub warn: bool,
    pub force: bool,
}

#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub grace_period: Option<i64>,
    pub orphan: bool,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

/// A PATCH request's body and type.
pub struct Patch {
    pub kind: PatchKind,
    pub body: Value,
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Record>,
    history_limit: usize,
    /// Every event with a resourceVersion at or below this is forgotten.
    compacted: u64,
    /// Per resource, its CRD schema (compiled once; shared with dry-run copies).
    schemas: Vec<Option<Arc<Schema>>>,
    notify: tokio::sync::watch::Sender<u64>,
    /// Warnings for the current request's answer.
    warnings: Vec<String>,
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj["metadata"][field].as_str()
}

fn meta_str_in<'a>(obj: &'a Value, annotation: &str) -> Option<&'a str> {
    obj["metadata"]["annotations"][annotation].as_str()
}

/// The resource objects of `res` are stored as: `events.k8s.io` events
/// are core events.
pub fn storage(res: &Resource) -> &Resource {
    if res.group == "events.k8s.io" {
        RESOURCES.iter().find(|r| r.group.is_empty() && r.plural == "events").expect("core events")
    } else {
        res
    }
}

/// A stored object as `res` shows it.
pub fn view(res: &Resource, obj: &Value) -> Value {
    if res.group == "events.k8s.io" { events::from_core(obj) } else { obj.clone() }
}

/// An object written through `res` as it is stored.
fn stored_form(res: &Resource, obj: Value) -> Value {
    if res.group == "events.k8s.io" { events::to_core(&obj) } else { obj }
}

fn finalizers_empty(obj: &Value) -> bool {
    obj["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
}

/// Everything but metadata and status: what `metadata.generation` counts.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    v
}

/// The object without the fields that change on every write.
fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

impl Store {
    pub fn new(history_limit: usize) -> (Self, tokio::sync::watch::Receiver<u64>) {
        let (notify, rx) = tokio::sync::watch::channel(1);
        let schemas =
            RESOURCES.iter().map(|r| r.crd.map(|c| Arc::new(Schema::new(crd_schema(c))))).collect();
        let store = Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 1,
            schemas,
            notify,
            warnings: Vec::new(),
        };
        (store, rx)
    }

    /// The warnings the last request earned (`Warning` headers).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Forgets the whole event history: a watch from any earlier
    /// resourceVersion then gets `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Records after `rv` in order; `None` when some are already forgotten.
    /// The history is in resourceVersion order, so a watch that is up to
    /// date finds its place by binary search and copies only the new
    /// records' pointers: a wake-up costs the records it gets, not the
    /// length of the history.
    pub fn records_after(&self, rv: u64) -> Option<Vec<Record>> {
        if rv < self.compacted {
            return None;
        }
        let start = self.history.partition_point(|r| r.rv <= rv);
        Some(self.history.range(start..).cloned().collect())
    }

    /// The storage slot of a resource: `events.k8s.io` events are the
    /// core events.
    fn index(res: &Resource) -> usize {
        let res = storage(res);
        RESOURCES.iter().position(|r| std::ptr::eq(r, res)).expect("resource from the table")
    }

    /// A copy for a dry run: the same objects and versions, no history and
    /// nobody notified, so whatever the request does there is dropped.
    pub fn dry_clone(&self) -> Store {
        let (notify, _) = tokio::sync::watch::channel(self.rv);
        Store {
            rv: self.rv,
            objects: self.objects.clone(),
            history: VecDeque::new(),
            history_limit: self.history_limit,
            compacted: self.rv,
            schemas: self.schemas.clone(),
            notify,
            warnings: Vec::new(),
        }
    }

    fn record(&mut self, res: usize, kind: EventType, obj: &mut Value, old: Option<Value>) {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let namespace = meta_str(obj, "namespace").unwrap_or("").to_string();
        self.history.push_back(Record {
            rv: self.rv,
            res,
            namespace,
            kind,
            obj: Arc::new(obj.clone()),
            old: old.map(Arc::new),
        });
        while self.history.len() > self.history_limit {
            if let Some(r) = self.history.pop_front() {
                self.compacted = r.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    pub fn get(&self, res: &Resource, ns: &str, name: &str) -> Result<Value> {
        self.objects
            .get(&(Self::index(res), ns.to_string(), name.to_string()))
            .map(|s| view(res, &s.obj))
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    pub fn list(
        &self,
        res: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let page = self.list_page(res, ns, labels, fields, None, None);
        (page.items, page.rv)
    }

    /// One page of a list: at most `limit` items after the position a
    /// `continue` token names. Objects are kept by (resource, namespace,
    /// name), so a page is a range of the map, not a scan of every object.
    /// Every page carries the resourceVersion of the first, so a watch
    /// started from it replays whatever changed while the pages were read
    /// (the apiserver serves pages from one snapshot instead; replaying
    /// the changes ends in the same state).
    pub fn list_page(
        &self,
        res: &Resource,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        limit: Option<usize>,
        after: Option<&Continue>,
    ) -> Page {
        let i = Self::index(res);
        let start = match after {
            Some(c) => Bound::Excluded((i, c.namespace.clone(), c.name.clone())),
            None => Bound::Included((i, ns.unwrap_or("").to_string(), String::new())),
        };
        let rv = after.map_or(self.rv, |c| c.rv);
        let mut items = Vec::new();
        let mut last: Option<&Key> = None;
        let mut more = false;
        for (key, s) in self
            .objects
            .range((start, Bound::Unbounded))
            .take_while(|((r, n, _), _)| *r == i && ns.is_none_or(|ns| ns == n))
        {
            let o = view(res, &s.obj);
            if !(labels.matches(&o) && fields.matches(&o)) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                more = true;
                break;
            }
            items.push(o);
            last = Some(key);
        }
        let next = last.filter(|_| more).map(|k| Continue {
            rv,
            namespace: k.1.clone(),
            name: k.2.clone(),
        });
        Page { items, rv, next }
    }

    /// Schema defaults, then pruning (or, under `Strict`, refusal) of
    /// unknown fields: what the apiserver does while decoding a custom
    /// resource, before it compares or validates anything.
    fn normalize(&mut self, res: &Resource, obj: &mut Value, opts: &WriteOpts) -> Result<()> {
        if crate::service::is_service(res) {
            self.service_defaults(res, obj);
        }
        let Some(schema) = &self.schemas[Self::index(res)] else { return Ok(()) };
        let schema = &schema.json;
        schema::apply_defaults(schema, obj);
        let unknown: Vec<String> = schema::validate(schema, obj)
            .into_iter()
            .filter(|m| schema::is_unknown_field(m))
            .collect();
        if !unknown.is_empty() {
            if opts.strict {
                return Err(ApiError::bad_request(format!(
                    "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                    res.kind,
                    res.version,
                    res.kind,
                    unknown.join(", ")
                )));
            }
            schema::prune(schema, obj);
            if opts.warn {
                self.warnings.extend(unknown);
            }
        }
        Ok(())
    }

    /// Schema and CEL validation (with `old` for transition rules).
    fn check(&self, res: &Resource, obj: &Value, old: Option<&Value>) -> Result<()> {
        let errs = match &self.schemas[Self::index(res)] {
            Some(schema) => schema::field_errors(schema, obj, old),
            None if crate::service::is_service(res) => crate::service::validate(obj, old),
            None => return Ok(()),
        };
        let name = meta_str(obj, "name").unwrap_or("").to_string();
        if errs.is_empty() {
            return Ok(());
        }
        let joined =
            if errs.len() == 1 { errs[0].clone() } else { format!("[{}]", errs.join(", ")) };
        let mut e = ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {joined}", res.qualified_kind()),
        );
        let causes: Vec<Value> = errs
            .iter()
            .map(|m| match m.split_once(": ") {
                Some((field, rest)) if !field.contains(' ') => {
                    json!({"reason": "FieldValueInvalid", "message": rest, "field": field})
                }
                _ => json!({"reason": "FieldValueInvalid", "message": m}),
            })
            .collect();
        e.details =
            Some(json!({"name": name, "group": res.group, "kind": res.kind, "causes": causes}));
        Err(e)
    }

    /// Service defaults, with the cluster IPs and node ports every other
    /// Service holds.
    fn service_defaults(&self, res: &Resource, obj: &mut Value) {
        let (ns, name) =
            (meta_str(obj, "namespace").unwrap_or(""), meta_str(obj, "name").unwrap_or(""));
        let me = (Self::index(res), ns.to_string(), name.to_string());
        let mut ips = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for (k, s) in self.objects.range((me.0, String::new(), String::new())..) {
            if k.0 != me.0 {
                break;
            }
            if *k == me {
                continue;
            }
            let (ip, np) = crate::service::allocations(&s.obj);
            ips.extend(ip);
            ports.extend(np);
        }
        crate::service::defaults(obj, &ips, &ports);
    }

    fn check_namespace(res: &Resource, ns: &str, obj: &mut Value) -> Result<()> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the request body must be a JSON object"));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if res.namespaced {
            match meta_str(obj, "namespace") {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => obj["metadata"]["namespace"] = json!(ns),
            }
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["apiVersion"] = json!(res.api_version());
        obj["kind"] = json!(res.kind);
        Ok(())
    }

    pub fn create(
        &mut self,
        res: &Resource,
        ns: &str,
        obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value> {
        let created = self.create_stored(storage(res), ns, stored_form(res, obj), opts, None)?;
        Ok(view(res, &created))
    }

    /// Creates an object of the storage resource `res`; `applied` is the
    /// apply manager and its fields when server-side apply creates it.
    fn create_stored(
        &mut self,
        res: &Resource,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
        applied: Option<(Manager, BTreeSet<Path>)>,
    ) -> Result<Value> {
        Self::check_namespace(res, ns, &mut obj)?;
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(g)) if !g.is_empty() => format!("{g}{}", util::name_suffix()),
            _ => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        res.kind
                    ),
                ));
            }
        };
        let key = (Self::index(res), ns.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            let mut e = ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.qualified()),
            );
            e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural}));
            return Err(e);
        }
        let meta = obj["metadata"].as_object_mut().expect("checked");
        meta.insert("name".into(), json!(name));
        // A uid given by the client is kept (a real apiserver would replace
        // it), so a harness can lay out kubelet-style cgroup paths first.
        if meta.get("uid").and_then(Value::as_str).is_none_or(str::is_empty) {
            meta.insert("uid".into(), json!(util::uid()));
        }
        meta.insert("creationTimestamp".into(), json!(util::now()));
        meta.insert("generation".into(), json!(1));
        for k in
            ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"]
        {
            meta.remove(k);
        }
        self.normalize(res, &mut obj, opts)?;
        self.check(res, &obj, None)?;
        let (manager, fields) = applied.unwrap_or_else(|| {
            let manager = opts.field_manager.clone().unwrap_or_else(|| "unknown".into());
            ((manager, false), patch::leaves(&obj).into_keys().collect())
        });
        let mut managers = Managers::default();
        managers.0.insert(manager.clone(), fields);
        let times: BTreeMap<Manager, String> = [(manager, util::now())].into_iter().collect();
        obj["metadata"]["managedFields"] = managed::entries(&res.api_version(), &managers, &times);
        self.record(key.0, EventType::Added, &mut obj, None);
        self.objects.insert(key, Stored { obj: obj.clone(), managers, times });
        Ok(obj)
    }

    /// Stores `new` as the next state of an existing object: server-owned
    /// metadata is kept, the part not addressed keeps its stored value,
    /// defaults are applied before anything is compared, generation moves
    /// with the spec, a no-op writes nothing, and an object being deleted
    /// whose last finalizer went is removed. `applied` holds the field
    /// managers server-side apply computed.
    fn commit(
        &mut self,
        res: &Resource,
        key: &Key,
        mut new: Value,
        part: Part,
        opts: &WriteOpts,
        applied: Option<Managers>,
    ) -> Result<Value> {
        let stored = self.objects.get(key).expect("caller checked").clone();
        let old = &stored.obj;
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(old, "resourceVersion")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    res.qualified(),
                    key.2
                ),
            ));
        }
        Self::check_namespace(res, &key.1, &mut new)?;
        if meta_str(&new, "name").is_some_and(|n| n != key.2) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({})",
                meta_str(&new, "name").unwrap_or(""),
                key.2
            )));
        }
        match part {
            Part::Status => {
                let mut s = old.clone();
                match new.get("status") {
                    Some(st) => s["status"] = st.clone(),
                    None => {
                        if let Some(m) = s.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                s["metadata"]["managedFields"] = new["metadata"]["managedFields"].clone();
                new = s;
            }
            Part::Main if res.status => match old.get("status") {
                Some(st) => new["status"] = st.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            },
            Part::Main => {}
        }
        let written = {
            let meta = new["metadata"].as_object_mut().expect("checked");
            for k in [
                "name",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "resourceVersion",
            ] {
                match old["metadata"].get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
            meta.remove("managedFields")
        };
        self.normalize(res, &mut new, opts)?;
        if spec_part(&new) != spec_part(old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        self.check(res, &new, Some(old))?;
        let is_apply = applied.is_some();
        let mut managers = applied.unwrap_or_else(|| stored.managers.clone());
        let mut times = stored.times.clone();
        // managedFields a client wrote (other than what it read) replace
        // the stored ones, as on the apiserver: kubectl's migration from
        // client-side to server-side apply works that way.
        let client_managers = written
            .filter(|w| !w.is_null() && *w != old["metadata"]["managedFields"])
            .and_then(|w| managed::parse(&w));
        let changed = patch::changed(old, &new);
        if let Some((m, t)) = client_managers {
            managers = m;
            times = t;
        } else if !changed.is_empty() && !is_apply {
            // Managers own what they change; nobody keeps a field that
            // someone else changed.
            let manager = opts.field_manager.clone().unwrap_or_else(|| "unknown".into());
            for ((m, apply), fields) in managers.0.iter_mut() {
                if *m != manager || *apply {
                    fields.retain(|f| !changed.iter().any(|c| patch::overlaps(f, c)));
                }
            }
            let new_leaves = patch::leaves(&new);
            let own = managers.0.entry((manager, false)).or_default();
            own.extend(changed.into_iter().filter(|c| new_leaves.contains_key(c)));
        }
        managers.0.retain(|_, f| !f.is_empty());
        // A write that changes neither the object nor who owns what is no
        // write (the apiserver ignores a managedFields timestamp alone).
        if comparable(&new) == comparable(old) && managers == stored.managers {
            return Ok(old.clone());
        }
        let now = util::now();
        for (m, f) in &managers.0 {
            if stored.managers.0.get(m) != Some(f) || !times.contains_key(m) {
                times.insert(m.clone(), now.clone());
            }
        }
        times.retain(|m, _| managers.0.contains_key(m));
        new["metadata"]["managedFields"] = managed::entries(&res.api_version(), &managers, &times);
        if old["metadata"].get("deletionTimestamp").is_some() && finalizers_empty(&new) {
            self.objects.remove(key);
            self.record(key.0, EventType::Deleted, &mut new, None);
            self.collect_garbage(&new);
            return Ok(new);
        }
        self.record(key.0, EventType::Modified, &mut new, Some(old.clone()));
        self.objects.insert(key.clone(), Stored { obj: new.clone(), managers, times });
        Ok(new)
    }

    fn key(&self, res: &Resource, ns: &str, name: &str) -> Result<Key> {
        let key = (Self::index(res), ns.to_string(), name.to_string());
        if self.objects.contains_key(&key) { Ok(key) } else { Err(ApiError::not_found(res, name)) }
    }

    /// PUT.
    pub fn replace(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        obj: Value,
        part: Part,
        opts: &WriteOpts,
    ) -> Result<Value> {
        let key = self.key(res, ns, name)?;
        if meta_str(&obj, "resourceVersion").is_none_or(str::is_empty) && res.crd.is_some() {
            // CRDs, like the apiserver, require a resourceVersion on update.
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                    res.qualified_kind()
                ),
            ));
        }
        let new = self.commit(storage(res), &key, stored_form(res, obj), part, opts, None)?;
        Ok(view(res, &new))
    }

    /// PATCH of every kind; apply creates the object when it is missing.
    /// The patch applies to the object as `res` shows it.
    pub fn patch(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        patch: &Patch,
        part: Part,
        opts: &WriteOpts,
    ) -> Result<Value> {
        let (kind, body) = (&patch.kind, &patch.body);
        let key = (Self::index(res), ns.to_string(), name.to_string());
        let Some(stored) = self.objects.get(&key).cloned() else {
            if let PatchKind::Apply = kind {
                if part == Part::Status {
                    return Err(ApiError::not_found(res, name));
                }
                let mut obj = body.clone();
                Self::check_namespace(res, ns, &mut obj)?;
                if meta_str(&obj, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(
                        "the name in the body does not match the URL",
                    ));
                }
                obj["metadata"]["name"] = json!(name);
                let manager = opts.field_manager.clone().ok_or_else(|| {
                    ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch")
                })?;
                let fields = patch::leaves(body).into_keys().collect();
                let obj = stored_form(res, obj);
                let created = self.create_stored(
                    storage(res),
                    ns,
                    obj,
                    opts,
                    Some(((manager, true), fields)),
                )?;
                return Ok(view(res, &created));
            }
            return Err(ApiError::not_found(res, name));
        };
        let mut new = view(res, &stored.obj);
        let mut managers = None;
        match kind {
            PatchKind::Merge => patch::merge_patch(&mut new, body),
            PatchKind::Strategic => {
                if res.crd.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                patch::strategic_merge_patch(&mut new, body);
            }
            PatchKind::Json => {
                patch::json_patch(&mut new, body).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    )
                })?;
            }
            PatchKind::Apply => {
                let (obj, m) = self.apply(res, &stored, body, part, opts)?;
                new = obj;
                managers = Some(m);
            }
        }
        let new = self.commit(storage(res), &key, stored_form(res, new), part, opts, managers)?;
        Ok(view(res, &new))
    }

    /// Server-side apply on an existing object (simplified field
    /// management: see DESIGN.md). Returns the merged object and the new
    /// manager sets.
    fn apply(
        &self,
        res: &Resource,
        stored: &Stored,
        body: &Value,
        part: Part,
        opts: &WriteOpts,
    ) -> Result<(Value, Managers)> {
        let manager = opts.field_manager.clone().ok_or_else(|| {
            ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch")
        })?;
        if !body.is_object() {
            return Err(ApiError::bad_request("an apply configuration must be an object"));
        }
        // The part of the configuration this endpoint writes.
        let mut config = body.clone();
        if let Some(m) = config.as_object_mut() {
            match part {
                Part::Status => m.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind"),
                Part::Main if res.status => {
                    m.remove("status");
                }
                Part::Main => {}
            }
        }
        let applied = patch::leaves(&config);
        // Values are compared as the apiserver stores them: defaulted (a
        // port without `protocol` is the stored port with `TCP`).
        let mut defaulted = config.clone();
        if let Some(schema) = &self.schemas[Self::index(res)] {
            schema::apply_defaults(&schema.json, &mut defaulted);
        }
        let old = &view(res, &stored.obj);
        let mut managers = stored.managers.clone();
        let me = (manager.clone(), true);
        let mut conflicts: Vec<(String, Path)> = Vec::new();
        let mut lost: Vec<(Manager, Path)> = Vec::new();
        for (m, fields) in managers.0.iter() {
            if *m == me {
                continue;
            }
            for f in fields.iter() {
                for p in applied.keys() {
                    if patch::overlaps(f, p) && patch::get(old, p) != patch::get(&defaulted, p) {
                        lost.push((m.clone(), f.clone()));
                        conflicts.push((m.0.clone(), f.clone()));
                    }
                }
            }
        }
        // kubectl's server-side apply takes over what its client-side apply
        // wrote: conflicts on fields of the last-applied annotation are
        // forced (the apiserver's lastAppliedManager, for manager "kubectl").
        let handover = manager == "kubectl"
            && meta_str_in(old, LAST_APPLIED)
                .and_then(|a| serde_json::from_str(a).ok())
                .is_some_and(|last: Value| {
                    let last = patch::leaves(&last);
                    conflicts.iter().all(|(_, f)| last.contains_key(f))
                });
        if !conflicts.is_empty() && !opts.force && !handover {
            let mut msgs: Vec<String> = conflicts
                .iter()
                .map(|(m, f)| format!("conflict with \"{m}\": .{}", f.join(".")))
                .collect();
            msgs.sort();
            msgs.dedup();
            let n = msgs.len();
            let mut e = ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {n} conflict{}: {}",
                    if n == 1 { "" } else { "s" },
                    msgs.join("\n")
                ),
            );
            let causes: Vec<Value> = msgs
                .iter()
                .map(|c| json!({"reason": "FieldManagerConflict", "message": c}))
                .collect();
            e.details = Some(json!({"causes": causes}));
            return Err(e);
        }
        for (m, f) in &lost {
            if let Some(fields) = managers.0.get_mut(m) {
                fields.remove(f);
            }
        }
        // Fields this manager applied before and no longer applies go,
        // unless another manager owns them too.
        let mut new = old.clone();
        let previous = managers.0.get(&me).cloned().unwrap_or_default();
        for f in previous.iter().filter(|f| !applied.contains_key(*f)) {
            let shared = managers
                .0
                .iter()
                .any(|(k, fs)| *k != me && fs.iter().any(|o| patch::overlaps(o, f)));
            let in_part = match part {
                Part::Status => f.first().is_some_and(|s| s == "status"),
                Part::Main => !(res.status && f.first().is_some_and(|s| s == "status")),
            };
            if !shared && in_part {
                patch::remove(&mut new, f);
            }
        }
        let mut merge = config.clone();
        if let Some(m) = merge["metadata"].as_object_mut() {
            m.retain(|k, _| {
                matches!(k.as_str(), "labels" | "annotations" | "finalizers" | "ownerReferences")
            });
        }
        patch::merge_patch(&mut new, &merge);
        // kubectl's server-side apply keeps an existing last-applied
        // annotation in step with what it applies (the apiserver's
        // lastAppliedUpdater), so a later client-side apply still works.
        if manager == "kubectl" && meta_str_in(&new, LAST_APPLIED).is_some() {
            let mut last = body.clone();
            if let Some(a) = last["metadata"]["annotations"].as_object_mut() {
                a.remove(LAST_APPLIED);
            }
            new["metadata"]["annotations"][LAST_APPLIED] = json!(format!("{last}\n"));
        }
        // Apply-owned fields are the configuration's (plus, for the other
        // part, what this manager applied there before).
        let mut mine: BTreeSet<Path> = applied.into_keys().collect();
        mine.extend(previous.into_iter().filter(|f| {
            let status = f.first().is_some_and(|s| s == "status");
            res.status && (status == (part == Part::Main))
        }));
        // Others keep what they own with the same value (shared
        // ownership); conflicting fields were taken above.
        managers.0.insert(me, mine);
        managers.0.retain(|_, f| !f.is_empty());
        // The configuration's resourceVersion, if any, is a precondition.
        if let Some(rv) = meta_str(body, "resourceVersion") {
            new["metadata"]["resourceVersion"] = json!(rv);
        }
        Ok((new, managers))
    }

    pub fn delete(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value> {
        let gone = self.delete_stored(storage(res), ns, name, opts)?;
        Ok(view(res, &gone))
    }

    fn delete_stored(
        &mut self,
        res: &Resource,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value> {
        let key = self.key(res, ns, name)?;
        let obj = self.objects[&key].obj.clone();
        let conflict = |what: &str| {
            ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {what}",
                    res.qualified()
                ),
            )
        };
        if let Some(uid) = &opts.precondition_uid
            && meta_str(&obj, "uid") != Some(uid.as_str())
        {
            return Err(conflict("UID in precondition does not match"));
        }
        if let Some(rv) = &opts.precondition_rv
            && meta_str(&obj, "resourceVersion") != Some(rv.as_str())
        {
            return Err(conflict("ResourceVersion in precondition does not match"));
        }
        let deleting = obj["metadata"].get("deletionTimestamp").is_some();
        // A pod bound to a node waits for its kubelet (a delete with grace
        // period 0), as on a real cluster.
        let graceful_pod = res.kind == "Pod"
            && res.group.is_empty()
            && obj["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
            && opts.grace_period != Some(0);
        if graceful_pod || !finalizers_empty(&obj) {
            if deleting {
                return Ok(obj);
            }
            let grace = if graceful_pod {
                opts.grace_period
                    .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30)
            } else {
                0
            };
            let mut new = obj.clone();
            let at = SystemTime::now() + Duration::from_secs(grace.max(0) as u64);
            new["metadata"]["deletionTimestamp"] = json!(util::rfc3339(at));
            new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            self.record(key.0, EventType::Modified, &mut new, Some(obj));
            self.objects.get_mut(&key).expect("present").obj = new.clone();
            return Ok(new);
        }
        let mut gone = obj;
        self.objects.remove(&key);
        self.record(key.0, EventType::Deleted, &mut gone, None);
        if !opts.orphan {
            self.collect_garbage(&gone);
        }
        Ok(gone)
    }

    /// Background garbage collection after `owner` is gone: dependents
    /// naming its uid are deleted when none of their other owners exists,
    /// otherwise the dangling reference is dropped.
    fn collect_garbage(&mut self, owner: &Value) {
        let mut gone: Vec<String> = meta_str(owner, "uid").map(String::from).into_iter().collect();
        while let Some(uid) = gone.pop() {
            let dependents: Vec<Key> = self
                .objects
                .iter()
                .filter(|(_, s)| {
                    s.obj["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == json!(uid)))
                })
                .map(|(k, _)| k.clone())
                .collect();
            if dependents.is_empty() {
                continue;
            }
            let live: BTreeSet<String> = self
                .objects
                .values()
                .filter_map(|s| meta_str(&s.obj, "uid").map(String::from))
                .collect();
            for key in dependents {
                let res = &RESOURCES[key.0];
                let obj = self.objects[&key].obj.clone();
                let refs =
                    obj["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
                let others: Vec<Value> =
                    refs.into_iter().filter(|r| r["uid"] != json!(uid)).collect();
                if others.iter().any(|r| r["uid"].as_str().is_some_and(|u| live.contains(u))) {
                    let mut new = obj.clone();
                    new["metadata"]["ownerReferences"] = json!(others);
                    self.record(key.0, EventType::Modified, &mut new, Some(obj));
                    self.objects.get_mut(&key).expect("present").obj = new;
                    continue;
                }
                // delete() collects the dependent's own dependents.
                let _ = self.delete_stored(res, &key.1, &key.2, &DeleteOpts::default());
            }
        }
    }
}

/// Whether a record concerns a watch, and as which event type: an object
/// that starts matching a selector is ADDED, one that stops is DELETED.
/// Selectors match the object as `res` shows it.
pub fn watch_event(
    r: &Record,
    res: &Resource,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<EventType> {
    if r.res != Store::index(res) || ns.is_some_and(|n| n != r.namespace) {
        return None;
    }
    let m = |o: &Value| {
        let o = view(res, o);
        labels.matches(&o) && fields.matches(&o)
    };
    match r.kind {
        EventType::Added => m(&r.obj).then_some(EventType::Added),
        EventType::Deleted => m(&r.obj).then_some(EventType::Deleted),
        EventType::Modified => {
            let was = r.old.as_deref().is_some_and(m);
            match (was, m(&r.obj)) {
                (true, true) => Some(EventType::Modified),
                (false, true) => Some(EventType::Added),
                (true, false) => Some(EventType::Deleted),
                (false, false) => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn cm(name: &str, extra: Value) -> Value {
        let mut v = json!({"metadata": {"name": name}, "data": {"k": "v"}});
        patch::merge_patch(&mut v, &extra);
        v
    }

    fn owner_ref(obj: &Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"]})
    }

    #[test]
    fn garbage_collection_waits_for_every_owner_and_respects_finalizers() {
        let (mut s, _rx) = Store::new(100);
        let res = find("", "v1", "configmaps").unwrap();
        let w = WriteOpts::default();
        let o1 = s.create(res, "ns", cm("o1", json!({})), &w).unwrap();
        let o2 = s.create(res, "ns", cm("o2", json!({})), &w).unwrap();
        let both = json!({"metadata": {"ownerReferences": [owner_ref(&o1), owner_ref(&o2)]}});
        s.create(res, "ns", cm("dep", both), &w).unwrap();
        let held = json!({"metadata": {"ownerReferences": [owner_ref(&o1)], "finalizers": ["x"]}});
        s.create(res, "ns", cm("held", held), &w).unwrap();

        s.delete(res, "ns", "o1", &DeleteOpts::default()).unwrap();
        let dep = s.get(res, "ns", "dep").unwrap();
        assert_eq!(dep["metadata"]["ownerReferences"], json!([owner_ref(&o2)]));
        let held = s.get(res, "ns", "held").unwrap();
        assert!(held["metadata"]["deletionTimestamp"].is_string(), "finalizer holds it");
        s.delete(res, "ns", "o2", &DeleteOpts::default()).unwrap();
        assert_eq!(s.get(res, "ns", "dep").unwrap_err().code, 404);
        let p = Patch { kind: PatchKind::Merge, body: json!({"metadata": {"finalizers": []}}) };
        s.patch(res, "ns", "held", &p, Part::Main, &w).unwrap();
        assert_eq!(s.get(res, "ns", "held").unwrap_err().code, 404);
    }

    #[test]
    fn a_field_stays_while_another_applier_still_applies_it() {
        let (mut s, _rx) = Store::new(100);
        let res = find("", "v1", "configmaps").unwrap();
        let apply = |s: &mut Store, manager: &str, labels: Value| {
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "labels": labels}, "data": {"k": "v"}});
            let o = WriteOpts { field_manager: Some(manager.into()), ..WriteOpts::default() };
            s.patch(res, "ns", "c", &Patch { kind: PatchKind::Apply, body }, Part::Main, &o)
                .unwrap()
        };
        apply(&mut s, "a", json!({"x": "1"}));
        apply(&mut s, "b", json!({"x": "1"}));
        let after_a = apply(&mut s, "a", json!({}));
        assert_eq!(after_a["metadata"]["labels"]["x"], "1", "b still owns it");
        let after_b = apply(&mut s, "b", json!({}));
        assert!(after_b["metadata"]["labels"].get("x").is_none(), "{after_b}");
        assert_eq!(after_b["data"]["k"], "v", "both still apply data");
    }

    #[test]
    fn bounded_history_forgets_old_versions() {
        let (mut s, _rx) = Store::new(3);
        let res = find("", "v1", "configmaps").unwrap();
        let start = s.resource_version();
        for i in 0..5 {
            s.create(res, "ns", cm(&format!("c{i}"), json!({})), &WriteOpts::default()).unwrap();
        }
        assert!(s.records_after(start).is_none());
        let recent = s.records_after(s.resource_version() - 2).unwrap();
        assert_eq!(recent.len(), 2);
        assert!(recent[0].rv < recent[1].rv);
    }

    #[test]
    fn a_paged_list_walks_every_object_once_at_the_first_pages_version() {
        let (mut s, _rx) = Store::new(100);
        let res = find("", "v1", "configmaps").unwrap();
        for ns in ["a", "b"] {
            for i in 0..5 {
                s.create(res, ns, cm(&format!("c{i}"), json!({})), &WriteOpts::default()).unwrap();
            }
        }
        let (labels, fields) = (LabelSelector::default(), FieldSelector::default());
        let first = s.list_page(res, None, &labels, &fields, Some(4), None);
        let rv = first.rv;
        // A write between pages: later pages keep the first page's version,
        // so a watch from it replays this change.
        s.create(res, "b", cm("c9", json!({})), &WriteOpts::default()).unwrap();
        let mut names: Vec<String> =
            first.items.iter().map(|o| o["metadata"]["name"].to_string()).collect();
        let mut next = first.next;
        while let Some(token) = next.take() {
            let token = Continue::parse(&token.token()).expect("round trip");
            let page = s.list_page(res, None, &labels, &fields, Some(4), Some(&token));
            assert_eq!(page.rv, rv);
            assert!(page.items.len() <= 4);
            names.extend(page.items.iter().map(|o| o["metadata"]["name"].to_string()));
            next = page.next;
        }
        assert_eq!(names.len(), 11, "{names:?}");
        // One namespace, one page.
        let b = s.list_page(res, Some("b"), &labels, &fields, Some(10), None);
        assert_eq!(b.items.len(), 6);
        assert!(b.next.is_none());
    }
}
