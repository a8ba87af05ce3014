//! One store-level suite, run against `MemoryStore` and against `RedisStore`
//! on a real `redis-server`: both stores must answer the same.

mod common;

use std::{net::IpAddr, sync::Arc, time::Duration};

use activescale::{
    config::Config,
    selector::Selector,
    store::{
        Ingest, Ingested, PodIdentity, PodQuery, PodSelector, RouteSample, SharedStore, Store,
        Summary, Window, WindowReduce, memory::MemoryStore,
    },
};
use common::{
    builders::{app_pod, pod},
    redis_server::RedisServer,
};
use tokio::sync::watch;

/// A store under test, and what keeps its backend alive.
struct Under {
    store: SharedStore,
    _server: Option<RedisServer>,
}

#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

async fn store(kind: Kind, ttl: Duration) -> Under {
    let max_window = Duration::from_secs(60);
    match kind {
        Kind::Memory => Under {
            store: Arc::new(MemoryStore::new(ttl, max_window)),
            _server: None,
        },
        Kind::Redis => {
            let server = RedisServer::start();
            let mut config = server.config(Config::default());
            config.engine.pod_ttl = ttl;
            config.engine.max_window = max_window;
            // The server was just started: no young-server warm-up here.
            config.engine.warmup = Some(Duration::ZERO);
            let store = common::redis_server::connect(&config)
                .await
                .expect("connect");
            // Ready means subscribed: the subscription's first wake-up is over.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while let Err(e) = store.ready().await {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "store not ready: {e}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Under {
                store: Arc::new(store),
                _server: Some(server),
            }
        }
    }
}

const LONG: Duration = Duration::from_secs(30);

fn labels(ns: &str, selector: &str) -> PodQuery {
    PodQuery {
        namespace: ns.into(),
        selector: PodSelector::Labels(Selector::parse(selector).unwrap()),
        window: None,
    }
}

fn fams(f: &[(&str, f64)]) -> Vec<(String, f64)> {
    f.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

async fn sorted(store: &SharedStore, q: &PodQuery) -> Vec<f64> {
    let mut v = store.values(q).await.unwrap();
    v.sort_by(f64::total_cmp);
    v
}

/// Awaits the next wake-up of `rx`, failing the test after a generous limit.
async fn woken(rx: &mut watch::Receiver<u64>, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .unwrap_or_else(|_| panic!("no wake-up: {what}"))
        .unwrap();
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Kind::Memory).await } )*
        }
        mod redis {
            $( #[tokio::test] async fn $name() { super::$name(super::Kind::Redis).await } )*
        }
    };
}

conformance!(
    record_then_values_and_pods,
    families_merge_across_messages,
    value_is_the_sum_over_families,
    selector_and_workload_filtering,
    namespaces_are_isolated,
    pods_drop_out_after_ttl,
    watch_wakes_on_change,
    watch_wakes_on_expiry,
    window_max_sees_a_past_peak,
    window_avg_is_between_the_steps,
    pod_without_kept_families_counts_zero,
    new_labels_start_afresh,
    empty_namespace_is_no_pods,
    summary_over_groups_and_selectors,
    summary_follows_values_and_label_moves,
    summary_drops_expired_pods_before_and_after_the_sweep,
    summary_of_windows_and_empty_namespaces,
    a_live_pod_stays_bound_to_its_first_address,
    families_per_pod_are_capped,
    route_loads_sum_over_replicas_apart_from_pods,
    route_writes_wake_watchers_and_replicas_expire,
    route_window_keeps_each_replicas_peak,
    the_latest_writers_replica_is_kept,
);

async fn record_then_values_and_pods(kind: Kind) {
    let u = store(kind, LONG).await;
    let p = app_pod("shop", "web-1", "web");
    u.store.record(&p, &fams(&[("f", 2.0)])).await.unwrap();
    assert_eq!(
        u.store.values(&labels("shop", "app=web")).await.unwrap(),
        vec![2.0]
    );
    let views = u.store.pods("shop", None).await.unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].identity, p);
    assert_eq!(views[0].value, 2.0);
    assert_eq!(views[0].families, [("f".to_string(), 2.0)].into());
    assert!(views[0].age < LONG);
}

