//! The tracker's text form, written: [`tracker_text`] prints a validated [`PatchRecord`] as
//! the plain-text export that [`super::text`] reads, and [`with_status`] prints it with a
//! new status and Certo's verdict added to the certification report, ready to paste back
//! into the tracker.
//!
//! Reading the text back with [`super::load`] gives the same record, except for the few
//! values the text form has no way to write (listed on [`tracker_text`]).

use super::{Bug, PackageFormat, PackageSource, PatchRecord, ReleasePath, labels, limits};

/// The indentation of an item or a line of free text under its key.
const INDENT: &str = "  ";

/// The record in the tracker's text form, one `Key: value` field a line, lists and free
/// text as indented lines under their key:
///
/// ```text
/// Patch: 3456
/// Revision: 2
/// Title: glite-yaim-core 4.0.12 for the gLite 3.2 WN
/// Status: Ready for Certification
/// Release: gLite 3.2
/// Platforms: sl5_x86_64, sl5_i386
/// Node types: glite-WN, glite-UI
/// Bugs: 45678 (yaim fails when WN_LIST is empty), 45679
/// RPMs:
///   glite-yaim-core-4.0.12-1.noarch.rpm sha256:abd5…
///   glite-wn-info-1.2.3-2.sl5.x86_64.rpm repo:patches/3456
/// Configuration changes:
///   site-info.def: WN_LIST=/opt/glite/yaim/etc/wn-list.conf
/// Submitter: jdoe
/// Description:
///   yaim-core 4.0.12 no longer aborts the WN configuration when WN_LIST is
///   empty.
/// ```
///
/// Fields that are empty or at their default (no bugs, no release notes, downgrades
/// refused, …) are left out, as the reader takes an absent field for that default.
/// External packages are listed under `RPMs:` (in the record's order, with their tags)
/// and again, by file name, under `Externals:`, which marks them external in place.
///
/// What the text form cannot express, and what is written instead (the text is always
/// one that [`super::load`] reads):
///
/// - A bug's `regression_test`: the text form has no syntax for it (`ID (title)` only).
///   It is left out, so the record read back has `regression_test: None`.
/// - A comma in a bug title after more `)` than `(` (as in `a) x, b) y`): the reader
///   would split the bug there. Such a comma is written `%2C`. A title whose parentheses
///   do not balance otherwise reads back exactly, its bug on a line of its own.
/// - White space in a `repo:` path (the reader splits a package line on white space):
///   each white-space character is written percent-encoded (`%20`).
/// - A `:` in a configuration file name (the reader splits `FILE: KEY=VALUE` at the first
///   `:`): written `%3A`.
/// - Free text (description, release notes, installation, certification report): the
///   reader dedents a block by the indentation common to its non-empty lines and rebuilds
///   each line's leading white space from spaces. So indentation shared by every
///   non-empty line is lost, and a tab in a line's leading white space reads back as one
///   space (tabs elsewhere in a line are kept).
/// - A release update number above 9999 (none read from a file has one): the reader
///   refuses it, so the release is written without its update.
/// - A record near the 1 MiB file limit may be larger than that in text form (every
///   line of free text is indented by two spaces), and is then refused by the reader.
///
/// A hand-built record may hold what validation refuses; its control characters (line
/// breaks in a one-line value, for instance) are written as spaces so that a value never
/// spills into another field.
pub fn tracker_text(record: &PatchRecord) -> String {
    let r = record;
    let mut out = String::new();
    single(&mut out, "Patch", &r.id.to_string());
    single(&mut out, "Revision", &r.revision.to_string());
    single(&mut out, "Title", &r.title);
    single(&mut out, "Status", &r.status);
    let release = match &r.release_update {
        Some(u) if u.number <= 9999 => format!("gLite {} {u}", r.release),
        _ => format!("gLite {}", r.release),
    };
    single(&mut out, "Release", &release);
    single(&mut out, "Platforms", &r.platforms.join(", "));
    single(&mut out, "Node types", &r.node_types.join(", "));
    write_bugs(&mut out, &r.bugs);

    if !r.packages.is_empty() {
        let rpm = r.packages.iter().any(|p| p.format == PackageFormat::Rpm);
        let deb = r.packages.iter().any(|p| p.format == PackageFormat::Deb);
        let key = match (rpm, deb) {
            (true, false) => "RPMs",
            (false, true) => "DEBs",
            _ => "Packages",
        };
        let lines = r.packages.iter().map(|p| {
            let mut line = token(&p.file);
            if let Some(sha) = &p.sha256 {
                line.push_str(" sha256:");
                line.push_str(&token(sha));
            }
            match &p.source {
                PackageSource::Release => {}
                PackageSource::Repository(path) => {
                    line.push_str(" repo:");
                    line.push_str(&token(path));
                }
                PackageSource::Url(url) => {
                    line.push_str(" url:");
                    line.push_str(&token(url));
                }
            }
            line
        });
        items(&mut out, key, lines);
    }
    if r.packages.iter().any(|p| p.external) {
        let files = r
            .packages
            .iter()
            .filter(|p| p.external)
            .map(|p| token(&p.file));
        items(&mut out, "Externals", files);
    }
    if !r.metapackage_changes.is_empty() {
        let lines = r
            .metapackage_changes
            .iter()
            .map(|m| format!("{}: {}", escape(&m.node_type, &[':']), token(&m.file)));
        items(&mut out, "Metapackage changes", lines);
    }
    if !r.config_changes.is_empty() {
        let lines = r.config_changes.iter().map(|c| {
            format!(
                "{}: {}={}",
                escape(&c.file, &[':']),
                escape(&c.key, &[':', '=']),
                one_line(&c.value)
            )
        });
        items(&mut out, "Configuration changes", lines);
    }

    single(&mut out, "Submitter", &r.submitter);
    if let Some(a) = &r.assigned_to {
        single(&mut out, "Assigned to", a);
    }
    if let Some(p) = &r.priority {
        single(&mut out, "Priority", p);
    }
    if let Some(p) = r.release_path {
        let p = match p {
            ReleasePath::Standard => "Standard",
            ReleasePath::Internal => "Internal",
        };
        single(&mut out, "Release Path", p);
    }
    if r.allow_downgrade {
        single(&mut out, "Downgrade", "allowed");
    }
    block(&mut out, "Description", &r.description);
    block(&mut out, "Release notes", &r.release_notes);
    block(&mut out, "Installation & configuration", &r.installation);
    block(&mut out, "Certification report", &r.certification_report);
    out
}

