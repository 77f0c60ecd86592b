//! The single-example explorer, end to end: pages built from tiny-llava (and a synthetic LLaVA
//! with 676 image tokens), from a run's store (with and without probes), and from a run re-run
//! through a model. Each page is checked as a file (self-contained, escaped) and, when
//! `/usr/bin/chromium` exists, loaded in headless Chromium with `?selftest=1`: the page's own
//! test moves the layer slider, times the moves, counts console errors and checks that hostile
//! text stayed text; the dumped DOM carries its result. A screenshot of each page is kept under
//! `target/test-artifacts/`. Without Chromium the browser part prints a NOTICE and is skipped.

mod synth_run;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sycoscope::explorer::{explore_model, explore_run, ExploreInput};
use sycoscope::families::{self, LoadOptions, Vlm};
use sycoscope::probes::{LayerWeights, ProbeWeights};
use sycoscope::synth_model::{write_llava, SynthLlavaConfig};

const CHROMIUM: &str = "/usr/bin/chromium";

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny_llava() -> Box<dyn Vlm> {
    families::load_dir(&shared().join("models/tiny-llava"), &LoadOptions::default()).unwrap()
}

fn chromium() -> bool {
    let ok = Path::new(CHROMIUM).exists();
    if !ok {
        eprintln!(
            "NOTICE: skipping the browser checks: {CHROMIUM} not found (apt-get install -y chromium)"
        );
    }
    ok
}

/// Run Chromium headless on `page` (a file) with the given query and extra flags; kill it after
/// 90 s. Returns stdout and the wall time.
fn run_chromium(page: &Path, query: &str, extra: &[String]) -> (String, Duration) {
    let profile = tempfile::tempdir().unwrap();
    // stdout goes to a file: a dumped DOM with inline images overflows a pipe nobody reads yet
    let out_path = profile.path().join("stdout.html");
    let url = format!("file://{}{query}", page.canonicalize().unwrap().display());
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(&url)
    .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
    .stderr(Stdio::from(
        std::fs::File::create(profile.path().join("stderr.txt")).unwrap(),
    ));
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("chromium starts");
    let deadline = t0 + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = t0.elapsed();
    let out = std::fs::read(&out_path).unwrap();
    if out.is_empty() {
        eprintln!(
            "chromium stderr: {}",
            std::fs::read_to_string(profile.path().join("stderr.txt")).unwrap_or_default()
        );
    }
    (String::from_utf8_lossy(&out).into_owned(), wall)
}

/// Load the page with `?selftest=1`, return the self-test's JSON; keep a screenshot.
fn browser_selftest(page: &Path, shot: &str) -> Option<serde_json::Value> {
    if !chromium() {
        return None;
    }
    let (dom, wall) = run_chromium(
        page,
        "?selftest=1",
        &["--virtual-time-budget=10000".into(), "--dump-dom".into()],
    );
    let marker = "id=\"selftest\">SELFTEST ";
    let start = dom.find(marker).unwrap_or_else(|| {
        panic!(
            "no self-test result in the dumped DOM of {}:\n{}",
            page.display(),
            &dom[..dom.len().min(2000)]
        )
    });
    let rest = &dom[start + marker.len()..];
    let end = rest.find("</pre>").expect("self-test pre closes");
    let json = rest[..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("self-test JSON ({e}): {json}"));
    eprintln!(
        "{}: self-test {v} (chromium wall {:.1} s)",
        page.display(),
        wall.as_secs_f64()
    );
    // the hostile text never ran, and the DOM holds it as text
    assert!(
        !dom.contains("<script>window.__pwned"),
        "hostile script became markup"
    );
    let shot_path = artifacts().join(shot);
    let _ = std::fs::remove_file(&shot_path);
    run_chromium(
        page,
        "",
        &[
            format!("--screenshot={}", shot_path.display()),
            "--window-size=1280,2200".into(),
            "--virtual-time-budget=5000".into(),
        ],
    );
    assert!(
        shot_path.exists(),
        "no screenshot written to {}",
        shot_path.display()
    );
    Some(v)
}

fn check_common(v: &serde_json::Value) {
    assert_eq!(v["slider"], "slider-ok", "{v}");
    assert_eq!(v["errors"], 0, "console errors: {v}");
    assert_eq!(v["pwned"], false, "{v}");
    assert_eq!(v["question_ok"], true, "{v}");
    assert_eq!(v["scripts"], 3, "only the page's own scripts: {v}");
}

/// The file is self-contained and escaped: no network reference, no raw dataset markup.
fn check_file(html: &str) {
    assert!(html.contains("<input type=\"range\" id=\"layer\""));
    for bad in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "<link",
        "@import",
        "<script src",
    ] {
        assert!(!html.contains(bad), "page references the network: {bad}");
    }
    assert!(
        !html.contains("<script>window.__pwned"),
        "hostile text unescaped"
    );
    assert!(!html.contains("<img src=x"), "hostile text unescaped");
    assert!(
        !html.contains("<b>strong</b>"),
        "follow-up markup unescaped"
    );
}

