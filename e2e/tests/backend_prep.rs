//! Backend preparation against real namespaces, cgroups and processes:
//! finding a pod's namespace from its UID in both kubelet cgroup layouts,
//! putting VIPs on its `lo` and the ARP sysctls, and undoing exactly what
//! was added.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::Path,
};

use anyhow::Result;
use kube_dsr_agent::netns::{self, Backend, Netns, Observed, Target};
use kube_dsr_e2e::{
    netns::{NetNs, sh},
    pods::{FakePod, Layout, fake_uid, ns_inode, v1_root, v2_root},
    require_root,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `lo`'s addresses as `ip` prints them (address/prefix and label only).
fn lo_addrs(ns: &NetNs) -> Result<BTreeSet<String>> {
    let out = sh(&format!("ip -n {} -o addr show dev lo", ns.name))?;
    Ok(out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // `1: lo    inet 192.0.2.5/32 scope global lo:kdsr\       valid_lft …`:
            // for IPv4 the label is the word carrying the `\`.
            let label = f.iter().find_map(|w| w.strip_suffix('\\')).unwrap_or("");
            format!("{} {}", f[3], if f[2] == "inet" { label } else { "" })
        })
        .collect())
}

fn sysctl(ns: Option<&NetNs>, key: &str) -> Result<u32> {
    let cmd = format!("sysctl -n {key}");
    let out = match ns {
        Some(ns) => ns.exec(&cmd)?,
        None => sh(&cmd)?,
    };
    Ok(out.trim().parse()?)
}

const ARP_KEYS: [&str; 4] = [
    "net.ipv4.conf.all.arp_ignore",
    "net.ipv4.conf.all.arp_announce",
    "net.ipv4.conf.lo.arp_ignore",
    "net.ipv4.conf.lo.arp_announce",
];

fn host_arp() -> Result<Vec<u32>> {
    ARP_KEYS.iter().map(|k| sysctl(None, k)).collect()
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn discovery_finds_pods_in_both_layouts() -> Result<()> {
    require_root();
    let v2 = v2_root();
    let v1 = v1_root().unwrap_or_else(|| v2.clone());
    let (ns_a, ns_b, ns_c) = (NetNs::new("kdsrA")?, NetNs::new("kdsrB")?, NetNs::new("kdsrC")?);
    let (uid_a, uid_b, uid_absent) = (fake_uid(1), fake_uid(2), fake_uid(3));
    // Differs from uid_a in its last digit only.
    let uid_c = format!("{}f", &uid_a[..35]);
    assert_ne!(uid_c, uid_a);

    let pod_a = FakePod::start(&ns_a, &uid_a, Layout::Systemd, &v2)?;
    let pod_b = FakePod::start(&ns_b, &uid_b, Layout::Cgroupfs, &v1)?;
    let pod_c = FakePod::start(&ns_c, &uid_c, Layout::Cgroupfs, &v2)?;
    let line_a = fs::read_to_string(format!("/proc/{}/cgroup", pod_a.pid()))?;
    let line_b = fs::read_to_string(format!("/proc/{}/cgroup", pod_b.pid()))?;
    eprintln!("pod A cgroup:\n{line_a}pod B cgroup:\n{line_b}");
    assert!(line_a.contains(&format!("kubepods-burstable-pod{}.slice", uid_a.replace('-', "_"))));
    assert!(line_b.contains(&format!("/kubepods/besteffort/pod{uid_b}/")));

    let uids = BTreeSet::from([uid_a.clone(), uid_b.clone(), uid_absent.clone()]);
    let found = netns::find_pods(Path::new("/proc"), &uids)?;
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[&uid_a].inode, ns_inode(&ns_a)?);
    assert_eq!(found[&uid_a].pid, pod_a.pid());
    assert_eq!(found[&uid_b].inode, ns_inode(&ns_b)?);
    assert!(!found.contains_key(&uid_absent));

    let c = netns::find_pod(Path::new("/proc"), &pod_c.uid)?;
    assert_eq!(c.inode, ns_inode(&ns_c)?, "a UID one digit away is another pod");
    assert!(matches!(
        netns::find_pod(Path::new("/proc"), &uid_absent),
        Err(kube_dsr_agent::Error::PodNetnsNotFound { .. })
    ));

    // hostNetwork pods: the agent's own namespace.
    assert_eq!(Netns::host()?.inode(), fs::metadata("/proc/self/ns/net")?.ino());
    Ok(())
}

