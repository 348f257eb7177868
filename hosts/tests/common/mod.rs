//! Test infrastructure for real guests: libvirtd, the fixture world, images, the boot assets,
//! a guest-protocol HTTP server on 127.0.0.1, and a guard that destroys a domain even when a
//! test panics. Shared by the tests and `examples/boot_bench.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use certo_hosts::boot::BootAssets;
use certo_hosts::hypervisor::{
    DomainSpec, Hypervisor, HypervisorKind, LibvirtHypervisor, Network, Persistence,
};
use certo_imager::{ImageRequest, Platform, Recipe};
use sha2::{Digest, Sha256};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

pub fn tmp() -> PathBuf {
    certo_testkit::target_tmp()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "certo_hosts=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub use certo_testkit::{ensure_libvirtd, world};

/// A `qemu:///system` connection (libvirtd started first).
pub fn qemu() -> LibvirtHypervisor {
    ensure_libvirtd();
    LibvirtHypervisor::connect("qemu:///system").expect("connect to qemu:///system")
}

/// The boot assets, built once per process into a shared cache.
pub fn assets() -> BootAssets {
    static A: OnceLock<BootAssets> = OnceLock::new();
    A.get_or_init(|| BootAssets::prepare_host(&tmp().join("hosts-boot")).expect("boot assets"))
        .clone()
}

pub fn rpm_request(release: &str, node_type: &str) -> ImageRequest {
    ImageRequest {
        release: release.into(),
        platform: Platform {
            label: "sl5_x86_64".into(),
            os: "sl5".into(),
            arch: "x86_64".into(),
            recipe: Recipe::Dnf {
                repository: "rpm/os/sl5/x86_64".into(),
                arch: "x86_64".into(),
                releasever: "5".into(),
            },
        },
        node_type: node_type.into(),
        patch: None,
    }
}

pub fn deb_request(release: &str, node_type: &str) -> ImageRequest {
    ImageRequest {
        release: release.into(),
        platform: Platform {
            label: "deb12_x86_64".into(),
            os: "deb12".into(),
            arch: "x86_64".into(),
            recipe: Recipe::Mmdebstrap {
                suite: "bookworm".into(),
                arch: "amd64".into(),
                mirror: "http://deb.debian.org/debian".into(),
            },
        },
        node_type: node_type.into(),
        patch: None,
    }
}

/// Builds (or finds in the shared test cache) the ext4 image of `request`.
pub fn image(request: &ImageRequest) -> PathBuf {
    let imager = certo_imager::Imager::open(&tmp().join("hosts-images"), &world()).expect("imager");
    let built = imager.build(request, &[], &|_| {}).expect("image builds");
    built.image.ext4().expect("an ext4 artefact").path.clone()
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// (uid, gid, mode) of a file.
pub fn owner(path: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("stat");
    (m.uid(), m.gid(), m.mode())
}

/// A file's content in the filesystem of a qcow2 overlay (converted to raw, read with debugfs).
pub fn file_in_overlay(overlay: &Path, path: &str) -> String {
    let dir = tempfile::tempdir_in(tmp()).expect("tempdir");
    let raw = dir.path().join("flat.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(overlay)
        .arg(&raw)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(&raw)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory QEMU (which runs as libvirt-qemu) can traverse; removed on drop.
pub fn vm_dir(name: &str) -> tempfile::TempDir {
    std::fs::create_dir_all(tmp()).expect("tmp");
    let d = tempfile::Builder::new()
        .prefix(&format!("hosts-{name}-"))
        .tempdir_in(tmp())
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// Destroys the domain when dropped (also when the test panics).
pub struct DomainGuard<'a> {
    pub hv: &'a dyn Hypervisor,
    pub name: String,
}

impl Drop for DomainGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.hv.destroy(&self.name) {
            eprintln!("cleanup: cannot destroy {}: {e}", self.name);
        }
    }
}

/// A VM ready to start: its overlay, serial log and spec.
pub struct Vm {
    pub dir: tempfile::TempDir,
    pub spec: DomainSpec,
}

impl Vm {
    pub fn new(name: &str, base: &Path, cmdline: String) -> Self {
        let a = assets();
        let dir = vm_dir(name);
        let overlay = dir.path().join("root.qcow2");
        certo_hosts::overlay::create_overlay(base, &overlay).expect("overlay");
        let spec = DomainSpec {
            name: name.to_owned(),
            memory_mib: 256,
            vcpus: 1,
            kernel: a.vmlinux,
            initramfs: a.initramfs,
            cmdline,
            root_disk: overlay,
            base_image: Some(base.canonicalize().expect("base path")),
            serial_log: dir.path().join("serial.log"),
            network: Network::User,
            owner: Some(format!("hosts-tests-{}", std::process::id())),
            secret_file: None,
        };
        Self { dir, spec }
    }

    pub fn start<'a>(&self, hv: &'a dyn Hypervisor) -> DomainGuard<'a> {
        // A leftover of an interrupted earlier run with the same name.
        hv.destroy(&self.spec.name).expect("destroy leftover");
        let guard = DomainGuard {
            hv,
            name: self.spec.name.clone(),
        };
        hv.start(&self.spec, Persistence::Transient).expect("start");
        guard
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.spec.serial_log).unwrap_or_default()
    }
}

