//! The repository after a crash: torn and corrupt pack tails are cut when it opens, images
//! that lost blocks are no longer complete, and a second opener is refused.

use std::fs::OpenOptions;
use std::io::Write;

use certo_transfer::block_index::sha256;
use certo_transfer::{BlockIndex, RepoError, Repository};

fn blocks(seed: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            (0..4096)
                .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
                .collect()
        })
        .collect()
}

fn store(repo: &Repository, data: &[Vec<u8>]) {
    let hashes: Vec<[u8; 32]> = data.iter().map(|b| sha256(b)).collect();
    repo.store_blocks(hashes.iter().zip(data.iter().map(Vec::as_slice)))
        .expect("store");
}

#[test]
fn a_torn_append_is_cut_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = blocks(3, 10);
    let image: Vec<u8> = data.concat();
    {
        let (repo, _) = Repository::open(dir.path()).expect("open");
        store(&repo, &data);
        let index = BlockIndex::from_reader(&image[..], 4096).expect("index");
        repo.commit("img", &index.to_bytes()).expect("commit");
    }
    // A crash in the middle of an append: a record header and half its bytes.
    let pack = dir.path().join("blocks/pack-000000.dat");
    let mut f = OpenOptions::new()
        .append(true)
        .open(&pack)
        .expect("open pack");
    let extra = vec![9u8; 4096];
    f.write_all(&sha256(&extra)).expect("write");
    f.write_all(&4096u32.to_be_bytes()).expect("write");
    f.write_all(&extra[..1000]).expect("write");
    drop(f);
    let (repo, report) = Repository::open(dir.path()).expect("reopen");
    assert_eq!(report.truncated_bytes, 36 + 1000);
    assert_eq!((report.blocks, report.images), (10, 1));
    assert!(!repo.has_block(&sha256(&extra)));
    let verified = repo.verify().expect("verify");
    assert_eq!((verified.records, verified.bad_records), (10, 0));
    repo.assemble("img").expect("assemble");
    assert_eq!(
        std::fs::read(repo.image_path("img").expect("name")).expect("read"),
        image
    );
}

#[test]
fn a_corrupt_block_is_cut_and_the_image_that_needed_it_is_set_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = blocks(5, 8);
    let image: Vec<u8> = data.concat();
    {
        let (repo, _) = Repository::open(dir.path()).expect("open");
        store(&repo, &data);
        let index = BlockIndex::from_reader(&image[..], 4096).expect("index");
        repo.commit("img", &index.to_bytes()).expect("commit");
    }
    // One bit of the 6th block's bytes rots on disk.
    let pack = dir.path().join("blocks/pack-000000.dat");
    let mut bytes = std::fs::read(&pack).expect("read pack");
    let sixth = 8 + 5 * (36 + 4096) + 36 + 100;
    bytes[sixth] ^= 1;
    std::fs::write(&pack, &bytes).expect("write pack");

    let (repo, report) = Repository::open(dir.path()).expect("reopen");
    assert_eq!(report.blocks, 5, "blocks before the bad one are kept");
    assert_eq!(report.demoted_images, vec!["img".to_string()]);
    assert!(matches!(
        repo.manifest("img"),
        Err(RepoError::NotFound { .. })
    ));
    assert!(dir.path().join("images/img.json.incomplete").exists());
    let verified = repo.verify().expect("verify");
    assert_eq!((verified.bad_records, verified.images), (0, 0));
}

#[test]
fn a_second_opener_is_refused_and_bad_names_never_touch_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (repo, _) = Repository::open(dir.path()).expect("open");
    let err = Repository::open(dir.path()).expect_err("locked");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    for name in ["../x", "a/b", ".x"] {
        assert!(matches!(repo.commit(name, &[]), Err(RepoError::Name(_))));
        assert!(matches!(repo.assemble(name), Err(RepoError::Name(_))));
    }
    // A block whose bytes do not match its hash is refused, with nothing stored.
    let good = vec![1u8; 4096];
    let bad = vec![2u8; 4096];
    let hashes = [sha256(&good), sha256(&good)];
    let err = repo
        .store_blocks(hashes.iter().zip([good.as_slice(), bad.as_slice()]))
        .expect_err("mismatch refused");
    assert!(matches!(err, RepoError::HashMismatch { .. }), "{err}");
    assert_eq!(repo.block_stats(), (0, 0));
}

