//! Multi-head attention with its hook points (`hook_q/k/v`, `hook_attn_scores`, `hook_pattern`)
//! and the pre-softmax score edits used by the attention-amplification experiment.
//!
//! Attention is computed explicitly (scores, softmax, weighted sum), so patterns always exist;
//! capturing them only narrows the query rows asked for.

use candle_core::{DType, Tensor, D};
use candle_nn::{Linear, Module};

use crate::error::Result;
use crate::hooks::{HookCtx, HookPoint, Site, Tower};

use super::norm::Norm;
use super::rotary::Rope;

/// Query/key/value projections: separate linears or one fused `[q | k | v]` linear.
#[derive(Debug, Clone)]
pub enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// `(k, v)` per layer, `[b, kvh, s, dh]` (keys after rotary).
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `n` layers.
    pub fn new(n: usize) -> Self {
        KvCache {
            layers: vec![None; n],
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Repeat every batch row `n` times (share one prefix among several continuations).
    pub fn repeat_batch(&self, n: usize) -> Result<Self> {
        let mut out = KvCache::new(self.layers.len());
        for (o, l) in out.layers.iter_mut().zip(&self.layers) {
            if let Some((k, v)) = l {
                let rep = |t: &Tensor| -> Result<Tensor> {
                    let b = t.dim(0)?;
                    let idx: Vec<u32> = (0..b as u32)
                        .flat_map(|i| std::iter::repeat_n(i, n))
                        .collect();
                    let idx = Tensor::from_vec(idx, b * n, t.device())?;
                    Ok(t.index_select(&idx, 0)?)
                };
                *o = Some((rep(k)?, rep(v)?));
            }
        }
        Ok(out)
    }
}

/// A self-attention layer.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    pub o: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of `q k^T` (usually `head_dim^-0.5`).
    pub scale: f64,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
}

impl Attention {
    /// Project `x` `[b, s, d]` to queries, keys and values `[b, s, heads, dh]`.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            QkvProj::Fused(l) => {
                let y = l.forward(x)?;
                let nq = self.n_heads * self.head_dim;
                let nk = self.n_kv_heads * self.head_dim;
                (
                    y.narrow(D::Minus1, 0, nq)?,
                    y.narrow(D::Minus1, nq, nk)?,
                    y.narrow(D::Minus1, nq + nk, nk)?,
                )
            }
        };
        let q = q.reshape((b, s, self.n_heads, self.head_dim))?;
        let k = k.reshape((b, s, self.n_kv_heads, self.head_dim))?;
        let v = v.reshape((b, s, self.n_kv_heads, self.head_dim))?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        Ok((q, k, v))
    }

    /// Self-attention over `x` `[b, s, d]`. `mask` is additive `[b, 1, s, s_total]` (0 or -inf),
    /// `None` for full attention. With a cache, keys and values are appended to it and the
    /// queries attend to every cached position.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &mut HookCtx,
        tower: Tower,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (q, k, v) = self.project(x)?;
        let q = ctx.hook(HookPoint::block(tower, layer, Site::Q), q)?;
        let k = ctx.hook(HookPoint::block(tower, layer, Site::K), k)?;
        let v = ctx.hook(HookPoint::block(tower, layer, Site::V), v)?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let mut k = k.transpose(1, 2)?.contiguous()?;
        let mut v = v.transpose(1, 2)?.contiguous()?;
        let q = match rope {
            Some(r) => r.apply(&q)?,
            None => q,
        };
        if let Some(r) = rope {
            k = r.apply(&k)?;
        }
        if let Some(c) = cache {
            if let Some((pk, pv)) = c.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *c = Some((k.clone(), v.clone()));
        }
        let out = self.attend(&q, &k, &v, mask, ctx, tower, layer)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.n_heads * self.head_dim))?;
        Ok(self.o.forward(&out)?)
    }

    /// Scores, edits, softmax and the weighted sum, with the score and pattern hooks.
    /// `q` `[b, h, sq, dh]`, `k`/`v` `[b, kvh, sk, dh]`; returns `[b, h, sq, dh]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        ctx: &mut HookCtx,
        tower: Tower,
        layer: usize,
    ) -> Result<Tensor> {
        let n_rep = self.n_heads / self.n_kv_heads.max(1);
        let k = candle_transformers::utils::repeat_kv(k.clone(), n_rep)?;
        let v = candle_transformers::utils::repeat_kv(v.clone(), n_rep)?;
        attend_core(
            q,
            &k,
            &v,
            self.scale,
            mask,
            ctx,
            tower,
            layer,
            Site::Scores,
            Site::Pattern,
        )
    }
}

/// The explicit attention kernel shared by self- and cross-attention. Heads must match.
pub fn attend_core(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    ctx: &mut HookCtx,
    tower: Tower,
    layer: usize,
    scores_site: Site,
    pattern_site: Site,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let mut scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(DType::F32)?)?;
    }
    if !ctx.is_empty() {
        if tower == Tower::Lm {
            scores = ctx.edit_scores(layer, scores)?;
        }
        scores = ctx.hook(HookPoint::block(tower, layer, scores_site), scores)?;
    }
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = ctx.hook(HookPoint::block(tower, layer, pattern_site), probs)?;
    Ok(probs.to_dtype(dtype)?.matmul(v)?)
}
