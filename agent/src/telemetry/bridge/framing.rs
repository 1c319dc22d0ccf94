//! The stdio framing of MQTT messages (the README's MQTT section is the contract): stdout lines to
//! payloads ([`decode_line`], [`LineSplitter`]) and incoming messages to stdin lines
//! ([`encode_incoming`]). Pure functions on bytes; nothing here publishes or delivers.

use base64::Engine as _;

/// Marks a line (either way) whose payload is standard base64.
pub const BASE64_PREFIX: &[u8] = b"base64:";

/// Why a stdout line was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    /// Longer than `max_payload` (before or after base64 decoding).
    Oversized,
    /// A `base64:` line that is not base64.
    Malformed,
}

/// The payload a stdout line stands for: `None` for an empty line.
pub fn decode_line(line: &[u8], max_payload: usize) -> Result<Option<Vec<u8>>, LineFault> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Ok(None);
    }
    let payload = match line.strip_prefix(BASE64_PREFIX) {
        Some(b64) => {
            base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| LineFault::Malformed)?
        }
        None => line.to_vec(),
    };
    if payload.len() > max_payload {
        return Err(LineFault::Oversized);
    }
    Ok(Some(payload))
}

/// The stdin line for an incoming message (see the module docs).
pub fn encode_incoming(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + payload.len() + 16);
    for b in topic.bytes() {
        match b {
            b'%' => out.extend_from_slice(b"%25"),
            b' ' => out.extend_from_slice(b"%20"),
            b'\r' => out.extend_from_slice(b"%0D"),
            b'\n' => out.extend_from_slice(b"%0A"),
            b => out.push(b),
        }
    }
    out.push(b' ');
    // Control characters (NUL, ESC, ...) would reach a module's line reader as text; only TAB passes.
    let text = std::str::from_utf8(payload).is_ok()
        && !payload.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        && !payload.starts_with(BASE64_PREFIX);
    if text {
        out.extend_from_slice(payload);
    } else {
        out.extend_from_slice(BASE64_PREFIX);
        out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(payload).as_bytes());
    }
    out.push(b'\n');
    out
}

/// Splits a byte stream into lines of at most `limit` bytes; longer lines are reported once as
/// [`LineFault::Oversized`] and skipped to their end, so memory stays bounded by `limit`.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
}

impl LineSplitter {
    /// A splitter keeping at most `limit` bytes of a line.
    pub fn new(limit: usize) -> Self {
        LineSplitter { buf: Vec::new(), limit, overflow: false }
    }

    /// Feeds bytes; calls `out` with each complete line, or the fault of an overlong one.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut impl FnMut(Result<&[u8], LineFault>)) {
        while !bytes.is_empty() {
            let (part, done) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            if !self.overflow {
                if self.buf.len() + part.len() > self.limit {
                    self.overflow = true;
                    self.buf = Vec::new();
                    out(Err(LineFault::Oversized));
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            match done {
                Some(n) => {
                    if !self.overflow {
                        out(Ok(&self.buf));
                    }
                    self.buf.clear();
                    self.overflow = false;
                    bytes = &bytes[n..];
                }
                None => bytes = &[],
            }
        }
    }

    /// The last line, if the stream ended without a newline.
    pub fn finish(&mut self, out: &mut impl FnMut(Result<&[u8], LineFault>)) {
        if !self.overflow && !self.buf.is_empty() {
            out(Ok(&self.buf));
        }
        self.buf.clear();
        self.overflow = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_framing_text_base64_and_faults() {
        assert_eq!(decode_line(b"21.5\r", 100), Ok(Some(b"21.5".to_vec())));
        assert_eq!(decode_line(b"", 100), Ok(None));
        assert_eq!(decode_line(b"base64:AP8=", 100), Ok(Some(vec![0, 255])));
        assert_eq!(decode_line(b"base64:%%%", 100), Err(LineFault::Malformed));
        assert_eq!(decode_line(&[b'x'; 101], 100), Err(LineFault::Oversized));
    }

    #[test]
    fn stdin_framing_escapes_topics_and_carries_binary_as_base64() {
        assert_eq!(encode_incoming("commands/pi/led", b"on"), b"commands/pi/led on\n".to_vec());
        assert_eq!(encode_incoming("a b%\n", b"x"), b"a%20b%25%0A x\n".to_vec());
        assert_eq!(encode_incoming("t", &[0, 255]), b"t base64:AP8=\n".to_vec());
        assert_eq!(encode_incoming("t", b"two\nlines"), b"t base64:dHdvCmxpbmVz\n".to_vec());
        assert_eq!(encode_incoming("t", b"base64:x"), b"t base64:YmFzZTY0Ong=\n".to_vec());
        assert_eq!(encode_incoming("t", b""), b"t \n".to_vec());
        assert_eq!(encode_incoming("t", &[1, 2]), b"t base64:AQI=\n".to_vec(), "control characters");
        assert_eq!(encode_incoming("t", "a\tb é".as_bytes()), "t a\tb é\n".as_bytes().to_vec());
    }

    #[test]
    fn the_splitter_bounds_memory_and_skips_overlong_lines_whole() {
        let mut s = LineSplitter::new(4);
        let mut got = Vec::new();
        let mut out = |l: Result<&[u8], LineFault>| got.push(l.map(|b| b.to_vec()));
        s.push(b"ab\ncde", &mut out);
        s.push(b"fg\n1234\n12345", &mut out);
        s.push(b"678\nok", &mut out);
        s.finish(&mut out);
        assert_eq!(
            got,
            vec![
                Ok(b"ab".to_vec()),
                Err(LineFault::Oversized),
                Ok(b"1234".to_vec()),
                Err(LineFault::Oversized),
                Ok(b"ok".to_vec())
            ]
        );
    }
}
