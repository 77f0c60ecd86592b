//! Additive attention masks (0 where attention is allowed, -inf where it is not).

use candle_core::{Device, Tensor};

use crate::error::Result;

/// A causal mask for a left-padded batch: `[b, 1, s, past + s]`. Query `i` of row `bi` may see
/// key `j` when `j <= past + i` and key `j` is not padding. A padding query row sees only itself,
/// so no row is fully masked (its output is never read).
pub fn causal(valid: &[Vec<u8>], past: usize, device: &Device) -> Result<Tensor> {
    let b = valid.len();
    let total = valid.first().map(|v| v.len()).unwrap_or(0);
    let s = total - past;
    let mut m = vec![0f32; b * s * total];
    for (bi, row) in valid.iter().enumerate() {
        for i in 0..s {
            let qi = past + i;
            for j in 0..total {
                let allowed = if row[qi] == 0 {
                    j == qi
                } else {
                    j <= qi && row[j] == 1
                };
                if !allowed {
                    m[(bi * s + i) * total + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, s, total), device)?)
}

/// A prefix-LM mask (PaliGemma): positions `< prefix_len[b]` (after the row's padding) attend to
/// each other bidirectionally, the rest causally.
pub fn prefix(
    valid: &[Vec<u8>],
    prefix_end: &[usize],
    past: usize,
    device: &Device,
) -> Result<Tensor> {
    let b = valid.len();
    let total = valid.first().map(|v| v.len()).unwrap_or(0);
    let s = total - past;
    let mut m = vec![0f32; b * s * total];
    for (bi, row) in valid.iter().enumerate() {
        let pe = prefix_end.get(bi).copied().unwrap_or(0);
        for i in 0..s {
            let qi = past + i;
            for j in 0..total {
                let allowed = if row[qi] == 0 {
                    j == qi
                } else {
                    row[j] == 1 && (j <= qi || (j < pe && qi < pe))
                };
                if !allowed {
                    m[(bi * s + i) * total + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, s, total), device)?)
}
