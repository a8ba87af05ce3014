mod common;

use std::time::Duration;

use common::{envoy::*, *};

#[tokio::test]
async fn smoke_sidecar_to_get_metrics() {
    let server = start_server(test_config()).await;
    let mut sidecar = Sidecar::connect(
        server.sink,
        istio_node("shop", "web-1", &[("app", "web")], "web"),
    )
    .await;
    sidecar.push_gauges(&[(&inbound(8080), 3.0)]).await;
    let mut client = server.scaler_client().await;
    let req = activescale::proto::GetMetricsRequest {
        scaled_object_ref: Some(activescale::proto::ScaledObjectRef {
            name: "web".into(),
            namespace: "shop".into(),
            scaler_metadata: [
                ("labelSelector".to_string(), "app=web".to_string()),
                ("targetValue".to_string(), "10".to_string()),
            ]
            .into(),
        }),
        metric_name: "s0-active_requests".into(),
    };
    eventually(Duration::from_secs(5), "value 3", || {
        let mut c = client.clone();
        let r = req.clone();
        async move {
            c.get_metrics(r)
                .await
                .map(|v| v.into_inner().metric_values[0].metric_value_float == 3.0)
                .unwrap_or(false)
        }
    })
    .await;
    let _ = &mut client;
    server.stop().await.unwrap();
}
