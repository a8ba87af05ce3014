//! The activator: a reverse proxy that requests for a scaled-to-zero
//! workload go through. It **holds** a request while the upstream cannot
//! take it, counts it at once (the seam a `source: activator` trigger reads,
//! so KEDA is told within milliseconds), and **forwards** held requests in
//! arrival order the moment a connect probe succeeds.
//!
//! ```text
//!  client ──▶ serve ─▶ route (host, path) ─▶ ready? ──yes──▶ forward ──▶ upstream
//!                           │                  │no                ▲
//!                           │                  ▼                  │
//!                           │           hold queue ──released─────┘
//!                           ▼                  ▲
//!                  Route::watch (pending+active)  probe (connect, ≤100 ms apart while waiting)
//! ```
//!
//! - `route`: matching Host / `:authority` and path prefix.
//! - `hold`: the bounded FIFO of held requests and the readiness flag.
//! - `early`: a cold HTTP/1.1 connection's first request held before
//!   hyper (a few hundred bytes instead of hyper's two 8 KiB buffers).
//! - `relay`: plain HTTP/1.1 requests to a ready route, forwarded in the
//!   client connection's task without hyper (anything else goes to hyper).
//! - `probe`: connect probing and its schedule.
//! - `forward`: HTTP/1.1 pool, HTTP/2, upgrades, hop-by-hop headers.
//! - `metrics`: the `activescale_activator_*` families.
//!
//! Bounds on what clients control: request heads ≤ 32 KiB (HTTP/1.1 read
//! buffer; HTTP/2 header list), at most 100 header fields (hyper's HTTP/1.1
//! default), a head within `header_read_timeout` of connecting or of the
//! previous response, `max_connections` connections, 200 streams per
//! HTTP/2 connection, 64 KiB of unread request body per HTTP/2 stream
//! (1 MiB per connection), held requests per route and in total, hold time,
//! 8 KiB copy buffers each way for upgraded connections, a 16 KiB upstream
//! read buffer per relayed connection (upstream response heads ≤ 32 KiB, at
//! most 8 interim answers), and (held before
//! hyper) 64 KiB read and dropped, within 1 s, after a raw 503/504. Bodies are
//! never buffered: a held request's body is simply not read yet (beyond any
//! bytes that came in the same read as the head, inside its buffer).

mod early;
mod forward;
mod hold;
mod metrics;
mod probe;
mod publish;
mod relay;
mod route;
mod until;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    server::conn::{http1 as server_h1, http2 as server_h2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, warn};

pub use metrics::ActivatorMetrics;
pub use publish::publish;

use crate::{
    config::{self, ActivatorConfig, ActivatorRoute, Config, ConfigError},
    telemetry::RateLimit,
};
use forward::{ForwardError, ProxyBody, Upstream};
use hold::{Admit, HoldQueue, Limits, Release};
use metrics::{Reject, RouteMetrics};
use until::{Check, Event, Idle, Until};

/// Largest request head accepted, HTTP/1.1 and HTTP/2 alike (nginx allows
/// 32 KiB by default, Envoy 60 KiB).
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// HTTP/2 flow-control windows towards clients: what a held stream (or
/// connection) can make us buffer before its body is read.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;
const H2_MAX_STREAMS: u32 = 200;
/// `Retry-After` on our own 503s: the caller should come back soon (or go to
/// another activator replica at once).
const RETRY_AFTER_SECS: &str = "1";
/// Response header giving how long a held request waited, in milliseconds.
pub const COLD_START_HEADER: &str = "x-activescale-cold-start";

/// What the activator needs from the configuration.
#[derive(Clone, Debug)]
/// The activator's settings (see [`ActivatorConfig`]) and the two HTTP/2
/// keepalive ones it shares with the gRPC ports.
pub struct ActivatorSettings {
    pub config: ActivatorConfig,
    /// HTTP/2 pings towards clients and upstreams.
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
}

impl ActivatorSettings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            config: c.activator.clone(),
            http2_keepalive_interval: c.servers.http2_keepalive_interval,
            http2_keepalive_timeout: c.servers.http2_keepalive_timeout,
        }
    }
}

/// Errors building the activator.
#[derive(Debug, thiserror::Error)]
pub enum ActivatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The proxy: its routes and their state. Build with [`Activator::new`],
/// take [`Activator::routes`] handles for whoever reads the counts, then
/// [`Activator::serve`].
pub struct Activator {
    shared: Arc<Shared>,
}

