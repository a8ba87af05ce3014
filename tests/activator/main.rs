//! The activator proxy through real sockets: a real upstream that is down
//! (its port refuses) and then starts, real HTTP/1.1, HTTP/2 (tonic gRPC) and
//! WebSocket (tungstenite) clients. Every wait is on an event (the route's
//! count, its readiness, a response); the only timeouts are safety nets and
//! the short hold timeouts under test.

#[path = "../common/mod.rs"]
mod common;
mod early;
mod hangup;
mod memory;
mod relay;
mod support;

// As in the binary, so that the memory measurement is representative.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use activescale::{
    activator::COLD_START_HEADER,
    proto::{GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient},
};
use futures::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn held_requests_are_answered_by_the_upstream_once_it_starts() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    let web = proxy.route(0);
    let mut load = web.watch();
    assert_eq!(*load.borrow(), 0);

    let plain = tokio::spawn(send(proxy.addr, get("web.example.com", "/hello")));
    let post = tokio::spawn(send(
        proxy.addr,
        request("POST", "web.example.com", "/orders", "a body of sixteen"),
    ));
    // The seam: the route's count is 2 while both wait, before any upstream exists.
    within(load.wait_for(|n| *n == 2)).await.unwrap();
    assert_eq!((web.pending(), web.active()), (2, 0));
    assert!(!web.is_ready());

    let _upstream = Upstream::echo(&port).await;
    let (plain, post) = (within(plain).await.unwrap(), within(post).await.unwrap());
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert!(plain.body.starts_with("GET /hello\n"), "{}", plain.body);
    assert_eq!(post.status, 200, "{}", post.body);
    assert!(post.body.starts_with("POST /orders\n"), "{}", post.body);
    assert!(
        post.body.ends_with("body=a body of sixteen"),
        "{}",
        post.body
    );
    for r in [&plain, &post] {
        let held: u64 = r
            .header(COLD_START_HEADER)
            .expect("cold-start header")
            .parse()
            .unwrap();
        assert!(held < 20_000, "{held}");
    }
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert_eq!(web.take_peak(), 2);
    assert_eq!(web.take_peak(), 0);

    let text = proxy.metrics();
    for line in [
        r#"activescale_activator_cold_starts_total{host="web.example.com",path_prefix="/"} 1"#,
        r#"activescale_activator_hold_seconds_count{host="web.example.com",path_prefix="/"} 2"#,
        r#"activescale_activator_requests_total{host="web.example.com",path_prefix="/",class="2xx"} 2"#,
        r#"activescale_activator_pending_requests{host="web.example.com",path_prefix="/"} 0"#,
        r#"activescale_activator_active_requests{host="web.example.com",path_prefix="/"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // Once ready, requests pass straight through: no cold-start header.
    let warm = within(send(proxy.addr, get("web.example.com", "/again"))).await;
    assert_eq!(warm.status, 200);
    assert_eq!(warm.header(COLD_START_HEADER), None);
}

#[tokio::test]
async fn held_requests_are_sent_in_arrival_order() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    let mut load = proxy.route(0).watch();
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(tokio::spawn(send(
            proxy.addr,
            get("web.example.com", &format!("/{i}")),
        )));
        // Each is queued before the next one is sent.
        within(load.wait_for(|n| *n == i + 1)).await.unwrap();
    }
    // An upstream that serves one connection at a time, in accept order.
    let seen = Upstream::sequential(&port).await;
    for c in clients {
        assert_eq!(within(c).await.unwrap().status, 200);
    }
    assert_eq!(*seen.lock().unwrap(), ["/0", "/1", "/2", "/3", "/4"]);
}

