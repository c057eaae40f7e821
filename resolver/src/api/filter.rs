//! Consul-compatible `?filter=` expressions.
//!
//! Consul lets list endpoints take a `filter` query parameter written in
//! HashiCorp's go-bexpr language, for example
//! `Service.Meta.team == "a" and "v1" in Service.Tags`. This module parses
//! such an expression once ([`Filter::parse`]), checks its selectors against
//! the shape of an endpoint's entries ([`Filter::validate`]), and evaluates it
//! against each JSON entry ([`Filter::matches`] / [`Filter::evaluate`]).
//!
//! # Language
//!
//! * Matching expressions:
//!   `Sel == V`, `Sel != V`, `V in Sel`, `V not in Sel`, `Sel contains V`,
//!   `Sel not contains V`, `Sel matches V`, `Sel not matches V` (regular
//!   expression), `Sel is empty`, `Sel is not empty`.
//! * Boolean logic: `or` binds loosest, then `and`, then `not`; parentheses
//!   group. Keywords are lower case only (`AND` is not a keyword).
//! * Selectors: `Ident(.Ident | ["key"])*` where an identifier is
//!   `[A-Za-z][A-Za-z0-9_]*`, e.g. `Service.Meta.team` or
//!   `Service.Meta["a.b"]`. Field names and map keys are case sensitive.
//! * Values: a double-quoted string (Go escapes: `\n \t \\ \" \x41 \101
//!   \u00e9 \U0001F600` ...), a backtick raw string (no escapes, `\r`
//!   dropped), a number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?`, which must be
//!   followed by whitespace, `)` or the end), or a bare selector-like word
//!   such as `passing` or `foo.bar` (its text is the value).
//!
//! # Semantics (as go-bexpr v0.1.2, the version Consul uses)
//!
//! * Values are strings until compared: against a JSON number they are parsed
//!   like Go's `strconv.ParseInt(v, 0, 64)` (so `"0x1F90"` and `"1_000"` work)
//!   or `ParseFloat`; against a JSON bool like `strconv.ParseBool`
//!   (`1 t T TRUE true True 0 f F FALSE false False`). String comparison is
//!   exact and case sensitive.
//! * `in`/`contains` on a string is a substring test, on a list an element
//!   test (each element compared with the value converted to its type), on an
//!   object a key test.
//! * `is empty` is true for an empty list, object or string.
//! * A selector that passes *through* a list applies the whole match
//!   expression, negated operator included, to each element and is true if
//!   any element is: `Checks.Status != passing` is true when at least one
//!   check is not passing, and is false when there are no checks. Two match
//!   expressions over the same list are not correlated
//!   (`Checks.CheckID == a and Checks.Status == critical` may be satisfied by
//!   different checks).
//! * A missing object key (or a JSON `null`) along the path makes `==`,
//!   `in`, `contains`, `matches` and `is not empty` false and `!=`, `not in`,
//!   `not contains`, `not matches` and `is empty` true.
//! * An expression that cannot be evaluated for an entry (`Service.Port ==
//!   abc`, `Service.Tags == x`, a field under a string) is an error for that
//!   entry: [`Filter::evaluate`] returns it and [`Filter::matches`] returns
//!   `false`. Against the right template, [`Filter::validate`] rejects these
//!   up front, as Consul does when it builds the filter.
//!
//! # Templates for [`Filter::validate`]
//!
//! The template is one example entry with every field present:
//! a non-empty object lists the only valid keys (a struct); an empty object
//! is a map from any key to a string (`Service.Meta.team`); an object whose
//! only key is `"*"` is a map from any key to values shaped like that member;
//! an array holds one example element, or is empty for a list of strings;
//! strings, integers, floats (`1.0`) and booleans are leaves of that type; and
//! `null` accepts any selector below it and any operator. The operators each
//! shape accepts follow go-bexpr: structs none; maps `in`, `not in`,
//! `contains`, `not contains`, `is empty`, `is not empty`; lists of scalars
//! the same; lists of objects `is empty`, `is not empty`; strings `==`, `!=`,
//! `in`, `not in`, `contains`, `not contains`, `matches`, `not matches`,
//! `is empty`, `is not empty`; numbers and booleans `==`, `!=` with a value
//! that converts.
//!
//! # Differences from go-bexpr
//!
//! * `is empty` / `is not empty` are accepted on strings (newer go-bexpr
//!   allows it; v0.1.2 rejects it).
//! * A missing key with `matches` is false (newer go-bexpr; v0.1.2 returned
//!   true for `matches` on a missing map key, an evident bug).
//! * `\"` inside a double-quoted string is an escaped quote; go-bexpr's
//!   grammar ends the string there and then fails, so this only accepts more.
//!   `\x80`-`\xff` and octal escapes above `\177` (raw non-UTF-8 bytes in Go)
//!   are rejected.
//! * The keywords `in`, `not`, `is`, `contains`, `matches` and the parentheses
//!   need no surrounding whitespace here (go-bexpr requires it, e.g. for
//!   `not(...)`), so a few expressions go-bexpr rejects are accepted.
//! * Regular expressions use Rust's `regex` crate, whose syntax is close to
//!   Go's RE2, but `\d`, `\w`, `\s` and `\b` are Unicode-aware (ASCII in Go).
//!   Hexadecimal floats and underscores in floats are not parsed.
//! * At evaluation time a number value that is not an integer is still
//!   compared numerically with an integer field (`Service.Port == 8080.0`
//!   matches), because JSON does not say whether a field is an integer;
//!   `validate` rejects it against an integer template, as go-bexpr does.
//! * Limits: at most [`MAX_EXPRESSION_LEN`] bytes and [`MAX_DEPTH`] levels of
//!   nested parentheses / `not`; regexes are compiled once, at parse time,
//!   with a size limit. go-bexpr has no such limits as Consul configures it.
//! * go-bexpr's later additions (`is nil`, `any`/`all` collection
//!   expressions, JSON-pointer selectors) are not supported; Consul's version
//!   has none of them.

use regex::{Regex, RegexBuilder};
use serde_json::{Map, Number, Value};

/// Longest accepted expression, in bytes.
pub const MAX_EXPRESSION_LEN: usize = 4096;

/// Deepest accepted nesting of parentheses and `not`.
pub const MAX_DEPTH: usize = 64;

/// Size limit for each compiled regular expression (and its lazy DFA).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Why an expression was rejected or could not be evaluated.
///
/// Columns are 1-based and count characters of the expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The expression is longer than [`MAX_EXPRESSION_LEN`].
    #[error("filter: the expression is {len} bytes long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    /// The expression is not well formed (this includes too deep nesting and
    /// invalid regular expressions).
    #[error("filter: at column {column}: {message}")]
    Syntax { column: usize, message: String },
    /// A selector names a field the entries do not have.
    #[error("filter: at column {column}: Selector \"{selector}\" is not valid")]
    InvalidSelector { column: usize, selector: String },
    /// The operator cannot be used on the selected field.
    #[error(
        "filter: at column {column}: Invalid match operator \"{operator}\" for selector \"{selector}\""
    )]
    InvalidOperator {
        column: usize,
        operator: &'static str,
        selector: String,
    },
    /// The value cannot be converted to the selected field's type.
    #[error(
        "filter: at column {column}: Failed to coerce value \"{value}\" for selector \"{selector}\": {reason}"
    )]
    InvalidValue {
        column: usize,
        value: String,
        selector: String,
        reason: &'static str,
    },
    /// A match expression could not be evaluated against an entry.
    #[error("filter: at column {column}: cannot evaluate selector \"{selector}\": {reason}")]
    Evaluation {
        column: usize,
        selector: String,
        reason: String,
    },
}

impl FilterError {
    fn syntax(column: usize, message: impl Into<String>) -> Self {
        FilterError::Syntax {
            column,
            message: message.into(),
        }
    }

