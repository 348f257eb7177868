//! Images people ask for from the dashboard: a target, the layer the image ends with (core,
//! base or a node type) and extra packages. [`plan`] says first whether that exact
//! configuration exists already (then it is ready at once) and which layers a build would
//! take from the cache; [`start`] builds it in the server, appending the build's events to
//! the store as they happen, so the page that shows the build follows it live.

use certo_imager::{Customization, Event, Format, ImageRequest, LayerOutcome, Top};
use serde::Serialize;

use super::{Actor, Context, OpError};

/// Most extra packages one form may ask for.
pub const MAX_PACKAGES: usize = 32;

/// What a person asks for.
#[derive(Debug, Clone)]
pub struct Ask {
    pub release: String,
    pub platform: String,
    /// `core`, `base` or a node type of the release.
    pub top: String,
    /// Extra package names (any order; repeats are dropped).
    pub packages: Vec<String>,
    /// Formats beyond ext4 (which every image has).
    pub formats: Vec<Format>,
}

impl Ask {
    /// An ask from a form's fields: `packages` separated by spaces or commas, `formats` by
    /// names (`qcow2`, `tar.gz`; `ext4` is always made). Refused with what is wrong.
    pub fn from_fields(
        release: &str,
        platform: &str,
        top: &str,
        packages: &str,
        formats: &[String],
    ) -> Result<Ask, OpError> {
        let mut names: Vec<String> = packages
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        if names.len() > MAX_PACKAGES {
            return Err(OpError::Refused(format!(
                "{} extra packages asked for; at most {MAX_PACKAGES}",
                names.len()
            )));
        }
        let mut fs = Vec::new();
        for f in formats {
            match Format::parse(f) {
                Some(Format::Ext4) => {}
                Some(x) if !fs.contains(&x) => fs.push(x),
                Some(_) => {}
                None => {
                    return Err(OpError::Refused(format!(
                        "format {f:?} is not one Certo exports (ext4, qcow2, tar.gz)"
                    )));
                }
            }
        }
        if release.is_empty() || platform.is_empty() || top.is_empty() {
            return Err(OpError::Refused(
                "an image needs a release, a platform and the layer it ends with".into(),
            ));
        }
        Ok(Ask {
            release: release.to_owned(),
            platform: platform.to_owned(),
            top: top.to_owned(),
            packages: names,
            formats: fs,
        })
    }

    fn custom(&self) -> Customization {
        Customization {
            top: match self.top.as_str() {
                "core" => Top::Core,
                "base" => Top::Base,
                _ => Top::NodeType,
            },
            packages: self.packages.clone(),
            root_password: None,
        }
    }

    /// How the ask reads: `3.2 sl5_x86_64 core + python openldap-clients`.
    pub fn label(&self) -> String {
        let extra = if self.packages.is_empty() {
            String::new()
        } else {
            format!(" + {}", self.packages.join(" "))
        };
        format!("{} {} {}{extra}", self.release, self.platform, self.top)
    }
}

/// One layer of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedLayer {
    pub kind: String,
    pub label: String,
    pub digest: String,
    /// In the layer cache already.
    pub cached: bool,
}

/// What building an ask would take.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The image's digest.
    pub image: String,
    pub layers: Vec<PlannedLayer>,
    /// The image is recorded already: its formats (ready at once).
    pub ready: Option<Vec<String>>,
    /// Formats asked for that the recorded image does not have yet.
    pub missing_formats: Vec<String>,
}

fn request_of(ctx: &Context, ask: &Ask) -> Result<ImageRequest, OpError> {
    match ask.top.as_str() {
        "core" | "base" => super::images::layers_request(ctx, &ask.release, &ask.platform),
        nt => super::images::request(ctx, &ask.release, &ask.platform, nt, None),
    }
}

