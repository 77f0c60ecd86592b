//! PaliGemma (google/paligemma-*-pt layout): SigLIP tower (no class token, post norm over all
//! tokens), one linear projector, Gemma decoder (embeddings scaled by `sqrt(d)`, RMSNorm with
//! `1 + w`, tanh-GELU gated MLP, multi-query attention, 1-indexed rotary positions) with
//! prefix-LM attention: the prompt (image tokens, `<bos>`, text, newline) attends
//! bidirectionally, generated tokens causally.
//!
//! There is no chat template. As the processor does, the input is `image_seq_length` image
//! tokens per image, `<bos>`, the text and a closing newline; a conversation is flattened into
//! that text with its turns joined by newlines and assistant turns prefixed with `answer `
//! ([`flatten_conversation`]).
//!
//! Transformers ≥ 5 merges the projector output into the already scaled embeddings as is (the
//! fixtures' `blocks.0.hook_resid_pre` equals `projector.hook_out` bitwise at the image
//! positions); older versions divided by `sqrt(d)` before the Gemma scaling, which is the same up
//! to rounding. `projector.hook_out` is therefore exactly what replaces the image tokens.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use image::DynamicImage;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::blocks::mlp::linear;
use crate::blocks::{mask, Activation, Decoder, LogitsFor, Norm, Rope, Vit};
use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint};
use crate::prepare::{self, Prepared};
use crate::preprocess::ImageProcessor;
use crate::spans::Spans;
use crate::template::Message;

use super::common;
use super::llava::{load_llama, LlamaConfig};
use super::{DecodeState, LoadOptions, ModelInfo, Vlm};

fn d_sig_hidden() -> usize {
    768
}
fn d_sig_inter() -> usize {
    3072
}
fn d_sig_layers() -> usize {
    12
}
fn d_sig_heads() -> usize {
    12
}
fn d_sig_image() -> usize {
    224
}
fn d_sig_patch() -> usize {
    16
}
fn d_sig_eps() -> f64 {
    1e-6
}
fn d_gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}
fn d_image_token() -> u32 {
    257152
}

/// SigLIP vision config (transformers' `SiglipVisionConfig` defaults where a key is absent).
#[derive(Debug, Clone, Deserialize)]
pub struct SiglipVisionConfig {
    #[serde(default = "d_sig_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_sig_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_sig_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_sig_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_sig_image")]
    pub image_size: usize,
    #[serde(default = "d_sig_patch")]
    pub patch_size: usize,
    #[serde(default = "d_sig_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_gelu_tanh")]
    pub hidden_act: String,
}

