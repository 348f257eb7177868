//! The imager for real: mmdebstrap, apt-get, dnf, createrepo_c, mkfs.ext4 and overlay
//! mounts, through the `certo` binary, with PostgreSQL recording the results. These tests
//! run as root (scripts/test, CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use certo_testkit::target_tmp as tmp;

use common::world;

/// A data directory shared by tests that may reuse each other's cached layers.
fn shared_data() -> PathBuf {
    tmp().join("imager-shared")
}

/// A data directory of one test, with an empty image cache.
struct Fresh(PathBuf);

impl Fresh {
    fn new(name: &str) -> Self {
        let dir = tmp().join(format!("imager-{name}-{}", std::process::id()));
        if dir.exists() {
            certo_imager::store::remove_tree(&dir).expect("remove old dir");
        }
        std::fs::create_dir_all(&dir).expect("create data dir");
        Fresh(dir)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = certo_imager::store::remove_tree(&self.0);
    }
}

fn certo_cmd(db: &str, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_certo"));
    c.arg("--data-dir")
        .arg(data)
        .arg("--repos")
        .arg(world())
        .args(args)
        .env("DATABASE_URL", db)
        .env_remove("CERTO_CATALOGUE");
    c
}

fn run(db: &str, data: &Path, args: &[&str]) -> Output {
    certo_cmd(db, data, args).output().expect("run certo")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn build(db: &str, data: &Path, target: &[&str]) -> (Output, Value) {
    let mut args = vec!["image", "build", "--json"];
    args.extend_from_slice(target);
    let out = run(db, data, &args);
    let v = json_of(&out);
    (out, v)
}

fn patch(name: &str) -> String {
    common::fixtures()
        .join("valid")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A file's content inside an ext4 image, read with debugfs.
fn cat_in_image(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn exists_in_image(image: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Inode:")
}

/// `NAME VERSION` of every package in the image's dpkg database.
fn dpkg_installed(image: &Path) -> Vec<String> {
    let status = cat_in_image(image, "/var/lib/dpkg/status");
    let mut out = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |f: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(f))
                .map(str::trim)
                .unwrap_or("")
                .to_owned()
        };
        if field("Status:") == "install ok installed" {
            out.push(format!("{} {}", field("Package:"), field("Version:")));
        }
    }
    out
}

/// `NAME VERSION-RELEASE` of every package in the image's rpm database.
fn rpm_installed(image: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let dump = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /var/lib/rpm {}", dir.path().display()))
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(dump.status.success());
    let out = Command::new("rpm")
        .arg("--dbpath")
        .arg(dir.path().join("rpm"))
        .args(["-qa", "--qf", "%{NAME} %{VERSION}-%{RELEASE}\\n"])
        .output()
        .expect("run rpm");
    let mut list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    list.sort();
    list
}

fn outcomes(v: &Value) -> Vec<(String, String)> {
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap_or("").to_owned(),
                l["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn layer_digest(v: &Value, kind: &str) -> String {
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .find(|l| l["kind"] == kind)
        .and_then(|l| l["digest"].as_str())
        .unwrap_or_else(|| panic!("no {kind} layer in {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_image_is_built_from_real_layers_and_then_cached() {
    let db = common::scratch().await;
    // Its own empty cache: the first build must build every layer (mmdebstrap, apt-get),
    // whatever earlier runs left in the shared directory.
    let fresh = Fresh::new("debian");
    let data = fresh.0.clone();
    let target = [
        "--release",
        "3.2",
        "--platform",
        "deb12_x86_64",
        "--node-type",
        "glite-WN",
    ];
    let mut with_patch = target.to_vec();
    let p = patch("3503-wn-bugfix.yaml");
    with_patch.extend_from_slice(&["--patch", &p]);
    let (out, v) = build(&db.url, &data, &with_patch);
    assert!(out.status.success(), "build failed: {v}");
    let kinds: Vec<String> = outcomes(&v).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["core", "base", "node_type", "patch"]);
    assert!(
        outcomes(&v).iter().all(|(_, o)| o == "built"),
        "the first build into an empty cache built every layer: {v}"
    );
    assert_eq!(v["cached"], false, "{v}");
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    assert!(image.is_file(), "{} missing", image.display());

    // What dpkg says is installed: minbase, the base layer, the node type, the patch.
    let installed = dpkg_installed(&image);
    for expected in [
        "base-files ",
        "busybox ",
        "glite-wn ",
        "glite-wn-env 3.2.4-1",
    ] {
        assert!(
            installed.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not installed; dpkg has {installed:?}"
        );
    }
    assert!(
        !installed.iter().any(|p| p == "glite-wn-env 3.2.3-1"),
        "the baseline version is still installed"
    );
    // Files of the node type and of the patch are in the image; apt's lists are not.
    assert!(exists_in_image(
        &image,
        "/usr/share/glite-tests/glite-WN/regression/bug61001.sh"
    ));
    assert!(exists_in_image(&image, "/etc/profile.d/grid-env.sh"));
    assert!(!cat_in_image(&image, "/etc/debian_version").is_empty());

    // The same request again is a cache hit on every layer and on the image.
    let (out, again) = build(&db.url, &data, &with_patch);
    assert!(out.status.success());
    assert_eq!(again["digest"], v["digest"]);
    assert!(
        outcomes(&again).iter().all(|(_, o)| o == "cached"),
        "{again}"
    );
    assert_eq!(again["cached"], true);

    // The image without the patch shares the three lower layers.
    let (out, plain) = build(&db.url, &data, &target);
    assert!(out.status.success(), "{plain}");
    assert_ne!(plain["digest"], v["digest"]);
    for kind in ["core", "base", "node_type"] {
        assert_eq!(layer_digest(&plain, kind), layer_digest(&v, kind));
    }
    assert!(
        outcomes(&plain).iter().all(|(_, o)| o == "cached"),
        "the shared lower layers come from the cache: {plain}"
    );
    let plain_image = PathBuf::from(plain["path"].as_str().expect("path"));
    assert!(
        dpkg_installed(&plain_image)
            .iter()
            .any(|p| p == "glite-wn-env 3.2.3-1")
    );

    // PostgreSQL knows both images and their layers.
    let ls = json_of(&run(&db.url, &data, &["image", "ls", "--json"]));
    let listed: Vec<&str> = ls
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["digest"].as_str())
        .collect();
    assert!(listed.contains(&v["digest"].as_str().expect("digest")));
    assert!(listed.contains(&plain["digest"].as_str().expect("digest")));
    db.drop_db().await.expect("drop");
    drop(fresh);
}

#[tokio::test(flavor = "multi_thread")]
async fn rpm_image_is_built_with_dnf_from_fixture_repositories() {
    let db = common::scratch().await;
    let data = shared_data();
    let p = patch("3456-yaim-core-wn.txt");
    let (out, v) = build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
            "--export",
            "qcow2,tar.gz",
        ],
    );
    assert!(out.status.success(), "build failed: {v}");
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let installed = rpm_installed(&image);
    for expected in [
        "busybox ",
        "sl-release 5",
        "certo-base ",
        "glite-WN ",
        "glite-yaim-core 4.0.12-1",
        "glite-wn-info 1.2.3-2.sl5",
    ] {
        assert!(
            installed.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not installed; rpm has {installed:?}"
        );
    }
    assert!(cat_in_image(&image, "/etc/redhat-release").contains("Scientific Linux SL release 5"));
    assert!(exists_in_image(&image, "/opt/glite/yaim/etc/wn-list.conf"));
    // The configuration change is in the image.
    let site = cat_in_image(&image, "/opt/glite/yaim/etc/site-info.def");
    assert!(
        site.lines()
            .any(|l| l == "WN_LIST=/opt/glite/yaim/etc/wn-list.conf"),
        "{site}"
    );
    // The exports exist and say what they are.
    let formats: Vec<&str> = v["artefacts"]
        .as_array()
        .expect("artefacts")
        .iter()
        .filter_map(|a| a["format"].as_str())
        .collect();
    assert_eq!(formats, ["ext4", "qcow2", "tar.gz"]);
    let qcow = image.with_file_name("rootfs.qcow2");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow)
        .output()
        .expect("qemu-img");
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"format\": \"qcow2\""));
    let tar = Command::new("tar")
        .arg("-tzf")
        .arg(image.with_file_name("rootfs.tar.gz"))
        .output()
        .expect("tar");
    assert!(String::from_utf8_lossy(&tar.stdout).contains("./etc/redhat-release"));
    db.drop_db().await.expect("drop");
}

