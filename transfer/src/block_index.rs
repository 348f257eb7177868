//! Block index of an image file, and its binary encoding.
//!
//! An image is cut into blocks, either of a fixed size (a power of two between
//! [`MIN_BLOCK_SIZE`] and [`MAX_BLOCK_SIZE`], 4 KiB by default to match ext4; the last block
//! may be shorter) or by content ([`Chunking::ContentDefined`], see [`crate::chunker`]) for
//! tar-like artefacts whose contents shift. Each block is identified by the SHA-256 of its
//! bytes. A block whose bytes are all zero is flagged as such: it is never sent nor stored.
//!
//! The **image digest** identifies the whole image. It is the SHA-256 of the block list
//! (a one-level hash tree), not of the raw bytes, so that indexing reads and hashes every
//! byte exactly once and runs at the speed of one SHA-256 on one core:
//!
//! ```text
//! image digest = SHA-256( "CRTOIMG2" ‖ image length (u64 BE) ‖ for each block: length (u32 BE) ‖ hash )
//! ```
//!
//! Two images with the same digest and the same chunking have the same bytes (as long as
//! SHA-256 resists collisions). The same bytes indexed with another chunking give another
//! digest.
//!
//! # Encoding (format version 2)
//!
//! All integers are big-endian. The format is also described in `docs/transfer-format.md`.
//!
//! | offset | size       | field          | meaning                                                        |
//! |-------:|-----------:|----------------|----------------------------------------------------------------|
//! | 0      | 7          | magic          | the bytes `CRTOIDX`                                            |
//! | 7      | 1          | version        | format version, `2`                                            |
//! | 8      | 1          | chunking       | `0` fixed-size blocks, `1` content-defined chunks              |
//! | 9      | 4          | size           | fixed: block size; content-defined: average chunk size         |
//! | 13     | 8          | image length   | length of the image in bytes                                   |
//! | 21     | 32         | image digest   | as defined above; checked when decoding                        |
//! | 53     | 8          | block count    | fixed: must equal `ceil(image length / block size)`            |
//! | 61     | per block  | blocks         | fixed: 32-byte hash; content-defined: length (u32) + hash      |
//!
//! Nothing follows the last block. Zero blocks are not marked in the encoding: they are
//! recognised on decoding by comparing each hash with the hash of a zero block of the
//! same length. A fixed-size index costs 32 bytes per block: 0.78 % of the image at 4 KiB.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::chunker::{ChunkParams, Chunker, fill};

/// Block size used when the caller has no reason to choose another: the ext4 block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest accepted block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest accepted block size (1 MiB).
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Longest block any index may hold (a content-defined chunk of the largest average size).
pub const MAX_BLOCK_LEN: u32 = 4 << 20;
/// Magic bytes opening an encoded index.
pub const MAGIC: &[u8; 7] = b"CRTOIDX";
/// Encoding format version written by [`BlockIndex::to_bytes`] and read by [`BlockIndex::from_bytes`].
pub const FORMAT_VERSION: u8 = 2;
/// Magic bytes opening a compact index (hash prefixes, see [`BlockIndex::to_compact_bytes`]).
pub const COMPACT_MAGIC: &[u8; 7] = b"CRTOCIX";
/// Version of the compact form.
pub const COMPACT_VERSION: u8 = 1;
/// Bytes of each hash kept in the compact form and in missing queries.
pub const PREFIX_LEN: usize = 8;
/// Magic bytes opening a session index (see [`BlockIndex::to_session_bytes`]).
pub const SESSION_MAGIC: &[u8; 7] = b"CRTOSIX";
/// Version of the session form.
pub const SESSION_VERSION: u8 = 1;

/// Length of the header every form of the index starts with.
pub(crate) const HEADER_LEN: usize = 61;

/// The most blocks an image may have on a host: 2,097,152 (8 GiB of 4 KiB blocks). Every
/// index is bounded by it before anything is allocated for it, so what a request can make
/// a host hold is bounded too.
pub const MAX_IMAGE_BLOCKS: u64 = 1 << 21;

/// The encodings of an index, as they arrive at a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `CRTOIDX`: full 32-byte hashes.
    Full,
    /// `CRTOCIX`: 8-byte prefixes.
    Compact,
    /// `CRTOSIX`: references to the prefixes of a push session (LEB128).
    Session,
}

impl Encoding {
    /// The most bytes one block takes in this encoding (chunking `kind` 0 fixed, 1 CDC).
    fn max_block_bytes(self, kind: u8) -> usize {
        let length = if kind == 1 { 4 } else { 0 };
        length
            + match self {
                Encoding::Full => 32,
                Encoding::Compact => PREFIX_LEN,
                // A LEB128 u64 takes at most 10 bytes.
                Encoding::Session => 10,
            }
    }

    /// The most bytes an index of this encoding can have, from its first [`HEADER_LEN`]
    /// bytes (which hold the chunking and the block count): refused above
    /// [`MAX_IMAGE_BLOCKS`] blocks.
    pub fn max_len(self, header: &[u8]) -> Result<usize, IndexError> {
        if header.len() < HEADER_LEN {
            return Err(IndexError::Truncated {
                field: "header",
                offset: 0,
                needed: HEADER_LEN as u64,
                available: header.len(),
            });
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&header[53..61]);
        let count = u64::from_be_bytes(count);
        if count > MAX_IMAGE_BLOCKS {
            return Err(IndexError::TooManyBlocks { count });
        }
        Ok(HEADER_LEN + count as usize * self.max_block_bytes(header[8]))
    }
}
const DIGEST_DOMAIN: &[u8; 8] = b"CRTOIMG2";
/// Bytes read from the image at a time when indexing.
const READ_BUFFER: usize = 1 << 20;

/// How an image is cut into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// Blocks of `block_size` bytes; the last one may be shorter.
    Fixed {
        /// Bytes per block, a power of two in `MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE`.
        block_size: u32,
    },
    /// Content-defined chunks (gear hash) of `avg` bytes on average, between `avg / 4` and
    /// `avg * 4` bytes.
    ContentDefined {
        /// Average chunk size, a power of two between 1 KiB and 1 MiB.
        avg: u32,
    },
}

