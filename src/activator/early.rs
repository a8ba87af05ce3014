//! Holding a cold HTTP/1.1 request *before* hyper sees its connection.
//!
//! hyper's HTTP/1.1 server gives every connection a fixed 8 KiB read buffer
//! and an 8 KiB write buffer (`INIT_BUFFER_SIZE`, not configurable): most of
//! what a held request cost. Here the first request head is read into a small
//! buffer of our own (1 KiB, growing to the 32 KiB head limit), parsed with
//! `httparse` only far enough to find its route, and, when that route's
//! upstream is not ready, the connection waits in the route's ordinary hold
//! queue with just that buffer, the socket and a queue entry. Once released
//! (or at once, for anything ready, unrouted or unusual) the connection goes
//! to hyper with the bytes already read replayed in front of the socket
//! ([`Rewind`]); the service takes the [`Released`] place for the first
//! request, so it is not held twice and still gets its cold-start header.
//!
//! Answers given before hyper (503 full or draining, 504 timed out) are the
//! same texts as hyper-path ones, written raw with `Connection: close`.

use std::{
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::Sleep,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    Answer, Flight, MAX_HEAD_BYTES, RouteState, Shared, State, Waiting,
    hold::{Admit, Release},
    metrics::RouteMetrics,
    route,
};

/// First size of the head buffer: most request heads fit (curl's is ~80
/// bytes, a browser's under 1 KiB); it doubles up to [`MAX_HEAD_BYTES`].
const INITIAL_HEAD_BUF: usize = 1024;
/// hyper's own HTTP/1.1 header limit: more is hyper's 431 to give.
pub(super) const MAX_HEADERS: usize = 100;
/// Bound on writing one of our raw answers (and lingering after it).
const RAW_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most of a client's unread request we read and drop after such an answer.
const LINGER_BYTES: usize = 64 * 1024;

/// A request held (or admitted) before hyper: its place in the route's
/// counts and line, for the service to take over on the first request.
pub(crate) struct Released {
    pub(crate) flight: Flight,
    pub(crate) seq: u64,
    pub(crate) arrived: Instant,
    /// How long it was held; `None` when the route became ready before it
    /// had to wait (it is then admitted as usual).
    pub(crate) held: Option<Duration>,
}

/// What became of a connection's first head.
pub(crate) enum Early {
    /// Serve with hyper: the bytes read so far, then the socket.
    Hyper(Rewind<TcpStream>, Option<Released>),
    /// Answered, timed out or gone: nothing more to do.
    Done,
}

/// What a (possibly partial) first head calls for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Classified {
    /// Not a whole head yet.
    Partial,
    /// Let hyper decide: malformed, too many headers, no route, CONNECT,
    /// `Expect`, ambiguous framing — anything hyper answers (or proxies) on
    /// its own, exactly as before.
    HandOver,
    /// A plain request for route `i`.
    Route(usize),
}

/// Parses `buf` far enough to route it. Pure: the routing decision only.
pub(crate) fn classify(table: &route::RouteTable, buf: &[u8]) -> Classified {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Classified::Partial,
        Err(_) => Classified::HandOver,
        Ok(httparse::Status::Complete(_)) => route_of(table, &req).unwrap_or(Classified::HandOver),
    }
}

