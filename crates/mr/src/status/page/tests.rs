use std::collections::BTreeMap;

use super::*;
use crate::status::{JobInfo, RunningAttemptStatus, WorkerStatus};

fn task(kind: &str, index: u32, state: TaskState) -> TaskStatus {
    let done = matches!(state, TaskState::Done | TaskState::Committed);
    TaskStatus {
        kind: kind.into(),
        index,
        state,
        attempts: 1,
        failures: 0,
        running: vec![],
        winner_attempt: done.then_some(0),
        winner_worker: done.then_some(1),
        last_error: None,
        input: String::new(),
        input_bytes: None,
        bytes_in: done.then_some(1_000_000),
        bytes_out: done.then_some(400_000),
        winner_elapsed_ms: done.then_some(2_000),
    }
}

fn attempt(
    kind: &str,
    task: u32,
    attempt: u32,
    worker: u64,
    (start_ms, end_ms): (u64, Option<u64>),
    outcome: AttemptOutcome,
) -> AttemptRecord {
    AttemptRecord {
        kind: kind.into(),
        task,
        attempt,
        worker,
        start_ms,
        end_ms,
        outcome,
        backup: false,
        output_lost: false,
    }
}

/// A map phase at 3 of 4 tasks (3 MB of 4 MB after 6 s of map phase), with a failure, a
/// worker lost, a backup running, and an attacker's strings in worker names and errors.
fn snapshot() -> JobStatus {
    let mut maps = vec![
        task("map", 0, TaskState::Done),
        task("map", 1, TaskState::Done),
        task("map", 2, TaskState::Done),
        task("map", 3, TaskState::Running),
    ];
    maps[1].failures = 1;
    maps[1].attempts = 2;
    maps[1].last_error = Some("<script>alert(1)</script>".into());
    maps[3].attempts = 3;
    maps[3].running = vec![
        RunningAttemptStatus {
            attempt: 1,
            worker: 1,
            elapsed_ms: 4_000,
        },
        RunningAttemptStatus {
            attempt: 2,
            worker: 2,
            elapsed_ms: 1_000,
        },
    ];
    let mut backup = attempt("map", 3, 2, 2, (7_000, None), AttemptOutcome::Running);
    backup.backup = true;
    let mut lost_output = attempt("map", 2, 0, 3, (1_000, Some(2_500)), AttemptOutcome::Won);
    lost_output.output_lost = true;
    let info = JobInfo {
        app: "wordcount".into(),
        out_dir: "/tmp/out".into(),
        input_bytes: 4_000_000,
        map_inputs: (0..4)
            .map(|i| (format!("books/b{i}.txt bytes 0..1000000"), 1_000_000))
            .collect(),
    };
    JobStatus {
        phase: "map".into(),
        elapsed_ms: 8_000,
        maps_total: 4,
        maps_done: 3,
        reduces_total: 2,
        reduces_done: 0,
        maps,
        reduces: vec![
            task("reduce", 0, TaskState::Pending),
            task("reduce", 1, TaskState::Pending),
        ],
        workers: vec![
            WorkerStatus {
                id: 1,
                name: "host&<b>".into(),
                shuffle_addr: "127.0.0.1:7001".into(),
                state: WorkerState::Busy,
                last_heartbeat_ms_ago: 120,
                running: vec!["map 3 attempt 1".into()],
                attempts_won: 2,
            },
            WorkerStatus {
                id: 2,
                name: "h2".into(),
                shuffle_addr: "127.0.0.1:7002".into(),
                state: WorkerState::Busy,
                last_heartbeat_ms_ago: 300,
                running: vec!["map 3 attempt 2".into()],
                attempts_won: 1,
            },
            WorkerStatus {
                id: 3,
                name: "h3".into(),
                shuffle_addr: "127.0.0.1:7003".into(),
                state: WorkerState::Lost,
                last_heartbeat_ms_ago: 5_000,
                running: vec![],
                attempts_won: 0,
            },
        ],
        counters: BTreeMap::from([("map.input.bytes".to_string(), 3_000_000)]),
        outcome: None,
        app: String::new(),
        out_dir: String::new(),
        input_bytes: 0,
        attempts: vec![
            attempt("map", 0, 0, 1, (2_000, Some(4_000)), AttemptOutcome::Won),
            lost_output,
            attempt("map", 1, 0, 2, (2_000, Some(3_000)), AttemptOutcome::Failed),
            attempt("map", 1, 1, 2, (3_000, Some(5_000)), AttemptOutcome::Won),
            attempt(
                "map",
                3,
                0,
                3,
                (2_500, Some(3_000)),
                AttemptOutcome::WorkerLost,
            ),
            attempt("map", 3, 1, 1, (4_000, None), AttemptOutcome::Running),
            backup,
        ],
        attempts_not_recorded: 0,
        attempts_included: true,
    }
    .with_job(&info)
}

