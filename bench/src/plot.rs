//! `plot` mode: the PNG of an offered-load sweep of `messaging` (the reports that
//! `bench/run-messaging-sweep.sh` writes, one per offered rate). Left, delivered against offered
//! msgs/s with the line where the two are equal; right, the delivery latency p50 and p99 against
//! offered msgs/s on a log scale. Drawn with [`crate::canvas`].

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::canvas::{Canvas, Colour};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// `messaging` reports (JSON), one per offered rate, in any order.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The line above the two panels.
    #[arg(long, default_value = "Switchboard 1:1 messaging, offered-load sweep")]
    pub title: String,
}

/// One offered rate of a sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub offered: f64,
    pub delivered: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Entry point of `plot`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let mut points = Vec::with_capacity(args.reports.len());
    for path in &args.reports {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        points.push(point(&report).with_context(|| format!("{} is not a messaging report", path.display()))?);
    }
    let png = render(&args.title, &points)?.png();
    std::fs::write(&args.out, &png).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("plot: {} points, {} bytes -> {}", points.len(), png.len(), args.out.display());
    Ok(())
}

/// The figures a plot needs from a `messaging` report.
pub fn point(report: &Value) -> anyhow::Result<Point> {
    if report["mode"] != "messaging" {
        bail!("mode is {}, not messaging", report["mode"]);
    }
    let num = |v: &Value, name: &str| v.as_f64().with_context(|| format!("no number at {name}"));
    Ok(Point {
        offered: num(&report["rate_target_total"], "rate_target_total")?,
        delivered: num(&report["delivered_per_sec"], "delivered_per_sec")?,
        p50_ms: num(&report["delivery_latency"]["p50_ms"], "delivery_latency.p50_ms")?,
        p99_ms: num(&report["delivery_latency"]["p99_ms"], "delivery_latency.p99_ms")?,
    })
}

const WIDTH: usize = 1000;
const HEIGHT: usize = 470;
const TOP: i64 = 80;
const BOTTOM: i64 = 390;
/// Left and right edges of the two panels' plot areas.
const LEFT_PANEL: (i64, i64) = (90, 460);
const RIGHT_PANEL: (i64, i64) = (590, 960);
/// Text scale (the font is 5×7; 2 makes it 10×14).
const S: i64 = 2;

/// One panel's plot area and the ranges its axes show.
#[derive(Clone, Copy, Debug)]
pub struct Panel {
    pub left: i64,
    pub right: i64,
    pub x_max: f64,
    /// Linear `0..=y_max`, or (when `log`) `10^y_min..=10^y_max`.
    pub y_min: f64,
    pub y_max: f64,
    pub log: bool,
}

impl Panel {
    pub fn x(&self, v: f64) -> i64 {
        self.left + ((v / self.x_max) * (self.right - self.left) as f64).round() as i64
    }

    pub fn y(&self, v: f64) -> i64 {
        let v = if self.log { v.max(f64::MIN_POSITIVE).log10() } else { v };
        let f = ((v - self.y_min) / (self.y_max - self.y_min)).clamp(0.0, 1.0);
        BOTTOM - (f * (BOTTOM - TOP) as f64).round() as i64
    }
}

/// The two panels for `points`: the throughput panel square (both axes to the same top) and
/// the latency panel over whole decades.
pub fn panels(points: &[Point]) -> (Panel, Panel) {
    let x_top = nice_top(points.iter().map(|p| p.offered.max(p.delivered)).fold(0.0, f64::max));
    let lat = |f: fn(&Point) -> f64| points.iter().map(f).filter(|v| *v > 0.0);
    let lo = lat(|p| p.p50_ms.min(p.p99_ms)).fold(f64::INFINITY, f64::min);
    let hi = lat(|p| p.p50_ms.max(p.p99_ms)).fold(0.0, f64::max);
    let (lo, hi) = if hi > 0.0 { (lo.log10().floor(), hi.log10().ceil()) } else { (0.0, 1.0) };
    let through = Panel { left: LEFT_PANEL.0, right: LEFT_PANEL.1, x_max: x_top, y_min: 0.0, y_max: x_top, log: false };
    let latency = Panel {
        left: RIGHT_PANEL.0,
        right: RIGHT_PANEL.1,
        x_max: x_top,
        y_min: lo,
        y_max: hi.max(lo + 1.0),
        log: true,
    };
    (through, latency)
}

