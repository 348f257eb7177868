//! The plain-text export of a Savannah-style tracker:
//!
//! ```text
//! Patch: 3456
//! Revision: 2
//! Platforms: sl5_x86_64, sl5_i386
//! RPMs:
//!   glite-yaim-core-4.0.12-1.noarch.rpm sha256:<64 hex>
//! Description:
//!   Free text.
//! ```
//!
//! A field starts at column 1 as `Key: value`; keys are case-insensitive; a list
//! item is an indented line. Several records in one file are separated by a
//! line holding only `---`. The parser turns each record into the same
//! positioned tree that YAML and JSON records produce, with the canonical field
//! names, so that one converter validates all three forms.

use super::doc::{Key, Node, Pos, Value};
use super::{Diagnostic, labels, limits};

/// How a text-form key maps to a record field, and how its values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One value on the key's line.
    Single,
    /// Comma-separated values, on the key's line and/or indented lines.
    List,
    /// Bugs: comma-separated `ID (title)` items.
    Bugs,
    /// Package files: one per indented line.
    Packages,
    /// Configuration changes: `FILE: KEY=VALUE`, one per indented line.
    ConfigChanges,
    /// Metapackage changes: `NODE_TYPE: FILE [FILE...]`, on the key's line or indented lines.
    MetapackageChanges,
    /// Free text: the key's line and every indented line after it.
    Text,
}

/// How each record field's values are written in the text form.
fn shape_of(field: &str) -> Shape {
    match field {
        "platforms" | "node_types" => Shape::List,
        "bugs" => Shape::Bugs,
        "packages" | "externals" => Shape::Packages,
        "config_changes" => Shape::ConfigChanges,
        "metapackage_changes" => Shape::MetapackageChanges,
        "description" | "release_notes" | "installation" | "certification_report" => Shape::Text,
        _ => Shape::Single,
    }
}

/// Text-form names of the record fields, for messages: the first label that names it.
pub fn text_key_for(field: &str) -> Option<&'static str> {
    let key = match field {
        "id" => "patch",
        "packages" => "rpms",
        "config_changes" => "configuration changes",
        "node_types" => "node types",
        _ => labels::LABELS.iter().find(|(_, f)| *f == field)?.0,
    };
    Some(key)
}

struct Field {
    key: Key,
    canonical: &'static str,
    shape: Shape,
    node: Node,
    /// For free text: the lines gathered so far, with the indentation of each.
    text_lines: Vec<(usize, String)>,
    pending_blank: usize,
}

fn scalar(text: &str, pos: Pos) -> Node {
    Node {
        pos,
        value: Value::Scalar {
            text: text.to_string(),
            quoted: false,
        },
    }
}

fn map(pos: Pos, entries: Vec<(&str, Node)>) -> Node {
    Node {
        pos,
        value: Value::Map(
            entries
                .into_iter()
                .map(|(name, node)| {
                    (
                        Key {
                            name: name.to_string(),
                            pos: node.pos,
                        },
                        node,
                    )
                })
                .collect(),
        ),
    }
}

/// Splits `s` on commas that are not inside parentheses; yields each trimmed
/// piece with its character offset in `s`.
fn split_commas<'s>(s: &'s str) -> Vec<(usize, &'s str)> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0usize;
    let bytes: Vec<(usize, char)> = s.char_indices().collect();
    let push = |from: usize, to: usize, out: &mut Vec<(usize, &'s str)>| {
        let piece = &s[from..to];
        let lead = piece.len() - piece.trim_start().len();
        let trimmed = piece.trim();
        if !trimmed.is_empty() {
            out.push((s[..from + lead].chars().count(), trimmed));
        }
    };
    for &(i, c) in &bytes {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth <= 0 => {
                push(start, i, &mut out);
                start = i + 1;
            }
            _ => {}
        }
    }
    push(start, s.len(), &mut out);
    out
}

/// Parses one bug item `ID (title)` or `ID`.
fn bug_item(item: &str, pos: Pos) -> Node {
    if let Some(open) = item.find('(') {
        let id = item[..open].trim();
        let rest = &item[open + 1..];
        if let Some(title) = rest.strip_suffix(')') {
            let title_col = pos.col + item[..open + 1].chars().count() as u32;
            return map(
                pos,
                vec![
                    ("id", scalar(id, pos)),
                    (
                        "title",
                        scalar(
                            title.trim(),
                            Pos {
                                line: pos.line,
                                col: title_col,
                            },
                        ),
                    ),
                ],
            );
        }
    }
    map(pos, vec![("id", scalar(item, pos))])
}

