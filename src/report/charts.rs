//! Inline SVG charts: the distance histograms and the learning curves. Plain SVG elements
//! (no script, no external fonts), sized in CSS pixels; every text goes through [`esc`].
use super::html::esc;
use std::fmt::Write;

const W: f64 = 820.0;
const H: f64 = 260.0;
/// Left, right, top, bottom margins: room for tick labels, the legend (right, outside the
/// plot so it never hides a line) and the axis titles.
const M: (f64, f64, f64, f64) = (56.0, 200.0, 28.0, 44.0);
/// Where legend entries start.
const LEGEND_X: f64 = W - M.1 + 14.0;

/// Up to about `n` "nice" tick values (1, 2, 5 x 10^k steps) covering `[lo, hi]`.
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo || n == 0 {
        return vec![lo];
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut v = first;
    while v <= hi + step * 1e-9 {
        // Print -0 as 0 and keep 0.30000000000000004 from showing.
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A tick label with just the digits the step needs.
fn label(v: f64, ticks: &[f64]) -> String {
    let step = if ticks.len() > 1 {
        (ticks[1] - ticks[0]).abs()
    } else {
        v.abs().max(1.0)
    };
    if step >= 1.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if step < 1e-4 || v.abs() >= 1e6 {
        format!("{v:.2e}")
    } else {
        // As many decimals as the step has (0.025 needs 3).
        let digits = (0..6)
            .find(|&d| {
                let x = step * 10f64.powi(d);
                (x - x.round()).abs() < 1e-6 * x.max(1.0)
            })
            .unwrap_or(6) as usize;
        format!("{v:.digits$}")
    }
}

struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        M.0 + (x - self.x.0) / (self.x.1 - self.x.0) * (W - M.0 - M.1)
    }
    fn py(&self, y: f64) -> f64 {
        H - M.3 - (y - self.y.0) / (self.y.1 - self.y.0) * (H - M.2 - M.3)
    }

    /// The SVG opening, the title, the grid, both axes with ticks and their titles.
    fn open(&self, s: &mut String, title: &str, x_title: &str, y_title: &str) {
        let _ = write!(
            s,
            r#"<svg class="chart" role="img" width="{W}" height="{H}" viewBox="0 0 {W} {H}"><title>{t}</title><text class="ct" x="{cx}" y="16" text-anchor="middle">{t}</text>"#,
            t = esc(title),
            cx = (M.0 + W - M.1) / 2.0
        );
        let xt = ticks(self.x.0, self.x.1, 6);
        let yt = ticks(self.y.0, self.y.1, 5);
        for &v in &yt {
            let y = self.py(v);
            let _ = write!(
                s,
                r#"<line class="grid" x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                M.0,
                W - M.1,
                M.0 - 4.0,
                y + 4.0,
                label(v, &yt)
            );
        }
        for &v in &xt {
            let x = self.px(v);
            let _ = write!(
                s,
                r#"<line class="axis" x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                H - M.3,
                H - M.3 + 4.0,
                H - M.3 + 16.0,
                label(v, &xt)
            );
        }
        let _ = write!(
            s,
            r#"<line class="axis" x1="{l}" x2="{r}" y1="{b}" y2="{b}"/><line class="axis" x1="{l}" x2="{l}" y1="{t}" y2="{b}"/><text class="at" x="{cx}" y="{xy}" text-anchor="middle">{xt}</text><text class="at" transform="translate(14 {cy}) rotate(-90)" text-anchor="middle">{yt}</text>"#,
            l = M.0,
            r = W - M.1,
            t = M.2,
            b = H - M.3,
            cx = (M.0 + W - M.1) / 2.0,
            xy = H - 8.0,
            cy = (M.2 + H - M.3) / 2.0,
            xt = esc(x_title),
            yt = esc(y_title),
        );
    }
}

/// A histogram of one class: counts per equal-width bin over `range`.
#[derive(Clone, Debug, PartialEq)]
pub struct Hist {
    pub counts: Vec<u64>,
    pub total: u64,
}

impl Hist {
    pub fn new(bins: usize) -> Self {
        Hist {
            counts: vec![0; bins],
            total: 0,
        }
    }

    /// Adds `v` to the bin of `[lo, hi]` it falls in (the last bin is closed).
    pub fn add(&mut self, v: f64, lo: f64, hi: f64) {
        let n = self.counts.len();
        let i = (((v - lo) / (hi - lo)) * n as f64).floor();
        let i = if i.is_finite() {
            (i.max(0.0) as usize).min(n - 1)
        } else {
            0
        };
        self.counts[i] += 1;
        self.total += 1;
    }

    fn share(&self, i: usize) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.counts[i] as f64 / self.total as f64
        }
    }
}

