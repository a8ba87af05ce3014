//! The JSON of `custom.metrics.k8s.io` and of the `meta/v1` objects around
//! it, field for field as Kubernetes' Go types serialise.
//!
//! Written from the Go sources (json tags and `omitempty`), not from a Rust
//! crate:
//! - `kubernetes/metrics` `pkg/apis/custom_metrics/v1beta2/types.go`
//!   (commit 4edfa3b8): `MetricIdentifier` l.26-35, `MetricValueList`
//!   l.40-46, `MetricValue` l.51-70.
//! - the same repository, `v1beta1/types.go`: `MetricValueList` l.28-34,
//!   `MetricValue` l.39-66 (`metricName`, `window`, `selector` at the item).
//! - `kubernetes/apimachinery` `pkg/apis/meta/v1/types.go` (commit eed236ce):
//!   `TypeMeta` l.42, `ListMeta` l.61, `Status` l.828, `StatusDetails` l.866,
//!   `APIGroupList` l.1184, `APIGroup` l.1195, `GroupVersionForDiscovery`
//!   l.1229, `APIResource` l.1238, `APIResourceList` l.1290, `LabelSelector`
//!   l.1339, `LabelSelectorRequirement` l.1353; `time.go` `Time.MarshalJSON`
//!   (RFC 3339 in UTC, whole seconds).
//! - `kubernetes/api` `core/v1/types.go`: `ObjectReference` (every field
//!   `omitempty`).
//!
//! What Go's encoding does that matters here: an embedded `TypeMeta` is
//! inlined and its fields are `omitempty`, so `kind`/`apiVersion` appear on
//! top-level objects only; `omitempty` never drops a struct, so `metadata` is
//! always there, as `{}`; a nil pointer without `omitempty` is `null`
//! (`metric.selector` in v1beta2, `selector` in v1beta1, when no
//! metricLabelSelector was given); `APIResource.singularName` has no
//! `omitempty` and is `""`. Field order does not matter to JSON readers;
//! names and omission do, and the tests below pin both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::selector::{Requirement, Selector};

/// The API group served.
pub const GROUP: &str = "custom.metrics.k8s.io";
/// The versions served, preferred first.
pub const VERSIONS: [&str; 2] = ["v1beta2", "v1beta1"];

fn is_empty(s: &str) -> bool {
    s.is_empty()
}

/// `metav1.ListMeta` with every field unset: always serialised, as `{}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMeta {}

/// `core/v1.ObjectReference`, the fields a metric uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub api_version: String,
}

impl ObjectReference {
    /// A pod. `apiVersion` is the core group's `v1` (custom-metrics-apiserver's
    /// `helpers.ReferenceFor` writes `/v1`, its group being empty; readers
    /// ignore the field).
    pub fn pod(namespace: &str, name: &str) -> Self {
        Self {
            kind: "Pod".into(),
            namespace: namespace.into(),
            name: name.into(),
            api_version: "v1".into(),
        }
    }
}

/// `metav1.LabelSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// `metav1.LabelSelectorRequirement`; `operator` is `In`, `NotIn`, `Exists`
/// or `DoesNotExist`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl From<&Selector> for LabelSelector {
    /// What `metav1.ParseToLabelSelector` makes of the selector's text:
    /// equalities become `matchLabels`, the rest `matchExpressions` with
    /// sorted values. `key!=v`, which Go refuses to convert, is written as
    /// the equivalent `NotIn [v]` (both hold when the key is absent).
    fn from(selector: &Selector) -> Self {
        let mut out = LabelSelector::default();
        let expr = |key: &str, operator: &str, values: &[String]| {
            let mut values = values.to_vec();
            values.sort();
            values.dedup();
            LabelSelectorRequirement {
                key: key.into(),
                operator: operator.into(),
                values,
            }
        };
        for r in selector.requirements() {
            let e = match r {
                Requirement::Equals(k, v) => {
                    out.match_labels.insert(k.clone(), v.clone());
                    continue;
                }
                Requirement::NotEquals(k, v) => expr(k, "NotIn", std::slice::from_ref(v)),
                Requirement::In(k, vs) => expr(k, "In", vs),
                Requirement::NotIn(k, vs) => expr(k, "NotIn", vs),
                Requirement::Exists(k) => expr(k, "Exists", &[]),
                Requirement::DoesNotExist(k) => expr(k, "DoesNotExist", &[]),
            };
            out.match_expressions.push(e);
        }
        out
    }
}

