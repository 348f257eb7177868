//! From an [`ImageRequest`] to the stack of layers it needs, each with its inputs and
//! digest — computed from repository metadata and files only, without running any
//! package manager, so a fully cached image is found in milliseconds.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::digest::{LayerDigest, LayerInputs, LayerKind};
use crate::error::{BuildError, Phase};
use crate::password::{self, CryptHash};
use crate::repos::{self, Repo, RepoLocation};
use crate::request::{
    Customization, ImageRequest, PackageSource, Recipe, Top, debian_name, safe_file_name,
};

/// What the Debian base layer installs on top of minbase: what every appliance needs.
pub const DEB_BASE_PACKAGES: &[&str] = &["busybox", "iproute2", "procps"];
/// What the RPM-family core layer installs.
pub const RPM_CORE_PACKAGES: &[&str] = &[
    "filesystem",
    "setup",
    "busybox",
    "sl-release",
    "initscripts",
];
/// What the RPM-family base layer installs.
pub const RPM_BASE_PACKAGES: &[&str] = &["certo-base"];

/// One thing a layer installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    /// A package from the layer's repositories, pinned when its version is known.
    Named {
        /// Package name.
        name: String,
        /// Exact version (`version-release` for RPM), or empty when the repository state pins it.
        version: String,
    },
    /// A package file of a patch.
    File {
        /// Package name.
        name: String,
        /// The file on disk.
        path: PathBuf,
        /// Its SHA-256, hex.
        sha256: String,
    },
}

/// One layer of the stack, ready to look up or build.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    /// Level.
    pub kind: LayerKind,
    /// Backend description (tool and fixed parameters).
    pub backend: String,
    /// Repositories it installs from.
    pub repos: Vec<Repo>,
    /// What it installs.
    pub install: Vec<Install>,
    /// Configuration changes: path relative to the root, key, value.
    pub config: Vec<(String, String, String)>,
    /// Inputs (with the parent's digest).
    pub inputs: LayerInputs,
    /// The cache key.
    pub digest: LayerDigest,
    /// Human label, e.g. `node-type glite-WN`.
    pub label: String,
    /// Whether the layer may downgrade an installed package (a patch record's opt-in).
    pub allow_downgrade: bool,
    /// Root's password hash, when the layer (a custom one) sets it.
    pub root_password: Option<CryptHash>,
}

/// Plans the layers of `request`, bottom to top. `world` is the repository root.
pub fn plan(request: &ImageRequest, world: &Path) -> Result<Vec<LayerPlan>, BuildError> {
    plan_custom(request, &Customization::default(), world)
}

