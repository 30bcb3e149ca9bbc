//! Where a model runs and how its KV cache is kept: a device (`cpu`,
//! `cuda:N`) or its layers split across GPUs, and on CUDA the paged KV
//! cache (blocks, so sequences of any length batch together) with prefix
//! caching. The CPU path batches ragged sequences without pages (the
//! vendored engine's padded KV cache) and takes none of these settings.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// Whether this binary was built with `--features cuda`.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// One device, as a config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("device `{s}` is not `cpu`, `cuda` or `cuda:N`")),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A share of a model's layers on one GPU (`layers = [{ device = "cuda:0",
/// count = 16 }, ...]`, in layer order).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerShare {
    pub device: Device,
    pub count: usize,
}

/// How much GPU memory the paged KV cache takes.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KvMemory {
    /// Share of the whole GPU's memory that may be in use once this cache
    /// is allocated, its weights and every model loaded before it counted
    /// (vLLM's `gpu_memory_utilization`). With several models on one GPU,
    /// give each `tokens` or `mb` instead: the first one's 0.9 leaves the
    /// next nothing.
    Fraction(f32),
    /// Megabytes.
    Mb(usize),
    /// Enough blocks for this many tokens in all.
    Tokens(usize),
}

/// `[models.paged_attention]`: the paged KV cache on CUDA.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagedAttention {
    /// `false` keeps mistralrs's contiguous cache on CUDA, which batches
    /// only sequences of the same length.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Tokens per block: 8, 16 or 32 (the CUDA kernel's sizes).
    #[serde(default = "default_block_size")]
    pub block_size: usize,
    /// `{ fraction = 0.9 }`, `{ mb = 8192 }` or `{ tokens = 65536 }`.
    #[serde(default = "default_kv_memory")]
    pub memory: KvMemory,
    /// Finished sequences whose KV blocks are kept for a later request that
    /// starts with the same tokens (0: no prefix caching).
    #[serde(default = "default_prefix_cache")]
    pub prefix_cache: usize,
}

fn yes() -> bool {
    true
}
fn default_block_size() -> usize {
    32
}
fn default_kv_memory() -> KvMemory {
    KvMemory::Fraction(0.9)
}
fn default_prefix_cache() -> usize {
    16
}

impl Default for PagedAttention {
    fn default() -> Self {
        Self {
            enabled: true,
            block_size: default_block_size(),
            memory: default_kv_memory(),
            prefix_cache: default_prefix_cache(),
        }
    }
}

/// Where one model runs, checked: what the engine builder is given.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Today's CPU path: no pages, no prefix cache.
    Cpu,
    /// The whole model on one GPU.
    Gpu { device: usize, paged: Option<PagedAttention> },
    /// Layers split across GPUs, in order.
    Split { shares: Vec<(usize, usize)>, paged: Option<PagedAttention> },
}

/// The placement fields of one `[[models]]` entry, as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementConfig<'a> {
    pub device: Option<Device>,
    pub layers: &'a [LayerShare],
    pub paged_attention: Option<&'a PagedAttention>,
}

impl PlacementConfig<'_> {
    /// The placement, or what to fix. `cuda_built` is [`CUDA_BUILT`]
    /// (a parameter so both builds' rules are tested on either).
    pub fn resolve(&self, cuda_built: bool) -> Result<Placement, String> {
        let paged = match self.paged_attention {
            Some(p) => {
                check_paged(p)?;
                p.enabled.then(|| p.clone())
            }
            None => Some(PagedAttention::default()),
        };
        let on_gpu = |paged| -> Result<Option<PagedAttention>, String> {
            if !cuda_built {
                return Err("this binary has no CUDA: build it with `cargo build --release --features cuda` to place a model on a GPU".into());
            }
            Ok(paged)
        };
        match (self.device, self.layers) {
            (Some(_), [_, ..]) => {
                Err("`device` and `layers` both place the model; keep one (`layers` splits it across GPUs)".into())
            }
            (None, []) if cuda_built => Ok(Placement::Gpu { device: 0, paged }),
            // A GPU config's cache settings do not stop a CPU run: they are
            // checked, then left unused (see `ignored_on_cpu`).
            (None, []) | (Some(Device::Cpu), []) => Ok(Placement::Cpu),
            (Some(Device::Cuda(device)), []) => Ok(Placement::Gpu { device, paged: on_gpu(paged)? }),
            (None, shares) => {
                let mut out = Vec::with_capacity(shares.len());
                for share in shares {
                    let Device::Cuda(device) = share.device else {
                        return Err("`layers` splits a model across GPUs; a share on `cpu` is not supported (mistralrs has no paged attention on the CPU)".into());
                    };
                    if share.count == 0 {
                        return Err(format!("`layers`: the share on {} has count 0", share.device));
                    }
                    if out.iter().any(|&(d, _)| d == device) {
                        return Err(format!("`layers` names {} twice", share.device));
                    }
                    out.push((device, share.count));
                }
                Ok(Placement::Split { shares: out, paged: on_gpu(paged)? })
            }
        }
    }
}

