//! Checkpoints a killed run resumes from: `OUT/checkpoints/step-NNNNNNN/`
//! holding the trainable weights (f32: the model, or its LoRA adapters in
//! peft's folder format), the optimizer state (AdamW's moments, and the f32
//! master weights of a bf16 run that keeps them), and `state.json` (step,
//! seed, data position, the run's key). Written into a hidden temporary
//! folder, every file fsynced, then renamed into place and the parent
//! fsynced: a folder named `step-*` is always complete.
//!
//! The data order is a pure function of (seed, epoch), so the RNG state is
//! the seed plus the step: nothing else to save.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{io, Result, TrainError};
use crate::model::CausalLm;
use crate::optim::AdamW;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Epoch and optimizer step within it where training continues.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub seed: u64,
    /// Hash of the model, the data and every setting that changes the trajectory.
    pub run_key: String,
}

const STATE: &str = "state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

fn fsync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes a checkpoint under `root` and keeps the newest `keep` of them.
pub fn save(
    root: &Path,
    model: &CausalLm,
    optimizer: &AdamW,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let name = format!("step-{:07}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    model.save_trainable(&tmp)?;
    let opt_path = tmp.join(OPTIMIZER);
    candle_core::safetensors::save(&optimizer.state(model.parameters())?, &opt_path)?;
    let state_path = tmp.join(STATE);
    std::fs::write(
        &state_path,
        serde_json::to_vec_pretty(state).expect("serializable"),
    )
    .map_err(io(&state_path))?;
    for entry in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
        fsync(&entry.map_err(io(&tmp))?.path())?;
    }
    fsync(&tmp)?;
    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    fsync(root)?;
    for old in list(root)?.into_iter().rev().skip(keep.max(1)) {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(dest)
}

/// Complete checkpoints under `root`, oldest first.
fn list(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
                && p.join(STATE).is_file()
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The newest checkpoint and its state, if any. Leftover temporary folders
/// (a kill during a save) are removed.
pub fn latest(root: &Path) -> Result<Option<(PathBuf, TrainerState)>> {
    if root.exists() {
        for entry in std::fs::read_dir(root).map_err(io(root))?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".tmp") {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
    }
    let Some(dir) = list(root)?.pop() else {
        return Ok(None);
    };
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: format!(
            "unreadable state ({e}); pass --fresh to start over or choose another --out"
        ),
    })?;
    Ok(Some((dir, state)))
}

/// Loads a checkpoint's weights into `model` and its state into `optimizer`.
pub fn restore(
    dir: &Path,
    model: &CausalLm,
    optimizer: &mut AdamW,
    state: &TrainerState,
) -> Result<()> {
    let device = model
        .parameters()
        .first()
        .map(|(_, v)| v.device().clone())
        .ok_or_else(|| TrainError::Config("the model has no parameters".into()))?;
    let weights_path = dir.join(model.trainable_file());
    let mut weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights_path, &device)?;
    for (name, var) in model.parameters() {
        let tensor = weights.remove(name).ok_or_else(|| TrainError::Checkpoint {
            path: weights_path.clone(),
            message: format!("no tensor {name}: not a checkpoint of this model; pass --fresh or choose another --out"),
        })?;
        var.set(&tensor.to_dtype(var.dtype())?)?;
    }
    let opt = candle_core::safetensors::load(dir.join(OPTIMIZER), &device)?;
    optimizer.restore(model.parameters(), opt, state.step as u64)
}
