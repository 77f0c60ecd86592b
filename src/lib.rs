//! # sycoscope
//!
//! A workbench for looking inside vision-language models (VLMs) and finding out why they give up
//! a correct answer when a user pushes back (sycophancy, after the MM-SY study).
//!
//! The data flow, one module per arrow:
//! ```text
//! items (MM-SY parquet | JSONL | synth-bench)      protocol::items, protocol::synth
//!   -> prepared inputs (template, ids, pixels, spans)  template, preprocess, prepare, spans
//!   -> forward with hooks (captures, interventions)    families, blocks, hooks
//!   -> records and metrics                             protocol::runner, protocol::metrics
//!   -> activation store                                store
//!   -> analyses (probes, attention, logit lens)        probes, attention, lens
//!   -> outputs (figures, notebooks, explorer)          plots, export, explorer
//! ```
#![allow(clippy::too_many_arguments)]

pub mod attention;
pub mod blocks;
pub mod cli;
pub mod default_model;
pub mod error;
pub mod explorer;
pub mod export;
pub mod families;
pub mod hooks;
pub mod lens;
pub mod organism;
pub mod pipeline;
pub mod plots;
pub mod prepare;
pub mod preprocess;
pub mod probes;
pub mod protocol;
pub mod source;
pub mod spans;
pub mod store;
pub mod synth_model;
pub mod template;

pub use error::{Error, Result};
