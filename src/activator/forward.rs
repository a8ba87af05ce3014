//! Forwarding a request to the upstream and its response back.
//!
//! - HTTP/1.1 requests go over HTTP/1.1 connections from a small idle pool
//!   per route (at most [`MAX_IDLE`] kept, each for at most [`IDLE_TIMEOUT`]).
//! - Requests that arrived over HTTP/2 (gRPC) go over one shared HTTP/2
//!   prior-knowledge connection per route, so response trailers pass through.
//! - HTTP/1.1 `Upgrade` requests (WebSocket) get a connection of their own;
//!   on `101` the caller copies bytes both ways.
//!
//! We connect ourselves instead of using a pooled client so that a connect
//! that fails hands the request back: nothing was sent, the request is held
//! again and the route flips to not ready. A pooled connection that turns out
//! closed before the request went out is retried on a fresh one.
//!
//! Headers: the RFC 9110 §7.6.1 hop-by-hop set and whatever `Connection`
//! lists are removed in both directions, plus `Proxy-Authorization` /
//! `Proxy-Authenticate` (credentials meant for a proxy, as Go's reverse proxy
//! does); `Upgrade` and `Connection: upgrade` are kept for upgrades and
//! `TE: trailers` for HTTP/2 (gRPC needs it). `X-Forwarded-For` is extended
//! with the client's address, `X-Forwarded-Proto` set to `http` unless an
//! earlier proxy set it, and a `Forwarded` element appended (RFC 7239).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use http_body::{Body, Frame, SizeHint};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    client::conn::{http1, http2},
    header::{self, HeaderName, HeaderValue},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Flight, RouteState, until::Busy};

/// Idle HTTP/1.1 connections kept per route.
pub(crate) const MAX_IDLE: usize = 128;
/// An idle HTTP/1.1 connection older than this is closed rather than reused
/// (shorter than most servers' keep-alive, so we rarely race their close).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Upstream HTTP/2 windows: enough for cluster round trips, and a bound on
/// what a slow-reading client makes us buffer per stream.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;

/// Why a forward did not produce a response.
// The request travels back by value on the rare refused path; boxing it
// would cost an allocation there for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum ForwardError {
    /// Nothing was sent: the TCP connect was refused, failed or timed out.
    /// Here is the request back, to be held again.
    NotSent(Request<Incoming>, io::Error),
    /// The upstream accepted the connection and then failed (before or
    /// after the request went out): 502, not held again, so that a broken
    /// upstream is not retried until the hold timeout says something else.
    Failed(String),
}

/// A connection that could not be set up.
enum Setup {
    /// The TCP connect itself: the upstream is not there (yet).
    Connect(io::Error),
    /// Connected, then the HTTP handshake failed.
    Handshake(String),
}

impl Setup {
    fn into_error(self, req: Request<Incoming>) -> ForwardError {
        match self {
            Setup::Connect(e) => ForwardError::NotSent(req, e),
            Setup::Handshake(e) => ForwardError::Failed(e),
        }
    }
}

/// How a request travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Http1,
    Http2,
    Upgrade,
}

/// One route's upstream connections.
pub(crate) struct Upstream {
    idle: Mutex<Vec<Idle>>,
    /// Idle connections of the plain HTTP/1.1 path ([`super::relay`]): bare
    /// sockets between two exchanges.
    raw: Mutex<Vec<(Instant, TcpStream)>>,
    /// The shared HTTP/2 connection; an async lock so that requests arriving
    /// together wait for one new connection instead of each opening one.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
    connect_timeout: Duration,
    keepalive: (Duration, Duration),
    /// Closes every upstream connection when the activator stops.
    stop: CancellationToken,
}

struct Idle {
    since: Instant,
    sender: http1::SendRequest<Incoming>,
}

