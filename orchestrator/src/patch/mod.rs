//! Patch records: the model, the three input forms (YAML, JSON, the tracker's
//! text export) and their validation against the catalogue.
//!
//! Reading a record never touches the store: [`load`] either returns records
//! that passed every check, or every error found in the file, each with its
//! file, line, column and field.

pub mod convert;
pub mod doc;
mod json;
pub mod labels;
pub mod limits;
pub mod text;
#[cfg(test)]
mod tracker_tests;
pub mod write;

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalogue::Catalogue;
pub use doc::Pos;

/// One validation error: where it is, which field, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub col: u32,
    /// The field path, e.g. `packages[1].file`; `syntax` for a parse error,
    /// `record` for an error about the record as a whole.
    pub field: String,
    pub message: String,
}

impl Diagnostic {
    pub fn new(pos: Pos, field: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        let field = field.into();
        Diagnostic {
            file: String::new(),
            line: pos.line,
            col: pos.col,
            field: if field.is_empty() {
                "record".to_string()
            } else {
                field
            },
            message: message.into(),
        }
    }

    pub fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, self.field, self.message
        )
    }
}

/// A package format (defined with the other shared types in [`crate::model`]).
pub use crate::model::PackageFormat;

/// Where a package is fetched from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "location", rename_all = "snake_case")]
pub enum PackageSource {
    /// The patch repository the catalogue configures for the record's release.
    Release,
    /// A path relative to the package repository root.
    Repository(String),
    /// An http(s) URL of the package's directory or of the file itself.
    Url(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// The package file name, e.g. `glite-yaim-core-4.0.12-1.noarch.rpm`.
    pub file: String,
    pub name: String,
    pub version: String,
    /// The RPM release or the Debian revision (empty for a native Debian package).
    pub release: String,
    pub arch: String,
    pub format: PackageFormat,
    pub source: PackageSource,
    /// Lower-case hex SHA-256 of the package file, when the record gives it.
    pub sha256: Option<String>,
    /// Listed under the tracker's Externals: from outside the release (e.g. VDT).
    #[serde(default, skip_serializing_if = "is_false")]
    pub external: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// A release update, as in `3.1.0 Update 71` or `gLite 3.2 Security Update 01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseUpdate {
    pub number: u32,
    pub security: bool,
}

impl fmt::Display for ReleaseUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.security {
            write!(f, "Security Update {:02}", self.number)
        } else {
            write!(f, "Update {:02}", self.number)
        }
    }
}

/// A package already in production that the patch adds to a node type's metapackage
/// (the tracker's Metapackage changes: `lcg-CE: glite-security-voms-api-cpp-1.8.3-3.slc4.i386.rpm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetapackageChange {
    /// The node type, as the catalogue names it.
    pub node_type: String,
    pub file: String,
    pub name: String,
    pub version: String,
    pub release: String,
    pub arch: String,
}

/// The tracker's Release Path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleasePath {
    Standard,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bug {
    pub id: u64,
    pub title: Option<String>,
    /// The regression test that checks the fix, as named in the node type's suite.
    pub regression_test: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChange {
    /// The configuration file, e.g. `site-info.def` or `/etc/glite/wms.conf`.
    pub file: String,
    pub key: String,
    pub value: String,
}

/// A validated patch record. Field order is the canonical order of the content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub id: u64,
    pub revision: u32,
    pub title: String,
    /// The tracker's status, e.g. `Ready for Certification`.
    pub status: String,
    /// The release baseline, as the catalogue names it (`3.1`, `3.2`).
    pub release: String,
    pub platforms: Vec<String>,
    pub node_types: Vec<String>,
    pub bugs: Vec<Bug>,
    pub packages: Vec<Package>,
    pub config_changes: Vec<ConfigChange>,
    pub submitter: String,
    pub description: String,
    // What the tracker records beside (absent from the canonical form when not given, so a
    // record that does not use them keeps its digest).
    /// The release's update, e.g. `Update 71` of 3.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_update: Option<ReleaseUpdate>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metapackage_changes: Vec<MetapackageChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_to: Option<String>,
    /// e.g. `5 - Normal`, `9 - Immediate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_path: Option<ReleasePath>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release_notes: String,
    /// Installation & configuration notes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub installation: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certification_report: String,
    /// The patch may replace an installed package by an older version (`allow_downgrade:
    /// true`; text form `Downgrade: allowed`). Without it a downgrade fails the image build.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_downgrade: bool,
}

