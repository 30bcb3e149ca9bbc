//! What a run computes in: f32 everywhere, or bf16 weights, activations and
//! gradients with AdamW's moments in f32 (and, if asked, f32 master weights).
//!
//! bf16 halves the memory of the weights, their gradients and the activations,
//! which is what lets an 8B target train on one GPU. Its 8-bit mantissa is
//! why the optimizer keeps its moments in f32, why norms, attention softmax
//! and the log-softmax of the loss run in f32 (as transformers runs them in a
//! bf16 model), and why master weights exist: an update smaller than half a
//! bf16 step of the weight (|w| * 2^-9, e.g. 5e-6 * lr-scaled steps on weights
//! near 0.01-1) rounds away unless the weight itself is kept in f32 and only
//! its bf16 copy enters the forward pass.

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// The dtype a run keeps its trainable model in, as a user names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown dtype {other:?}: use f32 or bf16")),
        }
    }
}

/// The numeric format of a run. Master weights only exist beside bf16 ones,
/// so the type has no f32 run with them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "dtype", rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16 {
        /// The optimizer updates f32 copies of the weights and writes their
        /// bf16 rounding into the model after each step.
        master_weights: bool,
    },
}

impl Precision {
    /// The dtype of the model's weights, activations and gradients.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 { .. } => DType::BF16,
        }
    }

    /// Bytes of one weight, gradient or activation value.
    pub fn bytes(self) -> u64 {
        self.dtype().size_in_bytes() as u64
    }

    pub fn master_weights(self) -> bool {
        matches!(
            self,
            Precision::Bf16 {
                master_weights: true
            }
        )
    }

    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// How logs and reports name it.
    pub fn describe(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 {
                master_weights: false,
            } => "bf16 (AdamW moments in f32)",
            Precision::Bf16 {
                master_weights: true,
            } => "bf16 with f32 master weights (AdamW moments in f32)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes() {
        assert_eq!("bf16".parse::<WeightDtype>(), Ok(WeightDtype::Bf16));
        assert!("fp8".parse::<WeightDtype>().unwrap_err().contains("f32 or bf16"));
        let bf16 = Precision::Bf16 {
            master_weights: true,
        };
        assert_eq!((bf16.dtype(), bf16.bytes()), (DType::BF16, 2));
        assert!(bf16.master_weights() && !Precision::F32.master_weights());
        assert_eq!(
            serde_json::to_value(bf16).unwrap(),
            serde_json::json!({"dtype": "bf16", "master_weights": true})
        );
    }
}
