//! What travels between the sender and a host's agent, and the checks on it.
//!
//! * **Image names** (`[A-Za-z0-9._-]{1,128}`, not starting with `.`): they become file names
//!   in the repository, so nothing else is accepted.
//! * **Missing query**: the body is a list of 32-byte SHA-256 hashes, or (`?width=8`) of their
//!   first 8 bytes; the answer is a bitmap, one bit per entry in order (bit `i % 8` of byte
//!   `i / 8`), set when the host lacks it (for a prefix: holds no block starting with it).
//! * **Commit**: the encoded index (`?form=full`), or the compact index
//!   ([`BlockIndex::to_compact_bytes`](crate::BlockIndex::to_compact_bytes), `?form=compact`)
//!   or the session index ([`BlockIndex::to_session_bytes`](crate::BlockIndex::to_session_bytes),
//!   `?form=session`) compressed with zstd, which the host decodes as it decompresses it
//!   ([`read_index`]) and resolves against its store.
//! * **Block batch**: one zstd frame (with its content checksum) of
//!   `"CRTOBAT2" ‖ count (u32 BE) ‖ count × (hash prefix 8 ‖ length (u32 BE)) ‖ the blocks'
//!   bytes, one after another`. The receiver bounds the decompressed size, hashes every
//!   block, checks the hash against the announced prefix and stores the block under the hash
//!   it computed, so a stored block always matches its hash. Headers come first and the
//!   bytes follow without interruption, which compresses better than interleaving them; the
//!   prefix instead of the whole hash saves 24 incompressible bytes per block. Version 1
//!   (`"CRTOBAT1"`, each block's whole hash before its length and bytes) is still accepted.

use std::io::Read;

use sha2::Digest;

use crate::block_index::{
    BlockEntry, Checked, Encoding, HEADER_LEN, IndexError, MAX_BLOCK_LEN, PREFIX_LEN, PrefixIndex,
};

/// Magic opening a decompressed batch (version 2).
pub const BATCH_MAGIC: &[u8; 8] = b"CRTOBAT2";
/// Magic of version 1 batches (whole hashes, interleaved), still accepted.
pub const BATCH_MAGIC_V1: &[u8; 8] = b"CRTOBAT1";
/// Largest decompressed batch a receiver accepts (64 MiB).
pub const MAX_BATCH_RAW: usize = 64 << 20;
/// Largest compressed batch body a receiver accepts.
pub const MAX_BATCH_BODY: usize = MAX_BATCH_RAW + (1 << 20);
/// Most hashes in one missing query (256 MiB of image at 4 KiB per block is 65536).
pub const MAX_QUERY_HASHES: usize = 1 << 20;
/// Largest index body a receiver accepts: the full index of an image of
/// [`crate::block_index::MAX_IMAGE_BLOCKS`] content-defined blocks (36 bytes each), 72 MiB.
pub const MAX_INDEX_BODY: usize = 61 + (crate::block_index::MAX_IMAGE_BLOCKS as usize) * 36;

/// Why something from the wire was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// An image name outside the accepted alphabet or length.
    #[error(
        "image name {name:?} is invalid: {why} (allowed: 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.')"
    )]
    BadName {
        /// The refused name, shortened.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A missing query whose length is not a multiple of 32 or too long.
    #[error("missing query of {len} bytes: {why}")]
    BadQuery {
        /// Body length.
        len: usize,
        /// What is wrong.
        why: String,
    },
    /// A batch that cannot be decoded.
    #[error("block batch refused: {0}")]
    BadBatch(String),
    /// A block whose bytes do not match its hash.
    #[error("block batch refused: block {position} (hash {hash}) does not match its {len} bytes")]
    HashMismatch {
        /// Position in the batch.
        position: usize,
        /// Announced hash (or hash prefix), hex.
        hash: String,
        /// Block length.
        len: usize,
    },
    /// An index body (compact or session form) that cannot be decoded or is too large.
    #[error("image index refused: {0}")]
    BadIndex(String),
    /// An index larger than a host takes, or than its own header allows.
    #[error("image index refused: {0}")]
    IndexTooLarge(String),
    /// A batch whose decompressed size exceeds [`MAX_BATCH_RAW`].
    #[error("block batch refused: it decompresses to more than {MAX_BATCH_RAW} bytes")]
    BatchTooLarge,
}

