//! Run-level analyses and the one-command experiment: probes over a run's store, attention
//! reliance and heatmaps from a run, the amplification sweep, and `sycoscope run SPEC.toml`
//! (data -> eval + capture -> probes -> attention -> figures).
//!
//! Analyses read the run directory only (never the model), so they can be rerun and shared
//! without a GPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, Axis};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::probes::{ProbeConfig, ProbeCurve};
use crate::protocol::runner::{self, RunManifest};
use crate::store::{IndexRow, StoreReader};

/// Read a run's manifest.
pub fn read_manifest(run: &Path) -> Result<RunManifest> {
    let p = run.join("manifest.json");
    if !p.exists() {
        return Err(Error::input(format!(
            "{}: not a sycoscope run (no manifest.json); make one with `sycoscope eval`",
            run.display()
        )));
    }
    serde_json::from_str(&crate::error::read_to_string(&p)?)
        .map_err(|e| Error::config(&p, format!("not a sycoscope run manifest: {e}")))
}

/// Open a run's store and check it belongs to the run (same model weights and data).
pub fn open_store(run: &Path) -> Result<StoreReader> {
    let m = read_manifest(run)?;
    let sdir = run.join("store");
    if !sdir.join("index.jsonl").exists() && !sdir.join("manifest.json").exists() {
        return Err(Error::input(format!(
            "{}: the run has no activation store; rerun eval with --capture default",
            run.display()
        )));
    }
    let r = StoreReader::open(&sdir)?;
    let sm = r.manifest();
    if sm.weights_hash != m.weights_hash || sm.data_hash != m.data_hash {
        return Err(Error::input(format!(
            "{}: the store was written by another model or data (store weights {} / data {}, run weights {} / data {})",
            run.display(),
            sm.weights_hash,
            sm.data_hash,
            m.weights_hash,
            m.data_hash
        )));
    }
    Ok(r)
}

/// Which rows a label applies to, and the binary label of each.
///
/// - `sycophantic` (default): round-2 rows of the sycophancy branch; 1 = gave in.
/// - `r1_correct`: round-1 rows; 1 = answered correctly.
/// - `flipped`: every round-2 row; 1 = changed its answer as pushed/corrected.
/// - `tone:<t>`: round-2 rows; 1 = that tone (one vs rest).
/// - `task:<t>`: round-1 rows; 1 = that task (one vs rest).
pub fn label_rows(index: &[IndexRow], label: &str) -> Result<(Vec<usize>, Vec<bool>)> {
    let mut rows = Vec::new();
    let mut y = Vec::new();
    for (i, r) in index.iter().enumerate() {
        let m = &r.meta;
        let v = match label {
            "sycophantic" => m.labels.get("sycophantic").map(|v| *v > 0.5),
            "r1_correct" if m.condition == "r1" => m.labels.get("r1_correct").map(|v| *v > 0.5),
            "r1_correct" => None,
            "flipped" => m.labels.get("flipped").map(|v| *v > 0.5),
            l if l.starts_with("tone:") => m.tone.as_ref().map(|t| t == &l[5..]),
            l if l.starts_with("task:") => {
                if m.condition == "r1" {
                    Some(m.task == l[5..])
                } else {
                    None
                }
            }
            other => {
                return Err(Error::input(format!(
                    "unknown label '{other}': expected sycophantic, r1_correct, flipped, tone:<tone> or task:<task>"
                )))
            }
        };
        if let Some(v) = v {
            rows.push(i);
            y.push(v);
        }
    }
    if rows.is_empty() {
        return Err(Error::input(format!(
            "label '{label}': no row of the store carries it"
        )));
    }
    Ok((rows, y))
}

