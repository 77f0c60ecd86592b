//! Bad input through the real `sycoscope` binary on tiny-llava: every case exits non-zero with an
//! error that names the thing at fault (file, key, tensor, hook), and never panics.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use sycoscope::families::{self, LoadOptions};
use sycoscope::hooks::{Edit, HookSpec, Intervention, Positions};

fn model_dir() -> PathBuf {
    common::shared().join("models").join("tiny-llava")
}

fn image() -> PathBuf {
    common::shared().join("images").join("red_circle.png")
}

/// A copy of tiny-llava in a temp dir, every file but those in `skip`.
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

fn weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// A conversation file in `dir`.
fn messages(dir: &Path, name: &str, v: serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    p
}

fn one_image_chat() -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}])
}

/// Run the binary with `args` (HF variables cleared), expecting failure; returns stderr.
fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sycoscope"));
    cmd.args(args);
    for k in [
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail with exit code 1; stderr:\n{stderr}\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn assert_names(stderr: &str, words: &[&str]) {
    for w in words {
        assert!(
            stderr.contains(w),
            "stderr does not mention '{w}':\n{stderr}"
        );
    }
}

/// `hooks`, `capture` and `generate` on a broken checkpoint folder all fail with `words`.
fn all_commands_fail(dir: &Path, words: &[&str]) {
    let d = dir.to_str().unwrap();
    let img = image();
    let img = img.to_str().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let msgs = messages(scratch.path(), "m.json", one_image_chat());
    let out = scratch.path().join("o.safetensors");
    let runs: [Vec<&str>; 3] = [
        vec!["hooks", "--model", d],
        vec![
            "capture",
            "--model",
            d,
            "--image",
            img,
            "--messages",
            msgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        vec![
            "generate",
            "--model",
            d,
            "--image",
            img,
            "--prompt",
            "What colour?",
            "--max-new-tokens",
            "2",
        ],
    ];
    for args in runs {
        let e = fails(&args, &[]);
        assert_names(&e, words);
    }
    assert!(!out.exists(), "a failed capture must not write its output");
}

#[test]
fn missing_config_json() {
    let tmp = copy_model(&["config.json"]);
    all_commands_fail(tmp.path(), &["config.json", "missing"]);
}

#[test]
fn config_json_that_is_not_json() {
    let tmp = copy_model(&[]);
    std::fs::write(
        tmp.path().join("config.json"),
        "{\"model_type\": \"llava\", oops",
    )
    .unwrap();
    all_commands_fail(tmp.path(), &["config.json", "not valid JSON"]);
}

#[test]
fn config_json_with_a_string_for_a_number() {
    let tmp = copy_model(&[]);
    edit_json(&tmp.path().join("config.json"), |v| {
        v["text_config"]["hidden_size"] = serde_json::json!("128");
    });
    all_commands_fail(
        tmp.path(),
        &["config.json", "text_config", "hidden_size", "invalid type"],
    );
    // the vision side too
    let tmp = copy_model(&[]);
    edit_json(&tmp.path().join("config.json"), |v| {
        v["vision_config"]["patch_size"] = serde_json::json!("fourteen");
    });
    let e = fails(&["hooks", "--model", tmp.path().to_str().unwrap()], &[]);
    assert_names(&e, &["config.json", "vision_config", "patch_size"]);
}

#[test]
fn missing_weights_file() {
    let tmp = copy_model(&["model.safetensors"]);
    all_commands_fail(tmp.path(), &["model.safetensors"]);
}

#[test]
fn missing_tensor_is_named() {
    for gone in [
        "language_model.model.layers.2.mlp.up_proj.weight",
        "vision_tower.vision_model.encoder.layers.1.self_attn.k_proj.bias",
        "multi_modal_projector.linear_2.weight",
        "language_model.lm_head.weight",
    ] {
        let tmp = copy_model(&["model.safetensors"]);
        let mut w = weights();
        assert!(w.remove(gone).is_some(), "{gone} is in tiny-llava");
        candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
        let e = fails(&["hooks", "--model", tmp.path().to_str().unwrap()], &[]);
        assert_names(&e, &[gone]);
    }
}

#[test]
fn tensor_with_wrong_shape_is_named() {
    let name = "language_model.model.layers.1.self_attn.o_proj.weight";
    let tmp = copy_model(&["model.safetensors"]);
    let mut w = weights();
    w.insert(
        name.into(),
        Tensor::zeros((128, 96), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap();
    all_commands_fail(tmp.path(), &[name, "shape"]);
}

#[test]
fn unknown_architecture() {
    let tmp = copy_model(&[]);
    edit_json(&tmp.path().join("config.json"), |v| {
        v["model_type"] = serde_json::json!("foo");
    });
    all_commands_fail(tmp.path(), &["config.json", "model_type", "'foo'", "llava"]);
}

#[test]
fn tokenizer_without_image_token() {
    let tmp = copy_model(&[]);
    edit_json(&tmp.path().join("tokenizer.json"), |v| {
        let added = v["added_tokens"].as_array_mut().unwrap();
        let before = added.len();
        added.retain(|t| t["content"] != "<image>");
        assert_eq!(added.len() + 1, before);
    });
    all_commands_fail(tmp.path(), &["tokenizer.json", "image token", "1000"]);
}

#[test]
fn image_that_does_not_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("not_an_image.png");
    std::fs::write(&bad, "this is a text file, not a PNG\n").unwrap();
    let msgs = messages(tmp.path(), "m.json", one_image_chat());
    let out = tmp.path().join("o.safetensors");
    let m = model_dir();
    let e = fails(
        &[
            "capture",
            "--model",
            m.to_str().unwrap(),
            "--image",
            bad.to_str().unwrap(),
            "--messages",
            msgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_names(&e, &["not_an_image.png", "does not decode"]);
    let e = fails(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--image",
            bad.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        &[],
    );
    assert_names(&e, &["not_an_image.png", "does not decode"]);
    // and a missing image file names the file
    let e = fails(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--image",
            "/no/such/picture.png",
            "--prompt",
            "hi",
        ],
        &[],
    );
    assert_names(&e, &["/no/such/picture.png"]);
}

/// `capture` on tiny-llava with a conversation and `images`; returns stderr.
fn capture_fails(chat: serde_json::Value, images: usize, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let msgs = messages(tmp.path(), "m.json", chat);
    let out = tmp.path().join("o.safetensors");
    let m = model_dir();
    let img = image();
    let mut args: Vec<&str> = vec![
        "capture",
        "--model",
        m.to_str().unwrap(),
        "--messages",
        msgs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    if images > 0 {
        args.push("--image");
        for _ in 0..images {
            args.push(img.to_str().unwrap());
        }
    }
    args.extend_from_slice(extra);
    let e = fails(&args, &[]);
    assert!(!out.exists(), "a failed capture wrote {}", out.display());
    e
}

#[test]
fn conversation_image_count_mismatch() {
    let no_image = serde_json::json!([{"role": "user", "content": [
        {"type": "text", "text": "What colour is the shape?"}]}]);
    let e = capture_fails(no_image.clone(), 1, &[]);
    assert_names(&e, &["no image part"]);
    let e = capture_fails(no_image, 0, &[]);
    assert_names(&e, &["no image part"]);
    let two = serde_json::json!([{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same shape?"}]}]);
    let e = capture_fails(two, 1, &[]);
    assert_names(&e, &["2 image part(s)", "1 image(s)"]);
    // a message file that is not a conversation names the file
    let e = capture_fails(serde_json::json!({"turns": []}), 1, &[]);
    assert_names(&e, &["m.json", "messages"]);
}

#[test]
fn unknown_hook_suggests_the_nearest_name() {
    let e = capture_fails(
        one_image_chat(),
        1,
        &[
            "--hooks",
            "blocks.0.hook_resid_post,blocks.1.hook_resid_pots@last",
        ],
    );
    assert_names(
        &e,
        &[
            "unknown hook 'blocks.1.hook_resid_pots'",
            "did you mean 'blocks.1.hook_resid_post'",
        ],
    );
    // a glob that matches nothing is refused too
    let e = capture_fails(
        one_image_chat(),
        1,
        &["--hooks", "blocks.*.hook_resid_postt"],
    );
    assert_names(&e, &["unknown hook 'blocks.*.hook_resid_postt'"]);
    // a layer the model does not have
    let e = capture_fails(
        one_image_chat(),
        1,
        &["--hooks", "blocks.9.hook_resid_post"],
    );
    assert_names(
        &e,
        &["unknown hook 'blocks.9.hook_resid_post'", "did you mean"],
    );
}

#[test]
fn intervention_on_a_hook_that_does_not_exist() {
    let model = families::load_dir(&model_dir(), &LoadOptions::default()).unwrap();
    let spec = HookSpec {
        interventions: vec![Intervention {
            pattern: "blocks.99.hook_resid_post".into(),
            positions: Positions::Last,
            edit: Edit::Zero,
        }],
        ..Default::default()
    };
    let e = spec
        .resolve(&model.hook_points())
        .expect_err("blocks.99 does not exist in a 4-layer model");
    assert!(
        matches!(e, sycoscope::Error::UnknownHook { .. }),
        "wrong error kind: {e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("blocks.99.hook_resid_post"), "{msg}");
    assert!(msg.contains("did you mean 'blocks."), "{msg}");
}

#[test]
fn pixel_values_file_without_pixel_values() {
    let tmp = tempfile::tempdir().unwrap();
    let pv = tmp.path().join("other.safetensors");
    let t: HashMap<String, Tensor> = [(
        "images".to_string(),
        Tensor::zeros((1, 3, 84, 84), DType::F32, &Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&t, &pv).unwrap();
    let e = capture_fails(
        one_image_chat(),
        1,
        &["--pixel-values", pv.to_str().unwrap()],
    );
    assert_names(&e, &["other.safetensors", "pixel_values", "images"]);
    // the right name with the wrong shape
    let t: HashMap<String, Tensor> = [(
        "pixel_values".to_string(),
        Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&t, &pv).unwrap();
    let e = capture_fails(
        one_image_chat(),
        1,
        &["--pixel-values", pv.to_str().unwrap()],
    );
    assert_names(&e, &["pixel values", "[1, 3, 64, 64]", "[1, 3, 84, 84]"]);
    // a file that is not safetensors at all
    std::fs::write(&pv, "nope").unwrap();
    let e = capture_fails(
        one_image_chat(),
        1,
        &["--pixel-values", pv.to_str().unwrap()],
    );
    assert_names(&e, &["other.safetensors"]);
}

#[test]
fn hub_id_offline_with_an_empty_cache() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let env = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", h)];
    let e = fails(&["hooks", "--model", "nobody-here/no-such-model"], &env);
    assert_names(
        &e,
        &[
            "HF_HUB_OFFLINE=1",
            "nobody-here/no-such-model",
            "not in the local cache",
            "config.json",
        ],
    );
    // nothing was created in the cache (no download attempt)
    assert!(
        !home
            .path()
            .join("hub/models--nobody-here--no-such-model/blobs")
            .exists(),
        "offline mode must not fetch"
    );
    // a string that is neither a folder nor a Hub id
    let e = fails(&["hooks", "--model", "./no/such/dir"], &env);
    assert_names(
        &e,
        &["./no/such/dir", "neither an existing folder nor a Hub id"],
    );
}

#[test]
fn dtype_and_device_the_build_cannot_run() {
    let m = model_dir();
    let m = m.to_str().unwrap();
    // candle's CPU backend has no bf16 matmul: refused at load, not mid-forward
    let e = fails(&["hooks", "--model", m, "--dtype", "bf16"], &[]);
    assert_names(&e, &["bf16", "CPU", "f16"]);
    let e = fails(&["hooks", "--model", m, "--dtype", "f64"], &[]);
    assert_names(&e, &["unknown dtype 'f64'", "f32, f16 or bf16"]);
    let e = fails(&["hooks", "--model", m, "--device", "tpu"], &[]);
    assert_names(&e, &["unknown device 'tpu'"]);
    if !cfg!(feature = "cuda") {
        let e = fails(&["hooks", "--model", m, "--device", "cuda:0"], &[]);
        assert_names(&e, &["cuda"]);
    }
}