/// The PaliGemma config; `text_config` is read as a [`LlamaConfig`] after filling Gemma's
/// defaults (see [`PaliGemma::load`]).
#[derive(Debug, Clone, Deserialize)]
pub struct PaliGemmaConfig {
    pub text_config: LlamaConfig,
    pub vision_config: SiglipVisionConfig,
    #[serde(default = "d_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

/// Load a SigLIP vision tower (`vision_model.` prefix inside `vb`): patch conv with bias, learned
/// positions, no class token, no pre-norm, post norm over every token.
pub fn load_siglip(vb: VarBuilder, c: &SiglipVisionConfig) -> Result<Vit> {
    let d = c.hidden_size;
    let act = Activation::from_hf(&c.hidden_act)?;
    let emb = vb.pp("embeddings");
    let blocks = (0..c.num_hidden_layers)
        .map(|j| {
            Vit::encoder_layer(
                vb.pp(format!("encoder.layers.{j}")),
                d,
                c.num_attention_heads,
                c.intermediate_size,
                c.layer_norm_eps,
                act,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let pe = emb.pp("patch_embedding");
    let n_pos = (c.image_size / c.patch_size).pow(2);
    Ok(Vit {
        patch: Vit::patch_conv(
            pe.get((d, 3, c.patch_size, c.patch_size), "weight")?,
            Some(pe.get(d, "bias")?),
            c.patch_size,
        ),
        patch_size: c.patch_size,
        class_embedding: None,
        position_embedding: emb.pp("position_embedding").get((n_pos, d), "weight")?,
        pre_norm: None,
        blocks,
        post_norm: Some(Norm::layer(vb.pp("post_layernorm"), d, c.layer_norm_eps)?),
        post_norm_pooled: false,
    })
}

/// Gemma's RMSNorm scales by `1 + w`: fold the one into a norm loaded as plain RMSNorm.
fn plus_one(n: &mut Norm) -> Result<()> {
    if let Norm::Rms { w, .. } = n {
        *w = (&*w + 1.0)?;
    }
    Ok(())
}

/// Flatten a conversation as PaliGemma prompts are written: the text parts of each message
/// joined by spaces, assistant messages prefixed with `answer `, messages joined by newlines.
/// Returns the text (without the image tokens, `<bos>` and the closing newline the processor
/// adds) and each message's `(role, start, end)` byte range, its separating newline included.
pub fn flatten_conversation(messages: &[Message]) -> (String, Vec<(String, usize, usize)>) {
    let mut text = String::new();
    let mut bounds = Vec::with_capacity(messages.len());
    for (k, m) in messages.iter().enumerate() {
        let start = text.len();
        if m.role == "assistant" {
            text.push_str("answer ");
        }
        text.push_str(&m.joined_text());
        if k + 1 < messages.len() {
            text.push('\n');
        }
        // the last message's newline is the processor's closing one
        bounds.push((
            m.role.clone(),
            start,
            text.len() + usize::from(k + 1 == messages.len()),
        ));
    }
    (text, bounds)
}

/// A loaded PaliGemma model.
pub struct PaliGemma {
    info: ModelInfo,
    cfg: PaliGemmaConfig,
    pub vision: Vit,
    pub projector: Linear,
    pub lm: Decoder,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    theta: f64,
    pad_id: u32,
    bos: String,
    image_token: String,
    n_image_tokens: usize,
}

impl PaliGemma {
    /// Load from a checkpoint folder whose `config.json` is `cfg_v`.
    pub fn load(dir: &Path, cfg_v: &serde_json::Value, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let mut cfg_v = cfg_v.clone();
        // PaliGemmaConfig's defaults when a sub-config is absent, then Gemma's for absent keys
        if cfg_v.get("text_config").is_none() {
            cfg_v["text_config"] = serde_json::json!({"hidden_size": 2048, "num_hidden_layers": 18,
                "intermediate_size": 16384, "num_attention_heads": 8, "num_key_value_heads": 1});
        }
        if cfg_v.get("vision_config").is_none() {
            cfg_v["vision_config"] = serde_json::json!({"intermediate_size": 4096,
                "hidden_size": 1152, "patch_size": 14, "image_size": 224,
                "num_hidden_layers": 27, "num_attention_heads": 16});
        }
        let tc = cfg_v["text_config"]
            .as_object_mut()
            .ok_or_else(|| Error::config(&cfg_path, "text_config must be an object"))?;
        let act = tc
            .get("hidden_activation")
            .filter(|v| !v.is_null())
            .or_else(|| tc.get("hidden_act"))
            .cloned()
            .unwrap_or_else(|| serde_json::json!("gelu_pytorch_tanh"));
        tc.insert("hidden_act".into(), act);
        for (k, v) in [
            ("vocab_size", serde_json::json!(256000)),
            ("hidden_size", serde_json::json!(3072)),
            ("intermediate_size", serde_json::json!(24576)),
            ("num_hidden_layers", serde_json::json!(28)),
            ("num_attention_heads", serde_json::json!(16)),
            ("head_dim", serde_json::json!(256)),
            ("tie_word_embeddings", serde_json::json!(true)),
        ] {
            if tc.get(k).is_none_or(|x| x.is_null()) {
                tc.insert(k.into(), v);
            }
        }
        let cfg: PaliGemmaConfig = serde_json::from_value(cfg_v)
            .map_err(|e| Error::config(&cfg_path, format!("not a PaliGemma config: {e}")))?;
        let vb = crate::blocks::weights::var_builder(dir, opts.dtype, &opts.device)?;
        Self::from_vb(dir, cfg, vb)
    }

    /// Build from a config and a var builder (weights from files, or trainable variables).
    pub fn from_vb(dir: &Path, cfg: PaliGemmaConfig, vb: VarBuilder<'static>) -> Result<Self> {
        let werr = |e: Error| match e {
            Error::Candle(c) => Error::Weights(format!("{}: {c}", dir.display())),
            o => o,
        };
        // transformers 4 (the Hub checkpoints) and 5 layouts
        let (lm_model, lm_head, vt, proj) =
            if vb.contains_tensor("model.language_model.embed_tokens.weight") {
                (
                    vb.pp("model.language_model"),
                    vb.pp("lm_head"),
                    vb.pp("model.vision_tower.vision_model"),
                    vb.pp("model.multi_modal_projector.linear"),
                )
            } else {
                (
                    vb.pp("language_model.model"),
                    vb.pp("language_model.lm_head"),
                    vb.pp("vision_tower.vision_model"),
                    vb.pp("multi_modal_projector.linear"),
                )
            };
        let tc = &cfg.text_config;
        let vc = &cfg.vision_config;
        let mut lm = load_llama(lm_model, Some(lm_head), tc, dir).map_err(werr)?;
        for b in lm.blocks.iter_mut() {
            plus_one(&mut b.norm1)?;
            plus_one(&mut b.norm2)?;
        }
        plus_one(&mut lm.norm)?;
        lm.embed_scale = Some((tc.hidden_size as f64).sqrt());
        let vision = load_siglip(vt, vc).map_err(werr)?;
        let projector = linear(proj, vc.hidden_size, tc.hidden_size, true).map_err(werr)?;

        let tok_path = dir.join("tokenizer.json");
        let tokenizer = prepare::load_tokenizer(&tok_path)?;
        let image_token = match tokenizer.id_to_token(cfg.image_token_index) {
            Some(t) if tokenizer.token_to_id(&t) == Some(cfg.image_token_index) && t == "<image>" => t,
            _ => {
                return Err(Error::config(
                    &tok_path,
                    format!(
                        "the tokenizer has no <image> token with id {} (config.json's image_token_index)",
                        cfg.image_token_index
                    ),
                ))
            }
        };
        let bos_id = cfg
            .bos_token_id
            .or_else(|| tokenizer.token_to_id("<bos>"))
            .unwrap_or(2);
        let bos = tokenizer.id_to_token(bos_id).ok_or_else(|| {
            Error::config(
                &tok_path,
                format!("the tokenizer has no BOS token (id {bos_id})"),
            )
        })?;
        let processor = ImageProcessor::from_dir(dir)?;
        let grid = vc.image_size / vc.patch_size;
        let n_image_tokens = grid * grid;
        let pp_path = dir.join("preprocessor_config.json");
        let pp = crate::source::read_json(&pp_path)?;
        if let Some(n) = pp.get("image_seq_length").and_then(|x| x.as_u64()) {
            if n as usize != n_image_tokens {
                return Err(Error::config(
                    &pp_path,
                    format!(
                        "image_seq_length {n}, but the vision tower makes {n_image_tokens} tokens ({}/{} patches squared)",
                        vc.image_size, vc.patch_size
                    ),
                ));
            }
        }
        let eos = match &tc.eos_token_id {
            Some(serde_json::Value::Number(n)) => vec![n.as_u64().unwrap_or(1) as u32],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|v| v as u32))
                .collect(),
            _ => tokenizer.token_to_id("<eos>").into_iter().collect(),
        };
        let info = ModelInfo {
            family: "paligemma".into(),
            dir: dir.to_path_buf(),
            n_layers: tc.num_hidden_layers,
            vision_layers: vc.num_hidden_layers,
            d_model: tc.hidden_size,
            n_heads: tc.num_attention_heads,
            vocab_size: tc.vocab_size,
            image_token_id: cfg.image_token_index,
            eos_token_ids: eos,
            dtype: vb.dtype(),
        };
        let theta = tc.theta(&dir.join("config.json"))?;
        let pad_id = cfg.pad_token_id.or(tc.pad_token_id).unwrap_or(0);
        Ok(PaliGemma {
            info,
            cfg,
            vision,
            projector,
            lm,
            tokenizer,
            processor,
            theta,
            pad_id,
            bos,
            image_token,
            n_image_tokens,
        })
    }

    /// The config.
    pub fn config(&self) -> &PaliGemmaConfig {
        &self.cfg
    }

    /// The image processor.
    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// The patch grid of one image (rows, cols).
    pub fn grid(&self) -> (usize, usize) {
        let g = self.cfg.vision_config.image_size / self.cfg.vision_config.patch_size;
        (g, g)
    }

    /// Image tokens per image (`image_seq_length`).
    pub fn image_tokens(&self) -> usize {
        self.n_image_tokens
    }

    /// Image features `[n_images * tokens, d]` for pixel values `[n, 3, H, W]`, with the vision
    /// and projector hooks.
    pub fn image_features(&self, pixels: &Tensor, ctx: &mut HookCtx) -> Result<Tensor> {
        let f = self.vision.forward_final(pixels, ctx)?;
        let p = ctx.hook(HookPoint::Projector, self.projector.forward(&f)?)?;
        let (b, n, d) = p.dims3()?;
        Ok(p.reshape((b * n, d))?)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_lm(
        &self,
        embeds: Tensor,
        positions: &Tensor,
        valid_all: &[Vec<u8>],
        prefix_end: &[usize],
        past: usize,
        cache: Option<&mut crate::blocks::KvCache>,
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let dev = embeds.device().clone();
        // PaliGemma's positions are 1-indexed
        let pos = (positions.to_dtype(DType::F32)? + 1.0)?;
        let rope = Rope::standard(&pos, self.cfg.text_config.head_dim(), self.theta)?;
        let m = mask::prefix(valid_all, prefix_end, past, &dev)?;
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

impl Vlm for PaliGemma {
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

    /// The processor's input; `add_generation_prompt` changes nothing (PaliGemma's prompt
    /// always ends with the newline after which the answer is generated).
    fn prepare(
        &self,
        messages: &[Message],
        images: &[DynamicImage],
        _add_generation_prompt: bool,
    ) -> Result<Prepared> {
        prepare::check_image_count(messages, images.len(), None)?;
        let (body, bounds) = flatten_conversation(messages);
        let head = format!("{}{}", self.image_token.repeat(images.len()), self.bos);
        let text = format!("{head}{body}\n");
        let bounds: Vec<(String, usize, usize)> = bounds
            .into_iter()
            .map(|(r, s, e)| (r, s + head.len(), e + head.len()))
            .collect();
        let n_tok = self.n_image_tokens;
        let (ids, spans) = prepare::tokenize_and_expand(
            &self.tokenizer,
            &text,
            &bounds,
            false,
            self.info.image_token_id,
            &vec![self.grid(); images.len()],
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
        Ok(Prepared {
            ids,
            prompt_text: format!(
                "{}{}{body}\n",
                self.image_token.repeat(images.len() * n_tok),
                self.bos
            ),
            spans,
            pixel_values: Some(Tensor::stack(&pix, 0)?),
            extra: Default::default(),
            views,
        })
    }

    /// Prefill: every prompt token is in the bidirectional prefix (`state.prefix_end` is set to
    /// the padded prompt length), so later [`Vlm::extend`] tokens are a causal suffix.
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
        // the whole prompt is the bidirectional prefix
        let prefix_end = vec![padded.ids.dim(1)?; inputs.len()];
        ctx.set_spans(padded.spans.clone());
        let valid = padded.valid.clone();
        let pe = prefix_end.clone();
        common::prefill(state, padded, next, prefix_end, |cache| {
            self.run_lm(embeds, &positions, &valid, &pe, 0, cache, ctx, logits_for)
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
        let prefix_end = state.prefix_end.clone();
        let out = self.run_lm(
            embeds,
            positions,
            valid_all,
            &prefix_end,
            past,
            Some(&mut state.cache),
            ctx,
            logits_for,
        )?;
        step.finish(state);
        Ok(out)
    }

    fn supports_prefix_reuse(&self) -> bool {
        false
    }

    fn decoder(&self) -> &Decoder {
        &self.lm
    }
}
