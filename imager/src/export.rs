//! Image artefacts: a reproducible ext4 root filesystem (fixed UUID and hash seed derived
//! from the image id, fixed timestamps), and qcow2 / tar.gz exports of it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fixed timestamp of every file in an exported image (2010-01-01T00:00:00Z): images
/// built from the same inputs are identical block for block.
pub const SOURCE_DATE_EPOCH: i64 = 1_262_304_000;

use crate::cmd::Log;
use crate::error::{BuildError, Phase};
use crate::store::Artefact;

/// Bytes of the regular files in `tree` (allocated size, 4 KiB granularity).
pub fn tree_size(tree: &Path) -> u64 {
    let mut total = 0;
    walk(tree, &mut |_, meta| {
        if meta.is_file() {
            total += meta.len().div_ceil(4096) * 4096;
        }
    });
    total
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        f(&path, &meta);
        if meta.is_dir() {
            walk(&path, f);
        }
    }
}

/// Writes `rootfs.ext4` from the merged tree `root` into `out`.
pub fn ext4(root: &Path, out: &Path, id: &str, log: &mut Log) -> Result<Artefact, BuildError> {
    let mut inodes: u64 = 0;
    let mut blocks: u64 = 0;
    let mut fixes = String::new();
    let mut skipped = 0u64;
    walk(root, &mut |path, meta| {
        inodes += 1;
        blocks += meta.len().div_ceil(4096) + 1;
        let Ok(rel) = path.strip_prefix(root) else {
            return;
        };
        let rel = rel.to_string_lossy();
        if rel.contains(['"', '\n', '\\']) {
            skipped += 1;
            return;
        }
        fixes.push_str(&format!("sif \"/{rel}\" atime @{SOURCE_DATE_EPOCH}\n"));
        fixes.push_str(&format!("sif \"/{rel}\" ctime @{SOURCE_DATE_EPOCH}\n"));
        if meta.mtime() > SOURCE_DATE_EPOCH {
            fixes.push_str(&format!("sif \"/{rel}\" mtime @{SOURCE_DATE_EPOCH}\n"));
        }
    });
    for field in ["atime", "ctime", "mtime"] {
        fixes.push_str(&format!("sif / {field} @{SOURCE_DATE_EPOCH}\n"));
    }
    if skipped > 0 {
        log.note(&format!(
            "{skipped} paths with quotes or backslashes keep their own timestamps"
        ));
    }
    // Room for the files, the metadata, the journal and 25% to spare, in 4 MiB steps.
    let bytes = (blocks * 4096 + inodes * 256) * 5 / 4 + 96 * 1024 * 1024;
    let size = bytes.div_ceil(4 << 20) * (4 << 20);
    let inode_count = inodes + inodes / 4 + 4096;
    let uuid = uuid_from(id, 0);
    let seed = uuid_from(id, 16);
    let image = out.join("rootfs.ext4");
    log.run_ok(
        Phase::Export,
        Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", SOURCE_DATE_EPOCH.to_string())
            .args(["-q", "-F", "-b", "4096", "-L", "certo-root", "-m", "0"])
            .arg("-N")
            .arg(inode_count.to_string())
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!("hash_seed={seed},root_owner=0:0"))
            .arg("-d")
            .arg(root)
            .arg(&image)
            .arg(format!("{}k", size / 1024)),
    )?;
    let cmds = out.join("timestamps.debugfs");
    std::fs::write(&cmds, fixes).map_err(|e| BuildError::io("writing debugfs commands", e))?;
    let fixed = log.run(
        Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", SOURCE_DATE_EPOCH.to_string())
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(&image),
    )?;
    let _ = std::fs::remove_file(&cmds);
    if !fixed.success() {
        return Err(log.failure(
            Phase::Export,
            None,
            fixed.status,
            "debugfs could not fix the timestamps".into(),
            &fixed.output,
        ));
    }
    artefact("ext4", image)
}

/// Converts `out/rootfs.ext4` to `out/rootfs.qcow2`.
pub fn qcow2(out: &Path, log: &mut Log) -> Result<Artefact, BuildError> {
    let target = out.join("rootfs.qcow2");
    log.run_ok(
        Phase::Export,
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(out.join("rootfs.ext4"))
            .arg(&target),
    )?;
    artefact("qcow2", target)
}

/// Writes `out/rootfs.tar.gz` of the merged tree, sorted and with fixed times and owners.
pub fn tar_gz(root: &Path, out: &Path, log: &mut Log) -> Result<Artefact, BuildError> {
    let target = out.join("rootfs.tar.gz");
    log.run_ok(
        Phase::Export,
        Command::new("tar")
            .arg("-C")
            .arg(root)
            .args([
                "--sort=name",
                "--numeric-owner",
                "--xattrs",
                "--clamp-mtime",
                "--use-compress-program=gzip -n",
            ])
            .arg(format!("--mtime=@{SOURCE_DATE_EPOCH}"))
            .arg("-cf")
            .arg(&target)
            .arg("."),
    )?;
    artefact("tar.gz", target)
}

fn artefact(format: &str, path: PathBuf) -> Result<Artefact, BuildError> {
    let size = std::fs::metadata(&path)
        .map_err(|e| BuildError::io(format!("reading {}", path.display()), e))?
        .len();
    Ok(Artefact {
        format: format.to_owned(),
        path,
        size_bytes: size,
    })
}

/// A UUID string from 16 bytes of the (hex) image id starting at byte `offset`.
fn uuid_from(id: &str, offset: usize) -> String {
    let hex = id
        .get(offset * 2..offset * 2 + 32)
        .unwrap_or("00000000000000000000000000000000");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
