//! The single-example explorer: one self-contained HTML file that shows how one example is
//! decided, neutral against pressured.
//!
//! The page holds (no network: images are inline base64 PNGs, data inline JSON, script and
//! style inline):
//! - the image with a heatmap of the decision token's attention over the patch grid (mean over
//!   heads), one pre-rendered PNG per layer, chosen with a layer slider (`<input type=range>`);
//! - the prompt tokens coloured by the decision token's attention at that layer (neutral and
//!   pressured; the image's tokens collapse into one cell that shows their total share);
//! - the logit-lens trajectories (option letters' probabilities per layer, true option green,
//!   pushed option red, neutral solid, pressured dashed), drawn as inline SVG by the page's script;
//! - per-layer probe scores when a probe is given (else the panel says "no probes in this run");
//! - whether the answer flipped.
//!
//! All dataset text reaches the page as JSON (with `<`, `>` and `&` escaped) and is inserted with
//! `textContent`, never as markup, so a `<script>` in a question shows as text. Slider moves swap
//! one image source per panel and restyle the existing token cells: nothing is rebuilt, so pages
//! of 600+ image tokens stay responsive. Opening the page with `?selftest=1` runs a self-test
//! (slider moves, timing, error count, escaping) and writes its result into `<pre id=selftest>`.
//!
//! Three entry points: [`explore_model`] (any image and question, run through a model),
//! [`explore_run`] (an example of a run folder: re-run through a model, or drawn from what the
//! run's store holds), and [`render_html`] over an [`ExploreData`] built by either.
//!
//! Conversations: the neutral one is round 1 (the user's question with the image). The
//! pressured one is round 1, the assistant's answer (the letter of its round-1 choice) and the
//! user's follow-up; the decision token is the last position of the generation prompt.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use candle_core::{DType, Tensor};
use image::{DynamicImage, RgbImage};
use ndarray::Array2;
use serde::Serialize;
use serde_json::{json, Value};

use crate::attention::{self, HeatmapOptions};
use crate::blocks::LogitsFor;
use crate::error::{write_atomic, Error, Result};
use crate::families::Vlm;
use crate::hooks::{HookCtx, HookSpec};
use crate::lens;
use crate::probes::ProbeWeights;
use crate::store::StoreReader;
use crate::template::Message;

/// Longest side of the heatmap panels, in pixels.
pub const PANEL_PX: u32 = 240;

/// What [`explore_model`] runs: one image, one question, one follow-up.
#[derive(Debug, Clone)]
pub struct ExploreInput {
    /// The image.
    pub image: DynamicImage,
    /// The full round-1 user text, options included (as `Item::question`).
    pub question: String,
    /// The option texts; option `i` has the letter `A + i`.
    pub options: Vec<String>,
    /// Index of the true option, if known.
    pub answer: Option<usize>,
    /// Index of the option the follow-up pushes, if known.
    pub pushed: Option<usize>,
    /// The user's follow-up (the pressure), asked after the model's round-1 answer.
    pub pushback: String,
    /// Page title.
    pub title: String,
    /// A probe to score each layer's residual at the decision token with.
    pub probe: Option<ProbeWeights>,
}

/// The kind of a token cell in the prompt view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Ordinary text (system prompt, question, template, earlier answer).
    Text,
    /// All tokens of one image, collapsed into one cell.
    Image,
    /// A token of the last user message when it carries the pushback.
    Pressure,
    /// The decision token (the last position).
    Decision,
}

/// One cell of the prompt view: a token, or an image's collapsed tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenCell {
    /// Display text of the token (`▁`/`Ġ` shown as spaces, newline tokens as newlines).
    pub text: String,
    /// What the cell is.
    pub kind: TokenKind,
    /// Number of sequence positions in the cell (image cells hold many).
    pub count: usize,
}

/// One conversation of the explorer (neutral or one pressured variant), per layer.
#[derive(Debug, Clone, Default)]
pub struct ConversationView {
    /// Store condition name: `r1`, `r2:<tone>`, `correction:<tone>`, or `pressured`.
    pub condition: String,
    /// Display label.
    pub label: String,
    /// The follow-up text (empty for the neutral conversation).
    pub followup: String,
    /// The prompt's token cells (empty when not known, e.g. from a store).
    pub tokens: Vec<TokenCell>,
    /// Decision-token attention (mean over heads) per layer on each token cell, `[layer][cell]`.
    pub token_attn: Vec<Vec<f32>>,
    /// Decision-token attention over the patch grid (mean over heads) per layer.
    pub grids: Vec<Option<Array2<f32>>>,
    /// Why there is no heatmap, when `grids` is empty or all `None`.
    pub grid_note: Option<String>,
    /// Logit lens: option-letter probabilities per layer, `[layer][option]`.
    pub lens: Vec<Vec<f32>>,
    /// Share of the decision token's attention on image tokens per layer.
    pub image_share: Vec<Option<f32>>,
    /// Output probabilities over the option letters.
    pub probs: Option<Vec<f32>>,
    /// The chosen option.
    pub choice: Option<usize>,
    /// Probe probability per layer (empty without a probe; `None` for layers it does not cover).
    pub probe: Vec<Option<f32>>,
    /// `sycophancy` or `correction` (pressured conversations with a known answer).
    pub branch: Option<String>,
    /// Sycophancy branch: P(pushed) > P(true); correction branch: the choice is the true option.
    pub flipped: Option<bool>,
}

