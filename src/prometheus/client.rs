//! Talking to a Prometheus-compatible HTTP API: one reqwest client per
//! connection setting, one instant query per (endpoint, query), results
//! shared for `cache_ttl` and in-flight requests shared by every concurrent
//! caller (single-flight).

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_http_query::{
    Client, Error as HttpQueryError,
    error::PrometheusError,
    response::{Data, PromqlResult},
};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span};

use super::{PromError, files::CredentialFile};
use crate::telemetry::OutcomeLabel;

/// Cache entries kept before expired ones are swept.
const SWEEP_AT: usize = 1024;

/// Where and how to reach one server; everything that can change an answer
/// (URL, TLS, credentials, headers such as a tenant id) is part of it, so it
/// is also the "auth identity" of the result cache key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub url: String,
    pub timeout: Duration,
    pub unsafe_ssl: bool,
    /// PEM CA bundle added to the system roots.
    pub ca_pem: Option<Vec<u8>>,
    pub auth: Auth,
    /// Validated header names and values (`customHeaders`).
    pub headers: Vec<(String, String)>,
}

/// How requests authenticate.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Auth {
    None,
    /// `Authorization: Bearer <file contents>`, read per request (tokens rotate).
    BearerFile(CredentialFile),
    Basic {
        username: String,
        password: Secret,
    },
}

/// A password given inline or as a file read per request.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Secret {
    Inline(String),
    File(CredentialFile),
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::None => "none".to_owned(),
            Auth::BearerFile(p) => format!("bearer file {p}"),
            Auth::Basic {
                username,
                password: Secret::Inline(_),
            } => format!("basic {username} (inline password)"),
            Auth::Basic {
                username,
                password: Secret::File(p),
            } => format!("basic {username} (password file {p})"),
        };
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("unsafe_ssl", &self.unsafe_ssl)
            .field("ca_cert", &self.ca_pem.is_some())
            .field("auth", &auth)
            .field("headers", &headers)
            .finish()
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::BearerFile(p) => write!(f, "BearerFile({p})"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
        }
    }
}

impl Endpoint {
    /// A reqwest client for this endpoint's transport settings.
    fn build_client(&self) -> Result<Client, PromError> {
        let mut b = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .tls_danger_accept_invalid_certs(self.unsafe_ssl);
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| PromError::Unavailable(format!("caCert: {e}")))?;
            b = b.tls_certs_merge(certs);
        }
        let http = b
            .build()
            .map_err(|e| PromError::Unavailable(format!("building the HTTP client: {e}")))?;
        Client::from(http, &self.url)
            .map_err(|e| PromError::Unavailable(format!("serverAddress: {e}")))
    }

    /// The per-request headers: custom ones and credentials, read now.
    async fn headers(&self) -> Result<Vec<(HeaderName, HeaderValue)>, PromError> {
        let mut out = Vec::with_capacity(self.headers.len() + 1);
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| PromError::Unavailable(format!("customHeaders {k}: {e}")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| PromError::Unavailable(format!("customHeaders {k}: {e}")))?;
            out.push((name, value));
        }
        let credential = match &self.auth {
            Auth::None => None,
            Auth::BearerFile(path) => Some(format!("Bearer {}", read_secret(path).await?)),
            Auth::Basic { username, password } => {
                let password = match password {
                    Secret::Inline(p) => p.clone(),
                    Secret::File(path) => read_secret(path).await?,
                };
                let raw = format!("{username}:{password}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
        };
        if let Some(c) = credential {
            let mut v = HeaderValue::from_str(&c).map_err(|_| {
                PromError::Unavailable(
                    "credentials contain characters not allowed in a header".into(),
                )
            })?;
            v.set_sensitive(true);
            out.push((AUTHORIZATION, v));
        }
        Ok(out)
    }
}

/// A credential file's contents without surrounding whitespace, read off the
/// runtime with the checks of [`CredentialFile`]: the file may have been
/// replaced since the trigger was parsed. The message names the file, never
/// its contents.
async fn read_secret(file: &CredentialFile) -> Result<String, PromError> {
    let bytes = file
        .read()
        .await
        .map_err(|e| PromError::Unavailable(format!("reading credential file: {e}")))?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(_) => Err(PromError::Unavailable(format!(
            "reading credential file: {file} is not UTF-8 text"
        ))),
    }
}