    /// The 1-based column the error refers to, if it refers to one.
    pub fn column(&self) -> Option<usize> {
        match self {
            FilterError::TooLong { .. } => None,
            FilterError::Syntax { column, .. }
            | FilterError::InvalidSelector { column, .. }
            | FilterError::InvalidOperator { column, .. }
            | FilterError::InvalidValue { column, .. }
            | FilterError::Evaluation { column, .. } => Some(*column),
        }
    }
}

/// A parsed filter expression.
#[derive(Debug, Clone)]
pub struct Filter {
    expr: Expr,
}

impl Filter {
    /// Parses `expr`. An empty or whitespace-only expression is an error;
    /// callers treat an absent filter as "match everything" themselves.
    pub fn parse(expr: &str) -> Result<Filter, FilterError> {
        if expr.len() > MAX_EXPRESSION_LEN {
            return Err(FilterError::TooLong {
                len: expr.len(),
                max: MAX_EXPRESSION_LEN,
            });
        }
        let (tokens, lex_error) = Lexer::new(expr).tokenize();
        let mut parser = Parser {
            tokens,
            pos: 0,
            depth: 0,
            too_deep: false,
        };
        // The tokens stop where the tokenizer failed; report whichever error
        // comes first in the expression.
        let parsed = parser.parse_complete();
        match (parsed, lex_error) {
            (Ok(_), Some(lex)) => Err(lex),
            (Err(parse), Some(lex)) if parse.column() >= lex.column() => Err(lex),
            (result, _) => result.map(|expr| Filter { expr }),
        }
    }

    /// Checks every selector, operator and value against `template`, an
    /// example entry of the endpoint (see the module documentation).
    pub fn validate(&self, template: &Value) -> Result<(), FilterError> {
        validate_expr(&self.expr, template)
    }

    /// Evaluates the filter against one entry.
    pub fn evaluate(&self, entry: &Value) -> Result<bool, FilterError> {
        eval_expr(&self.expr, entry)
    }

    /// Whether `entry` passes the filter; an entry the filter cannot be
    /// evaluated against does not.
    pub fn matches(&self, entry: &Value) -> bool {
        self.evaluate(entry).unwrap_or(false)
    }
}

// ---------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A selector-shaped word: an identifier followed by `.ident` and
    /// `["key"]` parts. A one-part word may be a keyword.
    Word(Vec<String>),
    Str(String),
    Num(String),
    EqEq,
    NotEq,
    LParen,
    RParen,
    End,
}

impl Tok {
    fn keyword(&self) -> Option<&str> {
        match self {
            Tok::Word(parts) if parts.len() == 1 => Some(parts[0].as_str()),
            _ => None,
        }
    }

    fn is_keyword(&self, kw: &str) -> bool {
        self.keyword() == Some(kw)
    }

