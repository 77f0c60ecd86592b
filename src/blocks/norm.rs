//! Layer norm and RMS norm (including Gemma's `1 + w` variant), computed in float32.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;

/// A normalisation layer.
#[derive(Debug, Clone)]
pub enum Norm {
    /// `(x - mean) / sqrt(var + eps) * w + b`.
    Layer { w: Tensor, b: Tensor, eps: f64 },
    /// `x / sqrt(mean(x^2) + eps) * w` (Gemma's `1 + w` is folded into `w` at load).
    Rms { w: Tensor, eps: f64 },
}

impl Norm {
    /// Load a LayerNorm (`weight`, `bias`) of width `d`.
    pub fn layer(vb: VarBuilder, d: usize, eps: f64) -> Result<Self> {
        Ok(Norm::Layer {
            w: vb.get(d, "weight")?,
            b: vb.get(d, "bias")?,
            eps,
        })
    }
    /// Load an RMSNorm (`weight`) of width `d`; `plus_one` for Gemma's `(1 + w)` scaling.
    pub fn rms(vb: VarBuilder, d: usize, eps: f64, plus_one: bool) -> Result<Self> {
        let w = vb.get(d, "weight")?;
        let w = if plus_one { (w + 1.0)? } else { w };
        Ok(Norm::Rms { w, eps })
    }

    /// Apply the norm over the last axis. Uses the fused kernels for inference and a
    /// differentiable composition when gradients are tracked (training).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let y = match self {
            Norm::Layer { w, b, eps } => {
                if xf.track_op() || w.track_op() {
                    let mean = xf.mean_keepdim(D::Minus1)?;
                    let xc = xf.broadcast_sub(&mean)?;
                    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                    xc.broadcast_div(&(var + *eps)?.sqrt()?)?
                        .broadcast_mul(&w.to_dtype(DType::F32)?)?
                        .broadcast_add(&b.to_dtype(DType::F32)?)?
                } else {
                    candle_nn::ops::layer_norm(
                        &xf.contiguous()?,
                        &w.to_dtype(DType::F32)?,
                        &b.to_dtype(DType::F32)?,
                        *eps as f32,
                    )?
                }
            }
            Norm::Rms { w, eps } => {
                if xf.track_op() || w.track_op() {
                    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
                    xf.broadcast_div(&(ms + *eps)?.sqrt()?)?
                        .broadcast_mul(&w.to_dtype(DType::F32)?)?
                } else {
                    candle_nn::ops::rms_norm(
                        &xf.contiguous()?,
                        &w.to_dtype(DType::F32)?,
                        *eps as f32,
                    )?
                }
            }
        };
        Ok(y.to_dtype(dtype)?)
    }
}
