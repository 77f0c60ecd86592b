//! BLIP-2 (Salesforce/blip2-opt-* layout) and the machinery it shares with InstructBLIP: a BLIP
//! ViT (class token, fused `qkv`, post LayerNorm over every token), the Q-Former
//! ([`crate::blocks::qformer`]), a linear `language_projection`, and a decoder (OPT here, Llama
//! for InstructBLIP, see [`super::instructblip`]).
//!
//! Input layout, as `Blip2Processor` builds it: the `num_query_tokens` image placeholders come
//! first, before BOS, then the tokenized prompt. There is no chat template: user turns become
//! `Question: ...`, assistant turns `Answer: ...` (system turns their bare text), joined by
//! spaces and closed with ` Answer:` when a generation prompt is asked for.
//!
//! Span table: the image span holds the **query tokens** (the Q-Former's outputs, not patches);
//! its `rows x cols` is the vision patch grid the queries cross-attend to. A heatmap over the
//! image therefore composes the decision token's attention to the query positions with the
//! queries' cross-attention (`qformer.blocks.{k}.crossattn.hook_pattern`, `[b, h, q, n]`, where
//! vision token 0 is the class token and 1.. are the patches in row-major order).
//!
//! OPT specifics: learned positions with an offset of 2, computed from the attention mask (so
//! they continue across a KV cache and skip left padding); pre-LayerNorm blocks (eps 1e-5);
//! ReLU MLP `fc1`/`fc2` with biases; final layer norm; embeddings tied to the unembedding.

use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use image::DynamicImage;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::blocks::attention::QkvProj;
use crate::blocks::mlp::linear;
use crate::blocks::qformer::{Qformer, QformerConfig};
use crate::blocks::{mask, Activation, Attention, Block, Decoder, LogitsFor, Mlp, Norm, Rope, Vit};
use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint};
use crate::prepare::{self, Prepared};
use crate::preprocess::ImageProcessor;
use crate::spans::{ImageSpan, Spans};
use crate::template::{Message, Part};

use super::common;
use super::llava::LlamaConfig;
use super::{DecodeState, LoadOptions, ModelInfo, Vlm};

/// The key under which [`Prepared::extra`] holds InstructBLIP's Q-Former ids `[1, t]` (u32).
pub const QFORMER_IDS: &str = "qformer_input_ids";

fn d_vit_hidden() -> usize {
    1408
}
fn d_vit_inter() -> usize {
    6144
}
fn d_vit_layers() -> usize {
    39
}
fn d_vit_heads() -> usize {
    16
}
fn d_vit_image() -> usize {
    224
}
fn d_vit_patch() -> usize {
    14
}
fn d_vit_eps() -> f64 {
    1e-6
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_true() -> bool {
    true
}

/// The BLIP vision config (transformers' `Blip2VisionConfig` defaults: EVA ViT-g/14 at 224 px).
#[derive(Debug, Clone, Deserialize)]
pub struct BlipVisionConfig {
    #[serde(default = "d_vit_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vit_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_vit_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vit_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_vit_image")]
    pub image_size: usize,
    #[serde(default = "d_vit_patch")]
    pub patch_size: usize,
    #[serde(default = "d_vit_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
}

fn d_opt_vocab() -> usize {
    50272
}
fn d_opt_hidden() -> usize {
    768
}
fn d_opt_layers() -> usize {
    12
}
fn d_opt_ffn() -> usize {
    3072
}
fn d_opt_heads() -> usize {
    12
}
fn d_opt_pos() -> usize {
    2048
}
fn d_relu() -> String {
    "relu".into()
}

/// The OPT text config (transformers' `OPTConfig` defaults where absent).
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    #[serde(default = "d_opt_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_opt_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_opt_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_opt_ffn")]
    pub ffn_dim: usize,
    #[serde(default = "d_opt_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_opt_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_true")]
    pub do_layer_norm_before: bool,
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "d_true")]
    pub enable_bias: bool,
    #[serde(default = "d_true")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default)]
    pub _remove_final_layer_norm: bool,
    #[serde(default = "d_relu")]
    pub activation_function: String,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<u32>,
}