/// The positive and negative distance histograms, overlaid, each as the share of its own
/// class per bin (negatives outnumber positives, so raw counts would hide the positives).
pub fn histograms(pos: &Hist, neg: &Hist, lo: f64, hi: f64, metric: &str) -> String {
    let bins = pos.counts.len();
    let top = (0..bins)
        .map(|i| pos.share(i).max(neg.share(i)))
        .fold(0.0, f64::max)
        .max(1e-9);
    let f = Frame {
        x: (lo, hi),
        y: (0.0, top * 1.05),
    };
    let mut s = String::new();
    f.open(
        &mut s,
        "Distances of correct and wrong neighbours",
        &format!("distance ({metric})"),
        "share of the class",
    );
    let bw = (hi - lo) / bins as f64;
    for (h, class) in [(neg, "neg"), (pos, "pos")] {
        for i in 0..bins {
            let v = h.share(i);
            if v <= 0.0 {
                continue;
            }
            let (x0, x1) = (f.px(lo + i as f64 * bw), f.px(lo + (i + 1) as f64 * bw));
            let (y0, y1) = (f.py(v), f.py(0.0));
            let _ = write!(
                s,
                r#"<rect class="{class}" x="{x0:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}"/>"#,
                (x1 - x0).max(0.5),
                y1 - y0
            );
        }
    }
    let legend = [
        ("pos", format!("correct (same label): {}", pos.total)),
        ("neg", format!("wrong: {}", neg.total)),
    ];
    for (i, (class, text)) in legend.iter().enumerate() {
        let y = M.2 + 6.0 + 16.0 * i as f64;
        let x = LEGEND_X;
        let _ = write!(
            s,
            r#"<rect class="{class}" x="{x}" y="{y}" width="12" height="10"/><text class="tick" x="{}" y="{}">{}</text>"#,
            x + 16.0,
            y + 9.0,
            esc(text)
        );
    }
    s.push_str("</svg>");
    s
}

/// One line of a line chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (few points: validation epochs).
    pub dots: bool,
    /// Drawn faint (the raw per-step loss under its smoothed line).
    pub faint: bool,
}

/// Line colours, repeated when there are more series.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A line chart of several series over shared axes, with a legend; non-finite points are
/// left out (a NaN loss ends its line).
pub fn lines(title: &str, x_title: &str, y_title: &str, series: &[Series]) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = all.iter().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), p| (a.min(p.0), b.max(p.0), c.min(p.1), d.max(p.1)),
    );
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = (y1 - y0) * 0.05;
    let f = Frame {
        x: (x0, x1),
        y: (y0 - pad, y1 + pad),
    };
    let mut s = String::new();
    f.open(&mut s, title, x_title, y_title);
    for (i, se) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(finite)
            .map(|p| format!("{:.1},{:.1}", f.px(p.0), f.py(p.1)))
            .collect();
        let (width, opacity) = if se.faint { (1.0, 0.35) } else { (1.8, 1.0) };
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" stroke-opacity="{opacity}" points="{}"/>"#,
            pts.join(" ")
        );
        if se.dots {
            for p in se.points.iter().filter(finite) {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{colour}"/>"#,
                    f.px(p.0),
                    f.py(p.1)
                );
            }
        }
        let y = M.2 + 4.0 + 16.0 * i as f64;
        let x = LEGEND_X;
        let _ = write!(
            s,
            r#"<line x1="{x}" x2="{}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="3" stroke-opacity="{opacity}"/><text class="tick" x="{}" y="{}">{}</text>"#,
            x + 14.0,
            x + 18.0,
            y + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let t = ticks(0.0, 1.0, 5);
        let labels: Vec<String> = t.iter().map(|&v| label(v, &t)).collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(ticks(3.0, 97.0, 4), vec![25.0, 50.0, 75.0]);
        let t = ticks(0.02, 0.14, 5);
        let labels: Vec<String> = t.iter().map(|&v| label(v, &t)).collect();
        assert_eq!(labels, ["0.025", "0.050", "0.075", "0.100", "0.125"]);
        assert_eq!(ticks(1.0, 1.0, 4), vec![1.0]);
        assert_eq!(label(40.0, &[20.0, 40.0]), "40");
    }

    #[test]
    fn histogram_bins_clamp_the_ends() {
        let mut h = Hist::new(4);
        for v in [0.0, 0.24, 0.25, 0.99, 1.0, 7.0, -1.0] {
            h.add(v, 0.0, 1.0);
        }
        assert_eq!(h.counts, vec![3, 1, 0, 3]);
        assert_eq!(h.total, 7);
    }

    #[test]
    fn charts_escape_their_text() {
        let s = lines(
            "a <b>",
            "x",
            "y",
            &[Series {
                name: "</svg><script>".into(),
                points: vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5)],
                dots: true,
                faint: false,
            }],
        );
        assert!(s.contains("a &lt;b&gt;"));
        assert!(!s.contains("<script>"));
        assert_eq!(s.matches("<circle").count(), 2, "the NaN point is left out");
    }
}
