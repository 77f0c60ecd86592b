//! PaliGemma parity with Hugging Face transformers on every `../shared/fixtures/tiny-paligemma`
//! case.

mod common;

#[test]
fn tiny_paligemma_matches_transformers() {
    let report = common::check_parity("tiny-paligemma");
    println!("{report}");
}

use candle_core::Tensor;
use sycoscope::blocks::LogitsFor;
use sycoscope::families::{self, common as fam};
use sycoscope::hooks::HookCtx;

fn decode(model: &dyn families::Vlm, ids: &[u32]) -> String {
    model.tokenizer().decode(ids, false).unwrap()
}

/// The span table: image span with its 4x4 grid first, then one range per message covering its
/// flattened text (assistant turns with their `answer ` prefix) and its newline.
#[test]
fn spans_follow_the_flattened_prompt() {
    let model = common::load_model("tiny-paligemma");
    let case = common::cases("tiny-paligemma")
        .into_iter()
        .find(|c| c.name == "r2_blue_square_strong")
        .unwrap();
    let p = model.prepare(&case.messages, &case.images, true).unwrap();
    let sp = &p.spans;
    assert_eq!(sp.images.len(), 1);
    let im = &sp.images[0];
    assert_eq!((im.start, im.end, im.rows, im.cols), (0, 16, 4, 4));
    assert_eq!(p.ids[16], 2, "<bos> after the image tokens");
    assert_eq!(sp.messages.len(), 3);
    assert_eq!(sp.messages[0].start, 17);
    assert_eq!(sp.messages[2].end, p.ids.len());
    for w in sp.messages.windows(2) {
        assert_eq!(w[0].end, w[1].start, "messages are contiguous");
    }
    let text = |k: usize| {
        decode(
            model.as_ref(),
            &p.ids[sp.messages[k].start..sp.messages[k].end],
        )
    };
    assert!(text(0).starts_with("What is the color") && text(0).ends_with("directly.\n"));
    assert_eq!(text(1), "answer B\n");
    assert_eq!(text(2), "You are wrong. The correct answer is D.\n");
}

fn rows_of(t: &Tensor, b: usize, from: usize) -> Tensor {
    let s = t.dim(1).unwrap();
    t.narrow(0, b, 1)
        .unwrap()
        .narrow(1, from, s - from)
        .unwrap()
}

/// A left-padded batch gives each row what it gets alone, in the prefill and when decoding with
/// the KV cache; extending by several tokens at once equals extending one at a time.
#[test]
fn padded_batch_and_extend_match_single_rows() {
    let model = common::load_model("tiny-paligemma");
    let cases = common::cases("tiny-paligemma");
    let short = cases.iter().find(|c| c.name == "r1_red_circle").unwrap();
    let long = cases
        .iter()
        .find(|c| c.name == "r2_blue_square_strong")
        .unwrap();
    let ps: Vec<_> = [short, long]
        .iter()
        .map(|c| model.prepare(&c.messages, &c.images, true).unwrap())
        .collect();
    let (n0, n1) = (ps[0].ids.len(), ps[1].ids.len());
    assert!(n1 > n0);
    let mut st = fam::empty_state(model.as_ref(), 2);
    let mut ctx = HookCtx::none();
    let batch = model
        .forward(&[&ps[0], &ps[1]], &mut ctx, LogitsFor::All, Some(&mut st))
        .unwrap();
    assert_eq!(st.prefix_end, vec![n1, n1]);
    let mut singles = Vec::new();
    for (b, p) in ps.iter().enumerate() {
        let mut s1 = fam::empty_state(model.as_ref(), 1);
        let alone = model
            .forward(&[p], &mut HookCtx::none(), LogitsFor::All, Some(&mut s1))
            .unwrap();
        let d = common::max_abs_diff(&rows_of(&batch, b, n1 - p.ids.len()), &alone);
        assert!(d < 1e-4, "row {b}: padded prefill differs by {d}");
        singles.push(s1);
    }
    // decode three steps: different tokens per row, two of them in one extend for row 0
    let steps: [Vec<u32>; 2] = [vec![416, 346, 345], vec![15, 393]];
    let got = model
        .extend(&mut st, &steps, None, &mut HookCtx::none(), LogitsFor::Last)
        .unwrap();
    for (b, s1) in singles.iter_mut().enumerate() {
        let mut last = None;
        for &t in &steps[b] {
            last = Some(
                model
                    .extend(s1, &[vec![t]], None, &mut HookCtx::none(), LogitsFor::Last)
                    .unwrap(),
            );
        }
        let d = common::max_abs_diff(&got.narrow(0, b, 1).unwrap(), &last.unwrap());
        assert!(
            d < 1e-4,
            "row {b}: batched multi-token extend differs by {d}"
        );
    }
    assert_eq!(st.valid[1].len(), n1 + 3);
    assert_eq!(
        st.valid[1][n1], 0,
        "row 1's shorter extension is left-padded"
    );
    // the suffix is causal: the logits of a suffix token do not depend on what follows it
    let mut a = fam::empty_state(model.as_ref(), 1);
    model
        .forward(
            &[&ps[0]],
            &mut HookCtx::none(),
            LogitsFor::Last,
            Some(&mut a),
        )
        .unwrap();
    let mut b2 = a.clone();
    let x = model
        .extend(
            &mut a,
            &[vec![416, 346]],
            None,
            &mut HookCtx::none(),
            LogitsFor::All,
        )
        .unwrap();
    let y = model
        .extend(
            &mut b2,
            &[vec![416, 999]],
            None,
            &mut HookCtx::none(),
            LogitsFor::All,
        )
        .unwrap();
    let d = common::max_abs_diff(&x.narrow(1, 0, 1).unwrap(), &y.narrow(1, 0, 1).unwrap());
    assert_eq!(d, 0.0, "a suffix token saw a later one");
    let d = common::max_abs_diff(&x.narrow(1, 1, 1).unwrap(), &y.narrow(1, 1, 1).unwrap());
    assert!(d > 1e-3, "different tokens, same logits");
}

/// The prompt is one bidirectional prefix: the first image token already sees the last text
/// token (patterns are nonzero above the diagonal).
#[test]
fn prompt_attends_bidirectionally() {
    let model = common::load_model("tiny-paligemma");
    let case = &common::cases("tiny-paligemma")[0];
    let p = model.prepare(&case.messages, &case.images, true).unwrap();
    let spec = sycoscope::hooks::HookSpec::parse_captures("blocks.0.attn.hook_pattern").unwrap();
    let resolved = spec.resolve(&model.hook_points()).unwrap();
    let mut ctx = HookCtx::new(&resolved, vec![]);
    model
        .forward(&[&p], &mut ctx, LogitsFor::Last, None)
        .unwrap();
    let pat = ctx.captures.require("blocks.0.attn.hook_pattern").unwrap();
    let s = p.ids.len();
    let v: f32 = pat
        .narrow(2, 0, 1)
        .unwrap()
        .narrow(3, s - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(v > 0.0, "position 0 does not see the last prompt token");
}
