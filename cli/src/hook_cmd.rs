//! `certo hook`: URLs that receive a signed JSON event when a run ends (delivered by
//! `certo serve`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{Global, print_json};
use certo_orchestrator::app::hooks;

#[derive(Debug, Args)]
pub struct HookArgs {
    #[command(subcommand)]
    pub command: HookCommand,
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// Add a hook. Its secret (the HMAC key of X-Certo-Signature) comes from --secret-file,
    /// or is made and printed once.
    Add {
        url: String,
        /// A file whose first line is the secret (at least 16 bytes).
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List the hooks with their deliveries (delivered, pending, failed).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a hook: nothing more is sent to it (its deliveries stay recorded).
    Rm { id: i64 },
    /// The deliveries, newest first: state, attempts, the last status or error.
    Deliveries {
        #[arg(long)]
        hook: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(g: &Global, a: HookArgs) -> anyhow::Result<ExitCode> {
    let store = g.store().await?;
    match a.command {
        HookCommand::Add {
            url,
            secret_file,
            json,
        } => {
            let given = match &secret_file {
                Some(f) => Some(super::secret(None, Some(f), "hook secret")?),
                None => None,
            };
            let (id, secret) = hooks::add(&store, &url, given).await?;
            let shown = secret_file.is_none();
            if json {
                let mut v = json!({"hook": id, "url": url});
                if shown {
                    v["secret"] = json!(secret);
                }
                print_json(&v)?;
            } else if shown {
                println!("hook {id} added: {url}; its secret (shown once):");
                println!("{secret}");
            } else {
                println!("hook {id} added: {url}");
            }
            Ok(ExitCode::SUCCESS)
        }
        HookCommand::Ls { json } => {
            let list = store.hooks().await?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no hooks: `certo hook add URL`");
            } else {
                for h in list {
                    println!(
                        "hook {:<3} {:<50} delivered {}, pending {}, failed {}{}",
                        h.id,
                        h.url,
                        h.delivered,
                        h.pending,
                        h.failed,
                        if h.removed_at.is_some() {
                            "  (removed)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        HookCommand::Rm { id } => {
            if !store.remove_hook(id).await? {
                return Err(
                    certo_orchestrator::app::OpError::NotFound(format!("no hook {id}")).into(),
                );
            }
            println!("hook {id} removed");
            Ok(ExitCode::SUCCESS)
        }
        HookCommand::Deliveries { hook, limit, json } => {
            let list = store.deliveries(hook, limit.clamp(1, 10_000)).await?;
            if json {
                print_json(&list)?;
            } else {
                for d in list {
                    println!(
                        "hook {:<3} run {:<6} {:<9} attempts {}  {}",
                        d.hook_id,
                        d.run_id,
                        d.state,
                        d.attempts,
                        d.last_error
                            .or_else(|| d.last_status.map(|s| format!("answered {s}")))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