struct Shared {
    settings: ActivatorSettings,
    table: route::RouteTable,
    routes: Vec<Arc<RouteState>>,
    unrouted: RouteMetrics,
    /// HTTP/1.1 and HTTP/2 servers, picked by peeking at a connection's
    /// first bytes; `auto` only for the rare connection whose first bytes
    /// could still become the HTTP/2 preface (see [`sniff`]).
    h1: server_h1::Builder,
    h2: server_h2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
    /// Connection and tunnel tasks; `serve` waits for them on drain.
    tasks: TaskTracker,
    /// Ends everything (connections, tunnels, probes, upstream connections)
    /// when `serve` returns or is dropped.
    stop: CancellationToken,
    accept_errors: RateLimit,
    upstream_errors: RateLimit,
}

/// One route's live state, shared by its requests, its prober and [`Route`]
/// handles.
pub(crate) struct RouteState {
    config: ActivatorRoute,
    /// `config.match_prefix()`, for labels.
    prefix: String,
    pub(crate) upstream: String,
    queue: Mutex<HoldQueue>,
    /// Mirror of the queue's readiness, for the lock-free fast path (the
    /// decision to wait is always taken under the queue lock).
    ready: AtomicBool,
    /// The same, for whoever wants to see it change.
    readiness: watch::Sender<bool>,
    limits: Arc<Limits>,
    /// Arrival numbers: the queue's order.
    seq: AtomicU64,
    /// Addresses the last successful probe reached; requests go round-robin.
    addrs: RwLock<Arc<[SocketAddr]>>,
    next_addr: AtomicUsize,
    /// Pending + active: an atomic, so that a request costs no lock and
    /// wakes nobody unless it crosses zero.
    load: AtomicU64,
    /// Wakes the store publisher when `load` crosses 0 ↔ non-zero (it
    /// re-reads the count on its own while non-zero, see [`publish`]).
    crossed: Notify,
    /// `load` for [`Route::watch`]ers, kept current only while somebody
    /// watches (tests and tools; the request path then pays a lock).
    observed: watch::Sender<u64>,
    /// Highest load since [`Route::take_peak`] last ran.
    peak: AtomicU64,
    /// Wakes the prober: a first request is held, or a connect was refused.
    kick: Notify,
    pool: Upstream,
    metrics: RouteMetrics,
    probe: ProbeSettings,
    /// When the route last stopped being ready, for the log line.
    not_ready_since: Mutex<Option<Instant>>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct ProbeSettings {
    pub(crate) interval: Duration,
    pub(crate) max_interval: Duration,
    pub(crate) timeout: Duration,
}

/// A handle on one route's live numbers: the seam for the `source:
/// activator` trigger and for publishing counts to the shared store.
#[derive(Clone)]
pub struct Route(Arc<RouteState>);

impl Route {
    /// The host as configured (`*.example.com` for a wildcard route).
    pub fn host(&self) -> &str {
        &self.0.config.host
    }

    /// The path prefix as configured.
    pub fn path_prefix(&self) -> Option<&str> {
        self.0.config.path_prefix.as_deref()
    }

    /// The namespace whose triggers may read this route.
    pub fn namespace(&self) -> &str {
        &self.0.config.namespace
    }

    pub fn upstream(&self) -> &str {
        &self.0.upstream
    }

    /// The route as matched, host then path prefix (`web.example.com/api`):
    /// what its count is kept under in the store, the same on every replica.
    pub fn store_key(&self) -> String {
        format!("{}{}", self.0.config.match_host(), self.0.prefix)
    }

    /// Requests held now.
    pub fn pending(&self) -> u64 {
        self.0.metrics.pending.get().max(0) as u64
    }

    /// Requests being forwarded now (until their response ends).
    pub fn active(&self) -> u64 {
        self.0.metrics.active.get().max(0) as u64
    }

    /// Pending + active: what the trigger reads.
    pub fn load(&self) -> u64 {
        self.0.load.load(Ordering::Acquire)
    }

    /// Whether the upstream was last seen accepting connections.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }

    /// Readiness as it changes (false until the first probe succeeds).
    pub fn ready_watch(&self) -> watch::Receiver<bool> {
        self.0.readiness.subscribe()
    }

    /// Pending + active, changed on every arrival and completion: the 0 → 1
    /// of a first held request is visible before that request waits. For
    /// observers (tests, tools): while any receiver lives, every change
    /// takes the channel's lock; the store publisher uses `Route::crossed`.
    pub fn watch(&self) -> watch::Receiver<u64> {
        let rx = self.0.observed.subscribe();
        self.0.observe();
        rx
    }