fn d_queries() -> usize {
    32
}

/// The top-level config of BLIP-2 and InstructBLIP; `T` is the text config (OPT or Llama).
#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig<T> {
    pub text_config: T,
    pub vision_config: BlipVisionConfig,
    pub qformer_config: QformerConfig,
    #[serde(default = "d_queries")]
    pub num_query_tokens: usize,
    #[serde(alias = "image_token_id")]
    pub image_token_index: Option<u32>,
    #[serde(default = "d_true")]
    pub use_decoder_only_language_model: bool,
}

impl<T: serde::de::DeserializeOwned> BlipConfig<T> {
    /// Parse `config.json` (`what` names the family in errors); absent sub-configs take
    /// transformers' defaults.
    pub fn parse(v: &serde_json::Value, path: &Path, what: &str) -> Result<Self> {
        let mut v = v.clone();
        for k in ["text_config", "vision_config", "qformer_config"] {
            if v.get(k).is_none() {
                v[k] = serde_json::json!({});
            }
        }
        let c: BlipConfig<T> = serde_json::from_value(v)
            .map_err(|e| Error::config(path, format!("not a {what} config: {e}")))?;
        if !c.use_decoder_only_language_model {
            return Err(Error::config(
                path,
                format!("{what} with an encoder-decoder language model (Flan-T5) is not supported; use a decoder-only checkpoint (OPT / Vicuna)"),
            ));
        }
        if c.image_token_index.is_none() {
            return Err(Error::config(
                path,
                "no image_token_index: this checkpoint predates processor-side image tokens; use a current revision of the Hub repository",
            ));
        }
        if c.num_query_tokens == 0 {
            return Err(Error::config(path, "num_query_tokens must be at least 1"));
        }
        Ok(c)
    }
}

/// Load the BLIP ViT from `vb` (the `vision_model.` prefix): returns the tower (no post norm
/// inside) and its post LayerNorm, which applies to every token. Accepts the fused `qkv.bias`
/// of transformers 5 and the original `q_bias` / `v_bias` pair (k has no bias).
pub fn load_blip_vit(vb: VarBuilder, c: &BlipVisionConfig) -> Result<(Vit, Norm)> {
    let d = c.hidden_size;
    let h = c.num_attention_heads;
    if h == 0 || !d.is_multiple_of(h) {
        return Err(Error::msg(format!(
            "vision width {d} is not a multiple of its {h} heads"
        )));
    }
    let dh = d / h;
    let act = Activation::from_hf(&c.hidden_act)?;
    let n_pos = (c.image_size / c.patch_size).pow(2) + 1;
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for j in 0..c.num_hidden_layers {
        let vbl = vb.pp(format!("encoder.layers.{j}"));
        let a = vbl.pp("self_attn");
        let w = a.pp("qkv").get((3 * d, d), "weight")?;
        let bias = if a.pp("qkv").contains_tensor("bias") {
            Some(a.pp("qkv").get(3 * d, "bias")?)
        } else if c.qkv_bias {
            let qb = a.get(d, "q_bias")?;
            let vbias = a.get(d, "v_bias")?;
            Some(Tensor::cat(&[&qb, &qb.zeros_like()?, &vbias], 0)?)
        } else {
            None
        };
        blocks.push(Block {
            norm1: Norm::layer(vbl.pp("layer_norm1"), d, c.layer_norm_eps)?,
            attn: Attention {
                qkv: QkvProj::Fused(Linear::new(w, bias)),
                o: linear(a.pp("projection"), d, d, true)?,
                n_heads: h,
                n_kv_heads: h,
                head_dim: dh,
                scale: 1.0 / (dh as f64).sqrt(),
                q_norm: None,
                k_norm: None,
            },
            norm2: Norm::layer(vbl.pp("layer_norm2"), d, c.layer_norm_eps)?,
            mlp: Mlp::plain(
                vbl.pp("mlp"),
                ("fc1", "fc2"),
                d,
                c.intermediate_size,
                d,
                act,
                true,
            )?,
        });
    }
    let emb = vb.pp("embeddings");
    let pe = emb.pp("patch_embedding");
    let vit = Vit {
        patch: Vit::patch_conv(
            pe.get((d, 3, c.patch_size, c.patch_size), "weight")?,
            Some(pe.get(d, "bias")?),
            c.patch_size,
        ),
        patch_size: c.patch_size,
        class_embedding: Some(emb.get((1, 1, d), "class_embedding")?.reshape(d)?),
        position_embedding: emb
            .get((1, n_pos, d), "position_embedding")?
            .reshape((n_pos, d))?,
        pre_norm: None,
        blocks,
        post_norm: None,
        post_norm_pooled: false,
    };
    let post = Norm::layer(vb.pp("post_layernorm"), d, c.layer_norm_eps)?;
    Ok((vit, post))
}

