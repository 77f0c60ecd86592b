//! Activation store throughput and memory: write N rows x H hooks x D floats, then stream them
//! back, printing rows/s, MB/s and peak RSS (VmHWM), with the RSS after 1/5 of the rows next to
//! the RSS at the end to show that memory stays flat as the store grows.
//!
//! Run: `cargo bench --bench store` (or `cargo test --bench store` for a debug-profile run).
//! Size: defaults to 2,500 rows x 8 hooks x 1,024 floats (~80 MB, seconds);
//! `SYCOSCOPE_STORE_BENCH_BIG=1` gives 5,000 rows x 32 hooks x 4,096 floats (~2.6 GB on disk);
//! `SYCOSCOPE_STORE_BENCH_ROWS`, `_HOOKS`, `_DIM` override each; `SYCOSCOPE_STORE_BENCH_DIR`
//! picks the folder (default: a temporary folder, removed afterwards).

use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use sycoscope::store::{RowMeta, StoreManifest, StoreReader, StoreWriter};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (VmRSS, VmHWM) in MiB from /proc/self/status; zeros where unavailable.
fn rss_mib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Reset the peak-RSS counter (Linux: write 5 to /proc/self/clear_refs).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches -- --list`
    }
    let big = std::env::var("SYCOSCOPE_STORE_BENCH_BIG").is_ok_and(|v| v != "0");
    let (dr, dh, dd) = if big {
        (5000, 32, 4096)
    } else {
        (2500, 8, 1024)
    };
    let rows = env_usize("SYCOSCOPE_STORE_BENCH_ROWS", dr);
    let hooks = env_usize("SYCOSCOPE_STORE_BENCH_HOOKS", dh);
    let dim = env_usize("SYCOSCOPE_STORE_BENCH_DIM", dd);
    let checkpoint = (rows / 5).max(1);
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = std::env::var("SYCOSCOPE_STORE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().join("store"));
    let _ = std::fs::remove_dir_all(&dir);
    let names: Vec<String> = (0..hooks)
        .map(|h| format!("blocks.{h}.hook_resid_post"))
        .collect();
    let row_mb = (hooks * dim * 4) as f64 / 1e6;
    println!(
        "store bench: {rows} rows x {hooks} hooks x {dim} floats ({:.3} MB/row, {:.0} MB total) in {}",
        row_mb,
        row_mb * rows as f64,
        dir.display()
    );
    let (rss0, _) = rss_mib();
    reset_peak();

    // ---- write
    let manifest = StoreManifest {
        model: "bench".into(),
        ..Default::default()
    };
    let mut w = StoreWriter::create_or_resume(&dir, &manifest).expect("create store");
    let t0 = Instant::now();
    let mut at_checkpoint = (0.0, 0.0);
    let mut gen_s = 0.0;
    for i in 0..rows {
        let tg = Instant::now();
        let meta = RowMeta {
            example_id: format!("ex{i}"),
            condition: "r1".into(),
            ..Default::default()
        };
        let tensors = names
            .iter()
            .enumerate()
            .map(|(h, n)| {
                let base = (i * 31 + h) as f32 * 1e-3;
                let a = ArrayD::from_shape_fn(IxDyn(&[dim]), |ix| base + ix[0] as f32 * 1e-6);
                (n.clone(), a)
            })
            .collect();
        gen_s += tg.elapsed().as_secs_f64();
        w.push(meta, tensors).expect("push");
        if i + 1 == checkpoint {
            at_checkpoint = rss_mib();
        }
    }
    w.finish().expect("finish");
    let dt = t0.elapsed().as_secs_f64() - gen_s;
    let (rss_end, hwm_end) = rss_mib();
    println!(
        "write: {:.0} rows/s, {:.0} MB/s ({dt:.2} s, not counting {gen_s:.2} s making the data; 256 rows/shard, fsync per shard)",
        rows as f64 / dt,
        row_mb * rows as f64 / dt
    );
    println!(
        "write memory: RSS before {rss0:.0} MiB | after {checkpoint} rows RSS {:.0} MiB, peak {:.0} MiB | after {rows} rows RSS {rss_end:.0} MiB, peak {hwm_end:.0} MiB",
        at_checkpoint.0, at_checkpoint.1
    );

    // ---- read, streamed shard by shard, every hook
    let peak_reset = reset_peak();
    let r = StoreReader::open(&dir).expect("open store");
    let t0 = Instant::now();
    let mut checksum = 0f64;
    let mut read_rows_at_ck = (0.0, 0.0);
    for (h, name) in names.iter().enumerate() {
        for chunk in r.read_shards(name).expect("hook") {
            let chunk = chunk.expect("chunk");
            checksum += chunk.data[[0, 0]] as f64;
            if h == hooks / 5 && chunk.first_row == 0 {
                read_rows_at_ck = rss_mib();
            }
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let (rss_r, hwm_r) = rss_mib();
    println!(
        "read (streamed, all hooks): {:.0} rows/s, {:.0} MB/s ({dt:.2} s, checksum {checksum:.3})",
        rows as f64 / dt,
        row_mb * rows as f64 / dt
    );
    println!(
        "read memory{}: after {} of {hooks} hooks RSS {:.0} MiB, peak {:.0} MiB | at end RSS {rss_r:.0} MiB, peak {hwm_r:.0} MiB",
        if peak_reset { " (peak reset before reading)" } else { "" },
        hooks / 5,
        read_rows_at_ck.0,
        read_rows_at_ck.1
    );

    // ---- read one whole hook, stacked (memory: rows x dim of one hook)
    let t0 = Instant::now();
    let x = r.read(&names[0]).expect("read");
    let dt = t0.elapsed().as_secs_f64();
    let mb = (x.len() * 4) as f64 / 1e6;
    println!(
        "read one hook stacked {:?}: {:.0} rows/s, {:.0} MB/s ({dt:.3} s)",
        x.shape(),
        rows as f64 / dt,
        mb / dt
    );
    assert_eq!(x[[rows - 1, 0]], ((rows - 1) * 31) as f32 * 1e-3);

    // ---- random rows
    let pick: Vec<usize> = (0..200).map(|k| (k * 7919) % rows).collect();
    let t0 = Instant::now();
    let y = r.read_rows(&names[hooks - 1], &pick).expect("read_rows");
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "read_rows 200 scattered rows of one hook: {:.0} rows/s ({dt:.4} s)",
        pick.len() as f64 / dt
    );
    assert_eq!(y.shape(), &[pick.len(), dim]);
    let (_, hwm) = rss_mib();
    println!("peak RSS of the whole read phase: {hwm:.0} MiB");
}
