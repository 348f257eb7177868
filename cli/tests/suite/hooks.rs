//! Verdict hooks against a real receiver over HTTP: each verdict decided after a hook was
//! added is delivered once, signed (HMAC-SHA-256 of the exact body), retried with backoff
//! while the receiver fails, every attempt recorded; a receiver that never answers 2xx is
//! given up after the last attempt.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use certo_orchestrator::app::hooks::{self, DeliverySettings};
use certo_orchestrator::engine::workflow::Workflow;
use certo_orchestrator::model::PatchId;
use certo_orchestrator::store::engine::VerdictRow;

/// A request the receiver got: its headers (lowercase names) and body.
#[derive(Debug, Clone)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP receiver that answers 500 to the first `fail` requests, then 200.
async fn receiver(fail: usize) -> (String, Arc<Mutex<Vec<Got>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/certo", listener.local_addr().expect("addr"));
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, length) = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (None, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    break (Some(i + 4), len);
                }
            };
            let Some(start) = head_end else { continue };
            while buf.len() < start + length {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..start]).into_owned();
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                .collect();
            let n = {
                let mut g = seen.lock().expect("lock");
                g.push(Got {
                    headers,
                    body: buf[start..(start + length).min(buf.len())].to_vec(),
                });
                g.len()
            };
            let status = if n <= fail {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, got)
}

async fn verdict(store: &certo_orchestrator::store::Store, patch: u64) -> i64 {
    let run = store
        .create_run(
            &Workflow::certify(),
            Some((PatchId(patch), 1)),
            &["3.2/sl5_x86_64/glite-WN".into()],
        )
        .await
        .expect("run");
    store
        .record_verdict(&VerdictRow {
            run_id: run,
            patch_id: Some(patch as i64),
            revision: Some(1),
            verdict: "rejected".into(),
            stage: Some("install".into()),
            target: Some("3.2/sl5_x86_64/glite-WN".into()),
            reason: Some("glite-wn-env's %post failed".into()),
            detail: serde_json::json!({"verdict": "rejected"}),
            decided_at: chrono::Utc::now(),
        })
        .await
        .expect("verdict");
    run
}

fn quick(attempts: u32) -> DeliverySettings {
    DeliverySettings {
        first_delay: Duration::from_millis(200),
        cap: Duration::from_secs(1),
        attempts,
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn verdicts_are_delivered_once_signed_and_retried_with_backoff() {
    let db = common::scratch().await;
    let store = &db.store;
    // A verdict from before the hook: not owed to it.
    let old = verdict(store, 3001).await;
    let (url, got) = receiver(2).await;
    let secret = "a-shared-secret-of-the-receiver".to_owned();
    let (hook, _) = hooks::add(store, &url, Some(secret.clone()))
        .await
        .expect("hook");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let run = verdict(store, 3002).await;
    let http = reqwest::Client::new();
    let settings = quick(5);
    let started = Instant::now();
    let mut attempts_at = Vec::new();
    loop {
        let before = got.lock().expect("lock").len();
        hooks::deliver_once(store, &http, &settings)
            .await
            .expect("deliver");
        if got.lock().expect("lock").len() > before {
            attempts_at.push(started.elapsed());
        }
        let d = store.deliveries(Some(hook), 10).await.expect("deliveries");
        if d.iter().any(|d| d.state == "delivered") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = store.deliveries(Some(hook), 10).await.expect("deliveries");
    assert_eq!(d.len(), 1, "only the verdict decided after the hook: {d:?}");
    assert_eq!(
        (
            d[0].run_id,
            d[0].state.as_str(),
            d[0].attempts,
            d[0].last_status
        ),
        (run, "delivered", 3, Some(200))
    );
    assert!(d.iter().all(|d| d.run_id != old));
    // Backoff: the third attempt came at least 200 + 400 ms after the first.
    assert_eq!(attempts_at.len(), 3, "{attempts_at:?}");
    assert!(
        attempts_at[2] - attempts_at[0] >= Duration::from_millis(600),
        "{attempts_at:?}"
    );
    // Each attempt: the same body, signed under the secret, naming the verdict.
    let got = got.lock().expect("lock").clone();
    for g in &got {
        let sig = g.header("x-certo-signature").expect("signature");
        assert_eq!(
            sig,
            format!("sha256={}", hooks::signature(&secret, &g.body))
        );
        assert_ne!(
            sig,
            format!(
                "sha256={}",
                hooks::signature("another-secret-0000", &g.body)
            )
        );
        assert_eq!(g.header("x-certo-event"), Some("verdict"));
        assert_eq!(g.body, got[0].body);
    }
    let event: serde_json::Value = serde_json::from_slice(&got[0].body).expect("JSON");
    assert_eq!(
        (
            event["run"].as_i64(),
            event["patch"].as_i64(),
            event["verdict"].as_str(),
            event["stage"].as_str()
        ),
        (Some(run), Some(3002), Some("rejected"), Some("install"))
    );
    // Delivered once: nothing more is sent.
    hooks::deliver_once(store, &http, &settings)
        .await
        .expect("deliver");
    tokio::time::sleep(Duration::from_millis(300)).await;
    hooks::deliver_once(store, &http, &settings)
        .await
        .expect("deliver");
    assert_eq!(
        store.deliveries(Some(hook), 10).await.expect("d")[0].attempts,
        3
    );
    // The secret is nowhere in what `certo hook ls --json` prints.
    let out = common::certo(&db.url, &["hook", "ls", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&url) && !text.contains(&secret), "{text}");
}

#[tokio::test]
async fn a_receiver_that_keeps_failing_is_given_up_after_the_last_attempt() {
    let db = common::scratch().await;
    let store = &db.store;
    let (url, got) = receiver(usize::MAX).await;
    let (hook, _) = hooks::add(store, &url, None).await.expect("hook");
    let run = verdict(store, 3003).await;
    let http = reqwest::Client::new();
    let settings = quick(3);
    let started = Instant::now();
    loop {
        hooks::deliver_once(store, &http, &settings)
            .await
            .expect("deliver");
        let d = store.deliveries(Some(hook), 10).await.expect("deliveries");
        if d.iter().any(|d| d.state == "failed") {
            assert_eq!(
                (d[0].run_id, d[0].attempts, d[0].last_status),
                (run, 3, Some(500))
            );
            assert!(
                d[0].last_error.as_deref().unwrap_or("").contains("500"),
                "{d:?}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.lock().expect("lock").len(), 3);
    // Refused: URLs that are not http(s), or carry credentials; short secrets.
    for (bad, secret) in [
        ("ftp://x.example/h", None),
        ("http://user:pw@x.example/h", None),
        ("http://x.example/h", Some("short".to_owned())),
    ] {
        assert!(hooks::add(store, bad, secret).await.is_err(), "{bad}");
    }
}
