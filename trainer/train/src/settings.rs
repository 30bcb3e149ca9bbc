//! The settings of a training stage as a user writes them, once for every
//! front end: the flags of `fusechat sft` and `fusechat dpo` and the `[sft]`
//! and `[dpo]` tables of `fusechat fuse` fill the same [`StageSettings`].
//! Unset values take the stage's defaults (the paper's: SFT 3 epochs at
//! 5e-6, DPO 1 epoch at 1e-6), and the checks of every value live here, so
//! the two front ends accept and refuse the same runs.

use serde::{Deserialize, Serialize};

use crate::model::LoraConfig;
use crate::precision::{Precision, WeightDtype};
use crate::trainer::TrainOptions;

/// The stage a run trains, for the defaults that differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Sft,
    Dpo,
}

impl Stage {
    pub fn default_epochs(self) -> usize {
        match self {
            Stage::Sft => 3,
            Stage::Dpo => 1,
        }
    }

    pub fn default_lr(self) -> f64 {
        match self {
            Stage::Sft => 5e-6,
            Stage::Dpo => 1e-6,
        }
    }

    /// Sequences (SFT) or pairs (DPO) per forward pass: 4 sequences either way.
    pub fn default_batch(self) -> usize {
        match self {
            Stage::Sft => 4,
            Stage::Dpo => 2,
        }
    }
}

pub const DEFAULT_GRAD_ACCUM: usize = 2;
pub const DEFAULT_MAX_LEN: usize = 1024;
pub const DEFAULT_WARMUP_RATIO: f64 = 0.1;
pub const DEFAULT_MAX_GRAD_NORM: f64 = 1.0;
pub const DEFAULT_SEED: u64 = 42;

/// One stage's settings; `None` (or absent from a config table) is the
/// stage's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSettings {
    /// Passes over the data.
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps (the schedule spans them).
    pub max_steps: Option<usize>,
    /// Sequences (SFT) or pairs (DPO) per forward pass.
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step.
    pub grad_accum: Option<usize>,
    /// Longest sequence in tokens (prompt + response).
    pub max_len: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// Share of the steps spent warming up before the cosine decay.
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: Option<f64>,
    pub seed: Option<u64>,
    /// Train LoRA adapters on the frozen model (implied by any `lora_*` value).
    #[serde(default, skip_serializing_if = "is_false")]
    pub lora: bool,
    pub lora_rank: Option<usize>,
    pub lora_alpha: Option<f64>,
    /// A comma-separated list of q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj, or all-linear.
    pub lora_targets: Option<String>,
    /// Recompute each block in the backward pass instead of keeping its
    /// activations.
    #[serde(default, skip_serializing_if = "is_false")]
    pub gradient_checkpointing: bool,
    /// The weights', activations' and gradients' dtype: f32 or bf16.
    pub dtype: Option<WeightDtype>,
    /// With bf16: the optimizer keeps f32 copies of the weights.
    #[serde(default, skip_serializing_if = "is_false")]
    pub master_weights: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A setting with a value the trainer cannot run with. `setting` is the
/// field's name as a config table spells it; [`InvalidSetting::flag`] gives
/// the command-line spelling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{setting} {problem}")]
pub struct InvalidSetting {
    pub setting: &'static str,
    pub problem: String,
}

impl InvalidSetting {
    fn new(setting: &'static str, problem: impl Into<String>) -> Self {
        Self {
            setting,
            problem: problem.into(),
        }
    }

    /// The message with the setting spelled as a flag (`--grad-accum`).
    pub fn flag(&self) -> String {
        format!("--{} {}", self.setting.replace('_', "-"), self.problem)
    }
}

/// What a stage trains with: the loop's options and the objective's longest
/// sequence.
#[derive(Debug, Clone, Serialize)]
pub struct StageOptions {
    #[serde(flatten)]
    pub train: TrainOptions,
    pub max_len: usize,
}

