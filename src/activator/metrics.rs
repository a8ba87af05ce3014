//! The activator's metrics, labelled by route (`host` and `path_prefix` as
//! configured, so the label set is bounded by the config, never by what
//! clients send). Requests that match no route count under empty labels.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    host: String,
    path_prefix: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    host: String,
    path_prefix: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    host: String,
    path_prefix: String,
    reason: &'static str,
}

/// Why a request was answered by the activator itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// The route's or the global queue was full (503).
    Full,
    /// Held for `hold_timeout` (504).
    Timeout,
    /// No route for the host and path (404).
    NoRoute,
    /// Held when the activator began to shut down (503).
    Draining,
}

impl Reject {
    const ALL: [Reject; 4] = [Self::Full, Self::Timeout, Self::NoRoute, Self::Draining];

    fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Timeout => "timeout",
            Self::NoRoute => "no_route",
            Self::Draining => "draining",
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every activator metric family; registered once into the service's registry.
#[derive(Clone)]
pub struct ActivatorMetrics {
    requests: Family<ClassLabels, Counter>,
    pending: Family<RouteLabels, Gauge>,
    active: Family<RouteLabels, Gauge>,
    cold_starts: Family<RouteLabels, Counter>,
    hold_seconds: Family<RouteLabels, Histogram>,
    rejected: Family<ReasonLabels, Counter>,
}

impl ActivatorMetrics {
    /// Creates the families and registers them in `registry` (which adds its
    /// prefix: `activescale_activator_...` with the service's registry).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            pending: Family::default(),
            active: Family::default(),
            cold_starts: Family::default(),
            hold_seconds: Family::new_with_constructor(|| {
                // 5 ms .. ~80 s: a warm pod answers in milliseconds, a cold
                // JVM in tens of seconds, hold_timeout is 60 s by default.
                Histogram::new(exponential_buckets(0.005, 2.0, 15))
            }),
            rejected: Family::default(),
        };
        registry.register(
            "activator_requests",
            "Requests through the activator, by route and response class",
            m.requests.clone(),
        );
        registry.register(
            "activator_pending_requests",
            "Requests held until the route's upstream can take them",
            m.pending.clone(),
        );
        registry.register(
            "activator_active_requests",
            "Requests being forwarded to the route's upstream (until their response ends)",
            m.active.clone(),
        );
        registry.register(
            "activator_cold_starts",
            "Times a route's upstream became ready while requests were held",
            m.cold_starts.clone(),
        );
        registry.register(
            "activator_hold_seconds",
            "How long held requests waited before they were forwarded",
            m.hold_seconds.clone(),
        );
        registry.register(
            "activator_rejected",
            "Requests the activator answered itself, by reason (full, timeout, no_route, draining)",
            m.rejected.clone(),
        );
        m
    }

    /// Handles for one route, created up front so every series exists from
    /// the start and the request path only touches atomics.
    pub(crate) fn route(&self, host: &str, path_prefix: &str) -> RouteMetrics {
        let labels = RouteLabels {
            host: host.to_string(),
            path_prefix: path_prefix.to_string(),
        };
        RouteMetrics {
            requests: CLASSES.map(|class| {
                self.requests
                    .get_or_create(&ClassLabels {
                        host: labels.host.clone(),
                        path_prefix: labels.path_prefix.clone(),
                        class,
                    })
                    .clone()
            }),
            rejected: Reject::ALL.map(|r| {
                self.rejected
                    .get_or_create(&ReasonLabels {
                        host: labels.host.clone(),
                        path_prefix: labels.path_prefix.clone(),
                        reason: r.label(),
                    })
                    .clone()
            }),
            pending: self.pending.get_or_create(&labels).clone(),
            active: self.active.get_or_create(&labels).clone(),
            cold_starts: self.cold_starts.get_or_create(&labels).clone(),
            hold_seconds: self.hold_seconds.get_or_create(&labels).clone(),
        }
    }

    /// Handles for requests that match no route (empty labels).
    pub(crate) fn unrouted(&self) -> RouteMetrics {
        self.route("", "")
    }
}

/// One route's metric handles.
#[derive(Clone, Debug)]
pub(crate) struct RouteMetrics {
    requests: [Counter; 5],
    rejected: [Counter; 4],
    pub(crate) pending: Gauge,
    pub(crate) active: Gauge,
    pub(crate) cold_starts: Counter,
    pub(crate) hold_seconds: Histogram,
}

impl RouteMetrics {
    /// Counts a response by its status class.
    pub(crate) fn answered(&self, status: u16) {
        let i = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[i].inc();
    }

    pub(crate) fn rejected(&self, why: Reject) {
        let i = Reject::ALL.iter().position(|&r| r == why).unwrap_or(0);
        self.rejected[i].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let mut registry = Registry::with_prefix("activescale");
        let m = ActivatorMetrics::new(&mut registry);
        let r = m.route("web.example.com", "/");
        r.answered(200);
        r.answered(504);
        r.answered(101);
        r.rejected(Reject::Timeout);
        r.pending.inc();
        r.hold_seconds.observe(0.2);
        m.unrouted().rejected(Reject::NoRoute);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"activescale_activator_requests_total{host="web.example.com",path_prefix="/",class="2xx"} 1"#,
            r#"activescale_activator_requests_total{host="web.example.com",path_prefix="/",class="5xx"} 1"#,
            r#"activescale_activator_requests_total{host="web.example.com",path_prefix="/",class="1xx"} 1"#,
            r#"activescale_activator_rejected_total{host="web.example.com",path_prefix="/",reason="timeout"} 1"#,
            r#"activescale_activator_rejected_total{host="",path_prefix="",reason="no_route"} 1"#,
            r#"activescale_activator_pending_requests{host="web.example.com",path_prefix="/"} 1"#,
            r#"activescale_activator_active_requests{host="web.example.com",path_prefix="/"} 0"#,
            r#"activescale_activator_cold_starts_total{host="web.example.com",path_prefix="/"} 0"#,
            r#"activescale_activator_hold_seconds_count{host="web.example.com",path_prefix="/"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
    }
}
