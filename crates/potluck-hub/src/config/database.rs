//! Where the hub keeps its data: SQLite in the data directory (the default), or a
//! PostgreSQL database that several hubs may share.

use serde::Deserialize;

/// A database URL (`postgres://USER:PASSWORD@HOST/DB`, or `sqlite:PATH`). Its `Debug`
/// hides the password, since configurations are printed in errors and logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wrap a URL (checked by [`DatabaseUrl::validate`]).
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, to connect with.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, for messages.
    pub fn redacted(&self) -> String {
        let u = &self.0;
        let Some(scheme_end) = u.find("://").map(|i| i + 3) else {
            return u.clone();
        };
        let rest = &u[scheme_end..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => match rest[..at].find(':') {
                Some(colon) => format!("{}{}:***{}", &u[..scheme_end], &rest[..colon], &rest[at..]),
                None => u.clone(),
            },
            None => u.clone(),
        }
    }

    /// Only the engines the store knows.
    pub fn validate(&self) -> Result<(), String> {
        match potluck_store::Engine::of_url(&self.0) {
            Some(_) => Ok(()),
            None => Err(format!(
                "database {:?}: expected a postgres:// (or sqlite:) URL",
                self.redacted()
            )),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DatabaseUrl")
            .field(&self.redacted())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let u = DatabaseUrl::new("postgres://hub:s3cr3t@db.example:5432/potluck?sslmode=require");
        assert_eq!(
            u.redacted(),
            "postgres://hub:***@db.example:5432/potluck?sslmode=require"
        );
        assert!(!format!("{u:?}").contains("s3cr3t"));
        let plain = DatabaseUrl::new("postgres://hub@db/potluck");
        assert_eq!(plain.redacted(), "postgres://hub@db/potluck");
        assert!(plain.validate().is_ok());
        let bad = DatabaseUrl::new("mysql://root:pw@db/x");
        assert!(bad.validate().unwrap_err().contains("root:***@"));
    }
}
