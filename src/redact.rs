//! [`Sensitive`]: a value (token, client secret) that never prints. Its `Debug` and `Display`
//! write `[redacted]`, so a token cannot reach a log line, an Event or an error message by
//! accident; reading it takes an explicit [`Sensitive::expose`].

use std::fmt;

/// A secret value. Compare, clone and move it freely; print it never.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short non-reversible fingerprint (first 16 hex digits of SHA-256), safe to log and to
    /// store in annotations; equal values have equal fingerprints.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Sensitive {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Sensitive::new("rt-very-secret");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "rt-very-secret");
    }

    #[test]
    fn fingerprints_identify_without_revealing() {
        let a = Sensitive::new("token-a");
        assert_eq!(a.fingerprint().len(), 16);
        assert_eq!(a.fingerprint(), Sensitive::new("token-a").fingerprint());
        assert_ne!(a.fingerprint(), Sensitive::new("token-b").fingerprint());
        assert!(!a.fingerprint().contains("token"));
    }

    /// Other languages compute the same fingerprint (docs/protocol.md, P2): the first 16 hex
    /// digits of SHA-256 of the UTF-8 bytes. Known answers from the SHA-256 test vectors.
    #[test]
    fn the_fingerprint_is_the_first_16_hex_digits_of_sha256() {
        assert_eq!(Sensitive::new("abc").fingerprint(), "ba7816bf8f01cfea");
        assert_eq!(Sensitive::new("").fingerprint(), "e3b0c44298fc1c14");
    }
}
