//! Forward cost of hooks on a mid-size random-weight LLaVA: the median forward time with an
//! empty spec, with every residual hook (`blocks.*.hook_resid_*`), with every full attention
//! pattern (`blocks.*.attn.hook_pattern`) and with the last attention row only
//! (`blocks.*.attn.hook_pattern@last`); the overhead of each against the empty spec (timed in one
//! process, the variants interleaved round by round so that load drift on a shared machine hits
//! them alike); and the peak resident memory (VmHWM) of one forward of each variant, each in its
//! own child process (this binary re-executed) that resets the peak counter after loading, so
//! that the peaks are separate and exclude the load.
//!
//! Run: `cargo bench --bench forward`, or `cargo test --bench forward` for a dev-profile run
//! (dependencies are built at opt-level 3 in the dev profile, so the numbers are close).
//!
//! Default size (CLIP-B-like tower: 12 layers, width 768, 224 px, patch 14 -> 256 image tokens;
//! a 12-layer, width-768 Llama with 12 heads and MLP 3072; a prompt of ~300 tokens); 3 timed
//! forwards per variant after one warm-up; about 1.5 minutes on 2 cores. Environment overrides, all optional:
//! `SYCOSCOPE_FWD_BENCH_LAYERS`, `_HIDDEN`, `_HEADS`, `_INTER`, `_VLAYERS`, `_VHIDDEN`,
//! `_VHEADS`, `_IMAGE`, `_PATCH` (model shape), `_TEXT` (characters of user text, ~1 token each
//! with the synthetic tokenizer), `_RUNS` (timed forwards), `_MODEL` (an existing checkpoint
//! folder instead of a synthetic one), `_DTYPE` (f32, f16, bf16).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, LoadOptions, Vlm};
use sycoscope::hooks::{HookCtx, HookSpec, ResolvedSpec};
use sycoscope::prepare::Prepared;
use sycoscope::synth_model::{write_llava, SynthLlavaConfig};
use sycoscope::template::Message;

const CHILD: &str = "SYCOSCOPE_FWD_BENCH_CHILD";
const DIR: &str = "SYCOSCOPE_FWD_BENCH_DIR";

