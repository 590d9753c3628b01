//! The hub's end of the tunnel: authenticate the agent's upgrade, then act as the HTTP/2
//! client over it, read the agent's control stream and keep the registry in step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use potluck_protocol::tunnel::{
    AgentEvent, HubEvent, ModelOffer, CONTROL_PATH, FEATURE_RECEIPT_BATCHES, HEADER_FEATURES,
    HEADER_PROTOCOL_VERSION, MAX_CONTROL_LINE_BYTES, PROTOCOL_VERSION, UPGRADE_PROTOCOL,
};
use potluck_protocol::ErrorBody;
use potluck_protocol::ModelName;
use potluck_store::ProviderAuth;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::auth::bearer;
use crate::http::error::ApiError;
use crate::http::lines::Lines;
use crate::routing::events::{self, EVENTS_QUEUE};
use crate::routing::link::{OfferedModel, Outgoing, ProviderLink, MAX_REFUSALS_KEPT};
use crate::state::HubState;

/// Why a tunnel that sent no `hello` in time is closed.
const NO_HELLO: &str = "no hello within routing.hello_timeout";

/// Largest energy one request may report (100 Wh); more is implausible and ignored.
pub(crate) const MAX_ENERGY_PER_REQUEST_MJ: u64 = 360_000_000;