impl Upstream {
    pub(crate) fn new(
        connect_timeout: Duration,
        keepalive: (Duration, Duration),
        stop: CancellationToken,
    ) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            raw: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            connect_timeout,
            keepalive,
            stop,
        }
    }

    /// Sends `req` to `addr`; for HTTP/1.1 also returns the connection, to
    /// be given back with [`Upstream::checkin`] once the response body ends.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Incoming>,
        kind: Kind,
    ) -> Result<(Response<Incoming>, Option<http1::SendRequest<Incoming>>), ForwardError> {
        match kind {
            Kind::Http1 => self.send_h1(addr, req).await,
            Kind::Http2 => self.send_h2(addr, req).await.map(|r| (r, None)),
            Kind::Upgrade => self.send_upgrade(addr, req).await.map(|r| (r, None)),
        }
    }

    async fn send_h1(
        &self,
        addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, Option<http1::SendRequest<Incoming>>), ForwardError> {
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(s) => (s, true),
                None => match self.connect_h1(addr, false).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(e.into_error(req)),
                },
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(sender))),
                Err(mut e) => match e.take_message() {
                    // The pooled connection closed before the request went
                    // out: try again (the pool shrinks each time round).
                    Some(back) if pooled => req = back,
                    _ => return Err(ForwardError::Failed(e.into_error().to_string())),
                },
            }
        }
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        loop {
            let (mut sender, fresh) = match self.h2_sender(addr).await {
                Ok(s) => s,
                Err(e) => return Err(e.into_error(req)),
            };
            if let Err(e) = sender.ready().await {
                self.forget_h2(&sender).await;
                if fresh {
                    return Err(ForwardError::Failed(e.to_string()));
                }
                // The shared connection went away: open a new one.
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => {
                        self.forget_h2(&sender).await;
                        req = back;
                    }
                    _ => return Err(ForwardError::Failed(e.into_error().to_string())),
                },
            }
        }
    }

    async fn send_upgrade(
        &self,
        addr: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let mut sender = match self.connect_h1(addr, true).await {
            Ok(s) => s,
            Err(e) => return Err(e.into_error(req)),
        };
        sender
            .try_send_request(req)
            .await
            .map_err(|e| ForwardError::Failed(e.into_error().to_string()))
    }

    /// A fresh HTTP/1.1 connection, ready to take a request.
    async fn connect_h1(
        &self,
        addr: SocketAddr,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Incoming>, Setup> {
        let tcp = connect(addr, self.connect_timeout)
            .await
            .map_err(Setup::Connect)?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Setup::Handshake(e.to_string()))?;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let result = if upgrades {
                tokio::select! {
                    r = conn.with_upgrades() => r,
                    _ = stop.cancelled() => Ok(()),
                }
            } else {
                tokio::select! {
                    r = conn => r,
                    _ = stop.cancelled() => Ok(()),
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "upstream connection ended");
            }
        });
        // The connection task must run once before a request can be handed over.
        sender
            .ready()
            .await
            .map_err(|e| Setup::Handshake(e.to_string()))?;
        Ok(sender)
    }

    /// The shared HTTP/2 connection, opened if there is none; `true` when new.
    async fn h2_sender(
        &self,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<Incoming>, bool), Setup> {
        let mut slot = self.h2.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
        {
            return Ok((s.clone(), false));
        }
        let tcp = connect(addr, self.connect_timeout)
            .await
            .map_err(Setup::Connect)?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .keep_alive_interval(self.keepalive.0)
            .keep_alive_timeout(self.keepalive.1)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Setup::Handshake(e.to_string()))?;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    debug!(error = %e, "upstream HTTP/2 connection ended");
                },
                _ = stop.cancelled() => {}
            }
        });
        *slot = Some(sender.clone());
        Ok((sender, true))
    }

    async fn forget_h2(&self, broken: &http2::SendRequest<Incoming>) {
        let mut slot = self.h2.lock().await;
        // Only if nobody replaced it meanwhile.
        if slot
            .as_ref()
            .is_some_and(|s| s.is_closed() || broken.is_closed())
        {
            *slot = None;
        }
    }

    /// An idle HTTP/1.1 connection that can take a request now, newest first.
    fn checkout(&self) -> Option<http1::SendRequest<Incoming>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut entry) = idle.pop() {
            if entry.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            if let Some(Ok(())) = entry.sender.ready().now_or_never() {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Gives back a connection whose response has been read to the end.
    pub(crate) fn checkin(&self, sender: http1::SendRequest<Incoming>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle {
            since: Instant::now(),
            sender,
        });
    }

    /// Closes idle connections past [`IDLE_TIMEOUT`] or closed by the upstream.
    pub(crate) fn prune(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|e| e.since.elapsed() <= IDLE_TIMEOUT && !e.sender.is_closed());
        drop(idle);
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        raw.retain(|(since, _)| since.elapsed() <= IDLE_TIMEOUT);
    }

    /// An idle bare connection that `alive` accepts, newest first.
    pub(crate) fn checkout_raw(&self, alive: impl Fn(&TcpStream) -> bool) -> Option<TcpStream> {
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((since, stream)) = raw.pop() {
            if since.elapsed() <= IDLE_TIMEOUT && alive(&stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Gives back a bare connection between two exchanges (unless stopping).
    pub(crate) fn checkin_raw(&self, stream: TcpStream) {
        if self.stop.is_cancelled() {
            return;
        }
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        if raw.len() >= MAX_IDLE {
            raw.remove(0);
        }
        raw.push((Instant::now(), stream));
    }
}

/// A TCP connection to `addr` within `timeout`, Nagle off.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )
        })??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