#[test]
fn concurrent_commits_and_assemblies_of_one_image_never_lose_it() {
    // Several senders pushing the same image at once (parallel VM runs of one target) commit
    // the same content under one name: none may see the image vanish.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = blocks(5, 64);
    let image: Vec<u8> = data.concat();
    let (repo, _) = Repository::open(dir.path()).expect("open");
    store(&repo, &data);
    let index = BlockIndex::from_reader(&image[..], 4096)
        .expect("index")
        .to_bytes();
    let repo = std::sync::Arc::new(repo);
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (repo, index) = (repo.clone(), index.clone());
            std::thread::spawn(move || {
                for _ in 0..20 {
                    repo.commit("same", &index).expect("commit");
                    repo.assemble("same")
                        .expect("assemble right after a commit");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    assert_eq!(
        std::fs::read(repo.image_path("same").expect("name")).expect("read"),
        image
    );
}

#[test]
fn an_assembled_image_not_yet_on_disk_when_the_machine_went_down_is_assembled_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = blocks(5, 12);
    let image: Vec<u8> = data.concat();
    let img = dir.path().join("images/img.img");
    let marker = dir.path().join("images/img.img.unsynced.1-0");
    {
        let (repo, _) = Repository::open(dir.path()).expect("open");
        store(&repo, &data);
        let index = BlockIndex::from_reader(&image[..], 4096).expect("index");
        repo.commit("img", &index.to_bytes()).expect("commit");
        repo.assemble("img").expect("assemble");
        assert_eq!(std::fs::read(&img).expect("assembled"), image);
    }
    // The agent stopped before the background sync was done, the machine stayed up: the
    // marker names this boot, the file stays (and is written out).
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    std::fs::write(&marker, boot.trim()).expect("marker");
    {
        let (_repo, report) = Repository::open(dir.path()).expect("reopen");
        assert!(report.unsynced_images_removed.is_empty(), "{report:?}");
        assert_eq!(std::fs::read(&img).expect("kept"), image);
        assert!(
            !marker.exists(),
            "the marker is gone once the file is synced"
        );
    }
    // The machine went down (another boot id): the file may hold anything, so it goes, and
    // the image is assembled again from its blocks.
    std::fs::write(&img, vec![0u8; image.len()]).expect("torn image file");
    // A boot id of another boot (markers hold the UUID of /proc/sys/kernel/random/boot_id).
    std::fs::write(&marker, "00000000-0000-4000-8000-000000000000").expect("marker");
    let (repo, report) = Repository::open(dir.path()).expect("reopen");
    assert_eq!(report.unsynced_images_removed, vec!["img".to_string()]);
    assert!(!img.exists() && !marker.exists());
    assert_eq!(report.images, 1, "the image itself is still complete");
    repo.assemble("img").expect("assemble again");
    assert_eq!(std::fs::read(&img).expect("assembled"), image);
}

/// An image name cannot take the shape of the repository's own files: a name such as
/// `victim.img.unsynced.x` once made its manifest look like an assembly marker, so the next
/// start deleted another image's assembled file and refused to start. Such names are refused,
/// and a start-up that finds a file it cannot parse skips and reports it, deleting nothing.
#[test]
fn image_names_cannot_collide_with_the_repositorys_own_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = blocks(5, 4);
    let image: Vec<u8> = data.concat();
    let index = BlockIndex::from_reader(&image[..], 4096).expect("index");
    {
        let (repo, _) = Repository::open(dir.path()).expect("open");
        store(&repo, &data);
        repo.commit("victim", &index.to_bytes()).expect("commit");
        repo.assemble("victim").expect("assemble");
        for evil in [
            "victim.img.unsynced.x",
            "victim.img",
            "a.json",
            "a.idx",
            "a.json.incomplete",
        ] {
            let err = repo
                .commit(evil, &index.to_bytes())
                .expect_err("a name shaped like the repository's own files is refused");
            assert!(matches!(err, RepoError::Name(_)), "{evil}: {err}");
        }
    }
    // A repository that holds such files (written before names were checked) still opens:
    // what it cannot parse is skipped and reported, nothing is deleted.
    let images = dir.path().join("images");
    std::fs::write(
        images.join("victim.img.unsynced.x.json"),
        "{\"not\": \"a marker\"}",
    )
    .expect("plant");
    std::fs::create_dir(images.join("other.img.unsynced.dir")).expect("plant dir");
    let (repo, report) = Repository::open(dir.path()).expect("the repository opens");
    assert_eq!(report.images, 1);
    assert!(report.unsynced_images_removed.is_empty(), "{report:?}");
    assert_eq!(report.skipped_files.len(), 2, "{report:?}");
    assert_eq!(
        std::fs::read(repo.image_path("victim").expect("name")).expect("still there"),
        image
    );
    assert!(images.join("victim.img.unsynced.x.json").exists());
}
