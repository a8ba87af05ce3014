//! Trigger metadata and Prometheus servers: deep PromQL and formulas, files
//! named by `caCert` and the credential keys, endless responses.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use activescale::{
    config::Config,
    proto::{ScaledObjectRef, external_scaler_client::ExternalScalerClient},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::{Code, Status, transport::Channel};

use crate::common::{self, TestServer, start_server, test_config};

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
async fn numbers_that_panic_the_promql_parser_are_refused() {
    let server = start_server(test_config()).await;
    let mut c = server.scaler_client().await;
    // promql-parser turns these into a Duration with a conversion that
    // panics (found by tests/fuzz.rs); the panic unwound through the RPC.
    for query in [
        "sum(x offset NaN)",
        "rate(x[1e400])",
        "max_over_time(x[5m:1e30])",
    ] {
        let r = prom("panic", &[("query", query)]);
        assert_refused(
            spec(&mut c, &r).await,
            &["`query`", query, "is not a duration (a number of seconds"],
        );
        assert_eq!(spec(&mut c, &healthy("panic")).await.unwrap(), 7.0);
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

/// How long a call may take before the test calls it stuck: far more than
/// any of them needs, so it never fails a slow machine, and far less than
/// forever.
const GENEROUS: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GENEROUS, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {GENEROUS:?}"))
}

/// A server on a runtime of its own with one worker thread: a call that
/// blocks that worker shows up as other calls going unanswered, not as a
/// test that hangs with the server.
struct Isolated {
    server: Option<TestServer>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Isolated {
    async fn start(config: Config) -> Self {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("server runtime");
            let server = runtime.block_on(start_server(config));
            Self {
                server: Some(server),
                runtime: Some(runtime),
            }
        })
        .join()
        .expect("server started")
    }

    fn server(&self) -> &TestServer {
        self.server.as_ref().expect("running")
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        drop(self.server.take());
        // Without waiting: a worker stuck in a system call never returns.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A credentials directory with namespace `files` in it, and a server that
/// reads from it.
async fn credentials() -> (tempfile::TempDir, PathBuf, Isolated) {
    let root = tempfile::tempdir().unwrap();
    let ns = root.path().join("files");
    std::fs::create_dir(&ns).unwrap();
    let mut config = test_config();
    config.prometheus.credentials_dir = root.path().to_owned();
    let server = Isolated::start(config).await;
    (root, ns, server)
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
}

#[tokio::test]
async fn ca_cert_reads_only_regular_files_in_the_namespace_directory() {
    let (_root, ns, server) = credentials().await;
    let mut c = server.server().scaler_client().await;
    let accepted = ["PEM text", "relative to", "files/", "at most 1 MiB"];
    std::os::unix::fs::symlink("/dev/zero", ns.join("zero")).unwrap();
    std::os::unix::fs::symlink("/proc/self/environ", ns.join("environ")).unwrap();
    std::fs::create_dir(ns.join("dir")).unwrap();
    std::fs::write(ns.join("big.pem"), vec![b'-'; (1 << 20) + 1]).unwrap();
    let cases = [
        // Endless: read whole, it grew the process by 300 MiB a second.
        ("/dev/zero", "no leading '/'"),
        // Another process's secrets, read and then refused as "not PEM".
        ("/proc/self/environ", "no leading '/'"),
        ("../files/../../etc/passwd", "no '..'"),
        ("zero", "outside"),
        ("environ", "outside"),
        ("dir", "is a directory, not a regular file"),
        ("big.pem", "larger than 1 MiB"),
    ];
    for (value, why) in cases {
        let r = prom("files", &[("query", "sum(up)"), ("caCert", value)]);
        let refused = within(value, spec(&mut c, &r)).await;
        assert_refused(refused, &["`caCert`", value, why]);
        let s = within(
            value,
            spec(
                &mut c,
                &prom("files", &[("query", "sum(up)"), ("caCert", value)]),
            ),
        )
        .await
        .unwrap_err();
        for a in accepted {
            assert!(
                s.message().contains(a),
                "{value}: {:?} should say {a:?}",
                s.message()
            );
        }
        assert_eq!(
            within("healthy", spec(&mut c, &healthy("files")))
                .await
                .unwrap(),
            7.0
        );
    }
    for key in ["bearerTokenFile", "passwordFile"] {
        let mut pairs = vec![("query", "sum(up)"), (key, "zero")];
        if key == "passwordFile" {
            pairs.push(("username", "u"));
        }
        assert_refused(
            within(key, spec(&mut c, &prom("files", &pairs))).await,
            &[&format!("`{key}`"), "\"zero\"", "outside", "relative to"],
        );
    }
}

#[tokio::test]
async fn a_fifo_named_by_a_trigger_blocks_nobody() {
    let (_root, ns, server) = credentials().await;
    mkfifo(&ns.join("fifo"));
    let mut c = server.server().scaler_client().await;
    // Opening a FIFO for reading waits for a writer, in open(2) itself: it
    // once held the server's worker for ever.
    let blocked = {
        let mut c = c.clone();
        tokio::spawn(async move {
            spec(
                &mut c,
                &prom("files", &[("query", "sum(up)"), ("caCert", "fifo")]),
            )
            .await
        })
    };
    assert_eq!(
        within("another trigger", spec(&mut c, &healthy("files")))
            .await
            .unwrap(),
        7.0
    );
    let refused = within("the FIFO trigger", blocked).await.unwrap();
    assert_refused(
        refused,
        &[
            "`caCert`",
            "\"fifo\"",
            "is a FIFO, not a regular file",
            "relative to",
        ],
    );
    let token = prom(
        "files",
        &[("query", "sum(up)"), ("bearerTokenFile", "fifo")],
    );
    assert_refused(
        within("bearerTokenFile", spec(&mut c, &token)).await,
        &[
            "`bearerTokenFile`",
            "\"fifo\"",
            "is a FIFO, not a regular file",
        ],
    );
}

#[tokio::test]
async fn credential_files_are_checked_again_on_every_request() {
    let (_root, ns, server) = credentials().await;
    let token = ns.join("token");
    std::fs::write(&token, "secret").unwrap();
    let mut c = server.server().scaler_client().await;
    let r = prom(
        "files",
        &[("query", "sum(up)"), ("bearerTokenFile", "token")],
    );
    assert_eq!(within("spec", spec(&mut c, &r)).await.unwrap(), 1.0);
    // Swapped after the trigger was parsed (and cached): read per request.
    type Swap<'a> = (&'a str, &'a dyn Fn(&Path));
    let swaps: [Swap; 3] = [
        ("is a FIFO, not a regular file", &mkfifo),
        ("outside", &|p: &Path| {
            std::os::unix::fs::symlink("/proc/self/environ", p).unwrap()
        }),
        ("larger than 1 MiB", &|p: &Path| {
            std::fs::write(p, vec![b'a'; 2 << 20]).unwrap()
        }),
    ];
    for (why, swap) in swaps {
        std::fs::remove_file(&token).unwrap();
        swap(&token);
        let s = within(why, common::get_metric(&mut c, &r))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(
            s.message().contains("files/token") && s.message().contains(why),
            "{:?} should say {why:?}",
            s.message()
        );
        assert_eq!(
            within("healthy", spec(&mut c, &healthy("files")))
                .await
                .unwrap(),
            7.0
        );
    }
}

/// What [`hostile_prometheus`] sends after the request.
#[derive(Clone, Copy)]
enum Answer {
    /// A JSON object that never ends: whitespace, chunk after chunk.
    Endless,
    /// Headers announcing a 1 GiB body, then silence.
    Announced,
    /// A body (48 KiB) of JSON nested 50,000 deep.
    Nested,
}

/// A Prometheus-shaped HTTP server on a real socket; returns its URL and the
/// body bytes it managed to write to each connection, sent once the peer
/// closed it.
async fn hostile_prometheus(answer: Answer) -> (String, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (closed, written) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                // The request head; its content does not matter.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let sent = Arc::new(AtomicU64::new(0));
                let result: std::io::Result<()> = async {
                    match answer {
                        Answer::Endless => {
                            socket
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                      transfer-encoding: chunked\r\n\r\n",
                                )
                                .await?;
                            let start = b"{\"status\":\"success\",\"data\":";
                            socket
                                .write_all(format!("{:x}\r\n", start.len()).as_bytes())
                                .await?;
                            socket.write_all(start).await?;
                            socket.write_all(b"\r\n").await?;
                            let mut chunk = b"10000\r\n".to_vec();
                            chunk.extend(std::iter::repeat_n(b' ', 0x10000));
                            chunk.extend_from_slice(b"\r\n");
                            loop {
                                socket.write_all(&chunk).await?;
                                sent.fetch_add(0x10000, Ordering::Relaxed);
                            }
                        }
                        Answer::Announced => {
                            socket
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                      content-length: 1073741824\r\n\r\n",
                                )
                                .await?;
                            // Until the peer hangs up.
                            let _ = socket.read(&mut buf).await?;
                            Ok(())
                        }
                        Answer::Nested => {
                            let body = "[".repeat(50_000);
                            socket
                                .write_all(
                                    format!(
                                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                         content-length: {}\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await?;
                            let _ = socket.read(&mut buf).await?;
                            Ok(())
                        }
                    }
                }
                .await;
                drop(result);
                let _ = closed.send(sent.load(Ordering::Relaxed));
            });
        }
    });
    (url, written)
}

