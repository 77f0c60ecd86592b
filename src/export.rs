//! Notebook export: a Jupyter notebook (nbformat 4) that reloads a run folder with the Python
//! reader and redraws its results with numpy, pandas, matplotlib and safetensors only.
//!
//! [`export_notebook`] writes two files into the output folder:
//! - `sycoscope_run.ipynb`, built from the template `notebooks-export/sycoscope_run.py`
//!   (compiled into the binary, so the export works from anywhere);
//! - `sycoscope_reader.py`, a copy of `notebooks-export/sycoscope_reader.py`.
//!
//! The notebook does not copy the run's data: it opens the run by its path relative to the
//! notebook folder (then by its absolute path, or the `SYCOSCOPE_RUN` environment variable), so a
//! run and its exported notebook can move together. Its sections are: the metric tables
//! (`summary.csv`), the probe curves (`probes/*/curve.json`, with the interval band and the
//! control), the visual-reliance curves (store hooks `blocks.{i}.attn.reliance`, neutral `r1`
//! against each `r2:<tone>`), heatmaps of one example's decision-row attention over the image
//! (`blocks.{i}.attn.image` on the row's `extra.grid`) and the logit-lens trajectories
//! (`logit_lens.options`). A section whose data is missing prints a note and draws nothing.
//!
//! ```no_run
//! # fn main() -> sycoscope::Result<()> {
//! let nb = sycoscope::export::export_notebook("runs/demo".as_ref(), "runs/demo-notebook".as_ref())?;
//! println!("wrote {}", nb.display());
//! # Ok(())
//! # }
//! ```

use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{write_atomic, Error, Result};

/// File name of the exported notebook.
pub const NOTEBOOK_FILE: &str = "sycoscope_run.ipynb";
/// File name of the reader copied next to the notebook.
pub const READER_FILE: &str = "sycoscope_reader.py";
/// The Python reader (`notebooks-export/sycoscope_reader.py`).
pub const READER_SOURCE: &str = include_str!("../notebooks-export/sycoscope_reader.py");
/// The notebook template (`notebooks-export/sycoscope_run.py`, `# %%` cell markers).
pub const NOTEBOOK_TEMPLATE: &str = include_str!("../notebooks-export/sycoscope_run.py");

/// One notebook cell parsed from the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateCell {
    /// `true` for a markdown cell, `false` for a code cell.
    pub markdown: bool,
    /// The cell's text (markdown cells without their `# ` prefixes).
    pub source: String,
}

/// Split a percent-format template into cells: a line `# %%` starts a code cell, a line
/// `# %% [markdown]` a markdown cell whose lines lose their leading `# ` (or `#`). Text before
/// the first marker is dropped; blank lines at a cell's ends are trimmed; empty cells are dropped.
pub fn parse_template(template: &str) -> Vec<TemplateCell> {
    let mut cells = Vec::new();
    let mut cur: Option<(bool, Vec<String>)> = None;
    let flush = |cur: &mut Option<(bool, Vec<String>)>, cells: &mut Vec<TemplateCell>| {
        if let Some((markdown, lines)) = cur.take() {
            let text = lines.join("\n");
            let text = text.trim_matches('\n').to_string();
            if !text.trim().is_empty() {
                cells.push(TemplateCell {
                    markdown,
                    source: text,
                });
            }
        }
    };
    for line in template.lines() {
        let t = line.trim_end();
        if t == "# %%" || t.starts_with("# %% ") {
            flush(&mut cur, &mut cells);
            cur = Some((t.contains("[markdown]"), Vec::new()));
            continue;
        }
        if let Some((markdown, lines)) = cur.as_mut() {
            if *markdown {
                let l = t
                    .strip_prefix("# ")
                    .or_else(|| t.strip_prefix('#'))
                    .unwrap_or(t);
                lines.push(l.to_string());
            } else {
                lines.push(t.to_string());
            }
        }
    }
    flush(&mut cur, &mut cells);
    cells
}

/// A notebook cell's `source` as nbformat writes it: a list of lines, each but the last ending
/// with a newline.
fn source_lines(text: &str) -> Value {
    let lines: Vec<&str> = text.split('\n').collect();
    let n = lines.len();
    Value::Array(
        lines
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                if i + 1 < n {
                    Value::String(format!("{l}\n"))
                } else {
                    Value::String(l.to_string())
                }
            })
            .collect(),
    )
}

/// A Python string literal for `s` (JSON string syntax is valid Python for these escapes).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Build the notebook JSON (nbformat 4.5) from the template, with the run's relative and
/// absolute paths filled in.
pub fn notebook_json(run_rel: &str, run_abs: &str) -> Value {
    let cells: Vec<Value> = parse_template(NOTEBOOK_TEMPLATE)
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let id = format!("cell-{i:02}");
            if c.markdown {
                json!({"cell_type": "markdown", "id": id, "metadata": {}, "source": source_lines(&c.source)})
            } else {
                let src = c
                    .source
                    .replace("__RUN_REL__", &py_str(run_rel))
                    .replace("__RUN_ABS__", &py_str(run_abs));
                json!({"cell_type": "code", "id": id, "metadata": {}, "execution_count": null,
                       "outputs": [], "source": source_lines(&src)})
            }
        })
        .collect();
    json!({
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "sycoscope": {"tool_version": env!("CARGO_PKG_VERSION")}
        },
        "cells": cells
    })
}

