//! Named hook points, hook specs (captures and interventions) and the per-forward hook context.
//!
//! Names follow TransformerLens' strings for the language model (`blocks.3.hook_resid_post`,
//! `blocks.3.attn.hook_pattern`), with `vision.`, `qformer.` and `projector.` prefixes for the
//! image side (see `docs/design.md` and the catalogue in [`HookPoint`]).
//!
//! A [`HookSpec`] says what to record and what to change. It is resolved once against a model's
//! hook list ([`HookSpec::resolve`]), which expands globs and rejects unknown names with a
//! suggestion, and then drives any number of forwards through a [`HookCtx`]. An empty spec costs
//! one branch per hook point.
//!
//! ```
//! use sycoscope::hooks::{HookSpec, HookPoint};
//! let spec = HookSpec::parse_captures("blocks.*.hook_resid_post@last, blocks.1.attn.hook_pattern@last").unwrap();
//! assert_eq!(spec.captures.len(), 2);
//! let hp: HookPoint = "blocks.1.attn.hook_pattern".parse().unwrap();
//! assert_eq!(hp.to_string(), "blocks.1.attn.hook_pattern");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::spans::Spans;

/// Which stack of blocks a block hook belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tower {
    /// The language model (`blocks.{i}`).
    Lm,
    /// The vision encoder (`vision.blocks.{j}`).
    Vision,
    /// The Q-Former of BLIP-2 / InstructBLIP (`qformer.blocks.{k}`).
    Qformer,
}

impl Tower {
    fn prefix(self) -> &'static str {
        match self {
            Tower::Lm => "blocks.",
            Tower::Vision => "vision.blocks.",
            Tower::Qformer => "qformer.blocks.",
        }
    }
}

/// A hook site inside one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Input of the block `[b, s, d]`.
    ResidPre,
    /// Query projection `[b, s, h, dh]` (after q-norm, before rotary).
    Q,
    /// Key projection `[b, s, kvh, dh]`.
    K,
    /// Value projection `[b, s, kvh, dh]`.
    V,
    /// Scaled, masked scores before softmax `[b, h, s, s]` (rows may be a selection).
    Scores,
    /// Attention probabilities `[b, h, s, s]`.
    Pattern,
    /// Q-Former cross-attention probabilities over the vision tokens `[b, h, q, n]`.
    CrossPattern,
    /// Attention output after the output projection `[b, s, d]`.
    AttnOut,
    /// `resid_pre + attn_out`.
    ResidMid,
    /// MLP output `[b, s, d]`.
    MlpOut,
    /// Output of the block `[b, s, d]`.
    ResidPost,
}

impl Site {
    const ALL: [Site; 11] = [
        Site::ResidPre,
        Site::Q,
        Site::K,
        Site::V,
        Site::Scores,
        Site::Pattern,
        Site::CrossPattern,
        Site::AttnOut,
        Site::ResidMid,
        Site::MlpOut,
        Site::ResidPost,
    ];
    /// Every site.
    pub fn all() -> &'static [Site] {
        &Self::ALL
    }
    fn suffix(self) -> &'static str {
        match self {
            Site::ResidPre => "hook_resid_pre",
            Site::Q => "attn.hook_q",
            Site::K => "attn.hook_k",
            Site::V => "attn.hook_v",
            Site::Scores => "attn.hook_attn_scores",
            Site::Pattern => "attn.hook_pattern",
            Site::CrossPattern => "crossattn.hook_pattern",
            Site::AttnOut => "hook_attn_out",
            Site::ResidMid => "hook_resid_mid",
            Site::MlpOut => "hook_mlp_out",
            Site::ResidPost => "hook_resid_post",
        }
    }
    /// The axis of the position (query row) dimension in this site's tensor.
    pub fn position_axis(self) -> usize {
        match self {
            Site::Scores | Site::Pattern | Site::CrossPattern => 2,
            _ => 1,
        }
    }
}

