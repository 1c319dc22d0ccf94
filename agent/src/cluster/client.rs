//! The one kube client builder: from a kubeconfig file or a parsed kubeconfig, with the agent's
//! network timeouts and the API metrics layer. Every room that talks to the API server (the node,
//! pods, bootstrap, rotation, the kubelet API's reviews) gets its client here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use kube::config::KubeconfigError;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<ClientError>,
    },
    /// The kubeconfig could not be parsed or resolved.
    #[error("{0}")]
    Kubeconfig(#[source] KubeconfigError),
    /// The HTTP client could not be built from it (TLS material, proxy settings).
    #[error("{0}")]
    Build(#[source] kube::Error),
}

/// A client from a kubeconfig file (rustls, ring; no OpenSSL).
pub async fn connect(kubeconfig: &Path) -> Result<Client, ClientError> {
    let in_file = |source| ClientError::File { path: kubeconfig.to_owned(), source: Box::new(source) };
    let kc =
        kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| in_file(ClientError::Kubeconfig(e)))?;
    client_for(kc).await.map_err(in_file)
}

/// A client for a parsed kubeconfig, with the agent's network timeouts.
pub async fn client_for(kc: kube::config::Kubeconfig) -> Result<Client, ClientError> {
    let mut config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(ClientError::Kubeconfig)?;
    // An edge link that silently drops packets must not hang a heartbeat for minutes.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(30));
    config.write_timeout = Some(Duration::from_secs(30));
    // Every request is counted and timed for /metrics (lichen_api_request_*).
    let builder = kube::client::ClientBuilder::try_from(config).map_err(ClientError::Build)?;
    Ok(builder.with_layer(&crate::metrics::ApiMetricsLayer).build())
}
