//! Helpers shared by the families: batching with left padding, merging image features into the
//! token embeddings, decoding state bookkeeping.

use candle_core::{DType, Device, Tensor, D};

use crate::blocks::KvCache;
use crate::error::{Error, Result};
use crate::prepare::Prepared;
use crate::spans::Spans;

use super::{DecodeState, Vlm};

/// A left-padded batch of token ids.
pub struct Padded {
    /// `[b, s]` u32 ids (padding uses `pad_id`).
    pub ids: Tensor,
    /// Per row, 1 for real tokens.
    pub valid: Vec<Vec<u8>>,
    /// Per row, the number of padding positions in front.
    pub pads: Vec<usize>,
    /// Per row, the span table shifted by its padding.
    pub spans: Vec<Spans>,
}

/// Left-pad the id sequences of `inputs` to a common length.
pub fn pad_left(rows: &[&[u32]], spans: &[&Spans], pad_id: u32, device: &Device) -> Result<Padded> {
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * s);
    let mut valid = Vec::with_capacity(rows.len());
    let mut pads = Vec::with_capacity(rows.len());
    let mut sp = Vec::with_capacity(rows.len());
    for (r, spn) in rows.iter().zip(spans) {
        let pad = s - r.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(r);
        let mut v = vec![0u8; pad];
        v.extend(std::iter::repeat_n(1u8, r.len()));
        valid.push(v);
        pads.push(pad);
        sp.push(spn.shifted(pad));
    }
    Ok(Padded {
        ids: Tensor::from_vec(ids, (rows.len(), s), device)?,
        valid,
        pads,
        spans: sp,
    })
}

/// Pad the prepared inputs.
pub fn pad_inputs(inputs: &[&Prepared], pad_id: u32, device: &Device) -> Result<Padded> {
    if inputs.is_empty() {
        return Err(Error::input("empty batch"));
    }
    let rows: Vec<&[u32]> = inputs.iter().map(|p| p.ids.as_slice()).collect();
    let spans: Vec<&Spans> = inputs.iter().map(|p| &p.spans).collect();
    pad_left(&rows, &spans, pad_id, device)
}

/// Replace the embeddings at positions holding `image_token_id` by the rows of `features`
/// (`[n, d]`, in order of appearance across the batch). Differentiable (index_select).
pub fn merge_features(
    embeds: &Tensor,
    ids: &Tensor,
    image_token_id: u32,
    features: &Tensor,
) -> Result<Tensor> {
    let (b, s, d) = embeds.dims3()?;
    let flat_ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let n_feat = features.dim(0)?;
    let mut idx = Vec::with_capacity(b * s);
    let mut k = 0u32;
    for (p, &t) in flat_ids.iter().enumerate() {
        if t == image_token_id {
            idx.push((b * s) as u32 + k);
            k += 1;
        } else {
            idx.push(p as u32);
        }
    }
    if k as usize != n_feat {
        return Err(Error::input(format!(
            "{k} image-token positions in the batch but {n_feat} image feature rows; the prompt's image placeholders do not match the images"
        )));
    }
    if n_feat == 0 {
        return Ok(embeds.clone());
    }
    let all = Tensor::cat(
        &[
            &embeds.reshape((b * s, d))?,
            &features.to_dtype(embeds.dtype())?,
        ],
        0,
    )?;
    let idx = Tensor::from_vec(idx, b * s, embeds.device())?;
    Ok(all.index_select(&idx, 0)?.reshape((b, s, d))?)
}

/// Positions `[b, s]` from the valid mask (cumulative count of real tokens, minus one).
pub fn positions(valid: &[Vec<u8>], device: &Device) -> Result<(Tensor, Vec<u32>)> {
    let mut v = Vec::new();
    let mut next = Vec::with_capacity(valid.len());
    for row in valid {
        let mut c = 0u32;
        for &m in row {
            if m == 1 {
                v.push(c);
                c += 1;
            } else {
                v.push(0);
            }
        }
        next.push(c);
    }
    let s = valid.first().map(|r| r.len()).unwrap_or(0);
    Ok((Tensor::from_vec(v, (valid.len(), s), device)?, next))
}

