//! Redis/Valkey store shared by several replicas.
//!
//! Every replica writes what its sidecars report and reads every pod, so
//! KEDA may ask any replica. Redis is the single truth; a replica keeps no
//! pod data of its own, only change signals.
//!
//! # Data model
//!
//! Per namespace ten keys that share the hash tag `{<prefix>:<namespace>}`,
//! so one script can touch all of them on a Redis Cluster too:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{p:ns}:seen` | ZSET | member pod name, score last report (ms, Redis clock): the expiry index |
//! | `{p:ns}:id` | HASH | pod → identity JSON `{"w": workload, "l": labels}` |
//! | `{p:ns}:st` | HASH | pod → state `["value", "family", "value", ...]` |
//! | `{p:ns}:h` | HASH | pod → change points `["ms", "value", ...]` for `window` triggers |
//! | `{p:ns}:g` | HASH | pod → `"<group id> <value>"`: the group and value the pod is counted with |
//! | `{p:ns}:gl` | HASH | group id → identity JSON of the group |
//! | `{p:ns}:gs` | HASH | group id → sum of the values of its pods |
//! | `{p:ns}:gc` | HASH | group id → number of its pods |
//! | `{p:ns}:addr` | HASH | pod → the address its stream was first seen from: writes from another address are refused while the pod is live |
//! | `{p:ns}:rep` | HASH | pod → the activescale replica holding its sidecar stream (the latest writer), for `/v1/pods` only |
//!
//! Activator route loads live in an eleventh key of the namespace, which no pod
//! script reads: `{p:ns}:rt`, a HASH of `<route>\n<replica>` → `"<last seen
//! ms> <ms> <value> ..."` (the replica's change points, the last one its load
//! now). `route.lua` writes one entry, drops entries past `pod_ttl` and
//! publishes the namespace when a count changed; `route_read.lua` returns
//! the live entries of one route, and the sum (window-reduced per replica
//! with [`window::reduce`]) is taken here.
//!
//! A *group* is the pods sharing one identity JSON (workload and labels: the
//! pods of one workload, usually); its id is the SHA-1 of that JSON. Every
//! member of `seen` is counted in exactly one group (`groups.lua`, prepended to
//! the scripts that add or remove pods), so sum and avg triggers read a few
//! groups instead of every pod.
//!
//! Numbers are kept as `%.17g` strings: they round-trip exactly, unlike
//! cjson's 14-digit numbers.
//!
//! - **One round trip per Envoy message**: `ingest` is one `EVALSHA` of
//!   `record.lua`. It updates the last-seen score always, and the state and
//!   history only when a family's value changed; an unchanged pod costs one
//!   `ZADD`, one `HGET` of its address, one of its replica (written only
//!   when the stream moved to another replica) and the key `PEXPIRE`s. The merge is
//!   linear (a Lua table indexes the pod's families) and keeps at most
//!   `max_families_per_pod` of them; the address binding is compared inside
//!   the same script, so replicas agree on it.
//! - **TTL**: Redis 7.0 has no per-field hash TTL, so the ZSET score is the
//!   clock. Reads take only members with `score > now - pod_ttl`; expired
//!   members are removed lazily by the next `record` of the namespace and by
//!   a light sweeper (below). Every key gets a `PEXPIRE` of
//!   `2 × pod_ttl + 60s` at each write, so an abandoned namespace disappears.
//!   All times are the Redis server's (`TIME` inside the scripts), so replicas
//!   with skewed clocks agree. All replicas must use the same `pod_ttl`.
//! - **Reads** (`values`, `pods`) are one `EVALSHA` of `read.lua` over the
//!   asked namespace's keys: no `KEYS`/`SCAN` anywhere. Selectors are matched
//!   here, windows reduced here with [`window::reduce`]; `record.lua` keeps
//!   the history with the same rule as [`window::push`]. Only `pods` (the
//!   debugging list) asks `read.lua` for the replicas too: scaling reads
//!   (`values`, `answer_pods`) get the same reply as before them.
//! - **Summaries** (`summary`, what GetMetrics reads) of sum and avg triggers
//!   without a window are one `EVALSHA` of `summary.lua`: the count and sum of
//!   each group, minus the pods past their TTL that nothing removed yet
//!   (normally none), so O(groups) on both sides; the selector is matched once
//!   per group here. `max` and windows need each pod's value and take the
//!   `values` path. When the namespace holds pods counted in no group (data of
//!   a version without groups, or a pod such a writer removed), `summary.lua`
//!   says so, `rebuild.lua` recounts the namespace once and that call is
//!   answered per pod.
//! - **Change signals**: a script that changes a namespace (a pod added, a
//!   value changed, a pod expired) `PUBLISH`es the namespace on
//!   `<prefix>:changes`. Each process holds one subscriber connection that
//!   feeds the [`Notifier`]; it resubscribes after a reconnect and then wakes
//!   every watcher, since changes may have been missed (and on a disconnect,
//!   so that StreamIsActive feeds re-read and learn of the outage). On a cluster the
//!   classic `PUBLISH` reaches every node, so the subscriber uses any one.
//! - **Expiry signals**: for namespaces with local watchers only, a sweeper
//!   runs `sweep.lua`, which removes expired pods, publishes when it removed
//!   one, and says when the next pod will expire. It also deletes `rep`
//!   fields of pods no longer in `seen`, which only a writer of the version
//!   before them leaves (its expiry does not know the hash): checked with
//!   `HLEN` against `ZCARD`, so it costs two O(1) reads otherwise.
//!
//! # Failure
//!
//! Each call has one deadline (`redis_timeout`) covering the pool checkout
//! and the command: past it the call fails with [`StoreError::Timeout`]; an
//! unreachable or refusing server gives [`StoreError::Unavailable`]. Neither
//! is ever turned into a value. Connections that failed are dropped from the
//! pool and new ones are made on the next call, so the store heals by itself.
//! A Redis node that has been up for less than `warmup` (default 10 s) may
//! have lost what sidecars reported before it (re)started: `values` of its
//! namespaces fail with [`StoreError::Unavailable`] until then, as the memory
//! store does after a restart of the process (`read.lua` returns the uptime).
//! [`RedisStore::connect`] connects nothing: the process starts not-ready and
//! becomes ready when Redis answers.
//!
//! A Redis that answers reads but refuses writes (`maxmemory` with
//! `noeviction`, a replica after a failover, a failed RDB save, too few
//! replicas, an ACL without write rights) is the dangerous case: reads go on
//! serving what was written before, stale and, once pods pass their TTL,
//! 0. Every write of ours reports a refusal to `WriteHealth`; while it
//! holds one, `values`, `summary` and `pods` fail with
//! [`StoreError::Unavailable`] and the replica is not ready. `ready()` writes
//! a probe key (`{<prefix>:probe}:replica:<name>`, expiring after a minute),
//! so a replica without sidecar traffic learns both that writes fail and that
//! they work again.

