//! Builders for the activator tests: the proxy on an ephemeral port, real
//! upstreams (hyper, tonic, tungstenite) started on a port that refused
//! until then, and a plain HTTP/1.1 client.
#![allow(dead_code)]

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use activescale::{
    activator::{Activator, ActivatorSettings, Route, RouteSet},
    config::ActivatorRoute,
    proto::{
        GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse,
        MetricValue, ScaledObjectRef,
        external_scaler_server::{ExternalScaler, ExternalScalerServer},
    },
};
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
    task::{JoinHandle, JoinSet},
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Safety net around anything awaited: a hung test fails instead of hanging.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out waiting for an event")
}

/// A loopback port that refuses connections until an upstream starts on
/// it. It is bound (not listening) from the start, so no other test can take
/// it meanwhile; the first upstream listens on that very socket.
pub struct Port {
    pub n: u16,
    reserved: Mutex<Option<tokio::net::TcpSocket>>,
}

pub fn free_port() -> Port {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    Port {
        n: socket.local_addr().unwrap().port(),
        reserved: Mutex::new(Some(socket)),
    }
}

pub fn route(host: &str, prefix: Option<&str>, port: u16) -> ActivatorRoute {
    ActivatorRoute {
        host: host.into(),
        path_prefix: prefix.map(String::from),
        upstream: format!("127.0.0.1:{port}"),
        namespace: "shop".into(),
    }
}

/// Test settings: the defaults, with faster probes so tests are quick.
pub fn settings(routes: Vec<ActivatorRoute>) -> ActivatorSettings {
    ActivatorSettings {
        config: activescale::config::ActivatorConfig {
            routes,
            max_pending: 1000,
            max_pending_total: 10_000,
            hold_timeout: Duration::from_secs(20),
            probe_interval: Duration::from_millis(25),
            probe_max_interval: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 20_000,
        },
        http2_keepalive_interval: Duration::from_secs(30),
        http2_keepalive_timeout: Duration::from_secs(10),
    }
}

/// The activator serving on `127.0.0.1:0`.
pub struct Proxy {
    pub addr: SocketAddr,
    pub routes: RouteSet,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(settings: ActivatorSettings) -> Self {
        let mut registry = Registry::with_prefix("activescale");
        let activator = Activator::new(settings, &mut registry).expect("valid settings");
        let routes = activator.routes();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(activator.serve(listener, shutdown.clone()));
        Self {
            addr,
            routes,
            registry,
            shutdown,
            task,
        }
    }

