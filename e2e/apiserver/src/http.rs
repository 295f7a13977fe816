//! URL routing, request decoding and the watch stream.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::resources::{self, Resource};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    ApiError, Continue, DeleteOpts, Part, Patch, PatchKind, Result, Store, WriteOpts, storage,
    view, watch_event,
};
use crate::table::{self, Include};
use crate::{openapi, proto};

pub struct Shared {
    pub store: Mutex<Store>,
    pub changes: tokio::sync::watch::Receiver<u64>,
    pub bookmark_interval: Duration,
}

fn json_response(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("static response parts")
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// A request for objects of one resource.
struct Target {
    res: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    part: Part,
}

enum Route {
    Json(Value),
    /// `/openapi/v2`: JSON only (see `openapi`).
    OpenApiV2,
    Objects(Target),
}

fn route(path: &str) -> Result<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let not_found =
        || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => {
            return Ok(Route::Json(json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-dsr-apiserver",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "none", "compiler": "none", "platform": "linux/amd64",
            })));
        }
        ["healthz"] | ["readyz"] | ["livez"] => return Ok(Route::Json(json!("ok"))),
        ["openapi", "v2"] => return Ok(Route::OpenApiV2),
        ["openapi", "v3"] => return Ok(Route::Json(openapi::v3_root())),
        ["openapi", "v3", "api", v] => {
            return openapi::v3_group_version("", v).map(Route::Json).ok_or_else(not_found);
        }
        ["openapi", "v3", "apis", g, v] => {
            return openapi::v3_group_version(g, v).map(Route::Json).ok_or_else(not_found);
        }
        ["api"] => return Ok(Route::Json(resources::api_versions())),
        ["apis"] => return Ok(Route::Json(resources::api_group_list())),
        ["apis", g] => return resources::api_group(g).map(Route::Json).ok_or_else(not_found),
        ["api", v] => {
            return resources::discovery_resources("", v).map(Route::Json).ok_or_else(not_found);
        }
        ["apis", g, v] => {
            return resources::discovery_resources(g, v).map(Route::Json).ok_or_else(not_found);
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    let (namespace, rest): (Option<&str>, &[&str]) = match rest {
        // /api/v1/namespaces/<name>/status is the Namespace's status.
        ["namespaces", _, "status"] if group.is_empty() => (None, rest),
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail),
        _ => (None, rest),
    };
    let (plural, name, part) = match rest {
        [p] => (*p, None, Part::Main),
        [p, n] => (*p, Some(*n), Part::Main),
        [p, n, "status"] => (*p, Some(*n), Part::Status),
        _ => return Err(not_found()),
    };
    let res = resources::find(group, version, plural).ok_or_else(not_found)?;
    if namespace.is_some() && !res.namespaced {
        return Err(not_found());
    }
    if part == Part::Status && !res.status {
        return Err(not_found());
    }
    Ok(Route::Objects(Target {
        res,
        namespace: namespace.map(String::from),
        name: name.map(String::from),
        part,
    }))
}

/// A request body as JSON: JSON, YAML where `yaml`, and protobuf for the
/// kinds `proto` decodes.
fn parse_body(bytes: &[u8], yaml: bool, content_type: &str) -> Result<Value> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    if content_type == "application/vnd.kubernetes.protobuf" {
        return proto::decode(bytes).map_err(|e| match e {
            proto::Refused::Malformed(m) => ApiError::bad_request(m),
            proto::Refused::Unsupported(kind) => ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (the stand-in decodes protobuf for Namespace only, not {kind})"
                ),
            ),
        });
    }
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
        Err(e) if !yaml => Err(ApiError::bad_request(format!("invalid JSON body: {e}"))),
        Err(_) => serde_yaml::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}"))),
    }
}