/// A fresh decoding state for `b` rows.
pub fn empty_state(model: &dyn Vlm, b: usize) -> DecodeState {
    DecodeState {
        cache: KvCache::new(model.info().n_layers),
        valid: vec![Vec::new(); b],
        next_pos: vec![0; b],
        spans: vec![Spans::default(); b],
        prefix_end: Vec::new(),
    }
}

/// New ids `[b, n]`, their valid bits, positions `[b, n]`, next positions.
pub type ExtendRows = (Tensor, Vec<Vec<u8>>, Tensor, Vec<u32>);

/// Left-pad new tokens for [`Vlm::extend`]: returns ids `[b, n]`, the new valid bits, positions
/// `[b, n]` continuing each row's count, and the updated next positions.
pub fn extend_rows(
    state: &DecodeState,
    new_ids: &[Vec<u32>],
    pad_id: u32,
    device: &Device,
) -> Result<ExtendRows> {
    if new_ids.len() != state.batch() {
        return Err(Error::input(format!(
            "extend: {} rows of new tokens for a state of {} rows",
            new_ids.len(),
            state.batch()
        )));
    }
    let n = new_ids.iter().map(|r| r.len()).max().unwrap_or(0);
    if n == 0 {
        return Err(Error::input("extend: no new tokens"));
    }
    let mut ids = Vec::with_capacity(new_ids.len() * n);
    let mut valid = Vec::with_capacity(new_ids.len());
    let mut pos = Vec::with_capacity(new_ids.len() * n);
    let mut next = Vec::with_capacity(new_ids.len());
    for (r, &p0) in new_ids.iter().zip(&state.next_pos) {
        let pad = n - r.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(r);
        let mut v = vec![0u8; pad];
        v.extend(std::iter::repeat_n(1u8, r.len()));
        valid.push(v);
        pos.extend(std::iter::repeat_n(0u32, pad));
        pos.extend((0..r.len() as u32).map(|i| p0 + i));
        next.push(p0 + r.len() as u32);
    }
    let b = new_ids.len();
    Ok((
        Tensor::from_vec(ids, (b, n), device)?,
        valid,
        Tensor::from_vec(pos, (b, n), device)?,
        next,
    ))
}

/// Map an unpadded span table onto a row layout given by its valid bits: the k-th real token
/// sits at the k-th position whose bit is 1.
pub fn layout_spans(spans: &Spans, valid: &[u8]) -> Spans {
    let real: Vec<usize> = valid
        .iter()
        .enumerate()
        .filter(|(_, &v)| v == 1)
        .map(|(i, _)| i)
        .collect();
    let map = |p: usize| -> usize {
        if p < real.len() {
            real[p]
        } else {
            valid.len()
        }
    };
    let map_end = |e: usize| -> usize {
        if e == 0 {
            0
        } else {
            map(e - 1) + 1
        }
    };
    let mut out = spans.clone();
    for m in out.messages.iter_mut() {
        if m.end > m.start {
            m.start = map(m.start);
            m.end = map_end(m.end);
        }
    }
    for s in out.images.iter_mut() {
        s.start = map(s.start);
        s.end = map_end(s.end);
    }
    out.pad = real.first().copied().unwrap_or(0);
    out.len = valid.len();
    out
}

