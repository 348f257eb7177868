//! The sending side: `plan` (what would be sent) and `push` (send it), over reqwest.
//!
//! `push` is a pipeline of concurrent stages joined by bounded channels, so hashing, asking
//! the host, reading, compressing and sending overlap and memory stays bounded:
//!
//! ```text
//! hash production ──► hash dispatch ──────► block request dispatch ──► block dispatch × N
//! (index the file,    (ask the host which     (group missing blocks      (read, verify, zstd,
//!  blocking thread)    hashes it lacks, in     into batches of about      POST over one of N
//!                      chunks; dedup)          --batch-bytes)             connections, retry)
//! ```
//!
//! When every stage is done the index is committed (`PUT /v1/images/NAME`); if the host
//! still lacks blocks (its answer was lost, or a concurrent change), a repair round replays
//! the index through the same stages. An interrupted push, run again, sends only what the
//! host still lacks: every block it stored survives.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::block_index::{BlockEntry, BlockIndex, Chunking, IndexError, PREFIX_LEN, sha256};
use crate::index_cache::IndexCache;
use crate::server::Token;
use crate::steer::Steering;
use crate::wire::{self, WireError};

/// Hashes per missing query.
const QUERY_CHUNK: usize = 16384;
/// A connection that waits this long for a compressed batch lowers the zstd level.
const STARVED: Duration = Duration::from_millis(10);

/// Why a plan or push failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The image file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Indexing failed.
    #[error("indexing {}: {source}", path.display())]
    Index {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: IndexError,
    },
    /// The file changed while it was being pushed.
    #[error("{} changed while it was being pushed (block at offset {offset} no longer matches its hash)", path.display())]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// The block's offset.
        offset: u64,
    },
    /// A bad argument (image name).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The host could not be reached, after retries.
    #[error("{what} {url}: {source} (after {attempts} attempts)")]
    Unreachable {
        /// The request.
        what: &'static str,
        /// Its URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: reqwest::Error,
    },
    /// The host answered with an error.
    #[error("{what} {url}: the host answered {status}: {message}{}", if *attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() })]
    Refused {
        /// The request.
        what: &'static str,
        /// Its URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The host's message.
        message: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The host kept answering that blocks were missing.
    #[error("the host still lacks {missing} blocks of the image after {rounds} rounds")]
    StillMissing {
        /// Blocks missing at the last commit.
        missing: String,
        /// Rounds made.
        rounds: u32,
    },
    /// A task of the pipeline failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ClientError {
    /// The HTTP status the host answered, if that is what failed.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How requests are retried: `attempts` in all, waiting `first_delay`, doubling, at most
/// `max_delay`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// Wait before the second attempt.
    pub first_delay: Duration,
    /// Longest wait.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 8,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Called with a count of image bytes each time some are dealt with (zero, already on the
/// host, or sent and stored): the sum reaches the image length.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Settings of a push.
#[derive(Clone)]
pub struct PushOptions {
    /// Name of the image on the host.
    pub name: String,
    /// How to cut the image.
    pub chunking: Chunking,
    /// Concurrent block uploads (connections).
    pub connections: usize,
    /// zstd level of block batches: the fixed level, or the first when adapting.
    pub zstd_level: i32,
    /// Adapt the level between `min_level` and `max_level` to keep the link busy.
    pub adaptive: bool,
    /// Lowest level when adapting.
    pub min_level: i32,
    /// Highest level when adapting.
    pub max_level: i32,
    /// Uncompressed bytes per batch.
    pub batch_bytes: usize,
    /// Ask the host to assemble the image file after the commit.
    pub assemble: bool,
    /// Progress callback.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("name", &self.name)
            .field("chunking", &self.chunking)
            .field("connections", &self.connections)
            .field("zstd_level", &self.zstd_level)
            .field("adaptive", &self.adaptive)
            .field("min_level", &self.min_level)
            .field("max_level", &self.max_level)
            .field("batch_bytes", &self.batch_bytes)
            .field("assemble", &self.assemble)
            .finish_non_exhaustive()
    }
}

