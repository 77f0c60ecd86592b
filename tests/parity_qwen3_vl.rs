//! Qwen3-VL parity with Hugging Face transformers on every `../shared/fixtures/tiny-qwen3-vl`
//! case, plus the family's own inputs: `image_grid_thw`, the M-RoPE `rope_position_ids`, and
//! batched (left-padded) prefill and decoding against the same rows run alone.

mod common;

use candle_core::{DType, Tensor};
use sycoscope::blocks::LogitsFor;
use sycoscope::families::qwen3_vl::{Qwen3Vl, GRID_KEY};
use sycoscope::families::{common as fc, LoadOptions, Vlm};
use sycoscope::hooks::HookCtx;

fn load() -> Qwen3Vl {
    let dir = common::shared().join("models/tiny-qwen3-vl");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Qwen3Vl::load(&dir, &cfg, &LoadOptions::default()).unwrap()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn tiny_qwen3_vl_matches_transformers() {
    let report = common::check_parity("tiny-qwen3-vl");
    println!("{report}");
    assert_eq!(report.lines().count(), 4, "every fixture case ran");
}

#[test]
fn grid_and_rope_positions_match_transformers() {
    let model = load();
    let cases = common::cases("tiny-qwen3-vl");
    assert_eq!(cases.len(), 4);
    let mut saw_image_offset = false;
    for case in &cases {
        let p = model.prepare(&case.messages, &case.images, true).unwrap();
        assert_eq!(
            ints(&p.extra[GRID_KEY]),
            ints(&case.tensors["image_grid_thw"]),
            "{}: image_grid_thw",
            case.name
        );
        let want = &case.tensors["rope_position_ids"];
        let ours = model.rope_position_ids(&[&p]).unwrap();
        assert_eq!(ours.dims(), want.dims(), "{}", case.name);
        let (o, w) = (ints(&ours), ints(want));
        assert_eq!(o, w, "{}: rope_position_ids", case.name);
        // the span table carries the merged grid of this image
        let g = ints(&p.extra[GRID_KEY]);
        let img = &p.spans.images[0];
        assert_eq!((img.rows, img.cols), (g[1] as usize / 2, g[2] as usize / 2));
        assert_eq!(img.len(), img.rows * img.cols);
        // text after the image continues from the image's largest position + 1 (< its length)
        let s = p.ids.len();
        if (w[s - 1] as usize) < s - 1 {
            saw_image_offset = true;
        }
    }
    assert!(
        saw_image_offset,
        "some case has positions shorter than the sequence"
    );
}

#[test]
fn batched_left_padding_matches_single_rows() {
    let model = load();
    let cases = common::cases("tiny-qwen3-vl");
    // two rows of different lengths and image grids (r1_gray_cross: 6x6, r2_triangle: 8x10)
    let a = cases.iter().find(|c| c.name == "r1_gray_cross").unwrap();
    let b = cases
        .iter()
        .find(|c| c.name == "r2_triangle_suggest")
        .unwrap();
    let pa = model.prepare(&a.messages, &a.images, true).unwrap();
    let pb = model.prepare(&b.messages, &b.images, true).unwrap();
    assert_ne!(pa.ids.len(), pb.ids.len());

    // positions: each row computed from its own tokens, padding = 1
    let pos = model.rope_position_ids(&[&pa, &pb]).unwrap();
    let single = model.rope_position_ids(&[&pa]).unwrap();
    let pad = pb.ids.len() - pa.ids.len();
    let row0 = pos
        .narrow(1, 0, 1)
        .unwrap()
        .narrow(2, pad, pa.ids.len())
        .unwrap();
    assert_eq!(ints(&row0), ints(&single));
    assert!(
        ints(&pos.narrow(1, 0, 1).unwrap().narrow(2, 0, pad).unwrap())
            .iter()
            .all(|&x| x == 1)
    );

    // prefill + two decoding steps, batched vs alone
    let run = |inputs: &[&sycoscope::prepare::Prepared]| -> Vec<Tensor> {
        let mut st = fc::empty_state(&model, inputs.len());
        let mut ctx = HookCtx::none();
        let l0 = model
            .forward(inputs, &mut ctx, LogitsFor::Last, Some(&mut st))
            .unwrap();
        let next: Vec<Vec<u32>> = fc::argmax_last(&l0)
            .unwrap()
            .into_iter()
            .map(|t| vec![t])
            .collect();
        let l1 = model
            .extend(&mut st, &next, None, &mut ctx, LogitsFor::Last)
            .unwrap();
        let next: Vec<Vec<u32>> = fc::argmax_last(&l1)
            .unwrap()
            .into_iter()
            .map(|t| vec![t])
            .collect();
        let l2 = model
            .extend(&mut st, &next, None, &mut ctx, LogitsFor::Last)
            .unwrap();
        vec![l0, l1, l2]
    };
    let both = run(&[&pa, &pb]);
    for (row, p) in [(0usize, &pa), (1, &pb)] {
        let alone = run(&[p]);
        for (step, (x, y)) in both.iter().zip(&alone).enumerate() {
            let d = common::max_abs_diff(&x.narrow(0, row, 1).unwrap(), y);
            assert!(d < 1e-4, "row {row} step {step}: batched differs by {d}");
        }
    }
}
