//! Web sessions without a sessions table: a cookie `expiry.issued-us.nonce.key-hash.mac`,
//! the MAC an HMAC-SHA256 under a key derived from the hub's identity secret (kept in the
//! store, so every hub on one database accepts it). Each request re-reads the key behind
//! the hash through the bearer keys' cache (no database read while the key is in it):
//! a revoked or sanctioned key ends the session at once, and the key's last sign-out
//! time, read with it, ends every session made before it (a copied cookie's too), on
//! the hub signed out through at once and on the others within the cache's `KEY_TTL`.
//! A form's CSRF
//! token is an HMAC of the session's nonce. Signing in itself runs under a short
//! pre-session (no key yet) so that its form carries a token too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::{header, HeaderMap, HeaderValue};
use parking_lot::Mutex;
use potluck_store::KeyAuth;
use sha2::Sha256;

use crate::books::limits::Hourly;
use crate::config::WebConfig;
use crate::http::auth;
use crate::http::error::ApiError;
use crate::trust::identity::HubIdentity;
use crate::web::public::DayRow;

/// The session cookie.
pub(crate) const SESSION_COOKIE: &str = "potluck_session";
/// The sign-in form's pre-session cookie.
pub(crate) const SIGNIN_COOKIE: &str = "potluck_signin";
/// Lifetime of the sign-in form's pre-session (seconds).
pub(crate) const SIGNIN_FORM_SECS: u64 = 900;
/// Longest cookie header read.
const MAX_COOKIE_BYTES: usize = 4096;
/// Bytes of a nonce.
const NONCE_BYTES: usize = 16;

/// What the web room keeps: its MAC key, the sign-in bucket, providers-online samples.
pub(crate) struct WebState {
    key: [u8; 32],
    /// Sign-in attempts over the whole hub (bucket key 0).
    pub(crate) signins: Hourly,
    /// (unix ms, providers online), oldest first.
    pub(crate) samples: Mutex<VecDeque<(i64, usize)>>,
    /// When the last sample was taken.
    pub(crate) last_sample: Mutex<Option<Instant>>,
    /// The public status page's usage chart and when it was read (`web.chart_cache`).
    pub(crate) hub_chart: Mutex<Option<(Instant, Arc<Vec<DayRow>>)>>,
    /// Held while a usage chart is read from the store: pages never run more than one
    /// usage aggregate at a time, however many are viewed at once.
    pub(crate) chart_reads: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for WebState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebState").finish_non_exhaustive()
    }
}

impl WebState {
    /// The web room's state, its MAC key derived from the hub's identity.
    pub(crate) fn new(identity: &HubIdentity) -> Self {
        Self {
            key: identity.derive_key("web-session"),
            signins: Hourly::default(),
            samples: Mutex::new(VecDeque::new()),
            last_sample: Mutex::new(None),
            hub_chart: Mutex::new(None),
            chart_reads: tokio::sync::Mutex::new(()),
        }
    }

    fn mac(&self, msg: &str) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut m = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        m.update(msg.as_bytes());
        m
    }

    /// A signed token for `key_hash` (`None`: the sign-in pre-session), valid `secs`.
    pub(crate) fn issue(&self, key_hash: Option<&str>, secs: u64) -> (String, String) {
        let nonce = hex::encode(rand::random::<[u8; NONCE_BYTES]>());
        let body = format!(
            "{}.{}.{}.{}",
            now_secs().saturating_add(secs),
            now_us(),
            nonce,
            key_hash.unwrap_or("-")
        );
        let tag = hex::encode(self.mac(&body).finalize().into_bytes());
        let csrf = self.csrf(&nonce);
        (format!("{body}.{tag}"), csrf)
    }

    /// The token's contents if its MAC holds and it has not expired.
    pub(crate) fn open(&self, token: &str) -> Option<Opened> {
        let (body, tag) = token.rsplit_once('.')?;
        let tag = hex::decode(tag).ok()?;
        self.mac(body).verify_slice(&tag).ok()?;
        let mut parts = body.splitn(4, '.');
        let expires: u64 = parts.next()?.parse().ok()?;
        let issued_us: i64 = parts.next()?.parse().ok()?;
        let nonce = parts.next()?.to_owned();
        let hash = parts.next()?;
        if now_secs() >= expires {
            return None;
        }
        Some(Opened {
            nonce,
            key_hash: (hash != "-").then(|| hash.to_owned()),
            issued_us,
        })
    }

    /// The CSRF token bound to a session's nonce.
    pub(crate) fn csrf(&self, nonce: &str) -> String {
        hex::encode(&self.mac(&format!("csrf.{nonce}")).finalize().into_bytes()[..16])
    }

    /// Whether `given` is the CSRF token of `nonce` (constant time).
    pub(crate) fn csrf_ok(&self, nonce: &str, given: &str) -> bool {
        let Ok(given) = hex::decode(given) else {
            return false;
        };
        given.len() == 16
            && self
                .mac(&format!("csrf.{nonce}"))
                .verify_truncated_left(&given)
                .is_ok()
    }
}

