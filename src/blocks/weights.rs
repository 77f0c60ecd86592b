//! Weight loading helpers: sharded safetensors, dtype choice, and name mapping with fallbacks.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The safetensors files of a checkpoint folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = crate::error::read_to_string(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "expected a 'weight_map' object"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                return Err(Error::Weights(format!(
                    "{} lists shard {} which does not exist",
                    index.display(),
                    p.display()
                )));
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Weights(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Memory-map the checkpoint's weights as a [`VarBuilder`] in `dtype` on `device`.
pub fn var_builder(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let files = safetensors_files(dir)?;
    // SAFETY: the files are memory-mapped read-only; sycoscope never writes to them while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| Error::Weights(format!("{}: {e}", dir.display())))?;
    Ok(vb)
}

/// Pick the first prefix under which `probe` exists (checkpoints saved by different
/// transformers versions name the same module differently).
pub fn pick_prefix<'a>(
    vb: &VarBuilder<'static>,
    candidates: &[&'a str],
    probe: &str,
) -> Option<&'a str> {
    candidates.iter().copied().find(|p| {
        let name = if p.is_empty() {
            probe.to_string()
        } else {
            format!("{p}.{probe}")
        };
        vb.contains_tensor(&name)
    })
}

/// Parse a `--dtype` string.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::input(format!(
            "unknown dtype '{other}': expected f32, f16 or bf16"
        ))),
    }
}
