//! `fusechat fuse`: the whole FuseChat-3.0 pipeline from one config, each
//! stage a call into the crate that does the work, in this order:
//!
//! 1. server: use the one at `server.url`, or start `fusechat serve` there;
//! 2. base: the target's float weights (`RUN/models/base`);
//! 3-5. sample, score, pair (fusechat-data, `RUN/data`);
//! 6. sft (fusechat-train, `RUN/sft`), 7. dpo from the SFT model (`RUN/dpo`);
//! 8. export the final model to `RUN/fused`;
//! 9. hot-swap: load it as `<target>-fused-<hash>` and point the alias at it
//!    (and, after DPO, load the SFT model as `<target>-sft-<hash>`);
//! 10. eval the base, SFT and fused targets and the sources (fusechat-eval, `RUN/eval`);
//! 11. `RUN/report.md` and `RUN/report.json`.
//!
//! Every stage is resumable and skips what is done: sampling, scoring and
//! evaluation keep per-request stores, training resumes from its newest
//! checkpoint (and starts over when its data or settings changed), import
//! and export are skipped when their output came from the same input.

pub mod config;
pub mod error;
mod marker;
pub mod report;
pub mod server;

use std::path::{Path, PathBuf};
use std::time::Instant;

use fusechat_admin_api::{LoadModelRequest, LoadedModelInfo};
use serde_json::json;
use sha2::{Digest, Sha256};

pub use config::FuseConfig;
use error::{io, stage};
pub use error::{FuseError, Result};
use fusechat_train::settings::StageOptions;
use fusechat_train::trainer::{Resume, RunSummary};
use server::Server;

/// What a finished run produced.
pub struct Outcome {
    pub report_md: PathBuf,
    pub report_json: PathBuf,
    pub fused_dir: PathBuf,
    /// e.g. "math accuracy: base 3.3% [1.1, 9.1] -> fused 8.3% [...] (n=60 each)".
    pub headline: String,
}

/// One stage's line in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub seconds: f64,
    pub note: String,
}

struct Progress {
    total: usize,
    done: Vec<StageTime>,
    started: Instant,
}

impl Progress {
    fn begin(&self, name: &str, what: &str) -> Instant {
        eprintln!(
            "\nfusechat fuse [{}/{}] {name}: {what}  ({:.0} s so far)",
            self.done.len() + 1,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        Instant::now()
    }

    fn end(&mut self, stage: &'static str, t: Instant, note: impl Into<String>) {
        let note = note.into();
        let seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "fusechat fuse: {stage} done in {seconds:.0} s{}",
            if note.is_empty() {
                String::new()
            } else {
                format!(": {note}")
            }
        );
        self.done.push(StageTime {
            stage,
            seconds,
            note,
        });
    }
}

/// Runs the pipeline of `config`; `bin` is the `fusechat` binary (used to
/// start a server when none answers). Call it from a thread that outlives
/// the run (the main thread): a server it starts is tied to the calling
/// thread with `PR_SET_PDEATHSIG`, so it also goes when the run is killed.
pub fn run(config: &FuseConfig, bin: &Path) -> Result<Outcome> {
    let mut run = Run::new(config)?;
    eprintln!("fusechat fuse: {} -> {}", config.origin, run.dir.display());
    let data_config = write_data_config(config, &run.dir)?;
    // Check [eval] now, not after training.
    eval_config(config, &run.dir, &data_config, "fused", Some("sft"))?;
    warn_when_sampled_elsewhere(config, &data_config);

    let mut server = run.server(bin)?;
    let base_dir = run.base()?;
    let pairs = run.build_data(&data_config)?;
    let trained = run.train(&base_dir, &data_config.output_dir(), &pairs)?;
    let (fused_dir, sha) = run.export(trained.final_dir())?;
    let (fused, sft_id) = run.swap(&server, &trained, fused_dir, sha)?;
    let evaluated = run.evaluate(&server, &data_config, &fused.id, sft_id.as_deref())?;
    server.stop();
    run.report(&fused, &pairs, &trained, &evaluated)
}

/// A run in progress: its config, folder, async runtime and stage times.
struct Run<'a> {
    config: &'a FuseConfig,
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    progress: Progress,
}

/// What training produced: the SFT run, and the DPO run from it where
/// there was one.
struct Trained {
    sft: RunSummary,
    dpo: Option<RunSummary>,
}