/// Layer number of a stored hook name (`blocks.{i}.…`).
pub fn layer_of(hook: &str) -> Option<usize> {
    hook.strip_prefix("blocks.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Fit the layer-wise probe curve for `label` on the store hooks matching `hook_glob`, and write
/// `RUN/probes/<label>/` (curve.csv, curve.json, weights.safetensors, curve.png/svg).
pub fn probe_run(
    run: &Path,
    hook_glob: &str,
    label: &str,
    cfg: &ProbeConfig,
) -> Result<ProbeCurve> {
    let store = open_store(run)?;
    let pat = glob::Pattern::new(hook_glob)
        .map_err(|e| Error::input(format!("bad hook glob '{hook_glob}': {e}")))?;
    let mut hooks: Vec<(usize, String)> = store
        .hooks()
        .into_iter()
        .filter(|h| pat.matches(h))
        .filter_map(|h| layer_of(&h).map(|l| (l, h)))
        .collect();
    hooks.sort();
    if hooks.is_empty() {
        return Err(Error::input(format!(
            "no stored hook matches '{hook_glob}' (stored: {})",
            store.hooks().join(", ")
        )));
    }
    let (rows, y) = label_rows(store.index(), label)?;
    let mut feats: Vec<(usize, Array2<f32>)> = Vec::with_capacity(hooks.len());
    for (l, h) in &hooks {
        let a = store.read_rows(h, &rows)?;
        let n = a.shape()[0];
        let d: usize = a.shape()[1..].iter().product();
        let a2 = a
            .into_shape_with_order((n, d))
            .map_err(|e| Error::msg(format!("{h}: {e}")))?;
        feats.push((*l, a2));
    }
    let views: Vec<(usize, ndarray::ArrayView2<f32>)> =
        feats.iter().map(|(l, a)| (*l, a.view())).collect();
    let (curve, weights) = crate::probes::fit_curve(&views, &y, label, hook_glob, cfg)?;
    let dir = run.join("probes").join(label.replace([':', '/'], "_"));
    curve.save(&dir)?;
    weights.save_safetensors(&dir.join("weights.safetensors"))?;
    crate::plots::plot_probe_curves(&[&curve], &dir.join("curve"))?;
    Ok(curve)
}

/// A printable table of a probe curve.
pub fn probe_table(c: &ProbeCurve) -> String {
    let mut s = format!(
        "probe '{}' on {} ({} examples, {} folds)\nlayer   AUC (mean ± sd)   95% CI          control  selectivity  mean-diff AUC\n",
        c.label, c.hook, c.n_examples, c.folds
    );
    for l in &c.layers {
        s.push_str(&format!(
            "{:>5}   {:.3} ± {:.3}     [{:.3}, {:.3}]  {:.3}    {:+.3}       {:.3}\n",
            l.layer,
            l.auc_mean,
            l.auc_std,
            l.auc_lo,
            l.auc_hi,
            l.control_auc,
            l.selectivity,
            l.meandiff_auc
        ));
    }
    s.push_str(&format!(
        "peak layer {}, first layer reaching 90% of the peak: {}\n",
        c.peak_layer, c.first_90_layer
    ));
    s
}

/// Condition label used in attention curves: `neutral` for round 1, the tone for the
/// sycophancy branch, `correction:<tone>` for the correction branch.
pub fn condition_label(r: &IndexRow) -> String {
    if r.meta.condition == "r1" {
        "neutral".into()
    } else if let Some(t) = r.meta.condition.strip_prefix("r2:") {
        t.to_string()
    } else {
        r.meta.condition.clone()
    }
}

/// Visual reliance per layer, neutral vs each tone, for each metric; writes
/// `RUN/attention/reliance_<metric>.{csv,json,png,svg}`. Returns the files written.
pub fn attention_curves(run: &Path, metrics: &[&str]) -> Result<Vec<PathBuf>> {
    let store = open_store(run)?;
    let mut hooks: Vec<(usize, String)> = store
        .hooks()
        .into_iter()
        .filter(|h| h.ends_with(".attn.reliance"))
        .filter_map(|h| layer_of(&h).map(|l| (l, h)))
        .collect();
    hooks.sort();
    if hooks.is_empty() {
        return Err(Error::input(format!(
            "{}: the store has no attention reliance features (capture blocks.*.attn.hook_pattern@last)",
            run.display()
        )));
    }
    let conditions: Vec<String> = store.index().iter().map(condition_label).collect();
    let mut pooled: Vec<(usize, Array2<f32>)> = Vec::new();
    for (l, h) in &hooks {
        let a = store.read(h)?; // [rows, heads+1, 5]
        let last = a.shape()[1] - 1;
        let p = a.index_axis(Axis(1), last).to_owned();
        let p2 = p
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::msg(format!("{h}: {e}")))?;
        pooled.push((*l, p2));
    }
    let views: Vec<(usize, ndarray::ArrayView2<f32>)> =
        pooled.iter().map(|(l, a)| (*l, a.view())).collect();
    let dir = run.join("attention");
    let mut files = Vec::new();
    for metric in metrics {
        let mut curves = crate::attention::reliance_curves(&views, &conditions, metric)?;
        // keep neutral and the sycophancy-branch tones on the figure; corrections are in the CSV
        let all = curves.clone();
        files.extend(crate::attention::save_curves(
            &all,
            &dir.join(format!("reliance_{metric}")),
        )?);
        curves.retain(|c| !c.condition.starts_with("correction"));
        if curves.is_empty() {
            curves = all;
        }
        let title = format!(
            "{} at the decision token, per layer",
            crate::attention::metric_label(metric)
        );
        files.extend(crate::attention::draw_reliance_curves(
            &curves,
            &title,
            &dir.join(format!("reliance_{metric}")),
        )?);
    }
    Ok(files)
}

/// The image of an example as the model saw it (resized and cropped), when the run's model is a
/// local folder with a CLIP-style processor; otherwise the original image.
fn example_view(run_manifest: &RunManifest, image: &Path) -> Result<image::RgbImage> {
    let img = crate::preprocess::load_image(image)?;
    let dir = Path::new(&run_manifest.model);
    if let Ok(p) = crate::preprocess::ImageProcessor::from_dir(dir) {
        return Ok(p.view(&img));
    }
    Ok(img.to_rgb8())
}

/// Heatmaps of one example: the decision token's attention over the image's patch grid per layer
/// (neutral), and neutral vs pressured vs their difference averaged over `layers`. Picks the
/// first example that flipped under `tone` when `example` is None.
pub fn attention_heatmaps(
    run: &Path,
    example: Option<&str>,
    tone: &str,
    layers: Option<(usize, usize)>,
) -> Result<Vec<PathBuf>> {
    let m = read_manifest(run)?;
    let store = open_store(run)?;
    let examples = runner::read_examples(run)?;
    let pick = match example {
        Some(id) => examples
            .iter()
            .find(|e| e.example_id == id)
            .ok_or_else(|| {
                let some: Vec<&str> = examples
                    .iter()
                    .take(5)
                    .map(|e| e.example_id.as_str())
                    .collect();
                Error::input(format!(
                    "no example '{id}' in {} (e.g. {})",
                    run.display(),
                    some.join(", ")
                ))
            })?,
        None => examples
            .iter()
            .find(|e| {
                e.tones
                    .iter()
                    .any(|(t, r)| t.to_string() == tone && r.branch == "sycophancy" && r.flipped)
            })
            .or_else(|| examples.iter().find(|e| e.r1.correct))
            .or(examples.first())
            .ok_or_else(|| Error::input(format!("{}: the run has no examples", run.display())))?,
    };
    let img_path = pick.image.as_ref().ok_or_else(|| {
        Error::input(format!(
            "example '{}' has no image file to draw on",
            pick.example_id
        ))
    })?;
    let view = example_view(&m, Path::new(img_path))?;
    let find = |cond: &str| -> Option<usize> {
        store
            .index()
            .iter()
            .position(|r| r.meta.example_id == pick.example_id && r.meta.condition == cond)
    };
    let r1 = find("r1").ok_or_else(|| {
        Error::input(format!(
            "example '{}' has no stored round-1 row",
            pick.example_id
        ))
    })?;
    let branch = pick
        .tones
        .get(&tone.parse()?)
        .map(|t| t.branch.clone())
        .unwrap_or_default();
    let cond2 = if branch == "correction" {
        format!("correction:{tone}")
    } else {
        format!("r2:{tone}")
    };
    let r2 = find(&cond2);
    let grid = store.index()[r1]
        .meta
        .extra
        .get("grid")
        .and_then(|g| g.as_array())
        .and_then(|g| Some((g.first()?.as_u64()? as usize, g.get(1)?.as_u64()? as usize)))
        .ok_or_else(|| Error::input("the stored rows have no image grid"))?;
    let mut hooks: Vec<(usize, String)> = store
        .hooks()
        .into_iter()
        .filter(|h| h.ends_with(".attn.image"))
        .filter_map(|h| layer_of(&h).map(|l| (l, h)))
        .collect();
    hooks.sort();
    if hooks.is_empty() {
        return Err(Error::input(
            "the store has no decision-row image attention (blocks.*.attn.image)",
        ));
    }
    let composed = store.hooks().iter().any(|h| h == "qformer.crossattn");
    let n_layers = hooks.len();
    let (a, b) = layers.unwrap_or((n_layers / 2, n_layers));
    if a >= b || b > n_layers {
        return Err(Error::input(format!(
            "layer range {a}..{b} is outside the model's layers 0..{n_layers}"
        )));
    }
    let grid_of = |row: usize, h: &str| -> Result<Array2<f32>> {
        let x = store.read_rows(h, &[row])?; // [1, heads, n]
        let x2 = x
            .index_axis(Axis(0), 0)
            .to_owned()
            .into_dimensionality::<ndarray::Ix2>()
            .map_err(|e| Error::msg(e.to_string()))?;
        let mean = crate::attention::mean_over_heads(x2.view())?;
        if mean.len() != grid.0 * grid.1 && composed {
            // Q-Former family: decision -> queries, composed with queries -> patches
            let ca = store.read_rows("qformer.crossattn", &[row])?;
            let ca2 = ca
                .index_axis(Axis(0), 0)
                .to_owned()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| Error::msg(e.to_string()))?;
            let n = ca2.ncols();
            let patches = ca2.slice(ndarray::s![.., n - grid.0 * grid.1..]).to_owned();
            let v = crate::attention::compose_qformer(&mean, patches.view())?;
            return crate::attention::grid_from_values(&v, grid.0, grid.1);
        }
        crate::attention::grid_from_values(&mean, grid.0, grid.1)
    };
    let opts = crate::attention::HeatmapOptions {
        composed_qformer: composed,
        ..Default::default()
    };
    let dir = run.join("attention");
    let mut files = Vec::new();
    let panels: Vec<(String, image::RgbImage, Array2<f32>)> = hooks
        .iter()
        .map(|(l, h)| Ok((format!("layer {l}"), view.clone(), grid_of(r1, h)?)))
        .collect::<Result<_>>()?;
    let ncols = (n_layers as f64).sqrt().ceil() as usize;
    files.extend(crate::attention::heatmap_figure(
        &panels,
        ncols,
        &format!(
            "{}: decision-token attention over the image, per layer (neutral)",
            pick.example_id
        ),
        true,
        &opts,
        &dir.join(format!("heatmap_layers_{}", pick.example_id)),
    )?);
    if let Some(r2) = r2 {
        let sel: Vec<&(usize, String)> = hooks.iter().filter(|(l, _)| *l >= a && *l < b).collect();
        let neutral = crate::attention::mean_grids(
            &sel.iter()
                .map(|(_, h)| grid_of(r1, h))
                .collect::<Result<Vec<_>>>()?,
        )?;
        let pressured = crate::attention::mean_grids(
            &sel.iter()
                .map(|(_, h)| grid_of(r2, h))
                .collect::<Result<Vec<_>>>()?,
        )?;
        files.extend(crate::attention::difference_figure(
            &view,
            &neutral,
            &pressured,
            ("neutral", tone),
            &format!(
                "{}: layers {a}-{} mean, neutral vs {tone} pushback",
                pick.example_id,
                b - 1
            ),
            &opts,
            &dir.join(format!("heatmap_diff_{}_{tone}", pick.example_id)),
        )?);
    }
    Ok(files)
}