/// What the module relies on, checked on this kernel: after `setns`, a
/// thread's `/proc/sys/net` is its new namespace's, while `/proc/self`
/// keeps naming the process (so `/proc/thread-self` is the one that moved).
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn proc_sys_follows_the_thread_namespace() -> Result<()> {
    require_root();
    let ns = NetNs::new("kdsrS")?;
    let host = sysctl(None, "net.ipv4.conf.all.arp_ignore")?;
    let inside = if host == 2 { 1 } else { 2 };
    ns.exec(&format!("sysctl -qw net.ipv4.conf.all.arp_ignore={inside}"))?;
    let handle = Netns::open(Path::new(&format!("/var/run/netns/{}", ns.name)), ns.name.clone())?;
    let (read, thread_ns, self_ns) = handle.run(|| {
        let v = fs::read_to_string("/proc/sys/net/ipv4/conf/all/arp_ignore").unwrap();
        let t = fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let s = fs::metadata("/proc/self/ns/net").unwrap().ino();
        Ok((v.trim().parse::<u32>().unwrap(), t, s))
    })?;
    assert_eq!(read, inside, "/proc/sys/net read on the thread shows the namespace's value");
    assert_eq!(thread_ns, ns_inode(&ns)?);
    assert_eq!(
        self_ns,
        fs::metadata("/proc/self/ns/net")?.ino(),
        "/proc/self still names the process"
    );
    assert_ne!(self_ns, thread_ns);
    assert_eq!(sysctl(None, "net.ipv4.conf.all.arp_ignore")?, host, "the host is untouched");
    assert_eq!(
        fs::metadata("/proc/thread-self/ns/net")?.ino(),
        self_ns,
        "the caller's thread never moved"
    );
    Ok(())
}

fn observe(ns: &Netns, target: &Target) -> Result<BTreeMap<Target, Observed>> {
    Ok(BTreeMap::from([(target.clone(), ns.observe()?)]))
}

