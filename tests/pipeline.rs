//! Run-level analyses: probes over a run's store (planted signal), attention curves and
//! heatmaps from a real run, the amplification sweep, the one-command spec, and their bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sycoscope::families::{self, LoadOptions};
use sycoscope::pipeline;
use sycoscope::probes::ProbeConfig;
use sycoscope::protocol::runner::{self, EvalJob, EvalOptions};
use sycoscope::store::{RowMeta, StoreManifest, StoreWriter};

fn synth(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let bench = dir.join("bench");
    sycoscope::synth_model::write_llava(&model, &Default::default(), candle_core::DType::F32)
        .unwrap();
    let cfg = sycoscope::protocol::synth::SynthConfig {
        n,
        seed: 5,
        size: 84,
        ..Default::default()
    };
    sycoscope::protocol::synth::write_bench(&cfg, &bench).unwrap();
    (model, bench)
}

/// A run directory whose store has a planted linear signal for `sycophantic` in layer 2 only.
fn planted_run(dir: &Path) -> PathBuf {
    let run = dir.join("planted");
    std::fs::create_dir_all(&run).unwrap();
    let manifest = serde_json::json!({
        "model": "m", "family": "llava", "weights_hash": "w1", "data": "d", "data_hash": "d1",
        "template_hash": "t", "letters": {"ids": [1, 2], "tokens": ["A", "B"], "separator": " "},
        "options": serde_json::to_value(EvalOptions::default()).unwrap(), "n_layers": 4,
        "tool_version": "test", "seed": 0
    });
    std::fs::write(
        run.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let sm = StoreManifest {
        model: "m".into(),
        weights_hash: "w1".into(),
        data_hash: "d1".into(),
        ..Default::default()
    };
    let mut w = StoreWriter::create_or_resume(&run.join("store"), &sm).unwrap();
    let mut state = 12345u64;
    let mut rnd = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
    };
    for i in 0..200 {
        let y = i % 2 == 0;
        let mut tensors = Vec::new();
        for l in 0..4 {
            let mut v: Vec<f32> = (0..16).map(|_| rnd()).collect();
            if l == 2 {
                v[3] += if y { 0.8 } else { -0.8 };
            }
            tensors.push((
                format!("blocks.{l}.hook_resid_post@last"),
                ndarray::ArrayD::from_shape_vec(vec![1, 16], v).unwrap(),
            ));
        }
        let mut labels = BTreeMap::new();
        labels.insert("sycophantic".to_string(), if y { 1.0 } else { 0.0 });
        labels.insert("r1_correct".to_string(), 1.0);
        let meta = RowMeta {
            example_id: format!("e{i}"),
            condition: "r2:strong".into(),
            task: "color".into(),
            tone: Some("strong".into()),
            labels,
            extra: BTreeMap::new(),
        };
        w.push(meta, tensors).unwrap();
    }
    w.finish().unwrap();
    run
}

#[test]
fn probe_finds_the_planted_layer_and_refuses_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let run = planted_run(dir.path());
    let c = pipeline::probe_run(
        &run,
        "blocks.*.hook_resid_post@last",
        "sycophantic",
        &ProbeConfig::default(),
    )
    .unwrap();
    assert_eq!(c.peak_layer, 2);
    let peak = c.layers.iter().find(|l| l.layer == 2).unwrap();
    assert!(peak.auc_mean > 0.9, "{}", peak.auc_mean);
    assert!(
        (peak.control_auc - 0.5).abs() < 0.12,
        "control {}",
        peak.control_auc
    );
    for l in c.layers.iter().filter(|l| l.layer != 2) {
        assert!(l.auc_mean < 0.7, "layer {} {}", l.layer, l.auc_mean);
    }
    for f in [
        "curve.csv",
        "curve.json",
        "weights.safetensors",
        "curve.png",
        "curve.svg",
    ] {
        assert!(run.join("probes/sycophantic").join(f).exists(), "{f}");
    }
    // one class only: a clear error and no curve drawn
    let err = pipeline::probe_run(
        &run,
        "blocks.*.hook_resid_post@last",
        "tone:strong",
        &ProbeConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("one class"), "{err}");
    assert!(!run.join("probes/tone_strong").exists());
    // a hook glob that matches nothing, an unknown label
    assert!(pipeline::probe_run(
        &run,
        "blocks.*.hook_mlp_out",
        "sycophantic",
        &ProbeConfig::default()
    )
    .is_err());
    assert!(pipeline::probe_run(
        &run,
        "blocks.*.hook_resid_post@last",
        "happiness",
        &ProbeConfig::default()
    )
    .is_err());
    // a store from another model
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    m["weights_hash"] = "other".into();
    std::fs::write(run.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let err = pipeline::probe_run(
        &run,
        "blocks.*.hook_resid_post@last",
        "sycophantic",
        &ProbeConfig::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("another model"), "{err}");
}

