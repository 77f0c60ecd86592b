//! The logit lens restricted to the option letters: the final norm and the unembedding applied
//! to each layer's residual at the decision token, read only on the option letters' tokens and
//! renormalised over them (a softmax over the letters' logits, as the protocol reads answers).
//!
//! The letter tokens are found as the protocol finds them: encode the rendered prompt, encode
//! the prompt followed by `" A"`, and take the token right after the prompt's tokens
//! ([`option_letter_ids`]). With LLaVA's template the prompt ends in `ASSISTANT:` and the letter
//! token is `▁A`.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::families::Vlm;

/// The token ids of the option letters `A`, `B`, ... (`n_options` of them) as the model would
/// write them right after `prompt_text` (the rendered prompt, `Prepared::prompt_text`).
///
/// For each letter, `prompt_text + " " + letter` is encoded (without special tokens) and the
/// token after the prompt's own tokens is taken. Errors when `n_options` is not in `1..=26`, when
/// the letter does not start a token of its own (the prompt's last token absorbs it, so the
/// encodings do not share the prompt's tokens as a prefix), or when two letters map to the same
/// token (a tokenizer that splits `" A"` into a space token and a letter).
pub fn option_letter_ids(model: &dyn Vlm, prompt_text: &str, n_options: usize) -> Result<Vec<u32>> {
    if n_options == 0 || n_options > 26 {
        return Err(Error::input(format!(
            "option letters: {n_options} options asked for; expected 1 to 26 (A-Z)"
        )));
    }
    // the same reading the protocol runner uses (prompt + " " + letter, one token per letter)
    Ok(crate::protocol::runner::letters_after_prompt(model, prompt_text, " ", n_options)?.ids)
}

/// Softmax of `logits` (f64 accumulation; `-inf` entries get 0). Errors on NaN, `+inf` or when
/// every entry is `-inf`.
pub fn softmax(logits: &[f32]) -> Result<Vec<f32>> {
    if logits.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
        return Err(Error::input(format!(
            "softmax: logits {logits:?} contain NaN or +inf"
        )));
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return Err(Error::input("softmax: every logit is -inf"));
    }
    let e: Vec<f64> = logits.iter().map(|&v| ((v - m) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    Ok(e.iter().map(|v| (v / s) as f32).collect())
}

/// Probabilities over the option letters from logits over the vocabulary (`[V]`).
pub fn option_probs(logits: &[f32], letter_ids: &[u32]) -> Result<Vec<f32>> {
    let mut sel = Vec::with_capacity(letter_ids.len());
    for &id in letter_ids {
        let v = logits.get(id as usize).ok_or_else(|| {
            Error::input(format!(
                "option letters: token id {id} is outside the {} logits",
                logits.len()
            ))
        })?;
        sel.push(*v);
    }
    softmax(&sel)
}

/// The logit lens at one position: for each residual (`[d]`, or any shape whose last axis is
/// `d` and which holds exactly one vector, e.g. a `[1, 1, d]` capture at the decision token),
/// the final norm and unembedding of `model`'s language model, then the softmax over the option
/// letters. Returns one probability vector per residual (per layer), in the order given.
pub fn lens_options(
    model: &dyn Vlm,
    resids: &[Tensor],
    letter_ids: &[u32],
) -> Result<Vec<Vec<f32>>> {
    let dec = model.decoder();
    let d = model.info().d_model;
    let mut out = Vec::with_capacity(resids.len());
    for (k, r) in resids.iter().enumerate() {
        if r.elem_count() != d {
            return Err(Error::input(format!(
                "logit lens: residual {k} has shape {:?}, expected one vector of width {d}",
                r.dims()
            )));
        }
        let x = r.reshape((1, 1, d))?;
        let x = x.to_dtype(model.info().dtype)?;
        let logits = dec.unembed(&x)?;
        let v: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        out.push(option_probs(&v, letter_ids)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_normalised_and_checked() {
        let p = softmax(&[0.0, (3f32).ln(), f32::NEG_INFINITY]).unwrap();
        assert!((p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6 && p[2] == 0.0);
        assert!(softmax(&[f32::NAN]).is_err());
        assert!(softmax(&[f32::NEG_INFINITY]).is_err());
        let e = option_probs(&[0.0, 1.0], &[0, 5]).unwrap_err().to_string();
        assert!(e.contains("token id 5"), "{e}");
    }
}
