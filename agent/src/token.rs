//! The bootstrap token's grammar (ground floor): `<id>.<secret>`, 6 and 16 characters of
//! `[a-z0-9]`, as `kubeadm token create` prints it. Parsed once where config is read; the secret
//! is never shown (`Debug` prints the id only, errors never repeat the text).

/// A bootstrap token. `Debug` shows the id only.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

/// A string that is not a bootstrap token. The message never repeats it: it may be a secret with
/// a typo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "is not of the form <id>.<secret> (6 and 16 characters of a-z and 0-9), as `kubeadm token create` prints"
)]
pub struct BadToken;

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

impl BootstrapToken {
    /// Parses `<id>.<secret>`, surrounding white space ignored.
    pub fn parse(text: &str) -> Result<Self, BadToken> {
        let text = text.trim();
        let ok = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        match text.split_once('.') {
            Some((id, secret)) if ok(id, 6) && ok(secret, 16) => {
                Ok(BootstrapToken { id: id.to_owned(), secret: secret.to_owned() })
            }
            _ => Err(BadToken),
        }
    }

    /// The token id (public: it names the token's Secret, `bootstrap-token-<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `<id>.<secret>`, for the `Authorization: Bearer` header of the join.
    pub fn bearer(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_shown() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef\n").expect("valid");
        assert_eq!(t.id(), "abcdef");
        assert_eq!(t.bearer(), "abcdef.0123456789abcdef");
        assert!(!format!("{t:?}").contains("0123456789abcdef"));
        for bad in ["abcdef", "abcde.0123456789abcdef", "ABCDEF.0123456789abcdef", "abcdef.0123456789abcdeg!"]
        {
            let e = BootstrapToken::parse(bad).expect_err(bad).to_string();
            assert!(!e.contains("0123456789"), "{e}");
        }
    }
}
