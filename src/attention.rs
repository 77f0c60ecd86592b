//! Attention analyses on captured data (never the model): how much of a query row's attention
//! goes to the image, the instruction text, the user's pushback and the attention sink (visual
//! reliance, per layer, aggregated over a run into curves), and where on the image the decision
//! token looks (heatmaps over the patch grid, overlaid on the image).
//!
//! Everything here works on plain arrays: a query row of `blocks.{i}.attn.hook_pattern`
//! (probabilities over key positions `0..=query`), the [`Spans`] of the prepared input, and for
//! heatmaps the image as the model saw it.
//!
//! # Regions of a row
//! Every key position `p` in `0..=query` belongs to exactly one [`Region`], checked in this order:
//! 1. [`Region::Image`]: `p` lies in one of the image spans (every image of the example).
//! 2. [`Region::Sink`]: `p` is the *sink position*, the first position that is not an image token.
//!    That is position 0 (BOS) for every family except BLIP-2 / InstructBLIP, whose query tokens
//!    come before BOS; there the sink is the BOS token right after them.
//! 3. [`Region::Pressure`]: `p` lies in the last user message, provided the conversation has at
//!    least two user messages (round 2 or later: the turn that carries the pushback, or its
//!    neutral counterpart). A single-turn conversation has no pressure region (share 0).
//! 4. [`Region::Text`]: everything else: system prompt, the first question, the assistant's
//!    earlier answer, chat-template tokens, and the query position itself when it is not in the
//!    last user message.
//!
//! # Files
//! Curves save to `<stem>.csv` (long format) and `<stem>.json`; figures to `<stem>.png` and
//! `<stem>.svg`. All files are written atomically.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use image::RgbImage;
use ndarray::{Array2, ArrayView2, ArrayView3};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::error::{write_atomic, Error, Result};
use crate::spans::{ImageSpan, Spans};

/// Tolerance on the sum of a captured probability row (float32 softmax of a long row, possibly
/// computed in half precision and upcast).
const ROW_SUM_TOL: f32 = 0.02;
/// Largest mass allowed on key positions after the query in a full-length (causally masked) row.
const CAUSAL_TOL: f32 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Visual reliance: regions and shares
// ---------------------------------------------------------------------------------------------

/// The region a key position belongs to (see the module docs for the exact rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Region {
    /// Image tokens (patch features, or Q-Former query tokens), all images of the example.
    Image,
    /// Non-image tokens that are neither the sink nor in the pressure turn.
    Text,
    /// The last user message when the conversation has two or more user messages (the
    /// pushback turn), image tokens and the sink excluded.
    Pressure,
    /// The first non-image position (BOS, position 0 in most families): the usual attention sink.
    Sink,
}

impl Region {
    /// Lower-case name: `image`, `text`, `pressure`, `sink`.
    pub fn name(self) -> &'static str {
        match self {
            Region::Image => "image",
            Region::Text => "text",
            Region::Pressure => "pressure",
            Region::Sink => "sink",
        }
    }
}

/// The region of every key position `0..=query` of a row whose query is `query`.
///
/// Errors when `query` is outside the sequence, a span lies outside the sequence, the example has
/// no image, or no image token is visible at or before `query`.
pub fn key_regions(spans: &Spans, query: usize) -> Result<Vec<Region>> {
    if spans.images.is_empty() {
        return Err(Error::input(
            "attention regions: the example has no image span, so there is no visual attention to measure",
        ));
    }
    if query >= spans.len {
        return Err(Error::input(format!(
            "attention regions: query position {query} is outside the sequence of length {}",
            spans.len
        )));
    }
    for s in &spans.images {
        if s.start > s.end || s.end > spans.len {
            return Err(Error::input(format!(
                "attention regions: image span {} [{}, {}) does not fit in the sequence of length {}",
                s.index, s.start, s.end, spans.len
            )));
        }
    }
    let n = query + 1;
    let mut regions = vec![Region::Text; n];
    for s in &spans.images {
        for r in regions.iter_mut().take(s.end.min(n)).skip(s.start) {
            *r = Region::Image;
        }
    }
    if !regions.contains(&Region::Image) {
        return Err(Error::input(format!(
            "attention regions: no image token at or before query position {query} (first image span starts at {})",
            spans.images.iter().map(|s| s.start).min().unwrap_or(0)
        )));
    }
    let users: Vec<_> = spans.messages.iter().filter(|m| m.role == "user").collect();
    if users.len() >= 2 {
        let last = users[users.len() - 1];
        for r in regions.iter_mut().take(last.end.min(n)).skip(last.start) {
            if *r == Region::Text {
                *r = Region::Pressure;
            }
        }
    }
    if let Some(sink) = regions
        .iter()
        .zip(0..n)
        .find(|(r, p)| *p >= spans.pad && **r != Region::Image && !spans.is_image(*p))
        .map(|(_, p)| p)
    {
        regions[sink] = Region::Sink;
    }
    Ok(regions)
}

/// Shares of one attention row's mass by region. The four shares are fractions of the row's
/// total mass over keys `0..=query`: the row is divided by its own sum, so they sum to 1 (up to
/// float rounding) even when the captured row sums to 0.99 or 1.01.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RegionShares {
    /// Share on image tokens.
    pub image: f32,
    /// Share on text tokens (not sink, not pressure).
    pub text: f32,
    /// Share on the pressure turn.
    pub pressure: f32,
    /// Share on the sink token.
    pub sink: f32,
}

impl RegionShares {
    /// The visual attention ratio: `image / (text + pressure)`, the mass on image tokens relative
    /// to the mass on all text tokens (instruction, earlier turns and the pushback), the sink
    /// excluded. The MM-SY paper does not spell its ratio out; "image relative to text" with the
    /// pushback counted as text is the reading taken here, and the sink is left out because its
    /// mass (often half the row) is a no-op that would otherwise dominate the denominator.
    /// `NaN` when the text mass is zero (undefined; cannot happen for a softmax row, whose query
    /// position is itself a text key with positive mass, except by underflow).
    pub fn ratio(&self) -> f32 {
        let den = self.text + self.pressure;
        if den > 0.0 {
            self.image / den
        } else {
            f32::NAN
        }
    }

    /// `[image, text, pressure, sink, ratio]`, the layout of [`reliance_features`] rows.
    pub fn to_features(&self) -> [f32; 5] {
        [
            self.image,
            self.text,
            self.pressure,
            self.sink,
            self.ratio(),
        ]
    }
}

/// Column names of [`reliance_features`].
pub const FEATURE_NAMES: [&str; 5] = ["image", "text", "pressure", "sink", "ratio"];

/// Region shares of one attention row.
///
/// `row` is the query row at position `query`: either the causal part (length `query + 1`) or
/// the full row of a `[s, s]` pattern (length `spans.len`, entries after `query` must be 0).
/// Errors on any other length, on NaN / infinite / negative entries, on a row whose sum is not 1
/// (within 0.02), and when the example has no visible image (see [`key_regions`]).
pub fn region_shares(row: &[f32], spans: &Spans, query: usize) -> Result<RegionShares> {
    let regions = key_regions(spans, query)?;
    let n = query + 1;
    if row.len() != n && row.len() != spans.len {
        return Err(Error::input(format!(
            "attention row has {} entries but query {query} of a sequence of length {} needs {n} (keys 0..={query}) or {} (the full row)",
            row.len(),
            spans.len,
            spans.len
        )));
    }
    for (p, &v) in row.iter().enumerate() {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::input(format!(
                "attention row: entry {p} is {v}, expected a probability (finite, >= 0)"
            )));
        }
    }
    let tail: f32 = row[n..].iter().sum();
    if tail > CAUSAL_TOL {
        return Err(Error::input(format!(
            "attention row: mass {tail} on keys after query {query}: not a causal row, or the wrong query position"
        )));
    }
    let mut acc = [0f64; 4];
    for (&v, r) in row[..n].iter().zip(&regions) {
        let k = match r {
            Region::Image => 0,
            Region::Text => 1,
            Region::Pressure => 2,
            Region::Sink => 3,
        };
        acc[k] += v as f64;
    }
    let total: f64 = acc.iter().sum();
    if (total as f32 - 1.0).abs() > ROW_SUM_TOL {
        return Err(Error::input(format!(
            "attention row sums to {total} over keys 0..={query}, expected 1: pass probabilities (hook_pattern), not scores"
        )));
    }
    Ok(RegionShares {
        image: (acc[0] / total) as f32,
        text: (acc[1] / total) as f32,
        pressure: (acc[2] / total) as f32,
        sink: (acc[3] / total) as f32,
    })
}

