//! The live view: what KEDA and HPAs asked, what they were answered, and the
//! page at `/`.
//!
//! The engine reports each ask and answer to a [`Recorder`] (it implements
//! [`engine::Record`](crate::engine::Record)), whichever front end asked:
//! KEDA's scaler or the Custom Metrics API. `/v1/triggers` reads it back and
//! the page (`view.html`, embedded) draws it. With the view off there is no
//! `Recorder` at all: the engine does nothing per call. Everything here is
//! bounded: at most [`MAX_TRIGGERS`] triggers (the least recently asked is
//! evicted), a ring of at most [`SERIES_POINTS`] points per trigger, text
//! echoed from metadata cut to [`MAX_TEXT`] characters, and a trigger not
//! asked for [`FORGET_AFTER`] drops out.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;

use crate::{
    engine::{Asker, EvalError, PodReading, PushLog, Record},
    source::Source,
    store::PodSelector,
    trigger::Trigger,
};

/// The page, served at `/`.
pub const PAGE: &str = include_str!("view.html");

/// Triggers tracked at most.
pub const MAX_TRIGGERS: usize = 1_000;
/// A trigger not asked about for this long drops out.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// One sparkline point per this span (the latest answer in it).
pub const SERIES_STEP: Duration = Duration::from_secs(10);
/// Points per trigger: ten minutes of [`SERIES_STEP`]s.
pub const SERIES_POINTS: usize = 60;
/// Longest text (selector, query, error) echoed, in characters.
pub const MAX_TEXT: usize = 256;

/// Which front end asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// KEDA's external scaler (gRPC).
    Keda,
    /// An HPA through the Custom Metrics API.
    CustomMetrics,
}

/// Which trigger an answer was for: KEDA's ScaledObject and the metric its
/// trigger serves (a ScaledObject may have several triggers), or an HPA's
/// metric and the pods it names (the HPA's own name is not in its request).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TriggerKey {
    pub via: Via,
    pub namespace: String,
    /// The ScaledObject; for [`Via::CustomMetrics`], the selector text.
    pub name: String,
    pub metric: String,
}

impl TriggerKey {
    /// KEDA's ScaledObject `name` in `namespace`, for `metric`.
    pub fn keda(namespace: &str, name: &str, metric: &str) -> Self {
        Self {
            via: Via::Keda,
            namespace: bounded(namespace),
            name: bounded(name),
            metric: bounded(metric),
        }
    }
}

/// What a trigger asks for, as shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Description {
    /// `envoy` or `prometheus`.
    pub source: &'static str,
    /// The label selector (`app=web`), `workload=<name>`, or the query.
    pub selector: String,
    /// The namespace whose pods an envoy trigger reads (for `/v1/pods`).
    pub pods_namespace: Option<String>,
    /// `/v1/pods` query parameters that list the trigger's pods.
    pub pods_query: Option<Vec<(String, String)>>,
    /// KEDA's `targetValue`; `null` for an HPA (its target is in the HPA
    /// object, not in the request).
    pub target: Option<f64>,
    /// KEDA's `activationValue`; `null` for an HPA.
    pub activation: Option<f64>,
}

impl Description {
    /// Describes a parsed trigger; `metadata` supplies the query text of a
    /// Prometheus trigger, which the parsed form keeps private.
    pub fn of(trigger: &Trigger, metadata: &HashMap<String, String>) -> Self {
        let (source, selector, pods_namespace, pods_query) = match &trigger.source {
            Source::Envoy { query, .. } => {
                let (text, param) = match &query.selector {
                    PodSelector::Labels(s) => (s.to_string(), ("labelSelector", s.to_string())),
                    PodSelector::Workload(w) => (format!("workload={w}"), ("workload", w.clone())),
                };
                let params = vec![
                    ("namespace".to_string(), bounded(&query.namespace)),
                    (param.0.to_string(), bounded(&param.1)),
                ];
                ("envoy", text, Some(bounded(&query.namespace)), Some(params))
            }
            Source::Prometheus(_) => ("prometheus", prometheus_text(metadata), None, None),
            Source::Activator(r) => {
                let route = format!("{}{}", r.host, r.path_prefix.as_deref().unwrap_or(""));
                ("activator", route, None, None)
            }
        };
        Self {
            source,
            selector: bounded(&selector),
            pods_namespace,
            pods_query,
            target: Some(trigger.target),
            activation: Some(trigger.activation),
        }
    }

