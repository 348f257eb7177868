//! Outside input the API refuses with a clear 400 and without touching the store: NUL bytes
//! (PostgreSQL's text cannot hold them: they were 500s that lost the result), test seconds
//! that are not finite, registration fields with other schemes, control characters or no
//! bound, VM names that are not Certo domain names.

use std::time::Duration;

use certo_orchestrator::api;
use certo_orchestrator::model::Suite;
use certo_orchestrator::store::NewVm;

use crate::common;

async fn send(
    req: reqwest::RequestBuilder,
    token: &str,
    vm: Option<&str>,
    body: Vec<u8>,
) -> (u16, String) {
    let mut req = req
        .header("authorization", format!("Bearer {token}"))
        .body(body);
    if let Some(vm) = vm {
        req = req.header("x-certo-vm", vm);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_guest_and_host_input_is_refused_and_changes_nothing() {
    let db = common::scratch().await;
    let server = certo_testkit::api_server(&db.store, Duration::from_secs(60)).await;
    db.store
        .add_host("h1", &api::token_digest("hard-host-token"))
        .await
        .expect("host");
    let token = api::new_token().expect("token");
    let name = "certo-r5-glite-wn-a1";
    db.store
        .create_vm(&NewVm {
            name,
            host: "h1",
            image: "img",
            node_type: "glite-WN",
            patch: None,
            attempt: 1,
            suite: Suite::All,
            token_sha256: &api::token_digest(&token),
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await
        .expect("vm");
    let http = reqwest::Client::new();
    let guest = |what: &str| http.post(format!("{}/api/v1/guest/{what}", server.base));
    let (status, body) = send(guest("join"), &token, Some(name), Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    // After join the harness speaks with the session key join returned.
    let token = session_of(&body);
    let before = common::snapshot(&db).await;

    let refused: Vec<(&str, Vec<u8>, &str)> = vec![
        ("result", b"basic t1 pass 0.5\nout\0put\n".to_vec(), "NUL"),
        ("log", b"a log line\0\n".to_vec(), "NUL"),
        ("service", b"svc\0 2170 up".to_vec(), "NUL"),
        ("done", b"error \0boom".to_vec(), "NUL"),
        ("result", b"basic t1 pass NaN\n".to_vec(), "finite"),
        ("result", b"basic t1 pass -inf\n".to_vec(), "finite"),
        ("result", b"basic t1 pass -1\n".to_vec(), "finite"),
    ];
    for (what, body, says) in refused {
        let (status, answer) = send(guest(what), &token, Some(name), body.clone()).await;
        assert_eq!(status, 400, "{what} {body:?}: {answer}");
        assert!(answer.contains(says), "{what}: {answer}");
    }
    // A VM token without the VM's name (X-Certo-VM) is not enough.
    let (status, answer) = send(guest("log"), &token, None, b"no name\n".to_vec()).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("X-Certo-VM"), "{answer}");
    assert_eq!(
        common::snapshot(&db).await,
        before,
        "a refused guest call changed the store"
    );

    let register = |body: String| {
        send(
            http.post(format!("{}/api/v1/hosts/h1/register", server.base)),
            "hard-host-token",
            None,
            body.into_bytes(),
        )
    };
    let reg = |url: &str, uri: &str| {
        serde_json::json!({
            "agent_url": url, "libvirt_uri": uri, "slots": 1, "memory_mib": 1024, "vcpus": 1
        })
        .to_string()
    };
    for (body, says) in [
        (reg("file:///etc/passwd", "qemu:///system"), "http"),
        (
            reg("http://10.0.0.2:7310\nforged", "qemu:///system"),
            "control",
        ),
        (
            reg("http://10.0.0.2:7310", &"q".repeat(10_000)),
            "libvirt_uri",
        ),
        (reg("http://10.0.0.2:7310", "qemu:///sys\0tem"), "control"),
    ] {
        let (status, answer) = register(body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(says), "{answer}");
    }
    let hosts = db.store.list_hosts().await.expect("hosts");
    assert!(hosts.iter().all(|h| h.registered_at.is_none()), "{hosts:?}");

    // A VM name that is not a Certo domain name never reaches the store.
    let (status, answer) = send(
        http.get(format!("{}/api/v1/vms/a%00b", server.base)),
        "hard-host-token",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    drop(server);
    db.drop_db().await.expect("drop");
}

/// `certo validate` on a FIFO answers at once (it once waited for a writer forever).
#[test]
fn validating_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("patch.txt");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_certo"))
        .arg("validate")
        .arg(&fifo)
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("certo validate");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("certo validate on a FIFO did not return within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    assert_eq!(status.code(), Some(1));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("not a regular file"), "{text}");
}

/// A relative `--repos` works like an absolute one (it once became a `file://relative`
/// URL inside dnf, and the build was refused as if the patch were at fault).
#[tokio::test(flavor = "multi_thread")]
async fn a_relative_repository_root_is_taken_from_the_working_directory() {
    let db = common::scratch().await;
    let world = certo_testkit::world();
    let parent = world.parent().expect("parent");
    let relative = world.file_name().expect("name");
    let data = tempfile::tempdir_in(certo_testkit::target_tmp()).expect("data dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_certo"))
        .current_dir(parent)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--repos")
        .arg(relative)
        .args([
            "image",
            "build",
            "--json",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-UI",
        ])
        .env("DATABASE_URL", &db.url)
        .env_remove("CERTO_CATALOGUE")
        .output()
        .expect("certo image build");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    db.drop_db().await.expect("drop");
}

/// The session key a join answered with (its `session KEY` line).
fn session_of(plan: &str) -> String {
    plan.lines()
        .find_map(|l| l.strip_prefix("session "))
        .unwrap_or_else(|| panic!("no session line in {plan:?}"))
        .to_owned()
}

/// Creates a VM run on host `h1` (made if missing) with `deadline`; returns its token.
async fn vm_with_deadline(
    db: &certo_orchestrator::store::scratch::ScratchDb,
    name: &str,
    deadline: chrono::DateTime<chrono::Utc>,
) -> String {
    let _ = db
        .store
        .add_host("h1", &api::token_digest("hard-host-token"))
        .await;
    let token = api::new_token().expect("token");
    db.store
        .create_vm(&NewVm {
            name,
            host: "h1",
            image: "img",
            node_type: "glite-WN",
            patch: None,
            attempt: 1,
            suite: Suite::All,
            token_sha256: &api::token_digest(&token),
            deadline,
        })
        .await
        .expect("vm");
    token
}

/// A guest keeps to the protocol's order and its quotas, and its token dies with its
/// deadline; a run whose deadline passed long ago is ended by the orchestrator itself and
/// leaves the heartbeat's live list (so its host reaps the domain).
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_keeps_to_the_protocol_its_quotas_and_its_deadline() {
    let db = common::scratch().await;
    let server = certo_testkit::api_server(&db.store, Duration::from_millis(200)).await;
    let http = reqwest::Client::new();
    let guest = |what: &str| http.post(format!("{}/api/v1/guest/{what}", server.base));
    let soon = chrono::Utc::now() + chrono::Duration::minutes(5);

    // Order: nothing but a fatal `done error` before join.
    let name = "certo-r21-glite-wn-a1";
    let token = vm_with_deadline(&db, name, soon).await;
    for (what, body) in [
        ("result", "basic t pass 1\n"),
        ("service", "svc 2170 up"),
        ("log", "early\n"),
        ("done", "ok"),
    ] {
        let (status, answer) = send(guest(what), &token, Some(name), body.into()).await;
        assert_eq!(status, 409, "{what} before join: {answer}");
        assert!(answer.contains("before join"), "{answer}");
    }
    let (status, plan) = send(guest("join"), &token, Some(name), Vec::new()).await;
    assert_eq!(status, 200);
    let token = session_of(&plan);

    // Quotas: one result's output, the number of results, the log's bytes.
    let big = format!("basic big pass 1\n{}", "x".repeat(70 * 1024));
    let (status, answer) = send(guest("result"), &token, Some(name), big.into()).await;
    assert_eq!(status, 413, "{answer}");
    for i in 0..api::guest::MAX_RESULTS {
        let (status, answer) = send(
            guest("result"),
            &token,
            Some(name),
            format!("basic t{i} pass 0.1\nok\n").into(),
        )
        .await;
        assert_eq!(status, 200, "result {i}: {answer}");
    }
    let (status, answer) = send(
        guest("result"),
        &token,
        Some(name),
        b"basic one-more pass 1\n".to_vec(),
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    // Replacing a reported result is not a new one.
    let (status, answer) = send(
        guest("result"),
        &token,
        Some(name),
        b"basic t0 fail 0.2\n".to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let chunk = "l".repeat(200 * 1024);
    let mut stored = 0i64;
    loop {
        let (status, answer) = send(guest("log"), &token, Some(name), chunk.clone().into()).await;
        if status == 413 {
            assert!(answer.contains("log bytes"), "{answer}");
            break;
        }
        assert_eq!(status, 200, "{answer}");
        stored += chunk.len() as i64;
        assert!(
            stored <= api::guest::MAX_LOG_BYTES,
            "the log grew past its quota"
        );
    }
    let log = db
        .store
        .vm(name)
        .await
        .expect("vm")
        .map(|vm| vm.id)
        .expect("row");
    assert_eq!(
        db.store.vm_log(log).await.expect("log").len() as i64,
        stored
    );
    assert_eq!(
        db.store.vm_results(log).await.expect("results").len() as i64,
        api::guest::MAX_RESULTS
    );

    // A deadline that passed voids the token, and the sweeper ends the run.
    let late = "certo-r22-glite-wn-a1";
    let token = vm_with_deadline(&db, late, chrono::Utc::now() - chrono::Duration::days(2)).await;
    let (status, answer) = send(guest("join"), &token, Some(late), Vec::new()).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("deadline"), "{answer}");
    let (status, live) = send(
        http.post(format!("{}/api/v1/hosts/h1/heartbeat", server.base)),
        "hard-host-token",
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!live.contains(late), "an expired run is not live: {live}");
    let mut ended = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let vm = db.store.vm(late).await.expect("vm").expect("row");
        if vm.state != certo_orchestrator::model::VmState::Booting {
            ended = Some(vm);
            break;
        }
    }
    let vm = ended.expect("the sweeper never ended the expired run");
    assert_eq!(vm.state, certo_orchestrator::model::VmState::TimedOut);
    assert_eq!(
        vm.fault,
        Some(certo_orchestrator::model::Fault::Infrastructure)
    );
    assert!(vm.token_used_up && vm.finished_at.is_some(), "{vm:?}");
    drop(server);
    db.drop_db().await.expect("drop");
}