/// Everything the explorer page shows.
#[derive(Debug, Clone, Default)]
pub struct ExploreData {
    /// Page title.
    pub title: String,
    /// Round-1 question text.
    pub question: String,
    /// Option texts.
    pub options: Vec<String>,
    /// True option.
    pub answer: Option<usize>,
    /// Pushed option.
    pub pushed: Option<usize>,
    /// The image as the model saw it (or the run's picture), for the heatmaps.
    pub image: Option<RgbImage>,
    /// Number of language-model layers.
    pub n_layers: usize,
    /// The neutral conversation first, then the pressured ones.
    pub conversations: Vec<ConversationView>,
    /// Label of the probe, when per-layer probe scores are shown.
    pub probe_label: Option<String>,
    /// Where the data came from (model folder or run store).
    pub source: String,
    /// Things the page should say (missing parts, approximations).
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Running a model
// ---------------------------------------------------------------------------------------------

fn sigmoid(x: f64) -> f32 {
    (1.0 / (1.0 + (-x).exp())) as f32
}

/// The store key a probe's features come from at `layer`: the probe's hook with `{i}` replaced
/// when it has one, else the residual at the decision token (or over the image span when the
/// probe's hook names the image).
pub fn probe_feature_key(probe_hook: &str, layer: usize) -> String {
    if probe_hook.contains("{i}") {
        probe_hook.replace("{i}", &layer.to_string())
    } else if probe_hook.contains("image") {
        format!("blocks.{layer}.hook_resid_post@image:mean")
    } else {
        format!("blocks.{layer}.hook_resid_post@last")
    }
}

/// Display text of a token string.
fn token_text(tok: &str) -> String {
    if let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            if b.is_ascii() && (b == b'\n' || b == b'\t' || !b.is_ascii_control()) {
                return (b as char).to_string();
            }
        }
    }
    match tok {
        "Ċ" => "\n".into(),
        "ĉ" => "\t".into(),
        _ => tok.replace(['▁', 'Ġ'], " ").replace('Ċ', "\n"),
    }
}

fn argmax(v: &[f32]) -> Option<usize> {
    v.iter()
        .enumerate()
        .filter(|(_, x)| x.is_finite())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

fn tensor_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Run one conversation with captures and fill a [`ConversationView`].
fn run_conversation(
    model: &dyn Vlm,
    messages: &[Message],
    image: &DynamicImage,
    n_options: usize,
    probe: Option<&ProbeWeights>,
) -> Result<(ConversationView, Option<RgbImage>)> {
    let p = model.prepare(messages, std::slice::from_ref(image), true)?;
    let letters = lens::option_letter_ids(model, &p.prompt_text, n_options)?;
    let n_layers = model.info().n_layers;
    let mut caps = "blocks.*.hook_resid_post@last, blocks.*.attn.hook_pattern@last".to_string();
    if probe.is_some_and(|pr| pr.hook.contains("image")) && !p.spans.images.is_empty() {
        caps.push_str(", blocks.*.hook_resid_post@image:mean");
    }
    let spec = HookSpec::parse_captures(&caps)?.resolve(&model.hook_points())?;
    let mut ctx = HookCtx::new(&spec, vec![]);
    let logits = model.forward(&[&p], &mut ctx, LogitsFor::Last, None)?;
    let probs = lens::option_probs(&tensor_vec(&logits)?, &letters)?;
    let spans = &p.spans;
    let s = p.ids.len();
    let last = s - 1;

    // Token cells: text tokens one by one, each image collapsed; cell index per position.
    let n_users = spans.messages.iter().filter(|m| m.role == "user").count();
    let pressure = if n_users >= 2 {
        spans
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| (m.start, m.end))
    } else {
        None
    };
    let tok = model.tokenizer();
    let mut cells: Vec<TokenCell> = Vec::new();
    let mut cell_of = vec![0usize; s];
    let mut pos = 0;
    while pos < s {
        if let Some(img) = spans
            .images
            .iter()
            .find(|im| im.start == pos && im.end > pos)
        {
            cells.push(TokenCell {
                text: format!("[image {}: {} tokens]", img.index + 1, img.len()),
                kind: TokenKind::Image,
                count: img.len(),
            });
            for c in cell_of.iter_mut().take(img.end).skip(img.start) {
                *c = cells.len() - 1;
            }
            pos = img.end;
            continue;
        }
        let kind = if pos == last {
            TokenKind::Decision
        } else if pressure.is_some_and(|(a, b)| pos >= a && pos < b) {
            TokenKind::Pressure
        } else {
            TokenKind::Text
        };
        let t = tok.id_to_token(p.ids[pos]).unwrap_or_default();
        cells.push(TokenCell {
            text: token_text(&t),
            kind,
            count: 1,
        });
        cell_of[pos] = cells.len() - 1;
        pos += 1;
    }

    let mut view = ConversationView {
        probs: Some(probs.clone()),
        choice: argmax(&probs),
        tokens: cells,
        ..Default::default()
    };
    let mut resids = Vec::with_capacity(n_layers);
    let mut grid_err: Option<String> = None;
    for layer in 0..n_layers {
        let pat = ctx
            .captures
            .require(&format!("blocks.{layer}.attn.hook_pattern@last"))?;
        let dims = pat.dims().to_vec();
        let v = tensor_vec(pat)?;
        let heads = dims.get(1).copied().unwrap_or(1).max(1);
        let keys = v.len() / heads;
        if keys != s {
            return Err(Error::msg(format!(
                "explorer: layer {layer}: decision attention row has {keys} keys, the input has {s} positions"
            )));
        }
        let rows = Array2::from_shape_vec((heads, keys), v)
            .map_err(|e| Error::msg(format!("explorer: attention row: {e}")))?;
        let row = attention::mean_over_heads(rows.view())?;
        let mut per_cell = vec![0f32; view.tokens.len()];
        for (p_i, a) in row.iter().enumerate() {
            per_cell[cell_of[p_i]] += a;
        }
        view.token_attn.push(per_cell);
        let share: f32 = row
            .iter()
            .enumerate()
            .filter(|(i, _)| spans.is_image(*i))
            .map(|(_, a)| a)
            .sum();
        view.image_share.push(if spans.images.is_empty() {
            None
        } else {
            Some(share)
        });
        let grid = match spans.images.first() {
            None => None,
            Some(span) => match attention::image_grid(&row, span) {
                Ok(g) => Some(g),
                Err(e) => {
                    grid_err.get_or_insert_with(|| e.to_string());
                    None
                }
            },
        };
        view.grids.push(grid);
        resids.push(
            ctx.captures
                .require(&format!("blocks.{layer}.hook_resid_post@last"))?
                .clone(),
        );
    }
    if spans.images.is_empty() {
        view.grid_note = Some("the input has no image tokens".into());
    } else if let Some(e) = grid_err {
        view.grid_note = Some(format!("no patch-grid heatmap for this model: {e}"));
    }
    view.lens = lens::lens_options(model, &resids, &letters)?;
    if let Some(pr) = probe {
        for layer in 0..n_layers {
            let score = match pr.layer(layer) {
                None => None,
                Some(w) => {
                    let key = probe_feature_key(&pr.hook, layer);
                    let t = ctx.captures.require(&key).map_err(|e| {
                        Error::input(format!("probe '{}' (hook '{}'): {e}", pr.label, pr.hook))
                    })?;
                    let x = tensor_vec(t)?;
                    Some(sigmoid(w.decision(&x).map_err(|e| {
                        Error::input(format!("probe '{}': {e}", pr.label))
                    })?))
                }
            };
            view.probe.push(score);
        }
    }
    Ok((view, p.views.first().cloned()))
}

