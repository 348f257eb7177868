//! A strict JSON reader (RFC 8259) that builds the positioned document tree
//! of [`super::doc`] directly, so that a JSON record is read as JSON and not
//! through the YAML parser.
//!
//! The tree is the one the YAML path built for JSON input, position for
//! position: an object is a [`Value::Map`] at its `{`, each key at its opening
//! quote; an array is a [`Value::Seq`] at its `[`; a string is a quoted
//! [`Value::Scalar`] at its opening quote; a number, `true` and `false` are
//! unquoted scalars with their source text, at their first character; `null`
//! is [`Value::Null`]. Lines and columns are 1-based, columns in characters.
//!
//! What is accepted, exactly RFC 8259:
//!
//! - escapes `\" \\ \/ \b \f \n \r \t \uXXXX`; a UTF-16 surrogate pair
//!   (`\uD834\uDD1E`) is one character; a lone or mismatched surrogate is
//!   refused, as are control characters U+0000–U+001F written unescaped;
//! - numbers by the RFC's grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`;
//! - the literals `true`, `false` and `null`, in lower case;
//! - white space: space, tab, line feed and carriage return only;
//! - one value, with nothing but white space after it.
//!
//! A UTF-8 byte order mark at the very start is skipped (RFC 8259 §8.1 lets a
//! parser ignore one, and some exporters write it); positions count from the
//! character after it, as they do when [`super::load`] strips it first. A
//! byte order mark anywhere else is refused.
//!
//! A key given twice in one object is refused, at the second key, with the
//! YAML path's message (`duplicate key` and the key in backticks). Depth and the number of values are
//! bounded by [`limits::MAX_DEPTH`] and [`limits::MAX_NODES`], with the YAML
//! path's messages; the reader keeps its open containers on a stack of its
//! own and never recurses.
//!
//! Every error is positioned where the offending token starts: the character
//! that was not expected, the backslash of a bad escape, the first character
//! of a bad number or word, the second of two equal keys; an unterminated
//! string, array or object at the end of the file, naming where it was opened.

use std::collections::HashSet;

use super::doc::{Key, Node, Pos, SyntaxError, Value};
use super::limits;

/// Reads one JSON value, the whole of `src`.
/// Parses a JSON file of patch records: an object (one record) or an array of objects; any
/// other top-level value is one record (that the conversion then refuses).
pub fn parse_records(src: &str) -> Result<Vec<Node>, SyntaxError> {
    let doc = parse(src)?;
    match doc.value {
        Value::Seq(items) => Ok(items),
        _ => Ok(vec![doc]),
    }
}

pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut r = Reader::new(src);
    let mut stack: Vec<Frame> = Vec::new();
    // What the next value follows, for the message when it is missing.
    let mut after = After::Start;
    'value: loop {
        r.skip_ws();
        let pos = r.pos();
        let mut node = match r.peek() {
            Some(b'{') => {
                r.open(&stack, pos)?;
                r.bump();
                r.skip_ws();
                if r.peek() == Some(b'}') {
                    r.bump();
                    Node {
                        pos,
                        value: Value::Map(Vec::new()),
                    }
                } else {
                    stack.push(Frame::Object {
                        pos,
                        entries: Vec::new(),
                        names: HashSet::new(),
                        key: None,
                    });
                    let key = r.member_name(&mut stack, false)?;
                    r.colon(&stack)?;
                    if let Some(Frame::Object { key: slot, .. }) = stack.last_mut() {
                        *slot = Some(key);
                    }
                    after = After::Colon;
                    continue 'value;
                }
            }
            Some(b'[') => {
                r.open(&stack, pos)?;
                r.bump();
                r.skip_ws();
                if r.peek() == Some(b']') {
                    r.bump();
                    Node {
                        pos,
                        value: Value::Seq(Vec::new()),
                    }
                } else {
                    stack.push(Frame::Array {
                        pos,
                        items: Vec::new(),
                    });
                    after = After::Open;
                    continue 'value;
                }
            }
            Some(b'"') => {
                let text = r.string()?;
                r.count(pos)?;
                Node {
                    pos,
                    value: Value::Scalar { text, quoted: true },
                }
            }
            Some(b'-' | b'0'..=b'9') => {
                let text = r.number()?;
                r.count(pos)?;
                Node {
                    pos,
                    value: Value::Scalar {
                        text: text.to_string(),
                        quoted: false,
                    },
                }
            }
            Some(b) if b.is_ascii_alphabetic() => {
                let value = r.literal()?;
                r.count(pos)?;
                Node { pos, value }
            }
            _ => return Err(r.missing_value(&stack, after)),
        };
        // Attach the finished value to the innermost open container; close
        // every container that ends right after it.
        loop {
            match stack.last_mut() {
                None => {
                    r.skip_ws();
                    if r.peek().is_some() {
                        let hint = match r.peek() {
                            Some(b'{' | b'[') => {
                                " (a file holds one JSON value: put several records in one array)"
                            }
                            _ => "",
                        };
                        return Err(r.error(
                            r.pos(),
                            format!(
                                "trailing characters after the JSON value: found {}{hint}",
                                r.found()
                            ),
                        ));
                    }
                    return Ok(node);
                }
                Some(Frame::Array { items, .. }) => {
                    items.push(node);
                    r.skip_ws();
                    match r.peek() {
                        Some(b',') => {
                            r.bump();
                            after = After::ArrayComma;
                            continue 'value;
                        }
                        Some(b']') => {
                            r.bump();
                            let Some(Frame::Array { pos, items }) = stack.pop() else {
                                unreachable!("the innermost frame is this array");
                            };
                            node = Node {
                                pos,
                                value: Value::Seq(items),
                            };
                        }
                        _ => {
                            return Err(
                                r.unexpected(&stack, "expected ',' or ']' after an array element")
                            );
                        }
                    }
                }
                Some(Frame::Object { entries, key, .. }) => {
                    let Some(name) = key.take() else {
                        unreachable!("an object's value always follows its key");
                    };
                    entries.push((name, node));
                    r.skip_ws();
                    match r.peek() {
                        Some(b',') => {
                            r.bump();
                            let name = r.member_name(&mut stack, true)?;
                            r.colon(&stack)?;
                            if let Some(Frame::Object { key, .. }) = stack.last_mut() {
                                *key = Some(name);
                            }
                            after = After::Colon;
                            continue 'value;
                        }
                        Some(b'}') => {
                            r.bump();
                            let Some(Frame::Object { pos, entries, .. }) = stack.pop() else {
                                unreachable!("the innermost frame is this object");
                            };
                            node = Node {
                                pos,
                                value: Value::Map(entries),
                            };
                        }
                        _ => {
                            return Err(
                                r.unexpected(&stack, "expected ',' or '}' after an object member")
                            );
                        }
                    }
                }
            }
        }
    }
}

/// An open container.
enum Frame {
    Array {
        pos: Pos,
        items: Vec<Node>,
    },
    Object {
        pos: Pos,
        entries: Vec<(Key, Node)>,
        /// The names in `entries`, to refuse a second one in linear time.
        names: HashSet<String>,
        /// The key whose value is being read.
        key: Option<Key>,
    },
}

