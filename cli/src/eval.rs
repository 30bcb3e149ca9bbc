//! `fusechat eval [--config FILE]`: score the configured models on the
//! evaluation side of the prompt pools (fusechat-eval) and print where the
//! report went. No config: the embedded `config/eval-tiny.toml`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fusechat_eval::EvalConfig;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Eval config (TOML). Default: the embedded config/eval-tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the outputs here instead of the config's `output`.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let mut config = EvalConfig::load(args.config.as_deref()).context("loading the eval config")?;
    if let Some(out) = args.output {
        config.output =
            std::path::absolute(&out).with_context(|| format!("resolving {}", out.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime
        .block_on(fusechat_eval::run(&config))
        .context("evaluating")?;
    eprintln!(
        "fusechat eval: {} generation(s), {} judge call(s), {} sandbox run(s) in this run",
        outcome.generated, outcome.judged, outcome.sandboxed
    );
    eprint!("{}", fusechat_eval::report::markdown(&outcome.report));
    println!("{}", outcome.output_dir.join("report.md").display());
    println!("{}", outcome.output_dir.join("report.json").display());
    Ok(())
}