/// Fixed-size reliance features of one layer's decision row, what the runner stores per layer
/// per example (so examples of different lengths stack).
///
/// `pattern_rows` is `[heads, 1, keys]` (one query row per head, `keys` = `query + 1` or the full
/// sequence length). Returns `[heads + 1, 5]`: one row per head, then the pooled row (last).
/// Columns: image, text, pressure, sink shares and the visual attention ratio
/// ([`RegionShares::ratio`], `NaN` when undefined). The pooled shares are the mean of the heads'
/// shares (equal to the shares of the head-averaged row); the pooled ratio is the ratio of the
/// pooled shares (a ratio of means, not a mean of ratios, so one head with little text mass
/// cannot blow it up).
pub fn reliance_features(
    pattern_rows: ArrayView3<f32>,
    spans: &Spans,
    query: usize,
) -> Result<Array2<f32>> {
    let (heads, q, _) = pattern_rows.dim();
    if heads == 0 || q != 1 {
        return Err(Error::input(format!(
            "reliance features: expected attention rows of shape [heads, 1, keys] with heads >= 1, got {:?}",
            pattern_rows.shape()
        )));
    }
    let mut out = Array2::<f32>::zeros((heads + 1, 5));
    let mut pooled = [0f64; 4];
    for h in 0..heads {
        let row: Vec<f32> = pattern_rows
            .slice(ndarray::s![h, 0, ..])
            .iter()
            .copied()
            .collect();
        let s = region_shares(&row, spans, query)
            .map_err(|e| Error::input(format!("head {h}: {e}")))?;
        for (j, v) in s.to_features().iter().enumerate() {
            out[[h, j]] = *v;
        }
        pooled[0] += s.image as f64;
        pooled[1] += s.text as f64;
        pooled[2] += s.pressure as f64;
        pooled[3] += s.sink as f64;
    }
    let p = RegionShares {
        image: (pooled[0] / heads as f64) as f32,
        text: (pooled[1] / heads as f64) as f32,
        pressure: (pooled[2] / heads as f64) as f32,
        sink: (pooled[3] / heads as f64) as f32,
    };
    for (j, v) in p.to_features().iter().enumerate() {
        out[[heads, j]] = *v;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Reliance curves over a run
// ---------------------------------------------------------------------------------------------

/// Mean of one reliance metric per layer over the examples of one condition, with a 95%
/// confidence interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelianceCurve {
    /// Condition name (`neutral`, a tone, ...).
    pub condition: String,
    /// Layers, ascending.
    pub layers: Vec<usize>,
    /// Mean per layer.
    pub mean: Vec<f64>,
    /// Lower end of the 95% interval per layer.
    pub lo: Vec<f64>,
    /// Upper end of the 95% interval per layer.
    pub hi: Vec<f64>,
    /// Number of examples (rows) of this condition.
    pub n: usize,
    /// Values used per layer: `n` minus the undefined (`NaN`) ratios skipped at that layer.
    #[serde(default)]
    pub counts: Vec<usize>,
    /// `image_share`, `text_share`, `pressure_share`, `sink_share` or `ratio`.
    pub metric: String,
}

/// Metrics accepted by [`reliance_curves`].
pub const METRICS: [&str; 5] = [
    "image_share",
    "text_share",
    "pressure_share",
    "sink_share",
    "ratio",
];

fn metric_column(metric: &str) -> Result<usize> {
    METRICS.iter().position(|m| *m == metric).ok_or_else(|| {
        Error::input(format!(
            "unknown reliance metric '{metric}': expected one of {}",
            METRICS.join(", ")
        ))
    })
}

/// Axis label of a metric.
pub fn metric_label(metric: &str) -> &'static str {
    match metric {
        "image_share" => "share of attention on image tokens",
        "text_share" => "share of attention on text tokens",
        "pressure_share" => "share of attention on the pressure turn",
        "sink_share" => "share of attention on the sink token",
        "ratio" => "visual attention ratio (image / text)",
        _ => "value",
    }
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom (table to 30, then the
/// Cornish-Fisher expansion, accurate to 1e-3).
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        return f64::INFINITY;
    }
    if df <= 30 {
        return T[df - 1];
    }
    let z = 1.959_963_984_540_054_f64;
    let d = df as f64;
    z + (z.powi(3) + z) / (4.0 * d)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * d * d)
}

/// Mean and 95% interval `(mean, lo, hi)` of `values`: Student-t interval
/// `mean ± t(0.975, n-1) · sd / sqrt(n)` with the sample standard deviation. With one value the
/// interval collapses to the value; with none all three are `NaN`.
pub fn mean_ci(values: &[f64]) -> (f64, f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, mean, mean);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t975(n - 1) * (var / n as f64).sqrt();
    (mean, mean - half, mean + half)
}

/// One curve per condition for one metric.
///
/// `per_layer` holds, for each layer, the pooled features of every example at that layer
/// (`[rows, 5]`, the last row of [`reliance_features`]); every layer has the same rows in the
/// same order, and `conditions[r]` names row `r`'s condition. Curves come out with `neutral`
/// first (when present), then the other conditions in order of first appearance; layers are
/// sorted ascending. The interval is [`mean_ci`] (Student t, normal data assumed per layer).
///
/// Undefined ratios (`NaN`) are skipped and counted in [`RelianceCurve::counts`]; any other
/// non-finite value is an error naming the layer and row.
pub fn reliance_curves(
    per_layer: &[(usize, ArrayView2<f32>)],
    conditions: &[String],
    metric: &str,
) -> Result<Vec<RelianceCurve>> {
    let col = metric_column(metric)?;
    if per_layer.is_empty() {
        return Err(Error::input("reliance curves: no layer given"));
    }
    let mut order: Vec<usize> = (0..per_layer.len()).collect();
    order.sort_by_key(|&i| per_layer[i].0);
    for w in order.windows(2) {
        if per_layer[w[0]].0 == per_layer[w[1]].0 {
            return Err(Error::input(format!(
                "reliance curves: layer {} given twice",
                per_layer[w[0]].0
            )));
        }
    }
    for (layer, a) in per_layer {
        if a.nrows() != conditions.len() || a.ncols() != 5 {
            return Err(Error::input(format!(
                "reliance curves: layer {layer} has features of shape {:?}, expected [{}, 5] (one row per condition label)",
                a.shape(),
                conditions.len()
            )));
        }
    }
    let mut names: Vec<&String> = Vec::new();
    if conditions.iter().any(|c| c == "neutral") {
        names.push(
            conditions
                .iter()
                .find(|c| *c == "neutral")
                .expect("present"),
        );
    }
    for c in conditions {
        if !names.contains(&c) {
            names.push(c);
        }
    }
    let mut curves = Vec::with_capacity(names.len());
    for name in names {
        let rows: Vec<usize> = (0..conditions.len())
            .filter(|&r| &conditions[r] == name)
            .collect();
        let mut curve = RelianceCurve {
            condition: name.clone(),
            layers: Vec::new(),
            mean: Vec::new(),
            lo: Vec::new(),
            hi: Vec::new(),
            n: rows.len(),
            counts: Vec::new(),
            metric: metric.to_string(),
        };
        for &i in &order {
            let (layer, a) = &per_layer[i];
            let mut vals = Vec::with_capacity(rows.len());
            for &r in &rows {
                let v = a[[r, col]];
                if v.is_nan() && col == 4 {
                    continue;
                }
                if !v.is_finite() {
                    return Err(Error::input(format!(
                        "reliance curves: layer {layer}, row {r} ({name}): {metric} is {v}"
                    )));
                }
                vals.push(v as f64);
            }
            let (m, lo, hi) = mean_ci(&vals);
            curve.layers.push(*layer);
            curve.mean.push(m);
            curve.lo.push(lo);
            curve.hi.push(hi);
            curve.counts.push(vals.len());
        }
        curves.push(curve);
    }
    Ok(curves)
}

fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn parse_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.is_empty() => quoted = true,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

const CSV_HEADER: &str = "condition,metric,layer,mean,lo,hi,n,count";

fn check_curve(c: &RelianceCurve, what: &str) -> Result<()> {
    let l = c.layers.len();
    if c.mean.len() != l || c.lo.len() != l || c.hi.len() != l || c.counts.len() != l {
        return Err(Error::input(format!(
            "{what}: curve '{}' has {} layers but {} means, {} lows, {} highs, {} counts",
            c.condition,
            l,
            c.mean.len(),
            c.lo.len(),
            c.hi.len(),
            c.counts.len()
        )));
    }
    Ok(())
}

/// Save curves to `<stem>.csv` (long format: `condition,metric,layer,mean,lo,hi,n,count`) and
/// `<stem>.json` (the list of curves). Returns the two paths.
pub fn save_curves(curves: &[RelianceCurve], out_stem: &Path) -> Result<Vec<PathBuf>> {
    let mut csv = String::from(CSV_HEADER);
    csv.push('\n');
    for c in curves {
        check_curve(c, "save curves")?;
        for i in 0..c.layers.len() {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{}",
                csv_field(&c.condition),
                csv_field(&c.metric),
                c.layers[i],
                c.mean[i],
                c.lo[i],
                c.hi[i],
                c.n,
                c.counts[i]
            );
        }
    }
    let csv_path = with_suffix(out_stem, ".csv");
    let json_path = with_suffix(out_stem, ".json");
    write_atomic(&csv_path, csv.as_bytes())?;
    let json = serde_json::to_vec_pretty(curves)
        .map_err(|e| Error::msg(format!("serialising reliance curves: {e}")))?;
    write_atomic(&json_path, &json)?;
    Ok(vec![csv_path, json_path])
}

/// Load curves saved by [`save_curves`], from the `.json` or the `.csv` file (chosen by the
/// extension).
pub fn load_curves(path: &Path) -> Result<Vec<RelianceCurve>> {
    let text = crate::error::read_to_string(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let curves = match ext {
        "json" => serde_json::from_str::<Vec<RelianceCurve>>(&text)
            .map_err(|e| Error::config(path, format!("not a list of reliance curves: {e}")))?,
        "csv" => parse_curves_csv(&text).map_err(|e| Error::config(path, e))?,
        _ => {
            return Err(Error::config(
                path,
                "expected a .json or .csv file of reliance curves",
            ))
        }
    };
    for c in &curves {
        check_curve(c, &path.display().to_string())?;
    }
    Ok(curves)
}

fn parse_curves_csv(text: &str) -> std::result::Result<Vec<RelianceCurve>, String> {
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.trim() == CSV_HEADER => {}
        other => {
            return Err(format!(
                "expected the header '{CSV_HEADER}', found {:?}",
                other.unwrap_or("")
            ))
        }
    }
    let mut curves: Vec<RelianceCurve> = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f = parse_csv_line(line);
        if f.len() != 8 {
            return Err(format!(
                "line {}: expected 8 fields, found {}",
                i + 2,
                f.len()
            ));
        }
        let num = |k: usize| -> std::result::Result<f64, String> {
            f[k].trim().parse::<f64>().map_err(|_| {
                format!(
                    "line {}: field {} is '{}', expected a number",
                    i + 2,
                    k + 1,
                    f[k]
                )
            })
        };
        let int = |k: usize| -> std::result::Result<usize, String> {
            f[k].trim().parse::<usize>().map_err(|_| {
                format!(
                    "line {}: field {} is '{}', expected an integer",
                    i + 2,
                    k + 1,
                    f[k]
                )
            })
        };
        let (layer, mean, lo, hi, n, count) =
            (int(2)?, num(3)?, num(4)?, num(5)?, int(6)?, int(7)?);
        let idx = match curves
            .iter()
            .position(|c| c.condition == f[0] && c.metric == f[1])
        {
            Some(k) => k,
            None => {
                curves.push(RelianceCurve {
                    condition: f[0].clone(),
                    metric: f[1].clone(),
                    layers: vec![],
                    mean: vec![],
                    lo: vec![],
                    hi: vec![],
                    n,
                    counts: vec![],
                });
                curves.len() - 1
            }
        };
        let c = &mut curves[idx];
        c.layers.push(layer);
        c.mean.push(mean);
        c.lo.push(lo);
        c.hi.push(hi);
        c.counts.push(count);
    }
    Ok(curves)
}

