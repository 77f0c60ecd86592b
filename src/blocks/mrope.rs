//! Multimodal rotary position embeddings (M-RoPE) of the Qwen-VL language models and the 2-D
//! rotary of their vision towers. Both build [`Rope`] tables that [`Rope::apply`] uses as is.
//!
//! In M-RoPE every token has three position ids (time, height, width). Text tokens carry the same
//! id on all three axes; the tokens of an image carry `(t, row, col)` of their merged patch,
//! offset by the text before them, and the text after an image continues from the largest id of
//! the image plus one ([`rope_index`]). Each rotary frequency reads one of the three axes
//! ([`MropeLayout`]).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

use super::rotary::{inv_freq, Rope};

/// How the rotary frequencies are shared among the time, height and width axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MropeLayout {
    /// Qwen3-VL: frequency `j` reads height when `j % 3 == 1 && j < 3 * section[1]`, width when
    /// `j % 3 == 2 && j < 3 * section[2]`, time otherwise.
    Interleaved,
    /// Qwen2-VL / Qwen2.5-VL: the first `section[0]` frequencies read time, the next
    /// `section[1]` height, the last `section[2]` width.
    Chunked,
}

/// M-RoPE tables for a head width, a base and a section split.
#[derive(Debug, Clone)]
pub struct Mrope {
    inv: Vec<f32>,
    /// Axis (0 = time, 1 = height, 2 = width) read by each frequency.
    axis: Vec<usize>,
}

impl Mrope {
    /// M-RoPE for heads of `head_dim` with base `theta`; `section` has three entries summing to
    /// `head_dim / 2`.
    pub fn new(
        head_dim: usize,
        theta: f64,
        section: &[usize],
        layout: MropeLayout,
    ) -> Result<Self> {
        let half = head_dim / 2;
        if section.len() != 3 || section.iter().sum::<usize>() != half {
            return Err(Error::msg(format!(
                "mrope_section {section:?} must have 3 entries summing to head_dim / 2 = {half}"
            )));
        }
        let axis = (0..half)
            .map(|j| match layout {
                MropeLayout::Interleaved => {
                    if j % 3 == 1 && j < 3 * section[1] {
                        1
                    } else if j % 3 == 2 && j < 3 * section[2] {
                        2
                    } else {
                        0
                    }
                }
                MropeLayout::Chunked => {
                    if j < section[0] {
                        0
                    } else if j < section[0] + section[1] {
                        1
                    } else {
                        2
                    }
                }
            })
            .collect();
        Ok(Mrope {
            inv: inv_freq(head_dim, theta),
            axis,
        })
    }

    /// cos/sin tables `[b, s, head_dim]` for 3-D positions `pos[b][s] = [t, h, w]` (all rows of
    /// equal length).
    pub fn tables(&self, pos: &[Vec<[u32; 3]>], device: &Device) -> Result<Rope> {
        let b = pos.len();
        let s = pos.first().map(|r| r.len()).unwrap_or(0);
        let half = self.inv.len();
        let dh = 2 * half;
        let mut cos = Vec::with_capacity(b * s * dh);
        let mut sin = Vec::with_capacity(b * s * dh);
        let mut freqs = vec![0f32; half];
        for row in pos {
            if row.len() != s {
                return Err(Error::msg("M-RoPE positions: rows of different lengths"));
            }
            for p in row {
                for (j, f) in freqs.iter_mut().enumerate() {
                    *f = p[self.axis[j]] as f32 * self.inv[j];
                }
                for _ in 0..2 {
                    cos.extend(freqs.iter().map(|f| f.cos()));
                    sin.extend(freqs.iter().map(|f| f.sin()));
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (b, s, dh), device)?,
            sin: Tensor::from_vec(sin, (b, s, dh), device)?,
        })
    }
}

