//! Rotary position embeddings: cos/sin tables per position, applied with the "rotate half"
//! layout of Hugging Face Llama. Families with other position schemes (Qwen3-VL's M-RoPE, the
//! 2-D vision rotary) build their own [`Rope`] tables and reuse [`Rope::apply`].

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// cos/sin tables `[b, s, dh]` for one forward.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Inverse frequencies `1 / theta^(2i/dim)` for `i < dim/2`.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32)
        .collect()
}

impl Rope {
    /// Standard 1-D rotary tables for integer positions `[b, s]` (u32 or i64).
    pub fn standard(positions: &Tensor, head_dim: usize, theta: f64) -> Result<Self> {
        let dev = positions.device();
        let inv = Tensor::new(inv_freq(head_dim, theta).as_slice(), dev)?;
        Self::from_inv_freq(positions, &inv)
    }

    /// Tables from positions `[b, s]` and inverse frequencies `[dh/2]`.
    pub fn from_inv_freq(positions: &Tensor, inv: &Tensor) -> Result<Self> {
        let p = positions.to_dtype(DType::F32)?;
        let freqs = p
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&inv.reshape((1, 1, ()))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Rope {
            cos: emb.cos()?,
            sin: emb.sin()?,
        })
    }

    /// Apply to `x` `[b, h, s, dh]`: `x * cos + rotate_half(x) * sin`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let cos = self.cos.unsqueeze(1)?.to_dtype(dt)?;
        let sin = self.sin.unsqueeze(1)?.to_dtype(dt)?;
        let dh = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
        let x2 = x.narrow(D::Minus1, dh / 2, dh - dh / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }
}

/// Positions `[b, s]` (u32) from a left-padded attention mask: the cumulative count of real
/// tokens minus one (pad positions get 0), starting after `past` cached positions.
pub fn positions_from_mask(mask: &[Vec<u8>], past: &[usize], device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let s = mask.first().map(|m| m.len()).unwrap_or(0);
    let mut v = Vec::with_capacity(b * s);
    for (bi, row) in mask.iter().enumerate() {
        let mut c = past.get(bi).copied().unwrap_or(0);
        for &m in row {
            if m == 1 {
                v.push(c as u32);
                c += 1;
            } else {
                v.push(0);
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, s), device)?)
}