/// Whether `need` bytes of weights fit in the `free` bytes of `device`, or
/// the estimate and what to do about it.
pub fn check_fits(device: Device, need: u64, free: u64) -> Result<(), String> {
    if need <= free {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    let fix = match device {
        Device::Cpu => "quantize it (`isq`, or serve a GGUF file as it is), or free memory",
        Device::Cuda(_) => "quantize it (`isq`), split it across GPUs (`layers`), or free the GPU",
    };
    Err(format!(
        "does not fit on {device}: its weights take {:.2} GB as held, and {:.2} GB is free (the KV cache comes on top); {fix}",
        gb(need),
        gb(free)
    ))
}

fn check_paged(p: &PagedAttention) -> Result<(), String> {
    if ![8, 16, 32].contains(&p.block_size) {
        return Err(format!(
            "paged_attention.block_size is {}; the CUDA kernel takes 8, 16 or 32",
            p.block_size
        ));
    }
    match p.memory {
        KvMemory::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(format!(
            "paged_attention.memory.fraction is {f}; give a share of the GPU in (0, 1]"
        )),
        KvMemory::Mb(0) | KvMemory::Tokens(0) => {
            Err("paged_attention.memory must be more than 0".into())
        }
        _ => Ok(()),
    }
}

impl PlacementConfig<'_> {
    /// Why the settings given for a GPU are unused where the model runs on
    /// the CPU, for a warning at load.
    pub fn ignored_on_cpu(&self, placement: &Placement) -> Option<&'static str> {
        (*placement == Placement::Cpu && self.paged_attention.is_some_and(|p| p.enabled)).then_some(
            "`paged_attention` is unused: the model runs on the CPU, where sequences of any length batch together without pages",
        )
    }
}

impl Placement {
    /// The layers this placement puts on GPUs, checked against the model's
    /// own count once it is known.
    pub fn check_layers(&self, model_layers: usize) -> Result<(), String> {
        if let Placement::Split { shares, .. } = self {
            let placed: usize = shares.iter().map(|&(_, n)| n).sum();
            if placed != model_layers {
                return Err(format!(
                    "`layers` places {placed} layers; the model has {model_layers}"
                ));
            }
        }
        Ok(())
    }

    /// The bytes of weights each device takes: all on one, or a split by
    /// each GPU's share of the layers.
    pub fn weight_shares(&self, bytes: u64) -> Vec<(Device, u64)> {
        match self {
            Placement::Cpu => vec![(Device::Cpu, bytes)],
            Placement::Gpu { device, .. } => vec![(Device::Cuda(*device), bytes)],
            Placement::Split { shares, .. } => {
                let layers: usize = shares.iter().map(|&(_, n)| n).sum();
                shares
                    .iter()
                    .map(|&(d, n)| (Device::Cuda(d), bytes * n as u64 / layers.max(1) as u64))
                    .collect()
            }
        }
    }

