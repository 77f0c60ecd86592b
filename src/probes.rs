//! Layer-wise linear probes: does a layer's representation predict a behaviour (e.g. "the model
//! will give in to the user")?
//!
//! For every layer, [`fit_curve`] runs the same cross-validated pipeline:
//!
//! 1. Stratified `k`-fold split (seeded, shared by all layers so layers are compared on the same
//!    folds), see [`stratified_folds`].
//! 2. On each training fold: standardise every feature with the training fold's mean and standard
//!    deviation, fit an L2-regularised logistic regression (`linfa-logistic`, L-BFGS), score the
//!    held-out fold. The out-of-fold scores are pooled over folds.
//! 3. Metrics: ROC AUC per fold (mean and sample standard deviation), AUC of the pooled
//!    out-of-fold scores with a stratified bootstrap 95% interval, accuracy at probability 0.5.
//! 4. Baselines: a *control* (the same pipeline on seeded-permuted labels: a probe that reaches a
//!    high AUC there memorises noise) and a *mean-difference* probe (project onto
//!    `mu_pos - mu_neg` of the training fold, in original feature units, no fitting).
//! 5. A final probe fitted on all examples, exported as [`ProbeWeights`] in original feature units.
//!
//! Layers are fitted in parallel on a local rayon pool of [`ProbeConfig::threads`] threads.
//!
//! Cost: each logistic fit is L-BFGS over `n_train x d` standardised `f64` features, so one layer
//! costs about `(2 * folds + 1) * iterations * 3 * n * d` multiply-adds (folds, control folds,
//! final fit). `benches/probes.rs` measures it; see its header for numbers.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2, ArrayView2, ShapeBuilder};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{read_to_string, write_atomic, Error, Result};
use crate::input_err;

/// Settings for [`fit_curve`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    /// Number of stratified cross-validation folds (default 5, at least 2). Each class needs at
    /// least this many examples.
    pub folds: usize,
    /// Seed for the fold split, the control permutation and the bootstrap (default 0).
    pub seed: u64,
    /// L2 regularisation strength `lambda` (default 1.0). The probe minimises, on standardised
    /// features, `sum_i log(1 + exp(-y_i (w.x_i + b))) + lambda/2 * |w|^2` (a *sum* over the
    /// training examples, intercept not penalised): this is scikit-learn's
    /// `LogisticRegression(C = 1/lambda)`. Larger values shrink the weights more; because the loss
    /// is summed, the same `lambda` regularises less as the number of examples grows.
    pub l2: f64,
    /// Maximum number of L-BFGS iterations per fit (default 100).
    pub max_iter: u64,
    /// Convergence tolerance on the norm of the *mean* per-example gradient (default 1e-4; passed
    /// to linfa as `tol * n_train` because linfa's loss is summed).
    pub tol: f64,
    /// Number of bootstrap resamples for the 95% interval of the pooled AUC (default 1000; 0
    /// skips the bootstrap and leaves the interval as NaN).
    pub bootstrap: usize,
    /// Also run the shuffled-label control (default true; false leaves `control_auc` and
    /// `selectivity` as NaN and halves the cost).
    pub control: bool,
    /// Worker threads for fitting layers in parallel (default 2).
    pub threads: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            folds: 5,
            seed: 0,
            l2: 1.0,
            max_iter: 100,
            tol: 1e-4,
            bootstrap: 1000,
            control: true,
            threads: 2,
        }
    }
}

impl ProbeConfig {
    /// Check the settings; the error names the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.folds < 2 {
            return Err(input_err!(
                "probe config: folds = {} (need at least 2)",
                self.folds
            ));
        }
        if !self.l2.is_finite() || self.l2 < 0.0 {
            return Err(input_err!(
                "probe config: l2 = {} (need a finite value >= 0)",
                self.l2
            ));
        }
        if self.max_iter == 0 {
            return Err(input_err!("probe config: max_iter = 0 (need at least 1)"));
        }
        if !self.tol.is_finite() || self.tol <= 0.0 {
            return Err(input_err!(
                "probe config: tol = {} (need a finite value > 0)",
                self.tol
            ));
        }
        if self.threads == 0 {
            return Err(input_err!("probe config: threads = 0 (need at least 1)"));
        }
        Ok(())
    }
}

/// Serialise NaN as JSON `null` and read `null` back as NaN (JSON has no NaN).
mod nan_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// The probe result for one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProbe {
    /// Layer index (as given to [`fit_curve`]).
    pub layer: usize,
    /// Hook the features were captured at (e.g. `model.layers.{i}.out`).
    pub hook: String,
    /// Mean of the per-fold ROC AUCs of the logistic probe.
    #[serde(with = "nan_null")]
    pub auc_mean: f64,
    /// Sample standard deviation (n-1) of the per-fold AUCs.
    #[serde(with = "nan_null")]
    pub auc_std: f64,
    /// AUC of the out-of-fold scores pooled over all folds.
    #[serde(with = "nan_null")]
    pub auc_pooled: f64,
    /// Lower end of the stratified-bootstrap 95% interval of `auc_pooled` (NaN without bootstrap).
    #[serde(with = "nan_null")]
    pub auc_lo: f64,
    /// Upper end of the stratified-bootstrap 95% interval of `auc_pooled` (NaN without bootstrap).
    #[serde(with = "nan_null")]
    pub auc_hi: f64,
    /// Mean per-fold accuracy of the logistic probe at probability 0.5.
    #[serde(with = "nan_null")]
    pub acc_mean: f64,
    /// Mean per-fold AUC of the same pipeline on permuted labels (about 0.5 for a probe that does
    /// not memorise; NaN when the control is off).
    #[serde(with = "nan_null")]
    pub control_auc: f64,
    /// `auc_mean - control_auc` (NaN when the control is off).
    #[serde(with = "nan_null")]
    pub selectivity: f64,
    /// Mean per-fold AUC of the mean-difference baseline (scores = `x . (mu_pos - mu_neg)` with
    /// the means taken on the training fold, original feature units).
    #[serde(with = "nan_null")]
    pub meandiff_auc: f64,
    /// Number of positive (true) examples.
    pub n_pos: usize,
    /// Number of negative (false) examples.
    pub n_neg: usize,
}

