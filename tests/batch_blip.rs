//! BLIP-2 and InstructBLIP beyond single prompts: left-padded batches (with InstructBLIP's
//! right-padded Q-Former text) give each row the logits it gets alone, and KV-cache `extend`
//! (OPT's learned positions and Llama's rotary positions continuing) matches a full forward.

mod common;

use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, Vlm};
use sycoscope::hooks::HookCtx;
use sycoscope::prepare::Prepared;

fn last_logits(model: &dyn Vlm, p: &Prepared) -> Vec<f32> {
    let l = model
        .forward(&[p], &mut HookCtx::none(), LogitsFor::Last, None)
        .unwrap();
    l.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prepared(model: &dyn Vlm, name: &str) -> Vec<Prepared> {
    common::cases(name)
        .iter()
        .map(|c| model.prepare(&c.messages, &c.images, true).unwrap())
        .collect()
}

fn check_batch(name: &str) {
    let model = common::load_model(name);
    let ps = prepared(model.as_ref(), name);
    let lens: Vec<usize> = ps.iter().map(|p| p.ids.len()).collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "the cases should differ in length to exercise padding: {lens:?}"
    );
    let refs: Vec<&Prepared> = ps.iter().collect();
    let batch = model
        .forward(&refs, &mut HookCtx::none(), LogitsFor::Last, None)
        .unwrap();
    assert_eq!(batch.dims()[0], ps.len());
    let mut worst = 0f32;
    for (i, p) in ps.iter().enumerate() {
        let alone = last_logits(model.as_ref(), p);
        let row: Vec<f32> = batch
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        worst = worst.max(max_diff(&alone, &row));
    }
    println!(
        "{name}: batch of {} (lengths {lens:?}) vs alone: max |d| {worst:.2e}",
        ps.len()
    );
    assert!(
        worst < 1e-4,
        "{name}: padded batch differs from single rows by {worst}"
    );
}

fn check_extend(name: &str) {
    let model = common::load_model(name);
    let ps = prepared(model.as_ref(), name);
    // continuations of different lengths for two rows of different lengths
    let (a, b) = (&ps[0], &ps[2]);
    let news = [vec![17u32, 29, 31], vec![41u32]];
    let mut state = families::common::empty_state(model.as_ref(), 2);
    model
        .forward(
            &[a, b],
            &mut HookCtx::none(),
            LogitsFor::Last,
            Some(&mut state),
        )
        .unwrap();
    let ext = model
        .extend(
            &mut state,
            &news,
            None,
            &mut HookCtx::none(),
            LogitsFor::Last,
        )
        .unwrap();
    let mut worst = 0f32;
    for (i, (p, new)) in [a, b].into_iter().zip(&news).enumerate() {
        let mut full = p.clone();
        full.ids.extend_from_slice(new);
        full.spans.len += new.len();
        let want = last_logits(model.as_ref(), &full);
        let got: Vec<f32> = ext
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        worst = worst.max(max_diff(&want, &got));
    }
    println!("{name}: batched prefill + extend vs full forward: max |d| {worst:.2e}");
    assert!(
        worst < 1e-4,
        "{name}: extend differs from a full forward by {worst}"
    );
    // a second step continues the positions again
    let ext2 = model
        .extend(
            &mut state,
            &[vec![5u32], vec![6u32]],
            None,
            &mut HookCtx::none(),
            LogitsFor::Last,
        )
        .unwrap();
    let mut full = a.clone();
    full.ids.extend_from_slice(&[17, 29, 31, 5]);
    full.spans.len += 4;
    let want = last_logits(model.as_ref(), &full);
    let got: Vec<f32> = ext2
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = max_diff(&want, &got);
    assert!(d < 1e-4, "{name}: second extend step differs by {d}");
}

#[test]
fn blip2_batch_rows_match_single() {
    check_batch("tiny-blip2-opt");
}

#[test]
fn instructblip_batch_rows_match_single() {
    check_batch("tiny-instructblip-vicuna");
}

#[test]
fn blip2_extend_matches_full_forward() {
    check_extend("tiny-blip2-opt");
}

#[test]
fn instructblip_extend_matches_full_forward() {
    check_extend("tiny-instructblip-vicuna");
}

#[test]
fn span_table_marks_the_query_tokens() {
    for name in ["tiny-blip2-opt", "tiny-instructblip-vicuna"] {
        let model = common::load_model(name);
        let case = &common::cases(name)[1];
        let p = model.prepare(&case.messages, &case.images, true).unwrap();
        let img = &p.spans.images[0];
        // 8 queries first, before BOS; the grid is the 4 x 4 patch grid (56 px / 14)
        assert_eq!(
            (img.start, img.end, img.rows, img.cols),
            (0, 8, 4, 4),
            "{name}"
        );
        assert!(p.ids[..8].iter().all(|&t| t == model.info().image_token_id));
        assert_ne!(p.ids[8], model.info().image_token_id);
        // the first message starts after BOS and ends before the closing " Answer:"
        let m = &p.spans.messages[0];
        assert_eq!(m.start, 9, "{name}");
        assert!(m.end < p.ids.len());
        let text = model
            .tokenizer()
            .decode(&p.ids[m.start..m.end], false)
            .unwrap();
        assert!(text.trim_start().starts_with("Question:"), "{name}: {text}");
    }
}
