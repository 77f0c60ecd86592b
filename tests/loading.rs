//! Checkpoint loading paths: a Hub id served from a local Hugging Face cache with
//! `HF_HUB_OFFLINE=1` (no network), sharded safetensors with an index, and half-precision
//! weights (f16 written by `synth-model --dtype f16`, bf16 chosen at load time).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, LoadOptions, Vlm};
use sycoscope::hooks::HookCtx;

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny_llava() -> std::path::PathBuf {
    common::shared().join("models/tiny-llava")
}

/// Run the binary in `cwd` with `env`; assert success; return stdout.
fn ok_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sycoscope"));
    cmd.current_dir(cwd).args(args);
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
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn copy_files(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(&p, to.join(&name)).unwrap();
        }
    }
}

/// Write the weights of `src` into `dir` as two shards plus `model.safetensors.index.json`.
fn write_sharded(src: &Path, dir: &Path) {
    let w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, chunk) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), w[*n].clone()))
            .collect();
        for (n, t) in &part {
            total += t.elem_count() * t.dtype().size_in_bytes();
            map.insert(n.clone(), serde_json::json!(file));
        }
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// A fake Hugging Face cache under `home` holding `owner/name` -> a copy of tiny-llava
/// (sharded when asked).
fn fake_cache(home: &Path, repo: &str, sharded: bool) {
    let folder = format!("models--{}", repo.replace('/', "--"));
    let root = home.join("hub").join(folder);
    let snap = root.join("snapshots").join(HASH);
    if sharded {
        copy_files(&tiny_llava(), &snap, &["model.safetensors"]);
        write_sharded(&tiny_llava(), &snap);
    } else {
        copy_files(&tiny_llava(), &snap, &[]);
    }
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), HASH).unwrap();
}

fn capture_logits(cwd: &Path, model: &str, env: &[(&str, &str)]) -> Tensor {
    let out = cwd.join(format!("{}.safetensors", model.replace('/', "_")));
    let msgs = common::shared().join("fixtures/tiny-llava/r2_triangle_suggest.json");
    let img = common::shared().join("images/green_triangle_noise.png");
    ok_in(
        cwd,
        &[
            "capture",
            "--model",
            model,
            "--messages",
            msgs.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        env,
    );
    candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["logits"].clone()
}

#[test]
fn hub_id_from_the_local_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    fake_cache(home.path(), "owner/name", false);
    fake_cache(home.path(), "owner/sharded", true);
    let cwd = tempfile::tempdir().unwrap();
    let h = home.path().to_str().unwrap();
    let env = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", h)];
    let hooks = ok_in(cwd.path(), &["hooks", "--model", "owner/name"], &env);
    assert!(hooks.contains("blocks.3.hook_resid_post"), "{hooks}");
    assert!(
        hooks.contains(HASH),
        "the snapshot folder is the model dir:\n{hooks}"
    );
    // an explicit revision that is the snapshot hash works too
    let hooks = ok_in(
        cwd.path(),
        &["hooks", "--model", &format!("owner/name@{HASH}")],
        &env,
    );
    assert!(hooks.contains("vision.blocks.2.hook_resid_post"), "{hooks}");
    // HF_HUB_CACHE wins over HF_HOME
    let hub = home.path().join("hub");
    let env2 = [
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_CACHE", hub.to_str().unwrap()),
        ("HF_HOME", "/nonexistent"),
    ];
    ok_in(cwd.path(), &["hooks", "--model", "owner/name"], &env2);
    // the same logits from the cache (single file and sharded) as from the folder
    let local = capture_logits(cwd.path(), tiny_llava().to_str().unwrap(), &[]);
    let single = capture_logits(cwd.path(), "owner/name", &env);
    let sharded = capture_logits(cwd.path(), "owner/sharded", &env);
    assert_eq!(common::max_abs_diff(&local, &single), 0.0);
    assert_eq!(common::max_abs_diff(&local, &sharded), 0.0);
    // nothing was downloaded: the cache holds only what we put there
    let blobs = home.path().join("hub/models--owner--name/blobs");
    assert!(!blobs.exists());
}

