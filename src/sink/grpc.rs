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

use std::{
    convert::Infallible,
    net::SocketAddr,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
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

/// The metrics service, ready for tonic's router.
#[derive(Clone)]
pub struct MetricsServiceServer {
    sink: Sink,
    max_message: usize,
}

impl MetricsServiceServer {
    /// `max_message`: larger messages end their stream with OUT_OF_RANGE.
    pub fn new(sink: Sink, max_message: usize) -> Self {
        Self { sink, max_message }
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
        let max = self.max_message;
        Box::pin(async move {
            let req = tonic::Request::from_http(req);
            let peer: Option<SocketAddr> = req.remote_addr();
            let messages = Messages::new(req.into_inner(), max);
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
    #[error("stream broken: {}", .0.message())]
    Broken(Status),
}

/// The messages of one request body.
pub struct Messages {
    body: Body,
    buf: BytesMut,
    max: usize,
}

impl Messages {
    pub fn new(body: Body, max: usize) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next message; `None` when the client ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(message) = take_message(&mut self.buf, self.max)? {
                return Ok(Some(message));
            }
            match self.body.frame().await {
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(ReadError::Truncated),
                Some(Err(status)) => return Err(ReadError::Broken(status)),
                Some(Ok(frame)) => {
                    // Trailers from a client carry nothing for us.
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Splits the first whole message off `buf`, if it holds one. Reserves room
/// for exactly the rest of a message it has started, and leaves `buf` without
/// an allocation once it is empty, so an idle stream holds no buffer.
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
        buf.reserve(PREFIX + len - buf.len());
        return Ok(None);
    }
    buf.advance(PREFIX);
    let message = buf.split_to(len).freeze();
    if buf.is_empty() {
        *buf = BytesMut::new();
    }
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

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
                assert!(buf.capacity() >= PREFIX + 1000, "room reserved once");
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
}
