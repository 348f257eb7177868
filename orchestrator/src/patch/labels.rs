//! The names a record's fields go by: Certo's own keys and the labels the tracker writes
//! (Savannah's patch form and the release team's checklists), read alike in every form,
//! and the spellings of releases and statuses the tracker uses.
//!
//! A label is compared normalised: lower case, `_` and `-` read as spaces, `&` as `and`,
//! runs of spaces as one.

/// A label as it is compared: lower case, `_`/`-` as spaces, `&` as `and`, single spaces.
pub fn normalise(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    for word in label
        .replace('&', " and ")
        .split(|c: char| c.is_whitespace() || c == '_' || c == '-')
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&word.to_lowercase());
    }
    out
}

/// Every label (normalised) and the record field it names.
pub const LABELS: &[(&str, &str)] = &[
    // Certo's own keys (YAML/JSON and the text export).
    ("id", "id"),
    ("patch", "id"),
    ("revision", "revision"),
    ("title", "title"),
    ("status", "status"),
    ("release", "release"),
    ("platforms", "platforms"),
    ("node types", "node_types"),
    ("bugs", "bugs"),
    ("packages", "packages"),
    ("rpms", "packages"),
    ("debs", "packages"),
    ("config changes", "config_changes"),
    ("configuration changes", "config_changes"),
    ("submitter", "submitter"),
    ("description", "description"),
    // The tracker's labels.
    ("patch id", "id"),
    ("summary", "title"),
    ("platform", "platforms"),
    ("affected metapackages", "node_types"),
    ("affected node types", "node_types"),
    ("node type", "node_types"),
    ("rpm names", "packages"),
    ("externals", "externals"),
    ("metapackage changes", "metapackage_changes"),
    ("associated bugs", "bugs"),
    ("submitted by", "submitter"),
    ("assigned to", "assigned_to"),
    ("priority", "priority"),
    ("release path", "release_path"),
    ("release notes", "release_notes"),
    ("installation and configuration", "installation"),
    ("installation", "installation"),
    ("certification report", "certification_report"),
    // Certo's opt-in to a downgrade (`allow_downgrade: true`, `Downgrade: allowed`).
    ("allow downgrade", "allow_downgrade"),
    ("allow downgrades", "allow_downgrade"),
    ("downgrade", "allow_downgrade"),
    ("downgrades", "allow_downgrade"),
];

/// The field a label names, if any.
pub fn field_of(label: &str) -> Option<&'static str> {
    let n = normalise(label);
    LABELS.iter().find(|(l, _)| *l == n).map(|(_, f)| *f)
}

/// The known label nearest to an unknown one, when it is near enough to be a slip of the
/// keyboard (or a near-synonym such as a singular for a plural): the label as it would be
/// written, and the field it names.
pub fn nearest_label(label: &str) -> Option<(&'static str, &'static str)> {
    let n = normalise(label);
    nearest(&n, LABELS.iter().map(|(l, _)| *l))
        .and_then(|l| LABELS.iter().find(|(k, _)| *k == l).map(|(k, f)| (*k, *f)))
}

/// Edit distance over characters: insertions, deletions, substitutions and swaps of two
/// neighbours (`46` for `64` is one slip), each counting one.
pub fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// `(did you mean `X`? known: …)` or `(expected one of: …)`: the hint of an unknown value.
pub fn hint<'k>(
    wrong: &str,
    spellings: impl IntoIterator<Item = &'k str>,
    known: &[&str],
) -> String {
    match nearest(wrong, spellings) {
        Some(near) => format!("did you mean `{near}`? known: {}", known.join(", ")),
        None => format!("expected one of: {}", known.join(", ")),
    }
}

/// Of `known`, the one nearest to `wrong` (compared case-insensitively), if it is within
/// a quarter of the longer one's length (at most 3 edits; names under 4 characters only
/// differing in case); ties go to the first.
pub fn nearest<'k>(wrong: &str, known: impl IntoIterator<Item = &'k str>) -> Option<&'k str> {
    let w = wrong.to_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        let d = distance(&w, &k.to_lowercase());
        let longer = w.chars().count().max(k.chars().count());
        // A name of one to three letters is too short to guess from.
        let limit = if longer < 4 {
            0
        } else {
            (longer / 4).clamp(1, 3)
        };
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

/// Where a tracker status stands in the patch lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not yet handed to certification (In configuration, Ready for Integration).
    Before,
    /// Certification's to do (Ready for Certification, In certification, Open).
    Certification,
    /// Certified and on its way to production.
    Past,
    /// Rejected or obsolete.
    Closed,
}

/// The tracker's statuses, in lifecycle order, with their stage. `Open` is Certo's own
/// older name for a record waiting for certification.
pub const STATUSES: &[(&str, Stage)] = &[
    ("In configuration", Stage::Before),
    ("Ready for Integration", Stage::Before),
    ("Ready for Certification", Stage::Certification),
    ("In certification", Stage::Certification),
    ("Certified", Stage::Past),
    ("Verified", Stage::Past),
    ("Ready for Rollout", Stage::Past),
    ("Rolling out", Stage::Past),
    ("Ready for Production", Stage::Past),
    ("Rejected", Stage::Closed),
    ("Obsolete", Stage::Closed),
    ("Open", Stage::Certification),
];

