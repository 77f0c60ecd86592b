//! Qwen3-VL (Qwen/Qwen3-VL-*-Instruct layout): a dynamic-resolution ViT over packed patches with
//! 2x2 merging and deepstack features, and a Qwen3 decoder (per-head q/k RMSNorm, GQA, tied
//! embeddings) with interleaved M-RoPE.
//!
//! The adapter holds the config, the weight names, the image processor (smart resize to a
//! multiple of patch x merge within the pixel bounds of `preprocessor_config.json`, Pillow-exact
//! bicubic, patches flattened in transformers' order) and the forward's glue: image features
//! replace the `<|image_pad|>` tokens, deepstack feature `k` is added at the image positions after
//! language-model layer `k`, and every token gets 3-D rotary positions
//! ([`crate::blocks::mrope::rope_index`]). The blocks live in [`crate::blocks`]
//! ([`PackedVit`], [`Mrope`], the Llama-style decoder of [`super::llava::load_llama`]).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{DynamicImage, RgbImage};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::blocks::attention::QkvProj;
use crate::blocks::mlp::linear;
use crate::blocks::mrope::rope_index;
use crate::blocks::packed_vit::window_coords;
use crate::blocks::weights::pick_prefix;
use crate::blocks::{
    mask, Activation, Attention, Block, Decoder, LogitsFor, Mlp, Mrope, MropeLayout, Norm,
    PackedVit, PatchMerger,
};
use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint};
use crate::prepare::{self, Prepared};
use crate::preprocess::{resize_rgb, to_rgb, ImageProcessor};
use crate::spans::Spans;
use crate::template::{ChatTemplate, Message};

use super::common;
use super::llava::{load_llama, LlamaConfig};
use super::{DecodeState, LoadOptions, ModelInfo, Vlm};

/// Key of the `[n_images, 3]` (i64) grid tensor in [`Prepared::extra`]: `(t, h, w)` in patches,
/// before the merge, as transformers' `image_grid_thw`.
pub const GRID_KEY: &str = "image_grid_thw";

fn d_depth() -> usize {
    27
}
fn d_vis_hidden() -> usize {
    1152
}
fn d_vis_inter() -> usize {
    4304
}
fn d_vis_heads() -> usize {
    16
}
fn d_three() -> usize {
    3
}
fn d_patch() -> usize {
    16
}
fn d_two() -> usize {
    2
}
fn d_out_hidden() -> usize {
    3584
}
fn d_n_pos() -> usize {
    2304
}
fn d_deepstack() -> Vec<usize> {
    vec![8, 16, 24]
}
fn d_gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

/// The vision config (transformers' defaults where absent).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3VisionConfig {
    #[serde(default = "d_depth")]
    pub depth: usize,
    #[serde(default = "d_vis_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vis_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_vis_heads")]
    pub num_heads: usize,
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_two")]
    pub spatial_merge_size: usize,
    #[serde(default = "d_two")]
    pub temporal_patch_size: usize,
    #[serde(default = "d_out_hidden")]
    pub out_hidden_size: usize,
    #[serde(default = "d_n_pos")]
    pub num_position_embeddings: usize,
    #[serde(default = "d_deepstack")]
    pub deepstack_visual_indexes: Vec<usize>,
    #[serde(default = "d_gelu_tanh")]
    pub hidden_act: String,
    pub rope_parameters: Option<serde_json::Value>,
}

fn d_image_token() -> u32 {
    151655
}
fn d_vision_start() -> u32 {
    151652
}

/// The Qwen3-VL config.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3VlConfig {
    pub text_config: LlamaConfig,
    pub vision_config: Qwen3VisionConfig,
    #[serde(default = "d_image_token")]
    pub image_token_id: u32,
    #[serde(default = "d_vision_start")]
    pub vision_start_token_id: u32,
    pub pad_token_id: Option<u32>,
}

