//! What the apiserver checks when a custom resource is created or updated.
//! The OpenAPI schema part (types, required fields, unknown fields as under
//! strict field validation, enums, numeric bounds, string and list lengths,
//! `x-kubernetes-list-type` uniqueness) is checked here with the
//! apiserver's wording; the CEL rules (including transition rules on
//! `oldSelf`) are evaluated by kube-cel, a CEL library with the Kubernetes
//! extension functions. Also here: pruning of unknown fields and schema
//! defaults, which the apiserver applies before validating.
//!
//! `crds/tests` uses [`messages`] and [`validate`] directly, so the manifest
//! table and the stand-in server check objects with the same code.

use std::cell::RefCell;

use kube::core::cel::{CompiledSchema, ValidationErrors, Validator, compile_schema};
use serde_json::Value;

/// A CRD's OpenAPI schema with its CEL rules compiled once, when the
/// stand-in loads the CRD: compiling them on every write was most of its
/// time under the store lock at 1,000 DsrServices.
pub struct Schema {
    pub json: Value,
    rules: CompiledSchema,
}

impl Schema {
    pub fn new(json: Value) -> Self {
        let rules = compile_schema(&json);
        Schema { json, rules }
    }
}

thread_local! {
    /// A validator per thread: it registers every CEL extension function
    /// when made.
    static VALIDATOR: RefCell<Option<Validator>> = const { RefCell::new(None) };
}

/// The compiled CEL rules on `obj` (and transition rules from `old`).
fn cel_rules(
    rules: &CompiledSchema,
    obj: &Value,
    old: Option<&Value>,
) -> Result<(), ValidationErrors> {
    VALIDATOR.with(|v| {
        v.borrow_mut().get_or_insert_with(Validator::new).validate_compiled(rules, obj, old)
    })
}

/// Every message the apiserver would return for creating `obj`: schema
/// errors, and CEL errors unless a schema error blocks CEL evaluation.
pub fn messages(schema: &Value, obj: &Value) -> Vec<String> {
    messages_on_update(schema, obj, None)
}

/// As [`messages`], for an update of `old` to `obj` when `old` is given:
/// CEL transition rules (`oldSelf`) are then evaluated too.
pub fn messages_on_update(schema: &Value, obj: &Value, old: Option<&Value>) -> Vec<String> {
    let mut errs = validate(schema, obj);
    if blocks_cel(&errs) {
        return errs;
    }
    if let Err(cel) = cel_rules(&compile_schema(schema), obj, old) {
        errs.extend(cel.iter().map(|e| e.message.clone()));
    }
    errs
}

/// As [`messages_on_update`], worded as the apiserver words each error in a
/// `422 Invalid` response: a CEL failure names the field path of the
/// schema node that holds the rule (plus the rule's `fieldPath`) and, as
/// the "invalid value", that node's type — e.g.
/// `spec.vips: Invalid value: "array": a VIP must not be …` (the apiserver's
/// `field.Invalid(fldPath, sts.Type, message)`; the reason picks the
/// wording: `Forbidden`, `Required value`, `Duplicate value`).
pub fn field_errors(schema: &Schema, obj: &Value, old: Option<&Value>) -> Vec<String> {
    let mut errs = validate(&schema.json, obj);
    if blocks_cel(&errs) {
        return errs;
    }
    if let Err(cel) = cel_rules(&schema.rules, obj, old) {
        for e in cel.iter() {
            let path = e.field_path.trim_start_matches('.');
            let ty = type_at(&schema.json, path);
            let path = if path.is_empty() { "<nil>" } else { path };
            let what = match e.reason.as_deref() {
                Some("FieldValueForbidden") => "Forbidden".to_string(),
                Some("FieldValueRequired") => "Required value".to_string(),
                Some("FieldValueDuplicate") => "Duplicate value".to_string(),
                _ => format!("Invalid value: \"{ty}\""),
            };
            errs.push(format!("{path}: {what}: {}", e.message));
        }
    }
    errs
}

/// The schema `type` at a field path such as `spec.ports[0].name`.
fn type_at(schema: &Value, path: &str) -> String {
    let mut s = schema;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        s = &s["properties"][name];
        for _ in rest.split('[').filter(|i| !i.is_empty()) {
            s = &s["items"];
        }
    }
    s["type"].as_str().unwrap_or("object").to_string()
}

/// Whether the apiserver skips CEL evaluation because of `errs`: it does so
/// for values of the wrong type and values outside an enum, which CEL could
/// not evaluate meaningfully; other schema errors are reported together with
/// the CEL ones.
fn blocks_cel(errs: &[String]) -> bool {
    errs.iter().any(|e| e.contains("must be of type") || e.contains("Unsupported value"))
}

/// Schema errors for a whole object; `apiVersion`, `kind` and `metadata` are
/// the apiserver's own business and skipped.
pub fn validate(schema: &Value, obj: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let Some(fields) = obj.as_object() else {
        return vec!["object expected".into()];
    };
    let props = &schema["properties"];
    for (k, v) in fields {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.get(k) {
            Some(s) => check(s, v, k, &mut errs),
            None => errs.push(format!("unknown field \"{k}\"")),
        }
    }
    required(schema, fields, "", &mut errs);
    errs
}

fn required(
    schema: &Value,
    fields: &serde_json::Map<String, Value>,
    path: &str,
    errs: &mut Vec<String>,
) {
    for r in schema["required"].as_array().into_iter().flatten() {
        let r = r.as_str().unwrap();
        if !fields.contains_key(r) {
            let p = if path.is_empty() { r.to_string() } else { format!("{path}.{r}") };
            errs.push(format!("{p}: Required value"));
        }
    }
}

