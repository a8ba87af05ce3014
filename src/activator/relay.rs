//! Plain HTTP/1.1 requests to a ready route, relayed without hyper.
//!
//! Why: through hyper a request crosses tasks several times — the server
//! connection hands it to the service, the service to the upstream client
//! connection's own task, whose response head and body come back through
//! channels — and that machinery was what put the activator's HTTP/1.1 p99
//! above nginx's (BENCHMARKS.md: 4.2 system calls per request, the floor,
//! and 3–4 µs more CPU). Here, in the client connection's own task, a request
//! head is parsed with `httparse`, rewritten into one buffer and written to an
//! upstream connection that this client connection keeps; the response head
//! is parsed, cleaned and written back, and its body is copied through by its
//! framing (`Content-Length`, chunked, or to the close).
//!
//! Framing is where request smuggling lives, so what is taken here is
//! narrow: HTTP/1.1, an origin-form target of plain URI characters, exactly
//! one plain `Host`, no `Transfer-Encoding`, `Upgrade` or `Expect`, at most
//! one `Content-Length` of digits, `Connection` naming only `keep-alive` or
//! `close`, and a body that came whole with its head. Anything else — and
//! any request for a route that is not ready, or whose upstream refuses the
//! connection — goes to hyper at that request boundary with the bytes read
//! so far replayed ([`Rewind`]), and the connection stays with hyper: it is
//! held, re-queued, upgraded or answered exactly as before.

use std::{
    borrow::Cow,
    io::{self, IoSlice},
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, Waker},
    time::SystemTime,
};

use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    Answer, Flight, MAX_HEAD_BYTES, RouteState, Shared, State,
    early::{Early, MAX_HEADERS, Rewind, raw},
    forward::{self, Client},
    route,
};

/// The upstream read buffer: response heads and body pieces.
const UPSTREAM_BUF: usize = 16 * 1024;
/// Interim (1xx) responses skipped before the final one, as hyper's client
/// does; more is a broken upstream.
const MAX_INTERIM: usize = 8;
/// Largest `Content-Length` / chunk size taken: 2^60, far above any body and
/// far from overflowing.
const MAX_LENGTH_DIGITS: usize = 18;

/// A request head this path takes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) route: usize,
    /// Head bytes, then `body` bytes, both already in the buffer.
    pub(crate) len: usize,
    pub(crate) body: usize,
    /// The client asked to close after this exchange.
    pub(crate) close: bool,
    /// `HEAD`: the response has no body whatever its framing says.
    pub(crate) head_method: bool,
    /// Safe to send again on a fresh connection if a reused one failed
    /// before answering (RFC 9110 §9.2.2, and no body).
    pub(crate) retryable: bool,
}

/// What the buffer's next request calls for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Not a whole head yet.
    Partial,
    /// Anything unusual: hyper's to serve.
    HandOver,
    /// Relay it; its rewritten head is in the output buffer.
    Relay(Head),
}

/// Parses the next request in `buf`; when it is one to relay, writes the
/// head the upstream gets into `out`. Pure.
pub(crate) fn plan(
    table: &route::RouteTable,
    buf: &[u8],
    client: &Client,
    out: &mut Vec<u8>,
) -> Plan {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Plan::Partial,
        Err(_) => return Plan::HandOver,
    };
    let Some(head) = check(table, &req, len) else {
        return Plan::HandOver;
    };
    if buf.len() - len < head.body {
        // Only bodies that came whole with their head are taken: waiting
        // here for the rest would buffer it (and delay the head); hyper
        // streams it instead.
        return Plan::HandOver;
    }
    out.clear();
    write_request(&req, client, out);
    Plan::Relay(head)
}