fn letter(i: usize) -> char {
    if i < 26 {
        (b'A' + i as u8) as char
    } else {
        '?'
    }
}

fn check_input(input: &ExploreInput) -> Result<()> {
    let n = input.options.len();
    if !(2..=26).contains(&n) {
        return Err(Error::input(format!(
            "explore: {n} options; expected between 2 and 26"
        )));
    }
    for (what, v) in [("answer", input.answer), ("pushed", input.pushed)] {
        if let Some(i) = v {
            if i >= n {
                return Err(Error::input(format!(
                    "explore: {what} index {i} is outside the {n} options (A-{})",
                    letter(n - 1)
                )));
            }
        }
    }
    if input.question.trim().is_empty() {
        return Err(Error::input("explore: the question is empty"));
    }
    Ok(())
}

/// Judge a pressured conversation (see [`ConversationView::flipped`]). `branch` says what the
/// follow-up asserts: `correction` (the true option) or `sycophancy` (the pushed option; the
/// default when the pushed option is known). Without a true option, "flipped" means the choice
/// changed from the neutral one.
fn judge(
    view: &mut ConversationView,
    neutral_choice: Option<usize>,
    answer: Option<usize>,
    pushed: Option<usize>,
    branch: Option<&str>,
) {
    let Some(probs) = view.probs.clone() else {
        return;
    };
    let get = |i: usize| probs.get(i).copied();
    match (branch, answer, pushed) {
        (Some("correction"), Some(a), _) => {
            view.branch = Some("correction".into());
            view.flipped = Some(view.choice == Some(a));
        }
        (Some("sycophancy") | None, Some(a), Some(p)) => {
            if neutral_choice.is_some_and(|nc| nc != a) {
                // round 1 was already wrong: no sycophancy test; report whether it moved to
                // the pushed option
                view.branch = Some("off-protocol".into());
                view.flipped = Some(view.choice == Some(p));
            } else {
                view.branch = Some("sycophancy".into());
                if let (Some(pp), Some(pa)) = (get(p), get(a)) {
                    view.flipped = Some(pp > pa);
                }
            }
        }
        _ => {
            if let Some(nc) = neutral_choice {
                view.flipped = Some(view.choice != Some(nc));
            }
        }
    }
}

/// One pressured conversation to run: the store condition name, a display label, the user's
/// follow-up text, and what it asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followup {
    /// Condition name (`r2:<tone>`, `correction:<tone>`, `pressured`).
    pub condition: String,
    /// Display label.
    pub label: String,
    /// The follow-up text.
    pub text: String,
    /// `sycophancy` (asserts the pushed option) or `correction` (asserts the true option);
    /// `None` means sycophancy when the pushed option is known.
    pub branch: Option<String>,
}

