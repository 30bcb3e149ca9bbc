//! The engine side of placement: the model's geometry and each device's
//! memory read, the plan of `crate::placement` checked against them, and
//! the result given to mistralrs's builders. The rules themselves live in
//! `crate::placement`, free of mistralrs types, so both builds test them.

use anyhow::Context;
use mistralrs::core::{DeviceLayerMapMetadata, DeviceMapMetadata, MemoryUsage};
use mistralrs::{DeviceMapSetting, MemoryGpuConfig, PagedAttentionConfig, PagedCacheType};

use super::{config_number, gguf_header, WeightsKind};
use crate::config::ModelConfig;
use crate::holding::Holding;
use crate::placement::{Device, DeviceMemory, KvGeometry, KvMemory, ModelMemory, Placement, WHOLE_CARD_FRACTION};

/// Where the model goes and the KV cache it gets, checked against its
/// layer count (for a split) and, weights and cache together, against the
/// memory of each device.
pub(super) async fn place(config: &ModelConfig, kind: &WeightsKind, holding: Option<&Holding>) -> anyhow::Result<Placed> {
    let placement = config.placement()?;
    let named = |e: String| anyhow::anyhow!("model `{}`: {e}", config.id);
    // Only a paged cache is sized by the model's shape: the CPU path reads
    // no extra header at start-up.
    let geometry = match placement.paged() {
        Some(_) => {
            let kind = kind.clone();
            tokio::task::spawn_blocking(move || kv_geometry(&kind))
                .await?
                .map_err(|e| tracing::debug!(model = %config.id, "no KV cache geometry: {e:#}"))
                .ok()
        }
        None => None,
    };
    if matches!(placement, Placement::Split { .. }) {
        let kind = kind.clone();
        let layers = tokio::task::spawn_blocking(move || layer_count(&kind))
            .await?
            .context("`layers` splits the model, but its layer count is unknown")?;
        placement.check_layers(layers).map_err(named)?;
    }
    let mut kv = None;
    if let Some(holding) = holding {
        let mut memory = Vec::new();
        for device in placement.devices() {
            memory.push(device_memory(device).await?);
        }
        let model = ModelMemory { weights: holding.bytes, geometry, max_seqs: config.max_seqs };
        let plan = placement
            .plan_memory(model, &memory)
            .map_err(|e| named(format!("{e} ({})", holding.summary())))?;
        kv = plan.kv;
        if let Some(tokens) = plan.kv_tokens {
            tracing::info!(model = %config.id, tokens, "paged KV cache");
        }
    } else if placement.paged().is_some() {
        // Nothing known to plan with: the settings as given, or the whole
        // card's rule.
        kv = Some(
            placement
                .paged()
                .and_then(|p| p.memory)
                .unwrap_or(KvMemory::Fraction(WHOLE_CARD_FRACTION)),
        );
    }
    if let Some(why) = config.placement_config().ignored_on_cpu(&placement) {
        tracing::warn!(model = %config.id, "{why}");
    }
    tracing::info!(model = %config.id, %placement, "placement");
    Placed::of(&placement, kv)
}

/// A device's memory now: for the CPU, what the host can still give this
/// process (its total is not used by any rule).
async fn device_memory(device: Device) -> anyhow::Result<DeviceMemory> {
    match device {
        Device::Cpu => {
            let free = fusechat_host::available_memory().unwrap_or(u64::MAX);
            Ok(DeviceMemory { free, total: free })
        }
        Device::Cuda(n) => {
            let device = mistralrs::Device::new_cuda(n).with_context(|| format!("cuda:{n}"))?;
            tokio::task::spawn_blocking(move || {
                let free = MemoryUsage.get_memory_available(&device)? as u64;
                let total = MemoryUsage.get_total_memory(&device)? as u64;
                Ok(DeviceMemory { free, total })
            })
            .await?
        }
    }
}