impl Trained {
    /// The folder of the last stage's model: the fused model's weights.
    fn final_dir(&self) -> &Path {
        &self.dpo.as_ref().unwrap_or(&self.sft).final_dir
    }
}

/// Says so when no data endpoint is this run's server: the sources are
/// then sampled elsewhere, which is allowed but worth knowing.
fn warn_when_sampled_elsewhere(config: &FuseConfig, data_config: &fusechat_data::Config) {
    let served = format!("{}/v1", config.server_url());
    if !data_config
        .endpoints
        .iter()
        .any(|e| e.base_url.trim_end_matches('/') == served)
    {
        eprintln!(
            "fusechat fuse: warning: no [[data.endpoints]] names this run's server ({served}); \
             the sources are sampled elsewhere"
        );
    }
}

impl<'a> Run<'a> {
    fn new(config: &'a FuseConfig) -> Result<Self> {
        let dir = config.run_dir();
        std::fs::create_dir_all(dir.join("config"))
            .map_err(io(format!("creating {}", dir.display())))?;
        // No `..` in the paths the server is asked to load from (it refuses them).
        let dir = std::fs::canonicalize(&dir).map_err(io(format!("resolving {}", dir.display())))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(io("starting the async runtime"))?;
        let progress = Progress {
            total: 11,
            done: Vec::new(),
            started: Instant::now(),
        };
        Ok(Self { config, dir, rt, progress })
    }

    /// 1. The server at `server.url`, started here when none answers; its
    /// admin routes are checked now, not at the hot-swap after training.
    fn server(&mut self, bin: &Path) -> Result<Server> {
        let config = self.config;
        let t = self.progress.begin("server", &config.server_url());
        let server = self.rt.block_on(Server::ensure(config, bin, &self.dir))?;
        self.rt.block_on(server.admin_models()).map_err(|e| match e {
            FuseError::Http { status: 401 | 403, .. } => FuseError::Server(format!(
                "{e}. The run needs the server's admin routes for the hot-swap: put the server's admin key in ${}, \
                 and let it load from {} (`fusechat serve --model-root DIR` with DIR above the run folder)",
                config.server.admin_key_env,
                self.dir.display()
            )),
            other => other,
        })?;
        let how = if server.started_here() {
            "started here"
        } else {
            "already running"
        };
        self.progress.end("server", t, how);
        Ok(server)
    }

    /// 2. The target's float weights.
    fn base(&mut self) -> Result<PathBuf> {
        let t = self.progress.begin("base", "the target's float weights");
        let base_dir = base_weights(self.config, &self.dir)?;
        self.progress.end("base", t, base_dir.display().to_string());
        Ok(base_dir)
    }

    /// 3-5. Sample every source, score the responses, pair them; an error
    /// when nothing is left to train on.
    fn build_data(&mut self, data_config: &fusechat_data::Config) -> Result<fusechat_data::pair::Report> {
        let t = self.progress.begin("sample", "every source, through its OpenAI endpoint");
        let sampled = self
            .rt
            .block_on(fusechat_data::sample::run(data_config))
            .map_err(stage("sample"))?;
        if sampled.ok == 0 && sampled.requested > 0 {
            return Err(FuseError::Stage {
                stage: "sample",
                cause: anyhow::anyhow!("no request succeeded ({} failed)", sampled.failed),
            });
        }
        let note = format!(
            "{} requested ({} failed), {} already stored",
            sampled.requested, sampled.failed, sampled.already_done
        );
        self.progress.end("sample", t, note);

        let t = self.progress.begin("score", "math answers, code tests, judge / reward model");
        self.rt
            .block_on(fusechat_data::score::run(data_config))
            .map_err(stage("score"))?;
        self.progress.end("score", t, "");

        let t = self.progress.begin(
            "pair",
            "best response per prompt (SFT), best vs worst of one source (DPO)",
        );
        let pairs = fusechat_data::pair::run(data_config).map_err(stage("pair"))?;
        let note = format!("{} SFT rows, {} DPO pairs", pairs.sft_rows, pairs.dpo_pairs);
        self.progress.end("pair", t, note);
        if pairs.sft_rows == 0 {
            return Err(FuseError::Stage {
                stage: "pair",
                cause: anyhow::anyhow!(
                    "no SFT rows: no prompt had a usable response (see {}); sample more prompts or more responses per prompt",
                    data_config.output_dir().join("report.md").display()
                ),
            });
        }
        Ok(pairs)
    }