#[tokio::test]
async fn websocket_is_held_then_upgraded_and_copied_both_ways() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("ws.example.com", None, port.n)])).await;
    let mut load = proxy.route(0).watch();
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let client = tokio::spawn(tokio_tungstenite::client_async(
        "ws://ws.example.com/chat",
        tcp,
    ));
    within(load.wait_for(|n| *n == 1)).await.unwrap();

    let _upstream = Upstream::websocket_echo(&port).await;
    let (mut ws, response) = within(client)
        .await
        .unwrap()
        .expect("handshake through the proxy");
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key(COLD_START_HEADER));
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::text("ping")
    );
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(
        within(ws.next()).await.unwrap().unwrap(),
        Message::binary(big)
    );
    // Still counted while the tunnel is open; released when it closes.
    assert_eq!(*load.borrow(), 1);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = within(ws.next()).await {}
    within(load.wait_for(|n| *n == 0)).await.unwrap();
    assert!(
        proxy.metrics().contains(
            r#"activescale_activator_requests_total{host="ws.example.com",path_prefix="/",class="1xx"} 1"#
        )
    );
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_are_held_and_keep_their_trailers() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("grpc.example.com", None, port.n)])).await;
    let mut load = proxy.route(0).watch();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .origin("http://grpc.example.com".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut unary = ExternalScalerClient::new(channel.clone());
    let mut streaming = ExternalScalerClient::new(channel);
    let so = ScaledObjectRef {
        name: "web".into(),
        namespace: "shop".into(),
        scaler_metadata: Default::default(),
    };
    let metrics_call = {
        let so = so.clone();
        tokio::spawn(async move {
            unary
                .get_metrics(GetMetricsRequest {
                    scaled_object_ref: Some(so),
                    metric_name: "requests".into(),
                })
                .await
        })
    };
    let stream_call = tokio::spawn(async move { streaming.stream_is_active(so).await });
    within(load.wait_for(|n| *n == 2)).await.unwrap();

    let _upstream = Upstream::grpc(&port).await;
    let metrics = within(metrics_call).await.unwrap().expect("unary call");
    assert!(metrics.metadata().contains_key(COLD_START_HEADER));
    assert_eq!(metrics.get_ref().metric_values[0].metric_value_float, 42.0);

    let stream = within(stream_call).await.unwrap().expect("stream opens");
    assert!(stream.metadata().contains_key(COLD_START_HEADER));
    let mut stream = stream.into_inner();
    let mut seen = Vec::new();
    let status = loop {
        match within(stream.next()).await {
            Some(Ok(m)) => seen.push(m.result),
            Some(Err(status)) => break status,
            None => panic!("the stream must end with the upstream's status"),
        }
    };
    assert_eq!(seen, [true, false, true]);
    // The status travels in HTTP/2 trailers: it arrives intact.
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert_eq!(status.message(), "that is all");
    within(load.wait_for(|n| *n == 0)).await.unwrap();

    // A trailers-only error answer passes too.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .origin("http://grpc.example.com".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let err = ExternalScalerClient::new(channel)
        .get_metric_spec(ScaledObjectRef::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "no spec here");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let (a, b) = (free_port(), free_port());
    let mut s = settings(vec![
        route("a.example.com", None, a.n),
        route("b.example.com", None, b.n),
    ]);
    s.config.max_pending = 2;
    s.config.max_pending_total = 3;
    let proxy = Proxy::start(s).await;
    let mut load_a = proxy.route(0).watch();
    let _held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(send(proxy.addr, get("a.example.com", "/"))))
        .collect();
    within(load_a.wait_for(|n| *n == 2)).await.unwrap();

    let full = within(send(proxy.addr, get("a.example.com", "/"))).await;
    assert_eq!(full.status, 503);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert!(
        full.body.contains("activator_max_pending 2"),
        "{}",
        full.body
    );

    // Route b has room of its own, but all queues together are capped at 3.
    let mut load_b = proxy.route(1).watch();
    let _held_b = tokio::spawn(send(proxy.addr, get("b.example.com", "/")));
    within(load_b.wait_for(|n| *n == 1)).await.unwrap();
    let total = within(send(proxy.addr, get("b.example.com", "/"))).await;
    assert_eq!(total.status, 503);
    assert!(
        total.body.contains("activator_max_pending_total 3"),
        "{}",
        total.body
    );
    let text = proxy.metrics();
    assert!(
        text.contains(r#"activescale_activator_rejected_total{host="a.example.com",path_prefix="/",reason="full"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_request_held_too_long_gets_504() {
    let port = free_port();
    let mut s = settings(vec![route("web.example.com", None, port.n)]);
    s.config.hold_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(s).await;
    let r = within(send(proxy.addr, get("web.example.com", "/"))).await;
    assert_eq!(r.status, 504);
    assert!(
        r.body
            .contains("timed out after 300ms waiting for the workload behind web.example.com"),
        "{}",
        r.body
    );
    within(proxy.route(0).watch().wait_for(|n| *n == 0))
        .await
        .unwrap();
    assert!(proxy.metrics().contains(
        r#"activescale_activator_rejected_total{host="web.example.com",path_prefix="/",reason="timeout"} 1"#
    ));
}

#[tokio::test]
async fn unknown_hosts_and_paths_get_404_naming_the_host() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route(
        "web.example.com",
        Some("/api"),
        port.n,
    )]))
    .await;
    let r = within(send(proxy.addr, get("nope.example.com", "/api"))).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "no route for host \"nope.example.com\"\n");
    let r = within(send(proxy.addr, get("web.example.com", "/apix"))).await;
    assert_eq!(r.status, 404);
    // A hostile host is cut short and escaped.
    let long = format!("{}.example.com", "a".repeat(500));
    let r = within(send(proxy.addr, get(&long, "/"))).await;
    assert_eq!(r.status, 404);
    assert!(r.body.len() < 200 && r.body.contains("..."), "{}", r.body);
    let r = within(send(proxy.addr, get("we\"b", "/"))).await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("we\\\"b"), "{}", r.body);
    assert!(proxy.metrics().contains(
        r#"activescale_activator_rejected_total{host="",path_prefix="",reason="no_route"} 4"#
    ));
}

