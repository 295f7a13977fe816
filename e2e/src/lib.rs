//! kube-dsr test equipment: packet builders, network namespaces, the demo
//! topology and the dataplane benchmark. Never shipped.

pub mod cluster;
pub mod netns;
pub mod packet;
pub mod pods;
pub mod topology;

/// Whether a test that needs root (BPF, XDP, network namespaces) may run.
/// Without root it skips on a laptop, but under `CI=true` a missing
/// privilege is a failure, never a skip.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root (BPF, XDP, network namespaces) and CI=true: refusing to skip");
    }
    eprintln!("skipping {test}: needs root");
    false
}
