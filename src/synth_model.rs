//! Seeded random-weight checkpoints in the llava-hf layout, with sycoscope's own small
//! tokenizer and chat template: demos, tests and benchmarks at 7B-like shapes without a download.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{write_atomic, Error, Result};

/// Shapes of a synthetic LLaVA checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthLlavaConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vision_layers: usize,
    pub vision_hidden: usize,
    pub vision_heads: usize,
    pub vision_intermediate: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub seed: u64,
    /// Standard deviation of the random weights.
    pub init_std: f64,
}

impl Default for SynthLlavaConfig {
    fn default() -> Self {
        SynthLlavaConfig {
            layers: 4,
            hidden: 128,
            heads: 4,
            kv_heads: 4,
            intermediate: 256,
            vision_layers: 3,
            vision_hidden: 64,
            vision_heads: 4,
            vision_intermediate: 128,
            image_size: 84,
            patch_size: 14,
            seed: 0,
            init_std: 0.02,
        }
    }
}

/// The chat template sycoscope's own checkpoints use (LLaVA-1.5's conversation format:
/// `USER: <image>\n... ASSISTANT: ...`).
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}{% else %}{{ message['role'].upper() + ': ' }}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}{% else %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// Special tokens of sycoscope's tokenizer, in id order from 0.
pub const SPECIALS: [&str; 5] = ["<unk>", "<s>", "</s>", "<image>", "<pad>"];

/// Build sycoscope's own small tokenizer (`tokenizer.json` content): Llama-style BPE with
/// Metaspace pre-tokenization and byte fallback, every printable ASCII character with and
/// without the word-start marker as single tokens, and `extra_words` (whole words, e.g. the
/// benchmark's vocabulary) as merged tokens. Option letters ("A", "▁A") are single tokens.
pub fn tokenizer_json(extra_words: &[&str]) -> serde_json::Value {
    let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let add = |t: String, vocab: &mut BTreeMap<String, u32>, order: &mut Vec<String>| {
        if !vocab.contains_key(&t) {
            vocab.insert(t.clone(), order.len() as u32);
            order.push(t);
        }
    };
    for s in SPECIALS {
        add(s.to_string(), &mut vocab, &mut order);
    }
    for b in 0..=255u8 {
        add(format!("<0x{b:02X}>"), &mut vocab, &mut order);
    }
    add("▁".to_string(), &mut vocab, &mut order);
    let printable: Vec<char> = (0x21u8..0x7f).map(|b| b as char).collect();
    for &c in &printable {
        add(c.to_string(), &mut vocab, &mut order);
    }
    let mut merges: Vec<(String, String)> = Vec::new();
    for &c in &printable {
        add(format!("▁{c}"), &mut vocab, &mut order);
        merges.push(("▁".into(), c.to_string()));
    }
    // whole words: merge left to right ("▁w" + "o" -> "▁wo", ...)
    for w in extra_words {
        for start in ["▁", ""] {
            let chars: Vec<char> = w.chars().collect();
            if chars.is_empty() || !chars.iter().all(|c| printable.contains(c)) {
                continue;
            }
            let mut cur = format!("{start}{}", chars[0]);
            if start.is_empty() {
                // bare words are only useful after punctuation; keep the marked form
                continue;
            }
            for &c in &chars[1..] {
                let next = format!("{cur}{c}");
                if !vocab.contains_key(&next) {
                    merges.push((cur.clone(), c.to_string()));
                    add(next.clone(), &mut vocab, &mut order);
                }
                cur = next;
            }
        }
    }
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<serde_json::Value> = merges
        .into_iter()
        .map(|(a, b)| serde_json::json!([a, b]))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

/// Write the non-weight files of a llava-hf checkpoint: config, tokenizer, template,
/// preprocessor and processor configs. Returns the vocabulary size.
pub fn write_llava_files(dir: &Path, c: &SynthLlavaConfig, extra_words: &[&str]) -> Result<usize> {
    let tok = tokenizer_json(extra_words);
    let vocab = tok["model"]["vocab"]
        .as_object()
        .map(|m| m.len())
        .unwrap_or(0);
    let image_id = 3u32;
    let pad_id = 4u32;
    let config = serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "dtype": "float32",
        "image_token_index": image_id,
        "image_seq_length": (c.image_size / c.patch_size).pow(2),
        "pad_token_id": pad_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "llama", "hidden_size": c.hidden, "intermediate_size": c.intermediate,
            "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
            "head_dim": c.hidden / c.heads, "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": vocab,
            "max_position_embeddings": 4096, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "attention_bias": false, "mlp_bias": false, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": c.vision_hidden, "intermediate_size": c.vision_intermediate,
            "num_hidden_layers": c.vision_layers, "num_attention_heads": c.vision_heads, "image_size": c.image_size,
            "patch_size": c.patch_size, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
            "projection_dim": c.vision_hidden
        },
        "sycoscope": {"synth": c}
    });
    let pre = serde_json::json!({
        "crop_size": {"height": c.image_size, "width": c.image_size},
        "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 1.0 / 255.0, "size": {"shortest_edge": c.image_size}
    });
    let tok_cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "padding_side": "left", "processor_class": "LlavaProcessor", "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": true, "add_eos_token": false, "model_max_length": 4096, "clean_up_tokenization_spaces": false
    });
    let proc_cfg = serde_json::json!({
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": c.patch_size,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"
    });
    let gen = serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id});
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    write_atomic(dir.join("config.json"), &pretty(&config))?;
    write_atomic(dir.join("tokenizer.json"), &pretty(&tok))?;
    write_atomic(dir.join("tokenizer_config.json"), &pretty(&tok_cfg))?;
    write_atomic(dir.join("preprocessor_config.json"), &pretty(&pre))?;
    write_atomic(dir.join("processor_config.json"), &pretty(&proc_cfg))?;
    write_atomic(dir.join("generation_config.json"), &pretty(&gen))?;
    write_atomic(dir.join("chat_template.jinja"), CHAT_TEMPLATE.as_bytes())?;
    Ok(vocab)
}

