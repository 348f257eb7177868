//! `certo transfer plan|push`: delta transfer of an image file to a host's repository.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use certo_transfer::client::ClientError;
use certo_transfer::{Chunking, Client, IndexCache, PushOptions, RetryPolicy, Token};
use clap::{Args, Subcommand, ValueEnum};

use super::{EXIT_FAILURE, EXIT_INVALID, Global, print_json};

#[derive(Debug, Args)]
pub struct TransferArgs {
    #[command(subcommand)]
    pub command: TransferCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChunkingArg {
    /// Fixed-size blocks (ext4 images).
    Fixed,
    /// Content-defined chunks (tar-like artefacts).
    Cdc,
}

#[derive(Debug, Args)]
pub struct Target {
    /// The host's agent, e.g. http://host:7310.
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// The host's token. Prefer CERTO_TOKEN or --token-file: a value on the command line
    /// is visible to every user through `ps`.
    #[arg(
        long,
        env = "CERTO_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// A file whose first line is the host's token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How to cut the image into blocks.
    #[arg(long, value_enum, default_value = "fixed")]
    pub chunking: ChunkingArg,
    /// Block size (fixed) or average chunk size (cdc), in bytes.
    #[arg(long, value_name = "BYTES")]
    pub block_size: Option<u32>,
    /// Attempts per request before giving up.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub retries: u32,
    /// Where the indexes of sent files are kept, so that a file pushed again unchanged (to
    /// this or another host) is not hashed again. Default: DATA_DIR/index-cache.
    #[arg(long, value_name = "DIR")]
    pub index_cache: Option<PathBuf>,
    /// Hash the file without looking at or filling the index cache.
    #[arg(long, conflicts_with = "index_cache")]
    pub no_index_cache: bool,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TransferCommand {
    /// Index an image locally and report the index's size and the indexing speed.
    Index {
        /// The image file.
        file: PathBuf,
        /// How to cut the image into blocks.
        #[arg(long, value_enum, default_value = "fixed")]
        chunking: ChunkingArg,
        /// Block size (fixed) or average chunk size (cdc), in bytes.
        #[arg(long, value_name = "BYTES")]
        block_size: Option<u32>,
        /// Write the encoded index to this file.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Say how many blocks and bytes a push would send, sending nothing.
    Plan {
        /// The image file.
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Send the blocks the host lacks, then mark the image complete there.
    Push {
        /// The image file.
        file: PathBuf,
        #[command(flatten)]
        target: Target,
        /// Name of the image on the host (default: the file name without a final `.img`).
        #[arg(long)]
        name: Option<String>,
        /// Concurrent connections for blocks.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// A fixed zstd level for block batches (1-19). Default: start at 3 and adapt between
        /// 1 and 16 so that compression keeps pace with the link.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: Option<i32>,
        /// Uncompressed bytes per batch.
        #[arg(long, default_value_t = 4 << 20)]
        batch_bytes: usize,
        /// Leave the image as blocks on the host (do not write NAME.img).
        #[arg(long)]
        no_assemble: bool,
    },
}

fn chunking(kind: ChunkingArg, size: Option<u32>) -> anyhow::Result<Chunking> {
    Ok(match kind {
        ChunkingArg::Fixed => Chunking::Fixed {
            block_size: size.unwrap_or(certo_transfer::DEFAULT_BLOCK_SIZE),
        },
        ChunkingArg::Cdc => Chunking::ContentDefined {
            avg: size.unwrap_or(16384),
        },
    }
    .validate()?)
}

impl Target {
    fn client(&self, g: &Global) -> anyhow::Result<(Client, Chunking)> {
        let secret = super::secret(
            self.token.as_deref(),
            self.token_file.as_deref(),
            "host token",
        )?;
        let token = Token::new(&secret).map_err(|why| anyhow::anyhow!("the host token: {why}"))?;
        let retry = RetryPolicy {
            attempts: self.retries.max(1),
            ..RetryPolicy::default()
        };
        let chunking = chunking(self.chunking, self.block_size)?;
        let mut client = Client::new(&self.to, token, retry)?;
        if !self.no_index_cache {
            let dir = self
                .index_cache
                .clone()
                .unwrap_or_else(|| g.data_dir().join("index-cache"));
            client = client.with_index_cache(IndexCache::new(dir));
        }
        Ok((client, chunking))
    }
}

fn default_name(file: &Path) -> anyhow::Result<String> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = name.strip_suffix(".img").unwrap_or(&name).to_string();
    certo_transfer::wire::validate_name(&name)
        .map(str::to_string)
        .with_context(|| {
            format!(
                "the file name of {} cannot be an image name; pass --name",
                file.display()
            )
        })
}

fn exit_for(e: &ClientError) -> ExitCode {
    match e {
        ClientError::Wire(_) | ClientError::File { .. } | ClientError::Index { .. } => {
            ExitCode::from(EXIT_INVALID)
        }
        ClientError::Refused { status, .. } if status.is_client_error() => {
            ExitCode::from(EXIT_INVALID)
        }
        _ => ExitCode::from(EXIT_FAILURE),
    }
}

pub async fn run(g: &Global, args: TransferArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TransferCommand::Index {
            file,
            chunking: kind,
            block_size,
            output,
            json,
        } => {
            let chunking = chunking(kind, block_size)?;
            let started = std::time::Instant::now();
            let index = match certo_transfer::client::index_file(&file, chunking).await {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(exit_for(&e));
                }
            };
            let seconds = started.elapsed().as_secs_f64();
            if let Some(out) = &output {
                std::fs::write(out, index.to_bytes())
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            let len = index.image_len();
            let report = serde_json::json!({
                "file": file,
                "chunking": index.chunking().label(),
                "digest": hex::encode(index.image_digest()),
                "bytes_total": len,
                "blocks_total": index.blocks().len(),
                "blocks_zero": index.zero_blocks(),
                "blocks_distinct": index.distinct_blocks(),
                "index_bytes": index.encoded_len(),
                "index_share": index.encoded_len() as f64 / len.max(1) as f64,
                "seconds": seconds,
                "gb_per_second": len as f64 / seconds / 1e9,
            });
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "{}: {} bytes, {} blocks ({} zero, {} distinct), index {} bytes ({:.2} % of the image), {:.2} GB/s",
                    file.display(),
                    len,
                    index.blocks().len(),
                    index.zero_blocks(),
                    index.distinct_blocks(),
                    index.encoded_len(),
                    100.0 * index.encoded_len() as f64 / len.max(1) as f64,
                    len as f64 / seconds / 1e9
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TransferCommand::Plan { file, target } => {
            let (client, chunking) = target.client(g)?;
            match client.plan(&file, chunking).await {
                Ok(plan) => {
                    if target.json {
                        print_json(&plan)?;
                    } else {
                        println!(
                            "{}: {} blocks ({} zero, {} distinct); the host has {} ({} bytes); \
                             would send {} blocks, {} bytes before compression, plus a {}-byte index",
                            file.display(),
                            plan.blocks_total,
                            plan.blocks_zero,
                            plan.blocks_distinct,
                            plan.blocks_reused,
                            plan.bytes_reused,
                            plan.blocks_to_send,
                            plan.bytes_to_send,
                            plan.index_bytes
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(exit_for(&e))
                }
            }
        }
        TransferCommand::Push {
            file,
            target,
            name,
            connections,
            zstd_level,
            batch_bytes,
            no_assemble,
        } => {
            let (client, chunking) = target.client(g)?;
            let name = match name {
                Some(n) => n,
                None => default_name(&file)?,
            };
            let len = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            let bar = bytes_progress(len, &name);
            let mut opts = PushOptions::new(name);
            opts.chunking = chunking;
            opts.connections = connections.max(1);
            if let Some(level) = zstd_level {
                opts.zstd_level = level;
                opts.adaptive = false;
            }
            opts.batch_bytes = batch_bytes.max(4096);
            opts.assemble = !no_assemble;
            let progress_bar = bar.clone();
            opts.progress = Some(Arc::new(move |n| progress_bar.inc(n)));
            let result = client.push(&file, opts).await;
            bar.finish_and_clear();
            match result {
                Ok(summary) => {
                    if target.json {
                        print_json(&summary)?;
                    } else {
                        println!(
                            "{}: {} of {} bytes sent ({} blocks sent, {} reused, {} zero) in {:.2} s",
                            summary.name,
                            summary.bytes_sent,
                            summary.bytes_total,
                            summary.blocks_sent,
                            summary.blocks_reused,
                            summary.blocks_zero,
                            summary.seconds
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(exit_for(&e))
                }
            }
        }
    }
}

/// A byte progress bar on stderr when it is a terminal.
fn bytes_progress(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