/// Checks an image name from outside.
pub fn validate_name(name: &str) -> Result<&str, WireError> {
    let bad = |why| WireError::BadName {
        name: name.chars().take(140).collect(),
        why,
    };
    if name.is_empty() || name.len() > 128 {
        return Err(bad("length must be 1 to 128"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("it contains a character outside the allowed set"));
    }
    if name.starts_with('.') {
        return Err(bad("it starts with '.'"));
    }
    // The repository names its own files NAME.idx, NAME.json, NAME.img, NAME.json.incomplete
    // and NAME.img.unsynced.*: a name holding one of those parts could pass for another
    // image's file.
    if name
        .split('.')
        .skip(1)
        .any(|part| RESERVED_SUFFIXES.contains(&part))
    {
        return Err(bad(
            "a part after a '.' is one the repository uses for its own files (idx, json, img, incomplete, unsynced, tmp)",
        ));
    }
    Ok(name)
}

/// The name parts (after a '.') the repository's own files use.
pub const RESERVED_SUFFIXES: &[&str] = &["idx", "json", "img", "incomplete", "unsynced", "tmp"];

/// Splits a missing-query body into hashes (`N` = 32) or hash prefixes (`N` = 8).
pub fn decode_query<const N: usize>(body: &[u8]) -> Result<Vec<[u8; N]>, WireError> {
    if !body.len().is_multiple_of(N) {
        return Err(WireError::BadQuery {
            len: body.len(),
            why: format!("not a whole number of {N}-byte hashes"),
        });
    }
    if body.len() / N > MAX_QUERY_HASHES {
        return Err(WireError::BadQuery {
            len: body.len(),
            why: format!("more than {MAX_QUERY_HASHES} hashes"),
        });
    }
    Ok(body
        .chunks_exact(N)
        .map(|c| {
            let mut h = [0u8; N];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

/// Decompresses a zstd body of at most `limit` bytes: exactly one frame, with its content
/// checksum (which the decoder then verifies), and nothing after it.
pub fn decompress_limited(body: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    check_frame(body).map_err(WireError::BadBatch)?;
    // The frame says how large it is (Certo's sender always pledges it): a frame over the
    // limit is refused before anything is decompressed. The buffer grows as bytes come: a
    // frame may declare more than it holds.
    let declared = match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(n)) if n > limit as u64 => return Err(WireError::BatchTooLarge),
        Ok(Some(n)) => n as usize,
        _ => {
            return Err(WireError::BadBatch(
                "the zstd frame does not say its content size".into(),
            ));
        }
    };
    let mut dec = zstd::stream::Decoder::new(body)
        .map_err(|e| WireError::BadBatch(format!("not a zstd frame: {e}")))?
        .single_frame();
    let mut raw = Vec::with_capacity(declared.min(body.len()) + 1);
    (&mut dec)
        .take(declared as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| WireError::BadBatch(format!("zstd decompression failed: {e}")))?;
    if raw.len() != declared {
        return Err(WireError::BadBatch(format!(
            "the zstd frame holds other than the {declared} bytes it says"
        )));
    }
    Ok(raw)
}

/// The largest zstd window an index body may use: 8 MiB, level 19's (the sender compresses
/// indexes at level 3, whose window is 2 MiB at most). The decoder's buffer is the window, or
/// the frame's content if that is smaller: with [`INDEX_READ_BUFFER`], all of an index body's
/// decompressed bytes a host holds at once.
pub const MAX_INDEX_WINDOW_LOG: u32 = 23;
/// Decompressed bytes of an index body read from the zstd decoder at a time.
pub const INDEX_READ_BUFFER: usize = 64 << 10;

/// Decodes a zstd-compressed compact index (`?form=compact`) as it comes out of the zstd
/// decoder, with the checks of [`read_index`].
pub fn read_compact_index(body: &[u8]) -> Result<Result<PrefixIndex, IndexError>, WireError> {
    read_index(body, Encoding::Compact, |input, len| {
        PrefixIndex::read_compact(input, len)
    })
}

/// Decodes a zstd-compressed session index (`?form=session`) against the prefixes its push
/// session asked about, in order ([`PrefixIndex::read_session`]), as it comes out of the zstd
/// decoder, with the checks of [`read_index`].
pub fn read_session_index(
    body: &[u8],
    asked: &[[u8; PREFIX_LEN]],
) -> Result<Result<PrefixIndex, IndexError>, WireError> {
    read_index(body, Encoding::Session, |input, len| {
        PrefixIndex::read_session(input, len, asked)
    })
}

/// Reads a zstd-compressed compact index as [`read_compact_index`] does, with the same
/// errors, keeping none of its blocks ([`PrefixIndex::check_compact`]): a host learns what
/// the index would be refused for before it holds anything for its blocks.
pub fn check_compact_index(
    body: &[u8],
    resolve: impl FnMut(&mut [BlockEntry]) -> usize,
) -> Result<Result<Checked, IndexError>, WireError> {
    read_index(body, Encoding::Compact, |input, len| {
        PrefixIndex::check_compact(input, len, resolve)
    })
}

/// [`check_compact_index`] for a session index ([`read_session_index`],
/// [`PrefixIndex::check_session`]).
pub fn check_session_index(
    body: &[u8],
    asked: &[[u8; PREFIX_LEN]],
    resolve: impl FnMut(&mut [BlockEntry]) -> usize,
) -> Result<Result<Checked, IndexError>, WireError> {
    read_index(body, Encoding::Session, |input, len| {
        PrefixIndex::check_session(input, len, asked, resolve)
    })
}

/// Decodes a zstd-compressed index body in `encoding` with `decode`, which reads the
/// decompressed encoding, of the length it is given, straight from the zstd decoder: the
/// decompressed bytes are never held whole, only the decoder's window (at most
/// 2^[`MAX_INDEX_WINDOW_LOG`] bytes) and [`INDEX_READ_BUFFER`] of them.
///
/// The outer error refuses the body: not exactly one zstd frame with its content checksum,
/// or one that does not declare its content size (the rules of [`decompress_limited`]); a
/// header that is short or lists more than [`crate::block_index::MAX_IMAGE_BLOCKS`] blocks,
/// or that allows fewer bytes than the frame declares ([`Encoding::max_len`]: before anything
/// is decoded, so a small frame cannot make the host hold more than the index of an image of
/// that many blocks); a larger window; a frame that holds other than it declares; or damage
/// that the frame's checksum reveals. The damage comes first: when `decode` refuses the
/// index, the rest of the frame is still decompressed (into nothing, at most as many bytes as
/// it declares) to check its checksum. The inner error refuses the index itself, whose bytes
/// arrived as they were sent.
pub fn read_index<T>(
    body: &[u8],
    encoding: Encoding,
    decode: impl FnOnce(&mut dyn Read, usize) -> Result<T, IndexError>,
) -> Result<Result<T, IndexError>, WireError> {
    let failed = |e: std::io::Error| WireError::BadIndex(format!("zstd decompression failed: {e}"));
    check_frame(body).map_err(WireError::BadIndex)?;
    let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(body) else {
        return Err(WireError::BadIndex(
            "the zstd frame does not say its content size".into(),
        ));
    };
    let mut frame = zstd::stream::read::Decoder::with_buffer(body)
        .map_err(|e| WireError::BadIndex(format!("not a zstd frame: {e}")))?
        .single_frame();
    frame.window_log_max(MAX_INDEX_WINDOW_LOG).map_err(failed)?;
    // The header first: its block count bounds the rest.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < header.len() {
        match frame.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
        }
    }
    let limit = encoding.max_len(&header[..got]).map_err(|e| match e {
        IndexError::TooManyBlocks { .. } => WireError::IndexTooLarge(e.to_string()),
        e => WireError::BadIndex(e.to_string()),
    })?;
    if declared > limit as u64 {
        return Err(WireError::IndexTooLarge(format!(
            "it decompresses to more than the {limit} bytes its header allows"
        )));
    }
    let len = declared as usize;
    let mut input =
        std::io::BufReader::with_capacity(INDEX_READ_BUFFER, (&header[..got]).chain(frame));
    let holds_other = |what| {
        WireError::BadIndex(format!(
            "the zstd frame holds {what} than the {len} bytes it says"
        ))
    };
    match decode(&mut input, len) {
        Ok(index) => {
            // The frame must end here: reading its end checks its checksum.
            let mut probe = [0u8; 1];
            loop {
                match input.read(&mut probe) {
                    Ok(0) => return Ok(Ok(index)),
                    Ok(_) => return Err(holds_other("more")),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(failed(e)),
                }
            }
        }
        Err(IndexError::Input { source, .. })
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Err(holds_other("fewer"))
        }
        Err(IndexError::Input { source, .. }) => Err(failed(source)),
        Err(refused) => {
            let rest = std::io::copy(&mut (&mut input).take(len as u64 + 1), &mut std::io::sink())
                .map_err(failed)?;
            if rest > len as u64 {
                return Err(holds_other("more"));
            }
            Ok(Err(refused))
        }
    }
}