    /// Completes when pending + active crosses 0 ↔ non-zero (at once if it
    /// did since the previous call returned): the publisher's wake-up, one
    /// waiter per route.
    pub(crate) async fn crossed(&self) {
        self.0.crossed.notified().await
    }

    /// Held requests the upstream has woken for since start (the
    /// `activator_cold_starts_total` counter).
    pub fn cold_starts(&self) -> u64 {
        self.0.metrics.cold_starts.get()
    }

    /// The highest load since the previous call (at least the current one),
    /// so a publisher reading every second still sees a burst in between.
    /// Meant for one reader (the store publisher).
    pub fn take_peak(&self) -> u64 {
        let now = self.load();
        self.0.peak.swap(now, Ordering::AcqRel).max(now)
    }
}

/// Every route of an activator, in config order.
#[derive(Clone)]
pub struct RouteSet(Arc<[Route]>);

impl RouteSet {
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.0.iter()
    }

    pub fn get(&self, i: usize) -> Option<&Route> {
        self.0.get(i)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The route configured with this host and path prefix, compared as
    /// matched (case-insensitive host, unset prefix = `/`, trailing `/`
    /// ignored): how a trigger's `host` / `pathPrefix` finds its route.
    pub fn find(&self, host: &str, path_prefix: Option<&str>) -> Option<&Route> {
        let wanted = ActivatorRoute {
            host: host.to_string(),
            path_prefix: path_prefix.map(String::from),
            upstream: String::new(),
            namespace: String::new(),
        };
        let (host, prefix) = (wanted.match_host(), wanted.match_prefix());
        self.0
            .iter()
            .find(|r| r.0.config.match_host() == host && r.0.prefix == prefix)
    }
}

impl Activator {
    /// Validates the routes and builds per-route state; registers the
    /// `activator_*` metric families into `registry`.
    pub fn new(
        settings: ActivatorSettings,
        registry: &mut Registry,
    ) -> Result<Self, ActivatorError> {
        config::check_activator_routes(&settings.config.routes)?;
        for (name, zero) in [
            ("activator_max_pending", settings.config.max_pending == 0),
            (
                "activator_max_pending_total",
                settings.config.max_pending_total == 0,
            ),
            (
                "activator_max_connections",
                settings.config.max_connections == 0,
            ),
            (
                "activator_hold_timeout",
                settings.config.hold_timeout.is_zero(),
            ),
            (
                "activator_probe_interval",
                settings.config.probe_interval.is_zero(),
            ),
            (
                "activator_connect_timeout",
                settings.config.connect_timeout.is_zero(),
            ),
            (
                "activator_header_read_timeout",
                settings.config.header_read_timeout.is_zero(),
            ),
        ] {
            if zero {
                return Err(ConfigError(format!("{name}: must be greater than 0")).into());
            }
        }
        let metrics = ActivatorMetrics::new(registry);
        let limits = Arc::new(Limits::new(
            settings.config.max_pending,
            settings.config.max_pending_total,
        ));
        let stop = CancellationToken::new();
        let probe = ProbeSettings {
            interval: settings.config.probe_interval,
            max_interval: settings.config.probe_max_interval,
            timeout: settings.config.connect_timeout,
        };
        let routes = settings
            .config
            .routes
            .iter()
            .map(|r| {
                let prefix = r.match_prefix().to_string();
                Arc::new(RouteState {
                    metrics: metrics.route(&r.host, &prefix),
                    prefix,
                    upstream: r.upstream.clone(),
                    config: r.clone(),
                    queue: Mutex::new(HoldQueue::default()),
                    ready: AtomicBool::new(false),
                    readiness: watch::channel(false).0,
                    limits: limits.clone(),
                    seq: AtomicU64::new(0),
                    addrs: RwLock::new(Arc::from(Vec::new())),
                    next_addr: AtomicUsize::new(0),
                    load: AtomicU64::new(0),
                    crossed: Notify::new(),
                    observed: watch::channel(0).0,
                    peak: AtomicU64::new(0),
                    kick: Notify::new(),
                    pool: Upstream::new(
                        settings.config.connect_timeout,
                        (
                            settings.http2_keepalive_interval,
                            settings.http2_keepalive_timeout,
                        ),
                        stop.clone(),
                    ),
                    probe,
                    not_ready_since: Mutex::new(Some(Instant::now())),
                })
            })
            .collect();

        // The same settings three times: hyper-util's auto builder does not
        // hand out its inner builders.
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.config.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .keep_alive_interval(settings.http2_keepalive_interval)
            .keep_alive_timeout(settings.http2_keepalive_timeout);
        let mut h1 = server_h1::Builder::new();
        // The head deadline is ours ([`until`]): hyper's arms a new timer
        // for every request head.
        h1.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        let mut h2 = server_h2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .keep_alive_interval(settings.http2_keepalive_interval)
            .keep_alive_timeout(settings.http2_keepalive_timeout);

        Ok(Self {
            shared: Arc::new(Shared {
                table: route::RouteTable::new(&settings.config.routes),
                unrouted: metrics.unrouted(),
                settings,
                routes,
                h1,
                h2,
                auto,
                tasks: TaskTracker::new(),
                stop,
                accept_errors: RateLimit::new(Duration::from_secs(10)),
                upstream_errors: RateLimit::new(Duration::from_secs(10)),
            }),
        })
    }

