//! Reports for machines: a run's tests as JUnit XML (`certo show PATCH --junit`), the
//! format CI systems already read.

use std::fmt::Write as _;

use super::OpError;
use crate::model::TestStatus;
use crate::store::Store;

/// Text made safe inside XML (element content and attribute values); characters XML 1.0
/// cannot carry at all become U+FFFD.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    xml_escape_into(&mut out, s);
    out
}

/// [`xml_escape`] appended to `out`.
pub fn xml_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

/// The tests of run `run` as JUnit XML: one `<testsuite>` per target (the VM that ran its
/// tests), one `<testcase>` per test, classed `TARGET.SUITE`. A regression is a
/// `<failure>` with its output; a test that also fails on the baseline (a known failure,
/// which does not reject) is `<skipped>` with that said; an `error` result is `<error>`.
pub async fn junit(store: &Store, run: i64) -> Result<String, OpError> {
    let Some(row) = store.run(run).await? else {
        return Err(OpError::NotFound(format!("run {run} does not exist")));
    };
    let steps = store.run_timeline(run).await?;
    let verdict = super::runs::view(store, &row).await?;
    let known: Vec<String> = verdict["known_failures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    let mut suites = String::new();
    let (mut all_tests, mut all_failures, mut all_errors, mut all_skipped) = (0, 0, 0, 0);
    for target in &row.targets {
        let vm_name = steps
            .iter()
            .filter(|s| s.target == *target && s.name == "boot")
            .filter_map(|s| s.outcome.as_ref()?.get("vm")?.as_str().map(str::to_owned))
            .next_back();
        let Some(vm) = (match vm_name {
            Some(n) => store.vm(&n).await?,
            None => None,
        }) else {
            // No VM ran this target's tests: an empty suite says so.
            let _ = writeln!(
                suites,
                "  <testsuite name=\"{}\" tests=\"0\" failures=\"0\" errors=\"0\" skipped=\"0\"/>",
                xml_escape(target)
            );
            continue;
        };
        let results = store.vm_results(vm.id).await?;
        let (mut failures, mut errors, mut skipped, mut seconds) = (0, 0, 0, 0.0);
        let mut cases = String::new();
        for r in &results {
            seconds += r.seconds;
            let key = format!("{}/{}", r.suite, r.name);
            let _ = write!(
                cases,
                "    <testcase classname=\"{}.{}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(target),
                xml_escape(&r.suite),
                xml_escape(&r.name),
                r.seconds
            );
            let first = r
                .output
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            match r.status {
                TestStatus::Pass => cases.push_str("/>\n"),
                _ if known.contains(&key) => {
                    skipped += 1;
                    let _ = writeln!(
                        cases,
                        ">\n      <skipped message=\"known failure: it fails on the baseline too\"/>\n      <system-out>{}</system-out>\n    </testcase>",
                        xml_escape(&r.output)
                    );
                }
                TestStatus::Error => {
                    errors += 1;
                    let _ = writeln!(
                        cases,
                        ">\n      <error message=\"{}\">{}</error>\n    </testcase>",
                        xml_escape(first),
                        xml_escape(&r.output)
                    );
                }
                _ => {
                    failures += 1;
                    let _ = writeln!(
                        cases,
                        ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>",
                        xml_escape(first),
                        xml_escape(&r.output)
                    );
                }
            }
        }
        all_tests += results.len();
        (all_failures, all_errors, all_skipped) = (
            all_failures + failures,
            all_errors + errors,
            all_skipped + skipped,
        );
        let _ = write!(
            suites,
            "  <testsuite name=\"{}\" hostname=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{seconds:.3}\">\n{cases}  </testsuite>\n",
            xml_escape(target),
            xml_escape(&vm.host),
            results.len()
        );
    }
    let name = match (row.patch_id, row.revision) {
        (Some(p), Some(r)) => format!("patch {p} r{r} run {run}"),
        _ => format!("run {run} ({})", row.workflow),
    };
    Ok(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"{}\" tests=\"{all_tests}\" failures=\"{all_failures}\" errors=\"{all_errors}\" skipped=\"{all_skipped}\">\n{suites}</testsuites>\n",
        xml_escape(&name)
    ))
}

#[cfg(test)]
mod tests {
    use super::xml_escape;

    #[test]
    fn xml_escape_leaves_no_markup_and_no_character_xml_cannot_carry() {
        assert_eq!(
            xml_escape("<a href=\"x\">&'\u{1b}[31m\n"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&apos;\u{fffd}[31m\n"
        );
    }
}
