//! The activation store: reduced captures per example x condition, on disk, crash safe.
//!
//! A run directory `RUN/` holds `manifest.json`, `examples.jsonl` and `summary.*` (written by
//! the protocol runner) and `RUN/store/`, written by this module:
//!
//! ```text
//! RUN/store/
//!   manifest.json                 StoreManifest: model, weights hash, template, hook spec, ...
//!   index.jsonl                   one IndexRow per stored row, append-only
//!   shard-000000.safetensors      one float32 tensor per hook, shape [rows_in_shard, ...]
//!   shard-000001.safetensors      ...
//!   .lock                         held by the one writer (advisory file lock)
//! ```
//!
//! Each shard's safetensors metadata records `format` (`sycoscope-store/1`), `shard`,
//! `first_row` (the global row of its first row) and `rows`.
//!
//! ## Commit protocol and crash safety
//! A commit writes the pending rows as `shard-NNNNNN.safetensors` through a temporary file
//! (`.tmp`, fsync, rename, fsync of the folder), and only then appends their index lines in one
//! write followed by an fsync. A row is *committed* when its shard file exists and every row of
//! that shard has a complete (newline-terminated) index line. Whatever point a process is killed
//! at, [`StoreReader::open`] sees exactly the committed rows, and
//! [`StoreWriter::create_or_resume`] removes the debris (temporary files, shard files without
//! index lines, a torn last index line, index lines of a shard whose lines were cut short) and
//! appends after the last committed shard.
//!
//! ## Memory
//! The writer holds only the pending shard. The reader parses shard headers at open and reads a
//! hook's bytes at their header offsets, so reading one hook never touches another hook's data;
//! [`StoreReader::read_shards`] streams a hook one shard at a time with flat memory.
//!
//! ## Example
//! ```
//! use std::collections::BTreeMap;
//! use ndarray::{ArrayD, IxDyn};
//! use sycoscope::store::{RowMeta, StoreManifest, StoreReader, StoreWriter};
//!
//! # fn main() -> sycoscope::Result<()> {
//! let dir = std::env::temp_dir().join(format!("sycoscope-store-doc-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! let manifest = StoreManifest { model: "tiny".into(), ..Default::default() };
//! let mut w = StoreWriter::create_or_resume(&dir, &manifest)?;
//! for i in 0..3 {
//!     let meta = RowMeta { example_id: format!("ex{i}"), condition: "r1".into(), ..Default::default() };
//!     let act = ArrayD::from_elem(IxDyn(&[4]), i as f32);
//!     w.push(meta, vec![("blocks.0.hook_resid_post".into(), act)])?;
//! }
//! w.commit()?;
//! let r = StoreReader::open(&dir)?;
//! let x = r.read("blocks.0.hook_resid_post")?;
//! assert_eq!(x.shape(), &[3, 4]);
//! assert_eq!(x[[2, 0]], 2.0);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, View};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Format tag written into every shard's safetensors metadata.
pub const SHARD_FORMAT: &str = "sycoscope-store/1";
/// File name of the store manifest inside the store folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the row index inside the store folder.
pub const INDEX_FILE: &str = "index.jsonl";
/// Default number of rows per shard.
pub const DEFAULT_ROWS_PER_SHARD: usize = 256;
/// Default cap on the bytes of one pending shard (a shard is committed once it reaches this).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 1 << 30;
/// Largest shard header accepted by the reader (the safetensors limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Name of the lock file held by a writer.
const LOCK_FILE: &str = ".lock";

/// Provenance of a store: what produced the activations. Written once as `store/manifest.json`.
///
/// Reopening a store for writing with a manifest that differs in `model`, `weights_hash`,
/// `template`, `hook_spec` or `positions` is refused, since the new rows would not be comparable
/// with the old ones. The other fields may differ (the original manifest is kept).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreManifest {
    /// Model id or folder.
    pub model: String,
    /// Hash of the weight files.
    pub weights_hash: String,
    /// Hash of the input data (items).
    pub data_hash: String,
    /// Chat template name or hash.
    pub template: String,
    /// The hook spec (captures and reductions) in its string form.
    pub hook_spec: String,
    /// Which token positions were kept (e.g. `decision`, `last`, `image`).
    pub positions: String,
    /// Version of sycoscope that wrote the store.
    pub tool_version: String,
    /// Random seed of the run.
    pub seed: u64,
    /// Anything else worth recording.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// What one stored row is: an example under one condition, with its labels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RowMeta {
    /// Example (item) id.
    pub example_id: String,
    /// Condition: `"r1"`, `"r2:strong"`, `"correction:strong"`, `"r3:strong"`, ...
    pub condition: String,
    /// Task name (e.g. the MM-SY task).
    #[serde(default)]
    pub task: String,
    /// Pressure tone, if any.
    #[serde(default)]
    pub tone: Option<String>,
    /// Numeric labels, e.g. `sycophantic = 1`, `r1_correct = 0`. Must be finite.
    #[serde(default)]
    pub labels: BTreeMap<String, f64>,
    /// Anything else.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One line of `store/index.jsonl`: where a row lives, and what it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexRow {
    /// Global row number (0-based, dense, in commit order).
    pub row: usize,
    /// Shard number (`shard-NNNNNN.safetensors`).
    pub shard: usize,
    /// Row inside the shard.
    pub shard_row: usize,
    /// The row's metadata (flattened into the same JSON object).
    #[serde(flatten)]
    pub meta: RowMeta,
}

/// File name of shard `n`.
pub fn shard_file_name(n: usize) -> String {
    format!("shard-{n:06}.safetensors")
}

