//! A real `prometheus` (the Debian package's `/usr/bin/prometheus`) scraping
//! an exporter the test serves on loopback every second; shared by the
//! integration tests (`tests/common`) and the load tool's `prom` mode, which
//! picks the binary and the scrape interval ([`Options`]).
//!
//! - [`Exporter`]: `/metrics` in the text format; tests set and remove series.
//!   It runs on its own thread and runtime so that one exporter can outlive
//!   the `#[tokio::test]` that started it (see [`shared`]).
//! - [`Prometheus`]: a child process on a free loopback port with a temporary
//!   TSDB; stoppable and restartable (same port, same data). It runs under a
//!   tiny `sh` guard that kills it when the guard's stdin closes, which
//!   happens on [`Prometheus::stop`], on drop, and when the test process
//!   exits for any reason: no Prometheus outlives its test binary.
//! - [`shared`]: one exporter and one Prometheus per test binary, started on
//!   first use. Tests keep out of each other's way by using their own
//!   `namespace` label values.

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::OnceCell;

pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// How to run Prometheus.
#[derive(Clone, Debug)]
pub struct Options {
    /// The binary: a path, or a name looked up in `PATH`.
    pub bin: String,
    pub scrape_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin: PROMETHEUS_BIN.into(),
            scrape_interval: Duration::from_secs(1),
        }
    }
}

/// Series served by an [`Exporter`]: `name{labels}` → value.
type Series = Arc<Mutex<BTreeMap<String, f64>>>;

/// A loopback `/metrics` endpoint whose series the test controls.
#[derive(Clone)]
pub struct Exporter {
    pub addr: SocketAddr,
    series: Series,
}

impl Exporter {
    /// Starts serving on a free loopback port, on a thread of its own.
    pub fn start() -> Self {
        let series: Series = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind exporter");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("exporter address");
        let served = series.clone();
        std::thread::Builder::new()
            .name(format!("exporter-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("exporter runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("exporter listener");
                    let app = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(move || {
                            let served = served.clone();
                            async move { render(&served.lock().unwrap()) }
                        }),
                    );
                    let _ = axum::serve(listener, app).await;
                });
            })
            .expect("exporter thread");
        Self { addr, series }
    }

    /// Sets gauge `name{labels}` to `value`.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.series
            .lock()
            .unwrap()
            .insert(series_key(name, labels), value);
    }

    /// Stops serving `name{labels}` (Prometheus marks it stale on the next scrape).
    pub fn remove(&self, name: &str, labels: &[(&str, &str)]) {
        self.series
            .lock()
            .unwrap()
            .remove(&series_key(name, labels));
    }
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// The Prometheus text format. Rust prints the shortest decimal that parses
/// back to the same f64, so Prometheus stores exactly the value the test set.
fn render(series: &BTreeMap<String, f64>) -> String {
    let mut out = String::new();
    for (key, v) in series {
        let v = match *v {
            v if v.is_nan() => "NaN".to_owned(),
            v if v == f64::INFINITY => "+Inf".to_owned(),
            v if v == f64::NEG_INFINITY => "-Inf".to_owned(),
            v => format!("{v:?}"),
        };
        out.push_str(&format!("{key} {v}\n"));
    }
    out
}

/// A running (or stopped) Prometheus.
pub struct Prometheus {
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    port: u16,
    bin: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    /// `--web.config.file` (TLS) and the CA that signed its certificate.
    web: Option<(PathBuf, reqwest::Certificate)>,
    guard: Option<(Child, ChildStdin)>,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second and waits for `/-/ready`.
    pub async fn start(targets: &[SocketAddr]) -> Self {
        Self::start_with(targets, &Options::default(), None).await
    }

    /// Like [`Self::start`], with this binary and scrape interval.
    pub async fn start_with_options(targets: &[SocketAddr], options: &Options) -> Self {
        Self::start_with(targets, options, None).await
    }

    /// Like [`Self::start`], serving HTTPS with `cert_pem`/`key_pem`, which
    /// `ca_pem` signed.
    pub async fn start_tls(
        targets: &[SocketAddr],
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> Self {
        Self::start_with(
            targets,
            &Options::default(),
            Some((cert_pem, key_pem, ca_pem)),
        )
        .await
    }

    async fn start_with(
        targets: &[SocketAddr],
        options: &Options,
        tls: Option<(&str, &str, &str)>,
    ) -> Self {
        let bin = &options.bin;
        assert!(
            !bin.contains('/') || std::path::Path::new(bin).exists(),
            "{bin} is missing: apt-get install -y prometheus"
        );
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        // The timeout stays under the interval, as Prometheus requires.
        let interval = options.scrape_interval.as_millis();
        let timeout = interval * 9 / 10;
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}ms\n  evaluation_interval: {interval}ms\n\
                 scrape_configs:\n  - job_name: exporter\n    honor_labels: true\n    scrape_interval: {interval}ms\n    \
                 scrape_timeout: {timeout}ms\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let web = tls.map(|(cert, key, ca)| {
            let (cert_file, key_file) =
                (dir.path().join("server.pem"), dir.path().join("server.key"));
            std::fs::write(&cert_file, cert).expect("write cert");
            std::fs::write(&key_file, key).expect("write key");
            let web = dir.path().join("web.yml");
            std::fs::write(
                &web,
                format!(
                    "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
                    cert_file.display(),
                    key_file.display()
                ),
            )
            .expect("write web.yml");
            (
                web,
                reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA pem"),
            )
        });
        let scheme = if web.is_some() { "https" } else { "http" };
        let mut p = Self {
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            bin: bin.clone(),
            dir,
            config,
            web,
            guard: None,
        };
        p.restart().await;
        p
    }