impl Default for Chunking {
    fn default() -> Self {
        Self::Fixed {
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

impl Chunking {
    /// Checks the size parameter.
    pub fn validate(self) -> Result<Self, IndexError> {
        match self {
            Self::Fixed { block_size } if !valid_block_size(block_size) => {
                Err(IndexError::InvalidBlockSize { block_size })
            }
            Self::ContentDefined { avg } if !ChunkParams::valid_avg(avg) => {
                Err(IndexError::InvalidChunkSize { avg })
            }
            _ => Ok(self),
        }
    }

    /// A short name: `fixed-4096` or `cdc-16384`.
    pub fn label(self) -> String {
        match self {
            Self::Fixed { block_size } => format!("fixed-{block_size}"),
            Self::ContentDefined { avg } => format!("cdc-{avg}"),
        }
    }

    fn code(self) -> (u8, u32) {
        match self {
            Self::Fixed { block_size } => (0, block_size),
            Self::ContentDefined { avg } => (1, avg),
        }
    }
}

/// Why an index could not be built or decoded.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The requested block size is outside the accepted range or not a power of two.
    #[error("block size {block_size} is not a power of two between 512 and 1048576 bytes")]
    InvalidBlockSize {
        /// The refused block size.
        block_size: u32,
    },
    /// The requested average chunk size is outside the accepted range or not a power of two.
    #[error("average chunk size {avg} is not a power of two between 1024 and 1048576 bytes")]
    InvalidChunkSize {
        /// The refused size.
        avg: u32,
    },
    /// Reading the image failed.
    #[error("reading the image failed at byte {offset}: {source}")]
    Read {
        /// Image offset at which the failing read started.
        offset: u64,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The encoding ends before a field is complete.
    #[error(
        "block index encoding is truncated: {field} needs {needed} bytes at offset {offset} \
         but only {available} remain"
    )]
    Truncated {
        /// Name of the incomplete field.
        field: &'static str,
        /// Offset at which the field starts.
        offset: usize,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the input from `offset`.
        available: usize,
    },
    /// The encoding does not start with [`MAGIC`].
    #[error("not a Certo block index: expected magic \"CRTOIDX\" at offset 0, found \"{found}\"")]
    BadMagic {
        /// The first seven bytes, escaped.
        found: String,
    },
    /// The format version is not one this build reads.
    #[error(
        "unsupported block index format version {version} at offset 7 (this build reads version {})",
        FORMAT_VERSION
    )]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// The chunking byte is not a known kind.
    #[error("unknown chunking kind {kind} at offset 8 (expected 0 fixed or 1 content-defined)")]
    UnknownChunking {
        /// The byte found.
        kind: u8,
    },
    /// The encoded block size is outside the accepted range or not a power of two.
    #[error("size {size} at offset 9 is invalid for {chunking} chunking")]
    EncodedBlockSize {
        /// The refused size.
        size: u32,
        /// `fixed` or `content-defined`.
        chunking: &'static str,
    },
    /// The block count disagrees with the image length and block size.
    #[error(
        "block count {count} at offset 53 does not match image length {image_len} with block \
         size {block_size}: expected {expected} blocks"
    )]
    BlockCountMismatch {
        /// The block count found.
        count: u64,
        /// The block count implied by the image length and block size.
        expected: u64,
        /// The encoded image length.
        image_len: u64,
        /// The encoded block size.
        block_size: u32,
    },
    /// A content-defined chunk length is zero or too long, or the lengths do not add up.
    #[error("block {block} at offset {offset}: {problem}")]
    BadBlockLength {
        /// Position of the block in the index.
        block: u64,
        /// Offset of its length field in the encoding.
        offset: usize,
        /// What is wrong.
        problem: String,
    },
    /// The image digest does not match the block list: the index was altered.
    #[error(
        "image digest at offset 21 ({found}) does not match the block list (computed {computed}): \
         the index is corrupt"
    )]
    DigestMismatch {
        /// The digest in the encoding, hex.
        found: String,
        /// The digest computed from the blocks, hex.
        computed: String,
    },
    /// More blocks than a host takes (an index is decoded into memory whole).
    #[error(
        "the index lists {count} blocks; a host takes images of at most {MAX_IMAGE_BLOCKS} blocks"
    )]
    TooManyBlocks {
        /// The block count in the header.
        count: u64,
    },
    /// A session index that cannot be expanded.
    #[error("session index at offset {offset}: {problem}")]
    BadSessionIndex {
        /// Offset of the faulty field.
        offset: usize,
        /// What is wrong.
        problem: String,
    },
    /// Reading the encoding from a stream failed (a zstd decoder found its frame damaged).
    #[error("reading the block index failed at offset {offset}: {source}")]
    Input {
        /// Offset of the field being read.
        offset: usize,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Bytes follow the last block.
    #[error("{extra} trailing bytes after the last block, starting at offset {offset}")]
    TrailingBytes {
        /// Offset of the first unexpected byte.
        offset: usize,
        /// How many unexpected bytes there are.
        extra: usize,
    },
}

/// One block of an image: the SHA-256 of its bytes, its length, and whether it is all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    hash: [u8; 32],
    len: u32,
    zero: bool,
}

impl BlockEntry {
    /// SHA-256 of the block's bytes (only the bytes present, for a short last block).
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// Length of the block in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True for an empty block (never produced by indexing).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when every byte of the block is zero.
    pub fn is_zero(&self) -> bool {
        self.zero
    }
}

/// Hashes of all-zero blocks, by length.
///
/// An index may name a great many lengths (content-defined chunks of up to 4 MiB, one per
/// block of an index from outside), so a length must not cost its own length of hashing:
/// SHA-256 states after 0, [`LADDER_STEP`], 2 × [`LADDER_STEP`], … zero bytes are kept up to
/// the longest length asked for (104 bytes a rung: 850 KiB for 4 MiB), and the hash of `len`
/// zeros goes on from the rung below it, hashing fewer than [`LADDER_STEP`] bytes. The
/// hashes found are kept too, up to [`ZERO_HASHES_KEPT`] lengths.
#[derive(Default)]
struct ZeroHashes {
    known: HashMap<u32, [u8; 32]>,
    /// `ladder[k]` has hashed `k * LADDER_STEP` zero bytes.
    ladder: Vec<Sha256>,
}

/// Zero bytes between two rungs of the [`ZeroHashes`] ladder.
const LADDER_STEP: usize = 512;
/// Lengths whose zero hash [`ZeroHashes`] keeps (a fixed-size index has two, a content-defined
/// one of an image at most as many as its chunk size allows).
const ZERO_HASHES_KEPT: usize = 1 << 14;

impl ZeroHashes {
    fn hash(&mut self, len: u32) -> [u8; 32] {
        if let Some(hash) = self.known.get(&len) {
            return *hash;
        }
        let hash = if len > MAX_BLOCK_LEN {
            // Longer than any block: never asked for by the decoders, which check lengths
            // first.
            zero_hash(len as usize)
        } else {
            let (rung, rest) = (len as usize / LADDER_STEP, len as usize % LADDER_STEP);
            while self.ladder.len() <= rung {
                let next = match self.ladder.last() {
                    Some(below) => {
                        let mut next = below.clone();
                        next.update([0u8; LADDER_STEP]);
                        next
                    }
                    None => Sha256::new(),
                };
                self.ladder.push(next);
            }
            let mut hasher = self.ladder[rung].clone();
            hasher.update(&[0u8; LADDER_STEP][..rest]);
            hasher.finalize().into()
        };
        if self.known.len() < ZERO_HASHES_KEPT {
            self.known.insert(len, hash);
        }
        hash
    }

    fn entry(&mut self, hash: [u8; 32], len: u32) -> BlockEntry {
        let zero_ref = self.hash(len);
        BlockEntry {
            hash,
            len,
            zero: hash == zero_ref,
        }
    }

    /// The all-zero block of `len` bytes.
    fn zero_entry(&mut self, len: u32) -> BlockEntry {
        BlockEntry {
            hash: self.hash(len),
            len,
            zero: true,
        }
    }

    /// The block of `len` bytes whose hash, or hash prefix, an encoding holds. A prefix that
    /// is the zero hash's is a zero block; any other stays a prefix (followed by zero bytes)
    /// until it is resolved.
    fn read_entry(&mut self, hash: &[u8], len: u32) -> BlockEntry {
        if let Ok(hash) = <[u8; 32]>::try_from(hash) {
            return self.entry(hash, len);
        }
        let zero = self.hash(len);
        if hash == &zero[..hash.len()] {
            return self.zero_entry(len);
        }
        let mut prefix = [0u8; 32];
        prefix[..hash.len()].copy_from_slice(hash);
        BlockEntry {
            hash: prefix,
            len,
            zero: false,
        }
    }
}

/// Block index of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    chunking: Chunking,
    image_len: u64,
    image_digest: [u8; 32],
    blocks: Vec<BlockEntry>,
}

impl BlockIndex {
    /// Indexes the image read from `reader` in fixed-size blocks.
    ///
    /// Refuses a block size that is not a power of two between [`MIN_BLOCK_SIZE`] and
    /// [`MAX_BLOCK_SIZE`]. Short reads are handled; `Interrupted` reads are retried.
    pub fn from_reader(reader: impl Read, block_size: u32) -> Result<Self, IndexError> {
        Self::build(reader, Chunking::Fixed { block_size }, |_, _| {})
    }

    /// Indexes the image read from `reader` with `chunking`, calling `each(offset, block)`
    /// for every block as soon as it is hashed. Memory stays at one read buffer plus the
    /// index itself, whatever the image size.
    pub fn build(
        mut reader: impl Read,
        chunking: Chunking,
        mut each: impl FnMut(u64, &BlockEntry),
    ) -> Result<Self, IndexError> {
        let chunking = chunking.validate()?;
        let mut zeros = ZeroHashes::default();
        let mut blocks = Vec::new();
        let mut image_len = 0u64;
        let mut emit = |hash: [u8; 32], len: usize, image_len: &mut u64| {
            let entry = zeros.entry(hash, len as u32);
            each(*image_len, &entry);
            blocks.push(entry);
            *image_len += len as u64;
        };
        match chunking {
            Chunking::Fixed { block_size } => {
                let bs = block_size as usize;
                let mut buf = vec![0u8; READ_BUFFER.max(bs)];
                loop {
                    let filled =
                        fill(&mut reader, &mut buf).map_err(|(done, source)| IndexError::Read {
                            offset: image_len + done as u64,
                            source,
                        })?;
                    for block in buf[..filled].chunks(bs) {
                        emit(sha256(block), block.len(), &mut image_len);
                    }
                    if filled < buf.len() {
                        break;
                    }
                }
            }
            Chunking::ContentDefined { avg } => {
                let mut chunker = Chunker::new(ChunkParams::new(avg));
                chunker
                    .run(&mut reader, |chunk| {
                        emit(sha256(chunk), chunk.len(), &mut image_len)
                    })
                    .map_err(|(offset, source)| IndexError::Read { offset, source })?;
            }
        }
        let image_digest = compute_digest(image_len, &blocks);
        Ok(Self {
            chunking,
            image_len,
            image_digest,
            blocks,
        })
    }

