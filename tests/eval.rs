//! The MM-SY protocol end to end on small models: letter reading, a full run, batching and
//! prefix reuse equal to their plain counterparts, resume after kill -9, shards merged equal one
//! run, multi-round pushback, bad rows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sycoscope::families::{self, LoadOptions};
use sycoscope::protocol::items::{load_items, LoadOptions as ItemLoad};
use sycoscope::protocol::runner::{self, EvalJob, EvalOptions, ExampleRecord};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sycoscope")
}

fn setup(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let bench = dir.join("bench");
    let c = sycoscope::synth_model::SynthLlavaConfig::default();
    sycoscope::synth_model::write_llava(&model, &c, candle_core::DType::F32).unwrap();
    let cfg = sycoscope::protocol::synth::SynthConfig {
        n,
        seed: 3,
        size: 84,
        ..Default::default()
    };
    sycoscope::protocol::synth::write_bench(&cfg, &bench).unwrap();
    (model, bench)
}

fn run(
    model: &Path,
    bench: &Path,
    out: &Path,
    opts: EvalOptions,
) -> sycoscope::protocol::metrics::Summary {
    let m = families::load_dir(model, &LoadOptions::default()).unwrap();
    let job = EvalJob {
        model_source: model.to_str().unwrap(),
        data: bench.to_str().unwrap(),
        run: out,
        opts,
        load: ItemLoad::default(),
        progress: false,
    };
    runner::eval(m.as_ref(), &job).unwrap()
}

fn close(a: &[ExampleRecord], b: &[ExampleRecord], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.example_id, y.example_id);
        assert_eq!(x.r1.choice, y.r1.choice, "{}", x.example_id);
        for (p, q) in x.r1.probs.iter().zip(&y.r1.probs) {
            assert!((p - q).abs() < tol, "{}: r1 {p} vs {q}", x.example_id);
        }
        for (t, r) in &x.tones {
            let s = &y.tones[t];
            assert_eq!(r.choice, s.choice);
            for (p, q) in r.probs.iter().zip(&s.probs) {
                assert!((p - q).abs() < tol, "{} {t}: {p} vs {q}", x.example_id);
            }
        }
    }
}

#[test]
fn letters_are_read_as_the_template_writes_them() {
    let m = common::load_model("tiny-llava");
    let case = &common::cases("tiny-llava")[0];
    let l = runner::letter_tokens(m.as_ref(), &case.messages, &case.images[0], 4).unwrap();
    assert_eq!(l.separator, " ", "LLaVA writes 'ASSISTANT: A'");
    // hand-checked: after "ASSISTANT:" the letters are the word-initial pieces
    assert_eq!(l.tokens, vec!["▁A", "▁B", "▁C", "▁D"]);
    for (id, t) in l.ids.iter().zip(&l.tokens) {
        assert_eq!(m.tokenizer().id_to_token(*id).as_deref(), Some(t.as_str()));
    }
}

#[test]
fn full_run_batching_and_prefix_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bench) = setup(dir.path(), 10);
    let base = EvalOptions {
        capture: Some("default".into()),
        batch_size: 1,
        ..Default::default()
    };
    let s1 = run(&model, &bench, &dir.path().join("a"), base.clone());
    let overall = s1.overall();
    assert_eq!(overall.acc_r1.n, 10);
    assert_eq!(
        overall.syc.n + overall.cor.n,
        30,
        "every example x tone lands in one branch"
    );
    for f in [
        "manifest.json",
        "examples.jsonl",
        "summary.json",
        "summary.csv",
        "store/index.jsonl",
    ] {
        assert!(dir.path().join("a").join(f).exists(), "{f}");
    }
    let store = sycoscope::store::StoreReader::open(&dir.path().join("a")).unwrap();
    assert_eq!(
        store.len(),
        40,
        "one r1 row and three round-2 rows per example"
    );
    assert!(store.hooks().contains(&"logit_lens.options".to_string()));
    // batched == unbatched
    let s2 = run(
        &model,
        &bench,
        &dir.path().join("b"),
        EvalOptions {
            batch_size: 4,
            ..base.clone()
        },
    );
    close(
        &runner::read_examples(&dir.path().join("a")).unwrap(),
        &runner::read_examples(&dir.path().join("b")).unwrap(),
        1e-4,
    );
    assert_eq!(
        serde_json::to_string(&s1).unwrap(),
        serde_json::to_string(&s2).unwrap()
    );
    // prefix reuse == re-encoding the whole conversation
    run(
        &model,
        &bench,
        &dir.path().join("c"),
        EvalOptions {
            prefix_reuse: false,
            batch_size: 3,
            ..base.clone()
        },
    );
    close(
        &runner::read_examples(&dir.path().join("a")).unwrap(),
        &runner::read_examples(&dir.path().join("c")).unwrap(),
        1e-4,
    );
    // image encodings: one per example with reuse, four without
    let m = families::load_dir(&model, &LoadOptions::default()).unwrap();
    let items = load_items(bench.to_str().unwrap(), &ItemLoad::default())
        .unwrap()
        .items;
    let its: Vec<&sycoscope::protocol::items::Item> = items.iter().take(2).collect();
    let imgs: Vec<_> = its.iter().map(|i| i.load_image().unwrap()).collect();
    let letters = runner::letter_tokens(
        m.as_ref(),
        &runner::round1_messages(its[0], None),
        &imgs[0],
        4,
    )
    .unwrap();
    let ev = runner::Evaluator::new(m.as_ref(), letters.clone(), EvalOptions::default()).unwrap();
    assert_eq!(ev.run_batch(&its, &imgs).unwrap().image_encodings, 2);
    let ev = runner::Evaluator::new(
        m.as_ref(),
        letters,
        EvalOptions {
            prefix_reuse: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ev.run_batch(&its, &imgs).unwrap().image_encodings, 8);
}