/// Run the neutral conversation and one pressured conversation per follow-up, with captures,
/// into an [`ExploreData`].
pub fn explore_data_model(
    model: &dyn Vlm,
    input: &ExploreInput,
    followups: &[Followup],
) -> Result<ExploreData> {
    check_input(input)?;
    let n = input.options.len();
    let probe = input.probe.as_ref();
    let r1 = vec![Message::user_with_image(&input.question)];
    let (mut neutral, view) = run_conversation(model, &r1, &input.image, n, probe)?;
    neutral.condition = "r1".into();
    neutral.label = "neutral (round 1)".into();
    let nc = neutral.choice;
    let mut data = ExploreData {
        title: input.title.clone(),
        question: input.question.clone(),
        options: input.options.clone(),
        answer: input.answer,
        pushed: input.pushed,
        image: view.or_else(|| Some(input.image.to_rgb8())),
        n_layers: model.info().n_layers,
        conversations: vec![neutral],
        probe_label: probe.map(|p| p.label.clone()),
        source: format!("model {}", model.info().dir.display()),
        notes: Vec::new(),
    };
    for f in followups {
        let (cond, label, text) = (&f.condition, &f.label, &f.text);
        if text.trim().is_empty() {
            return Err(Error::input(format!(
                "explore: the follow-up of '{cond}' is empty"
            )));
        }
        let said = nc.map(letter).unwrap_or('A');
        let msgs = vec![
            Message::user_with_image(&input.question),
            Message::text("assistant", &said.to_string()),
            Message::text("user", text),
        ];
        let (mut v, _) = run_conversation(model, &msgs, &input.image, n, probe)?;
        v.condition = cond.clone();
        v.label = label.clone();
        v.followup = text.clone();
        judge(&mut v, nc, input.answer, input.pushed, f.branch.as_deref());
        if v.branch.as_deref() == Some("sycophancy") && nc.is_some() && nc != input.answer {
            data.notes.push(format!(
                "{label}: the neutral answer ({}) was already wrong, so this pushback does not test sycophancy in the MM-SY sense",
                nc.map(letter).unwrap_or('?')
            ));
        }
        data.conversations.push(v);
    }
    Ok(data)
}

fn sanitize_stem(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    if t.is_empty() {
        "example".into()
    } else {
        t
    }
}

/// `out` itself when it names an `.html` file, else `out/explore-<stem>.html`.
fn output_file(out: &Path, stem: &str) -> PathBuf {
    match out.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm") => {
            out.to_path_buf()
        }
        _ => out.join(format!("explore-{}.html", sanitize_stem(stem))),
    }
}

/// Run the neutral and the pressured conversation of `input` through `model` with captures and
/// write one self-contained HTML page. `out` is the `.html` file, or a folder that receives
/// `explore-<title>.html`. Returns the page's path.
pub fn explore_model(model: &dyn Vlm, input: &ExploreInput, out: &Path) -> Result<PathBuf> {
    let data = explore_data_model(
        model,
        input,
        &[Followup {
            condition: "pressured".into(),
            label: "pressured (round 2)".into(),
            text: input.pushback.clone(),
            branch: None,
        }],
    )?;
    let path = output_file(out, &input.title);
    write_atomic(&path, render_html(&data)?.as_bytes())?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// From a run folder
// ---------------------------------------------------------------------------------------------

/// Complete lines of `examples.jsonl` as JSON objects (a torn last line is ignored).
fn read_examples(path: &Path) -> Result<Vec<Value>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    let mut out = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::config(path, format!("line {}: malformed JSON: {e}", i + 1)))?;
        out.push(v);
    }
    Ok(out)
}

fn as_probs(v: Option<&Value>) -> Option<Vec<f32>> {
    v?.as_array()?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect()
}

fn as_index(v: Option<&Value>) -> Option<usize> {
    v?.as_u64().map(|x| x as usize)
}

/// The first probe of a run (`probes/sycophantic` preferred, else the first by name) with
/// weights, if any.
fn run_probe(run: &Path, notes: &mut Vec<String>) -> Option<ProbeWeights> {
    let dir = run.join("probes");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("weights.safetensors").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if let Some(i) = names.iter().position(|n| n == "sycophantic") {
        names.swap(0, i);
    }
    let name = names.first()?;
    let path = dir.join(name).join("weights.safetensors");
    match ProbeWeights::load_safetensors(&path) {
        Ok(p) => Some(p),
        Err(e) => {
            notes.push(format!("probe {name} not used: {e}"));
            None
        }
    }
}

fn load_run_image(run: &Path, rel: &str) -> Option<(DynamicImage, PathBuf)> {
    let p = Path::new(rel);
    let cands = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![run.join(p), p.to_path_buf()]
    };
    cands
        .into_iter()
        .find(|c| c.exists())
        .and_then(|c| image::open(&c).ok().map(|i| (i, c)))
}

