//! `certo agent` and `certo transfer` as users run them: real processes, real HTTP, and
//! for the fault tests two network namespaces joined by a veth pair, shaped with tc
//! (netem loss, tbf rate). Needs root (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const CERTO: &str = env!("CARGO_BIN_EXE_certo");
const TOKEN: &str = "cli-test-token";

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

fn sh(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes; `text` mixes in compressible runs.
fn image(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if text && (s >> 60) < 6 {
            out.extend_from_slice(b"some text that compresses well, as logs and configs do\n");
        } else {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// Two network namespaces joined by a veth pair: `sender` (.1) and `host` (.2). Removed,
/// with every process left in them, on drop.
struct NetnsPair {
    sender: String,
    host: String,
    host_ip: String,
}

impl NetnsPair {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            run(Command::new("id").arg("-u")).stdout == b"0\n",
            "these tests create network namespaces and must run as root (CI does)"
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let pair = Self {
            sender: format!("certo-ts-{id}"),
            host: format!("certo-th-{id}"),
            host_ip: format!("10.232.{}.2", 10 + n),
        };
        let sender_ip = format!("10.232.{}.1/24", 10 + n);
        let host_cidr = format!("{}/24", pair.host_ip);
        let (vs, vh) = (format!("vs{n}"), format!("vh{n}"));
        sh(&["ip", "netns", "add", &pair.sender]);
        sh(&["ip", "netns", "add", &pair.host]);
        sh(&[
            "ip",
            "link",
            "add",
            &vs,
            "netns",
            &pair.sender,
            "type",
            "veth",
            "peer",
            "name",
            &vh,
            "netns",
            &pair.host,
        ]);
        sh(&[
            "ip",
            "-n",
            &pair.sender,
            "addr",
            "add",
            &sender_ip,
            "dev",
            &vs,
        ]);
        sh(&[
            "ip", "-n", &pair.host, "addr", "add", &host_cidr, "dev", &vh,
        ]);
        for (ns, dev) in [(&pair.sender, &vs), (&pair.host, &vh)] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }

    /// Applies a qdisc (e.g. `netem loss 5%`) to both ends.
    fn index(&self) -> u32 {
        self.host_ip
            .split('.')
            .nth(2)
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(10)
            - 10
    }

    fn shape(&self, qdisc: &[&str]) {
        let n = self.index();
        for (ns, dev) in [
            (&self.sender, format!("vs{n}")),
            (&self.host, format!("vh{n}")),
        ] {
            let mut args = vec!["tc", "-n", ns, "qdisc", "add", "dev", &dev, "root"];
            args.extend_from_slice(qdisc);
            sh(&args);
        }
    }

    /// Drops `percent` % of the packets arriving in each namespace (both directions), with
    /// nftables: this kernel has no sch_netem, so `tc netem loss` is not available.
    fn lose(&self, percent: u32) {
        // Without segmentation offloads each dropped packet is one MTU-sized packet, not a
        // 64 KiB super-segment.
        let n = self.index();
        for (ns, dev) in [
            (&self.sender, format!("vs{n}")),
            (&self.host, format!("vh{n}")),
        ] {
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", &dev, "tso", "off", "gso", "off",
                "gro", "off",
            ]);
        }
        for ns in [&self.sender, &self.host] {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "nft",
                "add",
                "table",
                "inet",
                "certo_loss",
            ]);
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "nft",
                "add",
                "chain",
                "inet",
                "certo_loss",
                "in",
                "{ type filter hook prerouting priority 0; }",
            ]);
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "nft",
                "add",
                "rule",
                "inet",
                "certo_loss",
                "in",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &percent.to_string(),
                "counter",
                "drop",
            ]);
        }
    }

    /// Packets dropped by [`lose`](Self::lose) so far, in both namespaces.
    fn lost(&self) -> u64 {
        [&self.sender, &self.host]
            .iter()
            .map(|ns| {
                let out = run(Command::new("ip").args([
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "list",
                    "chain",
                    "inet",
                    "certo_loss",
                    "in",
                ]));
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    fn exec(&self, ns: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, CERTO])
            .env("CERTO_TOKEN", TOKEN)
            .env("CERTO_DATA_DIR", test_data_dir());
        cmd
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.sender, &self.host] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A running `certo agent`; killed on drop.
/// A running `certo agent`; killed on drop.
type AgentProc = certo_testkit::process::Listening;

/// Starts `certo agent` from `cmd` (a command that runs the binary, maybe in a namespace).
fn start_agent(mut cmd: Command, repo: &Path, listen: &str) -> AgentProc {
    cmd.args(["agent", "--listen", listen, "--repo"])
        .arg(repo)
        .stderr(Stdio::inherit());
    certo_testkit::process::Listening::spawn(&mut cmd, Duration::from_secs(60))
}

fn local(args: &[&str]) -> Command {
    let mut cmd = Command::new(CERTO);
    cmd.args(args)
        .env("CERTO_TOKEN", TOKEN)
        .env("CERTO_DATA_DIR", test_data_dir());
    cmd
}

/// Where the pushes' index cache goes: under target/, not the machine's data directory.
fn test_data_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("transfer-cli-data")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write image");
    path
}

