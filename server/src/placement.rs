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
    /// Unset: enough for `max_seqs` sequences at the model's full context,
    /// capped so that weights and cache take at most 90% of what the device
    /// has free,
    /// so that each model of several on one GPU (and a hot-swapped one)
    /// takes what its batch can use, not a share of the whole card.
    #[serde(default)]
    pub memory: Option<KvMemory>,
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
fn default_prefix_cache() -> usize {
    16
}

impl Default for PagedAttention {
    fn default() -> Self {
        Self {
            enabled: true,
            block_size: default_block_size(),
            memory: None,
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

/// What one token's keys and values take in a model, from its weights'
/// metadata: the KV term of the fit estimate and the default cache size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The model's context length, in tokens.
    pub context: usize,
}

impl KvGeometry {
    /// Keys and values of every layer for one token, 16 bits each (the
    /// cache's type on a GPU).
    pub fn bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_heads * self.head_dim * 2) as u64
    }
}

/// A device's memory, in bytes: free now and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

/// The default KV cache stops at this share of what is free once the
/// weights are in (the rest: activations, cuBLAS workspaces).
const DEFAULT_FREE_SHARE: f64 = 0.9;

/// The cache's share of the card when neither the settings nor the model's
/// shape size it: vLLM's rule.
pub const WHOLE_CARD_FRACTION: f32 = 0.9;

/// A checked placement's memory: the KV cache size the engine is given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    /// `None` without a paged cache (the CPU path, or paging switched off).
    pub kv: Option<KvMemory>,
    /// The cache's tokens where they are known, for the log.
    pub kv_tokens: Option<usize>,
}

/// The model's inputs to [`Placement::plan_memory`].
#[derive(Debug, Clone, Copy)]
pub struct ModelMemory {
    /// Bytes of weights as held.
    pub weights: u64,
    /// `None` where the weights' metadata does not give it.
    pub geometry: Option<KvGeometry>,
    /// Sequences decoded together (`max_seqs`).
    pub max_seqs: usize,
}

/// One device of a placement, for the memory plan.
#[derive(Debug, Clone, Copy)]
struct Share {
    device: Device,
    /// Bytes of weights it holds.
    weights: u64,
    /// Its share of the layers, so of the KV cache.
    layers: f64,
    memory: DeviceMemory,
}

impl Placement {
    /// Whether the model fits where it is placed, weights and KV cache
    /// together on each device (`memory` gives each device of
    /// [`Placement::weight_shares`], in order), and the cache size to ask
    /// for; or the estimate and what to change.
    pub fn plan_memory(&self, model: ModelMemory, memory: &[DeviceMemory]) -> Result<MemoryPlan, String> {
        let shares = self.shares(model.weights, memory);
        let Some(paged) = self.paged() else {
            for s in &shares {
                check_fits(s.device, s.weights, 0, s.memory.free)?;
            }
            return Ok(MemoryPlan { kv: None, kv_tokens: None });
        };
        let per_token = model.geometry.map(|g| g.bytes_per_token() as f64);
        let kv_bytes = |tokens: usize, s: &Share| per_token.map_or(0, |b| (tokens as f64 * b * s.layers) as u64);
        match (paged.memory, model.geometry) {
            (Some(KvMemory::Tokens(tokens)), _) => {
                for s in &shares {
                    check_fits(s.device, s.weights, kv_bytes(tokens, s), s.memory.free)?;
                }
                Ok(MemoryPlan { kv: Some(KvMemory::Tokens(tokens)), kv_tokens: Some(tokens) })
            }
            (Some(KvMemory::Mb(mb)), _) => {
                // mistralrs sizes the blocks of all layers by `mb`; each GPU
                // then holds its own layers' share of them.
                let bytes = (mb as u64).saturating_mul(1 << 20);
                for s in &shares {
                    check_fits(s.device, s.weights, (bytes as f64 * s.layers) as u64, s.memory.free)?;
                }
                let tokens = per_token.map(|b| (bytes as f64 / b) as usize);
                Ok(MemoryPlan { kv: Some(KvMemory::Mb(mb)), kv_tokens: tokens })
            }
            (Some(KvMemory::Fraction(f)), _) => {
                fraction_plan(f, &shares, &format!("paged_attention.memory.fraction = {f}"))
            }
            // Without the model's geometry there is no token count to size
            // the cache by: vLLM's rule over the whole card.
            (None, None) => fraction_plan(
                WHOLE_CARD_FRACTION,
                &shares,
                &format!("the default cache ({WHOLE_CARD_FRACTION} of the card: the model's shape is unknown)"),
            ),
            (None, Some(geometry)) => default_plan(geometry, model.max_seqs, paged.block_size, &shares),
        }
    }

