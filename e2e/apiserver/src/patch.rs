//! Patches (merge, JSON, strategic merge) and the field bookkeeping that
//! server-side apply needs.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else
/// replaces (lists included).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// `patchMergeKey` of the built-in list fields whose `patchStrategy` is
/// `merge`, by field name (the subset that Pods, Nodes, Leases and Events
/// carry). Lists not named here are replaced whole, as atomic lists are.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "conditions" => "type",
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses"
        | "ephemeralContainerStatuses" => "name",
        "volumeMounts" => "mountPath",
        "ownerReferences" => "uid",
        "podIPs" | "hostIPs" => "ip",
        "taints" => "key",
        "addresses" => "type",
        _ => return None,
    })
}

/// Primitive lists with `patchStrategy: merge` (values are unioned).
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge patch for built-in kinds: a merge patch, except that the
/// list fields known to `merge_key` merge item by item on their key (with
/// `$patch: delete` / `$patch: replace` on items), `finalizers` is unioned,
/// `$deleteFromPrimitiveList/<field>` removes values and other `$` directive
/// keys (`$setElementOrder`, `$retainKeys`) are ignored.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = p.clone();
        p.remove("$patch");
        *target = Value::Object(p);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(del)) = (t.get_mut(field), v.as_array()) {
                items.retain(|i| !del.contains(i));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(cur)), Value::Array(items)) if merge_key(k).is_some() => {
                let key = merge_key(k).expect("checked");
                merge_list(cur, items, key);
            }
            (Some(Value::Array(cur)), Value::Array(items)) if merges_primitives(k) => {
                for i in items {
                    if !cur.contains(i) {
                        cur.push(i.clone());
                    }
                }
            }
            (Some(cur @ Value::Object(_)), Value::Object(_)) => strategic_merge_patch(cur, v),
            _ => {
                let mut v = v.clone();
                strip_directives(&mut v);
                t.insert(k.clone(), v);
            }
        }
    }
}

fn merge_list(cur: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let Some(id) = item.get(key) else {
            cur.push(item.clone());
            continue;
        };
        let pos = cur.iter().position(|c| c.get(key) == Some(id));
        match (pos, item.get("$patch").and_then(Value::as_str)) {
            (Some(i), Some("delete")) => {
                cur.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), Some("replace")) => {
                let mut v = item.clone();
                strip_directives(&mut v);
                cur[i] = v;
            }
            (Some(i), _) => strategic_merge_patch(&mut cur[i], item),
            (None, _) => {
                let mut v = item.clone();
                strip_directives(&mut v);
                cur.push(v);
            }
        }
    }
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn tokens(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer.strip_prefix('/').ok_or_else(|| format!("invalid pointer {pointer:?}"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent<'a>(doc: &'a mut Value, toks: &[String]) -> Result<&'a mut Value, String> {
    let mut v = doc;
    for t in toks {
        v = match v {
            Value::Object(m) => {
                m.get_mut(t).ok_or_else(|| format!("missing path segment {t:?}"))?
            }
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("bad index {t:?}"))?;
                a.get_mut(i).ok_or_else(|| format!("index {i} out of range"))?
            }
            _ => return Err(format!("cannot descend into a scalar at {t:?}")),
        };
    }
    Ok(v)
}

fn get_path(doc: &Value, pointer: &str) -> Result<Value, String> {
    doc.pointer(pointer).cloned().ok_or_else(|| format!("path {pointer:?} does not exist"))
}

fn remove_path(doc: &mut Value, pointer: &str) -> Result<Value, String> {
    let toks = tokens(pointer)?;
    let (last, head) = toks.split_last().ok_or("cannot remove the whole document")?;
    match parent(doc, head)? {
        Value::Object(m) => {
            m.remove(last).ok_or_else(|| format!("path {pointer:?} does not exist"))
        }
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("bad index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("index {i} out of range"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("path {pointer:?} does not exist")),
    }
}

fn add_path(doc: &mut Value, pointer: &str, value: Value, replace: bool) -> Result<(), String> {
    let toks = tokens(pointer)?;
    let Some((last, head)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent(doc, head)? {
        Value::Object(m) => {
            if replace && !m.contains_key(last) {
                return Err(format!("path {pointer:?} does not exist"));
            }
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| format!("bad index {last:?}"))?;
                if replace {
                    *a.get_mut(i).ok_or_else(|| format!("index {i} out of range"))? = value;
                } else if i <= a.len() {
                    a.insert(i, value);
                } else {
                    return Err(format!("index {i} out of range"));
                }
            }
        }
        _ => return Err(format!("path {pointer:?} does not exist")),
    }
    Ok(())
}

/// RFC 6902 JSON patch (add, remove, replace, move, copy, test).
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("a JSON patch is a list of operations")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("operation without path")?;
        let value =
            || op.get("value").cloned().ok_or(format!("operation on {path:?} without value"));
        match op["op"].as_str().unwrap_or("") {
            "add" => add_path(doc, path, value()?, false)?,
            "replace" => add_path(doc, path, value()?, true)?,
            "remove" => {
                remove_path(doc, path)?;
            }
            "move" => {
                let from = op["from"].as_str().ok_or("move without from")?;
                let v = remove_path(doc, from)?;
                add_path(doc, path, v, false)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or("copy without from")?;
                let v = get_path(doc, from)?;
                add_path(doc, path, v, false)?;
            }
            "test" => {
                if get_path(doc, path)? != value()? {
                    return Err(format!("test operation on {path:?} failed"));
                }
            }
            other => return Err(format!("unknown operation {other:?}")),
        }
    }
    Ok(())
}