/// A typed hook point; parses from and prints to the string form of the hook catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// A site inside block `layer` of a tower.
    Block {
        tower: Tower,
        layer: usize,
        site: Site,
    },
    /// `ln_final.hook_normalized`: final norm output `[b, s, d]`.
    LnFinal,
    /// `logits` `[b, s, V]`.
    Logits,
    /// `vision.ln_post.hook_normalized`.
    VisionLnPost,
    /// `vision.deepstack.{k}.hook_out` (Qwen3-VL).
    Deepstack(usize),
    /// `projector.hook_out`: image features exactly as they replace the placeholders.
    Projector,
}

impl HookPoint {
    /// A language-model block hook.
    pub fn lm(layer: usize, site: Site) -> Self {
        HookPoint::Block {
            tower: Tower::Lm,
            layer,
            site,
        }
    }
    /// A vision block hook.
    pub fn vision(layer: usize, site: Site) -> Self {
        HookPoint::Block {
            tower: Tower::Vision,
            layer,
            site,
        }
    }
    /// A block hook in `tower`.
    pub fn block(tower: Tower, layer: usize, site: Site) -> Self {
        HookPoint::Block { tower, layer, site }
    }
    /// Axis of positions (query rows) in the hooked tensor.
    pub fn position_axis(&self) -> usize {
        match self {
            HookPoint::Block { site, .. } => site.position_axis(),
            _ => 1,
        }
    }
    /// True for hooks whose positions are the language model's token positions (where span
    /// names apply).
    pub fn on_text_positions(&self) -> bool {
        matches!(
            self,
            HookPoint::Block {
                tower: Tower::Lm,
                ..
            } | HookPoint::LnFinal
                | HookPoint::Logits
        )
    }
    /// The standard catalogue for a decoder of `lm_layers` blocks and a vision tower of
    /// `vision_layers` blocks (families add their extra points).
    pub fn standard(lm_layers: usize, vision_layers: usize) -> Vec<HookPoint> {
        let mut v = Vec::new();
        for i in 0..lm_layers {
            for s in Site::ALL {
                if s != Site::CrossPattern {
                    v.push(HookPoint::lm(i, s));
                }
            }
        }
        v.push(HookPoint::LnFinal);
        v.push(HookPoint::Logits);
        for j in 0..vision_layers {
            for s in Site::ALL {
                if s != Site::CrossPattern {
                    v.push(HookPoint::vision(j, s));
                }
            }
        }
        v.push(HookPoint::Projector);
        v
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Block { tower, layer, site } => {
                write!(f, "{}{}.{}", tower.prefix(), layer, site.suffix())
            }
            HookPoint::LnFinal => write!(f, "ln_final.hook_normalized"),
            HookPoint::Logits => write!(f, "logits"),
            HookPoint::VisionLnPost => write!(f, "vision.ln_post.hook_normalized"),
            HookPoint::Deepstack(k) => write!(f, "vision.deepstack.{k}.hook_out"),
            HookPoint::Projector => write!(f, "projector.hook_out"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || Error::UnknownHook {
            name: s.to_string(),
            suggestion: None,
        };
        match s {
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinal),
            "logits" => return Ok(HookPoint::Logits),
            "vision.ln_post.hook_normalized" => return Ok(HookPoint::VisionLnPost),
            "projector.hook_out" => return Ok(HookPoint::Projector),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("vision.deepstack.") {
            let k = rest
                .strip_suffix(".hook_out")
                .and_then(|k| k.parse().ok())
                .ok_or_else(unknown)?;
            return Ok(HookPoint::Deepstack(k));
        }
        for tower in [Tower::Vision, Tower::Qformer, Tower::Lm] {
            if let Some(rest) = s.strip_prefix(tower.prefix()) {
                let (layer, suffix) = rest.split_once('.').ok_or_else(unknown)?;
                let layer: usize = layer.parse().map_err(|_| unknown())?;
                let site = Site::ALL
                    .into_iter()
                    .find(|x| x.suffix() == suffix)
                    .ok_or_else(unknown)?;
                return Ok(HookPoint::Block { tower, layer, site });
            }
        }
        Err(unknown())
    }
}

/// Which positions (token positions, or query rows for attention hooks) a capture or an
/// intervention concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    /// Every position.
    All,
    /// The last position (the decision token).
    Last,
    /// A named span of the span table (`image`, `pressure`, `message2`, ...).
    Span(String),
    /// Explicit positions (of the unpadded sequence).
    Indices(Vec<usize>),
}