    /// How the image was cut.
    pub fn chunking(&self) -> Chunking {
        self.chunking
    }

    /// Bytes per block for fixed chunking, the average chunk size for content-defined.
    pub fn block_size(&self) -> u32 {
        self.chunking.code().1
    }

    /// Length of the image in bytes.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// The image digest (see the [module documentation](self)).
    pub fn image_digest(&self) -> &[u8; 32] {
        &self.image_digest
    }

    /// The blocks, in image order.
    pub fn blocks(&self) -> &[BlockEntry] {
        &self.blocks
    }

    /// The blocks with their offsets in the image, in image order.
    pub fn blocks_with_offsets(&self) -> impl Iterator<Item = (u64, &BlockEntry)> {
        self.blocks.iter().scan(0u64, |offset, b| {
            let at = *offset;
            *offset += u64::from(b.len);
            Some((at, b))
        })
    }

    /// Number of distinct non-zero block contents: the most blocks a transfer may have to send.
    pub fn distinct_blocks(&self) -> usize {
        self.blocks
            .iter()
            .filter(|b| !b.zero)
            .map(|b| b.hash)
            .collect::<HashSet<_>>()
            .len()
    }

    /// Number of all-zero blocks (a short all-zero last block included).
    pub fn zero_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.zero).count()
    }

    /// Indices of the non-zero blocks whose hash is not in `have`, in image order; a hash
    /// occurring several times is listed once, at its first index.
    pub fn missing_from(&self, have: &HashSet<[u8; 32]>) -> Vec<usize> {
        self.missing_by(|h| have.contains(h))
    }

    /// Like [`missing_from`](Self::missing_from) with any membership test.
    pub fn missing_by(&self, mut have: impl FnMut(&[u8; 32]) -> bool) -> Vec<usize> {
        let mut listed = HashSet::new();
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.zero && !have(&b.hash) && listed.insert(b.hash))
            .map(|(i, _)| i)
            .collect()
    }

    /// Size of the encoding in bytes.
    pub fn encoded_len(&self) -> usize {
        let per_block = match self.chunking {
            Chunking::Fixed { .. } => 32,
            Chunking::ContentDefined { .. } => 36,
        };
        HEADER_LEN + per_block * self.blocks.len()
    }

    /// Encodes the index in the format described in the [module documentation](self).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the encoding of [`to_bytes`](Self::to_bytes) to `out` without building it in
    /// memory first (`out` had better be buffered).
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        out.write_all(&self.to_bytes_header())?;
        let cdc = matches!(self.chunking, Chunking::ContentDefined { .. });
        for block in &self.blocks {
            if cdc {
                out.write_all(&block.len.to_be_bytes())?;
            }
            out.write_all(&block.hash)?;
        }
        Ok(())
    }

    /// Decodes an index written by [`to_bytes`](Self::to_bytes), refusing truncated input, a
    /// wrong magic, an unknown version or chunking, an invalid size, block lengths or a count
    /// inconsistent with the image length, a digest that does not match the blocks, and
    /// trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IndexError> {
        let mut input = Input {
            reader: bytes,
            offset: 0,
            len: bytes.len(),
        };
        // The encoding is at hand: its length is real, and the block list is allocated once
        // its count fits it.
        let mut blocks = Reserving(Vec::new());
        let head = read_hashed(&mut input, Width::Full, &mut blocks)?;
        head.with(blocks.0).verified()
    }

    /// Encodes the index in the compact form: the same header with magic `CRTOCIX` and
    /// version 1, each hash cut to its first [`PREFIX_LEN`] bytes. A receiver that holds every
    /// block resolves the prefixes against its store and checks the result against the
    /// image digest, which stays complete.
    pub fn to_compact_bytes(&self) -> Vec<u8> {
        let full = self.to_bytes();
        let per_block = if matches!(self.chunking, Chunking::Fixed { .. }) {
            32
        } else {
            36
        };
        let mut out = Vec::with_capacity(HEADER_LEN + self.blocks.len() * (per_block - 24));
        out.extend_from_slice(COMPACT_MAGIC);
        out.push(COMPACT_VERSION);
        out.extend_from_slice(&full[8..HEADER_LEN]);
        for rec in full[HEADER_LEN..].chunks_exact(per_block) {
            out.extend_from_slice(&rec[..per_block - 32 + PREFIX_LEN]);
        }
        out
    }

    /// Encodes the index in the session form, for a host that was asked about the image's
    /// distinct non-zero blocks in order of first appearance (as a push asks): the header
    /// of [`to_bytes`](Self::to_bytes) with magic `CRTOSIX` and version 1, then per block
    /// its length (u32, content-defined chunking only) and a LEB128 reference: 0 for a zero
    /// block, 1 for the next block the host was asked about, `2 + j` for a repeat of the
    /// `j`-th. Mostly runs of 0 and 1, it compresses to almost nothing, where the compact
    /// form repeats 8 bytes per distinct block that the questions already carried.
    pub fn to_session_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.blocks.len() * 2);
        out.extend_from_slice(SESSION_MAGIC);
        out.push(SESSION_VERSION);
        out.extend_from_slice(&self.to_bytes_header()[8..]);
        let cdc = matches!(self.chunking, Chunking::ContentDefined { .. });
        let mut first: HashMap<[u8; 32], u64> = HashMap::new();
        for b in &self.blocks {
            if cdc {
                out.extend_from_slice(&b.len.to_be_bytes());
            }
            let reference = if b.zero {
                0
            } else if let Some(j) = first.get(&b.hash) {
                2 + j
            } else {
                first.insert(b.hash, first.len() as u64);
                1
            };
            leb128(&mut out, reference);
        }
        out
    }

    fn to_bytes_header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        let (kind, size) = self.chunking.code();
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(kind);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&self.image_len.to_be_bytes());
        out.extend_from_slice(&self.image_digest);
        out.extend_from_slice(&(self.blocks.len() as u64).to_be_bytes());
        out
    }

    /// Decodes the compact form, resolving each non-zero hash prefix with `resolve`. Returns
    /// the number of prefixes `resolve` did not know when there are any.
    pub fn from_compact_bytes(
        bytes: &[u8],
        resolve: impl FnMut(&[u8; PREFIX_LEN]) -> Option<[u8; 32]>,
    ) -> Result<Resolved, IndexError> {
        PrefixIndex::read_compact(bytes, bytes.len())?.resolve(resolve)
    }

    /// Checks the image digest against the block list: the last check of every decoding.
    fn verified(self) -> Result<Self, IndexError> {
        let computed = compute_digest(self.image_len, &self.blocks);
        if computed != self.image_digest {
            return Err(IndexError::DigestMismatch {
                found: hex::encode(self.image_digest),
                computed: hex::encode(computed),
            });
        }
        Ok(self)
    }
}

/// An index read from its compact or session form, before its hash prefixes are resolved:
/// each block's length and, for a non-zero block, the first [`PREFIX_LEN`] bytes of its hash
/// (a zero block is recognised by the prefix of the zero hash of its length, and holds that
/// hash whole).
///
/// It is read from any [`Read`], a zstd decoder for instance, field by field as the bytes
/// come: they are never held whole, and nothing is expanded into another form first. What it
/// holds is the blocks (40 bytes each), in a list that grows as their records arrive (never
/// reserved from the header's count, which a frame may declare the bytes for and not hold);
/// resolving them ([`resolve`](Self::resolve)) replaces the prefixes in place. A host reads
/// an index from outside twice: first without keeping its blocks
/// ([`check_compact`](Self::check_compact), [`check_session`](Self::check_session)), and
/// only if that finds it would be accepted, to keep them.
#[derive(Debug)]
pub struct PrefixIndex {
    /// The blocks, each non-zero one holding its prefix followed by zero bytes; the digest is
    /// not checked yet.
    index: BlockIndex,
    /// For a session index: what the compact form of the same blocks is refused for (a
    /// content-defined chunk size or chunk length), returned by [`resolve`](Self::resolve).
    fault: Option<IndexError>,
}

