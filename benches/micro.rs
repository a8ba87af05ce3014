//! Micro-benchmarks of the hot paths (criterion): `cargo bench --bench micro`.
//!
//! - `ingest/*`: decode + filter one sidecar message with the sink's wire
//!   walker, beside a full prost decode of the same bytes;
//! - `aggregate/*`: one GetMetrics worth of store work (`values` + `apply`);
//! - `selector/*`, `trigger/*`: label matching and metadata parsing.

mod common;

use std::{collections::HashMap, hint::black_box, sync::Arc, time::Duration};

use activescale::{
    prometheus::PromSettings,
    selector::{Labels, Selector},
    sink::{names::NameFilter, wire},
    source::envoy::Aggregation,
    store::{PodIdentity, PodQuery, PodSelector, Store, memory::MemoryStore},
    trigger::{self, TriggerCache, TriggerSettings},
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsMessage;
use prost::Message;

fn ingest(c: &mut Criterion) {
    let filter = NameFilter::defaults(9000);
    let mut group = c.benchmark_group("ingest");
    for (label, total, k) in [
        ("600_families", 600, 4),
        ("600_families_1kept", 600, 1),
        ("20_families", 20, 1),
    ] {
        let bytes = common::encode(None, common::istio_families(total, &common::kept(k, 3.0)));
        group.throughput(Throughput::Elements(total as u64));
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        group.bench_function(BenchmarkId::new("wire_parse", label), |b| {
            b.iter(|| {
                skipped.clear();
                let parsed =
                    wire::parse(black_box(&bytes), &filter, 64, &mut kept, &mut skipped).unwrap();
                black_box((parsed.families, kept.len()))
            })
        });
        group.bench_function(BenchmarkId::new("prost_full_decode", label), |b| {
            b.iter(|| {
                let msg = StreamMetricsMessage::decode(black_box(bytes.as_slice())).unwrap();
                // The filtering the full decode would still need.
                let n = msg
                    .envoy_metrics
                    .iter()
                    .filter(|f| {
                        f.name
                            .as_deref()
                            .is_some_and(|n| filter.keeps(n.as_bytes()))
                    })
                    .count();
                black_box(n)
            })
        });
    }
    group.finish();
}

fn labels(app: &str) -> Labels {
    common::labels(&common::pod_labels(app))
}

fn aggregate(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("aggregate");
    for pods in [10usize, 1_000, 10_000] {
        let store = MemoryStore::new(Duration::from_secs(3600), Duration::from_secs(600));
        let web = Arc::new(labels("web"));
        let other = Arc::new(labels("api"));
        rt.block_on(async {
            for i in 0..pods {
                // Half the namespace is another workload the selector skips.
                for (app, l) in [("web", &web), ("api", &other)] {
                    let id = PodIdentity {
                        namespace: "shop".into(),
                        name: format!("{app}-{i}"),
                        workload: Some(app.into()),
                        labels: l.clone(),
                    };
                    store
                        .record(&id, &[(common::inbound(8080), 2.0)])
                        .await
                        .unwrap();
                }
            }
        });
        let query = PodQuery {
            namespace: "shop".into(),
            selector: PodSelector::Labels(Selector::parse("app=web").unwrap()),
            window: None,
        };
        group.throughput(Throughput::Elements(pods as u64));
        group.bench_with_input(BenchmarkId::new("values_sum", pods), &pods, |b, _| {
            b.iter(|| {
                let values = rt.block_on(store.values(black_box(&query))).unwrap();
                black_box(Aggregation::Sum.apply(&values))
            })
        });
        // What the scaler calls: folded in place, no Vec per call.
        group.bench_with_input(BenchmarkId::new("summary_sum", pods), &pods, |b, _| {
            b.iter(|| {
                let s = rt
                    .block_on(store.summary(black_box(&query), false))
                    .unwrap();
                black_box(Aggregation::Sum.of(&s))
            })
        });
    }
    group.finish();
}

fn selector(c: &mut Criterion) {
    let mut group = c.benchmark_group("selector");
    let l = labels("web");
    for (label, s) in [
        ("equals", "app=web"),
        (
            "set_based",
            "app in (web,api),version!=v2,!canary,security.istio.io/tlsMode",
        ),
    ] {
        let sel = Selector::parse(s).unwrap();
        group.bench_function(BenchmarkId::new("match", label), |b| {
            b.iter(|| black_box(sel.matches(black_box(&l))))
        });
        group.bench_function(BenchmarkId::new("parse", label), |b| {
            b.iter(|| black_box(Selector::parse(black_box(s)).unwrap()))
        });
    }
    group.finish();
}

fn metadata(c: &mut Criterion) {
    let settings = TriggerSettings {
        max_window: Duration::from_secs(600),
        allow_cross_namespace: false,
        prometheus: PromSettings::default(),
    };
    // What KEDA sends: the trigger's metadata plus its own client keys.
    let meta: HashMap<String, String> = [
        ("scalerAddress", "activescale.keda.svc:9090"),
        ("labelSelector", "app=web,version in (v1,v2)"),
        ("targetValue", "10"),
        ("activationValue", "0.5"),
        ("aggregation", "sum"),
        ("window", "30s"),
        ("windowAggregation", "max"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut group = c.benchmark_group("trigger");
    group.bench_function("parse_uncached", |b| {
        b.iter(|| black_box(trigger::parse("shop", black_box(&meta), &settings).unwrap()))
    });
    let cache = TriggerCache::new(settings.clone(), 10_000);
    for i in 0..1000 {
        cache.get("shop", &format!("so-{i}"), &meta).unwrap();
    }
    group.bench_function("cache_get_hit", |b| {
        b.iter(|| {
            black_box(
                cache
                    .get("shop", black_box("so-500"), black_box(&meta))
                    .unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = ingest, aggregate, selector, metadata
}
criterion_main!(benches);