/// One zstd frame with its content checksum and nothing after it.
pub(crate) fn check_frame(body: &[u8]) -> Result<(), String> {
    const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    if body.len() < 5 || body[..4] != MAGIC {
        return Err("not a zstd frame".into());
    }
    // Frame_Header_Descriptor, bit 2: Content_Checksum_flag.
    if body[4] & 0x04 == 0 {
        return Err("the zstd frame carries no content checksum".into());
    }
    match zstd::zstd_safe::find_frame_compressed_size(body) {
        Ok(n) if n == body.len() => Ok(()),
        Ok(n) => Err(format!("{} bytes follow the zstd frame", body.len() - n)),
        Err(_) => Err("a truncated or damaged zstd frame".into()),
    }
}

/// Compresses a body with zstd (with its content checksum).
pub fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut enc = zstd::stream::Encoder::new(Vec::with_capacity(raw.len() / 2), level)?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(raw.len() as u64))?;
    std::io::Write::write_all(&mut enc, raw)?;
    enc.finish()
}

/// Packs booleans into the answer bitmap.
pub fn encode_bitmap(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// Reads bit `i` of a bitmap.
pub fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Builds the decompressed batch (version 2) for `blocks` and compresses it at `level`.
pub fn encode_batch<'a>(
    blocks: impl ExactSizeIterator<Item = (&'a [u8; 32], &'a [u8])> + Clone,
    level: i32,
) -> std::io::Result<Vec<u8>> {
    let data: usize = blocks.clone().map(|(_, d)| d.len()).sum();
    let mut raw = Vec::with_capacity(12 + blocks.len() * (PREFIX_LEN + 4) + data);
    raw.extend_from_slice(BATCH_MAGIC);
    raw.extend_from_slice(&(blocks.len() as u32).to_be_bytes());
    for (hash, data) in blocks.clone() {
        raw.extend_from_slice(&hash[..PREFIX_LEN]);
        raw.extend_from_slice(&(data.len() as u32).to_be_bytes());
    }
    for (_, data) in blocks {
        raw.extend_from_slice(data);
    }
    compress(&raw, level)
}