/// The model's transformer blocks: GGUF `{arch}.block_count`, or
/// config.json's `num_hidden_layers`.
fn layer_count(kind: &WeightsKind) -> anyhow::Result<usize> {
    match kind {
        WeightsKind::Gguf { dir, file, .. } => {
            let content = gguf_header(&dir.join(file))?;
            gguf_block_count(&content, &gguf_architecture_of(&content)?)
        }
        WeightsKind::Hf { dir, .. } => config_number(dir, "num_hidden_layers"),
    }
}

fn gguf_block_count(content: &candle_core::quantized::gguf_file::Content, arch: &str) -> anyhow::Result<usize> {
    gguf_number(content, &format!("{arch}.block_count"))?
        .with_context(|| format!("the GGUF file has no {arch}.block_count"))
}

fn gguf_architecture_of(content: &candle_core::quantized::gguf_file::Content) -> anyhow::Result<String> {
    Ok(content
        .metadata
        .get("general.architecture")
        .context("the GGUF file names no general.architecture")?
        .to_string()?
        .clone())
}

/// A number in GGUF metadata, `None` where the key is absent.
fn gguf_number(content: &candle_core::quantized::gguf_file::Content, key: &str) -> anyhow::Result<Option<usize>> {
    match content.metadata.get(key) {
        Some(v) => Ok(Some(v.to_u32().with_context(|| format!("{key} is not one number"))? as usize)),
        None => Ok(None),
    }
}

/// What the KV cache keeps per token, from GGUF metadata or config.json.
fn kv_geometry(kind: &WeightsKind) -> anyhow::Result<KvGeometry> {
    match kind {
        WeightsKind::Gguf { dir, file, .. } => {
            let content = gguf_header(&dir.join(file))?;
            let get = |key: &str| gguf_number(&content, key);
            let arch = gguf_architecture_of(&content)?;
            let need = |name: &str| -> anyhow::Result<usize> {
                let key = format!("{arch}.{name}");
                get(&key)?.with_context(|| format!("the GGUF file has no {key}"))
            };
            let heads = need("attention.head_count")?;
            let head_dim = match get(&format!("{arch}.attention.key_length"))? {
                Some(d) => d,
                None => need("embedding_length")? / heads.max(1),
            };
            Ok(KvGeometry {
                layers: gguf_block_count(&content, &arch)?,
                kv_heads: get(&format!("{arch}.attention.head_count_kv"))?.unwrap_or(heads),
                head_dim,
                context: need("context_length")?,
            })
        }
        WeightsKind::Hf { dir, .. } => {
            let heads = config_number(dir, "num_attention_heads")?;
            let head_dim = match config_number(dir, "head_dim") {
                Ok(d) => d,
                Err(_) => config_number(dir, "hidden_size")? / heads.max(1),
            };
            Ok(KvGeometry {
                layers: layer_count(kind)?,
                kv_heads: config_number(dir, "num_key_value_heads").unwrap_or(heads),
                head_dim,
                context: config_number(dir, "max_position_embeddings")?,
            })
        }
    }
}

/// What a placement asks of mistralrs's builders.
pub(super) struct Placed {
    pub(super) placement: Placement,
    /// A CUDA build told to keep a model on the CPU.
    pub(super) force_cpu: bool,
    pub(super) device: Option<mistralrs::Device>,
    pub(super) device_map: Option<DeviceMapSetting>,
    pub(super) paged: Option<PagedAttentionConfig>,
    pub(super) prefix_cache_n: Option<usize>,
}

