//! The control socket: how the operator's `lichen` commands reach the running agent (edge floor).
//!
//! [`protocol`] holds the typed messages, [`report`] what `lichen status` shows and how it is read
//! from the store, [`server`] the agent's side. The client side is the `cli` layer's.

pub mod protocol;
pub mod report;
pub mod server;

pub use protocol::{ControlError, ControlRequest, ControlResponse};
pub use server::Control;
