//! Qwen3-VL on bad or unusual input: a checkpoint missing a tensor, a tokenizer without
//! `<|image_pad|>`, images outside the processor's pixel bounds, vision captures over images of
//! different sizes.

mod common;

use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};
use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, LoadOptions, Vlm};
use sycoscope::hooks::{HookCtx, HookSpec};
use sycoscope::template::Message;

fn model_dir() -> PathBuf {
    common::shared().join("models/tiny-qwen3-vl")
}

/// A writable copy of the tiny checkpoint.
fn copy_model() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn load(dir: &Path) -> sycoscope::Result<Box<dyn Vlm>> {
    families::load_dir(dir, &LoadOptions::default())
}

fn drop_tensor(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "{name} is in the checkpoint");
    let out = dir.join("model.new.safetensors");
    safetensors::serialize_to_file(kept, None, &out).unwrap();
    std::fs::rename(out, path).unwrap();
}

#[test]
fn missing_weight_names_the_tensor() {
    for name in [
        "model.visual.deepstack_merger_list.1.norm.weight",
        "model.language_model.layers.2.self_attn.q_norm.weight",
        "model.visual.pos_embed.weight",
    ] {
        let tmp = copy_model();
        drop_tensor(tmp.path(), name);
        let e = load(tmp.path()).err().expect("load must fail").to_string();
        assert!(e.contains(name), "error does not name {name}: {e}");
    }
}

#[test]
fn tokenizer_without_image_pad_is_refused() {
    let tmp = copy_model();
    let path = tmp.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    let before = added.len();
    added.retain(|t| t["content"] != "<|image_pad|>");
    assert_eq!(added.len() + 1, before);
    std::fs::write(&path, serde_json::to_string(&tok).unwrap()).unwrap();
    let e = load(tmp.path()).err().expect("load must fail").to_string();
    assert!(e.contains("<|image_pad|>"), "{e}");
    assert!(e.contains("tokenizer.json"), "{e}");
}

fn image(w: u32, h: u32) -> DynamicImage {
    let mut img = RgbImage::new(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        *p = image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 128]);
    }
    DynamicImage::ImageRgb8(img)
}

fn ask() -> Vec<Message> {
    vec![Message::user_with_image("What is in the image?")]
}

#[test]
fn images_outside_the_pixel_bounds() {
    let model = load(&model_dir()).unwrap();
    // a side shorter than patch x merge (32): refused with the size in the message
    let e = model
        .prepare(&ask(), &[image(20, 20)], true)
        .expect_err("a 20x20 image must be refused")
        .to_string();
    assert!(e.contains("20x20") && e.contains("32"), "{e}");
    // 40x40 rounds to 32x32 = 1024 < min_pixels 4096: scaled up to 64x64 (transformers clamps)
    let p = model.prepare(&ask(), &[image(40, 40)], true).unwrap();
    assert_eq!(p.views[0].dimensions(), (64, 64));
    assert_eq!(p.spans.images[0].len(), 4);
    assert_eq!(p.pixel_values.as_ref().unwrap().dims(), &[16, 1536]);
    // 400x300 rounds to 416x288 > max_pixels 25600: scaled down to 160x128 (floor)
    let p = model.prepare(&ask(), &[image(400, 300)], true).unwrap();
    assert_eq!(p.views[0].dimensions(), (160, 128));
    let img = &p.spans.images[0];
    assert_eq!((img.rows, img.cols), (4, 5));
    // the image runs end to end
    let mut ctx = HookCtx::none();
    let l = model
        .forward(&[&p], &mut ctx, LogitsFor::Last, None)
        .unwrap();
    assert_eq!(l.dims(), &[1, 1, 1024]);
}

#[test]
fn other_bad_inputs() {
    let model = load(&model_dir()).unwrap();
    // no image part
    let e = model
        .prepare(&[Message::text("user", "hi")], &[], true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no image"), "{e}");
    // pixel values of the wrong shape
    let mut p = model.prepare(&ask(), &[image(64, 64)], true).unwrap();
    let bad = candle_core::Tensor::zeros(
        (15, 1536),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = model
        .set_pixel_values(&mut p, bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[15, 1536]"), "{e}");
    // grid and pixels that disagree
    let mut q = p.clone();
    q.extra.insert(
        "image_grid_thw".into(),
        candle_core::Tensor::new(&[[1i64, 4, 6]], &candle_core::Device::Cpu).unwrap(),
    );
    let mut ctx = HookCtx::none();
    let e = model
        .forward(&[&q], &mut ctx, LogitsFor::Last, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("24") && e.contains("16"), "{e}");
}

#[test]
fn vision_captures_over_images_of_different_sizes() {
    let model = load(&model_dir()).unwrap();
    let small = model.prepare(&ask(), &[image(64, 64)], true).unwrap();
    let large = model.prepare(&ask(), &[image(128, 96)], true).unwrap();
    let hooks = model.hook_points();
    // equal sizes stack over the images
    let spec =
        HookSpec::parse_captures("vision.blocks.0.hook_resid_post,vision.deepstack.0.hook_out")
            .unwrap()
            .resolve(&hooks)
            .unwrap();
    let mut ctx = HookCtx::new(&spec, vec![]);
    model
        .forward(&[&small, &small], &mut ctx, LogitsFor::Last, None)
        .unwrap();
    assert_eq!(
        ctx.captures
            .require("vision.blocks.0.hook_resid_post")
            .unwrap()
            .dims(),
        &[2, 16, 64]
    );
    assert_eq!(
        ctx.captures
            .require("vision.deepstack.0.hook_out")
            .unwrap()
            .dims(),
        &[2, 4, 128]
    );
    // different sizes: a clear error, unless positions are reduced
    let mut ctx = HookCtx::new(&spec, vec![]);
    let e = model
        .forward(&[&small, &large], &mut ctx, LogitsFor::Last, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different patch counts"), "{e}");
    let spec = HookSpec::parse_captures("vision.blocks.0.hook_resid_post:mean")
        .unwrap()
        .resolve(&hooks)
        .unwrap();
    let mut ctx = HookCtx::new(&spec, vec![]);
    model
        .forward(&[&small, &large], &mut ctx, LogitsFor::Last, None)
        .unwrap();
    let key = ctx.captures.tensors.keys().next().unwrap().clone();
    assert_eq!(ctx.captures.require(&key).unwrap().dims(), &[2, 64]);
}
