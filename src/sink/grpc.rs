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
//! declares (a prefix alone costs nothing). Every byte held, across all
//! streams, is taken from one [`Budget`]: when it is spent, streams stop
//! reading their bodies, so HTTP/2 flow control makes their clients wait
//! instead of the sink allocating. And a message, once it has started, must be
//! complete within a timeout, so stalled streams cannot keep the budget from
//! the sidecars that do finish their messages.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
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

/// The largest HTTP/2 DATA frame a client may send us (the protocol's
/// default `SETTINGS_MAX_FRAME_SIZE`, which the server keeps).
const MAX_FRAME: usize = 16 * 1024;

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

/// How a stream's messages are read: the limits of one process.
#[derive(Clone)]
pub struct ReadLimits {
    /// `max_message_bytes`: larger messages end their stream with OUT_OF_RANGE.
    pub max_message: usize,
    /// `sink_message_timeout`: a message started must be whole within this.
    pub message_timeout: Duration,
    /// `sink_max_buffered_bytes`.
    pub budget: Budget,
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
            let messages = Messages::new(req.into_inner(), limits);
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
    #[error("stream broken: {}", .0.message())]
    Broken(Status),
}

/// The messages of one request body.
pub struct Messages {
    body: Body,
    buf: BytesMut,
    limits: ReadLimits,
    /// Budget bytes this stream holds: what `buf` holds plus the message
    /// last handed out, which its caller is still reading.
    held: usize,
    /// Of `held`, the message last handed out; given back on the next call.
    handed: usize,
    /// Of `held`, room taken for a frame not read yet.
    reserved: usize,
}

impl Messages {
    pub fn new(body: Body, limits: ReadLimits) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            limits,
            held: 0,
            handed: 0,
            reserved: 0,
        }
    }

    /// The next message; `None` when the client ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        // The caller is done with the message it had.
        let handed = std::mem::take(&mut self.handed);
        self.give_back(handed);
        // Between messages a stream may idle for ever (a flush every 5 s);
        // once a message has started, its clock runs.
        let mut deadline = (!self.buf.is_empty()).then(|| self.deadline());
        loop {
            if let Some(message) = take_message(&mut self.buf, self.limits.max_message)? {
                self.handed = PREFIX + message.len();
                return Ok(Some(message));
            }
            let frame = match deadline {
                None => self.body.frame().await,
                Some(at) => {
                    // Inside a message, room for the next frame is taken
                    // before it is read: a stream waiting for the budget
                    // holds no frame outside it, and its sender waits on
                    // HTTP/2 flow control instead.
                    if self.reserved == 0 {
                        let room = frame_room(&self.buf);
                        let take = self.limits.budget.take(room);
                        if tokio::time::timeout_at(at, take).await.is_err() {
                            return Err(self.stalled());
                        }
                        self.held += room;
                        self.reserved = room;
                    }
                    match tokio::time::timeout_at(at, self.body.frame()).await {
                        Ok(frame) => frame,
                        Err(_) => {
                            let reserved = std::mem::take(&mut self.reserved);
                            self.give_back(reserved);
                            return Err(self.stalled());
                        }
                    }
                }
            };
            let reserved = std::mem::take(&mut self.reserved);
            let data = match frame {
                // Trailers from a client carry nothing for us.
                Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
                end => {
                    self.give_back(reserved);
                    return match end {
                        None if self.buf.is_empty() => Ok(None),
                        Some(Err(status)) => Err(ReadError::Broken(status)),
                        _ => Err(ReadError::Truncated),
                    };
                }
            };
            let at = match deadline {
                Some(at) => at,
                None if data.is_empty() => continue,
                None => *deadline.insert(self.deadline()),
            };
            // What the reservation does not cover is taken now (a first
            // frame, or one larger than the peer was told to send); until
            // the budget has room this stream reads nothing more.
            let more = data.len().saturating_sub(reserved);
            if more > 0 {
                if tokio::time::timeout_at(at, self.limits.budget.take(more))
                    .await
                    .is_err()
                {
                    self.give_back(reserved);
                    return Err(self.stalled());
                }
                self.held += more;
            }
            self.give_back(reserved.saturating_sub(data.len()));
            append(&mut self.buf, &data);
        }
    }

    fn give_back(&mut self, n: usize) {
        self.limits.budget.give_back(n);
        self.held -= n;
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.limits.message_timeout
    }

    fn stalled(&self) -> ReadError {
        ReadError::Stalled(self.limits.message_timeout, self.buf.len())
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        self.limits.budget.give_back(self.held);
    }
}