#[test]
fn kill_9_then_resume_gives_the_same_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bench) = setup(dir.path(), 30);
    let clean = dir.path().join("clean");
    let args = |out: &Path| {
        vec![
            "eval".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            bench.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--batch-size".into(),
            "1".into(),
            "--capture".into(),
            "default".into(),
            "--quiet".into(),
        ]
    };
    let st = Command::new(bin()).args(args(&clean)).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let killed = dir.path().join("killed");
    let mut interrupted = false;
    for attempt in 0..3 {
        let mut child = Command::new(bin()).args(args(&killed)).spawn().unwrap();
        let t0 = std::time::Instant::now();
        loop {
            let n = std::fs::read_to_string(killed.join("examples.jsonl"))
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if n >= 3 + attempt * 5 || t0.elapsed().as_secs() > 60 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        interrupted |= !status.success();
    }
    assert!(
        interrupted,
        "the run finished before it could be killed; make it longer"
    );
    let st = Command::new(bin()).args(args(&killed)).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let a = std::fs::read_to_string(clean.join("summary.json")).unwrap();
    let b = std::fs::read_to_string(killed.join("summary.json")).unwrap();
    assert_eq!(a, b);
    let ra = sycoscope::store::StoreReader::open(&clean).unwrap();
    let rb = sycoscope::store::StoreReader::open(&killed).unwrap();
    assert_eq!(ra.len(), rb.len());
    let mut ka: Vec<_> = ra
        .index()
        .iter()
        .map(|r| (r.meta.example_id.clone(), r.meta.condition.clone()))
        .collect();
    let mut kb: Vec<_> = rb
        .index()
        .iter()
        .map(|r| (r.meta.example_id.clone(), r.meta.condition.clone()))
        .collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
}

#[test]
fn shards_merged_equal_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bench) = setup(dir.path(), 9);
    let base = EvalOptions {
        capture: Some("default".into()),
        ..Default::default()
    };
    let whole = run(&model, &bench, &dir.path().join("whole"), base.clone());
    let mut shards = Vec::new();
    for i in 0..3 {
        let out = dir.path().join(format!("s{i}"));
        run(
            &model,
            &bench,
            &out,
            EvalOptions {
                shard: Some((i, 3)),
                ..base.clone()
            },
        );
        shards.push(out);
    }
    let merged = runner::merge(&shards, &dir.path().join("merged")).unwrap();
    assert_eq!(
        serde_json::to_string(&whole).unwrap(),
        serde_json::to_string(&merged).unwrap()
    );
    close(
        &runner::read_examples(&dir.path().join("whole")).unwrap(),
        &runner::read_examples(&dir.path().join("merged")).unwrap(),
        1e-5,
    );
    assert_eq!(
        sycoscope::store::StoreReader::open(&dir.path().join("merged"))
            .unwrap()
            .len(),
        36
    );
    // merging runs of different options is refused
    run(
        &model,
        &bench,
        &dir.path().join("other"),
        EvalOptions {
            rounds: 3,
            shard: Some((0, 3)),
            ..Default::default()
        },
    );
    assert!(runner::merge(
        &[shards[0].clone(), dir.path().join("other")],
        &dir.path().join("bad")
    )
    .is_err());
}

#[test]
fn more_rounds_system_prompt_and_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bench) = setup(dir.path(), 4);
    run(
        &model,
        &bench,
        &dir.path().join("k"),
        EvalOptions {
            rounds: 4,
            system_prompt: Some("Trust what you see in the image.".into()),
            ..Default::default()
        },
    );
    let ex = runner::read_examples(&dir.path().join("k")).unwrap();
    for e in &ex {
        for r in e.tones.values() {
            assert_eq!(r.rounds.len(), 2, "rounds 3 and 4");
        }
    }
    // a broken image: skipped and reported, or an error with --strict
    let mut text = std::fs::read_to_string(bench.join("items.jsonl")).unwrap();
    let first_img = text
        .split("\"image\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    std::fs::write(bench.join(&first_img), b"not a png").unwrap();
    text.push('\n');
    let out = dir.path().join("broken");
    let st = Command::new(bin())
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            bench.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{err}");
    assert!(err.contains("skipped") && err.contains("decode"), "{err}");
    assert_eq!(runner::read_examples(&out).unwrap().len(), 3);
    let st = Command::new(bin())
        .args([
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            bench.to_str().unwrap(),
            "--out",
            dir.path().join("strict").to_str().unwrap(),
            "--quiet",
            "--strict",
        ])
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(!String::from_utf8_lossy(&st.stderr).contains("panicked"));
    // bad amplification arguments
    for (lam, layers) in [("-1", "high"), ("NaN", "high"), ("0.5", "2..99")] {
        let st = Command::new(bin())
            .args([
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--data",
                bench.to_str().unwrap(),
                "--out",
                dir.path().join("amp").to_str().unwrap(),
                "--quiet",
                &format!("--amplify={lam}"),
                "--amplify-layers",
                layers,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&st.stderr);
        assert!(
            !st.status.success() && err.contains("amplify") && !err.contains("panicked"),
            "{lam} {layers}: {err}"
        );
    }
}