    /// 6-7. SFT from the base weights, then DPO from the SFT model where
    /// it is on and there are pairs.
    fn train(
        &mut self,
        base_dir: &Path,
        data_dir: &Path,
        pairs: &fusechat_data::pair::Report,
    ) -> Result<Trained> {
        fusechat_train::device::tune_allocator();
        let device = fusechat_train::device::select(false).map_err(stage("sft"))?;
        let what = format!(
            "{} rows on {}",
            pairs.sft_rows,
            fusechat_train::device::describe(&device)
        );
        let t = self.progress.begin("sft", &what);
        let options = run_options(self.config.sft_options()?);
        let sft = fusechat_train::sft::sft(
            &fusechat_train::sft::SftOptions {
                model: base_dir.to_path_buf(),
                data: data_dir.join("sft.jsonl"),
                out: self.dir.join("sft"),
                max_len: options.max_len,
                on_bad_input: fusechat_train::data::OnBadInput::Skip,
                train: options.train,
            },
            &device,
        )
        .map_err(stage("sft"))?;
        self.progress.end("sft", t, train_note(&sft));
        let dpo = self.train_dpo(&sft.final_dir, data_dir, pairs.dpo_pairs, &device)?;
        Ok(Trained { sft, dpo })
    }

    /// 7. DPO from the SFT model in `sft_dir`, or the reason it is skipped.
    fn train_dpo(
        &mut self,
        sft_dir: &Path,
        data_dir: &Path,
        dpo_pairs: usize,
        device: &fusechat_train::device::Device,
    ) -> Result<Option<RunSummary>> {
        let dpo_config = &self.config.dpo;
        if !dpo_config.enabled || dpo_pairs == 0 {
            let t = self.progress.begin("dpo", "skipped");
            let why = if dpo_config.enabled {
                "no DPO pairs: the SFT model is the fused model"
            } else {
                "dpo.enabled is off"
            };
            self.progress.end("dpo", t, why);
            return Ok(None);
        }
        let what = format!("{dpo_pairs} pairs, {} loss, from the SFT model", dpo_config.loss);
        let t = self.progress.begin("dpo", &what);
        let preference = dpo_config.preference()?;
        let options = run_options(self.config.dpo_options()?);
        let dpo = fusechat_train::dpo::dpo(
            &fusechat_train::dpo::DpoOptions {
                model: sft_dir.to_path_buf(),
                data: data_dir.join("dpo.jsonl"),
                out: self.dir.join("dpo"),
                max_len: options.max_len,
                on_bad_input: fusechat_train::data::OnBadInput::Skip,
                preference,
                train: options.train,
            },
            device,
        )
        .map_err(stage("dpo"))?;
        self.progress.end("dpo", t, train_note(&dpo));
        Ok(Some(dpo))
    }

    /// 8. The final model as a Hugging Face folder at `RUN/fused`, and the
    /// sha256 of its weights.
    fn export(&mut self, final_dir: &Path) -> Result<(PathBuf, String)> {
        let t = self.progress.begin("export", "the fused Hugging Face folder");
        let fused_dir = self.dir.join("fused");
        let sha = export(final_dir, &fused_dir)?;
        let note = format!("{} (sha256 {})", fused_dir.display(), &sha[..16]);
        self.progress.end("export", t, note);
        Ok((fused_dir, sha))
    }

    /// 9. Loads the fused model and points the alias at it; after DPO the
    /// SFT model is loaded beside it (unaliased) so the report can say what
    /// DPO added. Returns the fused model and the SFT model's id if loaded.
    fn swap(
        &mut self,
        server: &Server,
        trained: &Trained,
        fused_dir: PathBuf,
        sha: String,
    ) -> Result<(report::FusedModel, Option<String>)> {
        let config = self.config;
        let fused_id = fused_model_id(config, &sha);
        let what = format!("load {fused_id} and point `{}` at it", config.target.alias);
        let t = self.progress.begin("swap", &what);
        let fingerprint = self.rt.block_on(swap(config, server, &fused_id, &fused_dir))?;
        let sft_id = match trained.dpo.is_some() && config.run.evaluate_sft {
            true => self.load_sft(server, &trained.sft.final_dir)?,
            false => None,
        };
        let note = format!(
            "`{}` -> {fused_id}{}",
            config.target.alias,
            sft_id.as_deref().map(|id| format!("; SFT model as {id}")).unwrap_or_default()
        );
        self.progress.end("swap", t, note);
        let fused = report::FusedModel {
            id: fused_id,
            alias: config.target.alias.clone(),
            path: fused_dir.display().to_string(),
            sha256: sha,
            fingerprint,
        };
        Ok((fused, sft_id))
    }

