//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's
//! `torch.optim.AdamW` update), with its state exposed so checkpoints can
//! save and restore it exactly.
//!
//! On the CPU with f32 weights the update runs in place in one pass over each
//! parameter on every thread: it reads the weight, its gradient and both
//! moments once and writes the weight and the moments once, the least memory
//! traffic the update allows (the step is bound by memory bandwidth). The
//! moments are then plain host vectors beside the weights, since a candle
//! in-place op writes one tensor only. The same update as candle tensor ops
//! would allocate and fill about ten parameter-sized temporaries per step
//! (5 GB of fresh memory a step on SmolLM2-135M); other devices run that
//! composition.
//!
//! bf16 weights keep their moments in f32 (a bf16 second moment underflows
//! and rounds the update), and the update is computed in f32 from an f32
//! master copy of the weight when the run keeps one, or from the bf16 weight
//! itself; the result is rounded into the model.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Result, TrainError};

/// The prefix of the master weights' names in the optimizer state.
const MASTER: &str = "master";

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
    moments: Vec<Moments>,
}

/// The first and second moments of one parameter.
enum Moments {
    /// f32 weights on the CPU: updated in place by the one-pass update.
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
        shape: Shape,
    },
    /// Anything else: the tensor-op composition, in f32 (f64 for f64
    /// weights), with the master copy of a bf16 weight if kept.
    Tensors {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
}

/// The dtype the update of a `dtype` weight is computed and kept in.
fn update_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

impl Moments {
    fn zeros(param: &Var, master_weights: bool) -> Result<Self> {
        Ok(if param.device().is_cpu() && param.dtype() == DType::F32 {
            let n = param.elem_count();
            Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
                shape: param.shape().clone(),
            }
        } else {
            let dtype = update_dtype(param.dtype());
            let zeros = || Tensor::zeros(param.shape(), dtype, param.device());
            let master = match master_weights && param.dtype() != dtype {
                true => Some(param.as_tensor().to_dtype(dtype)?),
                false => None,
            };
            Moments::Tensors {
                m: zeros()?,
                v: zeros()?,
                master,
            }
        })
    }

    fn tensors(&self) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v, shape } => (
                Tensor::from_slice(m, shape, &Device::Cpu)?,
                Tensor::from_slice(v, shape, &Device::Cpu)?,
            ),
            Moments::Tensors { m, v, .. } => (m.clone(), v.clone()),
        })
    }

    /// Replaces the first (`second` false) or second moment with `t`, of the
    /// parameter's shape.
    fn set(&mut self, second: bool, t: Tensor, param: &Var) -> Result<()> {
        match self {
            Moments::Host { m, v, .. } => {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                *(if second { v } else { m }) = values;
            }
            Moments::Tensors { m, v, .. } => {
                let dtype = update_dtype(param.dtype());
                *(if second { v } else { m }) = t.to_dtype(dtype)?.to_device(param.device())?;
            }
        }
        Ok(())
    }
}