/// Draws the sweep (sorted by offered rate).
pub fn render(title: &str, points: &[Point]) -> anyhow::Result<Canvas> {
    if points.is_empty() {
        bail!("no reports to plot");
    }
    let mut points = points.to_vec();
    points.sort_by(|a, b| a.offered.total_cmp(&b.offered));
    let (through, latency) = panels(&points);
    let mut c = Canvas::new(WIDTH, HEIGHT);
    // A title too wide for the large font gets the small one.
    let scale = if Canvas::text_width(title, S) <= WIDTH as i64 - 20 { S } else { 1 };
    c.text((WIDTH as i64 - Canvas::text_width(title, scale)) / 2, 14, title, scale, Colour::Black);

    frame(&mut c, &through, "delivered msgs/s");
    for v in ticks(through.y_max) {
        tick_y(&mut c, &through, v, &short(v));
    }
    c.line((through.x(0.0), through.y(0.0)), (through.x(through.x_max), through.y(through.y_max)), 1, 6, Colour::Grey);
    series(&mut c, &through, &points, |p| p.delivered, Colour::Green);
    legend(&mut c, &through, &[(Colour::Green, "delivered"), (Colour::Grey, "= offered")]);

    frame(&mut c, &latency, "delivery latency, ms (log)");
    for decade in latency.y_min as i64..=latency.y_max as i64 {
        let v = 10f64.powi(decade as i32);
        tick_y(&mut c, &latency, v, &short(v));
    }
    series(&mut c, &latency, &points, |p| p.p50_ms, Colour::Blue);
    series(&mut c, &latency, &points, |p| p.p99_ms, Colour::Red);
    legend(&mut c, &latency, &[(Colour::Blue, "p50"), (Colour::Red, "p99")]);
    Ok(c)
}

/// Axes, grid along x, the x ticks and the panel's heading.
fn frame(c: &mut Canvas, p: &Panel, heading: &str) {
    for v in ticks(p.x_max) {
        let x = p.x(v);
        c.line((x, TOP), (x, BOTTOM), 1, 0, Colour::Grid);
        c.line((x, BOTTOM), (x, BOTTOM + 5), 1, 0, Colour::Black);
        let label = short(v);
        c.text(x - Canvas::text_width(&label, S) / 2, BOTTOM + 10, &label, S, Colour::Black);
    }
    c.line((p.left, TOP), (p.left, BOTTOM), 2, 0, Colour::Black);
    c.line((p.left, BOTTOM), (p.right, BOTTOM), 2, 0, Colour::Black);
    c.text(p.left, TOP - 30, heading, S, Colour::Black);
    let x_label = "offered msgs/s";
    c.text((p.left + p.right - Canvas::text_width(x_label, S)) / 2, BOTTOM + 40, x_label, S, Colour::Black);
}

fn tick_y(c: &mut Canvas, p: &Panel, v: f64, label: &str) {
    let y = p.y(v);
    c.line((p.left, y), (p.right, y), 1, 0, Colour::Grid);
    c.line((p.left - 5, y), (p.left, y), 1, 0, Colour::Black);
    c.text(p.left - 10 - Canvas::text_width(label, S), y - 7, label, S, Colour::Black);
}

/// A polyline through the points with a 7×7 mark on each.
fn series(c: &mut Canvas, p: &Panel, points: &[Point], f: fn(&Point) -> f64, colour: Colour) {
    let at: Vec<(i64, i64)> = points.iter().map(|q| (p.x(q.offered), p.y(f(q)))).collect();
    for pair in at.windows(2) {
        c.line(pair[0], pair[1], 2, 0, colour);
    }
    for (x, y) in at {
        c.fill(x - 3, y - 3, x + 3, y + 3, colour);
    }
}

fn legend(c: &mut Canvas, p: &Panel, entries: &[(Colour, &str)]) {
    for (i, (colour, name)) in entries.iter().enumerate() {
        let y = TOP + 8 + i as i64 * 22;
        c.fill(p.left + 12, y + 2, p.left + 24, y + 12, *colour);
        c.text(p.left + 32, y, name, S, Colour::Black);
    }
}

/// The ticks of a linear axis from 0 to `top` (a multiple of its [`nice_step`]).
fn ticks(top: f64) -> impl Iterator<Item = f64> {
    let step = nice_step(top);
    (0..=(top / step).round() as u32).map(move |i| f64::from(i) * step)
}