#[tokio::test]
async fn routes_by_exact_host_wildcard_and_longest_prefix() {
    let (api, web, any) = (free_port(), free_port(), free_port());
    let proxy = Proxy::start(settings(vec![
        route("web.example.com", None, web.n),
        route("web.example.com", Some("/api"), api.n),
        route("*.example.com", None, any.n),
    ]))
    .await;
    let _u = [
        Upstream::named(&api, "api").await,
        Upstream::named(&web, "web").await,
        Upstream::named(&any, "any").await,
    ];
    for (host, path, who) in [
        ("web.example.com", "/", "web"),
        ("web.example.com", "/api/orders", "api"),
        ("web.example.com", "/apiary", "web"),
        ("WEB.example.com:8081", "/api", "api"),
        ("shop.example.com", "/api", "any"),
        ("a.b.example.com", "/", "any"),
    ] {
        let r = within(send(proxy.addr, get(host, path))).await;
        assert_eq!((r.status, r.body.as_str()), (200, who), "{host}{path}");
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_forwarding_headers_added() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("hdr.example.com", None, port.n)])).await;
    let _upstream = Upstream::echo(&port).await;
    let mut req = get("hdr.example.com", "/h");
    let h = req.headers_mut();
    for (k, v) in [
        ("connection", "x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic eDp5"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-end-to-end", "kept"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    let r = within(send(proxy.addr, req)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: Vec<&str> = r.body.lines().collect();
    for line in [
        "host: hdr.example.com",
        "x-end-to-end: kept",
        "x-forwarded-for: 203.0.113.7, 127.0.0.1",
        "x-forwarded-proto: http",
        "forwarded: for=127.0.0.1;host=hdr.example.com;proto=http",
    ] {
        assert!(
            seen.contains(&line),
            "upstream should see {line:?}:\n{}",
            r.body
        );
    }
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            !seen.iter().any(|l| l.starts_with(&format!("{gone}:"))),
            "upstream should not see {gone}:\n{}",
            r.body
        );
    }
    // And on the way back (the echo upstream adds these).
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.header("x-internal"), None);
    assert_eq!(r.header("keep-alive"), None);
}

#[tokio::test]
async fn keep_alive_reuses_upstream_connections() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    let _upstream = Upstream::echo(&port).await;
    // Ready first: a request held until then goes through hyper's path,
    // whose upstream connections are pooled apart from the relayed ones.
    within(proxy.route(0).ready_watch().wait_for(|r| *r))
        .await
        .unwrap();
    let mut conns = Vec::new();
    for i in 0..4 {
        // A new client connection each time: reuse is the proxy's pool, not the client's.
        let r = within(send(proxy.addr, get("web.example.com", &format!("/{i}")))).await;
        conns.push(r.line("conn=").to_string());
    }
    assert!(conns.windows(2).all(|w| w[0] == w[1]), "{conns:?}");
}