#[test]
fn attention_sweep_and_spec_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bench) = synth(dir.path(), 6);
    let m = families::load_dir(&model, &LoadOptions::default()).unwrap();
    let run = dir.path().join("run");
    let job = EvalJob {
        model_source: model.to_str().unwrap(),
        data: bench.to_str().unwrap(),
        run: &run,
        opts: EvalOptions {
            capture: Some("default".into()),
            ..Default::default()
        },
        load: Default::default(),
        progress: false,
    };
    let plain = runner::eval(m.as_ref(), &job).unwrap();
    let files = pipeline::attention_curves(&run, &["image_share", "pressure_share"]).unwrap();
    assert!(files
        .iter()
        .any(|f| f.ends_with("reliance_image_share.png")));
    let csv = std::fs::read_to_string(run.join("attention/reliance_pressure_share.csv")).unwrap();
    assert!(csv.contains("neutral") && csv.contains("strong"), "{csv}");
    let hm = pipeline::attention_heatmaps(&run, None, "strong", None).unwrap();
    assert!(hm
        .iter()
        .any(|f| f.to_string_lossy().contains("heatmap_diff")));
    assert!(
        pipeline::attention_heatmaps(&run, Some("no-such-id"), "strong", None)
            .unwrap_err()
            .to_string()
            .contains("no example")
    );
    // sweep: lambda 0 reproduces the plain run
    let rows = pipeline::sweep(
        m.as_ref(),
        model.to_str().unwrap(),
        bench.to_str().unwrap(),
        &dir.path().join("sweep"),
        &[0.0, 2.0],
        &["high".into()],
        &EvalOptions::default(),
        &Default::default(),
        false,
    )
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].acc_r1, plain.overall().acc_r1.rate);
    assert_eq!(rows[0].syc, plain.overall().syc.rate);
    assert!(
        dir.path().join("sweep/sweep.csv").exists() && dir.path().join("sweep/sweep.png").exists()
    );
    // the one-command spec
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "[model]\nsource = \"{}\"\n[data]\nsynth = true\nn = 6\nsize = 84\n[eval]\nbatch_size = 3\n[probe]\nlabels = [\"sycophantic\"]\n[out]\ndir = \"{}\"\nfigures = \"{}\"\n",
            model.display(),
            dir.path().join("specrun").display(),
            dir.path().join("figs").display()
        ),
    )
    .unwrap();
    let (out, report) = pipeline::run_spec(&spec, false).unwrap();
    assert!(report.contains("Acc@R1"), "{report}");
    assert!(out.join("summary.csv").exists() && out.join("report.txt").exists());
    assert!(std::fs::read_dir(dir.path().join("figs")).unwrap().count() > 2);
    // a malformed spec names the problem
    std::fs::write(&spec, "[model]\nsource = 3\n").unwrap();
    let err = pipeline::run_spec(&spec, false).unwrap_err().to_string();
    assert!(err.contains("spec.toml"), "{err}");
}
