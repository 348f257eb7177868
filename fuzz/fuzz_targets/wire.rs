//! Feeds arbitrary bytes to the decoders a host runs on request bodies, the very functions
//! its server calls: batches (`Batch::decode`), missing queries (`wire::decode_query`), index
//! commits in full form (`BlockIndex::from_bytes`), compact and session form as they arrive
//! (`wire::check_compact_index` / `check_session_index`, which keep no block, then
//! `wire::read_compact_index` / `read_session_index` and `PrefixIndex::resolve` against a
//! store). The first byte picks the decoder (`certo_fuzz::Route`); compact and
//! session indexes and batches are also compressed as a sender does first, so that the
//! fuzzer reaches what lies behind the zstd frame's checksum.
//!
//! Beyond not panicking, a decoder must keep to what it documents: the same verdict from
//! checking an index as from reading and resolving it; a batch decoded as the format says
//! (a plain decoder of the decompressed bytes is the reference); no block count above
//! `MAX_IMAGE_BLOCKS` nor above what the body's bytes can hold; batch blocks that match
//! their hashes, within `MAX_BLOCK_LEN` and `MAX_BATCH_RAW`; an index that decodes is the
//! canonical encoding of itself (encoded again, it gives the same bytes, or, for a session
//! index, the same index); and every error a client or the log may see is printable.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use certo_fuzz::Route;
use certo_transfer::block_index::{
    BlockEntry, Checked, MAX_BLOCK_LEN, MAX_IMAGE_BLOCKS, PREFIX_LEN, PrefixIndex, Resolved,
    resolve_run, sha256,
};
use certo_transfer::wire::{self, Batch, MAX_BATCH_RAW, MAX_QUERY_HASHES, WireError};
use certo_transfer::{BlockIndex, Chunking, IndexError};
use libfuzzer_sys::fuzz_target;

/// Length of the header of every index form.
const HEADER_LEN: usize = 61;

fn store() -> &'static HashMap<[u8; PREFIX_LEN], [u8; 32]> {
    static S: OnceLock<HashMap<[u8; PREFIX_LEN], [u8; 32]>> = OnceLock::new();
    S.get_or_init(certo_fuzz::store)
}

/// A message a client receives, or the agent logs, must not carry raw bytes.
fn printable(message: &str) {
    assert!(!message.is_empty());
    assert!(!message.chars().any(char::is_control), "{message:?}");
}

/// The content size a zstd body declares, if it is a frame that declares one.
fn declared(body: &[u8]) -> Option<usize> {
    match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(n)) => usize::try_from(n).ok(),
        _ => None,
    }
}

fn compressed(raw: &[u8]) -> Vec<u8> {
    wire::compress(raw, 1).unwrap_or_else(|e| panic!("compressing {} bytes: {e}", raw.len()))
}

/// A block of a batch: its hash and bytes.
type Block = ([u8; 32], Vec<u8>);

/// A batch as the format describes it, decoded the plain way (the decompressed bytes at
/// hand): its distinct blocks in order of first appearance and the number of repeats, or
/// `None` if it is refused.
fn reference_batch(raw: &[u8]) -> Option<(Vec<Block>, usize)> {
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if raw.len() < n {
            return None;
        }
        let (head, rest) = raw.split_at(n);
        *raw = rest;
        Some(head)
    }
    fn length(raw: &mut &[u8]) -> Option<usize> {
        let len = u32::from_be_bytes(take(raw, 4)?.try_into().ok()?);
        (1..=MAX_BLOCK_LEN).contains(&len).then_some(len as usize)
    }
    if raw.len() > MAX_BATCH_RAW {
        return None;
    }
    let mut rest = raw;
    let v1 = match take(&mut rest, 8)? {
        m if m == b"CRTOBAT2" => false,
        m if m == b"CRTOBAT1" => true,
        _ => return None,
    };
    let count = u32::from_be_bytes(take(&mut rest, 4)?.try_into().ok()?) as usize;
    let mut blocks: Vec<(&[u8], &[u8])> = Vec::new();
    if v1 {
        for _ in 0..count {
            let hash = take(&mut rest, 32)?;
            let len = length(&mut rest)?;
            blocks.push((hash, take(&mut rest, len)?));
        }
    } else {
        let mut heads = Vec::new();
        for _ in 0..count {
            let prefix = take(&mut rest, PREFIX_LEN)?;
            heads.push((prefix, length(&mut rest)?));
        }
        for (prefix, len) in heads {
            blocks.push((prefix, take(&mut rest, len)?));
        }
    }
    if !rest.is_empty() {
        return None;
    }
    let mut distinct: Vec<Block> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (announced, data) in &blocks {
        let hash = sha256(data);
        if hash[..announced.len()] != **announced {
            return None;
        }
        if seen.insert(hash) {
            distinct.push((hash, data.to_vec()));
        }
    }
    Some((distinct, count - seen.len()))
}