    /// Handles on every route, valid for as long as anyone holds them
    /// (also after [`Activator::serve`] took the activator).
    pub fn routes(&self) -> RouteSet {
        RouteSet(self.shared.routes.iter().cloned().map(Route).collect())
    }

    /// Serves `listener` until `shutdown` is cancelled, then drains: stops
    /// accepting, answers held requests 503 at once, and returns when every
    /// in-flight request (and upgraded connection) has finished. Bound the
    /// drain by dropping this future (e.g. `tokio::time::timeout`): that
    /// closes whatever is left.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let shared = self.shared;
        let _stop_on_exit = shared.stop.clone().drop_guard();
        for route in &shared.routes {
            let span = tracing::info_span!("activator_probe", host = %route.config.host, upstream = %route.upstream);
            tokio::spawn(probe::run(route.clone(), shared.stop.clone()).instrument(span));
        }
        let permits = Arc::new(Semaphore::new(shared.settings.config.max_connections));
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, routes = shared.routes.len(), "activator serving");
        }
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        if let Some(n) = shared.accept_errors.check() {
                            warn!(error = %e, suppressed = n, "activator accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let conn = shared
                .clone()
                .connection(stream, peer, permit, shutdown.clone())
                .instrument(tracing::debug_span!("activator_conn", %peer));
            shared.tasks.spawn(conn);
        }
        drop(listener);
        let held: usize = shared.routes.iter().map(|r| r.drain()).sum();
        info!(
            held,
            "activator draining: held requests answered 503, waiting for in-flight ones"
        );
        shared.tasks.close();
        shared.tasks.wait().await;
        info!("activator drained");
    }
}

/// First bytes of every HTTP/2 prior-knowledge connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which server a connection's first bytes call for.
#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    Http1,
    Http2,
    /// Too few bytes to tell, but a prefix of the HTTP/2 preface: let
    /// hyper-util's auto builder read on and decide.
    Unsure,
}

fn sniff(first: &[u8]) -> Sniffed {
    if first.len() >= H2_PREFACE.len() {
        if first[..H2_PREFACE.len()] == H2_PREFACE[..] {
            Sniffed::Http2
        } else {
            Sniffed::Http1
        }
    } else if H2_PREFACE.starts_with(first) {
        Sniffed::Unsure
    } else {
        Sniffed::Http1
    }
}

/// Per-connection facts the request handler needs.
struct ConnCtx {
    /// The client's address, formatted for the forwarding headers.
    client: forward::Client,
    /// A request head arrived (the first-request deadline is met).
    seen: AtomicBool,
    /// The first request's place, when it was held (or admitted) before
    /// hyper: taken by the first `handle`.
    released: Mutex<Option<early::Released>>,
    /// HTTP/1.1: the request-head clock (requests in flight, and since when
    /// none was).
    idle: Arc<Idle>,
}

