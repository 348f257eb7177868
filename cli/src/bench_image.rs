//! `certo bench image`: the imager's figures, each beside its naive peer, measured in
//! one run on this machine: a fully cached target, overlay staging versus a full copy of
//! the parent, a patch layer on cached layers versus a build with no cache, and the share
//! of identical 4 KiB blocks between two rebuilds of the same inputs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use certo_imager::{Imager, LayerKind, mounts};
use serde_json::json;

use super::median;
use super::{Global, print_json};

/// Arguments of `certo bench image`.
#[derive(Debug, clap::Args)]
pub struct ImageBenchArgs {
    /// Release of the target.
    #[arg(long, default_value = "3.2")]
    pub release: String,
    /// Platform of the target.
    #[arg(long, default_value = "deb12_x86_64")]
    pub platform: String,
    /// Node type of the target.
    #[arg(long, default_value = "glite-WN")]
    pub node_type: String,
    /// The patch record for the patch layer.
    #[arg(long, value_name = "FILE")]
    pub patch: Option<PathBuf>,
    /// Cold builds (each into an empty cache); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, a: ImageBenchArgs) -> anyhow::Result<ExitCode> {
    let catalogue = g.catalogue()?;
    let patch_file = a
        .patch
        .clone()
        .unwrap_or_else(|| crate::default_fixtures_dir().join("patches/valid/3503-wn-bugfix.yaml"));
    let loaded = certo_orchestrator::ingest::load_files(
        std::slice::from_ref(&patch_file),
        &catalogue,
        || {},
    );
    if let Some(e) = loaded.errors.first() {
        anyhow::bail!("{e}");
    }
    let record = loaded
        .records
        .into_iter()
        .next()
        .context("the patch file holds no record")?
        .record;
    let req = certo_orchestrator::images::request(
        &catalogue,
        &a.release,
        &a.platform,
        &a.node_type,
        Some(&record),
    )?;
    let world = super::image_cmd::world(g)?;
    let root = g.data_dir().join("bench-imager");
    if root.exists() {
        certo_imager::store::remove_tree(&root).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    std::fs::create_dir_all(&root)?;
    let runs = a.runs.max(2);
    let json_out = a.json;
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let say = |s: String| {
            if !json_out {
                eprintln!("{s}");
            }
        };
        let build = |imager: &Imager| -> anyhow::Result<certo_imager::Built> {
            imager
                .build(&req, &[], &|_| {})
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        // 1. Cold builds, each into an empty cache.
        let mut cold = Vec::new();
        let mut images = Vec::new();
        for r in 0..runs {
            let imager = Imager::open(&root.join(format!("cold{r}")), &world)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = Instant::now();
            let built = build(&imager)?;
            cold.push(t.elapsed().as_secs_f64());
            say(format!("cold build {}/{runs}: {:.2} s", r + 1, cold[r]));
            images.push((imager, built));
        }
        let (imager, built) = &images[0];
        // 2. Patch layer on the cached node-type layer: drop the patch layer and the image.
        let patch_digest = built
            .layers
            .iter()
            .find(|(l, _)| l.kind == LayerKind::Patch)
            .map(|(l, _)| l.digest)
            .context("the target has no patch layer")?;
        let mut warm = Vec::new();
        for r in 0..runs {
            imager
                .store()
                .remove("layers", &patch_digest.to_hex())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            imager
                .store()
                .remove("images", &built.image.digest)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = Instant::now();
            build(imager)?;
            warm.push(t.elapsed().as_secs_f64());
            say(format!("patch layer on cached layers {}/{runs}: {:.2} s", r + 1, warm[r]));
        }
        // 3. Fully cached target.
        let mut cached = Vec::new();
        for _ in 0..runs.max(10) {
            let t = Instant::now();
            let b = build(imager)?;
            cached.push(t.elapsed().as_secs_f64());
            anyhow::ensure!(b.image_cached, "a fully cached build exported again");
        }
        say(format!("fully cached: median {:.1} ms", median(cached.clone()) * 1e3));
        // 4. Staging the node-type stack: an overlay versus a full copy.
        let lowers: Vec<PathBuf> = built
            .layers
            .iter()
            .filter(|(l, _)| l.kind != LayerKind::Patch)
            .rev()
            .map(|(l, _)| imager.store().layer_tree(&l.digest))
            .collect();
        let parent_bytes: u64 = built
            .layers
            .iter()
            .filter(|(l, _)| l.kind != LayerKind::Patch)
            .map(|(l, _)| l.size_bytes)
            .sum();
        let mut overlay = Vec::new();
        let mut copy = Vec::new();
        for _ in 0..runs {
            let staging = imager.store().staging().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (upper, work, merged) = (
                staging.path().join("upper"),
                staging.path().join("work"),
                staging.path().join("merged"),
            );
            let t = Instant::now();
            for d in [&upper, &work, &merged] {
                std::fs::create_dir_all(d)?;
            }
            mounts::mount_overlay(&lowers, Some((&upper, &work)), &merged)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            std::fs::write(merged.join("etc/certo-staged"), b"x")?;
            overlay.push(t.elapsed().as_secs_f64());
            // The peer: a plain full copy of the same parent tree.
            let dest = staging.path().join("copy");
            let t = Instant::now();
            let ok = std::process::Command::new("cp")
                .arg("-a")
                .arg(&merged)
                .arg(&dest)
                .status()?
                .success();
            anyhow::ensure!(ok, "cp -a failed");
            copy.push(t.elapsed().as_secs_f64());
            drop(staging);
        }
        say(format!(
            "staging a {:.0} MB parent: overlay {:.1} ms, full copy {:.2} s",
            parent_bytes as f64 / 1e6,
            median(overlay.clone()) * 1e3,
            median(copy.clone())
        ));
        // 5. Block identity between two cold rebuilds.
        let a_path = images[0].1.image.ext4().context("no ext4")?.path.clone();
        let b_path = images[1].1.image.ext4().context("no ext4")?.path.clone();
        let (same, total) = identical_blocks(&a_path, &b_path)?;
        say(format!(
            "identical 4 KiB blocks between two rebuilds: {same}/{total} ({:.3}%)",
            100.0 * same as f64 / total.max(1) as f64
        ));
        Ok(json!({
            "target": format!("{} {} {} + patch {}", req.release, req.platform.label, req.node_type, record.id),
            "runs": runs,
            "full_build_no_cache_seconds": {"median": median(cold.clone()), "all": cold},
            "patch_layer_on_cached_seconds": {"median": median(warm.clone()), "all": warm},
            "speedup_patch_vs_full": median(cold.clone()) / median(warm.clone()),
            "fully_cached_ms": {"median": median(cached.clone()) * 1e3, "all": cached.iter().map(|s| s * 1e3).collect::<Vec<_>>()},
            "staging": {
                "parent_bytes": parent_bytes,
                "overlay_ms": median(overlay.clone()) * 1e3,
                "full_copy_seconds": median(copy.clone()),
                "speedup": median(copy) / median(overlay),
            },
            "rebuild_identical_blocks": {"same": same, "total": total, "share": same as f64 / total.max(1) as f64},
        }))
    })
    .await??;
    let _ = certo_imager::store::remove_tree(&g.data_dir().join("bench-imager"));
    if a.json {
        print_json(&report)?;
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Identical 4 KiB blocks at the same offsets, and the block count of the larger file.
pub fn identical_blocks(a: &Path, b: &Path) -> anyhow::Result<(u64, u64)> {
    let mut fa = std::io::BufReader::new(std::fs::File::open(a)?);
    let mut fb = std::io::BufReader::new(std::fs::File::open(b)?);
    let (mut same, mut total) = (0u64, 0u64);
    let mut ba = vec![0u8; 4096];
    let mut bb = vec![0u8; 4096];
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na == 0 && nb == 0 {
            break;
        }
        total += 1;
        if na == nb && ba[..na] == bb[..nb] {
            same += 1;
        }
    }
    Ok((same, total))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