impl PrefixIndex {
    /// Reads a compact index ([`BlockIndex::to_compact_bytes`]) of `len` bytes from `reader`,
    /// with every check of [`BlockIndex::from_bytes`] but the digest's, which needs the whole
    /// hashes ([`resolve`](Self::resolve)). `len` is the encoding's length (a zstd frame
    /// declares it): a field it cannot hold is refused before it is read, and nothing is read
    /// beyond it (the caller sees to what follows).
    pub fn read_compact(reader: impl Read, len: usize) -> Result<Self, IndexError> {
        let mut input = Input {
            reader,
            offset: 0,
            len,
        };
        let mut blocks = Vec::new();
        let head = read_hashed(&mut input, Width::Prefix, &mut blocks)?;
        Ok(Self {
            index: head.with(blocks),
            fault: None,
        })
    }

    /// Reads a compact index as [`read_compact`](Self::read_compact) does, with the same
    /// errors, but keeps none of its blocks: each is resolved as it comes (`resolve` is
    /// given runs of up to [`CHECK_RUN`] blocks, see [`resolve_run`]) and goes into the
    /// image digest. What [`resolve`](Self::resolve) would find ([`Checked::outcome`]) is
    /// so known for what the index costs to read, before anything is held for its blocks.
    pub fn check_compact(
        reader: impl Read,
        len: usize,
        resolve: impl FnMut(&mut [BlockEntry]) -> usize,
    ) -> Result<Checked, IndexError> {
        let mut input = Input {
            reader,
            offset: 0,
            len,
        };
        let mut check = Checker::new(resolve);
        let head = read_hashed(&mut input, Width::Prefix, &mut check)?;
        Ok(check.finish(head, None))
    }

    /// [`check_compact`](Self::check_compact) for a session index, with the errors of
    /// [`read_session`](Self::read_session).
    pub fn check_session(
        reader: impl Read,
        len: usize,
        asked: &[[u8; PREFIX_LEN]],
        resolve: impl FnMut(&mut [BlockEntry]) -> usize,
    ) -> Result<Checked, IndexError> {
        let mut input = Input {
            reader,
            offset: 0,
            len,
        };
        let mut check = Checker::new(resolve);
        let (head, fault) = read_session(&mut input, asked, &mut check)?;
        Ok(check.finish(head, fault))
    }

    /// Reads a session index ([`BlockIndex::to_session_bytes`]) of `len` bytes from `reader`
    /// (see [`read_compact`](Self::read_compact)), the `n`-th new block taking the `n`-th of
    /// `asked` (the prefixes the host was asked about, in order). An error says the encoding
    /// does not fit the session: its structure, its count, its references. What the compact
    /// form of the same blocks would be refused for is not such an error: it is kept, and
    /// [`resolve`](Self::resolve) returns it.
    pub fn read_session(
        reader: impl Read,
        len: usize,
        asked: &[[u8; PREFIX_LEN]],
    ) -> Result<Self, IndexError> {
        let mut input = Input {
            reader,
            offset: 0,
            len,
        };
        let mut blocks = Vec::new();
        let (head, fault) = read_session(&mut input, asked, &mut blocks)?;
        Ok(Self {
            index: head.with(blocks),
            fault,
        })
    }

    /// How the image was cut.
    pub fn chunking(&self) -> Chunking {
        self.index.chunking
    }

    /// Length of the image in bytes, as the header says.
    pub fn image_len(&self) -> u64 {
        self.index.image_len
    }

    /// Number of blocks held (none when [`resolve`](Self::resolve) will fail).
    pub fn block_count(&self) -> usize {
        self.index.blocks.len()
    }

    /// Resolves each non-zero block's prefix with `resolve` and checks the image digest.
    /// Returns the number of prefixes `resolve` did not know when there are any.
    pub fn resolve(
        self,
        mut resolve: impl FnMut(&[u8; PREFIX_LEN]) -> Option<[u8; 32]>,
    ) -> Result<Resolved, IndexError> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        let mut index = self.index;
        let unresolved = resolve_run(&mut index.blocks, &mut resolve);
        if unresolved > 0 {
            return Ok(Resolved::Unresolved(unresolved));
        }
        index.verified().map(Resolved::Index)
    }
}

/// Resolves each non-zero block of `blocks` (read from a compact or session form: its hash
/// is its prefix followed by zero bytes) with `resolve`, in place; returns how many
/// `resolve` did not know (those keep their prefix).
pub fn resolve_run(
    blocks: &mut [BlockEntry],
    mut resolve: impl FnMut(&[u8; PREFIX_LEN]) -> Option<[u8; 32]>,
) -> usize {
    let mut unresolved = 0usize;
    for block in blocks.iter_mut().filter(|b| !b.zero) {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&block.hash[..PREFIX_LEN]);
        match resolve(&prefix) {
            Some(hash) => block.hash = hash,
            None => unresolved += 1,
        }
    }
    unresolved
}

/// Blocks a [`PrefixIndex::check_compact`] or [`PrefixIndex::check_session`] resolves at a
/// time (160 KiB of them).
pub const CHECK_RUN: usize = 4096;

/// What reading a compact or session index without keeping its blocks found
/// ([`PrefixIndex::check_compact`], [`PrefixIndex::check_session`]).
#[derive(Debug)]
pub struct Checked {
    fault: Option<IndexError>,
    unresolved: usize,
    image_digest: [u8; 32],
    computed: [u8; 32],
}

impl Checked {
    /// What [`PrefixIndex::resolve`] of the same index, against the same resolver, gives,
    /// without the index: `Ok(0)` for an index that resolves whole and matches its digest,
    /// `Ok(n)` when `n` prefixes are unknown, and the error it is refused for.
    pub fn outcome(self) -> Result<usize, IndexError> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        if self.unresolved > 0 {
            return Ok(self.unresolved);
        }
        if self.computed != self.image_digest {
            return Err(IndexError::DigestMismatch {
                found: hex::encode(self.image_digest),
                computed: hex::encode(self.computed),
            });
        }
        Ok(0)
    }
}

/// Where a decoder puts the blocks it reads, in order.
trait Blocks {
    /// The image length, once the header is read (before any block).
    fn start(&mut self, _image_len: u64) {}
    /// The header's count fits the encoding, which is really at hand.
    fn reserve(&mut self, _count: usize) {}
    fn push(&mut self, block: BlockEntry);
    /// A fault was found: no block is kept, and none follows.
    fn discard(&mut self);
}

/// A block list that grows as blocks arrive: never more than a fixed multiple of what was
/// decoded, whatever a header announces.
impl Blocks for Vec<BlockEntry> {
    fn push(&mut self, block: BlockEntry) {
        Vec::push(self, block);
    }

    fn discard(&mut self) {
        *self = Vec::new();
    }
}

/// A block list allocated at the count once the encoding, held whole, has the bytes for it.
struct Reserving(Vec<BlockEntry>);

impl Blocks for Reserving {
    fn reserve(&mut self, count: usize) {
        self.0.reserve_exact(count);
    }

    fn push(&mut self, block: BlockEntry) {
        self.0.push(block);
    }

    fn discard(&mut self) {
        self.0 = Vec::new();
    }
}

/// The blocks of a [`Checked`] index: resolved a run at a time, fed into the digest,
/// dropped.
struct Checker<F> {
    resolve: F,
    run: Vec<BlockEntry>,
    digest: Sha256,
    unresolved: usize,
}

impl<F: FnMut(&mut [BlockEntry]) -> usize> Checker<F> {
    fn new(resolve: F) -> Self {
        Self {
            resolve,
            run: Vec::with_capacity(CHECK_RUN),
            digest: Sha256::new(),
            unresolved: 0,
        }
    }

    fn flush(&mut self) {
        if self.run.is_empty() {
            return;
        }
        self.unresolved += (self.resolve)(&mut self.run);
        // With a prefix unknown the digest cannot be checked (resolving is what fails).
        if self.unresolved == 0 {
            for b in &self.run {
                self.digest.update(b.len.to_be_bytes());
                self.digest.update(b.hash);
            }
        }
        self.run.clear();
    }