impl StageSettings {
    /// The options of `stage` with its defaults filled in, every value
    /// checked. The options outside a run's identity (checkpointing, saving,
    /// resuming) keep [`TrainOptions::default`] for the front end to set.
    pub fn resolve(&self, stage: Stage) -> Result<StageOptions, InvalidSetting> {
        let at_least_one = |setting, value: Option<usize>, default: usize| match value {
            Some(0) => Err(InvalidSetting::new(setting, "must be at least 1")),
            v => Ok(v.unwrap_or(default)),
        };
        let epochs = at_least_one("epochs", self.epochs, stage.default_epochs())?;
        let max_steps = match self.max_steps {
            Some(0) => return Err(InvalidSetting::new("max_steps", "must be at least 1")),
            v => v,
        };
        let micro_batch = at_least_one("batch", self.batch, stage.default_batch())?;
        let grad_accum = at_least_one("grad_accum", self.grad_accum, DEFAULT_GRAD_ACCUM)?;
        let max_len = match self.max_len.unwrap_or(DEFAULT_MAX_LEN) {
            n if n < 2 => {
                return Err(InvalidSetting::new(
                    "max_len",
                    format!("must be at least 2 tokens, got {n}"),
                ))
            }
            n => n,
        };
        let lr = self.lr.unwrap_or(stage.default_lr());
        if !(lr.is_finite() && lr > 0.0) {
            return Err(InvalidSetting::new(
                "lr",
                format!("must be a positive number, got {lr}"),
            ));
        }
        let warmup_ratio = self.warmup_ratio.unwrap_or(DEFAULT_WARMUP_RATIO);
        if !(0.0..=1.0).contains(&warmup_ratio) {
            return Err(InvalidSetting::new(
                "warmup_ratio",
                format!("must lie in [0, 1], got {warmup_ratio}"),
            ));
        }
        let non_negative = |setting, value: Option<f64>, default: f64| {
            let v = value.unwrap_or(default);
            match v.is_finite() && v >= 0.0 {
                true => Ok(v),
                false => Err(InvalidSetting::new(
                    setting,
                    format!("must be a number of at least 0, got {v}"),
                )),
            }
        };
        let weight_decay = non_negative("weight_decay", self.weight_decay, 0.0)?;
        let max_grad_norm =
            non_negative("max_grad_norm", self.max_grad_norm, DEFAULT_MAX_GRAD_NORM)?;
        let train = TrainOptions {
            epochs,
            max_steps,
            micro_batch,
            grad_accum,
            lr,
            warmup_ratio,
            weight_decay,
            max_grad_norm,
            seed: self.seed.unwrap_or(DEFAULT_SEED),
            lora: self.lora_config()?,
            gradient_checkpointing: self.gradient_checkpointing,
            precision: self.precision()?,
            ..TrainOptions::default()
        };
        Ok(StageOptions { train, max_len })
    }

    fn precision(&self) -> Result<Precision, InvalidSetting> {
        match (self.dtype.unwrap_or_default(), self.master_weights) {
            (WeightDtype::F32, false) => Ok(Precision::F32),
            (WeightDtype::F32, true) => Err(InvalidSetting::new(
                "master_weights",
                "keeps f32 copies of bf16 weights: it needs dtype bf16 (f32 weights are their own masters)",
            )),
            (WeightDtype::Bf16, master_weights) => Ok(Precision::Bf16 { master_weights }),
        }
    }

