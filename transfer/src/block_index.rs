//! Fixed-size block index of an image file, and its binary encoding.
//!
//! An image is cut into blocks of `block_size` bytes (a power of two between
//! [`MIN_BLOCK_SIZE`] and [`MAX_BLOCK_SIZE`]); the last block may be shorter. Each block is
//! identified by the SHA-256 of its bytes, and the whole image by the SHA-256 of all its
//! bytes. A block whose bytes are all zero is flagged as such: it never needs to be sent.
//!
//! # Encoding (format version 1)
//!
//! All integers are big-endian.
//!
//! | offset | size       | field          | meaning                                              |
//! |-------:|-----------:|----------------|------------------------------------------------------|
//! | 0      | 7          | magic          | the bytes `CRTOIDX`                                  |
//! | 7      | 1          | version        | format version, `1`                                  |
//! | 8      | 4          | block size     | bytes per block, power of two in 512..=1048576       |
//! | 12     | 8          | image length   | length of the image in bytes                         |
//! | 20     | 32         | image digest   | SHA-256 of the whole image                           |
//! | 52     | 8          | block count    | must equal `ceil(image length / block size)`         |
//! | 60     | 32 × count | block hashes   | SHA-256 of each block, in image order                |
//!
//! Nothing follows the last hash. Zero blocks are not marked in the encoding: they are
//! recognised on decoding by comparing each hash with the hash of a zero block of the
//! same length.

use std::collections::HashSet;
use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Block size used when the caller has no reason to choose another: the ext4 block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest accepted block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest accepted block size (1 MiB).
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Magic bytes opening an encoded index.
pub const MAGIC: &[u8; 7] = b"CRTOIDX";
/// Encoding format version written by [`BlockIndex::to_bytes`] and read by [`BlockIndex::from_bytes`].
pub const FORMAT_VERSION: u8 = 1;

const HEADER_LEN: usize = 60;

/// Why an index could not be built or decoded.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The requested block size is outside the accepted range or not a power of two.
    #[error("block size {block_size} is not a power of two between 512 and 1048576 bytes")]
    InvalidBlockSize {
        /// The refused block size.
        block_size: u32,
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
    /// The encoded block size is outside the accepted range or not a power of two.
    #[error(
        "block size {block_size} at offset 8 is not a power of two between 512 and 1048576 bytes"
    )]
    EncodedBlockSize {
        /// The refused block size.
        block_size: u32,
    },
    /// The block count disagrees with the image length and block size.
    #[error(
        "block count {count} at offset 52 does not match image length {image_len} with block \
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
    /// Bytes follow the last block hash.
    #[error("{extra} trailing bytes after the last block hash, starting at offset {offset}")]
    TrailingBytes {
        /// Offset of the first unexpected byte.
        offset: usize,
        /// How many unexpected bytes there are.
        extra: usize,
    },
}

/// One block of an image: the SHA-256 of its bytes, and whether they are all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    hash: [u8; 32],
    zero: bool,
}

impl BlockEntry {
    /// An entry whose block is all-zero exactly when its hash is `zero_ref`, the hash of a
    /// zero block of the same length.
    fn new(hash: [u8; 32], zero_ref: &[u8; 32]) -> Self {
        Self {
            hash,
            zero: hash == *zero_ref,
        }
    }

    /// SHA-256 of the block's bytes (only the bytes present, for a short last block).
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// True when every byte of the block is zero.
    pub fn is_zero(&self) -> bool {
        self.zero
    }
}

/// Fixed-size block index of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    block_size: u32,
    image_len: u64,
    image_digest: [u8; 32],
    blocks: Vec<BlockEntry>,
}