    /// The SFT model loaded unaliased for its evaluation row. The row is
    /// extra: a server that cannot hold it costs the row, not the run.
    fn load_sft(&self, server: &Server, sft_dir: &Path) -> Result<Option<String>> {
        let weights = fusechat_models::fetch::sha256_file(&sft_dir.join("model.safetensors"))
            .map_err(stage("swap"))?;
        let id = stage_model_id(self.config, "sft", &weights);
        match self.rt.block_on(load_unaliased(self.config, server, &id, sft_dir)) {
            Ok(()) => Ok(Some(id)),
            Err(e) => {
                eprintln!("fusechat fuse: warning: the SFT model is not evaluated: {e}");
                Ok(None)
            }
        }
    }

    /// 10. Evaluates the base, SFT and fused targets and the sources, then
    /// unloads the SFT model (only the fused one stays on a server the run
    /// did not start).
    fn evaluate(
        &mut self,
        server: &Server,
        data_config: &fusechat_data::Config,
        fused_id: &str,
        sft_id: Option<&str>,
    ) -> Result<fusechat_eval::Outcome> {
        let t = self.progress.begin(
            "eval",
            "base and fused targets, and the sources, on the evaluation side",
        );
        let eval_config = write_eval_config(self.config, &self.dir, data_config, fused_id, sft_id)?;
        let evaluated = self
            .rt
            .block_on(fusechat_eval::run(&eval_config))
            .map_err(stage("eval"))?;
        let note = format!(
            "{} generations, {} judge calls, {} sandbox runs in this run",
            evaluated.generated, evaluated.judged, evaluated.sandboxed
        );
        self.progress.end("eval", t, note);
        if let Some(id) = sft_id {
            if let Err(e) = self.rt.block_on(server.unload_model(id)) {
                eprintln!("fusechat fuse: warning: unloading {id}: {e}");
            }
        }
        Ok(evaluated)
    }

    /// 11. `RUN/report.md` and `RUN/report.json`.
    fn report(
        mut self,
        fused: &report::FusedModel,
        pairs: &fusechat_data::pair::Report,
        trained: &Trained,
        evaluated: &fusechat_eval::Outcome,
    ) -> Result<Outcome> {
        let t = self.progress.begin("report", "report.md, report.json");
        let machine = fusechat_host::machine();
        let inputs = report::Inputs {
            config: self.config,
            run_dir: &self.dir,
            fused,
            pairs,
            sft: &trained.sft,
            dpo: trained.dpo.as_ref(),
            eval: &evaluated.report,
            stages: &self.progress.done,
            total_s: self.progress.started.elapsed().as_secs_f64(),
            machine: &machine,
        };
        let headline = report::write(&inputs)?;
        self.progress.end("report", t, "");
        Ok(Outcome {
            report_md: self.dir.join("report.md"),
            report_json: self.dir.join("report.json"),
            fused_dir: self.dir.join("fused"),
            headline,
        })
    }
}

/// `<target>-fused-<8 hex>`: see [`stage_model_id`].
fn fused_model_id(config: &FuseConfig, weights_sha: &str) -> String {
    stage_model_id(config, "fused", weights_sha)
}

/// `<target>-<stage>-<8 hex>`: a hash of the weights and of how the server
/// loads them, so evaluations cached under one id never mix two checkpoints
/// or two serving settings.
fn stage_model_id(config: &FuseConfig, stage: &str, weights_sha: &str) -> String {
    let t = &config.target;
    let key = json!({"weights": weights_sha, "isq": t.isq, "float_layers": t.float_layers, "max_seqs": t.max_seqs});
    let h = hex::encode(Sha256::digest(key.to_string().as_bytes()));
    format!("{}-{stage}-{}", t.model, &h[..8])
}

