//! Callers that give up while their request is held *inside* hyper (a
//! kept-alive HTTP/1.1 connection's later request, an HTTP/2 stream), as
//! opposed to a cold connection's first request, held before hyper
//! (`early.rs`). A held request that nobody waits for any more must leave
//! the route's pending count at once: that count is what KEDA scales on,
//! and a phantom one would keep a workload up until the hold timeout.

use std::time::Duration;

use activescale::{
    activator::ActivatorSettings,
    proto::{GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tonic::transport::{Channel, Endpoint};

use super::support::*;

/// Settings whose hold timeout is far past `within`'s wait: only noticing
/// the caller leave can bring the count down in time.
fn patient(port: u16) -> ActivatorSettings {
    let mut s = settings(vec![route("web.example.com", None, port)]);
    s.config.hold_timeout = Duration::from_secs(600);
    s
}

async fn grpc_channel(proxy: &Proxy) -> Channel {
    Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .origin("http://web.example.com".parse().unwrap())
        .connect()
        .await
        .unwrap()
}

/// A unary call to the held route, on its own task so that the test can
/// cancel it.
fn held_call(channel: Channel) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = ExternalScalerClient::new(channel)
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(ScaledObjectRef::default()),
                metric_name: "requests".into(),
            })
            .await;
    })
}

#[tokio::test]
async fn a_kept_alive_client_that_hangs_up_while_held_frees_its_place() {
    let port = free_port();
    let proxy = Proxy::start(patient(port.n)).await;
    let web = proxy.route(0);
    let upstream = Upstream::echo(&port).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /1 HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        .await
        .unwrap();
    // The first answer: this connection now belongs to hyper, so its next
    // request is held there, not before it.
    let first = read_response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    upstream.stop().await;
    let mut load = web.watch();
    conn.write_all(b"GET /2 HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        .await
        .unwrap();
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    within(async {
        while web.pending() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(conn);
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert_eq!(web.pending(), 0);
    assert!(!proxy.metrics().contains(r#"reason="timeout"} 1"#));
}

#[tokio::test]
async fn a_grpc_call_cancelled_while_held_frees_its_place_and_the_connection_stays() {
    let port = free_port();
    let proxy = Proxy::start(patient(port.n)).await;
    let web = proxy.route(0);
    let mut load = web.watch();
    let channel = grpc_channel(&proxy).await;
    let call = held_call(channel.clone());
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    // Dropping the call resets its stream (RST_STREAM CANCEL); the
    // connection stays open for the channel's other calls.
    call.abort();
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert_eq!(web.pending(), 0);

    // The same connection still carries a call held and then answered.
    let again = held_call(channel);
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    let _upstream = Upstream::grpc(&port).await;
    within(again).await.unwrap();
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert!(!proxy.metrics().contains(r#"reason="timeout"} 1"#));
}

#[tokio::test]
async fn an_http2_client_that_hangs_up_while_held_frees_its_place() {
    let port = free_port();
    let proxy = Proxy::start(patient(port.n)).await;
    let web = proxy.route(0);
    let mut load = web.watch();
    let channel = grpc_channel(&proxy).await;
    let calls = [held_call(channel.clone()), held_call(channel.clone())];
    within(load.wait_for(|n| *n == 2)).await.unwrap();
    // The whole connection goes: every call and every handle to it.
    for call in &calls {
        call.abort();
    }
    drop(channel);
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert_eq!(web.pending(), 0);
    assert!(!proxy.metrics().contains(r#"reason="timeout"} 1"#));
}
