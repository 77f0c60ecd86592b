//! A decoder-only language model over shared blocks: blocks, final norm, unembedding, with the
//! `ln_final` and `logits` hooks. Families prepare the input embeddings, positions and masks.

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, Linear};

use crate::error::Result;
use crate::hooks::{HookCtx, HookPoint, Tower};

use super::attention::KvCache;
use super::block::Block;
use super::norm::Norm;
use super::rotary::Rope;

/// A decoder stack.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub embed: Embedding,
    /// Multiplier applied to the token embeddings (Gemma: `sqrt(d)`).
    pub embed_scale: Option<f64>,
    pub blocks: Vec<Block>,
    pub norm: Norm,
    pub lm_head: Linear,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position `[b, s, V]`.
    All,
    /// The last position only `[b, 1, V]` (what answer reading and decoding need).
    Last,
}

impl Decoder {
    /// Token embeddings `[b, s, d]` (scaled when the family scales them).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let e = self.embed.forward(ids)?;
        Ok(match self.embed_scale {
            Some(s) => (e * s)?,
            None => e,
        })
    }

    /// Run the blocks over `x` `[b, s, d]`, then the final norm and the unembedding.
    /// `after_layer(i, x)` may change the hidden state after block `i` (Qwen3-VL's deepstack).
    pub fn forward(
        &self,
        mut x: Tensor,
        rope: Option<&Rope>,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        ctx: &mut HookCtx,
        logits_for: LogitsFor,
        after_layer: &mut dyn FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        for (i, blk) in self.blocks.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = blk.forward(x, rope, mask, c, ctx, Tower::Lm, i)?;
            x = after_layer(i, x)?;
        }
        let logits_for = if ctx.wants(&HookPoint::LnFinal) || ctx.wants(&HookPoint::Logits) {
            LogitsFor::All
        } else {
            logits_for
        };
        let x = match logits_for {
            LogitsFor::All => x,
            LogitsFor::Last => {
                let s = x.dim(1)?;
                x.narrow(1, s - 1, 1)?
            }
        };
        let h = ctx.hook(HookPoint::LnFinal, self.norm.forward(&x)?)?;
        let logits = self.lm_head.forward(&h)?;
        ctx.hook(HookPoint::Logits, logits)
    }

    /// Logit lens: final norm + unembedding applied to any residual `[.., d]`.
    pub fn unembed(&self, resid: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.norm.forward(resid)?)?)
    }
}
