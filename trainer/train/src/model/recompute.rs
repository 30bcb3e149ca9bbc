//! Gradient checkpointing: a decoder block whose forward pass keeps only its
//! input and output, and runs again during the backward pass to get the
//! gradients.
//!
//! candle records every intermediate tensor of a forward pass until the
//! backward pass reaches it, so a block normally holds all its activations
//! (projections, attention output, the gated feed-forward) from the forward
//! pass to the end of the backward pass. Here the block runs inside one
//! custom op: the op's forward pass runs the block and keeps only its output
//! (the block's graph is dropped at once); the op's backward pass runs the
//! block again on the kept input, with a graph this time, and back-propagates
//! the incoming gradient through it. The gradient of the input goes back to
//! the outer graph as the op's result; the gradients of the block's weights
//! (or LoRA adapters), which the op cannot return, are collected in
//! [`Recomputed`] and merged into the outer [`GradStore`] by
//! [`Recomputed::merge_into`] once the outer backward pass is done.
//!
//! The cost is one more forward pass of every block (about a third more
//! arithmetic); the saving is every block's activations but one.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};

use super::layers::Result;

/// A block's forward pass: its input `x` (tokens, hidden) to its output.
pub(crate) type BlockFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// The weight gradients found by the recomputing backward passes, waiting to
/// be merged into the outer backward pass's store.
#[derive(Default)]
pub(crate) struct Recomputed {
    grads: Mutex<Vec<(TensorId, Tensor)>>,
}

/// Turns gradient checkpointing on for a forward pass: where the found
/// gradients go and which tensors are the trainable parameters.
#[derive(Clone)]
pub(crate) struct Checkpointing {
    pub found: Arc<Recomputed>,
    pub params: Arc<Vec<Var>>,
}

/// Runs a decoder block on `x`: directly, or checkpointed when `checkpointing`
/// is given (then `block` runs again in the backward pass, so it owns what it
/// needs).
pub(crate) fn block<F>(
    checkpointing: Option<&Checkpointing>,
    x: &Tensor,
    block: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let Some(c) = checkpointing else {
        return block(x);
    };
    // candle records an op only when its input is part of a graph. The first
    // block's input is not when the embedding is frozen (LoRA), yet the
    // block's adapters need their gradients: the op then gets its input as a
    // variable of its own, whose gradient nobody reads and the backward pass
    // does not compute.
    let input_grad = x.track_op();
    let x = if input_grad {
        // The op rebuilds its input as a fresh tensor from storage.
        packed(x.clone())?
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    x.apply_op1(Checkpointed {
        block: Arc::new(block),
        params: Arc::clone(&c.params),
        found: Arc::clone(&c.found),
        input_grad,
    })
}

/// `t`, or a copy of it, laid out contiguously from offset 0: what a tensor
/// rebuilt from a storage (and a storage handed back from one) must be.
fn packed(t: Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t)
    } else {
        t.copy()
    }
}

impl Recomputed {
    /// Adds the collected gradients to `grads` (summing with what is already
    /// there) and forgets them.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let found = std::mem::take(&mut *self.grads.lock().expect("recompute grads lock"));
        for (id, g) in found {
            let sum = match grads.get_id(id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }

    /// Drops gradients of a backward pass whose result was not merged.
    pub fn clear(&self) {
        self.grads.lock().expect("recompute grads lock").clear();
    }

    fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let mut found = self.grads.lock().expect("recompute grads lock");
        match found.iter_mut().find(|(i, _)| *i == id) {
            Some((_, sum)) => *sum = (&*sum + g)?,
            None => found.push((id, g)),
        }
        Ok(())
    }
}

struct Checkpointed {
    block: Arc<BlockFn>,
    params: Arc<Vec<Var>>,
    found: Arc<Recomputed>,
    /// Whether the input's gradient is wanted (its own graph goes on).
    input_grad: bool,
}

impl Checkpointed {
    /// Runs the block on a copy of the input that is not part of any graph and
    /// returns its output's storage; the block's own graph dies with `y`.
    fn forward(&self, x: Storage, layout: &Layout) -> Result<(Storage, Shape)> {
        let x = Tensor::from_storage(x, layout.shape().clone(), BackpropOp::none(), false);
        let y = packed((self.block)(&x)?)?;
        let (storage, layout) = y.storage_and_layout();
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp1 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.forward(Storage::Cpu(storage.try_clone(layout)?), layout)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("checkpointed block: a CPU input gave a non-CPU output"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.forward(Storage::Cuda(storage.try_clone(layout)?), layout)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("checkpointed block: a CUDA input gave a non-CUDA output"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = match self.input_grad {
            true => Var::from_tensor(&arg.detach())?.into_inner(),
            false => arg.detach(),
        };
        let y = (self.block)(&x)?;
        // d(sum(y * g))/dy = g: back-propagates the incoming gradient.
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        for param in self.params.iter() {
            if let Some(g) = grads.get(param.as_tensor()) {
                self.found.add(param.id(), g.clone())?;
            }
        }
        Ok(grads.get(&x).cloned())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::{Device, Tensor, Var};

    use super::*;

    /// A checkpointed block runs twice (forward, then again in the backward pass), keeps
    /// nothing of its own graph, and yields the gradients of the plain block: its input's
    /// through the outer graph, its weight's through `merge_into`.
    #[test]
    fn a_checkpointed_block_runs_again_and_gives_the_same_gradients() {
        let dev = Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, -4.0]], &dev).unwrap()).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let grads_with = |checkpointing: Option<&Checkpointing>| {
            let (w2, runs) = (w.as_tensor().clone(), Arc::clone(&runs));
            let y = block(checkpointing, x0.as_tensor(), move |x| {
                runs.fetch_add(1, Ordering::SeqCst);
                x.matmul(&w2)?.tanh()
            })
            .unwrap();
            let loss = (y.sqr().unwrap() * 3.0).unwrap().sum_all().unwrap();
            let mut grads = loss.backward().unwrap();
            if let Some(c) = checkpointing {
                c.found.merge_into(&mut grads).unwrap();
            }
            let get = |v: &Var| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            (
                get(&w).to_vec1::<f32>().unwrap(),
                get(&x0).to_vec1::<f32>().unwrap(),
            )
        };
        let plain = grads_with(None);
        assert_eq!(runs.swap(0, Ordering::SeqCst), 1);
        let c = Checkpointing {
            found: Arc::default(),
            params: Arc::new(vec![w.clone()]),
        };
        let checkpointed = grads_with(Some(&c));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "forward, then again in the backward pass"
        );
        assert_eq!(plain, checkpointed);
    }
}