impl Positions {
    /// Parse `all`, `last`, a span name, or indices `3+5+9` / a range `3..7`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all" || s.is_empty() {
            return Ok(Positions::All);
        }
        if s == "last" || s == "decision" {
            return Ok(Positions::Last);
        }
        if s.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            if let Some((a, b)) = s.split_once("..") {
                let a: usize = a
                    .parse()
                    .map_err(|_| Error::input(format!("bad position range '{s}'")))?;
                let b: usize = b
                    .parse()
                    .map_err(|_| Error::input(format!("bad position range '{s}'")))?;
                return Ok(Positions::Indices((a..b).collect()));
            }
            let v: std::result::Result<Vec<usize>, _> =
                s.split('+').map(|x| x.trim().parse::<usize>()).collect();
            return v.map(Positions::Indices).map_err(|_| {
                Error::input(format!(
                    "bad positions '{s}': expected all, last, a span name, indices like 3+5+9 or a range 3..7"
                ))
            });
        }
        Ok(Positions::Span(s.to_string()))
    }
}

impl fmt::Display for Positions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Positions::All => write!(f, "all"),
            Positions::Last => write!(f, "last"),
            Positions::Span(s) => write!(f, "{s}"),
            Positions::Indices(v) => {
                let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                write!(f, "{}", s.join("+"))
            }
        }
    }
}

/// A reduction applied over the selected positions at capture time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Keep the selected positions (`[b, k, ...]`).
    None,
    /// Mean over the selected positions; the position axis is removed (`[b, ...]`).
    Mean,
}

/// One capture request: a hook name or glob, positions, a reduction.
#[derive(Debug, Clone, PartialEq)]
pub struct Capture {
    pub pattern: String,
    pub positions: Positions,
    pub reduce: Reduce,
}

impl Capture {
    /// The key under which this capture of `hook` is stored: the hook name for all positions,
    /// `name@positions` for a selection, with `:mean` for a reduction.
    pub fn key(&self, hook: &HookPoint) -> String {
        let mut k = hook.to_string();
        if self.positions != Positions::All || self.reduce != Reduce::None {
            k.push('@');
            k.push_str(&self.positions.to_string());
        }
        if self.reduce == Reduce::Mean {
            k.push_str(":mean");
        }
        k
    }
}

/// How an intervention changes an activation at the selected positions.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Add a vector over the last axis (steering), optionally scaled.
    Add(Tensor),
    /// Replace with a tensor broadcastable to the hooked one (or a vector over the last axis).
    Replace(Tensor),
    /// Set to zero.
    Zero,
    /// Multiply by a factor.
    Scale(f64),
}

/// An activation intervention.
#[derive(Debug, Clone)]
pub struct Intervention {
    pub pattern: String,
    pub positions: Positions,
    pub edit: Edit,
}

/// The rule of an attention-score edit, applied before the softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreRule {
    /// `z' = z + lambda * |z|` (PAI's additive rule, the MM-SY amplification default).
    AddAbs(f64),
    /// `z' = factor * z` (plain multiplicative variant).
    Scale(f64),
    /// `z' = z + c`.
    Add(f64),
}

/// Change the pre-softmax scores of chosen key positions for chosen query rows in chosen
/// language-model layers.
#[derive(Debug, Clone)]
pub struct ScoreEdit {
    pub layers: Vec<usize>,
    pub queries: Positions,
    pub keys: Positions,
    pub rule: ScoreRule,
}

/// Everything one forward should record or change.
#[derive(Debug, Clone, Default)]
pub struct HookSpec {
    pub captures: Vec<Capture>,
    pub interventions: Vec<Intervention>,
    pub score_edits: Vec<ScoreEdit>,
}

