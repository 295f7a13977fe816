//! The real `dsr-agent` against the API server stand-in, through its start
//! and its stop: an agent whose Node is not registered yet waits for it
//! (says so, stays not ready) instead of exiting; SIGTERM ends it promptly,
//! whether it is still waiting or running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube_dsr_e2e::cluster::{binary, ready_node, set_ready};

/// A scratch directory (kubeconfig, and the agent's pin directory: with
/// no service to program it never pins anything).
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("kdsr-lifecycle-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Agent {
    child: Child,
    log: std::path::PathBuf,
    http: SocketAddr,
}

impl Agent {
    fn start(node: &str, kubeconfig: &std::path::Path, pins: &Scratch) -> Agent {
        // A free port for its HTTP endpoints.
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let log = std::env::temp_dir().join(format!("kdsr-lifecycle-{node}-{}.log", http.port()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary("dsr-agent").unwrap())
            .args(["--node-name", node, "--http-addr", &http.to_string(), "--bpffs-dir"])
            .arg(&pins.0)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube_client=warn,kube_runtime=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Agent { child, log, http }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The status code of `/readyz`, or `None` while nothing listens.
    fn ready(&self) -> Option<u16> {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    }

    /// Sends SIGTERM and waits for the exit; returns how long it took.
    fn terminate(&mut self) -> Duration {
        let t = Instant::now();
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit status {status}\n{}", self.log());
                return t.elapsed();
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no exit after SIGTERM\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn wait(what: &str, agent: &Agent, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waits_for_its_node_and_stops_promptly_on_sigterm() {
    let server = kube_dsr_apiserver::Server::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = Scratch::new("kubeconfig");
    let kubeconfig = dir.0.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let nodes: Api<Node> = Api::all(client);

    // Its Node does not exist: it says so, keeps waiting, is not ready.
    let pins = Scratch::new("pins-1");
    let mut agent = Agent::start("late-node", &kubeconfig, &pins);
    wait("the agent says it waits for its Node", &agent, || {
        agent.log().contains("my Node does not exist yet")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.ready(), Some(503), "not ready while waiting\n{}", agent.log());
    assert!(agent.child.try_wait().unwrap().is_none(), "it did not exit\n{}", agent.log());

    // The Node is registered: it starts, reports and becomes ready.
    nodes
        .create(&PostParams::default(), &ready_node("late-node", serde_json::json!({})).unwrap())
        .await
        .unwrap();
    set_ready(&nodes, "late-node").await.unwrap();
    wait("the agent becomes ready", &agent, || agent.ready() == Some(200));
    assert!(agent.log().contains("my Node exists now"), "{}", agent.log());
    let took = agent.terminate();
    eprintln!("a running agent stopped {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(10), "{took:?}\n{}", agent.log());

    // SIGTERM while still waiting for a Node: it stops at once, cleanly.
    let pins = Scratch::new("pins-2");
    let mut waiting = Agent::start("never-node", &kubeconfig, &pins);
    wait("the second agent waits", &waiting, || {
        waiting.log().contains("my Node does not exist yet")
    });
    let took = waiting.terminate();
    eprintln!("a waiting agent stopped {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(10), "{took:?}\n{}", waiting.log());
    assert!(waiting.log().contains("shutting down before the agent started"), "{}", waiting.log());
    server.shutdown().await;
}
