//! The plain HTTP/1.1 path (requests to a ready route relayed without
//! hyper) through real sockets: response framings, pipelining, upstream
//! connections that close or misbehave, the hand-over to hyper on the same
//! client connection, and drain.

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::support::*;

/// A bare upstream: reads each request head (and its `Content-Length`
/// body), records `"<connection> <request line>"`, and writes what
/// `answer` returns for the request line; `close` after it when asked.
async fn scripted(port: &Port, answer: fn(&str) -> (Vec<u8>, bool)) -> Arc<Mutex<Vec<String>>> {
    let listener = listen(port).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut id = 0;
        while let Ok((mut tcp, _)) = listener.accept().await {
            id += 1;
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + 4 + len {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + len);
                    let line = head.lines().next().unwrap_or("").to_string();
                    log.lock().unwrap().push(format!("{id} {line}"));
                    let (bytes, close) = answer(&line);
                    if tcp.write_all(&bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    seen
}

/// Everything the proxy sends until it closes the connection.
async fn read_to_close(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    within(conn.read_to_end(&mut got)).await.unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads until `end` has arrived.
async fn read_until(conn: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(end) {
        let n = within(conn.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A proxy whose only route is ready (probed) before the test goes on.
async fn ready_proxy(port: &Port) -> Proxy {
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    within(proxy.route(0).ready_watch().wait_for(|r| *r))
        .await
        .unwrap();
    proxy
}

fn get_raw(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
}

fn framings(line: &str) -> (Vec<u8>, bool) {
    let bytes: &[u8] = if line.contains("/chunked") {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    } else if line.contains("/close") {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    } else {
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength"
    };
    (bytes.to_vec(), line.contains("/close"))
}

#[tokio::test]
async fn chunked_length_and_close_delimited_answers_arrive_whole() {
    let port = free_port();
    let seen = scripted(&port, framings).await;
    let proxy = ready_proxy(&port).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();

    conn.write_all(get_raw("/chunked").as_bytes())
        .await
        .unwrap();
    let chunked = read_until(&mut conn, "X-Trailer: t\r\n\r\n").await;
    assert!(chunked.starts_with("HTTP/1.1 200 OK\r\n"), "{chunked}");
    assert!(
        chunked.contains("Transfer-Encoding: chunked\r\n"),
        "{chunked}"
    );
    assert!(
        chunked.ends_with("\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
        "{chunked}"
    );

    // The same client connection, and the same upstream one: the chunked
    // body ended where its framing said.
    conn.write_all(get_raw("/length").as_bytes()).await.unwrap();
    let length = read_response(&mut conn).await;
    assert!(length.ends_with("\r\n\r\nlength"), "{length}");

    // No framing: the body runs to the upstream's close, and the client is
    // told the connection ends with it.
    conn.write_all(get_raw("/close").as_bytes()).await.unwrap();
    let close = read_to_close(&mut conn).await.to_ascii_lowercase();
    assert!(close.contains("\r\nconnection: close\r\n"), "{close}");
    assert!(close.ends_with("\r\n\r\nuntil the end"), "{close}");

    // (The route's probe connections are numbered too.)
    let seen = seen.lock().unwrap().clone();
    let conn_of = |s: &String| s.split(' ').next().unwrap().to_string();
    let lines: Vec<&str> = seen.iter().map(|s| s.split_once(' ').unwrap().1).collect();
    assert_eq!(
        lines,
        [
            "GET /chunked HTTP/1.1",
            "GET /length HTTP/1.1",
            "GET /close HTTP/1.1"
        ]
    );
    assert!(
        seen.iter().all(|s| conn_of(s) == conn_of(&seen[0])),
        "{seen:?}"
    );
    assert!(proxy.metrics().contains(
        "activescale_activator_requests_total{host=\"web.example.com\",path_prefix=\"/\",class=\"2xx\"} 3"
    ), "{}", proxy.metrics());
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let port = free_port();
    let _seen = scripted(&port, |line| {
        (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
                line.len()
            )
            .into_bytes(),
            false,
        )
    })
    .await;
    let proxy = ready_proxy(&port).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let three = format!(
        "{}POST /2 HTTP/1.1\r\nHost: web.example.com\r\nContent-Length: 2\r\n\r\nab{}",
        get_raw("/1"),
        get_raw("/3")
    );
    conn.write_all(three.as_bytes()).await.unwrap();
    for want in ["GET /1 HTTP/1.1", "POST /2 HTTP/1.1", "GET /3 HTTP/1.1"] {
        let r = read_response(&mut conn).await;
        assert!(r.ends_with(want), "{r}");
    }
}

#[tokio::test]
async fn an_upstream_that_closes_a_kept_connection_gets_a_fresh_one() {
    let port = free_port();
    // Closes after every answer without saying so: what an upstream's own
    // idle timeout looks like from here.
    let seen = scripted(&port, |_| {
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            true,
        )
    })
    .await;
    let proxy = ready_proxy(&port).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    for path in ["/1", "/2", "/3"] {
        conn.write_all(get_raw(path).as_bytes()).await.unwrap();
        let r = read_response(&mut conn).await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("ok"),
            "{r}"
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().any(|s| s.starts_with("3 ")),
        "a new connection each time: {seen:?}"
    );
}

#[tokio::test]
async fn an_upstream_that_misbehaves_gets_a_502_or_a_cut_connection() {
    let port = free_port();
    let _seen = scripted(&port, |line| {
        if line.contains("/conflict") {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
                true,
            )
        } else {
            // Promises ten bytes, sends three.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
                true,
            )
        }
    })
    .await;
    let proxy = ready_proxy(&port).await;

    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(get_raw("/conflict").as_bytes())
        .await
        .unwrap();
    let bad = read_to_close(&mut conn).await;
    assert!(bad.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{bad}");
    assert!(bad.contains("conflicting Content-Length values"), "{bad}");

    // Mid-body: the client cannot be told otherwise, so its connection is
    // cut short of the promised length.
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(get_raw("/short").as_bytes()).await.unwrap();
    let short = read_to_close(&mut conn).await;
    assert!(short.ends_with("\r\n\r\nabc"), "{short}");
    assert!(
        proxy.metrics().contains("class=\"5xx\"} 1"),
        "{}",
        proxy.metrics()
    );
    assert_eq!(proxy.route(0).load(), 0);
}

#[tokio::test]
async fn requests_the_relay_leaves_go_to_hyper_on_the_same_connection() {
    let port = free_port();
    let _upstream = Upstream::echo(&port).await;
    let proxy = ready_proxy(&port).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    // Relayed first, then a chunked upload (hyper's), then a plain GET
    // again, which hyper now serves: one client connection throughout.
    conn.write_all(get_raw("/first").as_bytes()).await.unwrap();
    let first = read_response(&mut conn).await;
    assert!(first.contains("GET /first\n"), "{first}");
    conn.write_all(
        b"POST /up HTTP/1.1\r\nHost: web.example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let up = read_response(&mut conn).await;
    assert!(
        up.contains("POST /up\n") && up.ends_with("body=abc"),
        "{up}"
    );
    conn.write_all(get_raw("/last").as_bytes()).await.unwrap();
    let last = read_response(&mut conn).await;
    assert!(last.contains("GET /last\n"), "{last}");
    // The forwarding fields are the same on both paths.
    for r in [&first, &last] {
        assert!(r.contains("x-forwarded-for: 127.0.0.1\n"), "{r}");
        assert!(
            r.contains("forwarded: for=127.0.0.1;host=web.example.com;proto=http\n"),
            "{r}"
        );
        assert!(r.contains("x-forwarded-proto: http\n"), "{r}");
    }
    // Hop-by-hop answer fields are dropped on both paths too.
    for r in [&first, &last] {
        let lower = r.to_ascii_lowercase();
        assert!(
            !lower.contains("x-internal") && !lower.contains("keep-alive"),
            "{r}"
        );
        assert!(lower.contains("x-kept: yes"), "{r}");
    }
}

#[tokio::test]
async fn drain_closes_idle_relayed_connections_and_finishes_busy_ones() {
    let port = free_port();
    let (upstream, mut arrived, release) = Upstream::gated(&port).await;
    let proxy = ready_proxy(&port).await;
    // One connection served and now idle; one with a request in flight.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(get_raw("/a").as_bytes()).await.unwrap();
    within(arrived.recv()).await.unwrap();
    release.notify_one();
    let _ = read_response(&mut idle).await;
    let mut busy = TcpStream::connect(proxy.addr).await.unwrap();
    busy.write_all(get_raw("/b").as_bytes()).await.unwrap();
    within(arrived.recv()).await.unwrap();

    proxy.shutdown.cancel();
    // Nothing is owed on the idle one: it closes.
    assert_eq!(read_to_close(&mut idle).await, "");
    // The busy one gets its answer, marked as the connection's last.
    assert!(!proxy.task.is_finished());
    release.notify_one();
    let last = read_to_close(&mut busy).await.to_ascii_lowercase();
    assert!(
        last.contains("\r\nconnection: close\r\n") && last.ends_with("finally"),
        "{last}"
    );
    within(proxy.task).await.unwrap();
    drop(upstream);
}