/// A probe curve: one [`LayerProbe`] per layer, sorted by layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeCurve {
    /// What the probe predicts (e.g. `sycophantic`), also used as the legend name in plots.
    pub label: String,
    /// Hook the features were captured at.
    pub hook: String,
    /// Per-layer results, sorted by layer index.
    pub layers: Vec<LayerProbe>,
    /// Layer with the highest `auc_mean` (the lowest such layer on ties).
    pub peak_layer: usize,
    /// First layer (in layer order) that reaches 90% of the peak's *above-chance* AUC:
    /// `auc_mean >= 0.5 + 0.9 * (peak_auc - 0.5)`. Measuring from chance (not from 0) makes the
    /// threshold meaningful for weak probes: with a peak of 0.65 it is 0.635, not 0.585.
    pub first_90_layer: usize,
    /// Number of examples.
    pub n_examples: usize,
    /// Number of cross-validation folds.
    pub folds: usize,
    /// Seed used for folds, control and bootstrap.
    pub seed: u64,
    /// L2 strength used (see [`ProbeConfig::l2`]).
    pub l2: f64,
}

impl ProbeCurve {
    /// The layer entry with the highest `auc_mean`.
    pub fn peak(&self) -> Option<&LayerProbe> {
        self.layers.iter().find(|l| l.layer == self.peak_layer)
    }

    /// Write `dir/curve.json` (everything, reloadable with [`ProbeCurve::load`]) and
    /// `dir/curve.csv` (one row per layer, NaN as an empty cell), each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::msg(format!("probe curve '{}': JSON: {e}", self.label)))?;
        write_atomic(dir.join("curve.json"), &json)?;
        write_atomic(dir.join("curve.csv"), self.to_csv().as_bytes())
    }

    /// The CSV text written by [`ProbeCurve::save`].
    pub fn to_csv(&self) -> String {
        fn num(v: f64) -> String {
            if v.is_finite() {
                format!("{v:.6}")
            } else {
                String::new()
            }
        }
        fn cell(s: &str) -> String {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        }
        let mut out = String::from(
            "label,layer,hook,auc_mean,auc_std,auc_pooled,auc_lo,auc_hi,acc_mean,control_auc,selectivity,meandiff_auc,n_pos,n_neg\n",
        );
        for l in &self.layers {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                cell(&self.label),
                l.layer,
                cell(&l.hook),
                num(l.auc_mean),
                num(l.auc_std),
                num(l.auc_pooled),
                num(l.auc_lo),
                num(l.auc_hi),
                num(l.acc_mean),
                num(l.control_auc),
                num(l.selectivity),
                num(l.meandiff_auc),
                l.n_pos,
                l.n_neg
            ));
        }
        out
    }

    /// Read `dir/curve.json` written by [`ProbeCurve::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("curve.json");
        let text = read_to_string(&path)?;
        let curve: ProbeCurve = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not a probe curve: {e}")))?;
        if curve.layers.is_empty() {
            return Err(Error::config(&path, "probe curve has no layers"));
        }
        Ok(curve)
    }
}

/// Weights of the final probe of one layer, fitted on all examples.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Layer index.
    pub layer: usize,
    /// Logistic weights in *original* feature units: the decision value is
    /// `weight . x + intercept` on raw features `x` (positive means "true").
    pub weight: Vec<f32>,
    /// Intercept in original units.
    pub intercept: f32,
    /// Per-feature mean used to standardise.
    pub mean: Vec<f32>,
    /// Per-feature standard deviation used to standardise (1 for constant features).
    pub std: Vec<f32>,
    /// Mean-difference direction `mu_pos - mu_neg` over all examples, original units.
    pub direction: Vec<f32>,
}

impl LayerWeights {
    /// Logistic decision value `weight . x + intercept` (log-odds of "true") for raw features.
    pub fn decision(&self, x: &[f32]) -> Result<f64> {
        if x.len() != self.weight.len() {
            return Err(input_err!(
                "probe layer {}: feature vector has {} values, the probe expects {}",
                self.layer,
                x.len(),
                self.weight.len()
            ));
        }
        Ok(x.iter()
            .zip(&self.weight)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>()
            + self.intercept as f64)
    }
}

/// The final probes of a curve, one per layer, exportable to safetensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeWeights {
    /// What the probe predicts.
    pub label: String,
    /// Hook the features were captured at.
    pub hook: String,
    /// Per-layer weights, sorted by layer.
    pub layers: Vec<LayerWeights>,
}

impl ProbeWeights {
    /// The weights of `layer`, if it was probed.
    pub fn layer(&self, layer: usize) -> Option<&LayerWeights> {
        self.layers.iter().find(|l| l.layer == layer)
    }