/// `certo.*` command line for a VM talking to `server`.
pub fn cmdline(server: &GuestServer, vm: &str, token: &str) -> String {
    certo_hosts::guest::GuestConfig::user_network(&server.guest_url(), vm, token)
        .cmdline(HypervisorKind::Qemu)
        .expect("cmdline")
}

// ---------------------------------------------------------------------------------------
// The guest protocol, server side (plain HTTP/1.x, one request per connection).

/// What the server answers a VM's join with.
#[derive(Debug, Clone)]
pub struct JoinPlan {
    pub hostname: String,
    pub node_type: String,
    /// (suite, glob)
    pub tests: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GuestEvent {
    Joined,
    Service {
        name: String,
        port: u16,
        state: String,
    },
    Result {
        suite: String,
        name: String,
        outcome: String,
        seconds: f64,
        output: String,
    },
    Done(String),
    /// A request the server refused (status, path).
    Refused(u16, String),
}

#[derive(Default)]
struct State {
    plans: HashMap<String, JoinPlan>,
    /// Session key → the VM token that joined with it.
    sessions: HashMap<String, String>,
    events: HashMap<String, Vec<(Instant, GuestEvent)>>,
}

/// The test's testbed server on 127.0.0.1; guests reach it as 10.0.2.2:PORT.
#[derive(Clone)]
pub struct GuestServer {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl GuestServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = Self {
            port,
            state: Arc::default(),
        };
        let s = server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || s.serve(conn));
            }
        });
        server
    }

    pub fn guest_url(&self) -> String {
        format!("http://10.0.2.2:{}", self.port)
    }

    /// Registers a VM's token and what its join returns.
    pub fn expect_vm(&self, token: &str, plan: JoinPlan) {
        let (m, _) = &*self.state;
        m.lock().expect("lock").plans.insert(token.to_owned(), plan);
    }

    pub fn events(&self, token: &str) -> Vec<(Instant, GuestEvent)> {
        let (m, _) = &*self.state;
        m.lock()
            .expect("lock")
            .events
            .get(token)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `pred` holds for the token's events or `timeout` passes.
    pub fn wait_for(
        &self,
        token: &str,
        timeout: Duration,
        pred: impl Fn(&[(Instant, GuestEvent)]) -> bool,
    ) -> bool {
        let (m, cv) = &*self.state;
        let deadline = Instant::now() + timeout;
        let mut st = m.lock().expect("lock");
        loop {
            if pred(st.events.get(token).map(Vec::as_slice).unwrap_or(&[])) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = cv.wait_timeout(st, deadline - now).expect("wait").0;
        }
    }

    fn record(&self, token: &str, ev: GuestEvent) {
        let (m, cv) = &*self.state;
        m.lock()
            .expect("lock")
            .events
            .entry(token.to_owned())
            .or_default()
            .push((Instant::now(), ev));
        cv.notify_all();
    }

    fn serve(&self, mut conn: TcpStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(clone) = conn.try_clone() else { return };
        let mut r = BufReader::new(clone);
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut len = 0usize;
        let mut token = String::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                break;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let v = v.trim();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.parse().unwrap_or(0),
                    "authorization" => token = v.strip_prefix("Bearer ").unwrap_or("").to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; len.min(1 << 20)];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let (status, reply) = self.handle(&method, &path, &token, &body);
        let reason = if status == 200 { "OK" } else { "Refused" };
        let _ = write!(
            conn,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        );
        let _ = conn.flush();
    }

    fn handle(&self, method: &str, path: &str, presented: &str, body: &str) -> (u16, String) {
        // As Certo's server: the VM token joins, the session key join returned does the rest.
        // Before join the VM token may also report that the harness could not start.
        let (plan, token, is_session, joined) = {
            let (m, _) = &*self.state;
            let st = m.lock().expect("lock");
            match st.sessions.get(presented) {
                Some(t) => (st.plans.get(t).cloned(), t.clone(), true, true),
                None => (
                    st.plans.get(presented).cloned(),
                    presented.to_owned(),
                    false,
                    st.sessions.values().any(|t| t == presented),
                ),
            }
        };
        let token = token.as_str();
        let Some(plan) = plan else {
            self.record(token, GuestEvent::Refused(401, path.to_owned()));
            return (401, "unknown token\n".into());
        };
        let allowed = match path {
            "/api/v1/guest/join" => !is_session,
            "/api/v1/guest/done" => is_session || !joined,
            _ => is_session,
        };
        if !allowed {
            self.record(token, GuestEvent::Refused(401, path.to_owned()));
            return (
                401,
                "the VM token joins; the session key does the rest\n".into(),
            );
        }
        if method != "POST" {
            self.record(token, GuestEvent::Refused(405, path.to_owned()));
            return (405, "POST only\n".into());
        }
        match path {
            "/api/v1/guest/join" => {
                self.record(token, GuestEvent::Joined);
                let session = format!("session-of-{token}");
                {
                    let (m, _) = &*self.state;
                    m.lock()
                        .expect("lock")
                        .sessions
                        .insert(session.clone(), token.to_owned());
                }
                let mut s = format!(
                    "session {session}\nhostname {}\nnode_type {}\n",
                    plan.hostname, plan.node_type
                );
                for (suite, glob) in &plan.tests {
                    s.push_str(&format!("test {suite} {glob}\n"));
                }
                (200, s)
            }
            "/api/v1/guest/service" => {
                let f: Vec<&str> = body.split_whitespace().collect();
                if f.len() != 3 {
                    return (400, "SVC PORT up|failed\n".into());
                }
                self.record(
                    token,
                    GuestEvent::Service {
                        name: f[0].into(),
                        port: f[1].parse().unwrap_or(u16::MAX),
                        state: f[2].into(),
                    },
                );
                (200, "ok\n".into())
            }
            "/api/v1/guest/result" => {
                let (first, output) = body.split_once('\n').unwrap_or((body, ""));
                let f: Vec<&str> = first.split_whitespace().collect();
                if f.len() != 4 {
                    return (400, "SUITE NAME pass|fail|error SECONDS\n".into());
                }
                self.record(
                    token,
                    GuestEvent::Result {
                        suite: f[0].into(),
                        name: f[1].into(),
                        outcome: f[2].into(),
                        seconds: f[3].parse().unwrap_or(-1.0),
                        output: output.to_owned(),
                    },
                );
                (200, "ok\n".into())
            }
            "/api/v1/guest/done" => {
                self.record(token, GuestEvent::Done(body.trim().to_owned()));
                (200, "ok\n".into())
            }
            _ => (404, "no such endpoint\n".into()),
        }
    }
}

pub fn joined_at(events: &[(Instant, GuestEvent)]) -> Option<Instant> {
    events
        .iter()
        .find(|(_, e)| *e == GuestEvent::Joined)
        .map(|(t, _)| *t)
}

pub fn done_at(events: &[(Instant, GuestEvent)]) -> Option<Instant> {
    events
        .iter()
        .find(|(_, e)| matches!(e, GuestEvent::Done(_)))
        .map(|(t, _)| *t)
}
