//! Hot-swap, behind the admin key: load a Hugging Face folder (or GGUF file)
//! from under `admin.model_root` as a model id, point an alias at a loaded
//! model atomically, unload. A load that fails leaves what was serving in
//! place and says why; requests already running finish on the weights they
//! started with (see `state`).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actix_web::{web, HttpResponse};
pub use fusechat_admin_api::{
    AdminModels, AliasInfo, LoadModelRequest, LoadedModelInfo, ModelStatus, RemovedAlias, Serving, SetAliasRequest,
    UnloadedModel,
};

use crate::config::{ModelConfig, LINEAR_LAYERS};
use crate::engine::LoadedModel;
use crate::error::{ApiError, ErrorBody};
use crate::state::{AppState, ModelSlot};
use crate::validation::parse_body;

/// The folder or file `requested` names, if it lies under `root` once every
/// link is followed; 403 otherwise (`..`, an absolute path elsewhere, a link
/// leading out), 422 when it does not exist.
pub fn under_root(root: &Path, requested: &Path) -> Result<PathBuf, ApiError> {
    if requested
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(ApiError::forbidden(format!(
            "`{}`: `..` is not allowed in model paths",
            requested.display()
        )));
    }
    let root = root.canonicalize().map_err(|e| {
        ApiError::forbidden(format!(
            "the model root {} is not usable ({e}): fix admin.model_root in the server config",
            root.display()
        ))
    })?;
    let joined = if requested.is_absolute() {
        requested.to_path_buf()
    } else {
        root.join(requested)
    };
    let resolved = match joined.canonicalize() {
        Ok(p) => p,
        // Say "outside" before "missing" so the answer does not probe the disk.
        Err(_) if !joined.starts_with(&root) => {
            return Err(ApiError::forbidden(format!(
                "{} is outside the model root {}",
                requested.display(),
                root.display()
            )))
        }
        Err(e) => {
            return Err(ApiError::load_failed(format!(
                "{}: {e}",
                requested.display()
            )));
        }
    };
    if !resolved.starts_with(&root) {
        return Err(ApiError::forbidden(format!(
            "{} is outside the model root {} (links are followed)",
            requested.display(),
            root.display()
        )));
    }
    // The files the loader opens must stay inside too (a folder of links out is refused).
    if resolved.is_dir() {
        let entries = std::fs::read_dir(&resolved)
            .map_err(|e| ApiError::load_failed(format!("{}: {e}", requested.display())))?;
        for entry in entries.flatten() {
            let inside = entry
                .path()
                .canonicalize()
                .is_ok_and(|p| p.starts_with(&root));
            if !inside {
                return Err(ApiError::forbidden(format!(
                    "{} links outside the model root {}",
                    entry.path().display(),
                    root.display()
                )));
            }
        }
    }
    Ok(resolved)
}

