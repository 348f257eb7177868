//! The fixture world's patch records: every valid one loads, every malformed
//! one gives exactly the errors listed in `fixtures/patches/invalid-expected.txt`.

use crate::common;

use std::collections::BTreeSet;

use certo_orchestrator::catalogue::Catalogue;
use certo_orchestrator::ingest;
use certo_orchestrator::patch::SourceFormat;

#[test]
fn valid_fixtures_cover_the_matrix_in_all_three_forms() {
    let records = common::load_valid();
    assert!(records.len() >= 12, "only {} valid records", records.len());
    let forms: BTreeSet<&str> = records.iter().map(|r| r.format.as_str()).collect();
    assert_eq!(forms, BTreeSet::from(["json", "text", "yaml"]));
    for form in [SourceFormat::Yaml, SourceFormat::Json, SourceFormat::Text] {
        let n = records.iter().filter(|r| r.format == form).count();
        assert!(n >= 3, "only {n} records in {form:?}");
    }
    let releases: BTreeSet<&str> = records.iter().map(|r| r.record.release.as_str()).collect();
    assert_eq!(releases, BTreeSet::from(["3.1", "3.2"]));
    let platforms: BTreeSet<&str> = records
        .iter()
        .flat_map(|r| r.record.platforms.iter().map(String::as_str))
        .collect();
    for p in [
        "sl4_i386",
        "sl4_x86_64",
        "sl5_i386",
        "sl5_x86_64",
        "deb12_i386",
        "deb12_x86_64",
    ] {
        assert!(platforms.contains(p), "no fixture patch for {p}");
    }
}

#[test]
fn the_sample_text_record_reads_as_the_tracker_wrote_it() {
    let records = common::load_valid();
    let r = &records
        .iter()
        .find(|r| r.record.id == 3456)
        .expect("patch 3456")
        .record;
    assert_eq!(r.revision, 2);
    assert_eq!(r.release, "3.2");
    assert_eq!(r.platforms, ["sl5_x86_64", "sl5_i386"]);
    assert_eq!(r.node_types, ["glite-WN", "glite-UI"]);
    assert_eq!(r.bugs.len(), 2);
    assert_eq!(r.bugs[0].id, 45678);
    assert_eq!(
        r.bugs[0].title.as_deref(),
        Some("yaim fails when WN_LIST is empty")
    );
    assert_eq!(r.bugs[1].id, 45679);
    assert_eq!(r.bugs[1].title, None);
    let p = &r.packages[0];
    assert_eq!(
        (
            p.name.as_str(),
            p.version.as_str(),
            p.release.as_str(),
            p.arch.as_str()
        ),
        ("glite-yaim-core", "4.0.12", "1", "noarch")
    );
    assert!(p.sha256.as_deref().is_some_and(|s| s.len() == 64));
    assert_eq!(r.packages[1].release, "2.sl5");
    assert_eq!(r.config_changes[0].file, "site-info.def");
    assert_eq!(r.config_changes[0].key, "WN_LIST");
    assert_eq!(
        r.config_changes[0].value,
        "/opt/glite/yaim/etc/wn-list.conf"
    );
    assert!(
        r.description
            .starts_with("yaim-core 4.0.12 no longer aborts")
    );
    assert!(
        r.description.contains("\n\nThe good patch"),
        "{:?}",
        r.description
    );
}

#[test]
fn every_malformed_fixture_gives_its_expected_errors() {
    let dir = common::fixtures().join("invalid");
    let expected_text = std::fs::read_to_string(common::fixtures().join("invalid-expected.txt"))
        .expect("invalid-expected.txt");
    let expected: Vec<&str> = expected_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    let files = ingest::expand(std::slice::from_ref(&dir)).expect("list invalid fixtures");
    assert!(files.len() >= 25, "only {} malformed fixtures", files.len());
    let catalogue = Catalogue::builtin();
    let mut actual = Vec::new();
    for file in &files {
        let name = file.file_name().and_then(|n| n.to_str()).expect("name");
        let bytes = std::fs::read(file).expect("read");
        let errors = certo_orchestrator::patch::load(name, &bytes, None, &catalogue)
            .expect_err(&format!("{name} was accepted"));
        assert!(!errors.is_empty());
        actual.extend(errors.iter().map(|e| e.to_string()));
    }
    assert_eq!(actual, expected);
}

