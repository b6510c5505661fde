//! The coordinator's status: a serializable snapshot of the job, rendered as an HTML page at
//! `/` and as JSON at `/status.json` by a small hyper server (`--http ADDR`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Every reduce output is committed.
    Done,
    /// A task failed `max_attempts` times.
    Failed {
        /// "map 3" or "reduce 7".
        task: String,
        /// Its last error.
        error: String,
    },
}

/// State of one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for a worker.
    Pending,
    /// At least one attempt is running.
    Running,
    /// A map task's winning output is available.
    Done,
    /// A reduce task's winning output is being copied into the output directory.
    Committing,
    /// A reduce task's output is in place.
    Committed,
}

/// State of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Registered, running nothing.
    Idle,
    /// Running an attempt.
    Busy,
    /// Connection closed or heartbeats stopped.
    Lost,
}

/// A running attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningAttemptStatus {
    /// Attempt number.
    pub attempt: u32,
    /// Worker id.
    pub worker: u64,
    /// Running for this long, in milliseconds.
    pub elapsed_ms: u64,
}

/// One task on the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// "map" or "reduce".
    pub kind: String,
    /// Task index.
    pub index: u32,
    /// Its state.
    pub state: TaskState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts that failed.
    pub failures: u32,
    /// Attempts running now.
    pub running: Vec<RunningAttemptStatus>,
    /// The winning attempt, once there is one.
    pub winner_attempt: Option<u32>,
    /// The worker of the winning attempt.
    pub winner_worker: Option<u64>,
    /// The last error reported.
    pub last_error: Option<String>,
}

/// One worker on the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Worker id.
    pub id: u64,
    /// Host and pid.
    pub name: String,
    /// Its shuffle server.
    pub shuffle_addr: String,
    /// Its state.
    pub state: WorkerState,
    /// Milliseconds since anything was heard from it.
    pub last_heartbeat_ms_ago: u64,
    /// Attempts it runs now.
    pub running: Vec<String>,
    /// Attempts of it that won.
    pub attempts_won: u64,
}

/// A snapshot of the whole job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// "map", "reduce", "done" or "failed".
    pub phase: String,
    /// Milliseconds since the coordinator started.
    pub elapsed_ms: u64,
    /// Number of map tasks.
    pub maps_total: u32,
    /// Map tasks done.
    pub maps_done: u32,
    /// Number of reduce tasks.
    pub reduces_total: u32,
    /// Reduce outputs committed.
    pub reduces_done: u32,
    /// Every map task.
    pub maps: Vec<TaskStatus>,
    /// Every reduce task.
    pub reduces: Vec<TaskStatus>,
    /// Every worker that ever registered.
    pub workers: Vec<WorkerStatus>,
    /// Counters merged from winning attempts.
    pub counters: BTreeMap<String, u64>,
    /// How the job ended, once it has.
    pub outcome: Option<JobOutcome>,
}