#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn prepare_then_undo_touches_only_ours() -> Result<()> {
    require_root();
    let host_before = host_arp()?;
    let ns = NetNs::new("kdsrP")?;
    // Addresses someone else put on lo, one of them a VIP we will want too.
    ns.exec("ip addr add 198.51.100.7/32 dev lo && ip addr add 2001:db8::7/128 dev lo nodad")?;
    ns.exec("ip addr add 192.0.2.20/32 dev lo && ip addr add 2001:db8::20/128 dev lo nodad")?;
    let before = lo_addrs(&ns)?;
    let arp_before: Vec<u32> =
        ARP_KEYS.iter().map(|k| sysctl(Some(&ns), k)).collect::<Result<_>>()?;
    assert_eq!(arp_before, [0, 0, 0, 0], "a fresh namespace has the kernel defaults");

    let pod = FakePod::start(&ns, &fake_uid(10), Layout::Systemd, &v2_root())?;
    let handle = Netns::from_pod(&pod.uid, netns::find_pod(Path::new("/proc"), &pod.uid)?);
    assert_eq!(handle.inode(), ns_inode(&ns)?);

    let vips = ["192.0.2.10", "2001:db8::10", "192.0.2.20", "2001:db8::20"];
    let backends = [Backend {
        uid: pod.uid.clone(),
        host_network: false,
        vips: vips.iter().map(|v| ip(v)).collect(),
    }];
    let target = backends[0].target();
    let desired = netns::desired(&backends);

    // Before: nothing of ours, our VIPs missing, the foreign one reported.
    let observed = observe(&handle, &target)?;
    let configured = |obs: &BTreeMap<Target, Observed>| -> Vec<(String, bool)> {
        netns::report(&backends, obs)
            .into_iter()
            .map(|r| (r.vip.to_string(), r.configured))
            .collect()
    };
    assert_eq!(
        configured(&observed),
        [
            ("192.0.2.10".into(), false),
            ("192.0.2.20".into(), false), // present, but ARP sysctls not yet set
            ("2001:db8::10".into(), false),
            ("2001:db8::20".into(), true),
        ]
    );

    // Prepare.
    let plans = netns::plan(&desired, &observed);
    assert_eq!(
        plans[0].add,
        [ip("192.0.2.10"), ip("2001:db8::10")],
        "foreign copies are not added again"
    );
    assert_eq!(plans[0].sysctls.len(), 4);
    let after = handle.apply(&plans[0])?;
    let observed = BTreeMap::from([(target.clone(), after)]);
    assert!(configured(&observed).iter().all(|(_, ok)| *ok), "{:?}", configured(&observed));
    let ours: BTreeSet<String> =
        observed[&target].addrs.iter().filter(|a| a.ours).map(|a| a.addr.to_string()).collect();
    assert_eq!(ours, BTreeSet::from(["192.0.2.10".to_string(), "2001:db8::10".to_string()]));

    // Independently, through ip and sysctl.
    let prepared = lo_addrs(&ns)?;
    let mut want = before.clone();
    want.insert("192.0.2.10/32 lo:kdsr".into());
    want.insert("2001:db8::10/128 ".into());
    assert_eq!(prepared, want);
    let arp: Vec<u32> = ARP_KEYS.iter().map(|k| sysctl(Some(&ns), k)).collect::<Result<_>>()?;
    assert_eq!(arp, [1, 2, 1, 2]);
    assert_eq!(host_arp()?, host_before, "the host's sysctls are untouched");

    // Converged: a second round has nothing to do.
    let again = netns::plan(&desired, &observe(&handle, &target)?);
    assert!(again[0].is_noop(), "{again:?}");

    // Undo: the pod stops being a backend.
    let plans = netns::plan(&BTreeMap::new(), &observe(&handle, &target)?);
    assert_eq!(plans[0].remove, [ip("192.0.2.10"), ip("2001:db8::10")]);
    let after = handle.apply(&plans[0])?;
    assert!(after.addrs.iter().all(|a| !a.ours));
    assert_eq!(
        lo_addrs(&ns)?,
        before,
        "exactly what was added is gone; the foreign addresses, VIPs included, stay"
    );
    let arp: Vec<u32> = ARP_KEYS.iter().map(|k| sysctl(Some(&ns), k)).collect::<Result<_>>()?;
    assert_eq!(arp, [1, 2, 1, 2], "sysctls are not reverted (DESIGN-NOTE.md)");
    assert!(netns::plan(&BTreeMap::new(), &observe(&handle, &target)?)[0].is_noop());
    assert_eq!(host_arp()?, host_before);
    Ok(())
}

/// Teardown leaves nothing behind: no namespace, cgroup or process.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn fake_pods_are_torn_down() -> Result<()> {
    require_root();
    let (name, pid, dirs) = {
        let ns = NetNs::new("kdsrT")?;
        let pod = FakePod::start(
            &ns,
            &fake_uid(20),
            Layout::Cgroupfs,
            &v1_root().unwrap_or_else(v2_root),
        )?;
        (ns.name.clone(), pod.pid(), pod.dirs.clone())
    };
    assert!(!Path::new(&format!("/var/run/netns/{name}")).exists());
    assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    Ok(())
}