/// v1beta2 `MetricIdentifier`. `selector` has no `omitempty`: `null` when
/// the request had no metricLabelSelector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricIdentifier {
    pub name: String,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

/// v1beta2 `MetricValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricValue {
    pub described_object: ObjectReference,
    pub metric: MetricIdentifier,
    /// RFC 3339, UTC, whole seconds (`metav1.Time`).
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<i64>,
    /// A canonical quantity string (see [`super::quantity`]).
    pub value: String,
}

/// v1beta1 `MetricValue`: the metric's name and selector sit on the item,
/// and the window is `window`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricValueV1Beta1 {
    pub described_object: ObjectReference,
    pub metric_name: String,
    pub timestamp: String,
    #[serde(default, rename = "window", skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<i64>,
    pub value: String,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

impl From<MetricValue> for MetricValueV1Beta1 {
    /// What `kubernetes/metrics`' conversion does (`v1beta1/conversion.go`):
    /// `metric.name` → `metricName`, `metric.selector` → `selector`.
    fn from(v: MetricValue) -> Self {
        Self {
            described_object: v.described_object,
            metric_name: v.metric.name,
            timestamp: v.timestamp,
            window_seconds: v.window_seconds,
            value: v.value,
            selector: v.metric.selector,
        }
    }
}

/// `MetricValueList` of either version (`T` is the item type).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricValueList<T> {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ListMeta,
    pub items: Vec<T>,
}

impl<T> MetricValueList<T> {
    pub fn new(version: &str, items: Vec<T>) -> Self {
        Self {
            kind: "MetricValueList".into(),
            api_version: format!("{GROUP}/{version}"),
            metadata: ListMeta {},
            items,
        }
    }
}

/// `metav1.APIResource`, the fields discovery of metrics fills.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiResource {
    pub name: String,
    /// No `omitempty` in Go: always present, empty for metrics.
    #[serde(default)]
    pub singular_name: String,
    pub namespaced: bool,
    pub kind: String,
    pub verbs: Vec<String>,
}

impl ApiResource {
    /// What custom-metrics-apiserver lists per metric
    /// (`pkg/provider/resource_lister.go`): `pods/<metric>`, namespaced,
    /// kind `MetricValueList`, verb `get`.
    pub fn pod_metric(metric: &str) -> Self {
        Self {
            name: format!("pods/{metric}"),
            singular_name: String::new(),
            namespaced: true,
            kind: "MetricValueList".into(),
            verbs: vec!["get".into()],
        }
    }
}

/// `metav1.APIResourceList`: `GET /apis/<group>/<version>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiResourceList {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub api_version: String,
    pub group_version: String,
    pub resources: Vec<ApiResource>,
}

impl ApiResourceList {
    pub fn new(version: &str, resources: Vec<ApiResource>) -> Self {
        Self {
            kind: "APIResourceList".into(),
            api_version: "v1".into(),
            group_version: format!("{GROUP}/{version}"),
            resources,
        }
    }
}

/// `metav1.GroupVersionForDiscovery`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupVersionForDiscovery {
    pub group_version: String,
    pub version: String,
}

/// `metav1.APIGroup`: `GET /apis/<group>`, and each entry of `/apis`
/// (without `kind`/`apiVersion` there, as Go's `omitempty` leaves them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiGroup {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub api_version: String,
    pub name: String,
    pub versions: Vec<GroupVersionForDiscovery>,
    /// `omitempty` on a struct keeps it: always present.
    pub preferred_version: GroupVersionForDiscovery,
}

impl ApiGroup {
    /// `custom.metrics.k8s.io` with both versions, v1beta2 preferred.
    pub fn custom_metrics() -> Self {
        let versions: Vec<GroupVersionForDiscovery> = VERSIONS
            .iter()
            .map(|v| GroupVersionForDiscovery {
                group_version: format!("{GROUP}/{v}"),
                version: (*v).into(),
            })
            .collect();
        Self {
            kind: "APIGroup".into(),
            api_version: "v1".into(),
            name: GROUP.into(),
            preferred_version: versions[0].clone(),
            versions,
        }
    }
}