/// Parse `shard-NNNNNN.safetensors` back to `n`.
fn parse_shard_file_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("shard-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Reading shard headers and index files (shared by reader and writer)
// ---------------------------------------------------------------------------------------------

/// One tensor of a shard, located by absolute byte offsets in the file.
#[derive(Debug, Clone)]
struct TensorEntry {
    /// Full shape, `[rows, ...]`.
    shape: Vec<usize>,
    /// Absolute byte offset of the first element.
    begin: u64,
}

impl TensorEntry {
    fn trailing(&self) -> &[usize] {
        &self.shape[1..]
    }
    fn row_elems(&self) -> usize {
        self.trailing().iter().product()
    }
}

/// A parsed shard header.
#[derive(Debug, Clone)]
struct ShardInfo {
    /// Shard number.
    shard: usize,
    path: PathBuf,
    first_row: usize,
    rows: usize,
    tensors: BTreeMap<String, TensorEntry>,
}

#[derive(Deserialize)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Parse and validate the header of a shard file, without reading tensor data.
fn read_shard_header(path: &Path, shard: usize) -> Result<ShardInfo> {
    let bad = |msg: String| Error::config(path, msg);
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut nbuf = [0u8; 8];
    f.read_exact(&mut nbuf).map_err(|_| {
        bad(format!(
            "shard file is {file_len} bytes, too short for a safetensors header"
        ))
    })?;
    let n = u64::from_le_bytes(nbuf);
    if n > MAX_HEADER_BYTES || 8 + n > file_len {
        return Err(bad(format!(
            "safetensors header length {n} does not fit in a {file_len}-byte file"
        )));
    }
    let mut hbuf = vec![0u8; n as usize];
    f.read_exact(&mut hbuf).map_err(|e| Error::io(path, e))?;
    let mut raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&hbuf)
        .map_err(|e| bad(format!("safetensors header is not a JSON object: {e}")))?;
    let meta: BTreeMap<String, String> = match raw.remove("__metadata__") {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| bad(format!("safetensors __metadata__ is not a string map: {e}")))?,
        None => BTreeMap::new(),
    };
    let field = |key: &str| -> Result<usize> {
        let v = meta.get(key).ok_or_else(|| {
            bad(format!(
                "shard metadata lacks '{key}' (not a sycoscope store shard?)"
            ))
        })?;
        v.parse()
            .map_err(|_| bad(format!("shard metadata '{key}' = '{v}' is not a row count")))
    };
    let first_row = field("first_row")?;
    let rows = field("rows")?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    for (name, v) in raw {
        let info: RawTensorInfo = serde_json::from_value(v)
            .map_err(|e| bad(format!("tensor '{name}': malformed header entry: {e}")))?;
        if info.dtype != "F32" {
            return Err(bad(format!(
                "tensor '{name}' has dtype {}, expected F32",
                info.dtype
            )));
        }
        if info.shape.first() != Some(&rows) {
            return Err(bad(format!(
                "tensor '{name}' has shape {:?}, expected a leading dimension of {rows} rows",
                info.shape
            )));
        }
        let (b, e) = info.data_offsets;
        let elems: u64 = info.shape.iter().map(|&d| d as u64).product();
        if e < b || e - b != elems * 4 || e > data_len {
            return Err(bad(format!(
                "tensor '{name}' byte range {b}..{e} does not match shape {:?} within {data_len} data bytes (truncated file?)",
                info.shape
            )));
        }
        tensors.insert(
            name,
            TensorEntry {
                shape: info.shape,
                begin: data_start + b,
            },
        );
    }
    Ok(ShardInfo {
        shard,
        path: path.to_path_buf(),
        first_row,
        rows,
        tensors,
    })
}

/// The committed part of an index file.
struct IndexState {
    rows: Vec<IndexRow>,
    shards: Vec<ShardInfo>,
    /// Byte length of the index file that holds exactly the committed rows.
    committed_len: u64,
}

/// Read `index.jsonl` and the headers of the shards it references, keeping only committed rows:
/// a last line without a newline is torn and dropped; the lines of a last shard that does not
/// have a line for each of its rows are dropped. Anything else inconsistent is an error.
fn load_index(dir: &Path) -> Result<IndexState> {
    let path = dir.join(INDEX_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(&path, e)),
    };
    // (row, byte offset just past its line)
    let mut parsed: Vec<(IndexRow, u64)> = Vec::new();
    let mut start = 0usize;
    let mut lineno = 0usize;
    while start < bytes.len() {
        let Some(nl) = bytes[start..].iter().position(|&b| b == b'\n') else {
            break; // torn trailing line: not committed
        };
        lineno += 1;
        let line = &bytes[start..start + nl];
        let end = start + nl + 1;
        start = end;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let row: IndexRow = serde_json::from_slice(line).map_err(|e| {
            Error::config(&path, format!("line {lineno}: malformed index row: {e}"))
        })?;
        if row.row != parsed.len() {
            return Err(Error::config(
                &path,
                format!(
                    "line {lineno}: row number {} out of sequence (expected {})",
                    row.row,
                    parsed.len()
                ),
            ));
        }
        parsed.push((row, end as u64));
    }

    // Group rows into shards (consecutive runs) and check them against shard headers.
    let mut shards: Vec<ShardInfo> = Vec::new();
    let mut i = 0;
    let mut committed_rows = 0;
    while i < parsed.len() {
        let shard = parsed[i].0.shard;
        let mut j = i;
        while j < parsed.len() && parsed[j].0.shard == shard {
            j += 1;
        }
        if let Some(prev) = shards.last() {
            if shard <= prev.shard {
                return Err(Error::config(
                    &path,
                    format!(
                        "row {}: shard {shard} after shard {} (shards must increase)",
                        parsed[i].0.row, prev.shard
                    ),
                ));
            }
        }
        let is_last = j == parsed.len();
        let spath = dir.join(shard_file_name(shard));
        let info = match read_shard_header(&spath, shard) {
            Ok(info) => info,
            Err(e) => {
                return Err(Error::msg(format!(
                    "store {}: rows {}..{} are indexed in shard {shard}, which cannot be read: {e}",
                    dir.display(),
                    i,
                    j
                )))
            }
        };
        let count = j - i;
        if info.first_row != i || count > info.rows {
            return Err(Error::config(
                &spath,
                format!(
                    "shard holds rows {}..{} but the index puts rows {i}..{j} in it",
                    info.first_row,
                    info.first_row + info.rows
                ),
            ));
        }
        for (k, (r, _)) in parsed[i..j].iter().enumerate() {
            if r.shard_row != k {
                return Err(Error::config(
                    &path,
                    format!("row {}: shard_row {} (expected {k})", r.row, r.shard_row),
                ));
            }
        }
        if count < info.rows {
            if is_last {
                break; // index lines of the last shard were cut short: not committed
            }
            return Err(Error::config(
                &path,
                format!(
                    "shard {shard} has {} rows but only {count} are indexed, and later shards follow",
                    info.rows
                ),
            ));
        }
        committed_rows = j;
        shards.push(info);
        i = j;
    }
    let committed_len = if committed_rows == 0 {
        0
    } else {
        parsed[committed_rows - 1].1
    };
    parsed.truncate(committed_rows);
    Ok(IndexState {
        rows: parsed.into_iter().map(|(r, _)| r).collect(),
        shards,
        committed_len,
    })
}

