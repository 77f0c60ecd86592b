//! Prepared inputs: token ids, pixel values and the span table, built from a conversation the
//! way the model's Hugging Face processor builds them.

use std::collections::BTreeMap;

use candle_core::Tensor;
use image::RgbImage;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::spans::{ImageSpan, MessageSpan, Spans};
use crate::template::{ChatTemplate, Message};

/// One model-ready input.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Token ids with every image placeholder expanded to the model's image-token count.
    pub ids: Vec<u32>,
    /// The rendered prompt (placeholders not expanded), as the chat template writes it.
    pub prompt_text: String,
    /// Where each message and image sits.
    pub spans: Spans,
    /// Pixel values in the family's layout (LLaVA: `[n_images, 3, H, W]`).
    pub pixel_values: Option<Tensor>,
    /// Family-specific tensors (grid sizes, Q-Former ids, ...).
    pub extra: BTreeMap<String, Tensor>,
    /// Each image as the model saw it (after resize and crop), for heatmaps.
    pub views: Vec<RgbImage>,
}

/// Load a `tokenizer.json`, naming the file on failure.
pub fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::config(
            path,
            "missing: the tokenizer is needed to prepare text",
        ));
    }
    Tokenizer::from_file(path)
        .map_err(|e| Error::config(path, format!("tokenizer does not load: {e}")))
}

/// The id of `token` in the tokenizer's vocabulary (added tokens included).
pub fn token_id(tok: &Tokenizer, token: &str) -> Option<u32> {
    tok.token_to_id(token)
}

/// A message's role and byte range `[start, end)` in the rendered text.
pub type MessageBounds = (String, usize, usize);

/// Render `messages` and compute each message's byte range in the rendered text, by rendering
/// growing prefixes of the conversation. Falls back to locating each message's text when the
/// template is not prefix-stable.
pub fn render_with_bounds(
    tmpl: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<(String, Vec<MessageBounds>)> {
    let full = tmpl.render(messages, add_generation_prompt)?;
    let mut bounds = Vec::with_capacity(messages.len());
    let mut prev = 0usize;
    let mut stable = true;
    for k in 0..messages.len() {
        let part = tmpl.render(&messages[..=k], false)?;
        if !full.starts_with(&part) || part.len() < prev {
            stable = false;
            break;
        }
        bounds.push((messages[k].role.clone(), prev, part.len()));
        prev = part.len();
    }
    if !stable {
        bounds.clear();
        let mut from = 0usize;
        for m in messages {
            let t = m.joined_text();
            let start = if t.is_empty() {
                None
            } else {
                full[from..].find(&t).map(|i| i + from)
            };
            let (s, e) = match start {
                Some(s) => (s, s + t.len()),
                None => (from, from),
            };
            bounds.push((m.role.clone(), s, e));
            from = e;
        }
    }
    Ok((full, bounds))
}

/// Tokenize `text`, map message byte ranges to token ranges, then expand each occurrence of
/// `image_token_id` into the number of tokens of the matching image (`grids[i]` = rows x cols,
/// row-major). Returns ids and spans.
pub fn tokenize_and_expand(
    tok: &Tokenizer,
    text: &str,
    bounds: &[(String, usize, usize)],
    add_special_tokens: bool,
    image_token_id: u32,
    grids: &[(usize, usize)],
    tokens_per_image: &dyn Fn(usize) -> usize,
) -> Result<(Vec<u32>, Spans)> {
    let enc = tok
        .encode(text, add_special_tokens)
        .map_err(|e| Error::msg(format!("tokenization failed: {e}")))?;
    let ids = enc.get_ids();
    let offsets = enc.get_offsets();
    let special = enc.get_special_tokens_mask();
    // message token ranges in the unexpanded sequence
    let mut msgs = Vec::with_capacity(bounds.len());
    for (index, (role, s, e)) in bounds.iter().enumerate() {
        let inside: Vec<usize> = (0..ids.len())
            .filter(|&t| special[t] == 0 || ids[t] == image_token_id)
            .filter(|&t| {
                let (a, b) = offsets[t];
                a >= *s && a < *e && b > a || (a == b && a > *s && a < *e)
            })
            .collect();
        let (start, end) = match (inside.first(), inside.last()) {
            (Some(&a), Some(&b)) => (a, b + 1),
            _ => (0, 0),
        };
        msgs.push(MessageSpan {
            role: role.clone(),
            index,
            start,
            end,
        });
    }
    // expansion
    let n_placeholders = ids.iter().filter(|&&t| t == image_token_id).count();
    if n_placeholders != grids.len() {
        return Err(Error::input(format!(
            "the prompt has {n_placeholders} image placeholder(s) but {} image(s) were given",
            grids.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + grids.len() * 600);
    let mut map = Vec::with_capacity(ids.len() + 1); // old index -> new index
    let mut images = Vec::with_capacity(grids.len());
    let mut k = 0usize;
    for &t in ids {
        map.push(out.len());
        if t == image_token_id {
            let n = tokens_per_image(k);
            let (rows, cols) = grids[k];
            images.push(ImageSpan {
                index: k,
                start: out.len(),
                end: out.len() + n,
                rows,
                cols,
            });
            out.extend(std::iter::repeat_n(image_token_id, n));
            k += 1;
        } else {
            out.push(t);
        }
    }
    map.push(out.len());
    for m in msgs.iter_mut() {
        if m.end > m.start {
            m.start = map[m.start];
            m.end = map[m.end];
        }
    }
    let spans = Spans {
        len: out.len(),
        pad: 0,
        messages: msgs,
        images,
    };
    Ok((out, spans))
}

/// Count images in a conversation and check it against the images given.
pub fn check_image_count(messages: &[Message], n_images: usize, max: Option<usize>) -> Result<()> {
    let n: usize = messages.iter().map(|m| m.n_images()).sum();
    if n == 0 {
        return Err(Error::input(
            "the conversation has no image part ({\"type\": \"image\"}); a VLM prompt needs one",
        ));
    }
    if n != n_images {
        return Err(Error::input(format!(
            "the conversation has {n} image part(s) but {n_images} image(s) were given"
        )));
    }
    if let Some(m) = max {
        if n > m {
            return Err(Error::input(format!(
                "the conversation has {n} images; this model takes at most {m}"
            )));
        }
    }
    Ok(())
}
