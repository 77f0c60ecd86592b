//! The command line end to end through the real binary: `synth-model`, `hooks`, `capture` (output
//! file and sidecar checked against an in-process forward and against the reference fixtures)
//! and `generate`, on LLaVA and on every other family's tiny checkpoint.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, LoadOptions, Vlm};
use sycoscope::hooks::{HookCtx, HookSpec};
use sycoscope::template::Message;

/// Run the binary; assert success; return stdout.
fn ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sycoscope"))
        .args(args)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?} failed ({:?}):\nstderr:\n{}\nstdout:\n{stdout}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn synth(dir: &Path, extra: &[&str]) {
    let mut args = vec!["synth-model", "--out", s(dir)];
    args.extend_from_slice(extra);
    let out = ok(&args);
    assert!(
        out.contains("wrote a random-weight LLaVA checkpoint"),
        "{out}"
    );
}

#[test]
fn synth_model_then_hooks_capture_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("synth");
    synth(&model, &["--seed", "7"]);

    // hooks: the catalogue with shapes, for exactly 4 LM layers and 3 vision layers
    let hooks = ok(&["hooks", "--model", s(&model)]);
    let names: Vec<&str> = hooks
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for want in [
        "blocks.0.hook_resid_post",
        "blocks.3.hook_resid_post",
        "blocks.2.attn.hook_pattern",
        "blocks.0.hook_resid_pre",
        "ln_final.hook_normalized",
        "logits",
        "vision.blocks.2.hook_resid_post",
        "vision.ln_post.hook_normalized",
        "projector.hook_out",
    ] {
        assert!(
            names.contains(&want),
            "hooks does not list {want}:\n{hooks}"
        );
    }
    assert!(!names.contains(&"blocks.4.hook_resid_post"), "{hooks}");
    assert!(
        !names.contains(&"vision.blocks.3.hook_resid_post"),
        "{hooks}"
    );
    assert!(
        hooks.contains("blocks.0.hook_resid_post") && hooks.contains("[b, s, 128]"),
        "{hooks}"
    );
    assert!(hooks.lines().next().unwrap().contains("(llava)"), "{hooks}");

    // capture: a two-turn conversation, globs, positions, a span mean
    let chat = serde_json::json!({"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it? A. circle B. square"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        {"role": "user", "content": [{"type": "text", "text": "I think it is B. Are you sure?"}]}
    ]});
    let msgs = tmp.path().join("chat.json");
    std::fs::write(&msgs, chat.to_string()).unwrap();
    let img = common::shared().join("images/blue_square.png");
    let out = tmp.path().join("out/cap.safetensors");
    let spec = "blocks.*.hook_resid_post@last, blocks.1.attn.hook_pattern@last, projector.hook_out, blocks.0.hook_resid_pre@image:mean, vision.blocks.0.hook_resid_post";
    let stdout = ok(&[
        "capture",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--messages",
        s(&msgs),
        "--hooks",
        spec,
        "--out",
        s(&out),
    ]);
    assert!(stdout.contains("USER: <image>"), "{stdout}");
    let t = load(&out);
    let mut keys: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "blocks.0.hook_resid_post@last",
            "blocks.0.hook_resid_pre@image:mean",
            "blocks.1.attn.hook_pattern@last",
            "blocks.1.hook_resid_post@last",
            "blocks.2.hook_resid_post@last",
            "blocks.3.hook_resid_post@last",
            "input_ids",
            "logits",
            "projector.hook_out",
            "vision.blocks.0.hook_resid_post",
        ]
    );
    let ids = t["input_ids"].to_dtype(DType::I64).unwrap();
    let seq = ids.dim(1).unwrap();
    assert_eq!(ids.dims(), &[1, seq]);
    let ids: Vec<i64> = ids.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(
        ids.iter().filter(|&&x| x == 3).count(),
        36,
        "6x6 image tokens"
    );
    for (k, v) in &t {
        if k != "input_ids" {
            assert_eq!(v.dtype(), DType::F32, "{k}");
            assert_eq!(v.dim(0).unwrap(), 1, "{k} is batch-first");
            assert!(
                f32s(v).iter().all(|x| x.is_finite()),
                "{k} has non-finite values"
            );
        }
    }
    assert_eq!(t["blocks.2.hook_resid_post@last"].dims(), &[1, 1, 128]);
    assert_eq!(t["blocks.1.attn.hook_pattern@last"].dims(), &[1, 4, 1, seq]);
    assert_eq!(t["projector.hook_out"].dims(), &[1, 36, 128]);
    assert_eq!(t["blocks.0.hook_resid_pre@image:mean"].dims(), &[1, 128]);
    assert_eq!(t["vision.blocks.0.hook_resid_post"].dims(), &[1, 37, 64]);
    let v = t["logits"].dims().to_vec();
    assert_eq!(&v[..2], &[1, seq]);
    // each attention row is a distribution
    let row = f32s(&t["blocks.1.attn.hook_pattern@last"]);
    for h in 0..4 {
        let sum: f32 = row[h * seq..(h + 1) * seq].iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "head {h} sums to {sum}");
    }
    // the sidecar: prompt and span table
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    let prompt = side["prompt_text"].as_str().unwrap();
    assert!(prompt.starts_with("USER: <image>\nWhat shape"), "{prompt}");
    assert!(prompt.ends_with("ASSISTANT:"), "{prompt}");
    let spans = &side["spans"];
    assert_eq!(spans["len"].as_u64().unwrap() as usize, seq);
    let im = &spans["images"][0];
    let (a, b) = (
        im["start"].as_u64().unwrap() as usize,
        im["end"].as_u64().unwrap() as usize,
    );
    assert_eq!(b - a, 36);
    assert!(
        ids[a..b].iter().all(|&x| x == 3),
        "the image span covers the image tokens"
    );
    assert_eq!(spans["messages"].as_array().unwrap().len(), 3, "{spans}");
    assert_eq!(side["shapes"]["logits"], serde_json::json!(v));

    // the file equals an in-process forward with the same spec
    let m = families::load_dir(&model, &LoadOptions::default()).unwrap();
    let text = std::fs::read_to_string(&msgs).unwrap();
    let messages = sycoscope::template::parse_messages(&text, &msgs).unwrap();
    let image = sycoscope::preprocess::load_image(&img).unwrap();
    let p = m
        .prepare(&messages, std::slice::from_ref(&image), true)
        .unwrap();
    assert_eq!(p.ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), ids);
    let r = HookSpec::parse_captures(spec)
        .unwrap()
        .resolve(&m.hook_points())
        .unwrap();
    let mut ctx = HookCtx::new(&r, vec![]);
    let logits = m.forward(&[&p], &mut ctx, LogitsFor::All, None).unwrap();
    assert_eq!(common::max_abs_diff(&logits, &t["logits"]), 0.0);
    for (k, v) in &ctx.captures.tensors {
        assert_eq!(common::max_abs_diff(v, &t[k]), 0.0, "{k}");
    }

    // generate prints the prompt and the greedy continuation the library computes
    let stdout = ok(&[
        "generate",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--prompt",
        "What shape is it?",
        "--max-new-tokens",
        "5",
    ]);
    let want = expected_generation(m.as_ref(), &image, "What shape is it?", 5);
    assert_eq!(stdout, want);
    assert!(
        stdout.starts_with("USER: <image>\nWhat shape is it? ASSISTANT:\n"),
        "{stdout}"
    );
}