/// A round step giving four or five ticks up to `top`.
fn nice_step(top: f64) -> f64 {
    let raw = (top / 4.0).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

/// The first multiple of a round step at or above `max` (1 for an empty sweep).
fn nice_top(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let step = nice_step(max);
    (max / step).ceil() * step
}

/// `25000` → `25k`, `2500` → `2.5k`, `0.1` → `0.1`.
fn short(v: f64) -> String {
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_owned() } else { s };
    if v >= 1000.0 {
        format!("{}k", trim(format!("{:.1}", v / 1000.0)))
    } else {
        trim(format!("{v:.2}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(offered: f64, delivered: f64, p50_ms: f64, p99_ms: f64) -> Point {
        Point { offered, delivered, p50_ms, p99_ms }
    }

    #[test]
    fn each_figure_is_drawn_where_its_axes_put_it() {
        let sweep =
            [pt(20_000.0, 15_000.0, 40.0, 900.0), pt(2_000.0, 2_000.0, 0.5, 3.0), pt(10_000.0, 9_990.0, 2.0, 9.0)];
        let c = render("t", &sweep).unwrap();
        let (through, latency) = panels(&sweep);
        assert_eq!((through.x_max, through.y_max), (20_000.0, 20_000.0));
        // p50 0.5 ms .. p99 900 ms: the decades 0.1 to 1,000 ms
        assert_eq!((latency.y_min, latency.y_max), (-1.0, 3.0));
        let at = |p: &Panel, x: f64, y: f64| c.get(p.x(x), p.y(y));
        for q in &sweep {
            assert_eq!(at(&through, q.offered, q.delivered), Some(Colour::Green as u8), "{q:?}");
            assert_eq!(at(&latency, q.offered, q.p50_ms), Some(Colour::Blue as u8), "{q:?}");
            assert_eq!(at(&latency, q.offered, q.p99_ms), Some(Colour::Red as u8), "{q:?}");
        }
        // saturation: at 20k offered the delivered mark sits well below the diagonal
        assert!(through.y(15_000.0) - through.y(20_000.0) > 50);
        // the dashed diagonal: grey along the ideal line, with gaps
        let near = |v: f64| (-1..=1).any(|d| c.get(through.x(v), through.y(v) + d) == Some(Colour::Grey as u8));
        let hits = (1..40).filter(|k| near(through.x_max * f64::from(*k) / 40.0)).count();
        assert!((10..39).contains(&hits), "{hits} of 39 samples on the diagonal");
    }

    #[test]
    fn the_png_decodes_to_the_canvas_size() {
        let c = render("sweep", &[pt(1_000.0, 1_000.0, 1.0, 2.0)]).unwrap();
        let (w, h, px) = crate::canvas::tests::decode(&c.png());
        assert_eq!((w, h), (WIDTH, HEIGHT));
        assert!(px.contains(&(Colour::Red as u8)));
        assert!(render("empty", &[]).is_err());
        // a long title shrinks to fit: its last character's column still lands on the canvas
        let long = "x".repeat(150);
        let c = render(&long, &[pt(1_000.0, 1_000.0, 1.0, 2.0)]).unwrap();
        let left = (WIDTH as i64 - Canvas::text_width(&long, 1)) / 2;
        let last = left + Canvas::text_width(&long, 1) - 1;
        assert!(left > 0 && (14..21).any(|y| c.get(last, y) == Some(Colour::Black as u8)));
    }

    #[test]
    fn reports_give_their_points_and_other_modes_are_refused() {
        let r = serde_json::json!({"mode": "messaging", "rate_target_total": 10000, "delivered_per_sec": 9998,
            "delivery_latency": {"p50_ms": 1.5, "p99_ms": 8.25}});
        assert_eq!(point(&r).unwrap(), pt(10_000.0, 9_998.0, 1.5, 8.25));
        assert!(point(&serde_json::json!({"mode": "fanout"})).is_err());
        let mut missing = r.clone();
        missing["delivery_latency"] = serde_json::json!({});
        assert!(point(&missing).unwrap_err().to_string().contains("p50_ms"));
    }

    #[test]
    fn ticks_are_round_and_labels_short() {
        assert_eq!(nice_top(17_779.0), 20_000.0);
        assert_eq!(nice_step(20_000.0), 5_000.0);
        assert_eq!(nice_top(60_000.0), 60_000.0);
        assert_eq!(ticks(20_000.0).collect::<Vec<_>>(), [0.0, 5_000.0, 10_000.0, 15_000.0, 20_000.0]);
        assert_eq!(short(25_000.0), "25k");
        assert_eq!(short(2_500.0), "2.5k");
        assert_eq!(short(0.1), "0.1");
        assert_eq!(short(100.0), "100");
    }
}
