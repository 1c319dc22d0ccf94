//! Safe wrappers over Lichen's `lichen:mqtt` imports (see the Lichen README, "The lichen:mqtt host
//! API"). Every call returns a WASI `errno`; 0 is success.

#[link(wasm_import_module = "lichen:mqtt")]
unsafe extern "C" {
    #[link_name = "publish"]
    fn raw_publish(
        topic: *const u8,
        topic_len: usize,
        payload: *const u8,
        payload_len: usize,
        qos: i32,
        retain: i32,
    ) -> i32;
    #[link_name = "subscribe"]
    fn raw_subscribe(filter: *const u8, filter_len: usize) -> i32;
    #[link_name = "receive"]
    fn raw_receive(
        topic: *mut u8,
        topic_cap: usize,
        payload: *mut u8,
        payload_cap: usize,
        lengths: *mut u32,
        timeout_ms: i32,
    ) -> i32;
}

/// A failed call: the WASI errno the host returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The topic or filter is outside what the pod's annotations grant.
    pub const ACCES: Errno = Errno(2);
    /// Nothing arrived in time, or the pod's rate limit holds the message back.
    pub const AGAIN: Errno = Errno(6);
    /// The buffers are too small (the message is kept for the next call).
    pub const NOBUFS: Errno = Errno(42);
}

fn check(rc: i32) -> Result<(), Errno> {
    if rc == 0 { Ok(()) } else { Err(Errno(rc)) }
}

/// Publishes `payload` on `topic` (QoS 0 or 1).
pub fn publish(topic: &str, payload: &[u8], qos: u8, retain: bool) -> Result<(), Errno> {
    // SAFETY: the pointers and lengths describe live slices; the host only reads them.
    check(unsafe {
        raw_publish(
            topic.as_ptr(),
            topic.len(),
            payload.as_ptr(),
            payload.len(),
            i32::from(qos),
            i32::from(retain),
        )
    })
}

/// Subscribes `filter` (within the pod's `lichen.dev/mqtt-subscribe` filters).
pub fn subscribe(filter: &str) -> Result<(), Errno> {
    // SAFETY: as above.
    check(unsafe { raw_subscribe(filter.as_ptr(), filter.len()) })
}

/// One received message.
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Waits up to `timeout_ms` (-1: until one comes) for a message. Grows its buffers when the
/// host says they are too small.
pub fn receive(timeout_ms: i32) -> Result<Message, Errno> {
    let (mut topic, mut payload) = (vec![0u8; 256], vec![0u8; 1024]);
    let mut lengths = [0u32; 2];
    loop {
        // SAFETY: the buffers are live and as long as their capacities say; the host writes at
        // most that much, and the two lengths into `lengths`.
        let rc = unsafe {
            raw_receive(
                topic.as_mut_ptr(),
                topic.len(),
                payload.as_mut_ptr(),
                payload.len(),
                lengths.as_mut_ptr(),
                timeout_ms,
            )
        };
        match check(rc) {
            Ok(()) => {
                topic.truncate(lengths[0] as usize);
                payload.truncate(lengths[1] as usize);
                return Ok(Message { topic: String::from_utf8_lossy(&topic).into_owned(), payload });
            }
            Err(Errno::NOBUFS) => {
                topic.resize(lengths[0] as usize, 0);
                payload.resize(lengths[1] as usize, 0);
            }
            Err(e) => return Err(e),
        }
    }
}
