//! The Python reader (`notebooks-export/sycoscope_reader.py`) reads what the Rust store writes:
//! same rows, same values, same committed-only view after a crash. Skips (with a notice) when
//! python3 lacks numpy or safetensors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use sycoscope::store::{RowMeta, StoreManifest, StoreReader, StoreWriter};

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "NOTICE: skipping the Python reader test: python3 with numpy and safetensors is not \
             available (pip install -r .ci/requirements.txt)"
        );
    }
    ok
}

/// Run `script` with the reader importable and `RUN` set to `run`; return its stdout as JSON.
fn run_python(run: &Path, script: &str) -> serde_json::Value {
    let reader_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("notebooks-export");
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .env("PYTHONPATH", &reader_dir)
        .env("RUN", run)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn val(i: usize, k: usize) -> f32 {
    i as f32 * 0.5 + k as f32 * 0.001 - 3.0
}

fn write_run(run: &Path) {
    std::fs::create_dir_all(run).unwrap();
    std::fs::write(run.join("manifest.json"), r#"{"name": "pyrun"}"#).unwrap();
    let mut ex = std::fs::File::create(run.join("examples.jsonl")).unwrap();
    for i in 0..3 {
        writeln!(ex, r#"{{"id": "ex{i}", "flip": {}}}"#, i % 2).unwrap();
    }
    ex.write_all(br#"{"id": "torn"#).unwrap();
    std::fs::write(run.join("summary.json"), r#"{"flip_rate": 0.25}"#).unwrap();

    let manifest = StoreManifest {
        model: "tiny".into(),
        weights_hash: "abc".into(),
        seed: 42,
        ..Default::default()
    };
    let mut w = StoreWriter::create_or_resume(&run.join("store"), &manifest).unwrap();
    w.set_rows_per_shard(4);
    for i in 0..10 {
        let meta = RowMeta {
            example_id: format!("ex{i}"),
            condition: if i < 5 {
                "r1".into()
            } else {
                "r2:strong".into()
            },
            task: "count".into(),
            tone: (i >= 5).then(|| "strong".into()),
            labels: BTreeMap::from([("sycophantic".to_string(), (i % 3 == 0) as u8 as f64)]),
            extra: BTreeMap::new(),
        };
        let a = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |ix| val(i, ix[0] * 3 + ix[1]));
        let b = ArrayD::from_shape_fn(IxDyn(&[5]), |ix| -val(i, ix[0]));
        // A ragged hook: length 2 in rows 0..4, 3 after (the writer cuts shards on change).
        let len = if i < 4 { 2 } else { 3 };
        let c = ArrayD::from_shape_fn(IxDyn(&[len]), |ix| (i * 10 + ix[0]) as f32);
        w.push(
            meta,
            vec![
                ("blocks.0.hook_resid_post".into(), a),
                ("blocks.1.hook_attn_out".into(), b),
                ("ragged".into(), c),
            ],
        )
        .unwrap();
    }
    w.finish().unwrap();
}

const SCRIPT: &str = r#"
import json, os
import numpy as np
from sycoscope_reader import open_store, load_run
run = os.environ["RUN"]
st = open_store(run)
st2 = open_store(os.path.join(run, "store"))
a = st.load("blocks.0.hook_resid_post")
sel = st.select(lambda r: r["labels"]["sycophantic"] == 1)
part = st.load("blocks.1.hook_attn_out", rows=[9, 0, 4, 4])
try:
    st.load("blocks.0.hook_resid_pst"); unknown = ""
except KeyError as e:
    unknown = str(e)
try:
    st.load("ragged"); ragged_err = ""
except ValueError as e:
    ragged_err = str(e)
rag = st.load_ragged("ragged")
r = load_run(run)
try:
    import pandas
    df = st.frame()
    frame = {"cols": list(df.columns), "syc": float(df["sycophantic"].sum()), "n": len(df)}
except ImportError:
    frame = None
print(json.dumps({"frame": frame,
    "manifest": st.manifest, "hooks": st.hooks(), "n": len(st.index), "n2": len(st2.index),
    "a_shape": list(a.shape), "a_dtype": str(a.dtype), "a": a.ravel().tolist(),
    "sel": sel, "part_shape": list(part.shape), "part": part.ravel().tolist(),
    "ids": [x["example_id"] for x in st.index], "tones": [x["tone"] for x in st.index],
    "unknown": unknown, "ragged_err": ragged_err, "rag_lens": [len(x) for x in rag],
    "rag9": rag[9].tolist(),
    "examples": [e["id"] for e in r.examples], "summary": r.summary,
    "run_manifest": r.manifest, "run_store_rows": len(r.store),
}))
"#;

#[test]
fn python_reader_matches_rust() {
    if !python_ready() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let run = td.path().join("run");
    write_run(&run);
    let rust = StoreReader::open(&run).unwrap();
    let got = run_python(&run, SCRIPT);

    assert_eq!(got["manifest"]["model"], "tiny");
    assert_eq!(got["manifest"]["seed"], 42);
    assert_eq!(
        got["hooks"],
        serde_json::json!(rust.hooks()),
        "same hook list as Rust"
    );
    assert_eq!(got["n"], 10);
    assert_eq!(got["n2"], 10);
    assert_eq!(got["a_shape"], serde_json::json!([10, 2, 3]));
    assert_eq!(got["a_dtype"], "float32");
    let a_rust = rust.read("blocks.0.hook_resid_post").unwrap();
    let a_py: Vec<f32> = serde_json::from_value(got["a"].clone()).unwrap();
    assert_eq!(a_py, a_rust.iter().copied().collect::<Vec<_>>());
    assert_eq!(a_py[7 * 6 + 4], val(7, 4), "known value, bit-exact");

    assert_eq!(got["sel"], serde_json::json!([0, 3, 6, 9]));
    assert_eq!(got["part_shape"], serde_json::json!([4, 5]));
    let part_rust = rust
        .read_rows("blocks.1.hook_attn_out", &[9, 0, 4, 4])
        .unwrap();
    let part_py: Vec<f32> = serde_json::from_value(got["part"].clone()).unwrap();
    assert_eq!(part_py, part_rust.iter().copied().collect::<Vec<_>>());
    assert_eq!(part_py[0], -val(9, 0));

    assert_eq!(got["ids"][9], "ex9");
    assert_eq!(got["tones"][0], serde_json::Value::Null);
    assert_eq!(got["tones"][9], "strong");
    assert!(got["unknown"]
        .as_str()
        .unwrap()
        .contains("blocks.0.hook_resid_post"));
    assert!(got["ragged_err"].as_str().unwrap().contains("load_ragged"));
    assert_eq!(
        got["rag_lens"],
        serde_json::json!([2, 2, 2, 2, 3, 3, 3, 3, 3, 3])
    );
    assert_eq!(got["rag9"], serde_json::json!([90.0, 91.0, 92.0]));
    assert_eq!(
        got["examples"],
        serde_json::json!(["ex0", "ex1", "ex2"]),
        "torn example line dropped"
    );
    assert_eq!(got["summary"]["flip_rate"], 0.25);
    assert_eq!(got["run_manifest"]["name"], "pyrun");
    assert_eq!(got["run_store_rows"], 10);
    if got["frame"].is_null() {
        eprintln!("NOTICE: pandas not installed; Store.frame() not tested");
    } else {
        assert_eq!(got["frame"]["n"], 10);
        assert_eq!(got["frame"]["syc"], 4.0);
        assert!(got["frame"]["cols"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("example_id")));
    }
}

#[test]
fn python_reader_sees_only_committed_rows_after_a_crash() {
    if !python_ready() {
        return;
    }
    let td = tempfile::tempdir().unwrap();
    let run = td.path().join("run");
    write_run(&run);
    let store = run.join("store");
    // Crash debris: the last shard (rows 8..10) only half indexed and its line torn, plus an
    // unindexed shard file and a temporary file.
    let index = std::fs::read_to_string(store.join("index.jsonl")).unwrap();
    let lines: Vec<&str> = index.lines().collect();
    let mut cut = lines[..9].join("\n");
    cut.push('\n');
    cut.push_str(&lines[9][..20]);
    std::fs::write(store.join("index.jsonl"), cut).unwrap();
    std::fs::copy(
        store.join("shard-000001.safetensors"),
        store.join("shard-000004.safetensors"),
    )
    .unwrap();
    std::fs::write(store.join("shard-000005.safetensors.123.tmp"), b"junk").unwrap();

    let rust = StoreReader::open(&run).unwrap();
    assert_eq!(rust.len(), 8);
    let got = run_python(
        &run,
        r#"
import json, os
from sycoscope_reader import open_store
st = open_store(os.environ["RUN"])
print(json.dumps({"n": len(st.index), "shape": list(st.load("blocks.1.hook_attn_out").shape)}))
"#,
    );
    assert_eq!(got["n"], 8);
    assert_eq!(got["shape"], serde_json::json!([8, 5]));
}