    fn finish(mut self, head: Head, fault: Option<IndexError>) -> Checked {
        self.flush();
        Checked {
            fault,
            unresolved: self.unresolved,
            image_digest: head.image_digest,
            computed: self.digest.finalize().into(),
        }
    }
}

impl<F: FnMut(&mut [BlockEntry]) -> usize> Blocks for Checker<F> {
    fn start(&mut self, image_len: u64) {
        self.digest.update(DIGEST_DOMAIN);
        self.digest.update(image_len.to_be_bytes());
    }

    fn push(&mut self, block: BlockEntry) {
        self.run.push(block);
        if self.run.len() == CHECK_RUN {
            self.flush();
        }
    }

    fn discard(&mut self) {
        self.run = Vec::new();
        self.unresolved = 0;
    }
}

/// What an index's header says, besides its count.
struct Head {
    chunking: Chunking,
    image_len: u64,
    image_digest: [u8; 32],
}

impl Head {
    fn with(self, blocks: Vec<BlockEntry>) -> BlockIndex {
        BlockIndex {
            chunking: self.chunking,
            image_len: self.image_len,
            image_digest: self.image_digest,
            blocks,
        }
    }
}

/// How each block's hash is written in the full and the compact form.
#[derive(Debug, Clone, Copy)]
enum Width {
    /// The whole hash (`CRTOIDX`).
    Full,
    /// Its first [`PREFIX_LEN`] bytes (`CRTOCIX`).
    Prefix,
}

/// Reads the full or the compact form, checking everything but the digest (which needs whole
/// hashes), in this order: magic, version, chunking, size, the header's fields, the count
/// (at most [`MAX_IMAGE_BLOCKS`], and for fixed blocks the image length's), the bytes for the
/// blocks, each chunk length, their sum, and nothing after the last block.
fn read_hashed<R: Read>(
    input: &mut Input<R>,
    width: Width,
    blocks: &mut impl Blocks,
) -> Result<Head, IndexError> {
    let (magic_ref, version_ref, width) = match width {
        Width::Full => (MAGIC, FORMAT_VERSION, 32),
        Width::Prefix => (COMPACT_MAGIC, COMPACT_VERSION, PREFIX_LEN),
    };
    let magic = input.array::<7>("magic")?;
    if &magic != magic_ref {
        return Err(IndexError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let version = input.array::<1>("version")?[0];
    if version != version_ref {
        return Err(IndexError::UnsupportedVersion { version });
    }
    let kind = input.array::<1>("chunking")?[0];
    let size = u32::from_be_bytes(input.array("size")?);
    let chunking = match kind {
        0 => Chunking::Fixed { block_size: size },
        1 => Chunking::ContentDefined { avg: size },
        kind => return Err(IndexError::UnknownChunking { kind }),
    };
    if chunking.validate().is_err() {
        return Err(IndexError::EncodedBlockSize {
            size,
            chunking: if kind == 0 {
                "fixed"
            } else {
                "content-defined"
            },
        });
    }
    let image_len = u64::from_be_bytes(input.array("image length")?);
    let image_digest = input.array::<32>("image digest")?;
    let count = u64::from_be_bytes(input.array("block count")?);
    if count > MAX_IMAGE_BLOCKS {
        return Err(IndexError::TooManyBlocks { count });
    }
    let mut zeros = ZeroHashes::default();
    let mut hash = [0u8; 32];
    let hash = &mut hash[..width];
    blocks.start(image_len);
    match chunking {
        Chunking::Fixed { block_size } => {
            check_block_count(count, image_len, block_size)?;
            // count <= MAX_IMAGE_BLOCKS, so count * 32 cannot overflow.
            input.need("block hashes", count * width as u64)?;
            blocks.reserve(count as usize);
            for i in 0..count {
                input.fill(hash)?;
                let len = fixed_len(i, count, image_len, block_size);
                blocks.push(zeros.read_entry(hash, len));
            }
        }
        Chunking::ContentDefined { avg } => {
            input.need("blocks", count * (4 + width as u64))?;
            blocks.reserve(count as usize);
            let max = ChunkParams::new(avg).max as u32;
            let mut total = 0u64;
            for i in 0..count {
                let at = input.offset;
                let len = u32::from_be_bytes(input.array("block length")?);
                if len == 0 || len > max {
                    return Err(IndexError::BadBlockLength {
                        block: i,
                        offset: at,
                        problem: format!("length {len} is not within 1..={max}"),
                    });
                }
                total += u64::from(len);
                input.fill(hash)?;
                blocks.push(zeros.read_entry(hash, len));
            }
            if total != image_len {
                return Err(lengths_do_not_add_up(count, total, image_len));
            }
        }
    }
    input.at_end()?;
    Ok(Head {
        chunking,
        image_len,
        image_digest,
    })
}

/// Reads the session form against `asked`. The checks and their order are those the session
/// form had when it was expanded into the compact form first: the session's own (magic,
/// version, the header's fields, the count against [`MAX_IMAGE_BLOCKS`] and against the bytes
/// left, for fixed blocks the block size and the count against the image length, each
/// reference, nothing after the last block) are errors; the compact form's (the chunk size,
/// each chunk length, their sum) become the [`PrefixIndex`]'s fault. A fault found, no block
/// is kept, and none is hashed: only the references are still checked.
fn read_session<R: Read>(
    input: &mut Input<R>,
    asked: &[[u8; PREFIX_LEN]],
    blocks: &mut impl Blocks,
) -> Result<(Head, Option<IndexError>), IndexError> {
    let bad = |offset: usize, problem: String| IndexError::BadSessionIndex { offset, problem };
    let magic = input.array::<7>("magic")?;
    if &magic != SESSION_MAGIC {
        return Err(bad(
            0,
            format!(
                "expected magic \"CRTOSIX\", found \"{}\"",
                magic.escape_ascii()
            ),
        ));
    }
    let version = input.array::<1>("version")?[0];
    if version != SESSION_VERSION {
        return Err(bad(7, format!("unsupported version {version}")));
    }
    let kind = input.array::<1>("chunking")?[0];
    let size = u32::from_be_bytes(input.array("size")?);
    let image_len = u64::from_be_bytes(input.array("image length")?);
    let image_digest = input.array::<32>("image digest")?;
    let count = u64::from_be_bytes(input.array("block count")?);
    if count > MAX_IMAGE_BLOCKS {
        return Err(IndexError::TooManyBlocks { count });
    }
    // Every block takes at least one byte here: more blocks than bytes is a lie, and what is
    // allocated for the blocks stays within a fixed multiple of what was sent.
    if count > input.remaining() as u64 {
        return Err(bad(
            input.offset,
            format!("{count} blocks announced in {} bytes", input.remaining()),
        ));
    }
    let mut fault = None;
    let chunking = match kind {
        0 => {
            if !valid_block_size(size) {
                return Err(IndexError::EncodedBlockSize {
                    size,
                    chunking: "fixed",
                });
            }
            check_block_count(count, image_len, size)?;
            Chunking::Fixed { block_size: size }
        }
        1 => {
            let chunking = Chunking::ContentDefined { avg: size };
            if chunking.validate().is_err() {
                fault = Some(IndexError::EncodedBlockSize {
                    size,
                    chunking: "content-defined",
                });
            }
            chunking
        }
        kind => return Err(IndexError::UnknownChunking { kind }),
    };
    let max = match chunking {
        Chunking::ContentDefined { avg } if fault.is_none() => ChunkParams::new(avg).max as u32,
        _ => 0,
    };
    // The blocks arrive as records do (a count that fits the bytes a frame declares is no
    // reason to hold anything yet).
    blocks.start(image_len);
    let mut zeros = ZeroHashes::default();
    let mut total = 0u64;
    // New blocks so far: the next one takes asked[next].
    let mut next = 0usize;
    for i in 0..count {
        let len = match chunking {
            Chunking::Fixed { block_size } => fixed_len(i, count, image_len, block_size),
            Chunking::ContentDefined { .. } => {
                let at = input.offset;
                let len = u32::from_be_bytes(input.array("block length")?);
                if fault.is_none() && (len == 0 || len > max) {
                    fault = Some(IndexError::BadBlockLength {
                        block: i,
                        offset: at,
                        problem: format!("length {len} is not within 1..={max}"),
                    });
                    blocks.discard();
                }
                total += u64::from(len);
                len
            }
        };
        let at = input.offset;
        let prefix = match read_leb128(input)? {
            0 => None,
            1 => {
                let p = asked.get(next).ok_or_else(|| {
                    bad(
                        at,
                        format!(
                            "block {i} is new block {next}, but the host was asked about {} blocks",
                            asked.len()
                        ),
                    )
                })?;
                next += 1;
                Some(p)
            }
            r => match usize::try_from(r - 2)
                .ok()
                .and_then(|j| asked[..next].get(j))
            {
                Some(p) => Some(p),
                None => {
                    return Err(bad(
                        at,
                        format!(
                            "block {i} repeats new block {}, of which there are {next} so far",
                            r - 2
                        ),
                    ));
                }
            },
        };
        if fault.is_none() {
            blocks.push(match prefix {
                None => zeros.zero_entry(len),
                Some(p) => zeros.read_entry(p, len),
            });
        }
    }
    input.at_end()?;
    if fault.is_none() && matches!(chunking, Chunking::ContentDefined { .. }) && total != image_len
    {
        fault = Some(lengths_do_not_add_up(count, total, image_len));
        blocks.discard();
    }
    Ok((
        Head {
            chunking,
            image_len,
            image_digest,
        },
        fault,
    ))
}

/// Length of block `i` of `count` fixed-size blocks of an `image_len`-byte image: the last one
/// may be short.
fn fixed_len(i: u64, count: u64, image_len: u64, block_size: u32) -> u32 {
    match image_len % u64::from(block_size) {
        short if short != 0 && i + 1 == count => short as u32,
        _ => block_size,
    }
}

fn lengths_do_not_add_up(count: u64, total: u64, image_len: u64) -> IndexError {
    IndexError::BadBlockLength {
        block: count,
        offset: HEADER_LEN,
        problem: format!("block lengths add up to {total} bytes, not the image length {image_len}"),
    }
}

/// Outcome of decoding a compact index.
#[derive(Debug)]
pub enum Resolved {
    /// Every prefix was resolved and the digest matches.
    Index(BlockIndex),
    /// This many prefixes are unknown to the resolver.
    Unresolved(usize),
}

fn compute_digest(image_len: u64, blocks: &[BlockEntry]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DIGEST_DOMAIN);
    h.update(image_len.to_be_bytes());
    for b in blocks {
        h.update(b.len.to_be_bytes());
        h.update(b.hash);
    }
    h.finalize().into()
}

fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of `len` zero bytes, without allocating them.
fn zero_hash(len: usize) -> [u8; 32] {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut hasher = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        hasher.update(&ZEROS[..n]);
        left -= n;
    }
    hasher.finalize().into()
}

