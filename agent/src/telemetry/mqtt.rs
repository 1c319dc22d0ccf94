//! The upstream broker connection ([`MqttClient`]): its setup for the session driver
//! ([`super::session`]): rumqttc's options from `[mqtt]` (TLS on ring, credentials, the will), the
//! upstream spool, the filters pods asked for, the bridge for incoming messages and the direct
//! (QoS 0) channel. The driver does the connecting, sending, acknowledging and reconnecting.
//!
//! The node announces itself on `lichen/<node>/status`: a retained `online` after each connect, a
//! retained `offline` on clean shutdown, and the same `offline` as the last will when the
//! connection dies without one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bridge::MqttBridge;
use super::outbox::Handover;
use super::session::{self, Link, SessionError, Wake};
use super::spool::{Origin, SpoolMessage, TelemetrySpool};
use crate::config::MqttConfig;
use crate::retry::RetryBackoff;
use crate::topic::TopicFilter;

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

/// The upstream connection task; see the module docs.
pub struct MqttClient {
    config: MqttConfig,
    node: String,
    spool: Arc<TelemetrySpool>,
    bridge: Arc<MqttBridge>,
    direct: mpsc::Receiver<SpoolMessage>,
}

impl MqttClient {
    /// A client for `node` sending `spool`'s messages and `direct` (QoS 0, not spooled) ones.
    pub fn new(
        config: MqttConfig,
        node: String,
        spool: Arc<TelemetrySpool>,
        bridge: Arc<MqttBridge>,
        direct: mpsc::Receiver<SpoolMessage>,
    ) -> Self {
        MqttClient { config, node, spool, bridge, direct }
    }

    /// Connects, sends and reconnects until `cancel` fires, then announces `offline` and disconnects.
    /// Never returns early: a broker that is away or refuses is retried with back-off.
    pub async fn run(self, cancel: CancellationToken) {
        session::run(self, cancel).await
    }

    fn status(&self, word: &str) -> Handover {
        Handover {
            topic: status_topic(&self.node),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: word.into(),
        }
    }
}

impl Link for MqttClient {
    fn broker(&self) -> String {
        self.config.broker.as_ref().map(ToString::to_string).unwrap_or_default()
    }

    fn options(&self) -> Result<MqttOptions, MqttError> {
        let mut o = options(&self.config, &self.node)?;
        // rumqttc's window is above the spool's (and the status message's), so acknowledgements
        // of incoming messages are never stuck behind a full window of publishes (rumqttc reads no
        // requests then).
        o.set_inflight(self.config.inflight.max(1).saturating_add(2));
        Ok(o)
    }

    fn window(&self) -> usize {
        usize::from(self.config.inflight.max(1))
    }

    fn spool(&self) -> &Arc<TelemetrySpool> {
        &self.spool
    }

    fn backoff(&self) -> RetryBackoff {
        RetryBackoff::new(
            Duration::from_millis(self.config.reconnect_min_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        )
    }

    fn connected(&mut self, ack: &rumqttc::ConnAck) {
        tracing::info!(broker = %self.broker(), session_present = ack.session_present, spooled = self.spool.snapshot().entries, "connected to the MQTT broker");
        self.bridge.set_connected(true);
    }

    fn lost(&mut self, connected_for: Option<Duration>, error: &SessionError, delay: Duration) {
        let broker = self.broker();
        let retry_in_ms = delay.as_millis() as u64;
        match connected_for {
            Some(_) => {
                tracing::warn!(%broker, %error, retry_in_ms, "MQTT connection lost; messages are spooled until it is back")
            }
            None => {
                tracing::warn!(%broker, %error, retry_in_ms, "cannot connect to the MQTT broker; messages are spooled until it answers")
            }
        }
        self.bridge.set_connected(false);
    }

    fn hello(&self) -> Option<Handover> {
        Some(self.status("online"))
    }

    fn goodbye(&self) -> Option<Handover> {
        Some(self.status("offline"))
    }

    fn closed(&self) {
        tracing::info!("disconnected from the MQTT broker");
    }

    fn wanted(&self) -> BTreeSet<TopicFilter> {
        self.bridge.filters()
    }

    fn subscribed(&self, filters: &[TopicFilter], refused: bool) {
        for filter in filters {
            if refused {
                tracing::warn!(%filter, "the broker refused a subscription (check its ACL)");
            } else {
                tracing::info!(%filter, "subscribed");
            }
        }
    }

    fn sent(&mut self, m: &SpoolMessage) {
        if m.origin == Origin::LocalBroker {
            self.bridge.gateway_sent(&m.topic, &m.payload);
        }
    }

    async fn incoming(&mut self, p: &rumqttc::Publish) {
        self.bridge.deliver(&p.topic, &p.payload, p.retain, p.dup);
    }

    async fn woken(&mut self) -> Wake {
        tokio::select! {
            Some(m) = self.direct.recv() => Wake::Direct(m),
            _ = self.bridge.subscriptions_changed() => Wake::Subscriptions,
        }
    }

    fn dropped(&self) {
        self.bridge.dropped_offline();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerUrl;

    #[test]
    fn options_name_the_unreadable_file() {
        let config = MqttConfig {
            broker: Some(BrokerUrl::parse("mqtts://127.0.0.1").expect("valid")),
            ca_file: "/nonexistent/ca.pem".into(),
            ..Default::default()
        };
        let e = options(&config, "n").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("mqtt.ca_file") && e.contains("/nonexistent/ca.pem"), "{e}");
        let broker = Some(BrokerUrl::parse("mqtt://h:1").expect("valid"));
        let o = options(&MqttConfig { broker, ..Default::default() }, "pi-07").expect("options");
        assert_eq!((o.client_id(), o.clean_session()), ("pi-07".to_owned(), false));
    }
}