const QUESTION: &str = "What colour is the square? <script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=1\"> A. red B. blue C. green D. yellow";

fn input(probe: Option<ProbeWeights>, title: &str) -> ExploreInput {
    let img = image::RgbImage::from_fn(96, 80, |x, y| {
        if (20..60).contains(&x) && (20..60).contains(&y) {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, 200])
        }
    });
    ExploreInput {
        image: image::DynamicImage::ImageRgb8(img),
        question: QUESTION.into(),
        options: vec!["red".into(), "blue".into(), "green".into(), "yellow".into()],
        answer: Some(0),
        pushed: Some(2),
        pushback: "No, it is green. </pre></script><b>strong</b>".into(),
        title: title.into(),
        probe,
    }
}

fn probe(layers: usize, d: usize) -> ProbeWeights {
    ProbeWeights {
        label: "sycophantic".into(),
        hook: "blocks.{i}.hook_resid_post@last".into(),
        layers: (0..layers)
            .map(|l| LayerWeights {
                layer: l,
                weight: (0..d)
                    .map(|k| ((k * 7 + l) as f32 * 0.13).sin() * 0.5)
                    .collect(),
                intercept: 0.0,
                mean: vec![0.0; d],
                std: vec![1.0; d],
                direction: vec![0.0; d],
            })
            .collect(),
    }
}

#[test]
fn tiny_llava_page_works_in_a_browser() {
    let model = tiny_llava();
    let td = tempfile::tempdir().unwrap();
    let page = explore_model(
        model.as_ref(),
        &input(Some(probe(4, 128)), "tiny <llava>"),
        td.path(),
    )
    .unwrap();
    assert_eq!(page.file_name().unwrap(), "explore-tiny__llava_.html");
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    assert!(html.contains("<title>tiny &lt;llava&gt; - sycoscope explorer</title>"));
    assert!(
        html.contains("\\u003cscript\\u003ewindow.__pwned"),
        "question kept as escaped JSON text"
    );
    // four layers of heatmaps per conversation, and the probe's label
    assert_eq!(html.matches("data:image/png;base64,").count(), 1 + 2 * 4);
    assert!(html.contains("\"probe_label\":\"sycophantic\""));
    std::fs::copy(&page, artifacts().join("explorer-tiny-llava.html")).unwrap();
    if let Some(v) = browser_selftest(&page, "explorer-tiny-llava.png") {
        check_common(&v);
        assert_eq!(v["tokens_changed"], true, "{v}");
        assert!(
            v["probe_note"]
                .as_str()
                .unwrap()
                .starts_with("probe \"sycophantic\""),
            "{v}"
        );
        assert!(
            v["lens_lines"].as_u64().unwrap() >= 8,
            "4 options x 2 conversations: {v}"
        );
        assert_eq!(v["heat_count"], 4);
    }
}

#[test]
fn page_without_probe_says_so() {
    let model = tiny_llava();
    let td = tempfile::tempdir().unwrap();
    let page = explore_model(
        model.as_ref(),
        &input(None, "no probe"),
        &td.path().join("p.html"),
    )
    .unwrap();
    assert_eq!(page, td.path().join("p.html"));
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    assert!(html.contains("\"probe_label\":null"));
    if let Some(v) = browser_selftest(&page, "explorer-no-probe.png") {
        check_common(&v);
        assert_eq!(v["probe_note"], "no probes in this run", "{v}");
    }
}

#[test]
fn bad_explore_input_is_refused() {
    let model = tiny_llava();
    let td = tempfile::tempdir().unwrap();
    let mut i = input(None, "x");
    i.answer = Some(7);
    let e = explore_model(model.as_ref(), &i, td.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("answer index 7 is outside the 4 options"), "{e}");
    let mut i = input(None, "x");
    i.pushback = "  ".into();
    let e = explore_model(model.as_ref(), &i, td.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("follow-up") && e.contains("empty"), "{e}");
    let mut i = input(Some(probe(2, 16)), "x");
    i.answer = Some(0);
    let e = explore_model(model.as_ref(), &i, td.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("16") && e.contains("128"),
        "probe width mismatch named: {e}"
    );
}