/// The weight names and shapes of a llava-hf checkpoint with these shapes (llava-hf layout).
pub fn llava_weight_shapes(c: &SynthLlavaConfig, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let (d, dv) = (c.hidden, c.vision_hidden);
    let dh = d / c.heads;
    let mut v: Vec<(String, Vec<usize>)> = vec![
        (
            "language_model.model.embed_tokens.weight".into(),
            vec![vocab, d],
        ),
        ("language_model.lm_head.weight".into(), vec![vocab, d]),
        ("language_model.model.norm.weight".into(), vec![d]),
        ("multi_modal_projector.linear_1.weight".into(), vec![d, dv]),
        ("multi_modal_projector.linear_1.bias".into(), vec![d]),
        ("multi_modal_projector.linear_2.weight".into(), vec![d, d]),
        ("multi_modal_projector.linear_2.bias".into(), vec![d]),
    ];
    for i in 0..c.layers {
        let p = format!("language_model.model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        v.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![c.heads * dh, d],
        ));
        v.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![c.kv_heads * dh, d],
        ));
        v.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![c.kv_heads * dh, d],
        ));
        v.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, c.heads * dh],
        ));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![c.intermediate, d]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![c.intermediate, d]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![d, c.intermediate]));
    }
    let vp = "vision_tower.vision_model";
    let n_pos = (c.image_size / c.patch_size).pow(2) + 1;
    v.push((format!("{vp}.embeddings.class_embedding"), vec![dv]));
    v.push((
        format!("{vp}.embeddings.patch_embedding.weight"),
        vec![dv, 3, c.patch_size, c.patch_size],
    ));
    v.push((
        format!("{vp}.embeddings.position_embedding.weight"),
        vec![n_pos, dv],
    ));
    for n in ["pre_layrnorm", "post_layernorm"] {
        v.push((format!("{vp}.{n}.weight"), vec![dv]));
        v.push((format!("{vp}.{n}.bias"), vec![dv]));
    }
    for j in 0..c.vision_layers {
        let p = format!("{vp}.encoder.layers.{j}");
        for n in ["layer_norm1", "layer_norm2"] {
            v.push((format!("{p}.{n}.weight"), vec![dv]));
            v.push((format!("{p}.{n}.bias"), vec![dv]));
        }
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push((format!("{p}.self_attn.{n}.weight"), vec![dv, dv]));
            v.push((format!("{p}.self_attn.{n}.bias"), vec![dv]));
        }
        v.push((
            format!("{p}.mlp.fc1.weight"),
            vec![c.vision_intermediate, dv],
        ));
        v.push((format!("{p}.mlp.fc1.bias"), vec![c.vision_intermediate]));
        v.push((
            format!("{p}.mlp.fc2.weight"),
            vec![dv, c.vision_intermediate],
        ));
        v.push((format!("{p}.mlp.fc2.bias"), vec![dv]));
    }
    v
}

/// Initial value of a weight: norms 1, biases 0, everything else N(0, std).
pub fn init_value(name: &str, shape: &[usize], std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let is_norm = name.contains("norm") || name.contains("layrnorm");
    if name.ends_with(".bias") {
        vec![0.0; n]
    } else if is_norm && name.ends_with(".weight") {
        vec![1.0; n]
    } else {
        // Box-Muller
        (0..n)
            .map(|_| {
                let u1: f64 = rng.gen::<f64>().max(1e-12);
                let u2: f64 = rng.gen::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
            })
            .collect()
    }
}

/// Write a complete seeded random-weight LLaVA checkpoint to `dir`.
pub fn write_llava(dir: &Path, c: &SynthLlavaConfig, dtype: DType) -> Result<()> {
    if !c.hidden.is_multiple_of(c.heads)
        || !c.vision_hidden.is_multiple_of(c.vision_heads)
        || !c.heads.is_multiple_of(c.kv_heads)
    {
        return Err(Error::input(format!(
            "synth-model: hidden {} must divide by heads {} (and heads by kv heads {}), vision hidden {} by vision heads {}",
            c.hidden, c.heads, c.kv_heads, c.vision_hidden, c.vision_heads
        )));
    }
    if !c.image_size.is_multiple_of(c.patch_size) {
        return Err(Error::input(format!(
            "synth-model: image size {} must be a multiple of the patch size {}",
            c.image_size, c.patch_size
        )));
    }
    let vocab = write_llava_files(dir, c, &[])?;
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, shape) in llava_weight_shapes(c, vocab) {
        let v = init_value(&name, &shape, c.init_std, &mut rng);
        let t = Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.push((name, t));
    }
    let path = dir.join("model.safetensors");
    let tmp = crate::error::tmp_path(&path);
    candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(())
}
