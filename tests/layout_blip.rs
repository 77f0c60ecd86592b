//! BLIP-2 checkpoints saved before transformers 5 keep the vision attention's biases as
//! `q_bias` / `v_bias` (k has none) instead of one fused `qkv.bias`; both layouts load and
//! give the same logits (a key bias shifts every score of a query row alike, so dropping it
//! leaves the attention unchanged).

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, LoadOptions};
use sycoscope::hooks::HookCtx;

#[test]
fn legacy_q_v_bias_layout_matches_fused_bias() {
    let src = common::shared().join("models/tiny-blip2-opt");
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
        }
    }
    let f = t.path().join("model.safetensors");
    let _ = std::fs::remove_file(&f);
    let mut w: HashMap<String, Tensor> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let fused: Vec<String> = w
        .keys()
        .filter(|k| k.ends_with("self_attn.qkv.bias"))
        .cloned()
        .collect();
    assert_eq!(fused.len(), 2);
    for k in fused {
        let b = w.remove(&k).unwrap();
        let d = b.dim(0).unwrap() / 3;
        let base = k.trim_end_matches("qkv.bias");
        w.insert(format!("{base}q_bias"), b.narrow(0, 0, d).unwrap());
        w.insert(format!("{base}v_bias"), b.narrow(0, 2 * d, d).unwrap());
    }
    candle_core::safetensors::save(&w, &f).unwrap();
    let legacy = families::load_dir(t.path(), &LoadOptions::default()).unwrap();
    let fused = common::load_model("tiny-blip2-opt");
    let case = &common::cases("tiny-blip2-opt")[0];
    let mut p = fused.prepare(&case.messages, &case.images, true).unwrap();
    fused
        .set_pixel_values(&mut p, case.tensors["pixel_values"].clone())
        .unwrap();
    let a = fused
        .forward(&[&p], &mut HookCtx::none(), LogitsFor::All, None)
        .unwrap();
    let b = legacy
        .forward(&[&p], &mut HookCtx::none(), LogitsFor::All, None)
        .unwrap();
    let diff = common::max_abs_diff(&a, &b);
    let want = common::max_abs_diff(&b, &case.tensors["logits"]);
    println!("legacy vs fused: {diff:.2e}; legacy vs transformers: {want:.2e}");
    assert!(diff < 1e-4 && want < 1e-4);
}