#[tokio::test]
async fn one_client_connection_keeps_its_upstream_connection_for_every_request() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    let _upstream = Upstream::echo(&port).await;
    // One keep-alive client connection: the activator's task for it drives
    // the upstream connection, request after request, bodies included.
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut conns = Vec::new();
    for i in 0..3 {
        let req = request(
            "POST",
            "web.example.com",
            &format!("/{i}"),
            &"x".repeat(100_000),
        );
        let resp = within(sender.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(body.ends_with(&"x".repeat(100_000)), "{}", &body[..100]);
        conns.push(
            body.lines()
                .find_map(|l| l.strip_prefix("conn="))
                .unwrap()
                .to_string(),
        );
    }
    assert!(conns.windows(2).all(|w| w[0] == w[1]), "{conns:?}");
}

#[tokio::test]
async fn an_upstream_that_goes_away_gets_new_requests_held_not_failed() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    let web = proxy.route(0);
    let upstream = Upstream::echo(&port).await;
    assert_eq!(
        within(send(proxy.addr, get("web.example.com", "/1")))
            .await
            .status,
        200
    );
    within(web.ready_watch().wait_for(|r| *r)).await.unwrap();

    // The upstream goes away (its listener and connections close).
    upstream.stop().await;
    let mut load = web.watch();
    let held = tokio::spawn(send(proxy.addr, get("web.example.com", "/2")));
    within(load.wait_for(|n| *n == 1)).await.unwrap();
    within(web.ready_watch().wait_for(|r| !*r)).await.unwrap();
    within(async {
        while web.pending() != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let _back = Upstream::echo(&port).await;
    let r = within(held).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("GET /2"), "{}", r.body);
    assert!(r.header(COLD_START_HEADER).is_some());
    assert!(!proxy.metrics().contains(r#"class="5xx"} 1"#));
}

#[tokio::test]
async fn an_upstream_that_accepts_and_hangs_up_gets_502_not_held() {
    let port = free_port();
    let proxy = Proxy::start(settings(vec![route("web.example.com", None, port.n)])).await;
    // Listens (so probes succeed) but closes every connection at once.
    let listener = listen(&port).await;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    let r = within(send(proxy.addr, get("web.example.com", "/"))).await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body
            .starts_with(&format!("upstream 127.0.0.1:{} failed", port.n)),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn drain_answers_held_requests_503_and_lets_in_flight_ones_finish() {
    let (slow_port, down_port) = (free_port(), free_port());
    let proxy = Proxy::start(settings(vec![
        route("slow.example.com", None, slow_port.n),
        route("down.example.com", None, down_port.n),
    ]))
    .await;
    let (upstream, mut arrived, release) = Upstream::gated(&slow_port).await;
    let in_flight = tokio::spawn(send(proxy.addr, get("slow.example.com", "/slow")));
    within(arrived.recv()).await.unwrap();
    let mut down = proxy.route(1).watch();
    let held = tokio::spawn(send(proxy.addr, get("down.example.com", "/")));
    within(down.wait_for(|n| *n == 1)).await.unwrap();

    let Proxy {
        addr,
        shutdown,
        task,
        routes,
        ..
    } = proxy;
    shutdown.cancel();
    let held = within(held).await.unwrap();
    assert_eq!(held.status, 503);
    assert_eq!(held.header("retry-after"), Some("1"));
    // No new connections once draining.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "the listener must be closed while draining"
    );
    // The in-flight request is still running; let it finish.
    assert!(!in_flight.is_finished());
    assert!(!task.is_finished());
    release.notify_one();
    let done = within(in_flight).await.unwrap();
    assert_eq!((done.status, done.body.as_str()), (200, "finally"));
    within(task).await.unwrap();
    assert_eq!(routes.iter().map(|r| r.load()).sum::<u64>(), 0);
    drop(upstream);
}

#[tokio::test]
async fn idle_and_slow_clients_are_disconnected() {
    let port = free_port();
    let mut s = settings(vec![route("web.example.com", None, port.n)]);
    s.config.header_read_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(s).await;
    // Says nothing at all (the protocol is never known).
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Starts a head and never finishes it.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web.exa")
        .await
        .unwrap();
    // An HTTP/2 preface, then no stream.
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    for conn in [&mut silent, &mut slow, &mut h2] {
        let mut buf = [0u8; 1024];
        // The server closes: EOF (after any bytes it sent first, e.g. a 408
        // or HTTP/2 SETTINGS/GOAWAY) or a reset.
        loop {
            match within(conn.read(&mut buf)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

#[tokio::test]
async fn a_keep_alive_connection_owes_each_next_head_within_the_deadline() {
    let port = free_port();
    let mut s = settings(vec![route("web.example.com", None, port.n)]);
    s.config.header_read_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(s).await;
    let _upstream = Upstream::echo(&port).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    for path in ["/1", "/2"] {
        // Heads on one keep-alive connection, each answered.
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: web.example.com\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let start = seen.len();
        while !String::from_utf8_lossy(&seen[start..]).contains(&format!("GET {path}")) {
            let n = within(conn.read(&mut buf)).await.unwrap();
            assert!(n > 0, "closed before the answer to {path}");
            seen.extend_from_slice(&buf[..n]);
        }
    }
    // Then silence: the next head is owed within header_read_timeout of
    // the last response, so the server closes (EOF, or a reset).
    loop {
        match within(conn.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn route_handles_expose_namespace_and_lookup() {
    let port = free_port();
    let mut r = route("web.example.com", Some("/api/"), port.n);
    r.namespace = "shop".into();
    let proxy = Proxy::start(settings(vec![r])).await;
    // The handles outlive `Activator::serve` having taken the activator.
    assert_eq!(proxy.routes.len(), 1);
    let h = proxy.route(0);
    assert_eq!(
        (h.host(), h.path_prefix(), h.namespace(), h.upstream()),
        (
            "web.example.com",
            Some("/api/"),
            "shop",
            format!("127.0.0.1:{}", port.n).as_str()
        )
    );
    let found = proxy
        .routes
        .find("WEB.example.com", Some("/api"))
        .expect("found");
    assert_eq!(found.namespace(), "shop");
    assert!(proxy.routes.find("web.example.com", None).is_none());
    assert!(
        proxy
            .routes
            .find("other.example.com", Some("/api"))
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_activator_port_and_shows_its_routes() {
    let port = free_port();
    let _upstream = Upstream::echo(&port).await;
    let server = common::start_server({
        let mut c = common::test_config();
        c.servers.activator_addr = Some("127.0.0.1:0".parse().unwrap());
        c.activator.routes = vec![route("web.example.com", None, port.n)];
        c
    })
    .await;
    let proxy = server.addr(activescale::Port::Activator);
    let reply = within(send(proxy, get("web.example.com", "/hello"))).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.starts_with("GET /hello\n"), "{}", reply.body);
    let unknown = within(send(proxy, get("other.example.com", "/"))).await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);

    let (code, status) = common::http_get(&server.http_url("/v1/status")).await;
    assert_eq!(code, 200, "{status}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let routes = status["activator"]
        .as_array()
        .expect("the activator's routes");
    assert_eq!(routes.len(), 1, "{status}");
    assert_eq!(routes[0]["host"], "web.example.com", "{status}");
    assert!(routes[0]["cold_starts"].is_u64(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_wakes_the_workload_through_stream_is_active() {
    // The upstream is down (its port refuses): the workload is at zero.
    let port = free_port();
    let server = common::start_server({
        let mut c = common::test_config();
        c.servers.activator_addr = Some("127.0.0.1:0".parse().unwrap());
        c.activator.routes = vec![route("web.example.com", None, port.n)];
        c
    })
    .await;
    let trigger = |ns: &str| {
        common::so_ref(
            ns,
            "web",
            &[
                ("source", "activator"),
                ("host", "web.example.com"),
                ("targetValue", "1"),
            ],
        )
    };
    // The route belongs to namespace `shop` (support::route).
    let ns = route("web.example.com", None, port.n).namespace;
    let mut scaler = server.scaler_client().await;
    let mut active = idle_stream(&mut scaler, trigger(&ns)).await;

    let held = tokio::spawn(send(
        server.addr(activescale::Port::Activator),
        get("web.example.com", "/wake"),
    ));
    let pushed = within(active.message()).await.unwrap().unwrap();
    assert!(pushed.result, "a held request is activity, pushed at once");
    assert_eq!(
        common::get_metric(&mut scaler, &trigger(&ns)).await.ok(),
        Some(1.0)
    );

    // Another namespace's trigger learns nothing of the route.
    let other = common::get_metric(&mut scaler, &trigger("tenant-b")).await;
    assert_eq!(other.unwrap_err().code(), tonic::Code::NotFound);

    let _upstream = Upstream::echo(&port).await;
    let reply = within(held).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let idle = within(active.message()).await.unwrap().unwrap();
    assert!(!idle.result, "answered: nothing pending or active");
}

/// Polls `/readyz` until 200: the Redis store is subscribed to changes.
async fn until_ready(server: &common::TestServer) {
    within(async {
        loop {
            if common::http_get(&server.http_url("/readyz")).await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_on_one_replica_wakes_streams_on_another_through_redis() {
    let mut redis = common::redis_server::RedisServer::start();
    // The upstream is down (its port refuses): the workload is at zero.
    let port = free_port();
    let config = || {
        redis.config({
            let mut c = common::test_config();
            c.servers.activator_addr = Some("127.0.0.1:0".parse().unwrap());
            c.activator.routes = vec![route("web.example.com", None, port.n)];
            c
        })
    };
    let a = common::start_server(config()).await;
    let b = common::start_server(config()).await;
    until_ready(&a).await;
    until_ready(&b).await;
    let ns = route("web.example.com", None, port.n).namespace;
    let trigger = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("source", "activator"),
            ("host", "web.example.com"),
            ("targetValue", "1"),
        ];
        pairs.extend_from_slice(extra);
        common::so_ref(&ns, "web", &pairs)
    };
    let (plain, windowed) = (trigger(&[]), trigger(&[("window", "10m")]));

    // KEDA's stream is on replica B; the request goes to replica A.
    let mut on_b = b.scaler_client().await;
    let mut active = idle_stream(&mut on_b, plain.clone()).await;

    let held = tokio::spawn(send(
        a.addr(activescale::Port::Activator),
        get("web.example.com", "/wake"),
    ));
    let pushed = within(active.message()).await.unwrap().unwrap();
    assert!(
        pushed.result,
        "A's held request is activity on B, pushed at once"
    );
    assert_eq!(common::get_metric(&mut on_b, &plain).await.ok(), Some(1.0));
    let mut on_a = a.scaler_client().await;
    assert_eq!(common::get_metric(&mut on_a, &plain).await.ok(), Some(1.0));

    // The upstream starts: A forwards and answers, and B hears it is idle.
    let upstream = Upstream::echo(&port).await;
    let reply = within(held).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let idle = within(active.message()).await.unwrap().unwrap();
    assert!(
        !idle.result,
        "answered on A: nothing pending or active anywhere"
    );
    assert_eq!(common::get_metric(&mut on_b, &plain).await.ok(), Some(0.0));
    // A windowed trigger keeps the peak of the window.
    assert_eq!(
        common::get_metric(&mut on_b, &windowed).await.ok(),
        Some(1.0)
    );

    // Redis goes away: A keeps proxying, and triggers answer an error, not 0.
    redis.stop();
    let reply = within(send(
        a.addr(activescale::Port::Activator),
        get("web.example.com", "/still"),
    ))
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    for scaler in [&mut on_a, &mut on_b] {
        let e = common::get_metric(scaler, &plain).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
    drop(upstream);
}

/// Opens StreamIsActive for `so` and takes its first answer, which must be
/// "inactive": nothing is held yet.
async fn idle_stream(
    scaler: &mut ExternalScalerClient<tonic::transport::Channel>,
    so: ScaledObjectRef,
) -> tonic::Streaming<activescale::proto::IsActiveResponse> {
    let mut active = scaler
        .stream_is_active(so)
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = within(active.message()).await.unwrap().unwrap();
    assert!(!first.result, "nothing held yet");
    active
}