    fn describe(&self) -> String {
        match self {
            Tok::Word(parts) => format!("\"{}\"", parts.join(".")),
            Tok::Str(_) => "a string".to_string(),
            Tok::Num(n) => format!("number {n}"),
            Tok::EqEq => "\"==\"".to_string(),
            Tok::NotEq => "\"!=\"".to_string(),
            Tok::LParen => "\"(\"".to_string(),
            Tok::RParen => "\")\"".to_string(),
            Tok::End => "the end of the expression".to_string(),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    column: usize,
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Lexer {
    fn new(input: &str) -> Self {
        Lexer {
            chars: input.chars().collect(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    /// The 1-based column of the current position.
    fn column(&self) -> usize {
        self.pos + 1
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    /// All tokens, ending with `End`. On an error the tokens stop there, the
    /// `End` token is placed at the error, and the error is returned too.
    fn tokenize(mut self) -> (Vec<Token>, Option<FilterError>) {
        let mut tokens = Vec::new();
        loop {
            self.skip_space();
            let column = self.column();
            match self.token() {
                Ok(Some(tok)) => tokens.push(Token { tok, column }),
                Ok(None) => {
                    tokens.push(Token {
                        tok: Tok::End,
                        column,
                    });
                    return (tokens, None);
                }
                Err(err) => {
                    let column = err.column().unwrap_or(column);
                    tokens.push(Token {
                        tok: Tok::End,
                        column,
                    });
                    return (tokens, Some(err));
                }
            }
        }
    }

    /// The next token, `None` at the end.
    fn token(&mut self) -> Result<Option<Tok>, FilterError> {
        let column = self.column();
        let Some(c) = self.peek() else {
            return Ok(None);
        };
        let tok = match c {
            '(' => {
                self.pos += 1;
                Tok::LParen
            }
            ')' => {
                self.pos += 1;
                Tok::RParen
            }
            '=' if self.peek_at(1) == Some('=') => {
                self.pos += 2;
                Tok::EqEq
            }
            '!' if self.peek_at(1) == Some('=') => {
                self.pos += 2;
                Tok::NotEq
            }
            '=' => {
                return Err(FilterError::syntax(
                    column,
                    "unexpected character '=' (equality is written \"==\")",
                ))
            }
            '"' | '`' => Tok::Str(self.string()?),
            '-' | '0'..='9' => Tok::Num(self.number()?),
            c if is_ident_start(c) => Tok::Word(self.word()?),
            c => {
                return Err(FilterError::syntax(
                    column,
                    format!("unexpected character {c:?}"),
                ))
            }
        };
        Ok(Some(tok))
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// `Ident ( "." Ident | "[" _? String _? "]" )*`, no spaces around `.`
    /// or before `[`.
    fn word(&mut self) -> Result<Vec<String>, FilterError> {
        let mut parts = vec![self.ident()];
        loop {
            match self.peek() {
                Some('.') => {
                    if !self.peek_at(1).is_some_and(is_ident_start) {
                        return Err(FilterError::syntax(
                            self.column() + 1,
                            "expected a field name after \".\"",
                        ));
                    }
                    self.pos += 1;
                    parts.push(self.ident());
                }
                Some('[') => {
                    let open = self.column();
                    self.pos += 1;
                    self.skip_space();
                    if !matches!(self.peek(), Some('"' | '`')) {
                        return Err(FilterError::syntax(
                            self.column(),
                            "expected a quoted map key after \"[\"",
                        ));
                    }
                    parts.push(self.string()?);
                    self.skip_space();
                    if self.peek() != Some(']') {
                        return Err(FilterError::syntax(
                            self.column(),
                            format!("expected \"]\" to close the \"[\" at column {open}"),
                        ));
                    }
                    self.pos += 1;
                }
                _ => return Ok(parts),
            }
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)?`, followed by whitespace, `)` or the
    /// end, as in go-bexpr.
    fn number(&mut self) -> Result<String, FilterError> {
        let column = self.column();
        let start = self.pos;
        if self.peek() == Some('-') {
            self.pos += 1;
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(FilterError::syntax(column, "unexpected character '-'"));
            }
        }
        if self.peek() == Some('0') {
            self.pos += 1;
        } else {
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        match self.peek() {
            None | Some(')') => {}
            Some(c) if is_space(c) => {}
            Some(_) => return Err(FilterError::syntax(column, "invalid number literal")),
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    /// A double-quoted string with Go escapes or a backtick raw string.
    fn string(&mut self) -> Result<String, FilterError> {
        let column = self.column();
        let quote = self.peek();
        self.pos += 1;
        let mut out = String::new();
        if quote == Some('`') {
            loop {
                match self.peek() {
                    None => return Err(FilterError::syntax(column, "unterminated string literal")),
                    Some('`') => {
                        self.pos += 1;
                        return Ok(out);
                    }
                    // Go's strconv.Unquote drops carriage returns from raw strings.
                    Some('\r') => self.pos += 1,
                    Some(c) => {
                        out.push(c);
                        self.pos += 1;
                    }
                }
            }
        }
        loop {
            match self.peek() {
                None => return Err(FilterError::syntax(column, "unterminated string literal")),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\n') => {
                    return Err(FilterError::syntax(
                        self.column(),
                        "newline in string literal (use \\n or a backtick string)",
                    ))
                }
                Some('\\') => out.push(self.escape()?),
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// One escape sequence, the current character being the backslash.
    fn escape(&mut self) -> Result<char, FilterError> {
        let column = self.column();
        self.pos += 1;
        let Some(c) = self.peek() else {
            return Err(FilterError::syntax(column, "unterminated string literal"));
        };
        self.pos += 1;
        let simple = match c {
            'a' => Some('\u{07}'),
            'b' => Some('\u{08}'),
            'f' => Some('\u{0C}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\u{0B}'),
            '\\' => Some('\\'),
            '"' => Some('"'),
            _ => None,
        };
        if let Some(ch) = simple {
            return Ok(ch);
        }
        let (radix, digits) = match c {
            'x' => (16, 2),
            'u' => (16, 4),
            'U' => (16, 8),
            '0'..='7' => {
                self.pos -= 1;
                (8, 3)
            }
            _ => {
                return Err(FilterError::syntax(
                    column,
                    format!("invalid escape sequence \"\\{c}\" in string"),
                ))
            }
        };
        let mut code: u32 = 0;
        for _ in 0..digits {
            let digit = self.peek().and_then(|d| d.to_digit(radix)).ok_or_else(|| {
                FilterError::syntax(column, "incomplete escape sequence in string")
            })?;
            code = code * radix + digit;
            self.pos += 1;
        }
        let byte_escape = matches!(c, 'x' | '0'..='7');
        if byte_escape && code > 0x7F {
            return Err(FilterError::syntax(
                column,
                "escapes of bytes above 0x7f are not supported; use \\u",
            ));
        }
        char::from_u32(code).ok_or_else(|| {
            FilterError::syntax(column, "escape sequence is not a valid Unicode character")
        })
    }
}

// ---------------------------------------------------------------------------
// Syntax tree and parser
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Match(Box<MatchExpr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchOp {
    Equal,
    NotEqual,
    In,
    NotIn,
    Contains,
    NotContains,
    IsEmpty,
    IsNotEmpty,
    Matches,
    NotMatches,
}

/// The positive test a [`MatchOp`] performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Equal,
    Contains,
    Empty,
    Matches,
}

impl MatchOp {
    fn as_str(self) -> &'static str {
        match self {
            MatchOp::Equal => "==",
            MatchOp::NotEqual => "!=",
            MatchOp::In => "in",
            MatchOp::NotIn => "not in",
            MatchOp::Contains => "contains",
            MatchOp::NotContains => "not contains",
            MatchOp::IsEmpty => "is empty",
            MatchOp::IsNotEmpty => "is not empty",
            MatchOp::Matches => "matches",
            MatchOp::NotMatches => "not matches",
        }
    }

    /// The test performed and whether its result is negated.
    fn test(self) -> (Test, bool) {
        match self {
            MatchOp::Equal => (Test::Equal, false),
            MatchOp::NotEqual => (Test::Equal, true),
            MatchOp::In | MatchOp::Contains => (Test::Contains, false),
            MatchOp::NotIn | MatchOp::NotContains => (Test::Contains, true),
            MatchOp::IsEmpty => (Test::Empty, false),
            MatchOp::IsNotEmpty => (Test::Empty, true),
            MatchOp::Matches => (Test::Matches, false),
            MatchOp::NotMatches => (Test::Matches, true),
        }
    }

    /// The result when the selected value is absent (missing key or null):
    /// nothing equals, contains or matches it, and it is empty.
    fn when_absent(self) -> bool {
        match self.test() {
            (Test::Empty, negated) => !negated,
            (_, negated) => negated,
        }
    }
}

#[derive(Debug, Clone)]
struct MatchExpr {
    selector: Vec<String>,
    /// Column of the selector.
    column: usize,
    op: MatchOp,
    value: Option<MatchValue>,
}

#[derive(Debug, Clone)]
struct MatchValue {
    raw: String,
    column: usize,
    /// Compiled for `matches` / `not matches`.
    regex: Option<Regex>,
}

impl MatchExpr {
    fn selector_string(&self) -> String {
        self.selector.join(".")
    }

    fn raw(&self) -> &str {
        self.value.as_ref().map_or("", |v| v.raw.as_str())
    }
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
    /// Set once the nesting limit is hit; that error is never backtracked.
    too_deep: bool,
}

/// Of two failed alternatives, report the one that got further (as a PEG
/// parser does).
fn furthest(a: FilterError, b: FilterError) -> FilterError {
    if b.column() > a.column() {
        b
    } else {
        a
    }
}

impl Parser {
    /// The whole token list as one expression.
    fn parse_complete(&mut self) -> Result<Expr, FilterError> {
        let expr = self.parse_or()?;
        let next = self.peek();
        match &next.tok {
            Tok::End => Ok(expr),
            Tok::RParen => Err(FilterError::syntax(
                next.column,
                "unexpected \")\" without a matching \"(\"",
            )),
            _ => Err(FilterError::syntax(
                next.column,
                format!(
                    "expected \"and\", \"or\" or the end of the expression, found {}",
                    next.tok.describe()
                ),
            )),
        }
    }

    fn peek(&self) -> &Token {
        self.peek_at(0)
    }

    fn peek_at(&self, n: usize) -> &Token {
        // The token list always ends with `End`; stay on it.
        let last = self.tokens.len().saturating_sub(1);
        &self.tokens[(self.pos + n).min(last)]
    }

    fn advance(&mut self) -> Token {
        let tok = self.peek().clone();
        if self.pos < self.tokens.len() {
            self.pos += 1;
        }
        tok
    }

    fn enter(&mut self, column: usize) -> Result<(), FilterError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            self.too_deep = true;
            return Err(FilterError::syntax(
                column,
                format!("the expression nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    fn parse_or(&mut self) -> Result<Expr, FilterError> {
        let mut items = vec![self.parse_and()?];
        while self.peek().tok.is_keyword("or") {
            self.advance();
            items.push(self.parse_and()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Or(items)
        })
    }

    fn parse_and(&mut self) -> Result<Expr, FilterError> {
        let mut items = vec![self.parse_not()?];
        while self.peek().tok.is_keyword("and") {
            self.advance();
            items.push(self.parse_not()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::And(items)
        })
    }

    fn parse_not(&mut self) -> Result<Expr, FilterError> {
        if !self.peek().tok.is_keyword("not") {
            return self.parse_primary();
        }
        // As in go-bexpr's grammar, `not` is first tried as the operator and,
        // if that fails, as a selector or bare value (`not in Service.Tags`).
        let start = self.pos;
        let depth = self.depth;
        let column = self.advance().column;
        let unary = self.enter(column).and_then(|()| self.parse_not());
        self.depth = depth;
        match unary {
            Ok(Expr::Not(inner)) => Ok(*inner),
            Ok(inner) => Ok(Expr::Not(Box::new(inner))),
            Err(unary_err) if self.too_deep => Err(unary_err),
            Err(unary_err) => {
                self.pos = start;
                self.parse_primary()
                    .map_err(|primary_err| furthest(unary_err, primary_err))
            }
        }
    }

    fn parse_primary(&mut self) -> Result<Expr, FilterError> {
        if self.peek().tok != Tok::LParen {
            return self.parse_match().map(|m| Expr::Match(Box::new(m)));
        }
        let open = self.advance().column;
        self.enter(open)?;
        let inner = self.parse_or()?;
        self.depth -= 1;
        let next = self.peek();
        if next.tok != Tok::RParen {
            return Err(FilterError::syntax(
                next.column,
                format!(
                    "expected \")\" to close the \"(\" at column {open}, found {}",
                    next.tok.describe()
                ),
            ));
        }
        self.advance();
        Ok(inner)
    }

    /// Whether the tokens from the current one on read `in` or `not in`.
    fn at_in(&self, offset: usize) -> bool {
        let tok = &self.peek_at(offset).tok;
        tok.is_keyword("in")
            || (tok.is_keyword("not") && self.peek_at(offset + 1).tok.is_keyword("in"))
    }

    fn parse_match(&mut self) -> Result<MatchExpr, FilterError> {
        let first = self.peek().clone();
        match &first.tok {
            Tok::Str(_) | Tok::Num(_) => self.parse_value_in_selector(),
            Tok::Word(_) if self.at_in(1) => self.parse_value_in_selector(),
            Tok::Word(parts) => {
                let selector = parts.clone();
                self.advance();
                self.parse_selector_op(selector, first.column)
            }
            Tok::End => Err(FilterError::syntax(
                first.column,
                "expected an expression, found the end of the expression",
            )),
            other => Err(FilterError::syntax(
                first.column,
                format!("expected a selector or a value, found {}", other.describe()),
            )),
        }
    }

    /// `Value ("in" | "not in") Selector`
    fn parse_value_in_selector(&mut self) -> Result<MatchExpr, FilterError> {
        let value_tok = self.advance();
        let raw = match value_tok.tok {
            Tok::Str(s) | Tok::Num(s) => s,
            Tok::Word(parts) => parts.join("."),
            _ => String::new(),
        };
        let op = if self.peek().tok.is_keyword("in") {
            self.advance();
            MatchOp::In
        } else if self.at_in(0) {
            self.advance();
            self.advance();
            MatchOp::NotIn
        } else {
            let next = self.peek();
            return Err(FilterError::syntax(
                next.column,
                format!(
                    "expected \"in\" or \"not in\" after a value, found {}",
                    next.tok.describe()
                ),
            ));
        };
        let sel = self.advance();
        let Tok::Word(selector) = sel.tok else {
            return Err(FilterError::syntax(
                sel.column,
                format!(
                    "expected a selector after \"{}\", found {}",
                    op.as_str(),
                    sel.tok.describe()
                ),
            ));
        };
        Ok(MatchExpr {
            selector,
            column: sel.column,
            op,
            value: Some(MatchValue {
                raw,
                column: value_tok.column,
                regex: None,
            }),
        })
    }

    /// `Selector Op Value` or `Selector "is" ["not"] "empty"`.
    fn parse_selector_op(
        &mut self,
        selector: Vec<String>,
        column: usize,
    ) -> Result<MatchExpr, FilterError> {
        let op_tok = self.advance();
        let op = match &op_tok.tok {
            Tok::EqEq => MatchOp::Equal,
            Tok::NotEq => MatchOp::NotEqual,
            t if t.is_keyword("contains") => MatchOp::Contains,
            t if t.is_keyword("matches") => MatchOp::Matches,
            t if t.is_keyword("not") => {
                let next = self.advance();
                if next.tok.is_keyword("contains") {
                    MatchOp::NotContains
                } else if next.tok.is_keyword("matches") {
                    MatchOp::NotMatches
                } else {
                    return Err(FilterError::syntax(
                        next.column,
                        format!(
                            "expected \"contains\" or \"matches\" after \"not\", found {}",
                            next.tok.describe()
                        ),
                    ));
                }
            }
            t if t.is_keyword("is") => {
                let mut next = self.advance();
                let negated = next.tok.is_keyword("not");
                if negated {
                    next = self.advance();
                }
                if !next.tok.is_keyword("empty") {
                    let after = if negated { "is not" } else { "is" };
                    return Err(FilterError::syntax(
                        next.column,
                        format!(
                            "expected \"empty\" after \"{after}\", found {}",
                            next.tok.describe()
                        ),
                    ));
                }
                let op = if negated {
                    MatchOp::IsNotEmpty
                } else {
                    MatchOp::IsEmpty
                };
                return Ok(MatchExpr {
                    selector,
                    column,
                    op,
                    value: None,
                });
            }
            other => {
                return Err(FilterError::syntax(
                    op_tok.column,
                    format!(
                        "expected an operator (==, !=, contains, matches, is empty, ...) after the selector, found {}",
                        other.describe()
                    ),
                ))
            }
        };
        let value_tok = self.advance();
        let raw = match value_tok.tok {
            Tok::Str(s) | Tok::Num(s) => s,
            Tok::Word(parts) => parts.join("."),
            other => {
                return Err(FilterError::syntax(
                    value_tok.column,
                    format!(
                        "expected a value after \"{}\", found {}",
                        op.as_str(),
                        other.describe()
                    ),
                ))
            }
        };
        let regex = match op {
            MatchOp::Matches | MatchOp::NotMatches => Some(compile_regex(&raw, value_tok.column)?),
            _ => None,
        };
        Ok(MatchExpr {
            selector,
            column,
            op,
            value: Some(MatchValue {
                raw,
                column: value_tok.column,
                regex,
            }),
        })
    }
}

fn compile_regex(pattern: &str, column: usize) -> Result<Regex, FilterError> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|err| {
            // The regex crate's syntax errors span several lines; keep the
            // line that says what is wrong.
            let text = err.to_string();
            let reason = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid pattern")
                .trim()
                .trim_start_matches("error: ")
                .to_string();
            FilterError::syntax(column, format!("invalid regular expression: {reason}"))
        })
}

// ---------------------------------------------------------------------------
// Go-compatible conversions of values
// ---------------------------------------------------------------------------

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)` / `ParseUint(s, 0, 64)`: optional sign,
/// `0x`/`0o`/`0b` prefixes, a leading `0` for octal, `_` between digits.
/// Returns a value in `i64::MIN..=u64::MAX`.
fn parse_go_int(s: &str) -> Option<i128> {
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let bytes = body.as_bytes();
    let (radix, digits, prefixed) = if bytes.len() >= 3
        && bytes[0] == b'0'
        && matches!(bytes[1].to_ascii_lowercase(), b'x' | b'o' | b'b')
    {
        let radix = match bytes[1].to_ascii_lowercase() {
            b'x' => 16,
            b'o' => 8,
            _ => 2,
        };
        (radix, &body[2..], true)
    } else if bytes.first() == Some(&b'0') && bytes.len() > 1 {
        (8, &body[1..], true)
    } else {
        (10, body, false)
    };
    if digits.is_empty() {
        return None;
    }
    // Underscores must separate digits (a base prefix counts as a digit).
    let mut prev_digit = prefixed;
    let mut saw_digit = false;
    let mut value: u128 = 0;
    for c in digits.chars() {
        if c == '_' {
            if !prev_digit {
                return None;
            }
            prev_digit = false;
            continue;
        }
        let d = c.to_digit(radix)?;
        value = value
            .checked_mul(u128::from(radix))?
            .checked_add(u128::from(d))?;
        if value > u128::from(u64::MAX) {
            return None;
        }
        prev_digit = true;
        saw_digit = true;
    }
    if !prev_digit || !saw_digit {
        return None;
    }
    let value = i128::try_from(value).ok()?;
    let value = if negative { -value } else { value };
    (value >= i128::from(i64::MIN)).then_some(value)
}

/// Go's `strconv.ParseFloat(s, 64)`, short of hex floats and underscores.
fn parse_go_float(s: &str) -> Option<f64> {
    if s.contains('_') {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Compares a JSON number with a value; `None` if the value is not a number.
fn number_equals(n: &Number, raw: &str) -> Option<bool> {
    if let Some(i) = parse_go_int(raw) {
        if let Some(a) = n.as_i64() {
            return Some(i128::from(a) == i);
        }
        if let Some(a) = n.as_u64() {
            return Some(i128::from(a) == i);
        }
        // A float field: compare as floats (precision loss as in Go).
        return n.as_f64().map(|a| a == i as f64);
    }
    let f = parse_go_float(raw)?;
    n.as_f64().map(|a| a == f)
}

/// Compares a scalar JSON value with a value converted to its type; `None`
/// if the value does not convert or the JSON value is not a scalar.
fn scalar_equals(v: &Value, raw: &str) -> Option<bool> {
    match v {
        Value::String(s) => Some(s == raw),
        Value::Number(n) => number_equals(n, raw),
        Value::Bool(b) => parse_go_bool(raw).map(|r| r == *b),
        _ => None,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------

fn eval_expr(expr: &Expr, entry: &Value) -> Result<bool, FilterError> {
    match expr {
        Expr::Or(items) => {
            for item in items {
                if eval_expr(item, entry)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Expr::And(items) => {
            for item in items {
                if !eval_expr(item, entry)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Expr::Not(inner) => Ok(!eval_expr(inner, entry)?),
        Expr::Match(m) => m.eval(entry, 0),
    }
}

impl MatchExpr {
    fn eval_error(&self, reason: String) -> FilterError {
        FilterError::Evaluation {
            column: self.column,
            selector: self.selector_string(),
            reason,
        }
    }

    /// Evaluates the match against `value`, the value selected by the first
    /// `depth` parts of the selector.
    fn eval(&self, value: &Value, depth: usize) -> Result<bool, FilterError> {
        let Some(part) = self.selector.get(depth) else {
            return self.eval_leaf(value);
        };
        match value {
            // Passing through a list: true if the match holds for any element.
            Value::Array(items) => {
                for item in items {
                    if self.eval(item, depth)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Value::Object(map) => match map.get(part) {
                Some(next) => self.eval(next, depth + 1),
                None => Ok(self.op.when_absent()),
            },
            Value::Null => Ok(self.op.when_absent()),
            other => Err(self.eval_error(format!(
                "cannot select \"{part}\" inside {}",
                json_type(other)
            ))),
        }
    }

    fn eval_leaf(&self, value: &Value) -> Result<bool, FilterError> {
        if value.is_null() {
            return Ok(self.op.when_absent());
        }
        let (test, negated) = self.op.test();
        let raw = self.raw();
        let unsupported = || {
            self.eval_error(format!(
                "\"{}\" cannot be used on {}",
                self.op.as_str(),
                json_type(value)
            ))
        };
        let result = match test {
            Test::Equal => match value {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => scalar_equals(value, raw)
                    .ok_or_else(|| {
                    self.eval_error(format!(
                        "value \"{raw}\" cannot be compared with {}",
                        json_type(value)
                    ))
                })?,
                _ => return Err(unsupported()),
            },
            Test::Contains => match value {
                Value::String(s) => s.contains(raw),
                Value::Object(map) => map.contains_key(raw),
                Value::Array(items) => {
                    let mut found = false;
                    for item in items {
                        match item {
                            Value::Null => {}
                            Value::Array(_) | Value::Object(_) => {
                                return Err(self.eval_error(format!(
                                    "\"{}\" cannot look for a value in a list of {}",
                                    self.op.as_str(),
                                    if item.is_array() { "lists" } else { "objects" }
                                )))
                            }
                            // Elements the value does not convert to are skipped.
                            _ => {
                                if scalar_equals(item, raw) == Some(true) {
                                    found = true;
                                    break;
                                }
                            }
                        }
                    }
                    found
                }
                _ => return Err(unsupported()),
            },
            Test::Empty => match value {
                Value::String(s) => s.is_empty(),
                Value::Array(items) => items.is_empty(),
                Value::Object(map) => map.is_empty(),
                _ => return Err(unsupported()),
            },
            Test::Matches => match (value, self.value.as_ref().and_then(|v| v.regex.as_ref())) {
                (Value::String(s), Some(re)) => re.is_match(s),
                _ => return Err(unsupported()),
            },
        };
        Ok(result != negated)
    }
}

// ---------------------------------------------------------------------------
// Validation against a template entry
// ---------------------------------------------------------------------------

/// What a part of the template says about the values at that place.
#[derive(Debug, Clone, Copy)]
enum Shape<'a> {
    /// Only these keys.
    Struct(&'a Map<String, Value>),
    /// Any key; values shaped like the member, or strings.
    Map(Option<&'a Value>),
    /// Elements shaped like the example, or strings.
    List(Option<&'a Value>),
    Str,
    Int,
    Float,
    Bool,
    /// `null`: anything.
    Any,
}

fn shape_of(v: &Value) -> Shape<'_> {
    match v {
        Value::Object(m) if m.is_empty() => Shape::Map(None),
        Value::Object(m) if m.len() == 1 && m.contains_key("*") => Shape::Map(m.get("*")),
        Value::Object(m) => Shape::Struct(m),
        Value::Array(items) => Shape::List(items.first()),
        Value::String(_) => Shape::Str,
        Value::Number(n) if n.is_f64() => Shape::Float,
        Value::Number(_) => Shape::Int,
        Value::Bool(_) => Shape::Bool,
        Value::Null => Shape::Any,
    }
}

fn element_shape(elem: Option<&Value>) -> Shape<'_> {
    elem.map_or(Shape::Str, shape_of)
}

fn validate_expr(expr: &Expr, template: &Value) -> Result<(), FilterError> {
    match expr {
        Expr::Or(items) | Expr::And(items) => items
            .iter()
            .try_for_each(|item| validate_expr(item, template)),
        Expr::Not(inner) => validate_expr(inner, template),
        Expr::Match(m) => m.validate(template),
    }
}

impl MatchExpr {
    fn validate(&self, template: &Value) -> Result<(), FilterError> {
        let leaf = self.resolve(template)?;
        let (test, _) = self.op.test();
        let invalid_operator = || FilterError::InvalidOperator {
            column: self.column,
            operator: self.op.as_str(),
            selector: self.selector_string(),
        };
        // The type the value must convert to, if any.
        let value_type = match (leaf, test) {
            (Shape::Any, _) => None,
            (Shape::Str, _) => None,
            (Shape::Int | Shape::Float | Shape::Bool, Test::Equal) => Some(leaf),
            (Shape::Map(_), Test::Contains | Test::Empty) => None,
            (Shape::List(_), Test::Empty) => None,
            (Shape::List(elem), Test::Contains) => match element_shape(elem) {
                s @ (Shape::Int | Shape::Float | Shape::Bool) => Some(s),
                Shape::Str | Shape::Any => None,
                _ => return Err(invalid_operator()),
            },
            _ => return Err(invalid_operator()),
        };
        let raw = self.raw();
        let reason = match value_type {
            Some(Shape::Int) if parse_go_int(raw).is_none() => Some("expected an integer"),
            Some(Shape::Float) if parse_go_float(raw).is_none() => Some("expected a number"),
            Some(Shape::Bool) if parse_go_bool(raw).is_none() => {
                Some("expected a boolean (true or false)")
            }
            _ => None,
        };
        match reason {
            Some(reason) => Err(FilterError::InvalidValue {
                column: self.value.as_ref().map_or(self.column, |v| v.column),
                value: raw.to_string(),
                selector: self.selector_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Follows the selector through the template to the selected shape.
    fn resolve<'a>(&self, template: &'a Value) -> Result<Shape<'a>, FilterError> {
        let mut shape = shape_of(template);
        for (i, part) in self.selector.iter().enumerate() {
            // Lists are transparent: select inside their elements.
            while let Shape::List(elem) = shape {
                shape = element_shape(elem);
            }
            shape = match shape {
                Shape::Any => return Ok(Shape::Any),
                Shape::Struct(fields) => match fields.get(part) {
                    Some(v) => shape_of(v),
                    None => return Err(self.invalid_selector(i)),
                },
                Shape::Map(values) => element_shape(values),
                _ => return Err(self.invalid_selector(i)),
            };
        }
        Ok(shape)
    }

    fn invalid_selector(&self, upto: usize) -> FilterError {
        FilterError::InvalidSelector {
            column: self.column,
            selector: self.selector[..=upto].join("."),
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1",
                     "TaggedAddresses": {}, "Meta": {"rack": "r1"}},
            "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "primary"],
                        "Meta": {"team": "a", "a.b": "c"}, "Port": 8080,
                        "Address": "10.0.0.5", "EnableTagOverride": false},
            "Checks": [
                {"CheckID": "c1", "Status": "passing", "ServiceName": "web"},
                {"CheckID": "c2", "Status": "critical", "ServiceName": "web"}
            ]
        })
    }

    fn template() -> Value {
        json!({
            "Node": {"Node": "", "Address": "", "Datacenter": "",
                     "TaggedAddresses": {}, "Meta": {}},
            "Service": {"ID": "", "Service": "", "Tags": [], "Meta": {}, "Port": 0,
                        "Address": "", "EnableTagOverride": false,
                        "Weights": {"Passing": 1, "Warning": 1},
                        "TaggedAddresses": {"*": {"Address": "", "Port": 0}}},
            "Checks": [{"CheckID": "", "Status": "", "ServiceName": "",
                        "ServiceTags": []}]
        })
    }

    fn check_table(entry: &Value, cases: &[(&str, bool)]) {
        for &(expr, expected) in cases {
            let filter = Filter::parse(expr).unwrap_or_else(|e| panic!("{expr:?}: {e}"));
            assert_eq!(filter.matches(entry), expected, "{expr:?}");
        }
    }

    #[test]
    fn equality() {
        check_table(
            &entry(),
            &[
                ("Service.Service == web", true),
                ("Service.Service == \"web\"", true),
                ("Service.Service == `web`", true),
                ("Service.Service == Web", false),
                ("Service.Service != web", false),
                ("Service.Service != \"api\"", true),
                ("Service.ID == \"web-1\"", true),
                ("Node.Address == \"10.0.0.1\"", true),
                ("Node.Datacenter==dc1", true),
                ("Service.Service == 123", false),
                ("Service.Service == and", false),
                ("Service.Service == web.x", false),
            ],
        );
    }

    #[test]
    fn numbers_and_bools() {
        check_table(
            &entry(),
            &[
                ("Service.Port == 8080", true),
                ("Service.Port == \"8080\"", true),
                ("Service.Port == `0x1F90`", true),
                ("Service.Port == \"0o17620\"", true),
                ("Service.Port == \"8_080\"", true),
                ("Service.Port == \"+8080\"", true),
                ("Service.Port == 80", false),
                ("Service.Port != 8080", false),
                ("Service.Port != -1", true),
                ("Service.Port == 8080.0", true),
                ("Service.EnableTagOverride == false", true),
                ("Service.EnableTagOverride == \"F\"", true),
                ("Service.EnableTagOverride == 0", true),
                ("Service.EnableTagOverride == true", false),
                ("Service.EnableTagOverride != true", true),
                ("Service.EnableTagOverride == False", true),
            ],
        );
        let floats = json!({"W": 0.5, "Big": 18446744073709551615u64, "Neg": -3});
        check_table(
            &floats,
            &[
                ("W == 0.5", true),
                ("W == \"5e-1\"", true),
                ("W != 0.5", false),
                ("Big == \"18446744073709551615\"", true),
                ("Big == \"0xffffffffffffffff\"", true),
                ("Neg == -3", true),
                ("Neg == \"-0x3\"", true),
            ],
        );
    }

    #[test]
    fn membership_and_substrings() {
        check_table(
            &entry(),
            &[
                ("\"v1\" in Service.Tags", true),
                ("v1 in Service.Tags", true),
                ("\"v2\" in Service.Tags", false),
                ("\"v\" in Service.Tags", false),
                ("\"v2\" not in Service.Tags", true),
                ("\"v1\" not in Service.Tags", false),
                ("Service.Tags contains \"primary\"", true),
                ("Service.Tags contains v1", true),
                ("Service.Tags not contains \"v1\"", false),
                ("Service.Tags not contains \"v3\"", true),
                ("\"we\" in Service.Service", true),
                ("Service.Service contains \"eb\"", true),
                ("Service.Service contains \"\"", true),
                ("\"x\" not in Service.Service", true),
                ("\"team\" in Service.Meta", true),
                ("team in Service.Meta", true),
                ("\"a\" in Service.Meta", false),
                ("Service.Meta contains \"a.b\"", true),
                ("Service.Meta not contains \"team\"", false),
                ("not in Service.Tags", false),
            ],
        );
        let nums = json!({"L": [1, "x", true, 3.5]});
        check_table(
            &nums,
            &[
                ("1 in L", true),
                ("\"0x1\" in L", true),
                ("2 in L", false),
                ("x in L", true),
                ("true in L", true),
                ("3.5 in L", true),
            ],
        );
    }

    #[test]
    fn emptiness() {
        check_table(
            &entry(),
            &[
                ("Service.Meta is empty", false),
                ("Service.Meta is not empty", true),
                ("Node.TaggedAddresses is empty", true),
                ("Node.TaggedAddresses is not empty", false),
                ("Service.Tags is not empty", true),
                ("Checks is not empty", true),
                ("Checks is empty", false),
                ("Service.Meta.team is not empty", true),
                ("Service.Meta.team is empty", false),
                ("Service.Meta.x is empty", true),
                ("Service.Meta.x is not empty", false),
            ],
        );
    }

    #[test]
    fn regular_expressions() {
        check_table(
            &entry(),
            &[
                ("Service.Service matches \"^w.b$\"", true),
                ("Service.ID matches \"^web-[0-9]+$\"", true),
                ("Service.Service matches api", false),
                ("Service.Service not matches \"^api\"", true),
                ("Service.Service not matches \"^web\"", false),
                ("Node.Node matches \"N1\"", false),
                ("Node.Node matches \"(?i)N1\"", true),
                ("Service.Address matches `^10\\.0\\.0\\.\\d+$`", true),
                ("Service.Address matches \"^10\\\\.0\"", true),
            ],
        );
    }

    #[test]
    fn selectors_and_index_form() {
        check_table(
            &entry(),
            &[
                ("Service.Meta.team == a", true),
                ("Service.Meta[\"team\"] == \"a\"", true),
                ("Service.Meta[ \"team\" ] == \"a\"", true),
                ("Service.Meta[\"a.b\"] == \"c\"", true),
                ("Service.Meta[`a.b`] == c", true),
                ("Service[\"Meta\"][\"team\"] == a", true),
                ("Node.Meta.rack == r1", true),
                ("node.Meta.rack == r1", false),
                ("Node.Meta.Rack == r1", false),
            ],
        );
    }

    #[test]
    fn missing_keys() {
        check_table(
            &entry(),
            &[
                ("Service.Meta.x == \"\"", false),
                ("Service.Meta.x == anything", false),
                ("Service.Meta.x != \"anything\"", true),
                ("Service.Meta.x != \"\"", true),
                ("\"y\" in Service.Meta.x", false),
                ("\"y\" not in Service.Meta.x", true),
                ("Service.Meta.x contains y", false),
                ("Service.Meta.x not contains y", true),
                ("Service.Meta.x matches \".*\"", false),
                ("Service.Meta.x not matches \"a\"", true),
                ("not Service.Meta.x == \"z\"", true),
                ("Service.Nope.deeper == x", false),
                ("Service.Nope.deeper != x", true),
                ("Missing == x", false),
            ],
        );
        let nulls = json!({"Meta": null, "S": null});
        check_table(
            &nulls,
            &[
                ("Meta.x == a", false),
                ("Meta.x != a", true),
                ("Meta is empty", true),
                ("S == a", false),
                ("S is not empty", false),
            ],
        );
    }

    #[test]
    fn arrays_of_objects() {
        check_table(
            &entry(),
            &[
                ("Checks.Status == critical", true),
                ("Checks.Status == passing", true),
                ("Checks.Status == warning", false),
                ("Checks.Status != passing", true),
                ("Checks.ServiceName != web", false),
                ("not Checks.Status == critical", false),
                ("not Checks.Status == warning", true),
                ("Checks.CheckID == c1 and Checks.Status == critical", true),
                ("\"crit\" in Checks.Status", true),
                ("Checks.Status matches \"^pass\"", true),
                ("Checks.Status not matches \"^pass\"", true),
                ("Checks.Missing == x", false),
                ("Checks.Missing != x", true),
            ],
        );
        let none = json!({"Checks": []});
        check_table(
            &none,
            &[
                ("Checks.Status == passing", false),
                ("Checks.Status != passing", false),
                ("Checks.Status is empty", false),
                ("Checks is empty", true),
            ],
        );
        let nested = json!({"L": [[{"A": "x"}], [{"A": "y"}]]});
        check_table(&nested, &[("L.A == y", true), ("L.A == z", false)]);
    }

    #[test]
    fn boolean_logic_and_precedence() {
        check_table(
            &entry(),
            &[
                (
                    "Service.Port == 1 and Service.Port == 2 or Service.Service == web",
                    true,
                ),
                (
                    "Service.Service == web or Service.Port == 1 and Service.Port == 2",
                    true,
                ),
                (
                    "(Service.Service == web or Service.Port == 1) and Service.Port == 2",
                    false,
                ),
                ("not Service.Service == web or Service.Port == 8080", true),
                (
                    "not (Service.Service == web or Service.Port == 8080)",
                    false,
                ),
                ("not Service.Service == api and Service.Port == 8080", true),
                ("not Service.Service == web and Service.Port == 8080", false),
                ("not not Service.Service == web", true),
                ("not not not Service.Service == web", false),
                ("((Service.Service == web))", true),
                (" ( Service.Service==web ) ", true),
                ("\n\tService.Service == web\r\n", true),
                ("not(Service.Service == api)", true),
                ("(Service.Port == 1)or(Service.Port == 8080)", true),
                (
                    "Service.Port == 1 or Service.Port == 2 or Service.Port == 8080",
                    true,
                ),
                (
                    "Service.Port == 8080 and Service.Service == web and \"v1\" in Service.Tags",
                    true,
                ),
                (
                    "Service.Port == 8080 and Service.Service == web and \"v9\" in Service.Tags",
                    false,
                ),
            ],
        );
    }

    #[test]
    fn string_literals() {
        check_table(
            &entry(),
            &[
                ("Service.Service == \"w\\x65b\"", true),
                ("Service.Service == \"w\\145b\"", true),
                ("Service.ID == \"web\\u002d1\"", true),
                ("Service.ID == \"web\\U0000002d1\"", true),
                ("Service.ID == `web-1`", true),
                ("Service.ID == \"web\\t1\"", false),
            ],
        );
        let quoted = json!({"S": "a\"b\\c", "R": "x\\ny", "T": "é😀"});
        check_table(
            &quoted,
            &[
                ("S == \"a\\\"b\\\\c\"", true),
                ("S == `a\"b\\c`", true),
                ("R == `x\\ny`", true),
                ("R == \"x\\ny\"", false),
                ("T == \"\\u00e9\\U0001F600\"", true),
                ("T == `é😀`", true),
            ],
        );
    }

    #[test]
    fn evaluation_errors_do_not_match() {
        let e = entry();
        for expr in [
            "Service.Port == abc",
            "Service.Port != abc",
            "not Service.Port == abc",
            "Service.Tags == v1",
            "Service.Service.x == y",
            "Service.Port contains 8",
            "Service.Port matches \"8\"",
            "Service.Port is empty",
            "Service.Port is empty and Service.Service == web",
        ] {
            let filter = Filter::parse(expr).unwrap();
            assert!(!filter.matches(&e), "{expr}");
            let err = filter.evaluate(&e).unwrap_err();
            assert!(
                matches!(err, FilterError::Evaluation { .. }),
                "{expr}: {err}"
            );
        }
        // Short-circuiting skips the failing branch, as in go-bexpr.
        let filter = Filter::parse("Service.Service == web or Service.Port == abc").unwrap();
        assert_eq!(filter.evaluate(&e), Ok(true));
        let err = Filter::parse("Service.Port == abc")
            .unwrap()
            .evaluate(&e)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "filter: at column 1: cannot evaluate selector \"Service.Port\": \
             value \"abc\" cannot be compared with a number"
        );
    }

