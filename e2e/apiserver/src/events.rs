//! One event store under both event APIs, as on a real apiserver: events
//! are stored as core/v1 `Event`s and `events.k8s.io/v1` reads and writes
//! are converted (the field mapping of the apiserver's
//! `pkg/apis/events/v1` conversion), so `kubectl get events` and
//! `kubectl describe` show what a controller recorded through either API.

use serde_json::{Map, Value};

/// `events.k8s.io/v1` name → core/v1 name, for the fields that differ.
const RENAMED: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename(obj: &Value, from_new: bool, api_version: &str) -> Value {
    let Some(m) = obj.as_object() else { return obj.clone() };
    let mut out = Map::new();
    for (k, v) in m {
        let name = RENAMED
            .iter()
            .find(|(new, old)| if from_new { new == k } else { old == k })
            .map(|(new, old)| if from_new { *old } else { *new })
            .unwrap_or(k.as_str());
        out.insert(name.to_string(), v.clone());
    }
    out.insert("apiVersion".into(), Value::from(api_version));
    out.insert("kind".into(), Value::from("Event"));
    Value::Object(out)
}

/// An `events.k8s.io/v1` Event as the core/v1 Event it is stored as.
pub fn to_core(obj: &Value) -> Value {
    rename(obj, true, "v1")
}

/// A stored core/v1 Event as an `events.k8s.io/v1` Event.
pub fn from_core(obj: &Value) -> Value {
    rename(obj, false, "events.k8s.io/v1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let new = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e"}, "regarding": {"name": "web"}, "note": "programmed",
            "reason": "Programmed", "reportingController": "kubedsr.io/operator"});
        let core = to_core(&new);
        assert_eq!(core["involvedObject"]["name"], "web");
        assert_eq!(core["message"], "programmed");
        assert_eq!(core["reportingComponent"], "kubedsr.io/operator");
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(from_core(&core), new);
    }
}