/// Load an OPT decoder from `vb` (the `language_model.` prefix). Returns the decoder and the
/// learned position table `[max_positions + 2, d]` (OPT's offset of 2 included).
pub fn load_opt(vb: VarBuilder, c: &OptConfig, path: &Path) -> Result<(Decoder, Tensor)> {
    let cfg_path = path.join("config.json");
    if !c.do_layer_norm_before {
        return Err(Error::config(
            &cfg_path,
            "OPT with do_layer_norm_before = false (post-LayerNorm, opt-350m) is not supported",
        ));
    }
    if c.word_embed_proj_dim.is_some_and(|w| w != c.hidden_size) {
        return Err(Error::config(
            &cfg_path,
            "OPT with word_embed_proj_dim != hidden_size (project_in / project_out) is not supported",
        ));
    }
    if !c.layer_norm_elementwise_affine || c._remove_final_layer_norm {
        return Err(Error::config(
            &cfg_path,
            "OPT without affine layer norms or without its final layer norm is not supported",
        ));
    }
    let d = c.hidden_size;
    let h = c.num_attention_heads;
    if h == 0 || !d.is_multiple_of(h) {
        return Err(Error::config(
            &cfg_path,
            format!("OPT width {d} is not a multiple of its {h} heads"),
        ));
    }
    let dh = d / h;
    let eps = 1e-5; // nn.LayerNorm's default, which OPT uses
    let bias = c.enable_bias;
    let act = Activation::from_hf(&c.activation_function)?;
    let dec = vb.pp("model.decoder");
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let vl = dec.pp(format!("layers.{i}"));
        let a = vl.pp("self_attn");
        blocks.push(Block {
            norm1: Norm::layer(vl.pp("self_attn_layer_norm"), d, eps)?,
            attn: Attention {
                qkv: QkvProj::Separate {
                    q: linear(a.pp("q_proj"), d, d, bias)?,
                    k: linear(a.pp("k_proj"), d, d, bias)?,
                    v: linear(a.pp("v_proj"), d, d, bias)?,
                },
                o: linear(a.pp("out_proj"), d, d, bias)?,
                n_heads: h,
                n_kv_heads: h,
                head_dim: dh,
                // OPT scales q before the product; scaling the scores is the same map
                scale: 1.0 / (dh as f64).sqrt(),
                q_norm: None,
                k_norm: None,
            },
            norm2: Norm::layer(vl.pp("final_layer_norm"), d, eps)?,
            mlp: Mlp::plain(vl, ("fc1", "fc2"), d, c.ffn_dim, d, act, bias)?,
        });
    }
    let embed_w = dec.pp("embed_tokens").get((c.vocab_size, d), "weight")?;
    let lm_head = if !c.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
        linear(vb.pp("lm_head"), d, c.vocab_size, false)?
    } else {
        Linear::new(embed_w.clone(), None)
    };
    let positions = dec
        .pp("embed_positions")
        .get((c.max_position_embeddings + 2, d), "weight")?;
    Ok((
        Decoder {
            embed: Embedding::new(embed_w, d),
            embed_scale: None,
            blocks,
            norm: Norm::layer(dec.pp("final_layer_norm"), d, eps)?,
            lm_head,
        },
        positions,
    ))
}