fn train_note(s: &RunSummary) -> String {
    match (s.last_loss, s.resumed_from) {
        (None, Some(step)) => format!("already trained ({step} steps)"),
        (Some(loss), from) => format!(
            "{} steps{}, last loss {loss:.4}, {:.0} tokens/s",
            s.steps,
            from.map(|f| format!(" (resumed at {f})"))
                .unwrap_or_default(),
            s.tokens_per_s
        ),
        (None, None) => format!("{} steps", s.steps),
    }
}

/// A stage's options as the run trains it: resumed when its inputs are the
/// same and started over when the data grew, and under LoRA always merged
/// (the next stage, the export and the server read a whole model folder).
fn run_options(mut stage: StageOptions) -> StageOptions {
    let t = &mut stage.train;
    t.checkpoint_every = 10;
    t.keep_checkpoints = 1;
    t.save_dtype = None;
    t.merge = t.lora.is_some();
    t.resume = Resume::SameRunOrStartOver;
    stage
}

/// `RUN/config/data.toml`, written out so each data stage can be rerun
/// alone (`fusechat sample --config RUN/config/data.toml`).
fn write_data_config(config: &FuseConfig, run_dir: &Path) -> Result<fusechat_data::Config> {
    let data = data_config(config, run_dir)?;
    let path = run_dir.join("config").join("data.toml");
    let text = format!(
        "# Written by `fusechat fuse` from {} [data]; rerun one stage with `fusechat sample --config {}`.\n{}",
        config.origin,
        path.display(),
        toml::to_string(&data).map_err(|e| FuseError::Config(format!("writing the data config: {e}")))?
    );
    write_atomic(&path, text.as_bytes())?;
    fusechat_data::Config::load(Some(&path))
        .map_err(|e| FuseError::Config(format!("{}: {e:#}", path.display())))
}

/// The data config of a run: the `[data]` table with output `RUN/data` and
/// the prompt folder made absolute.
pub fn data_config(config: &FuseConfig, run_dir: &Path) -> Result<fusechat_data::Config> {
    let mut table = config.data.clone();
    let mut run = toml::Table::new();
    run.insert(
        "output".into(),
        toml::Value::String(run_dir.join("data").display().to_string()),
    );
    table.insert("run".into(), toml::Value::Table(run));
    // The run folder is the run's own: samples made under an older
    // `[data]` are redone rather than refused (unless the config says so).
    if let Some(toml::Value::Table(sampling)) = table.get_mut("sampling") {
        sampling
            .entry("on_change")
            .or_insert_with(|| toml::Value::String("resample".into()));
    }
    let mut data: fusechat_data::Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e| FuseError::Config(format!("{} [data]: {e}", config.origin)))?;
    data.base_dir = config.base_dir.clone();
    data.prompts.data_dir = data.data_dir();
    data.validate()
        .map_err(|e| FuseError::Config(format!("{} [data]: {e:#}", config.origin)))?;
    Ok(data)
}

