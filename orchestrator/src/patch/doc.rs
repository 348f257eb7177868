//! A small document tree with source positions, built from YAML, JSON or the
//! tracker's text export, so that every validation error can name the line and
//! column of the value it is about, and so that all errors of a record can be
//! collected instead of stopping at the first one.

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::limits;

/// A position in a source file: 1-based line and 1-based column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub fn new(line: usize, col: usize) -> Pos {
        Pos {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            col: u32::try_from(col).unwrap_or(u32::MAX),
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A value of the document tree. Scalars keep their text: numbers, booleans
/// and strings are told apart by the field that reads them, not by the parser.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A scalar's text; `quoted` is true when the source quoted it.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A syntax error: where, and what the parser said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

impl SyntaxError {
    fn new(pos: Pos, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos,
            message: message.into(),
        }
    }
}

fn pos_of(span: &Span) -> Pos {
    Pos::new(span.start.line(), span.start.col() + 1)
}

/// Parses a YAML stream into one node per document.
///
/// Anchors, aliases and tags are refused outright: a patch record has no use
/// for them, and refusing them makes alias bombs impossible. Depth and the
/// number of nodes are bounded (see [`limits`]).
pub fn parse_yaml(src: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut parser = Parser::new_from_str(src);
    let mut docs = Vec::new();
    // Stack of open containers: (start position, items, pending key for maps).
    enum Open {
        Seq(Pos, Vec<Node>),
        Map(Pos, Vec<(Key, Node)>, Option<Key>),
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut nodes = 0usize;

    // Attaches a finished node to the innermost open container, or returns
    // it as a finished document when none is open.
    fn attach(stack: &mut [Open], node: Node) -> Result<Option<Node>, SyntaxError> {
        match stack.last_mut() {
            None => Ok(Some(node)),
            Some(Open::Seq(_, items)) => {
                items.push(node);
                Ok(None)
            }
            Some(Open::Map(_, entries, pending)) => match pending.take() {
                Some(key) => {
                    entries.push((key, node));
                    Ok(None)
                }
                None => match node.value {
                    Value::Scalar { text, .. } => {
                        if entries.iter().any(|(k, _)| k.name == text) {
                            return Err(SyntaxError::new(
                                node.pos,
                                format!("duplicate key `{}`", limits::shorten(&text)),
                            ));
                        }
                        *pending = Some(Key {
                            name: text,
                            pos: node.pos,
                        });
                        Ok(None)
                    }
                    Value::Null => {
                        *pending = Some(Key {
                            name: String::new(),
                            pos: node.pos,
                        });
                        Ok(None)
                    }
                    _ => Err(SyntaxError::new(
                        node.pos,
                        "mapping keys must be plain strings, not lists or mappings",
                    )),
                },
            },
        }
    }

    loop {
        let (event, span) = match parser.next_event() {
            None => break,
            Some(Err(e)) => {
                return Err(SyntaxError::new(
                    Pos::new(e.marker().line(), e.marker().col() + 1),
                    e.info().to_string(),
                ));
            }
            Some(Ok(ev)) => ev,
        };
        let pos = pos_of(&span);
        let finished = match event {
            Event::StreamStart | Event::DocumentStart(_) | Event::DocumentEnd | Event::Nothing => {
                None
            }
            Event::StreamEnd => break,
            Event::Alias(_) => {
                return Err(SyntaxError::new(
                    pos,
                    "YAML aliases are not accepted in patch records",
                ));
            }
            Event::Scalar(text, style, anchor, tag) => {
                if anchor != 0 {
                    return Err(SyntaxError::new(
                        pos,
                        "YAML anchors are not accepted in patch records",
                    ));
                }
                if let Some(tag) = tag {
                    let plain = tag.is_yaml_core_schema()
                        && matches!(
                            tag.suffix.as_str(),
                            "str" | "int" | "float" | "bool" | "null"
                        );
                    if !plain {
                        return Err(SyntaxError::new(
                            pos,
                            format!(
                                "YAML tag `{}` is not accepted",
                                limits::shorten(&format!("{}{}", tag.handle, tag.suffix))
                            ),
                        ));
                    }
                }
                nodes += 1;
                if nodes > limits::MAX_NODES {
                    return Err(SyntaxError::new(
                        pos,
                        format!("more than {} values in one file", limits::MAX_NODES),
                    ));
                }
                let quoted = style != ScalarStyle::Plain;
                let value = if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted,
                    }
                };
                attach(&mut stack, Node { pos, value })?
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if anchor != 0 {
                    return Err(SyntaxError::new(
                        pos,
                        "YAML anchors are not accepted in patch records",
                    ));
                }
                if tag.is_some() {
                    return Err(SyntaxError::new(pos, "YAML tags are not accepted here"));
                }
                if stack.len() >= limits::MAX_DEPTH {
                    return Err(SyntaxError::new(
                        pos,
                        format!("nesting deeper than {} levels", limits::MAX_DEPTH),
                    ));
                }
                nodes += 1;
                if matches!(&event, Event::SequenceStart(..)) {
                    stack.push(Open::Seq(pos, Vec::new()));
                } else {
                    stack.push(Open::Map(pos, Vec::new(), None));
                }
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match stack.pop() {
                    Some(Open::Seq(start, items)) => Node {
                        pos: start,
                        value: Value::Seq(items),
                    },
                    Some(Open::Map(start, entries, _)) => Node {
                        pos: start,
                        value: Value::Map(entries),
                    },
                    None => return Err(SyntaxError::new(pos, "unbalanced YAML structure")),
                };
                attach(&mut stack, node)?
            }
        };
        if let Some(doc) = finished {
            docs.push(doc);
        }
    }
    Ok(docs)
}
