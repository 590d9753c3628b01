//! A volunteer's page (an account that owns providers): each provider's state (online,
//! draining, quarantined, offline), requests and tokens served, the account's earnings
//! (vested and in escrow), reputation and recent audits, the guard it requires, energy.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Response;
use http::HeaderMap;
use potluck_protocol::usage::GroupBy;
use potluck_store::listing::PageReq;

use crate::accounts::usage;
use crate::http::error::ApiError;
use crate::state::HubState;
use crate::web::public::today;
use crate::web::session::session;
use crate::web::{credits, render, when_ms, Nav, WebError};

/// Recent audits shown per provider.
const AUDITS_SHOWN: i64 = 5;

pub(crate) struct AuditLine {
    when: String,
    kind: String,
    passed: bool,
    score: String,
}

pub(crate) struct ProviderCard {
    id: i64,
    name: String,
    state: &'static str,
    requests: i64,
    tokens: i64,
    reputation: String,
    trusted: bool,
    guard: String,
    energy: String,
    audits: Vec<AuditLine>,
}

#[derive(Template)]
#[template(path = "volunteer.html")]
struct VolunteerPage {
    nav: Nav,
    earned: String,
    available: String,
    escrow: String,
    chart_days: u32,
    providers: Vec<ProviderCard>,
}

/// The live view of one provider: (online, accepting, guard, energy).
fn live(st: &HubState, name: &str, online: bool) -> (bool, String, String) {
    let mut accepting = false;
    let mut guard = "none".to_owned();
    let mut energy = "not measured".to_owned();
    for m in st.registry.pool_view().values() {
        for p in m.by_provider.iter().filter(|p| p.provider == name) {
            accepting |= p.accepting;
            guard = format!("{:?}", p.moderation).to_lowercase();
            if let Some(wh) = p.wh_per_1k_tokens.filter(|w| w.is_finite()) {
                energy = format!("{wh:.3} Wh per 1k tokens");
            }
        }
    }
    (online && accepting, guard, energy)
}

/// `GET /web/volunteer`
pub(crate) async fn page(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let s = session(&st, &headers).await?;
    let me = s.auth.account_id;
    let err = ApiError::from;
    // A member's own read: in turn with the others (`server.max_member_reads`).
    let _turn = crate::http::auth::member_read(&st).await?;
    // One page of the member's own providers, read alone (never every provider), and
    // what they served (never the whole hub's usage).
    let page = PageReq::first(st.config.web.page_rows);
    let owned = st.store.providers_of_account(me, page).await.map_err(err)?;
    let q = usage::UsageQuery::last_days(today(), st.config.web.chart_days, GroupBy::Provider);
    let served = usage::served_totals(&st, q, me).await?.data;
    let online = st.registry.provider_summary();
    let mut providers = Vec::new();
    for p in owned.items {
        let standing = st.store.standing(p.id).await.map_err(err)?;
        let audits = st
            .store
            .audit_history(p.id, AUDITS_SHOWN)
            .await
            .map_err(err)?;
        let (accepting, guard, energy) = live(&st, &p.name, online.contains_key(&p.id));
        let use_ = served.iter().find(|b| b.group == p.id.to_string());
        let state = match (
            standing.quarantined_at_ms,
            online.contains_key(&p.id),
            accepting,
        ) {
            (Some(_), _, _) => "quarantined",
            (None, false, _) => "offline",
            (None, true, false) => "draining",
            (None, true, true) => "online",
        };
        providers.push(ProviderCard {
            id: p.id,
            name: p.name,
            state,
            requests: use_.map_or(0, |b| b.requests),
            tokens: use_.map_or(0, |b| b.prompt_tokens.saturating_add(b.completion_tokens)),
            reputation: format!("{:.2}", standing.reputation),
            trusted: standing.trusted,
            guard,
            energy,
            audits: audits
                .into_iter()
                .map(|(kind, passed, _, score, at)| AuditLine {
                    when: when_ms(at),
                    kind,
                    passed,
                    score: format!("{score:.2}"),
                })
                .collect(),
        });
    }
    let b = st.store.balance(me).await.map_err(err)?;
    let earned = st.store.total_earned(me).await.map_err(err)?;
    let page = VolunteerPage {
        nav: Nav::of(&s),
        earned: credits(earned),
        available: credits(b.available),
        escrow: credits(b.unvested),
        chart_days: st.config.web.chart_days,
        providers,
    };
    Ok(render(&page))
}
