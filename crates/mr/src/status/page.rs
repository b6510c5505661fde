//! The status page and its JSON, as pure functions of a [`JobStatus`] snapshot.
//!
//! The page puts a summary first (phase, progress by tasks and bytes, throughput, elapsed and
//! estimated time left, attempts, workers), then a timeline of attempts per worker as inline
//! SVG (the event timeline of Spark's UI: a lane per worker, a bar per attempt coloured by kind
//! and outcome, backups outlined, failures red), the workers, what runs now, and the finished
//! tasks collapsed in `<details>`. No framework and no external file: a few lines of script
//! reload the live page every [`REFRESH_SECONDS`] and keep open sections open; the final page
//! written into the output directory has none.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{AttemptOutcome, AttemptRecord, JobOutcome, JobStatus, TaskState, TaskStatus};
use super::{WorkerState, WorkerStatus};

/// The live page reloads itself this often.
pub const REFRESH_SECONDS: u32 = 2;

/// Name of the final page in the output directory (`_` first: input listings, `mr validate`
/// and Hadoop-style tools skip it, as they skip `_SUCCESS`).
pub const FINAL_HTML: &str = "_status.html";

/// Name of the final snapshot's JSON in the output directory.
pub const FINAL_JSON: &str = "_status.json";

/// Whether `name` is one of the final status files or a temporary file of one (a new job
/// removes them from its output directory with the previous job's outputs).
pub fn is_final_file(name: &str) -> bool {
    [FINAL_HTML, FINAL_JSON]
        .iter()
        .any(|f| name == *f || name == format!(".{f}.tmp"))
}

/// Width of the timeline in SVG user units (it scales to the page's width).
const SVG_WIDTH: f64 = 1100.0;
/// Left column of the timeline, for the worker names.
const SVG_LABEL_WIDTH: f64 = 180.0;
/// Height of one bar row; a lane has as many rows as attempts overlapped on its worker.
const SVG_ROW_HEIGHT: f64 = 14.0;
/// Space around a lane's rows.
const SVG_LANE_PADDING: f64 = 4.0;
/// Height of the time axis under the lanes.
const SVG_AXIS_HEIGHT: f64 = 22.0;

/// The figures at the top of the page, derived from a snapshot (also in the JSON, under
/// `summary`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// "starting", "map", "reduce", "done" or "failed".
    pub phase: String,
    /// Milliseconds since the coordinator started.
    pub elapsed_ms: u64,
    /// Map plus reduce tasks.
    pub tasks_total: u32,
    /// Map tasks done plus reduce tasks committed.
    pub tasks_done: u32,
    /// Map tasks.
    pub maps_total: u32,
    /// Map tasks done.
    pub maps_done: u32,
    /// Map tasks with an attempt running.
    pub maps_running: u32,
    /// Reduce tasks.
    pub reduces_total: u32,
    /// Reduce tasks committed.
    pub reduces_done: u32,
    /// Reduce tasks with an attempt running.
    pub reduces_running: u32,
    /// Bytes of input (the map phase's work).
    pub map_bytes_total: u64,
    /// Bytes of input of the map tasks done.
    pub map_bytes_done: u64,
    /// Bytes of map output (the reduce phase's input), known once every map task is done.
    pub reduce_bytes_total: Option<u64>,
    /// Bytes the committed reduce tasks read.
    pub reduce_bytes_done: u64,
    /// Milliseconds since the current phase's first attempt started (the whole job once it
    /// has ended).
    pub phase_elapsed_ms: u64,
    /// Bytes per second through the current phase (the input over the whole job once it has
    /// ended).
    pub throughput_bytes_per_s: Option<f64>,
    /// Estimated milliseconds left in the current phase, from its rate so far (0 once done).
    pub estimated_ms_left: Option<u64>,
    /// Attempts running now.
    pub running_attempts: u32,
    /// Attempts started as a duplicate or backup of a running one.
    pub backup_attempts: u32,
    /// Attempts that failed (app error, fetch failure or failed commit).
    pub failed_attempts: u32,
    /// Attempts abandoned with their lost worker.
    pub lost_attempts: u32,
    /// Workers registered and not lost.
    pub workers_live: u32,
    /// Workers lost.
    pub workers_lost: u32,
}

