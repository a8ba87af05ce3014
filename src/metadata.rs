//! Reading and checking a trigger's metadata keys: the typed readers every
//! source uses, and [`MetadataError`], the refusal shown to the user.
//!
//! Every refusal names the key, the value and what would have been accepted;
//! the scaler turns it into `INVALID_ARGUMENT`. Nothing here knows which
//! keys a source has: the sources list theirs and call the readers.

use std::{borrow::Cow, collections::HashMap, time::Duration};

/// A refused trigger; shown to the user verbatim in KEDA's events.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MetadataError {
    #[error("trigger metadata `{key}` is required: {expected}")]
    Missing { key: String, expected: String },
    #[error("trigger metadata `{key}` = {value:?} is not accepted: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    #[error("trigger metadata `{key}` is not a known key; accepted keys: {accepted}")]
    Unknown { key: String, accepted: String },
    #[error("trigger metadata: {0}")]
    Conflict(String),
    #[error(
        "trigger metadata `namespace` = {0:?} reads another namespace; \
         the operator has not set allow_cross_namespace"
    )]
    CrossNamespace(String),
    /// A field of KEDA's `ScaledObjectRef` itself, not of the metadata.
    #[error("ScaledObjectRef `{field}` = {value:?} is not accepted: expected {expected}")]
    Reference {
        field: String,
        value: String,
        expected: String,
    },
}

impl MetadataError {
    pub fn invalid(key: &str, value: &str, expected: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    pub fn missing(key: &str, expected: impl Into<String>) -> Self {
        Self::Missing {
            key: key.into(),
            expected: expected.into(),
        }
    }
}

/// Most characters of a refused value shown in the error. A status message
/// travels in an HTTP/2 trailer, and a 16 KiB query echoed whole makes the
/// client drop the response (a protocol error instead of the reason).
pub const SHOWN_CHARS: usize = 200;

/// [`MetadataError::invalid`] with the value cut to [`SHOWN_CHARS`], for
/// values that may be long (queries, selectors, URLs).
pub fn invalid_excerpt(key: &str, value: &str, expected: impl Into<String>) -> MetadataError {
    MetadataError::invalid(key, &excerpt(value), expected)
}

/// `value`, or its first [`SHOWN_CHARS`] characters and its length.
pub fn excerpt(value: &str) -> Cow<'_, str> {
    match value.char_indices().nth(SHOWN_CHARS) {
        None => value.into(),
        Some((cut, _)) => format!("{}… ({} bytes in all)", &value[..cut], value.len()).into(),
    }
}

/// Keys KEDA's own client reads (TLS towards the scaler); present in the map,
/// not ours to interpret.
pub const KEDA_CLIENT_KEYS: &[&str] = &[
    "scalerAddress",
    "enableTLS",
    "unsafeSsl",
    "caCert",
    "tlsClientCert",
    "tlsClientKey",
    "tlsCertFile",
];

/// Read access to a trigger's metadata with typed, self-describing errors.
pub struct Metadata<'a>(pub &'a HashMap<String, String>);

impl<'a> Metadata<'a> {
    /// The trimmed value of `key`; an empty value counts as absent.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// A finite number, optionally bounded below.
    pub fn number(
        &self,
        key: &str,
        min: Option<(f64, bool)>,
    ) -> Result<Option<f64>, MetadataError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let expected = match min {
            Some((m, true)) => format!("a number greater than {m}"),
            Some((m, false)) => format!("a number of at least {m}"),
            None => "a number".into(),
        };
        let v: f64 = raw
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| MetadataError::invalid(key, raw, &expected))?;
        match min {
            Some((m, true)) if v <= m => Err(MetadataError::invalid(key, raw, expected)),
            Some((m, false)) if v < m => Err(MetadataError::invalid(key, raw, expected)),
            _ => Ok(Some(v)),
        }
    }

    /// `true` / `false` (any case).
    pub fn boolean(&self, key: &str) -> Result<Option<bool>, MetadataError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(MetadataError::invalid(key, v, "true or false")),
        }
    }

    /// A humantime duration (`30s`, `2m`, `500ms`).
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, MetadataError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => humantime::parse_duration(v)
                .map(Some)
                .map_err(|_| MetadataError::invalid(key, v, "a duration such as 30s, 2m or 500ms")),
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(
        &self,
        key: &str,
        options: &[(&str, T)],
    ) -> Result<Option<T>, MetadataError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        options
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(v))
            .map(|(_, t)| Some(*t))
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                MetadataError::invalid(key, v, format!("one of {}", names.join(", ")))
            })
    }

    /// Rejects keys that are neither in `keys` nor start with one of `prefixes`.
    pub fn reject_unknown(&self, keys: &[&[&str]], prefixes: &[&str]) -> Result<(), MetadataError> {
        let mut unknown: Vec<&String> = self
            .0
            .keys()
            .filter(|k| {
                !keys.iter().any(|set| set.contains(&k.as_str()))
                    && !prefixes.iter().any(|p| k.starts_with(p))
            })
            .collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(key) => {
                let mut accepted: Vec<String> = keys
                    .iter()
                    .flat_map(|set| set.iter())
                    .filter(|k| !KEDA_CLIENT_KEYS.contains(k))
                    .map(|k| k.to_string())
                    .chain(prefixes.iter().map(|p| format!("{p}<name>")))
                    .collect();
                accepted.sort();
                Err(MetadataError::Unknown {
                    key: key.to_string(),
                    accepted: accepted.join(", "),
                })
            }
        }
    }
}

