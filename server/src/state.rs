//! What the HTTP handlers share: configuration, the models by id, metrics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

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

pub struct AppState {
    pub config: ServerConfig,
    /// Where fetched and imported models live (`FUSECHAT_HOME`).
    pub home: PathBuf,
    pub metrics: Arc<Metrics>,
    models: RwLock<BTreeMap<String, ModelSlot>>,
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
        Self {
            config,
            home,
            metrics,
            models: RwLock::new(models),
        }
    }

    pub fn set(&self, id: &str, slot: ModelSlot) {
        self.models
            .write()
            .expect("model table lock")
            .insert(id.to_string(), slot);
    }

    /// The model serving `id`: 404 when nobody serves it, 503 while it loads.
    pub fn model(&self, id: &str) -> Result<Arc<LoadedModel>, ApiError> {
        match self.models.read().expect("model table lock").get(id) {
            None => Err(ApiError::model_not_found(id)),
            Some(ModelSlot::Ready(model)) => Ok(model.clone()),
            Some(slot) => Err(ApiError::model_not_ready(id, &slot.describe())),
        }
    }

    pub fn slots(&self) -> Vec<(String, ModelSlot)> {
        self.models
            .read()
            .expect("model table lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn all_ready(&self) -> bool {
        self.models
            .read()
            .expect("model table lock")
            .values()
            .all(|s| matches!(s, ModelSlot::Ready(_)))
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
