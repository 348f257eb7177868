//! Properties of the plan (what the host lacks) and of the repository, on random image
//! pairs: the plan is exactly the set difference, storing it makes the image complete,
//! the compact index resolves to the full one, and assembly is bit-exact.

use std::collections::HashSet;

use certo_transfer::{BlockIndex, Repository};
use proptest::prelude::*;

const BS: usize = 512;

/// An image pair: B reuses some of A's blocks, repeats some, adds zeros and new bytes.
fn pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let block = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), BS),
        1 => Just(vec![0u8; BS]),
    ];
    (
        prop::collection::vec(block, 1..24),
        prop::collection::vec((0usize..40, any::<u8>()), 0..40),
        0usize..BS,
    )
        .prop_map(|(a_blocks, picks, tail)| {
            let a: Vec<u8> = a_blocks.concat();
            let mut b = Vec::new();
            for (pick, byte) in picks {
                match pick {
                    p if p < a_blocks.len() => b.extend_from_slice(&a_blocks[p]),
                    p if p % 3 == 0 => b.extend(vec![0u8; BS]),
                    _ => b.extend(vec![byte; BS]),
                }
            }
            b.extend(vec![7u8; tail]);
            (a, b)
        })
}

fn store_all(repo: &Repository, data: &[u8], index: &BlockIndex, which: &[usize]) {
    let offsets: Vec<(u64, u32)> = index
        .blocks_with_offsets()
        .map(|(o, b)| (o, b.len()))
        .collect();
    let blocks: Vec<([u8; 32], &[u8])> = which
        .iter()
        .map(|&i| {
            let (o, len) = offsets[i];
            (
                *index.blocks()[i].hash(),
                &data[o as usize..o as usize + len as usize],
            )
        })
        .collect();
    repo.store_blocks(blocks.iter().map(|(h, d)| (h, *d)))
        .expect("store");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn the_plan_is_the_set_difference_and_completes_the_image((a, b) in pair()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, _) = Repository::open(dir.path()).expect("open");
        let ia = BlockIndex::from_reader(&a[..], BS as u32).expect("index a");
        let ib = BlockIndex::from_reader(&b[..], BS as u32).expect("index b");
        store_all(&repo, &a, &ia, &ia.missing_by(|_| false));
        repo.commit("a", &ia.to_bytes()).expect("commit a");

        let plan = ib.missing_by(|h| repo.has_block(h));
        let have: HashSet<[u8; 32]> = ia.blocks().iter().map(|x| *x.hash()).collect();
        let mut listed = HashSet::new();
        let expected: Vec<usize> = ib.blocks().iter().enumerate()
            .filter(|(_, x)| !x.is_zero() && !have.contains(x.hash()) && listed.insert(*x.hash()))
            .map(|(i, _)| i)
            .collect();
        prop_assert_eq!(&plan, &expected);

        // Before the missing blocks arrive, B cannot be marked complete, in either form.
        if !plan.is_empty() {
            prop_assert!(repo.commit("b", &ib.to_bytes()).is_err());
            prop_assert!(repo.commit_compact("b", &ib.to_compact_bytes()).is_err());
            prop_assert!(repo.manifest("b").is_err());
        }
        store_all(&repo, &b, &ib, &plan);
        prop_assert!(ib.missing_by(|h| repo.has_block(h)).is_empty());
        let manifest = repo.commit_compact("b", &ib.to_compact_bytes()).expect("commit b");
        prop_assert_eq!(manifest.digest, hex::encode(ib.image_digest()));
        prop_assert_eq!(repo.read_index("b").expect("index"), ib);
        repo.assemble("b").expect("assemble");
        prop_assert_eq!(std::fs::read(repo.image_path("b").expect("name")).expect("read"), b);

        let report = repo.verify().expect("verify");
        prop_assert_eq!(report.bad_records, 0);
        prop_assert_eq!(report.records, report.distinct);
        prop_assert_eq!((report.images, report.images_missing_blocks), (2, 0));
    }
}