fn upgrade_required(message: &str) -> Response {
    let mut r = (
        StatusCode::UPGRADE_REQUIRED,
        ErrorBody::new("invalid_request_error", message, None, None).to_json(),
    )
        .into_response();
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn refused_token() -> Response {
    let body = ErrorBody::new(
        "authentication_error",
        "Unknown or revoked provider token. Create one with `potluck providers create` and pass it with --token.",
        None,
        Some("invalid_provider_token"),
    );
    let mut r = (StatusCode::UNAUTHORIZED, body.to_json()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn too_many_tunnels(max: u32) -> Response {
    let body = ErrorBody::new(
        "rate_limit_error",
        format!("This provider token already holds {max} open tunnels, the most this hub allows. Close one first."),
        None,
        Some("too_many_tunnels"),
    );
    let mut r = (StatusCode::TOO_MANY_REQUESTS, body.to_json()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `GET /v1/tunnel`: check the token and protocol, answer 101, and start the tunnel task.
pub(crate) async fn accept(State(state): State<Arc<HubState>>, mut req: Request) -> Response {
    let wants_tunnel = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !wants_tunnel {
        return upgrade_required(
            "This endpoint is for provider agents: it needs 'Upgrade: potluck-tunnel/1'.",
        );
    }
    let version = req
        .headers()
        .get(HEADER_PROTOCOL_VERSION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if version != Some(PROTOCOL_VERSION) {
        return upgrade_required(
            "Unsupported tunnel protocol version: upgrade the agent (this hub speaks version 1).",
        );
    }
    let receipt_batches = req
        .headers()
        .get(HEADER_FEATURES)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == FEATURE_RECEIPT_BATCHES));
    let Some(token) = bearer(req.headers()) else {
        return refused_token();
    };
    let provider = match crate::http::auth::provider(&state, &token).await {
        Ok(p) => match p.block.clone() {
            Some(block) => {
                tracing::info!(
                    provider_id = p.provider_id,
                    "tunnel refused: provider not in good standing"
                );
                return ApiError::Blocked(block).into_response();
            }
            None => p,
        },
        Err(ApiError::Unauthorized) => {
            tracing::debug!("tunnel refused: unknown or revoked provider token");
            return refused_token();
        }
        Err(e) => return e.into_response(),
    };
    let Some(permit) = state.registry.open_tunnel(provider.provider_id) else {
        tracing::info!(
            provider_id = provider.provider_id,
            "tunnel refused: the provider holds the most tunnels allowed"
        );
        return too_many_tunnels(state.config.routing.max_tunnels_per_provider);
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
        return ApiError::Internal.into_response();
    };
    let st = Arc::clone(&state);
    state.tasks.spawn(async move {
        run(st, provider, on_upgrade, receipt_batches).await;
        drop(permit);
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    r
}

/// One tunnel's life: HTTP/2 handshake, control stream, registry membership. Receipts go
/// to the agent as whole batches when it said it takes them (`receipt_batches`).
async fn run(
    state: Arc<HubState>,
    provider: ProviderAuth,
    on_upgrade: OnUpgrade,
    receipt_batches: bool,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(provider_id = provider.provider_id, error = %e, "tunnel upgrade failed");
            return;
        }
    };
    let (sender, conn) = match potluck_tunnel::client::handshake(TokioIo::new(upgraded)).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(provider_id = provider.provider_id, error = %e, "tunnel HTTP/2 handshake failed");
            return;
        }
    };
    let conn_id = state.registry.next_conn_id();
    let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUE);
    let tunnel = Arc::new(ProviderLink::new(
        conn_id,
        provider.provider_id,
        provider.account_id,
        provider.name.clone(),
        sender.clone(),
        events_tx,
        state.registry.health_of(provider.provider_id),
    ));
    // In the registry before the provider's standing is read again: a revocation,
    // sanction or change of trust from now on reaches this tunnel, and one before it is
    // in the read. Nothing is routed to it before its hello.
    state.registry.insert(Arc::clone(&tunnel));
    if let Err(why) = admit_tunnel(&state, &tunnel).await {
        tracing::info!(
            provider_id = provider.provider_id,
            reason = why,
            "tunnel refused"
        );
        state.registry.remove(conn_id);
        return;
    }
    let done = CancellationToken::new();
    let _done_guard = done.clone().drop_guard();
    state.tasks.spawn(events::send_events(
        Arc::clone(&state),
        sender,
        events_rx,
        done,
        provider.provider_id,
        receipt_batches,
    ));
    let span = tracing::info_span!("tunnel", conn_id, provider_id = provider.provider_id);
    tracing::info!(parent: &span, provider = %provider.name, "tunnel open");

    tokio::pin!(conn);
    let greeted = AtomicBool::new(false);
    let control = control_stream(&state, &tunnel, &greeted);
    tokio::pin!(control);
    let revoked = tunnel.cancel.clone();
    tokio::select! {
        r = &mut conn => {
            tracing::info!(parent: &span, result = ?r.err().map(|e| e.to_string()), "tunnel closed by peer");
        }
        r = &mut control => {
            if let Err(why) = r {
                tracing::warn!(parent: &span, reason = %why, "control stream ended");
            }
            // Route nothing new here, but let streams in flight finish (a tunnel that
            // never said hello has none).
            state.registry.remove(conn_id);
            if !greeted.load(Ordering::Relaxed) {
                return;
            }
            tokio::select! {
                _ = &mut conn => {}
                _ = state.hard_stop.cancelled() => {}
                _ = revoked.cancelled() => {}
            }
        }
        _ = state.hard_stop.cancelled() => {}
        _ = revoked.cancelled() => {
            tracing::info!(parent: &span, "tunnel closed: provider revoked");
        }
    }
    state.registry.remove(conn_id);
    tracing::info!(parent: &span, "tunnel gone");
}

/// Ask the store again, now that `tunnel` is in the registry, whether its provider may
/// be served (its token not revoked, it and its account in good standing), and set its
/// trust flags from the same moment. A change of trust that lands during the read has
/// already set them; the read is then made again. Any failure refuses the tunnel (the
/// agent tries again later): a quarantined provider is not let in because a read failed.
async fn admit_tunnel(state: &HubState, tunnel: &ProviderLink) -> Result<(), &'static str> {
    const TRIES: usize = 3;
    match state.store.provider_admission(tunnel.provider_id).await {
        Ok(Some(p)) if p.block.is_none() => {}
        Ok(_) => return Err("provider revoked or not in good standing"),
        Err(_) => return Err("the store could not be read"),
    }
    for _ in 0..TRIES {
        let seen = state.registry.trust_epoch();
        let Ok(st) = state.store.standing(tunnel.provider_id).await else {
            return Err("the store could not be read");
        };
        let quarantined = st.quarantined_at_ms.is_some();
        if state
            .registry
            .apply_standing(tunnel, seen, st.trusted, quarantined)
        {
            return Ok(());
        }
    }
    Err("its trust kept changing while it was read")
}

