//! The admin routes' bodies, shared by the server that answers them
//! (`server/src/admin.rs`) and the clients that call them (`fusechat fuse`
//! hot-swaps its fused model through them). Each type is the whole contract
//! of one body: the server reads and writes exactly these, and so do the
//! clients, with no JSON indexed by hand on either side. Errors, on these
//! routes as on every other, are an [`ErrorBody`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The linear layers of the architectures fusechat serves, as
/// `float_layers` names them.
pub const LINEAR_LAYERS: &[&str] = &[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
];

/// In-situ quantization of float weights at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isq {
    /// Keep the float weights.
    None,
    /// 8-bit blocks: near-lossless, SIMD kernels on CPU.
    Q8_0,
    /// 4-bit blocks with a scale and a minimum (GGML Q4_1): half the bytes
    /// of q8_0. SmolLM2's GGUF is Q4_1, so its imported weights quantize
    /// back to (nearly) the same values.
    Q4_1,
    /// 4-bit k-quant: half the memory of q8_0, a little less accurate.
    Q4k,
}

/// `POST /admin/models`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadModelRequest {
    /// The model id clients (or an alias) will use. Loading an id that is
    /// already served replaces it once the new weights are ready.
    pub id: String,
    /// A Hugging Face folder or GGUF file, absolute or relative to `admin.model_root`.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Point this alias at the model once it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seqs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_waiting: Option<usize>,
    /// Prompt tokens prefilled per engine step (default 256; 0: whole prompts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_chunk: Option<usize>,
    /// In-situ quantization: `none` (default), `q8_0`, `q4_1`, `q4k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isq: Option<Isq>,
    /// With `isq`: linear layers (q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj, lm_head) that keep their float weights, as in the
    /// server config's `float_layers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub float_layers: Option<Vec<String>>,
}

impl LoadModelRequest {
    /// A load of `path` as `id`, every option at the server's default.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            id: id.into(),
            path: path.into(),
            alias: None,
            max_seqs: None,
            max_waiting: None,
            prefill_chunk: None,
            isq: None,
            float_layers: None,
        }
    }
}

/// The answer to `POST /admin/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoadedModelInfo {
    pub id: String,
    pub path: String,
    /// Hash of the weights; responses from this model carry it as `system_fingerprint`.
    pub fingerprint: String,
    pub load_seconds: f64,
    /// Whether an earlier model with this id was replaced.
    pub replaced: bool,
    pub alias: Option<String>,
}

/// `PUT /admin/aliases/{alias}`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAliasRequest {
    pub model: String,
}

/// The answer to `PUT /admin/aliases/{alias}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AliasInfo {
    pub alias: String,
    pub model: String,
    pub fingerprint: String,
    /// The model the alias pointed at before, if any.
    pub previous: Option<String>,
}

/// The answer to `DELETE /admin/models/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UnloadedModel {
    pub id: String,
    pub unloaded: bool,
}

/// The answer to `DELETE /admin/aliases/{alias}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemovedAlias {
    pub alias: String,
    /// The model it pointed at (still loaded).
    pub model: String,
    pub removed: bool,
}

/// The answer to `GET /admin/models`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AdminModels {
    pub models: Vec<ModelStatus>,
    /// Alias to model id.
    pub aliases: BTreeMap<String, String>,
}

impl AdminModels {
    /// The model `id`, if it is loaded and ready.
    pub fn ready(&self, id: &str) -> Option<&Serving> {
        self.models
            .iter()
            .find(|m| m.id == id && m.state == ModelStatus::READY)
            .and_then(|m| m.serving.as_ref())
    }

    /// The model id `alias` points at.
    pub fn alias(&self, alias: &str) -> Option<&str> {
        self.aliases.get(alias).map(String::as_str)
    }
}

/// One configured or loaded model.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelStatus {
    pub id: String,
    /// `ready`, `loading`, or `failed: ` and why.
    pub state: String,
    /// What a ready model serves with, beside `id` and `state`:
    /// `fingerprint`, `max_model_len`, `max_seqs`, `running`, `waiting`
    /// (see `Serving`); absent otherwise.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub serving: Option<Serving>,
}

impl ModelStatus {
    pub const READY: &'static str = "ready";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Serving {
    /// Hash of the weights (`system_fingerprint`).
    pub fingerprint: String,
    /// The context, in tokens.
    pub max_model_len: usize,
    pub max_seqs: usize,
    pub running: usize,
    pub waiting: usize,
}

/// The body of every error answer, in OpenAI's shape:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_request_sends_only_what_is_set_and_reads_back_the_same() {
        let mut req = LoadModelRequest::new("fused", "/runs/x/fused");
        req.isq = Some(Isq::Q8_0);
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json, serde_json::json!({"id": "fused", "path": "/runs/x/fused", "isq": "q8_0"}));
        let back: LoadModelRequest = serde_json::from_value(json).unwrap();
        assert_eq!((back.id, back.isq, back.alias), ("fused".to_string(), Some(Isq::Q8_0), None));
        assert!(serde_json::from_value::<LoadModelRequest>(serde_json::json!({"id": "a", "path": "b", "isqq": "q8_0"})).is_err());
    }

    #[test]
    fn a_listing_tells_ready_models_from_others() {
        let listing: AdminModels = serde_json::from_value(serde_json::json!({
            "models": [
                {"id": "a", "state": "ready", "fingerprint": "fp", "max_model_len": 8192, "max_seqs": 4, "running": 1, "waiting": 0},
                {"id": "b", "state": "loading"},
                {"id": "c", "state": "failed: no such file"},
            ],
            "aliases": {"fused": "a"},
        }))
        .unwrap();
        assert_eq!(listing.ready("a").map(|s| s.fingerprint.as_str()), Some("fp"));
        assert!(listing.ready("b").is_none() && listing.ready("c").is_none() && listing.ready("d").is_none());
        assert_eq!(listing.alias("fused"), Some("a"));
        let loading = serde_json::to_value(&listing.models[1]).unwrap();
        assert_eq!(loading, serde_json::json!({"id": "b", "state": "loading"}));
    }
}
