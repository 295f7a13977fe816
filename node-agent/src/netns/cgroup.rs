//! Finding a pod's network namespace from its UID.
//!
//! Kubelet names a pod's cgroup after the pod UID. Every process of the pod
//! (sandbox "pause" included) sits below that cgroup and shares the pod's
//! network namespace, so any one of them is a handle on it. The parsing is
//! pure; [`find_pods`] is the thin scan of `/proc` around it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{self, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// The pod UID a cgroup path belongs to, if it is a pod's cgroup (or below
/// one), in either kubelet layout:
///
/// - systemd driver: a component `…kubepods[-<qos>]-pod<uid>.slice`, the
///   UID's dashes written as underscores (systemd reserves `-` for nesting);
/// - cgroupfs driver: a component `pod<uid>` below a `kubepods` component.
///
/// Both are matched wherever they sit in the path, so a kubelet with a
/// `--cgroup-root` (kind's `/kubelet.slice/kubelet-kubepods.slice/…`) or a
/// node inside a container (`/docker/<id>/kubepods/…`) is found too.
pub fn pod_uid_of_path(path: &str) -> Option<String> {
    let mut below_kubepods = false;
    for comp in path.split('/') {
        if let Some(stem) = comp.strip_suffix(".slice") {
            // `kubepods-burstable-pod<uid>.slice`: the last dash-separated
            // part is `pod<uid>`, an earlier one is `kubepods`.
            if let Some((parents, last)) = stem.rsplit_once('-')
                && parents.split('-').any(|p| p == "kubepods")
                && let Some(uid) = last.strip_prefix("pod")
            {
                let uid = uid.replace('_', "-").to_ascii_lowercase();
                if is_uid(&uid) {
                    return Some(uid);
                }
            }
        } else if comp == "kubepods" {
            below_kubepods = true;
        } else if below_kubepods
            && let Some(uid) = comp.strip_prefix("pod")
            && is_uid(uid)
        {
            return Some(uid.to_ascii_lowercase());
        }
    }
    None
}