/// A decoded, verified batch: its distinct blocks, each with the hash computed from its
/// bytes, and their bytes one after another.
#[derive(Debug)]
pub struct Batch {
    raw: Vec<u8>,
    blocks: Vec<([u8; 32], std::ops::Range<usize>)>,
    /// Blocks that repeated one of `blocks` (kept once).
    repeats: usize,
}

/// Decompressed bytes read at a time while a batch is hashed or skipped.
const BATCH_READ_BUFFER: usize = 64 << 10;

/// A zstd frame read as it is decompressed, with the offset of what comes next and the
/// content size the frame declares: a field that size cannot hold is refused before it is
/// read, with the messages of a batch decompressed whole.
struct Stream<'a> {
    dec: std::io::BufReader<zstd::stream::read::Decoder<'a, &'a [u8]>>,
    at: usize,
    declared: usize,
    /// The decoder failed: nothing more is read from it.
    broken: bool,
}

/// Bytes a [`Stream`] buffers (a batch of tiny blocks is read a few bytes at a time).
const STREAM_BUFFER: usize = 16 << 10;

impl<'a> Stream<'a> {
    fn new(body: &'a [u8], declared: usize) -> Result<Self, WireError> {
        let dec = zstd::stream::read::Decoder::with_buffer(body)
            .map_err(|e| WireError::BadBatch(format!("not a zstd frame: {e}")))?
            .single_frame();
        Ok(Self {
            dec: std::io::BufReader::with_capacity(STREAM_BUFFER, dec),
            at: 0,
            declared,
            broken: false,
        })
    }

    fn holds_other(&self) -> WireError {
        WireError::BadBatch(format!(
            "the zstd frame holds other than the {} bytes it says",
            self.declared
        ))
    }

    fn failed(&mut self, e: std::io::Error) -> WireError {
        self.broken = true;
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.holds_other()
        } else {
            WireError::BadBatch(format!("zstd decompression failed: {e}"))
        }
    }

    /// Refuses `what` of `n` bytes if the declared content cannot hold it.
    fn need(&self, n: usize, what: &str) -> Result<(), WireError> {
        let left = self.declared - self.at;
        if left < n {
            return Err(WireError::BadBatch(format!(
                "{what} needs {n} bytes at offset {} but only {left} remain",
                self.at
            )));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        if let Err(e) = self.dec.read_exact(buf) {
            return Err(self.failed(e));
        }
        self.at += buf.len();
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        self.need(N, what)?;
        let mut out = [0u8; N];
        self.fill(&mut out)?;
        Ok(out)
    }

    /// Reads `n` bytes (checked by [`need`](Self::need)) through `buf`, handing each piece
    /// to `each`.
    fn pass(
        &mut self,
        mut n: usize,
        buf: &mut [u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), WireError> {
        while n > 0 {
            let piece = &mut buf[..n.min(BATCH_READ_BUFFER)];
            self.fill(piece)?;
            each(piece);
            n -= piece.len();
        }
        Ok(())
    }

    /// Reads the frame to its end (which checks its checksum), returning the bytes that
    /// were left; more than the frame declares is refused.
    fn rest(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        let limit = self.declared.saturating_sub(self.at) as u64 + 1;
        let mut rest = 0usize;
        let mut frame = (&mut self.dec).take(limit);
        loop {
            match frame.read(buf) {
                Ok(0) => break,
                Ok(n) => rest += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.failed(e)),
            }
        }
        self.at += rest;
        if self.at != self.declared {
            return Err(self.holds_other());
        }
        Ok(rest)
    }
}