/// How the language model places its tokens.
#[derive(Debug, Clone)]
pub enum BlipLm {
    /// OPT: learned positions `[max + 2, d]` added to the embeddings (index = position + 2,
    /// padding at index 1 as transformers computes it).
    Opt { positions: Tensor },
    /// Llama: rotary embeddings.
    Llama { theta: f64, head_dim: usize },
}

/// A BLIP-2 or InstructBLIP model: BLIP ViT -> Q-Former -> projection -> decoder.
pub struct QformerVlm {
    info: ModelInfo,
    pub vision: Vit,
    /// The vision post LayerNorm (over every token; what the Q-Former reads).
    pub vision_post_norm: Norm,
    pub qformer: Qformer,
    pub projection: Linear,
    pub lm: Decoder,
    pub lm_kind: BlipLm,
    tokenizer: Tokenizer,
    /// InstructBLIP's BERT tokenizer for the Q-Former's copy of the prompt.
    qformer_tokenizer: Option<Tokenizer>,
    qformer_pad_id: u32,
    processor: ImageProcessor,
    grid: (usize, usize),
    pad_id: u32,
}

/// The parts a family loader hands to [`QformerVlm::assemble`].
pub struct QformerParts {
    /// Family name for [`ModelInfo::family`] (`blip-2`, `instructblip`).
    pub family: &'static str,
    /// The vision config (patch grid, layer count).
    pub vision_config: BlipVisionConfig,
    /// Image placeholders per image (= learned queries).
    pub num_query_tokens: usize,
    /// The placeholder token id (`image_token_index`).
    pub image_token_id: u32,
    /// The ViT, without its post norm.
    pub vision: Vit,
    /// The ViT's post LayerNorm over every token.
    pub vision_post_norm: Norm,
    /// The Q-Former.
    pub qformer: Qformer,
    /// `language_projection` (Q-Former width -> LM width).
    pub projection: Linear,
    /// The language model.
    pub lm: Decoder,
    /// How the language model places its tokens.
    pub lm_kind: BlipLm,
    /// LM layers.
    pub n_layers: usize,
    /// LM attention heads.
    pub n_heads: usize,
    /// LM width.
    pub d_model: usize,
    /// LM vocabulary size.
    pub vocab_size: usize,
    /// The text config's `eos_token_id` (number or list).
    pub eos: Option<serde_json::Value>,
    /// The text config's `pad_token_id`.
    pub pad_id: Option<u32>,
    /// InstructBLIP's Q-Former tokenizer.
    pub qformer_tokenizer: Option<Tokenizer>,
    /// Padding id of the Q-Former's text.
    pub qformer_pad_id: u32,
}

/// Map a candle error (a missing or misshapen tensor) to a weights error naming the folder and
/// the tensor (without the backtrace candle attaches when `RUST_BACKTRACE` is set).
pub fn weights_err(dir: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Candle(mut c) => {
            while let candle_core::Error::WithBacktrace { inner, .. } = c {
                c = *inner;
            }
            Error::Weights(format!("{}: {c}", dir.display()))
        }
        o => o,
    }
}