/// A package whose post-install script makes `/var/tmp` and a configuration directory
/// links to an absolute path (here a throw-away canary directory, created on the build
/// host): the build resolves both inside the image, so the host's copy is untouched; the
/// configuration change lands in the image's own file, and the linked `/var/tmp` is left
/// as it is (emptying what it names could empty the image).
#[tokio::test(flavor = "multi_thread")]
async fn a_package_that_links_out_of_the_image_cannot_touch_the_build_host() {
    let db = common::scratch().await;
    let fresh = Fresh::new("escape");
    let data = fresh.0.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    // The path the fixture package's links name (fixtures/world/packages.sh).
    let canary = Path::new("/certo-escape-canary");
    let _ = std::fs::remove_dir_all(canary);
    std::fs::create_dir_all(canary.join("etc")).expect("canary");
    std::fs::write(canary.join("keep.txt"), "host file\n").expect("canary file");
    std::fs::write(canary.join("etc/site.conf"), "CANARY_KEY=host\n").expect("canary conf");
    let p = test_patch(
        dir.path(),
        "escape.txt",
        "Patch: 9010\nRevision: 1\nTitle: links out of the image\nStatus: Ready for Certification\n\
         Release: gLite 3.2\nPlatforms: sl5_x86_64\nNode types: glite-WN\nRPMs:\n  \
         certo-test-symlink-escape-1.0-1.noarch.rpm repo:testing/sl5/x86_64\n\
         Configuration changes:\n  /opt/certo-test/escape-etc/site.conf: CANARY_KEY=patched\n\
         Submitter: tester\nDescription:\n  Links out of the image.\n",
    );
    let (out, v) = build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    let host_files: Vec<(PathBuf, String)> = ["keep.txt", "etc/site.conf"]
        .iter()
        .map(|f| {
            let path = canary.join(f);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("<{e}>"));
            (path, text)
        })
        .collect();
    let listing: Vec<String> = std::fs::read_dir(canary)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(canary);
    assert_eq!(
        host_files,
        [
            (canary.join("keep.txt"), "host file\n".to_owned()),
            (canary.join("etc/site.conf"), "CANARY_KEY=host\n".to_owned()),
        ],
        "the build changed files on the host; the canary now holds {listing:?}"
    );
    assert!(out.status.success(), "build failed: {v}");
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    // Inside the image the links lead to the image's own directory.
    assert_eq!(
        cat_in_image(&image, "/certo-escape-canary/etc/site.conf"),
        "CANARY_KEY=patched\n"
    );
    assert!(exists_in_image(&image, "/certo-escape-canary/junk"));
    assert!(exists_in_image(&image, "/opt/certo-test/symlink-escape"));
    db.drop_db().await.expect("drop");
}

/// A patch id above u32::MAX is built and recorded as itself (it was once truncated to
/// u32::MAX, so every such patch shared one id).
#[tokio::test(flavor = "multi_thread")]
async fn a_patch_id_above_u32_max_is_built_and_stored_as_itself() {
    let db = common::scratch().await;
    let fresh = Fresh::new("big-id");
    let dir = tempfile::tempdir().expect("tempdir");
    let id: u64 = u64::from(u32::MAX) + 7;
    let p = test_patch(
        dir.path(),
        "big.txt",
        &format!(
            "Patch: {id}\nRevision: 1\nTitle: a big patch number\nStatus: Ready for Certification\n\
             Release: gLite 3.2\nPlatforms: sl5_x86_64\nNode types: glite-WN\nRPMs:\n  \
             certo-test-ok-1.0-1.noarch.rpm repo:testing/sl5/x86_64\nSubmitter: tester\n\
             Description:\n  Big id.\n"
        ),
    );
    let (out, v) = build(
        &db.url,
        &fresh.0,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    assert!(out.status.success(), "build failed: {v}");
    assert_eq!(v["patch"]["id"], id, "{v}");
    let stored: Vec<(Option<i64>,)> = sqlx::query_as("SELECT patch_id FROM images")
        .fetch_all(db.store.pool())
        .await
        .expect("query");
    assert_eq!(stored, [(Some(id as i64),)]);
    let listed = json_of(&run(&db.url, &fresh.0, &["image", "ls", "--json"]));
    assert!(listed.to_string().contains(&id.to_string()), "{listed}");
    db.drop_db().await.expect("drop");
}

/// A metapackage change (the tracker's "Metapackage changes": a package already in production
/// that the patch adds to a node type) installs that package from the release's production
/// repository into the node type's image; one that is not in production is refused, saying so.
#[tokio::test(flavor = "multi_thread")]
async fn a_metapackage_change_installs_a_production_package_and_a_missing_one_is_refused() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let record = |id: u32, file: &str| {
        format!(
            "Patch: {id}\nRevision: 1\nSummary: the LDAP provider on the WN\nRelease: 3.2.0\n\
             Platform: SL5/64bit\nAffected metapackages: glite-WN\nMetapackage changes:\n  \
             glite-WN: {file}\nSubmitted by: tester\n"
        )
    };
    let ok = test_patch(
        dir.path(),
        "meta.txt",
        &record(3630, "glite-info-provider-ldap-1.4.1-1.noarch.rpm"),
    );
    let target = |p: &str| {
        vec![
            "--release".to_owned(),
            "3.2".to_owned(),
            "--platform".to_owned(),
            "sl5_x86_64".to_owned(),
            "--node-type".to_owned(),
            "glite-WN".to_owned(),
            "--patch".to_owned(),
            p.to_owned(),
        ]
    };
    let args = target(&ok);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, v) = build(&db.url, &data, &args);
    assert!(out.status.success(), "build failed: {v}");
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let installed = rpm_installed(&image);
    assert!(
        installed
            .iter()
            .any(|p| p == "glite-info-provider-ldap 1.4.1-1"),
        "{installed:?}"
    );

    let missing = test_patch(
        dir.path(),
        "missing.txt",
        &record(3631, "glite-info-provider-ldap-9.9.9-1.noarch.rpm"),
    );
    let args = target(&missing);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let v = failing_build(&db.url, &data, &args);
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "metapackage change glite-info-provider-ldap-9.9.9-1.noarch.rpm: the package is not in the release's production repository"
        ),
        "{v}"
    );
    db.drop_db().await.expect("drop");
}

/// Writes a one-record patch file for failure tests.
fn test_patch(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write patch");
    path.to_string_lossy().into_owned()
}

