//! The MQTT 3.1.1 topic grammar: a [`TopicName`] one may publish to and a [`TopicFilter`] one may
//! subscribe, each checked once when parsed and then matched without checking again.
//!
//! A ground-floor leaf: it imports no other module of the crate, so config and telemetry can both
//! hold these values. It knows nothing of brokers, pods or annotations.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest topic or filter MQTT can carry (a two-byte length).
const MAX_LEN: usize = 65_535;

/// Why a string is not a topic name or filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not a topic one may publish to.
    #[error("{0:?} is not a topic one can publish to (no + or #, not empty)")]
    Name(String),
    /// Not a subscription filter.
    #[error("{0:?} is not a valid filter (+ and # stand for whole levels, # only last)")]
    Filter(String),
}

/// A topic one may publish to: not empty, no wildcards, no NUL, at most 65535 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TopicName(String);

impl TopicName {
    /// Checks `topic`.
    pub fn parse(topic: impl Into<String>) -> Result<Self, TopicError> {
        let topic = topic.into();
        if Self::is_valid(&topic) { Ok(TopicName(topic)) } else { Err(TopicError::Name(topic)) }
    }

    /// Whether `topic` may be published to (for callers that only need the answer).
    pub fn is_valid(topic: &str) -> bool {
        !topic.is_empty() && topic.len() <= MAX_LEN && !topic.contains(['+', '#', '\0'])
    }

    /// The topic.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this topic lies at or below `root` (`root` itself, or `root/...`).
    pub fn is_under(&self, root: &str) -> bool {
        self.0 == root || self.0.strip_prefix(root).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// A subscription filter: `+` and `#` only as whole levels, `#` last; not empty, no NUL, at most
/// 65535 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Checks `filter`.
    pub fn parse(filter: impl Into<String>) -> Result<Self, TopicError> {
        let filter = filter.into();
        if Self::is_valid(&filter) { Ok(TopicFilter(filter)) } else { Err(TopicError::Filter(filter)) }
    }

    /// Whether `filter` is a valid subscription filter.
    pub fn is_valid(filter: &str) -> bool {
        if filter.is_empty() || filter.len() > MAX_LEN || filter.contains('\0') {
            return false;
        }
        let mut levels = filter.split('/').peekable();
        while let Some(l) = levels.next() {
            let ok = match l {
                "#" => levels.peek().is_none(),
                "+" => true,
                l => !l.contains(['+', '#']),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// The filter.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches, as a broker decides: `+` is one level, `#` the rest (and the
    /// parent); wildcards at the first level do not match topics starting with `$`.
    pub fn matches(&self, topic: &str) -> bool {
        let filter = self.0.as_str();
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Whether every topic `requested` can match is one this filter matches too, so a subscriber
    /// granted this filter may subscribe `requested`.
    pub fn covers(&self, requested: &TopicFilter) -> bool {
        let (allowed, requested) = (self.0.as_str(), requested.0.as_str());
        if requested.starts_with('$') && (allowed.starts_with('+') || allowed.starts_with('#')) {
            return false;
        }
        let mut a = allowed.split('/');
        let mut r = requested.split('/');
        loop {
            match (a.next(), r.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(level)) if level != "#" => {}
                (Some(x), Some(y)) if x == y && y != "+" && y != "#" => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

macro_rules! string_forms {
    ($t:ident) => {
        impl TryFrom<String> for $t {
            type Error = TopicError;
            fn try_from(s: String) -> Result<Self, TopicError> {
                $t::parse(s)
            }
        }
        impl std::str::FromStr for $t {
            type Err = TopicError;
            fn from_str(s: &str) -> Result<Self, TopicError> {
                $t::parse(s)
            }
        }
        impl From<$t> for String {
            fn from(t: $t) -> String {
                t.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_forms!(TopicName);
string_forms!(TopicFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).expect("valid filter")
    }

    #[test]
    fn publish_topics() {
        assert!(TopicName::is_valid("sensors/pi-07/temp"));
        for bad in ["", "a/+/b", "a/#", "a\0b"] {
            assert!(!TopicName::is_valid(bad), "{bad:?}");
            assert_eq!(TopicName::parse(bad), Err(TopicError::Name(bad.into())));
        }
        assert!(!TopicName::is_valid(&"x".repeat(65_536)));
        let t = TopicName::parse("in/pi/led").expect("valid");
        assert!(t.is_under("in/pi") && t.is_under("in/pi/led") && !t.is_under("in/p"));
    }

    #[test]
    fn filters_match_like_a_broker() {
        assert!(f("commands/pi/#").matches("commands/pi"));
        assert!(f("commands/pi/#").matches("commands/pi/a/b"));
        assert!(f("a/+/c").matches("a/b/c"));
        assert!(!f("a/+/c").matches("a/b/d"));
        assert!(!f("a/+").matches("a/b/c"));
        assert!(f("#").matches("x/y"));
        assert!(!f("#").matches("$SYS/x"));
        assert!(!f("a/b").matches("a/b/c"));
        assert!(
            TopicFilter::is_valid("a/+/#")
                && !TopicFilter::is_valid("a/b#")
                && !TopicFilter::is_valid("#/a")
                && !TopicFilter::is_valid("")
        );
        let e = TopicFilter::parse("a/#/b").unwrap_err().to_string();
        assert!(e.contains("not a valid filter"), "{e}");
    }

    #[test]
    fn a_filter_is_covered_only_by_one_granting_everything_it_matches() {
        let covers = |a: &str, r: &str| f(a).covers(&f(r));
        assert!(covers("in/pi/#", "in/pi/#"));
        assert!(covers("in/pi/#", "in/pi/led"));
        assert!(covers("in/pi/#", "in/pi/+/x"));
        assert!(covers("in/+/led", "in/pi/led"));
        assert!(covers("in/+/led", "in/+/led"));
        assert!(!covers("in/pi/#", "in/#"), "wider than granted");
        assert!(!covers("in/pi/led", "in/pi/+"));
        assert!(!covers("in/+/led", "in/#"));
        assert!(!covers("in/pi", "in/pi/x"));
        assert!(!covers("#", "$SYS/#"), "wildcards do not reach $ topics");
    }

    #[test]
    fn serde_uses_the_plain_string_and_checks_it() {
        #[derive(Deserialize, Serialize)]
        struct W {
            f: TopicFilter,
        }
        let w: W = toml::from_str("f = \"a/+\"").expect("valid");
        assert_eq!(toml::to_string(&w).expect("renders"), "f = \"a/+\"\n");
        assert!(toml::from_str::<W>("f = \"a/#/b\"").is_err());
    }
}
