//! Which Envoy stat names the sink keeps.
//!
//! The signal is `http.<scope>.downstream_rq_active` of the pod's *inbound*
//! HTTP connection managers: the requests the pod is serving right now. Istio
//! names those scopes `inbound_0.0.0.0_<port>;` (recent releases, with the `;`)
//! or `inbound_0.0.0.0_<port>` (older ones); one glob covers both.
//!
//! Dropped by default, each for a reason:
//! - `http.admin.*`: Envoy's admin interface, not application traffic;
//! - `http.agent.*`: the Istio agent's health listener (:15021), probes only;
//! - `http.stats.*`: the Prometheus scrape listener (:15090);
//! - `http.outbound_*`: requests the pod *makes*, not the load it serves;
//! - `http.inbound_0.0.0.0_<sink port>;*` (and the form without `;`): the
//!   scaler's own sidecar counts every connected Envoy's long-lived metrics
//!   stream as a request in flight, which would scale the scaler on its
//!   fleet size.
//!
//! Patterns are globs where `*` matches any run of characters. This runs for
//! every family of every message (about 600 per message), so the common case —
//! a name that cannot match — is rejected by a suffix comparison before any
//! glob is tried, and nothing allocates.

/// The suffix of every stat the defaults keep.
pub const GAUGE_SUFFIX: &str = "downstream_rq_active";

/// The default patterns; the sink's own inbound scope is derived from its
/// port at start-up (see [`NameFilter::new`]).
pub use crate::config::{
    default_metric_exclude as default_exclude, default_metric_include as default_include,
};

/// The compiled keep/drop rules.
#[derive(Clone, Debug)]
pub struct NameFilter {
    include: Vec<Glob>,
    exclude: Vec<Glob>,
    /// Literal endings of the include patterns, when every one has one:
    /// a name ending in none of them is rejected without globbing.
    required_suffixes: Option<Vec<Vec<u8>>>,
}

impl NameFilter {
    /// Builds the filter. `sink_port`, when given, adds the sink's own inbound
    /// scope to the excludes.
    pub fn new(include: &[String], exclude: &[String], sink_port: Option<u16>) -> Self {
        let include: Vec<Glob> = include.iter().map(|p| Glob::new(p)).collect();
        let mut exclude: Vec<Glob> = exclude.iter().map(|p| Glob::new(p)).collect();
        if let Some(port) = sink_port {
            exclude.push(Glob::new(&format!("http.inbound_0.0.0.0_{port};*")));
            exclude.push(Glob::new(&format!("http.inbound_0.0.0.0_{port}.*")));
        }
        let required_suffixes = include
            .iter()
            .map(|g| g.literal_suffix().map(<[u8]>::to_vec))
            .collect::<Option<Vec<_>>>();
        Self {
            include,
            exclude,
            required_suffixes,
        }
    }

    /// The defaults for a sink listening on `sink_port`.
    pub fn defaults(sink_port: u16) -> Self {
        Self::new(&default_include(), &default_exclude(), Some(sink_port))
    }

    /// True when the stat `name` is one the sink keeps.
    #[inline]
    pub fn keeps(&self, name: &[u8]) -> bool {
        if let Some(suffixes) = &self.required_suffixes
            && !suffixes.iter().any(|s| name.ends_with(s))
        {
            return false;
        }
        self.include.iter().any(|g| g.matches(name))
            && !self.exclude.iter().any(|g| g.matches(name))
    }
}

/// A glob with `*` wildcards, pre-split into its literal parts.
#[derive(Clone, Debug)]
struct Glob {
    parts: Vec<Vec<u8>>,
    starts_with_star: bool,
    ends_with_star: bool,
}

impl Glob {
    fn new(pattern: &str) -> Self {
        let bytes = pattern.as_bytes();
        Self {
            parts: pattern
                .split('*')
                .filter(|p| !p.is_empty())
                .map(|p| p.as_bytes().to_vec())
                .collect(),
            starts_with_star: bytes.first() == Some(&b'*'),
            ends_with_star: bytes.last() == Some(&b'*') || bytes.is_empty(),
        }
    }