/// Whole rounds over several pods: one missing pod does not stop the
/// others, and a pod that stops being a backend loses only our VIPs.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn converge_rounds_over_pods() -> Result<()> {
    require_root();
    let host_before = host_arp()?;
    let (ns1, ns2) = (NetNs::new("kdsrR")?, NetNs::new("kdsrR")?);
    ns2.exec("ip addr add 192.0.2.30/32 dev lo")?;
    let (before1, before2) = (lo_addrs(&ns1)?, lo_addrs(&ns2)?);
    let pod1 = FakePod::start(&ns1, &fake_uid(30), Layout::Systemd, &v2_root())?;
    let pod2 =
        FakePod::start(&ns2, &fake_uid(31), Layout::Cgroupfs, &v1_root().unwrap_or_else(v2_root))?;
    let missing = fake_uid(32);
    let backend = |uid: &str, vips: &[&str]| Backend {
        uid: uid.into(),
        host_network: false,
        vips: vips.iter().map(|v| ip(v)).collect(),
    };
    let proc = Path::new("/proc");
    let configured = |round: &netns::Round| -> Vec<(String, String, bool)> {
        round.reports.iter().map(|r| (r.uid.clone(), r.vip.to_string(), r.configured)).collect()
    };

    // Round 1: both pods are backends; a third has no process.
    let backends = [
        backend(&pod1.uid, &["192.0.2.30", "2001:db8::30"]),
        backend(&pod2.uid, &["192.0.2.30"]),
        backend(&missing, &["192.0.2.30"]),
    ];
    let round = netns::converge(proc, &backends, &[]);
    assert!(round.scan.is_none());
    assert_eq!(round.errors.len(), 1, "{:?}", round.errors);
    assert!(matches!(
        round.errors.get(&Target::Pod(missing.clone())),
        Some(kube_dsr_agent::Error::PodNetnsNotFound { .. })
    ));
    let mut want = vec![
        (pod1.uid.clone(), "192.0.2.30".to_string(), true),
        (pod1.uid.clone(), "2001:db8::30".to_string(), true),
        (pod2.uid.clone(), "192.0.2.30".to_string(), true),
        (missing.clone(), "192.0.2.30".to_string(), false),
    ];
    assert_eq!(configured(&round), want);
    assert!(lo_addrs(&ns1)?.contains("192.0.2.30/32 lo:kdsr"));
    assert!(lo_addrs(&ns1)?.contains("2001:db8::30/128 "));
    // pod2 already had the VIP (someone else's): reported, not duplicated.
    assert_eq!(lo_addrs(&ns2)?, before2);

    // Round 2: same input, nothing changes.
    let again = netns::converge(proc, &backends, &[]);
    assert_eq!(configured(&again), want);

    // Round 3: pod1 keeps only its IPv6 VIP; pod2 is no longer a backend.
    let backends = [backend(&pod1.uid, &["2001:db8::30"])];
    let round = netns::converge(proc, &backends, std::slice::from_ref(&pod2.uid));
    assert!(round.errors.is_empty(), "{:?}", round.errors);
    want = vec![(pod1.uid.clone(), "2001:db8::30".to_string(), true)];
    assert_eq!(configured(&round), want);
    let mut want1 = before1.clone();
    want1.insert("2001:db8::30/128 ".into());
    assert_eq!(lo_addrs(&ns1)?, want1);
    assert_eq!(lo_addrs(&ns2)?, before2, "the unmarked VIP on pod2 stays");

    // Round 4: no backends left.
    let round = netns::converge(proc, &[], &[pod1.uid.clone(), pod2.uid.clone()]);
    assert!(round.errors.is_empty() && round.reports.is_empty(), "{round:?}");
    assert_eq!(lo_addrs(&ns1)?, before1);
    assert_eq!(lo_addrs(&ns2)?, before2);
    assert_eq!(host_arp()?, host_before, "the node's namespace was only read");
    Ok(())
}

/// A VIP on a `lo` that is down would receive nothing: the namespace is
/// reported not configured and nothing is added.
#[test]
#[cfg_attr(not(privileged_tests), ignore = "needs root: BPF, XDP, network namespaces")]
fn loopback_down_is_refused() -> Result<()> {
    require_root();
    let ns = NetNs::new("kdsrD")?;
    ns.exec("ip link set lo down")?;
    let handle = Netns::open(Path::new(&format!("/var/run/netns/{}", ns.name)), ns.name.clone())?;
    let backends = [Backend {
        uid: "u".into(),
        host_network: false,
        vips: BTreeSet::from([ip("192.0.2.40")]),
    }];
    let target = backends[0].target();
    let observed = observe(&handle, &target)?;
    assert!(!observed[&target].lo_up);
    let plans = netns::plan(&netns::desired(&backends), &observed);
    assert!(matches!(handle.apply(&plans[0]), Err(kube_dsr_agent::Error::LoopbackDown)));
    assert!(!lo_addrs(&ns)?.iter().any(|a| a.starts_with("192.0.2.40")));
    assert_eq!(sysctl(Some(&ns), "net.ipv4.conf.all.arp_ignore")?, 0, "nothing was written");
    let observed = observe(&handle, &target)?;
    assert!(!netns::report(&backends, &observed)[0].configured);
    Ok(())
}
