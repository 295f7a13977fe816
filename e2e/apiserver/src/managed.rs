//! `metadata.managedFields`: the stand-in's per-manager field sets written
//! out as the apiserver does (`fieldsType: FieldsV1`, `f:<field>` keys),
//! and read back when a client writes them (kubectl's client-side to
//! server-side apply migration replaces them with a JSON patch).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::patch::Path;

/// A field manager: its name and whether it applies (`Apply`) or updates
/// (`Update`).
pub type Manager = (String, bool);

/// Who owns which fields, for server-side apply. Apply managers own the
/// fields of their last applied configuration; update managers (PUT and
/// non-apply patches) own the fields they last changed. Lists are leaves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Managers(pub BTreeMap<Manager, BTreeSet<Path>>);

/// A field set as `fieldsV1`: `{"f:spec": {"f:ports": {}}}`.
pub fn fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut node = &mut root;
        for k in p {
            let next = node.entry(format!("f:{k}")).or_insert_with(|| json!({}));
            node = next.as_object_mut().expect("built as objects");
        }
    }
    Value::Object(root)
}

/// The leaf paths of a `fieldsV1` set. Keys inside lists (`k:`, `v:`,
/// `i:`) make the list itself the leaf: the stand-in owns lists whole.
pub fn paths_of(fields: &Value) -> BTreeSet<Path> {
    fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        let children: Vec<(&String, &Value)> = v
            .as_object()
            .map(|m| m.iter().filter(|(k, _)| k.starts_with("f:")).collect())
            .unwrap_or_default();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, child) in children {
            path.push(k[2..].to_string());
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(fields, &mut Vec::new(), &mut out);
    out
}

/// `metadata.managedFields` for these managers, in the order the
/// apiserver keeps them (by time of last change, then name).
pub fn entries(api_version: &str, managers: &Managers, times: &BTreeMap<Manager, String>) -> Value {
    let mut list: Vec<(&Manager, &BTreeSet<Path>)> =
        managers.0.iter().filter(|(_, f)| !f.is_empty()).collect();
    list.sort_by_key(|(m, _)| (times.get(*m).cloned().unwrap_or_default(), (*m).clone()));
    Value::Array(
        list.into_iter()
            .map(|((name, apply), fields)| {
                json!({
                    "manager": name,
                    "operation": if *apply { "Apply" } else { "Update" },
                    "apiVersion": api_version,
                    "time": times.get(&(name.clone(), *apply)).cloned().unwrap_or_default(),
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(fields),
                })
            })
            .collect(),
    )
}

/// Managers from client-written `metadata.managedFields`; `None` when the
/// list is malformed (the apiserver then keeps the previous ones).
pub fn parse(entries: &Value) -> Option<(Managers, BTreeMap<Manager, String>)> {
    let mut managers = Managers::default();
    let mut times = BTreeMap::new();
    for e in entries.as_array()? {
        let name = e["manager"].as_str()?.to_string();
        let apply = match e["operation"].as_str()? {
            "Apply" => true,
            "Update" => false,
            _ => return None,
        };
        let key = (name, apply);
        managers.0.entry(key.clone()).or_default().extend(paths_of(&e["fieldsV1"]));
        if let Some(t) = e["time"].as_str() {
            times.insert(key, t.to_string());
        }
    }
    Some((managers, times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trip() {
        let p = |s: &str| s.split('.').map(String::from).collect::<Vec<_>>();
        let set: BTreeSet<Path> =
            [p("spec.ports"), p("spec.selector.app"), p("metadata.labels.a")].into_iter().collect();
        let v = fields_v1(&set);
        assert_eq!(v["f:spec"]["f:selector"]["f:app"], json!({}));
        assert_eq!(paths_of(&v), set);
        // A list-map item key makes the list the leaf.
        let real = json!({"f:spec": {".": {}, "f:ports": {"k:{\"port\":80}": {"f:port": {}}}}});
        assert_eq!(paths_of(&real), [p("spec.ports")].into_iter().collect());
    }
}
