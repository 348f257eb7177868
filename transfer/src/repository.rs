//! A host's image repository: a content-addressed block store plus image manifests.
//!
//! ```text
//! DIR/lock                     held (flock) by the one process that has the repository open
//! DIR/blocks/pack-NNNNNN.dat   append-only pack files: "CRTOPAK1" then records
//!                              hash (32) ‖ length (u32 BE) ‖ bytes
//! DIR/images/NAME.idx          the image's block index (the encoding of crate::block_index)
//! DIR/images/NAME.json         its manifest, written last: present ⇒ the image is complete
//! DIR/images/NAME.img          the assembled image (sparse where the image is zero), on demand
//! DIR/tmp/                     files being written, renamed into place when whole
//! ```
//!
//! Invariants:
//! * **Every stored block verifies.** [`Repository::store_blocks`] is the only writer of
//!   packs and hashes every block before appending it; a failed append (disk full) is cut
//!   back; [`Repository::open`] re-reads every record, and a torn or corrupt tail (a crash
//!   mid-write, a bad disk) is cut off before anything is served from it.
//! * **Each distinct block is stored once**, whatever image it belongs to; zero blocks are
//!   never stored (they are holes in assembled images).
//! * **A manifest present ⇒ all its blocks are present and durable.** [`Repository::commit`]
//!   checks every block of the index, syncs the packs, then writes the index and the
//!   manifest (each to `tmp/`, synced, renamed). `open` renames away the manifest of an
//!   image whose blocks are no longer all there (to `NAME.json.incomplete`).
//! * **No outside path**: image names are checked by [`crate::wire::validate_name`] before
//!   they become file names; block ids are hashes, never paths.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::block_index::{
    BlockEntry, BlockIndex, Checked, IndexError, MAX_BLOCK_LEN, PREFIX_LEN, PrefixIndex, Resolved,
    sha256,
};
use crate::wire::{WireError, validate_name};

const PACK_MAGIC: &[u8; 8] = b"CRTOPAK1";
const RECORD_HEADER: usize = 36;
/// A pack is closed and a new one started past this size.
const PACK_LIMIT: u64 = 4 << 30;

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another process has the repository open.
    #[error("repository {} is in use by another process (lock file {} is held)", root.display(), root.join("lock").display())]
    Locked {
        /// The repository.
        root: PathBuf,
    },
    /// A bad image name.
    #[error(transparent)]
    Name(#[from] WireError),
    /// An index that does not decode.
    #[error("image index refused: {0}")]
    Index(#[from] IndexError),
    /// A block whose bytes do not match its hash was offered.
    #[error("block {hash} does not match its {len} bytes; nothing of this batch was stored")]
    HashMismatch {
        /// The announced hash, hex.
        hash: String,
        /// The block length.
        len: usize,
    },
    /// A block longer than any index allows.
    #[error("block {hash} is {len} bytes long, more than the {MAX_BLOCK_LEN} allowed")]
    BlockTooLong {
        /// The hash, hex.
        hash: String,
        /// The length.
        len: usize,
    },
    /// A commit of an image whose blocks are not all in the repository.
    #[error(
        "image {name} cannot be marked complete: {missing} of its blocks are not in the repository"
    )]
    Incomplete {
        /// The image.
        name: String,
        /// How many distinct blocks are missing.
        missing: usize,
    },
    /// No complete image of that name.
    #[error("no complete image named {name} in the repository")]
    NotFound {
        /// The image.
        name: String,
    },
    /// A manifest or index on disk that does not read back.
    #[error("manifest {} is unreadable: {why}", path.display())]
    CorruptManifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Assembly found a stored block that does not verify (the disk changed under us).
    #[error("stored block {hash} in {} at offset {offset} no longer matches its hash", path.display())]
    StoredBlockCorrupt {
        /// The hash, hex.
        hash: String,
        /// The pack file.
        path: PathBuf,
        /// Offset of the block's bytes in the pack.
        offset: u64,
    },
}

impl RepoError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }

    /// True when the error comes from a full disk (or quota).
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
            }
            _ => false,
        }
    }
}

