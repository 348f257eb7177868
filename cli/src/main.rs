//! The `certo` command line: argument definitions and one module per command.
//! Each command is a few lines over the library.

mod agent_cmd;
mod bench_cmd;
mod bench_dashboard;
mod bench_engine;
mod bench_image;
mod bench_records;
mod bench_sweep;
mod bench_vm;
mod catalogue_cmd;
mod db_cmd;
mod demo_cmd;
mod hook_cmd;
pub mod image_cmd;
mod patch_cmd;
mod remote;
mod report_cmd;
mod run_cmd;
mod serve_cmd;
mod stack_cmd;
mod sweep_cmd;
mod transfer_cmd;
mod user_cmd;
mod vm_cmd;
mod workflow_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use certo_orchestrator::catalogue::Catalogue;
use certo_orchestrator::store::{Location, Store, default_data_dir};

/// Exit status when a command ran but found errors in its input (invalid
/// records, conflicts): the input must change, retrying will not help.
pub const EXIT_INVALID: u8 = 1;
/// Exit status when Certo itself could not do its work (store unreachable, I/O).
pub const EXIT_FAILURE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "certo",
    version,
    about = "Certifies grid-middleware patches: validates patch records, stores them, and (as the project grows) builds, ships and boots the VM images that test them",
    long_about = None,
    after_help = "Without --database-url or DATABASE_URL, Certo starts its own PostgreSQL cluster under the data directory and reuses it."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Where Certo keeps its state (the embedded PostgreSQL cluster, later images and caches).
    /// Default: /var/lib/certo as root, else $XDG_DATA_HOME/certo or ~/.local/share/certo.
    #[arg(long, global = true, env = "CERTO_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// An existing PostgreSQL database to use instead of the embedded cluster.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// The catalogue of releases, platforms and node types (default: the built-in fixture catalogue).
    #[arg(long, global = true, env = "CERTO_CATALOGUE", value_name = "FILE")]
    pub catalogue: Option<PathBuf>,
    /// The package repository root that platform recipes and patch sources name
    /// (default: the fixture world, built from fixtures/world under the data directory).
    #[arg(long, global = true, env = "CERTO_REPOS", value_name = "DIR")]
    pub repos: Option<PathBuf>,
    /// Talk to this orchestrator's API (`certo serve`) instead of the local store: `submit`,
    /// `patches`, `show`, `runs`, `rerun`, `cancel` and `sweep show`, with a user token from
    /// CERTO_TOKEN or --user-token-file.
    #[arg(long, global = true, env = "CERTO_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The file holding the user token for --server (its first line).
    #[arg(long, global = true, env = "CERTO_TOKEN_FILE", value_name = "FILE")]
    pub user_token_file: Option<PathBuf>,
    /// More log output (repeat for more); CERTO_LOG takes a tracing filter instead.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check patch record files (YAML, JSON or tracker text) without storing anything.
    Validate(patch_cmd::ValidateArgs),
    /// Validate and store patch records; all files are stored in one transaction or not at all.
    Submit(patch_cmd::SubmitArgs),
    /// List stored patches (current revisions unless --state or --all-revisions).
    Patches(patch_cmd::PatchesArgs),
    /// Show one patch: its record, its revisions and what happened to it.
    Show(patch_cmd::ShowArgs),
    /// Show the catalogue: releases, platforms and node types.
    Catalogue(catalogue_cmd::CatalogueArgs),
    /// Workflows as data: check workflow files (`certo workflow check`).
    Workflow(workflow_cmd::WorkflowArgs),
    /// Manage the embedded PostgreSQL cluster.
    Db(db_cmd::DbArgs),
    /// Run Certo's main job on the embedded default: store the fixture patches and list them.
    Demo(demo_cmd::DemoArgs),
    /// Measure Certo's speed.
    Bench(bench_cmd::BenchArgs),
    /// Build, list and clean up VM images (layered, cached by a digest of their inputs).
    Image(image_cmd::ImageArgs),
    /// Run the orchestrator's HTTP API: host registration, heartbeats, the guest harness, the testbed.
    Serve(serve_cmd::ServeArgs),
    /// Manage hosts (hypervisor machines running `certo agent`).
    Host(serve_cmd::HostArgs),
    /// The testbed registry: shared services and patch slices, with health.
    Testbed(serve_cmd::TestbedArgs),
    /// Boot a VM from an image on a host and run its tests.
    Vm(vm_cmd::VmArgs),
    /// Serve a host's image repository (the host side of transfers).
    Agent(agent_cmd::AgentArgs),
    /// Delta-transfer an image to a host's repository: plan, push.
    Transfer(transfer_cmd::TransferArgs),
    /// Run certification steps: claim them from the store, act, record (several workers on
    /// several machines share one store).
    Worker(run_cmd::WorkerArgs),
    /// List certification runs with their verdicts.
    Runs(run_cmd::RunsArgs),
    /// Cancel a patch's running certification (its VMs are still torn down).
    Cancel(run_cmd::CancelArgs),
    /// Certify a patch again (all targets, or --failed ones).
    Rerun(run_cmd::RerunArgs),
    /// The nightly regression sweeps over the release matrix: run one now, list, show.
    Sweep(sweep_cmd::SweepArgs),
    /// The nightly report of the latest sweep: self-contained HTML (--html DIR) or --json.
    Report(report_cmd::ReportArgs),
    /// Verdict hooks: URLs that receive a signed JSON event when a run ends.
    Hook(hook_cmd::HookArgs),
    /// The people who use the API: add one (with a role; their token is printed once), list,
    /// revoke.
    User(user_cmd::UserArgs),
    /// Start this machine's stack in the background: the store, `certo serve`, a host agent, workers.
    Up(stack_cmd::UpArgs),
    /// Stop what `certo up` started.
    Down(stack_cmd::DownArgs),
    /// Show the stack: its processes, the store, hosts and the engine's queue.
    Status(stack_cmd::StatusArgs),
}