async fn families_merge_across_messages(kind: Kind) {
    let u = store(kind, LONG).await;
    let p = app_pod("shop", "web-1", "web");
    u.store.record(&p, &fams(&[("a", 1.0)])).await.unwrap();
    u.store.record(&p, &fams(&[("b", 2.0)])).await.unwrap();
    assert_eq!(
        u.store.values(&labels("shop", "app=web")).await.unwrap(),
        vec![3.0]
    );
    u.store.record(&p, &fams(&[("a", 5.0)])).await.unwrap();
    // A message without families only refreshes the pod.
    u.store.record(&p, &[]).await.unwrap();
    assert_eq!(
        u.store.values(&labels("shop", "app=web")).await.unwrap(),
        vec![7.0]
    );
    let views = u.store.pods("shop", None).await.unwrap();
    assert_eq!(
        views[0].families,
        [("a".to_string(), 5.0), ("b".to_string(), 2.0)].into()
    );
}

async fn value_is_the_sum_over_families(kind: Kind) {
    let u = store(kind, LONG).await;
    u.store
        .record(
            &app_pod("shop", "web-1", "web"),
            &fams(&[("a", 1.0), ("b", 20.0), ("c", 300.0)]),
        )
        .await
        .unwrap();
    u.store
        .record(&app_pod("shop", "web-2", "web"), &fams(&[("a", 4.0)]))
        .await
        .unwrap();
    assert_eq!(
        sorted(&u.store, &labels("shop", "app=web")).await,
        vec![4.0, 321.0]
    );
}

async fn selector_and_workload_filtering(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    s.record(
        &pod("ns", "a", &[("app", "web"), ("tier", "front")], Some("web")),
        &fams(&[("f", 1.0)]),
    )
    .await
    .unwrap();
    s.record(
        &pod("ns", "b", &[("app", "web"), ("tier", "back")], Some("web")),
        &fams(&[("f", 2.0)]),
    )
    .await
    .unwrap();
    s.record(
        &pod("ns", "c", &[("app", "api")], Some("api")),
        &fams(&[("f", 4.0)]),
    )
    .await
    .unwrap();
    s.record(
        &pod("ns", "d", &[("app", "api")], None),
        &fams(&[("f", 8.0)]),
    )
    .await
    .unwrap();
    assert_eq!(sorted(s, &labels("ns", "app=web")).await, vec![1.0, 2.0]);
    assert_eq!(
        sorted(s, &labels("ns", "app=web,tier in (back)")).await,
        vec![2.0]
    );
    assert_eq!(sorted(s, &labels("ns", "app!=web")).await, vec![4.0, 8.0]);
    assert_eq!(sorted(s, &labels("ns", "!tier")).await, vec![4.0, 8.0]);
    let by_workload = PodQuery {
        namespace: "ns".into(),
        selector: PodSelector::Workload("api".into()),
        window: None,
    };
    assert_eq!(sorted(s, &by_workload).await, vec![4.0]);
    let views = s
        .pods("ns", Some(&PodSelector::Workload("web".into())))
        .await
        .unwrap();
    let names: Vec<&str> = views.iter().map(|v| v.identity.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

async fn namespaces_are_isolated(kind: Kind) {
    let u = store(kind, LONG).await;
    u.store
        .record(&app_pod("a", "web-1", "web"), &fams(&[("f", 1.0)]))
        .await
        .unwrap();
    u.store
        .record(&app_pod("b", "web-1", "web"), &fams(&[("f", 10.0)]))
        .await
        .unwrap();
    assert_eq!(
        u.store.values(&labels("a", "app=web")).await.unwrap(),
        vec![1.0]
    );
    assert_eq!(
        u.store.values(&labels("b", "app=web")).await.unwrap(),
        vec![10.0]
    );
    let views = u.store.pods("b", None).await.unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].identity.namespace, "b");
}

