//! A dynamic-resolution ViT over packed patches (Qwen2/2.5/3-VL style): each image arrives as
//! `[n, C*T*P*P]` flattened patches grouped by spatial merge windows, is embedded by a linear
//! patch projection (the Conv3d with kernel = stride = patch), gets learned position embeddings
//! bilinearly interpolated to its grid and a 2-D rotary in every attention, runs through
//! pre-norm blocks, and is merged `merge x merge` into language-model tokens by a patch merger.
//! Optional deepstack mergers turn intermediate block outputs into extra features for the
//! language model.
//!
//! Images are run one at a time (attention never crosses images); hooks see `[1, n, d]` per
//! image and their captures are stacked over the images of the forward.

use std::collections::BTreeMap;

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::error::{Error, Result};
use crate::hooks::{HookCtx, HookPoint, Tower};

use super::block::Block;
use super::mlp::Mlp;
use super::mrope::vision_rope_2d;
use super::norm::Norm;

/// Merges each group of `group` consecutive patches (one merge window) into one token:
/// norm, concatenation, MLP. `post_shuffle` puts the norm after the concatenation (Qwen3-VL's
/// deepstack mergers) instead of before it.
#[derive(Debug, Clone)]
pub struct PatchMerger {
    pub norm: Norm,
    pub post_shuffle: bool,
    pub mlp: Mlp,
    pub group: usize,
}

impl PatchMerger {
    /// `[n, d]` patches to `[n / group, d_out]` tokens.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        if n % self.group != 0 {
            return Err(Error::msg(format!(
                "patch merger: {n} patches do not split into windows of {}",
                self.group
            )));
        }
        let y = if self.post_shuffle {
            self.norm
                .forward(&x.reshape((n / self.group, d * self.group))?)?
        } else {
            self.norm
                .forward(x)?
                .reshape((n / self.group, d * self.group))?
        };
        self.mlp.forward(&y)
    }
}

/// The packed-patch vision tower.
#[derive(Debug, Clone)]
pub struct PackedVit {
    /// Patch projection `[d, C*T*P*P]` with bias.
    pub patch: Linear,
    /// Learned position table `[side * side, d]`.
    pub pos_embed: Tensor,
    /// Side of the square position grid.
    pub pos_side: usize,
    pub blocks: Vec<Block>,
    /// Spatial merge size (2 for 2x2 windows).
    pub merge: usize,
    pub head_dim: usize,
    /// Base of the 2-D rotary.
    pub rope_theta: f64,
    /// The final merger (its output replaces the image placeholders).
    pub merger: PatchMerger,
    /// `(vision block index, merger)`: deepstack feature `k` is `deepstack[k].1` applied to the
    /// output of block `deepstack[k].0`.
    pub deepstack: Vec<(usize, PatchMerger)>,
}

/// What the tower gives for the images of one forward.
#[derive(Debug, Clone)]
pub struct PackedVitOut {
    /// Merged tokens `[m, d_out]` of all images, in order.
    pub merged: Tensor,
    /// Per deepstack level, `[m, d_out]`.
    pub deepstack: Vec<Tensor>,
}

/// `(row, col)` of every patch of a `t x h x w` grid in the packed order: frames, then merge
/// windows row-major, then the patches of a window row-major.
pub fn window_coords(t: usize, h: usize, w: usize, merge: usize) -> Vec<(u32, u32)> {
    let mut v = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for bh in 0..h / merge {
            for bw in 0..w / merge {
                for ih in 0..merge {
                    for iw in 0..merge {
                        v.push(((bh * merge + ih) as u32, (bw * merge + iw) as u32));
                    }
                }
            }
        }
    }
    v
}