fn route_of(table: &route::RouteTable, req: &httparse::Request<'_, '_>) -> Option<Classified> {
    let (method, path) = (req.method?, req.path?);
    if method == "CONNECT" || !matches!(req.version, Some(0 | 1)) {
        return None;
    }
    let (mut host, mut lengths, mut chunked) = (None, 0, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if host.replace(h.value).is_some() {
                return None; // two Host headers: hyper's (or the upstream's) call
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            // 100-continue is hyper's to answer; a client waiting for it
            // would not send its body anyway.
            return None;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            if h.value.is_empty() || !h.value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            lengths += 1;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    if lengths > 1 || (lengths == 1 && chunked) {
        return None;
    }
    let uri: hyper::Uri = path.parse().ok()?;
    let mut probe = hyper::Request::builder().uri(uri);
    if let Some(h) = host {
        probe = probe.header(
            hyper::header::HOST,
            hyper::header::HeaderValue::from_bytes(h).ok()?,
        );
    }
    let probe = probe.body(()).ok()?;
    let host = route::request_host(&probe).ok()?;
    table.find(&host, probe.uri().path()).map(Classified::Route)
}

impl Shared {
    /// Reads a new HTTP/1.1 connection's first head and holds it here if
    /// its route is not ready. `first` is the connection's head deadline.
    pub(super) async fn early_h1(
        &self,
        mut stream: TcpStream,
        mut first: Pin<&mut Sleep>,
        shutdown: &CancellationToken,
    ) -> Early {
        let mut buf = Vec::with_capacity(INITIAL_HEAD_BUF);
        let route = loop {
            if buf.len() == buf.capacity() {
                if buf.len() >= MAX_HEAD_BYTES {
                    break None; // hyper answers 431
                }
                let grow = (buf.capacity() * 2).min(MAX_HEAD_BYTES) - buf.len();
                buf.reserve_exact(grow);
            }
            tokio::select! {
                r = stream.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Early::Done,
                    Ok(_) => {}
                },
                _ = &mut first => {
                    debug!("no complete request head within header_read_timeout; closing");
                    return Early::Done;
                }
                // Draining: nothing was asked yet, so nothing is owed.
                _ = shutdown.cancelled() => return Early::Done,
                _ = self.stop.cancelled() => return Early::Done,
            }
            match classify(&self.table, &buf) {
                Classified::Partial => {}
                Classified::HandOver => break None,
                Classified::Route(i) => break self.routes.get(i).cloned(),
            }
        };
        match route {
            Some(route) if !route.ready.load(Ordering::Acquire) => {
                self.hold_early(route, stream, buf).await
            }
            _ => Early::Hyper(Rewind::new(buf, stream), None),
        }
    }

    /// Waits in `route`'s hold queue with nothing but the socket, the head
    /// bytes and the queue entry; answers 503/504 raw, or hands over.
    async fn hold_early(
        &self,
        route: Arc<RouteState>,
        stream: TcpStream,
        mut buf: Vec<u8>,
    ) -> Early {
        let arrived = Instant::now();
        let mut flight = Flight::arrive(route.clone());
        let seq = route.seq.fetch_add(1, Ordering::Relaxed);
        let mut rx = match route.admit(seq, false) {
            Admit::Ready => {
                let released = Released {
                    flight,
                    seq,
                    arrived,
                    held: None,
                };
                return Early::Hyper(Rewind::new(buf, stream), Some(released));
            }
            Admit::Full { total } => {
                return raw(stream, &route.metrics, self.full(&route, total)).await;
            }
            Admit::Draining => return raw(stream, &route.metrics, self.draining(&route)).await,
            Admit::Held(rx) => rx,
        };
        flight.set(State::Pending);
        // Only the head is kept while waiting, not the room to grow it.
        buf.shrink_to_fit();
        let waiting = Waiting { route: &route, seq };
        let deadline = tokio::time::Instant::from_std(arrived + self.settings.config.hold_timeout);
        let mut one = [0u8; 1];
        let mut watch_client = true;
        let released = loop {
            tokio::select! {
                r = &mut rx => break r.unwrap_or(Release::Drain),
                _ = tokio::time::sleep_until(deadline) => {
                    drop(waiting);
                    return raw(stream, &route.metrics, self.timed_out(&route)).await;
                }
                // EOF or reset while held: free the place at once. Bytes
                // (a body, a pipelined request) stay in the socket for
                // hyper; readiness would stay set, so stop watching.
                r = stream.peek(&mut one), if watch_client => match r {
                    Ok(0) | Err(_) => {
                        debug!(host = %route.config.host, "client went away while held");
                        return Early::Done;
                    }
                    Ok(_) => watch_client = false,
                },
                // With bytes waiting, ask the kernel whether the peer hung up.
                _ = tokio::time::sleep(HANGUP_CHECK), if !watch_client => {
                    if hung_up(&stream) {
                        debug!(host = %route.config.host, "client went away while held (with bytes unread)");
                        return Early::Done;
                    }
                }
                _ = self.stop.cancelled() => return Early::Done,
            }
        };
        drop(waiting);
        if released == Release::Drain {
            return raw(stream, &route.metrics, self.draining(&route)).await;
        }
        let released = Released {
            flight,
            seq,
            arrived,
            held: Some(arrived.elapsed()),
        };
        Early::Hyper(Rewind::new(buf, stream), Some(released))
    }
}

/// How often a held client with bytes waiting in its socket (a body, a
/// pipelined request) is checked for having hung up: its readiness stays
/// set, so the hang-up cannot be awaited. Bounds how long a gone client is
/// counted as pending.
const HANGUP_CHECK: Duration = Duration::from_millis(250);

/// True when the peer closed or reset the connection, whether or not bytes
/// are still unread: `POLLRDHUP` reports its FIN with data pending, which a
/// read or peek would only see after the data. Zero timeout: never blocks.
#[cfg(target_os = "linux")]
fn hung_up(stream: &TcpStream) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR),
        _ => false,
    }
}

