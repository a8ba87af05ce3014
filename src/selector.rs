//! Kubernetes label selectors: parsing (`a=b,c!=d,e in (x,y),f notin (z),g,!h`)
//! and matching against a pod's labels.
//!
//! Parsed once per trigger (the trigger cache keeps the result), matched once
//! per pod per query, so matching is allocation-free.

use std::{collections::BTreeMap, fmt};

/// A pod's labels, sorted so two pods with the same labels compare equal.
pub type Labels = BTreeMap<String, String>;

/// A parsed selector: every requirement must hold (logical AND).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One term of a selector: key first, then the value(s).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// Why a selector string was refused; the message is shown to the user as is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(String);

impl Selector {
    /// Parses a selector in the syntax of `kubectl get -l`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in split_terms(input)? {
            requirements.push(parse_term(term)?);
        }
        if requirements.is_empty() {
            return Err(SelectorError("the selector is empty".into()));
        }
        Ok(Self { requirements })
    }

    /// The terms, in the order written (for translating a selector into
    /// another language, such as PromQL matchers).
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// True when every requirement holds for `labels`.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => write!(f, "{k}={v}")?,
                Requirement::NotEquals(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Exists(k) => write!(f, "{k}")?,
                Requirement::DoesNotExist(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Splits at commas that are not inside a parenthesised value list.
fn split_terms(input: &str) -> Result<Vec<&str>, SelectorError> {
    let mut terms = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' => {
                depth += 1;
                if depth > 1 {
                    return Err(SelectorError("nested parentheses".into()));
                }
            }
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| SelectorError("unbalanced ')'".into()))?;
            }
            ',' if depth == 0 => {
                terms.push(input[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SelectorError("unbalanced '('".into()));
    }
    terms.push(input[start..].trim());
    if terms.len() == 1 && terms[0].is_empty() {
        return Ok(Vec::new());
    }
    if terms.iter().any(|t| t.is_empty()) {
        return Err(SelectorError("empty requirement between commas".into()));
    }
    Ok(terms)
}

fn parse_term(term: &str) -> Result<Requirement, SelectorError> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key_of(key.trim())?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(
            key_of(k.trim())?,
            value_of(v.trim())?,
        ));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key_of(k.trim())?, value_of(v.trim())?));
    }
    if let Some(open) = term.find('(') {
        let head = term[..open].trim_end();
        let list = term[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| SelectorError(format!("`{term}`: text after ')'")))?;
        let values = list
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(key) = head.strip_suffix(" notin") {
            return Ok(Requirement::NotIn(key_of(key.trim())?, values));
        }
        if let Some(key) = head.strip_suffix(" in") {
            return Ok(Requirement::In(key_of(key.trim())?, values));
        }
        return Err(SelectorError(format!(
            "`{term}`: expected `key in (...)` or `key notin (...)`"
        )));
    }
    Ok(Requirement::Exists(key_of(term)?))
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at most
/// 63 characters, alphanumeric at both ends, `-_.` inside.
fn key_of(key: &str) -> Result<String, SelectorError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if !prefix_ok || name.is_empty() || !is_label_value(name) {
        return Err(SelectorError(format!("`{key}` is not a valid label key")));
    }
    Ok(key.to_owned())
}

/// A label value: empty, or at most 63 characters, alphanumeric at both ends
/// and `-_.` inside.
fn value_of(value: &str) -> Result<String, SelectorError> {
    if value.is_empty() || is_label_value(value) {
        Ok(value.to_owned())
    } else {
        Err(SelectorError(format!(
            "`{value}` is not a valid label value"
        )))
    }
}

fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::labels;
    use proptest::prelude::*;

    #[test]
    fn equality_forms() {
        let s = Selector::parse("app=web, tier==front").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        let s = Selector::parse("app!=web").unwrap();
        assert!(s.matches(&labels(&[("app", "api")])));
        assert!(s.matches(&labels(&[])), "!= holds when the key is absent");
        assert!(!s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn set_forms() {
        let s = Selector::parse("env in (prod, staging),tier notin (db)").unwrap();
        assert!(s.matches(&labels(&[("env", "prod"), ("tier", "web")])));
        assert!(s.matches(&labels(&[("env", "staging")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "prod"), ("tier", "db")])));
        assert!(!s.matches(&labels(&[])), "in needs the key");
    }

    #[test]
    fn existence_forms() {
        let s = Selector::parse("app,!canary").unwrap();
        assert!(s.matches(&labels(&[("app", "x")])));
        assert!(!s.matches(&labels(&[("app", "x"), ("canary", "true")])));
        assert!(!s.matches(&labels(&[])));
    }

    #[test]
    fn prefixed_keys_and_dotted_values() {
        let s = Selector::parse("app.kubernetes.io/name=web.v2").unwrap();
        assert!(s.matches(&labels(&[("app.kubernetes.io/name", "web.v2")])));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            " , ",
            "app=web,",
            "a in (x",
            "a in x)",
            "a between (x)",
            "a=b c",
            "-a=b",
            "a=-b",
            "a in ((x))",
            "Bad_Prefix/a=b",
            &"k".repeat(64),
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        let text = "app=web,env in (a,b),x notin (c),y,!z,t!=u";
        let s = Selector::parse(text).unwrap();
        assert_eq!(s.to_string(), text);
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
    }

    proptest! {
        #[test]
        fn equality_selector_matches_exactly_its_label(
            k in "[a-z][a-z0-9]{0,10}", v in "[a-z0-9]{1,10}", other in "[a-z0-9]{1,10}"
        ) {
            let s = Selector::parse(&format!("{k}={v}")).unwrap();
            prop_assert!(s.matches(&labels(&[(&k, &v)])));
            prop_assert_eq!(s.matches(&labels(&[(&k, &other)])), v == other);
        }

        #[test]
        fn never_panics(input in ".{0,40}") {
            let _ = Selector::parse(&input);
        }
    }
}