/// Greedy choice at the last position of logits `[b, s, V]`.
pub fn argmax_last(logits: &Tensor) -> Result<Vec<u32>> {
    let s = logits.dim(1)?;
    Ok(logits
        .narrow(1, s - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?)
}

/// One [`Vlm::extend`] step of a causal family, prepared: the new ids `[b, n]`, their
/// positions `[b, n]` (continuing each row's count), the validity of every position so far and
/// the number of cached positions. [`begin_extend`] makes it and [`ExtendStep::finish`] commits
/// it to the state once the decoder has run.
pub struct ExtendStep {
    /// The new ids `[b, n]`, left-padded.
    pub ids: Tensor,
    /// Their positions `[b, n]` (u32; padding at 0).
    pub positions: Tensor,
    /// Per row, 1 for a real token, over the cached and the new positions.
    pub valid_all: Vec<Vec<u8>>,
    /// Number of cached positions before this step.
    pub past: usize,
    next: Vec<u32>,
}

/// Start an extend step: left-pad `new_ids`, update the state's span tables (from `new_spans`,
/// in unpadded coordinates of the whole new sequence, or by lengthening the old ones) and point
/// the hook context at them, with its offset at the first new position.
pub fn begin_extend(
    state: &mut DecodeState,
    new_ids: &[Vec<u32>],
    new_spans: Option<&[Spans]>,
    pad_id: u32,
    device: &Device,
    ctx: &mut crate::hooks::HookCtx,
) -> Result<ExtendStep> {
    let (ids, valid_new, positions, next) = extend_rows(state, new_ids, pad_id, device)?;
    let past = state.valid.first().map(|v| v.len()).unwrap_or(0);
    let mut valid_all = state.valid.clone();
    for (a, n) in valid_all.iter_mut().zip(&valid_new) {
        a.extend_from_slice(n);
    }
    if let Some(sp) = new_spans {
        state.spans = sp
            .iter()
            .zip(&valid_all)
            .map(|(s, v)| layout_spans(s, v))
            .collect();
    } else {
        for (s, v) in state.spans.iter_mut().zip(&valid_all) {
            s.len = v.len();
        }
    }
    ctx.set_spans(state.spans.clone());
    ctx.offset = past;
    Ok(ExtendStep {
        ids,
        positions,
        valid_all,
        past,
        next,
    })
}

impl ExtendStep {
    /// Record the step in the state (after the decoder has filled the cache).
    pub fn finish(self, state: &mut DecodeState) {
        state.valid = self.valid_all;
        state.next_pos = self.next;
    }
}

/// Token embeddings of a padded batch with each input's image features merged at the image-token
/// positions; `features` turns the stacked pixel values into `[n_image_tokens, d]` rows (running
/// the family's vision tower and projector under the hook context).
pub fn embed_with_images(
    lm: &crate::blocks::Decoder,
    inputs: &[&Prepared],
    padded: &Padded,
    image_token_id: u32,
    dtype: DType,
    ctx: &mut crate::hooks::HookCtx,
    features: impl FnOnce(&Tensor, &mut crate::hooks::HookCtx) -> Result<Tensor>,
) -> Result<Tensor> {
    let pix: Vec<&Tensor> = inputs
        .iter()
        .filter_map(|p| p.pixel_values.as_ref())
        .collect();
    let embeds = lm.embed_tokens(&padded.ids)?;
    if pix.is_empty() {
        return Ok(embeds);
    }
    let pixels = Tensor::cat(&pix, 0)?.to_dtype(dtype)?;
    let feats = features(&pixels, ctx)?;
    merge_features(&embeds, &padded.ids, image_token_id, &feats)
}

/// Run a prefill (`run` gets the cache to fill, if decoding follows) and record the batch in the
/// decoding state: validity, next positions, span tables and prefix ends.
pub fn prefill(
    state: Option<&mut DecodeState>,
    padded: Padded,
    next: Vec<u32>,
    prefix_end: Vec<usize>,
    run: impl FnOnce(Option<&mut KvCache>) -> Result<Tensor>,
) -> Result<Tensor> {
    match state {
        Some(st) => {
            let out = run(Some(&mut st.cache))?;
            st.valid = padded.valid;
            st.next_pos = next;
            st.spans = padded.spans;
            st.prefix_end = prefix_end;
            Ok(out)
        }
        None => run(None),
    }
}