/// Loads a model (replacing one with the same id only once the new one is ready).
#[utoipa::path(
    post,
    path = "/admin/models",
    tag = "admin",
    request_body = LoadModelRequest,
    responses(
        (status = 200, description = "Loaded (and the alias repointed, if given)", body = LoadedModelInfo),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 403, description = "Path outside `admin.model_root`, or no root configured", body = ErrorBody),
        (status = 409, description = "A load of this id is already running", body = ErrorBody),
        (status = 422, description = "The weights did not load (`model_load_failed`); the old model keeps serving", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn load_model(
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let request: LoadModelRequest = parse_body(&body)?;
    let id = request.id.trim().to_string();
    if id.is_empty() {
        return Err(ApiError::invalid_param("id", "`id` must not be empty"));
    }
    let count = |result: &str| {
        state
            .metrics
            .model_loads
            .with_label_values(&[&id, result])
            .inc()
    };
    let Some(root) = &state.config.admin.model_root else {
        count("forbidden");
        return Err(ApiError::forbidden(
            "loading models at runtime is off: set admin.model_root in the server config",
        ));
    };
    let path = under_root(root, &request.path).inspect_err(|e| {
        count(if e.status.as_u16() == 403 {
            "forbidden"
        } else {
            "failed"
        })
    })?;
    if let Some(alias) = &request.alias {
        // Checked before loading, so a bad alias never leaves new weights half-installed.
        if alias.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "alias",
                "an alias must not be empty",
            ));
        }
        if *alias == id || state.slots().iter().any(|(m, _)| m == alias) {
            return Err(ApiError::conflict(
                "name_is_model",
                format!("alias `{alias}` is a model id; an alias needs a name of its own"),
            ));
        }
    }
    let float_layers = request.float_layers.clone().unwrap_or_default();
    if let Some(unknown) = float_layers
        .iter()
        .find(|l| !LINEAR_LAYERS.contains(&l.as_str()))
    {
        return Err(ApiError::invalid_param(
            "float_layers",
            format!(
                "`float_layers` names `{unknown}`; the layers are {}",
                LINEAR_LAYERS.join(", ")
            ),
        ));
    }
    let _guard = state.begin_load(&id)?;
    let mut config = ModelConfig::from_path(&id, path.clone());
    config.max_seqs = request.max_seqs.unwrap_or(config.max_seqs).max(1);
    config.max_waiting = request.max_waiting.unwrap_or(config.max_waiting);
    config.prefill_chunk = request.prefill_chunk.unwrap_or(config.prefill_chunk);
    config.isq = request.isq;
    config.float_layers = float_layers;
    let replaced = state.slots().iter().any(|(m, _)| *m == id);
    let started = Instant::now();
    // The engine build is heavy, blocking work: run it on the main runtime,
    // not on this HTTP worker's thread.
    let (home, load_path) = (state.home.clone(), path.clone());
    let load = async move { LoadedModel::load(&config, &load_path, &home).await };
    let outcome = match &state.runtime {
        Some(handle) => handle
            .spawn(load)
            .await
            .map_err(|e| anyhow::anyhow!("the load task died: {e}"))
            .and_then(|r| r),
        None => load.await,
    };
    let model = match outcome {
        Ok(model) => model,
        Err(e) => {
            count("failed");
            tracing::warn!(model = %id, "admin load failed: {e:#}");
            return Err(ApiError::load_failed(format!(
                "cannot load `{id}` from {}: {e:#}. Nothing changed: what was serving still serves.",
                path.display()
            )));
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let fingerprint = model.fingerprint.clone();
    state.set(&id, ModelSlot::Ready(Arc::new(model)));
    count("ok");
    state
        .metrics
        .model_load_seconds
        .with_label_values(&[&id])
        .observe(seconds);
    tracing::info!(model = %id, path = %path.display(), %fingerprint, seconds, "loaded through the admin API");
    if let Some(alias) = &request.alias {
        state.set_alias(alias, &id)?;
    }
    Ok(HttpResponse::Ok().json(LoadedModelInfo {
        id,
        path: path.display().to_string(),
        fingerprint,
        load_seconds: seconds,
        replaced,
        alias: request.alias,
    }))
}

/// Unloads a model; running requests finish first. Refused while an alias points at it.
#[utoipa::path(
    delete,
    path = "/admin/models/{id}",
    tag = "admin",
    params(("id" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "Unloaded", body = UnloadedModel),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "An alias points at it (`model_in_use`)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn unload_model(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.unload(&id)?;
    Ok(HttpResponse::Ok().json(UnloadedModel { id: id.into_inner(), unloaded: true }))
}

/// Points an alias at a loaded model, atomically: the next request that
/// names the alias runs on the new model.
#[utoipa::path(
    put,
    path = "/admin/aliases/{alias}",
    tag = "admin",
    params(("alias" = String, Path, description = "The name clients use")),
    request_body = SetAliasRequest,
    responses(
        (status = 200, body = AliasInfo),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "The alias is a model id", body = ErrorBody),
        (status = 503, description = "The model is not ready", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn set_alias(
    state: web::Data<AppState>,
    alias: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let request: SetAliasRequest = parse_body(&body)?;
    let (previous, fingerprint) = state.set_alias(&alias, &request.model)?;
    tracing::info!(%alias, model = %request.model, ?previous, "alias repointed");
    Ok(HttpResponse::Ok().json(AliasInfo {
        alias: alias.into_inner(),
        model: request.model,
        fingerprint,
        previous,
    }))
}

/// Removes an alias (the model stays loaded).
#[utoipa::path(
    delete,
    path = "/admin/aliases/{alias}",
    tag = "admin",
    params(("alias" = String, Path, description = "The alias")),
    responses(
        (status = 200, description = "Removed (the model stays loaded)", body = RemovedAlias),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn remove_alias(
    state: web::Data<AppState>,
    alias: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let model = state.remove_alias(&alias)?;
    Ok(HttpResponse::Ok().json(RemovedAlias { alias: alias.into_inner(), model, removed: true }))
}

/// Every model with its state and weights, and every alias.
#[utoipa::path(
    get,
    path = "/admin/models",
    tag = "admin",
    responses(
        (status = 200, description = "Every model with its state, and every alias", body = AdminModels),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let models = state
        .slots()
        .into_iter()
        .map(|(id, slot)| ModelStatus {
            id,
            state: slot.describe(),
            serving: match slot {
                ModelSlot::Ready(m) => Some(Serving {
                    fingerprint: m.fingerprint.clone(),
                    max_model_len: m.max_seq_len,
                    max_seqs: m.admission.max_seqs(),
                    running: m.admission.running(),
                    waiting: m.admission.waiting(),
                }),
                _ => None,
            },
        })
        .collect();
    HttpResponse::Ok().json(AdminModels { models, aliases: state.aliases().into_iter().collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_under_the_root_are_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("fused/final")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("fused"), root.join("inner-link")).unwrap();

        let secret = outside.join("model.safetensors");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::create_dir_all(root.join("linked")).unwrap();
        std::os::unix::fs::symlink(&secret, root.join("linked/model.safetensors")).unwrap();
        let err = under_root(&root, Path::new("linked")).unwrap_err();
        assert_eq!(err.status.as_u16(), 403, "a file linking out: {err}");

        let ok = under_root(&root, Path::new("fused/final")).unwrap();
        assert_eq!(ok, root.canonicalize().unwrap().join("fused/final"));
        assert!(
            under_root(&root, &root.join("fused")).is_ok(),
            "absolute inside"
        );
        assert!(
            under_root(&root, Path::new("inner-link/final")).is_ok(),
            "a link that stays inside"
        );
        for bad in [
            Path::new("fused/../../outside"),
            Path::new("escape"),
            outside.as_path(),
            Path::new("/etc"),
        ] {
            let err = under_root(&root, bad).unwrap_err();
            assert_eq!(err.status.as_u16(), 403, "{bad:?}: {err}");
        }
        let err = under_root(&root, Path::new("missing")).unwrap_err();
        assert_eq!(err.status.as_u16(), 422, "{err}");
        let err = under_root(&root, &outside.join("missing")).unwrap_err();
        assert_eq!(err.status.as_u16(), 403, "{err}");
    }
}