    /// Describes an HPA's question: the pods of `namespace` that `selector`
    /// matches (every pod when `None`), or the one pod named.
    pub fn of_pods(namespace: &str, selector: Option<&PodSelector>, pod: Option<&str>) -> Self {
        let (text, param) = match (pod, selector) {
            (Some(p), _) => (format!("pod={p}"), None),
            (None, Some(PodSelector::Labels(s))) => {
                (s.to_string(), Some(("labelSelector", s.to_string())))
            }
            (None, Some(PodSelector::Workload(w))) => {
                (format!("workload={w}"), Some(("workload", w.clone())))
            }
            (None, None) => (String::new(), None),
        };
        let mut params = vec![("namespace".to_string(), bounded(namespace))];
        params.extend(param.map(|(k, v)| (k.to_string(), bounded(&v))));
        Self {
            source: "envoy",
            selector: bounded(&text),
            pods_namespace: Some(bounded(namespace)),
            // A single pod's question lists no pods: /v1/pods has no name filter.
            pods_query: pod.is_none().then_some(params),
            target: None,
            activation: None,
        }
    }
}

/// The query a Prometheus trigger's metadata names: `query`, else its
/// `query.<name>` entries and `formula`, else its `preset`.
fn prometheus_text(metadata: &HashMap<String, String>) -> String {
    if let Some(q) = metadata.get("query") {
        return q.trim().to_string();
    }
    let mut named: Vec<(&String, &String)> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("query."))
        .collect();
    named.sort();
    let mut parts: Vec<String> = named
        .iter()
        .map(|(k, v)| format!("{}: {}", &k["query.".len()..], v.trim()))
        .collect();
    if let Some(f) = metadata.get("formula") {
        parts.push(format!("formula: {}", f.trim()));
    }
    if parts.is_empty()
        && let Some(p) = metadata.get("preset")
    {
        parts.push(format!("preset: {}", p.trim()));
    }
    parts.join("; ")
}

/// `text` cut to [`MAX_TEXT`] characters (on a character boundary), with `…`
/// when cut.
pub fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Replicas the HPA derives from `value` with an `AverageValue` target:
/// `ceil(value / target)`. `None` for a target that is not positive or a
/// value that is not finite (never answered as such, but never shown as 0).
pub fn implied_replicas(value: f64, target: f64) -> Option<u64> {
    if target.is_nan() || target <= 0.0 || !value.is_finite() || value < 0.0 {
        return None;
    }
    let r = (value / target).ceil();
    r.is_finite().then(|| r.min(u64::MAX as f64) as u64)
}

/// One trigger's record.
#[derive(Clone, Debug)]
struct Entry {
    description: Description,
    asked: Instant,
    /// The latest answer: the value, or the error's text.
    answer: Option<(Instant, Result<f64, String>)>,
    /// The last StreamIsActive push: (when, active).
    push: Option<(Instant, bool)>,
    /// Pods in the latest answer of a per-pod question.
    pods: Option<usize>,
    /// (step index since the recorder's epoch, value), oldest first.
    series: VecDeque<(u64, f64)>,
}