/// The record in the tracker's text form (as [`tracker_text`]) with its `Status:` set to
/// `status` (e.g. `Certified` or `Rejected`) and, when `reason` is given, a line
/// `Certo: REASON` appended to the certification report (after what the report already
/// says), ready to paste back into the tracker.
///
/// The result is always text that [`super::load`] reads:
///
/// - `status` is written in the tracker's spelling (`rejected` as `Rejected`); a status the
///   tracker does not know is read as the nearest known one when it is a slip of the
///   keyboard (`Certfied`), and otherwise the record's own status is kept.
/// - The reason may have several lines; its control characters other than line breaks
///   and tabs are written as spaces, and white space at the end of its lines is dropped
///   (as the reader does). A reason that already starts with `Certo:` is not prefixed
///   again.
/// - When the report and the reason together would be longer than a free-text field may
///   be, the reason is cut short, ending in `…`.
pub fn with_status(record: &PatchRecord, status: &str, reason: Option<&str>) -> String {
    let mut r = record.clone();
    r.status = status_spelling(status).unwrap_or_else(|| record.status.clone());
    if let Some(reason) = reason {
        let reason = reason.trim();
        let note = if reason.starts_with("Certo:") {
            reason.to_string()
        } else {
            format!("Certo: {reason}")
        };
        let report = canonical_text(&r.certification_report);
        let used = report.chars().count() + usize::from(!report.is_empty());
        let budget = limits::MAX_DESCRIPTION_CHARS.saturating_sub(used);
        let mut note = canonical_text(&note);
        if note.chars().count() > budget {
            let cut: String = note.chars().take(budget.saturating_sub(1)).collect();
            note = canonical_text(&cut);
            if !note.is_empty() {
                note.push('…');
            }
        }
        r.certification_report = match (report.is_empty(), note.is_empty()) {
            (_, true) => report,
            (true, false) => note,
            (false, false) => format!("{report}\n{note}"),
        };
    }
    tracker_text(&r)
}

