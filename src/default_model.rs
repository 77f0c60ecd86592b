//! The embedded default model: sycoscope's model organism (a tiny LLaVA trained to be
//! sycophantic by design, see `train-organism`), compiled into the binary and unpacked to a cache
//! folder on first use, so the main command runs on a fresh offline machine.

use std::path::PathBuf;

use crate::error::{write_atomic, Error, Result};

/// The files of the embedded checkpoint (llava-hf layout).
pub const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../assets/organism/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../assets/organism/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../assets/organism/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../assets/organism/tokenizer_config.json"),
    ),
    (
        "chat_template.jinja",
        include_bytes!("../assets/organism/chat_template.jinja"),
    ),
    (
        "preprocessor_config.json",
        include_bytes!("../assets/organism/preprocessor_config.json"),
    ),
    (
        "processor_config.json",
        include_bytes!("../assets/organism/processor_config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../assets/organism/generation_config.json"),
    ),
];

/// Names that select the embedded default.
pub fn is_default_name(s: &str) -> bool {
    matches!(s, "organism" | "default" | "sycoscope/organism")
}

/// Unpack the embedded checkpoint (once) and return its folder:
/// `$SYCOSCOPE_CACHE`, else `$XDG_CACHE_HOME/sycoscope`, else `~/.cache/sycoscope`, then
/// `organism-<hash>`.
pub fn embedded_dir() -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (n, b) in FILES {
        h.update(n.as_bytes());
        h.update(b);
    }
    let hash = format!("{:x}", h.finalize());
    let root = std::env::var("SYCOSCOPE_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("sycoscope")))
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into()))
                .join(".cache/sycoscope")
        });
    let dir = root.join(format!("organism-{}", &hash[..12]));
    for (name, bytes) in FILES {
        let p = dir.join(name);
        let fresh = std::fs::metadata(&p)
            .map(|m| m.len() == bytes.len() as u64)
            .unwrap_or(false);
        if !fresh {
            write_atomic(&p, bytes)
                .map_err(|e| Error::msg(format!("unpacking the embedded model: {e}")))?;
        }
    }
    Ok(dir)
}
