//! Reads `StreamMetricsMessage` bytes without decoding what the sink drops.
//!
//! A full decode materialises every `MetricFamily` (name, help, metrics,
//! labels: several allocations each) only for the sink to throw away all but
//! one to four of ~600. Here the message is walked field by field: each
//! family's name is compared in place and a family is decoded only when the
//! filter keeps it. The identifier (first message of a stream only) is handed
//! back as a byte slice for a regular prost decode.
//!
//! Wire layout (field numbers from Envoy's and Prometheus' protos):
//! `StreamMetricsMessage { identifier = 1; repeated MetricFamily envoy_metrics = 2 }`,
//! `MetricFamily { name = 1; help = 2; type = 3; repeated Metric metric = 4 }`,
//! `Metric { label = 1; gauge = 2; counter = 3; summary = 4; untyped = 5 }`,
//! `Gauge { double value = 1 }`, `Untyped { double value = 1 }`.

use bytes::Bytes;

use super::names::{GAUGE_SUFFIX, NameFilter};

/// One `StreamMetricsMessage`, undecoded.
#[derive(Clone, Debug, Default)]
pub struct RawMessage(pub Bytes);

/// Why a message could not be read; the stream that sent it is ended.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated message")]
    Truncated,
    #[error("varint too long")]
    BadVarint,
    #[error("unsupported wire type {0}")]
    BadWireType(u8),
    #[error("field {0} has the wrong wire type")]
    UnexpectedWireType(u32),
    #[error("kept stat name is not UTF-8")]
    BadName,
}

/// A gauge the filter kept, with the value Envoy reported.
#[derive(Clone, Debug, PartialEq)]
pub struct KeptFamily {
    pub name: String,
    /// `None` when the family carried no gauge (or untyped) value.
    pub value: Option<f64>,
}

/// What one message held.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed<'a> {
    /// The encoded `Identifier`, when the message carries one.
    pub identifier: Option<&'a [u8]>,
    /// Number of families in the message.
    pub families: u64,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Walks `msg`, appending kept families to `kept` (cleared first). Dropped
/// families whose name still ends in `downstream_rq_active` (another scope of
/// the signal: admin, outbound, ...) are listed in `skipped` for debug logs.
pub fn parse<'a>(
    msg: &'a [u8],
    filter: &NameFilter,
    kept: &mut Vec<KeptFamily>,
    skipped: &mut Vec<&'a [u8]>,
) -> Result<Parsed<'a>, WireError> {
    kept.clear();
    let mut out = Parsed::default();
    let mut r = Reader(msg);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, LEN) => out.identifier = Some(r.bytes()?),
            (2, LEN) => {
                out.families += 1;
                family(r.bytes()?, filter, kept, skipped)?;
            }
            (1 | 2, _) => return Err(WireError::UnexpectedWireType(field)),
            _ => r.skip(wt)?,
        }
    }
    Ok(out)
}

fn family<'a>(
    bytes: &'a [u8],
    filter: &NameFilter,
    kept: &mut Vec<KeptFamily>,
    skipped: &mut Vec<&'a [u8]>,
) -> Result<(), WireError> {
    // Encoders write fields in number order, so the name is almost always
    // first: look at it before anything else and leave at once if dropped.
    let mut r = Reader(bytes);
    let name = match r.peek_name()? {
        Some(name) => name,
        None => match find_name(bytes)? {
            Some(name) => name,
            None => return Ok(()),
        },
    };
    if !filter.keeps(name) {
        if name.ends_with(GAUGE_SUFFIX.as_bytes()) {
            skipped.push(name);
        }
        return Ok(());
    }
    let name = std::str::from_utf8(name).map_err(|_| WireError::BadName)?;
    let mut value = None;
    let mut r = Reader(bytes);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (4, LEN) => {
                if let Some(v) = metric_value(r.bytes()?)? {
                    // One metric per family for plain stat names; summing
                    // covers any exporter that splits one.
                    value = Some(value.unwrap_or(0.0) + v);
                }
            }
            (4, _) => return Err(WireError::UnexpectedWireType(4)),
            _ => r.skip(wt)?,
        }
    }
    kept.push(KeptFamily {
        name: name.to_owned(),
        value,
    });
    Ok(())
}

