//! Who is on the other end of a metrics stream.
//!
//! Envoy sends its `Node` on the first message of each stream only. Istio fills
//! the node metadata with `NAME` (pod), `NAMESPACE`, `LABELS` (a struct of the
//! pod's labels) and `WORKLOAD_NAME`; its node id has the form
//! `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`, the fallback
//! when the metadata lacks the names. Everything here came from the network,
//! so it is validated before it names anything in the store.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

use crate::{selector::Labels, store::PodIdentity};

/// Why a stream's identity was not usable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("node has neither NAME/NAMESPACE metadata nor an Istio sidecar id (id {0:?})")]
    Missing(String),
    #[error("namespace {0:?} is not a DNS label")]
    BadNamespace(String),
    #[error("pod name {0:?} is not a DNS subdomain")]
    BadPodName(String),
}

/// Learns the pod from Envoy's `Node`.
pub fn from_node(node: &Node) -> Result<PodIdentity, IdentityError> {
    let meta = node.metadata.as_ref();
    let text = |key: &str| {
        meta.and_then(|m| string_field(m, key))
            .filter(|s| !s.is_empty())
    };
    let (name, namespace) = match (text("NAME"), text("NAMESPACE")) {
        (Some(n), Some(ns)) => (n.to_owned(), ns.to_owned()),
        _ => parse_node_id(&node.id).ok_or_else(|| IdentityError::Missing(node.id.clone()))?,
    };
    if !is_dns_label(&namespace) {
        return Err(IdentityError::BadNamespace(namespace));
    }
    if !is_dns_subdomain(&name) {
        return Err(IdentityError::BadPodName(name));
    }
    let labels: Labels = meta
        .and_then(|m| m.fields.get("LABELS"))
        .and_then(|v| match &v.kind {
            Some(Kind::StructValue(s)) => Some(s),
            _ => None,
        })
        .map(|s| {
            s.fields
                .iter()
                .filter_map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(v)) => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(PodIdentity {
        namespace,
        name,
        workload: text("WORKLOAD_NAME").map(str::to_owned),
        labels: Arc::new(labels),
    })
}

fn string_field<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match &s.fields.get(key)?.kind {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}

/// `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` → (pod, namespace).
/// Pod names may contain dots and namespaces cannot, so the split is at the
/// last dot.
pub fn parse_node_id(id: &str) -> Option<(String, String)> {
    let mut parts = id.split('~');
    let _kind = parts.next()?;
    let _ip = parts.next()?;
    let pod_ns = parts.next()?;
    let _domain = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (pod, ns) = pod_ns.rsplit_once('.')?;
    if pod.is_empty() || ns.is_empty() {
        return None;
    }
    Some((pod.to_owned(), ns.to_owned()))
}

/// RFC 1123 label: what a namespace must be.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: what a pod name must be.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Value;

    fn string(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    fn node(id: &str, fields: Vec<(&str, Value)>) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn metadata_wins_and_carries_labels_and_workload() {
        let labels = Value {
            kind: Some(Kind::StructValue(Struct {
                fields: [
                    ("app".to_string(), string("web")),
                    (
                        "n".to_string(),
                        Value {
                            kind: Some(Kind::NumberValue(1.0)),
                        },
                    ),
                ]
                .into_iter()
                .collect(),
            })),
        };
        let n = node(
            "sidecar~10.0.0.1~other.elsewhere~elsewhere.svc.cluster.local",
            vec![
                ("NAME", string("web-7d9f-abcde")),
                ("NAMESPACE", string("shop")),
                ("LABELS", labels),
                ("WORKLOAD_NAME", string("web")),
            ],
        );
        let id = from_node(&n).unwrap();
        assert_eq!(id.name, "web-7d9f-abcde");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.workload.as_deref(), Some("web"));
        assert_eq!(id.labels.get("app").map(String::as_str), Some("web"));
        assert!(
            !id.labels.contains_key("n"),
            "non-string label values are ignored"
        );
    }

    #[test]
    fn node_id_fallback_splits_at_the_last_dot() {
        let n = node(
            "sidecar~10.0.0.1~web.v2-abc.shop~shop.svc.cluster.local",
            vec![],
        );
        let id = from_node(&n).unwrap();
        assert_eq!(
            (id.name.as_str(), id.namespace.as_str()),
            ("web.v2-abc", "shop")
        );
        assert!(id.labels.is_empty());
        assert_eq!(id.workload, None);
    }

    #[test]
    fn partial_metadata_falls_back_to_the_id() {
        let n = node(
            "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
            vec![("NAME", string("web-1"))],
        );
        assert_eq!(from_node(&n).unwrap().namespace, "shop");
    }

    #[test]
    fn unusable_identities() {
        for id in [
            "",
            "router~10.0.0.1",
            "sidecar~10.0.0.1~nodots~x.svc",
            "sidecar~10.0.0.1~.shop~shop.svc",
            "sidecar~10.0.0.1~pod.~x",
            "sidecar~a~b.c~d~e",
        ] {
            assert!(from_node(&node(id, vec![])).is_err(), "{id:?}");
        }
        let bad_ns = node(
            "",
            vec![("NAME", string("p")), ("NAMESPACE", string("Shop_1"))],
        );
        assert_eq!(
            from_node(&bad_ns),
            Err(IdentityError::BadNamespace("Shop_1".into()))
        );
        let bad_pod = node(
            "",
            vec![("NAME", string("p/../x")), ("NAMESPACE", string("shop"))],
        );
        assert!(matches!(
            from_node(&bad_pod),
            Err(IdentityError::BadPodName(_))
        ));
    }
}
