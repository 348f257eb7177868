//! The bridge between patch records / the catalogue and the imager: which image a target
//! needs (the fixture world itself is [`crate::world`]).

use certo_imager::{
    ConfigChange, ImageRequest, PackageSource, PatchLayer, PatchPackage, Platform, Recipe,
};

use crate::catalogue::{self, Catalogue};
use crate::patch::{self, PackageFormat, PatchRecord};

/// Why a target cannot be imaged.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown release {0:?}; the catalogue has {1}")]
    UnknownRelease(String, String),
    #[error("unknown platform {0:?}; the catalogue has {1}")]
    UnknownPlatform(String, String),
    #[error("release {release} is not built for platform {platform}")]
    ReleaseNotOnPlatform { release: String, platform: String },
    #[error("unknown node type {node_type:?} in release {release}; it has {known}")]
    UnknownNodeType {
        node_type: String,
        release: String,
        known: String,
    },
    #[error("node type {node_type} of release {release} is not built for {platform}")]
    NodeTypeNotOnPlatform {
        node_type: String,
        release: String,
        platform: String,
    },
    #[error("patch {id} r{revision} is for release {patch_release}, not {release}")]
    PatchRelease {
        id: u64,
        revision: u32,
        patch_release: String,
        release: String,
    },
    #[error("patch {id} r{revision} does not target platform {platform} (it targets {targets})")]
    PatchPlatform {
        id: u64,
        revision: u32,
        platform: String,
        targets: String,
    },
    #[error("patch {id} r{revision} does not target node type {node_type} (it targets {targets})")]
    PatchNodeType {
        id: u64,
        revision: u32,
        node_type: String,
        targets: String,
    },
}

/// The image request of a release's platform without a node type (for an image of its
/// core or base layers): its `node_type` is empty and it has no patch.
pub fn layers_request(
    catalogue: &Catalogue,
    release: &str,
    platform: &str,
) -> Result<ImageRequest, TargetError> {
    let (rel, plat, recipe) = release_platform(catalogue, release, platform)?;
    Ok(ImageRequest {
        release: rel.name.clone(),
        platform: Platform {
            label: plat.label.clone(),
            os: plat.os.clone(),
            arch: plat.arch.clone(),
            recipe,
        },
        node_type: String::new(),
        patch: None,
    })
}

/// The catalogue's release and platform (the release must be built for the platform),
/// and the imager's recipe of the platform.
fn release_platform<'c>(
    catalogue: &'c Catalogue,
    release: &str,
    platform: &str,
) -> Result<(&'c catalogue::Release, &'c catalogue::Platform, Recipe), TargetError> {
    let rel = catalogue.release(release).ok_or_else(|| {
        TargetError::UnknownRelease(
            release.to_owned(),
            catalogue
                .releases
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        )
    })?;
    let plat = catalogue.platform(platform).ok_or_else(|| {
        TargetError::UnknownPlatform(
            platform.to_owned(),
            catalogue
                .platforms
                .iter()
                .map(|p| p.label.clone())
                .collect::<Vec<_>>()
                .join(", "),
        )
    })?;
    if !rel.platforms.iter().any(|p| p == platform) {
        return Err(TargetError::ReleaseNotOnPlatform {
            release: rel.name.clone(),
            platform: platform.to_owned(),
        });
    }
    let recipe = match &plat.recipe {
        catalogue::Recipe::Mmdebstrap {
            suite,
            arch,
            mirror,
        } => Recipe::Mmdebstrap {
            suite: suite.clone(),
            arch: arch.clone(),
            mirror: mirror.clone(),
        },
        catalogue::Recipe::Dnf {
            repository,
            arch,
            releasever,
        } => Recipe::Dnf {
            repository: repository.clone(),
            arch: arch.clone(),
            releasever: releasever
                .clone()
                .unwrap_or_else(|| plat.os.chars().filter(char::is_ascii_digit).collect()),
        },
    };
    Ok((rel, plat, recipe))
}