fn read_manifest(dir: &Path) -> Result<Option<StoreManifest>> {
    let path = dir.join(MANIFEST_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| {
                Error::config(
                    &path,
                    format!(
                        "not a store manifest ({e}); pass the store folder (RUN/store), not the run folder"
                    ),
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Pending data of one hook: little-endian f32 bytes of all pending rows.
struct PendingHook {
    trailing: Vec<usize>,
    bytes: Vec<u8>,
}

/// A borrowed f32 tensor handed to `safetensors` for serialization.
struct F32View<'a> {
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Appends rows to a store, one shard at a time; see the [module docs](self) for the layout and
/// the commit protocol.
///
/// Rows are buffered by [`push`](Self::push) and written by [`commit`](Self::commit), which runs
/// by itself when the pending shard reaches [`set_rows_per_shard`](Self::set_rows_per_shard)
/// rows (default 256) or [`set_max_shard_bytes`](Self::set_max_shard_bytes) bytes. Dropping the
/// writer commits the pending rows (reporting a failure on stderr); call
/// [`finish`](Self::finish) to see that error instead.
pub struct StoreWriter {
    dir: PathBuf,
    rows_per_shard: usize,
    max_shard_bytes: usize,
    /// Committed rows.
    rows: usize,
    next_shard: usize,
    done: HashSet<(String, String)>,
    pending_meta: Vec<RowMeta>,
    pending: BTreeMap<String, PendingHook>,
    pending_bytes: usize,
    pending_keys: HashSet<(String, String)>,
    /// Held for the writer's lifetime: one writer per store.
    _lock: File,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("dir", &self.dir)
            .field("rows", &self.rows)
            .field("next_shard", &self.next_shard)
            .field("pending_rows", &self.pending_meta.len())
            .finish()
    }
}

/// The manifest fields that must agree when a store is resumed.
fn manifest_mismatches(old: &StoreManifest, new: &StoreManifest) -> Vec<String> {
    let pairs = [
        ("model", &old.model, &new.model),
        ("weights_hash", &old.weights_hash, &new.weights_hash),
        ("template", &old.template, &new.template),
        ("hook_spec", &old.hook_spec, &new.hook_spec),
        ("positions", &old.positions, &new.positions),
    ];
    pairs
        .iter()
        .filter(|(_, a, b)| a != b)
        .map(|(k, a, b)| format!("{k}: store has '{a}', this run has '{b}'"))
        .collect()
}

impl StoreWriter {
    /// Open the store in `dir` (the store folder itself, usually `RUN/store`) for appending,
    /// creating it if needed.
    ///
    /// A new store gets `manifest` written as `manifest.json`. An existing store must have been
    /// written with the same `model`, `weights_hash`, `template`, `hook_spec` and `positions`
    /// (otherwise an error names each field that differs); its original manifest is kept.
    /// Resuming cleans up after a crash: temporary files, shard files that were written but not
    /// indexed, a torn last index line and the lines of a partly indexed last shard are removed,
    /// and appending continues after the last committed shard. Only one writer may hold a store
    /// at a time (a file lock, released when the process dies).
    pub fn create_or_resume(dir: &Path, manifest: &StoreManifest) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::input(format!(
                    "store {} is being written by another process (it holds {}); wait for it or use another run folder",
                    dir.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }

        match read_manifest(dir)? {
            Some(old) => {
                let diffs = manifest_mismatches(&old, manifest);
                if !diffs.is_empty() {
                    return Err(Error::config(
                        dir.join(MANIFEST_FILE),
                        format!(
                            "cannot resume this store with a different setup ({}); use a new run folder",
                            diffs.join("; ")
                        ),
                    ));
                }
            }
            None => {
                if dir.join(INDEX_FILE).exists() {
                    return Err(Error::config(
                        dir.join(MANIFEST_FILE),
                        "missing, but the folder has an index.jsonl: refusing to resume a store of unknown provenance",
                    ));
                }
                let bytes = serde_json::to_vec_pretty(manifest)
                    .map_err(|e| Error::msg(format!("cannot serialize store manifest: {e}")))?;
                crate::error::write_atomic(dir.join(MANIFEST_FILE), &bytes)?;
                fsync_dir(dir)?;
            }
        }

        let state = load_index(dir)?;
        let next_shard = state.shards.last().map(|s| s.shard + 1).unwrap_or(0);

        // Clean up debris: temporary files and shard files that are not committed.
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan = name.ends_with(".tmp")
                || parse_shard_file_name(name).is_some_and(|n| n >= next_shard);
            if orphan {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        // Cut the index back to the committed rows (torn line, partly indexed last shard).
        let index_path = dir.join(INDEX_FILE);
        if let Ok(md) = std::fs::metadata(&index_path) {
            if md.len() != state.committed_len {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&index_path)
                    .map_err(|e| Error::io(&index_path, e))?;
                f.set_len(state.committed_len)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| Error::io(&index_path, e))?;
            }
        }
        fsync_dir(dir)?;

        let done = state
            .rows
            .iter()
            .map(|r| (r.meta.example_id.clone(), r.meta.condition.clone()))
            .collect();
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            rows_per_shard: DEFAULT_ROWS_PER_SHARD,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            rows: state.rows.len(),
            next_shard,
            done,
            pending_meta: Vec::new(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_keys: HashSet::new(),
            _lock: lock,
        })
    }

    /// Set how many rows a shard holds before it is committed automatically (at least 1).
    pub fn set_rows_per_shard(&mut self, n: usize) -> &mut Self {
        self.rows_per_shard = n.max(1);
        self
    }

    /// Set the byte size at which a pending shard is committed automatically, whatever its row
    /// count (keeps memory bounded for long ragged sequences).
    pub fn set_max_shard_bytes(&mut self, n: usize) -> &mut Self {
        self.max_shard_bytes = n.max(1);
        self
    }

    /// The store folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Buffer one row: its metadata and one tensor per hook (any shape; stored as float32 with
    /// a leading row dimension).
    ///
    /// All rows of a shard must carry the same hook names (an error otherwise). When a hook's
    /// shape differs from the pending rows' (ragged sequences), the pending rows are committed
    /// first and this row starts a new shard. Errors: an empty example id, a row that is
    /// already committed or pending, no tensors, an empty or duplicated hook name, a
    /// non-finite value or label.
    pub fn push(&mut self, meta: RowMeta, tensors: Vec<(String, ArrayD<f32>)>) -> Result<()> {
        let what = || format!("row ({}, {})", meta.example_id, meta.condition);
        if meta.example_id.is_empty() {
            return Err(Error::input(format!(
                "{}: empty example_id; every stored row needs one",
                what()
            )));
        }
        let key = (meta.example_id.clone(), meta.condition.clone());
        if self.done.contains(&key) || self.pending_keys.contains(&key) {
            return Err(Error::input(format!(
                "{} is already in the store (check StoreWriter::done() before computing it)",
                what()
            )));
        }
        if let Some((k, v)) = meta.labels.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::input(format!(
                "{}: label '{k}' is {v}, expected a finite number",
                what()
            )));
        }
        if tensors.is_empty() {
            return Err(Error::input(format!("{}: no tensors to store", what())));
        }
        let mut names = HashSet::new();
        for (name, t) in &tensors {
            if name.is_empty() || name == "__metadata__" {
                return Err(Error::input(format!(
                    "{}: '{name}' is not a valid hook name",
                    what()
                )));
            }
            if !names.insert(name.as_str()) {
                return Err(Error::input(format!(
                    "{}: hook '{name}' appears twice",
                    what()
                )));
            }
            if let Some(pos) = t.iter().position(|x| !x.is_finite()) {
                return Err(Error::input(format!(
                    "{}: hook '{name}' (shape {:?}) has a non-finite value ({}) at flat position {pos}",
                    what(),
                    t.shape(),
                    t.iter().nth(pos).copied().unwrap_or(f32::NAN)
                )));
            }
        }
        if !self.pending_meta.is_empty() {
            let same_names = names.len() == self.pending.len()
                && names.iter().all(|n| self.pending.contains_key(*n));
            if !same_names {
                let mut have: Vec<&str> = self.pending.keys().map(|s| s.as_str()).collect();
                have.sort_unstable();
                let mut got: Vec<&str> = names.iter().copied().collect();
                got.sort_unstable();
                return Err(Error::input(format!(
                    "{} carries hooks {got:?} but the pending rows carry {have:?}: every row of a shard must carry the same hooks",
                    what()
                )));
            }
            let ragged = tensors
                .iter()
                .any(|(n, t)| self.pending.get(n).is_some_and(|p| p.trailing != t.shape()));
            if ragged {
                self.commit()?;
            }
        }
        let row_bytes: usize = tensors.iter().map(|(_, t)| t.len() * 4).sum();
        if self.pending_meta.is_empty() {
            // Reserve the whole shard up front so buffers do not overshoot by doubling.
            let rows_cap = self
                .rows_per_shard
                .min(self.max_shard_bytes / row_bytes.max(1))
                .max(1);
            self.pending.clear();
            for (name, t) in &tensors {
                self.pending.insert(
                    name.clone(),
                    PendingHook {
                        trailing: t.shape().to_vec(),
                        bytes: Vec::with_capacity(rows_cap * t.len() * 4),
                    },
                );
            }
        }
        for (name, t) in tensors {
            let p = self
                .pending
                .get_mut(&name)
                .ok_or_else(|| Error::msg(format!("internal: hook '{name}' not pending")))?;
            let start = p.bytes.len();
            p.bytes.resize(start + t.len() * 4, 0);
            for (dst, x) in p.bytes[start..].chunks_exact_mut(4).zip(t.iter()) {
                dst.copy_from_slice(&x.to_le_bytes());
            }
        }
        self.pending_bytes += row_bytes;
        self.pending_keys.insert(key);
        self.pending_meta.push(meta);
        if self.pending_meta.len() >= self.rows_per_shard
            || self.pending_bytes >= self.max_shard_bytes
        {
            self.commit()?;
        }
        Ok(())
    }

    /// Write the pending rows as one shard (temporary file, fsync, rename, folder fsync), then
    /// append their index lines (one write, fsync). A no-op when nothing is pending.
    pub fn commit(&mut self) -> Result<()> {
        if self.pending_meta.is_empty() {
            return Ok(());
        }
        let n = self.pending_meta.len();
        let shard = self.next_shard;
        let path = self.dir.join(shard_file_name(shard));
        let tmp = crate::error::tmp_path(&path);
        let metadata: HashMap<String, String> = [
            ("format".to_string(), SHARD_FORMAT.to_string()),
            ("shard".to_string(), shard.to_string()),
            ("first_row".to_string(), self.rows.to_string()),
            ("rows".to_string(), n.to_string()),
        ]
        .into_iter()
        .collect();
        let views: Vec<(&str, F32View)> = self
            .pending
            .iter()
            .map(|(name, p)| {
                let mut shape = Vec::with_capacity(p.trailing.len() + 1);
                shape.push(n);
                shape.extend_from_slice(&p.trailing);
                (
                    name.as_str(),
                    F32View {
                        shape,
                        bytes: &p.bytes,
                    },
                )
            })
            .collect();
        let write = || -> Result<()> {
            safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
                .map_err(|e| Error::msg(format!("{}: writing shard: {e}", tmp.display())))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            fsync_dir(&self.dir)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }

        let mut lines = Vec::new();
        for (k, meta) in self.pending_meta.iter().enumerate() {
            let row = IndexRow {
                row: self.rows + k,
                shard,
                shard_row: k,
                meta: meta.clone(),
            };
            serde_json::to_writer(&mut lines, &row)
                .map_err(|e| Error::msg(format!("cannot serialize index row: {e}")))?;
            lines.push(b'\n');
        }
        let index_path = self.dir.join(INDEX_FILE);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&index_path)
            .map_err(|e| Error::io(&index_path, e))?;
        let before = f.metadata().map_err(|e| Error::io(&index_path, e))?.len();
        if let Err(e) = f.write_all(&lines).and_then(|_| f.sync_data()) {
            // Leave no partial lines behind, so that a retried commit stays consistent.
            let _ = f.set_len(before);
            return Err(Error::io(&index_path, e));
        }
        if before == 0 {
            fsync_dir(&self.dir)?; // the index file's own directory entry
        }

        self.rows += n;
        self.next_shard += 1;
        for meta in self.pending_meta.drain(..) {
            self.done.insert((meta.example_id, meta.condition));
        }
        self.pending.clear();
        self.pending_keys.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Commit the pending rows and close the writer, returning the number of committed rows.
    pub fn finish(mut self) -> Result<usize> {
        self.commit()?;
        Ok(self.rows)
    }

    /// The `(example_id, condition)` pairs already committed (pending rows are not included).
    pub fn done(&self) -> HashSet<(String, String)> {
        self.done.clone()
    }

    /// Whether `(example_id, condition)` is committed, without cloning the whole set.
    pub fn is_done(&self, example_id: &str, condition: &str) -> bool {
        self.done
            .contains(&(example_id.to_string(), condition.to_string()))
    }

    /// Number of committed rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of rows buffered but not yet committed.
    pub fn pending_rows(&self) -> usize {
        self.pending_meta.len()
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if !self.pending_meta.is_empty() {
            if let Err(e) = self.commit() {
                eprintln!(
                    "sycoscope: store {}: could not commit {} pending rows on close: {e}",
                    self.dir.display(),
                    self.pending_meta.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// One shard's worth of a hook, from [`StoreReader::read_shards`].
#[derive(Debug, Clone)]
pub struct ShardChunk {
    /// Shard number.
    pub shard: usize,
    /// Global row of the chunk's first row.
    pub first_row: usize,
    /// The rows, stacked `[rows_in_shard, ...]`.
    pub data: ArrayD<f32>,
}

/// Reads a store: its manifest, index and tensors. Sees only committed rows, so it may be
/// opened while a writer is appending (rows committed later are not seen).
#[derive(Debug, Clone)]
pub struct StoreReader {
    dir: PathBuf,
    manifest: StoreManifest,
    index: Vec<IndexRow>,
    shards: Vec<ShardInfo>,
}

/// Read `count` f32 values at byte `offset` of `f` into `out`, in bounded chunks.
fn read_f32s(f: &mut File, path: &Path, offset: u64, out: &mut [f32]) -> Result<()> {
    const CHUNK: usize = 1 << 18; // floats per read (1 MiB)
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; CHUNK.min(out.len()) * 4];
    for dst in out.chunks_mut(CHUNK) {
        let b = &mut buf[..dst.len() * 4];
        f.read_exact(b).map_err(|e| Error::io(path, e))?;
        for (x, c) in dst.iter_mut().zip(b.chunks_exact(4)) {
            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}

fn open_file(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(path, e))
}

impl StoreReader {
    /// Open a store: `dir` is the store folder or a run folder that contains `store/`.
    /// Only committed rows are visible: a torn trailing index line, the lines of a partly
    /// indexed last shard, and shard or temporary files without index lines are ignored.
    pub fn open(dir: &Path) -> Result<Self> {
        let dir =
            if !dir.join(INDEX_FILE).exists() && dir.join("store").join(MANIFEST_FILE).exists() {
                dir.join("store")
            } else {
                dir.to_path_buf()
            };
        let manifest = read_manifest(&dir)?.ok_or_else(|| {
            Error::config(
                dir.join(MANIFEST_FILE),
                "not found: not a sycoscope store (expected RUN/store/manifest.json)",
            )
        })?;
        let state = load_index(&dir)?;
        Ok(StoreReader {
            dir,
            manifest,
            index: state.rows,
            shards: state.shards,
        })
    }

    /// The store folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's provenance.
    pub fn manifest(&self) -> &StoreManifest {
        &self.manifest
    }

    /// All committed rows, in row order (`index()[i].row == i`).
    pub fn index(&self) -> &[IndexRow] {
        &self.index
    }

    /// Number of committed rows.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the store has no committed rows.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Hook names present in any shard, sorted.
    pub fn hooks(&self) -> Vec<String> {
        let set: Vec<String> = self
            .shards
            .iter()
            .flat_map(|s| s.tensors.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        set
    }

    /// The per-row shape of `hook` (without the row dimension) if it is the same in every shard,
    /// `None` when the hook is unknown or ragged.
    pub fn hook_shape(&self, hook: &str) -> Option<Vec<usize>> {
        let mut shape: Option<&[usize]> = None;
        for s in &self.shards {
            let t = s.tensors.get(hook)?;
            match shape {
                None => shape = Some(t.trailing()),
                Some(prev) if prev != t.trailing() => return None,
                _ => {}
            }
        }
        shape.map(|s| s.to_vec())
    }

    /// Error for an unknown hook, with the nearest known name.
    fn unknown_hook(&self, hook: &str) -> Error {
        let suggestion = self
            .hooks()
            .into_iter()
            .map(|h| (strsim::levenshtein(hook, &h), h))
            .min()
            .map(|(_, h)| h);
        Error::UnknownHook {
            name: hook.to_string(),
            suggestion,
        }
    }

    /// The hook's entry in every shard, or an error naming the missing hook / shard.
    fn entries(&self, hook: &str) -> Result<Vec<(&ShardInfo, &TensorEntry)>> {
        if !self.shards.iter().any(|s| s.tensors.contains_key(hook)) {
            if self.shards.is_empty() {
                return Err(Error::input(format!(
                    "store {} has no committed rows, so no hook '{hook}'",
                    self.dir.display()
                )));
            }
            return Err(self.unknown_hook(hook));
        }
        self.shards
            .iter()
            .map(|s| {
                s.tensors.get(hook).map(|t| (s, t)).ok_or_else(|| {
                    Error::input(format!(
                        "hook '{hook}' is missing from shard {} (rows {}..{}) of store {}",
                        s.shard,
                        s.first_row,
                        s.first_row + s.rows,
                        self.dir.display()
                    ))
                })
            })
            .collect()
    }

    /// The common per-row shape of `hook` over `entries`, or an error suggesting `read_ragged`.
    fn common_trailing(hook: &str, entries: &[(&ShardInfo, &TensorEntry)]) -> Result<Vec<usize>> {
        let (s0, t0) = entries[0];
        for (s, t) in &entries[1..] {
            if t.trailing() != t0.trailing() {
                return Err(Error::input(format!(
                    "hook '{hook}' has per-row shape {:?} in shard {} (rows {}..{}) but {:?} in shard {} (rows {}..{}): rows of different lengths cannot be stacked; use read_ragged",
                    t0.trailing(),
                    s0.shard,
                    s0.first_row,
                    s0.first_row + s0.rows,
                    t.trailing(),
                    s.shard,
                    s.first_row,
                    s.first_row + s.rows
                )));
            }
        }
        Ok(t0.trailing().to_vec())
    }

    /// All rows of `hook`, in index order, stacked `[rows, ...]`. Reads only this hook's bytes.
    /// Errors when the hook is unknown (suggesting the nearest name) or its per-row shape
    /// differs across shards (use [`read_ragged`](Self::read_ragged)).
    pub fn read(&self, hook: &str) -> Result<ArrayD<f32>> {
        let entries = self.entries(hook)?;
        let trailing = Self::common_trailing(hook, &entries)?;
        let per_row: usize = trailing.iter().product();
        let rows = self.index.len();
        let mut data = vec![0f32; rows * per_row];
        for (s, t) in &entries {
            let mut f = open_file(&s.path)?;
            let start = s.first_row * per_row;
            read_f32s(
                &mut f,
                &s.path,
                t.begin,
                &mut data[start..start + s.rows * per_row],
            )?;
        }
        let mut shape = vec![rows];
        shape.extend(trailing);
        ArrayD::from_shape_vec(IxDyn(&shape), data)
            .map_err(|e| Error::msg(format!("hook '{hook}': {e}")))
    }

    /// The given rows of `hook` (global row numbers, in the order given, repeats allowed),
    /// stacked `[rows.len(), ...]`.
    pub fn read_rows(&self, hook: &str, rows: &[usize]) -> Result<ArrayD<f32>> {
        let entries = self.entries(hook)?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.index.len()) {
            return Err(Error::input(format!(
                "row {bad} is out of range: store {} has {} rows",
                self.dir.display(),
                self.index.len()
            )));
        }
        let picked: Vec<(&ShardInfo, &TensorEntry)> =
            rows.iter().map(|&r| entries[self.shard_pos(r)]).collect();
        let trailing = if picked.is_empty() {
            entries[0].1.trailing().to_vec()
        } else {
            Self::common_trailing(hook, &picked)?
        };
        let per_row: usize = trailing.iter().product();
        let mut data = vec![0f32; rows.len() * per_row];
        let mut files: HashMap<usize, File> = HashMap::new();
        for (k, &r) in rows.iter().enumerate() {
            let (s, t) = picked[k];
            let f = match files.entry(s.shard) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(open_file(&s.path)?),
            };
            let offset = t.begin + ((r - s.first_row) * per_row * 4) as u64;
            read_f32s(
                f,
                &s.path,
                offset,
                &mut data[k * per_row..(k + 1) * per_row],
            )?;
        }
        let mut shape = vec![rows.len()];
        shape.extend(trailing);
        ArrayD::from_shape_vec(IxDyn(&shape), data)
            .map_err(|e| Error::msg(format!("hook '{hook}': {e}")))
    }

    /// Position in `self.shards` of the shard holding global row `r` (which must exist).
    fn shard_pos(&self, r: usize) -> usize {
        self.shards
            .partition_point(|s| s.first_row + s.rows <= r)
            .min(self.shards.len().saturating_sub(1))
    }

    /// Every row of `hook` as its own array (shape without the row dimension), in index order:
    /// for hooks whose rows have different lengths (ragged sequences).
    pub fn read_ragged(&self, hook: &str) -> Result<Vec<ArrayD<f32>>> {
        let mut out = Vec::with_capacity(self.index.len());
        for chunk in self.read_shards(hook)? {
            let chunk = chunk?;
            out.extend(chunk.data.outer_iter().map(|r| r.to_owned()));
        }
        Ok(out)
    }

    /// Stream `hook` one shard at a time (memory stays at one shard's worth of one hook).
    /// The hook must exist in every shard; per-row shapes may differ between shards.
    pub fn read_shards(&self, hook: &str) -> Result<impl Iterator<Item = Result<ShardChunk>> + '_> {
        let entries = self.entries(hook)?;
        let hook = hook.to_string();
        Ok(entries.into_iter().map(move |(s, t)| {
            let mut data = vec![0f32; s.rows * t.row_elems()];
            let mut f = open_file(&s.path)?;
            read_f32s(&mut f, &s.path, t.begin, &mut data)?;
            let data = ArrayD::from_shape_vec(IxDyn(&t.shape), data)
                .map_err(|e| Error::msg(format!("hook '{hook}': {e}")))?;
            Ok(ShardChunk {
                shard: s.shard,
                first_row: s.first_row,
                data,
            })
        }))
    }

    /// Row numbers whose index entry satisfies `pred`, in order.
    pub fn select(&self, pred: impl Fn(&IndexRow) -> bool) -> Vec<usize> {
        self.index
            .iter()
            .filter(|r| pred(r))
            .map(|r| r.row)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> StoreManifest {
        StoreManifest {
            model: "tiny-vlm".into(),
            weights_hash: "w1".into(),
            data_hash: "d1".into(),
            template: "chatml".into(),
            hook_spec: "blocks.*.hook_resid_post@decision".into(),
            positions: "decision".into(),
            tool_version: "0.1.0".into(),
            seed: 7,
            extra: BTreeMap::new(),
        }
    }

    fn meta(i: usize, cond: &str) -> RowMeta {
        let mut labels = BTreeMap::new();
        labels.insert("sycophantic".to_string(), (i % 2) as f64);
        RowMeta {
            example_id: format!("ex{i}"),
            condition: cond.into(),
            task: "count".into(),
            tone: (cond != "r1").then(|| "strong".to_string()),
            labels,
            extra: BTreeMap::new(),
        }
    }

    /// Row `i`'s value for hook `h` at flat position `k`: unique per (row, hook, position).
    fn val(i: usize, h: usize, k: usize) -> f32 {
        i as f32 * 1000.0 + h as f32 * 100.0 + k as f32
    }

    fn tensors(i: usize, dim: usize) -> Vec<(String, ArrayD<f32>)> {
        (0..2)
            .map(|h| {
                let a = ArrayD::from_shape_fn(IxDyn(&[dim]), |ix| val(i, h, ix[0]));
                (format!("blocks.{h}.hook_resid_post"), a)
            })
            .collect()
    }

    fn write_rows(w: &mut StoreWriter, range: std::ops::Range<usize>) {
        for i in range {
            w.push(meta(i, "r1"), tensors(i, 3)).unwrap();
        }
    }

    fn check_rows(r: &StoreReader, n: usize) {
        assert_eq!(r.len(), n);
        for (i, row) in r.index().iter().enumerate() {
            assert_eq!(row.row, i);
            assert_eq!(row.meta.example_id, format!("ex{i}"));
        }
        if n == 0 {
            return;
        }
        for h in 0..2 {
            let x = r.read(&format!("blocks.{h}.hook_resid_post")).unwrap();
            assert_eq!(x.shape(), &[n, 3]);
            for i in 0..n {
                for k in 0..3 {
                    assert_eq!(x[[i, k]], val(i, h, k), "row {i} hook {h} pos {k}");
                }
            }
        }
    }

    fn shard_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("shard-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn roundtrip_known_values_and_sharding() {
        let td = tempfile::tempdir().unwrap();
        let dir = td.path().join("store");
        let mut w = StoreWriter::create_or_resume(&dir, &manifest()).unwrap();
        w.set_rows_per_shard(4);
        write_rows(&mut w, 0..10);
        assert_eq!(w.rows(), 8, "two full shards committed automatically");
        assert_eq!(w.pending_rows(), 2);
        assert_eq!(w.finish().unwrap(), 10);
        assert_eq!(shard_files(&dir).len(), 3);

        // Open through the run folder too.
        let r = StoreReader::open(td.path()).unwrap();
        assert_eq!(r.manifest(), &manifest());
        assert_eq!(
            r.hooks(),
            vec!["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
        );
        check_rows(&r, 10);
        let row5 = &r.index()[5];
        assert_eq!((row5.shard, row5.shard_row), (1, 1));
        assert_eq!(row5.meta, meta(5, "r1"));

        // read_rows: any order, repeats, across shards.
        let x = r
            .read_rows("blocks.1.hook_resid_post", &[9, 0, 5, 5])
            .unwrap();
        assert_eq!(x.shape(), &[4, 3]);
        for (k, &i) in [9usize, 0, 5, 5].iter().enumerate() {
            assert_eq!(x[[k, 2]], val(i, 1, 2));
        }
        assert_eq!(
            r.read_rows("blocks.1.hook_resid_post", &[])
                .unwrap()
                .shape(),
            &[0, 3]
        );
        let err = r.read_rows("blocks.1.hook_resid_post", &[10]).unwrap_err();
        assert!(err.to_string().contains("row 10 is out of range"), "{err}");

        // select by labels.
        let syc = r.select(|row| row.meta.labels.get("sycophantic") == Some(&1.0));
        assert_eq!(syc, vec![1, 3, 5, 7, 9]);

        // Streaming by shard gives the same data.
        let chunks: Vec<ShardChunk> = r
            .read_shards("blocks.0.hook_resid_post")
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].first_row, 8);
        assert_eq!(chunks[2].data.shape(), &[2, 3]);
        assert_eq!(chunks[2].data[[1, 0]], val(9, 0, 0));

        // Shard metadata records the first global row.
        let info = read_shard_header(&dir.join(shard_file_name(1)), 1).unwrap();
        assert_eq!((info.first_row, info.rows), (4, 4));
    }

    #[test]
    fn multidim_and_noncontiguous_tensors_keep_logical_order() {
        let td = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        let a = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |ix| (ix[0] * 10 + ix[1]) as f32);
        let t = a.clone().reversed_axes(); // [3, 2], not in standard layout
        w.push(meta(0, "r1"), vec![("h".into(), t.clone())])
            .unwrap();
        w.finish().unwrap();
        let r = StoreReader::open(td.path()).unwrap();
        let x = r.read("h").unwrap();
        assert_eq!(x.shape(), &[1, 3, 2]);
        assert_eq!(x.index_axis(ndarray::Axis(0), 0), t);
        assert_eq!(x[[0, 2, 1]], 12.0);
    }

    #[test]
    fn ragged_rows_start_a_new_shard_and_read_ragged_works() {
        let td = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        let seq = |i: usize, len: usize| {
            vec![(
                "blocks.0.hook_resid_post".to_string(),
                ArrayD::from_shape_fn(IxDyn(&[len, 2]), |ix| (i * 100 + ix[0] * 2 + ix[1]) as f32),
            )]
        };
        w.push(meta(0, "r1"), seq(0, 3)).unwrap();
        w.push(meta(1, "r1"), seq(1, 3)).unwrap();
        assert_eq!(w.rows(), 0);
        w.push(meta(2, "r1"), seq(2, 5)).unwrap();
        assert_eq!(w.rows(), 2, "shape change committed the pending shard");
        w.finish().unwrap();

        let r = StoreReader::open(td.path()).unwrap();
        let err = r.read("blocks.0.hook_resid_post").unwrap_err().to_string();
        assert!(
            err.contains("read_ragged") && err.contains("[3, 2]") && err.contains("[5, 2]"),
            "{err}"
        );
        let rows = r.read_ragged("blocks.0.hook_resid_post").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].shape(), &[3, 2]);
        assert_eq!(rows[2].shape(), &[5, 2]);
        assert_eq!(rows[2][[4, 1]], 209.0);
        // Rows of one shape can still be read together.
        let x = r.read_rows("blocks.0.hook_resid_post", &[1, 0]).unwrap();
        assert_eq!(x[[0, 2, 1]], 105.0);
        assert_eq!(r.hook_shape("blocks.0.hook_resid_post"), None);
    }

    #[test]
    fn bad_input_gives_clear_errors() {
        let td = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        w.push(meta(0, "r1"), tensors(0, 3)).unwrap();

        let dup = w
            .push(meta(0, "r1"), tensors(0, 3))
            .unwrap_err()
            .to_string();
        assert!(dup.contains("(ex0, r1) is already in the store"), "{dup}");

        let mut t = tensors(1, 3);
        t[1].1[[1]] = f32::NAN;
        let nan = w.push(meta(1, "r1"), t).unwrap_err().to_string();
        assert!(
            nan.contains("blocks.1.hook_resid_post") && nan.contains("non-finite"),
            "{nan}"
        );

        let mut m = meta(1, "r1");
        m.labels.insert("x".into(), f64::INFINITY);
        let lab = w.push(m, tensors(1, 3)).unwrap_err().to_string();
        assert!(lab.contains("label 'x'"), "{lab}");

        let mut t = tensors(1, 3);
        t.pop();
        let hooks = w.push(meta(1, "r1"), t).unwrap_err().to_string();
        assert!(hooks.contains("same hooks"), "{hooks}");

        assert!(w.push(meta(1, "r1"), vec![]).is_err());
        let mut e = meta(1, "r1");
        e.example_id.clear();
        assert!(w.push(e, tensors(1, 3)).is_err());

        // Same example, other condition is fine; errors left the pending shard intact.
        w.push(meta(0, "r2:strong"), tensors(0, 3)).unwrap();
        assert_eq!(w.finish().unwrap(), 2);

        let r = StoreReader::open(td.path()).unwrap();
        let unk = r.read("blocks.0.hook_resid_pst").unwrap_err().to_string();
        assert!(
            unk.contains("did you mean 'blocks.0.hook_resid_post'"),
            "{unk}"
        );
        assert!(StoreReader::open(&td.path().join("nope")).is_err());
    }

    #[test]
    fn writer_pointed_at_a_run_folder_says_so() {
        let td = tempfile::tempdir().unwrap();
        std::fs::write(td.path().join(MANIFEST_FILE), r#"{"name": "run"}"#).unwrap();
        let err = StoreWriter::create_or_resume(td.path(), &manifest())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a store manifest") && err.contains("RUN/store"),
            "{err}"
        );
    }

    #[test]
    fn second_writer_is_refused_while_first_is_open() {
        let td = tempfile::tempdir().unwrap();
        let w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        let err = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
        drop(w);
        StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
    }

    #[test]
    fn resume_with_different_setup_names_the_field() {
        let td = tempfile::tempdir().unwrap();
        drop(StoreWriter::create_or_resume(td.path(), &manifest()).unwrap());
        let mut m = manifest();
        m.weights_hash = "w2".into();
        m.positions = "last".into();
        let err = StoreWriter::create_or_resume(td.path(), &m)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("weights_hash: store has 'w1', this run has 'w2'"),
            "{err}"
        );
        assert!(err.contains("positions"), "{err}");
        assert!(!err.contains("model:"), "{err}");
        // Seed, data hash and tool version may differ.
        let mut m = manifest();
        m.seed = 99;
        m.data_hash = "d2".into();
        m.tool_version = "0.2.0".into();
        drop(StoreWriter::create_or_resume(td.path(), &m).unwrap());
        assert_eq!(StoreReader::open(td.path()).unwrap().manifest().seed, 7);
    }

    #[test]
    fn resume_continues_after_last_shard_and_reports_done() {
        let td = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        w.set_rows_per_shard(3);
        write_rows(&mut w, 0..5);
        w.finish().unwrap();
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        assert_eq!(w.rows(), 5);
        assert!(w.done().contains(&("ex4".to_string(), "r1".to_string())));
        assert!(w.is_done("ex0", "r1") && !w.is_done("ex5", "r1"));
        w.set_rows_per_shard(3);
        write_rows(&mut w, 5..8);
        w.finish().unwrap();
        check_rows(&StoreReader::open(td.path()).unwrap(), 8);
        assert_eq!(shard_files(td.path()).len(), 3);
    }

    /// A store with 6 committed rows in shards 0 (rows 0..3) and 1 (rows 3..6).
    fn committed_store() -> tempfile::TempDir {
        let td = tempfile::tempdir().unwrap();
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        w.set_rows_per_shard(3);
        write_rows(&mut w, 0..6);
        assert_eq!(w.finish().unwrap(), 6);
        td
    }

    /// After a simulated crash: the reader sees 6 rows; resuming continues at row 6 and
    /// leaves a consistent store of 9 rows.
    fn assert_recovers(td: &tempfile::TempDir) {
        check_rows(&StoreReader::open(td.path()).unwrap(), 6);
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        assert_eq!(w.rows(), 6);
        w.set_rows_per_shard(3);
        write_rows(&mut w, 6..9);
        w.finish().unwrap();
        let r = StoreReader::open(td.path()).unwrap();
        check_rows(&r, 9);
        assert_eq!(
            shard_files(td.path()),
            vec![shard_file_name(0), shard_file_name(1), shard_file_name(2)]
        );
        let idx = std::fs::read_to_string(td.path().join(INDEX_FILE)).unwrap();
        assert_eq!(idx.lines().count(), 9);
        assert!(idx.ends_with('\n'));
        assert!(!std::fs::read_dir(td.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    /// Copy of shard 1 as a stand-in for a half-committed shard 2 (same bytes, different name).
    fn plant_orphan_shard(td: &tempfile::TempDir, name: &str) {
        std::fs::copy(td.path().join(shard_file_name(1)), td.path().join(name)).unwrap();
    }

    #[test]
    fn crash_leaving_a_temp_file() {
        let td = committed_store();
        let tmp = crate::error::tmp_path(&td.path().join(shard_file_name(2)));
        std::fs::write(&tmp, b"half a shard").unwrap();
        assert_recovers(&td);
    }

    #[test]
    fn crash_between_rename_and_index_append() {
        let td = committed_store();
        plant_orphan_shard(&td, &shard_file_name(2));
        assert_recovers(&td);
    }

    #[test]
    fn crash_mid_index_line() {
        let td = committed_store();
        plant_orphan_shard(&td, &shard_file_name(2));
        let mut f = OpenOptions::new()
            .append(true)
            .open(td.path().join(INDEX_FILE))
            .unwrap();
        f.write_all(br#"{"row":6,"shard":2,"shard_row":0,"example_id":"ex"#)
            .unwrap();
        drop(f);
        assert_recovers(&td);
    }

    #[test]
    fn crash_after_some_index_lines_of_a_shard() {
        // Shard 1's file is complete but only its first line (row 3) reached the index.
        let td = committed_store();
        let path = td.path().join(INDEX_FILE);
        let idx = std::fs::read_to_string(&path).unwrap();
        let keep: String = idx.split_inclusive('\n').take(4).collect();
        std::fs::write(&path, keep).unwrap();
        let r = StoreReader::open(td.path()).unwrap();
        check_rows(&r, 3);
        // Resuming drops the partial shard and rewrites rows 3.. in shard 1.
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        assert_eq!(w.rows(), 3);
        assert_eq!(shard_files(td.path()).len(), 1);
        w.set_rows_per_shard(3);
        write_rows(&mut w, 3..6);
        w.finish().unwrap();
        assert_recovers(&td);
    }

    #[test]
    fn crash_before_first_commit() {
        let td = tempfile::tempdir().unwrap();
        drop(StoreWriter::create_or_resume(td.path(), &manifest()).unwrap());
        std::fs::write(td.path().join(shard_file_name(0)), b"garbage").unwrap();
        std::fs::write(td.path().join(INDEX_FILE), b"{\"row\":0,").unwrap();
        let r = StoreReader::open(td.path()).unwrap();
        assert!(r.is_empty() && r.hooks().is_empty());
        assert!(r.read("h").is_err());
        let mut w = StoreWriter::create_or_resume(td.path(), &manifest()).unwrap();
        assert_eq!(w.rows(), 0);
        write_rows(&mut w, 0..2);
        w.finish().unwrap();
        check_rows(&StoreReader::open(td.path()).unwrap(), 2);
    }

    #[test]
    fn corruption_is_an_error_not_silence() {
        // A malformed line in the middle (not a torn tail) names the line.
        let td = committed_store();
        let path = td.path().join(INDEX_FILE);
        let idx = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = idx.lines().collect();
        lines[2] = "{not json";
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let err = StoreReader::open(td.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("malformed index row"),
            "{err}"
        );

        // A committed shard that went missing.
        let td = committed_store();
        std::fs::remove_file(td.path().join(shard_file_name(0))).unwrap();
        let err = StoreReader::open(td.path()).unwrap_err().to_string();
        assert!(err.contains("shard 0"), "{err}");

        // A truncated committed shard.
        let td = committed_store();
        let p = td.path().join(shard_file_name(1));
        let len = std::fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let err = StoreReader::open(td.path()).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn index_lines_are_flat_json() {
        let td = committed_store();
        let idx = std::fs::read_to_string(td.path().join(INDEX_FILE)).unwrap();
        let first: serde_json::Value = serde_json::from_str(idx.lines().next().unwrap()).unwrap();
        assert_eq!(first["row"], 0);
        assert_eq!(first["example_id"], "ex0");
        assert_eq!(first["condition"], "r1");
        assert_eq!(first["labels"]["sycophantic"], 0.0);
    }
}
