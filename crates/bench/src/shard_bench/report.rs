//! The figures of `shoal bench shard`: one row per (setting, workload, group count), the
//! speed-up and efficiency against one group, the targets, the tables and the SVG plot.

use std::fmt::Write as _;

use crate::svg::{curve, escape, legend, open, Area};

/// The issue's targets under quota: speed-up at least this at that many groups.
pub const TARGETS: [(usize, f64); 2] = [(4, 3.4), (8, 6.0)];

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    /// Unconditional puts (fsync on a majority before the answer).
    Put,
    /// Linearizable gets (read-index through the group's leader).
    Get,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "puts",
            Workload::Get => "gets",
        }
    }
}

/// With or without CPU quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setting {
    Quota,
    NoQuota,
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::Quota => "quota",
            Setting::NoQuota => "no quota",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct Row {
    pub setting: Setting,
    pub workload: Workload,
    pub groups: usize,
    pub clients: usize,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Host CPU busy over the run, in cores.
    pub host_cores: Option<f64>,
    /// Cgroups' throttled periods and time over the run (quota runs).
    pub throttled: Option<(u64, f64)>,
    /// The quotas summed over the shard servers, in cores (quota runs).
    pub quota_cores: Option<f64>,
    /// CPU the shard servers used over the run, in cores (/proc/PID/stat).
    pub servers_cores: f64,
    /// CPU the benchmark process (load generator and controller) used, in cores.
    pub loadgen_cores: f64,
}

/// X(N) / X(1).
pub fn speedup(x_n: f64, x_1: f64) -> Option<f64> {
    (x_1 > 0.0).then(|| x_n / x_1)
}

/// X(N) / (N · X(1)).
pub fn efficiency(x_n: f64, n: usize, x_1: f64) -> Option<f64> {
    speedup(x_n, x_1).map(|s| s / n.max(1) as f64)
}

/// The target speed-up at `groups`, if the issue sets one.
pub fn target(groups: usize) -> Option<f64> {
    TARGETS.iter().find(|&&(n, _)| n == groups).map(|&(_, t)| t)
}

/// The rows of one setting and workload, by group count, with the one-group throughput.
fn series(rows: &[Row], setting: Setting, workload: Workload) -> (Vec<&Row>, Option<f64>) {
    let mut rs: Vec<&Row> = rows
        .iter()
        .filter(|r| r.setting == setting && r.workload == workload)
        .collect();
    rs.sort_by_key(|r| r.groups);
    let x1 = rs.iter().find(|r| r.groups == 1).map(|r| r.ops_per_sec);
    (rs, x1)
}

/// The speed-up points (groups, X(N)/X(1)) of one setting and workload.
pub fn speedups(rows: &[Row], setting: Setting, workload: Workload) -> Vec<(usize, f64)> {
    let (rs, x1) = series(rows, setting, workload);
    rs.iter()
        .filter_map(|r| Some((r.groups, speedup(r.ops_per_sec, x1?)?)))
        .collect()
}