impl Global {
    /// The data directory, absolute (processes started from it, such as `certo up`'s agent,
    /// and the files handed to libvirt must not depend on the working directory).
    pub fn data_dir(&self) -> PathBuf {
        let dir = self.data_dir.clone().unwrap_or_else(default_data_dir);
        std::path::absolute(&dir).unwrap_or(dir)
    }

    pub fn location(&self) -> Location {
        match &self.database_url {
            Some(url) if !url.is_empty() => Location::Url(url.clone()),
            _ => Location::Embedded(self.data_dir()),
        }
    }

    pub async fn store(&self) -> anyhow::Result<Store> {
        Ok(Store::open(&self.location()).await?)
    }

    /// The plain settings the application layer is built from.
    pub fn settings(&self) -> certo_orchestrator::app::Settings {
        certo_orchestrator::app::Settings {
            data_dir: absolute(self.data_dir()),
            database_url: self.database_url.clone().filter(|u| !u.is_empty()),
            catalogue: self.catalogue.clone().map(absolute),
            // Repository paths become file:// URLs inside the tools: they must be absolute.
            repos: self.repos.clone().map(absolute),
        }
    }

    /// The application context over these settings.
    pub fn context(&self) -> anyhow::Result<certo_orchestrator::app::Context> {
        Ok(certo_orchestrator::app::Context::new(self.settings())?)
    }

    pub fn catalogue(&self) -> anyhow::Result<Catalogue> {
        Ok(match &self.catalogue {
            Some(path) => Catalogue::from_file(path)?,
            None => Catalogue::builtin(),
        })
    }
}

/// A path from the command line made absolute against the working directory (as it is;
/// nothing is resolved or required to exist).
fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// The fixture folder shipped with the source tree.
pub fn default_fixtures_dir() -> PathBuf {
    certo_orchestrator::world::fixtures_dir()
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("CERTO_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::new(f),
        _ => EnvFilter::new(match verbose {
            0 => "warn",
            1 => "info,sqlx=warn",
            2 => "debug,sqlx=info",
            _ => "trace",
        }),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `certo patches --json | head` closes stdout early: end quietly with the status a shell
/// gives a process killed by SIGPIPE (128 + 13), not with a panic message.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// Runs the command line; the binary's `main` is this and nothing else.
pub fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_status(&e))
        }
    }
}

