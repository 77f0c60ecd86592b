//! Where a model or dataset comes from: a local folder, or a Hugging Face Hub id resolved through
//! hf-hub's cache. `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE=1` are honoured: offline, only
//! the local cache is consulted, and a missing file is a clear error.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Files a checkpoint folder may hold that sycoscope reads (besides the weights).
pub const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "special_tokens_map.json",
    "qformer_tokenizer/tokenizer.json",
    "qformer_tokenizer/tokenizer_config.json",
];

/// A model or dataset source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local folder.
    Local(PathBuf),
    /// A Hub repository id (`owner/name`), with an optional revision (`owner/name@rev`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl Source {
    /// A path that exists is local; `owner/name` (optionally `@revision`) that does not exist
    /// locally is a Hub id; anything else is an error naming the path.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(Source::Local(p.to_path_buf()));
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, v)) => (r, Some(v.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let looks_like_id = parts.len() == 2
            && parts.iter().all(|x| {
                !x.is_empty()
                    && x.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            && !s.starts_with('.');
        if looks_like_id {
            Ok(Source::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(Error::input(format!(
                "'{s}' is neither an existing folder nor a Hub id of the form owner/name"
            )))
        }
    }
}

/// True when `HF_HUB_OFFLINE` (or `HF_DATASETS_OFFLINE` / `TRANSFORMERS_OFFLINE`) is set to 1.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
            .unwrap_or(false)
    })
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

fn repo_of(repo: &str, revision: &Option<String>, kind: RepoType) -> Repo {
    match revision {
        Some(r) => Repo::with_revision(repo.to_string(), kind, r.clone()),
        None => Repo::new(repo.to_string(), kind),
    }
}

/// A file of a cached Hub repo: through `refs/<revision>`, or, for a revision that is a commit
/// hash (40 hex digits), straight from `snapshots/<hash>/` as huggingface_hub does.
fn cached_file(cache: &Cache, repo: &Repo, f: &str) -> Option<PathBuf> {
    if let Some(p) = cache.repo(repo.clone()).get(f) {
        return Some(p);
    }
    let rev = repo.revision();
    if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        let p = cache
            .path()
            .join(repo.folder_name())
            .join("snapshots")
            .join(rev)
            .join(f);
        return p.exists().then_some(p);
    }
    None
}

/// Fetch `files` of a Hub repo (from the cache, or downloading when online) and return the
/// snapshot folder. `required` files must exist; the others are fetched when present.
pub fn hub_snapshot(
    repo: &str,
    revision: &Option<String>,
    kind: RepoType,
    required: &[&str],
    optional: &[&str],
) -> Result<PathBuf> {
    let cache = Cache::new(hub_cache_dir());
    let hrepo = repo_of(repo, revision, kind);
    let mut dir: Option<PathBuf> = None;
    let note = |f: &str, p: &Path, dir: &mut Option<PathBuf>| {
        if dir.is_none() {
            let depth = f.matches('/').count() + 1;
            let mut d = p.to_path_buf();
            for _ in 0..depth {
                d.pop();
            }
            *dir = Some(d);
        }
    };
    if offline() {
        for f in required {
            let p = cached_file(&cache, &hrepo, f).ok_or_else(|| {
                Error::input(format!(
                    "HF_HUB_OFFLINE=1 and '{f}' of {repo} is not in the local cache ({}); download it once online or point to a local folder",
                    hub_cache_dir().display()
                ))
            })?;
            note(f, &p, &mut dir);
        }
        for f in optional {
            if let Some(p) = cached_file(&cache, &hrepo, f) {
                note(f, &p, &mut dir);
            }
        }
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_progress(true)
            .build()
            .map_err(|e| Error::msg(format!("hub client for {repo}: {e}")))?;
        let arepo = api.repo(repo_of(repo, revision, kind));
        for f in required {
            let p = match cached_file(&cache, &hrepo, f) {
                Some(p) => p,
                None => arepo
                    .get(f)
                    .map_err(|e| Error::input(format!("could not fetch '{f}' of {repo}: {e}")))?,
            };
            note(f, &p, &mut dir);
        }
        for f in optional {
            let p = cached_file(&cache, &hrepo, f).or_else(|| arepo.get(f).ok());
            if let Some(p) = p {
                note(f, &p, &mut dir);
            }
        }
    }
    dir.ok_or_else(|| Error::input(format!("{repo}: nothing resolved")))
}

/// Resolve a model source to a local checkpoint folder holding `config.json`.
pub fn resolve_model(s: &str) -> Result<PathBuf> {
    match Source::parse(s)? {
        Source::Local(p) => {
            if !p.is_dir() {
                return Err(Error::input(format!(
                    "{}: expected a checkpoint folder (with config.json), found a file",
                    p.display()
                )));
            }
            if !p.join("config.json").exists() {
                return Err(Error::config(
                    p.join("config.json"),
                    "missing: a checkpoint folder needs config.json",
                ));
            }
            Ok(p)
        }
        Source::Hub { repo, revision } => {
            // the weights: one file, or the shards of an index
            let dir = hub_snapshot(
                &repo,
                &revision,
                RepoType::Model,
                &["config.json"],
                CHECKPOINT_FILES,
            )?;
            let index = "model.safetensors.index.json";
            // optional: absent for single-file checkpoints (hub_snapshot then resolves nothing)
            let idx = hub_snapshot(&repo, &revision, RepoType::Model, &[], &[index])
                .ok()
                .map(|d| d.join(index))
                .filter(|p| p.exists());
            if let Some(idx) = idx {
                let text = crate::error::read_to_string(&idx)?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::config(&idx, e.to_string()))?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                let refs: Vec<&str> = shards.iter().map(|s| s.as_str()).collect();
                hub_snapshot(&repo, &revision, RepoType::Model, &refs, &[])?;
            } else {
                hub_snapshot(
                    &repo,
                    &revision,
                    RepoType::Model,
                    &["model.safetensors"],
                    &[],
                )?;
            }
            Ok(dir)
        }
    }
}

/// Resolve a model source, where `organism` / `default` name the embedded default model.
pub fn resolve_default_or(s: &str) -> Result<PathBuf> {
    if crate::default_model::is_default_name(s) {
        crate::default_model::embedded_dir()
    } else {
        resolve_model(s)
    }
}

/// Read and parse a JSON file, naming it on failure.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::error::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

/// Short content hash (sha256, first 16 hex digits) of a checkpoint's weight files, for
/// provenance. Hashes file sizes and the first and last MiB of each file to stay fast on
/// multi-GB checkpoints.
pub fn weights_hash(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut h = Sha256::new();
    for f in crate::blocks::weights::safetensors_files(dir)? {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        let len = file.metadata().map_err(|e| Error::io(&f, e))?.len();
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        file.read_exact(&mut buf).map_err(|e| Error::io(&f, e))?;
        h.update(&buf);
        if len > (2 << 20) {
            file.seek(SeekFrom::End(-(1 << 20)))
                .map_err(|e| Error::io(&f, e))?;
            file.read_exact(&mut buf).map_err(|e| Error::io(&f, e))?;
            h.update(&buf);
        }
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        assert_eq!(
            Source::parse(".").unwrap(),
            Source::Local(PathBuf::from("."))
        );
        assert_eq!(
            Source::parse("llava-hf/llava-1.5-7b-hf").unwrap(),
            Source::Hub {
                repo: "llava-hf/llava-1.5-7b-hf".into(),
                revision: None
            }
        );
        assert!(Source::parse("no/such/folder/here").is_err());
    }
}
