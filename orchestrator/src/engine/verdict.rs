//! Deciding a run: from its steps as they ended to one verdict — certified, rejected (with
//! the stage, the target and the reason), incomplete (infrastructure retries ran out), or
//! cancelled — and the per-target outcomes, bugs and known baseline failures the contract
//! of `certo submit --wait --json` prints.

use serde::Serialize;
use serde_json::{Value, json};

use crate::store::engine::{RunRow, StepDetail};

/// The order a target's steps run in (a failure is reported at the first that failed).
pub const TARGET_STEPS: &[&str] = &[
    "build",
    "baseline",
    "place",
    "transfer",
    "boot",
    "join",
    "basic",
    "regression",
    "bugs",
    "combined",
];

/// One target's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetOutcome {
    pub release: String,
    pub platform: String,
    pub node_type: String,
    /// passed, failed, incomplete, cancelled
    pub outcome: String,
    pub stage: Option<String>,
    pub reason: Option<String>,
    pub host: Option<String>,
    pub attempts: i32,
    pub seconds: f64,
}

/// A run's decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub verdict: String,
    pub stage: Option<String>,
    pub target: Option<String>,
    pub reason: Option<String>,
    pub targets: Vec<TargetOutcome>,
    pub bugs: Vec<Value>,
    pub known_failures: Vec<String>,
    pub conflicts_with: Vec<Value>,
}

