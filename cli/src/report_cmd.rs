//! `certo report`: the nightly report of the latest sweep, as one self-contained HTML file
//! (`--html DIR`) or JSON (`--json`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{Global, print_json};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("form").required(true).args(["html", "json"])))]
pub struct ReportArgs {
    /// Write DIR/index.html: the newly failing cells first with what changed since their
    /// last good night, the matrix, every cell worst first (style inline, no script).
    #[arg(long, value_name = "DIR")]
    pub html: Option<PathBuf>,
    /// Print the report's content as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &Global, a: ReportArgs) -> anyhow::Result<ExitCode> {
    let ctx = g.context()?;
    let store = ctx.store().await?;
    if a.json {
        print_json(&certo_orchestrator::web::report::data(&ctx, store).await?)?;
    }
    if let Some(dir) = &a.html {
        let path = certo_orchestrator::web::report::write_html(&ctx, store, dir).await?;
        if !a.json {
            println!("report written to {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