/// What `generate` should print: the prompt, then the decoded greedy tokens.
fn expected_generation(
    m: &dyn Vlm,
    image: &image::DynamicImage,
    prompt: &str,
    max_new: usize,
) -> String {
    let p = m
        .prepare(
            &[Message::user_with_image(prompt)],
            std::slice::from_ref(image),
            true,
        )
        .unwrap();
    let ids = families::generate_greedy(m, &p, max_new, 0).unwrap();
    assert!(!ids.is_empty());
    let text = m.tokenizer().decode(&ids, true).unwrap();
    format!("{}\n{text}\n", p.prompt_text)
}

/// `capture --pixel-values <fixture>` with the fixture's own conversation reproduces the
/// reference ids, residual stream rows and logits.
fn capture_matches_fixture(model_name: &str, case: &str, layers: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::shared().join("fixtures").join(model_name);
    let meta_path = fx.join(format!("{case}.json"));
    let fixture = fx.join(format!("{case}.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let images: Vec<PathBuf> = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| common::shared().join("images").join(i.as_str().unwrap()))
        .collect();
    let model = common::shared().join("models").join(model_name);
    let out = tmp.path().join("cap.safetensors");
    let mut args = vec![
        "capture",
        "--model",
        s(&model),
        "--messages",
        s(&meta_path),
        "--pixel-values",
        s(&fixture),
        "--hooks",
        "blocks.*.hook_resid_post@last,blocks.0.hook_resid_post",
        "--out",
        s(&out),
        "--image",
    ];
    args.extend(images.iter().map(|p| s(p)));
    let stdout = ok(&args);
    assert!(
        stdout.starts_with(meta["prompt_text"].as_str().unwrap()),
        "{model_name}/{case}: prompt\n{stdout}"
    );
    let got = load(&out);
    let want = load(&fixture);
    let ids = |t: &Tensor| -> Vec<i64> {
        t.to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(
        ids(&got["input_ids"]),
        ids(&want["input_ids"]),
        "{model_name}/{case}: input_ids"
    );
    let dl = common::max_abs_diff(&got["logits"], &want["logits"]);
    assert!(dl <= 1e-4, "{model_name}/{case}: logits differ by {dl}");
    let mut n = 0;
    for l in 0..layers {
        let k = format!("blocks.{l}.hook_resid_post");
        let full = &want[&k];
        let s = full.dim(1).unwrap();
        let last = full.narrow(1, s - 1, 1).unwrap();
        let ours = &got[&format!("{k}@last")];
        assert_eq!(ours.dtype(), DType::F32);
        let d = common::max_abs_diff(ours, &last);
        assert!(d <= 1e-4, "{model_name}/{case}: {k}@last differs by {d}");
        n += 1;
    }
    assert!(!got.contains_key(&format!("blocks.{layers}.hook_resid_post@last")));
    assert_eq!(
        got.len(),
        layers + 3,
        "{model_name}/{case}: {:?}",
        got.keys()
    );
    let d0 = common::max_abs_diff(
        &got["blocks.0.hook_resid_post"],
        &want["blocks.0.hook_resid_post"],
    );
    assert!(
        d0 <= 1e-4,
        "{model_name}/{case}: blocks.0.hook_resid_post differs by {d0}"
    );
    println!("{model_name}/{case}: logits {dl:.2e}, {n} layers @last within 1e-4");
}

#[test]
fn capture_with_fixture_pixel_values_reproduces_tiny_llava() {
    for case in [
        "r1_gray_cross",
        "r1_red_circle",
        "r2_blue_square_strong",
        "r2_triangle_suggest",
    ] {
        capture_matches_fixture("tiny-llava", case, 4);
    }
}

/// The number of LM layers in a checkpoint, from `hooks`.
fn lm_layers(hooks: &str) -> usize {
    hooks
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("blocks.") && n.ends_with(".hook_resid_post"))
        .count()
}

#[test]
fn every_family_through_the_cli() {
    for (name, case) in [
        ("tiny-qwen3-vl", "r2_blue_square_strong"),
        ("tiny-paligemma", "r2_blue_square_strong"),
        ("tiny-blip2-opt", "r2_blue_square_strong"),
        ("tiny-instructblip-vicuna", "r1_red_circle"),
    ] {
        let model = common::shared().join("models").join(name);
        let hooks = ok(&["hooks", "--model", s(&model)]);
        for want in [
            "blocks.0.hook_resid_post",
            "blocks.0.attn.hook_pattern",
            "logits",
            "projector.hook_out",
        ] {
            assert!(hooks.contains(want), "{name}: hooks lacks {want}:\n{hooks}");
        }
        let layers = lm_layers(&hooks);
        assert!(layers >= 2, "{name}: {layers} layers\n{hooks}");
        capture_matches_fixture(name, case, layers);

        // own preprocessing, the same hook names
        let tmp = tempfile::tempdir().unwrap();
        let msgs = tmp.path().join("m.json");
        std::fs::write(
            &msgs,
            serde_json::json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]).to_string(),
        )
        .unwrap();
        let img = common::shared().join("images/red_circle.png");
        let out = tmp.path().join("c.safetensors");
        ok(&[
            "capture",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--messages",
            s(&msgs),
            "--hooks",
            "blocks.*.hook_resid_post@last",
            "--out",
            s(&out),
        ]);
        let t = load(&out);
        for l in 0..layers {
            let v = &t[&format!("blocks.{l}.hook_resid_post@last")];
            assert_eq!(v.dims().len(), 3, "{name}");
            assert_eq!(&v.dims()[..2], &[1, 1], "{name}");
            assert!(f32s(v).iter().all(|x| x.is_finite()), "{name}");
        }
        let side: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        assert_eq!(
            side["spans"]["len"].as_u64().unwrap() as usize,
            t["input_ids"].dim(1).unwrap(),
            "{name}"
        );

        // generate agrees with the library
        let stdout = ok(&[
            "generate",
            "--model",
            s(&model),
            "--image",
            s(&img),
            "--prompt",
            "What colour is the shape?",
            "--max-new-tokens",
            "4",
        ]);
        let m = families::load_dir(&model, &LoadOptions::default()).unwrap();
        let image = sycoscope::preprocess::load_image(&img).unwrap();
        let want = expected_generation(m.as_ref(), &image, "What colour is the shape?", 4);
        assert_eq!(stdout, want, "{name}");
    }
}

#[test]
fn capture_at_f16_writes_float32() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::shared().join("models/tiny-llava");
    let msgs = common::shared().join("fixtures/tiny-llava/r1_red_circle.json");
    let img = common::shared().join("images/red_circle.png");
    let out = tmp.path().join("c.safetensors");
    ok(&[
        "capture",
        "--model",
        s(&model),
        "--dtype",
        "f16",
        "--image",
        s(&img),
        "--messages",
        s(&msgs),
        "--hooks",
        "blocks.*.hook_resid_post@last,blocks.3.attn.hook_pattern@last",
        "--out",
        s(&out),
    ]);
    let t = load(&out);
    for (k, v) in &t {
        if k != "input_ids" {
            assert_eq!(v.dtype(), DType::F32, "{k}");
            assert!(f32s(v).iter().all(|x| x.is_finite()), "{k}");
        }
    }
    assert_eq!(t.len(), 4 + 1 + 2);
}
