//! A tonic codec that hands the sink each `StreamMetricsMessage` as raw bytes
//! (see [`super::wire`] for why) and encodes the (empty) response with prost.

use bytes::Buf;
use envoy_types::pb::envoy::service::metrics::v3::StreamMetricsResponse;
use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use super::wire::RawMessage;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = StreamMetricsResponse;
    type Decode = RawMessage;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = StreamMetricsResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding response: {e}")))
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = RawMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        // tonic has already enforced the size limit and framed one message.
        Ok(Some(RawMessage(src.copy_to_bytes(src.remaining()))))
    }
}
