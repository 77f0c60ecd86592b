//! LLaVA-1.5 parity with Hugging Face transformers on every `../shared/fixtures/tiny-llava` case.

mod common;

#[test]
fn tiny_llava_matches_transformers() {
    let report = common::check_parity("tiny-llava");
    println!("{report}");
}
