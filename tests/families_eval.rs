//! The protocol, the store and the attention analyses work for every family through the same
//! hook names: eval with capture, reliance curves and heatmaps (composed through the Q-Former's
//! cross-attention for BLIP-2 and InstructBLIP).

mod common;

use sycoscope::pipeline;
use sycoscope::protocol::runner::{self, EvalJob, EvalOptions};

#[test]
fn every_family_runs_the_protocol_and_the_attention_analyses() {
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    let cfg = sycoscope::protocol::synth::SynthConfig {
        n: 6,
        seed: 2,
        size: 84,
        ..Default::default()
    };
    sycoscope::protocol::synth::write_bench(&cfg, &bench).unwrap();
    for name in [
        "tiny-llava",
        "tiny-qwen3-vl",
        "tiny-paligemma",
        "tiny-blip2-opt",
        "tiny-instructblip-vicuna",
    ] {
        let m = common::load_model(name);
        let run = dir.path().join(name);
        let job = EvalJob {
            model_source: name,
            data: bench.to_str().unwrap(),
            run: &run,
            opts: EvalOptions {
                capture: Some("default".into()),
                limit: Some(3),
                amplify: None,
                ..Default::default()
            },
            load: Default::default(),
            progress: false,
        };
        let s = runner::eval(m.as_ref(), &job).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.overall().acc_r1.n, 3, "{name}");
        let store = sycoscope::store::StoreReader::open(&run).unwrap();
        assert_eq!(store.len(), 12, "{name}");
        let n_layers = m.info().n_layers;
        assert!(
            store
                .hooks()
                .contains(&format!("blocks.{}.attn.reliance", n_layers - 1)),
            "{name}"
        );
        pipeline::attention_curves(&run, &["image_share"])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let files = pipeline::attention_heatmaps(&run, None, "strong", None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(files
            .iter()
            .any(|f| f.extension().is_some_and(|x| x == "svg")));
        let composed = store.hooks().iter().any(|h| h == "qformer.crossattn");
        assert_eq!(
            composed,
            name.contains("blip"),
            "{name}: Q-Former maps are composed"
        );
        if composed {
            let svg = std::fs::read_to_string(
                files
                    .iter()
                    .find(|f| {
                        f.to_string_lossy().contains("diff")
                            && f.extension().is_some_and(|x| x == "svg")
                    })
                    .unwrap(),
            )
            .unwrap();
            assert!(
                svg.contains("composed map"),
                "{name}: the figure says the map is composed"
            );
        }
        // amplification acts on the image (or query) columns of every family
        let amp = dir.path().join(format!("{name}-amp"));
        let job = EvalJob {
            run: &amp,
            opts: EvalOptions {
                limit: Some(3),
                amplify: Some(runner::Amplify {
                    lambda: 1.0,
                    layers: (0, n_layers),
                    rule: "add_abs".into(),
                }),
                ..Default::default()
            },
            ..job
        };
        runner::eval(m.as_ref(), &job).unwrap_or_else(|e| panic!("{name} amplified: {e}"));
        let a = runner::read_examples(&run).unwrap();
        let b = runner::read_examples(&amp).unwrap();
        assert!(
            a.iter().zip(&b).any(|(x, y)| x.r1.probs != y.r1.probs),
            "{name}: amplification changed nothing"
        );
    }
}