/// The variants: name and capture spec.
const VARIANTS: [(&str, &str); 4] = [
    ("empty", ""),
    ("resid", "blocks.*.hook_resid_*"),
    ("patterns", "blocks.*.attn.hook_pattern"),
    ("patterns@last", "blocks.*.attn.hook_pattern@last"),
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(format!("SYCOSCOPE_FWD_BENCH_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A field of /proc/self/status in MiB (0 where unavailable).
fn status_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn user_text(chars: usize) -> String {
    let base = "Look at the picture carefully. What is the colour of the shape in the image? \
                A. red B. blue C. green D. yellow. Answer with the option's letter. ";
    base.chars().cycle().take(chars).collect::<String>()
}

/// Reset the peak-RSS counter (Linux: write 5 to /proc/self/clear_refs).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The model, its prepared prompt and the resolved spec of each variant.
struct Setup {
    model: Box<dyn Vlm>,
    prepared: Prepared,
    specs: Vec<ResolvedSpec>,
    load_s: f64,
}

fn setup(dir: &Path) -> sycoscope::Result<Setup> {
    let dtype = sycoscope::blocks::weights::parse_dtype(
        &std::env::var("SYCOSCOPE_FWD_BENCH_DTYPE").unwrap_or_else(|_| "f32".into()),
    )?;
    let t0 = Instant::now();
    let model = families::load_dir(
        dir,
        &LoadOptions {
            dtype,
            device: candle_core::Device::Cpu,
        },
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let img_size = env_usize("IMAGE", 224) as u32;
    let img =
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(img_size, img_size, |x, y| {
            image::Rgb([
                (x * 3 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        }));
    let msgs = vec![Message::user_with_image(&user_text(env_usize("TEXT", 28)))];
    let prepared = model.prepare(&msgs, &[img], true)?;
    let specs = VARIANTS
        .iter()
        .map(|(_, s)| HookSpec::parse_captures(s)?.resolve(&model.hook_points()))
        .collect::<sycoscope::Result<Vec<_>>>()?;
    Ok(Setup {
        model,
        prepared,
        specs,
        load_s,
    })
}

/// One forward with variant `i`: (seconds, captured tensors, captured bytes).
fn forward(s: &Setup, i: usize) -> sycoscope::Result<(f64, usize, usize)> {
    let mut ctx = HookCtx::new(&s.specs[i], vec![]);
    let t = Instant::now();
    let logits = s
        .model
        .forward(&[&s.prepared], &mut ctx, LogitsFor::Last, None)?;
    let _ = logits
        .sum_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()?;
    let dt = t.elapsed().as_secs_f64();
    let bytes = ctx
        .captures
        .tensors
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    Ok((dt, ctx.captures.tensors.len(), bytes))
}

/// Child: load the model, reset the peak-RSS counter, run one forward with one variant, print
/// a JSON line with the memory figures.
fn child(variant: &str) -> sycoscope::Result<()> {
    let dir = PathBuf::from(std::env::var(DIR).map_err(|_| sycoscope::Error::input("no dir"))?);
    let i = VARIANTS
        .iter()
        .position(|(n, _)| *n == variant)
        .ok_or_else(|| sycoscope::Error::input(format!("unknown variant {variant}")))?;
    let s = setup(&dir)?;
    let rss_loaded = status_mib("VmRSS:");
    let hwm_load = status_mib("VmHWM:");
    let reset = reset_peak();
    let (_, n, bytes) = forward(&s, i)?;
    println!(
        "RESULT {}",
        serde_json::json!({
            "variant": variant, "rss_loaded_mib": rss_loaded, "hwm_load_mib": hwm_load,
            "peak_reset": reset, "hwm_mib": status_mib("VmHWM:"),
            "captured_tensors": n, "captured_mib": bytes as f64 / (1u64 << 20) as f64,
        })
    );
    Ok(())
}

fn run_child(exe: &Path, dir: &Path, variant: &str) -> serde_json::Value {
    let out = Command::new(exe)
        .env(CHILD, variant)
        .env(DIR, dir)
        .output()
        .expect("re-running the bench binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "variant {variant} failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("variant {variant}: no RESULT line in\n{stdout}"));
    serde_json::from_str(line).expect("RESULT is JSON")
}

fn main() {
    if let Ok(v) = std::env::var(CHILD) {
        if let Err(e) = child(&v) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    let tmp = tempfile::tempdir().expect("a temporary folder");
    let c = SynthLlavaConfig {
        layers: env_usize("LAYERS", 12),
        hidden: env_usize("HIDDEN", 768),
        heads: env_usize("HEADS", 12),
        kv_heads: env_usize("HEADS", 12),
        intermediate: env_usize("INTER", 3072),
        vision_layers: env_usize("VLAYERS", 12),
        vision_hidden: env_usize("VHIDDEN", 768),
        vision_heads: env_usize("VHEADS", 12),
        vision_intermediate: env_usize("VHIDDEN", 768) * 4,
        image_size: env_usize("IMAGE", 224),
        patch_size: env_usize("PATCH", 14),
        seed: 0,
        init_std: 0.02,
    };
    let dir = match std::env::var("SYCOSCOPE_FWD_BENCH_MODEL") {
        Ok(m) => PathBuf::from(m),
        Err(_) => {
            let dir = tmp.path().join("model");
            let t = Instant::now();
            write_llava(&dir, &c, candle_core::DType::F32).expect("synth-model");
            println!(
                "synthetic LLaVA: LM {} layers x {} (heads {}, MLP {}), vision {} layers x {} at {} px / patch {}; written in {:.1} s",
                c.layers, c.hidden, c.heads, c.intermediate, c.vision_layers, c.vision_hidden,
                c.image_size, c.patch_size, t.elapsed().as_secs_f64()
            );
            dir
        }
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {} (timings on a shared machine are noisy; min is the steadier figure)",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    // timing: one process, the variants interleaved round by round so that load drift hits
    // them alike
    let s = setup(&dir).expect("loading the model");
    let runs = env_usize("RUNS", 3).max(1);
    let mut times = vec![Vec::with_capacity(runs); VARIANTS.len()];
    let caps: Vec<(usize, usize)> = (0..VARIANTS.len())
        .map(|i| {
            forward(&s, i)
                .map(|(_, n, b)| (n, b))
                .expect("warm-up forward")
        })
        .collect();
    for _ in 0..runs {
        for (i, t) in times.iter_mut().enumerate() {
            t.push(forward(&s, i).expect("forward").0);
        }
    }
    let seq = s.prepared.ids.len();
    let img_tokens = s
        .prepared
        .spans
        .images
        .first()
        .map(|x| x.len())
        .unwrap_or(0);
    let load_s = s.load_s;
    drop(s);
    // memory: each variant in its own child process, peak counter reset after loading
    let exe = std::env::current_exe().expect("the bench binary's path");
    let mem: Vec<serde_json::Value> = VARIANTS
        .iter()
        .map(|(name, _)| run_child(&exe, &dir, name))
        .collect();
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let med: Vec<f64> = times.iter().map(|t| median(&mut t.clone())).collect();
    let min: Vec<f64> = times
        .iter()
        .map(|t| t.iter().copied().fold(f64::INFINITY, f64::min))
        .collect();
    println!(
        "prompt: {seq} tokens ({img_tokens} image tokens); {runs} timed forwards per variant (interleaved) after 1 warm-up each; model load {load_s:.2} s"
    );
    println!(
        "after loading: VmRSS {:.0} MiB (load peak {:.0} MiB); peak counter reset: {}",
        f(&mem[0], "rss_loaded_mib"),
        f(&mem[0], "hwm_load_mib"),
        mem[0]["peak_reset"]
    );
    println!(
        "{:<14} {:<32} {:>8} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "variant",
        "spec",
        "median s",
        "min s",
        "x empty",
        "x(min)",
        "tensors",
        "capt MiB",
        "peak MiB",
        "fwd MiB"
    );
    for (i, (name, spec)) in VARIANTS.iter().enumerate() {
        let r = &mem[i];
        println!(
            "{:<14} {:<32} {:>8.3} {:>7.3} {:>7.3} {:>7.3} {:>7} {:>9.1} {:>9.0} {:>9.0}",
            name,
            if spec.is_empty() { "(none)" } else { spec },
            med[i],
            min[i],
            med[i] / med[0],
            min[i] / min[0],
            caps[i].0,
            caps[i].1 as f64 / (1u64 << 20) as f64,
            f(r, "hwm_mib"),
            f(r, "hwm_mib") - f(r, "rss_loaded_mib"),
        );
    }
    let (full, last) = (f(&mem[2], "hwm_mib"), f(&mem[3], "hwm_mib"));
    println!(
        "peak memory of one forward, last-row patterns vs full patterns: {last:.0} MiB vs {full:.0} MiB ({:+.0} MiB); captured {:.2} MiB vs {:.1} MiB",
        last - full,
        caps[3].1 as f64 / (1u64 << 20) as f64,
        caps[2].1 as f64 / (1u64 << 20) as f64,
    );
    println!("(peak MiB: VmHWM of a child process that loads the model, resets the peak counter and runs one forward; fwd MiB: that peak minus the RSS after loading)");
}
