//! The layer and image cache on disk.
//!
//! ```text
//! ROOT/layers/<digest>/{tree/, layer.json, build.log}   published layers (immutable)
//! ROOT/images/<id>/{rootfs.ext4, rootfs.qcow2, rootfs.tar.gz, image.json}
//! ROOT/staging/<pid>-<n>/                               work in progress, never read as cache
//! ROOT/locks/<digest>.lock                              one builder per layer (flock)
//! ROOT/gc.lock                                          builds share it, gc takes it alone
//! ```
//!
//! Publishing is one `rename(2)` of a finished staging directory to `layers/<digest>` (or
//! `images/<id>`), after its record file was written and synced: a directory under
//! `layers/` or `images/` is complete by construction, and a build that fails or is killed
//! leaves only a staging directory, which the next run removes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::{LayerDigest, LayerKind};
use crate::error::BuildError;
use crate::mounts;

/// What a published layer is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer's cache key.
    pub digest: LayerDigest,
    /// The layer below, if any.
    pub parent: Option<LayerDigest>,
    /// Level.
    pub kind: LayerKind,
    /// Backend (tool and its fixed parameters).
    pub backend: String,
    /// Repository id → SHA-256 of its metadata.
    pub repositories: Vec<(String, String)>,
    /// Requested packages and their pinned versions (empty: pinned by the repository state).
    pub packages: Vec<(String, String)>,
    /// Configuration files (path, content) applied by the layer.
    pub config_files: Vec<(String, String)>,
    /// Every package installed in the image once this layer is applied: name, version, arch.
    pub installed: Vec<(String, String, String)>,
    /// Bytes the layer adds (its own files).
    pub size_bytes: u64,
    /// Seconds the build took.
    pub build_seconds: f64,
    /// Unix time of the build.
    pub built_at: i64,
}

/// One exported artefact of an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artefact {
    /// `ext4`, `qcow2` or `tar.gz`.
    pub format: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// What a published image is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image's digest (of its top layer and the artefact format).
    pub digest: String,
    /// Layers bottom (core) to top.
    pub layers: Vec<LayerDigest>,
    /// Release name.
    pub release: String,
    /// Platform label.
    pub platform: String,
    /// Node type.
    pub node_type: String,
    /// Patch id and revision, if a patch layer is on top.
    pub patch: Option<(u64, u32)>,
    /// Exported files.
    pub artefacts: Vec<Artefact>,
    /// Seconds spent exporting.
    pub export_seconds: f64,
    /// Unix time of the export.
    pub built_at: i64,
}

impl ImageRecord {
    /// The ext4 root filesystem image.
    pub fn ext4(&self) -> Option<&Artefact> {
        self.artefacts.iter().find(|a| a.format == "ext4")
    }
}

/// The on-disk cache.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

/// A held lock; released on drop (and by the kernel if the process dies).
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

impl Store {
    /// Opens (creating) the cache under `root` and removes what dead builds left behind.
    pub fn open(root: &Path) -> Result<Self, BuildError> {
        for sub in ["layers", "images", "staging", "locks"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|e| BuildError::io(format!("creating {}", dir.display()), e))?;
        }
        let root = std::fs::canonicalize(root)
            .map_err(|e| BuildError::io(format!("resolving {}", root.display()), e))?;
        let store = Self { root };
        store.remove_dead_staging()?;
        Ok(store)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a published layer lives.
    pub fn layer_dir(&self, digest: &LayerDigest) -> PathBuf {
        self.root.join("layers").join(digest.to_hex())
    }

    /// The root tree (overlay upper form) of a published layer.
    pub fn layer_tree(&self, digest: &LayerDigest) -> PathBuf {
        self.layer_dir(digest).join("tree")
    }

    /// Where a published image lives.
    pub fn image_dir(&self, id: &str) -> PathBuf {
        self.root.join("images").join(id)
    }

    /// The record of a published layer, if it exists.
    pub fn layer(&self, digest: &LayerDigest) -> Result<Option<LayerRecord>, BuildError> {
        read_record(&self.layer_dir(digest).join("layer.json"))
    }

    /// The record of a published image, if it exists.
    pub fn image(&self, id: &str) -> Result<Option<ImageRecord>, BuildError> {
        read_record(&self.image_dir(id).join("image.json"))
    }