    /// peft's LoRA defaults for whatever is not set, when any LoRA value is.
    fn lora_config(&self) -> Result<Option<LoraConfig>, InvalidSetting> {
        let wanted = self.lora
            || self.lora_rank.is_some()
            || self.lora_alpha.is_some()
            || self.lora_targets.is_some();
        if !wanted {
            return Ok(None);
        }
        let peft = LoraConfig::default();
        let targets = match &self.lora_targets {
            Some(list) => LoraConfig::parse_targets(list)
                .map_err(|e| InvalidSetting::new("lora_targets", format!("is invalid: {e}")))?,
            None => peft.targets().to_vec(),
        };
        let rank = self.lora_rank.unwrap_or(peft.rank());
        let alpha = self.lora_alpha.unwrap_or(peft.alpha());
        let setting = if rank == 0 {
            "lora_rank"
        } else if !(alpha.is_finite() && alpha > 0.0) {
            "lora_alpha"
        } else {
            "lora_targets"
        };
        LoraConfig::new(rank, alpha, targets)
            .map(Some)
            .map_err(|e| InvalidSetting::new(setting, format!("is invalid: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_values_take_the_stage_defaults() {
        let sft = StageSettings::default().resolve(Stage::Sft).unwrap();
        assert_eq!(
            (sft.train.epochs, sft.train.micro_batch, sft.train.lr),
            (3, 4, 5e-6)
        );
        let dpo = StageSettings::default().resolve(Stage::Dpo).unwrap();
        assert_eq!(
            (dpo.train.epochs, dpo.train.micro_batch, dpo.train.lr),
            (1, 2, 1e-6)
        );
        assert_eq!(dpo.max_len, DEFAULT_MAX_LEN);
        assert!(dpo.train.lora.is_none() && !dpo.train.gradient_checkpointing);
    }

    #[test]
    fn bad_values_name_the_setting_both_ways() {
        let bad = StageSettings {
            grad_accum: Some(0),
            ..Default::default()
        };
        let err = bad.resolve(Stage::Sft).unwrap_err();
        assert_eq!(err.to_string(), "grad_accum must be at least 1");
        assert_eq!(err.flag(), "--grad-accum must be at least 1");
        for (settings, name) in [
            (
                StageSettings {
                    lr: Some(f64::NAN),
                    ..Default::default()
                },
                "lr",
            ),
            (
                StageSettings {
                    warmup_ratio: Some(1.5),
                    ..Default::default()
                },
                "warmup_ratio",
            ),
            (
                StageSettings {
                    max_grad_norm: Some(-1.0),
                    ..Default::default()
                },
                "max_grad_norm",
            ),
            (
                StageSettings {
                    lora_targets: Some("q_proj,nope".into()),
                    ..Default::default()
                },
                "lora_targets",
            ),
            (
                StageSettings {
                    lora_rank: Some(0),
                    ..Default::default()
                },
                "lora_rank",
            ),
        ] {
            assert_eq!(settings.resolve(Stage::Dpo).unwrap_err().setting, name);
        }
    }

    #[test]
    fn any_lora_value_turns_lora_on_with_peft_defaults() {
        let s = StageSettings {
            lora_rank: Some(16),
            ..Default::default()
        };
        let lora = s.resolve(Stage::Sft).unwrap().train.lora.unwrap();
        assert_eq!((lora.rank(), lora.alpha()), (16, 8.0));
        assert_eq!(lora.targets(), LoraConfig::default().targets());
    }

    #[test]
    fn master_weights_need_bf16() {
        let f32_masters = StageSettings {
            master_weights: true,
            ..Default::default()
        };
        let err = f32_masters.resolve(Stage::Sft).unwrap_err();
        assert_eq!(err.setting, "master_weights");
        assert!(err.flag().starts_with("--master-weights keeps"), "{}", err.flag());
        let s: StageSettings = toml::from_str("dtype = \"bf16\"\nmaster_weights = true").unwrap();
        assert_eq!(
            s.resolve(Stage::Dpo).unwrap().train.precision,
            Precision::Bf16 {
                master_weights: true
            }
        );
        assert!(toml::from_str::<StageSettings>("dtype = \"fp16\"").is_err());
    }

    #[test]
    fn config_tables_refuse_unknown_keys() {
        let err = toml::from_str::<StageSettings>("batch = 2\nbacth = 3").unwrap_err();
        assert!(err.to_string().contains("bacth"), "{err}");
        let s: StageSettings =
            toml::from_str("lora_rank = 4\ngradient_checkpointing = true").unwrap();
        assert!(s.gradient_checkpointing && s.lora_rank == Some(4));
    }
}
