//! Timing of the layer-wise probe pipeline (`sycoscope::probes::fit_curve`).
//!
//! Run without building the whole dependency tree in release mode:
//! ```text
//! cargo bench --profile dev --bench probes                       # small sizes, < 2 minutes
//! SYCOSCOPE_PROBE_BENCH=full cargo bench --profile dev --bench probes   # 32 x 4096 x 5000
//! SYCOSCOPE_PROBE_BENCH=8,1024,2000 cargo bench --profile dev --bench probes  # layers,dim,n
//! ```
//! It prints wall time per configuration, the cost per layer-fit normalised by `n * d`, the
//! ratios between configurations, and an extrapolation to the paper-scale target
//! (32 layers x 4096 features x 5000 examples x 5 folds on 2 threads), assuming the cost grows
//! linearly in `layers * n * d` (L-BFGS iteration counts are capped by `max_iter`).
//!
//! Measured on the shared 2-core dev machine (dev profile, so the generic linfa/ndarray code is
//! compiled at the crate's opt-level 1; CPU time, the machine was loaded by other jobs):
//! - 4 x 512 x 1000: ~640 cpu-ns per layer*n*d probe only, ~1170 with control + bootstrap;
//!   4 x 512 x 2000: ~340 / ~600 (extrapolates to 2-6 min for the full size: optimistic).
//! - 2 x 2048 x 4000: ~2100 cpu-ns probe only, ~3700 with control + bootstrap (the 26 MB
//!   training matrix no longer fits in cache and L-BFGS needs more iterations), which
//!   extrapolates to ~11 min (probe only) and ~20 min (full pipeline) for 32 x 4096 x 5000 on 2
//!   threads. The f64 solver measured ~2x slower at that size, and row-major training matrices
//!   ~4x slower again (see `standardise` in `src/probes.rs`).

use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sycoscope::probes::{fit_curve, ProbeConfig};

/// Gaussian features (Box-Muller), a linear signal of strength 1.5 planted in the upper third of
/// the layers, labels alternating.
fn synthetic(layers: usize, d: usize, n: usize, seed: u64) -> (Vec<Array2<f32>>, Vec<bool>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let labels: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let signal = l * 3 >= layers * 2 || l + 1 == layers;
        let dir: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let norm = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
        let mut x = Array2::<f32>::zeros((n, d));
        for (i, mut row) in x.outer_iter_mut().enumerate() {
            let y = if labels[i] { 1.0 } else { -1.0 };
            for (j, v) in row.iter_mut().enumerate() {
                let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
                let u2: f32 = rng.gen();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                *v = z + if signal { 1.5 * y * dir[j] / norm } else { 0.0 };
            }
        }
        out.push(x);
    }
    (out, labels)
}

struct Timing {
    name: String,
    secs: f64,
    cpu: f64,
    units: f64,
}

/// CPU seconds (user + system) used by this process so far, from `/proc/self/stat` (Linux; NaN
/// elsewhere). The machine may be shared, so CPU time is a steadier measure than wall time.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit(')').next() else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn run(
    name: &str,
    xs: &[Array2<f32>],
    labels: &[bool],
    cfg: &ProbeConfig,
    timings: &mut Vec<Timing>,
) {
    let views: Vec<(usize, ArrayView2<f32>)> =
        xs.iter().enumerate().map(|(l, x)| (l, x.view())).collect();
    let t = Instant::now();
    let c0 = cpu_seconds();
    let (curve, _) = match fit_curve(&views, labels, "bench", "bench.hook", cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(1);
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    let (n, d) = xs[0].dim();
    let units = xs.len() as f64 * n as f64 * d as f64;
    let peak = curve.peak().map(|p| p.auc_mean).unwrap_or(f64::NAN);
    println!(
        "{name:<40} wall {secs:>7.2} s  cpu {cpu:>7.2} s  {:>7.2} cpu-ns/(layer*n*d)  peak AUC {peak:.3} at layer {}",
        cpu * 1e9 / units,
        curve.peak_layer
    );
    timings.push(Timing {
        name: name.to_string(),
        secs,
        cpu,
        units,
    });
}

fn main() {
    let spec = std::env::var("SYCOSCOPE_PROBE_BENCH").unwrap_or_default();
    let sizes: Vec<(usize, usize, usize)> = match spec.as_str() {
        "" => vec![(4, 256, 1000), (4, 512, 1000), (4, 512, 2000)],
        "full" => vec![(32, 4096, 5000)],
        s => {
            let v: Vec<usize> = s.split(',').filter_map(|t| t.trim().parse().ok()).collect();
            if v.len() != 3 {
                eprintln!("SYCOSCOPE_PROBE_BENCH: expected 'full' or 'layers,dim,n', got '{s}'");
                std::process::exit(2);
            }
            vec![(v[0], v[1], v[2])]
        }
    };
    let base = ProbeConfig::default();
    println!(
        "probe bench: folds {}, l2 {}, max_iter {}, tol {}, threads {}",
        base.folds, base.l2, base.max_iter, base.tol, base.threads
    );
    let mut timings = Vec::new();
    for &(layers, d, n) in &sizes {
        let t = Instant::now();
        let (xs, labels) = synthetic(layers, d, n, 1);
        println!(
            "\n{layers} layers x {d} features x {n} examples (generated in {:.1} s)",
            t.elapsed().as_secs_f64()
        );
        let lean = ProbeConfig {
            control: false,
            bootstrap: 0,
            ..base.clone()
        };
        run(
            &format!("{layers}x{d}x{n} probe only"),
            &xs,
            &labels,
            &lean,
            &mut timings,
        );
        if let Ok(iters) = std::env::var("SYCOSCOPE_PROBE_BENCH_ITERS") {
            for it in iters
                .split(',')
                .filter_map(|t| t.trim().parse::<u64>().ok())
            {
                let c = ProbeConfig {
                    max_iter: it,
                    ..lean.clone()
                };
                run(
                    &format!("{layers}x{d}x{n} probe only, max_iter {it}"),
                    &xs,
                    &labels,
                    &c,
                    &mut timings,
                );
            }
        }
        run(
            &format!("{layers}x{d}x{n} probe+control+bootstrap"),
            &xs,
            &labels,
            &base,
            &mut timings,
        );
    }
    println!(
        "\nratios (cpu time; extrapolation = cpu-ns/(layer*n*d) x 32*4096*5000 / {} threads):",
        base.threads
    );
    let full_units = 32.0 * 4096.0 * 5000.0;
    for t in &timings {
        let est = t.cpu / t.units * full_units / base.threads as f64;
        println!(
            "  {:<40} cpu x{:>6.2} vs first, wall/cpu {:>4.2}   32x4096x5000 on {} threads: ~{:>6.0} s ({:.0} min)",
            t.name,
            t.cpu / timings[0].cpu,
            t.secs / t.cpu,
            base.threads,
            est,
            est / 60.0
        );
    }
}
