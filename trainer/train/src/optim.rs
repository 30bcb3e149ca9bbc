//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's
//! `torch.optim.AdamW` update), with its state exposed so checkpoints can
//! save and restore it exactly.
//!
//! On the CPU with f32 weights the update runs in place, three passes over
//! each parameter (first moment, second moment, weight) on every thread; the
//! same update as candle tensor ops would allocate and fill about ten
//! parameter-sized temporaries per step, which on SmolLM2-135M is 5 GB of
//! fresh memory a step. Elsewhere it is the tensor-op composition.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

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
    /// One update with the gradients `grads` times `grad_scale` (the clipping
    /// factor, folded in here so the gradients are not rewritten first).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
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
            let fused = param.device().is_cpu()
                && [param.dtype(), grad.dtype(), self.exp_avg[i].dtype()] == [DType::F32; 3];
            if fused {
                // Gradients come from the backward pass as it left them (a
                // transposed or broadcast view is possible).
                let grad = &grad.contiguous()?;
                let moment = |beta: f64, square| Moment {
                    beta: beta as f32,
                    scale: grad_scale as f32,
                    square,
                };
                self.exp_avg[i].inplace_op2(grad, &moment(beta1, false))?;
                self.exp_avg_sq[i].inplace_op2(grad, &moment(beta2, true))?;
                let update = Update {
                    step: (lr / bias1) as f32,
                    bias2_sqrt: bias2.sqrt() as f32,
                    eps: eps as f32,
                    decay: (1.0 - lr * weight_decay) as f32,
                };
                param
                    .as_tensor()
                    .inplace_op3(&self.exp_avg[i], &self.exp_avg_sq[i], &update)?;
                continue;
            }
            let scaled;
            let grad = if grad_scale == 1.0 {
                grad
            } else {
                scaled = (grad * grad_scale)?;
                &scaled
            };
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

/// A contiguous f32 slice of a CPU storage.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!(
            "AdamW: {what} must be contiguous f32"
        ))),
    }
}

fn f32s_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => Err(candle_core::Error::Msg(format!(
            "AdamW: {what} must be contiguous f32"
        ))),
    }
}

/// Runs `f(offset, chunk)` over `out` in as many pieces as there are threads
/// (one piece when it is small).
fn par_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = candle_core::utils::get_num_threads().max(1);
    if threads == 1 || out.len() < 1 << 16 {
        f(0, out);
        return;
    }
    let per = out.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// `m = beta m + (1 - beta) g` (or `g^2` for the second moment), in place,
/// with `g` the gradient times `scale`.
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let m = f32s_mut(s1, l1, "a moment")?;
        let g = f32s(s2, l2, "a gradient")?;
        if m.len() != g.len() {
            return Err(candle_core::Error::Msg(
                "AdamW: moment and gradient sizes differ".into(),
            ));
        }
        let (beta, rest, scale, square) = (self.beta, 1.0 - self.beta, self.scale, self.square);
        par_chunks(m, |at, m| {
            let g = &g[at..at + m.len()];
            if square {
                m.iter_mut().zip(g).for_each(|(m, &g)| {
                    let g = g * scale;
                    *m = beta * *m + rest * (g * g)
                });
            } else {
                m.iter_mut()
                    .zip(g)
                    .for_each(|(m, &g)| *m = beta * *m + rest * (g * scale));
            }
        });
        Ok(())
    }
}

/// `p = p decay - step m / (sqrt(v) / sqrt(bias2) + eps)`, in place.
struct Update {
    step: f32,
    bias2_sqrt: f32,
    eps: f32,
    decay: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32s_mut(s1, l1, "a parameter")?;
        let m = f32s(s2, l2, "the first moment")?;
        let v = f32s(s3, l3, "the second moment")?;
        if p.len() != m.len() || p.len() != v.len() {
            return Err(candle_core::Error::Msg(
                "AdamW: parameter and moment sizes differ".into(),
            ));
        }
        let Update {
            step,
            bias2_sqrt,
            eps,
            decay,
        } = *self;
        par_chunks(p, |at, p| {
            let (m, v) = (&m[at..at + p.len()], &v[at..at + p.len()]);
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * decay - step * m / (v.sqrt() / bias2_sqrt + eps);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place CPU update and the tensor-op composition (f64 takes it)
    /// agree over several steps with weight decay.
    #[test]
    fn in_place_update_matches_the_tensor_ops() {
        let dev = Device::Cpu;
        let n = 100_003; // more than one thread's piece, not a multiple of the threads
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let run = |dtype: DType| -> Vec<f32> {
            let var = Var::from_tensor(
                &Tensor::new(init.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let params = vec![("w".to_string(), var.clone())];
            let mut opt = AdamW::new(&params, config).unwrap();
            for step in 0..5 {
                let grad: Vec<f32> = (0..n)
                    .map(|i| (((i + step * 31) * 104_729 % 2000) as f32 - 1000.0) / 500.0)
                    .collect();
                let grad = Tensor::new(grad.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                opt.step(&params, &[grad], 1e-3, 0.7).unwrap();
            }
            var.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let fused = run(DType::F32);
        let reference = run(DType::F64);
        let worst = fused
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "largest difference {worst}");
        assert!(fused.iter().zip(&init).any(|(a, b)| a != b));
    }

    /// One AdamW step on a scalar, worked by hand: m = 0.1 g, v = 0.001 g^2,
    /// m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps) = lr * sign(g).
    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()).unwrap();
        let params = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let grad = Tensor::new(&[0.3f32, -4.0, 1e-3], &dev).unwrap();
        opt.step(&params, &[grad], 0.01, 1.0).unwrap();
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
        opt.step(&params, &[zero], 0.1, 1.0).unwrap();
        // No gradient: only the decay, p * (1 - lr * wd).
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![0.95, 0.95]);
    }
}
