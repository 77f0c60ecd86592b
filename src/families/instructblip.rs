//! InstructBLIP (Salesforce/instructblip-vicuna-* layout): as BLIP-2 ([`super::blip2`]), but
//! the Q-Former also reads the prompt, tokenized with the checkpoint's own BERT WordPiece
//! tokenizer (`qformer_tokenizer/`), next to its learned queries; only the query outputs are
//! projected into the language model, which is Llama (Vicuna).
//!
//! The Q-Former's copy of the prompt travels in [`Prepared::extra`](crate::prepare::Prepared)
//! under [`QFORMER_IDS`](super::blip2::QFORMER_IDS) (`[1, t]`, with `[CLS]` and `[SEP]`);
//! batches right-pad it (the Q-Former's text positions start at 0 in every row) and mask the
//! padding out of its self-attention. `qformer.blocks.{k}.hook_resid_post` and
//! `.attn.hook_pattern` cover queries and text (`q + t` positions, queries first).

use std::path::Path;

use crate::error::{Error, Result};

use super::blip2::{llama_kind, load_bridge, weights_err, BlipConfig, QformerParts, QformerVlm};
use super::llava::{load_llama, LlamaConfig};
use super::LoadOptions;

/// Load an InstructBLIP checkpoint whose `config.json` is `cfg`.
pub fn load(dir: &Path, cfg: &serde_json::Value, opts: &LoadOptions) -> Result<QformerVlm> {
    let cfg_path = dir.join("config.json");
    let c: BlipConfig<LlamaConfig> = BlipConfig::parse(cfg, &cfg_path, "InstructBLIP")?;
    // the Q-Former's tokenizer is needed before any weight is read
    let qtok_path = dir.join("qformer_tokenizer").join("tokenizer.json");
    if !qtok_path.exists() {
        return Err(Error::config(
            &qtok_path,
            "missing: InstructBLIP's Q-Former reads the prompt with its own BERT tokenizer, saved in the checkpoint's qformer_tokenizer/ folder",
        ));
    }
    let qtok = crate::prepare::load_tokenizer(&qtok_path)?;
    let qformer_pad_id = qtok
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| qtok.token_to_id("[PAD]"))
        .unwrap_or(0);
    let tc = &c.text_config;
    let vb = crate::blocks::weights::var_builder(dir, opts.dtype, &opts.device)?;
    let (vision, post, qformer, projection) = load_bridge(
        &vb,
        &c.vision_config,
        &c.qformer_config,
        c.num_query_tokens,
        tc.hidden_size,
        true,
        dir,
    )?;
    let lm = load_llama(
        vb.pp("language_model.model"),
        Some(vb.pp("language_model.lm_head")),
        tc,
        dir,
    )
    .map_err(weights_err(dir))?;
    QformerVlm::assemble(
        dir,
        QformerParts {
            family: "instructblip",
            vision_config: c.vision_config.clone(),
            num_query_tokens: c.num_query_tokens,
            image_token_id: c.image_token_index.unwrap_or_default(),
            vision,
            vision_post_norm: post,
            qformer,
            projection,
            lm,
            lm_kind: llama_kind(tc, &cfg_path)?,
            n_layers: tc.num_hidden_layers,
            n_heads: tc.num_attention_heads,
            d_model: tc.hidden_size,
            vocab_size: tc.vocab_size,
            eos: tc.eos_token_id.clone(),
            pad_id: tc.pad_token_id,
            qformer_tokenizer: Some(qtok),
            qformer_pad_id,
        },
    )
}