/// A fixed-block index of an `image_len`-byte image must list exactly this many blocks.
fn check_block_count(count: u64, image_len: u64, block_size: u32) -> Result<(), IndexError> {
    let expected = image_len.div_ceil(u64::from(block_size));
    if count != expected {
        return Err(IndexError::BlockCountMismatch {
            count,
            expected,
            image_len,
            block_size,
        });
    }
    Ok(())
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb128<R: Read>(input: &mut Input<R>) -> Result<u64, IndexError> {
    let start = input.offset;
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = input.array::<1>("block reference")?[0];
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(IndexError::BadSessionIndex {
        offset: start,
        problem: "block reference longer than 10 bytes".into(),
    })
}

/// An encoding read field by field from `reader` as its bytes come. Its length is known
/// beforehand (a slice's, or the content size its zstd frame declares), so a field the input
/// cannot hold is refused before it is read or anything is allocated for it, with the same
/// offsets and counts as when the whole encoding is at hand; nothing is read beyond it.
struct Input<R> {
    reader: R,
    /// Bytes read so far: the offset of the next field.
    offset: usize,
    /// Length of the encoding.
    len: usize,
}

impl<R: Read> Input<R> {
    fn remaining(&self) -> usize {
        self.len - self.offset
    }

    /// Refuses `field` if fewer than `needed` bytes remain.
    fn need(&self, field: &'static str, needed: u64) -> Result<(), IndexError> {
        if needed > self.remaining() as u64 {
            return Err(IndexError::Truncated {
                field,
                offset: self.offset,
                needed,
                available: self.remaining(),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes, which [`need`](Self::need) has checked the encoding holds.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), IndexError> {
        self.reader
            .read_exact(buf)
            .map_err(|source| IndexError::Input {
                offset: self.offset,
                source,
            })?;
        self.offset += buf.len();
        Ok(())
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], IndexError> {
        self.need(field, N as u64)?;
        let mut out = [0u8; N];
        self.fill(&mut out)?;
        Ok(out)
    }

    /// Refuses bytes after the last block (without reading them).
    fn at_end(&self) -> Result<(), IndexError> {
        if self.offset < self.len {
            return Err(IndexError::TrailingBytes {
                offset: self.offset,
                extra: self.remaining(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod legacy;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(data: &[u8], block_size: u32) -> BlockIndex {
        BlockIndex::from_reader(data, block_size).expect("indexing an in-memory image succeeds")
    }

    fn cdc(data: &[u8], avg: u32) -> BlockIndex {
        BlockIndex::build(data, Chunking::ContentDefined { avg }, |_, _| {})
            .expect("indexing an in-memory image succeeds")
    }

    /// What a host asked by a push knows: the distinct non-zero prefixes, first seen first.
    fn asked(index: &BlockIndex) -> Vec<[u8; PREFIX_LEN]> {
        let mut seen = HashSet::new();
        index
            .blocks()
            .iter()
            .filter(|b| !b.is_zero() && seen.insert(b.hash))
            .map(|b| b.hash[..PREFIX_LEN].try_into().expect("8 bytes"))
            .collect()
    }

    /// The resolver of a host that holds every block of `index`.
    fn holder(index: &BlockIndex) -> HashMap<[u8; PREFIX_LEN], [u8; 32]> {
        index
            .blocks()
            .iter()
            .map(|b| (b.hash[..PREFIX_LEN].try_into().expect("8"), b.hash))
            .collect()
    }

    fn read_session(bytes: &[u8], asked: &[[u8; PREFIX_LEN]]) -> Result<PrefixIndex, IndexError> {
        PrefixIndex::read_session(bytes, bytes.len(), asked)
    }

    /// An image with repeats, zeros and a short tail.
    fn repetitive_image() -> Vec<u8> {
        let mut data = Vec::new();
        for i in 0..300u32 {
            let fill = if i % 7 == 0 { 0 } else { (i % 50) as u8 };
            data.extend(std::iter::repeat_n(fill, 4096));
        }
        data.extend_from_slice(b"tail");
        data
    }

    #[test]
    fn the_session_form_reads_as_the_compact_form_and_resolves_to_the_index() {
        let data = repetitive_image();
        for idx in [index(&data, 4096), cdc(&data, 1024)] {
            let asked = asked(&idx);
            let session = idx.to_session_bytes();
            let per_block = match idx.chunking() {
                Chunking::Fixed { .. } => 2,
                Chunking::ContentDefined { .. } => 6,
            };
            assert!(
                session.len() <= 61 + idx.blocks().len() * per_block,
                "{}",
                session.len()
            );
            let compact = idx.to_compact_bytes();
            let from_compact =
                PrefixIndex::read_compact(&compact[..], compact.len()).expect("reads");
            // Read from a stream that gives a few bytes at a time and is interrupted: the
            // same blocks.
            let choppy = Choppy {
                data: &session,
                max: 7,
                interrupt: false,
            };
            let from_session =
                PrefixIndex::read_session(choppy, session.len(), &asked).expect("reads");
            assert!(from_session.fault.is_none() && from_compact.fault.is_none());
            assert_eq!(from_session.index, from_compact.index);
            assert_eq!(from_session.block_count(), idx.blocks().len());
            let full = holder(&idx);
            match from_session.resolve(|p| full.get(p).copied()) {
                Ok(Resolved::Index(back)) => assert_eq!(back, idx),
                other => panic!("{other:?}"),
            }
            // Fewer questions than new blocks, or a damaged reference: refused, with where.
            let err = read_session(&session, &asked[..asked.len() - 1]).expect_err("one short");
            assert!(
                err.to_string().contains("the host was asked about"),
                "{err}"
            );
            let mut bad = session.clone();
            bad.truncate(bad.len() - 1);
            assert!(read_session(&bad, &asked).is_err());
            let mut bad = session.clone();
            bad[0] = b'X';
            let err = read_session(&bad, &asked).expect_err("magic");
            assert!(err.to_string().contains("CRTOSIX"), "{err}");
        }
    }

    #[test]
    fn a_session_index_keeps_what_its_compact_form_is_refused_for_and_names_its_own_offsets() {
        let data = repetitive_image();
        let idx = cdc(&data, 1024);
        let asked = asked(&idx);
        let mut session = idx.to_session_bytes();
        // The third block's length (each block: length (4) + a LEB128 reference).
        let mut at = HEADER_LEN;
        for _ in 0..2 {
            at += 4;
            while session[at] & 0x80 != 0 {
                at += 1;
            }
            at += 1;
        }
        session[at..at + 4].copy_from_slice(&0u32.to_be_bytes());
        // Reading it is no error (it fits the session), resolving it is, at the session
        // form's offset of that length, and no block is kept meanwhile.
        let read = read_session(&session, &asked).expect("fits the session");
        assert_eq!(read.block_count(), 0);
        let err = read.resolve(|_| None).expect_err("length 0");
        assert_eq!(
            err.to_string(),
            format!("block 2 at offset {at}: length 0 is not within 1..=4096")
        );
        // A session fault comes first: the same index, one question short.
        let err = read_session(&session, &asked[..asked.len() - 1]).expect_err("short");
        assert!(matches!(err, IndexError::BadSessionIndex { .. }), "{err}");
        // A huge length of a zero block is never hashed (4 GiB of zeros): refused at once.
        let first_zero = idx
            .blocks()
            .iter()
            .position(BlockEntry::is_zero)
            .expect("a zero");
        let mut session = idx.to_session_bytes();
        let mut at = HEADER_LEN;
        for _ in 0..first_zero {
            at += 4;
            while session[at] & 0x80 != 0 {
                at += 1;
            }
            at += 1;
        }
        assert_eq!(session[at + 4], 0, "a zero block's reference");
        session[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let started = std::time::Instant::now();
        let err = read_session(&session, &asked)
            .expect("fits the session")
            .resolve(|_| None)
            .expect_err("too long");
        assert!(err.to_string().contains("length 4294967295"), "{err}");
        assert!(started.elapsed().as_secs() < 2, "{:?}", started.elapsed());
    }

    fn hashes(idx: &BlockIndex) -> Vec<[u8; 32]> {
        idx.blocks().iter().map(|b| *b.hash()).collect()
    }

    fn decode_err(bytes: &[u8]) -> IndexError {
        BlockIndex::from_bytes(bytes).expect_err("this encoding must be refused")
    }

    /// Returns at most `max` bytes per read, and interrupts every other read.
    struct Choppy<'a> {
        data: &'a [u8],
        max: usize,
        interrupt: bool,
    }

    impl Read for Choppy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.max).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn zero_hashes_come_from_the_ladder_and_match_hashing_the_zeros() {
        assert_eq!(
            size_of::<Sha256>(),
            104,
            "the ladder's cost per rung, as documented"
        );
        let mut zeros = ZeroHashes::default();
        for len in [
            0,
            1,
            511,
            512,
            513,
            4095,
            4096,
            70_000,
            1 << 20,
            MAX_BLOCK_LEN,
        ] {
            assert_eq!(zeros.hash(len), zero_hash(len as usize), "length {len}");
        }
        assert_eq!(zeros.ladder.len(), MAX_BLOCK_LEN as usize / LADDER_STEP + 1);
        let mut zeros = ZeroHashes::default();
        assert_eq!(zeros.hash(1000), zero_hash(1000));
        assert_eq!(zeros.ladder.len(), 2, "rungs only as far as asked");
        assert_eq!(
            zeros.hash(MAX_BLOCK_LEN + 1),
            zero_hash(MAX_BLOCK_LEN as usize + 1)
        );
        assert_eq!(zeros.ladder.len(), 2, "no rung beyond the longest block");
    }

    #[test]
    fn an_index_of_many_long_chunk_lengths_costs_no_hashing_of_their_zeros() {
        // 2000 chunks of distinct lengths near 4 MiB: hashing the zeros of each length, as
        // every decoding must to recognise zero blocks, took 8 GB of SHA-256 (seconds).
        let blocks: Vec<BlockEntry> = (0..2000u32)
            .map(|i| BlockEntry {
                hash: sha256(&i.to_be_bytes()),
                len: MAX_BLOCK_LEN - i,
                zero: false,
            })
            .collect();
        let image_len = blocks.iter().map(|b| u64::from(b.len)).sum();
        let idx = BlockIndex {
            chunking: Chunking::ContentDefined { avg: 1 << 20 },
            image_len,
            image_digest: compute_digest(image_len, &blocks),
            blocks,
        };
        let started = std::time::Instant::now();
        assert_eq!(
            BlockIndex::from_bytes(&idx.to_bytes()).expect("decodes"),
            idx
        );
        let compact = idx.to_compact_bytes();
        let read = PrefixIndex::read_compact(&compact[..], compact.len()).expect("reads");
        assert_eq!(read.block_count(), 2000);
        assert!(started.elapsed().as_secs() < 1, "{:?}", started.elapsed());
    }

    #[test]
    fn empty_image() {
        let idx = index(&[], DEFAULT_BLOCK_SIZE);
        assert_eq!(idx.image_len(), 0);
        assert!(idx.blocks().is_empty());
        assert_eq!(idx.to_bytes().len(), HEADER_LEN);
        assert_eq!(
            BlockIndex::from_bytes(&idx.to_bytes()).expect("decodes"),
            idx
        );
    }

    #[test]
    fn exactly_one_block() {
        let data = vec![7u8; 512];
        let idx = index(&data, 512);
        assert_eq!(hashes(&idx), vec![sha256(&data)]);
        assert_eq!((idx.zero_blocks(), idx.distinct_blocks()), (0, 1));
    }

    #[test]
    fn the_image_digest_is_the_documented_hash_list() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let idx = index(&data, 512);
        let mut h = Sha256::new();
        h.update(b"CRTOIMG2");
        h.update(1000u64.to_be_bytes());
        h.update(512u32.to_be_bytes());
        h.update(sha256(&data[..512]));
        h.update(488u32.to_be_bytes());
        h.update(sha256(&data[512..]));
        let expected: [u8; 32] = h.finalize().into();
        assert_eq!(idx.image_digest(), &expected);
    }

    #[test]
    fn short_last_block_hashes_only_its_bytes() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let idx = index(&data, 512);
        assert_eq!(idx.image_len(), 1000);
        assert_eq!(
            hashes(&idx),
            vec![sha256(&data[..512]), sha256(&data[512..])]
        );
        let lens: Vec<u32> = idx.blocks().iter().map(BlockEntry::len).collect();
        assert_eq!(lens, vec![512, 488]);
    }

    #[test]
    fn zero_blocks_are_recognised_including_a_short_last_one() {
        let mut data = vec![0u8; 512];
        data.extend_from_slice(&[1u8; 512]);
        data.extend_from_slice(&[0u8; 100]);
        let idx = index(&data, 512);
        let zero: Vec<bool> = idx.blocks().iter().map(BlockEntry::is_zero).collect();
        assert_eq!(zero, vec![true, false, true]);
        assert_eq!((idx.zero_blocks(), idx.distinct_blocks()), (2, 1));
        let decoded = BlockIndex::from_bytes(&idx.to_bytes()).expect("valid encoding");
        assert_eq!(decoded, idx);
    }

    #[test]
    fn duplicate_blocks_are_listed_once() {
        let (a, b) = ([1u8; 512], [2u8; 512]);
        let data = [a, a, [0u8; 512], b, a, b].concat();
        let idx = index(&data, 512);
        assert_eq!((idx.distinct_blocks(), idx.zero_blocks()), (2, 1));
        assert_eq!(idx.missing_from(&HashSet::new()), vec![0, 3]);
        assert_eq!(idx.missing_from(&HashSet::from([sha256(&a)])), vec![3]);
    }

    #[test]
    fn block_sizes_outside_the_range_are_refused() {
        for bad in [0, 1, 256, 511, 1000, 4097, 2 << 20] {
            let err = BlockIndex::from_reader(&[][..], bad).expect_err("bad block size");
            assert!(
                matches!(err, IndexError::InvalidBlockSize { block_size } if block_size == bad)
            );
            assert!(err.to_string().contains(&format!("block size {bad} ")));
        }
        for good in [MIN_BLOCK_SIZE, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE] {
            BlockIndex::from_reader(&[1u8; 3000][..], good).expect("valid block size");
        }
        let err = BlockIndex::build(&[][..], Chunking::ContentDefined { avg: 3000 }, |_, _| {})
            .expect_err("bad chunk size");
        assert!(matches!(err, IndexError::InvalidChunkSize { avg: 3000 }));
    }

    #[test]
    fn read_errors_carry_the_image_offset() {
        let failing = (&[1u8; 700][..]).chain(FailingReader);
        let err = BlockIndex::from_reader(failing, 512).expect_err("read fails");
        assert!(matches!(err, IndexError::Read { offset: 700, .. }), "{err}");
    }

    struct FailingReader;
    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }

    fn sample_encoding() -> Vec<u8> {
        let data = [[3u8; 512], [0u8; 512]].concat();
        index(&data, 512).to_bytes()
    }

    #[test]
    fn every_truncation_is_refused() {
        let full = sample_encoding();
        assert_eq!(full.len(), HEADER_LEN + 2 * 32);
        for len in 0..full.len() {
            let err = decode_err(&full[..len]);
            assert!(
                matches!(err, IndexError::Truncated { .. }),
                "length {len}: {err}"
            );
        }
        let err = decode_err(&full[..HEADER_LEN + 40]);
        assert_eq!(
            err.to_string(),
            "block index encoding is truncated: block hashes needs 64 bytes at offset 61 but only \
             40 remain"
        );
    }

    #[test]
    fn wrong_magic_version_chunking_and_block_size_are_refused() {
        let mut bytes = sample_encoding();
        bytes[0] = b'X';
        let err = decode_err(&bytes);
        assert!(err.to_string().contains("found \"XRTOIDX\""), "{err}");

        let mut bytes = sample_encoding();
        bytes[7] = 1;
        let err = decode_err(&bytes);
        assert!(matches!(err, IndexError::UnsupportedVersion { version: 1 }));
        assert!(err.to_string().contains("version 1 at offset 7"), "{err}");

        let mut bytes = sample_encoding();
        bytes[8] = 7;
        assert!(matches!(
            decode_err(&bytes),
            IndexError::UnknownChunking { kind: 7 }
        ));

        let mut bytes = sample_encoding();
        bytes[9..13].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(
            decode_err(&bytes),
            IndexError::EncodedBlockSize { size: 1000, .. }
        ));
    }

    #[test]
    fn inconsistent_block_count_is_refused() {
        let mut bytes = sample_encoding();
        bytes[53..61].copy_from_slice(&3u64.to_be_bytes());
        let err = decode_err(&bytes);
        assert_eq!(
            err.to_string(),
            "block count 3 at offset 53 does not match image length 1024 with block size 512: \
             expected 2 blocks"
        );
        // A huge image length with a matching count must fail before anything is
        // allocated: more blocks than a host takes.
        let mut bytes = sample_encoding();
        bytes[13..21].copy_from_slice(&u64::MAX.to_be_bytes());
        bytes[53..61].copy_from_slice(&u64::MAX.div_ceil(512).to_be_bytes());
        assert!(matches!(
            decode_err(&bytes),
            IndexError::TooManyBlocks { .. }
        ));
        // Within that bound, a count the bytes cannot hold fails as truncated.
        let mut bytes = sample_encoding();
        bytes[13..21].copy_from_slice(&(512 * MAX_IMAGE_BLOCKS).to_be_bytes());
        bytes[53..61].copy_from_slice(&MAX_IMAGE_BLOCKS.to_be_bytes());
        assert!(matches!(
            decode_err(&bytes),
            IndexError::Truncated { offset: 61, .. }
        ));
    }

    #[test]
    fn an_altered_hash_or_digest_is_refused() {
        let mut bytes = sample_encoding();
        bytes[HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            decode_err(&bytes),
            IndexError::DigestMismatch { .. }
        ));
        let mut bytes = sample_encoding();
        bytes[30] ^= 0x80;
        let err = decode_err(&bytes);
        assert!(err.to_string().contains("the index is corrupt"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = sample_encoding();
        bytes.extend_from_slice(b"xyz");
        let err = decode_err(&bytes);
        assert!(
            matches!(
                err,
                IndexError::TrailingBytes {
                    offset: 125,
                    extra: 3
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn content_defined_lengths_are_checked() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let idx = cdc(&data, 1024);
        let mut bytes = idx.to_bytes();
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&0u32.to_be_bytes());
        let err = decode_err(&bytes);
        assert!(
            err.to_string().contains("block 0 at offset 61: length 0"),
            "{err}"
        );
        let mut bytes = idx.to_bytes();
        let first = u32::from_be_bytes([bytes[61], bytes[62], bytes[63], bytes[64]]);
        bytes[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(first - 1).to_be_bytes());
        let err = decode_err(&bytes);
        assert!(err.to_string().contains("add up to"), "{err}");
    }

    fn image() -> impl Strategy<Value = Vec<u8>> {
        let part = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1500),
            (0usize..1500).prop_map(|n| vec![0u8; n]),
        ];
        prop::collection::vec(part, 0..6).prop_map(|parts| parts.concat())
    }

    fn block_size() -> impl Strategy<Value = u32> {
        (9u32..=12).prop_map(|shift| 1 << shift)
    }

    proptest! {
        #[test]
        fn encoding_round_trips(data in image(), bs in block_size()) {
            let idx = index(&data, bs);
            let decoded = BlockIndex::from_bytes(&idx.to_bytes()).expect("own encoding decodes");
            prop_assert_eq!(decoded, idx);
            let idx = cdc(&data, 1024);
            prop_assert_eq!(idx.to_bytes().len(), idx.encoded_len());
            let decoded = BlockIndex::from_bytes(&idx.to_bytes()).expect("own encoding decodes");
            prop_assert_eq!(decoded, idx);
        }

        #[test]
        fn index_matches_direct_chunk_hashes(
            data in image(), bs in block_size(), max in 1usize..700,
        ) {
            let reader = Choppy { data: &data, max, interrupt: false };
            let mut seen = Vec::new();
            let idx = BlockIndex::build(reader, Chunking::Fixed { block_size: bs }, |o, b| {
                seen.push((o, *b));
            })
            .expect("in-memory read succeeds");
            let expected: Vec<BlockEntry> = data
                .chunks(bs as usize)
                .map(|c| BlockEntry {
                    hash: sha256(c),
                    len: c.len() as u32,
                    zero: c.iter().all(|&b| b == 0),
                })
                .collect();
            prop_assert_eq!(idx.blocks(), &expected[..]);
            prop_assert_eq!(idx.image_len(), data.len() as u64);
            let with_offsets: Vec<(u64, BlockEntry)> =
                idx.blocks_with_offsets().map(|(o, b)| (o, *b)).collect();
            prop_assert_eq!(seen, with_offsets);
        }

        #[test]
        fn content_defined_blocks_cover_the_image(data in image(), max in 1usize..3000) {
            let reader = Choppy { data: &data, max, interrupt: false };
            let idx = BlockIndex::build(reader, Chunking::ContentDefined { avg: 1024 }, |_, _| {})
                .expect("in-memory read succeeds");
            prop_assert_eq!(&idx, &cdc(&data, 1024), "boundaries do not depend on read sizes");
            let mut at = 0usize;
            for (i, b) in idx.blocks().iter().enumerate() {
                let chunk = &data[at..at + b.len() as usize];
                prop_assert_eq!(b.hash(), &sha256(chunk));
                prop_assert_eq!(b.is_zero(), chunk.iter().all(|&x| x == 0));
                prop_assert!(b.len() <= 4096);
                prop_assert!(b.len() >= 256 || i + 1 == idx.blocks().len());
                at += b.len() as usize;
            }
            prop_assert_eq!(at, data.len());
        }

        #[test]
        fn nothing_is_missing_against_own_hashes(data in image(), bs in block_size()) {
            let idx = index(&data, bs);
            let own: HashSet<[u8; 32]> = hashes(&idx).into_iter().collect();
            prop_assert!(idx.missing_from(&own).is_empty());
            prop_assert_eq!(idx.missing_from(&HashSet::new()).len(), idx.distinct_blocks());
        }
    }
}
