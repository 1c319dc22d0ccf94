//! Setting up a broker connection from `[mqtt]`: rumqttc's options (TLS on ring, never the
//! process default or aws-lc; credentials; keep-alive; the session; the node's will) and the errors
//! that name the setting to fix. Both connections use it: the upstream one ([`super::mqtt`]) as
//! configured, the gateway's ([`super::gateway`]) with the local broker's address and none of
//! upstream's credentials.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, Transport};

use crate::config::MqttConfig;

/// Largest packet accepted from the broker; a bigger one ends the connection (MQTT 3.1.1 has no way
/// to tell the broker), so it is generous.
const MAX_INCOMING_PACKET: usize = 1 << 20;

/// Errors setting up the connection; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// No broker is configured (the connection is not started then; a caller slipped).
    #[error("no broker is configured")]
    NoBroker,
    /// A file named in `[mqtt]` could not be read.
    #[error("cannot read {field} {path}: {source}")]
    ReadFile {
        /// The setting.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file is not PEM.
    #[error("{field} {path}: {source}")]
    Pem {
        /// The setting.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{field} {path}: holds no PEM certificate")]
    NoCertificate {
        /// The setting.
        field: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate was refused.
    #[error("mqtt.ca_file {path}: {source}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// No CA to trust.
    #[error(
        "TLS settings for the MQTT broker: no system CA certificates found; set mqtt.ca_file to the broker's CA"
    )]
    NoSystemCa,
    /// rustls refused the TLS settings.
    #[error("TLS settings for the MQTT broker: {0}")]
    Tls(#[source] rustls::Error),
    /// rustls refused the client certificate.
    #[error("TLS settings for the MQTT broker: client certificate: {0}")]
    ClientCert(#[source] rustls::Error),
}

/// The topic the node's `online`/`offline` status is retained on.
pub fn status_topic(node: &str) -> String {
    format!("lichen/{node}/status")
}

/// Builds rumqttc's options from `[mqtt]`: TLS on ring, credentials, keep-alive, session, will.
pub fn options(config: &MqttConfig, node: &str) -> Result<MqttOptions, MqttError> {
    let url = config.broker.as_ref().ok_or(MqttError::NoBroker)?;
    let id = if config.client_id.is_empty() { node } else { &config.client_id };
    let mut o = MqttOptions::new(id, url.host(), url.port());
    o.set_keep_alive(Duration::from_secs(config.keep_alive_secs.max(5)))
        .set_clean_session(!config.persistent_session)
        .set_inflight(config.inflight.max(1))
        .set_max_packet_size(
            MAX_INCOMING_PACKET.max(config.max_payload.0 as usize + (64 << 10)),
            config.max_payload.0 as usize + (64 << 10) + 16,
        )
        .set_last_will(LastWill::new(status_topic(node), "offline", QoS::AtLeastOnce, true));
    if !config.username.is_empty() || !config.password_file.as_os_str().is_empty() {
        let password = if config.password_file.as_os_str().is_empty() {
            String::new()
        } else {
            read("mqtt.password_file", &config.password_file)
                .map(|b| String::from_utf8_lossy(&b).trim_end_matches(['\n', '\r']).to_owned())?
        };
        o.set_credentials(config.username.clone(), password);
    }
    if url.tls() {
        o.set_transport(Transport::Tls(rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(config)?))));
    }
    Ok(o)
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::ReadFile { field, path: path.to_owned(), source })
}

/// A rustls client config on the ring provider (never the process default, never aws-lc).
fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_err = |field, path: &Path| {
        let path = path.to_owned();
        move |source| MqttError::Pem { field, path, source }
    };
    let mut roots = rustls::RootCertStore::empty();
    if config.ca_file.as_os_str().is_empty() {
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(MqttError::NoSystemCa);
        }
    } else {
        let pem = read("mqtt.ca_file", &config.ca_file)?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(pem_err("mqtt.ca_file", &config.ca_file))?;
            roots.add(cert).map_err(|source| MqttError::BadCa { path: config.ca_file.clone(), source })?;
        }
        if roots.is_empty() {
            return Err(MqttError::NoCertificate { field: "mqtt.ca_file", path: config.ca_file.clone() });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(MqttError::Tls)?
        .with_root_certificates(roots);
    if config.client_cert_file.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let (cert_path, key_path) = (&config.client_cert_file, &config.client_key_file);
    let pem = read("mqtt.client_cert_file", cert_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(pem_err("mqtt.client_cert_file", cert_path))?;
    if chain.is_empty() {
        return Err(MqttError::NoCertificate { field: "mqtt.client_cert_file", path: cert_path.clone() });
    }
    let key = PrivateKeyDer::from_pem_slice(&read("mqtt.client_key_file", key_path)?)
        .map_err(pem_err("mqtt.client_key_file", key_path))?;
    builder.with_client_auth_cert(chain, key).map_err(MqttError::ClientCert)
}
