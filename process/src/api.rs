//! The connection to the Kubernetes API server every controller process
//! opens first.

/// Why the API server could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("building a client from kubeconfig or the service account")]
    Client(#[source] kube::Error),
    #[error("reaching the API server")]
    Version(#[source] kube::Error),
}

/// A client from the kubeconfig or the pod's service account, and the
/// version of the API server it reached (asked once, so a wrong address
/// or credential fails here rather than in the first watch).
pub async fn connect() -> Result<(kube::Client, String), ConnectError> {
    let client = kube::Client::try_default().await.map_err(ConnectError::Client)?;
    let version = client.apiserver_version().await.map_err(ConnectError::Version)?;
    Ok((client, version.git_version))
}
