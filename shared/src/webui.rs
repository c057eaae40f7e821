//! What the resolver's and the gateway's web views share: the static assets built into the
//! binaries (the common stylesheet here, each view's page and script in its own crate), how
//! they are served (content type, validators, caching) and the page's security policy.
//!
//! Plain data and pure functions: each server turns an [`Asset`] into a response with its
//! own HTTP stack.

/// The stylesheet both views use.
pub const BASE_CSS: Asset = Asset::new("base.css", CSS, include_bytes!("../ui/base.css"));

/// `Content-Type` of the page, scripts and stylesheets.
pub const HTML: &str = "text/html; charset=utf-8";
pub const JS: &str = "text/javascript; charset=utf-8";
pub const CSS: &str = "text/css; charset=utf-8";

/// The page's Content-Security-Policy: scripts, styles, data and event streams only from the
/// listener that served the page; no inline code, no frames, no other origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Assets are built into the binary: a browser keeps them but asks again each time
/// (`no-cache`), and the ETag makes that question cost a 304.
pub const ASSET_CACHE: &str = "no-cache";

/// Live data is never kept.
pub const DATA_CACHE: &str = "no-store";

/// Headers every response of a view carries: its policy, no type sniffing, no referrer,
/// no framing.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
];

/// One file of a view, built into the binary.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// The file name under `/ui/` (`index.html` is also `/ui/` itself).
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

impl Asset {
    pub const fn new(name: &'static str, content_type: &'static str, body: &'static [u8]) -> Self {
        Asset {
            name,
            content_type,
            body,
        }
    }

    /// A strong validator: FNV-1a of the bytes, quoted.
    pub fn etag(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.body {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("\"{h:016x}\"")
    }

    /// Whether an `If-None-Match` header names this version (so a 304 answers it).
    pub fn not_modified(&self, if_none_match: Option<&str>) -> bool {
        let Some(header) = if_none_match else {
            return false;
        };
        let etag = self.etag();
        header
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag)
    }
}

/// `asset` as an answer to a request with `if_none_match`: a 304 when that names this
/// version, else the bytes with their type; with the validator, the caching rule and the
/// view's security headers either way.
pub fn asset_response(asset: &Asset, if_none_match: Option<&str>) -> http::Response<&'static [u8]> {
    use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG};
    let mut resp = if asset.not_modified(if_none_match) {
        let mut r = http::Response::new(&[][..]);
        *r.status_mut() = http::StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = http::Response::new(asset.body);
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&asset.etag()) {
        h.insert(ETAG, v);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static(ASSET_CACHE));
    secure(h);
    resp
}

/// Adds the headers every response of a view carries ([`SECURITY_HEADERS`]).
pub fn secure(h: &mut http::HeaderMap) {
    for (name, value) in SECURITY_HEADERS {
        h.insert(*name, http::HeaderValue::from_static(value));
    }
}

/// The asset a path under `/ui/` names (`""` is the page), among `assets` (the page first).
pub fn find<'a>(assets: &'a [Asset], path: &str) -> Option<&'a Asset> {
    let name = if path.is_empty() { "index.html" } else { path };
    assets.iter().find(|a| a.name == name)
}

/// SVG's namespace name: written as a URL, but never fetched.
const SVG_NAMESPACE: &str = "http://www.w3.org/2000/svg";

/// What in an asset's text would load something from elsewhere, or need the policy
/// loosened: another origin's URL, inline scripts and styles, `javascript:` URLs.
pub fn foreign_references(text: &str) -> Vec<&'static str> {
    let text = text.replace(SVG_NAMESPACE, "");
    [
        "http://",
        "https://",
        "<script>",
        "style=\"",
        "javascript:",
        "eval(",
    ]
    .into_iter()
    .filter(|bad| text.contains(bad))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: Asset = Asset::new("index.html", HTML, b"<!doctype html>");
    const SCRIPT: Asset = Asset::new("app.js", JS, b"'use strict';");

    #[test]
    fn paths_name_assets() {
        let all = [PAGE, SCRIPT, BASE_CSS];
        assert_eq!(find(&all, "").map(|a| a.name), Some("index.html"));
        assert_eq!(find(&all, "index.html").map(|a| a.name), Some("index.html"));
        assert_eq!(find(&all, "app.js").map(|a| a.content_type), Some(JS));
        assert_eq!(find(&all, "base.css").map(|a| a.content_type), Some(CSS));
        assert!(find(&all, "../Cargo.toml").is_none());
        assert!(find(&all, "app.js/").is_none());
    }

    #[test]
    fn etags_validate() {
        let etag = PAGE.etag();
        assert_ne!(etag, SCRIPT.etag());
        assert_eq!(etag, PAGE.etag(), "stable");
        assert!(PAGE.not_modified(Some(&etag)));
        assert!(PAGE.not_modified(Some(&format!("\"x\", W/{etag}"))));
        assert!(PAGE.not_modified(Some("*")));
        assert!(!PAGE.not_modified(Some("\"other\"")));
        assert!(!PAGE.not_modified(None));
    }

    #[test]
    fn foreign_references_are_found() {
        assert!(foreign_references("<script src=\"app.js\" defer></script>").is_empty());
        assert!(
            foreign_references("createElementNS('http://www.w3.org/2000/svg', 'svg')").is_empty()
        );
        assert_eq!(
            foreign_references("<link href=\"https://cdn.example/x.css\">"),
            vec!["https://"]
        );
        assert_eq!(
            foreign_references("<script>alert(1)</script>"),
            vec!["<script>"]
        );
        assert_eq!(
            foreign_references("<p style=\"color: red\">"),
            vec!["style=\""]
        );
    }

    #[test]
    fn policy_allows_no_other_origin() {
        assert!(!CSP.contains("http"));
        assert!(!CSP.contains("unsafe"));
        assert!(CSP.contains("default-src 'none'"));
        assert!(CSP.contains("connect-src 'self'"));
    }
}