    /// Write all layers to one safetensors file (atomically), f32 tensors named
    /// `layer.{i}.weight` `[d]`, `layer.{i}.bias` `[1]`, `layer.{i}.mean` `[d]`, `layer.{i}.std`
    /// `[d]` and `layer.{i}.direction` `[d]`; metadata keys `format` (`sycoscope-probe-v1`),
    /// `label`, `hook` and `layers` (comma-separated indices).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for l in &self.layers {
            let d = l.weight.len();
            for (name, v) in [
                ("weight", &l.weight),
                ("mean", &l.mean),
                ("std", &l.std),
                ("direction", &l.direction),
            ] {
                blobs.push((format!("layer.{}.{name}", l.layer), vec![d], f32_bytes(v)));
            }
            blobs.push((
                format!("layer.{}.bias", l.layer),
                vec![1],
                f32_bytes(&[l.intercept]),
            ));
        }
        let mut views = Vec::with_capacity(blobs.len());
        for (name, shape, bytes) in &blobs {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map_err(|e| Error::msg(format!("{}: tensor {name}: {e}", path.display())))?;
            views.push((name.clone(), view));
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "sycoscope-probe-v1".to_string());
        meta.insert("label".to_string(), self.label.clone());
        meta.insert("hook".to_string(), self.hook.clone());
        meta.insert(
            "layers".to_string(),
            self.layers
                .iter()
                .map(|l| l.layer.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        let bytes = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| Error::msg(format!("{}: safetensors: {e}", path.display())))?;
        write_atomic(path, &bytes)
    }

    /// Read a file written by [`ProbeWeights::save_safetensors`].
    pub fn load_safetensors(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::config(path, format!("not a safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::config(path, format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| Error::config(path, format!("metadata key '{k}' missing")))
        };
        if get("format")? != "sycoscope-probe-v1" {
            return Err(Error::config(
                path,
                "metadata 'format' is not sycoscope-probe-v1",
            ));
        }
        let mut layers = Vec::new();
        for tok in get("layers")?.split(',').filter(|s| !s.is_empty()) {
            let layer: usize = tok.trim().parse().map_err(|_| {
                Error::config(path, format!("metadata 'layers': bad index '{tok}'"))
            })?;
            let read = |name: &str| -> Result<Vec<f32>> {
                let full = format!("layer.{layer}.{name}");
                let t = st
                    .tensor(&full)
                    .map_err(|e| Error::config(path, format!("tensor {full}: {e}")))?;
                if t.dtype() != safetensors::Dtype::F32 {
                    return Err(Error::config(
                        path,
                        format!("tensor {full}: dtype {:?}, expected F32", t.dtype()),
                    ));
                }
                Ok(t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let weight = read("weight")?;
            let bias = read("bias")?;
            let lw = LayerWeights {
                layer,
                intercept: *bias.first().ok_or_else(|| {
                    Error::config(path, format!("tensor layer.{layer}.bias is empty"))
                })?,
                mean: read("mean")?,
                std: read("std")?,
                direction: read("direction")?,
                weight,
            };
            let d = lw.weight.len();
            if lw.mean.len() != d || lw.std.len() != d || lw.direction.len() != d {
                return Err(Error::config(
                    path,
                    format!("layer {layer}: weight, mean, std and direction lengths differ"),
                ));
            }
            layers.push(lw);
        }
        Ok(ProbeWeights {
            label: get("label")?,
            hook: get("hook")?,
            layers,
        })
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// ROC AUC as the Mann-Whitney statistic: the probability that a random positive scores higher
/// than a random negative, ties counted 1/2. Higher scores mean "more likely true".
///
/// Returns NaN when the lengths differ, a class is empty, or a score is NaN.
pub fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    if scores.len() != labels.len() || scores.iter().any(|s| s.is_nan()) {
        return f64::NAN;
    }
    let sorted = SortedScores::new(scores, labels);
    let w = vec![1u32; scores.len()];
    sorted.weighted_auc(&w)
}

/// Scores sorted once, so that the AUC of any reweighting (a bootstrap resample) is `O(n)`.
struct SortedScores<'a> {
    /// Example indices in ascending score order.
    order: Vec<usize>,
    /// Start offsets (into `order`) of runs of tied scores, plus `n` at the end.
    groups: Vec<usize>,
    labels: &'a [bool],
}

impl<'a> SortedScores<'a> {
    fn new(scores: &[f64], labels: &'a [bool]) -> Self {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut groups = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            if k == 0 || scores[i] != scores[order[k - 1]] {
                groups.push(k);
            }
        }
        groups.push(order.len());
        SortedScores {
            order,
            groups,
            labels,
        }
    }

    /// AUC where example `i` counts `w[i]` times. NaN if a class has zero total weight.
    fn weighted_auc(&self, w: &[u32]) -> f64 {
        let (mut u, mut neg_below, mut pos_total) = (0.0f64, 0.0f64, 0.0f64);
        for g in self.groups.windows(2) {
            let (mut wp, mut wn) = (0.0f64, 0.0f64);
            for &i in &self.order[g[0]..g[1]] {
                if self.labels[i] {
                    wp += w[i] as f64;
                } else {
                    wn += w[i] as f64;
                }
            }
            u += wp * (neg_below + 0.5 * wn);
            neg_below += wn;
            pos_total += wp;
        }
        if pos_total == 0.0 || neg_below == 0.0 {
            return f64::NAN;
        }
        u / (pos_total * neg_below)
    }
}

/// Assign each example a fold in `0..k`, stratified: every fold gets `floor` or `ceil` of each
/// class's share, fold sizes differ by at most one, and the assignment depends only on `labels`,
/// `k` and `seed`.
///
/// Errors if `k < 2`, or a class has fewer than `k` examples (every fold must hold both classes
/// for its AUC to exist).
pub fn stratified_folds(labels: &[bool], k: usize, seed: u64) -> Result<Vec<usize>> {
    if k < 2 {
        return Err(input_err!("stratified folds: k = {k} (need at least 2)"));
    }
    let pos = labels.iter().filter(|&&l| l).count();
    for (name, n) in [("true", pos), ("false", labels.len() - pos)] {
        if n < k {
            return Err(input_err!(
                "stratified folds: {n} examples labelled {name}, need at least {k} (one per fold) \
                 for {k}-fold cross-validation"
            ));
        }
    }
    let groups: Vec<usize> = labels.iter().map(|&l| if l { 0 } else { 1 }).collect();
    Ok(assign_folds(&groups, 2, k, seed))
}

/// Round-robin fold assignment over `groups` (ids in `0..n_groups`), each group shuffled with
/// `seed`, groups chained in id order so fold sizes differ by at most one and consecutive group
/// ids share the round robin.
fn assign_folds(groups: &[usize], n_groups: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_groups];
    for (i, &g) in groups.iter().enumerate() {
        members[g].push(i);
    }
    for m in &mut members {
        m.shuffle(&mut rng);
    }
    let mut folds = vec![0usize; groups.len()];
    for (j, &i) in members.iter().flatten().enumerate() {
        folds[i] = j % k;
    }
    folds
}