    fn shares(&self, weights: u64, memory: &[DeviceMemory]) -> Vec<Share> {
        let by_device = self.weight_shares(weights);
        assert_eq!(by_device.len(), memory.len(), "one DeviceMemory per device of the placement");
        let layers: Vec<f64> = match self {
            Placement::Split { shares, .. } => {
                let all: usize = shares.iter().map(|&(_, n)| n).sum();
                shares.iter().map(|&(_, n)| n as f64 / all.max(1) as f64).collect()
            }
            _ => vec![1.0],
        };
        by_device
            .into_iter()
            .zip(layers)
            .zip(memory)
            .map(|(((device, weights), layers), &memory)| Share { device, weights, layers, memory })
            .collect()
    }
}

/// A cache of whatever `fraction` of each whole device leaves once the
/// memory in use and the weights are counted, refused where that is none.
fn fraction_plan(fraction: f32, shares: &[Share], what: &str) -> Result<MemoryPlan, String> {
    for s in shares {
        check_fits(s.device, s.weights, 0, s.memory.free)?;
        let in_use = s.memory.total.saturating_sub(s.memory.free) + s.weights;
        if s.memory.total as f64 * fraction as f64 <= in_use as f64 {
            return Err(format!(
                "a KV cache of {what} leaves nothing on {}: {:.2} GB of its {:.2} GB are in use once the weights are in; give the cache `tokens` or `mb` (each model of several on one GPU needs its own), or a larger fraction",
                s.device,
                gb(in_use),
                gb(s.memory.total)
            ));
        }
    }
    Ok(MemoryPlan { kv: Some(KvMemory::Fraction(fraction)), kv_tokens: None })
}