/// A status as the tracker spells it (any case, any spacing), in its canonical spelling.
pub fn status(s: &str) -> Option<(&'static str, Stage)> {
    let n = normalise(s);
    STATUSES
        .iter()
        .find(|(k, _)| normalise(k) == n)
        .map(|(k, st)| (*k, *st))
}

/// A release as the tracker writes it: `3.2`, `gLite 3.2`, `3.1.0`, `3.1.0 Update 71`,
/// `gLite 3.2 Security Update 01`: the release's name (`3.1`) and its update, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSpelling {
    /// `major.minor`, e.g. `3.2`.
    pub name: String,
    pub update: Option<super::ReleaseUpdate>,
}

/// Reads a release spelling; `Err` says what is wrong with it.
pub fn release(s: &str) -> Result<ReleaseSpelling, String> {
    let words: Vec<String> = s.split_whitespace().map(str::to_lowercase).collect();
    let mut w: &[String] = &words;
    if w.first().is_some_and(|x| x == "glite") {
        w = &w[1..];
    }
    let Some((version, rest)) = w.split_first() else {
        return Err("no release number".into());
    };
    let version = version.strip_prefix("glite").unwrap_or(version);
    let parts: Vec<&str> = version.split('.').collect();
    let numeric = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let name = match parts[..] {
        [a, b] if numeric(a) && numeric(b) => format!("{a}.{b}"),
        [a, b, "0"] if numeric(a) && numeric(b) => format!("{a}.{b}"),
        _ => {
            return Err(format!(
                "`{version}` is not a release number such as 3.2 or 3.2.0"
            ));
        }
    };
    let update = match rest {
        [] => None,
        [u, n] if u == "update" => Some((n, false)),
        [s, u, n] if s == "security" && u == "update" => Some((n, true)),
        _ => {
            return Err(format!(
                "`{}` after the release number: expected `Update NN` or `Security Update NN`",
                rest.join(" ")
            ));
        }
    };
    let update = match update {
        None => None,
        Some((n, security)) => {
            let number: u32 = n
                .parse()
                .ok()
                .filter(|_| n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("update number `{n}` is not a number"))?;
            Some(super::ReleaseUpdate { number, security })
        }
    };
    Ok(ReleaseSpelling { name, update })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_in_any_case_and_spacing() {
        assert_eq!(field_of("Node types"), Some("node_types"));
        assert_eq!(field_of("node_types"), Some("node_types"));
        assert_eq!(field_of("AFFECTED  METAPACKAGES"), Some("node_types"));
        assert_eq!(
            field_of("Installation & configuration"),
            Some("installation")
        );
        assert_eq!(field_of("RPM names"), Some("packages"));
        assert_eq!(field_of("Summary"), Some("title"));
        assert_eq!(field_of("Submitted by"), Some("submitter"));
        assert_eq!(field_of("colour"), None);
        // Every field's canonical key names itself.
        for (_, f) in LABELS {
            assert_eq!(field_of(f), Some(*f), "{f}");
        }
    }

    #[test]
    fn near_labels_and_values_are_suggested() {
        assert_eq!(nearest_label("Platfroms"), Some(("platforms", "platforms")));
        assert_eq!(
            nearest_label("Node tpyes"),
            Some(("node types", "node_types"))
        );
        assert_eq!(nearest_label("Sumary"), Some(("summary", "title")));
        assert_eq!(nearest_label("colour"), None);
        assert_eq!(
            nearest("sl5_x86-64", ["sl5_i386", "sl5_x86_64"]),
            Some("sl5_x86_64")
        );
        assert_eq!(nearest("windows", ["sl5_i386", "sl5_x86_64"]), None);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("46bit", "64bit"), 1);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn statuses_of_the_whole_lifecycle() {
        assert_eq!(
            status("in Certification"),
            Some(("In certification", Stage::Certification))
        );
        assert_eq!(
            status("READY FOR PRODUCTION"),
            Some(("Ready for Production", Stage::Past))
        );
        assert_eq!(status("Rolling out"), Some(("Rolling out", Stage::Past)));
        assert_eq!(status("obsolete"), Some(("Obsolete", Stage::Closed)));
        assert_eq!(
            status("In configuration"),
            Some(("In configuration", Stage::Before))
        );
        assert_eq!(status("Shipped"), None);
    }

    #[test]
    fn release_spellings() {
        let r = |s: &str| release(s).expect(s);
        assert_eq!(r("3.2").name, "3.2");
        assert_eq!(r("gLite 3.2").name, "3.2");
        assert_eq!(r("3.1.0").name, "3.1");
        assert_eq!(r("3.1").update, None);
        let u = r("3.1.0 Update 71");
        assert_eq!(u.name, "3.1");
        assert_eq!(
            u.update,
            Some(crate::patch::ReleaseUpdate {
                number: 71,
                security: false
            })
        );
        let s = r("gLite 3.2 Security Update 01");
        assert_eq!(s.name, "3.2");
        assert_eq!(
            s.update,
            Some(crate::patch::ReleaseUpdate {
                number: 1,
                security: true
            })
        );
        assert!(release("3.2 Update").is_err());
        assert!(release("3.2 Update x1").is_err());
        assert!(release("three").is_err());
        assert!(release("3.2.1").is_err());
        assert!(release("").is_err());
    }
}
