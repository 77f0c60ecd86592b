//! Model families: small adapters over the shared blocks. Each family declares its hook points,
//! prepares inputs as its Hugging Face processor does, and runs the forward under a hook
//! context. [`load`] picks the family from `config.json`.

pub mod blip2;
pub mod common;
pub mod instructblip;
pub mod llava;
pub mod paligemma;
pub mod qwen3_vl;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use tokenizers::Tokenizer;

use crate::blocks::{Decoder, KvCache, LogitsFor};
use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint};
use crate::prepare::Prepared;
use crate::spans::Spans;
use crate::template::Message;

/// What every loaded model tells about itself.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Family name (`llava`, `qwen3_vl`, `paligemma`, `blip-2`, `instructblip`).
    pub family: String,
    /// The checkpoint folder.
    pub dir: PathBuf,
    pub n_layers: usize,
    pub vision_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub vocab_size: usize,
    pub image_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub dtype: DType,
}

/// Incremental decoding state: the KV cache, which positions are real tokens, the next position
/// of each row, and each row's span table.
#[derive(Debug, Clone)]
pub struct DecodeState {
    pub cache: KvCache,
    /// Per row, 1 for a real token and 0 for padding, over every position so far.
    pub valid: Vec<Vec<u8>>,
    /// Per row, the position id the next token gets.
    pub next_pos: Vec<u32>,
    /// Per row, the span table of the sequence so far (positions in the padded layout).
    pub spans: Vec<Spans>,
    /// Per row, the end of the bidirectional prefix in the padded layout (prefix-LM families
    /// such as PaliGemma; empty for causal families).
    pub prefix_end: Vec<usize>,
}

impl DecodeState {
    /// Batch size.
    pub fn batch(&self) -> usize {
        self.valid.len()
    }
    /// Repeat each row `n` times (one prefix, several continuations).
    pub fn repeat(&self, n: usize) -> Result<Self> {
        let rep = |v: &Vec<Vec<u8>>| {
            v.iter()
                .flat_map(|r| std::iter::repeat_n(r.clone(), n))
                .collect()
        };
        Ok(DecodeState {
            cache: self.cache.repeat_batch(n)?,
            valid: rep(&self.valid),
            next_pos: self
                .next_pos
                .iter()
                .flat_map(|&p| std::iter::repeat_n(p, n))
                .collect(),
            spans: self
                .spans
                .iter()
                .flat_map(|s| std::iter::repeat_n(s.clone(), n))
                .collect(),
            prefix_end: self
                .prefix_end
                .iter()
                .flat_map(|&p| std::iter::repeat_n(p, n))
                .collect(),
        })
    }
}

