//! The crate's error type: every failure names the thing that failed and what was expected.

use std::path::{Path, PathBuf};

/// Result alias used across sycoscope.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors raised by sycoscope. Each variant carries enough context (file, tensor, hook, row)
/// for a user to fix the input without reading the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configuration file (config.json, preprocessor_config.json, a probe spec, ...) is missing
    /// a key or has a value of the wrong kind.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weight file lacks a tensor the architecture needs, or has it with the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// A hook name that the model does not have.
    #[error("unknown hook '{name}'{}", suggestion.as_ref().map(|s| format!(" (did you mean '{s}'?)")).unwrap_or_default())]
    UnknownHook {
        name: String,
        suggestion: Option<String>,
    },
    /// Bad user input: an image that does not decode, a conversation with no image, a malformed
    /// row, an out-of-range layer, ...
    #[error("{0}")]
    Input(String),
    /// A numerical or shape problem inside a forward pass.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// Anything else, with context.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    /// A configuration error for `path`.
    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    /// Bad input.
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
    /// Free-form message.
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// Build an [`Error::Input`] with `format!` syntax.
#[macro_export]
macro_rules! input_err {
    ($($t:tt)*) => { $crate::error::Error::Input(format!($($t)*)) };
}

/// Read a file to a string, naming the file on failure.
pub fn read_to_string(path: impl AsRef<Path>) -> Result<String> {
    std::fs::read_to_string(path.as_ref()).map_err(|e| Error::io(path.as_ref(), e))
}

/// Write `bytes` to `path` atomically: write a temporary file beside it, then rename.
/// A crash never leaves a half-written `path`.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The temporary sibling used by [`write_atomic`]: `name.tmp` in the same folder.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}