/// The pod UID named by one line of `/proc/<pid>/cgroup`:
/// `0::<path>` (cgroup v2) or `<id>:<controllers>:<path>` (v1).
pub fn pod_uid_of_line(line: &str) -> Option<String> {
    let mut parts = line.splitn(3, ':');
    let (_id, _controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
    pod_uid_of_path(path)
}

/// The pod UID a whole `/proc/<pid>/cgroup` file belongs to (the first line
/// that names one; in a hybrid v1/v2 setup every hierarchy names the same).
pub fn pod_uid_of_cgroup_file(content: &str) -> Option<String> {
    content.lines().find_map(pod_uid_of_line)
}

/// Pod UIDs are RFC 4122 UUIDs (API pods) or 32 hex digits (static pods,
/// named after their config hash). Anything else is not a pod cgroup.
fn is_uid(s: &str) -> bool {
    (32..=36).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Upper bound on the `/proc` entries one scan looks at (the kernel's
/// `pid_max` limit is 2^22); a scan that would go past it fails rather than
/// running unbounded.
pub const MAX_PROC_ENTRIES: usize = 1 << 22;

/// A cgroup file is a few hundred bytes; reading stops here.
const MAX_CGROUP_FILE: u64 = 64 * 1024;

/// A pod's network namespace, held open (the namespace stays the same one
/// even if the process exits or its pid is reused).
#[derive(Debug)]
pub struct PodNetns {
    /// The process it was found through.
    pub pid: u32,
    /// `/proc/<pid>/ns/net`, open.
    pub ns: File,
    /// The namespace's inode (what `ip netns identify` compares).
    pub inode: u64,
}

/// Scans `proc` (normally `/proc`; the agent runs with `hostPID`) once and
/// returns, for each UID in `uids` that has a running process, that pod's
/// network namespace. UIDs without a process are absent from the result.
///
/// Processes come and go during the scan: one that vanishes (or whose files
/// cannot be read) is skipped. A pid reused between reading its cgroup and
/// opening its namespace is caught by reading the cgroup again after the
/// open.
pub fn find_pods(proc: &Path, uids: &BTreeSet<String>) -> Result<BTreeMap<String, PodNetns>> {
    let wanted: BTreeSet<String> = uids.iter().map(|u| u.to_ascii_lowercase()).collect();
    let mut found = BTreeMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let dir =
        std::fs::read_dir(proc).map_err(|source| Error::Io { what: "reading /proc", source })?;
    for (seen, entry) in dir.enumerate() {
        if seen >= MAX_PROC_ENTRIES {
            return Err(Error::ProcScanLimit { limit: MAX_PROC_ENTRIES });
        }
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let dir = entry.path();
        let Some(uid) = read_cgroup(&dir).as_deref().and_then(pod_uid_of_cgroup_file) else {
            continue;
        };
        if !wanted.contains(&uid) || found.contains_key(&uid) {
            continue;
        }
        let Ok(ns) = File::open(dir.join("ns/net")) else { continue };
        let Ok(meta) = ns.metadata() else { continue };
        // Still the same process? (Otherwise the pid was reused.)
        if read_cgroup(&dir).as_deref().and_then(pod_uid_of_cgroup_file).as_ref() != Some(&uid) {
            continue;
        }
        found.insert(uid, PodNetns { pid, ns, inode: meta.ino() });
        if found.len() == wanted.len() {
            break;
        }
    }
    Ok(found)
}

/// Every pod UID with a running process on this node (for `dsr-agent
/// cleanup`, which must look at every pod, not only the ones it knows).
pub fn all_pod_uids(proc: &Path) -> Result<BTreeSet<String>> {
    let dir =
        std::fs::read_dir(proc).map_err(|source| Error::Io { what: "reading /proc", source })?;
    let mut uids = BTreeSet::new();
    for (seen, entry) in dir.enumerate() {
        if seen >= MAX_PROC_ENTRIES {
            return Err(Error::ProcScanLimit { limit: MAX_PROC_ENTRIES });
        }
        let Ok(entry) = entry else { continue };
        if entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()).is_none() {
            continue;
        }
        if let Some(uid) = read_cgroup(&entry.path()).as_deref().and_then(pod_uid_of_cgroup_file) {
            uids.insert(uid);
        }
    }
    Ok(uids)
}

/// One pod's namespace; [`Error::PodNetnsNotFound`] when no process of the
/// pod runs (not started yet, or gone).
pub fn find_pod(proc: &Path, uid: &str) -> Result<PodNetns> {
    let uids = BTreeSet::from([uid.to_ascii_lowercase()]);
    find_pods(proc, &uids)?
        .into_values()
        .next()
        .ok_or_else(|| Error::PodNetnsNotFound { uid: uid.to_owned() })
}

/// `<dir>/cgroup`, or `None` when the process is gone or unreadable.
fn read_cgroup(dir: &Path) -> Option<String> {
    let path: PathBuf = dir.join("cgroup");
    let mut s = String::new();
    File::open(path).ok()?.take(MAX_CGROUP_FILE).read_to_string(&mut s).ok()?;
    Some(s)
}

/// Opens a network namespace file (`/proc/<pid>/ns/net`, a bind mount
/// under `/var/run/netns`).
pub(crate) fn open_ns(path: &Path) -> io::Result<(File, u64)> {
    let f = File::open(path)?;
    let ino = f.metadata()?.ino();
    Ok((f, ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c";
    const UID_US: &str = "0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c";
    const STATIC_UID: &str = "8b0e4e0c3c9a6c5c3b2c5f5e0d1a2b3c";

    #[test]
    fn paths() {
        let cases: &[(&str, Option<&str>)] = &[
            // systemd driver, every QoS class
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c.slice/cri-containerd-4f1c.scope",
                Some(UID),
            ),
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c.slice/crio-4f1c.scope",
                Some(UID),
            ),
            // guaranteed pods sit directly under kubepods.slice
            (
                "/kubepods.slice/kubepods-pod0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c.slice/cri-containerd-4f1c.scope",
                Some(UID),
            ),
            // the pod slice itself (the sandbox's cgroup on some runtimes)
            ("/kubepods.slice/kubepods-pod0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c.slice", Some(UID)),
            // kind / --cgroup-root=/kubelet
            (
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c.slice/cri-containerd-1.scope",
                Some(UID),
            ),
            // cgroupfs driver, every QoS class
            ("/kubepods/burstable/pod0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c/4f1c", Some(UID)),
            ("/kubepods/besteffort/pod0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c/4f1c", Some(UID)),
            ("/kubepods/pod0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c/4f1c", Some(UID)),
            // node inside a container
            (
                "/docker/ab12/kubepods/burstable/pod0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c/4f1c",
                Some(UID),
            ),
            // static pod: hash UID
            ("/kubepods/burstable/pod8b0e4e0c3c9a6c5c3b2c5f5e0d1a2b3c/4f1c", Some(STATIC_UID)),
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8b0e4e0c3c9a6c5c3b2c5f5e0d1a2b3c.slice",
                Some(STATIC_UID),
            ),
            // not pods
            ("/", None),
            ("/system.slice/containerd.service", None),
            ("/user.slice/user-1000.slice/session-3.scope", None),
            ("/kubepods.slice", None),
            ("/kubepods.slice/kubepods-burstable.slice", None),
            ("/kubepods/burstable", None),
            ("/kubepods", None),
            // `pod<uid>` outside kubepods, or not a UID
            ("/other/pod0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c/4f1c", None),
            ("/system.slice/foo-pod0b8e3c1a_5f2d_4c6e_9a7b_1d2e3f4a5b6c.slice", None),
            ("/kubepods/burstable/podcast/4f1c", None),
            ("/kubepods.slice/kubepods-podman.slice", None),
            ("/kubepods/burstable/pod0b8e3c1a-5f2d/4f1c", None),
        ];
        for (path, want) in cases {
            assert_eq!(pod_uid_of_path(path).as_deref(), *want, "{path}");
        }
    }

    #[test]
    fn lines_v1_and_v2() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-9.scope"
        );
        let v1 = format!("4:memory:/kubepods/burstable/pod{UID}/9");
        let v1_named = format!(
            "1:name=systemd:/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-9.scope"
        );
        let v1_multi = format!("5:cpu,cpuacct:/kubepods/pod{UID}/9");
        for line in [&v2, &v1, &v1_named, &v1_multi] {
            assert_eq!(pod_uid_of_line(line).as_deref(), Some(UID), "{line}");
        }
        for line in
            ["", "garbage", "0::", "0::/", "3:cpuset:/", "12:pids:/system.slice/sshd.service"]
        {
            assert_eq!(pod_uid_of_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn whole_files() {
        let hybrid = format!(
            "9:name=systemd:/\n8:pids:/kubepods/besteffort/pod{UID}/c1\n4:memory:/kubepods/besteffort/pod{UID}/c1\n0::/\n"
        );
        assert_eq!(pod_uid_of_cgroup_file(&hybrid).as_deref(), Some(UID));
        let host = "9:name=systemd:/\n4:memory:/process_api/06d2\n0::/\n";
        assert_eq!(pod_uid_of_cgroup_file(host), None);
        assert_eq!(pod_uid_of_cgroup_file(""), None);
    }

    /// A fake `/proc` in a temporary directory: a pid directory per
    /// process, some of them half gone.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("kdsr-proc-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn process(&self, pid: &str, cgroup: Option<&str>, ns: bool) {
            let d = self.0.join(pid);
            std::fs::create_dir_all(d.join("ns")).unwrap();
            if let Some(c) = cgroup {
                std::fs::write(d.join("cgroup"), c).unwrap();
            }
            if ns {
                std::fs::write(d.join("ns/net"), pid).unwrap();
            }
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn scan_skips_vanished_and_foreign_processes() {
        let p = FakeProc::new("scan");
        let other = "0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6d";
        // Prefix collision: a UID that extends ours is another pod.
        let longer = "0b8e3c1a-5f2d-4c6e-9a7b-1d2e3f4a5b6c0";
        p.process("1", Some("0::/init.scope\n"), true);
        p.process("self", Some(&format!("0::/kubepods/pod{UID}/x\n")), true);
        p.process("10", Some(&format!("0::/kubepods/pod{other}/x\n")), true);
        p.process("11", Some(&format!("0::/kubepods/pod{longer}/x\n")), true);
        // Vanished: no cgroup file, or cgroup but no namespace any more.
        p.process("20", None, true);
        p.process("21", Some(&format!("0::/kubepods/burstable/pod{UID}/x\n")), false);
        p.process(
            "30",
            Some(&format!("0::/kubepods.slice/kubepods-pod{UID_US}.slice/c.scope\n")),
            true,
        );
        std::fs::write(p.0.join("cmdline"), "").unwrap();

        // Every pod with a readable cgroup, for cleanup: pid 11's path
        // names no valid UID, "self" is no pid.
        let all = all_pod_uids(&p.0).unwrap();
        assert_eq!(all, BTreeSet::from([UID.to_owned(), other.to_owned()]));

        let found = find_pods(&p.0, &BTreeSet::from([UID.to_uppercase()])).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), [UID]);
        assert_eq!(found[UID].pid, 30);

        let found = find_pods(&p.0, &BTreeSet::from([UID.to_owned(), other.to_owned()])).unwrap();
        assert_eq!(found[other].pid, 10);
        assert_eq!(found[UID].pid, 30);

        match find_pod(&p.0, "ffffffff-ffff-ffff-ffff-ffffffffffff") {
            Err(Error::PodNetnsNotFound { uid }) => {
                assert_eq!(uid, "ffffffff-ffff-ffff-ffff-ffffffffffff")
            }
            other => panic!("expected PodNetnsNotFound, got {other:?}"),
        }
        assert!(find_pods(&p.0, &BTreeSet::new()).unwrap().is_empty());
    }
}
