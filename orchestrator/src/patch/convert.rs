//! From a positioned tree (any input form) to a validated [`PatchRecord`],
//! collecting every error with its position and field path.

use std::collections::HashMap;

use super::doc::{Key, Node, Pos, Value};
use super::limits::{self, shorten};
use super::{
    Bug, ConfigChange, Diagnostic, Package, PackageFormat, PackageSource, PatchRecord, SourceFormat,
};
use crate::catalogue::{Catalogue, Release};

/// The message for a record that lists neither packages nor configuration changes.
pub const CHANGES_NOTHING: &str =
    "the patch changes nothing: it lists no packages and no configuration changes";

const FIELDS: &[&str] = &[
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
    "externals",
    "metapackage_changes",
    "assigned_to",
    "priority",
    "release_path",
    "release_notes",
    "installation",
    "certification_report",
    "allow_downgrade",
];

struct Ctx<'a> {
    errors: Vec<Diagnostic>,
    /// What is legal but worth a look (exit 0, on stderr).
    warnings: Vec<Diagnostic>,
    catalogue: &'a Catalogue,
    format: SourceFormat,
}

impl Ctx<'_> {
    fn err(&mut self, pos: Pos, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Diagnostic::new(pos, field, message));
    }

    fn warn(&mut self, pos: Pos, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Diagnostic::new(pos, field, message));
    }

    /// The record's top-level fields by the field each key names (Certo's key or one of the
    /// tracker's labels). An unknown key is an error that names the nearest label; when one
    /// is near, the value is read as that field too (if it is not given otherwise), so the
    /// rest of its errors come out in the same round and no "missing" error for it.
    fn fields<'n>(&mut self, node: &'n Node) -> Option<HashMap<&'static str, (&'n Key, &'n Node)>> {
        let Value::Map(entries) = &node.value else {
            self.err(
                node.pos,
                "",
                format!("expected a mapping, found {}", node.kind()),
            );
            return None;
        };
        let mut out: HashMap<&'static str, (&Key, &Node)> = HashMap::new();
        let mut guessed: Vec<&'static str> = Vec::new();
        for (key, value) in entries {
            let field = match super::labels::field_of(&key.name) {
                Some(f) => f,
                None => {
                    let guess = super::labels::nearest_label(&key.name);
                    self.err(
                        key.pos,
                        shorten(&key.name),
                        match guess {
                            Some((label, _)) => format!(
                                "unknown field `{}` (did you mean `{}`?)",
                                shorten(&key.name),
                                self.spell(label)
                            ),
                            None => format!(
                                "unknown field `{}` (expected one of: {}, or a tracker label such as Summary, Platform, Affected metapackages, RPM names, Externals, Metapackage changes, Associated bugs, Submitted by)",
                                shorten(&key.name),
                                FIELDS.join(", ")
                            ),
                        },
                    );
                    match guess {
                        Some((_, f)) if !out.contains_key(f) => {
                            guessed.push(f);
                            out.insert(f, (key, value));
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            if let Some((first, _)) = out.get(field) {
                if let Some(i) = guessed.iter().position(|g| *g == field) {
                    // The real field wins over a guess.
                    guessed.remove(i);
                    out.insert(field, (key, value));
                    continue;
                }
                self.err(
                    key.pos,
                    field,
                    format!(
                        "`{}` gives {} again (first as `{}` at {})",
                        shorten(&key.name),
                        field,
                        shorten(&first.name),
                        first.pos
                    ),
                );
                continue;
            }
            out.insert(field, (key, value));
        }
        Some(out)
    }

    /// A normalised label as this record's form writes it.
    fn spell(&self, label: &str) -> String {
        match self.format {
            SourceFormat::Text => super::text::spell_label(label),
            _ => super::labels::LABELS
                .iter()
                .find(|(l, _)| *l == label)
                .map_or_else(
                    || label.to_string(),
                    |(l, f)| {
                        // Certo's own key when the label is one, else the tracker's label.
                        if l.replace(' ', "_") == *f {
                            f.to_string()
                        } else {
                            super::text::spell_label(l)
                        }
                    },
                ),
        }
    }

    /// How a field is called in the record's own form (for messages).
    fn spelled(&self, field: &str) -> String {
        match self.format {
            SourceFormat::Text => super::text::text_key_for(field)
                .map(|k| {
                    let mut c = k.chars();
                    c.next()
                        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                        .unwrap_or_default()
                })
                .unwrap_or_else(|| field.to_string()),
            _ => field.to_string(),
        }
    }

    /// A scalar's text, or an error naming what was found instead.
    fn text<'n>(&mut self, node: &'n Node, field: &str, what: &str) -> Option<&'n str> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text),
            Value::Null => {
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

    /// A single-line string without control characters, of bounded length.
    fn line<'n>(&mut self, node: &'n Node, field: &str, what: &str, max: usize) -> Option<&'n str> {
        let text = self.text(node, field, what)?;
        let text_trimmed = text.trim();
        if text_trimmed.is_empty() {
            self.err(
                node.pos,
                field,
                format!("expected {what}, found an empty value"),
            );
            return None;
        }
        if let Some(c) = text_trimmed.chars().find(|c| c.is_control()) {
            self.err(
                node.pos,
                field,
                format!(
                    "control character {} is not allowed in {what}",
                    c.escape_unicode()
                ),
            );
            return None;
        }
        let n = text_trimmed.chars().count();
        if n > max {
            self.err(
                node.pos,
                field,
                format!("{what} is {n} characters long; at most {max} are allowed"),
            );
            return None;
        }
        Some(text_trimmed)
    }

    /// Free text (several lines, tabs allowed), bounded, in canonical form: no trailing
    /// white space on a line, no blank lines before or after.
    fn free_text(&mut self, node: &Node, field: &str, what: &str) -> Option<String> {
        let d = self.text(node, field, what)?;
        if let Some(c) = d
            .chars()
            .find(|c| c.is_control() && *c != '\n' && *c != '\t')
        {
            self.err(
                node.pos,
                field,
                format!(
                    "control character {} is not allowed in {what}",
                    c.escape_unicode()
                ),
            );
            return None;
        }
        if d.chars().count() > limits::MAX_DESCRIPTION_CHARS {
            self.err(
                node.pos,
                field,
                format!(
                    "{what} is longer than {} characters",
                    limits::MAX_DESCRIPTION_CHARS
                ),
            );
            return None;
        }
        let lines: Vec<&str> = d.lines().map(str::trim_end).collect();
        Some(lines.join("\n").trim_matches('\n').to_string())
    }

    fn number(&mut self, node: &Node, field: &str, what: &str, max: u64) -> Option<u64> {
        let text = self.text(node, field, what)?;
        match text.trim().parse::<u64>() {
            Ok(0) => {
                self.err(node.pos, field, format!("{what} must be positive, found 0"));
                None
            }
            Ok(n) if n > max => {
                self.err(
                    node.pos,
                    field,
                    format!("{what} {n} is out of range (at most {max})"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                self.err(
                    node.pos,
                    field,
                    format!(
                        "expected {what} (a positive whole number), found `{}`",
                        shorten(text)
                    ),
                );
                None
            }
        }
    }

    /// The items of a list field (a lone scalar counts as a list of one).
    fn items<'n>(&mut self, node: &'n Node, field: &str, max: usize) -> Vec<&'n Node> {
        let items: Vec<&Node> = match &node.value {
            Value::Seq(items) => items.iter().collect(),
            Value::Null => Vec::new(),
            Value::Scalar { .. } => vec![node],
            Value::Map(_) => {
                self.err(
                    node.pos,
                    field,
                    "expected a list, found a mapping".to_string(),
                );
                return Vec::new();
            }
        };
        if items.len() > max {
            self.err(
                node.pos,
                field,
                format!("{} items; at most {max} are allowed", items.len()),
            );
            return Vec::new();
        }
        items
    }

    /// The entries of a mapping, refusing keys outside `allowed`.
    fn entries<'n>(
        &mut self,
        node: &'n Node,
        field: &str,
        allowed: &[&str],
    ) -> Option<HashMap<&'n str, (&'n Key, &'n Node)>> {
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
                out.insert(key.name.as_str(), (key, value));
            } else {
                let path = if field.is_empty() {
                    shorten(&key.name)
                } else {
                    format!("{field}.{}", shorten(&key.name))
                };
                self.err(
                    key.pos,
                    path,
                    format!(
                        "unknown field `{}` (expected one of: {})",
                        shorten(&key.name),
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(out)
    }
}

fn join(field: &str, sub: &str) -> String {
    format!("{field}.{sub}")
}

/// Checks a path from outside input: relative (unless `absolute_ok`), no `..`
/// or `.` components, no empty components, no backslashes or control characters.
fn check_path(path: &str, absolute_ok: bool) -> Result<(), String> {
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err("must not contain control characters or backslashes".into());
    }
    let rest = match path.strip_prefix('/') {
        Some(rest) if absolute_ok => rest,
        Some(_) => return Err("must be a relative path".into()),
        None => path,
    };
    for component in rest.split('/') {
        match component {
            "" => return Err("must not contain empty components (`//` or a trailing `/`)".into()),
            "." | ".." => {
                return Err(format!("must not contain `{component}` components"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The parts of a package file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageFileName {
    pub name: String,
    pub version: String,
    pub release: String,
    pub arch: String,
    pub format: PackageFormat,
}

impl PackageFileName {
    fn new(name: &str, version: &str, release: &str, arch: &str, format: PackageFormat) -> Self {
        PackageFileName {
            name: name.into(),
            version: version.into(),
            release: release.into(),
            arch: arch.into(),
            format,
        }
    }
}

/// Splits a package file name (`name-version-release.arch.rpm` or
/// `name_version[-revision]_arch.deb`) into its parts.
pub fn parse_package_file(file: &str) -> Result<PackageFileName, String> {
    if file.contains('/') || file.contains('\\') {
        return Err("a package file name must not contain path separators".into());
    }
    if let Some(c) = file.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "a package file name must not contain {}",
            if c.is_control() {
                format!("control character {}", c.escape_unicode())
            } else {
                "white space".into()
            }
        ));
    }
    if file.starts_with('.') || file.starts_with('-') {
        return Err("a package file name must not start with `.` or `-`".into());
    }
    let name_ok = |s: &str, deb: bool| {
        !s.is_empty()
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().all(|c| {
                (if deb {
                    c.is_ascii_lowercase() || c.is_ascii_digit()
                } else {
                    c.is_ascii_alphanumeric() || c == '_'
                }) || matches!(c, '.' | '+' | '-')
            })
    };
    let version_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | '_' | '^'))
    };
    if let Some(stem) = file.strip_suffix(".rpm") {
        // name-version-release.arch.rpm
        let (rest, arch) = stem
            .rsplit_once('.')
            .ok_or("expected `name-version-release.arch.rpm`, found no architecture")?;
        let (rest, release) = rest
            .rsplit_once('-')
            .ok_or("expected `name-version-release.arch.rpm`, found no release")?;
        let (name, version) = rest
            .rsplit_once('-')
            .ok_or("expected `name-version-release.arch.rpm`, found no version")?;
        if !name_ok(name, false) {
            return Err(format!(
                "`{}` is not a valid RPM package name",
                shorten(name)
            ));
        }
        // A version is whatever RPM allows (no `-`; letters, digits, `.`, `+`, `~`, `_`,
        // `^`): `VDT1.6.1x86_rhas_4` is one. One without a digit is a part of the name,
        // and the file has no release: `gridsite-shared-1.1.18.1.i386.rpm`.
        let digit = |s: &str| s.chars().any(|c| c.is_ascii_digit());
        if !digit(version) && !digit(release) {
            return Err(format!(
                "expected `name-version-release.arch.rpm`, found no version and no release (`{}` and `{}` have no digit)",
                shorten(version),
                shorten(release)
            ));
        }
        if !digit(version) && version_ok(version) {
            return Err(format!(
                "expected `name-version-release.arch.rpm`, found no release: read that way the version would be `{}` and the release `{}`",
                shorten(version),
                shorten(release)
            ));
        }
        if !version_ok(version) {
            return Err(format!(
                "expected `name-version-release.arch.rpm`; the version `{}` has characters other than letters, digits, `.`, `+`, `~`, `_`, `^`",
                shorten(version)
            ));
        }
        if !version_ok(release) {
            return Err(format!("`{}` is not a valid RPM release", shorten(release)));
        }
        if !arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || arch.is_empty() {
            return Err(format!(
                "`{}` is not a valid RPM architecture",
                shorten(arch)
            ));
        }
        return Ok(PackageFileName::new(
            name,
            version,
            release,
            arch,
            PackageFormat::Rpm,
        ));
    }
    if let Some(stem) = file.strip_suffix(".deb") {
        // name_version_arch.deb, the version possibly `upstream-revision`.
        let parts: Vec<&str> = stem.split('_').collect();
        let [name, full_version, arch] = parts[..] else {
            return Err("expected `name_version_arch.deb`".into());
        };
        if !name_ok(name, true) || name.len() < 2 {
            return Err(format!(
                "`{}` is not a valid Debian package name",
                shorten(name)
            ));
        }
        let (version, release) = match full_version.rsplit_once('-') {
            Some((v, r)) => (v, r),
            None => (full_version, ""),
        };
        let deb_version_ok = |s: &str| {
            s.chars().next().is_some_and(|c| c.is_ascii_digit())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | '-' | '%'))
        };
        if !deb_version_ok(version) || !(release.is_empty() || version_ok(release)) {
            return Err(format!(
                "`{}` is not a valid Debian version",
                shorten(full_version)
            ));
        }
        if !arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') || arch.is_empty() {
            return Err(format!(
                "`{}` is not a valid Debian architecture",
                shorten(arch)
            ));
        }
        return Ok(PackageFileName::new(
            name,
            version,
            release,
            arch,
            PackageFormat::Deb,
        ));
    }
    // `name-version-release.arch` without its `.rpm`, or `name_version_arch` without `.deb`.
    const ARCHS: &[&str] = &[
        "noarch", "i386", "i486", "i586", "i686", "x86_64", "ia64", "ppc", "ppc64", "src",
    ];
    if let Some((_, last)) = file.rsplit_once('.')
        && ARCHS.contains(&last)
    {
        return Err(format!(
            "the file name ends in `.{last}`, without `.rpm`: expected `name-version-release.arch.rpm`"
        ));
    }
    if file.matches('_').count() >= 2
        && file
            .rsplit_once('_')
            .is_some_and(|(_, a)| ["all", "amd64", "i386", "arm64", "armhf"].contains(&a))
    {
        return Err("the file name has no `.deb`: expected `name_version_arch.deb`".into());
    }
    Err("expected a file name ending in `.rpm` or `.deb`".into())
}

