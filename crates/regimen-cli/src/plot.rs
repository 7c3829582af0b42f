//! Line plots as PNG files: `plotters` draws into an RGB buffer with DejaVu Sans embedded in
//! the binary (no system font library), and regimen's own PNG writer saves it atomically.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is valid; a failure would only leave the labels out.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One named series of `(x, y)` points.
#[derive(Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            points: points
                .into_iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
        }
    }
}

/// Twelve distinct colours, so that the lab's eleven activation functions each get their own.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(174, 199, 232),
];

/// Write a drawn `w x h` RGB buffer to `path` as PNG.
fn save(path: &Path, w: u32, h: u32, rgb: Vec<u8>) -> Result<()> {
    regimen::png::Canvas {
        width: w as usize,
        height: h as usize,
        rgb,
    }
    .save(path)?;
    Ok(())
}

/// Options of a line plot.
pub struct Plot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// A logarithmic y axis (learning rates, losses over decades).
    pub log_y: bool,
}

/// Draw `series` as lines (markers too when a series has few points) into a PNG at `path`.
pub fn lines(path: &Path, plot: &Plot, series: &[Series]) -> Result<()> {
    chart(path, plot, series, true)
}

/// Draw `series` as markers only.
pub fn points(path: &Path, plot: &Plot, series: &[Series]) -> Result<()> {
    chart(path, plot, series, false)
}

fn chart(path: &Path, plot: &Plot, series: &[Series], connect: bool) -> Result<()> {
    register_font();
    // Non-finite points (a diverged run's NaN) are left out; the lines join the others.
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
        })
        .collect();
    let series = &series[..];
    let (w, h) = (900u32, 540u32);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, plot, series, connect)
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        root.present()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    save(path, w, h, rgb)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw(
    root: &Area,
    plot: &Plot,
    series: &[Series],
    connect: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    // More than six named series: their legend goes beside the plot, where it hides nothing.
    let named = series.iter().filter(|s| !s.name.is_empty()).count();
    let (plot_area, beside) = if named > 6 {
        let (a, b) = root.split_horizontally(root.dim_in_pixel().0 as i32 * 78 / 100);
        (a, Some(b))
    } else {
        (root.clone(), None)
    };
    let root = &plot_area;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        if plot.log_y && y <= 0.0 {
            continue;
        }
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.1, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    // Markers at the ends stay whole.
    let xpad = 0.02 * (x1 - x0);
    let (x0, x1) = (x0 - xpad, x1 + xpad);
    if y1 - y0 < 1e-12 * y1.abs().max(1e-12) {
        y0 -= 0.5 * y0.abs().max(1e-3);
        y1 += 0.5 * y1.abs().max(1e-3);
    }
    let mut chart = ChartBuilder::on(root);
    chart
        .caption(plot.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72);
    if plot.log_y {
        let mut c = chart.build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale())?;
        c.configure_mesh()
            .x_desc(plot.x_label)
            .y_desc(plot.y_label)
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()?;
        let (ly0, ly1) = ((y0 * 0.9).ln(), (y1 * 1.1).ln());
        let corner = legend_corner(series, |(x, y)| {
            (
                (x - x0) / (x1 - x0),
                (y.max(1e-300).ln() - ly0) / (ly1 - ly0),
            )
        });
        draw_series(&mut c, series, connect, beside.is_none().then_some(corner))?;
    } else {
        let pad = 0.05 * (y1 - y0);
        let mut c = chart.build_cartesian_2d(x0..x1, y0 - pad..y1 + pad)?;
        c.configure_mesh()
            .x_desc(plot.x_label)
            .y_desc(plot.y_label)
            .draw()?;
        let (ya, yb) = (y0 - pad, y1 + pad);
        let corner = legend_corner(series, |(x, y)| {
            ((x - x0) / (x1 - x0), (y - ya) / (yb - ya))
        });
        draw_series(&mut c, series, connect, beside.is_none().then_some(corner))?;
    }
    if let Some(area) = beside {
        for (i, s) in series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.name.is_empty())
        {
            let color = COLORS[i % COLORS.len()];
            let y = 60 + 24 * i as i32;
            area.draw(&PathElement::new(
                vec![(6, y), (30, y)],
                color.stroke_width(2),
            ))?;
            area.draw(&Text::new(s.name.as_str(), (36, y - 8), ("sans-serif", 15)))?;
        }
    }
    Ok(())
}

