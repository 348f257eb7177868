//! The decoders that [`super::PrefixIndex`] replaced, as they were (whole encodings in
//! memory, the session form expanded into a compact copy), kept for the tests only: the
//! streaming decoders must give the same indexes and the same errors.

use super::*;
use crate::wire::WireError;

/// Expands a session index into the compact form, the `n`-th new block taking the
/// `n`-th of `asked` (the prefixes the host was asked about, in order). The result is
/// checked like any compact index when it is decoded (lengths, count, digest).
pub(crate) fn session_to_compact(
    bytes: &[u8],
    asked: &[[u8; PREFIX_LEN]],
) -> Result<Vec<u8>, IndexError> {
    let bad = |offset: usize, problem: String| IndexError::BadSessionIndex { offset, problem };
    let mut cur = Cursor { bytes, offset: 0 };
    let magic = cur.take("magic", 7)?;
    if magic != SESSION_MAGIC {
        return Err(bad(
            0,
            format!(
                "expected magic \"CRTOSIX\", found \"{}\"",
                magic.escape_ascii()
            ),
        ));
    }
    let version = cur.array::<1>("version")?[0];
    if version != SESSION_VERSION {
        return Err(bad(7, format!("unsupported version {version}")));
    }
    let kind = cur.array::<1>("chunking")?[0];
    let size = u32::from_be_bytes(cur.array("size")?);
    let image_len = u64::from_be_bytes(cur.array("image length")?);
    let _digest = cur.array::<32>("image digest")?;
    let count = u64::from_be_bytes(cur.array("block count")?);
    if count > MAX_IMAGE_BLOCKS {
        return Err(IndexError::TooManyBlocks { count });
    }
    // Every block takes at least one byte here: more blocks than bytes is a lie, and
    // what is expanded stays within a fixed multiple of what was sent.
    if count > (bytes.len() - cur.offset) as u64 {
        return Err(bad(
            cur.offset,
            format!(
                "{count} blocks announced in {} bytes",
                bytes.len() - cur.offset
            ),
        ));
    }
    let fixed = match kind {
        0 => {
            if !valid_block_size(size) {
                return Err(IndexError::EncodedBlockSize {
                    size,
                    chunking: "fixed",
                });
            }
            check_block_count(count, image_len, size)?;
            true
        }
        1 => false,
        kind => return Err(IndexError::UnknownChunking { kind }),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + asked.len() * PREFIX_LEN);
    out.extend_from_slice(COMPACT_MAGIC);
    out.push(COMPACT_VERSION);
    out.extend_from_slice(&bytes[8..HEADER_LEN]);
    let mut zeros = ZeroHashes::default();
    let mut next = 0usize;
    for i in 0..count {
        let len = if fixed {
            if i + 1 == count && image_len % u64::from(size) != 0 {
                (image_len % u64::from(size)) as u32
            } else {
                size
            }
        } else {
            let len = u32::from_be_bytes(cur.array("block length")?);
            out.extend_from_slice(&len.to_be_bytes());
            len
        };
        let at = cur.offset;
        let reference = read_leb128(&mut cur)?;
        let prefix: [u8; PREFIX_LEN] = match reference {
            0 => zeros.hash(len)[..PREFIX_LEN].try_into().unwrap_or_default(),
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
                *p
            }
            r => {
                let j = r - 2;
                if j >= next as u64 {
                    return Err(bad(
                        at,
                        format!(
                            "block {i} repeats new block {j}, of which there are {next} so far"
                        ),
                    ));
                }
                asked[j as usize]
            }
        };
        out.extend_from_slice(&prefix);
    }
    if cur.offset < bytes.len() {
        return Err(IndexError::TrailingBytes {
            offset: cur.offset,
            extra: bytes.len() - cur.offset,
        });
    }
    Ok(out)
}

