//! Request path normalisation, pure: the one form of a request's path that the gateway routes
//! on and forwards, so that no spelling of a path reaches a place its plain spelling would not.
//!
//! The rules, applied once per request before routing (HTTP/1.1 and HTTP/2 alike):
//! - **Percent-encoding** (RFC 3986 §6.2.2.2): an escape of an unreserved character
//!   (`A-Z a-z 0-9 - . _ ~`) is decoded; every other escape is kept, its hex digits upper-cased
//!   (`%2f` → `%2F`). A malformed escape (`%zz`, `%4`) or an encoded NUL (`%00`) is refused.
//! - **Dot segments** (RFC 3986 §5.2.4) are removed after that decoding, so `%2e%2e` is `..`.
//!   A path that climbs above the root (`/..`, `/a/../..`) is refused, as is a segment that
//!   some servers read as a dot segment and others do not (`..;x`, `.;x`, Tomcat's path
//!   parameters).
//! - **Duplicate slashes** are merged, as nginx does with `merge_slashes on`: `//a///b` is
//!   `/a/b`. A trailing slash is kept.
//! - **Backslashes**: a raw `\` is refused (some servers treat it as a separator, others as
//!   data). An encoded one (`%5C`) is kept, like an encoded slash.
//! - **Ambiguity**: an encoded slash (`%2F`, `%5C`) stays encoded, and encoded dots are decoded
//!   as above; but a server that decodes slashes, or one that decodes nothing, would read such
//!   a path differently. [`Normalized::alternatives`] lists those other readings; the proxy
//!   refuses the request when one of them would take a different route.
//! - **Pingora's escaping**: pingora percent-encodes the spaces and control bytes of a request
//!   line it cannot parse, so `GET /x  HTTP/1.1` arrives as `/x%20`. A target ending in an
//!   encoded space or tab is therefore refused, as a request line with two spaces.
//!
//! The common path (no `%`, no dot segment, no `//`) is one scan and no allocation.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with /")]
    NotOrigin,
    #[error("a malformed percent-escape")]
    BadEscape,
    #[error("a NUL byte")]
    Nul,
    #[error("a control character, space or backslash")]
    BadByte,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("a dot segment with parameters")]
    DotParameters,
    #[error("the request line has extra whitespace")]
    TrailingSpace,
}

/// A normalised path, and the other readings of it that a backend might make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized<'a> {
    /// What the gateway routes on and forwards (no query).
    pub path: Cow<'a, str>,
    /// Other readings, when the path had encoded dots or slashes and they differ from `path`:
    /// with encoded slashes decoded into separators, or with encoded dots left alone. Empty
    /// (and not allocated) otherwise.
    pub alternatives: Vec<String>,
}

/// How encoded dots and slashes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// RFC 3986: `%2E` decoded, `%2F` kept.
    Standard,
    /// A server that decodes nothing: `%2E` kept as data.
    Literal,
    /// A server that decodes everything: `%2F` and `%5C` are separators.
    Decoded,
}

/// Normalises `path` (the path of the request target, without the query).
pub fn normalize(path: &str) -> Result<Normalized<'_>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        // Asterisk-form (`OPTIONS *`) routes nowhere in particular; leave it.
        if path == "*" {
            return Ok(Normalized {
                path: Cow::Borrowed(path),
                alternatives: Vec::new(),
            });
        }
        return Err(PathError::NotOrigin);
    }
    if !needs_work(b)? {
        return Ok(Normalized {
            path: Cow::Borrowed(path),
            alternatives: Vec::new(),
        });
    }
    if ends_in_encoded_space(b) {
        return Err(PathError::TrailingSpace);
    }
    let mut flags = Flags::default();
    let standard = rewrite(path, Reading::Standard, &mut flags)?;
    let mut alternatives = Vec::new();
    if flags.encoded_dot {
        let literal = rewrite(path, Reading::Literal, &mut Flags::default())?;
        if literal != standard {
            alternatives.push(literal);
        }
    }
    if flags.encoded_slash {
        let decoded = rewrite(path, Reading::Decoded, &mut Flags::default())?;
        if decoded != standard && !alternatives.contains(&decoded) {
            alternatives.push(decoded);
        }
    }
    let path = if standard == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(standard)
    };
    Ok(Normalized { path, alternatives })
}

/// Whether the query (after `?`) ends in an encoded space or tab: a request line with two
/// spaces, as pingora escapes it.
pub fn check_query(query: &str) -> Result<(), PathError> {
    if ends_in_encoded_space(query.as_bytes()) {
        return Err(PathError::TrailingSpace);
    }
    if query.bytes().any(|c| c == 0) {
        return Err(PathError::Nul);
    }
    Ok(())
}