mod settings;

use std::{
    collections::HashSet,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use deadpool::managed::{self, Metrics, Pool, RecycleError, RecycleResult, Timeouts};
use futures::StreamExt;
use redis::{RedisError, RedisFuture, Script, aio::ConnectionLike, cluster::ClusterClient};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Ingest, Ingested, Notifier, PodIdentity, PodQuery, PodSelector, PodView, RouteSample, Store,
    StoreError, Summary, Window, sorted_families, window,
};
use crate::{
    config::{EngineConfig, RedisConfig},
    selector::Labels,
};

use settings::Settings;

/// Handle on the Redis store; clones share the pool and the subscriber.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool<Manager>,
    notifier: Notifier,
    /// Set while the change subscription is up: without it StreamIsActive on
    /// this replica would miss ingests of the others, so the replica is not
    /// ready.
    subscribed: AtomicBool,
    prefix: String,
    channel: String,
    timeout: Duration,
    ttl_ms: u64,
    max_window_ms: u64,
    key_ttl_ms: u64,
    /// Values are refused while the Redis node holding a namespace has been up
    /// for less than this: pods may not have reported since it (re)started.
    young_server: Duration,
    /// Whether Redis takes our writes; reads are refused while it does not.
    writes: WriteHealth,
    /// The key `ready()` writes to learn whether writes work.
    probe_key: String,
    record: Script,
    read: Script,
    sweep: Script,
    summary: Script,
    rebuild: Script,
    route: Script,
    route_read: Script,
    /// Stops the subscriber and the sweeper when the last handle goes.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisStore {
    /// Builds the pool and starts the subscriber and the sweeper. Fails only
    /// on settings that can never work (a bad URL, unreadable or invalid
    /// certificate files); an unreachable server is retried in the background.
    pub async fn connect(config: &RedisConfig, engine: &EngineConfig) -> Result<Self, StoreError> {
        let settings = Settings::from_config(config)
            .map_err(|e| StoreError::Unavailable(format!("redis settings: {e}")))?;
        Ok(Self::with_settings(settings, config, engine))
    }

    fn with_settings(settings: Settings, config: &RedisConfig, engine: &EngineConfig) -> Self {
        let timeout = config.timeout;
        let subscriber = settings.subscriber_clients.clone();
        let pool = Pool::builder(Manager {
            backend: settings.backend,
        })
        .max_size(config.pool_size)
        .runtime(deadpool::Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        })
        .build()
        .expect("a runtime is set, so building the pool cannot fail");
        let prefix = config.key_prefix.clone();
        let ttl_ms = engine.pod_ttl.as_millis() as u64;
        let young_server = engine.warmup.unwrap_or(YOUNG_SERVER);
        // Inside the documented ACL key pattern `~{<prefix>:*`; the suffix has
        // a ':', which no namespace's keys (`{<prefix>:<ns>}:seen`...) have.
        // Named by the process, not by `run` (see `nth_replica` in lib.rs):
        // replicas sharing a name share a key, which costs nothing but the
        // key's distinctness.
        let probe_key = format!("{{{prefix}:probe}}:replica:{}", super::replica_name());
        let inner = Arc::new(Inner {
            pool,
            notifier: Notifier::default(),
            subscribed: AtomicBool::new(false),
            channel: format!("{prefix}:changes"),
            prefix,
            timeout,
            ttl_ms,
            max_window_ms: engine.max_window.as_millis() as u64,
            key_ttl_ms: 2 * ttl_ms + 60_000,
            young_server,
            // After refused writes, as after a Redis restart: pods whose
            // reports were lost must have reported again (see `WriteHealth`).
            writes: WriteHealth::new(young_server),
            probe_key,
            record: Script::new(concat!(
                include_str!("groups.lua"),
                include_str!("record.lua")
            )),
            read: Script::new(include_str!("read.lua")),
            sweep: Script::new(concat!(
                include_str!("groups.lua"),
                include_str!("sweep.lua")
            )),
            summary: Script::new(include_str!("summary.lua")),
            rebuild: Script::new(concat!(
                include_str!("groups.lua"),
                include_str!("rebuild.lua")
            )),
            route: Script::new(include_str!("route.lua")),
            route_read: Script::new(include_str!("route_read.lua")),
            stop: CancellationToken::new(),
        });
        tokio::spawn(subscribe(
            Arc::downgrade(&inner),
            subscriber,
            inner.stop.clone(),
        ));
        tokio::spawn(sweep(
            Arc::downgrade(&inner),
            inner.stop.clone(),
            engine.pod_ttl,
        ));
        Self { inner }
    }
}

/// Default of [`Inner::young_server`] when `warmup` is not set: two Envoy
/// flushes, as the memory store's warm-up.
const YOUNG_SERVER: Duration = Duration::from_secs(10);

/// How long the probe key outlives its last write: a few readiness probes,
/// so that it disappears soon after its replica.
const PROBE_TTL_MS: u64 = 60_000;

/// Whether a Redis error says the server refuses writes while it may still
/// answer reads. Errors a script raises on bad input (`ERR`) are not in
/// here: one pod's bad message must not make the store unavailable for all.
/// Connection errors and timeouts are not either: they fail reads too.
fn refuses_writes(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("OOM" | "READONLY" | "NOREPLICAS" | "MISCONF" | "NOPERM")
    )
}

/// What this replica knows about Redis taking its writes.
///
/// A refusal comes from any write (`record`, the sweeper, a group rebuild,
/// the probe in `ready()`); only `record` and the probe count as success,
/// since only they prove that a sidecar's report would be stored (a sweep
/// removes, which a full Redis still allows).
///
/// How long reads stay refused: until a write has succeeded since the last
/// refusal **and** `hold` has passed since that refusal. What was written
/// before a refusal is stale by up to the time writes failed; a failure
/// longer than `pod_ttl` has also dropped pods whose reports were refused, so
/// the first success after it (often the probe, before any sidecar reported
/// again) would read as "no load". `hold` is the Redis warm-up (`warmup`,
/// 10 s by default: two Envoy flushes), for the same reason as after a Redis
/// restart: by then every sidecar has reported again and the TTL and the
/// sweeper have dropped what went stale. A flapping server (some writes
/// refused, some not: memory at the limit, pods on several nodes) stays
/// unavailable as long as refusals keep coming, since no answer from it can
/// be trusted.
///
/// The hot path is one atomic load per read and per successful write while
/// all is well.
struct WriteHealth {
    origin: Instant,
    /// Milliseconds since `origin` of the last refusal, plus one; 0 when
    /// there is none since reads were last allowed.
    refused_at: AtomicU64,
    /// Milliseconds since `origin` of the last success, plus one; kept up to
    /// date only while `refused_at` is set.
    ok_at: AtomicU64,
    /// The last refusal's text. std Mutex: written on refusals, read on the
    /// error path only, never held across an await.
    error: std::sync::Mutex<String>,
    hold: Duration,
}

