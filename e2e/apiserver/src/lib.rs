//! `kube-dsr-apiserver`: test equipment, never shipped. An in-memory
//! stand-in for the Kubernetes API server that speaks the REST and watch
//! protocol kube-rs uses, over plain HTTP without authentication, for the
//! kinds kube-dsr touches (see DESIGN.md, "Test equipment").
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let server = kube_dsr_apiserver::Server::start("127.0.0.1:0".parse()?).await?;
//! server.write_kubeconfig("/tmp/kubeconfig")?; // KUBECONFIG for child processes
//! println!("{}", server.url());
//! # Ok(()) }
//! ```

pub mod events;
pub mod http;
pub mod managed;
pub mod openapi;
pub mod patch;
mod proto;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod service;
pub mod store;
pub mod table;
mod util;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::http::Shared;
use crate::store::Store;

/// Settings; `Config::default()` listens on an ephemeral loopback port.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Watch events retained; a watch from an older resourceVersion gets
    /// `410 Gone`.
    pub history: usize,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history: 10_000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// The kubeconfig for a server at `url` (no credentials, namespace `default`).
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: dsr-apiserver\n  cluster:\n    server: {url}\nusers:\n- name: dsr-apiserver\n  user: {{}}\ncontexts:\n- name: dsr-apiserver\n  context:\n    cluster: dsr-apiserver\n    user: dsr-apiserver\n    namespace: default\ncurrent-context: dsr-apiserver\n"
    )
}

pub struct Server;

impl Server {
    /// Starts serving on `listen` (port 0 picks one) on the current Tokio runtime.
    pub async fn start(listen: SocketAddr) -> std::io::Result<Handle> {
        Self::start_with(Config { listen, ..Config::default() }).await
    }

    pub async fn start_with(config: Config) -> std::io::Result<Handle> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let (store, changes) = Store::new(config.history);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changes,
            bookmark_interval: config.bookmark_interval,
        });
        let app = axum::Router::new().fallback({
            let shared = Arc::clone(&shared);
            move |method, uri, headers, body| {
                http::handle(Arc::clone(&shared), method, uri, headers, body)
            }
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(Handle { addr, shared, stop: Some(stop_tx), task: Some(task) })
    }
}

/// A running server; dropping it stops it (open watches end).
pub struct Handle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Handle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`; with a wildcard listen address, the loopback one.
    pub fn url(&self) -> String {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{a}")
    }

    /// A kubeconfig pointing at [`Handle::url`].
    pub fn kubeconfig(&self) -> String {
        kubeconfig(&self.url())
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().expect("store lock").resource_version()
    }

    /// Forgets the watch history: every watch resuming from an earlier
    /// resourceVersion gets `410 Gone` (as after etcd compaction).
    pub fn compact(&self) {
        self.shared.store.lock().expect("store lock").compact();
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
