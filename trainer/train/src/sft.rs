//! Supervised fine-tuning: the mean negative log-likelihood of the learned
//! (assistant) tokens, over all tokens of an optimizer step.

use std::path::PathBuf;

use candle_core::Device;

use crate::batch::Batch;
use crate::chat::ChatTokenizer;
use crate::data::{self, OnBadInput, SftExample};
use crate::error::Result;
use crate::fingerprint;
use crate::loss::learned_logps;
use crate::memory::ForwardShape;
use crate::model::CausalLm;
use crate::trainer::{
    self, GradSum, Objective, RunInputs, RunSummary, StepOutput, StepTimes, TrainOptions,
};

pub struct SftOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub max_len: usize,
    pub on_bad_input: OnBadInput,
    pub train: TrainOptions,
}

pub struct SftObjective {
    pub examples: Vec<SftExample>,
    pub device: Device,
}

impl Objective for SftObjective {
    fn name(&self) -> &'static str {
        "sft"
    }

    fn len(&self) -> usize {
        self.examples.len()
    }

    fn curves(&self) -> &'static [&'static str] {
        &["loss", "learning_rate", "grad_norm"]
    }

    fn largest_forward(&self, micro_batch: usize) -> ForwardShape {
        let rows = self
            .examples
            .iter()
            .map(|e| (e.tokens.ids.len() - 1, e.tokens.learned_count()));
        ForwardShape::largest(rows.collect(), micro_batch)
    }

    fn step(&self, model: &CausalLm, examples: &[usize], micro_batch: usize) -> Result<StepOutput> {
        let params = model.parameters();
        let learned: usize = examples
            .iter()
            .map(|&i| self.examples[i].tokens.learned_count())
            .sum();
        let norm = learned.max(1) as f64;
        let mut grads = GradSum::new(params);
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        let mut times = StepTimes::default();
        for chunk in examples.chunks(micro_batch) {
            let rows: Vec<_> = chunk.iter().map(|&i| &self.examples[i].tokens).collect();
            let batch = Batch::new(&rows, &self.device)?;
            let loss = times.forward(|| -> Result<_> {
                let nll = learned_logps(model, &batch)?.sum_all()?.neg()?;
                Ok((nll / norm)?)
            })?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            grads.add(params, &times.backward(|| model.backward(&loss))?)?;
            tokens += batch.tokens;
        }
        Ok(StepOutput {
            grads: grads.finish(params)?,
            loss: loss_sum,
            tokens,
            extra: vec![("learned_tokens", learned as f64)],
            times,
        })
    }
}

/// `fusechat sft`: loads the model and data, trains, writes `OUT/final`.
pub fn sft(options: &SftOptions, device: &Device) -> Result<RunSummary> {
    let chat = ChatTokenizer::load(&options.model)?;
    let data = data::load_sft(&options.data, &chat, options.max_len, options.on_bad_input)?;
    tracing::info!(
        "{}: {} conversations ({} lines skipped)",
        options.data.display(),
        data.examples.len(),
        data.skipped.len()
    );
    let model = trainer::load_model(&options.model, &options.train, device)?;
    let model_hash = fingerprint::model_folder(&options.model)?;
    let identity = serde_json::json!({
        "objective": "sft",
        "model": model_hash,
        "data": data.sha256,
        "max_len": options.max_len,
        "train": options.train,
    });
    let objective = SftObjective {
        examples: data.examples,
        device: device.clone(),
    };
    let inputs = RunInputs {
        source: &options.model,
        data: &options.data,
        identity,
        skipped: data.skipped.len(),
    };
    trainer::run(&model, &objective, &options.train, &options.out, inputs)
}
