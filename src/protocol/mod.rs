//! The MM-SY protocol: items, the synthetic benchmark, the runner and the metrics.
//!
//! - [`items`]: the [`items::Item`] type and [`items::load_items`] (MM-SY parquet, sycoscope
//!   JSONL, Hub dataset ids).
//! - [`mmsy`]: the MM-SY parquet loader, option parsing and Hub cache resolution.
//! - [`synth`]: a synthetic benchmark of drawn scenes with known answers.
//! - [`metrics`]: Acc@R1, Syc and Cor with counts and Wilson intervals.

pub mod items;
pub mod metrics;
pub mod mmsy;
pub mod runner;
pub mod synth;