/// A distinct block of a batch: its hash, and where its bytes are in the decompressed batch.
#[derive(Clone, Copy)]
struct Distinct {
    hash: [u8; 32],
    at: u32,
    len: u32,
}

/// The distinct blocks of a batch, first seen first, found by hash: 40 bytes a block in
/// chunks that never move, and a table of 4 to 8 bytes a block (growing, it holds its old
/// table and a new one twice as large). A repeated block costs nothing.
struct DistinctBlocks {
    chunks: Vec<Vec<Distinct>>,
    len: usize,
    /// Open addressing, linear probing: 0 is empty, else 1 + the block's number.
    table: Vec<u32>,
    state: std::collections::hash_map::RandomState,
}

const DISTINCT_CHUNK: usize = 4096;

impl DistinctBlocks {
    fn new() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            table: vec![0; 64],
            state: Default::default(),
        }
    }

    fn get(&self, i: usize) -> &Distinct {
        &self.chunks[i / DISTINCT_CHUNK][i % DISTINCT_CHUNK]
    }

    fn slot(&self, hash: &[u8; 32], table: &[u32]) -> usize {
        use std::hash::BuildHasher;
        (self.state.hash_one(&hash[..8]) as usize) & (table.len() - 1)
    }

    /// Keeps `block` unless a block of its hash is kept already; true if it was new.
    fn insert(&mut self, block: Distinct) -> bool {
        let mut at = self.slot(&block.hash, &self.table);
        loop {
            match self.table[at] {
                0 => break,
                n if self.get(n as usize - 1).hash == block.hash => return false,
                _ => at = (at + 1) & (self.table.len() - 1),
            }
        }
        if self.len.is_multiple_of(DISTINCT_CHUNK) {
            self.chunks.push(Vec::with_capacity(DISTINCT_CHUNK));
        }
        self.chunks[self.len / DISTINCT_CHUNK].push(block);
        self.len += 1;
        self.table[at] = self.len as u32;
        if self.len * 2 > self.table.len() {
            let mut table = vec![0u32; self.table.len() * 2];
            for n in 1..=self.len {
                let mut at = self.slot(&self.get(n - 1).hash, &table);
                while table[at] != 0 {
                    at = (at + 1) & (table.len() - 1);
                }
                table[at] = n as u32;
            }
            self.table = table;
        }
        true
    }

    fn iter(&self) -> impl Iterator<Item = &Distinct> {
        self.chunks.iter().flatten()
    }
}

impl Batch {
    /// Decompresses (at most [`MAX_BATCH_RAW`] bytes), parses and verifies every block:
    /// its SHA-256 must match the whole hash (version 1) or the hash prefix (version 2)
    /// announced for it.
    ///
    /// The batch is never held decompressed, and nothing is allocated from what it
    /// declares: it is read as it is decompressed, each block's length checked before its
    /// bytes are read and its bytes hashed as they come (version 2, whose headers all come
    /// before the bytes, is read by two decoders of the same frame, one at the headers and
    /// one at the bytes). What is kept of a block is a record of 40 bytes, for the first of
    /// each distinct block only. Damage on the way (the frame's checksum, read at its end)
    /// comes before what the batch is refused for. Only then, the batch verified whole, is
    /// the frame decompressed again to collect the distinct blocks' bytes.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        check_frame(body).map_err(WireError::BadBatch)?;
        let declared = match zstd::zstd_safe::get_frame_content_size(body) {
            Ok(Some(n)) if n > MAX_BATCH_RAW as u64 => return Err(WireError::BatchTooLarge),
            Ok(Some(n)) => n as usize,
            _ => {
                return Err(WireError::BadBatch(
                    "the zstd frame does not say its content size".into(),
                ));
            }
        };
        let mut buf = vec![0u8; BATCH_READ_BUFFER];
        let mut heads = Stream::new(body, declared)?;
        let mut data = None;
        let (distinct, repeats) = match verify(body, &mut heads, &mut data, &mut buf) {
            Ok(found) => found,
            Err(refused) => {
                // The frame read to its end: damage first.
                let last = match data.as_mut() {
                    Some(data) => data,
                    None => &mut heads,
                };
                if !last.broken {
                    last.rest(&mut buf)?;
                }
                return Err(refused);
            }
        };
        drop((heads, data));
        // The bytes of the distinct blocks, from the frame decompressed again.
        let total: usize = distinct.iter().map(|d| d.len as usize).sum();
        let mut raw = Vec::with_capacity(total);
        let mut blocks = Vec::with_capacity(distinct.len);
        let mut again = Stream::new(body, declared)?;
        for d in distinct.iter() {
            let skip = d.at as usize - again.at;
            again.pass(skip, &mut buf, |_| {})?;
            let start = raw.len();
            raw.resize(start + d.len as usize, 0);
            again.fill(&mut raw[start..])?;
            blocks.push((d.hash, start..raw.len()));
        }
        Ok(Self {
            raw,
            blocks,
            repeats,
        })
    }

    /// The distinct blocks (a repeated block once, at its first place): hash (computed on
    /// arrival) and bytes.
    pub fn blocks(&self) -> impl ExactSizeIterator<Item = (&[u8; 32], &[u8])> + Clone {
        self.blocks.iter().map(|(h, r)| (h, &self.raw[r.clone()]))
    }

    /// How many blocks of the batch repeated one before them (left out of
    /// [`blocks`](Self::blocks)).
    pub fn repeats(&self) -> usize {
        self.repeats
    }
}