fn check(table: &route::RouteTable, req: &httparse::Request<'_, '_>, len: usize) -> Option<Head> {
    let (method, path) = (req.method?, req.path?);
    if req.version != Some(1) || method == "CONNECT" || !plain_target(path) {
        return None;
    }
    let (mut host, mut body, mut close) = (None, None, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.replace(h.value).is_some() {
                return None;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if body.replace(length(h.value)?).is_some() {
                return None;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    return None; // upgrade, or a field to strip: hyper's path
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("expect")
        {
            return None;
        }
    }
    let host = plain_host(host?)?;
    let path_only = path.split(['?']).next().unwrap_or(path);
    let route = table.find(&host, path_only)?;
    let body = usize::try_from(body.unwrap_or(0)).ok()?;
    Some(Head {
        route,
        len,
        body,
        close,
        head_method: method == "HEAD",
        retryable: body == 0 && matches!(method, "GET" | "HEAD" | "OPTIONS"),
    })
}

/// An origin-form target of unreserved, reserved and `%` characters only:
/// what every URI parser agrees on. Others (`"`, `{`, `\`, …) are hyper's.
fn plain_target(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b))
}

/// A `Host` of letters, digits, dots and dashes with an optional port,
/// normalised as [`route::request_host`] does (port dropped, lowercase, no
/// trailing dot); anything else (IPv6 literals, user info) is hyper's.
fn plain_host(value: &[u8]) -> Option<Cow<'_, str>> {
    let value = std::str::from_utf8(value).ok()?;
    let host = match value.split_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        Some(_) => return None,
        None => value,
    };
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return None;
    }
    route::normalised(host)
}

/// A `Content-Length` value: digits only, bounded.
fn length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > MAX_LENGTH_DIGITS || !value.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// One of `forward::HOP_BY_HOP` (hop-by-hop fields and proxy credentials).
fn hop_by_hop(name: &str) -> bool {
    forward::HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// What `HeaderValue::to_str` accepts: the values the hyper path reads.
fn visible(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The head the upstream gets: hop-by-hop fields dropped, this hop added to
/// `X-Forwarded-For` and `Forwarded`, `X-Forwarded-Proto` set when no earlier
/// proxy did — the same fields as [`forward::prepare`] gives.
fn write_request(req: &httparse::Request<'_, '_>, client: &Client, out: &mut Vec<u8>) {
    let (method, path) = (req.method.unwrap_or("GET"), req.path.unwrap_or("/"));
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut xff: Vec<&[u8]> = Vec::new();
    let (mut host, mut proto) = (None, false);
    for h in req.headers.iter() {
        if hop_by_hop(h.name) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            if visible(h.value) {
                let v = h.value.trim_ascii();
                if !v.is_empty() {
                    xff.push(v);
                }
            }
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            host = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("x-forwarded-proto") {
            proto = true;
        }
        push_field(out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in xff {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.addr.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    out.extend_from_slice(b"forwarded: ");
    out.extend_from_slice(client.forwarded_for.as_bytes());
    // `check` took only plain hosts: graphic ASCII, always.
    if let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) {
        out.extend_from_slice(b";host=");
        forward::push_quoted_if_needed(out, host);
    }
    out.extend_from_slice(b";proto=http\r\n\r\n");
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response's body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// At the upstream's close: the client connection closes after it.
    ToClose,
}

/// A parsed upstream response head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The upstream connection can take another request once the body ends.
    pub(crate) reuse: bool,
    /// The client connection closes after it (the client or a drain asked,
    /// or the body runs to the close); the client was told so.
    pub(crate) closes: bool,
}

/// A response the upstream should not have sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadReply {
    #[error("malformed response head: {0}")]
    Malformed(String),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("conflicting Content-Length values")]
    Length,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    Upgrade,
    #[error("more than {MAX_INTERIM} interim (1xx) responses")]
    Interim,
    #[error("malformed chunked body")]
    Chunked,
    #[error("closed before the response ended")]
    Truncated,
}

/// Parses an upstream response head; `Ok(None)` while partial. When it is a
/// final response, writes the head the client gets into `out`: hop-by-hop
/// fields and those its `Connection` lists dropped (never the framing
/// fields, which travel with the bytes they frame), `Date` added if absent
/// (RFC 9110 §6.6.1, as hyper's server does), `Connection: close` when the
/// client connection ends after it.
pub(crate) fn reply(
    buf: &[u8],
    head_method: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Reply>, BadReply> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(BadReply::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(BadReply::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    if status == 101 {
        return Err(BadReply::Upgrade);
    }
    let mut reuse = resp.version == Some(1);
    let (mut length_seen, mut chunked, mut te, mut date) = (None, false, false, false);
    let mut listed: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = length(h.value).ok_or(BadReply::Length)?;
            if length_seen.replace(n).is_some_and(|m| m != n) {
                return Err(BadReply::Length);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            // Chunked only as the last coding (RFC 9112 §6.3).
            chunked = h
                .value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty())
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    reuse = false;
                } else if !token.is_empty() {
                    listed.push(token);
                }
            }
        } else if h.name.eq_ignore_ascii_case("date") {
            date = true;
        }
    }
    // No body for HEAD (its framing fields describe one not sent), 1xx, 204, 304.
    let framing = if head_method || (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::None
    } else if te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::ToClose
        }
    } else {
        match length_seen {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::ToClose,
        }
    };
    if te && length_seen.is_some() {
        // Both: Transfer-Encoding wins, and the connection is not to be
        // trusted with another request (RFC 9112 §6.3).
        reuse = false;
    }
    if (100..200).contains(&status) {
        return Ok(Some(Reply {
            len,
            status,
            framing,
            reuse,
            closes: false,
        }));
    }
    if framing == Framing::ToClose {
        reuse = false;
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits: 100–999.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let framing_field = h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding");
        if framing_field {
            // Relayed as sent, except a Content-Length beside chunking.
            if te && h.name.eq_ignore_ascii_case("content-length") {
                continue;
            }
        } else if hop_by_hop(h.name)
            || listed
                .iter()
                .any(|t| t.eq_ignore_ascii_case(h.name.as_bytes()))
        {
            continue;
        }
        push_field(out, h.name.as_bytes(), h.value);
    }
    if !date {
        push_field(
            out,
            b"date",
            httpdate::fmt_http_date(SystemTime::now()).as_bytes(),
        );
    }
    let closes = close || framing == Framing::ToClose;
    if closes {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Reply {
        len,
        status,
        framing,
        reuse,
        closes,
    }))
}

