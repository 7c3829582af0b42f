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

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

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
    register_font();
    let (w, h) = (900u32, 540u32);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, plot, series).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        root.present()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    let canvas = regimen::png::Canvas {
        width: w as usize,
        height: h as usize,
        rgb,
    };
    canvas.save(path)?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw(
    root: &Area,
    plot: &Plot,
    series: &[Series],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
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
        draw_series(&mut c, series)?;
    } else {
        let pad = 0.05 * (y1 - y0);
        let mut c = chart.build_cartesian_2d(x0..x1, y0 - pad..y1 + pad)?;
        c.configure_mesh()
            .x_desc(plot.x_label)
            .y_desc(plot.y_label)
            .draw()?;
        draw_series(&mut c, series)?;
    }
    Ok(())
}

fn draw_series<'a, Y: plotters::coord::ranged1d::Ranged<ValueType = f64>>(
    c: &mut ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    series: &[Series],
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))?
        .label(s.name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if s.points.len() <= 60 {
            c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if series.len() > 1 || series.iter().any(|s| !s.name.is_empty()) {
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    Ok(())
}