/// Pass one of [`Batch::decode`]: reads the batch from `heads` (version 2: its bytes from a
/// second decoder, left in `data`) and verifies every block, keeping the distinct ones'
/// records. Returns them and the number of repeats.
fn verify<'a>(
    body: &'a [u8],
    heads: &mut Stream<'a>,
    data: &mut Option<Stream<'a>>,
    buf: &mut [u8],
) -> Result<(DistinctBlocks, usize), WireError> {
    let magic = heads.array::<8>("magic")?;
    let v1 = match &magic {
        m if m == BATCH_MAGIC => false,
        m if m == BATCH_MAGIC_V1 => true,
        _ => {
            return Err(WireError::BadBatch(
                "wrong magic (expected CRTOBAT2 or CRTOBAT1)".into(),
            ));
        }
    };
    let count = u32::from_be_bytes(heads.array("block count")?) as usize;
    let length = |s: &mut Stream<'_>, position: usize| -> Result<usize, WireError> {
        let len = u32::from_be_bytes(s.array("block length")?);
        if len == 0 || len > MAX_BLOCK_LEN {
            return Err(WireError::BadBatch(format!(
                "block {position} has length {len}, outside 1..={MAX_BLOCK_LEN}"
            )));
        }
        Ok(len as usize)
    };
    let (hash_len, what) = if v1 {
        (32, "block hash")
    } else {
        (PREFIX_LEN, "block hash prefix")
    };
    if !v1 {
        // Every header first: where the bytes start. Headers the frame cannot hold are
        // refused, at the first that does not fit, before any byte of a block is read.
        let data_at = 12 + count as u64 * (PREFIX_LEN as u64 + 4);
        if data_at > heads.declared as u64 {
            for position in 0..count {
                heads.need(PREFIX_LEN, what)?;
                heads.pass(PREFIX_LEN, buf, |_| {})?;
                length(heads, position)?;
            }
            return Err(heads.holds_other());
        }
        let mut second = Stream::new(body, heads.declared)?;
        second.pass(data_at as usize, buf, |_| {})?;
        *data = Some(second);
    }
    let mut distinct = DistinctBlocks::new();
    let mut repeats = 0;
    let mut announced = [0u8; 32];
    for position in 0..count {
        let announced = &mut announced[..hash_len];
        heads.need(hash_len, what)?;
        heads.fill(announced)?;
        let len = length(heads, position)?;
        let bytes = match data.as_mut() {
            Some(data) => data,
            None => &mut *heads,
        };
        bytes.need(len, "block bytes")?;
        let at = bytes.at;
        let mut hasher = sha2::Sha256::new();
        bytes.pass(len, buf, |piece| hasher.update(piece))?;
        let hash: [u8; 32] = hasher.finalize().into();
        if hash[..hash_len] != *announced {
            return Err(WireError::HashMismatch {
                position,
                hash: hex::encode(announced),
                len,
            });
        }
        let block = Distinct {
            hash,
            at: at as u32,
            len: len as u32,
        };
        if !distinct.insert(block) {
            repeats += 1;
        }
    }
    let last = match data.as_mut() {
        Some(data) => data,
        None => heads,
    };
    let rest = last.rest(buf)?;
    if rest != 0 {
        return Err(WireError::BadBatch(format!(
            "{rest} trailing bytes after block {count}"
        )));
    }
    Ok((distinct, repeats))
}