/// Adds `value` to a ring as the point of `step`: replaces the point of the
/// same step, drops points older than [`SERIES_POINTS`] steps and bounds the
/// length.
fn add_point(series: &mut VecDeque<(u64, f64)>, step: u64, value: f64) {
    match series.back_mut() {
        Some(last) if last.0 == step => last.1 = value,
        Some(last) if last.0 > step => {} // an answer that arrived late: keep the newer point
        _ => series.push_back((step, value)),
    }
    let oldest = step.saturating_sub(SERIES_POINTS as u64 - 1);
    while series.front().is_some_and(|p| p.0 < oldest) || series.len() > SERIES_POINTS {
        series.pop_front();
    }
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    // std Mutex: held for a map operation only, never across an await.
    entries: Mutex<HashMap<TriggerKey, Entry>>,
    /// (when, sink messages so far), for `/v1/status`'s messages per second.
    message_samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// A cheap clonable handle on what the view records.
#[derive(Clone, Debug)]
pub struct Recorder(Arc<Inner>);

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            epoch: Instant::now(),
            entries: Mutex::new(HashMap::new()),
            message_samples: Mutex::new(VecDeque::new()),
        }))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<TriggerKey, Entry>> {
        self.0.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn step(&self, at: Instant) -> u64 {
        at.duration_since(self.0.epoch).as_secs() / SERIES_STEP.as_secs()
    }

    /// Notes that KEDA asked about `key`, creating its record (evicting the
    /// least recently asked one when full) and refreshing its description.
    pub fn asked(&self, key: &TriggerKey, description: Description) {
        let now = Instant::now();
        let mut map = self.entries();
        touch(&mut map, key, description, now);
    }

    /// Records the answer given for `key`.
    pub fn answered(&self, key: &TriggerKey, answer: Result<f64, String>) {
        self.record_answer(key, answer, None);
    }

    /// Records an answer and, for a per-pod question, how many pods it had.
    fn record_answer(&self, key: &TriggerKey, answer: Result<f64, String>, pods: Option<usize>) {
        let now = Instant::now();
        let step = self.step(now);
        let mut map = self.entries();
        if let Some(e) = map.get_mut(key) {
            if let Ok(v) = answer {
                add_point(&mut e.series, step, v);
            }
            e.answer = Some((now, answer.map_err(|m| bounded(&m))));
            e.pods = pods;
        }
    }

    /// Records a StreamIsActive push for `key`.
    pub fn pushed(&self, key: &TriggerKey, active: bool) {
        let now = Instant::now();
        if let Some(e) = self.entries().get_mut(key) {
            e.asked = now;
            e.push = Some((now, active));
        }
    }

    /// Records the per-pod answer given for `key`: how many pods, and the
    /// sum of their values as the value (what an HPA's `AverageValue`
    /// target divides).
    pub fn answered_pods(&self, key: &TriggerKey, answer: Result<&[PodReading], String>) {
        let pods = answer.as_ref().ok().map(|p| p.len());
        self.record_answer(key, answer.and_then(pods_sum), pods);
    }

    /// Every trigger asked about within [`FORGET_AFTER`], most recently
    /// asked first; forgets the others.
    pub fn snapshot(&self) -> Vec<TriggerView> {
        let now = Instant::now();
        let now_step = self.step(now);
        let mut map = self.entries();
        map.retain(|_, e| now.duration_since(e.asked) < FORGET_AFTER);
        let mut out: Vec<(Instant, TriggerView)> = map
            .iter()
            .map(|(k, e)| (e.asked, view_of(k, e, now, now_step)))
            .collect();
        drop(map);
        out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// Sink messages per second over the last minute, from `total` (the
    /// counter now) and earlier calls; `None` until two samples a second
    /// apart exist.
    pub fn message_rate(&self, total: u64) -> Option<f64> {
        let now = Instant::now();
        let mut s = self
            .0
            .message_samples
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        rate(&mut s, now, total)
    }
}

/// The sum of the pods' values, or why it is not shown: the store keeps
/// finite gauges, but a sum of many could overflow, and an infinite value
/// is never shown as one.
fn pods_sum(pods: &[PodReading]) -> Result<f64, String> {
    let sum: f64 = pods.iter().map(|p| p.value).sum();
    if sum.is_finite() {
        Ok(sum)
    } else {
        Err(format!(
            "the sum of {} pods' values is not finite",
            pods.len()
        ))
    }
}

/// The key and description of a KEDA ask.
fn keda_entry(asker: &Asker<'_>) -> Option<(TriggerKey, Description)> {
    let Asker::Keda {
        namespace,
        scaled_object,
        trigger,
        metadata,
    } = asker
    else {
        return None;
    };
    Some((
        TriggerKey::keda(namespace, scaled_object, &trigger.metric_name),
        Description::of(trigger, metadata),
    ))
}

impl Record for Recorder {
    fn value(&self, asker: &Asker<'_>, answer: Result<f64, &EvalError>) {
        // Only KEDA asks for a single value today.
        if let Some((key, description)) = keda_entry(asker) {
            self.asked(&key, description);
            self.answered(&key, answer.map_err(|e| e.to_string()));
        }
    }

    fn pods(
        &self,
        asker: &Asker<'_>,
        namespace: &str,
        selector: Option<&PodSelector>,
        answer: Result<&[PodReading], &dyn std::fmt::Display>,
    ) {
        let (metric, pod) = match asker {
            Asker::Hpa { metric, pod } => (*metric, *pod),
            Asker::Keda { .. } | Asker::Unrecorded => return,
        };
        let description = Description::of_pods(namespace, selector, pod);
        let key = TriggerKey {
            via: Via::CustomMetrics,
            namespace: bounded(namespace),
            name: description.selector.clone(),
            metric: bounded(metric),
        };
        self.asked(&key, description);
        // The API serves only the named pod of the namespace's list.
        let answer = answer.map_err(|e| e.to_string());
        match (answer, pod) {
            (Ok(all), Some(name)) => {
                let one: Vec<PodReading> = all.iter().filter(|p| p.name == name).cloned().collect();
                self.answered_pods(&key, Ok(&one));
            }
            (answer, _) => self.answered_pods(&key, answer),
        }
    }

    fn watch(&self, asker: &Asker<'_>) -> Option<Box<dyn PushLog>> {
        let (key, description) = keda_entry(asker)?;
        self.asked(&key, description);
        Some(Box::new(StreamLog {
            recorder: self.clone(),
            key,
        }))
    }
}

/// The pushes of one StreamIsActive stream.
struct StreamLog {
    recorder: Recorder,
    key: TriggerKey,
}

impl PushLog for StreamLog {
    fn pushed(&self, active: bool) {
        self.recorder.pushed(&self.key, active);
    }
}

/// Adds the sample (`now`, `total`) to `samples` (at most one per second,
/// a minute kept) and returns the rate over what is kept.
fn rate(samples: &mut VecDeque<(Instant, u64)>, now: Instant, total: u64) -> Option<f64> {
    const KEEP: Duration = Duration::from_secs(60);
    if samples
        .back()
        .is_none_or(|b| now.duration_since(b.0) >= Duration::from_secs(1))
    {
        samples.push_back((now, total));
    }
    while samples.len() > 2
        && samples
            .front()
            .is_some_and(|f| now.duration_since(f.0) > KEEP)
    {
        samples.pop_front();
    }
    let first = samples.front()?;
    let span = now.duration_since(first.0).as_secs_f64();
    (span >= 1.0).then(|| total.saturating_sub(first.1) as f64 / span)
}

/// Creates or refreshes `key`'s record at `now`, keeping `map` within
/// [`MAX_TRIGGERS`]: expired records go first, then the least recently asked.
fn touch(
    map: &mut HashMap<TriggerKey, Entry>,
    key: &TriggerKey,
    description: Description,
    now: Instant,
) {
    if let Some(e) = map.get_mut(key) {
        e.asked = now;
        if e.description != description {
            e.description = description;
        }
        return;
    }
    if map.len() >= MAX_TRIGGERS {
        map.retain(|_, e| now.duration_since(e.asked) < FORGET_AFTER);
    }
    while map.len() >= MAX_TRIGGERS {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, e)| e.asked)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
    }
    map.insert(
        key.clone(),
        Entry {
            description,
            asked: now,
            answer: None,
            push: None,
            pods: None,
            series: VecDeque::new(),
        },
    );
}

