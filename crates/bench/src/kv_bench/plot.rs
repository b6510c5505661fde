//! `--plot FILE.svg`: throughput and p99 latency against client count, one line per
//! target × mode. Hand-written SVG (two panels, a log₂ client axis): a plotting crate would
//! cost more build time than these hundred lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::svg::{curve, escape, legend, open, Area};

use super::load::{Mode, RunResult};
use super::target::TargetKind;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 440.0;
const PANEL_WIDTH: f64 = WIDTH / 2.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 80.0;
const MARGIN_BOTTOM: f64 = 50.0;

fn style(target: TargetKind, mode: Mode) -> (&'static str, &'static str) {
    let color = match target {
        TargetKind::Shoal => "#1f5fbf",
        TargetKind::Etcd => "#d0402b",
    };
    let dash = match mode {
        Mode::Put => "",
        Mode::Get => "8 5",
        Mode::Mixed => "2 4",
    };
    (color, dash)
}

type Series = BTreeMap<(TargetKind, Mode), Vec<(usize, f64)>>;

fn panel(svg: &mut String, x0: f64, title: &str, unit: &str, series: &Series, clients: &[usize]) {
    let max_y = series
        .values()
        .flatten()
        .map(|&(_, y)| y)
        .fold(0.0, f64::max);
    let area = Area::new(
        x0 + MARGIN_LEFT,
        x0 + PANEL_WIDTH - MARGIN_RIGHT,
        MARGIN_TOP,
        HEIGHT - MARGIN_BOTTOM,
        max_y,
    );
    let (left, right) = (area.left, area.right);
    let lx = |c: usize| (c.max(1) as f64).log2();
    let (min_x, max_x) = (
        clients.iter().map(|&c| lx(c)).fold(f64::INFINITY, f64::min),
        clients
            .iter()
            .map(|&c| lx(c))
            .fold(f64::NEG_INFINITY, f64::max),
    );
    let px = |c: usize| {
        if max_x > min_x {
            left + 20.0 + (lx(c) - min_x) / (max_x - min_x) * (right - left - 40.0)
        } else {
            (left + right) / 2.0
        }
    };

    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>"#,
        (left + right) / 2.0,
        area.top - 14.0
    );
    area.y_grid(svg);
    let _ = writeln!(
        svg,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle" font-size="12">{unit}</text>"#,
        x0 + 16.0,
        (area.top + area.bottom) / 2.0
    );
    // X ticks: the client counts measured.
    for &c in clients {
        area.x_tick(svg, px(c), &c.to_string());
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">concurrent clients (log scale)</text>"#,
        (left + right) / 2.0,
        area.bottom + 38.0
    );
    let _ = writeln!(svg, "{}", area.border());
    for (&(target, mode), points) in series {
        let (color, dash) = style(target, mode);
        let points: Vec<(f64, f64)> = points.iter().map(|&(c, y)| (px(c), area.py(y))).collect();
        curve(svg, &points, color, dash);
    }
}

/// The SVG document for these runs (several runs of one target, mode and client count:
/// the last one is drawn).
pub fn svg(runs: &[RunResult], subtitle: &str) -> String {
    let mut throughput = Series::new();
    let mut p99 = Series::new();
    for r in runs {
        for (series, y) in [
            (&mut throughput, r.ops_per_sec()),
            (&mut p99, r.pct_ms(0.99)),
        ] {
            let points = series.entry((r.target, r.mode)).or_default();
            points.retain(|&(c, _)| c != r.clients);
            points.push((r.clients, y));
            points.sort_by_key(|&(c, _)| c);
        }
    }
    let mut clients: Vec<usize> = runs.iter().map(|r| r.clients).collect();
    clients.sort_unstable();
    clients.dedup();

    let mut svg = String::new();
    open(&mut svg, WIDTH, HEIGHT);
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{:.1}" y="20" text-anchor="middle" font-size="13" fill="#333">{}</text>"##,
        WIDTH / 2.0,
        escape(subtitle)
    );
    // Legend.
    let mut x = 20.0;
    for &(target, mode) in throughput.keys() {
        let (color, dash) = style(target, mode);
        let label = format!("{} {}", target.name(), mode.name());
        legend(&mut svg, x, 40.0, (color, dash, 2.0), &label);
        x += 120.0;
    }
    panel(
        &mut svg,
        0.0,
        "Throughput",
        "operations per second",
        &throughput,
        &clients,
    );
    panel(
        &mut svg,
        PANEL_WIDTH,
        "p99 latency",
        "milliseconds",
        &p99,
        &clients,
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_panels_with_a_curve_per_target_and_mode() {
        let mut runs = Vec::new();
        for (i, &clients) in [1usize, 4, 16, 64].iter().enumerate() {
            for (target, mode) in [
                (TargetKind::Shoal, Mode::Put),
                (TargetKind::Etcd, Mode::Get),
            ] {
                runs.push(RunResult {
                    target,
                    mode,
                    clients,
                    ops: 1000 * (i as u64 + 1),
                    secs: 1.0,
                    latencies_us: (0..100).map(|k| k * 37).collect(),
                    errors: 0,
                    warmup_errors: 0,
                    misses: 0,
                    first_error: None,
                });
            }
        }
        let svg = svg(&runs, "a <sub> & t");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;sub&gt; &amp; t"), "{svg}");
        // Two panels × two curves, each with its four points.
        assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 16, "{svg}");
        assert!(svg.contains(">shoal put</text>") && svg.contains(">etcd get</text>"));
        assert!(svg.contains(">Throughput</text>") && svg.contains(">p99 latency</text>"));
    }
}