/// A status in the tracker's spelling: the status itself, or the one it is a slip for.
fn status_spelling(status: &str) -> Option<String> {
    if let Some((known, _)) = labels::status(status) {
        return Some(known.to_string());
    }
    let names = labels::STATUSES.iter().map(|(k, _)| *k);
    labels::nearest(status.trim(), names).map(str::to_string)
}

/// `Key: value` on one line.
fn single(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str(": ");
    out.push_str(&one_line(value));
    out.push('\n');
}

/// `Key:` and one indented line for each item.
fn items(out: &mut String, key: &str, lines: impl Iterator<Item = String>) {
    out.push_str(key);
    out.push_str(":\n");
    for line in lines {
        out.push_str(INDENT);
        out.push_str(&line);
        out.push('\n');
    }
}

/// `Key:` and the text's lines, indented (blank lines left empty); nothing for no text.
fn block(out: &mut String, key: &str, text: &str) {
    let text = canonical_text(text);
    if text.is_empty() {
        return;
    }
    out.push_str(key);
    out.push_str(":\n");
    for line in text.split('\n') {
        if !line.is_empty() {
            out.push_str(INDENT);
            out.push_str(line);
        }
        out.push('\n');
    }
}

/// The bugs: `Bugs: ID (title), ID` on the key's line when every title's parentheses
/// balance (a comma inside them is then part of the title); else one bug per indented
/// line, where a line of its own keeps an unbalanced title from swallowing the next bug.
fn write_bugs(out: &mut String, bugs: &[Bug]) {
    if bugs.is_empty() {
        return;
    }
    let balanced = |t: &str| {
        let mut depth = 0i64;
        for c in t.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth < 0 {
                return false;
            }
        }
        depth == 0
    };
    let item = |b: &Bug| match &b.title {
        Some(t) => format!("{} ({})", b.id, bug_title(t)),
        None => b.id.to_string(),
    };
    if bugs.iter().all(|b| b.title.as_deref().is_none_or(balanced)) {
        let line: Vec<String> = bugs.iter().map(item).collect();
        single(out, "Bugs", &line.join(", "));
    } else {
        items(out, "Bugs", bugs.iter().map(item));
    }
}