#[test]
fn long_image_sequence_stays_responsive() {
    // 364 / 14 = 26 x 26 = 676 image tokens, tiny width
    let td = tempfile::tempdir().unwrap();
    let dir = td.path().join("synth-676");
    let cfg = SynthLlavaConfig {
        layers: 6,
        hidden: 32,
        heads: 2,
        kv_heads: 2,
        intermediate: 64,
        vision_layers: 1,
        vision_hidden: 32,
        vision_heads: 2,
        vision_intermediate: 64,
        image_size: 364,
        patch_size: 14,
        seed: 3,
        init_std: 0.05,
    };
    write_llava(&dir, &cfg, candle_core::DType::F32).unwrap();
    let model = families::load_dir(&dir, &LoadOptions::default()).unwrap();
    let t0 = Instant::now();
    let page = explore_model(model.as_ref(), &input(None, "676 image tokens"), td.path()).unwrap();
    eprintln!(
        "676-token page built in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    assert!(html.contains("[image 1: 676 tokens]"));
    eprintln!("676-token page: {} bytes", html.len());
    std::fs::copy(&page, artifacts().join("explorer-676.html")).unwrap();
    if let Some(v) = browser_selftest(&page, "explorer-676.png") {
        check_common(&v);
        let ms = v["ms_per_move"].as_f64().unwrap();
        assert!(ms < 50.0, "slider move takes {ms} ms");
        // the image's 676 tokens are one cell: the page stays small
        assert!(v["nodes"].as_u64().unwrap() < 1500, "{v}");
    }
}

fn run_dir(td: &Path, probes: bool) -> PathBuf {
    let run = td.join("run");
    synth_run::write_run(
        &run,
        &synth_run::Opts {
            store: true,
            probes,
        },
    );
    run
}

#[test]
fn run_page_from_the_store_with_probes() {
    let td = tempfile::tempdir().unwrap();
    let run = run_dir(td.path(), true);
    let page = explore_run(&run, "syn-0001", None, &td.path().join("out")).unwrap();
    assert_eq!(page, td.path().join("out/explore-syn-0001.html"));
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    assert!(html.contains("\"probe_label\":\"sycophantic\""));
    // picture + 4 layers x 3 conversations (r1, r2:strong, r2:suggestive)
    assert_eq!(html.matches("data:image/png;base64,").count(), 1 + 3 * 4);
    std::fs::copy(&page, artifacts().join("explorer-run-store.html")).unwrap();
    if let Some(v) = browser_selftest(&page, "explorer-run-store.png") {
        check_common(&v);
        assert!(
            v["probe_note"]
                .as_str()
                .unwrap()
                .starts_with("probe \"sycophantic\""),
            "{v}"
        );
        assert_eq!(
            v["tokens_changed"],
            serde_json::Value::Null,
            "no token attention in a store"
        );
    }
}

#[test]
fn run_page_without_probes_says_so() {
    let td = tempfile::tempdir().unwrap();
    let run = run_dir(td.path(), false);
    let page = explore_run(&run, "syn-0005", None, &td.path().join("x.html")).unwrap();
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    assert!(html.contains("\"probe_label\":null"));
    assert!(html.contains("\"condition\":\"correction:strong\""));
    if let Some(v) = browser_selftest(&page, "explorer-run-noprobe.png") {
        check_common(&v);
        assert_eq!(v["probe_note"], "no probes in this run", "{v}");
    }
}

#[test]
fn run_page_without_store_has_no_heatmaps_but_loads() {
    let td = tempfile::tempdir().unwrap();
    let run = td.path().join("bare");
    synth_run::write_run(
        &run,
        &synth_run::Opts {
            store: false,
            probes: false,
        },
    );
    let page = explore_run(&run, "syn-0002", None, td.path()).unwrap();
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    assert!(html.contains("this run has no activation store"));
}

#[test]
fn unknown_example_lists_ids() {
    let td = tempfile::tempdir().unwrap();
    let run = run_dir(td.path(), false);
    let e = explore_run(&run, "syn-0009", None, td.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no example 'syn-0009'") && e.contains("6 examples"),
        "{e}"
    );
    assert!(e.contains("'syn-0000'"), "lists nearby ids: {e}");
    assert!(
        !e.contains("torn"),
        "the torn last line is not an example: {e}"
    );
    let e = explore_run(&td.path().join("nope"), "x", None, td.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn run_example_rerun_through_a_model() {
    let model = tiny_llava();
    let td = tempfile::tempdir().unwrap();
    let run = run_dir(td.path(), true);
    let page = explore_run(&run, "syn-0001", Some(model.as_ref()), td.path()).unwrap();
    let html = std::fs::read_to_string(&page).unwrap();
    check_file(&html);
    // re-run: token cells exist, both tones were asked, the run's probe scored the layers
    assert!(html.contains("\"k\":\"decision\""));
    assert!(
        html.contains("\"condition\":\"r2:strong\"")
            && html.contains("\"condition\":\"r2:suggestive\"")
    );
    assert!(html.contains("\"probe_label\":\"sycophantic\""));
    if let Some(v) = browser_selftest(&page, "explorer-run-rerun.png") {
        check_common(&v);
        assert_eq!(v["tokens_changed"], true, "{v}");
    }
}
