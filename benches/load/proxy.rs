//! `proxy`: the activator's overhead once the upstream is ready, and its
//! cold starts.
//!
//! The load tool runs the upstream itself (hyper, HTTP/1.1 and cleartext
//! HTTP/2 on one port, on a runtime of its own so the clients do not share
//! its workers): `GET` answers `ok\n`, a gRPC call (`content-type:
//! application/grpc`, any method) answers a `grpc.health.v1`
//! `HealthCheckResponse { status: SERVING }`. Then, in one run, 64 HTTP/1.1
//! keep-alive connections and 64 gRPC (h2c) connections each call in a
//! closed loop for `--duration` against the upstream directly, through the
//! activator (a route to the upstream, already ready) and through nginx
//! (`scripts/bench` starts it with `proxy_pass`/`grpc_pass` and upstream
//! keepalive): p50/p99 and requests/s per target, and CPU per request of
//! the proxy (the activator's `--pid`, or nginx's master and workers,
//! `--nginx-pid`) and of the load tool itself (clients and upstream).
//! The targets take turns (`--slices`, default 10 slices of half a second
//! each for 5 s), each on its own connections kept open throughout, so
//! that a burst of other work on the machine lands on every target's
//! figures alike rather than on whichever ran during it.
//!
//! Cold starts (`--cold-starts`, through the activator over HTTP/1.1): the
//! upstream is stopped (listener and connections closed), one request is
//! sent and seen held (the route's pending gauge on the server's /metrics),
//! then the upstream binds again, at a random phase of the probe interval.
//! Timed from the bind to the answer; the part after the probe succeeded is
//! the answer time minus (sent + `X-Activescale-Cold-Start`), an upper
//! bound (the header counts whole milliseconds, rounded down, from when the
//! activator read the request).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, header, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use tokio::{net::TcpStream, runtime::Handle, sync::Mutex};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    Cli, Res,
    prom::jitter,
    report::{
        Call, LoopResult, closed_loop, closed_loop_keeping, cpu_between, emit, nanos, new_hist,
        server_metric_labelled, snap, tree_snap, us,
    },
    sidecars::wait_for,
};

#[derive(Args, Clone)]
pub struct ProxyArgs {
    /// Where the in-process upstream listens (the activator's route and
    /// nginx point here).
    #[arg(long)]
    upstream: SocketAddr,
    /// The activator's port.
    #[arg(long)]
    activator: SocketAddr,
    /// nginx's HTTP/1.1 port (`proxy_pass` to the upstream); unset: skipped.
    #[arg(long)]
    nginx_http: Option<SocketAddr>,
    /// nginx's h2c port (`grpc_pass` to the upstream); unset: skipped.
    #[arg(long)]
    nginx_grpc: Option<SocketAddr>,
    /// nginx's master process: its CPU and its workers' is reported beside
    /// the activator's, so CPU per request compares like with like.
    #[arg(long)]
    nginx_pid: Option<u32>,
    /// The activator route's host (sent as Host / :authority everywhere).
    #[arg(long, default_value = "bench.example.com")]
    host: String,
    /// Client connections, one closed-loop caller each.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds per target and protocol (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The targets take turns in this many slices of `duration / slices`
    /// each, on connections kept open throughout (1: one after another).
    #[arg(long, default_value_t = 10)]
    slices: usize,
    /// Cold starts through the activator (0: none).
    #[arg(long, default_value_t = 20)]
    cold_starts: usize,
    /// The server's `activator_probe_interval`, milliseconds: each cold
    /// start binds at a random phase of it.
    #[arg(long, default_value_t = 100)]
    probe_interval_ms: u64,
}

/// What the upstream's gRPC answer decodes to: `HealthCheckResponse {
/// status: SERVING }` (field 1, varint 1) in a 5-byte gRPC frame.
const GRPC_ANSWER: [u8; 7] = [0, 0, 0, 0, 2, 0x08, 0x01];
const HTTP_ANSWER: &[u8] = b"ok\n";

type UpBody = BoxBody<Bytes, Infallible>;

async fn answer(req: Request<hyper::body::Incoming>) -> Result<Response<UpBody>, Infallible> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // An echo server reads what it is sent (the bench sends small bodies).
    let _ = req.into_body().collect().await;
    let mut trailers = header::HeaderMap::new();
    trailers.insert("grpc-status", header::HeaderValue::from_static("0"));
    let resp = if grpc {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(&GRPC_ANSWER))),
            Ok(Frame::trailers(trailers)),
        ];
        Response::builder()
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
    } else {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Full::new(Bytes::from_static(HTTP_ANSWER)).boxed())
    };
    Ok(resp.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}

/// A runtime of its own for the upstream (two workers), alive until exit.
fn upstream_runtime() -> Res<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("upstream")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        let _ = tx.send(Ok(rt.handle().clone()));
        rt.block_on(std::future::pending::<()>());
    });
    rx.recv().map_err(|e| e.to_string())?
}