/// Elsewhere there is no `POLLRDHUP`: such a client is found at the hold
/// timeout, as before.
#[cfg(not(target_os = "linux"))]
fn hung_up(_: &TcpStream) -> bool {
    false
}

/// Writes one of our answers as a whole HTTP/1.1 response and closes.
pub(super) async fn raw(mut stream: TcpStream, metrics: &RouteMetrics, answer: Answer) -> Early {
    metrics.answered(answer.status.as_u16());
    let bytes = answer.raw_http1();
    let _ = tokio::time::timeout(RAW_WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await?;
        // Lingering close: closing with unread bytes (a request body) makes
        // the kernel send a reset, which can destroy the answer before the
        // client reads it. Read and drop what it still sends, bounded in
        // bytes here and in time by the timeout around.
        let mut sink = vec![0u8; 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
    Early::Done
}

/// An I/O object that reads `pre` first, then `inner`: the head read
/// before hyper, given back to it. Writes go straight to `inner`.
pub(crate) struct Rewind<T> {
    pre: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(pre: Vec<u8>, inner: T) -> Self {
        Self { pre, at: 0, inner }
    }

    /// The bytes not yet replayed, and the I/O object.
    pub(crate) fn into_parts(mut self) -> (Vec<u8>, T) {
        self.pre.drain(..self.at);
        (self.pre, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.pre.len() {
            let n = (this.pre.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.pre[this.at..this.at + n]);
            this.at += n;
            if this.at == this.pre.len() {
                // Replayed: give the memory back for the connection's life.
                this.pre = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::ActivatorRoute;

    /// Two routes of one host, `/` (0) and `/api` (1); `relay`'s tests too.
    pub(in crate::activator) fn table() -> route::RouteTable {
        route::RouteTable::new(&[
            ActivatorRoute {
                host: "web.example.com".into(),
                path_prefix: None,
                upstream: "up:80".into(),
                namespace: "shop".into(),
            },
            ActivatorRoute {
                host: "web.example.com".into(),
                path_prefix: Some("/api".into()),
                upstream: "api:80".into(),
                namespace: "shop".into(),
            },
        ])
    }

    #[test]
    fn classifies_heads_for_holding_or_hyper() {
        let t = table();
        let c = |s: &str| classify(&t, s.as_bytes());
        assert_eq!(c("GET / HTTP/1.1\r\nHost: web.exa"), Classified::Partial);
        assert_eq!(
            c("GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n"),
            Classified::Route(0)
        );
        assert_eq!(
            c("POST /api/x HTTP/1.1\r\nHost: WEB.example.com:8080\r\nContent-Length: 3\r\n\r\nabc"),
            Classified::Route(1)
        );
        // Absolute form: the target's authority wins over Host.
        assert_eq!(
            c("GET http://web.example.com/api HTTP/1.1\r\nHost: other\r\n\r\n"),
            Classified::Route(1)
        );
        // WebSocket upgrades are held like any request.
        assert_eq!(
            c(
                "GET / HTTP/1.1\r\nHost: web.example.com\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
            ),
            Classified::Route(0)
        );
        for odd in [
            "GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web.example.com\r\nHost: web.example.com\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: -1\r\n\r\n",
            "CONNECT web.example.com:443 HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHo st: web.example.com\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: web.example.com\r\n\r\n",
        ] {
            assert_eq!(c(odd), Classified::HandOver, "{odd:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            c(&format!(
                "GET / HTTP/1.1\r\nHost: web.example.com\r\n{many}\r\n"
            )),
            Classified::HandOver
        );
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_and_writes_through() {
        let (mut client, server) = pair().await;
        let mut io = Rewind::new(b"GET / HTTP/1.1\r\n".to_vec(), server);
        client.write_all(b"Host: a\r\n\r\n").await.unwrap();
        // A small reader sees the replay in pieces, then the socket.
        let mut small = [0u8; 10];
        io.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET / HTTP");
        let mut rest = vec![0u8; 6 + 11];
        io.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"/1.1\r\nHost: a\r\n\r\n");
        assert!(io.pre.is_empty() && io.pre.capacity() == 0);
        io.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 204 No Content\r\n\r\n");
    }
}

#[cfg(test)]
mod held_cost {
    use super::*;
    use crate::{
        activator::{Activator, ActivatorSettings},
        config::ActivatorRoute,
    };

    #[tokio::test]
    async fn a_held_connection_is_a_small_future() {
        let settings = ActivatorSettings {
            config: crate::config::ActivatorConfig {
                routes: vec![ActivatorRoute {
                    host: "web.example.com".into(),
                    path_prefix: None,
                    upstream: "127.0.0.1:1".into(),
                    namespace: "shop".into(),
                }],
                max_pending: 10,
                max_pending_total: 10,
                hold_timeout: Duration::from_secs(30),
                probe_interval: Duration::from_millis(100),
                probe_max_interval: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
                header_read_timeout: Duration::from_secs(1),
                max_connections: 10,
            },
            http2_keepalive_interval: Duration::from_secs(10),
            http2_keepalive_timeout: Duration::from_secs(10),
        };
        let activator = Activator::new(
            settings,
            &mut prometheus_client::registry::Registry::default(),
        )
        .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let first = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(first);
        let stop = CancellationToken::new();
        let waiting = activator.shared.early_h1(server, first.as_mut(), &stop);
        let size = std::mem::size_of_val(&waiting);
        // Debug builds lay futures out generously; hyper's connection
        // future alone is about 2 KiB, its buffers 16 KiB.
        assert!(size < 1536, "the pre-hyper hold future is {size} bytes");
        println!("pre-hyper hold future: {size} bytes");
        drop(waiting);

        // The whole connection task: what every held connection allocates
        // (hyper's connection state is boxed once it is handed over).
        let (_client, server) = (
            TcpStream::connect(l.local_addr().unwrap()).await.unwrap(),
            l.accept().await.unwrap().0,
        );
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let peer = server.peer_addr().unwrap();
        let conn = activator
            .shared
            .clone()
            .connection(server, peer, permit, stop);
        let size = std::mem::size_of_val(&conn);
        assert!(size < 2048, "the connection future is {size} bytes");
        println!("connection future: {size} bytes");
    }

    #[test]
    fn raw_answers_are_whole_http1_responses_that_close() {
        let raw = Answer {
            status: hyper::StatusCode::SERVICE_UNAVAILABLE,
            text: "activator shutting down; retry\n".into(),
            retry_after: true,
        }
        .raw_http1();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = resp.parse(&raw).unwrap() else {
            panic!("partial response");
        };
        assert_eq!(
            (resp.code, resp.reason),
            (Some(503), Some("Service Unavailable"))
        );
        let h = |n: &str| {
            resp.headers
                .iter()
                .find(|h| h.name == n)
                .map(|h| std::str::from_utf8(h.value).unwrap())
        };
        assert_eq!(h("retry-after"), Some("1"));
        assert_eq!(h("connection"), Some("close"));
        assert_eq!(h("content-length"), Some("31"));
        assert_eq!(&raw[len..], b"activator shutting down; retry\n");
    }
}