/// One trigger as `/v1/triggers` shows it. Ages are seconds before the answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TriggerView {
    /// Stable id for the page: `namespace/scaledObject/metric` for KEDA,
    /// `custom-metrics/namespace/metric/selector` for an HPA.
    pub id: String,
    /// Who asked: `keda` or `custom-metrics`.
    pub via: Via,
    pub namespace: String,
    /// KEDA's ScaledObject; `null` for an HPA.
    pub scaled_object: Option<String>,
    pub metric: String,
    #[serde(flatten)]
    pub description: Description,
    /// Seconds since KEDA last asked (any call).
    pub asked_age: f64,
    /// The latest value answered (for an HPA: the sum of its pods' values);
    /// `null` when the latest answer was an error.
    pub value: Option<f64>,
    /// For an HPA: the pods in the latest answer; `null` for KEDA or after
    /// an error.
    pub pods: Option<usize>,
    /// `ceil(value / target)`: the replicas an `AverageValue` target implies.
    pub replicas: Option<u64>,
    /// `value > activation`, from the latest value.
    pub active: Option<bool>,
    /// The latest answer's error, when it was one.
    pub error: Option<String>,
    /// Seconds since the latest answer.
    pub answered_age: Option<f64>,
    /// The last StreamIsActive push and its age in seconds.
    pub pushed_active: Option<bool>,
    pub pushed_age: Option<f64>,
    /// Values of the last ten minutes, one per 10 s step: `[age, value]`,
    /// oldest first.
    pub series: Vec<(f64, f64)>,
}

