//! Submitting patch records: validate, store in one transaction (for a user of the API,
//! only revisions of patches they own), and with `certify` start the certification of
//! each stored revision that asks for it. The CLI (from files) and the API (from uploaded
//! contents) both end here, so both answer alike.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Context, OpError};
use crate::ingest::Loaded;
use crate::patch::{self, Diagnostic, limits};
use crate::store::{SubmitError, SubmitOutcome, SubmitReport, Submitter};

/// One file's contents, as the API receives it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Upload {
    /// The file's name as the submitter knows it (diagnostics name it).
    pub name: String,
    /// Its text (YAML, JSON or the tracker's text form; recognised by name, else content).
    pub content: String,
}

/// What a submission stored and started.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitAnswer {
    /// What became of each record.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<SubmitReport>,
    /// Legal but worth a look (`FILE:LINE:COL`).
    pub warnings: Vec<Diagnostic>,
    /// Lifecycle notes: records stored but not queued for certification.
    #[schema(value_type = Vec<Object>)]
    pub notes: Vec<Value>,
    /// With `certify`: the run of each stored revision (`patch`, `revision`, `run`,
    /// `already_stored`).
    #[schema(value_type = Vec<Object>)]
    pub runs: Vec<Value>,
    /// With `certify`: revisions stored only, and why.
    pub skipped: Vec<String>,
}

/// Why nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitFailure {
    /// Records that do not validate (`FILE:LINE:COL: field: message`).
    #[error("{} error(s); nothing was stored", .0.len())]
    Invalid(Vec<Diagnostic>),
    /// Records that conflict with what is stored.
    #[error("{} conflict(s); nothing was stored", .0.len())]
    Conflicts(Vec<Diagnostic>),
    /// Records of patches the submitter may not add revisions to.
    #[error("{} record(s) of patches that are not yours; nothing was stored", .0.len())]
    NotYours(Vec<Diagnostic>),
    #[error(transparent)]
    Op(#[from] OpError),
}

impl SubmitFailure {
    /// The diagnostics, for a refusal of the input.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            SubmitFailure::Invalid(d)
            | SubmitFailure::Conflicts(d)
            | SubmitFailure::NotYours(d) => d,
            SubmitFailure::Op(_) => &[],
        }
    }
}

/// The lifecycle notes of valid records (stored, not queued for certification), as
/// `{file, line, col, patch, note}`.
pub fn notes(loaded: &Loaded) -> Vec<Value> {
    loaded
        .records
        .iter()
        .filter_map(|r| {
            r.note().map(|n| {
                json!({"file": r.file, "line": r.pos.line, "col": r.pos.col, "patch": r.record.id, "note": n})
            })
        })
        .collect()
}

/// Validates uploaded files as `certo validate` validates files on disk.
pub fn load_uploads(uploads: &[Upload], catalogue: &crate::catalogue::Catalogue) -> Loaded {
    let mut loaded = Loaded::default();
    if uploads.len() > limits::MAX_FILES {
        loaded.errors.push(Diagnostic {
            file: "(upload)".into(),
            line: 1,
            col: 1,
            field: "files".into(),
            message: format!(
                "{} files in one submission; at most {} are accepted",
                uploads.len(),
                limits::MAX_FILES
            ),
        });
        return loaded;
    }
    for u in uploads {
        // The name only labels diagnostics; it never names a path here.
        let name: String = u
            .name
            .chars()
            .take(limits::MAX_NAME_CHARS)
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect();
        let name = if name.is_empty() {
            "(unnamed)".to_owned()
        } else {
            name
        };
        let content = &u.content;
        let result = if content.len() > limits::MAX_FILE_BYTES {
            Err(vec![Diagnostic {
                file: name.clone(),
                line: 1,
                col: 1,
                field: "file".into(),
                message: format!(
                    "{} bytes; a patch record file may hold at most {} bytes",
                    content.len(),
                    limits::MAX_FILE_BYTES
                ),
            }])
        } else {
            patch::load(&name, content.as_bytes(), None, catalogue)
        };
        match result {
            Ok(records) => {
                loaded.files.push((name.clone(), records.len(), 0));
                loaded.records.extend(records);
            }
            Err(errors) => {
                loaded.files.push((name.clone(), 0, errors.len()));
                loaded.errors.extend(errors);
            }
        }
    }
    loaded
}

/// Stores what `loaded` holds (nothing when it has errors) for `submitter` (`None`: the
/// operator), and with `certify` starts (or finds) the run of each stored revision.
pub async fn submit(
    ctx: &Context,
    loaded: &Loaded,
    submitter: Option<Submitter<'_>>,
    certify: bool,
) -> Result<SubmitAnswer, SubmitFailure> {
    if !loaded.errors.is_empty() {
        return Err(SubmitFailure::Invalid(loaded.errors.clone()));
    }
    let store = ctx.store().await.map_err(OpError::from)?;
    let records = match store.submit_as(&loaded.records, submitter).await {
        Ok(r) => r,
        Err(SubmitError::Conflicts(c)) => return Err(SubmitFailure::Conflicts(c)),
        Err(SubmitError::NotYours(c)) => return Err(SubmitFailure::NotYours(c)),
        Err(SubmitError::Store(e)) => return Err(OpError::from(e).into()),
    };
    tracing::info!(
        records = records.len(),
        user = submitter.map(|s| s.user),
        "submitted"
    );
    let warnings = loaded
        .records
        .iter()
        .flat_map(|r| r.warnings.iter().cloned())
        .collect();
    let notes = notes(loaded);
    let mut answer = SubmitAnswer {
        records,
        warnings,
        notes,
        runs: Vec::new(),
        skipped: Vec::new(),
    };
    if !certify {
        return Ok(answer);
    }
    for r in &answer.records {
        let Some(row) = store
            .get_patch(r.patch_id, Some(r.revision))
            .await
            .map_err(OpError::from)?
        else {
            continue;
        };
        if !row.record.wants_certification_status() {
            answer.skipped.push(format!(
                "patch {} r{}: tracker status {:?} is not for certification; stored only",
                r.patch_id, r.revision, row.record.status
            ));
            continue;
        }
        let existing = super::runs::latest(store, r.patch_id, Some(r.revision))
            .await
            .map_err(OpError::from)?;
        let id = match existing {
            Some(run) if run.cancel_reason.is_none() => run.id,
            _ => super::runs::start(ctx, &row.record).await?,
        };
        answer.runs.push(json!({
            "patch": r.patch_id, "revision": r.revision, "run": id,
            "already_stored": r.outcome == SubmitOutcome::Unchanged,
        }));
    }
    Ok(answer)
}
