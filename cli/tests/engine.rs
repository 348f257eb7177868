//! The workflow engine end to end: `certo worker` processes claim the certification steps of
//! submitted patches from PostgreSQL and drive real image builds, a host agent and guests to
//! a verdict. Two kinds of host: the test kit's agent over libvirt's test driver with
//! simulated guests (the chaos test: workers killed with SIGKILL at every step boundary and
//! inside a step), and `certo up`'s real agent over qemu:///system (every verdict kind on
//! real VMs). Root only (image builds; scripts/test).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use certo_testkit::target_tmp as tmp;
use common::world;

/// Data directory shared with the imager tests (their cached layers are reused).
fn data() -> PathBuf {
    tmp().join("imager-shared")
}

fn fixture(name: &str) -> String {
    certo_testkit::workspace()
        .join("fixtures/patches/valid")
        .join(name)
        .display()
        .to_string()
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
        .env_remove("CERTO_TOKEN")
        .env_remove("CERTO_ORCHESTRATOR");
    c
}

fn run(db: &str, args: &[&str]) -> Output {
    certo(db, args).output().expect("certo")
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

/// A `certo worker` process; killed (SIGKILL) when dropped.
struct WorkerProc(Child);

impl WorkerProc {
    fn start(db: &str, orchestrator: &str, name: &str) -> WorkerProc {
        let log = std::fs::File::create(tmp().join(format!("engine-{name}.log"))).expect("log");
        let child = certo(
            db,
            &[
                "worker",
                "--orchestrator",
                orchestrator,
                "--lease",
                "2",
                "--poll",
                "0.2",
                "--concurrency",
                "4",
                "--vm-timeout",
                "60",
                "--name",
                name,
                // A test's store sees no nightly sweep start (a run at 02:00 would compete).
                "--no-schedules",
            ],
        )
        .env("CERTO_LOG", "info,sqlx=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("certo worker");
        WorkerProc(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn verdict_of(store: &certo_orchestrator::store::Store, run: i64, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        if let Some(v) = store.verdict(run).await.expect("verdict") {
            return v.detail;
        }
        assert!(
            started.elapsed() < within,
            "run {run} got no verdict within {within:?}: {:?}",
            store.run_timeline(run).await.expect("timeline")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rerun(db: &str, patch: &str) -> i64 {
    let out = run(db, &["rerun", patch, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)["run"].as_i64().expect("run id")
}

/// What must be the same whatever happened to the workers: the verdict and each target's
/// outcome and stage.
fn essence(v: &Value) -> Value {
    serde_json::json!({
        "verdict": v["verdict"], "stage": v["stage"], "target": v["target"],
        "targets": v["targets"].as_array().map(|ts| ts.iter().map(|t| serde_json::json!(
            [t["release"], t["platform"], t["node_type"], t["outcome"], t["stage"]])).collect::<Vec<_>>()),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_at_every_step_boundary_and_inside_a_step_changes_no_verdict() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    // A host the engine may place work on: registered, sending heartbeats, its token kept
    // where the workers read it.
    let host_name = format!("chaos{}", std::process::id());
    let (host, token) = registered_host(&db, &api, &host_name, 4, |hv| hv).await;
    let out = run(&db.url, &["submit", &fixture("3509-two-records.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The undisturbed run says what the verdict is.
    let reference = {
        let _w = WorkerProc::start(&db.url, &api.base, "calm");
        let id = rerun(&db.url, "3509");
        verdict_of(&db.store, id, Duration::from_secs(300)).await
    };
    assert_eq!(reference["verdict"], "certified", "{reference:#}");

    // The same patch again, with the worker killed after every step that ends and once in
    // the middle of the boot step (its VM started, the step not ended); a new worker takes
    // over each time once the dead one's lease has expired.
    let id = rerun(&db.url, "3509");
    let mut worker = WorkerProc::start(&db.url, &api.base, "chaos-0");
    let (mut kills, mut seen, mut killed_inside) = (0, 0i64, false);
    let started = Instant::now();
    while db.store.verdict(id).await.expect("verdict").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no verdict after {kills} kills"
        );
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM engine_events e JOIN engine_steps s ON s.id = e.step_id
              WHERE s.run_id = $1 AND e.kind IN ('passed', 'failed')",
        )
        .bind(id)
        .fetch_one(db.store.pool())
        .await
        .expect("events");
        let booting = boot_running(&db.store, id).await;
        let inside = booting && !killed_inside;
        if ended > seen || inside {
            killed_inside |= inside;
            seen = ended;
            worker.kill();
            kills += 1;
            worker = WorkerProc::start(&db.url, &api.base, &format!("chaos-{kills}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(worker);
    let chaos = verdict_of(&db.store, id, Duration::from_secs(1)).await;
    assert_eq!(essence(&chaos), essence(&reference), "{chaos:#}");
    assert!(killed_inside, "the boot step was never caught running");
    let steps = db.store.run_timeline(id).await.expect("timeline").len() as i64;
    // Two short steps can end between two looks (a new worker runs `bugs` and `teardown` in a
    // few milliseconds): most boundaries, not necessarily all, see a kill.
    assert!(kills * 2 >= steps, "{kills} kills for {steps} steps");
    let verdicts: i64 = sqlx::query_scalar("SELECT count(*) FROM verdicts WHERE run_id = $1")
        .bind(id)
        .fetch_one(db.store.pool())
        .await
        .expect("count");
    assert_eq!(verdicts, 1);
    // Every domain the run asked for was booted once at most and none is left running.
    let agent = certo_orchestrator::vmrun::Agent::new(&host.url, &token).expect("agent client");
    let intents: Vec<(String,)> = sqlx::query_as(
        "SELECT i.key FROM engine_intents i JOIN engine_steps s ON s.id = i.step_id WHERE s.run_id = $1",
    )
    .bind(id)
    .fetch_all(db.store.pool())
    .await
    .expect("intents");
    assert!(!intents.is_empty());
    for (name,) in intents {
        let st = agent.status(&name).await.expect("status");
        assert!(st.boots <= 1, "{name} booted {} times", st.boots);
        assert_ne!(
            st.state,
            certo_orchestrator::model::HostVmState::Running,
            "{name} leaked"
        );
    }
    let held = db.store.held_slots().await.expect("slots");
    assert!(held.values().all(|n| *n == 0), "slots still held: {held:?}");
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&host_name));
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_epoch_is_refused_by_the_agent() {
    let token = certo_orchestrator::api::new_token().expect("token");
    let host = certo_testkit::agent::SimulatedHost::start("epochs", &token, 2, |hv| hv).await;
    let agent = certo_orchestrator::vmrun::Agent::new(&host.url, &token).expect("agent client");
    let name = certo_orchestrator::vmrun::vm_name(77, "3.2/sl5_x86_64/glite-WN", 1);
    // Boot for epoch 9, as a worker holding the boot step would.
    let img = common::small_image(&host.dir.join("small.img"), 1);
    let (image, _) = agent.push(&img, None).await.expect("push");
    let spec = |epoch: u64| certo_proto_boot(&name, &image, epoch);
    agent.boot(&spec(9)).await.expect("boot at epoch 9");
    // A worker that lost its claim (epoch 4) cannot tear it down...
    let err = agent.destroy_at(&name, 4).await.expect_err("stale destroy");
    assert!(err.to_string().contains("stale epoch 4"), "{err}");
    assert_eq!(
        agent.status(&name).await.expect("status").state,
        certo_orchestrator::model::HostVmState::Running
    );
    // ...nor boot the next attempt; the current holder (epoch 12) can.
    let next = certo_orchestrator::vmrun::vm_name(77, "3.2/sl5_x86_64/glite-WN", 2);
    let mut again = certo_proto_boot(&next, &image, 5);
    let err = agent.boot(&again).await.expect_err("stale boot");
    assert!(err.to_string().contains("409"), "{err}");
    agent
        .destroy_at(&name, 12)
        .await
        .expect("destroy at epoch 12");
    again.epoch = 12;
    let booted = agent.boot(&again).await.expect("boot at epoch 12");
    assert_eq!(booted.boots, 1);
    agent.destroy_at(&next, 12).await.expect("teardown");
}

fn certo_proto_boot(name: &str, image: &str, epoch: u64) -> certo_proto::agent::BootRequest {
    certo_proto::agent::BootRequest {
        name: name.to_owned(),
        image: image.to_owned(),
        memory_mib: 256,
        vcpus: 1,
        deadline_seconds: 60.0,
        epoch,
        guest: certo_proto::agent::GuestSpec {
            url: "http://127.0.0.1:9".into(),
            vm: name.to_owned(),
            token: "t".repeat(43),
            hang: true,
            panic: false,
            crash: false,
        },
    }
}

fn verdicts_by_patch(v: &Value) -> std::collections::BTreeMap<(u64, u64), Value> {
    v["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            (
                (
                    r["patch"].as_u64().expect("patch"),
                    r["revision"].as_u64().expect("revision"),
                ),
                r.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn certo_up_and_submit_wait_reach_every_verdict_on_real_vms() {
    certo_testkit::ensure_libvirtd();
    let db = certo_testkit::scratch_db().await;
    let host = format!("up{}", std::process::id());
    let out = run(
        &db.url,
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "2",
            "--host",
            &host,
            "--no-schedules",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let down = || run(&db.url, &["down", "--keep-store"]);
    // A failed assertion still takes the stack down (its agent holds the shared image
    // repository's lock, which the next run of this test needs).
    struct DownOnPanic(String);
    impl Drop for DownOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = run(&self.0, &["down", "--keep-store"]);
            }
        }
    }
    let _down_on_panic = DownOnPanic(db.url.clone());

    // 3213 revision 1 alone, submitted through the API by a certifier, as from their own
    // machine (no database): its bug is claimed, not fixed.
    let stack = json_of(&run(&db.url, &["status", "--json"]));
    let api = stack["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "serve"))
        .and_then(|p| p["url"].as_str())
        .unwrap_or_else(|| panic!("no serve URL in {stack:#}"))
        .to_owned();
    let token_file = tmp().join(format!("alice-{}.token", std::process::id()));
    let _ = std::fs::remove_file(&token_file);
    let tf = token_file.display().to_string();
    let out = run(
        &db.url,
        &[
            "user",
            "add",
            "alice",
            "--role",
            "certifier",
            "--token-file",
            &tf,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote = |args: &[&str]| {
        let mut all = vec!["--server", api.as_str(), "--user-token-file", tf.as_str()];
        all.extend_from_slice(args);
        certo("postgres://nobody@127.0.0.1:1/none", &all)
            .output()
            .expect("certo")
    };
    let out = remote(&["submit", &fixture("3213-lb-r1.txt"), "--wait", "--json"]);
    let v = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    let r1 = &verdicts_by_patch(&v)[&(3213, 1)];
    assert_eq!(
        (r1["verdict"].as_str(), r1["stage"].as_str()),
        (Some("rejected"), Some("bug")),
        "{r1:#}"
    );
    assert!(
        r1["reason"]
            .as_str()
            .unwrap_or("")
            .contains("bug 40410 is not fixed"),
        "{r1:#}"
    );

    let files = [
        "3213-lb-r2.yaml",
        "3509-two-records.yaml",
        "3211-ui-broken-postinst.yaml",
        "3212-ce-bad-config.json",
        "3504-info-provider-a.yaml",
        "3505-info-provider-b.txt",
        "3506-bdii-spoils-testbed.json",
    ];
    let mut args = vec!["submit".to_owned()];
    args.extend(files.iter().map(|f| fixture(f)));
    args.extend(["--wait".to_owned(), "--json".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&db.url, &args);
    let v = json_of(&out);
    // Rejections among them: exit status 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{v:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by = verdicts_by_patch(&v);
    let verdict = |p: u64, r: u64| -> (&str, Option<&str>) {
        let x = &by[&(p, r)];
        (x["verdict"].as_str().unwrap_or("?"), x["stage"].as_str())
    };
    assert_eq!(
        verdict(3213, 2),
        ("certified", None),
        "{:#}",
        by[&(3213, 2)]
    );
    let bug = &by[&(3213, 2)]["bugs"][0];
    assert_eq!(
        (bug["id"].as_u64(), bug["fixed"].as_bool()),
        (Some(40410), Some(true)),
        "{bug:#}"
    );
    assert!(
        bug["evidence"]
            .as_str()
            .unwrap_or("")
            .contains("fail on baseline, pass with the patch")
    );
    assert_eq!(
        verdict(3509, 1),
        ("certified", None),
        "{:#}",
        by[&(3509, 1)]
    );
    assert_eq!(
        verdict(3211, 1),
        ("rejected", Some("install")),
        "{:#}",
        by[&(3211, 1)]
    );
    assert!(
        by[&(3211, 1)]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("glite-ui-postinst-broken")
    );
    assert_eq!(
        verdict(3212, 1),
        ("rejected", Some("configure")),
        "{:#}",
        by[&(3212, 1)]
    );
    assert!(
        by[&(3212, 1)]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("CE_GATEKEEPER_PORT")
    );
    assert_eq!(
        verdict(3504, 1),
        ("certified", None),
        "{:#}",
        by[&(3504, 1)]
    );
    assert_eq!(
        verdict(3505, 1),
        ("rejected", Some("conflict")),
        "{:#}",
        by[&(3505, 1)]
    );
    assert_eq!(by[&(3505, 1)]["conflicts_with"], serde_json::json!([3504]));
    assert!(
        by[&(3505, 1)]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("3504")
    );
    // 3506 announces the shared top BDII's identity from its slice: stopped at `testbed`,
    // naming the service; the shared one stays healthy.
    assert_eq!(
        verdict(3506, 1),
        ("rejected", Some("testbed")),
        "{:#}",
        by[&(3506, 1)]
    );
    assert!(
        by[&(3506, 1)]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("testbed-bdii.certo"),
        "{:#}",
        by[&(3506, 1)]
    );
    let shared: Vec<_> = db
        .store
        .services(None)
        .await
        .expect("services")
        .into_iter()
        .filter(|s| s.slice.is_none())
        .collect();
    assert!(
        shared
            .iter()
            .any(|s| s.name == "testbed-bdii.certo" && s.healthy),
        "{shared:?}"
    );
    for ((p, r), x) in &by {
        for t in x["targets"].as_array().expect("targets") {
            assert!(
                t["host"].is_string() || t["outcome"] != "passed",
                "{p} r{r}: {t}"
            );
        }
    }

    // show carries the latest run; runs lists them; the timeline has hosts and attempts.
    let out = run(&db.url, &["show", "3505", "--json"]);
    let shown = json_of(&out);
    assert_eq!(shown["run"]["verdict"], "rejected");
    assert!(
        shown["timeline"]
            .as_array()
            .is_some_and(|t| t.iter().any(|s| s["step"] == "combined"))
    );
    let out = run(&db.url, &["runs", "--json"]);
    assert!(
        json_of(&out)["runs"]
            .as_array()
            .is_some_and(|r| r.len() >= 8)
    );
    let text = String::from_utf8_lossy(&run(&db.url, &["show", "3213"]).stdout).into_owned();
    assert!(
        text.contains("Verdict:") && text.contains("Timeline"),
        "{text}"
    );
    // The remote CLI shows what the local one shows.
    for args in [["show", "3213"], ["show", "3505"], ["runs", "--json"]] {
        let local = run(&db.url, &args);
        let far = remote(&args);
        assert_eq!(
            String::from_utf8_lossy(&local.stdout),
            String::from_utf8_lossy(&far.stdout),
            "certo {args:?}: {}",
            String::from_utf8_lossy(&far.stderr)
        );
    }

    // Nothing left running: every domain of these runs is gone, every slot given back.
    let intents: Vec<(String,)> = sqlx::query_as("SELECT key FROM engine_intents")
        .fetch_all(db.store.pool())
        .await
        .expect("intents");
    let running = String::from_utf8_lossy(
        &Command::new("virsh")
            .args(["-c", "qemu:///system", "list", "--name"])
            .output()
            .expect("virsh")
            .stdout,
    )
    .into_owned();
    for (name,) in &intents {
        assert!(
            !running.lines().any(|l| l.trim() == name),
            "{name} still runs"
        );
    }
    let held = db.store.held_slots().await.expect("slots");
    assert!(held.values().all(|n| *n == 0), "slots still held: {held:?}");
    // A sweep of one cell on real VMs: the baseline's known failure is reported as failing
    // (no sweep before), the rest passes, and the results are the baseline's now.
    let out = run(
        &db.url,
        &[
            "sweep",
            "run",
            "--cells",
            "3.2/sl5_i386/glite-WN",
            "--wait",
            "--json",
        ],
    );
    let v = json_of(&out);
    let c = &v["cells"][0];
    assert_eq!(
        (c["state"].as_str(), c["class"].as_str()),
        (Some("ran"), Some("failing")),
        "{v:#}"
    );
    let tests = c["tests"].as_array().expect("tests");
    assert!(
        tests
            .iter()
            .any(|t| t["name"] == "bug61001" && t["status"] == "fail" && t["class"] == "failing"),
        "{v:#}"
    );
    assert!(
        tests.iter().filter(|t| t["status"] == "pass").count() >= 2,
        "{v:#}"
    );
    let base = db
        .store
        .baseline_results(c["image_digest"].as_str().expect("digest"))
        .await
        .expect("baseline");
    assert!(
        base.iter()
            .any(|(_, n, st)| n == "bug61001" && st == "fail"),
        "{base:?}"
    );
    // The real agent's health check: QEMU starts a domain of the guest kernel and destroys it.
    let out = run(&db.url, &["host", "check", &host]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("{host}: healthy")), "{text}");
    assert!(text.contains("ok   domain start"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    let out = down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = json_of(&run(&db.url, &["status", "--json"]));
    assert_eq!(status["up"], false);
    db.drop_db().await.expect("drop");
}

/// A host of the test kit (simulated guests) registered with `api`, its token kept where
/// the workers read it; returns it when its heartbeat has reached the store.
async fn registered_host(
    db: &certo_orchestrator::store::scratch::ScratchDb,
    api: &certo_testkit::ApiServer,
    name: &str,
    slots: usize,
    wrap: impl FnOnce(
        std::sync::Arc<dyn certo_hosts::hypervisor::Hypervisor>,
    ) -> std::sync::Arc<dyn certo_hosts::hypervisor::Hypervisor>,
) -> (certo_testkit::agent::SimulatedHost, String) {
    let token = certo_orchestrator::api::new_token().expect("token");
    db.store
        .add_host(name, &certo_orchestrator::api::token_digest(&token))
        .await
        .expect("add host");
    let tokens = data().join("host-tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    std::fs::write(tokens.join(name), format!("{token}\n")).expect("token file");
    let host = certo_testkit::agent::SimulatedHost::start_registered(
        name,
        &token,
        slots,
        Some(api.base.clone()),
        wrap,
    )
    .await;
    let started = Instant::now();
    while !db
        .store
        .list_hosts()
        .await
        .expect("hosts")
        .iter()
        .any(|h| h.name == name && h.last_heartbeat.is_some())
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name} never registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (host, token)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_boot_failing_on_one_host_is_retried_on_another_and_never_rejects() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let pid = std::process::id();
    let (bad_name, good_name) = (format!("broken{pid}"), format!("healthy{pid}"));
    // The broken host has more free slots: placement picks it first.
    let (bad, _) = registered_host(&db, &api, &bad_name, 4, |hv| {
        let f = certo_testkit::hypervisor::Faulty::new(hv);
        f.fail_start
            .store(true, std::sync::atomic::Ordering::SeqCst);
        std::sync::Arc::new(f)
    })
    .await;
    let (good, _) = registered_host(&db, &api, &good_name, 1, |hv| hv).await;
    let out = run(&db.url, &["submit", &fixture("3509-two-records.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _w = WorkerProc::start(&db.url, &api.base, "mover");
    let id = rerun(&db.url, "3509");
    let v = verdict_of(&db.store, id, Duration::from_secs(300)).await;
    assert_eq!(v["verdict"], "certified", "{v:#}");
    assert_eq!(v["targets"][0]["host"], good_name.as_str(), "{v:#}");
    let timeline = db.store.run_timeline(id).await.expect("timeline");
    let boot = timeline.iter().find(|s| s.name == "boot").expect("boot");
    assert_eq!(boot.host.as_deref(), Some(good_name.as_str()));
    assert!(boot.attempt >= 2, "{boot:?}");
    let hosts = db.store.list_hosts().await.expect("hosts");
    let failures: i32 = sqlx::query_scalar("SELECT infra_failures FROM hosts WHERE name = $1")
        .bind(&bad_name)
        .fetch_one(db.store.pool())
        .await
        .expect("failures");
    assert!(failures >= 1, "{hosts:?}");
    drop((bad, good));
    for n in [&bad_name, &good_name] {
        let _ = std::fs::remove_file(data().join("host-tokens").join(n));
    }
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_tears_down_a_newer_revision_supersedes_and_rerun_failed_takes_the_rest() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("cancel{}", std::process::id());
    let (host, token) = registered_host(&db, &api, &name, 2, |hv| hv).await;
    let out = run(&db.url, &["submit", &fixture("3509-two-records.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _w = WorkerProc::start(&db.url, &api.base, "canceller");
    // Cancel while the boot step runs (its VM asked for): the verdict is `cancelled`, the
    // teardown still ran. (After boot, a simulated guest may finish every later step before
    // the cancel lands: then nothing would be left to cancel.)
    let id = rerun(&db.url, "3509");
    let started = Instant::now();
    loop {
        let booting = boot_running(&db.store, id).await;
        if booting {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "never booted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let out = run(&db.url, &["cancel", "3509"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = verdict_of(&db.store, id, Duration::from_secs(60)).await;
    assert_eq!(v["verdict"], "cancelled", "{v:#}");
    let timeline = db.store.run_timeline(id).await.expect("timeline");
    let teardown = timeline
        .iter()
        .find(|s| s.name == "teardown")
        .expect("teardown");
    assert_eq!(teardown.state, "passed", "{timeline:#?}");
    let agent = certo_orchestrator::vmrun::Agent::new(&host.url, &token).expect("agent");
    for (key, _) in db
        .store
        .target_intents(id, "3.2/sl5_i386/glite-WN")
        .await
        .expect("intents")
    {
        let st = agent.status(&key).await.expect("status");
        assert_ne!(
            st.state,
            certo_orchestrator::model::HostVmState::Running,
            "{key} left running"
        );
    }
    // Nothing more to cancel.
    assert_eq!(run(&db.url, &["cancel", "3509"]).status.code(), Some(1));
    // The cancelled target again: --failed takes exactly it, and certifies it.
    let out = run(&db.url, &["rerun", "3509", "--failed", "--wait", "--json"]);
    let again = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{again:#}");
    assert_eq!(again["runs"][0]["verdict"], "certified");
    assert_eq!(
        again["runs"][0]["targets"].as_array().map(Vec::len),
        Some(1)
    );
    // Every target passed now: nothing to rerun.
    let out = run(&db.url, &["rerun", "3509", "--failed"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to rerun"));

    // A newer revision cancels the run of the older one: a second revision of 3509 whose
    // title alone changed.
    let id = rerun(&db.url, "3509");
    let r2 = tmp().join(format!("3509-r2-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(fixture("3509-two-records.yaml")).expect("fixture");
    let first = text.split("\n---").next().expect("first record");
    std::fs::write(
        &r2,
        first
            .replace("revision: 1", "revision: 2")
            .replace("title: ", "title: (r2) "),
    )
    .expect("r2");
    let out = run(
        &db.url,
        &["submit", &r2.display().to_string(), "--wait", "--json"],
    );
    let v2 = json_of(&out);
    assert_eq!(v2["runs"][0]["revision"], 2, "{v2:#}");
    let old = verdict_of(&db.store, id, Duration::from_secs(60)).await;
    assert_eq!(old["verdict"], "cancelled", "{old:#}");
    assert!(
        old["reason"]
            .as_str()
            .unwrap_or("")
            .contains("superseded by revision 2"),
        "{old:#}"
    );
    let _ = std::fs::remove_file(&r2);
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}

/// Whether the run's boot step is running with its intent recorded (its VM asked for).
async fn boot_running(store: &certo_orchestrator::store::Store, run: i64) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM engine_steps s JOIN engine_intents i ON i.step_id = s.id
                         WHERE s.run_id = $1 AND s.name = 'boot' AND s.state = 'running')",
    )
    .bind(run)
    .fetch_one(store.pool())
    .await
    .expect("boot state")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quarantined_host_gets_work_again_only_after_a_passing_health_check() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("sick{}", std::process::id());
    // The host's libvirt cannot start domains, as on the host that failed three boots.
    let faults: std::sync::Arc<
        std::sync::OnceLock<std::sync::Arc<certo_testkit::hypervisor::Faulty>>,
    > = Default::default();
    let slot = faults.clone();
    let (host, _) = registered_host(&db, &api, &name, 2, move |hv| {
        let f = std::sync::Arc::new(certo_testkit::hypervisor::Faulty::new(hv));
        f.fail_start
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = slot.set(f.clone());
        f
    })
    .await;
    let faulty = faults.get().expect("the agent's hypervisor").clone();
    for _ in 0..3 {
        db.store
            .host_failed(&name, "the host could not boot a VM")
            .await
            .expect("host failed");
    }
    let quarantined = |hosts: Vec<certo_orchestrator::store::HostRow>| {
        hosts
            .into_iter()
            .find(|h| h.name == name)
            .and_then(|h| h.quarantine_reason)
    };
    let why = quarantined(db.store.list_hosts().await.expect("hosts")).expect("quarantined");
    assert!(why.contains("3 infrastructure failures in a row"), "{why}");

    // Still broken: the check says which part fails, and the host stays out of placement.
    let out = run(&db.url, &["host", "check", &name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("unhealthy, stays quarantined"), "{text}");
    assert!(
        text.contains("FAIL domain start  starting certo-health-"),
        "{text}"
    );
    assert!(text.contains("ok   storage"), "{text}");
    assert!(text.contains("ok   hypervisor"), "{text}");
    assert!(
        quarantined(db.store.list_hosts().await.expect("hosts")).is_some(),
        "an unhealthy host was released"
    );

    // Repaired: the periodic check of `certo serve` (one round here) takes it back.
    faulty
        .fail_start
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let ctx = certo_orchestrator::app::Context::new(certo_orchestrator::app::Settings {
        data_dir: data(),
        database_url: Some(db.url.clone()),
        catalogue: None,
        repos: None,
    })
    .expect("context");
    let checked = certo_orchestrator::app::hosts::check_quarantined(&ctx, &db.store)
        .await
        .expect("checks");
    assert_eq!(checked.len(), 1, "{checked:?}");
    assert!(checked[0].released, "{checked:?}");
    assert_eq!(
        quarantined(db.store.list_hosts().await.expect("hosts")),
        None,
        "a healthy host stayed quarantined"
    );
    // And the command on a healthy host: exit 0, every check passed, JSON for scripts.
    let out = run(&db.url, &["host", "check", &name, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(v["report"]["healthy"], true, "{v:#}");
    assert_eq!(v["released"], false, "{v:#}");
    assert!(
        v["report"]["checks"]
            .as_array()
            .is_some_and(|c| c.len() == 4 && c.iter().all(|c| c["ok"] == true)),
        "{v:#}"
    );
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}

/// `certo sweep show ID --json` once the sweep has ended (within `within`).
async fn sweep_ended(db: &str, id: i64, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let v = json_of(&run(db, &["sweep", "show", &id.to_string(), "--json"]));
        if v["state"] != "running" {
            return v;
        }
        assert!(started.elapsed() < within, "the sweep did not end: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `certo sweep run --cells CELL --wait --json`: the sweep's view.
fn sweep(db: &str, cell: &str) -> Value {
    let out = run(db, &["sweep", "run", "--cells", cell, "--wait", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn sweeps_classify_each_cell_against_the_one_before_and_tell_flaky_from_failing() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("sweeper{}", std::process::id());
    let (host, _) = registered_host(&db, &api, &name, 2, |hv| hv).await;
    let _w = WorkerProc::start(&db.url, &api.base, "sweep-worker");
    let cell = "3.2/sl5_i386/glite-WN";
    let of = |v: &Value| {
        let c = &v["cells"][0];
        assert_eq!(c["cell"], cell, "{v:#}");
        c.clone()
    };
    let test = |c: &Value, t: &str| {
        c["tests"]
            .as_array()
            .and_then(|ts| {
                ts.iter().find(|x| {
                    format!(
                        "{}/{}",
                        x["suite"].as_str().unwrap_or(""),
                        x["name"].as_str().unwrap_or("")
                    ) == t
                })
            })
            .cloned()
            .unwrap_or_else(|| panic!("no test {t}: {c:#}"))
    };

    // The first sweep: every test passes.
    let first = sweep(&db.url, cell);
    let c = of(&first);
    assert_eq!(
        (c["state"].as_str(), c["class"].as_str()),
        (Some("ran"), Some("passing")),
        "{c:#}"
    );
    assert_eq!(first["state"], "passed", "{first:#}");
    // Its results are the baseline's now.
    let digest = c["image_digest"].as_str().expect("digest").to_owned();
    let base = db.store.baseline_results(&digest).await.expect("baseline");
    assert!(
        base.iter().any(|(s, _, st)| s == "basic" && st == "pass"),
        "{base:?}"
    );

    // A test that fails once, then passes on a fresh VM: flaky, never a pass.
    host.guest_failures
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let c = of(&sweep(&db.url, cell));
    assert_eq!(c["class"], "flaky", "{c:#}");
    assert_eq!(test(&c, "basic/simulated")["status"], "flaky", "{c:#}");
    assert_eq!(c["trend"], serde_json::json!(["pass"]), "{c:#}");
    // ...and the baseline takes it as failing (a patch failing it is not rejected for it).
    let base = db.store.baseline_results(&digest).await.expect("baseline");
    assert!(
        base.iter()
            .any(|(s, n, st)| s == "basic" && n == "simulated" && st == "fail"),
        "{base:?}"
    );

    // Failing on the retry too (each VM reports two results): newly failing.
    host.guest_failures
        .store(4, std::sync::atomic::Ordering::SeqCst);
    let c = of(&sweep(&db.url, cell));
    assert_eq!(c["class"], "newly failing", "{c:#}");
    let t = test(&c, "basic/simulated");
    assert_eq!(
        (t["status"].as_str(), t["before"].as_str()),
        (Some("fail"), Some("flaky")),
        "{c:#}"
    );

    // It leads with what changed since the last good sweep: here nothing (the same image).
    assert_eq!(c["changed"]["same_image"], true, "{c:#}");
    let out = run(&db.url, &["sweep", "diff", cell]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the same image both nights: no input changed"),
        "{text}"
    );

    // Again: still failing. Then repaired: fixed.
    host.guest_failures
        .store(4, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(of(&sweep(&db.url, cell))["class"], "still failing");
    let last = sweep(&db.url, cell);
    let c = of(&last);
    assert_eq!(c["class"], "fixed", "{c:#}");
    assert_eq!(
        c["trend"],
        serde_json::json!(["pass", "pass", "fail", "fail"]),
        "{c:#}"
    );

    // `sweep ls` lists the five, newest first; `sweep show` prints the matrix.
    let out = run(&db.url, &["sweep", "ls", "--json"]);
    let ls = json_of(&out);
    assert_eq!(ls["sweeps"].as_array().map(Vec::len), Some(5), "{ls:#}");
    assert_eq!(ls["sweeps"][0]["sweep"], last["sweep"], "{ls:#}");
    let out = run(&db.url, &["sweep", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(cell) && text.contains("fixed"), "{text}");
    // Retention: everything past it is pruned to its summary, but the last good sweep of
    // the cell (the last one, fixed) keeps its results.
    let out = run(&db.url, &["sweep", "prune", "--older-than", "1ms"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("pruned the results of 4 cell(s)"),
        "{text}"
    );
    let id = first["sweep"].to_string();
    let old = json_of(&run(&db.url, &["sweep", "show", &id, "--json"]));
    let c = of(&old);
    assert_eq!(
        (c["class"].as_str(), c["results_pruned"].as_bool()),
        (Some("passing"), Some(true)),
        "{old:#}"
    );
    assert_eq!(c["tests"], serde_json::json!([]), "{old:#}");
    let kept = json_of(&run(&db.url, &["sweep", "show", "--json"]));
    let c = of(&kept);
    assert_eq!(
        (c["class"].as_str(), c["results_pruned"].as_bool()),
        (Some("fixed"), Some(false)),
        "{kept:#}"
    );
    assert_eq!(
        c["trend"],
        serde_json::json!(["pass", "pass", "fail", "fail"]),
        "{kept:#}"
    );
    assert!(!c["tests"].as_array().expect("tests").is_empty());
    // Nothing left running on the host, no slot held.
    let held = db.store.held_slots().await.expect("slots");
    assert!(held.values().all(|n| *n == 0), "slots still held: {held:?}");
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_inside_a_sweep_leaves_the_sweep_complete_and_each_cell_counted_once() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("sweepkill{}", std::process::id());
    let (host, _) = registered_host(&db, &api, &name, 2, |hv| hv).await;
    let cell = "3.2/sl5_i386/glite-WN";
    // The first VM's results fail, so `tests` boots a second VM for the flakiness retry: a
    // long step to kill the worker in.
    host.guest_failures
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let mut first = WorkerProc::start(&db.url, &api.base, "sweep-first");
    let out = run(&db.url, &["sweep", "run", "--cells", cell, "--json"]);
    let id = json_of(&out)["sweep"].as_i64().expect("sweep id");
    let started = Instant::now();
    let tests_running = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM engine_steps WHERE run_id = $1 AND name = 'tests' AND state = 'running')",
        )
        .bind(id)
        .fetch_one(db.store.pool())
        .await
        .expect("tests state")
    };
    while !tests_running().await {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the tests step never ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill();
    let _second = WorkerProc::start(&db.url, &api.base, "sweep-second");
    let v = sweep_ended(&db.url, id, Duration::from_secs(300)).await;
    assert_eq!(v["state"], "passed", "{v:#}");
    let cells = v["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 1, "{v:#}");
    assert_eq!(cells[0]["state"], "ran", "{v:#}");
    let total: u64 = v["summary"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(total, 1, "one cell in the summary: {v:#}");
    // The step was taken over under a higher epoch.
    let timeline = db.store.run_timeline(id).await.expect("timeline");
    let tests = timeline
        .iter()
        .find(|s| s.name == "tests")
        .expect("tests step");
    assert!(tests.attempt >= 2, "{tests:?}");
    let held = db.store.held_slots().await.expect("slots");
    assert!(held.values().all(|n| *n == 0), "slots still held: {held:?}");
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refreshed_repository_that_breaks_one_cell_shows_it_newly_failing_with_the_package_then_fixed()
 {
    certo_testkit::ensure_libvirtd();
    let db = certo_testkit::scratch_db().await;
    let pid = std::process::id();
    // Repositories of its own (they are refreshed), over the shared image cache.
    let world = tmp().join(format!("refresh-world-{pid}"));
    let _ = std::fs::remove_dir_all(&world);
    let cp = Command::new("cp")
        .arg("-r")
        .arg(common::world())
        .arg(&world)
        .status()
        .expect("cp");
    assert!(cp.success());
    let dir = tmp().join(format!("refresh-data-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("data dir");
    std::fs::create_dir_all(data().join("imager")).expect("image cache");
    std::os::unix::fs::symlink(data().join("imager"), dir.join("imager")).expect("symlink");
    let certo_here = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_certo"))
            .arg("--data-dir")
            .arg(&dir)
            .arg("--repos")
            .arg(&world)
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env_remove("CERTO_CATALOGUE")
            .env_remove("CERTO_ORCHESTRATOR")
            .output()
            .expect("certo")
    };
    let host = format!("refresh{pid}");
    let out = certo_here(&[
        "up",
        "--listen",
        "127.0.0.1:0",
        "--slots",
        "2",
        "--host",
        &host,
        "--no-schedules",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cells = "3.2/sl5_i386/glite-WN,3.2/sl5_x86_64/glite-WN";
    let sweep = || {
        let out = certo_here(&["sweep", "run", "--cells", cells, "--wait", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_of(&out)
    };
    let cell_of = |v: &Value, cell: &str| -> Value {
        v["cells"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["cell"] == cell))
            .cloned()
            .unwrap_or_else(|| panic!("no cell {cell}: {v:#}"))
    };
    let test_of = |c: &Value, name: &str| -> Value {
        c["tests"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no test {name}: {c:#}"))
    };
    let (i386, x86_64) = ("3.2/sl5_i386/glite-WN", "3.2/sl5_x86_64/glite-WN");
    let refresh = |from: &str| {
        let repo = world.join("rpm/glite/3.2/sl5/i386");
        let src = world.join("rpm/refresh/3.2/sl5/i386").join(from);
        for e in std::fs::read_dir(&src).expect("refresh dir").flatten() {
            if e.path().extension().is_some_and(|x| x == "rpm") {
                std::fs::copy(e.path(), repo.join(e.file_name())).expect("copy rpm");
            }
        }
        let st = Command::new("createrepo_c")
            .args(["--quiet", "--no-database", "--simple-md-filenames"])
            .arg(&repo)
            .status()
            .expect("createrepo_c");
        assert!(st.success());
    };

    // Night 1: both cells run; the worker node's site check passes on both.
    let v1 = sweep();
    for cell in [i386, x86_64] {
        let c = cell_of(&v1, cell);
        assert_eq!(c["state"], "ran", "{c:#}");
        assert_eq!(test_of(&c, "30-wn-info")["status"], "pass", "{c:#}");
    }

    // The i386 baseline repository is refreshed: glite-wn-info 1.2.4 loses the site name.
    refresh("broken");
    let v2 = sweep();
    assert_eq!(
        v2["summary"]["newly failing"], 1,
        "exactly one cell newly failing: {v2:#}"
    );
    let c = cell_of(&v2, i386);
    assert_eq!(c["class"], "newly failing", "{c:#}");
    assert_eq!(test_of(&c, "30-wn-info")["class"], "newly failing", "{c:#}");
    let other = cell_of(&v2, x86_64);
    assert_ne!(other["class"], "newly failing", "{other:#}");
    assert_eq!(
        test_of(&other, "30-wn-info")["class"],
        "passing",
        "{other:#}"
    );
    // It leads with what changed: the package and both versions, the repository, the layer.
    let changed = &c["changed"];
    let pkg = changed["packages"]
        .as_array()
        .and_then(|ps| {
            ps.iter().find(|p| {
                p["package"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("glite-wn-info"))
            })
        })
        .cloned()
        .unwrap_or_else(|| panic!("glite-wn-info not among the changes: {c:#}"));
    assert!(
        pkg["before"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.2.3-1"))
            && pkg["after"]
                .as_str()
                .is_some_and(|v| v.starts_with("1.2.4-1")),
        "{pkg:#}"
    );
    assert!(
        changed["repositories"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["repository"] == "glite/3.2")),
        "{changed:#}"
    );
    let out = certo_here(&["sweep", "diff", i386]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("package glite-wn-info.i386: 1.2.3-1") && text.contains("-> 1.2.4-1"),
        "{text}"
    );

    // Fixed in the repository: glite-wn-info 1.2.5.
    refresh("fixed");
    let v3 = sweep();
    let c = cell_of(&v3, i386);
    assert_eq!(test_of(&c, "30-wn-info")["class"], "fixed", "{c:#}");
    assert_ne!(c["class"], "newly failing", "{c:#}");
    let out = certo_here(&["down", "--keep-store"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&world);
    let _ = std::fs::remove_dir_all(&dir);
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_also_runs_the_image_of_each_patch_in_flight_on_its_cell() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("inflight{}", std::process::id());
    let (host, _) = registered_host(&db, &api, &name, 2, |hv| hv).await;
    // 3509 (3.2 WN on SL5 i386) is in flight (its certification started, no worker yet);
    // 3510 (3.1 CE on SL4 i386) is stored only.
    let out = run(&db.url, &["submit", &fixture("3509-two-records.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rerun(&db.url, "3509");
    let cell = "3.2/sl5_i386/glite-WN";
    let out = run(&db.url, &["sweep", "run", "--cells", cell, "--json"]);
    let id = json_of(&out)["sweep"].as_i64().expect("sweep id");
    let sweep_run = db
        .store
        .run(id)
        .await
        .expect("run")
        .expect("the sweep's run");
    assert_eq!(
        sweep_run.targets,
        vec![cell.to_owned(), format!("{cell}#3509r1")],
        "the cell, then the patch in flight on it"
    );
    let _w = WorkerProc::start(&db.url, &api.base, "inflight-worker");
    let v = sweep_ended(&db.url, id, Duration::from_secs(600)).await;
    let cells = v["cells"].as_array().expect("cells");
    let find = |k: &str| {
        cells
            .iter()
            .find(|c| c["cell"] == k)
            .cloned()
            .unwrap_or_else(|| panic!("no row {k}: {v:#}"))
    };
    let (base, patch) = (find(cell), find(&format!("{cell}#3509r1")));
    assert_eq!(
        (base["state"].as_str(), patch["state"].as_str()),
        (Some("ran"), Some("ran")),
        "{v:#}"
    );
    assert_ne!(
        base["image_digest"], patch["image_digest"],
        "the patch's own image: {v:#}"
    );
    // Only the cell's baseline refreshes the baseline results.
    let patch_digest = patch["image_digest"].as_str().expect("digest");
    assert!(
        db.store
            .baseline_results(patch_digest)
            .await
            .expect("baseline")
            .is_empty()
    );
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_that_cannot_run_is_not_run_with_the_reason_never_a_pass_or_a_failure() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("norun{}", std::process::id());
    // The only host's libvirt cannot start a domain: every boot fails (infrastructure).
    let (host, _) = registered_host(&db, &api, &name, 2, |hv| {
        let f = certo_testkit::hypervisor::Faulty::new(hv);
        f.fail_start
            .store(true, std::sync::atomic::Ordering::SeqCst);
        std::sync::Arc::new(f)
    })
    .await;
    let _w = WorkerProc::start(&db.url, &api.base, "norun-worker");
    let cell = "3.2/sl5_i386/glite-WN";
    let v = sweep(&db.url, cell);
    let c = &v["cells"][0];
    assert_eq!(
        (c["state"].as_str(), c["class"].as_str()),
        (Some("not run"), Some("not run")),
        "{v:#}"
    );
    let reason = c["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("boot: "), "{reason}");
    assert!(c["tests"].as_array().is_some_and(Vec::is_empty), "{v:#}");
    assert_eq!(v["summary"], serde_json::json!({"not run": 1}), "{v:#}");
    // Its slot was given back.
    let held = db.store.held_slots().await.expect("slots");
    assert!(held.values().all(|n| *n == 0), "slots still held: {held:?}");
    drop(host);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}

/// Loads `url` in headless Chromium (a fresh profile); returns the DOM as rendered and
/// saves a screenshot to `shot`.
fn chromium(url: &str, shot: &std::path::Path) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let base = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
    };
    let mut dump = Command::new("chromium");
    base(&mut dump);
    let out = dump
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium (Debian's `chromium`; scripts/lib.sh installs it)");
    assert!(
        out.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut snap = Command::new("chromium");
    base(&mut snap);
    let shot_out = snap
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .output()
        .expect("chromium");
    assert!(
        shot_out.status.success() && shot.exists(),
        "no screenshot of {url}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_in_headless_chromium_shows_a_red_cell_the_queue_and_a_rejected_patch() {
    let db = certo_testkit::scratch_db().await;
    let api = certo_testkit::api_server(&db.store, Duration::from_secs(10)).await;
    let name = format!("dash{}", std::process::id());
    let (host, _) = registered_host(&db, &api, &name, 2, |hv| hv).await;
    let mut worker = WorkerProc::start(&db.url, &api.base, "dash-worker");
    let cell = "3.2/sl5_i386/glite-WN";
    // A good night, then 3509 (3.2 WN on SL5 i386) with its first test failing: rejected.
    let first = sweep(&db.url, cell);
    assert_eq!(first["cells"][0]["class"], "passing", "{first:#}");
    let out = run(&db.url, &["submit", &fixture("3509-two-records.yaml")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    host.guest_failures
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let out = run(&db.url, &["rerun", "3509", "--wait", "--json"]);
    let rejected = json_of(&out)["runs"][0].clone();
    assert_eq!(rejected["verdict"], "rejected", "{rejected:#}");
    // A bad night: every test of the cell fails, retries too: newly failing.
    host.guest_failures
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    let bad = sweep(&db.url, cell);
    assert_eq!(bad["cells"][0]["class"], "newly failing", "{bad:#}");
    host.guest_failures
        .store(0, std::sync::atomic::Ordering::SeqCst);
    // Something in the queue: no worker, and 3213 r1 submitted for certification.
    worker.kill();
    let out = run(&db.url, &["submit", &fixture("3213-lb-r1.txt")]);
    assert!(out.status.success());
    let queued = rerun(&db.url, "3213");

    let mut serve_cmd = certo(
        &db.url,
        &["serve", "--listen", "127.0.0.1:0", "--public-dashboard"],
    );
    let serve = certo_testkit::process::Listening::spawn(
        serve_cmd.stderr(Stdio::null()),
        Duration::from_secs(30),
    );
    let shots = tmp().join("dashboard");
    std::fs::create_dir_all(&shots).expect("screenshots dir");

    // The matrix: the cell is red and says so; the other cells of the release are there.
    let dom = chromium(&format!("{}/matrix", serve.url), &shots.join("matrix.png"));
    let chip = dom
        .split("<a class=\"chip ")
        .find(|c| c.contains(&format!("data-cell=\"{cell}\"")))
        .unwrap_or_else(|| panic!("no chip for {cell} in the matrix:\n{dom}"));
    assert!(chip.starts_with("bad"), "the cell is not red: {chip}");
    assert!(chip.contains("newly failing"), "{chip}");
    // Its trend: the one night before, which passed.
    assert!(chip.contains("<span class=\"trend\">.</span>"), "{chip}");
    assert!(
        dom.contains("gLite 3.1") && dom.contains("gLite 3.2"),
        "{dom}"
    );
    assert!(
        dom.contains("sl5 i386") || dom.contains("SL5 i386"),
        "{dom}"
    );

    // The queue: 3213 waiting for a worker.
    let dom = chromium(&format!("{}/queue", serve.url), &shots.join("queue.png"));
    assert!(dom.contains(&format!("run {queued}")), "{dom}");
    assert!(dom.contains("patch 3213 r1"), "{dom}");
    assert!(dom.contains("L&amp;B server 2.1 purge fix"), "{dom}");

    // The rejected patch: the verdict line first, red, with the failing test and its output.
    let dom = chromium(
        &format!("{}/patches/3509", serve.url),
        &shots.join("patch-3509.png"),
    );
    let verdict = dom
        .split("id=\"verdict\">")
        .nth(1)
        .and_then(|v| v.split("</div>").next())
        .unwrap_or_else(|| panic!("no verdict line:\n{dom}"));
    assert!(verdict.contains("rejected at"), "{verdict}");
    assert!(dom.contains("class=\"verdict bad\""), "{dom}");
    let failing = dom
        .split("<tr class=\"test ")
        .skip(1)
        .find(|r| r.starts_with("bad"))
        .unwrap_or_else(|| panic!("no failing test row:\n{dom}"));
    assert!(failing.contains("data-test=\"basic/"), "{failing}");
    assert!(dom.contains("<svg"), "no timeline: {dom}");
    // Not signed in: no rerun or cancel button.
    assert!(!dom.contains("action=\"/patches/3509/rerun\""), "{dom}");
    // The images: 3509's patch layer, with what its digest covers and its cache use.
    let dom = chromium(&format!("{}/images", serve.url), &shots.join("images.png"));
    let patch_layer = dom
        .split("<tr id=\"layer-")
        .skip(1)
        .find(|r| r.contains("<td>patch</td>"))
        .unwrap_or_else(|| panic!("no patch layer on the images page:\n{dom}"));
    assert!(patch_layer.contains("glite-wn"), "{patch_layer}");
    assert!(dom.contains("3.2/sl5_i386/glite-WN"), "{dom}");
    let dom = chromium(
        &format!("{}/savings", serve.url),
        &shots.join("savings.png"),
    );
    assert!(dom.contains("Layer cache:"), "{dom}");
    // The API gives the same evidence to a user: the failing test with its output, the logs.
    let out = run(
        &db.url,
        &["user", "add", "ops", "--role", "admin", "--json"],
    );
    let token = json_of(&out)["token"].as_str().expect("token").to_owned();
    let run_id = rejected["run"].as_i64().expect("run");
    let api_get = |path: String| {
        let (url, token) = (serve.url.clone(), token.clone());
        async move {
            let r = reqwest::Client::new()
                .get(format!("{url}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status().as_u16(), 200, "{path}");
            serde_json::from_str::<Value>(&r.text().await.expect("body")).expect("JSON")
        }
    };
    let tests = api_get(format!("/api/v1/runs/{run_id}/tests")).await;
    let failing = tests[0]["tests"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["status"] == "fail").cloned())
        .unwrap_or_else(|| panic!("no failing test: {tests:#}"));
    assert_eq!(failing["name"], "simulated", "{failing:#}");
    assert!(
        failing["output"]
            .as_str()
            .unwrap_or("")
            .contains("failed on purpose"),
        "{failing:#}"
    );
    let logs = api_get(format!("/api/v1/runs/{run_id}/logs")).await;
    assert!(
        !logs[0]["harness_log"].as_str().unwrap_or("").is_empty(),
        "{logs:#}"
    );
    // An image downloaded from its page: the ext4 file whole, with its ext4 magic.
    let images = api_get("/api/v1/images".to_owned()).await;
    let digest = images[0]["digest"].as_str().expect("an image").to_owned();
    let ext4 = images[0]["artefacts"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["format"] == "ext4"))
        .and_then(|a| a["path"].as_str())
        .expect("its ext4 artefact")
        .to_owned();
    let r = reqwest::get(format!("{}/images/{digest}/ext4", serve.url))
        .await
        .expect("download");
    assert_eq!(r.status().as_u16(), 200);
    let bytes = r.bytes().await.expect("body");
    assert_eq!(
        bytes.len() as u64,
        std::fs::metadata(&ext4).expect("file").len()
    );
    assert_eq!(
        &bytes[1080..1082],
        &[0x53, 0xef],
        "no ext4 superblock magic"
    );
    for (path, status) in [
        (format!("/images/{digest}/exe"), 422),
        ("/images/..%2F..%2Fetc%2Fpasswd/ext4".to_owned(), 422),
        (format!("/images/{}/ext4", "0".repeat(64)), 404),
    ] {
        let r = reqwest::get(format!("{}{path}", serve.url))
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), status, "{path}");
    }
    // The same rejection for a CI system (JUnit XML, well-formed) and for the tracker (its
    // text form, status Rejected with the reason, itself a valid record).
    let out = run(&db.url, &["show", "3509", "--junit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = String::from_utf8_lossy(&out.stdout).into_owned();
    let junit = shots.join("3509.junit.xml");
    std::fs::write(&junit, &xml).expect("junit file");
    let lint = Command::new("xmllint")
        .arg("--noout")
        .arg(&junit)
        .output()
        .expect("xmllint");
    assert!(
        lint.status.success(),
        "{}
{xml}",
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(
        xml.contains("<testsuite name=\"3.2/sl5_i386/glite-WN\""),
        "{xml}"
    );
    assert!(xml.contains("failures=\"1\""), "{xml}");
    let case = xml
        .split("<testcase ")
        .find(|c| c.contains("name=\"simulated\"") && c.contains(".basic\""))
        .unwrap_or_else(|| panic!("no basic/simulated case: {xml}"));
    assert!(
        case.contains("<failure message=\"failed on purpose"),
        "{case}"
    );
    let out = run(&db.url, &["show", "3509", "--tracker"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Status: Rejected"), "{text}");
    assert!(
        text.contains("rejected at basic on 3.2/sl5_i386/glite-WN"),
        "{text}"
    );
    let tracker = shots.join("3509-tracker.txt");
    std::fs::write(&tracker, &text).expect("tracker file");
    let out = run(&db.url, &["validate", &tracker.display().to_string()]);
    assert!(
        out.status.success(),
        "{}
{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not decided yet: nothing to post back.
    let out = run(&db.url, &["show", "3213", "--tracker"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not decided"));
    for shot in ["matrix.png", "queue.png", "patch-3509.png"] {
        let len = std::fs::metadata(shots.join(shot)).expect("shot").len();
        assert!(len > 10_000, "{shot} is {len} bytes");
    }
    drop(serve);
    let _ = std::fs::remove_file(data().join("host-tokens").join(&name));
    db.drop_db().await.expect("drop");
}