impl AdamW {
    /// `master_weights`: keep an f32 copy of every bf16 (or f16) weight and
    /// update that (f32 and f64 weights are their own masters).
    pub fn new(
        params: &[(String, Var)],
        config: AdamWConfig,
        master_weights: bool,
    ) -> Result<Self> {
        Ok(Self {
            config,
            steps: 0,
            moments: params
                .iter()
                .map(|(_, v)| Moments::zeros(v, master_weights))
                .collect::<Result<_>>()?,
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
        for (((_, param), grad), moments) in params.iter().zip(grads).zip(&mut self.moments) {
            let (m, v, master) = match moments {
                Moments::Host { m, v, .. } if grad.dtype() == DType::F32 => {
                    // Gradients come from the backward pass as it left them (a
                    // transposed or broadcast view is possible).
                    let grad = &grad.contiguous()?;
                    let step = OnePass {
                        moments: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                        beta1: beta1 as f32,
                        beta2: beta2 as f32,
                        grad_scale: grad_scale as f32,
                        step: (lr / bias1) as f32,
                        bias2_sqrt: bias2.sqrt() as f32,
                        eps: eps as f32,
                        decay: (1.0 - lr * weight_decay) as f32,
                    };
                    param.as_tensor().inplace_op2(grad, &step)?;
                    continue;
                }
                Moments::Host { .. } => {
                    return Err(TrainError::Config(format!(
                        "AdamW: an f32 parameter got a {:?} gradient",
                        grad.dtype()
                    )))
                }
                Moments::Tensors { m, v, master } => (m, v, master),
            };
            let dtype = m.dtype();
            let grad = (grad.to_dtype(dtype)? * grad_scale)?;
            *m = ((&*m * beta1)? + (&grad * (1.0 - beta1))?)?;
            *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((&*v / bias2)?.sqrt()? + eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            let weight = match master {
                Some(w) => w.clone(),
                None => param.as_tensor().to_dtype(dtype)?,
            };
            let decayed = if weight_decay > 0.0 {
                (weight * (1.0 - lr * weight_decay))?
            } else {
                weight
            };
            let updated = (decayed - update)?;
            param.set(&updated.to_dtype(param.dtype())?)?;
            if let Some(w) = master {
                *w = updated;
            }
        }
        Ok(())
    }

    /// The state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`, and
    /// `master.NAME` for the master weights).
    pub fn state(&self, params: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        for ((name, _), moments) in params.iter().zip(&self.moments) {
            let (m, v) = moments.tensors()?;
            map.insert(format!("exp_avg.{name}"), m);
            map.insert(format!("exp_avg_sq.{name}"), v);
            if let Moments::Tensors {
                master: Some(w), ..
            } = moments
            {
                map.insert(format!("{MASTER}.{name}"), w.clone());
            }
        }
        Ok(map)
    }

    /// Restores a state saved by `state` after `steps` updates.
    pub fn restore(
        &mut self,
        params: &[(String, Var)],
        mut state: HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<()> {
        for ((name, var), moments) in params.iter().zip(&mut self.moments) {
            for (prefix, second) in [("exp_avg", false), ("exp_avg_sq", true)] {
                let tensor = take_state(&mut state, &format!("{prefix}.{name}"), var, "the checkpoint is of another model")?;
                moments.set(second, tensor, var)?;
            }
            if let Moments::Tensors {
                master: Some(w), ..
            } = moments
            {
                let why = "the checkpoint was written without master weights";
                let tensor = take_state(&mut state, &format!("{MASTER}.{name}"), var, why)?;
                *w = tensor.to_dtype(w.dtype())?.to_device(w.device())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// The saved tensor `key` of the parameter `var`, of its shape; `missing`
/// says why a checkpoint would lack it.
fn take_state(state: &mut HashMap<String, Tensor>, key: &str, var: &Var, missing: &str) -> Result<Tensor> {
    let tensor = state.remove(key).ok_or_else(|| {
        TrainError::Config(format!(
            "optimizer state lacks {key}: {missing}; pass --fresh or choose another --out"
        ))
    })?;
    if tensor.dims() != var.dims() {
        return Err(TrainError::Config(format!(
            "optimizer state {key} has shape {:?}, the parameter {:?}",
            tensor.dims(),
            var.dims()
        )));
    }
    Ok(tensor)
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

/// One AdamW update of a weight from its gradient `g` (times `grad_scale`,
/// the clipping factor) and its moments, all in place:
/// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
/// `p = p decay - step m / (sqrt(v) / sqrt(bias2) + eps)`.
struct OnePass<'a> {
    /// Borrowed for the one call (an in-place op sees `&self` only).
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
    beta1: f32,
    beta2: f32,
    grad_scale: f32,
    step: f32,
    bias2_sqrt: f32,
    eps: f32,
    decay: f32,
}

/// Elements per parallel piece: large enough that a piece outweighs handing
/// it to a thread, small enough to spread one layer over every thread.
const PIECE: usize = 1 << 15;

impl InplaceOp2 for OnePass<'_> {
    fn name(&self) -> &'static str {
        "adamw-one-pass"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32s_mut(s1, l1, "a parameter")?;
        let g = f32s(s2, l2, "a gradient")?;
        let mut moments = self.moments.lock().expect("AdamW moments");
        let (m, v) = &mut *moments;
        if p.len() != g.len() || p.len() != m.len() || p.len() != v.len() {
            return Err(candle_core::Error::Msg(
                "AdamW: parameter, gradient and moment sizes differ".into(),
            ));
        }
        let OnePass {
            beta1,
            beta2,
            grad_scale,
            step,
            bias2_sqrt,
            eps,
            decay,
            ..
        } = *self;
        let (rest1, rest2) = (1.0 - beta1, 1.0 - beta2);
        p.par_chunks_mut(PIECE)
            .zip(g.par_chunks(PIECE))
            .zip(m.par_chunks_mut(PIECE))
            .zip(v.par_chunks_mut(PIECE))
            .for_each(|(((p, g), m), v)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                    let g = g * grad_scale;
                    *m = beta1 * *m + rest1 * g;
                    *v = beta2 * *v + rest2 * (g * g);
                    *p = *p * decay - step * *m / (v.sqrt() / bias2_sqrt + eps);
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
            let mut opt = AdamW::new(&params, config, false).unwrap();
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
        let mut opt = AdamW::new(&params, AdamWConfig::default(), false).unwrap();
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
        let mut opt = AdamW::new(&params, config, false).unwrap();
        let zero = Tensor::zeros(2, DType::F32, &dev).unwrap();
        opt.step(&params, &[zero], 0.1, 1.0).unwrap();
        // No gradient: only the decay, p * (1 - lr * wd).
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![0.95, 0.95]);
    }

    /// 100 steps of lr 1e-4 on weights of 1.0: each step moves a weight by
    /// 1e-4, under half of bf16's spacing at 1.0 (2^-7 = 0.0078), so plain
    /// bf16 weights never move while f32 masters move 0.01 in all and their
    /// rounding shows it.
    #[test]
    fn master_weights_keep_updates_smaller_than_a_bf16_step() {
        let dev = Device::Cpu;
        let run = |master: bool| -> (f32, HashMap<String, Tensor>) {
            let var = Var::ones(4, DType::BF16, &dev).unwrap();
            let params = vec![("w".to_string(), var.clone())];
            let mut opt = AdamW::new(&params, AdamWConfig::default(), master).unwrap();
            let grad = Tensor::ones(4, DType::BF16, &dev).unwrap();
            for _ in 0..100 {
                opt.step(&params, &[grad.clone()], 1e-4, 1.0).unwrap();
            }
            let w = var.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            (w[0], opt.state(&params).unwrap())
        };
        let (plain, plain_state) = run(false);
        assert_eq!(plain, 1.0, "updates below half a bf16 step round away");
        assert_eq!(plain_state["exp_avg.w"].dtype(), DType::F32);
        assert!(!plain_state.contains_key("master.w"));
        let (mastered, state) = run(true);
        let master = state["master.w"].to_vec1::<f32>().unwrap()[0];
        assert!((master - 0.99).abs() < 1e-5, "master {master}");
        assert_eq!(mastered, half::bf16::from_f32(master).to_f32());
        assert!(mastered < 1.0);
    }

    /// A run with master weights restored from its state continues exactly.
    #[test]
    fn master_weights_are_part_of_the_state() {
        let dev = Device::Cpu;
        let grad = Tensor::new(&[0.5f32, -1.0, 2.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let fresh = || {
            let w = Tensor::new(&[0.3f32, -0.7, 1.1], &dev).unwrap();
            let var = Var::from_tensor(&w.to_dtype(DType::BF16).unwrap()).unwrap();
            let params = vec![("w".to_string(), var)];
            let opt = AdamW::new(&params, AdamWConfig::default(), true).unwrap();
            (params, opt)
        };
        let (params, mut straight) = fresh();
        for _ in 0..6 {
            straight.step(&params, &[grad.clone()], 1e-3, 1.0).unwrap();
        }
        let want = straight.state(&params).unwrap()["master.w"]
            .to_vec1::<f32>()
            .unwrap();

        let (params, mut first) = fresh();
        for _ in 0..3 {
            first.step(&params, &[grad.clone()], 1e-3, 1.0).unwrap();
        }
        let saved = first.state(&params).unwrap();
        let (resumed_params, mut resumed) = fresh();
        resumed_params[0].1.set(params[0].1.as_tensor()).unwrap();
        let mut without_master = saved.clone();
        without_master.remove("master.w");
        let err = resumed
            .restore(&resumed_params, without_master, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("master.w"), "{err}");
        resumed.restore(&resumed_params, saved, 3).unwrap();
        for _ in 0..3 {
            resumed.step(&resumed_params, &[grad.clone()], 1e-3, 1.0).unwrap();
        }
        let got = resumed.state(&resumed_params).unwrap()["master.w"]
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }
}
