//! Workflows as data: a workflow file (`workflows/certify.yaml`) names the steps of a run,
//! their dependencies, which steps run once per target (fan-out over the run's targets) and
//! which once per run, each step's timeout and retry policy, and the steps that always run
//! (teardown: created with the target, so they run after a failure and after a cancel).
//!
//! Read like patch records: into the positioned tree first, then converted with every error
//! collected, each with its line and column, so `certo workflow check` lists them all at
//! once. Unknown fields are refused (the file is Certo's own configuration: a typo must not
//! pass as a default).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::patch::doc::{self, Node, Pos, Value};
use crate::patch::limits::shorten;

/// The certification workflow shipped with Certo, compiled in.
pub const CERTIFY: &str = include_str!("../../../workflows/certify.yaml");
/// Where [`CERTIFY`] comes from, for messages.
pub const CERTIFY_PATH: &str = "workflows/certify.yaml";
/// The nightly regression sweep shipped with Certo, compiled in.
pub const NIGHTLY: &str = include_str!("../../../workflows/nightly.yaml");
/// Where [`NIGHTLY`] comes from.
pub const NIGHTLY_PATH: &str = "workflows/nightly.yaml";

/// Longest timeout a step may have.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Most attempts a retry policy may allow.
pub const MAX_ATTEMPTS: u32 = 20;
/// Most steps in one workflow.
pub const MAX_STEPS: usize = 64;

/// One error in a workflow file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkflowError {
    pub file: String,
    pub line: u32,
    pub col: u32,
    /// The field path, e.g. `steps[2].retry.factor`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, self.field, self.message
        )
    }
}

/// Once per what a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Once for the whole run (e.g. planning, the verdict).
    Run,
    /// Once for each target of the run (release × platform × node type).
    Target,
}

/// Which failures a retry policy retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The host, the network, the hypervisor: another attempt (on another host) may pass.
    Infrastructure,
    /// The step ran out of time.
    Timeout,
    /// The patch's fault: retrying gives the same answer (allowed, for flaky suites).
    Product,
}

impl FailureClass {
    const ALL: &[(&str, FailureClass)] = &[
        ("infrastructure", FailureClass::Infrastructure),
        ("timeout", FailureClass::Timeout),
        ("product", FailureClass::Product),
    ];
}

/// When and how often a failed step is tried again: delays `initial`, `initial × factor`, …
/// up to `cap`, for at most `attempts` attempts in all, for the failure classes in `on`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    pub attempts: u32,
    #[serde(with = "secs")]
    pub initial: Duration,
    pub factor: f64,
    #[serde(with = "secs")]
    pub cap: Duration,
    pub on: Vec<FailureClass>,
}

impl Retry {
    /// No retry: one attempt.
    pub fn none() -> Retry {
        Retry {
            attempts: 1,
            initial: Duration::ZERO,
            factor: 1.0,
            cap: Duration::ZERO,
            on: Vec::new(),
        }
    }

    /// The delay before attempt `n` (2 for the first retry), or `None` when the policy does
    /// not retry a failure of `class` or the attempts are used up.
    pub fn delay_before(&self, n: u32, class: FailureClass) -> Option<Duration> {
        if n < 2 || n > self.attempts || !self.on.contains(&class) {
            return None;
        }
        use backon::BackoffBuilder;
        // The delays of the retries in turn: initial, × factor each time, at most cap.
        backon::ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_factor(self.factor as f32)
            .with_max_delay(self.cap)
            .with_max_times(self.attempts.saturating_sub(1) as usize)
            .build()
            .nth(n as usize - 2)
            .map(|d| d.min(self.cap))
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub name: String,
    pub description: String,
    pub scope: Scope,
    /// Steps that must have passed first (of the same target, or the run's).
    pub needs: Vec<String>,
    #[serde(with = "secs")]
    pub timeout: Duration,
    pub retry: Retry,
    /// Runs whatever happened to the steps it needs (passed, failed, cancelled): teardown.
    pub always: bool,
}

/// A validated workflow: steps in an order where each comes after what it needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workflow {
    pub name: String,
    pub description: String,
    pub steps: Vec<Step>,
    /// When runs of it start by themselves (the nightly sweep); `None`: only when asked.
    pub schedule: Option<Schedule>,
    /// What a sweep covers (a workflow with a schedule has it).
    pub sweep: Option<SweepSettings>,
}

/// A cron schedule in a time zone: 5 fields (minute hour day-of-month month day-of-week).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub cron: String,
    pub time_zone: String,
    #[serde(skip)]
    tz: chrono_tz::Tz,
    #[serde(skip)]
    parsed: CronOf,
}

/// The parsed pattern (compared by its text).
#[derive(Debug, Clone)]
struct CronOf(croner::Cron);

impl PartialEq for CronOf {
    fn eq(&self, other: &Self) -> bool {
        self.0.pattern.to_string() == other.0.pattern.to_string()
    }
}

