//! LLaVA-1.5 (llava-hf layout): CLIP ViT tower, 2-layer projector, Llama decoder.
//!
//! Config keys read: `vision_feature_layer` (int or list), `vision_feature_select_strategy`
//! (`default` drops CLS, `full` keeps it), `image_token_index`, `projector_hidden_act`,
//! `multimodal_projector_bias`, `text_config` (Llama), `vision_config` (CLIP), with the same
//! defaults as transformers when a key is absent (the real llava-1.5-7b-hf config omits most).

use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::{Embedding, VarBuilder};
use image::DynamicImage;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::blocks::attention::QkvProj;
use crate::blocks::mlp::linear;
use crate::blocks::{mask, Activation, Attention, Block, Decoder, LogitsFor, Mlp, Norm, Rope, Vit};
use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint};
use crate::prepare::{self, Prepared};
use crate::preprocess::ImageProcessor;
use crate::spans::Spans;
use crate::template::{ChatTemplate, Message};

use super::common;
use super::{DecodeState, LoadOptions, ModelInfo, Vlm};

fn d_llama_hidden() -> usize {
    4096
}
fn d_llama_inter() -> usize {
    11008
}
fn d_llama_layers() -> usize {
    32
}
fn d_llama_heads() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-6
}
fn d_vocab() -> usize {
    32000
}
fn d_theta() -> f64 {
    10000.0
}
fn d_silu() -> String {
    "silu".into()
}