/// Whether a word names a package file (what the tracker lists, several to a line).
fn is_package_file(word: &str) -> bool {
    !word.contains(':') && (word.ends_with(".rpm") || word.ends_with(".deb"))
}

/// Splits on white space and commas; yields each word with its character offset.
fn split_words(s: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices().chain(std::iter::once((s.len(), ' '))) {
        let sep = c.is_whitespace() || c == ',';
        match (start, sep) {
            (None, false) => start = Some(i),
            (Some(from), true) => {
                out.push((s[..from].chars().count(), &s[from..i]));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// Parses one package item: `FILE [sha256:HEX] [repo:PATH | url:URL]` of list `list`.
fn package_item(
    item: &str,
    pos: Pos,
    errors: &mut Vec<Diagnostic>,
    list: &str,
    index: usize,
) -> Node {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    for (n, word) in item.split_whitespace().enumerate() {
        let at = item[offset..].find(word).map_or(offset, |i| offset + i);
        offset = at + word.len();
        let wpos = Pos {
            line: pos.line,
            col: pos.col + item[..at].chars().count() as u32,
        };
        if n == 0 {
            entries.push(("file", scalar(word, wpos)));
            continue;
        }
        let (tag, value) = match word.split_once(':') {
            Some((tag, value)) => (tag, value),
            None => ("", word),
        };
        let field = match tag {
            "sha256" => "sha256",
            "repo" | "repository" => "repository",
            // A URL's own scheme is the tag: `url:https://...` or plainly `https://...`.
            "url" => "url",
            "http" | "https" => {
                entries.push(("url", scalar(word, wpos)));
                continue;
            }
            _ => {
                errors.push(Diagnostic::new(
                    wpos,
                    format!("{list}[{index}]"),
                    format!(
                        "unexpected `{}` after the package file name (expected `sha256:HEX`, `repo:PATH` or `url:URL`)",
                        limits::shorten(word)
                    ),
                ));
                continue;
            }
        };
        if entries.iter().any(|(name, _)| *name == field) {
            errors.push(Diagnostic::new(
                wpos,
                format!("{list}[{index}].{field}"),
                format!("`{field}` given twice"),
            ));
            continue;
        }
        let vpos = Pos {
            line: wpos.line,
            col: wpos.col + tag.chars().count() as u32 + 1,
        };
        entries.push((field, scalar(value, vpos)));
    }
    map(pos, entries)
}

/// Parses one configuration change: `FILE: KEY=VALUE`.
fn config_item(item: &str, pos: Pos, errors: &mut Vec<Diagnostic>, index: usize) -> Option<Node> {
    let Some((file, setting)) = item.split_once(':') else {
        errors.push(Diagnostic::new(
            pos,
            format!("config_changes[{index}]"),
            "expected `FILE: KEY=VALUE`, found no `:` after a file name".to_string(),
        ));
        return None;
    };
    let setting_offset = file.chars().count() + 1 + (setting.len() - setting.trim_start().len());
    let spos = Pos {
        line: pos.line,
        col: pos.col + setting_offset as u32,
    };
    let setting = setting.trim();
    let Some((key, value)) = setting.split_once('=') else {
        errors.push(Diagnostic::new(
            spos,
            format!("config_changes[{index}]"),
            format!(
                "expected `KEY=VALUE` after `{}:`, found `{}`",
                limits::shorten(file.trim()),
                limits::shorten(setting)
            ),
        ));
        return None;
    };
    let vpos = Pos {
        line: spos.line,
        col: spos.col + key.chars().count() as u32 + 1,
    };
    Some(map(
        pos,
        vec![
            ("file", scalar(file.trim(), pos)),
            ("key", scalar(key.trim(), spos)),
            ("value", scalar(value.trim(), vpos)),
        ],
    ))
}

impl Field {
    fn items_len(&self) -> usize {
        match &self.node.value {
            Value::Seq(items) => items.len(),
            _ => 0,
        }
    }

    fn push_item(&mut self, node: Node) {
        if let Value::Seq(items) = &mut self.node.value {
            items.push(node);
        }
    }

    /// Adds the values found on one line (the key's own, or an indented one).
    fn add_line(&mut self, text: &str, pos: Pos, own_line: bool, errors: &mut Vec<Diagnostic>) {
        match self.shape {
            Shape::Single => {
                if own_line {
                    if !text.is_empty() {
                        self.node = scalar(text, pos);
                    }
                } else {
                    errors.push(Diagnostic::new(
                        pos,
                        self.canonical.to_string(),
                        format!(
                            "`{}` takes one value on its own line; indented lines are not allowed here",
                            limits::shorten(&self.key.name)
                        ),
                    ));
                }
            }
            Shape::List | Shape::Bugs => {
                for (offset, piece) in split_commas(text) {
                    let ipos = Pos {
                        line: pos.line,
                        col: pos.col + offset as u32,
                    };
                    let node = if self.shape == Shape::Bugs {
                        bug_item(piece, ipos)
                    } else {
                        scalar(piece, ipos)
                    };
                    self.push_item(node);
                }
            }
            Shape::Packages => {
                if text.is_empty() {
                    return;
                }
                // The tracker lists several files on a line (spaces or commas between them);
                // Certo's own form gives one file per line, with its tags after it.
                let words = split_words(text);
                if words.len() > 1 && words.iter().all(|(_, w)| is_package_file(w)) {
                    for (offset, word) in words {
                        let index = self.items_len();
                        let wpos = Pos {
                            line: pos.line,
                            col: pos.col + offset as u32,
                        };
                        let node = package_item(word, wpos, errors, self.canonical, index);
                        self.push_item(node);
                    }
                } else {
                    let index = self.items_len();
                    let node = package_item(text, pos, errors, self.canonical, index);
                    self.push_item(node);
                }
            }
            Shape::MetapackageChanges => {
                if text.is_empty() {
                    return;
                }
                let index = self.items_len();
                let Some((nt, files)) = text.split_once(':') else {
                    errors.push(Diagnostic::new(
                        pos,
                        format!("metapackage_changes[{index}]"),
                        "expected `NODE_TYPE: PACKAGE_FILE`, found no `:` after a node type"
                            .to_string(),
                    ));
                    return;
                };
                let base = nt.chars().count() + 1;
                for (offset, file) in split_words(files) {
                    let fpos = Pos {
                        line: pos.line,
                        col: pos.col + (base + offset) as u32,
                    };
                    let item = map(
                        pos,
                        vec![
                            ("node_type", scalar(nt.trim(), pos)),
                            ("file", scalar(file, fpos)),
                        ],
                    );
                    self.push_item(item);
                }
            }
            Shape::ConfigChanges => {
                if !text.is_empty() {
                    let index = self.items_len();
                    if let Some(node) = config_item(text, pos, errors, index) {
                        self.push_item(node);
                    }
                }
            }
            Shape::Text => {
                if text.is_empty() && own_line {
                    return;
                }
                if self.text_lines.is_empty() {
                    self.node.pos = pos;
                }
                for _ in 0..self.pending_blank {
                    self.text_lines.push((usize::MAX, String::new()));
                }
                self.pending_blank = 0;
                let indent = if own_line { 0 } else { pos.col as usize - 1 };
                self.text_lines.push((indent, text.to_string()));
            }
        }
    }

    fn finish(mut self) -> (Key, Node) {
        if self.shape == Shape::Text {
            // Dedent indented lines by their common indentation.
            let min = self
                .text_lines
                .iter()
                .filter(|(indent, text)| *indent != usize::MAX && *indent > 0 && !text.is_empty())
                .map(|(indent, _)| *indent)
                .min()
                .unwrap_or(0);
            let text: Vec<String> = self
                .text_lines
                .iter()
                .map(|(indent, text)| {
                    if *indent == usize::MAX || *indent == 0 {
                        text.clone()
                    } else {
                        format!("{}{}", " ".repeat(indent - min), text)
                    }
                })
                .collect();
            self.node.value = Value::Scalar {
                text: text.join("\n"),
                quoted: true,
            };
        }
        (
            Key {
                name: self.canonical.to_string(),
                pos: self.key.pos,
            },
            self.node,
        )
    }
}

/// A normalised label as a person writes it: its first letter capitalised.
pub fn spell_label(label: &str) -> String {
    let mut c = label.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// Parses a text-form file into one positioned tree per record. Errors found
/// while reading the text (unknown keys, malformed items) are returned along
/// with the trees; the converter adds the rest.
pub fn parse_text(src: &str) -> (Vec<Node>, Vec<Diagnostic>) {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let mut fields: Vec<(Key, Node)> = Vec::new();
    let mut current: Option<Field> = None;
    let mut record_pos: Option<Pos> = None;
    // Set while skipping the items of an unknown or repeated key.
    let mut skipping = false;

    let flush_record = |fields: &mut Vec<(Key, Node)>,
                        current: &mut Option<Field>,
                        record_pos: &mut Option<Pos>,
                        records: &mut Vec<Node>| {
        if let Some(field) = current.take() {
            fields.push(field.finish());
        }
        if let Some(pos) = record_pos.take() {
            records.push(Node {
                pos,
                value: Value::Map(std::mem::take(fields)),
            });
        }
    };

    for (n, raw) in src.split('\n').enumerate() {
        let line_no = n + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim() == "---" && !line.starts_with([' ', '\t']) {
            flush_record(&mut fields, &mut current, &mut record_pos, &mut records);
            skipping = false;
            continue;
        }
        if line.trim().is_empty() {
            if let Some(field) = current.as_mut()
                && field.shape == Shape::Text
                && !field.text_lines.is_empty()
            {
                field.pending_blank += 1;
            }
            continue;
        }
        let indent_chars = line.chars().take_while(|c| *c == ' ' || *c == '\t').count();
        let indent_bytes = line.len() - line.trim_start_matches([' ', '\t']).len();
        if indent_chars > 0 {
            // An item of the current field.
            let text = line[indent_bytes..].trim_end();
            let pos = Pos::new(line_no, indent_chars + 1);
            match current.as_mut() {
                Some(field) => field.add_line(text, pos, false, &mut errors),
                None if skipping => {}
                None => errors.push(Diagnostic::new(
                    pos,
                    String::new(),
                    "indented line outside of any field (a field starts at column 1 as `Key: value`)"
                        .to_string(),
                )),
            }
            continue;
        }
        // A new field: `Key: value`.
        if let Some(field) = current.take() {
            fields.push(field.finish());
        }
        skipping = false;
        let pos = Pos::new(line_no, 1);
        record_pos.get_or_insert(pos);
        let Some((raw_key, rest)) = line.split_once(':') else {
            errors.push(Diagnostic::new(
                pos,
                String::new(),
                format!(
                    "expected `Key: value`, found `{}`",
                    limits::shorten(line.trim_end())
                ),
            ));
            skipping = true;
            continue;
        };
        let canonical = match labels::field_of(raw_key) {
            Some(field) => field,
            None => {
                // A near miss is named, and read as what it probably meant, so that the
                // record's other errors (and not a "missing" one for that field) come out
                // in the same round; the record is refused for the unknown key anyway.
                let guess = labels::nearest_label(raw_key);
                errors.push(Diagnostic::new(
                    pos,
                    limits::shorten(raw_key.trim()),
                    match guess {
                        Some((label, _)) => format!(
                            "unknown key `{}` (did you mean `{}`?)",
                            limits::shorten(raw_key.trim()),
                            spell_label(label)
                        ),
                        None => format!(
                            "unknown key `{}` (expected one of: Patch, Revision, Title, Status, Release, Platforms, Node types, Bugs, RPMs, Configuration changes, Submitter, Description, Downgrade, or a tracker label such as Summary, Platform, Affected metapackages, RPM names, Externals, Metapackage changes, Associated bugs, Submitted by, Assigned to, Priority, Release Path, Release notes, Installation & configuration, Certification report)",
                            limits::shorten(raw_key.trim())
                        ),
                    },
                ));
                match guess {
                    Some((_, field)) if !fields.iter().any(|(k, _)| k.name == field) => field,
                    _ => {
                        skipping = true;
                        continue;
                    }
                }
            }
        };
        let shape = shape_of(canonical);
        if fields.iter().any(|(k, _)| k.name == canonical) {
            errors.push(Diagnostic::new(
                pos,
                canonical.to_string(),
                format!(
                    "`{}` given twice in one record",
                    limits::shorten(raw_key.trim())
                ),
            ));
            skipping = true;
            continue;
        }
        let lead = rest.len() - rest.trim_start().len();
        let value_pos = Pos::new(
            line_no,
            raw_key.chars().count() + 2 + rest[..lead].chars().count(),
        );
        let key = Key {
            name: raw_key.trim().to_string(),
            pos,
        };
        let node = match shape {
            Shape::Single | Shape::Text => Node {
                pos: value_pos,
                value: Value::Null,
            },
            _ => Node {
                pos: value_pos,
                value: Value::Seq(Vec::new()),
            },
        };
        let mut field = Field {
            key,
            canonical,
            shape,
            node,
            text_lines: Vec::new(),
            pending_blank: 0,
        };
        field.add_line(rest.trim(), value_pos, true, &mut errors);
        current = Some(field);
    }
    flush_record(&mut fields, &mut current, &mut record_pos, &mut records);
    (records, errors)
}
