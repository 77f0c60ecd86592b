//! The Q-Former of BLIP-2 and InstructBLIP: a BERT-style encoder with post-LayerNorm residual
//! layers that runs a fixed set of learned query tokens (and, for InstructBLIP, the instruction's
//! tokens) through self-attention, lets the queries cross-attend to the vision tokens every
//! `cross_attention_frequency` layers, and gives queries and text tokens separate feed-forward
//! networks (`intermediate_query` / `output_query` for queries, `intermediate` / `output` for
//! text).
//!
//! Hook points (`Tower::Qformer`): `qformer.blocks.{k}.hook_resid_post` `[b, q(+t), dq]`,
//! `qformer.blocks.{k}.attn.hook_pattern` `[b, h, q(+t), q(+t)]` and, in layers with
//! cross-attention, `qformer.blocks.{k}.crossattn.hook_pattern` `[b, h, q, n]`.

use candle_core::{DType, Tensor};
use candle_nn::{Embedding, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint, Site, Tower};

use super::attention::attend_core;
use super::mlp::{linear, Activation, Mlp};
use super::norm::Norm;

fn d_hidden() -> usize {
    768
}
fn d_inter() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-12
}
fn d_freq() -> usize {
    2
}
fn d_encoder_hidden() -> usize {
    1408
}
fn d_max_pos() -> usize {
    512
}
fn d_vocab() -> usize {
    30522
}

/// The `qformer_config` of a BLIP-2 / InstructBLIP checkpoint (transformers defaults where a
/// key is absent).
#[derive(Debug, Clone, Deserialize)]
pub struct QformerConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// A layer has cross-attention when `layer % cross_attention_frequency == 0`.
    #[serde(default = "d_freq")]
    pub cross_attention_frequency: usize,
    /// Width of the vision tokens the queries attend to.
    #[serde(default = "d_encoder_hidden")]
    pub encoder_hidden_size: usize,
    /// Longest instruction (InstructBLIP) the text position table covers.
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Only `absolute` is supported.
    pub position_embedding_type: Option<String>,
}

/// BERT attention with its output sub-layer: `LayerNorm(dense(attn(x, kv)) + x)`.
#[derive(Debug, Clone)]
pub struct BertAttention {
    /// `attention.query`.
    pub q: Linear,
    /// `attention.key` (reads the vision width in cross-attention).
    pub k: Linear,
    /// `attention.value`.
    pub v: Linear,
    /// `output.dense`.
    pub out: Linear,
    /// `output.LayerNorm` (post-LN over `out + input`).
    pub norm: Norm,
    pub n_heads: usize,
    pub head_dim: usize,
}