/// The eval config of a run: the `[eval]` table, the data config written
/// as `RUN/config/data.toml`, the output `RUN/eval`, and the rows: base
/// target, SFT target (when it is not the fused one), fused target, then
/// each source (when `run.evaluate_sources`), then any rows of `[eval]` itself.
pub fn eval_config(
    config: &FuseConfig,
    run_dir: &Path,
    data: &fusechat_data::Config,
    fused_id: &str,
    sft_id: Option<&str>,
) -> Result<fusechat_eval::EvalConfig> {
    use fusechat_eval::ModelEntry;
    let api = format!("{}/v1", config.server_url());
    let row = |name: &str, base_url: &str, model: &str| ModelEntry {
        name: name.to_string(),
        base_url: base_url.to_string(),
        model: Some(model.to_string()),
        api_key_env: None,
        concurrency: None,
    };
    let mut rows = vec![row(report::BASE, &api, &config.target.model)];
    if let Some(id) = sft_id {
        rows.push(row(report::SFT, &api, id));
    }
    rows.push(row(report::FUSED, &api, fused_id));
    if config.run.evaluate_sources {
        for s in &data.sources {
            if s.model() == config.target.model {
                continue; // the base target row already is this model
            }
            // Evaluated through its first endpoint (replicas answer alike).
            let first = s.endpoint_names().first().copied().unwrap_or_default();
            let ep = data.endpoints.iter().find(|e| e.name == first);
            let mut source = row(&s.id, ep.map_or(&api, |e| &e.base_url), s.model());
            source.api_key_env = ep.and_then(|e| e.api_key_env.clone());
            rows.push(source);
        }
    }
    let mut table = config.eval.clone();
    if let Some(extra) = table.remove("models") {
        let extra: Vec<ModelEntry> = extra
            .try_into()
            .map_err(|e| FuseError::Config(format!("{} [eval] models: {e}", config.origin)))?;
        rows.extend(extra);
    }
    // The rows are typed; the table only needs a list to deserialize.
    table.insert("models".into(), toml::Value::Array(vec![]));
    table.insert(
        "data_config".into(),
        toml::Value::String("data.toml".into()),
    );
    table.insert(
        "output".into(),
        toml::Value::String(run_dir.join("eval").display().to_string()),
    );
    let mut eval: fusechat_eval::EvalConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e| FuseError::Config(format!("{} [eval]: {e}", config.origin)))?;
    eval.models = rows;
    eval.base_dir = run_dir.join("config");
    eval.validate()
        .map_err(|e| FuseError::Config(format!("{} [eval]: {e}", config.origin)))?;
    for pool in eval.sizes.keys() {
        if !data.pools.iter().any(|p| &p.name == pool) {
            return Err(FuseError::Config(format!(
                "{} [eval.sizes] names `{pool}`, which is not a pool of [data]",
                config.origin
            )));
        }
    }
    Ok(eval)
}

/// Writes the eval config as `RUN/config/eval.toml` and loads it back from there.
fn write_eval_config(
    config: &FuseConfig,
    run_dir: &Path,
    data: &fusechat_data::Config,
    fused_id: &str,
    sft_id: Option<&str>,
) -> Result<fusechat_eval::EvalConfig> {
    let eval = eval_config(config, run_dir, data, fused_id, sft_id)?;
    let path = run_dir.join("config").join("eval.toml");
    let text = format!(
        "# Written by `fusechat fuse` from {} [eval]; rerun with `fusechat eval --config {}`.\n{}",
        config.origin,
        path.display(),
        toml::to_string(&eval)
            .map_err(|e| FuseError::Config(format!("writing the eval config: {e}")))?
    );
    write_atomic(&path, text.as_bytes())?;
    fusechat_eval::EvalConfig::load(Some(&path))
        .map_err(|e| FuseError::Config(format!("{}: {e}", path.display())))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))
}

/// The target's weights as a Hugging Face folder the trainer reads: a
/// `path` as given, or a fetched GGUF imported once (f32) into `RUN/models/base`.
fn base_weights(config: &FuseConfig, run_dir: &Path) -> Result<PathBuf> {
    if let Some(p) = &config.target.path {
        let p = config.resolve(p);
        if !p.join("config.json").is_file() {
            return Err(FuseError::Config(format!(
                "target.path {} is not a Hugging Face folder (no config.json)",
                p.display()
            )));
        }
        return Ok(p);
    }
    let name = config
        .target
        .fetched
        .as_deref()
        .expect("validated: fetched or path");
    let out = run_dir.join("models").join("base");
    let spec = fusechat_models::fetch::find(name).ok_or_else(|| {
        FuseError::Config(format!(
            "target.fetched `{name}` is not a model of `fusechat models list`"
        ))
    })?;
    // What the folder was imported from: reused only for the same GGUF.
    let origin = marker::BaseOrigin {
        fetched: name.to_string(),
        gguf_sha256: spec.sha256.to_string(),
        dtype: "f32".into(),
    };
    let same = marker::read::<marker::BaseOrigin>(&out.join(marker::BaseOrigin::FILE))
        .is_some_and(|m| m == origin);
    if same && out.join("model.safetensors").is_file() {
        return Ok(out);
    }
    let gguf = fusechat_models::fetch::ensure(spec, &fusechat_models::fetch::home())
        .map_err(stage("base"))?;
    let tmp = run_dir.join("models").join(".base.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
    }
    let options = fusechat_models::import::ImportOptions {
        dtype: fusechat_models::import::OutputDType::F32,
        overwrite: true,
    };
    let summary =
        fusechat_models::import::import_gguf_with(&gguf, &tmp, &options).map_err(stage("base"))?;
    eprintln!("{summary}");
    marker::write(&tmp.join(marker::BaseOrigin::FILE), &origin)?;
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(io(format!("removing {}", out.display())))?;
    }
    std::fs::rename(&tmp, &out).map_err(io(format!("moving the import to {}", out.display())))?;
    Ok(out)
}

