//! `certo image build|plan|ls|gc`: the imager from the command line.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use certo_imager::{
    BuildError, Built, Customization, Event, Format, ImageRequest, Imager, LayerOutcome, Phase,
    RootPassword, Top,
};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::{EXIT_FAILURE, EXIT_INVALID, Global, print_json};
use certo_orchestrator::app::{self, Context, OpError};

#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build (or find in the cache) the image of one target; prints its digest and path.
    Build(BuildArgs),
    /// Show the layers a target needs and whether each is cached, without building.
    Plan(TargetArgs),
    /// List the images (and with --layers the layers) Certo has built.
    Ls(LsArgs),
    /// Remove images and layers no longer needed, under a keep policy.
    Gc(GcArgs),
}

#[derive(Debug, Args, Clone)]
pub struct TargetArgs {
    /// Release, e.g. 3.2 or "gLite 3.2".
    #[arg(long)]
    pub release: String,
    /// Platform label, e.g. sl5_x86_64 or deb12_x86_64.
    #[arg(long)]
    pub platform: String,
    /// Node type, e.g. glite-WN (required unless --layers says the image has none).
    #[arg(long, required_unless_present = "layers")]
    pub node_type: Option<String>,
    /// An image without a node type: of the core layer only, or of the core and base layers.
    #[arg(long, value_enum, value_name = "core|base", conflicts_with_all = ["node_type", "patch"])]
    pub layers: Option<LayersArg>,
    /// An extra package from the platform's repositories (repeatable), installed in a
    /// custom layer on top of the image's top layer.
    #[arg(long = "package", value_name = "NAME", conflicts_with = "patch")]
    pub packages: Vec<String>,
    /// Root's password: the first line of FILE, stored hashed (SHA-512 crypt) in the
    /// image's /etc/shadow, in the custom layer.
    #[arg(long, value_name = "FILE", conflicts_with = "patch")]
    pub root_password_file: Option<PathBuf>,
    /// A patch on top: a record file, or a stored patch as ID or ID@REVISION.
    #[arg(long, value_name = "FILE|ID[@REV]")]
    pub patch: Option<String>,
    /// Which record of a patch file holding several.
    #[arg(long, value_name = "ID")]
    pub patch_id: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The layers of an image without a node type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayersArg {
    /// The core layer only.
    Core,
    /// The core and base layers.
    Base,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Extra artefacts besides the ext4 image: qcow2, tar.gz (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "FORMATS")]
    pub export: Vec<String>,
    /// Copy the image to FILE, in the format its name says: .ext4 or .img (raw ext4),
    /// .qcow2, .tar.gz (or .tgz); an existing FILE is never overwritten.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The format an `--output` file's name asks for.
fn output_format(path: &std::path::Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Format::TarGz)
    } else if name.ends_with(".qcow2") {
        Some(Format::Qcow2)
    } else if name.ends_with(".ext4") || name.ends_with(".img") {
        Some(Format::Ext4)
    } else {
        None
    }
}

/// Copies `from` to `to`, which must not exist (a copy, not a link: the cache's
/// artefacts stay as they are whatever is done with the copy).
fn copy_new(from: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    let mut src = std::fs::File::open(from)
        .map_err(|e| format!("cannot read the artefact {}: {e}", from.display()))?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => format!(
                "--output {}: the file exists; Certo does not overwrite it (remove it or choose another name)",
                to.display()
            ),
            _ => format!("--output {}: cannot create it: {e}", to.display()),
        })?;
    let copied = std::io::copy(&mut src, &mut dst).and_then(|_| dst.sync_all());
    if let Err(e) = copied {
        drop(dst);
        let _ = std::fs::remove_file(to);
        return Err(format!("--output {}: copying failed: {e}", to.display()));
    }
    Ok(())
}

