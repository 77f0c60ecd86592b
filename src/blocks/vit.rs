//! A generic ViT encoder (CLIP, SigLIP, BLIP): patch embedding, optional class token, learned
//! position embeddings, optional pre-norm, pre-norm blocks, optional post-norm.

use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;

use crate::error::Result;
use crate::hooks::{HookCtx, HookPoint, Tower};

use super::block::Block;
use super::norm::Norm;

/// A ViT vision tower.
#[derive(Debug, Clone)]
pub struct Vit {
    pub patch: candle_nn::Conv2d,
    pub patch_size: usize,
    /// Class token `[d]` prepended before the patches (CLIP, BLIP).
    pub class_embedding: Option<Tensor>,
    /// Position embeddings `[n (+1), d]`.
    pub position_embedding: Tensor,
    pub pre_norm: Option<Norm>,
    pub blocks: Vec<Block>,
    pub post_norm: Option<Norm>,
    /// Apply the post norm to the class token only (CLIP's pooled output) instead of every token.
    pub post_norm_pooled: bool,
}

impl Vit {
    /// Build the patch embedding conv from a weight `[d, 3, p, p]` and optional bias.
    pub fn patch_conv(w: Tensor, b: Option<Tensor>, patch: usize) -> candle_nn::Conv2d {
        candle_nn::Conv2d::new(
            w,
            b,
            Conv2dConfig {
                stride: patch,
                ..Default::default()
            },
        )
    }

    /// Embeddings `[b, n, d]` (class token first when present), before any pre-norm.
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self
            .patch
            .forward(&pixels.to_dtype(self.position_embedding.dtype())?)?; // [b, d, gh, gw]
        let (b, d, _, _) = x.dims4()?;
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [b, n, d]
        let x = match &self.class_embedding {
            Some(c) => {
                let c = c.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
                Tensor::cat(&[&c, &x], 1)?
            }
            None => x,
        };
        Ok(x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?)
    }

    /// Run the tower, stopping after block `until` (inclusive) when the caller needs no later
    /// block (and no hook asks for one). Returns the hidden state after each block run
    /// (`out[j]` = output of block j) and the embeddings after the pre-norm.
    pub fn forward(
        &self,
        pixels: &Tensor,
        until: Option<usize>,
        ctx: &mut HookCtx,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = self.embed(pixels)?;
        if let Some(n) = &self.pre_norm {
            x = n.forward(&x)?;
        }
        let first = x.clone();
        let last_hooked = self.last_hooked_block(ctx);
        let stop = match until {
            Some(u) => u.max(last_hooked.unwrap_or(0)).min(self.blocks.len() - 1),
            None => self.blocks.len() - 1,
        };
        let mut outs = Vec::with_capacity(stop + 1);
        for (j, blk) in self.blocks.iter().enumerate().take(stop + 1) {
            x = blk.forward(x, None, None, None, ctx, Tower::Vision, j)?;
            outs.push(x.clone());
        }
        if stop + 1 == self.blocks.len() || ctx.wants(&HookPoint::VisionLnPost) {
            if let Some(n) = &self.post_norm {
                let last = outs.last().cloned().unwrap_or(first.clone());
                let y = if self.post_norm_pooled {
                    n.forward(&last.narrow(1, 0, 1)?.squeeze(1)?)?
                } else {
                    n.forward(&last)?
                };
                if stop + 1 == self.blocks.len() {
                    ctx.hook(HookPoint::VisionLnPost, y)?;
                }
            }
        }
        Ok((first, outs))
    }

    fn last_hooked_block(&self, ctx: &HookCtx) -> Option<usize> {
        if ctx.is_empty() {
            return None;
        }
        if ctx.wants(&HookPoint::VisionLnPost) {
            return Some(self.blocks.len() - 1);
        }
        (0..self.blocks.len()).rev().find(|&j| {
            crate::hooks::Site::all()
                .iter()
                .any(|s| ctx.wants(&HookPoint::vision(j, *s)))
        })
    }
}

impl Vit {
    /// Load one CLIP/SigLIP-style encoder layer: `layer_norm1`, `self_attn.{q,k,v,out}_proj`
    /// (with biases), `layer_norm2`, `mlp.fc1` / `mlp.fc2`, full multi-head attention scaled by
    /// `head_dim^-0.5`.
    pub fn encoder_layer(
        vb: candle_nn::VarBuilder,
        d: usize,
        n_heads: usize,
        inter: usize,
        eps: f64,
        act: super::Activation,
    ) -> Result<Block> {
        use super::attention::{Attention, QkvProj};
        use super::mlp::{linear, Mlp};
        let dh = d / n_heads.max(1);
        let a = vb.pp("self_attn");
        Ok(Block {
            norm1: Norm::layer(vb.pp("layer_norm1"), d, eps)?,
            attn: Attention {
                qkv: QkvProj::Separate {
                    q: linear(a.pp("q_proj"), d, d, true)?,
                    k: linear(a.pp("k_proj"), d, d, true)?,
                    v: linear(a.pp("v_proj"), d, d, true)?,
                },
                o: linear(a.pp("out_proj"), d, d, true)?,
                n_heads,
                n_kv_heads: n_heads,
                head_dim: dh,
                scale: 1.0 / (dh as f64).sqrt(),
                q_norm: None,
                k_norm: None,
            },
            norm2: Norm::layer(vb.pp("layer_norm2"), d, eps)?,
            mlp: Mlp::plain(vb.pp("mlp"), ("fc1", "fc2"), d, inter, d, act, true)?,
        })
    }

    /// Run every block and return the tower's final output `[b, n, d]`: the post norm over all
    /// tokens when there is one (SigLIP's `last_hidden_state`, hooked as
    /// `vision.ln_post.hook_normalized`, so edits there reach the caller), else the last
    /// block's output.
    pub fn forward_final(&self, pixels: &Tensor, ctx: &mut HookCtx) -> Result<Tensor> {
        let mut x = self.embed(pixels)?;
        if let Some(n) = &self.pre_norm {
            x = n.forward(&x)?;
        }
        for (j, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(x, None, None, None, ctx, Tower::Vision, j)?;
        }
        match &self.post_norm {
            Some(n) => ctx.hook(HookPoint::VisionLnPost, n.forward(&x)?),
            None => Ok(x),
        }
    }
}
