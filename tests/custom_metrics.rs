//! The Custom Metrics API through real HTTPS: real sockets, rustls on both
//! sides, a test front-proxy CA and client certificates (rcgen), reqwest over
//! HTTP/2 and HTTP/1.1, the kube-apiserver's aggregator played by the client.
//!
//! The API's own contract (auth, paths, Status bodies) is tested over
//! [`StandIn`], an in-process `PodMetricSource`; the `run_*` tests start the
//! whole server (`run`) with real sidecars, the real store and a real
//! `prometheus`, and check its values against `GetMetrics`.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use activescale::{
    config::Config,
    custom_metrics::{
        CustomMetricsApi, PodMetricSource, PodQuery, PodSample, PodScope, SourceError,
    },
    selector::Labels,
};
use async_trait::async_trait;
use common::{builders::labels, envoy::eventually};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use reqwest::Version;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Deadline for anything awaited over the network.
const LIMIT: Duration = Duration::from_secs(10);
const V2: &str = "/apis/custom.metrics.k8s.io/v1beta2";
const V1: &str = "/apis/custom.metrics.k8s.io/v1beta1";

// ---- PKI ----

struct Ca(CertifiedIssuer<'static, KeyPair>);

/// A certificate and its key.
struct Leaf {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Self(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    fn leaf(&self, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.0).unwrap();
        Leaf {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn server(&self) -> Leaf {
        self.leaf(
            "activescale",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn der(&self) -> CertificateDer<'static> {
        self.0.der().clone()
    }
}

/// Everything the tests need: the server's CA, the front proxy's CA, the
/// aggregator's client certificate, and impostors.
struct Pki {
    server_ca: Ca,
    front_proxy_ca: Ca,
    aggregator: Leaf,
    wrong_ca: Leaf,
    wrong_name: Leaf,
}

impl Pki {
    fn new() -> Self {
        let front_proxy_ca = Ca::new("front-proxy-ca");
        // Same common name as the real one, from a CA nobody trusts.
        let wrong_ca = Ca::new("front-proxy-ca").client("front-proxy-client");
        Self {
            server_ca: Ca::new("server-ca"),
            aggregator: front_proxy_ca.client("front-proxy-client"),
            wrong_name: front_proxy_ca.client("someone-else"),
            wrong_ca,
            front_proxy_ca,
        }
    }
}

// ---- an in-process source, for the API's own contract ----

/// One pod as the stand-in knows it.
#[derive(Clone)]
struct Pod {
    name: &'static str,
    labels: Labels,
    now: f64,
    max_30s: f64,
    reported: SystemTime,
}

/// The `PodMetricSource` until the engine implements it: pods in a list,
/// the selector matched on their labels, an outage switched on by the test.
#[derive(Default)]
struct StandIn {
    pods: Mutex<Vec<Pod>>,
    outage: Mutex<Option<&'static str>>,
    asked: Mutex<Vec<String>>,
}

#[async_trait]
impl PodMetricSource for StandIn {
    async fn pods(&self, q: &PodQuery<'_>) -> Result<Vec<PodSample>, SourceError> {
        self.asked.lock().unwrap().push(q.metric.name.clone());
        if let Some(why) = *self.outage.lock().unwrap() {
            return Err(SourceError::Unavailable(why.into()));
        }
        let pods = self.pods.lock().unwrap().clone();
        Ok(pods
            .into_iter()
            .filter(|_| q.namespace == "shop")
            .filter(|p| match q.pods {
                PodScope::Matching(None) => true,
                PodScope::Matching(Some(sel)) => sel.matches(&p.labels),
                PodScope::Named(name) => p.name == name,
            })
            .map(|p| PodSample {
                name: p.name.into(),
                value: if q.metric.name.ends_with("_max_30s") {
                    p.max_30s
                } else {
                    p.now
                },
                last_report: p.reported,
            })
            .collect())
    }
}

/// 2026-01-02T03:04:05Z
fn reported() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_323_045)
}

fn shop() -> Vec<Pod> {
    let web = |name, ticker, now, max_30s| Pod {
        name,
        labels: labels(&[("app", "web"), ("ticker", ticker)]),
        now,
        max_30s,
        reported: reported(),
    };
    vec![
        web("web-b", "acme", 1.5, 9.0),
        web("web-a", "acme", 4.0, 4.25),
        web("web-c", "other", 0.0, 2.0),
        Pod {
            name: "db-0",
            labels: labels(&[("app", "db")]),
            now: 7.0,
            max_30s: 7.0,
            reported: reported(),
        },
    ]
}

// ---- the server under test ----

/// The server certificate and key, and the front-proxy CA, as files in `dir`.
fn write_pki(pki: &Pki, dir: &std::path::Path) {
    let server = pki.server_ca.server();
    std::fs::write(dir.join("tls.crt"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &server.key_pem).unwrap();
    std::fs::write(dir.join("ca.crt"), pki.front_proxy_ca.0.pem()).unwrap();
}

struct Served {
    addr: SocketAddr,
    source: Arc<StandIn>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Serves the API on 127.0.0.1:0 with the server certificate, front-proxy
/// CA and allowed names of `pki`; `change` adjusts the config.
async fn serve(pki: &Pki, change: impl FnOnce(&mut Config, &std::path::Path)) -> Served {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    write_pki(pki, dir.path());
    let mut config = {
        let mut c = Config::default();
        c.servers.custom_metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        c.custom_metrics.tls_cert = Some(dir.path().join("tls.crt"));
        c.custom_metrics.tls_key = Some(dir.path().join("tls.key"));
        c.custom_metrics.client_ca = Some(dir.path().join("ca.crt"));
        c.custom_metrics.allowed_names = vec!["front-proxy-client".into()];
        c.custom_metrics.windows = vec!["max_30s".into()];
        c
    };
    change(&mut config, dir.path());
    config.validate().expect("a valid config");
    let source = Arc::new(StandIn::default());
    *source.pods.lock().unwrap() = shop();
    let api = CustomMetricsApi::new(&config, source.clone(), Arc::new(AtomicBool::new(true)))
        .expect("the API builds");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(api.serve(listener, Duration::from_millis(50), token.clone()));
    Served {
        addr,
        source,
        token,
        task,
        dir: dir.path().to_owned(),
        _dir: dir,
    }
}

// ---- clients ----

#[derive(Clone, Copy, PartialEq, Debug)]
enum Http {
    One,
    Two,
}

/// Accepts any server certificate, as an APIService with
/// `insecureSkipTLSVerify: true` does; still checks handshake signatures.
#[derive(Debug)]
struct SkipVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client trusting `server_ca` (any server certificate when `None`),
/// presenting `identity` when given, speaking `http`.
fn client(server_ca: Option<&Ca>, identity: Option<&Leaf>, http: Http) -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match server_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der()).unwrap();
            builder.with_root_certificates(roots)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerify(provider))),
    };
    let mut tls = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.cert.clone()],
                PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![match http {
        Http::One => b"http/1.1".to_vec(),
        Http::Two => b"h2".to_vec(),
    }];
    let b = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(LIMIT);
    match http {
        Http::One => b.http1_only(),
        Http::Two => b.http2_prior_knowledge(),
    }
    .build()
    .unwrap()
}

