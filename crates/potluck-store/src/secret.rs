//! Secrets: random, prefixed, never printable, stored only as hashes.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Random bytes in every generated secret (192 bits).
pub const SECRET_RANDOM_BYTES: usize = 24;
/// How many characters of a secret are kept in clear for display (prefix included).
pub const DISPLAY_PREFIX_CHARS: usize = 9;

/// What a secret opens. Each kind has its own visible prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// The hub operator's key: `pa-`.
    Admin,
    /// A consumer API key: `pk-`.
    ConsumerKey,
    /// A provider's tunnel token: `pt-`.
    ProviderToken,
    /// A one-time signup invite code: `pi-`.
    Invite,
}

impl SecretKind {
    /// The prefix of secrets of this kind.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Admin => "pa-",
            Self::ConsumerKey => "pk-",
            Self::ProviderToken => "pt-",
            Self::Invite => "pi-",
        }
    }

    /// Whether `s` has the shape of a secret of this kind (prefix, then the hex of
    /// [`SECRET_RANDOM_BYTES`] random bytes): anything else cannot be one, and needs no
    /// lookup.
    pub fn looks_like(self, s: &str) -> bool {
        s.strip_prefix(self.prefix()).is_some_and(|rest| {
            rest.len() == 2 * SECRET_RANDOM_BYTES && rest.bytes().all(|b| b.is_ascii_hexdigit())
        })
    }
}

/// A secret in clear. `Debug` and `Display` print a redacted form; use
/// [`Secret::expose`] where the clear text is really needed (showing it once, sending it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A fresh random secret of this kind.
    pub fn generate(kind: SecretKind) -> Self {
        let mut bytes = [0u8; SECRET_RANDOM_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{}{}", kind.prefix(), hex::encode(bytes)))
    }

    /// Wrap a secret that came from outside (a header, a file, the environment).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into().trim().to_owned())
    }

    /// The clear text.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 hash, hex. Secrets carry 192 random bits, so a fast hash is enough.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    /// The part that may be displayed: the kind prefix and a few characters.
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(DISPLAY_PREFIX_CHARS).collect()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({}…)", self.0.chars().take(3).collect::<String>())
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}…", self.0.chars().take(3).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::generate(SecretKind::ConsumerKey);
        assert!(s.expose().starts_with("pk-"));
        assert_eq!(s.expose().len(), 3 + 2 * SECRET_RANDOM_BYTES);
        assert!(SecretKind::ConsumerKey.looks_like(s.expose()));
        assert!(!SecretKind::Admin.looks_like(s.expose()));
        for bad in [
            "pk-",
            "pk-nope",
            &s.expose()[..20],
            &format!("{}0", s.expose()),
        ] {
            assert!(!SecretKind::ConsumerKey.looks_like(bad), "{bad}");
        }
        let tail = &s.expose()[3..];
        assert!(!format!("{s:?}").contains(tail));
        assert!(!format!("{s}").contains(tail));
        assert_ne!(s, Secret::generate(SecretKind::ConsumerKey));
        assert_eq!(s.hash().len(), 64);
        assert_eq!(Secret::new(format!(" {} \n", s.expose())), s);
    }
}
