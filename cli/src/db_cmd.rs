//! `certo db status|start|stop|url`: the embedded PostgreSQL cluster.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::{EXIT_FAILURE, Global, print_json};
use certo_orchestrator::store::{self, Cluster, Location, Store};

#[derive(Debug, Args)]
pub struct DbArgs {
    #[command(subcommand)]
    pub command: DbCommand,
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Say where the store is and whether it answers.
    Status {
        /// Print the status as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Start the embedded cluster (initialising it on first use) and apply the migrations.
    Start,
    /// Stop the embedded cluster.
    Stop,
    /// Print the URL of the store's database (for psql or DATABASE_URL).
    Url,
}

pub async fn run(g: &Global, args: DbArgs) -> anyhow::Result<ExitCode> {
    let location = g.location();
    match (args.command, &location) {
        (DbCommand::Status { json }, Location::Url(url)) => {
            let reachable = Store::connect(url).await;
            let answer = json!({
                "embedded": false,
                "url": store::redact(url),
                "running": reachable.is_ok(),
                "error": reachable.as_ref().err().map(|e| e.to_string()),
            });
            if json {
                print_json(&answer)?;
            } else {
                println!("store:    external database {}", store::redact(url));
                match reachable {
                    Ok(_) => println!("state:    answering, schema up to date"),
                    Err(e) => println!("state:    not reachable: {e}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        (DbCommand::Status { json }, Location::Embedded(dir)) => {
            let status = Cluster::new(dir)?.status();
            if json {
                print_json(&json!({"embedded": true, "data_dir": dir, "cluster": status}))?;
            } else {
                println!(
                    "store:    embedded PostgreSQL {} under {}",
                    status
                        .server_version
                        .as_deref()
                        .unwrap_or("(not initialised)"),
                    dir.display()
                );
                println!(
                    "state:    {}",
                    match (status.running, status.pid) {
                        (true, Some(pid)) => format!("running (pid {pid})"),
                        (true, None) => "running".to_string(),
                        (false, _) if status.initialised => "stopped".to_string(),
                        (false, _) => "not initialised (starts on first use)".to_string(),
                    }
                );
                println!("pgdata:   {}", status.pgdata.display());
                println!("socket:   {}", status.socket_dir.display());
                println!("log:      {}", status.log_file.display());
                println!("url:      {}", status.url);
            }
            Ok(ExitCode::SUCCESS)
        }
        (DbCommand::Start, _) => {
            g.store().await.context("cannot start the store")?;
            println!("store ready: {}", describe(&location)?);
            Ok(ExitCode::SUCCESS)
        }
        (DbCommand::Url, Location::Url(url)) => {
            println!("{url}");
            Ok(ExitCode::SUCCESS)
        }
        (DbCommand::Url, Location::Embedded(dir)) => {
            println!("{}", Cluster::new(dir)?.url(store::cluster::DATABASE));
            Ok(ExitCode::SUCCESS)
        }
        (DbCommand::Stop, Location::Url(_)) => {
            eprintln!(
                "error: the store is an external database (DATABASE_URL); Certo only stops its own embedded cluster"
            );
            Ok(ExitCode::from(EXIT_FAILURE))
        }
        (DbCommand::Stop, Location::Embedded(dir)) => {
            let cluster = Cluster::new(dir)?;
            if cluster.stop()? {
                println!("stopped the embedded cluster under {}", dir.display());
            } else {
                println!(
                    "the embedded cluster under {} was not running",
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn describe(location: &Location) -> anyhow::Result<String> {
    Ok(match location {
        Location::Url(url) => store::redact(url),
        Location::Embedded(dir) => Cluster::new(dir)?.url(store::cluster::DATABASE),
    })
}