/// The aggregator: front-proxy certificate and the user headers it sends.
fn aggregator(pki: &Pki, http: Http) -> reqwest::Client {
    client(Some(&pki.server_ca), Some(&pki.aggregator), http)
}

async fn get(client: &reqwest::Client, served: &Served, path: &str) -> (u16, Value, Version) {
    get_port(client, served.addr.port(), path).await
}

async fn get_port(client: &reqwest::Client, port: u16, path: &str) -> (u16, Value, Version) {
    let response = client
        .get(format!("https://localhost:{port}{path}"))
        .header(
            "X-Remote-User",
            "system:serviceaccount:kube-system:horizontal-pod-autoscaler",
        )
        .header("X-Remote-Group", "system:serviceaccounts")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
    let version = response.version();
    let code = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, body, version)
}

fn names(body: &Value) -> Vec<&str> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {body}"))
        .iter()
        .map(|i| i["describedObject"]["name"].as_str().unwrap())
        .collect()
}

// ---- tests ----

#[tokio::test]
async fn discovery_of_both_versions_over_http2_and_http1() {
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    for http in [Http::Two, Http::One] {
        let c = aggregator(&pki, http);
        let want = match http {
            Http::One => Version::HTTP_11,
            Http::Two => Version::HTTP_2,
        };
        for (version, path) in [("v1beta2", V2), ("v1beta1", V1)] {
            let (code, body, got) = get(&c, &served, path).await;
            assert_eq!((code, got), (200, want), "{path}: {body}");
            assert_eq!(
                body,
                json!({
                    "kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": format!("custom.metrics.k8s.io/{version}"),
                    "resources": [
                        {"name": "pods/active_requests", "singularName": "", "namespaced": true,
                         "kind": "MetricValueList", "verbs": ["get"]},
                        {"name": "pods/active_requests_max_30s", "singularName": "", "namespaced": true,
                         "kind": "MetricValueList", "verbs": ["get"]},
                    ]
                })
            );
        }
        let (code, group, _) = get(&c, &served, "/apis/custom.metrics.k8s.io").await;
        assert_eq!(code, 200);
        assert_eq!(group["kind"], "APIGroup");
        assert_eq!(
            group["preferredVersion"],
            json!({"groupVersion": "custom.metrics.k8s.io/v1beta2", "version": "v1beta2"})
        );
        assert_eq!(group["versions"].as_array().unwrap().len(), 2);
        let (code, groups, _) = get(&c, &served, "/apis").await;
        assert_eq!(code, 200);
        assert_eq!(groups["kind"], "APIGroupList");
        assert_eq!(groups["groups"][0]["name"], "custom.metrics.k8s.io");
        assert!(groups["groups"][0].get("kind").is_none());
        for path in ["/openapi/v2", "/openapi/v3"] {
            let (code, body, _) = get(&c, &served, path).await;
            assert_eq!(
                (code, body["kind"].as_str()),
                (404, Some("Status")),
                "{path}"
            );
        }
    }
}