/// The one mapping from an error to the exit status: input that was refused (it must
/// change; retrying will not help) is [`EXIT_INVALID`]; anything else — the store, a host,
/// the infrastructure, Certo itself — is [`EXIT_FAILURE`].
pub fn exit_status(e: &anyhow::Error) -> u8 {
    use certo_orchestrator::app::OpError;
    use certo_orchestrator::vmrun::VmRunError;
    for cause in e.chain() {
        if matches!(
            cause.downcast_ref::<OpError>(),
            Some(OpError::Refused(_) | OpError::NotFound(_) | OpError::Forbidden(_))
        ) || cause
            .downcast_ref::<VmRunError>()
            .is_some_and(VmRunError::is_refusal)
        {
            return EXIT_INVALID;
        }
    }
    EXIT_FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Validate(args) => patch_cmd::validate(g, args),
        Command::Submit(args) => patch_cmd::submit(g, args).await,
        Command::Patches(args) => patch_cmd::patches(g, args).await,
        Command::Show(args) => patch_cmd::show(g, args).await,
        Command::Catalogue(args) => catalogue_cmd::run(g, args),
        Command::Workflow(args) => workflow_cmd::run(args),
        Command::Db(args) => db_cmd::run(g, args).await,
        Command::Demo(args) => demo_cmd::run(g, args).await,
        Command::Bench(args) => bench_cmd::run(g, args).await,
        Command::Image(args) => image_cmd::run(g, args).await,
        Command::Serve(args) => serve_cmd::serve(g, args).await,
        Command::Host(args) => serve_cmd::host(g, args).await,
        Command::Testbed(args) => serve_cmd::testbed(g, args).await,
        Command::Vm(args) => vm_cmd::run(g, args).await,
        Command::Agent(args) => agent_cmd::run(g, args).await,
        Command::Transfer(args) => transfer_cmd::run(g, args).await,
        Command::Worker(args) => run_cmd::worker(g, args).await,
        Command::Runs(args) => run_cmd::list(g, args).await,
        Command::Cancel(args) => run_cmd::cancel(g, args).await,
        Command::Rerun(args) => run_cmd::rerun(g, args).await,
        Command::Sweep(args) => sweep_cmd::run(g, args).await,
        Command::User(args) => user_cmd::run(g, args).await,
        Command::Hook(args) => hook_cmd::run(g, args).await,
        Command::Report(args) => report_cmd::run(g, args).await,
        Command::Up(args) => stack_cmd::up(g, args).await,
        Command::Down(args) => stack_cmd::down(g, args).await,
        Command::Status(args) => stack_cmd::status(g, args).await,
    }
}

/// The median of a set of measurements (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Text from outside (a guest's log, a serial console, a reason it gave) made safe for a
/// terminal: control characters but newline and tab are shown escaped (`\u{1b}`), so no
/// escape sequence reaches the terminal.
pub(crate) fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A secret given as a file (`--token-file`: its first line) or a value (`--token`, or
/// the environment variable its flag reads). A file or the environment keeps it out of
/// `ps`; the value on the command line is for quick trials only.
pub(crate) fn secret(
    value: Option<&str>,
    file: Option<&std::path::Path>,
    what: &str,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let s = match (file, value) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        (None, Some(v)) => v.to_owned(),
        (None, None) => anyhow::bail!(
            "no {what}: give --token-file FILE or set CERTO_TOKEN (--token also works, but \
             puts the secret where `ps` shows it)"
        ),
    };
    anyhow::ensure!(!s.is_empty(), "the {what} is empty");
    Ok(s)
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A progress bar on stderr when it is a terminal, hidden otherwise.
pub(crate) fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || len < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