fn ends_in_encoded_space(b: &[u8]) -> bool {
    matches!(b, [.., b'%', b'2', b'0'] | [.., b'%', b'0', b'9'])
}

/// The fast scan: whether the path needs rewriting; refuses bytes that are never allowed.
fn needs_work(b: &[u8]) -> Result<bool, PathError> {
    let mut work = false;
    // Start of the current segment (just after its slash).
    let mut seg = 1;
    for i in 1..=b.len() {
        let c = if i < b.len() { b[i] } else { b'/' };
        match c {
            b'/' => {
                let s = &b[seg..i];
                // An empty segment before the end is a duplicate slash.
                if (s.is_empty() && i < b.len()) || is_dotty(s) {
                    work = true;
                }
                seg = i + 1;
            }
            b'%' => work = true,
            b'\\' => return Err(PathError::BadByte),
            0 => return Err(PathError::Nul),
            c if c < 0x20 || c == 0x7f || c == b' ' => return Err(PathError::BadByte),
            _ => {}
        }
    }
    Ok(work)
}

/// `.`, `..`, or either with `;` parameters.
fn is_dotty(s: &[u8]) -> bool {
    let head = s.split(|c| *c == b';').next().unwrap_or(s);
    head == b"." || head == b".."
}

#[derive(Default)]
struct Flags {
    /// An escape decoded to `.`.
    encoded_dot: bool,
    /// An escape of `/` or `\`.
    encoded_slash: bool,
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The slow path: decode, split, remove dot segments, merge slashes, under one reading.
fn rewrite(path: &str, reading: Reading, flags: &mut Flags) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Where each kept segment (its leading slash) starts in `out`, for `..` to pop.
    let mut starts: Vec<usize> = Vec::new();
    // The current segment, decoded.
    let mut seg: Vec<u8> = Vec::with_capacity(32);
    let mut trailing = false;
    let mut i = 1;
    while i < b.len() {
        let c = b[i];
        i += 1;
        match c {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i).copied().and_then(hex),
                    b.get(i + 1).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                i += 2;
                match hi * 16 + lo {
                    0 => return Err(PathError::Nul),
                    b'.' => {
                        flags.encoded_dot = true;
                        if reading == Reading::Literal {
                            seg.extend_from_slice(b"%2E");
                        } else {
                            seg.push(b'.');
                        }
                    }
                    b'/' | b'\\' if reading == Reading::Decoded => {
                        finish_segment(&mut out, &mut starts, &mut seg, &mut trailing, false)?;
                    }
                    v if unreserved(v) => seg.push(v),
                    v => {
                        flags.encoded_slash |= v == b'/' || v == b'\\';
                        seg.extend_from_slice(&[
                            b'%',
                            HEX[usize::from(v >> 4)],
                            HEX[usize::from(v & 15)],
                        ]);
                    }
                }
            }
            b'/' => finish_segment(&mut out, &mut starts, &mut seg, &mut trailing, false)?,
            b'\\' => return Err(PathError::BadByte),
            0 => return Err(PathError::Nul),
            c => seg.push(c),
        }
    }
    finish_segment(&mut out, &mut starts, &mut seg, &mut trailing, true)?;
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// Ends one segment: drops it (empty, `.`), pops the last one (`..`) or appends it. `last`:
/// the path ends here. `trailing` is set when the result must end in a slash.
fn finish_segment(
    out: &mut String,
    starts: &mut Vec<usize>,
    seg: &mut Vec<u8>,
    trailing: &mut bool,
    last: bool,
) -> Result<(), PathError> {
    match seg.as_slice() {
        b"." => *trailing = true,
        b".." => {
            let start = starts.pop().ok_or(PathError::AboveRoot)?;
            out.truncate(start);
            *trailing = true;
        }
        s if is_dotty(s) => return Err(PathError::DotParameters),
        // A duplicate slash is dropped; a final one (`/a/`) is kept.
        [] => *trailing |= last && !out.is_empty(),
        s => {
            starts.push(out.len());
            out.push('/');
            // The bytes come from a &str, or are escapes and unreserved ASCII characters.
            out.push_str(std::str::from_utf8(s).map_err(|_| PathError::BadEscape)?);
            *trailing = false;
        }
    }
    seg.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p).map(|n| n.path.into_owned())
    }

    #[test]
    fn normalizes_paths() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/a", "/a"),
            ("/a/", "/a/"),
            ("/a/b/c", "/a/b/c"),
            ("/pub/../internal/x", "/internal/x"),
            ("/pub/%2e%2e/internal/x", "/internal/x"),
            ("/pub/%2E%2E/internal/x", "/internal/x"),
            ("/pub/.%2e/internal/x", "/internal/x"),
            ("/pay/../admin", "/admin"),
            ("/pay/./x", "/pay/x"),
            ("/pay/.", "/pay/"),
            ("/pay/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/a/./b/./c", "/a/b/c"),
            ("/./a", "/a"),
            ("/.", "/"),
            ("//a", "/a"),
            ("//a///b", "/a/b"),
            ("/a//", "/a/"),
            ("//", "/"),
            ("///", "/"),
            ("/a/b//../c", "/a/c"),
            ("/%7euser", "/~user"),
            ("/%7Euser/%41%62c", "/~user/Abc"),
            ("/a%2db%5fc%2e", "/a-b_c."),
            ("/%2fx", "/%2Fx"),
            ("/a%2Fb", "/a%2Fb"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/x%20y", "/x%20y"),
            ("/q%3fz", "/q%3Fz"),
            ("/%25", "/%25"),
            ("/%2541", "/%2541"),
            ("/a%5cb", "/a%5Cb"),
            ("/..a/b..", "/..a/b.."),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/...", "/a/..."),
            ("/a;b/c", "/a;b/c"),
            ("/é", "/é"),
            ("*", "*"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(*want), "{input}");
        }
    }

    #[test]
    fn refuses_what_is_ambiguous_or_malformed() {
        let cases: &[(&str, PathError)] = &[
            ("", PathError::NotOrigin),
            ("a/b", PathError::NotOrigin),
            ("%2Fa", PathError::NotOrigin),
            ("/..", PathError::AboveRoot),
            ("/../a", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
            ("/%2e%2e/etc", PathError::AboveRoot),
            ("/a/%2E%2E/%2e%2e/x", PathError::AboveRoot),
            ("/a%00b", PathError::Nul),
            ("/a\0b", PathError::Nul),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
            ("/a%g0", PathError::BadEscape),
            ("/a\\..\\b", PathError::BadByte),
            ("/a\\b", PathError::BadByte),
            ("/a b", PathError::BadByte),
            ("/a\tb", PathError::BadByte),
            ("/a\x7fb", PathError::BadByte),
            ("/pub/..;/internal", PathError::DotParameters),
            ("/pub/.;x/internal", PathError::DotParameters),
            ("/pub/%2e%2e;/internal", PathError::DotParameters),
            ("/x%20", PathError::TrailingSpace),
            ("/x%09", PathError::TrailingSpace),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(*want), "{input:?}");
        }
    }

    #[test]
    fn plain_paths_are_borrowed() {
        for p in ["/", "/a/b", "/pay/charge", "/a.b/c-d_e~f", "/a/", "/é"] {
            let n = normalize(p).unwrap();
            assert!(matches!(n.path, Cow::Borrowed(_)), "{p}");
            assert!(n.alternatives.is_empty());
        }
        // Escapes that change nothing still borrow.
        assert!(matches!(
            normalize("/a%2Fb").unwrap().path,
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn encoded_dots_and_slashes_list_the_other_readings() {
        let n = normalize("/pub/%2e%2e/internal/x").unwrap();
        assert_eq!(n.path, "/internal/x");
        assert_eq!(n.alternatives, vec!["/pub/%2E%2E/internal/x".to_string()]);

        let n = normalize("/pub%2Finternal").unwrap();
        assert_eq!(n.path, "/pub%2Finternal");
        assert_eq!(n.alternatives, vec!["/pub/internal".to_string()]);

        let n = normalize("/a/b%2F..%2F..%2Fc").unwrap();
        assert_eq!(n.path, "/a/b%2F..%2F..%2Fc");
        assert_eq!(n.alternatives, vec!["/c".to_string()]);

        let n = normalize("/a%5Cb").unwrap();
        assert_eq!(n.alternatives, vec!["/a/b".to_string()]);

        // A reading that climbs above the root refuses the whole request.
        assert_eq!(norm("/a%2F..%2F..%2Fetc"), Err(PathError::AboveRoot));

        // Plain dots have only one reading.
        assert!(normalize("/pub/../x").unwrap().alternatives.is_empty());
        // An encoded dot inside a name: readings differ only in spelling.
        let n = normalize("/a%2Eb").unwrap();
        assert_eq!(n.path, "/a.b");
        assert_eq!(n.alternatives, vec!["/a%2Eb".to_string()]);
    }

    #[test]
    fn queries_ending_in_whitespace_are_refused() {
        assert_eq!(check_query("a=1"), Ok(()));
        assert_eq!(check_query("a=%20b"), Ok(()));
        assert_eq!(check_query("a=b%20"), Err(PathError::TrailingSpace));
        assert_eq!(check_query(""), Ok(()));
    }
}