impl WriteHealth {
    fn new(hold: Duration) -> Self {
        Self {
            origin: Instant::now(),
            refused_at: AtomicU64::new(0),
            ok_at: AtomicU64::new(0),
            error: std::sync::Mutex::new(String::new()),
            hold,
        }
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// Notes the error of one of our writes when it is a refusal.
    fn failed(&self, e: &RedisError) {
        if !refuses_writes(e.code()) {
            return;
        }
        let first = {
            let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
            *error = e.to_string();
            self.refused_at.swap(self.now(), Ordering::AcqRel) == 0
        };
        if first {
            warn!(error = %e, "redis refuses writes: answering unavailable until they succeed again");
        }
    }

    /// Notes a write that Redis stored (`record` or the probe).
    fn succeeded(&self) {
        if self.refused_at.load(Ordering::Acquire) != 0 {
            self.ok_at.store(self.now(), Ordering::Release);
        }
    }

    /// Whether reads may be answered.
    fn check(&self) -> Result<(), StoreError> {
        let refused_at = self.refused_at.load(Ordering::Acquire);
        if refused_at == 0 {
            return Ok(());
        }
        let (ok_at, now) = (self.ok_at.load(Ordering::Acquire), self.now());
        let hold = self.hold.as_millis() as u64;
        if recovered(refused_at, ok_at, now, hold) {
            // A refusal since the load keeps its newer time: the exchange fails.
            if self
                .refused_at
                .compare_exchange(refused_at, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                info!("redis takes writes again: answering");
            }
            return Ok(());
        }
        let error = self.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Err(StoreError::Unavailable(if ok_at > refused_at {
            format!(
                "writes failing: {error} (last refused {:?} ago; answers resume {:?} after the last refusal)",
                Duration::from_millis(now - refused_at),
                self.hold
            )
        } else {
            format!("writes failing: {error}")
        }))
    }
}

/// Whether reads may resume: a write succeeded after the last refusal and
/// `hold_ms` have passed since it. Times in ms of one clock.
fn recovered(refused_at: u64, ok_at: u64, now: u64, hold_ms: u64) -> bool {
    ok_at > refused_at && now.saturating_sub(refused_at) >= hold_ms
}

/// The keys of a namespace, in the order the scripts take them.
fn keys(prefix: &str, namespace: &str) -> [String; 10] {
    [
        "seen", "id", "st", "h", "g", "gl", "gs", "gc", "addr", "rep",
    ]
    .map(|k| format!("{{{prefix}:{namespace}}}:{k}"))
}

/// The key of a namespace's activator route loads (see the data model).
fn route_key(prefix: &str, namespace: &str) -> String {
    format!("{{{prefix}:{namespace}}}:rt")
}

/// The field prefix of a route's entries: routes never hold a newline.
fn route_field_prefix(route: &str) -> String {
    format!("{route}\n")
}

/// The load of one replica's entry (`route.lua`'s format): the last point's
/// value, or reduced over `window`; at the store's time `now_ms`.
fn entry_load(entry: &str, now_ms: u64, window: Option<Window>) -> Result<f64, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("activator route entry {entry:?}"));
    let numbers = entry
        .split(' ')
        .skip(1)
        .map(|n| number("route entry", n))
        .collect::<Result<Vec<f64>, _>>()?;
    if numbers.is_empty() || numbers.len() % 2 != 0 {
        return Err(corrupt());
    }
    let points: Vec<window::Point> = numbers.chunks(2).map(|c| (c[0] as u64, c[1])).collect();
    let now_value = points[points.len() - 1].1;
    Ok(match window {
        Some(w) => window::reduce(&points, now_ms, w).unwrap_or(now_value),
        None => now_value,
    })
}

/// `route_read.lua`'s answer: the node's uptime and the route's load.
fn route_load_of(raw: &[String], window: Option<Window>) -> Result<(Duration, f64), StoreError> {
    let [now, uptime, entries @ ..] = raw else {
        return Err(StoreError::Corrupt(
            "route_read.lua answer too short".into(),
        ));
    };
    let now = number("time", now)? as u64;
    let uptime = Duration::from_secs(number("uptime", uptime)? as u64);
    let mut sum = 0.0;
    for e in entries {
        sum += entry_load(e, now, window)?;
    }
    Ok((uptime, sum))
}

impl Inner {
    /// Runs a script with one deadline over checkout and command.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.eval_as(call, false).await
    }

    /// [`Inner::eval`] of a script that writes: refusals go to `writes`.
    async fn eval_write<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.eval_as(call, true).await
    }

    async fn eval_as<T: redis::FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
        writes: bool,
    ) -> Result<T, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Err(_) => return Err(StoreError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(pool_error(e, self.timeout)),
            Ok(Ok(c)) => c,
        };
        match tokio::time::timeout_at(deadline, call.invoke_async::<T>(&mut *conn)).await {
            Err(_) => {
                // The reply may still come; the connection is not trusted again.
                conn.broken = true;
                Err(StoreError::Timeout(self.timeout))
            }
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                {
                    conn.broken = true;
                }
                if writes {
                    self.writes.failed(&e);
                }
                Err(redis_error(e, self.timeout))
            }
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// The live pods of `namespace`, with their history when `history`.
    /// With `replicas`, each pod's stream's replica too.
    async fn read(
        &self,
        namespace: &str,
        history: bool,
        replicas: bool,
    ) -> Result<Snapshot, StoreError> {
        let raw = self.read_raw(namespace, history, replicas).await?;
        Snapshot::parse(namespace, raw, replicas)
    }

    /// `read.lua`'s flat answer, unparsed.
    async fn read_raw(
        &self,
        namespace: &str,
        history: bool,
        replicas: bool,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let flag = |on: bool| if on { "1" } else { "0" };
        let mut call = self.read.prepare_invoke();
        for k in keys(&self.prefix, namespace) {
            call.key(k);
        }
        call.arg(self.ttl_ms).arg(flag(history)).arg(flag(replicas));
        self.eval(&call).await
    }

    /// The pods of `namespace` matching `selector`; with `answer`, refused
    /// while the node is too young to be trusted, and read without replicas
    /// (a scaling answer does not show them).
    async fn pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
        answer: bool,
        window: Option<window::Window>,
    ) -> Result<Vec<PodView>, StoreError> {
        self.writes.check()?;
        let snap = self.read(namespace, window.is_some(), !answer).await?;
        if answer {
            self.check_uptime(snap.uptime)?;
        }
        Ok(views_of(snap, selector, window))
    }

    /// Fails while the node holding the namespace is too young to be trusted.
    fn check_uptime(&self, uptime: Duration) -> Result<(), StoreError> {
        if uptime < self.young_server {
            // An empty or partly refilled store read as "no load" would be a lie.
            return Err(StoreError::Unavailable(format!(
                "redis has been up for {:?} only: warming up for {:?} until the sidecars have reported again",
                uptime, self.young_server
            )));
        }
        Ok(())
    }

    /// The per-pod path of `values` (and of `summary` where groups cannot answer).
    async fn values(&self, query: &PodQuery) -> Result<Vec<f64>, StoreError> {
        let raw = self
            .read_raw(&query.namespace, query.window.is_some(), false)
            .await?;
        let (uptime, values) = values_of(&query.namespace, raw, query)?;
        self.check_uptime(uptime)?;
        Ok(values)
    }

    /// Count and sum from the group aggregates, in O(groups); `None` when the
    /// namespace holds pods written without groups (see `rebuild.lua`).
    async fn group_summary(&self, query: &PodQuery) -> Result<Option<Summary>, StoreError> {
        let mut call = self.summary.prepare_invoke();
        for k in keys(&self.prefix, &query.namespace) {
            call.key(k);
        }
        call.arg(self.ttl_ms);
        let raw: Vec<Option<String>> = self.eval(&call).await?;
        let (uptime, groups) = groups_of(&query.namespace, raw)?;
        self.check_uptime(uptime)?;
        let Some(groups) = groups else {
            return Ok(None);
        };
        let mut summary = Summary::EMPTY;
        for g in groups {
            let parsed: StoredIdentity = serde_json::from_str(&g.json).map_err(|e| {
                StoreError::Corrupt(format!(
                    "namespace {}: identity of group {}: {e}",
                    query.namespace, g.id
                ))
            })?;
            if matches(&query.selector, &parsed) {
                summary.count += g.count;
                summary.sum += g.sum;
            }
        }
        Ok(Some(summary))
    }

    /// Recounts the namespace's pods into groups (after data of a version
    /// without them).
    async fn rebuild(&self, namespace: &str) -> Result<(), StoreError> {
        let mut call = self.rebuild.prepare_invoke();
        for k in keys(&self.prefix, namespace) {
            call.key(k);
        }
        call.arg(self.key_ttl_ms);
        let pods: i64 = self.eval_write(&call).await?;
        info!(namespace, pods, "redis pod groups rebuilt");
        Ok(())
    }
}