/// A running upstream; [`Upstream::stop`] closes its listener and every
/// connection, so the port refuses connections again.
struct Upstream {
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Right after bind + listen: the moment it can take connections.
    bound_at: Instant,
}

impl Upstream {
    fn start(rt: &Handle, addr: SocketAddr) -> Res<Self> {
        // std binds and listens in one call (SO_REUSEADDR set, so the port
        // is free again at once after a stop).
        let listener =
            std::net::TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        let bound_at = Instant::now();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = {
            let _in_rt = rt.enter();
            tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?
        };
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (stop2, tasks2) = (stop.clone(), tasks.clone());
        tasks.spawn_on(
            async move {
                loop {
                    let stream = tokio::select! {
                        _ = stop2.cancelled() => return,
                        r = listener.accept() => match r {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                    };
                    let _ = stream.set_nodelay(true);
                    let stop = stop2.clone();
                    tasks2.spawn(async move {
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn =
                            builder.serve_connection(TokioIo::new(stream), service_fn(answer));
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = conn => {}
                        }
                    });
                }
            },
            rt,
        );
        Ok(Self {
            stop,
            tasks,
            bound_at,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// One HTTP/1.1 keep-alive connection, reconnected after an error.
struct H1 {
    target: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl H1 {
    async fn get(&mut self, host: &str) -> Res<Response<hyper::body::Incoming>> {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let s = TcpStream::connect(self.target)
                    .await
                    .map_err(|e| format!("connecting to {}: {e}", self.target))?;
                let _ = s.set_nodelay(true);
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                sender
            }
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get("/")
            .header(header::HOST, host)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        self.sender = Some(sender);
        Ok(resp)
    }

    /// A GET answered 200 with the upstream's body.
    async fn call(&mut self, host: &str) -> bool {
        let Ok(resp) = self.get(host).await else {
            return false;
        };
        let ok = resp.status().is_success();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        ok && body.is_ok_and(|b| b == HTTP_ANSWER)
    }
}

async fn grpc_channel(target: SocketAddr, host: &str) -> Res<Channel> {
    let origin = format!("http://{host}")
        .parse()
        .map_err(|e| format!("host {host}: {e}"))?;
    Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| e.to_string())?
        .origin(origin)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))
}

/// One target's connections and what they measured so far.
struct Measured {
    name: &'static str,
    clients: Vec<Call>,
    result: LoopResult,
    /// CPU-seconds over its slices; `None` when a snapshot failed (or the
    /// target has no process of its own, like the direct connection).
    proxy_cpu: Option<f64>,
    load_cpu: Option<f64>,
}

async fn callers(protocol: &str, target: SocketAddr, a: &ProxyArgs) -> Res<Vec<Call>> {
    let mut out: Vec<Call> = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let host = a.host.clone();
        if protocol == "http1" {
            let conn = Arc::new(Mutex::new(H1 {
                target,
                sender: None,
            }));
            out.push(Box::new(move || {
                let (conn, host) = (conn.clone(), host.clone());
                Box::pin(async move { conn.lock().await.call(&host).await })
            }));
        } else {
            let client = HealthClient::new(grpc_channel(target, &host).await?);
            out.push(Box::new(move || {
                let mut client = client.clone();
                Box::pin(async move {
                    client
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .is_ok_and(|r| r.into_inner().status == 1)
                })
            }));
        }
    }
    Ok(out)
}