// ---------------------------------------------------------------------------------------------
// Drawing helpers shared by the charts and the heatmap figures
// ---------------------------------------------------------------------------------------------

fn draw_err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> Error + '_ {
    move |e| Error::msg(format!("drawing {what}: {e:?}"))
}

fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::msg(format!("encoding PNG: {e}")))?;
    Ok(bytes)
}

/// Colour-blind-safe series colours (Okabe-Ito); the neutral condition is drawn in dark grey.
fn series_colour(i: usize, neutral: bool) -> RGBColor {
    if neutral {
        return RGBColor(60, 60, 60);
    }
    const P: [RGBColor; 6] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(230, 159, 0),
        RGBColor(204, 121, 167),
        RGBColor(86, 180, 233),
    ];
    P[i % P.len()]
}

fn draw_curves_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curves: &[RelianceCurve],
    title: &str,
) -> Result<()> {
    let e = draw_err::<DrawingAreaErrorKind<DB::ErrorType>>("reliance chart");
    root.fill(&WHITE).map_err(&e)?;
    let metric = curves[0].metric.as_str();
    let finite = |v: &f64| v.is_finite();
    let xs: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.layers.iter().map(|&l| l as f64))
        .collect();
    let (mut x0, mut x1) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if x0 == x1 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let ys: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.lo.iter().chain(&c.hi).chain(&c.mean).copied())
        .filter(finite)
        .collect();
    let ymin = ys.iter().copied().fold(0.0f64, f64::min);
    let mut ymax = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !ymax.is_finite() || ymax <= ymin {
        ymax = ymin + 1.0;
    }
    let ymax = ymax + 0.05 * (ymax - ymin);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, ymin..ymax)
        .map_err(&e)?;
    let nl = ((x1 - x0) as usize + 1).min(17);
    let xfmt = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 {
            format!("{}", x.round() as i64)
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(nl)
        .x_label_formatter(&xfmt)
        .x_desc("decoder layer")
        .y_desc(metric_label(metric))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(&e)?;
    let mut tone = 0;
    for c in curves {
        let neutral = c.condition == "neutral";
        let col = series_colour(tone, neutral);
        if !neutral {
            tone += 1;
        }
        let pts: Vec<(f64, f64)> = c
            .layers
            .iter()
            .zip(&c.mean)
            .filter(|(_, m)| m.is_finite())
            .map(|(&l, &m)| (l as f64, m))
            .collect();
        let mut band: Vec<(f64, f64)> = c
            .layers
            .iter()
            .zip(&c.lo)
            .filter(|(_, v)| v.is_finite())
            .map(|(&l, &v)| (l as f64, v))
            .collect();
        let upper: Vec<(f64, f64)> = c
            .layers
            .iter()
            .zip(&c.hi)
            .filter(|(_, v)| v.is_finite())
            .map(|(&l, &v)| (l as f64, v))
            .collect();
        band.extend(upper.into_iter().rev());
        if band.len() >= 3 {
            chart
                .draw_series(std::iter::once(Polygon::new(band, col.mix(0.18).filled())))
                .map_err(&e)?;
        }
        let label = format!("{} (n={})", c.condition, c.n);
        chart
            .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
            .map_err(&e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], col.stroke_width(3)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, col.filled())))
            .map_err(&e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(150, 150, 150))
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// Draw curves of one metric (e.g. neutral and each tone) on one chart: mean per layer as a line
/// with points, the 95% interval as a shaded band, a legend with each condition's `n`, axes
/// labelled. Writes `<stem>.png` (1000 x 600) and `<stem>.svg`; returns the paths.
pub fn draw_reliance_curves(
    curves: &[RelianceCurve],
    title: &str,
    out_stem: &Path,
) -> Result<Vec<PathBuf>> {
    if curves.is_empty() {
        return Err(Error::input("reliance chart: no curve to draw"));
    }
    for c in curves {
        check_curve(c, "reliance chart")?;
        if c.metric != curves[0].metric {
            return Err(Error::input(format!(
                "reliance chart: curves of different metrics ({} and {}) on one chart",
                curves[0].metric, c.metric
            )));
        }
    }
    crate::plots::ensure_font();
    let (w, h) = (1000u32, 600u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw_curves_on(&root, curves, title)?;
    }
    let img = RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::msg("reliance chart: bitmap buffer of the wrong size"))?;
    let png = with_suffix(out_stem, ".png");
    write_atomic(&png, &encode_png(&img)?)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw_curves_on(&root, curves, title)?;
    }
    let svg_path = with_suffix(out_stem, ".svg");
    write_atomic(&svg_path, svg.as_bytes())?;
    Ok(vec![png, svg_path])
}

// ---------------------------------------------------------------------------------------------
// Heatmaps over the image
// ---------------------------------------------------------------------------------------------

/// Lay values over an image span's patches out as its `rows x cols` grid (row-major).
///
/// `row` is an attention row over key positions (at least `span.end` long); the span's entries
/// `[start, end)` are taken. Errors when the row is too short, the span's length is not
/// `rows * cols` (Q-Former spans hold query tokens: use [`compose_qformer`] then
/// [`grid_from_values`]), or a value is not finite.
pub fn image_grid(row: &[f32], span: &ImageSpan) -> Result<Array2<f32>> {
    if span.start > span.end || row.len() < span.end {
        return Err(Error::input(format!(
            "image grid: the row has {} entries but image span {} covers [{}, {})",
            row.len(),
            span.index,
            span.start,
            span.end
        )));
    }
    if span.len() != span.rows * span.cols {
        return Err(Error::input(format!(
            "image grid: image span {} holds {} tokens but its grid is {} x {} = {} patches (a Q-Former span? compose the map with compose_qformer first)",
            span.index,
            span.len(),
            span.rows,
            span.cols,
            span.rows * span.cols
        )));
    }
    grid_from_values(&row[span.start..span.end], span.rows, span.cols)
}

/// Lay `rows * cols` patch values out as a `[rows, cols]` grid (row-major). Errors on a length
/// mismatch, an empty grid, or a non-finite value.
pub fn grid_from_values(values: &[f32], rows: usize, cols: usize) -> Result<Array2<f32>> {
    if rows == 0 || cols == 0 || values.len() != rows * cols {
        return Err(Error::input(format!(
            "patch grid: {} values do not fill a {rows} x {cols} grid",
            values.len()
        )));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::input(format!(
            "patch grid: value {i} (row {}, col {}) is {}",
            i / cols,
            i % cols,
            values[i]
        )));
    }
    Array2::from_shape_vec((rows, cols), values.to_vec())
        .map_err(|e| Error::msg(format!("patch grid: {e}")))
}

/// Mean over heads of per-head rows `[heads, keys]` (the head-pooled attention row).
pub fn mean_over_heads(rows: ArrayView2<f32>) -> Result<Vec<f32>> {
    if rows.nrows() == 0 {
        return Err(Error::input("mean over heads: no head"));
    }
    rows.mean_axis(ndarray::Axis(0))
        .map(|a| a.to_vec())
        .ok_or_else(|| Error::input("mean over heads: empty rows"))
}

/// Element-wise mean of grids of one shape (e.g. one per layer, to average a layer range).
pub fn mean_grids(grids: &[Array2<f32>]) -> Result<Array2<f32>> {
    let first = grids
        .first()
        .ok_or_else(|| Error::input("mean of grids: no grid"))?;
    let mut acc = Array2::<f32>::zeros(first.dim());
    for (i, g) in grids.iter().enumerate() {
        if g.dim() != first.dim() {
            return Err(Error::input(format!(
                "mean of grids: grid {i} is {:?}, expected {:?}",
                g.dim(),
                first.dim()
            )));
        }
        acc += g;
    }
    Ok(acc / grids.len() as f32)
}

/// Compose a Q-Former map: the decision token attends to the query tokens, each query attends
/// to the vision patches. `decision_over_queries[q]` is the decision row's attention on query
/// token `q`, `cross_attn[q, p]` query `q`'s cross-attention on vision token `p` (average the
/// heads of `qformer.blocks.{k}.crossattn.hook_pattern` first, e.g. with [`mean_over_heads`] per
/// query). Returns `v[p] = Σ_q a[q]·C[q, p]`, normalised to sum 1: how the decision token's
/// attention on the image spreads over patches through the queries. This is a composition of two
/// attention maps, not an attention the model computed. If the vision tower has a CLS token, it
/// is `v[0]`: drop it before [`grid_from_values`].
pub fn compose_qformer(
    decision_over_queries: &[f32],
    cross_attn: ArrayView2<f32>,
) -> Result<Vec<f32>> {
    let (q, n) = cross_attn.dim();
    if decision_over_queries.len() != q || q == 0 || n == 0 {
        return Err(Error::input(format!(
            "compose Q-Former map: {} decision weights but cross-attention of shape [{q}, {n}] (expected [queries, patches] with queries = {})",
            decision_over_queries.len(),
            decision_over_queries.len()
        )));
    }
    if decision_over_queries
        .iter()
        .chain(cross_attn.iter())
        .any(|v| !v.is_finite() || *v < 0.0)
    {
        return Err(Error::input(
            "compose Q-Former map: attention weights must be finite and >= 0",
        ));
    }
    let mut out = vec![0f64; n];
    for (qi, &a) in decision_over_queries.iter().enumerate() {
        for (p, o) in out.iter_mut().enumerate() {
            *o += a as f64 * cross_attn[[qi, p]] as f64;
        }
    }
    let total: f64 = out.iter().sum();
    if total <= 0.0 {
        return Err(Error::input(
            "compose Q-Former map: the composed map has no mass (all decision weights or cross-attention zero)",
        ));
    }
    Ok(out.into_iter().map(|v| (v / total) as f32).collect())
}