/// Transformers' `round` (ties to even), used by `smart_resize`.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// The Qwen2-VL image processor as Qwen3-VL uses it: smart resize, rescale, normalize, frame
/// repeated to the temporal patch size, patches flattened `[n, C*T*P*P]` in merge-window order.
#[derive(Debug, Clone)]
pub struct QwenImageProcessor {
    /// RGB conversion, resampling filter, rescale and normalisation (its size rule is unused).
    pub base: ImageProcessor,
    pub do_resize: bool,
    /// Pixel bounds (`size.shortest_edge` / `size.longest_edge`, or `min_pixels` / `max_pixels`).
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
}

impl QwenImageProcessor {
    /// Read `preprocessor_config.json` from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Err(Error::config(
                &path,
                "missing: the image processor config is needed to prepare images",
            ));
        }
        let v = crate::source::read_json(&path)?;
        Self::from_json(&v, &path)
    }

    /// Parse a processor config value (`path` names it in errors). Pixel bounds come from
    /// `min_pixels` / `max_pixels` when present, else `size.{shortest_edge, longest_edge}` (or
    /// `size.{min_pixels, max_pixels}`), else transformers' defaults (56*56, 28*28*1280).
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let mut plain = v.clone();
        if let Some(o) = plain.as_object_mut() {
            o.remove("size");
            o.remove("crop_size");
            o.remove("do_center_crop");
        }
        let base = ImageProcessor::from_json(&plain, path)?;
        let num = |o: Option<&serde_json::Value>, k: &str| -> Result<Option<u64>> {
            match o.and_then(|o| o.get(k)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                    Error::config(path, format!("'{k}' must be a positive integer"))
                }),
            }
        };
        let size = v.get("size");
        let min_pixels = num(Some(v), "min_pixels")?
            .or(num(size, "shortest_edge")?)
            .or(num(size, "min_pixels")?)
            .unwrap_or(56 * 56);
        let max_pixels = num(Some(v), "max_pixels")?
            .or(num(size, "longest_edge")?)
            .or(num(size, "max_pixels")?)
            .unwrap_or(28 * 28 * 1280);
        if min_pixels == 0 || min_pixels > max_pixels {
            return Err(Error::config(
                path,
                format!("pixel bounds {min_pixels}..{max_pixels}: expected 0 < min <= max"),
            ));
        }
        let int = |k: &str, d: usize| -> Result<usize> {
            Ok(num(Some(v), k)?.map(|x| x as usize).unwrap_or(d))
        };
        let p = QwenImageProcessor {
            base,
            do_resize: v.get("do_resize").and_then(|x| x.as_bool()).unwrap_or(true),
            min_pixels,
            max_pixels,
            patch_size: int("patch_size", 14)?,
            temporal_patch_size: int("temporal_patch_size", 2)?,
            merge_size: int("merge_size", 2)?,
        };
        if p.patch_size == 0 || p.temporal_patch_size == 0 || p.merge_size == 0 {
            return Err(Error::config(
                path,
                "patch_size, temporal_patch_size and merge_size must be positive",
            ));
        }
        Ok(p)
    }

    /// The side every resized dimension is a multiple of (`patch_size * merge_size`).
    pub fn factor(&self) -> u32 {
        (self.patch_size * self.merge_size) as u32
    }

    /// Transformers' `smart_resize`: round each side to a multiple of the factor, then scale
    /// down (floor) to at most `max_pixels` or up (ceil) to at least `min_pixels`, keeping the
    /// aspect ratio. Like transformers, an image with a side shorter than the factor, or an
    /// aspect ratio above 200, is refused. Returns `(height, width)`.
    pub fn smart_resize(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        let f = self.factor();
        if height < f || width < f {
            return Err(Error::input(format!(
                "image of {width}x{height} pixels is too small: both sides must be at least {f} pixels (patch {} x merge {}) for this Qwen-VL processor",
                self.patch_size, self.merge_size
            )));
        }
        let (h, w, ff) = (height as f64, width as f64, f as f64);
        if h.max(w) / h.min(w) > 200.0 {
            return Err(Error::input(format!(
                "image of {width}x{height} pixels: the aspect ratio must be at most 200"
            )));
        }
        let mut hb = py_round(h / ff) * ff;
        let mut wb = py_round(w / ff) * ff;
        if hb * wb > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            hb = ff.max((h / beta / ff).floor() * ff);
            wb = ff.max((w / beta / ff).floor() * ff);
        } else if hb * wb < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            hb = (h * beta / ff).ceil() * ff;
            wb = (w * beta / ff).ceil() * ff;
        }
        Ok((hb as u32, wb as u32))
    }

    /// One image: the view the model sees, its flattened patches and its grid.
    pub fn process(&self, img: &DynamicImage) -> Result<ProcessedImage> {
        let rgb = if self.base.do_convert_rgb {
            to_rgb(img)
        } else {
            img.to_rgb8()
        };
        let (h0, w0) = (rgb.height(), rgb.width());
        let (rh, rw) = if self.do_resize {
            self.smart_resize(h0, w0)?
        } else {
            let f = self.factor();
            if h0 % f != 0 || w0 % f != 0 || h0 == 0 || w0 == 0 {
                return Err(Error::input(format!(
                    "image of {w0}x{h0} pixels: with do_resize false both sides must be multiples of {f}"
                )));
            }
            (h0, w0)
        };
        let view = if (rh, rw) == (h0, w0) {
            rgb
        } else {
            resize_rgb(&rgb, rw, rh, self.base.filter)
        };
        let norm = self
            .base
            .normalize_view(&view, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (p, t, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let (hh, ww) = (rh as usize, rw as usize);
        let (gh, gw) = (hh / p, ww / p);
        let k = 3 * t * p * p;
        let mut out = Vec::with_capacity(gh * gw * k);
        for (r, c) in window_coords(1, gh, gw, m) {
            let (r, c) = (r as usize, c as usize);
            for ch in 0..3 {
                for _ in 0..t {
                    for py in 0..p {
                        let row = ch * hh * ww + (r * p + py) * ww + c * p;
                        out.extend_from_slice(&norm[row..row + p]);
                    }
                }
            }
        }
        Ok(ProcessedImage {
            view,
            patches: out,
            grid: (1, gh, gw),
        })
    }
}

/// One image after [`QwenImageProcessor::process`].
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// The image as the model sees it (after the smart resize).
    pub view: RgbImage,
    /// Flattened patches, row-major `[t*h*w, C*T*P*P]`, grouped by merge windows.
    pub patches: Vec<f32>,
    /// `(t, h, w)` in patches, before the merge (`image_grid_thw`).
    pub grid: (usize, usize, usize),
}

