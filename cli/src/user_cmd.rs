//! `certo user`: the people who use the API, the remote CLI and the dashboard.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::json;

use super::{Global, print_json};
use certo_orchestrator::app::users;
use certo_orchestrator::store::Role;

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(subcommand)]
    pub command: UserCommand,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user and make their token: printed once (or written to --token-file, mode
    /// 0600); only its SHA-256 is stored.
    Add {
        /// [a-z][a-z0-9._-]*, at most 32 characters.
        name: String,
        /// certifier (submits; reruns and cancels their own patches) or admin (also hosts,
        /// quarantine, sweeps, users, and every patch).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List the users: role, created, revoked, last seen.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a user's token: it acts for nothing any more (the user's patches stay theirs).
    Revoke { name: String },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

pub async fn run(g: &Global, a: UserArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let store = ctx.store().await?;
    match a.command {
        UserCommand::Add {
            name,
            role,
            token_file,
            json,
        } => {
            // The file first (mode 0600, never an existing one), so a token is never made
            // that nobody can read.
            let file = match &token_file {
                Some(path) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    Some(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    )
                }
                None => None,
            };
            let token = match users::add(store, &name, role).await {
                Ok(t) => t,
                Err(e) => {
                    if let Some(path) = &token_file {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(e.into());
                }
            };
            if let (Some(mut f), Some(path)) = (file, &token_file) {
                use std::io::Write;
                writeln!(f, "{token}").with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                let mut v = json!({"name": name, "role": role});
                if token_file.is_none() {
                    v["token"] = json!(token);
                }
                print_json(&v)?;
            } else if let Some(path) = &token_file {
                println!(
                    "user {name} ({role}) added; token written to {}",
                    path.display()
                );
            } else {
                println!(
                    "user {name} ({role}) added; their token (shown once, only its digest is kept):"
                );
                println!("{token}");
            }
            Ok(ExitCode::SUCCESS)
        }
        UserCommand::Ls { json } => {
            let list = users::list(store).await?;
            if json {
                print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no users: `certo user add NAME --role certifier|admin`");
            }
            for u in &list {
                let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or_else(
                        || "-".to_owned(),
                        |t| t.format("%Y-%m-%d %H:%M").to_string(),
                    )
                };
                println!(
                    "{:<20} {:<10} added {}  last seen {}{}",
                    u.name,
                    u.role,
                    u.created_at.format("%Y-%m-%d %H:%M"),
                    when(u.last_seen_at),
                    u.revoked_at
                        .map(|t| format!("  REVOKED {}", t.format("%Y-%m-%d %H:%M")))
                        .unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        UserCommand::Revoke { name } => {
            users::revoke(store, &name).await?;
            println!("user {name} revoked: their token acts for nothing any more");
            Ok(ExitCode::SUCCESS)
        }
    }
}
