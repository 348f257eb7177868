//! `certo up`, `certo down`, `certo status`: the embedded stack of one machine — the store,
//! `certo serve`, a host agent over libvirt, and workers — started in the background, each
//! a process of its own with its log under DATA/stack/, and stopped again.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Global, print_json};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Steps each worker runs at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// VMs the host agent runs at once.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// The libvirt connection the agent boots VMs through (test:///default: simulated).
    #[arg(long, default_value = "qemu:///system", value_name = "URI")]
    pub libvirt: String,
    /// Where `certo serve` listens.
    #[arg(long, default_value = "127.0.0.1:7300", value_name = "ADDR")]
    pub listen: String,
    /// The host's name.
    #[arg(long, default_value = "local")]
    pub host: String,
    /// Memory the host offers its VMs (MiB).
    #[arg(long, default_value_t = 4096)]
    pub memory_mib: u64,
    /// The workers start no scheduled run (the nightly sweep); `certo sweep run` still works.
    #[arg(long)]
    pub no_schedules: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Leave the embedded store running.
    #[arg(long)]
    pub keep_store: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

/// What `certo up` started, kept in DATA/stack/stack.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stack {
    serve: Proc,
    agent: Proc,
    workers: Vec<Proc>,
    /// The testbed's shared services (the top BDII every slice uses and none may take over).
    #[serde(default)]
    shared: Vec<Proc>,
    host: String,
    started_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Proc {
    pid: i32,
    url: Option<String>,
    log: PathBuf,
}

/// The shared top BDII `certo up` runs for the testbed.
pub const SHARED_BDII: &str = "testbed-bdii.certo";

fn stack_dir(g: &Global) -> PathBuf {
    g.data_dir().join("stack")
}

