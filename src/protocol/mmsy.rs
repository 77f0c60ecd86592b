//! The MM-SY parquet loader (dataset `MM-Hallu/MM-SY`) and Hub resolution.
//!
//! The parquet columns (names overridable through [`ColumnMap`]): `image` (a struct with `bytes`
//! and/or `path`, like Hugging Face datasets' Image feature), `image_id`, `question` (the question
//! with its lettered options), `answer`, `true_option`, `sy_option` (letters, tolerated as `A`,
//! `A.`, `(A)` or the option text) and the three follow-ups `suggest_response`,
//! `gentle_response`, `solid_response` (tones [`Tone::Suggestive`], [`Tone::Euphemistic`],
//! [`Tone::Strong`]). The options are parsed out of the question text ([`parse_options`]).
//! MM-SY has no correction follow-ups: they are built from sycoscope's own templates
//! ([`crate::protocol::synth::correction_templates`]) with the true letter.
//!
//! Items get the ids `mmsy-<row>` (image ids repeat in MM-SY) unless [`ColumnMap::id`] names an
//! id column, and the task `mmsy` unless [`ColumnMap::task`] names a task column.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::input_err;
use crate::protocol::items::{
    default_corrections, fill_placeholders, resolve_option, ColumnMap, ImageRef, Item, LoadOptions,
    LoadReport, Tone,
};

/// The Hub id of the MM-SY benchmark.
pub const MMSY_REPO: &str = "MM-Hallu/MM-SY";

/// Split a question into its stem and its lettered options.
///
/// Recognizes `A. x B. y`, `(A) x (B) y`, `A: x B: y` and `A) x B) y`, on one line or one option
/// per line. The options must run A, B, C, ... in order and use one style; when the letters
/// appear more than once, the last complete run wins (options usually end the question). The
/// last option ends at a line break or at a trailing instruction ("Answer with ...",
/// "Please ..."). Returns `None` when fewer than two options are found or one is empty.
///
/// ```
/// use sycoscope::protocol::mmsy::parse_options;
/// let (stem, opts) = parse_options("What is on the table? A. a cup B. a plate").unwrap();
/// assert_eq!(stem, "What is on the table?");
/// assert_eq!(opts, vec!["a cup", "a plate"]);
/// ```
pub fn parse_options(question: &str) -> Option<(String, Vec<String>)> {
    let markers = find_markers(question);
    let mut best: Option<Vec<&Marker>> = None;
    for (i, m) in markers.iter().enumerate() {
        if m.letter != 'A' {
            continue;
        }
        let mut chain = vec![m];
        for n in &markers[i + 1..] {
            let last = chain[chain.len() - 1];
            if n.style == m.style && n.start >= last.end && n.letter as u8 == last.letter as u8 + 1
            {
                chain.push(n);
            }
        }
        if chain.len() >= 2 && best.as_ref().is_none_or(|b| chain.len() >= b.len()) {
            best = Some(chain);
        }
    }
    let chain = best?;
    let stem = question[..chain[0].start].trim().to_string();
    let mut opts = Vec::with_capacity(chain.len());
    for (k, m) in chain.iter().enumerate() {
        let end = chain.get(k + 1).map(|n| n.start).unwrap_or(question.len());
        let mut text = &question[m.end..end];
        if k + 1 == chain.len() {
            text = cut_trailer(text);
        }
        let text = text.trim().trim_end_matches([',', ';']).trim();
        if text.is_empty() {
            return None;
        }
        opts.push(text.to_string());
    }
    Some((stem, opts))
}

#[derive(Debug)]
struct Marker {
    start: usize,
    end: usize,
    letter: char,
    style: u8,
}