/// The corner of the plot whose legend-sized region (the outer 45% by 40%) covers the fewest
/// points of `series`; `unit` maps a point to [0, 1]^2 (y up). Ties go to the upper right.
fn legend_corner(
    series: &[Series],
    unit: impl Fn((f64, f64)) -> (f64, f64),
) -> SeriesLabelPosition {
    let mut count = [0usize; 4]; // upper right, upper left, lower right, lower left
    for s in series {
        // Lines: also the midpoints, so that a long segment across a corner counts.
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&p| unit(p)).collect();
        let mids = pts
            .windows(2)
            .map(|w| ((w[0].0 + w[1].0) / 2.0, (w[0].1 + w[1].1) / 2.0));
        for (u, v) in pts.iter().copied().chain(mids) {
            let (right, left) = (u >= 0.55, u <= 0.45);
            let (up, down) = (v >= 0.6, v <= 0.4);
            count[0] += (right && up) as usize;
            count[1] += (left && up) as usize;
            count[2] += (right && down) as usize;
            count[3] += (left && down) as usize;
        }
    }
    let best = (0..4).min_by_key(|&i| count[i]).unwrap_or(0);
    [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::LowerLeft,
    ][best]
        .clone()
}

fn draw_series<'a, Y: plotters::coord::ranged1d::Ranged<ValueType = f64>>(
    c: &mut ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    series: &[Series],
    connect: bool,
    legend: Option<SeriesLabelPosition>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let width = if connect { 2 } else { 0 };
        c.draw_series(LineSeries::new(
            s.points.iter().copied().filter(|_| connect),
            color.stroke_width(width),
        ))?
        .label(s.name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if s.points.len() <= 60 || !connect {
            c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    let Some(corner) = legend else {
        return Ok(());
    };
    if series.len() > 1 || series.iter().any(|s| !s.name.is_empty()) {
        c.configure_series_labels()
            .position(corner)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    Ok(())
}

/// A grid of histograms (40 bins each, on one x-range for all the panels), one per
/// `(title, values)`.
pub fn histograms(path: &Path, title: &str, panels: &[(String, Vec<f32>)]) -> Result<()> {
    register_font();
    let cols = panels.len().clamp(1, 5);
    let rows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (1100u32, 60 + 230 * rows as u32);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let (top, body) = root.split_vertically(50);
            top.titled(title, ("sans-serif", 24))?;
            let areas = body.split_evenly((rows, cols));
            // One x-range for every panel, so that a distribution that shrinks or spreads from
            // panel to panel is seen to, not only read in the tick labels.
            let (mut lo, mut hi) = panels
                .iter()
                .flat_map(|(_, v)| v.iter().filter(|v| v.is_finite()))
                .fold((f64::MAX, f64::MIN), |(a, b), &v| {
                    (a.min(v as f64), b.max(v as f64))
                });
            if lo > hi {
                (lo, hi) = (-1.0, 1.0);
            }
            if hi - lo < 1e-12 {
                lo -= 1e-6_f64.max(lo.abs() * 0.1);
                hi += 1e-6_f64.max(hi.abs() * 0.1);
            }
            let small = lo.abs().max(hi.abs()) < 0.01;
            for ((name, values), area) in panels.iter().zip(areas.iter()) {
                let finite: Vec<f64> = values
                    .iter()
                    .filter(|v| v.is_finite())
                    .map(|&v| v as f64)
                    .collect();
                let bins = 40;
                let width = (hi - lo) / bins as f64;
                let mut counts = vec![0usize; bins];
                for v in &finite {
                    let b = (((v - lo) / width) as usize).min(bins - 1);
                    counts[b] += 1;
                }
                let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
                let mut chart = ChartBuilder::on(area)
                    .caption(name.as_str(), ("sans-serif", 15))
                    .margin(6)
                    .x_label_area_size(24)
                    .y_label_area_size(40)
                    .build_cartesian_2d(lo..hi, 0.0..top * 1.05)?;
                chart
                    .configure_mesh()
                    .x_labels(5)
                    .y_labels(3)
                    .x_label_formatter(&|v| {
                        if small {
                            format!("{v:.1e}")
                        } else {
                            format!("{v:.2}")
                        }
                    })
                    .y_label_formatter(&|v| format!("{v:.0}"))
                    .label_style(("sans-serif", 11))
                    .disable_mesh()
                    .draw()?;
                chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
                    let x0 = lo + i as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], COLORS[0].filled())
                }))?;
            }
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    save(path, w, h, rgb)
}

