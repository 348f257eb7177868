//! End to end on real QEMU (TCG) through libvirtd: images built by the imager, pushed by the
//! transfer engine into an agent's repository, booted; the guest harness joins, runs the
//! node type's tests and reports them into PostgreSQL. Two agents in two network namespaces
//! serve one orchestrator; faults: a hung guest, a kernel panic, a crashed harness, an agent
//! killed mid-run and restarted (its orphaned domain reaped). Root only (scripts/test).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use certo_testkit::target_tmp as tmp;

use certo_testkit::ensure_libvirtd;
use common::world;

/// Data directory shared with the imager tests (their cached layers are reused).
fn data() -> PathBuf {
    tmp().join("imager-shared")
}

fn certo(db: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_certo"));
    c.arg("--data-dir")
        .arg(data())
        .arg("--repos")
        .arg(world())
        .args(args)
        .env("DATABASE_URL", db)
        .env_remove("CERTO_CATALOGUE")
        .env_remove("CERTO_TOKEN");
    c
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn image(db: &str, platform: &str, node_type: &str) -> String {
    let out = certo(
        db,
        &[
            "image",
            "build",
            "--json",
            "--release",
            "3.2",
            "--platform",
            platform,
            "--node-type",
            node_type,
        ],
    )
    .output()
    .expect("image build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)["path"].as_str().expect("path").to_owned()
}

/// A `certo agent` process over qemu:///system; killed (SIGKILL) when dropped.
type Agent = certo_testkit::process::Listening;

fn spawn_agent(
    netns: Option<&str>,
    listen: &str,
    name: &str,
    token: &str,
    repo: &Path,
    orchestrator: Option<&str>,
) -> Agent {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_certo")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_certo")),
    };
    cmd.args([
        "agent",
        "--listen",
        listen,
        "--name",
        name,
        "--libvirt",
        "qemu:///system",
        "--heartbeat",
        "1",
        "--repo",
    ])
    .arg(repo)
    .env("CERTO_TOKEN", token)
    .stderr(Stdio::null());
    if let Some(o) = orchestrator {
        cmd.args(["--orchestrator", o]);
    }
    certo_testkit::process::Listening::spawn(&mut cmd, Duration::from_secs(60))
}

fn vm_run(db: &str, agent: &str, token: &str, image: &str, extra: &[&str]) -> Value {
    let mut args = vec!["vm", "run", "--json", "--agent", agent, "--image", image];
    args.extend_from_slice(extra);
    let out = certo(db, &args)
        .env("CERTO_TOKEN", token)
        .output()
        .expect("vm run");
    json_of(&out)
}