/// Finds where a chunked body ends as its bytes pass (RFC 9112 §7.1),
/// without keeping any of them: sizes, extensions, data, trailers.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    state: Chunk,
    size: u64,
    digits: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    /// After `;`: a chunk extension, up to CR.
    Ext,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    Trailer,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    /// Scans `bytes`; `Ok(Some(n))` when the body ends after `n` of them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, BadReply> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > MAX_LENGTH_DIGITS - 3 {
                            return Err(BadReply::Chunked);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.size = self.size * 16 + u64::from(d);
                        Chunk::Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => Chunk::Ext,
                    b'\r' if self.digits > 0 => Chunk::SizeLf,
                    _ => return Err(BadReply::Chunked),
                },
                Chunk::Ext => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err(BadReply::Chunked),
                    _ => Chunk::Ext,
                },
                Chunk::SizeLf => match b {
                    b'\n' if self.size == 0 => Chunk::Trailer,
                    b'\n' => Chunk::Data(self.size),
                    _ => return Err(BadReply::Chunked),
                },
                Chunk::Data(left) => {
                    // Skip the data in one step.
                    let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    continue;
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => {
                    (self.size, self.digits) = (0, 0);
                    Chunk::Size
                }
                Chunk::Trailer => match b {
                    b'\r' => Chunk::EndLf,
                    b'\n' => return Err(BadReply::Chunked),
                    _ => Chunk::TrailerLine,
                },
                Chunk::TrailerLine => match b {
                    b'\r' => Chunk::TrailerLf,
                    b'\n' => return Err(BadReply::Chunked),
                    _ => Chunk::TrailerLine,
                },
                Chunk::TrailerLf if b == b'\n' => Chunk::Trailer,
                Chunk::EndLf if b == b'\n' => Chunk::Done,
                Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf | Chunk::Done => {
                    return Err(BadReply::Chunked);
                }
            };
            i += 1;
            if self.state == Chunk::Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

/// The upstream connection a client connection keeps between requests.
struct Kept {
    route: usize,
    stream: TcpStream,
}

/// Why an exchange ended without a whole response.
enum Failed {
    /// Nothing was sent and nothing is owed: hand the request to hyper.
    HandOver,
    /// The upstream failed before the response head: 502, then close.
    Upstream(String),
    /// Mid-response, or the client went away: close.
    Close,
}

