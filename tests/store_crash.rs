//! Crash safety of the activation store under a real SIGKILL: a child process appends rows in a
//! loop and is killed at arbitrary moments; after each kill the store must open without error,
//! show only whole committed rows with the right values, and resume where it stopped.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ndarray::{ArrayD, IxDyn};
use sycoscope::store::{RowMeta, StoreManifest, StoreReader, StoreWriter};

const CHILD_ENV: &str = "SYCOSCOPE_STORE_CRASH_CHILD_DIR";
const TOTAL: usize = 400;

fn manifest() -> StoreManifest {
    StoreManifest {
        model: "crash-test".into(),
        weights_hash: "w".into(),
        hook_spec: "a,b".into(),
        ..Default::default()
    }
}

fn row(i: usize) -> (RowMeta, Vec<(String, ArrayD<f32>)>) {
    let meta = RowMeta {
        example_id: format!("ex{i}"),
        condition: if i.is_multiple_of(2) {
            "r1"
        } else {
            "r2:strong"
        }
        .into(),
        task: "t".into(),
        labels: BTreeMap::from([("i".to_string(), i as f64)]),
        ..Default::default()
    };
    let a = ArrayD::from_shape_fn(IxDyn(&[64]), |ix| (i * 1000 + ix[0]) as f32);
    let b = ArrayD::from_shape_fn(IxDyn(&[2, 3]), |ix| -((i * 10 + ix[0] * 3 + ix[1]) as f32));
    (meta, vec![("a".into(), a), ("b".into(), b)])
}

/// Append rows 0..TOTAL (skipping committed ones), committing every 3 rows.
fn append_all(dir: &Path) -> usize {
    let mut w = StoreWriter::create_or_resume(dir, &manifest()).expect("resume");
    w.set_rows_per_shard(3);
    for i in 0..TOTAL {
        let (meta, t) = row(i);
        if w.is_done(&meta.example_id, &meta.condition) {
            continue;
        }
        w.push(meta, t).expect("push");
    }
    w.finish().expect("finish")
}

/// Every visible row is whole and correct: rows are ex0, ex1, ... in order, no duplicates.
fn check(dir: &Path) -> usize {
    let r = StoreReader::open(dir).expect("store opens after a kill");
    let n = r.len();
    let mut seen = HashSet::new();
    for (k, ix) in r.index().iter().enumerate() {
        assert_eq!(ix.row, k);
        assert_eq!(ix.meta, row(k).0, "row {k}");
        assert!(seen.insert((ix.meta.example_id.clone(), ix.meta.condition.clone())));
    }
    if n > 0 {
        let a = r.read("a").unwrap();
        let b = r.read("b").unwrap();
        assert_eq!(a.shape(), &[n, 64]);
        assert_eq!(b.shape(), &[n, 2, 3]);
        for k in 0..n {
            let (_, t) = row(k);
            assert_eq!(a.index_axis(ndarray::Axis(0), k), t[0].1, "hook a row {k}");
            assert_eq!(b.index_axis(ndarray::Axis(0), k), t[1].1, "hook b row {k}");
        }
    }
    n
}

/// What a kill left behind: temporary files, shard files, whether the index ends mid-line.
fn debris(dir: &Path) -> String {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let tmp = names.iter().filter(|n| n.ends_with(".tmp")).count();
    let shards = names.iter().filter(|n| n.starts_with("shard-")).count();
    let idx = std::fs::read(dir.join("index.jsonl")).unwrap_or_default();
    let torn = !idx.is_empty() && idx.last() != Some(&b'\n');
    format!("{tmp} tmp, {shards} shard files, torn index line: {torn}")
}

/// Runs only as the child process of `sigkill_during_appends_then_resume`.
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    append_all(Path::new(&dir));
}

#[test]
fn sigkill_during_appends_then_resume() {
    let td = tempfile::tempdir().unwrap();
    let dir = td.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut last = 0;
    let mut grew = 0;
    // Kill after varied delays so that the kill lands at different points of the commit cycle.
    for round in 0..8u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the child has committed something new (or a time limit), then a bit more.
        let t0 = Instant::now();
        let index = dir.join("index.jsonl");
        let start_len = std::fs::metadata(&index).map(|m| m.len()).unwrap_or(0);
        while t0.elapsed() < Duration::from_secs(20) {
            if std::fs::metadata(&index).map(|m| m.len()).unwrap_or(0) > start_len {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros((round * 7919) % 5000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let debris = debris(&dir);
        let n = check(&dir);
        eprintln!("round {round}: {n} rows visible after SIGKILL; debris: {debris}");
        assert!(n >= last, "round {round}: rows went from {last} to {n}");
        if n > last {
            grew += 1;
        }
        last = n;
        if n == TOTAL {
            break;
        }
    }
    assert!(grew > 0, "the child never committed a row");
    // Finish in-process and check the whole store.
    assert_eq!(append_all(&dir), TOTAL);
    assert_eq!(check(&dir), TOTAL);
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