/// What a successful query said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    Value(f64),
    /// No series: an absent target, a typo in a label, a stopped exporter.
    Empty,
}

/// One series of an instant vector, as a per-pod rule reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub labels: HashMap<String, String>,
    /// As Prometheus sent it: any float, NaN and ±Inf included (the caller
    /// decides what it refuses).
    pub value: f64,
    /// The sample's time, Unix seconds.
    pub at: f64,
}

/// Most series one vector answer may hold: bounds the work after the byte
/// limit (a per-pod metric has one series per pod).
pub const MAX_SERIES: usize = 20_000;

/// The series of an instant-vector answer; a scalar or a range vector is an
/// error (a per-pod rule must return one series per pod).
pub fn series_of(data: &Data) -> Result<Arc<[Series]>, PromError> {
    match data {
        Data::Vector(v) if v.len() > MAX_SERIES => Err(PromError::BadValue(format!(
            "the query returned {} series, more than {MAX_SERIES}",
            v.len()
        ))),
        Data::Vector(v) => Ok(v
            .iter()
            .map(|s| Series {
                labels: s.metric().clone(),
                value: s.sample().value(),
                at: s.sample().timestamp(),
            })
            .collect()),
        Data::Matrix(m) if m.is_empty() => Ok(Arc::from([])),
        Data::Matrix(_) => Err(PromError::BadValue(
            "the query returned a range vector; it must return an instant vector".into(),
        )),
        Data::Scalar(_) => Err(PromError::BadValue(
            "the query returned a scalar; it must return one series per pod".into(),
        )),
    }
}

/// A cached answer: one number (triggers) or the series (per-pod rules).
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    One(Outcome),
    Vector(Arc<[Series]>),
}

/// Turns a query answer into one number, or says why it cannot be one.
pub fn outcome_of(data: &Data) -> Result<Outcome, PromError> {
    let v = match data {
        Data::Scalar(s) => s.value(),
        Data::Vector(v) => match v.as_slice() {
            [] => return Ok(Outcome::Empty),
            [one] => one.sample().value(),
            many => {
                return Err(PromError::BadValue(format!(
                    "the query returned {} series; it must return one (aggregate it, e.g. sum(...) or max(...))",
                    many.len()
                )));
            }
        },
        Data::Matrix(m) if m.is_empty() => return Ok(Outcome::Empty),
        Data::Matrix(_) => {
            return Err(PromError::BadValue(
                "the query returned a range vector".into(),
            ));
        }
    };
    if v.is_finite() {
        Ok(Outcome::Value(v))
    } else {
        Err(PromError::BadValue(format!("the query returned {v}")))
    }
}

/// Maps a client error: the server's own refusals of the query are
/// `Rejected`; transport, HTTP and server-side trouble is `Unavailable`.
fn classify(e: HttpQueryError) -> PromError {
    match &e {
        HttpQueryError::Prometheus(p) => refusal(p),
        HttpQueryError::Client(c) => match c.inner() {
            Some(inner) => PromError::Unavailable(format!("{e}: {inner}")),
            None => PromError::Unavailable(e.to_string()),
        },
        _ => PromError::Unavailable(e.to_string()),
    }
}

/// An error answer of the Prometheus API: the query's fault or the server's.
fn refusal(p: &PrometheusError) -> PromError {
    if p.is_bad_data() || p.is_execution() || p.is_not_found() {
        PromError::Rejected(p.to_string())
    } else {
        PromError::Unavailable(p.to_string())
    }
}

/// The envelope of every Prometheus API answer.
#[derive(serde::Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum ApiResponse {
    Success { data: PromqlResult },
    Error(PrometheusError),
}

