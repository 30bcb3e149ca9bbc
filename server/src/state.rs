//! What the HTTP handlers share: configuration, the models by id and the
//! aliases pointing at them, metrics.
//!
//! Models and aliases live in one table behind one lock, so a request resolves
//! `alias -> model -> weights` in one consistent read and a swap (repointing an
//! alias) is a single write. A request holds an `Arc` of the model it resolved:
//! it finishes on those weights even if the alias moves or the model is
//! unloaded meanwhile; the old engine is dropped when its last request ends.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use crate::config::ServerConfig;
use crate::engine::LoadedModel;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Where a configured model stands.
#[derive(Clone)]
pub enum ModelSlot {
    Loading,
    Ready(Arc<LoadedModel>),
    Failed(String),
}

impl ModelSlot {
    pub fn describe(&self) -> String {
        match self {
            ModelSlot::Loading => "loading".into(),
            ModelSlot::Ready(_) => "ready".into(),
            ModelSlot::Failed(why) => format!("failed: {why}"),
        }
    }
}

#[derive(Default)]
struct Table {
    models: BTreeMap<String, ModelSlot>,
    /// alias -> model id
    aliases: BTreeMap<String, String>,
}

pub struct AppState {
    pub config: ServerConfig,
    /// Where fetched and imported models live (`FUSECHAT_HOME`).
    pub home: PathBuf,
    pub metrics: Arc<Metrics>,
    table: RwLock<Table>,
    /// Model ids with an admin load in progress.
    loading: Mutex<HashSet<String>>,
    /// The main runtime, where admin loads run (off the HTTP workers).
    pub runtime: Option<tokio::runtime::Handle>,
    /// Running API requests, and whether the server is shutting down.
    pub drain: Arc<crate::drain::Drain>,
}

/// Marks an admin load of one id as running; dropping it clears the mark.
pub struct LoadGuard<'a> {
    state: &'a AppState,
    id: String,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.state
            .loading
            .lock()
            .expect("loading lock")
            .remove(&self.id);
    }
}

impl AppState {
    pub fn new(config: ServerConfig, home: PathBuf) -> Self {
        let metrics = Arc::new(Metrics::new());
        let models = config
            .models
            .iter()
            .map(|m| {
                metrics.register_model(&m.id);
                (m.id.clone(), ModelSlot::Loading)
            })
            .collect();
        let aliases = config.aliases.clone();
        Self {
            config,
            home,
            metrics,
            table: RwLock::new(Table { models, aliases }),
            loading: Mutex::new(HashSet::new()),
            runtime: None,
            drain: Arc::default(),
        }
    }

    pub fn with_runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    pub fn set(&self, id: &str, slot: ModelSlot) {
        self.metrics.register_model(id);
        self.table
            .write()
            .expect("model table lock")
            .models
            .insert(id.to_string(), slot);
        self.refresh_alias_info();
    }