/// What a value that is about to be read follows.
#[derive(Clone, Copy)]
enum After {
    /// Nothing: the file's one value.
    Start,
    /// The `[` of an array.
    Open,
    /// A `,` between array elements.
    ArrayComma,
    /// The `:` after a member name.
    Colon,
}

struct Reader<'a> {
    src: &'a str,
    bytes: &'a [u8],
    /// Byte offset of the next character.
    at: usize,
    line: usize,
    col: usize,
    /// Values read so far (keys included, as the YAML path counts them).
    nodes: usize,
}

impl<'a> Reader<'a> {
    fn new(src: &'a str) -> Reader<'a> {
        let at = if src.starts_with('\u{feff}') { 3 } else { 0 };
        Reader {
            src,
            bytes: src.as_bytes(),
            at,
            line: 1,
            col: 1,
            nodes: 0,
        }
    }

    fn pos(&self) -> Pos {
        Pos::new(self.line, self.col)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn peek_char(&self) -> Option<char> {
        self.src[self.at..].chars().next()
    }

    /// Steps over one ASCII character other than a line feed.
    fn bump(&mut self) {
        self.at += 1;
        self.col += 1;
    }

    fn skip_ws(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b' ' | b'\t' | b'\r' => self.bump(),
                b'\n' => {
                    self.at += 1;
                    self.line += 1;
                    self.col = 1;
                }
                _ => break,
            }
        }
    }

    fn error(&self, pos: Pos, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos,
            message: message.into(),
        }
    }

    /// The next character as a message names it, with a hint when it is a
    /// common mistake.
    fn found(&self) -> String {
        match self.peek_char() {
            None => "the end of the file".to_string(),
            Some(c) => {
                let hint = match c {
                    '\'' => " (JSON strings are in double quotes)",
                    '/' | '#' => " (JSON has no comments)",
                    '\u{feff}' => " (a byte order mark is accepted only at the start of the file)",
                    c if c.is_whitespace() => {
                        " (JSON white space is only space, tab, line feed and carriage return)"
                    }
                    _ => "",
                };
                format!("{}{hint}", describe(c))
            }
        }
    }

    /// An unexpected character (or the end of the file) where `expected` was.
    fn unexpected(&self, stack: &[Frame], expected: &str) -> SyntaxError {
        if self.peek().is_none()
            && let Some(frame) = stack.last()
        {
            return self.unterminated(frame);
        }
        self.error(self.pos(), format!("{expected}, found {}", self.found()))
    }

    /// The end of the file inside an open container.
    fn unterminated(&self, frame: &Frame) -> SyntaxError {
        let (what, open, close, pos) = match frame {
            Frame::Array { pos, .. } => ("array", '[', ']', pos),
            Frame::Object { pos, .. } => ("object", '{', '}', pos),
        };
        self.error(
            self.pos(),
            format!(
                "unterminated {what}: the file ends before the '{close}' that closes the '{open}' at {pos}"
            ),
        )
    }

    /// No value where one was expected.
    fn missing_value(&self, stack: &[Frame], after: After) -> SyntaxError {
        let expected = match after {
            After::Start => "expected a JSON value",
            After::Open => "expected a value or ']'",
            After::ArrayComma => "expected a value after ','",
            After::Colon => "expected a value after ':'",
        };
        let hint = match (after, self.peek()) {
            (After::ArrayComma, Some(b']')) => " (JSON allows no comma after the last element)",
            (_, Some(b'+')) => " (a JSON number has no '+' sign)",
            (_, Some(b'.')) => " (a JSON number starts with a digit: 0.5, not .5)",
            _ => "",
        };
        if self.peek().is_none() && !stack.is_empty() {
            return self.unexpected(stack, expected);
        }
        self.error(
            self.pos(),
            format!("{expected}, found {}{hint}", self.found()),
        )
    }

    /// Checks the depth before a container opens at `pos`, and counts it.
    fn open(&mut self, stack: &[Frame], pos: Pos) -> Result<(), SyntaxError> {
        if stack.len() >= limits::MAX_DEPTH {
            return Err(self.error(
                pos,
                format!("nesting deeper than {} levels", limits::MAX_DEPTH),
            ));
        }
        self.count(pos)
    }

    /// Counts one value at `pos` against the limit.
    fn count(&mut self, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes += 1;
        if self.nodes > limits::MAX_NODES {
            return Err(self.error(
                pos,
                format!("more than {} values in one file", limits::MAX_NODES),
            ));
        }
        Ok(())
    }

    /// A member name and its position, refused when the object already has it.
    fn member_name(&mut self, stack: &mut [Frame], after_comma: bool) -> Result<Key, SyntaxError> {
        self.skip_ws();
        let pos = self.pos();
        if self.peek() != Some(b'"') {
            let expected = if after_comma {
                "expected a member name (a string in double quotes) after ','"
            } else {
                "expected a member name (a string in double quotes) or '}'"
            };
            let hint = match self.peek() {
                Some(b'}') if after_comma => " (JSON allows no comma after the last member)",
                Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {
                    " (member names are strings in double quotes)"
                }
                _ => "",
            };
            if self.peek().is_none() {
                return Err(self.unexpected(stack, expected));
            }
            return Err(self.error(pos, format!("{expected}, found {}{hint}", self.found())));
        }
        let name = self.string()?;
        self.count(pos)?;
        if let Some(Frame::Object { names, .. }) = stack.last_mut()
            && !names.insert(name.clone())
        {
            return Err(self.error(pos, format!("duplicate key `{}`", limits::shorten(&name))));
        }
        Ok(Key { name, pos })
    }

    fn colon(&mut self, stack: &[Frame]) -> Result<(), SyntaxError> {
        self.skip_ws();
        if self.peek() == Some(b':') {
            self.bump();
            Ok(())
        } else {
            Err(self.unexpected(stack, "expected ':' after the member name"))
        }
    }

    /// A string, from its opening quote to its closing one, unescaped.
    fn string(&mut self) -> Result<String, SyntaxError> {
        let open = self.pos();
        self.bump();
        let mut out = String::new();
        loop {
            let start = self.at;
            while let Some(&b) = self.bytes.get(self.at) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
                // One column a character: count the first byte of each.
                if b & 0xC0 != 0x80 {
                    self.col += 1;
                }
            }
            // Stopped at an ASCII byte or the end: a character boundary.
            out.push_str(&self.src[start..self.at]);
            match self.peek() {
                None => {
                    return Err(self.error(
                        self.pos(),
                        format!(
                            "unterminated string: the file ends before the '\"' that closes the string opened at {open}"
                        ),
                    ));
                }
                Some(b'"') => {
                    self.bump();
                    return Ok(out);
                }
                Some(b'\\') => self.escape(&mut out)?,
                Some(b'\n' | b'\r') => {
                    return Err(self.error(
                        self.pos(),
                        format!(
                            "line break in the string opened at {open}: a JSON string cannot span lines (write a line break as \\n, and close the string with '\"')"
                        ),
                    ));
                }
                Some(b) => {
                    let written = match b {
                        0x08 => "\\b".to_string(),
                        b'\t' => "\\t".to_string(),
                        0x0C => "\\f".to_string(),
                        _ => format!("\\u{b:04X}"),
                    };
                    return Err(self.error(
                        self.pos(),
                        format!(
                            "unescaped control character {} in a string (write it as {written})",
                            describe(char::from(b))
                        ),
                    ));
                }
            }
        }
    }

    /// One escape sequence, at its backslash.
    fn escape(&mut self, out: &mut String) -> Result<(), SyntaxError> {
        let at = self.pos();
        self.bump();
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.bump();
                let (first, first_text) = self.hex4(at)?;
                let c = match first {
                    0xD800..=0xDBFF => {
                        let second_at = self.pos();
                        if !self.bytes[self.at..].starts_with(b"\\u") {
                            return Err(self.error(
                                at,
                                format!(
                                    "lone surrogate \\u{first_text} (a high surrogate must be followed by \\uDC00–\\uDFFF)"
                                ),
                            ));
                        }
                        self.bump();
                        self.bump();
                        let (second, second_text) = self.hex4(second_at)?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(self.error(
                                at,
                                format!(
                                    "lone surrogate \\u{first_text} (a high surrogate must be followed by \\uDC00–\\uDFFF, not \\u{second_text})"
                                ),
                            ));
                        }
                        let scalar = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                        char::from_u32(scalar).expect("a surrogate pair is a scalar value")
                    }
                    0xDC00..=0xDFFF => {
                        return Err(self.error(
                            at,
                            format!(
                                "lone surrogate \\u{first_text} (a low surrogate \\uDC00–\\uDFFF must follow a high surrogate \\uD800–\\uDBFF)"
                            ),
                        ));
                    }
                    _ => char::from_u32(first).expect("outside the surrogates, a scalar value"),
                };
                out.push(c);
                return Ok(());
            }
            None => {
                return Err(self.error(
                    at,
                    "unterminated escape: the file ends after the '\\'".to_string(),
                ));
            }
            Some(_) => {
                let c = self.peek_char().expect("not at the end");
                let message = if c.is_control() || c.is_whitespace() {
                    format!("invalid escape: '\\' followed by {}", describe(c))
                } else {
                    format!("invalid escape \\{c} in a string")
                };
                return Err(self.error(
                    at,
                    format!(
                        "{message} (JSON's escapes are \\\" \\\\ \\/ \\b \\f \\n \\r \\t and \\uXXXX)"
                    ),
                ));
            }
        };
        self.bump();
        out.push(c);
        Ok(())
    }

    /// The four hex digits of a `\u` escape (the backslash at `at`): their
    /// value and their text.
    fn hex4(&mut self, at: Pos) -> Result<(u32, &'a str), SyntaxError> {
        let start = self.at;
        let mut value = 0;
        for _ in 0..4 {
            match self.peek().and_then(|b| char::from(b).to_digit(16)) {
                Some(d) => {
                    value = value * 16 + d;
                    self.bump();
                }
                None => {
                    let so_far = &self.src[start..self.at];
                    let found = match self.peek_char() {
                        None => "the end of the file".to_string(),
                        Some(c) => describe(c),
                    };
                    return Err(self.error(
                        at,
                        format!(
                            "invalid escape \\u{so_far}: \\u takes exactly four hexadecimal digits, found {found}"
                        ),
                    ));
                }
            }
        }
        Ok((value, &self.src[start..self.at]))
    }

    /// A number by RFC 8259's grammar; its source text.
    fn number(&mut self) -> Result<&'a str, SyntaxError> {
        let start = self.at;
        let pos = self.pos();
        if self.peek() == Some(b'-') {
            self.bump();
        }
        match self.peek() {
            Some(b'0') => {
                self.bump();
                if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    self.digits();
                    return Err(self.error(
                        pos,
                        format!(
                            "invalid number `{}`: a JSON number has no leading zeros",
                            &self.src[start..self.at]
                        ),
                    ));
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.bad_number(start, pos, "a digit after '-'")),
        }
        if self.peek() == Some(b'.') {
            self.bump();
            if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
                return Err(self.bad_number(start, pos, "a digit after the decimal point"));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.bump();
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.bump();
            }
            if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
                return Err(self.bad_number(start, pos, "a digit in the exponent"));
            }
            self.digits();
        }
        Ok(&self.src[start..self.at])
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.bump();
        }
    }

    fn bad_number(&self, start: usize, pos: Pos, expected: &str) -> SyntaxError {
        self.error(
            pos,
            format!(
                "invalid number `{}`: expected {expected}, found {}",
                &self.src[start..self.at],
                self.found()
            ),
        )
    }

    /// `true`, `false` or `null`; any other bare word is refused whole.
    fn literal(&mut self) -> Result<Value, SyntaxError> {
        let pos = self.pos();
        let start = self.at;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            self.bump();
        }
        let word = &self.src[start..self.at];
        match word {
            "null" => Ok(Value::Null),
            "true" | "false" => Ok(Value::Scalar {
                text: word.to_string(),
                quoted: false,
            }),
            _ => {
                let word_shown = limits::shorten(word);
                let message = if ["true", "false", "null"]
                    .iter()
                    .any(|l| l.eq_ignore_ascii_case(word))
                {
                    format!(
                        "`{word_shown}` is not a JSON literal: write `{}` (true, false and null are lower case)",
                        word.to_ascii_lowercase()
                    )
                } else if matches!(word, "NaN" | "Infinity" | "inf" | "nan") {
                    format!("`{word_shown}` is not a JSON value: JSON numbers are finite")
                } else {
                    format!(
                        "unknown word `{word_shown}`: JSON's only bare words are true, false and null (text goes in double quotes)"
                    )
                };
                Err(self.error(pos, message))
            }
        }
    }
}

