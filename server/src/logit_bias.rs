//! `logit_bias`: numbers added to chosen tokens' logits before a token is
//! chosen, -100 banning a token and 100 all but forcing it (OpenAI's range).
//!
//! The vendored engine carries `SamplingParams::logits_bias` but never applies
//! it, so the bias is a logits processor of its own. Processors run after the
//! penalties and before the engine's sampling or fusechat's seeded sampler
//! (which comes after this one), so both draw from the biased logits. The
//! log-probabilities a response reports are read before the processors: they
//! are the model's own, as vLLM reports them by default.

use std::collections::HashMap;

use mistralrs::{CustomLogitsProcessor, Tensor};

pub struct LogitBias {
    bias: HashMap<u32, f32>,
}

impl LogitBias {
    pub fn new(bias: HashMap<u32, f32>) -> Self {
        Self { bias }
    }

    /// The biased logits (ids outside `logits` are skipped: they are checked
    /// against the vocabulary before a request starts).
    pub fn apply_to(&self, logits: &mut [f32]) {
        for (&id, &b) in &self.bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
    }
}

impl CustomLogitsProcessor for LogitBias {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> mistralrs::Result<Tensor> {
        let mut values: Vec<f32> = logits.to_dtype(mistralrs::DType::F32)?.to_vec1()?;
        self.apply_to(&mut values);
        Tensor::from_vec(values, logits.dims1()?, logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_bias_to_the_named_tokens_only() {
        let bias = LogitBias::new(HashMap::from([(1, -100.0), (2, 5.0), (99, 1.0)]));
        let mut logits = vec![0.5f32, 3.0, -1.0];
        bias.apply_to(&mut logits);
        assert_eq!(logits, vec![0.5, -97.0, 4.0]);
        let t = Tensor::new(&[0.5f32, 3.0, -1.0], &mistralrs::Device::Cpu).unwrap();
        let out: Vec<f32> = bias.apply(&t, &[0]).unwrap().to_vec1().unwrap();
        assert_eq!(out, vec![0.5, -97.0, 4.0]);
    }
}