impl PatchRecord {
    /// Whether the tracker's status asks for certification (other records are stored and
    /// shown, not certified).
    pub fn wants_certification_status(&self) -> bool {
        self.stage() == labels::Stage::Certification
    }

    /// Where the record's status stands in the lifecycle.
    pub fn stage(&self) -> labels::Stage {
        labels::status(&self.status).map_or(labels::Stage::Certification, |(_, s)| s)
    }

    /// The release as the tracker writes it, e.g. `3.1 Update 71`.
    pub fn release_shown(&self) -> String {
        match &self.release_update {
            Some(u) => format!("{} {u}", self.release),
            None => self.release.clone(),
        }
    }

    /// SHA-256 over the canonical JSON encoding of the record: the same content
    /// has the same digest whichever form it was written in.
    pub fn content_digest(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("a patch record always serialises");
        hex::encode(Sha256::digest(&bytes))
    }
}

/// The input forms a record can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Yaml,
    Json,
    Text,
}

impl SourceFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Yaml => "yaml",
            SourceFormat::Json => "json",
            SourceFormat::Text => "text",
        }
    }

    /// The form of a file: by its extension, else by its first non-blank character.
    pub fn detect(path: &Path, src: &str) -> SourceFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => SourceFormat::Yaml,
            Some("json") => SourceFormat::Json,
            Some("txt" | "text") => SourceFormat::Text,
            _ => {
                let first = src
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .unwrap_or("");
                if first.starts_with('{') || first.starts_with('[') {
                    SourceFormat::Json
                } else if first.to_ascii_lowercase().starts_with("patch:") {
                    SourceFormat::Text
                } else {
                    SourceFormat::Yaml
                }
            }
        }
    }
}

/// A record that passed validation, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedRecord {
    pub record: PatchRecord,
    pub digest: String,
    pub file: String,
    pub pos: Pos,
    pub format: SourceFormat,
    /// What is legal but worth a look (`FILE:LINE:COL: warning: …` on stderr, exit 0).
    pub warnings: Vec<Diagnostic>,
}

impl LoadedRecord {
    /// What the record's status means for Certo, when it is not "certify this": a record
    /// already past certification, rejected or obsolete is stored and shown, not queued.
    pub fn note(&self) -> Option<String> {
        let r = &self.record;
        match r.stage() {
            labels::Stage::Certification => None,
            labels::Stage::Before => Some(format!(
                "patch {} is {}: stored and shown, not queued for certification until it is Ready for Certification",
                r.id, r.status
            )),
            labels::Stage::Past => Some(format!(
                "patch {} is {}: already past certification; stored and shown, not queued for certification",
                r.id, r.status
            )),
            labels::Stage::Closed => Some(format!(
                "patch {} is {}: stored and shown, not queued for certification",
                r.id, r.status
            )),
        }
    }

    /// Whether the record asks for certification (its status is that stage's).
    pub fn wants_certification(&self) -> bool {
        self.record.stage() == labels::Stage::Certification
    }
}

