//! Where the coordinator's driver publishes the job's status, and the status page's HTTP server
//! (`--http ADDR`): HTML at `/`, JSON at `/status.json`, rendered by `shoal_mr::status`.
//!
//! Two kinds of snapshot, so that a long job does not copy its whole attempt log ten times a
//! second: every tick the driver publishes a *light* one (`attempts` empty: what progress bars
//! and metrics read) on a watch channel, and whoever renders the page *asks* the driver for a
//! full one (with the attempt log for the timeline), which it answers between events. After
//! the job ends the last snapshot published is the full final one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_mr::status::{render_html, render_json, JobStatus};
use tokio::sync::{mpsc, oneshot, watch};

/// Requests for a full snapshot queued at the driver; beyond it an asker makes do with the
/// light one.
pub const MAX_QUEUED_STATUS_REQUESTS: usize = 16;

/// How long an asker waits for the driver's full snapshot before making do with the light one.
pub const STATUS_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A request for a full snapshot: the driver answers on it.
pub type StatusRequest = oneshot::Sender<Arc<JobStatus>>;

/// The driver's end: publish light snapshots, answer requests for full ones.
pub struct StatusPublisher {
    light: watch::Sender<Arc<JobStatus>>,
    requests: mpsc::Receiver<StatusRequest>,
}

/// The readers' end (cheap to clone): the latest light snapshot, a full one on request.
#[derive(Clone)]
pub struct StatusFeed {
    light: watch::Receiver<Arc<JobStatus>>,
    requests: mpsc::Sender<StatusRequest>,
}

/// A publisher for the driver and a feed for the readers, starting at
/// [`JobStatus::starting`].
pub fn status_channel() -> (StatusPublisher, StatusFeed) {
    let (light_tx, light_rx) = watch::channel(Arc::new(JobStatus::starting()));
    let (req_tx, req_rx) = mpsc::channel(MAX_QUEUED_STATUS_REQUESTS);
    (
        StatusPublisher {
            light: light_tx,
            requests: req_rx,
        },
        StatusFeed {
            light: light_rx,
            requests: req_tx,
        },
    )
}

impl StatusPublisher {
    /// Publishes a snapshot to every reader of the light channel.
    pub fn publish(&self, status: Arc<JobStatus>) {
        self.light.send_replace(status);
    }

    /// The next request for a full snapshot (pending for ever once every feed is gone).
    pub async fn next_request(&mut self) -> StatusRequest {
        match self.requests.recv().await {
            Some(request) => request,
            None => std::future::pending().await,
        }
    }
}

impl StatusFeed {
    /// The latest light snapshot (the full final one once the job has ended).
    pub fn latest(&self) -> Arc<JobStatus> {
        self.light.borrow().clone()
    }

    /// A receiver of the light snapshots, to wait for changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<JobStatus>> {
        self.light.clone()
    }

    /// A full snapshot, attempt log included, from the driver; the latest published one when
    /// the driver is not running (not started, or the job is over: then it is the final, full
    /// one) or does not answer within [`STATUS_REQUEST_TIMEOUT`].
    pub async fn full(&self) -> Arc<JobStatus> {
        let (tx, rx) = oneshot::channel();
        if self.requests.try_send(tx).is_ok() {
            if let Ok(Ok(full)) = tokio::time::timeout(STATUS_REQUEST_TIMEOUT, rx).await {
                return full;
            }
        }
        self.latest()
    }
}

/// Serves the status from `feed` on `listener` until the task is dropped: HTML at `/`, JSON at
/// `/status.json`, 404 elsewhere. Each page is rendered from a full snapshot.
pub async fn serve_status(listener: tokio::net::TcpListener, feed: StatusFeed) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "status page: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let feed = feed.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let feed = feed.clone();
                async move {
                    let (code, content_type, body) = match req.uri().path() {
                        "/" | "/index.html" => (
                            StatusCode::OK,
                            "text/html; charset=utf-8",
                            render_html(&*feed.full().await),
                        ),
                        "/status.json" => (
                            StatusCode::OK,
                            "application/json",
                            render_json(&*feed.full().await),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found: try / or /status.json\n".to_string(),
                        ),
                    };
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = code;
                    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
                        response
                            .headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, v);
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "status page connection ended");
            }
        });
    }
}

/// Binds `addr` for the status page, with the address in the error.
pub async fn bind_status(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for the status page on {addr}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_feed_gets_full_snapshots_from_the_driver_and_light_ones_otherwise() {
        let (mut publisher, feed) = status_channel();
        assert_eq!(feed.latest().phase, "starting");
        let mut light = JobStatus::starting();
        light.phase = "map".into();
        light.attempts_included = false;
        publisher.publish(Arc::new(light));
        assert_eq!(feed.latest().phase, "map");
        assert!(!feed.latest().attempts_included);

        // The driver answers a request with a full snapshot.
        let asker = tokio::spawn({
            let feed = feed.clone();
            async move { feed.full().await }
        });
        let request = publisher.next_request().await;
        let mut full = JobStatus::starting();
        full.phase = "map".into();
        request.send(Arc::new(full)).unwrap();
        assert!(asker.await.unwrap().attempts_included);

        // No driver any more: the latest published snapshot.
        drop(publisher);
        let s = feed.full().await;
        assert_eq!(s.phase, "map");
        assert!(!s.attempts_included);
    }
}