/// Control labels and folds for the shuffled-label control.
///
/// A plain permutation is correlated with the real labels by chance, and cross-validation turns
/// that chance correlation into a *below*-chance AUC on layers where the real label is linearly
/// readable (the held-out fold's share of the correlation is opposite to the training fold's).
/// So the control labels are a *balanced* permutation: the same number of `true` as the real
/// labels, split between real-true and real-false examples in proportion to the class sizes, and
/// the folds are stratified by the (control, real) cell, so control and real labels are
/// (nearly) uncorrelated in every fold and the control measures only what the probe can memorise.
fn control_labels(labels: &[bool], k: usize, seed: u64) -> (Vec<bool>, Vec<usize>) {
    let n = labels.len();
    let p = labels.iter().filter(|&&l| l).count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut real_pos: Vec<usize> = (0..n).filter(|&i| labels[i]).collect();
    let mut real_neg: Vec<usize> = (0..n).filter(|&i| !labels[i]).collect();
    real_pos.shuffle(&mut rng);
    real_neg.shuffle(&mut rng);
    let from_pos = ((p as f64) * (p as f64) / (n as f64)).round() as usize;
    let from_pos = from_pos
        .min(real_pos.len())
        .max(p.saturating_sub(real_neg.len()));
    let mut ctl = vec![false; n];
    for &i in real_pos.iter().take(from_pos) {
        ctl[i] = true;
    }
    for &i in real_neg.iter().take(p - from_pos) {
        ctl[i] = true;
    }
    // Groups: (ctl true, real true), (ctl true, real false), (ctl false, real true), (...).
    let groups: Vec<usize> = (0..n)
        .map(|i| 2 * (!ctl[i]) as usize + (!labels[i]) as usize)
        .collect();
    let folds = assign_folds(&groups, 4, k, rng.gen());
    (ctl, folds)
}

/// Cross-validated results of one pipeline run on one layer.
struct CvOut {
    oof: Vec<f64>,
    fold_auc: Vec<f64>,
    fold_acc: Vec<f64>,
    meandiff_fold_auc: Vec<f64>,
}

/// Mean and standard deviation (population, constant features get std 1) of `rows` of `x`.
fn feature_stats(x: &ArrayView2<f32>, rows: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let d = x.ncols();
    let n = rows.len().max(1) as f64;
    let mut mean = vec![0.0f64; d];
    for &i in rows {
        for (m, v) in mean.iter_mut().zip(x.row(i).iter()) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0f64; d];
    for &i in rows {
        for ((s, v), m) in var.iter_mut().zip(x.row(i).iter()).zip(&mean) {
            let c = *v as f64 - m;
            *s += c * c;
        }
    }
    let std = var
        .into_iter()
        .map(|v| {
            let s = (v / n).sqrt();
            if s > 1e-12 * (1.0 + s.abs()) && s.is_finite() && s > 0.0 {
                s
            } else {
                1.0
            }
        })
        .collect();
    (mean, std)
}

/// Standardised copy of `rows` of `x` (f32), row-major (`fortran = false`) or column-major.
///
/// The training matrix handed to linfa is column-major: linfa's gradient is `X^T v`, which
/// ndarray computes as one dot product per row of `X^T`, contiguous only when `X` is
/// column-major (measured 10-20x faster than the strided case), while `X w` goes through the
/// layout-agnostic matrix product either way.
fn standardise(
    x: &ArrayView2<f32>,
    rows: &[usize],
    mean: &[f64],
    std: &[f64],
    fortran: bool,
) -> Array2<f32> {
    let d = x.ncols();
    let inv: Vec<f64> = std.iter().map(|s| 1.0 / s).collect();
    let mut out = if fortran {
        Array2::<f32>::zeros((rows.len(), d).f())
    } else {
        Array2::<f32>::zeros((rows.len(), d))
    };
    for (mut o, &i) in out.outer_iter_mut().zip(rows) {
        for (((o, v), m), s) in o.iter_mut().zip(x.row(i).iter()).zip(mean).zip(&inv) {
            *o = ((*v as f64 - m) * s) as f32;
        }
    }
    out
}

/// Fit a logistic regression on standardised `x`; returns weights and intercept oriented so that
/// a positive decision value means `true`.
///
/// The fit runs in f32 (half the memory traffic of f64, about 2x faster at 2048 features); if
/// the f32 solver fails (e.g. a line search that cannot make progress at f32 precision) it is
/// retried in f64 before giving up.
fn fit_logistic(
    x: &Array2<f32>,
    y: &[bool],
    cfg: &ProbeConfig,
    what: &str,
) -> Result<(Vec<f64>, f64)> {
    let targets = Array1::from(y.to_vec());
    let tol = cfg.tol * y.len().max(1) as f64;
    let fitted32 = LogisticRegression::<f32>::default()
        .alpha(cfg.l2 as f32)
        .max_iterations(cfg.max_iter)
        .gradient_tolerance(tol as f32)
        .fit(&DatasetBase::new(x.view(), targets.clone()));
    let (w, b, pos) = match fitted32 {
        Ok(m) => (
            m.params().iter().map(|v| *v as f64).collect::<Vec<f64>>(),
            m.intercept() as f64,
            m.labels().pos.class,
        ),
        Err(e32) => {
            let mut x64 = Array2::<f64>::zeros(x.raw_dim().f());
            x64.zip_mut_with(x, |a, b| *a = *b as f64);
            let m = LogisticRegression::<f64>::default()
                .alpha(cfg.l2)
                .max_iterations(cfg.max_iter)
                .gradient_tolerance(tol)
                .fit(&DatasetBase::new(x64.view(), targets))
                .map_err(|e| {
                    Error::msg(format!(
                        "{what}: logistic regression failed (f32: {e32}; f64: {e})"
                    ))
                })?;
            (m.params().to_vec(), m.intercept(), m.labels().pos.class)
        }
    };
    let sign = if pos { 1.0 } else { -1.0 };
    Ok((w.into_iter().map(|v| v * sign).collect(), b * sign))
}