/// The image request for one target of the catalogue, with an optional patch on top.
pub fn request(
    catalogue: &Catalogue,
    release: &str,
    platform: &str,
    node_type: &str,
    patch: Option<&PatchRecord>,
) -> Result<ImageRequest, TargetError> {
    let (rel, plat, recipe) = release_platform(catalogue, release, platform)?;
    let nt = rel
        .node_types
        .iter()
        .find(|n| n.name == node_type)
        .ok_or_else(|| TargetError::UnknownNodeType {
            node_type: node_type.to_owned(),
            release: rel.name.clone(),
            known: rel
                .node_types
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    if !nt
        .platforms
        .as_ref()
        .is_none_or(|ps| ps.iter().any(|p| p == platform))
    {
        return Err(TargetError::NodeTypeNotOnPlatform {
            node_type: node_type.to_owned(),
            release: rel.name.clone(),
            platform: platform.to_owned(),
        });
    }
    let patch = match patch {
        None => None,
        Some(p) => {
            if catalogue.release(&p.release).map(|r| &r.name) != Some(&rel.name) {
                return Err(TargetError::PatchRelease {
                    id: p.id,
                    revision: p.revision,
                    patch_release: p.release.clone(),
                    release: rel.name.clone(),
                });
            }
            if !p.platforms.iter().any(|x| x == platform) {
                return Err(TargetError::PatchPlatform {
                    id: p.id,
                    revision: p.revision,
                    platform: platform.to_owned(),
                    targets: p.platforms.join(", "),
                });
            }
            if !p.node_types.iter().any(|x| x == node_type) {
                return Err(TargetError::PatchNodeType {
                    id: p.id,
                    revision: p.revision,
                    node_type: node_type.to_owned(),
                    targets: p.node_types.join(", "),
                });
            }
            Some(patch_layer(p, plat, &nt.name))
        }
    };
    Ok(ImageRequest {
        release: rel.name.clone(),
        platform: Platform {
            label: plat.label.clone(),
            os: plat.os.clone(),
            arch: plat.arch.clone(),
            recipe,
        },
        node_type: nt.package.clone(),
        patch,
    })
}

/// The part of a patch that applies to one platform and node type: its packages of the
/// platform's family and architectures, the metapackage changes of that node type (packages
/// from the release's production repository), and all its configuration changes.
fn patch_layer(p: &PatchRecord, plat: &catalogue::Platform, node_type: &str) -> PatchLayer {
    let fits = |format: PackageFormat, arch: &str| {
        format == plat.family && plat.package_archs.iter().any(|a| a == arch)
    };
    let mut packages: Vec<PatchPackage> = p
        .packages
        .iter()
        .filter(|pkg| fits(pkg.format, &pkg.arch))
        .map(|pkg| PatchPackage {
            file: pkg.file.clone(),
            name: pkg.name.clone(),
            source: match &pkg.source {
                patch::PackageSource::Release => PackageSource::Release,
                patch::PackageSource::Repository(r) => PackageSource::Repository(r.clone()),
                patch::PackageSource::Url(u) => PackageSource::Url(u.clone()),
            },
            sha256: pkg.sha256.clone(),
        })
        .collect();
    packages.extend(
        p.metapackage_changes
            .iter()
            .filter(|m| m.node_type == node_type)
            .filter(|m| {
                let format = if m.file.ends_with(".deb") {
                    PackageFormat::Deb
                } else {
                    PackageFormat::Rpm
                };
                fits(format, &m.arch)
            })
            .map(|m| PatchPackage {
                file: m.file.clone(),
                name: m.name.clone(),
                source: PackageSource::Production,
                sha256: None,
            }),
    );
    PatchLayer {
        id: p.id,
        revision: p.revision,
        packages,
        config_changes: p
            .config_changes
            .iter()
            .map(|c| ConfigChange {
                file: c.file.clone(),
                key: c.key.clone(),
                value: c.value.clone(),
            })
            .collect(),
        allow_downgrade: p.allow_downgrade,
    }
}

/// Every (platform, node type) a patch needs an image for, in record order: the
/// combinations of its platforms and node types that the catalogue offers.
pub fn patch_targets(catalogue: &Catalogue, p: &PatchRecord) -> Vec<(String, String)> {
    let release = catalogue.release(&p.release);
    let mut out = Vec::new();
    for platform in &p.platforms {
        for node_type in &p.node_types {
            let offered = release.is_some_and(|r| {
                r.node_type(node_type)
                    .is_some_and(|nt| nt.available_on(r, platform))
            });
            if offered {
                out.push((platform.clone(), node_type.clone()));
            }
        }
    }
    out
}

/// Whether the family of a platform is RPM.
pub fn is_rpm(plat: &catalogue::Platform) -> bool {
    plat.family == PackageFormat::Rpm
}
