//! What the orchestrator asks the imager for: an image of one target, described with the
//! imager's own types so the crate knows nothing of patch records or catalogues.

use serde::{Deserialize, Serialize};

use crate::error::{BuildError, Phase};

/// One image: a release's node type on a platform, with or without a patch on top.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRequest {
    /// Release name, e.g. `3.2`.
    pub release: String,
    /// The platform to build for.
    pub platform: Platform,
    /// The node type's package name in the catalogue, e.g. `glite-WN`.
    pub node_type: String,
    /// The patch layer, if any.
    pub patch: Option<PatchLayer>,
}

/// A platform and how its core is built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Platform {
    /// Catalogue label, e.g. `sl5_x86_64`.
    pub label: String,
    /// Operating system, e.g. `sl5` or `deb12`.
    pub os: String,
    /// Architecture as the catalogue names it (`i386`, `x86_64`).
    pub arch: String,
    /// How the core layer is built.
    pub recipe: Recipe,
}

/// The backend and its parameters for a platform.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Recipe {
    /// Debian family: `mmdebstrap` for the core, `apt-get` in the chroot above it.
    Mmdebstrap {
        /// Debian suite, e.g. `bookworm`.
        suite: String,
        /// Debian architecture, e.g. `amd64`.
        arch: String,
        /// Archive URL, e.g. `http://deb.debian.org/debian`.
        mirror: String,
    },
    /// RPM family: `dnf --installroot` from RPM repositories.
    Dnf {
        /// The OS repository, relative to the repository root (e.g. `rpm/os/sl5/x86_64`).
        repository: String,
        /// RPM base architecture, e.g. `x86_64` or `i386`.
        arch: String,
        /// `$releasever` for dnf, e.g. `5`.
        releasever: String,
    },
}

impl Recipe {
    /// `deb` or `rpm`.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Mmdebstrap { .. } => "deb",
            Self::Dnf { .. } => "rpm",
        }
    }
}

/// The patch under certification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchLayer {
    /// Patch number.
    pub id: u64,
    /// Patch revision.
    pub revision: u32,
    /// Packages of the patch that apply to this platform.
    pub packages: Vec<PatchPackage>,
    /// Configuration changes, in record order.
    pub config_changes: Vec<ConfigChange>,
    /// The record allows the patch to replace an installed package by an older version
    /// (`allow_downgrade: true`, text form `Downgrade: allowed`); otherwise a downgrade
    /// fails the build.
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// One package file of a patch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchPackage {
    /// Package file name, e.g. `glite-yaim-core-4.0.12-1.noarch.rpm`.
    pub file: String,
    /// Package name.
    pub name: String,
    /// Where the file comes from.
    pub source: PackageSource,
    /// Expected SHA-256 of the file, lower-case hex.
    pub sha256: Option<String>,
}

/// Where a patch package file comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum PackageSource {
    /// The release's update repository for the platform.
    Release,
    /// The release's production repository for the platform (what the node types are built
    /// from): a package already in production that a patch adds to a metapackage.
    Production,
    /// A repository path relative to the repository root.
    Repository(String),
    /// A URL.
    Url(String),
}

/// `KEY=VALUE` set in a configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigChange {
    /// `site-info.def` (YAIM's file) or an absolute path in the image.
    pub file: String,
    /// Variable name.
    pub key: String,
    /// New value.
    pub value: String,
}

/// Where YAIM's site configuration lives in the node-type images.
pub const YAIM_ETC: &str = "opt/glite/yaim/etc";

impl ConfigChange {
    /// The file's path relative to the image root.
    pub fn image_path(&self) -> Result<String, BuildError> {
        let rel = match self.file.strip_prefix('/') {
            Some(abs) => abs.to_owned(),
            None => format!("{YAIM_ETC}/{}", self.file),
        };
        safe_relative(&rel).map_err(|why| {
            BuildError::new(
                Phase::Configure,
                format!("configuration file {:?}: {why}", self.file),
            )
        })?;
        Ok(rel)
    }
}

/// Checks that `path` is a plain relative path with no `..`, `.` or empty components.
pub fn safe_relative(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.starts_with('/') {
        return Err("the path is absolute".into());
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    for component in path.split('/') {
        if matches!(component, "" | "." | "..") {
            return Err(format!(
                "the path has a {component:?} component; it must stay inside its directory"
            ));
        }
    }
    Ok(())
}

/// A package file name that is a single plain file name.
pub fn safe_file_name(name: &str) -> Result<(), String> {
    safe_relative(name)?;
    if name.contains('/') {
        return Err("a package file name cannot contain '/'".into());
    }
    Ok(())
}

/// The Debian package name of a catalogue package name (`glite-SE_dpm` → `glite-se-dpm`).
pub fn debian_name(package: &str) -> String {
    package.to_ascii_lowercase().replace('_', "-")
}

/// The layer an image ends with below its custom layer, if any: a node type (every
/// certification image), or just the core or the core and base layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Top {
    /// Core, base and the request's node type (and its patch, if any).
    #[default]
    NodeType,
    /// The core layer only.
    Core,
    /// The core and base layers.
    Base,
}

/// What a person adds to an image beyond the catalogue's layers: a custom layer on top,
/// with extra packages from the platform's repositories and/or root's password. The
/// default adds nothing (the image of the request as the orchestrator asks for it).
#[derive(Debug, Clone, Default)]
pub struct Customization {
    /// The layer the image ends with below the custom layer.
    pub top: Top,
    /// Extra package names from the platform's repositories (any order, repeats allowed:
    /// the plan sorts and deduplicates them).
    pub packages: Vec<String>,
    /// Root's password, if the image is to set one.
    pub root_password: Option<RootPassword>,
}

impl Customization {
    /// Whether the image needs a custom layer.
    pub fn has_layer(&self) -> bool {
        !self.packages.is_empty() || self.root_password.is_some()
    }
}

/// A root password in clear, as read from its file. It is never printed (its `Debug` is
/// redacted), serialized, logged or put in a layer's inputs: only its salted SHA-512
/// crypt hash reaches the image and, digested again, the layer's cache key.
#[derive(Clone)]
pub struct RootPassword(String);

impl std::fmt::Debug for RootPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootPassword(<redacted>)")
    }
}

impl RootPassword {
    /// The first line of `text` (without its line ending); refused when empty.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err("its first line is empty; it must hold the password".into());
        }
        Ok(Self(line.to_owned()))
    }

    /// The first line of the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
        Self::from_text(&text).map_err(|why| format!("{}: {why}", path.display()))
    }

    /// The password's bytes, for hashing.
    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}
