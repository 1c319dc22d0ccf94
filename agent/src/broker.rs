//! The MQTT broker address grammar: [`BrokerUrl`], `mqtt://host[:port]` or `mqtts://host[:port]`,
//! parsed once (in config) and used by the connections as is.
//!
//! A ground-floor leaf: it imports no other module of the crate and opens no connection.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a broker URL was refused; each names the URL and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// Neither `mqtt://` nor `mqtts://`.
    #[error("{0:?}: use mqtt://host[:port] or mqtts://host[:port]")]
    Scheme(String),
    /// A path, credentials or a query after the address.
    #[error("{0:?}: give only host and port (credentials go in mqtt.username and mqtt.password_file)")]
    Extra(String),
    /// `[` without `]`.
    #[error("{0:?}: unclosed '['")]
    Unclosed(String),
    /// Something other than `:port` after a bracketed address.
    #[error("{url:?}: unexpected {after:?} after the address")]
    AfterAddress {
        /// The URL.
        url: String,
        /// What follows the `]`.
        after: String,
    },
    /// No host.
    #[error("{0:?} names no host")]
    NoHost(String),
    /// A port that is not 1-65535.
    #[error("{url:?}: {port:?} is not a port number")]
    Port {
        /// The URL.
        url: String,
        /// The port as written.
        port: String,
    },
}

/// A parsed `mqtt.broker` (or gateway `local_broker`). It keeps the text it was parsed from, which
/// is how it is shown and written back (`lichen check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BrokerUrl {
    text: String,
    tls: bool,
    host: String,
    port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (IPv6 as `[::1]`).
    pub fn parse(url: &str) -> Result<Self, BrokerUrlError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else {
            return Err(BrokerUrlError::Scheme(url.to_owned()));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('@') || rest.contains('?') {
            return Err(BrokerUrlError::Extra(url.to_owned()));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| BrokerUrlError::Unclosed(url.to_owned()))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => {
                    return Err(BrokerUrlError::AfterAddress {
                        url: url.to_owned(),
                        after: after.to_owned(),
                    });
                }
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(BrokerUrlError::NoHost(url.to_owned()));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(BrokerUrlError::Port { url: url.to_owned(), port: p.to_owned() }),
            },
        };
        Ok(BrokerUrl { text: url.to_owned(), tls, host: host.to_owned(), port })
    }

    /// Whether to use TLS (`mqtts://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Host name or address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (1883 or 8883 unless given).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for BrokerUrl {
    type Error = BrokerUrlError;
    fn try_from(s: String) -> Result<Self, BrokerUrlError> {
        BrokerUrl::parse(&s)
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = BrokerUrlError;
    fn from_str(s: &str) -> Result<Self, BrokerUrlError> {
        BrokerUrl::parse(s)
    }
}

impl From<BrokerUrl> for String {
    fn from(u: BrokerUrl) -> String {
        u.text
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u = |s| BrokerUrl::parse(s).map(|u| (u.tls(), u.host().to_owned(), u.port()));
        assert_eq!(u("mqtt://broker.lan"), Ok((false, "broker.lan".into(), 1883)));
        assert_eq!(u("mqtts://b:9000/"), Ok((true, "b".into(), 9000)));
        assert_eq!(u("mqtts://b"), Ok((true, "b".into(), 8883)));
        assert_eq!(u("mqtt://[::1]:1884"), Ok((false, "::1".into(), 1884)));
        for bad in ["tcp://b", "mqtt://", "mqtt://b:0", "mqtt://b:x", "mqtt://u:p@b", "mqtt://b/t", "b:1883"]
        {
            assert!(u(bad).is_err(), "{bad}");
        }
        assert_eq!(
            BrokerUrl::parse("mqtts://b:9000/").map(|u| u.to_string()).as_deref(),
            Ok("mqtts://b:9000/")
        );
    }
}