#[tokio::test]
async fn an_endless_prometheus_response_is_cut_at_the_limit() {
    let server = start_server(test_config()).await;
    let mut c = server.scaler_client().await;
    let (url, mut closed) = hostile_prometheus(Answer::Endless).await;
    // The time bound alone let a minute of body pile up in memory.
    let r = prom(
        "endless",
        &[
            ("query", "sum(up)"),
            ("serverAddress", &url),
            ("timeout", "60s"),
        ],
    );
    let s = within("GetMetrics", common::get_metric(&mut c, &r))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains(&format!(
            "the response from {url} exceeded prometheus_max_response_bytes (8 MiB)"
        )),
        "{s:?}"
    );
    // We hung up: the server's writes fail once the socket buffers are full.
    let written = within("the connection to close", closed.recv())
        .await
        .expect("closed");
    assert!(
        written < 64 << 20,
        "{written} bytes were sent before we hung up; the limit is 8 MiB"
    );
    assert_eq!(spec(&mut c, &healthy("endless")).await.unwrap(), 7.0);
}

#[tokio::test]
async fn announced_huge_and_deeply_nested_responses_are_refused() {
    let mut config = test_config();
    config.prometheus.max_response_bytes = 64 << 10;
    let server = start_server(config).await;
    let mut c = server.scaler_client().await;

    let (url, _closed) = hostile_prometheus(Answer::Announced).await;
    let r = prom(
        "huge",
        &[
            ("query", "sum(up)"),
            ("serverAddress", &url),
            ("timeout", "60s"),
        ],
    );
    let s = within("announced", common::get_metric(&mut c, &r))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message()
            .contains("exceeded prometheus_max_response_bytes (64 KiB)"),
        "{s:?}"
    );

    // Within the limit, but deeper than any JSON parser should recurse.
    let (url, _closed) = hostile_prometheus(Answer::Nested).await;
    let r = prom("huge", &[("query", "sum(up)"), ("serverAddress", &url)]);
    let s = within("nested", common::get_metric(&mut c, &r))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message().contains("not a Prometheus API response"),
        "{s:?}"
    );
    assert_eq!(spec(&mut c, &healthy("huge")).await.unwrap(), 7.0);
}