// ---- headers ------------------------------------------------------------

/// Hop-by-hop fields (RFC 9110 §7.6.1) and proxy credentials.
pub(super) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// What [`strip_hop_by_hop`] found before removing it.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HopByHop {
    /// `Connection` listed `upgrade`.
    pub(crate) connection_upgrade: bool,
    /// The `Upgrade` field.
    pub(crate) upgrade: Option<HeaderValue>,
    /// `TE` listed `trailers`.
    pub(crate) te_trailers: bool,
}

fn tokens(values: header::GetAll<'_, HeaderValue>) -> impl Iterator<Item = &str> {
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether `name` is one of [`HOP_BY_HOP`] (compared as parsed: standard
/// names are an enum, the two others short strings).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Removes hop-by-hop fields and those `Connection` names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) -> HopByHop {
    // Most requests and responses carry none: one pass over the names
    // instead of a lookup (and a removal attempt) per hop-by-hop name.
    // `Connection` is itself hop-by-hop, so without one nothing is listed.
    if !headers.keys().any(is_hop_by_hop) {
        return HopByHop::default();
    }
    let mut found = HopByHop {
        te_trailers: tokens(headers.get_all(header::TE)).any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        }),
        ..HopByHop::default()
    };
    let mut listed: Vec<HeaderName> = Vec::new();
    for token in tokens(headers.get_all(header::CONNECTION)) {
        if token.eq_ignore_ascii_case("upgrade") {
            found.connection_upgrade = true;
        } else if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
            // The target host is never hop-by-hop, whatever a client lists.
            && name != header::HOST
        {
            listed.push(name);
        }
    }
    for name in listed {
        headers.remove(name);
    }
    found.upgrade = headers.remove(header::UPGRADE);
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    found
}

/// A client connection's address as the forwarding headers spell it,
/// formatted once per connection rather than once per request.
pub(crate) struct Client {
    /// For `X-Forwarded-For`: `10.1.2.3`, `::1`.
    pub(super) addr: String,
    /// The `Forwarded` element's start: `for=10.1.2.3`, `for="[::1]"`.
    pub(super) forwarded_for: String,
}

impl Client {
    pub(crate) fn new(peer: IpAddr) -> Self {
        Self {
            addr: peer.to_string(),
            forwarded_for: match peer {
                IpAddr::V4(ip) => format!("for={ip}"),
                IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
            },
        }
    }
}

/// Rewrites a client's request for the upstream; `Some(kind)` with the
/// downstream upgrade handle for upgrade requests.
pub(crate) fn prepare(
    req: &mut Request<Incoming>,
    client: &Client,
) -> (Kind, Option<hyper::upgrade::OnUpgrade>) {
    let h2 = req.version() == Version::HTTP_2;
    let hop = strip_hop_by_hop(req.headers_mut());
    let mut kind = if h2 { Kind::Http2 } else { Kind::Http1 };
    let mut on_upgrade = None;
    if !h2
        && hop.connection_upgrade
        && let Some(upgrade) = hop.upgrade
    {
        let headers = req.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
        on_upgrade = Some(hyper::upgrade::on(&mut *req));
        kind = Kind::Upgrade;
    }
    if h2 && hop.te_trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !h2 {
        // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2);
        // the upstream gets origin form. The usual origin-form target is
        // left as it is (not re-parsed).
        if let Some(authority) = req.uri().authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = None;
            parts.authority = None;
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
        }
        *req.version_mut() = Version::HTTP_11;
    }
    add_forwarding(req, client);
    (kind, on_upgrade)
}