/// One table (Markdown, so that it goes into docs/benchmarks.md as printed).
pub fn table(rows: &[Row], setting: Setting, workload: Workload, heading: &str) -> String {
    let (rs, x1) = series(rows, setting, workload);
    let mut out = String::new();
    let _ = writeln!(out, "{heading}\n");
    let _ = writeln!(
        out,
        "| groups | clients | ops/s | p50 ms | p99 ms | speed-up | efficiency | target | quota sum (cores) | servers' CPU (cores) | load generator CPU (cores) | host CPU (cores) | throttled (periods, s) | errors |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in rs {
        let s = x1.and_then(|x1| speedup(r.ops_per_sec, x1));
        let e = x1.and_then(|x1| efficiency(r.ops_per_sec, r.groups, x1));
        let goal = match (target(r.groups), s) {
            (Some(t), Some(s)) if setting == Setting::Quota => {
                format!("≥{t}×: {}", if s >= t { "met" } else { "not met" })
            }
            (Some(t), _) if setting == Setting::Quota => format!("≥{t}×: no figure"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {goal} | {} | {:.2} | {:.2} | {} | {} | {} |",
            r.groups,
            r.clients,
            r.ops_per_sec,
            r.p50_ms,
            r.p99_ms,
            s.map_or("-".into(), |s| format!("{s:.2}×")),
            e.map_or("-".into(), |e| format!("{:.0}%", e * 100.0)),
            r.quota_cores.map_or("-".into(), |c| format!("{c:.2}")),
            r.servers_cores,
            r.loadgen_cores,
            r.host_cores.map_or("-".into(), |c| format!("{c:.2}")),
            r.throttled
                .map_or("-".into(), |(n, s)| format!("{n}, {s:.1}")),
            r.errors,
        );
    }
    out
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = WIDTH - 190.0;
const TOP: f64 = 64.0;
const BOTTOM: f64 = HEIGHT - 60.0;

/// A curve of the plot: one setting and workload.
type Curve = (Setting, Workload);

fn style(setting: Setting, workload: Workload) -> (&'static str, &'static str) {
    let color = match setting {
        Setting::Quota => "#1f5fbf",
        Setting::NoQuota => "#d0402b",
    };
    let dash = match workload {
        Workload::Put => "",
        Workload::Get => "8 5",
    };
    (color, dash)
}

/// Speed-up against group count: the ideal line, the targets, and one curve per setting ×
/// workload.
pub fn svg(rows: &[Row], subtitle: &str) -> String {
    let mut groups: Vec<usize> = rows.iter().map(|r| r.groups).collect();
    groups.push(1);
    groups.sort_unstable();
    groups.dedup();
    let max_n = *groups.last().unwrap_or(&1) as f64;
    let curves: Vec<(Curve, Vec<(usize, f64)>)> = [
        (Setting::Quota, Workload::Put),
        (Setting::Quota, Workload::Get),
        (Setting::NoQuota, Workload::Put),
        (Setting::NoQuota, Workload::Get),
    ]
    .into_iter()
    .map(|k| (k, speedups(rows, k.0, k.1)))
    .filter(|(_, pts)| !pts.is_empty())
    .collect();
    let max_y = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(max_n, f64::max);
    let area = Area::new(LEFT, RIGHT, TOP, BOTTOM, max_y);
    let x_right = max_n.max(2.0);
    let px = |n: f64| LEFT + (n - 1.0) / (x_right - 1.0) * (RIGHT - LEFT);
    let py = |y: f64| area.py(y);

    let mut svg = String::new();
    open(&mut svg, WIDTH, HEIGHT);
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="20" text-anchor="middle" font-size="15" font-weight="bold">Sharded KV: speed-up over one group</text>"##,
        WIDTH / 2.0,
    );
    // The machine on one line, the settings on the next.
    let (machine, settings) = subtitle.split_once("; ").unwrap_or((subtitle, ""));
    for (i, line) in [machine, settings].into_iter().enumerate() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" font-size="11" fill="#333">{}</text>"##,
            WIDTH / 2.0,
            36 + 14 * i,
            escape(line)
        );
    }
    area.y_grid(&mut svg);
    for &n in &groups {
        area.x_tick(&mut svg, px(n as f64), &n.to_string());
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">replica groups (3 servers each)</text><text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle" font-size="12">throughput / one group's</text>{}"##,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 40.0,
        (TOP + BOTTOM) / 2.0,
        area.border()
    );
    // Ideal: N×.
    let _ = writeln!(
        svg,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-width="1.5" stroke-dasharray="3 3"/>"##,
        px(1.0),
        py(1.0),
        px(x_right),
        py(x_right)
    );
    for (n, t) in TARGETS {
        if (n as f64) <= x_right {
            let _ = writeln!(
                svg,
                r##"<path d="M{0:.1},{1:.1} l-6,10 h12 z" fill="none" stroke="#2a8f3a" stroke-width="1.5"/><text x="{2:.1}" y="{3:.1}" font-size="10" fill="#2a8f3a">target {t}×</text>"##,
                px(n as f64),
                py(t),
                px(n as f64) + 8.0,
                py(t) + 12.0
            );
        }
    }
    for ((setting, workload), points) in &curves {
        let (color, dash) = style(*setting, *workload);
        let points: Vec<(f64, f64)> = points.iter().map(|&(n, y)| (px(n as f64), py(y))).collect();
        curve(&mut svg, &points, color, dash);
    }
    // Legend.
    let mut ly = TOP + 10.0;
    let lx = RIGHT + 15.0;
    legend(&mut svg, lx, ly, ("#999", "3 3", 1.5), "ideal (N×)");
    for ((setting, workload), _) in &curves {
        ly += 20.0;
        let (color, dash) = style(*setting, *workload);
        let label = format!("{}, {}", workload.name(), setting.name());
        legend(&mut svg, lx, ly, (color, dash, 2.0), &label);
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(setting: Setting, groups: usize, ops_per_sec: f64) -> Row {
        Row {
            setting,
            workload: Workload::Put,
            groups,
            clients: 16 * groups,
            ops: 1000,
            ops_per_sec,
            p50_ms: 1.0,
            p99_ms: 2.0,
            errors: 0,
            host_cores: Some(1.5),
            throttled: Some((12, 0.5)),
            quota_cores: Some(0.15 * groups as f64),
            servers_cores: 0.1,
            loadgen_cores: 0.25,
        }
    }

    #[test]
    fn speedup_and_efficiency() {
        assert_eq!(speedup(350.0, 100.0), Some(3.5));
        assert_eq!(efficiency(350.0, 4, 100.0), Some(0.875));
        assert_eq!(speedup(1.0, 0.0), None);
        assert_eq!(efficiency(600.0, 8, 100.0), Some(0.75));
        assert_eq!(target(4), Some(3.4));
        assert_eq!(target(8), Some(6.0));
        assert_eq!(target(2), None);
    }

    #[test]
    fn tables_and_plot_from_rows() {
        let rows = vec![
            row(Setting::Quota, 4, 330.0),
            row(Setting::Quota, 1, 100.0),
            row(Setting::Quota, 8, 610.0),
            row(Setting::NoQuota, 1, 1000.0),
            row(Setting::NoQuota, 4, 1200.0),
        ];
        assert_eq!(
            speedups(&rows, Setting::Quota, Workload::Put),
            vec![(1, 1.0), (4, 3.3), (8, 6.1)]
        );
        let t = table(&rows, Setting::Quota, Workload::Put, "### puts");
        let lines: Vec<&str> = t.lines().collect();
        let columns = |l: &str| l.matches('|').count();
        assert!(
            lines[2..].iter().all(|l| columns(l) == columns(lines[2])),
            "{t}"
        );
        assert!(lines[4].starts_with("| 1 | 16 | 100 |"), "{t}");
        assert!(lines[5].contains("| 3.30× | 82% | ≥3.4×: not met |"), "{t}");
        assert!(
            lines[6]
                .contains("| 6.10× | 76% | ≥6×: met | 1.20 | 0.10 | 0.25 | 1.50 | 12, 0.5 | 0 |"),
            "{t}"
        );
        let t = table(&rows, Setting::NoQuota, Workload::Put, "### puts, no quota");
        assert!(t.contains("| 1.20× | 30% | - |"), "{t}");
        assert!(
            table(&rows, Setting::Quota, Workload::Get, "x")
                .lines()
                .count()
                == 4
        );
        let svg = svg(&rows, "a <subtitle>");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;subtitle&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("puts, no quota") && svg.contains("target 6×"));
    }
}
