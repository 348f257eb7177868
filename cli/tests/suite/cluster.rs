//! The embedded default: `certo` starts its own PostgreSQL cluster under the
//! data directory, reuses it, survives the server being killed, and stops it
//! on request — as root (the server then runs as `postgres`) and as an
//! ordinary user.

use crate::common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

fn certo_in(data_dir: &Path, args: &[&str], uid: Option<(u32, u32)>, exe: &Path) -> Output {
    let mut cmd = Command::new(exe);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("CERTO_DATA_DIR");
    if let Some((uid, gid)) = uid {
        let home = data_dir.parent().expect("parent");
        cmd.uid(uid).gid(gid).env("HOME", home).current_dir(home);
    }
    cmd.output().expect("run certo")
}

fn status(data_dir: &Path, uid: Option<(u32, u32)>, exe: &Path) -> serde_json::Value {
    let out = certo_in(data_dir, &["db", "status", "--json"], uid, exe);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole life of an embedded cluster, run by `uid` (None: this process's user).
fn lifecycle(data_dir: &Path, patch_file: &Path, uid: Option<(u32, u32)>, exe: &Path) {
    let s = status(data_dir, uid, exe);
    assert_eq!(
        (
            s["cluster"]["initialised"].as_bool(),
            s["cluster"]["running"].as_bool()
        ),
        (Some(false), Some(false))
    );

    // The first command that needs the store starts the cluster.
    let out = ok(certo_in(
        data_dir,
        &["submit", patch_file.to_str().expect("utf-8")],
        uid,
        exe,
    ));
    assert!(out.starts_with("stored"), "{out}");
    let s = status(data_dir, uid, exe);
    assert_eq!(s["cluster"]["running"], true);
    let pid = s["cluster"]["pid"].as_u64().expect("pid");

    // The server is killed: the next command restarts it, nothing is lost.
    ok(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .expect("kill"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&ok(certo_in(data_dir, &["patches", "--json"], uid, exe)))
            .expect("json");
    assert_eq!(listed.len(), 1);
    let s = status(data_dir, uid, exe);
    assert_ne!(s["cluster"]["pid"].as_u64(), Some(pid));

    // Stop, stop again, and start on demand once more.
    assert!(ok(certo_in(data_dir, &["db", "stop"], uid, exe)).starts_with("stopped"));
    assert_eq!(status(data_dir, uid, exe)["cluster"]["running"], false);
    assert!(ok(certo_in(data_dir, &["db", "stop"], uid, exe)).contains("was not running"));
    let again = ok(certo_in(
        data_dir,
        &["submit", patch_file.to_str().expect("utf-8")],
        uid,
        exe,
    ));
    assert!(again.starts_with("unchanged"), "{again}");
    let url = ok(certo_in(data_dir, &["db", "url"], uid, exe));
    assert!(
        url.starts_with("postgres://certo@localhost/certo?host=/"),
        "{url}"
    );
    ok(certo_in(data_dir, &["db", "stop"], uid, exe));
}

#[test]
fn embedded_cluster_as_this_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let patch = common::fixtures().join("valid/3456-yaim-core-wn.txt");
    lifecycle(
        &dir.path().join("state"),
        &patch,
        None,
        Path::new(env!("CARGO_BIN_EXE_certo")),
    );
}

/// As root this checks the other case too: an ordinary user (`nobody`) runs
/// its own cluster. As an ordinary user, the test above was that case, and
/// root's case cannot be run; this test then checks that the cluster's files
/// belong to the user who runs Certo.
#[test]
fn embedded_cluster_as_the_other_kind_of_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uid_line = std::fs::read_to_string("/proc/self/status").expect("status");
    let is_root = uid_line
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !is_root {
        let data = dir.path().join("state");
        ok(certo_in(
            &data,
            &["db", "start"],
            None,
            Path::new(env!("CARGO_BIN_EXE_certo")),
        ));
        let me = std::fs::metadata(dir.path()).expect("meta");
        let pgdata = std::fs::metadata(data.join("postgres/data")).expect("pgdata");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(pgdata.uid(), me.uid());
        ok(certo_in(
            &data,
            &["db", "stop"],
            None,
            Path::new(env!("CARGO_BIN_EXE_certo")),
        ));
        return;
    }
    // Everything the ordinary user needs lives in a folder it owns.
    let (uid, gid) = (65534u32, 65534u32);
    let exe = dir.path().join("certo");
    std::fs::copy(env!("CARGO_BIN_EXE_certo"), &exe).expect("copy binary");
    let patch = dir.path().join("3456.txt");
    std::fs::copy(
        common::fixtures().join("valid/3456-yaim-core-wn.txt"),
        &patch,
    )
    .expect("copy patch");
    ok(Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir.path())
        .output()
        .expect("chown"));
    ok(Command::new("chmod")
        .arg("755")
        .arg(dir.path())
        .output()
        .expect("chmod"));
    lifecycle(&dir.path().join("state"), &patch, Some((uid, gid)), &exe);
}

/// `certo serve` on the embedded cluster survives a `kill -9` of the postmaster: it starts
/// the cluster again by itself (and says so), and a host's request is answered again.
#[tokio::test(flavor = "multi_thread")]
async fn serve_starts_the_embedded_cluster_again_when_it_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("state");
    let exe = Path::new(env!("CARGO_BIN_EXE_certo"));
    let added = ok(certo_in(&data, &["host", "add", "h9"], None, exe));
    let token = added
        .split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no token in {added:?}"))
        .to_owned();
    let log = dir.path().join("serve.log");
    let mut cmd = Command::new(exe);
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["-v", "serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env_remove("CERTO_DATA_DIR")
        .stderr(std::fs::File::create(&log).expect("log"));
    let serve =
        certo_testkit::process::Listening::spawn(&mut cmd, std::time::Duration::from_secs(60));
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/hosts/h9", serve.url);
    let get = || async {
        http.get(&url)
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(get().await, 200);
    let pid = status(&data, None, exe)["cluster"]["pid"]
        .as_u64()
        .expect("pid");
    ok(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .output()
        .expect("kill"));
    let killed = std::time::Instant::now();
    let mut back = None;
    while killed.elapsed() < std::time::Duration::from_secs(30) {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        if get().await == 200 && status(&data, None, exe)["cluster"]["pid"].as_u64() != Some(pid) {
            back = Some(killed.elapsed());
            break;
        }
    }
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    drop(serve);
    let _ = certo_in(&data, &["db", "stop"], None, exe);
    let back = back.unwrap_or_else(|| panic!("serve never recovered; its log:\n{said}"));
    assert!(said.contains("started it again"), "{said}");
    eprintln!(
        "serve answered again {:.1} s after the postmaster was killed",
        back.as_secs_f64()
    );
}
