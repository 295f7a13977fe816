//! Issue 3's two-replica proof: two real `dsr-operator` processes against
//! the stand-in. Exactly one holds the Lease and programs the service;
//! after SIGKILL of the holder the other takes the Lease within a stated
//! bound and programs a change made afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_dsr_apiserver::Server;
use serde_json::{Value, json};

const VIP: &str = "192.0.2.10";
const LEASE_NS: &str = "kube-dsr";
/// --lease-duration and --lease-grace given to both replicas.
const LEASE_DURATION: u64 = 4;
const LEASE_GRACE: u64 = 1;
/// After SIGKILL the lease must expire (LEASE_DURATION), the follower force
/// releases it and waits up to 1 s (kube-lease-manager's anti-collision
/// sleep) before applying; a few seconds on top for a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(LEASE_DURATION + 1 + 7);
/// For a leader to reconcile (500 ms debounce, cache sync, a few writes).
const PROGRAM_BOUND: Duration = Duration::from_secs(30);

/// A child process killed (SIGKILL) and reaped on drop; its output goes to
/// a log file that is printed when the test fails.
struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of {} ---", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `dsr-operator` binary of this checkout, built into the target
/// directory and profile this test was built with (`cargo test` builds
/// only this package's targets). `DSR_OPERATOR_BIN` overrides it.
fn operator_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DSR_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/<profile>/deps/operator_leader-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).expect("profile directory");
    let target_dir = profile_dir.parent().expect("target directory");
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The same selection as `make test`'s prebuild (`--workspace --bins`):
    // features are unified over the packages built, so `-p
    // kube-dsr-operator` alone would rebuild dependencies with other
    // features (minutes on a small machine) instead of finding them done.
    cmd.args(["build", "--quiet", "--locked", "--workspace", "--bins"])
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", target_dir);
    // The variables cargo sets for a test process (not the user's own
    // CARGO_* settings) change build fingerprints: with them this build
    // would redo, and the next plain `cargo build` undo, work every time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let set_by_cargo = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_", "__CARGO"]
            .iter()
            .any(|p| k.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref());
        if set_by_cargo {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let mut child = cmd.spawn().expect("run cargo build for dsr-operator");
    let deadline = Instant::now() + Duration::from_secs(1800);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for cargo") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("building dsr-operator took more than 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "cargo build --workspace --bins failed");
    let bin = profile_dir.join("dsr-operator");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_operator(bin: &Path, dir: &Path, identity: &str, http_port: u16) -> Child {
    let log = dir.join(format!("{identity}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--lease-namespace", LEASE_NS, "--identity", identity])
        .args(["--lease-duration", &LEASE_DURATION.to_string()])
        .args(["--lease-grace", &LEASE_GRACE.to_string()])
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env("RUST_LOG", "info,kube_dsr_operator=debug")
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // If this test process dies without unwinding, the kernel kills the
    // replicas too (the spawning thread is the test's, alive until its end).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let child = cmd.spawn().expect("start dsr-operator");
    Child { name: identity.into(), child, log }
}

/// `kubedsr_operator_leader` from a replica's /metrics, if it answers.
fn leader_gauge(port: u16) -> Option<i64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("kubedsr_operator_leader "))
        .and_then(|v| v.trim().parse().ok())
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}],
                   "addresses": [{"type": "InternalIP", "address": "198.51.100.1"}]},
    }))
    .unwrap()
}

fn ready_pod(name: &str, node: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "web", "image": "web"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .unwrap()
}

/// What the agent on `node` would report: the VIP configured in each pod
/// and delivered to it by the node's stage (the operator counts a pod ready
/// only with both).
async fn report(client: &Client, node: &str, pods: &[&Pod]) {
    let backends: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({"podUID": p.uid().unwrap(), "namespace": "default", "name": p.name_any(),
                   "configuredVips": [VIP], "deliveredVips": [VIP], "delivery": "NodeStage"})
        })
        .collect();
    let obj = json!({"apiVersion": "kubedsr.io/v1alpha1", "kind": "DsrNodeReport",
        "metadata": {"name": node},
        "spec": {"nodeName": node, "agentVersion": "test", "ingress": [], "backends": backends}});
    node_reports(client)
        .patch(node, &PatchParams::apply("dsr-agent").force(), &Patch::Apply(&obj))
        .await
        .expect("apply DsrNodeReport");
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt("dsr-operator").await.ok()??.spec?.holder_identity
}

fn slice_addresses(slice: &EndpointSlice) -> Vec<String> {
    let mut v: Vec<String> = slice.endpoints.iter().flat_map(|e| e.addresses.clone()).collect();
    v.sort();
    v
}