fn check(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errs.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}",
                schema["type"]
            ));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        errs.push(format!(
            "{path}: Invalid value: {v}: {path} in body must be of type {ty}: {}",
            json_type(v)
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        errs.push(format!("{path}: Unsupported value: {v}: supported values: {}", list.join(", ")));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema["minimum"].as_f64()
            && n < min
        {
            errs.push(format!("{path}: Invalid value: {v}: {path} in body should be greater than or equal to {min}"));
        }
        if let Some(max) = schema["maximum"].as_f64()
            && n > max
        {
            errs.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be less than or equal to {max}"
            ));
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema["minLength"].as_u64()
            && len < min
        {
            errs.push(format!(
                "{path}: Invalid value: {v}: {path} in body should be at least {min} chars long"
            ));
        }
        if let Some(max) = schema["maxLength"].as_u64()
            && len > max
        {
            errs.push(format!("{path}: Too long: may not be longer than {max}"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(min) = schema["minItems"].as_u64()
            && n < min
        {
            errs.push(format!(
                "{path}: Invalid value: {n}: {path} in body should have at least {min} items"
            ));
        }
        if let Some(max) = schema["maxItems"].as_u64()
            && n > max
        {
            errs.push(format!("{path}: Too many: {n}: must have at most {max} items"));
        }
        for (i, item) in items.iter().enumerate() {
            check(&schema["items"], item, &format!("{path}[{i}]"), errs);
        }
        list_uniqueness(schema, items, path, errs);
    }
    if let Some(fields) = v.as_object() {
        if let Some(props) = schema["properties"].as_object() {
            for (k, fv) in fields {
                match props.get(k) {
                    Some(s) => check(s, fv, &format!("{path}.{k}"), errs),
                    None => errs.push(format!("unknown field \"{path}.{k}\"")),
                }
            }
            required(schema, fields, path, errs);
        } else if let Some(values) = schema.get("additionalProperties") {
            for (k, fv) in fields {
                check(values, fv, &format!("{path}.{k}"), errs);
            }
        }
    }
}

fn list_uniqueness(schema: &Value, items: &[Value], path: &str, errs: &mut Vec<String>) {
    let key_of = |item: &Value| -> Option<Value> {
        match schema["x-kubernetes-list-type"].as_str()? {
            "set" => Some(item.clone()),
            "map" => {
                let keys = schema["x-kubernetes-list-map-keys"].as_array()?;
                Some(Value::Array(
                    keys.iter()
                        .map(|k| {
                            let k = k.as_str().unwrap();
                            // Absent keys take their schema default, as on the apiserver.
                            item.get(k)
                                .cloned()
                                .or_else(|| {
                                    schema["items"]["properties"][k].get("default").cloned()
                                })
                                .unwrap_or(Value::Null)
                        })
                        .collect(),
                ))
            }
            _ => None,
        }
    };
    let mut seen = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(key) = key_of(item) else { return };
        if seen.contains(&key) {
            errs.push(format!("{path}[{i}]: Duplicate value: {key}"));
        }
        seen.push(key);
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether `msg` (from [`validate`]) is about a field the schema does not have.
pub fn is_unknown_field(msg: &str) -> bool {
    msg.starts_with("unknown field ")
}

/// Removes fields the schema does not declare, as the apiserver prunes
/// them from structural schemas when field validation is not `Strict`.
/// `apiVersion`, `kind` and `metadata` are kept at the top level.
pub fn prune(schema: &Value, obj: &mut Value) {
    if let Some(fields) = obj.as_object_mut() {
        let props = &schema["properties"];
        fields.retain(|k, _| {
            matches!(k.as_str(), "apiVersion" | "kind" | "metadata") || props.get(k).is_some()
        });
        for (k, v) in fields.iter_mut() {
            if let Some(s) = props.get(k) {
                prune_value(s, v);
            }
        }
    }
}

fn prune_value(schema: &Value, v: &mut Value) {
    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true) {
        return;
    }
    match v {
        Value::Array(items) => {
            for item in items {
                prune_value(&schema["items"], item);
            }
        }
        Value::Object(fields) => {
            if let Some(props) = schema["properties"].as_object() {
                fields.retain(|k, _| props.contains_key(k));
                for (k, fv) in fields.iter_mut() {
                    prune_value(&props[k], fv);
                }
            } else if let Some(values) = schema.get("additionalProperties")
                && values.is_object()
            {
                for fv in fields.values_mut() {
                    prune_value(values, fv);
                }
            }
        }
        _ => {}
    }
}

/// Fills absent fields that have a schema `default`, at every level of the
/// object that is present (the apiserver defaults on decoding, before it
/// validates).
pub fn apply_defaults(schema: &Value, v: &mut Value) {
    match v {
        Value::Array(items) => {
            for item in items {
                apply_defaults(&schema["items"], item);
            }
        }
        Value::Object(fields) => {
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if !fields.contains_key(k)
                        && let Some(d) = s.get("default")
                    {
                        fields.insert(k.clone(), d.clone());
                    }
                }
                for (k, fv) in fields.iter_mut() {
                    if let Some(s) = props.get(k) {
                        apply_defaults(s, fv);
                    }
                }
            } else if let Some(values) = schema.get("additionalProperties")
                && values.is_object()
            {
                for fv in fields.values_mut() {
                    apply_defaults(values, fv);
                }
            }
        }
        _ => {}
    }
}