fn view_of(k: &TriggerKey, e: &Entry, now: Instant, now_step: u64) -> TriggerView {
    let d = &e.description;
    let value = e
        .answer
        .as_ref()
        .and_then(|(_, a)| a.as_ref().ok().copied());
    let (id, scaled_object) = match k.via {
        Via::Keda => (
            format!("{}/{}/{}", k.namespace, k.name, k.metric),
            Some(k.name.clone()),
        ),
        Via::CustomMetrics => (
            format!("custom-metrics/{}/{}/{}", k.namespace, k.metric, k.name),
            None,
        ),
    };
    TriggerView {
        id,
        via: k.via,
        namespace: k.namespace.clone(),
        scaled_object,
        metric: k.metric.clone(),
        description: d.clone(),
        asked_age: age(now, e.asked),
        value,
        pods: e.pods,
        replicas: value
            .zip(d.target)
            .and_then(|(v, t)| implied_replicas(v, t)),
        active: value.zip(d.activation).map(|(v, a)| v > a),
        error: e
            .answer
            .as_ref()
            .and_then(|(_, a)| a.as_ref().err().cloned()),
        answered_age: e.answer.as_ref().map(|(t, _)| age(now, *t)),
        pushed_active: e.push.map(|(_, a)| a),
        pushed_age: e.push.map(|(t, _)| age(now, t)),
        series: e
            .series
            .iter()
            .map(|(step, v)| {
                let steps = now_step.saturating_sub(*step);
                ((steps * SERIES_STEP.as_secs()) as f64, *v)
            })
            .collect(),
    }
}

fn age(now: Instant, then: Instant) -> f64 {
    (now.duration_since(then).as_secs_f64() * 10.0).round() / 10.0
}

/// One activator route as `/v1/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteView {
    pub host: String,
    pub path_prefix: Option<String>,
    pub namespace: String,
    pub upstream: String,
    pub pending: u64,
    pub active: u64,
    pub ready: bool,
    /// Times held requests waited for the upstream to wake, since start.
    pub cold_starts: Option<u64>,
}