/// Open the control stream and apply its events until it ends. The agent's `hello` must
/// come within `routing.hello_timeout` of the tunnel's opening; `greeted` says whether
/// it came.
async fn control_stream(
    state: &HubState,
    tunnel: &Arc<ProviderLink>,
    greeted: &AtomicBool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + state.config.routing.hello_timeout;
    let req = http::Request::builder()
        .method("GET")
        .uri(CONTROL_PATH)
        .body(Bytes::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout_at(deadline, tunnel.sender.send_lasting(req))
        .await
        .map_err(|_| NO_HELLO.to_owned())?
        .map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!(
            "agent answered {} to the control request",
            resp.status()
        ));
    }
    let mut body = resp.into_body();
    let mut lines = Lines::default();
    let mut hello = false;
    let per_minute = state.config.routing.max_offer_changes_per_minute;
    loop {
        let next = if hello {
            body.frame().await
        } else {
            tokio::time::timeout_at(deadline, body.frame())
                .await
                .map_err(|_| NO_HELLO.to_owned())?
        };
        let frame = match next {
            None => return Err("agent closed the control stream".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        lines.push(&data);
        while let Some(line) = lines.next_line() {
            let ev = AgentEvent::decode(&line).map_err(|e| e.to_string())?;
            let offer = matches!(ev, AgentEvent::Models { .. } | AgentEvent::Hello { .. });
            if offer && !tunnel.health.allow_offer(per_minute, Instant::now()) {
                return Err(
                    "offer changes faster than routing.max_offer_changes_per_minute".into(),
                );
            }
            apply(state, tunnel, ev, &mut hello)?;
            greeted.store(hello, Ordering::Relaxed);
        }
        if lines.pending() > MAX_CONTROL_LINE_BYTES {
            return Err("control line too long".into());
        }
    }
}

fn apply(
    state: &HubState,
    tunnel: &Arc<ProviderLink>,
    ev: AgentEvent,
    greeted: &mut bool,
) -> Result<(), String> {
    match ev {
        AgentEvent::Hello {
            protocol,
            agent_version,
            models,
            max_concurrency,
            profile,
            accepting,
        } => {
            if protocol != PROTOCOL_VERSION {
                return Err(format!("agent speaks protocol {protocol}"));
            }
            if *greeted {
                return Err("second hello".into());
            }
            *greeted = true;
            tracing::info!(
                conn_id = tunnel.conn_id,
                provider_id = tunnel.provider_id,
                agent_version = %agent_version.chars().take(32).collect::<String>(),
                models = models.len(),
                max_concurrency,
                device = ?profile.device,
                accepting,
                "provider ready"
            );
            let models = admit(state, tunnel, models);
            state
                .registry
                .set_offer(tunnel.conn_id, models, max_concurrency, profile, accepting);
        }
        AgentEvent::Models {
            models,
            max_concurrency,
            profile,
            accepting,
        } => {
            if !*greeted {
                return Err("models before hello".into());
            }
            tracing::info!(
                conn_id = tunnel.conn_id,
                provider_id = tunnel.provider_id,
                models = models.len(),
                max_concurrency,
                accepting,
                "provider offer changed"
            );
            let models = admit(state, tunnel, models);
            state
                .registry
                .set_offer(tunnel.conn_id, models, max_concurrency, profile, accepting);
        }
        AgentEvent::Energy {
            model, millijoules, ..
        } => {
            if *greeted
                && tunnel.take_energy_report()?
                && millijoules <= MAX_ENERGY_PER_REQUEST_MJ
                && tunnel.offers(&model)
            {
                state
                    .registry
                    .add_energy(tunnel.provider_id, &model, millijoules);
            }
        }
    }
    Ok(())
}

/// Whether `m`'s refusal is new for this tunnel (and so told and logged): each is told
/// once, and at most [`MAX_REFUSALS_KEPT`] are remembered; past them, none is told.
fn first_refusal(tunnel: &ProviderLink, m: &ModelOffer) -> bool {
    let mut refused = tunnel.refused.lock();
    if refused.len() >= MAX_REFUSALS_KEPT {
        return false;
    }
    refused.insert(format!("{}\n{:?}", m.id, m.sha256))
}

/// Check each offered model against the hub's allow-list; tell the agent why a model is
/// refused.
fn admit(
    state: &HubState,
    tunnel: &ProviderLink,
    models: Vec<ModelOffer>,
) -> std::collections::HashMap<ModelName, OfferedModel> {
    let mut out = std::collections::HashMap::with_capacity(models.len());
    for m in models {
        match state.config.check_model(m.id.as_str(), m.sha256.as_ref()) {
            Ok(()) => {
                out.insert(m.id.clone(), OfferedModel::from(&m));
            }
            Err(reason) => {
                if !first_refusal(tunnel, &m) {
                    continue;
                }
                // The name and hash are the provider's own announcement, not consumer input.
                tracing::warn!(
                    provider_id = tunnel.provider_id,
                    model = %m.id,
                    sha256 = ?m.sha256.as_ref().map(|h| h.as_str()),
                    "model refused: {reason}"
                );
                let _ = tunnel
                    .events
                    .try_send(Outgoing::Event(HubEvent::ModelRefused {
                        model: m.id,
                        reason,
                    }));
            }
        }
    }
    out
}
