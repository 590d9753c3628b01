//! The web dashboard, served by the hub itself: server-rendered pages (askama templates,
//! escaped by the engine), assets embedded in the binary, a session cookie in place of
//! the key, a CSRF token on every form and strict security headers on every answer.
//!
//! Pages read the store and the registry; every action calls the same function as the
//! admin or account API, which checks the same role table (`auth::require`). Nothing a
//! consumer sent is rendered: model names only when the pool or the price list knows
//! them, report reasons never (moderators read them through the API).

mod actions;
mod admin_forms;
mod assets;
mod lists;
mod member;
mod public;
mod session;
mod signin;
mod staff;
mod volunteer;

use std::borrow::Cow;
use std::sync::Arc;

use askama::Template;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderValue, StatusCode};
use serde::de::DeserializeOwned;

use crate::http::error::ApiError;
use crate::state::HubState;

pub(crate) use session::WebState;

/// The Content-Security-Policy of every page: nothing inline, nothing from elsewhere.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes (none when `[web] enabled = false`).
pub(crate) fn router(st: &HubState) -> Router<Arc<HubState>> {
    if !st.config.web.enabled {
        return Router::new();
    }
    #[rustfmt::skip]
    let r = Router::new()
        .route("/", get(public::status))
        .route("/web/status.json", get(public::status_json))
        .route("/web/assets/{name}", get(assets::asset))
        .route("/web/signin", get(signin::form_page).post(signin::signin))
        .route("/web/signout", post(signin::signout))
        .route("/web/me", get(member::home))
        .route("/web/me/usage.json", get(member::usage_json))
        .route("/web/me/usage.csv", get(member::usage_csv))
        .route("/web/me/keys", post(member::create_key))
        .route("/web/me/keys/{id}/revoke", post(member::revoke_key))
        .route("/web/me/keys/{id}/settings", post(member::key_settings))
        .route("/web/volunteer", get(volunteer::page))
        .route("/web/staff", get(staff::page))
        .route("/web/staff/reports/{id}/resolve", post(actions::resolve))
        .route("/web/staff/keys/{id}/act", post(actions::key_act))
        .route("/web/staff/providers/{id}/act", post(actions::provider_act))
        .route("/web/staff/accounts/{name}/approve", post(actions::approve))
        .route("/web/staff/accounts/{name}/sanction", post(actions::sanction_account))
        .route("/web/staff/invites", post(actions::create_invite))
        .route("/web/staff/invites/{id}/revoke", post(actions::revoke_invite))
        .route("/web/staff/accounts/{name}/limits", post(admin_forms::account_limits))
        .route("/web/staff/keys/{id}/limits", post(admin_forms::key_limits))
        .route("/web/staff/accounts/{name}/role", post(admin_forms::set_role))
        .route("/web/staff/accounts/{name}/groups", post(admin_forms::groups));
    r.layer(axum::middleware::from_fn(secure_headers))
}

/// Security headers on every dashboard answer.
async fn secure_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// What every page shows in its header: where the visitor may go.
#[derive(Debug, Clone, Default)]
pub(crate) struct Nav {
    /// Signed in (shows "My account" and "Sign out").
    pub(crate) signed_in: bool,
    /// A moderator or an admin (shows "Staff").
    pub(crate) staff: bool,
    /// The session's CSRF token, for the sign-out form.
    pub(crate) csrf: String,
}

impl Nav {
    fn of(s: &session::Session) -> Self {
        Nav {
            signed_in: true,
            staff: crate::http::auth::rank(s.auth.role)
                >= crate::http::auth::rank(potluck_store::Role::Moderator),
            csrf: s.csrf.clone(),
        }
    }
}

/// A secret shown once (a new key, an invite code).
#[derive(Template)]
#[template(path = "created.html")]
pub(crate) struct Created {
    pub(crate) nav: Nav,
    pub(crate) title: String,
    pub(crate) secret: String,
    pub(crate) back: &'static str,
}

