//! Building an image: each layer of the plan is found in the cache or built on a
//! copy-on-write overlay of its parents and published atomically; then the stack is
//! exported as a reproducible ext4 image (and qcow2 / tar.gz on request).

use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::backend;
use crate::cmd::Log;
use crate::digest::{LayerDigest, LayerKind};
use crate::error::{BuildError, Phase};
use crate::export;
use crate::mounts;
use crate::password;
use crate::plan::{self, LayerPlan};
use crate::request::{Customization, ImageRequest, Recipe, Top};
use crate::siteconf;
use crate::store::{ImageRecord, LayerRecord, Store, write_record};
use crate::verify;

/// Image export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Raw ext4 root filesystem (always produced).
    Ext4,
    /// qcow2 conversion of the ext4 image.
    Qcow2,
    /// gzip-compressed tar of the root tree (the form Xen-style hosts took).
    TarGz,
}

impl Format {
    /// Name used on the command line and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Qcow2 => "qcow2",
            Self::TarGz => "tar.gz",
        }
    }

    /// Parses `ext4`, `qcow2` or `tar.gz`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ext4" | "raw" => Some(Self::Ext4),
            "qcow2" => Some(Self::Qcow2),
            "tar.gz" | "tgz" => Some(Self::TarGz),
            _ => None,
        }
    }
}

/// What happened to one layer during a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Found in the cache.
    Cached,
    /// Built now.
    Built,
    /// Another process built it while this one waited.
    BuiltByOther,
}

/// Progress of a build, for progress bars and logs.
#[derive(Debug, Clone)]
pub enum Event {
    /// Layer digests computed.
    Planned {
        /// Layers bottom to top.
        layers: Vec<(LayerKind, LayerDigest, String)>,
    },
    /// A layer build starts.
    LayerStarted {
        /// Level.
        kind: LayerKind,
        /// Its label.
        label: String,
    },
    /// A layer is ready.
    LayerReady {
        /// Level.
        kind: LayerKind,
        /// Its digest.
        digest: LayerDigest,
        /// How.
        outcome: LayerOutcome,
        /// Seconds spent on it in this build.
        seconds: f64,
    },
    /// Exporting an artefact.
    Exporting {
        /// The format.
        format: Format,
    },
}

/// The result of [`Imager::build`].
#[derive(Debug, Clone)]
pub struct Built {
    /// The image record.
    pub image: ImageRecord,
    /// The layers bottom to top, with what happened to each.
    pub layers: Vec<(LayerRecord, LayerOutcome)>,
    /// Whether the image itself came from the cache.
    pub image_cached: bool,
    /// Wall time of the whole request.
    pub seconds: f64,
}

/// The image builder over one cache directory and one repository root.
#[derive(Debug, Clone)]
pub struct Imager {
    store: Store,
    world: PathBuf,
}

pub use crate::export::SOURCE_DATE_EPOCH;

impl Imager {
    /// Opens the cache under `root`; `world` is where repository paths are resolved.
    pub fn open(root: &Path, world: &Path) -> Result<Self, BuildError> {
        Ok(Self {
            store: Store::open(root)?,
            world: world.to_owned(),
        })
    }

    /// The cache.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The repository root.
    pub fn world(&self) -> &Path {
        &self.world
    }

    /// The layers `request` needs, with their digests, without building anything.
    pub fn plan(&self, request: &ImageRequest) -> Result<Vec<LayerPlan>, BuildError> {
        plan::plan(request, &self.world)
    }

    /// The layers `request` with `custom` needs (see [`plan::plan_custom`]).
    pub fn plan_custom(
        &self,
        request: &ImageRequest,
        custom: &Customization,
    ) -> Result<Vec<LayerPlan>, BuildError> {
        plan::plan_custom(request, custom, &self.world)
    }

    /// Builds (or finds) the image for `request` with the given extra export formats.
    pub fn build(
        &self,
        request: &ImageRequest,
        formats: &[Format],
        progress: &dyn Fn(Event),
    ) -> Result<Built, BuildError> {
        self.build_custom(request, &Customization::default(), formats, progress)
    }