/// Per batch row, 3-D positions in the padded layout; and each row's next free position.
type RowPositions = (Vec<Vec<[u32; 3]>>, Vec<u32>);

/// A loaded Qwen3-VL model.
pub struct Qwen3Vl {
    info: ModelInfo,
    cfg: Qwen3VlConfig,
    pub vision: PackedVit,
    pub lm: Decoder,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    processor: QwenImageProcessor,
    mrope: Mrope,
    pad_id: u32,
}

/// Rotary base and M-RoPE section of the text config (`rope_parameters` in transformers 5,
/// `rope_scaling` + `rope_theta` before).
fn text_rope(tc: &LlamaConfig, path: &Path) -> Result<(f64, Vec<usize>)> {
    let mut theta = tc.rope_theta;
    let mut section = None;
    for v in [&tc.rope_parameters, &tc.rope_scaling]
        .into_iter()
        .flatten()
    {
        if let Some(t) = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|x| x.as_str())
        {
            if t != "default" && t != "mrope" {
                return Err(Error::config(
                    path,
                    format!("rope type '{t}' is not supported for Qwen3-VL (default only)"),
                ));
            }
        }
        if let Some(x) = v.get("rope_theta").and_then(|x| x.as_f64()) {
            theta = Some(x);
        }
        if let Some(s) = v.get("mrope_section").and_then(|x| x.as_array()) {
            section = Some(
                s.iter()
                    .map(|x| x.as_u64().map(|u| u as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Error::config(path, "mrope_section must be a list of 3 integers")
                    })?,
            );
        }
    }
    Ok((
        theta.unwrap_or(5_000_000.0),
        section.unwrap_or_else(|| vec![24, 20, 20]),
    ))
}