/// A page's failure: the API's error, shown as a short HTML page that echoes nothing.
#[derive(Debug)]
pub(crate) struct WebError(ApiError);

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        WebError(e)
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    nav: Nav,
    status: u16,
    message: Cow<'static, str>,
    /// The form field at fault, if the API named one (a name from the hub's code).
    field: Option<&'static str>,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if matches!(self.0, ApiError::Unauthorized) {
            // No session, or its key is gone: sign in again (the stale cookie is dropped).
            let mut r = Redirect::to("/web/signin").into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static(
                    "potluck_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
                ),
            );
            return r;
        }
        let field = match &self.0 {
            ApiError::BadRequest { param, .. } => *param,
            _ => None,
        };
        let message = page_message(&self.0);
        let api = self.0.into_response();
        let status = api.status();
        let page = ErrorPage {
            nav: Nav::default(),
            status: status.as_u16(),
            message: message.unwrap_or_else(|| status_message(status).into()),
            field,
        };
        let mut r = (status, render(&page)).into_response();
        if let Some(wait) = api.headers().get(header::RETRY_AFTER) {
            r.headers_mut().insert(header::RETRY_AFTER, wait.clone());
        }
        r
    }
}

/// The error's own message, where it is the hub's fixed words about this refusal (a
/// role the table refuses, a moderator acting on staff, the keys' cap, a name taken):
/// what the member needs to know, and nothing a stranger typed but a checked name.
fn page_message(e: &ApiError) -> Option<Cow<'static, str>> {
    match e {
        ApiError::Refused(m) => Some(Cow::Borrowed(m)),
        ApiError::Conflict(m) => Some(Cow::Owned(m.clone())),
        _ => None,
    }
}

/// What a page says for a status whose error has no message of its own to show.
fn status_message(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => {
            "Your role may not do this, or the form was stale. Reload the page and try again."
        }
        StatusCode::NOT_FOUND => "Not found.",
        StatusCode::CONFLICT => "That was already done.",
        StatusCode::TOO_MANY_REQUESTS => "Too many attempts. Wait a while and try again.",
        StatusCode::SERVICE_UNAVAILABLE => "The hub is busy. Wait a moment and try again.",
        s if s.is_client_error() => "The form was not accepted.",
        _ => "Something went wrong on the hub.",
    }
}

/// A template rendered to HTML (a render fault is a 500 without details).
pub(crate) fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "page render failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A form body read under `max_admin_body_bytes` and decoded (400 if malformed).
pub(crate) async fn form<T: DeserializeOwned>(
    st: &HubState,
    body: axum::body::Body,
) -> Result<T, ApiError> {
    form_capped(body, st.config.max_admin_body_bytes).await
}

/// A form of at most `max` bytes (413 above).
pub(crate) async fn form_capped<T: DeserializeOwned>(
    body: axum::body::Body,
    max: usize,
) -> Result<T, ApiError> {
    let bytes = crate::http::extract::read_capped(body, max).await?;
    serde_urlencoded::from_bytes(&bytes)
        .map_err(|_| ApiError::bad_request("The form was malformed.", None))
}

/// After an action: back to the page it came from (303, so a reload does not repeat it).
pub(crate) fn back(to: &'static str) -> Response {
    Redirect::to(to).into_response()
}

/// Money in micro-credits as credits with two decimals.
pub(crate) fn credits(micro: i64) -> String {
    let c = micro as f64 / potluck_store::ledger::CREDIT as f64;
    format!("{c:.2}")
}

/// A unix-ms time as `YYYY-MM-DD HH:MM` UTC.
pub(crate) fn when_ms(ms: i64) -> String {
    let day = potluck_protocol::usage::UtcDay::of_ms(ms);
    let rem = ms.rem_euclid(potluck_protocol::usage::DAY_MS) / 60_000;
    format!("{day} {:02}:{:02}", rem / 60, rem % 60)
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The model names the hub itself knows (served now, priced or allowed): only such names
/// are rendered, so that a name a consumer made up never reaches a page. Read once per
/// page (the pool's models are a snapshot of every tunnel), then asked of each row.
pub(crate) struct KnownModels(std::collections::BTreeSet<String>);

impl KnownModels {
    pub(crate) fn now(st: &HubState) -> Self {
        let priced = st.config.credits.models.keys().cloned();
        let allowed = st.config.model_allowlist.iter().map(|m| m.name.clone());
        let served = st
            .registry
            .pool_view()
            .keys()
            .map(|m| m.as_str().to_owned())
            .collect::<Vec<_>>();
        Self(priced.chain(allowed).chain(served).collect())
    }

    /// Whether the hub knows `model`.
    pub(crate) fn has(&self, model: &str) -> bool {
        self.0.contains(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy hub's error page tells the browser when to come back, as the API does.
    #[test]
    fn a_busy_hubs_page_keeps_its_retry_after() {
        let r = WebError(ApiError::LookupsBusy { retry_after: 1 }).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