async fn pods_drop_out_after_ttl(kind: Kind) {
    let u = store(kind, Duration::from_millis(300)).await;
    let mut rx = u.store.watch("shop");
    u.store
        .record(&app_pod("shop", "web-1", "web"), &fams(&[("f", 3.0)]))
        .await
        .unwrap();
    woken(&mut rx, "record").await;
    assert_eq!(
        u.store.values(&labels("shop", "app=web")).await.unwrap(),
        vec![3.0]
    );
    until_expired(&u.store, &mut rx).await;
    assert!(u.store.pods("shop", None).await.unwrap().is_empty());
    // A pod back after expiry starts afresh: its old families are gone.
    u.store
        .record(&app_pod("shop", "web-1", "web"), &fams(&[("g", 1.0)]))
        .await
        .unwrap();
    let views = u.store.pods("shop", None).await.unwrap();
    assert_eq!(views[0].families, [("g".to_string(), 1.0)].into());
}

/// Waits on `rx` until shop's web pods are gone. Wake-ups may be spurious (a
/// shared store echoes its own ingest back through pub/sub), so it re-reads
/// after each one.
async fn until_expired(store: &SharedStore, rx: &mut watch::Receiver<u64>) {
    loop {
        woken(rx, "expiry").await;
        if store
            .values(&labels("shop", "app=web"))
            .await
            .unwrap()
            .is_empty()
        {
            break;
        }
    }
}

async fn watch_wakes_on_change(kind: Kind) {
    let u = store(kind, LONG).await;
    let mut a = u.store.watch("a");
    let b = u.store.watch("b");
    u.store
        .record(&app_pod("a", "web-1", "web"), &fams(&[("f", 1.0)]))
        .await
        .unwrap();
    woken(&mut a, "new pod").await;
    a.borrow_and_update();
    u.store
        .record(&app_pod("a", "web-1", "web"), &fams(&[("f", 2.0)]))
        .await
        .unwrap();
    woken(&mut a, "value changed").await;
    assert!(
        !b.has_changed().unwrap(),
        "another namespace's watcher woke"
    );
}

async fn watch_wakes_on_expiry(kind: Kind) {
    let u = store(kind, Duration::from_millis(300)).await;
    u.store
        .record(&app_pod("shop", "web-1", "web"), &fams(&[("f", 3.0)]))
        .await
        .unwrap();
    let mut rx = u.store.watch("shop");
    rx.borrow_and_update();
    // Nothing else happens here, so only the expiry can end the wait.
    until_expired(&u.store, &mut rx).await;
}

fn windowed(reduce: WindowReduce) -> PodQuery {
    PodQuery {
        window: Some(Window {
            length: Duration::from_secs(30),
            reduce,
        }),
        ..labels("shop", "app=web")
    }
}

async fn window_max_sees_a_past_peak(kind: Kind) {
    let u = store(kind, LONG).await;
    let p = app_pod("shop", "web-1", "web");
    u.store.record(&p, &fams(&[("f", 5.0)])).await.unwrap();
    // Not synchronisation: the peak must last at least a clock tick (1 ms).
    tokio::time::sleep(Duration::from_millis(5)).await;
    u.store.record(&p, &fams(&[("f", 1.0)])).await.unwrap();
    assert_eq!(
        u.store.values(&labels("shop", "app=web")).await.unwrap(),
        vec![1.0]
    );
    assert_eq!(
        u.store.values(&windowed(WindowReduce::Max)).await.unwrap(),
        vec![5.0]
    );
}

