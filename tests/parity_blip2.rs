//! BLIP-2 (OPT) parity with Hugging Face transformers on every `../shared/fixtures/tiny-blip2-opt`
//! case: prompt text, ids (query placeholders before BOS), preprocessing, every fixture hook
//! (vision, Q-Former, projector, OPT), logits and greedy decoding with a KV cache.

mod common;

#[test]
fn tiny_blip2_matches_transformers() {
    let report = common::check_parity("tiny-blip2-opt");
    println!("{report}");
    // the Q-Former hooks are part of what was compared
    assert!(report.lines().count() == 4, "expected 4 cases:\n{report}");
}