fn failing_build(db: &str, data: &Path, target: &[&str]) -> Value {
    let (out, v) = build(db, data, target);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a refused build: {v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing of the failed layer is cached: plan it and look.
    let mut plan_args = vec!["image", "plan", "--json"];
    plan_args.extend(target.iter().filter(|a| **a != "--json"));
    let plan = json_of(&run(db, data, &plan_args));
    let failed_kind = v["error"]["layer"].as_str().expect("layer").to_owned();
    if plan["error"].is_object() {
        // The inputs themselves are refused (e.g. a package file's checksum): no digest,
        // so nothing can have been cached under one.
        assert_eq!(plan["error"]["phase"], v["error"]["phase"], "{plan}");
        return v;
    }
    let failed = plan["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no plan for {target:?}: {plan}"))
        .iter()
        .find(|l| l["kind"] == failed_kind.as_str())
        .expect("the failed layer is planned");
    assert_eq!(failed["cached"], false, "a failed layer was cached: {plan}");
    assert!(
        !data
            .join("imager/layers")
            .join(failed["digest"].as_str().expect("digest"))
            .exists()
    );
    assert_eq!(plan["image_cached"], false);
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_builds_say_which_package_phase_and_status_and_cache_nothing() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");

    // A post-install script that fails (fixture 3211): rpm only warns, Certo refuses.
    let p = patch("3211-ui-broken-postinst.yaml");
    let v = failing_build(
        &db.url,
        &data,
        &[
            "--release",
            "3.1",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-UI",
            "--patch",
            &p,
        ],
    );
    assert_eq!(v["error"]["phase"], "script", "{v}");
    assert_eq!(v["error"]["exit_status"], 1, "{v}");
    assert!(
        v["error"]["package"]
            .as_str()
            .is_some_and(|p| p.starts_with("glite-ui-postinst-broken")),
        "{v}"
    );
    assert!(!v["error"]["log_tail"].as_array().expect("tail").is_empty());

    // A configuration change that breaks the CE's configuration (fixture 3212).
    let p = patch("3212-ce-bad-config.json");
    let v = failing_build(
        &db.url,
        &data,
        &[
            "--release",
            "3.1",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-CE",
            "--patch",
            &p,
        ],
    );
    assert_eq!(v["error"]["phase"], "configure", "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("CE_GATEKEEPER_PORT"),
        "{v}"
    );

    // A missing dependency.
    let record = |id: u32, file: &str, platform: &str, repo: &str| {
        format!(
            "Patch: {id}\nRevision: 1\nTitle: failure test {id}\nStatus: Ready for Certification\nRelease: gLite 3.2\nPlatforms: {platform}\nNode types: glite-WN\n{}:\n  {file} repo:{repo}\nSubmitter: tester\nDescription:\n  Failure test.\n",
            if file.ends_with(".rpm") {
                "RPMs"
            } else {
                "DEBs"
            }
        )
    };
    let p = test_patch(
        dir.path(),
        "missing.txt",
        &record(
            9001,
            "certo-test-missing-dep-1.0-1.noarch.rpm",
            "sl5_x86_64",
            "testing/sl5/x86_64",
        ),
    );
    let v = failing_build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    assert_eq!(v["error"]["phase"], "resolve", "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("libcerto-absent"),
        "{v}"
    );
    assert!(
        v["error"]["package"]
            .as_str()
            .is_some_and(|p| p.starts_with("certo-test-missing-dep")),
        "{v}"
    );

    // A file conflict with an installed package.
    let p = test_patch(
        dir.path(),
        "conflict.txt",
        &record(
            9002,
            "certo-test-file-conflict-1.0-1.noarch.rpm",
            "sl5_x86_64",
            "testing/sl5/x86_64",
        ),
    );
    let v = failing_build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    assert_eq!(v["error"]["phase"], "unpack", "{v}");
    assert!(
        v["message"].as_str().expect("message").contains("conflict"),
        "{v}"
    );

    // A Debian post-install script that fails, read from dpkg's own words.
    let p = test_patch(
        dir.path(),
        "deb-postinst.txt",
        &record(
            9003,
            "certo-test-postinst-fails_1.0-1_all.deb",
            "deb12_x86_64",
            "testing",
        ),
    );
    let v = failing_build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "deb12_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    assert_eq!(v["error"]["phase"], "script", "{v}");
    assert_eq!(v["error"]["exit_status"], 3, "{v}");
    assert_eq!(v["error"]["package"], "certo-test-postinst-fails", "{v}");

    // A package file whose checksum is not the record's.
    let p = test_patch(
        dir.path(),
        "checksum.txt",
        &record(
            9004,
            &format!("certo-test-ok-1.0-1.noarch.rpm sha256:{}", "ab".repeat(32)),
            "sl5_x86_64",
            "testing/sl5/x86_64",
        ),
    );
    let v = failing_build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    assert_eq!(v["error"]["phase"], "fetch", "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("checksum mismatch"),
        "{v}"
    );

    // Every failure is recorded as evidence.
    let failures: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT phase, package FROM image_build_failures ORDER BY id")
            .fetch_all(db.store.pool())
            .await
            .expect("query");
    let phases: Vec<&str> = failures.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        phases,
        [
            "install script",
            "configure",
            "resolve",
            "unpack",
            "install script",
            "fetch"
        ]
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_targets_are_refused_with_a_reason_and_change_nothing() {
    let db = common::scratch().await;
    let data = Fresh::new("bad");
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--release",
                "3.2",
                "--platform",
                "sl6_x86_64",
                "--node-type",
                "glite-WN",
            ],
            "unknown platform \"sl6_x86_64\"",
        ),
        (
            &[
                "--release",
                "3.3",
                "--platform",
                "sl5_x86_64",
                "--node-type",
                "glite-WN",
            ],
            "unknown release \"3.3\"",
        ),
        (
            &[
                "--release",
                "3.1",
                "--platform",
                "deb12_x86_64",
                "--node-type",
                "glite-CE",
            ],
            "is not built for deb12_x86_64",
        ),
        (
            &[
                "--release",
                "3.2",
                "--platform",
                "sl5_x86_64",
                "--node-type",
                "glite-WN",
                "--patch",
                "3456@7",
            ],
            "patch 3456@7 is not stored",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["image", "build"];
        all.extend_from_slice(args);
        let out = run(&db.url, &data.0, &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A patch whose repository path leaves the repository root is refused by the reader.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = test_patch(
        dir.path(),
        "escape.txt",
        "Patch: 9100\nRevision: 1\nTitle: escape\nStatus: Ready for Certification\nRelease: gLite 3.2\nPlatforms: sl5_x86_64\nNode types: glite-WN\nRPMs:\n  certo-test-ok-1.0-1.noarch.rpm repo:../../../etc\nSubmitter: t\nDescription:\n  x\n",
    );
    let out = run(
        &db.url,
        &data.0,
        &[
            "image",
            "build",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(".."), "{stderr}");
    // Nothing was built or recorded.
    let layers = std::fs::read_dir(data.0.join("imager/layers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(layers, 0);
    let (images,): (i64,) = sqlx::query_as("SELECT count(*) FROM images")
        .fetch_one(db.store.pool())
        .await
        .expect("count");
    assert_eq!(images, 0);
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_builds_of_one_target_build_each_layer_once() {
    let db = common::scratch().await;
    let data = Fresh::new("concurrent");
    let args = [
        "image",
        "build",
        "--json",
        "--release",
        "3.2",
        "--platform",
        "sl5_x86_64",
        "--node-type",
        "glite-UI",
    ];
    let a = certo_cmd(&db.url, &data.0, &args).spawn_output();
    let b = certo_cmd(&db.url, &data.0, &args).spawn_output();
    let (a, b) = (a.join().expect("join"), b.join().expect("join"));
    assert!(a.status.success() && b.status.success());
    let (va, vb) = (json_of(&a), json_of(&b));
    assert_eq!(va["digest"], vb["digest"]);
    for (i, (kind, outcome_a)) in outcomes(&va).into_iter().enumerate() {
        let outcome_b = &outcomes(&vb)[i].1;
        let built = [&outcome_a, outcome_b]
            .iter()
            .filter(|o| o.as_str() == "built")
            .count();
        assert_eq!(
            built, 1,
            "{kind} built {built} times: {outcome_a} / {outcome_b}"
        );
    }
    let layers = std::fs::read_dir(data.0.join("imager/layers"))
        .expect("layers")
        .count();
    assert_eq!(layers, 3);
    db.drop_db().await.expect("drop");
}

trait SpawnOutput {
    fn spawn_output(&mut self) -> std::thread::JoinHandle<Output>;
}

impl SpawnOutput for Command {
    fn spawn_output(&mut self) -> std::thread::JoinHandle<Output> {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn certo");
        std::thread::spawn(move || child.wait_with_output().expect("wait"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_killed_midway_leaves_no_cache_entry_and_no_mount() {
    use std::os::unix::process::CommandExt;
    let db = common::scratch().await;
    let data = Fresh::new("killed");
    let target = [
        "--release",
        "3.2",
        "--platform",
        "deb12_x86_64",
        "--node-type",
        "glite-UI",
    ];
    let mut plan_args = vec!["image", "plan", "--json"];
    plan_args.extend_from_slice(&target);
    let plan = json_of(&run(&db.url, &data.0, &plan_args));
    let core = plan["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();

    let mut args = vec!["image", "build"];
    args.extend_from_slice(&target);
    let mut child = certo_cmd(&db.url, &data.0, &args)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until mmdebstrap is writing into the staging area, then kill the whole job.
    let staging = data.0.join("imager/staging");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let busy = std::fs::read_dir(&staging)
            .map(|d| {
                d.flatten().any(|e| {
                    e.path().join("out/tree/usr").exists() || e.path().join("out/tree/var").exists()
                })
            })
            .unwrap_or(false);
        if busy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    let pgid = child.id() as i32;
    // `kill -9 -PGID` is read by procps-ng's kill as kill(-1, 9): everything. Spell it out.
    Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgid}")])
        .status()
        .expect("kill");
    let _ = child.wait();
    std::thread::sleep(std::time::Duration::from_millis(500));

    // No layer was published, nothing recorded.
    assert!(!data.0.join("imager/layers").join(&core).exists());
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM image_layers")
        .fetch_one(db.store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 0);
    // The next command removes what the dead build left: staging and its mounts.
    let plan = json_of(&run(&db.url, &data.0, &plan_args));
    assert_eq!(plan["layers"][0]["cached"], false);
    let left = std::fs::read_dir(&staging).expect("staging").count();
    assert_eq!(left, 0, "staging not cleaned");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(data.0.to_str().expect("utf-8")),
        "mounts left under {}",
        data.0.display()
    );
    db.drop_db().await.expect("drop");
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_what_no_kept_image_needs_and_nothing_else() {
    let db = common::scratch().await;
    let data = Fresh::new("gc");
    let base = [
        "--release",
        "3.2",
        "--platform",
        "sl5_x86_64",
        "--node-type",
        "glite-WN",
    ];
    let p = patch("3456-yaim-core-wn.txt");
    let mut with_a = base.to_vec();
    with_a.extend_from_slice(&["--patch", &p]);
    let dir = tempfile::tempdir().expect("tempdir");
    let pb = test_patch(
        dir.path(),
        "ok.txt",
        "Patch: 9200\nRevision: 1\nTitle: ok\nStatus: Ready for Certification\nRelease: gLite 3.2\nPlatforms: sl5_x86_64\nNode types: glite-WN\nRPMs:\n  certo-test-ok-1.1-1.noarch.rpm repo:testing/sl5/x86_64\nSubmitter: t\nDescription:\n  x\n",
    );
    let mut with_b = base.to_vec();
    with_b.extend_from_slice(&["--patch", &pb]);
    let (o1, plain) = build(&db.url, &data.0, &base);
    let (o2, a) = build(&db.url, &data.0, &with_a);
    let (o3, b) = build(&db.url, &data.0, &with_b);
    assert!(
        o1.status.success() && o2.status.success() && o3.status.success(),
        "{plain} {a} {b}"
    );
    let layers_dir = data.0.join("imager/layers");
    assert_eq!(std::fs::read_dir(&layers_dir).expect("layers").count(), 5);

    // A dry run removes nothing.
    let dry = json_of(&run(
        &db.url,
        &data.0,
        &[
            "image",
            "gc",
            "--keep-days",
            "0",
            "--keep-images",
            "1",
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(dry["removed_images"].as_array().expect("images").len(), 2);
    assert_eq!(std::fs::read_dir(&layers_dir).expect("layers").count(), 5);

    let done = json_of(&run(
        &db.url,
        &data.0,
        &[
            "image",
            "gc",
            "--keep-days",
            "0",
            "--keep-images",
            "1",
            "--json",
        ],
    ));
    // Kept: image B and its four layers. Removed: the plain image, image A and A's patch layer.
    let removed: Vec<&str> = done["removed_layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(removed, [layer_digest(&a, "patch").as_str()]);
    for kind in ["core", "base", "node_type", "patch"] {
        assert!(
            layers_dir
                .join(layer_digest(&b, kind))
                .join("tree")
                .is_dir(),
            "{kind} of B removed"
        );
    }
    assert!(PathBuf::from(b["path"].as_str().expect("path")).is_file());
    assert!(!PathBuf::from(a["path"].as_str().expect("path")).exists());
    let ls = json_of(&run(&db.url, &data.0, &["image", "ls", "--json"]));
    let listed: Vec<&str> = ls
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["digest"].as_str())
        .collect();
    assert_eq!(listed, [b["digest"].as_str().expect("digest")]);
    // B still builds from the cache after gc.
    let (_, again) = build(&db.url, &data.0, &with_b);
    assert_eq!(again["cached"], true, "{again}");
    db.drop_db().await.expect("drop");
}

fn digests(request: &certo_imager::ImageRequest, world: &Path) -> Vec<String> {
    certo_imager::plan::plan(request, world)
        .expect("plan")
        .iter()
        .map(|l| l.digest.to_hex())
        .collect()
}

fn load_record(name: &str) -> certo_orchestrator::patch::PatchRecord {
    let loaded = certo_orchestrator::ingest::load_files(
        &[common::fixtures().join("valid").join(name)],
        &certo_orchestrator::catalogue::Catalogue::builtin(),
        || {},
    );
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.records[0].record.clone()
}

#[test]
fn every_kind_of_input_change_changes_the_digest_of_that_layer_and_above() {
    let copy = tempfile::tempdir().expect("tempdir");
    let w = copy.path().join("world");
    let ok = Command::new("cp")
        .arg("-a")
        .arg(world())
        .arg(&w)
        .status()
        .expect("cp");
    assert!(ok.success());
    let cat = certo_orchestrator::catalogue::Catalogue::builtin();
    let rec = load_record("3456-yaim-core-wn.txt");
    let req = |rec: &certo_orchestrator::patch::PatchRecord, platform: &str| {
        certo_orchestrator::images::request(&cat, "3.2", platform, "glite-WN", Some(rec))
            .expect("request")
    };
    let base = digests(&req(&rec, "sl5_x86_64"), &w);
    assert_eq!(base.len(), 4);
    // The same inputs give the same digests.
    assert_eq!(digests(&req(&rec, "sl5_x86_64"), &w), base);

    // A configuration line: only the patch layer changes.
    let mut changed = rec.clone();
    changed.config_changes[0].value.push_str(".new");
    let d = digests(&req(&changed, "sl5_x86_64"), &w);
    assert_eq!(d[..3], base[..3]);
    assert_ne!(d[3], base[3]);

    // A package version: the same patch with another version of a package.
    let mut v10 = rec.clone();
    let pkg = |file: &str| certo_orchestrator::patch::Package {
        file: file.to_owned(),
        name: "certo-test-ok".to_owned(),
        version: "1.0".to_owned(),
        release: "1".to_owned(),
        arch: "noarch".to_owned(),
        format: certo_orchestrator::patch::PackageFormat::Rpm,
        source: certo_orchestrator::patch::PackageSource::Repository(
            "testing/sl5/x86_64".to_owned(),
        ),
        sha256: None,
        external: false,
    };
    v10.packages = vec![pkg("certo-test-ok-1.0-1.noarch.rpm")];
    let mut v11 = rec.clone();
    v11.packages = vec![pkg("certo-test-ok-1.1-1.noarch.rpm")];
    let (d10, d11) = (
        digests(&req(&v10, "sl5_x86_64"), &w),
        digests(&req(&v11, "sl5_x86_64"), &w),
    );
    assert_eq!(d10[..3], d11[..3]);
    assert_ne!(d10[3], d11[3]);

    // A refresh of the release repository: the node-type layer and the patch layer change.
    let glite = w.join("rpm/glite/3.2/sl5/x86_64");
    std::fs::copy(
        w.join("rpm/testing/sl5/x86_64/certo-test-ok-1.0-1.noarch.rpm"),
        glite.join("certo-test-ok-1.0-1.noarch.rpm"),
    )
    .expect("copy rpm");
    let ok = Command::new("createrepo_c")
        .arg("-q")
        .arg(&glite)
        .status()
        .expect("createrepo_c");
    assert!(ok.success());
    let d = digests(&req(&rec, "sl5_x86_64"), &w);
    assert_eq!(d[..2], base[..2]);
    assert_ne!(d[2], base[2]);
    assert_ne!(d[3], base[3]);

    // A refresh of the OS repository changes every layer (each has its parent in its inputs).
    let os = w.join("rpm/os/sl5/x86_64");
    std::fs::copy(
        w.join("rpm/testing/sl5/x86_64/certo-test-ok-1.0-1.noarch.rpm"),
        os.join("certo-test-ok-1.0-1.noarch.rpm"),
    )
    .expect("copy rpm");
    let ok = Command::new("createrepo_c")
        .arg("-q")
        .arg(&os)
        .status()
        .expect("createrepo_c");
    assert!(ok.success());
    let d2 = digests(&req(&rec, "sl5_x86_64"), &w);
    for i in 0..4 {
        assert_ne!(
            d2[i], d[i],
            "layer {i} kept its digest after an OS repository refresh"
        );
    }

    // Another architecture (backend parameters) is another stack.
    let i386 = digests(&req(&rec, "sl5_i386"), &w);
    for i in 0..4 {
        assert_ne!(i386[i], d2[i]);
    }

    // Debian: a refreshed flat repository changes the node-type layer, not the core.
    let deb = load_record("3503-wn-bugfix.yaml");
    let dreq =
        certo_orchestrator::images::request(&cat, "3.2", "deb12_x86_64", "glite-WN", Some(&deb))
            .expect("request");
    let before = digests(&dreq, &w);
    let release = w.join("deb/glite/3.2/Release");
    let mut text = std::fs::read_to_string(&release).expect("Release");
    text.push_str("Description: refreshed\n");
    std::fs::write(&release, text).expect("write Release");
    let after = digests(&dreq, &w);
    assert_eq!(after[..2], before[..2]);
    assert_ne!(after[2], before[2]);
    assert_ne!(after[3], before[3]);
}

/// A one-package record on glite-WN of 3.2 for `platform`, the file from `repo:` (relative
/// to the world's rpm/ or deb/), with `extra` lines (e.g. `Downgrade: allowed`).
fn one_file_record(id: u32, file: &str, platform: &str, repo: &str, extra: &str) -> String {
    format!(
        "Patch: {id}\nRevision: 1\nTitle: image content test {id}\nStatus: Ready for Certification\n\
         Release: gLite 3.2\nPlatforms: {platform}\nNode types: glite-WN\n{}:\n  {file} repo:{repo}\n\
         Submitter: tester\n{extra}Description:\n  What the image holds must be what the record says.\n",
        if file.ends_with(".rpm") {
            "RPMs"
        } else {
            "DEBs"
        }
    )
}

fn wn_target<'a>(platform: &'a str, patch: &'a str) -> [&'a str; 8] {
    [
        "--release",
        "3.2",
        "--platform",
        platform,
        "--node-type",
        "glite-WN",
        "--patch",
        patch,
    ]
}

/// `%{SHA256HEADER}` of a package file, as rpm reads it.
fn rpm_header_digest(file: &Path) -> String {
    let out = Command::new("rpm")
        .args(["-qp", "--nosignature", "--qf", "%{SHA256HEADER}"])
        .arg(file)
        .output()
        .expect("run rpm");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Hole 1: a patch file with the baseline's exact name-version-release and other content
/// (the world's rebuilt glite-yaim-core-4.0.11-1) is skipped by dnf ("already installed")
/// and taken for a downgrade to itself by apt: the build fails at install, naming the
/// file, the package and both digests (RPM) or versions (Debian), and caches nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuilt_file_of_the_installed_version_is_not_taken_for_it() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = "glite-yaim-core-4.0.11-1.noarch.rpm";
    let p = test_patch(
        dir.path(),
        "rebuilt.txt",
        &one_file_record(9101, file, "sl5_x86_64", "testing-yaim/rebuilt", ""),
    );
    let v = failing_build(&db.url, &data, &wn_target("sl5_x86_64", &p));
    assert_eq!(v["error"]["phase"], "install", "{v}");
    assert_eq!(v["error"]["layer"], "patch", "{v}");
    assert_eq!(v["error"]["package"], "glite-yaim-core", "{v}");
    let installed = rpm_header_digest(&world().join("rpm/glite/3.2/sl5/x86_64").join(file));
    let rebuilt = rpm_header_digest(&world().join("rpm/testing-yaim/rebuilt").join(file));
    assert_ne!(installed, rebuilt, "the fixture rebuild must differ");
    assert_eq!(
        v["error"]["message"],
        format!(
            "{file} is not what is installed: the image has glite-yaim-core-4.0.11-1 with \
             header digest (SHA-256) {installed}, the file has {rebuilt} (same \
             name-version-release, other content: the package manager skipped it)"
        ),
        "{v}"
    );
    // dnf's own words are in the tail.
    assert!(
        v["error"]["log_tail"]
            .as_array()
            .expect("tail")
            .iter()
            .any(|l| l.as_str().is_some_and(
                |l| l.contains("glite-yaim-core-4.0.11-1.noarch is already installed")
            )),
        "{v}"
    );

    let deb = "glite-yaim-core_4.0.11-1_all.deb";
    let p = test_patch(
        dir.path(),
        "rebuilt-deb.txt",
        &one_file_record(9102, deb, "deb12_x86_64", "testing-yaim/rebuilt", ""),
    );
    let v = failing_build(&db.url, &data, &wn_target("deb12_x86_64", &p));
    assert_eq!(v["error"]["phase"], "install", "{v}");
    assert_eq!(v["error"]["package"], "glite-yaim-core", "{v}");
    assert_eq!(
        v["error"]["message"],
        format!(
            "{deb} is not what is installed: the image has glite-yaim-core 4.0.11-1 from \
             another package file (same version, other content: apt takes the file for a \
             downgrade of glite-yaim-core 4.0.11-1 to itself and refuses it); apt-get: E: \
             Packages were downgraded and -y was used without --allow-downgrades."
        ),
        "{v}"
    );
    db.drop_db().await.expect("drop");
}

/// Hole 2, RPM: dnf downgrades glite-yaim-core 4.0.11-1 to the world's 4.0.11-0 without a
/// word; the build is refused at install, saying which package went from which version to
/// which. The same record with `Downgrade: allowed` is another patch layer (its digest
/// differs) and builds, with 4.0.11-0 in the image.
#[tokio::test(flavor = "multi_thread")]
async fn an_rpm_downgrade_is_refused_unless_the_record_allows_it() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = "glite-yaim-core-4.0.11-0.noarch.rpm";
    let refused = test_patch(
        dir.path(),
        "older.txt",
        &one_file_record(9103, file, "sl5_x86_64", "testing-yaim/older", ""),
    );
    let v = failing_build(&db.url, &data, &wn_target("sl5_x86_64", &refused));
    assert_eq!(v["error"]["phase"], "install", "{v}");
    assert_eq!(v["error"]["layer"], "patch", "{v}");
    assert_eq!(v["error"]["package"], "glite-yaim-core", "{v}");
    assert_eq!(
        v["error"]["message"],
        "downgrade refused: glite-yaim-core 4.0.11-1 → 4.0.11-0 (the record does not allow \
         downgrades; `allow_downgrade: true` (text form `Downgrade: allowed`) allows them)",
        "{v}"
    );

    let allowed = test_patch(
        dir.path(),
        "older-allowed.txt",
        &one_file_record(
            9103,
            file,
            "sl5_x86_64",
            "testing-yaim/older",
            "Downgrade: allowed\n",
        ),
    );
    let plan = |p: &str| {
        let mut args = vec!["image", "plan", "--json"];
        args.extend(wn_target("sl5_x86_64", p));
        json_of(&run(&db.url, &data, &args))
    };
    let (before, after) = (plan(&refused), plan(&allowed));
    assert_eq!(
        layer_digest(&before, "node_type"),
        layer_digest(&after, "node_type")
    );
    assert_ne!(
        layer_digest(&before, "patch"),
        layer_digest(&after, "patch"),
        "the opt-in is an input of the patch layer"
    );
    let (out, v) = build(&db.url, &data, &wn_target("sl5_x86_64", &allowed));
    assert!(
        out.status.success(),
        "the allowed downgrade did not build: {v}"
    );
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let installed = rpm_installed(&image);
    assert!(
        installed.iter().any(|p| p == "glite-yaim-core 4.0.11-0"),
        "{installed:?}"
    );
    db.drop_db().await.expect("drop");
}

/// Hole 2, Debian (and hole 3's apt refusal): apt refuses the downgrade itself, and the
/// failure now says which package from which version to which and quotes apt's line;
/// with `Downgrade: allowed` apt is told `--allow-downgrades` and the image has 4.0.11-0.
#[tokio::test(flavor = "multi_thread")]
async fn a_debian_downgrade_is_refused_unless_the_record_allows_it() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = "glite-yaim-core_4.0.11-0_all.deb";
    let refused = test_patch(
        dir.path(),
        "older-deb.txt",
        &one_file_record(9104, file, "deb12_x86_64", "testing-yaim/older", ""),
    );
    let v = failing_build(&db.url, &data, &wn_target("deb12_x86_64", &refused));
    assert_eq!(v["error"]["phase"], "install", "{v}");
    assert_eq!(v["error"]["layer"], "patch", "{v}");
    assert_eq!(v["error"]["package"], "glite-yaim-core", "{v}");
    assert_eq!(v["error"]["exit_status"], 100, "{v}");
    assert_eq!(
        v["error"]["message"],
        "downgrade refused: glite-yaim-core 4.0.11-1 → 4.0.11-0 (the record does not allow \
         downgrades; `allow_downgrade: true` (text form `Downgrade: allowed`) allows them); \
         apt-get: E: Packages were downgraded and -y was used without --allow-downgrades.",
        "{v}"
    );

    let allowed = test_patch(
        dir.path(),
        "older-deb-allowed.txt",
        &one_file_record(
            9104,
            file,
            "deb12_x86_64",
            "testing-yaim/older",
            "Downgrade: allowed\n",
        ),
    );
    let (out, v) = build(&db.url, &data, &wn_target("deb12_x86_64", &allowed));
    assert!(
        out.status.success(),
        "the allowed downgrade did not build: {v}"
    );
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let installed = dpkg_installed(&image);
    assert!(
        installed.iter().any(|p| p == "glite-yaim-core 4.0.11-0"),
        "{installed:?}"
    );
    db.drop_db().await.expect("drop");
}

/// Hole 3: dnf's "cannot install both" names the package and quotes the solver. (A record
/// cannot hold 3504's and 3505's two versions of glite-info-provider-service at once: the
/// reader refuses a package listed twice, and so do the layer inputs; their dnf output is
/// in the parser's unit tests.) Here the world's glite-yaim-core-4.0.10-1 is older than
/// the installed glite-WN requires (>= 4.0.11): dnf cannot install both it and 4.0.11-1
/// (nor the update repository's 4.0.12-1).
#[tokio::test(flavor = "multi_thread")]
async fn a_solver_refusal_names_the_package_and_quotes_the_solver() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = test_patch(
        dir.path(),
        "too-old.txt",
        &one_file_record(
            9105,
            "glite-yaim-core-4.0.10-1.noarch.rpm",
            "sl5_x86_64",
            "testing-yaim/older",
            "Downgrade: allowed\n",
        ),
    );
    let v = failing_build(&db.url, &data, &wn_target("sl5_x86_64", &p));
    assert_eq!(v["error"]["phase"], "install", "{v}");
    assert_eq!(v["error"]["layer"], "patch", "{v}");
    assert_eq!(v["error"]["package"], "glite-yaim-core", "{v}");
    assert_eq!(v["error"]["exit_status"], 1, "{v}");
    assert_eq!(
        v["error"]["message"],
        "dnf cannot install glite-yaim-core: problem with installed package \
         glite-WN-3.2.0-1.noarch; package glite-WN-3.2.0-1.noarch requires glite-yaim-core \
         >= 4.0.11, but none of the providers can be installed; cannot install both \
         glite-yaim-core-4.0.10-1.noarch and glite-yaim-core-4.0.11-1.noarch; cannot install \
         both glite-yaim-core-4.0.10-1.noarch and glite-yaim-core-4.0.12-1.noarch; \
         conflicting requests",
        "{v}"
    );
    db.drop_db().await.expect("drop");
}

/// The testbed's protection at image-build time: a package whose install script changes
/// site configuration that the record's configuration changes do not (the world's
/// certo-test-site-config rewrites SITE_NAME in site-info.def) fails the build at
/// `testbed`, naming the file, the key, both values and the package, and caches nothing;
/// on RPM and on Debian.
#[tokio::test(flavor = "multi_thread")]
async fn a_package_script_that_changes_site_configuration_fails_at_testbed() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    for (id, file, platform, repo) in [
        (
            9301,
            "certo-test-site-config-1.0-1.noarch.rpm",
            "sl5_x86_64",
            "testing/sl5/x86_64",
        ),
        (
            9302,
            "certo-test-site-config_1.0-1_all.deb",
            "deb12_x86_64",
            "testing",
        ),
    ] {
        let p = test_patch(
            dir.path(),
            &format!("{id}.txt"),
            &one_file_record(id, file, platform, repo, ""),
        );
        let v = failing_build(&db.url, &data, &wn_target(platform, &p));
        assert_eq!(v["error"]["phase"], "testbed", "{platform}: {v}");
        assert_eq!(v["error"]["layer"], "patch", "{platform}: {v}");
        assert_eq!(
            v["error"]["package"], "certo-test-site-config",
            "{platform}: {v}"
        );
        assert_eq!(
            v["error"]["message"],
            "the install script of certo-test-site-config changed the site configuration \
             beyond the record's configuration changes: /opt/glite/yaim/etc/site-info.def: \
             SITE_NAME: CERTO-TESTBED → CERTO-ROGUE",
            "{platform}: {v}"
        );
    }
    // The record may make the same change itself: then the script's change is the record's.
    let record = one_file_record(
        9303,
        "certo-test-site-config-1.0-1.noarch.rpm",
        "sl5_x86_64",
        "testing/sl5/x86_64",
        "Configuration changes:\n  site-info.def: SITE_NAME=CERTO-ROGUE\n",
    );
    let p = test_patch(dir.path(), "9303.txt", &record);
    let (out, v) = build(&db.url, &data, &wn_target("sl5_x86_64", &p));
    assert!(
        out.status.success(),
        "{v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failures: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT phase, package FROM image_build_failures ORDER BY id")
            .fetch_all(db.store.pool())
            .await
            .expect("query");
    assert_eq!(
        failures,
        [
            (
                "testbed".to_owned(),
                Some("certo-test-site-config".to_owned())
            ),
            (
                "testbed".to_owned(),
                Some("certo-test-site-config".to_owned())
            )
        ]
    );
    db.drop_db().await.expect("drop");
}

/// Patch 3506's %post rewrites BDII_HOST=testbed-bdii.certo, which its record's
/// configuration change sets too: the image builds (what it does in the testbed is the
/// guard's to judge). The same packages without that configuration change fail at
/// `testbed`, naming BDII_HOST and glite-bdii-top-hijack.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_change_the_record_makes_too_is_the_records_own() {
    let db = common::scratch().await;
    let data = shared_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = |p: &str| {
        [
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-BDII",
            "--patch",
            p,
        ]
        .map(str::to_owned)
    };
    let p = patch("3506-bdii-spoils-testbed.json");
    let t = target(&p);
    let t: Vec<&str> = t.iter().map(String::as_str).collect();
    let (out, v) = build(&db.url, &data, &t);
    assert!(
        out.status.success(),
        "3506 as recorded must build: {v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let site = cat_in_image(&image, "/opt/glite/yaim/etc/site-info.def");
    assert!(
        site.lines().any(|l| l == "BDII_HOST=testbed-bdii.certo"),
        "{site}"
    );

    let mut record: Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read 3506")).expect("json");
    record["id"] = 9306.into();
    record["config_changes"] = Value::Array(Vec::new());
    let p = test_patch(dir.path(), "9306.json", &record.to_string());
    let t = target(&p);
    let t: Vec<&str> = t.iter().map(String::as_str).collect();
    let v = failing_build(&db.url, &data, &t);
    assert_eq!(v["error"]["phase"], "testbed", "{v}");
    assert_eq!(v["error"]["package"], "glite-bdii-top-hijack", "{v}");
    assert_eq!(
        v["error"]["message"],
        "the install script of glite-bdii-top-hijack changed the site configuration beyond \
         the record's configuration changes: /opt/glite/yaim/etc/site-info.def: BDII_HOST: \
         localhost → testbed-bdii.certo",
        "{v}"
    );
    db.drop_db().await.expect("drop");
}

/// Every file under `dir` (not following links) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && std::fs::read(&path)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}

/// Root's `/etc/shadow` hash in an ext4 image.
fn root_hash(image: &Path) -> String {
    let shadow = cat_in_image(image, "/etc/shadow");
    shadow
        .lines()
        .find_map(|l| l.strip_prefix("root:"))
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no root entry in /etc/shadow: {shadow:?}"))
        .to_owned()
}

/// Whether `hash` (`$6$SALT$...`) is SHA-512 crypt of `password`, as OpenSSL computes it.
fn openssl_verifies(hash: &str, password: &str) -> bool {
    let salt = hash
        .strip_prefix("$6$")
        .and_then(|rest| rest.split('$').next())
        .unwrap_or_else(|| panic!("not a $6$ hash: {hash}"));
    let mut child = Command::new("openssl")
        .args(["passwd", "-6", "-salt", salt, "-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{password}").expect("write password");
    }
    let out = child.wait_with_output().expect("openssl");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim() == hash
}

fn cache_entries(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = ["layers", "images"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(data.join("imager").join(d))
                .into_iter()
                .flatten()
                .flatten()
                .map(move |e| format!("{d}/{}", e.file_name().to_string_lossy()))
        })
        .collect();
    names.sort();
    names
}

/// `genfs.py -t SL5_x86_64 -g Core -p glite-wn-env -w rootpwd -o img.qcow2`, Certo's way:
/// a core-only image with an extra package and root's password in a custom layer of its
/// own, cached like the others, copied where the person asked.
#[tokio::test(flavor = "multi_thread")]
async fn a_core_image_with_an_extra_package_and_a_root_password_is_built_once() {
    let db = common::scratch().await;
    let fresh = Fresh::new("custom");
    let data = fresh.0.clone();
    let files = tempfile::tempdir().expect("tempdir");
    let password = "c0rrect horse: battery $taple";
    let pw_file = files.path().join("rootpw");
    std::fs::write(&pw_file, format!("{password}\nnot part of it\n")).expect("write");
    let pw = pw_file.to_string_lossy().into_owned();
    let out_file = files.path().join("custom.qcow2");
    let out_arg = out_file.to_string_lossy().into_owned();
    let target = [
        "--release",
        "3.2",
        "--platform",
        "sl5_x86_64",
        "--layers",
        "core",
        "--package",
        "glite-wn-env",
        "--package",
        "glite-wn-env",
        "--root-password-file",
        &pw,
    ];
    let mut with_output = target.to_vec();
    with_output.extend_from_slice(&["--output", &out_arg]);
    let started = std::time::Instant::now();
    let (out, v) = build(&db.url, &data, &with_output);
    assert!(out.status.success(), "build failed: {v}");
    eprintln!("first build: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(
        outcomes(&v),
        [
            ("core".to_owned(), "built".to_owned()),
            ("custom".to_owned(), "built".to_owned())
        ],
        "{v}"
    );
    assert_eq!(v["node_type"], "", "{v}");
    assert_eq!(v["output"], out_arg.as_str(), "{v}");
    // Recorded like any image: `image ls` lists it, its custom layer names the package and
    // says a password is set, never which.
    let ls = json_of(&run(&db.url, &data, &["image", "ls", "--json"]));
    assert!(
        ls.as_array()
            .is_some_and(|l| l.iter().any(|i| i["digest"] == v["digest"])),
        "{ls:#}"
    );
    let layers = json_of(&run(&db.url, &data, &["image", "ls", "--layers", "--json"]));
    assert!(
        layers
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["kind"] == "custom")),
        "{layers:#}"
    );
    let stored: String =
        sqlx::query_scalar("SELECT inputs::text FROM image_layers WHERE kind = 'custom'")
            .fetch_one(db.store.pool())
            .await
            .expect("the custom layer's row");
    assert!(stored.contains("glite-wn-env"), "{stored}");
    // The password is in no output of the command.
    for stream in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(stream).contains(password));
    }
    // The extra package is installed; nothing of the base or a node type is.
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let installed = rpm_installed(&image);
    assert!(
        installed
            .iter()
            .any(|p| p.starts_with("glite-wn-env 3.2.3-1")),
        "glite-wn-env not installed: {installed:?}"
    );
    assert!(installed.iter().any(|p| p.starts_with("busybox ")));
    for absent in ["certo-base ", "glite-WN ", "glite-wn ", "glite-yaim-core "] {
        assert!(
            !installed.iter().any(|p| p.starts_with(absent)),
            "{absent:?} is in a core image: {installed:?}"
        );
    }
    // Root's password is a SHA-512 crypt hash of the file's first line, and only that.
    let hash = root_hash(&image);
    assert!(hash.starts_with("$6$"), "{hash}");
    assert!(openssl_verifies(&hash, password), "{hash}");
    assert!(!openssl_verifies(&hash, "not part of it"));
    assert!(!cat_in_image(&image, "/etc/shadow").contains(password));
    assert!(
        cat_in_image(&image, "/etc/passwd")
            .lines()
            .any(|l| l.starts_with("root:x:0:0:")),
        "root's passwd entry must point at the shadow file"
    );
    // Neither the password nor its hash is in the cache's records, logs or anywhere but
    // the image's own /etc/shadow.
    let custom = layer_digest(&v, "custom");
    let layer_dir = data.join("imager/layers").join(&custom);
    let record = std::fs::read_to_string(layer_dir.join("layer.json")).expect("layer.json");
    assert!(
        !record.contains(password) && !record.contains(&hash),
        "{record}"
    );
    assert!(
        files_containing(&data, password.as_bytes()).is_empty(),
        "the password is in {:?}",
        files_containing(&data, password.as_bytes())
    );
    let with_hash: Vec<PathBuf> = files_containing(&data.join("imager/layers"), hash.as_bytes());
    assert_eq!(with_hash, [layer_dir.join("tree/etc/shadow")]);
    // --output wrote a qcow2 copy.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&out_file)
        .output()
        .expect("qemu-img");
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("\"format\": \"qcow2\""),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );

    // The same request again: every layer and the image from the cache.
    let started = std::time::Instant::now();
    let (out, again) = build(&db.url, &data, &target);
    assert!(out.status.success(), "{again}");
    eprintln!("second build: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(again["cached"], true, "{again}");
    assert!(
        outcomes(&again).iter().all(|(_, o)| o == "cached"),
        "{again}"
    );
    assert_eq!(again["digest"], v["digest"]);
    // The plan shows the custom layer, cached, and says a password is set.
    let plan = json_of(&run(
        &db.url,
        &data,
        &[&["image", "plan", "--json"][..], &target[..]].concat(),
    ));
    let layers = plan["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2, "{plan}");
    assert_eq!(layers[1]["kind"], "custom");
    assert_eq!(layers[1]["cached"], true);
    assert_eq!(layers[1]["root_password"], true);
    assert_eq!(layers[1]["digest"], custom.as_str());
    assert!(!plan.to_string().contains(password));

    // An existing --output file is never overwritten.
    let (refused, _) = {
        let out = run(
            &db.url,
            &data,
            &[&["image", "build"][..], &with_output[..]].concat(),
        );
        (out, ())
    };
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("exists") && stderr.contains(&out_arg),
        "{stderr}"
    );

    // Another password: another custom layer over the same core.
    std::fs::write(&pw_file, "another one\n").expect("write");
    let (out, other) = build(&db.url, &data, &target);
    assert!(out.status.success(), "{other}");
    assert_eq!(layer_digest(&other, "core"), layer_digest(&v, "core"));
    assert_ne!(layer_digest(&other, "custom"), custom);
    assert_eq!(
        outcomes(&other),
        [
            ("core".to_owned(), "cached".to_owned()),
            ("custom".to_owned(), "built".to_owned())
        ]
    );
    let other_image = PathBuf::from(other["path"].as_str().expect("path"));
    assert!(openssl_verifies(&root_hash(&other_image), "another one"));

    // An unknown package is refused by name, and the cache is left as it was.
    let before = cache_entries(&data);
    let out = run(
        &db.url,
        &data,
        &[
            "image",
            "build",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--layers",
            "base",
            "--package",
            "glite-wn-env",
            "--package",
            "no-such-package",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown package no-such-package"),
        "{stderr}"
    );
    assert_eq!(cache_entries(&data), before);
    db.drop_db().await.expect("drop");
    drop(fresh);
}

/// An image of the core and base layers, without a node type; a root password on a
/// Debian core (which has an /etc/shadow of its own) is set in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_base_image_needs_no_node_type_and_goes_where_output_says() {
    let db = common::scratch().await;
    let data = shared_data();
    let files = tempfile::tempdir().expect("tempdir");
    let ext4 = files.path().join("base.ext4");
    let ext4_arg = ext4.to_string_lossy().into_owned();
    let (out, v) = build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--layers",
            "base",
            "--output",
            &ext4_arg,
        ],
    );
    assert!(out.status.success(), "build failed: {v}");
    let kinds: Vec<String> = outcomes(&v).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["core", "base"]);
    // The copy is the image itself, an ext4 filesystem with the base but no node type.
    let cached = PathBuf::from(v["path"].as_str().expect("path"));
    assert_eq!(
        std::fs::read(&ext4).expect("output"),
        std::fs::read(&cached).expect("image")
    );
    let installed = rpm_installed(&ext4);
    assert!(installed.iter().any(|p| p.starts_with("certo-base ")));
    assert!(
        !installed.iter().any(|p| p.starts_with("glite-")),
        "{installed:?}"
    );
    // --layers and --node-type are one or the other; without either, as before.
    let both = run(
        &db.url,
        &data,
        &[
            "image",
            "plan",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--layers",
            "core",
            "--node-type",
            "glite-WN",
        ],
    );
    assert_eq!(both.status.code(), Some(2));
    let neither = run(
        &db.url,
        &data,
        &[
            "image",
            "plan",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
        ],
    );
    assert_eq!(neither.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&neither.stderr).contains("--node-type"));
    // Extra packages are not for certification images.
    let p = patch("3456-yaim-core-wn.txt");
    let with_patch = run(
        &db.url,
        &data,
        &[
            "image",
            "plan",
            "--release",
            "3.2",
            "--platform",
            "sl5_x86_64",
            "--node-type",
            "glite-WN",
            "--patch",
            &p,
            "--package",
            "glite-wn-env",
        ],
    );
    assert_eq!(with_patch.status.code(), Some(2));

    // Debian: core + a password-only custom layer (no package manager run at all).
    let pw_file = files.path().join("pw");
    std::fs::write(&pw_file, "debian root\n").expect("write");
    let pw = pw_file.to_string_lossy().into_owned();
    let tgz = files.path().join("deb.tar.gz");
    let tgz_arg = tgz.to_string_lossy().into_owned();
    let (out, d) = build(
        &db.url,
        &data,
        &[
            "--release",
            "3.2",
            "--platform",
            "deb12_x86_64",
            "--layers",
            "core",
            "--root-password-file",
            &pw,
            "--output",
            &tgz_arg,
        ],
    );
    assert!(out.status.success(), "build failed: {d}");
    let image = PathBuf::from(d["path"].as_str().expect("path"));
    let hash = root_hash(&image);
    assert!(openssl_verifies(&hash, "debian root"), "{hash}");
    let shadow = cat_in_image(&image, "/etc/shadow");
    // The other accounts of Debian's shadow file are as they were.
    assert!(
        shadow.lines().any(|l| l.starts_with("daemon:*:")),
        "{shadow}"
    );
    assert!(
        dpkg_installed(&image)
            .iter()
            .all(|p| !p.starts_with("busybox "))
    );
    let tar = Command::new("tar")
        .arg("-tzf")
        .arg(&tgz)
        .output()
        .expect("tar");
    assert!(tar.status.success());
    assert!(String::from_utf8_lossy(&tar.stdout).contains("./etc/shadow"));
    db.drop_db().await.expect("drop");
}

