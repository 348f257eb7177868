//! The catalogue: which releases exist, which platforms each supports, which
//! node types each release ships on which platforms, and the recipe that
//! builds each platform's core image. It is data (`fixtures/catalogue.yaml`
//! by default), read with `deny_unknown_fields` and checked for consistency.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::PackageFormat;

/// The catalogue shipped with Certo, compiled in.
pub const DEFAULT_CATALOGUE: &str = include_str!("../../fixtures/catalogue.yaml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub releases: Vec<Release>,
    pub platforms: Vec<Platform>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The release's short name, e.g. `3.2`.
    pub name: String,
    /// How people write it, e.g. `gLite 3.2`.
    pub label: String,
    pub platforms: Vec<String>,
    pub node_types: Vec<NodeType>,
    /// Real node types of the release that this catalogue's recipes do not build (a
    /// trailing `*` matches any rest, e.g. `glite-SE_dcache_*`): a record naming one is
    /// refused for that reason, not as naming an unknown node type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub known_node_types: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeType {
    /// e.g. `glite-WN`.
    pub name: String,
    pub description: String,
    /// The meta-package that installs the node type.
    pub package: String,
    /// Platforms the node type is built for; all of the release's when absent.
    #[serde(default)]
    pub platforms: Option<Vec<String>>,
    /// Other names of the node type: the metapackage names the tracker uses (`lcg-CE`,
    /// `glite-CREAM`, `glite-BDII_site`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    /// `<os><major>_<arch>`, e.g. `sl5_x86_64`.
    pub label: String,
    pub os: String,
    pub arch: String,
    pub family: PackageFormat,
    /// Package architectures installable on this platform.
    pub package_archs: Vec<String>,
    pub recipe: Recipe,
    /// Other spellings of the label: the tracker's (`SL5/64bit`, `SL5 x86_64`) and the
    /// build system's (`sl5_x86_64_gcc412`). Compared ignoring case and spacing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// How the imager builds a platform's core layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Recipe {
    /// `mmdebstrap` from the Debian archive the machine is configured for.
    Mmdebstrap {
        suite: String,
        arch: String,
        /// The archive URL (default: `http://deb.debian.org/debian`).
        #[serde(default = "default_mirror")]
        mirror: String,
    },
    /// `dnf --installroot` from an RPM repository (a path relative to the
    /// package repository root).
    Dnf {
        repository: String,
        arch: String,
        /// dnf's `$releasever` (default: the digits of the platform's OS, `sl5` → `5`).
        #[serde(default)]
        releasever: Option<String>,
    },
}