/// Attention-sink patches of a grid: the patches whose value is more than `factor` times the
/// grid's median (a few high-norm patches often collect most of the image mass regardless of
/// content, typically hundreds of times the median patch; a genuinely attended object reaches
/// tens of times, hence the default factor of 50 in [`HeatmapOptions`]). When the median is 0 (a sparse grid), `factor` times the mean is used instead; a
/// grid with no positive mass has no sink. Returned as `(row, col)` in row-major order.
pub fn sink_patches(grid: &Array2<f32>, factor: f32) -> Vec<(usize, usize)> {
    let mut vals: Vec<f32> = grid.iter().copied().filter(|v| v.is_finite()).collect();
    if vals.is_empty() || !factor.is_finite() || factor <= 0.0 {
        return Vec::new();
    }
    vals.sort_by(|a, b| a.total_cmp(b));
    let m = vals.len();
    let median = if m % 2 == 1 {
        vals[m / 2]
    } else {
        0.5 * (vals[m / 2 - 1] + vals[m / 2])
    };
    let base = if median > 0.0 {
        median
    } else {
        vals.iter().sum::<f32>() / m as f32
    };
    if base <= 0.0 {
        return Vec::new();
    }
    let thr = factor * base;
    grid.indexed_iter()
        .filter(|(_, &v)| v > thr)
        .map(|(rc, _)| rc)
        .collect()
}

/// A colour map, implemented as a table of 11 evenly spaced stops with linear interpolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Colormap {
    /// Perceptually uniform, dark purple to yellow (matplotlib's viridis).
    Viridis,
    /// Perceptually uniform, black to pale yellow (matplotlib's inferno).
    Inferno,
    /// Diverging, blue (negative) through near-white (0) to red (positive) (ColorBrewer RdBu,
    /// reversed); used for differences with a range symmetric about 0.
    RdBu,
}

const VIRIDIS: [[u8; 3]; 11] = [
    [68, 1, 84],
    [72, 36, 117],
    [65, 68, 135],
    [53, 95, 141],
    [42, 120, 142],
    [33, 145, 140],
    [34, 168, 132],
    [68, 191, 112],
    [122, 209, 81],
    [189, 223, 38],
    [253, 231, 37],
];
const INFERNO: [[u8; 3]; 11] = [
    [0, 0, 4],
    [22, 11, 57],
    [66, 10, 104],
    [106, 23, 110],
    [147, 38, 103],
    [188, 55, 84],
    [221, 81, 58],
    [243, 120, 25],
    [252, 165, 10],
    [246, 215, 70],
    [252, 255, 164],
];
const RDBU: [[u8; 3]; 11] = [
    [5, 48, 97],
    [33, 102, 172],
    [67, 147, 195],
    [146, 197, 222],
    [209, 229, 240],
    [247, 247, 247],
    [253, 219, 199],
    [244, 165, 130],
    [214, 96, 77],
    [178, 24, 43],
    [103, 0, 31],
];

impl Colormap {
    /// Colour at `t` in `[0, 1]` (clamped; NaN maps to 0).
    pub fn map(self, t: f32) -> [u8; 3] {
        let table = match self {
            Colormap::Viridis => &VIRIDIS,
            Colormap::Inferno => &INFERNO,
            Colormap::RdBu => &RDBU,
        };
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let x = t * (table.len() - 1) as f32;
        let i = (x.floor() as usize).min(table.len() - 2);
        let f = x - i as f32;
        let mut out = [0u8; 3];
        for k in 0..3 {
            let a = table[i][k] as f32;
            let b = table[i + 1][k] as f32;
            out[k] = (a + (b - a) * f).round().clamp(0.0, 255.0) as u8;
        }
        out
    }

    /// Colour used to outline sink patches: one that the map itself does not use.
    pub fn outline(self) -> [u8; 3] {
        match self {
            Colormap::Viridis => [255, 40, 40],
            Colormap::Inferno => [0, 230, 255],
            Colormap::RdBu => [0, 0, 0],
        }
    }
}

/// How heatmaps are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeatmapOptions {
    /// Opacity of the colour layer over the image, in `[0, 1]`.
    pub alpha: f32,
    /// Compute the colour range without the sink patches (which would otherwise saturate the
    /// scale and leave the rest of the image in one colour); sinks then show at the top colour.
    pub exclude_sinks_from_scale: bool,
    /// The factor of [`sink_patches`] (default 50); `0` disables sink detection.
    pub sink_factor: f32,
    /// Colour map of attention panels (difference panels always use [`Colormap::RdBu`]).
    pub colormap: Colormap,
    /// Outline sink patches.
    pub outline_sinks: bool,
    /// Fixed colour range `(lo, hi)`; `None` takes the min and max of the values.
    pub range: Option<(f32, f32)>,
    /// Longest side of each panel in figures, in pixels.
    pub panel_px: u32,
    /// The maps are composed Q-Former maps ([`compose_qformer`]): figures say so under the title.
    pub composed_qformer: bool,
}

impl Default for HeatmapOptions {
    fn default() -> Self {
        HeatmapOptions {
            alpha: 0.6,
            exclude_sinks_from_scale: true,
            sink_factor: 50.0,
            colormap: Colormap::Viridis,
            outline_sinks: true,
            range: None,
            panel_px: 256,
            composed_qformer: false,
        }
    }
}

fn check_opts(opts: &HeatmapOptions) -> Result<()> {
    if !(0.0..=1.0).contains(&opts.alpha) {
        return Err(Error::input(format!(
            "heatmap: alpha {} is outside [0, 1]",
            opts.alpha
        )));
    }
    if let Some((lo, hi)) = opts.range {
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(Error::input(format!(
                "heatmap: colour range ({lo}, {hi}) must be finite with lo < hi"
            )));
        }
    }
    if opts.panel_px < 16 {
        return Err(Error::input(format!(
            "heatmap: panel_px {} is too small (at least 16)",
            opts.panel_px
        )));
    }
    Ok(())
}

fn check_grid(grid: &Array2<f32>, what: &str) -> Result<()> {
    if grid.is_empty() {
        return Err(Error::input(format!("{what}: the grid is empty")));
    }
    if let Some(((r, c), v)) = grid.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::input(format!(
            "{what}: grid value at ({r}, {c}) is {v}"
        )));
    }
    Ok(())
}

/// Min and max of the grids' values, sink patches left out when asked (falls back to all values
/// when every value is a sink). Equal ends are widened so the range is never empty.
/// A grid with its sink patches.
type GridSinks<'a> = (&'a Array2<f32>, &'a [(usize, usize)]);

fn value_range(grids: &[GridSinks], exclude_sinks: bool) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for (g, sinks) in grids {
        for ((r, c), &v) in g.indexed_iter() {
            if exclude_sinks && sinks.contains(&(r, c)) {
                continue;
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        for (g, _) in grids {
            for &v in g.iter() {
                lo = lo.min(v);
                hi = hi.max(v);
            }
        }
    }
    if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.5 };
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    }
}

/// Bilinear sample of the grid at pixel `(x, y)` of a `w x h` image (pixel centres, the grid's
/// values sit at patch centres; edges clamp).
fn sample_bilinear(grid: &Array2<f32>, x: u32, y: u32, w: u32, h: u32) -> f32 {
    let (rows, cols) = grid.dim();
    let gx = ((x as f32 + 0.5) * cols as f32 / w as f32 - 0.5).clamp(0.0, (cols - 1) as f32);
    let gy = ((y as f32 + 0.5) * rows as f32 / h as f32 - 0.5).clamp(0.0, (rows - 1) as f32);
    let (c0, r0) = (gx.floor() as usize, gy.floor() as usize);
    let (c1, r1) = ((c0 + 1).min(cols - 1), (r0 + 1).min(rows - 1));
    let (fx, fy) = (gx - c0 as f32, gy - r0 as f32);
    let top = grid[[r0, c0]] * (1.0 - fx) + grid[[r0, c1]] * fx;
    let bot = grid[[r1, c0]] * (1.0 - fx) + grid[[r1, c1]] * fx;
    top * (1.0 - fy) + bot * fy
}

/// The pixel rectangle `[x0, x1) x [y0, y1)` of patch `(r, c)` in a `w x h` image.
pub fn patch_rect(
    r: usize,
    c: usize,
    rows: usize,
    cols: usize,
    w: u32,
    h: u32,
) -> (u32, u32, u32, u32) {
    let x0 = (c as u64 * w as u64 / cols as u64) as u32;
    let x1 = ((c as u64 + 1) * w as u64 / cols as u64) as u32;
    let y0 = (r as u64 * h as u64 / rows as u64) as u32;
    let y1 = ((r as u64 + 1) * h as u64 / rows as u64) as u32;
    (x0, x1, y0, y1)
}