fn reason_of(outcome: Option<&Value>) -> Option<String> {
    outcome
        .and_then(|o| o.get("reason"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Decides a run from its steps.
pub fn decide(run: &RunRow, steps: &[StepDetail]) -> Decision {
    let mut targets = Vec::new();
    let mut bugs = Vec::new();
    let mut known: Vec<String> = Vec::new();
    let conflicts = run.conflicts.as_array().cloned().unwrap_or_default();
    for target in &run.targets {
        let mine: Vec<&StepDetail> = steps.iter().filter(|s| &s.target == target).collect();
        let mut parts = target.splitn(3, '/');
        let (release, platform, node_type) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        // Where the VM ran: the boot step's host (a retry may have moved it), else where it
        // was placed.
        let host = mine
            .iter()
            .find(|s| s.name == "boot" && s.host.is_some())
            .and_then(|s| s.host.clone())
            .or_else(|| {
                mine.iter()
                    .find(|s| s.name == "place" && s.state == "passed")
                    .and_then(|s| s.outcome.as_ref())
                    .and_then(|o| o.get("host"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
        let attempts = mine
            .iter()
            .find(|s| s.name == "boot")
            .map_or(0, |s| s.attempt);
        let started = mine.iter().filter_map(|s| s.started_at).min();
        let ended = mine.iter().filter_map(|s| s.finished_at).max();
        let seconds = match (started, ended) {
            (Some(a), Some(b)) => (b - a).num_milliseconds() as f64 / 1000.0,
            _ => 0.0,
        };
        for s in &mine {
            if let Some(o) = &s.outcome {
                if let Some(Value::Array(k)) = o.get("known_failures") {
                    for f in k.iter().filter_map(Value::as_str) {
                        if !known.iter().any(|x| x == f) {
                            known.push(f.to_owned());
                        }
                    }
                }
                if s.name == "bugs"
                    && let Some(Value::Array(b)) = o.get("bugs")
                {
                    for bug in b {
                        if !bugs.contains(bug) {
                            bugs.push(bug.clone());
                        }
                    }
                }
            }
        }
        let failed = TARGET_STEPS
            .iter()
            .filter_map(|n| mine.iter().find(|s| s.name == *n))
            .find(|s| s.state == "failed");
        let teardown_failed = mine
            .iter()
            .any(|s| s.name == "teardown" && s.state == "failed");
        let all_passed = TARGET_STEPS
            .iter()
            .all(|n| mine.iter().any(|s| s.name == *n && s.state == "passed"));
        let (outcome, stage, reason) = match failed {
            Some(s) => {
                let o = s.outcome.as_ref();
                let cancelled = o.and_then(|o| o.get("cancelled")).is_some();
                let class = o.and_then(|o| o.get("class")).and_then(Value::as_str);
                if cancelled {
                    ("cancelled", None, reason_of(o))
                } else if class == Some("product") {
                    let stage = o
                        .and_then(|o| o.get("stage"))
                        .and_then(Value::as_str)
                        .unwrap_or(&s.name)
                        .to_owned();
                    ("failed", Some(stage), reason_of(o))
                } else {
                    (
                        "incomplete",
                        None,
                        Some(format!(
                            "{}: {}",
                            s.name,
                            reason_of(o).unwrap_or_else(|| "failed".into())
                        )),
                    )
                }
            }
            None if all_passed && !teardown_failed => ("passed", None, None),
            None if all_passed => (
                "incomplete",
                None,
                Some("teardown failed: the VM may still run".into()),
            ),
            None => ("cancelled", None, Some("not run".into())),
        };
        targets.push(TargetOutcome {
            release,
            platform,
            node_type,
            outcome: outcome.to_owned(),
            stage,
            reason,
            host,
            attempts,
            seconds,
        });
    }
    let first = |o: &str| targets.iter().find(|t| t.outcome == o);
    let (verdict, stage, target, reason) = if let Some(why) = &run.cancel_reason {
        ("cancelled", None, None, Some(why.clone()))
    } else if let Some(t) = first("failed") {
        (
            "rejected",
            t.stage.clone(),
            Some(format!("{}/{}/{}", t.release, t.platform, t.node_type)),
            t.reason.clone(),
        )
    } else if let Some(t) = first("incomplete") {
        (
            "incomplete",
            None,
            Some(format!("{}/{}/{}", t.release, t.platform, t.node_type)),
            t.reason.clone(),
        )
    } else if targets.is_empty() || targets.iter().any(|t| t.outcome != "passed") {
        (
            "incomplete",
            None,
            None,
            Some("no target was certified".into()),
        )
    } else {
        ("certified", None, None, None)
    };
    Decision {
        verdict: verdict.to_owned(),
        stage,
        target,
        reason,
        targets,
        bugs,
        known_failures: known,
        conflicts_with: conflicts,
    }
}

impl Decision {
    /// The RUN object of the scripts' contract.
    pub fn to_json(&self, run: &RunRow) -> Value {
        json!({
            "patch": run.patch_id,
            "revision": run.revision,
            "run": run.id,
            "verdict": self.verdict,
            "stage": self.stage,
            "target": self.target,
            "reason": self.reason,
            "targets": self.targets,
            "bugs": self.bugs,
            "known_failures": self.known_failures,
            "conflicts_with": self.conflicts_with.iter().filter_map(|c| c.get("patch")).collect::<Vec<_>>(),
            "conflicts": self.conflicts_with,
        })
    }

    /// One line a certifier reads: `certified`, or `rejected at install on
    /// 3.1/sl5_x86_64/glite-UI: ...`.
    pub fn line(&self) -> String {
        match self.verdict.as_str() {
            "rejected" => format!(
                "rejected at {} on {}: {}",
                self.stage.as_deref().unwrap_or("?"),
                self.target.as_deref().unwrap_or("?"),
                self.reason.as_deref().unwrap_or("")
            ),
            "certified" => {
                let mut s = format!("certified on {} targets", self.targets.len());
                let fixed = self
                    .bugs
                    .iter()
                    .filter(|b| b.get("fixed") == Some(&Value::Bool(true)))
                    .count();
                if fixed > 0 {
                    s.push_str(&format!(", {fixed} bug(s) verified fixed"));
                }
                if !self.known_failures.is_empty() {
                    s.push_str(&format!(
                        "; known baseline failures: {}",
                        self.known_failures.join(", ")
                    ));
                }
                s
            }
            other => match &self.reason {
                Some(r) => format!("{other}: {r}"),
                None => other.to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn run(targets: &[&str]) -> RunRow {
        RunRow {
            id: 7,
            workflow: "certify".into(),
            patch_id: Some(3456),
            revision: Some(2),
            state: "passed".into(),
            priority: 0,
            cancel_reason: None,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            conflicts: json!([]),
            created_at: Utc::now(),
            finished_at: None,
        }
    }

    fn step(target: &str, name: &str, state: &str, outcome: Value) -> StepDetail {
        StepDetail {
            id: 0,
            target: target.into(),
            name: name.into(),
            state: state.into(),
            attempt: 1,
            epoch: 1,
            host: None,
            started_at: Some(Utc::now()),
            finished_at: Some(Utc::now()),
            outcome: Some(outcome),
        }
    }

    fn passing(target: &str) -> Vec<StepDetail> {
        TARGET_STEPS
            .iter()
            .chain(["teardown"].iter())
            .map(|n| step(target, n, "passed", json!({"host": "h1"})))
            .collect()
    }

    const T1: &str = "3.2/sl5_x86_64/glite-WN";
    const T2: &str = "3.2/sl5_i386/glite-WN";

    #[test]
    fn every_target_passing_is_certified() {
        let mut steps = passing(T1);
        steps.extend(passing(T2));
        let d = decide(&run(&[T1, T2]), &steps);
        assert_eq!(d.verdict, "certified");
        assert_eq!(d.targets.len(), 2);
        assert!(d.targets.iter().all(|t| t.outcome == "passed"));
        assert_eq!(d.line(), "certified on 2 targets");
    }

    #[test]
    fn a_product_failure_rejects_at_its_stage_naming_the_target() {
        let mut steps = passing(T1);
        let mut t2 = passing(T2);
        t2[0] = step(
            T2,
            "build",
            "failed",
            json!({"class": "product", "stage": "install", "reason": "the %post script of x exited with status 1"}),
        );
        for s in t2.iter_mut().skip(1).filter(|s| s.name != "teardown") {
            s.state = "cancelled".into();
        }
        steps.extend(t2);
        let d = decide(&run(&[T1, T2]), &steps);
        assert_eq!(d.verdict, "rejected");
        assert_eq!(d.stage.as_deref(), Some("install"));
        assert_eq!(d.target.as_deref(), Some(T2));
        assert_eq!(
            d.line(),
            "rejected at install on 3.2/sl5_i386/glite-WN: the %post script of x exited with status 1"
        );
    }

    #[test]
    fn a_combination_failing_where_each_alone_passes_rejects_at_conflict() {
        let mut steps = passing(T1);
        let at = steps
            .iter()
            .position(|s| s.name == "combined")
            .expect("combined");
        steps[at] = step(
            T1,
            "combined",
            "failed",
            json!({"class": "product", "stage": "conflict", "reason": "conflicts with patch 3504 r1: ..."}),
        );
        let mut r = run(&[T1]);
        r.conflicts = json!([{"patch": 3504, "revision": 1}]);
        let d = decide(&r, &steps);
        assert_eq!(
            (d.verdict.as_str(), d.stage.as_deref()),
            ("rejected", Some("conflict"))
        );
        assert_eq!(d.to_json(&r)["conflicts_with"], json!([3504]));
    }

    #[test]
    fn infrastructure_failures_make_a_run_incomplete_never_rejected() {
        let mut steps = passing(T1);
        steps[3] = step(
            T1,
            "transfer",
            "failed",
            json!({"class": "infrastructure", "reason": "host h1 refused the push"}),
        );
        let d = decide(&run(&[T1]), &steps);
        assert_eq!(d.verdict, "incomplete");
        assert!(d.reason.as_deref().is_some_and(|r| r.contains("host h1")));
        let mut cancelled = run(&[T1]);
        cancelled.cancel_reason = Some("cancelled by ann".into());
        assert_eq!(decide(&cancelled, &steps).verdict, "cancelled");
    }
}