impl Shared {
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _permit: OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let ctx = Arc::new(ConnCtx {
            client: forward::Client::new(peer.ip()),
            seen: AtomicBool::new(false),
            released: Mutex::new(None),
            idle: Arc::new(Idle::new(self.settings.config.header_read_timeout)),
        });
        let service = {
            let shared = self.clone();
            let ctx = ctx.clone();
            service_fn(move |mut req| {
                // Here, not in the future: hyper reads on as soon as `call`
                // returns (see `own_head`).
                forward::own_head(&mut req);
                let shared = shared.clone();
                let ctx = ctx.clone();
                let busy = ctx.idle.busy();
                async move {
                    let resp = shared.handle(req, &ctx).await;
                    Ok::<_, Infallible>(resp.map(|b| b.busy(busy)))
                }
            })
        };
        // hyper's header timeout starts once it knows the protocol; this one
        // covers the bytes before that (and an HTTP/2 connection that never
        // opens a stream).
        let first = tokio::time::sleep(self.settings.config.header_read_timeout);
        tokio::pin!(first);
        // Peek (not read) to pick the protocol, so that hyper's first read
        // takes the whole request head into its 8 KiB buffer. hyper-util's
        // auto builder reads 24 bytes itself and replays them: hyper's
        // second read then doubles the buffer to 16 KiB, for the life of
        // the connection (half of what a held HTTP/1.1 request cost).
        let mut head = [0u8; H2_PREFACE.len()];
        let sniffed = tokio::select! {
            r = stream.peek(&mut head) => match r {
                Ok(n) if n > 0 => sniff(&head[..n]),
                _ => return,
            },
            _ = &mut first => {
                debug!(%peer, "no request head within header_read_timeout; closing");
                return;
            }
            // Draining: nothing was asked yet, so nothing is owed.
            _ = shutdown.cancelled() => return,
            _ = self.stop.cancelled() => return,
        };
        // After the first head: for HTTP/2 that is all (hyper pings idle
        // connections); for HTTP/1.1 each later head is due within
        // `header_read_timeout` of the previous response ([`Idle`]).
        let first_only = {
            let ctx = ctx.clone();
            move |_| {
                if ctx.seen.load(Ordering::Acquire) {
                    Check::Off
                } else {
                    Check::Expired
                }
            }
        };
        let deadline = first.deadline();
        match sniffed {
            Sniffed::Http1 => {
                let (io, released) = match self.early_h1(stream, first.as_mut(), &shutdown).await {
                    early::Early::Hyper(io, released) => (io, released),
                    early::Early::Done => return,
                };
                // Not held: plain requests are relayed until one is not.
                // Boxed, like hyper's state below, and only once relayed.
                let (io, released) = match released {
                    Some(r) => (io, Some(r)),
                    None => match Box::pin(self.relay_h1(io, &ctx.client, &shutdown)).await {
                        early::Early::Hyper(io, released) => (io, released),
                        early::Early::Done => return,
                    },
                };
                // A whole head (or one hyper is to refuse) was read: the
                // first-request deadline is met, even if it was then held.
                ctx.seen.store(true, Ordering::Release);
                *ctx.released.lock().unwrap_or_else(|e| e.into_inner()) = released;
                ctx.idle.restart();
                let idle = ctx.idle.clone();
                let until = Until::new(
                    &self.stop,
                    &shutdown,
                    tokio::time::Instant::now() + self.settings.config.header_read_timeout,
                    move |now| idle.check(now),
                );
                let conn = self
                    .h1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                // Boxed, so that a connection held before hyper (the task's
                // future, allocated per connection) is sized for waiting,
                // not for hyper's connection state.
                Box::pin(self.drive(conn, |c| c.graceful_shutdown(), peer, until)).await;
            }
            // Boxed as well (one HTTP/2 connection carries many requests;
            // `auto` is rare).
            Sniffed::Http2 => {
                let until = Until::new(&self.stop, &shutdown, deadline, first_only);
                let conn = self.h2.serve_connection(TokioIo::new(stream), service);
                Box::pin(self.drive(conn, |c| c.graceful_shutdown(), peer, until)).await;
            }
            Sniffed::Unsure => {
                let until = Until::new(&self.stop, &shutdown, deadline, first_only);
                let conn = self
                    .auto
                    .serve_connection_with_upgrades(TokioIo::new(stream), service);
                Box::pin(self.drive(conn, |c| c.graceful_shutdown(), peer, until)).await;
            }
        }
    }

    /// Runs one client connection until it ends, the activator stops, its
    /// head deadline passes, or (on `shutdown`) it has shut down gracefully.
    async fn drive<C, E, F>(
        &self,
        conn: C,
        graceful: impl Fn(Pin<&mut C>),
        peer: SocketAddr,
        mut until: Until<F>,
    ) where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
        F: FnMut(tokio::time::Instant) -> Check + Unpin,
    {
        tokio::pin!(conn);
        loop {
            tokio::select! {
                // The connection first: it is what wakes the task.
                biased;
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "activator connection ended");
                    }
                    return;
                }
                event = &mut until => match event {
                    Event::Shutdown => graceful(conn.as_mut()),
                    Event::Deadline => {
                        debug!(%peer, "no request head within header_read_timeout; closing");
                        return;
                    }
                    Event::Stop => return,
                },
            }
        }
    }

    async fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        ctx: &ConnCtx,
    ) -> Response<ProxyBody> {
        ctx.seen.store(true, Ordering::Release);
        let early = ctx
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (route, mut flight, seq, arrived, mut held) = match early {
            // Held before hyper (or admitted there): same place, same clock,
            // and not held a second time.
            Some(e) => (e.flight.route.clone(), e.flight, e.seq, e.arrived, e.held),
            None => {
                let arrived = Instant::now();
                let found = match route::request_host(&req) {
                    Ok(host) => self
                        .table
                        .find(&host, req.uri().path())
                        .ok_or_else(|| host.into_owned()),
                    Err(raw) => Err(raw.into_owned()),
                };
                let route = match found {
                    Ok(i) => self.routes[i].clone(),
                    Err(host) => {
                        self.unrouted.rejected(Reject::NoRoute);
                        return self.local(
                            &self.unrouted,
                            StatusCode::NOT_FOUND,
                            format!("no route for host \"{}\"\n", route::printable(&host)),
                            false,
                        );
                    }
                };
                if req.method() == Method::CONNECT {
                    return self.local(
                        &route.metrics,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "CONNECT is not proxied by the activator\n".into(),
                        false,
                    );
                }
                let flight = Flight::arrive(route.clone());
                let seq = route.seq.fetch_add(1, Ordering::Relaxed);
                (route, flight, seq, arrived, None)
            }
        };
        let (kind, on_upgrade) = forward::prepare(&mut req, &ctx.client);
        let deadline = tokio::time::Instant::from_std(arrived + self.settings.config.hold_timeout);
        let mut requeue = false;
        // Released before hyper: go, whatever readiness says by now.
        let mut go = held.is_some();
        loop {
            if !std::mem::take(&mut go) && (requeue || !route.ready.load(Ordering::Acquire)) {
                match route.admit(seq, requeue) {
                    Admit::Ready => {}
                    Admit::Full { total } => {
                        return self.full(&route, total).respond(&route.metrics);
                    }
                    Admit::Draining => return self.draining(&route).respond(&route.metrics),
                    Admit::Held(rx) => {
                        flight.set(State::Pending);
                        let waiting = Waiting { route: &route, seq };
                        let released = tokio::select! {
                            r = rx => r.unwrap_or(Release::Drain),
                            _ = tokio::time::sleep_until(deadline) => {
                                drop(waiting);
                                return self.timed_out(&route).respond(&route.metrics);
                            }
                        };
                        drop(waiting);
                        if released == Release::Drain {
                            return self.draining(&route).respond(&route.metrics);
                        }
                        held = Some(arrived.elapsed());
                    }
                }
            }
            let Some(addr) = route.pick_addr() else {
                // Ready without an address cannot happen; hold again to be safe.
                route.connect_failed(&std::io::Error::other("no probed address"));
                requeue = true;
                continue;
            };
            flight.set(State::Active);
            // Boxed: a held request's future stays small (the connect and
            // handshake states are only allocated once it is forwarded).
            match Box::pin(route.pool.send(addr, req, kind)).await {
                Ok((resp, reuse)) => {
                    return self.respond(&route, resp, reuse, flight, held, on_upgrade);
                }
                Err(ForwardError::NotSent(back, e)) => {
                    route.connect_failed(&e);
                    req = back;
                    requeue = true;
                    if tokio::time::Instant::now() >= deadline {
                        return self.timed_out(&route).respond(&route.metrics);
                    }
                }
                Err(ForwardError::Failed(e)) => {
                    if let Some(n) = self.upstream_errors.check() {
                        warn!(host = %route.config.host, upstream = %route.upstream, error = %e,
                            suppressed = n, "upstream failed a request");
                    }
                    return self.local(
                        &route.metrics,
                        StatusCode::BAD_GATEWAY,
                        format!("upstream {} failed: {e}\n", route.upstream),
                        false,
                    );
                }
            }
        }
    }

    fn respond(
        &self,
        route: &Arc<RouteState>,
        mut resp: Response<Incoming>,
        reuse: Option<hyper::client::conn::http1::SendRequest<Incoming>>,
        flight: Flight,
        held: Option<Duration>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ProxyBody> {
        forward::clean_response(&mut resp);
        if let Some(held) = held {
            resp.headers_mut().insert(
                HeaderName::from_static(COLD_START_HEADER),
                HeaderValue::from(held.as_millis() as u64),
            );
            route.metrics.hold_seconds.observe(held.as_secs_f64());
        }
        route.metrics.answered(resp.status().as_u16());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(down) = on_upgrade
        {
            let up = hyper::upgrade::on(&mut resp);
            self.tasks
                .spawn(tunnel(down, up, flight, self.stop.clone()));
            return resp.map(|_| ProxyBody::empty());
        }
        let reuse = reuse.map(|s| (route.clone(), s));
        resp.map(|body| ProxyBody::upstream(body, flight, reuse))
    }

    fn full(&self, route: &RouteState, total: bool) -> Answer {
        route.metrics.rejected(Reject::Full);
        let (limit, n) = if total {
            (
                "activator_max_pending_total",
                self.settings.config.max_pending_total,
            )
        } else {
            ("activator_max_pending", self.settings.config.max_pending)
        };
        Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            text: format!(
                "too many requests waiting for {} ({limit} {n}); retry later\n",
                route.config.host
            ),
            retry_after: true,
        }
    }

    fn draining(&self, route: &RouteState) -> Answer {
        route.metrics.rejected(Reject::Draining);
        Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            text: "activator shutting down; retry\n".into(),
            retry_after: true,
        }
    }

    fn timed_out(&self, route: &RouteState) -> Answer {
        route.metrics.rejected(Reject::Timeout);
        Answer {
            status: StatusCode::GATEWAY_TIMEOUT,
            text: format!(
                "timed out after {} waiting for the workload behind {} ({}) to accept connections\n",
                humantime::format_duration(self.settings.config.hold_timeout),
                route.config.host,
                route.upstream
            ),
            retry_after: false,
        }
    }

    /// A short text answer of the activator's own.
    fn local(
        &self,
        metrics: &RouteMetrics,
        status: StatusCode,
        text: String,
        retry_after: bool,
    ) -> Response<ProxyBody> {
        Answer {
            status,
            text,
            retry_after,
        }
        .respond(metrics)
    }
}