/// True unless the peer closed (or wrote unasked) since it was last read:
/// readiness is what epoll already told tokio, so a live idle connection
/// costs no system call to check.
fn alive(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => matches!(
            stream.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ),
    }
}

/// Writes `a` then `b` with as few system calls as the socket allows.
async fn write_two<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

impl Shared {
    /// Relays plain requests on `io` (a connection whose first head was
    /// read, not held) until it ends or a request is hyper's to serve.
    pub(super) async fn relay_h1(
        &self,
        io: Rewind<TcpStream>,
        client_addr: &Client,
        shutdown: &CancellationToken,
    ) -> Early {
        let (mut buf, mut client) = io.into_parts();
        let mut out = Vec::with_capacity(512);
        let mut ubuf = Vec::new();
        let mut kept: Option<Kept> = None;
        let header_timeout = self.settings.config.header_read_timeout;
        let mut deadline = tokio::time::Instant::now() + header_timeout;
        let result = loop {
            let head = match plan(&self.table, &buf, client_addr, &mut out) {
                Plan::Relay(head) => head,
                Plan::HandOver => break Some(buf),
                Plan::Partial if buf.len() >= MAX_HEAD_BYTES => break Some(buf),
                Plan::Partial => {
                    if buf.len() == buf.capacity() {
                        // Up to the head limit, as before hyper.
                        let grow = (buf.capacity() * 2).clamp(1024, MAX_HEAD_BYTES);
                        buf.reserve_exact(grow - buf.len());
                    }
                    // Between requests a drain closes the connection: nothing
                    // is owed (hyper's graceful shutdown does the same).
                    let idle = buf.is_empty();
                    tokio::select! {
                        r = client.read_buf(&mut buf) => match r {
                            Ok(0) | Err(_) => break None,
                            Ok(_) => continue,
                        },
                        _ = tokio::time::sleep_until(deadline) => {
                            debug!("no complete request head within header_read_timeout; closing");
                            break None;
                        }
                        _ = shutdown.cancelled(), if idle => break None,
                        _ = self.stop.cancelled() => break None,
                    }
                }
            };
            let Some(route) = self.routes.get(head.route).cloned() else {
                break Some(buf);
            };
            if !route.ready.load(Ordering::Acquire) {
                break Some(buf);
            }
            let close = head.close || shutdown.is_cancelled();
            let exchange = self.exchange(
                &route,
                &head,
                &buf,
                close,
                shutdown,
                &mut kept,
                &mut out,
                &mut ubuf,
                &mut client,
            );
            let done = tokio::select! {
                r = exchange => r,
                _ = self.stop.cancelled() => break None,
            };
            let client_closes = match done {
                Ok(closes) => closes,
                Err(Failed::HandOver) => break Some(buf),
                Err(Failed::Upstream(e)) => {
                    if let Some(n) = self.upstream_errors.check() {
                        warn!(host = %route.config.host, upstream = %route.upstream, error = %e,
                            suppressed = n, "upstream failed a request");
                    }
                    let answer = Answer {
                        status: hyper::StatusCode::BAD_GATEWAY,
                        text: format!("upstream {} failed: {e}\n", route.upstream),
                        retry_after: false,
                    };
                    let _ = raw(client, &route.metrics, answer).await;
                    return Early::Done;
                }
                Err(Failed::Close) => break None,
            };
            buf.drain(..head.len + head.body);
            if client_closes {
                break None;
            }
            deadline = tokio::time::Instant::now() + header_timeout;
        };
        if let Some(k) = kept
            && let Some(route) = self.routes.get(k.route)
        {
            route.upstream_pool().checkin_raw(k.stream);
        }
        match result {
            Some(buf) => Early::Hyper(Rewind::new(buf, client), None),
            None => {
                let _ = client.shutdown().await;
                Early::Done
            }
        }
    }

