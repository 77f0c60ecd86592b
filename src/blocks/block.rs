//! The pre-norm residual block shared by decoders (Llama, Qwen3, Gemma, OPT) and vision
//! encoders (CLIP, SigLIP, Qwen3-VL's ViT), with its residual hook points.

use candle_core::Tensor;

use crate::error::Result;
use crate::hooks::{HookCtx, HookPoint, Site, Tower};

use super::attention::Attention;
use super::mlp::Mlp;
use super::norm::Norm;
use super::rotary::Rope;

/// `x + attn(norm1(x))`, then `+ mlp(norm2(.))`.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: Norm,
    pub attn: Attention,
    pub norm2: Norm,
    pub mlp: Mlp,
}

impl Block {
    /// One block, with hooks `resid_pre`, `attn_out`, `resid_mid`, `mlp_out`, `resid_post`
    /// (and the attention's own).
    pub fn forward(
        &self,
        x: Tensor,
        rope: Option<&Rope>,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &mut HookCtx,
        tower: Tower,
        layer: usize,
    ) -> Result<Tensor> {
        let hp = |site| HookPoint::block(tower, layer, site);
        let x = ctx.hook(hp(Site::ResidPre), x)?;
        let h = self.attn.forward(
            &self.norm1.forward(&x)?,
            rope,
            mask,
            cache,
            ctx,
            tower,
            layer,
        )?;
        let h = ctx.hook(hp(Site::AttnOut), h)?;
        let x = ctx.hook(hp(Site::ResidMid), (x + h)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        let m = ctx.hook(hp(Site::MlpOut), m)?;
        ctx.hook(hp(Site::ResidPost), (x + m)?)
    }
}