/// Whether a stored identity (a pod's or a group's) matches a selector.
fn matches(selector: &PodSelector, id: &StoredIdentity) -> bool {
    match selector {
        PodSelector::Labels(sel) => sel.matches(&id.l),
        PodSelector::Workload(w) => id.w.as_deref() == Some(w.as_str()),
    }
}

/// One group of `summary.lua`'s answer.
#[derive(Debug, PartialEq)]
struct Group {
    id: String,
    json: String,
    sum: f64,
    count: u64,
}

/// Parses `summary.lua`'s answer: the node's uptime, and the groups with live
/// pods, or `None` when the script found pods counted in no group.
fn groups_of(
    namespace: &str,
    raw: Vec<Option<String>>,
) -> Result<(Duration, Option<Vec<Group>>), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("namespace {namespace}: {what}"));
    let mut it = raw.into_iter();
    let _now = it.next().flatten().ok_or_else(|| corrupt("no time"))?;
    let uptime = number(
        "uptime",
        &it.next().flatten().ok_or_else(|| corrupt("no uptime"))?,
    )?;
    let uptime = Duration::from_secs(uptime as u64);
    match it.next().flatten().as_deref() {
        Some("ok") => {}
        Some("stale") => return Ok((uptime, None)),
        _ => return Err(corrupt("no group status")),
    }
    let mut groups = Vec::new();
    while let Some(id) = it.next() {
        let id = id.ok_or_else(|| corrupt("group without an id"))?;
        let (Some(json), Some(sum), Some(count)) = (it.next(), it.next(), it.next()) else {
            return Err(corrupt("short reply"));
        };
        let (Some(json), Some(sum), Some(count)) = (json, sum, count) else {
            return Err(corrupt(&format!("group {id} has missing fields")));
        };
        let count = count
            .parse::<u64>()
            .map_err(|_| corrupt(&format!("group {id}: count {count:?}")))?;
        groups.push(Group {
            sum: number("group sum", &sum)?,
            id,
            json,
            count,
        });
    }
    Ok((uptime, Some(groups)))
}