/// Load the vision tower, Q-Former and projection shared by BLIP-2 and InstructBLIP.
pub fn load_bridge(
    vb: &VarBuilder<'static>,
    vision: &BlipVisionConfig,
    qformer: &QformerConfig,
    num_query_tokens: usize,
    d_model: usize,
    with_text: bool,
    dir: &Path,
) -> Result<(Vit, Norm, Qformer, Linear)> {
    let werr = weights_err(dir);
    if qformer.encoder_hidden_size != vision.hidden_size {
        return Err(Error::config(
            dir.join("config.json"),
            format!(
                "qformer_config.encoder_hidden_size {} differs from the vision width {}",
                qformer.encoder_hidden_size, vision.hidden_size
            ),
        ));
    }
    let (vit, post) = load_blip_vit(vb.pp("vision_model"), vision).map_err(&werr)?;
    let qt = vb
        .get((1, num_query_tokens, qformer.hidden_size), "query_tokens")
        .map_err(|e| werr(e.into()))?;
    let qf = Qformer::load(vb.pp("qformer"), qt, qformer, with_text).map_err(&werr)?;
    let proj = linear(
        vb.pp("language_projection"),
        qformer.hidden_size,
        d_model,
        true,
    )
    .map_err(&werr)?;
    Ok((vit, post, qf, proj))
}

impl QformerVlm {
    /// Load a BLIP-2 checkpoint (OPT decoder) whose `config.json` is `cfg`.
    pub fn load_blip2(dir: &Path, cfg: &serde_json::Value, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let c: BlipConfig<OptConfig> = BlipConfig::parse(cfg, &cfg_path, "BLIP-2")?;
        let tc = &c.text_config;
        let vb = crate::blocks::weights::var_builder(dir, opts.dtype, &opts.device)?;
        let (vision, post, qformer, projection) = load_bridge(
            &vb,
            &c.vision_config,
            &c.qformer_config,
            c.num_query_tokens,
            tc.hidden_size,
            false,
            dir,
        )?;
        let (lm, positions) =
            load_opt(vb.pp("language_model"), tc, dir).map_err(weights_err(dir))?;
        Self::assemble(
            dir,
            QformerParts {
                family: "blip-2",
                vision_config: c.vision_config.clone(),
                num_query_tokens: c.num_query_tokens,
                image_token_id: c.image_token_index.unwrap_or_default(),
                vision,
                vision_post_norm: post,
                qformer,
                projection,
                lm,
                lm_kind: BlipLm::Opt { positions },
                n_layers: tc.num_hidden_layers,
                n_heads: tc.num_attention_heads,
                d_model: tc.hidden_size,
                vocab_size: tc.vocab_size,
                eos: tc.eos_token_id.clone(),
                pad_id: tc.pad_token_id,
                qformer_tokenizer: None,
                qformer_pad_id: 0,
            },
        )
    }

