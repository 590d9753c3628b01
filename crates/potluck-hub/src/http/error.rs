//! Every error the consumer API returns, mapped to OpenAI's shape and status exactly once.
//!
//! Messages are fixed strings or carry only validated names (a model name, a header
//! name): never request or response content, never internal details.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use potluck_protocol::ErrorBody;

/// Who caused a fault, for logs and for retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The consumer's request was at fault.
    Consumer,
    /// A provider failed or misbehaved.
    Provider,
    /// The pool had no room, or the hub itself failed.
    Hub,
}

/// A consumer-facing error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{message}")]
    BadRequest {
        /// What is wrong (no content echoed).
        message: String,
        /// The field at fault.
        param: Option<&'static str>,
        /// Stable code.
        code: Option<&'static str>,
    },
    /// 401: missing or wrong key.
    #[error("invalid API key")]
    Unauthorized,
    /// 403: the key may not do this.
    #[error("this key may not use this endpoint")]
    Forbidden,
    /// 403: the account, key or provider is pending, suspended or banned (the reason is
    /// the moderator's text, shown to the refused party).
    #[error("refused: not in good standing")]
    Blocked(potluck_store::Block),
    /// 403: a refusal with a fixed message (an invalid invite code, a moderator acting
    /// on staff).
    #[error("{0}")]
    Refused(&'static str),
    /// 404: no such model in the pool now.
    #[error("model not found")]
    ModelNotFound(String),
    /// 404: no such route or object.
    #[error("not found")]
    NotFound(&'static str),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413.
    #[error("request body too large")]
    PayloadTooLarge(usize),
    /// 415.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 408: the body did not arrive within `server.body_read_timeout`.
    #[error("request body timed out")]
    RequestTimeout,
    /// 503: no provider can take it now.
    #[error("no provider available")]
    NoCapacity {
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 429: a per-key limit was hit.
    #[error("rate limited")]
    RateLimited {
        /// Which limit.
        which: &'static str,
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 429: the account has no credits left (`x-should-retry: false`).
    #[error("out of credits")]
    InsufficientCredits,
    /// 503: waited in the queue for longer than `queue.max_wait`.
    #[error("queue wait timed out")]
    QueueTimeout {
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 503: `server.max_key_lookups` credential lookups were in progress for all of
    /// `server.key_lookup_wait` (many keys the hub had not seen lately at once).
    #[error("key lookups busy")]
    LookupsBusy {
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 503: the usage queue stayed full for `usage_queue_wait`; refused before it was
    /// served, so that no answered request goes unbilled.
    #[error("usage backlog")]
    UsageBacklog {
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 503: the whole answers the hub holds fill `max_buffered_answer_bytes`; not the
    /// provider's fault.
    #[error("hub overloaded")]
    Overloaded {
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// 502: the provider failed.
    #[error("provider failed")]
    ProviderFailed(&'static str),
    /// 504: the provider took too long.
    #[error("provider timed out")]
    ProviderTimeout,
    /// 400: the provider's backend refused a prompt longer than its model's context (the
    /// agent's [`potluck_protocol::tunnel::HEADER_CONTEXT_OVERFLOW`]); answered in the
    /// hub's words, with the backend's two figures.
    #[error("the prompt is longer than the model's context")]
    ContextTooLong {
        /// The prompt's tokens, as the provider's backend counted them.
        prompt: u64,
        /// The model's context there, in tokens.
        limit: u64,
        /// The request's input field (`messages`, `prompt`, `input`).
        param: &'static str,
    },
    /// A provider refused the request (400, 413 or 422): its status only, with the hub's
    /// own message (a provider's text never reaches a consumer).
    #[error("backend rejected the request")]
    Upstream {
        /// The provider's status (4xx only).
        status: StatusCode,
    },
    /// 409: a name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 500: the hub failed. Details are logged, not returned.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// Shorthand for a 400.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param,
            code: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::Blocked(_) | ApiError::Refused(_) => {
                StatusCode::FORBIDDEN
            }
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::NoCapacity { .. }
            | ApiError::QueueTimeout { .. }
            | ApiError::UsageBacklog { .. }
            | ApiError::LookupsBusy { .. }
            | ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } | ApiError::InsufficientCredits => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::ProviderFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::ProviderTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Upstream { status } => *status,
            ApiError::ContextTooLong { .. } => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Who caused it.
    pub fn blame(&self) -> Blame {
        match self {
            ApiError::ProviderFailed(_) | ApiError::ProviderTimeout => Blame::Provider,
            ApiError::NoCapacity { .. }
            | ApiError::QueueTimeout { .. }
            | ApiError::UsageBacklog { .. }
            | ApiError::LookupsBusy { .. }
            | ApiError::Overloaded { .. }
            | ApiError::Internal => Blame::Hub,
            _ => Blame::Consumer,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> ErrorBody {
        match self {
            ApiError::BadRequest { message, param, code } => {
                ErrorBody::new("invalid_request_error", message.clone(), *param, *code)
            }
            ApiError::Unauthorized => ErrorBody::new(
                "authentication_error",
                "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.",
                None,
                Some("invalid_api_key"),
            ),
            ApiError::Forbidden => ErrorBody::new("permission_error", "This key may not use this endpoint.", None, None),
            ApiError::Blocked(b) => {
                let (code, message) = blocked_message(b);
                ErrorBody::new("permission_error", message, None, Some(code))
            }
            ApiError::Refused(m) => ErrorBody::new("permission_error", *m, None, Some("refused")),
            ApiError::ModelNotFound(m) => ErrorBody::new(
                "invalid_request_error",
                format!("The model '{m}' is not served by any provider in the pool right now. GET /v1/models lists the models available."),
                Some("model"),
                Some("model_not_found"),
            ),
            ApiError::NotFound(what) => ErrorBody::new("invalid_request_error", format!("Unknown {what}."), None, Some("not_found")),
            ApiError::MethodNotAllowed => ErrorBody::new("invalid_request_error", "Method not allowed for this path.", None, None),
            ApiError::PayloadTooLarge(limit) => ErrorBody::new(
                "invalid_request_error",
                format!("Request body is larger than this hub's limit of {limit} bytes."),
                None,
                Some("request_too_large"),
            ),
            ApiError::UnsupportedMediaType => ErrorBody::new(
                "invalid_request_error",
                "Send the request body as JSON with 'Content-Type: application/json'.",
                None,
                None,
            ),
            ApiError::RequestTimeout => ErrorBody::new(
                "invalid_request_error",
                "The request body did not arrive within the time this hub allows.",
                None,
                Some("request_timeout"),
            ),
            ApiError::NoCapacity { .. } => ErrorBody::new(
                "server_error",
                "No provider can take this request right now. Retry later.",
                None,
                Some("no_capacity"),
            ),
            ApiError::RateLimited { which, retry_after } => ErrorBody::new(
                "requests",
                format!("Rate limit reached for {which} on this account. Retry after {retry_after} s."),
                None,
                Some("rate_limit_exceeded"),
            ),
            ApiError::InsufficientCredits => ErrorBody::new(
                "insufficient_quota",
                "This account's available credits do not cover this request's largest possible cost (its prompt and max_tokens at the model's price, plus tax; credits held by requests in flight are not available). Set a smaller max_tokens, earn credits by providing to the pool, or ask the hub operator for a grant.",
                None,
                Some("insufficient_quota"),
            ),
            ApiError::QueueTimeout { .. } => ErrorBody::new(
                "server_error",
                "Waited too long for a free provider. Retry later.",
                None,
                Some("queue_timeout"),
            ),
            ApiError::Overloaded { .. } => ErrorBody::new(
                "server_error",
                "The hub holds as many large answers as it may now. Retry later.",
                None,
                Some("hub_overloaded"),
            ),
            ApiError::UsageBacklog { .. } => ErrorBody::new(
                "server_error",
                "The hub is busy recording usage. Retry later.",
                None,
                Some("usage_backlog"),
            ),
            ApiError::LookupsBusy { .. } => ErrorBody::new(
                "server_error",
                "The hub is checking many keys at once. Retry in a moment.",
                None,
                Some("hub_busy"),
            ),
            ApiError::ProviderFailed(why) => {
                ErrorBody::new("server_error", format!("The provider failed: {why}."), None, Some("provider_error"))
            }
            ApiError::ProviderTimeout => {
                ErrorBody::new("server_error", "The provider did not answer in time.", None, Some("provider_timeout"))
            }
            ApiError::ContextTooLong { prompt, limit, param } => ErrorBody::new(
                "invalid_request_error",
                format!("This model's maximum context length is {limit} tokens. However, your messages resulted in {prompt} tokens. Please reduce the length of the messages."),
                Some(param),
                Some("context_length_exceeded"),
            ),
            ApiError::Upstream { status } => ErrorBody::new(
                "invalid_request_error",
                format!("The provider refused the request (HTTP {}). Check its parameters; GET /v1/models shows each model's limits.", status.as_u16()),
                None,
                Some("provider_refused"),
            ),
            ApiError::Conflict(m) => ErrorBody::new("invalid_request_error", m.clone(), None, Some("conflict")),
            ApiError::Internal => ErrorBody::new("server_error", "Internal error in the hub.", None, None),
        }
    }
}

/// Error code and message of a refusal for standing. Codes are stable:
/// `account_pending`, `account_suspended`, `account_banned`, `key_suspended`,
/// `key_banned`, `provider_suspended`, `provider_banned`.
fn blocked_message(b: &potluck_store::Block) -> (&'static str, String) {
    use potluck_store::{Standing, Target};
    let (code, what) = match (b.target, b.standing) {
        (Target::Account, Standing::Pending) | (_, Standing::Active) => {
            return (
                "account_pending",
                "This account is waiting for a moderator's approval.".into(),
            )
        }
        (Target::Account, Standing::Suspended) => {
            ("account_suspended", "This account is suspended")
        }
        (Target::Account, Standing::Banned) => ("account_banned", "This account is banned"),
        (Target::Key, Standing::Banned) => ("key_banned", "This key is banned"),
        (Target::Key, _) => ("key_suspended", "This key is suspended"),
        (Target::Provider, Standing::Banned) => ("provider_banned", "This provider is banned"),
        (Target::Provider, _) => ("provider_suspended", "This provider is suspended"),
    };
    let message = match &b.reason {
        Some(r) => format!("{what} by a moderator: {r}"),
        None => format!("{what} by a moderator."),
    };
    (code, message)
}

/// On the response of [`ApiError::ContextTooLong`]: its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContextOverflow {
    /// The prompt's tokens.
    pub(crate) prompt: u64,
    /// The model's context, in tokens.
    pub(crate) limit: u64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), self.body().to_json()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            ApiError::NoCapacity { retry_after }
            | ApiError::QueueTimeout { retry_after }
            | ApiError::UsageBacklog { retry_after }
            | ApiError::LookupsBusy { retry_after }
            | ApiError::Overloaded { retry_after }
            | ApiError::RateLimited { retry_after, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            ApiError::InsufficientCredits => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            ApiError::ContextTooLong { prompt, limit, .. } => {
                // For the other APIs, which say it in their own words.
                resp.extensions_mut()
                    .insert(ContextOverflow { prompt, limit });
            }
            _ => {}
        }
        resp
    }
}

impl From<potluck_store::StoreError> for ApiError {
    fn from(e: potluck_store::StoreError) -> Self {
        match e {
            potluck_store::StoreError::NotFound => ApiError::NotFound("object"),
            potluck_store::StoreError::Conflict(m) => ApiError::Conflict(m),
            potluck_store::StoreError::Refused(m) => ApiError::Refused(m),
            potluck_store::StoreError::Db(e) => {
                tracing::error!(error = %e, "database error");
                ApiError::Internal
            }
        }
    }
}