/// The custom layer's digest: the package names as a set, the lower layer, the
/// repositories' state and the root password (through its hash) make it; nothing else.
#[test]
fn the_custom_layer_is_keyed_by_its_package_set_its_lower_layer_and_the_password() {
    use certo_imager::{Customization, RootPassword, Top};
    let w = world();
    let cat = certo_orchestrator::catalogue::Catalogue::builtin();
    let req =
        certo_orchestrator::images::layers_request(&cat, "3.2", "sl5_x86_64").expect("request");
    let wn = certo_orchestrator::images::request(&cat, "3.2", "sl5_x86_64", "glite-WN", None)
        .expect("request");
    let custom = |top, packages: &[&str], password: Option<&str>| Customization {
        top,
        packages: packages.iter().map(|p| (*p).to_owned()).collect(),
        root_password: password.map(|p| RootPassword::from_text(p).expect("password")),
    };
    let plan = |req: &certo_imager::ImageRequest, c: &Customization| -> Vec<String> {
        certo_imager::plan::plan_custom(req, c, &w)
            .expect("plan")
            .iter()
            .map(|l| l.digest.to_hex())
            .collect()
    };
    let node_type = digests(&wn, &w);
    // No customization: the node type's own stack, unchanged.
    assert_eq!(plan(&wn, &Customization::default()), node_type);
    // Core and base are the node type's lower layers.
    assert_eq!(plan(&req, &custom(Top::Core, &[], None)), node_type[..1]);
    assert_eq!(plan(&req, &custom(Top::Base, &[], None)), node_type[..2]);
    let a = plan(&req, &custom(Top::Core, &["glite-wn-env", "busybox"], None));
    assert_eq!(a.len(), 2);
    assert_eq!(a[0], node_type[0]);
    // Order and repeats do not matter; another name does.
    assert_eq!(
        plan(
            &req,
            &custom(Top::Core, &["busybox", "glite-wn-env", "busybox"], None)
        ),
        a
    );
    assert_ne!(
        plan(&req, &custom(Top::Core, &["glite-wn-env"], None))[1],
        a[1]
    );
    // The lower layer is part of the key.
    let on_base = plan(&req, &custom(Top::Base, &["glite-wn-env", "busybox"], None));
    assert_ne!(on_base[2], a[1]);
    let on_wn = plan(&wn, &custom(Top::NodeType, &["glite-wn-env"], None));
    assert_eq!(on_wn.len(), 4);
    assert_eq!(on_wn[..3], node_type[..]);
    // The same password gives the same layer; another password another one.
    let pw = plan(&req, &custom(Top::Core, &["busybox"], Some("pw one")));
    assert_eq!(
        pw,
        plan(&req, &custom(Top::Core, &["busybox"], Some("pw one")))
    );
    assert_ne!(
        pw[1],
        plan(&req, &custom(Top::Core, &["busybox"], Some("pw two")))[1]
    );
    assert_ne!(pw[1], plan(&req, &custom(Top::Core, &["busybox"], None))[1]);
    // The plan's inputs hold the password's hash only as a digest.
    let plans =
        certo_imager::plan::plan_custom(&req, &custom(Top::Core, &["busybox"], Some("pw one")), &w)
            .expect("plan");
    let top = plans.last().expect("custom layer");
    let hash = top.root_password.as_ref().expect("hash");
    assert!(certo_imager::password::verify("pw one", hash.as_str()));
    let inputs = format!("{:?} {:?}", top.inputs, top);
    assert!(
        !inputs.contains("pw one") && !inputs.contains(hash.as_str()),
        "{inputs}"
    );
    // An unknown package is refused by name, before anything is built.
    let err = certo_imager::plan::plan_custom(
        &req,
        &custom(Top::Core, &["busybox", "no-such-package"], None),
        &w,
    )
    .expect_err("unknown package");
    assert_eq!(err.package.as_deref(), Some("no-such-package"));
    assert_eq!(err.layer, Some(certo_imager::LayerKind::Custom));
}