/// Splits the first whole message off `buf`, if it holds one. Reserves
/// nothing for what a prefix declares (the buffer grows as bytes arrive), and
/// leaves `buf` without an allocation once it is empty, so an idle stream
/// holds no buffer.
fn take_message(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, ReadError> {
    let Some(&[flag, a, b, c, d]) = buf.get(..PREFIX) else {
        return Ok(None);
    };
    if flag != 0 {
        return Err(ReadError::Compressed(flag));
    }
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > max {
        return Err(ReadError::Oversized { len, max });
    }
    if buf.len() < PREFIX + len {
        return Ok(None);
    }
    buf.advance(PREFIX);
    let message = buf.split_to(len).freeze();
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
    Ok(Some(message))
}

/// Budget room to take before reading the next frame of a started message:
/// one frame, but no more than the message still lacks. A sidecar's last
/// frame is usually short; reserving a whole frame for it held 16 KiB of
/// budget per stream for nothing, and with a thousand sidecars flushing at
/// once those reservations spent the budget while every stream waited for
/// more (streams then stalled until `sink_message_timeout`).
fn frame_room(buf: &[u8]) -> usize {
    match buf.get(..PREFIX) {
        Some(&[_, a, b, c, d]) => {
            let end = PREFIX.saturating_add(u32::from_be_bytes([a, b, c, d]) as usize);
            end.saturating_sub(buf.len()).clamp(1, MAX_FRAME)
        }
        _ => MAX_FRAME,
    }
}

/// Appends `data` to `buf`. The buffer grows by doubling what has arrived,
/// as `BytesMut` does, but never past the end of the message its prefix
/// declares: a 45 KB sidecar message fills a 45 KB buffer, not a 64 KiB one
/// (with every sidecar flushing at once that slack was a third of what the
/// sink held). A declared length alone still reserves nothing: growth is at
/// most twice what arrived.
fn append(buf: &mut BytesMut, data: &[u8]) {
    let needed = buf.len() + data.len();
    if needed <= buf.capacity() {
        buf.extend_from_slice(data);
        return;
    }
    let mut grown = BytesMut::with_capacity(grown_capacity(buf, data, needed));
    grown.extend_from_slice(buf);
    grown.extend_from_slice(data);
    *buf = grown;
}

/// The capacity [`append`] gives a buffer that must hold `needed` bytes:
/// twice what it holds, capped at the end of the first message's
/// declared length when its prefix has arrived (in `buf` or `data`).
fn grown_capacity(buf: &[u8], data: &[u8], needed: usize) -> usize {
    let mut prefix = [0u8; PREFIX];
    let have = buf.len().min(PREFIX);
    prefix[..have].copy_from_slice(&buf[..have]);
    let from_data = (PREFIX - have).min(data.len());
    prefix[have..have + from_data].copy_from_slice(&data[..from_data]);
    let doubled = buf.len().max(PREFIX).saturating_mul(2);
    let cap = if have + from_data == PREFIX {
        let [_, a, b, c, d] = prefix;
        let end = PREFIX.saturating_add(u32::from_be_bytes([a, b, c, d]) as usize);
        doubled.min(end)
    } else {
        doubled
    };
    cap.max(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

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
    fn messages_come_out_whole_and_in_order() {
        let mut buf = framed(&[b"first", b"", b"third"]);
        assert_eq!(take_message(&mut buf, 100).unwrap().unwrap(), "first");
        assert_eq!(take_message(&mut buf, 100).unwrap().unwrap(), "");
        assert_eq!(take_message(&mut buf, 100).unwrap().unwrap(), "third");
        assert!(take_message(&mut buf, 100).unwrap().is_none());
        assert_eq!(buf.capacity(), 0, "an empty buffer holds no allocation");
    }

    #[test]
    fn a_message_split_over_frames_waits_for_its_last_byte() {
        let whole = framed(&[&[7u8; 1000]]);
        let mut buf = BytesMut::new();
        for (i, chunk) in whole.chunks(333).enumerate() {
            buf.extend_from_slice(chunk);
            let got = take_message(&mut buf, 4096).unwrap();
            if (i + 1) * 333 < whole.len() {
                assert!(got.is_none(), "chunk {i}");
                if i == 0 {
                    assert!(
                        buf.capacity() < PREFIX + 1000,
                        "no room reserved for what has not arrived: {}",
                        buf.capacity()
                    );
                }
            } else {
                assert_eq!(got.unwrap().len(), 1000);
            }
        }
        // A prefix alone, cut inside: nothing yet, nothing lost.
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert!(take_message(&mut buf, 10).unwrap().is_none());
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn oversized_and_compressed_are_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0u8, 0, 1, 0, 0][..]);
        match take_message(&mut buf, 1000) {
            Err(ReadError::Oversized {
                len: 65536,
                max: 1000,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            buf.capacity() < 1000,
            "nothing reserved for a refused message"
        );
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 1, 9][..]);
        assert!(matches!(
            take_message(&mut buf, 1000),
            Err(ReadError::Compressed(1))
        ));
    }

    #[test]
    fn the_room_taken_for_a_frame_is_what_the_message_still_lacks() {
        // A 45,000-byte message of which 2 frames arrived: 12,237 bytes left.
        let mut buf = framed(&[&[1u8; 45_000]]);
        buf.truncate(2 * MAX_FRAME);
        assert_eq!(frame_room(&buf), PREFIX + 45_000 - 2 * MAX_FRAME);
        // Far from its end: one frame.
        buf.truncate(100);
        assert_eq!(frame_room(&buf), MAX_FRAME);
        // Prefix not whole yet: one frame; message whole: at least one byte.
        assert_eq!(frame_room(&[0, 0]), MAX_FRAME);
        assert_eq!(frame_room(&framed(&[b"ab"])), 1);
    }

    #[test]
    fn a_buffer_grows_by_doubling_but_not_past_the_declared_message() {
        const KIB: usize = 1024;
        // A 45 KB message arriving in 16 KiB frames ends in a buffer of its
        // own size, not the 64 KiB plain doubling would reach.
        let whole = framed(&[&[1u8; 45_000]]);
        let mut buf = BytesMut::new();
        for chunk in whole.chunks(16 * KIB) {
            append(&mut buf, chunk);
            assert!(buf.capacity() <= whole.len(), "{}", buf.capacity());
        }
        assert_eq!(buf.capacity(), whole.len());
        assert_eq!(
            take_message(&mut buf, 1 << 20).unwrap().unwrap().len(),
            45_000
        );

        // A prefix declaring 16 MiB reserves nothing for it: the buffer is at
        // most twice what arrived.
        let mut buf = BytesMut::new();
        append(&mut buf, &[0, 1, 0, 0, 0]);
        assert!(buf.capacity() <= 2 * PREFIX, "{}", buf.capacity());
        for _ in 0..4 {
            append(&mut buf, &[7u8; 16 * KIB]);
            assert!(
                buf.capacity() <= 2 * buf.len(),
                "{} for {}",
                buf.capacity(),
                buf.len()
            );
        }
    }

    #[test]
    fn the_capacity_reads_a_prefix_split_between_buffer_and_frame() {
        // Two prefix bytes held, three in the new frame: a 3-byte message,
        // so the buffer ends at its 8th byte instead of doubling to 10.
        assert_eq!(grown_capacity(&[0, 0], &[0, 0, 3, 1, 2], 7), PREFIX + 3);
        // Doubling is below the declared end (256 bytes).
        let held = [&[0u8, 0, 0, 1, 0][..], &[9; 15]].concat();
        assert_eq!(grown_capacity(&held, &[9; 10], 30), 40);
        // Without a whole prefix, plain doubling (at least what is needed).
        assert_eq!(grown_capacity(&[], &[0, 0], 2), 2 * PREFIX);
        // What is needed always wins, also past a (short) declared end.
        assert_eq!(grown_capacity(&[0, 0, 0, 0, 1, 9], &[0; 50], 56), 56);
    }

    fn limits(budget: usize, held: &Gauge) -> ReadLimits {
        ReadLimits {
            max_message: 1 << 20,
            message_timeout: Duration::from_secs(10),
            budget: Budget::new(budget, held.clone()),
        }
    }

    /// A body that yields `chunks` and then stays open without sending more.
    fn open_body(chunks: Vec<Bytes>) -> Body {
        let frames =
            futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(c))))
                .chain(futures::stream::pending());
        Body::new(StreamBody::new(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_message_must_finish_within_the_timeout() {
        let held = Gauge::default();
        let mut whole = framed(&[&[1u8; 100]]).freeze();
        let part = whole.split_to(40);
        let mut messages = Messages::new(open_body(vec![part]), limits(1 << 20, &held));
        match messages.next().await {
            Err(ReadError::Stalled(timeout, 40)) => assert_eq!(timeout, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(held.get(), 40);
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
        let mut messages = Messages::new(open_body(vec![whole]), limits(1000, &held));
        assert_eq!(messages.next().await.unwrap().unwrap(), "one");
        assert_eq!(
            held.get(),
            8,
            "the message handed out is held while it is read"
        );
        let idle = tokio::time::timeout(Duration::from_secs(3600), messages.next()).await;
        assert!(idle.is_err(), "no timeout between messages: {idle:?}");
        assert_eq!(held.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_stops_reading_until_bytes_are_given_back() {
        const KIB: usize = 1024;
        let held = Gauge::default();
        let shared = limits(3 * MAX_FRAME, &held);
        let mut a_whole = framed(&[&[1u8; 60 * KIB]]).freeze();
        let a_part = a_whole.split_to(30 * KIB);
        let mut a = Messages::new(open_body(vec![a_part]), shared.clone());
        let b_whole = framed(&[&[2u8; 20 * KIB]]).freeze();
        let mut b = Messages::new(open_body(vec![b_whole]), shared);

        // a holds what arrived plus room for its next frame, and waits for it.
        let a_wait = tokio::time::timeout(Duration::from_secs(1), a.next()).await;
        assert!(a_wait.is_err());
        assert_eq!(held.get(), (30 * KIB + MAX_FRAME) as i64);
        // b's 20 KiB do not fit in what is left: b reads nothing more and stalls.
        match b.next().await {
            Err(ReadError::Stalled(_, 0)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            held.get(),
            (30 * KIB + MAX_FRAME) as i64,
            "b took nothing it could not have"
        );

        // Once a is gone, a new stream like b gets its message.
        drop(a);
        assert_eq!(held.get(), 0);
        let c_whole = framed(&[&[3u8; 20 * KIB]]).freeze();
        let mut c = Messages::new(open_body(vec![c_whole]), limits_sharing(&b));
        assert_eq!(c.next().await.unwrap().unwrap().len(), 20 * KIB);
        assert_eq!(held.get(), (20 * KIB + PREFIX) as i64);
    }

    #[tokio::test(start_paused = true)]
    async fn room_for_a_frame_is_taken_before_it_is_read_and_the_rest_given_back() {
        let held = Gauge::default();
        let mut whole = framed(&[&[1u8; 100]]).freeze();
        let first = whole.split_to(10);
        let frames = futures::stream::iter([first, whole].map(|c| Ok::<_, Status>(Frame::data(c))));
        let body = Body::new(StreamBody::new(frames.chain(futures::stream::pending())));
        let mut messages = Messages::new(body, limits(1 << 20, &held));
        assert_eq!(messages.next().await.unwrap().unwrap().len(), 100);
        assert_eq!(held.get(), 105, "only the message is held, no reservation");
        let idle = tokio::time::timeout(Duration::from_secs(60), messages.next()).await;
        assert!(idle.is_err());
        assert_eq!(held.get(), 0, "an idle stream reserves nothing");
    }

    fn limits_sharing(other: &Messages) -> ReadLimits {
        other.limits.clone()
    }
}