    pub fn route(&self, i: usize) -> Route {
        self.routes.get(i).expect("route index").clone()
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

// ---- client -------------------------------------------------------------

pub fn request(method: &str, host: &str, path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

pub fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    request("GET", host, path, "")
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The rest of the body line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> &str {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {:?}", self.body))
    }
}

/// Sends `req` over a new HTTP/1.1 connection to `proxy`.
pub async fn send(proxy: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let tcp = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("a response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("the whole body").to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

// ---- upstreams ----------------------------------------------------------

type Handler = Arc<
    dyn Fn(Request<Incoming>, u64) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// A server on a port the proxy routes to; stopping it closes its listener
/// and every connection it has.
pub struct Upstream {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Listens on `port`: on its reserved socket the first time, by number after.
pub async fn listen(port: &Port) -> TcpListener {
    let reserved = port.reserved.lock().unwrap().take();
    match reserved {
        Some(socket) => socket.listen(1024).expect("listen on the reserved port"),
        None => TcpListener::bind(("127.0.0.1", port.n))
            .await
            .expect("bind the upstream port"),
    }
}

impl Upstream {
    /// Serves `handler` over HTTP/1.1 and HTTP/2 on `port`.
    async fn hyper(port: &Port, handler: Handler) -> Self {
        let listener = listen(port).await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let ids = Arc::new(AtomicU64::new(0));
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => break,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let handler = handler.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let f = handler(req, id);
                        async move { Ok::<_, Infallible>(f.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
            }
            drop(listener);
            conns.shutdown().await;
        });
        Self { stop, task }
    }

    /// Answers with what it received: request line, connection number,
    /// headers (sorted), body; and adds response headers for the hop-by-hop test.
    pub async fn echo(port: &Port) -> Self {
        Self::hyper(
            port,
            Arc::new(|req: Request<Incoming>, conn| {
                Box::pin(async move {
                    let mut text = format!("{} {}\nconn={conn}\n", req.method(), req.uri());
                    let mut headers: Vec<String> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                        .collect();
                    headers.sort();
                    for h in headers {
                        text.push_str(&h);
                        text.push('\n');
                    }
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    text.push_str("body=");
                    text.push_str(&String::from_utf8_lossy(&body.unwrap_or_default()));
                    Response::builder()
                        .header("connection", "x-internal")
                        .header("x-internal", "1")
                        .header("keep-alive", "timeout=5")
                        .header("x-kept", "yes")
                        .body(Full::new(Bytes::from(text)))
                        .unwrap()
                })
            }),
        )
        .await
    }

    /// Answers every request with `name`.
    pub async fn named(port: &Port, name: &'static str) -> Self {
        Self::hyper(
            port,
            Arc::new(move |_req, _conn| {
                Box::pin(async move { Response::new(Full::new(Bytes::from(name))) })
            }),
        )
        .await
    }

    /// Answers `/slow` only after `release` is notified; says on `arrived`
    /// when such a request came in.
    pub async fn gated(port: &Port) -> (Self, mpsc::Receiver<()>, Arc<Notify>) {
        let (tx, rx) = mpsc::channel(16);
        let release = Arc::new(Notify::new());
        let gate = release.clone();
        let upstream = Self::hyper(
            port,
            Arc::new(move |_req, _conn| {
                let (tx, gate) = (tx.clone(), gate.clone());
                Box::pin(async move {
                    let _ = tx.send(()).await;
                    gate.notified().await;
                    Response::new(Full::new(Bytes::from("finally")))
                })
            }),
        )
        .await;
        (upstream, rx, release)
    }

    /// Serves one HTTP/1.1 connection at a time, in accept order, one
    /// request each; returns the paths in the order it served them.
    pub async fn sequential(port: &Port) -> Arc<Mutex<Vec<String>>> {
        let listener = listen(port).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = log.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    log.lock().unwrap().push(req.uri().path().to_string());
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            }
        });
        seen
    }

    /// A WebSocket server echoing every text and binary message.
    pub async fn websocket_echo(port: &Port) -> Self {
        let listener = listen(port).await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => break,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                conns.spawn(async move {
                    // Probe connections close without a handshake: ignored.
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() || m.is_binary() {
                            if ws.send(m).await.is_err() {
                                break;
                            }
                        } else if m.is_close() {
                            break;
                        }
                    }
                });
            }
            conns.shutdown().await;
        });
        Self { stop, task }
    }

    /// A tonic server with a small `ExternalScaler`.
    pub async fn grpc(port: &Port) -> Self {
        let listener = listen(port).await;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ExternalScalerServer::new(TestScaler))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await;
        });
        Self { stop, task }
    }

    /// Closes the listener and every connection; returns once they are gone.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

struct TestScaler;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for TestScaler {
    async fn is_active(
        &self,
        _: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<IsActiveResponse>, Status> {
        Ok(tonic::Response::new(IsActiveResponse { result: true }))
    }

    type StreamIsActiveStream = Stream_<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        _: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<Self::StreamIsActiveStream>, Status> {
        let items = [true, false, true]
            .map(|result| Ok(IsActiveResponse { result }))
            .into_iter()
            .chain([Err(Status::aborted("that is all"))]);
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn get_metric_spec(
        &self,
        _: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<GetMetricSpecResponse>, Status> {
        Err(Status::not_found("no spec here"))
    }

    async fn get_metrics(
        &self,
        req: tonic::Request<GetMetricsRequest>,
    ) -> Result<tonic::Response<GetMetricsResponse>, Status> {
        Ok(tonic::Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: req.into_inner().metric_name,
                metric_value: 42,
                metric_value_float: 42.0,
            }],
        }))
    }

    type StreamMetricSpecStream = Stream_<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        _: tonic::Request<ScaledObjectRef>,
    ) -> Result<tonic::Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

/// Reads one response head (and a `content-length` body) off `conn`.
pub async fn read_response(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return String::from_utf8_lossy(&got[..end + 4 + len]).into_owned();
            }
        }
        let n = within(conn.read(&mut buf)).await.expect("read a response");
        assert!(
            n > 0,
            "connection closed after {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}