/// Reads every record of one file and validates it against the catalogue.
///
/// Returns all records, or every error found (never a partial list of records).
pub fn load(
    file: &str,
    bytes: &[u8],
    format: Option<SourceFormat>,
    catalogue: &Catalogue,
) -> Result<Vec<LoadedRecord>, Vec<Diagnostic>> {
    let with_file = |mut errors: Vec<Diagnostic>| {
        for e in &mut errors {
            e.file = file.to_string();
        }
        errors.sort_by_key(|e| (e.line, e.col));
        errors
    };
    if bytes.len() > limits::MAX_FILE_BYTES {
        return Err(with_file(vec![Diagnostic::new(
            Pos::new(1, 1),
            "syntax",
            format!(
                "file is {} bytes; patch files are limited to {} bytes",
                bytes.len(),
                limits::MAX_FILE_BYTES
            ),
        )]));
    }
    let src = match std::str::from_utf8(bytes) {
        Ok(src) => src,
        Err(e) => {
            let good = &bytes[..e.valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let col = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
            return Err(with_file(vec![Diagnostic::new(
                Pos::new(line, col),
                "syntax",
                "the file is not valid UTF-8",
            )]));
        }
    };
    let src = src.strip_prefix('\u{feff}').unwrap_or(src);
    // A lone carriage return is a line break to YAML but not to the other
    // forms or to most tools: refuse it, so that every form counts lines alike.
    if let Some(at) = src
        .match_indices('\r')
        .map(|(i, _)| i)
        .find(|&i| src.as_bytes().get(i + 1) != Some(&b'\n'))
    {
        let before = &src[..at];
        let line = before.matches('\n').count() + 1;
        let col = before[before.rfind('\n').map_or(0, |i| i + 1)..]
            .chars()
            .count()
            + 1;
        return Err(with_file(vec![Diagnostic::new(
            Pos::new(line, col),
            "syntax",
            "a carriage return (CR) not followed by a line feed: use LF or CRLF line endings",
        )]));
    }
    let format = format.unwrap_or_else(|| SourceFormat::detect(Path::new(file), src));
    let (trees, mut errors) = match format {
        SourceFormat::Text => text::parse_text(src),
        SourceFormat::Yaml | SourceFormat::Json => {
            let parsed = if format == SourceFormat::Yaml {
                doc::parse_yaml(src)
            } else {
                json::parse_records(src)
            };
            match parsed {
                Ok(trees) => (trees, Vec::new()),
                Err(e) => {
                    return Err(with_file(vec![Diagnostic::new(e.pos, "syntax", e.message)]));
                }
            }
        }
    };
    if trees.is_empty() && errors.is_empty() {
        errors.push(Diagnostic::new(
            Pos::new(1, 1),
            "record",
            "the file holds no patch record",
        ));
    }
    if trees.len() > limits::MAX_RECORDS_PER_FILE {
        errors.push(Diagnostic::new(
            trees[limits::MAX_RECORDS_PER_FILE].pos,
            "record",
            format!(
                "more than {} records in one file",
                limits::MAX_RECORDS_PER_FILE
            ),
        ));
    }
    let mut records = Vec::with_capacity(trees.len());
    for (i, tree) in trees.iter().enumerate() {
        // Lines of this record: up to the next record's first line.
        let end = trees.get(i + 1).map_or(u32::MAX, |t| t.pos.line);
        let item_errors_here = errors.iter().any(|e| {
            e.line >= tree.pos.line
                && e.line < end
                && [
                    "packages",
                    "externals",
                    "metapackage_changes",
                    "config_changes",
                ]
                .iter()
                .any(|f| e.field.starts_with(f))
        });
        match convert::record_from_tree(tree, catalogue, format) {
            // An item the text parser already refused is not "nothing".
            Err(errs) if item_errors_here => {
                errors.extend(
                    errs.into_iter()
                        .filter(|e| e.message != convert::CHANGES_NOTHING),
                );
            }
            Ok(_) if item_errors_here => {}
            Ok((record, mut warnings)) => {
                for w in &mut warnings {
                    w.file = file.to_string();
                }
                warnings.sort_by_key(|w| (w.line, w.col));
                records.push(LoadedRecord {
                    digest: record.content_digest(),
                    record,
                    file: file.to_string(),
                    pos: tree.pos,
                    format,
                    warnings,
                })
            }
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    // The same patch revision twice in one file is a conflict or a repeat.
    for (i, a) in records.iter().enumerate() {
        if let Some(b) = records[..i]
            .iter()
            .find(|b| b.record.id == a.record.id && b.record.revision == a.record.revision)
        {
            errors.push(Diagnostic::new(
                a.pos,
                "id",
                format!(
                    "patch {} revision {} appears twice in this file (first at line {})",
                    a.record.id, a.record.revision, b.pos.line
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(records)
    } else {
        Err(with_file(errors))
    }
}
