//! Who is on the other end of a metrics stream.
//!
//! Envoy sends its `Node` on the first message of each stream only. Istio's
//! node id has the form `sidecar~<pod IP>~<pod>.<namespace>~<namespace>.svc.cluster.local`
//! and its node metadata carries `NAME` (pod), `NAMESPACE`, `LABELS` (a
//! struct of the pod's labels), `WORKLOAD_NAME` and `INSTANCE_IPS` (every IP
//! of the pod, comma-separated). Everything here came from the network, so
//! it is validated before it names anything in the store.
//!
//! The node id is authoritative for the pod's name and namespace: metadata
//! that names another pod is refused, not preferred (a stream could otherwise
//! pair the node id of its own IP with any pod's name). Only a node without
//! a sidecar id is named by its metadata alone. The IPs a node claims (the
//! node id's and `INSTANCE_IPS`) are what the sink compares with the
//! stream's peer address.

use std::{net::IpAddr, sync::Arc};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

use crate::{selector::Labels, store::PodIdentity};

/// At most this many `INSTANCE_IPS` are read (a pod has one or two).
const MAX_INSTANCE_IPS: usize = 8;

/// Why a stream's identity was not usable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("node has neither NAME/NAMESPACE metadata nor an Istio sidecar id (id {0:?})")]
    Missing(String),
    #[error("namespace {0:?} is not a DNS label")]
    BadNamespace(String),
    #[error("pod name {0:?} is not a DNS subdomain")]
    BadPodName(String),
    #[error(
        "node id {id:?} names pod {pod:?} in {namespace:?}, but its metadata names {meta_pod:?} in {meta_namespace:?}"
    )]
    Inconsistent {
        id: String,
        pod: String,
        namespace: String,
        meta_pod: String,
        meta_namespace: String,
    },
}

/// A pod as a node claims to be, with the addresses it claims to have.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    pub identity: PodIdentity,
    /// The node id's IP, then `INSTANCE_IPS`; IPv4-mapped IPv6 addresses as
    /// IPv4.
    pub ips: Vec<IpAddr>,
}

impl Claimed {
    /// True when `peer` (canonical) is one of the claimed IPs.
    pub fn is_at(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|p| self.ips.contains(&p))
    }
}

/// The parts of an Istio sidecar node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeId<'a> {
    /// `None` when the IP part is not an IP address.
    pub ip: Option<IpAddr>,
    pub pod: &'a str,
    pub namespace: &'a str,
}

/// Learns the pod from Envoy's `Node`.
pub fn from_node(node: &Node) -> Result<Claimed, IdentityError> {
    let meta = node.metadata.as_ref();
    let text = |key: &str| {
        meta.and_then(|m| string_field(m, key))
            .filter(|s| !s.is_empty())
    };
    let (meta_pod, meta_ns) = (text("NAME"), text("NAMESPACE"));
    let (name, namespace, id_ip) = match parse_node_id(&node.id) {
        Some(id) => {
            if meta_pod.is_some_and(|p| p != id.pod) || meta_ns.is_some_and(|ns| ns != id.namespace)
            {
                return Err(IdentityError::Inconsistent {
                    id: node.id.clone(),
                    pod: id.pod.to_owned(),
                    namespace: id.namespace.to_owned(),
                    meta_pod: meta_pod.unwrap_or(id.pod).to_owned(),
                    meta_namespace: meta_ns.unwrap_or(id.namespace).to_owned(),
                });
            }
            (id.pod, id.namespace, id.ip)
        }
        None => match (meta_pod, meta_ns) {
            (Some(p), Some(ns)) => (p, ns, None),
            _ => return Err(IdentityError::Missing(node.id.clone())),
        },
    };
    if !is_dns_label(namespace) {
        return Err(IdentityError::BadNamespace(namespace.to_owned()));
    }
    if !is_dns_subdomain(name) {
        return Err(IdentityError::BadPodName(name.to_owned()));
    }
    let ips = id_ip
        .into_iter()
        .chain(
            text("INSTANCE_IPS")
                .unwrap_or("")
                .split(',')
                .take(MAX_INSTANCE_IPS)
                .filter_map(|ip| ip.trim().parse::<IpAddr>().ok()),
        )
        .map(|ip| ip.to_canonical())
        .collect();
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
    Ok(Claimed {
        identity: PodIdentity {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            workload: text("WORKLOAD_NAME").map(str::to_owned),
            labels: Arc::new(labels),
        },
        ips,
    })
}

fn string_field<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match &s.fields.get(key)?.kind {
        Some(Kind::StringValue(v)) => Some(v),
        _ => None,
    }
}