fn default_mirror() -> String {
    "http://deb.debian.org/debian".to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("cannot read catalogue {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("catalogue {path}: {source}")]
    Parse {
        path: String,
        source: yaml_serde::Error,
    },
    #[error("catalogue {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Catalogue {
    /// The compiled-in catalogue.
    pub fn builtin() -> Catalogue {
        Catalogue::parse("fixtures/catalogue.yaml", DEFAULT_CATALOGUE)
            .expect("the built-in catalogue is valid (checked by a test)")
    }

    pub fn from_file(path: &Path) -> Result<Catalogue, CatalogueError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogueError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Catalogue::parse(&path.display().to_string(), &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Catalogue, CatalogueError> {
        let catalogue: Catalogue =
            yaml_serde::from_str(text).map_err(|source| CatalogueError::Parse {
                path: path.to_string(),
                source,
            })?;
        catalogue
            .check()
            .map_err(|message| CatalogueError::Invalid {
                path: path.to_string(),
                message,
            })?;
        Ok(catalogue)
    }

    fn check(&self) -> Result<(), String> {
        let mut labels = BTreeSet::new();
        for p in &self.platforms {
            if !labels.insert(p.label.as_str()) {
                return Err(format!("platform {} is defined twice", p.label));
            }
            if p.label != format!("{}_{}", p.os, p.arch) {
                return Err(format!(
                    "platform label {} is not `<os>_<arch>` ({}_{})",
                    p.label, p.os, p.arch
                ));
            }
        }
        let mut spellings = std::collections::BTreeMap::new();
        for p in &self.platforms {
            for a in std::iter::once(&p.label).chain(&p.aliases) {
                if let Some(other) = spellings.insert(spelling(a), &p.label)
                    && other != &p.label
                {
                    return Err(format!(
                        "platform spelling {a} names both {other} and {}",
                        p.label
                    ));
                }
            }
        }
        let mut releases = BTreeSet::new();
        for r in &self.releases {
            if !releases.insert(r.name.as_str()) {
                return Err(format!("release {} is defined twice", r.name));
            }
            for p in &r.platforms {
                if !labels.contains(p.as_str()) {
                    return Err(format!("release {} names unknown platform {p}", r.name));
                }
            }
            let mut names = BTreeSet::new();
            for n in &r.node_types {
                for name in std::iter::once(&n.name).chain(&n.aliases) {
                    if !names.insert(name.to_lowercase()) {
                        return Err(format!(
                            "release {}: node type name {name} is defined twice",
                            r.name
                        ));
                    }
                }
                for p in n.platforms.iter().flatten() {
                    if !r.platforms.contains(p) {
                        return Err(format!(
                            "release {}: node type {} names platform {p}, which the release does not support",
                            r.name, n.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn platform(&self, label: &str) -> Option<&Platform> {
        self.platforms.iter().find(|p| p.label == label)
    }

    /// Finds a platform by its label or any of its aliases, ignoring case and spacing.
    pub fn platform_spelled(&self, spelled: &str) -> Option<&Platform> {
        let s = spelling(spelled);
        self.platforms.iter().find(|p| {
            std::iter::once(&p.label)
                .chain(&p.aliases)
                .any(|a| spelling(a) == s)
        })
    }

    /// Finds a release by any usual spelling: `3.2`, `gLite 3.2`, `glite-3.2`.
    pub fn release(&self, spelling: &str) -> Option<&Release> {
        let s = spelling.trim().to_lowercase();
        let s = s.strip_prefix("glite").unwrap_or(&s);
        let s = s.trim_start_matches([' ', '-', '_']);
        self.releases.iter().find(|r| r.name == s)
    }
}

/// A platform spelling as compared: lower case, runs of spaces as one.
fn spelling(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

impl Release {
    /// Finds a node type by name or alias, ignoring case.
    pub fn node_type(&self, name: &str) -> Option<&NodeType> {
        self.node_types.iter().find(|n| {
            std::iter::once(&n.name)
                .chain(&n.aliases)
                .any(|a| a.eq_ignore_ascii_case(name))
        })
    }

    /// Whether `name` is a real node type of the release that the catalogue does not build.
    pub fn known_unbuilt(&self, name: &str) -> bool {
        let n = name.to_lowercase();
        self.known_node_types.iter().any(|k| {
            let k = k.to_lowercase();
            match k.strip_suffix('*') {
                Some(prefix) => n.starts_with(prefix) && n.len() > prefix.len(),
                None => k == n,
            }
        })
    }
}

impl NodeType {
    pub fn available_on(&self, release: &Release, platform: &str) -> bool {
        match &self.platforms {
            Some(list) => list.iter().any(|p| p == platform),
            None => release.platforms.iter().any(|p| p == platform),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_covers_the_matrix() {
        let c = Catalogue::builtin();
        for release in ["3.1", "3.2"] {
            let r = c.release(release).expect("release present");
            for n in [
                "glite-UI",
                "glite-WN",
                "glite-CE",
                "glite-BDII",
                "glite-WMS",
            ] {
                assert!(r.node_type(n).is_some(), "{release} lacks {n}");
            }
        }
        for label in [
            "sl4_i386",
            "sl4_x86_64",
            "sl5_i386",
            "sl5_x86_64",
            "deb12_i386",
            "deb12_x86_64",
        ] {
            assert!(c.platform(label).is_some(), "missing {label}");
        }
        assert_eq!(c.release("gLite 3.2").map(|r| r.name.as_str()), Some("3.2"));
        assert_eq!(c.release("glite-3.1").map(|r| r.name.as_str()), Some("3.1"));
        assert!(c.release("3.3").is_none());
    }

    #[test]
    fn unknown_catalogue_fields_are_refused() {
        let err = Catalogue::parse("x.yaml", "releases: []\nplatforms: []\nextra: 1\n")
            .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn inconsistent_catalogue_is_refused() {
        let text = "releases:\n  - name: '3.2'\n    label: gLite 3.2\n    platforms: [sl9_x86_64]\n    node_types: []\nplatforms: []\n";
        let err = Catalogue::parse("x.yaml", text).expect_err("unknown platform");
        assert!(
            err.to_string().contains("unknown platform sl9_x86_64"),
            "{err}"
        );
    }
}