/// A batch body; `raw`: the decompressed batch it was made from, when it was.
fn batch(body: &[u8], raw: Option<&[u8]>) {
    let decoded = Batch::decode(body);
    if let Some(raw) = raw {
        // The streaming decoder finds what the plain one finds.
        let expected = reference_batch(raw);
        match (&decoded, &expected) {
            (Ok(batch), Some((blocks, repeats))) => {
                assert_eq!(batch.repeats(), *repeats);
                assert!(batch.blocks().eq(blocks.iter().map(|(h, d)| (h, &d[..]))));
            }
            (Err(_), None) => {}
            (decoded, expected) => panic!(
                "the batch decodes to {:?}, the format says {:?}",
                decoded.as_ref().map(|b| b.blocks().len()),
                expected.as_ref().map(|(b, r)| (b.len(), r))
            ),
        }
    }
    let batch = match decoded {
        Ok(batch) => batch,
        Err(e) => return printable(&e.to_string()),
    };
    let raw = declared(body).expect("a decoded batch's frame declared its size");
    let mut bytes = 0;
    let mut seen = std::collections::HashSet::new();
    for (hash, data) in batch.blocks() {
        assert!(!data.is_empty() && data.len() <= MAX_BLOCK_LEN as usize);
        assert_eq!(*hash, sha256(data), "a block is stored under its own hash");
        assert!(seen.insert(*hash), "a block is kept once");
        bytes += data.len();
    }
    assert!(bytes <= MAX_BATCH_RAW && bytes <= raw);
    // A batch's magic and count take 12 bytes, each block a header (8 + 4 bytes at least)
    // and a byte of data.
    assert!(12 + (batch.blocks().len() + batch.repeats()) * 13 <= raw);
    // Encoded again, the same blocks.
    let again = wire::encode_batch(batch.blocks(), 1).expect("encodes");
    let back = Batch::decode(&again).expect("its own encoding decodes");
    assert!(back.blocks().eq(batch.blocks()));
    assert_eq!(back.repeats(), 0);
}

fn query(body: &[u8]) {
    fn width<const N: usize>(body: &[u8]) {
        match wire::decode_query::<N>(body) {
            Ok(hashes) => {
                assert!(body.len().is_multiple_of(N));
                assert_eq!(hashes.len(), body.len() / N);
                assert!(hashes.len() <= MAX_QUERY_HASHES);
                assert_eq!(hashes.concat(), body);
            }
            Err(e) => {
                assert!(!body.len().is_multiple_of(N) || body.len() / N > MAX_QUERY_HASHES);
                printable(&e.to_string());
            }
        }
    }
    width::<32>(body);
    width::<PREFIX_LEN>(body);
}

/// What every decoded index keeps to.
fn sound(index: &BlockIndex) {
    let n = index.blocks().len();
    assert!(n as u64 <= MAX_IMAGE_BLOCKS);
    let total: u64 = index.blocks().iter().map(|b| u64::from(b.len())).sum();
    assert_eq!(total, index.image_len());
    assert!(
        index
            .blocks()
            .iter()
            .all(|b| !b.is_empty() && b.len() <= MAX_BLOCK_LEN)
    );
    assert_eq!(index.encoded_len(), index.to_bytes().len());
}

fn full_index(body: &[u8]) {
    match BlockIndex::from_bytes(body) {
        Ok(index) => {
            sound(&index);
            assert_eq!(index.to_bytes(), body, "the full form is canonical");
            // Its compact form, committed to a host holding its blocks, is the same index
            // (or, where two of its hashes share a prefix, refused by the digest).
            let own: HashMap<[u8; PREFIX_LEN], [u8; 32]> = index
                .blocks()
                .iter()
                .map(|b| (certo_fuzz::prefix(b.hash()), *b.hash()))
                .collect();
            let body = compressed(&index.to_compact_bytes());
            let read = wire::read_compact_index(&body).expect("a sound frame");
            if let Ok(Resolved::Index(back)) = read
                .expect("a sound index")
                .resolve(|p| own.get(p).copied())
            {
                assert_eq!(back, index);
            }
        }
        Err(e) => printable(&e.to_string()),
    }
}

/// How many bytes the blocks of a compact or session index take: exactly so many per block
/// (compact), or at least so many (session: a length if content-defined, a reference of a
/// byte at least).
#[derive(Clone, Copy)]
enum Form {
    Compact,
    Session,
}

impl Form {
    fn per_block(self, chunking: Chunking) -> usize {
        let length = match chunking {
            Chunking::Fixed { .. } => 0,
            Chunking::ContentDefined { .. } => 4,
        };
        length
            + match self {
                Self::Compact => PREFIX_LEN,
                Self::Session => 1,
            }
    }
}