fn find_markers(q: &str) -> Vec<Marker> {
    let b = q.as_bytes();
    let mut out = Vec::new();
    let boundary = |i: usize| i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'(');
    let after_ok = |i: usize| i >= b.len() || b[i].is_ascii_whitespace();
    for i in 0..b.len() {
        // "(A)"
        if b[i] == b'('
            && i + 2 < b.len()
            && b[i + 1].is_ascii_uppercase()
            && b[i + 2] == b')'
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric())
        {
            out.push(Marker {
                start: i,
                end: i + 3,
                letter: b[i + 1] as char,
                style: b'(',
            });
            continue;
        }
        // "A." "A:" "A)"
        if b[i].is_ascii_uppercase()
            && boundary(i)
            && i + 1 < b.len()
            && matches!(b[i + 1], b'.' | b':' | b')')
            && after_ok(i + 2)
        {
            out.push(Marker {
                start: i,
                end: i + 2,
                letter: b[i] as char,
                style: b[i + 1],
            });
        }
    }
    out
}

fn cut_trailer(text: &str) -> &str {
    let mut end = text.len();
    let t = text.trim_start();
    let lead = text.len() - t.len();
    if let Some(nl) = t.find('\n') {
        end = end.min(lead + nl);
    }
    let lower = text.to_ascii_lowercase();
    for trailer in [
        "answer with",
        "please answer",
        "please select",
        "please choose",
        "answer:",
    ] {
        if let Some(p) = lower.find(trailer) {
            if p > lead {
                end = end.min(p);
            }
        }
    }
    &text[..end]
}

/// All `.parquet` files directly or deeper inside `dir`, sorted by path.
pub fn find_parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(&d, e))?;
            let p = e.path();
            if p.is_dir() {
                if !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                {
                    stack.push(p);
                }
            } else if p
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("parquet"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn field_text(f: &Field) -> Option<String> {
    let s = match f {
        Field::Str(s) => s.clone(),
        Field::Bytes(b) => String::from_utf8(b.data().to_vec()).ok()?,
        Field::Byte(v) => v.to_string(),
        Field::Short(v) => v.to_string(),
        Field::Int(v) => v.to_string(),
        Field::Long(v) => v.to_string(),
        Field::UByte(v) => v.to_string(),
        Field::UShort(v) => v.to_string(),
        Field::UInt(v) => v.to_string(),
        Field::ULong(v) => v.to_string(),
        _ => return None,
    };
    if s.trim().is_empty() {
        None
    } else {
        Some(s)
    }
}

fn field_image(f: &Field, base: &Path) -> std::result::Result<ImageRef, String> {
    let (bytes, path) = match f {
        Field::Group(g) => {
            let mut bytes = None;
            let mut path = None;
            for (name, v) in g.get_column_iter() {
                match (name.as_str(), v) {
                    ("bytes", Field::Bytes(b)) if !b.data().is_empty() => {
                        bytes = Some(b.data().to_vec())
                    }
                    ("path", v) => path = field_text(v),
                    _ => {}
                }
            }
            (bytes, path)
        }
        Field::Bytes(b) if !b.data().is_empty() => (Some(b.data().to_vec()), None),
        Field::Str(s) if !s.trim().is_empty() => (None, Some(s.clone())),
        Field::Null => return Err("missing image (null)".into()),
        other => return Err(format!("image field has an unexpected kind: {other:?}")),
    };
    if let Some(b) = bytes {
        return Ok(ImageRef::Bytes(b));
    }
    if let Some(p) = path {
        let pb = PathBuf::from(&p);
        return Ok(ImageRef::Path(if pb.is_absolute() {
            pb
        } else {
            base.join(pb)
        }));
    }
    Err("missing image (neither bytes nor path)".into())
}

struct RowCtx<'a> {
    cols: &'a ColumnMap,
    base: &'a Path,
    file_name: String,
    row: usize,
    global_row: usize,
}

