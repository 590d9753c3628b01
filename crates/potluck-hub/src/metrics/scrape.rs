//! `GET /metrics`: the gauges read from the hub's state at scrape time (providers and
//! tunnels connected, per-model providers, capacity, in flight and queue depth, requests
//! in flight, the usage queue), then the registry in the Prometheus text format. Served
//! to admin keys on the main listener, and without a key on `metrics_listen`. Also the
//! middleware that counts every HTTP answer by route template and status class.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::http::auth::{self, Action};
use crate::http::error::ApiError;
use crate::metrics::ModelLabel;
use crate::state::HubState;

/// Path of the metrics.
pub(crate) const METRICS_PATH: &str = "/metrics";

/// What is read from the state at each scrape.
#[derive(Default)]
pub(crate) struct Gauges {
    tunnels: Gauge,
    providers: Gauge,
    in_flight: Gauge,
    usage_queue_depth: Gauge,
    usage_queue_capacity: Gauge,
    usage_dropped: Counter,
    model_providers: Family<ModelLabel, Gauge>,
    model_capacity: Family<ModelLabel, Gauge>,
    model_in_flight: Family<ModelLabel, Gauge>,
    queue_depth: Family<ModelLabel, Gauge>,
}

impl Gauges {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "tunnels_connected",
            "Open provider tunnels",
            self.tunnels.clone(),
        );
        r.register(
            "providers_connected",
            "Distinct providers with an open tunnel",
            self.providers.clone(),
        );
        r.register(
            "requests_in_flight",
            "Consumer requests being served now",
            self.in_flight.clone(),
        );
        r.register(
            "usage_queue_depth",
            "Usage records waiting for the database writer",
            self.usage_queue_depth.clone(),
        );
        r.register(
            "usage_queue_capacity",
            "Capacity of the usage-record queue",
            self.usage_queue_capacity.clone(),
        );
        r.register(
            "usage_records_dropped",
            "Usage records dropped because the queue was full",
            self.usage_dropped.clone(),
        );
        r.register(
            "model_providers",
            "Providers serving each model",
            self.model_providers.clone(),
        );
        r.register(
            "model_capacity",
            "Request slots over each model's tunnels",
            self.model_capacity.clone(),
        );
        r.register(
            "model_in_flight",
            "Requests in flight on each model's tunnels",
            self.model_in_flight.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting in the queue for each model",
            self.queue_depth.clone(),
        );
    }
}

impl Gauges {
    /// Give every per-model gauge a sample (tests of the family list).
    #[cfg(test)]
    pub(crate) fn touch_every_model_gauge(&self, model: &str) {
        let l = ModelLabel {
            model: model.to_owned(),
        };
        for f in [
            &self.model_providers,
            &self.model_capacity,
            &self.model_in_flight,
            &self.queue_depth,
        ] {
            f.get_or_create(&l).set(1);
        }
    }
}

fn int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Set the gauges from the state (caller holds the scrape lock).
fn refresh(st: &HubState) {
    let g = &st.metrics.gauges;
    g.tunnels.set(int(st.registry.len()));
    g.providers.set(int(st.registry.provider_summary().len()));
    g.in_flight.set(int(st.inflight.len()));
    let (depth, capacity, dropped) = st.accounting.queue_stats();
    g.usage_queue_depth.set(int(depth));
    g.usage_queue_capacity.set(int(capacity));
    g.usage_dropped
        .inner()
        .store(dropped, std::sync::atomic::Ordering::Relaxed);
    for f in [
        &g.model_providers,
        &g.model_capacity,
        &g.model_in_flight,
        &g.queue_depth,
    ] {
        f.clear();
    }
    for (model, s) in st.registry.pool() {
        // A model takes a label of its own once it served a request here: a provider
        // announcing names by the thousand must not take every label first.
        let served = st.service_ms(&model).is_some();
        let label = ModelLabel {
            model: st.metrics.model_label(model.as_str(), served),
        };
        // Models past the label bound, or not yet served, add up under `other`.
        g.model_providers
            .get_or_create(&label)
            .inc_by(int(s.providers));
        g.model_capacity
            .get_or_create(&label)
            .inc_by(i64::from(s.capacity));
        g.model_in_flight
            .get_or_create(&label)
            .inc_by(i64::from(s.in_flight));
        g.queue_depth.get_or_create(&label).inc_by(int(s.queued));
    }
}

/// The metrics in the Prometheus text format.
pub(crate) fn render(st: &HubState) -> Response {
    let mut out = String::new();
    let encoded = {
        let _one = st.metrics.scrape_lock.lock();
        refresh(st);
        prometheus_text::encode(&mut out, &st.metrics.registry)
    };
    if encoded.is_err() {
        tracing::error!("encoding the metrics failed");
        return ApiError::Internal.into_response();
    }
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
    );
    resp
}

/// `GET /metrics` on the main listener: admin keys only.
pub(crate) async fn metrics(
    State(st): State<Arc<HubState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !st.config.metrics.on_main_listener {
        return Err(ApiError::NotFound("route"));
    }
    auth::staff(&st, &headers, Action::Usage).await?;
    Ok(render(&st))
}

/// `GET /metrics` on the separate listener (no key: bind it to a private address).
pub(crate) async fn open_metrics(State(st): State<Arc<HubState>>) -> Response {
    render(&st)
}

/// Count every answer by the route that matched (a template such as `/v1/keys/{id}`,
/// never the path a client typed) and its status class.
pub(crate) async fn count_responses(
    State(st): State<Arc<HubState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let resp = next.run(req).await;
    st.metrics.response(&route, resp.status().as_u16());
    resp
}