fn eos_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Load the packed-patch vision tower (`vb` at the `visual` prefix).
pub fn load_vision(vb: VarBuilder, c: &Qwen3VisionConfig, path: &Path) -> Result<PackedVit> {
    let d = c.hidden_size;
    let heads = c.num_heads;
    if heads == 0 || !d.is_multiple_of(heads) {
        return Err(Error::config(
            path,
            format!("vision hidden_size {d} is not divisible by num_heads {heads}"),
        ));
    }
    let dh = d / heads;
    let k = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size;
    let side = (c.num_position_embeddings as f64).sqrt().round() as usize;
    if side * side != c.num_position_embeddings {
        return Err(Error::config(
            path,
            format!(
                "vision num_position_embeddings {} is not a square",
                c.num_position_embeddings
            ),
        ));
    }
    let act = Activation::from_hf(&c.hidden_act)?;
    let pe = vb.pp("patch_embed.proj");
    let patch_w = pe
        .get(
            (
                d,
                c.in_channels,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ),
            "weight",
        )?
        .reshape((d, k))?;
    let patch = candle_nn::Linear::new(patch_w, Some(pe.get(d, "bias")?));
    let mut blocks = Vec::with_capacity(c.depth);
    for j in 0..c.depth {
        let vbl = vb.pp(format!("blocks.{j}"));
        let a = vbl.pp("attn");
        blocks.push(Block {
            norm1: Norm::layer(vbl.pp("norm1"), d, 1e-6)?,
            attn: Attention {
                qkv: QkvProj::Fused(linear(a.pp("qkv"), d, 3 * d, true)?),
                o: linear(a.pp("proj"), d, d, true)?,
                n_heads: heads,
                n_kv_heads: heads,
                head_dim: dh,
                scale: 1.0 / (dh as f64).sqrt(),
                q_norm: None,
                k_norm: None,
            },
            norm2: Norm::layer(vbl.pp("norm2"), d, 1e-6)?,
            mlp: Mlp::plain(
                vbl.pp("mlp"),
                ("linear_fc1", "linear_fc2"),
                d,
                c.intermediate_size,
                d,
                act,
                true,
            )?,
        });
    }
    let g = c.spatial_merge_size * c.spatial_merge_size;
    let merger = |vbm: VarBuilder, post: bool| -> Result<PatchMerger> {
        Ok(PatchMerger {
            norm: Norm::layer(vbm.pp("norm"), if post { d * g } else { d }, 1e-6)?,
            post_shuffle: post,
            mlp: Mlp::plain(
                vbm,
                ("linear_fc1", "linear_fc2"),
                d * g,
                d * g,
                c.out_hidden_size,
                Activation::Gelu,
                true,
            )?,
            group: g,
        })
    };
    let mut deepstack = Vec::with_capacity(c.deepstack_visual_indexes.len());
    for (kk, &at) in c.deepstack_visual_indexes.iter().enumerate() {
        if at >= c.depth {
            return Err(Error::config(
                path,
                format!(
                    "deepstack_visual_indexes names vision layer {at}; the tower has {}",
                    c.depth
                ),
            ));
        }
        deepstack.push((
            at,
            merger(vb.pp(format!("deepstack_merger_list.{kk}")), true)?,
        ));
    }
    let rope_theta = c
        .rope_parameters
        .as_ref()
        .and_then(|v| v.get("rope_theta"))
        .and_then(|x| x.as_f64())
        .unwrap_or(10000.0);
    Ok(PackedVit {
        patch,
        pos_embed: vb
            .pp("pos_embed")
            .get((c.num_position_embeddings, d), "weight")?,
        pos_side: side,
        blocks,
        merge: c.spatial_merge_size,
        head_dim: dh,
        rope_theta,
        merger: merger(vb.pp("merger"), false)?,
        deepstack,
    })
}

impl Qwen3Vl {
    /// Load from a checkpoint folder whose `config.json` is `cfg_v`.
    pub fn load(dir: &Path, cfg_v: &serde_json::Value, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let mut cfg_v = cfg_v.clone();
        for k in ["text_config", "vision_config"] {
            if cfg_v.get(k).is_none() {
                cfg_v[k] = serde_json::json!({});
            }
        }
        let cfg: Qwen3VlConfig = serde_json::from_value(cfg_v)
            .map_err(|e| Error::config(&cfg_path, format!("not a Qwen3-VL config: {e}")))?;
        let vb = crate::blocks::weights::var_builder(dir, opts.dtype, &opts.device)?;
        Self::from_vb(dir, cfg, vb)
    }