/// A character as a message shows it: in backticks, or by its code point
/// when it is invisible or a control character.
fn describe(c: char) -> String {
    let name = match c {
        '\0' => Some("NUL"),
        '\u{8}' => Some("backspace"),
        '\t' => Some("tab"),
        '\n' => Some("line feed"),
        '\u{b}' => Some("vertical tab"),
        '\u{c}' => Some("form feed"),
        '\r' => Some("carriage return"),
        '\u{1b}' => Some("escape"),
        '\u{7f}' => Some("delete"),
        '\u{a0}' => Some("no-break space"),
        '\u{feff}' => Some("byte order mark"),
        _ => None,
    };
    let invisible = c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}');
    match name {
        Some(name) => format!("U+{:04X} ({name})", u32::from(c)),
        None if invisible => format!("U+{:04X}", u32::from(c)),
        None => format!("`{c}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: u32, col: u32) -> Pos {
        Pos { line, col }
    }

    fn scalar(text: &str, quoted: bool) -> Value {
        Value::Scalar {
            text: text.to_string(),
            quoted,
        }
    }

    /// The one string of `src` (a JSON string literal).
    fn string_of(src: &str) -> String {
        match parse(src).expect(src).value {
            Value::Scalar { text, quoted: true } => text,
            other => panic!("{src}: not a string: {other:?}"),
        }
    }

    /// The error of `src`: (line, col, message).
    fn error_of(src: &str) -> (u32, u32, String) {
        match parse(src) {
            Ok(node) => panic!("{src:?} was accepted as {node:?}"),
            Err(e) => (e.pos.line, e.pos.col, e.message),
        }
    }

    fn assert_error(src: &str, line: u32, col: u32, message: &str) {
        assert_eq!(
            error_of(src),
            (line, col, message.to_string()),
            "input: {src:?}"
        );
    }

    // ---- strings and escapes

    #[test]
    fn every_simple_escape_is_its_character() {
        for (src, want) in [
            (r#""\"""#, "\""),
            (r#""\\""#, "\\"),
            (r#""\/""#, "/"),
            (r#""\b""#, "\u{8}"),
            (r#""\f""#, "\u{c}"),
            (r#""\n""#, "\n"),
            (r#""\r""#, "\r"),
            (r#""\t""#, "\t"),
            (
                r#""a\"b\\c\/d\be\ff\ng\rh\ti""#,
                "a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti",
            ),
            (r#""""#, ""),
        ] {
            assert_eq!(string_of(src), want, "{src}");
        }
    }

    #[test]
    fn a_u_escape_in_the_bmp_is_its_character() {
        for (src, want) in [
            (r#""\u0041""#, "A"),
            (r#""\u00e9""#, "é"),
            (r#""\u00E9""#, "é"),
            (r#""caf\u00e9!""#, "café!"),
            (r#""\u20AC\u20ac""#, "€€"),
            (r#""\u0000""#, "\0"),
            (r#""\u001f""#, "\u{1f}"),
            (r#""\uFFFF""#, "\u{ffff}"),
            (r#""\uE000""#, "\u{e000}"),
            (r#""\uD7FF""#, "\u{d7ff}"),
            (r#""\u002F""#, "/"),
        ] {
            assert_eq!(string_of(src), want, "{src}");
        }
    }

    #[test]
    fn a_surrogate_pair_is_one_character() {
        for (src, want) in [
            (r#""\ud834\udd1e""#, "𝄞"),
            (r#""\uD834\uDD1E""#, "𝄞"),
            (r#""\uD83D\uDE00""#, "😀"),
            (r#""\ud83d\ude00 and \ud83c\udf89""#, "😀 and 🎉"),
            (r#""\uD800\uDC00""#, "\u{10000}"),
            (r#""\uDBFF\uDFFF""#, "\u{10ffff}"),
            (r#""x\ud834\udd1ey""#, "x𝄞y"),
        ] {
            let s = string_of(src);
            assert_eq!(s, want, "{src}");
        }
        assert_eq!(string_of(r#""\ud834\udd1e""#).chars().count(), 1);
    }

    #[test]
    fn a_lone_high_surrogate_is_refused_at_its_backslash() {
        let msg = "lone surrogate \\uD834 (a high surrogate must be followed by \\uDC00–\\uDFFF)";
        assert_error(r#""\uD834""#, 1, 2, msg);
        assert_error(r#""ab\uD834x""#, 1, 4, msg);
        assert_error(r#"{"d": "\uD834\n"}"#, 1, 8, msg);
        assert_error(
            r#""\ud834""#,
            1,
            2,
            "lone surrogate \\ud834 (a high surrogate must be followed by \\uDC00–\\uDFFF)",
        );
    }

    #[test]
    fn a_high_surrogate_before_anything_but_a_low_one_is_refused() {
        assert_error(
            r#""\uD834\u0041""#,
            1,
            2,
            "lone surrogate \\uD834 (a high surrogate must be followed by \\uDC00–\\uDFFF, not \\u0041)",
        );
        assert_error(
            r#""\uD834\uD834""#,
            1,
            2,
            "lone surrogate \\uD834 (a high surrogate must be followed by \\uDC00–\\uDFFF, not \\uD834)",
        );
        // A bad second escape is named at its own backslash.
        assert_error(
            r#""\uD834\u12""#,
            1,
            8,
            "invalid escape \\u12: \\u takes exactly four hexadecimal digits, found `\"`",
        );
    }

    #[test]
    fn a_lone_low_surrogate_and_a_reversed_pair_are_refused() {
        let msg = "lone surrogate \\uDD1E (a low surrogate \\uDC00–\\uDFFF must follow a high surrogate \\uD800–\\uDBFF)";
        assert_error(r#""\uDD1E""#, 1, 2, msg);
        assert_error(r#""\uDD1E\uD834""#, 1, 2, msg);
        assert_error(r#"["ok", "é\uDD1E"]"#, 1, 10, msg);
        assert_error(
            r#""\uDC00""#,
            1,
            2,
            "lone surrogate \\uDC00 (a low surrogate \\uDC00–\\uDFFF must follow a high surrogate \\uD800–\\uDBFF)",
        );
    }

    #[test]
    fn invalid_escapes_are_refused_at_their_backslash() {
        let tail = " (JSON's escapes are \\\" \\\\ \\/ \\b \\f \\n \\r \\t and \\uXXXX)";
        assert_error(
            r#""a\xb""#,
            1,
            3,
            &format!("invalid escape \\x in a string{tail}"),
        );
        assert_error(
            r#""\'""#,
            1,
            2,
            &format!("invalid escape \\' in a string{tail}"),
        );
        assert_error(
            r#""\a""#,
            1,
            2,
            &format!("invalid escape \\a in a string{tail}"),
        );
        assert_error(
            r#""\U0041""#,
            1,
            2,
            &format!("invalid escape \\U in a string{tail}"),
        );
        assert_error(
            r#""\é""#,
            1,
            2,
            &format!("invalid escape \\é in a string{tail}"),
        );
        assert_error(
            "\"\\\n\"",
            1,
            2,
            &format!("invalid escape: '\\' followed by U+000A (line feed){tail}"),
        );
        assert_error(
            r#""\u12G4""#,
            1,
            2,
            "invalid escape \\u12: \\u takes exactly four hexadecimal digits, found `G`",
        );
        assert_error(
            r#""\u""#,
            1,
            2,
            "invalid escape \\u: \\u takes exactly four hexadecimal digits, found `\"`",
        );
        assert_error(
            "\"\\u00",
            1,
            2,
            "invalid escape \\u00: \\u takes exactly four hexadecimal digits, found the end of the file",
        );
        assert_error(
            "\"\\",
            1,
            2,
            "unterminated escape: the file ends after the '\\'",
        );
    }

    #[test]
    fn unescaped_control_characters_in_a_string_are_refused() {
        assert_error(
            "\"a\tb\"",
            1,
            3,
            "unescaped control character U+0009 (tab) in a string (write it as \\t)",
        );
        assert_error(
            "\"\0\"",
            1,
            2,
            "unescaped control character U+0000 (NUL) in a string (write it as \\u0000)",
        );
        assert_error(
            "\"\u{1f}\"",
            1,
            2,
            "unescaped control character U+001F in a string (write it as \\u001F)",
        );
        assert_error(
            "\"\u{8}\u{c}\"",
            1,
            2,
            "unescaped control character U+0008 (backspace) in a string (write it as \\b)",
        );
        assert_error(
            "{\"t\": \"two\nlines\"}",
            1,
            11,
            "line break in the string opened at 1:7: a JSON string cannot span lines (write a line break as \\n, and close the string with '\"')",
        );
        assert_error(
            "[\"é😀\r\n\"]",
            1,
            5,
            "line break in the string opened at 1:2: a JSON string cannot span lines (write a line break as \\n, and close the string with '\"')",
        );
        // DEL and the C1 controls are not U+0000–U+001F: RFC 8259 allows them raw.
        assert_eq!(string_of("\"\u{7f}\u{85}\u{9f}\""), "\u{7f}\u{85}\u{9f}");
    }

    #[test]
    fn multi_byte_characters_are_one_column_each() {
        // é (2 bytes), 😀 (4 bytes), 𝄞 (4 bytes), 中 (3 bytes).
        assert_error(
            r#"{"é😀𝄞中": 1, x}"#,
            1,
            13,
            "expected a member name (a string in double quotes) after ',', found `x` (member names are strings in double quotes)",
        );
        assert_error(
            "[\"日本語\", \"\\q\"]",
            1,
            10,
            "invalid escape \\q in a string (JSON's escapes are \\\" \\\\ \\/ \\b \\f \\n \\r \\t and \\uXXXX)",
        );
        let node = parse("[\"ü\", \"😀\", 7]").expect("valid");
        let Value::Seq(items) = node.value else {
            panic!("an array")
        };
        let cols: Vec<u32> = items.iter().map(|n| n.pos.col).collect();
        assert_eq!(cols, [2, 7, 12]);
    }

    // ---- numbers and literals

    #[test]
    fn numbers_by_the_grammar_keep_their_text() {
        for n in [
            "0",
            "-0",
            "1",
            "-1",
            "10",
            "1234567890",
            "0.5",
            "-0.0",
            "1.25",
            "1e5",
            "1E5",
            "1e+5",
            "1e-5",
            "1E+05",
            "0e0",
            "-1.5e-10",
            "123456789012345678901234567890",
            "1.7976931348623157e309",
        ] {
            assert_eq!(parse(n).expect(n).value, scalar(n, false), "{n}");
            let wrapped = format!("[{n}]");
            let node = parse(&wrapped).expect(&wrapped);
            assert_eq!(
                node.value,
                Value::Seq(vec![Node {
                    pos: p(1, 2),
                    value: scalar(n, false)
                }])
            );
        }
    }

    #[test]
    fn numbers_outside_the_grammar_are_refused() {
        let cases: &[(&str, u32, &str)] = &[
            (
                "01",
                1,
                "invalid number `01`: a JSON number has no leading zeros",
            ),
            (
                "-012",
                1,
                "invalid number `-012`: a JSON number has no leading zeros",
            ),
            (
                "00",
                1,
                "invalid number `00`: a JSON number has no leading zeros",
            ),
            (
                "1.",
                1,
                "invalid number `1.`: expected a digit after the decimal point, found the end of the file",
            ),
            (
                "1.e5",
                1,
                "invalid number `1.`: expected a digit after the decimal point, found `e`",
            ),
            (
                "1e",
                1,
                "invalid number `1e`: expected a digit in the exponent, found the end of the file",
            ),
            (
                "1e+",
                1,
                "invalid number `1e+`: expected a digit in the exponent, found the end of the file",
            ),
            (
                "1E-x",
                1,
                "invalid number `1E-`: expected a digit in the exponent, found `x`",
            ),
            (
                "-",
                1,
                "invalid number `-`: expected a digit after '-', found the end of the file",
            ),
            (
                "--1",
                1,
                "invalid number `-`: expected a digit after '-', found `-`",
            ),
            (
                "-a",
                1,
                "invalid number `-`: expected a digit after '-', found `a`",
            ),
            (
                "-.5",
                1,
                "invalid number `-`: expected a digit after '-', found `.`",
            ),
            (
                "-Infinity",
                1,
                "invalid number `-`: expected a digit after '-', found `I`",
            ),
            (
                "+1",
                1,
                "expected a JSON value, found `+` (a JSON number has no '+' sign)",
            ),
            (
                ".5",
                1,
                "expected a JSON value, found `.` (a JSON number starts with a digit: 0.5, not .5)",
            ),
            (
                "Infinity",
                1,
                "`Infinity` is not a JSON value: JSON numbers are finite",
            ),
            (
                "NaN",
                1,
                "`NaN` is not a JSON value: JSON numbers are finite",
            ),
            (
                "0x10",
                2,
                "trailing characters after the JSON value: found `x`",
            ),
            (
                "1_000",
                2,
                "trailing characters after the JSON value: found `_`",
            ),
            (
                "1.5.2",
                4,
                "trailing characters after the JSON value: found `.`",
            ),
        ];
        for (src, col, message) in cases {
            assert_error(src, 1, *col, message);
        }
        // Inside a structure, at the number's first character.
        assert_error(
            "{\"id\": 0123}",
            1,
            8,
            "invalid number `0123`: a JSON number has no leading zeros",
        );
        assert_error(
            "[1, 2.]",
            1,
            5,
            "invalid number `2.`: expected a digit after the decimal point, found `]`",
        );
        assert_error(
            "[12abc]",
            1,
            4,
            "expected ',' or ']' after an array element, found `a`",
        );
    }

    #[test]
    fn literals_are_exactly_true_false_and_null() {
        assert_eq!(parse("true").expect("true").value, scalar("true", false));
        assert_eq!(parse("false").expect("false").value, scalar("false", false));
        assert_eq!(parse("null").expect("null").value, Value::Null);
        assert_eq!(
            parse("[true,false,null]").expect("list").value,
            Value::Seq(vec![
                Node {
                    pos: p(1, 2),
                    value: scalar("true", false)
                },
                Node {
                    pos: p(1, 7),
                    value: scalar("false", false)
                },
                Node {
                    pos: p(1, 13),
                    value: Value::Null
                },
            ])
        );
        assert_error(
            "True",
            1,
            1,
            "`True` is not a JSON literal: write `true` (true, false and null are lower case)",
        );
        assert_error(
            "[NULL]",
            1,
            2,
            "`NULL` is not a JSON literal: write `null` (true, false and null are lower case)",
        );
        for word in ["tru", "nul", "truex", "nil", "yes", "undefined", "f"] {
            assert_error(
                word,
                1,
                1,
                &format!(
                    "unknown word `{word}`: JSON's only bare words are true, false and null (text goes in double quotes)"
                ),
            );
        }
        assert_error(
            "{\"a\": none}",
            1,
            7,
            "unknown word `none`: JSON's only bare words are true, false and null (text goes in double quotes)",
        );
    }

    // ---- structure, white space, the BOM

    #[test]
    fn the_tree_has_the_yaml_paths_shape_and_positions() {
        let src = "{\n  \"id\": 3502,\n  \"title\": \"BDII\",\n  \"bugs\": [{\"id\": 1, \"title\": null}],\n  \"x\": {},\n  \"y\": [],\n  \"ok\": true\n}\n";
        let node = parse(src).expect("valid");
        let key = |name: &str, line, col| Key {
            name: name.to_string(),
            pos: p(line, col),
        };
        let want = Node {
            pos: p(1, 1),
            value: Value::Map(vec![
                (
                    key("id", 2, 3),
                    Node {
                        pos: p(2, 9),
                        value: scalar("3502", false),
                    },
                ),
                (
                    key("title", 3, 3),
                    Node {
                        pos: p(3, 12),
                        value: scalar("BDII", true),
                    },
                ),
                (
                    key("bugs", 4, 3),
                    Node {
                        pos: p(4, 11),
                        value: Value::Seq(vec![Node {
                            pos: p(4, 12),
                            value: Value::Map(vec![
                                (
                                    key("id", 4, 13),
                                    Node {
                                        pos: p(4, 19),
                                        value: scalar("1", false),
                                    },
                                ),
                                (
                                    key("title", 4, 22),
                                    Node {
                                        pos: p(4, 31),
                                        value: Value::Null,
                                    },
                                ),
                            ]),
                        }]),
                    },
                ),
                (
                    key("x", 5, 3),
                    Node {
                        pos: p(5, 8),
                        value: Value::Map(Vec::new()),
                    },
                ),
                (
                    key("y", 6, 3),
                    Node {
                        pos: p(6, 8),
                        value: Value::Seq(Vec::new()),
                    },
                ),
                (
                    key("ok", 7, 3),
                    Node {
                        pos: p(7, 9),
                        value: scalar("true", false),
                    },
                ),
            ]),
        };
        assert_eq!(node, want);
    }

    #[test]
    fn every_json_white_space_is_accepted_anywhere_between_tokens() {
        let src = " \t\r\n{ \t\r\n\"a\" \t\r\n: \t\r\n[ \t\r\n1 \t\r\n, \t\r\n\"b\" \t\r\n] \t\r\n} \t\r\n";
        let node = parse(src).expect("valid");
        assert_eq!(node.pos, p(2, 1));
        let Value::Map(entries) = node.value else {
            panic!("an object")
        };
        assert_eq!(entries[0].0.pos, p(3, 1));
        let Value::Seq(items) = &entries[0].1.value else {
            panic!("an array")
        };
        assert_eq!(entries[0].1.pos, p(5, 1));
        assert_eq!(items[0].pos, p(6, 1));
        assert_eq!(items[1].pos, p(8, 1));
        // CRLF line ends count one line each.
        assert_error(
            "{\r\n  \"a\": 1\r\n  \"b\": 2\r\n}",
            3,
            3,
            "expected ',' or '}' after an object member, found `\"`",
        );
    }

    #[test]
    fn other_white_space_is_refused() {
        let hint = " (JSON white space is only space, tab, line feed and carriage return)";
        for (c, shown) in [
            ('\u{c}', "U+000C (form feed)"),
            ('\u{b}', "U+000B (vertical tab)"),
            ('\u{a0}', "U+00A0 (no-break space)"),
            ('\u{2028}', "U+2028"),
            ('\u{3000}', "U+3000"),
        ] {
            assert_error(
                &format!("[1,{c}2]"),
                1,
                4,
                &format!("expected a value after ',', found {shown}{hint}"),
            );
            assert_error(
                &format!("{c}{{}}"),
                1,
                1,
                &format!("expected a JSON value, found {shown}{hint}"),
            );
        }
    }

    #[test]
    fn a_byte_order_mark_is_skipped_at_the_start_only() {
        let node = parse("\u{feff}{\"a\": \"b\"}").expect("BOM then an object");
        assert_eq!(node.pos, p(1, 1));
        let Value::Map(entries) = node.value else {
            panic!("an object")
        };
        assert_eq!(entries[0].0.pos, p(1, 2));
        assert_eq!(entries[0].1.pos, p(1, 7));
        assert_error(
            "\u{feff}[1,]",
            1,
            4,
            "expected a value after ',', found `]` (JSON allows no comma after the last element)",
        );
        assert_error(
            " \u{feff}{}",
            1,
            2,
            "expected a JSON value, found U+FEFF (byte order mark) (a byte order mark is accepted only at the start of the file)",
        );
        assert_error(
            "[\u{feff}1]",
            1,
            2,
            "expected a value or ']', found U+FEFF (byte order mark) (a byte order mark is accepted only at the start of the file)",
        );
        assert_error(
            "\u{feff}\u{feff}{}",
            1,
            1,
            "expected a JSON value, found U+FEFF (byte order mark) (a byte order mark is accepted only at the start of the file)",
        );
        // Inside a string it is a character like any other.
        assert_eq!(string_of("\"\u{feff}\""), "\u{feff}");
        assert_error(
            "\u{feff}",
            1,
            1,
            "expected a JSON value, found the end of the file",
        );
    }

    #[test]
    fn empty_input_and_white_space_only_are_refused() {
        assert_error("", 1, 1, "expected a JSON value, found the end of the file");
        assert_error(
            " \n\t\r\n  ",
            3,
            3,
            "expected a JSON value, found the end of the file",
        );
    }

    #[test]
    fn trailing_content_after_the_value_is_refused() {
        assert_error(
            "{} x",
            1,
            4,
            "trailing characters after the JSON value: found `x`",
        );
        assert_error(
            "{\"a\": 1}\n{\"a\": 2}\n",
            2,
            1,
            "trailing characters after the JSON value: found `{` (a file holds one JSON value: put several records in one array)",
        );
        assert_error(
            "[] ]",
            1,
            4,
            "trailing characters after the JSON value: found `]`",
        );
        assert_error(
            "1 2",
            1,
            3,
            "trailing characters after the JSON value: found `2`",
        );
        assert_error(
            "\"a\"\"b\"",
            1,
            4,
            "trailing characters after the JSON value: found `\"`",
        );
        assert_error(
            "{}\n// end\n",
            2,
            1,
            "trailing characters after the JSON value: found `/` (JSON has no comments)",
        );
        assert_error(
            "{}\0",
            1,
            3,
            "trailing characters after the JSON value: found U+0000 (NUL)",
        );
        // White space after the value is fine.
        assert!(parse("{} \t\r\n\n").is_ok());
    }

    #[test]
    fn unterminated_strings_arrays_and_objects_are_refused_at_the_end() {
        assert_error(
            "\"abc",
            1,
            5,
            "unterminated string: the file ends before the '\"' that closes the string opened at 1:1",
        );
        assert_error(
            "{\"a\": \"é😀",
            1,
            10,
            "unterminated string: the file ends before the '\"' that closes the string opened at 1:7",
        );
        assert_error(
            "[1, 2",
            1,
            6,
            "unterminated array: the file ends before the ']' that closes the '[' at 1:1",
        );
        assert_error(
            "[1,",
            1,
            4,
            "unterminated array: the file ends before the ']' that closes the '[' at 1:1",
        );
        assert_error(
            "[",
            1,
            2,
            "unterminated array: the file ends before the ']' that closes the '[' at 1:1",
        );
        assert_error(
            "{\n  \"a\": [\n    {\"b\": 1}\n",
            4,
            1,
            "unterminated array: the file ends before the ']' that closes the '[' at 2:8",
        );
        assert_error(
            "{\"a\": 1",
            1,
            8,
            "unterminated object: the file ends before the '}' that closes the '{' at 1:1",
        );
        assert_error(
            "{\"a\"",
            1,
            5,
            "unterminated object: the file ends before the '}' that closes the '{' at 1:1",
        );
        assert_error(
            "{\"a\":",
            1,
            6,
            "unterminated object: the file ends before the '}' that closes the '{' at 1:1",
        );
        assert_error(
            "{",
            1,
            2,
            "unterminated object: the file ends before the '}' that closes the '{' at 1:1",
        );
        assert_error(
            "{\"a\": 1,\n",
            2,
            1,
            "unterminated object: the file ends before the '}' that closes the '{' at 1:1",
        );
    }

    #[test]
    fn structural_mistakes_are_named_where_they_are() {
        let cases: &[(&str, u32, u32, &str)] = &[
            (
                "[1,]",
                1,
                4,
                "expected a value after ',', found `]` (JSON allows no comma after the last element)",
            ),
            (
                "{\"a\": 1,}",
                1,
                9,
                "expected a member name (a string in double quotes) after ',', found `}` (JSON allows no comma after the last member)",
            ),
            (
                "[1 2]",
                1,
                4,
                "expected ',' or ']' after an array element, found `2`",
            ),
            (
                "{\"a\": 1 \"b\": 2}",
                1,
                9,
                "expected ',' or '}' after an object member, found `\"`",
            ),
            (
                "{\"a\" 1}",
                1,
                6,
                "expected ':' after the member name, found `1`",
            ),
            (
                "{\"a\"= 1}",
                1,
                5,
                "expected ':' after the member name, found `=`",
            ),
            ("{\"a\": }", 1, 7, "expected a value after ':', found `}`"),
            ("[,1]", 1, 2, "expected a value or ']', found `,`"),
            (
                "{a: 1}",
                1,
                2,
                "expected a member name (a string in double quotes) or '}', found `a` (member names are strings in double quotes)",
            ),
            (
                "{1: 1}",
                1,
                2,
                "expected a member name (a string in double quotes) or '}', found `1` (member names are strings in double quotes)",
            ),
            (
                "{'a': 1}",
                1,
                2,
                "expected a member name (a string in double quotes) or '}', found `'` (JSON strings are in double quotes)",
            ),
            (
                "['a']",
                1,
                2,
                "expected a value or ']', found `'` (JSON strings are in double quotes)",
            ),
            (
                "{\"a\": 1, // note\n}",
                1,
                10,
                "expected a member name (a string in double quotes) after ',', found `/` (JSON has no comments)",
            ),
            (
                "[1}",
                1,
                3,
                "expected ',' or ']' after an array element, found `}`",
            ),
            (
                "{\"a\": 1]",
                1,
                8,
                "expected ',' or '}' after an object member, found `]`",
            ),
            ("]", 1, 1, "expected a JSON value, found `]`"),
            ("é", 1, 1, "expected a JSON value, found `é`"),
            ("[1,,2]", 1, 4, "expected a value after ',', found `,`"),
        ];
        for (src, line, col, message) in cases {
            assert_error(src, *line, *col, message);
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_as_the_yaml_path_refuses_it() {
        assert_error("{\"id\": 1,\n \"id\": 2}", 2, 2, "duplicate key `id`");
        // Escaped or not, the key is the same; shown with its control characters escaped.
        assert_error(
            "{\"plat\\nforms\": [], \"plat\\u000aforms\": []}",
            1,
            21,
            "duplicate key `plat\\nforms`",
        );
        assert_error(r#"{"\u00e9": 1, "é": 2}"#, 1, 15, "duplicate key `é`");
        // The same key in two objects is no duplicate.
        assert!(parse(r#"[{"a": 1}, {"a": 2}, {"b": {"a": 3}, "a": 4}]"#).is_ok());
        // The old path said the same for the same input.
        let src = "{\"id\": 1,\n \"id\": 2}";
        let yaml = super::super::doc::parse_yaml(src).expect_err("duplicate");
        assert_eq!(
            (yaml.pos, yaml.message),
            (p(2, 2), "duplicate key `id`".to_string())
        );
    }

    // ---- limits

    fn nested(depth: usize) -> String {
        let mut s = String::new();
        for i in 0..depth {
            s.push_str(if i % 2 == 0 { "[" } else { "{\"k\": " });
        }
        s.push('1');
        for i in (0..depth).rev() {
            s.push(if i % 2 == 0 { ']' } else { '}' });
        }
        s
    }

    #[test]
    fn nesting_is_accepted_to_the_limit_and_refused_past_it() {
        let at_limit = nested(limits::MAX_DEPTH);
        assert!(parse(&at_limit).is_ok(), "{at_limit}");
        let over = nested(limits::MAX_DEPTH + 1);
        // The container that opens level MAX_DEPTH + 1, where it opens.
        let col = over
            .match_indices(['[', '{'])
            .nth(limits::MAX_DEPTH)
            .map(|(i, _)| i + 1);
        let (line, c, message) = error_of(&over);
        assert_eq!((line, Some(c as usize)), (1, col));
        assert_eq!(
            message,
            format!("nesting deeper than {} levels", limits::MAX_DEPTH)
        );
        // The same as the YAML path.
        let yaml = super::super::doc::parse_yaml(&over).expect_err("too deep");
        assert_eq!((yaml.pos.col, yaml.message.as_str()), (c, message.as_str()));
    }

    #[test]
    fn very_deep_input_is_refused_without_exhausting_the_stack() {
        for open in ["[", "{\"a\":"] {
            let src = open.repeat(200_000);
            let (line, col, message) = error_of(&src);
            assert_eq!(line, 1);
            assert_eq!(col as usize, limits::MAX_DEPTH * open.len() + 1);
            assert_eq!(
                message,
                format!("nesting deeper than {} levels", limits::MAX_DEPTH)
            );
        }
    }

    #[test]
    fn the_number_of_values_is_bounded() {
        // The array is one value, each element one more.
        let array = |n: usize| format!("[{}]", vec!["0"; n].join(","));
        assert!(parse(&array(limits::MAX_NODES - 1)).is_ok());
        let over = array(limits::MAX_NODES);
        let (line, col, message) = error_of(&over);
        assert_eq!(
            message,
            format!("more than {} values in one file", limits::MAX_NODES)
        );
        // At the last element.
        assert_eq!((line, col as usize), (1, over.len() - 1));
        // Keys count as values, as the YAML path counts them; so do empty containers.
        let members = (0..limits::MAX_NODES / 2)
            .map(|i| format!("\"k{i}\":0"))
            .collect::<Vec<_>>()
            .join(",");
        let (_, _, message) = error_of(&format!("{{{members}}}"));
        assert_eq!(
            message,
            format!("more than {} values in one file", limits::MAX_NODES)
        );
        let empties = format!("[{}]", vec!["[]"; limits::MAX_NODES].join(","));
        let (_, _, message) = error_of(&empties);
        assert_eq!(
            message,
            format!("more than {} values in one file", limits::MAX_NODES)
        );
    }

    // ---- cross-checks: serde_json for values, the old YAML path for positions

    /// The tree as a serde_json value (numbers and literals read from their text).
    fn to_serde(node: &Node) -> serde_json::Value {
        match &node.value {
            Value::Null => serde_json::Value::Null,
            Value::Scalar { text, quoted: true } => serde_json::Value::String(text.clone()),
            Value::Scalar {
                text,
                quoted: false,
            } => serde_json::from_str(text).expect("a number or a literal"),
            Value::Seq(items) => items.iter().map(to_serde).collect(),
            Value::Map(entries) => entries
                .iter()
                .map(|(k, v)| (k.name.clone(), to_serde(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }

    /// Valid JSON of the kinds a conformance suite covers.
    const VALID: &[&str] = &[
        "{}",
        "[]",
        "[[]]",
        "[{}]",
        "0",
        "-0",
        "1.5e-3",
        "\"\"",
        "true",
        "null",
        "[1, -1, 0.5, 1e2, 1E-2, 1e+2, -0.0e0]",
        "[123456789012345678901234567890, 1.7976931348623157e308]",
        r#"{"a": "b", "c": [1, 2, {"d": null}], "e": {"f": true, "g": false}}"#,
        r#"["\"\\\/\b\f\n\r\t"]"#,
        r#"["\u0000\u001f\u007f\u0080\u07ff\u0800\uffff"]"#,
        r#"["\ud834\udd1e", "\uD83D\uDE00", "\uD800\uDC00\uDBFF\uDFFF"]"#,
        "[\"é😀𝄞中\u{7f}\u{9f}\"]",
        r#"{"": "", " ": 1, "\u0000": 2}"#,
        " \t\r\n[ \t\r\n1 \t\r\n, \t\r\n2 \t\r\n] \t\r\n",
        r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{}}}}}}}}"#,
        r#"[[[[[[[["deep"]]]]]]]]"#,
        r#"{"a": 1, "A": 2}"#,
        "[\"\u{feff}\"]",
    ];

    #[test]
    fn valid_inputs_read_as_serde_json_reads_them() {
        for src in VALID {
            let ours = parse(src).unwrap_or_else(|e| panic!("{src}: {e:?}"));
            let theirs: serde_json::Value = serde_json::from_str(src).expect(src);
            assert_eq!(to_serde(&ours), theirs, "{src}");
        }
    }

    #[test]
    fn invalid_inputs_are_refused_by_both() {
        for src in [
            "",
            " ",
            "[1,]",
            "{\"a\":1,}",
            "[01]",
            "[-01]",
            "[+1]",
            "[.5]",
            "[1.]",
            "[1.e1]",
            "[1e]",
            "[1e+]",
            "[-]",
            "[0x1]",
            "[Infinity]",
            "[NaN]",
            "[True]",
            "[nul]",
            "['a']",
            "{a:1}",
            "{\"a\" 1}",
            "[1 2]",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\uD834\"",
            "\"\\uDD1E\"",
            "\"\\uDD1E\\uD834\"",
            "\"\\uD834\\u0041\"",
            "\"a\tb\"",
            "\"a\nb\"",
            "\"\0\"",
            "\"abc",
            "[1",
            "{\"a\":1",
            "{} x",
            "[] []",
            "[1]\u{c}",
            "[\u{a0}1]",
            "/* c */ {}",
            "[1, // c\n 2]",
        ] {
            assert!(parse(src).is_err(), "we accepted {src:?}");
            assert!(
                serde_json::from_str::<serde_json::Value>(src).is_err(),
                "serde_json accepts {src:?}"
            );
        }
    }

    fn fixtures() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/patches")
    }

    /// Inputs the YAML path read right: the tree, positions included, is the same.
    #[test]
    fn the_tree_is_the_one_the_yaml_path_built() {
        let mut inputs: Vec<(String, String)> = Vec::new();
        for dir in ["valid", "invalid"] {
            let mut files: Vec<_> = std::fs::read_dir(fixtures().join(dir))
                .expect("fixture dir")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).expect("read");
                inputs.push((file.display().to_string(), text));
            }
        }
        assert!(inputs.len() >= 9, "only {} JSON fixtures", inputs.len());
        for src in [
            "{\"a\": \"é😀\", \"b\": [1, 2.5, -3e4, true, false, null], \"c\": {}}",
            "[\n\t{\"x\": \"tab\\tand\\nnewline\"},\n\t{\"y\": \"caf\\u00e9 \\/\"}\n]",
            "{\r\n  \"crlf\": [\r\n    \"a\",\r\n    \"b\"\r\n  ]\r\n}\r\n",
            "{\"中文\":\"値\",\"n\":0,\"m\":-0.0,\"z\":[[],{}]}",
            "  {  \"spaced\"  :  \"out\"  }  ",
            "[\"x\", [\"y\", [\"z\"]], {\"k\": [{\"l\": \"m\"}]}]",
        ] {
            inputs.push((src.to_string(), src.to_string()));
        }
        let mut compared = 0;
        for (name, src) in &inputs {
            let yaml = super::super::doc::parse_yaml(src);
            let ours = parse(src);
            match (yaml, ours) {
                (Ok(mut docs), Ok(ours)) => {
                    assert_eq!(docs.len(), 1, "{name}");
                    assert_eq!(ours, docs.remove(0), "{name}");
                    compared += 1;
                }
                // 11-json-syntax.json: a trailing comma, which YAML takes.
                (Ok(_), Err(e)) if name.ends_with("11-json-syntax.json") => {
                    assert_eq!(e.pos, p(5, 30), "{name}");
                }
                // Surrogate pairs, which the YAML parser refused (the reason for this reader).
                (Err(e), Ok(_)) if name.ends_with("3515-json-dumps-escapes.json") => {
                    assert!(
                        e.message.contains("invalid Unicode character escape code"),
                        "{e:?}"
                    );
                }
                (yaml, ours) => panic!("{name}: YAML path {yaml:?}, ours {ours:?}"),
            }
        }
        assert_eq!(compared, inputs.len() - 2);
    }

    // ---- a record exported by Python's json.dumps

    const JSON_DUMPS: &str =
        include_str!("../../../fixtures/patches/valid/3515-json-dumps-escapes.json");

    #[test]
    fn a_record_exported_by_json_dumps_validates() {
        // Every non-ASCII character escaped, those outside the BMP as surrogate pairs.
        assert!(JSON_DUMPS.is_ascii());
        assert!(JSON_DUMPS.contains("\\ud834\\udd1e") && JSON_DUMPS.contains("\\ud83d\\ude00"));
        // What the old path, through the YAML parser, refused.
        let old = super::super::doc::parse_yaml(JSON_DUMPS).expect_err("YAML refuses it");
        assert!(
            old.message
                .contains("invalid Unicode character escape code"),
            "{old:?}"
        );
        let catalogue = crate::catalogue::Catalogue::builtin();
        let records = super::super::load(
            "3515-json-dumps-escapes.json",
            JSON_DUMPS.as_bytes(),
            None,
            &catalogue,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(records.len(), 1);
        let r = &records[0].record;
        assert_eq!(r.id, 3515);
        assert!(r.description.contains("caf\u{e9}"), "{}", r.description);
        assert!(r.description.contains('𝄞'), "{}", r.description);
        assert!(r.description.contains('😀'), "{}", r.description);
        // Read as serde_json reads it.
        let ours = parse(JSON_DUMPS).expect("valid");
        let theirs: serde_json::Value = serde_json::from_str(JSON_DUMPS).expect("valid");
        assert_eq!(to_serde(&ours), theirs);
    }

    #[test]
    fn load_reports_json_errors_at_their_position() {
        let catalogue = crate::catalogue::Catalogue::builtin();
        let src = "{\n  \"id\": 1,\n  \"title\": \"bad \\uDD1E here\"\n}\n";
        let errors = super::super::load("x.json", src.as_bytes(), None, &catalogue)
            .expect_err("a lone surrogate");
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "x.json:3:17: syntax: lone surrogate \\uDD1E (a low surrogate \\uDC00–\\uDFFF must follow a high surrogate \\uD800–\\uDBFF)"
            ]
        );
        // A BOM is stripped by load; positions start after it.
        let with_bom = "\u{feff}{\"id\": \"x\"}";
        let errors = super::super::load("b.json", with_bom.as_bytes(), None, &catalogue)
            .expect_err("not a record");
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().starts_with("b.json:1:8: id: ")),
            "{errors:?}"
        );
    }
}
