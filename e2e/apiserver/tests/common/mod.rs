//! Shared by the integration tests: a server on an ephemeral port and a
//! real kube client built from the kubeconfig it serves.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use kube_dsr_apiserver::{Config, Handle, Server};

pub async fn start() -> (Handle, Client) {
    start_with(Config::default()).await
}

pub async fn start_with(config: Config) -> (Handle, Client) {
    let server = Server::start_with(config).await.expect("start the stand-in");
    let client = client_for(&server).await;
    (server, client)
}

pub async fn client_for(server: &Handle) -> Client {
    let kc = Kubeconfig::from_yaml(&server.kubeconfig()).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client")
}

pub fn dsr_services(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubedsr.io", "v1alpha1", "DsrService");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

pub fn node_reports(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubedsr.io", "v1alpha1", "DsrNodeReport");
    Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
}

/// A DsrService object from its spec.
pub fn dsr_service(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kubedsr.io/v1alpha1",
        "kind": "DsrService",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("DsrService object")
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message from crds/src/messages.rs, by constant name (the CRD's CEL
/// rules carry the same text).
pub fn crd_message(constant: &str) -> String {
    let src = include_str!("../../../../crds/src/messages.rs");
    let start = src
        .find(&format!("pub const {constant}: &str ="))
        .unwrap_or_else(|| panic!("{constant} not in messages.rs"));
    let rest = &src[start..];
    let open = rest.find('"').expect("string literal") + 1;
    let close = rest[open..].find('"').expect("closing quote") + open;
    rest[open..close].to_string()
}
