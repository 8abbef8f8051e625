//! Prometheus metrics: the relay's counters as exposition text, and the small bounded HTTP
//! listener that serves `/metrics`.
//!
//! The listener lives here because every warren binary needs one and all of them already
//! depend on this crate (warren-control embeds the relay, the node is a DERP client). It takes
//! at most [`MAX_CONNECTIONS`] scrapes at once (more are closed on accept) and gives each
//! connection [`CONNECTION_TIMEOUT`] in all, so a stuck or slow scraper holds nothing for long.
//!
//! What a scrape shows is produced by a [`Render`] callback. Metrics that are snapshots of
//! counters kept elsewhere (the relay's [`Stats`](crate::server::Stats), a node's peer table)
//! are written into a fresh recorder per scrape with [`snapshot`], so a peer or client that is
//! gone is gone from the output too; event counters that exist only as metrics (warren-control's)
//! live in a long-lived recorder from [`recorder`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info};

use crate::server::Relay;

/// Scrapes served at once; a connection past this is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 8;
/// How long one scrape connection may live, from accept to the last byte written.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Bucket bounds (seconds) for the latency histograms: 50 us to 2.5 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// What one scrape answers with.
pub type RenderFuture = Pin<Box<dyn Future<Output = String> + Send>>;
/// Produces the exposition text for each scrape.
pub type Render = Arc<dyn Fn() -> RenderFuture + Send + Sync>;

/// A recorder that renders histograms as Prometheus histograms over [`LATENCY_BUCKETS`] (not
/// summaries), for metrics that are recorded as events happen.
pub fn recorder() -> PrometheusRecorder {
    match PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS) {
        Ok(builder) => builder.build_recorder(),
        // Only an empty bucket list is refused, and ours is a non-empty constant.
        Err(_) => PrometheusBuilder::new().build_recorder(),
    }
}

/// Runs `write` against a fresh recorder and renders what it recorded: for metrics that are
/// snapshots (`gauge!(..).set`, `counter!(..).absolute`) of state kept elsewhere.
pub fn snapshot(write: impl FnOnce()) -> String {
    let recorder = recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, write);
    handle.render()
}

/// The relay's metrics (names in the README's metrics table).
pub fn render_relay(relay: &Relay) -> String {
    let s = relay.stats();
    let q = relay.queue_depths();
    snapshot(|| {
        describe_gauge!("warren_derp_clients", "Clients connected now.");
        gauge!("warren_derp_clients").set(s.clients as f64);
        describe_gauge!(
            "warren_derp_home_clients",
            "Connected clients that chose this server as their home."
        );
        gauge!("warren_derp_home_clients").set(s.home_clients as f64);
        describe_counter!(
            "warren_derp_accepts_total",
            "Connections accepted (before the DERP handshake)."
        );
        counter!("warren_derp_accepts_total").absolute(s.accepts);
        describe_counter!(
            "warren_derp_packets_relayed_total",
            "Packets queued to a connected destination."
        );
        counter!("warren_derp_packets_relayed_total").absolute(s.packets_relayed);
        describe_counter!(
            "warren_derp_bytes_relayed_total",
            "Payload bytes of the packets relayed (without DERP framing)."
        );
        counter!("warren_derp_bytes_relayed_total").absolute(s.bytes_relayed);
        describe_counter!(
            "warren_derp_packets_forwarded_total",
            "Packets sent on to another server of the region."
        );
        counter!("warren_derp_packets_forwarded_total").absolute(s.packets_forwarded);
        describe_counter!(
            "warren_derp_dropped_packets_total",
            "Packets dropped, by reason."
        );
        for (reason, n) in [
            ("queue_full", s.dropped_queue_full),
            ("unknown_dest", s.dropped_unknown_dest),
            ("gone", s.dropped_gone),
            ("mesh", s.dropped_mesh),
        ] {
            counter!("warren_derp_dropped_packets_total", "reason" => reason).absolute(n);
        }
        describe_counter!(
            "warren_derp_refused_total",
            "Connections refused by verification or a failed handshake."
        );
        counter!("warren_derp_refused_total").absolute(s.refused);
        describe_counter!(
            "warren_derp_bad_frames_total",
            "Connections closed for a malformed or oversized frame."
        );
        counter!("warren_derp_bad_frames_total").absolute(s.bad_frames);
        describe_gauge!(
            "warren_derp_queued_packets",
            "Packets waiting in all clients' send queues."
        );
        gauge!("warren_derp_queued_packets").set(q.total as f64);
        describe_gauge!(
            "warren_derp_queue_depth_max",
            "Packets waiting in the longest client send queue."
        );
        gauge!("warren_derp_queue_depth_max").set(q.max as f64);
    })
}

/// A [`Render`] of [`render_relay`].
pub fn relay_render(relay: Relay) -> Render {
    Arc::new(move || {
        let text = render_relay(&relay);
        Box::pin(async move { text })
    })
}

/// Binds `addr` for [`serve`], logging where metrics are served.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics listening");
    Ok(listener)
}

/// Serves `GET /metrics` (anything else is 404) on `listener` until `shutdown` resolves; see
/// the module doc for the bounds.
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut shutdown => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%remote, "metrics: too many scrapes at once; closing");
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let render = Arc::clone(&render);
                async move { Ok::<_, Infallible>(respond(req, render).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%remote, error = %e, "metrics connection ended"),
                Err(_) => debug!(%remote, "metrics connection timed out"),
            }
        });
    }
}

async fn respond(req: Request<Incoming>, render: Render) -> Response<String> {
    let mut resp = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut r = Response::new(render().await);
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        r
    } else {
        let mut r = Response::new("not found; metrics are at /metrics\n".to_owned());
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    // One scrape per connection: the timeout bounds the whole connection anyway.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Parses exposition text into `series -> value`, where a series is written
/// `name{label="value",...}` with its labels sorted by name (just `name` without labels).
/// Comment lines are skipped. For tests and tools that read a scrape; label values must not
/// contain `"` or `,` (warren's never do).
pub fn parse_exposition(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let series = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .collect();
                labels.sort_unstable();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_owned(),
        };
        out.insert(series, value);
    }
    out
}