/// Copies an HTTP/1.1 request head's target and header values out of the
/// connection's read buffer into one small allocation of their own.
///
/// Why: hyper parses HTTP/1.1 heads zero-copy, each value a slice of the
/// connection's 8 KiB read buffer, so a held request pins that buffer; and
/// hyper, reading on to notice a client that hangs up, then has to allocate
/// a second 8 KiB one. With the head copied (a few hundred bytes) the buffer
/// is hyper's alone again and is reused in place. Must run inside the
/// service's `call`, before hyper reads on. HTTP/2 heads are HPACK-decoded
/// into buffers of their own and are left alone.
pub(crate) fn own_head<B>(req: &mut Request<B>) {
    if req.version() == Version::HTTP_2 {
        return;
    }
    let target = req.uri().to_string();
    let values: usize = req.headers().values().map(HeaderValue::len).sum();
    let mut buf = BytesMut::with_capacity(target.len() + values);
    buf.extend_from_slice(target.as_bytes());
    for v in req.headers().values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let all = buf.freeze();
    // Both are re-parsed from identical bytes, so neither can fail; if one
    // did, the original (zero-copy) part is kept: correct, just larger.
    if let Ok(uri) = Uri::from_maybe_shared(all.slice(..target.len())) {
        *req.uri_mut() = uri;
    }
    let mut at = target.len();
    for v in req.headers_mut().values_mut() {
        let end = at + v.len();
        if let Ok(mut owned) = HeaderValue::from_maybe_shared(all.slice(at..end)) {
            owned.set_sensitive(v.is_sensitive());
            *v = owned;
        }
        at = end;
    }
}

