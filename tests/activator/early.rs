//! HTTP/1.1 requests held before hyper (src/activator/early.rs): raw TCP
//! clients, so that what is on the wire is exactly what the test says.

use std::time::Duration;

use activescale::activator::COLD_START_HEADER;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::support::*;

#[tokio::test]
async fn a_raw_held_request_gets_its_cold_start_header_and_keeps_its_connection() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    let web = proxy.route(0);
    let mut load = web.watch();
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /cold HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        .await
        .unwrap();
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    assert_eq!((web.pending(), web.active()), (1, 0));

    let _upstream = Upstream::echo(&port).await;
    let first = read_response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("GET /cold\n"), "{first}");
    let held = first
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{COLD_START_HEADER}: ")))
        .unwrap_or_else(|| panic!("no cold-start header in {first}"));
    assert!(held.trim().parse::<u64>().is_ok(), "{held}");

    // The connection is hyper's now: a second request on it goes straight
    // through, without the header.
    conn.write_all(b"GET /warm HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        .await
        .unwrap();
    let second = read_response(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.contains("GET /warm\n"), "{second}");
    assert!(!second.contains(COLD_START_HEADER), "{second}");
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    let text = proxy.metrics();
    for line in [
        r#"activescale_activator_cold_starts_total{host="web.example.com",path_prefix="/"} 1"#,
        r#"activescale_activator_hold_seconds_count{host="web.example.com",path_prefix="/"} 1"#,
        r#"activescale_activator_requests_total{host="web.example.com",path_prefix="/",class="2xx"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_while_held_frees_its_place() {
    let port = free_port();
    let mut s = settings(vec![route("web.example.com", None, port.n)]);
    s.config.max_pending = 1;
    let proxy = Proxy::start(s).await;
    let web = proxy.route(0);
    let mut load = web.watch();
    let mut gone = TcpStream::connect(proxy.addr).await.unwrap();
    gone.write_all(b"GET / HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        .await
        .unwrap();
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    assert_eq!(web.pending(), 1);
    drop(gone);
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert_eq!(web.pending(), 0);

    // The one place (max_pending 1) is free again: the next request is held, not refused.
    let mut next = TcpStream::connect(proxy.addr).await.unwrap();
    next.write_all(b"GET /next HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        .await
        .unwrap();
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    let _upstream = Upstream::echo(&port).await;
    let reply = read_response(&mut next).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(!proxy.metrics().contains(r#"reason="full"} 1"#));
}

#[tokio::test]
async fn a_client_that_hangs_up_with_its_body_unread_frees_its_place() {
    let port = free_port();
    let mut s = settings(vec![route("web.example.com", None, port.n)]);
    // Far past `within`'s wait: only noticing the hang-up frees the place.
    s.config.hold_timeout = Duration::from_secs(600);
    let proxy = Proxy::start(s).await;
    let web = proxy.route(0);
    let mut load = web.watch();
    let mut gone = TcpStream::connect(proxy.addr).await.unwrap();
    gone.write_all(
        b"POST /upload HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 100\r\n\r\n",
    )
    .await
    .unwrap();
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    // Body bytes after the head was read stay in the socket: it stays
    // readable, so a peek cannot see the hang-up behind them.
    gone.write_all(b"first half").await.unwrap();
    gone.flush().await.unwrap();
    tokio::task::yield_now().await;
    drop(gone);
    // Found by the kernel's POLLRDHUP, well within the hold timeout.
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert_eq!(web.pending(), 0);
    assert!(
        !proxy.metrics().contains(r#"reason="timeout"} 1"#),
        "{}",
        proxy.metrics()
    );
}

#[tokio::test]
async fn full_and_timed_out_answers_before_hyper_are_the_usual_ones() {
    let port = free_port();
    let mut s = settings(vec![route("web.example.com", None, port.n)]);
    s.config.max_pending = 1;
    s.config.hold_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(s).await;
    let mut load = proxy.route(0).watch();
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    let mut full = TcpStream::connect(proxy.addr).await.unwrap();
    // With a body it will never be asked for: the answer must still arrive
    // (not be lost to a reset when the proxy closes with it unread).
    let body = "x".repeat(16 * 1024);
    full.write_all(
        format!(
            "POST / HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut full).await;
    assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
    assert!(
        r.contains("retry-after: 1\r\n") && r.contains("connection: close\r\n"),
        "{r}"
    );
    assert!(
        r.ends_with("(activator_max_pending 1); retry later\n"),
        "{r}"
    );

    let r = read_response(&mut held).await;
    assert!(r.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{r}");
    assert!(
        r.contains("timed out after 300ms waiting for the workload behind web.example.com"),
        "{r}"
    );
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    let text = proxy.metrics();
    for reason in ["full", "timeout"] {
        let line = format!(
            r#"activescale_activator_rejected_total{{host="web.example.com",path_prefix="/",reason="{reason}"}} 1"#
        );
        assert!(text.contains(&line), "missing {line}\n{text}");
    }
}

#[tokio::test]
async fn oversized_and_malformed_heads_get_hypers_answers() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    // Exactly the 32 KiB head limit, still not finished: 431.
    let mut big = b"GET / HTTP/1.1\r\nHost: web.example.com\r\nX-Big: ".to_vec();
    big.resize(32 * 1024, b'a');
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(&big).await.unwrap();
    let r = read_response(&mut conn).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");

    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHo st: web.example.com\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut conn).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // Neither was counted against the route.
    assert_eq!(proxy.route(0).load(), 0);
    assert_eq!(proxy.route(0).take_peak(), 0);
}