fn last_case_logits(model: &dyn Vlm, pixel_values: bool) -> Tensor {
    let case = &common::cases("tiny-llava")[2];
    let mut p = model.prepare(&case.messages, &case.images, true).unwrap();
    if pixel_values {
        model
            .set_pixel_values(&mut p, case.tensors["pixel_values"].clone())
            .unwrap();
    }
    model
        .forward(&[&p], &mut HookCtx::none(), LogitsFor::All, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_files(&tiny_llava(), tmp.path(), &["model.safetensors"]);
    write_sharded(&tiny_llava(), tmp.path());
    assert!(!tmp.path().join("model.safetensors").exists());
    let files = sycoscope::blocks::weights::safetensors_files(tmp.path()).unwrap();
    assert_eq!(files.len(), 2);
    let sharded = families::load_dir(tmp.path(), &LoadOptions::default()).unwrap();
    let single = common::load_model("tiny-llava");
    let a = last_case_logits(sharded.as_ref(), true);
    let b = last_case_logits(single.as_ref(), true);
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    // and both match the reference
    let case = &common::cases("tiny-llava")[2];
    assert!(common::max_abs_diff(&a, &case.tensors["logits"]) <= 1e-4);

    // an index naming a shard that is missing is a clear error
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = families::load_dir(tmp.path(), &LoadOptions::default())
        .err()
        .expect("a missing shard must fail")
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

/// Max |a - b| relative to max |b|, and the correlation of a and b.
fn closeness(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(&b) {
        let (x, y) = (x as f64 - ma, y as f64 - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    (d / scale, (sab / (saa * sbb).sqrt()) as f32)
}

// Tolerances are loose on purpose: f16 keeps ~3 significant decimal digits, bf16 ~2, and the
// rounding of every weight (and, at f16 compute, every activation) accumulates over the vision
// tower, the projector and the decoder.
const F16_REL: f32 = 0.02;
const BF16_REL: f32 = 0.08;

fn synth(dir: &Path, dtype: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_sycoscope"))
        .args(["synth-model", "--seed", "3", "--dtype", dtype, "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let want = sycoscope::blocks::weights::parse_dtype(dtype).unwrap();
    assert!(w.values().all(|t| t.dtype() == want), "{dtype} weights");
}

fn load_at(dir: &Path, dtype: DType) -> Box<dyn Vlm> {
    families::load_dir(
        dir,
        &LoadOptions {
            dtype,
            device: Device::Cpu,
        },
    )
    .unwrap()
}

#[test]
fn half_precision_weights_stay_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let (d32, d16, dbf) = (
        tmp.path().join("f32"),
        tmp.path().join("f16"),
        tmp.path().join("bf16"),
    );
    synth(&d32, "f32");
    synth(&d16, "f16");
    synth(&dbf, "bf16");
    let base = last_case_logits_synth(load_at(&d32, DType::F32).as_ref());
    for (name, m, tol) in [
        ("f16 file, f16 compute", load_at(&d16, DType::F16), F16_REL),
        ("f16 file, f32 compute", load_at(&d16, DType::F32), F16_REL),
        ("f32 file, f16 compute", load_at(&d32, DType::F16), F16_REL),
        (
            "bf16 file, f32 compute",
            load_at(&dbf, DType::F32),
            BF16_REL,
        ),
        (
            "bf16 file, f16 compute",
            load_at(&dbf, DType::F16),
            BF16_REL,
        ),
    ] {
        let want = if name.ends_with("f16 compute") {
            DType::F16
        } else {
            DType::F32
        };
        assert_eq!(m.info().dtype, want, "{name}");
        let l = last_case_logits_synth(m.as_ref());
        let (rel, corr) = closeness(&l, &base);
        println!("{name}: max |d| / max |logit| = {rel:.4}, correlation {corr:.5}");
        let v: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        assert!(rel <= tol, "{name}: relative difference {rel} > {tol}");
        assert!(corr >= 0.99, "{name}: correlation {corr}");
    }
    // the trained-like tiny-llava weights at f16 against the reference (f32) logits
    let m = load_at(&tiny_llava(), DType::F16);
    let l = last_case_logits(m.as_ref(), true);
    let case = &common::cases("tiny-llava")[2];
    let (rel, corr) = closeness(&l, &case.tensors["logits"]);
    println!("tiny-llava at f16 vs reference f32: max |d| / max |logit| = {rel:.4}, correlation {corr:.5}");
    assert!(
        rel <= F16_REL && corr >= 0.99,
        "tiny-llava f16: {rel} {corr}"
    );
    // bf16 compute: refused on the CPU with a clear error (candle has no CPU bf16 matmul)
    let e = families::load_dir(
        &tiny_llava(),
        &LoadOptions {
            dtype: DType::BF16,
            device: Device::Cpu,
        },
    )
    .err()
    .expect("bf16 on the CPU is refused")
    .to_string();
    assert!(e.contains("bf16") && e.contains("CPU"), "{e}");
}

fn last_case_logits_synth(model: &dyn Vlm) -> Tensor {
    let case = &common::cases("tiny-llava")[2];
    let p = model.prepare(&case.messages, &case.images, true).unwrap();
    model
        .forward(&[&p], &mut HookCtx::none(), LogitsFor::All, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}
