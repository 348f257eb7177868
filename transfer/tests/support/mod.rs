//! Test support: an in-process agent on a real TCP port, a fault-injecting HTTP proxy,
//! deterministic test images, and a small tmpfs for disk-full tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use certo_transfer::{Client, Repository, RetryPolicy, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "test-token-0123";

/// A deterministic pseudo-random generator (no need for a random crate).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (self.0 >> 56) as u8
            })
            .collect()
    }

    /// Bytes that compress a little, like executables: random runs mixed with text.
    pub fn image_like(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let run = self.bytes(1)[0] as usize * 16 + 64;
            if self.bytes(1)[0] < 128 {
                out.extend(self.bytes(run));
            } else {
                out.extend(b"certo transfer test data line\n".iter().cycle().take(run));
            }
        }
        out.truncate(n);
        out
    }
}

/// An agent serving a repository in this process.
pub struct Agent {
    pub addr: SocketAddr,
    pub repo: Arc<Repository>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Agent {
    pub async fn start(dir: &Path) -> Self {
        let dir = dir.to_path_buf();
        let (repo, _) = tokio::task::spawn_blocking(move || Repository::open(&dir))
            .await
            .expect("open task")
            .expect("repository opens");
        let repo = Arc::new(repo);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let router = certo_transfer::router(repo.clone(), Token::new(TOKEN).expect("valid token"));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(certo_transfer::server::serve(listener, router, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            repo,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and returns the repository (for checks after the fact).
    pub async fn stop(mut self) -> Arc<Repository> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        // Connection tasks may still hold the router state for a moment.
        for _ in 0..100 {
            if Arc::strong_count(&self.repo) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.repo.clone()
    }
}

pub fn client(url: &str) -> Client {
    client_with(url, TOKEN, RetryPolicy::default())
}

pub fn client_with(url: &str, token: &str, retry: RetryPolicy) -> Client {
    Client::new(url, Token::new(token).expect("valid token"), retry).expect("client builds")
}

pub fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        first_delay: std::time::Duration::from_millis(20),
        max_delay: std::time::Duration::from_millis(200),
    }
}

pub fn write_image(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test image");
    path
}

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward untouched.
    Pass,
    /// Flip one byte in the middle of the body, then forward.
    Corrupt,
    /// Forward only the first half of the body, with a Content-Length that says so.
    Truncate,
    /// Answer 503 without forwarding.
    ServerError,
    /// Close the connection without answering.
    Cut,
    /// Forward without the `session=` and `start=` parameters (as if the agent had been
    /// restarted and forgot the push session).
    StripSession,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub corrupted: AtomicU64,
    pub truncated: AtomicU64,
    pub server_errors: AtomicU64,
    pub cuts: AtomicU64,
}

/// An HTTP/1.1 proxy that injects faults into requests, one request per connection.
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    task: JoinHandle<()>,
}

type Plan = Arc<dyn Fn(u64, &str, &str) -> Fault + Send + Sync>;

impl FaultProxy {
    /// `plan(n, method, path)` chooses the fault for the n-th request (from 0).
    pub async fn start(
        upstream: SocketAddr,
        plan: impl Fn(u64, &str, &str) -> Fault + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let stats = Arc::new(ProxyStats::default());
        let plan: Plan = Arc::new(plan);
        let st = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (plan, st) = (plan.clone(), st.clone());
                tokio::spawn(async move {
                    let _ = handle(conn, upstream, plan, st).await;
                });
            }
        });
        Self { addr, stats, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    mut conn: TcpStream,
    upstream: SocketAddr,
    plan: Plan,
    st: Arc<ProxyStats>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 8192];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    let mut length = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let lower = name.trim().to_ascii_lowercase();
        if lower == "content-length" {
            length = value.trim().parse().unwrap_or(0);
        } else if lower != "connection" {
            headers.push(line.to_string());
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; 65536];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let n = st.requests.fetch_add(1, Ordering::SeqCst);
    let fault = if body.is_empty() {
        Fault::Pass
    } else {
        plan(n, &method, &path)
    };
    match fault {
        Fault::Pass => {}
        Fault::Corrupt => {
            let mid = body.len() / 2;
            body[mid] ^= 0x5a;
            st.corrupted.fetch_add(1, Ordering::SeqCst);
        }
        Fault::Truncate => {
            body.truncate(body.len() / 2);
            st.truncated.fetch_add(1, Ordering::SeqCst);
        }
        Fault::ServerError => {
            st.server_errors.fetch_add(1, Ordering::SeqCst);
            conn.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await?;
            return Ok(());
        }
        Fault::Cut => {
            st.cuts.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        Fault::StripSession => {
            if let Some((head, rest)) = request_line.split_once(' ')
                && let Some((target, version)) = rest.split_once(' ')
                && let Some((route, query)) = target.split_once('?')
            {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.starts_with("session=") && !p.starts_with("start="))
                    .collect();
                request_line = format!("{head} {route}?{} {version}", kept.join("&"));
            }
        }
    }
    let mut up = TcpStream::connect(upstream).await?;
    let mut out = format!("{request_line}\r\n");
    for h in headers {
        out.push_str(&h);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    up.write_all(out.as_bytes()).await?;
    up.write_all(&body).await?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).await?;
    conn.write_all(&answer).await?;
    conn.shutdown().await
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop (needs root).
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        assert!(
            is_root(),
            "this test mounts a tmpfs and must run as root (CI does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs failed");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