/// Most fire times one look at a schedule lists (a catch-up after a long outage records the
/// ones before as skipped, up to this many).
pub const MAX_FIRES: usize = 10_000;

impl Schedule {
    /// The first fire time strictly after `t`.
    pub fn next_after(
        &self,
        t: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.parsed
            .0
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc))
    }

    /// The fire times in `(after, until]`, oldest first, at most [`MAX_FIRES`] (the newest
    /// ones kept).
    pub fn fires_between(
        &self,
        after: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Vec<chrono::DateTime<chrono::Utc>> {
        let mut out = std::collections::VecDeque::new();
        let mut t = after;
        while let Some(next) = self.next_after(t) {
            if next > until {
                break;
            }
            if out.len() == MAX_FIRES {
                out.pop_front();
            }
            out.push_back(next);
            t = next;
        }
        out.into()
    }
}

/// What a sweep covers and how it tells flaky from failing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepSettings {
    /// `release/platform/node_type` patterns, `*` for any part.
    pub cells: Vec<String>,
    pub suites: Vec<String>,
    /// How often a failing test is run again on a fresh VM.
    pub flaky_retries: u32,
    /// Claim priority of its runs (certifiers' are 10).
    pub priority: i32,
    /// Sweeps older than this are pruned to their summaries.
    #[serde(with = "secs")]
    pub keep: Duration,
}

impl Default for SweepSettings {
    /// The whole matrix, regression only, one flakiness retry, priority 0, kept 30 days.
    fn default() -> Self {
        SweepSettings {
            cells: vec!["*/*/*".into()],
            suites: vec!["regression".into()],
            flaky_retries: 1,
            priority: 0,
            keep: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl SweepSettings {
    /// Whether `cell` (`release/platform/node_type`) is among the cells.
    pub fn covers(&self, cell: &str) -> bool {
        let parts: Vec<&str> = cell.split('/').collect();
        self.cells.iter().any(|p| {
            let want: Vec<&str> = p.split('/').collect();
            want.len() == parts.len() && want.iter().zip(&parts).all(|(w, c)| *w == "*" || w == c)
        })
    }
}

impl Workflow {
    /// The built-in certification workflow.
    pub fn certify() -> Workflow {
        Workflow::parse(CERTIFY_PATH, CERTIFY)
            .expect("the built-in certification workflow is valid (checked by a test)")
    }

    /// The built-in nightly sweep.
    pub fn nightly() -> Workflow {
        Workflow::parse(NIGHTLY_PATH, NIGHTLY)
            .expect("the built-in nightly workflow is valid (checked by a test)")
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Reads and validates one workflow file; every error, or the workflow.
    pub fn parse(file: &str, src: &str) -> Result<Workflow, Vec<WorkflowError>> {
        let mut cx = Cx {
            file: file.to_owned(),
            errors: Vec::new(),
        };
        let trees = match doc::parse_yaml(src) {
            Ok(t) => t,
            Err(e) => {
                cx.err(e.pos, "syntax", e.message);
                return Err(cx.errors);
            }
        };
        let tree = match trees.as_slice() {
            [one] => one,
            [] => {
                cx.err(Pos::new(1, 1), "workflow", "the file holds no workflow");
                return Err(cx.errors);
            }
            [_, second, ..] => {
                cx.err(second.pos, "workflow", "one workflow per file");
                return Err(cx.errors);
            }
        };
        let workflow = cx.workflow(tree);
        let mut errors = cx.errors;
        errors.sort_by_key(|e| (e.line, e.col));
        match workflow {
            Some(w) if errors.is_empty() => Ok(w),
            _ => Err(errors),
        }
    }
}

struct Cx {
    file: String,
    errors: Vec<WorkflowError>,
}

/// `90s`, `5m`, `1h`, `500ms`, or a combination such as `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return Err(format!(
                "`{}` is not a duration such as 90s, 5m, 1h or 500ms",
                shorten(s)
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| "a number too large".to_string())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "" => {
                return Err(format!(
                    "`{}`: a number without a unit (ms, s, m, h)",
                    shorten(s)
                ));
            }
            u => {
                return Err(format!(
                    "`{}`: unknown unit `{}` (ms, s, m, h)",
                    shorten(s),
                    shorten(u)
                ));
            }
        };
    }
    Ok(total)
}

impl Cx {
    fn err(&mut self, pos: Pos, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(WorkflowError {
            file: self.file.clone(),
            line: pos.line,
            col: pos.col,
            field: field.into(),
            message: message.into(),
        });
    }

