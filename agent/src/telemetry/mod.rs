//! MQTT telemetry: modules publish by printing lines and receive by reading stdin
//! ([`bridge`]), the node reports itself ([`node`]), QoS 1 messages wait in a durable outbox
//! ([`spool`]) until the broker acknowledges them, and one task owns the connection ([`mqtt`]).
//! Both connections (upstream and the gateway's) are run by one session driver (`session`), with
//! the PUBACK-to-spool-entry matching in `outbox`.
//!
//! Nothing here runs, and the spool's tree is never created, unless `mqtt.broker` is set.
//!
//! Gateway mode ([`gateway`]) is a second connection, to a local broker, whose messages are
//! appended to the same spool with [`spool::Origin::LocalBroker`] and a topic prefix; the origin
//! tells the upstream connection to report them to the gateway as they are sent, which is how the
//! gateway recognises them when they come back (loop prevention). Messages from upstream for the
//! local broker wait in a second spool (a tree of its own) until the local broker has them.

pub mod bridge;
pub mod gateway;
pub mod mqtt;
pub mod node;
mod options;
mod outbox;
mod session;
pub mod spool;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::board::StatusBoard;
use crate::config::AgentConfig;
use crate::store::StateStore;
use bridge::MqttBridge;

/// Opens the spool and starts the connection, the group committer and node telemetry on `tracker`.
/// Returns the bridge pods use, or `None` with MQTT off.
pub fn start(
    config: &AgentConfig,
    store: Arc<dyn StateStore>,
    board: Arc<StatusBoard>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Option<Arc<MqttBridge>>, spool::SpoolError> {
    let m = &config.mqtt;
    if !m.enabled() {
        return Ok(None);
    }
    let spool = spool::TelemetrySpool::open(
        store.clone(),
        m.spool_max_bytes.0,
        Duration::from_millis(m.spool_flush_ms),
        m.spool_flush_messages,
    )?;
    let (bridge, direct) = MqttBridge::new(m, &config.node_name, spool.clone());
    tracker.spawn(spool.clone().run_committer(cancel.child_token()));
    // The gateway registers its upstream filters before the connection first subscribes.
    if m.gateway.enabled() {
        let down = spool::TelemetrySpool::open_tree(
            store.clone(),
            crate::store::SpoolTree::Local,
            m.gateway.down_spool_max_bytes.0,
            Duration::from_millis(m.spool_flush_ms),
            m.spool_flush_messages,
        )?;
        tracker.spawn(down.clone().run_committer(cancel.child_token()));
        let (gw, _) = gateway::Gateway::new(m, bridge.clone(), down);
        tracker.spawn(gw.run(cancel.child_token()));
        tracing::info!(local_broker = %m.gateway.local_broker.as_ref().map(ToString::to_string).unwrap_or_default(), mappings = m.gateway.mappings.len(), "MQTT gateway mode on");
    }
    let client = mqtt::MqttClient::new(m.clone(), config.node_name.clone(), spool, bridge.clone(), direct);
    tracker.spawn(client.run(cancel.child_token()));
    if m.telemetry_interval_secs > 0 {
        let node = node::NodeTelemetry {
            bridge: bridge.clone(),
            board,
            state_dir: config.state_dir.clone(),
            interval: Duration::from_secs(m.telemetry_interval_secs),
            qos: m.telemetry_qos,
        };
        tracker.spawn(node.run(cancel.child_token()));
    }
    tracing::info!(broker = %m.broker.as_ref().map(ToString::to_string).unwrap_or_default(), client_id = %m.client_id, "MQTT telemetry on");
    Ok(Some(bridge))
}