/// Plans the layers of `request` with `custom`: the layers up to `custom.top`, then (when
/// it adds packages or a root password) a custom layer on top.
pub fn plan_custom(
    request: &ImageRequest,
    custom: &Customization,
    world: &Path,
) -> Result<Vec<LayerPlan>, BuildError> {
    if request.patch.is_some() && custom.top != Top::NodeType {
        return Err(BuildError::new(
            Phase::Prepare,
            "a patch layer goes on a node type: an image of the core or base layers has no patch",
        ));
    }
    if request.patch.is_some() && custom.has_layer() {
        return Err(BuildError::new(
            Phase::Prepare,
            "extra packages and a root password make a custom image; they cannot be combined with a patch (a certification image)",
        ));
    }
    let mut names: Vec<String> = custom.packages.clone();
    names.sort();
    names.dedup();
    for name in &names {
        if name.is_empty()
            || name.starts_with('-')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_'))
        {
            return Err(
                BuildError::new(Phase::Resolve, format!("{name:?} is not a package name"))
                    .package(name.clone())
                    .in_layer(LayerKind::Custom),
            );
        }
    }
    let custom_label = {
        let mut parts: Vec<String> = Vec::new();
        if !names.is_empty() {
            parts.push(names.join(" "));
        }
        if custom.root_password.is_some() {
            parts.push("root password".to_owned());
        }
        format!("custom {}", parts.join(" + "))
    };
    let rel = &request.release;
    let mut layers: Vec<LayerPlan> = Vec::new();
    // Each repository's state is read once per plan, however many layers use it.
    let mut states: Vec<(Repo, [u8; 32])> = Vec::new();
    let mut push = |kind: LayerKind,
                    backend: String,
                    repos: Vec<Repo>,
                    install: Vec<Install>,
                    config: Vec<(String, String, String)>,
                    label: String|
     -> Result<(), BuildError> {
        let parent = layers.last().map(|l| *l.digest.as_bytes());
        let mut repository_state = Vec::new();
        for repo in &repos {
            let state = match states.iter().find(|(r, _)| r.location == repo.location) {
                Some((_, s)) => *s,
                None => {
                    let s = repo.state().map_err(|e| e.in_layer(kind))?;
                    states.push((repo.clone(), s));
                    s
                }
            };
            repository_state.push((repo.id.clone(), state));
        }
        let packages = install
            .iter()
            .map(|i| match i {
                Install::Named { name, version } => (name.clone(), version.clone()),
                Install::File { name, path, sha256 } => (
                    name.clone(),
                    format!(
                        "file:{} sha256:{sha256}",
                        path.file_name().unwrap_or_default().to_string_lossy()
                    ),
                ),
            })
            .collect();
        let mut config_files: Vec<(String, Vec<u8>)> = Vec::new();
        for (path, key, value) in &config {
            let line = format!("{key}={value}\n");
            match config_files.iter_mut().find(|(p, _)| p == path) {
                Some((_, content)) => content.extend_from_slice(line.as_bytes()),
                None => config_files.push((path.clone(), line.into_bytes())),
            }
        }
        // Only a patch layer may downgrade, and only when its record says so.
        let allow_downgrade =
            kind == LayerKind::Patch && request.patch.as_ref().is_some_and(|p| p.allow_downgrade);
        let inputs = LayerInputs {
            parent,
            kind,
            backend: backend.clone(),
            repository_state,
            packages,
            config_files,
            allow_downgrade,
            root_password: None,
        };
        let digest = inputs.digest().map_err(|e| {
            BuildError::new(Phase::Prepare, format!("layer inputs: {e}")).in_layer(kind)
        })?;
        layers.push(LayerPlan {
            kind,
            backend,
            repos,
            install,
            config,
            inputs,
            digest,
            label,
            allow_downgrade,
            root_password: None,
        });
        Ok(())
    };

    match &request.platform.recipe {
        Recipe::Mmdebstrap {
            suite,
            arch,
            mirror,
        } => {
            let mirror_repo = Repo {
                id: format!("debian/{suite}"),
                location: RepoLocation::DebMirror {
                    url: mirror.clone(),
                    suite: suite.clone(),
                },
            };
            let glite_dir = world.join("deb/glite").join(rel);
            let glite = Repo {
                id: format!("glite/{rel}"),
                location: RepoLocation::DebFlat(glite_dir.clone()),
            };
            let updates_dir = world.join("deb/updates").join(rel);
            push(
                LayerKind::Core,
                format!("mmdebstrap/minbase/{suite}/{arch}"),
                vec![mirror_repo.clone()],
                Vec::new(),
                Vec::new(),
                format!("core {}", request.platform.label),
            )?;
            if custom.top != Top::Core {
                push(
                    LayerKind::Base,
                    format!("apt-get/{arch}"),
                    vec![mirror_repo.clone()],
                    DEB_BASE_PACKAGES
                        .iter()
                        .map(|p| Install::Named {
                            name: (*p).to_owned(),
                            version: String::new(),
                        })
                        .collect(),
                    Vec::new(),
                    "base".to_owned(),
                )?;
            }
            if custom.top == Top::NodeType {
                let node_pkg = debian_name(&request.node_type);
                let version = repos::deb_flat_version(&glite_dir, &node_pkg)?.ok_or_else(|| {
                    BuildError::new(
                        Phase::Resolve,
                        format!(
                            "node type {} has no package {node_pkg} in {}",
                            request.node_type,
                            glite_dir.display()
                        ),
                    )
                    .package(node_pkg.clone())
                    .in_layer(LayerKind::NodeType)
                })?;
                push(
                    LayerKind::NodeType,
                    format!("apt-get/{arch}"),
                    vec![mirror_repo.clone(), glite.clone()],
                    vec![Install::Named {
                        name: node_pkg,
                        version,
                    }],
                    Vec::new(),
                    format!("node-type {}", request.node_type),
                )?;
                if let Some(patch) = &request.patch {
                    let mut repos = vec![mirror_repo.clone(), glite.clone()];
                    if updates_dir.is_dir() {
                        repos.push(Repo {
                            id: format!("updates/{rel}"),
                            location: RepoLocation::DebFlat(updates_dir.clone()),
                        });
                    }
                    let install = patch_files(patch, world, "deb", &updates_dir, &glite_dir)?;
                    let config = patch_config(patch)?;
                    push(
                        LayerKind::Patch,
                        format!("apt-get/{arch}"),
                        repos,
                        install,
                        config,
                        format!("patch {} r{}", patch.id, patch.revision),
                    )?;
                }
            }
            if custom.has_layer() {
                // Names of the release's repository are pinned to its version; the others
                // come from the Debian archive, pinned by its state (as the base layer's).
                let install = names
                    .iter()
                    .map(|name| {
                        let version = repos::deb_flat_version(&glite_dir, name)
                            .map_err(|e| e.in_layer(LayerKind::Custom))?
                            .unwrap_or_default();
                        Ok(Install::Named {
                            name: name.clone(),
                            version,
                        })
                    })
                    .collect::<Result<Vec<_>, BuildError>>()?;
                push(
                    LayerKind::Custom,
                    format!("apt-get/{arch}"),
                    vec![mirror_repo, glite],
                    install,
                    Vec::new(),
                    custom_label,
                )?;
            }
        }
        Recipe::Dnf {
            repository,
            arch,
            releasever,
        } => {
            crate::request::safe_relative(repository).map_err(|why| {
                BuildError::new(
                    Phase::Prepare,
                    format!("platform repository {repository:?}: {why}"),
                )
            })?;
            let os_dir = world.join(repository);
            let os = Repo {
                id: format!("os/{}", request.platform.label),
                location: RepoLocation::Rpm(os_dir.clone()),
            };
            let plat = format!("{}/{}", request.platform.os, request.platform.arch);
            let glite_dir = world.join("rpm/glite").join(rel).join(&plat);
            let glite = Repo {
                id: format!("glite/{rel}"),
                location: RepoLocation::Rpm(glite_dir.clone()),
            };
            let updates_dir = world.join("rpm/updates").join(rel).join(&plat);
            let backend = format!("dnf/{arch}/{releasever}");
            let pinned = |dir: &Path, names: &[&str], kind| -> Result<Vec<Install>, BuildError> {
                names
                    .iter()
                    .map(|n| {
                        let version = repos::rpm_version(dir, n)
                            .map_err(|e| e.in_layer(kind))?
                            .ok_or_else(|| {
                                BuildError::new(
                                    Phase::Resolve,
                                    format!("no package {n} in {}", dir.display()),
                                )
                                .package(*n)
                                .in_layer(kind)
                            })?;
                        Ok(Install::Named {
                            name: (*n).to_owned(),
                            version,
                        })
                    })
                    .collect()
            };
            push(
                LayerKind::Core,
                backend.clone(),
                vec![os.clone()],
                pinned(&os_dir, RPM_CORE_PACKAGES, LayerKind::Core)?,
                Vec::new(),
                format!("core {}", request.platform.label),
            )?;
            if custom.top != Top::Core {
                push(
                    LayerKind::Base,
                    backend.clone(),
                    vec![os.clone()],
                    pinned(&os_dir, RPM_BASE_PACKAGES, LayerKind::Base)?,
                    Vec::new(),
                    "base".to_owned(),
                )?;
            }
            if custom.top == Top::NodeType {
                push(
                    LayerKind::NodeType,
                    backend.clone(),
                    vec![os.clone(), glite.clone()],
                    pinned(
                        &glite_dir,
                        &[request.node_type.as_str()],
                        LayerKind::NodeType,
                    )?,
                    Vec::new(),
                    format!("node-type {}", request.node_type),
                )?;
                if let Some(patch) = &request.patch {
                    let mut repos = vec![os.clone(), glite.clone()];
                    if updates_dir.is_dir() {
                        repos.push(Repo {
                            id: format!("updates/{rel}"),
                            location: RepoLocation::Rpm(updates_dir.clone()),
                        });
                    }
                    let install = patch_files(patch, world, "rpm", &updates_dir, &glite_dir)?;
                    let config = patch_config(patch)?;
                    push(
                        LayerKind::Patch,
                        backend.clone(),
                        repos,
                        install,
                        config,
                        format!("patch {} r{}", patch.id, patch.revision),
                    )?;
                }
            }
            if custom.has_layer() {
                // Each name is pinned to its version in the OS repository, or else in the
                // release's; a name in neither is refused here, before anything is built.
                let mut install = Vec::new();
                for name in &names {
                    let mut version = None;
                    for dir in [&os_dir, &glite_dir] {
                        version = repos::rpm_version(dir, name)
                            .map_err(|e| e.in_layer(LayerKind::Custom))?;
                        if version.is_some() {
                            break;
                        }
                    }
                    let version = version.ok_or_else(|| {
                        BuildError::new(
                            Phase::Resolve,
                            format!(
                                "unknown package {name}: it is in none of the platform's repositories ({} {}, {} {})",
                                os.id,
                                os_dir.display(),
                                glite.id,
                                glite_dir.display()
                            ),
                        )
                        .package(name.clone())
                        .in_layer(LayerKind::Custom)
                    })?;
                    install.push(Install::Named {
                        name: name.clone(),
                        version,
                    });
                }
                push(
                    LayerKind::Custom,
                    backend,
                    vec![os, glite],
                    install,
                    Vec::new(),
                    custom_label,
                )?;
            }
        }
    }
    if let Some(secret) = &custom.root_password
        && let [.., lower, top] = layers.as_mut_slice()
        && top.kind == LayerKind::Custom
    {
        let hash = password::hash(secret, &lower.digest)?;
        top.inputs.root_password = Some(hash.digest());
        top.digest = top.inputs.digest().map_err(|e| {
            BuildError::new(Phase::Prepare, format!("layer inputs: {e}"))
                .in_layer(LayerKind::Custom)
        })?;
        top.root_password = Some(hash);
    }
    Ok(layers)
}

