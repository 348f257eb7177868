//! Writes seed inputs for the `wire` fuzz target into the directory given (`corpus/wire`):
//! valid encodings made with the transfer crate's own encoders, from the world of
//! `certo_fuzz` (so that indexes resolve and decode whole), one file per input.
//!
//! `cargo run --example wire_seeds -- corpus/wire` (from `fuzz/`; `seed.sh` does it).

use std::path::PathBuf;

use certo_fuzz::{Route, join_session};
use certo_transfer::block_index::Resolved;
use certo_transfer::wire;

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/wire".into()),
    );
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut seeds: Vec<(String, Route, Vec<u8>)> = Vec::new();
    let zstd = |raw: &[u8]| wire::compress(raw, 3).unwrap_or_else(|e| panic!("zstd: {e}"));

    for index in certo_fuzz::indexes() {
        let label = index.chunking().label();
        let blocks: Vec<([u8; 32], Vec<u8>)> = index
            .blocks_with_offsets()
            .filter(|(_, b)| !b.is_zero())
            .take(3)
            .map(|(offset, b)| {
                let data = certo_fuzz::image();
                let at = offset as usize;
                (*b.hash(), data[at..at + b.len() as usize].to_vec())
            })
            .collect();
        let batch = wire::encode_batch(blocks.iter().map(|(h, d)| (h, &d[..])), 3)
            .unwrap_or_else(|e| panic!("batch: {e}"));
        let raw_batch = zstd::decode_all(&batch[..]).unwrap_or_else(|e| panic!("zstd: {e}"));
        seeds.push((format!("batch-body-{label}"), Route::BatchBody, batch));
        seeds.push((format!("batch-{label}"), Route::Batch, raw_batch));

        let hashes: Vec<u8> = index.blocks().iter().flat_map(|b| *b.hash()).collect();
        seeds.push((format!("query32-{label}"), Route::Query, hashes));
        let prefixes: Vec<u8> = certo_fuzz::asked(&index).concat();
        seeds.push((format!("query8-{label}"), Route::Query, prefixes));

        seeds.push((format!("full-{label}"), Route::FullIndex, index.to_bytes()));
        let compact = index.to_compact_bytes();
        seeds.push((
            format!("compact-body-{label}"),
            Route::CompactBody,
            zstd(&compact),
        ));
        seeds.push((format!("compact-{label}"), Route::Compact, compact.clone()));
        let asked = certo_fuzz::asked(&index);
        let session = index.to_session_bytes();
        // They decode whole against the world's store, as the target reads them.
        let store = certo_fuzz::store();
        for read in [
            wire::read_compact_index(&zstd(&compact)),
            wire::read_session_index(&zstd(&session), &asked),
        ] {
            let resolved = read
                .unwrap_or_else(|e| panic!("{label}: {e}"))
                .unwrap_or_else(|e| panic!("{label}: {e}"))
                .resolve(|p| store.get(p).copied());
            assert!(
                matches!(resolved, Ok(Resolved::Index(ref back)) if *back == index),
                "{label}: {resolved:?}"
            );
        }
        seeds.push((
            format!("session-body-{label}"),
            Route::SessionBody,
            join_session(&asked, &zstd(&session)),
        ));
        seeds.push((
            format!("session-{label}"),
            Route::Session,
            join_session(&asked, &session),
        ));
    }
    for (name, route, payload) in &seeds {
        assert_eq!(Route::of(route.selector()), *route);
        let mut input = vec![route.selector()];
        input.extend_from_slice(payload);
        let path = dir.join(format!("seed-{name}"));
        std::fs::write(&path, &input).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("{} ({} bytes)", path.display(), input.len());
    }
}