/// Reads an answer of at most `max_bytes`. The size is checked as the body
/// arrives: a server may stream for ever within the timeout, and must not
/// make us hold more than the limit. (reqwest is built without
/// decompression, so the bytes counted are the bytes kept.)
async fn read_answer(
    mut response: reqwest::Response,
    server: &str,
    max_bytes: usize,
) -> Result<Data, PromError> {
    let status = response.status();
    let json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(PromError::Unavailable(format!(
            "{server} answered HTTP {status} without a JSON body"
        )));
    }
    let too_large = || {
        PromError::Unavailable(format!(
            "the response from {server} exceeded prometheus_max_response_bytes ({})",
            size(max_bytes)
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n > max_bytes as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| PromError::Unavailable(format!("reading the response from {server}: {e}")))?
    {
        if body.len() + chunk.len() > max_bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    match serde_json::from_slice::<ApiResponse>(&body) {
        Ok(ApiResponse::Success { data }) => Ok(data.into_inner().0),
        Ok(ApiResponse::Error(e)) => Err(refusal(&e)),
        Err(e) => Err(PromError::Unavailable(format!(
            "{server} answered HTTP {status} with a body that is not a Prometheus API response: {e}"
        ))),
    }
}

/// `8 MiB`, `512 KiB` or `1000 bytes`.
fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

type Flight = Shared<BoxFuture<'static, Result<Answer, PromError>>>;

enum Slot {
    Done { answer: Answer, at: Instant },
    Running(Flight),
}

/// Endpoint, query, and whether the series are kept (`true`) or reduced to
/// one number: the same text read both ways are two entries.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key(Arc<Endpoint>, String, bool);

/// Reqwest clients and recent results, shared by every clone of the backend.
pub struct Connections {
    ttl: Duration,
    /// Largest response body read (`prometheus_max_response_bytes`).
    max_response_bytes: usize,
    // std Mutex: held for a map probe, never across an await.
    clients: Mutex<HashMap<Arc<Endpoint>, Client>>,
    results: Arc<Mutex<HashMap<Key, Slot>>>,
    /// `activescale_prometheus_queries_total`; unregistered unless
    /// [`Connections::counted`] hands in the service's family.
    queries: Family<OutcomeLabel, Counter>,
}

impl Connections {
    pub fn new(ttl: Duration, max_response_bytes: usize) -> Self {
        Self {
            ttl,
            max_response_bytes,
            clients: Mutex::default(),
            results: Arc::default(),
            queries: Family::default(),
        }
    }

    /// Counts every request sent to a Prometheus server in `queries`.
    pub fn counted(self, queries: Family<OutcomeLabel, Counter>) -> Self {
        Self { queries, ..self }
    }

    fn client(&self, endpoint: &Arc<Endpoint>) -> Result<Client, PromError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        let c = endpoint.build_client()?;
        clients.insert(Arc::clone(endpoint), c.clone());
        Ok(c)
    }

    /// One instant query, from the cache, from a request already in flight,
    /// or sent now.
    pub async fn query(&self, endpoint: &Arc<Endpoint>, query: &str) -> Result<Outcome, PromError> {
        match self.answer(endpoint, query, false).await? {
            Answer::One(outcome) => Ok(outcome),
            Answer::Vector(_) => Err(PromError::Unavailable("cache kind mismatch".into())),
        }
    }

    /// One instant query whose every series is kept (per-pod rules), with
    /// the same cache, single-flight, timeouts and size limit as [`Self::query`].
    pub async fn query_series(
        &self,
        endpoint: &Arc<Endpoint>,
        query: &str,
    ) -> Result<Arc<[Series]>, PromError> {
        match self.answer(endpoint, query, true).await? {
            Answer::Vector(series) => Ok(series),
            Answer::One(_) => Err(PromError::Unavailable("cache kind mismatch".into())),
        }
    }

    async fn answer(
        &self,
        endpoint: &Arc<Endpoint>,
        query: &str,
        vector: bool,
    ) -> Result<Answer, PromError> {
        let client = self.client(endpoint)?;
        let endpoint = Arc::clone(endpoint);
        let query = query.to_owned();
        let max_bytes = self.max_response_bytes;
        let queries = self.queries.clone();
        self.shared(Key(endpoint.clone(), query.clone(), vector), move || {
            let span =
                debug_span!("prometheus_query", server = %endpoint.url, query = %query, vector);
            async move {
                let r = fetch(&client, &endpoint, &query, max_bytes)
                    .await
                    .and_then(|data| {
                        if vector {
                            series_of(&data).map(Answer::Vector)
                        } else {
                            outcome_of(&data).map(Answer::One)
                        }
                    });
                debug!(answer = ?r, "answered");
                let outcome = match &r {
                    Ok(Answer::One(Outcome::Value(_))) => "value",
                    Ok(Answer::Vector(s)) if !s.is_empty() => "value",
                    Ok(_) => "empty",
                    Err(_) => "error",
                };
                queries.get_or_create(&OutcomeLabel { outcome }).inc();
                r
            }
            .instrument(span)
            .boxed()
        })
        .await
    }

    async fn shared(
        &self,
        key: Key,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<Answer, PromError>>,
    ) -> Result<Answer, PromError> {
        let flight = {
            let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
            match results.get(&key) {
                Some(Slot::Done { answer, at }) if at.elapsed() < self.ttl => {
                    return Ok(answer.clone());
                }
                Some(Slot::Running(f)) => f.clone(),
                _ => {
                    // The request runs in its own task so that it completes
                    // and fills the cache even if every caller gives up.
                    let (results_ref, key_ref) = (Arc::clone(&self.results), key.clone());
                    let request = fetch();
                    let task = tokio::spawn(async move {
                        let r = request.await;
                        let mut results = results_ref.lock().unwrap_or_else(|e| e.into_inner());
                        match &r {
                            Ok(answer) => {
                                results.insert(
                                    key_ref,
                                    Slot::Done {
                                        answer: answer.clone(),
                                        at: Instant::now(),
                                    },
                                );
                            }
                            // Failures are not remembered: the next caller asks again.
                            Err(_) => {
                                results.remove(&key_ref);
                            }
                        }
                        r
                    });
                    let flight = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(PromError::Unavailable(format!("query task ended: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    if results.len() >= SWEEP_AT {
                        let ttl = self.ttl;
                        results.retain(
                            |_, s| !matches!(s, Slot::Done { at, .. } if at.elapsed() >= ttl),
                        );
                    }
                    results.insert(key, Slot::Running(flight.clone()));
                    flight
                }
            }
        };
        flight.await
    }
}

async fn fetch(
    client: &Client,
    endpoint: &Endpoint,
    query: &str,
    max_bytes: usize,
) -> Result<Data, PromError> {
    // reqwest's own timeout covers connect and body; this one also covers
    // reading credential files and anything slower that is not I/O.
    let answer = tokio::time::timeout(endpoint.timeout + Duration::from_millis(100), async {
        let mut q = client
            .query(query)
            .timeout(i64::try_from(endpoint.timeout.as_millis()).unwrap_or(i64::MAX));
        for (k, v) in endpoint.headers().await? {
            q = q.header(k, v);
        }
        let response = q.get_raw().await.map_err(classify)?;
        read_answer(response, &endpoint.url, max_bytes).await
    })
    .await
    .map_err(|_| PromError::Unavailable(format!("no answer within {:?}", endpoint.timeout)))??;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn endpoint(url: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            url: url.into(),
            timeout: Duration::from_secs(2),
            unsafe_ssl: false,
            ca_pem: None,
            auth: Auth::None,
            headers: vec![],
        })
    }

    fn counting(
        calls: &Arc<AtomicUsize>,
        result: Result<Answer, PromError>,
    ) -> BoxFuture<'static, Result<Answer, PromError>> {
        let calls = Arc::clone(calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            result
        }
        .boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_identical_queries_share_one_request_and_the_result_is_reused_for_ttl() {
        let c = Connections::new(Duration::from_secs(2), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key(endpoint("http://127.0.0.1:1"), "up".into(), false);
        let gate = Arc::new(tokio::sync::Notify::new());
        let all = futures::future::join_all((0..10).map(|_| {
            let (calls, gate) = (calls.clone(), gate.clone());
            c.shared(key.clone(), move || {
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok(Answer::One(Outcome::Value(4.0)))
                }
                .boxed()
            })
        }));
        let waiter = async {
            // Let every caller reach the shared request, then release it.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
            gate.notify_one();
        };
        let (results, ()) = tokio::join!(all, waiter);
        assert!(
            results
                .iter()
                .all(|r| *r == Ok(Answer::One(Outcome::Value(4.0)))),
            "{results:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let again = c
            .shared(key.clone(), || {
                counting(&calls, Ok(Answer::One(Outcome::Value(9.0))))
            })
            .await;
        assert_eq!(
            again,
            Ok(Answer::One(Outcome::Value(4.0))),
            "served from the cache"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        tokio::time::advance(Duration::from_secs(3)).await;
        let fresh = c
            .shared(key.clone(), || {
                counting(&calls, Ok(Answer::One(Outcome::Value(9.0))))
            })
            .await;
        assert_eq!(
            fresh,
            Ok(Answer::One(Outcome::Value(9.0))),
            "re-read after the TTL"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_keys_differ_by_identity() {
        let c = Connections::new(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let key = Key(endpoint("http://127.0.0.1:1"), "up".into(), false);
        let e = c
            .shared(key.clone(), || {
                counting(&calls, Err(PromError::Unavailable("down".into())))
            })
            .await;
        assert!(matches!(e, Err(PromError::Unavailable(_))));
        let ok = c
            .shared(key.clone(), || {
                counting(&calls, Ok(Answer::One(Outcome::Empty)))
            })
            .await;
        assert_eq!(ok, Ok(Answer::One(Outcome::Empty)));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let mut tenant_b = (*endpoint("http://127.0.0.1:1")).clone();
        tenant_b.headers.push(("X-Scope-OrgID".into(), "b".into()));
        let other = c
            .shared(Key(Arc::new(tenant_b), "up".into(), false), || {
                counting(&calls, Ok(Answer::One(Outcome::Value(1.0))))
            })
            .await;
        assert_eq!(
            other,
            Ok(Answer::One(Outcome::Value(1.0))),
            "another tenant header is another cache entry"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A port that was free a moment ago: connection refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Connections::new(Duration::from_secs(1), 1 << 20);
        let e = c
            .query(&endpoint(&format!("http://127.0.0.1:{port}")), "up")
            .await;
        assert!(matches!(e, Err(PromError::Unavailable(_))), "{e:?}");
    }

    #[tokio::test]
    async fn headers_and_credentials_are_sent() {
        use axum::{Json, Router, extract::State, http::HeaderMap, routing::get};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
        let app = Router::new()
            .route(
                "/api/v1/query",
                get(|State(seen): State<Arc<Mutex<Vec<HeaderMap>>>>, headers: HeaderMap| async move {
                    seen.lock().unwrap().push(headers);
                    Json(serde_json::json!({
                        "status": "success",
                        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "7"]}]}
                    }))
                }),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shop")).unwrap();
        let token = dir.path().join("shop/token");
        std::fs::write(&token, "first\n").unwrap();
        let mut e = (*endpoint(&format!("http://{addr}"))).clone();
        e.auth = Auth::BearerFile(CredentialFile::locate("token", "shop", dir.path()).unwrap());
        e.headers = vec![("X-Scope-OrgID".into(), "tenant".into())];
        let c = Connections::new(Duration::ZERO, 1 << 20);
        let e = Arc::new(e);
        assert_eq!(c.query(&e, "up").await.unwrap(), Outcome::Value(7.0));
        std::fs::write(&token, "second").unwrap();
        assert_eq!(c.query(&e, "up").await.unwrap(), Outcome::Value(7.0));

        let mut basic = (*e).clone();
        basic.auth = Auth::Basic {
            username: "u".into(),
            password: Secret::Inline("p".into()),
        };
        c.query(&Arc::new(basic), "up").await.unwrap();

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0]["x-scope-orgid"], "tenant");
        assert_eq!(seen[0]["authorization"], "Bearer first");
        assert_eq!(
            seen[1]["authorization"], "Bearer second",
            "token files are re-read (rotation)"
        );
        assert_eq!(seen[2]["authorization"], "Basic dTpw");
    }

    #[test]
    fn answers_become_one_number_or_a_reason() {
        let parse = |s: &str| serde_json::from_str::<Data>(s).unwrap();
        assert_eq!(
            outcome_of(&parse(r#"{"resultType":"scalar","result":[1,"2.5"]}"#)).unwrap(),
            Outcome::Value(2.5)
        );
        assert_eq!(
            outcome_of(&parse(r#"{"resultType":"vector","result":[]}"#)).unwrap(),
            Outcome::Empty
        );
        let two = r#"{"resultType":"vector","result":[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]}"#;
        assert!(
            matches!(outcome_of(&parse(two)), Err(PromError::BadValue(m)) if m.contains("2 series"))
        );
        for bad in ["NaN", "+Inf", "-Inf"] {
            let d = parse(&format!(
                r#"{{"resultType":"scalar","result":[1,"{bad}"]}}"#
            ));
            assert!(
                matches!(outcome_of(&d), Err(PromError::BadValue(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut e = (*endpoint("http://x")).clone();
        e.auth = Auth::Basic {
            username: "u".into(),
            password: Secret::Inline("hunter2".into()),
        };
        e.headers = vec![("X-Scope-OrgID".into(), "secret-tenant".into())];
        let shown = format!("{e:?} {:?}", e.auth);
        assert!(
            !shown.contains("hunter2") && !shown.contains("secret-tenant"),
            "{shown}"
        );
    }
}
