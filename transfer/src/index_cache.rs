//! A cache of block indexes on the sending side, so that an image pushed to many hosts is
//! hashed once.
//!
//! An entry is keyed by what identifies one version of a file without reading it: its
//! canonical path, device, inode, length, modification and status-change times (to the
//! nanosecond), and the chunking. Any write to the file changes its status-change time,
//! which no user can set back, so a changed file never meets its old entry; this is the
//! check `git` and `rsync` rely on too. The loaded index must also decode (its digest is
//! recomputed from its blocks) and match the file's length and the chunking asked for, or
//! it is ignored and rebuilt. And a push still hashes every block it sends before it sends
//! it, so a block the cache got wrong could not reach a host under a wrong hash.
//!
//! Two races are closed. A file changed while it was being hashed is not cached (its key
//! is taken before and after hashing and must not differ). And a file changed less than
//! [`SETTLE`] ago is not cached either: file times are coarse (a few milliseconds on ext4,
//! seconds elsewhere), so a second write within the same tick would leave the key as it
//! was; by the time a file has settled, any later write gets a later time.
//!
//! Entries are written to a temporary file and renamed, so a reader sees a whole entry or
//! none; the cache keeps the [`KEEP`] most recently used entries.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::block_index::{BlockIndex, Chunking};

/// Entries kept (the least recently used beyond this are removed).
pub const KEEP: usize = 64;
/// How long a file must have been left alone before its index is cached.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// What identifies one version of a file (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    entry: PathBuf,
    len: u64,
    changed: std::time::SystemTime,
}

/// A directory of cached indexes.
#[derive(Debug, Clone)]
pub struct IndexCache {
    dir: PathBuf,
}

impl IndexCache {
    /// A cache in `dir` (created when the first entry is written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of `file` as it is now.
    pub fn key(&self, file: &Path, chunking: Chunking) -> Option<Key> {
        let canonical = fs::canonicalize(file).ok()?;
        let m = fs::metadata(&canonical).ok()?;
        let mut h = Sha256::new();
        h.update(b"certo index cache v1\0");
        h.update(canonical.as_os_str().as_encoded_bytes());
        h.update([0]);
        for n in [m.dev(), m.ino(), m.len()] {
            h.update(n.to_be_bytes());
        }
        for n in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
            h.update(n.to_be_bytes());
        }
        h.update(chunking.label().as_bytes());
        let (secs, nanos) = (m.mtime(), m.mtime_nsec()).max((m.ctime(), m.ctime_nsec()));
        let changed = std::time::UNIX_EPOCH
            + std::time::Duration::new(
                u64::try_from(secs).unwrap_or(0),
                u32::try_from(nanos).unwrap_or(0),
            );
        Some(Key {
            entry: self.dir.join(format!("{}.idx", hex::encode(h.finalize()))),
            len: m.len(),
            changed,
        })
    }

    /// The cached index of `file` as it is now, if there is a valid one.
    pub fn load(&self, file: &Path, chunking: Chunking) -> Option<BlockIndex> {
        let Key { entry, len, .. } = self.key(file, chunking)?;
        let bytes = fs::read(&entry).ok()?;
        match BlockIndex::from_bytes(&bytes) {
            Ok(index) if index.image_len() == len && index.chunking() == chunking => {
                // Mark it used (for eviction); failing to is harmless.
                let _ = fs::File::options()
                    .append(true)
                    .open(&entry)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                tracing::debug!(file = %file.display(), entry = %entry.display(), "index cache hit");
                Some(index)
            }
            Ok(_) | Err(_) => {
                tracing::warn!(entry = %entry.display(), "ignoring a cached index that does not fit its file");
                let _ = fs::remove_file(&entry);
                None
            }
        }
    }

    /// Stores `index`, built from `file` whose key was `before` when hashing started,
    /// unless the file changed since or has not settled yet. Failures are logged and
    /// otherwise ignored: the cache only saves time.
    pub fn store(&self, file: &Path, before: &Key, index: &BlockIndex) {
        if self.key(file, index.chunking()).as_ref() != Some(before) {
            tracing::debug!(file = %file.display(), "not caching the index of a file that changed while it was hashed");
            return;
        }
        let settled = std::time::SystemTime::now()
            .duration_since(before.changed)
            .is_ok_and(|age| age >= SETTLE);
        if !settled {
            tracing::debug!(file = %file.display(), "not caching the index of a file changed moments ago");
            return;
        }
        if let Err(e) = self.write(&before.entry, &index.to_bytes()) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot write to the index cache");
            return;
        }
        self.evict();
    }

    fn write(&self, entry: &Path, bytes: &[u8]) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        fs::rename(&tmp, entry).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    fn evict(&self) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= KEEP {
            return;
        }
        entries.sort();
        for (_, path) in &entries[..entries.len() - KEEP] {
            let _ = fs::remove_file(path);
        }
    }
}
