//! The remote CLI: with `--server URL` (or `CERTO_SERVER`) and a user token, `submit`,
//! `patches`, `show`, `runs`, `rerun`, `cancel` and `sweep show` call `certo serve`'s API
//! instead of the local store. [`Backend`] is the one seam: each of those commands asks it,
//! and it answers from the application layer here or from the API there, with the same
//! types, so the output, `--json` and the exit statuses are the same either way.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::Global;
use certo_orchestrator::api::error::ErrorBody;
use certo_orchestrator::app::patches::PatchFilter;
use certo_orchestrator::app::runs::{RunFilter, RunStatus};
use certo_orchestrator::app::submit::{SubmitAnswer, SubmitFailure, Upload};
use certo_orchestrator::app::{Actor, Context, OpError, Page, PageAsk};
use certo_orchestrator::ingest;

/// A client of `certo serve`'s API, with a user token.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str, token: String) -> anyhow::Result<Client> {
        let base = server.trim_end_matches('/').to_owned();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--server {base:?}: give the orchestrator's URL (http://HOST:PORT)"
        );
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Client { base, token, http })
    }

    /// Sends a request: a success's body, or the API's refusal.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(String, Vec<u8>), CallError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).map_err(|e| CallError::Other(e.into()))?);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling {}", self.base))
            .map_err(CallError::Other)?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {url}"))
            .map_err(CallError::Other)?;
        if status.is_success() {
            return Ok((url, bytes.to_vec()));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => Err(CallError::Api {
                status: status.as_u16(),
                code: e.error.code,
                message: e.error.message,
                diagnostics: e.error.diagnostics,
            }),
            Err(_) => Err(CallError::Other(anyhow::anyhow!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ))),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, CallError> {
        let (url, bytes) = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("the answer of {url} is not what Certo sends"))
            .map_err(CallError::Other)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// A GET whose answer is text (XML).
    pub async fn get_text(&self, path: &str) -> Result<String, CallError> {
        let (_, bytes) = self.send(reqwest::Method::GET, path, None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, CallError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

/// What a call failed with: the API's refusal (its stable code and message), or anything
/// else (the server unreachable, a broken answer).
#[derive(Debug)]
pub enum CallError {
    Api {
        status: u16,
        code: String,
        message: String,
        diagnostics: Vec<certo_orchestrator::patch::Diagnostic>,
    },
    Other(anyhow::Error),
}

impl From<CallError> for anyhow::Error {
    fn from(e: CallError) -> Self {
        match e {
            // Refusals exit as the local command's refusals do (1); the server's own
            // failures as Certo's failures (3).
            CallError::Api {
                status: 404,
                message,
                ..
            } => OpError::NotFound(message).into(),
            CallError::Api {
                status: 401 | 403,
                message,
                ..
            } => OpError::Forbidden(message).into(),
            CallError::Api {
                status, message, ..
            } if status < 500 => OpError::Refused(message).into(),
            CallError::Api { message, code, .. } => {
                anyhow::anyhow!("the server failed ({code}): {message}")
            }
            CallError::Other(e) => e,
        }
    }
}

/// Where the commands get their answers.
#[derive(Debug)]
pub enum Backend {
    Local(Context),
    Remote(Client),
}

/// `?a=1&b=x` from pairs whose value is set (values percent-encoded).
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Backend {
    /// The API when `--server` is given (with a token from `CERTO_TOKEN` or
    /// `--user-token-file`), else this machine's store.
    pub fn of(g: &Global) -> anyhow::Result<Backend> {
        match g.server.as_deref().filter(|s| !s.is_empty()) {
            Some(server) => {
                let token = super::secret(
                    std::env::var("CERTO_TOKEN").ok().as_deref(),
                    g.user_token_file.as_deref(),
                    "user token",
                )
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{e:#} (with --server, set CERTO_TOKEN or give --user-token-file; `certo user add` makes a token)"
                    )
                })?;
                Ok(Backend::Remote(Client::new(server, token)?))
            }
            None => Ok(Backend::Local(g.context()?)),
        }
    }

    pub async fn patches(&self, filter: &PatchFilter) -> anyhow::Result<Vec<Value>> {
        match self {
            Backend::Local(ctx) => {
                Ok(
                    certo_orchestrator::app::patches::list(ctx, filter, PageAsk::all())
                        .await?
                        .items,
                )
            }
            Backend::Remote(c) => {
                // Page by page, each continuing after the last (a list that grows meanwhile
                // neither repeats nor skips a patch).
                let mut items = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let page: Page = c
                        .get(&format!(
                            "/api/v1/patches{}",
                            query(&[
                                ("state", filter.state.map(|s| s.as_str().to_owned())),
                                ("release", filter.release.clone()),
                                ("all_revisions", filter.all_revisions.then(|| "true".into())),
                                ("limit", Some(PageAsk::MAX.to_string())),
                                ("after", after.clone()),
                            ])
                        ))
                        .await?;
                    items.extend(page.items);
                    match page.next_after {
                        Some(a) => after = Some(a),
                        None => break,
                    }
                }
                Ok(items)
            }
        }
    }

    pub async fn show(&self, id: u64, revision: Option<u32>) -> anyhow::Result<Value> {
        match self {
            Backend::Local(ctx) => {
                Ok(certo_orchestrator::app::show::patch(ctx.store().await?, id, revision).await?)
            }
            Backend::Remote(c) => Ok(c
                .get(&format!(
                    "/api/v1/patches/{id}{}",
                    query(&[("revision", revision.map(|r| r.to_string()))])
                ))
                .await?),
        }
    }

    pub async fn runs(&self, filter: &RunFilter, limit: i64) -> anyhow::Result<Vec<Value>> {
        let page = PageAsk {
            limit: Some(limit),
            offset: None,
            after: None,
        };
        match self {
            Backend::Local(ctx) => {
                Ok(
                    certo_orchestrator::app::runs::list(ctx.store().await?, filter, page)
                        .await?
                        .items,
                )
            }
            Backend::Remote(c) => {
                let page: Page = c
                    .get(&format!(
                        "/api/v1/runs{}",
                        query(&[
                            ("state", filter.state.clone()),
                            ("patch", filter.patch.map(|p| p.to_string())),
                            ("limit", Some(limit.min(PageAsk::MAX).to_string())),
                        ])
                    ))
                    .await?;
                Ok(page.items)
            }
        }
    }

    pub async fn run_status(&self, id: i64) -> anyhow::Result<RunStatus> {
        match self {
            Backend::Local(ctx) => {
                Ok(certo_orchestrator::app::runs::status(ctx.store().await?, id).await?)
            }
            Backend::Remote(c) => Ok(c.get(&format!("/api/v1/runs/{id}")).await?),
        }
    }

    pub async fn cancel(&self, patch: u64) -> anyhow::Result<Vec<i64>> {
        match self {
            Backend::Local(ctx) => {
                Ok(
                    certo_orchestrator::app::runs::cancel_for(ctx, &Actor::operator(), patch)
                        .await?,
                )
            }
            Backend::Remote(c) => {
                let v: Value = c
                    .post(&format!("/api/v1/patches/{patch}/cancel"), &json!({}))
                    .await?;
                Ok(serde_json::from_value(v["cancelled"].clone())?)
            }
        }
    }

    pub async fn rerun(&self, patch: u64, failed: bool) -> anyhow::Result<i64> {
        match self {
            Backend::Local(ctx) => Ok(certo_orchestrator::app::runs::rerun_for(
                ctx,
                &Actor::operator(),
                patch,
                failed,
            )
            .await?),
            Backend::Remote(c) => {
                let v: Value = c
                    .post(
                        &format!("/api/v1/patches/{patch}/rerun"),
                        &json!({"failed": failed}),
                    )
                    .await?;
                v["run"]
                    .as_i64()
                    .ok_or_else(|| anyhow::anyhow!("the server's answer names no run"))
            }
        }
    }

    /// A run's tests as JUnit XML.
    pub async fn junit(&self, run: i64) -> anyhow::Result<String> {
        match self {
            Backend::Local(ctx) => {
                Ok(certo_orchestrator::app::reports::junit(ctx.store().await?, run).await?)
            }
            Backend::Remote(c) => Ok(c.get_text(&format!("/api/v1/runs/{run}/junit")).await?),
        }
    }

    pub async fn sweep_show(&self, id: Option<i64>) -> anyhow::Result<Value> {
        match self {
            Backend::Local(ctx) => {
                Ok(certo_orchestrator::app::sweeps::show(ctx.store().await?, id).await?)
            }
            Backend::Remote(c) => Ok(c
                .get(&format!(
                    "/api/v1/sweeps/{}",
                    id.map_or_else(|| "latest".to_owned(), |i| i.to_string())
                ))
                .await?),
        }
    }
}