/// A vision-language model with hooks.
pub trait Vlm {
    /// Facts about the loaded model.
    fn info(&self) -> &ModelInfo;
    /// Every hook point this model has.
    fn hook_points(&self) -> Vec<HookPoint>;
    /// The text tokenizer.
    fn tokenizer(&self) -> &Tokenizer;
    /// Build the model input for a conversation and its images, as the family's processor does.
    fn prepare(
        &self,
        messages: &[Message],
        images: &[DynamicImage],
        add_generation_prompt: bool,
    ) -> Result<Prepared>;
    /// Replace the prepared pixel values (e.g. with a reference processor's), checking the shape.
    fn set_pixel_values(&self, p: &mut Prepared, pixel_values: Tensor) -> Result<()> {
        if let Some(old) = &p.pixel_values {
            if old.dims() != pixel_values.dims() {
                return Err(Error::input(format!(
                    "pixel values of shape {:?} given; this input needs {:?}",
                    pixel_values.dims(),
                    old.dims()
                )));
            }
        }
        p.pixel_values = Some(pixel_values);
        Ok(())
    }
    /// Prefill a batch (left-padded). With `state`, the KV cache is filled for decoding.
    fn forward(
        &self,
        inputs: &[&Prepared],
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
        state: Option<&mut DecodeState>,
    ) -> Result<Tensor>;
    /// Append tokens to a decoding state (`new_ids[b]`, rows of different lengths are
    /// left-padded) and return their logits. `spans` (optional) replaces each row's span table
    /// in the unpadded coordinates of the whole new sequence.
    fn extend(
        &self,
        state: &mut DecodeState,
        new_ids: &[Vec<u32>],
        new_spans: Option<&[Spans]>,
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
    ) -> Result<Tensor>;
    /// The language model (for the logit lens).
    fn decoder(&self) -> &Decoder;
    /// True when a longer conversation can be run by extending the cache of a shorter one
    /// (causal families). Prefix-LM families (PaliGemma) attend bidirectionally over the whole
    /// prompt, so a new turn needs a fresh forward.
    fn supports_prefix_reuse(&self) -> bool {
        true
    }
    /// The shape of a hook's tensor, symbolic where it depends on the input
    /// (`b` batch, `s` sequence, `n` vision tokens, `dv` vision width).
    fn hook_shape(&self, hp: &HookPoint) -> String {
        use crate::hooks::{Site, Tower};
        let i = self.info();
        let dh = i.d_model / i.n_heads.max(1);
        match hp {
            HookPoint::Block {
                tower: Tower::Lm,
                site,
                ..
            } => match site {
                Site::Q | Site::K | Site::V => format!("[b, s, heads, {dh}]"),
                Site::Scores | Site::Pattern => format!("[b, {}, s, s]", i.n_heads),
                _ => format!("[b, s, {}]", i.d_model),
            },
            HookPoint::Block {
                tower: Tower::Vision,
                site,
                ..
            } => match site {
                Site::Q | Site::K | Site::V => "[b, n, heads, dh]".into(),
                Site::Scores | Site::Pattern => "[b, heads, n, n]".into(),
                _ => "[b, n, dv]".into(),
            },
            HookPoint::Block {
                tower: Tower::Qformer,
                site,
                ..
            } => match site {
                Site::CrossPattern => "[b, heads, q, n]".into(),
                Site::Scores | Site::Pattern => "[b, heads, q(+t), q(+t)]".into(),
                _ => "[b, q(+t), dq]".into(),
            },
            HookPoint::LnFinal => format!("[b, s, {}]", i.d_model),
            HookPoint::Logits => format!("[b, s, {}]", i.vocab_size),
            HookPoint::VisionLnPost => "[b, dv] or [b, n, dv]".into(),
            HookPoint::Deepstack(_) | HookPoint::Projector => format!("[b, m, {}]", i.d_model),
        }
    }
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// Load a model from a local folder or a Hub id, choosing the family from `config.json`.
pub fn load(source: &str, opts: &LoadOptions) -> Result<Box<dyn Vlm>> {
    let dir = crate::source::resolve_default_or(source)?;
    load_dir(&dir, opts)
}

/// Load a model from a checkpoint folder.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn Vlm>> {
    if opts.dtype == DType::BF16 && opts.device.is_cpu() {
        // candle's CPU backend has no bf16 matmul: refuse here rather than fail mid-forward
        return Err(Error::input(
            "dtype bf16 is not supported on the CPU (candle's CPU backend has no bf16 matrix multiply); use f32 or f16 on the CPU (bf16 weight files load fine at either), or bf16 on cuda",
        ));
    }
    let cfg_path = dir.join("config.json");
    let cfg = crate::source::read_json(&cfg_path)?;
    let model_type = cfg.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    match model_type {
        "llava" => Ok(Box::new(llava::Llava::load(dir, &cfg, opts)?)),
        "paligemma" => Ok(Box::new(paligemma::PaliGemma::load(dir, &cfg, opts)?)),
        "qwen3_vl" => Ok(Box::new(qwen3_vl::Qwen3Vl::load(dir, &cfg, opts)?)),
        "blip-2" | "blip_2" => Ok(Box::new(blip2::QformerVlm::load_blip2(dir, &cfg, opts)?)),
        "instructblip" => Ok(Box::new(instructblip::load(dir, &cfg, opts)?)),
        other => Err(Error::config(
            &cfg_path,
            format!("unknown or unsupported model_type '{other}' (supported: llava, qwen3_vl, paligemma, blip-2, instructblip)"),
        )),
    }
}

/// Decode the prepared input greedily for `max_new` tokens with a KV cache. Stops early at an
/// end-of-sequence token unless `min_new` forces more.
pub fn generate_greedy(
    model: &dyn Vlm,
    p: &Prepared,
    max_new: usize,
    min_new: usize,
) -> Result<Vec<u32>> {
    let mut state = common::empty_state(model, 1);
    let mut ctx = HookCtx::none();
    let mut logits = model.forward(&[p], &mut ctx, LogitsFor::Last, Some(&mut state))?;
    let mut out = Vec::with_capacity(max_new);
    let eos = &model.info().eos_token_ids;
    for i in 0..max_new {
        let next = common::argmax_last(&logits)?[0];
        out.push(next);
        if i + 1 >= min_new && eos.contains(&next) {
            break;
        }
        if i + 1 == max_new {
            break;
        }
        logits = model.extend(&mut state, &[vec![next]], None, &mut ctx, LogitsFor::Last)?;
    }
    Ok(out)
}
