//! The images page: every image and layer with what its digest covers, the downloads, and
//! a form to build an image for a target with extra packages — which first shows whether
//! that exact configuration exists already (ready at once) and otherwise builds it in the
//! server, on a page of its own that follows the build.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{Value, json};

use super::pages::{base, since, tone};
use super::{Viewer, page_error, page_error_internal, render};
use crate::api::ApiState;
use crate::app::image_builds::{self, Ask};

/// The form's fields, as the page's query (to plan) or the build's post (with `csrf`).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ImageForm {
    #[serde(default)]
    pub release: String,
    #[serde(default)]
    pub platform: String,
    #[serde(default)]
    pub top: String,
    #[serde(default)]
    pub packages: String,
    #[serde(default)]
    pub qcow2: Option<String>,
    #[serde(default)]
    pub targz: Option<String>,
    #[serde(default)]
    pub csrf: String,
}

impl ImageForm {
    fn ask(&self) -> Result<Ask, crate::app::OpError> {
        let mut formats = Vec::new();
        if self.qcow2.is_some() {
            formats.push("qcow2".to_owned());
        }
        if self.targz.is_some() {
            formats.push("tar.gz".to_owned());
        }
        Ask::from_fields(
            self.release.trim(),
            self.platform.trim(),
            self.top.trim(),
            &self.packages,
            &formats,
        )
    }
}

/// The form's choices: the catalogue's releases, platforms and node types.
fn choices(app: &crate::app::Context) -> Value {
    let c = app.catalogue();
    let mut node_types: Vec<&str> = c
        .releases
        .iter()
        .flat_map(|r| r.node_types.iter().map(|n| n.name.as_str()))
        .collect();
    node_types.sort();
    node_types.dedup();
    json!({
        "releases": c.releases.iter().map(|r| json!({"name": r.name, "label": r.label})).collect::<Vec<_>>(),
        "platforms": c.platforms.iter().map(|p| p.label.as_str()).collect::<Vec<_>>(),
        "node_types": node_types,
    })
}

/// Every image and layer: what each layer's digest covers, size, age, cache hits.
pub async fn images(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    form: Result<Query<ImageForm>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let Ok(Query(form)) = form else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "the images page's query is not its form's",
        );
    };
    let (images, layers) = match (s.store.list_images().await, s.store.layer_details().await) {
        (Ok(i), Ok(l)) => (i, l),
        (Err(e), _) | (_, Err(e)) => return page_error_internal(&e),
    };
    let mib = |b: i64| format!("{:.1}", b as f64 / 1048576.0);
    let short = |d: &str| d.chars().take(12).collect::<String>();
    let images: Vec<Value> = images
        .iter()
        .map(|i| {
            let formats: Vec<Value> = i
                .artefacts
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| json!({"format": a["format"], "size": mib(a["size_bytes"].as_i64().unwrap_or(0))}))
                .collect();
            json!({
                "digest": i.digest, "short": short(&i.digest),
                "target": format!("{}/{}/{}", i.release, i.platform, i.node_type),
                "patch": i.patch_id.map(|p| format!("{p} r{}", i.patch_revision.unwrap_or(0))),
                "size": mib(i.size_bytes), "age": since(Some(&i.built_at.to_rfc3339())),
                "used": since(Some(&i.last_used_at.to_rfc3339())),
                "layers": i.layers.iter().map(|l| short(l)).collect::<Vec<_>>(),
                "formats": formats,
            })
        })
        .collect();
    let layers: Vec<Value> = layers
        .iter()
        .map(|l| {
            let packages: Vec<String> = l.inputs["packages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| match p {
                    Value::Array(a) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" "),
                    other => other
                        .as_str()
                        .map_or_else(|| other.to_string(), str::to_owned),
                })
                .collect();
            let repositories: Vec<String> = l.inputs["repositories"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| match r {
                    Value::Array(a) => format!(
                        "{} {}",
                        a.first().and_then(Value::as_str).unwrap_or(""),
                        a.get(1)
                            .and_then(Value::as_str)
                            .map(&short)
                            .unwrap_or_default()
                    ),
                    other => other.to_string(),
                })
                .collect();
            json!({
                "digest": l.digest, "short": short(&l.digest), "kind": l.kind, "backend": l.backend,
                "parent": l.parent.as_deref().map(short),
                "size": mib(l.size_bytes), "build_seconds": format!("{:.0}", l.build_seconds),
                "age": since(Some(&l.built_at.to_rfc3339())),
                "hits": l.cache_hits, "builds": l.builds,
                "packages": packages, "repositories": repositories,
                "inputs": serde_json::to_string_pretty(&l.inputs).unwrap_or_default(),
            })
        })
        .collect();
    let mut ctx = base("Images", &viewer, "images");
    ctx.insert("images", &images);
    ctx.insert("layers", &layers);
    // The form, and the plan of what it asks for.
    if let Ok(app) = s.app() {
        ctx.insert("choices", &choices(app));
        if !form.release.is_empty() {
            let planned = match form.ask() {
                Ok(ask) => image_builds::plan(app, &ask).await.map(|p| (ask, p)),
                Err(e) => Err(e),
            };
            match planned {
                Ok((ask, plan)) => {
                    ctx.insert("plan", &plan);
                    ctx.insert("plan_label", &ask.label());
                }
                Err(crate::app::OpError::App(e)) => return page_error_internal(&e),
                Err(e) => ctx.insert("plan_error", &e.to_string()),
            }
        }
    }
    ctx.insert(
        "form",
        &json!({
            "release": form.release, "platform": form.platform, "top": form.top,
            "packages": form.packages, "qcow2": form.qcow2.is_some(), "targz": form.targz.is_some(),
        }),
    );
    let builds = match s.store.recent_image_builds(10).await {
        Ok(b) => b,
        Err(e) => return page_error_internal(&e),
    };
    ctx.insert("builds", &builds.iter().map(build_json).collect::<Vec<_>>());
    render("images.html", &ctx)
}