/// One of the activator's own short text answers, given through hyper or,
/// before hyper ([`early`]), written raw.
struct Answer {
    status: StatusCode,
    text: String,
    /// Send `Retry-After` (our 503s: come back soon, or go to another replica).
    retry_after: bool,
}

impl Answer {
    fn respond(self, metrics: &RouteMetrics) -> Response<ProxyBody> {
        metrics.answered(self.status.as_u16());
        let mut resp = Response::new(ProxyBody::text(self.text));
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }

    /// The same answer as a whole HTTP/1.1 response that closes the
    /// connection (the request's body, if any, was never read).
    fn raw_http1(&self) -> Vec<u8> {
        let retry = if self.retry_after {
            format!("retry-after: {RETRY_AFTER_SECS}\r\n")
        } else {
            String::new()
        };
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\n{retry}content-length: {}\r\nconnection: close\r\n\r\n{}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.text.len(),
            self.text
        )
        .into_bytes()
    }
}

/// Copies bytes both ways between an upgraded client connection and the
/// upstream's until either side closes (its end is passed on to the other
/// side, and the tunnel ends: a peer that never closes its half cannot keep
/// the route counted as active forever), or until the activator stops.
/// `tokio::io::copy` uses one fixed 8 KiB buffer per direction.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    flight: Flight,
    stop: CancellationToken,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let (mut down_r, mut down_w) = tokio::io::split(TokioIo::new(down));
    let (mut up_r, mut up_w) = tokio::io::split(TokioIo::new(up));
    let ended = tokio::select! {
        r = tokio::io::copy(&mut down_r, &mut up_w) => r.map(|_| "client"),
        r = tokio::io::copy(&mut up_r, &mut down_w) => r.map(|_| "upstream"),
        _ = stop.cancelled() => Ok("activator"),
    };
    debug!(?ended, "upgraded connection closed");
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tokio::join!(up_w.shutdown(), down_w.shutdown());
    })
    .await;
    drop(flight);
}

