//! Hook-context guarantees on tiny-llava: an empty spec and a capture-only spec leave logits
//! bit-identical; left-padded batches equal single runs; interventions and score edits act where
//! they are aimed and nowhere else.

mod common;

use candle_core::{DType, Tensor, D};
use sycoscope::blocks::LogitsFor;
use sycoscope::hooks::{Edit, HookCtx, HookSpec, Intervention, Positions, ScoreEdit, ScoreRule};

fn last_logits(t: &Tensor) -> Vec<f32> {
    let s = t.dim(1).unwrap();
    t.narrow(1, s - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn empty_and_capture_specs_do_not_change_logits() {
    let model = common::load_model("tiny-llava");
    let case = &common::cases("tiny-llava")[3];
    let mut p = model.prepare(&case.messages, &case.images, true).unwrap();
    model
        .set_pixel_values(&mut p, case.tensors["pixel_values"].clone())
        .unwrap();
    let plain = model
        .forward(&[&p], &mut HookCtx::none(), LogitsFor::All, None)
        .unwrap();
    let empty = HookSpec::empty().resolve(&model.hook_points()).unwrap();
    let mut ctx = HookCtx::new(&empty, vec![]);
    let with_empty = model
        .forward(&[&p], &mut ctx, LogitsFor::All, None)
        .unwrap();
    let spec = HookSpec::parse_captures("blocks.*.hook_resid_post@last, blocks.*.attn.hook_pattern@last, vision.blocks.*.hook_resid_post, projector.hook_out, blocks.1.hook_resid_pre@image:mean").unwrap();
    let r = spec.resolve(&model.hook_points()).unwrap();
    let mut ctx2 = HookCtx::new(&r, vec![]);
    let with_caps = model
        .forward(&[&p], &mut ctx2, LogitsFor::All, None)
        .unwrap();
    let a: Vec<f32> = plain.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = with_empty.flatten_all().unwrap().to_vec1().unwrap();
    let c: Vec<f32> = with_caps.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "empty spec changed logits"
    );
    assert!(
        a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
        "captures changed logits"
    );
    assert!(ctx.captures.tensors.is_empty());
    // the attention rows kept are rows of the full pattern
    let row = ctx2
        .captures
        .require("blocks.2.attn.hook_pattern@last")
        .unwrap();
    assert_eq!(row.dims(), &[1, 4, 1, p.ids.len()]);
    let full = &case.tensors["blocks.2.attn.hook_pattern"];
    let want = full.narrow(2, p.ids.len() - 1, 1).unwrap();
    assert!(common::max_abs_diff(row, &want) < 1e-5);
    let img_mean = ctx2
        .captures
        .require("blocks.1.hook_resid_pre@image:mean")
        .unwrap();
    assert_eq!(img_mean.dims(), &[1, 128]);
}

#[test]
fn left_padded_batch_equals_single_runs() {
    let model = common::load_model("tiny-llava");
    let cases = common::cases("tiny-llava");
    let a = model
        .prepare(&cases[0].messages, &cases[0].images, true)
        .unwrap();
    let b = model
        .prepare(&cases[2].messages, &cases[2].images, true)
        .unwrap();
    assert_ne!(a.ids.len(), b.ids.len(), "the test needs two lengths");
    let spec = HookSpec::parse_captures(
        "blocks.*.hook_resid_post@last, blocks.3.attn.hook_pattern@image:mean",
    )
    .unwrap();
    let r = spec.resolve(&model.hook_points()).unwrap();
    let run = |ps: &[&sycoscope::prepare::Prepared]| {
        let mut ctx = HookCtx::new(&r, vec![]);
        let l = model.forward(ps, &mut ctx, LogitsFor::Last, None).unwrap();
        (l, ctx.captures)
    };
    let (la, ca) = run(&[&a]);
    let (lb, cb) = run(&[&b]);
    let (lab, cab) = run(&[&a, &b]);
    let d = |x: &Tensor, y: &Tensor| common::max_abs_diff(x, y);
    assert!(
        d(&lab.narrow(0, 0, 1).unwrap(), &la) < 1e-5,
        "row 0 differs"
    );
    assert!(
        d(&lab.narrow(0, 1, 1).unwrap(), &lb) < 1e-5,
        "row 1 differs"
    );
    let k = "blocks.3.hook_resid_post@last";
    let x = cab.require(k).unwrap();
    assert!(
        d(&x.narrow(0, 0, 1).unwrap(), ca.require(k).unwrap()) < 1e-5,
        "{k} row 0"
    );
    assert!(
        d(&x.narrow(0, 1, 1).unwrap(), cb.require(k).unwrap()) < 1e-5,
        "{k} row 1"
    );
    // attention rows: the padded row's keys are shifted by its padding, which gets no mass
    let k = "blocks.3.attn.hook_pattern@image:mean";
    let x = cab.require(k).unwrap();
    let (na, nb) = (a.ids.len(), b.ids.len());
    let pad = nb.max(na) - na;
    let row0 = x.narrow(0, 0, 1).unwrap();
    assert_eq!(
        row0.narrow(2, 0, pad)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert!(
        d(&row0.narrow(2, pad, na).unwrap(), ca.require(k).unwrap()) < 1e-5,
        "{k} row 0"
    );
    assert!(
        d(&x.narrow(0, 1, 1).unwrap(), cb.require(k).unwrap()) < 1e-5,
        "{k} row 1"
    );
    // decoding continues identically from the batched cache
    let mut st = sycoscope::families::common::empty_state(model.as_ref(), 2);
    model
        .forward(
            &[&a, &b],
            &mut HookCtx::none(),
            LogitsFor::Last,
            Some(&mut st),
        )
        .unwrap();
    let next = model
        .extend(
            &mut st,
            &[vec![5, 6], vec![7]],
            None,
            &mut HookCtx::none(),
            LogitsFor::Last,
        )
        .unwrap();
    let mut sa = sycoscope::families::common::empty_state(model.as_ref(), 1);
    model
        .forward(&[&a], &mut HookCtx::none(), LogitsFor::Last, Some(&mut sa))
        .unwrap();
    let na = model
        .extend(
            &mut sa,
            &[vec![5, 6]],
            None,
            &mut HookCtx::none(),
            LogitsFor::Last,
        )
        .unwrap();
    assert!(d(&next.narrow(0, 0, 1).unwrap(), &na) < 1e-5);
    // and equals a fresh forward over the longer sequence
    let mut longer = a.clone();
    longer.ids.extend([5, 6]);
    longer.spans.len += 2;
    let fresh = model
        .forward(&[&longer], &mut HookCtx::none(), LogitsFor::Last, None)
        .unwrap();
    assert!(d(&fresh, &na) < 1e-5);
}

#[test]
fn interventions_hit_their_target() {
    let model = common::load_model("tiny-llava");
    let case = &common::cases("tiny-llava")[1];
    let p = model.prepare(&case.messages, &case.images, true).unwrap();
    let hp = model.hook_points();
    let base_spec =
        HookSpec::parse_captures("blocks.*.hook_resid_post@last, blocks.*.attn.hook_pattern@last")
            .unwrap();
    let run = |extra: HookSpec| {
        let mut spec = base_spec.clone();
        spec.interventions = extra.interventions;
        spec.score_edits = extra.score_edits;
        let r = spec.resolve(&hp).unwrap();
        let mut ctx = HookCtx::new(&r, vec![]);
        let l = model
            .forward(&[&p], &mut ctx, LogitsFor::Last, None)
            .unwrap();
        (last_logits(&l), ctx.captures)
    };
    let (base, bc) = run(HookSpec::empty());
    // zeroing layer 3's MLP output at the last position changes the last logits only there
    let (zeroed, _) = run(HookSpec {
        interventions: vec![Intervention {
            pattern: "blocks.3.hook_mlp_out".into(),
            positions: Positions::Last,
            edit: Edit::Zero,
        }],
        ..Default::default()
    });
    assert!(base.iter().zip(&zeroed).any(|(a, b)| (a - b).abs() > 1e-4));
    // steering: adding a vector to resid_post of layer 1 moves layer 1's residual by exactly it
    let v: Vec<f32> = (0..128).map(|i| (i as f32) * 0.01).collect();
    let (_, sc) = run(HookSpec {
        interventions: vec![Intervention {
            pattern: "blocks.1.hook_resid_post".into(),
            positions: Positions::All,
            edit: Edit::Add(sycoscope::hooks::vector(&v, &candle_core::Device::Cpu).unwrap()),
        }],
        ..Default::default()
    });
    let delta = (sc.require("blocks.1.hook_resid_post@last").unwrap()
        - bc.require("blocks.1.hook_resid_post@last").unwrap())
    .unwrap()
    .flatten_all()
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    assert!(delta.iter().zip(&v).all(|(a, b)| (a - b).abs() < 1e-5));
    let unchanged = common::max_abs_diff(
        sc.require("blocks.0.hook_resid_post@last").unwrap(),
        bc.require("blocks.0.hook_resid_post@last").unwrap(),
    );
    assert_eq!(
        unchanged, 0.0,
        "layer 0 must not change when steering layer 1"
    );
    // amplification: lambda = 0 is bit-identical; lambda > 0 raises image attention in the
    // targeted layers and leaves earlier layers untouched
    let amp = |lambda: f64| HookSpec {
        score_edits: vec![ScoreEdit {
            layers: vec![2, 3],
            queries: Positions::Last,
            keys: Positions::Span("image".into()),
            rule: ScoreRule::AddAbs(lambda),
        }],
        ..Default::default()
    };
    let (l0, _) = run(amp(0.0));
    assert!(
        base.iter()
            .zip(&l0)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "lambda 0 changed logits"
    );
    let (l1, ac) = run(amp(2.0));
    assert!(base.iter().zip(&l1).any(|(a, b)| a != b));
    let img = &p.spans.images[0];
    let image_mass = |c: &sycoscope::hooks::Captures, layer: usize| -> f32 {
        let row = c
            .require(&format!("blocks.{layer}.attn.hook_pattern@last"))
            .unwrap();
        row.narrow(D::Minus1, img.start, img.len())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for l in [2, 3] {
        assert!(
            image_mass(&ac, l) > image_mass(&bc, l) + 1e-3,
            "layer {l}: image attention did not rise"
        );
    }
    for l in [0, 1] {
        assert_eq!(image_mass(&ac, l), image_mass(&bc, l), "layer {l} changed");
        assert_eq!(
            common::max_abs_diff(
                ac.require(&format!("blocks.{l}.hook_resid_post@last"))
                    .unwrap(),
                bc.require(&format!("blocks.{l}.hook_resid_post@last"))
                    .unwrap()
            ),
            0.0
        );
    }
}
