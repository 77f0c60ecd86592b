//! PaliGemma refuses bad checkpoints and bad conversations with errors that name the problem.

mod common;

use std::path::{Path, PathBuf};

use sycoscope::families::{self, LoadOptions};
use sycoscope::template::Message;

fn model_dir() -> PathBuf {
    common::shared().join("models").join("tiny-paligemma")
}

/// A copy of the tiny checkpoint in a temp dir, every file but the ones `skip` names.
fn copy_model(skip: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(&p, tmp.path().join(&name)).unwrap();
        }
    }
    tmp
}

fn load_err(dir: &Path) -> String {
    match families::load_dir(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_weight_is_named() {
    let tmp = copy_model(&["model.safetensors"]);
    let mut w = candle_core::safetensors::load(
        model_dir().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let gone = "language_model.model.layers.2.mlp.up_proj.weight";
    assert!(w.remove(gone).is_some());
    candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
    let msg = load_err(tmp.path());
    println!("{msg}");
    assert!(msg.contains(gone), "error does not name the tensor: {msg}");

    // the vision side too
    let mut w2 = w.clone();
    w2.insert(
        gone.into(),
        candle_core::Tensor::zeros(
            (256, 128),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let gone2 = "vision_tower.vision_model.embeddings.patch_embedding.bias";
    assert!(w2.remove(gone2).is_some());
    candle_core::safetensors::save(&w2, tmp.path().join("model.safetensors")).unwrap();
    let msg = load_err(tmp.path());
    assert!(msg.contains(gone2), "error does not name the tensor: {msg}");
}

#[test]
fn tokenizer_without_image_token_is_refused() {
    let tmp = copy_model(&["tokenizer.json"]);
    let text = std::fs::read_to_string(model_dir().join("tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for t in v["added_tokens"].as_array_mut().unwrap() {
        if t["content"] == "<image>" {
            t["content"] = "<img>".into();
        }
    }
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    let id = vocab.remove("<image>").unwrap();
    vocab.insert("<img>".into(), id);
    std::fs::write(tmp.path().join("tokenizer.json"), v.to_string()).unwrap();
    let msg = load_err(tmp.path());
    println!("{msg}");
    assert!(
        msg.contains("tokenizer.json") && msg.contains("<image>") && msg.contains("2152"),
        "unclear error: {msg}"
    );
}

#[test]
fn conversation_without_image_is_refused() {
    let model = common::load_model("tiny-paligemma");
    let msgs = vec![Message::text("user", "What colour is it?")];
    let err = model.prepare(&msgs, &[], true).unwrap_err().to_string();
    assert!(err.contains("no image"), "unclear error: {err}");
    // an image part but no pixels, and pixels without an image part
    let img = image::DynamicImage::new_rgb8(10, 10);
    let with = vec![Message::user_with_image("What colour is it?")];
    let err = model.prepare(&with, &[], true).unwrap_err().to_string();
    assert!(
        err.contains("1 image part") && err.contains("0 image"),
        "{err}"
    );
    let err = model.prepare(&msgs, &[img], true).unwrap_err().to_string();
    assert!(err.contains("no image"), "{err}");
}

#[test]
fn wrong_pixel_shape_is_refused() {
    let model = common::load_model("tiny-paligemma");
    let img = image::DynamicImage::new_rgb8(30, 20);
    let mut p = model
        .prepare(&[Message::user_with_image("Hi")], &[img], true)
        .unwrap();
    let bad = candle_core::Tensor::zeros(
        (1, 3, 64, 64),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let err = model.set_pixel_values(&mut p, bad).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 56, 56]"), "{err}");
}
