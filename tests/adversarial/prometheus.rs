//! Trigger metadata and Prometheus servers: deep PromQL and formulas, files
//! named by `caCert` and the credential keys, endless responses.

use std::time::Duration;

use activescale::proto::{ScaledObjectRef, external_scaler_client::ExternalScalerClient};
use tonic::{Code, Status, transport::Channel};

use crate::common::{self, start_server, test_config};

/// A prometheus-source trigger of namespace `ns`; `serverAddress` defaults to
/// a closed port (GetMetricSpec never asks the server).
fn prom(ns: &str, pairs: &[(&str, &str)]) -> ScaledObjectRef {
    let mut r = common::so_ref(ns, "worker", pairs);
    r.scaler_metadata
        .insert("source".into(), "prometheus".into());
    r.scaler_metadata
        .entry("serverAddress".into())
        .or_insert_with(|| "http://127.0.0.1:1".into());
    r.scaler_metadata
        .entry("targetValue".into())
        .or_insert_with(|| "1".into());
    r
}

async fn spec(c: &mut ExternalScalerClient<Channel>, r: &ScaledObjectRef) -> Result<f64, Status> {
    c.get_metric_spec(r.clone())
        .await
        .map(|s| s.into_inner().metric_specs[0].target_size_float)
}

/// The refusal is INVALID_ARGUMENT and its message has every one of `needles`.
#[track_caller]
fn assert_refused(result: Result<f64, Status>, needles: &[&str]) {
    let s = result.expect_err("should be refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    for n in needles {
        assert!(
            s.message().contains(n),
            "{:?} should mention {n:?}",
            s.message()
        );
    }
}

/// A trigger that parses: the server still answers after each attack.
fn healthy(ns: &str) -> ScaledObjectRef {
    prom(ns, &[("query", "sum(up)"), ("targetValue", "7")])
}

#[tokio::test]
async fn promql_nested_behind_a_comment_is_refused_and_the_server_lives_on() {
    let server = start_server(test_config()).await;
    let mut c = server.scaler_client().await;
    // `#` starts a comment to the end of the line; a quote inside it once
    // hid everything after it from the depth count, and the parser's
    // recursion then overflowed the worker's stack: the process aborted.
    let minus = format!("# \"\n{}up", "-".repeat(16_000));
    let parens = format!("# \"\n{}up{}", "(".repeat(8_000), ")".repeat(8_000));
    let selector = format!("a=\"1\"}} + {}x{{b=\"2\"", "-".repeat(8_000));
    let cases = [
        (prom("deep", &[("query", &minus)]), "query", &minus),
        (prom("deep", &[("query", &parens)]), "query", &parens),
        (
            prom("deep", &[("formula", "lag"), ("query.lag", &minus)]),
            "query.lag",
            &minus,
        ),
        (
            prom(
                "deep",
                &[("preset", "membrane-capacity"), ("selector", &selector)],
            ),
            "selector",
            &selector,
        ),
    ];
    for (r, key, value) in &cases {
        let shown = format!("{value:?}");
        let refused = spec(&mut c, r).await;
        if let Err(s) = &refused {
            assert!(s.message().len() < 1024, "the value is cut: {s:?}");
        }
        assert_refused(
            refused,
            &[
                &format!("`{key}`"),
                &shown[..12],
                "nests more than 64 levels deep",
            ],
        );
        assert_eq!(spec(&mut c, &healthy("deep")).await.unwrap(), 7.0);
    }
}

#[tokio::test]
async fn formulas_nested_too_deep_are_refused_and_the_server_lives_on() {
    let server = start_server(test_config()).await;
    let mut c = server.scaler_client().await;
    let parens = format!("{}lag{}", "(".repeat(2_000), ")".repeat(2_000));
    let minus = format!("{}lag", "-".repeat(4_000));
    let chain = format!("lag{}", " + lag".repeat(600));
    for formula in [&parens, &minus, &chain] {
        let r = prom("deep", &[("formula", formula), ("query.lag", "sum(up)")]);
        assert_refused(
            spec(&mut c, &r).await,
            &[
                "`formula`",
                &formula[..8],
                "nested more than 32 levels deep",
            ],
        );
        assert_eq!(spec(&mut c, &healthy("deep")).await.unwrap(), 7.0);
    }
}

#[allow(dead_code)]
const GENEROUS: Duration = Duration::from_secs(30);