fn overlay_with(
    image: &RgbImage,
    grid: &Array2<f32>,
    alpha: f32,
    cmap: Colormap,
    (lo, hi): (f32, f32),
    outline: &[(usize, usize)],
) -> RgbImage {
    let (w, h) = image.dimensions();
    let mut out = image.clone();
    for (x, y, px) in out.enumerate_pixels_mut() {
        let v = sample_bilinear(grid, x, y, w, h);
        let col = cmap.map((v - lo) / (hi - lo));
        for (o, c) in px.0.iter_mut().zip(col) {
            *o = ((1.0 - alpha) * *o as f32 + alpha * c as f32).round() as u8;
        }
    }
    let (rows, cols) = grid.dim();
    let t = (w.min(h) / 150).max(1);
    let oc = image::Rgb(cmap.outline());
    for &(r, c) in outline {
        let (x0, x1, y0, y1) = patch_rect(r, c, rows, cols, w, h);
        for y in y0..y1 {
            for x in x0..x1 {
                if x < x0 + t || x + t >= x1 || y < y0 + t || y + t >= y1 {
                    out.put_pixel(x, y, oc);
                }
            }
        }
    }
    out
}

/// Overlay a patch grid on the image: the grid is upsampled bilinearly to the image size
/// (values at patch centres), mapped through the colour map over the range (`opts.range`, or
/// the grid's min..max, sink patches excluded when `opts.exclude_sinks_from_scale`), and
/// alpha-blended over the image; sink patches are outlined when `opts.outline_sinks`.
///
/// The image must be the model's view (after its resize / crop): the grid covers the whole
/// image passed. For a model that pads or crops, pass the padded or cropped picture.
pub fn overlay(image: &RgbImage, grid: &Array2<f32>, opts: &HeatmapOptions) -> Result<RgbImage> {
    check_opts(opts)?;
    check_grid(grid, "overlay")?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::input("overlay: the image is empty"));
    }
    let sinks = sink_patches(grid, opts.sink_factor);
    let range = opts
        .range
        .unwrap_or_else(|| value_range(&[(grid, &sinks)], opts.exclude_sinks_from_scale));
    let outline: &[(usize, usize)] = if opts.outline_sinks { &sinks } else { &[] };
    Ok(overlay_with(
        image,
        grid,
        opts.alpha,
        opts.colormap,
        range,
        outline,
    ))
}

/// Resize an image so its longer side is `px`, keeping the aspect ratio.
fn fit(image: &RgbImage, px: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let s = px as f32 / w.max(h) as f32;
    let nw = ((w as f32 * s).round() as u32).max(1);
    let nh = ((h as f32 * s).round() as u32).max(1);
    image::imageops::resize(image, nw, nh, image::imageops::FilterType::Triangle)
}

struct Bar {
    label: String,
    cmap: Colormap,
    lo: f32,
    hi: f32,
}

struct Panel {
    title: String,
    img: RgbImage,
    bar: usize,
}

struct Placed {
    x: i32,
    y: i32,
}

/// Where a colour bar goes: the bar, its rectangle, its number of ticks, whether to label it.
struct BarPlace {
    bar: usize,
    x: i32,
    y: i32,
    w: i32,
    h: i32,
    ticks: usize,
    labelled: bool,
}

/// Tick label of `v` on a bar whose largest magnitude is `scale` (one format per bar).
fn fmt_tick(v: f32, scale: f32) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !(0.1..1000.0).contains(&scale) {
        format!("{v:.2e}")
    } else if scale >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Text and vector parts of a heatmap figure (everything but the overlays, which are pasted in
/// afterwards so the PNG keeps their pixels exactly).
struct Frame<'a> {
    width: i32,
    title: &'a str,
    subtitle: Option<&'a str>,
    titles: Vec<(String, i32, i32)>,
    boxes: Vec<(i32, i32, i32, i32)>,
    bars: Vec<BarPlace>,
}

fn draw_frame<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    f: &Frame,
    bars: &[Bar],
) -> Result<()> {
    let e = draw_err::<DrawingAreaErrorKind<DB::ErrorType>>("heatmap figure");
    root.fill(&WHITE).map_err(&e)?;
    let center_top = Pos::new(HPos::Center, VPos::Top);
    root.draw(&Text::new(
        f.title.to_string(),
        (f.width / 2, 10),
        ("sans-serif", 20).into_font().color(&BLACK).pos(center_top),
    ))
    .map_err(&e)?;
    if let Some(s) = f.subtitle {
        root.draw(&Text::new(
            s.to_string(),
            (f.width / 2, 36),
            ("sans-serif", 14)
                .into_font()
                .color(&RGBColor(150, 40, 40))
                .pos(center_top),
        ))
        .map_err(&e)?;
    }
    for (t, x, y) in &f.titles {
        root.draw(&Text::new(
            t.clone(),
            (*x, *y),
            ("sans-serif", 15).into_font().color(&BLACK).pos(center_top),
        ))
        .map_err(&e)?;
    }
    for &(x, y, w, h) in &f.boxes {
        root.draw(&Rectangle::new(
            [(x - 1, y - 1), (x + w, y + h)],
            RGBColor(120, 120, 120).stroke_width(1),
        ))
        .map_err(&e)?;
    }
    for bp in &f.bars {
        draw_bar(root, &bars[bp.bar], bp)?;
    }
    root.present().map_err(&e)?;
    Ok(())
}

fn draw_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    b: &Bar,
    p: &BarPlace,
) -> Result<()> {
    let e = draw_err::<DrawingAreaErrorKind<DB::ErrorType>>("colour bar");
    let (x, y, w, h) = (p.x, p.y, p.w, p.h.max(20));
    if p.labelled && !b.label.is_empty() {
        root.draw(&Text::new(
            b.label.clone(),
            (x, y - 6),
            ("sans-serif", 12)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Bottom)),
        ))
        .map_err(&e)?;
    }
    for i in 0..h {
        let t = 1.0 - i as f32 / (h - 1) as f32;
        let [r, g, bl] = b.cmap.map(t);
        root.draw(&Rectangle::new(
            [(x, y + i), (x + w, y + i + 1)],
            RGBColor(r, g, bl).filled(),
        ))
        .map_err(&e)?;
    }
    root.draw(&Rectangle::new(
        [(x, y), (x + w, y + h)],
        RGBColor(90, 90, 90).stroke_width(1),
    ))
    .map_err(&e)?;
    let span = b.hi - b.lo;
    let scale = b.lo.abs().max(b.hi.abs());
    let ticks = p.ticks.max(2);
    for k in 0..ticks {
        let fr = k as f32 / (ticks - 1) as f32;
        let v = b.lo + fr * span;
        let yy = y + ((1.0 - fr) * (h - 1) as f32).round() as i32;
        root.draw(&PathElement::new(
            vec![(x + w, yy), (x + w + 4, yy)],
            RGBColor(90, 90, 90).stroke_width(1),
        ))
        .map_err(&e)?;
        root.draw(&Text::new(
            fmt_tick(v, scale),
            (x + w + 6, yy),
            ("sans-serif", 11)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(&e)?;
    }
    Ok(())
}

/// Lay out and render panels, each with a title, and colour bars: one per panel to its right
/// when `per_panel_bars`, otherwise all bars stacked in a column at the right of the figure.
fn render_figure(
    panels: &[Panel],
    bars: &[Bar],
    per_panel_bars: bool,
    ncols: usize,
    title: &str,
    subtitle: Option<&str>,
    out_stem: &Path,
) -> Result<Vec<PathBuf>> {
    let ncols = ncols.clamp(1, panels.len());
    let nrows = panels.len().div_ceil(ncols);
    let (margin, gap, ptitle) = (14i32, 16i32, 24i32);
    let head = if subtitle.is_some() { 60 } else { 40 };
    // Cells hug the largest panel, so wide or tall images leave no empty band.
    let pw = panels.iter().map(|p| p.img.width()).max().unwrap_or(1) as i32;
    let ph = panels.iter().map(|p| p.img.height()).max().unwrap_or(1) as i32;
    let mini = if per_panel_bars { 74 } else { 0 };
    let cell_w = pw.max(120) + mini;
    let cell_h = ptitle + ph;
    let column = if per_panel_bars { 0 } else { 120 };
    let grid_w = ncols as i32 * cell_w + (ncols as i32 - 1) * gap;
    let bars_h = if per_panel_bars {
        0
    } else {
        bars.len() as i32 * 110 + ptitle
    };
    let grid_h = (nrows as i32 * cell_h + (nrows as i32 - 1) * gap).max(bars_h);
    let width = (margin * 2 + grid_w + column).max(440);
    let height = head + grid_h + margin;
    let mut places = Vec::with_capacity(panels.len());
    let mut frame = Frame {
        width,
        title,
        subtitle,
        titles: Vec::new(),
        boxes: Vec::new(),
        bars: Vec::new(),
    };
    for (i, p) in panels.iter().enumerate() {
        let (r, c) = ((i / ncols) as i32, (i % ncols) as i32);
        let cx = margin + c * (cell_w + gap);
        let cy = head + r * (cell_h + gap);
        let (w, h) = (p.img.width() as i32, p.img.height() as i32);
        let pl = Placed {
            x: cx + (pw - w) / 2,
            y: cy + ptitle + (ph - h) / 2,
        };
        frame.titles.push((p.title.clone(), cx + pw / 2, cy + 2));
        frame.boxes.push((pl.x, pl.y, w, h));
        if per_panel_bars {
            frame.bars.push(BarPlace {
                bar: p.bar,
                x: cx + pw + 8,
                y: cy + ptitle + 6,
                w: 12,
                h: ph - 12,
                ticks: 3,
                labelled: false,
            });
        }
        places.push(pl);
    }
    if !per_panel_bars {
        let x = margin + grid_w + 18;
        let top = head + ptitle;
        let total = grid_h - ptitle;
        let each = total / bars.len().max(1) as i32;
        for k in 0..bars.len() {
            frame.bars.push(BarPlace {
                bar: k,
                x,
                y: top + k as i32 * each + 18,
                w: 16,
                h: each - 26,
                ticks: 5,
                labelled: true,
            });
        }
    }

    crate::plots::ensure_font();
    let (wu, hu) = (width as u32, height as u32);
    let mut buf = vec![0u8; (wu * hu * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (wu, hu)).into_drawing_area();
        draw_frame(&root, &frame, bars)?;
    }
    let mut canvas = RgbImage::from_raw(wu, hu, buf)
        .ok_or_else(|| Error::msg("heatmap figure: bitmap buffer of the wrong size"))?;
    for (p, pl) in panels.iter().zip(&places) {
        image::imageops::replace(&mut canvas, &p.img, pl.x as i64, pl.y as i64);
    }
    let png = with_suffix(out_stem, ".png");
    write_atomic(&png, &encode_png(&canvas)?)?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (wu, hu)).into_drawing_area();
        draw_frame(&root, &frame, bars)?;
    }
    let mut images = String::new();
    for (p, pl) in panels.iter().zip(&places) {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(encode_png(&p.img)?);
        let _ = writeln!(
            images,
            r#"<image x="{}" y="{}" width="{}" height="{}" href="data:image/png;base64,{data}"/>"#,
            pl.x,
            pl.y,
            p.img.width(),
            p.img.height()
        );
    }
    let Some(end) = svg.rfind("</svg>") else {
        return Err(Error::msg(
            "heatmap figure: the SVG backend wrote no closing tag",
        ));
    };
    svg.insert_str(end, &images);
    let svg_path = with_suffix(out_stem, ".svg");
    write_atomic(&svg_path, svg.as_bytes())?;
    Ok(vec![png, svg_path])
}

