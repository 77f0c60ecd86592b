//! The exported notebook runs: a synthetic run folder (store, probes, summary) is exported and
//! executed with nbclient; no cell may error and every section must draw. A bare run (no store,
//! no probes) runs too, each missing section printing its note. Skips with a NOTICE when python3
//! lacks nbclient, nbformat, ipykernel, numpy, pandas, matplotlib or safetensors
//! (`pip install -r .ci/requirements-notebook.txt`).

mod synth_run;

use std::path::Path;
use std::process::Command;

use sycoscope::export::{export_notebook, NOTEBOOK_FILE, READER_FILE};

const DEPS: &str = "import nbclient, nbformat, ipykernel, numpy, pandas, matplotlib, safetensors";

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", DEPS])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "NOTICE: skipping the notebook execution test: python3 with nbclient, nbformat, \
             ipykernel, numpy, pandas, matplotlib and safetensors is not available \
             (pip install -r .ci/requirements-notebook.txt)"
        );
    }
    ok
}

const RUNNER: &str = r#"
import json, os, sys
import nbformat
from nbclient import NotebookClient
path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                        resources={"metadata": {"path": os.path.dirname(path)}})
env_run = os.environ.pop("SYCOSCOPE_RUN", None)
client.execute()
texts, pngs, errors = [], 0, []
for c in nb.cells:
    for o in c.get("outputs", []):
        if o.get("output_type") == "stream":
            texts.append(o.get("text", ""))
        elif o.get("output_type") in ("display_data", "execute_result"):
            if "image/png" in o.get("data", {}):
                pngs += 1
        elif o.get("output_type") == "error":
            errors.append("%s: %s" % (o.get("ename"), o.get("evalue")))
nbformat.write(nb, sys.argv[2])
print(json.dumps({"text": "".join(texts), "pngs": pngs, "errors": errors}))
"#;

struct Executed {
    text: String,
    pngs: usize,
    errors: Vec<String>,
}

fn execute(nb: &Path, executed: &Path) -> Executed {
    let out = Command::new("python3")
        .arg("-c")
        .arg(RUNNER)
        .arg(nb)
        .arg(executed)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "nbclient failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("runner printed no JSON ({e}):\n{stdout}"));
    Executed {
        text: v["text"].as_str().unwrap_or("").to_string(),
        pngs: v["pngs"].as_u64().unwrap_or(0) as usize,
        errors: v["errors"]
            .as_array()
            .map(|a| a.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default(),
    }
}

fn artifacts() -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn full_run_notebook_executes_and_draws_every_section() {
    let td = tempfile::tempdir().unwrap();
    let run = td.path().join("runs").join("syn");
    synth_run::write_run(
        &run,
        &synth_run::Opts {
            store: true,
            probes: true,
        },
    );
    let out = td.path().join("notebook");
    let nb = export_notebook(&run, &out).unwrap();
    assert_eq!(nb, out.join(NOTEBOOK_FILE));
    assert!(out.join(READER_FILE).exists());
    let text = std::fs::read_to_string(&nb).unwrap();
    assert!(
        text.contains(r#"RUN_REL = \"../runs/syn\""#),
        "relative run path"
    );
    if !python_ready() {
        return;
    }
    let r = execute(&nb, &artifacts().join("sycoscope_run_full.ipynb"));
    assert!(
        r.errors.is_empty(),
        "cells errored: {:?}\n{}",
        r.errors,
        r.text
    );
    for want in [
        "examples: 6",
        "store: 18 rows",
        "metric rows: 4",
        "probe curves drawn: 1",
        "reliance conditions drawn: 3",
        "heatmap panels drawn: 8",
        "heatmap example: syn-0000 | conditions: r1, r2:strong",
        "logit-lens conditions drawn: 3",
    ] {
        assert!(r.text.contains(want), "missing '{want}' in:\n{}", r.text);
    }
    assert!(!r.text.contains("note:"), "unexpected note:\n{}", r.text);
    assert_eq!(r.pngs, 4, "one figure per drawing section");
}

#[test]
fn bare_run_notebook_skips_missing_parts_with_notes() {
    let td = tempfile::tempdir().unwrap();
    let run = td.path().join("bare");
    synth_run::write_run(
        &run,
        &synth_run::Opts {
            store: false,
            probes: false,
        },
    );
    let nb = export_notebook(&run, &run.join("nb")).unwrap();
    if !python_ready() {
        return;
    }
    let r = execute(&nb, &artifacts().join("sycoscope_run_bare.ipynb"));
    assert!(
        r.errors.is_empty(),
        "cells errored: {:?}\n{}",
        r.errors,
        r.text
    );
    for want in [
        "store: none",
        "metric rows: 4",
        "note: no probes in this run",
        "note: no activation store in this run: visual-reliance curves skipped",
        "note: no activation store in this run: heatmaps skipped",
        "note: no activation store in this run: logit lens skipped",
    ] {
        assert!(r.text.contains(want), "missing '{want}' in:\n{}", r.text);
    }
    assert_eq!(r.pngs, 0);
}