    #[test]
    fn syntax_errors() {
        let cases: &[(&str, usize, &str)] = &[
            ("Service.Port == ", 17, "expected a value after \"==\""),
            ("Service.Port ==", 16, "expected a value after \"==\""),
            ("", 1, "expected an expression"),
            ("   ", 4, "expected an expression"),
            ("Service.Port = 80", 14, "unexpected character '='"),
            ("Service.Port == 80 and", 23, "expected an expression"),
            ("Service.Port == 80 and or", 26, "expected an operator"),
            ("a == == 1 && b", 6, "expected a value after \"==\""),
            ("a == 1 and b ==", 16, "expected a value"),
            (
                "(Service.Port == 80",
                20,
                "expected \")\" to close the \"(\" at column 1",
            ),
            ("Service.Port == 80)", 19, "unexpected \")\""),
            ("Service.Meta[\"a", 14, "unterminated string literal"),
            ("Service.Meta[a] == b", 14, "expected a quoted map key"),
            (
                "Service.Meta[\"a\" == b",
                18,
                "expected \"]\" to close the \"[\" at column 13",
            ),
            ("Service. Port == 1", 9, "expected a field name after \".\""),
            ("Service.1 == 1", 9, "expected a field name after \".\""),
            ("\"v1\" == Service.Tags", 6, "expected \"in\" or \"not in\""),
            ("\"v1\" in \"x\"", 9, "expected a selector after \"in\""),
            (
                "\"v1\" not in 5",
                13,
                "expected a selector after \"not in\"",
            ),
            (
                "Service.Tags in \"v1\"",
                17,
                "expected a selector after \"in\"",
            ),
            ("Service.Port == 08", 17, "invalid number literal"),
            ("Service.Port == 80x", 17, "invalid number literal"),
            ("Service.Port == 1.", 17, "invalid number literal"),
            ("Service.Port == 1e3", 17, "invalid number literal"),
            ("Service.Port == -", 17, "unexpected character '-'"),
            (
                "Service.Tags is full",
                17,
                "expected \"empty\" after \"is\"",
            ),
            (
                "Service.Tags is not",
                20,
                "expected \"empty\" after \"is not\"",
            ),
            (
                "Service.Tags not foo \"x\"",
                18,
                "expected \"contains\" or \"matches\"",
            ),
            ("Service.Tags foo \"x\"", 14, "expected an operator"),
            ("Service.Tags", 13, "expected an operator"),
            (
                "Service.Name matches \"(\"",
                22,
                "invalid regular expression",
            ),
            (
                "Service.Name == \"a\\qb\"",
                19,
                "invalid escape sequence \"\\q\"",
            ),
            ("Service.Name == \"a\\'b\"", 19, "invalid escape sequence"),
            ("Service.Name == \"\\x8f\"", 18, "above 0x7f"),
            (
                "Service.Name == \"\\ud800\"",
                18,
                "not a valid Unicode character",
            ),
            ("Service.Name == \"\\x4\"", 18, "incomplete escape sequence"),
            ("Service.Name == \"abc", 17, "unterminated string literal"),
            ("Service.Name == `abc", 17, "unterminated string literal"),
            ("Service.Name == \"a\nb\"", 19, "newline in string literal"),
            (
                "Service.Name == web foo",
                21,
                "expected \"and\", \"or\" or the end",
            ),
            (
                "a == 1 AND b == 2",
                8,
                "expected \"and\", \"or\" or the end",
            ),
            ("a == 1 && b == 2", 8, "unexpected character '&'"),
            ("_a == 1", 1, "unexpected character '_'"),
            ("Sérvice == 1", 2, "unexpected character 'é'"),
            ("not", 4, "expected an expression"),
            ("not Service.Port ==", 20, "expected a value after \"==\""),
            ("()", 2, "expected a selector or a value"),
        ];
        for &(expr, column, message) in cases {
            let err = Filter::parse(expr).expect_err(expr);
            assert_eq!(err.column(), Some(column), "{expr:?}: {err}");
            assert!(err.to_string().contains(message), "{expr:?}: {err}");
            assert!(err.to_string().starts_with("filter: at column "), "{err}");
        }
        assert_eq!(
            Filter::parse("Service.Port == ").unwrap_err().to_string(),
            "filter: at column 17: expected a value after \"==\", found the end of the expression"
        );
    }