/// KEDA resolves `<key>FromEnv: VAR` from the target's environment and passes
/// the value on under the `<key>FromEnv` name.
pub const FROM_ENV: &str = "FromEnv";

/// Renames `<key>FromEnv` to `<key>`; both forms of one key is an error.
pub fn resolve_from_env(
    metadata: &HashMap<String, String>,
) -> Result<HashMap<String, String>, MetadataError> {
    let mut out = HashMap::with_capacity(metadata.len());
    for (k, v) in metadata {
        let key = k
            .strip_suffix(FROM_ENV)
            .filter(|b| !b.is_empty())
            .unwrap_or(k);
        if key != k && metadata.contains_key(key) {
            return Err(MetadataError::Conflict(format!(
                "give either `{key}` or `{k}`, not both"
            )));
        }
        out.insert(key.to_owned(), v.clone());
    }
    Ok(out)
}

/// What [`is_namespace_name`] accepts, for error messages.
pub const NAMESPACE_NAME: &str = "a Kubernetes namespace name (RFC 1123 label: 1-63 characters of \
     a-z, 0-9 and '-', starting and ending with a letter or digit)";

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::meta as map;

    #[test]
    fn values_are_trimmed_and_empty_is_absent() {
        let m = map(&[("a", "  x "), ("b", "   ")]);
        let meta = Metadata(&m);
        assert_eq!(meta.get("a"), Some("x"));
        assert_eq!(meta.get("b"), None);
        assert_eq!(meta.get("c"), None);
    }

    #[test]
    fn readers_refuse_naming_the_key() {
        let m = map(&[("n", "-1"), ("b", "yes"), ("d", "soon"), ("c", "p99")]);
        let meta = Metadata(&m);
        assert_eq!(meta.number("n", None), Ok(Some(-1.0)));
        let e = meta
            .number("n", Some((0.0, false)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`n`") && e.contains("at least 0"), "{e}");
        let e = meta.number("n", Some((0.0, true))).unwrap_err().to_string();
        assert!(e.contains("greater than 0"), "{e}");
        assert!(
            meta.boolean("b")
                .unwrap_err()
                .to_string()
                .contains("true or false")
        );
        assert!(meta.duration("d").unwrap_err().to_string().contains("30s"));
        let e = meta.choice("c", &[("max", 1), ("avg", 2)]).unwrap_err();
        assert!(e.to_string().contains("one of max, avg"), "{e}");
        assert_eq!(meta.choice("x", &[("max", 1)]), Ok(None));
    }

    #[test]
    fn unknown_keys_are_refused_listing_ours_but_not_kedas() {
        let m = map(&[
            ("a", "1"),
            ("scalerAddress", "s"),
            ("p.x", "1"),
            ("zz", "1"),
        ]);
        let meta = Metadata(&m);
        let e = meta
            .reject_unknown(&[&["a"], KEDA_CLIENT_KEYS], &["p."])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`zz`") && e.contains("a, p.<name>"), "{e}");
        assert!(!e.contains("scalerAddress"), "{e}");
        assert_eq!(
            meta.reject_unknown(&[&["a", "zz"], KEDA_CLIENT_KEYS], &["p."]),
            Ok(())
        );
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let long = "x".repeat(1000);
        let e = invalid_excerpt("query", &long, "short").to_string();
        assert!(e.contains("(1000 bytes in all)") && e.len() < 400, "{e}");
        assert_eq!(excerpt("short"), "short");
    }

    #[test]
    fn from_env_keys_are_renamed() {
        let out = resolve_from_env(&map(&[("targetValueFromEnv", "7"), ("FromEnv", "x")])).unwrap();
        assert_eq!(out, map(&[("targetValue", "7"), ("FromEnv", "x")]));
    }

    #[test]
    fn namespace_names_are_rfc_1123_labels() {
        let long = "a".repeat(63);
        for good in ["a", "0", "shop", "team-a", "a1-b2", "1abc", long.as_str()] {
            assert!(is_namespace_name(good), "{good:?}");
        }
        let too_long = "a".repeat(64);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "Shop",
            "shop\n",
            "-a",
            "a-",
            "a.b",
            "a_b",
            " a",
            "\u{e9}",
            too_long.as_str(),
        ] {
            assert!(!is_namespace_name(bad), "{bad:?}");
        }
    }
}