fn patch_config(
    patch: &crate::request::PatchLayer,
) -> Result<Vec<(String, String, String)>, BuildError> {
    patch
        .config_changes
        .iter()
        .map(|c| {
            if c.key.is_empty() || c.key.contains(['=', '\n']) || c.value.contains('\n') {
                return Err(BuildError::new(
                    Phase::Configure,
                    format!(
                        "configuration change {}: {:?}={:?} is not a KEY=VALUE line",
                        c.file, c.key, c.value
                    ),
                )
                .in_layer(LayerKind::Patch));
            }
            Ok((
                c.image_path().map_err(|e| e.in_layer(LayerKind::Patch))?,
                c.key.clone(),
                c.value.clone(),
            ))
        })
        .collect()
}

fn patch_files(
    patch: &crate::request::PatchLayer,
    world: &Path,
    family: &str,
    updates_dir: &Path,
    production_dir: &Path,
) -> Result<Vec<Install>, BuildError> {
    let mut out = Vec::new();
    for package in &patch.packages {
        let fail = |phase, msg: String| {
            BuildError::new(phase, msg)
                .package(package.file.clone())
                .in_layer(LayerKind::Patch)
        };
        safe_file_name(&package.file)
            .map_err(|why| fail(Phase::Fetch, format!("file name {:?}: {why}", package.file)))?;
        let dir = match &package.source {
            PackageSource::Release => updates_dir.to_owned(),
            PackageSource::Production => {
                // A metapackage change: the package must already be in production.
                if !production_dir.join(&package.file).is_file() {
                    return Err(fail(
                        Phase::Resolve,
                        format!(
                            "metapackage change {}: the package is not in the release's production repository {}",
                            package.file,
                            production_dir.display()
                        ),
                    ));
                }
                production_dir.to_owned()
            }
            PackageSource::Repository(path) => {
                crate::request::safe_relative(path).map_err(|why| {
                    fail(Phase::Fetch, format!("repository path {path:?}: {why}"))
                })?;
                world.join(family).join(path)
            }
            PackageSource::Url(url) => {
                return Err(fail(
                    Phase::Fetch,
                    format!(
                        "the record names {url} as its source; Certo does not download patch packages by URL: publish the file in the release's update repository or a repo: path"
                    ),
                ));
            }
        };
        let path = dir.join(&package.file);
        let bytes = std::fs::read(&path).map_err(|e| {
            fail(
                Phase::Fetch,
                format!("package file {} cannot be read: {e}", path.display()),
            )
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if let Some(expected) = &package.sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(fail(
                Phase::Fetch,
                format!(
                    "checksum mismatch for {}: the record says sha256 {expected}, the file has {sha256}",
                    path.display()
                ),
            ));
        }
        out.push(Install::File {
            name: package.name.clone(),
            path,
            sha256,
        });
    }
    Ok(out)
}