/// A bug title as written inside `ID (…)`: a comma where the reader would split the
/// list (outside every parenthesis, counting the one that opens the title) as `%2C`.
fn bug_title(title: &str) -> String {
    let mut out = String::new();
    // The reader's depth: 1 inside the `(` that opens the title.
    let mut depth = 1i64;
    for c in one_line(title).chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth <= 0 => {
                out.push_str("%2C");
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// A one-line value: control characters as spaces, no white space around it.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A one-line value with the characters in `special` percent-encoded.
fn escape(value: &str, special: &[char]) -> String {
    let mut out = String::new();
    for c in one_line(value).chars() {
        if special.contains(&c) {
            percent(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}

/// One word of a package line: white space in it percent-encoded.
fn token(value: &str) -> String {
    let mut out = String::new();
    for c in one_line(value).chars() {
        if c.is_whitespace() {
            percent(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}

/// `c` as `%XX` for each of its UTF-8 bytes.
fn percent(c: char, out: &mut String) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        out.push_str(&format!("%{b:02X}"));
    }
}

/// Free text as the reader gives it back: control characters other than tabs as spaces,
/// no white space at the end of a line, no blank lines before or after.
fn canonical_text(text: &str) -> String {
    let lines: Vec<String> = text
        .split('\n')
        .map(|line| {
            line.chars()
                .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
                .collect::<String>()
                .trim_end()
                .to_string()
        })
        .collect();
    lines.join("\n").trim_matches('\n').to_string()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::catalogue::Catalogue;
    use crate::patch::convert::parse_package_file;
    use crate::patch::{
        ConfigChange, MetapackageChange, ReleaseUpdate, SourceFormat, labels::Stage, load,
    };

    fn catalogue() -> Catalogue {
        Catalogue::builtin()
    }

    /// Every record of `text`, read as the tracker's text form; panics with every error.
    fn read_text(text: &str) -> Vec<PatchRecord> {
        match load(
            "written.txt",
            text.as_bytes(),
            Some(SourceFormat::Text),
            &catalogue(),
        ) {
            Ok(v) => v.into_iter().map(|l| l.record).collect(),
            Err(e) => panic!(
                "the written text is refused:\n{}\n--- text:\n{text}",
                e.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }

    fn read_one(text: &str) -> PatchRecord {
        let mut v = read_text(text);
        assert_eq!(v.len(), 1, "one record expected in:\n{text}");
        v.remove(0)
    }

    /// The record as the text form can carry it: without regression tests.
    fn expressible(r: &PatchRecord) -> PatchRecord {
        let mut r = r.clone();
        for b in &mut r.bugs {
            b.regression_test = None;
        }
        r
    }

    fn fixtures() -> PathBuf {
        crate::world::fixtures_dir().join("patches/valid")
    }

    /// Every record of every valid fixture, with its file name.
    fn fixture_records() -> Vec<(String, PatchRecord)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
            .expect("the fixtures directory")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut out = Vec::new();
        let mut extensions = std::collections::BTreeMap::new();
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a UTF-8 file name")
                .to_string();
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_string();
            let bytes = std::fs::read(&path).expect("a readable fixture");
            let records = load(&name, &bytes, None, &catalogue())
                .unwrap_or_else(|e| panic!("fixture {name} is refused: {e:?}"));
            *extensions.entry(ext).or_insert(0usize) += records.len();
            out.extend(records.into_iter().map(|l| (name.clone(), l.record)));
        }
        // All three forms are there, so the test covers each.
        for ext in ["txt", "yaml", "json"] {
            assert!(
                extensions.get(ext).is_some_and(|n| *n > 0),
                "no .{ext} fixture records: {extensions:?}"
            );
        }
        out
    }

    #[test]
    fn every_valid_fixture_record_round_trips() {
        let records = fixture_records();
        assert!(records.len() >= 20, "only {} records", records.len());
        let mut exact = 0;
        for (file, r) in &records {
            let text = tracker_text(r);
            let back = read_one(&text);
            // The only thing the text form cannot carry is a bug's regression test.
            assert_eq!(back, expressible(r), "{file}: patch {}\n{text}", r.id);
            assert_eq!(
                back.content_digest(),
                expressible(r).content_digest(),
                "{file}"
            );
            if back == *r {
                exact += 1;
            } else {
                assert!(r.bugs.iter().any(|b| b.regression_test.is_some()), "{file}");
            }
            // Written again, the text is the same: writing is a fixed point.
            assert_eq!(tracker_text(&back), text, "{file}");
        }
        // Most fixtures have no regression tests, and those round-trip exactly.
        assert!(exact >= records.len() - 3, "{exact} of {}", records.len());
        eprintln!("round-tripped {} records ({exact} exactly)", records.len());
    }

    #[test]
    fn the_text_fixtures_are_written_as_they_are_read() {
        // A text fixture and the text written from its record give the same record; the
        // text fixture in Certo's own keys is written back line for line.
        let path = fixtures().join("3456-yaim-core-wn.txt");
        let src = std::fs::read_to_string(&path).expect("the fixture");
        let r = read_one(&src);
        assert_eq!(tracker_text(&r), src);
    }

    #[test]
    fn all_records_of_a_file_written_one_after_another_read_back() {
        let records: Vec<PatchRecord> = fixture_records().into_iter().map(|(_, r)| r).collect();
        // Two revisions of 3213 are in the fixtures; one file holds each revision once.
        let text: Vec<String> = records.iter().map(tracker_text).collect();
        let back = read_text(&text.join("---\n"));
        let expected: Vec<PatchRecord> = records.iter().map(expressible).collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn with_status_sets_the_status_and_appends_the_reason() {
        let reason = "rejected at install on 3.1/sl4_x86_64/glite-UI: the %post script of glite-ui-postinst-broken exited with status 1";
        for (file, r) in fixture_records() {
            let text = with_status(&r, "Rejected", Some(reason));
            let back = read_one(&text);
            assert_eq!(back.status, "Rejected", "{file}");
            assert_eq!(back.stage(), Stage::Closed, "{file}");
            assert!(
                back.certification_report.contains(reason),
                "{file}: {}",
                back.certification_report
            );
            let note = format!("Certo: {reason}");
            let mut expected = expressible(&r);
            expected.status = "Rejected".to_string();
            expected.certification_report = if r.certification_report.is_empty() {
                note
            } else {
                format!("{}\n{note}", r.certification_report)
            };
            assert_eq!(back, expected, "{file}\n{text}");

            // Without a reason only the status changes.
            let back = read_one(&with_status(&r, "Certified", None));
            let mut expected = expressible(&r);
            expected.status = "Certified".to_string();
            assert_eq!(back, expected, "{file}");
        }
    }

    #[test]
    fn with_status_keeps_the_text_valid_for_odd_statuses_and_reasons() {
        let (_, r) = fixture_records()
            .into_iter()
            .find(|(_, r)| r.id == 3523)
            .expect("fixture 3523");
        assert!(!r.certification_report.is_empty());
        // Any spelling of a status; a slip; something else entirely.
        assert_eq!(
            read_one(&with_status(&r, "rejected", None)).status,
            "Rejected"
        );
        assert_eq!(
            read_one(&with_status(&r, "ready for production", None)).status,
            "Ready for Production"
        );
        assert_eq!(
            read_one(&with_status(&r, "Certfied", None)).status,
            "Certified"
        );
        assert_eq!(
            read_one(&with_status(&r, "Status: Certified\nPatch: 1", None)).status,
            r.status
        );
        // A reason of several lines, with control characters and a CRLF.
        let back = read_one(&with_status(
            &r,
            "Rejected",
            Some("first line  \r\n  second\u{7} line\n\nPatch: 9\n---\nlast"),
        ));
        assert_eq!(
            back.certification_report,
            format!(
                "{}\nCerto: first line\n  second  line\n\nPatch: 9\n---\nlast",
                r.certification_report
            )
        );
        assert_eq!(back.id, r.id);
        // A reason that already names Certo, and an empty one.
        let back = read_one(&with_status(&r, "Rejected", Some("Certo: no")));
        assert!(back.certification_report.ends_with("\nCerto: no"));
        let mut empty = r.clone();
        empty.certification_report.clear();
        let back = read_one(&with_status(&empty, "Rejected", Some("x")));
        assert_eq!(back.certification_report, "Certo: x");
        // A reason too long for the report is cut to fit.
        let long = "y".repeat(limits::MAX_DESCRIPTION_CHARS);
        let back = read_one(&with_status(&r, "Rejected", Some(&long)));
        assert_eq!(
            back.certification_report.chars().count(),
            limits::MAX_DESCRIPTION_CHARS
        );
        assert!(back.certification_report.ends_with("y…"));
        assert!(
            back.certification_report
                .starts_with(&r.certification_report)
        );
    }

    /// A fixture record with every field the text form has set, and odd values in each.
    fn odd_record() -> PatchRecord {
        let (_, mut r) = fixture_records()
            .into_iter()
            .find(|(f, _)| f == "3456-yaim-core-wn.txt")
            .expect("fixture 3456");
        r.title = "Title: with a colon, a comma (and) – non-ASCII café".into();
        r.status = "In certification".into();
        r.release_update = Some(ReleaseUpdate {
            number: 1,
            security: true,
        });
        r.bugs[0].title = Some("commas, inside (nested, too) parentheses".into());
        r.bugs.push(Bug {
            id: 45680,
            title: Some("((double))".into()),
            regression_test: None,
        });
        r.packages[0].external = false;
        r.packages[1].external = true;
        r.packages[1].source = PackageSource::Repository("patches/3456/sl5:x".into());
        r.packages[2].sha256 = Some("0".repeat(64));
        r.packages[2].source = PackageSource::Url("https://repo.example.org/a,b/sl5?x=1".into());
        let file = "glite-security-voms-api-cpp-1.8.3-3.sl5.x86_64.rpm";
        let p = parse_package_file(file).expect("a package file name");
        r.metapackage_changes = vec![MetapackageChange {
            node_type: "glite-UI".into(),
            file: file.into(),
            name: p.name,
            version: p.version,
            release: p.release,
            arch: p.arch,
        }];
        r.config_changes.push(ConfigChange {
            file: "/etc/with space/app.conf".into(),
            key: "EMPTY".into(),
            value: String::new(),
        });
        r.config_changes.push(ConfigChange {
            file: "site-info.def".into(),
            key: "A.b-c_d".into(),
            value: "x=y: z, (w) \"quoted\" # not a comment".into(),
        });
        r.assigned_to = Some("Jane Doe (certification)".into());
        r.priority = Some("9 - Immediate".into());
        r.release_path = Some(ReleasePath::Internal);
        r.allow_downgrade = true;
        r.description = "First: line\n\n\n  indented, then\ta tab\n---\nPatch: 1\n#not a comment\n    deeper\nlast".into();
        r.release_notes = "one line".into();
        r.installation = "Run:\n  yaim -c -s site-info.def -n glite-WN".into();
        r.certification_report = "[x] installs\n[ ] basic tests".into();
        r
    }

    #[test]
    fn odd_values_round_trip_exactly() {
        let r = odd_record();
        let text = tracker_text(&r);
        assert_eq!(read_one(&text), r, "\n{text}");
        assert!(text.contains("\nDowngrade: allowed\n"), "{text}");
        assert!(
            text.contains("\nRelease: gLite 3.2 Security Update 01\n"),
            "{text}"
        );
        assert!(text.contains("\nExternals:\n  glite-wn-info-1.2.3-2.sl5.x86_64.rpm\n"));
        // An external-only record, and one of Debian packages only.
        let mut ext = r.clone();
        for p in &mut ext.packages {
            p.external = true;
        }
        assert_eq!(read_one(&tracker_text(&ext)), ext);
        // Different statuses and releases, one by one.
        for status in labels::STATUSES.iter().map(|(s, _)| *s) {
            let mut s = r.clone();
            s.status = status.to_string();
            s.release_update = Some(ReleaseUpdate {
                number: 71,
                security: false,
            });
            s.release_path = Some(ReleasePath::Standard);
            assert_eq!(read_one(&tracker_text(&s)), s);
        }
    }

    #[test]
    fn unbalanced_bug_titles_get_a_line_each() {
        let mut r = odd_record();
        r.bugs = vec![
            Bug {
                id: 1,
                title: Some("(unbalanced, open".into()),
                regression_test: None,
            },
            Bug {
                id: 2,
                title: None,
                regression_test: None,
            },
            Bug {
                id: 3,
                title: Some("closes) early".into()),
                regression_test: None,
            },
            Bug {
                id: 4,
                title: Some("fine (x, y)".into()),
                regression_test: None,
            },
        ];
        let text = tracker_text(&r);
        assert!(
            text.contains("\nBugs:\n  1 ((unbalanced, open)\n  2\n"),
            "{text}"
        );
        assert_eq!(read_one(&text), r, "\n{text}");
    }

    #[test]
    fn what_the_text_form_cannot_carry_reads_back_as_documented() {
        let mut r = odd_record();
        r.bugs = vec![Bug {
            id: 7,
            title: Some("a) first, b) second".into()),
            regression_test: Some("glite-WN/bug7".into()),
        }];
        r.packages[0].source = PackageSource::Repository("patches/with space".into());
        r.config_changes = vec![ConfigChange {
            file: "/etc/odd:name.conf".into(),
            key: "K".into(),
            value: "v".into(),
        }];
        r.description = "  all lines\n    indented\n\tand a tab".into();
        r.installation = "x\n\tleading tab".into();
        let text = tracker_text(&r);
        let back = read_one(&text);

        let mut expected = r.clone();
        expected.bugs[0].title = Some("a) first%2C b) second".into());
        expected.bugs[0].regression_test = None;
        expected.packages[0].source = PackageSource::Repository("patches/with%20space".into());
        expected.config_changes[0].file = "/etc/odd%3Aname.conf".into();
        // The least indentation (the tab counting as one) is removed from every line.
        expected.description = " all lines\n   indented\nand a tab".into();
        expected.installation = "x\n leading tab".into();
        assert_eq!(back, expected, "\n{text}");

        // A release update the reader would refuse is left out.
        let mut big = odd_record();
        big.release_update = Some(ReleaseUpdate {
            number: 10_000,
            security: false,
        });
        let mut expected = big.clone();
        expected.release_update = None;
        assert_eq!(read_one(&tracker_text(&big)), expected);
    }

    #[test]
    fn control_characters_of_a_hand_built_record_do_not_spill_into_other_fields() {
        let mut r = odd_record();
        r.title = "two\nStatus: Rejected".into();
        r.assigned_to = Some("x\r\ny".into());
        let back = read_one(&tracker_text(&r));
        assert_eq!(back.title, "two Status: Rejected");
        assert_eq!(back.status, r.status);
        assert_eq!(back.assigned_to.as_deref(), Some("x  y"));
    }
}
