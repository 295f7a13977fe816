//! Sets `cfg(privileged_tests)` when the tests can get the privileges they
//! need: the build runs as root, or under `CI=true` (where a test that
//! lacks them must fail, not be skipped). Without it, every test that needs
//! root is compiled as `#[ignore]` with the reason, so `cargo test` lists it
//! as ignored instead of counting it as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(privileged_tests)");
    // A build's user cannot be watched; these change with it under su/sudo.
    for var in ["CI", "USER", "HOME", "SUDO_USER"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ci || effective_uid() == Some(0) {
        println!("cargo::rustc-cfg=privileged_tests");
    }
}

/// The effective UID from `/proc/self/status` ("Uid: real effective ...").
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