/// Reads one list of package files (`packages`, or the tracker's `externals`) into
/// `packages`. An external that is also in the package list marks that package external.
fn read_packages(
    cx: &mut Ctx<'_>,
    node: &Node,
    list: &str,
    external: bool,
    packages: &mut Vec<(Package, Pos)>,
) {
    for (i, item) in cx
        .items(node, list, limits::MAX_PACKAGES)
        .into_iter()
        .enumerate()
    {
        let field = format!("{list}[{i}]");
        let (file_node, sha_node, repo_node, url_node) = match &item.value {
            Value::Map(_) => {
                let Some(entries) =
                    cx.entries(item, &field, &["file", "sha256", "repository", "url"])
                else {
                    continue;
                };
                let Some((_, file_node)) = entries.get("file") else {
                    cx.err(
                        item.pos,
                        join(&field, "file"),
                        "required field `file` (the package file name) is missing",
                    );
                    continue;
                };
                (
                    *file_node,
                    entries.get("sha256").map(|e| e.1),
                    entries.get("repository").map(|e| e.1),
                    entries.get("url").map(|e| e.1),
                )
            }
            _ => (item, None, None, None),
        };
        let file_field = if matches!(item.value, Value::Map(_)) {
            join(&field, "file")
        } else {
            field.clone()
        };
        let Some(file) = cx.text(file_node, &file_field, "a package file name") else {
            continue;
        };
        let file = file.trim();
        if file.chars().count() > limits::MAX_NAME_CHARS {
            cx.err(
                file_node.pos,
                file_field,
                format!(
                    "package file name is longer than {} characters",
                    limits::MAX_NAME_CHARS
                ),
            );
            continue;
        }
        let parsed = match parse_package_file(file) {
            Ok(parsed) => Some(parsed),
            Err(why) => {
                cx.err(
                    file_node.pos,
                    file_field.clone(),
                    format!("`{}`: {why}", shorten(file)),
                );
                None
            }
        };
        let sha256 = match sha_node.filter(|n| n.value != Value::Null) {
            None => None,
            Some(n) => {
                let f = join(&field, "sha256");
                cx.text(n, &f, "a SHA-256 digest").and_then(|s| {
                    let s = s.trim();
                    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
                        Some(s.to_ascii_lowercase())
                    } else {
                        cx.err(
                            n.pos,
                            f,
                            format!("expected 64 hexadecimal digits, found `{}`", shorten(s)),
                        );
                        None
                    }
                })
            }
        };
        let repo = repo_node.filter(|n| n.value != Value::Null);
        let url = url_node.filter(|n| n.value != Value::Null);
        let source = match (repo, url) {
            (Some(r), Some(_)) => {
                cx.err(
                    r.pos,
                    join(&field, "repository"),
                    "give either `repository` or `url`, not both",
                );
                None
            }
            (Some(n), None) => {
                let f = join(&field, "repository");
                cx.line(n, &f, "a repository path", limits::MAX_NAME_CHARS)
                    .and_then(|p| match check_path(p, false) {
                        Ok(()) => Some(PackageSource::Repository(p.to_string())),
                        Err(why) => {
                            cx.err(n.pos, f, format!("repository path `{}` {why}", shorten(p)));
                            None
                        }
                    })
            }
            (None, Some(n)) => {
                let f = join(&field, "url");
                cx.line(n, &f, "a URL", limits::MAX_URL_CHARS)
                    .and_then(|u| {
                        let rest = u
                            .strip_prefix("https://")
                            .or_else(|| u.strip_prefix("http://"));
                        match rest {
                            Some(rest)
                                if !rest.is_empty()
                                    && !rest.starts_with('/')
                                    && !u.chars().any(char::is_whitespace) =>
                            {
                                match url_problem(rest) {
                                    None => Some(PackageSource::Url(u.to_string())),
                                    Some(why) => {
                                        cx.err(n.pos, f, why);
                                        None
                                    }
                                }
                            }
                            _ => {
                                cx.err(
                                    n.pos,
                                    f,
                                    format!(
                                        "expected an http:// or https:// URL, found `{}`",
                                        shorten(u)
                                    ),
                                );
                                None
                            }
                        }
                    })
            }
            (None, None) => Some(PackageSource::Release),
        };
        let (
            Some(PackageFileName {
                name,
                version,
                release: rel,
                arch,
                format: pformat,
            }),
            Some(source),
        ) = (parsed, source)
        else {
            continue;
        };
        if external && let Some((p, _)) = packages.iter_mut().find(|(p, _)| p.file == file) {
            // Listed under RPM names and under Externals: one package, from outside.
            p.external = true;
            continue;
        }
        if let Some((_, first)) = packages.iter().find(|(p, _)| p.file == file) {
            cx.err(
                file_node.pos,
                file_field,
                format!("package {file} is listed twice (first at {first})"),
            );
            continue;
        }
        if let Some((other, first)) = packages
            .iter()
            .find(|(p, _)| p.name == name && p.arch == arch && p.format == pformat)
        {
            cx.err(
                file_node.pos,
                file_field,
                format!(
                    "package {name} ({arch}) is listed twice, as {} (at {first}) and as {file}",
                    other.file
                ),
            );
            continue;
        }
        if external {
            cx.warn(
                file_node.pos,
                file_field.clone(),
                format!("{file} is listed under Externals but not under RPM names"),
            );
        }
        packages.push((
            Package {
                file: file.to_string(),
                name,
                version,
                release: rel,
                arch,
                format: pformat,
                source,
                sha256,
                external,
            },
            file_node.pos,
        ));
    }
}