/// One cell of an amplification sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRow {
    pub lambda: f64,
    pub layers: String,
    pub range: (usize, usize),
    pub acc_r1: Option<f64>,
    pub syc: Option<f64>,
    pub cor: Option<f64>,
    pub n: usize,
}

/// Run eval for every lambda x layer range (`RUN/sweep/l<lambda>_<range>/`) and write the
/// Acc@R1 / Syc / Cor table (`sweep.csv`, `sweep.json`) and a plot.
pub fn sweep(
    model: &dyn crate::families::Vlm,
    model_source: &str,
    data: &str,
    out: &Path,
    lambdas: &[f64],
    ranges: &[String],
    base: &runner::EvalOptions,
    load: &crate::protocol::items::LoadOptions,
    progress: bool,
) -> Result<Vec<SweepRow>> {
    let n_layers = model.info().n_layers;
    let mut rows = Vec::new();
    for r in ranges {
        let range = runner::parse_layer_range(r, n_layers)?;
        for &lambda in lambdas {
            if !lambda.is_finite() || lambda < 0.0 {
                return Err(Error::input(format!(
                    "sweep: lambda must be finite and >= 0, got {lambda}"
                )));
            }
            let mut opts = base.clone();
            opts.amplify = if lambda == 0.0 {
                None
            } else {
                Some(runner::Amplify {
                    lambda,
                    layers: range,
                    rule: "add_abs".into(),
                })
            };
            let dir = out.join(format!("l{lambda}_{r}"));
            if progress {
                eprintln!(
                    "sweep: lambda {lambda}, layers {r} ({}..{})",
                    range.0, range.1
                );
            }
            let job = runner::EvalJob {
                model_source,
                data,
                run: &dir,
                opts,
                load: load.clone(),
                progress,
            };
            let s = runner::eval(model, &job)?;
            let o = s.overall();
            rows.push(SweepRow {
                lambda,
                layers: r.clone(),
                range,
                acc_r1: o.acc_r1.rate,
                syc: o.syc.rate,
                cor: o.cor.rate,
                n: o.acc_r1.n,
            });
        }
    }
    let mut csv = String::from("lambda,layers,start,end,acc_r1,syc,cor,n\n");
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_default();
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            r.lambda,
            r.layers,
            r.range.0,
            r.range.1,
            f(r.acc_r1),
            f(r.syc),
            f(r.cor),
            r.n
        ));
    }
    crate::error::write_atomic(out.join("sweep.csv"), csv.as_bytes())?;
    crate::error::write_atomic(
        out.join("sweep.json"),
        &serde_json::to_vec_pretty(&rows).unwrap_or_default(),
    )?;
    let mut series = Vec::new();
    for r in ranges {
        for (metric, pick) in [("Syc", 0usize), ("Acc@R1", 1)] {
            let pts: Vec<&SweepRow> = rows.iter().filter(|x| &x.layers == r).collect();
            let y: Vec<f64> = pts
                .iter()
                .map(|x| if pick == 0 { x.syc } else { x.acc_r1 }.unwrap_or(f64::NAN) * 100.0)
                .collect();
            if y.iter().any(|v| !v.is_finite()) {
                continue;
            }
            let mut s = crate::plots::Series::new(
                format!("{metric}, layers {r}"),
                pts.iter().map(|x| x.lambda).collect(),
                y,
            );
            s.dashed = pick == 1;
            series.push(s);
        }
    }
    if !series.is_empty() {
        let spec = crate::plots::ChartSpec {
            title: "Attention amplification on image tokens".into(),
            x_label: "lambda".into(),
            y_label: "%".into(),
            y_range: Some((0.0, 100.0)),
            hline: None,
        };
        crate::plots::line_chart(&spec, &series, &out.join("sweep"))?;
    }
    Ok(rows)
}