/// Absolute, lexically normalised form of `p` (symlinks resolved when the path exists).
fn absolute(p: &Path) -> Result<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let base = if p.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().map_err(|e| Error::io(".", e))?
    };
    let mut out = PathBuf::new();
    for c in base.join(p).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// `target` relative to the folder `from` (both absolute): `../run` and the like.
pub fn relative_path(from: &Path, target: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = target.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Export a run folder as a notebook: writes `out/sycoscope_run.ipynb` and
/// `out/sycoscope_reader.py` (both atomically, creating `out`) and returns the notebook's path.
///
/// The notebook reads the run by its path relative to `out` (then the absolute path); no data is
/// copied. Errors when `run` is not a folder or holds none of `examples.jsonl`, `summary.csv`,
/// `store/` and `probes/` (not a run folder), or when `out` cannot be written.
pub fn export_notebook(run: &Path, out: &Path) -> Result<PathBuf> {
    if !run.is_dir() {
        return Err(Error::input(format!(
            "export-notebook: run folder {} does not exist (expected the folder `sycoscope eval` wrote)",
            run.display()
        )));
    }
    let parts = ["examples.jsonl", "summary.csv", "store", "probes"];
    if !parts.iter().any(|p| run.join(p).exists()) {
        return Err(Error::input(format!(
            "export-notebook: {} is not a run folder: it has none of {}",
            run.display(),
            parts.join(", ")
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let run_abs = absolute(run)?;
    let out_abs = absolute(out)?;
    let rel = relative_path(&out_abs, &run_abs);
    let nb = notebook_json(&rel.to_string_lossy(), &run_abs.to_string_lossy());
    let bytes = serde_json::to_vec_pretty(&nb)
        .map_err(|e| Error::msg(format!("export-notebook: serialising the notebook: {e}")))?;
    let nb_path = out.join(NOTEBOOK_FILE);
    write_atomic(&nb_path, &bytes)?;
    write_atomic(out.join(READER_FILE), READER_SOURCE.as_bytes())?;
    Ok(nb_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_into_markdown_and_code_cells() {
        let cells = parse_template(NOTEBOOK_TEMPLATE);
        assert!(cells.len() >= 10, "{} cells", cells.len());
        assert!(cells[0].markdown && cells[0].source.starts_with("# sycoscope run"));
        assert!(!cells[1].markdown && cells[1].source.contains("__RUN_REL__"));
        // the header comment above the first marker is not a cell
        assert!(!cells
            .iter()
            .any(|c| c.source.contains("Template of the notebook")));
        // markdown lines lost their comment prefix
        assert!(cells
            .iter()
            .filter(|c| c.markdown)
            .all(|c| !c.source.lines().any(|l| l.starts_with("# #"))));
    }

    #[test]
    fn parse_template_handles_odd_input() {
        assert!(parse_template("").is_empty());
        assert!(parse_template("x = 1\n").is_empty());
        let c = parse_template("# %%\n\n# %% [markdown]\n#\n# hi\n# %%\nprint(1)\n");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].source, "hi");
        assert_eq!(c[1].source, "print(1)");
    }

    #[test]
    fn notebook_has_nbformat4_shape_and_paths() {
        let nb = notebook_json("../run \"x\"", "/abs/run");
        assert_eq!(nb["nbformat"], 4);
        let cells = nb["cells"].as_array().unwrap();
        let code: String = cells
            .iter()
            .filter(|c| c["cell_type"] == "code")
            .flat_map(|c| c["source"].as_array().unwrap().iter())
            .map(|l| l.as_str().unwrap())
            .collect();
        assert!(code.contains(r#"RUN_REL = "../run \"x\"""#), "{code}");
        assert!(code.contains(r#"RUN_ABS = "/abs/run""#));
        assert!(!code.contains("__RUN_"));
        for c in cells {
            let src = c["source"].as_array().unwrap();
            for l in &src[..src.len() - 1] {
                assert!(l.as_str().unwrap().ends_with('\n'));
            }
        }
    }

    #[test]
    fn relative_paths() {
        let r = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b));
        assert_eq!(r("/a/b/nb", "/a/b/run"), PathBuf::from("../run"));
        assert_eq!(r("/a/run/nb", "/a/run"), PathBuf::from(".."));
        assert_eq!(r("/a", "/a/run"), PathBuf::from("run"));
        assert_eq!(r("/a", "/a"), PathBuf::from("."));
    }

    #[test]
    fn export_refuses_a_missing_or_foreign_folder() {
        let td = tempfile::tempdir().unwrap();
        let err = export_notebook(&td.path().join("nope"), &td.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = export_notebook(td.path(), &td.path().join("o"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a run folder"), "{err}");
    }

    #[test]
    fn export_writes_notebook_and_reader() {
        let td = tempfile::tempdir().unwrap();
        let run = td.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("summary.csv"), "task,tone\n").unwrap();
        let out = td.path().join("nb");
        let p = export_notebook(&run, &out).unwrap();
        assert_eq!(p, out.join(NOTEBOOK_FILE));
        let nb: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(nb["nbformat"], 4);
        assert_eq!(
            std::fs::read_to_string(out.join(READER_FILE)).unwrap(),
            READER_SOURCE
        );
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(r#"RUN_REL = \"../run\""#), "relative path");
    }
}