/// What [`Repository::open`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenReport {
    /// Packs read.
    pub packs: usize,
    /// Distinct blocks indexed (every one verified).
    pub blocks: usize,
    /// Bytes of block data.
    pub block_bytes: u64,
    /// Bytes cut off pack tails (torn or corrupt records).
    pub truncated_bytes: u64,
    /// Complete images.
    pub images: usize,
    /// Manifests set aside because their blocks were gone.
    pub demoted_images: Vec<String>,
    /// Assembled image files removed because the machine went down before they reached the
    /// disk (they are assembled again when needed).
    pub unsynced_images_removed: Vec<String>,
    /// Files in `images/` that look like assembly markers but are not (a name or content
    /// the repository does not make): left as they are, reported here and in the log.
    pub skipped_files: Vec<String>,
    /// Seconds spent.
    pub seconds: f64,
}

/// Result of storing a batch.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Blocks appended.
    pub stored: usize,
    /// Blocks the repository already held (sent by a concurrent transfer, or twice).
    pub present: usize,
}

/// The manifest of a complete image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version, 1.
    pub format: u32,
    /// Image name.
    pub name: String,
    /// Image digest, hex (see `block_index`).
    pub digest: String,
    /// `fixed-4096` or `cdc-N`.
    pub chunking: String,
    /// Image length in bytes.
    pub image_len: u64,
    /// Blocks in the index.
    pub blocks: usize,
    /// Zero blocks among them.
    pub zero_blocks: usize,
    /// Always true: a manifest is only written for a complete image.
    pub complete: bool,
    /// Seconds since the Unix epoch when it was committed.
    pub committed_unix: u64,
}

/// What [`Repository::assemble`] did.
#[derive(Debug, Clone, Serialize)]
pub struct AssembleReport {
    /// The assembled file.
    pub path: PathBuf,
    /// Bytes written (zero blocks are holes).
    pub bytes_written: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// What [`Repository::verify`] checked.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read and verified.
    pub records: usize,
    /// Records whose bytes do not match their hash (must be 0).
    pub bad_records: usize,
    /// Distinct hashes among the records.
    pub distinct: usize,
    /// Complete images checked.
    pub images: usize,
    /// Complete images with a block not in the store (must be 0).
    pub images_missing_blocks: usize,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: u32,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Writer {
    pack: u32,
    file: File,
    len: u64,
}

#[derive(Debug)]
struct State {
    blocks: HashMap<[u8; 32], Loc>,
    /// First bytes of each stored hash → the hash, or `None` when two stored hashes share them.
    prefixes: HashMap<[u8; PREFIX_LEN], Option<[u8; 32]>>,
    packs: Vec<Arc<File>>,
    writer: Writer,
    unsynced: BTreeSet<u32>,
    block_bytes: u64,
}

/// An open repository. Cheap to share behind an `Arc`; all methods block (call them from
/// `spawn_blocking` in async code).
#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    state: Mutex<State>,
    commit_lock: Mutex<()>,
    _lock: File,
    tmp_counter: AtomicU64,
}

fn pack_path(root: &Path, pack: u32) -> PathBuf {
    root.join("blocks").join(format!("pack-{pack:06}.dat"))
}