    /// Finish loading: tokenizer, image processor, model facts.
    pub fn assemble(dir: &Path, p: QformerParts) -> Result<Self> {
        let tokenizer = prepare::load_tokenizer(&dir.join("tokenizer.json"))?;
        if tokenizer.id_to_token(p.image_token_id).is_none() {
            return Err(Error::config(
                dir.join("tokenizer.json"),
                format!(
                    "the tokenizer has no image token (id {} from config.json)",
                    p.image_token_id
                ),
            ));
        }
        if p.qformer.num_queries() != p.num_query_tokens {
            return Err(Error::Weights(format!(
                "{}: query_tokens holds {} queries, config.json says num_query_tokens = {}",
                dir.display(),
                p.qformer.num_queries(),
                p.num_query_tokens
            )));
        }
        let processor = ImageProcessor::from_dir(dir)?;
        let eos = match &p.eos {
            Some(serde_json::Value::Number(n)) => vec![n.as_u64().unwrap_or(2) as u32],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|v| v as u32))
                .collect(),
            _ => tokenizer.token_to_id("</s>").into_iter().collect(),
        };
        let g = p.vision_config.image_size / p.vision_config.patch_size;
        let info = ModelInfo {
            family: p.family.into(),
            dir: dir.to_path_buf(),
            n_layers: p.n_layers,
            vision_layers: p.vision_config.num_hidden_layers,
            d_model: p.d_model,
            n_heads: p.n_heads,
            vocab_size: p.vocab_size,
            image_token_id: p.image_token_id,
            eos_token_ids: eos,
            dtype: p.lm.embed.embeddings().dtype(),
        };
        Ok(QformerVlm {
            info,
            vision: p.vision,
            vision_post_norm: p.vision_post_norm,
            qformer: p.qformer,
            projection: p.projection,
            lm: p.lm,
            lm_kind: p.lm_kind,
            tokenizer,
            qformer_tokenizer: p.qformer_tokenizer,
            qformer_pad_id: p.qformer_pad_id,
            processor,
            grid: (g, g),
            pad_id: p.pad_id.unwrap_or(0),
        })
    }

    /// The vision patch grid (rows, cols) the queries look at.
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }

    /// Number of query tokens (image placeholders) per image.
    pub fn num_query_tokens(&self) -> usize {
        self.qformer.num_queries()
    }

    /// The image processor.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The Q-Former's tokenizer (InstructBLIP only).
    pub fn qformer_tokenizer(&self) -> Option<&Tokenizer> {
        self.qformer_tokenizer.as_ref()
    }

    /// Image features `[b * q, d]` for pixel values `[b, 3, H, W]` (and, for InstructBLIP, the
    /// right-padded instruction ids with their validity), with the vision, Q-Former and
    /// projector hooks.
    pub fn image_features(
        &self,
        pixels: &Tensor,
        text: Option<(&Tensor, &[Vec<u8>])>,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let (first, outs) = self.vision.forward(pixels, None, ctx)?;
        let last = outs.last().cloned().unwrap_or(first);
        let img = self.vision_post_norm.forward(&last)?;
        let img = ctx.hook(HookPoint::VisionLnPost, img)?;
        let q = self.num_query_tokens();
        let qo = self.qformer.forward(&img, text, ctx)?.narrow(1, 0, q)?;
        let p = candle_nn::Module::forward(&self.projection, &qo)?;
        let p = ctx.hook(HookPoint::Projector, p)?;
        let (b, n, d) = p.dims3()?;
        Ok(p.reshape((b * n, d))?)
    }

    /// Right-pad the Q-Former ids of the inputs that carry images.
    fn qformer_text(&self, inputs: &[&Prepared]) -> Result<Option<(Tensor, Vec<Vec<u8>>)>> {
        if self.qformer_tokenizer.is_none() {
            return Ok(None);
        }
        let mut rows = Vec::new();
        for p in inputs.iter().filter(|p| p.pixel_values.is_some()) {
            let t = p.extra.get(QFORMER_IDS).ok_or_else(|| {
                Error::input(format!(
                    "this InstructBLIP input has no '{QFORMER_IDS}' (prepare it with the model's prepare())"
                ))
            })?;
            rows.push(t.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?);
        }
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut valid = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.qformer_pad_id, t - r.len()));
            let mut v = vec![1u8; r.len()];
            v.extend(std::iter::repeat_n(0u8, t - r.len()));
            valid.push(v);
        }
        let dev = self.lm.embed.embeddings().device();
        Ok(Some((Tensor::from_vec(ids, (rows.len(), t), dev)?, valid)))
    }

    /// The decoder over `embeds` of the new positions, given position ids `[b, s]` (u32, real
    /// tokens counted from 0) and the validity of every position so far.
    fn run_lm(
        &self,
        embeds: Tensor,
        positions: &Tensor,
        valid_all: &[Vec<u8>],
        past: usize,
        cache: Option<&mut crate::blocks::KvCache>,
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let dev = embeds.device().clone();
        let m = mask::causal(valid_all, past, &dev)?;
        match &self.lm_kind {
            BlipLm::Opt { positions: table } => {
                let pos = positions.to_vec2::<u32>()?;
                let n_table = table.dim(0)?;
                let mut idx = Vec::with_capacity(pos.len() * pos.first().map_or(0, |r| r.len()));
                for (row, v) in pos.iter().zip(valid_all) {
                    for (i, &p) in row.iter().enumerate() {
                        let real = v.get(past + i).copied().unwrap_or(1) == 1;
                        let k = if real { p as usize + 2 } else { 1 };
                        if k >= n_table {
                            return Err(Error::input(format!(
                                "position {p} is beyond OPT's {} learned positions",
                                n_table - 2
                            )));
                        }
                        idx.push(k as u32);
                    }
                }
                let (b, s) = positions.dims2()?;
                let idx = Tensor::from_vec(idx, b * s, &dev)?;
                let d = table.dim(1)?;
                let pe = table.index_select(&idx, 0)?.reshape((b, s, d))?;
                let x = (embeds + pe.to_dtype(self.info.dtype)?)?;
                self.lm
                    .forward(x, None, Some(&m), cache, ctx, logits_for, &mut |_, x| Ok(x))
            }
            BlipLm::Llama { theta, head_dim } => {
                let rope = Rope::standard(positions, *head_dim, *theta)?;
                self.lm.forward(
                    embeds,
                    Some(&rope),
                    Some(&m),
                    cache,
                    ctx,
                    logits_for,
                    &mut |_, x| Ok(x),
                )
            }
        }
    }
}