const COMPOSED_NOTE: &str =
    "composed map: decision -> Q-Former queries x queries -> patches (not an attention the model computed)";

/// A grid of overlays (e.g. one per layer, or per layer range, or per condition) with a title per
/// panel and a colour bar with tick labels. `panels` are `(title, image as the model saw it,
/// grid)`. With `shared_scale` all panels use one colour range (from `opts.range`, or the min and
/// max over all panels, sinks excluded when asked) and one bar at the right; otherwise each panel
/// has its own range and bar. When `opts.composed_qformer`, a line under the title says the maps
/// are composed. Writes `<stem>.png` and `<stem>.svg` (overlays embedded as PNG).
pub fn heatmap_figure(
    panels: &[(String, RgbImage, Array2<f32>)],
    ncols: usize,
    title: &str,
    shared_scale: bool,
    opts: &HeatmapOptions,
    out_stem: &Path,
) -> Result<Vec<PathBuf>> {
    check_opts(opts)?;
    if panels.is_empty() {
        return Err(Error::input("heatmap figure: no panel"));
    }
    if ncols == 0 {
        return Err(Error::input("heatmap figure: ncols must be at least 1"));
    }
    let mut sinks = Vec::with_capacity(panels.len());
    for (t, img, g) in panels {
        check_grid(g, &format!("heatmap panel '{t}'"))?;
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::input(format!(
                "heatmap panel '{t}': the image is empty"
            )));
        }
        sinks.push(sink_patches(g, opts.sink_factor));
    }
    let mut bars = Vec::new();
    let mut out = Vec::with_capacity(panels.len());
    if shared_scale {
        let all: Vec<_> = panels
            .iter()
            .zip(&sinks)
            .map(|((_, _, g), s)| (g, s.as_slice()))
            .collect();
        let (lo, hi) = opts
            .range
            .unwrap_or_else(|| value_range(&all, opts.exclude_sinks_from_scale));
        bars.push(Bar {
            label: "attention".into(),
            cmap: opts.colormap,
            lo,
            hi,
        });
    }
    for (i, ((t, img, g), s)) in panels.iter().zip(&sinks).enumerate() {
        let bar = if shared_scale {
            0
        } else {
            let (lo, hi) = opts
                .range
                .unwrap_or_else(|| value_range(&[(g, s)], opts.exclude_sinks_from_scale));
            bars.push(Bar {
                label: String::new(),
                cmap: opts.colormap,
                lo,
                hi,
            });
            i
        };
        let b = &bars[bar];
        let outline: &[(usize, usize)] = if opts.outline_sinks { s } else { &[] };
        let view = fit(img, opts.panel_px);
        out.push(Panel {
            title: t.clone(),
            img: overlay_with(&view, g, opts.alpha, opts.colormap, (b.lo, b.hi), outline),
            bar,
        });
    }
    let sub = opts.composed_qformer.then_some(COMPOSED_NOTE);
    render_figure(&out, &bars, !shared_scale, ncols, title, sub, out_stem)
}