/// Debian: extra packages from the release's repository and from the Debian archive in a
/// custom layer over the base; a name neither has fails the build by name, caching nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_debian_custom_layer_installs_extra_packages_and_refuses_an_unknown_one() {
    let db = common::scratch().await;
    let data = shared_data();
    let target = [
        "--release",
        "3.2",
        "--platform",
        "deb12_x86_64",
        "--layers",
        "base",
        "--package",
        "less",
        "--package",
        "glite-wn-env",
    ];
    let started = std::time::Instant::now();
    let (out, v) = build(&db.url, &data, &target);
    assert!(out.status.success(), "build failed: {v}");
    eprintln!("first build: {:.1} s", started.elapsed().as_secs_f64());
    let kinds: Vec<String> = outcomes(&v).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["core", "base", "custom"]);
    let image = PathBuf::from(v["path"].as_str().expect("path"));
    let installed = dpkg_installed(&image);
    for expected in ["glite-wn-env 3.2.3-1", "less ", "busybox "] {
        assert!(
            installed.iter().any(|p| p.starts_with(expected)),
            "{expected:?} not installed: {installed:?}"
        );
    }
    assert!(!installed.iter().any(|p| p.starts_with("glite-wn ")));
    let (out, again) = build(&db.url, &data, &target);
    assert!(out.status.success(), "{again}");
    assert_eq!(again["cached"], true, "{again}");

    let unknown = [
        "--release",
        "3.2",
        "--platform",
        "deb12_x86_64",
        "--layers",
        "base",
        "--package",
        "no-such-package",
    ];
    let plan = json_of(&run(
        &db.url,
        &data,
        &[&["image", "plan", "--json"][..], &unknown[..]].concat(),
    ));
    let digest = plan["layers"][2]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no custom layer: {plan}"))
        .to_owned();
    let (out, v) = build(&db.url, &data, &unknown);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["error"]["package"], "no-such-package", "{v}");
    assert_eq!(v["error"]["layer"], "custom", "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("no-such-package")),
        "{v}"
    );
    assert!(!data.join("imager/layers").join(&digest).exists());
    db.drop_db().await.expect("drop");
}