/// Copies the final training folder to `RUN/fused` (through a temporary
/// folder renamed into place); skipped when it already holds those weights.
/// Returns the sha256 of its `model.safetensors`.
fn export(final_dir: &Path, fused_dir: &Path) -> Result<String> {
    let sha = fusechat_models::fetch::sha256_file(&final_dir.join("model.safetensors"))
        .map_err(stage("export"))?;
    let copied = marker::read::<marker::FusedOrigin>(&fused_dir.join(marker::FusedOrigin::FILE));
    if copied.is_some_and(|m| m.sha256 == sha) {
        return Ok(sha);
    }
    let parent = fused_dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(".fused.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    for entry in
        std::fs::read_dir(final_dir).map_err(io(format!("listing {}", final_dir.display())))?
    {
        let entry = entry.map_err(io("listing the final folder"))?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), tmp.join(entry.file_name()))
                .map_err(io(format!("copying {}", entry.path().display())))?;
        }
    }
    let origin = marker::FusedOrigin {
        from: final_dir.display().to_string(),
        sha256: sha.clone(),
    };
    marker::write(&tmp.join(marker::FusedOrigin::FILE), &origin)?;
    if fused_dir.exists() {
        std::fs::remove_dir_all(fused_dir)
            .map_err(io(format!("removing {}", fused_dir.display())))?;
    }
    std::fs::rename(&tmp, fused_dir)
        .map_err(io(format!("moving {} into place", fused_dir.display())))?;
    Ok(sha)
}

/// Loads the fused folder as `fused_id` and points the alias at it, unless
/// the server already does exactly that. Returns the fused model's
/// `system_fingerprint`.
async fn swap(
    config: &FuseConfig,
    server: &Server,
    fused_id: &str,
    fused_dir: &Path,
) -> Result<String> {
    let alias = &config.target.alias;
    let state = server.admin_models().await?;
    if state.alias(alias) == Some(fused_id) {
        if let Some(serving) = state.ready(fused_id) {
            eprintln!("fusechat fuse: `{alias}` already points at {fused_id}");
            return Ok(serving.fingerprint.clone());
        }
    }
    let info = load(config, server, fused_id, fused_dir, Some(alias)).await?;
    // Check what the server now routes the alias to.
    let state = server.admin_models().await?;
    if state.alias(alias) != Some(fused_id) {
        return Err(FuseError::Server(format!(
            "after the load, the server's alias `{alias}` points at {} instead of {fused_id}",
            state.alias(alias).unwrap_or("nothing")
        )));
    }
    eprintln!("fusechat fuse: loaded {fused_id} in {:.1} s; `{alias}` -> {fused_id}", info.load_seconds);
    Ok(info.fingerprint)
}

/// Loads a stage's model folder as `id` with no alias (the SFT model the
/// report compares), unless the server already has it.
async fn load_unaliased(config: &FuseConfig, server: &Server, id: &str, dir: &Path) -> Result<()> {
    if server.admin_models().await?.ready(id).is_none() {
        let info = load(config, server, id, dir, None).await?;
        eprintln!("fusechat fuse: loaded {id} in {:.1} s", info.load_seconds);
    }
    Ok(())
}

/// `POST /admin/models` for one of the run's folders, served as the base
/// target is (the same quantization, float layers and batch size).
async fn load(
    config: &FuseConfig,
    server: &Server,
    id: &str,
    dir: &Path,
    alias: Option<&str>,
) -> Result<LoadedModelInfo> {
    let request = LoadModelRequest {
        alias: alias.map(str::to_string),
        isq: config.target.isq,
        max_seqs: config.target.max_seqs,
        float_layers: Some(config.target.float_layers.clone()),
        ..LoadModelRequest::new(id, dir)
    };
    server.load_model(&request).await.map_err(|e| match e {
        FuseError::Http { status: 403, message, .. } => FuseError::Server(format!(
            "loading {id} was refused (403): {message}. The server must be allowed to load from {} \
             (its admin.model_root, or `fusechat serve --model-root DIR`)",
            dir.display()
        )),
        other => other,
    })
}
