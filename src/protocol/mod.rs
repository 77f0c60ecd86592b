//! The MM-SY protocol: items, the synthetic benchmark, the runner and the metrics.

pub mod items;
pub mod metrics;
pub mod synth;
