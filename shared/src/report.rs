//! One line per error for people: an error and its causes, each said once.
//!
//! Error types that put their source into their own message (`"data dir {path}: {source}"`)
//! and also return it from `source()` would otherwise print the cause twice when the whole
//! chain is shown (`No such file or directory (os error 2): No such file or directory (os
//! error 2)`). [`chain`] joins the chain with `": "` and leaves out every cause whose text is
//! already part of what was said before it. Both binaries print their fatal errors with it.

use std::error::Error;

/// The messages of `err` and of its causes, joined with `": "`, each cause said once.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct Wrap {
        msg: String,
        source: Option<Box<dyn Error + 'static>>,
    }

    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.msg)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref()
        }
    }

    fn wrap(msg: &str, source: Option<Wrap>) -> Wrap {
        Wrap {
            msg: msg.into(),
            source: source.map(|s| Box::new(s) as Box<dyn Error>),
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || wrap("No such file or directory (os error 2)", None);
        let cases: Vec<(Wrap, &str)> = vec![
            (io(), "No such file or directory (os error 2)"),
            (
                wrap("reading x.toml", Some(io())),
                "reading x.toml: No such file or directory (os error 2)",
            ),
            // The message already holds its source: the source is not repeated.
            (
                wrap(
                    "data dir /d: No such file or directory (os error 2)",
                    Some(io()),
                ),
                "data dir /d: No such file or directory (os error 2)",
            ),
            // Three levels, the middle one repeating the innermost.
            (
                wrap(
                    "cannot start",
                    Some(wrap(
                        "store: No such file or directory (os error 2)",
                        Some(io()),
                    )),
                ),
                "cannot start: store: No such file or directory (os error 2)",
            ),
            // An empty message adds nothing.
            (wrap("outer", Some(wrap("", None))), "outer"),
        ];
        for (err, want) in cases {
            assert_eq!(chain(&err), want);
        }
    }
}