#[test]
fn oversized_files_are_refused_before_parsing() {
    let catalogue = Catalogue::builtin();
    let mut big = String::from("Patch: 1\nDescription:\n");
    while big.len() <= certo_orchestrator::patch::limits::MAX_FILE_BYTES {
        big.push_str("  filler text filler text filler text filler text\n");
    }
    let errors = certo_orchestrator::patch::load("big.txt", big.as_bytes(), None, &catalogue)
        .expect_err("too big");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with("big.txt:1:1: syntax: file is ")
            && errors[0].message.contains("limited to 1048576 bytes"),
        "{}",
        errors[0]
    );
}

#[test]
fn too_many_packages_are_refused() {
    let catalogue = Catalogue::builtin();
    let mut text = String::from(
        "Patch: 9\nRevision: 1\nTitle: t\nRelease: 3.2\nPlatforms: sl5_x86_64\nNode types: glite-UI\nSubmitter: x\nRPMs:\n",
    );
    for i in 0..=certo_orchestrator::patch::limits::MAX_PACKAGES {
        text.push_str(&format!("  p{i}-1.0-1.noarch.rpm\n"));
    }
    let errors = certo_orchestrator::patch::load("many.txt", text.as_bytes(), None, &catalogue)
        .expect_err("too many");
    assert_eq!(
        errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["many.txt:8:6: packages: 1001 items; at most 1000 are allowed"]
    );
}

#[test]
fn the_same_content_has_the_same_digest_in_every_form() {
    let catalogue = Catalogue::builtin();
    let text = "Patch: 77\nRevision: 1\nTitle: Same\nRelease: gLite 3.2\nPlatforms: sl5_x86_64\nNode types: glite-UI\nBugs: 5 (five)\nRPMs:\n  a-1.0-1.noarch.rpm\nSubmitter: me\n";
    let yaml = "id: 77\nrevision: 1\ntitle: Same\nrelease: '3.2'\nplatforms: [sl5_x86_64]\nnode_types: [glite-ui]\nbugs: [{id: 5, title: five}]\npackages: [{file: a-1.0-1.noarch.rpm}]\nsubmitter: me\n";
    let json = r#"{"id": 77, "revision": 1, "title": "Same", "release": "gLite 3.2", "platforms": ["sl5_x86_64"], "node_types": ["glite-UI"], "bugs": [{"id": 5, "title": "five"}], "packages": ["a-1.0-1.noarch.rpm"], "submitter": "me"}"#;
    let digest = |name: &str, src: &str| {
        let recs =
            certo_orchestrator::patch::load(name, src.as_bytes(), None, &catalogue).expect(name);
        recs[0].digest.clone()
    };
    let d = digest("a.txt", text);
    assert_eq!(digest("a.yaml", yaml), d);
    assert_eq!(digest("a.json", json), d);
    let changed = text.replace("a-1.0-1", "a-1.0-2");
    assert_ne!(digest("b.txt", &changed), d);
}

/// The programs named in one bash array of scripts/lib.sh: `NAME=(...)` or one quoted
/// `"PROGRAM PACKAGE"` entry a line.
fn lib_sh_array(name: &str) -> Vec<String> {
    let lib = std::fs::read_to_string(workspace().join("scripts/lib.sh")).expect("scripts/lib.sh");
    let start = lib
        .find(&format!("{name}=("))
        .unwrap_or_else(|| panic!("no {name} in scripts/lib.sh"));
    let body = &lib[start + name.len() + 2..];
    let body = &body[..body.find(')').expect("closing paren")];
    if body.contains('"') {
        body.split('"')
            .skip(1)
            .step_by(2)
            .filter_map(|e| e.split_whitespace().next())
            .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
            .collect()
    } else {
        body.split_whitespace().map(str::to_owned).collect()
    }
}

fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every program started by a literal name (`Command` + `::new` + a string) in the workspace's Rust code (libraries, binaries,
/// tests), with the file that runs it.
fn programs_run_by_the_code() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut dirs = vec![workspace()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(name.as_str(), "target" | ".git" | "fuzz" | "fixtures") {
                    dirs.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let marker = ["Command", "::new(\""].concat();
            for (i, _) in text.match_indices(&marker) {
                let rest = &text[i + marker.len()..];
                let program = &rest[..rest.find('"').expect("closing quote")];
                found.push((program.to_owned(), path.display().to_string()));
            }
        }
    }
    found
}

/// The Debian package owning `program` on this machine, and whether it is Essential or
/// of priority required/important (so every Debian system has it).
fn base_package(program: &str) -> Option<(String, bool)> {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = format!("{dir}/{program}");
        if !std::path::Path::new(&path).exists() {
            continue;
        }
        let out = std::process::Command::new("dpkg")
            .args(["-S", &path])
            .output()
            .expect("dpkg -S");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some(pkg) = text
            .lines()
            .filter(|l| !l.starts_with("diversion "))
            .find_map(|l| l.split(':').next())
        else {
            continue;
        };
        let meta = std::process::Command::new("dpkg-query")
            .args(["-W", "-f", "${Essential} ${Priority}", pkg])
            .output()
            .expect("dpkg-query");
        let meta = String::from_utf8_lossy(&meta.stdout).into_owned();
        let base =
            meta.starts_with("yes ") || meta.ends_with("required") || meta.ends_with("important");
        return Some((pkg.to_owned(), base));
    }
    None
}

/// A fresh machine has only the base system and what scripts/lib.sh installs: every
/// program Certo or a test runs must be one or the other, so a hand-installed package
/// cannot hide a missing install step (arch-test and xmllint once did).
#[test]
fn every_program_certo_runs_is_installed_by_scripts_or_part_of_the_base_system() {
    let needs = lib_sh_array("CERTO_NEEDS");
    let base = lib_sh_array("CERTO_BASE");
    assert!(
        needs.iter().any(|p| p == "arch-test"),
        "mmdebstrap needs arch-test for i386"
    );
    assert!(
        needs.iter().any(|p| p == "xmllint"),
        "virt-xml-validate runs xmllint"
    );
    // Run through a path or a variable rather than a literal: named here by hand.
    let indirect = [
        "initdb", "pg_ctl", "setpriv", "tc", "nft", "rsync", "casync", "libvirtd",
    ];
    let mut missing = Vec::new();
    let run = programs_run_by_the_code().into_iter().chain(
        indirect
            .iter()
            .map(|p| (p.to_string(), "(indirect)".to_owned())),
    );
    for (program, file) in run {
        let name = program.rsplit('/').next().unwrap_or(&program).to_owned();
        // A program of the apt package, which every Debian system has (Essential).
        if program.starts_with("/usr/lib/apt/") {
            continue;
        }
        if !needs.contains(&name) && !base.contains(&name) {
            missing.push(format!("{name} (run in {file})"));
        }
    }
    assert!(
        missing.is_empty(),
        "programs neither in CERTO_NEEDS nor in CERTO_BASE (scripts/lib.sh): {missing:?}"
    );
    for program in &base {
        let (pkg, is_base) = base_package(program)
            .unwrap_or_else(|| panic!("{program} (CERTO_BASE) is not installed by any package"));
        assert!(
            is_base,
            "{program} comes from {pkg}, which is not Essential, required or important: \
             move it to CERTO_NEEDS"
        );
    }
}
