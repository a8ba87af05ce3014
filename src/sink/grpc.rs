//! The `StreamMetrics` endpoint, framed by hand.
//!
//! tonic's `Streaming` keeps its decode buffer as large as the largest message
//! for the whole life of a stream: about 64 KiB for a 600-family sidecar
//! message, held between flushes by every one of thousands of idle streams
//! (this was 93–165 KiB of RSS per open stream, a hundred times the cost of a
//! tracked pod). Here a stream holds a buffer only while a message is
//! arriving, sized for that message, and none between flushes.
//!
//! The framing is gRPC's: per message a compressed flag, a big-endian `u32`
//! length and the message, over the HTTP/2 request body. The answer is one
//! empty `StreamMetricsResponse` and `grpc-status`, or the error status alone.
//!
//! What a client can make the sink hold is bounded three ways. A buffer grows
//! with the bytes that actually arrived, never with the length a prefix
//! declares. Every message, across all streams, is admitted whole against
//! one [`Budget`]: a stream whose prefix declares more than is free stops
//! reading its body, so HTTP/2 flow control makes its client wait instead of
//! the sink allocating, and it holds none of the budget while it waits. And a
//! message, once it has started, must be complete within a timeout, so
//! stalled streams cannot keep the budget from the sidecars that do finish
//! their messages.
//!
//! Admitting whole messages is what lets every stream finish when thousands
//! flush at once (granted frame by frame, each held part of the budget and
//! waited for more that nobody could give back). Its price: a declared
//! length is charged before its bytes arrive. Two rules keep that from being
//! a free hold: an admitted message must arrive at the pace that finishes it
//! in time (`paced_by`), and one peer address holds at most one largest
//! message of the budget at once ([`PeerShares`]). What is left:
//! `sink_max_buffered_bytes / max_message_bytes` pods (4 with the defaults)
//! that stall their messages make the others wait up to
//! `sink_message_timeout`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::Semaphore, time::Instant};
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};

use super::Sink;

/// The one method of `envoy.service.metrics.v3.MetricsService`.
pub const STREAM_METRICS: &str = "/envoy.service.metrics.v3.MetricsService/StreamMetrics";

/// gRPC's per-message prefix: compressed flag and length.
const PREFIX: usize = 5;

/// The sink's HTTP/2 connection window (hyper's default is 1 MiB): what a
/// connection may have sent that the sink has not read. Those bytes sit in
/// the HTTP/2 codec outside the [`Budget`], so when the budget is spent every
/// flooding connection parked a full window: 40 connections, 40 MiB. 256 KiB
/// still lets a sidecar's ~45 KB message (and several behind it) go out in
/// one round trip.
pub const CONNECTION_WINDOW: u32 = 256 * 1024;
// Five real-sized (45 KB) messages fit in what a connection may send unread.
const _: () = assert!(CONNECTION_WINDOW as usize >= 5 * (PREFIX + 45_000));

/// The message bytes all streams together may hold
/// (`sink_max_buffered_bytes`), shared by every stream of the process.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    /// `activescale_sink_buffered_bytes`: what is held now.
    held: Gauge,
}

impl Budget {
    /// `bytes` is at most `u32::MAX` (the config checks it); more is clamped.
    pub fn new(bytes: usize, held: Gauge) -> Self {
        let bytes = bytes.min(u32::MAX as usize);
        Self {
            permits: Arc::new(Semaphore::new(bytes)),
            held,
        }
    }

    /// Waits until `n` bytes are free and takes them.
    async fn take(&self, n: usize) {
        let Ok(n32) = u32::try_from(n) else { return };
        // The semaphore is never closed, so acquiring only waits.
        if let Ok(permit) = self.permits.acquire_many(n32).await {
            permit.forget();
            self.held.inc_by(n as i64);
        }
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.permits.add_permits(n);
            self.held.dec_by(n as i64);
        }
    }
}

