//! Signing in with an API key (exchanged for the session cookie; the key is not kept in
//! the browser) and signing out. Attempts are counted under `[web]
//! signin_attempts_per_hour`; a key is checked exactly as the API checks a bearer key.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use http::{header, HeaderMap, StatusCode};
use potluck_store::Secret;
use serde::Deserialize;

use crate::http::auth;
use crate::http::error::ApiError;
use crate::state::HubState;
use crate::web::session::{
    self, cookie, set_cookie, SESSION_COOKIE, SIGNIN_COOKIE, SIGNIN_FORM_SECS,
};
use crate::web::{form, render, Nav, WebError};

#[derive(Template)]
#[template(path = "signin.html")]
struct SigninPage {
    nav: Nav,
    csrf: String,
    failed: bool,
}

/// A fresh sign-in form with its pre-session cookie.
fn fresh_form(st: &HubState, status: StatusCode, failed: bool) -> Response {
    let (token, csrf) = st.web.issue(None, SIGNIN_FORM_SECS);
    let mut r = (
        status,
        render(&SigninPage {
            nav: Nav::default(),
            csrf,
            failed,
        }),
    )
        .into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            &st.config.web,
            SIGNIN_COOKIE,
            &token,
            "/web/signin",
            SIGNIN_FORM_SECS,
        ),
    );
    r
}

/// `GET /web/signin`
pub(crate) async fn form_page(State(st): State<Arc<HubState>>) -> Response {
    fresh_form(&st, StatusCode::OK, false)
}

/// Largest sign-in form read: its two fields (a 32-digit token and a key of about 50
/// characters) fit many times over. Anyone can get the form's pre-session cookie, so a
/// stranger's post must not make the hub buffer what a staff member's form may hold
/// (`max_admin_body_bytes`).
pub(crate) const MAX_SIGNIN_FORM_BYTES: usize = 1024;

#[derive(Deserialize)]
pub(crate) struct SigninForm {
    csrf: String,
    key: String,
}

/// `POST /web/signin`: the form's token, then the key, then the session cookie.
pub(crate) async fn signin(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    // The sign-in cookie (given with the form) before a byte of the body is read.
    let pre = cookie(&headers, SIGNIN_COOKIE)
        .and_then(|t| st.web.open(t))
        .filter(|t| t.key_hash.is_none())
        .ok_or(ApiError::Forbidden)?;
    let f: SigninForm = super::form_capped(body, MAX_SIGNIN_FORM_BYTES).await?;
    if !st.web.csrf_ok(&pre.nonce, &f.csrf) {
        return Err(ApiError::Forbidden.into());
    }
    let secret = Secret::new(f.key.trim());
    // Failed attempts count against the hub-wide hourly bucket; a member's good key
    // signs in whatever a stranger spent of it (keys are 192 random bits, and their
    // lookups are bounded by `server.max_key_lookups`). Before, every attempt took from
    // the bucket first: a stranger's posts kept every member out for the hour.
    let auth = match auth::authenticate(&st, &secret).await {
        Ok(a) => a,
        Err(ApiError::Unauthorized | ApiError::Blocked(_)) => {
            crate::accounts::per_hour(
                &st,
                &st.web.signins,
                0,
                st.config.web.signin_attempts_per_hour,
                "sign-in attempts",
            )?;
            return Ok(fresh_form(&st, StatusCode::UNAUTHORIZED, true));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(key_id = auth.key_id, "web sign-in");
    let lifetime = st.config.web.session_lifetime.as_secs();
    let (token, _) = st.web.issue(Some(&secret.hash()), lifetime);
    let mut r = Redirect::to("/web/me").into_response();
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(&st.config.web, SESSION_COOKIE, &token, "/", lifetime),
    );
    h.append(
        header::SET_COOKIE,
        set_cookie(&st.config.web, SIGNIN_COOKIE, "", "/web/signin", 0),
    );
    Ok(r)
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    csrf: String,
}

/// `POST /web/signout`: end every web session made with this session's key until now (a
/// copy of the cookie taken before is refused too): here at once, on the other hubs of
/// the database within the keys cache's `KEY_TTL`; and drop this browser's cookie. The
/// key itself stays valid for the API; revoke it to end that too.
pub(crate) async fn signout(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, WebError> {
    let s = session::session(&st, &headers).await?;
    let f: CsrfForm = form(&st, body).await?;
    s.check(&st.web, &f.csrf)?;
    // Never before this very session, whatever this hub's clock says against the clock
    // of the hub that made it.
    let at = session::sign_out_time().max(s.issued_us);
    st.store
        .sign_out_sessions(s.auth.key_id, at)
        .await
        .map_err(ApiError::from)?;
    st.keys.forget(&s.key_hash);
    tracing::info!(key_id = s.auth.key_id, "web sign-out");
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&st.config.web, SESSION_COOKIE, "", "/", 0),
    );
    Ok(r)
}