    /// Build from a config and a var builder.
    pub fn from_vb(dir: &Path, cfg: Qwen3VlConfig, vb: VarBuilder<'static>) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let werr = |e: Error| match e {
            Error::Candle(c) => Error::Weights(format!("{}: {c}", dir.display())),
            o => o,
        };
        let lm_prefix = pick_prefix(
            &vb,
            &["model.language_model", "model", "language_model.model"],
            "embed_tokens.weight",
        )
        .ok_or_else(|| {
            Error::Weights(format!(
                "{}: no model.language_model.embed_tokens.weight (not a Qwen3-VL checkpoint?)",
                dir.display()
            ))
        })?;
        let vis_prefix = pick_prefix(&vb, &["model.visual", "visual"], "patch_embed.proj.weight")
            .ok_or_else(|| {
            Error::Weights(format!(
                "{}: no model.visual.patch_embed.proj.weight (not a Qwen3-VL checkpoint?)",
                dir.display()
            ))
        })?;
        let tc = &cfg.text_config;
        let vc = &cfg.vision_config;
        let vb_lm = vb.pp(lm_prefix);
        let mut lm = load_llama(vb_lm.clone(), Some(vb.pp("lm_head")), tc, dir).map_err(werr)?;
        let dh = tc.head_dim();
        for (i, blk) in lm.blocks.iter_mut().enumerate() {
            let a = vb_lm.pp(format!("layers.{i}.self_attn"));
            blk.attn.q_norm =
                Some(Norm::rms(a.pp("q_norm"), dh, tc.rms_norm_eps, false).map_err(werr)?);
            blk.attn.k_norm =
                Some(Norm::rms(a.pp("k_norm"), dh, tc.rms_norm_eps, false).map_err(werr)?);
        }
        let vision = load_vision(vb.pp(vis_prefix), vc, &cfg_path).map_err(werr)?;
        if vc.deepstack_visual_indexes.len() > tc.num_hidden_layers {
            return Err(Error::config(
                &cfg_path,
                format!(
                    "{} deepstack levels for a {}-layer language model",
                    vc.deepstack_visual_indexes.len(),
                    tc.num_hidden_layers
                ),
            ));
        }
        if vc.out_hidden_size != tc.hidden_size {
            return Err(Error::config(
                &cfg_path,
                format!(
                    "vision out_hidden_size {} differs from the text hidden_size {}",
                    vc.out_hidden_size, tc.hidden_size
                ),
            ));
        }
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = prepare::load_tokenizer(&tok_path)?;
        for (tok, want) in [
            ("<|image_pad|>", Some(cfg.image_token_id)),
            ("<|vision_start|>", Some(cfg.vision_start_token_id)),
            ("<|vision_end|>", None),
        ] {
            match tokenizer.token_to_id(tok) {
                None => {
                    return Err(Error::config(
                        &tok_path,
                        format!("the tokenizer has no {tok} token, which Qwen3-VL prompts need"),
                    ))
                }
                Some(id) if want.is_some_and(|w| w != id) => {
                    return Err(Error::config(
                        &tok_path,
                        format!(
                            "{tok} is id {id} in the tokenizer but {} in config.json",
                            want.unwrap_or_default()
                        ),
                    ))
                }
                _ => {}
            }
        }
        let template = ChatTemplate::from_dir(dir)?;
        let processor = QwenImageProcessor::from_dir(dir)?;
        if processor.patch_size != vc.patch_size
            || processor.merge_size != vc.spatial_merge_size
            || processor.temporal_patch_size != vc.temporal_patch_size
        {
            return Err(Error::config(
                dir.join("preprocessor_config.json"),
                format!(
                    "patch {} / merge {} / temporal {} differ from the vision config ({} / {} / {})",
                    processor.patch_size,
                    processor.merge_size,
                    processor.temporal_patch_size,
                    vc.patch_size,
                    vc.spatial_merge_size,
                    vc.temporal_patch_size
                ),
            ));
        }
        let mut eos = eos_ids(tc.eos_token_id.as_ref());
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g = crate::source::read_json(&gen_path)?;
            for id in eos_ids(g.get("eos_token_id")) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        if eos.is_empty() {
            eos.extend(tokenizer.token_to_id("<|im_end|>"));
        }
        let pad_id = cfg
            .pad_token_id
            .or(tc.pad_token_id)
            .or(tokenizer.token_to_id("<|endoftext|>"))
            .unwrap_or(0);
        let (theta, section) = text_rope(tc, &cfg_path)?;
        let mrope = Mrope::new(dh, theta, &section, MropeLayout::Interleaved)
            .map_err(|e| Error::config(&cfg_path, e.to_string()))?;
        let info = ModelInfo {
            family: "qwen3_vl".into(),
            dir: dir.to_path_buf(),
            n_layers: tc.num_hidden_layers,
            vision_layers: vc.depth,
            d_model: tc.hidden_size,
            n_heads: tc.num_attention_heads,
            vocab_size: tc.vocab_size,
            image_token_id: cfg.image_token_id,
            eos_token_ids: eos,
            dtype: vb.dtype(),
        };
        Ok(Qwen3Vl {
            info,
            cfg,
            vision,
            lm,
            tokenizer,
            template,
            processor,
            mrope,
            pad_id,
        })
    }

    /// The config.
    pub fn config(&self) -> &Qwen3VlConfig {
        &self.cfg
    }

    /// The image processor.
    pub fn processor(&self) -> &QwenImageProcessor {
        &self.processor
    }

    /// The `(t, h, w)` patch grids of a prepared input's images (empty without images).
    pub fn grids(&self, p: &Prepared) -> Result<Vec<(usize, usize, usize)>> {
        let Some(g) = p.extra.get(GRID_KEY) else {
            if p.pixel_values.is_some() {
                return Err(Error::input(format!(
                    "the prepared input has pixel values but no '{GRID_KEY}'; prepare it with a Qwen3-VL model"
                )));
            }
            return Ok(Vec::new());
        };
        let rows = g.to_dtype(DType::I64)?.to_vec2::<i64>().map_err(|_| {
            Error::input(format!(
                "'{GRID_KEY}' must be a [n_images, 3] integer tensor"
            ))
        })?;
        rows.iter()
            .map(|r| match r.as_slice() {
                &[t, h, w] if t > 0 && h > 0 && w > 0 => Ok((t as usize, h as usize, w as usize)),
                _ => Err(Error::input(format!(
                    "'{GRID_KEY}' row {r:?}: expected three positive sizes"
                ))),
            })
            .collect()
    }

    /// Per batch row, the 3-D rotary positions in the left-padded layout (padding gets 1 on
    /// every axis, as transformers writes it) and the next free position.
    fn positions_3d(&self, inputs: &[&Prepared], pads: &[usize]) -> Result<RowPositions> {
        let m = self.vision.merge;
        let mut rows = Vec::with_capacity(inputs.len());
        let mut next = Vec::with_capacity(inputs.len());
        for (p, &pad) in inputs.iter().zip(pads) {
            let grids: Vec<_> = self
                .grids(p)?
                .into_iter()
                .map(|(t, h, w)| (t, h / m, w / m))
                .collect();
            let (pos, nx) = rope_index(&p.ids, self.info.image_token_id, &grids)?;
            let mut row = vec![[1u32; 3]; pad];
            row.extend(pos);
            rows.push(row);
            next.push(nx);
        }
        Ok((rows, next))
    }

    /// The M-RoPE position ids `[3, b, s]` (i64) of a left-padded batch, as transformers'
    /// `get_rope_index` returns them.
    pub fn rope_position_ids(&self, inputs: &[&Prepared]) -> Result<Tensor> {
        let padded = common::pad_inputs(inputs, self.pad_id, &Device::Cpu)?;
        let (rows, _) = self.positions_3d(inputs, &padded.pads)?;
        let (b, s) = (rows.len(), rows.first().map(|r| r.len()).unwrap_or(0));
        let mut v = vec![0i64; 3 * b * s];
        for (bi, row) in rows.iter().enumerate() {
            for (si, p) in row.iter().enumerate() {
                for a in 0..3 {
                    v[(a * b + bi) * s + si] = p[a] as i64;
                }
            }
        }
        Ok(Tensor::from_vec(v, (3, b, s), &Device::Cpu)?)
    }
}

