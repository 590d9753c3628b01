//! The dashboard's assets, embedded in the binary: one stylesheet and one small script
//! that draws bar charts as inline SVG from the hub's own JSON. No CDN, no fonts.

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

const STYLE: &str = include_str!("../../assets/style.css");
const CHARTS: &str = include_str!("../../assets/charts.js");

/// `GET /web/assets/{name}`
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        "charts.js" => (CHARTS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    r
}