/// A field's path from the object's root; lists are leaves (atomic).
pub type Path = Vec<String>;

/// Metadata that the server owns; never part of a field set.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The leaves of `obj` that a field manager can own, with their values:
/// every scalar and every list (lists are atomic here; empty objects are
/// not leaves), except
/// `apiVersion`, `kind` and the server's own metadata.
pub fn leaves(obj: &Value) -> BTreeMap<Path, Value> {
    let mut out = BTreeMap::new();
    if let Some(m) = obj.as_object() {
        for (k, v) in m {
            match k.as_str() {
                "apiVersion" | "kind" => {}
                "metadata" => {
                    if let Some(meta) = v.as_object() {
                        for (mk, mv) in meta {
                            if !SYSTEM_METADATA.contains(&mk.as_str()) {
                                walk(mv, vec![k.clone(), mk.clone()], &mut out);
                            }
                        }
                    }
                }
                _ => walk(v, vec![k.clone()], &mut out),
            }
        }
    }
    out
}

fn walk(v: &Value, path: Path, out: &mut BTreeMap<Path, Value>) {
    match v {
        // An empty object owns nothing (and conflicts with nothing).
        Value::Object(m) if m.is_empty() => {}
        Value::Object(m) => {
            for (k, fv) in m {
                let mut p = path.clone();
                p.push(k.clone());
                walk(fv, p, out);
            }
        }
        _ => {
            out.insert(path, v.clone());
        }
    }
}

/// Paths whose value differs between `old` and `new` (changed, added or removed).
pub fn changed(old: &Value, new: &Value) -> Vec<Path> {
    let (a, b) = (leaves(old), leaves(new));
    let mut out: Vec<Path> =
        b.iter().filter(|(p, v)| a.get(*p) != Some(v)).map(|(p, _)| p.clone()).collect();
    out.extend(a.keys().filter(|p| !b.contains_key(*p)).cloned());
    out
}

/// The value at `path`, if present.
pub fn get<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(obj, |v, k| v.as_object()?.get(k))
}

/// Removes the value at `path` and any objects left empty above it.
pub fn remove(obj: &mut Value, path: &[String]) {
    let Some((last, head)) = path.split_last() else { return };
    let mut v = &mut *obj;
    for k in head {
        match v.as_object_mut().and_then(|m| m.get_mut(k)) {
            Some(next) => v = next,
            None => return,
        }
    }
    if let Some(m) = v.as_object_mut() {
        m.remove(last);
    }
    // Prune empty parents (but not metadata or the root).
    if head.len() > 1 || (head.len() == 1 && head[0] != "metadata") {
        let parent = get(obj, head);
        if parent.and_then(Value::as_object).is_some_and(Map::is_empty) {
            remove(obj, head);
        }
    }
}

/// Whether two paths overlap (equal, or one inside the other).
pub fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_patch_operations() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": 1});
        let patch = json!([
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "replace", "path": "/c", "value": 2},
            {"op": "test", "path": "/c", "value": 2},
            {"op": "copy", "from": "/c", "path": "/d"},
            {"op": "move", "from": "/d", "path": "/e"},
            {"op": "remove", "path": "/a/b/0"},
        ]);
        json_patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, json!({"a": {"b": [2, 3]}, "c": 2, "e": 2}));
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/c", "value": 9}])).is_err());
        assert!(
            json_patch(&mut doc, &json!([{"op": "replace", "path": "/zz", "value": 9}])).is_err()
        );
    }

    #[test]
    fn strategic_merge_by_key() {
        let mut pod = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]},
            "metadata": {"finalizers": ["a"]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]},
                     "metadata": {"finalizers": ["b"]}}),
        );
        assert_eq!(pod["status"]["conditions"][0], json!({"type": "Ready", "status": "True"}));
        assert_eq!(pod["status"]["conditions"][1]["type"], "PodScheduled");
        assert_eq!(pod["metadata"]["finalizers"], json!(["a", "b"]));
        strategic_merge_patch(
            &mut pod,
            &json!({"status": {"conditions": [{"type": "Ready", "$patch": "delete"}]}}),
        );
        assert_eq!(pod["status"]["conditions"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn merge_patch_removes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": 1, "b": {"c": [1, 2], "d": 1}});
        merge_patch(&mut doc, &json!({"a": null, "b": {"c": [3]}}));
        assert_eq!(doc, json!({"b": {"c": [3], "d": 1}}));
    }

    #[test]
    fn changed_paths_and_removal() {
        let old =
            json!({"metadata": {"name": "x", "labels": {"a": "1"}}, "spec": {"p": 1, "q": [1]}});
        let new =
            json!({"metadata": {"name": "y", "labels": {"a": "2"}}, "spec": {"q": [1], "r": 2}});
        let mut c = changed(&old, &new);
        c.sort();
        let p = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        assert_eq!(c, vec![p("metadata.labels.a"), p("spec.p"), p("spec.r")]);
        let mut obj = json!({"spec": {"a": {"b": 1}, "c": 2}});
        remove(&mut obj, &p("spec.a.b"));
        assert_eq!(obj, json!({"spec": {"c": 2}}));
    }
}
