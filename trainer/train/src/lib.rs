//! Training the target model in candle, FuseChat-3.0's second and third
//! stages: supervised fine-tuning on the best source responses (`sft`), then
//! preference optimization on best-versus-worst pairs (`dpo`).
//!
//! Follow a training step: `data` reads and tokenizes the file (`chat` renders
//! the chat template and marks the learned tokens), `trainer::run` walks the
//! steps, the objective (`sft` or `dpo`) turns a step's examples into
//! gradients through `model` and `loss`, `optim` updates, `checkpoint` and
//! `metrics` record.

pub mod batch;
pub mod blas;
pub mod chat;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dpo;
pub mod error;
pub mod fingerprint;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod precision;
pub mod schedule;
pub mod settings;
pub mod sft;
pub mod trainer;

pub use error::{Result, TrainError};
