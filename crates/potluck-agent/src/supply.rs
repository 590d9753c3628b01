//! Model supply chain: which file a model is, whether its format is safe to load, and
//! its SHA-256 (the identity announced to the hub).
//!
//! The file comes from the `[[models]] file` setting, or llama.cpp's `GET /props`
//! (`model_path`), or ollama's `POST /api/show` (`modelfile`'s `FROM
//! .../blobs/sha256-<hex>`: the blob's name is its hash, so nothing is hashed).
//!
//! Only GGUF (magic `GGUF`) and safetensors (an 8-byte little-endian header length,
//! then a JSON object) are accepted. Pickle-based formats (`.bin`, `.pt`, `.pth`, zip)
//! can run code when loaded; such a model is refused and not offered.
//!
//! Hashes are cached by (path, size, mtime) in `model-hashes.json` in the state
//! directory, so a file is read once; hashing runs on a blocking thread.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::UNIX_EPOCH;

use potluck_protocol::tunnel::ModelHash;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest safetensors header accepted (the format's own limit is 100 MB).
pub const MAX_SAFETENSORS_HEADER: u64 = 100 * 1024 * 1024;
/// Cache file name in the state directory.
pub const CACHE_FILE: &str = "model-hashes.json";
/// Read buffer for hashing.
const HASH_BUF: usize = 1024 * 1024;

/// A model file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// llama.cpp's GGUF.
    Gguf,
    /// Hugging Face safetensors.
    Safetensors,
}

