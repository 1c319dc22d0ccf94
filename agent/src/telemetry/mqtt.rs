//! The upstream broker connection ([`MqttClient`]): its setup for the session driver
//! ([`super::session`]): rumqttc's options from `[mqtt]` ([`super::options`]), the
//! upstream spool, the filters pods asked for, the bridge for incoming messages and the direct
//! (QoS 0) channel. The driver does the connecting, sending, acknowledging and reconnecting.
//!
//! The node announces itself on `lichen/<node>/status`: a retained `online` after each connect, a
//! retained `offline` on clean shutdown, and the same `offline` as the last will when the
//! connection dies without one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bridge::MqttBridge;
use super::options::{MqttError, options, status_topic};
use super::outbox::Handover;
use super::session::{self, Link, SessionError, Wake};
use super::spool::{Origin, SpoolMessage, TelemetrySpool};
use crate::config::MqttConfig;
use crate::retry::RetryBackoff;
use crate::topic::TopicFilter;

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