impl RouteView {
    pub fn of(r: &crate::activator::Route) -> Self {
        Self {
            host: r.host().to_string(),
            path_prefix: r.path_prefix().map(String::from),
            namespace: r.namespace().to_string(),
            upstream: r.upstream().to_string(),
            pending: r.pending(),
            active: r.active(),
            ready: r.is_ready(),
            cold_starts: Some(r.cold_starts()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(target: f64) -> Description {
        Description {
            source: "envoy",
            selector: "app=web".into(),
            pods_namespace: Some("shop".into()),
            pods_query: None,
            target: Some(target),
            activation: Some(0.0),
        }
    }

    fn key(i: usize) -> TriggerKey {
        TriggerKey::keda("shop", &format!("so-{i}"), "active_requests")
    }

    #[test]
    fn replicas_round_up_and_refuse_nonsense() {
        assert_eq!(implied_replicas(0.0, 10.0), Some(0));
        assert_eq!(implied_replicas(0.1, 10.0), Some(1));
        assert_eq!(implied_replicas(10.0, 10.0), Some(1));
        assert_eq!(implied_replicas(10.5, 10.0), Some(2));
        assert_eq!(implied_replicas(25.0, 0.5), Some(50));
        assert_eq!(implied_replicas(1.0, 0.0), None);
        assert_eq!(implied_replicas(f64::NAN, 1.0), None);
        assert_eq!(implied_replicas(f64::INFINITY, 1.0), None);
        assert_eq!(implied_replicas(-1.0, 1.0), None);
        assert_eq!(implied_replicas(1e300, 1e-300), None);
    }

    #[test]
    fn ring_keeps_one_point_per_step_and_ten_minutes() {
        let mut s = VecDeque::new();
        add_point(&mut s, 0, 1.0);
        add_point(&mut s, 0, 2.0);
        assert_eq!(s, VecDeque::from([(0, 2.0)]));
        for step in 1..200 {
            add_point(&mut s, step, step as f64);
        }
        assert_eq!(s.len(), SERIES_POINTS);
        assert_eq!(s.front(), Some(&(140, 140.0)));
        assert_eq!(s.back(), Some(&(199, 199.0)));
        // A gap longer than the ring leaves only the new point.
        add_point(&mut s, 1000, 5.0);
        assert_eq!(s, VecDeque::from([(1000, 5.0)]));
        // A late answer for an older step does not reorder the ring.
        add_point(&mut s, 999, 9.0);
        assert_eq!(s, VecDeque::from([(1000, 5.0)]));
    }

    #[test]
    fn full_map_evicts_the_least_recently_asked() {
        let mut map = HashMap::new();
        let t0 = Instant::now();
        for i in 0..MAX_TRIGGERS {
            touch(
                &mut map,
                &key(i),
                desc(1.0),
                t0 + Duration::from_millis(i as u64),
            );
        }
        // Asking again about key 0 makes key 1 the oldest.
        let later = t0 + Duration::from_secs(5);
        touch(&mut map, &key(0), desc(1.0), later);
        touch(&mut map, &key(MAX_TRIGGERS), desc(1.0), later);
        assert_eq!(map.len(), MAX_TRIGGERS);
        assert!(map.contains_key(&key(0)));
        assert!(!map.contains_key(&key(1)));
        assert!(map.contains_key(&key(MAX_TRIGGERS)));
    }

    #[test]
    fn full_map_drops_expired_entries_first() {
        let mut map = HashMap::new();
        let t0 = Instant::now();
        for i in 0..MAX_TRIGGERS {
            touch(&mut map, &key(i), desc(1.0), t0);
        }
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        touch(&mut map, &key(MAX_TRIGGERS), desc(1.0), later);
        assert_eq!(map.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn recorder_reports_value_error_push_and_forgets() {
        let r = Recorder::new();
        let k = key(1);
        r.asked(&k, desc(10.0));
        r.answered(&k, Ok(25.0));
        r.pushed(&k, true);
        let v = &r.snapshot()[0];
        assert_eq!(v.id, "shop/so-1/active_requests");
        assert_eq!(
            (v.value, v.replicas, v.active),
            (Some(25.0), Some(3), Some(true))
        );
        assert_eq!(v.pushed_active, Some(true));
        assert_eq!(v.series, vec![(0.0, 25.0)]);

        tokio::time::advance(SERIES_STEP).await;
        r.asked(&k, desc(10.0));
        r.answered(&k, Err("store unavailable".into()));
        let v = &r.snapshot()[0];
        assert_eq!((v.value, v.replicas, v.active), (None, None, None));
        assert_eq!(v.error.as_deref(), Some("store unavailable"));
        // The error adds no point; the old one has aged one step.
        assert_eq!(v.series, vec![(10.0, 25.0)]);

        tokio::time::advance(FORGET_AFTER).await;
        assert!(r.snapshot().is_empty());
    }

    #[test]
    fn answers_for_unknown_keys_are_ignored() {
        let r = Recorder::new();
        r.answered(&key(7), Ok(1.0));
        r.pushed(&key(7), false);
        assert!(r.snapshot().is_empty());
    }

    fn reading(name: &str, value: f64) -> PodReading {
        PodReading {
            name: name.into(),
            value,
            age: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn engine_reports_keda_asks_and_pushes() {
        let r = Recorder::new();
        let t = Trigger {
            metric_name: "active_requests".into(),
            target: 10.0,
            activation: 1.0,
            source: Source::Envoy {
                query: crate::store::PodQuery {
                    namespace: "shop".into(),
                    selector: PodSelector::Labels(
                        crate::selector::Selector::parse("app=web").unwrap(),
                    ),
                    window: None,
                },
                aggregation: crate::source::envoy::Aggregation::Sum,
            },
        };
        let md = HashMap::new();
        let keda = Asker::Keda {
            namespace: "shop",
            scaled_object: "web",
            trigger: &t,
            metadata: &md,
        };
        Record::value(&r, &keda, Ok(25.0));
        let log = Record::watch(&r, &keda).expect("KEDA watches are recorded");
        log.pushed(true);
        let v = &r.snapshot()[0];
        assert_eq!(v.id, "shop/web/active_requests");
        assert_eq!(
            (v.via, v.scaled_object.as_deref()),
            (Via::Keda, Some("web"))
        );
        assert_eq!(
            (v.value, v.replicas, v.active),
            (Some(25.0), Some(3), Some(true))
        );
        assert_eq!((v.pushed_active, v.pods), (Some(true), None));
        assert_eq!(v.description.selector, "app=web");

        Record::value(
            &r,
            &keda,
            Err(&EvalError::WarmingUp(Duration::from_secs(3))),
        );
        let v = &r.snapshot()[0];
        assert_eq!(v.value, None);
        assert!(v.error.as_deref().unwrap().contains("warming up"), "{v:?}");
        // Nobody to show: nothing recorded.
        Record::value(&r, &Asker::Unrecorded, Ok(1.0));
        assert!(Record::watch(&r, &Asker::Unrecorded).is_none());
        assert_eq!(r.snapshot().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn engine_reports_hpa_questions_with_pods_and_their_sum() {
        let r = Recorder::new();
        let hpa = Asker::Hpa {
            metric: "active_requests",
            pod: None,
        };
        let sel = PodSelector::Labels(crate::selector::Selector::parse("app=web").unwrap());
        let pods = [reading("web-1", 3.0), reading("web-2", 4.5)];
        Record::pods(&r, &hpa, "shop", Some(&sel), Ok(&pods));
        let v = &r.snapshot()[0];
        assert_eq!(v.id, "custom-metrics/shop/active_requests/app=web");
        assert_eq!(
            (v.via, v.scaled_object.as_deref()),
            (Via::CustomMetrics, None)
        );
        assert_eq!((v.value, v.pods), (Some(7.5), Some(2)));
        // The HPA's target is not in its request: no replicas, no activity.
        assert_eq!(
            (v.description.target, v.replicas, v.active),
            (None, None, None)
        );
        assert_eq!(
            v.description.pods_query.as_deref(),
            Some(
                &[
                    ("namespace".to_string(), "shop".to_string()),
                    ("labelSelector".to_string(), "app=web".to_string())
                ][..]
            )
        );

        // The single-pod form counts only that pod.
        let one = Asker::Hpa {
            metric: "active_requests",
            pod: Some("web-2"),
        };
        Record::pods(&r, &one, "shop", None, Ok(&pods));
        let v = r
            .snapshot()
            .into_iter()
            .find(|v| v.description.selector == "pod=web-2")
            .unwrap();
        assert_eq!((v.value, v.pods), (Some(4.5), Some(1)));
        assert_eq!(v.description.pods_query, None);

        // An error is the latest answer: no value, no pod count.
        let err = EvalError::WarmingUp(Duration::from_secs(3));
        Record::pods(&r, &hpa, "shop", Some(&sel), Err(&err));
        let v = r
            .snapshot()
            .into_iter()
            .find(|v| v.description.selector == "app=web")
            .unwrap();
        assert_eq!((v.value, v.pods), (None, None));
        assert!(v.error.is_some());
        assert_eq!(v.series, vec![(0.0, 7.5)], "the error adds no point");
    }

    #[test]
    fn a_sum_that_is_not_finite_is_an_error_not_a_value() {
        assert_eq!(pods_sum(&[]), Ok(0.0));
        assert!(pods_sum(&[reading("a", f64::MAX), reading("b", f64::MAX)]).is_err());
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT + 10);
        let b = bounded(&long);
        assert_eq!(b.chars().count(), MAX_TEXT + 1);
        assert!(b.ends_with('…'));
        assert_eq!(bounded("up"), "up");
    }

    #[test]
    fn prometheus_text_names_query_parts_or_preset() {
        let m = |p: &[(&str, &str)]| -> HashMap<String, String> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(prometheus_text(&m(&[("query", " sum(up) ")])), "sum(up)");
        assert_eq!(
            prometheus_text(&m(&[
                ("query.b", "y"),
                ("query.a", "x"),
                ("formula", "a+b")
            ])),
            "a: x; b: y; formula: a+b"
        );
        assert_eq!(prometheus_text(&m(&[("preset", "rps")])), "preset: rps");
    }

    #[tokio::test(start_paused = true)]
    async fn message_rate_needs_a_second_and_keeps_a_minute() {
        let mut s = VecDeque::new();
        let t0 = Instant::now();
        assert_eq!(rate(&mut s, t0, 0), None);
        assert_eq!(rate(&mut s, t0 + Duration::from_secs(2), 20), Some(10.0));
        let later = t0 + Duration::from_secs(200);
        rate(&mut s, later - Duration::from_secs(10), 1000);
        assert_eq!(rate(&mut s, later, 1100), Some(10.0));
    }
}