    pub fn paged(&self) -> Option<&PagedAttention> {
        match self {
            Placement::Cpu => None,
            Placement::Gpu { paged, .. } | Placement::Split { paged, .. } => paged.as_ref(),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Cpu => f.write_str("cpu"),
            Placement::Gpu { device, .. } => write!(f, "cuda:{device}"),
            Placement::Split { shares, .. } => {
                let parts: Vec<String> =
                    shares.iter().map(|(d, n)| format!("{n} layers on cuda:{d}")).collect();
                f.write_str(&parts.join(", "))
            }
        }?;
        match self.paged() {
            Some(p) => write!(f, ", paged KV cache ({} tokens a block)", p.block_size),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml_text: &str, cuda_built: bool) -> Result<Placement, String> {
        #[derive(Deserialize)]
        struct Entry {
            device: Option<Device>,
            #[serde(default)]
            layers: Vec<LayerShare>,
            paged_attention: Option<PagedAttention>,
        }
        let e: Entry = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        PlacementConfig {
            device: e.device,
            layers: &e.layers,
            paged_attention: e.paged_attention.as_ref(),
        }
        .resolve(cuda_built)
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert!("gpu0".parse::<Device>().unwrap_err().contains("`cpu`, `cuda` or `cuda:N`"));
        assert!("cuda:x".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn a_cpu_build_keeps_the_cpu_path_and_refuses_gpus() {
        assert_eq!(resolve("", false), Ok(Placement::Cpu));
        assert_eq!(resolve("device = \"cpu\"", false), Ok(Placement::Cpu));
        let err = resolve("device = \"cuda:0\"", false).unwrap_err();
        assert!(err.contains("--features cuda"), "{err}");
        let err = resolve("layers = [{ device = \"cuda:0\", count = 10 }]", false).unwrap_err();
        assert!(err.contains("--features cuda"), "{err}");
        // A GPU config's cache settings are checked, then unused on the CPU.
        assert_eq!(resolve("[paged_attention]\nblock_size = 16", false), Ok(Placement::Cpu));
        assert_eq!(resolve("device = \"cpu\"\n[paged_attention]\nblock_size = 16", true), Ok(Placement::Cpu));
        let err = resolve("[paged_attention]\nblock_size = 12", false).unwrap_err();
        assert!(err.contains("8, 16 or 32"), "{err}");
        let paged = PagedAttention::default();
        let given = PlacementConfig { device: None, layers: &[], paged_attention: Some(&paged) };
        assert!(given.ignored_on_cpu(&Placement::Cpu).unwrap().contains("unused"));
        let off = PagedAttention { enabled: false, ..PagedAttention::default() };
        let given = PlacementConfig { device: None, layers: &[], paged_attention: Some(&off) };
        assert_eq!(given.ignored_on_cpu(&Placement::Cpu), None);
    }

    #[test]
    fn a_cuda_build_pages_the_kv_cache_by_default() {
        let p = resolve("", true).unwrap();
        assert_eq!(p, Placement::Gpu { device: 0, paged: Some(PagedAttention::default()) });
        assert_eq!(p.to_string(), "cuda:0, paged KV cache (32 tokens a block)");
        let p = resolve("device = \"cuda:1\"\n[paged_attention]\nmemory = { mb = 4096 }\nprefix_cache = 0", true).unwrap();
        let Placement::Gpu { device: 1, paged: Some(paged) } = p else { panic!("{p:?}") };
        assert_eq!((paged.memory, paged.prefix_cache), (KvMemory::Mb(4096), 0));
        let p = resolve("device = \"cuda:0\"\n[paged_attention]\nenabled = false", true).unwrap();
        assert_eq!(p, Placement::Gpu { device: 0, paged: None });
        assert_eq!(resolve("device = \"cpu\"", true), Ok(Placement::Cpu));
    }

    #[test]
    fn layer_splits_are_checked() {
        let text = "layers = [{ device = \"cuda:0\", count = 20 }, { device = \"cuda:1\", count = 4 }]";
        let p = resolve(text, true).unwrap();
        assert_eq!(p.to_string(), "20 layers on cuda:0, 4 layers on cuda:1, paged KV cache (32 tokens a block)");
        p.check_layers(24).unwrap();
        assert!(p.check_layers(28).unwrap_err().contains("places 24 layers; the model has 28"));
        let both = format!("device = \"cuda:0\"\n{text}");
        assert!(resolve(&both, true).unwrap_err().contains("keep one"));
        let twice = "layers = [{ device = \"cuda:0\", count = 2 }, { device = \"cuda\", count = 2 }]";
        assert!(resolve(twice, true).unwrap_err().contains("cuda:0 twice"));
        let cpu = "layers = [{ device = \"cpu\", count = 2 }]";
        assert!(resolve(cpu, true).unwrap_err().contains("on `cpu` is not supported"));
        let zero = "layers = [{ device = \"cuda:0\", count = 0 }]";
        assert!(resolve(zero, true).unwrap_err().contains("count 0"));
    }

    #[test]
    fn weights_are_shared_by_layers_and_checked_against_free_memory() {
        let split = Placement::Split { shares: vec![(0, 18), (1, 6)], paged: None };
        assert_eq!(split.weight_shares(2400), [(Device::Cuda(0), 1800), (Device::Cuda(1), 600)]);
        assert_eq!(Placement::Cpu.weight_shares(7), [(Device::Cpu, 7)]);
        check_fits(Device::Cuda(0), 10, 10).unwrap();
        let err = check_fits(Device::Cuda(1), 16_060_000_000, 9_500_000_000).unwrap_err();
        assert!(err.starts_with("does not fit on cuda:1: its weights take 16.06 GB as held, and 9.50 GB is free"), "{err}");
        assert!(err.contains("`layers`"), "{err}");
        assert!(check_fits(Device::Cpu, 2, 1).unwrap_err().contains("GGUF file as it is"));
    }

    #[test]
    fn paged_attention_settings_are_checked() {
        let bad = [
            ("[paged_attention]\nblock_size = 64", "8, 16 or 32"),
            ("[paged_attention]\nmemory = { fraction = 1.5 }", "(0, 1]"),
            ("[paged_attention]\nmemory = { tokens = 0 }", "more than 0"),
        ];
        for (text, want) in bad {
            let err = resolve(text, true).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        let err = resolve("[paged_attention]\nmemory = { gb = 2 }", true).unwrap_err();
        assert!(err.contains("gb"), "{err}");
    }
}