#[test]
fn summary_counts_tasks_bytes_attempts_and_estimates_the_time_left() {
    let s = summarize(&snapshot());
    assert_eq!(s.phase, "map");
    assert_eq!((s.tasks_done, s.tasks_total), (3, 6));
    assert_eq!((s.maps_done, s.maps_running), (3, 1));
    assert_eq!(
        (s.map_bytes_done, s.map_bytes_total),
        (3_000_000, 4_000_000)
    );
    assert_eq!(
        s.reduce_bytes_total, None,
        "not known before the maps are done"
    );
    // The map phase began with the first map attempt, at 1 s: 7 s for 3 MB, 1 MB left.
    assert_eq!(s.phase_elapsed_ms, 7_000);
    assert_eq!(s.estimated_ms_left, Some(2_333));
    let rate = s.throughput_bytes_per_s.expect("a rate");
    assert!((rate - 3e6 / 7.0).abs() < 1.0, "{rate}");
    assert_eq!(s.running_attempts, 2);
    assert_eq!(s.backup_attempts, 1);
    assert_eq!(s.failed_attempts, 1);
    assert_eq!(s.lost_attempts, 1);
    assert_eq!((s.workers_live, s.workers_lost), (2, 1));
}

#[test]
fn page_puts_the_summary_first_and_collapses_finished_tasks() {
    let html = render_html(&snapshot());
    let cards = html.find("class=\"cards\"").expect("summary cards");
    let timeline = html.find("<svg").expect("timeline");
    let finished = html
        .find("<details id=\"maps-done\"><summary>Finished map tasks (3 of 4)</summary>")
        .expect("finished maps collapsed");
    assert!(cards < timeline && timeline < finished);
    assert!(
        html.contains("<div class=\"value\">3 / 4</div>"),
        "map tasks"
    );
    assert!(html.contains("3.0 MB of 4.0 MB read"));
    assert!(html.contains("about 2.3 s left in the map phase"));
    assert!(html.contains("2 running"));
    assert!(html.contains("1 backups · 1 failed · 1 lost with a worker"));
    // Each task's input, and the running task outside the collapsed sections.
    let running = html
        .find("<h2>Running now (1)</h2>")
        .expect("running section");
    assert!(html[running..finished].contains("books/b3.txt bytes 0..1000000"));
    assert!(html[running..finished].contains("<td>map 3</td><td>Running</td>"));
    assert!(html[finished..].contains("books/b0.txt bytes 0..1000000"));
    assert!(html.contains("partition 1 of every map output"));
    // Worker data is escaped.
    assert!(!html.contains("<script>alert"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("host&amp;&lt;b&gt;"));
    // The live page reloads itself and links the live JSON.
    assert!(html.contains("location.reload()"));
    assert!(html.contains("href=\"/status.json\""));
}

#[test]
fn timeline_is_valid_svg_with_a_lane_per_worker_and_backups_and_failures_visible() {
    let html = render_html(&snapshot());
    let start = html.find("<svg").expect("svg");
    let end = html.find("</svg>").expect("svg end") + "</svg>".len();
    let doc = roxmltree::Document::parse(&html[start..end]).expect("the SVG is well-formed XML");
    let bars: Vec<roxmltree::Node> = doc
        .descendants()
        .filter(|n| n.attribute("class").is_some_and(|c| c.starts_with("bar ")))
        .collect();
    assert_eq!(bars.len(), 7, "a bar per attempt");
    let class_has = |n: &roxmltree::Node, word: &str| {
        n.attribute("class")
            .is_some_and(|c| c.split(' ').any(|w| w == word))
    };
    let backup = bars
        .iter()
        .find(|b| class_has(b, "backup"))
        .expect("a backup bar");
    let rect = backup
        .children()
        .find(|c| c.has_tag_name("rect"))
        .expect("its rect");
    assert_eq!(
        rect.attribute("stroke"),
        Some("#111"),
        "backups are outlined"
    );
    let title = |n: &roxmltree::Node| {
        n.children()
            .find(|c| c.has_tag_name("title"))
            .and_then(|t| t.text())
            .unwrap_or("")
            .to_string()
    };
    assert!(title(backup).contains("map 3 attempt 2 on w2: running (a backup or duplicate)"));
    let failed = bars
        .iter()
        .find(|b| class_has(b, "Failed"))
        .expect("a failed bar");
    let rect = failed.children().find(|c| c.has_tag_name("rect")).unwrap();
    assert_eq!(rect.attribute("fill"), Some("#e15759"), "failures are red");
    assert!(title(failed).contains("map 1 attempt 0 on w2: failed"));
    assert!(bars.iter().any(|b| class_has(b, "WorkerLost")));
    assert!(bars.iter().any(|b| class_has(b, "output-lost")));
    // Bars sit at their times: map 1 attempt 0 ran 2 s..3 s of 8 s.
    let x: f64 = rect.attribute("x").unwrap().parse().unwrap();
    let w: f64 = rect.attribute("width").unwrap().parse().unwrap();
    let plot = SVG_WIDTH - SVG_LABEL_WIDTH - 12.0;
    assert!(
        (x - (SVG_LABEL_WIDTH + plot * 2.0 / 8.0)).abs() < 0.1,
        "{x}"
    );
    assert!((w - (plot / 8.0 - 1.0)).abs() < 0.1, "{w}");
    // A lane label per worker; the lost one says so.
    let labels: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text") && n.attribute("class") != Some("tick"))
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(labels, ["w1 host&<b>", "w2 h2", "w3 h3 (lost)"]);
    // A time axis from 0 s to 8 s.
    let ticks: Vec<&str> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("tick"))
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(ticks.first(), Some(&"0 s"));
    assert_eq!(ticks.last(), Some(&"8 s"));
}