fn find_name(bytes: &[u8]) -> Result<Option<&[u8]>, WireError> {
    let mut r = Reader(bytes);
    let mut name = None;
    while !r.is_empty() {
        match r.key()? {
            (1, LEN) => name = Some(r.bytes()?),
            (1, _) => return Err(WireError::UnexpectedWireType(1)),
            (_, wt) => r.skip(wt)?,
        }
    }
    Ok(name)
}

/// The gauge (or untyped) value of one `Metric`.
fn metric_value(bytes: &[u8]) -> Result<Option<f64>, WireError> {
    let mut r = Reader(bytes);
    let mut value = None;
    while !r.is_empty() {
        match r.key()? {
            (2 | 5, LEN) => {
                let mut inner = Reader(r.bytes()?);
                while !inner.is_empty() {
                    match inner.key()? {
                        (1, FIXED64) => value = Some(inner.double()?),
                        (1, _) => return Err(WireError::UnexpectedWireType(1)),
                        (_, wt) => inner.skip(wt)?,
                    }
                }
            }
            (2 | 5, _) => return Err(WireError::UnexpectedWireType(2)),
            (_, wt) => r.skip(wt)?,
        }
    }
    Ok(value)
}

/// A cursor over protobuf bytes; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[inline]
    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        if self.0.len() < 10 {
            Err(WireError::Truncated)
        } else {
            Err(WireError::BadVarint)
        }
    }

    #[inline]
    fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        let wt = (key & 7) as u8;
        let field = u32::try_from(key >> 3).map_err(|_| WireError::BadVarint)?;
        Ok((field, wt))
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = usize::try_from(self.varint()?).map_err(|_| WireError::Truncated)?;
        if len > self.0.len() {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn double(&mut self) -> Result<f64, WireError> {
        let (head, tail) = self
            .0
            .split_first_chunk::<8>()
            .ok_or(WireError::Truncated)?;
        self.0 = tail;
        Ok(f64::from_le_bytes(*head))
    }

    fn skip(&mut self, wt: u8) -> Result<(), WireError> {
        match wt {
            VARINT => self.varint().map(drop),
            FIXED64 => self.advance(8),
            LEN => self.bytes().map(drop),
            FIXED32 => self.advance(4),
            other => Err(WireError::BadWireType(other)),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        self.0 = &self.0[n..];
        Ok(())
    }

    /// The name, if the first field is the name.
    fn peek_name(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        let mut probe = Reader(self.0);
        if probe.is_empty() {
            return Ok(None);
        }
        match probe.key()? {
            (1, LEN) => probe.bytes().map(Some),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::metrics::v3::{
        StreamMetricsMessage, stream_metrics_message::Identifier,
    };
    use envoy_types::pb::io::prometheus::client::{Gauge, Metric, MetricFamily, MetricType};
    use proptest::prelude::*;
    use prost::Message;

    fn gauge(name: &str, value: f64) -> MetricFamily {
        MetricFamily {
            name: Some(name.into()),
            r#type: Some(MetricType::Gauge as i32),
            metric: vec![Metric {
                gauge: Some(Gauge { value: Some(value) }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn encode(identifier: bool, families: Vec<MetricFamily>) -> Vec<u8> {
        StreamMetricsMessage {
            identifier: identifier.then(|| Identifier {
                node: Some(Node {
                    id: "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local".into(),
                    ..Default::default()
                }),
            }),
            envoy_metrics: families,
        }
        .encode_to_vec()
    }

    #[test]
    fn keeps_only_filtered_gauges() {
        let filter = NameFilter::defaults(9000);
        let bytes = encode(
            true,
            vec![
                gauge("http.inbound_0.0.0.0_8080;.downstream_rq_active", 3.0),
                gauge("http.admin.downstream_rq_active", 7.0),
                gauge("server.live", 1.0),
                gauge("http.inbound_0.0.0.0_8081.downstream_rq_active", 2.0),
            ],
        );
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        let parsed = parse(&bytes, &filter, &mut kept, &mut skipped).unwrap();
        assert_eq!(parsed.families, 4);
        assert_eq!(skipped, vec![&b"http.admin.downstream_rq_active"[..]]);
        let id = Identifier::decode(parsed.identifier.unwrap()).unwrap();
        assert!(id.node.unwrap().id.starts_with("sidecar~"));
        assert_eq!(
            kept,
            vec![
                KeptFamily {
                    name: "http.inbound_0.0.0.0_8080;.downstream_rq_active".into(),
                    value: Some(3.0)
                },
                KeptFamily {
                    name: "http.inbound_0.0.0.0_8081.downstream_rq_active".into(),
                    value: Some(2.0)
                },
            ]
        );
    }

    #[test]
    fn family_without_a_gauge_has_no_value() {
        let filter = NameFilter::defaults(9000);
        let mut f = gauge("http.inbound_0.0.0.0_8080;.downstream_rq_active", 1.0);
        f.metric[0].gauge = None;
        let bytes = encode(false, vec![f]);
        let mut kept = Vec::new();
        let parsed = parse(&bytes, &filter, &mut kept, &mut Vec::new()).unwrap();
        assert!(parsed.identifier.is_none());
        assert_eq!(kept[0].value, None);
    }

    #[test]
    fn name_after_other_fields_is_still_found() {
        // Hand-built family with `help` (field 2) before `name` (field 1).
        let name = b"http.inbound_0.0.0.0_8080;.downstream_rq_active";
        let mut fam = vec![0x12, 1, b'h', 0x0a, name.len() as u8];
        fam.extend_from_slice(name);
        let metric = Metric {
            gauge: Some(Gauge { value: Some(5.0) }),
            ..Default::default()
        }
        .encode_to_vec();
        fam.push(0x22);
        fam.push(metric.len() as u8);
        fam.extend_from_slice(&metric);
        let mut msg = vec![0x12, fam.len() as u8];
        msg.extend_from_slice(&fam);
        let mut kept = Vec::new();
        parse(
            &msg,
            &NameFilter::defaults(9000),
            &mut kept,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(kept[0].value, Some(5.0));
    }

    #[test]
    fn malformed_bytes_are_errors() {
        let filter = NameFilter::defaults(9000);
        let mut kept = Vec::new();
        for bad in [
            &[0x12, 0x05, 0x0a][..], // length past the end
            &[0x12][..],             // missing length
            &[0x0b][..],             // start-group wire type
            &[0xff; 11][..],         // endless varint
            &[0x10, 0x01][..],       // field 2 as a varint
        ] {
            assert!(
                parse(bad, &filter, &mut kept, &mut Vec::new()).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn agrees_with_prost_on_a_large_message() {
        let filter = NameFilter::defaults(9000);
        let mut families: Vec<MetricFamily> = (0..600)
            .map(|i| {
                gauge(
                    &format!("cluster.outbound|{i}||svc.upstream_cx_active"),
                    i as f64,
                )
            })
            .collect();
        families.insert(
            300,
            gauge("http.inbound_0.0.0.0_8080;.downstream_rq_active", 42.0),
        );
        let bytes = encode(true, families);
        let full = StreamMetricsMessage::decode(bytes.as_slice()).unwrap();
        let mut kept = Vec::new();
        let parsed = parse(&bytes, &filter, &mut kept, &mut Vec::new()).unwrap();
        assert_eq!(parsed.families as usize, full.envoy_metrics.len());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].value, Some(42.0));
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut kept = Vec::new();
            let _ = parse(&bytes, &NameFilter::defaults(9000), &mut kept, &mut Vec::new());
        }

        #[test]
        fn never_panics_on_truncation(cut in 0usize..200) {
            let bytes = encode(true, vec![gauge("http.inbound_0.0.0.0_8080;.downstream_rq_active", 1.0); 3]);
            let cut = cut.min(bytes.len());
            let mut kept = Vec::new();
            let _ = parse(&bytes[..cut], &NameFilter::defaults(9000), &mut kept, &mut Vec::new());
        }
    }
}
