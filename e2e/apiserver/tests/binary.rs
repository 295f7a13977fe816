//! The `dsr-apiserver` process: listens on a wildcard address (so other
//! network namespaces can reach it), prints the bound address, writes a
//! kubeconfig a client can use, and stops on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_serves_on_a_wildcard_address_with_its_kubeconfig() {
    let dir = std::env::temp_dir().join(format!("dsr-apiserver-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_dsr-apiserver"))
            .args(["--listen", "0.0.0.0:0", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start dsr-apiserver"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line).await.unwrap().unwrap().unwrap();
    let addr: std::net::SocketAddr = line.trim().parse().expect("bound address on stdout");
    assert!(addr.ip().is_unspecified() && addr.port() != 0, "{addr}");

    let yaml = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(yaml.contains(&format!("server: http://127.0.0.1:{}", addr.port())), "{yaml}");
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&yaml).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = Client::try_from(config).unwrap();
    let namespaces: Api<Namespace> = Api::all(client);
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "kube-dsr"}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(names, ["kube-dsr"]);

    // SIGTERM ends it cleanly.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "dsr-apiserver ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