    /// The entries of a mapping; unknown keys are errors.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        field: &str,
        allowed: &[&str],
    ) -> Option<HashMap<&'n str, (Pos, &'n Node)>> {
        let Value::Map(entries) = &node.value else {
            self.err(
                node.pos,
                field,
                format!("expected a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut out = HashMap::new();
        for (key, value) in entries {
            if allowed.contains(&key.name.as_str()) {
                out.insert(key.name.as_str(), (key.pos, value));
            } else {
                let near = crate::patch::labels::nearest(&key.name, allowed.iter().copied());
                let path = if field.is_empty() {
                    shorten(&key.name)
                } else {
                    format!("{field}.{}", shorten(&key.name))
                };
                self.err(
                    key.pos,
                    path,
                    match near {
                        Some(n) => format!(
                            "unknown field `{}` (did you mean `{n}`?)",
                            shorten(&key.name)
                        ),
                        None => format!(
                            "unknown field `{}` (expected one of: {})",
                            shorten(&key.name),
                            allowed.join(", ")
                        ),
                    },
                );
            }
        }
        Some(out)
    }

    fn scalar<'n>(&mut self, node: &'n Node, field: &str, what: &str) -> Option<&'n str> {
        match &node.value {
            Value::Scalar { text, .. } if !text.trim().is_empty() => Some(text.trim()),
            Value::Scalar { .. } | Value::Null => {
                self.err(node.pos, field, format!("expected {what}, found nothing"));
                None
            }
            _ => {
                self.err(
                    node.pos,
                    field,
                    format!("expected {what}, found {}", node.kind()),
                );
                None
            }
        }
    }

    fn name(&mut self, node: &Node, field: &str) -> Option<String> {
        let s = self.scalar(node, field, "a name")?;
        let ok = s.len() <= 40
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok {
            Some(s.to_owned())
        } else {
            self.err(
                node.pos,
                field,
                format!("`{}` is not a name (lower-case letters, digits, `_`, `-`; starting with a letter; at most 40)", shorten(s)),
            );
            None
        }
    }

    fn duration(&mut self, node: &Node, field: &str, max: Duration) -> Option<Duration> {
        let s = self.scalar(node, field, "a duration")?;
        match parse_duration(s) {
            Ok(d) if d.is_zero() => {
                self.err(node.pos, field, "a duration of zero");
                None
            }
            Ok(d) if d > max => {
                self.err(
                    node.pos,
                    field,
                    format!(
                        "`{}` is longer than the most allowed, {} s",
                        shorten(s),
                        max.as_secs()
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.err(node.pos, field, e);
                None
            }
        }
    }

    fn schedule(&mut self, node: &Node) -> Option<Schedule> {
        let m = self.map(node, "schedule", &["cron", "time_zone"])?;
        let cron = match m.get("cron") {
            Some((_, n)) => self
                .scalar(n, "schedule.cron", "a cron pattern")
                .map(|c| (n.pos, c)),
            None => {
                self.err(
                    node.pos,
                    "schedule.cron",
                    "required field `cron` is missing",
                );
                None
            }
        };
        let tz = match m.get("time_zone") {
            None => Some(("UTC".to_owned(), chrono_tz::Tz::UTC)),
            Some((_, n)) => {
                let s = self.scalar(n, "schedule.time_zone", "a time zone")?;
                match s.parse::<chrono_tz::Tz>() {
                    Ok(tz) => Some((s.to_owned(), tz)),
                    Err(_) => {
                        self.err(
                            n.pos,
                            "schedule.time_zone",
                            format!(
                                "unknown time zone `{}` (a tz database name such as UTC or Europe/Zurich)",
                                shorten(s)
                            ),
                        );
                        None
                    }
                }
            }
        };
        let (pos, text) = cron?;
        let fields = text.split_whitespace().count();
        if fields != 5 {
            self.err(
                pos,
                "schedule.cron",
                format!(
                    "`{}` has {fields} fields; a schedule has 5: minute hour day-of-month month day-of-week",
                    shorten(text)
                ),
            );
            return None;
        }
        let parsed = match <croner::Cron as std::str::FromStr>::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                self.err(
                    pos,
                    "schedule.cron",
                    format!("`{}` is not a cron pattern: {e}", shorten(text)),
                );
                return None;
            }
        };
        let (time_zone, tz) = tz?;
        let schedule = Schedule {
            cron: text.to_owned(),
            time_zone,
            tz,
            parsed: CronOf(parsed),
        };
        if schedule.next_after(chrono::Utc::now()).is_none() {
            self.err(
                pos,
                "schedule.cron",
                format!("`{}` never fires", shorten(text)),
            );
            return None;
        }
        Some(schedule)
    }

    fn sweep(&mut self, node: &Node) -> Option<SweepSettings> {
        let m = self.map(
            node,
            "sweep",
            &["cells", "suites", "flaky_retries", "priority", "keep"],
        )?;
        let mut ok = true;
        let mut list = |cx: &mut Cx, key: &str, default: &[&str]| -> Vec<(Pos, String)> {
            match m.get(key) {
                None => default
                    .iter()
                    .map(|d| (node.pos, (*d).to_owned()))
                    .collect(),
                Some((_, n)) => match &n.value {
                    Value::Seq(items) if !items.is_empty() => items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, it)| {
                            let f = format!("sweep.{key}[{i}]");
                            cx.scalar(it, &f, "a name").map(|s| (it.pos, s.to_owned()))
                        })
                        .collect(),
                    _ => {
                        cx.err(n.pos, format!("sweep.{key}"), "expected a non-empty list");
                        ok = false;
                        Vec::new()
                    }
                },
            }
        };
        let cells = list(self, "cells", &["*/*/*"]);
        let suites = list(self, "suites", &["regression"]);
        for (i, (pos, c)) in cells.iter().enumerate() {
            let parts: Vec<&str> = c.split('/').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
                self.err(
                    *pos,
                    format!("sweep.cells[{i}]"),
                    format!(
                        "`{}` is not release/platform/node_type (`*` for any part)",
                        shorten(c)
                    ),
                );
                ok = false;
            }
        }
        for (i, (pos, su)) in suites.iter().enumerate() {
            if !["basic", "regression"].contains(&su.as_str()) {
                self.err(
                    *pos,
                    format!("sweep.suites[{i}]"),
                    format!("unknown suite `{}` (basic, regression)", shorten(su)),
                );
                ok = false;
            }
        }
        let mut number = |cx: &mut Cx, key: &str, default: i64, max: i64| -> i64 {
            let Some((_, n)) = m.get(key) else {
                return default;
            };
            let Some(s) = cx.scalar(n, &format!("sweep.{key}"), "a number") else {
                ok = false;
                return default;
            };
            match s.parse::<i64>() {
                Ok(v) if (0..=max).contains(&v) => v,
                _ => {
                    cx.err(
                        n.pos,
                        format!("sweep.{key}"),
                        format!(
                            "expected a whole number from 0 to {max}, found `{}`",
                            shorten(s)
                        ),
                    );
                    ok = false;
                    default
                }
            }
        };
        let flaky_retries = number(self, "flaky_retries", 1, 5) as u32;
        let priority = number(self, "priority", 0, 9) as i32;
        let keep = match m.get("keep") {
            None => Some(Duration::from_secs(30 * 24 * 3600)),
            Some((_, n)) => {
                self.duration(n, "sweep.keep", Duration::from_secs(10 * 365 * 24 * 3600))
            }
        };
        let keep = keep?;
        ok.then(|| SweepSettings {
            cells: cells.into_iter().map(|(_, c)| c).collect(),
            suites: suites.into_iter().map(|(_, c)| c).collect(),
            flaky_retries,
            priority,
            keep,
        })
    }

    fn retry(&mut self, node: &Node, field: &str) -> Option<Retry> {
        let m = self.map(node, field, &["attempts", "initial", "factor", "cap", "on"])?;
        let f = |k: &str| format!("{field}.{k}");
        let attempts = match m.get("attempts") {
            None => {
                self.err(
                    node.pos,
                    f("attempts"),
                    "required field `attempts` is missing",
                );
                None
            }
            Some((_, n)) => {
                let s = self.scalar(n, &f("attempts"), "a number of attempts")?;
                match s.parse::<u32>() {
                    Ok(a) if (1..=MAX_ATTEMPTS).contains(&a) => Some(a),
                    _ => {
                        self.err(
                            n.pos,
                            f("attempts"),
                            format!(
                                "expected 1 to {MAX_ATTEMPTS} attempts, found `{}`",
                                shorten(s)
                            ),
                        );
                        None
                    }
                }
            }
        };
        let initial = match m.get("initial") {
            Some((_, n)) => self.duration(n, &f("initial"), MAX_TIMEOUT),
            None => Some(Duration::from_secs(1)),
        };
        let cap = match m.get("cap") {
            Some((_, n)) => self.duration(n, &f("cap"), MAX_TIMEOUT),
            None => initial.map(|i| i * 60),
        };
        let factor = match m.get("factor") {
            None => Some(2.0),
            Some((_, n)) => {
                let s = self.scalar(n, &f("factor"), "a factor")?;
                match s.parse::<f64>() {
                    Ok(x) if x.is_finite() && (1.0..=10.0).contains(&x) => Some(x),
                    _ => {
                        self.err(
                            n.pos,
                            f("factor"),
                            format!("expected a factor from 1 to 10, found `{}`", shorten(s)),
                        );
                        None
                    }
                }
            }
        };
        let mut on = Vec::new();
        match m.get("on") {
            None => on.push(FailureClass::Infrastructure),
            Some((_, n)) => {
                let items: Vec<&Node> = match &n.value {
                    Value::Seq(items) => items.iter().collect(),
                    Value::Scalar { .. } => vec![*n],
                    _ => {
                        self.err(
                            n.pos,
                            f("on"),
                            format!("expected a list of failure classes, found {}", n.kind()),
                        );
                        Vec::new()
                    }
                };
                for (i, item) in items.into_iter().enumerate() {
                    let field = format!("{field}.on[{i}]");
                    let Some(s) = self.scalar(item, &field, "a failure class") else {
                        continue;
                    };
                    match FailureClass::ALL.iter().find(|(k, _)| *k == s) {
                        Some((_, c)) if !on.contains(c) => on.push(*c),
                        Some(_) => self.err(item.pos, field, format!("`{s}` is listed twice")),
                        None => {
                            let names: Vec<&str> =
                                FailureClass::ALL.iter().map(|(k, _)| *k).collect();
                            self.err(
                                item.pos,
                                field,
                                format!(
                                    "unknown failure class `{}` (expected one of: {})",
                                    shorten(s),
                                    names.join(", ")
                                ),
                            );
                        }
                    }
                }
                on.sort();
            }
        }
        if let (Some(i), Some(c)) = (initial, cap)
            && c < i
        {
            let pos = m.get("cap").map_or(node.pos, |(_, n)| n.pos);
            self.err(
                pos,
                f("cap"),
                format!(
                    "the cap ({} s) is below the initial delay ({} s)",
                    c.as_secs_f64(),
                    i.as_secs_f64()
                ),
            );
            return None;
        }
        Some(Retry {
            attempts: attempts?,
            initial: initial?,
            factor: factor?,
            cap: cap?,
            on,
        })
    }

    fn workflow(&mut self, tree: &Node) -> Option<Workflow> {
        let m = self.map(
            tree,
            "",
            &["name", "description", "schedule", "sweep", "steps"],
        )?;
        let schedule = m.get("schedule").map(|(_, n)| self.schedule(n));
        let sweep = m.get("sweep").map(|(_, n)| self.sweep(n));
        match (&schedule, &sweep) {
            (Some(_), None) => self.err(
                tree.pos,
                "sweep",
                "a workflow with a `schedule` needs `sweep` (the cells it covers)",
            ),
            (None, Some(_)) => {
                if let Some((p, _)) = m.get("sweep") {
                    self.err(*p, "sweep", "`sweep` needs a `schedule`");
                }
            }
            _ => {}
        }
        let name = match m.get("name") {
            Some((_, n)) => self.name(n, "name"),
            None => {
                self.err(tree.pos, "name", "required field `name` is missing");
                None
            }
        };
        let description = m
            .get("description")
            .and_then(|(_, n)| self.scalar(n, "description", "a description"))
            .unwrap_or_default()
            .to_owned();
        let Some((steps_pos, steps_node)) = m.get("steps").copied() else {
            self.err(tree.pos, "steps", "required field `steps` is missing");
            return None;
        };
        let Value::Seq(items) = &steps_node.value else {
            self.err(
                steps_node.pos,
                "steps",
                format!("expected a list of steps, found {}", steps_node.kind()),
            );
            return None;
        };
        if items.is_empty() {
            self.err(steps_pos, "steps", "a workflow needs at least one step");
            return None;
        }
        if items.len() > MAX_STEPS {
            self.err(
                steps_node.pos,
                "steps",
                format!("{} steps; at most {MAX_STEPS}", items.len()),
            );
            return None;
        }
        let mut steps: Vec<(Step, Pos, Vec<Pos>)> = Vec::new();
        // Names of steps refused for other errors: still known to the steps that need them.
        let mut refused: Vec<String> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("steps[{i}]");
            let Some(s) = self.map(
                item,
                &field,
                &[
                    "name",
                    "description",
                    "per",
                    "needs",
                    "timeout",
                    "retry",
                    "always",
                ],
            ) else {
                continue;
            };
            let f = |k: &str| format!("{field}.{k}");
            let name = match s.get("name") {
                Some((_, n)) => self.name(n, &f("name")),
                None => {
                    self.err(item.pos, f("name"), "required field `name` is missing");
                    None
                }
            };
            let description = s
                .get("description")
                .and_then(|(_, n)| self.scalar(n, &f("description"), "a description"))
                .unwrap_or_default()
                .to_owned();
            let scope = match s.get("per") {
                None => Some(Scope::Target),
                Some((_, n)) => match self.scalar(n, &f("per"), "`run` or `target`") {
                    Some("run") => Some(Scope::Run),
                    Some("target") => Some(Scope::Target),
                    Some(other) => {
                        self.err(
                            n.pos,
                            f("per"),
                            format!("expected `run` or `target`, found `{}`", shorten(other)),
                        );
                        None
                    }
                    None => None,
                },
            };
            let mut needs = Vec::new();
            let mut need_pos = Vec::new();
            if let Some((_, n)) = s.get("needs") {
                let list: Vec<&Node> = match &n.value {
                    Value::Seq(items) => items.iter().collect(),
                    Value::Null => Vec::new(),
                    Value::Scalar { .. } => vec![*n],
                    Value::Map(_) => {
                        self.err(
                            n.pos,
                            f("needs"),
                            "expected a list of step names, found a mapping",
                        );
                        Vec::new()
                    }
                };
                for (j, need) in list.into_iter().enumerate() {
                    if let Some(x) = self.name(need, &format!("{field}.needs[{j}]")) {
                        needs.push(x);
                        need_pos.push(need.pos);
                    }
                }
            }
            let timeout = match s.get("timeout") {
                Some((_, n)) => self.duration(n, &f("timeout"), MAX_TIMEOUT),
                None => {
                    self.err(
                        item.pos,
                        f("timeout"),
                        "required field `timeout` is missing (every step has a deadline)",
                    );
                    None
                }
            };
            let retry = match s.get("retry") {
                Some((_, n)) => self.retry(n, &f("retry")),
                None => Some(Retry::none()),
            };
            let always = match s.get("always") {
                None => Some(false),
                Some((_, n)) => match self.scalar(n, &f("always"), "true or false") {
                    Some("true") => Some(true),
                    Some("false") => Some(false),
                    Some(other) => {
                        self.err(
                            n.pos,
                            f("always"),
                            format!("expected true or false, found `{}`", shorten(other)),
                        );
                        None
                    }
                    None => None,
                },
            };
            if let (Some(name), Some(scope), Some(timeout), Some(retry), Some(always)) =
                (name.clone(), scope, timeout, retry, always)
            {
                steps.push((
                    Step {
                        name,
                        description,
                        scope,
                        needs,
                        timeout,
                        retry,
                        always,
                    },
                    item.pos,
                    need_pos,
                ));
            } else if let Some(name) = name {
                refused.push(name);
            }
        }
        self.check_graph(&steps, &refused);
        let name = name?;
        // In an order where every step comes after what it needs (stable: file order otherwise).
        let mut ordered: Vec<Step> = Vec::new();
        let mut left: Vec<Step> = steps.into_iter().map(|(s, _, _)| s).collect();
        while !left.is_empty() {
            let before = left.len();
            let mut i = 0;
            while i < left.len() {
                if left[i]
                    .needs
                    .iter()
                    .all(|n| ordered.iter().any(|o| &o.name == n))
                {
                    ordered.push(left.remove(i));
                } else {
                    i += 1;
                }
            }
            if left.len() == before {
                // A cycle or an unknown step: reported by check_graph.
                return None;
            }
        }
        Some(Workflow {
            name,
            description,
            steps: ordered,
            schedule: schedule.flatten(),
            sweep: sweep.flatten(),
        })
    }

    /// Names unique, needs known, no cycle, a per-run step needs no per-target step (it would
    /// not know which target's), an always-step needs something.
    fn check_graph(&mut self, steps: &[(Step, Pos, Vec<Pos>)], refused: &[String]) {
        let mut first: BTreeMap<&str, Pos> = BTreeMap::new();
        for (s, pos, _) in steps {
            if let Some(p) = first.get(s.name.as_str()) {
                self.err(
                    *pos,
                    "steps",
                    format!("step `{}` is defined twice (first at {p})", s.name),
                );
            } else {
                first.insert(&s.name, *pos);
            }
        }
        let by_name: HashMap<&str, &Step> =
            steps.iter().map(|(s, _, _)| (s.name.as_str(), s)).collect();
        for (s, pos, need_pos) in steps {
            for (need, npos) in s.needs.iter().zip(need_pos) {
                match by_name.get(need.as_str()) {
                    None if refused.contains(need) => {}
                    None => {
                        let known = by_name
                            .keys()
                            .copied()
                            .chain(refused.iter().map(String::as_str));
                        let near = crate::patch::labels::nearest(need, known);
                        self.err(
                            *npos,
                            format!("steps.{}.needs", s.name),
                            match near {
                                Some(n) => format!("unknown step `{need}` (did you mean `{n}`?)"),
                                None => format!("unknown step `{need}`"),
                            },
                        );
                    }
                    Some(_) if need == &s.name => {
                        self.err(
                            *npos,
                            format!("steps.{}.needs", s.name),
                            "a step cannot need itself",
                        );
                    }
                    Some(n) if s.scope == Scope::Run && n.scope == Scope::Target && !s.always => {
                        // A per-run step after per-target steps waits for all targets: allowed.
                    }
                    Some(_) => {}
                }
            }
            if s.always && s.needs.is_empty() {
                self.err(
                    *pos,
                    format!("steps.{}.always", s.name),
                    "an always-step (teardown) must need the step whose effect it undoes",
                );
            }
        }
        // Cycles: depth-first over known needs.
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let mut mark: HashMap<&str, Mark> = by_name.keys().map(|k| (*k, Mark::New)).collect();
        fn visit<'a>(
            n: &'a str,
            by_name: &HashMap<&'a str, &'a Step>,
            mark: &mut HashMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
        ) -> Option<Vec<&'a str>> {
            match mark.get(n) {
                Some(Mark::Done) | None => return None,
                Some(Mark::Open) => {
                    let from = path.iter().position(|p| *p == n).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(n);
                    return Some(cycle);
                }
                Some(Mark::New) => {}
            }
            mark.insert(n, Mark::Open);
            path.push(n);
            if let Some(step) = by_name.get(n) {
                for need in &step.needs {
                    if let Some(c) = visit(need, by_name, mark, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            mark.insert(n, Mark::Done);
            None
        }
        for (s, pos, _) in steps {
            let mut path = Vec::new();
            if let Some(cycle) = visit(&s.name, &by_name, &mut mark, &mut path) {
                self.err(
                    *pos,
                    format!("steps.{}.needs", s.name),
                    format!(
                        "the steps need each other in a circle: {}",
                        cycle.join(" → ")
                    ),
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        Workflow::parse("w.yaml", src)
            .expect_err("refused")
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn the_built_in_nightly_sweep_is_valid_scheduled_and_covers_every_cell() {
        let w = Workflow::nightly();
        let sch = w.schedule.as_ref().expect("a schedule");
        assert_eq!(
            (sch.cron.as_str(), sch.time_zone.as_str()),
            ("0 2 * * *", "Europe/Zurich")
        );
        let sweep = w.sweep.as_ref().expect("sweep settings");
        assert!(sweep.covers("3.2/sl5_x86_64/glite-WN"));
        assert_eq!(sweep.priority, 0);
        assert!(w.step("teardown").is_some_and(|s| s.always));
        assert!(Workflow::certify().schedule.is_none());
    }

    #[test]
    fn fire_times_follow_the_time_zone_through_daylight_saving_changes() {
        use chrono::TimeZone;
        let w = Workflow::parse(
            "n.yaml",
            "name: n\nschedule: {cron: \"30 2 * * *\", time_zone: Europe/Zurich}\nsweep: {}\n\
             steps:\n  - {name: a, per: run, timeout: 1m}\n",
        )
        .expect("valid");
        let sch = w.schedule.expect("schedule");
        // Winter: 02:30 in Zurich is 01:30 UTC; summer: 00:30 UTC.
        let jan = chrono::Utc.with_ymd_and_hms(2026, 1, 10, 0, 0, 0).unwrap();
        assert_eq!(
            sch.next_after(jan),
            Some(chrono::Utc.with_ymd_and_hms(2026, 1, 10, 1, 30, 0).unwrap())
        );
        let jul = chrono::Utc.with_ymd_and_hms(2026, 7, 10, 0, 0, 0).unwrap();
        assert_eq!(
            sch.next_after(jul),
            Some(chrono::Utc.with_ymd_and_hms(2026, 7, 10, 0, 30, 0).unwrap())
        );
        // The week of the spring change (29 March 2026 has no 02:30): one fire a day, never two.
        let fires = sch.fires_between(
            chrono::Utc.with_ymd_and_hms(2026, 3, 26, 12, 0, 0).unwrap(),
            chrono::Utc.with_ymd_and_hms(2026, 4, 2, 12, 0, 0).unwrap(),
        );
        let days: std::collections::BTreeSet<_> = fires
            .iter()
            .map(|f| f.with_timezone(&chrono_tz::Europe::Zurich).date_naive())
            .collect();
        assert_eq!(days.len(), fires.len(), "{fires:?}");
        assert_eq!(fires.len(), 7, "{fires:?}");
        // That day it fires at the first minute after the skipped hour: 03:00 local.
        assert_eq!(
            fires[2],
            chrono::Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap()
        );
        // The autumn change (25 October: 02:30 comes twice): once that day.
        let fires = sch.fires_between(
            chrono::Utc
                .with_ymd_and_hms(2026, 10, 24, 12, 0, 0)
                .unwrap(),
            chrono::Utc
                .with_ymd_and_hms(2026, 10, 25, 12, 0, 0)
                .unwrap(),
        );
        assert_eq!(fires.len(), 1, "{fires:?}");
    }

    #[test]
    fn schedule_and_sweep_errors_are_positioned() {
        let e = errors(
            "name: n\nschedule: {cron: \"0 2 * * * *\", time_zone: Mars/Base}\n\
             sweep: {cells: [3.2/sl5], suites: [smoke], flaky_retries: 9}\n\
             steps:\n  - {name: a, per: run, timeout: 1m}\n",
        );
        assert_eq!(
            e,
            vec![
                "w.yaml:2:18: schedule.cron: `0 2 * * * *` has 6 fields; a schedule has 5: minute hour day-of-month month day-of-week",
                "w.yaml:2:44: schedule.time_zone: unknown time zone `Mars/Base` (a tz database name such as UTC or Europe/Zurich)",
                "w.yaml:3:17: sweep.cells[0]: `3.2/sl5` is not release/platform/node_type (`*` for any part)",
                "w.yaml:3:36: sweep.suites[0]: unknown suite `smoke` (basic, regression)",
                "w.yaml:3:59: sweep.flaky_retries: expected a whole number from 0 to 5, found `9`",
            ]
        );
        let e = errors(
            "name: n\nschedule: {cron: \"61 2 * * *\"}\nsteps:\n  - {name: a, per: run, timeout: 1m}\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("w.yaml:1:1: sweep: a workflow with a `schedule` needs `sweep`"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("w.yaml:2:18: schedule.cron: `61 2 * * *` is not a cron pattern"),
            "{e:?}"
        );
    }

    #[test]
    fn the_built_in_certification_workflow_is_valid_and_in_order() {
        let w = Workflow::certify();
        assert_eq!(w.name, "certify");
        let names: Vec<&str> = w.steps.iter().map(|s| s.name.as_str()).collect();
        for (a, b) in [
            ("build", "place"),
            ("place", "transfer"),
            ("transfer", "boot"),
            ("boot", "join"),
            ("join", "basic"),
            ("basic", "regression"),
            ("regression", "bugs"),
        ] {
            let (i, j) = (
                names.iter().position(|n| *n == a).expect(a),
                names.iter().position(|n| *n == b).expect(b),
            );
            assert!(i < j, "{a} before {b}: {names:?}");
        }
        let teardown = w.step("teardown").expect("teardown");
        assert!(teardown.always && teardown.scope == Scope::Target);
        assert_eq!(w.step("verdict").map(|s| s.scope), Some(Scope::Run));
        // Transfers and boots are retried on infrastructure failures, tests are not retried
        // on the product's.
        let boot = w.step("boot").expect("boot");
        assert!(boot.retry.on.contains(&FailureClass::Infrastructure));
        assert!(
            !w.step("basic")
                .expect("basic")
                .retry
                .on
                .contains(&FailureClass::Product)
        );
    }

    #[test]
    fn retry_delays_grow_by_the_factor_up_to_the_cap() {
        let r = Retry {
            attempts: 5,
            initial: Duration::from_secs(2),
            factor: 3.0,
            cap: Duration::from_secs(10),
            on: vec![FailureClass::Infrastructure],
        };
        let d = |n| {
            r.delay_before(n, FailureClass::Infrastructure)
                .map(|d| d.as_secs_f64())
        };
        assert_eq!(
            (d(2), d(3), d(4), d(5), d(6)),
            (Some(2.0), Some(6.0), Some(10.0), Some(10.0), None)
        );
        assert_eq!(r.delay_before(2, FailureClass::Product), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn every_error_is_listed_with_its_position() {
        let src = "name: certify\nsteps:\n  - name: build\n    timeout: 10x\n    retry: {attempts: 0, factor: 11, on: [weather]}\n  - name: boot\n    needs: [biuld]\n    timeout: 1m\n    colour: red\n  - name: teardown\n    always: true\n    timeout: 1m\n";
        let e = errors(src);
        assert_eq!(
            e,
            [
                "w.yaml:4:14: steps[0].timeout: `10x`: unknown unit `x` (ms, s, m, h)",
                "w.yaml:5:23: steps[0].retry.attempts: expected 1 to 20 attempts, found `0`",
                "w.yaml:5:34: steps[0].retry.factor: expected a factor from 1 to 10, found `11`",
                "w.yaml:5:43: steps[0].retry.on[0]: unknown failure class `weather` (expected one of: infrastructure, timeout, product)",
                "w.yaml:7:13: steps.boot.needs: unknown step `biuld` (did you mean `build`?)",
                "w.yaml:9:5: steps[1].colour: unknown field `colour` (expected one of: name, description, per, needs, timeout, retry, always)",
                "w.yaml:10:5: steps.teardown.always: an always-step (teardown) must need the step whose effect it undoes",
            ]
        );
    }

    #[test]
    fn cycles_duplicates_and_missing_fields_are_refused() {
        let e = errors(
            "name: w\nsteps:\n  - {name: a, needs: [b], timeout: 1s}\n  - {name: b, needs: [a], timeout: 1s}\n",
        );
        assert!(
            e.iter()
                .any(|m| m.contains("need each other in a circle: a → b → a")),
            "{e:?}"
        );
        let e = errors("name: w\nsteps:\n  - {name: a, timeout: 1s}\n  - {name: a, timeout: 1s}\n");
        assert!(
            e.iter()
                .any(|m| m.contains("step `a` is defined twice (first at 3:5)")),
            "{e:?}"
        );
        let e = errors("name: w\nsteps:\n  - {name: a}\n");
        assert!(
            e.iter()
                .any(|m| m.contains("required field `timeout` is missing")),
            "{e:?}"
        );
        let e = errors("steps: []\n");
        assert!(
            e.iter().any(|m| m.contains("required field `name`")),
            "{e:?}"
        );
        let e = errors(
            "name: w\nsteps:\n  - {name: a, timeout: 1s, retry: {attempts: 2, initial: 1m, cap: 1s}}\n",
        );
        assert!(
            e.iter()
                .any(|m| m.contains("the cap (1 s) is below the initial delay (60 s)")),
            "{e:?}"
        );
        let e = errors("name: w\nsteps: [\n");
        assert!(e[0].contains(": syntax: "), "{e:?}");
    }
}