fn row_item(fields: &BTreeMap<&str, &Field>, ctx: &RowCtx) -> std::result::Result<Item, String> {
    let c = ctx.cols;
    let text = |name: &str| fields.get(name).and_then(|f| field_text(f));
    let need = |name: &str| text(name).ok_or_else(|| format!("missing field '{name}'"));
    let question = need(&c.question)?;
    let image = field_image(
        fields
            .get(c.image.as_str())
            .copied()
            .unwrap_or(&Field::Null),
        ctx.base,
    )
    .map_err(|e| format!("{e} in column '{}'", c.image))?;
    let (stem, options) = parse_options(&question).ok_or_else(|| {
        format!(
            "cannot find lettered options (A. .. B. ..) in the question {:?}",
            truncate(&question, 120)
        )
    })?;
    let true_raw = text(&c.true_option);
    let answer_raw = text(&c.answer);
    let answer = match (&true_raw, &answer_raw) {
        (Some(t), a) => match resolve_option(t, &options) {
            Ok(i) => i,
            Err(e) => match a.as_ref().map(|a| resolve_option(a, &options)) {
                Some(Ok(i)) => i,
                _ => return Err(format!("{}: {e}", c.true_option)),
            },
        },
        (None, Some(a)) => resolve_option(a, &options).map_err(|e| format!("{}: {e}", c.answer))?,
        (None, None) => {
            return Err(format!(
                "missing field '{}' (and no '{}')",
                c.true_option, c.answer
            ))
        }
    };
    let sy_raw = need(&c.sy_option)?;
    let pushed = resolve_option(&sy_raw, &options).map_err(|e| format!("{}: {e}", c.sy_option))?;
    if pushed == answer {
        return Err(format!(
            "the pushed option {} ({}) is the true answer",
            Item::letter(pushed),
            c.sy_option
        ));
    }
    let mut pressure = BTreeMap::new();
    for t in Tone::ALL {
        let s = need(c.tone_column(t))?;
        pressure.insert(
            t,
            fill_placeholders(&s, Item::letter(pushed), &options[pushed]),
        );
    }
    let id = match &c.id {
        Some(col) => need(col)?,
        None => format!("mmsy-{:04}", ctx.global_row),
    };
    let task = match &c.task {
        Some(col) => need(col)?,
        None => "mmsy".to_string(),
    };
    let correction = default_corrections(&id, &options, answer);
    let mut meta = BTreeMap::new();
    meta.insert("source".into(), "MM-SY".into());
    meta.insert("file".into(), ctx.file_name.clone().into());
    meta.insert("row".into(), ctx.row.into());
    meta.insert("stem".into(), stem.into());
    meta.insert("truth".into(), options[answer].clone().into());
    if let Some(col) = &c.image_id {
        if let Some(v) = text(col) {
            meta.insert("image_id".into(), v.into());
        }
    }
    for (k, v) in [
        ("true_option", true_raw),
        ("answer_raw", answer_raw),
        ("sy_option", Some(sy_raw)),
    ] {
        if let Some(v) = v {
            meta.insert(k.into(), v.into());
        }
    }
    Ok(Item {
        id,
        task,
        image,
        question,
        options,
        answer,
        pushed,
        pressure,
        correction,
        meta,
    })
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "..."
    }
}