/// Llama text config (transformers defaults where absent).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "d_llama_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_llama_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_llama_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_llama_heads")]
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "d_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Rotary base, from `rope_parameters` (transformers 5) or `rope_theta`; other rope types
    /// are refused with a clear message.
    pub fn theta(&self, path: &Path) -> Result<f64> {
        for v in [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
        {
            if let Some(t) = v
                .get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(|x| x.as_str())
            {
                if t != "default" {
                    return Err(Error::config(
                        path,
                        format!("rope type '{t}' is not supported yet (default only)"),
                    ));
                }
            }
        }
        Ok(self
            .rope_parameters
            .as_ref()
            .and_then(|v| v.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .or(self.rope_theta)
            .unwrap_or_else(d_theta))
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}

fn d_clip_hidden() -> usize {
    1024
}
fn d_clip_inter() -> usize {
    4096
}
fn d_clip_layers() -> usize {
    24
}
fn d_clip_heads() -> usize {
    16
}
fn d_clip_image() -> usize {
    336
}
fn d_clip_patch() -> usize {
    14
}
fn d_clip_eps() -> f64 {
    1e-5
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}

/// CLIP vision config (LLaVA's defaults: ViT-L/14 at 336 px).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_clip_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_clip_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_clip_image")]
    pub image_size: usize,
    #[serde(default = "d_clip_patch")]
    pub patch_size: usize,
    #[serde(default = "d_clip_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
}

fn d_feature_layer() -> serde_json::Value {
    serde_json::json!(-2)
}
fn d_strategy() -> String {
    "default".into()
}
fn d_image_token() -> u32 {
    32000
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_true() -> bool {
    true
}

/// The LLaVA config.
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    pub text_config: LlamaConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d_feature_layer")]
    pub vision_feature_layer: serde_json::Value,
    #[serde(default = "d_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "d_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "d_gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "d_true")]
    pub multimodal_projector_bias: bool,
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// The key of a JSON object whose removal makes it deserialize as `T` (the key holding a value
/// of the wrong kind), to name it in the error; `None` when `v` deserializes or no single key is
/// at fault.
fn key_at_fault<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Option<String> {
    let obj = v.as_object()?;
    if serde_json::from_value::<T>(v.clone()).is_ok() {
        return None;
    }
    obj.keys()
        .find(|k| {
            let mut o = obj.clone();
            o.remove(k.as_str());
            serde_json::from_value::<T>(serde_json::Value::Object(o)).is_ok()
        })
        .cloned()
}

/// Load a Llama decoder from `vb` (prefix `model.` holds embed/layers/norm; `lm_head` given).
pub fn load_llama(
    vb_model: VarBuilder,
    lm_head_vb: Option<VarBuilder>,
    c: &LlamaConfig,
    path: &Path,
) -> Result<Decoder> {
    let d = c.hidden_size;
    let (h, kvh, dh) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
    let act = Activation::from_hf(&c.hidden_act)?;
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let vb = vb_model.pp(format!("layers.{i}"));
        let a = vb.pp("self_attn");
        let attn = Attention {
            qkv: QkvProj::Separate {
                q: linear(a.pp("q_proj"), d, h * dh, c.attention_bias)?,
                k: linear(a.pp("k_proj"), d, kvh * dh, c.attention_bias)?,
                v: linear(a.pp("v_proj"), d, kvh * dh, c.attention_bias)?,
            },
            o: linear(a.pp("o_proj"), h * dh, d, c.attention_bias)?,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: dh,
            scale: 1.0 / (dh as f64).sqrt(),
            q_norm: None,
            k_norm: None,
        };
        blocks.push(Block {
            norm1: Norm::rms(vb.pp("input_layernorm"), d, c.rms_norm_eps, false)?,
            attn,
            norm2: Norm::rms(vb.pp("post_attention_layernorm"), d, c.rms_norm_eps, false)?,
            mlp: Mlp::gated(vb.pp("mlp"), d, c.intermediate_size, act, c.mlp_bias)?,
        });
    }
    let embed_w = vb_model
        .pp("embed_tokens")
        .get((c.vocab_size, d), "weight")?;
    let head_name = lm_head_vb
        .as_ref()
        .map(|vb| format!("{}.weight", vb.prefix()))
        .unwrap_or_else(|| "lm_head.weight".into());
    let lm_head = match lm_head_vb {
        Some(vb) if !c.tie_word_embeddings && vb.contains_tensor("weight") => {
            linear(vb, d, c.vocab_size, false)?
        }
        _ => {
            if !c.tie_word_embeddings {
                return Err(Error::Weights(format!(
                    "{}: no tensor {head_name}, and tie_word_embeddings is false",
                    path.display()
                )));
            }
            candle_nn::Linear::new(embed_w.clone(), None)
        }
    };
    Ok(Decoder {
        embed: Embedding::new(embed_w, d),
        embed_scale: None,
        blocks,
        norm: Norm::rms(vb_model.pp("norm"), d, c.rms_norm_eps, false)?,
        lm_head,
    })
}

/// Load a CLIP vision tower (`vision_model.` prefix inside `vb`).
pub fn load_clip(vb: VarBuilder, c: &ClipVisionConfig) -> Result<Vit> {
    let d = c.hidden_size;
    let (h, dh) = (c.num_attention_heads, c.hidden_size / c.num_attention_heads);
    let act = Activation::from_hf(&c.hidden_act)?;
    let n_pos = (c.image_size / c.patch_size).pow(2) + 1;
    let emb = vb.pp("embeddings");
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for j in 0..c.num_hidden_layers {
        let vbl = vb.pp(format!("encoder.layers.{j}"));
        let a = vbl.pp("self_attn");
        blocks.push(Block {
            norm1: Norm::layer(vbl.pp("layer_norm1"), d, c.layer_norm_eps)?,
            attn: Attention {
                qkv: QkvProj::Separate {
                    q: linear(a.pp("q_proj"), d, d, true)?,
                    k: linear(a.pp("k_proj"), d, d, true)?,
                    v: linear(a.pp("v_proj"), d, d, true)?,
                },
                o: linear(a.pp("out_proj"), d, d, true)?,
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
    let patch_w = emb
        .pp("patch_embedding")
        .get((d, 3, c.patch_size, c.patch_size), "weight")?;
    Ok(Vit {
        patch: Vit::patch_conv(patch_w, None, c.patch_size),
        patch_size: c.patch_size,
        class_embedding: Some(emb.get(d, "class_embedding")?),
        position_embedding: emb.pp("position_embedding").get((n_pos, d), "weight")?,
        pre_norm: Some(Norm::layer(vb.pp("pre_layrnorm"), d, c.layer_norm_eps)?),
        blocks,
        post_norm: Some(Norm::layer(vb.pp("post_layernorm"), d, c.layer_norm_eps)?),
        post_norm_pooled: true,
    })
}

/// A loaded LLaVA model.
pub struct Llava {
    info: ModelInfo,
    cfg: LlavaConfig,
    pub vision: Vit,
    pub projector: Mlp,
    pub lm: Decoder,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    processor: ImageProcessor,
    theta: f64,
    feature_layers: Vec<usize>,
    pad_id: u32,
}

impl Llava {
    /// Load from a checkpoint folder whose `config.json` is `cfg`.
    pub fn load(dir: &Path, cfg_v: &serde_json::Value, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let mut cfg_v = cfg_v.clone();
        for k in ["text_config", "vision_config"] {
            if cfg_v.get(k).is_none() {
                cfg_v[k] = serde_json::json!({});
            }
        }
        let cfg: LlavaConfig = serde_json::from_value(cfg_v.clone()).map_err(|e| {
            let key = key_at_fault::<LlamaConfig>(&cfg_v["text_config"])
                .map(|k| format!("text_config.{k}: "))
                .or_else(|| {
                    key_at_fault::<ClipVisionConfig>(&cfg_v["vision_config"])
                        .map(|k| format!("vision_config.{k}: "))
                })
                .or_else(|| key_at_fault::<LlavaConfig>(&cfg_v).map(|k| format!("{k}: ")))
                .unwrap_or_default();
            Error::config(&cfg_path, format!("not a LLaVA config: {key}{e}"))
        })?;
        let vb = crate::blocks::weights::var_builder(dir, opts.dtype, &opts.device)?;
        Self::from_vb(dir, cfg, vb)
    }

    /// Build from a config and a var builder (weights from files, or trainable variables).
    pub fn from_vb(dir: &Path, cfg: LlavaConfig, vb: VarBuilder<'static>) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let werr = |e: candle_core::Error| Error::Weights(format!("{}: {e}", dir.display()));
        // transformers 4 (llava-hf) and 5 layouts
        let (lm_model, lm_head, vt, proj) =
            if vb.contains_tensor("model.language_model.embed_tokens.weight") {
                (
                    vb.pp("model.language_model"),
                    vb.pp("lm_head"),
                    vb.pp("model.vision_tower.vision_model"),
                    vb.pp("model.multi_modal_projector"),
                )
            } else {
                (
                    vb.pp("language_model.model"),
                    vb.pp("language_model.lm_head"),
                    vb.pp("vision_tower.vision_model"),
                    vb.pp("multi_modal_projector"),
                )
            };
        let tc = &cfg.text_config;
        let lm = load_llama(lm_model, Some(lm_head), tc, dir).map_err(|e| match e {
            Error::Candle(c) => werr(c),
            o => o,
        })?;
        let vision = load_clip(vt, &cfg.vision_config).map_err(|e| match e {
            Error::Candle(c) => werr(c),
            o => o,
        })?;
        let dv = cfg.vision_config.hidden_size;
        let n_vl = cfg.vision_config.num_hidden_layers as i64;
        let layers: Vec<i64> = match &cfg.vision_feature_layer {
            serde_json::Value::Number(n) => vec![n.as_i64().unwrap_or(-2)],
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).collect(),
            _ => {
                return Err(Error::config(
                    &cfg_path,
                    "vision_feature_layer must be an integer or a list",
                ))
            }
        };
        let mut feature_layers = Vec::new();
        for l in layers {
            // hidden_states has n+1 entries: the embeddings, then each block's output
            let idx = if l < 0 { n_vl + 1 + l } else { l };
            if idx < 0 || idx > n_vl {
                return Err(Error::config(
                    &cfg_path,
                    format!("vision_feature_layer {l} is outside the {n_vl}-layer tower"),
                ));
            }
            feature_layers.push(idx as usize);
        }
        if !["default", "full"].contains(&cfg.vision_feature_select_strategy.as_str()) {
            return Err(Error::config(
                &cfg_path,
                format!(
                    "vision_feature_select_strategy '{}' (expected default or full)",
                    cfg.vision_feature_select_strategy
                ),
            ));
        }
        let projector = Mlp::plain(
            proj,
            ("linear_1", "linear_2"),
            dv * feature_layers.len(),
            tc.hidden_size,
            tc.hidden_size,
            Activation::from_hf(&cfg.projector_hidden_act)?,
            cfg.multimodal_projector_bias,
        )
        .map_err(|e| match e {
            Error::Candle(c) => werr(c),
            o => o,
        })?;
        let tokenizer = prepare::load_tokenizer(&dir.join("tokenizer.json"))?;
        // the placeholder the template writes must be a token with config.json's id (a tokenizer
        // without it would silently give the next added token that id)
        let image_token = crate::source::read_json(&dir.join("processor_config.json"))
            .ok()
            .and_then(|v| v.get("image_token")?.as_str().map(String::from))
            .unwrap_or_else(|| "<image>".into());
        match tokenizer.token_to_id(&image_token) {
            Some(id) if id == cfg.image_token_index => {}
            found => {
                return Err(Error::config(
                    dir.join("tokenizer.json"),
                    format!(
                        "the tokenizer has no image token '{image_token}' with id {} (from config.json){}",
                        cfg.image_token_index,
                        found
                            .map(|id| format!("; '{image_token}' has id {id}"))
                            .unwrap_or_default()
                    ),
                ))
            }
        }
        let template = ChatTemplate::from_dir(dir)?;
        let processor = ImageProcessor::from_dir(dir)?;
        let eos = match &tc.eos_token_id {
            Some(serde_json::Value::Number(n)) => vec![n.as_u64().unwrap_or(2) as u32],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|v| v as u32))
                .collect(),
            _ => tokenizer.token_to_id("</s>").into_iter().collect(),
        };
        let pad_id = cfg.pad_token_id.or(tc.pad_token_id).unwrap_or(0);
        let info = ModelInfo {
            family: "llava".into(),
            dir: dir.to_path_buf(),
            n_layers: tc.num_hidden_layers,
            vision_layers: cfg.vision_config.num_hidden_layers,
            d_model: tc.hidden_size,
            n_heads: tc.num_attention_heads,
            vocab_size: tc.vocab_size,
            image_token_id: cfg.image_token_index,
            eos_token_ids: eos,
            dtype: vb.dtype(),
        };
        let theta = tc.theta(&cfg_path)?;
        Ok(Llava {
            info,
            cfg,
            vision,
            projector,
            lm,
            tokenizer,
            template,
            processor,
            theta,
            feature_layers,
            pad_id,
        })
    }

    /// The patch grid of one image (rows, cols).
    pub fn grid(&self) -> (usize, usize) {
        let g = self.cfg.vision_config.image_size / self.cfg.vision_config.patch_size;
        (g, g)
    }

    /// Number of image tokens per image.
    pub fn image_tokens(&self) -> usize {
        let (r, c) = self.grid();
        r * c + usize::from(self.cfg.vision_feature_select_strategy == "full")
    }

    /// Image features `[n_images * tokens, d]` for pixel values `[n, 3, H, W]`, with the vision
    /// and projector hooks.
    pub fn image_features(&self, pixels: &Tensor, ctx: &mut HookCtx) -> Result<Tensor> {
        let until = self.feature_layers.iter().copied().max().unwrap_or(0);
        let (first, outs) = self
            .vision
            .forward(pixels, Some(until.saturating_sub(1)), ctx)?;
        let pick = |i: usize| {
            if i == 0 {
                first.clone()
            } else {
                outs[i - 1].clone()
            }
        };
        let feats: Vec<Tensor> = self.feature_layers.iter().map(|&i| pick(i)).collect();
        let mut f = Tensor::cat(&feats, candle_core::D::Minus1)?;
        if self.cfg.vision_feature_select_strategy == "default" {
            let n = f.dim(1)?;
            f = f.narrow(1, 1, n - 1)?;
        }
        let p = self.projector.forward(&f)?;
        let p = ctx.hook(HookPoint::Projector, p)?;
        let (b, n, d) = p.dims3()?;
        Ok(p.reshape((b * n, d))?)
    }

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
        let rope = Rope::standard(positions, self.cfg.text_config.head_dim(), self.theta)?;
        let m = mask::causal(valid_all, past, &dev)?;
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

impl Vlm for Llava {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        let mut v = HookPoint::standard(self.info.n_layers, self.info.vision_layers);
        v.push(HookPoint::VisionLnPost);
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
        prepare::check_image_count(messages, images.len(), None)?;
        let tmpl = self.template.as_ref().ok_or_else(|| {
            Error::config(
                self.info.dir.join("chat_template.jinja"),
                "missing: this LLaVA checkpoint has no chat template",
            )
        })?;
        let (text, bounds) = prepare::render_with_bounds(tmpl, messages, add_generation_prompt)?;
        let grid = self.grid();
        let n_tok = self.image_tokens();
        let (ids, spans) = prepare::tokenize_and_expand(
            &self.tokenizer,
            &text,
            &bounds,
            true,
            self.info.image_token_id,
            &vec![grid; images.len()],
            &|_| n_tok,
        )?;
        let dev = self.lm.embed.embeddings().device().clone();
        let mut pix = Vec::with_capacity(images.len());
        let mut views = Vec::with_capacity(images.len());
        for img in images {
            let v = self.processor.view(img);
            pix.push(self.processor.normalize_view(&v, &dev)?);
            views.push(v);
        }
        let pixel_values = Some(Tensor::stack(&pix, 0)?);
        Ok(Prepared {
            ids,
            prompt_text: text,
            spans,
            pixel_values,
            extra: Default::default(),
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
        let embeds = common::embed_with_images(
            &self.lm,
            inputs,
            &padded,
            self.info.image_token_id,
            self.info.dtype,
            ctx,
            |pixels, ctx| self.image_features(pixels, ctx),
        )?;
        let (positions, next) = common::positions(&padded.valid, &dev)?;
        ctx.set_spans(padded.spans.clone());
        let valid = padded.valid.clone();
        common::prefill(state, padded, next, Vec::new(), |cache| {
            self.run_lm(embeds, &positions, &valid, 0, cache, ctx, logits_for)
        })
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
        let (ids, positions, valid_all, past) =
            (&step.ids, &step.positions, &step.valid_all, step.past);
        let embeds = self.lm.embed_tokens(ids)?;
        let out = self.run_lm(
            embeds,
            positions,
            valid_all,
            past,
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

impl Llava {
    /// The config.
    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }
    /// The image processor.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }
    /// Token ids and embeddings dtype.
    pub fn dtype(&self) -> DType {
        self.info.dtype
    }
}
