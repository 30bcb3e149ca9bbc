//! `fusechat fuse [--config FILE]`: the whole pipeline (fusechat-fuse). No
//! config: the embedded `config/fuse-tiny.toml`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fusechat_fuse::FuseConfig;

#[derive(clap::Args)]
pub struct FuseArgs {
    /// Fuse config (TOML). Default: the embedded config/fuse-tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Write the run here instead of the config's `run.output`.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn fuse(args: FuseArgs) -> Result<()> {
    let mut config = FuseConfig::load(args.config.as_deref())?;
    if let Some(out) = args.output {
        config.run.output =
            std::path::absolute(&out).with_context(|| format!("resolving {}", out.display()))?;
    }
    let bin = std::env::current_exe().context("locating the fusechat binary")?;
    let outcome = fusechat_fuse::run(&config, &bin)?;
    eprintln!("\nfusechat fuse: {}", outcome.headline);
    println!("{}", outcome.report_md.display());
    println!("{}", outcome.report_json.display());
    println!("{}", outcome.fused_dir.display());
    Ok(())
}
