//! Faults: damaged, truncated and refused requests injected by a proxy; concurrent pushes
//! sharing blocks; an interrupted push resumed; a full disk under the repository.

mod support;

use std::sync::atomic::Ordering;

use certo_transfer::{PushOptions, Repository};
use support::{Agent, Fault, FaultProxy, Lcg, Tmpfs, client, client_with, fast_retry, write_image};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_truncated_and_refused_requests_are_retried_and_never_stored() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    // Every request with a body gets a fault in turn: corrupt, pass, truncate, pass, 503,
    // pass, cut, pass, ... so each kind hits missing queries, batches and the commit.
    let proxy = FaultProxy::start(agent.addr, |n, _, _| match n % 8 {
        0 => Fault::Corrupt,
        2 => Fault::Truncate,
        4 => Fault::ServerError,
        6 => Fault::Cut,
        _ => Fault::Pass,
    })
    .await;
    let mut rng = Lcg(21);
    let data = rng.image_like(6 << 20);
    let img = write_image(work.path(), "x.img", &data);
    let c = client_with(&proxy.url(), support::TOKEN, fast_retry(10));
    let mut opts = PushOptions::new("x");
    opts.batch_bytes = 256 << 10; // many requests, so every fault kind hits batches
    let summary = c
        .push(&img, opts)
        .await
        .expect("push completes despite faults");
    let st = &proxy.stats;
    assert!(st.corrupted.load(Ordering::SeqCst) >= 3, "{st:?}");
    assert!(st.truncated.load(Ordering::SeqCst) >= 3, "{st:?}");
    assert!(st.server_errors.load(Ordering::SeqCst) >= 3, "{st:?}");
    assert!(st.cuts.load(Ordering::SeqCst) >= 3, "{st:?}");
    assert!(summary.retries >= 12, "{summary:?}");

    let repo = agent.stop().await;
    assert_eq!(
        std::fs::read(repo.image_path("x").expect("name")).expect("assembled"),
        data
    );
    let report = repo.verify().expect("verify");
    assert_eq!(report.bad_records, 0, "no damaged block was ever stored");
    assert_eq!(report.records, report.distinct);
    assert_eq!(report.distinct, summary.blocks_distinct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_pushes_of_images_sharing_blocks() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    let mut rng = Lcg(33);
    let shared = rng.image_like(4 << 20);
    let x = [shared.clone(), rng.image_like(2 << 20)].concat();
    let y = [shared, rng.image_like(2 << 20)].concat();
    let (px, py) = (
        write_image(work.path(), "x.img", &x),
        write_image(work.path(), "y.img", &y),
    );
    let c = client(&agent.url());
    let mut ox = PushOptions::new("x");
    let mut oy = PushOptions::new("y");
    ox.batch_bytes = 128 << 10;
    oy.batch_bytes = 128 << 10;
    let (rx, ry) = tokio::join!(c.push(&px, ox), c.push(&py, oy));
    let (sx, sy) = (rx.expect("push x"), ry.expect("push y"));
    let repo = agent.stop().await;
    for (name, data) in [("x", &x), ("y", &y)] {
        let got = std::fs::read(repo.image_path(name).expect("name")).expect("assembled");
        assert!(got == *data, "{name} is bit-exact");
    }
    let report = repo.verify().expect("verify");
    assert_eq!(report.bad_records, 0);
    assert_eq!(
        report.records, report.distinct,
        "each shared block is stored once"
    );
    // The distinct non-zero blocks of each image, with their lengths.
    let distinct = |data: &[u8]| {
        let index = certo_transfer::BlockIndex::from_reader(data, 4096).expect("index");
        index
            .blocks()
            .iter()
            .filter(|b| !b.is_zero())
            .map(|b| (*b.hash(), u64::from(b.len())))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (bx, by) = (distinct(&x), distinct(&y));
    let union: std::collections::HashMap<_, _> = bx.iter().chain(&by).collect();
    let both = bx.keys().filter(|h| by.contains_key(*h)).count();
    assert!(both >= 900, "the images share most of 4 MiB: {both}");
    assert_eq!(report.distinct, union.len());
    // The repository's own counts: every distinct block is held once, its bytes once.
    assert_eq!(
        repo.block_stats(),
        (union.len(), union.values().copied().sum::<u64>()),
        "every distinct block reached the host and none was stored twice"
    );
    // What each push sent: all of its own distinct blocks that the other image lacks (no
    // one else could deliver them), none twice, and never more than its own; only a shared
    // block can be sent by both, when both asked before either stored it.
    for (name, s, own, other) in [("x", &sx, &bx, &by), ("y", &sy, &by, &bx)] {
        assert_eq!(s.blocks_distinct, own.len(), "{name}: {s:?}");
        let only_here = own.keys().filter(|h| !other.contains_key(*h)).count();
        assert!(
            (only_here..=own.len()).contains(&s.blocks_sent),
            "{name} sent {} blocks; it alone has {only_here}, {} in all: {s:?}",
            s.blocks_sent,
            own.len()
        );
    }
    let sent = sx.blocks_sent + sy.blocks_sent;
    assert!(
        (union.len()..=union.len() + both).contains(&sent),
        "together {sent} blocks sent for {} distinct, {both} of them shared",
        union.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_push_resumes_sending_only_what_is_missing() {
    let work = tempfile::tempdir().expect("tempdir");
    let repo_dir = work.path().join("repo");
    let agent = Agent::start(&repo_dir).await;
    // The connection is cut at the 6th request on: the first push fails part-way.
    let proxy = FaultProxy::start(
        agent.addr,
        |n, _, _| {
            if n >= 6 { Fault::Cut } else { Fault::Pass }
        },
    )
    .await;
    let data = Lcg(44).bytes(8 << 20);
    let img = write_image(work.path(), "x.img", &data);
    let mut opts = PushOptions::new("x");
    opts.batch_bytes = 512 << 10;
    opts.connections = 1;
    let err = client_with(&proxy.url(), support::TOKEN, fast_retry(2))
        .push(&img, opts.clone())
        .await
        .expect_err("the cut push fails");
    assert!(err.to_string().contains("after 2 attempts"), "{err}");
    drop(proxy);
    // The agent restarts on the same repository, which reopens and re-verifies every block.
    let repo = agent.stop().await;
    let (kept, _) = repo.block_stats();
    drop(repo);
    assert!(kept > 0, "some blocks arrived before the cut");
    let agent = Agent::start(&repo_dir).await;
    let summary = client(&agent.url())
        .push(&img, opts)
        .await
        .expect("resumed push");
    assert_eq!(summary.blocks_reused, kept, "{summary:?}");
    assert_eq!(
        summary.blocks_sent,
        2048 - kept,
        "only what is missing is sent"
    );
    let repo = agent.stop().await;
    assert_eq!(
        std::fs::read(repo.image_path("x").expect("name")).expect("assembled"),
        data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_a_clear_error_and_leaves_the_repository_consistent() {
    let disk = Tmpfs::mount("6m");
    let work = tempfile::tempdir().expect("tempdir");
    let repo_dir = disk.path().join("repo");
    let agent = Agent::start(&repo_dir).await;
    let small = Lcg(55).bytes(1 << 20);
    let big = Lcg(56).bytes(12 << 20);
    let (ps, pb) = (
        write_image(work.path(), "small.img", &small),
        write_image(work.path(), "big.img", &big),
    );
    let c = client(&agent.url());
    c.push(&ps, PushOptions::new("small"))
        .await
        .expect("a small image fits");
    let err = c
        .push(&pb, PushOptions::new("big"))
        .await
        .expect_err("the big image does not fit");
    assert_eq!(
        err.status(),
        Some(reqwest::StatusCode::INSUFFICIENT_STORAGE),
        "{err}"
    );
    assert!(err.to_string().contains("out of disk space"), "{err}");
    drop(c);
    let repo = agent.stop().await;
    drop(repo);
    // Reopened, the repository verifies, holds the small image and no trace of the big one.
    let (repo, opened) = Repository::open(&repo_dir).expect("reopens");
    assert_eq!(
        opened.truncated_bytes, 0,
        "failed appends were cut back at once"
    );
    let report = repo.verify().expect("verify");
    assert_eq!((report.bad_records, report.images_missing_blocks), (0, 0));
    let names: Vec<String> = repo
        .images()
        .expect("list")
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, vec!["small".to_string()]);
    assert!(repo.manifest("big").is_err());
    assert_eq!(
        std::fs::read(repo.image_path("small").expect("name")).expect("assembled"),
        small
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_refers_to_the_questions_and_falls_back_when_the_host_forgot_them() {
    let work = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&work.path().join("repo")).await;
    let mut rng = Lcg(41);
    let data = rng.image_like(8 << 20);
    let img = write_image(work.path(), "x.img", &data);

    // Normally the commit is the session form: a few bytes per thousand blocks, where the
    // compact form would repeat 8 bytes per distinct block.
    let c = client(&agent.url());
    let summary = c.push(&img, PushOptions::new("x")).await.expect("push");
    let index = certo_transfer::BlockIndex::from_reader(&data[..], 4096).expect("index");
    let compact = certo_transfer::wire::compress(&index.to_compact_bytes(), 3).expect("zstd");
    assert!(
        summary.index_bytes * 20 < compact.len(),
        "session commit of {} bytes, compact index {} bytes",
        summary.index_bytes,
        compact.len()
    );
    assert_eq!(summary.rounds, 1);

    // A host that never kept the session (restarted): the session commit gets 410 from the
    // real agent, and the push commits the compact form instead, in the same round.
    let proxy = FaultProxy::start(agent.addr, |_, _, path| {
        if path.starts_with("/v1/blocks/missing") {
            Fault::StripSession
        } else {
            Fault::Pass
        }
    })
    .await;
    let data2 = [data.clone(), rng.image_like(1 << 20)].concat();
    let img2 = write_image(work.path(), "y.img", &data2);
    let c = client(&proxy.url());
    let summary = c.push(&img2, PushOptions::new("y")).await.expect("push");
    assert_eq!(summary.rounds, 1);
    assert!(summary.blocks_sent <= 256, "only the new MiB: {summary:?}");
    let index2 = certo_transfer::BlockIndex::from_reader(&data2[..], 4096).expect("index");
    let compact2 = certo_transfer::wire::compress(&index2.to_compact_bytes(), 3).expect("zstd");
    assert_eq!(
        summary.index_bytes,
        compact2.len(),
        "the commit that took was the compact form"
    );
    let repo = agent.stop().await;
    assert_eq!(
        std::fs::read(repo.image_path("y").expect("name")).expect("assembled"),
        data2
    );
}

// ----------------------------------------------------------------------------------------
// The bounded HTTP loop (certo_transfer::http) under clients that never finish.

mod bounded {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use axum::Router;
    use axum::routing::{get, post};
    use certo_transfer::http::{Limits, serve};

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            max_in_flight: 1,
            header_timeout: Duration::from_millis(800),
            body_timeout: Duration::from_millis(800),
            shutdown_grace: Duration::from_millis(800),
        }
    }

    /// A server of `/len` (the body's length) and `/slow` (answers after 1.5 s), and the
    /// sender that stops it.
    async fn server() -> (
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let router = Router::new()
            .route(
                "/len",
                post(|body: axum::body::Bytes| async move { body.len().to_string() }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    "slow"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, router, limits(), async move {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        (addr, tx, task)
    }

    /// Seconds until the server closes `stream` (reads until EOF), at most `max`.
    fn seconds_until_closed(stream: &mut TcpStream, max: Duration) -> Option<f64> {
        stream.set_read_timeout(Some(max)).expect("timeout");
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Some(t.elapsed().as_secs_f64()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(t.elapsed().as_secs_f64());
                }
                Err(_) => return None,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn idle_half_sent_and_stalled_connections_are_closed_in_bounded_time() {
        let (addr, _stop, _task) = server().await;
        let (a, b, c) = (addr.clone(), addr.clone(), addr.clone());
        let idle = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&a).expect("connect");
            seconds_until_closed(&mut s, Duration::from_secs(5))
        });
        let half_header = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&b).expect("connect");
            s.write_all(b"POST /len HTTP/1.1\r\nHost: x\r\nContent-Le")
                .expect("write");
            seconds_until_closed(&mut s, Duration::from_secs(5))
        });
        let stalled_body = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&c).expect("connect");
            s.write_all(b"POST /len HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
                .expect("write");
            let mut answer = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let t = Instant::now();
            let _ = s.read_to_end(&mut answer);
            (
                t.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        });
        let idle = idle
            .await
            .expect("task")
            .expect("the idle connection was never closed");
        let half = half_header
            .await
            .expect("task")
            .expect("the half-sent header was never closed");
        let (stall, answer) = stalled_body.await.expect("task");
        assert!(
            (0.5..2.5).contains(&idle),
            "idle connection closed after {idle} s"
        );
        assert!(
            (0.5..2.5).contains(&half),
            "half-sent header closed after {half} s"
        );
        assert!(stall < 2.5, "stalled body kept {stall} s");
        assert!(
            !answer.contains("\r\n\r\n10") && !answer.contains("\r\n\r\n100"),
            "a stalled body reached the handler: {answer:?}"
        );
        // A client that behaves is served.
        let ok = reqwest::Client::new()
            .post(format!("http://{addr}/len"))
            .body("hello")
            .send()
            .await
            .expect("request");
        assert_eq!(ok.text().await.expect("body"), "5");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn connections_and_requests_in_flight_are_capped() {
        let (addr, _stop, _task) = server().await;
        // Four idle connections take every slot: a fifth is closed at once.
        let held: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(&addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let a = addr.clone();
        let fifth = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(&a).expect("connect");
            seconds_until_closed(&mut s, Duration::from_millis(500))
        })
        .await
        .expect("task");
        assert!(fifth.is_some_and(|t| t < 0.4), "over the cap: {fifth:?}");
        drop(held);
        std::thread::sleep(Duration::from_millis(200));
        // One request in flight at once: a second one meanwhile is told to come back.
        let http = reqwest::Client::new();
        let slow = tokio::spawn({
            let http = http.clone();
            let url = format!("http://{addr}/slow");
            async move { http.get(url).send().await.expect("slow").status().as_u16() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let busy = http
            .post(format!("http://{addr}/len"))
            .body("x")
            .send()
            .await
            .expect("request");
        assert_eq!(busy.status(), 503);
        assert_eq!(slow.await.expect("task"), 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn shutdown_with_a_half_sent_request_open_ends_within_its_grace() {
        let (addr, stop, task) = server().await;
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.write_all(b"POST /len HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n01234")
            .expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        stop.send(()).expect("stop");
        task.await.expect("server task");
        let took = t.elapsed().as_secs_f64();
        assert!(
            took < 1.5,
            "shutdown took {took} s with a half-sent request open"
        );
    }
}