/// The default cache: `max_seqs` sequences at the full context, capped so
/// that weights and cache take at most [`DEFAULT_FREE_SHARE`] of what each
/// device has free.
fn default_plan(geometry: KvGeometry, max_seqs: usize, block_size: usize, shares: &[Share]) -> Result<MemoryPlan, String> {
    let mut tokens = max_seqs.max(1).saturating_mul(geometry.context);
    for s in shares {
        check_fits(s.device, s.weights, 0, s.memory.free)?;
        let room = (s.memory.free as f64 * DEFAULT_FREE_SHARE - s.weights as f64).max(0.0);
        let fits = room / (geometry.bytes_per_token() as f64 * s.layers);
        // mistralrs sizes the cache in whole MiB, so less than one is none.
        if (fits as usize) < block_size || room < (1 << 20) as f64 {
            return Err(format!(
                "no room for a KV cache on {}: its weights take {:.2} GB of the {:.2} GB free; quantize the model (`isq`), split it across GPUs (`layers`) or free the GPU",
                s.device,
                gb(s.weights),
                gb(s.memory.free),
            ));
        }
        tokens = tokens.min(fits as usize);
    }
    Ok(MemoryPlan { kv: Some(KvMemory::Tokens(tokens)), kv_tokens: Some(tokens) })
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Whether `weights` and `kv` bytes fit in the `free` bytes of `device`, or
/// the estimate and what to do about it.
fn check_fits(device: Device, weights: u64, kv: u64, free: u64) -> Result<(), String> {
    if weights.saturating_add(kv) <= free {
        return Ok(());
    }
    let fix = match device {
        Device::Cpu => "quantize it (`isq`, or serve a GGUF file as it is), or free memory",
        Device::Cuda(_) if kv > 0 => {
            "give the KV cache less (`paged_attention.memory`), quantize the model (`isq`), split it across GPUs (`layers`), or free the GPU"
        }
        Device::Cuda(_) => "quantize it (`isq`), split it across GPUs (`layers`), or free the GPU",
    };
    let cache = if kv > 0 { format!(" and its KV cache {:.2} GB", gb(kv)) } else { String::new() };
    Err(format!(
        "does not fit on {device}: its weights take {:.2} GB as held{cache}, and {:.2} GB is free; {fix}",
        gb(weights),
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
        Some(KvMemory::Fraction(f)) if !(f > 0.0 && f <= 1.0) => Err(format!(
            "paged_attention.memory.fraction is {f}; give a share of the GPU in (0, 1]"
        )),
        Some(KvMemory::Mb(0) | KvMemory::Tokens(0)) => {
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
    fn weight_shares(&self, bytes: u64) -> Vec<(Device, u64)> {
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

    /// The devices it uses, in the order of [`Placement::plan_memory`]'s `memory`.
    pub fn devices(&self) -> Vec<Device> {
        self.weight_shares(0).into_iter().map(|(d, _)| d).collect()
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
        assert_eq!((paged.memory, paged.prefix_cache), (Some(KvMemory::Mb(4096)), 0));
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

    const GB: u64 = 1_000_000_000;

    fn mem(free: u64, total: u64) -> DeviceMemory {
        DeviceMemory { free: free * GB, total: total * GB }
    }

    /// Qwen2.5-0.5B's cache: 24 layers, 2 KV heads of 64, 32k context.
    const QWEN: KvGeometry = KvGeometry { layers: 24, kv_heads: 2, head_dim: 64, context: 32768 };

    fn model(weights_gb: u64, geometry: Option<KvGeometry>) -> ModelMemory {
        ModelMemory { weights: weights_gb * GB, geometry, max_seqs: 4 }
    }

    #[test]
    fn weights_are_shared_by_layers_and_checked_against_free_memory() {
        let split = Placement::Split { shares: vec![(0, 18), (1, 6)], paged: None };
        assert_eq!(split.weight_shares(2400), [(Device::Cuda(0), 1800), (Device::Cuda(1), 600)]);
        assert_eq!(split.devices(), [Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(Placement::Cpu.weight_shares(7), [(Device::Cpu, 7)]);
        assert_eq!(Placement::Cpu.plan_memory(model(2, None), &[mem(3, 24)]), Ok(MemoryPlan { kv: None, kv_tokens: None }));
        let err = split.plan_memory(model(24, None), &[mem(40, 80), mem(5, 80)]).unwrap_err();
        assert!(err.starts_with("does not fit on cuda:1: its weights take 6.00 GB as held, and 5.00 GB is free"), "{err}");
        assert!(err.contains("`layers`"), "{err}");
        let err = Placement::Cpu.plan_memory(model(2, None), &[mem(1, 24)]).unwrap_err();
        assert!(err.contains("GGUF file as it is"), "{err}");
    }

    #[test]
    fn the_kv_cache_is_part_of_the_fit_estimate() {
        assert_eq!(QWEN.bytes_per_token(), 12_288);
        let gpu = |memory| Placement::Gpu { device: 0, paged: Some(PagedAttention { memory, ..PagedAttention::default() }) };
        // A million tokens of Qwen's cache take 12.3 GB.
        let p = gpu(Some(KvMemory::Tokens(1_000_000)));
        let plan = p.plan_memory(model(1, Some(QWEN)), &[mem(20, 80)]).unwrap();
        assert_eq!(plan, MemoryPlan { kv: Some(KvMemory::Tokens(1_000_000)), kv_tokens: Some(1_000_000) });
        let err = p.plan_memory(model(1, Some(QWEN)), &[mem(10, 80)]).unwrap_err();
        assert!(err.contains("its weights take 1.00 GB as held and its KV cache 12.29 GB, and 10.00 GB is free"), "{err}");
        assert!(err.contains("paged_attention.memory"), "{err}");
        // Megabytes are checked as given, and told in tokens where known.
        let plan = gpu(Some(KvMemory::Mb(1200))).plan_memory(model(1, Some(QWEN)), &[mem(20, 80)]).unwrap();
        assert_eq!(plan.kv_tokens, Some(102_400));
        assert!(gpu(Some(KvMemory::Mb(20_000))).plan_memory(model(1, None), &[mem(20, 80)]).is_err());
        // A split holds the cache of its own layers.
        let split = Placement::Split { shares: vec![(0, 12), (1, 12)], paged: Some(PagedAttention {
            memory: Some(KvMemory::Tokens(1_000_000)), ..PagedAttention::default() }) };
        split.plan_memory(model(2, Some(QWEN)), &[mem(8, 80), mem(8, 80)]).unwrap();
        // 12 GiB of `mb` over a 12/12 split: 6 GiB a GPU.
        let split_mb = Placement::Split { shares: vec![(0, 12), (1, 12)], paged: Some(PagedAttention {
            memory: Some(KvMemory::Mb(12_288)), ..PagedAttention::default() }) };
        let plan = split_mb.plan_memory(model(2, Some(QWEN)), &[mem(8, 80), mem(8, 80)]).unwrap();
        assert_eq!(plan.kv_tokens, Some(1_048_576));
        assert!(split_mb.plan_memory(model(2, Some(QWEN)), &[mem(8, 80), mem(7, 80)]).is_err());
        assert!(split.plan_memory(model(2, Some(QWEN)), &[mem(8, 80), mem(6, 80)]).is_err());
    }

    #[test]
    fn a_fraction_of_the_card_is_refused_where_it_leaves_no_cache() {
        let gpu = Placement::Gpu { device: 0, paged: Some(PagedAttention {
            memory: Some(KvMemory::Fraction(0.9)), ..PagedAttention::default() }) };
        let plan = gpu.plan_memory(model(1, Some(QWEN)), &[mem(80, 80)]).unwrap();
        assert_eq!(plan.kv, Some(KvMemory::Fraction(0.9)));
        // A model loaded before this one took 0.9 of the card already.
        let err = gpu.plan_memory(model(1, Some(QWEN)), &[mem(8, 80)]).unwrap_err();
        assert!(err.contains("leaves nothing on cuda:0: 73.00 GB of its 80.00 GB are in use"), "{err}");
        assert!(err.contains("`tokens` or `mb`"), "{err}");
    }

    #[test]
    fn the_default_cache_holds_the_batch_at_full_context_within_what_is_free() {
        let gpu = Placement::Gpu { device: 0, paged: Some(PagedAttention::default()) };
        // 4 sequences of 32k tokens: 131,072 tokens, 1.6 GB.
        let plan = gpu.plan_memory(model(1, Some(QWEN)), &[mem(70, 80)]).unwrap();
        assert_eq!(plan, MemoryPlan { kv: Some(KvMemory::Tokens(131_072)), kv_tokens: Some(131_072) });
        // Less free: capped at 90% of what the weights leave.
        let plan = gpu.plan_memory(model(1, Some(QWEN)), &[mem(2, 80)]).unwrap();
        assert_eq!(plan.kv_tokens, Some(((2.0 * 0.9 - 1.0) * GB as f64 / 12_288.0) as usize));
        let err = gpu.plan_memory(model(1, Some(QWEN)), &[mem(1, 80)]).unwrap_err();
        assert!(err.contains("no room for a KV cache on cuda:0: its weights take 1.00 GB of the 1.00 GB free"), "{err}");
        // A split is capped by its tightest GPU.
        let split = Placement::Split { shares: vec![(0, 12), (1, 12)], paged: Some(PagedAttention::default()) };
        let plan = split.plan_memory(model(2, Some(QWEN)), &[mem(70, 80), mem(2, 80)]).unwrap();
        assert_eq!(plan.kv_tokens, Some(((2.0 * 0.9 - 1.0) * GB as f64 / 6_144.0) as usize));
        // Geometry unknown: the whole card's rule.
        let plan = gpu.plan_memory(model(1, None), &[mem(70, 80)]).unwrap();
        assert_eq!(plan.kv, Some(KvMemory::Fraction(0.9)));
        let err = gpu.plan_memory(model(1, None), &[mem(8, 80)]).unwrap_err();
        assert!(err.contains("the default cache (0.9 of the card"), "{err}");
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
