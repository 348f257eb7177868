//! `certo report`: the nightly report, self-contained (one HTML file, its style inline, no
//! script, no request to anywhere): the newly failing cells first with what changed since
//! their last good night, then the matrix, then every cell worst first; or its JSON.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::pages::{cell_rows, matrix_of};
use crate::app::{AppError, Context, OpError};
use crate::store::Store;

/// The report's content: the latest sweep's matrix, its newly failing cells, every cell.
pub async fn data(app: &Context, store: &Store) -> Result<Value, OpError> {
    let m = matrix_of(app, store).await?;
    let Some(view) = m.view else {
        return Err(OpError::NotFound("no sweep yet: nothing to report".into()));
    };
    let cells = cell_rows(&view);
    let new_failures: Vec<Value> = cells
        .iter()
        .filter(|c| c["class"] == "newly failing")
        .cloned()
        .collect();
    Ok(json!({
        "sweep": view, "columns": m.columns, "rows": m.rows, "cells": cells,
        "new_failures": new_failures,
    }))
}

/// Writes `DIR/index.html`; returns its path.
pub async fn write_html(app: &Context, store: &Store, dir: &Path) -> Result<PathBuf, OpError> {
    let d = data(app, store).await?;
    let mut ctx = tera::Context::new();
    for k in ["sweep", "columns", "rows", "cells", "new_failures"] {
        ctx.insert(k, &d[k]);
    }
    ctx.insert(
        "written",
        &chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
    );
    let html = super::templates()
        .render("report.html", &ctx)
        .map_err(|e| OpError::Refused(format!("rendering the report: {e}")))?;
    let io = |what: String| move |source| OpError::App(AppError::Io { what, source });
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join("index.html");
    let tmp = dir.join(".index.html.tmp");
    std::fs::write(&tmp, html).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("renaming to {}", path.display())))?;
    Ok(path)
}