    fn literal_suffix(&self) -> Option<&[u8]> {
        if self.ends_with_star {
            None
        } else {
            self.parts.last().map(Vec::as_slice)
        }
    }

    fn matches(&self, mut s: &[u8]) -> bool {
        let mut parts = self.parts.as_slice();
        if parts.is_empty() {
            return self.starts_with_star || s.is_empty();
        }
        if !self.starts_with_star {
            let Some(rest) = s.strip_prefix(parts[0].as_slice()) else {
                return false;
            };
            s = rest;
            parts = &parts[1..];
            if parts.is_empty() {
                return self.ends_with_star || s.is_empty();
            }
        }
        let (middle, last) = if self.ends_with_star {
            (parts, None)
        } else {
            let (last, middle) = parts.split_last().expect("non-empty");
            (middle, Some(last.as_slice()))
        };
        for part in middle {
            match find(s, part) {
                Some(at) => s = &s[at + part.len()..],
                None => return false,
            }
        }
        match last {
            Some(last) => s.len() >= last.len() && s.ends_with(last),
            None => true,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keeps(name: &str) -> bool {
        NameFilter::defaults(9000).keeps(name.as_bytes())
    }

    #[test]
    fn keeps_both_inbound_forms() {
        assert!(keeps("http.inbound_0.0.0.0_8080;.downstream_rq_active"));
        assert!(keeps("http.inbound_0.0.0.0_8080.downstream_rq_active"));
        assert!(keeps("http.inbound_10.0.0.7_3000;.downstream_rq_active"));
    }

    #[test]
    fn drops_every_listed_scope() {
        for name in [
            "http.admin.downstream_rq_active",
            "http.agent.downstream_rq_active",
            "http.stats.downstream_rq_active",
            "http.outbound_0.0.0.0_80;.downstream_rq_active",
            "http.outbound_10.96.0.1_443.downstream_rq_active",
            "http.inbound_0.0.0.0_9000;.downstream_rq_active",
            "http.inbound_0.0.0.0_9000.downstream_rq_active",
        ] {
            assert!(!keeps(name), "{name} should be dropped");
        }
    }

    #[test]
    fn sink_scope_is_derived_from_the_port() {
        let f = NameFilter::defaults(9100);
        assert!(f.keeps(b"http.inbound_0.0.0.0_9000;.downstream_rq_active"));
        assert!(!f.keeps(b"http.inbound_0.0.0.0_9100;.downstream_rq_active"));
        // A port that merely starts with the sink port is someone else's.
        assert!(f.keeps(b"http.inbound_0.0.0.0_91001;.downstream_rq_active"));
    }

    #[test]
    fn drops_other_stats() {
        for name in [
            "http.inbound_0.0.0.0_8080;.downstream_rq_total",
            "cluster.outbound|80||web.upstream_rq_active",
            "server.live",
            "downstream_rq_active",
            "",
        ] {
            assert!(!keeps(name), "{name:?} should be dropped");
        }
    }

    #[test]
    fn custom_patterns() {
        let f = NameFilter::new(&["*".into()], &["*.total".into()], None);
        assert!(f.keeps(b"anything"));
        assert!(!f.keeps(b"x.total"));
        let f = NameFilter::new(&["http.*".into()], &[], None);
        assert!(f.keeps(b"http.admin.downstream_rq_active"));
    }

    #[test]
    fn glob_edges() {
        assert!(Glob::new("a*b*c").matches(b"abc"));
        assert!(Glob::new("a*b*c").matches(b"a-b-b-c"));
        assert!(!Glob::new("a*b*c").matches(b"a-c"));
        assert!(!Glob::new("ab*ba").matches(b"aba"));
        assert!(Glob::new("*").matches(b""));
        assert!(Glob::new("").matches(b""));
        assert!(!Glob::new("").matches(b"x"));
        assert!(Glob::new("x*").matches(b"x"));
    }

    /// Reference glob: classic recursive matcher.
    fn reference(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| reference(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && reference(rest, &s[1..]),
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_reference(p in "[ab*]{0,7}", s in "[ab]{0,9}") {
            prop_assert_eq!(Glob::new(&p).matches(s.as_bytes()), reference(p.as_bytes(), s.as_bytes()));
        }
    }
}