/// Decodes the full form (`form` Full) or the compact form, resolving each non-zero hash
/// prefix with `resolve`.
pub(crate) fn decode(
    bytes: &[u8],
    form: Form,
    mut resolve: impl FnMut(&[u8; PREFIX_LEN]) -> Option<[u8; 32]>,
) -> Result<Resolved, IndexError> {
    let (magic_ref, version_ref, width): (&[u8; 7], u8, usize) = match form {
        Form::Full => (MAGIC, FORMAT_VERSION, 32),
        Form::Compact => (COMPACT_MAGIC, COMPACT_VERSION, PREFIX_LEN),
    };
    let mut cur = Cursor { bytes, offset: 0 };
    let magic = cur.take("magic", MAGIC.len())?;
    if magic != magic_ref {
        return Err(IndexError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let version = cur.array::<1>("version")?[0];
    if version != version_ref {
        return Err(IndexError::UnsupportedVersion { version });
    }
    let kind = cur.array::<1>("chunking")?[0];
    let size = u32::from_be_bytes(cur.array("size")?);
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
    let image_len = u64::from_be_bytes(cur.array("image length")?);
    let image_digest = cur.array::<32>("image digest")?;
    let count = u64::from_be_bytes(cur.array("block count")?);
    if count > MAX_IMAGE_BLOCKS {
        return Err(IndexError::TooManyBlocks { count });
    }
    let mut zeros = ZeroHashes::default();
    let mut unresolved = 0usize;
    let mut hash_of = |raw: &[u8], len: u32, zeros: &mut ZeroHashes| -> [u8; 32] {
        let mut hash = [0u8; 32];
        if raw.len() == 32 {
            hash.copy_from_slice(raw);
            return hash;
        }
        let zero = zeros.hash(len);
        if raw == &zero[..PREFIX_LEN] {
            return zero;
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(raw);
        resolve(&prefix).unwrap_or_else(|| {
            unresolved += 1;
            hash
        })
    };
    let blocks = match chunking {
        Chunking::Fixed { block_size } => {
            check_block_count(count, image_len, block_size)?;
            // count <= 2^64 / 512, so count * 32 cannot overflow.
            let hashes = cur.take_u64("block hashes", count * width as u64)?;
            let last_len = match image_len % u64::from(block_size) {
                0 => block_size,
                short => short as u32,
            };
            let n = hashes.len() / width;
            hashes
                .chunks_exact(width)
                .enumerate()
                .map(|(i, raw)| {
                    let len = if i + 1 == n { last_len } else { block_size };
                    let hash = hash_of(raw, len, &mut zeros);
                    zeros.entry(hash, len)
                })
                .collect::<Vec<_>>()
        }
        Chunking::ContentDefined { avg } => {
            let rec_len = 4 + width;
            let needed = count.saturating_mul(rec_len as u64);
            let body = cur.take_u64("blocks", needed)?;
            let max = ChunkParams::new(avg).max as u32;
            let mut total = 0u64;
            let mut blocks = Vec::with_capacity(count as usize);
            for (i, rec) in body.chunks_exact(rec_len).enumerate() {
                let len = u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]);
                if len == 0 || len > max {
                    return Err(IndexError::BadBlockLength {
                        block: i as u64,
                        offset: HEADER_LEN + rec_len * i,
                        problem: format!("length {len} is not within 1..={max}"),
                    });
                }
                total += u64::from(len);
                let hash = hash_of(&rec[4..], len, &mut zeros);
                blocks.push(zeros.entry(hash, len));
            }
            if total != image_len {
                return Err(IndexError::BadBlockLength {
                    block: count,
                    offset: HEADER_LEN,
                    problem: format!(
                        "block lengths add up to {total} bytes, not the image length {image_len}"
                    ),
                });
            }
            blocks
        }
    };
    if cur.offset < bytes.len() {
        return Err(IndexError::TrailingBytes {
            offset: cur.offset,
            extra: bytes.len() - cur.offset,
        });
    }
    if unresolved > 0 {
        return Ok(Resolved::Unresolved(unresolved));
    }
    let computed = compute_digest(image_len, &blocks);
    if computed != image_digest {
        return Err(IndexError::DigestMismatch {
            found: hex::encode(image_digest),
            computed: hex::encode(computed),
        });
    }
    Ok(Resolved::Index(BlockIndex {
        chunking,
        image_len,
        image_digest,
        blocks,
    }))
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Form {
    Full,
    Compact,
}

fn read_leb128(cur: &mut Cursor<'_>) -> Result<u64, IndexError> {
    let start = cur.offset;
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = cur.array::<1>("block reference")?[0];
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

/// Decompresses a zstd-compressed index (compact or session form) no larger than what its
/// own header allows ([`crate::block_index::Encoding::max_len`]): the header is read first,
/// then at most that many bytes, so a small frame cannot make the host hold more than the
/// index of an image of [`crate::block_index::MAX_IMAGE_BLOCKS`] blocks. The frame rules of
/// [`crate::wire::decompress_limited`] hold too.
pub(crate) fn decompress_index(body: &[u8], encoding: Encoding) -> Result<Vec<u8>, WireError> {
    // The frame checks (one frame, checksum, nothing after), without decompressing.
    crate::wire::check_frame(body).map_err(WireError::BadIndex)?;
    let mut dec = zstd::stream::Decoder::new(body)
        .map_err(|e| WireError::BadIndex(format!("not a zstd frame: {e}")))?
        .single_frame();
    let mut header = vec![0u8; 61];
    let mut got = 0;
    while got < header.len() {
        match dec.read(&mut header[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(WireError::BadIndex(format!(
                    "zstd decompression failed: {e}"
                )));
            }
        }
    }
    header.truncate(got);
    let limit = encoding.max_len(&header).map_err(|e| match e {
        IndexError::TooManyBlocks { .. } => WireError::IndexTooLarge(e.to_string()),
        e => WireError::BadIndex(e.to_string()),
    })?;
    let mut raw = header;
    (&mut dec)
        .take((limit - raw.len()) as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| WireError::BadIndex(format!("zstd decompression failed: {e}")))?;
    if raw.len() > limit {
        return Err(WireError::IndexTooLarge(format!(
            "it decompresses to more than the {limit} bytes its header allows"
        )));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{compress, read_compact_index, read_session_index};
    use proptest::prelude::*;

    /// What a host makes of an index, comparable across the two implementations.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        /// The body is refused (`WireError`: 413 or 422).
        Body(String),
        /// A session index that does not fit its session (409).
        Conflict(String),
        /// The index is refused (`RepoError::Index`: 413 or 422).
        Refused(String),
        /// This many prefixes are unknown (409).
        Unresolved(usize),
        /// Decoded.
        Index(BlockIndex),
    }

    /// An error's text. The compact form's chunk length errors of a session index name the
    /// offset in the session form now, not in its expansion, so offsets are left out there.
    fn describe(e: &IndexError, session: bool) -> String {
        match e {
            IndexError::BadBlockLength { block, problem, .. } if session => {
                format!("block {block}: {problem}")
            }
            e => e.to_string(),
        }
    }

    fn outcome(r: Result<Resolved, IndexError>, session: bool) -> Outcome {
        match r {
            Ok(Resolved::Index(index)) => Outcome::Index(index),
            Ok(Resolved::Unresolved(n)) => Outcome::Unresolved(n),
            Err(e) => Outcome::Refused(describe(&e, session)),
        }
    }

    type Resolver<'a> = &'a dyn Fn(&[u8; PREFIX_LEN]) -> Option<[u8; 32]>;

    /// The host before: decompress whole, expand a session index, decode the compact form.
    fn before(body: &[u8], session: Option<&[[u8; PREFIX_LEN]]>, resolve: Resolver) -> Outcome {
        let encoding = match session {
            Some(_) => Encoding::Session,
            None => Encoding::Compact,
        };
        let raw = match decompress_index(body, encoding) {
            Ok(raw) => raw,
            Err(e) => return Outcome::Body(e.to_string()),
        };
        let compact = match session {
            Some(asked) => match session_to_compact(&raw, asked) {
                Ok(compact) => compact,
                Err(e) => return Outcome::Conflict(describe(&e, true)),
            },
            None => raw,
        };
        outcome(decode(&compact, Form::Compact, resolve), session.is_some())
    }

    /// The host now: decode as the body is decompressed.
    fn now(body: &[u8], session: Option<&[[u8; PREFIX_LEN]]>, resolve: Resolver) -> Outcome {
        let read = match session {
            Some(asked) => read_session_index(body, asked),
            None => read_compact_index(body),
        };
        match read {
            Err(e) => Outcome::Body(e.to_string()),
            Ok(Err(e)) if session.is_some() => Outcome::Conflict(describe(&e, true)),
            Ok(Err(e)) => Outcome::Refused(describe(&e, false)),
            Ok(Ok(index)) => outcome(index.resolve(resolve), session.is_some()),
        }
    }

    /// Compares the two on every form of `index`'s encoding after `damage`.
    fn compare(index: &BlockIndex, damage: &Damage) -> Result<(), TestCaseError> {
        let known: HashMap<[u8; PREFIX_LEN], [u8; 32]> = index
            .blocks()
            .iter()
            .map(|b| (b.hash[..PREFIX_LEN].try_into().unwrap_or_default(), b.hash))
            .collect();
        let resolve = |p: &[u8; PREFIX_LEN]| known.get(p).copied();
        let mut asked: Vec<[u8; PREFIX_LEN]> = Vec::new();
        for b in index.blocks().iter().filter(|b| !b.zero) {
            let p = b.hash[..PREFIX_LEN].try_into().unwrap_or_default();
            if !asked.contains(&p) {
                asked.push(p);
            }
        }
        let cdc = matches!(index.chunking, Chunking::ContentDefined { .. });

        // The full form, whole.
        let full = damage.apply(index.to_bytes());
        let old = outcome(decode(&full, Form::Full, |_| None), false);
        let new = match BlockIndex::from_bytes(&full) {
            Ok(index) => Outcome::Index(index),
            Err(e) => Outcome::Refused(e.to_string()),
        };
        let undamaged = matches!(damage, Damage::None);
        prop_assert!(!undamaged || matches!(new, Outcome::Index(_)), "{:?}", new);
        prop_assert_eq!(old, new, "full form");

        // The compact form, whole and as a commit body.
        let compact = damage.apply(index.to_compact_bytes());
        let old = outcome(decode(&compact, Form::Compact, resolve), false);
        let new = outcome(BlockIndex::from_compact_bytes(&compact, resolve), false);
        prop_assert_eq!(&old, &new, "compact form");
        let body = compress(&compact, 3).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let new = now(&body, None, &resolve);
        prop_assert!(!undamaged || matches!(new, Outcome::Index(_)), "{:?}", new);
        prop_assert_eq!(before(&body, None, &resolve), new, "compact commit");

        // The session form as a commit body. A chunk length damaged into gigabytes would
        // make the old code hash gigabytes of zeros: content-defined session indexes are
        // damaged in their structure only.
        if cdc && matches!(damage, Damage::Flip(..)) {
            return Ok(());
        }
        let asked = damage.ask(asked);
        let session = damage.apply(index.to_session_bytes());
        let body = compress(&session, 3).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let new = now(&body, Some(&asked), &resolve);
        prop_assert!(!undamaged || matches!(new, Outcome::Index(_)), "{:?}", new);
        prop_assert_eq!(before(&body, Some(&asked), &resolve), new, "session commit");
        // Damage on the way: a byte of the compressed body flipped.
        if let Damage::Flip(at, bits) = damage {
            let mut body = body;
            let at = at % body.len();
            body[at] ^= bits;
            let (old, new) = (
                before(&body, Some(&asked), &resolve),
                now(&body, Some(&asked), &resolve),
            );
            match old {
                // Refused either way, not always with the same words (the new decoder
                // believes the content size the frame declares).
                Outcome::Body(_) => prop_assert!(matches!(new, Outcome::Body(_)), "{:?}", new),
                old => prop_assert_eq!(old, new, "flipped compressed byte {}", at),
            }
        }
        Ok(())
    }

    /// What is done to an encoding (and to the prefixes the host was asked about).
    #[derive(Debug, Clone)]
    enum Damage {
        None,
        /// Cut to this many thousandths of its length.
        Cut(usize),
        /// These bytes appended.
        Trailing(Vec<u8>),
        /// The block count moved by this much.
        Count(i64),
        /// The block count set to this.
        SetCount(u64),
        /// The byte at this position (modulo the length) xor-ed with these bits.
        Flip(usize, u8),
        /// The last question forgotten.
        AskedShort,
        /// A question about another prefix.
        AskedWrong(usize),
        /// The length of a content-defined chunk (this one, modulo the count) set to this.
        ChunkLen(usize, u32),
    }

    impl Damage {
        fn apply(&self, mut bytes: Vec<u8>) -> Vec<u8> {
            if let Self::ChunkLen(block, len) = self {
                if let Some(at) = chunk_len_offset(&bytes, *block) {
                    bytes[at..at + 4].copy_from_slice(&len.to_be_bytes());
                }
                return bytes;
            }
            let count_at = 53..HEADER_LEN;
            let count = |b: &[u8]| u64::from_be_bytes(b[53..61].try_into().unwrap_or_default());
            match self {
                Self::Cut(per_mille) => bytes.truncate(bytes.len() * per_mille / 1000),
                Self::Trailing(extra) => bytes.extend_from_slice(extra),
                Self::Count(delta) => {
                    let n = count(&bytes).wrapping_add_signed(*delta);
                    bytes[count_at].copy_from_slice(&n.to_be_bytes());
                }
                Self::SetCount(n) => bytes[count_at].copy_from_slice(&n.to_be_bytes()),
                Self::Flip(at, bits) => {
                    let at = at % bytes.len();
                    bytes[at] ^= bits;
                }
                Self::None | Self::AskedShort | Self::AskedWrong(_) | Self::ChunkLen(..) => {}
            }
            bytes
        }

        fn ask(&self, mut asked: Vec<[u8; PREFIX_LEN]>) -> Vec<[u8; PREFIX_LEN]> {
            match self {
                Self::AskedShort => {
                    asked.pop();
                }
                Self::AskedWrong(i) if !asked.is_empty() => {
                    let i = i % asked.len();
                    asked[i][0] ^= 0x55;
                }
                _ => {}
            }
            asked
        }
    }

    /// Where the length of content-defined chunk `block` (modulo the count) is in an encoding
    /// of any form.
    fn chunk_len_offset(bytes: &[u8], block: usize) -> Option<usize> {
        let count = u64::from_be_bytes(bytes[53..61].try_into().ok()?) as usize;
        if bytes[8] != 1 || count == 0 {
            return None;
        }
        let block = block % count;
        match &bytes[..7] {
            m if m == MAGIC => Some(HEADER_LEN + block * 36),
            m if m == COMPACT_MAGIC => Some(HEADER_LEN + block * 12),
            _ => {
                let mut at = HEADER_LEN;
                for _ in 0..block {
                    at += 4;
                    while bytes[at] & 0x80 != 0 {
                        at += 1;
                    }
                    at += 1;
                }
                Some(at)
            }
        }
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            Just(Damage::None),
            (0usize..1000).prop_map(Damage::Cut),
            prop::collection::vec(any::<u8>(), 1..40).prop_map(Damage::Trailing),
            prop_oneof![Just(-1i64), Just(1), Just(-2), Just(1000)].prop_map(Damage::Count),
            prop_oneof![
                Just(0u64),
                Just(MAX_IMAGE_BLOCKS),
                Just(MAX_IMAGE_BLOCKS + 1),
                Just(u64::MAX),
                any::<u64>(),
            ]
            .prop_map(Damage::SetCount),
            (any::<usize>(), 1u8..=255).prop_map(|(at, bits)| Damage::Flip(at, bits)),
            Just(Damage::AskedShort),
            any::<usize>().prop_map(Damage::AskedWrong),
            (
                any::<usize>(),
                prop_oneof![Just(0u32), Just(1), Just(4096), Just(4097), 2u32..4096]
            )
                .prop_map(|(block, len)| Damage::ChunkLen(block, len)),
        ]
    }

    /// Images with repeats and zero runs, indexed in fixed blocks or content-defined chunks.
    fn index() -> impl Strategy<Value = BlockIndex> {
        let part = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..3000),
            (0usize..6000).prop_map(|n| vec![0u8; n]),
            (1u8..=255, 0usize..5000).prop_map(|(b, n)| vec![b; n]),
        ];
        let data = prop::collection::vec(part, 0..8).prop_map(|parts| {
            let mut data = parts.concat();
            // A repeat of the first KiB.
            let head: Vec<u8> = data.iter().take(1024).copied().collect();
            data.extend_from_slice(&head);
            data
        });
        (data, prop_oneof![Just(0u32), Just(512), Just(1024)]).prop_map(|(data, size)| {
            let chunking = match size {
                0 => Chunking::ContentDefined { avg: 1024 },
                block_size => Chunking::Fixed { block_size },
            };
            BlockIndex::build(&data[..], chunking, |_, _| {}).unwrap_or_else(|e| panic!("{e}"))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_streaming_decoders_agree_with_the_whole_buffer_ones(
            index in index(), damage in damage(),
        ) {
            compare(&index, &damage)?;
        }
    }

    #[test]
    fn every_cut_and_count_of_a_small_index_agrees() {
        let mut data = vec![0u8; 2048];
        data.extend((0..6000u32).map(|i| (i * 7 % 251) as u8));
        data.extend(vec![9u8; 3000]);
        for chunking in [
            Chunking::Fixed { block_size: 512 },
            Chunking::ContentDefined { avg: 1024 },
        ] {
            let index = BlockIndex::build(&data[..], chunking, |_, _| {}).expect("index");
            let longest = index.to_bytes().len();
            for per_mille in 0..=1000 {
                compare(&index, &Damage::Cut(per_mille)).expect("cut");
            }
            for delta in [-3, -1, 1, 2, 100] {
                compare(&index, &Damage::Count(delta)).expect("count");
            }
            for extra in 1..12 {
                compare(&index, &Damage::Trailing(vec![0; extra])).expect("trailing");
            }
            assert!(longest > 100);
        }
    }
}