impl Repository {
    /// Opens (creating if needed) the repository at `root`, verifying every stored block.
    pub fn open(root: impl AsRef<Path>) -> Result<(Self, OpenReport), RepoError> {
        let started = Instant::now();
        let root = root.as_ref().to_path_buf();
        for sub in ["blocks", "images", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(RepoError::io("creating directory", &dir))?;
        }
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(RepoError::io("opening lock file", &lock_path))?;
        if lock.try_lock().is_err() {
            return Err(RepoError::Locked { root });
        }
        // Leftovers of interrupted writes.
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(RepoError::io("listing", &tmp))? {
            let path = entry.map_err(RepoError::io("listing", &tmp))?.path();
            fs::remove_file(&path).map_err(RepoError::io("removing leftover", &path))?;
        }
        let mut report = OpenReport::default();
        settle_assembled(&root.join("images"), &mut report)?;

        let mut numbers = Vec::new();
        let blocks_dir = root.join("blocks");
        for entry in fs::read_dir(&blocks_dir).map_err(RepoError::io("listing", &blocks_dir))? {
            let entry = entry.map_err(RepoError::io("listing", &blocks_dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_prefix("pack-")
                .and_then(|s| s.strip_suffix(".dat"))
                .and_then(|s| s.parse::<u32>().ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut blocks = HashMap::new();
        let mut packs = Vec::new();
        let mut block_bytes = 0;
        // Pack numbers must be 0..n; a gap means a pack was removed by hand: stop there.
        for (expected, &n) in numbers.iter().enumerate() {
            if n as usize != expected {
                tracing::warn!(
                    pack = n,
                    "pack numbering has a gap; later packs are ignored"
                );
                break;
            }
            let path = pack_path(&root, n);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(RepoError::io("opening pack", &path))?;
            let scan = scan_pack(&file, &path, |hash, offset, len| {
                if blocks
                    .insert(
                        hash,
                        Loc {
                            pack: n,
                            offset,
                            len,
                        },
                    )
                    .is_none()
                {
                    block_bytes += u64::from(len);
                }
            })?;
            if scan.valid_len < scan.file_len {
                tracing::warn!(
                    pack = %path.display(),
                    valid = scan.valid_len,
                    file_len = scan.file_len,
                    reason = scan.problem.as_deref().unwrap_or(""),
                    "cutting a torn or corrupt pack tail"
                );
                file.set_len(scan.valid_len)
                    .map_err(RepoError::io("truncating pack", &path))?;
                file.sync_all()
                    .map_err(RepoError::io("syncing pack", &path))?;
                report.truncated_bytes += scan.file_len - scan.valid_len;
            }
            packs.push(Arc::new(file));
        }
        let writer = if let Some(last) = packs.len().checked_sub(1) {
            let path = pack_path(&root, last as u32);
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(RepoError::io("opening pack", &path))?;
            let len = file
                .metadata()
                .map_err(RepoError::io("reading size of", &path))?
                .len();
            Writer {
                pack: last as u32,
                file,
                len,
            }
        } else {
            let (w, read) = new_pack(&root, 0)?;
            packs.push(read);
            w
        };
        let mut prefixes = HashMap::with_capacity(blocks.len());
        for hash in blocks.keys() {
            note_prefix(&mut prefixes, hash);
        }
        report.packs = packs.len();
        report.blocks = blocks.len();
        report.block_bytes = block_bytes;
        let repo = Self {
            root,
            state: Mutex::new(State {
                blocks,
                prefixes,
                packs,
                writer,
                unsynced: BTreeSet::new(),
                block_bytes,
            }),
            commit_lock: Mutex::new(()),
            _lock: lock,
            tmp_counter: AtomicU64::new(0),
        };
        // Manifests whose blocks are gone (a pack tail was cut) are set aside.
        for manifest in repo.images()? {
            let index = repo.read_index(&manifest.name)?;
            let state = repo.lock_state();
            let missing = index.missing_by(|h| state.blocks.contains_key(h)).len();
            drop(state);
            if missing > 0 {
                let path = repo.manifest_path(&manifest.name);
                let aside = path.with_extension("json.incomplete");
                tracing::warn!(image = %manifest.name, missing, "image lost blocks; its manifest is set aside");
                fs::rename(&path, &aside).map_err(RepoError::io("setting aside", &path))?;
                report.demoted_images.push(manifest.name);
            } else {
                report.images += 1;
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            repo = %repo.root.display(),
            blocks = report.blocks,
            block_bytes = report.block_bytes,
            images = report.images,
            seconds = report.seconds,
            "repository opened and verified"
        );
        Ok((repo, report))
    }

    /// The repository's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Distinct blocks stored, and their bytes.
    pub fn block_stats(&self) -> (usize, u64) {
        let s = self.lock_state();
        (s.blocks.len(), s.block_bytes)
    }

    /// Whether the repository holds a block.
    pub fn has_block(&self, hash: &[u8; 32]) -> bool {
        self.lock_state().blocks.contains_key(hash)
    }

    /// For each hash, true when the repository lacks it (from any image: every image is a seed).
    pub fn missing(&self, hashes: &[[u8; 32]]) -> Vec<bool> {
        let s = self.lock_state();
        hashes.iter().map(|h| !s.blocks.contains_key(h)).collect()
    }

    /// For each hash prefix, true when no stored block's hash starts with it.
    pub fn missing_prefixes(&self, prefixes: &[[u8; PREFIX_LEN]]) -> Vec<bool> {
        let s = self.lock_state();
        prefixes
            .iter()
            .map(|p| !s.prefixes.contains_key(p))
            .collect()
    }

    /// Like [`commit`](Self::commit) with a compact index (hash prefixes), resolved against
    /// the store; the resolved index must match the image digest the compact form carries.
    pub fn commit_compact(&self, name: &str, compact: &[u8]) -> Result<Manifest, RepoError> {
        validate_name(name)?;
        self.commit_prefixes(name, PrefixIndex::read_compact(compact, compact.len())?)
    }

    /// Like [`commit`](Self::commit) with an index read from its compact or session form
    /// ([`crate::wire::read_compact_index`], [`crate::wire::read_session_index`]): its
    /// prefixes are resolved against the store in place, and the index is committed as it
    /// is, never encoded in memory nor decoded again.
    pub fn commit_prefixes(&self, name: &str, index: PrefixIndex) -> Result<Manifest, RepoError> {
        validate_name(name)?;
        let resolved = {
            let s = self.lock_state();
            index.resolve(|p| s.prefixes.get(p).copied().flatten())?
        };
        match resolved {
            Resolved::Index(index) => self.commit_index(name, &index, None),
            Resolved::Unresolved(missing) => Err(RepoError::Incomplete {
                name: name.to_string(),
                missing,
            }),
        }
    }

    /// Resolves a run of blocks read from a compact or session index against the store
    /// ([`crate::block_index::resolve_run`]), the store locked once for the run.
    pub fn resolve_run(&self, blocks: &mut [BlockEntry]) -> usize {
        let s = self.lock_state();
        crate::block_index::resolve_run(blocks, |p| s.prefixes.get(p).copied().flatten())
    }

    /// What [`commit_prefixes`](Self::commit_prefixes) of the index `checked` was read from
    /// (resolved with [`resolve_run`](Self::resolve_run)) would be refused for, if anything:
    /// an index refused so costs no more than reading it.
    pub fn check_prefixes(&self, name: &str, checked: Checked) -> Result<(), RepoError> {
        validate_name(name)?;
        match checked.outcome()? {
            0 => Ok(()),
            missing => Err(RepoError::Incomplete {
                name: name.to_string(),
                missing,
            }),
        }
    }

    /// Verifies and stores blocks; blocks already present are skipped. Either every new
    /// block of the call is appended, or (on any error) none is.
    pub fn store_blocks<'a>(
        &self,
        blocks: impl Iterator<Item = (&'a [u8; 32], &'a [u8])> + Clone,
    ) -> Result<StoreOutcome, RepoError> {
        for (hash, data) in blocks.clone() {
            if data.len() > MAX_BLOCK_LEN as usize {
                return Err(RepoError::BlockTooLong {
                    hash: hex::encode(hash),
                    len: data.len(),
                });
            }
            if data.is_empty() || sha256(data) != *hash {
                return Err(RepoError::HashMismatch {
                    hash: hex::encode(hash),
                    len: data.len(),
                });
            }
        }
        self.append_blocks(blocks)
    }

    /// Stores the blocks of a decoded batch, whose hashes
    /// [`Batch::decode`](crate::wire::Batch::decode) computed from their bytes (so they are
    /// not hashed a second time); see [`store_blocks`](Self::store_blocks).
    pub fn store_batch(&self, batch: &crate::wire::Batch) -> Result<StoreOutcome, RepoError> {
        // Batch::decode refused empty blocks and blocks longer than MAX_BLOCK_LEN, and kept
        // a repeated block once: its repeats are present.
        let mut outcome = self.append_blocks(batch.blocks())?;
        outcome.present += batch.repeats();
        Ok(outcome)
    }

    /// Appends blocks whose hashes are known to match their bytes.
    fn append_blocks<'a>(
        &self,
        blocks: impl Iterator<Item = (&'a [u8; 32], &'a [u8])>,
    ) -> Result<StoreOutcome, RepoError> {
        let mut s = self.lock_state();
        if s.writer.len >= PACK_LIMIT {
            let next = s.writer.pack + 1;
            let (w, read) = new_pack(&self.root, next)?;
            let old = s.writer.pack;
            s.unsynced.insert(old);
            s.writer = w;
            s.packs.push(read);
        }
        let mut out = StoreOutcome::default();
        let mut buf = Vec::new();
        let mut new = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let base = s.writer.len;
        for (hash, data) in blocks {
            if s.blocks.contains_key(hash) || !seen.insert(*hash) {
                out.present += 1;
                continue;
            }
            buf.extend_from_slice(hash);
            buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let offset = base + buf.len() as u64;
            buf.extend_from_slice(data);
            new.push((*hash, offset, data.len() as u32));
        }
        if buf.is_empty() {
            return Ok(out);
        }
        let pack = s.writer.pack;
        let path = pack_path(&self.root, pack);
        if let Err(source) = s.writer.file.write_all(&buf) {
            // Cut back whatever part of the records reached the file.
            if let Err(e) = s.writer.file.set_len(base) {
                tracing::error!(pack = %path.display(), error = %e, "cannot cut back a failed append");
            }
            return Err(RepoError::Io {
                what: "appending blocks to pack",
                path,
                source,
            });
        }
        s.writer.len += buf.len() as u64;
        s.unsynced.insert(pack);
        for (hash, offset, len) in new {
            s.blocks.insert(hash, Loc { pack, offset, len });
            note_prefix(&mut s.prefixes, &hash);
            s.block_bytes += u64::from(len);
            out.stored += 1;
        }
        Ok(out)
    }

    fn sync_packs(&self) -> Result<(), RepoError> {
        let mut s = self.lock_state();
        let unsynced = std::mem::take(&mut s.unsynced);
        for pack in unsynced {
            let path = pack_path(&self.root, pack);
            let res = if pack == s.writer.pack {
                s.writer.file.sync_data()
            } else {
                s.packs[pack as usize].sync_data()
            };
            res.map_err(RepoError::io("syncing pack", &path))?;
        }
        Ok(())
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.root.join("images").join(format!("{name}.json"))
    }

    fn index_path(&self, name: &str) -> PathBuf {
        self.root.join("images").join(format!("{name}.idx"))
    }

    /// Path of an image's assembled file (which exists only after [`assemble`](Self::assemble)).
    pub fn image_path(&self, name: &str) -> Result<PathBuf, RepoError> {
        validate_name(name)?;
        Ok(self.root.join("images").join(format!("{name}.img")))
    }

    /// Marks an image complete: checks that every block of `index_bytes` is stored, syncs
    /// the packs, then writes the index and the manifest. Replaces an image of the same name.
    pub fn commit(&self, name: &str, index_bytes: &[u8]) -> Result<Manifest, RepoError> {
        validate_name(name)?;
        let index = BlockIndex::from_bytes(index_bytes)?;
        self.commit_index(name, &index, Some(index_bytes))
    }

    /// Commits a decoded index whose encoding is `encoded` (the bytes it was decoded from),
    /// or, without them, written from `index` as the file is written.
    fn commit_index(
        &self,
        name: &str,
        index: &BlockIndex,
        encoded: Option<&[u8]>,
    ) -> Result<Manifest, RepoError> {
        let missing = {
            let s = self.lock_state();
            index.missing_by(|h| s.blocks.contains_key(h)).len()
        };
        if missing > 0 {
            return Err(RepoError::Incomplete {
                name: name.to_string(),
                missing,
            });
        }
        let _commit = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        // The same content committed again (concurrent pushes of one image) changes nothing:
        // the manifest is never taken away from under a reader.
        let digest = hex::encode(index.image_digest());
        if let Ok(existing) = self.manifest(name)
            && existing.complete
            && existing.digest == digest
            && self.index_path(name).is_file()
        {
            return Ok(existing);
        }
        self.sync_packs()?;
        let manifest = Manifest {
            format: 1,
            name: name.to_string(),
            digest,
            chunking: index.chunking().label(),
            image_len: index.image_len(),
            blocks: index.blocks().len(),
            zero_blocks: index.zero_blocks(),
            complete: true,
            committed_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| RepoError::CorruptManifest {
                path: self.manifest_path(name),
                why: e.to_string(),
            })?;
        // An older manifest of this name goes first, so no moment shows it with the new index.
        let manifest_path = self.manifest_path(name);
        match fs::remove_file(&manifest_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(RepoError::io("removing old manifest", &manifest_path)(e));
            }
            _ => {}
        }
        let index_path = self.index_path(name);
        match encoded {
            Some(bytes) => self.write_atomic(&index_path, bytes)?,
            None => self.write_atomic_with(&index_path, |f| {
                let mut out = io::BufWriter::new(f);
                index.write_to(&mut out)?;
                out.flush()
            })?,
        }
        self.write_atomic(&manifest_path, &json)?;
        tracing::info!(image = name, digest = %manifest.digest, bytes = manifest.image_len, "image committed");
        Ok(manifest)
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), RepoError> {
        self.write_atomic_with(dest, |f| f.write_all(bytes))
    }

    /// Writes a file through `write` under a temporary name, syncs it and renames it to `dest`.
    fn write_atomic_with(
        &self,
        dest: &Path,
        write: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), RepoError> {
        let tmp = self.tmp_path();
        let res = (|| {
            let mut f = File::create(&tmp).map_err(RepoError::io("creating", &tmp))?;
            write(&mut f).map_err(RepoError::io("writing", &tmp))?;
            f.sync_all().map_err(RepoError::io("syncing", &tmp))?;
            fs::rename(&tmp, dest).map_err(RepoError::io("renaming into place", dest))?;
            let dir = dest.parent().unwrap_or(&self.root);
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(RepoError::io("syncing directory", dir))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}.tmp", std::process::id()))
    }

    /// The manifest of a complete image.
    pub fn manifest(&self, name: &str) -> Result<Manifest, RepoError> {
        validate_name(name)?;
        let path = self.manifest_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::NotFound {
                    name: name.to_string(),
                });
            }
            Err(e) => return Err(RepoError::io("reading manifest", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| RepoError::CorruptManifest {
            path,
            why: e.to_string(),
        })
    }

    /// Every complete image, by name.
    pub fn images(&self) -> Result<Vec<Manifest>, RepoError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(RepoError::io("listing", &dir))? {
            let name = entry.map_err(RepoError::io("listing", &dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".json")
                && validate_name(stem).is_ok()
            {
                out.push(self.manifest(stem)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The block index of a complete image, checked against its manifest.
    pub fn read_index(&self, name: &str) -> Result<BlockIndex, RepoError> {
        let manifest = self.manifest(name)?;
        let path = self.index_path(name);
        let bytes = fs::read(&path).map_err(RepoError::io("reading index", &path))?;
        let index = BlockIndex::from_bytes(&bytes).map_err(|e| RepoError::CorruptManifest {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if hex::encode(index.image_digest()) != manifest.digest {
            return Err(RepoError::CorruptManifest {
                path,
                why: "index digest differs from the manifest's".into(),
            });
        }
        Ok(index)
    }

    /// Writes the image `name` to `DIR/images/NAME.img` (zero blocks as holes), verifying
    /// every block as it is read; the file appears only when whole.
    pub fn assemble(&self, name: &str) -> Result<AssembleReport, RepoError> {
        let started = Instant::now();
        let index = self.read_index(name)?;
        let dest = self.image_path(name)?;
        let mut plan = Vec::with_capacity(index.blocks().len());
        let packs = {
            let s = self.lock_state();
            for (offset, b) in index.blocks_with_offsets() {
                if b.is_zero() {
                    continue;
                }
                let loc = *s
                    .blocks
                    .get(b.hash())
                    .ok_or_else(|| RepoError::Incomplete {
                        name: name.to_string(),
                        missing: 1,
                    })?;
                plan.push((offset, *b.hash(), loc));
            }
            s.packs.clone()
        };
        // The image file is renamed into place without waiting for its bytes to reach the
        // disk (that wait was most of a small push); a marker naming this boot, written
        // first, says so until a background sync is done, and a repository opened after
        // the machine went down removes the file (see `settle_assembled`). Without a boot
        // id to compare, the file is synced before the rename.
        let marker = match boot_id() {
            Some(boot) => {
                let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
                let marker = self
                    .root
                    .join("images")
                    .join(format!("{name}{UNSYNCED}{}-{n}", std::process::id()));
                self.write_atomic(&marker, boot.as_bytes())?;
                Some(marker)
            }
            None => None,
        };
        let tmp = self.tmp_path();
        let res = (|| {
            let out = File::create(&tmp).map_err(RepoError::io("creating", &tmp))?;
            out.set_len(index.image_len())
                .map_err(RepoError::io("sizing", &tmp))?;
            // Two halves of the image on two threads: reading, verifying and writing.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
            let per = plan.len().div_ceil(threads).max(1);
            let written = std::thread::scope(|scope| {
                let handles: Vec<_> = plan
                    .chunks(per)
                    .map(|part| scope.spawn(|| self.write_blocks(part, &packs, &out, &tmp)))
                    .collect();
                handles.into_iter().try_fold(0u64, |sum, h| {
                    let n = h.join().unwrap_or_else(|_| {
                        Err(RepoError::CorruptManifest {
                            path: tmp.clone(),
                            why: "an assembly thread panicked".into(),
                        })
                    })?;
                    Ok::<u64, RepoError>(sum + n)
                })
            })?;
            if marker.is_none() {
                out.sync_all().map_err(RepoError::io("syncing", &tmp))?;
            }
            fs::rename(&tmp, &dest).map_err(RepoError::io("renaming into place", &dest))?;
            Ok::<u64, RepoError>(written)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        if let Some(marker) = marker {
            if res.is_err() {
                let _ = fs::remove_file(&marker);
            } else {
                let dest = dest.clone();
                std::thread::spawn(move || match File::open(&dest).and_then(|f| f.sync_all()) {
                    Ok(()) => {
                        let _ = fs::remove_file(&marker);
                    }
                    Err(e) => {
                        tracing::warn!(image = %dest.display(), error = %e, "syncing an assembled image failed; it is checked at the next start")
                    }
                });
            }
        }
        let report = AssembleReport {
            path: dest,
            bytes_written: res?,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            image = name,
            bytes = report.bytes_written,
            seconds = report.seconds,
            "image assembled"
        );
        Ok(report)
    }

    /// Copies blocks from the packs into `out` at their image offsets, verifying each one,
    /// in writes of up to 1 MiB of contiguous blocks. Returns the bytes written.
    fn write_blocks(
        &self,
        plan: &[(u64, [u8; 32], Loc)],
        packs: &[Arc<File>],
        out: &File,
        tmp: &Path,
    ) -> Result<u64, RepoError> {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut buf_at = 0u64;
        let mut written = 0u64;
        let mut flush = |buf: &mut Vec<u8>, at: u64| -> Result<(), RepoError> {
            out.write_all_at(buf, at)
                .map_err(RepoError::io("writing", tmp))?;
            written += buf.len() as u64;
            buf.clear();
            Ok(())
        };
        for (offset, hash, loc) in plan {
            if !buf.is_empty() && (buf_at + buf.len() as u64 != *offset || buf.len() >= 1 << 20) {
                flush(&mut buf, buf_at)?;
            }
            if buf.is_empty() {
                buf_at = *offset;
            }
            let start = buf.len();
            buf.resize(start + loc.len as usize, 0);
            let pack_file = pack_path(&self.root, loc.pack);
            packs[loc.pack as usize]
                .read_exact_at(&mut buf[start..], loc.offset)
                .map_err(RepoError::io("reading block from", &pack_file))?;
            if sha256(&buf[start..]) != *hash {
                return Err(RepoError::StoredBlockCorrupt {
                    hash: hex::encode(hash),
                    path: pack_file,
                    offset: loc.offset,
                });
            }
        }
        if !buf.is_empty() {
            flush(&mut buf, buf_at)?;
        }
        Ok(written)
    }

    /// Re-reads every pack record and verifies it, and checks that every complete image's
    /// blocks are all stored.
    pub fn verify(&self) -> Result<VerifyReport, RepoError> {
        let packs = self.lock_state().packs.clone();
        let mut report = VerifyReport::default();
        let mut distinct = std::collections::HashSet::new();
        for (n, pack) in packs.iter().enumerate() {
            let path = pack_path(&self.root, n as u32);
            let scan = scan_pack(pack, &path, |hash, _, _| {
                report.records += 1;
                distinct.insert(hash);
            })?;
            if scan.problem.is_some() {
                report.bad_records += 1;
            }
        }
        report.distinct = distinct.len();
        for manifest in self.images()? {
            report.images += 1;
            let index = self.read_index(&manifest.name)?;
            if !index.missing_by(|h| distinct.contains(h)).is_empty() {
                report.images_missing_blocks += 1;
            }
        }
        Ok(report)
    }
}

fn note_prefix(prefixes: &mut HashMap<[u8; PREFIX_LEN], Option<[u8; 32]>>, hash: &[u8; 32]) {
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(&hash[..PREFIX_LEN]);
    prefixes
        .entry(p)
        .and_modify(|known| {
            if *known != Some(*hash) {
                *known = None;
            }
        })
        .or_insert(Some(*hash));
}

fn new_pack(root: &Path, n: u32) -> Result<(Writer, Arc<File>), RepoError> {
    let path = pack_path(root, n);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(RepoError::io("creating pack", &path))?;
    if let Err(e) = file.write_all(PACK_MAGIC).and_then(|()| file.sync_all()) {
        let _ = fs::remove_file(&path);
        return Err(RepoError::io("writing pack header", &path)(e));
    }
    let read = File::open(&path).map_err(RepoError::io("opening pack", &path))?;
    Ok((
        Writer {
            pack: n,
            file,
            len: PACK_MAGIC.len() as u64,
        },
        Arc::new(read),
    ))
}

struct Scan {
    valid_len: u64,
    file_len: u64,
    problem: Option<String>,
}

/// Reads a pack from the start, verifying each record; calls `each(hash, offset, len)` for
/// every good one, and stops at the first torn or bad record.
fn scan_pack(
    file: &File,
    path: &Path,
    mut each: impl FnMut([u8; 32], u64, u32),
) -> Result<Scan, RepoError> {
    let file_len = file
        .metadata()
        .map_err(RepoError::io("reading size of", path))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, ReadAt { file, at: 0 });
    let mut magic = [0u8; 8];
    let got = read_full(&mut reader, &mut magic).map_err(RepoError::io("reading pack", path))?;
    if got < 8 || &magic != PACK_MAGIC {
        return Err(RepoError::CorruptManifest {
            path: path.to_path_buf(),
            why: "not a pack file (bad magic)".into(),
        });
    }
    let mut at = 8u64;
    let mut data = Vec::new();
    let problem = loop {
        let mut header = [0u8; RECORD_HEADER];
        let got =
            read_full(&mut reader, &mut header).map_err(RepoError::io("reading pack", path))?;
        if got == 0 {
            break None;
        }
        if got < RECORD_HEADER {
            break Some(format!("torn record header at offset {at}"));
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&header[..32]);
        let len = u32::from_be_bytes([header[32], header[33], header[34], header[35]]);
        if len == 0 || len > MAX_BLOCK_LEN {
            break Some(format!("record at offset {at} has impossible length {len}"));
        }
        data.resize(len as usize, 0);
        let got = read_full(&mut reader, &mut data).map_err(RepoError::io("reading pack", path))?;
        if got < len as usize {
            break Some(format!("torn record at offset {at}"));
        }
        if sha256(&data) != hash {
            break Some(format!("record at offset {at} does not match its hash"));
        }
        each(hash, at + RECORD_HEADER as u64, len);
        at += RECORD_HEADER as u64 + u64::from(len);
    };
    Ok(Scan {
        valid_len: at,
        file_len,
        problem,
    })
}

/// Reads a shared `File` from an offset of its own (the append handle moves the cursor).
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    crate::chunker::fill(reader, buf).map_err(|(_, e)| e)
}

/// Marks an assembled image whose bytes may not be on disk yet: `NAME.img` + this + a
/// unique suffix; the marker holds the boot id it was written under.
const UNSYNCED: &str = ".img.unsynced.";

/// A Linux boot id: a UUID (8-4-4-4-12 hex digits).
fn looks_like_boot_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// This boot's id (Linux), to tell a restarted agent from a restarted machine.
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Deals with the markers of assembled images left by an agent that stopped before their
/// background sync was done: under the same boot the bytes are in the page cache, and are
/// written out now; after a reboot they may never have reached the disk, and the file is
/// removed (the repository assembles it again when it is needed).
fn settle_assembled(images: &Path, report: &mut OpenReport) -> Result<(), RepoError> {
    let boot = boot_id();
    for entry in fs::read_dir(images).map_err(RepoError::io("listing", images))? {
        let marker = entry.map_err(RepoError::io("listing", images))?.path();
        let file_name = marker
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((name, suffix)) = file_name.rsplit_once(UNSYNCED) else {
            continue;
        };
        let mut skip = |why: &str| {
            tracing::warn!(file = %marker.display(), why, "not an assembly marker; left as it is");
            report.skipped_files.push(file_name.clone());
        };
        // A marker is NAME.img.unsynced.SUFFIX for a valid image name, a plain file holding a
        // boot id; anything else is not the repository's and is never acted on.
        if validate_name(name).is_err()
            || suffix.is_empty()
            || !suffix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            skip("its name is not a marker's");
            continue;
        }
        let written_under = match fs::symlink_metadata(&marker) {
            Ok(meta) if !meta.is_file() || meta.len() > 64 => {
                skip("it is not a small plain file");
                continue;
            }
            Ok(_) => match fs::read_to_string(&marker) {
                Ok(text) => text,
                // Its sync finished meanwhile (a repository reopened in the same process).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => {
                    skip("it cannot be read as text");
                    continue;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(RepoError::io("reading", &marker)(e)),
        };
        if !looks_like_boot_id(written_under.trim()) {
            skip("it does not hold a boot id");
            continue;
        }
        let image = images.join(format!("{name}.img"));
        if boot.is_some() && boot.as_deref() == Some(written_under.trim()) {
            match File::open(&image) {
                Ok(f) => f.sync_all().map_err(RepoError::io("syncing", &image))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(RepoError::io("opening", &image)(e)),
            }
        } else {
            match fs::remove_file(&image) {
                Ok(()) => {
                    tracing::warn!(
                        image = name,
                        "the machine went down before this assembled image reached the disk; removed (it is assembled again when needed)"
                    );
                    report.unsynced_images_removed.push(name.to_owned());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(RepoError::io("removing", &image)(e)),
            }
        }
        match fs::remove_file(&marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(RepoError::io("removing", &marker)(e));
            }
            _ => {}
        }
    }
    Ok(())
}