fn pool_error(e: managed::PoolError<RedisError>, timeout: Duration) -> StoreError {
    match e {
        managed::PoolError::Timeout(_) => StoreError::Timeout(timeout),
        managed::PoolError::Backend(e) => redis_error(e, timeout),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn redis_error(e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    match e.kind() {
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
            StoreError::Corrupt(e.to_string())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// A pod's identity as stored: the name and namespace are in the key already.
#[derive(Serialize, Deserialize)]
struct StoredIdentity<'a> {
    #[serde(borrow)]
    w: Option<std::borrow::Cow<'a, str>>,
    l: std::borrow::Cow<'a, Labels>,
}

fn identity_json(pod: &PodIdentity) -> String {
    serde_json::to_string(&StoredIdentity {
        w: pod.workload.as_deref().map(Into::into),
        l: std::borrow::Cow::Borrowed(&*pod.labels),
    })
    .expect("string maps always serialise")
}

/// One pod as read back.
struct StoredPod {
    identity: PodIdentity,
    last_seen_ms: u64,
    value: f64,
    families: Vec<(String, f64)>,
    /// Change points, when the read asked for them.
    history: Option<Vec<window::Point>>,
    /// The stream's replica, when the read asked and one is recorded.
    replica: Option<Arc<str>>,
}

/// The answer of `read.lua`.
struct Snapshot {
    now_ms: u64,
    /// The node's uptime: a young node's pods may not all have reported yet.
    uptime: Duration,
    pods: Vec<StoredPod>,
}

/// The pods of a snapshot matching `selector`, by name; with `window`, each
/// value reduced over it as `values_of` does (the snapshot then holds the
/// history).
fn views_of(
    snap: Snapshot,
    selector: Option<&PodSelector>,
    window: Option<window::Window>,
) -> Vec<PodView> {
    let now_ms = snap.now_ms;
    let mut views = Vec::new();
    for p in snap.pods {
        if !selector.is_none_or(|s| s.matches(&p.identity)) {
            continue;
        }
        let value = match (window, &p.history) {
            (Some(w), Some(h)) => window::reduce(h, now_ms, w).unwrap_or(p.value),
            _ => p.value,
        };
        views.push(PodView {
            age: Duration::from_millis(now_ms.saturating_sub(p.last_seen_ms)),
            identity: p.identity,
            value,
            families: p.families.into_iter().collect(),
            replica: p.replica,
        });
    }
    views.sort_by(|a, b| a.identity.name.cmp(&b.identity.name));
    views
}

fn number(field: &str, s: &str) -> Result<f64, StoreError> {
    s.parse::<f64>()
        .map_err(|_| StoreError::Corrupt(format!("{field}: {s:?} is not a number")))
}

/// What `values` needs from `read.lua`'s answer, without building whole pods:
/// the selector is decided once per distinct identity (pods of a workload
/// share one), the value is read off the state without decoding its families,
/// and history is decoded only for windows. Returns the node's uptime too.
fn values_of(
    namespace: &str,
    raw: Vec<Option<String>>,
    query: &PodQuery,
) -> Result<(Duration, Vec<f64>), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("namespace {namespace}: {what}"));
    let mut it = raw.into_iter();
    let now_ms = number(
        "now",
        &it.next().flatten().ok_or_else(|| corrupt("no time"))?,
    )? as u64;
    let uptime = number(
        "uptime",
        &it.next().flatten().ok_or_else(|| corrupt("no uptime"))?,
    )?;
    let mut selected: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let mut values = Vec::new();
    while let Some(name) = it.next() {
        let name = name.ok_or_else(|| corrupt("pod without a name"))?;
        let (Some(_seen), Some(id), Some(st), Some(h)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(corrupt("short reply"));
        };
        let (Some(id), Some(st)) = (id, st) else {
            return Err(corrupt(&format!("pod {name} has missing fields")));
        };
        let hit = match selected.get(&id) {
            Some(&hit) => hit,
            None => {
                let parsed: StoredIdentity = serde_json::from_str(&id)
                    .map_err(|e| corrupt(&format!("identity of pod {name}: {e}")))?;
                let hit = matches(&query.selector, &parsed);
                selected.insert(id, hit);
                hit
            }
        };
        if !hit {
            continue;
        }
        let value = number(
            "value",
            first_string(&st).ok_or_else(|| corrupt(&format!("state of pod {name}")))?,
        )?;
        values.push(match (query.window, h) {
            (Some(w), Some(h)) => {
                window::reduce(&parse_history(&name, &h, &corrupt)?, now_ms, w).unwrap_or(value)
            }
            _ => value,
        });
    }
    Ok((Duration::from_secs(uptime as u64), values))
}

/// The first element of a JSON array of plain strings (`["3","name","3"]` →
/// `3`); the state's value is always written first, as a number string with
/// nothing to escape.
fn first_string(json: &str) -> Option<&str> {
    let rest = json
        .trim_start()
        .strip_prefix('[')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    let s = &rest[..end];
    (!s.contains('\\')).then_some(s)
}

fn parse_history(
    name: &str,
    h: &str,
    corrupt: &dyn Fn(&str) -> StoreError,
) -> Result<Vec<window::Point>, StoreError> {
    let flat: Vec<String> =
        serde_json::from_str(h).map_err(|e| corrupt(&format!("history of pod {name}: {e}")))?;
    flat.chunks(2)
        .map(|c| match c {
            [t, v] => Ok((number("time", t)? as u64, number("history value", v)?)),
            _ => Err(corrupt(&format!("history of pod {name} is odd"))),
        })
        .collect()
}

impl Snapshot {
    /// `replicas`: whether the read asked for them (a sixth field per pod).
    fn parse(
        namespace: &str,
        raw: Vec<Option<String>>,
        replicas: bool,
    ) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("namespace {namespace}: {what}"));
        let mut it = raw.into_iter();
        let now_ms = number(
            "now",
            &it.next().flatten().ok_or_else(|| corrupt("no time"))?,
        )? as u64;
        let uptime = Duration::from_secs(number(
            "uptime",
            &it.next().flatten().ok_or_else(|| corrupt("no uptime"))?,
        )? as u64);
        let mut pods = Vec::new();
        // Pods of one workload share a label set: parse each distinct one once
        // (a map: with per-pod labels a linear search would be quadratic).
        let mut labels: std::collections::HashMap<String, (Arc<Labels>, Option<String>)> =
            std::collections::HashMap::new();
        // Likewise the few replica names every pod shares.
        let mut names: HashSet<Arc<str>> = HashSet::new();
        while let Some(name) = it.next() {
            let name = name.ok_or_else(|| corrupt("pod without a name"))?;
            let (Some(seen), Some(id), Some(st), Some(history)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(corrupt("short reply"));
            };
            let replica = match replicas.then(|| it.next()) {
                None => None,
                Some(None) => return Err(corrupt("short reply")),
                Some(Some(None)) => None,
                Some(Some(Some(r))) => Some(match names.get(r.as_str()) {
                    Some(shared) => Arc::clone(shared),
                    None => {
                        let shared: Arc<str> = r.into();
                        names.insert(Arc::clone(&shared));
                        shared
                    }
                }),
            };
            // A pod removed between the ZSET read and the hash reads cannot
            // happen inside one script; missing fields mean foreign writes.
            let (Some(seen), Some(id), Some(st)) = (seen, id, st) else {
                return Err(corrupt(&format!("pod {name} has missing fields")));
            };
            let (workload, pod_labels) = match labels.get(&id) {
                Some((l, w)) => (w.clone(), l.clone()),
                None => {
                    let parsed: StoredIdentity = serde_json::from_str(&id)
                        .map_err(|e| corrupt(&format!("identity of pod {name}: {e}")))?;
                    let l = Arc::new(parsed.l.into_owned());
                    let w = parsed.w.map(|w| w.into_owned());
                    labels.insert(id, (l.clone(), w.clone()));
                    (w, l)
                }
            };
            let state: Vec<String> = serde_json::from_str(&st)
                .map_err(|e| corrupt(&format!("state of pod {name}: {e}")))?;
            let value = number(
                "value",
                state.first().ok_or_else(|| corrupt("empty state"))?,
            )?;
            let families = state[1..]
                .chunks(2)
                .map(|c| match c {
                    [n, v] => Ok((n.clone(), number("family value", v)?)),
                    _ => Err(corrupt(&format!("state of pod {name} is odd"))),
                })
                .collect::<Result<_, _>>()?;
            // `false` from read.lua when history was not asked for.
            let history = history
                .map(|h| parse_history(&name, &h, &corrupt))
                .transpose()?;
            pods.push(StoredPod {
                identity: PodIdentity {
                    namespace: namespace.to_owned(),
                    name,
                    workload,
                    labels: pod_labels,
                },
                last_seen_ms: number("last seen", &seen)? as u64,
                value,
                families,
                history,
                replica,
            });
        }
        Ok(Self {
            now_ms,
            uptime,
            pods,
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ingest(&self, ingest: &Ingest<'_>) -> Result<Ingested, StoreError> {
        let inner = &*self.inner;
        let pod = ingest.pod;
        let mut call = inner.record.prepare_invoke();
        for k in keys(&inner.prefix, &pod.namespace) {
            call.key(k);
        }
        call.arg(&pod.name)
            .arg(identity_json(pod))
            .arg(inner.ttl_ms)
            .arg(inner.max_window_ms)
            .arg(inner.key_ttl_ms)
            .arg(&inner.channel)
            .arg(&pod.namespace)
            .arg(ingest.peer.map(|a| a.to_string()).unwrap_or_default())
            .arg(ingest.max_families)
            .arg(ingest.replica);
        for (name, value) in sorted_families(ingest.families).iter() {
            // Display of f64 is the shortest string that parses back exactly
            // (whole numbers as plain digits).
            call.arg(name).arg(value.to_string());
        }
        let (status, refused, bound): (i64, u64, String) = inner.eval_write(&call).await?;
        inner.writes.succeeded();
        match status {
            0 => Ok(Ingested::Stored { refused }),
            1 => {
                // Local watchers need not wait for the round trip through pub/sub.
                inner.notifier.notify(&pod.namespace);
                Ok(Ingested::Stored { refused })
            }
            2 => bound
                .parse()
                .map(|bound| Ingested::BoundElsewhere { bound })
                .map_err(|_| {
                    StoreError::Corrupt(format!(
                        "namespace {}: pod {} is bound to {bound:?}, not an address",
                        pod.namespace, pod.name
                    ))
                }),
            other => Err(StoreError::Corrupt(format!(
                "record.lua answered status {other}"
            ))),
        }
    }

    async fn record_route(&self, sample: &RouteSample<'_>) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let mut call = inner.route.prepare_invoke();
        call.key(route_key(&inner.prefix, sample.namespace))
            .arg(format!(
                "{}{}",
                route_field_prefix(sample.route),
                sample.replica
            ))
            .arg(sample.load.to_string())
            .arg(inner.ttl_ms)
            .arg(inner.max_window_ms)
            .arg(inner.key_ttl_ms)
            .arg(&inner.channel)
            .arg(sample.namespace);
        let changed: i64 = inner.eval_write(&call).await?;
        inner.writes.succeeded();
        if changed == 1 {
            // Local watchers need not wait for the round trip through pub/sub.
            inner.notifier.notify(sample.namespace);
        }
        Ok(())
    }

    async fn route_load(
        &self,
        namespace: &str,
        route: &str,
        window: Option<Window>,
    ) -> Result<f64, StoreError> {
        let inner = &*self.inner;
        // Refused while our writes are: our own count may be missing.
        inner.writes.check()?;
        let mut call = inner.route_read.prepare_invoke();
        call.key(route_key(&inner.prefix, namespace))
            .arg(route_field_prefix(route))
            .arg(inner.ttl_ms);
        let raw: Vec<String> = inner.eval(&call).await?;
        let (uptime, load) = route_load_of(&raw, window)?;
        // A restarted node lost the counts; publishers rewrite them within
        // a third of pod_ttl, well inside the warm-up.
        inner.check_uptime(uptime)?;
        Ok(load)
    }

    async fn values(&self, query: &PodQuery) -> Result<Vec<f64>, StoreError> {
        self.inner.writes.check()?;
        self.inner.values(query).await
    }

    /// Sum and avg without windows read the group aggregates; a maximum or a
    /// window needs every pod's value.
    async fn summary(&self, query: &PodQuery, with_max: bool) -> Result<Summary, StoreError> {
        let inner = &*self.inner;
        inner.writes.check()?;
        if !with_max && query.window.is_none() {
            if let Some(s) = inner.group_summary(query).await? {
                return Ok(s);
            }
            // Pods written without groups: count them in once, and answer
            // this call from the pods themselves.
            inner.rebuild(&query.namespace).await?;
        }
        Ok(Summary::of(&inner.values(query).await?))
    }

    async fn pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
    ) -> Result<Vec<PodView>, StoreError> {
        self.inner.pods(namespace, selector, false, None).await
    }

    async fn answer_pods(
        &self,
        namespace: &str,
        selector: Option<&PodSelector>,
        window: Option<window::Window>,
    ) -> Result<Vec<PodView>, StoreError> {
        // A young node's list may miss pods that have not reported since it
        // started: as a scaling answer that would read as less load.
        self.inner.pods(namespace, selector, true, window).await
    }

    fn watch(&self, namespace: &str) -> watch::Receiver<u64> {
        self.inner.notifier.subscribe(namespace)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let deadline = Instant::now() + inner.timeout;
        let mut conn = match tokio::time::timeout_at(deadline, inner.pool.get()).await {
            Err(_) => return Err(StoreError::Timeout(inner.timeout)),
            Ok(Err(e)) => return Err(pool_error(e, inner.timeout)),
            Ok(Ok(c)) => c,
        };
        // A write, not a PING: a Redis that answers but refuses writes is
        // not ready, and one that takes them again is, with or without
        // sidecar traffic.
        let mut probe = redis::cmd("SET");
        probe
            .arg(&inner.probe_key)
            .arg(std::process::id())
            .arg("PX")
            .arg(PROBE_TTL_MS);
        match tokio::time::timeout_at(deadline, probe.query_async::<()>(&mut *conn)).await {
            Err(_) => {
                conn.broken = true;
                return Err(StoreError::Timeout(inner.timeout));
            }
            Ok(Err(e)) if refuses_writes(e.code()) => inner.writes.failed(&e),
            Ok(Err(e)) => {
                conn.broken = true;
                return Err(redis_error(e, inner.timeout));
            }
            Ok(Ok(())) => inner.writes.succeeded(),
        }
        inner.writes.check()?;
        if !inner.subscribed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable(
                "the change subscription is down; reconnecting".into(),
            ));
        }
        Ok(())
    }
}

