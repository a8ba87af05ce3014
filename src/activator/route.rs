//! Which route a request belongs to.
//!
//! The host (HTTP/1.1 `Host`, or the request target's authority; HTTP/2
//! `:authority`), port dropped and lowercased, picks a host group: an exact
//! name first, else the longest `*.suffix` wildcard it falls under (any
//! number of labels: `*.example.com` matches `a.example.com` and
//! `a.b.example.com`, not `example.com`). Within the group the longest
//! `path_prefix` that matches whole segments wins. There is no fall-through
//! from an exact group to a wildcard one, as with Envoy's virtual hosts: what
//! a host's own routes do not cover is a 404, not somebody else's upstream.

use std::{borrow::Cow, collections::HashMap};

use hyper::{Request, header::HOST, http::uri::Authority};

use crate::config::ActivatorRoute;

/// Routes of one host pattern, longest prefix first.
type Group = Vec<(String, usize)>;

/// Host and path to route index.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    exact: HashMap<String, Group>,
    /// Keyed by the suffix with its leading dot (`.example.com`).
    wildcard: HashMap<String, Group>,
}

impl RouteTable {
    /// Builds the table; `routes` were validated (`config::check_activator_routes`).
    pub(crate) fn new(routes: &[ActivatorRoute]) -> Self {
        let mut table = Self::default();
        for (i, route) in routes.iter().enumerate() {
            let host = route.match_host();
            let (map, key) = match host.strip_prefix('*') {
                Some(suffix) => (&mut table.wildcard, suffix.to_string()),
                None => (&mut table.exact, host),
            };
            map.entry(key)
                .or_default()
                .push((route.match_prefix().to_string(), i));
        }
        for group in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            group.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        }
        table
    }

    /// The route index for `host` (already normalised by [`request_host`])
    /// and `path`.
    pub(crate) fn find(&self, host: &str, path: &str) -> Option<usize> {
        let group = self.exact.get(host).or_else(|| {
            // Longest suffix first: the first dot gives the longest one.
            host.match_indices('.')
                .find_map(|(i, _)| self.wildcard.get(&host[i..]))
        })?;
        group
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|&(_, i)| i)
    }
}

/// `prefix` (no trailing `/` unless it is `/`) matches `path` by whole segments.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The request's host as routes are matched: the authority of an
/// absolute-form target or of HTTP/2's `:authority`, else the `Host` header;
/// port removed, lowercase, no trailing dot. `Err` carries the raw header for
/// the 404 message when there is no usable host.
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<Cow<'_, str>, Cow<'_, str>> {
    let raw: &str = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => match req.headers().get(HOST) {
            Some(v) => v
                .to_str()
                .map_err(|_| String::from_utf8_lossy(v.as_bytes()))?,
            None => return Err(Cow::Borrowed("")),
        },
    };
    let Ok(authority) = raw.parse::<Authority>() else {
        return Err(Cow::Borrowed(raw));
    };
    // `Authority::host` borrows from the parsed value; find the same slice in `raw`.
    let host_len = authority.host().len();
    let start = raw.rfind('@').map_or(0, |i| i + 1);
    let Some(host) = raw.get(start..start + host_len) else {
        return Err(Cow::Borrowed(raw));
    };
    normalised(host).ok_or(Cow::Borrowed(raw))
}

/// A host (port already removed) as routes are matched: no trailing dot,
/// lowercase; `None` when nothing is left.
pub(crate) fn normalised(host: &str) -> Option<Cow<'_, str>> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// A host as it may appear in a short error body: at most 100 characters,
/// everything outside printable ASCII escaped.
pub(crate) fn printable(host: &str) -> String {
    let mut out: String = host
        .chars()
        .take(100)
        .flat_map(char::escape_default)
        .collect();
    if host.chars().nth(100).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, prefix: Option<&str>) -> ActivatorRoute {
        ActivatorRoute {
            host: host.into(),
            path_prefix: prefix.map(String::from),
            upstream: "up:80".into(),
            namespace: "shop".into(),
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route("web.example.com", None),             // 0
            route("web.example.com", Some("/api/")),    // 1
            route("web.example.com", Some("/api/v2")),  // 2
            route("*.example.com", None),               // 3
            route("*.shop.example.com", Some("/cart")), // 4
            route("Upper.Example.com.", Some("/x")),    // 5
        ])
    }

    #[test]
    fn exact_host_then_longest_prefix() {
        let t = table();
        assert_eq!(t.find("web.example.com", "/"), Some(0));
        assert_eq!(t.find("web.example.com", "/apix"), Some(0));
        assert_eq!(t.find("web.example.com", "/api"), Some(1));
        assert_eq!(t.find("web.example.com", "/api/v1/x"), Some(1));
        assert_eq!(t.find("web.example.com", "/api/v2"), Some(2));
        assert_eq!(t.find("web.example.com", "/api/v2/items"), Some(2));
        assert_eq!(t.find("web.example.com", "/api/v20"), Some(1));
    }

    #[test]
    fn wildcards_match_any_depth_longest_suffix_first() {
        let t = table();
        assert_eq!(t.find("a.example.com", "/"), Some(3));
        assert_eq!(t.find("a.b.example.com", "/x"), Some(3));
        assert_eq!(t.find("example.com", "/"), None);
        assert_eq!(t.find("a.shop.example.com", "/cart/1"), Some(4));
        // The longer wildcard's group has no route for `/`: no fall-through.
        assert_eq!(t.find("a.shop.example.com", "/"), None);
        assert_eq!(t.find("evilexample.com", "/"), None);
        assert_eq!(t.find("upper.example.com", "/x"), Some(5));
        // An exact group without a matching prefix does not fall through either.
        assert_eq!(t.find("upper.example.com", "/"), None);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/", "*"));
        assert!(prefix_matches("/a", "/a"));
        assert!(prefix_matches("/a", "/a/"));
        assert!(prefix_matches("/a", "/a/b"));
        assert!(!prefix_matches("/a", "/ab"));
        assert!(!prefix_matches("/a/b", "/a"));
    }

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn request_host_is_normalised() {
        let ok = |r: &Request<()>| {
            request_host(r)
                .map(|h| h.into_owned())
                .map_err(|h| h.into_owned())
        };
        assert_eq!(
            ok(&req("/", Some("Web.Example.com:8081"))),
            Ok("web.example.com".into())
        );
        assert_eq!(
            ok(&req("/", Some("web.example.com."))),
            Ok("web.example.com".into())
        );
        assert_eq!(
            ok(&req("http://Grpc.example.com/x", Some("other"))),
            Ok("grpc.example.com".into())
        );
        assert_eq!(ok(&req("/", Some("[::1]:80"))), Ok("[::1]".into()));
        assert_eq!(ok(&req("/", None)), Err(String::new()));
        assert_eq!(ok(&req("/", Some("a b"))), Err("a b".into()));
        assert_eq!(ok(&req("/", Some(""))), Err(String::new()));
    }

    #[test]
    fn printable_escapes_and_truncates() {
        assert_eq!(printable("web.example.com"), "web.example.com");
        assert_eq!(printable("a\"b\u{7}"), "a\\\"b\\u{7}");
        let long = "x".repeat(300);
        assert_eq!(printable(&long), format!("{}...", "x".repeat(100)));
    }
}