#[tokio::test]
async fn the_hpa_list_form_and_the_single_pod_form() {
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    for http in [Http::Two, Http::One] {
        let c = aggregator(&pki, http);
        // What an HPA with `type: Pods`, `metric: {name: active_requests}` asks.
        let (code, body, _) = get(
            &c,
            &served,
            &format!(
                "{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app=web,ticker=acme"
            ),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body,
            json!({
                "kind": "MetricValueList", "apiVersion": "custom.metrics.k8s.io/v1beta2", "metadata": {},
                "items": [
                    {"describedObject": {"kind": "Pod", "namespace": "shop", "name": "web-a", "apiVersion": "v1"},
                     "metric": {"name": "active_requests", "selector": null},
                     "timestamp": "2026-01-02T03:04:05Z", "value": "4"},
                    {"describedObject": {"kind": "Pod", "namespace": "shop", "name": "web-b", "apiVersion": "v1"},
                     "metric": {"name": "active_requests", "selector": null},
                     "timestamp": "2026-01-02T03:04:05Z", "value": "1500m"},
                ]
            })
        );
        // Windowed: peak over 30 s, windowSeconds 30; a set-based selector.
        let (code, body, _) = get(
            &c,
            &served,
            &format!(
                "{V2}/namespaces/shop/pods/*/active_requests_max_30s?labelSelector=app%20in%20(web)"
            ),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(names(&body), ["web-a", "web-b", "web-c"]);
        let values: Vec<&Value> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["value"])
            .collect();
        assert_eq!(values, [&json!("4250m"), &json!("9"), &json!("2")]);
        assert!(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["windowSeconds"] == 30)
        );
        // No labelSelector: every pod of the namespace; zero is a value like any other.
        let (_, body, _) = get(
            &c,
            &served,
            &format!("{V2}/namespaces/shop/pods/*/active_requests"),
        )
        .await;
        assert_eq!(names(&body), ["db-0", "web-a", "web-b", "web-c"]);
        assert_eq!(body["items"][3]["value"], "0");
        // No pod matches: an empty list, not an error.
        let (code, body, _) = get(
            &c,
            &served,
            &format!("{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app=none"),
        )
        .await;
        assert_eq!((code, &body["items"]), (200, &json!([])));
        let (code, body, _) = get(
            &c,
            &served,
            &format!("{V2}/namespaces/empty/pods/*/active_requests"),
        )
        .await;
        assert_eq!((code, &body["items"]), (200, &json!([])));

        // One named pod: a list of exactly one item, in both versions.
        let (code, body, _) = get(
            &c,
            &served,
            &format!("{V2}/namespaces/shop/pods/web-b/active_requests"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(names(&body), ["web-b"]);
        let (code, body, _) = get(
            &c,
            &served,
            &format!("{V1}/namespaces/shop/pods/web-b/active_requests_max_30s"),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            body,
            json!({
                "kind": "MetricValueList", "apiVersion": "custom.metrics.k8s.io/v1beta1", "metadata": {},
                "items": [{"describedObject": {"kind": "Pod", "namespace": "shop", "name": "web-b", "apiVersion": "v1"},
                           "metricName": "active_requests_max_30s", "timestamp": "2026-01-02T03:04:05Z",
                           "window": 30, "value": "9", "selector": null}]
            })
        );
        let (code, body, _) = get(
            &c,
            &served,
            &format!("{V2}/namespaces/shop/pods/web-z/active_requests"),
        )
        .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (404, Some("NotFound")),
            "{body}"
        );
    }
}