/// Converts and validates one record tree.
/// Returns the record with its warnings, or every error.
pub fn record_from_tree(
    tree: &Node,
    catalogue: &Catalogue,
    format: SourceFormat,
) -> Result<(PatchRecord, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut cx = Ctx {
        errors: Vec::new(),
        warnings: Vec::new(),
        catalogue,
        format,
    };
    let Some(fields) = cx.fields(tree) else {
        return Err(cx.errors);
    };
    let get = |name: &str| fields.get(name).map(|(_, node)| *node);

    // Required fields.
    for required in [
        "id",
        "revision",
        "title",
        "release",
        "platforms",
        "node_types",
        "submitter",
    ] {
        let missing = match get(required) {
            None => true,
            Some(node) => match &node.value {
                Value::Null => true,
                Value::Seq(items) => items.is_empty(),
                _ => false,
            },
        };
        if missing {
            let pos = fields.get(required).map_or(tree.pos, |(key, _)| key.pos);
            cx.err(
                pos,
                required,
                format!(
                    "required field `{}` is missing or empty",
                    cx.spelled(required)
                ),
            );
        }
    }

    let id = get("id")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| cx.number(n, "id", "a patch id", 1 << 53));
    let revision = get("revision")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| cx.number(n, "revision", "a revision", 1_000_000));
    let title = get("title")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| cx.line(n, "title", "a title", limits::MAX_TITLE_CHARS))
        .map(str::to_string);
    let status = match get("status").filter(|n| n.value != Value::Null) {
        None => Some("Ready for Certification".to_string()),
        Some(n) => cx
            .line(n, "status", "a status", limits::MAX_NAME_CHARS)
            .and_then(|s| match super::labels::status(s) {
                Some((known, _)) => Some(known.to_string()),
                None => {
                    let names: Vec<&str> =
                        super::labels::STATUSES.iter().map(|(k, _)| *k).collect();
                    let hint = super::labels::hint(s, names.iter().copied(), &names);
                    cx.err(
                        n.pos,
                        "status",
                        format!("unknown status `{}` ({hint})", shorten(s)),
                    );
                    None
                }
            }),
    };
    let mut release_update = None;
    let release: Option<&Release> =
        get("release")
            .filter(|n| n.value != Value::Null)
            .and_then(|n| {
                let s = cx.line(n, "release", "a release", limits::MAX_NAME_CHARS)?;
                let known: Vec<&str> = catalogue
                    .releases
                    .iter()
                    .map(|r| r.label.as_str())
                    .collect();
                let spelled = match super::labels::release(s) {
                    Ok(spelled) => spelled,
                    Err(why) => {
                        let hint = format!("expected one of: {}", known.join(", "));
                        cx.err(
                            n.pos,
                            "release",
                            format!("unknown release `{}`: {why} ({hint})", shorten(s)),
                        );
                        return None;
                    }
                };
                match catalogue.release(&spelled.name) {
                    Some(r) => {
                        release_update = spelled.update;
                        Some(r)
                    }
                    None => {
                        // Release numbers one digit apart are different releases: no guess.
                        let hint = format!("expected one of: {}", known.join(", "));
                        cx.err(
                            n.pos,
                            "release",
                            format!("unknown release `{}` ({hint})", shorten(s)),
                        );
                        None
                    }
                }
            });

    // Platforms.
    let mut platforms: Vec<(String, Pos)> = Vec::new();
    if let Some(node) = get("platforms") {
        for (i, item) in cx
            .items(node, "platforms", limits::MAX_PLATFORMS)
            .into_iter()
            .enumerate()
        {
            let field = format!("platforms[{i}]");
            let Some(label) = cx.line(item, &field, "a platform label", limits::MAX_NAME_CHARS)
            else {
                continue;
            };
            // The tracker's and the build system's spellings name the catalogue's label.
            let Some(platform) = cx.catalogue.platform_spelled(label) else {
                let known: Vec<&str> = cx
                    .catalogue
                    .platforms
                    .iter()
                    .map(|p| p.label.as_str())
                    .collect();
                let spellings = cx
                    .catalogue
                    .platforms
                    .iter()
                    .flat_map(|p| std::iter::once(&p.label).chain(&p.aliases))
                    .map(String::as_str);
                let hint = match super::labels::nearest(label, spellings) {
                    Some(near) => {
                        let of = cx
                            .catalogue
                            .platform_spelled(near)
                            .map_or(near, |p| p.label.as_str());
                        let near = if of == near {
                            format!("`{near}`")
                        } else {
                            format!("`{near}` ({of})")
                        };
                        format!("did you mean {near}? known: {}", known.join(", "))
                    }
                    None => format!("expected one of: {}", known.join(", ")),
                };
                cx.err(
                    item.pos,
                    field,
                    format!("unknown platform `{}` ({hint})", shorten(label)),
                );
                continue;
            };
            let label = platform.label.clone();
            if let Some(r) = release
                && !r.platforms.contains(&label)
            {
                cx.err(
                    item.pos,
                    field,
                    format!(
                        "platform {label} is not supported by {} (supported: {})",
                        r.label,
                        r.platforms.join(", ")
                    ),
                );
                continue;
            }
            if let Some((_, first)) = platforms.iter().find(|(p, _)| *p == label) {
                cx.err(
                    item.pos,
                    field,
                    format!("platform {label} is listed twice (first at {first})"),
                );
                continue;
            }
            platforms.push((label, item.pos));
        }
    }

    // Node types.
    let mut node_types: Vec<(String, Pos)> = Vec::new();
    if let Some(node) = get("node_types") {
        for (i, item) in cx
            .items(node, "node_types", limits::MAX_NODE_TYPES)
            .into_iter()
            .enumerate()
        {
            let field = format!("node_types[{i}]");
            let Some(name) = cx.line(item, &field, "a node type", limits::MAX_NAME_CHARS) else {
                continue;
            };
            let Some(r) = release else {
                // The release is wrong or missing: still say whether the name is a node type
                // of any release, so one round lists every error.
                let releases = &cx.catalogue.releases;
                if !releases
                    .iter()
                    .any(|r| r.node_type(name).is_some() || r.known_unbuilt(name))
                {
                    let names = releases
                        .iter()
                        .flat_map(|r| &r.node_types)
                        .flat_map(|n| std::iter::once(&n.name).chain(&n.aliases))
                        .map(String::as_str);
                    let hint = match super::labels::nearest(name, names) {
                        Some(near) => format!(" (did you mean `{near}`?)"),
                        None => String::new(),
                    };
                    cx.err(
                        item.pos,
                        field,
                        format!(
                            "unknown node type `{}` in every release{hint}",
                            shorten(name)
                        ),
                    );
                }
                continue;
            };
            let Some(nt) = r.node_type(name) else {
                if r.known_unbuilt(name) {
                    cx.err(
                        item.pos,
                        field,
                        format!(
                            "node type {} of {}: known gLite node type, not built by this catalogue's recipes",
                            shorten(name),
                            r.label
                        ),
                    );
                    continue;
                }
                let known: Vec<&str> = r.node_types.iter().map(|n| n.name.as_str()).collect();
                let names = r
                    .node_types
                    .iter()
                    .flat_map(|n| std::iter::once(&n.name).chain(&n.aliases))
                    .map(String::as_str);
                let hint = super::labels::hint(name, names, &known);
                cx.err(
                    item.pos,
                    field,
                    format!(
                        "unknown node type `{}` for {} ({hint})",
                        shorten(name),
                        r.label,
                    ),
                );
                continue;
            };
            if let Some((_, first)) = node_types.iter().find(|(n, _)| *n == nt.name) {
                cx.err(
                    item.pos,
                    field,
                    format!("node type {} is listed twice (first at {first})", nt.name),
                );
                continue;
            }
            // Platforms and node types are independent lists, as in the tracker: the record's
            // targets are the combinations the catalogue offers. A node type offered on none of
            // the record's platforms is an error; one offered on some is certified on those.
            if !platforms.is_empty() && !platforms.iter().any(|(p, _)| nt.available_on(r, p)) {
                let listed: Vec<&str> = platforms.iter().map(|(p, _)| p.as_str()).collect();
                let built: Vec<&str> = r
                    .platforms
                    .iter()
                    .filter(|p| nt.available_on(r, p))
                    .map(String::as_str)
                    .collect();
                cx.err(
                    item.pos,
                    field.clone(),
                    if listed.len() == 1 {
                        format!(
                            "node type {} of {} is not available on {}",
                            nt.name, r.label, listed[0]
                        )
                    } else {
                        format!(
                            "node type {} of {} is available on none of {} (it is built for {})",
                            nt.name,
                            r.label,
                            listed.join(", "),
                            built.join(", ")
                        )
                    },
                );
            }
            node_types.push((nt.name.clone(), item.pos));
        }
        // A platform on which none of the record's node types is offered has no target.
        if let Some(r) = release
            && !node_types.is_empty()
        {
            for (i, (platform, pos)) in platforms.iter().enumerate() {
                let offered = node_types.iter().any(|(n, _)| {
                    r.node_type(n)
                        .is_some_and(|nt| nt.available_on(r, platform))
                });
                // Reported once, with the node type's error, when there is a single platform.
                if !offered && platforms.len() > 1 {
                    let names: Vec<&str> = node_types.iter().map(|(n, _)| n.as_str()).collect();
                    cx.err(
                        *pos,
                        format!("platforms[{i}]"),
                        format!(
                            "platform {platform} offers none of the record's node types in {} ({})",
                            r.label,
                            names.join(", ")
                        ),
                    );
                }
            }
        }
    }

    // Bugs.
    let mut bugs: Vec<(Bug, Pos)> = Vec::new();
    if let Some(node) = get("bugs") {
        for (i, item) in cx
            .items(node, "bugs", limits::MAX_BUGS)
            .into_iter()
            .enumerate()
        {
            let field = format!("bugs[{i}]");
            let (id_node, title_node, test_node) = match &item.value {
                Value::Map(_) => {
                    let Some(entries) =
                        cx.entries(item, &field, &["id", "title", "regression_test"])
                    else {
                        continue;
                    };
                    let Some((_, id_node)) = entries.get("id") else {
                        cx.err(
                            item.pos,
                            join(&field, "id"),
                            "required field `id` is missing",
                        );
                        continue;
                    };
                    (
                        *id_node,
                        entries.get("title").map(|e| e.1),
                        entries.get("regression_test").map(|e| e.1),
                    )
                }
                _ => (item, None, None),
            };
            let id_field = if matches!(item.value, Value::Map(_)) {
                join(&field, "id")
            } else {
                field.clone()
            };
            let id = cx.number(id_node, &id_field, "a bug id", 1 << 53);
            let title = title_node
                .filter(|n| n.value != Value::Null)
                .and_then(|n| {
                    cx.line(
                        n,
                        &join(&field, "title"),
                        "a bug title",
                        limits::MAX_TITLE_CHARS,
                    )
                })
                .map(str::to_string);
            let regression_test = match test_node.filter(|n| n.value != Value::Null) {
                None => None,
                Some(n) => {
                    let f = join(&field, "regression_test");
                    match cx.line(n, &f, "a regression test name", limits::MAX_NAME_CHARS) {
                        Some(t) => match check_path(t, false) {
                            Ok(()) => Some(t.to_string()),
                            Err(why) => {
                                cx.err(n.pos, f, format!("regression test `{}` {why}", shorten(t)));
                                None
                            }
                        },
                        None => None,
                    }
                }
            };
            let Some(id) = id else { continue };
            if let Some((_, first)) = bugs.iter().find(|(b, _)| b.id == id) {
                cx.err(
                    item.pos,
                    id_field,
                    format!("bug {id} is listed twice (first at {first})"),
                );
                continue;
            }
            bugs.push((
                Bug {
                    id,
                    title,
                    regression_test,
                },
                item.pos,
            ));
        }
    }

    // Packages, then the externals (which the tracker lists under RPM names too).
    let mut packages: Vec<(Package, Pos)> = Vec::new();
    if let Some(node) = get("packages") {
        read_packages(&mut cx, node, "packages", false, &mut packages);
    }
    if let Some(node) = get("externals") {
        read_packages(&mut cx, node, "externals", true, &mut packages);
    }

    // Packages against platforms: each package must install on at least one
    // platform of its family, and each platform needs a package of its family.
    let families: Vec<(&String, PackageFormat, &Pos)> = platforms
        .iter()
        .filter_map(|(label, pos)| cx.catalogue.platform(label).map(|p| (label, p.family, pos)))
        .collect();
    for (i, (package, pos)) in packages.iter().enumerate() {
        let field = format!("packages[{i}]");
        let same_family: Vec<&&String> = families
            .iter()
            .filter(|(_, f, _)| *f == package.format)
            .map(|(l, _, _)| l)
            .collect();
        if same_family.is_empty() {
            if !families.is_empty() {
                let listed: Vec<String> = families
                    .iter()
                    .map(|(l, f, _)| format!("{l} ({f})"))
                    .collect();
                cx.err(
                    *pos,
                    field,
                    format!(
                        "{} is {} package but no platform of this patch takes {} packages (platforms: {})",
                        package.file,
                        package.format.with_article(),
                        package.format.family_name(),
                        listed.join(", ")
                    ),
                );
            }
            continue;
        }
        let installable = same_family.iter().any(|label| {
            cx.catalogue
                .platform(label)
                .is_some_and(|p| p.package_archs.contains(&package.arch))
        });
        if !installable {
            let labels: Vec<&str> = same_family.iter().map(|l| l.as_str()).collect();
            cx.err(
                *pos,
                field,
                format!(
                    "architecture {} of {} does not install on any platform of this patch ({})",
                    package.arch,
                    package.file,
                    labels.join(", ")
                ),
            );
        }
    }
    if !packages.is_empty() {
        for (i, (label, family, pos)) in families.iter().enumerate() {
            if !packages.iter().any(|(p, _)| p.format == *family) {
                cx.err(
                    **pos,
                    format!("platforms[{i}]"),
                    format!(
                        "platform {label} takes {} packages, but the patch lists none",
                        family.family_name()
                    ),
                );
                continue;
            }
            // Else its patch layer would install nothing, and the target would be certified
            // on the bare baseline.
            let archs = cx
                .catalogue
                .platform(label)
                .map(|p| p.package_archs.clone())
                .unwrap_or_default();
            if !packages
                .iter()
                .any(|(p, _)| p.format == *family && archs.contains(&p.arch))
            {
                cx.err(
                    **pos,
                    format!("platforms[{i}]"),
                    format!(
                        "none of the patch's packages installs on {label} (it takes {}): its image would be the baseline's",
                        archs.join(", ")
                    ),
                );
            }
        }
    }

    // Configuration changes.
    let mut config_changes: Vec<(ConfigChange, Pos)> = Vec::new();
    if let Some(node) = get("config_changes") {
        for (i, item) in cx
            .items(node, "config_changes", limits::MAX_CONFIG_CHANGES)
            .into_iter()
            .enumerate()
        {
            let field = format!("config_changes[{i}]");
            let Some(entries) = cx.entries(item, &field, &["file", "key", "value"]) else {
                continue;
            };
            let mut missing = false;
            for required in ["file", "key", "value"] {
                if !entries.contains_key(required) {
                    cx.err(
                        item.pos,
                        join(&field, required),
                        format!("required field `{required}` is missing"),
                    );
                    missing = true;
                }
            }
            if missing {
                continue;
            }
            let (file_node, key_node, value_node) =
                (entries["file"].1, entries["key"].1, entries["value"].1);
            let file = cx
                .line(
                    file_node,
                    &join(&field, "file"),
                    "a configuration file",
                    limits::MAX_NAME_CHARS,
                )
                .and_then(|f| match check_path(f, true) {
                    Ok(()) => Some(f.to_string()),
                    Err(why) => {
                        cx.err(
                            file_node.pos,
                            join(&field, "file"),
                            format!("configuration file `{}` {why}", shorten(f)),
                        );
                        None
                    }
                });
            let key = cx.line(key_node, &join(&field, "key"), "a configuration key", limits::MAX_NAME_CHARS).and_then(|k| {
                let ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
                if ok {
                    Some(k.to_string())
                } else {
                    cx.err(
                        key_node.pos,
                        join(&field, "key"),
                        format!("`{}` is not a valid key (letters, digits, `_`, `.`, `-`; starting with a letter or `_`)", shorten(k)),
                    );
                    None
                }
            });
            let value = match &value_node.value {
                Value::Null => Some(String::new()),
                _ => cx
                    .text(value_node, &join(&field, "value"), "a value")
                    .and_then(|v| {
                        if let Some(c) = v.chars().find(|c| c.is_control()) {
                            cx.err(
                                value_node.pos,
                                join(&field, "value"),
                                format!(
                                    "control character {} is not allowed in a value",
                                    c.escape_unicode()
                                ),
                            );
                            None
                        } else if v.chars().count() > limits::MAX_VALUE_CHARS {
                            cx.err(
                                value_node.pos,
                                join(&field, "value"),
                                format!(
                                    "value is longer than {} characters",
                                    limits::MAX_VALUE_CHARS
                                ),
                            );
                            None
                        } else {
                            Some(v.trim().to_string())
                        }
                    }),
            };
            let (Some(file), Some(key), Some(value)) = (file, key, value) else {
                continue;
            };
            // `site-info.def` is YAIM's `/opt/glite/yaim/etc/site-info.def`: one file, two
            // spellings (how the imager places a relative name).
            let in_image = |f: &str| match f.strip_prefix('/') {
                Some(abs) => abs.to_string(),
                None => format!("{}/{f}", certo_imager::request::YAIM_ETC),
            };
            if let Some((other, first)) = config_changes
                .iter()
                .find(|(c, _)| in_image(&c.file) == in_image(&file) && c.key == key)
            {
                let same = if other.file == file {
                    String::new()
                } else {
                    format!(" (as {}: the same file)", other.file)
                };
                cx.err(
                    item.pos,
                    field,
                    format!("{key} in {file} is changed twice (first at {first}{same})"),
                );
                continue;
            }
            config_changes.push((ConfigChange { file, key, value }, item.pos));
        }
    }
    // Metapackage changes: `NODE_TYPE: FILE`, a package already in production that the
    // patch adds to that node type's metapackage.
    let mut metapackage_changes: Vec<super::MetapackageChange> = Vec::new();
    if let Some(node) = get("metapackage_changes") {
        for (i, item) in cx
            .items(node, "metapackage_changes", limits::MAX_PACKAGES)
            .into_iter()
            .enumerate()
        {
            let field = format!("metapackage_changes[{i}]");
            let Some(entries) = cx.entries(item, &field, &["node_type", "file"]) else {
                continue;
            };
            let (Some((_, nt_node)), Some((_, file_node))) =
                (entries.get("node_type"), entries.get("file"))
            else {
                cx.err(
                    item.pos,
                    field,
                    "expected `node_type` and `file` (text form: `NODE_TYPE: PACKAGE_FILE`)",
                );
                continue;
            };
            let nt_field = join(&field, "node_type");
            let file_field = join(&field, "file");
            let nt = cx.line(nt_node, &nt_field, "a node type", limits::MAX_NAME_CHARS);
            let file = cx.line(
                file_node,
                &file_field,
                "a package file name",
                limits::MAX_NAME_CHARS,
            );
            let (Some(nt), Some(file)) = (nt, file) else {
                continue;
            };
            let node_type = match release.map(|r| (r, r.node_type(nt))) {
                Some((_, Some(t))) => {
                    if !node_types.iter().any(|(n, _)| *n == t.name) {
                        cx.err(
                            nt_node.pos,
                            nt_field,
                            format!(
                                "node type {} is not among the patch's node types ({})",
                                t.name,
                                node_types
                                    .iter()
                                    .map(|(n, _)| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                        continue;
                    }
                    t.name.clone()
                }
                Some((r, None)) => {
                    cx.err(
                        nt_node.pos,
                        nt_field,
                        format!("unknown node type `{}` for {}", shorten(nt), r.label),
                    );
                    continue;
                }
                None => continue,
            };
            match parse_package_file(file) {
                Ok(p) => metapackage_changes.push(super::MetapackageChange {
                    node_type,
                    file: file.to_string(),
                    name: p.name,
                    version: p.version,
                    release: p.release,
                    arch: p.arch,
                }),
                Err(why) => cx.err(
                    file_node.pos,
                    file_field,
                    format!("`{}`: {why}", shorten(file)),
                ),
            }
        }
    }

    // The tracker's other fields, kept as they are written.
    let assigned_to = get("assigned_to")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| cx.line(n, "assigned_to", "a name", limits::MAX_NAME_CHARS))
        .map(str::to_string);
    let priority = get("priority")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| {
            let p = cx.line(n, "priority", "a priority", limits::MAX_NAME_CHARS)?;
            // `5 - Normal`: a digit, then the priority's name.
            let (digit, name) = p
                .split_once('-')
                .map(|(d, n)| (d.trim(), n.trim()))
                .unwrap_or((p, ""));
            if digit.len() == 1 && digit.as_bytes()[0].is_ascii_digit() {
                Some(if name.is_empty() {
                    digit.to_string()
                } else {
                    format!("{digit} - {name}")
                })
            } else {
                cx.err(
                    n.pos,
                    "priority",
                    format!(
                        "expected a priority such as `5 - Normal` or `9 - Immediate`, found `{}`",
                        shorten(p)
                    ),
                );
                None
            }
        });
    let release_path = get("release_path")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| {
            let p = cx.line(n, "release_path", "a release path", limits::MAX_NAME_CHARS)?;
            match p.to_ascii_lowercase().as_str() {
                "standard" => Some(super::ReleasePath::Standard),
                "internal" => Some(super::ReleasePath::Internal),
                _ => {
                    cx.err(
                        n.pos,
                        "release_path",
                        format!(
                            "unknown release path `{}` (expected Standard or Internal)",
                            shorten(p)
                        ),
                    );
                    None
                }
            }
        });
    // An explicit opt-in: `true`/`allowed`/`yes`, or `false`/`refused`/`no` (the default).
    let allow_downgrade = get("allow_downgrade")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| {
            let v = cx.line(n, "allow_downgrade", "`allowed` or `refused`", limits::MAX_NAME_CHARS)?;
            match super::labels::normalise(v).as_str() {
                "true" | "yes" | "allowed" | "allow" => Some(true),
                "false" | "no" | "refused" | "not allowed" => Some(false),
                _ => {
                    cx.err(
                        n.pos,
                        "allow_downgrade",
                        format!(
                            "expected `allowed` (or `true`) to let the patch downgrade an installed package, or `refused` (or `false`), found `{}`",
                            shorten(v)
                        ),
                    );
                    None
                }
            }
        })
        .unwrap_or(false);
    let mut free_text = |field: &str, what: &str| -> String {
        get(field)
            .filter(|n| n.value != Value::Null)
            .and_then(|n| cx.free_text(n, field, what))
            .unwrap_or_default()
    };
    let release_notes = free_text("release_notes", "the release notes");
    let installation = free_text("installation", "the installation notes");
    let certification_report = free_text("certification_report", "the certification report");

    // Legal, but worth a look.
    let archs: Vec<&str> = {
        let mut a: Vec<&str> = platforms
            .iter()
            .filter_map(|(l, _)| cx.catalogue.platform(l).map(|p| p.arch.as_str()))
            .collect();
        a.sort_unstable();
        a.dedup();
        a
    };
    if archs.len() > 1
        && let Some(node) = get("platforms")
    {
        cx.warn(
            node.pos,
            "platforms",
            format!(
                "the record spans {} architectures ({}): the tracker opens one patch per architecture",
                archs.len(),
                archs.join(", ")
            ),
        );
    }

    let count = |name: &str| {
        get(name).map_or(0, |n| match &n.value {
            Value::Seq(items) => items.len(),
            Value::Null => 0,
            _ => 1,
        })
    };
    let reported = cx.errors.iter().any(|e| {
        [
            "packages",
            "externals",
            "metapackage_changes",
            "config_changes",
        ]
        .iter()
        .any(|f| e.field.starts_with(f))
    });
    if count("packages")
        + count("externals")
        + count("metapackage_changes")
        + count("config_changes")
        == 0
        && !reported
    {
        cx.err(tree.pos, "packages", CHANGES_NOTHING);
    }

    let submitter = get("submitter")
        .filter(|n| n.value != Value::Null)
        .and_then(|n| {
            let s = cx.line(n, "submitter", "a submitter", 64)?;
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
            {
                Some(s.to_string())
            } else {
                cx.err(
                    n.pos,
                    "submitter",
                    format!(
                        "`{}` is not a valid user name (letters, digits, `.`, `_`, `-`, `@`)",
                        shorten(s)
                    ),
                );
                None
            }
        });
    let description = match get("description").filter(|n| n.value != Value::Null) {
        None => Some(String::new()),
        Some(n) => cx.text(n, "description", "a description").and_then(|d| {
            if let Some(c) = d
                .chars()
                .find(|c| c.is_control() && *c != '\n' && *c != '\t')
            {
                cx.err(
                    n.pos,
                    "description",
                    format!(
                        "control character {} is not allowed in the description",
                        c.escape_unicode()
                    ),
                );
                None
            } else if d.chars().count() > limits::MAX_DESCRIPTION_CHARS {
                cx.err(
                    n.pos,
                    "description",
                    format!(
                        "description is longer than {} characters",
                        limits::MAX_DESCRIPTION_CHARS
                    ),
                );
                None
            } else {
                // Canonical form: no trailing white space on any line, no
                // blank lines before or after (the text form cannot keep them).
                let lines: Vec<&str> = d.lines().map(str::trim_end).collect();
                Some(lines.join("\n").trim_matches('\n').to_string())
            }
        }),
    };

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    match (id, revision, title, status, release, submitter, description) {
        (
            Some(id),
            Some(revision),
            Some(title),
            Some(status),
            Some(release),
            Some(submitter),
            Some(description),
        ) => Ok(PatchRecord {
            id,
            revision: u32::try_from(revision).unwrap_or(u32::MAX),
            title,
            status,
            release: release.name.clone(),
            platforms: platforms.into_iter().map(|(p, _)| p).collect(),
            node_types: node_types.into_iter().map(|(n, _)| n).collect(),
            bugs: bugs.into_iter().map(|(b, _)| b).collect(),
            packages: packages.into_iter().map(|(p, _)| p).collect(),
            config_changes: config_changes.into_iter().map(|(c, _)| c).collect(),
            submitter,
            description,
            release_update,
            metapackage_changes,
            assigned_to,
            priority,
            release_path,
            release_notes,
            installation,
            certification_report,
            allow_downgrade,
        })
        .map(|r| (r, cx.warnings)),
        _ => {
            cx.err(tree.pos, "record", "the record is incomplete");
            Err(cx.errors)
        }
    }
}

/// What is wrong with a package URL after its `http(s)://`, if anything: credentials in
/// it (they would be stored and shown), a privileged port other than 80 and 443 (a package
/// server is no SSH or mail server), or `.`/`..` path segments (plain or percent-encoded).
fn url_problem(rest: &str) -> Option<String> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some((_, host)) = authority.rsplit_once('@') {
        // The credentials are not repeated in the message.
        return Some(format!(
            "a URL must not carry credentials (`***@{}`)",
            shorten(host)
        ));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
    {
        match port.parse::<u16>() {
            Ok(80 | 443) => {}
            Ok(p) if p >= 1024 => {}
            Ok(p) => {
                return Some(format!(
                    "`{}`: port {p} is not a package server's (80, 443 or 1024 and above)",
                    shorten(authority)
                ));
            }
            Err(_) => return Some(format!("`{}` is not a port number", shorten(port))),
        }
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    for segment in path.split('/') {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Some(format!(
                "`{}`: a URL path must not have `.` or `..` segments",
                shorten(path)
            ));
        }
    }
    None
}