/// An index read from a commit body (`raw`: what the body decompresses to, when known) and
/// resolved against the store.
fn prefix_index(
    read: Result<Result<PrefixIndex, IndexError>, WireError>,
    raw: Option<usize>,
    form: Form,
) -> Option<BlockIndex> {
    let index = match read {
        Ok(Ok(index)) => index,
        Ok(Err(e)) => {
            printable(&e.to_string());
            return None;
        }
        Err(e) => {
            printable(&e.to_string());
            return None;
        }
    };
    let n = index.block_count();
    assert!(n as u64 <= MAX_IMAGE_BLOCKS);
    // A session index whose compact form is refused holds no block: nothing to measure.
    if let Some(raw) = raw
        && n > 0
    {
        let taken = HEADER_LEN + n * form.per_block(index.chunking());
        match form {
            Form::Compact => assert_eq!(taken, raw, "{n} blocks in {raw} bytes"),
            Form::Session => assert!(taken <= raw, "{n} blocks in {raw} bytes"),
        }
    }
    match index.resolve(|p| store().get(p).copied()) {
        Ok(Resolved::Index(index)) => {
            assert_eq!(index.blocks().len(), n);
            sound(&index);
            Some(index)
        }
        Ok(Resolved::Unresolved(missing)) => {
            assert!(missing >= 1 && missing <= n);
            None
        }
        Err(e) => {
            printable(&e.to_string());
            None
        }
    }
}

/// The store's resolver for runs of blocks, as the server gives the checking readers.
fn resolve_runs(run: &mut [BlockEntry]) -> usize {
    resolve_run(run, |p| store().get(p).copied())
}

/// What the server's first reading of a commit (keeping no block) finds must be what its
/// second (keeping them) and their resolution find: the same errors, the same outcome.
fn same_verdict(
    checked: Result<Result<Checked, IndexError>, WireError>,
    read: Result<Result<PrefixIndex, IndexError>, WireError>,
) {
    let checked = checked.map(|c| c.and_then(Checked::outcome));
    let read = read.map(|r| {
        r.and_then(|index| match index.resolve(|p| store().get(p).copied())? {
            Resolved::Index(_) => Ok(0),
            Resolved::Unresolved(n) => Ok(n),
        })
    });
    let text = |r: Result<Result<usize, IndexError>, WireError>| match r {
        Ok(Ok(n)) => format!("{n} unresolved"),
        Ok(Err(e)) => format!("index refused: {e}"),
        Err(e) => format!("body refused: {e}"),
    };
    assert_eq!(text(checked), text(read));
}

fn compact(body: &[u8], raw: Option<&[u8]>) {
    same_verdict(
        wire::check_compact_index(body, resolve_runs),
        wire::read_compact_index(body),
    );
    let raw_len = raw.map(<[u8]>::len).or_else(|| declared(body));
    let Some(index) = prefix_index(wire::read_compact_index(body), raw_len, Form::Compact) else {
        return;
    };
    if let Some(raw) = raw {
        assert_eq!(
            index.to_compact_bytes(),
            raw,
            "the compact form is canonical"
        );
    }
}

fn session(asked: &[[u8; PREFIX_LEN]], body: &[u8], raw: Option<usize>) {
    same_verdict(
        wire::check_session_index(body, asked, resolve_runs),
        wire::read_session_index(body, asked),
    );
    let raw = raw.or_else(|| declared(body));
    let read = wire::read_session_index(body, asked);
    let Some(index) = prefix_index(read, raw, Form::Session) else {
        return;
    };
    // The session form the sender would make of it, and the compact form, read back to it.
    let again = compressed(&index.to_session_bytes());
    let back = wire::read_session_index(&again, &certo_fuzz::asked(&index))
        .expect("a sound frame")
        .expect("a sound index")
        .resolve(|p| store().get(p).copied());
    assert!(
        matches!(back, Ok(Resolved::Index(ref b)) if *b == index),
        "{back:?}"
    );
    let again = compressed(&index.to_compact_bytes());
    let back = wire::read_compact_index(&again)
        .expect("a sound frame")
        .expect("a sound index")
        .resolve(|p| store().get(p).copied());
    assert!(
        matches!(back, Ok(Resolved::Index(ref b)) if *b == index),
        "{back:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match Route::of(selector) {
        Route::BatchBody => batch(rest, None),
        Route::Batch => batch(&compressed(rest), Some(rest)),
        Route::Query => query(rest),
        Route::FullIndex => full_index(rest),
        Route::Compact => compact(&compressed(rest), Some(rest)),
        Route::CompactBody => compact(rest, None),
        Route::Session => {
            let (asked, index) = certo_fuzz::split_session(rest);
            session(&asked, &compressed(index), Some(index.len()));
        }
        Route::SessionBody => {
            let (asked, body) = certo_fuzz::split_session(rest);
            session(&asked, body, None);
        }
    }
});
