//! The `lichen:mqtt` host functions: modules that want direct control publish, subscribe and
//! receive through imports instead of stdout and stdin.
//!
//! The imports (module name `lichen:mqtt`, every argument an `i32`, every result an errno-style
//! `i32`, 0 for success; the numbers are WASI preview 1's `errno`):
//!
//! ```text
//! publish(topic_ptr, topic_len, payload_ptr, payload_len, qos, retain) -> errno
//! subscribe(filter_ptr, filter_len) -> errno
//! receive(topic_ptr, topic_cap, payload_ptr, payload_cap, lengths_ptr, timeout_ms) -> errno
//! ```
//!
//! `receive` writes the topic and payload into the two buffers and their lengths as two
//! little-endian `u32` at `lengths_ptr`. It waits at most `timeout_ms` (0 polls, -1 waits until a
//! message comes) and returns `again` when none came. A message larger than the buffers is kept
//! for the next call and `nobufs` is returned with the lengths it needs. Waiting is an `await` on
//! the agent's tokio runtime, never a blocked thread; a stopped container or a run deadline drops
//! the wait like any other.
//!
//! A module is hostile until proven otherwise: every pointer and length is checked against its
//! linear memory (`fault`), lengths against the limits before anything is copied (`msgsize`,
//! `nametoolong`), and nothing a module passes can panic the host. What topics a module may use
//! is decided by the [`GuestMqttPort`] behind it (the pod's annotations), not here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use wasmtime::{Caller, Extern, Linker, Memory};

use super::ContainerCtx;

/// The import module name.
pub const MODULE: &str = "lichen:mqtt";
/// The longest topic or filter accepted (MQTT's own limit).
pub const MAX_TOPIC: usize = 65_535;

/// Results of the host functions: WASI preview 1 `errno` values, so a guest can reuse its
/// libc's names for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Errno {
    /// Done.
    Success = 0,
    /// `subscribe`: the container already holds the most subscriptions allowed (16).
    TooBig = 1,
    /// The topic or filter is outside what the pod's annotations grant.
    Acces = 2,
    /// Nothing arrived in time (`receive`), or the pod's rate limit holds the message back
    /// (`publish`): try again later.
    Again = 6,
    /// A pointer and length do not lie inside the module's memory, or it exports none.
    Fault = 21,
    /// A malformed argument: QoS other than 0 or 1, a wildcard in a publish topic, a bad filter,
    /// text that is not UTF-8, a timeout below -1.
    Inval = 28,
    /// The spool could not store the message (a disk error).
    Io = 29,
    /// The payload is larger than `mqtt.max_payload`.
    Msgsize = 35,
    /// The topic or filter is longer than MQTT allows.
    Nametoolong = 37,
    /// `receive`'s buffers are too small; the lengths needed were written, the message is kept.
    Nobufs = 42,
    /// QoS 0 while the broker is away (QoS 0 is never spooled).
    Notconn = 53,
}

/// One incoming message for a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMessage {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// What the host functions call into: the pod's MQTT binding, which checks topics against its
/// annotations and applies its rate limit and payload limit.
pub trait GuestMqttPort: Send + Sync {
    /// Publishes a message with QoS 0 or 1.
    fn publish(&self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Result<(), Errno>;
    /// Adds a subscription whose messages arrive in this container's inbox.
    fn subscribe(&self, filter: &str) -> Result<(), Errno>;
}

/// A container's `lichen:mqtt` connection, or why it has none.
pub struct GuestMqtt {
    link: Link,
}

/// The connection, or the reason there is none (a state, not a failure of a call).
enum Link {
    Open(GuestLink),
    Denied(String),
}

struct GuestLink {
    port: Arc<dyn GuestMqttPort>,
    inbox: mpsc::Receiver<GuestMessage>,
    /// A message that did not fit the module's buffers, kept for its next `receive`.
    held: Option<GuestMessage>,
}

impl GuestMqtt {
    /// A connection through `port`, receiving from `inbox`.
    pub fn new(port: Arc<dyn GuestMqttPort>, inbox: mpsc::Receiver<GuestMessage>) -> Self {
        GuestMqtt { link: Link::Open(GuestLink { port, inbox, held: None }) }
    }

    /// No connection: a module importing `lichen:mqtt` fails to start with `reason`.
    pub fn denied(reason: impl Into<String>) -> Self {
        GuestMqtt { link: Link::Denied(reason.into()) }
    }