/// The customization the command line asks for; `Err` is a refusal.
fn customization(t: &TargetArgs) -> Result<Customization, String> {
    let top = match t.layers {
        None => Top::NodeType,
        Some(LayersArg::Core) => Top::Core,
        Some(LayersArg::Base) => Top::Base,
    };
    let root_password = match &t.root_password_file {
        None => None,
        Some(path) => Some(
            RootPassword::from_file(path).map_err(|why| format!("--root-password-file {why}"))?,
        ),
    };
    Ok(Customization {
        top,
        packages: t.packages.clone(),
        root_password,
    })
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// List layers instead of images.
    #[arg(long)]
    pub layers: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep every image and layer used within this many days.
    #[arg(long, default_value_t = 7.0)]
    pub keep_days: f64,
    /// Keep at least this many of the most recently used images.
    #[arg(long, default_value_t = 10)]
    pub keep_images: usize,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, args: ImageArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ImageCommand::Build(a) => build(g, a).await,
        ImageCommand::Plan(a) => plan(g, a).await,
        ImageCommand::Ls(a) => ls(g, a).await,
        ImageCommand::Gc(a) => gc(g, a).await,
    }
}

/// The imager over the data directory's cache and the package repositories.
pub fn imager(g: &Global) -> anyhow::Result<Imager> {
    Ok(g.context()?.imager()?)
}

/// The package repository root: --repos, or the fixture world built under the data dir.
pub fn world(g: &Global) -> anyhow::Result<PathBuf> {
    Ok(g.context()?.world()?)
}

/// The image request of the target named on the command line; `Err` is a refusal.
async fn request(ctx: &Context, t: &TargetArgs) -> anyhow::Result<Result<ImageRequest, String>> {
    let patch = match &t.patch {
        None => None,
        Some(spec) => match app::patches::resolve(ctx, spec, t.patch_id).await {
            Ok(p) => Some(p),
            Err(OpError::Refused(e) | OpError::NotFound(e) | OpError::Forbidden(e)) => {
                return Ok(Err(e));
            }
            Err(OpError::App(e)) => return Err(e.into()),
        },
    };
    let asked = match &t.node_type {
        Some(node_type) if t.layers.is_none() => {
            app::images::request(ctx, &t.release, &t.platform, node_type, patch.as_ref())
        }
        _ => app::images::layers_request(ctx, &t.release, &t.platform),
    };
    match asked {
        Ok(r) => Ok(Ok(r)),
        Err(OpError::Refused(e) | OpError::NotFound(e) | OpError::Forbidden(e)) => Ok(Err(e)),
        Err(OpError::App(e)) => Err(e.into()),
    }
}