#[test]
fn final_files_are_written_atomically_and_the_json_carries_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = snapshot();
    s.outcome = Some(JobOutcome::Done);
    s.phase = "done".into();
    write_final(dir.path(), &s).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [FINAL_HTML, FINAL_JSON], "no temporary file left");
    let html = std::fs::read_to_string(dir.path().join(FINAL_HTML)).unwrap();
    assert!(
        !html.contains("location.reload"),
        "the final page does not reload"
    );
    assert!(html.contains("href=\"_status.json\""));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(FINAL_JSON)).unwrap())
            .unwrap();
    assert_eq!(json["summary"]["phase"], "done");
    assert_eq!(json["summary"]["estimated_ms_left"], 0);
    assert_eq!(json["summary"]["map_bytes_total"], 4_000_000);
    assert_eq!(json["maps"][3]["input"], "books/b3.txt bytes 0..1000000");
    assert_eq!(json["attempts"][6]["backup"], true);
    // The snapshot reads back from the document (the summary is extra).
    let back: JobStatus = serde_json::from_value(json).unwrap();
    assert_eq!(back, s);
    assert!(is_final_file("_status.json") && is_final_file("._status.html.tmp"));
    assert!(!is_final_file("mr-out-0"));
}

#[test]
fn an_empty_job_renders() {
    let html = render_html(&JobStatus::starting());
    assert!(html.contains("No worker has registered yet"));
    assert!(html.contains("time left: not known yet"));
}

#[test]
fn tick_labels_fit_the_scale() {
    let labels = |total: u64| {
        let step = tick_step_ms(total);
        (0..=total / step)
            .map(|i| tick_label(i * step, step))
            .collect::<Vec<_>>()
    };
    assert_eq!(labels(91)[..3], ["0 s", "10 ms", "20 ms"]);
    assert_eq!(labels(2_800)[..3], ["0 s", "0.5 s", "1.0 s"]);
    assert_eq!(labels(18_800)[..3], ["0 s", "2 s", "4 s"]);
    assert_eq!(labels(600_000)[..3], ["0 s", "1 min", "2 min"]);
    assert!(labels(36_000_000).len() <= 11);
}

#[test]
fn a_failed_job_reports_what_it_read_not_the_whole_input() {
    let mut s = snapshot();
    s.phase = "failed".into();
    s.outcome = Some(JobOutcome::Failed {
        task: "map 3".into(),
        error: "mapper exploded".into(),
    });
    let sum = summarize(&s);
    assert_eq!(sum.estimated_ms_left, None);
    assert_eq!(sum.throughput_bytes_per_s, Some(3e6 / 8.0));
    let html = render_html(&s);
    assert!(html.contains("<b>The job failed:</b> map 3 — mapper exploded"));
    assert!(
        !html.contains("location.reload"),
        "an ended job's page does not reload"
    );
}
