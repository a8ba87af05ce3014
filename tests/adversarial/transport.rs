//! The open ports themselves: slowloris on the HTTP port. See `main.rs`.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::*;

/// Connections that never finish their request head.
const SLOW: usize = 400;

/// Opens a connection that sends half a request head and then nothing.
async fn slow_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: activescale\r\nX-Slow: ")
        .await
        .expect("write half a head");
    c
}

/// Far beyond the 1 s header timeout: only a server that never closes them
/// gets here, and then the test fails instead of hanging.
const NEVER: Duration = Duration::from_secs(120);

/// Waits for the server to close `c`: EOF, or a reset; false if it never does.
async fn closed_by_server(c: TcpStream) -> bool {
    tokio::time::timeout(NEVER, until_closed(c)).await.is_ok()
}

async fn until_closed(mut c: TcpStream) {
    let mut buf = [0u8; 512];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            // hyper may answer 408 before closing; keep reading to the end.
            Ok(_) => continue,
        }
    }
}

async fn healthz(server: &TestServer) -> reqwest::StatusCode {
    reqwest::get(server.http_url("/healthz"))
        .await
        .expect("GET /healthz")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_healthz_keeps_answering() {
    let server = start_server({
        let mut c = test_config();
        c.http.header_timeout = Duration::from_secs(1);
        c
    })
    .await;
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        slow.push(slow_client(server.http).await);
    }
    // While all of them hang, the port still serves.
    assert_eq!(healthz(&server).await, reqwest::StatusCode::OK);
    // Every one of them is closed by the server; without a header timeout
    // this would wait for ever (the test harness's timeout would fail it).
    let closed = futures::future::join_all(slow.into_iter().map(closed_by_server)).await;
    assert!(closed.iter().all(|c| *c), "every slow connection closed");
    assert_eq!(healthz(&server).await, reqwest::StatusCode::OK);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_do_not_hold_the_drain() {
    // A drain far longer than the header timeout: `stop` returning at all
    // (the harness times the test out otherwise) shows the hanging
    // connections were closed, not waited for until the drain ran out.
    let server = start_server({
        let mut c = test_config();
        c.http.header_timeout = Duration::from_secs(1);
        c.servers.drain_timeout = Duration::from_secs(3600);
        c
    })
    .await;
    let mut slow = Vec::with_capacity(50);
    for _ in 0..50 {
        slow.push(slow_client(server.http).await);
    }
    assert_eq!(healthz(&server).await, reqwest::StatusCode::OK);
    tokio::time::timeout(NEVER, server.stop())
        .await
        .expect("the drain waited for connections that never sent a request")
        .expect("clean stop");
    let closed = futures::future::join_all(slow.into_iter().map(closed_by_server)).await;
    assert!(closed.iter().all(|c| *c));
}

#[test]
fn header_timeout_outside_its_range_is_refused_naming_the_setting() {
    for bad in ["0s", "31s", "1h"] {
        let e = activescale::config::Config::load_from(
            None,
            std::iter::empty(),
            &[("http_header_timeout", bad.to_string())],
        )
        .expect_err(bad);
        let msg = e.to_string();
        assert!(msg.contains("http_header_timeout"), "{msg}");
        assert!(msg.contains("between 1s and 30s"), "{msg}");
    }
}