/// Appends this hop to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto` when no earlier proxy did. Both values are written
/// into one buffer (one allocation), then split.
pub(crate) fn add_forwarding<B>(req: &mut Request<B>, client: &Client) {
    let xff = HeaderName::from_static("x-forwarded-for");
    // The Forwarded element's host: the HTTP/2 authority, else Host.
    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    });
    let host = host.filter(|h| h.bytes().all(|b| b.is_ascii_graphic()));
    let earlier: usize = req
        .headers()
        .get_all(&xff)
        .iter()
        .map(|v| v.len() + 2)
        .sum();
    let mut buf = BytesMut::with_capacity(
        earlier
            + client.addr.len()
            + client.forwarded_for.len()
            + host.map_or(0, |h| h.len() + 8)
            + 12,
    );
    // Earlier values, each trimmed, empty ones left out.
    for v in req.headers().get_all(&xff) {
        if let Ok(v) = v.to_str().map(str::trim)
            && !v.is_empty()
        {
            buf.extend_from_slice(v.as_bytes());
            buf.extend_from_slice(b", ");
        }
    }
    buf.extend_from_slice(client.addr.as_bytes());
    let xff_len = buf.len();
    buf.extend_from_slice(client.forwarded_for.as_bytes());
    if let Some(host) = host {
        buf.extend_from_slice(b";host=");
        push_quoted_if_needed(&mut buf, host);
    }
    buf.extend_from_slice(b";proto=http");
    let all = buf.freeze();
    let headers = req.headers_mut();
    if let Ok(v) = HeaderValue::from_maybe_shared(all.slice(..xff_len)) {
        headers.insert(xff, v);
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if !headers.contains_key(&xfp) {
        headers.insert(xfp, HeaderValue::from_static("http"));
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(all.slice(xff_len..)) {
        headers.append(header::FORWARDED, v);
    }
}

/// An RFC 7230 token as is, anything else as a quoted string, written into
/// `buf` without an allocation of its own (the relay's per-request path).
pub(super) fn push_quoted_if_needed(buf: &mut impl BufMut, s: &str) {
    if is_token(s) {
        buf.put_slice(s.as_bytes());
        return;
    }
    buf.put_u8(b'"');
    // Byte by byte: `"` and `\` never occur inside a UTF-8 sequence.
    for b in s.bytes() {
        if b == b'"' || b == b'\\' {
            buf.put_u8(b'\\');
        }
        buf.put_u8(b);
    }
    buf.put_u8(b'"');
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Cleans the upstream's response headers (keeping `Upgrade` on a 101).
pub(crate) fn clean_response(resp: &mut Response<Incoming>) {
    let hop = strip_hop_by_hop(resp.headers_mut());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(upgrade) = hop.upgrade
    {
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

// ---- bodies -------------------------------------------------------------

/// Every response body the activator sends: the upstream's, streamed, or a
/// short text of its own.
pub(crate) struct ProxyBody {
    inner: Inner,
    /// Keeps the client connection's head clock stopped until the body ends.
    busy: Option<Busy>,
}

enum Inner {
    Local(Option<Bytes>),
    Upstream {
        body: Incoming,
        ended: bool,
        /// The HTTP/1.1 connection, given back to the pool when the body ends.
        reuse: Option<(Arc<RouteState>, http1::SendRequest<Incoming>)>,
        /// Counts the request as active until the body is done or dropped.
        _flight: Flight,
    },
}

impl ProxyBody {
    fn new(inner: Inner) -> Self {
        Self { inner, busy: None }
    }

    pub(crate) fn text(text: String) -> Self {
        Self::new(Inner::Local(Some(Bytes::from(text))))
    }

    pub(crate) fn empty() -> Self {
        Self::new(Inner::Local(None))
    }

    /// Counts the response as in flight on its connection until it ends.
    pub(crate) fn busy(mut self, busy: Busy) -> Self {
        self.busy = Some(busy);
        self
    }

    pub(crate) fn upstream(
        body: Incoming,
        flight: Flight,
        reuse: Option<(Arc<RouteState>, http1::SendRequest<Incoming>)>,
    ) -> Self {
        Self::new(Inner::Upstream {
            body,
            ended: false,
            reuse,
            _flight: flight,
        })
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().inner {
            Inner::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream { body, ended, .. } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                if frame.is_none() || body.is_end_stream() {
                    *ended = true;
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Local(bytes) => bytes.is_none(),
            Inner::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Inner::Upstream {
            body, ended, reuse, ..
        } = &mut self.inner
            && (*ended || body.is_end_stream())
            && let Some((route, sender)) = reuse.take()
        {
            route.upstream_pool().checkin(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_and_connection_listed_fields_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("host", "web"),
            ("accept", "*/*"),
        ]);
        let found = strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), vec!["accept", "host"]);
        assert_eq!(found, HopByHop::default());
    }

    #[test]
    fn upgrade_and_te_trailers_are_reported() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("sec-websocket-key", "k"),
        ]);
        let found = strip_hop_by_hop(&mut h);
        assert!(found.connection_upgrade && found.te_trailers);
        assert_eq!(found.upgrade.unwrap(), "websocket");
        assert_eq!(names(&h), vec!["sec-websocket-key"]);
    }

    #[test]
    fn a_client_cannot_strip_the_host() {
        let mut h = headers(&[
            ("connection", "host, content-type"),
            ("host", "web"),
            ("content-type", "x"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), vec!["host"]);
    }

    #[test]
    fn forwarding_headers_extend_the_chain() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
        ]);
        let mut req = Request::builder()
            .header(header::HOST, "web.example.com:8081")
            .body(())
            .unwrap();
        req.headers_mut().extend(h);
        add_forwarding(&mut req, &Client::new("10.1.2.3".parse().unwrap()));
        let h = req.headers();
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            "for=10.1.2.3;host=\"web.example.com:8081\";proto=http"
        );
        // HTTP/2: the host is the authority.
        let mut req = Request::builder()
            .uri("http://web/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        add_forwarding(&mut req, &Client::new("::1".parse().unwrap()));
        let h = req.headers();
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["forwarded"], "for=\"[::1]\";host=web;proto=http");
    }

    #[test]
    fn own_head_copies_target_and_values_out_of_the_read_buffer() {
        let wire = Bytes::from_static(b"GET /a?b=1 HTTP/1.1xweb.example.com*/*");
        let mut req = Request::builder()
            .uri(Uri::from_maybe_shared(wire.slice(4..10)).unwrap())
            .body(())
            .unwrap();
        let h = req.headers_mut();
        h.append(
            header::HOST,
            HeaderValue::from_maybe_shared(wire.slice(20..35)).unwrap(),
        );
        let mut secret = HeaderValue::from_maybe_shared(wire.slice(35..38)).unwrap();
        secret.set_sensitive(true);
        h.append(header::ACCEPT, secret);
        h.append(header::ACCEPT, HeaderValue::from_static("text/plain"));
        let inside = |p: *const u8| wire.as_ptr_range().contains(&p);
        assert!(inside(req.headers()[header::HOST].as_bytes().as_ptr()));

        own_head(&mut req);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()[header::HOST], "web.example.com");
        let accept: Vec<_> = req.headers().get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["*/*", "text/plain"]);
        assert!(accept[0].is_sensitive() && !accept[1].is_sensitive());
        assert!(!inside(req.uri().path().as_ptr()));
        assert!(
            req.headers()
                .values()
                .all(|v| !inside(v.as_bytes().as_ptr()))
        );
    }

    fn quote_if_needed(s: &str) -> String {
        let mut out = Vec::new();
        push_quoted_if_needed(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_if_needed("web"), "web");
        assert_eq!(quote_if_needed("a:1"), "\"a:1\"");
        assert_eq!(quote_if_needed("a\"b"), "\"a\\\"b\"");
    }
}
