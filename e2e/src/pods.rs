//! Fake pods: a process inside a network namespace, placed in a cgroup
//! shaped like kubelet's for the pod's UID, so the agent's real namespace
//! discovery (`/proc/*/cgroup`) finds it. Killed and removed on drop.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// Where kubelet's cgroups go: a unified (v2) hierarchy, and a v1 one when
/// the host is hybrid (then both line formats of `/proc/<pid>/cgroup` are
/// exercised).
pub fn v2_root() -> PathBuf {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(p).join("cgroup.subtree_control").exists() {
            return p.into();
        }
    }
    panic!("no cgroup v2 hierarchy mounted");
}

pub fn v1_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/pids", "/sys/fs/cgroup/systemd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("tasks").exists())
}

pub fn fake_uid(n: u32) -> String {
    format!("{:08x}-5f2d-4c6e-9a7b-{:012x}", std::process::id(), n)
}

#[derive(Clone, Copy)]
pub enum Layout {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/<qos>/pod<uid>/<id>`
    Cgroupfs,
}

/// A "pod": a `sleep` inside a namespace, placed in a cgroup shaped like
/// kubelet's for its UID. The process is killed and the cgroups removed on
/// drop, also when the test fails.
pub struct FakePod {
    pub uid: String,
    child: Child,
    /// Its cgroup directories: the test root first, the deepest last.
    pub dirs: Vec<PathBuf>,
}

impl FakePod {
    /// Starts the pod's process in `ns` (it sleeps until dropped) in a
    /// cgroup under `root` (a cgroup hierarchy) in `layout`.
    pub fn start(ns: &NetNs, uid: &str, layout: Layout, root: &Path) -> Result<Self> {
        Self::start_in(&ns.name, uid, layout, root)
    }

    /// [`FakePod::start`] in the namespace named `ns` (`/var/run/netns/<ns>`).
    pub fn start_in(ns: &str, uid: &str, layout: Layout, root: &Path) -> Result<Self> {
        let test_root = root.join(format!("kdsr-test-{ns}-{}", &uid[..8.min(uid.len())]));
        let rel: Vec<String> = match layout {
            Layout::Systemd => {
                let us = uid.replace('-', "_");
                vec![
                    "kubepods.slice".into(),
                    "kubepods-burstable.slice".into(),
                    format!("kubepods-burstable-pod{us}.slice"),
                    "cri-containerd-0123abcd.scope".into(),
                ]
            }
            Layout::Cgroupfs => {
                vec!["kubepods".into(), "besteffort".into(), format!("pod{uid}"), "0123abcd".into()]
            }
        };
        let mut dirs = vec![test_root.clone()];
        let mut p = test_root;
        for c in rel {
            p = p.join(c);
            dirs.push(p.clone());
        }
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawning sleep in the namespace")?;
        let pod = Self { uid: uid.into(), child, dirs };
        fs::create_dir_all(pod.dirs.last().unwrap()).context("creating the pod cgroup")?;
        fs::write(pod.dirs.last().unwrap().join("cgroup.procs"), pod.child.id().to_string())
            .context("moving the process into the pod cgroup")?;
        pod.wait_in(ns)?;
        Ok(pod)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `ip netns exec` enters the namespace and then execs: wait until it has.
    fn wait_in(&self, ns: &str) -> Result<()> {
        let want = inode_of(ns)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let cmd = fs::read_to_string(format!("/proc/{}/comm", self.pid())).unwrap_or_default();
            let ino = fs::metadata(format!("/proc/{}/ns/net", self.pid())).map(|m| m.ino()).ok();
            if cmd.trim() == "sleep" && ino == Some(want) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("pid {} never entered {ns}", self.pid())
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in self.dirs.iter().rev() {
            if let Err(e) = fs::remove_dir(d) {
                eprintln!("removing cgroup {}: {e}", d.display());
            }
        }
    }
}

pub fn ns_inode(ns: &NetNs) -> Result<u64> {
    inode_of(&ns.name)
}

fn inode_of(ns: &str) -> Result<u64> {
    Ok(fs::metadata(format!("/var/run/netns/{ns}"))?.ino())
}
