//! What the head knows of a model when planning: exact per-block bytes from
//! the model's own header when the file is here, else the catalog's numbers.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::catalog::Catalog;
use crate::model::{source, LayerBytes, ModelFile};

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The source as the user named it (what nodes are asked to load).
    pub spec: String,
    pub name: String,
    pub layer_bytes: LayerBytes,
    /// Identifies the exact file; `None` when known from the catalog only.
    pub digest: Option<String>,
    /// "header" or "catalog".
    pub from: &'static str,
}

impl ModelInfo {
    pub fn n_layers(&self) -> usize {
        self.layer_bytes.blocks.len()
    }

    pub fn total_bytes(&self) -> u64 {
        self.layer_bytes.total()
    }
}

/// The model's header if it resolves locally, else the catalog entry.
/// Fetching is not attempted for catalog-only models (a plan for a 70B model
/// must print on any machine).
pub fn model_info(spec: &str) -> Result<ModelInfo> {
    let catalog = Catalog::load()?;
    let entry = catalog.find(spec);
    let local = match entry {
        // A catalog model with a fetch source is resolved (and fetched) like any other.
        Some(e) if e.fetch.is_none() => None,
        _ => Some(source::resolve(spec)),
    };
    match local {
        Some(Ok(resolved)) => {
            let file = ModelFile::open(&resolved.path)?;
            // Nodes resolve the model themselves: a local path must be absolute for them.
            let spec = match std::fs::canonicalize(spec) {
                Ok(p) => p.display().to_string(),
                Err(_) => spec.to_string(),
            };
            Ok(ModelInfo { spec, name: resolved.name, layer_bytes: file.layer_bytes()?, digest: Some(file.digest()?), from: "header" })
        }
        Some(Err(e)) if entry.is_none() => Err(e),
        _ => {
            let e = entry.ok_or_else(|| Error::UnknownModel(spec.to_string()))?;
            let per_layer = (e.memory_per_layer_mb * 1e6) as u64;
            // Embedding and head are folded into the per-layer figure in the catalog's numbers.
            let layer_bytes = LayerBytes::dense(vec![per_layer; e.total_layers], 0, 0, false);
            Ok(ModelInfo { spec: spec.to_string(), name: e.name.clone(), layer_bytes, digest: None, from: "catalog" })
        }
    }
}
