//! kube-dsr test equipment: packet builders, network namespaces, the demo
//! topology and the dataplane benchmark. Never shipped.

pub mod cluster;
pub mod netns;
pub mod packet;
pub mod pods;
pub mod topology;

/// Called first by every test that needs root (BPF, XDP, network
/// namespaces). Those tests carry
/// `#[cfg_attr(not(privileged_tests), ignore = "needs root: ...")]`: the
/// build script sets `privileged_tests` when it runs as root or under
/// `CI=true`, so without root they are listed as ignored, with the reason,
/// never counted as passed, and under `CI=true` a missing privilege is a
/// failure. A test built as root but run without it fails here.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test needs root (BPF, XDP, network namespaces): it was built as root or with \
         CI=true, so it is not ignored; run it as root"
    );
}