impl RouteState {
    fn admit(&self, seq: u64, requeue: bool) -> Admit {
        let (admit, first) = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let admit = q.admit(seq, requeue, &self.limits);
            let first = matches!(admit, Admit::Held(_)) && q.len() == 1;
            (admit, first)
        };
        if first {
            // Probe now rather than at the next tick.
            self.kick.notify_one();
        }
        admit
    }

    /// Feeds a probe result in; true when readiness changed.
    fn probed(&self, outcome: probe::Outcome) -> bool {
        match outcome {
            Ok(addrs) => {
                if let Ok(mut a) = self.addrs.write() {
                    *a = Arc::from(addrs);
                }
                let (was_ready, waiters) = {
                    let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    let was = q.is_ready();
                    let waiters = q.set_ready(&self.limits);
                    self.ready.store(true, Ordering::Release);
                    self.readiness
                        .send_if_modified(|r| !std::mem::replace(r, true));
                    (was, waiters)
                };
                if !was_ready {
                    let since = self
                        .not_ready_since
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if !waiters.is_empty() {
                        self.metrics.cold_starts.inc();
                    }
                    info!(host = %self.config.host, upstream = %self.upstream, released = waiters.len(),
                        not_ready_for = ?since.map(|t| t.elapsed()), "upstream ready");
                }
                for w in waiters {
                    let _ = w.send(Release::Go);
                }
                !was_ready
            }
            Err(e) => {
                let was = self.set_not_ready();
                if was {
                    info!(host = %self.config.host, upstream = %self.upstream, error = %e,
                        "upstream not ready (probe failed): new requests are held");
                }
                was
            }
        }
    }

    /// A request's connect failed: hold new requests and probe at once.
    fn connect_failed(&self, e: &std::io::Error) {
        if self.set_not_ready() {
            info!(host = %self.config.host, upstream = %self.upstream, error = %e,
                "upstream refused a request's connection: requests are held");
        }
        self.kick.notify_one();
    }

    fn set_not_ready(&self) -> bool {
        let was = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.ready.store(false, Ordering::Release);
            self.readiness
                .send_if_modified(|r| std::mem::replace(r, false));
            q.set_not_ready()
        };
        if was {
            *self
                .not_ready_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        was
    }

    /// Answers every held request 503 and refuses new ones; how many were held.
    fn drain(&self) -> usize {
        let waiters = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(&self.limits);
        let n = waiters.len();
        for w in waiters {
            let _ = w.send(Release::Drain);
        }
        n
    }

    fn pick_addr(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.read().ok()?.clone();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next_addr.fetch_add(1, Ordering::Relaxed) % addrs.len();
        Some(addrs[i])
    }

    fn waiting(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn kicked(&self) -> impl Future<Output = ()> + '_ {
        self.kick.notified()
    }

    fn probe_settings(&self) -> ProbeSettings {
        self.probe
    }

    fn prune_idle(&self) {
        self.pool.prune();
    }

    pub(crate) fn upstream_pool(&self) -> &Upstream {
        &self.pool
    }

    fn enter(&self) {
        let n = self.load.fetch_add(1, Ordering::AcqRel) + 1;
        // A load first: the peak's cache line is only written by a new high.
        if n > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(n, Ordering::AcqRel);
        }
        if n == 1 {
            self.crossed.notify_one();
        }
        self.observe();
    }

    fn leave(&self) {
        let was = self.load.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(was > 0, "a route's load went below zero");
        if was == 1 {
            self.crossed.notify_one();
        }
        self.observe();
    }

    /// Brings [`Route::watch`]ers up to date, if there are any. The count is
    /// re-read under the channel's lock, so that concurrent changes cannot
    /// leave an older value last.
    fn observe(&self) {
        if self.observed.receiver_count() > 0 {
            self.observed.send_if_modified(|seen| {
                let now = self.load.load(Ordering::Acquire);
                std::mem::replace(seen, now) != now
            });
        }
    }
}