/// `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` → its parts.
/// Pod names may contain dots and namespaces cannot, so the split is at the
/// last dot.
pub fn parse_node_id(id: &str) -> Option<NodeId<'_>> {
    let mut parts = id.split('~');
    let _kind = parts.next()?;
    let ip = parts.next()?;
    let pod_ns = parts.next()?;
    let _domain = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (pod, namespace) = pod_ns.rsplit_once('.')?;
    if pod.is_empty() || namespace.is_empty() {
        return None;
    }
    Some(NodeId {
        ip: ip.parse::<IpAddr>().ok().map(|ip| ip.to_canonical()),
        pod,
        namespace,
    })
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
    use crate::testkit::{node, string};
    use envoy_types::pb::google::protobuf::Value;

    #[test]
    fn metadata_agreeing_with_the_node_id_carries_labels_and_workload() {
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
            "sidecar~10.0.0.1~web-7d9f-abcde.shop~shop.svc.cluster.local",
            vec![
                ("NAME", string("web-7d9f-abcde")),
                ("NAMESPACE", string("shop")),
                ("LABELS", labels),
                ("WORKLOAD_NAME", string("web")),
            ],
        );
        let claimed = from_node(&n).unwrap();
        let id = &claimed.identity;
        assert_eq!(id.name, "web-7d9f-abcde");
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.workload.as_deref(), Some("web"));
        assert_eq!(id.labels.get("app").map(String::as_str), Some("web"));
        assert!(
            !id.labels.contains_key("n"),
            "non-string label values are ignored"
        );
        assert_eq!(claimed.ips, vec![IpAddr::from([10, 0, 0, 1])]);
    }

    #[test]
    fn metadata_naming_another_pod_is_refused() {
        for (name, ns) in [("web-1", "bank"), ("web-2", "shop"), ("other", "elsewhere")] {
            let n = node(
                "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
                vec![("NAME", string(name)), ("NAMESPACE", string(ns))],
            );
            assert!(
                matches!(from_node(&n), Err(IdentityError::Inconsistent { .. })),
                "{name}.{ns}"
            );
        }
        // One of the two, disagreeing, is enough.
        let n = node(
            "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
            vec![("NAMESPACE", string("bank"))],
        );
        assert!(matches!(
            from_node(&n),
            Err(IdentityError::Inconsistent { .. })
        ));
    }

    #[test]
    fn node_id_parts_and_claimed_addresses() {
        let n = node(
            "sidecar~10.0.0.1~web.v2-abc.shop~shop.svc.cluster.local",
            vec![],
        );
        let c = from_node(&n).unwrap();
        assert_eq!(
            (c.identity.name.as_str(), c.identity.namespace.as_str()),
            ("web.v2-abc", "shop")
        );
        assert!(c.identity.labels.is_empty());
        assert_eq!(c.identity.workload, None);
        let v4 = IpAddr::from([10, 0, 0, 1]);
        assert!(c.is_at(Some(v4)));
        assert!(!c.is_at(Some(IpAddr::from([10, 0, 0, 2]))));
        assert!(!c.is_at(None), "an unknown peer is no match");

        // Mapped IPv6 is IPv4; INSTANCE_IPS add the pod's other addresses,
        // garbage in them is ignored.
        let id = parse_node_id("sidecar~::ffff:10.0.0.1~p.ns~ns.svc.cluster.local").unwrap();
        assert_eq!(id.ip, Some(v4));
        let n = node(
            "sidecar~not-an-ip~p.ns~ns.svc.cluster.local",
            vec![("INSTANCE_IPS", string("10.0.0.1, fd00::7,junk"))],
        );
        let c = from_node(&n).unwrap();
        assert_eq!(c.ips, vec![v4, "fd00::7".parse::<IpAddr>().unwrap()]);
        // A node without a sidecar id is named by its metadata; its
        // addresses are INSTANCE_IPS only.
        let n = node(
            "router~x",
            vec![
                ("NAME", string("gw-1")),
                ("NAMESPACE", string("edge")),
                ("INSTANCE_IPS", string("10.0.0.9")),
            ],
        );
        let c = from_node(&n).unwrap();
        assert_eq!(c.identity.name, "gw-1");
        assert_eq!(c.ips, vec![IpAddr::from([10, 0, 0, 9])]);
    }

    #[test]
    fn partial_metadata_agreeing_with_the_id() {
        let n = node(
            "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local",
            vec![("NAME", string("web-1"))],
        );
        assert_eq!(from_node(&n).unwrap().identity.namespace, "shop");
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
