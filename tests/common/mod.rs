//! Helpers shared by the parity tests: fixture loading and comparison against the reference
//! activations from Hugging Face transformers in `../shared/fixtures`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sycoscope::families::{self, LoadOptions, Vlm};
use sycoscope::hooks::{HookCtx, HookPoint, HookSpec};
use sycoscope::template::Message;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub struct Case {
    pub name: String,
    pub meta: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
    pub messages: Vec<Message>,
    pub images: Vec<image::DynamicImage>,
}

pub fn cases(model: &str) -> Vec<Case> {
    let dir = shared().join("fixtures").join(model);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
            let messages = sycoscope::template::parse_messages(&text, &p).unwrap();
            let tensors =
                candle_core::safetensors::load(p.with_extension("safetensors"), &Device::Cpu)
                    .unwrap();
            let images = meta["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    sycoscope::preprocess::load_image(
                        &shared().join("images").join(i.as_str().unwrap()),
                    )
                    .unwrap()
                })
                .collect();
            Case {
                name: p.file_stem().unwrap().to_string_lossy().into(),
                meta,
                tensors,
                messages,
                images,
            }
        })
        .collect()
}

pub fn load_model(model: &str) -> Box<dyn Vlm> {
    families::load_dir(
        &shared().join("models").join(model),
        &LoadOptions::default(),
    )
    .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    // -inf == -inf counts as equal
    let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    av.iter()
        .zip(&bv)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f32::max)
}

/// Hooks in the fixture that the model knows (names parse as hook points).
pub fn fixture_hooks(case: &Case, model: &dyn Vlm) -> Vec<String> {
    let avail: Vec<String> = model.hook_points().iter().map(|h| h.to_string()).collect();
    let mut v: Vec<String> = case
        .tensors
        .keys()
        .filter(|k| k.parse::<HookPoint>().is_ok() && avail.contains(k))
        .cloned()
        .collect();
    v.sort();
    v
}

/// Run the full parity contract of hooks.md on every case of `model`; returns a report.
pub fn check_parity(model_name: &str) -> String {
    let model = load_model(model_name);
    let mut report = String::new();
    for case in cases(model_name) {
        let p = model.prepare(&case.messages, &case.images, true).unwrap();
        assert_eq!(
            p.prompt_text,
            case.meta["prompt_text"].as_str().unwrap(),
            "{}: prompt text",
            case.name
        );
        let ids: Vec<u32> = case.tensors["input_ids"]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(p.ids, ids, "{}: input_ids", case.name);
        // own preprocessing
        let own = p.pixel_values.clone().unwrap();
        let d_tv = max_abs_diff(&own, &case.tensors["pixel_values"]);
        let d_pil = max_abs_diff(&own, &case.tensors["pixel_values_pil"]);
        assert!(
            d_tv.min(d_pil) <= 0.02,
            "{}: preprocessing differs by {d_tv} (torchvision) / {d_pil} (PIL)",
            case.name
        );
        // activations fed the reference pixels
        let mut p = p;
        model
            .set_pixel_values(&mut p, case.tensors["pixel_values"].clone())
            .unwrap();
        let hooks = fixture_hooks(&case, model.as_ref());
        assert!(hooks.len() > 10, "{}: too few hooks to compare", case.name);
        let spec = HookSpec::parse_captures(&hooks.join(",")).unwrap();
        let resolved = spec.resolve(&model.hook_points()).unwrap();
        let mut ctx = HookCtx::new(&resolved, vec![]);
        let logits = model
            .forward(&[&p], &mut ctx, sycoscope::blocks::LogitsFor::All, None)
            .unwrap();
        let mut worst_act = 0f32;
        let mut worst_pat = 0f32;
        for h in &hooks {
            let ours = ctx.captures.require(h).unwrap();
            let d = max_abs_diff(ours, &case.tensors[h]);
            let tol = if h.contains("pattern") { 1e-5 } else { 1e-4 };
            assert!(
                d <= tol,
                "{}: {h} differs by {d} (tolerance {tol})",
                case.name
            );
            if h.contains("pattern") {
                worst_pat = worst_pat.max(d);
            } else {
                worst_act = worst_act.max(d);
            }
        }
        let dl = max_abs_diff(&logits, &case.tensors["logits"]);
        assert!(dl <= 1e-4, "{}: logits differ by {dl}", case.name);
        // greedy decoding with a KV cache
        let gen = families::generate_greedy(model.as_ref(), &p, 8, 8).unwrap();
        let want: Vec<u32> = case.tensors["generated_ids"]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gen, want, "{}: generated ids", case.name);
        report.push_str(&format!(
            "{model_name}/{}: {} hooks, max |d| activations {worst_act:.2e}, patterns {worst_pat:.2e}, logits {dl:.2e}, pixels {d_tv:.4} (tv) / {d_pil:.4} (pil)\n",
            case.name,
            hooks.len()
        ));
    }
    report
}

/// Compare an integer tensor the model's `prepare()` puts in `Prepared::extra` (e.g.
/// InstructBLIP's `qformer_input_ids`) with the fixture's tensor of the same name, on every
/// case of `model_name`; returns a report line per case.
pub fn check_prepared_extra_ids(model_name: &str, key: &str) -> String {
    let model = load_model(model_name);
    let mut report = String::new();
    for case in cases(model_name) {
        let p = model.prepare(&case.messages, &case.images, true).unwrap();
        let ours: Vec<u32> = p
            .extra
            .get(key)
            .unwrap_or_else(|| panic!("{}: prepare() gives no '{key}'", case.name))
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<u32> = case
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: the fixture has no '{key}'", case.name))
            .flatten_all()
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours, want, "{}: {key}", case.name);
        report.push_str(&format!(
            "{model_name}/{}: {key} identical ({} ids)\n",
            case.name,
            ours.len()
        ));
    }
    report
}