/// The serial console a run's JSON names (`HOST:PATH`), as kept on this machine.
fn serial_of(run: &Value) -> String {
    let path = run["serial_log"]
        .as_str()
        .and_then(|l| l.split_once(':'))
        .map(|(_, p)| p.to_owned())
        .unwrap_or_else(|| panic!("no serial log in {run}"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("serial log {path}: {e}"))
}

/// The names of libvirt's domains: every defined one with `all` (a leak is a domain that
/// still exists, shut off or not), else the running ones.
fn virsh_list(all: bool) -> Vec<String> {
    let mut args = vec!["-c", "qemu:///system", "list", "--name"];
    if all {
        args.push("--all");
    }
    let out = Command::new("virsh").args(&args).output().expect("virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every domain libvirt knows, running or shut off.
fn domains() -> Vec<String> {
    virsh_list(true)
}

fn domain_exists(name: &str) -> bool {
    domains().iter().any(|d| d == name)
}

fn domain_running(name: &str) -> bool {
    virsh_list(false).iter().any(|d| d == name)
}

fn statuses(v: &Value) -> Vec<(String, String)> {
    v["tests"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        format!(
                            "{}/{}",
                            t["suite"].as_str().unwrap_or(""),
                            t["name"].as_str().unwrap_or("")
                        ),
                        t["status"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_and_rpm_images_boot_join_and_report_their_tests() {
    ensure_libvirtd();
    let db = common::scratch().await;
    distinct_run_ids(&db, 1).await;
    let deb = image(&db.url, "deb12_x86_64", "glite-WN");
    let rpm = image(&db.url, "sl5_x86_64", "glite-BDII");
    let repo = tmp().join(format!("e2e-repo-{}", std::process::id()));
    let token = "e2e-host-token-aaaaaaaaaaaaaaaa";
    let agent = spawn_agent(None, "127.0.0.1:0", "e2e-local", token, &repo, None);
    let base_sha = sha256(Path::new(&deb));
    // The agent's repository copy is what the VM boots from (`vm run` names an imager
    // artefact images/<id>/rootfs.ext4 `img-<first 32 of id>`): push it there first, so
    // it can be hashed before the run.
    let id = Path::new(&deb)
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .expect("images/<id>/rootfs.ext4");
    let deb_name = format!("img-{}", &id[..32]);
    let out = certo(
        &db.url,
        &[
            "transfer", "push", "--json", "--name", &deb_name, "--to", &agent.url, &deb,
        ],
    )
    .env("CERTO_TOKEN", token)
    .output()
    .expect("transfer push");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repo_copy = repo.join("images").join(format!("{deb_name}.img"));
    let copy_sha = sha256(&repo_copy);
    assert_eq!(copy_sha, base_sha, "the repository holds a bit-exact copy");

    let v = vm_run(&db.url, &agent.url, token, &deb, &["--timeout", "180"]);
    assert_eq!(v["state"], "done", "{v}");
    let tests = statuses(&v);
    assert!(tests.len() >= 3, "{v}");
    assert!(tests.iter().all(|(_, s)| s == "pass"), "{tests:?}");
    assert!(
        tests.iter().any(|(n, _)| n == "basic/40-grid-env"),
        "{tests:?}"
    );
    // The VM's token reached the guest through fw_cfg: libvirt's log of the domain (which
    // records QEMU's whole command line) has no token in it.
    let qemu_log = std::fs::read_to_string(format!(
        "/var/log/libvirt/qemu/{}.log",
        v["vm"].as_str().expect("vm")
    ))
    .expect("libvirt's domain log");
    assert!(qemu_log.contains("certo.token=fwcfg"), "{qemu_log}");
    assert_eq!(
        qemu_log.matches("certo.token=").count(),
        qemu_log.matches("certo.token=fwcfg").count()
    );
    // The repository's copy of the image stays pristine: the VM wrote to an overlay.
    let row = db
        .store
        .vm(v["vm"].as_str().expect("vm"))
        .await
        .expect("vm")
        .expect("row");
    assert_eq!(
        row.image, deb_name,
        "the VM booted from the copy hashed above"
    );
    assert_eq!(
        sha256(&repo_copy),
        copy_sha,
        "the VM wrote into its base image"
    );
    assert_eq!(sha256(Path::new(&deb)), base_sha);

    let r = vm_run(&db.url, &agent.url, token, &rpm, &["--timeout", "180"]);
    assert_eq!(r["state"], "done", "{r}");
    assert!(statuses(&r).iter().all(|(_, s)| s == "pass"), "{r}");
    // The BDII the guest reported was looked at from outside: its banner is the evidence.
    let serial = serial_of(&r);
    assert!(
        serial
            .lines()
            .any(|l| l.contains("registered") && l.contains("answered from outside: ")),
        "{serial}"
    );

    // PostgreSQL holds both runs and their results; no domain is left.
    for name in [v["vm"].as_str().expect("vm"), r["vm"].as_str().expect("vm")] {
        let row = db.store.vm(name).await.expect("vm").expect("row");
        assert_eq!(row.state, certo_orchestrator::model::VmState::Done);
        assert!(
            !db.store
                .vm_results(row.id)
                .await
                .expect("results")
                .is_empty()
        );
        assert!(!domain_exists(name), "{name} leaked: {:?}", domains());
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&repo);
    db.drop_db().await.expect("drop");
}

/// Tests share one libvirtd but not one database: give each database its own run ids so
/// domain names (certo-r<RUN>-...) never collide.
async fn distinct_run_ids(db: &certo_orchestrator::store::scratch::ScratchDb, slot: i64) {
    let start = (std::process::id() as i64 % 100_000) * 100 + slot * 10_000_000 + 1;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER SEQUENCE vm_runs_id_seq RESTART WITH {start}"
    )))
    .execute(db.store.pool())
    .await
    .expect("sequence");
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Two network namespaces joined to this one by veth pairs; removed when dropped.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(tag: u32) -> (Self, Vec<(String, String, String)>) {
        let mut made = Vec::new();
        let mut nets = Vec::new();
        for i in 1..=2u32 {
            let ns = format!("certo-e2e-{tag}-{i}");
            let host_if = format!("ce{tag}h{i}");
            let ns_if = format!("ce{tag}n{i}");
            let subnet = 100 + (tag % 50) * 2 + i;
            let host_ip = format!("10.{subnet}.0.1");
            let ns_ip = format!("10.{subnet}.0.2");
            for args in [
                vec!["netns", "add", &ns],
                vec![
                    "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
                ],
                vec!["link", "set", &ns_if, "netns", &ns],
                vec!["addr", "add", &format!("{host_ip}/24"), "dev", &host_if],
                vec!["link", "set", &host_if, "up"],
            ] {
                run_ip(None, &args);
            }
            run_ip(
                Some(&ns),
                &["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if],
            );
            run_ip(Some(&ns), &["link", "set", &ns_if, "up"]);
            run_ip(Some(&ns), &["link", "set", "lo", "up"]);
            made.push(ns.clone());
            nets.push((ns, host_ip, ns_ip));
        }
        (Namespaces(made), nets)
    }
}

fn run_ip(ns: Option<&str>, args: &[&str]) {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    let out = c.args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `certo serve` on all addresses of this namespace; killed when dropped.
struct Serve(Child, u16);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(db: &str) -> Serve {
    let mut child = certo(
        db,
        &["serve", "--listen", "0.0.0.0:0", "--health-interval", "2"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("serve said {line:?}"));
    Serve(child, port)
}

fn add_host(db: &str, name: &str) -> String {
    let out = certo(db, &["host", "add", name])
        .output()
        .expect("host add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_in_two_network_namespaces_serve_one_orchestrator() {
    ensure_libvirtd();
    let db = common::scratch().await;
    distinct_run_ids(&db, 2).await;
    let rpm = image(&db.url, "sl5_x86_64", "glite-WN");
    let (_ns, nets) = Namespaces::new(std::process::id() % 1000);
    let orch = serve(&db.url);
    let mut agents = Vec::new();
    for (i, (ns, host_ip, ns_ip)) in nets.iter().enumerate() {
        let name = format!("nshost{}", i + 1);
        let token = add_host(&db.url, &name);
        let repo = tmp().join(format!("e2e-ns-repo-{}-{i}", std::process::id()));
        let agent = spawn_agent(
            Some(ns),
            &format!("{ns_ip}:7310"),
            &name,
            &token,
            &repo,
            Some(&format!("http://{host_ip}:{}", orch.1)),
        );
        agents.push((agent, token, repo, host_ip.clone(), name));
    }
    // Both register and send heartbeats.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = db.store.list_hosts().await.expect("hosts");
        if hosts
            .iter()
            .filter(|h| h.last_heartbeat.is_some() && h.agent_url.is_some())
            .count()
            == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agents did not register: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One VM on each, at the same time, reporting to the one orchestrator.
    let mut runs = Vec::new();
    for (agent, token, _, host_ip, _) in &agents {
        let mut c = certo(
            &db.url,
            &[
                "vm",
                "run",
                "--json",
                "--timeout",
                "180",
                "--agent",
                &agent.url,
                "--image",
                &rpm,
                "--orchestrator",
                &format!("http://{host_ip}:{}", orch.1),
            ],
        );
        c.env("CERTO_TOKEN", token);
        runs.push(std::thread::spawn(move || {
            let started = Instant::now();
            let out = c.output().expect("vm run");
            (started, Instant::now(), out)
        }));
    }
    let mut outs = Vec::new();
    let mut walls = Vec::new();
    for h in runs {
        let (started, ended, out) = h.join().expect("join");
        outs.push(json_of(&out));
        walls.push((started, ended));
    }
    let mut lives = Vec::new();
    for (v, (_, _, _, _, name)) in outs.iter().zip(&agents) {
        assert_eq!(v["state"], "done", "{v}");
        assert_eq!(v["host"], name.as_str(), "{v}");
        assert!(statuses(v).iter().all(|(_, s)| s == "pass"), "{v}");
        let row = db
            .store
            .vm(v["vm"].as_str().expect("vm"))
            .await
            .expect("vm")
            .expect("row");
        assert_eq!(row.host, name.as_str());
        let joined = row.joined_at.expect("joined");
        let finished = row.finished_at.expect("finished");
        assert!(row.requested_at <= joined && joined <= finished, "{row:?}");
        lives.push((row.requested_at, joined, finished));
    }
    // At the same time: each VM was requested (its domain booting) before the other had
    // finished, so the two lives overlap; the two `vm run`s overlapped on the clock too.
    let (a, b) = (lives[0], lives[1]);
    assert!(
        a.0 < b.2 && b.0 < a.2,
        "the runs did not overlap: {a:?} and {b:?}; {} / {}",
        outs[0],
        outs[1]
    );
    assert!(
        walls[0].0 < walls[1].1 && walls[1].0 < walls[0].1,
        "the vm run commands did not overlap: {walls:?}"
    );
    for (_, _, repo, _, _) in &agents {
        let _ = std::fs::remove_dir_all(repo);
    }
    drop(agents);
    drop(orch);
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_end_in_explained_states_and_leak_no_domain() {
    ensure_libvirtd();
    let db = common::scratch().await;
    distinct_run_ids(&db, 3).await;
    let rpm = image(&db.url, "sl5_x86_64", "glite-UI");
    let orch = serve(&db.url);
    let orch_url = format!("http://127.0.0.1:{}", orch.1);
    let token = add_host(&db.url, "faulty");
    let repo = tmp().join(format!("e2e-fault-repo-{}", std::process::id()));

    // A hung guest is destroyed at its deadline; its serial log is kept.
    let agent = spawn_agent(
        None,
        "127.0.0.1:0",
        "faulty",
        &token,
        &repo,
        Some(&orch_url),
    );
    let v = vm_run(
        &db.url,
        &agent.url,
        &token,
        &rpm,
        &[
            "--timeout",
            "15",
            "--fault",
            "hang",
            "--orchestrator",
            &orch_url,
        ],
    );
    assert_eq!(v["state"], "timed_out", "{v}");
    let log = v["serial_log"].as_str().expect("serial log");
    let text = std::fs::read_to_string(log.split_once(':').map(|(_, p)| p).expect("path"))
        .expect("log kept");
    assert!(text.contains("certo-harness"), "{text}");

    // A guest kernel panic ends the domain; the run says so.
    let v = vm_run(
        &db.url,
        &agent.url,
        &token,
        &rpm,
        &[
            "--timeout",
            "120",
            "--fault",
            "panic",
            "--orchestrator",
            &orch_url,
        ],
    );
    assert_eq!(v["state"], "crashed", "{v}");
    assert!(
        v["reason"].as_str().expect("reason").contains("panicked"),
        "{v}"
    );

    // A harness that crashes after joining: the VM powers off without `done`.
    let v = vm_run(
        &db.url,
        &agent.url,
        &token,
        &rpm,
        &[
            "--timeout",
            "120",
            "--fault",
            "crash",
            "--orchestrator",
            &orch_url,
        ],
    );
    assert_eq!(v["state"], "crashed", "{v}");
    assert_eq!(v["fault"], "product", "it crashed after joining: {v}");
    assert!(
        v["reason"]
            .as_str()
            .expect("reason")
            .contains("without reporting done"),
        "{v}"
    );
    assert!(v["hostname"].is_string(), "it had joined: {v}");
    let crashed = v["vm"].as_str().expect("vm");
    assert!(!domain_exists(crashed), "{crashed} leaked: {:?}", domains());

    // The agent is killed while its guest hangs; the run is lost; the restarted agent
    // reaps the orphaned domain.
    let mut c = certo(
        &db.url,
        &[
            "vm",
            "run",
            "--json",
            "--timeout",
            "300",
            "--fault",
            "hang",
            "--agent",
            &agent.url,
            "--image",
            &rpm,
            "--orchestrator",
            &orch_url,
        ],
    );
    c.env("CERTO_TOKEN", &token);
    let run = std::thread::spawn(move || c.output().expect("vm run"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let name = loop {
        let live = db.store.live_vms("faulty").await.expect("live");
        if let Some(n) = live.first()
            && domain_running(n)
        {
            break n.clone();
        }
        assert!(Instant::now() < deadline, "the VM never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let the agent answer the boot request before it dies.
    let booted = Instant::now() + Duration::from_secs(30);
    while db
        .store
        .vm(&name)
        .await
        .expect("vm")
        .and_then(|r| r.serial_log)
        .is_none()
    {
        assert!(Instant::now() < booted, "the boot was never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agent);
    let v = json_of(&run.join().expect("join"));
    assert_eq!(v["state"], "lost", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .expect("reason")
            .contains("stopped answering"),
        "{v}"
    );
    assert!(
        domain_running(&name),
        "the orphan should still run until an agent reaps it"
    );
    let agent = spawn_agent(
        None,
        "127.0.0.1:0",
        "faulty",
        &token,
        &repo,
        Some(&orch_url),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while domain_exists(&name) {
        assert!(
            Instant::now() < deadline,
            "the restarted agent did not reap {name}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&repo);
    drop(orch);
    db.drop_db().await.expect("drop");
}

/// An init script that the harness starts as one of the node type's services (it mentions
/// /usr/libexec/glite/). It plays a broken patch's service that goes looking for the VM's
/// token where such code might (fw_cfg, the kernel command line, other processes'
/// arguments and environments) while the harness reports, and posts a passing result and
/// `done ok` with whatever it found, and with nothing.
const FORGER: &str = r#"#!/bin/sh
# forger: /usr/libexec/glite/forger (a service of a broken patch; Certo's e2e test)
[ "$1" = start ] || exit 0
for w in $(cat /proc/cmdline); do
  case $w in
    certo.url=*) URL=${w#certo.url=} ;;
    certo.vm=*) VM=${w#certo.vm=} ;;
  esac
done
scan() {
  cat /sys/firmware/qemu_fw_cfg/by_name/opt/certo/token/raw 2>/dev/null; echo
  for w in $(cat /proc/cmdline); do case $w in certo.token=*) echo "${w#certo.token=}" ;; esac; done
  for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do
    tr '\0' '\n' < "$f" 2>/dev/null | sed -n 's/.*Bearer //p; s/^TOKEN=//p; s/^AUTH=//p; s/^SESSION=//p'
  done
}
forge() {
  for t in "$@" none; do
    echo "basic forged pass 0.1" > /tmp/forged
    for what in result done; do
      [ $what = done ] && echo ok > /tmp/forged
      busybox wget -q -O /dev/null --header "Authorization: Bearer $t" --header "X-Certo-VM: $VM" \
        --post-file=/tmp/forged "$URL/api/v1/guest/$what" > /tmp/forge.out 2>&1
      echo "forger: $what with a ${#t}-character token: exit $? $(tr '\n' ' ' < /tmp/forge.out)"
    done
  done
}
found=$(scan | grep -v -x -e '' -e fwcfg -e hidden | sort -u)
echo "forger: tokens found at start: $(echo $found | wc -w)"
forge $found
# Keep looking while the harness reports (its requests' processes are visible in /proc).
(
  for i in $(seq 1 40); do
    more=$(scan | grep -v -x -e '' -e fwcfg -e hidden | sort -u)
    [ -n "$more" ] && { echo "forger: tokens found later: $(echo $more | wc -w)"; forge $more; }
    sleep 0.25
  done
) > /dev/console 2>&1 < /dev/null &
exit 0
"#;

/// An init script whose service listens but says nothing and hangs up at once: reported up by
/// the harness, silent from outside.
const MUTE: &str = r#"#!/bin/sh
# mute: /usr/libexec/glite/mute (a service that never answers; Certo's e2e test)
[ "$1" = start ] || exit 0
busybox nc -ll -p 7777 -e /bin/true > /dev/null 2>&1 < /dev/null &
sleep 0.3
exit 0
"#;

/// Writes `files` (path in the image, mode, content) into an ext4 image with debugfs.
fn inject(image: &Path, files: &[(&str, &str)]) {
    let dir = tmp().join(format!("inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut cmds = String::new();
    for (i, (path, content)) in files.iter().enumerate() {
        let local = dir.join(format!("f{i}"));
        std::fs::write(&local, content).expect("write");
        cmds.push_str(&format!(
            "rm {path}\nwrite {} {path}\nsif {path} mode 0100755\n",
            local.display()
        ));
    }
    let script = dir.join("cmds");
    std::fs::write(&script, cmds).expect("cmds");
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(image)
        .output()
        .expect("debugfs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patch_service_cannot_forge_results_nor_pass_for_a_service_that_is_not_there() {
    ensure_libvirtd();
    let db = common::scratch().await;
    distinct_run_ids(&db, 4).await;
    let deb = image(&db.url, "deb12_x86_64", "glite-WN");
    let img = tmp().join(format!("forger-{}.img", std::process::id()));
    std::fs::copy(&deb, &img).expect("copy the image");
    inject(
        &img,
        &[("/etc/init.d/forger", FORGER), ("/etc/init.d/mute", MUTE)],
    );
    let repo = tmp().join(format!("e2e-forger-repo-{}", std::process::id()));
    let token = "e2e-forger-token-aaaaaaaaaaaaaaa";
    let agent = spawn_agent(None, "127.0.0.1:0", "e2e-forger", token, &repo, None);
    let img_s = img.to_str().expect("utf-8 path");
    let v = vm_run(
        &db.url,
        &agent.url,
        token,
        img_s,
        &["--timeout", "180", "--node-type", "glite-WN"],
    );
    let name = v["vm"].as_str().expect("vm").to_owned();
    let serial = serial_of(&v);

    // The forger ran, and found no token: not in fw_cfg, the command line or any process.
    assert!(
        serial.contains("forger: tokens found at start: 0"),
        "{serial}"
    );
    assert!(!serial.contains("tokens found later"), "{serial}");
    // Nothing it posted was accepted: every attempt was refused.
    let attempts: Vec<&str> = serial
        .lines()
        .filter(|l| l.contains("forger: result with") || l.contains("forger: done with"))
        .collect();
    assert!(!attempts.is_empty(), "{serial}");
    assert!(
        attempts.iter().all(|l| !l.contains("exit 0")),
        "{attempts:#?}"
    );
    let row = db.store.vm(&name).await.expect("vm").expect("row");
    let results = db.store.vm_results(row.id).await.expect("results");
    assert!(results.iter().all(|r| r.name != "forged"), "{results:?}");
    // The harness's own results are all there.
    assert!(results.len() >= 3, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.status == certo_orchestrator::model::TestStatus::Pass),
        "{results:?}"
    );
    // The mute service was reported up by the harness, but nothing answered on its port from
    // outside: it is not in the testbed, and the run failed saying the report was refused.
    let services = db.store.services(None).await.expect("services");
    assert!(services.iter().all(|s| s.name != "mute"), "{services:?}");
    assert!(
        serial.contains("service mute 7777 up"),
        "the harness saw the port: {serial}"
    );
    assert!(
        serial.contains("nothing answered there from outside the guest"),
        "{serial}"
    );
    assert_eq!(row.state, certo_orchestrator::model::VmState::Failed, "{v}");
    assert!(
        row.reason
            .as_deref()
            .unwrap_or("")
            .contains("cannot report: service"),
        "{row:?}"
    );
    drop(agent);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(&repo);
    db.drop_db().await.expect("drop");
}