/// Derives the summary of `s`.
pub fn summarize(s: &JobStatus) -> Summary {
    let running = |tasks: &[TaskStatus]| {
        tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .count() as u32
    };
    let map_bytes_total = if s.input_bytes > 0 {
        s.input_bytes
    } else {
        s.maps.iter().filter_map(|t| t.input_bytes).sum()
    };
    let map_bytes_done: u64 = s
        .maps
        .iter()
        .filter(|t| t.state == TaskState::Done)
        .map(|t| t.input_bytes.or(t.bytes_in).unwrap_or(0))
        .sum();
    let all_maps_done = s.maps_total > 0 && s.maps_done == s.maps_total;
    let reduce_bytes_total =
        all_maps_done.then(|| s.maps.iter().filter_map(|t| t.bytes_out).sum::<u64>());
    let reduce_bytes_done: u64 = s
        .reduces
        .iter()
        .filter(|t| t.state == TaskState::Committed)
        .filter_map(|t| t.bytes_in)
        .sum();
    let first_start = |kind: &str| {
        s.attempts
            .iter()
            .filter(|a| a.kind == kind)
            .map(|a| a.start_ms)
            .min()
    };
    let count = |f: &dyn Fn(&AttemptRecord) -> bool| s.attempts.iter().filter(|a| f(a)).count();
    let ended = s.outcome.is_some();
    let (phase_elapsed_ms, throughput, left) = if ended {
        // What was read: all of it for a job that is done, less for one that failed.
        let rate = per_second(map_bytes_done, s.elapsed_ms);
        let left = matches!(s.outcome, Some(JobOutcome::Done)).then_some(0);
        (s.elapsed_ms, rate, left)
    } else if s.phase == "map" {
        let elapsed = s
            .elapsed_ms
            .saturating_sub(first_start("map").unwrap_or(s.elapsed_ms));
        let rate = per_second(map_bytes_done, elapsed);
        let left = estimate_left(map_bytes_done, map_bytes_total, elapsed);
        (elapsed, rate, left)
    } else if s.phase == "reduce" {
        let elapsed = s
            .elapsed_ms
            .saturating_sub(first_start("reduce").unwrap_or(s.elapsed_ms));
        let rate = per_second(reduce_bytes_done, elapsed);
        let left = match reduce_bytes_total {
            Some(total) if total > 0 => estimate_left(reduce_bytes_done, total, elapsed),
            _ => estimate_left(
                u64::from(s.reduces_done),
                u64::from(s.reduces_total),
                elapsed,
            ),
        };
        (elapsed, rate, left)
    } else {
        (0, None, None)
    };
    Summary {
        phase: s.phase.clone(),
        elapsed_ms: s.elapsed_ms,
        tasks_total: s.maps_total + s.reduces_total,
        tasks_done: s.maps_done + s.reduces_done,
        maps_total: s.maps_total,
        maps_done: s.maps_done,
        maps_running: running(&s.maps),
        reduces_total: s.reduces_total,
        reduces_done: s.reduces_done,
        reduces_running: running(&s.reduces),
        map_bytes_total,
        map_bytes_done,
        reduce_bytes_total,
        reduce_bytes_done,
        phase_elapsed_ms,
        throughput_bytes_per_s: throughput,
        estimated_ms_left: left,
        running_attempts: s
            .maps
            .iter()
            .chain(&s.reduces)
            .map(|t| t.running.len())
            .sum::<usize>() as u32,
        backup_attempts: count(&|a| a.backup) as u32,
        failed_attempts: count(&|a| {
            matches!(
                a.outcome,
                AttemptOutcome::Failed | AttemptOutcome::FetchFailed | AttemptOutcome::CommitFailed
            )
        }) as u32,
        lost_attempts: count(&|a| a.outcome == AttemptOutcome::WorkerLost) as u32,
        workers_live: s
            .workers
            .iter()
            .filter(|w| w.state != WorkerState::Lost)
            .count() as u32,
        workers_lost: s
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Lost)
            .count() as u32,
    }
}

fn per_second(bytes: u64, ms: u64) -> Option<f64> {
    (ms > 0 && bytes > 0).then(|| bytes as f64 * 1000.0 / ms as f64)
}

/// Time left at the rate so far: `elapsed × (total − done) / done`.
fn estimate_left(done: u64, total: u64, elapsed_ms: u64) -> Option<u64> {
    if done == 0 || total == 0 {
        return None;
    }
    let left = total.saturating_sub(done) as f64 * elapsed_ms as f64 / done as f64;
    Some(left.round() as u64)
}

/// The JSON document: the snapshot's fields with the summary beside them.
#[derive(Serialize)]
struct Document<'a> {
    summary: Summary,
    #[serde(flatten)]
    status: &'a JobStatus,
}

/// The snapshot as pretty JSON: every field of [`JobStatus`] plus `summary` ([`Summary`]).
pub fn render_json(s: &JobStatus) -> String {
    let doc = Document {
        summary: summarize(s),
        status: s,
    };
    serde_json::to_string_pretty(&doc)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
}