    /// One request and its response; `Ok(true)` when the client connection
    /// closes after it. The upstream connection is left in `kept` if it can
    /// take another request.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        route: &Arc<RouteState>,
        head: &Head,
        buf: &[u8],
        close: bool,
        shutdown: &CancellationToken,
        kept: &mut Option<Kept>,
        out: &mut Vec<u8>,
        ubuf: &mut Vec<u8>,
        client: &mut TcpStream,
    ) -> Result<bool, Failed> {
        let mut flight = Flight::arrive(route.clone());
        flight.set(State::Active);
        let body = &buf[head.len..head.len + head.body];
        // `out` holds the rewritten request head until it is sent; the
        // response head is written into it afterwards.
        let mut up = self.upstream(route, head.route, kept).await?;
        if ubuf.capacity() == 0 {
            ubuf.reserve_exact(UPSTREAM_BUF);
        }
        let reply = loop {
            let sent = write_two(&mut up.0, out, body).await;
            ubuf.clear();
            let got = match sent {
                Ok(()) => {
                    self.read_reply(&mut up.0, head, close, shutdown, out, ubuf)
                        .await
                }
                // A reused connection may have been closed under us.
                Err(_) if up.1 => Err(None),
                Err(e) => Err(Some(e.to_string())),
            };
            match got {
                Ok(reply) => break reply,
                // A reused connection the upstream had closed: once more on a
                // fresh one, for requests that may be sent twice.
                Err(None) if up.1 && head.retryable => {
                    // The rewritten head is still in `out` (nothing was parsed).
                    up = self.upstream(route, head.route, &mut None).await?;
                }
                Err(None) => return Err(Failed::Upstream(BadReply::Truncated.to_string())),
                Err(Some(e)) => return Err(Failed::Upstream(e)),
            }
        };
        route.metrics.answered(reply.status);
        let reusable = self.copy_body(&mut up.0, client, out, ubuf, &reply).await?;
        drop(flight);
        if reusable && reply.reuse {
            *kept = Some(Kept {
                route: head.route,
                stream: up.0,
            });
        }
        Ok(reply.closes)
    }

    /// The kept upstream connection if it is this route's and alive, else a
    /// pooled or new one; `true` when it was used before. A refused connect
    /// marks the route not ready and hands the request to hyper, which
    /// holds it until the next probe succeeds.
    async fn upstream(
        &self,
        route: &RouteState,
        index: usize,
        kept: &mut Option<Kept>,
    ) -> Result<(TcpStream, bool), Failed> {
        if let Some(k) = kept.take() {
            if k.route == index && alive(&k.stream) {
                return Ok((k.stream, true));
            }
            if let Some(other) = self.routes.get(k.route) {
                other.upstream_pool().checkin_raw(k.stream);
            }
        }
        if let Some(s) = route.upstream_pool().checkout_raw(alive) {
            return Ok((s, true));
        }
        let Some(addr) = route.pick_addr() else {
            return Err(Failed::HandOver);
        };
        match forward::connect(addr, self.settings.config.connect_timeout).await {
            Ok(s) => Ok((s, false)),
            Err(e) => {
                route.connect_failed(&e);
                Err(Failed::HandOver)
            }
        }
    }

    /// Reads the final response head (skipping interim ones) and writes the
    /// client's into `out`. `Err(None)`: the upstream closed before a byte.
    async fn read_reply(
        &self,
        up: &mut TcpStream,
        head: &Head,
        close: bool,
        shutdown: &CancellationToken,
        out: &mut Vec<u8>,
        ubuf: &mut Vec<u8>,
    ) -> Result<Reply, Option<String>> {
        let mut interim = 0;
        let mut any = false;
        loop {
            // A drain that began while the upstream worked still marks
            // this answer as the connection's last.
            let close = close || shutdown.is_cancelled();
            match reply(ubuf, head.head_method, close, out) {
                Ok(Some(r)) if (100..200).contains(&r.status) => {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(Some(BadReply::Interim.to_string()));
                    }
                    ubuf.drain(..r.len);
                    continue;
                }
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(Some(e.to_string())),
            }
            if ubuf.len() == ubuf.capacity() {
                ubuf.reserve_exact(MAX_HEAD_BYTES.saturating_sub(ubuf.len()).max(1024));
            }
            match up.read_buf(ubuf).await {
                Ok(0) if !any => return Err(None),
                Err(e) if !any && e.kind() == io::ErrorKind::ConnectionReset => return Err(None),
                Ok(0) => return Err(Some(BadReply::Truncated.to_string())),
                Err(e) => return Err(Some(e.to_string())),
                Ok(_) => any = true,
            }
        }
    }

    /// Writes the response head in `out` and copies the body after it; `Ok(true)`
    /// when the body ended exactly where its framing said (the upstream
    /// connection is clean).
    async fn copy_body(
        &self,
        up: &mut TcpStream,
        client: &mut TcpStream,
        out: &[u8],
        ubuf: &mut Vec<u8>,
        reply: &Reply,
    ) -> Result<bool, Failed> {
        let mut chunks = Chunks::default();
        let mut left = match reply.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        // What of `ubuf` (from `from`) belongs to this body, and whether
        // the body is done with it.
        let mut from = reply.len;
        let mut head: &[u8] = out;
        loop {
            let avail = &ubuf[from.min(ubuf.len())..];
            let (take, done) = match reply.framing {
                Framing::None => (0, true),
                Framing::Length(_) => {
                    let take = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    left -= take as u64;
                    (take, left == 0)
                }
                Framing::Chunked => match chunks.feed(avail) {
                    Ok(Some(n)) => (n, true),
                    Ok(None) => (avail.len(), false),
                    Err(_) => {
                        let _ = write_two(client, head, avail).await;
                        return Err(Failed::Close);
                    }
                },
                Framing::ToClose => (avail.len(), false),
            };
            if write_two(client, head, &avail[..take]).await.is_err() {
                return Err(Failed::Close);
            }
            head = &[];
            if done {
                // Anything after the body is more than was asked for.
                return Ok(from + take == ubuf.len());
            }
            ubuf.clear();
            from = 0;
            match up.read_buf(ubuf).await {
                Ok(0) if reply.framing == Framing::ToClose => return Ok(false),
                Ok(0) | Err(_) => {
                    debug!("upstream closed mid-response");
                    return Err(Failed::Close);
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activator::early::tests::table;

    fn client() -> Client {
        Client::new("10.1.2.3".parse().unwrap())
    }

    fn plan_of(head: &str) -> (Plan, Vec<u8>) {
        let mut out = Vec::new();
        let p = plan(&table(), head.as_bytes(), &client(), &mut out);
        (p, out)
    }

    /// Header fields of a head, lowercased names, sorted.
    fn fields(head: &[u8]) -> Vec<(String, String)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(head).unwrap().is_complete());
        let mut v: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The fields hyper's path (`strip_hop_by_hop` + `add_forwarding`)
    /// gives the same head.
    fn hyper_fields(head: &str) -> Vec<(String, String)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed.parse(head.as_bytes()).unwrap();
        let mut req = hyper::Request::builder()
            .method(parsed.method.unwrap())
            .uri(parsed.path.unwrap());
        for h in parsed.headers.iter() {
            req = req.header(h.name, h.value);
        }
        let mut req = req.body(()).unwrap();
        forward::strip_hop_by_hop(req.headers_mut());
        forward::add_forwarding(&mut req, &client());
        let mut v: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn relayed_heads_carry_the_fields_the_hyper_path_gives() {
        for head in [
            "GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET /a?b=c HTTP/1.1\r\nHost: Web.Example.com:8080\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost: web.example.com\r\nX-Forwarded-For: 1.1.1.1 \r\nX-Forwarded-For: \r\nx-forwarded-for: 2.2.2.2\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost: web.example.com\r\nX-Forwarded-Proto: https\r\nForwarded: for=9.9.9.9\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web.example.com\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\nProxy-Connection: keep-alive\r\n\r\n",
            "POST /api/v HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
            "GET / HTTP/1.1\r\nHost: web.example.com\r\nX-Forwarded-For: caf\u{e9}\r\n\r\n",
        ] {
            let (p, out) = plan_of(head);
            assert!(matches!(p, Plan::Relay(_)), "{head:?}: {p:?}");
            assert_eq!(fields(&out), hyper_fields(head), "{head:?}");
            let line_end = out.windows(2).position(|w| w == b"\r\n").unwrap();
            let first = head.split("\r\n").next().unwrap();
            assert_eq!(
                &out[..line_end],
                first.as_bytes(),
                "the request line is kept"
            );
        }
    }

    #[test]
    fn plain_requests_are_planned_with_their_framing() {
        // Whitespace around a value is not part of it (RFC 9110 §5.5).
        let post = "POST /api/v HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 3 \r\nConnection: Keep-Alive, close\r\n\r\nabcGET";
        let (p, _) = plan_of(post);
        assert_eq!(
            p,
            Plan::Relay(Head {
                route: 1,
                len: post.find("abc").unwrap(),
                body: 3,
                close: true,
                head_method: false,
                retryable: false,
            })
        );
        let (p, _) = plan_of("HEAD / HTTP/1.1\r\nHost: web.example.com.\r\n\r\n");
        assert!(
            matches!(
                p,
                Plan::Relay(Head {
                    route: 0,
                    body: 0,
                    head_method: true,
                    retryable: true,
                    close: false,
                    ..
                })
            ),
            "{p:?}"
        );
        assert_eq!(plan_of("GET / HTTP/1.1\r\nHost: web.exa").0, Plan::Partial);
        assert_eq!(plan_of("").0, Plan::Partial);
    }

    #[test]
    fn anything_unusual_is_hyper_s() {
        for odd in [
            // Framing that could be read two ways, or streams.
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: +3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 99999999999999999999\r\n\r\n",
            // A body still arriving: hyper streams it.
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 4\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
            "GET / HTTP/1.1\r\nHost: web.example.com\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web.example.com\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
            // Versions, methods, targets.
            "GET / HTTP/1.0\r\nHost: web.example.com\r\n\r\n",
            "CONNECT web.example.com:443 HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET http://web.example.com/ HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET /{x} HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
            // Hosts.
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web.example.com\r\nHost: web.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: other.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@web.example.com\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web.example.com:\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web.example.com:8x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: web example.com\r\n\r\n",
            // Malformed.
            "GET / HTTP/1.1\r\nHo st: web.example.com\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
        ] {
            assert_eq!(plan_of(odd).0, Plan::HandOver, "{odd:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            plan_of(&format!(
                "GET / HTTP/1.1\r\nHost: web.example.com\r\n{many}\r\n"
            ))
            .0,
            Plan::HandOver
        );
    }

    fn reply_of(head: &str, head_method: bool, close: bool) -> Result<(Reply, String), BadReply> {
        let mut out = Vec::new();
        let r = reply(head.as_bytes(), head_method, close, &mut out)?.expect("a whole head");
        Ok((r, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn replies_are_framed_and_cleaned() {
        let (r, out) = reply_of(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\nDate: Sun, 06 Dec 2026 07:00:00 GMT\r\n\r\nhello",
            false,
            false,
        )
        .unwrap();
        assert_eq!(
            (r.len, r.status, r.framing, r.reuse),
            (137, 200, Framing::Length(5), true)
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: Sun, 06 Dec 2026 07:00:00 GMT\r\n\r\n"
        );

        // Chunked; a Content-Length beside it is dropped, and the
        // connection is not trusted again.
        let (r, out) = reply_of(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            true,
        )
        .unwrap();
        assert_eq!((r.framing, r.reuse), (Framing::Chunked, false));
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        assert!(
            out.contains("\r\ndate: ") && out.ends_with("connection: close\r\n\r\n"),
            "{out}"
        );

        // Neither: to the close, which the client is told.
        let (r, out) = reply_of("HTTP/1.1 200 OK\r\n\r\n", false, false).unwrap();
        assert_eq!((r.framing, r.reuse), (Framing::ToClose, false));
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
        let (r, _) = reply_of(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::ToClose);

        // No body, whatever the fields say.
        for (head, is_head) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        ] {
            let (r, out) = reply_of(head, is_head, false).unwrap();
            assert_eq!((r.framing, r.reuse), (Framing::None, true), "{head:?}");
            assert!(!out.contains("connection: close"), "{out}");
        }

        // The upstream asks to close; HTTP/1.0 is not kept; a listed
        // framing field stays.
        assert!(
            !reply_of(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false,
                false
            )
            .unwrap()
            .0
            .reuse
        );
        assert!(
            !reply_of("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false, false)
                .unwrap()
                .0
                .reuse
        );
        let (_, out) = reply_of(
            "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 1\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert!(out.contains("Content-Length: 1\r\n"), "{out}");

        // Interim answers are returned as such (the caller skips them).
        let (r, _) = reply_of(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
            false,
            false,
        )
        .unwrap();
        assert_eq!((r.status, r.framing), (103, Framing::None));

        let mut out = Vec::new();
        assert_eq!(
            reply(b"HTTP/1.1 200 OK\r\nContent-Le", false, false, &mut out),
            Ok(None)
        );
    }

    #[test]
    fn bad_replies_are_errors() {
        for (head, want) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                BadReply::Length,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                BadReply::Length,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                BadReply::Upgrade,
            ),
        ] {
            assert_eq!(reply_of(head, false, false).unwrap_err(), want, "{head:?}");
        }
        assert!(matches!(
            reply_of("HTTP/1.1 2x0 OK\r\n\r\n", false, false),
            Err(BadReply::Malformed(_))
        ));
        // Same lengths twice are one length.
        assert_eq!(
            reply_of(
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
                false,
                false
            )
            .unwrap()
            .0
            .framing,
            Framing::Length(2)
        );
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "y".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            reply(big.as_bytes(), false, false, &mut Vec::new()),
            Err(BadReply::TooLarge)
        );
    }

    #[test]
    fn chunked_bodies_end_where_their_framing_says() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";
        let mut whole = Chunks::default();
        assert_eq!(whole.feed(body), Ok(Some(body.len())));
        // Byte by byte, the same end.
        let mut one = Chunks::default();
        let ends: Vec<usize> = (0..body.len())
            .filter(|&i| one.feed(&body[i..=i]).unwrap().is_some())
            .collect();
        assert_eq!(ends, vec![body.len() - 1]);
        // What follows the end is not part of it.
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK");
        assert_eq!(Chunks::default().feed(&more), Ok(Some(body.len())));
        assert_eq!(Chunks::default().feed(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(Chunks::default().feed(b"3\r\nab"), Ok(None));

        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"3\nabc\r\n",
            b"0\r\nTrailer\n",
            b"fffffffffffffff0\r\n",
        ] {
            assert_eq!(
                Chunks::default().feed(bad),
                Err(BadReply::Chunked),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bodies_and_heads_are_written_whole() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut sink = Vec::new();
            write_two(&mut sink, b"head ", b"body").await.unwrap();
            write_two(&mut sink, b"", b"!").await.unwrap();
            assert_eq!(sink, b"head body!");
        });
    }

    mod hostile {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes: no panic, and a relayed head is one hyper's path
            /// would take too (a complete head with a known route).
            #[test]
            fn any_request_bytes_are_planned_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let mut out = Vec::new();
                if let Plan::Relay(h) = plan(&table(), &bytes, &client(), &mut out) {
                    prop_assert!(h.len + h.body <= bytes.len());
                    prop_assert!(out.ends_with(b"\r\n\r\n"));
                }
            }

            #[test]
            fn any_reply_bytes_are_parsed_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512), head in any::<bool>()) {
                let mut out = Vec::new();
                if let Ok(Some(r)) = reply(&bytes, head, false, &mut out) {
                    prop_assert!(r.len <= bytes.len());
                }
            }

            /// However a chunked body is cut into reads, it ends at the same byte.
            #[test]
            fn chunk_scanning_does_not_depend_on_how_bytes_arrive(
                sizes in proptest::collection::vec(0usize..40, 0..6),
                cuts in proptest::collection::vec(1usize..16, 1..64),
            ) {
                let mut body = Vec::new();
                for n in &sizes {
                    if *n == 0 { continue; }
                    body.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    body.extend(std::iter::repeat_n(b'x', *n));
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\nT: 1\r\n\r\nNEXT");
                let end = body.len() - 4;
                let mut c = Chunks::default();
                let (mut at, mut found) = (0, None);
                for cut in cuts.iter().cycle() {
                    if at >= body.len() || found.is_some() { break; }
                    let to = (at + cut).min(body.len());
                    if let Some(n) = c.feed(&body[at..to]).unwrap() {
                        found = Some(at + n);
                    }
                    at = to;
                }
                prop_assert_eq!(found, Some(end));
            }
        }
    }
}