/// What a valid token holds.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The session's nonce (its CSRF token's seed).
    pub(crate) nonce: String,
    /// The hash of the key it was made with; `None`: the sign-in pre-session.
    pub(crate) key_hash: Option<String>,
    /// When it was made (unix microseconds: a sign-in right after a sign-out is later
    /// than it).
    pub(crate) issued_us: i64,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Now, as the sign-out time of a key's sessions (unix microseconds).
pub(crate) fn sign_out_time() -> i64 {
    now_us()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The value of cookie `name` in the request, if any.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter(|v| v.len() <= MAX_COOKIE_BYTES)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Secure` when configured.
pub(crate) fn set_cookie(
    cfg: &WebConfig,
    name: &str,
    value: &str,
    path: &str,
    max_age: u64,
) -> HeaderValue {
    let secure = if cfg.secure_cookies { "; Secure" } else { "" };
    let v = format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("invalid=1; Max-Age=0"))
}

/// A signed-in visitor: the key's current state and the session's CSRF token.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// The key behind the session, as the store says now.
    pub(crate) auth: KeyAuth,
    /// The token every form of this session carries.
    pub(crate) csrf: String,
    nonce: String,
    /// The hash of the key (the keys cache's entry).
    pub(crate) key_hash: String,
    /// When the session was made (unix microseconds, the clock of the hub that made it).
    pub(crate) issued_us: i64,
}

impl Session {
    /// Check a form's token (403 if wrong or missing).
    pub(crate) fn check(&self, web: &WebState, given: &str) -> Result<(), ApiError> {
        if web.csrf_ok(&self.nonce, given) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

/// The session of a request: 401 without a valid cookie, when its key is revoked,
/// unknown or not in good standing, or when the key's sessions were signed out after it
/// was made (the cookie is then worthless).
pub(crate) async fn session(
    st: &crate::state::HubState,
    headers: &HeaderMap,
) -> Result<Session, ApiError> {
    let token = cookie(headers, SESSION_COOKIE).ok_or(ApiError::Unauthorized)?;
    let t = st.web.open(token).ok_or(ApiError::Unauthorized)?;
    let hash = t.key_hash.ok_or(ApiError::Unauthorized)?;
    let auth = auth::key_by_hash(st, hash.clone())
        .await
        .map_err(|e| match e {
            ApiError::Blocked(_) => ApiError::Unauthorized,
            e => e,
        })?;
    if t.issued_us <= auth.sessions_after_us {
        return Err(ApiError::Unauthorized);
    }
    let csrf = st.web.csrf(&t.nonce);
    Ok(Session {
        auth,
        csrf,
        nonce: t.nonce,
        key_hash: hash,
        issued_us: t.issued_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> WebState {
        WebState {
            key: [7; 32],
            signins: Hourly::default(),
            samples: Mutex::new(VecDeque::new()),
            last_sample: Mutex::new(None),
            hub_chart: Mutex::new(None),
            chart_reads: tokio::sync::Mutex::new(()),
        }
    }

    #[test]
    fn a_token_opens_only_unchanged_and_unexpired() {
        let w = web();
        let (t, csrf) = w.issue(Some("abc"), 60);
        let Opened {
            nonce, key_hash, ..
        } = w.open(&t).unwrap();
        assert_eq!(key_hash.as_deref(), Some("abc"));
        assert!(w.csrf_ok(&nonce, &csrf));
        assert!(!w.csrf_ok(&nonce, &csrf[..30]));
        assert!(!w.csrf_ok("other", &csrf));
        // Another key hash under the same MAC: refused.
        let forged = t.replacen(".abc.", ".abd.", 1);
        assert!(w.open(&forged).is_none());
        // Expired.
        let (old, _) = w.issue(Some("abc"), 0);
        assert!(w.open(&old).is_none());
        // Another hub's key.
        let mut other = web();
        other.key = [8; 32];
        assert!(other.open(&t).is_none());
        assert!(w.open("").is_none() && w.open("1.2.3.zz").is_none());
        // The format before a session carried its time: refused, not misread.
        let body = format!("{}.{}.abc", now_secs() + 60, "0".repeat(32));
        let tag = hex::encode(w.mac(&body).finalize().into_bytes());
        assert!(w.open(&format!("{body}.{tag}")).is_none());
    }
}
