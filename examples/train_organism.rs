//! Train the sycoscope model organism: `cargo run --example train_organism -- OUT [SEED] [--quick]`.

use std::path::PathBuf;

use sycoscope::organism::{train_organism, OrganismConfig};

fn main() -> sycoscope::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let out = PathBuf::from(pos.first().map(|s| s.as_str()).unwrap_or("organism-out"));
    let seed: u64 = match pos.get(1) {
        Some(s) => s
            .parse()
            .map_err(|_| sycoscope::Error::input(format!("seed '{s}' is not an integer")))?,
        None => 0,
    };
    let mut cfg = if quick {
        OrganismConfig::quick(seed)
    } else {
        OrganismConfig::full(seed)
    };
    // optional overrides for experiments: ORGANISM_STEPS, ORGANISM_R1_STEPS, ORGANISM_LR, ORGANISM_BATCH
    let env = |k: &str| std::env::var(k).ok();
    if let Some(v) = env("ORGANISM_STEPS").and_then(|v| v.parse().ok()) {
        cfg.steps = v;
    }
    if let Some(v) = env("ORGANISM_R1_STEPS").and_then(|v| v.parse().ok()) {
        cfg.r1_steps = v;
    }
    if let Some(v) = env("ORGANISM_LR").and_then(|v| v.parse().ok()) {
        cfg.lr = v;
    }
    if let Some(v) = env("ORGANISM_BATCH").and_then(|v| v.parse().ok()) {
        cfg.batch = v;
    }
    if let Some(v) = env("ORGANISM_HELDOUT").and_then(|v| v.parse().ok()) {
        cfg.heldout = v;
    }
    if let Some(v) = env("ORGANISM_TASKS") {
        cfg.tasks = v
            .split(',')
            .map(|t| t.parse())
            .collect::<sycoscope::Result<Vec<_>>>()?;
    }
    if let Some(v) = env("ORGANISM_EVAL_EVERY").and_then(|v| v.parse().ok()) {
        cfg.eval_every = v;
    }
    if let Some(v) = env("ORGANISM_PATCH").and_then(|v| v.parse().ok()) {
        cfg.model.patch_size = v;
    }
    if let Some(v) = env("ORGANISM_WARMUP").and_then(|v| v.parse().ok()) {
        cfg.warmup = v;
    }
    if let Some(v) = env("ORGANISM_POS_STD").and_then(|v| v.parse().ok()) {
        cfg.vision_pos_std = v;
    }
    let report = train_organism(&out, &cfg, true)?;
    println!("{}", report.summary());
    Ok(())
}