/// What one peer address may hold of the [`Budget`] at once: one message
/// of the largest size (`max_message_bytes`), as a sidecar (one stream, one
/// message at a time) never needs more. A pod opening a thousand streams
/// then holds what one stream could, not the whole budget; its other
/// streams wait for its own share, holding nothing. Only where addresses
/// are identities (`sink_verify_peer_address`): behind address rewriting
/// every sidecar would share a few addresses' shares.
pub struct PeerShares {
    share: usize,
    /// A peer's semaphore, while it has a stream open.
    peers: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl PeerShares {
    pub fn new(share: usize) -> Self {
        Self {
            share: share.min(u32::MAX as usize),
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn join(&self, peer: IpAddr) -> Arc<Semaphore> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let share = self.share;
        peers
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(share)))
            .clone()
    }

    /// Forgets `peer` when `slot` was its last open stream's.
    fn leave(&self, peer: IpAddr, slot: Arc<Semaphore>) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        drop(slot);
        if peers.get(&peer).is_some_and(|s| Arc::strong_count(s) == 1) {
            peers.remove(&peer);
        }
    }

    /// Peers with a stream open.
    #[cfg(test)]
    fn peers(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How a stream's messages are read: the limits of one process.
#[derive(Clone)]
pub struct ReadLimits {
    /// `max_message_bytes`: larger messages end their stream with OUT_OF_RANGE.
    pub max_message: usize,
    /// `sink_message_timeout`: a message started must be whole within this.
    pub message_timeout: Duration,
    /// `sink_max_buffered_bytes`.
    pub budget: Budget,
    /// Each peer address's share of it, when addresses are identities.
    pub peer_shares: Option<Arc<PeerShares>>,
}

/// The metrics service, ready for tonic's router.
#[derive(Clone)]
pub struct MetricsServiceServer {
    sink: Sink,
    limits: ReadLimits,
}

impl MetricsServiceServer {
    pub fn new(sink: Sink, limits: ReadLimits) -> Self {
        Self { sink, limits }
    }
}

impl NamedService for MetricsServiceServer {
    const NAME: &'static str = super::SERVICE_NAME;
}

impl Service<http::Request<Body>> for MetricsServiceServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != STREAM_METRICS {
            let status = Status::unimplemented(format!("no method {}", req.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let sink = self.sink.clone();
        let limits = self.limits.clone();
        Box::pin(async move {
            let req = tonic::Request::from_http(req);
            let peer: Option<SocketAddr> = req.remote_addr();
            let ip = peer.map(|p| p.ip().to_canonical());
            let messages = Messages::new(req.into_inner(), limits, ip);
            Ok(match sink.stream_metrics(messages, peer).await {
                Ok(()) => ok_response(),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// One empty `StreamMetricsResponse` (a zero-length message), then status OK.
fn ok_response() -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0; PREFIX]))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response =
        http::Response::new(Body::new(StreamBody::new(futures::stream::iter(frames))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Why a stream's messages could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("message of {len} bytes is over the limit of {max} bytes (max_message_bytes)")]
    Oversized { len: usize, max: usize },
    #[error("compressed messages are not supported (compressed flag {0})")]
    Compressed(u8),
    #[error("the stream ended inside a message")]
    Truncated,
    #[error(
        "a message was not complete within {0:?} of its first byte (sink_message_timeout); \
         {1} bytes of it arrived"
    )]
    Stalled(Duration, usize),
    #[error(
        "a message of {len} bytes arrived too slowly to be whole within {timeout:?} of being \
         admitted (sink_message_timeout); {arrived} bytes of it arrived"
    )]
    TooSlow {
        len: usize,
        arrived: usize,
        timeout: Duration,
    },
    #[error("stream broken: {}", .0.message())]
    Broken(Status),
}

/// The messages of one request body.
///
/// A message is admitted whole: when its prefix has arrived, the stream
/// waits for budget for the entire declared length before it reads any more,
/// and once granted it never waits on the budget again. A stream waiting for
/// its grant holds none of the budget, so streams can never each hold part
/// of it while waiting for the rest (with frame-by-frame grants, 10,000
/// sidecars flushing at once spent the whole budget on partial messages and
/// none could finish). The grant is accounting, not memory: the buffer still
/// grows only with the bytes that arrive.
pub struct Messages {
    body: Body,
    limits: ReadLimits,
    /// Read from the body but not yet part of a message: at most one frame
    /// (never more is read while it is not empty). Outside the budget, as the
    /// same bytes would be inside the HTTP/2 codec had they not been read.
    pending: Bytes,
    /// The next message's prefix, as far as it has arrived.
    head: [u8; PREFIX],
    head_len: usize,
    /// The declared length of the message arriving and when it was
    /// granted, once it was.
    granted: Option<(usize, Instant)>,
    /// What has arrived of it, when it spans frames.
    buf: BytesMut,
    /// Budget bytes this stream holds: the grant of the message arriving,
    /// plus the message last handed out, which its caller is still reading.
    held: usize,
    /// Of `held`, the message last handed out; given back on the next call.
    handed: usize,
    /// When the message that has started must be whole.
    deadline: Option<Instant>,
    /// The peer's share, which every grant is also taken from (as much of
    /// it as of the budget: `held`).
    peer: Option<(IpAddr, Arc<Semaphore>)>,
}

impl Messages {
    pub fn new(body: Body, limits: ReadLimits, peer: Option<IpAddr>) -> Self {
        let peer = limits
            .peer_shares
            .as_ref()
            .zip(peer)
            .map(|(shares, ip)| (ip, shares.join(ip)));
        Self {
            peer,
            body,
            limits,
            pending: Bytes::new(),
            head: [0; PREFIX],
            head_len: 0,
            granted: None,
            buf: BytesMut::new(),
            held: 0,
            handed: 0,
            deadline: None,
        }
    }

    /// The next message; `None` when the client ended the stream cleanly.
    ///
    /// Cancelling it loses nothing: every await leaves the state as it was
    /// before it (the sink cancels it only on shutdown, and then drops it).
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        // The caller is done with the message it had.
        let handed = std::mem::take(&mut self.handed);
        self.give_back(handed);
        loop {
            if let Some((len, _)) = self.granted {
                if let Some(message) = self.fill(len) {
                    self.granted = None;
                    self.deadline = None;
                    self.handed = len;
                    return Ok(Some(message));
                }
            } else if self.head_len == PREFIX {
                let len = check_prefix(self.head, self.limits.max_message)?;
                if len > 0 {
                    // Between messages a stream may idle for ever (a flush
                    // every 5 s); once a message has started, its clock runs,
                    // also while it waits for its grant.
                    let at = self.started();
                    // The peer's share first: a stream waiting for it holds
                    // none of the budget. Both are given back together.
                    let admit = async {
                        let share = match &self.peer {
                            Some((_, slot)) => {
                                let n = u32::try_from(len).unwrap_or(u32::MAX);
                                Some(slot.clone().acquire_many_owned(n).await)
                            }
                            None => None,
                        };
                        self.limits.budget.take(len).await;
                        share
                    };
                    match tokio::time::timeout_at(at, admit).await {
                        Err(_) => return Err(self.stalled()),
                        Ok(share) => {
                            if let Some(Ok(permit)) = share {
                                permit.forget();
                            }
                        }
                    }
                    self.held += len;
                }
                self.head_len = 0;
                self.granted = Some((len, Instant::now()));
                continue;
            } else if !self.pending.is_empty() {
                self.started();
                let n = (PREFIX - self.head_len).min(self.pending.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&self.pending[..n]);
                self.pending.advance(n);
                self.head_len += n;
                continue;
            }
            let frame = match self.deadline {
                None => self.body.frame().await,
                Some(at) => {
                    let paced = self.granted.and_then(|(len, granted_at)| {
                        let by =
                            paced_by(granted_at, self.limits.message_timeout, self.buf.len(), len);
                        (by < at).then_some((by, len))
                    });
                    match tokio::time::timeout_at(paced.map_or(at, |(by, _)| by), self.body.frame())
                        .await
                    {
                        Ok(frame) => frame,
                        Err(_) => match paced {
                            Some((_, len)) => {
                                return Err(ReadError::TooSlow {
                                    len,
                                    arrived: self.buf.len(),
                                    timeout: self.limits.message_timeout,
                                });
                            }
                            None => return Err(self.stalled()),
                        },
                    }
                }
            };
            match frame {
                // Trailers from a client carry nothing for us.
                Some(Ok(frame)) => self.pending = frame.into_data().unwrap_or_default(),
                None if self.deadline.is_none() => return Ok(None),
                None => return Err(ReadError::Truncated),
                Some(Err(status)) => return Err(ReadError::Broken(status)),
            }
        }
    }

    /// Moves what `pending` holds of the granted message (`len` bytes) into
    /// place; the message, when it is whole. One that arrives within one
    /// frame is not copied.
    fn fill(&mut self, len: usize) -> Option<Bytes> {
        if self.buf.is_empty() && self.pending.len() >= len {
            return Some(self.pending.split_to(len));
        }
        let n = (len - self.buf.len()).min(self.pending.len());
        if n > 0 {
            let part = self.pending.split_to(n);
            append(&mut self.buf, &part, len);
        }
        (self.buf.len() == len).then(|| std::mem::take(&mut self.buf).freeze())
    }

    /// The deadline of the message that has started, starting its clock now
    /// if it had not.
    fn started(&mut self) -> Instant {
        let timeout = self.limits.message_timeout;
        *self
            .deadline
            .get_or_insert_with(|| Instant::now() + timeout)
    }

    fn give_back(&mut self, n: usize) {
        self.limits.budget.give_back(n);
        if let Some((_, slot)) = &self.peer
            && n > 0
        {
            slot.add_permits(n);
        }
        self.held -= n;
    }

    fn stalled(&self) -> ReadError {
        let arrived = match self.granted {
            Some(_) => PREFIX + self.buf.len(),
            None => self.head_len,
        };
        ReadError::Stalled(self.limits.message_timeout, arrived)
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        let held = self.held;
        self.give_back(held);
        if let (Some(shares), Some((ip, slot))) = (&self.limits.peer_shares, self.peer.take()) {
            shares.leave(ip, slot);
        }
    }
}

/// How far ahead of its pace (see [`paced_by`]) a granted message is
/// judged: HTTP/2's default stream window, what a client may send before the
/// sink reads any of it. Sidecar messages (45–65 KB) fit in it and are held
/// to the plain timeout: a client whose bytes arrive in bursts (a busy
/// sender, thousands of streams on two cores) was cut with a single frame of
/// slack, 1,362 of 10,000 streams in one saturated run.
const PACE_SLACK: usize = 64 * 1024;

/// When more of a granted `len`-byte message must have arrived, `arrived`
/// bytes of it being in: the pace that finishes it within `timeout` of its
/// grant, [`PACE_SLACK`] ahead.
///
/// The grant is charged before the bytes arrive; the pace is what keeps
/// that from being free. Holding a grant for the whole timeout takes sending
/// the message at the pace, as holding budget did when it was granted frame
/// by frame; a stream that stops sending keeps a 16 MiB grant for
/// `timeout / 256` (39 ms with the defaults), not `timeout`.
fn paced_by(granted_at: Instant, timeout: Duration, arrived: usize, len: usize) -> Instant {
    let ahead = arrived.saturating_add(PACE_SLACK);
    if ahead >= len {
        return granted_at + timeout;
    }
    granted_at + timeout.mul_f64(ahead as f64 / len as f64)
}

/// The length a whole prefix declares, if the sink takes such a message.
fn check_prefix(head: [u8; PREFIX], max: usize) -> Result<usize, ReadError> {
    let [flag, a, b, c, d] = head;
    if flag != 0 {
        return Err(ReadError::Compressed(flag));
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > max {
        return Err(ReadError::Oversized { len, max });
    }
    Ok(len)
}

/// Appends `data` to `buf`, a message of `len` bytes arriving. The buffer
/// grows by doubling what has arrived, as `BytesMut` does, but never past
/// the message's end: a 45 KB sidecar message fills a 45 KB buffer, not a
/// 64 KiB one (with every sidecar flushing at once that slack was a third of
/// what the sink held). A declared length alone still reserves no memory:
/// growth is at most twice what arrived.
fn append(buf: &mut BytesMut, data: &[u8], len: usize) {
    let needed = buf.len() + data.len();
    if needed > buf.capacity() {
        let mut grown = BytesMut::with_capacity(grown_capacity(buf.len(), needed, len));
        grown.extend_from_slice(buf);
        *buf = grown;
    }
    buf.extend_from_slice(data);
}

/// The capacity [`append`] gives a buffer holding `have` bytes of a
/// `len`-byte message that must hold `needed`.
fn grown_capacity(have: usize, needed: usize, len: usize) -> usize {
    have.max(PREFIX).saturating_mul(2).min(len).max(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// The largest HTTP/2 DATA frame a client may send us (the protocol's
    /// default `SETTINGS_MAX_FRAME_SIZE`, which the server keeps).
    const MAX_FRAME: usize = 16 * 1024;

    fn framed(messages: &[&[u8]]) -> BytesMut {
        let mut out = BytesMut::new();
        for m in messages {
            out.extend_from_slice(&[0]);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[test]
    fn a_prefix_declares_a_length_refused_when_oversized_or_compressed() {
        assert_eq!(check_prefix([0, 0, 0, 1, 0], 1000).unwrap(), 256);
        assert_eq!(check_prefix([0; PREFIX], 0).unwrap(), 0);
        assert!(matches!(
            check_prefix([0, 0, 1, 0, 0], 1000),
            Err(ReadError::Oversized {
                len: 65536,
                max: 1000
            })
        ));
        assert!(matches!(
            check_prefix([1, 0, 0, 0, 1], 1000),
            Err(ReadError::Compressed(1))
        ));
    }

    #[test]
    fn a_buffer_grows_by_doubling_but_not_past_the_declared_message() {
        const KIB: usize = 1024;
        // A 45 KB message arriving in 16 KiB frames ends in a buffer of its
        // own size, not the 64 KiB plain doubling would reach.
        let whole = [1u8; 45_000];
        let mut buf = BytesMut::new();
        for chunk in whole.chunks(16 * KIB) {
            append(&mut buf, chunk, whole.len());
            assert!(buf.capacity() <= whole.len(), "{}", buf.capacity());
        }
        assert_eq!(buf.capacity(), whole.len());

        // A message declared at 16 MiB reserves no memory for it: the
        // buffer is at most twice what arrived.
        let mut buf = BytesMut::new();
        for _ in 0..4 {
            append(&mut buf, &[7u8; 16 * KIB], 16 << 20);
            assert!(
                buf.capacity() <= 2 * buf.len(),
                "{} for {}",
                buf.capacity(),
                buf.len()
            );
        }
    }

    #[test]
    fn the_capacity_doubles_up_to_the_message_end_but_holds_what_is_needed() {
        assert_eq!(grown_capacity(0, 3, 3), 3);
        assert_eq!(grown_capacity(0, 2, 100), 2 * PREFIX);
        assert_eq!(grown_capacity(20, 30, 256), 40);
        assert_eq!(grown_capacity(20, 30, 35), 35);
        assert_eq!(grown_capacity(20, 60, 35), 60);
    }

    #[test]
    fn a_granted_message_must_keep_the_pace_that_finishes_it_in_time() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        // Up to the slack: the plain timeout.
        assert_eq!(paced_by(t0, timeout, 0, PACE_SLACK), t0 + timeout);
        // 16 MiB, nothing in yet: the slack's share of the timeout.
        let mib16 = 16 << 20;
        assert_eq!(paced_by(t0, timeout, 0, mib16), t0 + timeout / 256);
        // Half in: half the timeout plus the slack's share.
        let half = paced_by(t0, timeout, mib16 / 2, mib16);
        assert_eq!(half, t0 + timeout.mul_f64(0.5 + 1.0 / 256.0));
        // The last frame: the plain timeout.
        assert_eq!(
            paced_by(t0, timeout, mib16 - PACE_SLACK, mib16),
            t0 + timeout
        );
    }

    /// A body yielding `chunks` `every` apart (the first at once), then ending.
    fn paced_body(chunks: Vec<Bytes>, every: Duration) -> Body {
        let frames =
            futures::stream::iter(chunks.into_iter().enumerate()).then(move |(i, c)| async move {
                if i > 0 {
                    tokio::time::sleep(every).await;
                }
                Ok::<_, Status>(Frame::data(c))
            });
        Body::new(StreamBody::new(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_declaring_much_and_sending_little_loses_its_grant_early() {
        let held = Gauge::default();
        let shared = limits(2 << 20, &held);
        // A 1 MiB prefix and nothing more: the grant is charged, and given
        // back after the slack's share of the timeout, not the whole of it.
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(1u32 << 20).to_be_bytes());
        let mut m = Messages::new_any(open_body(vec![Bytes::from(prefix)]), shared.clone());
        let started = Instant::now();
        match m.next().await {
            Err(ReadError::TooSlow {
                len: 1048576,
                arrived: 0,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() <= Duration::from_secs(10) / 8,
            "{:?}",
            started.elapsed()
        );
        drop(m);
        assert_eq!(held.get(), 0);

        // Sent at just under the pace, a 256 KiB message is whole; at three times
        // the pace's interval, it is cut.
        let whole = framed(&[&[3u8; 256 * 1024]]).freeze();
        let chunks: Vec<Bytes> = whole
            .chunks(MAX_FRAME)
            .map(Bytes::copy_from_slice)
            .collect();
        let share = Duration::from_secs(10) / 16;
        let got = all(Messages::new_any(
            paced_body(chunks.clone(), share * 9 / 10),
            shared.clone(),
        ))
        .await;
        assert_eq!(got.expect("at the pace").len(), 1);
        let got = all(Messages::new_any(paced_body(chunks, share * 3), shared)).await;
        assert!(matches!(got, Err(ReadError::TooSlow { .. })), "{got:?}");
        assert_eq!(held.get(), 0);
    }

    fn limits(budget: usize, held: &Gauge) -> ReadLimits {
        ReadLimits {
            max_message: 1 << 20,
            message_timeout: Duration::from_secs(10),
            budget: Budget::new(budget, held.clone()),
            peer_shares: None,
        }
    }

    impl Messages {
        /// A stream from no particular peer.
        fn new_any(body: Body, limits: ReadLimits) -> Self {
            Self::new(body, limits, None)
        }
    }

    /// A body that yields `chunks` and then stays open without sending more.
    fn open_body(chunks: Vec<Bytes>) -> Body {
        let frames =
            futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(c))))
                .chain(futures::stream::pending());
        Body::new(StreamBody::new(frames))
    }

    /// A body yielding `chunks` (a tick apart), then ending.
    fn ending_body(chunks: Vec<Bytes>) -> Body {
        let frames = futures::stream::iter(chunks).then(|c| async move {
            tokio::task::yield_now().await;
            Ok::<_, Status>(Frame::data(c))
        });
        Body::new(StreamBody::new(frames))
    }

    /// Every message of `messages` until the stream ends, or its error.
    async fn all(mut messages: Messages) -> Result<Vec<Bytes>, ReadError> {
        let mut out = Vec::new();
        while let Some(m) = messages.next().await? {
            out.push(m);
        }
        Ok(out)
    }

    #[tokio::test(start_paused = true)]
    async fn messages_come_out_whole_and_in_order_however_they_are_cut() {
        let whole = framed(&[b"first", b"", &[7u8; 1000], b"last"]).freeze();
        for cut in [1, 2, 4, 5, 6, 333, whole.len()] {
            let chunks = whole.chunks(cut).map(Bytes::copy_from_slice).collect();
            let held = Gauge::default();
            let got = all(Messages::new_any(
                ending_body(chunks),
                limits(1 << 20, &held),
            ))
            .await
            .unwrap();
            let lens: Vec<usize> = got.iter().map(Bytes::len).collect();
            assert_eq!(lens, [5, 0, 1000, 4], "cut every {cut} bytes");
            assert_eq!(got[2], [7u8; 1000][..]);
            assert_eq!(held.get(), 0, "cut every {cut} bytes");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ending_inside_a_message_or_its_prefix_is_truncated() {
        let whole = framed(&[&[1u8; 100]]).freeze();
        for cut in [3, 50] {
            let held = Gauge::default();
            let body = ending_body(vec![whole.slice(..cut)]);
            let got = all(Messages::new_any(body, limits(1 << 20, &held))).await;
            assert!(matches!(got, Err(ReadError::Truncated)), "{cut}: {got:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_and_compressed_messages_end_the_stream_before_any_grant() {
        let held = Gauge::default();
        let body = open_body(vec![Bytes::from_static(&[0, 0, 0x20, 0, 0])]);
        let mut messages = Messages::new_any(body, limits(1 << 20, &held));
        assert!(matches!(
            messages.next().await,
            Err(ReadError::Oversized { len: 0x200000, .. })
        ));
        assert_eq!(held.get(), 0);
        let body = open_body(vec![Bytes::from_static(&[1, 0, 0, 0, 1, 9])]);
        let mut messages = Messages::new_any(body, limits(1 << 20, &held));
        assert!(matches!(
            messages.next().await,
            Err(ReadError::Compressed(1))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_message_must_finish_within_the_timeout() {
        let held = Gauge::default();
        let mut whole = framed(&[&[1u8; 100]]).freeze();
        let part = whole.split_to(40);
        let mut messages = Messages::new_any(open_body(vec![part]), limits(1 << 20, &held));
        match messages.next().await {
            Err(ReadError::Stalled(timeout, 40)) => assert_eq!(timeout, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(held.get(), 100, "the message's whole length was granted");
        drop(messages);
        assert_eq!(
            held.get(),
            0,
            "a stream gives back what it held when it ends"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_waits_without_a_clock_and_holds_nothing() {
        let held = Gauge::default();
        let whole = framed(&[b"one"]).freeze();
        let mut messages = Messages::new_any(open_body(vec![whole]), limits(1000, &held));
        assert_eq!(messages.next().await.unwrap().unwrap(), "one");
        assert_eq!(
            held.get(),
            3,
            "the message handed out is held while it is read"
        );
        let idle = tokio::time::timeout(Duration::from_secs(3600), messages.next()).await;
        assert!(idle.is_err(), "no timeout between messages: {idle:?}");
        assert_eq!(held.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_for_its_grant_holds_nothing_and_reads_nothing_more() {
        const KIB: usize = 1024;
        let held = Gauge::default();
        let shared = limits(64 * KIB, &held);
        // a's 60 KiB message is granted whole as soon as its prefix is in;
        // it waits for the rest of its bytes.
        let mut a_whole = framed(&[&[1u8; 60 * KIB]]).freeze();
        let a_part = a_whole.split_to(30 * KIB);
        let mut a = Messages::new_any(open_body(vec![a_part]), shared.clone());
        let a_wait = tokio::time::timeout(Duration::from_secs(1), a.next()).await;
        assert!(a_wait.is_err());
        assert_eq!(held.get(), (60 * KIB) as i64);

        // b's 20 KiB do not fit in what is left: b holds none of the budget
        // while it waits, and stalls.
        let b_whole = framed(&[&[2u8; 20 * KIB]]).freeze();
        let mut b = Messages::new_any(open_body(vec![b_whole.clone()]), shared.clone());
        match b.next().await {
            Err(ReadError::Stalled(_, PREFIX)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(held.get(), (60 * KIB) as i64, "b took nothing");

        // Once a is gone, a stream like b gets its message.
        drop(a);
        assert_eq!(held.get(), 0);
        let mut c = Messages::new_any(open_body(vec![b_whole]), shared);
        assert_eq!(c.next().await.unwrap().unwrap().len(), 20 * KIB);
        assert_eq!(held.get(), (20 * KIB) as i64);
    }

    #[tokio::test(start_paused = true)]
    async fn one_peer_holds_at_most_its_share_and_its_other_streams_hold_nothing() {
        const KIB: usize = 1024;
        let held = Gauge::default();
        let shares = Arc::new(PeerShares::new(100 * KIB));
        let shared = ReadLimits {
            peer_shares: Some(shares.clone()),
            ..limits(1024 * KIB, &held)
        };
        let greedy: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        // The greedy peer's first 60 KiB message is admitted and waits for
        // its bytes; its second does not fit in the rest of its share, so
        // it waits holding nothing, though the budget has room.
        let part = |n: usize| {
            let mut whole = framed(&[&vec![1u8; n]]).freeze();
            whole.split_to(8 * KIB)
        };
        let mut first = Messages::new(
            open_body(vec![part(60 * KIB)]),
            shared.clone(),
            Some(greedy),
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(1), first.next())
                .await
                .is_err()
        );
        let mut second = Messages::new(
            open_body(vec![part(60 * KIB)]),
            shared.clone(),
            Some(greedy),
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(1), second.next())
                .await
                .is_err()
        );
        assert_eq!(held.get(), (60 * KIB) as i64, "the second took nothing");

        // Another peer is admitted meanwhile.
        let whole = framed(&[&[2u8; 60 * KIB]]).freeze();
        let mut third = Messages::new(open_body(vec![whole]), shared.clone(), Some(other));
        assert_eq!(third.next().await.unwrap().unwrap().len(), 60 * KIB);
        assert_eq!(held.get(), (120 * KIB) as i64);

        // When the first is gone, the second gets the share.
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), second.next())
                .await
                .is_err()
        );
        assert_eq!(held.get(), (120 * KIB) as i64);
        drop((second, third));
        assert_eq!(held.get(), 0);
        assert_eq!(shares.peers(), 0, "peers without streams are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn streams_flushing_at_once_past_the_budget_all_finish() {
        // Eight 45 KB messages in 16 KiB frames, every stream started at
        // once, a budget for one message and a bit: granted part by part,
        // each stream would hold some of it and wait for more for ever.
        let held = Gauge::default();
        let shared = limits(64 * 1024, &held);
        let streams = (0..8u8).map(|i| {
            let whole = framed(&[&[i; 45_000]]).freeze();
            let chunks = whole
                .chunks(MAX_FRAME)
                .map(Bytes::copy_from_slice)
                .collect();
            tokio::spawn(all(Messages::new_any(ending_body(chunks), shared.clone())))
        });
        for (i, stream) in futures::future::join_all(streams)
            .await
            .into_iter()
            .enumerate()
        {
            let got = stream.expect("task").expect("no stream stalls");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0], vec![i as u8; 45_000]);
        }
        assert_eq!(held.get(), 0);
    }
}