/// Decision values `x_i . w + b` for the rows of `x`.
fn decision(x: &Array2<f32>, w: &[f64], b: f64) -> Vec<f64> {
    x.outer_iter()
        .map(|r| r.iter().zip(w).map(|(a, c)| *a as f64 * c).sum::<f64>() + b)
        .collect()
}

/// Cross-validate the logistic probe (and optionally the mean-difference baseline) on one layer.
fn cross_validate(
    x: &ArrayView2<f32>,
    labels: &[bool],
    folds: &[usize],
    cfg: &ProbeConfig,
    meandiff: bool,
    what: &str,
) -> Result<CvOut> {
    let n = labels.len();
    let mut out = CvOut {
        oof: vec![0.0; n],
        fold_auc: Vec::with_capacity(cfg.folds),
        fold_acc: Vec::with_capacity(cfg.folds),
        meandiff_fold_auc: Vec::new(),
    };
    for f in 0..cfg.folds {
        let train: Vec<usize> = (0..n).filter(|&i| folds[i] != f).collect();
        let test: Vec<usize> = (0..n).filter(|&i| folds[i] == f).collect();
        let (mean, std) = feature_stats(x, &train);
        let xtr = standardise(x, &train, &mean, &std, true);
        let ytr: Vec<bool> = train.iter().map(|&i| labels[i]).collect();
        let (w, b) = fit_logistic(&xtr, &ytr, cfg, &format!("{what}, fold {f}"))?;
        drop(xtr);
        let xte = standardise(x, &test, &mean, &std, false);
        let s = decision(&xte, &w, b);
        let yte: Vec<bool> = test.iter().map(|&i| labels[i]).collect();
        out.fold_auc.push(auc(&s, &yte));
        let correct = s
            .iter()
            .zip(&yte)
            .filter(|(s, y)| (**s > 0.0) == **y)
            .count();
        out.fold_acc.push(correct as f64 / test.len() as f64);
        for (&i, &v) in test.iter().zip(&s) {
            out.oof[i] = v;
        }
        if meandiff {
            let dir = mean_difference(x, &train, labels);
            let md: Vec<f64> = test
                .iter()
                .map(|&i| x.row(i).iter().zip(&dir).map(|(a, b)| *a as f64 * b).sum())
                .collect();
            out.meandiff_fold_auc.push(auc(&md, &yte));
        }
    }
    Ok(out)
}