impl BlockIndex {
    /// Indexes the image read from `reader`, streaming it through one block-sized buffer.
    ///
    /// Refuses a block size that is not a power of two between [`MIN_BLOCK_SIZE`] and
    /// [`MAX_BLOCK_SIZE`]. Short reads are handled; `Interrupted` reads are retried.
    pub fn from_reader(mut reader: impl Read, block_size: u32) -> Result<Self, IndexError> {
        if !valid_block_size(block_size) {
            return Err(IndexError::InvalidBlockSize { block_size });
        }
        let mut buf = vec![0u8; block_size as usize];
        let zero_full = zero_hash(buf.len());
        let mut whole = Sha256::new();
        let mut image_len = 0u64;
        let mut blocks = Vec::new();
        loop {
            let filled =
                fill(&mut reader, &mut buf).map_err(|(done, source)| IndexError::Read {
                    offset: image_len + done as u64,
                    source,
                })?;
            if filled == 0 {
                break;
            }
            let block = &buf[..filled];
            whole.update(block);
            let hash = sha256(block);
            let zero_ref = if filled == buf.len() {
                zero_full
            } else {
                zero_hash(filled)
            };
            blocks.push(BlockEntry::new(hash, &zero_ref));
            image_len += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(Self {
            block_size,
            image_len,
            image_digest: whole.finalize().into(),
            blocks,
        })
    }

    /// Bytes per block (the last block may be shorter).
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Length of the image in bytes.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// SHA-256 of the whole image.
    pub fn image_digest(&self) -> &[u8; 32] {
        &self.image_digest
    }

    /// The blocks, in image order.
    pub fn blocks(&self) -> &[BlockEntry] {
        &self.blocks
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
        let mut listed = HashSet::new();
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.zero && !have.contains(&b.hash) && listed.insert(b.hash))
            .map(|(i, _)| i)
            .collect()
    }

    /// Encodes the index in the format described in the [module documentation](self).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.blocks.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&self.image_len.to_be_bytes());
        out.extend_from_slice(&self.image_digest);
        out.extend_from_slice(&(self.blocks.len() as u64).to_be_bytes());
        for block in &self.blocks {
            out.extend_from_slice(&block.hash);
        }
        out
    }

    /// Decodes an index written by [`to_bytes`](Self::to_bytes), refusing truncated input, a
    /// wrong magic, an unknown version, an invalid block size, a block count inconsistent
    /// with the image length, and trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IndexError> {
        let mut cur = Cursor { bytes, offset: 0 };
        let magic = cur.take("magic", MAGIC.len())?;
        if magic != MAGIC {
            return Err(IndexError::BadMagic {
                found: magic.escape_ascii().to_string(),
            });
        }
        let version = cur.array::<1>("version")?[0];
        if version != FORMAT_VERSION {
            return Err(IndexError::UnsupportedVersion { version });
        }
        let block_size = u32::from_be_bytes(cur.array("block size")?);
        if !valid_block_size(block_size) {
            return Err(IndexError::EncodedBlockSize { block_size });
        }
        let image_len = u64::from_be_bytes(cur.array("image length")?);
        let image_digest = cur.array::<32>("image digest")?;
        let count = u64::from_be_bytes(cur.array("block count")?);
        let expected = image_len.div_ceil(u64::from(block_size));
        if count != expected {
            return Err(IndexError::BlockCountMismatch {
                count,
                expected,
                image_len,
                block_size,
            });
        }
        // count <= 2^64 / 512, so count * 32 cannot overflow.
        let hashes = cur.take_u64("block hashes", count * 32)?;
        if cur.offset < bytes.len() {
            return Err(IndexError::TrailingBytes {
                offset: cur.offset,
                extra: bytes.len() - cur.offset,
            });
        }
        let zero_full = zero_hash(block_size as usize);
        let last_len = (image_len % u64::from(block_size)) as usize;
        let zero_last = if last_len == 0 {
            zero_full
        } else {
            zero_hash(last_len)
        };
        let n = hashes.len() / 32;
        let blocks = hashes
            .chunks_exact(32)
            .enumerate()
            .map(|(i, chunk)| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(chunk);
                BlockEntry::new(hash, if i + 1 == n { &zero_last } else { &zero_full })
            })
            .collect();
        Ok(Self {
            block_size,
            image_len,
            image_digest,
            blocks,
        })
    }
}

fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
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

