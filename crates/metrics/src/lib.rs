//! Shoal's Prometheus metrics: the one registry a process exports, the `/metrics` HTTP
//! endpoint (`--metrics ADDR` on every long-running command), and the bucket layouts the
//! drivers share.
//!
//! **What this crate owns:** serving a [`Registry`] in the Prometheus text format over HTTP,
//! and nothing else. The metrics themselves are defined where they are measured — in the
//! drivers (`shoal_runtime::metrics`, `shoal_runtime::mr::metrics`) — never in the pure protocol
//! crates, which only expose counters in their status structs (DESIGN.md §1).
//!
//! **Why `prometheus-client`:** it is the Prometheus project's own Rust client (OpenMetrics
//! text, typed label sets, no global recorder and no macros that look a key up in a map on each
//! call): a metric handle is a clone of an `Arc` around atomics, so the hot paths (a request's
//! latency, a Ready's fsync) cost an atomic add. `metrics` + `metrics-exporter-prometheus`
//! would have brought a global recorder, a hash lookup per update and a larger build.
//!
//! **What it must never do:** block a driver (encoding runs on the HTTP task, reading atomics),
//! or expose anything but metrics.

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format that [`prometheus_client`] writes
/// (Prometheus negotiates it; `curl` shows it as text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets for latencies, in seconds: 50 µs to about 13 s, doubling (19 buckets). Covers an
/// fsync on tmpfs (tens of µs) up to a request that waited out an election.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 19)
}

/// Buckets for sizes in bytes: 1 KiB to 16 GiB, times 4 (13 buckets).
pub fn size_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1024.0, 4.0, 13)
}

/// Buckets for counts per batch: 1 to 4096, doubling (13 buckets).
pub fn batch_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 13)
}

/// Binds the metrics listener, with the address and what to do in the error (a port in use,
/// an address of another machine).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot serve metrics on {addr} (--metrics): {e}; give a free HOST:PORT of \
                 this machine, e.g. --metrics 127.0.0.1:9101"
            ),
        )
    })
}

/// Renders `registry` in the text format, as `/metrics` serves it.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Only a writer error: a String never fails.
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// Serves `registry` on `listener` until the task is dropped: the metrics at `/metrics`, a
/// hint at `/`, 404 elsewhere. Spawn it on the process's runtime.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = Arc::clone(&registry);
                async move {
                    let (code, content_type, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, CONTENT_TYPE, render(&registry)),
                        "/" => (
                            StatusCode::OK,
                            "text/plain; charset=utf-8",
                            "Shoal: Prometheus metrics are at /metrics\n".to_string(),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain; charset=utf-8",
                            "not found: the metrics are at /metrics\n".to_string(),
                        ),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = code;
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

/// Binds `addr` and spawns [`serve`] on the current tokio runtime: what a command does with
/// its `--metrics ADDR`.
pub async fn start(addr: SocketAddr, registry: Registry) -> std::io::Result<SocketAddr> {
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, Arc::new(registry)));
    Ok(local)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    #[test]
    fn a_registry_renders_counters_and_histograms_in_the_text_format() {
        let mut registry = Registry::default();
        let requests = Counter::<u64>::default();
        let latency = Histogram::new(latency_buckets());
        registry.register("shoal_test_requests", "Requests.", requests.clone());
        registry.register("shoal_test_duration_seconds", "Latency.", latency.clone());
        requests.inc_by(3);
        latency.observe(0.002);
        let text = render(&registry);
        assert!(text.contains("shoal_test_requests_total 3"), "{text}");
        assert!(
            text.contains("shoal_test_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn a_taken_port_is_refused_with_the_flag_named() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let taken = first.local_addr().unwrap();
        let err = bind(taken).await.unwrap_err().to_string();
        assert!(
            err.contains("--metrics") && err.contains(&taken.to_string()),
            "{err}"
        );
    }
}