    /// Why a module importing `lichen:mqtt` cannot run, if it cannot.
    pub fn refusal(&self) -> Option<&str> {
        match &self.link {
            Link::Open(_) => None,
            Link::Denied(reason) => Some(reason),
        }
    }
}

fn memory(caller: &mut Caller<'_, ContainerCtx>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// The bytes at `ptr..ptr+len` of the module's memory, if they are all inside it.
fn slice(data: &[u8], ptr: i32, len: i32) -> Result<&[u8], Errno> {
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = start.checked_add(len).ok_or(Errno::Fault)?;
    data.get(start..end).ok_or(Errno::Fault)
}

fn text(bytes: &[u8]) -> Result<&str, Errno> {
    if bytes.len() > MAX_TOPIC {
        return Err(Errno::Nametoolong);
    }
    std::str::from_utf8(bytes).map_err(|_| Errno::Inval)
}

fn code(r: Result<(), Errno>) -> i32 {
    match r {
        Ok(()) => Errno::Success as i32,
        Err(e) => e as i32,
    }
}

fn link<'a>(caller: &'a mut Caller<'_, ContainerCtx>) -> Result<&'a mut GuestLink, Errno> {
    // A module only runs with `lichen:mqtt` imported when it has a link (see `run`), so this is a
    // guard, not a path users meet.
    match caller.data_mut().mqtt.as_mut().map(|m| &mut m.link) {
        Some(Link::Open(link)) => Ok(link),
        _ => Err(Errno::Notconn),
    }
}

fn publish(
    mut caller: Caller<'_, ContainerCtx>,
    (topic_ptr, topic_len, payload_ptr, payload_len, qos, retain): (i32, i32, i32, i32, i32, i32),
) -> Result<(), Errno> {
    let mem = memory(&mut caller).ok_or(Errno::Fault)?;
    if !(0..=1).contains(&qos) || !(0..=1).contains(&retain) {
        return Err(Errno::Inval);
    }
    let port = link(&mut caller)?.port.clone();
    let data = mem.data(&caller);
    let topic = text(slice(data, topic_ptr, topic_len)?)?;
    let payload = slice(data, payload_ptr, payload_len)?;
    port.publish(topic, payload, qos as u8, retain == 1)
}

fn subscribe(
    mut caller: Caller<'_, ContainerCtx>,
    (filter_ptr, filter_len): (i32, i32),
) -> Result<(), Errno> {
    let mem = memory(&mut caller).ok_or(Errno::Fault)?;
    let port = link(&mut caller)?.port.clone();
    let filter = text(slice(mem.data(&caller), filter_ptr, filter_len)?)?;
    port.subscribe(filter)
}

/// The longest single wait; a module asking for longer (or -1) waits again transparently.
const MAX_WAIT: Duration = Duration::from_secs(3600);

async fn receive(
    mut caller: Caller<'_, ContainerCtx>,
    (topic_ptr, topic_cap, payload_ptr, payload_cap, lengths_ptr, timeout_ms): (i32, i32, i32, i32, i32, i32),
) -> i32 {
    let Some(mem) = memory(&mut caller) else { return Errno::Fault as i32 };
    if timeout_ms < -1 {
        return Errno::Inval as i32;
    }
    // Check every pointer before waiting, so a bad call fails at once instead of after a message
    // was taken from the queue.
    {
        let data = mem.data(&caller);
        let ok = slice(data, topic_ptr, topic_cap).and(slice(data, payload_ptr, payload_cap)).and(slice(
            data,
            lengths_ptr,
            8,
        ));
        if let Err(e) = ok {
            return e as i32;
        }
    }
    let message = {
        let link = match link(&mut caller) {
            Ok(l) => l,
            Err(e) => return e as i32,
        };
        match link.held.take() {
            Some(m) => Some(m),
            None if timeout_ms == 0 => link.inbox.try_recv().ok(),
            None => {
                let wait = if timeout_ms < 0 { MAX_WAIT } else { Duration::from_millis(timeout_ms as u64) };
                // `recv` is cancel-safe: a run stopped mid-wait loses no message.
                match tokio::time::timeout(wait, link.inbox.recv()).await {
                    Ok(Some(m)) => Some(m),
                    // Every sender gone (the agent is shutting MQTT down), or the time passed.
                    Ok(None) | Err(_) => None,
                }
            }
        }
    };
    let Some(m) = message else { return Errno::Again as i32 };
    let data = mem.data_mut(&mut caller);
    let lengths = [(m.topic.len() as u32).to_le_bytes(), (m.payload.len() as u32).to_le_bytes()].concat();
    let start = lengths_ptr as u32 as usize;
    // Checked above; memory cannot shrink meanwhile.
    if let Some(dst) = data.get_mut(start..start + 8) {
        dst.copy_from_slice(&lengths);
    }
    let fits = m.topic.len() <= topic_cap as u32 as usize && m.payload.len() <= payload_cap as u32 as usize;
    if !fits {
        if let Ok(l) = link(&mut caller) {
            l.held = Some(m);
        }
        return Errno::Nobufs as i32;
    }
    let (t, p) = (topic_ptr as u32 as usize, payload_ptr as u32 as usize);
    if let Some(dst) = data.get_mut(t..t + m.topic.len()) {
        dst.copy_from_slice(m.topic.as_bytes());
    }
    if let Some(dst) = data.get_mut(p..p + m.payload.len()) {
        dst.copy_from_slice(&m.payload);
    }
    Errno::Success as i32
}

/// Defines the `lichen:mqtt` imports in the linker. Modules that do not import them never see
/// them; ones that do get a [`GuestMqtt`] per run (or are refused before they start).
pub(super) fn add_to_linker(linker: &mut Linker<ContainerCtx>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "publish",
        |caller: Caller<'_, ContainerCtx>, a: i32, b: i32, c: i32, d: i32, e: i32, f: i32| {
            code(publish(caller, (a, b, c, d, e, f)))
        },
    )?;
    linker.func_wrap(MODULE, "subscribe", |caller: Caller<'_, ContainerCtx>, a: i32, b: i32| {
        code(subscribe(caller, (a, b)))
    })?;
    linker.func_wrap_async(
        MODULE,
        "receive",
        |caller: Caller<'_, ContainerCtx>, args: (i32, i32, i32, i32, i32, i32)| {
            Box::new(receive(caller, args))
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_checked_against_memory_and_overflow() {
        let data = vec![0u8; 100];
        assert_eq!(slice(&data, 10, 90).map(<[u8]>::len), Ok(90));
        assert_eq!(slice(&data, 10, 91), Err(Errno::Fault));
        assert_eq!(slice(&data, -1, 2), Err(Errno::Fault), "a negative pointer is a huge one");
        assert_eq!(slice(&data, 50, -1), Err(Errno::Fault), "a negative length is a huge one");
        assert_eq!(slice(&data, 100, 0).map(<[u8]>::len), Ok(0));
        assert_eq!(text(&[0xff]), Err(Errno::Inval));
        assert_eq!(text(&vec![b'a'; MAX_TOPIC + 1]), Err(Errno::Nametoolong));
    }
}