impl HookSpec {
    /// The empty spec (a plain forward).
    pub fn empty() -> Self {
        Self::default()
    }

    /// True when nothing is captured or changed.
    pub fn is_empty(&self) -> bool {
        self.captures.is_empty() && self.interventions.is_empty() && self.score_edits.is_empty()
    }

    /// Parse a capture list: items separated by commas or whitespace, each `NAME[@POSITIONS][:mean]`
    /// where NAME is a hook name or a glob (`blocks.*.hook_resid_post`), POSITIONS is `all`
    /// (default), `last`, a span name (`image`, `pressure`, ...), indices `3+5` or a range `3..7`.
    pub fn parse_captures(list: &str) -> Result<Self> {
        let mut spec = HookSpec::default();
        for item in list
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let (rest, reduce) = match item.strip_suffix(":mean") {
                Some(r) => (r, Reduce::Mean),
                None => (item, Reduce::None),
            };
            let (pattern, positions) = match rest.split_once('@') {
                Some((p, pos)) => (p, Positions::parse(pos)?),
                None => (rest, Positions::All),
            };
            spec.captures.push(Capture {
                pattern: pattern.to_string(),
                positions,
                reduce,
            });
        }
        Ok(spec)
    }

    /// Resolve names and globs against the hook points a model has. Unknown names are an error
    /// that suggests the nearest real name; a glob that matches nothing is an error too.
    pub fn resolve(&self, available: &[HookPoint]) -> Result<ResolvedSpec> {
        let names: Vec<(String, HookPoint)> =
            available.iter().map(|h| (h.to_string(), *h)).collect();
        let expand = |pattern: &str| -> Result<Vec<HookPoint>> {
            let hits: Vec<HookPoint> = if pattern.contains(['*', '?', '[']) {
                let pat = glob::Pattern::new(pattern)
                    .map_err(|e| Error::input(format!("bad hook glob '{pattern}': {e}")))?;
                names
                    .iter()
                    .filter(|(n, _)| pat.matches(n))
                    .map(|(_, h)| *h)
                    .collect()
            } else {
                names
                    .iter()
                    .filter(|(n, _)| n == pattern)
                    .map(|(_, h)| *h)
                    .collect()
            };
            if hits.is_empty() {
                let suggestion = names
                    .iter()
                    .map(|(n, _)| (strsim::levenshtein(n, pattern), n))
                    .min()
                    .map(|(_, n)| n.clone());
                return Err(Error::UnknownHook {
                    name: pattern.to_string(),
                    suggestion,
                });
            }
            Ok(hits)
        };
        let mut r = ResolvedSpec::default();
        for c in &self.captures {
            for h in expand(&c.pattern)? {
                check_positions(&h, &c.positions)?;
                r.captures.entry(h).or_default().push(c.clone());
            }
        }
        for iv in &self.interventions {
            for h in expand(&iv.pattern)? {
                check_positions(&h, &iv.positions)?;
                r.interventions.entry(h).or_default().push(iv.clone());
            }
        }
        let lm_layers = available
            .iter()
            .filter_map(|h| match h {
                HookPoint::Block {
                    tower: Tower::Lm,
                    layer,
                    ..
                } => Some(*layer + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        for e in &self.score_edits {
            {
                let (ScoreRule::AddAbs(x) | ScoreRule::Scale(x) | ScoreRule::Add(x)) = e.rule;
                if !x.is_finite() {
                    return Err(Error::input(format!(
                        "attention score edit: the factor must be finite, got {x}"
                    )));
                }
            }
            for &l in &e.layers {
                if l >= lm_layers {
                    return Err(Error::input(format!(
                        "attention score edit on layer {l}: the model has layers 0..{lm_layers}"
                    )));
                }
                r.score_edits.entry(l).or_default().push(e.clone());
            }
        }
        Ok(r)
    }
}

fn check_positions(h: &HookPoint, p: &Positions) -> Result<()> {
    if let Positions::Span(name) = p {
        if !h.on_text_positions() {
            return Err(Error::input(format!(
                "hook '{h}': span '{name}' names language-model positions; use all, last or indices for this hook"
            )));
        }
    }
    Ok(())
}

/// A spec resolved against one model's hook points: reusable across forwards.
#[derive(Debug, Clone, Default)]
pub struct ResolvedSpec {
    pub captures: HashMap<HookPoint, Vec<Capture>>,
    pub interventions: HashMap<HookPoint, Vec<Intervention>>,
    pub score_edits: HashMap<usize, Vec<ScoreEdit>>,
}

impl ResolvedSpec {
    /// True when nothing is captured or changed.
    pub fn is_empty(&self) -> bool {
        self.captures.is_empty() && self.interventions.is_empty() && self.score_edits.is_empty()
    }
    /// The hooks that will be captured, sorted by name.
    pub fn captured_hooks(&self) -> Vec<HookPoint> {
        let mut v: Vec<HookPoint> = self.captures.keys().copied().collect();
        v.sort();
        v
    }
}

/// Tensors recorded by a forward, by key ([`Capture::key`]).
#[derive(Debug, Clone, Default)]
pub struct Captures {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Captures {
    /// A captured tensor by key.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }
    /// The captured tensor of `key`, or an error naming the keys that exist.
    pub fn require(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| {
            Error::input(format!(
                "no capture '{key}' (captured: {})",
                self.tensors.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

/// The per-forward hook state: the resolved spec, the span table of each batch row, and the
/// captures being recorded.
pub struct HookCtx<'a> {
    spec: Option<&'a ResolvedSpec>,
    spans: Vec<Spans>,
    /// Absolute position of the first row of the current chunk (KV-cache decoding).
    pub offset: usize,
    pub captures: Captures,
}

impl<'a> HookCtx<'a> {
    /// A context that records and changes nothing (plain forward).
    pub fn none() -> Self {
        HookCtx {
            spec: None,
            spans: Vec::new(),
            offset: 0,
            captures: Captures::default(),
        }
    }

    /// A context for `spec`, with the span table of each batch row (already shifted for padding).
    pub fn new(spec: &'a ResolvedSpec, spans: Vec<Spans>) -> Self {
        HookCtx {
            spec: if spec.is_empty() { None } else { Some(spec) },
            spans,
            offset: 0,
            captures: Captures::default(),
        }
    }

    /// True when this forward records or changes nothing.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.spec.is_none()
    }

    /// True when `hp` is captured or changed.
    #[inline]
    pub fn wants(&self, hp: &HookPoint) -> bool {
        match self.spec {
            None => false,
            Some(s) => s.captures.contains_key(hp) || s.interventions.contains_key(hp),
        }
    }

    /// Pass `x` through hook point `hp`: apply interventions, record captures, return the
    /// (possibly changed) tensor.
    #[inline]
    pub fn hook(&mut self, hp: HookPoint, x: Tensor) -> Result<Tensor> {
        match self.spec {
            None => Ok(x),
            Some(spec) => self.hook_slow(spec, hp, x),
        }
    }

    fn hook_slow(&mut self, spec: &ResolvedSpec, hp: HookPoint, mut x: Tensor) -> Result<Tensor> {
        if let Some(ivs) = spec.interventions.get(&hp) {
            for iv in ivs {
                x = self.intervene(&hp, iv, &x)?;
            }
        }
        if let Some(caps) = spec.captures.get(&hp) {
            for c in caps {
                if let Some(t) = self.select(&hp, &c.positions, c.reduce, &x)? {
                    self.captures.tensors.insert(c.key(&hp), t);
                }
            }
        }
        Ok(x)
    }

    /// Positions selected in batch row `b` for a chunk of `n` rows, relative to the chunk.
    fn rows_for(&self, hp: &HookPoint, p: &Positions, b: usize, n: usize) -> Result<Vec<usize>> {
        let off = if hp.on_text_positions() {
            self.offset
        } else {
            0
        };
        self.rows_at(hp, p, b, n, off)
    }

    /// Positions selected in batch row `b` for a chunk of `n` rows starting at absolute `off`.
    fn rows_at(
        &self,
        hp: &HookPoint,
        p: &Positions,
        b: usize,
        n: usize,
        off: usize,
    ) -> Result<Vec<usize>> {
        let rel = |abs: usize| abs.checked_sub(off).filter(|r| *r < n);
        Ok(match p {
            Positions::All => (0..n).collect(),
            Positions::Last => vec![n - 1],
            Positions::Indices(v) => {
                let pad = if hp.on_text_positions() {
                    self.pad_of(b)
                } else {
                    0
                };
                let mut out = Vec::with_capacity(v.len());
                for &i in v {
                    match rel(i + pad) {
                        Some(r) => out.push(r),
                        None if off > 0 => {}
                        None => {
                            return Err(Error::input(format!(
                                "hook '{hp}': position {i} is outside the sequence (length {})",
                                n.saturating_sub(pad)
                            )))
                        }
                    }
                }
                out
            }
            Positions::Span(name) => {
                let spans = self.spans.get(b).ok_or_else(|| {
                    Error::input(format!(
                        "hook '{hp}': span '{name}' asked for, but this input has no span table"
                    ))
                })?;
                let (s, e) = spans.range(name)?;
                (s..e).filter_map(rel).collect()
            }
        })
    }

    fn pad_of(&self, b: usize) -> usize {
        self.spans.get(b).map(|s| s.pad).unwrap_or(0)
    }

    /// Select (and reduce) the captured positions; `None` when, while extending a cache, the
    /// positions asked for all lie in the cached part (their activations were captured before).
    fn select(
        &self,
        hp: &HookPoint,
        p: &Positions,
        reduce: Reduce,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        let axis = hp.position_axis();
        if x.rank() <= axis {
            // pooled tensors ([b, d]) have no position axis
            return Ok(Some(x.clone()));
        }
        if *p == Positions::All && reduce == Reduce::None {
            return Ok(Some(x.clone()));
        }
        let (b, n) = (x.dim(0)?, x.dim(axis)?);
        let mut rows = Vec::with_capacity(b);
        for bi in 0..b {
            let idx = self.rows_for(hp, p, bi, n)?;
            if idx.is_empty() && self.offset > 0 && hp.on_text_positions() {
                return Ok(None);
            }
            if idx.is_empty() {
                return Err(Error::input(format!(
                    "hook '{hp}': positions '{p}' select nothing in batch row {bi}"
                )));
            }
            let xb = x.narrow(0, bi, 1)?;
            let sel = if is_contiguous_range(&idx) {
                xb.narrow(axis, idx[0], idx.len())?
            } else {
                let it = Tensor::from_vec(
                    idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    idx.len(),
                    x.device(),
                )?;
                xb.index_select(&it, axis)?
            };
            let sel = match reduce {
                Reduce::None => sel.contiguous()?,
                Reduce::Mean => sel.mean(axis)?,
            };
            rows.push(sel);
        }
        if reduce == Reduce::None {
            let k0 = rows[0].dim(axis)?;
            if rows.iter().any(|r| r.dim(axis).ok() != Some(k0)) {
                return Err(Error::input(format!(
                    "hook '{hp}': positions '{p}' select a different number of positions in each batch row; use :mean or capture rows one at a time"
                )));
            }
        }
        Ok(Some(Tensor::cat(&rows, 0)?))
    }

    /// A `[b, n]` mask (1 = selected) over the positions of a chunk, shaped to broadcast against
    /// `x` (positions on `axis`).
    fn mask(&self, hp: &HookPoint, p: &Positions, x: &Tensor) -> Result<Option<Tensor>> {
        if *p == Positions::All {
            return Ok(None);
        }
        let axis = hp.position_axis();
        let (b, n) = (x.dim(0)?, x.dim(axis)?);
        let mut m = vec![0u8; b * n];
        for bi in 0..b {
            for r in self.rows_for(hp, p, bi, n)? {
                m[bi * n + r] = 1;
            }
        }
        let mut shape = vec![1usize; x.rank()];
        shape[0] = b;
        shape[axis] = n;
        Ok(Some(Tensor::from_vec(m, shape, x.device())?))
    }

    fn intervene(&self, hp: &HookPoint, iv: &Intervention, x: &Tensor) -> Result<Tensor> {
        let mask = self.mask(hp, &iv.positions, x)?;
        let edited = match &iv.edit {
            Edit::Add(v) => x.broadcast_add(&v.to_dtype(x.dtype())?.to_device(x.device())?)?,
            Edit::Replace(v) => v
                .to_dtype(x.dtype())?
                .to_device(x.device())?
                .broadcast_as(x.shape())
                .map_err(|_| {
                    Error::input(format!(
                        "intervention on '{hp}': replacement of shape {:?} does not fit {:?}",
                        v.dims(),
                        x.dims()
                    ))
                })?
                .contiguous()?,
            Edit::Zero => x.zeros_like()?,
            Edit::Scale(f) => (x * *f)?,
        };
        if edited.dims() != x.dims() {
            return Err(Error::input(format!(
                "intervention on '{hp}': the edit gives shape {:?}, the hook has {:?}",
                edited.dims(),
                x.dims()
            )));
        }
        match mask {
            None => Ok(edited),
            Some(m) => Ok(m.broadcast_as(x.shape())?.where_cond(&edited, x)?),
        }
    }

    /// Apply the score edits configured for LM layer `layer` to `scores` `[b, h, q, k]`.
    pub fn edit_scores(&self, layer: usize, scores: Tensor) -> Result<Tensor> {
        let Some(spec) = self.spec else {
            return Ok(scores);
        };
        let Some(edits) = spec.score_edits.get(&layer) else {
            return Ok(scores);
        };
        let mut z = scores;
        let (b, _h, q, k) = z.dims4()?;
        let hp = HookPoint::lm(layer, Site::Scores);
        for e in edits {
            let mut m = vec![0u8; b * q * k];
            for bi in 0..b {
                let qs = self.rows_for(&hp, &e.queries, bi, q)?;
                // keys are absolute positions 0..k (the cache included)
                let ks = self.rows_at(&hp, &e.keys, bi, k, 0)?;
                for &qi in &qs {
                    for &ki in &ks {
                        m[(bi * q + qi) * k + ki] = 1;
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, q, k), z.device())?.broadcast_as(z.shape())?;
            let edited = match e.rule {
                ScoreRule::AddAbs(l) => (&z + (z.abs()? * l)?)?,
                ScoreRule::Scale(f) => (&z * f)?,
                ScoreRule::Add(c) => (&z + c)?,
            };
            // masked (-inf) entries stay masked
            let finite = z.ge(f32::MIN as f64)?;
            let mask = (mask.to_dtype(DType::U8)? * finite)?;
            z = mask.where_cond(&edited, &z)?;
        }
        Ok(z)
    }

    /// Set the span table of each batch row (positions in the padded layout).
    pub fn set_spans(&mut self, spans: Vec<Spans>) {
        self.spans = spans;
    }

    /// Number of batch rows with span tables.
    pub fn batch_spans(&self) -> &[Spans] {
        &self.spans
    }
}

fn is_contiguous_range(idx: &[usize]) -> bool {
    idx.windows(2).all(|w| w[1] == w[0] + 1)
}

/// Build a `[n]` f32 vector tensor on `device` (for steering vectors).
pub fn vector(values: &[f32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values, values.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            "blocks.0.hook_resid_pre",
            "blocks.12.attn.hook_pattern",
            "blocks.3.attn.hook_attn_scores",
            "blocks.3.attn.hook_q",
            "vision.blocks.2.hook_resid_post",
            "vision.ln_post.hook_normalized",
            "vision.deepstack.1.hook_out",
            "projector.hook_out",
            "qformer.blocks.0.crossattn.hook_pattern",
            "ln_final.hook_normalized",
            "logits",
        ] {
            let h: HookPoint = s.parse().unwrap();
            assert_eq!(h.to_string(), s);
        }
        assert!("blocks.x.hook_resid_pre".parse::<HookPoint>().is_err());
        assert!("blocks.1.hook_resid_pots".parse::<HookPoint>().is_err());
    }

    #[test]
    fn unknown_hook_suggests_nearest() {
        let avail = HookPoint::standard(2, 1);
        let spec = HookSpec::parse_captures("blocks.1.hook_resid_pots").unwrap();
        match spec.resolve(&avail) {
            Err(Error::UnknownHook { suggestion, .. }) => {
                assert_eq!(suggestion.as_deref(), Some("blocks.1.hook_resid_post"))
            }
            other => panic!("expected UnknownHook, got {other:?}"),
        }
        let spec = HookSpec::parse_captures("blocks.*.hook_resid_post@last").unwrap();
        let r = spec.resolve(&avail).unwrap();
        assert_eq!(r.captures.len(), 2);
        assert!(HookSpec::parse_captures("blocks.9.*")
            .unwrap()
            .resolve(&avail)
            .is_err());
    }

    #[test]
    fn select_and_intervene() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 4, 3))
            .unwrap();
        let spec = HookSpec::parse_captures(
            "blocks.0.hook_resid_post@last blocks.0.hook_resid_pre@1..3:mean",
        )
        .unwrap();
        let r = spec.resolve(&HookPoint::standard(1, 0)).unwrap();
        let spans = vec![
            Spans {
                len: 4,
                ..Default::default()
            };
            2
        ];
        let mut ctx = HookCtx::new(&r, spans);
        ctx.hook(HookPoint::lm(0, Site::ResidPost), x.clone())
            .unwrap();
        ctx.hook(HookPoint::lm(0, Site::ResidPre), x.clone())
            .unwrap();
        let last = ctx
            .captures
            .require("blocks.0.hook_resid_post@last")
            .unwrap();
        assert_eq!(last.dims(), &[2, 1, 3]);
        assert_eq!(
            last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![9., 10., 11., 21., 22., 23.]
        );
        let m = ctx
            .captures
            .require("blocks.0.hook_resid_pre@1+2:mean")
            .unwrap();
        assert_eq!(m.dims(), &[2, 3]);
        assert_eq!(m.to_vec2::<f32>().unwrap()[0], vec![4.5, 5.5, 6.5]);
        // steering at the last position only
        let spec = HookSpec {
            interventions: vec![Intervention {
                pattern: "blocks.0.hook_resid_post".into(),
                positions: Positions::Last,
                edit: Edit::Add(vector(&[1., 1., 1.], &dev).unwrap()),
            }],
            ..Default::default()
        };
        let r = spec.resolve(&HookPoint::standard(1, 0)).unwrap();
        let mut ctx = HookCtx::new(&r, vec![]);
        let y = ctx
            .hook(HookPoint::lm(0, Site::ResidPost), x.clone())
            .unwrap();
        let d = (y - &x)
            .unwrap()
            .sum((0, 2))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(d, vec![0., 0., 0., 6.]);
    }

    #[test]
    fn score_edit_add_abs() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[[[1f32, -2., f32::NEG_INFINITY], [3., -4., 5.]]]], &dev).unwrap();
        let spec = HookSpec {
            score_edits: vec![ScoreEdit {
                layers: vec![0],
                queries: Positions::Indices(vec![1]),
                keys: Positions::Indices(vec![1, 2]),
                rule: ScoreRule::AddAbs(0.5),
            }],
            ..Default::default()
        };
        let r = spec.resolve(&HookPoint::standard(1, 0)).unwrap();
        let ctx = HookCtx::new(&r, vec![]);
        let out = ctx
            .edit_scores(0, z)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(out, vec![1., -2., f32::NEG_INFINITY, 3., -2., 7.5]);
    }
}