/// `torch.linspace(0, end, steps)` in float32, with torch's symmetric evaluation.
fn linspace_f32(end: f32, steps: usize) -> Vec<f32> {
    if steps <= 1 {
        return vec![0.0; steps];
    }
    let step = end / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

impl PackedVit {
    /// Position embeddings `[n, d]` for the patches at `coords` of an `h x w` grid: the square
    /// table bilinearly interpolated (align-corners) to the grid, as transformers'
    /// `fast_pos_embed_interpolate`.
    pub fn interpolated_pos(&self, h: usize, w: usize, coords: &[(u32, u32)]) -> Result<Tensor> {
        let side = self.pos_side;
        let last = (side - 1) as f32;
        let hs = linspace_f32(last, h);
        let ws = linspace_f32(last, w);
        let n = coords.len();
        let mut idx: [Vec<u32>; 4] = Default::default();
        let mut wt: [Vec<f32>; 4] = Default::default();
        for &(r, c) in coords {
            let (y, x) = (hs[r as usize], ws[c as usize]);
            let (y0, x0) = (y as usize, x as usize);
            let (y1, x1) = ((y0 + 1).min(side - 1), (x0 + 1).min(side - 1));
            let (dy, dx) = (y - y0 as f32, x - x0 as f32);
            let corners = [
                (y0, x0, (1.0 - dy) * (1.0 - dx)),
                (y0, x1, (1.0 - dy) * dx),
                (y1, x0, dy * (1.0 - dx)),
                (y1, x1, dy * dx),
            ];
            for (k, (yy, xx, ww)) in corners.into_iter().enumerate() {
                idx[k].push((yy * side + xx) as u32);
                wt[k].push(ww);
            }
        }
        let dev = self.pos_embed.device();
        let dt = self.pos_embed.dtype();
        let mut acc: Option<Tensor> = None;
        for k in 0..4 {
            let i = Tensor::from_vec(std::mem::take(&mut idx[k]), n, dev)?;
            let w = Tensor::from_vec(std::mem::take(&mut wt[k]), (n, 1), dev)?.to_dtype(dt)?;
            let term = self.pos_embed.index_select(&i, 0)?.broadcast_mul(&w)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        acc.ok_or_else(|| Error::msg("empty position table"))
    }

    /// One image: flattened patches `[t*h*w, C*T*P*P]` of grid `(t, h, w)` (patches, before the
    /// merge). Returns merged tokens `[m, d_out]` and the deepstack features, with the vision
    /// block, deepstack and projector hooks.
    pub fn forward_image(
        &self,
        patches: &Tensor,
        grid: (usize, usize, usize),
        ctx: &mut HookCtx,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (t, h, w) = grid;
        let n = t * h * w;
        let k = self.patch.weight().dim(1)?;
        if patches.dims() != [n, k] {
            return Err(Error::input(format!(
                "pixel values of shape {:?} for an image of grid {t}x{h}x{w}; expected [{n}, {k}]",
                patches.dims()
            )));
        }
        if h % self.merge != 0 || w % self.merge != 0 {
            return Err(Error::input(format!(
                "image grid {h}x{w} is not a multiple of the {m}x{m} merge window",
                m = self.merge
            )));
        }
        let dt = self.pos_embed.dtype();
        let x = self.patch.forward(&patches.to_dtype(dt)?)?;
        let coords = window_coords(t, h, w, self.merge);
        let x = (x + self.interpolated_pos(h, w, &coords)?)?;
        let rope = vision_rope_2d(&coords, self.head_dim, self.rope_theta, x.device())?;
        let mut x = x.unsqueeze(0)?;
        let mut deep = Vec::with_capacity(self.deepstack.len());
        for (j, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(x, Some(&rope), None, None, ctx, Tower::Vision, j)?;
            for (kk, (at, m)) in self.deepstack.iter().enumerate() {
                if *at == j {
                    let f = m.forward(&x.squeeze(0)?)?.unsqueeze(0)?;
                    deep.push((kk, ctx.hook(HookPoint::Deepstack(kk), f)?.squeeze(0)?));
                }
            }
        }
        deep.sort_by_key(|(kk, _)| *kk);
        let merged = self.merger.forward(&x.squeeze(0)?)?.unsqueeze(0)?;
        let merged = ctx.hook(HookPoint::Projector, merged)?.squeeze(0)?;
        Ok((merged, deep.into_iter().map(|(_, f)| f).collect()))
    }

    /// All images of a forward: `pixels` `[sum n_i, C*T*P*P]` holds the patches of each image in
    /// order, `grids` their `(t, h, w)`. Captures of vision hooks are stacked over the images
    /// (`[n_images, ...]`); images with different patch counts cannot be stacked, which is an
    /// error unless the capture reduces positions (`:mean`).
    pub fn forward_images(
        &self,
        pixels: &Tensor,
        grids: &[(usize, usize, usize)],
        ctx: &mut HookCtx,
    ) -> Result<PackedVitOut> {
        let total: usize = grids.iter().map(|(t, h, w)| t * h * w).sum();
        let rows = pixels.dim(0)?;
        if rows != total {
            return Err(Error::input(format!(
                "pixel values hold {rows} patches but the image grids {grids:?} need {total}"
            )));
        }
        let before = std::mem::take(&mut ctx.captures.tensors);
        let mut acc: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
        let mut merged = Vec::with_capacity(grids.len());
        let mut deep: Vec<Vec<Tensor>> = vec![Vec::new(); self.deepstack.len()];
        let mut off = 0usize;
        let mut result = Ok(());
        for &g in grids {
            let n = g.0 * g.1 * g.2;
            let r = self.forward_image(&pixels.narrow(0, off, n)?, g, ctx);
            for (key, t) in std::mem::take(&mut ctx.captures.tensors) {
                acc.entry(key).or_default().push(t);
            }
            match r {
                Ok((m, d)) => {
                    merged.push(m);
                    for (slot, f) in deep.iter_mut().zip(d) {
                        slot.push(f);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            off += n;
        }
        ctx.captures.tensors = before;
        result?;
        for (key, parts) in acc {
            let first = parts[0].dims()[1..].to_vec();
            if let Some(p) = parts.iter().find(|p| p.dims()[1..] != first[..]) {
                return Err(Error::input(format!(
                    "hook '{key}': the images of this forward have different patch counts ({:?} vs {:?}), so their captures cannot be stacked; capture it with ':mean' or one image per forward",
                    &first,
                    &p.dims()[1..]
                )));
            }
            let t = if parts.len() == 1 {
                parts
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::msg("empty capture"))?
            } else {
                Tensor::cat(&parts, 0)?
            };
            ctx.captures.tensors.insert(key, t);
        }
        let cat = |v: &[Tensor]| -> Result<Tensor> { Ok(Tensor::cat(v, 0)?) };
        Ok(PackedVitOut {
            merged: cat(&merged)?,
            deepstack: deep.iter().map(|d| cat(d)).collect::<Result<_>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coords_follow_merge_windows() {
        let c = window_coords(1, 2, 4, 2);
        assert_eq!(
            c,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }

    #[test]
    fn linspace_matches_torch_endpoints() {
        let l = linspace_f32(7.0, 6);
        assert_eq!(l[0], 0.0);
        assert_eq!(l[5], 7.0);
        assert!((l[2] - 2.8).abs() < 1e-6);
        assert_eq!(
            linspace_f32(7.0, 8),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
    }
}
