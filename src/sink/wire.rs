//! Reads `StreamMetricsMessage` bytes without decoding what the sink drops.
//!
//! A full decode materialises every `MetricFamily` (name, help, metrics,
//! labels: several allocations each) only for the sink to throw away all but
//! one to four of ~600. Here the message is walked field by field: each
//! family's name is compared in place and a family is decoded only when the
//! filter keeps it. The identifier (first message of a stream only) is handed
//! back as a byte slice for a regular prost decode. Values are checked here,
//! where they are kept ([`is_gauge`]), and so is the cap on families per pod:
//! nothing past it is copied.
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

/// The largest gauge value kept. Envoy's gauges are unsigned integers, and
/// `downstream_rq_active` counts requests in flight: no pod serves a billion
/// at once. With values whole and at most this, and at most
/// `max_families_per_pod` families per pod, every sum the stores make stays
/// an integer far below 2^53, so f64 adds it exactly.
pub const MAX_GAUGE: f64 = 1e9;

/// True for a value a gauge can have: a whole number in `[0, MAX_GAUGE]`.
/// NaN, infinities, negatives and fractions are lies (or another encoder's
/// bug); none is ever stored.
#[inline]
pub fn is_gauge(v: f64) -> bool {
    (0.0..=MAX_GAUGE).contains(&v) && v.fract() == 0.0
}

/// A gauge the filter kept, with the value Envoy reported.
#[derive(Clone, Debug, PartialEq)]
pub struct KeptFamily {
    pub name: String,
    /// Passed [`is_gauge`].
    pub value: f64,
    /// Of `name`: repeats in a message are found without comparing names.
    hash: u64,
}

/// Why a family the filter kept was not kept after all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rejection {
    /// The family carried no gauge or untyped metric.
    NoValue,
    /// Not a whole number in `[0, MAX_GAUGE]` (one metric, or their sum).
    BadValue(f64),
    /// A new family past the cap on families per pod.
    OverCap,
}

/// What one message held.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed<'a> {
    /// The encoded `Identifier`, when the message carries one.
    pub identifier: Option<&'a [u8]>,
    /// Number of families in the message.
    pub families: u64,
    /// Families the filter kept whose value was refused.
    pub rejected: u64,
    /// The first of those, for a log line.
    pub first_rejected: Option<(&'a [u8], Rejection)>,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Walks `msg`, appending kept families to `kept` (cleared first), at most
/// `max_kept` distinct names. A name repeated in the message is set again
/// (the last valid value wins: a message sets each family once, as across
/// messages). Dropped families whose name still ends in
/// `downstream_rq_active` (another scope of the signal: admin, outbound, ...)
/// are listed in `skipped` for debug logs.
///
/// Linear in the message: finding a repeat compares a hash against at most
/// `max_kept` others, and families past the cap allocate nothing.
pub fn parse<'a>(
    msg: &'a [u8],
    filter: &NameFilter,
    max_kept: usize,
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
                if let Some(rejection) = family(r.bytes()?, filter, max_kept, kept, skipped)? {
                    out.rejected += 1;
                    out.first_rejected.get_or_insert(rejection);
                }
            }
            (1 | 2, _) => return Err(WireError::UnexpectedWireType(field)),
            _ => r.skip(wt)?,
        }
    }
    Ok(out)
}

/// Reads one family; `Some` when the filter kept it but its value was refused.
fn family<'a>(
    bytes: &'a [u8],
    filter: &NameFilter,
    max_kept: usize,
    kept: &mut Vec<KeptFamily>,
    skipped: &mut Vec<&'a [u8]>,
) -> Result<Option<(&'a [u8], Rejection)>, WireError> {
    // Encoders write fields in number order, so the name is almost always
    // first: look at it before anything else and leave at once if dropped.
    let mut r = Reader(bytes);
    let raw_name = match r.peek_name()? {
        Some(name) => name,
        None => match find_name(bytes)? {
            Some(name) => name,
            None => return Ok(None),
        },
    };
    if !filter.keeps(raw_name) {
        if raw_name.ends_with(GAUGE_SUFFIX.as_bytes()) {
            skipped.push(raw_name);
        }
        return Ok(None);
    }
    let name = std::str::from_utf8(raw_name).map_err(|_| WireError::BadName)?;
    let value = match family_value(bytes)? {
        Ok(v) => v,
        Err(why) => return Ok(Some((raw_name, why))),
    };
    let hash = fnv1a(raw_name);
    if let Some(earlier) = kept.iter_mut().find(|k| k.hash == hash && k.name == name) {
        earlier.value = value;
        return Ok(None);
    }
    if kept.len() >= max_kept {
        return Ok(Some((raw_name, Rejection::OverCap)));
    }
    kept.push(KeptFamily {
        name: name.to_owned(),
        value,
        hash,
    });
    Ok(None)
}

