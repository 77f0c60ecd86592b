//! Bad input for BLIP-2 / InstructBLIP: clear errors, never panics.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, LoadOptions};
use sycoscope::hooks::HookCtx;
use sycoscope::template::Message;
use sycoscope::Error;

/// Copy a checkpoint folder (recursively) into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
            let mut perm = std::fs::metadata(&to).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&to, perm).unwrap();
        }
    }
}

fn model_copy(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&common::shared().join("models").join(name), t.path());
    t
}

fn load_err(dir: &Path) -> Error {
    match families::load_dir(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{}: loaded although it should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn instructblip_without_qformer_tokenizer() {
    let t = model_copy("tiny-instructblip-vicuna");
    std::fs::remove_dir_all(t.path().join("qformer_tokenizer")).unwrap();
    let e = load_err(t.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::Config { .. }), "{msg}");
    assert!(msg.contains("qformer_tokenizer"), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    println!("{msg}");
}

#[test]
fn missing_weight_is_named() {
    for (name, tensor) in [
        ("tiny-blip2-opt", "language_projection.weight"),
        (
            "tiny-blip2-opt",
            "qformer.encoder.layer.1.output_query.LayerNorm.bias",
        ),
        (
            "tiny-blip2-opt",
            "language_model.model.decoder.embed_positions.weight",
        ),
        (
            "tiny-instructblip-vicuna",
            "qformer.embeddings.word_embeddings.weight",
        ),
        ("tiny-instructblip-vicuna", "query_tokens"),
    ] {
        let t = model_copy(name);
        let f = t.path().join("model.safetensors");
        let mut w: HashMap<String, Tensor> =
            candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
        assert!(w.remove(tensor).is_some(), "{tensor} not in {name}");
        candle_core::safetensors::save(&w, &f).unwrap();
        let e = load_err(t.path());
        let msg = e.to_string();
        assert!(matches!(e, Error::Weights(_)), "{name}: {msg}");
        assert!(
            msg.contains(tensor),
            "{name}: the error should name {tensor}: {msg}"
        );
        println!("{msg}");
    }
}

#[test]
fn misshapen_query_tokens() {
    let t = model_copy("tiny-blip2-opt");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("config.json")).unwrap())
            .unwrap();
    cfg["num_query_tokens"] = serde_json::json!(5);
    std::fs::write(t.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = load_err(t.path()).to_string();
    assert!(msg.contains("query_tokens"), "{msg}");
}

#[test]
fn config_without_image_token() {
    let t = model_copy("tiny-blip2-opt");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("image_token_index");
    std::fs::write(t.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = load_err(t.path()).to_string();
    assert!(msg.contains("image_token_index"), "{msg}");
}

#[test]
fn wrong_image_counts_and_pixels() {
    for name in ["tiny-blip2-opt", "tiny-instructblip-vicuna"] {
        let model = common::load_model(name);
        let img = common::cases(name)[0].images[0].clone();
        let one = vec![Message::user_with_image("What is it?")];
        // no image given for an image part
        assert!(model.prepare(&one, &[], true).is_err());
        // two images: BLIP takes one
        let two = vec![
            Message::user_with_image("What is it?"),
            Message::user_with_image("And this?"),
        ];
        let msg = model
            .prepare(&two, &[img.clone(), img.clone()], true)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("at most 1"), "{msg}");
        // pixel values of the wrong shape
        let mut p = model
            .prepare(&one, std::slice::from_ref(&img), true)
            .unwrap();
        let bad = Tensor::zeros((1, 3, 28, 28), candle_core::DType::F32, &Device::Cpu).unwrap();
        let msg = model.set_pixel_values(&mut p, bad).unwrap_err().to_string();
        assert!(msg.contains("pixel values"), "{msg}");
    }
}

#[test]
fn instructblip_input_without_qformer_ids() {
    let name = "tiny-instructblip-vicuna";
    let model = common::load_model(name);
    let case = &common::cases(name)[0];
    let mut p = model.prepare(&case.messages, &case.images, true).unwrap();
    p.extra.clear();
    let msg = model
        .forward(&[&p], &mut HookCtx::none(), LogitsFor::Last, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("qformer_input_ids"), "{msg}");
}

#[test]
fn instructblip_prompt_too_long_for_the_qformer() {
    let name = "tiny-instructblip-vicuna";
    let model = common::load_model(name);
    let img = common::cases(name)[0].images[0].clone();
    // the tiny Q-Former's position table holds 128 tokens
    let long = "red ".repeat(200);
    let msg = model
        .prepare(&[Message::user_with_image(&long)], &[img], true)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("Q-Former"), "{msg}");
}