async fn window_avg_is_between_the_steps(kind: Kind) {
    let u = store(kind, LONG).await;
    let p = app_pod("shop", "web-1", "web");
    u.store.record(&p, &fams(&[("f", 4.0)])).await.unwrap();
    // Not synchronisation: each step must last at least a clock tick (1 ms)
    // for the time-weighted average to weigh both.
    tokio::time::sleep(Duration::from_millis(20)).await;
    u.store.record(&p, &fams(&[("f", 2.0)])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let avg = u.store.values(&windowed(WindowReduce::Avg)).await.unwrap();
    assert_eq!(avg.len(), 1);
    assert!(avg[0] > 2.0 && avg[0] < 4.0, "avg {}", avg[0]);
}

async fn pod_without_kept_families_counts_zero(kind: Kind) {
    let u = store(kind, LONG).await;
    u.store
        .record(&app_pod("shop", "web-1", "web"), &[])
        .await
        .unwrap();
    assert_eq!(
        u.store.values(&labels("shop", "app=web")).await.unwrap(),
        vec![0.0]
    );
    let views = u.store.pods("shop", None).await.unwrap();
    assert!(views[0].families.is_empty());
}

async fn new_labels_start_afresh(kind: Kind) {
    let u = store(kind, LONG).await;
    u.store
        .record(&app_pod("shop", "p", "web"), &fams(&[("a", 1.0)]))
        .await
        .unwrap();
    let moved = pod("shop", "p", &[("app", "api")], Some("api"));
    u.store.record(&moved, &fams(&[("b", 2.0)])).await.unwrap();
    assert!(
        u.store
            .values(&labels("shop", "app=web"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        u.store.values(&labels("shop", "app=api")).await.unwrap(),
        vec![2.0]
    );
    let views = u.store.pods("shop", None).await.unwrap();
    assert_eq!(views[0].families, [("b".to_string(), 2.0)].into());
}

async fn empty_namespace_is_no_pods(kind: Kind) {
    let u = store(kind, LONG).await;
    assert!(
        u.store
            .values(&labels("nobody", "app=web"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(u.store.pods("nobody", None).await.unwrap().is_empty());
}

/// Checks `summary` both ways against the expected count, sum and max, and
/// against what `values` returns. The maximum is compared only when asked for.
async fn summary_is(s: &SharedStore, q: &PodQuery, count: u64, sum: f64, max: f64) {
    let what = format!("{q:?}");
    let plain = s.summary(q, false).await.unwrap();
    assert_eq!((plain.count, plain.sum), (count, sum), "{what}");
    let with_max = s.summary(q, true).await.unwrap();
    assert_eq!((with_max.count, with_max.sum), (count, sum), "{what}");
    if count > 0 {
        assert_eq!(with_max.max, max, "{what}");
    }
    let of_values = Summary::of(&s.values(q).await.unwrap());
    assert_eq!((of_values.count, of_values.sum), (count, sum), "{what}");
}

fn workload(ns: &str, w: &str) -> PodQuery {
    PodQuery {
        namespace: ns.into(),
        selector: PodSelector::Workload(w.into()),
        window: None,
    }
}

async fn summary_over_groups_and_selectors(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    let front = [("app", "web"), ("tier", "front")];
    let back = [("app", "web"), ("tier", "back")];
    for (name, l, w, v) in [
        ("f1", &front[..], Some("web"), 1.0),
        ("f2", &front[..], Some("web"), 4.0),
        ("f3", &front[..], Some("web"), 0.0),
        ("b1", &back[..], Some("web"), 2.0),
        ("b2", &back[..], Some("web"), 8.0),
        ("a1", &[("app", "api")][..], Some("api"), 16.0),
        ("n1", &[("app", "api")][..], None, 32.0),
    ] {
        s.record(&pod("ns", name, l, w), &fams(&[("f", v)]))
            .await
            .unwrap();
    }
    // Noise in another namespace with the same labels.
    s.record(
        &pod("other", "f1", &front, Some("web")),
        &fams(&[("f", 64.0)]),
    )
    .await
    .unwrap();
    summary_is(s, &labels("ns", "app=web"), 5, 15.0, 8.0).await;
    summary_is(s, &labels("ns", "tier=front"), 3, 5.0, 4.0).await;
    summary_is(s, &labels("ns", "app=web,tier in (back)"), 2, 10.0, 8.0).await;
    summary_is(s, &labels("ns", "!tier"), 2, 48.0, 32.0).await;
    summary_is(s, &labels("ns", "app"), 7, 63.0, 32.0).await;
    summary_is(s, &labels("ns", "app=nothing"), 0, 0.0, 0.0).await;
    summary_is(s, &workload("ns", "api"), 1, 16.0, 16.0).await;
    summary_is(s, &workload("ns", "web"), 5, 15.0, 8.0).await;
    summary_is(s, &labels("other", "app=web"), 1, 64.0, 64.0).await;
}

async fn summary_follows_values_and_label_moves(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    let web_q = labels("shop", "app=web");
    let api_q = labels("shop", "app=api");
    s.record(
        &app_pod("shop", "p", "web"),
        &fams(&[("a", 3.0), ("b", 4.0)]),
    )
    .await
    .unwrap();
    s.record(&app_pod("shop", "q", "web"), &fams(&[("a", 1.0)]))
        .await
        .unwrap();
    summary_is(s, &web_q, 2, 8.0, 7.0).await;
    // One family changes, the other keeps its value; then the value goes down.
    s.record(&app_pod("shop", "p", "web"), &fams(&[("a", 10.0)]))
        .await
        .unwrap();
    summary_is(s, &web_q, 2, 15.0, 14.0).await;
    s.record(
        &app_pod("shop", "p", "web"),
        &fams(&[("a", 0.0), ("b", 0.0)]),
    )
    .await
    .unwrap();
    summary_is(s, &web_q, 2, 1.0, 1.0).await;
    // An unchanged message changes nothing.
    s.record(&app_pod("shop", "q", "web"), &[]).await.unwrap();
    summary_is(s, &web_q, 2, 1.0, 1.0).await;
    // New labels move the pod to another group, starting afresh.
    let moved = pod("shop", "q", &[("app", "api")], Some("api"));
    s.record(&moved, &fams(&[("c", 5.0)])).await.unwrap();
    summary_is(s, &web_q, 1, 0.0, 0.0).await;
    summary_is(s, &api_q, 1, 5.0, 5.0).await;
    // And back: the group it left was emptied and is filled again.
    s.record(&app_pod("shop", "q", "web"), &fams(&[("a", 2.0)]))
        .await
        .unwrap();
    summary_is(s, &web_q, 2, 2.0, 2.0).await;
    summary_is(s, &api_q, 0, 0.0, 0.0).await;
}

async fn summary_drops_expired_pods_before_and_after_the_sweep(kind: Kind) {
    // Long enough for the checks between a record and its expiry.
    let u = store(kind, Duration::from_secs(1)).await;
    let s = &u.store;
    let web_q = labels("shop", "app=web");
    s.record(&app_pod("shop", "w1", "web"), &fams(&[("f", 3.0)]))
        .await
        .unwrap();
    s.record(&app_pod("shop", "w2", "web"), &fams(&[("f", 5.0)]))
        .await
        .unwrap();
    s.record(
        &pod("shop", "a1", &[("app", "api")], Some("api")),
        &fams(&[("f", 7.0)]),
    )
    .await
    .unwrap();
    summary_is(s, &labels("shop", "app"), 3, 15.0, 7.0).await;
    // Nobody watches the namespace and nothing is recorded: the expired pods
    // are still stored, and must not count.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !s.values(&labels("shop", "app")).await.unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "pods never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    summary_is(s, &labels("shop", "app"), 0, 0.0, 0.0).await;
    // A record in the namespace removes expired pods; the new one counts.
    s.record(&app_pod("shop", "w3", "web"), &fams(&[("f", 11.0)]))
        .await
        .unwrap();
    summary_is(s, &web_q, 1, 11.0, 11.0).await;
    summary_is(s, &labels("shop", "app=api"), 0, 0.0, 0.0).await;
    // A pod back after expiry counts with its new value only.
    s.record(&app_pod("shop", "w1", "web"), &fams(&[("g", 1.0)]))
        .await
        .unwrap();
    summary_is(s, &web_q, 2, 12.0, 11.0).await;
    // The sweeper (running for watched namespaces) removes them too.
    let mut rx = s.watch("shop");
    loop {
        woken(&mut rx, "expiry").await;
        if s.values(&web_q).await.unwrap().is_empty() {
            break;
        }
    }
    summary_is(s, &web_q, 0, 0.0, 0.0).await;
    s.record(&app_pod("shop", "w2", "web"), &fams(&[("f", 2.0)]))
        .await
        .unwrap();
    summary_is(s, &web_q, 1, 2.0, 2.0).await;
}

async fn summary_of_windows_and_empty_namespaces(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    assert_eq!(
        s.summary(&labels("nobody", "app=web"), false)
            .await
            .unwrap()
            .count,
        0
    );
    s.record(&app_pod("shop", "p", "web"), &fams(&[("f", 9.0)]))
        .await
        .unwrap();
    // Not synchronisation: the peak must last at least a clock tick (1 ms).
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.record(&app_pod("shop", "p", "web"), &fams(&[("f", 1.0)]))
        .await
        .unwrap();
    s.record(&app_pod("shop", "q", "web"), &fams(&[("f", 2.0)]))
        .await
        .unwrap();
    // A window reduces each pod before summing: the peak of 9 is seen.
    let q = windowed(WindowReduce::Max);
    let with = s.summary(&q, false).await.unwrap();
    assert_eq!((with.count, with.sum), (2, 11.0));
    assert_eq!(s.summary(&q, true).await.unwrap().max, 9.0);
}

/// One message from `peer`, with a cap of `cap` families.
async fn ingest(
    store: &SharedStore,
    pod: &PodIdentity,
    families: &[(&str, f64)],
    peer: Option<&str>,
    cap: usize,
) -> Ingested {
    store
        .ingest(&Ingest {
            pod,
            families: &fams(families),
            peer: peer.map(|p| p.parse::<IpAddr>().unwrap()),
            max_families: cap,
            replica: "activescale-0",
        })
        .await
        .unwrap()
}

const STORED: Ingested = Ingested::Stored { refused: 0 };

async fn a_live_pod_stays_bound_to_its_first_address(kind: Kind) {
    let u = store(kind, Duration::from_secs(1)).await;
    let s = &u.store;
    let p = app_pod("shop", "web-1", "web");
    let first: IpAddr = "10.0.0.1".parse().unwrap();
    let mut rx = s.watch("shop");
    assert_eq!(
        ingest(s, &p, &[("f", 10.0)], Some("10.0.0.1"), 64).await,
        STORED
    );
    let refused = Ingested::BoundElsewhere { bound: first };
    assert_eq!(
        ingest(s, &p, &[("f", 0.0)], Some("10.0.0.2"), 64).await,
        refused
    );
    // New labels from elsewhere do not get around it.
    let relabelled = pod("shop", "web-1", &[("app", "api")], Some("api"));
    assert_eq!(
        ingest(s, &relabelled, &[("f", 0.0)], Some("10.0.0.2"), 64).await,
        refused
    );
    assert_eq!(sorted(s, &labels("shop", "app=web")).await, vec![10.0]);
    // The bound address and an unknown one write.
    assert_eq!(
        ingest(s, &p, &[("f", 4.0)], Some("10.0.0.1"), 64).await,
        STORED
    );
    assert_eq!(ingest(s, &p, &[("f", 5.0)], None, 64).await, STORED);
    assert_eq!(sorted(s, &labels("shop", "app=web")).await, vec![5.0]);
    // Once the pod has expired, its name is free for the next address.
    until_expired(s, &mut rx).await;
    assert_eq!(
        ingest(s, &p, &[("f", 7.0)], Some("10.0.0.2"), 64).await,
        STORED
    );
    assert_eq!(
        ingest(s, &p, &[("f", 1.0)], Some("10.0.0.1"), 64).await,
        Ingested::BoundElsewhere {
            bound: "10.0.0.2".parse().unwrap()
        }
    );
    assert_eq!(sorted(s, &labels("shop", "app=web")).await, vec![7.0]);
}

async fn families_per_pod_are_capped(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    let p = app_pod("shop", "web-1", "web");
    // Past the cap within one message: in name order.
    assert_eq!(
        ingest(
            s,
            &p,
            &[("c", 1.0), ("a", 1.0), ("b", 1.0)],
            Some("10.0.0.1"),
            2
        )
        .await,
        Ingested::Stored { refused: 1 }
    );
    // Later: held families update, new ones stay out. Repeats and any order
    // from a caller other than the sink: the last of a name wins.
    assert_eq!(
        ingest(
            s,
            &p,
            &[("c", 9.0), ("b", 2.0), ("a", 1.0), ("b", 3.0)],
            Some("10.0.0.1"),
            2
        )
        .await,
        Ingested::Stored { refused: 1 }
    );
    let views = s.pods("shop", None).await.unwrap();
    assert_eq!(
        views[0].families,
        [("a".to_string(), 1.0), ("b".to_string(), 3.0)].into()
    );
    assert_eq!(views[0].value, 4.0);
    // A larger cap later lets new names in.
    assert_eq!(
        ingest(s, &p, &[("c", 9.0)], Some("10.0.0.1"), 3).await,
        STORED
    );
    assert_eq!(sorted(s, &labels("shop", "app=web")).await, vec![13.0]);
}

const ROUTE: &str = "web.example.com/";

async fn route_write(store: &SharedStore, ns: &str, route: &str, replica: &str, load: f64) {
    store
        .record_route(&RouteSample {
            namespace: ns,
            route,
            replica,
            load,
        })
        .await
        .unwrap();
}

async fn route_loads_sum_over_replicas_apart_from_pods(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 0.0);
    route_write(s, "shop", ROUTE, "a", 2.0).await;
    route_write(s, "shop", ROUTE, "b", 3.0).await;
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 5.0);
    // A replica's new count replaces its old one.
    route_write(s, "shop", ROUTE, "a", 1.0).await;
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 4.0);
    // Other routes (one a prefix of this one) and namespaces are apart.
    route_write(s, "shop", "web.example.com/api", "a", 7.0).await;
    route_write(s, "other", ROUTE, "a", 9.0).await;
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 4.0);
    assert_eq!(
        s.route_load("shop", "web.example.com/api", None)
            .await
            .unwrap(),
        7.0
    );
    assert_eq!(
        s.route_load("shop", "web.example.com", None).await.unwrap(),
        0.0
    );
    // Envoy pod queries never see route samples.
    assert!(s.pods("shop", None).await.unwrap().is_empty());
    assert_eq!(
        s.summary(&labels("shop", "app=web"), true).await.unwrap(),
        Summary::EMPTY
    );
}

async fn route_writes_wake_watchers_and_replicas_expire(kind: Kind) {
    let u = store(kind, Duration::from_millis(300)).await;
    let s = &u.store;
    let mut rx = s.watch("shop");
    let other = s.watch("other");
    route_write(s, "shop", ROUTE, "a", 1.0).await;
    woken(&mut rx, "a route count appeared").await;
    rx.borrow_and_update();
    route_write(s, "shop", ROUTE, "a", 2.0).await;
    woken(&mut rx, "a route count changed").await;
    assert!(
        !other.has_changed().unwrap(),
        "another namespace's watcher woke"
    );
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 2.0);
    // Nobody refreshes replica a: its count drops out after the TTL. Each
    // wake-up (or, for a shared store, which has no expiry signal for
    // routes, each re-read) re-reads until it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.route_load("shop", ROUTE, None).await.unwrap() != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica a never expired"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    // A replica back after expiry counts again.
    route_write(s, "shop", ROUTE, "a", 4.0).await;
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 4.0);
}