fn build_json(b: &crate::store::ImageBuildRow) -> Value {
    let state = b.shown_state();
    let label = Ask {
        release: b.release.clone(),
        platform: b.platform.clone(),
        top: b.top.clone(),
        packages: b.packages.clone(),
        formats: Vec::new(),
    }
    .label();
    json!({
        "id": b.id, "label": label, "state": state,
        "tone": match state { "built" => "good", "failed" => "bad", "interrupted" => "warn", _ => "busy" },
        "by": b.requested_by, "age": since(Some(&b.requested_at.to_rfc3339())),
        "seconds": b.finished_at.map(|f| format!("{:.1}", (f - b.requested_at).num_milliseconds() as f64 / 1000.0)),
    })
}

/// Starts building what the form asks for (a signed-in user's form, with its CSRF token);
/// to the build's page.
pub async fn build(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    form: Result<axum::Form<ImageForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(axum::Form(form)) = form else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "the form is not one of this dashboard's",
        );
    };
    if let Err(r) = viewer.check_csrf(&form.csrf) {
        return r.into_response();
    }
    let (Some(actor), Ok(app)) = (viewer.actor(), s.app()) else {
        return Redirect::to("/login").into_response();
    };
    let ask = match form.ask() {
        Ok(a) => a,
        Err(e) => return page_error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    };
    match image_builds::start(app, &actor, ask).await {
        Ok(id) => Redirect::to(&format!("/images/builds/{id}")).into_response(),
        Err(crate::app::OpError::Refused(m)) => page_error(StatusCode::UNPROCESSABLE_ENTITY, &m),
        Err(crate::app::OpError::Forbidden(m)) => page_error(StatusCode::FORBIDDEN, &m),
        Err(crate::app::OpError::NotFound(m)) => page_error(StatusCode::NOT_FOUND, &m),
        Err(e) => page_error_internal(&e),
    }
}

/// One build as it goes: its events, then its downloads (or why it failed). The page
/// reloads itself every two seconds while the build runs.
pub async fn build_page(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let Ok(Path(id)) = id else {
        return page_error(StatusCode::BAD_REQUEST, "a build is named by its number");
    };
    let b = match s.store.image_build(id).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return page_error(
                StatusCode::NOT_FOUND,
                &format!("image build {id} is not recorded"),
            );
        }
        Err(e) => return page_error_internal(&e),
    };
    let formats = match &b.image_digest {
        Some(d) => match s.store.image_row(d).await {
            Ok(row) => row
                .map(|r| {
                    r.artefacts
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| json!({"format": a["format"], "size": format!("{:.1}", a["size_bytes"].as_i64().unwrap_or(0) as f64 / 1048576.0)}))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
            Err(e) => return page_error_internal(&e),
        },
        None => Vec::new(),
    };
    let mut ctx = base(&format!("Image build {id}"), &viewer, "images");
    ctx.insert("build", &build_json(&b));
    ctx.insert("tone_of_state", tone(b.shown_state()));
    ctx.insert("running", &(b.shown_state() == "running"));
    ctx.insert("events", &b.events);
    ctx.insert("error", &b.error);
    ctx.insert("image", &b.image_digest);
    ctx.insert("formats", &formats);
    render("image_build.html", &ctx)
}

/// An image's artefact as a download, for whoever may read the dashboard.
pub async fn download(
    State(s): State<Arc<ApiState>>,
    viewer: Viewer,
    p: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Response {
    if let Err(r) = viewer.may_read(&s) {
        return r.into_response();
    }
    let Ok(Path((digest, format))) = p else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "an image is named by its digest and a format",
        );
    };
    match crate::api::admin::artefact_response(&s.store, &digest, &format).await {
        Ok(r) => r,
        Err(crate::app::OpError::NotFound(m)) => page_error(StatusCode::NOT_FOUND, &m),
        Err(crate::app::OpError::Refused(m)) => page_error(StatusCode::UNPROCESSABLE_ENTITY, &m),
        Err(e) => page_error_internal(&e),
    }
}