/// The plan of `ask`: the image's digest, each layer and whether it is cached, and
/// whether the image itself is recorded (with which formats). Refused for a target the
/// catalogue does not have or a package the platform's repositories do not have.
pub async fn plan(ctx: &Context, ask: &Ask) -> Result<Plan, OpError> {
    let req = request_of(ctx, ask)?;
    let imager = ctx.imager()?;
    let custom = ask.custom();
    let plans = tokio::task::spawn_blocking({
        let imager = imager.clone();
        move || imager.plan_custom(&req, &custom)
    })
    .await
    .map_err(|e| OpError::App(e.into()))?
    .map_err(|e| OpError::Refused(e.to_string()))?;
    let layers = plans
        .iter()
        .map(|p| PlannedLayer {
            kind: certo_imager::error::layer_name(p.kind).to_owned(),
            label: p.label.clone(),
            digest: p.digest.to_hex(),
            cached: imager.store().layer(&p.digest).ok().flatten().is_some(),
        })
        .collect();
    let digests: Vec<_> = plans.iter().map(|p| p.digest).collect();
    let image = certo_imager::image_id(&digests);
    let store = ctx.store().await?;
    let ready = store
        .image_row(&image)
        .await
        .map_err(|e| OpError::App(e.into()))?
        .map(|row| {
            row.artefacts
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["format"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        });
    let missing_formats = match &ready {
        Some(have) => ask
            .formats
            .iter()
            .map(|f| f.as_str().to_owned())
            .filter(|f| !have.contains(f))
            .collect(),
        None => Vec::new(),
    };
    Ok(Plan {
        image,
        layers,
        ready,
        missing_formats,
    })
}

/// Starts building `ask` in this process for `actor` (a signed-in user); returns the
/// build's id at once. The build's events and its end are recorded as they happen.
pub async fn start(ctx: &Context, actor: &Actor, ask: Ask) -> Result<i64, OpError> {
    let Actor::User { name, .. } = actor else {
        return Err(OpError::Forbidden(
            "image builds from the dashboard are asked for by a signed-in user".into(),
        ));
    };
    // Refused asks (an unknown target or package) record nothing.
    let req = request_of(ctx, &ask)?;
    plan(ctx, &ask).await?;
    let store = ctx.store().await?.clone();
    let formats: Vec<String> = ask.formats.iter().map(|f| f.as_str().to_owned()).collect();
    let id = store
        .start_image_build(
            name,
            &ask.release,
            &ask.platform,
            &ask.top,
            &ask.packages,
            &formats,
        )
        .await
        .map_err(|e| OpError::App(e.into()))?;
    tracing::info!(build = id, user = %name, image = %ask.label(), "image build asked for");
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        // Events go to the store in batches (and beat the heartbeat while a layer builds).
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut open = true;
                while open {
                    let mut batch = Vec::new();
                    tokio::select! {
                        got = rx.recv() => match got {
                            Some(t) => batch.push(t),
                            None => open = false,
                        },
                        _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    }
                    while let Ok(t) = rx.try_recv() {
                        batch.push(t);
                    }
                    if let Err(e) = store.image_build_events(id, &batch).await {
                        tracing::warn!(build = id, error = %e, "cannot record an image build's events");
                    }
                }
            })
        };
        let progress = move |event: Event| {
            let text = match event {
                Event::Planned { layers } => format!("planned {} layers", layers.len()),
                Event::LayerStarted { label, .. } => format!("building {label}"),
                Event::LayerReady {
                    kind,
                    digest,
                    outcome,
                    seconds,
                } => format!(
                    "{} {} {} ({seconds:.1} s)",
                    certo_imager::error::layer_name(kind),
                    &digest.to_hex()[..16],
                    match outcome {
                        LayerOutcome::Cached => "cached",
                        LayerOutcome::Built => "built",
                        LayerOutcome::BuiltByOther => "built by another build",
                    }
                ),
                Event::Exporting { format } => format!("exporting {}", format.as_str()),
            };
            let _ = tx.send(text);
        };
        let result =
            super::images::build_custom(&ctx, &req, &ask.custom(), &ask.formats, progress).await;
        let _ = writer.await;
        let (image, error) = match result {
            Ok(Ok(built)) => (Some(built.image.digest.clone()), None),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(e) => (None, Some(format!("Certo could not build: {e}"))),
        };
        tracing::info!(build = id, image = ?image, error = ?error, "image build ended");
        if let Err(e) = store
            .finish_image_build(id, image.as_deref(), error.as_deref())
            .await
        {
            tracing::warn!(build = id, error = %e, "cannot record an image build's end");
        }
    });
    Ok(id)
}