/// `metav1.APIGroupList`: `GET /apis`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiGroupList {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub api_version: String,
    pub groups: Vec<ApiGroup>,
}

impl ApiGroupList {
    pub fn custom_metrics() -> Self {
        let group = ApiGroup {
            kind: String::new(),
            api_version: String::new(),
            ..ApiGroup::custom_metrics()
        };
        Self {
            kind: "APIGroupList".into(),
            api_version: "v1".into(),
            groups: vec![group],
        }
    }
}

/// `metav1.StatusReason`: the ones this server answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusReason {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    InternalError,
    ServiceUnavailable,
}

impl StatusReason {
    /// The HTTP code Kubernetes pairs with the reason (`api/errors/errors.go`).
    pub fn code(self) -> u16 {
        match self {
            StatusReason::BadRequest => 400,
            StatusReason::Unauthorized => 401,
            StatusReason::Forbidden => 403,
            StatusReason::NotFound => 404,
            StatusReason::MethodNotAllowed => 405,
            StatusReason::InternalError => 500,
            StatusReason::ServiceUnavailable => 503,
        }
    }
}

/// `metav1.StatusDetails`, the fields used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<i32>,
}

/// `metav1.Status` of a failed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default, skip_serializing_if = "is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ListMeta,
    /// Always `Failure` here.
    pub status: String,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub message: String,
    pub reason: StatusReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    pub code: u16,
}

impl Status {
    pub fn failure(reason: StatusReason, message: impl Into<String>) -> Self {
        Self {
            kind: "Status".into(),
            api_version: "v1".into(),
            metadata: ListMeta {},
            status: "Failure".into(),
            message: message.into(),
            reason,
            details: None,
            code: reason.code(),
        }
    }

