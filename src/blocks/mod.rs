//! Shared building blocks every model family is assembled from: norms, activations, MLPs,
//! rotary embeddings, attention (with its hook and intervention points inside), the pre-norm
//! residual block, masks and the KV cache. A family is a config plus a weight-name mapping over
//! these.

pub mod attention;
pub mod block;
pub mod decoder;
pub mod mask;
pub mod mlp;
pub mod mrope;
pub mod norm;
pub mod packed_vit;
pub mod qformer;
pub mod rotary;
pub mod vit;
pub mod weights;

pub use attention::{Attention, KvCache, QkvProj};
pub use block::Block;
pub use decoder::{Decoder, LogitsFor};
pub use mlp::{Activation, Mlp};
pub use mrope::{Mrope, MropeLayout};
pub use norm::Norm;
pub use packed_vit::{PackedVit, PatchMerger};
pub use rotary::Rope;
pub use vit::Vit;
