//! Protocol throughput: examples per second on a tiny and a mid-size synthetic LLaVA, with and
//! without round-2 prefix reuse, with and without the default capture; image encodings per
//! example. Prints figures and ratios (no assertions).
//!
//! `cargo bench --bench eval` (SYCOSCOPE_EVAL_BENCH_N=items, default 12).

use std::time::Instant;

use sycoscope::families::{self, LoadOptions};
use sycoscope::protocol::items::{load_items, LoadOptions as ItemLoad};
use sycoscope::protocol::runner::{letter_tokens, round1_messages, EvalOptions, Evaluator};
use sycoscope::synth_model::{write_llava, SynthLlavaConfig};

fn main() {
    let n: usize = std::env::var("SYCOSCOPE_EVAL_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    let cfg = sycoscope::protocol::synth::SynthConfig {
        n,
        seed: 1,
        size: 224,
        ..Default::default()
    };
    sycoscope::protocol::synth::write_bench(&cfg, &bench).unwrap();
    let items = load_items(bench.to_str().unwrap(), &ItemLoad::default())
        .unwrap()
        .items;
    let imgs: Vec<_> = items.iter().map(|i| i.load_image().unwrap()).collect();
    let sizes = [
        (
            "tiny (4 x 128, 84 px, 36 image tokens)",
            SynthLlavaConfig::default(),
        ),
        (
            "mid (8 x 512, 224 px, 256 image tokens)",
            SynthLlavaConfig {
                layers: 8,
                hidden: 512,
                heads: 8,
                kv_heads: 8,
                intermediate: 1376,
                vision_layers: 6,
                vision_hidden: 384,
                vision_heads: 6,
                vision_intermediate: 1536,
                image_size: 224,
                patch_size: 14,
                ..Default::default()
            },
        ),
    ];
    println!(
        "{n} items x 3 tones, batch 4, CPU, {} threads",
        rayon::current_num_threads()
    );
    println!(
        "{:<42} {:>22} {:>10} {:>16}",
        "model", "variant", "ex/s", "image enc./ex"
    );
    for (name, c) in sizes {
        let mdir = dir.path().join(name.split(' ').next().unwrap());
        write_llava(&mdir, &c, candle_core::DType::F32).unwrap();
        let m = families::load_dir(&mdir, &LoadOptions::default()).unwrap();
        let letters =
            letter_tokens(m.as_ref(), &round1_messages(&items[0], None), &imgs[0], 4).unwrap();
        let mut base = None;
        for (variant, opts) in [
            (
                "prefix reuse",
                EvalOptions {
                    batch_size: 4,
                    ..Default::default()
                },
            ),
            (
                "re-encode round 2",
                EvalOptions {
                    batch_size: 4,
                    prefix_reuse: false,
                    ..Default::default()
                },
            ),
            (
                "prefix reuse + capture",
                EvalOptions {
                    batch_size: 4,
                    capture: Some("default".into()),
                    ..Default::default()
                },
            ),
        ] {
            let ev = Evaluator::new(m.as_ref(), letters.clone(), opts).unwrap();
            let t0 = Instant::now();
            let mut enc = 0;
            for (chunk, ic) in items.chunks(4).zip(imgs.chunks(4)) {
                let refs: Vec<_> = chunk.iter().collect();
                enc += ev.run_batch(&refs, ic).unwrap().image_encodings;
            }
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            let ratio = match base {
                None => {
                    base = Some(rate);
                    String::new()
                }
                Some(b) => format!("  ({:.2}x of reuse)", rate / b),
            };
            println!(
                "{:<42} {:>22} {:>10.2} {:>16.1}{ratio}",
                name,
                variant,
                rate,
                enc as f64 / n as f64
            );
        }
    }
}