/// Renders the live page (served at `/`): it reloads itself until the job ends.
pub fn render_html(s: &JobStatus) -> String {
    render_page(s, false)
}

/// Writes the final page and JSON into `out_dir` as [`FINAL_HTML`] and [`FINAL_JSON`], each
/// to a temporary name, fsynced, renamed, and the directory fsynced.
pub fn write_final(out_dir: &Path, s: &JobStatus) -> std::io::Result<()> {
    write_atomically(out_dir, FINAL_JSON, render_json(s).as_bytes())?;
    write_atomically(out_dir, FINAL_HTML, render_page(s, true).as_bytes())?;
    std::fs::File::open(out_dir)?.sync_all()
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// "512 B", "3.4 KB", "12.0 MB", "1.50 GB" (decimal units, as `df -H` and disk makers).
fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b < 1e3 {
        format!("{b} B")
    } else if b < 1e6 {
        format!("{:.1} KB", b / 1e3)
    } else if b < 1e9 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.2} GB", b / 1e9)
    }
}

/// "850 ms", "12.3 s", "4 min 05 s", "2 h 03 min".
fn fmt_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    }
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;\
margin:0;padding:16px 24px;color:#1f2328;background:#fff}\
h1{font-size:20px;margin:0 12px 0 0;display:inline-block}\
h2{font-size:16px;margin:22px 0 8px}\
header{display:flex;align-items:center;flex-wrap:wrap;gap:8px;margin-bottom:12px}\
header .meta{color:#59636e}\
.badge{border-radius:10px;padding:2px 10px;font-weight:600;font-size:13px}\
.phase-starting,.phase-map,.phase-reduce{background:#fff4ce;color:#6b4e00}\
.phase-done{background:#dafbe1;color:#116329}\
.phase-failed,.phase-abandoned{background:#ffebe9;color:#a40e26}\
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:10px}\
.card{border:1px solid #d1d9e0;border-radius:6px;padding:8px 12px}\
.card .label{color:#59636e;font-size:12px;text-transform:uppercase;letter-spacing:.04em}\
.card .value{font-size:22px;font-weight:600;margin:2px 0}\
.card .sub{color:#59636e;font-size:12px}\
.bar{height:6px;background:#eaeef2;border-radius:3px;overflow:hidden;margin:4px 0}\
.bar div{height:100%;background:#4e79a7}.bar.reduce div{background:#59a14f}\
.alert{background:#ffebe9;border:1px solid #ff8182;border-radius:6px;padding:8px 12px;\
margin:12px 0}\
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}\
td,th{border-bottom:1px solid #d1d9e0;padding:3px 10px 3px 0;text-align:left;\
vertical-align:top}td:first-child{white-space:nowrap}th{color:#59636e;font-weight:600}td.num,th.num{text-align:right}\
.Lost{color:#a40e26}.Busy{color:#6b4e00}.Idle{color:#59636e}\
details{margin:6px 0}summary{cursor:pointer;font-weight:600}\
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#59636e;margin:4px 0}\
.legend span::before{content:'';display:inline-block;width:14px;height:10px;\
margin-right:5px;vertical-align:middle;background:var(--c);border:var(--b,0)}\
svg text{font:11px system-ui,'DejaVu Sans',sans-serif;fill:#1f2328}\
svg .lost{fill:#a40e26}svg .tick{fill:#59636e}\
footer{margin-top:18px;color:#59636e;font-size:12px}\
code{font-size:12px}";

/// Colours of the timeline's bars.
fn bar_fill(a: &AttemptRecord) -> &'static str {
    let map = a.kind == "map";
    match a.outcome {
        AttemptOutcome::Won if map => "#4e79a7",
        AttemptOutcome::Won => "#59a14f",
        AttemptOutcome::Running if map => "#a0cbe8",
        AttemptOutcome::Running => "#a8dca0",
        AttemptOutcome::Superseded => "#c9c3bf",
        AttemptOutcome::Failed | AttemptOutcome::CommitFailed => "#e15759",
        AttemptOutcome::FetchFailed => "#f28e2b",
        AttemptOutcome::WorkerLost => "#8c8c8c",
    }
}

fn outcome_words(o: AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Running => "running",
        AttemptOutcome::Won => "won",
        AttemptOutcome::Superseded => "finished after another attempt won",
        AttemptOutcome::Failed => "failed",
        AttemptOutcome::FetchFailed => "could not fetch a map output",
        AttemptOutcome::WorkerLost => "abandoned: its worker was lost",
        AttemptOutcome::CommitFailed => "won, but its output could not be committed",
    }
}

/// Renders the page; `final_page` for the copy kept in the output directory (links to
/// `_status.json`, no reload).
fn render_page(s: &JobStatus, final_page: bool) -> String {
    let sum = summarize(s);
    let mut h = String::with_capacity(16 * 1024 + 600 * (s.maps.len() + s.attempts.len()));
    let app = if s.app.is_empty() { "job" } else { &s.app };
    let progress = percent(u64::from(sum.tasks_done), u64::from(sum.tasks_total));
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>shoal mr {app}: {phase} {progress:.0}%</title><style>{STYLE}</style></head>\
         <body>\n<header><h1>MapReduce · {app}</h1><span class=\"badge phase-{phase}\">{phase}\
         </span><span class=\"meta\">{out}</span></header>\n",
        app = escape(app),
        phase = escape(&s.phase),
        out = if s.out_dir.is_empty() {
            String::new()
        } else {
            format!("output: <code>{}</code>", escape(&s.out_dir))
        },
    );
    if let Some(JobOutcome::Failed { task, error }) = &s.outcome {
        let _ = writeln!(
            h,
            "<div class=\"alert\"><b>The job failed:</b> {} — {}</div>",
            escape(task),
            escape(error)
        );
    }
    if let Some(JobOutcome::Abandoned { reason }) = &s.outcome {
        let _ = writeln!(
            h,
            "<div class=\"alert\"><b>The job was abandoned:</b> {}</div>",
            escape(reason)
        );
    }
    write_cards(&mut h, s, &sum);
    write_timeline(&mut h, s);
    write_workers(&mut h, s);
    write_active(&mut h, s);
    write_finished(&mut h, s);
    let _ = write!(
        h,
        "<details id=\"counters\"><summary>Counters of the winning attempts ({})</summary>\
         <table>",
        s.counters.len()
    );
    for (k, v) in &s.counters {
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td class=\"num\">{v}</td></tr>",
            escape(k)
        );
    }
    h.push_str("</table></details>\n");
    let json = if final_page {
        FINAL_JSON
    } else {
        "/status.json"
    };
    let _ = writeln!(
        h,
        "<footer>Snapshot at {} after the coordinator started{}. The same snapshot as JSON: \
         <a href=\"{json}\">{json}</a>.</footer>",
        fmt_ms(s.elapsed_ms),
        if final_page {
            "; this is the final page"
        } else {
            ""
        },
    );
    if !final_page && s.outcome.is_none() {
        // Reload, keeping the sections the reader opened open.
        let _ = writeln!(
            h,
            "<script>const k='shoal-mr-open';for(const d of document.querySelectorAll('details'))\
             if((sessionStorage.getItem(k)||'').split(',').includes(d.id))d.open=true;\
             setTimeout(()=>{{sessionStorage.setItem(k,[...document.querySelectorAll(\
             'details[open]')].map(d=>d.id).join(','));location.reload();}},{});</script>",
            REFRESH_SECONDS * 1000
        );
    }
    h.push_str("</body></html>\n");
    h
}

fn card(h: &mut String, label: &str, value: &str, bar: Option<(f64, &str)>, sub: &str) {
    let _ = write!(
        h,
        "<div class=\"card\"><div class=\"label\">{label}</div><div class=\"value\">{value}</div>"
    );
    if let Some((pct, class)) = bar {
        let _ = write!(
            h,
            "<div class=\"bar {class}\"><div style=\"width:{pct:.1}%\"></div></div>"
        );
    }
    let _ = write!(h, "<div class=\"sub\">{sub}</div></div>");
}

fn write_cards(h: &mut String, s: &JobStatus, sum: &Summary) {
    h.push_str("<section class=\"cards\">");
    let left = match (sum.estimated_ms_left, s.phase.as_str()) {
        (_, "done") => "finished".to_string(),
        (_, "failed") => "stopped".to_string(),
        (Some(ms), phase) => format!("about {} left in the {phase} phase", fmt_ms(ms)),
        (None, _) => "time left: not known yet".to_string(),
    };
    card(h, "Elapsed", &fmt_ms(s.elapsed_ms), None, &left);
    card(
        h,
        "Map tasks",
        &format!("{} / {}", s.maps_done, s.maps_total),
        Some((
            percent(sum.map_bytes_done, sum.map_bytes_total.max(1)),
            "map",
        )),
        &format!(
            "{} of {} read · {} running",
            fmt_bytes(sum.map_bytes_done),
            fmt_bytes(sum.map_bytes_total),
            sum.maps_running
        ),
    );
    let reduce_sub = match sum.reduce_bytes_total {
        Some(total) => format!(
            "{} of {} merged · {} running",
            fmt_bytes(sum.reduce_bytes_done),
            fmt_bytes(total),
            sum.reduces_running
        ),
        None => format!(
            "{} merged · {} running",
            fmt_bytes(sum.reduce_bytes_done),
            sum.reduces_running
        ),
    };
    let reduce_pct = match sum.reduce_bytes_total {
        Some(total) if total > 0 => percent(sum.reduce_bytes_done, total),
        _ => percent(u64::from(s.reduces_done), u64::from(s.reduces_total)),
    };
    card(
        h,
        "Reduce tasks",
        &format!("{} / {}", s.reduces_done, s.reduces_total),
        Some((reduce_pct, "reduce")),
        &reduce_sub,
    );
    let (value, sub) = match sum.throughput_bytes_per_s {
        Some(r) if s.outcome.is_some() => (
            format!("{}/s", fmt_bytes(r as u64)),
            "input over the whole job".to_string(),
        ),
        Some(r) => (
            format!("{}/s", fmt_bytes(r as u64)),
            format!(
                "{} the {} phase, over {}",
                if s.phase == "map" {
                    "read in"
                } else {
                    "merged in"
                },
                escape(&s.phase),
                fmt_ms(sum.phase_elapsed_ms)
            ),
        ),
        None => ("–".to_string(), "no task finished yet".to_string()),
    };
    card(h, "Throughput", &value, None, &sub);
    card(
        h,
        "Attempts",
        &format!("{} running", sum.running_attempts),
        None,
        &format!(
            "{} started · {} backups · {} failed · {} lost with a worker",
            s.attempts.len() as u64 + s.attempts_not_recorded,
            sum.backup_attempts,
            sum.failed_attempts,
            sum.lost_attempts
        ),
    );
    let heard = s
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Lost)
        .map(|w| w.last_heartbeat_ms_ago)
        .max();
    card(
        h,
        "Workers",
        &format!("{} live", sum.workers_live),
        None,
        &match heard {
            Some(ms) => format!(
                "{} lost · oldest heartbeat {} ago",
                sum.workers_lost,
                fmt_ms(ms)
            ),
            None => format!("{} lost · none connected", sum.workers_lost),
        },
    );
    h.push_str("</section>\n");
}

/// A lane per worker; attempts that overlap on one worker (rare: an abandoned attempt's end
/// is when its worker was declared lost) go on extra rows of its lane.
struct Lane<'a> {
    worker: u64,
    name: String,
    lost: bool,
    /// (row, attempt)
    bars: Vec<(usize, &'a AttemptRecord)>,
    rows: usize,
}

fn lanes<'a>(s: &'a JobStatus, now: u64) -> Vec<Lane<'a>> {
    let mut ids: Vec<u64> = s.workers.iter().map(|w| w.id).collect();
    ids.extend(s.attempts.iter().map(|a| a.worker));
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            let w: Option<&WorkerStatus> = s.workers.iter().find(|w| w.id == id);
            let mut row_ends: Vec<u64> = Vec::new();
            let mut bars = Vec::new();
            let mut mine: Vec<&AttemptRecord> =
                s.attempts.iter().filter(|a| a.worker == id).collect();
            mine.sort_by_key(|a| a.start_ms);
            for a in mine {
                let end = a.end_ms.unwrap_or(now).max(a.start_ms);
                let row = match row_ends.iter().position(|&e| e <= a.start_ms) {
                    Some(r) => r,
                    None => {
                        row_ends.push(0);
                        row_ends.len() - 1
                    }
                };
                row_ends[row] = end;
                bars.push((row, a));
            }
            Lane {
                worker: id,
                name: w.map(|w| w.name.clone()).unwrap_or_default(),
                lost: w.is_some_and(|w| w.state == WorkerState::Lost),
                rows: row_ends.len().max(1),
                bars,
            }
        })
        .collect()
}

/// A tick step giving about eight ticks over `total_ms`.
fn tick_step_ms(total_ms: u64) -> u64 {
    const STEPS: [u64; 17] = [
        10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000,
        300_000, 600_000, 1_800_000,
    ];
    STEPS
        .iter()
        .copied()
        .find(|&step| total_ms / step <= 10)
        .unwrap_or(3_600_000 * (total_ms / 36_000_000 + 1))
}

fn tick_label(ms: u64, step: u64) -> String {
    if ms == 0 {
        "0 s".to_string()
    } else if step < 100 {
        format!("{ms} ms")
    } else if step < 1000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if step < 60_000 {
        format!("{} s", ms / 1000)
    } else {
        format!("{} min", ms / 60_000)
    }
}

fn write_timeline(h: &mut String, s: &JobStatus) {
    let now = s.elapsed_ms;
    let total = s
        .attempts
        .iter()
        .map(|a| a.end_ms.unwrap_or(now).max(a.start_ms))
        .max()
        .unwrap_or(0)
        .max(now)
        .max(1);
    let lanes = lanes(s, now);
    let _ = write!(
        h,
        "<h2>Timeline of attempts per worker</h2>\n<div class=\"legend\">\
         <span style=\"--c:#4e79a7\">map won</span><span style=\"--c:#59a14f\">reduce won</span>\
         <span style=\"--c:#a0cbe8\">map running</span><span style=\"--c:#a8dca0\">reduce running\
         </span><span style=\"--c:#e15759\">failed</span><span style=\"--c:#f28e2b\">fetch failed\
         </span><span style=\"--c:#8c8c8c\">worker lost</span><span style=\"--c:#c9c3bf\">lost the \
         race to another attempt</span><span style=\"--c:#fff;--b:2px solid #111\">backup or \
         duplicate (outlined)</span><span style=\"--c:repeating-linear-gradient(45deg,#4e79a7 0 \
         2px,#fff 2px 4px)\">output lost later with its worker</span></div>\n"
    );
    if lanes.is_empty() {
        h.push_str("<p>No worker has registered yet.</p>\n");
        return;
    }
    let plot_w = SVG_WIDTH - SVG_LABEL_WIDTH - 12.0;
    let x_of = |ms: u64| SVG_LABEL_WIDTH + ms as f64 * plot_w / total as f64;
    let lanes_h: f64 = lanes
        .iter()
        .map(|l| l.rows as f64 * SVG_ROW_HEIGHT + 2.0 * SVG_LANE_PADDING)
        .sum();
    let height = lanes_h + SVG_AXIS_HEIGHT;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {SVG_WIDTH} {height:.0}\" \
         width=\"100%\" role=\"img\" aria-label=\"Timeline of attempts per worker\">\
         <defs><pattern id=\"lost-output\" width=\"4\" height=\"4\" \
         patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><rect width=\"2\" \
         height=\"4\" fill=\"#fff\" fill-opacity=\"0.8\"/></pattern></defs>"
    );
    // Lane backgrounds, then the time axis with a grid line per tick, then the bars on top.
    let mut y = 0.0;
    for (i, lane) in lanes.iter().enumerate() {
        let lane_h = lane.rows as f64 * SVG_ROW_HEIGHT + 2.0 * SVG_LANE_PADDING;
        if i % 2 == 0 {
            let _ = write!(
                svg,
                "<rect x=\"0\" y=\"{y:.1}\" width=\"{SVG_WIDTH}\" height=\"{lane_h:.1}\" \
                 fill=\"#f6f8fa\"/>"
            );
        }
        y += lane_h;
    }
    write_axis(&mut svg, total, y, x_of);
    let mut y = 0.0;
    for lane in &lanes {
        let lane_h = lane.rows as f64 * SVG_ROW_HEIGHT + 2.0 * SVG_LANE_PADDING;
        let mut label = format!("w{}", lane.worker);
        if !lane.name.is_empty() {
            let name: String = lane.name.chars().take(20).collect();
            let _ = write!(label, " {name}");
        }
        if lane.lost {
            label.push_str(" (lost)");
        }
        let _ = write!(
            svg,
            "<text x=\"4\" y=\"{:.1}\"{}>{}</text>",
            y + lane_h / 2.0 + 4.0,
            if lane.lost { " class=\"lost\"" } else { "" },
            escape(&label)
        );
        for (row, a) in &lane.bars {
            let end = a.end_ms.unwrap_or(now).max(a.start_ms);
            let x = x_of(a.start_ms);
            // A gap of a unit between attempts that follow each other.
            let w = (x_of(end) - x - 1.0).max(1.5);
            let by = y + SVG_LANE_PADDING + *row as f64 * SVG_ROW_HEIGHT + 1.0;
            let bh = SVG_ROW_HEIGHT - 2.0;
            let stroke = if a.backup {
                " stroke=\"#111\" stroke-width=\"1.5\""
            } else {
                ""
            };
            let mut classes = format!("bar {} {:?}", a.kind, a.outcome);
            if a.backup {
                classes.push_str(" backup");
            }
            if a.output_lost {
                classes.push_str(" output-lost");
            }
            let _ = write!(
                svg,
                "<g class=\"{classes}\"><rect x=\"{x:.2}\" y=\"{by:.1}\" width=\"{w:.2}\" \
                 height=\"{bh:.1}\" fill=\"{fill}\"{stroke}/>",
                fill = bar_fill(a),
            );
            if a.output_lost {
                let _ = write!(
                    svg,
                    "<rect x=\"{x:.2}\" y=\"{by:.1}\" width=\"{w:.2}\" height=\"{bh:.1}\" \
                     fill=\"url(#lost-output)\"/>"
                );
            }
            let _ = write!(
                svg,
                "<title>{kind} {task} attempt {attempt} on w{worker}: {what}{backup}{lost}; \
                 {from} → {to} ({dur})</title></g>",
                kind = a.kind,
                task = a.task,
                attempt = a.attempt,
                worker = a.worker,
                what = outcome_words(a.outcome),
                backup = if a.backup {
                    " (a backup or duplicate)"
                } else {
                    ""
                },
                lost = if a.output_lost {
                    "; its output was lost later and the task ran again"
                } else {
                    ""
                },
                from = fmt_ms(a.start_ms),
                to = if a.end_ms.is_some() {
                    fmt_ms(end)
                } else {
                    "now".into()
                },
                dur = fmt_ms(end - a.start_ms),
            );
        }
        y += lane_h;
    }
    // Where the reduce phase began.
    if let Some(first) = s
        .attempts
        .iter()
        .filter(|a| a.kind == "reduce")
        .map(|a| a.start_ms)
        .min()
    {
        let x = x_of(first);
        let _ = write!(
            svg,
            "<line x1=\"{x:.2}\" y1=\"0\" x2=\"{x:.2}\" y2=\"{y:.1}\" stroke=\"#59a14f\" \
             stroke-dasharray=\"4 3\"><title>first reduce attempt at {}</title></line>",
            fmt_ms(first)
        );
    }
    svg.push_str("</svg>");
    h.push_str(&svg);
    h.push('\n');
    if s.attempts_not_recorded > 0 {
        let _ = writeln!(
            h,
            "<p>{} later attempts are not drawn (the log keeps {}).</p>",
            s.attempts_not_recorded,
            super::MAX_RECORDED_ATTEMPTS
        );
    }
}

/// The time axis under the lanes (which end at `y`), with a grid line per tick through them.
fn write_axis(svg: &mut String, total: u64, y: f64, x_of: impl Fn(u64) -> f64) {
    let step = tick_step_ms(total);
    let mut t = 0;
    while t <= total {
        let x = x_of(t);
        let _ = write!(
            svg,
            "<line x1=\"{x:.2}\" y1=\"0\" x2=\"{x:.2}\" y2=\"{y:.1}\" stroke=\"#d1d9e0\" \
             stroke-width=\"0.5\"/><text class=\"tick\" x=\"{x:.2}\" y=\"{:.1}\" \
             text-anchor=\"{}\">{}</text>",
            y + 15.0,
            if t == 0 {
                "start"
            } else if x > SVG_WIDTH - 30.0 {
                "end"
            } else {
                "middle"
            },
            tick_label(t, step)
        );
        t += step;
    }
}

fn write_workers(h: &mut String, s: &JobStatus) {
    let _ = writeln!(h, "<h2>Workers ({})</h2>", s.workers.len());
    if s.workers.is_empty() {
        h.push_str(
            "<p>None yet: start some with <code>shoal mr worker --coordinator HOST:PORT</code>.\
             </p>\n",
        );
        return;
    }
    h.push_str(
        "<table><tr><th>worker</th><th>name</th><th>shuffle server</th><th>state</th>\
         <th class=\"num\">last heard</th><th>running now</th><th class=\"num\">attempts</th>\
         <th class=\"num\">won</th><th class=\"num\">busy</th></tr>",
    );
    for w in &s.workers {
        let mine = s.attempts.iter().filter(|a| a.worker == w.id);
        let busy_ms: u64 = mine
            .clone()
            .map(|a| a.end_ms.unwrap_or(s.elapsed_ms).saturating_sub(a.start_ms))
            .sum();
        let _ = write!(
            h,
            "<tr><td>w{id}</td><td>{name}</td><td><code>{addr}</code></td>\
             <td class=\"{state:?}\">{state:?}</td><td class=\"num\">{hb} ago</td>\
             <td>{running}</td><td class=\"num\">{n}</td><td class=\"num\">{won}</td>\
             <td class=\"num\">{busy:.0}%</td></tr>",
            id = w.id,
            name = escape(&w.name),
            addr = escape(&w.shuffle_addr),
            state = w.state,
            hb = fmt_ms(w.last_heartbeat_ms_ago),
            running = escape(&w.running.join(", ")),
            n = mine.count(),
            won = w.attempts_won,
            busy = percent(busy_ms, s.elapsed_ms),
        );
    }
    h.push_str("</table>\n");
}

fn task_label(t: &TaskStatus) -> String {
    format!("{} {}", t.kind, t.index)
}

fn write_active(h: &mut String, s: &JobStatus) {
    let tasks = || s.maps.iter().chain(&s.reduces);
    // Tasks with an attempt running, including won tasks whose losing attempt still runs.
    let running: Vec<&TaskStatus> = tasks().filter(|t| !t.running.is_empty()).collect();
    let _ = writeln!(h, "<h2>Running now ({})</h2>", running.len());
    if running.is_empty() {
        h.push_str("<p>Nothing is running.</p>\n");
    } else {
        h.push_str(
            "<table><tr><th>task</th><th>state</th><th>input</th><th>attempts running</th>\
             <th class=\"num\">attempts</th><th class=\"num\">failures</th></tr>",
        );
        for t in &running {
            let attempts: Vec<String> = t
                .running
                .iter()
                .map(|r| format!("{}@w{} for {}", r.attempt, r.worker, fmt_ms(r.elapsed_ms)))
                .collect();
            let state = match (t.winner_attempt, t.winner_worker) {
                (Some(a), Some(w)) => format!("won by {a}@w{w}: the rest is discarded"),
                _ => format!("{:?}", t.state),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{state}</td><td><code>{}</code></td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                task_label(t),
                escape(&t.input),
                escape(&attempts.join(", ")),
                t.attempts,
                t.failures
            );
        }
        h.push_str("</table>\n");
    }
    let failing: Vec<&TaskStatus> = tasks().filter(|t| t.failures > 0).collect();
    if !failing.is_empty() {
        let _ = writeln!(h, "<h2>Tasks with failures ({})</h2>", failing.len());
        h.push_str(
            "<table><tr><th>task</th><th>state</th><th class=\"num\">failures</th>\
             <th>last error</th></tr>",
        );
        for t in failing {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:?}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                task_label(t),
                t.state,
                t.failures,
                escape(t.last_error.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>\n");
    }
    let pending: Vec<&TaskStatus> = tasks().filter(|t| t.state == TaskState::Pending).collect();
    if !pending.is_empty() {
        let _ = write!(
            h,
            "<details id=\"pending\"><summary>Waiting for a worker ({})</summary><table>\
             <tr><th>task</th><th>input</th><th class=\"num\">bytes</th></tr>",
            pending.len()
        );
        for t in pending {
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td></tr>",
                task_label(t),
                escape(&t.input),
                t.input_bytes.map(fmt_bytes).unwrap_or_default()
            );
        }
        h.push_str("</table></details>\n");
    }
}

fn write_finished(h: &mut String, s: &JobStatus) {
    for (id, what, tasks) in [
        ("maps-done", "map", &s.maps),
        ("reduces-done", "reduce", &s.reduces),
    ] {
        let done: Vec<&TaskStatus> = tasks
            .iter()
            .filter(|t| matches!(t.state, TaskState::Done | TaskState::Committed))
            .collect();
        let committing = tasks
            .iter()
            .filter(|t| t.state == TaskState::Committing)
            .count();
        let _ = write!(
            h,
            "<details id=\"{id}\"><summary>Finished {what} tasks ({} of {}{})</summary>",
            done.len(),
            tasks.len(),
            if committing > 0 {
                format!("; {committing} being committed")
            } else {
                String::new()
            }
        );
        h.push_str(
            "<table><tr><th>task</th><th>input</th><th>winner</th><th class=\"num\">time</th>\
             <th class=\"num\">bytes in</th><th class=\"num\">bytes out</th>\
             <th class=\"num\">attempts</th><th class=\"num\">failures</th></tr>",
        );
        for t in done {
            let winner = match (t.winner_attempt, t.winner_worker) {
                (Some(a), Some(w)) => format!("{a}@w{w}"),
                _ => String::new(),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{winner}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                task_label(t),
                escape(&t.input),
                t.winner_elapsed_ms.map(fmt_ms).unwrap_or_default(),
                t.bytes_in.map(fmt_bytes).unwrap_or_default(),
                t.bytes_out.map(fmt_bytes).unwrap_or_default(),
                t.attempts,
                t.failures,
            );
        }
        h.push_str("</table></details>\n");
    }
}

#[cfg(test)]
mod tests;