/// The flattened prompt of the BLIP families and each message's byte range in it: user turns
/// `Question: ...`, assistant turns `Answer: ...`, system turns their text, joined by spaces,
/// closed with ` Answer:` when `add_generation_prompt`.
pub fn blip_prompt(
    messages: &[Message],
    add_generation_prompt: bool,
) -> (String, Vec<(String, usize, usize)>) {
    let mut text = String::new();
    let mut bounds = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        let t = m
            .content
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ");
        let start = text.len();
        match m.role.as_str() {
            "user" => text.push_str("Question: "),
            "system" => {}
            _ => text.push_str("Answer: "),
        }
        text.push_str(&t);
        bounds.push((m.role.clone(), start, text.len()));
    }
    if add_generation_prompt {
        text.push_str(" Answer:");
    }
    (text, bounds)
}

impl Vlm for QformerVlm {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        let mut v = HookPoint::standard(self.info.n_layers, self.info.vision_layers);
        v.push(HookPoint::VisionLnPost);
        v.extend(self.qformer.hook_points());
        v
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn prepare(
        &self,
        messages: &[Message],
        images: &[DynamicImage],
        add_generation_prompt: bool,
    ) -> Result<Prepared> {
        prepare::check_image_count(messages, images.len(), Some(1))?;
        let (text, bounds) = blip_prompt(messages, add_generation_prompt);
        let (ids, spans) = prepare::tokenize_and_expand(
            &self.tokenizer,
            &text,
            &bounds,
            true,
            self.info.image_token_id,
            &[],
            &|_| 0,
        )?;
        // the processor puts the query placeholders first, before BOS
        let q = self.num_query_tokens();
        let mut all = vec![self.info.image_token_id; q * images.len()];
        all.extend_from_slice(&ids);
        let mut sp = spans.shifted(q * images.len());
        sp.pad = 0;
        sp.images = (0..images.len())
            .map(|k| ImageSpan {
                index: k,
                start: k * q,
                end: (k + 1) * q,
                rows: self.grid.0,
                cols: self.grid.1,
            })
            .collect();
        let dev = self.lm.embed.embeddings().device().clone();
        let mut extra = std::collections::BTreeMap::new();
        if let Some(qt) = &self.qformer_tokenizer {
            let enc = qt
                .encode(text.as_str(), true)
                .map_err(|e| Error::msg(format!("Q-Former tokenization failed: {e}")))?;
            let qids = enc.get_ids().to_vec();
            let max_t = self.qformer.max_text_len();
            if qids.len() > max_t {
                return Err(Error::input(format!(
                    "the prompt is {} Q-Former tokens long; this Q-Former reads at most {max_t}",
                    qids.len()
                )));
            }
            let n = qids.len();
            extra.insert(
                QFORMER_IDS.to_string(),
                Tensor::from_vec(qids, (1, n), &dev)?,
            );
        }
        let mut pix = Vec::with_capacity(images.len());
        let mut views = Vec::with_capacity(images.len());
        for img in images {
            let v = self.processor.view(img);
            pix.push(self.processor.normalize_view(&v, &dev)?);
            views.push(v);
        }
        Ok(Prepared {
            ids: all,
            prompt_text: text,
            spans: sp,
            pixel_values: Some(Tensor::stack(&pix, 0)?),
            extra,
            views,
        })
    }

