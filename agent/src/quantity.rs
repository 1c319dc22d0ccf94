//! Kubernetes resource quantities (`128Mi`, `1G`, `1.5Gi`, `64000`) as byte counts.
//!
//! Used for memory limits in pod specs and for size settings in the config, so users write sizes the
//! way they already do in manifests.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Why a string is not a quantity; each message shows the input (trimmed) and what would do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Nothing but whitespace.
    #[error("empty quantity")]
    Empty,
    /// A suffix Kubernetes does not define.
    #[error("unknown suffix {suffix:?} in {input:?} (use Ki, Mi, Gi, Ti or k, M, G, T)")]
    UnknownSuffix {
        /// The suffix.
        suffix: String,
        /// The whole quantity.
        input: String,
    },
    /// No number, or not one.
    #[error("{0:?} is not a quantity (examples: 128Mi, 1G, 4096)")]
    NotANumber(String),
    /// More bytes than a `u64` holds.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// A size in bytes, parsed from a Kubernetes quantity string or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a quantity such as `128Mi`, `1G`, `1.5Gi` or `4096` into bytes.
    ///
    /// Fractions of a byte are rounded up, as the API server does for memory.
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(QuantityError::Empty);
        }
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, suffix) = s.split_at(split);
        let multiplier: f64 = match suffix {
            "" => 1.0,
            "Ki" => 1024.0,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "m" => 1e-3,
            other => {
                return Err(QuantityError::UnknownSuffix { suffix: other.to_owned(), input: s.to_owned() });
            }
        };
        if num.is_empty() || num.matches('.').count() > 1 {
            return Err(QuantityError::NotANumber(s.to_owned()));
        }
        let value: f64 = num.parse().map_err(|_| QuantityError::NotANumber(s.to_owned()))?;
        let bytes = (value * multiplier).ceil();
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(QuantityError::TooLarge(s.to_owned()));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10), ("", 1)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, QuantityError> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(ByteSize::parse("128Mi"), Ok(ByteSize(128 << 20)));
        assert_eq!(ByteSize::parse("1G"), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("1.5Gi"), Ok(ByteSize(3 << 29)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("1500m"), Ok(ByteSize(2)));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        let err = ByteSize::parse("12 parsecs").unwrap_err().to_string();
        assert!(err.contains("unknown suffix"), "{err}");
        assert!(ByteSize::parse("Mi").is_err());
        assert!(ByteSize::parse("1.2.3Mi").is_err());
        assert!(ByteSize::parse("").is_err());
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(128 << 20).to_string(), "128Mi");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(3 << 29).to_string(), "1536Mi");
    }
}
