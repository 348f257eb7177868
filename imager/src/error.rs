//! Structured build failures: which layer, which package, which phase, the exit status
//! and the tail of the log — what a certifier needs to reject a patch at image-build time.

use std::fmt;

use serde::Serialize;

use crate::digest::LayerKind;

/// The step of a layer build that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading the request or the repositories (unknown package, unreadable metadata).
    Prepare,
    /// Fetching a package file (missing file, checksum mismatch, unreachable source).
    Fetch,
    /// Dependency resolution (a package or dependency that no repository provides).
    Resolve,
    /// Unpacking packages (file conflicts, broken archives).
    Unpack,
    /// A package's install script (`%pre`/`%post`, `preinst`/`postinst`).
    Script,
    /// The install transaction as a whole: the package manager refused it (two versions
    /// of one package, a downgrade) for a reason no narrower phase names, or the image
    /// does not hold what the layer asked for (a package file skipped because another
    /// file of the same name-version-release is installed, a downgrade the record does
    /// not allow).
    Install,
    /// Applying or validating a configuration change.
    Configure,
    /// The testbed's protection: the layer's package scripts changed site configuration
    /// (`site-info.def`, `/etc/glite*`) beyond the record's configuration changes.
    Testbed,
    /// Setting up or tearing down the staging area.
    Stage,
    /// Writing the image artefacts.
    Export,
}

impl Phase {
    /// Lower-case name used in messages and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Fetch => "fetch",
            Self::Resolve => "resolve",
            Self::Unpack => "unpack",
            Self::Script => "install script",
            Self::Install => "install",
            Self::Configure => "configure",
            Self::Testbed => "testbed",
            Self::Stage => "stage",
            Self::Export => "export",
        }
    }
}

/// A layer or image build that failed. Nothing of it was cached.
#[derive(Debug, Clone, Serialize)]
pub struct BuildError {
    /// Layer level, when the failure belongs to one layer.
    pub layer: Option<LayerKind>,
    /// The step that failed.
    pub phase: Phase,
    /// The package at fault, when one is known.
    pub package: Option<String>,
    /// Exit status of the failing command or script, when there is one.
    pub exit_status: Option<i32>,
    /// One sentence: what failed and why.
    pub message: String,
    /// The last lines of the build log.
    pub log_tail: Vec<String>,
}

impl BuildError {
    /// A failure with no command behind it.
    pub fn new(phase: Phase, message: impl Into<String>) -> Self {
        Self {
            layer: None,
            phase,
            package: None,
            exit_status: None,
            message: message.into(),
            log_tail: Vec::new(),
        }
    }

    /// Names the package at fault.
    pub fn package(mut self, package: impl Into<String>) -> Self {
        self.package = Some(package.into());
        self
    }

    /// Attaches the layer level, unless one is already set.
    pub fn in_layer(mut self, kind: LayerKind) -> Self {
        self.layer.get_or_insert(kind);
        self
    }

    /// An I/O failure while staging.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        Self::new(Phase::Stage, format!("{what}: {err}"))
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(layer) = self.layer {
            write!(f, "{} layer: ", layer_name(layer))?;
        }
        write!(f, "{} failed", self.phase.as_str())?;
        if let Some(package) = &self.package {
            write!(f, " for package {package}")?;
        }
        if let Some(status) = self.exit_status {
            write!(f, " (exit status {status})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for BuildError {}

/// Human name of a layer level.
pub fn layer_name(kind: LayerKind) -> &'static str {
    match kind {
        LayerKind::Core => "core",
        LayerKind::Base => "base",
        LayerKind::NodeType => "node-type",
        LayerKind::Patch => "patch",
        LayerKind::Custom => "custom",
    }
}