impl PushOptions {
    /// Defaults: fixed 4 KiB blocks, 4 connections, zstd starting at level 3 and adapting
    /// between 1 and 16, 4 MiB batches, assemble.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            chunking: Chunking::default(),
            connections: 4,
            zstd_level: 3,
            adaptive: true,
            min_level: 1,
            max_level: 16,
            batch_bytes: 4 << 20,
            assemble: true,
            progress: None,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushSummary {
    /// Image name on the host.
    pub name: String,
    /// Image digest, hex.
    pub digest: String,
    /// Chunking used.
    pub chunking: String,
    /// Image length.
    pub bytes_total: u64,
    /// Blocks in the index.
    pub blocks_total: usize,
    /// Zero blocks (never sent).
    pub blocks_zero: usize,
    /// Distinct non-zero blocks.
    pub blocks_distinct: usize,
    /// Distinct blocks the host already had (from any image).
    pub blocks_reused: usize,
    /// Bytes of those.
    pub bytes_reused: u64,
    /// Distinct blocks sent and stored.
    pub blocks_sent: usize,
    /// Uncompressed bytes of those.
    pub bytes_raw_sent: u64,
    /// Request body bytes sent (queries, compressed batches, index, retries included).
    pub bytes_sent: u64,
    /// Compressed batch bytes of those (first attempts and retries).
    pub bytes_batches: u64,
    /// Mean zstd level of the batches.
    pub mean_zstd_level: f64,
    /// Batches sent.
    pub batches: u64,
    /// Requests retried.
    pub retries: u64,
    /// Rounds (1 unless the host still lacked blocks at the commit).
    pub rounds: u32,
    /// Size of the encoded index.
    pub index_bytes: usize,
    /// The index came from the index cache (the file was not hashed again).
    pub index_cached: bool,
    /// Seconds from the first batch sent to the last one stored.
    pub send_seconds: f64,
    /// Seconds the host spent assembling the image file, if asked.
    pub assemble_seconds: Option<f64>,
    /// Seconds in all.
    pub seconds: f64,
}

/// What a push would send.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    /// Image digest, hex.
    pub digest: String,
    /// Chunking used.
    pub chunking: String,
    /// Image length.
    pub bytes_total: u64,
    /// Blocks in the index.
    pub blocks_total: usize,
    /// Zero blocks (never sent).
    pub blocks_zero: usize,
    /// Distinct non-zero blocks.
    pub blocks_distinct: usize,
    /// Distinct blocks the host already has.
    pub blocks_reused: usize,
    /// Bytes of those.
    pub bytes_reused: u64,
    /// Distinct blocks to send.
    pub blocks_to_send: usize,
    /// Their uncompressed bytes.
    pub bytes_to_send: u64,
    /// Size of the encoded index (sent at the commit).
    pub index_bytes: usize,
    /// The index came from the index cache (the file was not hashed again).
    pub index_cached: bool,
    /// Seconds in all.
    pub seconds: f64,
}

/// A client of one host's agent.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Token,
    retry: RetryPolicy,
    index_cache: Option<IndexCache>,
}

#[derive(Debug, Clone, Copy)]
struct Want {
    offset: u64,
    len: u32,
    hash: [u8; 32],
}

/// A compressed batch waiting for a connection.
struct Ready {
    body: axum::body::Bytes,
    blocks: usize,
    raw: u64,
    level: i32,
}

#[derive(Debug, Default)]
struct Counters {
    level_sum: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_batches: AtomicU64,
    retries: AtomicU64,
    batches: AtomicU64,
    blocks_sent: AtomicU64,
    bytes_raw_sent: AtomicU64,
    blocks_reused: AtomicU64,
    bytes_reused: AtomicU64,
    send_window: Mutex<Option<(Instant, Instant)>>,
}

