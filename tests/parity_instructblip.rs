//! InstructBLIP (Vicuna) parity with Hugging Face transformers on every
//! `../shared/fixtures/tiny-instructblip-vicuna` case, including the Q-Former's own
//! tokenization of the prompt (`qformer_input_ids`).

mod common;

#[test]
fn tiny_instructblip_matches_transformers() {
    let report = common::check_parity("tiny-instructblip-vicuna");
    println!("{report}");
    assert!(report.lines().count() == 4, "expected 4 cases:\n{report}");
}

#[test]
fn tiny_instructblip_qformer_ids_match() {
    let report = common::check_prepared_extra_ids("tiny-instructblip-vicuna", "qformer_input_ids");
    println!("{report}");
}
