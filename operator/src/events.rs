//! Recording events: best effort everywhere. A failure to record one is
//! logged and never fails (and retries) the work it describes.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

/// Publishes one event about `obj`; `action` is what the writer was doing
/// ("Reconcile", "Allocate").
pub async fn record(
    recorder: &Recorder,
    obj: &impl Resource<DynamicType = ()>,
    warning: bool,
    reason: &str,
    note: String,
    action: &str,
) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "could not record event");
    }
}