impl Counters {
    fn note_send(&self, start: Instant, end: Instant) {
        let mut w = self.send_window.lock().unwrap_or_else(|p| p.into_inner());
        *w = Some(match *w {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
    }
}

/// How a push commits its index (see docs/transfer-format.md).
#[derive(Debug, Clone, Copy)]
enum CommitForm {
    /// References to the prefixes the host was asked about (zstd).
    Session,
    /// The prefixes themselves (zstd).
    Compact,
    /// The whole index.
    Full,
}

impl CommitForm {
    fn name(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Compact => "compact",
            Self::Full => "full",
        }
    }

    fn encode(self, index: &BlockIndex) -> Result<Vec<u8>, ClientError> {
        let zstd = |raw: Vec<u8>| {
            wire::compress(&raw, 3)
                .map_err(|e| ClientError::Internal(format!("zstd compression failed: {e}")))
        };
        match self {
            Self::Session => zstd(index.to_session_bytes()),
            Self::Compact => zstd(index.to_compact_bytes()),
            Self::Full => Ok(index.to_bytes()),
        }
    }
}

/// Where the hash-production stage takes its blocks from.
enum Source {
    /// Hash the file.
    File(Arc<File>, Chunking),
    /// An index at hand: from the index cache (`replay` false), or the previous round's
    /// (`replay` true: a repair round, which asks with whole hashes).
    Index {
        index: Arc<BlockIndex>,
        replay: bool,
    },
}

/// Stops a reader when the pipeline is cancelled.
struct Cancellable<R> {
    inner: R,
    cancel: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("push cancelled"));
        }
        self.inner.read(buf)
    }
}