/// A printable sweep table.
pub fn sweep_table(rows: &[SweepRow]) -> String {
    let f = |x: Option<f64>| {
        x.map(|v| format!("{:5.1}", v * 100.0))
            .unwrap_or_else(|| "    -".into())
    };
    let mut s = String::from("lambda  layers       Acc@R1   Syc    Cor    n\n");
    for r in rows {
        s.push_str(&format!(
            "{:<6}  {:<11}  {}  {}  {}  {}\n",
            r.lambda,
            format!("{} ({}-{})", r.layers, r.range.0, r.range.1 - 1),
            f(r.acc_r1),
            f(r.syc),
            f(r.cor),
            r.n
        ));
    }
    s
}

/// An experiment spec (`probes/*.toml`): model, data, capture, labels, probe settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    #[serde(default)]
    pub probe: ProbeSpec,
    #[serde(default)]
    pub attention: AttentionSpec,
    pub out: OutSpec,
}

/// `[model]`: `source` is a folder, a Hub id, or `organism` (the embedded default).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub source: String,
    #[serde(default = "d_f32")]
    pub dtype: String,
    #[serde(default = "d_cpu")]
    pub device: String,
}

fn d_f32() -> String {
    "f32".into()
}
fn d_cpu() -> String {
    "cpu".into()
}

