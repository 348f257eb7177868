//! Records written with the tracker's labels and spellings read exactly like the same
//! records written with Certo's keys: the same canonical record, the same content digest.

use super::{LoadedRecord, SourceFormat, labels, load};
use crate::catalogue::Catalogue;

fn one(text: &str, format: SourceFormat) -> LoadedRecord {
    let mut v =
        load("t", text.as_bytes(), Some(format), &Catalogue::builtin()).unwrap_or_else(|e| {
            panic!(
                "refused:\n{}\n{text}",
                e.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    assert_eq!(v.len(), 1);
    v.remove(0)
}

fn errors(text: &str, format: SourceFormat) -> Vec<String> {
    load("t", text.as_bytes(), Some(format), &Catalogue::builtin())
        .err()
        .unwrap_or_else(|| panic!("accepted:\n{text}"))
        .iter()
        .map(|d| d.to_string())
        .collect()
}

/// A YAML record of `fields` (key, value lines), in order.
fn yaml(fields: &[(&str, &str)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

const BASE: &[(&str, &str)] = &[
    ("id", "3600"),
    ("revision", "1"),
    ("title", "glite-wn-info 1.2.3-2 for the 3.2 WN"),
    ("status", "Ready for Certification"),
    ("release", "\"3.2\""),
    ("platforms", "[sl5_x86_64]"),
    ("node_types", "[glite-WN]"),
    ("bugs", "[45678]"),
    ("packages", "[glite-wn-info-1.2.3-2.sl5.x86_64.rpm]"),
    ("submitter", "jdoe"),
    ("description", "the same patch, written two ways"),
];

fn with(key: &str, new_key: &str, new_value: Option<&str>) -> String {
    let fields: Vec<(&str, &str)> = BASE
        .iter()
        .map(|(k, v)| {
            if *k == key {
                (new_key, new_value.unwrap_or(v))
            } else {
                (*k, *v)
            }
        })
        .collect();
    yaml(&fields)
}

#[test]
fn every_label_of_every_field_reads_as_that_field() {
    let base = one(&yaml(BASE), SourceFormat::Yaml);
    for (label, field) in labels::LABELS {
        let Some((key, _)) = BASE.iter().find(|(k, _)| k == field) else {
            continue;
        };
        // As the tracker writes it (capitalised, spaces) and in other cases and separators.
        for spelled in [
            crate::patch::text::spell_label(label),
            label.to_uppercase(),
            label.replace(' ', "_"),
        ] {
            let r = one(&with(key, &spelled, None), SourceFormat::Yaml);
            assert_eq!(r.digest, base.digest, "{spelled} for {field}");
        }
    }
}

#[test]
fn a_tracker_text_export_reads_like_certos_own_text_form() {
    let certo = "Patch: 3601\nRevision: 1\nTitle: t\nStatus: In Certification\nRelease: gLite 3.2\n\
        Platforms: sl5_x86_64\nNode types: glite-CE\nBugs: 50001 (purger race)\n\
        RPMs:\n  glite-ce-cream-1.12.0-3.sl5.x86_64.rpm\n  glite-ce-common-1.12.0-1.noarch.rpm\nSubmitter: asmith\n";
    let tracker = "Patch: 3601\nRevision: 1\nSummary: t\nStatus: in certification\nRelease: 3.2.0\n\
        Platform: SL5/64bit\nAffected metapackages: glite-CREAM\nAssociated bugs: 50001 (purger race)\n\
        RPM names: glite-ce-cream-1.12.0-3.sl5.x86_64.rpm glite-ce-common-1.12.0-1.noarch.rpm\nSubmitted by: asmith\n";
    let a = one(certo, SourceFormat::Text);
    let b = one(tracker, SourceFormat::Text);
    assert_eq!(a.record, b.record);
    assert_eq!(a.digest, b.digest);
    assert_eq!(b.record.status, "In certification");
    assert_eq!(b.record.node_types, ["glite-CE"]);
}

#[test]
fn every_platform_spelling_names_the_catalogue_label() {
    for (spelled, label) in [
        ("SL4/32bit", "sl4_i386"),
        ("SL4/64bit", "sl4_x86_64"),
        ("SL5/64bit", "sl5_x86_64"),
        ("SL5 x86_64", "sl5_x86_64"),
        ("sl5 x86_64", "sl5_x86_64"),
        ("slc4_ia32_gcc346", "sl4_i386"),
        ("sl5_x86_64_gcc412", "sl5_x86_64"),
        ("sl5_x86_64", "sl5_x86_64"),
    ] {
        let arch = if label.ends_with("i386") {
            "i386"
        } else {
            "x86_64"
        };
        let os = &label[..3];
        let pkg = format!("[glite-wn-info-1.2.3-2.{os}.{arch}.rpm]");
        let canonical = with("platforms", "platforms", Some(&format!("[{label}]")));
        let canonical = canonical.replace("[glite-wn-info-1.2.3-2.sl5.x86_64.rpm]", &pkg);
        let tracker = with("platforms", "Platform", Some(&format!("[\"{spelled}\"]")))
            .replace("[glite-wn-info-1.2.3-2.sl5.x86_64.rpm]", &pkg);
        let a = one(&canonical, SourceFormat::Yaml);
        let b = one(&tracker, SourceFormat::Yaml);
        assert_eq!(b.record.platforms, [label], "{spelled}");
        assert_eq!(a.digest, b.digest, "{spelled}");
    }
}

#[test]
fn release_spellings_and_updates() {
    let digest = |release: &str| {
        one(
            &with("release", "release", Some(release)),
            SourceFormat::Yaml,
        )
    };
    let plain = digest("\"3.2\"");
    for same in ["gLite 3.2", "\"3.2.0\"", "glite 3.2", "\"3.2\""] {
        assert_eq!(digest(same).digest, plain.digest, "{same}");
    }
    // An update is part of the record: kept, shown, and in the digest.
    let u = digest("gLite 3.2 Security Update 01");
    assert_ne!(u.digest, plain.digest);
    assert_eq!(u.record.release, "3.2");
    assert_eq!(u.record.release_shown(), "3.2 Security Update 01");
    let u71 = one(
        &with("release", "release", Some("3.1.0 Update 71")),
        SourceFormat::Yaml,
    );
    assert_eq!(u71.record.release_shown(), "3.1 Update 71");
    // The same spelled differently: same digest.
    assert_eq!(
        u71.digest,
        one(
            &with("release", "Release", Some("gLite 3.1 update 71")),
            SourceFormat::Yaml
        )
        .digest
    );
}

#[test]
fn statuses_in_any_case_and_the_lifecycle() {
    let base = one(&yaml(BASE), SourceFormat::Yaml);
    for spelled in [
        "ready for certification",
        "READY FOR CERTIFICATION",
        "Ready  for Certification",
    ] {
        assert_eq!(
            one(&with("status", "status", Some(spelled)), SourceFormat::Yaml).digest,
            base.digest
        );
    }
    for (status, wants) in [
        ("In configuration", false),
        ("Ready for Integration", false),
        ("Ready for Certification", true),
        ("In certification", true),
        ("Certified", false),
        ("Verified", false),
        ("Ready for Rollout", false),
        ("Rolling out", false),
        ("Ready for Production", false),
        ("Rejected", false),
        ("Obsolete", false),
    ] {
        let r = one(&with("status", "status", Some(status)), SourceFormat::Yaml);
        assert_eq!(r.wants_certification(), wants, "{status}");
        assert_eq!(r.note().is_some(), !wants, "{status}");
    }
}

#[test]
fn node_type_aliases_and_known_unbuilt_node_types() {
    let base = one(&yaml(BASE), SourceFormat::Yaml);
    let bdii = |nt: &str| {
        with(
            "node_types",
            "Affected metapackages",
            Some(&format!("[{nt}]")),
        )
    };
    let site = one(&bdii("glite-BDII_site"), SourceFormat::Yaml);
    let top = one(&bdii("glite-BDII_top"), SourceFormat::Yaml);
    assert_eq!(site.record.node_types, ["glite-BDII"]);
    assert_eq!(site.digest, top.digest);
    assert_ne!(site.digest, base.digest);
    let e = errors(&bdii("glite-LFC_mysql"), SourceFormat::Yaml);
    assert!(
        e.iter()
            .any(|m| m.contains("known gLite node type, not built by this catalogue's recipes")),
        "{e:?}"
    );
    let e = errors(&bdii("glite-SE_dcache_pool"), SourceFormat::Yaml);
    assert!(
        e.iter().any(|m| m.contains("known gLite node type")),
        "{e:?}"
    );
    let e = errors(&bdii("glite-NOPE"), SourceFormat::Yaml);
    assert!(e.iter().any(|m| m.contains("unknown node type")), "{e:?}");
}

#[test]
fn a_near_miss_key_names_the_field_and_does_not_also_report_it_missing() {
    let text = with("platforms", "platfroms", None);
    let e = errors(&text, SourceFormat::Yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("did you mean `platforms`?"), "{e:?}");
    let text = "Patch: 1\nRevision: 1\nSumary: t\nRelease: 3.2\nPlatforms: sl5_x86_64\nNode types: glite-WN\n\
        RPMs:\n  glite-wn-info-1.2.3-2.sl5.x86_64.rpm\nSubmitter: j\n";
    let e = errors(text, SourceFormat::Text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("did you mean `Summary`?"), "{e:?}");
    // Its value is still checked in the same round.
    let text = with("platforms", "Platfroms", Some("[sl9_x86_64]"));
    let e = errors(&text, SourceFormat::Yaml);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[1].contains("unknown platform `sl9_x86_64`"), "{e:?}");
}

#[test]
fn node_types_are_checked_even_when_the_release_is_wrong() {
    let text = with("release", "release", Some("\"3.9\"")).replace("[glite-WN]", "[glite-WM]");
    let e = errors(&text, SourceFormat::Yaml);
    assert!(
        e.iter().any(|m| m.contains("unknown release `3.9`")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("unknown node type `glite-WM` in every release (did you mean")),
        "{e:?}"
    );
}

#[test]
fn externals_and_warnings() {
    let text = "Patch: 3602\nRevision: 1\nSummary: vdt\nRelease: 3.1.0\nPlatform: SL4/32bit, SL4/64bit\n\
        Affected node types: glite-WN\n\
        RPM names:\n  vdt_globus_essentials-VDT1.6.1x86_rhas_4-7.i386.rpm\n  glite-wn-info-1.2.3-2.slc4.x86_64.rpm\n\
        Externals:\n  vdt_globus_essentials-VDT1.6.1x86_rhas_4-7.i386.rpm\n  vdt_globus_sdk-VDT1.6.1x86_rhas_4-7.i386.rpm\n\
        Submitted by: jdoe\n";
    let r = one(text, SourceFormat::Text);
    let p = &r.record.packages;
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p[0].external && !p[1].external && p[2].external, "{p:?}");
    assert_eq!(p[0].version, "VDT1.6.1x86_rhas_4");
    let w: Vec<String> = r.warnings.iter().map(|d| d.to_string()).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("spans 2 architectures (i386, x86_64)"),
        "{w:?}"
    );
    assert!(w[1].contains("vdt_globus_sdk-VDT1.6.1x86_rhas_4-7.i386.rpm is listed under Externals but not under RPM names"), "{w:?}");
}

#[test]
fn package_file_names_as_rpm_defines_them() {
    use super::convert::parse_package_file;
    let p = parse_package_file("vdt_globus_essentials-VDT1.6.1x86_rhas_4-7.i386.rpm").expect("vdt");
    assert_eq!(
        (p.name.as_str(), p.version.as_str(), p.release.as_str()),
        ("vdt_globus_essentials", "VDT1.6.1x86_rhas_4", "7")
    );
    let e = parse_package_file("gridsite-shared-1.1.18.1.i386.rpm").expect_err("no release");
    assert!(e.contains("found no release"), "{e}");
    let e = parse_package_file("glite-ui-clients-3.2.8-1.noarch").expect_err("no .rpm");
    assert!(e.contains("without `.rpm`"), "{e}");
    let e = parse_package_file("bdii_5.2.5-1_all").expect_err("no .deb");
    assert!(e.contains("no `.deb`"), "{e}");
}

#[test]
fn tracker_only_fields_are_kept_and_absent_ones_keep_the_digest() {
    let mut fields = BASE.to_vec();
    fields.extend([
        ("Assigned to", "bkoblitz"),
        ("Priority", "9 - Immediate"),
        ("Release Path", "Internal"),
        ("Release notes", "notes"),
        ("Installation & configuration", "run yaim"),
        ("Certification report", "all green"),
    ]);
    let r = one(&yaml(&fields), SourceFormat::Yaml);
    assert_eq!(r.record.priority.as_deref(), Some("9 - Immediate"));
    assert_eq!(r.record.release_path, Some(super::ReleasePath::Internal));
    assert_eq!(r.record.installation, "run yaim");
    assert_ne!(r.digest, one(&yaml(BASE), SourceFormat::Yaml).digest);
    // A record that uses none of them has the digest it had before they existed: the
    // canonical JSON has exactly the old fields.
    let json = serde_json::to_value(&one(&yaml(BASE), SourceFormat::Yaml).record).expect("json");
    let mut keys: Vec<&str> = json
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut old = [
        "id",
        "revision",
        "title",
        "status",
        "release",
        "platforms",
        "node_types",
        "bugs",
        "packages",
        "config_changes",
        "submitter",
        "description",
    ];
    old.sort_unstable();
    assert_eq!(keys, old);
}

#[test]
fn platforms_and_node_types_are_independent_lists_and_targets_are_what_the_catalogue_offers() {
    // WMS 3.2 is built on x86_64 only: a record for both SL5 architectures with the CE and
    // the WMS is an ordinary tracker record; WMS is certified on x86_64 alone.
    let text = "id: 3640\nrevision: 1\ntitle: CE and WMS\nrelease: \"3.2\"\n\
        platforms: [sl5_i386, sl5_x86_64]\nnode_types: [glite-CE, glite-WMS]\n\
        packages: [glite-ce-common-1.12.0-1.noarch.rpm]\nsubmitter: j\n";
    let r = one(text, SourceFormat::Yaml);
    let targets: Vec<(String, String)> =
        crate::images::patch_targets(&Catalogue::builtin(), &r.record);
    let targets: Vec<(&str, &str)> = targets
        .iter()
        .map(|(p, n)| (p.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        targets,
        [
            ("sl5_i386", "glite-CE"),
            ("sl5_x86_64", "glite-CE"),
            ("sl5_x86_64", "glite-WMS")
        ]
    );
    // A node type offered on none of the platforms, and a platform offering none of the
    // node types, are refused.
    let text = "id: 3641\nrevision: 1\ntitle: WMS on i386\nrelease: \"3.2\"\n\
        platforms: [sl5_i386, deb12_i386]\nnode_types: [glite-WMS]\n\
        packages: [glite-ui-clients-3.2.8-1.noarch.rpm, glite-ui-clients_3.2.8-1_all.deb]\nsubmitter: j\n";
    let e = errors(text, SourceFormat::Yaml);
    assert!(
        e.iter().any(|m| m.contains(
            "node type glite-WMS of gLite 3.2 is available on none of sl5_i386, deb12_i386 (it is built for sl5_x86_64, deb12_x86_64)"
        )),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("platform sl5_i386 offers none of the record's node types")),
        "{e:?}"
    );
}

#[test]
fn a_key_set_twice_through_two_spellings_of_one_file_is_refused() {
    let text = "Patch: 3650\nRevision: 1\nTitle: t\nRelease: 3.2\nPlatforms: sl5_x86_64\nNode types: glite-WN\n\
        Configuration changes:\n  site-info.def: WN_LIST=/a\n  /opt/glite/yaim/etc/site-info.def: WN_LIST=/b\nSubmitter: j\n";
    let e = errors(text, SourceFormat::Text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("WN_LIST in /opt/glite/yaim/etc/site-info.def is changed twice (first at 8:3 (as site-info.def: the same file))"),
        "{e:?}"
    );
}

/// The downgrade opt-in reads alike in YAML, JSON and the text form, is part of the
/// record's content (its digest), and a value that is neither yes nor no is refused where
/// it is written.
#[test]
fn the_downgrade_opt_in_is_read_in_every_form() {
    let base = one(&yaml(BASE), SourceFormat::Yaml);
    assert!(!base.record.allow_downgrade);
    let mut fields = BASE.to_vec();
    fields.push(("allow_downgrade", "true"));
    let y = one(&yaml(&fields), SourceFormat::Yaml);
    assert!(y.record.allow_downgrade);
    assert_ne!(y.digest, base.digest);

    let json = serde_json::json!({
        "id": 3600, "revision": 1, "title": "glite-wn-info 1.2.3-2 for the 3.2 WN",
        "status": "Ready for Certification", "release": "3.2", "platforms": ["sl5_x86_64"],
        "node_types": ["glite-WN"], "bugs": [45678],
        "packages": ["glite-wn-info-1.2.3-2.sl5.x86_64.rpm"], "submitter": "jdoe",
        "description": "the same patch, written two ways", "allow_downgrade": true,
    });
    let j = one(&json.to_string(), SourceFormat::Json);
    assert_eq!(j.digest, y.digest);

    let text = "Patch: 3600\nRevision: 1\nTitle: glite-wn-info 1.2.3-2 for the 3.2 WN\n\
                Status: Ready for Certification\nRelease: 3.2\nPlatforms: sl5_x86_64\n\
                Node types: glite-WN\nBugs: 45678\nRPMs:\n  glite-wn-info-1.2.3-2.sl5.x86_64.rpm\n\
                Submitter: jdoe\nDowngrade: allowed\nDescription:\n  the same patch, written two ways\n";
    let t = one(text, SourceFormat::Text);
    assert_eq!(t.digest, y.digest);
    // Saying no is the default, and keeps the digest.
    let no = one(
        &text.replace("Downgrade: allowed", "Downgrade: refused"),
        SourceFormat::Text,
    );
    assert!(!no.record.allow_downgrade);
    assert_eq!(no.digest, base.digest);

    let bad = errors(
        &text.replace("Downgrade: allowed", "Downgrade: maybe"),
        SourceFormat::Text,
    );
    assert_eq!(
        bad,
        [
            "t:12:12: allow_downgrade: expected `allowed` (or `true`) to let the patch downgrade an installed package, or `refused` (or `false`), found `maybe`"
        ]
    );
}