    #[test]
    fn limits() {
        let ok = format!("{}a == 1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(Filter::parse(&ok).is_ok());
        let deep = format!(
            "{}a == 1{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        );
        let err = Filter::parse(&deep).unwrap_err();
        assert!(err.to_string().contains("nests deeper"), "{err}");
        assert_eq!(err.column(), Some(MAX_DEPTH + 1));

        let nots = format!("{}a == 1", "not ".repeat(MAX_DEPTH + 1));
        let err = Filter::parse(&nots).unwrap_err();
        assert!(err.to_string().contains("nests deeper"), "{err}");
        let nots = format!("{}a == 1", "not ".repeat(MAX_DEPTH));
        assert!(Filter::parse(&nots).is_ok());

        // Long flat chains are fine (they do not nest).
        let chain = vec!["a == 1"; 400].join(" or ");
        assert!(chain.len() <= MAX_EXPRESSION_LEN);
        assert!(Filter::parse(&chain).is_ok());

        let long = format!("a == \"{}\"", "x".repeat(MAX_EXPRESSION_LEN));
        assert!(matches!(
            Filter::parse(&long),
            Err(FilterError::TooLong {
                max: MAX_EXPRESSION_LEN,
                ..
            })
        ));

        // A pattern whose compiled program exceeds the size limit.
        let err = Filter::parse("a matches `(\\w{100}){100}`").unwrap_err();
        assert!(
            err.to_string().contains("invalid regular expression"),
            "{err}"
        );
    }

    #[test]
    fn validate_accepts() {
        let t = template();
        for expr in [
            "Service.Meta.team == a",
            "Service.Meta[\"a.b\"] == c",
            "Node.Meta.anything != x",
            "Node.TaggedAddresses.lan == \"10.0.0.1\"",
            "Service.TaggedAddresses.lan.Port == 80",
            "Service.TaggedAddresses is empty",
            "Checks.Status == passing",
            "\"v1\" in Checks.ServiceTags",
            "\"v1\" in Service.Tags",
            "Service.Tags is not empty",
            "Service.Port == 8080",
            "Service.Port == \"0x50\"",
            "Service.Weights.Passing != 1",
            "Service.EnableTagOverride == true",
            "Service.EnableTagOverride == T",
            "Service.Meta is empty",
            "\"team\" in Service.Meta",
            "Service.Meta contains team",
            "Service.ID matches \"^web\"",
            "Service.ID contains web",
            "Service.Meta.x is not empty",
            "Checks is empty",
            "not (Service.Service == web or Checks.Status != passing)",
        ] {
            let filter = Filter::parse(expr).unwrap();
            assert_eq!(filter.validate(&t), Ok(()), "{expr}");
        }
        // null in a template accepts anything below it.
        let open = json!({"Proxy": null});
        let filter = Filter::parse("Proxy.Upstreams.x matches y").unwrap();
        assert_eq!(filter.validate(&open), Ok(()));
    }

    #[test]
    fn validate_rejects() {
        let t = template();
        let cases: &[(&str, &str)] = &[
            ("Service.Foo == x", "at column 1: Selector \"Service.Foo\" is not valid"),
            ("service.Service == web", "Selector \"service\" is not valid"),
            ("Service.Meta.team.x == a", "Selector \"Service.Meta.team.x\" is not valid"),
            ("Service.Tags.x == a", "Selector \"Service.Tags.x\" is not valid"),
            ("Checks.Foo == x", "Selector \"Checks.Foo\" is not valid"),
            ("Service.Port.x == 1", "Selector \"Service.Port.x\" is not valid"),
            (
                "Service.Service == web and \"x\" in Node.Nope",
                "at column 35: Selector \"Node.Nope\" is not valid",
            ),
            (
                "Service.Port == abc",
                "at column 17: Failed to coerce value \"abc\" for selector \"Service.Port\": expected an integer",
            ),
            ("Service.Port == 80.5", "Failed to coerce value \"80.5\""),
            ("Service.EnableTagOverride == yes", "expected a boolean"),
            ("Service.Tags == v1", "Invalid match operator \"==\" for selector \"Service.Tags\""),
            ("Service is empty", "Invalid match operator \"is empty\" for selector \"Service\""),
            ("Service.Port matches \"8\"", "Invalid match operator \"matches\""),
            ("Service.Port contains 8", "Invalid match operator \"contains\""),
            ("\"8\" in Service.Port", "Invalid match operator \"in\""),
            ("Checks == x", "Invalid match operator \"==\" for selector \"Checks\""),
            ("\"x\" in Checks", "Invalid match operator \"in\" for selector \"Checks\""),
            ("Service.Meta == x", "Invalid match operator \"==\""),
            ("Service.Meta matches x", "Invalid match operator \"matches\""),
            ("Service.Port is empty", "Invalid match operator \"is empty\""),
        ];
        for &(expr, message) in cases {
            let filter = Filter::parse(expr).unwrap();
            let err = filter.validate(&t).expect_err(expr);
            assert!(err.to_string().contains(message), "{expr:?}: {err}");
        }
        let typed = json!({"L": [0], "B": [true], "F": 1.0});
        for (expr, ok) in [
            ("5 in L", true),
            ("x in L", false),
            ("true in B", true),
            ("2 in B", false),
            ("F == 2.5", true),
            ("F == 2", true),
            ("F == x", false),
        ] {
            let result = Filter::parse(expr).unwrap().validate(&typed);
            assert_eq!(result.is_ok(), ok, "{expr}: {result:?}");
        }
    }

    #[test]
    fn generated_inputs_never_panic() {
        const PIECES: &[&str] = &[
            "Service.Port",
            "Checks.Status",
            "Service.Meta[\"a.b\"]",
            "not",
            "and",
            "or",
            "in",
            "is",
            "empty",
            "contains",
            "matches",
            "==",
            "!=",
            "(",
            ")",
            "\"v1\"",
            "`x`",
            "8080",
            "-1.5",
            "0x1",
            "[",
            "]",
            ".",
            "\"\\u00",
            "é",
            "=",
            "!",
            " ",
            "Service.Tags",
            "\"(\"",
            "\"a\\\"b\"",
        ];
        let (e, t) = (entry(), template());
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut expr = String::new();
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let len = (seed >> 60) as usize + 1;
            for _ in 0..len {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                expr.push_str(PIECES[(seed >> 33) as usize % PIECES.len()]);
                expr.push(' ');
            }
            if let Ok(filter) = Filter::parse(&expr) {
                let _ = filter.validate(&t);
                let _ = filter.evaluate(&e);
            }
        }
    }

    #[test]
    fn go_integer_parsing() {
        let cases: &[(&str, Option<i128>)] = &[
            ("0", Some(0)),
            ("-0", Some(0)),
            ("8080", Some(8080)),
            ("+5", Some(5)),
            ("-5", Some(-5)),
            ("0x1f", Some(31)),
            ("0X1F", Some(31)),
            ("0o17", Some(15)),
            ("017", Some(15)),
            ("0b101", Some(5)),
            ("1_000", Some(1000)),
            ("0x_1f", Some(31)),
            ("0_7", Some(7)),
            ("08", None),
            ("0x", None),
            ("_1", None),
            ("1_", None),
            ("1__0", None),
            ("", None),
            ("-", None),
            ("1.0", None),
            ("9223372036854775807", Some(i128::from(i64::MAX))),
            ("-9223372036854775808", Some(i128::from(i64::MIN))),
            ("-9223372036854775809", None),
            ("18446744073709551615", Some(i128::from(u64::MAX))),
            ("18446744073709551616", None),
        ];
        for &(s, expected) in cases {
            assert_eq!(parse_go_int(s), expected, "{s:?}");
        }
    }
}