pub async fn proxy(cli: &Cli, a: &ProxyArgs) -> Res {
    let rt = upstream_runtime()?;
    let mut upstream = Upstream::start(&rt, a.upstream)?;
    let mut targets = vec![
        ("direct", Some(a.upstream), Some(a.upstream)),
        ("activator", Some(a.activator), Some(a.activator)),
    ];
    if a.nginx_http.is_some() || a.nginx_grpc.is_some() {
        targets.push(("nginx", a.nginx_http, a.nginx_grpc));
    }
    let slices = a.slices.max(1);
    let slice = Duration::from_secs_f64(a.duration / slices as f64);
    for protocol in ["http1", "grpc"] {
        let mut measured = Vec::new();
        for &(name, http, grpc) in &targets {
            let Some(target) = (if protocol == "http1" { http } else { grpc }) else {
                continue;
            };
            // The first answer through each target (the activator probes
            // the upstream, nginx opens its keepalive pool), then a second
            // of warm-up; the connections measured are opened after it.
            let mut probe = callers(
                protocol,
                target,
                &ProxyArgs {
                    connections: 1,
                    ..a.clone()
                },
            )
            .await?;
            wait_for(
                &format!("{name} to answer {protocol}"),
                Duration::from_secs(30),
                async || probe[0]().await,
            )
            .await?;
            let _ = closed_loop(callers(protocol, target, a).await?, Duration::from_secs(1)).await;
            measured.push(Measured {
                name,
                clients: callers(protocol, target, a).await?,
                result: LoopResult::empty(),
                proxy_cpu: Some(0.0),
                load_cpu: Some(0.0),
            });
        }
        // The targets take turns, a slice each, the first one rotating: a
        // change in what else the machine runs falls on all of them alike.
        let me = Some(std::process::id());
        let n = measured.len();
        for round in 0..slices {
            for j in 0..n {
                let m = &mut measured[(round + j) % n];
                // The proxy's CPU (the activator's process, or nginx's
                // master and workers) and the load tool's own (clients and
                // upstream).
                let proxy_snap = || match m.name {
                    "activator" => snap(cli.pid),
                    "nginx" => tree_snap(a.nginx_pid),
                    _ => None,
                };
                let (p0, l0) = (proxy_snap(), snap(me));
                let (r, clients) = closed_loop_keeping(std::mem::take(&mut m.clients), slice).await;
                m.clients = clients;
                m.proxy_cpu = m
                    .proxy_cpu
                    .zip(cpu_between(p0, proxy_snap()))
                    .map(|(a, b)| a + b);
                m.load_cpu = m
                    .load_cpu
                    .zip(cpu_between(l0, snap(me)))
                    .map(|(a, b)| a + b);
                m.result.add(&r);
            }
        }
        for m in &measured {
            let r = &m.result;
            let per_request = |c: Option<f64>| c.map(|c| c * 1e6 / r.calls.max(1) as f64);
            emit(
                cli,
                json!({
                    "figure": "proxy",
                    "protocol": protocol,
                    "target": m.name,
                    "connections": a.connections,
                    "slices": slices,
                    "requests_per_s": r.per_s(),
                    "p50_us": us(&r.hist, 0.5),
                    "p99_us": us(&r.hist, 0.99),
                    "max_us": r.hist.max() as f64 / 1000.0,
                    "activator_cpu_us_per_request": (m.name == "activator").then(|| per_request(m.proxy_cpu)).flatten(),
                    "proxy_cpu_us_per_request": per_request(m.proxy_cpu),
                    "load_cpu_us_per_request": per_request(m.load_cpu),
                    "failed": r.failures,
                }),
            );
        }
    }
    if a.cold_starts > 0 {
        upstream = cold_starts(cli, a, &rt, upstream).await?;
    }
    upstream.stop().await;
    Ok(())
}

/// `--cold-starts` rounds of stop → one request held → bind → answer.
async fn cold_starts(cli: &Cli, a: &ProxyArgs, rt: &Handle, mut up: Upstream) -> Res<Upstream> {
    if cli.http.is_none() {
        return Err("cold starts read the held count from /metrics: --http is needed".into());
    }
    let label = format!("host=\"{}\"", a.host);
    let held = async || {
        server_metric_labelled(cli.http, "activescale_activator_pending_requests", &label)
            .await
            .unwrap_or(0.0)
    };
    let (mut bind_to_answer, mut probe_to_answer, mut held_h) =
        (new_hist(), new_hist(), new_hist());
    let mut failed = 0u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..a.cold_starts {
        up.stop().await;
        let mut conn = H1 {
            target: a.activator,
            sender: None,
        };
        let host = a.host.clone();
        let sent = Instant::now();
        let request = tokio::spawn(async move {
            let resp = conn.get(&host).await;
            (resp, Instant::now())
        });
        wait_for(
            &format!("cold start {round}: the request to be held"),
            Duration::from_secs(30),
            async || held().await >= 1.0,
        )
        .await?;
        // A held request kicks a probe at once and the next follows one
        // interval later; binding right after seeing it held would always
        // land at the same phase (just after a probe, the worst case).
        tokio::time::sleep(jitter(&mut rng, Duration::from_millis(a.probe_interval_ms))).await;
        up = Upstream::start(rt, a.upstream)?;
        let (resp, answered) = request.await.map_err(|e| e.to_string())?;
        let cold_ms = resp.as_ref().ok().and_then(|r| {
            r.headers()
                .get(activescale::activator::COLD_START_HEADER)?
                .to_str()
                .ok()?
                .parse::<u64>()
                .ok()
        });
        let ok = resp.is_ok_and(|r| r.status().is_success());
        let (true, Some(cold_ms)) = (ok, cold_ms) else {
            failed += 1;
            continue;
        };
        let _ = bind_to_answer.record(nanos(answered - up.bound_at));
        let released = sent + Duration::from_millis(cold_ms);
        let _ = probe_to_answer.record(nanos(answered.saturating_duration_since(released)));
        let _ = held_h.record(cold_ms.max(1) * 1_000_000);
    }
    emit(
        cli,
        json!({
            "figure": "cold_start",
            "rounds": a.cold_starts,
            "samples": bind_to_answer.len(),
            "bind_to_answer_p50_us": us(&bind_to_answer, 0.5),
            "bind_to_answer_p99_us": us(&bind_to_answer, 0.99),
            "bind_to_answer_max_us": bind_to_answer.max() as f64 / 1000.0,
            "probe_to_answer_p50_us": us(&probe_to_answer, 0.5),
            "probe_to_answer_p99_us": us(&probe_to_answer, 0.99),
            "held_p50_ms": us(&held_h, 0.5) / 1000.0,
            "probe_interval_ms": a.probe_interval_ms,
            "failed": failed,
        }),
    );
    Ok(up)
}