impl Client {
    /// A client of the agent at `base` (`http://HOST:PORT`).
    pub fn new(base: &str, token: Token, retry: RetryPolicy) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| ClientError::Internal(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
            retry,
            index_cache: None,
        })
    }

    /// Keeps the indexes of pushed and planned files in `cache`, and takes them from it when
    /// the file has not changed since (see [`IndexCache`]).
    pub fn with_index_cache(mut self, cache: IndexCache) -> Self {
        self.index_cache = Some(cache);
        self
    }

    /// The file's index: from the cache when it holds a valid one, else built (and cached).
    async fn index_of(
        &self,
        path: &Path,
        chunking: Chunking,
    ) -> Result<(BlockIndex, bool), ClientError> {
        if let Some(index) = self.cached_index(path, chunking).await {
            return Ok((index, true));
        }
        let key = self.cache_key(path, chunking);
        let index = index_file(path, chunking).await?;
        self.cache_index(path, key, &index).await;
        Ok((index, false))
    }

    fn cache_key(&self, path: &Path, chunking: Chunking) -> Option<crate::index_cache::Key> {
        self.index_cache.as_ref()?.key(path, chunking)
    }

    async fn cached_index(&self, path: &Path, chunking: Chunking) -> Option<BlockIndex> {
        let cache = self.index_cache.clone()?;
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || cache.load(&path, chunking))
            .await
            .ok()
            .flatten()
    }

    async fn cache_index(
        &self,
        path: &Path,
        key: Option<crate::index_cache::Key>,
        index: &BlockIndex,
    ) {
        if let (Some(cache), Some(key)) = (self.index_cache.clone(), key) {
            let (path, index) = (path.to_path_buf(), index.clone());
            let _ = tokio::task::spawn_blocking(move || cache.store(&path, &key, &index)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request (built anew for each attempt) until it succeeds, fails for good, or
    /// the attempts are spent; returns the answer's body. Retried: transport errors, 408,
    /// 422 (body damaged on the way), 429, 5xx except 507.
    async fn request(
        &self,
        what: &'static str,
        url: &str,
        body_len: usize,
        counters: &Counters,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<axum::body::Bytes, ClientError> {
        let mut delay = self.retry.first_delay;
        let mut attempt = 0;
        loop {
            attempt += 1;
            counters
                .bytes_sent
                .fetch_add(body_len as u64, Ordering::Relaxed);
            let last = attempt >= self.retry.attempts;
            let outcome = make().bearer_auth(self.token.secret()).send().await;
            let failure = match outcome {
                Err(source) => {
                    if last {
                        return Err(ClientError::Unreachable {
                            what,
                            url: url.to_string(),
                            attempts: attempt,
                            source,
                        });
                    }
                    source.to_string()
                }
                Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                    Ok(body) => return Ok(body),
                    Err(source) if last => {
                        return Err(ClientError::Unreachable {
                            what,
                            url: url.to_string(),
                            attempts: attempt,
                            source,
                        });
                    }
                    Err(e) => e.to_string(),
                },
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    let message = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                        .unwrap_or_else(|| text.chars().take(300).collect());
                    let retryable = matches!(
                        status,
                        StatusCode::REQUEST_TIMEOUT
                            | StatusCode::UNPROCESSABLE_ENTITY
                            | StatusCode::TOO_MANY_REQUESTS
                    ) || (status.is_server_error()
                        && status != StatusCode::INSUFFICIENT_STORAGE);
                    if !retryable || last {
                        return Err(ClientError::Refused {
                            what,
                            url: url.to_string(),
                            status,
                            message,
                            attempts: attempt,
                        });
                    }
                    format!("{status}: {message}")
                }
            };
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(request = what, url, attempt, error = %failure, delay_ms = delay.as_millis() as u64, "request failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.retry.max_delay);
        }
    }

    /// Asks the host which of `hashes` it lacks. With `session` (its id, and how many
    /// prefixes it was asked before), the host keeps the prefixes for the commit.
    async fn query_missing(
        &self,
        hashes: &[[u8; 32]],
        width: usize,
        session: Option<(&str, usize)>,
        counters: &Counters,
    ) -> Result<Vec<bool>, ClientError> {
        let body: Vec<u8> = hashes.iter().flat_map(|h| &h[..width]).copied().collect();
        let url = match session {
            Some((id, start)) => self.url(&format!(
                "/v1/blocks/missing?width={width}&session={id}&start={start}"
            )),
            None => self.url(&format!("/v1/blocks/missing?width={width}")),
        };
        let body = axum::body::Bytes::from(body);
        loop {
            let answer = self
                .request(
                    "asking which blocks are missing",
                    &url,
                    body.len(),
                    counters,
                    || self.http.post(&url).body(body.clone()),
                )
                .await?;
            if answer.len() == hashes.len().div_ceil(8) {
                return Ok((0..hashes.len()).map(|i| wire::bit(&answer, i)).collect());
            }
            // A damaged answer: ask again (counts as a retry, bounded like the others).
            counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                expected = hashes.len().div_ceil(8),
                got = answer.len(),
                "missing-block answer has the wrong length; asking again"
            );
            if counters.retries.load(Ordering::Relaxed) > u64::from(self.retry.attempts) * 64 {
                return Err(ClientError::Internal(
                    "the host keeps answering missing-block queries with the wrong length".into(),
                ));
            }
        }
    }

    /// Checks that the host answers and speaks this protocol.
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        let url = self.url("/v1/health");
        let body = self
            .request("checking the agent", &url, 0, &Counters::default(), || {
                self.http.get(&url)
            })
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Internal(format!("health answer is not JSON: {e}")))
    }

    /// Indexes `path` and asks the host what it lacks, sending nothing else.
    pub async fn plan(&self, path: &Path, chunking: Chunking) -> Result<PlanSummary, ClientError> {
        let started = Instant::now();
        let (index, index_cached) = self.index_of(path, chunking).await?;
        let index = Arc::new(index);
        let counters = Counters::default();
        let mut seen = HashSet::new();
        let unique: Vec<(u64, BlockEntry)> = index
            .blocks_with_offsets()
            .filter(|(_, b)| !b.is_zero() && seen.insert(*b.hash()))
            .map(|(o, b)| (o, *b))
            .collect();
        let (mut to_send, mut bytes_to_send, mut reused, mut bytes_reused) = (0, 0u64, 0, 0u64);
        for chunk in unique.chunks(QUERY_CHUNK) {
            let hashes: Vec<[u8; 32]> = chunk.iter().map(|(_, b)| *b.hash()).collect();
            let bits = self
                .query_missing(&hashes, PREFIX_LEN, None, &counters)
                .await?;
            for ((_, b), missing) in chunk.iter().zip(bits) {
                if missing {
                    to_send += 1;
                    bytes_to_send += u64::from(b.len());
                } else {
                    reused += 1;
                    bytes_reused += u64::from(b.len());
                }
            }
        }
        Ok(PlanSummary {
            digest: hex::encode(index.image_digest()),
            chunking: index.chunking().label(),
            bytes_total: index.image_len(),
            blocks_total: index.blocks().len(),
            blocks_zero: index.zero_blocks(),
            blocks_distinct: unique.len(),
            blocks_reused: reused,
            bytes_reused,
            blocks_to_send: to_send,
            bytes_to_send,
            index_bytes: index.encoded_len(),
            index_cached,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Sends the image at `path` to the host as `opts.name` (see the module documentation).
    pub async fn push(&self, path: &Path, opts: PushOptions) -> Result<PushSummary, ClientError> {
        let started = Instant::now();
        wire::validate_name(&opts.name)?;
        let file = Arc::new(File::open(path).map_err(|source| ClientError::File {
            path: path.to_path_buf(),
            source,
        })?);
        let counters = Arc::new(Counters::default());
        let session = new_session_id();
        let key = self.cache_key(path, opts.chunking);
        let cached = self.cached_index(path, opts.chunking).await;
        let index_cached = cached.is_some();
        let mut source = match cached {
            Some(index) => Source::Index {
                index: Arc::new(index),
                replay: false,
            },
            None => Source::File(file.clone(), opts.chunking),
        };
        let mut rounds = 0;
        loop {
            rounds += 1;
            let hashed = matches!(source, Source::File(..));
            let index = self
                .run_pipeline(path, &file, source, &opts, &session, &counters)
                .await?;
            if hashed {
                self.cache_index(path, key.clone(), &index).await;
            }
            // First round: the session index (references to the prefixes the host was asked
            // about, zstd), or if the host no longer knows the session (it restarted) the
            // compact index (the prefixes themselves); a repair round sends the full index.
            let mut forms: &[CommitForm] = if rounds == 1 {
                &[CommitForm::Session, CommitForm::Compact]
            } else {
                &[CommitForm::Full]
            };
            let (committed, body) = loop {
                let form = forms[0];
                forms = &forms[1..];
                let index_bytes = form.encode(&index)?;
                let url = self.url(&format!(
                    "/v1/images/{}?assemble={}&form={}&session={session}",
                    opts.name,
                    opts.assemble,
                    form.name()
                ));
                let body = axum::body::Bytes::from(index_bytes);
                let committed = self
                    .request("committing the image", &url, body.len(), &counters, || {
                        self.http.put(&url).body(body.clone())
                    })
                    .await;
                match committed {
                    Err(e) if e.status() == Some(StatusCode::GONE) && !forms.is_empty() => {
                        tracing::info!(error = %e, "the host lost the push session; committing the compact index");
                    }
                    committed => break (committed, body),
                }
            };
            match committed {
                Ok(answer) => {
                    let answer: serde_json::Value = serde_json::from_slice(&answer)
                        .map_err(|e| ClientError::Internal(format!("commit answer: {e}")))?;
                    let c = &counters;
                    let window = *c.send_window.lock().unwrap_or_else(|p| p.into_inner());
                    let summary = PushSummary {
                        name: opts.name.clone(),
                        digest: hex::encode(index.image_digest()),
                        chunking: index.chunking().label(),
                        bytes_total: index.image_len(),
                        blocks_total: index.blocks().len(),
                        blocks_zero: index.zero_blocks(),
                        blocks_distinct: index.distinct_blocks(),
                        // A block sent twice (a repair round) counts once against the reused.
                        blocks_reused: index
                            .distinct_blocks()
                            .saturating_sub(c.blocks_sent.load(Ordering::Relaxed) as usize),
                        bytes_reused: c.bytes_reused.load(Ordering::Relaxed),
                        blocks_sent: c.blocks_sent.load(Ordering::Relaxed) as usize,
                        bytes_raw_sent: c.bytes_raw_sent.load(Ordering::Relaxed),
                        bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
                        bytes_batches: c.bytes_batches.load(Ordering::Relaxed),
                        mean_zstd_level: c.level_sum.load(Ordering::Relaxed) as f64
                            / c.batches.load(Ordering::Relaxed).max(1) as f64,
                        batches: c.batches.load(Ordering::Relaxed),
                        retries: c.retries.load(Ordering::Relaxed),
                        rounds,
                        index_bytes: body.len(),
                        index_cached,
                        send_seconds: window.map_or(0.0, |(s, e)| (e - s).as_secs_f64()),
                        assemble_seconds: answer
                            .get("assemble_seconds")
                            .and_then(serde_json::Value::as_f64),
                        seconds: started.elapsed().as_secs_f64(),
                    };
                    tracing::info!(
                        image = %summary.name,
                        bytes_total = summary.bytes_total,
                        bytes_sent = summary.bytes_sent,
                        blocks_sent = summary.blocks_sent,
                        blocks_reused = summary.blocks_reused,
                        retries = summary.retries,
                        seconds = summary.seconds,
                        "image pushed"
                    );
                    return Ok(summary);
                }
                Err(e)
                    if rounds < 4
                        && (e.status() == Some(StatusCode::CONFLICT)
                            || (rounds == 1
                                && e.status() == Some(StatusCode::UNPROCESSABLE_ENTITY))) =>
                {
                    tracing::warn!(round = rounds, error = %e, "host still lacks blocks; sending them");
                    source = Source::Index {
                        index: Arc::new(index),
                        replay: true,
                    };
                }
                Err(ClientError::Refused {
                    status: StatusCode::CONFLICT,
                    message,
                    ..
                }) => {
                    return Err(ClientError::StillMissing {
                        missing: message,
                        rounds,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_pipeline(
        &self,
        path: &Path,
        file: &Arc<File>,
        source: Source,
        opts: &PushOptions,
        session: &str,
        counters: &Arc<Counters>,
    ) -> Result<BlockIndex, ClientError> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (hash_tx, mut hash_rx) = mpsc::channel::<Vec<(u64, BlockEntry)>>(8);
        let (want_tx, mut want_rx) = mpsc::channel::<Vec<Want>>(8);
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Want>>(opts.connections.max(1) * 2);
        let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
        let replaying = matches!(source, Source::Index { replay: true, .. });

        // Stage 1: hash production.
        let producer = {
            let cancel = cancel.clone();
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || -> Result<BlockIndex, ClientError> {
                let mut pending = Vec::with_capacity(QUERY_CHUNK);
                let send = |pending: &mut Vec<(u64, BlockEntry)>| {
                    if hash_tx.blocking_send(std::mem::take(pending)).is_err() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                };
                match source {
                    Source::Index { index, .. } => {
                        for (offset, b) in index.blocks_with_offsets() {
                            pending.push((offset, *b));
                            if pending.len() == QUERY_CHUNK {
                                send(&mut pending);
                            }
                        }
                        send(&mut pending);
                        Ok(Arc::unwrap_or_clone(index))
                    }
                    Source::File(file, chunking) => {
                        let reader = Cancellable {
                            inner: &*file,
                            cancel: cancel.clone(),
                        };
                        let index = BlockIndex::build(reader, chunking, |offset, b| {
                            pending.push((offset, *b));
                            if pending.len() == QUERY_CHUNK {
                                send(&mut pending);
                            }
                        })
                        .map_err(|source| ClientError::Index { path, source })?;
                        send(&mut pending);
                        Ok(index)
                    }
                }
            })
        };

        let mut tasks: JoinSet<Result<(), ClientError>> = JoinSet::new();
        // Stage 2: hash dispatch.
        {
            let client = self.clone();
            let counters = counters.clone();
            let progress = opts.progress.clone();
            let session = session.to_owned();
            tasks.spawn(async move {
                let mut seen = HashSet::new();
                // Prefixes asked so far: the host numbers them for the session commit.
                let mut asked = 0usize;
                while let Some(entries) = hash_rx.recv().await {
                    let mut done = 0u64;
                    let mut ask = Vec::new();
                    for (offset, b) in entries {
                        if b.is_zero() || !seen.insert(*b.hash()) {
                            // Zero, or a repeat inside the image: nothing to send.
                            done += if replaying { 0 } else { u64::from(b.len()) };
                            continue;
                        }
                        ask.push(Want {
                            offset,
                            len: b.len(),
                            hash: *b.hash(),
                        });
                    }
                    let hashes: Vec<[u8; 32]> = ask.iter().map(|w| w.hash).collect();
                    let bits = if hashes.is_empty() {
                        Vec::new()
                    } else {
                        // First round: prefixes (a quarter of the bytes); a repair round
                        // asks with full hashes.
                        let width = if replaying { 32 } else { PREFIX_LEN };
                        let session = (!replaying).then_some((session.as_str(), asked));
                        asked += hashes.len();
                        client
                            .query_missing(&hashes, width, session, &counters)
                            .await?
                    };
                    let mut wants = Vec::new();
                    for (w, missing) in ask.into_iter().zip(bits) {
                        if missing {
                            wants.push(w);
                        } else if !replaying {
                            counters.blocks_reused.fetch_add(1, Ordering::Relaxed);
                            counters
                                .bytes_reused
                                .fetch_add(u64::from(w.len), Ordering::Relaxed);
                            done += u64::from(w.len);
                        }
                    }
                    if let Some(p) = &progress {
                        p(done);
                    }
                    if !wants.is_empty() && want_tx.send(wants).await.is_err() {
                        break;
                    }
                }
                Ok(())
            });
        }
        // Stage 3: block request dispatch.
        {
            let batch_bytes = opts.batch_bytes.max(1);
            tasks.spawn(async move {
                let mut batch = Vec::new();
                let mut bytes = 0usize;
                while let Some(wants) = want_rx.recv().await {
                    for w in wants {
                        bytes += w.len as usize;
                        batch.push(w);
                        if bytes >= batch_bytes {
                            bytes = 0;
                            if batch_tx.send(std::mem::take(&mut batch)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = batch_tx.send(batch).await;
                }
                Ok(())
            });
        }
        // Stage 4: block dispatch. Compressors (one per core) read, verify and compress
        // batches; senders (one per connection) post them. Between them a bounded queue;
        // the zstd level is steered (crate::steer) from the queue, the compressors' speed
        // and the link's rate.
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>(opts.connections.max(1));
        let ready_rx = Arc::new(tokio::sync::Mutex::new(ready_rx));
        let compressors = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(opts.connections.max(1));
        let steer = Arc::new(if opts.adaptive {
            Steering::adaptive(opts.zstd_level, opts.min_level, opts.max_level, compressors)
        } else {
            Steering::fixed(opts.zstd_level)
        });
        let in_flight = Arc::new(AtomicUsize::new(0));
        for _ in 0..compressors {
            let batch_rx = batch_rx.clone();
            let ready_tx = ready_tx.clone();
            let file = file.clone();
            let path = path.to_path_buf();
            let steer = steer.clone();
            tasks.spawn(async move {
                loop {
                    let Some(batch) = batch_rx.lock().await.recv().await else {
                        return Ok(());
                    };
                    let raw: u64 = batch.iter().map(|w| u64::from(w.len)).sum();
                    let (file, path) = (file.clone(), path.clone());
                    let lvl = steer.level();
                    let compressing = Instant::now();
                    let (body, blocks) =
                        tokio::task::spawn_blocking(move || encode(&file, &path, &batch, lvl))
                            .await
                            .map_err(|e| ClientError::Internal(e.to_string()))??;
                    tracing::debug!(
                        level = lvl,
                        raw,
                        compressed = body.len(),
                        ms = compressing.elapsed().as_millis() as u64,
                        queued = ready_tx.max_capacity() - ready_tx.capacity(),
                        "batch compressed"
                    );
                    steer.compressed(
                        lvl,
                        body.len(),
                        compressing.elapsed().as_secs_f64(),
                        ready_tx.capacity() == 0,
                    );
                    let ready = Ready {
                        body: axum::body::Bytes::from(body),
                        blocks,
                        raw,
                        level: lvl,
                    };
                    if ready_tx.send(ready).await.is_err() {
                        return Ok(());
                    }
                }
            });
        }
        drop(ready_tx);
        for _ in 0..opts.connections.max(1) {
            let client = self.clone();
            let counters = counters.clone();
            let ready_rx = ready_rx.clone();
            let progress = opts.progress.clone();
            let steer = steer.clone();
            let in_flight = in_flight.clone();
            tasks.spawn(async move {
                let url = client.url("/v1/blocks");
                loop {
                    let next = {
                        let mut rx = ready_rx.lock().await;
                        match rx.try_recv() {
                            Ok(r) => Some(r),
                            Err(mpsc::error::TryRecvError::Disconnected) => None,
                            Err(mpsc::error::TryRecvError::Empty) => {
                                let waiting = Instant::now();
                                let next = rx.recv().await;
                                // A connection that had to wait for a batch (not just for
                                // the next one being handed over) means compression is the
                                // bottleneck: compress faster.
                                if counters.batches.load(Ordering::Relaxed) > 0
                                    && waiting.elapsed() >= STARVED
                                {
                                    steer.starved();
                                }
                                next
                            }
                        }
                    };
                    let Some(ready) = next else {
                        return Ok(());
                    };
                    let body = ready.body;
                    let start = Instant::now();
                    let sharing = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                    let sent = client
                        .request("sending blocks", &url, body.len(), &counters, || {
                            client.http.post(&url).body(body.clone())
                        })
                        .await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    sent?;
                    steer.sent(body.len(), start.elapsed().as_secs_f64(), sharing);
                    counters.note_send(start, Instant::now());
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                    counters
                        .bytes_batches
                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                    counters
                        .blocks_sent
                        .fetch_add(ready.blocks as u64, Ordering::Relaxed);
                    counters
                        .bytes_raw_sent
                        .fetch_add(ready.raw, Ordering::Relaxed);
                    counters
                        .level_sum
                        .fetch_add(ready.level as u64, Ordering::Relaxed);
                    if let Some(p) = &progress {
                        p(ready.raw);
                    }
                }
            });
        }
        drop(batch_rx);

        let mut failure = None;
        while let Some(joined) = tasks.join_next().await {
            let result = joined.unwrap_or_else(|e| Err(ClientError::Internal(e.to_string())));
            if let Err(e) = result {
                failure.get_or_insert(e);
                cancel.store(true, Ordering::Relaxed);
                tasks.abort_all();
            }
        }
        let produced = producer
            .await
            .map_err(|e| ClientError::Internal(e.to_string()))?;
        match failure {
            Some(e) => Err(e),
            None => produced,
        }
    }
}

/// Reads the blocks of a batch from the file, checks them against their hashes, and
/// encodes the batch. Returns the body and the number of blocks.
fn encode(
    file: &File,
    path: &Path,
    batch: &[Want],
    level: i32,
) -> Result<(Vec<u8>, usize), ClientError> {
    let total: usize = batch.iter().map(|w| w.len as usize).sum();
    let mut data = vec![0u8; total];
    let mut at = 0;
    for w in batch {
        let buf = &mut data[at..at + w.len as usize];
        file.read_exact_at(buf, w.offset)
            .map_err(|source| ClientError::File {
                path: path.to_path_buf(),
                source,
            })?;
        if sha256(buf) != w.hash {
            return Err(ClientError::FileChanged {
                path: path.to_path_buf(),
                offset: w.offset,
            });
        }
        at += w.len as usize;
    }
    let mut at = 0;
    let blocks: Vec<(&[u8; 32], &[u8])> = batch
        .iter()
        .map(|w| {
            let slice = &data[at..at + w.len as usize];
            at += w.len as usize;
            (&w.hash, slice)
        })
        .collect();
    let body = wire::encode_batch(blocks.iter().copied(), level)
        .map_err(|e| ClientError::Internal(format!("zstd compression failed: {e}")))?;
    Ok((body, batch.len()))
}

/// A push session's id: unique, not secret (the host's token guards the requests).
fn new_session_id() -> String {
    use sha2::Digest;
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let digest = sha2::Sha256::new()
        .chain_update(std::process::id().to_be_bytes())
        .chain_update(COUNT.fetch_add(1, Ordering::Relaxed).to_be_bytes())
        .chain_update(now.as_nanos().to_be_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

/// Indexes a file on a blocking thread.
pub async fn index_file(path: &Path, chunking: Chunking) -> Result<BlockIndex, ClientError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = File::open(&path).map_err(|source| ClientError::File {
            path: path.clone(),
            source,
        })?;
        BlockIndex::build(file, chunking, |_, _| {})
            .map_err(|source| ClientError::Index { path, source })
    })
    .await
    .map_err(|e| ClientError::Internal(e.to_string()))?
}