    /// The model serving `name` (a model id or an alias): 404 when nobody
    /// serves it, 503 while it loads.
    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
        let table = self.table.read().expect("model table lock");
        let id = table.aliases.get(name).map(String::as_str).unwrap_or(name);
        match table.models.get(id) {
            None => Err(ApiError::model_not_found(name)),
            Some(ModelSlot::Ready(model)) => Ok(model.clone()),
            Some(slot) => Err(ApiError::model_not_ready(name, &slot.describe())),
        }
    }

    /// The named model, or with no name the one model this server serves
    /// (the tokenizer routes of vLLM, which serves one, take no model; a
    /// harness built for them sends none).
    pub fn model_or_only(&self, name: Option<&str>) -> Result<Arc<LoadedModel>, ApiError> {
        if let Some(name) = name {
            return self.model(name);
        }
        let only = {
            let table = self.table.read().expect("model table lock");
            match table.models.len() {
                1 => table.models.keys().next().cloned(),
                _ => None,
            }
        };
        match only {
            Some(id) => self.model(&id),
            None => Err(ApiError::invalid_param(
                "model",
                "This server serves several models: name one in `model`.",
            )),
        }
    }

    pub fn slots(&self) -> Vec<(String, ModelSlot)> {
        let table = self.table.read().expect("model table lock");
        table
            .models
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// (alias, model id) pairs.
    pub fn aliases(&self) -> Vec<(String, String)> {
        let table = self.table.read().expect("model table lock");
        table
            .aliases
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn all_ready(&self) -> bool {
        self.table
            .read()
            .expect("model table lock")
            .models
            .values()
            .all(|s| matches!(s, ModelSlot::Ready(_)))
    }

    /// Claims `id` for an admin load; 409 when one is already running.
    pub fn begin_load(&self, id: &str) -> Result<LoadGuard<'_>, ApiError> {
        {
            let table = self.table.read().expect("model table lock");
            if table.aliases.contains_key(id) {
                return Err(ApiError::conflict(
                    "name_is_alias",
                    format!("`{id}` is an alias; load the weights under a model id and point the alias at it"),
                ));
            }
            if matches!(table.models.get(id), Some(ModelSlot::Loading)) {
                return Err(ApiError::conflict(
                    "load_in_progress",
                    format!("`{id}` is still loading from the server config; try again when /ready says so"),
                ));
            }
        }
        let mut loading = self.loading.lock().expect("loading lock");
        if !loading.insert(id.to_string()) {
            return Err(ApiError::conflict(
                "load_in_progress",
                format!("a load of `{id}` is already running"),
            ));
        }
        Ok(LoadGuard {
            state: self,
            id: id.to_string(),
        })
    }

    /// Points `alias` at the ready model `model`, atomically; returns the
    /// model it pointed at before.
    pub fn set_alias(
        &self,
        alias: &str,
        model: &str,
    ) -> Result<(Option<String>, String), ApiError> {
        if alias.trim().is_empty() {
            return Err(ApiError::invalid_param(
                "alias",
                "an alias must not be empty",
            ));
        }
        let (previous, fingerprint) = {
            let mut table = self.table.write().expect("model table lock");
            if table.models.contains_key(alias) {
                return Err(ApiError::conflict(
                    "name_is_model",
                    format!("`{alias}` is a model id; an alias needs a name of its own"),
                ));
            }
            let fingerprint = match table.models.get(model) {
                Some(ModelSlot::Ready(m)) => m.fingerprint.clone(),
                Some(slot) => return Err(ApiError::model_not_ready(model, &slot.describe())),
                None => return Err(ApiError::model_not_found(model)),
            };
            (
                table.aliases.insert(alias.to_string(), model.to_string()),
                fingerprint,
            )
        };
        self.metrics.alias_swaps.with_label_values(&[alias]).inc();
        self.refresh_alias_info();
        Ok((previous, fingerprint))
    }

    pub fn remove_alias(&self, alias: &str) -> Result<String, ApiError> {
        let removed = self
            .table
            .write()
            .expect("model table lock")
            .aliases
            .remove(alias)
            .ok_or_else(|| ApiError::model_not_found(alias))?;
        self.refresh_alias_info();
        Ok(removed)
    }

    /// Removes a model; requests running on it finish first (they hold it).
    pub fn unload(&self, id: &str) -> Result<(), ApiError> {
        if self.loading.lock().expect("loading lock").contains(id) {
            return Err(ApiError::conflict(
                "load_in_progress",
                format!("a load of `{id}` is running; unload it after"),
            ));
        }
        {
            let mut table = self.table.write().expect("model table lock");
            match table.models.get(id) {
                None => return Err(ApiError::model_not_found(id)),
                Some(ModelSlot::Loading) => {
                    return Err(ApiError::conflict(
                        "load_in_progress",
                        format!(
                            "`{id}` is still loading from the server config; unload it once loaded"
                        ),
                    ))
                }
                Some(_) => {}
            }
            let pointing: Vec<&String> = table
                .aliases
                .iter()
                .filter(|(_, t)| *t == id)
                .map(|(a, _)| a)
                .collect();
            if !pointing.is_empty() {
                return Err(ApiError::conflict(
                    "model_in_use",
                    format!(
                        "alias {} points at `{id}`; repoint or remove it first",
                        pointing
                            .iter()
                            .map(|a| format!("`{a}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            table.models.remove(id);
        }
        self.metrics.model_unloads.with_label_values(&[id]).inc();
        Ok(())
    }

    /// `fusechat_alias_info{alias, model, fingerprint} 1` for each alias.
    fn refresh_alias_info(&self) {
        // Under the write lock: two refreshes never interleave their reset and sets.
        let table = self.table.write().expect("model table lock");
        self.metrics.alias_info.reset();
        for (alias, id) in &table.aliases {
            let fingerprint = match table.models.get(id) {
                Some(ModelSlot::Ready(m)) => m.fingerprint.as_str(),
                _ => "",
            };
            self.metrics
                .alias_info
                .with_label_values(&[alias, id, fingerprint])
                .set(1);
        }
    }

    /// Copies the queue state of every model into the gauges (at scrape time).
    pub fn refresh_gauges(&self) {
        for (id, slot) in self.slots() {
            if let ModelSlot::Ready(model) = slot {
                self.metrics
                    .requests_running
                    .with_label_values(&[&id])
                    .set(model.admission.running() as i64);
                self.metrics
                    .requests_waiting
                    .with_label_values(&[&id])
                    .set(model.admission.waiting() as i64);
            }
        }
    }
}
