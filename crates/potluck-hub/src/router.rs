//! Every route of the hub, one line each: the consumer's OpenAI API, members'
//! self-service, the admin API and the agents' tunnel upgrade.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};

use crate::accounts::{
    action_log, credits, invites, keys, members, providers, reports, sanctions, signup, usage,
};
use crate::api::{self, dialects, models};
use crate::metrics::scrape;
use crate::routing::accept;
use crate::state::HubState;
use crate::trust::admin as trust_admin;

/// Path of the guard verdicts (category codes only).
pub(crate) const GUARD_VERDICTS_PATH: &str = "/admin/v1/guard-verdicts";
/// The guard verdicts' former path, kept as an alias.
pub(crate) const GUARD_VERDICTS_ALIAS: &str = "/admin/v1/moderation";

/// The axum router over `state`.
pub(crate) fn router(state: Arc<HubState>) -> Router {
    let max = state.config.max_request_bytes;
    #[rustfmt::skip]
    let r = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(scrape::METRICS_PATH, get(scrape::metrics))
        .route(potluck_protocol::tunnel::TUNNEL_PATH, get(accept::accept))
        // The consumer's OpenAI API.
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*model}", get(models::get_model))
        .route("/v1/pool", get(models::pool))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/embeddings", post(api::embeddings))
        // The other consumer APIs, translated onto the same path.
        .route("/v1/messages", post(dialects::anthropic_messages))
        .route("/v1/messages/count_tokens", post(dialects::anthropic_count_tokens))
        .route("/v1/responses", post(dialects::responses))
        .route("/api/chat", post(dialects::ollama_chat))
        .route("/api/generate", post(dialects::ollama_generate))
        .route("/api/embed", post(dialects::ollama_embed))
        .route("/api/embeddings", post(dialects::ollama_embeddings))
        .route("/api/tags", get(dialects::ollama_tags))
        .route("/api/ps", get(dialects::ollama_ps))
        .route("/api/show", post(dialects::ollama_show))
        .route("/api/version", get(dialects::ollama_version))
        .route("/api/pull", post(dialects::ollama_manage))
        .route("/api/push", post(dialects::ollama_manage))
        .route("/api/create", post(dialects::ollama_manage))
        .route("/api/copy", post(dialects::ollama_manage))
        .route("/api/delete", delete(dialects::ollama_manage))
        .route(potluck_protocol::receipt::HUB_INFO_PATH, get(|State(st): State<Arc<HubState>>| async move { Json(st.identity.info()) }))
        // Members' self-service.
        .route("/v1/signup", post(signup::signup))
        .route("/v1/credits", get(credits::my_credits))
        .route("/v1/credits/history", get(credits::my_history))
        .route("/v1/usage", get(usage::my_usage))
        .route("/v1/keys", get(keys::my_keys).post(keys::create_my_key))
        .route("/v1/keys/{id}", delete(keys::revoke_my_key))
        .route("/v1/keys/{id}/settings", put(keys::my_key_settings))
        .route("/v1/reports", get(reports::my_reports).post(reports::file_report))
        .route("/v1/reports/{id}", get(reports::my_report))
        // Accounts (staff).
        .route("/admin/v1/accounts", get(members::list_accounts).post(members::create_account))
        .route("/admin/v1/accounts/{name}", get(members::show_account))
        .route("/admin/v1/accounts/{name}/approve", post(members::approve))
        .route("/admin/v1/accounts/{name}/role", put(members::set_role))
        .route("/admin/v1/accounts/{name}/groups", post(members::add_group))
        .route("/admin/v1/accounts/{name}/groups/{group}", delete(members::remove_group))
        .route("/admin/v1/accounts/{name}/credits", get(credits::account_credits).post(credits::grant))
        .route("/admin/v1/accounts/{name}/credits/history", get(credits::account_history))
        .route("/admin/v1/accounts/{name}/limits", put(credits::set_account_limits))
        .route("/admin/v1/invites", get(invites::list_invites).post(invites::create_invite))
        .route("/admin/v1/invites/{id}", delete(invites::revoke_invite))
        .route("/admin/v1/audit-log", get(action_log::audit_log))
        .route("/admin/v1/reports", get(reports::list_reports))
        .route("/admin/v1/reports/{id}", get(reports::show_report))
        .route("/admin/v1/reports/{id}/resolve", post(reports::resolve_report))
        .route("/admin/v1/usage", get(credits::usage))
        .route("/admin/v1/usage/summary", get(usage::admin_summary))
        // Keys and providers (admin).
        .route("/admin/v1/keys", get(keys::list_keys).post(keys::create_key))
        .route("/admin/v1/keys/{id}", delete(keys::revoke_key))
        .route("/admin/v1/keys/{id}/limits", put(credits::set_limits))
        .route("/admin/v1/keys/{id}/settings", put(keys::admin_key_settings))
        .route("/admin/v1/providers", get(providers::list_providers).post(providers::create_provider))
        .route("/admin/v1/providers/{id}", delete(providers::revoke_provider))
        .route("/admin/v1/providers/{id}/clawback", post(credits::clawback))
        // Sanctions (staff).
        .route("/admin/v1/accounts/{name}/sanction", post(sanctions::sanction_account))
        .route("/admin/v1/keys/{id}/sanction", post(sanctions::sanction_key))
        .route("/admin/v1/providers/{id}/sanction", post(sanctions::sanction_provider))
        // Trust (admin).
        .route("/admin/v1/providers/{id}/trust", put(trust_admin::set_trust))
        .route("/admin/v1/providers/{id}/release", post(trust_admin::release))
        .route("/admin/v1/providers/{id}/standing", get(trust_admin::reputation))
        .route(GUARD_VERDICTS_PATH, get(trust_admin::verdicts))
        .route(GUARD_VERDICTS_ALIAS, get(trust_admin::verdicts))
        .merge(crate::web::router(&state))
        .fallback(models::fallback)
        .method_not_allowed_fallback(models::method_not_allowed);
    // Our own cap is enforced while reading; this only lifts axum's default.
    let counted = axum::middleware::from_fn_with_state(Arc::clone(&state), scrape::count_responses);
    r.layer(axum::extract::DefaultBodyLimit::max(max.saturating_add(1)))
        .layer(counted)
        .with_state(state)
}

/// The separate metrics listener's router: `/metrics` only, without a key.
pub(crate) fn metrics_router(state: Arc<HubState>) -> Router {
    Router::new()
        .route(scrape::METRICS_PATH, get(scrape::open_metrics))
        .with_state(state)
}
