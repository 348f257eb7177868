//! What a run's verdict rests on, per target: the VM that ran its tests, each test's result
//! and output, the harness's and the serial console's logs, a failed build's log tail; and
//! the difference against the last good run of the same target. The dashboard's patch page
//! and the API's `/api/v1/runs/{id}/tests` and `/logs` read it.

use serde::Serialize;

use crate::store::engine::{RunRow, StepDetail};
use crate::store::{Store, StoreError};

/// One test's result on a target.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TestEvidence {
    pub suite: String,
    pub name: String,
    pub status: String,
    pub seconds: f64,
    pub output: String,
    /// It fails on the baseline too (does not reject).
    pub known: bool,
}

/// One target's evidence.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TargetEvidence {
    pub target: String,
    /// The VM (domain) that ran its tests, and its host.
    pub vm: Option<String>,
    pub host: Option<String>,
    pub tests: Vec<TestEvidence>,
    pub harness_log: String,
    pub serial_log: String,
    /// The end of a failed build's log.
    pub build_log: Option<String>,
}

/// The last `max` bytes of `s`, from a line start.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    let t = &s[i..];
    t.split_once('\n').map_or(t, |(_, rest)| rest).to_owned()
}

/// Each target's evidence in run `run` (its steps as read), logs cut to their last
/// `log_bytes`: one round trip for every target's VM.
pub async fn of_run(
    store: &Store,
    run: &RunRow,
    steps: &[StepDetail],
    known: &[String],
    log_bytes: usize,
) -> Result<Vec<TargetEvidence>, StoreError> {
    let vm_of = |target: &str| {
        steps
            .iter()
            .filter(|st| st.target == target && st.name == "boot")
            .filter_map(|st| st.outcome.as_ref()?.get("vm")?.as_str().map(str::to_owned))
            .next_back()
    };
    let names: Vec<String> = run.targets.iter().filter_map(|t| vm_of(t)).collect();
    let vms = if names.is_empty() {
        Vec::new()
    } else {
        store.vm_evidence(&names).await?
    };
    let mut out = Vec::new();
    for target in &run.targets {
        let vm_name = vm_of(target);
        let build_log = steps
            .iter()
            .filter(|st| st.target == *target && st.name == "build" && st.state == "failed")
            .filter_map(|st| st.outcome.as_ref()?.get("log_tail")?.as_array().cloned())
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .next_back();
        let mut e = TargetEvidence {
            target: target.clone(),
            vm: vm_name.clone(),
            host: None,
            tests: Vec::new(),
            harness_log: String::new(),
            serial_log: String::new(),
            build_log,
        };
        if let Some(vm) = vm_name
            .as_ref()
            .and_then(|n| vms.iter().find(|v| v.name == *n))
        {
            e.host = Some(vm.host.clone());
            e.tests = tests_of(vm, known, log_bytes);
            e.harness_log = tail(&vm.log, log_bytes);
            // The serial log is a file Certo itself wrote beside the VM (its path is ours).
            if let Some(path) = &vm.serial_log {
                e.serial_log = tail(
                    &String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()),
                    log_bytes,
                );
            }
        }
        out.push(e);
    }
    Ok(out)
}

fn tests_of(
    vm: &crate::store::VmEvidence,
    known: &[String],
    log_bytes: usize,
) -> Vec<TestEvidence> {
    vm.results
        .iter()
        .map(|(suite, name, status, seconds, output)| TestEvidence {
            known: known.contains(&format!("{suite}/{name}")),
            suite: suite.clone(),
            name: name.clone(),
            status: status.clone(),
            seconds: *seconds,
            output: tail(output, log_bytes),
        })
        .collect()
}

/// The last good run of the same scenario: the last run certified on a target before
/// another run (any patch's).
#[derive(Debug, Clone, Serialize)]
pub struct GoodRun {
    pub run: i64,
    pub patch_id: Option<i64>,
    pub revision: Option<i32>,
}

/// For each of `targets`, the tests in the last run certified on it before run `before`
/// (any patch's): the last good run of the same scenario, and its tests. Two round trips
/// whatever the number of targets.
pub async fn last_good(
    store: &Store,
    targets: &[String],
    before: i64,
) -> Result<Vec<(String, GoodRun, Vec<TestEvidence>)>, StoreError> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let good = store.last_certified_with_targets(targets, before).await?;
    let names: Vec<String> = good.iter().filter_map(|g| g.4.clone()).collect();
    let vms = if names.is_empty() {
        Vec::new()
    } else {
        store.vm_evidence(&names).await?
    };
    Ok(good
        .into_iter()
        .map(|(target, run, patch_id, revision, vm)| {
            let tests = vm
                .and_then(|n| vms.iter().find(|v| v.name == n))
                .map(|v| tests_of(v, &[], 0))
                .unwrap_or_default();
            (
                target,
                GoodRun {
                    run,
                    patch_id,
                    revision,
                },
                tests,
            )
        })
        .collect())
}

/// What differs between a target's tests now and in the last good run: each test whose
/// status changed, appeared or went missing, as (test, before, now).
pub fn diff(
    now: &[TestEvidence],
    good: &[TestEvidence],
) -> Vec<(String, Option<String>, Option<String>)> {
    let key = |t: &TestEvidence| format!("{}/{}", t.suite, t.name);
    let mut out = Vec::new();
    for t in now {
        let before = good
            .iter()
            .find(|g| key(g) == key(t))
            .map(|g| g.status.clone());
        if before.as_deref() != Some(t.status.as_str()) {
            out.push((key(t), before, Some(t.status.clone())));
        }
    }
    for g in good {
        if !now.iter().any(|t| key(t) == key(g)) {
            out.push((key(g), Some(g.status.clone()), None));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, status: &str) -> TestEvidence {
        TestEvidence {
            suite: "basic".into(),
            name: name.into(),
            status: status.into(),
            seconds: 1.0,
            output: String::new(),
            known: false,
        }
    }

    #[test]
    fn the_difference_names_changed_new_and_missing_tests_only() {
        let good = [t("a", "pass"), t("b", "pass"), t("gone", "pass")];
        let now = [t("a", "pass"), t("b", "fail"), t("new", "pass")];
        assert_eq!(
            diff(&now, &good),
            vec![
                ("basic/b".into(), Some("pass".into()), Some("fail".into())),
                ("basic/new".into(), None, Some("pass".into())),
                ("basic/gone".into(), Some("pass".into()), None),
            ]
        );
        assert!(diff(&good, &good).is_empty());
    }

    #[test]
    fn a_tail_starts_at_a_line_and_keeps_short_text_whole() {
        assert_eq!(tail("short", 100), "short");
        assert_eq!(tail("first line\nsecond line\nthird", 12), "third");
    }
}