/// Compares a presented token with the expected one in time independent of where they
/// differ (both are hashed first, so lengths do not leak either).
pub fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    certo_proto::token::same(presented, expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_index::sha256;

    /// A header for an index of `count` fixed 4 KiB blocks in `encoding`'s magic.
    fn header(magic: &[u8; 7], version: u8, count: u64) -> Vec<u8> {
        let mut h = magic.to_vec();
        h.push(version);
        h.push(0);
        h.extend_from_slice(&4096u32.to_be_bytes());
        h.extend_from_slice(&(count * 4096).to_be_bytes());
        h.extend_from_slice(&[0u8; 32]);
        h.extend_from_slice(&count.to_be_bytes());
        h
    }

    #[test]
    fn an_index_decompresses_to_no_more_than_its_header_allows() {
        use crate::block_index::MAX_IMAGE_BLOCKS;
        // A session index of 10 blocks, followed by 100 MB of zero bytes: a 1 KB frame.
        let mut raw = header(b"CRTOSIX", 1, 10);
        raw.resize(raw.len() + 100_000_000, 0);
        let body = compress(&raw, 19).expect("compress");
        assert!(body.len() < 20_000, "{}", body.len());
        let e = read_session_index(&body, &[]).expect_err("too large");
        assert!(matches!(e, WireError::IndexTooLarge(_)), "{e}");
        assert!(e.to_string().contains("161 bytes"), "{e}");
        // A header that claims more blocks than a host takes.
        let raw = header(b"CRTOSIX", 1, MAX_IMAGE_BLOCKS + 1);
        let e = read_session_index(&compress(&raw, 3).expect("compress"), &[])
            .expect_err("too many blocks");
        assert!(matches!(e, WireError::IndexTooLarge(_)), "{e}");
        // A header cut short.
        let e = read_compact_index(&compress(&raw[..40], 3).expect("compress"))
            .expect_err("short header");
        assert_eq!(
            e.to_string(),
            "image index refused: block index encoding is truncated: header needs 61 bytes at \
             offset 0 but only 40 remain"
        );
        // A compact index within its bound is read whole (its prefixes unknown here).
        let mut raw = header(b"CRTOCIX", 1, 3);
        raw.extend_from_slice(&[7u8; 24]);
        let index = read_compact_index(&compress(&raw, 3).expect("compress"))
            .expect("a sound frame")
            .expect("a sound index");
        assert_eq!(index.block_count(), 3);
        assert!(matches!(
            index.resolve(|_| None),
            Ok(crate::block_index::Resolved::Unresolved(3))
        ));
    }

    #[test]
    fn a_session_index_cannot_announce_more_blocks_than_it_has_bytes() {
        let mut raw = header(b"CRTOSIX", 1, 1000);
        raw.extend_from_slice(&[0u8; 10]);
        let e = read_session_index(&compress(&raw, 3).expect("compress"), &[])
            .expect("a sound frame")
            .expect_err("1000 blocks in 10 bytes");
        assert_eq!(
            e.to_string(),
            "session index at offset 61: 1000 blocks announced in 10 bytes"
        );
    }

    /// A real session index of a small image and the prefixes its push asked about.
    fn session_commit() -> (Vec<u8>, Vec<[u8; PREFIX_LEN]>) {
        let mut data = vec![0u8; 8192];
        for i in 0..40u8 {
            data.extend(std::iter::repeat_n(i % 9 + 1, 4096));
        }
        let index = crate::BlockIndex::from_reader(&data[..], 4096).expect("index");
        let mut asked = Vec::new();
        for b in index.blocks().iter().filter(|b| !b.is_zero()) {
            let p: [u8; PREFIX_LEN] = b.hash()[..PREFIX_LEN].try_into().expect("8");
            if !asked.contains(&p) {
                asked.push(p);
            }
        }
        (index.to_session_bytes(), asked)
    }

    #[test]
    fn damage_on_the_way_comes_before_what_the_index_is_refused_for() {
        let (raw, asked) = session_commit();
        let body = compress(&raw, 3).expect("compress");
        // Sound, and read as sent.
        let read = read_session_index(&body, &asked)
            .expect("frame")
            .expect("index");
        assert_eq!(read.block_count(), 42);
        // Its checksum damaged (the frame's last 4 bytes): refused as damage (422), though
        // every block was read.
        let mut damaged = body.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let e = read_session_index(&damaged, &asked).expect_err("checksum");
        assert!(matches!(e, WireError::BadIndex(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "image index refused: zstd decompression failed: Restored data doesn't match checksum"
        );
        // A session it does not fit, sound: the index's error.
        let e = read_session_index(&body, &asked[..2])
            .expect("frame")
            .expect_err("short");
        assert!(
            e.to_string().contains("the host was asked about 2 blocks"),
            "{e}"
        );
        // The same with its checksum damaged: damage first, found by reading the frame to
        // its end after the index was refused.
        let e = read_session_index(&damaged, &asked[..2]).expect_err("checksum first");
        assert!(e.to_string().contains("doesn't match checksum"), "{e}");
    }

    #[test]
    fn an_index_frame_must_declare_its_size_and_keep_its_window_small() {
        let (raw, asked) = session_commit();
        // No content size (a streamed frame), though with its checksum.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
        enc.include_checksum(true).expect("checksum");
        enc.include_contentsize(false).expect("no size");
        std::io::Write::write_all(&mut enc, &raw).expect("write");
        let body = enc.finish().expect("finish");
        let e = read_session_index(&body, &asked).expect_err("no size");
        assert!(
            e.to_string().contains("does not say its content size"),
            "{e}"
        );
        // A compact index of 1.2 million zero-prefixed blocks in a 16 MiB window.
        let count = 1_200_000u64;
        let mut raw = header(b"CRTOCIX", 1, count);
        raw.resize(raw.len() + count as usize * PREFIX_LEN, 0);
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).expect("encoder");
        enc.include_checksum(true).expect("checksum");
        enc.set_pledged_src_size(Some(raw.len() as u64))
            .expect("size");
        enc.set_parameter(zstd::zstd_safe::CParameter::WindowLog(24))
            .expect("window");
        std::io::Write::write_all(&mut enc, &raw).expect("write");
        let big_window = enc.finish().expect("finish");
        let e = read_compact_index(&big_window).expect_err("window");
        assert!(
            e.to_string().contains("Frame requires too much memory"),
            "{e}"
        );
        // The same index as the sender compresses it: read.
        let index = read_compact_index(&compress(&raw, 3).expect("compress"))
            .expect("frame")
            .expect("index");
        assert_eq!(index.block_count(), count as usize);
    }

    #[test]
    fn zstd_bodies_need_their_checksum_and_nothing_after_them() {
        let raw = vec![7u8; 10_000];
        let good = compress(&raw, 3).expect("compress");
        assert_eq!(decompress_limited(&good, raw.len()).expect("good"), raw);
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"garbage");
        let e = decompress_limited(&trailing, raw.len()).expect_err("trailing bytes");
        assert!(e.to_string().contains("follow the zstd frame"), "{e}");
        let no_checksum = zstd::stream::encode_all(&raw[..], 3).expect("plain frame");
        let e = decompress_limited(&no_checksum, raw.len()).expect_err("no checksum");
        assert!(e.to_string().contains("no content checksum"), "{e}");
        let e = decompress_limited(&good[..good.len() - 3], raw.len()).expect_err("cut");
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn names() {
        for good in ["a", "minbase-bookworm_1.2", &"x".repeat(128)] {
            assert_eq!(validate_name(good), Ok(good));
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            "a\0",
            &"x".repeat(129),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        let err = validate_name("../etc/passwd").expect_err("refused");
        assert!(err.to_string().contains("outside the allowed set"), "{err}");
    }

    #[test]
    fn bitmap_round_trip() {
        let bits = [true, false, false, true, true, false, false, false, true];
        let map = encode_bitmap(&bits);
        assert_eq!(map, vec![0b0001_1001, 0b1]);
        let back: Vec<bool> = (0..bits.len()).map(|i| bit(&map, i)).collect();
        assert_eq!(back, bits);
    }

    #[test]
    fn batches_round_trip_and_refuse_damage() {
        let a = vec![1u8; 4096];
        let b = b"hello".to_vec();
        let (ha, hb) = (sha256(&a), sha256(&b));
        let blocks = [(&ha, &a[..]), (&hb, &b[..])];
        let body = encode_batch(blocks.iter().copied(), 3).expect("compresses");
        let batch = Batch::decode(&body).expect("decodes");
        let got: Vec<(&[u8; 32], &[u8])> = batch.blocks().collect();
        assert_eq!(got, blocks);

        for cut in [0, 1, body.len() / 2, body.len() - 1] {
            assert!(Batch::decode(&body[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 0..body.len() {
            let mut bad = body.clone();
            bad[i] ^= 0x20;
            // A damaged body is refused, or (a flag bit nobody reads) decodes to the same blocks.
            if let Ok(batch) = Batch::decode(&bad) {
                let got: Vec<(&[u8; 32], &[u8])> = batch.blocks().collect();
                assert_eq!(got, blocks, "flipped byte {i} changed the blocks");
            }
        }
        // Version 1 (whole hashes, interleaved) is still read.
        let mut v1 = BATCH_MAGIC_V1.to_vec();
        v1.extend_from_slice(&2u32.to_be_bytes());
        for (h, d) in blocks {
            v1.extend_from_slice(h);
            v1.extend_from_slice(&(d.len() as u32).to_be_bytes());
            v1.extend_from_slice(d);
        }
        let batch = Batch::decode(&compress(&v1, 3).expect("compresses")).expect("v1 decodes");
        assert_eq!(batch.blocks().collect::<Vec<_>>(), blocks);
        v1[20] ^= 1;
        assert!(matches!(
            Batch::decode(&compress(&v1, 3).expect("compresses")),
            Err(WireError::HashMismatch { position: 0, .. })
        ));

        let wrong = [(&hb, &a[..])];
        let body = encode_batch(wrong.iter().copied(), 3).expect("compresses");
        assert!(matches!(
            Batch::decode(&body),
            Err(WireError::HashMismatch { position: 0, .. })
        ));
    }

    #[test]
    fn tokens() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secret", b"secreT"));
        assert!(!token_matches(b"", b"secret"));
    }
}