/// 3-D position ids of one unpadded token sequence, as transformers' `get_rope_index` computes
/// them: each run of `image_token_id` is one image whose merged grid `(t, h, w)` comes from
/// `grids` in order (`t * h * w` tokens). Returns the positions and the next free position (the
/// largest id plus one), where generated text continues.
pub fn rope_index(
    ids: &[u32],
    image_token_id: u32,
    grids: &[(usize, usize, usize)],
) -> Result<(Vec<[u32; 3]>, u32)> {
    let mut out = Vec::with_capacity(ids.len());
    let mut next = 0u32;
    let mut i = 0usize;
    let mut k = 0usize;
    while i < ids.len() {
        if ids[i] != image_token_id {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let &(t, h, w) = grids.get(k).ok_or_else(|| {
            Error::input(format!(
                "the sequence has more image placeholders than the {} image grid(s) given",
                grids.len()
            ))
        })?;
        let n = t * h * w;
        if n == 0 || i + n > ids.len() || ids[i..i + n].iter().any(|&x| x != image_token_id) {
            return Err(Error::input(format!(
                "image {k}: expected {n} consecutive image tokens (grid {t}x{h}x{w}) at position {i}"
            )));
        }
        for ti in 0..t {
            for hi in 0..h {
                for wi in 0..w {
                    out.push([next + ti as u32, next + hi as u32, next + wi as u32]);
                }
            }
        }
        next += t.max(h).max(w) as u32;
        i += n;
        k += 1;
    }
    if k != grids.len() {
        return Err(Error::input(format!(
            "the sequence has {k} image(s) but {} image grid(s) were given",
            grids.len()
        )));
    }
    Ok((out, next))
}

/// 2-D rotary tables `[1, n, head_dim]` of a vision tower for patches at `(row, col)`: the first
/// quarter of the frequencies rotate by the row, the second by the column, and the second half of
/// the head repeats the first (rotate-half layout), as in Qwen2/2.5/3-VL.
pub fn vision_rope_2d(
    coords: &[(u32, u32)],
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<Rope> {
    let inv = inv_freq(head_dim / 2, theta);
    let q = inv.len();
    let dh = 4 * q;
    if dh != head_dim {
        return Err(Error::msg(format!(
            "2-D rotary needs a head width divisible by 4, got {head_dim}"
        )));
    }
    let mut cos = Vec::with_capacity(coords.len() * dh);
    let mut sin = Vec::with_capacity(coords.len() * dh);
    let mut f = vec![0f32; 2 * q];
    for &(r, c) in coords {
        for j in 0..q {
            f[j] = r as f32 * inv[j];
            f[q + j] = c as f32 * inv[j];
        }
        for _ in 0..2 {
            cos.extend(f.iter().map(|x| x.cos()));
            sin.extend(f.iter().map(|x| x.sin()));
        }
    }
    let n = coords.len();
    Ok(Rope {
        cos: Tensor::from_vec(cos, (1, n, dh), device)?,
        sin: Tensor::from_vec(sin, (1, n, dh), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_index_continues_after_image() {
        // text(2) image(1x2x3) text(2)
        let ids = [5, 6, 9, 9, 9, 9, 9, 9, 7, 8];
        let (p, next) = rope_index(&ids, 9, &[(1, 2, 3)]).unwrap();
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [1, 1, 1]);
        assert_eq!(p[2], [2, 2, 2]);
        assert_eq!(p[4], [2, 2, 4]);
        assert_eq!(p[5], [2, 3, 2]);
        assert_eq!(p[7], [2, 3, 4]);
        // largest id in the image is 4, text continues at 5
        assert_eq!(p[8], [5, 5, 5]);
        assert_eq!(p[9], [6, 6, 6]);
        assert_eq!(next, 7);
        assert!(rope_index(&ids, 9, &[]).is_err());
        assert!(rope_index(&ids, 9, &[(1, 2, 2)]).is_err());
    }

    #[test]
    fn interleaved_axes() {
        let m = Mrope::new(32, 10000.0, &[6, 5, 5], MropeLayout::Interleaved).unwrap();
        assert_eq!(m.axis[..6], [0, 1, 2, 0, 1, 2]);
        assert_eq!(m.axis[13..], [1, 2, 0]);
        assert_eq!(m.axis.iter().filter(|&&a| a == 0).count(), 6);
        let c = Mrope::new(32, 10000.0, &[6, 5, 5], MropeLayout::Chunked).unwrap();
        assert_eq!(c.axis[5..7], [0, 1]);
        assert!(Mrope::new(32, 10000.0, &[6, 5, 4], MropeLayout::Chunked).is_err());
    }

    #[test]
    fn equal_axes_give_standard_rope() {
        let m = Mrope::new(8, 10000.0, &[2, 1, 1], MropeLayout::Interleaved).unwrap();
        let t = m.tables(&[vec![[3, 3, 3]]], &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[3u32]], &Device::Cpu).unwrap();
        let s = Rope::standard(&pos, 8, 10000.0).unwrap();
        let d = (t.cos - s.cos)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
    }
}