    pub fn with_details(mut self, details: StatusDetails) -> Self {
        self.details = Some(details);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// Compares as JSON values: key order is free, names and omission are not.
    fn same(got: &impl Serialize, want: &str) {
        let got = serde_json::to_value(got).unwrap();
        let want: Value = serde_json::from_str(want).unwrap();
        assert_eq!(got, want, "\n got: {got}\nwant: {want}");
    }

    fn item(selector: Option<LabelSelector>, window: Option<i64>) -> MetricValue {
        MetricValue {
            described_object: ObjectReference::pod("shop", "web-1"),
            metric: MetricIdentifier {
                name: "active_requests".into(),
                selector,
            },
            timestamp: "2026-01-02T03:04:05Z".into(),
            window_seconds: window,
            value: "1500m".into(),
        }
    }

    #[test]
    fn v1beta2_list_as_go_writes_it() {
        let list = MetricValueList::new("v1beta2", vec![item(None, None)]);
        same(
            &list,
            r#"{"kind":"MetricValueList","apiVersion":"custom.metrics.k8s.io/v1beta2","metadata":{},
                "items":[{"describedObject":{"kind":"Pod","namespace":"shop","name":"web-1","apiVersion":"v1"},
                          "metric":{"name":"active_requests","selector":null},
                          "timestamp":"2026-01-02T03:04:05Z","value":"1500m"}]}"#,
        );
        // windowSeconds appears only when set.
        same(
            &item(None, Some(30)),
            r#"{"describedObject":{"kind":"Pod","namespace":"shop","name":"web-1","apiVersion":"v1"},
                "metric":{"name":"active_requests","selector":null},
                "timestamp":"2026-01-02T03:04:05Z","windowSeconds":30,"value":"1500m"}"#,
        );
        same(
            &MetricValueList::<MetricValue>::new("v1beta2", vec![]),
            r#"{"kind":"MetricValueList","apiVersion":"custom.metrics.k8s.io/v1beta2","metadata":{},"items":[]}"#,
        );
    }

    #[test]
    fn v1beta1_item_carries_name_window_and_selector() {
        let sel = LabelSelector::from(&Selector::parse("verb=GET").unwrap());
        let v1: MetricValueV1Beta1 = item(Some(sel), Some(30)).into();
        same(
            &MetricValueList::new("v1beta1", vec![v1]),
            r#"{"kind":"MetricValueList","apiVersion":"custom.metrics.k8s.io/v1beta1","metadata":{},
                "items":[{"describedObject":{"kind":"Pod","namespace":"shop","name":"web-1","apiVersion":"v1"},
                          "metricName":"active_requests","timestamp":"2026-01-02T03:04:05Z",
                          "window":30,"value":"1500m","selector":{"matchLabels":{"verb":"GET"}}}]}"#,
        );
        let v1: MetricValueV1Beta1 = item(None, None).into();
        let v = serde_json::to_value(&v1).unwrap();
        assert_eq!(v["selector"], Value::Null, "no omitempty: null, not absent");
        assert!(v.get("window").is_none() && v.get("windowSeconds").is_none());
        assert!(v.get("metric").is_none());
    }

    #[test]
    fn label_selector_as_parse_to_label_selector_makes_it() {
        let s = Selector::parse("app=web,env in (prod,dev),tier notin (db),canary,!legacy,x!=y")
            .unwrap();
        same(
            &LabelSelector::from(&s),
            r#"{"matchLabels":{"app":"web"},"matchExpressions":[
                {"key":"env","operator":"In","values":["dev","prod"]},
                {"key":"tier","operator":"NotIn","values":["db"]},
                {"key":"canary","operator":"Exists"},
                {"key":"legacy","operator":"DoesNotExist"},
                {"key":"x","operator":"NotIn","values":["y"]}]}"#,
        );
        // Only expressions: matchLabels is omitted, not `{}`.
        same(
            &LabelSelector::from(&Selector::parse("a").unwrap()),
            r#"{"matchExpressions":[{"key":"a","operator":"Exists"}]}"#,
        );
    }

    #[test]
    fn discovery_documents() {
        same(
            &ApiResourceList::new("v1beta2", vec![ApiResource::pod_metric("active_requests")]),
            r#"{"kind":"APIResourceList","apiVersion":"v1","groupVersion":"custom.metrics.k8s.io/v1beta2",
                "resources":[{"name":"pods/active_requests","singularName":"","namespaced":true,
                              "kind":"MetricValueList","verbs":["get"]}]}"#,
        );
        let group = r#"{"name":"custom.metrics.k8s.io",
            "versions":[{"groupVersion":"custom.metrics.k8s.io/v1beta2","version":"v1beta2"},
                        {"groupVersion":"custom.metrics.k8s.io/v1beta1","version":"v1beta1"}],
            "preferredVersion":{"groupVersion":"custom.metrics.k8s.io/v1beta2","version":"v1beta2"}}"#;
        let mut top: Value = serde_json::from_str(group).unwrap();
        top["kind"] = json!("APIGroup");
        top["apiVersion"] = json!("v1");
        same(&ApiGroup::custom_metrics(), &top.to_string());
        same(
            &ApiGroupList::custom_metrics(),
            &format!(r#"{{"kind":"APIGroupList","apiVersion":"v1","groups":[{group}]}}"#),
        );
    }

    #[test]
    fn status_bodies() {
        same(
            &Status::failure(StatusReason::Unauthorized, "Unauthorized"),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message":"Unauthorized","reason":"Unauthorized","code":401}"#,
        );
        same(
            &Status::failure(
                StatusReason::NotFound,
                "the server could not find the metric x for pods",
            )
            .with_details(StatusDetails {
                name: "x".into(),
                group: GROUP.into(),
                kind: "pods".into(),
                retry_after_seconds: None,
            }),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                "message":"the server could not find the metric x for pods","reason":"NotFound",
                "details":{"name":"x","group":"custom.metrics.k8s.io","kind":"pods"},"code":404}"#,
        );
        for (reason, code) in [
            (StatusReason::BadRequest, 400),
            (StatusReason::Forbidden, 403),
            (StatusReason::MethodNotAllowed, 405),
            (StatusReason::InternalError, 500),
            (StatusReason::ServiceUnavailable, 503),
        ] {
            let v = serde_json::to_value(Status::failure(reason, "m")).unwrap();
            assert_eq!(v["code"], code);
            assert_eq!(v["reason"], serde_json::to_value(reason).unwrap());
        }
    }

    #[test]
    fn lists_read_back() {
        let list = MetricValueList::new("v1beta2", vec![item(None, Some(30))]);
        let text = serde_json::to_string(&list).unwrap();
        let back: MetricValueList<MetricValue> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, list);
    }
}