/// Reads until `buf` is full or the reader is at its end; returns the bytes read, or the
/// bytes read before the error together with the error.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, (usize, io::Error)> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((filled, e)),
        }
    }
    Ok(filled)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Cursor<'a> {
    fn take_u64(&mut self, field: &'static str, needed: u64) -> Result<&'a [u8], IndexError> {
        let available = self.bytes.len() - self.offset;
        match usize::try_from(needed) {
            Ok(n) if n <= available => {
                let taken = &self.bytes[self.offset..self.offset + n];
                self.offset += n;
                Ok(taken)
            }
            _ => Err(IndexError::Truncated {
                field,
                offset: self.offset,
                needed,
                available,
            }),
        }
    }

    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8], IndexError> {
        self.take_u64(field, needed as u64)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], IndexError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(data: &[u8], block_size: u32) -> BlockIndex {
        BlockIndex::from_reader(data, block_size).expect("indexing an in-memory image succeeds")
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
    fn empty_image() {
        let idx = index(&[], DEFAULT_BLOCK_SIZE);
        assert_eq!(idx.image_len(), 0);
        assert!(idx.blocks().is_empty());
        assert_eq!(idx.image_digest(), &sha256(&[]));
        assert_eq!(idx.to_bytes().len(), HEADER_LEN);
    }

    #[test]
    fn exactly_one_block() {
        let data = vec![7u8; 512];
        let idx = index(&data, 512);
        assert_eq!(hashes(&idx), vec![sha256(&data)]);
        assert_eq!(idx.image_digest(), &sha256(&data));
        assert_eq!((idx.zero_blocks(), idx.distinct_blocks()), (0, 1));
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
            "block index encoding is truncated: block hashes needs 64 bytes at offset 60 but only \
             40 remain"
        );
    }

    #[test]
    fn wrong_magic_version_and_block_size_are_refused() {
        let mut bytes = sample_encoding();
        bytes[0] = b'X';
        let err = decode_err(&bytes);
        assert!(matches!(err, IndexError::BadMagic { .. }));
        assert!(err.to_string().contains("found \"XRTOIDX\""), "{err}");

        let mut bytes = sample_encoding();
        bytes[7] = 2;
        let err = decode_err(&bytes);
        assert!(matches!(err, IndexError::UnsupportedVersion { version: 2 }));
        assert!(err.to_string().contains("version 2 at offset 7"), "{err}");

        let mut bytes = sample_encoding();
        bytes[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(
            decode_err(&bytes),
            IndexError::EncodedBlockSize { block_size: 1000 }
        ));
    }

    #[test]
    fn inconsistent_block_count_is_refused() {
        let mut bytes = sample_encoding();
        bytes[52..60].copy_from_slice(&3u64.to_be_bytes());
        let err = decode_err(&bytes);
        assert_eq!(
            err.to_string(),
            "block count 3 at offset 52 does not match image length 1024 with block size 512: \
             expected 2 blocks"
        );
        // A huge image length with a matching count must fail as truncated, not allocate.
        let mut bytes = sample_encoding();
        bytes[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
        bytes[52..60].copy_from_slice(&u64::MAX.div_ceil(512).to_be_bytes());
        assert!(matches!(
            decode_err(&bytes),
            IndexError::Truncated { offset: 60, .. }
        ));
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
                    offset: 124,
                    extra: 3
                }
            ),
            "{err}"
        );
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
        }

        #[test]
        fn index_matches_direct_chunk_hashes(
            data in image(), bs in block_size(), max in 1usize..700,
        ) {
            let reader = Choppy { data: &data, max, interrupt: false };
            let idx = BlockIndex::from_reader(reader, bs).expect("in-memory read succeeds");
            let expected: Vec<BlockEntry> = data
                .chunks(bs as usize)
                .map(|c| BlockEntry { hash: sha256(c), zero: c.iter().all(|&b| b == 0) })
                .collect();
            prop_assert_eq!(idx.blocks(), &expected[..]);
            prop_assert_eq!(idx.image_len(), data.len() as u64);
            prop_assert_eq!(idx.image_digest(), &sha256(&data));
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
