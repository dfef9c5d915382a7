//! Where sollol keeps files on the user's machine.

use std::path::PathBuf;

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// Downloaded models: `$SOLLOL_CACHE`, else `$XDG_CACHE_HOME/sollol`, else `~/.cache/sollol`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SOLLOL_CACHE") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| home().map(|h| h.join(".cache"))).map(|d| d.join("sollol"))
}

/// Configuration (registry, user catalog, node certificates): `$XDG_CONFIG_HOME/sollol` or `~/.config/sollol`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SOLLOL_CONFIG") {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).or_else(|| home().map(|h| h.join(".config"))).map(|d| d.join("sollol"))
}
