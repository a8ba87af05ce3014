//! A store that refuses writes, namespaces that are not names, and
//! StreamIsActive through a store outage. See `main.rs`.

use activescale::proto::ScaledObjectRef;
use tonic::Code;

use crate::common::*;

/// Namespaces that are not Kubernetes namespace names (RFC 1123 labels).
fn not_namespaces() -> Vec<String> {
    [
        ".",
        "..",
        "a/b",
        "../etc",
        "Shop",
        "shop\n",
        "sh\nop",
        "-shop",
        "shop-",
        "shop.prod",
        "shop_prod",
        "",
    ]
    .map(String::from)
    .into_iter()
    .chain([
        "a".repeat(64),
        "\u{e9}t\u{e9}".into(),
        "shop\"} or vector(1) #".into(),
    ])
    .collect()
}

/// Every call KEDA makes with `r` is INVALID_ARGUMENT naming `field`, the
/// escaped value and what is accepted.
async fn assert_refused_everywhere(server: &TestServer, r: &ScaledObjectRef, field: &str, v: &str) {
    let mut client = server.scaler_client().await;
    let calls = [
        client.get_metric_spec(r.clone()).await.map(drop),
        client.is_active(r.clone()).await.map(drop),
        get_metric(&mut client, r).await.map(drop),
        client.stream_is_active(r.clone()).await.map(drop),
    ];
    for result in calls {
        let e = result.expect_err(&format!("{field} = {v:?} must be refused"));
        assert_eq!(e.code(), Code::InvalidArgument, "{field} = {v:?}: {e:?}");
        for needle in [field, &format!("{v:?}"), "RFC 1123"] {
            assert!(
                e.message().contains(needle),
                "{field} = {v:?}: {:?} should mention {needle:?}",
                e.message()
            );
        }
    }
}

#[tokio::test]
async fn scaled_object_namespace_must_be_a_namespace_name_for_every_source() {
    let server = start_server(test_config()).await;
    let sources: [&[(&str, &str)]; 2] = [
        &[("labelSelector", "app=web"), ("targetValue", "10")],
        &[
            ("source", "prometheus"),
            ("serverAddress", "http://127.0.0.1:1"),
            ("query", "sum(up)"),
            ("targetValue", "10"),
        ],
    ];
    for pairs in sources {
        // The same trigger in a proper namespace is fine.
        let mut client = server.scaler_client().await;
        client
            .get_metric_spec(so_ref("shop", "web", pairs))
            .await
            .expect("a valid trigger");
        for ns in not_namespaces() {
            let r = so_ref(&ns, "web", pairs);
            assert_refused_everywhere(&server, &r, "namespace", &ns).await;
        }
    }
}

#[tokio::test]
async fn trigger_namespace_key_must_be_a_namespace_name() {
    for allow_cross_namespace in [false, true] {
        let mut config = test_config();
        config.allow_cross_namespace = allow_cross_namespace;
        let server = start_server(config).await;
        // Metadata values are trimmed and an empty one is absent: those
        // forms would name a proper namespace (or none), so they are not here.
        for ns in not_namespaces()
            .into_iter()
            .filter(|v| !v.trim().is_empty() && v.trim() == v)
        {
            let r = so_ref(
                "shop",
                "web",
                &[
                    ("labelSelector", "app=web"),
                    ("targetValue", "10"),
                    ("namespace", &ns),
                ],
            );
            assert_refused_everywhere(&server, &r, "`namespace`", &ns).await;
        }
    }
}