async fn route_window_keeps_each_replicas_peak(kind: Kind) {
    let u = store(kind, LONG).await;
    let s = &u.store;
    let w = |reduce| {
        Some(Window {
            length: Duration::from_secs(30),
            reduce,
        })
    };
    route_write(s, "shop", ROUTE, "a", 5.0).await;
    route_write(s, "shop", ROUTE, "b", 2.0).await;
    // Not synchronisation: the peak must last at least a clock tick (1 ms).
    tokio::time::sleep(Duration::from_millis(20)).await;
    route_write(s, "shop", ROUTE, "a", 0.0).await;
    assert_eq!(s.route_load("shop", ROUTE, None).await.unwrap(), 2.0);
    assert_eq!(
        s.route_load("shop", ROUTE, w(WindowReduce::Max))
            .await
            .unwrap(),
        7.0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let avg = s
        .route_load("shop", ROUTE, w(WindowReduce::Avg))
        .await
        .unwrap();
    assert!(avg > 2.0 && avg < 7.0, "avg {avg}");
}

/// One message written by `replica`.
async fn ingest_by(store: &SharedStore, pod: &PodIdentity, value: f64, replica: &str) {
    let stored = store
        .ingest(&Ingest {
            pod,
            families: &fams(&[("f", value)]),
            peer: None,
            max_families: 64,
            replica,
        })
        .await
        .unwrap();
    assert_eq!(stored, STORED);
}

/// The replica of each pod, by pod name, as `pods` shows it.
async fn replicas(store: &SharedStore, ns: &str) -> Vec<(String, Option<String>)> {
    store
        .pods(ns, None)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.identity.name, p.replica.map(|r| r.to_string())))
        .collect()
}