    /// (Re)starts the process on the same port and data directory and waits
    /// until it is ready.
    pub async fn restart(&mut self) {
        assert!(self.guard.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("prometheus.log"))
            .expect("log file");
        // The guard kills Prometheus as soon as its stdin reaches EOF, and
        // writes its pid down for [`Self::pid`] (the child is the guard).
        let script = "\"$0\" \"$@\" & pid=$!; echo $pid > \"$PID_FILE\"; read _ignored; kill $pid 2>/dev/null; wait $pid";
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg(&self.bin)
            .env("PID_FILE", self.pid_file());
        if let Some((web, _)) = &self.web {
            command.arg(format!("--web.config.file={}", web.display()));
        }
        let mut child = command
            .arg(format!("--config.file={}", self.config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--log.level=warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let stdin = child.stdin.take().expect("guard stdin");
        self.guard = Some((child, stdin));
        self.wait_ready().await;
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("prometheus.pid")
    }

    /// The Prometheus process's id while it runs (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.guard.as_ref()?;
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A client that trusts this Prometheus.
    pub fn http(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if let Some((_, ca)) = &self.web {
            b = b.tls_certs_merge([ca.clone()]);
        }
        b.build().expect("http client")
    }

    async fn wait_ready(&mut self) {
        let client = self.http();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/-/ready", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            if let Some((child, _)) = self.guard.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("prometheus exited ({status}); log:\n{}", self.log());
            }
            if tokio::time::Instant::now() > deadline {
                panic!("prometheus not ready after 30s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process and waits until it has exited (the port is closed).
    pub fn stop(&mut self) {
        if let Some((mut child, mut stdin)) = self.guard.take() {
            let _ = stdin.write_all(b"\n");
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// The instant value of `query` straight from the HTTP API (scalar or
    /// one-element vector), `None` when the result is empty.
    pub async fn instant(&self, query: &str) -> Option<f64> {
        self.query(&self.http(), query)
            .await
            .expect("query prometheus")
    }

    /// [`Self::instant`] over `http` (kept connections, for measuring), with
    /// failures returned.
    pub async fn query(&self, http: &reqwest::Client, query: &str) -> Result<Option<f64>, String> {
        let body: serde_json::Value = http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let result = &body["data"]["result"];
        let value = match body["data"]["resultType"].as_str() {
            Some("scalar") => &result[1],
            _ => &result[0]["value"][1],
        };
        value
            .as_str()
            .map(|v| v.parse().map_err(|e| format!("sample value {v}: {e}")))
            .transpose()
    }

    /// Waits until `query` has a value (data has been scraped).
    pub async fn wait_for(&self, query: &str) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.instant(query).await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no data for {query} after 20s; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many `/api/v1/query` requests this Prometheus has served, from its
    /// own `/metrics` (reading that does not count as a query).
    pub async fn api_query_count(&self) -> f64 {
        let text = self
            .http()
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("prometheus /metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.starts_with("prometheus_http_requests_total{")
                    && l.contains("handler=\"/api/v1/query\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// [`Self::api_query_count`] once it has stopped moving: Prometheus
    /// counts a request after answering it, so a count read right after an
    /// answer may lag by one.
    pub async fn settled_query_count(&self) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last = self.api_query_count().await;
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let now = self.api_query_count().await;
            if now == last {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "query count never settled"
            );
            last = now;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One exporter and one Prometheus scraping it, per test binary.
pub struct Shared {
    pub exporter: Exporter,
    pub prometheus: Prometheus,
}

static SHARED: OnceCell<Shared> = OnceCell::const_new();

/// The binary's shared exporter and Prometheus, started on first use.
pub async fn shared() -> &'static Shared {
    SHARED
        .get_or_init(|| async {
            let exporter = Exporter::start();
            let prometheus = Prometheus::start(&[exporter.addr]).await;
            Shared {
                exporter,
                prometheus,
            }
        })
        .await
}