/// Where the pool's connections go.
enum Backend {
    Single {
        client: redis::Client,
        config: redis::AsyncConnectionConfig,
    },
    Cluster(ClusterClient),
}

/// Pool manager for both modes. Not deadpool-redis's managers: they `PING`
/// on every checkout (a second round trip per Envoy message) and the cluster
/// one cannot take client certificates. A connection is instead dropped when
/// a command on it failed at the connection level.
struct Manager {
    backend: Backend,
}

enum Connection {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

struct Pooled {
    conn: Connection,
    /// A command failed on the connection or timed out: do not reuse it.
    broken: bool,
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = RedisError;

    async fn create(&self) -> Result<Pooled, RedisError> {
        let conn = match &self.backend {
            Backend::Single { client, config } => Connection::Single(
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await?,
            ),
            Backend::Cluster(client) => Connection::Cluster(client.get_async_connection().await?),
        };
        Ok(Pooled {
            conn,
            broken: false,
        })
    }

    async fn recycle(&self, conn: &mut Pooled, _: &Metrics) -> RecycleResult<RedisError> {
        if conn.broken {
            Err(RecycleError::message("a command failed on this connection"))
        } else {
            Ok(())
        }
    }
}

impl ConnectionLike for Pooled {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match &mut self.conn {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match &mut self.conn {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.conn {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Reconnect backoff of the subscriber: doubling, capped.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(3))
}

/// Holds the one subscriber connection of the process and feeds the notifier.
/// `clients` are tried in turn (the seed nodes of a cluster).
async fn subscribe(inner: Weak<Inner>, clients: Vec<redis::Client>, stop: CancellationToken) {
    const PING_EVERY: Duration = Duration::from_secs(5);
    let mut attempt = 0u32;
    let mut next = 0usize;
    loop {
        let Some(this) = inner.upgrade() else { return };
        let (channel, timeout) = (
            this.channel.clone(),
            this.timeout.max(Duration::from_secs(1)),
        );
        drop(this);
        let client = &clients[next % clients.len()];
        next += 1;
        let connected = async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&channel).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(timeout, connected) => r,
        };
        let (mut sink, mut stream) = match result {
            Ok(Ok(s)) => s,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {timeout:?}"),
                };
                if attempt == 0 {
                    warn!(%error, "redis change subscription failed; retrying");
                } else {
                    debug!(%error, attempt, "redis change subscription failed");
                }
                let wait = backoff(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let Some(this) = inner.upgrade() else { return };
        this.subscribed.store(true, Ordering::Release);
        // Changes published while we were away are lost: every watcher re-reads.
        this.notifier.notify_all();
        drop(this);
        if attempt > 0 {
            info!("redis change subscription restored");
        }
        attempt = 0;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                msg = stream.next() => match msg {
                    Some(msg) => {
                        let Some(this) = inner.upgrade() else { return };
                        match std::str::from_utf8(msg.get_payload_bytes()) {
                            Ok(ns) => this.notifier.notify(ns),
                            Err(_) => this.notifier.notify_all(),
                        }
                    }
                    None => break,
                },
                _ = ping.tick() => {
                    // A silent network loss would otherwise leave us subscribed to nothing.
                    match tokio::time::timeout(timeout, sink.ping::<String>()).await {
                        Ok(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
        }
        warn!("redis change subscription lost; reconnecting");
        let Some(this) = inner.upgrade() else { return };
        this.subscribed.store(false, Ordering::Release);
        // Feeds re-read now: they learn of the outage (or the current state).
        this.notifier.notify_all();
    }
}

/// Removes expired pods of the namespaces this process watches, so that a pod
/// that stops reporting wakes StreamIsActive even when nothing else is
/// ingested in its namespace.
async fn sweep(inner: Weak<Inner>, stop: CancellationToken, ttl: Duration) {
    let idle = (ttl / 8).clamp(Duration::from_millis(20), Duration::from_secs(1));
    loop {
        let mut wait = idle;
        {
            let Some(this) = inner.upgrade() else { return };
            let namespaces: HashSet<String> = this.notifier.watched().into_iter().collect();
            for ns in namespaces {
                let mut call = this.sweep.prepare_invoke();
                for k in keys(&this.prefix, &ns) {
                    call.key(k);
                }
                call.arg(this.ttl_ms).arg(&this.channel).arg(&ns);
                match this.eval_write::<(i64, i64)>(&call).await {
                    Ok((removed, next_in)) => {
                        if removed > 0 {
                            this.notifier.notify(&ns);
                        }
                        if next_in >= 0 {
                            // Wake just after the next pod expires.
                            wait = wait.min(Duration::from_millis(next_in as u64 + 1));
                        }
                    }
                    Err(e) => debug!(namespace = %ns, error = %e, "expiry sweep failed"),
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_string_reads_the_value_off_a_state() {
        assert_eq!(
            super::first_string(r#"["3","http.inbound_0.0.0.0_8080;.downstream_rq_active","3"]"#),
            Some("3")
        );
        assert_eq!(super::first_string(r#"[ "0.5" ]"#), Some("0.5"));
        assert_eq!(super::first_string(r#"["0"]"#), Some("0"));
        for bad in [
            r#"[]"#,
            r#"[3]"#,
            r#"["3"#,
            r#"{"a":"3"}"#,
            "",
            r#"["a\"b"]"#,
        ] {
            assert_eq!(super::first_string(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn route_entries_parse_reduce_and_reject_garbage() {
        let w = |secs| {
            Some(Window {
                length: Duration::from_secs(secs),
                reduce: window::WindowReduce::Max,
            })
        };
        // Seen at 5 s; 4 from 1 s, 0 from 3 s.
        let e = "5000 1000 4 3000 0";
        assert_eq!(entry_load(e, 5000, None).unwrap(), 0.0);
        assert_eq!(entry_load(e, 5000, w(10)).unwrap(), 4.0, "the peak stays");
        assert_eq!(
            entry_load(e, 20_000, w(10)).unwrap(),
            0.0,
            "until it ages out"
        );
        for bad in ["5000", "5000 1000", "5000 x 1", ""] {
            assert!(
                matches!(entry_load(bad, 0, None), Err(StoreError::Corrupt(_))),
                "{bad}"
            );
        }
        let raw: Vec<String> = ["6000", "30", "6000 0 2", "6000 0 3"]
            .map(String::from)
            .into();
        assert_eq!(
            route_load_of(&raw, None).unwrap(),
            (Duration::from_secs(30), 5.0)
        );
        assert!(route_load_of(&raw[..1], None).is_err());
        assert_eq!(route_key("as", "shop"), "{as:shop}:rt");
        assert!(!keys("as", "shop").contains(&route_key("as", "shop")));
    }

    #[test]
    fn namespace_keys_share_one_hash_tag() {
        let k = keys("as", "shop");
        assert_eq!(k[0], "{as:shop}:seen");
        // Lua's KEYS[10]: record.lua, sweep.lua and read.lua name it so.
        assert_eq!(k[9], "{as:shop}:rep");
        assert!(k.iter().all(|k| k.starts_with("{as:shop}:")));
    }

    #[test]
    fn identity_is_deterministic_and_round_trips() {
        let pod = PodIdentity {
            namespace: "ns".into(),
            name: "p".into(),
            workload: Some("web".into()),
            labels: Arc::new(
                [("b", "2"), ("a", "1")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
            ),
        };
        let json = identity_json(&pod);
        assert_eq!(json, r#"{"w":"web","l":{"a":"1","b":"2"}}"#);
        let back: StoredIdentity = serde_json::from_str(&json).unwrap();
        assert_eq!(&*back.l, &*pod.labels);
    }

    #[test]
    fn snapshot_parses_and_rejects_garbage() {
        let s = |x: &str| Some(x.to_string());
        let raw = vec![
            s("1000"),
            s("42"),
            s("p1"),
            s("990"),
            s(r#"{"w":null,"l":{}}"#),
            s(r#"["3","a","1","b","2"]"#),
            s(r#"["900","1","950","3"]"#),
        ];
        let snap = Snapshot::parse("ns", raw.clone(), false).unwrap();
        assert_eq!(snap.now_ms, 1000);
        let p = &snap.pods[0];
        assert_eq!((p.value, p.last_seen_ms), (3.0, 990));
        assert_eq!(
            p.families,
            vec![("a".to_string(), 1.0), ("b".to_string(), 2.0)]
        );
        // The per-pod answer reduces the history as `values_of` does:
        // [900, 1000] holds 1 for 50 ms, then 3 for 50 ms.
        let avg = window::Window {
            length: Duration::from_millis(100),
            reduce: window::WindowReduce::Avg,
        };
        let views = views_of(
            Snapshot::parse("ns", raw.clone(), false).unwrap(),
            None,
            Some(avg),
        );
        assert_eq!(
            (views[0].identity.name.as_str(), views[0].value),
            ("p1", 2.0)
        );
        let views = views_of(
            Snapshot::parse("ns", raw.clone(), false).unwrap(),
            None,
            None,
        );
        assert_eq!(views[0].value, 3.0, "no window: the value now");
        assert_eq!(views[0].replica, None, "not asked for");
        // Asked for: a sixth field per pod, shared between pods, nil when
        // nothing recorded one; missing is a short reply.
        let mut with = raw.clone();
        with.push(s("activescale-0"));
        with.extend(
            raw[2..]
                .iter()
                .cloned()
                .map(|f| f.map(|f| f.replace("p1", "p2"))),
        );
        with.push(s("activescale-0"));
        with.extend(
            raw[2..]
                .iter()
                .cloned()
                .map(|f| f.map(|f| f.replace("p1", "p3"))),
        );
        with.push(None);
        let views = views_of(
            Snapshot::parse("ns", with.clone(), true).unwrap(),
            None,
            None,
        );
        let reps: Vec<_> = views.iter().map(|v| v.replica.as_deref()).collect();
        assert_eq!(reps, [Some("activescale-0"), Some("activescale-0"), None]);
        assert!(Arc::ptr_eq(
            views[0].replica.as_ref().unwrap(),
            views[1].replica.as_ref().unwrap()
        ));
        assert!(matches!(
            Snapshot::parse("ns", with[..with.len() - 1].to_vec(), true),
            Err(StoreError::Corrupt(_))
        ));
        // The values-only path: uptime, selector, and the history for a window.
        let query = |window| PodQuery {
            namespace: "ns".into(),
            selector: PodSelector::Workload("web".into()),
            window,
        };
        assert_eq!(
            values_of("ns", raw.clone(), &query(None)).unwrap(),
            (Duration::from_secs(42), vec![]),
            "workload null does not match `web`"
        );
        let mut all = query(Some(window::Window {
            length: Duration::from_millis(80),
            reduce: window::WindowReduce::Max,
        }));
        all.selector = PodSelector::Labels(crate::selector::Selector::parse("!x").unwrap());
        // Window [920, 1000]: 1.0 holds from 900 until 950, then 3.0.
        assert_eq!(values_of("ns", raw.clone(), &all).unwrap().1, vec![3.0]);
        all.window = None;
        assert_eq!(values_of("ns", raw, &all).unwrap().1, vec![3.0]);
        let bad = vec![
            s("1000"),
            s("1"),
            s("p1"),
            s("990"),
            s("{}"),
            s(r#"["x"]"#),
            None,
        ];
        assert!(matches!(
            Snapshot::parse("ns", bad, false),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            Snapshot::parse("ns", vec![s("1000"), s("p1")], false),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn groups_parse_and_reject_garbage() {
        let s = |x: &str| Some(x.to_string());
        let json = r#"{"w":"web","l":{"app":"web"}}"#;
        let (uptime, groups) = groups_of(
            "ns",
            vec![
                s("1000"),
                s("42"),
                s("ok"),
                s("ab"),
                s(json),
                s("7"),
                s("2"),
            ],
        )
        .unwrap();
        assert_eq!(uptime, Duration::from_secs(42));
        assert_eq!(
            groups.unwrap(),
            vec![Group {
                id: "ab".into(),
                json: json.into(),
                sum: 7.0,
                count: 2
            }]
        );
        assert_eq!(
            groups_of("ns", vec![s("1000"), s("42"), s("stale")]).unwrap(),
            (Duration::from_secs(42), None)
        );
        assert!(
            groups_of("ns", vec![s("1000"), s("42"), s("ok")])
                .unwrap()
                .1
                .unwrap()
                .is_empty()
        );
        for bad in [
            vec![s("1000"), s("42")],
            vec![s("1000"), s("42"), s("what")],
            vec![s("1000"), s("42"), s("ok"), s("ab"), s(json), s("7")],
            vec![s("1000"), s("42"), s("ok"), s("ab"), None, s("7"), s("2")],
            vec![
                s("1000"),
                s("42"),
                s("ok"),
                s("ab"),
                s(json),
                s("x"),
                s("2"),
            ],
            vec![
                s("1000"),
                s("42"),
                s("ok"),
                s("ab"),
                s(json),
                s("7"),
                s("-1"),
            ],
            vec![s("1000"), s("x"), s("ok")],
        ] {
            assert!(
                matches!(groups_of("ns", bad.clone()), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_refusals_to_write_count_as_failing_writes() {
        for code in ["OOM", "READONLY", "NOREPLICAS", "MISCONF", "NOPERM"] {
            assert!(refuses_writes(Some(code)), "{code}");
        }
        // A script's own error on bad input, a missing script, a loading
        // server, a connection error: not the write path refusing.
        for code in [Some("ERR"), Some("NOSCRIPT"), Some("LOADING"), None] {
            assert!(!refuses_writes(code), "{code:?}");
        }
    }

    #[test]
    fn reads_resume_after_a_success_and_the_hold_since_the_last_refusal() {
        let hold = 10_000;
        // Refused at 100, nothing succeeded since.
        assert!(!recovered(100, 0, 50_000, hold));
        assert!(
            !recovered(100, 90, 50_000, hold),
            "success before the refusal"
        );
        // A success since, but the hold is not over.
        assert!(!recovered(100, 200, 5_000, hold));
        assert!(recovered(100, 200, 10_100, hold));
        // Flapping: every refusal restarts the hold.
        assert!(!recovered(9_000, 8_000, 10_100, hold));
        assert!(!recovered(9_000, 9_500, 10_100, hold));
        assert!(recovered(9_000, 9_500, 19_000, hold));
        // Without a hold (warmup 0), the first success is enough.
        assert!(recovered(100, 101, 101, 0));
        assert!(!recovered(100, 100, 101, 0));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(0) < backoff(1));
        assert_eq!(backoff(30), Duration::from_secs(3));
    }
}