/// Neutral vs pressured side by side, plus their difference: three panels, `neutral` and
/// `pressured` on one shared sequential scale, then `pressured - neutral` on the diverging
/// [`Colormap::RdBu`] over a range symmetric about 0 (±max |difference|, sink patches of either
/// map excluded when `opts.exclude_sinks_from_scale`). The grids are compared as given (raw
/// attention mass per patch); normalise them first to compare where rather than how much.
/// `labels` name the two conditions in the panel titles. Writes `<stem>.png` and `<stem>.svg`.
pub fn difference_figure(
    image: &RgbImage,
    neutral: &Array2<f32>,
    pressured: &Array2<f32>,
    labels: (&str, &str),
    title: &str,
    opts: &HeatmapOptions,
    out_stem: &Path,
) -> Result<Vec<PathBuf>> {
    check_opts(opts)?;
    check_grid(neutral, "difference figure (neutral)")?;
    check_grid(pressured, "difference figure (pressured)")?;
    if neutral.dim() != pressured.dim() {
        return Err(Error::input(format!(
            "difference figure: grids of different shapes {:?} and {:?}",
            neutral.dim(),
            pressured.dim()
        )));
    }
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::input("difference figure: the image is empty"));
    }
    let sn = sink_patches(neutral, opts.sink_factor);
    let sp = sink_patches(pressured, opts.sink_factor);
    let (lo, hi) = opts.range.unwrap_or_else(|| {
        value_range(
            &[(neutral, sn.as_slice()), (pressured, sp.as_slice())],
            opts.exclude_sinks_from_scale,
        )
    });
    let diff = pressured - neutral;
    let mut union = sn.clone();
    union.extend(sp.iter().filter(|p| !sn.contains(p)));
    let m = diff
        .indexed_iter()
        .filter(|(rc, _)| !(opts.exclude_sinks_from_scale && union.contains(rc)))
        .fold(0f32, |m, (_, v)| m.max(v.abs()));
    let m = if m > 0.0 {
        m
    } else {
        diff.iter().fold(0f32, |m, v| m.max(v.abs()))
    };
    let m = if m > 0.0 { m } else { 1.0 };
    let view = fit(image, opts.panel_px);
    let ol = |s: &[(usize, usize)]| -> Vec<(usize, usize)> {
        if opts.outline_sinks {
            s.to_vec()
        } else {
            Vec::new()
        }
    };
    let panels = vec![
        Panel {
            title: labels.0.to_string(),
            img: overlay_with(
                &view,
                neutral,
                opts.alpha,
                opts.colormap,
                (lo, hi),
                &ol(&sn),
            ),
            bar: 0,
        },
        Panel {
            title: labels.1.to_string(),
            img: overlay_with(
                &view,
                pressured,
                opts.alpha,
                opts.colormap,
                (lo, hi),
                &ol(&sp),
            ),
            bar: 0,
        },
        Panel {
            title: format!("{} - {}", labels.1, labels.0),
            img: overlay_with(
                &view,
                &diff,
                opts.alpha.max(0.7),
                Colormap::RdBu,
                (-m, m),
                &[],
            ),
            bar: 1,
        },
    ];
    let bars = vec![
        Bar {
            label: "attention".into(),
            cmap: opts.colormap,
            lo,
            hi,
        },
        Bar {
            label: "difference".into(),
            cmap: Colormap::RdBu,
            lo: -m,
            hi: m,
        },
    ];
    let sub = opts.composed_qformer.then_some(COMPOSED_NOTE);
    render_figure(&panels, &bars, false, 3, title, sub, out_stem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::MessageSpan;
    use ndarray::{array, Array3};

    /// 10 tokens: BOS 0, user question 1..7 holding the 2x2 image at 2..6, assistant answer
    /// 7..8, user pushback 8..10; the decision row is at 9.
    fn spans10() -> Spans {
        Spans {
            pad: 0,
            len: 10,
            messages: vec![
                MessageSpan {
                    role: "user".into(),
                    index: 0,
                    start: 1,
                    end: 7,
                },
                MessageSpan {
                    role: "assistant".into(),
                    index: 1,
                    start: 7,
                    end: 8,
                },
                MessageSpan {
                    role: "user".into(),
                    index: 2,
                    start: 8,
                    end: 10,
                },
            ],
            images: vec![ImageSpan {
                index: 0,
                start: 2,
                end: 6,
                rows: 2,
                cols: 2,
            }],
        }
    }

    const ROW: [f32; 10] = [0.3, 0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.1, 0.05];

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn regions_follow_the_documented_rule() {
        use Region::*;
        let r = key_regions(&spans10(), 9).unwrap();
        assert_eq!(
            r,
            vec![Sink, Text, Image, Image, Image, Image, Text, Text, Pressure, Pressure]
        );
        // A single-turn conversation has no pressure region.
        let mut s = spans10();
        s.messages.truncate(1);
        let r = key_regions(&s, 9).unwrap();
        assert!(!r.contains(&Pressure));
        // BLIP-2 layout: image tokens first, the sink is the first non-image token.
        let s = Spans {
            pad: 0,
            len: 6,
            messages: vec![],
            images: vec![ImageSpan {
                index: 0,
                start: 0,
                end: 3,
                rows: 2,
                cols: 2,
            }],
        };
        assert_eq!(
            key_regions(&s, 5).unwrap(),
            vec![Image, Image, Image, Sink, Text, Text]
        );
    }

    #[test]
    fn region_shares_known_numbers() {
        let s = region_shares(&ROW, &spans10(), 9).unwrap();
        assert!(close(s.image, 0.4), "{s:?}");
        assert!(close(s.sink, 0.3));
        assert!(close(s.pressure, 0.15));
        assert!(close(s.text, 0.15));
        assert!(close(s.image + s.text + s.pressure + s.sink, 1.0));
        // ratio = image / (text + pressure), sink excluded
        assert!(close(s.ratio(), 0.4 / 0.3));
        // A row at query 7 over keys 0..=7 (pressure turn not yet visible), renormalised.
        let row7 = [0.2f32, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2];
        let s7 = region_shares(&row7, &spans10(), 7).unwrap();
        assert!(close(s7.image, 0.4) && close(s7.pressure, 0.0) && close(s7.text, 0.4));
        assert!(close(s7.ratio(), 1.0));
        // A full-length row with zeros after the query is accepted.
        let mut full = row7.to_vec();
        full.extend([0.0, 0.0]);
        assert_eq!(region_shares(&full, &spans10(), 7).unwrap(), s7);
    }

    #[test]
    fn ratio_zero_text_is_nan() {
        let s = RegionShares {
            image: 0.5,
            text: 0.0,
            pressure: 0.0,
            sink: 0.5,
        };
        assert!(s.ratio().is_nan());
        let s = RegionShares {
            image: 0.2,
            text: 0.1,
            pressure: 0.3,
            sink: 0.4,
        };
        assert!(close(s.ratio(), 0.5));
    }

    #[test]
    fn region_shares_errors() {
        let sp = spans10();
        let e = region_shares(&ROW[..8], &sp, 9).unwrap_err().to_string();
        assert!(e.contains("8 entries") && e.contains("needs 10"), "{e}");
        assert!(region_shares(&ROW, &sp, 10).is_err()); // query outside the sequence
        let mut bad = ROW;
        bad[3] = f32::NAN;
        assert!(region_shares(&bad, &sp, 9)
            .unwrap_err()
            .to_string()
            .contains("entry 3"));
        let scores = [1.0f32; 10];
        assert!(region_shares(&scores, &sp, 9)
            .unwrap_err()
            .to_string()
            .contains("sums to"));
        let mut noimg = sp.clone();
        noimg.images.clear();
        assert!(region_shares(&ROW, &noimg, 9)
            .unwrap_err()
            .to_string()
            .contains("no image"));
        // Non-causal mass after the query.
        let mut full = [0.2f32, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0].to_vec();
        full[9] = 0.1;
        assert!(region_shares(&full, &sp, 7)
            .unwrap_err()
            .to_string()
            .contains("causal"));
        // The image only after the query.
        assert!(region_shares(&[0.5, 0.5], &sp, 1)
            .unwrap_err()
            .to_string()
            .contains("no image token"));
    }

    #[test]
    fn reliance_features_pool_heads() {
        let sp = spans10();
        let mut rows = Array3::<f32>::zeros((2, 1, 10));
        for (k, v) in ROW.iter().enumerate() {
            rows[[0, 0, k]] = *v;
        }
        // head 1: everything on the sink and one text token
        rows[[1, 0, 0]] = 0.9;
        rows[[1, 0, 1]] = 0.1;
        let f = reliance_features(rows.view(), &sp, 9).unwrap();
        assert_eq!(f.dim(), (3, 5));
        assert!(close(f[[0, 0]], 0.4) && close(f[[0, 4]], 0.4 / 0.3));
        assert!(close(f[[1, 0]], 0.0) && close(f[[1, 3]], 0.9) && close(f[[1, 4]], 0.0));
        // pooled: mean shares, ratio of means
        assert!(close(f[[2, 0]], 0.2) && close(f[[2, 1]], 0.125) && close(f[[2, 2]], 0.075));
        assert!(close(f[[2, 3]], 0.6));
        assert!(close(f[[2, 4]], 0.2 / 0.2));
        let bad = Array3::<f32>::zeros((2, 2, 10));
        assert!(reliance_features(bad.view(), &sp, 9).is_err());
        let e = reliance_features(Array3::<f32>::zeros((2, 1, 10)).view(), &sp, 9).unwrap_err();
        assert!(e.to_string().starts_with("head 0"), "{e}");
    }

    #[test]
    fn curves_mean_and_interval() {
        assert!((t975(3) - 3.182).abs() < 1e-9);
        assert!((t975(40) - 2.021).abs() < 1e-3);
        assert!((t975(10_000) - 1.960).abs() < 1e-3);
        // layer 3: neutral image shares 1,2,3,4 ; tone 0.5,0.5 ; layer 1 given first
        let l3 = array![
            [0.5f32, 0.0, 0.0, 0.0, 0.5],
            [1.0, 0.0, 0.0, 0.0, 1.0],
            [2.0, 0.0, 0.0, 0.0, f32::NAN],
            [0.5, 0.0, 0.0, 0.0, 0.5],
            [3.0, 0.0, 0.0, 0.0, 3.0],
            [4.0, 0.0, 0.0, 0.0, 4.0],
        ];
        let l1 = Array2::<f32>::from_elem((6, 5), 0.25);
        let conds: Vec<String> = [
            "polite", "neutral", "neutral", "polite", "neutral", "neutral",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let curves =
            reliance_curves(&[(3, l3.view()), (1, l1.view())], &conds, "image_share").unwrap();
        assert_eq!(curves.len(), 2);
        let n = &curves[0];
        assert_eq!((n.condition.as_str(), n.n), ("neutral", 4));
        assert_eq!(n.layers, vec![1, 3]);
        assert!((n.mean[1] - 2.5).abs() < 1e-9);
        let half = 3.182 * (1.6666666666666667f64 / 4.0).sqrt();
        assert!((n.lo[1] - (2.5 - half)).abs() < 1e-6 && (n.hi[1] - (2.5 + half)).abs() < 1e-6);
        assert!((n.mean[0] - 0.25).abs() < 1e-7 && (n.hi[0] - 0.25).abs() < 1e-7);
        let p = &curves[1];
        assert_eq!(p.condition, "polite");
        assert!((p.mean[1] - 0.5).abs() < 1e-9 && (p.lo[1] - 0.5).abs() < 1e-9);
        // ratio: the NaN is skipped and counted
        let r = reliance_curves(&[(3, l3.view())], &conds, "ratio").unwrap();
        assert_eq!(r[0].counts, vec![3]);
        assert!((r[0].mean[0] - 8.0 / 3.0).abs() < 1e-6);
        // errors
        assert!(reliance_curves(&[(3, l3.view())], &conds, "bogus").is_err());
        assert!(reliance_curves(&[(3, l3.view())], &conds[..5], "ratio").is_err());
        assert!(reliance_curves(&[(3, l3.view()), (3, l3.view())], &conds, "ratio").is_err());
        let mut nan = l3.clone();
        nan[[0, 0]] = f32::NAN;
        let e = reliance_curves(&[(3, nan.view())], &conds, "image_share").unwrap_err();
        assert!(e.to_string().contains("layer 3, row 0"), "{e}");
    }

    fn demo_curves() -> Vec<RelianceCurve> {
        let layers: Vec<usize> = (0..32).collect();
        let mk = |name: &str, base: f64, slope: f64| {
            let mean: Vec<f64> = layers
                .iter()
                .map(|&l| base + slope * (l as f64 / 31.0) + 0.02 * ((l as f64) * 0.7).sin())
                .collect();
            RelianceCurve {
                condition: name.to_string(),
                layers: layers.clone(),
                lo: mean.iter().map(|m| m - 0.02).collect(),
                hi: mean.iter().map(|m| m + 0.02).collect(),
                mean,
                n: 120,
                counts: vec![120; 32],
                metric: "image_share".into(),
            }
        };
        vec![
            mk("neutral", 0.10, 0.15),
            mk("suggestive, \"mild\"", 0.10, 0.08),
            mk("euphemistic", 0.09, 0.05),
            mk("strong", 0.08, 0.02),
        ]
    }

    #[test]
    fn curves_save_load_draw() {
        let dir = tempfile::tempdir().unwrap();
        let curves = demo_curves();
        let stem = dir.path().join("reliance.image_share");
        let paths = save_curves(&curves, &stem).unwrap();
        assert!(paths[0].ends_with("reliance.image_share.csv"));
        let same = |a: &[RelianceCurve], b: &[RelianceCurve]| {
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(b) {
                assert_eq!(
                    (&a.condition, &a.metric, a.n),
                    (&b.condition, &b.metric, b.n)
                );
                assert_eq!((&a.layers, &a.counts), (&b.layers, &b.counts));
                for (x, y) in [(&a.mean, &b.mean), (&a.lo, &b.lo), (&a.hi, &b.hi)] {
                    assert!(x.iter().zip(y).all(|(x, y)| (x - y).abs() < 1e-12));
                }
            }
        };
        same(&load_curves(&paths[1]).unwrap(), &curves);
        let from_csv = load_curves(&paths[0]).unwrap();
        assert_eq!(from_csv[1].condition, "suggestive, \"mild\"");
        same(&from_csv, &curves);
        std::fs::write(dir.path().join("bad.csv"), "nope\n").unwrap();
        assert!(load_curves(&dir.path().join("bad.csv")).is_err());
        assert!(load_curves(&dir.path().join("missing.json")).is_err());

        let out =
            draw_reliance_curves(&curves, "Attention on the image, LLaVA-1.5-7B", &stem).unwrap();
        let img = image::open(&out[0]).unwrap();
        assert_eq!((img.width(), img.height()), (1000, 600));
        let svg = std::fs::read_to_string(&out[1]).unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("decoder layer")
                && svg.contains("neutral (n=120)")
        );
        if let Ok(d) = std::env::var("SYCOSCOPE_FIG_DIR") {
            draw_reliance_curves(
                &curves,
                "Attention on the image, LLaVA-1.5-7B",
                &Path::new(&d).join("reliance"),
            )
            .unwrap();
        }
    }

    #[test]
    fn image_grid_is_row_major() {
        let sp = ImageSpan {
            index: 0,
            start: 2,
            end: 8,
            rows: 2,
            cols: 3,
        };
        let row: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let g = image_grid(&row, &sp).unwrap();
        assert_eq!(g, array![[2.0f32, 3.0, 4.0], [5.0, 6.0, 7.0]]);
        assert!(image_grid(&row[..7], &sp).is_err());
        let q = ImageSpan {
            index: 0,
            start: 2,
            end: 6,
            rows: 2,
            cols: 3,
        };
        assert!(image_grid(&row, &q)
            .unwrap_err()
            .to_string()
            .contains("compose_qformer"));
    }

    /// Attention on one patch (r, c) lights that patch's rectangle of the overlay.
    #[test]
    fn overlay_lights_the_right_patch() {
        let (rows, cols) = (3usize, 4usize);
        let (w, h) = (120u32, 60u32); // non-square: catches a rows/cols swap
        let base = RgbImage::from_pixel(w, h, image::Rgb([0, 0, 0]));
        let opts = HeatmapOptions {
            alpha: 1.0,
            outline_sinks: false,
            sink_factor: 0.0,
            ..Default::default()
        };
        for (r, c) in [(0, 3), (2, 1), (1, 0)] {
            let mut vals = vec![0.01f32; rows * cols];
            vals[r * cols + c] = 0.9;
            let g = grid_from_values(&vals, rows, cols).unwrap();
            let out = overlay(&base, &g, &opts).unwrap();
            let lum = |p: &image::Rgb<u8>| p.0[0] as u32 * 3 + p.0[1] as u32 * 6 + p.0[2] as u32;
            let (bx, by, _) = out
                .enumerate_pixels()
                .map(|(x, y, p)| (x, y, lum(p)))
                .max_by_key(|t| t.2)
                .unwrap();
            let (x0, x1, y0, y1) = patch_rect(r, c, rows, cols, w, h);
            assert!(
                bx >= x0 && bx < x1 && by >= y0 && by < y1,
                "patch ({r},{c}): brightest at ({bx},{by})"
            );
            // the patch centre shows the top colour, a far corner the bottom colour
            let centre = out.get_pixel((x0 + x1) / 2, (y0 + y1) / 2);
            assert!(lum(centre) > 1800, "{centre:?}");
            let far = out.get_pixel(if c < 2 { w - 1 } else { 0 }, if r < 1 { h - 1 } else { 0 });
            assert_eq!(far.0, Colormap::Viridis.map(0.0));
        }
        // alpha 0 leaves the image untouched
        let g = grid_from_values(&[1.0, 2.0, 3.0, 4.0], 2, 2).unwrap();
        let img = RgbImage::from_fn(10, 10, |x, y| image::Rgb([x as u8 * 20, y as u8 * 20, 7]));
        let o = overlay(
            &img,
            &g,
            &HeatmapOptions {
                alpha: 0.0,
                outline_sinks: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(o, img);
        assert!(overlay(
            &img,
            &g,
            &HeatmapOptions {
                alpha: 1.5,
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn sinks_are_found_and_outlined() {
        let mut g = Array2::<f32>::from_elem((6, 6), 0.01);
        g[[1, 4]] = 0.8; // 80x the median
        g[[2, 2]] = 0.02; // 2x the median: not a sink
        assert_eq!(sink_patches(&g, 10.0), vec![(1, 4)]);
        assert!(sink_patches(&g, 100.0).is_empty());
        // sparse grid: median 0, the mean rule applies
        let mut s = Array2::<f32>::zeros((4, 4));
        s[[3, 0]] = 1.0;
        s[[0, 0]] = 0.01;
        assert_eq!(sink_patches(&s, 10.0), vec![(3, 0)]);
        assert!(sink_patches(&Array2::<f32>::zeros((2, 2)), 10.0).is_empty());
        // outline drawn on the sink's border; scale excludes the sink
        let base = RgbImage::from_pixel(60, 60, image::Rgb([128, 128, 128]));
        let out = overlay(
            &base,
            &g,
            &HeatmapOptions {
                alpha: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        let (x0, _, y0, _) = patch_rect(1, 4, 6, 6, 60, 60);
        assert_eq!(out.get_pixel(x0, y0 + 3).0, Colormap::Viridis.outline());
        // with the sink excluded, the 0.02 patch reaches the top of the scale
        let p = out.get_pixel(25, 25); // centre of patch (2, 2)
        assert!(p.0[0] > 150 && p.0[1] > 200, "{p:?}"); // t ~ 0.9 (bilinear between patch centres): yellow-green
        let incl = HeatmapOptions {
            alpha: 1.0,
            exclude_sinks_from_scale: false,
            ..Default::default()
        };
        let out2 = overlay(&base, &g, &incl).unwrap();
        assert!(out2.get_pixel(25, 25).0[0] < 100); // dark: the sink takes the scale
    }

    #[test]
    fn compose_qformer_known_case() {
        // 2 queries, 3 patches
        let c = array![[1.0f32, 0.0, 0.0], [0.0, 0.5, 0.5]];
        let v = compose_qformer(&[0.25, 0.75], c.view()).unwrap();
        let want = [0.25f32, 0.375, 0.375];
        assert!(v.iter().zip(want).all(|(a, b)| close(*a, b)), "{v:?}");
        // un-normalised decision weights (the decision row also looks at text): normalised out
        let v2 = compose_qformer(&[0.05, 0.15], c.view()).unwrap();
        assert!(v2.iter().zip(want).all(|(a, b)| close(*a, b)));
        assert!(compose_qformer(&[0.5], c.view()).is_err());
        assert!(compose_qformer(&[0.0, 0.0], c.view()).is_err());
        assert!(compose_qformer(&[f32::NAN, 0.5], c.view()).is_err());
    }

    #[test]
    fn colormaps_interpolate() {
        assert_eq!(Colormap::Viridis.map(0.0), [68, 1, 84]);
        assert_eq!(Colormap::Viridis.map(1.0), [253, 231, 37]);
        assert_eq!(Colormap::Viridis.map(0.05), [70, 19, 101]);
        assert_eq!(Colormap::RdBu.map(0.5), [247, 247, 247]);
        assert_eq!(Colormap::Inferno.map(2.0), Colormap::Inferno.map(1.0));
        assert_eq!(Colormap::Inferno.map(f32::NAN), [0, 0, 4]);
    }

    fn demo_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let cx = x as f32 - w as f32 * 0.6;
            let cy = y as f32 - h as f32 * 0.45;
            if cx * cx + cy * cy < (w.min(h) as f32 * 0.2).powi(2) {
                image::Rgb([200, 60, 50])
            } else {
                image::Rgb([(90 + x * 100 / w) as u8, (140 + y * 60 / h) as u8, 200])
            }
        })
    }

    fn demo_grid(n: usize, shift: f32) -> Array2<f32> {
        let mut g = Array2::<f32>::from_shape_fn((n, n), |(r, c)| {
            let dx = c as f32 - n as f32 * (0.6 + shift) + 0.5;
            let dy = r as f32 - n as f32 * 0.45 + 0.5;
            0.0005 + 0.01 * (-(dx * dx + dy * dy) / 6.0).exp()
        });
        g[[0, n - 1]] = 0.2; // a planted sink
        g
    }

    #[test]
    fn figures_are_written_and_decode() {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = std::env::var("SYCOSCOPE_FIG_DIR")
            .map(PathBuf::from)
            .unwrap_or(dir.path().to_path_buf());
        let img = demo_image(336, 336);
        let panels: Vec<(String, RgbImage, Array2<f32>)> = (0..4)
            .map(|k| {
                (
                    format!("layers {}-{}", k * 8, k * 8 + 7),
                    img.clone(),
                    demo_grid(24, 0.05 * k as f32),
                )
            })
            .collect();
        let opts = HeatmapOptions::default();
        let p = heatmap_figure(
            &panels,
            2,
            "Decision-token attention on the image",
            true,
            &opts,
            &out_dir.join("heat_shared"),
        )
        .unwrap();
        let png = image::open(&p[0]).unwrap();
        assert!(png.width() > 2 * 256 && png.height() > 2 * 256);
        let svg = std::fs::read_to_string(&p[1]).unwrap();
        assert_eq!(svg.matches("<image ").count(), 4);
        assert!(svg.contains("layers 0-7") && svg.trim_end().ends_with("</svg>"));

        let q = HeatmapOptions {
            composed_qformer: true,
            colormap: Colormap::Inferno,
            ..Default::default()
        };
        let p = heatmap_figure(
            &panels[..3],
            3,
            "BLIP-2, per layer",
            false,
            &q,
            &out_dir.join("heat_own"),
        )
        .unwrap();
        assert!(image::open(&p[0]).is_ok());
        assert!(std::fs::read_to_string(&p[1])
            .unwrap()
            .contains("composed map"));

        let wide = demo_image(400, 250);
        let p = difference_figure(
            &wide,
            &demo_grid(12, 0.0),
            &demo_grid(12, -0.3),
            ("neutral", "strong"),
            "Example 17, layer 20",
            &opts,
            &out_dir.join("diff"),
        )
        .unwrap();
        let d = image::open(&p[0]).unwrap();
        assert!(d.width() >= 3 * 256);
        assert!(std::fs::read_to_string(&p[1])
            .unwrap()
            .contains("strong - neutral"));
        // errors
        assert!(heatmap_figure(&[], 2, "t", true, &opts, &out_dir.join("x")).is_err());
        assert!(difference_figure(
            &wide,
            &demo_grid(12, 0.0),
            &demo_grid(10, 0.0),
            ("a", "b"),
            "t",
            &opts,
            &out_dir.join("x")
        )
        .is_err());
    }
}