    /// Every published layer.
    pub fn layers(&self) -> Result<Vec<LayerRecord>, BuildError> {
        self.list("layers", "layer.json")
    }

    /// Every published image.
    pub fn images(&self) -> Result<Vec<ImageRecord>, BuildError> {
        self.list("images", "image.json")
    }

    fn list<T: for<'de> Deserialize<'de>>(
        &self,
        sub: &str,
        file: &str,
    ) -> Result<Vec<T>, BuildError> {
        let dir = self.root.join(sub);
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| BuildError::io(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            if let Some(record) = read_record(&entry.path().join(file))? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Takes the build lock of `key`, waiting for another builder to finish.
    pub fn lock(&self, key: &str) -> Result<Lock, BuildError> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let file = File::create(&path)
            .map_err(|e| BuildError::io(format!("creating lock {}", path.display()), e))?;
        file.lock()
            .map_err(|e| BuildError::io(format!("locking {}", path.display()), e))?;
        Ok(Lock(file))
    }

    /// Shares the garbage-collection lock (builds) or takes it alone (gc).
    pub fn gc_lock(&self, exclusive: bool) -> Result<Lock, BuildError> {
        let path = self.root.join("gc.lock");
        let file = File::create(&path)
            .map_err(|e| BuildError::io(format!("creating lock {}", path.display()), e))?;
        let locked = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        locked.map_err(|e| BuildError::io(format!("locking {}", path.display()), e))?;
        Ok(Lock(file))
    }

    /// A fresh, empty staging directory owned by this process.
    pub fn staging(&self) -> Result<Staging, BuildError> {
        let n = STAGING_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .root
            .join("staging")
            .join(format!("{}-{n}", std::process::id()));
        if dir.exists() {
            remove_tree(&dir)?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| BuildError::io(format!("creating {}", dir.display()), e))?;
        Ok(Staging { dir })
    }

    /// Publishes a finished staging directory as `layers/<digest>` or `images/<id>`.
    pub fn publish(&self, from: &Path, sub: &str, key: &str) -> Result<PathBuf, BuildError> {
        let to = self.root.join(sub).join(key);
        sync_dir(from);
        std::fs::rename(from, &to).map_err(|e| {
            BuildError::io(
                format!("publishing {} as {}", from.display(), to.display()),
                e,
            )
        })?;
        sync_dir(&self.root.join(sub));
        Ok(to)
    }

    /// Removes a published layer or image: first renamed out of the cache (atomic), then deleted.
    pub fn remove(&self, sub: &str, key: &str) -> Result<(), BuildError> {
        let from = self.root.join(sub).join(key);
        let staging = self.staging()?;
        let to = staging.dir.join("removed");
        std::fs::rename(&from, &to)
            .map_err(|e| BuildError::io(format!("removing {}", from.display()), e))?;
        drop(staging);
        Ok(())
    }

    /// Removes staging directories whose owning process is gone, unmounting first.
    pub fn remove_dead_staging(&self) -> Result<(), BuildError> {
        let dir = self.root.join("staging");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(process_alive);
            if !alive {
                tracing::info!(staging = %entry.path().display(), "removing what a dead build left");
                remove_tree(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// Whether process `pid` runs (a zombie counts as dead).
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Unmounts everything below `dir`, then deletes it.
pub fn remove_tree(dir: &Path) -> Result<(), BuildError> {
    mounts::unmount_all_under(dir)?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BuildError::io(format!("removing {}", dir.display()), e)),
    }
}

fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, BuildError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            BuildError::new(
                crate::error::Phase::Prepare,
                format!("record {} is damaged: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BuildError::io(format!("reading {}", path.display()), e)),
    }
}

/// Writes a record file and syncs it.
pub fn write_record<T: Serialize>(path: &Path, record: &T) -> Result<(), BuildError> {
    use std::io::Write;
    let bytes = serde_json::to_vec_pretty(record)
        .map_err(|e| BuildError::new(crate::error::Phase::Stage, format!("encoding: {e}")))?;
    let mut file =
        File::create(path).map_err(|e| BuildError::io(format!("writing {}", path.display()), e))?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| BuildError::io(format!("writing {}", path.display()), e))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// A staging directory; unmounted and deleted when dropped unless published.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.dir) {
            tracing::warn!(staging = %self.dir.display(), error = %e, "staging directory left behind");
        }
    }
}