/// The images page's form, as a person uses it in a browser: the plan first (the image is
/// not built; which layers are cached), refusals that record nothing (an unknown package,
/// no session, a stale form), then a real build in the server that its page follows to the
/// downloads; asked again, the same configuration is ready at once.
#[tokio::test(flavor = "multi_thread")]
async fn the_images_page_plans_builds_and_follows_an_image_then_finds_it_ready() {
    use common::{csrf_of, page, sign_in};
    let db = common::scratch().await;
    let fresh = Fresh::new("form");
    let srv = common::people_server_with(&db, false, Some(fresh.0.clone()), Some(world())).await;
    let alice = certo_orchestrator::app::users::add(
        &db.store,
        "alice",
        certo_orchestrator::store::Role::Certifier,
    )
    .await
    .expect("alice");
    let cookie = sign_in(&srv.base, &alice).await;
    let builds = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM image_builds")
            .fetch_one(db.store.pool())
            .await
            .expect("count")
    };
    let ask = "release=3.2&platform=sl5_x86_64&top=core&packages=glite-wn-env+glite-wn-env&qcow2=1";
    let plan = page(
        "GET",
        &format!("{}/images?{ask}", srv.base),
        Some(&cookie),
        None,
        None,
    )
    .await;
    assert_eq!(plan.status, 200, "{}", plan.body);
    assert!(
        plan.body
            .contains("3.2 sl5_x86_64 core + glite-wn-env: image <code>")
            && plan
                .body
                .contains("is not built yet; 0 of its 2 layers are cached"),
        "{}",
        plan.body
    );
    assert!(plan.body.contains("id=\"build\""), "{}", plan.body);
    let csrf = csrf_of(&plan.body);
    let form = |packages: &'static str, csrf: String| {
        vec![
            ("csrf", csrf),
            ("release", "3.2".to_owned()),
            ("platform", "sl5_x86_64".to_owned()),
            ("top", "core".to_owned()),
            ("packages", packages.to_owned()),
            ("qcow2", "1".to_owned()),
        ]
    };
    let post = |fields: Vec<(&'static str, String)>, cookie: Option<String>| {
        let base = srv.base.clone();
        async move {
            let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            page(
                "POST",
                &format!("{base}/images/builds"),
                cookie.as_deref(),
                Some(&f),
                None,
            )
            .await
        }
    };
    // An unknown package: the plan says which, and a build of it is refused; nothing recorded.
    let bad = page(
        "GET",
        &format!(
            "{}/images?release=3.2&platform=sl5_x86_64&top=core&packages=no-such-package",
            srv.base
        ),
        Some(&cookie),
        None,
        None,
    )
    .await;
    assert!(
        bad.body.contains("id=\"plan\"") && bad.body.contains("no-such-package"),
        "{}",
        bad.body
    );
    let a = post(form("no-such-package", csrf.clone()), Some(cookie.clone())).await;
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(a.body.contains("no-such-package"), "{}", a.body);
    // No session, or a form without the session's CSRF token: refused.
    let a = post(form("glite-wn-env", csrf.clone()), None).await;
    assert_eq!(
        (a.status, a.location.as_deref()),
        (303, Some("/login")),
        "{}",
        a.body
    );
    let a = post(form("glite-wn-env", "stale".into()), Some(cookie.clone())).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(builds().await, 0, "refused asks record nothing");

    // The build, followed on its page until it ends.
    let a = post(form("glite-wn-env", csrf.clone()), Some(cookie.clone())).await;
    assert_eq!(a.status, 303, "{}", a.body);
    let at = a.location.expect("to the build's page");
    assert!(at.starts_with("/images/builds/"), "{at}");
    let started = std::time::Instant::now();
    let mut seen_running = false;
    let done = loop {
        let p = page(
            "GET",
            &format!("{}{at}", srv.base),
            Some(&cookie),
            None,
            None,
        )
        .await;
        assert_eq!(p.status, 200, "{}", p.body);
        if p.body.contains("building…") {
            assert!(p.body.contains("http-equiv=\"refresh\""), "{}", p.body);
            seen_running = true;
        } else {
            break p;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(600),
            "the build did not end in 10 minutes:\n{}",
            p.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert!(seen_running, "the page never showed the build running");
    assert!(done.body.contains("built in"), "{}", done.body);
    assert!(
        !done.body.contains("http-equiv=\"refresh\""),
        "{}",
        done.body
    );
    for event in ["building core", "building custom", "exporting qcow2"] {
        assert!(
            done.body.contains(event),
            "no {event:?} event:\n{}",
            done.body
        );
    }
    let image: String = sqlx::query_scalar(
        "SELECT image_digest FROM image_builds WHERE state = 'built' AND requested_by = 'alice'",
    )
    .fetch_one(db.store.pool())
    .await
    .expect("the build's row");
    for f in ["ext4", "qcow2"] {
        assert!(
            done.body.contains(&format!("href=\"/images/{image}/{f}\"")),
            "no {f} download:\n{}",
            done.body
        );
    }
    let qcow2 = reqwest::Client::new()
        .get(format!("{}/images/{image}/qcow2", srv.base))
        .header("cookie", format!("certo_session={cookie}"))
        .send()
        .await
        .expect("download");
    assert_eq!(qcow2.status(), 200);
    let bytes = qcow2.bytes().await.expect("body");
    assert_eq!(&bytes[..4], b"QFI\xfb", "a qcow2 file");

    // Asked again: the same configuration is there, ready at once, with nothing to build.
    let again = page(
        "GET",
        &format!("{}/images?{ask}", srv.base),
        Some(&cookie),
        None,
        None,
    )
    .await;
    assert!(
        again
            .body
            .contains("this exact configuration exists already, image <code>")
            && again.body.contains(&image),
        "{}",
        again.body
    );
    assert!(!again.body.contains("id=\"build\""), "{}", again.body);
    assert_eq!(builds().await, 1);
}
