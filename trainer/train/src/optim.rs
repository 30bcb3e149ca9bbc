//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's
//! `torch.optim.AdamW` update), with its state exposed so checkpoints can
//! save and restore it exactly.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    config: AdamWConfig,
    /// Updates taken so far (the `t` of the bias correction).
    steps: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            config,
            steps: 0,
            exp_avg: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            exp_avg_sq: params
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of every parameter with its gradient at rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        for (i, ((_, param), grad)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.exp_avg[i] * beta1)? + (grad * (1.0 - beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((&v / bias2)?.sqrt()? + eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            let decayed = if weight_decay > 0.0 {
                (param.as_tensor() * (1.0 - lr * weight_decay))?
            } else {
                param.as_tensor().clone()
            };
            param.set(&(decayed - update)?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`).
    pub fn state(&self, params: &[(String, Var)]) -> HashMap<String, Tensor> {
        let mut map = HashMap::new();
        for (i, (name, _)) in params.iter().enumerate() {
            map.insert(format!("exp_avg.{name}"), self.exp_avg[i].clone());
            map.insert(format!("exp_avg_sq.{name}"), self.exp_avg_sq[i].clone());
        }
        map
    }

    /// Restores a state saved by `state` after `steps` updates.
    pub fn restore(
        &mut self,
        params: &[(String, Var)],
        mut state: HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<()> {
        for (i, (name, var)) in params.iter().enumerate() {
            for (prefix, slot) in [
                ("exp_avg", &mut self.exp_avg),
                ("exp_avg_sq", &mut self.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{name}");
                let tensor = state.remove(&key).ok_or_else(|| {
                    TrainError::Config(format!("optimizer state lacks {key}: the checkpoint is of another model; pass --fresh or choose another --out"))
                })?;
                if tensor.dims() != var.dims() {
                    return Err(TrainError::Config(format!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        var.dims()
                    )));
                }
                slot[i] = tensor.to_device(var.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// One AdamW step on a scalar, worked by hand: m = 0.1 g, v = 0.001 g^2,
    /// m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps) = lr * sign(g).
    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()).unwrap();
        let params = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let grad = Tensor::new(&[0.3f32, -4.0, 1e-3], &dev).unwrap();
        opt.step(&params, &[grad], 0.01).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let want = [0.99f32, -1.99, 0.49];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let dev = Device::Cpu;
        let var = Var::ones(2, DType::F32, &dev).unwrap();
        let params = vec![("w".to_string(), var.clone())];
        let config = AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&params, config).unwrap();
        let zero = Tensor::zeros(2, DType::F32, &dev).unwrap();
        opt.step(&params, &[zero], 0.1).unwrap();
        // No gradient: only the decay, p * (1 - lr * wd).
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![0.95, 0.95]);
    }
}