fn read_stack(g: &Global) -> Option<Stack> {
    let bytes = std::fs::read(stack_dir(g).join("stack.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
        && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// The global options a child needs to see the same state.
fn global_args(g: &Global) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["--data-dir".into(), g.data_dir().into()];
    if let Some(c) = &g.catalogue {
        v.push("--catalogue".into());
        v.push(c.into());
    }
    if let Some(r) = &g.repos {
        v.push("--repos".into());
        v.push(r.into());
    }
    v
}

/// Starts `certo ARGS` in the background (its own process group, output to `log`); with
/// `wait_line`, waits for its first `listening on URL` line and returns the URL.
fn spawn(
    g: &Global,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
    wait_line: bool,
) -> anyhow::Result<Proc> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the certo executable")?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(global_args(g))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    if std::env::var_os("CERTO_LOG").is_none() {
        cmd.env("CERTO_LOG", "info,sqlx=warn");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting certo {}", args.join(" ")))?;
    let pid = child.id() as i32;
    // Not waited for: it outlives this command.
    std::mem::forget(child);
    let mut url = None;
    if wait_line {
        let started = Instant::now();
        loop {
            if let Ok(f) = std::fs::File::open(log) {
                for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                    if let Some(u) = line.trim().strip_prefix("listening on ") {
                        url = Some(u.to_owned());
                    }
                }
            }
            if url.is_some() {
                break;
            }
            if !alive(pid) {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                bail!(
                    "certo {} ended at once:\n{}",
                    args.first().unwrap_or(&""),
                    tail.lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if started.elapsed() > Duration::from_secs(60) {
                signal(pid, rustix::process::Signal::TERM);
                bail!(
                    "certo {} did not start within 60 s (see {})",
                    args.first().unwrap_or(&""),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(Proc {
        pid,
        url,
        log: log.to_owned(),
    })
}

pub async fn up(g: &Global, a: UpArgs) -> anyhow::Result<ExitCode> {
    if let Some(s) = read_stack(g)
        && alive(s.serve.pid)
    {
        println!(
            "already up (serve pid {}); `certo status` shows it, `certo down` stops it",
            s.serve.pid
        );
        return Ok(ExitCode::SUCCESS);
    }
    let dir = stack_dir(g);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ctx = g.context()?;
    let store = ctx.store().await.context("cannot start the store")?;
    println!(
        "store:   {}",
        match g.location() {
            certo_orchestrator::store::Location::Url(u) => certo_orchestrator::store::redact(&u),
            certo_orchestrator::store::Location::Embedded(d) =>
                format!("embedded PostgreSQL under {}", d.display()),
        }
    );
    // The host's token: made once, kept for the workers, its digest in the store.
    let token = match ctx.host_token(&a.host) {
        Ok(t) if !t.is_empty() => t,
        _ => {
            let t = certo_orchestrator::api::new_token()?;
            ctx.save_host_token(&a.host, &t)?;
            t
        }
    };
    store
        .set_host_token(&a.host, &certo_orchestrator::api::token_digest(&token))
        .await?;
    let serve = spawn(
        g,
        &["serve", "--listen", &a.listen],
        &[],
        &dir.join("serve.log"),
        true,
    )?;
    let url = serve.url.clone().unwrap_or_default();
    println!("serve:   {url} (pid {})", serve.pid);
    let bdii = spawn(
        g,
        &[
            "testbed",
            "serve-bdii",
            "--name",
            SHARED_BDII,
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
        &dir.join("testbed-bdii.log"),
        true,
    )?;
    println!(
        "testbed: shared top BDII {SHARED_BDII} at {} (pid {})",
        bdii.url.as_deref().unwrap_or("?"),
        bdii.pid
    );
    let slots = a.slots.to_string();
    let memory = a.memory_mib.to_string();
    let repo = dir.join("repo");
    let agent = spawn(
        g,
        &[
            "agent",
            "--name",
            &a.host,
            "--listen",
            "127.0.0.1:0",
            "--libvirt",
            &a.libvirt,
            "--slots",
            &slots,
            "--memory-mib",
            &memory,
            "--orchestrator",
            &url,
            "--repo",
            &repo.to_string_lossy(),
            "--heartbeat",
            "2",
        ],
        &[("CERTO_TOKEN", &token)],
        &dir.join("agent.log"),
        true,
    )?;
    println!(
        "agent:   {} host {} over {} with {} slots (pid {})",
        agent.url.as_deref().unwrap_or("?"),
        a.host,
        a.libvirt,
        a.slots,
        agent.pid
    );
    let concurrency = a.concurrency.to_string();
    let mut workers = Vec::new();
    for i in 0..a.workers.max(1) {
        let name = format!("{}-w{i}", a.host);
        let w = spawn(
            g,
            &[
                &[
                    "worker",
                    "--orchestrator",
                    &url,
                    "--concurrency",
                    &concurrency,
                    "--name",
                    &name,
                ][..],
                if a.no_schedules {
                    &["--no-schedules"][..]
                } else {
                    &[][..]
                },
            ]
            .concat(),
            &[],
            &dir.join(format!("worker-{i}.log")),
            false,
        )?;
        println!(
            "worker:  {name}, {} steps at once (pid {})",
            a.concurrency, w.pid
        );
        workers.push(w);
    }
    // Ready when the agent's heartbeat reached the store.
    let started = Instant::now();
    loop {
        let fresh = store.list_hosts().await?.into_iter().any(|h| {
            h.name == a.host
                && h.last_heartbeat
                    .is_some_and(|t| t > chrono::Utc::now() - chrono::Duration::seconds(10))
        });
        if fresh {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent registered no heartbeat within 30 s (see {})",
                agent.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stack = Stack {
        serve,
        agent,
        workers,
        shared: vec![bdii],
        host: a.host.clone(),
        started_at: chrono::Utc::now(),
    };
    std::fs::write(dir.join("stack.json"), serde_json::to_vec_pretty(&stack)?)?;
    println!(
        "up: `certo submit FILE... --wait` certifies; `certo status` shows the stack; logs in {}",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn down(g: &Global, a: DownArgs) -> anyhow::Result<ExitCode> {
    let Some(stack) = read_stack(g) else {
        println!("not up (no {})", stack_dir(g).join("stack.json").display());
        return Ok(ExitCode::SUCCESS);
    };
    // Workers first (they give their steps back), then the agent, then the server.
    let groups: Vec<(&str, Vec<i32>)> = vec![
        ("workers", stack.workers.iter().map(|w| w.pid).collect()),
        ("agent", vec![stack.agent.pid]),
        ("serve", vec![stack.serve.pid]),
        (
            "the testbed's shared services",
            stack.shared.iter().map(|p| p.pid).collect(),
        ),
    ];
    for (what, pids) in groups {
        for &p in &pids {
            signal(p, rustix::process::Signal::TERM);
        }
        let started = Instant::now();
        while pids.iter().any(|&p| alive(p)) && started.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut killed = 0;
        for &p in &pids {
            if alive(p) {
                signal(p, rustix::process::Signal::KILL);
                killed += 1;
            }
        }
        println!(
            "stopped {what}{}",
            if killed > 0 {
                format!(" ({killed} killed after 15 s)")
            } else {
                String::new()
            }
        );
    }
    let _ = std::fs::remove_file(stack_dir(g).join("stack.json"));
    if !a.keep_store
        && let certo_orchestrator::store::Location::Embedded(dir) = g.location()
    {
        let cluster = certo_orchestrator::store::Cluster::new(&dir)?;
        if cluster.stop()? {
            println!("stopped the embedded store");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(g: &Global, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let stack = read_stack(g);
    let procs: Vec<(String, Option<Proc>)> = match &stack {
        Some(s) => {
            let mut v = vec![
                ("serve".to_owned(), Some(s.serve.clone())),
                ("agent".to_owned(), Some(s.agent.clone())),
            ];
            for (i, w) in s.workers.iter().enumerate() {
                v.push((format!("worker {i}"), Some(w.clone())));
            }
            for p in &s.shared {
                v.push(("testbed".to_owned(), Some(p.clone())));
            }
            v
        }
        None => Vec::new(),
    };
    let store = g.store().await.ok();
    let mut hosts = Vec::new();
    let mut counts = json!({});
    if let Some(store) = &store {
        let held = store.held_slots().await.unwrap_or_default();
        for h in store.list_hosts().await.unwrap_or_default() {
            hosts.push(json!({
                "name": h.name, "agent": h.agent_url, "slots": h.slots,
                "slots_held": held.get(&h.name).copied().unwrap_or(0),
                "heartbeat_seconds_ago": h.last_heartbeat.map(|t| (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0),
                "quarantined": h.quarantine_reason,
            }));
        }
        counts = store
            .engine_counts()
            .await
            .map(|c| json!(c))
            .unwrap_or(json!({}));
    }
    if a.json {
        print_json(&json!({
            "up": stack.is_some(),
            "processes": procs.iter().map(|(n, p)| json!({
                "name": n, "pid": p.as_ref().map(|p| p.pid), "url": p.as_ref().and_then(|p| p.url.clone()),
                "alive": p.as_ref().is_some_and(|p| alive(p.pid)),
            })).collect::<Vec<_>>(),
            "store": store.is_some(),
            "hosts": hosts,
            "steps": counts,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    match &stack {
        None => println!("stack:   not up (`certo up` starts it)"),
        Some(s) => println!(
            "stack:   up since {}",
            s.started_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
    }
    for (name, p) in &procs {
        if let Some(p) = p {
            println!(
                "  {name:<9} pid {:<7} {:<6} {}",
                p.pid,
                if alive(p.pid) { "alive" } else { "GONE" },
                p.url.as_deref().unwrap_or("")
            );
        }
    }
    println!(
        "store:   {}",
        if store.is_some() {
            "answering"
        } else {
            "not reachable"
        }
    );
    for h in &hosts {
        println!(
            "host:    {:<12} slots {}/{} held  heartbeat {}{}",
            h["name"].as_str().unwrap_or(""),
            h["slots_held"],
            h["slots"],
            h["heartbeat_seconds_ago"]
                .as_f64()
                .map(|s| format!("{s:.0} s ago"))
                .unwrap_or_else(|| "never".into()),
            h["quarantined"]
                .as_str()
                .map(|q| format!("  QUARANTINED: {q}"))
                .unwrap_or_default()
        );
    }
    println!("steps:   {counts}");
    Ok(ExitCode::SUCCESS)
}