impl Placed {
    fn of(placement: &Placement, kv: Option<KvMemory>) -> anyhow::Result<Self> {
        let mut placed = Placed {
            placement: placement.clone(),
            force_cpu: false,
            device: None,
            device_map: None,
            paged: None,
            prefix_cache_n: None,
        };
        if let (Some(p), Some(kv)) = (placement.paged(), kv) {
            let memory = match kv {
                KvMemory::Fraction(f) => MemoryGpuConfig::Utilization(f),
                KvMemory::Mb(mb) => MemoryGpuConfig::MbAmount(mb),
                KvMemory::Tokens(t) => MemoryGpuConfig::ContextSize(t),
            };
            placed.paged = Some(PagedAttentionConfig::new(Some(p.block_size), memory, PagedCacheType::Auto)?);
            placed.prefix_cache_n = (p.prefix_cache > 0).then_some(p.prefix_cache);
        }
        match placement {
            Placement::Cpu => placed.force_cpu = crate::placement::CUDA_BUILT,
            Placement::Gpu { device, .. } => {
                placed.device = Some(mistralrs::Device::new_cuda(*device).with_context(|| format!("cuda:{device}"))?);
            }
            Placement::Split { shares, .. } => {
                let layers = shares
                    .iter()
                    .map(|&(ordinal, layers)| DeviceLayerMapMetadata { ordinal, layers })
                    .collect();
                placed.device_map = Some(DeviceMapSetting::Map(DeviceMapMetadata::from_num_device_layers(layers)));
            }
        }
        Ok(placed)
    }
}

/// Gives a builder the placement's settings (the GGUF and Hugging Face
/// builders have the same methods but no common trait).
macro_rules! with_placement {
    ($builder:expr, $placed:expr) => {{
        let placed: &Placed = $placed;
        let mut builder = $builder.with_prefix_cache_n(placed.prefix_cache_n);
        if placed.force_cpu {
            builder = builder.with_force_cpu();
        }
        if let Some(device) = &placed.device {
            builder = builder.with_device(device.clone());
        }
        if let Some(map) = &placed.device_map {
            builder = builder.with_device_mapping(map.clone());
        }
        if let Some(paged) = placed.paged {
            builder = builder.with_paged_attn(paged);
        }
        builder
    }};
}
pub(super) use with_placement;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Isq;

    #[test]
    fn the_cpu_placement_asks_mistralrs_for_what_it_always_did() {
        let placed = Placed::of(&Placement::Cpu, None).unwrap();
        assert_eq!(placed.force_cpu, crate::placement::CUDA_BUILT);
        assert!(placed.device.is_none() && placed.device_map.is_none());
        assert!(placed.paged.is_none() && placed.prefix_cache_n.is_none());
    }

    #[test]
    fn kv_geometry_comes_from_the_gguf_metadata_or_config_json() {
        use candle_core::quantized::gguf_file::{self, Value};
        let dir = tempfile::tempdir().unwrap();
        let mut file = std::fs::File::create(dir.path().join("m.gguf")).unwrap();
        let meta = [
            ("general.architecture", Value::String("qwen2".into())),
            ("qwen2.block_count", Value::U32(24)),
            ("qwen2.attention.head_count", Value::U32(14)),
            ("qwen2.attention.head_count_kv", Value::U32(2)),
            ("qwen2.embedding_length", Value::U32(896)),
            ("qwen2.context_length", Value::U32(32768)),
        ];
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut file, &meta, &[]).unwrap();
        drop(file);
        let gguf = WeightsKind::Gguf { dir: dir.path().into(), file: "m.gguf".into(), tokenizer: None };
        let qwen = KvGeometry { layers: 24, kv_heads: 2, head_dim: 64, context: 32768 };
        assert_eq!(kv_geometry(&gguf).unwrap(), qwen);
        assert_eq!(layer_count(&gguf).unwrap(), 24);

        // Gemma 3's multimodal layout, with a head size of its own.
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"text_config": {"num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 256, "hidden_size": 640, "max_position_embeddings": 32768}}"#,
        )
        .unwrap();
        let hf = WeightsKind::Hf { dir: dir.path().into(), multimodal: true, default_isq: Isq::None };
        assert_eq!(kv_geometry(&hf).unwrap(), KvGeometry { layers: 18, kv_heads: 1, head_dim: 256, context: 32768 });
        // A split needs only the layer count.
        std::fs::write(dir.path().join("config.json"), r#"{"num_hidden_layers": 18}"#).unwrap();
        assert_eq!(layer_count(&hf).unwrap(), 18);
        assert!(kv_geometry(&hf).unwrap_err().to_string().contains("num_attention_heads"));
    }
}