/// Why a model file is not offered.
#[derive(Debug, thiserror::Error)]
pub enum SupplyError {
    /// Not GGUF or safetensors.
    #[error("{0} is not a GGUF or safetensors file (pickle-based formats such as .bin, .pt or zip can run code when loaded); not offered")]
    UnsafeFormat(PathBuf),
    /// Cannot be read.
    #[error("cannot read model file {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Check the format by the file's first bytes.
pub fn sniff(path: &Path) -> Result<Format, SupplyError> {
    let io = |e| SupplyError::Io(path.to_owned(), e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match f.read(&mut head[got..]).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    if got >= 4 && &head[..4] == b"GGUF" {
        return Ok(Format::Gguf);
    }
    if got == 8 {
        let n = u64::from_le_bytes(head);
        if (2..=MAX_SAFETENSORS_HEADER).contains(&n) {
            let mut header = Vec::new();
            (&mut f).take(n).read_to_end(&mut header).map_err(io)?;
            if header.len() as u64 == n
                && header.first() == Some(&b'{')
                && matches!(
                    serde_json::from_slice::<serde_json::Value>(&header),
                    Ok(serde_json::Value::Object(_))
                )
            {
                return Ok(Format::Safetensors);
            }
        }
    }
    Err(SupplyError::UnsafeFormat(path.to_owned()))
}

/// SHA-256 of a file.
pub fn hash_file(path: &Path) -> Result<ModelHash, SupplyError> {
    hash_file_unless(path, &AtomicBool::new(false))
}

/// [`hash_file`], given up (an `Interrupted` error) as soon as `stop` is set: hashing a
/// model of tens of gigabytes takes minutes, and the agent's shutdown must not wait for it.
pub fn hash_file_unless(path: &Path, stop: &AtomicBool) -> Result<ModelHash, SupplyError> {
    let io = |e| SupplyError::Io(path.to_owned(), e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the agent is stopping",
            )));
        }
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(ModelHash::from_digest(&h.finalize().into()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheEntry {
    size: u64,
    mtime_ns: u128,
    sha256: ModelHash,
    format: Format,
}

/// The hash cache, shared; persisted in the state directory when there is one.
#[derive(Debug, Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    entries: Mutex<HashMap<PathBuf, CacheEntry>>,
    hashed: AtomicU64,
    /// Set when the agent stops: hashing in progress gives up.
    stopping: AtomicBool,
}

fn stamp(path: &Path) -> std::io::Result<(u64, u128)> {
    let m = std::fs::metadata(path)?;
    let mtime = m
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok((m.len(), mtime))
}

impl HashCache {
    /// Load the cache from `state_dir` (or an in-memory one without).
    pub fn load(state_dir: Option<&Path>) -> Self {
        let file = state_dir.map(|d| d.join(CACHE_FILE));
        let entries = file
            .as_deref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            file,
            entries: Mutex::new(entries),
            hashed: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    /// Files actually read and hashed by this cache (not served from the cache).
    pub fn files_hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Check the format and hash `path`, from the cache if its size and mtime are
    /// unchanged. Blocking: call from a blocking thread.
    pub fn identify_blocking(&self, path: &Path) -> Result<(ModelHash, Format), SupplyError> {
        let io = |e| SupplyError::Io(path.to_owned(), e);
        let (size, mtime_ns) = stamp(path).map_err(io)?;
        if let Some(e) = self.entries.lock().get(path) {
            if e.size == size && e.mtime_ns == mtime_ns {
                return Ok((e.sha256.clone(), e.format));
            }
        }
        let format = sniff(path)?;
        tracing::info!(file = %path.display(), bytes = size, "hashing model file (once; cached afterwards)");
        let sha256 = hash_file_unless(path, &self.stopping)?;
        self.hashed.fetch_add(1, Ordering::Relaxed);
        let snapshot = {
            let mut m = self.entries.lock();
            m.insert(
                path.to_owned(),
                CacheEntry {
                    size,
                    mtime_ns,
                    sha256: sha256.clone(),
                    format,
                },
            );
            serde_json::to_vec(&*m).unwrap_or_default()
        };
        if let Some(f) = &self.file {
            let tmp = f.with_extension("json.tmp");
            if std::fs::write(&tmp, &snapshot)
                .and_then(|()| std::fs::rename(&tmp, f))
                .is_err()
            {
                tracing::warn!(file = %f.display(), "cannot save the model hash cache");
            }
        }
        Ok((sha256, format))
    }

    /// Give up any hashing in progress, and all later hashing: the agent is stopping.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// [`HashCache::identify_blocking`] on a blocking thread.
    pub async fn identify(
        self: &Arc<Self>,
        path: PathBuf,
    ) -> Result<(ModelHash, Format), SupplyError> {
        let me = Arc::clone(self);
        let p = path.clone();
        tokio::task::spawn_blocking(move || me.identify_blocking(&p))
            .await
            .unwrap_or_else(|_| {
                Err(SupplyError::Io(
                    path,
                    std::io::Error::other("hashing task failed"),
                ))
            })
    }
}

/// The blob hash in an ollama `modelfile` (`FROM /.../blobs/sha256-<hex>`), and the path.
pub fn ollama_blob(modelfile: &str) -> Option<(ModelHash, PathBuf)> {
    modelfile.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("FROM ")?.trim();
        let name = Path::new(rest).file_name()?.to_str()?;
        let hex = name
            .strip_prefix("sha256-")
            .or_else(|| name.strip_prefix("sha256:"))?;
        Some((ModelHash::parse(hex).ok()?, PathBuf::from(rest)))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hashing_gives_up_once_the_agent_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, b"GGUF\x03\x00\x00\x00 some weights").unwrap();
        let cache = HashCache::load(None);
        assert!(cache.identify_blocking(&path).is_ok());
        std::fs::write(&path, b"GGUF\x03\x00\x00\x00 other weights, changed").unwrap();
        cache.stop();
        match cache.identify_blocking(&path) {
            Err(SupplyError::Io(_, e)) => assert_eq!(e.kind(), std::io::ErrorKind::Interrupted),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ollama_modelfile() {
        let h = "a".repeat(64);
        let mf = format!(
            "# Modelfile\nFROM /usr/share/ollama/.ollama/models/blobs/sha256-{h}\nTEMPLATE x\n"
        );
        let (hash, path) = ollama_blob(&mf).unwrap();
        assert_eq!(hash.as_str(), h);
        assert!(path.ends_with(format!("sha256-{h}")));
        assert!(ollama_blob("FROM llama3\n").is_none());
    }
}