/// Paths over a map of `f` in `window = (x0, x1, y0, y1)`: the map as shaded cells (darker is
/// lower, log-scaled above the window's minimum), each path a line with its start and end.
pub fn paths(
    path: &Path,
    title: &str,
    f: fn(f64, f64) -> f64,
    window: (f64, f64, f64, f64),
    series: &[Series],
) -> Result<()> {
    register_font();
    let (w, h) = (900u32, 600u32);
    let (x0, x1, y0, y1) = window;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 24))
                .margin(16)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            chart
                .configure_mesh()
                .x_desc("x")
                .y_desc("y")
                .disable_mesh()
                .draw()?;
            let n = 120;
            let (dx, dy) = ((x1 - x0) / n as f64, (y1 - y0) / n as f64);
            let mut vals = Vec::with_capacity(n * n);
            for i in 0..n {
                for j in 0..n {
                    vals.push(f(x0 + (i as f64 + 0.5) * dx, y0 + (j as f64 + 0.5) * dy));
                }
            }
            let lo = vals.iter().cloned().fold(f64::MAX, f64::min);
            let hi = vals.iter().cloned().fold(f64::MIN, f64::max);
            let shade = |v: f64| {
                let t = ((v - lo).max(0.0) + 1e-3).ln() - 1e-3f64.ln();
                let top = ((hi - lo).max(0.0) + 1e-3).ln() - 1e-3f64.ln();
                let t = (t / top.max(1e-12)).clamp(0.0, 1.0);
                let g = (110.0 + 145.0 * t) as u8;
                RGBColor(g, g, (g as f64 * 0.9 + 25.0) as u8)
            };
            chart.draw_series((0..n * n).map(|k| {
                let (i, j) = (k / n, k % n);
                let (xa, ya) = (x0 + i as f64 * dx, y0 + j as f64 * dy);
                Rectangle::new([(xa, ya), (xa + dx, ya + dy)], shade(vals[k]).filled())
            }))?;
            for (i, s) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .map(|&(x, y)| (x.clamp(x0, x1), y.clamp(y0, y1)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                if let Some(&e) = pts.last() {
                    chart.draw_series(std::iter::once(Circle::new(e, 5, color.filled())))?;
                }
            }
            if let Some(s) = series.first().and_then(|s| s.points.first()) {
                chart.draw_series(std::iter::once(Cross::new(*s, 7, BLACK.stroke_width(2))))?;
            }
            // The legend avoids the paths and the surface's minimum (where they end).
            let kmin = (0..vals.len())
                .min_by(|&a, &b| vals[a].total_cmp(&vals[b]))
                .unwrap_or(0);
            let min_pt = (x0 + (kmin / n) as f64 * dx, y0 + (kmin % n) as f64 * dy);
            let mut avoid: Vec<Series> = series.to_vec();
            avoid.push(Series::new("", vec![min_pt; 1000]));
            let corner = legend_corner(&avoid, |(x, y)| {
                ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0))
            });
            chart
                .configure_series_labels()
                .position(corner)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    save(path, w, h, rgb)
}

/// Scatter plots side by side, all panels on one common square scale.
pub fn scatter(path: &Path, title: &str, panels: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    register_font();
    let cols = panels.len().max(1);
    let (w, h) = (260 * cols as u32 + 20, 330u32);
    let lim = panels
        .iter()
        .flat_map(|(_, p)| p.iter())
        .fold(1e-9f64, |m, &(x, y)| m.max(x.abs()).max(y.abs()))
        * 1.05;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let (top, body) = root.split_vertically(44);
            top.titled(title, ("sans-serif", 22))?;
            for ((name, pts), area) in panels.iter().zip(body.split_evenly((1, cols)).iter()) {
                let mut chart = ChartBuilder::on(area)
                    .caption(name.as_str(), ("sans-serif", 15))
                    .margin(8)
                    .x_label_area_size(24)
                    .y_label_area_size(32)
                    .build_cartesian_2d(-lim..lim, -lim..lim)?;
                chart
                    .configure_mesh()
                    .x_labels(5)
                    .y_labels(5)
                    .label_style(("sans-serif", 11))
                    .light_line_style(WHITE)
                    .draw()?;
                chart.draw_series(
                    pts.iter()
                        .map(|&p| Circle::new(p, 2, COLORS[0].mix(0.6).filled())),
                )?;
            }
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    save(path, w, h, rgb)
}