async fn the_latest_writers_replica_is_kept(kind: Kind) {
    let u = store(kind, Duration::from_secs(1)).await;
    let s = &u.store;
    let (p1, p2) = (
        app_pod("shop", "web-1", "web"),
        app_pod("shop", "web-2", "web"),
    );
    let named = |v: &[(&str, &str)]| -> Vec<(String, Option<String>)> {
        v.iter()
            .map(|(p, r)| (p.to_string(), Some(r.to_string())))
            .collect()
    };
    ingest_by(s, &p1, 1.0, "activescale-a").await;
    ingest_by(s, &p2, 2.0, "activescale-b").await;
    assert_eq!(
        replicas(s, "shop").await,
        named(&[("web-1", "activescale-a"), ("web-2", "activescale-b")])
    );
    // The stream moved (a reconnect to another replica): the latest writer
    // is named, whether the value changed or not.
    ingest_by(s, &p1, 1.0, "activescale-b").await;
    ingest_by(s, &p2, 3.0, "activescale-b").await;
    assert_eq!(
        replicas(s, "shop").await,
        named(&[("web-1", "activescale-b"), ("web-2", "activescale-b")])
    );
    // A replica's name may be any UTF-8 up to the bound.
    let long = "é".repeat(126);
    ingest_by(s, &p2, 3.0, &long).await;
    assert_eq!(
        replicas(s, "shop").await,
        named(&[("web-1", "activescale-b"), ("web-2", &long)])
    );
    // A pod back after expiry is named by its new writer, and the scaling
    // answer path agrees on the pods (its replica is optional).
    let mut rx = s.watch("shop");
    until_expired(s, &mut rx).await;
    assert!(replicas(s, "shop").await.is_empty());
    ingest_by(s, &p1, 1.0, "activescale-c").await;
    assert_eq!(
        replicas(s, "shop").await,
        named(&[("web-1", "activescale-c")])
    );
    let answer = s.answer_pods("shop", None, None).await.unwrap();
    assert_eq!(answer.len(), 1);
    assert!(
        answer[0]
            .replica
            .as_deref()
            .is_none_or(|r| r == "activescale-c")
    );
}