/// `[data]`: a path/Hub id, or `synth = true` with the generator's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub synth: bool,
    #[serde(default = "d_n")]
    pub n: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_size")]
    pub size: u32,
    #[serde(default)]
    pub tasks: Option<Vec<String>>,
    #[serde(default)]
    pub option_order: Option<String>,
}
fn d_n() -> usize {
    120
}
fn d_size() -> u32 {
    224
}

/// `[eval]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub tones: Option<Vec<String>>,
    pub limit: Option<usize>,
    pub batch_size: Option<usize>,
    pub rounds: Option<usize>,
    pub system_prompt: Option<String>,
    /// `default` or a hook list.
    pub capture: Option<String>,
}

/// `[probe]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    pub labels: Option<Vec<String>>,
    pub hook: Option<String>,
    pub folds: Option<usize>,
    pub seed: Option<u64>,
    pub l2: Option<f64>,
}

/// `[attention]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionSpec {
    pub metrics: Option<Vec<String>>,
    pub example: Option<String>,
    pub tone: Option<String>,
    pub layers: Option<String>,
}

/// `[out]`: the run directory and, optionally, a folder to copy the main figures into.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutSpec {
    pub dir: String,
    #[serde(default)]
    pub figures: Option<String>,
}

impl RunSpec {
    /// Read and check a spec file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::error::read_to_string(path)?;
        let s: RunSpec = toml::from_str(&text)
            .map_err(|e| Error::config(path, format!("not a valid run spec: {e}")))?;
        if s.data.path.is_none() && !s.data.synth {
            return Err(Error::config(
                path,
                "[data] needs `path = ...` or `synth = true`",
            ));
        }
        Ok(s)
    }
}