/// Removes a held request from its queue if it stops waiting for any reason
/// other than being released (timeout, client gone).
struct Waiting<'a> {
    route: &'a RouteState,
    seq: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut q = self.route.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.remove(self.seq, &self.route.limits);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Arrived,
    Pending,
    Active,
}

/// One request's place in its route's counts, from arrival until its
/// response ends (or its upgraded connection closes): pending + active is
/// the route's load; the gauges say which of the two.
pub(crate) struct Flight {
    route: Arc<RouteState>,
    state: State,
}

impl Flight {
    fn arrive(route: Arc<RouteState>) -> Self {
        route.enter();
        Self {
            route,
            state: State::Arrived,
        }
    }

    fn set(&mut self, state: State) {
        if state == self.state {
            return;
        }
        self.gauge(self.state, -1);
        self.gauge(state, 1);
        self.state = state;
    }

    fn gauge(&self, state: State, by: i64) {
        let g = match state {
            State::Arrived => return,
            State::Pending => &self.route.metrics.pending,
            State::Active => &self.route.metrics.active,
        };
        g.inc_by(by);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.gauge(self.state, -1);
        self.route.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_the_first_bytes() {
        assert_eq!(sniff(H2_PREFACE), Sniffed::Http2);
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"),
            Sniffed::Http2
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"),
            Sniffed::Http1
        );
        assert_eq!(sniff(b"G"), Sniffed::Http1);
        // Could still become the preface: decided later, by hyper-util.
        assert_eq!(sniff(b"PRI * HT"), Sniffed::Unsure);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"), Sniffed::Http1);
        assert_eq!(sniff(b"PRI / HTTP/1.1\r\n"), Sniffed::Http1);
    }
}