impl JobStatus {
    /// The status before the coordinator has published any: phase "starting", nothing known.
    pub fn starting() -> JobStatus {
        JobStatus {
            phase: "starting".into(),
            elapsed_ms: 0,
            maps_total: 0,
            maps_done: 0,
            reduces_total: 0,
            reduces_done: 0,
            maps: vec![],
            reduces: vec![],
            workers: vec![],
            counters: BTreeMap::new(),
            outcome: None,
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the status as a self-contained HTML page (refreshes itself every second).
pub fn render_html(status: &JobStatus) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" \
         content=\"1\"><title>shoal mr: {phase}</title><style>body{{font-family:sans-serif;\
         margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}td,th{{border:1px \
         solid #ccc;padding:2px 8px;text-align:left}}.Running,.Busy{{background:#ffd}}\
         .Done,.Committed{{background:#dfd}}.Lost{{background:#fdd}}.Committing{{background:#def}}\
         </style></head><body><h1>MapReduce job: {phase}</h1><p>{secs:.1} s elapsed; \
         maps {md}/{mt}, reduces {rd}/{rt}. <a href=\"/status.json\">JSON</a></p>",
        phase = escape(&status.phase),
        secs = status.elapsed_ms as f64 / 1000.0,
        md = status.maps_done,
        mt = status.maps_total,
        rd = status.reduces_done,
        rt = status.reduces_total,
    );
    if let Some(JobOutcome::Failed { task, error }) = &status.outcome {
        let _ = write!(
            h,
            "<p><b>Failed:</b> {} — {}</p>",
            escape(task),
            escape(error)
        );
    }
    h.push_str(
        "<h2>Tasks</h2><table><tr><th>task</th><th>state</th><th>attempts</th><th>failures</th>\
         <th>running (attempt@worker, s)</th><th>winner</th><th>last error</th></tr>",
    );
    for t in status.maps.iter().chain(&status.reduces) {
        let running: Vec<String> = t
            .running
            .iter()
            .map(|r| {
                format!(
                    "{}@w{} ({:.1})",
                    r.attempt,
                    r.worker,
                    r.elapsed_ms as f64 / 1000.0
                )
            })
            .collect();
        let winner = match (t.winner_attempt, t.winner_worker) {
            (Some(a), Some(w)) => format!("{a}@w{w}"),
            _ => String::new(),
        };
        let _ = write!(
            h,
            "<tr class=\"{state:?}\"><td>{kind} {index}</td><td>{state:?}</td><td>{attempts}</td>\
             <td>{failures}</td><td>{running}</td><td>{winner}</td><td>{error}</td></tr>",
            state = t.state,
            kind = t.kind,
            index = t.index,
            attempts = t.attempts,
            failures = t.failures,
            running = escape(&running.join(", ")),
            error = escape(t.last_error.as_deref().unwrap_or("")),
        );
    }
    h.push_str(
        "</table><h2>Workers</h2><table><tr><th>id</th><th>name</th><th>shuffle</th>\
         <th>state</th><th>last heartbeat</th><th>running</th><th>attempts won</th></tr>",
    );
    for w in &status.workers {
        let _ = write!(
            h,
            "<tr class=\"{state:?}\"><td>w{id}</td><td>{name}</td><td>{addr}</td><td>{state:?}</td>\
             <td>{hb:.1} s ago</td><td>{running}</td><td>{won}</td></tr>",
            id = w.id,
            name = escape(&w.name),
            addr = escape(&w.shuffle_addr),
            state = w.state,
            hb = w.last_heartbeat_ms_ago as f64 / 1000.0,
            running = escape(&w.running.join(", ")),
            won = w.attempts_won,
        );
    }
    h.push_str("</table><h2>Counters</h2><table>");
    for (k, v) in &status.counters {
        let _ = write!(h, "<tr><td>{}</td><td>{v}</td></tr>", escape(k));
    }
    h.push_str("</table></body></html>\n");
    h
}

/// Serves the latest status from `status` on `listener` until the task is dropped: HTML at
/// `/`, JSON at `/status.json`, 404 elsewhere.
pub async fn serve_status(
    listener: tokio::net::TcpListener,
    status: watch::Receiver<Arc<JobStatus>>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response, StatusCode};

    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "status page: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let snapshot = status.borrow().clone();
                async move {
                    let (code, content_type, body) = match req.uri().path() {
                        "/" | "/index.html" => (
                            StatusCode::OK,
                            "text/html; charset=utf-8",
                            render_html(&snapshot),
                        ),
                        "/status.json" => (
                            StatusCode::OK,
                            "application/json",
                            serde_json::to_string_pretty(&*snapshot)
                                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
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

    #[test]
    fn html_escapes_worker_data_and_json_round_trips() {
        let status = JobStatus {
            phase: "map".into(),
            elapsed_ms: 1500,
            maps_total: 1,
            maps_done: 0,
            reduces_total: 1,
            reduces_done: 0,
            maps: vec![TaskStatus {
                kind: "map".into(),
                index: 0,
                state: TaskState::Running,
                attempts: 2,
                failures: 1,
                running: vec![RunningAttemptStatus {
                    attempt: 1,
                    worker: 3,
                    elapsed_ms: 300,
                }],
                winner_attempt: None,
                winner_worker: None,
                last_error: Some("<script>alert(1)</script>".into()),
            }],
            reduces: vec![],
            workers: vec![WorkerStatus {
                id: 3,
                name: "host&<b>".into(),
                shuffle_addr: "10.0.0.3:7000".into(),
                state: WorkerState::Busy,
                last_heartbeat_ms_ago: 120,
                running: vec!["map 0 attempt 1".into()],
                attempts_won: 0,
            }],
            counters: BTreeMap::from([("map.input.bytes".to_string(), 42)]),
            outcome: None,
        };
        let html = render_html(&status);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("host&amp;&lt;b&gt;"));
        assert!(html.contains("1@w3 (0.3)"));
        let json = serde_json::to_string(&status).unwrap();
        let back: JobStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
    }
}