fn condition<'a>(svc: &'a DynamicObject, ty: &str) -> Option<&'a Value> {
    svc.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == ty)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_takeover_after_sigkill() {
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let bin = tokio::task::spawn_blocking(operator_binary).await.unwrap();
    phase("dsr-operator built");
    let dir = TempDir(std::env::temp_dir().join(format!("dsr-leader-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let server = Server::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    server.write_kubeconfig(dir.0.join("kubeconfig")).unwrap();
    let client = client_for(&server).await;

    // The cluster as kubelets and agents would have it.
    let nodes: Api<Node> = Api::all(client.clone());
    for n in ["n1", "n2"] {
        nodes.create(&PostParams::default(), &node(n)).await.unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p1 =
        pods.create(&PostParams::default(), &ready_pod("web-1", "n1", "10.0.1.1")).await.unwrap();
    let p2 =
        pods.create(&PostParams::default(), &ready_pod("web-2", "n2", "10.0.2.1")).await.unwrap();
    report(&client, "n1", &[&p1]).await;
    report(&client, "n2", &[&p2]).await;
    let svcs = dsr_services(&client, "default");
    let spec =
        json!({"vips": [VIP], "ports": [{"name": "http", "port": 80}], "selector": {"app": "web"}});
    svcs.create(&PostParams::default(), &dsr_service("web", spec)).await.unwrap();

    let ports = [free_port(), free_port()];
    let mut replicas = [
        Some(start_operator(&bin, &dir.0, "op-a", ports[0])),
        Some(start_operator(&bin, &dir.0, "op-b", ports[1])),
    ];

    // Exactly one holds the Lease, and only it reports itself leader.
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NS);
    let first = eventually(Duration::from_secs(30), "a Lease holder", || async {
        holder(&leases).await.filter(|h| h == "op-a" || h == "op-b")
    })
    .await;
    let (lead, follow) = if first == "op-a" { (0, 1) } else { (1, 0) };
    phase(&format!("{first} holds the Lease"));
    eventually(Duration::from_secs(15), "the holder's leader gauge", || async {
        (leader_gauge(ports[lead]) == Some(1)).then_some(())
    })
    .await;
    let follower = eventually(Duration::from_secs(15), "the follower's /metrics", || async {
        leader_gauge(ports[follow])
    })
    .await;
    assert_eq!(follower, 0, "the follower must not lead");
    // And it stays that way over more than two lease periods (renewals
    // must not hand the Lease back and forth).
    for _ in 0..(2 * LEASE_DURATION + 1) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(holder(&leases).await.as_deref(), Some(first.as_str()), "lease moved");
        assert_eq!(leader_gauge(ports[lead]), Some(1));
        assert_eq!(leader_gauge(ports[follow]), Some(0));
    }

    // The leader programs the service: backend set and status.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = eventually(PROGRAM_BOUND, "EndpointSlice web-v4-0", || async {
        slices.get_opt("web-v4-0").await.ok().flatten().filter(|s| s.endpoints.len() == 2)
    })
    .await;
    phase("EndpointSlice written");
    assert_eq!(slice_addresses(&slice), ["10.0.1.1", "10.0.2.1"]);
    assert_eq!(slice.labels()["endpointslice.kubernetes.io/managed-by"], "kubedsr.io");
    assert!(slice.owner_references().iter().any(|o| o.kind == "DsrService" && o.name == "web"));
    let svc = eventually(PROGRAM_BOUND, "status with 2/2 backends", || async {
        let s = svcs.get("web").await.ok()?;
        (s.data["status"]["readyBackends"] == 2 && s.data["status"]["observedGeneration"] == 1)
            .then_some(s)
    })
    .await;
    assert_eq!(svc.data["status"]["totalBackends"], 2);
    assert_eq!(condition(&svc, "Accepted").unwrap()["status"], "True");
    assert_eq!(condition(&svc, "BackendsReady").unwrap()["status"], "True");
    assert_eq!(condition(&svc, "Conflict").unwrap()["status"], "False");
    assert_eq!(holder(&leases).await.as_deref(), Some(first.as_str()), "no flapping");

    // SIGKILL the holder: no release, the Lease must expire.
    let killed = replicas[lead].take().unwrap();
    let pid = killed.pid();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    drop(killed);
    let killed_at = Instant::now();
    let successor = if first == "op-a" { "op-b" } else { "op-a" };
    eventually(TAKEOVER_BOUND, "the other replica to take the Lease", || async {
        (holder(&leases).await.as_deref() == Some(successor)).then_some(())
    })
    .await;
    let took = killed_at.elapsed();
    phase(&format!("{successor} took the Lease"));
    assert!(took <= TAKEOVER_BOUND, "takeover took {took:?}");
    eventually(Duration::from_secs(10), "the successor's leader gauge", || async {
        (leader_gauge(ports[follow]) == Some(1)).then_some(())
    })
    .await;

    // A change made afterwards is programmed by the new leader: a third
    // Ready pod whose VIP the agent reports, and a second port (generation 2).
    let p3 =
        pods.create(&PostParams::default(), &ready_pod("web-3", "n1", "10.0.1.2")).await.unwrap();
    report(&client, "n1", &[&p1, &p3]).await;
    let add_port =
        json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}});
    let svc = svcs.patch("web", &PatchParams::default(), &Patch::Merge(&add_port)).await.unwrap();
    assert_eq!(svc.metadata.generation, Some(2));
    let slice = eventually(PROGRAM_BOUND, "EndpointSlice with the new pod and port", || async {
        let s = slices.get_opt("web-v4-0").await.ok().flatten()?;
        let has_port = s.ports.iter().flatten().any(|p| p.port == Some(443));
        (s.endpoints.len() == 3 && has_port).then_some(s)
    })
    .await;
    phase("the successor programmed the change");
    assert_eq!(slice_addresses(&slice), ["10.0.1.1", "10.0.1.2", "10.0.2.1"]);
    let svc = eventually(PROGRAM_BOUND, "status at generation 2 with 3/3 backends", || async {
        let s = svcs.get("web").await.ok()?;
        (s.data["status"]["observedGeneration"] == 2 && s.data["status"]["readyBackends"] == 3)
            .then_some(s)
    })
    .await;
    assert_eq!(svc.data["status"]["totalBackends"], 3);
    assert_eq!(svc.data["status"]["summary"]["backends"], "3/3");
    assert_eq!(holder(&leases).await.as_deref(), Some(successor));
    eprintln!("takeover after SIGKILL took {took:?} (bound {TAKEOVER_BOUND:?})");
    drop(replicas);
    server.shutdown().await;
}