/// Resolve paths of a spec relative to the spec file's folder (absolute and Hub ids unchanged).
fn rel(base: &Path, p: &str) -> String {
    let pp = Path::new(p);
    if pp.is_absolute() || base.join(p).exists() || !p.contains('/') && !p.starts_with('.') {
        if base.join(p).exists() {
            return base.join(p).display().to_string();
        }
        return p.to_string();
    }
    p.to_string()
}

/// Run a spec end to end: data, eval + capture, probes for each label, attention curves and
/// heatmaps, figures. Returns the run directory and a text report.
pub fn run_spec(spec_path: &Path, progress: bool) -> Result<(PathBuf, String)> {
    let spec = RunSpec::load(spec_path)?;
    let base = spec_path.parent().unwrap_or(Path::new("."));
    let _ = rel;
    let run = PathBuf::from(&spec.out.dir);
    std::fs::create_dir_all(&run).map_err(|e| Error::io(&run, e))?;
    let mut report = String::new();
    // model
    let model_dir = crate::source::resolve_default_or(&spec.model.source)?;
    let opts = crate::families::LoadOptions {
        dtype: crate::blocks::weights::parse_dtype(&spec.model.dtype)?,
        device: crate::cli::parse_device(&spec.model.device)?,
    };
    let model = crate::families::load_dir(&model_dir, &opts)?;
    // data
    let data = if spec.data.synth {
        let dir = run.join("bench");
        if !dir.join("items.jsonl").exists() {
            let mut cfg = crate::protocol::synth::SynthConfig {
                n: spec.data.n,
                seed: spec.data.seed,
                size: spec.data.size,
                ..Default::default()
            };
            if let Some(t) = &spec.data.tasks {
                cfg.tasks = t.iter().map(|x| x.parse()).collect::<Result<_>>()?;
            }
            if let Some(o) = &spec.data.option_order {
                cfg.option_order = match o.as_str() {
                    "fixed" | "fixed-per-task" => crate::protocol::synth::OptionOrder::FixedPerTask,
                    "shuffled" => crate::protocol::synth::OptionOrder::Shuffled,
                    other => {
                        return Err(Error::config(
                            spec_path,
                            format!("option_order '{other}': expected shuffled or fixed"),
                        ))
                    }
                };
            }
            crate::protocol::synth::write_bench(&cfg, &dir)?;
        }
        dir.display().to_string()
    } else {
        let p = spec.data.path.clone().unwrap_or_default();
        if base.join(&p).exists() {
            base.join(&p).display().to_string()
        } else {
            p
        }
    };
    // eval
    let e = &spec.eval;
    let tones = match &e.tones {
        Some(t) => t.iter().map(|x| x.parse()).collect::<Result<Vec<_>>>()?,
        None => crate::protocol::items::Tone::ALL.to_vec(),
    };
    let eopts = runner::EvalOptions {
        tones,
        limit: e.limit,
        batch_size: e.batch_size.unwrap_or(8),
        rounds: e.rounds.unwrap_or(2),
        system_prompt: e.system_prompt.clone(),
        capture: Some(e.capture.clone().unwrap_or_else(|| "default".into())),
        ..Default::default()
    };
    let job = runner::EvalJob {
        model_source: &model_dir.display().to_string(),
        data: &data,
        run: &run,
        opts: eopts,
        load: Default::default(),
        progress,
    };
    let summary = runner::eval(model.as_ref(), &job)?;
    report.push_str(&summary.table());
    report.push('\n');
    // probes
    let p = &spec.probe;
    let pcfg = ProbeConfig {
        folds: p.folds.unwrap_or(5),
        seed: p.seed.unwrap_or(0),
        l2: p.l2.unwrap_or(1.0),
        ..Default::default()
    };
    let hook = p
        .hook
        .clone()
        .unwrap_or_else(|| "blocks.*.hook_resid_post@last".into());
    let mut curves = Vec::new();
    for label in p
        .labels
        .clone()
        .unwrap_or_else(|| vec!["sycophantic".into()])
    {
        match probe_run(&run, &hook, &label, &pcfg) {
            Ok(c) => {
                report.push_str(&probe_table(&c));
                report.push('\n');
                curves.push((label, c));
            }
            Err(err) => report.push_str(&format!("probe '{label}' skipped: {err}\n")),
        }
    }
    // attention
    let a = &spec.attention;
    let metrics: Vec<String> = a
        .metrics
        .clone()
        .unwrap_or_else(|| vec!["image_share".into(), "ratio".into()]);
    let mrefs: Vec<&str> = metrics.iter().map(|s| s.as_str()).collect();
    let mut figs = attention_curves(&run, &mrefs)?;
    let layers = match &a.layers {
        Some(l) => Some(runner::parse_layer_range(l, model.info().n_layers)?),
        None => None,
    };
    match attention_heatmaps(
        &run,
        a.example.as_deref(),
        a.tone.as_deref().unwrap_or("strong"),
        layers,
    ) {
        Ok(f) => figs.extend(f),
        Err(err) => report.push_str(&format!("heatmaps skipped: {err}\n")),
    }
    for (label, _) in &curves {
        let d = run.join("probes").join(label.replace([':', '/'], "_"));
        figs.push(d.join("curve.png"));
        figs.push(d.join("curve.svg"));
    }
    if let Some(f) = &spec.out.figures {
        let fdir = PathBuf::from(f);
        std::fs::create_dir_all(&fdir).map_err(|e| Error::io(&fdir, e))?;
        for src in figs.iter().filter(|p| p.exists()) {
            let name = src
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            let mut dest_name = std::ffi::OsString::new();
            if let Some(parent) = src.parent().and_then(|p| p.file_name()) {
                if parent != "attention" {
                    dest_name.push(parent);
                    dest_name.push("_");
                }
            }
            dest_name.push(name);
            let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
            crate::error::write_atomic(fdir.join(dest_name), &bytes)?;
        }
        report.push_str(&format!("figures copied to {}\n", fdir.display()));
    }
    let mut extra = BTreeMap::new();
    extra.insert(
        "figures",
        figs.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
    );
    crate::error::write_atomic(run.join("report.txt"), report.as_bytes())?;
    Ok((run, report))
}
