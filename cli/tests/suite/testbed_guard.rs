//! The testbed's protection over real HTTP and TCP against a real PostgreSQL: the shared
//! top BDII `certo testbed serve-bdii` runs, and the guest API refusing a patch slice that
//! would take it over (by its name, or by announcing its identity from outside), with the
//! refusal kept in the run's reason as `testbed: ...`.

use crate::common;

use std::io::{Read, Write};
use std::time::Duration;

use certo_orchestrator::api::{self, ApiState};
use certo_orchestrator::model::{Fault, VmState};
use certo_orchestrator::store::{NewVm, ProbeOutcomeKind, Store};
use certo_orchestrator::testbed::guard;
use certo_testkit::process::Listening;

/// What 3506's bdii-top says on its port (fixtures/world/packages.sh).
const HIJACK_BANNER: &str = "dn: mds-vo-name=testbed-bdii.certo,o=grid\nversion: glite-bdii-top-hijack 1.0-1\nGlueServiceUniqueID: testbed-bdii.certo:2170\nGlueServiceType: bdii_top\n";

fn serve_bdii(db: &str, data: &std::path::Path) -> Listening {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_certo"));
    cmd.arg("--data-dir")
        .arg(data)
        .args([
            "testbed",
            "serve-bdii",
            "--name",
            "testbed-bdii.certo",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", db)
        .env_remove("CERTO_CATALOGUE")
        .stderr(std::process::Stdio::piped());
    Listening::spawn(&mut cmd, Duration::from_secs(30))
}

/// All a TCP client gets from `addr` after sending `send`.
fn said(addr: &str, send: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(send.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read to the end");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_top_bdii_answers_as_itself_takes_no_registration_and_stays_healthy() {
    let db = common::scratch().await;
    let data = std::env::temp_dir().join(format!("certo-serve-bdii-{}", std::process::id()));
    let mut bdii = serve_bdii(&db.url, &data);
    let addr = bdii.url.clone();
    let port = addr.rsplit(':').next().expect("port").to_owned();
    let banner = format!(
        "dn: mds-vo-name=testbed-bdii.certo,o=grid\nGlueServiceUniqueID: testbed-bdii.certo:{port}\nGlueServiceType: bdii_top\n"
    );
    assert_eq!(said(&addr, ""), banner);
    // A hijacker's registration (3506's bdii-top on start) is heard and changes nothing.
    assert_eq!(
        said(
            &addr,
            "REGISTER GlueServiceUniqueID=testbed-bdii.certo:2170 GlueServiceType=bdii_top\n"
        ),
        banner
    );
    assert_eq!(said(&addr, ""), banner);

    // It is registered as a shared service, once, and the health checks find it healthy.
    let shared = db.store.services(None).await.expect("services");
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0].name, "testbed-bdii.certo");
    assert_eq!(shared[0].node_type, "glite-BDII");
    assert_eq!(shared[0].endpoint, addr);
    assert!(shared[0].slice.is_none());
    let d = data.to_str().expect("utf-8");
    let out = common::certo(&db.url, &["--data-dir", d, "testbed", "check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checked = String::from_utf8_lossy(&out.stdout);
    assert!(
        checked
            .lines()
            .any(|l| l.starts_with("testbed-bdii.certo") && l.trim_end().ends_with(" healthy")),
        "{checked}"
    );
    let s = &db.store.services(None).await.expect("services")[0];
    assert!(s.healthy && s.last_check.is_some(), "{s:?}");
    assert_eq!(s.health_detail.as_deref(), Some("answers"));
    // Still serving after the check.
    assert_eq!(said(&addr, ""), banner);

    // Served again on another port: the same shared service, moved.
    bdii.kill();
    let mut stderr = String::new();
    bdii.child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(
        stderr.contains("takes no registrations")
            && stderr.contains("REGISTER GlueServiceUniqueID=testbed-bdii.certo:2170"),
        "{stderr}"
    );
    let again = serve_bdii(&db.url, &data);
    let shared = db.store.services(None).await.expect("services");
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0].endpoint, again.url);
    drop(again);
    let out = common::certo(&db.url, &["--data-dir", d, "testbed", "check"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("UNHEALTHY"),
        "a stopped top BDII must not stay healthy"
    );
    let _ = std::fs::remove_dir_all(&data);
    db.drop_db().await.expect("drop");
}

struct Api {
    base: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn api(store: &Store) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve(
        listener,
        ApiState::protocols(store.clone()),
        Duration::from_millis(200),
        async move {
            let _ = rx.await;
        },
    ));
    Api { base, _stop: tx }
}

async fn post(url: &str, token: &str, vm: &str, body: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("x-certo-vm", vm)
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// A joined VM of patch 3506's BDII slice: (id, session key).
async fn joined_vm(store: &Store, base: &str, name: &str) -> (i64, String) {
    let _ = store
        .add_host("h1", &api::token_digest("host-one-token"))
        .await
        .expect("host");
    let token = api::new_token().expect("token");
    let vm = store
        .create_vm(&NewVm {
            name,
            host: "h1",
            image: "img",
            node_type: "glite-BDII",
            patch: Some((certo_orchestrator::model::PatchId(3506), 1)),
            attempt: 1,
            suite: certo_orchestrator::model::Suite::All,
            token_sha256: &api::token_digest(&token),
            deadline: chrono::Utc::now() + chrono::Duration::minutes(5),
        })
        .await
        .expect("vm");
    let (status, plan) = post(&format!("{base}/api/v1/guest/join"), &token, name, "").await;
    assert_eq!(status, 200, "{plan}");
    let session = plan
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .expect("session")
        .to_owned();
    (vm.id, session)
}

/// Stands in for the host's agent: every pending probe of `vm` is answered with `said`.
fn host_sees(store: Store, vm: i64, said: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (service, port) in store.pending_probes(vm).await.expect("probes") {
                store
                    .record_probe(vm, &service, port, ProbeOutcomeKind::Answered, said)
                    .await
                    .expect("record");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slice_that_would_take_over_the_shared_top_bdii_is_refused_at_testbed() {
    let db = common::scratch().await;
    // The shared top BDII, served for real.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shared_at = listener.local_addr().expect("addr").to_string();
    let (stop_bdii, bdii_stopped) = tokio::sync::oneshot::channel::<()>();
    let bdii = tokio::spawn(async move {
        certo_orchestrator::testbed::serve_top_bdii(listener, "testbed-bdii.certo", async move {
            let _ = bdii_stopped.await;
        })
        .await
    });
    db.store
        .register_service("testbed-bdii.certo", "glite-BDII", &shared_at, None, None)
        .await
        .expect("shared");
    let api = api(&db.store).await;
    let u = |what: &str| format!("{}/api/v1/guest/{what}", api.base);

    // 1. A slice's service registering under the shared name: refused, `testbed: ...`.
    let name = "certo-r20-glite-bdii-a1";
    let (id, session) = joined_vm(&db.store, &api.base, name).await;
    let looking = host_sees(db.store.clone(), id, "dn: o=grid\nversion: bdii 5.2.4-1\n");
    let (status, body) = post(&u("service"), &session, name, "testbed-bdii.certo 2170 up").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body.trim(),
        format!(
            "testbed: testbed-bdii.certo at bdii-{id}.certo:2170 would take over the shared service testbed-bdii.certo at {shared_at} (its name is the shared service's: a patch's slice cannot take over a service other patches use)"
        )
    );
    looking.abort();
    // The run fails for it, the patch's fault, whatever the tests said.
    let (status, _) = post(&u("done"), &session, name, "error cannot report: service").await;
    assert_eq!(status, 200);
    let vm = db.store.vm(name).await.expect("vm").expect("row");
    assert_eq!(vm.state, VmState::Failed);
    assert_eq!(vm.fault, Some(Fault::Product));
    let reason = vm.reason.clone().expect("reason");
    assert!(
        reason.starts_with("testbed: testbed-bdii.certo at ")
            && reason.ends_with("; the harness reported: cannot report: service"),
        "{reason}"
    );
    assert_eq!(
        guard::refused_registration(&reason).as_deref(),
        body.trim().strip_prefix("testbed: ")
    );
    assert_eq!(
        guard::refused_shared_service(&reason).as_deref(),
        Some("testbed-bdii.certo")
    );

    // 2. 3506's bdii-top under its own name, announcing the shared BDII's identity from
    // outside: refused too, naming the shared service and quoting its unique ID.
    let name = "certo-r21-glite-bdii-a1";
    let (id, session) = joined_vm(&db.store, &api.base, name).await;
    let looking = host_sees(db.store.clone(), id, HIJACK_BANNER);
    let (status, body) = post(&u("service"), &session, name, "bdii-top 2170 up").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        body.trim(),
        "testbed: bdii-top on port 2170 announces the shared service testbed-bdii.certo (GlueServiceUniqueID: testbed-bdii.certo:2170)"
    );
    looking.abort();
    // Even a harness that says all went well does not end it well.
    let (status, _) = post(&u("done"), &session, name, "ok").await;
    assert_eq!(status, 200);
    let vm = db.store.vm(name).await.expect("vm").expect("row");
    assert_eq!(vm.state, VmState::Failed);
    assert_eq!(vm.fault, Some(Fault::Product));
    assert_eq!(
        guard::refused_registration(vm.reason.as_deref().unwrap_or("")).as_deref(),
        Some(
            "bdii-top on port 2170 announces the shared service testbed-bdii.certo (GlueServiceUniqueID: testbed-bdii.certo:2170)"
        )
    );

    // 3. A service of the slice that says nothing of the shared one joins the slice.
    let name = "certo-r22-glite-bdii-a1";
    let (id, session) = joined_vm(&db.store, &api.base, name).await;
    let looking = host_sees(db.store.clone(), id, "dn: o=grid\nversion: bdii 5.2.4-1\n");
    let (status, body) = post(&u("service"), &session, name, "bdii 2170 up").await;
    assert_eq!(status, 200, "{body}");
    looking.abort();
    let (status, _) = post(&u("done"), &session, name, "ok").await;
    assert_eq!(status, 200);
    let vm = db.store.vm(name).await.expect("vm").expect("row");
    assert_eq!(vm.state, VmState::Done, "{vm:?}");
    assert_eq!(vm.reason, None);

    // The shared top BDII is untouched and healthy, and still answers as itself.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let shared = db.store.services(None).await.expect("services");
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0].endpoint, shared_at);
    assert!(shared[0].healthy, "{:?}", shared[0]);
    assert_eq!(shared[0].health_detail.as_deref(), Some("answers"));
    let banner = said(&shared_at, "");
    assert!(
        banner.starts_with("dn: mds-vo-name=testbed-bdii.certo,o=grid\n"),
        "{banner}"
    );
    stop_bdii.send(()).expect("stop");
    bdii.await.expect("join").expect("served");
    db.drop_db().await.expect("drop");
}
