//! Figures drawn with plotters (PNG and SVG). Text uses an embedded font, so figures render the
//! same on a machine without system fonts.
//!
//! - [`line_chart`]: a general line chart (layer curves, attention ratios, sweeps) with optional
//!   shaded bands, dashed companion curves, a reference line and a legend.
//! - [`plot_probe_curves`]: probe AUC per layer with its bootstrap interval and the control curve,
//!   several runs on one plot (e.g. original vs mitigated).
//! - [`bar_chart`]: grouped bars for metric tables.
//!
//! Every figure is written twice, `stem.png` (1000 x 650 px) and `stem.svg`, each atomically.
//! Fonts are at least 18 px so figures stay legible when shrunk to a paper column.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::error::{write_atomic, Error, Result};
use crate::input_err;
use crate::probes::ProbeCurve;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Register the embedded font as plotters' `sans-serif` family (idempotent). Call before drawing.
pub fn ensure_font() {
    REGISTER.call_once(|| {
        for style in [
            plotters::style::FontStyle::Normal,
            plotters::style::FontStyle::Bold,
            plotters::style::FontStyle::Italic,
            plotters::style::FontStyle::Oblique,
        ] {
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}

/// Figure size in pixels (PNG) and user units (SVG).
pub const FIGURE_SIZE: (u32, u32) = (1000, 650);
const FONT_TITLE: u32 = 28;
const FONT_AXIS: u32 = 22;
const FONT_TICKS: u32 = 18;
const FONT_LEGEND: u32 = 18;

/// Ten distinct colours (Tableau 10), cycled.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn palette(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// One curve of a [`line_chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// X values (any order is drawn as given; usually increasing).
    pub x: Vec<f64>,
    /// Y values, one per x.
    pub y: Vec<f64>,
    /// Optional shaded band `(lower, upper)`, one value each per x (e.g. a 95% interval).
    pub band: Option<(Vec<f64>, Vec<f64>)>,
    /// Draw dashed. A dashed series placed directly after a solid one reuses that series'
    /// colour (a companion curve such as a control); every other series takes the next colour.
    pub dashed: bool,
}

impl Series {
    /// A solid series without band.
    pub fn new(name: impl Into<String>, x: Vec<f64>, y: Vec<f64>) -> Self {
        Series {
            name: name.into(),
            x,
            y,
            band: None,
            dashed: false,
        }
    }

    /// The same series with a shaded band.
    pub fn with_band(mut self, lower: Vec<f64>, upper: Vec<f64>) -> Self {
        self.band = Some((lower, upper));
        self
    }

    /// The same series, dashed.
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

/// Title, axis labels and options of a chart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChartSpec {
    /// Title drawn above the plot.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Fixed y range `(min, max)`; `None` fits the data (and the reference line) with 5% padding.
    pub y_range: Option<(f64, f64)>,
    /// A horizontal reference line `(y, legend name)`, drawn dashed grey (e.g. chance at 0.5).
    pub hline: Option<(f64, String)>,
}

/// `stem` with `.ext` appended (not replacing a dot already in the name, e.g. `probe.layer`).
fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Check a series: lengths agree, at least one point, all values finite.
fn validate_series(title: &str, s: &Series) -> Result<()> {
    let n = s.x.len();
    if n == 0 {
        return Err(input_err!(
            "plot '{title}': series '{}' has no points",
            s.name
        ));
    }
    if s.y.len() != n {
        return Err(input_err!(
            "plot '{title}': series '{}' has {n} x values but {} y values",
            s.name,
            s.y.len()
        ));
    }
    let mut cols: Vec<(&str, &Vec<f64>)> = vec![("x", &s.x), ("y", &s.y)];
    if let Some((lo, hi)) = &s.band {
        for (name, v) in [("band lower", lo), ("band upper", hi)] {
            if v.len() != n {
                return Err(input_err!(
                    "plot '{title}': series '{}' has {n} x values but {} {name} values",
                    s.name,
                    v.len()
                ));
            }
        }
        cols.push(("band lower", lo));
        cols.push(("band upper", hi));
    }
    for (name, v) in cols {
        if let Some(i) = v.iter().position(|v| !v.is_finite()) {
            return Err(input_err!(
                "plot '{title}': series '{}' {name} value {i} is {} (values must be finite)",
                s.name,
                v[i]
            ));
        }
    }
    Ok(())
}

/// Tick text: integers without decimals (layer numbers), others with at most 4 significant
/// decimals and no trailing zeros (`0.5`, not `0.50000000001`).
fn tick_label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) {
        return format!("{}", v.round() as i64);
    }
    let mag = v.abs().log10().floor() as i32;
    let decimals = (3 - mag).clamp(0, 12) as usize;
    let s = format!("{v:.decimals$}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// `(min, max)` widened when empty or degenerate, then padded by `pad` of the span.
fn padded_range(min: f64, max: f64, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (min, max);
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        lo -= 0.5;
        hi += 0.5;
    }
    let span = hi - lo;
    (lo - pad * span, hi + pad * span)
}

/// Colour index per series: dashed series right after a solid one share its colour.
fn series_colours(series: &[Series]) -> Vec<usize> {
    let mut next = 0;
    let mut out = Vec::with_capacity(series.len());
    for (i, s) in series.iter().enumerate() {
        if s.dashed && i > 0 && !series[i - 1].dashed {
            out.push(out[i - 1]);
        } else {
            out.push(next);
            next += 1;
        }
    }
    out
}

/// The legend corner with the fewest data points near it: 0 upper-left, 1 upper-right,
/// 2 lower-left, 3 lower-right (ties prefer upper-right, upper-left, lower-right, lower-left).
fn legend_corner(series: &[Series], x: (f64, f64), y: (f64, f64)) -> usize {
    let mut counts = [0usize; 4]; // upper-left, upper-right, lower-left, lower-right
    for s in series {
        for (&a, &b) in s.x.iter().zip(&s.y) {
            let fx = (a - x.0) / (x.1 - x.0);
            let fy = (b - y.0) / (y.1 - y.0);
            let right = fx > 0.5;
            let upper = fy > 0.5;
            // Only points away from the middle band of both axes crowd a corner.
            if !(0.4..=0.6).contains(&fx) && !(0.4..=0.6).contains(&fy) {
                counts[(!upper) as usize * 2 + right as usize] += 1;
            }
        }
    }
    (0..4)
        .min_by_key(|&i| (counts[i], [1, 0, 3, 2][i]))
        .unwrap_or(1)
}

fn corner_position(corner: usize) -> SeriesLabelPosition {
    match corner {
        0 => SeriesLabelPosition::UpperLeft,
        1 => SeriesLabelPosition::UpperRight,
        2 => SeriesLabelPosition::LowerLeft,
        _ => SeriesLabelPosition::LowerRight,
    }
}

/// Draw a line chart to `out_stem.png` and `out_stem.svg` (1000 x 650, atomically) and return
/// the two paths.
///
/// Each series gets a distinct colour (a dashed series directly after a solid one shares its
/// colour), an optional shaded band, point markers when it has at most 60 points, and a legend
/// entry; the legend goes to the emptiest corner. `spec.hline` adds a dashed grey reference line.
///
/// Errors: no series, a series with no points, mismatched x / y / band lengths, a NaN or
/// infinite value (named by series and index), a bad `y_range`.
pub fn line_chart(spec: &ChartSpec, series: &[Series], out_stem: &Path) -> Result<Vec<PathBuf>> {
    let title = spec.title.as_str();
    if series.is_empty() {
        return Err(input_err!("plot '{title}': no series to draw"));
    }
    for s in series {
        validate_series(title, s)?;
    }
    let all_x = series.iter().flat_map(|s| s.x.iter().copied());
    let (xmin, xmax) = all_x.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let x_range = padded_range(xmin, xmax, 0.02);
    let y_range = match spec.y_range {
        Some((lo, hi)) => {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(input_err!(
                    "plot '{title}': y_range ({lo}, {hi}) must be finite with min < max"
                ));
            }
            (lo, hi)
        }
        None => {
            let mut vals: Vec<f64> = Vec::new();
            for s in series {
                vals.extend(&s.y);
                if let Some((lo, hi)) = &s.band {
                    vals.extend(lo);
                    vals.extend(hi);
                }
            }
            if let Some((y, _)) = &spec.hline {
                vals.push(*y);
            }
            let (lo, hi) = vals
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    (a.min(*v), b.max(*v))
                });
            padded_range(lo, hi, 0.05)
        }
    };
    if let Some((y, name)) = &spec.hline {
        if !y.is_finite() {
            return Err(input_err!(
                "plot '{title}': reference line '{name}' at {y} (must be finite)"
            ));
        }
    }
    let colours = series_colours(series);
    let corner = legend_corner(series, x_range, y_range);

    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        spec: &ChartSpec,
        series: &[Series],
        colours: &[usize],
        x_range: (f64, f64),
        y_range: (f64, f64),
        corner: usize,
    ) -> Result<()> {
        let err = |e: String| Error::msg(format!("plot '{}': {e}", spec.title));
        let int_x = series.iter().all(|s| s.x.iter().all(|v| v.fract() == 0.0));
        let span = (x_range.1 - x_range.0).round().max(0.0) as usize;
        let nx = if int_x && span <= 16 { span + 1 } else { 10 };
        let mut chart = ChartBuilder::on(root)
            .caption(&spec.title, ("sans-serif", FONT_TITLE))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(85)
            .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
            .map_err(|e| err(format!("{e:?}")))?;
        chart
            .configure_mesh()
            .x_desc(&spec.x_label)
            .y_desc(&spec.y_label)
            .axis_desc_style(("sans-serif", FONT_AXIS))
            .label_style(("sans-serif", FONT_TICKS))
            .max_light_lines(0)
            .bold_line_style(RGBColor(225, 225, 225))
            .x_label_formatter(&|v| {
                // integer axes (layers, lambdas on a grid) get no fractional ticks
                if int_x && v.fract().abs() > 1e-9 {
                    String::new()
                } else {
                    tick_label(*v)
                }
            })
            .y_label_formatter(&|v| tick_label(*v))
            .x_labels(nx)
            .y_labels(8)
            .draw()
            .map_err(|e| err(format!("{e:?}")))?;
        // Bands first, so lines are drawn on top of every band.
        for (s, &c) in series.iter().zip(colours) {
            if let Some((lo, hi)) = &s.band {
                let mut poly: Vec<(f64, f64)> =
                    s.x.iter().copied().zip(lo.iter().copied()).collect();
                poly.extend(s.x.iter().copied().zip(hi.iter().copied()).rev());
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        poly,
                        palette(c).mix(0.18).filled(),
                    )))
                    .map_err(|e| err(format!("{e:?}")))?;
            }
        }
        if let Some((y, name)) = &spec.hline {
            let style = ShapeStyle::from(RGBColor(90, 90, 90)).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x_range.0, *y), (x_range.1, *y)],
                    8,
                    6,
                    style,
                ))
                .map_err(|e| err(format!("{e:?}")))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 28, y)], 7, 5, style)
                });
        }
        for (s, &c) in series.iter().zip(colours) {
            let colour = palette(c);
            let style = ShapeStyle::from(colour).stroke_width(3);
            let pts: Vec<(f64, f64)> = s.x.iter().copied().zip(s.y.iter().copied()).collect();
            let anno = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts.clone(), 10, 7, style))
                    .map_err(|e| err(format!("{e:?}")))?
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(|e| err(format!("{e:?}")))?
            };
            let anno = anno.label(s.name.as_str());
            if s.dashed {
                anno.legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 28, y)], 7, 5, style)
                });
            } else {
                anno.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 28, y)], style));
            }
            if pts.len() <= 60 {
                let marker = if s.dashed {
                    ShapeStyle::from(colour).stroke_width(2)
                } else {
                    colour.filled()
                };
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, marker)))
                    .map_err(|e| err(format!("{e:?}")))?;
            }
        }
        chart
            .configure_series_labels()
            .position(corner_position(corner))
            .label_font(("sans-serif", FONT_LEGEND))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .margin(12)
            .draw()
            .map_err(|e| err(format!("{e:?}")))?;
        Ok(())
    }

    render_both(
        out_stem,
        title,
        |root| draw(root, spec, series, &colours, x_range, y_range, corner),
        |root| draw(root, spec, series, &colours, x_range, y_range, corner),
    )
}

