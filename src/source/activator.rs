//! The `activator` source: requests for a route of the activator proxy,
//! pending (held) plus active (being forwarded), counted the moment they
//! arrive, so StreamIsActive wakes a workload at zero within milliseconds.
//!
//! Keys: `host` (the route's host, as configured: `web.example.com` or
//! `*.example.com`) and `pathPrefix` (optional). A trigger reads only routes
//! of its own namespace (the route's `namespace`); another namespace's route
//! reads as no route at all, so its existence is not disclosed.
//!
//! `window` and `windowAggregation` (as for the envoy source, checked by the
//! same code): each activator replica's load reduced over the window, `max`
//! by default, so a trigger keeps the peak of pending + active instead of a
//! gauge that reads 0 between requests.
//!
//! The count is the sum over every live activator replica, read from the
//! store (each replica publishes its routes' loads there), so KEDA may ask
//! any replica.

use crate::{
    metadata::{Metadata, MetadataError},
    store::Window,
};

use super::{Kind, Parsed, Source, TriggerSettings};

/// Keys of the activator source.
pub const KEYS: &[&str] = &["host", "pathPrefix", "window", "windowAggregation"];

/// The activator source's entry in [`super::KINDS`].
pub const KIND: Kind = Kind {
    keys: KEYS,
    key_prefixes: &[],
    parse,
};

/// Longest host accepted (a DNS name is at most 253 characters).
const MAX_HOST: usize = 253;
/// Longest path prefix accepted.
const MAX_PREFIX: usize = 1024;

/// Which route a trigger reads, and whose it must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteRef {
    pub host: String,
    pub path_prefix: Option<String>,
    /// The ScaledObject's namespace: the route's must be the same.
    pub namespace: String,
    /// Each replica's load reduced over this window first.
    pub window: Option<Window>,
}

fn parse(
    meta: &Metadata<'_>,
    namespace: &str,
    settings: &TriggerSettings,
    target: Option<f64>,
) -> Result<Parsed, MetadataError> {
    let target = target.ok_or_else(|| {
        MetadataError::missing(
            "targetValue",
            "a number greater than 0 (pending plus active requests per replica)",
        )
    })?;
    Ok(Parsed {
        source: Source::Activator(RouteRef {
            host: host(meta)?,
            path_prefix: path_prefix(meta)?,
            namespace: namespace.to_owned(),
            window: super::envoy::window(meta, settings.max_window)?,
        }),
        target,
        default_metric_name: "activator_requests",
    })
}

/// `host`: a DNS name, optionally `*.` in front; compared without case.
fn host(meta: &Metadata<'_>) -> Result<String, MetadataError> {
    let expected = "a host name such as web.example.com or *.example.com (as in activator_routes)";
    let h = meta
        .get("host")
        .ok_or_else(|| MetadataError::missing("host", expected))?;
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = h.len() <= MAX_HOST
        && !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(MetadataError::invalid(
            "host",
            &crate::metadata::excerpt(h),
            expected,
        ));
    }
    Ok(h.to_ascii_lowercase())
}

/// `pathPrefix`: starts with `/`, printable ASCII.
fn path_prefix(meta: &Metadata<'_>) -> Result<Option<String>, MetadataError> {
    let Some(p) = meta.get("pathPrefix") else {
        return Ok(None);
    };
    if !p.starts_with('/') || p.len() > MAX_PREFIX || !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(MetadataError::invalid(
            "pathPrefix",
            &crate::metadata::excerpt(p),
            "a path starting with / (as in activator_routes)",
        ));
    }
    Ok(Some(p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{source::tests::settings, testkit::meta};

    fn parsed(pairs: &[(&str, &str)]) -> Result<RouteRef, String> {
        let m = meta(pairs);
        match parse(&Metadata(&m), "shop", &settings(), Some(1.0)) {
            Ok(Parsed {
                source: Source::Activator(r),
                ..
            }) => Ok(r),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn host_and_prefix_name_the_route_of_the_triggers_namespace() {
        let r = parsed(&[("host", "Web.Example.com"), ("pathPrefix", "/api")]).unwrap();
        assert_eq!(r.host, "web.example.com");
        assert_eq!(r.path_prefix.as_deref(), Some("/api"));
        assert_eq!(r.namespace, "shop");
        assert_eq!(
            parsed(&[("host", "*.example.com")]).unwrap().host,
            "*.example.com"
        );
    }

    #[test]
    fn window_keys_are_read_as_for_the_envoy_source() {
        use crate::store::WindowReduce;
        let r = parsed(&[("host", "web"), ("window", "2m")]).unwrap();
        assert_eq!(
            r.window,
            Some(Window {
                length: std::time::Duration::from_secs(120),
                reduce: WindowReduce::Max
            })
        );
        let r = parsed(&[
            ("host", "web"),
            ("window", "30s"),
            ("windowAggregation", "avg"),
        ]);
        assert_eq!(r.unwrap().window.unwrap().reduce, WindowReduce::Avg);
        assert_eq!(parsed(&[("host", "web")]).unwrap().window, None);
        for (pairs, key) in [
            (vec![("host", "web"), ("window", "0s")], "window"),
            (vec![("host", "web"), ("window", "1000h")], "max_window"),
            (
                vec![("host", "web"), ("windowAggregation", "max")],
                "needs a `window`",
            ),
            (
                vec![
                    ("host", "web"),
                    ("window", "1m"),
                    ("windowAggregation", "p99"),
                ],
                "windowAggregation",
            ),
        ] {
            let e = parsed(&pairs).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn bad_hosts_and_prefixes_name_the_key_and_what_is_accepted() {
        for (pairs, key) in [
            (vec![], "host"),
            (vec![("host", "a b")], "host"),
            (vec![("host", "a..b")], "host"),
            (vec![("host", "x:80")], "host"),
            (vec![("host", &*"a".repeat(300))], "host"),
            (vec![("host", "web"), ("pathPrefix", "api")], "pathPrefix"),
        ] {
            let e = parsed(&pairs).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
    }
}