#[test]
fn plan_then_push_then_plan_again_on_loopback() {
    let work = tempfile::tempdir().expect("tempdir");
    let repo = work.path().join("repo");
    let agent = start_agent(local(&[]), &repo, "127.0.0.1:0");
    let img = write(work.path(), "base.img", &image(1, 3 << 20, true));

    let plan = json(&run(local(&[
        "transfer", "plan", "--json", "--to", &agent.url,
    ])
    .arg(&img)));
    assert_eq!(plan["bytes_to_send"], 3 << 20);
    let push = json(&run(local(&[
        "transfer", "push", "--json", "--to", &agent.url,
    ])
    .arg(&img)));
    for key in ["bytes_total", "bytes_sent", "blocks_reused", "seconds"] {
        assert!(push.get(key).is_some(), "summary lacks {key}: {push}");
    }
    assert_eq!(
        push["name"], "base",
        "the default name is the file name less .img"
    );
    assert!(
        push["bytes_sent"].as_u64().expect("number") < 3 << 20,
        "compressed"
    );
    let plan = json(&run(local(&[
        "transfer", "plan", "--json", "--to", &agent.url,
    ])
    .arg(&img)));
    assert_eq!(plan["bytes_to_send"], 0);
    assert_eq!(
        std::fs::read(repo.join("images/base.img")).expect("assembled"),
        std::fs::read(&img).expect("image")
    );

    // The index cache: a file left alone for 2 s is hashed by its first push only.
    let settled = write(work.path(), "settled.img", &image(2, 1 << 20, true));
    let cache = work.path().join("index-cache");
    std::thread::sleep(Duration::from_millis(2100));
    let push_cached = |extra: &[&str]| {
        let mut args = vec!["transfer", "push", "--json", "--to", &agent.url];
        args.extend_from_slice(extra);
        json(&run(local(&args).arg(&settled)))
    };
    let cache_arg = ["--index-cache", cache.to_str().expect("utf-8")];
    assert_eq!(push_cached(&cache_arg)["index_cached"], false);
    assert_eq!(push_cached(&cache_arg)["index_cached"], true);
    assert_eq!(push_cached(&["--no-index-cache"])["index_cached"], false);

    // Refusals: a wrong token (exit 1, says why), an agent without a token (exit 3).
    let out = run(local(&["transfer", "push", "--to", &agent.url])
        .arg(&img)
        .env("CERTO_TOKEN", "wrong"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong token"));
    let out = run(Command::new(CERTO)
        .args(["agent", "--listen", "127.0.0.1:0", "--repo"])
        .arg(work.path().join("other"))
        .env_remove("CERTO_TOKEN"));
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a token"));
}

#[test]
fn agent_killed_mid_transfer_then_restarted_gets_only_what_it_lacks() {
    let net = NetnsPair::new();
    net.shape(&["tbf", "rate", "40mbit", "burst", "64kb", "latency", "50ms"]);
    let work = tempfile::tempdir().expect("tempdir");
    let repo = work.path().join("repo");
    let data = image(2, 24 << 20, false);
    let img = write(work.path(), "big.img", &data);
    let listen = format!("{}:7310", net.host_ip);
    let mut agent = start_agent(net.exec(&net.host), &repo, &listen);
    let mut push = net
        .exec(&net.sender)
        .args([
            "transfer",
            "push",
            "--json",
            "--retries",
            "2",
            "--name",
            "big",
            "--to",
        ])
        .arg(&agent.url)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("push starts");
    // Kill -9 the agent once about a third of the image is in its repository.
    let pack = repo.join("blocks/pack-000000.dat");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&pack).map_or(0, |m| m.len()) < 8 << 20 {
        assert!(Instant::now() < deadline, "the transfer never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill();
    let status = push.wait().expect("push ends");
    assert!(!status.success(), "the push fails once its agent is gone");
    assert!(
        std::fs::metadata(&pack).map_or(0, |m| m.len()) < 24 << 20,
        "killed before the end"
    );

    let agent = start_agent(net.exec(&net.host), &repo, &listen);
    let plan = json(&run(net
        .exec(&net.sender)
        .args(["transfer", "plan", "--json", "--to", &agent.url])
        .arg(&img)));
    let to_send = plan["blocks_to_send"].as_u64().expect("number");
    let kept = plan["blocks_reused"].as_u64().expect("number");
    // The pack held at least 8 MiB when the agent died: whole records of 36 + 4096 bytes
    // (a torn last one is cut when the repository opens).
    let whole = (8u64 << 20) / (36 + 4096);
    assert!(kept >= whole && to_send > 0, "{plan}");
    let done = json(&run(net
        .exec(&net.sender)
        .args([
            "transfer", "push", "--json", "--name", "big", "--to", &agent.url,
        ])
        .arg(&img)));
    assert_eq!(
        done["blocks_sent"].as_u64(),
        Some(to_send),
        "only what is missing: {done}"
    );
    assert_eq!(done["blocks_reused"].as_u64(), Some(kept));
    assert!(std::fs::read(repo.join("images/big.img")).expect("assembled") == data);
}

#[test]
fn five_percent_packet_loss_completes_bit_exact() {
    let net = NetnsPair::new();
    net.lose(5);
    let work = tempfile::tempdir().expect("tempdir");
    let repo = work.path().join("repo");
    let data = image(3, 12 << 20, true);
    let img = write(work.path(), "lossy.img", &data);
    let agent = start_agent(net.exec(&net.host), &repo, &format!("{}:7310", net.host_ip));
    let done = json(&run(net
        .exec(&net.sender)
        .args(["transfer", "push", "--json", "--to", &agent.url])
        .arg(&img)));
    assert_eq!(done["bytes_total"].as_u64(), Some(12 << 20));
    assert!(std::fs::read(repo.join("images/lossy.img")).expect("assembled") == data);
    assert!(net.lost() > 50, "packets were really lost: {}", net.lost());
}

#[test]
fn a_throttled_link_completes_bit_exact_at_the_link_rate() {
    let net = NetnsPair::new();
    net.shape(&["tbf", "rate", "20mbit", "burst", "32kb", "latency", "50ms"]);
    let work = tempfile::tempdir().expect("tempdir");
    let repo = work.path().join("repo");
    let data = image(4, 8 << 20, false);
    let img = write(work.path(), "slow.img", &data);
    let agent = start_agent(net.exec(&net.host), &repo, &format!("{}:7310", net.host_ip));
    let done = json(&run(net
        .exec(&net.sender)
        .args(["transfer", "push", "--json", "--to", &agent.url])
        .arg(&img)));
    let sent = done["bytes_sent"].as_f64().expect("number");
    let seconds = done["send_seconds"].as_f64().expect("number");
    let rate = sent * 8.0 / seconds;
    // Random data does not compress: ~8 MiB at 20 Mbit/s is over 3 s, and the link is kept busy.
    assert!(seconds > 2.5, "the link was really throttled: {done}");
    assert!(
        rate > 0.8 * 20e6 && rate < 1.05 * 20e6,
        "{rate} bit/s: {done}"
    );
    assert!(std::fs::read(repo.join("images/slow.img")).expect("assembled") == data);
}