/// The value of a kept family: the sum of its metrics' gauge (or untyped)
/// values, each and the sum a valid gauge.
fn family_value(bytes: &[u8]) -> Result<Result<f64, Rejection>, WireError> {
    let mut value = None;
    let mut bad = None;
    let mut r = Reader(bytes);
    while !r.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (4, LEN) => {
                if let Some(v) = metric_value(r.bytes()?)? {
                    if !is_gauge(v) {
                        bad.get_or_insert(v);
                    }
                    // One metric per family for plain stat names; summing
                    // covers any exporter that splits one.
                    value = Some(value.unwrap_or(0.0) + v);
                }
            }
            (4, _) => return Err(WireError::UnexpectedWireType(4)),
            _ => r.skip(wt)?,
        }
    }
    Ok(match (bad, value) {
        (Some(v), _) => Err(Rejection::BadValue(v)),
        (None, None) => Err(Rejection::NoValue),
        (None, Some(v)) if !is_gauge(v) => Err(Rejection::BadValue(v)),
        // `+ 0.0` turns -0 into 0.
        (None, Some(v)) => Ok(v + 0.0),
    })
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

/// The gauge (or untyped) value of one `Metric`. A `Gauge` without its value
/// field is 0: Envoy (proto2) always writes the field, but proto3 encoders
/// leave a zero double out, and reading that as "no value" kept a pod's last
/// non-zero value for good.
fn metric_value(bytes: &[u8]) -> Result<Option<f64>, WireError> {
    let mut r = Reader(bytes);
    let mut value = None;
    while !r.is_empty() {
        match r.key()? {
            (2 | 5, LEN) => {
                let mut inner = Reader(r.bytes()?);
                value = Some(0.0);
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

/// FNV-1a: a few instructions per byte, enough to tell stat names apart.
#[inline]
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    use envoy_types::pb::io::prometheus::client::{
        Counter, Gauge, Metric, MetricFamily, MetricType, Untyped,
    };
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

    const CAP: usize = 64;
    const A: &str = "http.inbound_0.0.0.0_8080;.downstream_rq_active";
    const B: &str = "http.inbound_0.0.0.0_8081.downstream_rq_active";

    fn pairs(kept: &[KeptFamily]) -> Vec<(&str, f64)> {
        kept.iter().map(|k| (k.name.as_str(), k.value)).collect()
    }

    /// Parses `families` with the default filter and `cap`.
    fn run(
        families: Vec<MetricFamily>,
        cap: usize,
    ) -> (Vec<(String, f64)>, u64, Option<Rejection>) {
        let bytes = encode(false, families);
        let mut kept = Vec::new();
        let parsed = parse(
            &bytes,
            &NameFilter::defaults(9000),
            cap,
            &mut kept,
            &mut Vec::new(),
        )
        .unwrap();
        (
            kept.into_iter().map(|k| (k.name, k.value)).collect(),
            parsed.rejected,
            parsed.first_rejected.map(|r| r.1),
        )
    }

    #[test]
    fn keeps_only_filtered_gauges() {
        let filter = NameFilter::defaults(9000);
        let bytes = encode(
            true,
            vec![
                gauge(A, 3.0),
                gauge("http.admin.downstream_rq_active", 7.0),
                gauge("server.live", 1.0),
                gauge(B, 2.0),
            ],
        );
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        let parsed = parse(&bytes, &filter, CAP, &mut kept, &mut skipped).unwrap();
        assert_eq!(parsed.families, 4);
        assert_eq!(parsed.rejected, 0);
        assert_eq!(skipped, vec![&b"http.admin.downstream_rq_active"[..]]);
        let id = Identifier::decode(parsed.identifier.unwrap()).unwrap();
        assert!(id.node.unwrap().id.starts_with("sidecar~"));
        assert_eq!(pairs(&kept), vec![(A, 3.0), (B, 2.0)]);
    }

    #[test]
    fn gauge_values_are_whole_numbers_up_to_a_billion() {
        for ok in [0.0, -0.0, 1.0, 7.0, 65_535.0, MAX_GAUGE] {
            assert!(is_gauge(ok), "{ok}");
        }
        for bad in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.5,
            5.000_000_000_1,
            MAX_GAUGE + 1.0,
            1e17,
            1e308,
            f64::MIN_POSITIVE,
        ] {
            assert!(!is_gauge(bad), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_rejected_and_good_ones_kept() {
        let (kept, rejected, first) = run(
            vec![
                gauge(A, 1e308),
                gauge(B, 2.0),
                gauge("http.inbound_0.0.0.0_1;.downstream_rq_active", 0.1),
                gauge("http.inbound_0.0.0.0_2;.downstream_rq_active", -0.0),
            ],
            CAP,
        );
        assert_eq!(rejected, 2);
        assert_eq!(first, Some(Rejection::BadValue(1e308)));
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0], (B.to_string(), 2.0));
        assert!(kept[1].1.is_sign_positive(), "-0 is stored as 0");
    }

    #[test]
    fn metrics_of_a_family_are_each_checked_and_summed() {
        let mut f = gauge(A, 5.0);
        f.metric.push(f.metric[0].clone());
        assert_eq!(run(vec![f.clone()], CAP).0, vec![(A.to_string(), 10.0)]);
        // A negative metric cannot hide in a sum.
        f.metric[1].gauge = Some(Gauge { value: Some(-3.0) });
        assert_eq!(run(vec![f.clone()], CAP).2, Some(Rejection::BadValue(-3.0)));
        // Each fine, the sum past the bound.
        f.metric[0].gauge = Some(Gauge {
            value: Some(MAX_GAUGE),
        });
        f.metric[1].gauge = Some(Gauge { value: Some(1.0) });
        assert_eq!(
            run(vec![f], CAP).2,
            Some(Rejection::BadValue(MAX_GAUGE + 1.0))
        );
    }

    #[test]
    fn a_gauge_without_its_value_field_is_zero() {
        let mut f = gauge(A, 1.0);
        f.metric[0].gauge = Some(Gauge { value: None });
        let (kept, rejected, _) = run(vec![f.clone()], CAP);
        assert_eq!((kept, rejected), (vec![(A.to_string(), 0.0)], 0));
        // Untyped too.
        f.metric[0].gauge = None;
        f.metric[0].untyped = Some(Untyped { value: None });
        assert_eq!(run(vec![f], CAP).0, vec![(A.to_string(), 0.0)]);
    }

    #[test]
    fn family_without_a_gauge_has_no_value() {
        let mut f = gauge(A, 1.0);
        f.metric[0].gauge = None;
        f.metric[0].counter = Some(Counter {
            value: Some(4.0),
            ..Default::default()
        });
        let (kept, rejected, first) = run(vec![f.clone()], CAP);
        assert!(kept.is_empty());
        assert_eq!((rejected, first), (1, Some(Rejection::NoValue)));
        f.metric.clear();
        assert_eq!(run(vec![f], CAP).2, Some(Rejection::NoValue));
    }

    #[test]
    fn a_repeated_name_is_set_again_not_added() {
        let (kept, rejected, _) = run(
            vec![
                gauge(A, 3.0),
                gauge(B, 1.0),
                gauge(A, 4.0),
                gauge(A, f64::NAN),
            ],
            CAP,
        );
        // The last valid value wins; the NaN is rejected and changes nothing.
        assert_eq!(kept, vec![(A.to_string(), 4.0), (B.to_string(), 1.0)]);
        assert_eq!(rejected, 1);
    }

    #[test]
    fn families_past_the_cap_are_rejected_but_repeats_still_update() {
        let names: Vec<String> = (0..10)
            .map(|i| format!("http.inbound_0.0.0.0_{i};.downstream_rq_active"))
            .collect();
        let mut families: Vec<MetricFamily> = names.iter().map(|n| gauge(n, 1.0)).collect();
        families.push(gauge(&names[0], 5.0));
        let (kept, rejected, first) = run(families, 3);
        assert_eq!(
            kept,
            vec![
                (names[0].clone(), 5.0),
                (names[1].clone(), 1.0),
                (names[2].clone(), 1.0)
            ]
        );
        assert_eq!((rejected, first), (7, Some(Rejection::OverCap)));
    }

    #[test]
    fn name_after_other_fields_is_still_found() {
        // Hand-built family with `help` (field 2) before `name` (field 1).
        let name = A.as_bytes();
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
            CAP,
            &mut kept,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(pairs(&kept), vec![(A, 5.0)]);
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
                parse(bad, &filter, CAP, &mut kept, &mut Vec::new()).is_err(),
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
        families.insert(300, gauge(A, 42.0));
        let bytes = encode(true, families);
        let full = StreamMetricsMessage::decode(bytes.as_slice()).unwrap();
        let mut kept = Vec::new();
        let parsed = parse(&bytes, &filter, CAP, &mut kept, &mut Vec::new()).unwrap();
        assert_eq!(parsed.families as usize, full.envoy_metrics.len());
        assert_eq!(pairs(&kept), vec![(A, 42.0)]);
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut kept = Vec::new();
            let _ = parse(&bytes, &NameFilter::defaults(9000), CAP, &mut kept, &mut Vec::new());
        }

        #[test]
        fn never_panics_on_truncation(cut in 0usize..200) {
            let bytes = encode(true, vec![gauge("http.inbound_0.0.0.0_8080;.downstream_rq_active", 1.0); 3]);
            let cut = cut.min(bytes.len());
            let mut kept = Vec::new();
            let _ = parse(&bytes[..cut], &NameFilter::defaults(9000), CAP, &mut kept, &mut Vec::new());
        }
    }
}
