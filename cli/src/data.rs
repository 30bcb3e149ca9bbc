//! `fusechat sample`, `fusechat score`, `fusechat pair`: thin calls into
//! fusechat-data, all three reading the same data config.

use std::path::PathBuf;

use anyhow::{Context, Result};
use fusechat_data::Config;

#[derive(clap::Args)]
pub struct DataArgs {
    /// Data config (TOML). Default: the embedded config/data-tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

fn load(args: &DataArgs) -> Result<Config> {
    Ok(Config::load(args.config.as_deref())?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn sample(args: DataArgs) -> Result<()> {
    let config = load(&args)?;
    let summary = runtime()?.block_on(fusechat_data::sample::run(&config))?;
    println!("{}", config.store_path().display());
    if summary.ok == 0 && summary.requested > 0 {
        anyhow::bail!(
            "no request succeeded ({} failed); see the messages above",
            summary.failed
        );
    }
    Ok(())
}

pub fn score(args: DataArgs) -> Result<()> {
    let config = load(&args)?;
    runtime()?.block_on(fusechat_data::score::run(&config))?;
    println!("{}", config.store_path().display());
    Ok(())
}

pub fn pair(args: DataArgs) -> Result<()> {
    let config = load(&args)?;
    fusechat_data::pair::run(&config)?;
    println!("{}", config.output_dir().display());
    Ok(())
}