async fn plan(g: &Global, t: TargetArgs) -> anyhow::Result<ExitCode> {
    let custom = match customization(&t) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let ctx = g.context()?;
    let req = match request(&ctx, &t).await? {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let imager = ctx.imager()?;
    let planned = {
        let imager = imager.clone();
        let req = req.clone();
        tokio::task::spawn_blocking(move || imager.plan_custom(&req, &custom)).await?
    };
    let plans = match planned {
        Ok(p) => p,
        Err(e) => return Ok(report_failure(g, &req, &e, t.json).await),
    };
    let mut rows = Vec::new();
    for p in &plans {
        let cached = imager.store().layer(&p.digest).ok().flatten().is_some();
        let mut row = json!({
            "kind": p.kind, "label": p.label, "digest": p.digest, "cached": cached,
            "backend": p.backend,
            "repositories": p.inputs.repository_state.iter().map(|(id, d)| json!([id, hex::encode(d)])).collect::<Vec<_>>(),
            "packages": p.inputs.packages,
        });
        if p.root_password.is_some() {
            // That the layer sets one; never the password nor its hash.
            row["root_password"] = json!(true);
        }
        rows.push(row);
    }
    let digests: Vec<_> = plans.iter().map(|p| p.digest).collect();
    let image = certo_imager::image_id(&digests);
    let image_cached = imager.store().image(&image).ok().flatten().is_some();
    if t.json {
        print_json(&json!({"image": image, "image_cached": image_cached, "layers": rows}))?;
    } else {
        for p in &plans {
            let cached = imager.store().layer(&p.digest).ok().flatten().is_some();
            println!(
                "{:<24} {}  {}",
                p.label,
                p.digest,
                if cached { "cached" } else { "to build" }
            );
        }
        println!(
            "image {image}  {}",
            if image_cached { "cached" } else { "to export" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds one image through the application layer, with a spinner on a terminal and
/// each layer's outcome printed; shared with `certo demo`.
pub async fn build_one(
    ctx: &Context,
    req: &ImageRequest,
    formats: &[Format],
    show_progress: bool,
) -> anyhow::Result<Result<Built, BuildError>> {
    build_one_custom(ctx, req, &Customization::default(), formats, show_progress).await
}

/// [`build_one`] with a person's customization (top layer, extra packages, root password).
pub async fn build_one_custom(
    ctx: &Context,
    req: &ImageRequest,
    custom: &Customization,
    formats: &[Format],
    show_progress: bool,
) -> anyhow::Result<Result<Built, BuildError>> {
    let bar = if show_progress {
        spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let top = match custom.top {
        Top::NodeType => req.node_type.clone(),
        Top::Core => "core".to_owned(),
        Top::Base => "base".to_owned(),
    };
    let mut extras = String::new();
    if !custom.packages.is_empty() {
        extras.push_str(&format!(" + {} packages", custom.packages.len()));
    }
    if custom.root_password.is_some() {
        extras.push_str(" + root password");
    }
    let target = format!(
        "{} {} {top}{}{extras}",
        req.release,
        req.platform.label,
        req.patch
            .as_ref()
            .map(|p| format!(" + patch {} r{}", p.id, p.revision))
            .unwrap_or_default()
    );
    bar.set_message(format!("{target}: planning"));
    let progress = {
        let bar = bar.clone();
        move |event| match event {
            Event::Planned { .. } => {}
            Event::LayerStarted { label, .. } => {
                bar.set_message(format!("{target}: building {label}"));
                tracing::info!(target = %target, layer = %label, "building layer");
            }
            Event::LayerReady {
                kind,
                digest,
                outcome,
                seconds,
            } => {
                let how = match outcome {
                    LayerOutcome::Cached => "cached",
                    LayerOutcome::Built => "built",
                    LayerOutcome::BuiltByOther => "built by another build",
                };
                tracing::info!(target = %target, layer = ?kind, %digest, outcome = how, seconds, "layer ready");
                bar.println(format!(
                    "  {:<10} {}  {how} ({seconds:.1} s)",
                    certo_imager::error::layer_name(kind),
                    &digest.to_hex()[..16]
                ));
            }
            Event::Exporting { format } => {
                bar.set_message(format!("{target}: exporting {}", format.as_str()));
            }
        }
    };
    let result = app::images::build_custom(ctx, req, custom, formats, progress).await;
    bar.finish_and_clear();
    Ok(result?)
}

fn spinner() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn build(g: &Global, a: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut formats = Vec::new();
    for f in &a.export {
        match Format::parse(f) {
            Some(f) => formats.push(f),
            None => {
                eprintln!("error: --export {f:?}: formats are ext4, qcow2 and tar.gz");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let output = match &a.output {
        None => None,
        Some(path) => {
            let Some(format) = output_format(path) else {
                eprintln!(
                    "error: --output {}: the format comes from the name's extension: .ext4 or .img (raw ext4), .qcow2, .tar.gz or .tgz",
                    path.display()
                );
                return Ok(ExitCode::from(2));
            };
            if std::fs::symlink_metadata(path).is_ok() {
                eprintln!(
                    "error: --output {}: the file exists; Certo does not overwrite it (remove it or choose another name)",
                    path.display()
                );
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                eprintln!(
                    "error: --output {}: {} is not a directory",
                    path.display(),
                    dir.display()
                );
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            if !formats.contains(&format) {
                formats.push(format);
            }
            Some((path.clone(), format))
        }
    };
    let custom = match customization(&a.target) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let ctx = g.context()?;
    let req = match request(&ctx, &a.target).await? {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    match build_one_custom(&ctx, &req, &custom, &formats, !a.target.json).await? {
        Ok(built) => {
            if let Some((to, format)) = &output {
                let from = built
                    .image
                    .artefacts
                    .iter()
                    .find(|x| x.format == format.as_str())
                    .map(|x| x.path.clone());
                let copied = match from {
                    Some(from) => copy_new(&from, to),
                    None => Err(format!(
                        "the image has no {} artefact to copy to {}",
                        format.as_str(),
                        to.display()
                    )),
                };
                if let Err(e) = copied {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(EXIT_FAILURE));
                }
                tracing::info!(output = %to.display(), format = format.as_str(), "image copied");
            }
            let path = built
                .image
                .ext4()
                .map(|x| x.path.display().to_string())
                .unwrap_or_default();
            if a.target.json {
                let mut v = json!({
                    "digest": built.image.digest,
                    "path": path,
                    "cached": built.image_cached && built.layers.iter().all(|(_, o)| *o != LayerOutcome::Built),
                    "seconds": built.seconds,
                    "release": built.image.release,
                    "platform": built.image.platform,
                    "node_type": built.image.node_type,
                    "patch": built.image.patch.map(|(id, rev)| json!({"id": id, "revision": rev})),
                    "artefacts": built.image.artefacts,
                    "layers": built.layers.iter().map(|(l, o)| json!({
                        "kind": l.kind, "digest": l.digest,
                        "outcome": match o { LayerOutcome::Cached => "cached", LayerOutcome::Built => "built", LayerOutcome::BuiltByOther => "built_by_other" },
                        "build_seconds": l.build_seconds, "size_bytes": l.size_bytes,
                    })).collect::<Vec<_>>(),
                });
                if let Some((to, _)) = &output {
                    v["output"] = json!(to.display().to_string());
                }
                print_json(&v)?;
            } else {
                println!("image {}", built.image.digest);
                for art in &built.image.artefacts {
                    println!("  {:<7} {}", art.format, art.path.display());
                }
                if let Some((to, format)) = &output {
                    println!("  copied  {} ({})", to.display(), format.as_str());
                }
                println!("ready in {:.2} s", built.seconds);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(report_failure(g, &req, &e, a.target.json).await),
    }
}

async fn report_failure(_g: &Global, _req: &ImageRequest, e: &BuildError, json: bool) -> ExitCode {
    if json {
        let _ = print_json(&json!({ "error": e, "message": e.to_string() }));
    } else {
        eprintln!("error: {e}");
        if !e.log_tail.is_empty() {
            eprintln!("  log tail:");
            for line in &e.log_tail {
                eprintln!("    {line}");
            }
        }
    }
    match e.phase {
        Phase::Stage | Phase::Export => ExitCode::from(EXIT_FAILURE),
        _ => ExitCode::from(EXIT_INVALID),
    }
}

async fn ls(g: &Global, a: LsArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    if a.layers {
        let layers = store.list_layers().await?;
        if a.json {
            print_json(&layers)?;
        } else {
            println!(
                "{:<10} {:<16} {:>10} {:>8}  backend",
                "kind", "digest", "size", "build"
            );
            for l in &layers {
                println!(
                    "{:<10} {:<16} {:>10} {:>7.1}s  {}",
                    l.kind,
                    &l.digest[..16],
                    human(l.size_bytes),
                    l.build_seconds,
                    l.backend
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let imgs = store.list_images().await?;
    if a.json {
        print_json(&imgs)?;
    } else {
        println!(
            "{:<16} {:<7} {:<13} {:<13} {:<10} {:>10}  last used",
            "digest", "release", "platform", "node type", "patch", "size"
        );
        for i in &imgs {
            println!(
                "{:<16} {:<7} {:<13} {:<13} {:<10} {:>10}  {}",
                &i.digest[..16],
                i.release,
                i.platform,
                if i.node_type.is_empty() {
                    "-"
                } else {
                    &i.node_type
                },
                i.patch_id
                    .map(|p| format!("{p} r{}", i.patch_revision.unwrap_or(0)))
                    .unwrap_or_else(|| "-".into()),
                human(i.size_bytes),
                i.last_used_at.format("%Y-%m-%d %H:%M")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: i64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

async fn gc(g: &Global, a: GcArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    let root = g.data_dir().join("imager");
    let cache = certo_imager::Store::open(&root).map_err(|e| anyhow::anyhow!("{e}"))?;
    let last_used: HashMap<String, chrono::DateTime<chrono::Utc>> =
        store.last_used().await?.into_iter().collect();
    let keep_days = a.keep_days;
    let keep_images = a.keep_images;
    let dry_run = a.dry_run;
    let (removed_images, removed_layers, freed) = tokio::task::spawn_blocking(move || {
        let _lock = cache.gc_lock(true).map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = chrono::Utc::now();
        let window = chrono::Duration::seconds((keep_days * 86400.0) as i64);
        let used = |digest: &str, built_at: i64| {
            last_used
                .get(digest)
                .copied()
                .unwrap_or_else(|| chrono::DateTime::from_timestamp(built_at, 0).unwrap_or(now))
        };
        let mut images = cache.images().map_err(|e| anyhow::anyhow!("{e}"))?;
        images.sort_by_key(|i| std::cmp::Reverse(used(&i.digest, i.built_at)));
        let mut keep_layers: BTreeSet<String> = BTreeSet::new();
        let mut remove_images = Vec::new();
        for (i, img) in images.iter().enumerate() {
            let recent = now - used(&img.digest, img.built_at) <= window;
            if i < keep_images || recent {
                keep_layers.extend(img.layers.iter().map(|l| l.to_hex()));
            } else {
                remove_images.push(img.clone());
            }
        }
        let layers = cache.layers().map_err(|e| anyhow::anyhow!("{e}"))?;
        let by_digest: HashMap<String, &certo_imager::LayerRecord> =
            layers.iter().map(|l| (l.digest.to_hex(), l)).collect();
        // Recently used layers stay, and so does every layer below a layer that stays.
        for l in &layers {
            if now - used(&l.digest.to_hex(), l.built_at) <= window {
                keep_layers.insert(l.digest.to_hex());
            }
        }
        let mut stack: Vec<String> = keep_layers.iter().cloned().collect();
        while let Some(d) = stack.pop() {
            if let Some(parent) = by_digest.get(&d).and_then(|l| l.parent)
                && keep_layers.insert(parent.to_hex())
            {
                stack.push(parent.to_hex());
            }
        }
        let remove_layers: Vec<certo_imager::LayerRecord> = layers
            .iter()
            .filter(|l| !keep_layers.contains(&l.digest.to_hex()))
            .cloned()
            .collect();
        let mut freed: u64 = remove_images
            .iter()
            .flat_map(|i| i.artefacts.iter().map(|a| a.size_bytes))
            .sum();
        freed += remove_layers.iter().map(|l| l.size_bytes).sum::<u64>();
        if !dry_run {
            for img in &remove_images {
                cache
                    .remove("images", &img.digest)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            // Children before parents.
            let mut ordered = remove_layers.clone();
            ordered.sort_by_key(|l| std::cmp::Reverse(l.kind as u8));
            for l in &ordered {
                cache
                    .remove("layers", &l.digest.to_hex())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        Ok::<_, anyhow::Error>((remove_images, remove_layers, freed))
    })
    .await??;
    if !dry_run {
        let ids: Vec<String> = removed_images.iter().map(|i| i.digest.clone()).collect();
        store.forget_images(&ids, &removed_layers).await?;
    }
    if a.json {
        print_json(&json!({
            "dry_run": dry_run,
            "removed_images": removed_images.iter().map(|i| &i.digest).collect::<Vec<_>>(),
            "removed_layers": removed_layers.iter().map(|l| l.digest).collect::<Vec<_>>(),
            "bytes_freed": freed,
        }))?;
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        println!(
            "{verb} {} images and {} layers, {}",
            removed_images.len(),
            removed_layers.len(),
            human(freed as i64)
        );
    }
    Ok(ExitCode::SUCCESS)
}