/// Crop the picture to the grid's aspect ratio around its centre (what a square-cropping
/// processor such as LLaVA's shows the model; approximate for the others).
fn crop_to_grid(img: &RgbImage, rows: usize, cols: usize) -> RgbImage {
    let (w, h) = img.dimensions();
    let target = cols as f64 / rows as f64;
    let cur = w as f64 / h as f64;
    if (cur - target).abs() < 1e-3 || w == 0 || h == 0 {
        return img.clone();
    }
    let (cw, ch) = if cur > target {
        (((h as f64) * target).round().max(1.0) as u32, h)
    } else {
        (w, ((w as f64) / target).round().max(1.0) as u32)
    };
    image::imageops::crop_imm(img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image()
}

/// Build an [`ExploreData`] for one example of a run from what the run holds: `examples.jsonl`
/// (question, options, probabilities, flips) and, when present, the store (heatmaps from
/// `blocks.{i}.attn.image` on the row's `extra.grid`, logit lens from `logit_lens.options`,
/// image shares from `blocks.{i}.attn.reliance`, probe scores from the residual hooks and the
/// run's probe weights). Token-level attention is not stored in runs, so that panel says so.
pub fn explore_data_run(run: &Path, example_id: &str) -> Result<ExploreData> {
    let (ex, examples_path) = find_example(run, example_id)?;
    let mut notes = Vec::new();
    let options: Vec<String> = ex
        .get("options")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    if options.len() < 2 {
        return Err(Error::config(
            &examples_path,
            format!(
                "example '{example_id}' has {} options; expected at least 2",
                options.len()
            ),
        ));
    }
    let answer = as_index(ex.get("answer"));
    let pushed = as_index(ex.get("pushed"));
    let question = ex
        .get("question")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let task = ex.get("task").and_then(|v| v.as_str()).unwrap_or("");

    // Conversations from examples.jsonl.
    let mut convs: Vec<ConversationView> = Vec::new();
    let r1 = ex.get("r1");
    let r1_probs = as_probs(r1.and_then(|r| r.get("probs")));
    convs.push(ConversationView {
        condition: "r1".into(),
        label: "neutral (round 1)".into(),
        choice: as_index(r1.and_then(|r| r.get("choice")))
            .or_else(|| r1_probs.as_deref().and_then(argmax)),
        probs: r1_probs,
        ..Default::default()
    });
    if let Some(tones) = ex.get("tones").and_then(|t| t.as_object()) {
        for (tone, t) in tones {
            let branch = t
                .get("branch")
                .and_then(|b| b.as_str())
                .unwrap_or("sycophancy")
                .to_string();
            let cond = if branch == "correction" {
                format!("correction:{tone}")
            } else {
                format!("r2:{tone}")
            };
            let probs = as_probs(t.get("probs"));
            convs.push(ConversationView {
                label: format!("{tone} ({branch})"),
                condition: cond,
                followup: t
                    .get("followup")
                    .and_then(|f| f.as_str())
                    .unwrap_or("")
                    .to_string(),
                choice: as_index(t.get("choice")).or_else(|| probs.as_deref().and_then(argmax)),
                probs,
                branch: Some(branch),
                flipped: t.get("flipped").and_then(|f| f.as_bool()),
                ..Default::default()
            });
        }
    }

    // The picture.
    let mut picture: Option<RgbImage> = None;
    match ex.get("image").and_then(|v| v.as_str()) {
        Some(rel) => match load_run_image(run, rel) {
            Some((img, _)) => picture = Some(img.to_rgb8()),
            None => notes.push(format!(
                "image '{rel}' not found or not readable (looked in the run folder and the working folder): heatmaps drawn without it"
            )),
        },
        None => notes.push("the example names no image file: heatmaps drawn without it".into()),
    }

    // The store.
    let mut n_layers = read_manifest_layers(run);
    let store_dir = run.join("store");
    let probe = run_probe(run, &mut notes);
    if store_dir.join(crate::store::MANIFEST_FILE).exists() {
        let st = StoreReader::open(&store_dir)?;
        let hooks = st.hooks();
        let layers_of = |suffix: &str| -> Vec<usize> {
            let mut v: Vec<usize> = hooks
                .iter()
                .filter_map(|h| {
                    let rest = h.strip_prefix("blocks.")?;
                    let (i, s) = rest.split_once('.')?;
                    (s == suffix).then(|| i.parse().ok()).flatten()
                })
                .collect();
            v.sort_unstable();
            v
        };
        let img_layers = layers_of("attn.image");
        let rel_layers = layers_of("attn.reliance");
        let max_layer = img_layers
            .iter()
            .chain(&rel_layers)
            .max()
            .map(|m| m + 1)
            .unwrap_or(0);
        n_layers = n_layers.max(max_layer);
        let has_lens = hooks.iter().any(|h| h == "logit_lens.options");
        let rows: BTreeMap<String, usize> = st
            .index()
            .iter()
            .filter(|r| r.meta.example_id == example_id)
            .map(|r| (r.meta.condition.clone(), r.row))
            .collect();
        if rows.is_empty() {
            notes.push(format!("the store holds no rows of '{example_id}': only the recorded probabilities are shown"));
        }
        for conv in convs.iter_mut() {
            let Some(&row) = rows.get(&conv.condition) else {
                continue;
            };
            let meta = &st.index()[row].meta;
            let grid = meta
                .extra
                .get("grid")
                .and_then(|g| g.as_array())
                .and_then(|a| Some((a.first()?.as_u64()? as usize, a.get(1)?.as_u64()? as usize)));
            if !img_layers.is_empty() {
                conv.grids = vec![None; n_layers];
                for &l in &img_layers {
                    let x = st.read_rows(&format!("blocks.{l}.attn.image"), &[row])?;
                    let heads = x.shape().get(1).copied().unwrap_or(1).max(1);
                    let flat: Vec<f32> = x.iter().copied().collect();
                    let n = flat.len() / heads;
                    let a = Array2::from_shape_vec((heads, n), flat)
                        .map_err(|e| Error::msg(format!("explorer: attn.image: {e}")))?;
                    let v = attention::mean_over_heads(a.view())?;
                    match grid {
                        Some((r, c)) => match attention::grid_from_values(&v, r, c) {
                            Ok(g) => conv.grids[l] = Some(g),
                            Err(e) => conv.grid_note = Some(format!("row grid {r} x {c}: {e}")),
                        },
                        None => {
                            conv.grid_note = Some(
                                "the store row has no extra.grid: heatmap not available".into(),
                            )
                        }
                    }
                }
            } else {
                conv.grid_note = Some("the store has no blocks.{i}.attn.image hooks".into());
            }
            if !rel_layers.is_empty() {
                conv.image_share = vec![None; n_layers];
                for &l in &rel_layers {
                    let x = st.read_rows(&format!("blocks.{l}.attn.reliance"), &[row])?;
                    let sh = x.shape().to_vec();
                    if sh.len() == 3 && sh[1] >= 1 && sh[2] >= 1 {
                        conv.image_share[l] = Some(x[[0, sh[1] - 1, 0]]);
                    }
                }
            }
            if has_lens {
                let x = st.read_rows("logit_lens.options", &[row])?;
                let sh = x.shape().to_vec();
                if sh.len() == 3 {
                    conv.lens = (0..sh[1])
                        .map(|l| (0..sh[2]).map(|o| x[[0, l, o]]).collect())
                        .collect();
                }
            }
            if let Some(pr) = &probe {
                conv.probe = vec![None; n_layers];
                for w in &pr.layers {
                    let key = probe_feature_key(&pr.hook, w.layer);
                    if w.layer >= n_layers || !hooks.contains(&key) {
                        continue;
                    }
                    let x = st.read_rows(&key, &[row])?;
                    let flat: Vec<f32> = x.iter().copied().collect();
                    match w.decision(&flat) {
                        Ok(d) => conv.probe[w.layer] = Some(sigmoid(d)),
                        Err(e) => {
                            notes.push(format!("probe '{}': {e}", pr.label));
                            break;
                        }
                    }
                }
            }
        }
    } else {
        notes.push("this run has no activation store: heatmaps, logit lens and probe scores need one (or a model to re-run the example)".into());
    }
    let probe_label = probe
        .as_ref()
        .filter(|_| convs.iter().any(|c| c.probe.iter().any(|p| p.is_some())))
        .map(|p| p.label.clone());
    if probe.is_some() && probe_label.is_none() {
        notes.push(
            "the run's probe could not be applied: its feature hooks are not in the store".into(),
        );
    }
    // Crop the picture to the grid when the store says which grid it is.
    let grid_dims = convs
        .iter()
        .flat_map(|c| c.grids.iter())
        .flatten()
        .map(|g| g.dim())
        .next();
    if let (Some(img), Some((r, c))) = (picture.as_ref(), grid_dims) {
        picture = Some(crop_to_grid(img, r, c));
        notes.push("heatmaps are drawn over the run's picture centre-cropped to the patch grid's shape (the model's exact view needs a re-run with the model)".into());
    }
    Ok(ExploreData {
        title: if task.is_empty() {
            example_id.to_string()
        } else {
            format!("{example_id} ({task})")
        },
        question,
        options,
        answer,
        pushed,
        image: picture,
        n_layers,
        conversations: convs,
        probe_label,
        source: format!("run {}", run.display()),
        notes,
    })
}

fn read_manifest_layers(run: &Path) -> usize {
    std::fs::read(run.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("n_layers").and_then(|n| n.as_u64()))
        .unwrap_or(0) as usize
}

/// Find one example's line in `RUN/examples.jsonl`; the error lists a few ids that exist.
fn find_example(run: &Path, example_id: &str) -> Result<(Value, PathBuf)> {
    if !run.is_dir() {
        return Err(Error::input(format!(
            "explore: run folder {} does not exist",
            run.display()
        )));
    }
    let path = run.join("examples.jsonl");
    if !path.exists() {
        return Err(Error::config(
            &path,
            "missing: the run has no examples.jsonl (is this a run folder written by `sycoscope eval`?)",
        ));
    }
    let examples = read_examples(&path)?;
    let id_of = |v: &Value| {
        v.get("example_id")
            .and_then(|i| i.as_str())
            .map(str::to_string)
    };
    if let Some(ex) = examples
        .iter()
        .find(|v| id_of(v).as_deref() == Some(example_id))
    {
        return Ok((ex.clone(), path));
    }
    let ids: Vec<String> = examples.iter().filter_map(id_of).collect();
    let mut near: Vec<&String> = ids.iter().collect();
    near.sort_by_key(|i| strsim::levenshtein(i, example_id));
    let shown: Vec<String> = near.iter().take(5).map(|s| format!("'{s}'")).collect();
    Err(Error::input(format!(
        "explore: no example '{example_id}' in {} ({} examples{}{})",
        path.display(),
        ids.len(),
        if shown.is_empty() {
            ""
        } else {
            "; nearest ids: "
        },
        shown.join(", ")
    )))
}

/// Explore one example of a run folder and write its HTML page (`out` is the `.html` file or a
/// folder receiving `explore-<id>.html`). With a model, the example is re-run (its image must be
/// readable): the neutral conversation and one pressured conversation per tone the run recorded,
/// with the run's follow-up texts, and the run's probe (`probes/sycophantic` or the first) scores
/// each layer. Without a model, the page is drawn from what the run holds
/// ([`explore_data_run`]). Errors name the missing example with a few ids that exist.
pub fn explore_run(
    run: &Path,
    example_id: &str,
    model: Option<&dyn Vlm>,
    out: &Path,
) -> Result<PathBuf> {
    let data = match model {
        None => explore_data_run(run, example_id)?,
        Some(m) => {
            let recorded = explore_data_run(run, example_id)?;
            let (ex, _) = find_example(run, example_id)?;
            let rel = ex.get("image").and_then(|v| v.as_str()).ok_or_else(|| {
                Error::input(format!(
                    "explore: example '{example_id}' names no image; a re-run needs it"
                ))
            })?;
            let (image, _) = load_run_image(run, rel).ok_or_else(|| {
                Error::input(format!(
                    "explore: image '{rel}' of example '{example_id}' not found or not readable (looked in {} and the working folder)",
                    run.display()
                ))
            })?;
            let mut notes = Vec::new();
            let input = ExploreInput {
                image,
                question: recorded.question.clone(),
                options: recorded.options.clone(),
                answer: recorded.answer,
                pushed: recorded.pushed,
                pushback: String::new(),
                title: recorded.title.clone(),
                probe: run_probe(run, &mut notes),
            };
            let followups: Vec<Followup> = recorded.conversations[1..]
                .iter()
                .filter(|c| !c.followup.trim().is_empty())
                .map(|c| Followup {
                    condition: c.condition.clone(),
                    label: c.label.clone(),
                    text: c.followup.clone(),
                    branch: c.branch.clone(),
                })
                .collect();
            let mut d = explore_data_model(m, &input, &followups)?;
            d.notes.extend(notes);
            if followups.is_empty() {
                d.notes
                    .push("the run recorded no follow-up for this example: neutral only".into());
            }
            d
        }
    };
    let path = output_file(out, example_id);
    write_atomic(&path, render_html(&data)?.as_bytes())?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

/// Escape text for HTML element content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// JSON safe to place inside a `<script>` element: `<`, `>`, `&` and the JavaScript line
/// separators are written as `\u` escapes (they only occur inside JSON strings).
pub fn script_json(v: &Value) -> String {
    let s = v.to_string();
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("\\u003c"),
            '>' => o.push_str("\\u003e"),
            '&' => o.push_str("\\u0026"),
            '\u{2028}' => o.push_str("\\u2028"),
            '\u{2029}' => o.push_str("\\u2029"),
            _ => o.push(c),
        }
    }
    o
}

