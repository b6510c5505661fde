//! The few SVG pieces the benchmarks' plots share: round ticks, a plot area with its grid,
//! ticks and border, curves with their points, legend entries. Hand-written: a plotting
//! crate would cost more build time than these lines, and the plots are simple line charts.

use std::fmt::Write as _;

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

/// A tick label: `2k` for round thousands, no decimals for whole numbers.
pub(crate) fn fmt_tick(v: f64) -> String {
    if v >= 1000.0 && v % 1000.0 == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Text made safe to put between SVG tags.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Opens a `width` × `height` document (close it with `</svg>`).
pub(crate) fn open(svg: &mut String, width: f64, height: f64) {
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
}

/// The plotting area of a chart, in pixels, and its y scale from 0 to `y_top`.
pub(crate) struct Area {
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
    /// The y value at the top edge (a whole number of `step`s).
    pub y_top: f64,
    /// Between two horizontal grid lines.
    pub step: f64,
}

impl Area {
    /// An area whose y scale reaches the first round step at or above `max_y` (1 when
    /// `max_y` is 0).
    pub fn new(left: f64, right: f64, top: f64, bottom: f64, max_y: f64) -> Area {
        let step = tick_step(if max_y > 0.0 { max_y } else { 1.0 });
        let y_top = (max_y / step).ceil().max(1.0) * step;
        Area {
            left,
            right,
            top,
            bottom,
            y_top,
            step,
        }
    }

    /// The pixel row of value `y`.
    pub fn py(&self, y: f64) -> f64 {
        self.bottom - y / self.y_top * (self.bottom - self.top)
    }

    /// Horizontal grid lines with their labels, every `step` from 0 to `y_top`.
    pub fn y_grid(&self, svg: &mut String) {
        let mut y = 0.0;
        while y <= self.y_top + self.step / 2.0 {
            let row = self.py(y);
            let _ = writeln!(
                svg,
                r##"<line x1="{:.1}" y1="{row:.1}" x2="{:.1}" y2="{row:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
                self.left,
                self.right,
                self.left - 6.0,
                row + 4.0,
                fmt_tick(y)
            );
            y += self.step;
        }
    }

    /// A tick under the area at pixel column `x`, labelled.
    pub fn x_tick(&self, svg: &mut String, x: f64, label: &str) {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#888"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle" font-size="11">{label}</text>"##,
            x,
            self.bottom,
            self.bottom + 5.0,
            self.bottom + 18.0
        );
    }

    /// The frame around the area.
    pub fn border(&self) -> String {
        format!(
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
            self.left,
            self.top,
            self.right - self.left,
            self.bottom - self.top
        )
    }
}

/// A curve through `points` (pixels), each point marked with a dot.
pub(crate) fn curve(svg: &mut String, points: &[(f64, f64)], color: &str, dash: &str) {
    let path: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
        path.join(" ")
    );
    for &(x, y) in points {
        let _ = writeln!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#
        );
    }
}

/// A legend entry at (`x`, `y`): a short line in the curve's style, then its label.
pub(crate) fn legend(svg: &mut String, x: f64, y: f64, style: (&str, &str, f64), label: &str) {
    let (color, dash, width) = style;
    let _ = writeln!(
        svg,
        r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="{width}" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}" font-size="12">{label}</text>"#,
        x + 28.0,
        x + 34.0,
        y + 4.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(1000.0), 200.0);
        assert_eq!(tick_step(12.0), 5.0);
        assert_eq!(tick_step(0.9), 0.2);
        assert_eq!(fmt_tick(2000.0), "2k");
        assert_eq!(fmt_tick(0.2), "0.2");
    }

    #[test]
    fn an_area_scales_to_a_round_top() {
        let a = Area::new(10.0, 110.0, 0.0, 100.0, 930.0);
        assert_eq!((a.step, a.y_top), (200.0, 1000.0));
        assert_eq!(a.py(0.0), 100.0);
        assert_eq!(a.py(500.0), 50.0);
        let mut svg = String::new();
        a.y_grid(&mut svg);
        assert_eq!(svg.lines().count(), 6, "{svg}");
        assert!(svg.contains(">1k</text>"), "{svg}");
    }
}
