//! Random and real images pushed to an agent over real HTTP come back bit-exact; the
//! host's answers, the plan and the repository agree; bad input is refused precisely.

mod support;

use std::process::Command;

use certo_transfer::{Chunking, ClientError, PushOptions, Repository};
use support::{Agent, Lcg, client, client_with, fast_retry, write_image};

fn assembled(repo: &Repository, name: &str) -> Vec<u8> {
    std::fs::read(repo.image_path(name).expect("valid name")).expect("assembled image exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_images_round_trip_and_the_second_sends_only_new_blocks() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    let mut rng = Lcg(7);
    // A: 3 MiB of data, 1 MiB of zeros, an odd tail. B: A with 40 blocks changed and more data.
    let mut a = rng.image_like(3 << 20);
    a.extend(vec![0u8; 1 << 20]);
    a.extend(rng.bytes(1234));
    let mut b = a.clone();
    for k in 0..40 {
        let at = k * 4096 * 13 + 100;
        b[at..at + 10].copy_from_slice(b"changed!!!");
    }
    b.extend(rng.bytes(100_000));
    let pa = write_image(work.path(), "a.img", &a);
    let pb = write_image(work.path(), "b.img", &b);
    let c = client(&agent.url());

    let plan = c.plan(&pa, Chunking::default()).await.expect("plan A");
    assert_eq!(plan.blocks_reused, 0);
    assert_eq!(plan.blocks_zero, 256);
    let first = c.push(&pa, PushOptions::new("a")).await.expect("push A");
    assert_eq!(first.bytes_total, a.len() as u64);
    assert_eq!(first.blocks_sent, plan.blocks_to_send);
    assert_eq!(first.bytes_raw_sent, plan.bytes_to_send);
    assert!(
        first.bytes_sent < a.len() as u64,
        "zero blocks are never sent"
    );
    assert_eq!(assembled(&agent.repo, "a"), a);

    // The plan for B names exactly the blocks that differ from A (A is the seed).
    let plan = c.plan(&pb, Chunking::default()).await.expect("plan B");
    let new_tail_blocks = (b.len() - a.len() + (a.len() % 4096)).div_ceil(4096);
    assert_eq!(plan.blocks_to_send, 40 + new_tail_blocks);
    let second = c.push(&pb, PushOptions::new("b")).await.expect("push B");
    assert_eq!(second.blocks_sent, plan.blocks_to_send);
    assert_eq!(second.blocks_reused, plan.blocks_reused);
    assert_eq!(assembled(&agent.repo, "b"), b);

    // Pushing B again sends no block at all.
    let again = c
        .push(&pb, PushOptions::new("b2"))
        .await
        .expect("push B again");
    assert_eq!((again.blocks_sent, again.batches), (0, 0));
    assert_eq!(assembled(&agent.repo, "b2"), b);

    let repo = agent.stop().await;
    let report = repo.verify().expect("verify");
    assert_eq!(report.bad_records, 0);
    assert_eq!(
        report.records, report.distinct,
        "each distinct block is stored once"
    );
    assert_eq!((report.images, report.images_missing_blocks), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_defined_chunks_survive_an_insertion() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    let mut rng = Lcg(11);
    let a = rng.image_like(2 << 20);
    let mut b = a[..700_000].to_vec();
    b.extend_from_slice(b"a few bytes inserted, shifting everything after them");
    b.extend_from_slice(&a[700_000..]);
    let pa = write_image(work.path(), "a.tar", &a);
    let pb = write_image(work.path(), "b.tar", &b);
    let c = client(&agent.url());
    let cdc = Chunking::ContentDefined { avg: 8192 };
    let mut opts = PushOptions::new("a");
    opts.chunking = cdc;
    c.push(&pa, opts.clone()).await.expect("push A");
    let plan = c.plan(&pb, cdc).await.expect("plan B");
    assert!(
        plan.bytes_to_send < 64 * 1024,
        "an insertion costs a few chunks, not the rest of the file: {plan:?}"
    );
    let fixed = c.plan(&pb, Chunking::default()).await.expect("fixed plan");
    assert!(
        fixed.bytes_to_send > 1 << 20,
        "fixed blocks all shift: {fixed:?}"
    );
    opts.name = "b".into();
    c.push(&pb, opts).await.expect("push B");
    assert_eq!(assembled(&agent.repo, "b"), b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_ext4_image_round_trips() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    let mut rng = Lcg(3);
    for i in 0..40 {
        std::fs::write(
            tree.join(format!("etc/file{i}")),
            rng.image_like(20_000 + i * 3000),
        )
        .expect("write file");
    }
    let img = work.path().join("root.img");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 runs (package e2fsprogs)");
    assert!(status.success());
    let agent = Agent::start(&work.path().join("repo")).await;
    let summary = client(&agent.url())
        .push(&img, PushOptions::new("root"))
        .await
        .expect("push");
    assert!(
        summary.blocks_zero > summary.blocks_total / 2,
        "{summary:?}"
    );
    assert_eq!(
        assembled(&agent.repo, "root"),
        std::fs::read(&img).expect("read image")
    );
    // The assembled image is sparse where the image is zero.
    let status = Command::new("e2fsck")
        .args(["-fn"])
        .arg(agent.repo.image_path("root").expect("name"))
        .status()
        .expect("e2fsck runs");
    assert!(status.success(), "the assembled file system checks clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_bad_names_and_paths_are_refused_and_change_nothing() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    let img = write_image(work.path(), "x.img", &Lcg(5).bytes(50_000));

    let wrong = client_with(&agent.url(), "not-the-token", fast_retry(3));
    let err = wrong
        .push(&img, PushOptions::new("x"))
        .await
        .expect_err("wrong token refused");
    assert_eq!(
        err.status(),
        Some(reqwest::StatusCode::UNAUTHORIZED),
        "{err}"
    );
    assert!(err.to_string().contains("wrong token"), "{err}");

    let c = client(&agent.url());
    for bad in ["..", ".hidden", "a/b", "x y", ""] {
        let err = c
            .push(&img, PushOptions::new(bad))
            .await
            .expect_err("bad name refused");
        assert!(matches!(err, ClientError::Wire(_)), "{bad:?}: {err}");
    }
    // Names that reach the agent by other spellings are refused there.
    let http = reqwest::Client::new();
    for path in [
        "/v1/images/..%2F..%2Fetc",
        "/v1/images/%2e%2e",
        "/v1/images/a%00b",
    ] {
        let resp = http
            .put(format!("{}{path}", agent.url()))
            .bearer_auth(support::TOKEN)
            .body(vec![0u8; 61])
            .send()
            .await
            .expect("request");
        // Refused as a bad name, or normalised by the URL parser into a route that does not exist.
        assert!(
            matches!(resp.status().as_u16(), 400 | 404),
            "{path}: {}",
            resp.status()
        );
    }
    // Unauthenticated requests are refused before their body is looked at.
    let resp = http
        .post(format!("{}/v1/blocks", agent.url()))
        .body(vec![1u8; 100])
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    // A malformed batch is refused with the reason.
    let resp = http
        .post(format!("{}/v1/blocks", agent.url()))
        .bearer_auth(support::TOKEN)
        .body(b"not zstd".to_vec())
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    assert!(resp.text().await.expect("body").contains("zstd"));

    let repo = agent.stop().await;
    assert_eq!(repo.block_stats(), (0, 0), "nothing was stored");
    assert!(repo.images().expect("list").is_empty());
    let entries: Vec<_> = std::fs::read_dir(work.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        entries.len(),
        2,
        "nothing escaped the repository: {entries:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_cache_skips_hashing_an_unchanged_file_and_never_serves_a_changed_one() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    let mut rng = Lcg(23);
    let a = rng.image_like(2 << 20);
    let pa = write_image(work.path(), "a.img", &a);
    let cache_dir = work.path().join("index-cache");
    let c = client(&agent.url()).with_index_cache(certo_transfer::IndexCache::new(&cache_dir));
    let entries = || std::fs::read_dir(&cache_dir).map_or(0, |d| d.count());

    // A file written moments ago is not cached: a second write within the same tick of the
    // file clock would go unnoticed.
    let fresh = c.push(&pa, PushOptions::new("a0")).await.expect("push A");
    assert!(!fresh.index_cached);
    assert_eq!(entries(), 0, "a file that has not settled is not cached");
    std::thread::sleep(certo_transfer::index_cache::SETTLE);

    // Once settled, the first push hashes the file and fills the cache; the second takes
    // its index from it.
    let first = c.push(&pa, PushOptions::new("a")).await.expect("push A");
    assert!(!first.index_cached);
    assert_eq!(entries(), 1, "one entry for one file");
    let second = c
        .push(&pa, PushOptions::new("a2"))
        .await
        .expect("push A again");
    assert!(
        second.index_cached,
        "the unchanged file is not hashed again"
    );
    assert_eq!(second.digest, first.digest);
    assert_eq!(assembled(&agent.repo, "a2"), a);
    let plan = c.plan(&pa, Chunking::default()).await.expect("plan");
    assert!(plan.index_cached);
    assert_eq!(plan.blocks_to_send, 0);

    // Changing one block in place (same length) must not reuse the old index: the host
    // gets the new bytes.
    let mut b = a.clone();
    b[4096 * 7..4096 * 7 + 6].copy_from_slice(b"edited");
    std::fs::write(&pa, &b).expect("rewrite");
    std::thread::sleep(certo_transfer::index_cache::SETTLE);
    let third = c
        .push(&pa, PushOptions::new("b"))
        .await
        .expect("push edited");
    assert!(!third.index_cached);
    assert_eq!(third.blocks_sent, 1);
    assert_ne!(third.digest, first.digest);
    assert_eq!(assembled(&agent.repo, "b"), b);

    // A damaged entry is ignored (and removed), and the push is still right.
    for e in std::fs::read_dir(&cache_dir).expect("cache dir") {
        let path = e.expect("entry").path();
        let mut bytes = std::fs::read(&path).expect("read entry");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).expect("damage entry");
    }
    let fourth = c
        .push(&pa, PushOptions::new("b2"))
        .await
        .expect("push after damage");
    assert!(!fourth.index_cached, "a damaged entry is not used");
    assert_eq!(fourth.digest, third.digest);
    assert_eq!(assembled(&agent.repo, "b2"), b);
    agent.stop().await;
}