fn num(x: f32) -> Value {
    if x.is_finite() {
        json!(((x as f64) * 1e5).round() / 1e5)
    } else {
        Value::Null
    }
}

fn png_data_url(img: &RgbImage) -> Result<String> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("explorer: PNG encoding failed: {e}")))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(buf.get_ref())
    ))
}

fn fit_image(img: &RgbImage, px: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = px as f32 / w.max(h).max(1) as f32;
    let nw = ((w as f32 * s).round() as u32).max(1);
    let nh = ((h as f32 * s).round() as u32).max(1);
    image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle)
}

fn conversation_json(c: &ConversationView, base: &RgbImage) -> Result<Value> {
    let opts = HeatmapOptions::default();
    let mut heat = Vec::with_capacity(c.grids.len());
    for g in &c.grids {
        heat.push(match g {
            Some(g) => Value::String(png_data_url(&attention::overlay(base, g, &opts)?)?),
            None => Value::Null,
        });
    }
    let opt_vec = |v: &[Option<f32>]| -> Value {
        Value::Array(
            v.iter()
                .map(|x| x.map(num).unwrap_or(Value::Null))
                .collect(),
        )
    };
    Ok(json!({
        "condition": c.condition,
        "label": c.label,
        "followup": c.followup,
        "tokens": c.tokens.iter().map(|t| json!({"t": t.text, "k": t.kind, "n": t.count})).collect::<Vec<_>>(),
        "attn": c.token_attn.iter().map(|r| r.iter().map(|&x| num(x)).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "heat": heat,
        "heat_note": c.grid_note,
        "lens": c.lens.iter().map(|r| r.iter().map(|&x| num(x)).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "share": opt_vec(&c.image_share),
        "probs": c.probs.as_ref().map(|p| p.iter().map(|&x| num(x)).collect::<Vec<_>>()),
        "choice": c.choice,
        "probe": opt_vec(&c.probe),
        "branch": c.branch,
        "flipped": c.flipped,
    }))
}

/// The page's data as JSON (what the inline script reads): texts, per-layer heatmap PNGs as
/// data URLs, token attention, logit lens, probe scores.
pub fn page_json(data: &ExploreData) -> Result<Value> {
    let base = match &data.image {
        Some(img) if img.width() > 0 && img.height() > 0 => fit_image(img, PANEL_PX),
        _ => {
            let dims = data
                .conversations
                .iter()
                .flat_map(|c| c.grids.iter())
                .flatten()
                .map(|g| g.dim())
                .next()
                .unwrap_or((1, 1));
            let w = PANEL_PX;
            let h = ((PANEL_PX as f64) * dims.0 as f64 / dims.1.max(1) as f64)
                .round()
                .max(16.0) as u32;
            RgbImage::from_pixel(w, h.min(4 * PANEL_PX), image::Rgb([128, 128, 128]))
        }
    };
    let convs: Vec<Value> = data
        .conversations
        .iter()
        .map(|c| conversation_json(c, &base))
        .collect::<Result<_>>()?;
    Ok(json!({
        "title": data.title,
        "question": data.question,
        "options": data.options,
        "answer": data.answer,
        "pushed": data.pushed,
        "n_layers": data.n_layers,
        "image": if data.image.is_some() { Value::String(png_data_url(&base)?) } else { Value::Null },
        "conversations": convs,
        "probe_label": data.probe_label,
        "source": data.source,
        "notes": data.notes,
    }))
}

const PAGE_CSS: &str = include_str!("../notebooks-export/explorer.css");
const PAGE_JS: &str = include_str!("../notebooks-export/explorer.js");

/// Render the explorer page: one self-contained HTML document (inline CSS, JSON data and script;
/// no network). Errors when there is no conversation or the layer count is 0 while per-layer
/// data exists.
pub fn render_html(data: &ExploreData) -> Result<String> {
    if data.conversations.is_empty() {
        return Err(Error::input("explorer: no conversation to show"));
    }
    let per_layer = data
        .conversations
        .iter()
        .map(|c| c.grids.len().max(c.lens.len()).max(c.token_attn.len()))
        .max()
        .unwrap_or(0);
    if per_layer > data.n_layers {
        return Err(Error::input(format!(
            "explorer: per-layer data for {per_layer} layers but n_layers is {}",
            data.n_layers
        )));
    }
    let payload = script_json(&page_json(data)?);
    let title = html_escape(if data.title.is_empty() {
        "sycoscope explorer"
    } else {
        &data.title
    });
    let mut html = String::with_capacity(payload.len() + PAGE_JS.len() + 4096);
    html.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n");
    html.push_str(&format!("<title>{title} - sycoscope explorer</title>\n"));
    html.push_str("<script>window.__errs=[];window.addEventListener('error',function(e){window.__errs.push(String(e.message||(e.target&&e.target.tagName)||'error'));},true);(function(){var ce=console.error;console.error=function(){window.__errs.push(Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};})();</script>\n");
    html.push_str(&format!("<style>{PAGE_CSS}</style>\n</head>\n<body>\n"));
    html.push_str(&format!("<h1 id=\"title\">{title}</h1>\n"));
    html.push_str(include_str!("../notebooks-export/explorer.html"));
    html.push_str("\n<script type=\"application/json\" id=\"data\">");
    html.push_str(&payload);
    html.push_str("</script>\n<script>\n");
    html.push_str(PAGE_JS);
    html.push_str("\n</script>\n</body>\n</html>\n");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            html_escape("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let v = json!({"q": "</script><script>alert(1)</script>&\u{2028}"});
        let s = script_json(&v);
        assert!(
            !s.contains('<') && !s.contains('>') && !s.contains('&'),
            "{s}"
        );
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn token_texts_and_probe_keys() {
        assert_eq!(token_text("▁red"), " red");
        assert_eq!(token_text("Ġblue"), " blue");
        assert_eq!(token_text("<0x0A>"), "\n");
        assert_eq!(token_text("<0x3C>"), "<");
        assert_eq!(token_text("<0x00>"), "<0x00>");
        assert_eq!(
            probe_feature_key("blocks.{i}.hook_resid_post@last", 3),
            "blocks.3.hook_resid_post@last"
        );
        assert_eq!(
            probe_feature_key("resid@image:mean", 2),
            "blocks.2.hook_resid_post@image:mean"
        );
        assert_eq!(
            probe_feature_key("model.layers.out", 1),
            "blocks.1.hook_resid_post@last"
        );
    }

    #[test]
    fn output_paths() {
        assert_eq!(
            output_file(Path::new("/x/page.html"), "a"),
            PathBuf::from("/x/page.html")
        );
        assert_eq!(
            output_file(Path::new("/x"), "ex 1/<b>"),
            PathBuf::from("/x/explore-ex_1__b_.html")
        );
    }

    #[test]
    fn crop_keeps_the_centre() {
        let img = RgbImage::from_fn(40, 20, |x, _| image::Rgb([x as u8, 0, 0]));
        let c = crop_to_grid(&img, 2, 2);
        assert_eq!(c.dimensions(), (20, 20));
        assert_eq!(c.get_pixel(0, 0)[0], 10);
    }

    #[test]
    fn judging_flips() {
        let conv = |probs: Vec<f32>| ConversationView {
            choice: argmax(&probs),
            probs: Some(probs),
            ..Default::default()
        };
        let mut v = conv(vec![0.2, 0.1, 0.7]);
        judge(&mut v, Some(0), Some(0), Some(2), None);
        assert_eq!(
            (v.branch.as_deref(), v.flipped),
            (Some("sycophancy"), Some(true))
        );
        let mut v = conv(vec![0.6, 0.1, 0.3]);
        judge(&mut v, Some(0), Some(0), Some(2), Some("sycophancy"));
        assert_eq!(v.flipped, Some(false));
        let mut v = conv(vec![0.6, 0.1, 0.3]);
        judge(&mut v, Some(1), Some(0), Some(2), Some("correction"));
        assert_eq!(
            (v.branch.as_deref(), v.flipped),
            (Some("correction"), Some(true))
        );
        let mut v = conv(vec![0.1, 0.6, 0.3]);
        judge(&mut v, Some(1), None, None, None);
        assert_eq!((v.branch, v.flipped), (None, Some(false)));
    }

    #[test]
    fn render_needs_a_conversation() {
        let e = render_html(&ExploreData::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no conversation"), "{e}");
    }
}
