//! `--plot FILE.svg`: throughput and p99 latency against client count, one line per
//! target × mode. Hand-written SVG (two panels, a log₂ client axis): a plotting crate would
//! cost more build time than these hundred lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::load::{Mode, RunResult};
use super::target::TargetKind;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 440.0;
const PANEL_WIDTH: f64 = WIDTH / 2.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 80.0;
const MARGIN_BOTTOM: f64 = 50.0;

/// A round tick step giving about five ticks up to `max`.
pub(crate) fn tick_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

pub(crate) fn fmt_tick(v: f64) -> String {
    if v >= 1000.0 && v % 1000.0 == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

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
    let left = x0 + MARGIN_LEFT;
    let right = x0 + PANEL_WIDTH - MARGIN_RIGHT;
    let top = MARGIN_TOP;
    let bottom = HEIGHT - MARGIN_BOTTOM;
    let max_y = series
        .values()
        .flatten()
        .map(|&(_, y)| y)
        .fold(0.0, f64::max);
    let step = tick_step(if max_y > 0.0 { max_y } else { 1.0 });
    let y_top = (max_y / step).ceil().max(1.0) * step;
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
    let py = |y: f64| bottom - y / y_top * (bottom - top);

    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>"#,
        (left + right) / 2.0,
        top - 14.0
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= y_top + step / 2.0 {
        let _ = writeln!(
            svg,
            r##"<line x1="{left:.1}" y1="{0:.1}" x2="{right:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{1:.1}" y="{2:.1}" text-anchor="end" font-size="11">{3}</text>"##,
            py(y),
            left - 6.0,
            py(y) + 4.0,
            fmt_tick(y)
        );
        y += step;
    }
    let _ = writeln!(
        svg,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle" font-size="12">{unit}</text>"#,
        x0 + 16.0,
        (top + bottom) / 2.0
    );
    // X ticks: the client counts measured.
    for &c in clients {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{bottom:.1}" x2="{0:.1}" y2="{1:.1}" stroke="#888"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle" font-size="11">{c}</text>"##,
            px(c),
            bottom + 5.0,
            bottom + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">concurrent clients (log scale)</text>"#,
        (left + right) / 2.0,
        bottom + 38.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
        right - left,
        bottom - top
    );
    for (&(target, mode), points) in series {
        let (color, dash) = style(target, mode);
        let path: Vec<String> = points
            .iter()
            .map(|&(c, y)| format!("{:.1},{:.1}", px(c), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            path.join(" ")
        );
        for &(c, y) in points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                px(c),
                py(y)
            );
        }
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
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
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
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="40" x2="{:.1}" y2="40" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="44" font-size="12">{} {}</text>"#,
            x + 28.0,
            x + 34.0,
            target.name(),
            mode.name()
        );
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

pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(tick_step(12.0), 5.0);
        assert_eq!(tick_step(0.9), 0.2);
    }
}
