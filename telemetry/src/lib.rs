//! Prometheus exposition shared by Fulcrum's control plane and routers: both read their metrics
//! from their own state at scrape time (a `prometheus_client` [`Collector`]), and serve them on
//! a listener of their own at `GET /metrics` in the text format.
//!
//! - [`family`]: encode one metric family from rows of labels and values.
//! - [`render`]: a collector's metrics as text.
//! - [`serve`]: the HTTP endpoint.

#![warn(missing_docs)]

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// A sample's labels.
pub type Labels = Vec<(&'static str, String)>;

/// Encodes one metric family from `(labels, value)` rows; a row without labels is written as a
/// bare sample (`name value`, not `name{} value`) and ends the family.
pub fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        if labels.is_empty() {
            return value.encode(metric);
        }
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// `collector`'s metrics in Prometheus' text format.
pub fn render<C: Collector + Clone>(collector: &C) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector.clone()));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        // Only a formatting error of `String`'s writer, which cannot fail.
        let _ = writeln!(out, "# encoding failed: {e}");
    }
    out
}

/// Serves `GET /metrics` (anything else: 404) on `listener` with `collector`'s metrics, until
/// the task is dropped.
pub async fn serve<C: Collector + Clone>(
    collector: C,
    listener: TcpListener,
) -> std::io::Result<()> {
    let collector = Arc::new(collector);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let collector = collector.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(collector.as_ref()),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