fn write_opts(q: &HashMap<String, String>, headers: &HeaderMap) -> WriteOpts {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|a| a.split('/').next().unwrap_or(a).to_string());
    WriteOpts {
        field_manager: q.get("fieldManager").cloned().or(agent),
        strict: q.get("fieldValidation").is_some_and(|v| v == "Strict"),
        warn: q.get("fieldValidation").is_none_or(|v| v == "Warn"),
        force: q.get("force").is_some_and(|v| v == "true"),
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = query(&uri);
    let accept =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let target = match route(uri.path()) {
        Ok(Route::Json(v)) if method == Method::GET => return json_response(200, &v),
        Ok(Route::OpenApiV2) if method == Method::GET => {
            // kubectl asks for the protobuf form only; the stand-in has no
            // protobuf encoder, and says so the way the apiserver refuses
            // an Accept it cannot serve. kubectl then works from v3.
            let json_ok = accept.is_empty()
                || accept.split(',').any(|a| a.contains("json") || a.trim().starts_with("*/*"));
            if !json_ok {
                return error_response(&ApiError::new(
                    406,
                    "NotAcceptable",
                    "only the following media types are accepted: application/json",
                ));
            }
            return json_response(200, &openapi::v2());
        }
        Ok(Route::Json(_) | Route::OpenApiV2) => {
            return error_response(&ApiError::new(405, "MethodNotAllowed", "method not allowed"));
        }
        Ok(Route::Objects(t)) => t,
        Err(e) => return error_response(&e),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if method == Method::GET
        && target.name.is_none()
        && q.get("watch").is_some_and(|w| w == "true" || w == "1")
    {
        return watch(shared, target, &q).await;
    }
    match objects(&shared, &method, &target, &q, &headers, &content_type, &body) {
        Ok((code, v, _)) if accept.contains("as=Table") && method == Method::GET => {
            json_response(code, &as_table(target.res, v, &q))
        }
        Ok((code, v, warnings)) => {
            let mut r = json_response(code, &v);
            for w in warnings {
                // RFC 7234 warn-code 299, as the apiserver sends them.
                let text = format!("299 - {}", serde_json::Value::String(w));
                if let Ok(h) = axum::http::HeaderValue::from_str(&text) {
                    r.headers_mut().append(header::WARNING, h);
                }
            }
            r
        }
        Err(e) => error_response(&e),
    }
}

fn selectors(q: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector)> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

/// A GET answer (one object or a list) as the Table `kubectl get` asks for.
fn as_table(res: &Resource, v: Value, q: &HashMap<String, String>) -> Value {
    let include = Include::parse(q.get("includeObject").map(String::as_str));
    let (shown, rv) = match v.get("items").and_then(Value::as_array) {
        Some(items) => (items.clone(), v["metadata"]["resourceVersion"].as_str().map(String::from)),
        None => (vec![v.clone()], None),
    };
    let stored: Vec<Value> = shown
        .iter()
        .map(
            |o| if std::ptr::eq(storage(res), res) { o.clone() } else { crate::events::to_core(o) },
        )
        .collect();
    let mut t = table::table(res, &stored, &shown, rv, include);
    // A paged list's Table pages too (kubectl follows the token).
    if let Some(next) = v["metadata"].get("continue") {
        t["metadata"]["continue"] = next.clone();
    }
    t
}

fn list_value(res: &Resource, items: Vec<Value>, rv: u64) -> Value {
    json!({
        "kind": format!("{}List", res.kind),
        "apiVersion": res.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

fn objects(
    shared: &Shared,
    method: &Method,
    t: &Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Value, Vec<String>)> {
    let res = t.res;
    let mut live = shared.store.lock().expect("store lock");
    let opts = write_opts(q, headers);
    // dryRun=All: the write runs on a copy that is dropped afterwards, so
    // it is validated, defaulted and answered exactly as for real and
    // nothing is stored or sent to watchers. The answer keeps the stored
    // resourceVersion (none for a create), as the apiserver's.
    // (kubectl delete sends it in the DeleteOptions body.)
    let in_body = *method == Method::DELETE
        && serde_json::from_slice::<Value>(body)
            .is_ok_and(|b| b["dryRun"].as_array().is_some_and(|d| d.contains(&json!("All"))));
    let dry_run =
        (q.get("dryRun").is_some_and(|d| d == "All") || in_body) && *method != Method::GET;
    let mut copy = dry_run.then(|| live.dry_clone());
    let store: &mut Store = match copy.as_mut() {
        Some(c) => c,
        None => &mut live,
    };
    let result = write(store, method, t, q, &opts, content_type, body);
    let warnings = store.take_warnings();
    if !dry_run {
        return result.map(|(code, v)| (code, v, warnings));
    }
    let (code, mut v) = result?;
    let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
    let ns = t.namespace.clone().unwrap_or_default();
    match live.get(res, &ns, &name) {
        Ok(current) => {
            v["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone()
        }
        Err(_) => {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
        }
    }
    Ok((code, v, warnings))
}

/// Reads and writes on `store` (the live one, or a dry run's copy).
fn write(
    store: &mut Store,
    method: &Method,
    t: &Target,
    q: &HashMap<String, String>,
    opts: &WriteOpts,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Value)> {
    let res = t.res;
    let ns = t.namespace.clone().unwrap_or_default();
    let needs_ns = || {
        if res.namespaced && t.namespace.is_none() {
            Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"))
        } else {
            Ok(())
        }
    };
    match (method.clone(), &t.name) {
        (Method::GET, None) => {
            let (labels, fields) = selectors(q)?;
            // `limit` and `continue` as the apiserver: clients (reflectors)
            // list big collections in pages instead of one huge answer.
            let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
            let after = match q.get("continue").filter(|c| !c.is_empty()) {
                Some(token) => Some(Continue::parse(token).ok_or_else(|| {
                    ApiError::bad_request(format!("invalid continue token: {token:?}"))
                })?),
                None => None,
            };
            if after.as_ref().is_some_and(|c| c.rv < store.compacted()) {
                return Err(ApiError::new(
                    410,
                    "Expired",
                    "the provided continue parameter is too old to display a consistent list result",
                ));
            }
            let page = store.list_page(
                res,
                t.namespace.as_deref(),
                &labels,
                &fields,
                limit,
                after.as_ref(),
            );
            let mut v = list_value(res, page.items, page.rv);
            if let Some(next) = page.next {
                v["metadata"]["continue"] = json!(next.token());
            }
            Ok((200, v))
        }
        (Method::GET, Some(name)) => {
            needs_ns()?;
            Ok((200, store.get(res, &ns, name)?))
        }
        (Method::POST, None) => {
            needs_ns()?;
            let obj = parse_body(body, true, content_type)?;
            Ok((201, store.create(res, &ns, obj, opts)?))
        }
        (Method::PUT, Some(name)) => {
            needs_ns()?;
            let obj = parse_body(body, true, content_type)?;
            Ok((200, store.replace(res, &ns, name, obj, t.part, opts)?))
        }
        (Method::PATCH, Some(name)) => {
            needs_ns()?;
            let kind = match content_type {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/json-patch+json" => PatchKind::Json,
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchKind::Apply,
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format: {other}"),
                    ));
                }
            };
            let patch = Patch { kind, body: parse_body(body, true, "")? };
            Ok((200, store.patch(res, &ns, name, &patch, t.part, opts)?))
        }
        (Method::DELETE, Some(name)) => {
            needs_ns()?;
            let b = parse_body(body, false, "")?;
            let mut opts = DeleteOpts {
                grace_period: b["gracePeriodSeconds"]
                    .as_i64()
                    .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
                ..DeleteOpts::default()
            };
            let policy = b["propagationPolicy"]
                .as_str()
                .map(String::from)
                .or_else(|| q.get("propagationPolicy").cloned());
            opts.orphan = policy.as_deref() == Some("Orphan")
                || b["orphanDependents"].as_bool() == Some(true);
            opts.precondition_uid = b["preconditions"]["uid"].as_str().map(String::from);
            opts.precondition_rv = b["preconditions"]["resourceVersion"].as_str().map(String::from);
            Ok((200, store.delete(res, &ns, name, &opts)?))
        }
        (Method::DELETE, None) => {
            let (labels, fields) = selectors(q)?;
            let (items, _) = store.list(res, t.namespace.as_deref(), &labels, &fields);
            let mut deleted = Vec::new();
            for item in items {
                let n = item["metadata"]["namespace"].as_str().unwrap_or("").to_string();
                let name = item["metadata"]["name"].as_str().unwrap_or("").to_string();
                deleted.push(store.delete(res, &n, &name, &DeleteOpts::default())?);
            }
            let rv = store.resource_version();
            Ok((200, list_value(res, deleted, rv)))
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not allowed here"))),
    }
}

fn line(event: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": event, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// `?watch=true`: ordered events after `resourceVersion` (or the current
/// state as ADDED events first when it is unset or "0"), bookmarks, and
/// `410 Gone` as an ERROR event when the history no longer reaches back.
async fn watch(shared: Arc<Shared>, t: Target, q: &HashMap<String, String>) -> Response {
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let start: Option<u64> = match rv_param.as_str() {
        "" | "0" => None,
        s => match s.parse() {
            Ok(v) => Some(v),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version: {s:?}"
                )));
            }
        },
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let initial_end = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout =
        Duration::from_secs(q.get("timeoutSeconds").and_then(|s| s.parse().ok()).unwrap_or(1800));
    let res = t.res;
    let ns = t.namespace.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    // The first batch is taken under the lock here, so a watch that
    // returns has a consistent starting point.
    let mut pos;
    let mut first = Vec::new();
    {
        let store = shared.store.lock().expect("store lock");
        match start {
            None => {
                let (items, rv) = store.list(res, ns.as_deref(), &labels, &fields);
                first.extend(items.iter().map(|o| line("ADDED", o)));
                pos = rv;
                if initial_end {
                    first.push(line(
                        "BOOKMARK",
                        &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": {
                            "resourceVersion": rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"}}}),
                    ));
                }
            }
            Some(rv) => pos = rv,
        }
    }
    let mut changes = shared.changes.clone();
    let interval = shared.bookmark_interval;
    tokio::spawn(async move {
        for l in first {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next_bookmark = tokio::time::Instant::now() + interval;
        loop {
            // Only the new records' pointers are taken under the lock;
            // matching and encoding them happens outside it, so writers
            // and the other watches do not wait for this one.
            let batch = {
                let store = shared.store.lock().expect("store lock");
                match store.records_after(pos) {
                    Some(records) => {
                        pos = store.resource_version();
                        Ok(records)
                    }
                    None => Err(store.compacted()),
                }
            };
            let batch = batch.map(|records| {
                records
                    .iter()
                    .filter_map(|r| {
                        watch_event(r, res, ns.as_deref(), &labels, &fields)
                            .map(|k| line(k.as_str(), &view(res, &r.obj)))
                    })
                    .collect::<Vec<Bytes>>()
            });
            match batch {
                Ok(events) => {
                    for e in events {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                }
                Err(oldest) => {
                    let status = ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {pos} ({oldest})"),
                    )
                    .status();
                    let _ = tx.send(line("ERROR", &status)).await;
                    return;
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(next_bookmark) => {
                    next_bookmark = tokio::time::Instant::now() + interval;
                    if bookmarks {
                        let bm = json!({"kind": res.kind, "apiVersion": res.api_version(),
                            "metadata": {"resourceVersion": pos.to_string()}});
                        if tx.send(line("BOOKMARK", &bm)).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts")
}