impl Backend {
    /// Submits files: read and validated here and stored locally, or read here and sent
    /// to the server, which validates and stores them (its diagnostics name the same files).
    pub async fn submit_files(
        &self,
        g: &Global,
        files: &[PathBuf],
        certify: bool,
    ) -> anyhow::Result<Result<SubmitAnswer, SubmitFailure>> {
        match self {
            Backend::Local(ctx) => {
                let loaded = load(g, files)?;
                match certo_orchestrator::app::submit::submit(ctx, &loaded, None, certify).await {
                    Err(SubmitFailure::Op(e)) => Err(e.into()),
                    other => Ok(other),
                }
            }
            Backend::Remote(c) => {
                let paths = match ingest::expand(files) {
                    Ok(p) => p,
                    Err(d) => return Ok(Err(SubmitFailure::Invalid(vec![d]))),
                };
                let mut uploads = Vec::new();
                let mut errors = Vec::new();
                for p in paths {
                    match ingest::read_limited(&p) {
                        Ok(bytes) => match String::from_utf8(bytes) {
                            Ok(content) => uploads.push(Upload {
                                name: p.display().to_string(),
                                content,
                            }),
                            Err(_) => errors.push(certo_orchestrator::patch::Diagnostic {
                                file: p.display().to_string(),
                                line: 1,
                                col: 1,
                                field: "file".into(),
                                message: "not UTF-8 text".into(),
                            }),
                        },
                        Err(d) => errors.push(d),
                    }
                }
                if !errors.is_empty() {
                    return Ok(Err(SubmitFailure::Invalid(errors)));
                }
                let body = json!({"files": uploads, "certify": certify});
                match c.post::<SubmitAnswer>("/api/v1/submit", &body).await {
                    Ok(a) => Ok(Ok(a)),
                    Err(CallError::Api {
                        code, diagnostics, ..
                    }) if !diagnostics.is_empty() => Ok(Err(match code.as_str() {
                        "conflict" => SubmitFailure::Conflicts(diagnostics),
                        "not_yours" => SubmitFailure::NotYours(diagnostics),
                        _ => SubmitFailure::Invalid(diagnostics),
                    })),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// Reads and validates record files here, with a progress bar on a terminal.
pub fn load(g: &Global, files: &[PathBuf]) -> anyhow::Result<ingest::Loaded> {
    let catalogue = g.catalogue()?;
    let count = ingest::expand(files).map(|f| f.len()).unwrap_or(0);
    let bar = super::progress(count as u64, "validating");
    let loaded = ingest::load_files(files, &catalogue, || bar.inc(1));
    bar.finish_and_clear();
    Ok(loaded)
}