    /// Builds (or finds) the image for `request` with `custom`: its layers up to
    /// `custom.top` and its custom layer, if any.
    pub fn build_custom(
        &self,
        request: &ImageRequest,
        custom: &Customization,
        formats: &[Format],
        progress: &dyn Fn(Event),
    ) -> Result<Built, BuildError> {
        let started = Instant::now();
        let _gc = self.store.gc_lock(false)?;
        let plans = self.plan_custom(request, custom)?;
        progress(Event::Planned {
            layers: plans
                .iter()
                .map(|p| (p.kind, p.digest, p.label.clone()))
                .collect(),
        });
        let mut layers: Vec<(LayerRecord, LayerOutcome)> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let t = Instant::now();
            let (record, outcome) = self
                .ensure_layer(request, plan, &plans[..i], progress)
                .map_err(|e| e.in_layer(plan.kind))?;
            progress(Event::LayerReady {
                kind: plan.kind,
                digest: plan.digest,
                outcome,
                seconds: t.elapsed().as_secs_f64(),
            });
            layers.push((record, outcome));
        }
        let digests: Vec<LayerDigest> = plans.iter().map(|p| p.digest).collect();
        let (image, image_cached) =
            self.ensure_image(request, custom.top, &digests, formats, progress)?;
        Ok(Built {
            image,
            layers,
            image_cached,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn ensure_layer(
        &self,
        request: &ImageRequest,
        plan: &LayerPlan,
        below: &[LayerPlan],
        progress: &dyn Fn(Event),
    ) -> Result<(LayerRecord, LayerOutcome), BuildError> {
        if let Some(record) = self.store.layer(&plan.digest)? {
            return Ok((record, LayerOutcome::Cached));
        }
        let _lock = self.store.lock(&plan.digest.to_hex())?;
        if let Some(record) = self.store.layer(&plan.digest)? {
            return Ok((record, LayerOutcome::BuiltByOther));
        }
        progress(Event::LayerStarted {
            kind: plan.kind,
            label: plan.label.clone(),
        });
        let t = Instant::now();
        let staging = self.store.staging()?;
        let out = staging.path().join("out");
        let tree = out.join("tree");
        std::fs::create_dir_all(&out).map_err(|e| BuildError::io("creating staging", e))?;
        let mut log = Log::create(&out.join("build.log"))?;
        log.note(&format!(
            "building {} layer {} ({})",
            crate::error::layer_name(plan.kind),
            plan.digest,
            plan.label
        ));
        let recipe = &request.platform.recipe;
        let family = recipe.family();
        let scratch = staging.path().join("scratch");
        std::fs::create_dir_all(&scratch).map_err(|e| BuildError::io("creating scratch", e))?;
        // Lower layers, top-most first, for the overlay.
        let lowers: Vec<PathBuf> = below
            .iter()
            .rev()
            .map(|p| self.store.layer_tree(&p.digest))
            .collect();
        let installed;
        if lowers.is_empty() {
            match recipe {
                Recipe::Mmdebstrap { .. } => backend::deb_core(recipe, &tree, &mut log)?,
                Recipe::Dnf { .. } => {
                    std::fs::create_dir_all(&tree)
                        .map_err(|e| BuildError::io("creating staging", e))?;
                    backend::with_chroot(&tree, &mut log, |log| {
                        backend::rpm_core(plan, recipe, &tree, &scratch, log)
                    })?
                }
            }
            backend::remove_volatile(&tree, &mut log)?;
            installed = backend::installed_packages(family, &tree, &scratch);
        } else {
            let work = staging.path().join("work");
            let merged = staging.path().join("merged");
            for d in [&tree, &work, &merged] {
                std::fs::create_dir_all(d).map_err(|e| BuildError::io("creating staging", e))?;
            }
            mounts::mount_overlay(&lowers, Some((&tree, &work)), &merged)?;
            let result = (|| {
                let before = verify::installed_versions(family, &merged, &scratch)?;
                // The patch's package scripts may change site configuration only as the
                // record's configuration changes do.
                let site_before = (plan.kind == LayerKind::Patch)
                    .then(|| siteconf::snapshot(&merged))
                    .transpose()?;
                let output = match recipe {
                    Recipe::Mmdebstrap { .. } => backend::deb_install(plan, &merged, &mut log)?,
                    Recipe::Dnf { .. } => backend::with_chroot(&merged, &mut log, |log| {
                        backend::dnf_install(plan, recipe, &merged, &scratch, log)
                    })?,
                };
                // The image must hold what the layer asked for: no downgrade the layer
                // does not allow, and each package file installed as that very file.
                let after = verify::installed_versions(family, &merged, &scratch)?;
                verify::check_downgrades(plan, family, &before, &after, &output)?;
                verify::check_patch_files(plan, family, &merged, &scratch, &output)?;
                if let Some(site_before) = &site_before {
                    siteconf::check(plan, family, &merged, &scratch, site_before, &mut log)?;
                }
                if let Some(hash) = &plan.root_password {
                    // Written by Certo itself, inside the image: no tool sees the password.
                    log.note("setting root's password (SHA-512 crypt) in /etc/shadow");
                    password::set_root_password(&backend::open_root(&merged)?, hash)?;
                }
                if !plan.config.is_empty() {
                    backend::apply_config(plan, &merged, &mut log)?;
                    backend::with_chroot(&merged, &mut log, |log| {
                        backend::yaim_check(&merged, log)
                    })?;
                }
                backend::remove_volatile(&merged, &mut log)?;
                Ok::<_, BuildError>(backend::installed_packages(family, &merged, &scratch))
            })();
            mounts::unmount_all_under(staging.path())?;
            installed = result?;
            let _ = std::fs::remove_dir_all(&work);
        }
        let record = LayerRecord {
            digest: plan.digest,
            parent: below.last().map(|p| p.digest),
            kind: plan.kind,
            backend: plan.backend.clone(),
            repositories: plan
                .inputs
                .repository_state
                .iter()
                .map(|(id, d)| (id.clone(), hex::encode(d)))
                .collect(),
            packages: plan.inputs.packages.clone(),
            config_files: plan
                .inputs
                .config_files
                .iter()
                .map(|(p, c)| (p.clone(), String::from_utf8_lossy(c).into_owned()))
                .chain(plan.root_password.as_ref().map(|_| {
                    (
                        "etc/shadow".to_owned(),
                        "root password set (SHA-512 crypt; neither it nor its hash is recorded)"
                            .to_owned(),
                    )
                }))
                .collect(),
            installed,
            size_bytes: export::tree_size(&tree),
            build_seconds: t.elapsed().as_secs_f64(),
            built_at: now(),
        };
        check_pins(plan, &record, &log)?;
        write_record(&out.join("layer.json"), &record)?;
        self.store.publish(&out, "layers", &plan.digest.to_hex())?;
        drop(staging);
        Ok((record, LayerOutcome::Built))
    }

    fn ensure_image(
        &self,
        request: &ImageRequest,
        top: Top,
        layers: &[LayerDigest],
        formats: &[Format],
        progress: &dyn Fn(Event),
    ) -> Result<(ImageRecord, bool), BuildError> {
        let id = image_id(layers);
        let wanted: Vec<Format> = std::iter::once(Format::Ext4)
            .chain(formats.iter().copied().filter(|f| *f != Format::Ext4))
            .collect();
        let has_all = |r: &ImageRecord| {
            wanted
                .iter()
                .all(|f| r.artefacts.iter().any(|a| a.format == f.as_str()))
        };
        if let Some(record) = self.store.image(&id)?
            && has_all(&record)
        {
            return Ok((record, true));
        }
        let _lock = self.store.lock(&format!("image-{id}"))?;
        let existing = self.store.image(&id)?;
        if let Some(record) = &existing
            && has_all(record)
        {
            return Ok((record.clone(), true));
        }
        let t = Instant::now();
        let staging = self.store.staging()?;
        let out = staging.path().join("out");
        std::fs::create_dir_all(&out).map_err(|e| BuildError::io("creating staging", e))?;
        let mut log = Log::create(&out.join("export.log"))?;
        let merged = staging.path().join("merged");
        std::fs::create_dir_all(&merged).map_err(|e| BuildError::io("creating staging", e))?;
        let lowers: Vec<PathBuf> = layers
            .iter()
            .rev()
            .map(|d| self.store.layer_tree(d))
            .collect();
        mounts::mount_overlay(&lowers, None, &merged)?;
        let mut artefacts = Vec::new();
        let result = (|| {
            for format in &wanted {
                progress(Event::Exporting { format: *format });
                let artefact = match format {
                    Format::Ext4 => export::ext4(&merged, &out, &id, &mut log)?,
                    Format::Qcow2 => export::qcow2(&out, &mut log)?,
                    Format::TarGz => export::tar_gz(&merged, &out, &mut log)?,
                };
                artefacts.push(artefact);
            }
            Ok::<_, BuildError>(())
        })();
        mounts::unmount_all_under(staging.path())?;
        result.map_err(|e| BuildError {
            phase: Phase::Export,
            ..e
        })?;
        let dir = self.store.image_dir(&id);
        let artefacts = artefacts
            .into_iter()
            .map(|mut a| {
                a.path = dir.join(a.path.file_name().unwrap_or_default());
                a
            })
            .collect();
        let record = ImageRecord {
            digest: id.clone(),
            layers: layers.to_vec(),
            release: request.release.clone(),
            platform: request.platform.label.clone(),
            // An image of the core or base layers has no node type.
            node_type: match top {
                Top::NodeType => request.node_type.clone(),
                Top::Core | Top::Base => String::new(),
            },
            patch: request.patch.as_ref().map(|p| (p.id, p.revision)),
            artefacts,
            export_seconds: t.elapsed().as_secs_f64(),
            built_at: now(),
        };
        write_record(&out.join("image.json"), &record)?;
        if existing.is_some() {
            self.store.remove("images", &id)?;
        }
        self.store.publish(&out, "images", &id)?;
        Ok((record, false))
    }
}

/// A patch's or node type's pinned versions must be what the package manager installed.
fn check_pins(plan: &LayerPlan, record: &LayerRecord, log: &Log) -> Result<(), BuildError> {
    for item in &plan.install {
        if let plan::Install::Named { name, version } = item
            && !version.is_empty()
        {
            let found = record.installed.iter().find(|(n, _, _)| n == name);
            match found {
                Some((_, v, _)) if v == version || v.ends_with(&format!(":{version}")) => {}
                other => {
                    return Err(log.failure(
                        Phase::Resolve,
                        Some(name.clone()),
                        None,
                        format!(
                            "{name} {version} was requested but {} is installed",
                            other.map_or("nothing".to_owned(), |(_, v, _)| v.clone())
                        ),
                        "",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The id of the image made of `layers` (bottom to top) in Certo's export format.
pub fn image_id(layers: &[LayerDigest]) -> String {
    let mut h = Sha256::new();
    h.update(b"certo-image/v1\0ext4-4096\0");
    for l in layers {
        h.update(l.as_bytes());
    }
    hex::encode(h.finalize())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