    fn forward(
        &self,
        inputs: &[&Prepared],
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
        state: Option<&mut DecodeState>,
    ) -> Result<Tensor> {
        let dev = self.lm.embed.embeddings().device().clone();
        let padded = common::pad_inputs(inputs, self.pad_id, &dev)?;
        let pix: Vec<&Tensor> = inputs
            .iter()
            .filter_map(|p| p.pixel_values.as_ref())
            .collect();
        let embeds = self.lm.embed_tokens(&padded.ids)?;
        let embeds = if pix.is_empty() {
            embeds
        } else {
            let pixels = Tensor::cat(&pix, 0)?.to_dtype(self.info.dtype)?;
            let text = self.qformer_text(inputs)?;
            let text_ref = text.as_ref().map(|(t, v)| (t, v.as_slice()));
            let feats = self.image_features(&pixels, text_ref, ctx)?;
            common::merge_features(&embeds, &padded.ids, self.info.image_token_id, &feats)?
        };
        let (positions, next) = common::positions(&padded.valid, &dev)?;
        ctx.set_spans(padded.spans.clone());
        match state {
            Some(st) => {
                let out = self.run_lm(
                    embeds,
                    &positions,
                    &padded.valid,
                    0,
                    Some(&mut st.cache),
                    ctx,
                    logits_for,
                )?;
                st.valid = padded.valid;
                st.next_pos = next;
                st.spans = padded.spans;
                Ok(out)
            }
            None => self.run_lm(embeds, &positions, &padded.valid, 0, None, ctx, logits_for),
        }
    }

    fn extend(
        &self,
        state: &mut DecodeState,
        new_ids: &[Vec<u32>],
        new_spans: Option<&[Spans]>,
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let dev = self.lm.embed.embeddings().device().clone();
        let step = common::begin_extend(state, new_ids, new_spans, self.pad_id, &dev, ctx)?;
        let embeds = self.lm.embed_tokens(&step.ids)?;
        let out = self.run_lm(
            embeds,
            &step.positions,
            &step.valid_all,
            step.past,
            Some(&mut state.cache),
            ctx,
            logits_for,
        )?;
        step.finish(state);
        Ok(out)
    }

    fn decoder(&self) -> &Decoder {
        &self.lm
    }
}

/// Read the Llama text config of an InstructBLIP checkpoint's rotary base (helper for
/// [`super::instructblip`]).
pub fn llama_kind(tc: &LlamaConfig, cfg_path: &Path) -> Result<BlipLm> {
    Ok(BlipLm::Llama {
        theta: tc.theta(cfg_path)?,
        head_dim: tc.head_dim(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_layout() {
        let msgs = vec![
            Message::user_with_image("What color?"),
            Message::text("assistant", "B"),
            Message::text("user", "You are wrong."),
        ];
        let (t, b) = blip_prompt(&msgs, true);
        assert_eq!(
            t,
            "Question: What color? Answer: B Question: You are wrong. Answer:"
        );
        assert_eq!(&t[b[1].1..b[1].2], "Answer: B");
        assert_eq!(&t[b[2].1..b[2].2], "Question: You are wrong.");
        let (t, _) = blip_prompt(&msgs[..1], false);
        assert_eq!(t, "Question: What color?");
    }
}