impl BertAttention {
    /// Load `attention.{query,key,value}` and `output.{dense,LayerNorm}` under `vb`; keys and
    /// values read `d_kv`-wide tokens.
    pub fn load(vb: VarBuilder, d: usize, d_kv: usize, n_heads: usize, eps: f64) -> Result<Self> {
        if n_heads == 0 || !d.is_multiple_of(n_heads) {
            return Err(Error::msg(format!(
                "Q-Former width {d} is not a multiple of its {n_heads} attention heads"
            )));
        }
        let a = vb.pp("attention");
        let o = vb.pp("output");
        Ok(BertAttention {
            q: linear(a.pp("query"), d, d, true)?,
            k: linear(a.pp("key"), d_kv, d, true)?,
            v: linear(a.pp("value"), d_kv, d, true)?,
            out: linear(o.pp("dense"), d, d, true)?,
            norm: Norm::layer(o.pp("LayerNorm"), d, eps)?,
            n_heads,
            head_dim: d / n_heads,
        })
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        Ok(x.reshape((b, s, self.n_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Attention of `x` `[b, s, d]` over `kv` `[b, n, d_kv]` (`x` itself for self-attention),
    /// with an additive key mask `[b, 1, 1, n]`; the pattern goes through `pattern` (hooked).
    pub fn forward(
        &self,
        x: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
        ctx: &mut HookCtx,
        layer: usize,
        pattern: Site,
    ) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let q = self.heads(&self.q.forward(x)?)?;
        let k = self.heads(&self.k.forward(kv)?)?;
        let v = self.heads(&self.v.forward(kv)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ctx_out = match pattern {
            // self-attention: the shared kernel (scores hook, pattern hook)
            Site::Pattern => attend_core(
                &q,
                &k,
                &v,
                scale,
                mask,
                ctx,
                Tower::Qformer,
                layer,
                Site::Scores,
                Site::Pattern,
            )?,
            // cross-attention has a pattern hook only (no scores site of its own)
            _ => {
                let mut scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
                if let Some(m) = mask {
                    scores = scores.broadcast_add(&m.to_dtype(DType::F32)?)?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let probs = ctx.hook(HookPoint::block(Tower::Qformer, layer, pattern), probs)?;
                probs.to_dtype(q.dtype())?.matmul(&v)?
            }
        };
        let h = ctx_out.transpose(1, 2)?.reshape((b, s, d))?;
        self.norm.forward(&(self.out.forward(&h)? + x)?)
    }
}

/// A BERT feed-forward sub-layer: `LayerNorm(dense2(act(dense1(x))) + x)`.
#[derive(Debug, Clone)]
pub struct BertFfn {
    pub mlp: Mlp,
    pub norm: Norm,
}

impl BertFfn {
    /// Load `{inter}.dense`, `{out}.dense`, `{out}.LayerNorm` under `vb`.
    pub fn load(
        vb: VarBuilder,
        inter: &str,
        out: &str,
        d: usize,
        d_inter: usize,
        act: Activation,
        eps: f64,
    ) -> Result<Self> {
        Ok(BertFfn {
            mlp: Mlp::plain(
                vb.clone(),
                (&format!("{inter}.dense"), &format!("{out}.dense")),
                d,
                d_inter,
                d,
                act,
                true,
            )?,
            norm: Norm::layer(vb.pp(out).pp("LayerNorm"), d, eps)?,
        })
    }

    /// Apply to `x` `[b, s, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&(self.mlp.forward(x)? + x)?)
    }
}

/// One Q-Former layer.
#[derive(Debug, Clone)]
pub struct QformerLayer {
    pub self_attn: BertAttention,
    /// Present in layers `k` with `k % cross_attention_frequency == 0`.
    pub cross_attn: Option<BertAttention>,
    pub ffn_query: BertFfn,
    /// The text tokens' feed-forward (InstructBLIP; absent when the Q-Former reads no text).
    pub ffn_text: Option<BertFfn>,
}

/// The instruction embedding of InstructBLIP's Q-Former: word + absolute position embeddings.
#[derive(Debug, Clone)]
pub struct QformerTextEmbed {
    pub word: Embedding,
    /// `[max_positions, d]`.
    pub positions: Tensor,
}

/// The Q-Former.
#[derive(Debug, Clone)]
pub struct Qformer {
    /// Learned queries `[q, d]`.
    pub query_tokens: Tensor,
    /// LayerNorm over the input sequence (BLIP-2: `layernorm`; InstructBLIP:
    /// `embeddings.layernorm`, over queries and text together).
    pub embed_norm: Norm,
    pub text_embed: Option<QformerTextEmbed>,
    pub layers: Vec<QformerLayer>,
    pub hidden_size: usize,
}

impl Qformer {
    /// Load from `vb` (the `qformer.` prefix) and the learned queries `query_tokens`
    /// `[1, q, d]` or `[q, d]`. With `with_text`, the instruction embeddings and the text
    /// feed-forward networks are loaded too (InstructBLIP).
    pub fn load(
        vb: VarBuilder,
        query_tokens: Tensor,
        c: &QformerConfig,
        with_text: bool,
    ) -> Result<Self> {
        if c.cross_attention_frequency == 0 {
            return Err(Error::msg(
                "qformer_config.cross_attention_frequency must be at least 1",
            ));
        }
        if let Some(t) = c.position_embedding_type.as_deref() {
            if t != "absolute" {
                return Err(Error::msg(format!(
                    "qformer_config.position_embedding_type '{t}' is not supported (absolute only)"
                )));
            }
        }
        let d = c.hidden_size;
        let act = Activation::from_hf(&c.hidden_act)?;
        let eps = c.layer_norm_eps;
        let q_dims = query_tokens.dims().to_vec();
        let query_tokens = match q_dims.as_slice() {
            [1, q, dd] | [q, dd] if *dd == d => query_tokens.reshape((*q, d))?,
            _ => {
                return Err(Error::Weights(format!(
                    "query_tokens has shape {q_dims:?}; expected [1, num_query_tokens, {d}]"
                )))
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for k in 0..c.num_hidden_layers {
            let vl = vb.pp(format!("encoder.layer.{k}"));
            let h = c.num_attention_heads;
            layers.push(QformerLayer {
                self_attn: BertAttention::load(vl.pp("attention"), d, d, h, eps)?,
                cross_attn: if k % c.cross_attention_frequency == 0 {
                    Some(BertAttention::load(
                        vl.pp("crossattention"),
                        d,
                        c.encoder_hidden_size,
                        h,
                        eps,
                    )?)
                } else {
                    None
                },
                ffn_query: BertFfn::load(
                    vl.clone(),
                    "intermediate_query",
                    "output_query",
                    d,
                    c.intermediate_size,
                    act,
                    eps,
                )?,
                ffn_text: if with_text {
                    Some(BertFfn::load(
                        vl,
                        "intermediate",
                        "output",
                        d,
                        c.intermediate_size,
                        act,
                        eps,
                    )?)
                } else {
                    None
                },
            });
        }
        let (embed_norm, text_embed) = if with_text {
            let e = vb.pp("embeddings");
            let w = e.pp("word_embeddings").get((c.vocab_size, d), "weight")?;
            (
                Norm::layer(e.pp("layernorm"), d, eps)?,
                Some(QformerTextEmbed {
                    word: Embedding::new(w, d),
                    positions: e
                        .pp("position_embeddings")
                        .get((c.max_position_embeddings, d), "weight")?,
                }),
            )
        } else {
            (Norm::layer(vb.pp("layernorm"), d, eps)?, None)
        };
        Ok(Qformer {
            query_tokens,
            embed_norm,
            text_embed,
            layers,
            hidden_size: d,
        })
    }

    /// Number of learned queries.
    pub fn num_queries(&self) -> usize {
        self.query_tokens.dim(0).unwrap_or(0)
    }

    /// Longest instruction the text position table covers (0 without text input).
    pub fn max_text_len(&self) -> usize {
        self.text_embed
            .as_ref()
            .and_then(|t| t.positions.dim(0).ok())
            .unwrap_or(0)
    }

    /// True when layer `k` has cross-attention.
    pub fn has_cross_attention(&self, k: usize) -> bool {
        self.layers.get(k).is_some_and(|l| l.cross_attn.is_some())
    }

    /// Run the Q-Former for `b` images: `image` `[b, n, dv]` are the vision tokens; `text`
    /// (InstructBLIP) holds right-padded instruction ids `[b, t]` (u32) and their validity
    /// (1 = token, 0 = padding). Returns `[b, q + t, d]` (queries first).
    pub fn forward(
        &self,
        image: &Tensor,
        text: Option<(&Tensor, &[Vec<u8>])>,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let (b, _n, _) = image.dims3()?;
        let dev = image.device();
        let (q, d) = self.query_tokens.dims2()?;
        let queries = self
            .query_tokens
            .to_dtype(image.dtype())?
            .unsqueeze(0)?
            .broadcast_as((b, q, d))?
            .contiguous()?;
        let (x, mask) = match (text, &self.text_embed) {
            (Some((ids, valid)), Some(te)) => {
                let (bt, t) = ids.dims2()?;
                if bt != b || valid.len() != b || valid.iter().any(|v| v.len() != t) {
                    return Err(Error::input(format!(
                        "Q-Former text of shape [{bt}, {t}] (validity for {} rows) for {b} images",
                        valid.len()
                    )));
                }
                let max_t = te.positions.dim(0)?;
                if t > max_t {
                    return Err(Error::input(format!(
                        "the Q-Former instruction has {t} tokens; this Q-Former's position table holds {max_t}"
                    )));
                }
                let words = te.word.forward(ids)?;
                let pos = te.positions.narrow(0, 0, t)?.unsqueeze(0)?;
                let words = words.broadcast_add(&pos)?;
                let x = Tensor::cat(&[&queries, &words.to_dtype(queries.dtype())?], 1)?;
                let mut m = Vec::with_capacity(b * (q + t));
                for row in valid {
                    m.extend(std::iter::repeat_n(0f32, q));
                    m.extend(
                        row.iter()
                            .map(|&v| if v == 1 { 0f32 } else { f32::NEG_INFINITY }),
                    );
                }
                let mask = Tensor::from_vec(m, (b, 1, 1, q + t), dev)?;
                (x, Some(mask))
            }
            (Some(_), None) => {
                return Err(Error::input(
                    "this Q-Former reads no text, but instruction ids were given",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::input(
                    "this Q-Former reads the instruction (qformer_input_ids), but none was given",
                ))
            }
            (None, None) => (queries, None),
        };
        let mut x = self.embed_norm.forward(&x)?;
        let s = x.dim(1)?;
        for (k, layer) in self.layers.iter().enumerate() {
            let a = layer
                .self_attn
                .forward(&x, &x, mask.as_ref(), ctx, k, Site::Pattern)?;
            let mut qa = a.narrow(1, 0, q)?;
            if let Some(ca) = &layer.cross_attn {
                qa = ca.forward(&qa, image, None, ctx, k, Site::CrossPattern)?;
            }
            let mut out = layer.ffn_query.forward(&qa)?;
            if s > q {
                let ffn = layer.ffn_text.as_ref().ok_or_else(|| {
                    Error::msg(format!("Q-Former layer {k} has no text feed-forward"))
                })?;
                let ta = ffn.forward(&a.narrow(1, q, s - q)?)?;
                out = Tensor::cat(&[&out, &ta], 1)?;
            }
            x = ctx.hook(HookPoint::block(Tower::Qformer, k, Site::ResidPost), out)?;
        }
        Ok(x)
    }

    /// The Q-Former hook points: per layer `hook_resid_post`, `attn.hook_pattern` and, where the
    /// layer has cross-attention, `crossattn.hook_pattern`.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        let mut v = Vec::new();
        for k in 0..self.layers.len() {
            v.push(HookPoint::block(Tower::Qformer, k, Site::ResidPost));
            v.push(HookPoint::block(Tower::Qformer, k, Site::Pattern));
            if self.has_cross_attention(k) {
                v.push(HookPoint::block(Tower::Qformer, k, Site::CrossPattern));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::HookSpec;
    use candle_core::{Device, D};
    use candle_nn::VarMap;

    /// Rows of a pattern `[.., n]` (each should sum to one).
    fn row_sums(p: &Tensor) -> Vec<f32> {
        p.sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn tiny(with_text: bool) -> Qformer {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let c: QformerConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "cross_attention_frequency": 2,
            "encoder_hidden_size": 6, "max_position_embeddings": 5, "vocab_size": 11
        }))
        .unwrap();
        let qt = Tensor::randn(0f32, 1.0, (1, 3, 8), &dev).unwrap();
        let qf = Qformer::load(vb, qt, &c, with_text).unwrap();
        // random weights (the var map starts at zero)
        for v in vm.all_vars() {
            let r = Tensor::randn(0f32, 0.5, v.shape(), &dev).unwrap();
            v.set(&r).unwrap();
        }
        qf
    }

    #[test]
    fn shapes_hooks_and_padding() {
        let dev = Device::Cpu;
        let qf = tiny(true);
        assert_eq!(qf.num_queries(), 3);
        assert!(qf.has_cross_attention(0) && !qf.has_cross_attention(1));
        let hp = qf.hook_points();
        assert_eq!(hp.len(), 5);
        let names: Vec<String> = hp.iter().map(|h| h.to_string()).collect();
        let spec = HookSpec::parse_captures(&names.join(",")).unwrap();
        let r = spec.resolve(&hp).unwrap();
        let img = Tensor::randn(0f32, 1.0, (1, 4, 6), &dev).unwrap();
        // the same instruction alone and right-padded by two tokens
        let ids = Tensor::new(&[[2u32, 5, 7]], &dev).unwrap();
        let mut ctx = HookCtx::new(&r, vec![]);
        let a = qf
            .forward(&img, Some((&ids, &[vec![1, 1, 1]])), &mut ctx)
            .unwrap();
        assert_eq!(a.dims(), &[1, 6, 8]);
        let cross = ctx
            .captures
            .require("qformer.blocks.0.crossattn.hook_pattern")
            .unwrap();
        assert_eq!(cross.dims(), &[1, 2, 3, 4]);
        assert!(row_sums(cross).iter().all(|s| (s - 1.0).abs() < 1e-5));
        let pat = ctx
            .captures
            .require("qformer.blocks.1.attn.hook_pattern")
            .unwrap();
        assert_eq!(pat.dims(), &[1, 2, 6, 6]);
        let ids_p = Tensor::new(&[[2u32, 5, 7, 0, 0]], &dev).unwrap();
        let mut ctx = HookCtx::none();
        let b = qf
            .forward(&img, Some((&ids_p, &[vec![1, 1, 1, 0, 0]])), &mut ctx)
            .unwrap();
        let d = (a.narrow(1, 0, 6).unwrap() - b.narrow(1, 0, 6).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "padding changed the output by {d}");
        // too long for the position table
        let long = Tensor::new(&[[1u32; 6]], &dev).unwrap();
        assert!(qf
            .forward(&img, Some((&long, &[vec![1; 6]])), &mut HookCtx::none())
            .is_err());
        // text given to a query-only Q-Former
        assert!(tiny(false)
            .forward(&img, Some((&ids, &[vec![1, 1, 1]])), &mut HookCtx::none())
            .is_err());
    }
}