/// `mean(x[pos rows]) - mean(x[neg rows])` over `rows`, original units.
fn mean_difference(x: &ArrayView2<f32>, rows: &[usize], labels: &[bool]) -> Vec<f64> {
    let d = x.ncols();
    let (mut sp, mut sn) = (vec![0.0f64; d], vec![0.0f64; d]);
    let (mut np, mut nn) = (0usize, 0usize);
    for &i in rows {
        let acc = if labels[i] {
            np += 1;
            &mut sp
        } else {
            nn += 1;
            &mut sn
        };
        for (a, v) in acc.iter_mut().zip(x.row(i).iter()) {
            *a += *v as f64;
        }
    }
    let (np, nn) = (np.max(1) as f64, nn.max(1) as f64);
    sp.iter().zip(&sn).map(|(p, q)| p / np - q / nn).collect()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// Percentile (linear interpolation) of sorted values, `q` in [0, 1].
fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Stratified bootstrap 95% interval of the AUC of `scores` (positives and negatives resampled
/// separately, so every resample keeps the class counts).
fn bootstrap_ci(scores: &[f64], labels: &[bool], b: usize, seed: u64) -> (f64, f64) {
    if b == 0 {
        return (f64::NAN, f64::NAN);
    }
    let sorted = SortedScores::new(scores, labels);
    let pos: Vec<usize> = (0..labels.len()).filter(|&i| labels[i]).collect();
    let neg: Vec<usize> = (0..labels.len()).filter(|&i| !labels[i]).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = vec![0u32; labels.len()];
    let mut aucs = Vec::with_capacity(b);
    for _ in 0..b {
        w.iter_mut().for_each(|x| *x = 0);
        for class in [&pos, &neg] {
            for _ in 0..class.len() {
                w[class[rng.gen_range(0..class.len())]] += 1;
            }
        }
        let a = sorted.weighted_auc(&w);
        if a.is_finite() {
            aucs.push(a);
        }
    }
    aucs.sort_by(f64::total_cmp);
    (quantile_sorted(&aucs, 0.025), quantile_sorted(&aucs, 0.975))
}

/// Mix the layer index into a seed (splitmix64 step) so each layer gets its own stream.
fn sub_seed(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fit one layer: cross-validation, control, bootstrap, final probe.
fn fit_layer(
    layer: usize,
    x: &ArrayView2<f32>,
    labels: &[bool],
    folds: &[usize],
    control: Option<(&[bool], &[usize])>,
    hook: &str,
    label_name: &str,
    cfg: &ProbeConfig,
) -> Result<(LayerProbe, LayerWeights)> {
    let what = format!("probe '{label_name}' layer {layer}");
    let cv = cross_validate(x, labels, folds, cfg, true, &what)?;
    let (auc_mean, auc_std) = mean_std(&cv.fold_auc);
    let auc_pooled = auc(&cv.oof, labels);
    let (auc_lo, auc_hi) = bootstrap_ci(
        &cv.oof,
        labels,
        cfg.bootstrap,
        sub_seed(cfg.seed, 2 * layer as u64 + 1),
    );
    let control_auc = match control {
        Some((cl, cf)) => {
            let c = cross_validate(x, cl, cf, cfg, false, &format!("{what} (control)"))?;
            mean_std(&c.fold_auc).0
        }
        None => f64::NAN,
    };
    // Final probe on all examples, mapped back to original units.
    let all: Vec<usize> = (0..labels.len()).collect();
    let (mean, std) = feature_stats(x, &all);
    let xs = standardise(x, &all, &mean, &std, true);
    let (w, b) = fit_logistic(&xs, labels, cfg, &format!("{what}, final fit"))?;
    drop(xs);
    let weight: Vec<f64> = w.iter().zip(&std).map(|(w, s)| w / s).collect();
    let intercept = b - weight.iter().zip(&mean).map(|(w, m)| w * m).sum::<f64>();
    let direction = mean_difference(x, &all, labels);
    let n_pos = labels.iter().filter(|&&l| l).count();
    let probe = LayerProbe {
        layer,
        hook: hook.to_string(),
        auc_mean,
        auc_std,
        auc_pooled,
        auc_lo,
        auc_hi,
        acc_mean: mean_std(&cv.fold_acc).0,
        control_auc,
        selectivity: auc_mean - control_auc,
        meandiff_auc: mean_std(&cv.meandiff_fold_auc).0,
        n_pos,
        n_neg: labels.len() - n_pos,
    };
    let to32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
    let weights = LayerWeights {
        layer,
        weight: to32(&weight),
        intercept: intercept as f32,
        mean: to32(&mean),
        std: to32(&std),
        direction: to32(&direction),
    };
    Ok((probe, weights))
}

/// Fit a probe per layer and summarise the curve.
///
/// `layers` holds `(layer index, features)` with features of shape `[n_examples, d]` (one row per
/// example, in the order of `labels`; `d` may differ between layers). `label_name` names what is
/// predicted and `hook` where the features come from. Layers are fitted in parallel on
/// `cfg.threads` threads and the result is sorted by layer index.
///
/// Errors: no layers, duplicate layer indices, a layer with a row count different from
/// `labels.len()` or with no features, a NaN or infinite feature (names layer, row and column),
/// a label with one class only, a class with fewer examples than `cfg.folds`, a bad config.
pub fn fit_curve(
    layers: &[(usize, ArrayView2<f32>)],
    labels: &[bool],
    label_name: &str,
    hook: &str,
    cfg: &ProbeConfig,
) -> Result<(ProbeCurve, ProbeWeights)> {
    cfg.validate()?;
    if layers.is_empty() {
        return Err(input_err!("probe '{label_name}': no layers given"));
    }
    let n = labels.len();
    let n_pos = labels.iter().filter(|&&l| l).count();
    if n_pos == 0 || n_pos == n {
        return Err(input_err!(
            "probe '{label_name}': the label has one class only (all {n} examples are {}); a \
             probe needs both true and false examples",
            n_pos == n && n > 0
        ));
    }
    let mut seen = BTreeSet::new();
    for (layer, x) in layers {
        if !seen.insert(*layer) {
            return Err(input_err!(
                "probe '{label_name}': layer {layer} given twice"
            ));
        }
        if x.nrows() != n {
            return Err(input_err!(
                "probe '{label_name}' layer {layer}: {} feature rows but {n} labels (expected one \
                 row per label)",
                x.nrows()
            ));
        }
        if x.ncols() == 0 {
            return Err(input_err!(
                "probe '{label_name}' layer {layer}: features have 0 columns"
            ));
        }
    }
    // Non-finite check, in parallel over layers (cheap next to fitting).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .build()
        .map_err(|e| Error::msg(format!("probe thread pool: {e}")))?;
    pool.install(|| {
        layers.par_iter().try_for_each(|(layer, x)| {
            for (r, row) in x.outer_iter().enumerate() {
                if let Some(c) = row.iter().position(|v| !v.is_finite()) {
                    return Err(input_err!(
                        "probe '{label_name}' layer {layer}: feature row {r} column {c} is {} \
                         (features must be finite)",
                        row[c]
                    ));
                }
            }
            Ok(())
        })
    })?;
    let folds = stratified_folds(labels, cfg.folds, cfg.seed)
        .map_err(|e| input_err!("probe '{label_name}': {e}"))?;
    let control = if cfg.control {
        let (perm, cf) = control_labels(labels, cfg.folds, sub_seed(cfg.seed, u64::MAX));
        Some((perm, cf))
    } else {
        None
    };
    let results: Vec<(LayerProbe, LayerWeights)> = pool.install(|| {
        layers
            .par_iter()
            .map(|(layer, x)| {
                fit_layer(
                    *layer,
                    x,
                    labels,
                    &folds,
                    control.as_ref().map(|(l, f)| (l.as_slice(), f.as_slice())),
                    hook,
                    label_name,
                    cfg,
                )
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let (mut probes, mut weights): (Vec<_>, Vec<_>) = results.into_iter().unzip();
    probes.sort_by_key(|p| p.layer);
    weights.sort_by_key(|w| w.layer);
    let (peak_layer, first_90_layer) = peak_and_first90(&probes);
    Ok((
        ProbeCurve {
            label: label_name.to_string(),
            hook: hook.to_string(),
            layers: probes,
            peak_layer,
            first_90_layer,
            n_examples: n,
            folds: cfg.folds,
            seed: cfg.seed,
            l2: cfg.l2,
        },
        ProbeWeights {
            label: label_name.to_string(),
            hook: hook.to_string(),
            layers: weights,
        },
    ))
}

/// Peak layer (highest `auc_mean`, lowest layer on ties) and the first layer reaching
/// `0.5 + 0.9 * (peak - 0.5)`.
fn peak_and_first90(probes: &[LayerProbe]) -> (usize, usize) {
    let mut peak = &probes[0];
    for p in probes {
        if p.auc_mean > peak.auc_mean || (peak.auc_mean.is_nan() && !p.auc_mean.is_nan()) {
            peak = p;
        }
    }
    let thr = 0.5 + 0.9 * (peak.auc_mean - 0.5);
    let first = probes
        .iter()
        .find(|p| p.auc_mean >= thr)
        .map(|p| p.layer)
        .unwrap_or(peak.layer);
    (peak.layer, first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr_free::normal;

    /// Tiny Box-Muller normal sampler so the tests need no extra crate.
    mod rand_distr_free {
        use rand::Rng;
        pub fn normal<R: Rng>(rng: &mut R) -> f64 {
            let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    /// Equal up to JSON's last-digit float rounding (NaN equals NaN).
    fn assert_close(a: &ProbeCurve, b: &ProbeCurve) {
        let close = |x: f64, y: f64| (x.is_nan() && y.is_nan()) || (x - y).abs() < 1e-12;
        assert_eq!(
            (a.peak_layer, a.first_90_layer, a.layers.len()),
            (b.peak_layer, b.first_90_layer, b.layers.len())
        );
        assert_eq!(
            (&a.label, &a.hook, a.n_examples, a.folds, a.seed),
            (&b.label, &b.hook, b.n_examples, b.folds, b.seed)
        );
        for (p, q) in a.layers.iter().zip(&b.layers) {
            assert_eq!(
                (p.layer, &p.hook, p.n_pos, p.n_neg),
                (q.layer, &q.hook, q.n_pos, q.n_neg)
            );
            for (x, y) in [
                (p.auc_mean, q.auc_mean),
                (p.auc_std, q.auc_std),
                (p.auc_pooled, q.auc_pooled),
                (p.auc_lo, q.auc_lo),
                (p.auc_hi, q.auc_hi),
                (p.acc_mean, q.acc_mean),
                (p.control_auc, q.control_auc),
                (p.selectivity, q.selectivity),
                (p.meandiff_auc, q.meandiff_auc),
            ] {
                assert!(close(x, y), "layer {}: {x} vs {y}", p.layer);
            }
        }
    }

    #[test]
    fn auc_hand_computed_with_ties() {
        // Positives: 0.8, 0.4, 0.4; negatives: 0.4, 0.1.
        // Pairs (pos, neg): (0.8,0.4)=1 (0.8,0.1)=1 (0.4,0.4)=0.5 (0.4,0.1)=1 (0.4,0.4)=0.5
        // (0.4,0.1)=1 -> 5 / 6.
        let s = [0.8, 0.4, 0.4, 0.4, 0.1];
        let y = [true, true, true, false, false];
        assert!((auc(&s, &y) - 5.0 / 6.0).abs() < 1e-12);
        // Perfect and reversed.
        assert_eq!(auc(&[1.0, 2.0, 3.0], &[false, true, true]), 1.0);
        assert_eq!(auc(&[3.0, 2.0, 1.0], &[false, true, true]), 0.0);
        // All tied: 0.5.
        assert_eq!(auc(&[1.0; 4], &[true, false, true, false]), 0.5);
        // Undefined cases.
        assert!(auc(&[1.0, 2.0], &[true, true]).is_nan());
        assert!(auc(&[1.0, 2.0], &[true]).is_nan());
        assert!(auc(&[f64::NAN, 2.0], &[true, false]).is_nan());
    }

    #[test]
    fn auc_matches_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let s: Vec<f64> = (0..200)
            .map(|_| (rng.gen_range(0..20) as f64) / 4.0)
            .collect();
        let y: Vec<bool> = (0..200).map(|_| rng.gen_bool(0.4)).collect();
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..200 {
            for j in 0..200 {
                if y[i] && !y[j] {
                    den += 1.0;
                    num += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((auc(&s, &y) - num / den).abs() < 1e-12);
    }

    #[test]
    fn stratified_folds_keep_ratios_and_are_deterministic() {
        let labels: Vec<bool> = (0..103).map(|i| i % 3 == 0).collect(); // 35 true, 68 false
        let a = stratified_folds(&labels, 5, 7).unwrap();
        let b = stratified_folds(&labels, 5, 7).unwrap();
        let c = stratified_folds(&labels, 5, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for f in 0..5 {
            let pos = (0..103).filter(|&i| a[i] == f && labels[i]).count();
            let neg = (0..103).filter(|&i| a[i] == f && !labels[i]).count();
            assert!((7..=7).contains(&pos), "fold {f}: {pos} positives");
            assert!((13..=14).contains(&neg), "fold {f}: {neg} negatives");
            assert!((20..=21).contains(&(pos + neg)));
        }
        assert!(a.iter().all(|&f| f < 5));
        assert!(stratified_folds(&labels, 1, 0).is_err());
        let few = [true, true, false, false, false, false];
        let e = stratified_folds(&few, 3, 0).unwrap_err().to_string();
        assert!(e.contains("2 examples labelled true"), "{e}");
    }

    /// `n_layers` layers of `d` Gaussian features; layers in `signal` get `y * strength` added
    /// along a random unit direction.
    fn synthetic(
        n_layers: usize,
        d: usize,
        n: usize,
        signal: &[usize],
        strength: f64,
        seed: u64,
    ) -> (Vec<Array2<f32>>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let mut layers = Vec::new();
        for l in 0..n_layers {
            let dir: Vec<f64> = (0..d).map(|_| normal(&mut rng)).collect();
            let norm = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
            let mut x = Array2::<f32>::zeros((n, d));
            for i in 0..n {
                let y = if labels[i] { 1.0 } else { -1.0 };
                for j in 0..d {
                    let mut v = normal(&mut rng) * 2.0 + 0.3 * j as f64;
                    if signal.contains(&l) {
                        v += y * strength * dir[j] / norm;
                    }
                    x[[i, j]] = v as f32;
                }
            }
            layers.push(x);
        }
        (layers, labels)
    }

    #[test]
    fn planted_signal_peaks_in_signal_layers() {
        let (xs, labels) = synthetic(12, 64, 400, &[7, 8, 9], 3.0, 11);
        let views: Vec<(usize, ArrayView2<f32>)> =
            xs.iter().enumerate().map(|(l, x)| (l, x.view())).collect();
        let cfg = ProbeConfig {
            bootstrap: 200,
            ..ProbeConfig::default()
        };
        let (curve, weights) = fit_curve(&views, &labels, "signal", "test.hook", &cfg).unwrap();
        assert_eq!(curve.layers.len(), 12);
        assert!(
            (7..=9).contains(&curve.peak_layer),
            "peak {}",
            curve.peak_layer
        );
        assert!((7..=9).contains(&curve.first_90_layer));
        for p in &curve.layers {
            if (7..=9).contains(&p.layer) {
                assert!(p.auc_mean > 0.85, "layer {}: auc {}", p.layer, p.auc_mean);
                assert!(p.auc_lo > 0.8 && p.auc_hi <= 1.0 && p.auc_lo <= p.auc_pooled);
                assert!(p.auc_pooled <= p.auc_hi);
                assert!(
                    p.meandiff_auc > 0.85,
                    "layer {}: md {}",
                    p.layer,
                    p.meandiff_auc
                );
                assert!(p.acc_mean > 0.75);
                assert!(p.selectivity > 0.25);
            } else {
                assert!(p.auc_mean < 0.65, "layer {}: auc {}", p.layer, p.auc_mean);
            }
            assert!(
                (p.control_auc - 0.5).abs() < 0.1,
                "layer {}: control {}",
                p.layer,
                p.control_auc
            );
            assert_eq!((p.n_pos, p.n_neg), (200, 200));
        }
        // The exported weights (original units) score the raw features like the probe does.
        let w = weights.layer(8).unwrap();
        let scores: Vec<f64> = xs[8]
            .outer_iter()
            .map(|r| w.decision(r.as_slice().unwrap()).unwrap())
            .collect();
        assert!(auc(&scores, &labels) > 0.9);
        let dir_scores: Vec<f64> = xs[8]
            .outer_iter()
            .map(|r| {
                r.iter()
                    .zip(&w.direction)
                    .map(|(a, b)| (*a * *b) as f64)
                    .sum()
            })
            .collect();
        assert!(auc(&dir_scores, &labels) > 0.9);

        // Deterministic per seed.
        let (again, _) = fit_curve(&views, &labels, "signal", "test.hook", &cfg).unwrap();
        assert_eq!(curve, again);

        // Save / load round trip.
        let dir = tempfile::tempdir().unwrap();
        curve.save(dir.path()).unwrap();
        let loaded = ProbeCurve::load(dir.path()).unwrap();
        assert_close(&loaded, &curve);
        let csv = std::fs::read_to_string(dir.path().join("curve.csv")).unwrap();
        assert_eq!(csv.lines().count(), 13);
        assert!(csv.starts_with("label,layer,hook,auc_mean"));
        let st = dir.path().join("probe.safetensors");
        weights.save_safetensors(&st).unwrap();
        let back = ProbeWeights::load_safetensors(&st).unwrap();
        assert_eq!(back, weights);
    }

    #[test]
    fn nan_fields_round_trip_through_json() {
        let (xs, labels) = synthetic(2, 8, 60, &[1], 3.0, 5);
        let views: Vec<(usize, ArrayView2<f32>)> = xs
            .iter()
            .enumerate()
            .map(|(l, x)| (l + 3, x.view()))
            .collect();
        let cfg = ProbeConfig {
            bootstrap: 0,
            control: false,
            ..ProbeConfig::default()
        };
        let (curve, _) = fit_curve(&views, &labels, "y", "h", &cfg).unwrap();
        assert!(curve.layers[0].control_auc.is_nan() && curve.layers[0].auc_lo.is_nan());
        assert_eq!(curve.layers[1].layer, 4);
        let dir = tempfile::tempdir().unwrap();
        curve.save(dir.path()).unwrap();
        let loaded = ProbeCurve::load(dir.path()).unwrap();
        assert!(loaded.layers[0].control_auc.is_nan());
        assert_close(&loaded, &curve);
    }

    #[test]
    fn bad_input_errors() {
        let cfg = ProbeConfig {
            bootstrap: 0,
            control: false,
            ..ProbeConfig::default()
        };
        let (xs, labels) = synthetic(1, 4, 40, &[], 0.0, 1);
        let v = [(0usize, xs[0].view())];
        // One class only.
        let e = fit_curve(&v, &[true; 40], "y", "h", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one class"), "{e}");
        // Too few examples of a class for the folds.
        let mut few = vec![false; 40];
        few[0] = true;
        few[1] = true;
        let e = fit_curve(&v, &few, "y", "h", &cfg).unwrap_err().to_string();
        assert!(e.contains("2 examples labelled true"), "{e}");
        // Mismatched lengths.
        let e = fit_curve(&v, &labels[..30], "y", "h", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("40 feature rows but 30 labels"), "{e}");
        // NaN / infinity named by layer and row.
        let mut bad = xs[0].clone();
        bad[[17, 2]] = f32::NAN;
        let e = fit_curve(&[(5, bad.view())], &labels, "y", "h", &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer 5") && e.contains("row 17") && e.contains("NaN"),
            "{e}"
        );
        bad[[17, 2]] = f32::INFINITY;
        let e = fit_curve(&[(5, bad.view())], &labels, "y", "h", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 17") && e.contains("inf"), "{e}");
        // Duplicate layer, no layers, bad config.
        let e = fit_curve(&[v[0], v[0]], &labels, "y", "h", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        assert!(fit_curve(&[], &labels, "y", "h", &cfg).is_err());
        let e = fit_curve(
            &v,
            &labels,
            "y",
            "h",
            &ProbeConfig {
                folds: 1,
                ..cfg.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("folds"), "{e}");
        // Missing curve file.
        let dir = tempfile::tempdir().unwrap();
        let e = ProbeCurve::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("curve.json"), "{e}");
    }
}
