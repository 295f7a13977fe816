//! Network namespaces the tests create and always remove.
//!
//! Commands run through `ip netns exec` (test equipment may shell out); code
//! that must itself live in a namespace (the dataplane attaching XDP) runs on
//! a thread that entered it with `setns`, keeping the host's mounts so pins
//! land on the host bpffs and outlive the thread.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique, short name (interface and namespace names are limited).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a host command, failing with its stderr when it fails.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).stdin(Stdio::null()).output()?;
    check(cmd, out)
}

fn check(cmd: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted (with every process left in it) on
/// drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        sh(&format!("ip netns add {name}"))?;
        let ns = Self { name };
        ns.exec("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs `cmd` (a shell line) inside the namespace.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .stdin(Stdio::null())
            .output()?;
        check(cmd, out)
    }

    /// A command to spawn inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a new thread that has entered this namespace (network
    /// namespace only; mounts stay the host's).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        run_in(&self.name, f)
    }

    /// The MAC of `iface` in this namespace.
    pub fn mac(&self, iface: &str) -> Result<[u8; 6]> {
        let s = self.exec(&format!("cat /sys/class/net/{iface}/address"))?;
        parse_mac(s.trim())
    }
}

/// Runs `f` on a new thread that has entered the namespace named `ns`
/// (network namespace only; mounts stay the host's).
pub fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = File::open(format!("/var/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    match handle.join() {
        Ok(r) => r.context("setns"),
        Err(p) => std::panic::resume_unwind(p),
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = sh(&format!("ip netns pids {} | xargs -r kill -9", self.name));
        let _ = sh(&format!("ip netns del {}", self.name));
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    parts.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

/// Makes sure a bpffs is mounted at /sys/fs/bpf (mounting one if not).
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")) {
        return Ok(());
    }
    sh("mount -t bpf bpf /sys/fs/bpf").map(|_| ())
}

/// A bpffs directory for one test's pins, removed with everything in it on
/// drop (removing the link pin detaches a program left attached).
pub struct PinDir {
    pub path: std::path::PathBuf,
}

impl PinDir {
    pub fn new() -> Result<Self> {
        ensure_bpffs()?;
        let path = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", unique("kdsr-test-")));
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Removes pins depth first: an agent pins one subdirectory per interface,
/// and the one-host cluster gives each agent a subdirectory of its own.
/// Runs on drop, also when a test panicked.
fn remove_tree(path: &std::path::Path) {
    if let Ok(dir) = std::fs::read_dir(path) {
        for sub in dir.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            remove_tree(&sub);
        }
    }
    let _ = kube_dsr_agent::dataplane::Dataplane::remove_pins(path);
}
