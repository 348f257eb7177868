//! The command line's contract as a user meets it: `certo validate` needs no store and
//! prints every error as FILE:LINE:COL: field: message; an unreachable store is exit
//! status 3 and never shows the password; `vm run --suite` runs the suites asked for;
//! two first starts of the embedded cluster at once end in one cluster; and the `--json`
//! documents of `patches`, `show`, `transfer push`, `vm run` and `image build` keep their
//! shape (golden files under `cli/tests/golden/`; `CERTO_BLESS=1` rewrites them).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use certo_testkit::process::Listening;

use serde_json::Value;

const CERTO: &str = env!("CARGO_BIN_EXE_certo");
const TOKEN: &str = "contract-host-token-0123456789";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn explain(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn json_of(out: &Output) -> Value {
    assert!(out.status.success(), "{}", explain(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", explain(out)))
}

/// A fresh directory under the target directory that the `postgres` user can search (as
/// root the embedded cluster runs as `postgres`, and lives under the data directory only
/// when that user can reach it).
fn reachable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cli-contract-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// `certo --data-dir DIR ARGS` on the embedded default (no DATABASE_URL).
fn certo_embedded(data_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(CERTO);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("CERTO_DATA_DIR")
        .env_remove("CERTO_CATALOGUE");
    cmd
}

// ---------------------------------------------------------------------------------------
// 1. certo validate
// ---------------------------------------------------------------------------------------

#[test]
fn validate_needs_no_store_and_accepts_the_valid_fixtures() {
    let dir = reachable_tempdir();
    let data = dir.path().join("state");
    let out = certo_embedded(&data, &["validate"])
        .arg(common::fixtures().join("valid"))
        .output()
        .expect("run certo");
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_eq!(
        text(&out.stdout).trim(),
        "22 record(s) in 20 file(s): all valid",
        "{}",
        explain(&out)
    );
    // Nothing of a store was made: no cluster under the data directory (which the
    // server user could reach, so that is where a cluster would have gone).
    assert!(
        !data.join("postgres").exists(),
        "validate created a PostgreSQL cluster under {}",
        data.display()
    );
    let left: Vec<_> = std::fs::read_dir(&data)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "validate wrote {left:?} under the data dir"
    );
}

#[test]
fn validate_lists_every_error_of_a_file_as_file_line_col_field_message() {
    let dir = reachable_tempdir();
    let invalid = common::fixtures().join("invalid");
    let file = "24-many-errors.txt";
    let out = certo_embedded(&dir.path().join("state"), &["validate", file])
        .current_dir(&invalid)
        .output()
        .expect("run certo");
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let expected_all = std::fs::read_to_string(common::fixtures().join("invalid-expected.txt"))
        .expect("invalid-expected.txt");
    let expected: Vec<&str> = expected_all
        .lines()
        .filter(|l| l.starts_with(&format!("{file}:")))
        .collect();
    assert_eq!(expected.len(), 8, "the fixture's expected errors");
    let stderr = text(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{file}:")))
        .collect();
    assert_eq!(errors, expected, "{}", explain(&out));
    // Every error line is FILE:LINE:COL: field: message.
    for line in &errors {
        let mut parts = line.splitn(5, ':');
        let (f, l, c) = (parts.next(), parts.next(), parts.next());
        assert_eq!(f, Some(file), "{line}");
        assert!(
            l.is_some_and(|l| l.parse::<u32>().is_ok_and(|n| n > 0)),
            "{line}"
        );
        assert!(
            c.is_some_and(|c| c.parse::<u32>().is_ok_and(|n| n > 0)),
            "{line}"
        );
        let field = parts.next().map(str::trim).unwrap_or("");
        let message = parts.next().map(str::trim).unwrap_or("");
        assert!(!field.is_empty() && !message.is_empty(), "{line}");
    }
    assert!(
        stderr.contains("8 error(s) in 1 of 1 file(s)"),
        "{}",
        explain(&out)
    );
    assert!(out.stdout.is_empty(), "{}", explain(&out));
}

// ---------------------------------------------------------------------------------------
// 2. An unreachable store: exit status 3, and the password is never shown
// ---------------------------------------------------------------------------------------

#[test]
fn an_unreachable_store_is_exit_status_3_and_the_password_is_never_shown() {
    const SECRET: &str = "s3cr3t-pw";
    let url = format!("postgres://certo:{SECRET}@127.0.0.1:1/certo");
    let dir = reachable_tempdir();
    let valid = common::fixtures().join("valid");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(CERTO);
        c.arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("CERTO_CATALOGUE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // Three ways a user meets it, at once (each waits out the connection timeout):
    // the flag, the flag with debug logging, and the environment variable.
    let mut runs = [
        ("patches", cmd(&["--database-url", &url, "patches"])),
        (
            "show --json -vv",
            cmd(&["--database-url", &url, "-vv", "show", "3213", "--json"]),
        ),
        ("submit (DATABASE_URL)", {
            let mut c = cmd(&["submit"]);
            c.arg(&valid).env("DATABASE_URL", &url);
            c
        }),
    ];
    let children: Vec<_> = runs
        .iter_mut()
        .map(|(what, c)| (*what, c.spawn().expect("spawn certo")))
        .collect();
    // Every run ends before anything is asserted, so a failure leaves none running.
    let outputs: Vec<_> = children
        .into_iter()
        .map(|(what, child)| (what, child.wait_with_output().expect("certo ends")))
        .collect();
    for (what, out) in outputs {
        assert_eq!(out.status.code(), Some(3), "{what}: {}", explain(&out));
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            stderr.contains("cannot connect") && stderr.contains("127.0.0.1:1"),
            "{what}: the error names the problem and the server: {}",
            explain(&out)
        );
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{what}: the password is shown: {}",
            explain(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The in-process host agent (as in vm_lifecycle.rs): the agent's own code over a private
// libvirt test-driver instance whose domains run the test kit's simulated harness.
// ---------------------------------------------------------------------------------------

/// A host agent in this process with simulated guests (the test kit's).
type Agent = certo_testkit::agent::SimulatedHost;

async fn agent(name: &str) -> Agent {
    Agent::start(name, TOKEN, 2, |hv| hv).await
}

fn vm_run(db: &str, agent: &Agent, extra: &[&str]) -> (i32, Value) {
    common::vm_run(db, agent, TOKEN, extra)
}

// ---------------------------------------------------------------------------------------
// 3. vm run --suite basic | regression | all
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn vm_run_runs_exactly_the_suites_asked_for() {
    let db = common::scratch().await;
    let a = agent("suites").await;
    for (suite, expected) in [
        ("basic", &["basic"][..]),
        ("regression", &["regression"][..]),
        ("all", &["basic", "regression"][..]),
    ] {
        let (code, v) = vm_run(&db.url, &a, &["--suite", suite, "--timeout", "60"]);
        assert_eq!(code, 0, "--suite {suite}: {v}");
        assert_eq!(v["state"], "done", "--suite {suite}: {v}");
        let tests = v["tests"].as_array().expect("tests");
        let mut suites: Vec<&str> = tests
            .iter()
            .map(|t| t["suite"].as_str().expect("suite"))
            .collect();
        suites.sort_unstable();
        assert_eq!(suites, expected, "--suite {suite}: {v}");
        assert!(
            tests.iter().all(|t| t["status"] == "pass"),
            "--suite {suite}: {v}"
        );
        // The store holds the same results for that VM.
        let name = v["vm"].as_str().expect("vm");
        let row = db.store.vm(name).await.expect("vm").expect("row");
        let stored = db.store.vm_results(row.id).await.expect("results");
        assert_eq!(stored.len(), expected.len(), "--suite {suite}: {v}");
    }
    db.drop_db().await.expect("drop");
}

// ---------------------------------------------------------------------------------------
// 4. Two first starts of the embedded cluster at once
// ---------------------------------------------------------------------------------------

/// Stops the embedded cluster of a data directory when dropped (on failure too).
struct StopCluster(PathBuf);

impl Drop for StopCluster {
    fn drop(&mut self) {
        let _ = certo_embedded(&self.0, &["db", "stop"]).output();
    }
}

#[test]
fn two_first_starts_at_once_give_one_running_cluster() {
    let dir = reachable_tempdir();
    let data = dir.path().join("state");
    let _stop = StopCluster(data.clone());
    let barrier = Arc::new(Barrier::new(2));
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let (barrier, data) = (barrier.clone(), data.clone());
            std::thread::spawn(move || {
                let mut cmd = certo_embedded(&data, &["patches", "--json"]);
                barrier.wait();
                cmd.output().expect("run certo")
            })
        })
        .collect();
    for start in starts {
        let out = start.join().expect("thread");
        assert!(out.status.success(), "{}", explain(&out));
        let listed: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", explain(&out)));
        assert_eq!(listed, serde_json::json!([]), "{}", explain(&out));
    }
    let status = json_of(
        &certo_embedded(&data, &["db", "status", "--json"])
            .output()
            .expect("db status"),
    );
    let cluster = &status["cluster"];
    assert_eq!(cluster["initialised"], true, "{status}");
    assert_eq!(cluster["running"], true, "{status}");
    let pid = cluster["pid"]
        .as_u64()
        .expect("a running cluster has a pid");
    let pgdata = cluster["pgdata"].as_str().expect("pgdata");
    assert_eq!(
        Path::new(pgdata),
        data.join("postgres/data"),
        "the cluster lives under the data directory: {status}"
    );
    // Exactly one postmaster serves that data directory, and it is the one reported.
    let postmasters = postmasters_of(pgdata);
    assert_eq!(postmasters, [pid], "{status}");
}

/// The pids of the processes whose command line is a server started on `pgdata`
/// (backends rename themselves, so only the postmaster keeps `-D PGDATA`).
fn postmasters_of(pgdata: &str) -> Vec<u64> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_server = args
            .first()
            .is_some_and(|a| a.ends_with(b"/postgres") || *a == b"postgres");
        let on_pgdata = args
            .windows(2)
            .any(|w| w[0] == b"-D" && w[1] == pgdata.as_bytes());
        if is_server && on_pgdata {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

// ---------------------------------------------------------------------------------------
// 5. Golden files of the --json documents
// ---------------------------------------------------------------------------------------

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether `path` (array indices written `[]`) is, or lies under, a volatile path.
fn is_volatile(path: &str, volatile: &[&str]) -> bool {
    volatile.iter().any(|v| {
        path == *v
            || path
                .strip_prefix(v)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    })
}

/// Walks `v`: every path (indices as `[]`) with the set of its types, and every
/// deterministic value (indices kept) in document order.
fn walk(
    v: &Value,
    shape_path: &str,
    value_path: &str,
    volatile: &[&str],
    shape: &mut std::collections::BTreeMap<String, std::collections::BTreeSet<&'static str>>,
    values: &mut Vec<String>,
) {
    shape
        .entry(shape_path.to_owned())
        .or_default()
        .insert(type_of(v));
    let keep = !is_volatile(shape_path, volatile);
    match v {
        Value::Object(map) => {
            if keep && map.is_empty() {
                values.push(format!("{value_path} = {{}}"));
            }
            for (k, child) in map {
                walk(
                    child,
                    &format!("{shape_path}.{k}"),
                    &format!("{value_path}.{k}"),
                    volatile,
                    shape,
                    values,
                );
            }
        }
        Value::Array(items) => {
            if keep {
                values.push(format!("{value_path} = array of {}", items.len()));
            }
            for (i, child) in items.iter().enumerate() {
                walk(
                    child,
                    &format!("{shape_path}[]"),
                    &format!("{value_path}[{i}]"),
                    volatile,
                    shape,
                    values,
                );
            }
        }
        scalar => {
            if keep {
                values.push(format!("{value_path} = {scalar}"));
            }
        }
    }
}

/// The normalised form of a JSON document: its shape (every key path with the JSON
/// types of its values, sorted) and its deterministic values (all but the `volatile`
/// paths: timestamps, durations, digests, paths, ids, byte counts).
fn normalise(v: &Value, volatile: &[&str]) -> String {
    let mut shape = std::collections::BTreeMap::new();
    let mut values = Vec::new();
    walk(v, "$", "$", volatile, &mut shape, &mut values);
    let mut out = String::from("# shape: every key path, the JSON types of its values\n");
    for (path, types) in &shape {
        let types: Vec<&str> = types.iter().copied().collect();
        out.push_str(&format!("{path}: {}\n", types.join("|")));
    }
    out.push_str("\n# deterministic values (varying ones are left out: ");
    out.push_str(&volatile.join(", "));
    out.push_str(")\n");
    for line in values {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Compares `doc` (normalised) with `cli/tests/golden/NAME.txt`; with `CERTO_BLESS=1`
/// rewrites the file instead.
fn golden(name: &str, doc: &Value, volatile: &[&str]) {
    let actual = normalise(doc, volatile);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.txt"));
    if std::env::var("CERTO_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("golden dir");
        std::fs::write(&path, &actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with CERTO_BLESS=1 to write it\n{actual}",
            path.display()
        )
    });
    if expected != actual {
        let (exp, act): (Vec<&str>, Vec<&str>) =
            (expected.lines().collect(), actual.lines().collect());
        let mut diff = String::new();
        for l in exp.iter().filter(|l| !act.contains(l)) {
            diff.push_str(&format!("- {l}\n"));
        }
        for l in act.iter().filter(|l| !exp.contains(l)) {
            diff.push_str(&format!("+ {l}\n"));
        }
        panic!(
            "the JSON of `{name}` differs from {} (- expected, + actual; if the change \
             is meant, rerun with CERTO_BLESS=1 and review the diff):\n{diff}\nfull document:\n{doc:#}",
            path.display()
        );
    }
}

#[tokio::test]
async fn golden_json_of_patches_and_show() {
    let db = common::scratch().await;
    // Submitted from the workspace root by a relative path, so the stored file names are
    // the same on every machine.
    let root = certo_testkit::workspace();
    let certo_db = |args: &[&str]| {
        Command::new(CERTO)
            .args(args)
            .current_dir(&root)
            .env("DATABASE_URL", &db.url)
            .env_remove("CERTO_CATALOGUE")
            .output()
            .expect("run certo")
    };
    let out = certo_db(&["submit", "fixtures/patches/valid"]);
    assert!(out.status.success(), "{}", explain(&out));

    let patches = json_of(&certo_db(&["patches", "--json"]));
    assert_eq!(
        patches.as_array().map(Vec::len),
        Some(21),
        "22 fixture records, one superseded: {patches}"
    );
    golden(
        "patches",
        &patches,
        &["$[].submitted_at", "$[].content_sha256"],
    );

    let show = json_of(&certo_db(&["show", "3213", "--json"]));
    assert_eq!(show["revision"], 2, "{show}");
    golden(
        "show-3213",
        &show,
        &[
            "$.submitted_at",
            "$.content_sha256",
            "$.events[].at",
            "$.events[].detail.content_sha256",
        ],
    );
    db.drop_db().await.expect("drop");
}

#[test]
fn golden_json_of_transfer_push() {
    let work = reachable_tempdir();
    let repo = work.path().join("repo");
    let data = work.path().join("data");
    let mut agent_cmd = Command::new(CERTO);
    agent_cmd
        .arg("--data-dir")
        .arg(&data)
        .args(["agent", "--listen", "127.0.0.1:0", "--repo"])
        .arg(&repo)
        .env("CERTO_TOKEN", TOKEN);
    let agent = Listening::spawn(&mut agent_cmd, Duration::from_secs(30));
    let img = common::small_image(&work.path().join("contract.img"), 3);
    let out = Command::new(CERTO)
        .arg("--data-dir")
        .arg(&data)
        .args(["transfer", "push", "--json", "--to", &agent.url])
        .arg(&img)
        .env("CERTO_TOKEN", TOKEN)
        .output()
        .expect("transfer push");
    let push = json_of(&out);
    assert_eq!(
        std::fs::read(repo.join("images/contract.img")).expect("assembled"),
        std::fs::read(&img).expect("image")
    );
    golden(
        "transfer-push",
        &push,
        &[
            "$.digest",
            "$.bytes_sent",
            "$.bytes_batches",
            "$.mean_zstd_level",
            "$.batches",
            "$.index_bytes",
            "$.send_seconds",
            "$.assemble_seconds",
            "$.seconds",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_json_of_vm_run() {
    let db = common::scratch().await;
    let a = agent("golden").await;
    let (code, v) = vm_run(&db.url, &a, &["--suite", "all", "--timeout", "60"]);
    assert_eq!(code, 0, "{v}");
    golden(
        "vm-run",
        &v,
        &[
            "$.vm",
            "$.hostname",
            "$.serial_log",
            "$.seconds_to_joined",
            "$.seconds_to_done",
            "$.tests[].seconds",
        ],
    );
    db.drop_db().await.expect("drop");
}

/// A data directory with an empty image cache; unmounted and removed when dropped.
struct FreshData(PathBuf);

impl Drop for FreshData {
    fn drop(&mut self) {
        let _ = certo_imager::store::remove_tree(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn golden_json_of_image_build() {
    let db = common::scratch().await;
    let world = common::world();
    let data = FreshData(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cli-contract-image-{}", std::process::id())),
    );
    let _ = certo_imager::store::remove_tree(&data.0);
    std::fs::create_dir_all(&data.0).expect("data dir");
    let out = Command::new(CERTO)
        .arg("--data-dir")
        .arg(&data.0)
        .arg("--repos")
        .arg(&world)
        .args([
            "image",
            "build",
            "--json",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
        ])
        .env("DATABASE_URL", &db.url)
        .env_remove("CERTO_CATALOGUE")
        .output()
        .expect("image build");
    let v = json_of(&out);
    let path = v["path"].as_str().expect("path");
    assert!(Path::new(path).is_file(), "{v}");
    golden(
        "image-build",
        &v,
        &[
            "$.digest",
            "$.path",
            "$.seconds",
            "$.artefacts[].path",
            "$.artefacts[].size_bytes",
            "$.layers[].digest",
            "$.layers[].build_seconds",
            "$.layers[].size_bytes",
        ],
    );
    db.drop_db().await.expect("drop");
}

// ---------------------------------------------------------------------------------------
// certo workflow check

#[test]
fn workflow_check_accepts_the_built_in_workflow_and_lists_every_error_of_a_broken_one() {
    let dir = reachable_tempdir();
    let data = dir.path().join("state");
    let out = certo_embedded(&data, &["workflow", "check"])
        .output()
        .expect("run certo");
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(
        lines[0],
        "workflows/certify.yaml: workflow certify, 13 steps (2 per run, 11 per target): valid"
    );
    assert_eq!(
        lines[1],
        "workflows/nightly.yaml: workflow nightly, 8 steps (2 per run, 6 per target): valid"
    );
    assert!(
        lines[2].starts_with("  schedule `0 2 * * *` in Europe/Zurich: next fire 20")
            && lines[2].ends_with(" UTC"),
        "{stdout}"
    );
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "name: certify\nsteps:\n  - name: build\n    timeout: 2 weeks\n  - name: boot\n    needs: [biuld]\n    timeout: 5m\n    retry: {attempts: 3, on: [luck]}\n",
    )
    .expect("write");
    let out = certo_embedded(&data, &["workflow", "check"])
        .arg(&broken)
        .output()
        .expect("run certo");
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let b = broken.display().to_string();
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{b}:4:14: steps[0].timeout: `2 weeks`: a number without a unit (ms, s, m, h)").as_str(),
            format!("{b}:6:13: steps.boot.needs: unknown step `biuld` (did you mean `build`?)").as_str(),
            format!("{b}:8:31: steps[1].retry.on[0]: unknown failure class `luck` (expected one of: infrastructure, timeout, product)").as_str(),
            "3 error(s)",
        ],
        "{}",
        explain(&out)
    );
    let out = certo_embedded(&data, &["workflow", "check", "--json"])
        .output()
        .expect("run certo");
    let v = json_of(&out);
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(
        v["workflows"][0]["workflow"]["steps"][0]["name"], "plan",
        "{v}"
    );
    // Checking needs no store.
    assert!(!data.join("postgres").exists());
}
