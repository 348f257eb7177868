//! What the `wire` fuzz target and its seed generator (`examples/wire_seeds.rs`) share: how an
//! input is read (which of the host's decoders it goes to, and how), and the small world of
//! blocks the host resolves prefixes against, so that seeds made from it decode whole.

use std::collections::HashMap;

use certo_transfer::block_index::PREFIX_LEN;
use certo_transfer::{BlockIndex, Chunking};

/// The host's decoder an input goes to: its first byte, modulo [`Route::COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The rest is the body of `POST /v1/blocks` (`Batch::decode`).
    BatchBody,
    /// The rest is a decompressed batch, compressed as a sender does, then decoded.
    Batch,
    /// The rest is the body of `POST /v1/blocks/missing`, read at width 32 and at width 8.
    Query,
    /// The rest is the body of `PUT /v1/images/NAME?form=full` (`BlockIndex::from_bytes`).
    FullIndex,
    /// The rest is a compact index, compressed as the sender does, then decoded as a body of
    /// `?form=compact` (`wire::read_compact_index`).
    Compact,
    /// The rest is the body of `?form=compact` as it arrives.
    CompactBody,
    /// The rest is a count `k` (one byte), `k` hash prefixes (8 bytes each: what the push
    /// session asked about), and a session index, compressed as the sender does, then decoded
    /// as a body of `?form=session` (`wire::read_session_index`).
    Session,
    /// The same with the body of `?form=session` as it arrives.
    SessionBody,
}

impl Route {
    /// How many routes there are.
    pub const COUNT: u8 = 8;

    /// The route an input's first byte selects.
    pub fn of(selector: u8) -> Self {
        match selector % Self::COUNT {
            0 => Self::BatchBody,
            1 => Self::Batch,
            2 => Self::Query,
            3 => Self::FullIndex,
            4 => Self::Compact,
            5 => Self::CompactBody,
            6 => Self::Session,
            _ => Self::SessionBody,
        }
    }

    /// The first byte of an input for this route.
    pub fn selector(self) -> u8 {
        self as u8
    }
}

/// Splits the rest of a session input into the prefixes asked about and the index.
pub fn split_session(rest: &[u8]) -> (Vec<[u8; PREFIX_LEN]>, &[u8]) {
    let Some((&k, rest)) = rest.split_first() else {
        return (Vec::new(), rest);
    };
    let k = (k as usize).min(rest.len() / PREFIX_LEN);
    let (prefixes, index) = rest.split_at(k * PREFIX_LEN);
    let asked = prefixes
        .chunks_exact(PREFIX_LEN)
        .map(|c| {
            let mut p = [0u8; PREFIX_LEN];
            p.copy_from_slice(c);
            p
        })
        .collect();
    (asked, index)
}

/// The rest of a session input for `asked` (at most 255 prefixes) and a session index.
pub fn join_session(asked: &[[u8; PREFIX_LEN]], index: &[u8]) -> Vec<u8> {
    let asked = &asked[..asked.len().min(255)];
    let mut out = vec![asked.len() as u8];
    for p in asked {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(index);
    out
}

/// A 40 KiB image with what indexes meet: zero blocks, repeated blocks, blocks of noise,
/// a short tail.
pub fn image() -> Vec<u8> {
    let mut data = vec![0u8; 8192];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..7u32 {
        let block: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        data.extend_from_slice(&block);
        if i % 3 == 0 {
            data.extend_from_slice(&block);
        }
    }
    data.truncate(40 << 10);
    data.extend_from_slice(b"a short tail");
    data
}

/// The image indexed in fixed 4 KiB blocks and in content-defined chunks of 1 KiB on average.
pub fn indexes() -> [BlockIndex; 2] {
    let data = image();
    [
        Chunking::Fixed { block_size: 4096 },
        Chunking::ContentDefined { avg: 1024 },
    ]
    .map(|chunking| {
        BlockIndex::build(&data[..], chunking, |_, _| {})
            .unwrap_or_else(|e| panic!("indexing the world's image: {e}"))
    })
}

/// The host's store: every block of the world's indexes, by hash prefix.
pub fn store() -> HashMap<[u8; PREFIX_LEN], [u8; 32]> {
    indexes()
        .iter()
        .flat_map(|index| index.blocks())
        .map(|b| (prefix(b.hash()), *b.hash()))
        .collect()
}

/// What a push of `index` asks the host about: its distinct non-zero blocks' prefixes, in
/// order of first appearance.
pub fn asked(index: &BlockIndex) -> Vec<[u8; PREFIX_LEN]> {
    let mut asked: Vec<[u8; PREFIX_LEN]> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for b in index.blocks() {
        if !b.is_zero() && seen.insert(*b.hash()) {
            asked.push(prefix(b.hash()));
        }
    }
    asked
}

/// The first [`PREFIX_LEN`] bytes of a hash.
pub fn prefix(hash: &[u8; 32]) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p.copy_from_slice(&hash[..PREFIX_LEN]);
    p
}