impl Vlm for Qwen3Vl {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn hook_points(&self) -> Vec<HookPoint> {
        let mut v = HookPoint::standard(self.info.n_layers, self.info.vision_layers);
        v.extend((0..self.vision.deepstack.len()).map(HookPoint::Deepstack));
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
                "missing: this Qwen3-VL checkpoint has no chat template",
            )
        })?;
        let (text, bounds) = prepare::render_with_bounds(tmpl, messages, add_generation_prompt)?;
        let m = self.processor.merge_size;
        let mut views = Vec::with_capacity(images.len());
        let mut pixels = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            let ProcessedImage {
                view,
                patches,
                grid: g,
            } = self
                .processor
                .process(img)
                .map_err(|e| Error::input(format!("image {i}: {e}")))?;
            views.push(view);
            pixels.extend(patches);
            grids.push(g);
        }
        let merged: Vec<(usize, usize)> = grids.iter().map(|&(_, h, w)| (h / m, w / m)).collect();
        let n_tok: Vec<usize> = grids.iter().map(|&(t, h, w)| t * h * w / (m * m)).collect();
        let (ids, spans) = prepare::tokenize_and_expand(
            &self.tokenizer,
            &text,
            &bounds,
            true,
            self.info.image_token_id,
            &merged,
            &|k| n_tok[k],
        )?;
        let dev = self.lm.embed.embeddings().device().clone();
        let k = self.vision.patch.weight().dim(1)?;
        let n: usize = grids.iter().map(|(t, h, w)| t * h * w).sum();
        let mut extra = std::collections::BTreeMap::new();
        let g: Vec<i64> = grids
            .iter()
            .flat_map(|&(t, h, w)| [t as i64, h as i64, w as i64])
            .collect();
        extra.insert(
            GRID_KEY.to_string(),
            Tensor::from_vec(g, (grids.len(), 3), &Device::Cpu)?,
        );
        Ok(Prepared {
            ids,
            prompt_text: text,
            spans,
            pixel_values: Some(Tensor::from_vec(pixels, (n, k), &dev)?),
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
        let mut pix = Vec::new();
        let mut grids = Vec::new();
        for p in inputs {
            if let Some(pv) = &p.pixel_values {
                pix.push(pv.to_device(&dev)?);
                grids.extend(self.grids(p)?);
            }
        }
        let embeds = self.lm.embed_tokens(&padded.ids)?;
        let id = self.info.image_token_id;
        let (embeds, deep) = if pix.is_empty() {
            (embeds, Vec::new())
        } else {
            let pixels = Tensor::cat(&pix, 0)?.to_dtype(self.info.dtype)?;
            let out = self.vision.forward_images(&pixels, &grids, ctx)?;
            let zeros = embeds.zeros_like()?;
            let deep = out
                .deepstack
                .iter()
                .map(|f| common::merge_features(&zeros, &padded.ids, id, f))
                .collect::<Result<Vec<_>>>()?;
            (
                common::merge_features(&embeds, &padded.ids, id, &out.merged)?,
                deep,
            )
        };
        let (pos, next) = self.positions_3d(inputs, &padded.pads)?;
        let rope = self.mrope.tables(&pos, &dev)?;
        let m = mask::causal(&padded.valid, 0, &dev)?;
        ctx.set_spans(padded.spans.clone());
        let mut after = |i: usize, x: Tensor| -> Result<Tensor> {
            match deep.get(i) {
                Some(d) => Ok((x + d)?),
                None => Ok(x),
            }
        };
        match state {
            Some(st) => {
                let out = self.lm.forward(
                    embeds,
                    Some(&rope),
                    Some(&m),
                    Some(&mut st.cache),
                    ctx,
                    logits_for,
                    &mut after,
                )?;
                st.valid = padded.valid;
                st.next_pos = next;
                st.spans = padded.spans;
                Ok(out)
            }
            None => self.lm.forward(
                embeds,
                Some(&rope),
                Some(&m),
                None,
                ctx,
                logits_for,
                &mut after,
            ),
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
        let (ids, positions, valid_all, past) =
            (&step.ids, &step.positions, &step.valid_all, step.past);
        // new text tokens: the same position on the three axes, continuing each row
        let pos: Vec<Vec<[u32; 3]>> = positions
            .to_vec2::<u32>()?
            .into_iter()
            .map(|r| r.into_iter().map(|p| [p; 3]).collect())
            .collect();
        let rope = self.mrope.tables(&pos, &dev)?;
        let m = mask::causal(valid_all, past, &dev)?;
        let embeds = self.lm.embed_tokens(ids)?;
        let out = self.lm.forward(
            embeds,
            Some(&rope),
            Some(&m),
            Some(&mut state.cache),
            ctx,
            logits_for,
            &mut |_, x| Ok(x),
        )?;
        step.finish(state);
        Ok(out)
    }

    fn decoder(&self) -> &Decoder {
        &self.lm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_with(min: u64, max: u64) -> QwenImageProcessor {
        let v = serde_json::json!({
            "size": {"shortest_edge": min, "longest_edge": max},
            "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
        });
        QwenImageProcessor::from_json(&v, Path::new("p.json")).unwrap()
    }

    #[test]
    fn smart_resize_rounds_and_clamps() {
        let p = proc_with(4096, 25600);
        // the fixture images: 100x100, 120x90 (w x h), 64x80 (ties round to even), 200x150 (max clamp)
        assert_eq!(p.smart_resize(100, 100).unwrap(), (96, 96));
        assert_eq!(p.smart_resize(90, 120).unwrap(), (96, 128));
        assert_eq!(p.smart_resize(80, 64).unwrap(), (64, 64));
        assert_eq!(p.smart_resize(150, 200).unwrap(), (128, 160));
        // below min_pixels after rounding: scaled up (ceil)
        assert_eq!(p.smart_resize(40, 40).unwrap(), (64, 64));
        // a side shorter than patch x merge: refused, naming the size
        let e = p.smart_resize(20, 100).unwrap_err().to_string();
        assert!(e.contains("100x20") && e.contains("32"), "{e}");
        assert!(p.smart_resize(32, 32 * 201).is_err());
    }

    #[test]
    fn min_pixels_keys_override_size() {
        let v = serde_json::json!({"min_pixels": 100, "max_pixels": 2000, "size": {"shortest_edge": 1, "longest_edge": 9}});
        let p = QwenImageProcessor::from_json(&v, Path::new("p.json")).unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (100, 2000));
        let bad = serde_json::json!({"min_pixels": 3000, "max_pixels": 2000});
        assert!(QwenImageProcessor::from_json(&bad, Path::new("p.json")).is_err());
    }

    #[test]
    fn patches_follow_transformers_order() {
        // a 64x64 image whose value encodes (row, col); patch 16, merge 2, grid 4x4
        let mut img = RgbImage::new(64, 64);
        for (x, y, px) in img.enumerate_pixels_mut() {
            *px = image::Rgb([y as u8, x as u8, 0]);
        }
        let p = proc_with(4096, 25600);
        let ProcessedImage {
            patches: v,
            grid: g,
            ..
        } = p.process(&DynamicImage::ImageRgb8(img)).unwrap();
        assert_eq!(g, (1, 4, 4));
        let k = 3 * 2 * 16 * 16;
        assert_eq!(v.len(), 16 * k);
        let val = |x: u8| (x as f32 / 255.0 - 0.5) / 0.5;
        // patch 2 is the first patch of the second row of window (0, 0): rows 16.., cols 0..
        let p2 = &v[2 * k..3 * k];
        assert_eq!(p2[0], val(16)); // channel 0 = row
        assert_eq!(p2[2 * 16 * 16], val(0)); // channel 1 = col
        assert_eq!(p2[16 * 16], val(16)); // second temporal copy repeats the frame
                                          // patch 4 opens window (0, 1): rows 0.., cols 32..
        let p4 = &v[4 * k..5 * k];
        assert_eq!(p4[2 * 16 * 16 + 1], val(33));
    }
}