#[tokio::test]
async fn without_a_verified_front_proxy_certificate_401_and_headers_ignored() {
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    let path = format!("{V2}/namespaces/shop/pods/*/active_requests");
    for http in [Http::Two, Http::One] {
        for (who, c, needle) in [
            (
                "no certificate",
                client(Some(&pki.server_ca), None, http),
                "no client certificate",
            ),
            (
                "a certificate of another CA",
                client(Some(&pki.server_ca), Some(&pki.wrong_ca), http),
                "not one of custom_metrics_client_ca",
            ),
            (
                "a common name not allowed",
                client(Some(&pki.server_ca), Some(&pki.wrong_name), http),
                "\"someone-else\" is not in custom_metrics_allowed_names",
            ),
        ] {
            // The identity headers are sent every time: they must not count.
            for p in [path.as_str(), V2, "/apis"] {
                let (code, body, _) = get(&c, &served, p).await;
                assert_eq!(code, 401, "{who} {p}: {body}");
                assert_eq!(
                    (
                        &body["kind"],
                        &body["apiVersion"],
                        &body["status"],
                        &body["reason"],
                        &body["code"]
                    ),
                    (
                        &json!("Status"),
                        &json!("v1"),
                        &json!("Failure"),
                        &json!("Unauthorized"),
                        &json!(401)
                    ),
                    "{who}"
                );
                assert!(
                    body["message"].as_str().unwrap().contains(needle),
                    "{who}: {body}"
                );
            }
        }
        // Health stays open for kubelet probes.
        let (code, body, _) = get(
            &client(Some(&pki.server_ca), None, http),
            &served,
            "/healthz",
        )
        .await;
        assert_eq!((code, body), (200, json!("ok\n")));
    }
    // A verified certificate without the user header is not a user.
    let response = aggregator(&pki, Http::Two)
        .get(format!("https://localhost:{}{path}", served.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("no user header"),
        "{body}"
    );
    assert!(
        served.source.asked.lock().unwrap().is_empty(),
        "no refused request reached the source"
    );
}

#[tokio::test]
async fn allowed_names_empty_admits_any_certificate_of_the_ca() {
    let pki = Pki::new();
    let served = serve(&pki, |c, _| c.custom_metrics.allowed_names.clear()).await;
    let c = client(Some(&pki.server_ca), Some(&pki.wrong_name), Http::Two);
    let (code, body, _) = get(&c, &served, V2).await;
    assert_eq!(code, 200, "{body}");
    let c = client(Some(&pki.server_ca), Some(&pki.wrong_ca), Http::Two);
    assert_eq!(get(&c, &served, V2).await.0, 401, "still only that CA");
}

#[tokio::test]
async fn not_found_and_bad_request_name_what_was_wrong() {
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    let c = aggregator(&pki, Http::One);
    for (path, code, reason, needle) in [
        (
            format!("{V2}/namespaces/shop/pods/*/requests_in_flight"),
            404,
            "NotFound",
            "metric requests_in_flight for pods",
        ),
        (
            format!("{V2}/namespaces/shop/services/*/active_requests"),
            404,
            "NotFound",
            "for services",
        ),
        (
            format!("{V2}/nodes/node-1/active_requests"),
            404,
            "NotFound",
            "for nodes",
        ),
        (
            format!("{V2}/namespaces/shop/metrics/active_requests"),
            404,
            "NotFound",
            "for namespaces",
        ),
        (
            "/apis/custom.metrics.k8s.io/v1beta3".into(),
            404,
            "NotFound",
            "requested resource",
        ),
        (
            "/apis/external.metrics.k8s.io/v1beta1".into(),
            404,
            "NotFound",
            "requested resource",
        ),
        (
            format!("{V2}/namespaces/Not_A_Namespace/pods/*/active_requests"),
            400,
            "BadRequest",
            "not a namespace name",
        ),
        (
            format!("{V2}/namespaces/shop/pods/a..b/active_requests"),
            400,
            "BadRequest",
            "not a pod name",
        ),
        (
            format!(
                "{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app%20between%20(x)"
            ),
            400,
            "BadRequest",
            "labelSelector",
        ),
    ] {
        let (got, body, _) = get(&c, &served, &path).await;
        assert_eq!(got, code, "{path}: {body}");
        assert_eq!(body["kind"], "Status", "{path}");
        assert_eq!(body["reason"], reason, "{path}");
        assert!(
            body["message"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
    }
    let response = c
        .delete(format!(
            "https://localhost:{}{V2}/namespaces/shop/pods/*/active_requests",
            served.addr.port()
        ))
        .header("X-Remote-User", "u")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert!(served.source.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_unavailable_store_is_503_never_zeros() {
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    *served.source.outage.lock().unwrap() = Some("redis: connection refused");
    for http in [Http::Two, Http::One] {
        let c = aggregator(&pki, http);
        for path in [
            format!("{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app=web"),
            format!("{V1}/namespaces/shop/pods/web-a/active_requests_max_30s"),
        ] {
            let (code, body, _) = get(&c, &served, &path).await;
            assert_eq!(code, 503, "{path}: {body}");
            assert_eq!(body["reason"], "ServiceUnavailable");
            assert!(body.get("items").is_none());
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("connection refused")
            );
        }
        // Discovery keeps answering: the APIService stays available.
        assert_eq!(get(&c, &served, V2).await.0, 200);
    }
    *served.source.outage.lock().unwrap() = None;
    let (code, _, _) = get(
        &aggregator(&pki, Http::Two),
        &served,
        &format!("{V2}/namespaces/shop/pods/*/active_requests"),
    )
    .await;
    assert_eq!(code, 200, "back once the store is");
}

#[tokio::test]
async fn a_self_signed_certificate_when_no_files_are_given() {
    let pki = Pki::new();
    let served = serve(&pki, |c, _| {
        c.custom_metrics.tls_cert = None;
        c.custom_metrics.tls_key = None;
    })
    .await;
    // insecureSkipTLSVerify, as the APIService must say for it.
    let c = client(None, Some(&pki.aggregator), Http::Two);
    let (code, body, version) = get(&c, &served, V2).await;
    assert_eq!((code, version), (200, Version::HTTP_2), "{body}");
    // A client that verifies against the server CA refuses it.
    let strict = aggregator(&pki, Http::Two);
    assert!(
        strict
            .get(format!("https://localhost:{}{V2}", served.addr.port()))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn rotated_certificate_and_front_proxy_ca_reach_new_requests() {
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    let new_server_ca = Ca::new("server-ca-2");
    let new_front_proxy_ca = Ca::new("front-proxy-ca-2");
    let new_aggregator = new_front_proxy_ca.client("front-proxy-client");
    let server = new_server_ca.server();
    // Key first: between the two writes the pair does not match, and the
    // check keeps the old one until it does.
    std::fs::write(served.dir.join("tls.key"), &server.key_pem).unwrap();
    std::fs::write(served.dir.join("tls.crt"), &server.cert_pem).unwrap();
    std::fs::write(served.dir.join("ca.crt"), new_front_proxy_ca.0.pem()).unwrap();
    let rotated = client(Some(&new_server_ca), Some(&new_aggregator), Http::Two);
    eventually(LIMIT, "the new certificate and CA to be in use", || {
        let (rotated, served) = (&rotated, &served);
        async move {
            rotated
                .get(format!("https://localhost:{}{V2}", served.addr.port()))
                .header("X-Remote-User", "u")
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    // The old front-proxy certificate is refused on a new connection.
    let old = client(Some(&new_server_ca), Some(&pki.aggregator), Http::Two);
    assert_eq!(get(&old, &served, V2).await.0, 401);
}

#[tokio::test]
async fn shutdown_ends_the_server() {
    let pki = Pki::new();
    let mut served = serve(&pki, |_, _| {}).await;
    let c = aggregator(&pki, Http::Two);
    assert_eq!(
        get(&c, &served, V2).await.0,
        200,
        "an open HTTP/2 connection"
    );
    served.token.cancel();
    tokio::time::timeout(LIMIT, &mut served.task)
        .await
        .expect("serve returns after cancellation, open connections included")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(served.addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn plaintext_and_stalled_handshakes_disturb_nobody() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let served = serve(&pki, |_, _| {}).await;
    // A plaintext client on the HTTPS port: the handshake fails, the
    // connection is closed without an answer.
    let mut plain = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    plain
        .write_all(b"GET /apis HTTP/1.1\r\nHost: x\r\nX-Remote-User: admin\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(LIMIT, plain.read_to_end(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(read.is_err() || !String::from_utf8_lossy(&buf).contains("APIGroupList"));
    // A client that connects and says nothing holds no one up.
    let _stalled = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let (code, _, _) = get(&aggregator(&pki, Http::Two), &served, V2).await;
    assert_eq!(code, 200);
}

// ---- served by `run`, over the engine and a real store ----

/// A whole server (`run`) with the API on, its certificate and front-proxy
/// CA from `pki`, and `change` applied.
async fn served_by_run(
    pki: &Pki,
    change: impl FnOnce(&mut Config),
) -> (common::TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_pki(pki, dir.path());
    let mut config = {
        let mut c = common::test_config();
        c.servers.custom_metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        c.custom_metrics.tls_cert = Some(dir.path().join("tls.crt"));
        c.custom_metrics.tls_key = Some(dir.path().join("tls.key"));
        c.custom_metrics.client_ca = Some(dir.path().join("ca.crt"));
        c.custom_metrics.allowed_names = vec!["front-proxy-client".into()];
        c
    };
    change(&mut config);
    (common::start_server(config).await, dir)
}

fn item_values(body: &Value) -> Vec<(String, String)> {
    body["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {body}"))
        .iter()
        .map(|i| {
            (
                i["describedObject"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                i["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_same_pod_samples_as_get_metrics() {
    use common::envoy::{Sidecar, inbound, istio_node};
    let pki = Pki::new();
    let (server, _dir) = served_by_run(&pki, |_| {}).await;
    let port = server.addr(activescale::Port::CustomMetrics).port();
    let mut pods = Vec::new();
    for (name, value) in [("web-1", 3.0), ("web-2", 4.0)] {
        let node = istio_node("shop", name, &[("app", "web")], "web");
        let mut sidecar = Sidecar::connect(server.sink, node).await;
        sidecar.push_gauges(&[(&inbound(8080), value)]).await;
        pods.push(sidecar);
    }
    let scaler = server.scaler_client().await;
    let r = common::so_ref(
        "shop",
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    );
    eventually(LIMIT, "GetMetrics sees both pods", || {
        let (mut c, r) = (scaler.clone(), r.clone());
        async move { common::get_metric(&mut c, &r).await.ok() == Some(7.0) }
    })
    .await;

    for http in [Http::Two, Http::One] {
        let c = aggregator(&pki, http);
        let list = format!("{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app=web");
        let (code, body, _) = get_port(&c, port, &list).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            item_values(&body),
            [("web-1".into(), "3".into()), ("web-2".into(), "4".into())],
            "the values GetMetrics summed to 7"
        );
        let one = format!("{V2}/namespaces/shop/pods/web-2/active_requests");
        let (code, body, _) = get_port(&c, port, &one).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(item_values(&body), [("web-2".into(), "4".into())]);
        let v1 = format!("{V1}/namespaces/shop/pods/*/active_requests?labelSelector=app=web");
        let (code, body, _) = get_port(&c, port, &v1).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["items"].as_array().map(Vec::len), Some(2), "{body}");
        let (code, body, _) = get_port(
            &c,
            port,
            &format!("{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app=nothing"),
        )
        .await;
        assert_eq!(
            (code, body["items"].clone()),
            (200, json!([])),
            "no pods: empty"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_answers_503_while_the_store_warms_up_never_an_empty_list() {
    let pki = Pki::new();
    let (server, _dir) =
        served_by_run(&pki, |c| c.engine.warmup = Some(Duration::from_secs(3600))).await;
    let port = server.addr(activescale::Port::CustomMetrics).port();
    let c = aggregator(&pki, Http::Two);
    let (code, body, _) = get_port(
        &c,
        port,
        &format!("{V2}/namespaces/shop/pods/*/active_requests?labelSelector=app=web"),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["kind"], "Status", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_windowed_metrics_as_a_windowed_trigger_reads_them() {
    use common::envoy::{Sidecar, inbound, istio_node};
    let pki = Pki::new();
    let (server, _dir) = served_by_run(&pki, |c| {
        c.custom_metrics.windows = vec!["max_30s".into()];
    })
    .await;
    let port = server.addr(activescale::Port::CustomMetrics).port();
    let node = istio_node("shop", "web-1", &[("app", "web")], "web");
    let mut sidecar = Sidecar::connect(server.sink, node).await;
    let scaler = server.scaler_client().await;
    let now = common::so_ref(
        "shop",
        "web",
        &[("labelSelector", "app=web"), ("targetValue", "10")],
    );
    let peak = common::so_ref(
        "shop",
        "web",
        &[
            ("labelSelector", "app=web"),
            ("window", "30s"),
            ("windowAggregation", "max"),
            ("targetValue", "10"),
        ],
    );
    // A peak of 7, then 2: the store has seen both once GetMetrics says 2.
    for value in [7.0, 2.0] {
        sidecar.push_gauges(&[(&inbound(8080), value)]).await;
        eventually(LIMIT, "GetMetrics sees the pushed value", || {
            let (mut c, r) = (scaler.clone(), now.clone());
            async move { common::get_metric(&mut c, &r).await.ok() == Some(value) }
        })
        .await;
    }
    let windowed = {
        let mut c = scaler.clone();
        common::get_metric(&mut c, &peak)
            .await
            .expect("windowed GetMetrics")
    };
    assert_eq!(windowed, 7.0, "the windowed trigger's peak");

    let c = aggregator(&pki, Http::Two);
    let (code, body, _) = get_port(
        &c,
        port,
        &format!("{V2}/namespaces/shop/pods/*/active_requests_max_30s?labelSelector=app=web"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(item_values(&body), [("web-1".into(), "7".into())]);
    assert_eq!(body["items"][0]["windowSeconds"], 30, "{body}");
    let (code, body, _) = get_port(
        &c,
        port,
        &format!("{V2}/namespaces/shop/pods/web-1/active_requests"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(item_values(&body), [("web-1".into(), "2".into())], "now");
    assert!(body["items"][0].get("windowSeconds").is_none(), "{body}");
    let (code, body, _) = get_port(
        &c,
        port,
        &format!("{V1}/namespaces/shop/pods/web-1/active_requests_max_30s"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["items"][0]["value"], "7", "{body}");
    assert_eq!(body["items"][0]["window"], 30, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_answers_503_for_a_windowed_metric_while_warming_up() {
    let pki = Pki::new();
    let (server, _dir) = served_by_run(&pki, |c| {
        c.engine.warmup = Some(Duration::from_secs(3600));
        c.custom_metrics.windows = vec!["max_30s".into()];
    })
    .await;
    let port = server.addr(activescale::Port::CustomMetrics).port();
    let (code, body, _) = get_port(
        &aggregator(&pki, Http::Two),
        port,
        &format!("{V2}/namespaces/shop/pods/*/active_requests_max_30s"),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["kind"], "Status", "{body}");
}

fn rule(server: &str, query: &str) -> activescale::config::CustomMetricsRule {
    activescale::config::CustomMetricsRule {
        name: "requests_per_second".into(),
        server: server.into(),
        query: query.into(),
        pod_label: "pod".into(),
        window: Some(Duration::from_secs(120)),
        pods_from: activescale::config::PodsFrom::Prometheus,
        timeout: None,
    }
}

const RULE: &str = "sum by (<<.GroupBy>>) (cm_rps{<<.LabelMatchers>>})";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_prometheus_rules_per_pod_from_a_real_prometheus() {
    let p = common::prometheus_server::shared().await;
    let ns = "t-cm";
    for (pod, app, value) in [
        ("web-1", "web", 2.5),
        ("web-2", "web", 0.5),
        ("db-0", "db", 9.0),
    ] {
        p.exporter.set(
            "cm_rps",
            &[("namespace", ns), ("pod", pod), ("app", app)],
            value,
        );
    }
    // Another namespace's pod of the same app, and a series naming no pod.
    p.exporter.set(
        "cm_rps",
        &[
            ("namespace", "t-cm-other"),
            ("pod", "web-9"),
            ("app", "web"),
        ],
        5.0,
    );
    p.exporter
        .set("cm_rps", &[("namespace", ns), ("app", "web")], 4.0);
    p.prometheus
        .wait_for(&format!(
            "count(cm_rps{{namespace=~\"{ns}|t-cm-other\"}}) == 5"
        ))
        .await;

    let pki = Pki::new();
    let url = p.prometheus.url.clone();
    let (server, _dir) = served_by_run(&pki, move |c| {
        c.custom_metrics.rules = vec![rule(&url, RULE)];
        // Long enough that the repeated request below is a cache hit
        // whatever the machine's load.
        c.prometheus.cache_ttl = Duration::from_secs(300);
    })
    .await;
    let port = server.addr(activescale::Port::CustomMetrics).port();
    let c = aggregator(&pki, Http::Two);
    let path = |rest: &str| format!("{V2}/namespaces/{ns}/pods/{rest}");

    let (code, body, _) = get_port(
        &c,
        port,
        &path("*/requests_per_second?labelSelector=app=web"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        item_values(&body),
        [
            ("web-1".into(), "2500m".into()),
            ("web-2".into(), "500m".into())
        ],
        "only this namespace's web pods; the series without a pod label skipped"
    );
    let item = &body["items"][0];
    assert_eq!(item["windowSeconds"], 120, "{body}");
    assert_eq!(item["metric"]["name"], "requests_per_second");
    // The same request again shares the cached answer: no second query.
    let before = p.prometheus.settled_query_count().await;
    let (code, again, _) = get_port(
        &c,
        port,
        &path("*/requests_per_second?labelSelector=app=web"),
    )
    .await;
    assert_eq!((code, item_values(&again)), (200, item_values(&body)));
    assert_eq!(
        p.prometheus.settled_query_count().await,
        before,
        "served from the cache"
    );
    let stamp = humantime::parse_rfc3339(item["timestamp"].as_str().unwrap()).unwrap();
    assert!(
        stamp > UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        "the sample time: {body}"
    );

    let (code, body, _) = get_port(&c, port, &path("db-0/requests_per_second")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(item_values(&body), [("db-0".into(), "9".into())]);
    let (code, body, _) = get_port(&c, port, &path("web-9/requests_per_second")).await;
    assert_eq!(code, 404, "another namespace's pod: {body}");

    // An injection attempt: refused by the selector grammar, or escaped
    // into a value no series has. Either way no series of another scope.
    let (code, body, _) = get_port(
        &c,
        port,
        &path("*/requests_per_second?labelSelector=app%3Dx%22%7D%20or%20vector(1)%20%23"),
    )
    .await;
    match code {
        400 => assert_eq!(body["kind"], "Status", "{body}"),
        200 => assert_eq!(body["items"], json!([]), "{body}"),
        other => panic!("{other}: {body}"),
    }
    // A metricLabelSelector on the namespace would widen the scope: refused.
    let (code, body, _) = get_port(
        &c,
        port,
        &path("*/requests_per_second?metricLabelSelector=namespace%3Dt-cm-other"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    // The live view shows the rule's answers as it shows active_requests'.
    let (code, triggers) = common::http_get(&format!("http://{}/v1/triggers", server.http)).await;
    assert_eq!(code, 200, "{triggers}");
    let triggers: serde_json::Value = serde_json::from_str(&triggers).unwrap();
    let rule_rows: Vec<_> = triggers["triggers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["via"] == "custom-metrics" && t["metric"] == "requests_per_second")
        .collect();
    assert!(!rule_rows.is_empty(), "{triggers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_answers_503_when_prometheus_is_unreachable() {
    // A port that was free a moment ago: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pki = Pki::new();
    let (server, _dir) = served_by_run(&pki, move |c| {
        c.custom_metrics.rules = vec![rule(&format!("http://{closed}"), RULE)];
    })
    .await;
    let port = server.addr(activescale::Port::CustomMetrics).port();
    let (code, body, _) = get_port(
        &aggregator(&pki, Http::Two),
        port,
        &format!("{V2}/namespaces/shop/pods/*/requests_per_second"),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["kind"], "Status", "{body}");
    assert!(body.get("items").is_none(), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("prometheus"),
        "{body}"
    );
}
