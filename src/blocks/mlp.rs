//! Activations and MLP variants (gated SwiGLU/GeGLU, plain two-layer).

use candle_core::Tensor;
use candle_nn::{Linear, Module, VarBuilder};

use crate::error::{Error, Result};

/// Activation functions by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu` (exact, erf).
    Gelu,
    /// `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast` (tanh approximation).
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parse a Hugging Face `hidden_act` string.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_tanh" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::msg(format!(
                    "unsupported activation '{other}' (expected silu, gelu, gelu_pytorch_tanh, quick_gelu or relu)"
                )))
            }
        })
    }

    /// Apply the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => candle_nn::ops::silu(x)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// An MLP.
#[derive(Debug, Clone)]
pub enum Mlp {
    /// `down(act(gate(x)) * up(x))` (Llama, Qwen, Gemma).
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
    /// `fc2(act(fc1(x)))` (CLIP, SigLIP, OPT, the LLaVA projector).
    Plain {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
}

impl Mlp {
    /// Apply the MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let g = act.apply(&gate.forward(x)?)?;
                Ok(down.forward(&(g * up.forward(x)?)?)?)
            }
            Mlp::Plain { fc1, fc2, act } => Ok(fc2.forward(&act.apply(&fc1.forward(x)?)?)?),
        }
    }

    /// Load a gated MLP with the usual `gate_proj` / `up_proj` / `down_proj` names.
    pub fn gated(
        vb: VarBuilder,
        d: usize,
        inter: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        Ok(Mlp::Gated {
            gate: linear(vb.pp("gate_proj"), d, inter, bias)?,
            up: linear(vb.pp("up_proj"), d, inter, bias)?,
            down: linear(vb.pp("down_proj"), inter, d, bias)?,
            act,
        })
    }

    /// Load a plain MLP from two named linears.
    pub fn plain(
        vb: VarBuilder,
        names: (&str, &str),
        d_in: usize,
        inter: usize,
        d_out: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        Ok(Mlp::Plain {
            fc1: linear(vb.pp(names.0), d_in, inter, bias)?,
            fc2: linear(vb.pp(names.1), inter, d_out, bias)?,
            act,
        })
    }
}

/// Load a linear layer `[out, in]` with an optional bias.
pub fn linear(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
    let w = vb.get((d_out, d_in), "weight")?;
    let b = if bias {
        Some(vb.get(d_out, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}