/// Draw with `png` into an in-memory bitmap and with `svg` into a string (plotters' backends
/// are distinct types, hence two closures), then write `stem.png` and `stem.svg` atomically.
fn render_both<F, G>(out_stem: &Path, title: &str, png: F, svg: G) -> Result<Vec<PathBuf>>
where
    F: FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
    G: FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
{
    ensure_font();
    let (w, h) = FIGURE_SIZE;
    let fail = |e: String| Error::msg(format!("plot '{title}': {e}"));
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(format!("{e:?}")))?;
        png(&root)?;
        root.present().map_err(|e| fail(format!("{e:?}")))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| fail("bitmap buffer has the wrong size".into()))?;
    let mut png_bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut png_bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| fail(format!("PNG encoding: {e}")))?;
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(format!("{e:?}")))?;
        svg(&root)?;
        root.present().map_err(|e| fail(format!("{e:?}")))?;
    }
    let png_path = with_ext(out_stem, "png");
    let svg_path = with_ext(out_stem, "svg");
    write_atomic(&png_path, &png_bytes)?;
    write_atomic(&svg_path, svg_text.as_bytes())?;
    Ok(vec![png_path, svg_path])
}

/// Grouped bar chart for metric tables: one cluster per category, one bar per group (legend),
/// written to `out_stem.png` and `out_stem.svg` like [`line_chart`]. `spec.y_range` fixes the y
/// axis (default: from `min(0, data)` to the maximum plus 10%); `spec.hline` adds a reference.
///
/// Errors: no categories or groups, a group whose value count differs from the number of
/// categories, a NaN or infinite value (named by group and category).
pub fn bar_chart(
    spec: &ChartSpec,
    categories: &[String],
    groups: &[(String, Vec<f64>)],
    out_stem: &Path,
) -> Result<Vec<PathBuf>> {
    let title = spec.title.as_str();
    if categories.is_empty() || groups.is_empty() {
        return Err(input_err!(
            "plot '{title}': a bar chart needs at least one category and one group (got {} and {})",
            categories.len(),
            groups.len()
        ));
    }
    for (name, vals) in groups {
        if vals.len() != categories.len() {
            return Err(input_err!(
                "plot '{title}': group '{name}' has {} values for {} categories",
                vals.len(),
                categories.len()
            ));
        }
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(input_err!(
                "plot '{title}': group '{name}' value for category '{}' is {} (values must be finite)",
                categories[i],
                vals[i]
            ));
        }
    }
    let y_range = match spec.y_range {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
        Some((lo, hi)) => {
            return Err(input_err!(
                "plot '{title}': y_range ({lo}, {hi}) must be finite with min < max"
            ))
        }
        None => {
            let vals = groups.iter().flat_map(|(_, v)| v.iter().copied());
            let (lo, hi) = vals.fold((0.0f64, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
            let hi = spec.hline.as_ref().map(|(y, _)| hi.max(*y)).unwrap_or(hi);
            let span = (hi - lo).max(1e-9);
            (lo, hi + 0.1 * span)
        }
    };

    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        spec: &ChartSpec,
        categories: &[String],
        groups: &[(String, Vec<f64>)],
        y_range: (f64, f64),
    ) -> Result<()> {
        let err = |e: String| Error::msg(format!("plot '{}': {e}", spec.title));
        let n_cat = categories.len();
        let mut chart = ChartBuilder::on(root)
            .caption(&spec.title, ("sans-serif", FONT_TITLE))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(85)
            .build_cartesian_2d(-0.5..n_cat as f64 - 0.5, y_range.0..y_range.1)
            .map_err(|e| err(format!("{e:?}")))?;
        let fmt = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n_cat {
                categories[i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(&spec.x_label)
            .y_desc(&spec.y_label)
            .axis_desc_style(("sans-serif", FONT_AXIS))
            .label_style(("sans-serif", FONT_TICKS))
            .x_label_formatter(&fmt)
            // With at most `n_cat` labels on a span of `n_cat`, plotters puts ticks at integers.
            .x_labels(n_cat)
            .max_light_lines(0)
            .bold_line_style(RGBColor(225, 225, 225))
            .y_label_formatter(&|v| tick_label(*v))
            .y_labels(8)
            .draw()
            .map_err(|e| err(format!("{e:?}")))?;
        let width = 0.8 / groups.len() as f64;
        let base = y_range.0.max(0.0).min(y_range.1);
        for (g, (name, vals)) in groups.iter().enumerate() {
            let colour = palette(g);
            chart
                .draw_series(vals.iter().enumerate().map(|(c, v)| {
                    let x0 = c as f64 - 0.4 + g as f64 * width;
                    Rectangle::new(
                        [(x0 + 0.01, base), (x0 + width - 0.01, *v)],
                        colour.filled(),
                    )
                }))
                .map_err(|e| err(format!("{e:?}")))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 7), (x + 18, y + 7)], colour.filled())
                });
        }
        if let Some((y, name)) = &spec.hline {
            let style = ShapeStyle::from(RGBColor(90, 90, 90)).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(-0.5, *y), (n_cat as f64 - 0.5, *y)],
                    8,
                    6,
                    style,
                ))
                .map_err(|e| err(format!("{e:?}")))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 28, y)], 7, 5, style)
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", FONT_LEGEND))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .margin(12)
            .draw()
            .map_err(|e| err(format!("{e:?}")))?;
        Ok(())
    }
    render_both(
        out_stem,
        title,
        |root| draw(root, spec, categories, groups, y_range),
        |root| draw(root, spec, categories, groups, y_range),
    )
}

