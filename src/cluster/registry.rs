//! The node registry: known nodes and clusters, persisted as TOML in the
//! config directory (`~/.config/sollol/registry.toml`, or `$SOLLOL_REGISTRY`).
//! Plain data and file I/O; liveness lives in `health`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::partition::{Assignment, Strategy};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    /// `HOST:PORT` of the node's QUIC listener.
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterEntry {
    pub name: String,
    /// The model source the nodes loaded.
    pub model: String,
    pub digest: String,
    pub strategy: Strategy,
    /// Stages in chain order.
    pub stages: Vec<Assignment>,
}

impl ClusterEntry {
    pub fn node_names(&self) -> Vec<&str> {
        self.stages.iter().map(|s| s.node.as_str()).collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub clusters: Vec<ClusterEntry>,
    /// Where it is saved; not part of the file.
    #[serde(skip)]
    path: Option<PathBuf>,
}

/// `$SOLLOL_REGISTRY`, else `registry.toml` in the config directory.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SOLLOL_REGISTRY") {
        return Some(PathBuf::from(p));
    }
    crate::paths::config_dir().map(|d| d.join("registry.toml"))
}

impl Registry {
    /// Reads the registry at `path`; a missing file is an empty registry.
    pub fn load(path: &Path) -> Result<Self> {
        let mut reg: Registry = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::InvalidRequest(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        reg.path = Some(path.to_path_buf());
        Ok(reg)
    }

    pub fn load_default() -> Result<Self> {
        let path = default_path().ok_or_else(|| Error::InvalidRequest("no config directory (set HOME or SOLLOL_REGISTRY)".into()))?;
        Self::load(&path)
    }

    /// Writes the file atomically (a rename), so a crash never leaves half a registry.
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        let text = toml::to_string_pretty(self).map_err(|e| Error::InvalidRequest(format!("registry: {e}")))?;
        let tmp = path.with_extension(format!("toml.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    }

    /// Adds a node; a name or address already present is an error.
    pub fn add_node(&mut self, name: &str, addr: &str) -> Result<()> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(Error::InvalidRequest(format!("'{name}' is not a node name (no spaces, not empty)")));
        }
        if let Some(n) = self.nodes.iter().find(|n| n.name == name || n.addr == addr) {
            return Err(Error::InvalidRequest(format!("node {} ({}) is already registered", n.name, n.addr)));
        }
        self.nodes.push(NodeEntry { name: name.to_string(), addr: addr.to_string() });
        Ok(())
    }

    /// Removes a node by name or address; clusters that used it are removed too.
    pub fn remove_node(&mut self, name_or_addr: &str) -> Result<NodeEntry> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name_or_addr || n.addr == name_or_addr)
            .ok_or_else(|| Error::InvalidRequest(format!("no node named '{name_or_addr}'")))?;
        let node = self.nodes.remove(i);
        self.clusters.retain(|c| !c.node_names().contains(&node.name.as_str()));
        Ok(node)
    }

    pub fn node(&self, name_or_addr: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name_or_addr || n.addr == name_or_addr)
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// Adds or replaces a cluster by name.
    pub fn put_cluster(&mut self, cluster: ClusterEntry) {
        self.clusters.retain(|c| c.name != cluster.name);
        self.clusters.push(cluster);
    }

    pub fn remove_cluster(&mut self, name: &str) -> Result<ClusterEntry> {
        let i =
            self.clusters.iter().position(|c| c.name == name).ok_or_else(|| Error::InvalidRequest(format!("no cluster named '{name}'")))?;
        Ok(self.clusters.remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_and_clusters_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.toml");
        let mut reg = Registry::load(&path).unwrap();
        reg.add_node("gpu-1", "10.0.0.1:7070").unwrap();
        reg.add_node("gpu-2", "10.0.0.2:7070").unwrap();
        assert!(reg.add_node("gpu-1", "10.0.0.3:7070").is_err());
        assert!(reg.add_node("other", "10.0.0.2:7070").is_err());
        reg.put_cluster(ClusterEntry {
            name: "c".into(),
            model: "llama2:70b".into(),
            digest: "d".into(),
            strategy: Strategy::Even,
            stages: vec![
                Assignment { node: "gpu-1".into(), start: 0, end: 40, bytes: 1 },
                Assignment { node: "gpu-2".into(), start: 40, end: 80, bytes: 1 },
            ],
        });
        reg.save().unwrap();
        let back = Registry::load(&path).unwrap();
        assert_eq!(back, reg);
        let mut back = back;
        back.remove_node("gpu-2").unwrap();
        assert!(back.clusters.is_empty(), "a cluster without its node is gone");
        assert!(back.remove_node("nope").is_err());
    }
}
