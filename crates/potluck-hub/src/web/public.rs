//! The public status page (`/`, `[web] public_status`): models served now with providers,
//! capacity and queue, requests and tokens per day, providers online over time (sampled
//! in memory), the median time to first token, energy per 1k tokens by device class.
//! Everything on it comes from the registry, the metrics and aggregates of the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use askama::Template;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use http::HeaderMap;
use potluck_protocol::usage::UtcDay;
use potluck_store::analytics::{Grouping, UsageFilter};
use serde::Serialize;

use crate::state::HubState;
use crate::web::{render, session, when_ms, Nav, WebError};

/// One model served now.
pub(crate) struct ModelRow {
    name: String,
    providers: usize,
    capacity: u32,
    in_flight: u32,
    queued: usize,
}

/// Requests and tokens of one day.
#[derive(Serialize, Clone)]
pub(crate) struct DayRow {
    pub(crate) day: String,
    pub(crate) requests: i64,
    pub(crate) tokens: i64,
}

/// Providers online at one sample.
#[derive(Serialize)]
pub(crate) struct OnlineRow {
    at: String,
    providers: usize,
}

/// Energy of one device class.
pub(crate) struct EnergyRow {
    device: String,
    providers: usize,
    wh: String,
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage {
    nav: Nav,
    models: Vec<ModelRow>,
    chart_days: u32,
    days: Vec<DayRow>,
    sample_secs: u64,
    online: Vec<OnlineRow>,
    ttft: String,
    energy: Vec<EnergyRow>,
}

/// What the charts draw (`/web/status.json`).
#[derive(Serialize)]
struct StatusJson {
    days: Vec<DayRow>,
    online: Vec<OnlineRow>,
}

/// Today, UTC.
pub(crate) fn today() -> UtcDay {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    UtcDay::of_ms(ms)
}

/// Requests and tokens per day over the chart's days, every day present (zeros too),
/// for one account or the whole hub. The whole hub's chart (public, shown to strangers)
/// is read from the store at most once per `web.chart_cache`; every chart is read one
/// at a time (`WebState::chart_reads`), so that views of the pages, however many at
/// once, take at most one of the store's connections.
pub(crate) async fn daily(st: &HubState, account_id: Option<i64>) -> Result<Vec<DayRow>, WebError> {
    let cached = || {
        let c = st.web.hub_chart.lock();
        c.as_ref()
            .filter(|(at, _)| at.elapsed() < st.config.web.chart_cache)
            .map(|(_, rows)| rows.as_ref().clone())
    };
    if account_id.is_none() {
        if let Some(rows) = cached() {
            return Ok(rows);
        }
    }
    let _one_at_a_time = st.web.chart_reads.lock().await;
    if account_id.is_none() {
        // Read by the view this one waited for.
        if let Some(rows) = cached() {
            return Ok(rows);
        }
    }
    let rows = read_daily(st, account_id).await?;
    if account_id.is_none() {
        *st.web.hub_chart.lock() = Some((Instant::now(), Arc::new(rows.clone())));
    }
    Ok(rows)
}

/// [`daily`], read from the store.
async fn read_daily(st: &HubState, account_id: Option<i64>) -> Result<Vec<DayRow>, WebError> {
    let to = today();
    let from = to.plus(1 - i64::from(st.config.web.chart_days));
    let filter = UsageFilter {
        from_ms: from.start_ms(),
        to_ms: to.plus(1).start_ms(),
        account_id,
        served_by: None,
    };
    let (rows, _) = st
        .store
        .usage_totals(filter, Grouping::Day, st.config.web.chart_days)
        .await
        .map_err(crate::http::error::ApiError::from)?;
    let by_day: BTreeMap<String, (i64, i64)> = rows
        .into_iter()
        .map(|r| {
            let tokens = r.prompt_tokens.saturating_add(r.completion_tokens);
            (r.group, (r.requests, tokens))
        })
        .collect();
    Ok((0..i64::from(st.config.web.chart_days))
        .map(|i| {
            let day = from.plus(i).to_string();
            let (requests, tokens) = by_day.get(&day).copied().unwrap_or((0, 0));
            DayRow {
                day,
                requests,
                tokens,
            }
        })
        .collect())
}

/// Take a sample of providers online if the last is older than `sample_interval`, and
/// return the samples kept.
fn online(st: &HubState) -> Vec<OnlineRow> {
    let cfg = &st.config.web;
    {
        let mut last = st.web.last_sample.lock();
        if last.is_none_or(|t| t.elapsed() >= cfg.sample_interval) {
            *last = Some(Instant::now());
            let n = st.registry.provider_summary().len();
            let now = crate::web::now_ms();
            let mut s = st.web.samples.lock();
            if s.len() >= cfg.history_samples {
                s.pop_front();
            }
            s.push_back((now, n));
        }
    }
    st.web
        .samples
        .lock()
        .iter()
        .map(|&(ms, providers)| OnlineRow {
            at: when_ms(ms),
            providers,
        })
        .collect()
}

fn energy(st: &HubState) -> Vec<EnergyRow> {
    let mut by: BTreeMap<String, (std::collections::HashSet<String>, f64, usize)> = BTreeMap::new();
    for m in st.registry.pool_view().values() {
        for p in &m.by_provider {
            let e = by
                .entry(format!("{:?}", p.device).to_lowercase())
                .or_default();
            if e.0.insert(p.provider.clone()) {
                if let Some(wh) = p.wh_per_1k_tokens.filter(|w| w.is_finite()) {
                    e.1 += wh;
                    e.2 += 1;
                }
            }
        }
    }
    by.into_iter()
        .map(|(device, (providers, sum, n))| EnergyRow {
            device,
            providers: providers.len(),
            wh: if n == 0 {
                "not measured yet".into()
            } else {
                format!("{:.3}", sum / n as f64)
            },
        })
        .collect()
}

/// `GET /`: the public status page (or the sign-in page when it is turned off).
pub(crate) async fn status(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    if !st.config.web.public_status {
        return Ok(Redirect::to("/web/signin").into_response());
    }
    let nav = match session::session(&st, &headers).await {
        Ok(s) => Nav::of(&s),
        Err(_) => Nav::default(),
    };
    let models = st
        .registry
        .pool_view()
        .iter()
        .map(|(name, m)| ModelRow {
            name: name.to_string(),
            providers: m.providers,
            capacity: m.capacity,
            in_flight: m.in_flight,
            queued: m.queued,
        })
        .collect();
    let page = StatusPage {
        nav,
        models,
        chart_days: st.config.web.chart_days,
        days: daily(&st, None).await?,
        sample_secs: st.config.web.sample_interval.as_secs(),
        online: online(&st),
        ttft: st.metrics.median_ttft().map_or_else(
            || "no request yet".into(),
            |s| format!("{:.0} ms", s * 1000.0),
        ),
        energy: energy(&st),
    };
    Ok(render(&page))
}

/// `GET /web/status.json`: what the status page's charts draw.
pub(crate) async fn status_json(State(st): State<Arc<HubState>>) -> Result<Response, WebError> {
    if !st.config.web.public_status {
        return Err(crate::http::error::ApiError::NotFound("page").into());
    }
    Ok(Json(StatusJson {
        days: daily(&st, None).await?,
        online: online(&st),
    })
    .into_response())
}