/// Probe AUC per layer for one or more curves (e.g. original vs mitigated): a solid line per
/// curve (mean out-of-fold AUC over folds) with the bootstrap 95% interval of the pooled AUC as
/// a shaded band, its shuffled-label control as a dashed line of the same colour, and chance
/// (0.5) as a grey reference. Curves without a control or interval (NaN) are drawn without them.
/// Legend names are the curve labels (plus the hook when two curves share a label).
pub fn plot_probe_curves(curves: &[&ProbeCurve], out_stem: &Path) -> Result<Vec<PathBuf>> {
    if curves.is_empty() {
        return Err(input_err!("probe plot: no curves given"));
    }
    let mut series = Vec::new();
    let mut lowest = 0.5f64;
    for c in curves {
        if c.layers.is_empty() {
            return Err(input_err!("probe plot: curve '{}' has no layers", c.label));
        }
        let dup = curves.iter().filter(|o| o.label == c.label).count() > 1;
        let name = if dup {
            format!("{} ({})", c.label, c.hook)
        } else {
            c.label.clone()
        };
        let x: Vec<f64> = c.layers.iter().map(|l| l.layer as f64).collect();
        let y: Vec<f64> = c.layers.iter().map(|l| l.auc_mean).collect();
        let lo: Vec<f64> = c.layers.iter().map(|l| l.auc_lo).collect();
        let hi: Vec<f64> = c.layers.iter().map(|l| l.auc_hi).collect();
        let mut s = Series::new(name.clone(), x.clone(), y.clone());
        if lo.iter().chain(&hi).all(|v| v.is_finite()) {
            lowest = lo.iter().fold(lowest, |a, v| a.min(*v));
            s = s.with_band(lo, hi);
        }
        lowest = y.iter().fold(lowest, |a, v| a.min(*v));
        series.push(s);
        let ctl: Vec<f64> = c.layers.iter().map(|l| l.control_auc).collect();
        if ctl.iter().all(|v| v.is_finite()) {
            lowest = ctl.iter().fold(lowest, |a, v| a.min(*v));
            series.push(Series::new(format!("{name} control"), x, ctl).dashed());
        }
    }
    let hooks: std::collections::BTreeSet<&str> = curves.iter().map(|c| c.hook.as_str()).collect();
    let x_label = if hooks.len() == 1 {
        format!("layer ({})", curves[0].hook)
    } else {
        "layer".to_string()
    };
    let title = if curves.len() == 1 {
        format!("Linear probe: {}", curves[0].label)
    } else {
        "Linear probe AUC per layer".to_string()
    };
    let spec = ChartSpec {
        title,
        x_label,
        y_label: format!("ROC AUC ({}-fold CV)", curves[0].folds),
        y_range: Some((((lowest - 0.05) * 10.0).floor() / 10.0, 1.0)),
        hline: Some((0.5, "chance".to_string())),
    };
    line_chart(&spec, &series, out_stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::LayerProbe;

    fn read_png(p: &Path) -> image::DynamicImage {
        image::open(p).unwrap()
    }

    #[test]
    fn line_chart_writes_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let x: Vec<f64> = (0..32).map(|i| i as f64).collect();
        let y: Vec<f64> = x.iter().map(|v| 0.5 + 0.2 * (v / 31.0)).collect();
        let lo: Vec<f64> = y.iter().map(|v| v - 0.03).collect();
        let hi: Vec<f64> = y.iter().map(|v| v + 0.03).collect();
        let series = vec![
            Series::new("original", x.clone(), y.clone()).with_band(lo, hi),
            Series::new("original control", x.clone(), vec![0.5; 32]).dashed(),
            Series::new("mitigated", x.clone(), y.iter().map(|v| v + 0.05).collect()),
        ];
        let spec = ChartSpec {
            title: "Probe AUC".into(),
            x_label: "layer index".into(),
            y_label: "ROC AUC".into(),
            y_range: None,
            hline: Some((0.5, "chance".into())),
        };
        let paths = line_chart(&spec, &series, &dir.path().join("fig.v1")).unwrap();
        assert_eq!(paths.len(), 2);
        assert!(paths[0].ends_with("fig.v1.png") && paths[1].ends_with("fig.v1.svg"));
        let img = read_png(&paths[0]);
        assert_eq!((img.width(), img.height()), FIGURE_SIZE);
        // Not blank: many non-white pixels.
        let rgb = img.to_rgb8();
        let ink = rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(ink > 20_000, "{ink} non-white pixels");
        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        for text in [
            "layer index",
            "ROC AUC",
            "Probe AUC",
            "original",
            "original control",
            "mitigated",
            "chance",
        ] {
            assert!(svg.contains(text), "SVG lacks '{text}'");
        }
        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(5.0), "5");
        assert_eq!(tick_label(-12.0), "-12");
        assert_eq!(tick_label(0.5000000000001), "0.5");
        assert_eq!(tick_label(0.30000000000000004), "0.3");
        assert_eq!(tick_label(0.125), "0.125");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.0015), "0.0015");
    }

    #[test]
    fn colours_pair_dashed_companions() {
        let s = |d: bool| Series {
            name: "s".into(),
            x: vec![0.0],
            y: vec![0.0],
            band: None,
            dashed: d,
        };
        assert_eq!(
            series_colours(&[s(false), s(true), s(false), s(true), s(true)]),
            vec![0, 0, 1, 1, 2]
        );
        assert_eq!(series_colours(&[s(true), s(false)]), vec![0, 1]);
    }

    #[test]
    fn line_chart_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bad");
        let spec = ChartSpec {
            title: "t".into(),
            ..ChartSpec::default()
        };
        let e = line_chart(&spec, &[Series::new("a", vec![0.0, 1.0], vec![0.0])], &out)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'a'") && e.contains("2 x values but 1 y values"),
            "{e}"
        );
        let e = line_chart(
            &spec,
            &[Series::new("b", vec![0.0, 1.0], vec![0.0, f64::NAN])],
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'b' y value 1 is NaN"), "{e}");
        let e = line_chart(
            &spec,
            &[Series::new("c", vec![0.0, 1.0], vec![0.0, 1.0])
                .with_band(vec![0.0], vec![1.0, 2.0])],
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("band lower"), "{e}");
        assert!(line_chart(&spec, &[], &out).is_err());
        let e = line_chart(
            &ChartSpec {
                y_range: Some((1.0, 0.0)),
                ..spec.clone()
            },
            &[Series::new("d", vec![0.0], vec![0.0])],
            &out,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("y_range"), "{e}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn bar_chart_writes_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let cats: Vec<String> = ["suggestive", "euphemistic", "strong"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let groups = vec![
            ("original".to_string(), vec![0.62, 0.55, 0.81]),
            ("DPO".to_string(), vec![0.21, 0.18, 0.30]),
        ];
        let spec = ChartSpec {
            title: "Sycophancy by tone".into(),
            x_label: "tone".into(),
            y_label: "Syc rate".into(),
            y_range: Some((0.0, 1.0)),
            hline: None,
        };
        let paths = bar_chart(&spec, &cats, &groups, &dir.path().join("bars")).unwrap();
        let img = read_png(&paths[0]);
        assert_eq!((img.width(), img.height()), FIGURE_SIZE);
        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        for t in [
            "suggestive",
            "euphemistic",
            "strong",
            "original",
            "DPO",
            "Syc rate",
            "tone",
        ] {
            assert!(svg.contains(t), "SVG lacks '{t}'");
        }
        // Bar colour of the first group appears in the PNG.
        let (r, g, b) = PALETTE[0];
        assert!(img.to_rgb8().pixels().any(|p| p.0 == [r, g, b]));
        let bad = vec![("x".to_string(), vec![0.1, 0.2])];
        let e = bar_chart(&spec, &cats, &bad, &dir.path().join("b2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("group 'x' has 2 values for 3 categories"), "{e}");
        let nan = vec![("y".to_string(), vec![0.1, f64::NAN, 0.2])];
        let e = bar_chart(&spec, &cats, &nan, &dir.path().join("b3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'euphemistic' is NaN"), "{e}");
    }

    fn curve(label: &str, shift: f64, control: bool) -> ProbeCurve {
        let layers: Vec<LayerProbe> = (0..32)
            .map(|l| {
                let auc = 0.5 + shift * (l as f64 / 31.0).powi(2);
                LayerProbe {
                    layer: l,
                    hook: "model.layers.{i}.out".into(),
                    auc_mean: auc,
                    auc_std: 0.02,
                    auc_pooled: auc,
                    auc_lo: auc - 0.04,
                    auc_hi: auc + 0.04,
                    acc_mean: auc,
                    control_auc: if control {
                        0.5 + 0.01 * ((l % 3) as f64 - 1.0)
                    } else {
                        f64::NAN
                    },
                    selectivity: auc - 0.5,
                    meandiff_auc: auc,
                    n_pos: 100,
                    n_neg: 100,
                }
            })
            .collect();
        ProbeCurve {
            label: label.into(),
            hook: "model.layers.{i}.out".into(),
            layers,
            peak_layer: 31,
            first_90_layer: 30,
            n_examples: 200,
            folds: 5,
            seed: 0,
            l2: 1.0,
        }
    }

    #[test]
    fn probe_curves_plot() {
        let dir = tempfile::tempdir().unwrap();
        let a = curve("original", 0.15, true);
        let b = curve("DPO", 0.25, false);
        let paths = plot_probe_curves(&[&a, &b], &dir.path().join("probe")).unwrap();
        let img = read_png(&paths[0]);
        assert_eq!((img.width(), img.height()), FIGURE_SIZE);
        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        for t in [
            "original",
            "original control",
            "DPO",
            "chance",
            "ROC AUC (5-fold CV)",
        ] {
            assert!(svg.contains(t), "SVG lacks '{t}'");
        }
        assert!(!svg.contains("DPO control"));
        if let Ok(keep) = std::env::var("SYCOSCOPE_KEEP_PLOTS") {
            for p in &paths {
                std::fs::copy(p, Path::new(&keep).join(p.file_name().unwrap())).unwrap();
            }
            let cats: Vec<String> = ["suggestive", "euphemistic", "strong"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let groups = vec![
                ("original".to_string(), vec![0.62, 0.55, 0.81]),
                ("SFT".to_string(), vec![0.31, 0.28, 0.45]),
                ("DPO".to_string(), vec![0.21, 0.18, 0.30]),
            ];
            let spec = ChartSpec {
                title: "Sycophancy by tone".into(),
                x_label: "tone".into(),
                y_label: "Syc rate".into(),
                y_range: Some((0.0, 1.0)),
                hline: Some((0.5, "half".into())),
            };
            bar_chart(&spec, &cats, &groups, &Path::new(&keep).join("bars")).unwrap();
        }
        assert!(plot_probe_curves(&[], &dir.path().join("x")).is_err());
    }
}