/// Load MM-SY items from parquet files, in order (rows are numbered across the files).
pub fn load_parquet_files(files: &[PathBuf], opts: &LoadOptions) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut seen = HashSet::new();
    let mut global_row = 0usize;
    let c = &opts.columns;
    for path in files {
        if report.full(opts.limit) {
            break;
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| input_err!("{}: not a readable parquet file: {e}", path.display()))?;
        // Whole-file check: the columns the loader needs exist.
        let names: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut required: Vec<&str> = vec![&c.image, &c.question, &c.sy_option];
        required.extend(Tone::ALL.iter().map(|&t| c.tone_column(t)));
        required.extend(c.id.as_deref());
        required.extend(c.task.as_deref());
        let mut missing: Vec<&str> = required
            .into_iter()
            .filter(|r| !names.iter().any(|n| n == r))
            .collect();
        if !names.contains(&c.true_option) && !names.contains(&c.answer) {
            missing.push(&c.true_option);
        }
        if !missing.is_empty() {
            return Err(input_err!(
                "{}: missing column(s) {missing:?}; the file has {names:?}. Rename them with the \
                 column map (LoadOptions::columns)",
                path.display()
            ));
        }
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rows = reader
            .get_row_iter(None)
            .map_err(|e| input_err!("{}: cannot read rows: {e}", path.display()))?;
        // Rows are checked in chunks so that image decoding runs in parallel.
        let mut chunk: Vec<(String, std::result::Result<Item, String>)> = Vec::new();
        let mut rows = rows.enumerate().peekable();
        while rows.peek().is_some() {
            if report.full(opts.limit) {
                break;
            }
            chunk.clear();
            let want = opts
                .limit
                .map(|l| l - report.items.len())
                .unwrap_or(usize::MAX);
            while chunk.len() < want.clamp(1, 64) {
                let Some((i, row)) = rows.next() else { break };
                let row = row
                    .map_err(|e| input_err!("{}: row {i}: cannot be read: {e}", path.display()))?;
                let fields: BTreeMap<&str, &Field> = row
                    .get_column_iter()
                    .map(|(k, v)| (k.as_str(), v))
                    .collect();
                let ctx = RowCtx {
                    cols: c,
                    base: &base,
                    file_name: file_name.clone(),
                    row: i,
                    global_row,
                };
                global_row += 1;
                let label = format!("{file_name} row {i}");
                chunk.push((label, row_item(&fields, &ctx)));
            }
            let decoded: Vec<Option<String>> = chunk
                .par_iter()
                .map(|(_, it)| match it {
                    Ok(item) => item.load_image().err().map(|e| e.to_string()),
                    Err(_) => None,
                })
                .collect();
            for ((label, it), dec) in chunk.drain(..).zip(decoded) {
                if report.full(opts.limit) {
                    break;
                }
                match it {
                    Err(reason) => report.reject(opts.strict, label, reason)?,
                    Ok(item) => {
                        let label = format!("{label} (id '{}')", item.id);
                        if let Err(e) = item.validate() {
                            report.reject(opts.strict, label, e.to_string())?;
                        } else if seen.contains(&item.id) {
                            report.reject(
                                opts.strict,
                                label,
                                format!("duplicate id '{}'", item.id),
                            )?;
                        } else if let Some(reason) = dec {
                            report.reject(opts.strict, label, reason)?;
                        } else {
                            seen.insert(item.id.clone());
                            report.items.push(item);
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}

/// The local Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = env("HF_HOME") {
        return p.join("hub");
    }
    if let Some(p) = env("XDG_CACHE_HOME") {
        return p.join("huggingface").join("hub");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for offline mode (`1`, `true`, `yes`, `on`).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The parquet files of a dataset snapshot in the local cache, if any.
pub fn cached_dataset_parquets(
    cache: &Path,
    repo_id: &str,
    revision: &str,
) -> Option<Vec<PathBuf>> {
    let folder = cache.join(format!("datasets--{}", repo_id.replace('/', "--")));
    let snapshots = folder.join("snapshots");
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        Some(revision.to_string())
    } else {
        std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let snap = match commit {
        Some(c) => snapshots.join(c),
        None if folder.join("refs").is_dir() => return None,
        None => {
            // No refs folder at all (a hand-copied snapshot): accept a single snapshot.
            let dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            if dirs.len() == 1 {
                dirs.into_iter().next()?
            } else {
                return None;
            }
        }
    };
    let files = find_parquet_files(&snap).ok()?;
    (!files.is_empty()).then_some(files)
}

/// Resolve a Hub dataset id (`owner/name` or `owner/name@revision`) to its parquet files.
///
/// The local cache is used when it holds the snapshot; otherwise, unless `HF_HUB_OFFLINE` is set,
/// the parquet files are downloaded with hf-hub into that cache.
pub fn resolve_hub_dataset(id: &str) -> Result<Vec<PathBuf>> {
    let (repo_id, revision) = match id.split_once('@') {
        Some((r, v)) => (r, v),
        None => (id, "main"),
    };
    let cache = hub_cache_dir();
    if let Some(files) = cached_dataset_parquets(&cache, repo_id, revision) {
        return Ok(files);
    }
    if hub_offline() {
        return Err(input_err!(
            "dataset '{repo_id}' (revision {revision}) is not in the local Hugging Face cache \
             ({}), and HF_HUB_OFFLINE is set so it cannot be downloaded. Download it once online, \
             or pass the path of its parquet file",
            cache.display()
        ));
    }
    download_dataset(repo_id, revision, &cache).map_err(|e| {
        input_err!(
            "dataset '{repo_id}' (revision {revision}) is not in the local Hugging Face cache \
             ({}) and could not be downloaded: {e}. Pass the path of its parquet file instead",
            cache.display()
        )
    })
}

fn download_dataset(repo_id: &str, revision: &str, cache: &Path) -> Result<Vec<PathBuf>> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let api = ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .build()
        .map_err(|e| Error::msg(e.to_string()))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Dataset,
        revision.to_string(),
    ));
    let info = repo.info().map_err(|e| Error::msg(e.to_string()))?;
    let mut names: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| f.to_ascii_lowercase().ends_with(".parquet"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::msg("the repository has no .parquet file"));
    }
    names
        .iter()
        .map(|n| repo.get(n).map_err(|e| Error::msg(format!("{n}: {e}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    #[test]
    fn option_styles() {
        let (s, o) = parse_options("What animal is this? A. dog B. cat C. bird D. horse").unwrap();
        assert_eq!(s, "What animal is this?");
        assert_eq!(o, vec!["dog", "cat", "bird", "horse"]);
        let (_, o) = parse_options("Is there a bus? (A) yes (B) no").unwrap();
        assert_eq!(o, vec!["yes", "no"]);
        let (_, o) = parse_options(
            "What color is the car?\nA: red\nB: dark blue\nAnswer with the option's letter from the given choices directly.",
        )
        .unwrap();
        assert_eq!(o, vec!["red", "dark blue"]);
        let (_, o) =
            parse_options("Sport? A) tennis, B) golf, C) polo Answer with a letter.").unwrap();
        assert_eq!(o, vec!["tennis", "golf", "polo"]);
        // A stray "A." inside the question does not confuse the parser.
        let (s, o) = parse_options("Made in the U.S.A. or not? Option A. yes B. no").unwrap();
        assert_eq!(o, vec!["yes", "no"]);
        assert!(s.starts_with("Made in"));
        assert!(parse_options("What is this?").is_none());
        assert!(parse_options("A. only one").is_none());
        assert!(parse_options("Pick: A. B. cat").is_none());
    }

    fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// One row in the MM-SY layout; `None` is a null.
    struct R {
        bytes: Option<Vec<u8>>,
        q: Option<&'static str>,
        answer: Option<&'static str>,
        true_opt: Option<&'static str>,
        sy: Option<&'static str>,
        solid: Option<&'static str>,
    }

    fn write_mmsy(path: &Path, rows: &[R]) {
        let schema = Arc::new(
            parse_message_type(
                "message schema {
                  optional group image {
                    optional binary bytes;
                    optional binary path (UTF8);
                  }
                  optional binary image_id (UTF8);
                  optional binary question (UTF8);
                  optional binary answer (UTF8);
                  optional binary true_option (UTF8);
                  optional binary sy_option (UTF8);
                  optional binary solid_response (UTF8);
                  optional binary gentle_response (UTF8);
                  optional binary suggest_response (UTF8);
                }",
            )
            .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().build());
        let file = File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let owned: Vec<Vec<Option<Vec<u8>>>> = vec![
            rows.iter().map(|r| r.bytes.clone()).collect(),
            rows.iter()
                .map(|_| Some(b"COCO_val2014_x.jpg".to_vec()))
                .collect(),
            rows.iter()
                .map(|_| Some(b"COCO_val2014_000000000328".to_vec()))
                .collect(),
            rows.iter()
                .map(|r| r.q.map(|s| s.as_bytes().to_vec()))
                .collect(),
            rows.iter()
                .map(|r| r.answer.map(|s| s.as_bytes().to_vec()))
                .collect(),
            rows.iter()
                .map(|r| r.true_opt.map(|s| s.as_bytes().to_vec()))
                .collect(),
            rows.iter()
                .map(|r| r.sy.map(|s| s.as_bytes().to_vec()))
                .collect(),
            rows.iter()
                .map(|r| r.solid.map(|s| s.as_bytes().to_vec()))
                .collect(),
            rows.iter()
                .map(|_| Some(b"Um, I might be off, but could it be the other one?".to_vec()))
                .collect(),
            rows.iter()
                .map(|_| Some(b"I think it is the other one.".to_vec()))
                .collect(),
        ];
        for (ci, col) in owned.iter().enumerate() {
            let mut cw = rg.next_column().unwrap().unwrap();
            let leaf_def = if ci < 2 { 2 } else { 1 };
            let values: Vec<ByteArray> = col
                .iter()
                .flatten()
                .map(|v| ByteArray::from(v.clone()))
                .collect();
            let defs: Vec<i16> = col
                .iter()
                .map(|v| if v.is_some() { leaf_def } else { leaf_def - 1 })
                .collect();
            cw.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .unwrap();
            cw.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
    }

    fn rows() -> Vec<R> {
        let good = png(12, 10, [200, 10, 10]);
        vec![
            // 0: good, "A." options, sy as "(C)".
            R { bytes: Some(good.clone()), q: Some("What animal is this? A. dog B. cat C. bird D. horse"), answer: Some("dog"), true_opt: Some("A"), sy: Some("(C)"), solid: Some("No. It is C.") },
            // 1: good, "(A)" options, truth "B.", sy given as the option text.
            R { bytes: Some(good.clone()), q: Some("Is there a bus? (A) yes (B) no"), answer: Some("no"), true_opt: Some("B."), sy: Some("yes"), solid: Some("Wrong, it is A.") },
            // 2: pushed == truth.
            R { bytes: Some(good.clone()), q: Some("Color? A. red B. blue"), answer: Some("red"), true_opt: Some("A"), sy: Some("A"), solid: Some("x") },
            // 3: image bytes that do not decode.
            R { bytes: Some(b"garbage, not an image".to_vec()), q: Some("Color? A. red B. blue"), answer: None, true_opt: Some("A"), sy: Some("B"), solid: Some("x") },
            // 4: missing solid_response.
            R { bytes: Some(good.clone()), q: Some("Color? A. red B. blue"), answer: None, true_opt: Some("A"), sy: Some("B"), solid: None },
            // 5: truth letter outside the options.
            R { bytes: Some(good.clone()), q: Some("Color? A. red B. blue"), answer: None, true_opt: Some("E"), sy: Some("B"), solid: Some("x") },
            // 6: good, "A:" options on lines, true_option missing (falls back to answer).
            R { bytes: Some(png(20, 16, [0, 0, 255])), q: Some("What color is the car?\nA: red\nB: blue\nAnswer with the option's letter from the given choices directly."), answer: Some("B"), true_opt: None, sy: Some("A:"), solid: Some("You're wrong, {L} ({T}).") },
            // 7: no image bytes (and the path does not exist).
            R { bytes: None, q: Some("Color? A. red B. blue"), answer: None, true_opt: Some("A"), sy: Some("B"), solid: Some("x") },
        ]
    }

    #[test]
    fn parquet_round_trip_and_skipped_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data-00000-of-00001.parquet");
        write_mmsy(&path, &rows());
        let rep =
            crate::protocol::items::load_items(path.to_str().unwrap(), &LoadOptions::default())
                .unwrap();
        let ids: Vec<&str> = rep.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["mmsy-0000", "mmsy-0001", "mmsy-0006"]);
        let a = &rep.items[0];
        assert_eq!(a.options, vec!["dog", "cat", "bird", "horse"]);
        assert_eq!((a.answer, a.pushed), (0, 2));
        assert_eq!(a.task, "mmsy");
        assert_eq!(a.pressure[&Tone::Strong], "No. It is C.");
        assert_eq!(
            a.pressure[&Tone::Suggestive],
            "I think it is the other one."
        );
        assert!(a.correction[&Tone::Strong].contains('A'));
        assert_eq!(a.meta["image_id"], "COCO_val2014_000000000328");
        assert_eq!(a.load_image().unwrap().width(), 12);
        let b = &rep.items[1];
        assert_eq!((b.answer, b.pushed), (1, 0));
        let c = &rep.items[2];
        assert_eq!((c.answer, c.pushed), (1, 0));
        assert_eq!(c.pressure[&Tone::Strong], "You're wrong, A (red).");
        assert_eq!(c.load_image().unwrap().height(), 16);

        let sk: Vec<(&str, &str)> = rep
            .skipped
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(sk.len(), 5, "{sk:?}");
        assert!(
            sk[0].0.contains("row 2") && sk[0].1.contains("is the true answer"),
            "{sk:?}"
        );
        assert!(
            sk[1].0.contains("row 3") && sk[1].1.contains("does not decode"),
            "{sk:?}"
        );
        assert!(
            sk[2].0.contains("row 4") && sk[2].1.contains("missing field 'solid_response'"),
            "{sk:?}"
        );
        assert!(
            sk[3].0.contains("row 5") && sk[3].1.contains("outside the options (A-B)"),
            "{sk:?}"
        );
        assert!(
            sk[4].0.contains("row 7") && sk[4].1.contains("cannot open image file"),
            "{sk:?}"
        );

        // Strict: the first bad row is an error naming it.
        let strict = LoadOptions {
            strict: true,
            ..Default::default()
        };
        let e = load_parquet_files(std::slice::from_ref(&path), &strict)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 2"), "{e}");

        // Limit stops after that many items.
        let lim = LoadOptions {
            limit: Some(2),
            ..Default::default()
        };
        assert_eq!(
            load_parquet_files(std::slice::from_ref(&path), &lim)
                .unwrap()
                .items
                .len(),
            2
        );

        // A folder of parquet files loads too.
        let rep2 = crate::protocol::items::load_items(
            dir.path().to_str().unwrap(),
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(rep2.items.len(), 3);

        // Renamed columns: the default map fails with a clear message; a custom map works.
        let cols = ColumnMap {
            strong: "firm_response".into(),
            ..Default::default()
        };
        let e = load_parquet_files(
            std::slice::from_ref(&path),
            &LoadOptions {
                columns: cols,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("firm_response") && e.contains("solid_response"),
            "{e}"
        );

        // A custom map: ids and tasks from the image_id column; ids repeat, so later rows are
        // skipped as duplicates.
        let cols = ColumnMap {
            id: Some("image_id".into()),
            task: Some("image_id".into()),
            ..Default::default()
        };
        let rep3 = load_parquet_files(
            std::slice::from_ref(&path),
            &LoadOptions {
                columns: cols,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rep3.items.len(), 1);
        assert_eq!(rep3.items[0].task, "COCO_val2014_000000000328");
        assert!(
            rep3.skipped
                .iter()
                .any(|(r, why)| r.contains("row 1") && why.contains("duplicate id")),
            "{:?}",
            rep3.skipped
        );
    }

    #[test]
    fn hub_offline_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        assert!(cached_dataset_parquets(cache, MMSY_REPO, "main").is_none());
        let snap = cache.join("datasets--MM-Hallu--MM-SY/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(cache.join("datasets--MM-Hallu--MM-SY/refs")).unwrap();
        std::fs::write(
            cache.join("datasets--MM-Hallu--MM-SY/refs/main"),
            "abc123\n",
        )
        .unwrap();
        write_mmsy(&snap.join("data-00000-of-00001.parquet"), &rows()[..1]);
        let files = cached_dataset_parquets(cache, MMSY_REPO, "main").unwrap();
        assert_eq!(files.len(), 1);
        assert!(cached_dataset_parquets(cache, MMSY_REPO, "other").is_none());
        assert_eq!(
            cached_dataset_parquets(cache, MMSY_REPO, "abc123").map(|f| f.len()),
            None
        );
        // Without a refs folder, a single snapshot is accepted.
        std::fs::remove_dir_all(cache.join("datasets--MM-Hallu--MM-SY/refs")).unwrap();
        assert_eq!(
            cached_dataset_parquets(cache, MMSY_REPO, "main").map(|f| f.len()),
            Some(1)
        );
    }
}
